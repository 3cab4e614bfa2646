//! The `copy-before-write` filter (QEMU's name and options): sits above a source node
//! (`file`) and, before any write reaches a range of it that was not copied yet, copies the
//! old data of that range to `target`. Backup jobs insert it above their source so that the
//! target receives the point-in-time view whatever the guest writes meanwhile; the job copies
//! everything else through the same [`BlockCopy`] state in the background.
//!
//! # How writes and the background copy are ordered
//!
//! [`BlockCopy`] keeps one bit per cluster that still has to be copied and the list of ranges
//! being copied right now. A guest write first makes sure that every cluster it touches is
//! copied: a clean cluster passes at once (bits are never set again once cleared, so this
//! check needs no lock), a dirty one is claimed and copied by the writer itself, and one that
//! another request is copying makes the writer wait for that copy. Only then does the write
//! go down to `file`. The background copy claims clusters the same way and skips the ones
//! a writer is copying. So no write can overtake the copy of the data it overwrites, and each
//! cluster is copied once.
//!
//! A copy goes by the kernel where it can ([`crate::copy_range`]), unless the target is
//! written compressed; the rest is read into a buffer and written (zeros as write-zeroes).
//!
//! # Errors
//!
//! When copying fails, the policy decides (QEMU's `on-cbw-error`): with
//! [`OnCbwError::BreakGuestWrite`] (the default) the guest write fails and the cluster stays
//! to be copied; with [`OnCbwError::BreakSnapshot`] the write goes through, the filter stops
//! copying and the point-in-time view is marked broken (the job then fails).

use std::any::Any;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use qapi_types::{BlockdevOptionsCbw, QapiType};

use super::OpenCtx;
use crate::bitmap::DirtyBitmap;
use crate::driver::{BlockDriver, DriverStatus, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::iov::{iov_len, is_zero};
use crate::node::{mlock, Edge, Node};
use crate::options::Inherit;
use crate::perm::{default_child_perm, ChildRole, Perm};

/// The smallest unit the filter copies (QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`).
pub const MIN_CLUSTER: u64 = 64 * 1024;
/// The largest run one copy request moves.
pub const MAX_CHUNK: u64 = 1 << 20;

/// What the filter does when copying old data fails (QEMU's `OnCbwError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCbwError {
    /// Fail the guest write; the data stays to be copied.
    #[default]
    BreakGuestWrite,
    /// Let the guest write through and give up the point-in-time view.
    BreakSnapshot,
}

/// The copy state shared by the filter and a backup job: which clusters of the source still
/// hold data the target lacks, and who is copying what. See the [module
/// documentation](self).
pub struct BlockCopy {
    source: Arc<Edge>,
    target: Arc<Edge>,
    cluster: u64,
    len: u64,
    todo: DirtyBitmap,
    claimed: Mutex<Vec<(u64, u64)>>,
    cv: Condvar,
    on_error: Mutex<OnCbwError>,
    broken: AtomicBool,
    compress: AtomicBool,
    copied: AtomicU64,
    writes_waited: AtomicU64,
}

impl std::fmt::Debug for BlockCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCopy")
            .field("cluster", &self.cluster)
            .field("len", &self.len)
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

impl BlockCopy {
    /// A copy state from `source` to `target` with every cluster still to copy, or only the
    /// dirty ones of `init` when given (QEMU's `bitmap` option: the bitmap is read once).
    pub fn new(
        source: Arc<Edge>,
        target: Arc<Edge>,
        init: Option<&DirtyBitmap>,
    ) -> Result<Arc<Self>> {
        let len = source.length();
        let tlen = target.length();
        if tlen < len {
            return Err(BlockError::generic(format!(
                "Source and target image have different sizes ({len} and {tlen} bytes)"
            )));
        }
        let tcluster = target
            .with_node(|n| n.driver().image_info().cluster_size)
            .unwrap_or(0);
        let cluster = MIN_CLUSTER.max(tcluster.next_power_of_two());
        let todo = DirtyBitmap::new("", cluster, len)?;
        match init {
            None => todo.set_range(0, len),
            Some(b) => {
                if b.size() != len {
                    return Err(BlockError::generic(format!(
                        "Bitmap '{}' has size {} but the source has {len} bytes",
                        b.name(),
                        b.size()
                    )));
                }
                let mut pos = 0;
                while let Some(d) = b.next_dirty(pos) {
                    todo.set_range(d, b.granularity());
                    pos = d + b.granularity();
                }
            }
        }
        Ok(Arc::new(BlockCopy {
            source,
            target,
            cluster,
            len,
            todo,
            claimed: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            on_error: Mutex::new(OnCbwError::default()),
            broken: AtomicBool::new(false),
            compress: AtomicBool::new(false),
            copied: AtomicU64::new(0),
            writes_waited: AtomicU64::new(0),
        }))
    }

