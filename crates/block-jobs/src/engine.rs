//! The job engine: the registry of jobs ([`Jobs`](crate::Jobs)), one job's shared state ([`Job`]), the
//! trait a job implements ([`JobDriver`]) and what its run loop sees ([`JobContext`]).
//!
//! # Threads
//!
//! - A job's [`JobDriver::run`] runs on a worker thread of its own, started by
//!   [`Jobs::start`](crate::Jobs::start). It does the I/O through roots (anonymous BlockBackends) it took on the
//!   graph when it was created, and calls the [`JobContext`]'s pause points, rate limiter,
//!   progress counters and error policy.
//! - Everything that changes the graph runs on the monitor's thread, which owns
//!   `&mut BlockGraph`: the job's creation (the command handler), and once `run` returned, the
//!   driver's [`JobDriver::prepare`], [`JobDriver::commit`] or [`JobDriver::abort`], and
//!   [`JobDriver::clean`]. The worker hands the driver back and wakes the monitor through
//!   the notifier set with [`Jobs::set_notifier`](crate::Jobs::set_notifier); the monitor's loop then calls
//!   [`Jobs::poll`](crate::Jobs::poll), which finishes the job (statuses `waiting`, `pending`, `concluded`,
//!   `null`, the `BLOCK_JOB_*` events) without ever waiting for a worker.
//! - Verbs (`job-pause`, `block-job-cancel`, ...) only change the shared state and wake the
//!   worker; no command blocks on a job.
//!
//! Every status change raises `JOB_STATUS_CHANGE` in the block graph's event queue (the
//! same queue `BlockGraph::take_events` drains), in the order the changes happen.
//!
//! # Writing a job
//!
//! ```
//! use std::sync::Arc;
//! use block_graph::{BlockGraph, BlockBackend, Perm, WriteFlags};
//! use block_jobs::{JobContext, JobDriver, JobSpec, Jobs, Result};
//! use qapi_types::{BlockdevOnError, BlockdevOptions, JobStatus, JobType, QapiType};
//! use serde_json::json;
//!
//! /// Fills a node with a byte pattern, chunk by chunk.
//! struct Fill { root: Option<Arc<BlockBackend>>, on_error: BlockdevOnError }
//!
//! impl JobDriver for Fill {
//!     fn job_type(&self) -> JobType { JobType::Backup }
//!     fn run(&mut self, ctx: &JobContext) -> Result<()> {
//!         let root = self.root.clone().unwrap();
//!         let len = root.length();
//!         ctx.progress_set_remaining(len);
//!         let chunk = vec![0xa5u8; 65536];
//!         let mut off = 0;
//!         while off < len {
//!             ctx.pause_point()?; // returns Err(JobError::Cancelled) once cancelled
//!             let n = (len - off).min(chunk.len() as u64);
//!             match root.write_buf(off, &chunk[..n as usize], WriteFlags::default()) {
//!                 Ok(()) => {}
//!                 Err(e) => match ctx.error_action(&self.on_error, false, &e) {
//!                     block_jobs::ErrorAction::Stop => continue, // paused; retried on resume
//!                     block_jobs::ErrorAction::Ignore => {}
//!                     block_jobs::ErrorAction::Report => return Err(e.into()),
//!                 },
//!             }
//!             off += n;
//!             ctx.progress_done(n);
//!             ctx.rate_limit(n)?; // honours speed / block-job-set-speed
//!         }
//!         Ok(())
//!     }
//!     // Graph-thread hooks: release what the job holds.
//!     fn clean(&mut self, _ctx: &JobContext, g: &mut BlockGraph) {
//!         if let Some(r) = self.root.take() { g.release_root(&r); }
//!     }
//! }
//!
//! let mut g = BlockGraph::new();
//! let opts = BlockdevOptions::from_qmp_strict(
//!     json!({"driver": "null-co", "node-name": "n0", "size": 1048576})).unwrap();
//! let node = g.blockdev_add(&opts).unwrap();
//! let root = g.new_root(&node, Perm::WRITE, Perm::ALL, "backup job 'fill0'").unwrap();
//! let jobs = Jobs::for_graph(&g);
//! let job = jobs.create(&g, JobSpec::new("fill0"), Box::new(Fill {
//!     root: Some(root), on_error: BlockdevOnError::Report })).unwrap();
//! jobs.start(&job);
//! // The monitor's loop: poll when woken (here: until the job is gone).
//! let st = jobs.wait_finished(&mut g, "fill0", std::time::Duration::from_secs(10));
//! assert_eq!(st, Some(JobStatus::Null));
//! let ev: Vec<String> = g.take_events().iter()
//!     .filter_map(|e| e.data.as_ref()?.get("status")?.as_str().map(String::from)).collect();
//! assert_eq!(ev, ["created", "running", "waiting", "pending", "concluded", "null"]);
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block_graph::events::EventQueue;
use block_graph::{BlockError, BlockGraph, DrainParticipant, Node, RootInfo};
use qapi_types::event::{
    BlockJobError, BlockJobErrorData, BlockJobReady, BlockJobReadyData, JobStatusChange,
    JobStatusChangeData,
};
use qapi_types::{
    BlockDeviceIoStatus, BlockErrorAction, BlockJobInfo, BlockJobType, BlockdevOnError,
    IoOperationType, JobInfo, JobStatus, JobType,
};

