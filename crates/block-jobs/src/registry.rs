//! The registry of jobs ([`Jobs`]): creation, the verbs, and the end of a job's life on
//! the monitor's thread ([`Jobs::poll`]): statuses `waiting`, `pending`, `concluded`,
//! `null`, the graph hooks of the drivers, transactions, and the `BLOCK_JOB_*` events.
//! The engine module's documentation describes the threads and has an example.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use block_graph::events::{EventNotifier, EventQueue};
use block_graph::{BlockGraph, Node};
use qapi_types::event::{
    BlockJobCancelled, BlockJobCancelledData, BlockJobCompleted, BlockJobCompletedData,
    BlockJobPending, BlockJobPendingData,
};
use qapi_types::{BlockDeviceIoStatus, BlockJobInfo, JobInfo, JobStatus, JobVerb};

use crate::engine::{lock, Job, JobContext, JobDriver, JobSpec, State};
use crate::error::{JobError, Result};
use crate::ratelimit::RateLimiter;
use crate::status::{check_verb, is_completed, is_ready};

pub(crate) struct Registry {
    jobs: Mutex<Vec<Arc<Job>>>,
    events: Arc<EventQueue>,
    notifier: Mutex<Option<EventNotifier>>,
    pending: AtomicBool,
}

impl Registry {
    pub(crate) fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        let n = lock(&self.notifier).clone();
        if let Some(n) = n {
            n();
        }
    }
}

/// The registry of jobs: creates and starts them, applies the verbs, and finishes them on
/// the monitor's thread ([`Jobs::poll`]). Cheap to clone (all clones share the registry).
#[derive(Clone)]
pub struct Jobs {
    reg: Arc<Registry>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list().iter()).finish()
    }
}

/// A job's nodes are blocked for the graph's commands that change them (QEMU's
/// `block_job_add_bdrv` blocks every operation on them but dataplane).
impl block_graph::OpBlockers for Jobs {
    fn blocker(&self, node: &Arc<Node>) -> Option<String> {
        self.job_using(node).map(|j| Self::blocker_reason(&j))
    }
}

impl Jobs {
    /// A registry raising its events into `events`.
    pub fn new(events: Arc<EventQueue>) -> Self {
        Jobs {
            reg: Arc::new(Registry {
                jobs: Mutex::new(Vec::new()),
                events,
                notifier: Mutex::new(None),
                pending: AtomicBool::new(false),
            }),
        }
    }

    /// A registry raising its events into the graph's event queue.
    pub fn for_graph(g: &BlockGraph) -> Self {
        Self::new(g.event_queue().clone())
    }

    /// Sets the function called (on a worker thread) when a job needs the monitor's
    /// thread: the VMM's loop wakes up and calls [`Jobs::poll`].
    pub fn set_notifier(&self, n: Option<EventNotifier>) {
        *lock(&self.reg.notifier) = n;
    }

