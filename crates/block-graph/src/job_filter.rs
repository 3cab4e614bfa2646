//! The filter a block job inserts above the top of the chain it works on (QEMU's
//! `commit_top` and `mirror_top`): requests pass through unchanged, but the filter shares
//! every permission on its child, so the backing chain below becomes writable for the job
//! even while a guest device (which does not share `write`) uses the chain from above.
//! The job later replaces the filter by the node that takes over (the commit's base on
//! completion) or by the original node (abort), with [`BlockGraph::replace_job_filter`].

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use qapi_types::QapiType;

use crate::driver::{BlockDriver, DriverStatus, WriteFlags, ZeroFlags};
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
        Ok(DriverStatus::delegate(&self.file, offset, len))
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.file.truncate(len)
    }

    fn image_info(&self) -> crate::driver::DriverImageInfo {
        crate::drivers::info_of_child(&self.file)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceAttach;
    use serde_json::json;

    #[test]
    fn filter_shares_everything_below_a_device_and_goes_away() {
        let mut g = BlockGraph::new();
        let o = qapi_types::BlockdevOptions::from_qmp_strict(
            json!({"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        )
        .unwrap();
        let n0 = g.blockdev_add(&o).unwrap();
        let be = g
            .create_backend("disk0", Some(&n0), Default::default())
            .unwrap();
        g.attach_device(
            &be,
            DeviceAttach {
                resizable: false,
                ..DeviceAttach::disk("vd0")
            },
        )
        .unwrap();
        // The device does not share write: a second writer is refused...
        assert!(g.new_root(&n0, Perm::WRITE, Perm::ALL, "job").is_err());
        // ...until the filter stands between them.
        let f = g.insert_job_filter(&n0, "mirror_top").unwrap();
        assert!(f.is_implicit() && f.driver().is_filter());
        assert!(Arc::ptr_eq(&be.root_node().unwrap(), &f));
        let job = g.new_root(&n0, Perm::WRITE, Perm::ALL, "job").unwrap();
        be.write_buf(0, &[7u8; 512], WriteFlags::default()).unwrap();
        let mut b = [0u8; 512];
        job.read_buf(0, &mut b).unwrap();
        g.release_root(&job);
        g.replace_job_filter(&f, &n0).unwrap();
        assert!(Arc::ptr_eq(&be.root_node().unwrap(), &n0));
        drop(f);
        assert!(g.nodes().iter().all(|n| n.name() == "n0"));
    }
}
