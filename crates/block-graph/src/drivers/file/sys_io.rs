//! The `file` driver's system calls: positioned reads and writes that finish short
//! transfers and retry `EINTR`, `RWF_DSYNC` writes with their `fdatasync` fallback,
//! `fallocate` and `lseek`. Every `unsafe` block of the driver's data path is here.

use std::io::{IoSlice, IoSliceMut};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;

use qcow2::AlignedBuf;

use super::{errno, FileDriver};
use crate::error::{BlockError, Result};
use crate::iov::{iov_len, iov_len_mut};

impl FileDriver {
    pub(super) fn preadv_once(&self, offset: u64, iov: &[IoSliceMut<'_>]) -> isize {
        if let [one] = iov {
            // One buffer (most requests): pread, which spares the kernel copying and
            // checking an iovec array (measurable on a 4 KiB page-cache read).
            // SAFETY: the buffer is writable memory we borrow for the duration of the call.
            return unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    one.as_ptr() as *mut libc::c_void,
                    one.len(),
                    offset as libc::off_t,
                )
            };
        }
        // SAFETY: IoSliceMut is ABI-compatible with struct iovec; the slices borrow
        // writable memory we own for the duration of the call.
        unsafe {
            libc::preadv(
                self.file.as_raw_fd(),
                iov.as_ptr() as *const libc::iovec,
                iov.len().min(1024) as i32,
                offset as libc::off_t,
            )
        }
    }

    pub(super) fn preadv_full(&self, mut offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let total = iov_len_mut(iov);
        let mut done = 0usize;
        while done < total {
            // The whole vector in one call (the common case), the rest after a short read.
            let r = if done == 0 {
                self.preadv_once(offset, iov)
            } else {
                let sub = crate::iov::slice_iov_mut(iov, done, total - done);
                self.preadv_once(offset, &sub)
            };
            if r < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                return Err(BlockError::errno(e));
            }
            if r == 0 {
                // End of file: the rest reads as zero.
                let mut rest = crate::iov::slice_iov_mut(iov, done, total - done);
                crate::iov::zero_iov(&mut rest);
                return Ok(());
            }
            done += r as usize;
            offset += r as u64;
        }
        Ok(())
    }

    pub(super) fn pwritev_once(&self, offset: u64, iov: &[IoSlice<'_>], dsync: bool) -> isize {
        let cnt = iov.len().min(1024) as i32;
        // SAFETY: IoSlice is ABI-compatible with struct iovec; the slices borrow memory
        // that stays valid for the call.
        unsafe {
            if dsync {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    iov.as_ptr() as *const libc::iovec,
                    cnt,
                    offset as libc::off_t,
                    libc::RWF_DSYNC,
                )
            } else if let [one] = iov {
                // One buffer: pwrite, as for reads (see `preadv_once`).
                libc::pwrite(
                    self.file.as_raw_fd(),
                    one.as_ptr() as *const libc::c_void,
                    one.len(),
                    offset as libc::off_t,
                )
            } else {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    iov.as_ptr() as *const libc::iovec,
                    cnt,
                    offset as libc::off_t,
                )
            }
        }
    }

    pub(super) fn pwritev_full(
        &self,
        mut offset: u64,
        iov: &[IoSlice<'_>],
        fua: bool,
    ) -> Result<()> {
        let total = iov_len(iov);
        let mut done = 0usize;
        let mut dsync = fua && self.dsync_ok.load(Ordering::Relaxed);
        while done < total {
            let r = if done == 0 {
                self.pwritev_once(offset, iov, dsync)
            } else {
                let sub = crate::iov::slice_iov(iov, done, total - done);
                self.pwritev_once(offset, &sub, dsync)
            };
            if r < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                if dsync && (e == libc::EOPNOTSUPP || e == libc::ENOSYS || e == libc::EINVAL) {
                    self.dsync_ok.store(false, Ordering::Relaxed);
                    dsync = false;
                    continue;
                }
                return Err(BlockError::errno(e));
            }
            if r == 0 {
                return Err(BlockError::errno(libc::EIO));
            }
            done += r as usize;
            offset += r as u64;
        }
        if fua && !dsync {
            self.fdatasync()?;
        }
        Ok(())
    }

    pub(super) fn fdatasync(&self) -> Result<()> {
        loop {
            // SAFETY: fdatasync on our own descriptor.
            if unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0 {
                return Ok(());
            }
            let e = errno();
            if e != libc::EINTR {
                return Err(BlockError::errno(e));
            }
        }
    }

    /// Writes zeros over the first block of a file that was just grown from empty (QEMU's
    /// `allocate_first_block`: later alignment probing then reads allocated data, and
    /// `map` shows the block as data, as for files qemu-img creates). Failures are
    /// ignored, as in QEMU. The write stays inside the new length.
    pub(super) fn allocate_first_block(&self, new_len: u64) {
        const MAX_BLOCKSIZE: u64 = 4096;
        let size = if new_len < MAX_BLOCKSIZE {
            512
        } else {
            MAX_BLOCKSIZE
        };
        let size = size.min(new_len) as usize;
        let buf = AlignedBuf::new(size, MAX_BLOCKSIZE as usize);
        if let Err(e) = self.pwritev_full(0, &[IoSlice::new(&buf)], false) {
            log::debug!("{}: allocating the first block failed: {e}", self.filename);
        }
    }

    pub(super) fn bounce_range(&self, offset: u64, len: usize) -> (u64, usize) {
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    pub(super) fn fallocate(
        &self,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), i32> {
        // SAFETY: fallocate on our own descriptor with integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    }

    pub(super) fn lseek(&self, offset: u64, whence: i32) -> std::result::Result<u64, i32> {
        // SAFETY: lseek on our own descriptor; no memory is involved.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r as u64)
        }
    }
}
