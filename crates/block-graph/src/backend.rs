//! BlockBackends: the named front of a node tree that a guest device (or a job, an export)
//! uses. A backend owns a root gate (drain), the medium (its root edge, absent when
//! ejected), the tray and lock state of removable media, the I/O accounting, the error
//! policies (`werror`/`rerror`) and the I/O status.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use qapi_types::event::{BlockIoError, BlockIoErrorData, DeviceTrayMoved, DeviceTrayMovedData};
use qapi_types::{
    BlockDeviceIoStatus, BlockErrorAction, BlockdevOnError, BlockdevOptions, IoOperationType,
};

use crate::batch::BatchReq;
use crate::driver::{WriteFlags, ZeroFlags};
use crate::edge::Route;
use crate::error::{BlockError, Result};
use crate::events::EventQueue;
use crate::graph::{id_wellformed, BlockGraph};
use crate::iov::{iov_len, iov_len_mut};
use crate::node::{mlock, rlock, wlock, Edge, Node, Parent, RangeStatus, RootInfo};
use crate::perm::{ChildRole, Perm};
use crate::stats::Stats;
use crate::throttle::{ThrottleGroup, ThrottleLimits};

/// Options of a BlockBackend.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// What to do on write errors (guest devices; default `enospc`).
    pub werror: BlockdevOnError,
    /// What to do on read errors (default `report`).
    pub rerror: BlockdevOnError,
    /// Whether invalid requests count as accesses.
    pub account_invalid: bool,
    /// Whether failed requests count in latency and access statistics.
    pub account_failed: bool,
    /// Timed statistics intervals, in seconds.
    pub stats_intervals: Vec<u64>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            werror: BlockdevOnError::Enospc,
            rerror: BlockdevOnError::Report,
            account_invalid: true,
            account_failed: true,
            stats_intervals: Vec::new(),
        }
    }
}

impl BackendOptions {
    /// The backend options of a `blockdev-add` with `id` (QEMU 2.x form).
    pub fn from_blockdev(o: &BlockdevOptions) -> Result<Self> {
        let mut b = BackendOptions::default();
        if let Some(w) = &o.werror {
            b.werror = w.clone();
        }
        if let Some(r) = &o.rerror {
            if *r == BlockdevOnError::Enospc {
                return Err(BlockError::generic("enospc is not supported as rerror"));
            }
            b.rerror = r.clone();
        }
        b.account_invalid = o.stats_account_invalid.unwrap_or(true);
        b.account_failed = o.stats_account_failed.unwrap_or(true);
        for &i in o.stats_intervals.iter().flatten() {
            if i <= 0 || i > u32::MAX as i64 {
                return Err(BlockError::generic(format!("Invalid interval length: {i}")));
            }
            b.stats_intervals.push(i as u64);
        }
        Ok(b)
    }
}

/// A guest device attached to a backend, as QEMU's device models describe themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAttach {
    /// The device id (`qdev` in `query-block`, `id` in the media commands).
    pub id: String,
    /// The device only reads.
    pub read_only: bool,
    /// Other users may write the same node (`share-rw`).
    pub share_rw: bool,
    /// The device copes with resizes.
    pub resizable: bool,
    /// Removable media (CD-ROM, floppy).
    pub removable: bool,
    /// The device has a tray that opens (CD-ROM).
    pub has_tray: bool,
}

impl DeviceAttach {
    /// A read-write disk such as virtio-blk: resizable, not shared, no removable media.
    pub fn disk(id: impl Into<String>) -> Self {
        DeviceAttach {
            id: id.into(),
            read_only: false,
            share_rw: false,
            resizable: true,
            removable: false,
            has_tray: false,
        }
    }
}

/// Checks a new backend name as QEMU's `blk_set_name` and option parsing do.
pub fn check_new_device_name(g: &BlockGraph, id: &str) -> Result<()> {
    if !id_wellformed(id) {
        return Err(BlockError::generic("Parameter 'id' expects an identifier"));
    }
    if g.find_backend(id).is_some() {
        return Err(BlockError::generic(format!(
            "Device with id '{id}' already exists"
        )));
    }
    if g.find_node(id).is_some() {
        return Err(BlockError::generic(format!(
            "Device name '{id}' conflicts with an existing node name"
        )));
    }
    Ok(())
}

