//! The job actions of `transaction` (`drive-backup`, `blockdev-backup`), plugged into the
//! block graph's transaction as its [`TransactionExtension`].
//!
//! An action's prepare creates its job (status `created`, so a failed transaction leaves
//! nothing running); the transaction's commit starts it, its abort cancels it. With
//! `completion-mode` `grouped`, the jobs of one transaction share a [`JobTxn`]: none
//! finalizes before all finished, and one failure aborts them all.
//!
//! New actions go in [`prepare_job_action`]: a match arm that creates the job with
//! `spec.txn = txn` and returns [`StartJob`].
//!
//! ```
//! use block_graph::BlockGraph;
//! use block_jobs::{txn::JobActions, Jobs};
//!
//! let mut g = BlockGraph::new();
//! let jobs = Jobs::for_graph(&g);
//! g.set_transaction_extension(Some(Box::new(JobActions::new(jobs.clone()))));
//! ```

use std::sync::{Arc, Mutex};

use block_graph::transaction::{PreparedAction, TransactionExtension};
use block_graph::{BlockError, BlockGraph};
use qapi_types::{ActionCompletionMode, TransactionAction, TransactionProperties};

use crate::engine::{Job, JobTxn};
use crate::error::JobError;
use crate::registry::Jobs;

/// The extension the engine installs with `BlockGraph::set_transaction_extension`.
pub struct JobActions {
    jobs: Jobs,
    group: Arc<Mutex<Option<JobTxn>>>,
}

impl std::fmt::Debug for JobActions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobActions").finish_non_exhaustive()
    }
}

impl JobActions {
    /// The extension for the registry `jobs`.
    pub fn new(jobs: Jobs) -> Self {
        JobActions {
            jobs,
            group: Arc::new(Mutex::new(None)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Converts a job error into the block layer's (the transaction's error type).
pub fn to_block_error(e: JobError) -> BlockError {
    match e {
        JobError::Block(b) => b,
        JobError::DeviceNotFound(m) => BlockError::DeviceNotFound(m),
        other => BlockError::generic(other.to_string()),
    }
}

impl TransactionExtension for JobActions {
    fn prepare(
        &mut self,
        g: &mut BlockGraph,
        action: &TransactionAction,
        props: &TransactionProperties,
    ) -> block_graph::Result<Option<Box<dyn PreparedAction>>> {
        let grouped = matches!(props.completion_mode, Some(ActionCompletionMode::Grouped));
        // The group lives from the first job action of a transaction until its first
        // commit or abort (all prepares come before any of those).
        let (txn, created) = if grouped {
            let mut gr = lock(&self.group);
            let created = gr.is_none();
            (Some(gr.get_or_insert_with(JobTxn::new).clone()), created)
        } else {
            (None, false)
        };
        match prepare_job_action(&self.jobs, g, action, txn) {
            Ok(Some(p)) => Ok(Some(Box::new(EndsGroup {
                inner: p,
                group: self.group.clone(),
            }))),
            Ok(None) => {
                if created {
                    *lock(&self.group) = None;
                }
                Ok(None)
            }
            Err(e) => {
                if created {
                    *lock(&self.group) = None;
                }
                Err(to_block_error(e))
            }
        }
    }
}

/// Prepares a job action: `Ok(None)` for kinds that are not job actions. `txn` is the
/// group of a `grouped` transaction.
pub fn prepare_job_action(
    jobs: &Jobs,
    g: &mut BlockGraph,
    action: &TransactionAction,
    txn: Option<JobTxn>,
) -> Result<Option<Box<dyn PreparedAction>>, JobError> {
    use qapi_types::TransactionActionBranch as A;
    let job = match &action.r#type {
        A::DriveBackup(w) => crate::backup::drive_backup(g, jobs, &w.data, txn)?,
        A::BlockdevBackup(w) => crate::backup::blockdev_backup(g, jobs, &w.data, txn)?,
        // Every other kind is the graph's business.
        _ => return Ok(None),
    };
    Ok(Some(Box::new(StartJob::new(jobs.clone(), job))))
}

/// A job created by a transaction's prepare: commit starts it, abort cancels it (it then
/// runs its `abort` and `clean` hooks and disappears without events, as QEMU's).
pub struct StartJob {
    jobs: Jobs,
    job: Arc<Job>,
}

impl StartJob {
    /// The action of the created job `job`.
    pub fn new(jobs: Jobs, job: Arc<Job>) -> Self {
        StartJob { jobs, job }
    }
}

impl PreparedAction for StartJob {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {
        self.jobs.start(&self.job);
    }

    fn abort(self: Box<Self>, g: &mut BlockGraph) {
        if let Err(e) = self.jobs.cancel_job(g, &self.job, true) {
            log::error!("cancelling job '{}' failed: {e}", self.job.id());
        }
    }
}

struct EndsGroup {
    inner: Box<dyn PreparedAction>,
    group: Arc<Mutex<Option<JobTxn>>>,
}

impl PreparedAction for EndsGroup {
    fn commit(self: Box<Self>, g: &mut BlockGraph) {
        *lock(&self.group) = None;
        self.inner.commit(g);
    }

    fn abort(self: Box<Self>, g: &mut BlockGraph) {
        *lock(&self.group) = None;
        self.inner.abort(g);
    }
}
