//! Nodes (QEMU's BlockDriverState) and edges (BdrvChild): the generic request layer every
//! driver sits behind, and the links of the graph.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};

use qapi_types::event::{BlockWriteThreshold, BlockWriteThresholdData};
use qapi_types::BlkdebugEvent;

use crate::batch::{BatchBuf, BatchReq};
use crate::bitmap::DirtyBitmap;
use crate::driver::{BlockDriver, WriteFlags, ZeroFlags};
pub use crate::edge::{ChildSlot, DrainParticipant, Edge, Parent, RootInfo};
pub use crate::options::{Aio, DetectZeroes, NodeOptions};
pub use status::RangeStatus;

mod status;
use crate::error::{BlockError, Result};
use crate::events::EventQueue;
use crate::iov::{iov_len, iov_len_mut, is_zero, slice_iov_mut, zero_iov};
use crate::perm::{ChildRole, Perm};

/// Largest offset + length of a request (QEMU's `BDRV_MAX_LENGTH`, about 2^63 rounded down).
pub const MAX_REQUEST_END: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

pub(crate) fn rlock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn wlock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn mlock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// A node of the graph: a driver instance with its children, parents, options, dirty
/// bitmaps and write threshold. Requests go through [`Edge`]s; the node's methods are the
/// generic layer in front of the driver.
pub struct Node {
    name: String,
    driver: Box<dyn BlockDriver>,
    opts: NodeOptions,
    implicit: bool,
    len: AtomicU64,
    pub(crate) children: RwLock<Vec<Arc<Edge>>>,
    pub(crate) parents: Mutex<Vec<Weak<Edge>>>,
    pub(crate) backing: Arc<ChildSlot>,
    pub(crate) cumulative: Mutex<(Perm, Perm)>,
    wr_highest_offset: AtomicU64,
    write_threshold: AtomicU64,
    bitmaps: RwLock<Vec<Arc<DirtyBitmap>>>,
    events: Arc<EventQueue>,
    closed: AtomicBool,
    /// What a write must go through besides the driver ([`HOOK_READ_ONLY`] ...), in one
    /// word so that the usual write, with none of them, costs one load.
    hooks: AtomicU8,
}

/// [`Node`]'s hooks: the node is read-only (writes fail with `EACCES`).
const HOOK_READ_ONLY: u8 = 1;
/// A write threshold may be set (the threshold itself says whether it still is).
const HOOK_THRESHOLD: u8 = 2;
/// Dirty bitmaps record the writes.
const HOOK_BITMAPS: u8 = 4;
/// `detect-zeroes` is on.
const HOOK_DETECT_ZEROES: u8 = 8;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.format_name())
            .finish_non_exhaustive()
    }
}

impl Node {
    pub(crate) fn new(
        name: String,
        driver: Box<dyn BlockDriver>,
        opts: NodeOptions,
        implicit: bool,
        children: Vec<Arc<Edge>>,
        backing: Arc<ChildSlot>,
        events: Arc<EventQueue>,
    ) -> Result<Arc<Node>> {
        let len = driver.length()?;
        let len = if driver.is_protocol() {
            len.div_ceil(512) * 512
        } else {
            len
        };
        let node = Arc::new(Node {
            name,
            driver,
            implicit,
            len: AtomicU64::new(len),
            children: RwLock::new(children),
            parents: Mutex::new(Vec::new()),
            backing,
            cumulative: Mutex::new((Perm::NONE, Perm::ALL)),
            wr_highest_offset: AtomicU64::new(0),
            write_threshold: AtomicU64::new(0),
            bitmaps: RwLock::new(Vec::new()),
            events,
            closed: AtomicBool::new(false),
            hooks: AtomicU8::new(
                if opts.read_only { HOOK_READ_ONLY } else { 0 }
                    | if opts.detect_zeroes != DetectZeroes::Off {
                        HOOK_DETECT_ZEROES
                    } else {
                        0
                    },
            ),
            opts,
        });
        for e in rlock(&node.children).iter() {
            e.set_parent(Parent::Node(Arc::downgrade(&node)));
        }
        Ok(node)
    }

