//! The storage trait the format sits on, with a file and an in-memory implementation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::RwLock;

/// Byte-addressed storage under an image: the image file itself, an external data file, a raw file.
///
/// Implementations must be usable from several threads at once; requests to disjoint ranges may
/// run concurrently.
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`. Bytes past the end of the storage read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage when needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the storage to `len` bytes (new bytes read as zero).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zero. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Hints that `[offset, offset+len)` is no longer needed; its contents become unspecified.
    /// The default does nothing.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Buffer, offset and length alignment that direct data I/O on this storage needs (1: none).
    fn alignment(&self) -> usize {
        1
    }
    /// The file descriptor, for callers that do data I/O themselves (io_uring).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Bytes allocated on the host (for "disk size"); `None` when unknown.
    fn allocated_size(&self) -> Option<u64> {
        None
    }
}

/// A heap buffer aligned for `O_DIRECT`.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let size = len.max(1).div_ceil(align) * align;
        let layout = std::alloc::Layout::from_size_align(size, align.max(1))
            .expect("alignment is a power of two");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points at `layout.size() >= len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A [`Storage`] on a host file, with positional I/O (`pread`/`pwrite`) and optional `O_DIRECT`.
pub struct FileStorage {
    file: File,
    direct: bool,
    align: usize,
}

impl FileStorage {
    /// Opens `path`, read-only or read-write, optionally with `O_DIRECT` (cache=none).
    pub fn open(path: impl AsRef<Path>, writable: bool, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(writable);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        Ok(Self::from_file(file, direct))
    }

    /// Creates (or truncates) `path` for reading and writing.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self::from_file(file, false))
    }

    /// Wraps an open file; `direct` says whether it was opened with `O_DIRECT`.
    pub fn from_file(file: File, direct: bool) -> Self {
        FileStorage {
            file,
            direct,
            align: if direct { 4096 } else { 1 },
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn aligned(&self, buf: *const u8, len: usize, offset: u64) -> bool {
        !self.direct
            || ((buf as usize) % self.align == 0
                && len % self.align == 0
                && offset % self.align as u64 == 0)
    }

    fn pread_full(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.pread_full(buf, offset);
        }
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align);
        self.pread_full(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.file.write_all_at(buf, offset);
        }
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align);
        let skip = (offset - start) as usize;
        if skip != 0 || buf.len() % self.align != 0 {
            self.pread_full(&mut bounce, start)?;
        }
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce, start)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own open fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // SAFETY: as above.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            let cur = self.len()?;
            if offset + len > cur {
                self.file.set_len(offset + len)?;
            }
            return Ok(());
        }
        let chunk = AlignedBuf::new(len.min(1 << 20) as usize, self.align.max(512));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own open fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            log::debug!("discard not supported: {}", io::Error::last_os_error());
        }
        Ok(())
    }

    fn alignment(&self) -> usize {
        self.align
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn allocated_size(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}

/// A [`Storage`] in memory, for tests and tools.
#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(data),
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        if offset < d.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(d.len() - start);
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= (1u64 << 36))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond 64 GiB"))?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > (1u64 << 36) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "length beyond 64 GiB",
            ));
        }
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
}