use crate::error::{JobError, Result};
use crate::ratelimit::RateLimiter;
use crate::status::{is_ready, transition_allowed};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a job implements. `run` runs on the job's worker thread; the other methods run on
/// the monitor's thread with the graph (QEMU's `JobDriver` callbacks of the same names).
///
/// After `run` returned `Ok` (and the job was not cancelled), `prepare` runs; if it and
/// every other job of the transaction succeed, `commit` runs, otherwise `abort`. `clean`
/// always runs last. A job that was never started (a transaction that failed before its
/// commit) gets `abort` and `clean` only.
pub trait JobDriver: Send + 'static {
    /// The job's type (`query-jobs`' `type`; `query-block-jobs` shows its name).
    fn job_type(&self) -> JobType;

    /// The job's work, on its worker thread. Return `Err(JobError::Cancelled)` (what
    /// [`JobContext::pause_point`] returns once the job is cancelled) to stop.
    fn run(&mut self, ctx: &JobContext) -> Result<()>;

    /// Whether the job reaches `ready` and accepts `complete` (mirror, active commit). Such
    /// a job is soft-cancelled by `block-job-cancel` without `force` once ready: `run`
    /// then sees [`JobContext::cancel_requested`] and ends without its final switch; the
    /// job concludes as completed.
    fn can_complete(&self) -> bool {
        false
    }

    /// The roots the job issues its requests through. A drained section above one of them
    /// pauses the job at its next pause point and waits for that (QEMU's
    /// `child_job_drained_begin`), so that a graph change never runs beside the job's I/O.
    fn roots(&self) -> Vec<Arc<RootInfo>> {
        Vec::new()
    }

    /// Graph changes that may still fail, after a successful `run` (QEMU's `.prepare`).
    fn prepare(&mut self, _ctx: &JobContext, _g: &mut BlockGraph) -> Result<()> {
        Ok(())
    }

    /// Makes the job's result final (every job of the transaction prepared fine).
    fn commit(&mut self, _ctx: &JobContext, _g: &mut BlockGraph) {}

    /// Undoes what the job did (it failed, was cancelled, or another job of its
    /// transaction failed).
    fn abort(&mut self, _ctx: &JobContext, _g: &mut BlockGraph) {}

    /// Releases what the job holds (roots, filters, bitmaps); always called last.
    fn clean(&mut self, _ctx: &JobContext, _g: &mut BlockGraph) {}
}