    /// The node name (given, or generated `#blockNNN`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    /// The driver name (`qcow2`, `file`, ...).
    pub fn driver_name(&self) -> &'static str {
        self.driver.format_name()
    }

    /// The generic options.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// Whether the node is read-only.
    pub fn is_read_only(&self) -> bool {
        self.hooks.load(Ordering::Acquire) & HOOK_READ_ONLY != 0
    }

    /// Whether the node is a filter created implicitly (hidden from `query-block`).
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The exact length as the driver reports it (protocol nodes show it rounded up to 512
    /// bytes in [`Node::length`], as QEMU does).
    pub fn exact_length(&self) -> Result<u64> {
        self.driver.length()
    }

    /// The length in bytes.
    pub fn length(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Requests in flight that can reach this node: those of the roots above it (requests
    /// are counted once, at the root they enter by; see [`crate::gate`]).
    pub fn in_flight(self: &Arc<Self>) -> usize {
        self.roots_above().iter().map(|r| r.gate.in_flight()).sum()
    }

    /// The roots (BlockBackends, jobs, temporary users) whose requests can reach this node.
    pub fn roots_above(self: &Arc<Self>) -> Vec<Arc<RootInfo>> {
        roots_above(std::slice::from_ref(self))
    }

    /// Whether a root above this node is being drained: requests that wait by choice (a
    /// throttle queue, emulated latency) should then finish at once, as the drain waits
    /// for them.
    pub(crate) fn drained_above(&self) -> bool {
        fn walk(n: &Node, depth: usize) -> bool {
            depth <= 64
                && n.parents().iter().any(|e| match e.parent() {
                    Some(Parent::Root(r)) => r.gate().is_quiesced(),
                    Some(Parent::Node(w)) => w.upgrade().is_some_and(|p| walk(&p, depth + 1)),
                    None => false,
                })
        }
        walk(self, 0)
    }

    /// The end of the highest write so far (`wr_highest_offset`).
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.load(Ordering::Relaxed)
    }

    /// The children, in the order they were attached.
    pub fn children(&self) -> Vec<Arc<Edge>> {
        rlock(&self.children).clone()
    }

    /// The child edge named `name`.
    pub fn child(&self, name: &str) -> Option<Arc<Edge>> {
        rlock(&self.children)
            .iter()
            .find(|e| e.name() == name)
            .cloned()
    }

    /// The primary child: `file` for formats, the filtered child for filters.
    pub fn primary_child(&self) -> Option<Arc<Edge>> {
        let c = rlock(&self.children);
        c.iter()
            .find(|e| e.name() == "file")
            .or_else(|| {
                c.iter()
                    .find(|e| matches!(e.role(), ChildRole::Filtered | ChildRole::Image))
            })
            .cloned()
    }

    /// The backing edge, if any.
    pub fn backing(&self) -> Option<Arc<Edge>> {
        self.backing.get()
    }

    /// The edges through which parents use this node (newest first).
    pub fn parents(&self) -> Vec<Arc<Edge>> {
        mlock(&self.parents)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// What the parents need from the node and what they share, combined.
    pub fn cumulative_perm(&self) -> (Perm, Perm) {
        *mlock(&self.cumulative)
    }

    /// The configured write threshold (0: none).
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::SeqCst)
    }

    /// Sets the write threshold (0 disables it).
    pub fn set_write_threshold(&self, t: u64) {
        // The hook first, then the threshold: a write never sees a threshold without its
        // hook. A threshold that fired leaves the hook set (the slow path finds 0) until
        // the next change, since clearing it there could race with a new threshold.
        if t != 0 {
            self.set_hook(HOOK_THRESHOLD, true);
            self.write_threshold.store(t, Ordering::SeqCst);
        } else {
            self.write_threshold.store(0, Ordering::SeqCst);
            self.set_hook(HOOK_THRESHOLD, false);
        }
    }

    fn set_hook(&self, bit: u8, on: bool) {
        if on {
            self.hooks.fetch_or(bit, Ordering::AcqRel);
        } else {
            self.hooks.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    #[inline]
    fn check_threshold(&self, offset: u64, len: u64) {
        // One load when no threshold is set (the usual case).
        if self.write_threshold.load(Ordering::Relaxed) != 0 {
            self.check_threshold_set(offset, len);
        }
    }

    #[cold]
    fn check_threshold_set(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        loop {
            let t = self.write_threshold.load(Ordering::SeqCst);
            if t == 0 || t >= end {
                return;
            }
            if self
                .write_threshold
                .compare_exchange(t, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.events
                    .push(BlockWriteThreshold::message(&BlockWriteThresholdData {
                        node_name: self.name.clone(),
                        amount_exceeded: end - t,
                        write_threshold: t,
                    }));
                return;
            }
        }
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        rlock(&self.bitmaps).clone()
    }

    /// The bitmap named `name`.
    pub fn bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        rlock(&self.bitmaps)
            .iter()
            .find(|b| b.name() == name)
            .cloned()
    }

    /// Adds a bitmap (the name must be free).
    pub fn add_bitmap(&self, bm: Arc<DirtyBitmap>) -> Result<()> {
        let mut b = wlock(&self.bitmaps);
        if b.iter().any(|x| x.name() == bm.name()) {
            return Err(BlockError::generic(format!(
                "Bitmap already exists: {}",
                bm.name()
            )));
        }
        // QEMU lists the newest bitmap first.
        b.insert(0, bm);
        self.set_hook(HOOK_BITMAPS, true);
        Ok(())
    }

    /// Removes the bitmap named `name`; returns it.
    pub fn remove_bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        let mut b = wlock(&self.bitmaps);
        let i = b.iter().position(|x| x.name() == name)?;
        let bm = b.remove(i);
        self.set_hook(HOOK_BITMAPS, !b.is_empty());
        Some(bm)
    }

    #[inline]
    fn mark_dirty(&self, offset: u64, len: u64) {
        if self.hooks.load(Ordering::Acquire) & HOOK_BITMAPS != 0 {
            self.mark_dirty_bitmaps(offset, len);
        }
    }

    #[cold]
    fn mark_dirty_bitmaps(&self, offset: u64, len: u64) {
        for b in rlock(&self.bitmaps).iter() {
            b.record_write(offset, len);
        }
    }

    fn debug_event(&self, ev: BlkdebugEvent) {
        if crate::drivers::blkdebug::LIVE.load(Ordering::Relaxed) != 0 {
            self.driver.debug_event(&ev);
        }
    }

    fn check_request(offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > MAX_REQUEST_END) {
            return Err(BlockError::errno(libc::EIO));
        }
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len_mut(iov) as u64;
        Self::check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let size = self.length();
        if offset + len > size {
            return self.read_past_end(offset, len, size, iov);
        }
        self.driver.read(offset, iov)
    }

    /// [`Node::read`] of a range that ends past the end of the node: what lies past the
    /// end reads as zero.
    #[cold]
    fn read_past_end(
        &self,
        offset: u64,
        len: u64,
        size: u64,
        iov: &mut [IoSliceMut<'_>],
    ) -> Result<()> {
        if offset >= size {
            zero_iov(iov);
            return Ok(());
        }
        let avail = (size - offset) as usize;
        {
            let mut head = slice_iov_mut(iov, 0, avail);
            self.driver.read(offset, &mut head)?;
        }
        let mut tail = slice_iov_mut(iov, avail, len as usize - avail);
        zero_iov(&mut tail);
        Ok(())
    }

    #[inline]
    fn finish_write(&self, offset: u64, len: u64, grew: bool) {
        let end = offset + len;
        if grew {
            let end = if self.driver.is_protocol() {
                end.div_ceil(512) * 512
            } else {
                end
            };
            self.len.fetch_max(end, Ordering::AcqRel);
        }
        // A load first: most writes are below the highest offset and need no locked
        // read-modify-write.
        if end > self.wr_highest_offset.load(Ordering::Relaxed) {
            self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
        }
    }

    #[inline(always)]
    pub(crate) fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        let len = iov_len(iov) as u64;
        Self::check_request(offset, len)?;
        // The usual write: nothing to check, detect or record but the highest offset.
        if self.hooks.load(Ordering::Acquire) == 0
            && crate::drivers::blkdebug::LIVE.load(Ordering::Relaxed) == 0
            && len != 0
        {
            self.driver.write(offset, iov, flags)?;
            self.finish_write(offset, len, offset + len > self.length());
            return Ok(());
        }
        self.write_hooked(offset, len, iov, flags)
    }

    /// [`Node::write`] when a hook is set (or a blkdebug rule lives).
    #[inline(never)]
    fn write_hooked(
        &self,
        offset: u64,
        len: u64,
        iov: &[IoSlice<'_>],
        flags: WriteFlags,
    ) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::errno(libc::EACCES));
        }
        if len == 0 {
            return Ok(());
        }
        if self.opts.detect_zeroes != DetectZeroes::Off && is_zero(iov) {
            return self.write_detected_zeroes(offset, len, flags);
        }
        self.check_threshold(offset, len);
        self.debug_event(BlkdebugEvent::Pwritev);
        let r = self.driver.write(offset, iov, flags);
        self.debug_event(BlkdebugEvent::PwritevDone);
        self.mark_dirty(offset, len);
        r?;
        self.finish_write(offset, len, offset + len > self.length());
        Ok(())
    }

    /// Copy offload, source side, through this node's generic layer (see
    /// [`crate::copy_range`]): 0 bytes past the end or where the driver can't.
    pub(crate) fn copy_range_from(
        &self,
        offset: u64,
        len: u64,
        to: &mut dyn FnMut(&crate::driver::CopyExtent) -> Result<()>,
    ) -> Result<u64> {
        Self::check_request(offset, len)?;
        if len == 0 || offset + len > self.length() {
            return Ok(0);
        }
        self.driver.copy_range_from(offset, len, to)
    }

    /// Copy offload, target side: writes `src` at `offset` as [`Node::write`] would write
    /// its data (drain tracking, threshold, dirty bitmaps, growth).
    pub(crate) fn copy_range_to(&self, offset: u64, src: &crate::driver::CopyExtent) -> Result<()> {
        let len = src.len;
        Self::check_request(offset, len)?;
        if self.is_read_only() {
            return Err(BlockError::errno(libc::EACCES));
        }
        if len == 0 {
            return Ok(());
        }
        self.check_threshold(offset, len);
        let r = self.driver.copy_range_to(offset, src);
        self.mark_dirty(offset, len);
        r?;
        self.finish_write(offset, len, offset + len > self.length());
        Ok(())
    }

    fn run_one(&self, r: &mut BatchReq<'_>) -> Result<()> {
        let offset = r.offset;
        match &mut r.buf {
            BatchBuf::Read(b) => self.read(offset, &mut [IoSliceMut::new(b)]),
            BatchBuf::Write(b) => self.write(offset, &[IoSlice::new(b)], WriteFlags { fua: r.fua }),
        }
    }

    /// The generic layer of a batch (see [`crate::batch`]): the checks of [`Node::read`]
    /// and [`Node::write`] for every pending request, one driver call for all of them,
    /// then dirty bitmaps and the highest offset. Requests that need the single-request
    /// path (reads past the end, `detect-zeroes`, live `blkdebug` rules) take it.
    pub(crate) fn submit_batch(&self, reqs: &mut [BatchReq<'_>]) {
        if self.opts.detect_zeroes != DetectZeroes::Off
            || crate::drivers::blkdebug::LIVE.load(Ordering::Relaxed) != 0
        {
            for r in reqs.iter_mut().filter(|r| r.is_pending()) {
                r.result = Some(self.run_one(r));
            }
            return;
        }
        let size = self.length();
        let ro = self.is_read_only();
        let mut writes: Vec<usize> = Vec::new();
        for (i, r) in reqs.iter_mut().enumerate().filter(|(_, r)| r.is_pending()) {
            let len = r.len() as u64;
            if let Err(e) = Self::check_request(r.offset, len) {
                r.result = Some(Err(e));
            } else if r.is_write() {
                if ro {
                    r.result = Some(Err(BlockError::errno(libc::EACCES)));
                } else if len == 0 {
                    r.result = Some(Ok(()));
                } else {
                    self.check_threshold(r.offset, len);
                    writes.push(i);
                }
            } else if len == 0 {
                r.result = Some(Ok(()));
            } else if r.offset + len > size {
                r.result = Some(self.run_one(r));
            }
        }
        if reqs.iter().any(BatchReq::is_pending) {
            self.driver.submit_batch(reqs);
        }
        let size = self.length();
        for i in writes {
            let r = &reqs[i];
            let len = r.len() as u64;
            self.mark_dirty(r.offset, len);
            if matches!(r.result, Some(Ok(()))) {
                self.finish_write(r.offset, len, r.offset + len > size);
            }
        }
    }

    /// `detect-zeroes` found a write of zeroes: it becomes a write-zeroes request.
    #[cold]
    fn write_detected_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let may_unmap = self.opts.detect_zeroes == DetectZeroes::Unmap && self.opts.discard_unmap;
        self.zeroes_inner(
            offset,
            len,
            ZeroFlags {
                may_unmap,
                fua: flags.fua,
            },
        )
    }

    fn zeroes_inner(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> Result<()> {
        if !self.opts.discard_unmap {
            flags.may_unmap = false;
        }
        self.check_threshold(offset, len);
        self.debug_event(BlkdebugEvent::PwritevZero);
        let r = self.driver.write_zeroes(offset, len, flags);
        self.mark_dirty(offset, len);
        r?;
        self.finish_write(offset, len, offset + len > self.length());
        Ok(())
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        Self::check_request(offset, len)?;
        if self.is_read_only() {
            return Err(BlockError::errno(libc::EACCES));
        }
        if len == 0 {
            return Ok(());
        }
        self.zeroes_inner(offset, len, flags)
    }

    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Self::check_request(offset, len)?;
        if self.is_read_only() {
            return Err(BlockError::errno(libc::EACCES));
        }
        if !self.opts.discard_unmap {
            return Ok(());
        }
        let size = self.length();
        if len == 0 || offset >= size {
            return Ok(());
        }
        let len = len.min(size - offset);
        let r = self.driver.discard(offset, len);
        self.mark_dirty(offset, len);
        r
    }

    pub(crate) fn flush(&self) -> Result<()> {
        if self.is_read_only() || (self.opts.cache_no_flush && self.driver.is_protocol()) {
            return Ok(());
        }
        if crate::drivers::blkdebug::LIVE.load(Ordering::Relaxed) == 0 {
            return self.driver.flush();
        }
        if let Some(f) = self.primary_child() {
            f.debug_event(BlkdebugEvent::FlushToOs);
            f.debug_event(BlkdebugEvent::FlushToDisk);
        }
        self.driver.flush()
    }

    /// Changes the node's length (`block_resize`); the caller holds a root with the resize
    /// permission and has drained the node.
    pub(crate) fn truncate(&self, len: u64) -> Result<()> {
        if self.is_read_only() {
            return Err(BlockError::generic("Image is read-only"));
        }
        let old = self.length();
        let bitmaps = rlock(&self.bitmaps);
        // The bitmaps grow first: a size they can't follow is refused before the image
        // changes.
        for (i, b) in bitmaps.iter().enumerate() {
            if let Err(e) = b.resize(len) {
                for b in &bitmaps[..i] {
                    let _ = b.resize(old);
                }
                return Err(e);
            }
        }
        let truncated = self
            .driver
            .truncate(len)
            .and_then(|()| self.driver.length());
        let new = match truncated {
            Ok(n) if self.driver.is_protocol() => n.div_ceil(512) * 512,
            Ok(n) => n,
            Err(e) => {
                for b in bitmaps.iter() {
                    let _ = b.resize(old);
                }
                return Err(e);
            }
        };
        self.len.store(new, Ordering::Release);
        for b in bitmaps.iter() {
            // Rounding by the driver: at most a word either way, within the budget taken.
            let _ = b.resize(new);
        }
        Ok(())
    }

    /// Makes the node read-only (QEMU's reopen with `read-only=on`): persistent bitmaps
    /// are stored, the driver writes what it caches, and writes are refused from now on.
    /// The caller drained the node and refreshes permissions.
    pub(crate) fn reopen_read_only(&self) -> Result<()> {
        if self.is_read_only() {
            return Ok(());
        }
        self.driver.flush()?;
        for b in rlock(&self.bitmaps).iter() {
            if b.is_persistent() && !b.is_inconsistent() {
                self.driver.store_bitmap(&b.to_stored())?;
            }
        }
        self.driver.reopen_read_only()?;
        self.set_hook(HOOK_READ_ONLY, true);
        Ok(())
    }

    /// Makes the node writable again (QEMU's reopen with `read-only=off`): the driver
    /// prepares, then writes are accepted. The caller drained the node, made its children
    /// writable first and refreshes permissions.
    pub(crate) fn reopen_read_write(&self) -> Result<()> {
        if !self.is_read_only() {
            return Ok(());
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(BlockError::generic(format!(
                "Node '{}' is closed",
                self.name
            )));
        }
        self.driver.reopen_read_write()?;
        self.set_hook(HOOK_READ_ONLY, false);
        Ok(())
    }

    /// Stores persistent bitmaps and closes the driver (once).
    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if !self.is_read_only() {
            for b in rlock(&self.bitmaps).iter() {
                if b.is_persistent() && !b.is_inconsistent() {
                    if let Err(e) = self.driver.store_bitmap(&b.to_stored()) {
                        log::error!(
                            "node '{}': storing bitmap '{}' failed: {e}",
                            self.name,
                            b.name()
                        );
                    }
                }
            }
        }
        if let Err(e) = self.driver.close() {
            log::error!("node '{}': close failed: {e}", self.name);
        }
        self.set_hook(HOOK_READ_ONLY, true);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.close();
    }
}

/// The roots (BlockBackends, jobs, temporary users) whose requests can reach any of `nodes`.
pub(crate) fn roots_above(nodes: &[Arc<Node>]) -> Vec<Arc<RootInfo>> {
    let mut roots: Vec<Arc<RootInfo>> = Vec::new();
    let mut stack: Vec<Arc<Node>> = nodes.to_vec();
    let mut seen = std::collections::HashSet::new();
    while let Some(n) = stack.pop() {
        if !seen.insert(Arc::as_ptr(&n)) {
            continue;
        }
        for e in n.parents() {
            match e.parent() {
                Some(Parent::Node(w)) => {
                    if let Some(p) = w.upgrade() {
                        stack.push(p);
                    }
                }
                Some(Parent::Root(r)) if !roots.iter().any(|x| Arc::ptr_eq(x, r)) => {
                    roots.push(r.clone());
                }
                _ => {}
            }
        }
    }
    roots
}
