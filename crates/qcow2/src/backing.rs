//! Backing images and the gate through which every implicitly opened file passes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

/// Allocation status of a guest range, as block-status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status.
    pub len: u64,
    /// Whether some layer of the chain (at `depth`) allocates the range.
    pub allocated: bool,
    /// Whether the range reads as zero.
    pub zero: bool,
    /// Whether the range is backed by data (not just a zero flag).
    pub data: bool,
    /// Layer of the chain that answers: 0 is the image itself, 1 its backing image, ...
    /// For unallocated ranges: the number of layers in the chain.
    pub depth: u32,
    /// Host offset of the data in the answering layer's data file, when it has one.
    pub offset: Option<u64>,
}

/// Read access to a guest-visible image: what a backing image must provide.
///
/// Implemented by [`crate::Qcow2`] and [`RawImage`], and by anything else a caller wants to put
/// below a qcow2 image, so chains of any depth and format work.
pub trait BlockRead: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from guest `offset`; `offset + buf.len()` must not exceed [`BlockRead::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Allocation status of `[offset, offset + len)`: a prefix with one status.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len: len.min(self.size().saturating_sub(offset)),
            allocated: true,
            zero: false,
            data: true,
            depth: 0,
            offset: Some(offset),
        })
    }
    /// Format name (`qcow2`, `raw`, ...).
    fn format_name(&self) -> &str;
    /// File name the image was opened from, if any.
    fn filename(&self) -> Option<&Path> {
        None
    }
    /// The image below this one in the chain, if any.
    fn backing_image(&self) -> Option<Arc<dyn BlockRead>> {
        None
    }
}

/// Reads `[offset, offset + buf.len())` from `b`, with zeros past its end.
pub fn read_clamped(b: &dyn BlockRead, buf: &mut [u8], offset: u64) -> Result<()> {
    let size = b.size();
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        b.read_at(&mut buf[..avail], offset)?;
    }
    buf[avail..].fill(0);
    Ok(())
}

/// A raw image: guest offset equals file offset.
pub struct RawImage {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    /// Last data extent found with SEEK_DATA/SEEK_HOLE: (start, end).
    extent: std::sync::Mutex<(u64, u64)>,
}

impl RawImage {
    /// Wraps a storage.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        RawImage {
            storage,
            path: None,
            extent: std::sync::Mutex::new((0, 0)),
        }
    }

    /// Opens a raw file.
    pub fn open(path: impl AsRef<Path>, writable: bool, direct: bool) -> Result<Self> {
        let st = FileStorage::open(path.as_ref(), writable, direct)?;
        Ok(RawImage {
            storage: Arc::new(st),
            path: Some(path.as_ref().to_path_buf()),
            extent: std::sync::Mutex::new((0, 0)),
        })
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

impl BlockRead for RawImage {
    fn size(&self) -> u64 {
        self.storage.len().unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.storage.read_at(buf, offset)?)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.size();
        let len = len.min(size.saturating_sub(offset));
        let data = |l: u64| BlockStatus {
            len: l,
            allocated: true,
            zero: false,
            data: true,
            depth: 0,
            offset: Some(offset),
        };
        let Some(fd) = self.storage.raw_fd() else {
            return Ok(data(len));
        };
        {
            // SEEK_HOLE scans to the next hole, which is the end of a fully allocated file:
            // remember the extent instead of rescanning it for every request.
            let (s, e) = *self.extent.lock().unwrap_or_else(|p| p.into_inner());
            if offset >= s && offset < e {
                return Ok(data(len.min(e - offset)));
            }
        }
        // SAFETY: lseek on a file descriptor owned by our storage; no memory is involved.
        let d = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            // ENXIO: only a hole up to the end of the file.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                return Ok(BlockStatus {
                    len,
                    allocated: true,
                    zero: true,
                    data: false,
                    depth: 0,
                    offset: Some(offset),
                });
            }
            return Ok(data(len));
        }
        let d = d as u64;
        if d > offset {
            return Ok(BlockStatus {
                len: (d - offset).min(len),
                allocated: true,
                zero: true,
                data: false,
                depth: 0,
                offset: Some(offset),
            });
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        let l = if h > offset as i64 {
            *self.extent.lock().unwrap_or_else(|p| p.into_inner()) = (offset, h as u64);
            (h as u64 - offset).min(len)
        } else {
            len
        };
        Ok(data(l))
    }
    fn format_name(&self) -> &str {
        "raw"
    }
    fn filename(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// What an image header asks to open: a backing file.
#[derive(Debug, Clone)]
pub struct BackingRequest<'a> {
    /// The name as written in the header.
    pub name: &'a str,
    /// The format recorded in the header, if any.
    pub format: Option<&'a str>,
    /// The path of the image that refers to it (for resolving relative names).
    pub image_path: Option<&'a Path>,
    /// Depth of the referring image in the chain (0: the top image).
    pub depth: u32,
    /// Canonical paths of the images above, for loop detection.
    pub chain: &'a [PathBuf],
}

/// What an image header asks to open: an external data file.
#[derive(Debug, Clone)]
pub struct DataFileRequest<'a> {
    /// The name as written in the header.
    pub name: &'a str,
    /// The path of the image that refers to it.
    pub image_path: Option<&'a Path>,
    /// Whether the image is opened for writing.
    pub writable: bool,
}

/// The gate for files an image header would open implicitly. Guest-controlled images can name
/// any path, so nothing is opened unless the caller's opener allows it.
pub trait ImageOpener: Send + Sync {
    /// Opens a backing image, or refuses.
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Arc<dyn BlockRead>>;
    /// Opens an external data file, or refuses.
    fn open_data_file(&self, req: &DataFileRequest<'_>) -> Result<Arc<dyn Storage>>;
}

/// Refuses every implicit open (the default): callers supply backing images themselves.
#[derive(Debug, Default, Clone, Copy)]
pub struct DenyImplicitOpen;

impl ImageOpener for DenyImplicitOpen {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Arc<dyn BlockRead>> {
        Err(Error::Open {
            name: req.name.to_string(),
            reason: "implicit opening of backing files is not allowed".into(),
        })
    }
    fn open_data_file(&self, req: &DataFileRequest<'_>) -> Result<Arc<dyn Storage>> {
        Err(Error::Open {
            name: req.name.to_string(),
            reason: "implicit opening of data files is not allowed".into(),
        })
    }
}

/// Resolves `name` relative to the directory of `image`, like QEMU's path_combine.
pub fn resolve_relative(name: &str, image: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.and_then(|i| i.parent()) {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Follows backing and data files from the host file system like qemu-img does: relative
/// names resolve against the referring image, the format is probed when not recorded, backing
/// images open read-only, loops and chains deeper than `max_depth` are refused.
#[derive(Debug, Clone, Copy)]
pub struct FollowFiles {
    /// Longest chain accepted.
    pub max_depth: u32,
    /// Open with O_DIRECT.
    pub direct: bool,
}

impl Default for FollowFiles {
    fn default() -> Self {
        FollowFiles {
            max_depth: 64,
            direct: false,
        }
    }
}

/// Guesses an image's format from its first bytes (qcow2 magic, else raw).
pub fn probe_format(path: &Path) -> Result<&'static str> {
    let st = FileStorage::open(path, false, false)?;
    let mut m = [0u8; 4];
    st.read_at(&mut m, 0)?;
    Ok(if u32::from_be_bytes(m) == crate::header::MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}

impl ImageOpener for FollowFiles {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Arc<dyn BlockRead>> {
        let fail = |reason: String| Error::Open {
            name: req.name.to_string(),
            reason,
        };
        if req.depth + 1 > self.max_depth {
            return Err(fail(format!(
                "backing chain deeper than {}",
                self.max_depth
            )));
        }
        let path = resolve_relative(req.name, req.image_path);
        let canon = path.canonicalize().map_err(|e| fail(format!("{e}")))?;
        if req.chain.contains(&canon) {
            return Err(fail("backing chain contains a loop".into()));
        }
        let fmt = match req.format {
            Some(f) => f,
            None => probe_format(&canon)?,
        };
        match fmt {
            "raw" => Ok(Arc::new(RawImage::open(&path, false, self.direct)?)),
            "qcow2" => {
                let mut chain = req.chain.to_vec();
                chain.push(canon);
                let opts = crate::OpenOptions {
                    opener: Arc::new(*self),
                    direct: self.direct,
                    ..crate::OpenOptions::default()
                };
                let img = crate::Qcow2::open_path_in_chain(&path, opts, req.depth + 1, &chain)
                    .map_err(|e| fail(e.to_string()))?;
                Ok(Arc::new(img))
            }
            other => Err(fail(format!("Unknown driver '{other}'"))),
        }
    }

    fn open_data_file(&self, req: &DataFileRequest<'_>) -> Result<Arc<dyn Storage>> {
        // Like QEMU: data file names are used as they are (relative to the working
        // directory), unlike backing file names.
        let path = Path::new(req.name);
        let st = FileStorage::open(path, req.writable, self.direct).map_err(|e| Error::Open {
            name: req.name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(st))
    }
}
