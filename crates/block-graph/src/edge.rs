//! Edges (QEMU's BdrvChild) and the parents that hold them: nodes, or roots (BlockBackends,
//! jobs, temporary users) with the gate their requests pass.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, Weak};

use crate::driver::{WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use crate::gate::{GateGuard, RootGate};
use crate::iov::iov_len;
use crate::node::{mlock, rlock, wlock, Node};
use crate::perm::{ChildRole, Perm};

/// A parent that is not a node: a BlockBackend, a job, a temporary user. It owns the gate its
/// requests pass.
#[derive(Debug)]
pub struct RootInfo {
    pub(crate) gate: RootGate,
    /// A BlockBackend's medium: its root edge and the node behind it.
    route: RwLock<Option<Route>>,
    desc: Mutex<String>,
    device: Mutex<String>,
    /// The owner told when a drained section begins and ends above this root (a block job).
    participant: Mutex<Option<Weak<dyn DrainParticipant>>>,
}

/// The owner of a root that issues requests of its own accord (a block job), told when a
/// drained section begins and ends above its root so that it stops at a safe point first
/// (QEMU's `child_job_drained_begin`, `_poll` and `_end`). The root's gate alone cannot
/// hold such requests back: the owner may hold locks of its own between two of them, and
/// the drained section may need them.
pub trait DrainParticipant: Send + Sync {
    /// A drained section begins: finish the requests in flight and issue no new ones
    /// (a job pauses at its next pause point).
    fn drained_begin(&self);
    /// Whether the owner may still issue requests; the drain waits until it says no.
    fn drained_poll(&self) -> bool;
    /// The drained section ended (one call per [`DrainParticipant::drained_begin`]).
    fn drained_end(&self);
}

/// A BlockBackend's way into the graph: its root edge and the node behind that edge, held
/// together so that a request reaches the node under one read lock instead of the
/// backend's and the edge's (two atomic read-modify-writes fewer per request). The node is
/// kept in step with the edge by [`Edge::replace_child`].
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) edge: Arc<Edge>,
    pub(crate) node: Arc<Node>,
}

impl RootInfo {
    /// A root described as `desc` in permission errors (`block device 'disk0'`, `an unnamed
    /// block device`).
    pub fn new(desc: impl Into<String>) -> Arc<Self> {
        Arc::new(RootInfo {
            gate: RootGate::default(),
            route: RwLock::new(None),
            desc: Mutex::new(desc.into()),
            device: Mutex::new(String::new()),
            participant: Mutex::new(None),
        })
    }

    /// The description used in permission errors.
    pub fn desc(&self) -> String {
        mlock(&self.desc).clone()
    }

    /// Changes the description (a device was attached).
    pub fn set_desc(&self, d: impl Into<String>) {
        *mlock(&self.desc) = d.into();
    }

    /// The device name events report for this root (a BlockBackend's name; empty for
    /// other roots).
    pub fn device_name(&self) -> String {
        mlock(&self.device).clone()
    }

    /// Sets the device name.
    pub fn set_device_name(&self, d: impl Into<String>) {
        *mlock(&self.device) = d.into();
    }

    /// Registers the owner that drains tell to stop issuing requests (see
    /// [`DrainParticipant`]); replaces an earlier one.
    pub fn set_drain_participant(&self, p: Weak<dyn DrainParticipant>) {
        *mlock(&self.participant) = Some(p);
    }

    /// The registered drain participant, if it is still alive.
    pub fn drain_participant(&self) -> Option<Arc<dyn DrainParticipant>> {
        mlock(&self.participant).as_ref().and_then(Weak::upgrade)
    }

    /// The gate of this root's requests.
    pub fn gate(&self) -> &RootGate {
        &self.gate
    }

    /// The medium of a BlockBackend, read-locked.
    #[inline]
    pub(crate) fn route(&self) -> RwLockReadGuard<'_, Option<Route>> {
        rlock(&self.route)
    }

    /// Sets (or takes out, with `None`) a BlockBackend's root edge; returns the old one.
    pub(crate) fn set_route(&self, edge: Option<Arc<Edge>>) -> Option<Arc<Edge>> {
        let new = edge.map(|edge| Route {
            node: edge.node(),
            edge,
        });
        std::mem::replace(&mut *wlock(&self.route), new).map(|r| r.edge)
    }
}

/// Who holds an edge.
#[derive(Debug, Clone)]
pub enum Parent {
    /// A node (through one of its children).
    Node(Weak<Node>),
    /// A root user.
    Root(Arc<RootInfo>),
}