/// The device name of a root that is a BlockBackend (for events).
pub fn device_name_of(r: &RootInfo) -> Option<String> {
    let d = r.device_name();
    (!d.is_empty()).then_some(d)
}

/// A BlockBackend. I/O methods take `&self` and may be called from any thread; they pass
/// the backend's drain gate and follow the medium and tray state.
///
/// As in QEMU, the backend does not account its requests: the guest device does, through
/// [`BlockBackend::stats`] (QEMU's `block_acct_start`/`block_acct_done` on
/// `blk_get_stats`), because only the device knows what the guest asked for: a request it
/// refuses is *invalid*, requests it merges are *merged*, and I/O that is not the guest's
/// (a block job's, the monitor's) is not the guest's statistics.
pub struct BlockBackend {
    name: String,
    /// The gate and the medium (root edge and node) that requests go through.
    info: Arc<RootInfo>,
    perm: Mutex<(Perm, Perm)>,
    dev: Mutex<Option<DeviceAttach>>,
    tray_open: AtomicBool,
    locked: AtomicBool,
    eject_request: AtomicBool,
    stats: Stats,
    opts: Mutex<BackendOptions>,
    iostatus: Mutex<Option<BlockDeviceIoStatus>>,
    events: Arc<EventQueue>,
    read_only_hint: AtomicBool,
    resize_cb: Mutex<Option<ResizeCallback>>,
    throttle: RwLock<Option<Arc<ThrottleGroup>>>,
    throttled: AtomicBool,
    tray: AtomicBool,
}

/// Called with the new length when the medium is resized (`block_resize`): devices tell
/// the guest (virtio-blk's configuration change).
pub type ResizeCallback = Arc<dyn Fn(u64) + Send + Sync>;

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("name", &self.name)
            .field("root", &self.root_node().map(|n| n.name().to_string()))
            .finish_non_exhaustive()
    }
}

impl BlockBackend {
    fn new(
        name: &str,
        desc: String,
        perm: Perm,
        shared: Perm,
        opts: BackendOptions,
        events: Arc<EventQueue>,
    ) -> Arc<Self> {
        let info = RootInfo::new(desc);
        info.set_device_name(name);
        Arc::new(BlockBackend {
            name: name.to_string(),
            info,
            perm: Mutex::new((perm, shared)),
            dev: Mutex::new(None),
            tray_open: AtomicBool::new(false),
            locked: AtomicBool::new(false),
            eject_request: AtomicBool::new(false),
            stats: Stats::new(
                opts.account_invalid,
                opts.account_failed,
                &opts.stats_intervals,
            ),
            opts: Mutex::new(opts),
            iostatus: Mutex::new(None),
            events,
            read_only_hint: AtomicBool::new(false),
            resize_cb: Mutex::new(None),
            throttle: RwLock::new(None),
            throttled: AtomicBool::new(false),
            tray: AtomicBool::new(false),
        })
    }

    /// A named backend without medium and without permissions on it yet (a device attaches
    /// and states what it needs).
    pub(crate) fn new_named(g: &BlockGraph, name: &str, opts: BackendOptions) -> Result<Arc<Self>> {
        Ok(Self::new(
            name,
            format!("block device '{name}'"),
            Perm::NONE,
            Perm::ALL,
            opts,
            g.events.clone(),
        ))
    }

    /// The backend's name (empty for anonymous backends).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root (parent) information: its gate and description.
    pub fn root_info(&self) -> &Arc<RootInfo> {
        &self.info
    }

    /// The medium's root node.
    pub fn root_node(&self) -> Option<Arc<Node>> {
        self.info.route().as_ref().map(|r| r.node.clone())
    }

    /// The root edge.
    pub fn root_edge(&self) -> Option<Arc<Edge>> {
        self.info.route().as_ref().map(|r| r.edge.clone())
    }

    /// The permissions the backend takes on its medium.
    pub fn perm(&self) -> (Perm, Perm) {
        *mlock(&self.perm)
    }

