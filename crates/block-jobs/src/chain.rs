//! Helpers the jobs share: walking backing chains (QEMU's `bdrv_filter_or_cow_bs`,
//! `bdrv_chain_contains`, `bdrv_find_backing_image`), a job's root on a node
//! ([`JobRoot`]: I/O through the root's gate, as drain requires), and the exclusive section
//! that keeps other writers of a node out while a job copies a range into it.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use block_graph::node::Parent;
use block_graph::{
    BlockBackend, BlockError, BlockGraph, Node, Perm, RootInfo, WriteFlags, ZeroFlags,
};

use crate::error::{JobError, Result};

/// The node below `n` in its chain: its backing node, or a filter's filtered child.
pub fn below(n: &Arc<Node>) -> Option<Arc<Node>> {
    if let Some(b) = n.backing() {
        return Some(b.node());
    }
    if n.driver().is_filter() {
        return n.primary_child().map(|e| e.node());
    }
    None
}

/// Whether `n` is `top` or in its chain.
pub fn chain_contains(top: &Arc<Node>, n: &Arc<Node>) -> bool {
    let mut cur = Some(top.clone());
    let mut steps = 0usize;
    while let Some(c) = cur {
        if Arc::ptr_eq(&c, n) {
            return true;
        }
        steps += 1;
        if steps > 4096 {
            return false;
        }
        cur = below(&c);
    }
    false
}

/// The nodes from `top` down to `base` (excluded; the whole chain without base).
pub fn chain_until(top: &Arc<Node>, base: Option<&Arc<Node>>) -> Vec<Arc<Node>> {
    let mut out = Vec::new();
    let mut cur = Some(top.clone());
    while let Some(c) = cur {
        if base.is_some_and(|b| Arc::ptr_eq(b, &c)) || out.len() > 4096 {
            break;
        }
        cur = below(&c);
        out.push(c);
    }
    out
}

/// The deepest node of the chain (QEMU's `bdrv_find_base`); `None` if `top` has no
/// backing node.
pub fn find_base(top: &Arc<Node>) -> Option<Arc<Node>> {
    let mut cur = top.backing()?.node();
    while let Some(b) = cur.backing() {
        cur = b.node();
    }
    Some(cur)
}

/// The node whose backing node is `n`, searched from `top` down (QEMU's
/// `bdrv_find_overlay`).
pub fn find_overlay(top: &Arc<Node>, n: &Arc<Node>) -> Option<Arc<Node>> {
    let mut cur = top.clone();
    loop {
        let next = below(&cur)?;
        if Arc::ptr_eq(&next, n) {
            return Some(cur);
        }
        cur = next;
    }
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| p.to_string())
}

/// QEMU's `bdrv_find_backing_image`: the backing node below `top` that `name` designates,
/// matched against the backing file name each image records, or the file names.
pub fn find_backing_image(top: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    let mut cur = top.clone();
    let want = canonical(name);
    loop {
        let b = cur.backing()?.node();
        let recorded = cur.driver().backing_file().map(|(f, _)| f);
        if recorded.as_deref() == Some(name) {
            return Some(b);
        }
        let file = block_graph::filename::node_filename(&b);
        if file == name || (!want.is_empty() && canonical(&file) == want) {
            return Some(b);
        }
        if let Some(r) = recorded {
            let base = block_graph::filename::base_filename(&cur);
            if let Ok(full) = block_graph::drivers::full_backing_filename(&base, &r) {
                let rel = block_graph::drivers::full_backing_filename(&base, name)
                    .map(|p| canonical(&p))
                    .unwrap_or_default();
                if canonical(&full) == want || (!rel.is_empty() && canonical(&full) == rel) {
                    return Some(b);
                }
            }
        }
        cur = b;
    }
}

