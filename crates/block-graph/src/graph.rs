//! The graph: the registry of nodes and BlockBackends, opening nodes from `BlockdevOptions`,
//! the permission system, drained sections, node replacement and deletion.
//!
//! Graph changes happen on one thread (the monitor's), through `&mut BlockGraph`. Requests
//! run on any thread through [`crate::BlockBackend`]s and other roots; every change that can
//! race with them happens inside a drained section of the affected nodes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use qapi_types::BlockdevOptions;

use crate::backend::BlockBackend;
use crate::error::{BlockError, Result};
use crate::events::{EventNotifier, EventQueue};
use crate::node::{mlock, DrainParticipant, Edge, Node, Parent, RootInfo};
use crate::options::Inherit;
use crate::perm::{check_conflicts, ChildRole, Perm, PermUser};

/// The block graph of a VMM or storage daemon.
pub struct BlockGraph {
    pub(crate) nodes: Vec<Weak<Node>>,
    pub(crate) monitor_owned: Vec<Arc<Node>>,
    pub(crate) backends: Vec<Arc<BlockBackend>>,
    pub(crate) events: Arc<EventQueue>,
    pub(crate) throttle_groups: crate::throttle::ThrottleGroups,
    pub(crate) transaction_ext: Option<Box<dyn crate::transaction::TransactionExtension>>,
    pub(crate) op_blockers: Option<Arc<dyn crate::op_blockers::OpBlockers>>,
    name_counter: u64,
    rng: u64,
}

impl Default for BlockGraph {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BlockGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockGraph")
            .field("nodes", &self.node_names())
            .field("backends", &self.backends.len())
            .finish()
    }
}

/// A drained section: while it lives, no request is in flight in the drained nodes and new
/// ones wait at their roots.
#[must_use = "the section ends when the guard drops"]
pub struct DrainGuard {
    roots: Vec<Arc<RootInfo>>,
    participants: Vec<Arc<dyn DrainParticipant>>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        for r in &self.roots {
            r.gate.unquiesce();
        }
        for p in &self.participants {
            p.drained_end();
        }
    }
}

