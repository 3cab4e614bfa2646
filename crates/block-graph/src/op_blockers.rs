//! Operations refused on nodes that something else is busy with (QEMU's op blockers): the
//! graph's own reason (a node used as another's backing node), and those other crates add
//! through [`OpBlockers`] (a block job's nodes).

use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::{Node, Parent};

/// A source of reasons to refuse changes to a node, installed with
/// [`BlockGraph::set_op_blockers`]. The commands that change a node (external and internal
/// snapshots, `change-backing-file`, `blockdev-del`, removing a medium) ask it first, as
/// QEMU's `bdrv_op_is_blocked` does for a block job's nodes.
pub trait OpBlockers: Send + Sync {
    /// Why `node` must not be changed now (QEMU's blocker text, such as "block device is
    /// in use by block job: mirror"), or `None`.
    fn blocker(&self, node: &Arc<Node>) -> Option<String>;
}

impl BlockGraph {
    /// Installs the source of op blockers (replaces an earlier one).
    pub fn set_op_blockers(&mut self, b: Option<Arc<dyn OpBlockers>>) {
        self.op_blockers = b;
    }

    /// Refuses to change `node` while something blocks it: an installed [`OpBlockers`]
    /// (checked first: QEMU lists the newest blocker first), or a parent using it as its
    /// backing node. "Node 'x' is busy: REASON", QEMU's message.
    pub fn check_op_blockers(&self, node: &Arc<Node>) -> Result<()> {
        let reason = self
            .op_blockers
            .as_ref()
            .and_then(|b| b.blocker(node))
            .or_else(|| self.backing_blocker(node));
        match reason {
            Some(reason) => Err(BlockError::generic(format!(
                "Node '{}' is busy: {reason}",
                self.device_or_node_name(node)
            ))),
            None => Ok(()),
        }
    }

    /// QEMU's backing blocker: "node is used as backing hd of 'parent'".
    fn backing_blocker(&self, node: &Arc<Node>) -> Option<String> {
        node.parents().iter().find_map(|e| match e.parent() {
            Some(Parent::Node(w)) if e.name() == "backing" => {
                let user = w.upgrade().map(|p| self.device_or_node_name(&p));
                Some(format!(
                    "node is used as backing hd of '{}'",
                    user.unwrap_or_default()
                ))
            }
            _ => None,
        })
    }
}