/// An edge of the graph: a parent's use of a child node, with the permissions it holds.
///
/// The node behind an edge can be replaced (snapshots, job completion) while the parent is
/// drained; the edge itself stays, so a driver keeps its `Arc<Edge>` for its whole life.
pub struct Edge {
    name: String,
    role: ChildRole,
    parent: OnceLock<Parent>,
    opening: Option<String>,
    child: RwLock<Arc<Node>>,
    perm: AtomicU32,
    shared: AtomicU32,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("name", &self.name)
            .field("child", &self.node().name())
            .field("perm", &self.perm())
            .finish()
    }
}

impl Edge {
    /// A new edge to `child`, registered in the child's parent list. Its parent is set
    /// with [`Edge::set_parent`] once known.
    pub(crate) fn new(
        name: &str,
        role: ChildRole,
        child: Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Arc<Edge> {
        Self::new_for(name, role, child, perm, shared, None)
    }

    /// Like [`Edge::new`] for the child of node `opening`, which is being opened.
    pub(crate) fn new_for(
        name: &str,
        role: ChildRole,
        child: Arc<Node>,
        perm: Perm,
        shared: Perm,
        opening: Option<String>,
    ) -> Arc<Edge> {
        let e = Arc::new(Edge {
            name: name.to_string(),
            role,
            parent: OnceLock::new(),
            opening,
            child: RwLock::new(child.clone()),
            perm: AtomicU32::new(perm.bits()),
            shared: AtomicU32::new(shared.bits()),
        });
        mlock(&child.parents).insert(0, Arc::downgrade(&e));
        e
    }

    /// Sets the parent (once).
    pub(crate) fn set_parent(&self, p: Parent) {
        let _ = self.parent.set(p);
    }

    /// The child's name in its parent (`file`, `backing`, `root`, `children.0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's role.
    pub fn role(&self) -> ChildRole {
        self.role
    }

    /// The parent, if set.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.get()
    }

    /// The node behind the edge.
    pub fn node(&self) -> Arc<Node> {
        rlock(&self.child).clone()
    }

    /// Runs `f` on the node behind the edge without taking a reference.
    #[inline]
    pub fn with_node<R>(&self, f: impl FnOnce(&Node) -> R) -> R {
        f(&rlock(&self.child))
    }

    /// The permissions held.
    pub fn perm(&self) -> Perm {
        Perm::from_bits(self.perm.load(Ordering::Relaxed))
    }

    /// The permissions shared with other users.
    pub fn shared(&self) -> Perm {
        Perm::from_bits(self.shared.load(Ordering::Relaxed))
    }

    pub(crate) fn set_perm(&self, perm: Perm, shared: Perm) {
        self.perm.store(perm.bits(), Ordering::Relaxed);
        self.shared.store(shared.bits(), Ordering::Relaxed);
    }

    /// Points the edge at another node (the caller drained the parent and checks
    /// permissions).
    pub(crate) fn replace_child(self: &Arc<Self>, new: Arc<Node>) {
        let mut c = wlock(&self.child);
        let me = Arc::as_ptr(self);
        mlock(&c.parents).retain(|w| w.as_ptr() != me);
        mlock(&new.parents).insert(0, Arc::downgrade(self));
        if let Some(Parent::Root(r)) = self.parent.get() {
            if let Some(route) = wlock(&r.route)
                .as_mut()
                .filter(|route| Arc::ptr_eq(&route.edge, self))
            {
                route.node = new.clone();
            }
        }
        *c = new;
    }

    /// QEMU's description of the parent for permission errors.
    pub fn parent_desc(&self) -> String {
        match self.parent.get() {
            Some(Parent::Node(w)) => match w.upgrade() {
                Some(n) => format!("node '{}'", n.name()),
                None => "a node being deleted".into(),
            },
            Some(Parent::Root(r)) => r.desc(),
            None => match &self.opening {
                Some(n) => format!("node '{n}'"),
                None => "a node being opened".into(),
            },
        }
    }

