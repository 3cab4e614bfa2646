//! The mirror job (`drive-mirror`, `blockdev-mirror`): copies a device's data to a target
//! while the guest keeps writing, tracks those writes in a dirty bitmap on the source and
//! copies them again, reports `BLOCK_JOB_READY` once source and target converged, and on
//! `block-job-complete` switches every user of the source to the target in one drained
//! section. Cancelled after READY, it ends without the switch (the target then holds a
//! point-in-time copy of the moment of the cancel).
//!
//! # Copying
//!
//! The job's thread walks the dirty bitmap and hands runs of dirty granules (aligned to the
//! target's cluster size, at most `buf-size / 16` and at least 1 MiB each, as QEMU) to a
//! pool of copy threads, keeping at most `buf-size` bytes and 16 runs in flight. A run's
//! bits are cleared before its source is read: a guest write that lands meanwhile sets them
//! again (the node marks the bitmap after its write completed), so the run is copied again.
//! A run is first offered to the kernel ([`block_graph::copy_range`]: `copy_file_range(2)`
//! where source and target resolve to host files); what it leaves (zeros, compressed
//! clusters, other drivers) is read and written. Runs that read as zero become
//! write-zeroes requests (unmapping with `unmap`), and the first pass skips what the source
//! does not allocate and the target already reads as zero.

mod args;
mod complete;
mod copy_loop;
mod pool;

use std::sync::Arc;

use block_graph::{BlockBackend, BlockGraph, DirtyBitmap, Node, Perm};
use qapi_types::MirrorSyncMode;

use crate::engine::Job;
use crate::error::{JobError, Result};
use crate::Jobs;

pub use args::{
    blockdev_mirror, check_sizes, default_granularity, drive_mirror, open_new_target, skip_filters,
    CopyOptions,
};
pub(crate) use pool::{Pool, Run};

/// QEMU 2.x's default `buf-size` (`DEFAULT_MIRROR_BUF_SIZE`).
pub const DEFAULT_BUF_SIZE: u64 = 10 << 20;
/// Runs in flight at most (QEMU's `MAX_IN_FLIGHT`).
pub const MAX_IN_FLIGHT: usize = 16;
/// The smallest run size (QEMU's `MAX_IO_BYTES`).
pub const MIN_RUN: u64 = 1 << 20;

/// Where the target's backing chain comes from when the job completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingMode {
    /// The target keeps its own chain (`blockdev-mirror`, `sync=full`).
    Leave,
    /// The target gets the source's backing node (`sync=top`) or the source itself
    /// (`sync=none`) as its backing node when it replaces the source (`drive-mirror`).
    FromSource,
}

/// Everything a mirror job needs, checked.
#[derive(Debug, Clone)]
pub struct MirrorParams {
    /// The job id.
    pub job_id: String,
    /// The node whose data is copied (a root node).
    pub source: Arc<Node>,
    /// The node written.
    pub target: Arc<Node>,
    /// The node the target replaces on completion (default: the source).
    pub replaces: Option<Arc<Node>>,
    /// `full`, `top` or `none`.
    pub sync: MirrorSyncMode,
    /// Bytes per dirty bit.
    pub granularity: u64,
    /// Bytes in flight at most.
    pub buf_size: u64,
    /// Unmap target ranges where the source reads as zero.
    pub unmap: bool,
    /// What the target's backing node becomes.
    pub backing_mode: BackingMode,
    /// Error policies and job options.
    pub opts: CopyOptions,
}

/// Creates and starts a mirror job.
pub fn start(g: &mut BlockGraph, jobs: &Jobs, p: MirrorParams) -> Result<Arc<Job>> {
    if Arc::ptr_eq(&p.source, &p.target) {
        return Err(JobError::generic("Can't mirror node into itself"));
    }
    if p.target.length() != p.source.length() {
        return Err(JobError::generic(format!(
            "Source and target image have different sizes ({} and {} bytes)",
            p.source.length(),
            p.target.length()
        )));
    }
    let mut spec = p
        .opts
        .spec(&p.job_id, vec![p.source.clone(), p.target.clone()]);
    jobs.check_spec(g, &spec)?;
    let bitmap = Arc::new(DirtyBitmap::new("", p.granularity, p.source.length())?);
    // QEMU's mirror_top: every user of the source now goes through the filter, which the
    // job removes again when it ends (taking the target along on completion).
    let filter = g.insert_job_filter(&p.source, "mirror_top")?;
    spec.nodes.push(filter.clone());
    let mut mirror = Mirror {
        p,
        src_root: None,
        tgt_root: None,
        bitmap,
        filter: Some(filter),
    };
    if let Err(e) = mirror.setup(g) {
        mirror.release(g);
        return Err(e);
    }
    let job = jobs.create(g, spec, Box::new(mirror))?;
    jobs.start(&job);
    Ok(job)
}

/// A mirror job: its parameters, the roots it reads the source and writes the target
/// through, and the dirty bitmap it keeps on the source.
struct Mirror {
    p: MirrorParams,
    src_root: Option<Arc<BlockBackend>>,
    tgt_root: Option<Arc<BlockBackend>>,
    bitmap: Arc<DirtyBitmap>,
    /// The `mirror_top` filter above the source while the job runs.
    filter: Option<Arc<Node>>,
}

impl Mirror {
    /// The job's roots on the source (through the filter, as QEMU's job reads through
    /// `mirror_top`) and on the target, and its dirty bitmap on the source.
    fn setup(&mut self, g: &mut BlockGraph) -> Result<()> {
        let desc = format!("mirror job '{}'", self.p.job_id);
        let top = self.filter.clone().unwrap_or_else(|| self.p.source.clone());
        self.src_root = Some(g.new_root(
            &top,
            Perm::CONSISTENT_READ,
            Perm::ALL & !Perm::RESIZE,
            &desc,
        )?);
        self.tgt_root = Some(g.new_root(
            &self.p.target,
            Perm::WRITE | Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            &desc,
        )?);
        self.p.source.add_bitmap(self.bitmap.clone())?;
        Ok(())
    }

    /// Releases the job's roots and takes the filter out (after a failed
    /// [`Mirror::setup`], and when the job is cleaned up).
    fn release(&mut self, g: &mut BlockGraph) {
        for r in [self.src_root.take(), self.tgt_root.take()]
            .into_iter()
            .flatten()
        {
            g.release_root(&r);
        }
        self.remove_filter(g);
    }

    /// Takes the `mirror_top` filter out: its users then use what is below it (the source,
    /// or the target once it replaced the source).
    fn remove_filter(&mut self, g: &mut BlockGraph) {
        let Some(f) = self.filter.take() else { return };
        let below = f.primary_child().map(|e| e.node());
        let below = below.unwrap_or_else(|| self.p.source.clone());
        if let Err(e) = g.replace_job_filter(&f, &below) {
            log::error!(
                "mirror job '{}': removing the filter above '{}': {e}",
                self.p.job_id,
                below.name()
            );
        }
    }
}

#[cfg(test)]
#[path = "mirror_backup_tests.rs"]
mod tests;
