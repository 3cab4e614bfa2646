//! Reopening nodes read-write and back (QEMU's `bdrv_reopen` of the `read-only` option):
//! block-commit writes into a backing node that was opened read-only and restores it
//! afterwards; snapshots make the old active layer read-only.

use std::collections::HashSet;
use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::Node;
use crate::perm::ChildRole;

impl BlockGraph {
    /// Makes `node` writable, with the children it writes through (`file`, `data-file`,
    /// a filter's child; never its backing chain), inside a drained section, and refreshes
    /// the permissions. Children are reopened before their parents; when anything fails,
    /// every node reopened so far is made read-only again and the error is returned.
    ///
    /// Returns the nodes that changed (children first), for
    /// [`BlockGraph::restore_read_only`] once the writer is done.
    pub fn reopen_read_write(&mut self, node: &Arc<Node>) -> Result<Vec<Arc<Node>>> {
        let _d = self.drain_subtree(node);
        let order = writable_closure(node);
        let mut done: Vec<Arc<Node>> = Vec::new();
        for n in &order {
            if !n.is_read_only() {
                continue;
            }
            if let Err(e) = n.reopen_read_write() {
                self.undo_read_write(&done);
                return Err(e.prepend(&format!("Cannot make node '{}' writable", n.name())));
            }
            done.push(n.clone());
        }
        if let Err(e) = self.refresh_perms() {
            self.undo_read_write(&done);
            return Err(e);
        }
        log::debug!(
            "reopened read-write: {:?}",
            done.iter().map(|n| n.name()).collect::<Vec<_>>()
        );
        Ok(done)
    }

    /// Makes the nodes a [`BlockGraph::reopen_read_write`] changed read-only again (parents
    /// first: their cached metadata is written through the children while these are still
    /// writable). The permissions are refreshed even when one of them fails; the first
    /// error is returned.
    pub fn restore_read_only(&mut self, changed: &[Arc<Node>]) -> Result<()> {
        let nodes: Vec<Arc<Node>> = changed.iter().rev().cloned().collect();
        let _d = self.drain(&nodes);
        let mut first: Result<()> = Ok(());
        for n in &nodes {
            if let Err(e) = n.reopen_read_only() {
                log::error!("reopening '{}' read-only failed: {e}", n.name());
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        let r = self.refresh_perms();
        first.and(r)
    }

    /// Sets the `read-only` flag of `node` either way (QEMU's `blockdev-reopen` of that one
    /// option). Read-only is refused while a parent holds the write permission.
    pub fn reopen_set_read_only(&mut self, node: &Arc<Node>, read_only: bool) -> Result<()> {
        if !read_only {
            return self.reopen_read_write(node).map(|_| ());
        }
        if let Some(e) = node
            .parents()
            .into_iter()
            .find(|e| e.perm().contains(crate::perm::Perm::WRITE))
        {
            return Err(BlockError::PermissionConflict(format!(
                "Block node '{}' is used for writing by {}",
                node.name(),
                e.parent_desc()
            )));
        }
        self.reopen_read_only(node)
    }

    fn undo_read_write(&mut self, done: &[Arc<Node>]) {
        for n in done.iter().rev() {
            if let Err(e) = n.reopen_read_only() {
                log::error!("undoing the reopen of '{}' failed: {e}", n.name());
            }
        }
        let _ = self.refresh_perms();
    }
}

/// `node` and the children it writes through, children before parents.
fn writable_closure(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut post = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(node.clone(), false)];
    while let Some((n, expanded)) = stack.pop() {
        if expanded {
            post.push(n);
            continue;
        }
        if !seen.insert(Arc::as_ptr(&n)) {
            continue;
        }
        stack.push((n.clone(), true));
        for c in n.children() {
            if c.role() != ChildRole::Cow {
                stack.push((c.node(), false));
            }
        }
    }
    post
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::WriteFlags;
    use crate::perm::Perm;
    use qapi_types::{BlockdevOptions, QapiType};
    use serde_json::json;

    fn qemu_img(args: &[&str]) {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img");
        assert!(st.success(), "qemu-img {args:?}");
    }

    fn add(g: &mut BlockGraph, v: serde_json::Value) -> Arc<Node> {
        g.blockdev_add(&BlockdevOptions::from_qmp_strict(v).unwrap())
            .unwrap()
    }

    #[test]
    fn backing_node_becomes_writable_and_read_only_again() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", b, "1M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
        {
            let mut g = BlockGraph::new();
            let top = add(
                &mut g,
                json!({"driver": "qcow2", "node-name": "top",
                       "file": {"driver": "file", "filename": t}}),
            );
            let base = top.backing().unwrap().node();
            assert!(base.is_read_only());
            // A writer on the read-only base is refused.
            let err = g
                .new_root(
                    &base,
                    Perm::WRITE | Perm::CONSISTENT_READ,
                    Perm::ALL,
                    "a job",
                )
                .unwrap_err();
            assert!(err.to_string().contains("read-only"), "{err}");

            let changed = g.reopen_read_write(&base).unwrap();
            assert_eq!(changed.len(), 2, "the qcow2 node and its file");
            assert!(!base.is_read_only());
            let be = g
                .new_root(
                    &base,
                    Perm::WRITE | Perm::CONSISTENT_READ,
                    Perm::ALL,
                    "a job",
                )
                .unwrap();
            be.write_buf(65536, &[0x5a; 4096], WriteFlags::default())
                .unwrap();
            be.flush().unwrap();
            // Read back through the top's backing chain.
            let reader = g
                .new_root(&top, Perm::CONSISTENT_READ, Perm::ALL, "a reader")
                .unwrap();
            let mut buf = vec![0u8; 4096];
            reader.read_buf(65536, &mut buf).unwrap();
            assert_eq!(buf, vec![0x5a; 4096]);

            // Read-only again is refused while the writer holds its permission.
            assert!(g.reopen_set_read_only(&base, true).is_err());
            g.release_root(&be);
            g.restore_read_only(&changed).unwrap();
            assert!(base.is_read_only());
            assert!(changed.iter().all(|n| n.is_read_only()));
            assert!(g.new_root(&base, Perm::WRITE, Perm::ALL, "a job").is_err());
            g.release_root(&reader);
        }
        qemu_img(&["check", "-q", b]);
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-c", "read -P 0x5a 65536 4096", b])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("read 4096/4096"), "{s}");
    }

    #[test]
    fn raw_file_node_reopens_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        std::fs::write(&p, vec![0u8; 1 << 16]).unwrap();
        let mut g = BlockGraph::new();
        let n = add(
            &mut g,
            json!({"driver": "raw", "node-name": "r", "read-only": true,
                   "file": {"driver": "file", "filename": p.to_str().unwrap()}}),
        );
        assert!(n.is_read_only());
        g.reopen_set_read_only(&n, false).unwrap();
        let be = g
            .new_root(&n, Perm::WRITE | Perm::CONSISTENT_READ, Perm::ALL, "w")
            .unwrap();
        be.write_buf(512, &[3u8; 512], WriteFlags::default())
            .unwrap();
        g.release_root(&be);
        g.reopen_set_read_only(&n, true).unwrap();
        assert!(n.is_read_only());
        drop(n);
        drop(g);
        assert_eq!(std::fs::read(&p).unwrap()[512..1024], [3u8; 512]);
    }
}
