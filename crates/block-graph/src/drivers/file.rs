//! The `file` protocol driver: a host file (or block device) with positional vectored I/O,
//! `cache.direct` through `O_DIRECT` with aligned bounce buffers, FUA through
//! `RWF_DSYNC`, write-zeroes and discard through `fallocate`, block status through
//! `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use qcow2::AlignedBuf;

mod range_locks;
mod sys_io;
pub(crate) mod uring;

use range_locks::RangeLocks;

use crate::batch::{run_one, BatchBuf, BatchReq};
use crate::driver::{BlockDriver, CopyExtent, DriverStatus, StatusKind, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use crate::iov::{copy_from_iov, copy_to_iov, iov_len, iov_len_mut};
use crate::node::mlock;
use crate::perm::Perm;

/// How the file driver is configured.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Host path.
    pub filename: String,
    /// Open read-only.
    pub read_only: bool,
    /// `O_DIRECT`.
    pub direct: bool,
    /// Take QEMU's permission locks (`locking=on|auto`).
    pub locking: bool,
    /// `aio=io_uring`: batches go through `io_uring` through the page cache too (with
    /// `direct` they always do); the open fails where `io_uring` cannot be set up.
    pub io_uring: bool,
}

/// QEMU's lock bytes: 100 + i while holding permission bit i, 200 + i while not sharing it.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
/// The permission bits QEMU 7.2 locks (consistent read, write, write unchanged, resize).
const LOCK_BITS: u32 = 4;

/// The `file` driver's state.
pub struct FileDriver {
    file: File,
    filename: String,
    /// Request (offset, length and memory) alignment; 1 without `O_DIRECT`.
    align: usize,
    block_device: bool,
    rmw: RangeLocks,
    /// Whether `pwritev2(RWF_DSYNC)` works here (cleared on the first ENOTSUP/ENOSYS).
    dsync_ok: AtomicBool,
    /// Last data extent found with SEEK_DATA/SEEK_HOLE.
    extent: Mutex<(u64, u64)>,
    locking: bool,
    /// Bits locked at (LOCK_PERM_BASE, LOCK_SHARED_BASE).
    locked: Mutex<(u32, u32)>,
    /// Batches through `io_uring` even through the page cache (`aio=io_uring`).
    io_uring: bool,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl FileDriver {
    /// Opens the file. Errors read as QEMU's: `Could not open '/x': No such file or
    /// directory`.
    pub fn open(o: &FileOptions) -> Result<Self> {
        if o.io_uring {
            uring::probe().map_err(|e| {
                BlockError::from(e)
                    .prepend("failed to init linux io_uring ring")
                    .prepend("Unable to use io_uring")
            })?;
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!o.read_only);
        let mut flags = libc::O_CLOEXEC;
        if o.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(&o.filename).map_err(|e| {
            BlockError::from(e).prepend(&format!("Could not open '{}'", o.filename))
        })?;
        let md = file.metadata().map_err(BlockError::from)?;
        let block_device = md.file_type().is_block_device();
        if md.is_dir() {
            return Err(BlockError::generic(format!(
                "'{}' is not a regular file or block device",
                o.filename
            )));
        }
        let mut d = FileDriver {
            file,
            filename: o.filename.clone(),
            align: 1,
            block_device,
            rmw: RangeLocks::default(),
            dsync_ok: AtomicBool::new(true),
            extent: Mutex::new((0, 0)),
            locking: o.locking,
            locked: Mutex::new((0, 0)),
            io_uring: o.io_uring,
        };
        if o.direct {
            d.align = d.probe_alignment();
        }
        Ok(d)
    }

    /// An OFD lock operation on one byte: `F_OFD_GETLK` (test for a write lock, returns
    /// whether another open file holds one) or `F_OFD_SETLK` with a read lock or unlock.
    fn ofd(
        &self,
        cmd: libc::c_int,
        ty: libc::c_short,
        byte: i64,
    ) -> std::result::Result<bool, i32> {
        // SAFETY: flock is plain data; zeroed is a valid starting value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        loop {
            // SAFETY: fcntl on our own descriptor with a pointer to a local flock.
            let r = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
            if r == 0 {
                return Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short);
            }
            let e = errno();
            if e != libc::EINTR {
                return Err(e);
            }
        }
    }

    /// Finds the smallest request size `O_DIRECT` accepts (512 or 4096).
    fn probe_alignment(&self) -> usize {
        let mut buf = AlignedBuf::new(4096, 4096);
        for a in [512usize, 4096] {
            // SAFETY: pread into our own 4096-byte buffer, reading at most `a <= 4096` bytes.
            let r = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    a,
                    0,
                )
            };
            if r >= 0 {
                return a;
            }
        }
        4096
    }

    /// The request alignment (`O_DIRECT`), 1 otherwise.
    pub fn alignment(&self) -> usize {
        self.align
    }

    fn aligned_iov(
        &self,
        offset: u64,
        bases: impl Iterator<Item = (usize, usize)>,
        len: usize,
    ) -> bool {
        let a = self.align;
        if a == 1 {
            return true;
        }
        offset % a as u64 == 0
            && len % a == 0
            && bases.into_iter().all(|(p, l)| p % a == 0 && l % a == 0)
    }
}

