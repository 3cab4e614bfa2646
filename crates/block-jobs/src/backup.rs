//! The backup job (`drive-backup`, `blockdev-backup`): copies a point-in-time view of a
//! device to a target while the guest keeps writing. As QEMU does, the job inserts a
//! `copy-before-write` filter above the source when it is created: from then on, no guest
//! write reaches a range whose old data is not in the target yet (the filter copies it
//! first), and the job copies everything else in the background through the same
//! [`BlockCopy`] state, so each cluster is copied exactly once.
//!
//! Sync modes: `full` copies everything; `top` only what the source's top layer allocates
//! (the target is expected to have the source's backing chain); `none` copies nothing by
//! itself, only the old data of what the guest overwrites (the job runs until cancelled);
//! `incremental` copies the clusters dirty in `bitmap`, and the bitmap is reset to the
//! writes that happened during the job on success, or keeps its bits (and those writes) on
//! failure. `compress` writes full clusters compressed (qcow2 targets).

use std::sync::Arc;
use std::time::Duration;

use block_graph::drivers::copy_before_write::{BlockCopy, MAX_CHUNK};
use block_graph::{BlockBackend, BlockGraph, DirtyBitmap, Node, Perm, RootInfo};
use qapi_types::{BlockdevBackup, DriveBackup, JobType, MirrorSyncMode, NewImageMode};

use crate::engine::{ErrorAction, Job, JobContext, JobDriver, JobSpec, JobTxn};
use crate::error::{JobError, Result};
use crate::mirror::{open_new_target, skip_filters, CopyOptions, Pool, Run, MAX_IN_FLIGHT};
use crate::Jobs;

/// Everything a backup job needs, checked.
#[derive(Debug, Clone)]
pub struct BackupParams {
    /// The job id.
    pub job_id: String,
    /// The node whose data is backed up (a root node).
    pub source: Arc<Node>,
    /// The node written.
    pub target: Arc<Node>,
    /// `full`, `top`, `none` or `incremental`.
    pub sync: MirrorSyncMode,
    /// The bitmap of `incremental`.
    pub bitmap: Option<Arc<DirtyBitmap>>,
    /// Write full clusters compressed.
    pub compress: bool,
    /// Error policies and job options.
    pub opts: CopyOptions,
    /// Close the target when the job ends (a target `drive-backup` opened).
    pub close_target: bool,
}

#[allow(clippy::too_many_arguments)]
fn params(
    g: &BlockGraph,
    job_id: &Option<String>,
    sync: MirrorSyncMode,
    bitmap: &Option<String>,
    compress: Option<bool>,
    opts: CopyOptions,
    source: Arc<Node>,
    target: Arc<Node>,
    close_target: bool,
) -> Result<BackupParams> {
    let job_id = job_id
        .clone()
        .unwrap_or_else(|| g.device_or_node_name(&source));
    let bitmap = match bitmap {
        Some(name) => Some(
            source
                .bitmap(name)
                .ok_or_else(|| JobError::generic(format!("Bitmap '{name}' could not be found")))?,
        ),
        None => None,
    };
    Ok(BackupParams {
        job_id,
        source,
        target,
        sync,
        bitmap,
        compress: compress.unwrap_or(false),
        opts,
        close_target,
    })
}