    /// Bytes per tracked cluster.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Length of the source.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the source is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that still have to be copied.
    pub fn remaining(&self) -> u64 {
        self.todo.count().min(self.len)
    }

    /// Bytes copied so far (by the filter and the background copy together).
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// How many times a guest write had to wait for a copy another request was doing.
    pub fn writes_waited(&self) -> u64 {
        self.writes_waited.load(Ordering::Relaxed)
    }

    /// The first cluster at or after `offset` that still has to be copied.
    pub fn next_dirty(&self, offset: u64) -> Option<u64> {
        self.todo.next_dirty(offset).filter(|&d| d < self.len)
    }

    /// Whether the cluster holding `offset` still has to be copied.
    pub fn is_dirty(&self, offset: u64) -> bool {
        self.todo.get(offset)
    }

    /// The error policy.
    pub fn on_error(&self) -> OnCbwError {
        *mlock(&self.on_error)
    }

    /// Sets the error policy.
    pub fn set_on_error(&self, p: OnCbwError) {
        *mlock(&self.on_error) = p;
    }

    /// Whether a failed copy under [`OnCbwError::BreakSnapshot`] gave up the view.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Writes full clusters to the target compressed (backup's `compress`; the target's
    /// driver must support it).
    pub fn set_compress(&self, on: bool) {
        self.compress.store(on, Ordering::Relaxed);
    }

    /// Marks `[offset, offset + len)` as not needing a copy (whole clusters only, and only
    /// those nobody is copying): backup `sync=top` drops what the top layer does not
    /// allocate.
    pub fn skip(&self, offset: u64, len: u64) {
        let g = mlock(&self.claimed);
        let start = offset / self.cluster * self.cluster;
        let end = offset.saturating_add(len).min(self.len);
        let mut c = start;
        while c < end {
            if !overlaps(&g, c, c + self.cluster) {
                self.todo.reset_range(c, self.cluster.min(self.len - c));
            }
            c += self.cluster;
        }
    }

    /// Copies what still needs copying in `[offset, offset + len)`. With `wait`, returns
    /// only when the whole range is copied (waiting for copies other requests are doing);
    /// without, skips ranges others are copying. Returns the bytes this call copied.
    pub fn copy(&self, offset: u64, len: u64, wait: bool) -> Result<u64> {
        self.copy_ex(offset, len, wait).map_err(|(_, e)| e)
    }

    /// [`BlockCopy::copy`], telling a failed read of the source (`true`) from a failed
    /// write of the target (`false`), for the jobs' `on-source-error`/`on-target-error`.
    pub fn copy_ex(
        &self,
        offset: u64,
        len: u64,
        wait: bool,
    ) -> std::result::Result<u64, (bool, BlockError)> {
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = offset / self.cluster * self.cluster;
        let mut done = 0u64;
        let mut waited = false;
        while pos < end {
            let mut g = mlock(&self.claimed);
            let Some(d) = self.todo.next_dirty(pos).filter(|&d| d < end) else {
                break;
            };
            if overlaps(&g, d, d + self.cluster) {
                if wait {
                    if !waited {
                        self.writes_waited.fetch_add(1, Ordering::Relaxed);
                        waited = true;
                    }
                    drop(self.cv.wait(g).unwrap_or_else(|e| e.into_inner()));
                    pos = d;
                } else {
                    pos = d + self.cluster;
                }
                continue;
            }
            let mut run_end = d + self.cluster;
            while run_end < end
                && run_end - d < MAX_CHUNK
                && self.todo.get(run_end)
                && !overlaps(&g, run_end, run_end + self.cluster)
            {
                run_end += self.cluster;
            }
            let run_end = run_end.min(self.len);
            g.push((d, run_end));
            drop(g);
            let r = self.copy_run(d, run_end - d);
            let mut g = mlock(&self.claimed);
            if let Some(i) = g.iter().position(|x| *x == (d, run_end)) {
                g.swap_remove(i);
            }
            if r.is_ok() {
                self.todo.reset_range(d, run_end - d);
            }
            drop(g);
            self.cv.notify_all();
            r?;
            done += run_end - d;
            pos = run_end;
        }
        Ok(done)
    }