    /// The attached guest device.
    pub fn device(&self) -> Option<DeviceAttach> {
        mlock(&self.dev).clone()
    }

    /// The accounting.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The options.
    pub fn options(&self) -> BackendOptions {
        mlock(&self.opts).clone()
    }

    /// Whether the medium is removable (always, without a device).
    pub fn is_removable(&self) -> bool {
        mlock(&self.dev).as_ref().is_none_or(|d| d.removable)
    }

    /// Whether the attached device has a tray.
    pub fn has_tray(&self) -> bool {
        self.tray.load(Ordering::Acquire)
    }

    /// Whether the tray is open.
    pub fn is_tray_open(&self) -> bool {
        self.has_tray() && self.tray_open.load(Ordering::SeqCst)
    }

    /// Whether the guest locked the medium.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::SeqCst)
    }

    /// Called by the device when the guest locks or unlocks the medium.
    pub fn set_locked(&self, locked: bool) {
        self.locked.store(locked, Ordering::SeqCst);
    }

    /// Takes a pending eject request (the device asks the guest to release the medium).
    pub fn take_eject_request(&self) -> bool {
        self.eject_request.swap(false, Ordering::SeqCst)
    }

    /// Whether a medium is inserted and reachable (tray closed).
    pub fn is_available(&self) -> bool {
        self.info.route().is_some() && !self.is_tray_open()
    }

    /// The I/O status (`None`: not enabled for this device).
    pub fn iostatus(&self) -> Option<BlockDeviceIoStatus> {
        mlock(&self.iostatus).clone()
    }

    /// Enables the I/O status (devices that stop on errors do).
    pub fn iostatus_enable(&self) {
        *mlock(&self.iostatus) = Some(BlockDeviceIoStatus::Ok);
    }

    /// Resets the I/O status to `ok` (`cont` does).
    pub fn iostatus_reset(&self) {
        let mut s = mlock(&self.iostatus);
        if s.is_some() {
            *s = Some(BlockDeviceIoStatus::Ok);
        }
    }

    /// The throttle limits (with the group name), if throttling is enabled.
    pub fn throttle_config(&self) -> Option<ThrottleLimits> {
        rlock(&self.throttle).as_ref().map(|g| g.limits())
    }

    /// The throttle group, if any.
    pub fn throttle_group(&self) -> Option<Arc<ThrottleGroup>> {
        rlock(&self.throttle).clone()
    }

    pub(crate) fn set_throttle_group(&self, g: Option<Arc<ThrottleGroup>>) {
        self.throttled.store(g.is_some(), Ordering::Relaxed);
        *wlock(&self.throttle) = g;
    }

    #[inline]
    fn throttle(&self, write: bool, bytes: u64) {
        if self.throttled.load(Ordering::Relaxed) {
            self.throttle_in_group(write, bytes);
        }
    }

    #[cold]
    fn throttle_in_group(&self, write: bool, bytes: u64) {
        let g = rlock(&self.throttle).clone();
        if let Some(g) = g {
            g.intercept(write, bytes, || self.info.gate.is_quiesced());
        }
    }

    /// Sets the function told about resizes of the medium.
    pub fn set_resize_callback(&self, cb: Option<ResizeCallback>) {
        *mlock(&self.resize_cb) = cb;
    }

    pub(crate) fn notify_resize(&self, len: u64) {
        let cb = mlock(&self.resize_cb).clone();
        if let Some(cb) = cb {
            cb(len);
        }
    }

    /// The read-only state new media get with `blockdev-change-medium`'s `retain` mode.
    pub(crate) fn read_only_hint(&self) -> bool {
        self.read_only_hint.load(Ordering::SeqCst)
    }

    pub(crate) fn set_read_only_hint(&self, ro: bool) {
        self.read_only_hint.store(ro, Ordering::SeqCst);
    }

    fn emit_tray(&self, open: bool) {
        let id = mlock(&self.dev)
            .as_ref()
            .map(|d| d.id.clone())
            .unwrap_or_default();
        self.events
            .push(DeviceTrayMoved::message(&DeviceTrayMovedData {
                device: self.name.clone(),
                id,
                tray_open: open,
            }));
    }

    /// Moves the tray (the device model's `change_media_cb`), raising `DEVICE_TRAY_MOVED`
    /// when it moves.
    pub(crate) fn set_tray(&self, open: bool) {
        if !self.has_tray() {
            return;
        }
        if self.tray_open.swap(open, Ordering::SeqCst) != open {
            self.emit_tray(open);
        }
    }

    /// Asks the guest to release a locked medium.
    pub(crate) fn request_eject(&self) {
        self.eject_request.store(true, Ordering::SeqCst);
    }

    /// Takes the medium out, after draining the backend's requests. Returns the old root.
    pub(crate) fn detach_root(&self) -> Option<Arc<Node>> {
        self.info.gate.quiesce();
        self.info.gate.wait_idle();
        let old = self.info.set_route(None);
        self.info.gate.unquiesce();
        old.map(|e| e.node())
    }

    /// What to do about a failed request, per `werror`/`rerror`; raises `BLOCK_IO_ERROR`
    /// and updates the I/O status. Guest devices call it for every failed request and act
    /// on the answer (report the error to the guest, ignore it, or stop the VM).
    pub fn io_error(&self, is_read: bool, err: &BlockError) -> BlockErrorAction {
        let errno = err.errno_value();
        let policy = {
            let o = mlock(&self.opts);
            if is_read {
                o.rerror.clone()
            } else {
                o.werror.clone()
            }
        };
        let action = match policy {
            BlockdevOnError::Ignore => BlockErrorAction::Ignore,
            BlockdevOnError::Stop => BlockErrorAction::Stop,
            BlockdevOnError::Enospc if errno == libc::ENOSPC => BlockErrorAction::Stop,
            _ => BlockErrorAction::Report,
        };
        let enabled = {
            let mut s = mlock(&self.iostatus);
            if action == BlockErrorAction::Stop && s.as_ref() == Some(&BlockDeviceIoStatus::Ok) {
                *s = Some(if errno == libc::ENOSPC {
                    BlockDeviceIoStatus::Nospace
                } else {
                    BlockDeviceIoStatus::Failed
                });
            }
            s.is_some()
        };
        self.events.push(BlockIoError::message(&BlockIoErrorData {
            device: self.name.clone(),
            node_name: self.root_node().map(|n| n.name().to_string()),
            operation: if is_read {
                IoOperationType::Read
            } else {
                IoOperationType::Write
            },
            action: action.clone(),
            nospace: enabled.then_some(errno == libc::ENOSPC),
            reason: crate::error::strerror(errno),
        }));
        action
    }

    /// Runs `f` on the root edge after the checks QEMU's BlockBackend makes (medium present
    /// and reachable, range inside the medium, write permission), holding the root for the
    /// request (it only changes while the backend is drained).
    #[inline]
    fn with_root<R>(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        f: impl FnOnce(&Edge, &Node) -> Result<R>,
    ) -> Result<R> {
        let g = self.info.route();
        let Some(r) = g.as_ref().filter(|_| !self.is_tray_open()) else {
            return Err(BlockError::errno(libc::ENOMEDIUM));
        };
        if write && !r.edge.perm().contains(Perm::WRITE) {
            return Err(BlockError::errno(libc::EACCES));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > r.node.length())
        {
            return Err(BlockError::errno(libc::EIO));
        }
        f(&r.edge, &r.node)
    }

    /// Reads `iov` at `offset`.
    pub fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len_mut(iov) as u64;
        let _g = self.info.gate.enter();
        self.with_root(offset, len, false, |_, n| {
            self.throttle(false, len);
            n.read(offset, iov)
        })
    }

    /// Reads into one buffer.
    pub fn read_buf(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `iov` at `offset` (with write-through caches, as FUA).
    pub fn write(&self, offset: u64, iov: &[IoSlice<'_>], mut flags: WriteFlags) -> Result<()> {
        let len = iov_len(iov) as u64;
        let _g = self.info.gate.enter();
        self.with_root(offset, len, true, |e, n| {
            if !n.options().cache_writeback {
                flags.fua = true;
            }
            self.throttle(true, len);
            e.write_on(n, offset, iov, flags)
        })
    }

    /// Writes one buffer.
    pub fn write_buf(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.write(offset, &[IoSlice::new(buf)], flags)
    }

    /// Runs a batch of reads and writes with all of them in flight at once (see
    /// [`crate::batch`]): one gate entry, one permission and medium check, the throttle per
    /// request, then one call down the graph. Sets `result` of every request whose `result`
    /// is `None`. Like the single-request methods it does not account: a device accounts
    /// the batch (one [`Stats::start`] and [`Stats::same_start`] for the others, then
    /// [`Stats::done_batch`]: one clock read at each end).
    pub fn submit_batch(&self, reqs: &mut [BatchReq<'_>]) {
        let _g = self.info.gate.enter();
        let root = self.info.route();
        let Some(Route { edge: e, node: n }) = root.as_ref().filter(|_| !self.is_tray_open())
        else {
            for r in reqs.iter_mut().filter(|r| r.is_pending()) {
                r.result = Some(Err(BlockError::errno(libc::ENOMEDIUM)));
            }
            return;
        };
        let writable = e.perm().contains(Perm::WRITE);
        {
            let size = n.length();
            let write_through = !n.options().cache_writeback;
            for r in reqs.iter_mut().filter(|r| r.is_pending()) {
                let len = r.len() as u64;
                if r.is_write() && !writable {
                    r.result = Some(Err(BlockError::errno(libc::EACCES)));
                    continue;
                }
                if r.offset.checked_add(len).is_none_or(|end| end > size) {
                    r.result = Some(Err(BlockError::errno(libc::EIO)));
                    continue;
                }
                if r.is_write() && write_through {
                    r.fua = true;
                }
                self.throttle(r.is_write(), len);
            }
            e.submit_batch_on(n, reqs);
        }
    }

    /// Makes a range read as zero.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _g = self.info.gate.enter();
        self.with_root(offset, len, true, |e, n| {
            self.throttle(true, len);
            e.write_zeroes_on(n, offset, len, flags)
        })
    }

    /// Discards a range (not accounted: the statistics have no discard counters).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.info.gate.enter();
        self.with_root(offset, len, true, |_, n| n.discard(offset, len))
    }

    /// Flushes the medium.
    pub fn flush(&self) -> Result<()> {
        let _g = self.info.gate.enter();
        let e = self.root_edge();
        let Some(e) = e.filter(|_| !self.is_tray_open()) else {
            return Err(BlockError::errno(libc::ENOMEDIUM));
        };
        e.flush()
    }

    /// The medium's length (0 without medium).
    pub fn length(&self) -> u64 {
        self.info.route().as_ref().map_or(0, |r| r.node.length())
    }

    /// Allocation status through the whole chain (`qemu-img map` style).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<RangeStatus> {
        let _g = self.info.gate.enter();
        let n = self
            .root_node()
            .ok_or_else(|| BlockError::errno(libc::ENOMEDIUM))?;
        n.block_status_above(None, offset, len)
    }
}

