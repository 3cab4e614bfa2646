//! Flush and close: cached metadata written in a crash-consistent order (refcounts, L2
//! tables, then the deferred refcount decrements), and the final flush on drop.

use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::events::FreeReason;
use crate::image::{lock, Qcow2};

impl Qcow2 {
    /// Writes all cached metadata in a crash-consistent order and flushes the storage:
    /// refcounts, then L2 tables, then the deferred refcount decrements.
    pub fn flush(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        let r = self.flush_inner();
        self.c(r)
    }

    fn flush_inner(&self) -> Result<()> {
        if self.external_data {
            self.data.flush()?;
        }
        let mut t = lock(&self.tables);
        {
            let mut dep = self.l2_write_dependency();
            if t.l2.has_dirty() {
                dep()?;
            }
            t.l2.flush()?;
        }
        let ready: Vec<(Vec<u64>, FreeReason)> = {
            let mut p = lock(&self.pending_tags);
            let mut ready = Vec::new();
            p.retain_mut(|(tag, cl, reason)| {
                if self.gate.retired(*tag) {
                    self.pending_count.fetch_sub(cl.len(), Ordering::Relaxed);
                    ready.push((std::mem::take(cl), *reason));
                    false
                } else {
                    true
                }
            });
            ready
        };
        let mut r = lock(&self.refs);
        if !ready.is_empty() {
            // The tables that stopped referencing these clusters are written; make that
            // durable before the decrements can reach the disk.
            self.file.flush()?;
            for (cl, reason) in ready {
                for c in cl {
                    r.free(c, reason)?;
                }
            }
            r.reset_compressed_pos();
        }
        r.flush_blocks()?;
        r.unsynced = false;
        drop(r);
        drop(t);
        self.file.flush()?;
        Ok(())
    }

    /// Flushes and, for lazy refcounts, clears the dirty bit. Called on drop as well.
    pub fn close(&self) -> Result<()> {
        if !self.is_writable() || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if self.is_corrupt() {
            return Ok(());
        }
        self.flush()?;
        // Apply frees that could not retire before (no I/O is in flight any more).
        self.flush()?;
        if self.dirty_marked.load(Ordering::Acquire) {
            self.clear_dirty()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("qcow2: closing the image failed: {e}");
        }
    }
}