    /// Waits until no copy is in flight.
    pub fn wait_idle(&self) {
        let mut g = mlock(&self.claimed);
        while !g.is_empty() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn copy_run(&self, offset: u64, len: u64) -> std::result::Result<(), (bool, BlockError)> {
        // The kernel copies what it can (copy offload), the rest is read and written.
        let off = if self.compress.load(Ordering::Relaxed) {
            0
        } else {
            crate::copy_range::copy_range(&self.source, &self.target, offset, len)
                .map_err(|e| (e.is_read, e.error))?
        };
        if off < len {
            self.copy_buffered(offset + off, len - off)?;
        }
        self.copied.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Copies by reading into a buffer and writing it (zeros as write-zeroes).
    fn copy_buffered(&self, offset: u64, len: u64) -> std::result::Result<(), (bool, BlockError)> {
        thread_local! {
            // A buffer per thread, reused: no allocation (and page faults) per copy.
            static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        // Taken out while in use, so a nested copy on this thread gets a fresh one.
        let mut buf = SCRATCH.with(|c| c.take());
        buf.resize(len as usize, 0);
        let r = self
            .source
            .read_buf(offset, &mut buf)
            .map_err(|e| (true, e))
            .and_then(|()| self.write_target(offset, &buf).map_err(|e| (false, e)));
        if buf.capacity() <= 4 * MAX_CHUNK as usize {
            SCRATCH.with(|c| c.set(buf));
        }
        r
    }

    fn write_target(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        let iov = [IoSlice::new(buf)];
        if is_zero(&iov) {
            self.target.write_zeroes(
                offset,
                len,
                ZeroFlags {
                    may_unmap: true,
                    fua: false,
                },
            )?;
        } else if self.compress.load(Ordering::Relaxed) {
            self.write_compressed(offset, buf)?;
        } else {
            self.target.write(offset, &iov, WriteFlags::default())?;
        }
        Ok(())
    }

    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let tc = self
            .target
            .with_node(|n| n.driver().image_info().cluster_size)
            .unwrap_or(0);
        if tc == 0 || offset % tc != 0 {
            return self
                .target
                .write(offset, &[IoSlice::new(buf)], WriteFlags::default());
        }
        for (i, chunk) in buf.chunks(tc as usize).enumerate() {
            let o = offset + i as u64 * tc;
            if chunk.len() as u64 == tc {
                // The target edge holds the write permission; the driver compresses.
                self.target
                    .with_node(|n| n.driver().write_compressed(o, chunk))?;
            } else {
                self.target
                    .write(o, &[IoSlice::new(chunk)], WriteFlags::default())?;
            }
        }
        Ok(())
    }

    /// What the filter runs before a write to `[offset, offset + len)` goes down.
    fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.is_broken() || offset >= self.len || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.len);
        // Fast path: bits are only ever cleared, so a clean range stays clean.
        if self
            .next_dirty(offset / self.cluster * self.cluster)
            .is_none_or(|d| d >= end)
        {
            return Ok(());
        }
        match self.copy(offset, end - offset, true) {
            Ok(_) => Ok(()),
            Err(e) => match self.on_error() {
                OnCbwError::BreakGuestWrite => Err(e),
                OnCbwError::BreakSnapshot => {
                    log::error!("copy-before-write failed, snapshot broken: {e}");
                    self.broken.store(true, Ordering::Release);
                    Ok(())
                }
            },
        }
    }
}

fn overlaps(claimed: &[(u64, u64)], start: u64, end: u64) -> bool {
    claimed.iter().any(|&(s, e)| s < end && start < e)
}

/// The filter driver.
pub struct CopyBeforeWrite {
    file: Arc<Edge>,
    state: Arc<BlockCopy>,
}

impl CopyBeforeWrite {
    /// The shared copy state (for the backup job).
    pub fn state(&self) -> &Arc<BlockCopy> {
        &self.state
    }

    /// The copy state of `node` if it is a copy-before-write filter.
    pub fn of(node: &Node) -> Option<Arc<BlockCopy>> {
        node.driver()
            .as_any()?
            .downcast_ref::<CopyBeforeWrite>()
            .map(|d| d.state.clone())
    }
}