impl BlockGraph {
    /// Creates a named BlockBackend (what QEMU's `-drive` or a 2.x `blockdev-add` with `id`
    /// creates), optionally with a medium. A guest device then declares itself with
    /// [`BlockGraph::attach_device`].
    pub fn create_backend(
        &mut self,
        name: &str,
        medium: Option<&Arc<Node>>,
        opts: BackendOptions,
    ) -> Result<Arc<BlockBackend>> {
        check_new_device_name(self, name)?;
        let be = BlockBackend::new_named(self, name, opts)?;
        if let Some(n) = medium {
            self.insert_medium_node(&be, n)?;
        }
        self.backends.push(be.clone());
        Ok(be)
    }

    /// An anonymous backend on `node` with the given permissions (for jobs, exports,
    /// temporary users): not listed in `query-block`, described as `desc` in permission
    /// errors.
    pub fn new_root(
        &mut self,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
        desc: &str,
    ) -> Result<Arc<BlockBackend>> {
        let be = BlockBackend::new(
            "",
            desc.to_string(),
            perm,
            shared,
            BackendOptions::default(),
            self.events.clone(),
        );
        self.insert_medium_node(&be, node)?;
        Ok(be)
    }

    /// Removes an anonymous backend's medium (its user is done).
    pub fn release_root(&mut self, be: &Arc<BlockBackend>) {
        be.detach_root();
        self.prune();
        let _ = self.refresh_perms();
    }

