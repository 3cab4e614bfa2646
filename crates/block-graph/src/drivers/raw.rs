//! The `raw` format driver: the guest sees the child's bytes, optionally a window of them
//! (`offset`, `size`). Without a window it behaves as a filter.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qapi_types::BlkdebugEvent;

use crate::driver::{BlockDriver, DriverStatus, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use crate::iov::iov_len;
use crate::node::Edge;
use crate::perm::{default_child_perm, ChildRole, Perm};

/// The raw driver's state.
pub struct RawDriver {
    file: Arc<Edge>,
    offset: u64,
    size: Option<AtomicU64>,
}

impl RawDriver {
    /// Opens a raw view of `file`: from `offset`, `size` bytes (default: to the end).
    pub fn new(file: Arc<Edge>, offset: u64, size: Option<u64>) -> Result<Self> {
        let real = file.length();
        if offset > real {
            return Err(BlockError::generic(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )));
        }
        if let Some(s) = size {
            if real - offset < s {
                return Err(BlockError::generic(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to \
                     the  actual size of the containing file ({real})"
                )));
            }
            if s % 512 != 0 {
                return Err(BlockError::generic("Specified size is not multiple of 512"));
            }
        }
        Ok(RawDriver {
            file,
            offset,
            size: size.map(AtomicU64::new),
        })
    }

    /// The child role raw takes on its file for these options.
    pub fn file_role(offset: u64, size: Option<u64>) -> ChildRole {
        if offset != 0 || size.is_some() {
            ChildRole::Data
        } else {
            ChildRole::Filtered
        }
    }

    fn window(&self, offset: u64, len: u64) -> Result<u64> {
        if let Some(s) = &self.size {
            let s = s.load(Ordering::Acquire);
            if offset > s || len > s - offset {
                return Err(BlockError::errno(libc::ENOSPC));
            }
        }
        Ok(self.offset + offset)
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> Result<u64> {
        Ok(match &self.size {
            Some(s) => s.load(Ordering::Acquire),
            None => self.file.length().saturating_sub(self.offset),
        })
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = crate::iov::iov_len_mut(iov) as u64;
        let o = self.window(offset, len)?;
        self.file.debug_event(BlkdebugEvent::ReadAio);
        self.file.read(o, iov)
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        let o = self.window(offset, iov_len(iov) as u64)?;
        self.file.debug_event(BlkdebugEvent::WriteAio);
        self.file.write(o, iov, flags)
    }

    fn submit_batch(&self, reqs: &mut [crate::batch::BatchReq<'_>]) {
        if self.offset == 0 && self.size.is_none() {
            // A filter: the same requests, one layer down.
            return self.file.submit_batch(reqs);
        }
        let mut idx = Vec::with_capacity(reqs.len());
        let mut down = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter_mut().enumerate().filter(|(_, r)| r.is_pending()) {
            match self.window(r.offset, r.len() as u64) {
                Ok(o) => {
                    idx.push(i);
                    down.push(r.forward(o));
                }
                Err(e) => r.result = Some(Err(e)),
            }
        }
        self.file.submit_batch(&mut down);
        let results: Vec<_> = down.into_iter().map(|d| d.result).collect();
        crate::batch::forward_results(reqs, &idx, results);
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let o = self.window(offset, len)?;
        self.file.write_zeroes(o, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let o = self.window(offset, len)?;
        self.file.discard(o, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::delegate(
            &self.file,
            self.offset + offset,
            len,
        ))
    }

    fn truncate(&self, len: u64) -> Result<()> {
        if self.size.is_some() {
            return Err(BlockError::io(
                libc::ENOTSUP,
                "Cannot resize fixed-size raw disks",
            ));
        }
        self.file.truncate(self.offset + len)
    }

    fn strong_options(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut v = Vec::new();
        if self.offset != 0 {
            v.push(("offset", serde_json::json!(self.offset)));
        }
        if let Some(s) = &self.size {
            v.push(("size", serde_json::json!(s.load(Ordering::Acquire))));
        }
        v
    }

    fn image_info(&self) -> crate::driver::DriverImageInfo {
        // QEMU's raw_co_get_info asks the file.
        super::info_of_child(&self.file)
    }

    fn snapshot_goto(&self, id_or_name: &str) -> Result<()> {
        // QEMU's bdrv_snapshot_goto falls back to the primary child, with or without a
        // window.
        super::snapshot_goto(&self.file.node(), id_or_name)
    }

    fn child_perm(
        &self,
        role: ChildRole,
        perm: Perm,
        shared: Perm,
        writable: bool,
    ) -> (Perm, Perm) {
        let (p, s) = default_child_perm(role, perm, shared, writable);
        // Write and resize are only needed when a parent needs them.
        let keep = perm | Perm::CONSISTENT_READ;
        (p & keep, s)
    }
}