/// `drive-backup`: opens (or creates) the target image and creates the job (not started:
/// the command starts it, a transaction starts it on commit).
pub fn drive_backup(
    g: &mut BlockGraph,
    jobs: &Jobs,
    a: &DriveBackup,
    txn: Option<JobTxn>,
) -> Result<Arc<Job>> {
    let source = g.root_bs(&a.device)?;
    let src = skip_filters(&source);
    let mode = a.mode.clone().unwrap_or(NewImageMode::AbsolutePaths);
    let mut sync = a.sync.clone();
    let backing = match sync {
        MirrorSyncMode::Top => match src.backing() {
            Some(b) => Some(b.node()),
            None => {
                sync = MirrorSyncMode::Full;
                None
            }
        },
        MirrorSyncMode::None => Some(source.clone()),
        _ => None,
    };
    let job_id = a
        .job_id
        .clone()
        .unwrap_or_else(|| g.device_or_node_name(&source));
    jobs.check_spec(
        g,
        &JobSpec {
            nodes: vec![source.clone()],
            ..JobSpec::new(job_id)
        },
    )?;
    let target = open_new_target(
        g,
        &source,
        &a.target,
        a.format.as_deref(),
        &mode,
        backing.as_ref(),
        None,
    )?;
    if let Some(b) = &backing {
        g.set_backing(&skip_filters(&target), Some(b))?;
    }
    let opts = CopyOptions::new(
        &a.on_source_error,
        &a.on_target_error,
        a.speed,
        a.auto_finalize,
        a.auto_dismiss,
    );
    let p = params(
        g, &a.job_id, sync, &a.bitmap, a.compress, opts, source, target, true,
    )?;
    create(g, jobs, p, txn)
}

/// `blockdev-backup`: backs up to an existing node; the job is created, not started.
pub fn blockdev_backup(
    g: &mut BlockGraph,
    jobs: &Jobs,
    a: &BlockdevBackup,
    txn: Option<JobTxn>,
) -> Result<Arc<Job>> {
    let source = g.root_bs(&a.device)?;
    let target = g.lookup_either(&a.target)?;
    let opts = CopyOptions::new(
        &a.on_source_error,
        &a.on_target_error,
        a.speed,
        a.auto_finalize,
        a.auto_dismiss,
    );
    let p = params(
        g,
        &a.job_id,
        a.sync.clone(),
        &a.bitmap,
        a.compress,
        opts,
        source,
        target,
        false,
    )?;
    create(g, jobs, p, txn)
}

/// Creates a backup job (status `created`): checks, inserts the copy-before-write filter
/// and freezes the bitmap of `incremental`. [`Jobs::start`] runs it.
pub fn create(
    g: &mut BlockGraph,
    jobs: &Jobs,
    p: BackupParams,
    txn: Option<JobTxn>,
) -> Result<Arc<Job>> {
    match (&p.sync, &p.bitmap) {
        (MirrorSyncMode::Incremental, None) => {
            return Err(JobError::generic(
                "must provide a valid bitmap name for \"incremental\" sync mode",
            ))
        }
        (MirrorSyncMode::Incremental, Some(_)) => {}
        (s, Some(_)) => {
            return Err(JobError::generic(format!(
                "a sync_bitmap was provided to backup_run, but received an incompatible \
                 sync_mode ({})",
                s.as_str()
            )))
        }
        (MirrorSyncMode::Unrecognized(s), None) => {
            return Err(JobError::generic(format!(
                "Parameter 'sync' does not accept value '{s}'"
            )))
        }
        _ => {}
    }
    if let Some(b) = &p.bitmap {
        if b.is_busy() {
            return Err(JobError::generic(format!(
                "Bitmap '{}' is currently in use by another operation and cannot be used",
                b.name()
            )));
        }
        if b.is_inconsistent() {
            return Err(JobError::generic(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                b.name()
            )));
        }
    }
    if Arc::ptr_eq(&p.source, &p.target) {
        return Err(JobError::generic("Source and target cannot be the same"));
    }
    if p.compress && skip_filters(&p.target).driver_name() != "qcow2" {
        return Err(JobError::generic(format!(
            "Compression is not supported for this drive {}",
            g.device_or_node_name(&p.target)
        )));
    }
    let spec = JobSpec {
        txn,
        ..p.opts
            .spec(&p.job_id, vec![p.source.clone(), p.target.clone()])
    };
    jobs.check_spec(g, &spec)?;
    // The filter goes in, and the bitmap is frozen, with the guest held back: a write may
    // not slip between the bitmap's copy and the filter.
    let drained = g.drain(std::slice::from_ref(&p.source));
    let (filter, state) = g.cbw_append(&p.source, &p.target, p.bitmap.as_deref())?;
    let saved = p.bitmap.as_ref().map(|b| {
        let bits = b.snapshot_bits();
        b.clear();
        b.set_busy(true);
        bits
    });
    drop(drained);
    state.set_compress(p.compress);
    let root = match g.new_root(
        &filter,
        Perm::NONE,
        Perm::ALL,
        &format!("backup job '{}'", p.job_id),
    ) {
        Ok(r) => r,
        Err(e) => {
            undo_bitmap(&p.bitmap, saved.as_deref());
            let _ = g.cbw_drop(&filter);
            return Err(e.into());
        }
    };
    let backup = Backup {
        source: p.source,
        target: Some(p.target),
        sync: p.sync,
        bitmap: p.bitmap,
        opts: p.opts,
        close_target: p.close_target,
        filter: Some(filter),
        state,
        root: Some(root),
        saved,
    };
    jobs.create(g, spec, Box::new(backup))
}

