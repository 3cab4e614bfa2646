//! `block-commit`: writes the data of `top` and the layers between it and `base` into
//! `base` (QEMU's `block/commit.c` and, for the active layer, `commit_active_start` in
//! `block/mirror.c`).
//!
//! - Intermediate commit (`top` below the active layer): the job copies what is allocated
//!   above `base`, then every parent of `top` is repointed to `base` and the overlay's image
//!   records the new backing file name.
//! - Active commit (`top` is the active layer, or someone writes it): the job copies what is
//!   allocated above `base` while a dirty bitmap on `top` records the guest's writes, copies
//!   those again, and becomes `ready` when nothing is left. `block-job-complete` then holds
//!   the guest's requests back, copies the last dirty ranges and pivots every user of `top`
//!   to `base`; no acknowledged write is lost. A cancel without `force` once ready ends the
//!   job without the pivot (base holds a consistent copy; top stays in use).
//!
//! A filter inserted above `top` for the job's duration (`commit_top`/`mirror_top`, as QEMU
//! does) shares every permission, so the chain below may be written even while a guest
//! device, which does not share `write`, uses it.

use std::sync::Arc;
use std::time::Duration;

use block_graph::node::Parent;
use block_graph::{BlockGraph, DirtyBitmap, Node, Perm, RootInfo};
use qapi_types::cmd::BlockCommitArguments;
use qapi_types::{BlockdevOnError, JobType};

use crate::chain::{
    chain_contains, chain_until, find_backing_image, find_base, Exclusive, JobRoot,
};
use crate::copy::{copy_data, copy_range, whole_run, OnIgnore, RunError};
use crate::engine::{ErrorAction, JobContext, JobDriver};
use crate::error::{JobError, Result};
use crate::registry::Jobs;
use crate::stream::{spec_for, MAX_CHUNK};

/// The granularity of the active commit's dirty bitmap.
pub const DIRTY_GRANULARITY: u64 = 64 * 1024;

/// How often a ready active commit looks for new guest writes.
const READY_POLL: Duration = Duration::from_millis(10);

/// The commit job.
pub struct CommitJob {
    top: Arc<Node>,
    base: Arc<Node>,
    active: bool,
    filter: Option<Arc<Node>>,
    top_root: Option<JobRoot>,
    base_root: Option<JobRoot>,
    backing_file: Option<String>,
    on_error: BlockdevOnError,
    reopened: Vec<Arc<Node>>,
    bitmap: Option<Arc<DirtyBitmap>>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for CommitJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitJob")
            .field("top", &self.top.name())
            .field("base", &self.base.name())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl CommitJob {
    fn roots(&self) -> Result<(JobRoot, JobRoot)> {
        match (&self.top_root, &self.base_root) {
            (Some(t), Some(b)) => Ok((t.clone(), b.clone())),
            _ => Err(JobError::Cancelled),
        }
    }

    /// Copies what a prefix of `[off, off + len)` holds above base into base; returns the
    /// prefix's length and whether data was written.
    fn copy_prefix(
        &self,
        src: &JobRoot,
        dst: &JobRoot,
        buf: &mut Vec<u8>,
        off: u64,
        len: u64,
    ) -> std::result::Result<(u64, bool), RunError> {
        let st = self
            .top
            .block_status_above(Some(&self.base), off, len)
            .map_err(RunError::read)?;
        let n = st.len;
        if !st.allocated {
            return Ok((n, false));
        }
        copy_data(src, dst, buf, off, n, st.zero)?;
        Ok((n, true))
    }

    /// [`CommitJob::copy_prefix`] with the job's own buffer.
    fn copy(
        &mut self,
        src: &JobRoot,
        dst: &JobRoot,
        off: u64,
        len: u64,
    ) -> std::result::Result<(u64, bool), RunError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.copy_prefix(src, dst, &mut buf, off, len);
        self.buf = buf;
        r
    }

    fn grow_base(&self, len: u64) -> Result<()> {
        let (_, base) = self.roots()?;
        if base.length() < len {
            base.truncate(len)?;
        }
        Ok(())
    }

    fn run_intermediate(&mut self, ctx: &JobContext) -> Result<()> {
        let (src, dst) = self.roots()?;
        let len = src.length();
        ctx.progress_set_remaining(len);
        self.grow_base(len)?;
        let this = &*self;
        // QEMU's commit retries a failed range for every action but report.
        copy_range(
            ctx,
            len,
            MAX_CHUNK,
            &self.on_error,
            OnIgnore::Retry,
            |off, n, buf| whole_run(off, n, |o, l| this.copy_prefix(&src, &dst, buf, o, l)),
        )?;
        dst.flush()?;
        Ok(())
    }