impl FileDriver {
    /// Whether a batched request can go to the kernel as it is (aligned for `O_DIRECT`,
    /// FUA only where `RWF_DSYNC` works).
    fn batchable(&self, r: &BatchReq<'_>) -> bool {
        let (ptr, len) = match &r.buf {
            BatchBuf::Read(b) => (b.as_ptr() as usize, b.len()),
            BatchBuf::Write(b) => (b.as_ptr() as usize, b.len()),
        };
        len > 0
            && len <= i32::MAX as usize
            && (!r.fua || self.dsync_ok.load(Ordering::Relaxed))
            && self.aligned_iov(r.offset, std::iter::once((ptr, len)), len)
    }

    /// Completes a request after the kernel moved `done` bytes of it: the rest (a short
    /// transfer) or the retry (an error worth retrying) on the plain path.
    fn finish_batched(&self, r: &mut BatchReq<'_>, res: i32) -> Result<()> {
        let len = r.len();
        if res >= 0 && res as usize == len {
            return Ok(());
        }
        if res < 0 {
            let e = -res;
            if r.is_write() && r.fua && (e == libc::EOPNOTSUPP || e == libc::EINVAL) {
                self.dsync_ok.store(false, Ordering::Relaxed);
            }
            if matches!(
                e,
                libc::EINTR | libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL
            ) {
                return run_one(self, r);
            }
            return Err(BlockError::errno(e));
        }
        let done = res as usize;
        let offset = r.offset + done as u64;
        match &mut r.buf {
            BatchBuf::Read(b) => self.preadv_full(offset, &mut [IoSliceMut::new(&mut b[done..])]),
            BatchBuf::Write(b) => self.pwritev_full(offset, &[IoSlice::new(&b[done..])], r.fua),
        }
    }
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        if self.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn is_protocol(&self) -> bool {
        true
    }