/// The roots (BlockBackends, other jobs) whose requests can reach `node`, except `mine`.
pub fn other_roots(node: &Arc<Node>, mine: &Arc<RootInfo>) -> Vec<Arc<RootInfo>> {
    let mut roots: Vec<Arc<RootInfo>> = Vec::new();
    let mut stack = vec![node.clone()];
    let mut seen: Vec<*const Node> = Vec::new();
    while let Some(n) = stack.pop() {
        if seen.contains(&Arc::as_ptr(&n)) || seen.len() > 4096 {
            continue;
        }
        seen.push(Arc::as_ptr(&n));
        for e in n.parents() {
            match e.parent() {
                Some(Parent::Node(w)) => {
                    if let Some(p) = w.upgrade() {
                        stack.push(p);
                    }
                }
                Some(Parent::Root(r))
                    if !Arc::ptr_eq(r, mine) && !roots.iter().any(|x| Arc::ptr_eq(x, r)) =>
                {
                    roots.push(r.clone());
                }
                _ => {}
            }
        }
    }
    roots
}

/// Other writers of a node held back (their requests in flight finished, new ones wait)
/// while it lives: a job's copy into a node the guest also writes cannot overwrite a newer
/// guest write (QEMU serialises copy-on-read requests against overlapping writes).
pub struct Exclusive {
    roots: Vec<Arc<RootInfo>>,
}

impl Exclusive {
    /// Holds back every root above `node` but `mine`.
    pub fn enter(node: &Arc<Node>, mine: &Arc<RootInfo>) -> Exclusive {
        let roots = other_roots(node, mine);
        for r in &roots {
            r.gate().quiesce();
        }
        for r in &roots {
            r.gate().wait_idle();
        }
        Exclusive { roots }
    }

    /// Whether anyone else could write meanwhile (no root was held back).
    pub fn is_alone(&self) -> bool {
        self.roots.is_empty()
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        for r in &self.roots {
            r.gate().unquiesce();
        }
    }
}

/// A job's root on a node: an anonymous BlockBackend whose I/O goes straight to its edge
/// (no accounting, no `werror`/`rerror`), through its gate so that drained sections wait
/// for the job's requests.
#[derive(Clone)]
pub struct JobRoot {
    be: Arc<BlockBackend>,
}

impl std::fmt::Debug for JobRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRoot")
            .field("node", &self.be.root_node().map(|n| n.name().to_string()))
            .finish()
    }
}

impl JobRoot {
    /// Takes a root on `node` with `perm`, sharing `shared`, described as `desc` in
    /// permission errors (QEMU: "stream job 'job0'").
    pub fn new(
        g: &mut BlockGraph,
        node: &Arc<Node>,
        perm: Perm,
        shared: Perm,
        desc: &str,
    ) -> Result<JobRoot> {
        Ok(JobRoot {
            be: g.new_root(node, perm, shared, desc)?,
        })
    }

    /// The root's identity (for [`Exclusive::enter`]).
    pub fn info(&self) -> &Arc<RootInfo> {
        self.be.root_info()
    }

    /// The node the root uses.
    pub fn node(&self) -> Result<Arc<Node>> {
        self.be
            .root_node()
            .ok_or_else(|| JobError::Block(BlockError::errno(libc::ENOMEDIUM)))
    }

    fn edge(&self) -> std::result::Result<Arc<block_graph::Edge>, BlockError> {
        self.be
            .root_edge()
            .ok_or_else(|| BlockError::errno(libc::ENOMEDIUM))
    }

    /// The node's length.
    pub fn length(&self) -> u64 {
        self.be.length()
    }

    /// Reads `buf` at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), BlockError> {
        let _g = self.be.root_info().gate().enter();
        self.edge()?.read(offset, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), BlockError> {
        let _g = self.be.root_info().gate().enter();
        self.edge()?
            .write(offset, &[IoSlice::new(buf)], WriteFlags::default())
    }

    /// Makes `[offset, offset + len)` read as zero.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::result::Result<(), BlockError> {
        let _g = self.be.root_info().gate().enter();
        self.edge()?.write_zeroes(offset, len, ZeroFlags::default())
    }

    /// Resizes the node (needs the resize permission).
    pub fn truncate(&self, len: u64) -> std::result::Result<(), BlockError> {
        let _g = self.be.root_info().gate().enter();
        self.edge()?.truncate(len)
    }

    /// Flushes the node.
    pub fn flush(&self) -> std::result::Result<(), BlockError> {
        let _g = self.be.root_info().gate().enter();
        self.edge()?.flush()
    }

    /// Releases the root (monitor's thread).
    pub fn release(self, g: &mut BlockGraph) {
        g.release_root(&self.be);
    }
}
