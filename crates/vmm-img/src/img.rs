//! Opening images of either format, and small helpers shared by the subcommands.

use std::path::Path;
use std::sync::Arc;

use qcow2::backing::probe_format;
use qcow2::{
    BlockRead, BlockStatus, FileStorage, FollowFiles, OpenOptions, Qcow2, RawImage, Storage,
};

use crate::graph_img::{reduce, GraphImage, GraphOpener, GraphReader, Plain, Source};
use crate::Error;

/// Cache modes of `-t`/`-T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Page cache, no flushes needed per write.
    Writeback,
    /// O_DIRECT.
    None,
    /// Page cache, flush after each write (treated as writeback plus a final flush).
    Writethrough,
    /// O_DIRECT and flush.
    Directsync,
    /// No flushes at all.
    Unsafe,
}

impl Cache {
    /// Parses qemu-img's names.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "writeback" => Cache::Writeback,
            "none" | "off" => Cache::None,
            "writethrough" => Cache::Writethrough,
            "directsync" => Cache::Directsync,
            "unsafe" => Cache::Unsafe,
            _ => return Err(Error::msg(format!("Invalid cache option: {s}"))),
        })
    }

    /// Whether files are opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, Cache::None | Cache::Directsync)
    }
}

/// An open image: a plain qcow2 or raw file through the qcow2 crate (the fast path), or
/// anything else through the block graph.
pub enum Image {
    /// A qcow2 image.
    Qcow2(Arc<Qcow2>),
    /// A raw image.
    Raw(Arc<RawImage>),
    /// An image opened through the block graph (`json:`, `--image-opts`, other drivers).
    Graph(Arc<GraphImage>),
}

impl Image {
    /// Opens an image as the command line names it: through the block graph for `json:`
    /// file names, `--image-opts` and drivers other than qcow2 and raw, else directly.
    pub fn open_source(src: &Source<'_>, writable: bool, cache: Cache) -> Result<Self, Error> {
        if src.uses_graph() {
            return Ok(Image::Graph(Arc::new(GraphImage::open(
                src, writable, cache, false,
            )?)));
        }
        Self::open(Path::new(src.name), src.fmt, writable, cache)
    }

    /// Opens `path` as `fmt` (probed when `None`), following backing files like qemu-img.
    pub fn open(
        path: &Path,
        fmt: Option<&str>,
        writable: bool,
        cache: Cache,
    ) -> Result<Self, Error> {
        Self::open_opts(path, fmt, writable, cache, false)
    }

    /// Like [`Image::open`]; `no_backing` ignores the backing file (`-u`). A `json:` name or
    /// another driver that amounts to a plain qcow2 or raw file opens that file directly
    /// (what the qcow2-only subcommands need); anything else opens through the graph.
    pub fn open_opts(
        path: &Path,
        fmt: Option<&str>,
        writable: bool,
        cache: Cache,
        no_backing: bool,
    ) -> Result<Self, Error> {
        let src = Source::path(path.to_str().unwrap_or_default(), fmt);
        Self::open_src_opts(&src, writable, cache, no_backing)
    }

    /// [`Image::open_opts`] of a source named on the command line (with `-U`, which the
    /// graph applies to QEMU's image locks).
    pub fn open_src_opts(
        src: &Source<'_>,
        writable: bool,
        cache: Cache,
        no_backing: bool,
    ) -> Result<Self, Error> {
        let path = Path::new(src.name);
        let fmt = src.fmt;
        if src.uses_graph() {
            return match reduce(src)? {
                Plain::File { path, fmt } => {
                    Self::open_opts(Path::new(&path), Some(fmt), writable, cache, no_backing)
                }
                Plain::Other(_) => Ok(Image::Graph(Arc::new(GraphImage::open(
                    src, writable, cache, no_backing,
                )?))),
            };
        }
        check_openable(path, writable)?;
        let probed = fmt.is_none();
        let fmt = match fmt {
            Some(f) => f.to_string(),
            None => probe_format(path)
                .map_err(|e| Error::msg(format!("Could not open '{}': {e}", path.display())))?
                .to_string(),
        };
        let wrap =
            |e: qcow2::Error| Error::msg(format!("Could not open '{}': {e}", path.display()));
        match fmt.as_str() {
            "qcow2" => {
                let img = Qcow2::open_path(
                    path,
                    OpenOptions {
                        writable,
                        direct: cache.direct(),
                        opener: Arc::new(GraphOpener {
                            files: FollowFiles {
                                direct: cache.direct(),
                                ..Default::default()
                            },
                        }),
                        no_backing,
                        ..Default::default()
                    },
                )
                .map_err(wrap)?;
                Ok(Image::Qcow2(Arc::new(img)))
            }
            "raw" => {
                let r = RawImage::open(path, writable, cache.direct()).map_err(wrap)?;
                if probed && writable {
                    probed_raw_warning(path);
                }
                Ok(Image::Raw(Arc::new(r)))
            }
            other => Err(Error::msg(format!("Unknown file format '{other}'"))),
        }
    }