/// Opens a `copy-before-write` node.
pub(crate) fn open(ctx: &mut OpenCtx<'_>, o: &BlockdevOptionsCbw) -> Result<Box<dyn BlockDriver>> {
    let bitmap = option_bitmap(ctx.graph, o)?;
    let file = ctx.open_child("file", &o.file, ChildRole::Filtered)?;
    let target = ctx.open_child("target", &o.target, ChildRole::Data)?;
    let state = BlockCopy::new(file.clone(), target, bitmap.as_deref())?;
    Ok(Box::new(CopyBeforeWrite { file, state }))
}

impl BlockDriver for CopyBeforeWrite {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn length(&self) -> Result<u64> {
        Ok(self.file.length())
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.file.read(offset, iov)
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        self.state.before_write(offset, iov_len(iov) as u64)?;
        self.file.write(offset, iov, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.state.before_write(offset, len)?;
        self.file.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.state.before_write(offset, len)?;
        self.file.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::delegate(&self.file, offset, len))
    }

    fn child_perm(
        &self,
        role: ChildRole,
        perm: Perm,
        shared: Perm,
        writable: bool,
    ) -> (Perm, Perm) {
        if role != ChildRole::Filtered {
            // The target: written by the filter; others may write it too (the guest's
            // disk may be in its backing chain), but nobody may resize it.
            return (Perm::WRITE, Perm::ALL & !Perm::RESIZE);
        }
        let (mut p, s) = default_child_perm(role, perm, shared, writable);
        if p.contains(Perm::WRITE) {
            // Old data is read before it is overwritten.
            p |= Perm::CONSISTENT_READ;
        }
        if perm.is_empty() {
            // No parent uses the filter yet (QEMU checks for parents): nothing to protect.
            return (p, s);
        }
        // Writes that bypass the filter would bypass the copy.
        (p, s & !(Perm::WRITE | Perm::RESIZE))
    }

    fn image_info(&self) -> crate::driver::DriverImageInfo {
        // A filter: QEMU's bdrv_get_info asks the filtered child. (No snapshot_goto: the
        // target is a second data child, so QEMU has no child to fall back to.)
        super::info_of_child(&self.file)
    }

    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

/// Resolves the `bitmap` option of a copy-before-write node.
pub(crate) fn option_bitmap(
    g: &BlockGraph,
    o: &BlockdevOptionsCbw,
) -> Result<Option<Arc<DirtyBitmap>>> {
    let Some(b) = &o.bitmap else {
        return Ok(None);
    };
    let node = g.lookup_either(&b.node)?;
    node.bitmap(&b.name).map(Some).ok_or_else(|| {
        BlockError::not_found(format!(
            "Dirty bitmap '{}' not found on node '{}'",
            b.name, b.node
        ))
    })
}

impl BlockGraph {
    /// Inserts a copy-before-write filter above `source` (every parent of `source` then
    /// uses the filter), copying to `target`; with `bitmap`, only its dirty clusters are
    /// copied. Returns the filter node (implicit, hidden from `query-block`) and its copy
    /// state. Undo with [`BlockGraph::cbw_drop`].
    pub fn cbw_append(
        &mut self,
        source: &Arc<Node>,
        target: &Arc<Node>,
        bitmap: Option<&DirtyBitmap>,
    ) -> Result<(Arc<Node>, Arc<BlockCopy>)> {
        let mut v = serde_json::json!({
            "driver": "copy-before-write",
            "file": source.name(),
            "target": target.name(),
        });
        if let Some(b) = bitmap {
            v["bitmap"] = serde_json::json!({"node": source.name(), "name": b.name()});
        }
        // Without a node-name the node gets a generated one, as QEMU's implicit filters.
        let opts = qapi_types::BlockdevOptions::from_qmp_strict(v)
            .map_err(|e| BlockError::generic(e.to_string()))?;
        let filter = self.open_node(&opts, &Inherit::top(), true)?;
        if let Err(e) = self.replace_node(source, &filter) {
            drop(filter);
            self.prune();
            let _ = self.refresh_perms();
            return Err(e);
        }
        let state = CopyBeforeWrite::of(&filter)
            .ok_or_else(|| BlockError::generic("copy-before-write filter without state"))?;
        Ok((filter, state))
    }

    /// Removes a filter inserted with [`BlockGraph::cbw_append`]: its parents use the
    /// source again.
    pub fn cbw_drop(&mut self, filter: &Arc<Node>) -> Result<()> {
        let file = filter
            .child("file")
            .ok_or_else(|| BlockError::generic("copy-before-write filter without file"))?
            .node();
        self.replace_node(filter, &file)?;
        self.prune();
        let _ = self.refresh_perms();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
