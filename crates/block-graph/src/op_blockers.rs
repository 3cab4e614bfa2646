//! Operations refused on nodes that something else is busy with (QEMU's op blockers). The
//! graph's own reasons (a backing node) are checked where they arise; other crates add
//! theirs through [`OpBlockers`] (a block job's nodes).

use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::Node;

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

    /// Refuses to change `node` while an installed [`OpBlockers`] blocks it: "Node 'x' is
    /// busy: REASON", QEMU's message.
    pub fn check_op_blockers(&self, node: &Arc<Node>) -> Result<()> {
        match self.op_blockers.as_ref().and_then(|b| b.blocker(node)) {
            Some(reason) => Err(BlockError::generic(format!(
                "Node '{}' is busy: {reason}",
                self.device_or_node_name(node)
            ))),
            None => Ok(()),
        }
    }
}
