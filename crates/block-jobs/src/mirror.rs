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

use std::io::IoSlice;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block_graph::{
    BlockBackend, BlockError, BlockGraph, DirtyBitmap, Node, Perm, WriteFlags, ZeroFlags,
};
use qapi_types::{
    cmd::BlockdevMirrorArguments, BlockdevOnError, DriveMirror, JobType, MirrorSyncMode,
    NewImageMode, QapiType,
};

use crate::engine::{ErrorAction, Job, JobContext, JobDriver, JobSpec};
use crate::error::{JobError, Result};
use crate::Jobs;

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

/// The error policies and job options of the mirror and backup commands.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Policy for read errors (default `report`).
    pub on_source_error: BlockdevOnError,
    /// Policy for write errors (default `report`).
    pub on_target_error: BlockdevOnError,
    /// Rate limit (bytes per second, 0: none).
    pub speed: i64,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
}

impl CopyOptions {
    /// The options from a command's optional arguments, with QEMU's defaults.
    pub fn new(
        on_source_error: &Option<BlockdevOnError>,
        on_target_error: &Option<BlockdevOnError>,
        speed: Option<i64>,
        auto_finalize: Option<bool>,
        auto_dismiss: Option<bool>,
    ) -> Self {
        CopyOptions {
            on_source_error: on_source_error.clone().unwrap_or(BlockdevOnError::Report),
            on_target_error: on_target_error.clone().unwrap_or(BlockdevOnError::Report),
            speed: speed.unwrap_or(0),
            auto_finalize: auto_finalize.unwrap_or(true),
            auto_dismiss: auto_dismiss.unwrap_or(true),
        }
    }

    /// The job's spec: its id, these options and the nodes it works on.
    pub fn spec(&self, id: &str, nodes: Vec<Arc<Node>>) -> JobSpec {
        JobSpec {
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            speed: self.speed,
            nodes,
            ..JobSpec::new(id)
        }
    }

    /// The policy for a failed read (`true`) or write.
    pub fn policy(&self, is_read: bool) -> &BlockdevOnError {
        if is_read {
            &self.on_source_error
        } else {
            &self.on_target_error
        }
    }
}

fn lookup_opt(g: &BlockGraph, name: &Option<String>) -> Result<Option<Arc<Node>>> {
    Ok(match name {
        Some(r) => Some(g.lookup_either(r)?),
        None => None,
    })
}