fn undo_bitmap(b: &Option<Arc<DirtyBitmap>>, saved: Option<&[u64]>) {
    if let (Some(b), Some(saved)) = (b, saved) {
        let now = b.snapshot_bits();
        let merged: Vec<u64> = saved
            .iter()
            .zip(now.iter().chain(std::iter::repeat(&0)))
            .map(|(a, c)| a | c)
            .collect();
        b.restore_bits(&merged);
        b.set_busy(false);
    }
}

/// What `sync=top` found at a cluster.
enum Skip {
    /// Unallocated up to here (skipped).
    To(u64),
    /// Allocated for this many bytes.
    Allocated(u64),
}

struct Backup {
    source: Arc<Node>,
    target: Option<Arc<Node>>,
    sync: MirrorSyncMode,
    bitmap: Option<Arc<DirtyBitmap>>,
    opts: CopyOptions,
    close_target: bool,
    filter: Option<Arc<Node>>,
    state: Arc<BlockCopy>,
    root: Option<Arc<BlockBackend>>,
    saved: Option<Vec<u64>>,
}

impl Backup {
    /// `sync=top`: the clusters from `d` that the top layer does not allocate need no copy
    /// (skipped); an allocated range is copied up to its end (whole clusters).
    fn skip_unallocated(&self, base: Option<&Arc<Node>>, d: u64) -> Result<Skip> {
        let len = self.state.len();
        let c = self.state.cluster_size();
        let st = self.source.block_status_above(base, d, len - d)?;
        let end = if d + st.len >= len {
            len
        } else {
            (d + st.len) / c * c
        };
        if st.allocated {
            return Ok(Skip::Allocated((d + st.len).div_ceil(c) * c - d));
        }
        if end <= d {
            return Ok(Skip::Allocated(c));
        }
        self.state.skip(d, end - d);
        Ok(Skip::To(end))
    }