/// What a job does after an I/O error, as its `on-error` policy decided
/// ([`JobContext::error_action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job with the error.
    Report,
    /// Go on as if the request had succeeded (the event was sent).
    Ignore,
    /// The job is now paused (as by the user); retry the same request: the next pause
    /// point waits for `block-job-resume`.
    Stop,
}

/// A group of jobs that complete together (`transaction` with `completion-mode`
/// `grouped`): none is finalized before all finished their work, and if one fails, the
/// others are cancelled and all are aborted.
#[derive(Clone, Default)]
pub struct JobTxn(pub(crate) Arc<TxnInner>);

#[derive(Default)]
pub(crate) struct TxnInner {
    pub(crate) jobs: Mutex<Vec<Weak<Job>>>,
    pub(crate) aborting: AtomicBool,
}

impl std::fmt::Debug for JobTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTxn")
            .field(
                "jobs",
                &self.jobs().iter().map(|j| j.id()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl JobTxn {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn jobs(&self) -> Vec<Arc<Job>> {
        lock(&self.0.jobs)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    pub(crate) fn add(&self, j: &Arc<Job>) {
        lock(&self.0.jobs).push(Arc::downgrade(j));
    }

    pub(crate) fn remove(&self, j: &Arc<Job>) {
        lock(&self.0.jobs).retain(|w| w.upgrade().is_some_and(|x| !Arc::ptr_eq(&x, j)));
    }
}

/// How a job is created.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The job's id (`job-id`, by default the device name).
    pub id: String,
    /// Finalize without `job-finalize` (default true).
    pub auto_finalize: bool,
    /// Dismiss without `job-dismiss` (default true).
    pub auto_dismiss: bool,
    /// The initial rate limit in bytes per second (0: none; negative is refused).
    pub speed: i64,
    /// The nodes the job works on: another job may not use them meanwhile (QEMU's op
    /// blockers: "Node 'x' is busy: block device is in use by block job: stream").
    pub nodes: Vec<Arc<Node>>,
    /// The transaction group, if the job is part of a grouped transaction.
    pub txn: Option<JobTxn>,
}

impl JobSpec {
    /// A spec with QEMU's defaults.
    pub fn new(id: impl Into<String>) -> Self {
        JobSpec {
            id: id.into(),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            nodes: Vec::new(),
            txn: None,
        }
    }
}

pub(crate) struct State {
    pub(crate) status: JobStatus,
    pub(crate) pause_count: u32,
    pub(crate) user_paused: bool,
    pub(crate) paused: bool,
    pub(crate) busy: bool,
    pub(crate) cancelled: bool,
    pub(crate) force_cancel: bool,
    pub(crate) complete_requested: bool,
    pub(crate) started: bool,
    /// `run` returned; the monitor thread finishes the job.
    pub(crate) deferred: bool,
    /// The monitor thread took over (QEMU's `job_exit` ran).
    pub(crate) exited: bool,
    pub(crate) ret: std::result::Result<(), String>,
    pub(crate) iostatus: BlockDeviceIoStatus,
    pub(crate) kicks: u64,
}

/// One job: its identity and the state shared by its worker and the monitor.
pub struct Job {
    pub(crate) id: String,
    pub(crate) kind: JobType,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) can_complete: bool,
    pub(crate) state: Mutex<State>,
    pub(crate) cv: Condvar,
    pub(crate) current: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) speed: AtomicU64,
    pub(crate) limiter: Mutex<RateLimiter>,
    pub(crate) driver: Mutex<Option<Box<dyn JobDriver>>>,
    pub(crate) nodes: Vec<Weak<Node>>,
    pub(crate) txn: Mutex<Option<JobTxn>>,
    pub(crate) reg: Weak<crate::registry::Registry>,
    pub(crate) events: Arc<EventQueue>,
    pub(crate) thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.kind.as_str())
            .field("status", &self.status().as_str())
            .finish_non_exhaustive()
    }
}