    /// Counts a request made through this edge when a root holds it (a job's or a
    /// temporary user's edge used directly), so that draining waits for it. Requests of a
    /// node's own children run inside a request of the node, already counted at the root
    /// above; BlockBackends count theirs at their own gate.
    #[inline]
    fn root_request(&self) -> Option<GateGuard<'_>> {
        match self.parent.get() {
            Some(Parent::Root(r)) => Some(r.gate.enter_unchecked()),
            _ => None,
        }
    }

    /// Reads from the child.
    #[inline(always)]
    pub fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let _r = self.root_request();
        rlock(&self.child).read(offset, iov)
    }

    /// Reads into one buffer.
    pub fn read_buf(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, &mut [IoSliceMut::new(buf)])
    }

    #[inline]
    fn check_write(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        let p = self.perm();
        if !p.contains(Perm::WRITE) && !p.contains(Perm::WRITE_UNCHANGED) {
            return Err(self.no_write_perm(node));
        }
        if offset.saturating_add(len) > node.length() && !p.contains(Perm::RESIZE) {
            return Err(BlockError::errno(libc::EIO));
        }
        Ok(())
    }

    #[cold]
    fn no_write_perm(&self, node: &Node) -> BlockError {
        BlockError::io(
            libc::EPERM,
            format!(
                "'{}' child of {} has no write permission on node '{}'",
                self.name,
                self.parent_desc(),
                node.name()
            ),
        )
    }

    /// Writes to the child (needs the write permission; past the end, the resize one).
    #[inline(always)]
    pub fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        let _r = self.root_request();
        let n = rlock(&self.child);
        self.write_on(&n, offset, iov, flags)
    }

    /// [`Edge::write`] to `n`, the node the caller already holds through this edge.
    #[inline(always)]
    pub(crate) fn write_on(
        &self,
        n: &Node,
        offset: u64,
        iov: &[IoSlice<'_>],
        flags: WriteFlags,
    ) -> Result<()> {
        self.check_write(n, offset, iov_len(iov) as u64)?;
        n.write(offset, iov, flags)
    }

    /// Runs a batch of reads and writes on the child (see [`crate::batch`]); writes need
    /// the write permission, as with [`Edge::write`].
    pub fn submit_batch(&self, reqs: &mut [crate::batch::BatchReq<'_>]) {
        let _r = self.root_request();
        let n = rlock(&self.child);
        self.submit_batch_on(&n, reqs)
    }

    /// [`Edge::submit_batch`] to `n`, the node the caller already holds through this edge.
    pub(crate) fn submit_batch_on(&self, n: &Node, reqs: &mut [crate::batch::BatchReq<'_>]) {
        for r in reqs.iter_mut().filter(|r| r.is_pending() && r.is_write()) {
            if let Err(e) = self.check_write(n, r.offset, r.len() as u64) {
                r.result = Some(Err(e));
            }
        }
        n.submit_batch(reqs)
    }

    /// Writes one buffer.
    pub fn write_buf(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.write(offset, &[IoSlice::new(buf)], flags)
    }

    /// Makes a range of the child read as zero.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _r = self.root_request();
        let n = rlock(&self.child);
        self.write_zeroes_on(&n, offset, len, flags)
    }

    /// [`Edge::write_zeroes`] to `n`, the node the caller already holds through this edge.
    pub(crate) fn write_zeroes_on(
        &self,
        n: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        self.check_write(n, offset, len)?;
        n.write_zeroes(offset, len, flags)
    }

    /// Discards a range of the child.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _r = self.root_request();
        let n = rlock(&self.child);
        if !self.perm().contains(Perm::WRITE) {
            return Err(BlockError::errno(libc::EPERM));
        }
        n.discard(offset, len)
    }

    /// Raises a debug event at the child (for `blkdebug` below).
    #[inline]
    pub fn debug_event(&self, ev: qapi_types::BlkdebugEvent) {
        if crate::drivers::blkdebug::LIVE.load(Ordering::Relaxed) != 0 {
            self.debug_event_live(ev);
        }
    }

    #[cold]
    fn debug_event_live(&self, ev: qapi_types::BlkdebugEvent) {
        rlock(&self.child).driver().debug_event(&ev);
    }

    /// Flushes the child.
    pub fn flush(&self) -> Result<()> {
        let _r = self.root_request();
        rlock(&self.child).flush()
    }

    /// The child's length.
    pub fn length(&self) -> u64 {
        rlock(&self.child).length()
    }

    /// Resizes the child (needs the resize permission).
    pub fn truncate(&self, len: u64) -> Result<()> {
        if !self.perm().contains(Perm::RESIZE) {
            return Err(BlockError::errno(libc::EPERM));
        }
        let _r = self.root_request();
        rlock(&self.child).truncate(len)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let me = self as *const Edge;
        let c = rlock(&self.child);
        mlock(&c.parents).retain(|w| w.as_ptr() != me);
    }
}

/// A slot holding an optional child edge that can change while the node lives (the backing
/// child). Drivers that read through their backing node keep an `Arc` of the slot.
#[derive(Debug, Default)]
pub struct ChildSlot(RwLock<Option<Arc<Edge>>>);

impl ChildSlot {
    /// The current edge.
    pub fn get(&self) -> Option<Arc<Edge>> {
        rlock(&self.0).clone()
    }

    pub(crate) fn set(&self, e: Option<Arc<Edge>>) -> Option<Arc<Edge>> {
        std::mem::replace(&mut *wlock(&self.0), e)
    }
}