    /// Copies dirty ranges until none is left (or, with `once`, one range); returns
    /// whether something was copied.
    fn copy_dirty(
        &mut self,
        ctx: Option<&JobContext>,
        cursor: &mut u64,
        once: bool,
    ) -> Result<bool> {
        let (src, dst) = self.roots()?;
        let bm = self.bitmap.clone().ok_or(JobError::Cancelled)?;
        let len = src.length();
        let mut any = false;
        loop {
            let off = match bm.next_dirty(*cursor) {
                Some(o) if o < len => o,
                _ if *cursor > 0 => {
                    *cursor = 0;
                    match bm.next_dirty(0) {
                        Some(o) if o < len => o,
                        _ => return Ok(any),
                    }
                }
                _ => return Ok(any),
            };
            let want = ctx
                .map_or(MAX_CHUNK, |c| c.chunk_size(MAX_CHUNK))
                .min(len - off);
            // Clear first: a write that lands after this point sets the bits again.
            bm.reset_range(off, want);
            let mut done = 0;
            while done < want {
                match self.copy(&src, &dst, off + done, want - done) {
                    Ok((n, _)) => done += n,
                    Err(RunError { err: e, is_read }) => {
                        bm.set_range(off + done, want - done);
                        let Some(ctx) = ctx else {
                            return Err(e.into());
                        };
                        match ctx.error_action(&self.on_error, is_read, &e) {
                            ErrorAction::Report => return Err(e.into()),
                            ErrorAction::Stop | ErrorAction::Ignore => {
                                ctx.pause_point()?;
                                break;
                            }
                        }
                    }
                }
            }
            *cursor = off + done.max(1);
            any |= done > 0;
            if let Some(ctx) = ctx {
                ctx.progress_done(done);
                ctx.progress_set_remaining(bm.count());
                ctx.rate_limit(done)?;
            }
            if once {
                return Ok(any);
            }
        }
    }

    fn run_active(&mut self, ctx: &JobContext) -> Result<()> {
        let (src, _) = self.roots()?;
        let bm = self.bitmap.clone().ok_or(JobError::Cancelled)?;
        let len = src.length();
        self.grow_base(len)?;
        // The first pass copies everything allocated above base, runs in parallel; the
        // bitmap, recording guest writes since the job was created, is cleared for each
        // run before it is copied, so a write that lands later is copied again below.
        let (src2, dst2) = self.roots()?;
        ctx.progress_set_remaining(len);
        let this = &*self;
        copy_range(
            ctx,
            len,
            MAX_CHUNK,
            &self.on_error,
            OnIgnore::Retry,
            |off, n, buf| {
                bm.reset_range(off, n);
                whole_run(off, n, |o, l| this.copy_prefix(&src2, &dst2, buf, o, l))
                    .inspect_err(|_| bm.set_range(off, n))
            },
        )?;
        ctx.progress_set_remaining(bm.count());
        let mut cursor = 0u64;
        loop {
            ctx.pause_point()?;
            if self.copy_dirty(Some(ctx), &mut cursor, true)? {
                continue;
            }
            if !ctx.is_ready() {
                self.roots()?.1.flush()?;
                ctx.progress_set_remaining(0);
                ctx.set_ready();
            }
            if ctx.complete_requested() || ctx.cancel_requested() {
                // Hold the guest back for the last ranges; the pivot in prepare copies
                // whatever it writes between now and then.
                let _x = Exclusive::enter(&self.top, src.info());
                self.copy_dirty(Some(ctx), &mut cursor, false)?;
                self.roots()?.1.flush()?;
                return Ok(());
            }
            ctx.sleep(READY_POLL)?;
        }
    }

    fn release_roots(&mut self, g: &mut BlockGraph) {
        if let Some(r) = self.top_root.take() {
            r.release(g);
        }
        if let Some(r) = self.base_root.take() {
            r.release(g);
        }
    }

    /// Intermediate commit's switch: the overlay records `base`, every parent of `top`
    /// (through the filter) uses `base`.
    fn drop_intermediate(&mut self, g: &mut BlockGraph) -> Result<()> {
        let Some(filter) = self.filter.clone() else {
            return Ok(());
        };
        let name = self
            .backing_file
            .clone()
            .unwrap_or_else(|| block_graph::filename::node_filename(&self.base));
        let fmt = self.base.driver_name();
        let overlays: Vec<Arc<Node>> = filter
            .parents()
            .iter()
            .filter(|e| e.name() == "backing")
            .filter_map(|e| match e.parent() {
                Some(Parent::Node(w)) => w.upgrade(),
                _ => None,
            })
            .collect();
        let mut old = Vec::new();
        for o in &overlays {
            let before = o.driver().backing_file();
            o.driver()
                .change_backing_file(Some(&name), Some(fmt))
                .map_err(|e| {
                    JobError::generic(format!(
                        "Could not update backing file link of '{}': {e}",
                        o.name()
                    ))
                })?;
            old.push((o.clone(), before));
        }
        if let Err(e) = g.replace_job_filter(&filter, &self.base) {
            for (o, before) in old {
                let (n, f) = match &before {
                    Some((n, f)) => (Some(n.as_str()), f.as_deref()),
                    None => (None, None),
                };
                let _ = o.driver().change_backing_file(n, f);
            }
            return Err(e.into());
        }
        self.filter = None;
        Ok(())
    }