    /// Inserts `node` as the medium of `be`, taking the backend's permissions on it.
    pub(crate) fn insert_medium_node(
        &mut self,
        be: &Arc<BlockBackend>,
        node: &Arc<Node>,
    ) -> Result<()> {
        if be.info.route().is_some() {
            return Err(BlockError::generic(
                "There already is a medium in the device",
            ));
        }
        let (p, s) = be.perm();
        let e = Edge::new("root", ChildRole::Filtered, node.clone(), p, s);
        e.set_parent(Parent::Root(be.info.clone()));
        be.info.set_route(Some(e));
        if let Err(err) = self.refresh_perms() {
            let old = be.info.set_route(None);
            drop(old);
            let _ = self.refresh_perms();
            return Err(err);
        }
        be.read_only_hint
            .store(node.is_read_only(), Ordering::SeqCst);
        Ok(())
    }

    /// Takes the medium out of `be` (drained first); returns the old root node.
    pub(crate) fn remove_medium_node(&mut self, be: &Arc<BlockBackend>) -> Option<Arc<Node>> {
        let old = be.detach_root();
        let _ = self.refresh_perms();
        old
    }

    /// Declares the guest device using `be`: its permissions on the medium follow QEMU's
    /// `blkconf_apply_backend_options`, and the backend is described by the device in
    /// errors. Fails (and changes nothing) on a permission conflict.
    pub fn attach_device(&mut self, be: &Arc<BlockBackend>, dev: DeviceAttach) -> Result<()> {
        let mut perm = Perm::CONSISTENT_READ;
        if !dev.read_only {
            perm |= Perm::WRITE;
        }
        let mut shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::GRAPH_MOD;
        if dev.resizable {
            shared |= Perm::RESIZE;
        }
        if dev.share_rw {
            shared |= Perm::WRITE;
        }
        let old_perm = be.perm();
        let old_dev = mlock(&be.dev).replace(dev.clone());
        be.tray.store(dev.has_tray, Ordering::Release);
        *mlock(&be.perm) = (perm, shared);
        if let Some(e) = be.root_edge() {
            e.set_perm(perm, shared);
        }
        let old_desc = be.info.desc();
        if be.name.is_empty() {
            be.info.set_desc(format!("block device '{}'", dev.id));
        }
        if let Err(err) = self.refresh_perms() {
            be.info.set_desc(old_desc);
            *mlock(&be.perm) = old_perm;
            be.tray.store(
                old_dev.as_ref().is_some_and(|d| d.has_tray),
                Ordering::Release,
            );
            *mlock(&be.dev) = old_dev;
            if let Some(e) = be.root_edge() {
                e.set_perm(old_perm.0, old_perm.1);
            }
            let _ = self.refresh_perms();
            return Err(err);
        }
        if !be.name.is_empty() || self.backends.iter().any(|b| Arc::ptr_eq(b, be)) {
            return Ok(());
        }
        self.backends.push(be.clone());
        Ok(())
    }

    /// Detaches the guest device: the backend keeps its medium but no permissions.
    pub fn detach_device(&mut self, be: &Arc<BlockBackend>) {
        *mlock(&be.dev) = None;
        be.tray.store(false, Ordering::Release);
        *mlock(&be.perm) = (Perm::NONE, Perm::ALL);
        if let Some(e) = be.root_edge() {
            e.set_perm(Perm::NONE, Perm::ALL);
        }
        let _ = self.refresh_perms();
    }

    /// Deletes a named backend (`x-blockdev-del` with `id`): it must not have a device.
    pub fn delete_backend(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.backends.iter().position(|b| b.name() == name) else {
            return Err(BlockError::not_found(format!("Device '{name}' not found")));
        };
        if self.backends[i].device().is_some() {
            return Err(BlockError::generic(format!("Device '{name}' is in use")));
        }
        let be = self.backends.remove(i);
        be.detach_root();
        drop(be);
        self.prune();
        let _ = self.refresh_perms();
        Ok(())
    }
}