/// QEMU's default granularity: the target's cluster size clamped to 4 KiB..64 KiB, 64 KiB
/// when the target has no clusters.
pub fn default_granularity(target: &Node) -> u64 {
    match target.driver().image_info().cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// Checks `granularity` and `buf-size` as QEMU does and fills in the defaults.
pub fn check_sizes(
    granularity: Option<u32>,
    buf_size: Option<i64>,
    target: &Node,
) -> Result<(u64, u64)> {
    let g = match granularity {
        None | Some(0) => default_granularity(target),
        Some(g) => {
            let g = g as u64;
            if !(512..=64 << 20).contains(&g) {
                return Err(JobError::generic(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            if !g.is_power_of_two() {
                return Err(JobError::generic(
                    "Parameter 'granularity' expects a power of 2",
                ));
            }
            g
        }
    };
    let b = match buf_size {
        None | Some(0) => DEFAULT_BUF_SIZE,
        Some(b) if b < 0 => return Err(JobError::generic("Invalid parameter 'buf-size'")),
        Some(b) => b as u64,
    };
    Ok((g, b.max(g)))
}

fn check_sync(sync: &MirrorSyncMode) -> Result<()> {
    match sync {
        MirrorSyncMode::Full | MirrorSyncMode::Top | MirrorSyncMode::None => Ok(()),
        other => Err(JobError::generic(format!(
            "Sync mode '{}' not supported",
            other.as_str()
        ))),
    }
}

/// The format node under implicit filters (QEMU's `bdrv_skip_filters` for what a command
/// reports and creates images from).
pub fn skip_filters(n: &Arc<Node>) -> Arc<Node> {
    let mut cur = n.clone();
    for _ in 0..64 {
        if !cur.driver().is_filter() {
            break;
        }
        match cur.primary_child() {
            Some(c) => cur = c.node(),
            None => break,
        }
    }
    cur
}

/// Opens the target image of `drive-mirror` / `drive-backup`: creates it first unless
/// `mode` is `existing` (format: given, else the source's, else probed for existing
/// images), with the backing file `backing` (a node whose file name and format are
/// recorded). The node is opened without a backing node: the job attaches one.
pub fn open_new_target(
    g: &mut BlockGraph,
    source: &Arc<Node>,
    path: &str,
    format: Option<&str>,
    mode: &NewImageMode,
    backing: Option<&Arc<Node>>,
    node_name: Option<&str>,
) -> Result<Arc<Node>> {
    let src = skip_filters(source);
    let format = match (format, mode) {
        (Some(f), _) => f.to_string(),
        (None, NewImageMode::Existing) => block_graph::drivers::probe_format(path)?.to_string(),
        (None, _) => src.driver_name().to_string(),
    };
    match mode {
        NewImageMode::Existing => {}
        NewImageMode::AbsolutePaths => {
            let b = backing.map(|b| {
                let b = skip_filters(b);
                (block_graph::drivers::node_filename(&b), b.driver_name())
            });
            block_graph::ops::create_image(
                path,
                &format,
                src.length(),
                b.as_ref().map(|(f, d)| (f.as_str(), *d)),
            )?;
        }
        NewImageMode::Unrecognized(m) => {
            return Err(JobError::generic(format!(
                "Parameter 'mode' does not accept value '{m}'"
            )))
        }
    }
    let mut v = serde_json::json!({
        "driver": format,
        "file": {"driver": "file", "filename": path},
    });
    if format == "qcow2" {
        v["backing"] = serde_json::Value::Null;
    }
    if let Some(n) = node_name {
        v["node-name"] = serde_json::Value::String(n.to_string());
    }
    let o = qapi_types::BlockdevOptions::from_qmp_strict(v)
        .map_err(|e| JobError::generic(e.to_string()))?;
    let mut inh = block_graph::options::Inherit::top();
    inh.cache_direct = Some(source.options().cache_direct);
    Ok(g.open_node(&o, &inh, false)?)
}

/// `drive-mirror`: opens (or creates) the target image, then starts the job.
pub fn drive_mirror(g: &mut BlockGraph, jobs: &Jobs, a: &DriveMirror) -> Result<Arc<Job>> {
    check_sync(&a.sync)?;
    let source = g.root_bs(&a.device)?;
    let mode = a.mode.clone().unwrap_or(NewImageMode::AbsolutePaths);
    let job_id = a
        .job_id
        .clone()
        .unwrap_or_else(|| g.device_or_node_name(&source));
    let src = skip_filters(&source);
    let (sync, backing) = match a.sync {
        MirrorSyncMode::Top => match src.backing() {
            Some(b) => (MirrorSyncMode::Top, Some(b.node())),
            None => (MirrorSyncMode::Full, None),
        },
        MirrorSyncMode::None => (MirrorSyncMode::None, Some(source.clone())),
        _ => (MirrorSyncMode::Full, None),
    };
    if let Some(n) = &a.node_name {
        if g.lookup_either(n).is_ok() {
            return Err(JobError::generic(format!(
                "Duplicate nodes with node-name='{n}'"
            )));
        }
    }
    jobs.check_spec(
        g,
        &JobSpec {
            nodes: vec![source.clone()],
            ..JobSpec::new(job_id.clone())
        },
    )?;
    let target = open_new_target(
        g,
        &source,
        &a.target,
        a.format.as_deref(),
        &mode,
        backing.as_ref(),
        a.node_name.as_deref(),
    )?;
    let (granularity, buf_size) = check_sizes(a.granularity, a.buf_size, &target)?;
    let replaces = lookup_opt(g, &a.replaces)?;
    let backing_mode = if sync == MirrorSyncMode::Full {
        BackingMode::Leave
    } else {
        BackingMode::FromSource
    };
    start(
        g,
        jobs,
        MirrorParams {
            job_id,
            source,
            target,
            replaces,
            sync,
            granularity,
            buf_size,
            unmap: a.unmap.unwrap_or(true),
            backing_mode,
            opts: CopyOptions::new(
                &a.on_source_error,
                &a.on_target_error,
                a.speed,
                a.auto_finalize,
                a.auto_dismiss,
            ),
        },
    )
}

/// `blockdev-mirror`: mirrors to an existing node.
pub fn blockdev_mirror(
    g: &mut BlockGraph,
    jobs: &Jobs,
    a: &BlockdevMirrorArguments,
) -> Result<Arc<Job>> {
    check_sync(&a.sync)?;
    let source = g.root_bs(&a.device)?;
    let target = g.lookup_either(&a.target)?;
    let job_id = a
        .job_id
        .clone()
        .unwrap_or_else(|| g.device_or_node_name(&source));
    let (granularity, buf_size) = check_sizes(a.granularity, a.buf_size, &target)?;
    let replaces = lookup_opt(g, &a.replaces)?;
    let sync = match a.sync {
        MirrorSyncMode::Top if skip_filters(&source).backing().is_none() => MirrorSyncMode::Full,
        ref s => s.clone(),
    };
    start(
        g,
        jobs,
        MirrorParams {
            job_id,
            source,
            target,
            replaces,
            sync,
            granularity,
            buf_size,
            unmap: true,
            backing_mode: BackingMode::Leave,
            opts: CopyOptions::new(
                &a.on_source_error,
                &a.on_target_error,
                a.speed,
                a.auto_finalize,
                a.auto_dismiss,
            ),
        },
    )
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
    let spec = p
        .opts
        .spec(&p.job_id, vec![p.source.clone(), p.target.clone()]);
    jobs.check_spec(g, &spec)?;
    let desc = format!("mirror job '{}'", p.job_id);
    let src_root = g.new_root(
        &p.source,
        Perm::CONSISTENT_READ,
        Perm::ALL & !Perm::RESIZE,
        &desc,
    )?;
    let tgt_root = match g.new_root(
        &p.target,
        Perm::WRITE | Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        &desc,
    ) {
        Ok(r) => r,
        Err(e) => {
            g.release_root(&src_root);
            return Err(e.into());
        }
    };
    let bitmap = match DirtyBitmap::new("", p.granularity, p.source.length()) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            g.release_root(&src_root);
            g.release_root(&tgt_root);
            return Err(e.into());
        }
    };
    if let Err(e) = p.source.add_bitmap(bitmap.clone()) {
        g.release_root(&src_root);
        g.release_root(&tgt_root);
        return Err(e.into());
    }
    let mirror = Mirror {
        p,
        src_root: Some(src_root),
        tgt_root: Some(tgt_root),
        bitmap,
    };
    let job = jobs.create(g, spec, Box::new(mirror))?;
    jobs.start(&job);
    Ok(job)
}

struct Mirror {
    p: MirrorParams,
    src_root: Option<Arc<BlockBackend>>,
    tgt_root: Option<Arc<BlockBackend>>,
    bitmap: Arc<DirtyBitmap>,
}

/// One run of the copy: `len` bytes at `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// A failed run: whether the read failed (else the write), and the error.
pub(crate) type RunResult = std::result::Result<(), (bool, BlockError)>;

/// What a copy thread does with a run (with its scratch buffer).
pub(crate) type Work = Arc<dyn Fn(Run, &mut Vec<u8>) -> RunResult + Send + Sync>;

/// A pool of copy threads fed with runs by the job's thread, which alone takes pause
/// points, applies error policies and rate limits.
pub(crate) struct Pool {
    tx: Option<mpsc::SyncSender<Run>>,
    done: mpsc::Receiver<(Run, RunResult)>,
    threads: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    bytes: u64,
}

impl Pool {
    /// `n` threads running `work` on each run.
    pub(crate) fn new(name: &str, n: usize, work: Work) -> Result<Pool> {
        let (tx, rx) = mpsc::sync_channel::<Run>(n);
        let rx = Arc::new(Mutex::new(rx));
        let (dtx, done) = mpsc::channel();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            let dtx = dtx.clone();
            let work = work.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name} {i}"))
                .spawn(move || {
                    // One buffer per thread, reused: no allocation (and page faults) per run.
                    let mut scratch = Vec::new();
                    loop {
                        let r = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(run) = r else { break };
                        let res = work(run, &mut scratch);
                        if dtx.send((run, res)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| JobError::generic(format!("cannot start a copy thread: {e}")))?;
            threads.push(h);
        }
        Ok(Pool {
            tx: Some(tx),
            done,
            threads,
            in_flight: 0,
            bytes: 0,
        })
    }

    pub(crate) fn submit(&mut self, r: Run) {
        if let Some(tx) = &self.tx {
            if tx.send(r).is_ok() {
                self.in_flight += 1;
                self.bytes += r.len;
            }
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The next finished run, waiting up to `wait`.
    pub(crate) fn next(&mut self, wait: Duration) -> Option<(Run, RunResult)> {
        if self.in_flight == 0 {
            return None;
        }
        let r = if wait.is_zero() {
            self.done.try_recv().ok()
        } else {
            self.done.recv_timeout(wait).ok()
        };
        if let Some((run, _)) = &r {
            self.in_flight -= 1;
            self.bytes -= run.len;
        }
        r
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        // Runs still queued or in flight finish; their results are dropped.
        while self.in_flight > 0 {
            if self.done.recv().is_err() {
                break;
            }
            self.in_flight -= 1;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Copies one run from `src` to `tgt`.
fn copy_run(
    src: &BlockBackend,
    tgt: &BlockBackend,
    r: Run,
    unmap: bool,
    scratch: &mut Vec<u8>,
) -> RunResult {
    // The kernel copies what it can (copy offload), the rest is read and written.
    let n = block_graph::copy_range::copy_range_backends(src, tgt, r.offset, r.len)
        .map_err(|e| (e.is_read, e.error))?;
    if n == r.len {
        return Ok(());
    }
    let r = Run {
        offset: r.offset + n,
        len: r.len - n,
    };
    scratch.resize(r.len as usize, 0);
    let buf = &mut scratch[..];
    src.read_buf(r.offset, buf).map_err(|e| (true, e))?;
    let res = if block_graph::iov::is_zero(&[IoSlice::new(buf)]) {
        tgt.write_zeroes(
            r.offset,
            r.len,
            ZeroFlags {
                may_unmap: unmap,
                fua: false,
            },
        )
    } else {
        tgt.write_buf(r.offset, buf, WriteFlags::default())
    };
    res.map_err(|e| (false, e))
}

impl Mirror {
    fn roots(&self) -> Result<(Arc<BlockBackend>, Arc<BlockBackend>)> {
        match (&self.src_root, &self.tgt_root) {
            (Some(s), Some(t)) => Ok((s.clone(), t.clone())),
            _ => Err(JobError::generic("mirror job without its roots")),
        }
    }

    /// The alignment of runs: the granularity, and at least the target's cluster size so
    /// that no partial cluster is written into a target without its backing node yet.
    fn align(&self) -> u64 {
        let tc = self
            .p
            .target
            .driver()
            .image_info()
            .cluster_size
            .unwrap_or(0);
        self.p.granularity.max(tc.next_power_of_two()).max(512)
    }

    /// The first pass's bitmap: what the source allocates (above its backing node for
    /// `top`); ranges reading as zero are zeroed in the target unless it reads as zero
    /// there already.
    fn initial_dirty(&self, ctx: &JobContext, tgt: &BlockBackend) -> Result<()> {
        let len = self.p.source.length();
        let base = match self.p.sync {
            MirrorSyncMode::None => return Ok(()),
            MirrorSyncMode::Top => skip_filters(&self.p.source).backing().map(|b| b.node()),
            _ => None,
        };
        let mut off = 0u64;
        while off < len {
            ctx.pause_point()?;
            let st = self
                .p
                .source
                .block_status_above(base.as_ref(), off, len - off)?;
            let n = st.len.max(1);
            if st.data || (st.allocated && !st.zero) {
                self.bitmap.set_range(off, n);
            } else if st.zero && self.p.sync == MirrorSyncMode::Full {
                let tz = self
                    .p
                    .target
                    .block_status_above(None, off, n)
                    .map(|t| t.zero && t.len >= n)
                    .unwrap_or(false);
                if !tz {
                    // Zeroing may be refused by odd drivers: copying is always right.
                    if tgt
                        .write_zeroes(
                            off,
                            n,
                            ZeroFlags {
                                may_unmap: self.p.unmap,
                                fua: false,
                            },
                        )
                        .is_err()
                    {
                        self.bitmap.set_range(off, n);
                    }
                }
            }
            off += n;
        }
        Ok(())
    }

    /// Takes the next dirty run at or after `*cursor` (wrapping around once), clearing its
    /// bits. Runs overlapping one in flight are left for later: two copies of one range in
    /// flight could finish out of order and leave the older data in the target.
    fn claim(&self, cursor: &mut u64, max: u64, busy: &[Run]) -> Option<Run> {
        let len = self.p.source.length();
        let align = self.align();
        let overlap = |s: u64, e: u64| busy.iter().find(|r| r.offset < e && s < r.offset + r.len);
        let mut from = *cursor;
        let mut wrapped = false;
        let start = loop {
            let d = match self.bitmap.next_dirty(from).filter(|&d| d < len) {
                Some(d) => d,
                None if !wrapped && *cursor > 0 => {
                    wrapped = true;
                    from = 0;
                    continue;
                }
                None => return None,
            };
            if wrapped && d >= *cursor {
                return None;
            }
            let start = d / align * align;
            match overlap(start, (start + align).min(len)) {
                Some(r) => from = r.offset + r.len,
                None => break start,
            }
        };
        let mut end = (start + align).min(len);
        while end < len
            && end - start < max
            && self.bitmap.next_dirty(end) == Some(end)
            && overlap(end, (end + align).min(len)).is_none()
        {
            end = (end + align).min(len);
        }
        self.bitmap.reset_range(start, end - start);
        *cursor = end;
        Some(Run {
            offset: start,
            len: end - start,
        })
    }

    fn remaining(&self) -> u64 {
        self.bitmap.count().min(self.p.source.length())
    }
}

impl JobDriver for Mirror {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        let (src, tgt) = self.roots()?;
        self.initial_dirty(ctx, &tgt)?;
        let max_run = (self.p.buf_size / MAX_IN_FLIGHT as u64)
            .max(MIN_RUN)
            .min(self.p.buf_size)
            .max(self.align());
        let threads = ((self.p.buf_size / max_run) as usize).clamp(1, MAX_IN_FLIGHT);
        let unmap = self.p.unmap;
        let (s2, t2) = (src.clone(), tgt.clone());
        let mut pool = Pool::new(
            &format!("mirror {}", ctx.id()),
            threads,
            Arc::new(move |r, buf: &mut Vec<u8>| copy_run(&s2, &t2, r, unmap, buf)),
        )?;
        let mut cursor = 0u64;
        let mut busy: Vec<Run> = Vec::new();
        let mut failed: Option<JobError> = None;
        loop {
            let remaining = self.remaining();
            ctx.progress_set_remaining(remaining + pool.bytes());
            // Like QEMU's mirror_pause, pause only once the runs in flight are done:
            // one failing after a resume would pause the job again.
            if failed.is_none() && (pool.in_flight() == 0 || !ctx.should_stop()) {
                if let Err(e) = ctx.pause_point() {
                    failed = Some(e);
                }
            }
            if failed.is_some() {
                // Let the runs in flight finish, then end.
                if pool.in_flight() == 0 {
                    break;
                }
                pool.next(Duration::from_millis(100));
                continue;
            }
            // Fill the pipeline.
            let mut submitted = 0;
            while pool.in_flight() < threads && pool.bytes() < self.p.buf_size && !ctx.should_stop()
            {
                let Some(run) = self.claim(&mut cursor, max_run, &busy) else {
                    break;
                };
                busy.push(run);
                pool.submit(run);
                submitted += 1;
                if let Err(e) = ctx.rate_limit(run.len) {
                    failed = Some(e);
                    break;
                }
            }
            // Collect what finished.
            let wait = if pool.in_flight() >= threads || submitted == 0 {
                Duration::from_millis(20)
            } else {
                Duration::ZERO
            };
            while let Some((run, res)) = pool.next(wait) {
                if let Some(i) = busy.iter().position(|r| r.offset == run.offset) {
                    busy.swap_remove(i);
                }
                match res {
                    Ok(()) => ctx.progress_done(run.len),
                    Err((is_read, e)) => {
                        self.bitmap.set_range(run.offset, run.len);
                        match ctx.error_action(self.p.opts.policy(is_read), is_read, &e) {
                            ErrorAction::Report => {
                                failed = Some(e.into());
                                break;
                            }
                            ErrorAction::Ignore | ErrorAction::Stop => {}
                        }
                    }
                }
                if pool.in_flight() < threads {
                    break;
                }
            }
            if failed.is_some() {
                continue;
            }
            if pool.in_flight() == 0 && self.remaining() == 0 {
                if !ctx.is_ready() {
                    tgt.flush()?;
                    ctx.set_ready();
                }
                if ctx.complete_requested() || ctx.cancel_requested() {
                    break;
                }
                // Converged: wait for guest writes (or a verb).
                if let Err(e) = ctx.sleep(Duration::from_millis(5)) {
                    failed = Some(e);
                }
            }
        }
        drop(pool);
        if let Some(e) = failed {
            return Err(e);
        }
        tgt.flush()?;
        Ok(())
    }

    fn prepare(&mut self, ctx: &JobContext, g: &mut BlockGraph) -> Result<()> {
        if !ctx.complete_requested() || ctx.cancel_requested() {
            return Ok(());
        }
        let (src, tgt) = self.roots()?;
        let to_replace = self.p.replaces.clone().unwrap_or(self.p.source.clone());
        {
            // Nothing reaches the source or the target while the last writes are copied
            // and every user moves over.
            let _d = g.drain(&[self.p.source.clone(), self.p.target.clone()]);
            {
                let (se, te) = match (src.root_edge(), tgt.root_edge()) {
                    (Some(s), Some(t)) => (s, t),
                    _ => return Err(JobError::generic("mirror job without its roots")),
                };
                let mut cursor = 0;
                while let Some(run) = self.claim(&mut cursor, MIN_RUN, &[]) {
                    let mut buf = vec![0u8; run.len as usize];
                    se.read_buf(run.offset, &mut buf)?;
                    te.write_buf(run.offset, &buf, WriteFlags::default())?;
                    ctx.progress_done(run.len);
                }
                te.flush()?;
                // The edges go with this scope: a live edge keeps its permissions.
            }
            drop((src, tgt));
            // The job's roots must not follow the source, nor keep others off the target.
            if let Some(r) = self.src_root.take() {
                g.release_root(&r);
            }
            if let Some(r) = self.tgt_root.take() {
                g.release_root(&r);
            }
            self.p.source.remove_bitmap("");
            if self.p.backing_mode == BackingMode::FromSource {
                let backing = match self.p.sync {
                    MirrorSyncMode::None => Some(self.p.source.clone()),
                    _ => skip_filters(&self.p.source).backing().map(|b| b.node()),
                };
                let tgt_fmt = skip_filters(&self.p.target);
                let cur = tgt_fmt.backing().map(|b| b.node());
                let same = match (&cur, &backing) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    g.set_backing(&tgt_fmt, backing.as_ref())?;
                }
            }
            g.replace_node(&to_replace, &self.p.target)?;
        }
        log::info!(
            "mirror job '{}': '{}' replaced by '{}'",
            ctx.id(),
            to_replace.name(),
            self.p.target.name()
        );
        Ok(())
    }

    fn clean(&mut self, _ctx: &JobContext, g: &mut BlockGraph) {
        if let Some(r) = self.src_root.take() {
            g.release_root(&r);
        }
        if let Some(r) = self.tgt_root.take() {
            g.release_root(&r);
        }
        if let Some(b) = self.p.source.bitmap("") {
            if Arc::ptr_eq(&b, &self.bitmap) {
                self.p.source.remove_bitmap("");
            }
        }
    }
}

#[cfg(test)]
#[path = "mirror_backup_tests.rs"]
mod tests;