pub(crate) fn block_job_type(t: &JobType) -> Option<BlockJobType> {
    Some(match t {
        JobType::Commit => BlockJobType::Commit,
        JobType::Stream => BlockJobType::Stream,
        JobType::Mirror => BlockJobType::Mirror,
        JobType::Backup => BlockJobType::Backup,
        _ => return None,
    })
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's type.
    pub fn job_type(&self) -> &JobType {
        &self.kind
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        lock(&self.state).status.clone()
    }

    /// Progress: (current, total).
    pub fn progress(&self) -> (u64, u64) {
        let c = self.current.load(Ordering::Acquire);
        let t = self.total.load(Ordering::Acquire);
        (c, t.max(c))
    }

    /// The rate limit in bytes per second (0: none).
    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Acquire)
    }

    /// The error the job ended with, if it failed or was cancelled.
    pub fn error(&self) -> Option<String> {
        lock(&self.state).ret.clone().err()
    }

    /// Sets the work still to do before the job starts (total = current + `remaining`),
    /// so that `query-block-jobs` shows the length from the start, as QEMU's jobs do.
    pub fn progress_set_remaining(&self, remaining: u64) {
        let c = self.current.load(Ordering::Acquire);
        self.total
            .store(c.saturating_add(remaining), Ordering::Release);
    }

    /// Whether the user paused the job (or an error policy did, as if the user had).
    pub fn is_user_paused(&self) -> bool {
        lock(&self.state).user_paused
    }

    /// Whether the job is a block job (commit, stream, mirror, backup).
    pub fn is_block_job(&self) -> bool {
        block_job_type(&self.kind).is_some()
    }

    /// Makes the job the drain participant of each of `roots` (see [`JobDriver::roots`]).
    pub(crate) fn join_drains(self: &Arc<Self>, roots: &[Arc<RootInfo>]) {
        let me: Arc<dyn DrainParticipant> = self.clone();
        for r in roots {
            r.set_drain_participant(Arc::downgrade(&me));
        }
    }

    pub(crate) fn kick_locked(&self, st: &mut State) {
        st.kicks = st.kicks.wrapping_add(1);
        self.cv.notify_all();
    }

    /// Changes the status (QEMU's `job_state_transition`) and raises `JOB_STATUS_CHANGE`.
    pub(crate) fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status.clone();
        if !transition_allowed(&from, &to) {
            log::error!(
                "job '{}': transition {} -> {} is not allowed",
                self.id,
                from.as_str(),
                to.as_str()
            );
            debug_assert!(false, "job transition {from:?} -> {to:?}");
        }
        st.status = to.clone();
        if from != to {
            log::debug!("job '{}': {} -> {}", self.id, from.as_str(), to.as_str());
            self.events
                .push(JobStatusChange::message(&JobStatusChangeData {
                    id: self.id.clone(),
                    status: to,
                }));
        }
    }

    pub(crate) fn block_info(&self) -> BlockJobInfo {
        let st = lock(&self.state);
        let (cur, total) = self.progress();
        BlockJobInfo {
            r#type: self.kind.as_str().to_string(),
            device: self.id.clone(),
            len: total as i64,
            offset: cur as i64,
            busy: st.busy,
            paused: st.pause_count > 0,
            speed: self.speed() as i64,
            io_status: st.iostatus.clone(),
            ready: is_ready(&st.status),
            status: st.status.clone(),
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: st.ret.clone().err(),
        }
    }

    pub(crate) fn info(&self) -> JobInfo {
        let st = lock(&self.state);
        let (cur, total) = self.progress();
        JobInfo {
            id: self.id.clone(),
            r#type: self.kind.clone(),
            status: st.status.clone(),
            current_progress: cur as i64,
            total_progress: total as i64,
            error: st.ret.clone().err(),
        }
    }

    pub(crate) fn event_data(&self) -> Option<(BlockJobType, i64, i64)> {
        let t = block_job_type(&self.kind)?;
        let (cur, total) = self.progress();
        Some((t, total as i64, cur as i64))
    }
}

