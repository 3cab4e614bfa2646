//! The QMP commands of the jobs, registered on a `qapi_types::Dispatcher`: `block-stream`,
//! `block-commit`, the `block-job-*` commands, the `job-*` commands, `query-block-jobs`
//! and `query-jobs`. Lookups and errors follow QEMU 7.2: the `block-job-*` commands find
//! block jobs by id ("Block job 'x' not found", class DeviceNotActive), the `job-*` commands
//! any job ("Job not found").
//!
//! ```
//! use block_graph::BlockGraph;
//! use block_jobs::Jobs;
//! use qapi_types::Dispatcher;
//! use qmp_proto::Request;
//! use serde_json::json;
//!
//! struct Vmm { block: BlockGraph, jobs: Jobs }
//! let block = BlockGraph::new();
//! let jobs = Jobs::for_graph(&block);
//! let mut vmm = Vmm { block, jobs };
//! let mut d = Dispatcher::<Vmm>::new();
//! block_graph::register(&mut d, |v| &mut v.block);
//! block_jobs::qmp::register(&mut d, |v| (&v.jobs, &mut v.block));
//! let run = |d: &Dispatcher<Vmm>, v: &mut Vmm, cmd: &str, args: serde_json::Value| {
//!     let req = Request { id: None, command: cmd.into(),
//!         arguments: args.as_object().cloned().unwrap_or_default(), oob: false };
//!     d.dispatch(v, &req)
//! };
//! assert_eq!(run(&d, &mut vmm, "query-block-jobs", json!({})).unwrap(), json!([]));
//! let e = run(&d, &mut vmm, "block-job-pause", json!({"device": "j0"})).unwrap_err();
//! assert_eq!(e.desc, "Block job 'j0' not found");
//! let e = run(&d, &mut vmm, "job-pause", json!({"id": "j0"})).unwrap_err();
//! assert_eq!(e.desc, "Job not found");
//! let e = run(&d, &mut vmm, "block-commit", json!({"device": "nope"})).unwrap_err();
//! assert_eq!(e.desc, "Device 'nope' not found");
//! ```

use block_graph::BlockGraph;
use qapi_types::{cmd, Dispatcher};
use qmp_proto::QmpError;

use crate::error::{JobError, Result};
use crate::registry::Jobs;

/// The names of the commands [`register`] installs.
pub const COMMANDS: &[&str] = &[
    "block-stream",
    "block-commit",
    "drive-mirror",
    "blockdev-mirror",
    "drive-backup",
    "blockdev-backup",
    "block-job-set-speed",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "query-block-jobs",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-dismiss",
    "job-finalize",
    "query-jobs",
];

fn q<T>(r: Result<T>) -> std::result::Result<T, QmpError> {
    r.map_err(QmpError::from)
}

/// Registers the job commands on `d`; `get` finds the registry and the graph in the
/// dispatcher's context.
pub fn register<C: 'static>(d: &mut Dispatcher<C>, get: fn(&mut C) -> (&Jobs, &mut BlockGraph)) {
    d.register::<cmd::BlockStream>(move |c, a| {
        let (j, g) = get(c);
        q(crate::stream::block_stream(j, g, &a))
    });
    d.register::<cmd::BlockCommit>(move |c, a| {
        let (j, g) = get(c);
        q(crate::commit::block_commit(j, g, &a))
    });
    d.register::<cmd::DriveMirror>(move |c, a| {
        let (j, g) = get(c);
        q(crate::mirror::drive_mirror(g, j, &a).map(|_| ()))
    });
    d.register::<cmd::BlockdevMirror>(move |c, a| {
        let (j, g) = get(c);
        q(crate::mirror::blockdev_mirror(g, j, &a).map(|_| ()))
    });
    d.register::<cmd::DriveBackup>(move |c, a| {
        let (j, g) = get(c);
        q(crate::backup::drive_backup(g, j, &a, None).map(|job| j.start(&job)))
    });
    d.register::<cmd::BlockdevBackup>(move |c, a| {
        let (j, g) = get(c);
        q(crate::backup::blockdev_backup(g, j, &a, None).map(|job| j.start(&job)))
    });
    d.register::<cmd::BlockJobSetSpeed>(move |c, a| {
        let (j, _) = get(c);
        q(j.get_block_job(&a.device)
            .and_then(|job| j.set_speed(&job, a.speed)))
    });
    d.register::<cmd::BlockJobCancel>(move |c, a| {
        let (j, g) = get(c);
        q((|| {
            let job = j.get_block_job(&a.device)?;
            let force = a.force.unwrap_or(false);
            if job.is_user_paused() && !force {
                return Err(JobError::generic(format!(
                    "The block job for device '{}' is currently paused",
                    a.device
                )));
            }
            j.cancel_job(g, &job, force)
        })())
    });
    d.register::<cmd::BlockJobPause>(move |c, a| {
        let (j, _) = get(c);
        q(j.get_block_job(&a.device).and_then(|job| j.pause_job(&job)))
    });
    d.register::<cmd::BlockJobResume>(move |c, a| {
        let (j, _) = get(c);
        q(j.get_block_job(&a.device)
            .and_then(|job| j.resume_job(&job)))
    });
    d.register::<cmd::BlockJobComplete>(move |c, a| {
        let (j, _) = get(c);
        q(j.get_block_job(&a.device)
            .and_then(|job| j.complete_job(&job)))
    });
    d.register::<cmd::BlockJobDismiss>(move |c, a| {
        let (j, _) = get(c);
        q(j.get_block_job(&a.id).and_then(|job| j.dismiss_job(&job)))
    });
    d.register::<cmd::BlockJobFinalize>(move |c, a| {
        let (j, g) = get(c);
        q(j.get_block_job(&a.id)
            .and_then(|job| j.finalize_job(g, &job)))
    });
    d.register::<cmd::QueryBlockJobs>(move |c, _| Ok(get(c).0.query_block_jobs()));
    d.register::<cmd::JobPause>(move |c, a| q(get(c).0.pause(&a.id)));
    d.register::<cmd::JobResume>(move |c, a| q(get(c).0.resume(&a.id)));
    d.register::<cmd::JobCancel>(move |c, a| {
        let (j, g) = get(c);
        q(j.cancel(g, &a.id, true))
    });
    d.register::<cmd::JobComplete>(move |c, a| q(get(c).0.complete(&a.id)));
    d.register::<cmd::JobDismiss>(move |c, a| q(get(c).0.dismiss(&a.id)));
    d.register::<cmd::JobFinalize>(move |c, a| {
        let (j, g) = get(c);
        q(j.finalize(g, &a.id))
    });
    d.register::<cmd::QueryJobs>(move |c, _| Ok(get(c).0.query_jobs()));
}

/// Installs the job actions of `transaction` (see [`crate::txn`]) in the graph.
pub fn install_transaction_actions(g: &mut BlockGraph, jobs: &Jobs) {
    g.set_transaction_extension(Some(Box::new(crate::txn::JobActions::new(jobs.clone()))));
}

/// Makes the graph's commands that change a node (snapshots, `change-backing-file`,
/// `blockdev-del`, removing a medium) refuse the nodes of a running job, with QEMU's
/// "Node 'x' is busy: block device is in use by block job: mirror".
pub fn install_op_blockers(g: &mut BlockGraph, jobs: &Jobs) {
    g.set_op_blockers(Some(std::sync::Arc::new(jobs.clone())));
}