    fn length(&self) -> Result<u64> {
        self.lseek(0, libc::SEEK_END).map_err(BlockError::errno)
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        // The usual read through the page cache: one buffer, filled by one call. Anything
        // else (a short read, an error, EINTR) is redone by the full path.
        if let [one] = &*iov {
            if self.align == 1 && self.preadv_once(offset, iov) == one.len() as isize {
                return Ok(());
            }
        }
        let len = iov_len_mut(iov);
        if self.aligned_iov(
            offset,
            iov.iter().map(|s| (s.as_ptr() as usize, s.len())),
            len,
        ) {
            return self.preadv_full(offset, iov);
        }
        let (start, blen) = self.bounce_range(offset, len);
        let mut bounce = AlignedBuf::new(blen, self.align);
        self.preadv_full(start, &mut [IoSliceMut::new(&mut bounce)])?;
        let skip = (offset - start) as usize;
        copy_to_iov(iov, 0, &bounce[skip..skip + len]);
        Ok(())
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        if self.align == 1 {
            // As for reads: one buffer written whole by one call, else the full path
            // (which writes it again from the start: the same bytes at the same place).
            if let [one] = iov {
                if !flags.fua && self.pwritev_once(offset, iov, false) == one.len() as isize {
                    return Ok(());
                }
            }
            return self.pwritev_full(offset, iov, flags.fua);
        }
        let len = iov_len(iov);
        let (start, blen) = self.bounce_range(offset, len);
        if self.aligned_iov(
            offset,
            iov.iter().map(|s| (s.as_ptr() as usize, s.len())),
            len,
        ) {
            let _g = self.rmw.lock(start, start + blen as u64, false);
            return self.pwritev_full(offset, iov, flags.fua);
        }
        let mut bounce = AlignedBuf::new(blen, self.align);
        let skip = (offset - start) as usize;
        let partial = skip != 0 || len % self.align != 0;
        let _g = self.rmw.lock(start, start + blen as u64, partial);
        if partial {
            self.preadv_full(start, &mut [IoSliceMut::new(&mut bounce)])?;
        }
        copy_from_iov(iov, 0, &mut bounce[skip..skip + len]);
        self.pwritev_full(start, &[IoSlice::new(&bounce)], flags.fua)
    }