/// What a job's run loop sees: pause points, cancellation, the rate limiter, progress and
/// the error policy. Cheap to clone; usable from helper threads of the job too.
#[derive(Clone)]
pub struct JobContext {
    pub(crate) job: Arc<Job>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("JobContext").field(&self.job.id).finish()
    }
}

impl JobContext {
    /// The job.
    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// The job's id (the `device` of the `BLOCK_JOB_*` events).
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Whether the job must stop now (cancelled with force, or any cancel of a job that
    /// cannot complete): QEMU's `job_is_cancelled`.
    pub fn is_cancelled(&self) -> bool {
        lock(&self.job.state).force_cancel
    }

    /// Whether any cancel was requested (a soft cancel of a ready job included).
    pub fn cancel_requested(&self) -> bool {
        lock(&self.job.state).cancelled
    }

    /// Whether `complete` was requested (for jobs that can complete).
    pub fn complete_requested(&self) -> bool {
        lock(&self.job.state).complete_requested
    }

    /// A pause point: returns `Err(JobError::Cancelled)` if the job is cancelled; parks
    /// while the job is paused (status `paused`, or `standby` when ready), then goes on.
    pub fn pause_point(&self) -> Result<()> {
        let j = &self.job;
        let mut st = lock(&j.state);
        if st.force_cancel {
            return Err(JobError::Cancelled);
        }
        if st.pause_count > 0 {
            let prev = st.status.clone();
            let to = if prev == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            j.transition(&mut st, to);
            st.paused = true;
            st.busy = false;
            while st.pause_count > 0 && !st.force_cancel {
                st = j.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.paused = false;
            st.busy = true;
            j.transition(&mut st, prev);
        }
        if st.force_cancel {
            return Err(JobError::Cancelled);
        }
        Ok(())
    }

    /// Whether the job should reach a pause point soon (a pause or a cancel is pending):
    /// a job with requests in flight stops issuing new ones and lets them finish first.
    pub fn should_stop(&self) -> bool {
        let st = lock(&self.job.state);
        st.pause_count > 0 || st.force_cancel
    }

    /// Sleeps up to `d` (cut short by any verb: cancel, pause, complete, set-speed), then a
    /// pause point.
    pub fn sleep(&self, d: Duration) -> Result<()> {
        let j = &self.job;
        {
            let mut st = lock(&j.state);
            if st.force_cancel {
                return Err(JobError::Cancelled);
            }
            if st.pause_count == 0 && !d.is_zero() {
                let kicks = st.kicks;
                st.busy = false;
                let deadline = Instant::now() + d;
                while st.kicks == kicks && !st.force_cancel && st.pause_count == 0 {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    st =
                        j.cv.wait_timeout(st, deadline - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                }
                st.busy = true;
            }
        }
        self.pause_point()
    }

    /// Accounts `bytes` just transferred against the rate limit and sleeps as long as it
    /// says (QEMU's `block_job_ratelimit_processed_bytes` + `block_job_ratelimit_sleep`).
    pub fn rate_limit(&self, bytes: u64) -> Result<()> {
        let delay = lock(&self.job.limiter).account(bytes);
        if delay.is_zero() {
            self.pause_point()
        } else {
            self.sleep(delay)
        }
    }

    /// A transfer size for the current speed: about 100 ms of data, at most `max`.
    pub fn chunk_size(&self, max: u64) -> u64 {
        lock(&self.job.limiter).chunk_size(max)
    }

    /// The rate limit in bytes per second (0: none).
    pub fn speed(&self) -> u64 {
        self.job.speed()
    }

    /// Sets the work still to do: total = current + `remaining`.
    pub fn progress_set_remaining(&self, remaining: u64) {
        self.job.progress_set_remaining(remaining);
    }

    /// Adds `delta` to the work still to do.
    pub fn progress_increase_remaining(&self, delta: u64) {
        self.job.total.fetch_add(delta, Ordering::AcqRel);
    }

    /// Records `n` units of work done (the current progress only grows).
    pub fn progress_done(&self, n: u64) {
        self.job.current.fetch_add(n, Ordering::AcqRel);
    }

    /// Applies the `on-error` policy to an I/O error: raises `BLOCK_JOB_ERROR` with the
    /// action taken; for `stop` (or `enospc` on ENOSPC) the job is paused as if by the
    /// user, its io-status set, and the caller retries after the next pause point.
    pub fn error_action(
        &self,
        policy: &BlockdevOnError,
        is_read: bool,
        err: &BlockError,
    ) -> ErrorAction {
        let errno = err.errno_value();
        let action = match policy {
            BlockdevOnError::Ignore => ErrorAction::Ignore,
            BlockdevOnError::Stop => ErrorAction::Stop,
            BlockdevOnError::Enospc if errno == libc::ENOSPC => ErrorAction::Stop,
            _ => ErrorAction::Report,
        };
        let j = &self.job;
        let mut st = lock(&j.state);
        j.events.push(BlockJobError::message(&BlockJobErrorData {
            device: j.id.clone(),
            operation: if is_read {
                IoOperationType::Read
            } else {
                IoOperationType::Write
            },
            action: match action {
                ErrorAction::Report => BlockErrorAction::Report,
                ErrorAction::Ignore => BlockErrorAction::Ignore,
                ErrorAction::Stop => BlockErrorAction::Stop,
            },
        }));
        if action == ErrorAction::Stop {
            if !st.user_paused {
                st.pause_count += 1;
                st.user_paused = true;
            }
            if st.iostatus == BlockDeviceIoStatus::Ok {
                st.iostatus = if errno == libc::ENOSPC {
                    BlockDeviceIoStatus::Nospace
                } else {
                    BlockDeviceIoStatus::Failed
                };
            }
        }
        log::debug!("job '{}': I/O error ({err}): {action:?}", j.id);
        action
    }

    /// Moves the job to `ready` and raises `BLOCK_JOB_READY` (jobs that can complete).
    pub fn set_ready(&self) {
        let j = &self.job;
        let mut st = lock(&j.state);
        if st.status != JobStatus::Running {
            return;
        }
        j.transition(&mut st, JobStatus::Ready);
        if let Some((t, len, offset)) = j.event_data() {
            j.events.push(BlockJobReady::message(&BlockJobReadyData {
                r#type: t,
                device: j.id.clone(),
                len,
                offset,
                speed: j.speed() as i64,
            }));
        }
    }

    /// Whether the job is ready (`ready` or `standby`).
    pub fn is_ready(&self) -> bool {
        is_ready(&lock(&self.job.state).status)
    }
}

/// A drained section above one of the job's roots pauses the job, as QEMU's
/// `child_job_drained_begin/_poll/_end` do: its requests in flight finish, it stops at its
/// next pause point (status `paused`, or `standby` when ready), and goes on when the
/// section ends.
impl DrainParticipant for Job {
    fn drained_begin(&self) {
        let mut st = lock(&self.state);
        st.pause_count += 1;
        self.kick_locked(&mut st);
    }

    fn drained_poll(&self) -> bool {
        // Until it is actually paused: a job that was sleeping is not busy and would issue
        // nothing before its pause point, but QEMU enters it at once on `job_pause`, so the
        // drain sees it paused (and its `paused` event comes) before the section goes on.
        let st = lock(&self.state);
        st.started && !st.paused && !st.deferred
    }

    fn drained_end(&self) {
        let mut st = lock(&self.state);
        st.pause_count = st.pause_count.saturating_sub(1);
        self.kick_locked(&mut st);
    }
}