    /// The format name.
    pub fn format(&self) -> &'static str {
        match self {
            Image::Qcow2(_) => "qcow2",
            Image::Raw(_) => "raw",
            Image::Graph(g) => g.format(),
        }
    }

    /// As a readable image.
    pub fn reader(&self) -> Arc<dyn BlockRead> {
        match self {
            Image::Qcow2(q) => q.clone(),
            Image::Raw(r) => r.clone(),
            Image::Graph(g) => Arc::new(GraphReader(g.clone())),
        }
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.size(),
            Image::Raw(r) => r.size(),
            Image::Graph(g) => g.size(),
        }
    }

    /// Reads guest data.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), Error> {
        match self {
            Image::Qcow2(q) => Ok(q.read_at(buf, off)?),
            Image::Raw(r) => Ok(r.read_at(buf, off)?),
            Image::Graph(g) => g.read_at(buf, off),
        }
    }

    /// Writes guest data.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<(), Error> {
        match self {
            Image::Qcow2(q) => Ok(q.write_at(buf, off)?),
            Image::Raw(r) => Ok(r.storage().write_at(buf, off)?),
            Image::Graph(g) => g
                .backend()
                .write_buf(off, buf, Default::default())
                .map_err(|e| Error::msg(format!("error while writing at byte {off}: {e}"))),
        }
    }

    /// Makes a range read as zero.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<(), Error> {
        match self {
            Image::Qcow2(q) => Ok(q.write_zeroes(off, len, true)?),
            Image::Raw(r) => Ok(r.storage().write_zeroes(off, len)?),
            Image::Graph(g) => g
                .backend()
                .write_zeroes(off, len, Default::default())
                .map_err(|e| Error::msg(format!("error while writing at byte {off}: {e}"))),
        }
    }

    /// Block status.
    pub fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, Error> {
        match self {
            Image::Qcow2(q) => Ok(q.block_status(off, len)?),
            Image::Raw(r) => Ok(r.block_status(off, len)?),
            Image::Graph(g) => g.block_status(off, len),
        }
    }

    /// Flushes.
    pub fn flush(&self) -> Result<(), Error> {
        match self {
            Image::Qcow2(q) => Ok(q.flush()?),
            Image::Raw(r) => Ok(r.storage().flush()?),
            Image::Graph(g) => g.backend().flush().map_err(|e| Error::msg(e.to_string())),
        }
    }

    /// The file the top layer's data lives in, when it is a plain file the data can be
    /// read from directly (not for images opened through the graph).
    pub fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        match self {
            Image::Qcow2(q) => Some(q.data_storage().clone()),
            Image::Raw(r) => Some(r.storage().clone()),
            Image::Graph(_) => None,
        }
    }

    /// The qcow2 image, or an error naming the operation.
    pub fn qcow2(&self, what: &str) -> Result<&Arc<Qcow2>, Error> {
        match self {
            Image::Qcow2(q) => Ok(q),
            Image::Raw(_) => Err(Error::msg(format!(
                "{what} is not supported for raw images"
            ))),
            Image::Graph(g) => Err(Error::msg(format!(
                "{what} is not supported for {} images opened through the block graph",
                g.format()
            ))),
        }
    }
}

/// Fails as qemu-img does when the file itself does not open (file-posix's error inside
/// img_open's): `Could not open 'PATH': Could not open 'PATH': <strerror>`.
pub fn check_openable(path: &Path, writable: bool) -> Result<(), Error> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
    {
        Ok(f) => {
            // Devices open as host_device; anything else must be a regular file.
            use std::os::unix::fs::FileTypeExt;
            let t = f.metadata()?.file_type();
            if t.is_file() || t.is_block_device() || t.is_char_device() {
                return Ok(());
            }
            let p = path.display();
            Err(Error::msg(format!(
                "Could not open '{p}': 'file' driver requires '{p}' to be a regular file"
            )))
        }
        Err(e) => {
            let p = path.display();
            Err(Error::msg(format!(
                "Could not open '{p}': Could not open '{p}': {}",
                strerror(&e)
            )))
        }
    }
}

/// QEMU's warning when raw_open opens an image whose format was probed for writing.
pub fn probed_raw_warning(path: &Path) {
    eprintln!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove \
         the restrictions.",
        path.display()
    );
}

/// The error text of an OS error as QEMU prints it (`strerror`, without Rust's suffix).
pub fn strerror(e: &std::io::Error) -> String {
    without_os_error(e.to_string())
}