    fn wait_cancel(&self, ctx: &JobContext) -> Result<()> {
        loop {
            if self.state.is_broken() {
                return Err(JobError::generic(
                    "copy-before-write failed: the point-in-time view is broken",
                ));
            }
            ctx.sleep(Duration::from_millis(100))?;
        }
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn roots(&self) -> Vec<Arc<RootInfo>> {
        self.root.iter().map(|r| r.root_info().clone()).collect()
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        let st = self.state.clone();
        if self.sync == MirrorSyncMode::None {
            return self.wait_cancel(ctx);
        }
        let len = st.len();
        let mut reported = len - st.remaining();
        ctx.progress_set_remaining(st.remaining());
        let base = match self.sync {
            MirrorSyncMode::Top => skip_filters(&self.source).backing().map(|b| b.node()),
            _ => None,
        };
        let root = self
            .root
            .clone()
            .ok_or_else(|| JobError::generic("backup job without its root"))?;
        let chunk = ctx
            .chunk_size(MAX_CHUNK)
            .max(st.cluster_size())
            .min(MAX_CHUNK.max(st.cluster_size()));
        let threads = 8.min(MAX_IN_FLIGHT);
        let (s2, r2) = (st.clone(), root.clone());
        let mut pool = Pool::new(
            &format!("backup {}", ctx.id()),
            threads,
            Arc::new(move |r: Run, _: &mut Vec<u8>| {
                let _g = r2.root_info().gate().enter();
                s2.copy_ex(r.offset, r.len, false).map(|_| ())
            }),
        )?;
        let mut cursor = 0u64;
        let mut failed: Option<JobError> = None;
        loop {
            // Like QEMU's block-copy, pause only once the runs in flight are done: one
            // failing after a resume would pause the job again.
            if failed.is_none() && (pool.in_flight() == 0 || !ctx.should_stop()) {
                if let Err(e) = ctx.pause_point() {
                    failed = Some(e);
                } else if st.is_broken() {
                    failed = Some(JobError::generic(
                        "copy-before-write failed: the point-in-time view is broken",
                    ));
                }
            }
            if failed.is_some() {
                if pool.in_flight() == 0 {
                    break;
                }
                pool.next(Duration::from_millis(100));
                continue;
            }
            while pool.in_flight() < threads && !ctx.should_stop() {
                let Some(d) = st.next_dirty(cursor) else {
                    break;
                };
                let mut n = chunk.min(len - d);
                if self.sync == MirrorSyncMode::Top {
                    match self.skip_unallocated(base.as_ref(), d)? {
                        Skip::To(next) => {
                            cursor = next;
                            continue;
                        }
                        Skip::Allocated(l) => n = n.min(l),
                    }
                }
                pool.submit(Run { offset: d, len: n });
                cursor = d + n;
                if let Err(e) = ctx.rate_limit(n) {
                    failed = Some(e);
                    break;
                }
            }
            let wait = if pool.in_flight() > 0 {
                Duration::from_millis(20)
            } else {
                Duration::ZERO
            };
            while let Some((run, res)) = pool.next(wait) {
                if let Err((is_read, e)) = res {
                    match ctx.error_action(self.opts.policy(is_read), is_read, &e) {
                        ErrorAction::Report => {
                            failed = Some(e.into());
                            break;
                        }
                        // Retried: at once for ignore (QEMU's backup_loop starts a new
                        // block-copy call), after the resume for stop. Never skipped:
                        // the backup would end "successfully" with the range missing.
                        ErrorAction::Ignore | ErrorAction::Stop => cursor = cursor.min(run.offset),
                    }
                }
                if pool.in_flight() < threads {
                    break;
                }
            }
            let now = len - st.remaining();
            if now > reported {
                ctx.progress_done(now - reported);
                reported = now;
            }
            if failed.is_some() {
                continue;
            }
            if pool.in_flight() == 0 && st.next_dirty(cursor).is_none() {
                // Clusters guest writes were copying were skipped: wait for them and
                // look again from the start.
                st.wait_idle();
                if st.remaining() == 0 {
                    break;
                }
                cursor = 0;
            }
        }
        drop(pool);
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(t) = self.filter.as_ref().and_then(|f| f.child("target")) {
            t.flush()?;
        }
        Ok(())
    }

    fn commit(&mut self, _ctx: &JobContext, _g: &mut BlockGraph) {
        // Success: the bitmap holds exactly the writes made during the job.
        if let Some(b) = &self.bitmap {
            b.set_busy(false);
        }
        self.saved = None;
    }

    fn abort(&mut self, _ctx: &JobContext, _g: &mut BlockGraph) {
        // Failure: the bitmap gets its bits back, plus the writes made meanwhile.
        undo_bitmap(&self.bitmap, self.saved.take().as_deref());
    }

    fn clean(&mut self, ctx: &JobContext, g: &mut BlockGraph) {
        undo_bitmap(&self.bitmap, self.saved.take().as_deref());
        if let Some(t) = self.filter.as_ref().and_then(|f| f.child("target")) {
            if let Err(e) = t.flush() {
                log::error!("backup job '{}': flushing the target failed: {e}", ctx.id());
            }
        }
        if let Some(r) = self.root.take() {
            g.release_root(&r);
        }
        if let Some(f) = self.filter.take() {
            if let Err(e) = g.cbw_drop(&f) {
                log::error!("backup job '{}': removing the filter failed: {e}", ctx.id());
            }
        }
        if self.close_target {
            // Closes the image (drive-backup opened it): qemu-img may open it now.
            self.target = None;
        }
    }
}