    /// Active commit's pivot: the guest held back, the last dirty ranges copied, every
    /// user of `top` switched to `base`.
    fn pivot(&mut self, g: &mut BlockGraph) -> Result<()> {
        let Some(filter) = self.filter.clone() else {
            return Ok(());
        };
        let (src, dst) = self.roots()?;
        let _x = Exclusive::enter(&self.top, src.info());
        let mut cursor = 0;
        self.copy_dirty(None, &mut cursor, false)?;
        dst.flush()?;
        self.release_roots(g);
        g.replace_job_filter(&filter, &self.base)?;
        self.filter = None;
        // Base is the active layer now: it stays writable.
        self.reopened.clear();
        Ok(())
    }
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn roots(&self) -> Vec<Arc<RootInfo>> {
        [&self.top_root, &self.base_root]
            .into_iter()
            .flatten()
            .map(|r| r.info().clone())
            .collect()
    }

    fn can_complete(&self) -> bool {
        self.active
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        if self.active {
            self.run_active(ctx)
        } else {
            self.run_intermediate(ctx)
        }
    }

    fn prepare(&mut self, ctx: &JobContext, g: &mut BlockGraph) -> Result<()> {
        if !self.active {
            self.release_roots(g);
            return self.drop_intermediate(g);
        }
        if ctx.complete_requested() && !ctx.cancel_requested() {
            return self.pivot(g);
        }
        Ok(())
    }

    fn clean(&mut self, _ctx: &JobContext, g: &mut BlockGraph) {
        self.release_roots(g);
        if let Some(bm) = self.bitmap.take() {
            self.top.remove_bitmap(bm.name());
        }
        if let Some(f) = self.filter.take() {
            if let Err(e) = g.replace_job_filter(&f, &self.top) {
                log::error!(
                    "commit: removing the filter above '{}': {e}",
                    self.top.name()
                );
            }
        }
        if !self.reopened.is_empty() {
            if let Err(e) = g.restore_read_only(&self.reopened) {
                log::warn!("commit: making nodes read-only again: {e}");
            }
            self.reopened.clear();
        }
    }
}

/// Undoes a partial setup.
fn undo_setup(g: &mut BlockGraph, job: &mut CommitJob) {
    job.release_roots(g);
    if let Some(bm) = job.bitmap.take() {
        job.top.remove_bitmap(bm.name());
    }
    if let Some(f) = job.filter.take() {
        let _ = g.replace_job_filter(&f, &job.top);
    }
    if !job.reopened.is_empty() {
        let _ = g.restore_read_only(&job.reopened);
    }
}

fn setup(
    g: &mut BlockGraph,
    job: &mut CommitJob,
    id: &str,
    overlay: Option<&Arc<Node>>,
) -> Result<()> {
    for n in std::iter::once(&job.base).chain(overlay) {
        if n.is_read_only() {
            let changed = g.reopen_read_write(n)?;
            job.reopened.extend(changed);
        }
    }
    let kind = if job.active {
        "mirror_top"
    } else {
        "commit_top"
    };
    job.filter = Some(g.insert_job_filter(&job.top, kind)?);
    let desc = format!("commit job '{id}'");
    job.top_root = Some(JobRoot::new(g, &job.top, Perm::NONE, Perm::ALL, &desc)?);
    job.base_root = Some(JobRoot::new(
        g,
        &job.base,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED,
        &desc,
    )?);
    if job.active {
        let bm = Arc::new(DirtyBitmap::new("", DIRTY_GRANULARITY, job.top.length())?);
        bm.set_busy(true);
        job.top.add_bitmap(bm.clone())?;
        job.bitmap = Some(bm);
    }
    Ok(())
}

/// `block-commit` (QEMU 7.2's `qmp_block_commit`): checks the arguments in QEMU's order,
/// creates and starts an intermediate or active commit job (on-error `report`, as the
/// schema has no `on-error` for it).
pub fn block_commit(jobs: &Jobs, g: &mut BlockGraph, a: &BlockCommitArguments) -> Result<()> {
    let on_error = a.on_error.clone().unwrap_or(BlockdevOnError::Report);
    block_commit_with(jobs, g, a, on_error)
}