    fn submit_batch(&self, reqs: &mut [BatchReq<'_>]) {
        if self.align == 1 && !self.io_uring {
            // Through the page cache, preadv/pwritev on this thread are faster than
            // io_uring, which hands buffered I/O it cannot finish at once to its workers
            // (`benches/RESULTS.md`); `aio=io_uring` asks for it all the same.
            return crate::batch::run_each(self, reqs);
        }
        // Requests the kernel cannot take as they are (bounced, read-modify-write) go
        // first, before this batch holds any range lock.
        let mut n = 0;
        for r in reqs.iter_mut().filter(|r| r.is_pending()) {
            if self.batchable(r) {
                n += 1;
            } else {
                r.result = Some(run_one(self, r));
            }
        }
        if n < 2 {
            return crate::batch::run_each(self, reqs);
        }
        let fd = self.file.as_raw_fd();
        let mut ios = Vec::with_capacity(n);
        let mut guards = Vec::new();
        for r in reqs.iter_mut().filter(|r| r.is_pending()) {
            let (ptr, len, write) = match &mut r.buf {
                BatchBuf::Read(b) => (b.as_mut_ptr(), b.len(), false),
                BatchBuf::Write(b) => (b.as_ptr() as *mut u8, b.len(), true),
            };
            if write && self.align > 1 {
                // Keep out read-modify-writes of the same blocks, as `write` does.
                let (start, blen) = self.bounce_range(r.offset, len);
                guards.push(self.rmw.lock(start, start + blen as u64, false));
            }
            ios.push(uring::Io {
                fd,
                write,
                ptr,
                len: len as u32,
                offset: r.offset,
                dsync: write && r.fua,
            });
        }
        let mut out = Vec::new();
        // The buffers are borrowed by `reqs` for the whole call, and `run` returns only
        // once the kernel is done with them.
        if !uring::run(&ios, &mut out) {
            drop(guards);
            return crate::batch::run_each(self, reqs);
        }
        drop(guards);
        for (r, &res) in reqs.iter_mut().filter(|r| r.is_pending()).zip(&out) {
            r.result = Some(self.finish_batched(r, res));
        }
    }

    fn copy_range_from(
        &self,
        offset: u64,
        len: u64,
        to: &mut dyn FnMut(&CopyExtent) -> Result<()>,
    ) -> Result<u64> {
        // Through the page cache only: O_DIRECT files keep their bounce-buffer paths.
        if self.align != 1 {
            return Ok(0);
        }
        to(&CopyExtent {
            fd: self.file.as_raw_fd(),
            offset,
            len,
        })?;
        Ok(len)
    }

    fn can_copy_range_to(&self) -> bool {
        self.align == 1
    }

    fn copy_range_to(&self, offset: u64, src: &CopyExtent) -> Result<()> {
        if self.align != 1 {
            return Err(BlockError::errno(libc::ENOTSUP));
        }
        crate::copy_range::copy_file_range_full(src, self.file.as_raw_fd(), offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let size = self.length()?;
        let aligned =
            self.align == 1 || (offset % self.align as u64 == 0 && len % self.align as u64 == 0);
        if aligned && !self.block_device {
            if flags.may_unmap
                && offset + len <= size
                && self
                    .fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                    .is_ok()
            {
                *mlock(&self.extent) = (0, 0);
                return if flags.fua { self.fdatasync() } else { Ok(()) };
            }
            if self
                .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .is_ok()
            {
                *mlock(&self.extent) = (0, 0);
                return if flags.fua { self.fdatasync() } else { Ok(()) };
            }
        }
        let chunk = AlignedBuf::new(len.min(1 << 20) as usize, self.align.max(512));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write(
                offset + done,
                &[IoSlice::new(&chunk[..n])],
                WriteFlags { fua: false },
            )?;
            done += n as u64;
        }
        if flags.fua {
            self.fdatasync()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.block_device {
            return Ok(());
        }
        if let Err(e) = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            log::debug!(
                "{}: discard not supported: {}",
                self.filename,
                crate::error::strerror(e)
            );
        }
        *mlock(&self.extent) = (0, 0);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.fdatasync()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        let data = |l: u64| DriverStatus {
            len: l,
            kind: StatusKind::Data {
                offset: Some(offset),
            },
        };
        {
            let (s, e) = *mlock(&self.extent);
            if offset >= s && offset < e {
                return Ok(data(len.min(e - offset)));
            }
        }
        match self.lseek(offset, libc::SEEK_DATA) {
            Err(libc::ENXIO) => Ok(DriverStatus {
                len,
                kind: StatusKind::Zero {
                    offset: Some(offset),
                },
            }),
            Err(_) => Ok(data(len)),
            Ok(d) if d > offset => Ok(DriverStatus {
                len: (d - offset).min(len),
                kind: StatusKind::Zero {
                    offset: Some(offset),
                },
            }),
            Ok(_) => match self.lseek(offset, libc::SEEK_HOLE) {
                Ok(h) if h > offset => {
                    *mlock(&self.extent) = (offset, h);
                    Ok(data((h - offset).min(len)))
                }
                _ => Ok(data(len)),
            },
        }
    }

    fn truncate(&self, len: u64) -> Result<()> {
        if self.block_device {
            let cur = self.length()?;
            if len > cur {
                return Err(BlockError::generic("Cannot grow device files"));
            }
            return Ok(());
        }
        let before = self.file.metadata().map_err(BlockError::from)?.len();
        self.file
            .set_len(len)
            .map_err(|e| BlockError::from(e).prepend("Failed to resize the file"))?;
        if before == 0 && len > 0 {
            self.allocate_first_block(len);
        }
        *mlock(&self.extent) = (0, 0);
        Ok(())
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    fn check_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        if !self.locking {
            return Ok(());
        }
        let fail = |e: i32, what: String| {
            if e == 0 {
                BlockError::generic(what)
            } else {
                BlockError::generic(format!("{what}: {}", crate::error::strerror(e)))
            }
        };
        for i in 0..LOCK_BITS {
            let p = Perm::from_bits(1 << i);
            if perm.contains(p) {
                match self.ofd(
                    libc::F_OFD_GETLK,
                    libc::F_WRLCK as libc::c_short,
                    LOCK_SHARED_BASE + i as i64,
                ) {
                    Ok(false) => {}
                    Ok(true) => {
                        return Err(fail(0, format!("Failed to get \"{}\" lock", p.names())))
                    }
                    Err(e) => return Err(fail(e, format!("Failed to get \"{}\" lock", p.names()))),
                }
            }
        }
        for i in 0..LOCK_BITS {
            let p = Perm::from_bits(1 << i);
            if !shared.contains(p) {
                match self.ofd(
                    libc::F_OFD_GETLK,
                    libc::F_WRLCK as libc::c_short,
                    LOCK_PERM_BASE + i as i64,
                ) {
                    Ok(false) => {}
                    Ok(true) => {
                        return Err(fail(
                            0,
                            format!("Failed to get shared \"{}\" lock", p.names()),
                        ))
                    }
                    Err(e) => {
                        return Err(fail(
                            e,
                            format!("Failed to get shared \"{}\" lock", p.names()),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        // Closed nodes use nothing: let other processes in.
        self.set_perm(Perm::NONE, Perm::ALL);
        Ok(())
    }

    fn reopen_read_write(&self) -> Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL on our own descriptor.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            return Err(BlockError::errno(errno()));
        }
        if fl & libc::O_ACCMODE == libc::O_RDWR {
            return Ok(());
        }
        let new = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | (fl & libc::O_DIRECT))
            .open(&self.filename)
            .map_err(|e| {
                BlockError::from(e).prepend(&format!("Could not reopen '{}'", self.filename))
            })?;
        // The new open file replaces the old one under the same descriptor number, so every
        // user of `self.file` sees it. The old one's locks are released explicitly first:
        // closing our descriptor does not drop them while a child process forked meanwhile
        // (by any thread) still holds a copy of it, and they would then refuse our own new
        // open file its locks.
        let held = *mlock(&self.locked);
        let (perm, shared) = (Perm::from_bits(held.0), !Perm::from_bits(held.1));
        self.set_perm(Perm::NONE, Perm::ALL);
        // SAFETY: dup3 from a descriptor we own onto our own descriptor (no request runs:
        // the node is drained).
        let r = unsafe { libc::dup3(new.as_raw_fd(), fd, libc::O_CLOEXEC) };
        let err = (r < 0).then(errno);
        // Taken again, on the new open file (or on the old one if it stayed).
        self.set_perm(perm, shared);
        match err {
            Some(e) => Err(BlockError::errno(e)),
            None => Ok(()),
        }
    }

    fn set_perm(&self, perm: Perm, shared: Perm) {
        if !self.locking {
            return;
        }
        let want = (perm.bits() & 0xf, !shared.bits() & 0xf);
        let mut guard = mlock(&self.locked);
        let locked = &mut *guard;
        for (base, have, need) in [
            (LOCK_PERM_BASE, &mut locked.0, want.0),
            (LOCK_SHARED_BASE, &mut locked.1, want.1),
        ] {
            for i in 0..LOCK_BITS {
                let bit = 1u32 << i;
                let ty = match (need & bit != 0, *have & bit != 0) {
                    (true, false) => libc::F_RDLCK,
                    (false, true) => libc::F_UNLCK,
                    _ => continue,
                };
                match self.ofd(libc::F_OFD_SETLK, ty as libc::c_short, base + i as i64) {
                    Ok(_) => *have ^= bit,
                    Err(e) => log::warn!(
                        "{}: locking byte {} failed: {}",
                        self.filename,
                        base + i as i64,
                        crate::error::strerror(e)
                    ),
                }
            }
        }
    }

    fn image_info(&self) -> crate::driver::DriverImageInfo {
        crate::driver::DriverImageInfo {
            dirty_flag: Some(false),
            ..Default::default()
        }
    }

    fn allocated_size(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}

impl Drop for FileDriver {
    fn drop(&mut self) {
        // Released explicitly, not by closing: a child process forked meanwhile may still
        // hold a copy of the descriptor, and with it the locks.
        self.set_perm(Perm::NONE, Perm::ALL);
    }
}

#[cfg(test)]
mod tests;
