//! The filter a block job inserts above the top of the chain it works on (QEMU's
//! `commit_top` and `mirror_top`): requests pass through unchanged, but the filter shares
//! every permission on its child, so the backing chain below becomes writable for the job
//! even while a guest device (which does not share `write`) uses the chain from above.
//! The job later replaces the filter by the node that takes over (the commit's base on
//! completion) or by the original node (abort), with [`BlockGraph::replace_job_filter`].

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use qapi_types::QapiType;

use crate::driver::{BlockDriver, DriverStatus, StatusKind, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::{Edge, Node};
use crate::options::Inherit;
use crate::perm::{ChildRole, Perm};

/// The driver of a job's top filter.
pub struct JobFilter {
    name: &'static str,
    file: Arc<Edge>,
}

impl BlockDriver for JobFilter {
    fn format_name(&self) -> &'static str {
        self.name
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
        self.file.write(offset, iov, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.file.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus {
            len,
            kind: StatusKind::Delegate {
                child: self.file.clone(),
                offset,
            },
        })
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.file.truncate(len)
    }

    fn child_perm(
        &self,
        _role: ChildRole,
        perm: Perm,
        _shared: Perm,
        _writable: bool,
    ) -> (Perm, Perm) {
        // What the parents do passes through; everything is shared, so that the job may
        // write the chain below (QEMU's bdrv_mirror_top_child_perm).
        (perm & Perm::PASSTHROUGH, Perm::ALL)
    }
}

impl BlockGraph {
    /// Inserts a job filter named by driver `kind` (`"commit_top"`, `"mirror_top"`) above
    /// `node`: every parent of `node` then uses the filter. The filter is implicit (hidden
    /// from `query-block`) and gets a generated node name.
    pub fn insert_job_filter(&mut self, node: &Arc<Node>, kind: &'static str) -> Result<Arc<Node>> {
        let opts = qapi_types::BlockdevOptions::from_qmp(
            serde_json::json!({"driver": "raw", "file": node.name()}),
            &mut qapi_types::Decoder::strict(),
        )
        .map_err(|e| BlockError::generic(e.to_string()))?;
        let child = node.clone();
        let filter = self.open_node_with(&opts, &Inherit::top(), true, move |ctx, _| {
            let file = ctx.attach("file", child, ChildRole::Filtered)?;
            Ok(Box::new(JobFilter { name: kind, file }))
        })?;
        if let Err(e) = self.replace_node(node, &filter) {
            drop(filter);
            self.prune();
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(filter)
    }

    /// Replaces a job filter by `by` (its child to undo the insertion, or the node that
    /// takes over): every parent of the filter then uses `by`, and the filter goes away.
    pub fn replace_job_filter(&mut self, filter: &Arc<Node>, by: &Arc<Node>) -> Result<()> {
        self.replace_node(filter, by)?;
        self.prune();
        let _ = self.refresh_perms();
        Ok(())
    }
}