/// [`block_commit`] with the `on-error` policy given apart from the arguments (whose
/// `on-error` it ignores): `stop` and `enospc` pause the job on errors, `ignore` retries
/// the range.
pub fn block_commit_with(
    jobs: &Jobs,
    g: &mut BlockGraph,
    a: &BlockCommitArguments,
    on_error: BlockdevOnError,
) -> Result<()> {
    // libvirt relies on DeviceNotFound for a missing device before any other error.
    let bs = match g.root_bs(&a.device) {
        Ok(b) => b,
        Err(e) => {
            if g.lookup_either(&a.device).is_err() {
                return Err(JobError::DeviceNotFound(format!(
                    "Device '{}' not found",
                    a.device
                )));
            }
            return Err(e.into());
        }
    };
    jobs.check_blockers(g, std::slice::from_ref(&bs))?;
    let top = if a.top_node.is_some() && a.top.is_some() {
        return Err(JobError::generic(
            "'top-node' and 'top' are mutually exclusive",
        ));
    } else if let Some(tn) = &a.top_node {
        let t = g.lookup(None, Some(tn))?;
        if !chain_contains(&bs, &t) {
            return Err(JobError::generic(format!(
                "'{tn}' is not in this backing file chain"
            )));
        }
        Some(t)
    } else if let Some(tf) = &a.top {
        if block_graph::filename::node_filename(&bs) == *tf {
            Some(bs.clone())
        } else {
            find_backing_image(&bs, tf)
        }
    } else {
        Some(bs.clone())
    };
    let Some(top) = top else {
        return Err(JobError::generic(format!(
            "Top image file {} not found",
            a.top.as_deref().unwrap_or("NULL")
        )));
    };
    let base = if a.base_node.is_some() && a.base.is_some() {
        return Err(JobError::generic(
            "'base-node' and 'base' are mutually exclusive",
        ));
    } else if let Some(bn) = &a.base_node {
        let b = g.lookup(None, Some(bn))?;
        if !chain_contains(&top, &b) {
            return Err(JobError::generic(format!(
                "'{bn}' is not in this backing file chain"
            )));
        }
        b
    } else if let Some(bf) = &a.base {
        find_backing_image(&top, bf)
            .ok_or_else(|| JobError::generic(format!("Can't find '{bf}' in the backing chain")))?
    } else {
        find_base(&top).ok_or_else(|| JobError::generic("There is no backimg image"))?
    };
    let mut nodes = chain_until(&top, Some(&base));
    nodes.push(base.clone());
    jobs.check_blockers(g, &nodes)?;
    if Arc::ptr_eq(&top, &base) {
        return Err(JobError::generic("cannot commit an image into itself"));
    }
    let top_is_active = Arc::ptr_eq(&top, &bs);
    let has_writer = top.parents().iter().any(|e| e.perm().contains(Perm::WRITE));
    let active = top_is_active || has_writer;
    if active && a.backing_file.is_some() {
        return Err(JobError::generic(if top_is_active {
            "'backing-file' specified, but 'top' is the active layer"
        } else {
            "'backing-file' specified, but 'top' has a writer on it"
        }));
    }
    let overlay = if active {
        None
    } else {
        let o = crate::chain::find_overlay(&bs, &top)
            .ok_or_else(|| JobError::generic("Could not find overlay image"))?;
        jobs.check_blockers(g, std::slice::from_ref(&o))?;
        Some(o)
    };
    let mut spec = spec_for(
        a.job_id.as_deref(),
        g,
        &bs,
        a.speed,
        a.auto_finalize,
        a.auto_dismiss,
    );
    nodes.push(bs.clone());
    if let Some(o) = &overlay {
        nodes.push(o.clone());
    }
    spec.nodes = nodes;
    jobs.check_spec(g, &spec)?;
    let top_len = top.length();
    let mut job = CommitJob {
        top,
        base,
        active,
        filter: None,
        top_root: None,
        base_root: None,
        backing_file: a.backing_file.clone(),
        on_error,
        reopened: Vec::new(),
        bitmap: None,
        buf: Vec::new(),
    };
    if let Err(e) = setup(g, &mut job, &spec.id, overlay.as_ref()) {
        undo_setup(g, &mut job);
        return Err(e);
    }
    let len = if active { 0 } else { top_len };
    let j = jobs.create(g, spec, Box::new(job))?;
    j.progress_set_remaining(len);
    jobs.start(&j);
    Ok(())
}