    /// The jobs, oldest first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        lock(&self.reg.jobs).clone()
    }

    /// The job named `id`.
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.reg.jobs).iter().find(|j| j.id == id).cloned()
    }

    /// QEMU's `find_job`: the job or "Job not found".
    pub fn get(&self, id: &str) -> Result<Arc<Job>> {
        self.find(id)
            .ok_or_else(|| JobError::generic("Job not found"))
    }

    /// QEMU's `find_block_job`: a block job or "Block job 'x' not found" (DeviceNotActive).
    pub fn get_block_job(&self, id: &str) -> Result<Arc<Job>> {
        self.find(id)
            .filter(|j| j.is_block_job())
            .ok_or_else(|| JobError::NotActive(format!("Block job '{id}' not found")))
    }

    /// Whether a job uses `node` (QEMU's op blockers); returns the job.
    pub fn job_using(&self, node: &Arc<Node>) -> Option<Arc<Job>> {
        self.list().into_iter().find(|j| {
            j.status() != JobStatus::Null
                && j.nodes
                    .iter()
                    .any(|w| w.upgrade().is_some_and(|n| Arc::ptr_eq(&n, node)))
        })
    }

    /// QEMU's blocker text for a node a job uses.
    fn blocker_reason(job: &Job) -> String {
        format!("block device is in use by block job: {}", job.kind.as_str())
    }

    /// Refuses nodes another job uses, with QEMU's message.
    pub fn check_blockers(&self, g: &BlockGraph, nodes: &[Arc<Node>]) -> Result<()> {
        for n in nodes {
            if let Some(j) = self.job_using(n) {
                return Err(JobError::generic(format!(
                    "Node '{}' is busy: {}",
                    g.device_or_node_name(n),
                    Self::blocker_reason(&j)
                )));
            }
        }
        Ok(())
    }

    /// Checks what [`Jobs::create`] would refuse (id, speed, nodes other jobs use), so that
    /// a command can check before it takes roots on the graph.
    pub fn check_spec(&self, g: &BlockGraph, spec: &JobSpec) -> Result<()> {
        if !block_graph::graph::id_wellformed(&spec.id) {
            return Err(JobError::generic(format!("Invalid job ID '{}'", spec.id)));
        }
        if self.find(&spec.id).is_some() {
            return Err(JobError::generic(format!(
                "Job ID '{}' already in use",
                spec.id
            )));
        }
        if spec.speed < 0 {
            return Err(JobError::generic("Invalid parameter 'speed'"));
        }
        self.check_blockers(g, &spec.nodes)
    }

    /// Creates a job in status `created` (QEMU's `job_create`); [`Jobs::start`] runs it.
    /// On error the driver is dropped (and the graph's permissions refreshed, in case it
    /// held roots).
    pub fn create(
        &self,
        g: &BlockGraph,
        spec: JobSpec,
        driver: Box<dyn JobDriver>,
    ) -> Result<Arc<Job>> {
        if let Err(e) = self.check_spec(g, &spec) {
            drop(driver);
            let _ = g.refresh_perms();
            return Err(e);
        }
        let speed = spec.speed as u64;
        let roots = driver.roots();
        let job = Arc::new(Job {
            id: spec.id.clone(),
            kind: driver.job_type(),
            auto_finalize: spec.auto_finalize,
            auto_dismiss: spec.auto_dismiss,
            can_complete: driver.can_complete(),
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 1,
                user_paused: false,
                paused: true,
                busy: false,
                cancelled: false,
                force_cancel: false,
                complete_requested: false,
                started: false,
                deferred: false,
                exited: false,
                ret: Ok(()),
                iostatus: BlockDeviceIoStatus::Ok,
                kicks: 0,
            }),
            cv: Condvar::new(),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            speed: AtomicU64::new(speed),
            limiter: Mutex::new(RateLimiter::new(speed)),
            driver: Mutex::new(Some(driver)),
            nodes: spec.nodes.iter().map(Arc::downgrade).collect(),
            txn: Mutex::new(spec.txn.clone()),
            reg: Arc::downgrade(&self.reg),
            events: self.reg.events.clone(),
            thread: Mutex::new(None),
        });
        {
            let mut st = lock(&job.state);
            job.transition(&mut st, JobStatus::Created);
        }
        job.join_drains(&roots);
        if let Some(t) = &spec.txn {
            t.add(&job);
        }
        // QEMU lists the newest job first.
        lock(&self.reg.jobs).insert(0, job.clone());
        log::info!("job '{}' ({}) created", job.id, job.kind.as_str());
        Ok(job)
    }

    /// Starts a created job on its worker thread (QEMU's `job_start`).
    pub fn start(&self, job: &Arc<Job>) {
        let driver = {
            let mut st = lock(&job.state);
            if st.started || st.status != JobStatus::Created {
                return;
            }
            st.started = true;
            st.pause_count -= 1;
            st.busy = true;
            st.paused = false;
            job.transition(&mut st, JobStatus::Running);
            lock(&job.driver).take()
        };
        let Some(mut driver) = driver else {
            return;
        };
        let j = job.clone();
        let spawn = std::thread::Builder::new()
            .name(format!("job {}", job.id))
            .spawn(move || {
                let ctx = JobContext { job: j.clone() };
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    ctx.pause_point()?;
                    driver.run(&ctx)
                }))
                .unwrap_or_else(|_| Err(JobError::generic("the job's thread panicked")));
                *lock(&j.driver) = Some(driver);
                {
                    let mut st = lock(&j.state);
                    st.ret = r.map_err(|e| e.job_message());
                    st.deferred = true;
                }
                log::debug!("job '{}': run finished", j.id);
                if let Some(reg) = j.reg.upgrade() {
                    reg.wake();
                }
            });
        match spawn {
            Ok(h) => *lock(&job.thread) = Some(h),
            Err(e) => {
                log::error!("job '{}': cannot start a thread: {e}", job.id);
                let mut st = lock(&job.state);
                st.ret = Err(format!("cannot start the job's thread: {e}"));
                st.deferred = true;
                drop(st);
                self.reg.wake();
            }
        }
    }

    /// Whether a worker finished since the last [`Jobs::poll`] (cheap; the VMM may poll on
    /// every loop iteration anyway).
    pub fn has_work(&self) -> bool {
        self.reg.pending.load(Ordering::Acquire)
    }

    /// Finishes the jobs whose work is done (QEMU's `job_exit` on the main loop): statuses
    /// `waiting`, `pending`, `concluded`, `null`, the graph hooks and the events. Never
    /// waits for a worker. Call on the monitor's thread when woken.
    pub fn poll(&self, g: &mut BlockGraph) {
        // Cleared before the scan: a worker finishing meanwhile sets it again.
        if !self.reg.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        for job in self.list() {
            let exit = {
                let mut st = lock(&job.state);
                if st.deferred && !st.exited {
                    st.exited = true;
                    st.busy = false;
                    true
                } else {
                    false
                }
            };
            if exit {
                if let Some(h) = lock(&job.thread).take() {
                    let _ = h.join();
                }
                self.completed(g, &job);
            }
        }
    }

    /// Polls until the job `id` is gone or concluded, or `timeout` passed (for tests,
    /// tools and shutdown paths that have no event loop); returns its last status.
    pub fn wait_finished(
        &self,
        g: &mut BlockGraph,
        id: &str,
        timeout: Duration,
    ) -> Option<JobStatus> {
        let job = self.find(id)?;
        let end = Instant::now() + timeout;
        loop {
            self.poll(g);
            let s = job.status();
            if matches!(s, JobStatus::Null | JobStatus::Concluded) || Instant::now() >= end {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn txn_jobs(job: &Arc<Job>) -> Vec<Arc<Job>> {
        match lock(&job.txn).clone() {
            Some(t) => t.jobs(),
            None => vec![job.clone()],
        }
    }

    /// QEMU's `job_update_rc`: a force-cancelled job fails with ECANCELED.
    fn update_rc(job: &Job, st: &mut State) {
        if st.ret.is_ok() && st.force_cancel {
            st.ret = Err(JobError::Cancelled.job_message());
        }
        if st.ret.is_err() && st.status != JobStatus::Aborting {
            job.transition(st, JobStatus::Aborting);
        }
    }

    fn completed(&self, g: &mut BlockGraph, job: &Arc<Job>) {
        let failed = {
            let mut st = lock(&job.state);
            Self::update_rc(job, &mut st);
            st.ret.is_err()
        };
        if failed {
            self.txn_abort(g, job);
        } else {
            self.txn_success(g, job);
        }
    }

    fn txn_success(&self, g: &mut BlockGraph, job: &Arc<Job>) {
        {
            let mut st = lock(&job.state);
            job.transition(&mut st, JobStatus::Waiting);
        }
        let all = Self::txn_jobs(job);
        if all.iter().any(|j| !is_completed(&j.status())) {
            return;
        }
        for j in &all {
            let mut st = lock(&j.state);
            j.transition(&mut st, JobStatus::Pending);
            if !j.auto_finalize {
                j.events
                    .push(BlockJobPending::message(&BlockJobPendingData {
                        r#type: j.kind.clone(),
                        id: j.id.clone(),
                    }));
            }
        }
        if all.iter().all(|j| j.auto_finalize) {
            self.do_finalize(g, job);
        }
    }

    fn with_driver(job: &Arc<Job>, f: impl FnOnce(&mut dyn JobDriver, &JobContext)) {
        let d = lock(&job.driver).take();
        if let Some(mut d) = d {
            let ctx = JobContext { job: job.clone() };
            f(&mut *d, &ctx);
            *lock(&job.driver) = Some(d);
        }
    }

    fn do_finalize(&self, g: &mut BlockGraph, job: &Arc<Job>) {
        let all = Self::txn_jobs(job);
        let mut failed = false;
        for j in &all {
            if lock(&j.state).ret.is_err() {
                failed = true;
                break;
            }
            let mut r = Ok(());
            Self::with_driver(j, |d, ctx| r = d.prepare(ctx, g));
            if let Err(e) = r {
                log::warn!("job '{}': prepare failed: {e}", j.id);
                let mut st = lock(&j.state);
                st.ret = Err(e.job_message());
                Self::update_rc(j, &mut st);
                failed = true;
                break;
            }
        }
        if failed {
            self.txn_abort(g, job);
        } else {
            for j in &all {
                self.finalize_single(g, j);
            }
        }
    }

    /// QEMU's `job_completed_txn_abort`: cancels the other jobs of the group and, once
    /// all finished their work, aborts them all. Other jobs still running finish later
    /// (their `poll` calls this again).
    fn txn_abort(&self, g: &mut BlockGraph, job: &Arc<Job>) {
        let txn = lock(&job.txn).clone();
        let Some(txn) = txn else {
            self.finalize_single(g, job);
            return;
        };
        if !txn.0.aborting.swap(true, Ordering::AcqRel) {
            for other in txn.jobs() {
                if !Arc::ptr_eq(&other, job) {
                    self.cancel_async(&other, true);
                }
            }
        }
        let all = txn.jobs();
        // Jobs never started cannot finish on their own: they abort right away.
        for j in &all {
            let mut st = lock(&j.state);
            if !st.started && !is_completed(&st.status) {
                st.exited = true;
                Self::update_rc(j, &mut st);
            }
        }
        let done = |j: &Arc<Job>| {
            let st = lock(&j.state);
            is_completed(&st.status) && (!st.started || st.exited)
        };
        if !all.iter().all(done) {
            return;
        }
        for j in &all {
            self.finalize_single(g, j);
        }
    }

    fn finalize_single(&self, g: &mut BlockGraph, job: &Arc<Job>) {
        let (ok, started, cancelled) = {
            let mut st = lock(&job.state);
            if matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
                return;
            }
            Self::update_rc(job, &mut st);
            (st.ret.is_ok(), st.started, st.force_cancel)
        };
        Self::with_driver(job, |d, ctx| {
            if ok {
                d.commit(ctx, g);
            } else {
                d.abort(ctx, g);
            }
            d.clean(ctx, g);
        });
        // The driver (and what it still holds) goes away with the job's graph work.
        drop(lock(&job.driver).take());
        if started {
            if let Some((t, len, offset)) = job.event_data() {
                let speed = job.speed() as i64;
                if cancelled {
                    job.events
                        .push(BlockJobCancelled::message(&BlockJobCancelledData {
                            r#type: t,
                            device: job.id.clone(),
                            len,
                            offset,
                            speed,
                        }));
                } else {
                    job.events
                        .push(BlockJobCompleted::message(&BlockJobCompletedData {
                            r#type: t,
                            device: job.id.clone(),
                            len,
                            offset,
                            speed,
                            error: job.error(),
                        }));
                }
            }
        }
        if let Some(t) = lock(&job.txn).take() {
            t.remove(job);
        }
        let dismiss = {
            let mut st = lock(&job.state);
            job.transition(&mut st, JobStatus::Concluded);
            job.auto_dismiss || !started
        };
        log::info!(
            "job '{}' concluded: {}",
            job.id,
            job.error().unwrap_or_else(|| "success".into())
        );
        if dismiss {
            self.do_dismiss(job);
        }
    }

    fn do_dismiss(&self, job: &Arc<Job>) {
        {
            let mut st = lock(&job.state);
            st.busy = false;
            st.paused = false;
            st.deferred = true;
            st.exited = true;
            job.transition(&mut st, JobStatus::Null);
        }
        if let Some(t) = lock(&job.txn).take() {
            t.remove(job);
        }
        lock(&self.reg.jobs).retain(|j| !Arc::ptr_eq(j, job));
    }

    /// QEMU's `job_cancel_async`.
    fn cancel_async(&self, job: &Arc<Job>, force: bool) {
        let mut st = lock(&job.state);
        let force = if job.can_complete {
            force || !is_ready(&st.status)
        } else {
            true
        };
        if st.user_paused {
            st.user_paused = false;
            st.iostatus = BlockDeviceIoStatus::Ok;
            st.pause_count = st.pause_count.saturating_sub(1);
        }
        if force || !st.deferred {
            st.cancelled = true;
            st.force_cancel |= force;
        }
        job.kick_locked(&mut st);
    }

    /// `job-cancel` / `block-job-cancel` (QEMU's `job_user_cancel`).
    pub fn cancel(&self, g: &mut BlockGraph, id: &str, force: bool) -> Result<()> {
        let job = self.get(id)?;
        self.cancel_job(g, &job, force)
    }

    /// [`Jobs::cancel`] of a job already looked up.
    pub fn cancel_job(&self, g: &mut BlockGraph, job: &Arc<Job>, force: bool) -> Result<()> {
        check_verb(&job.id, &job.status(), &JobVerb::Cancel)?;
        self.cancel_locked(g, job, force);
        Ok(())
    }

    fn cancel_locked(&self, g: &mut BlockGraph, job: &Arc<Job>, force: bool) {
        if job.status() == JobStatus::Concluded {
            self.do_dismiss(job);
            return;
        }
        self.cancel_async(job, force);
        let (started, exited, forced) = {
            let st = lock(&job.state);
            (st.started, st.exited, st.force_cancel)
        };
        if !started {
            {
                let mut st = lock(&job.state);
                st.exited = true;
                st.deferred = true;
            }
            self.completed(g, job);
        } else if exited && forced {
            // Done with its work (waiting for the group, or pending finalization).
            self.txn_abort(g, job);
        }
    }

    /// `job-pause` / `block-job-pause`.
    pub fn pause(&self, id: &str) -> Result<()> {
        let job = self.get(id)?;
        self.pause_job(&job)
    }

    /// [`Jobs::pause`] of a job already looked up.
    pub fn pause_job(&self, job: &Arc<Job>) -> Result<()> {
        let mut st = lock(&job.state);
        check_verb(&job.id, &st.status, &JobVerb::Pause)?;
        if st.user_paused {
            return Err(JobError::generic("Job is already paused"));
        }
        st.user_paused = true;
        st.pause_count += 1;
        job.kick_locked(&mut st);
        Ok(())
    }

    /// `job-resume` / `block-job-resume` (the io-status is reset).
    pub fn resume(&self, id: &str) -> Result<()> {
        let job = self.get(id)?;
        self.resume_job(&job)
    }

    /// Resets the I/O status of every job to `ok` (QEMU's `qmp_cont` does this for the block
    /// jobs, as for the BlockBackends): a job paused by an I/O error stays paused, but no
    /// longer reports the error.
    pub fn iostatus_reset_all(&self) {
        for job in self.list() {
            lock(&job.state).iostatus = BlockDeviceIoStatus::Ok;
        }
    }

    /// [`Jobs::resume`] of a job already looked up.
    pub fn resume_job(&self, job: &Arc<Job>) -> Result<()> {
        let mut st = lock(&job.state);
        if !st.user_paused || st.pause_count == 0 {
            return Err(JobError::generic("Can't resume a job that was not paused"));
        }
        check_verb(&job.id, &st.status, &JobVerb::Resume)?;
        st.iostatus = BlockDeviceIoStatus::Ok;
        st.user_paused = false;
        st.pause_count -= 1;
        job.kick_locked(&mut st);
        Ok(())
    }

    /// `job-complete` / `block-job-complete`.
    pub fn complete(&self, id: &str) -> Result<()> {
        let job = self.get(id)?;
        self.complete_job(&job)
    }

    /// [`Jobs::complete`] of a job already looked up.
    pub fn complete_job(&self, job: &Arc<Job>) -> Result<()> {
        let mut st = lock(&job.state);
        check_verb(&job.id, &st.status, &JobVerb::Complete)?;
        if st.cancelled || !job.can_complete {
            return Err(JobError::generic(format!(
                "The active block job '{}' cannot be completed",
                job.id
            )));
        }
        st.complete_requested = true;
        job.kick_locked(&mut st);
        Ok(())
    }

    /// `job-finalize` / `block-job-finalize`.
    pub fn finalize(&self, g: &mut BlockGraph, id: &str) -> Result<()> {
        let job = self.get(id)?;
        self.finalize_job(g, &job)
    }

    /// [`Jobs::finalize`] of a job already looked up.
    pub fn finalize_job(&self, g: &mut BlockGraph, job: &Arc<Job>) -> Result<()> {
        check_verb(&job.id, &job.status(), &JobVerb::Finalize)?;
        self.do_finalize(g, job);
        Ok(())
    }

    /// `job-dismiss` / `block-job-dismiss`.
    pub fn dismiss(&self, id: &str) -> Result<()> {
        let job = self.get(id)?;
        self.dismiss_job(&job)
    }

    /// [`Jobs::dismiss`] of a job already looked up.
    pub fn dismiss_job(&self, job: &Arc<Job>) -> Result<()> {
        check_verb(&job.id, &job.status(), &JobVerb::Dismiss)?;
        self.do_dismiss(job);
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, job: &Arc<Job>, speed: i64) -> Result<()> {
        let mut st = lock(&job.state);
        check_verb(&job.id, &st.status, &JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err(JobError::generic("Invalid parameter 'speed'"));
        }
        lock(&job.limiter).set_rate(speed as u64);
        job.speed.store(speed as u64, Ordering::Release);
        job.kick_locked(&mut st);
        Ok(())
    }

    /// `query-block-jobs`: the block jobs, newest first.
    pub fn query_block_jobs(&self) -> Vec<BlockJobInfo> {
        self.list()
            .iter()
            .filter(|j| j.is_block_job())
            .map(|j| j.block_info())
            .collect()
    }

    /// `query-jobs`: every job, newest first.
    pub fn query_jobs(&self) -> Vec<JobInfo> {
        self.list().iter().map(|j| j.info()).collect()
    }

    /// Cancels every job (with force) and waits up to `timeout` for them to finish, then
    /// finishes them (QEMU's `job_cancel_sync_all` at exit). Jobs that do not stop in time
    /// are left to their threads and logged.
    pub fn cancel_all_sync(&self, g: &mut BlockGraph, timeout: Duration) {
        for j in self.list() {
            let s = j.status();
            if s == JobStatus::Concluded {
                self.do_dismiss(&j);
            } else if s != JobStatus::Null {
                self.cancel_locked(g, &j, true);
            }
        }
        let end = Instant::now() + timeout;
        loop {
            self.poll(g);
            if self.list().is_empty() {
                return;
            }
            if Instant::now() >= end {
                for j in self.list() {
                    log::error!("job '{}' did not stop in time", j.id);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