/// A message without the ` (os error N)` Rust appends to an OS error's text.
pub fn without_os_error(m: String) -> String {
    match m.find(" (os error ") {
        Some(i) => m[..i].to_string(),
        None => m,
    }
}

/// Writes zeros over the first block of a file just grown from empty, as QEMU's
/// file-posix `allocate_first_block` does (so later alignment probing finds allocated
/// data): 512 bytes when the file is smaller than 4 KiB, else 4 KiB. Failures are ignored
/// as in QEMU.
fn allocate_first_block(st: &FileStorage, size: u64) {
    let n = if size < 4096 { 512 } else { 4096 };
    if let Err(e) = st.write_at(&[0u8; 4096][..n], 0) {
        log::debug!("allocating the first block: {e}");
    }
}

/// Creates a raw file of `size` bytes as QEMU's file-posix `raw_co_create` does: the file
/// is emptied, grown (sparse, `posix_fallocate`d or written with zeros as `prealloc` says)
/// and, unless written in full, its first block allocated. Errors read like QEMU's.
pub fn create_raw(path: &Path, size: u64, prealloc: qcow2::Preallocation) -> Result<(), Error> {
    use qcow2::Preallocation as P;
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| {
            Error::msg(format!(
                "Could not create '{}': {}",
                path.display(),
                strerror(&e)
            ))
        })?;
    if prealloc == P::Metadata {
        // QEMU has emptied the file by then.
        return Err(Error::msg("Unsupported preallocation mode: metadata"));
    }
    let resize_err =
        |e: std::io::Error| Error::msg(format!("Could not resize file: {}", strerror(&e)));
    match prealloc {
        P::Falloc if size > 0 => {
            let len = libc::off_t::try_from(size)
                .map_err(|_| resize_err(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
            // SAFETY: posix_fallocate on a file descriptor we own, with integer arguments.
            let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
            if r != 0 {
                return Err(Error::msg(format!(
                    "Could not preallocate new data: {}",
                    strerror(&std::io::Error::from_raw_os_error(r))
                )));
            }
        }
        _ => file.set_len(size).map_err(resize_err)?,
    }
    let st = FileStorage::from_file(file, false);
    if prealloc == P::Full {
        let z = vec![0u8; (1 << 20).min(size) as usize];
        let mut o = 0;
        while o < size {
            let n = (size - o).min(z.len() as u64) as usize;
            st.write_at(&z[..n], o).map_err(|e| {
                Error::msg(format!(
                    "Could not write zeros for preallocation: {}",
                    strerror(&e)
                ))
            })?;
            o += n as u64;
        }
    } else if size > 0 {
        allocate_first_block(&st, size);
    }
    st.flush()?;
    Ok(())
}

/// qemu's size_to_str: "%0.3g" with binary units.
pub fn size_to_str(v: u64) -> String {
    const SUF: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let i = if v == 0 {
        0
    } else {
        (((v as f64) * 1.024).log2().floor() as usize / 10).min(6)
    };
    let x = v as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}B", fmt_g3(x), SUF[i])
}

/// printf's "%0.3g" for the values size_to_str produces.
pub fn fmt_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let digits = x.abs().log10().floor() as i32 + 1;
    let prec = (3 - digits).max(0) as usize;
    let mut s = format!("{x:.prec$}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    s
}

/// A size argument as qemu-img's `cvtnum` reads it (`qemu_strtosz`, at most `i64::MAX`),
/// with its two-line error naming the argument.
pub fn cvtnum(name: &str, s: &str) -> Result<u64, Error> {
    let max = i64::MAX as u64;
    match crate::graph_opts::strtosz(s) {
        Ok((n, hex_suffix)) if n <= max => {
            if hex_suffix {
                eprintln!(
                    "vmm-img: warning: Using a multiplier suffix on hex numbers is deprecated: {s}"
                );
            }
            Ok(n)
        }
        Err(false) => Err(Error::msg(format!(
            "Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n\
             vmm-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ))),
        _ => Err(Error::msg(format!(
            "Invalid {name} specified. Must be between 0 and {max}."
        ))),
    }
}

/// Parses a size with qemu's suffixes (k, M, G, T, P, E; b for bytes; plain number = bytes).
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let s = s.trim();
    let bad = || {
        Error::msg(format!("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ('{s}')"))
    };
    let (num, mul) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(bad()),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mul).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if f < 0.0 || !f.is_finite() {
        return Err(bad());
    }
    Ok((f * mul as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(221184), "216 KiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1536 << 20), "1.5 GiB");
        assert_eq!(size_to_str(397312), "388 KiB");
        assert_eq!(size_to_str(1023), "0.999 KiB");
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 1536 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12x").is_err());
    }
}