/// Whether `name` is a valid node or device name (QEMU's `id_wellformed`).
pub fn id_wellformed(name: &str) -> bool {
    let mut c = name.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        BlockGraph {
            nodes: Vec::new(),
            monitor_owned: Vec::new(),
            backends: Vec::new(),
            events: Arc::new(EventQueue::default()),
            throttle_groups: Default::default(),
            transaction_ext: None,
            op_blockers: None,
            name_counter: 0,
            rng: seed | 1,
        }
    }

    /// Takes the QMP events raised since the last call, oldest first.
    pub fn take_events(&self) -> Vec<qmp_proto::EventMessage> {
        self.events.take()
    }

    /// Sets a function called (on any thread) whenever an event is queued, so that the
    /// VMM's loop wakes up and sends it.
    pub fn set_event_notifier(&self, n: Option<EventNotifier>) {
        self.events.set_notifier(n);
    }

    /// The event queue (for subsystems that raise block events themselves).
    pub fn event_queue(&self) -> &Arc<EventQueue> {
        &self.events
    }

    /// Every live node, in creation order.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.iter().filter_map(Weak::upgrade).collect()
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes().iter().map(|n| n.name().to_string()).collect()
    }

    pub(crate) fn prune(&mut self) {
        self.nodes.retain(|w| w.strong_count() > 0);
    }

    /// The node named `name`.
    pub fn find_node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes
            .iter()
            .filter_map(Weak::upgrade)
            .find(|n| n.name() == name)
    }

    /// The BlockBackends, in creation order.
    pub fn backends(&self) -> &[Arc<BlockBackend>] {
        &self.backends
    }

    /// The BlockBackend named `name` (its device name).
    pub fn find_backend(&self, name: &str) -> Option<Arc<BlockBackend>> {
        if name.is_empty() {
            return None;
        }
        self.backends.iter().find(|b| b.name() == name).cloned()
    }

    /// QEMU's `bdrv_lookup_bs`: a device's root node or a node by name.
    pub fn lookup(&self, device: Option<&str>, node_name: Option<&str>) -> Result<Arc<Node>> {
        if let Some(d) = device {
            if let Some(b) = self.find_backend(d) {
                return b
                    .root_node()
                    .ok_or_else(|| BlockError::generic(format!("Device '{d}' has no medium")));
            }
        }
        if let Some(n) = node_name {
            if let Some(node) = self.find_node(n) {
                return Ok(node);
            }
        }
        Err(BlockError::generic(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or(""),
            node_name.unwrap_or("")
        )))
    }

    /// Looks up `name` as a device first, then as a node (QEMU's `bdrv_lookup_bs(name,
    /// name)`).
    pub fn lookup_either(&self, name: &str) -> Result<Arc<Node>> {
        self.lookup(Some(name), Some(name))
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// A fresh generated node name (`#block` + counter + two random digits, as QEMU).
    pub(crate) fn generate_name(&mut self) -> String {
        loop {
            let r = self.next_random() % 100;
            let name = format!("#block{}{:02}", self.name_counter, r);
            self.name_counter += 1;
            if self.find_node(&name).is_none() {
                return name;
            }
        }
    }

    /// Checks a node name given by the user.
    pub(crate) fn check_new_node_name(&self, name: &str) -> Result<()> {
        if !id_wellformed(name) {
            return Err(BlockError::generic(format!("Invalid node-name: '{name}'")));
        }
        if self.find_backend(name).is_some() {
            return Err(BlockError::generic(format!(
                "node-name={name} is conflicting with a device id"
            )));
        }
        if self.find_node(name).is_some() {
            return Err(BlockError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        if name.len() >= 32 {
            return Err(BlockError::generic("Node name too long"));
        }
        Ok(())
    }

    /// `blockdev-add`: opens a node tree from options. Without `id`, `node-name` is
    /// mandatory and the monitor owns the new node (until `blockdev-del`); with `id` (QEMU
    /// 2.x form) a BlockBackend of that name is created on top of it.
    pub fn blockdev_add(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>> {
        if let Some(id) = &opts.id {
            crate::backend::check_new_device_name(self, id)?;
            let node = self.open_node(opts, &Inherit::top(), false)?;
            let be = BlockBackend::new_named(
                self,
                id,
                crate::backend::BackendOptions::from_blockdev(opts)?,
            )?;
            self.insert_medium_node(&be, &node)?;
            self.backends.push(be);
            return Ok(node);
        }
        if opts.node_name.is_none() {
            return Err(BlockError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let node = self.open_node(opts, &Inherit::top(), false)?;
        self.monitor_owned.push(node.clone());
        Ok(node)
    }

    /// Opens a node (and its children) from options. The node is registered; it lives as
    /// long as someone holds it (a parent edge, the monitor, a BlockBackend).
    pub fn open_node(
        &mut self,
        opts: &BlockdevOptions,
        inherit: &Inherit,
        implicit: bool,
    ) -> Result<Arc<Node>> {
        self.open_node_with(opts, inherit, implicit, crate::drivers::open_driver)
    }

    /// [`BlockGraph::open_node`] with the driver opened by `open` (for drivers the schema's
    /// `BlockdevOptions` cannot name yet, such as `throttle`; `opts` gives the generic
    /// options).
    pub(crate) fn open_node_with(
        &mut self,
        opts: &BlockdevOptions,
        inherit: &Inherit,
        implicit: bool,
        open: impl FnOnce(
            &mut crate::drivers::OpenCtx<'_>,
            &BlockdevOptions,
        ) -> Result<Box<dyn crate::driver::BlockDriver>>,
    ) -> Result<Arc<Node>> {
        if opts.id.is_some() && !inherit.top_level {
            return Err(BlockError::generic(
                "'id' is only allowed at the top level of blockdev-add",
            ));
        }
        let nopts = crate::options::node_options(opts, inherit)?;
        let name = match &opts.node_name {
            Some(n) => {
                self.check_new_node_name(n)?;
                n.clone()
            }
            None => self.generate_name(),
        };
        let events = self.events.clone();
        let mut ctx = crate::drivers::OpenCtx::new(self, name.clone(), nopts.clone(), events);
        let driver = open(&mut ctx, opts)?;
        let (children, backing_slot, corrupt_cell) = ctx.finish();
        // The name could have been taken by a child opened meanwhile.
        if self.find_node(&name).is_some() {
            return Err(BlockError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        let node = Node::new(
            name,
            driver,
            nopts,
            implicit,
            children,
            backing_slot,
            self.events.clone(),
        )?;
        let _ = corrupt_cell.set(Arc::downgrade(&node));
        self.nodes.push(Arc::downgrade(&node));
        if node.driver().supports_backing() {
            let r = self.open_backing_from_options(&node, opts);
            if let Err(e) = r {
                drop(node);
                self.prune();
                return Err(e);
            }
        }
        if let Err(e) = self.refresh_perms() {
            drop(node);
            self.prune();
            let _ = self.refresh_perms();
            return Err(e);
        }
        crate::drivers::load_persistent_bitmaps(&node)?;
        log::debug!("opened node '{}' ({})", node.name(), node.driver_name());
        Ok(node)
    }

    /// Attaches `child` to `parent` as its backing node (or detaches it with `None`),
    /// checking permissions; the parent is drained meanwhile.
    pub fn set_backing(&mut self, parent: &Arc<Node>, child: Option<&Arc<Node>>) -> Result<()> {
        if let Some(c) = child {
            if Arc::ptr_eq(c, parent) || self.is_descendant(c, parent) {
                return Err(BlockError::generic(format!(
                    "Making '{}' a backing child of '{}' would create a cycle",
                    c.name(),
                    parent.name()
                )));
            }
        }
        let _d = self.drain(std::slice::from_ref(parent));
        let old = parent.backing.get();
        let new_edge = child.map(|c| {
            let (p, s) = parent.driver().child_perm(
                ChildRole::Cow,
                Perm::NONE,
                Perm::ALL,
                !parent.is_read_only(),
            );
            let e = Edge::new("backing", ChildRole::Cow, c.clone(), p, s);
            e.set_parent(Parent::Node(Arc::downgrade(parent)));
            e
        });
        self.swap_backing_edge(parent, new_edge.clone());
        if let Err(e) = self.refresh_perms() {
            self.swap_backing_edge(parent, old);
            drop(new_edge);
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(())
    }

    fn swap_backing_edge(&self, parent: &Arc<Node>, e: Option<Arc<Edge>>) {
        let old = parent.backing.set(e.clone());
        let mut ch = crate::node::wlock(&parent.children);
        if let Some(o) = &old {
            ch.retain(|x| !Arc::ptr_eq(x, o));
        }
        if let Some(n) = e {
            ch.push(n);
        }
    }

    /// Whether `n` is `root` or below it.
    pub fn is_descendant(&self, root: &Arc<Node>, n: &Arc<Node>) -> bool {
        let mut stack = vec![root.clone()];
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            if Arc::ptr_eq(&x, n) {
                return true;
            }
            if seen.insert(Arc::as_ptr(&x)) {
                stack.extend(x.children().iter().map(|e| e.node()));
            }
        }
        false
    }

    /// Every node at or below `root`.
    pub fn subtree(&self, root: &Arc<Node>) -> Vec<Arc<Node>> {
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            if seen.insert(Arc::as_ptr(&x)) {
                stack.extend(x.children().iter().map(|e| e.node()));
                out.push(x);
            }
        }
        out
    }

    /// The roots (BlockBackends, jobs, temporary users) whose requests can reach any of
    /// `nodes`.
    pub fn roots_above(&self, nodes: &[Arc<Node>]) -> Vec<Arc<RootInfo>> {
        crate::node::roots_above(nodes)
    }

    /// Begins a drained section of `nodes`: every root above them stops admitting requests,
    /// and the call returns when none is in flight in them.
    pub fn drain(&self, nodes: &[Arc<Node>]) -> DrainGuard {
        let roots = self.roots_above(nodes);
        for r in &roots {
            r.gate.quiesce();
        }
        // Owners that issue requests on their own (jobs) stop at a safe point first: their
        // root's gate lets their requests through, as they may come from inside a drained
        // section (a job's last copy when it completes).
        let participants: Vec<_> = roots.iter().filter_map(|r| r.drain_participant()).collect();
        for p in &participants {
            p.drained_begin();
        }
        let start = std::time::Instant::now();
        let mut warned = false;
        while participants.iter().any(|p| p.drained_poll()) {
            if !warned && start.elapsed() > std::time::Duration::from_secs(5) {
                log::warn!("drain: still waiting for a job to reach a pause point");
                warned = true;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        for r in &roots {
            r.gate.wait_idle();
        }
        // Every request is counted at the root it entered by (a BlockBackend's gate, or the
        // gate a root edge's own requests pass, see `Edge`), so idle roots mean idle nodes.
        DrainGuard {
            roots,
            participants,
        }
    }

    /// Begins a drained section of `root` and everything below it.
    pub fn drain_subtree(&self, root: &Arc<Node>) -> DrainGuard {
        let nodes = self.subtree(root);
        self.drain(&nodes)
    }

    /// Replaces `old` by `new` for every parent of `old` (except edges inside `new`'s own
    /// subtree, such as `new`'s backing link to `old`), atomically: inside a drained
    /// section, with a permission check, undone completely on failure.
    pub fn replace_node(&mut self, old: &Arc<Node>, new: &Arc<Node>) -> Result<()> {
        if Arc::ptr_eq(old, new) {
            return Ok(());
        }
        let _d = self.drain(&[old.clone(), new.clone()]);
        let inside: HashSet<*const Edge> = self
            .subtree(new)
            .iter()
            .flat_map(|n| n.children())
            .map(|e| Arc::as_ptr(&e))
            .collect();
        let moved: Vec<Arc<Edge>> = old
            .parents()
            .into_iter()
            .filter(|e| !inside.contains(&Arc::as_ptr(e)))
            .collect();
        for e in &moved {
            e.replace_child(new.clone());
        }
        if let Err(err) = self.refresh_perms() {
            for e in &moved {
                e.replace_child(old.clone());
            }
            let _ = self.refresh_perms();
            return Err(err);
        }
        Ok(())
    }

    /// Recomputes every edge's permissions from the roots down and checks them; nothing is
    /// changed when a conflict is found. Call after any change of the graph's structure.
    pub fn refresh_perms(&self) -> Result<()> {
        let nodes = self.nodes();
        let order = topo_order(&nodes);
        let mut proposed: HashMap<*const Edge, (Perm, Perm)> = HashMap::new();
        let mut cumulative: Vec<(Arc<Node>, (Perm, Perm))> = Vec::with_capacity(order.len());
        for n in &order {
            let mut perm = Perm::NONE;
            let mut shared = Perm::ALL;
            let mut users = Vec::new();
            for e in n.parents() {
                let (p, s) = match e.parent() {
                    Some(Parent::Node(_)) => proposed
                        .get(&Arc::as_ptr(&e))
                        .copied()
                        .unwrap_or((e.perm(), e.shared())),
                    _ => (e.perm(), e.shared()),
                };
                perm |= p;
                shared = shared & s;
                users.push(PermUser {
                    desc: e.parent_desc(),
                    child_name: e.name().to_string(),
                    perm: p,
                    shared: s,
                });
            }
            check_conflicts(n.name(), &users).map_err(BlockError::PermissionConflict)?;
            if (perm.contains(Perm::WRITE) || perm.contains(Perm::WRITE_UNCHANGED))
                && n.is_read_only()
            {
                return Err(BlockError::PermissionConflict(
                    "Block node is read-only".into(),
                ));
            }
            if (perm, shared) != n.cumulative_perm() {
                n.driver().check_perm(perm, shared)?;
            }
            cumulative.push((n.clone(), (perm, shared)));
            for c in n.children() {
                let (p, mut s) = n
                    .driver()
                    .child_perm(c.role(), perm, shared, !n.is_read_only());
                if n.options().force_share {
                    s = Perm::ALL;
                }
                proposed.insert(Arc::as_ptr(&c), (p, s));
            }
        }
        for (n, c) in &cumulative {
            if *c != n.cumulative_perm() {
                n.driver().set_perm(c.0, c.1);
            }
            *mlock(&n.cumulative) = *c;
            for e in n.children() {
                if let Some((p, s)) = proposed.get(&Arc::as_ptr(&e)) {
                    e.set_perm(*p, *s);
                }
            }
        }
        Ok(())
    }

    /// `blockdev-del`: deletes a node added with `blockdev-add`.
    pub fn blockdev_del(&mut self, node_name: &str) -> Result<()> {
        let Some(node) = self.find_node(node_name) else {
            return Err(BlockError::generic(format!(
                "Failed to find node with node-name='{node_name}'"
            )));
        };
        // QEMU's `bdrv_has_blk`: any BlockBackend (a root parent), a job's anonymous ones
        // included.
        let has_blk = node
            .parents()
            .iter()
            .any(|e| matches!(e.parent(), Some(Parent::Root(_))));
        if has_blk {
            return Err(BlockError::generic(format!("Node {node_name} is in use")));
        }
        self.check_op_blockers(&node)?;
        let Some(i) = self
            .monitor_owned
            .iter()
            .position(|n| Arc::ptr_eq(n, &node))
        else {
            return Err(BlockError::generic(format!(
                "Node {node_name} is not owned by the monitor"
            )));
        };
        if !node.parents().is_empty() {
            return Err(BlockError::generic(format!(
                "Block device {node_name} is in use"
            )));
        }
        self.monitor_owned.remove(i);
        drop(node);
        self.prune();
        let _ = self.refresh_perms();
        Ok(())
    }

    /// The BlockBackend whose medium `node` is, if any.
    pub fn backend_of(&self, node: &Arc<Node>) -> Option<Arc<BlockBackend>> {
        self.backends
            .iter()
            .find(|b| b.root_node().is_some_and(|r| Arc::ptr_eq(&r, node)))
            .cloned()
    }

    /// QEMU's `bdrv_get_device_or_node_name`: the backend's name when `n` is a medium.
    pub fn device_or_node_name(&self, n: &Arc<Node>) -> String {
        self.backend_of(n)
            .map(|b| b.name().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| n.name().to_string())
    }

    /// Whether the monitor owns `node` (it was added with `blockdev-add` without `id`).
    pub fn is_monitor_owned(&self, node: &Arc<Node>) -> bool {
        self.monitor_owned.iter().any(|n| Arc::ptr_eq(n, node))
    }

    /// Gives the monitor a reference to `node` (as if it had been added with
    /// `blockdev-add`), for nodes a command creates (`blockdev-snapshot-sync`'s overlay).
    pub fn adopt(&mut self, node: &Arc<Node>) {
        if !self.is_monitor_owned(node) {
            self.monitor_owned.push(node.clone());
        }
    }

    /// Drops the monitor's reference to `node`.
    pub fn disown(&mut self, node: &Arc<Node>) {
        self.monitor_owned.retain(|n| !Arc::ptr_eq(n, node));
        self.prune();
    }

    /// Makes `node` and the children that inherited its read-write mode read-only (QEMU
    /// does this to the old image after an external snapshot).
    pub fn reopen_read_only(&mut self, node: &Arc<Node>) -> Result<()> {
        let _d = self.drain(std::slice::from_ref(node));
        let mut todo = vec![node.clone()];
        let mut done = Vec::new();
        while let Some(n) = todo.pop() {
            if n.is_read_only() {
                continue;
            }
            // Children first see no writer once the parent is read-only; children shared
            // with writable users stay as they are.
            n.reopen_read_only()?;
            done.push(n.clone());
            for c in n.children() {
                if c.name() == "backing" {
                    continue;
                }
                let cn = c.node();
                let other_writer = cn
                    .parents()
                    .iter()
                    .any(|e| !Arc::ptr_eq(e, &c) && e.perm().contains(Perm::WRITE));
                if !other_writer && cn.parents().len() == 1 {
                    todo.push(cn);
                }
            }
        }
        self.refresh_perms()
    }

    /// Flushes every node (for shutdown).
    pub fn flush_all(&self) -> Result<()> {
        let mut first = Ok(());
        for n in self.nodes() {
            if let Err(e) = n.flush() {
                log::error!("flushing '{}' failed: {e}", n.name());
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Closes everything: BlockBackends lose their media and every node is closed
    /// (persistent bitmaps stored, caches written, the image left clean) and made read-only,
    /// even if something outside the graph still holds it.
    pub fn close_all(&mut self) {
        for b in std::mem::take(&mut self.backends) {
            b.detach_root();
        }
        self.monitor_owned.clear();
        // Nodes someone else still holds are closed too (parents before their children,
        // which they write through), and refuse writes from now on.
        for n in topo_order(&self.nodes()) {
            n.close();
        }
        self.prune();
    }
}

impl Drop for BlockGraph {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Nodes ordered parents first.
fn topo_order(nodes: &[Arc<Node>]) -> Vec<Arc<Node>> {
    let mut post: Vec<Arc<Node>> = Vec::with_capacity(nodes.len());
    let mut seen: HashSet<*const Node> = HashSet::new();
    for n in nodes {
        if seen.contains(&Arc::as_ptr(n)) {
            continue;
        }
        // Iterative DFS with an explicit stack of (node, children visited?).
        let mut stack: Vec<(Arc<Node>, bool)> = vec![(n.clone(), false)];
        while let Some((x, expanded)) = stack.pop() {
            if expanded {
                post.push(x);
                continue;
            }
            if !seen.insert(Arc::as_ptr(&x)) {
                continue;
            }
            stack.push((x.clone(), true));
            for e in x.children() {
                let c = e.node();
                if !seen.contains(&Arc::as_ptr(&c)) {
                    stack.push((c, false));
                }
            }
        }
    }
    post.reverse();
    post
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wellformed_names() {
        assert!(id_wellformed("disk0"));
        assert!(id_wellformed("a.b-c_d"));
        assert!(!id_wellformed("#block1"));
        assert!(!id_wellformed("0abc"));
        assert!(!id_wellformed(""));
    }

    #[test]
    fn generated_names_look_like_qemus() {
        let mut g = BlockGraph::new();
        let a = g.generate_name();
        let b = g.generate_name();
        assert!(a.starts_with("#block0") && a.len() == 9, "{a}");
        assert!(b.starts_with("#block1") && b.len() == 9, "{b}");
    }
}
