//! QEMU's job state machine: the statuses, the allowed transitions (`JobSTT`) and which
//! command verb each status accepts (`JobVerbTable`), as in QEMU 7.2's `job.c`.
//!
//! ```
//! use block_jobs::status::{check_verb, transition_allowed};
//! use qapi_types::{JobStatus, JobVerb};
//!
//! assert!(check_verb("job0", &JobStatus::Running, &JobVerb::Pause).is_ok());
//! let e = check_verb("job0", &JobStatus::Running, &JobVerb::Complete).unwrap_err();
//! assert_eq!(e.to_string(), "Job 'job0' in state 'running' cannot accept command verb 'complete'");
//! assert!(transition_allowed(&JobStatus::Ready, &JobStatus::Standby));
//! assert!(!transition_allowed(&JobStatus::Paused, &JobStatus::Ready));
//! ```

use qapi_types::{JobStatus, JobVerb};

use crate::error::JobError;

/// The statuses in QEMU's table order (U, C, R, P, Y, S, W, D, X, E, N).
pub const STATUSES: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

/// The verbs in QEMU's table order.
pub const VERBS: [JobVerb; 7] = [
    JobVerb::Cancel,
    JobVerb::Pause,
    JobVerb::Resume,
    JobVerb::SetSpeed,
    JobVerb::Complete,
    JobVerb::Dismiss,
    JobVerb::Finalize,
];

/// The index of a status in the tables (`None` for a value this version does not know).
pub fn status_index(s: &JobStatus) -> Option<usize> {
    STATUSES.iter().position(|x| x == s)
}

const T: bool = true;
const F: bool = false;

/// QEMU's `JobSTT[from][to]`.
const STT: [[bool; 11]; 11] = [
    /*            U  C  R  P  Y  S  W  D  X  E  N */
    /* U */
    [F, T, F, F, F, F, F, F, F, F, F],
    /* C */ [F, F, T, F, F, F, F, F, T, F, T],
    /* R */ [F, F, F, T, T, F, T, F, T, F, F],
    /* P */ [F, F, T, F, F, F, F, F, F, F, F],
    /* Y */ [F, F, F, F, F, T, T, F, T, F, F],
    /* S */ [F, F, F, F, T, F, F, F, F, F, F],
    /* W */ [F, F, F, F, F, F, F, T, T, F, F],
    /* D */ [F, F, F, F, F, F, F, F, T, T, F],
    /* X */ [F, F, F, F, F, F, F, F, T, T, F],
    /* E */ [F, F, F, F, F, F, F, F, F, F, T],
    /* N */ [F, F, F, F, F, F, F, F, F, F, F],
];

/// QEMU's `JobVerbTable[verb][status]` (7.2: `complete` is accepted in standby too).
const VERB_TABLE: [[bool; 11]; 7] = [
    /*                  U  C  R  P  Y  S  W  D  X  E  N */
    /* cancel    */
    [F, T, T, T, T, T, T, T, F, F, F],
    /* pause     */ [F, T, T, T, T, T, F, F, F, F, F],
    /* resume    */ [F, T, T, T, T, T, F, F, F, F, F],
    /* set-speed */ [F, T, T, T, T, T, F, F, F, F, F],
    /* complete  */ [F, F, F, F, T, T, F, F, F, F, F],
    /* dismiss   */ [F, F, F, F, F, F, F, F, F, T, F],
    /* finalize  */ [F, F, F, F, F, F, F, T, F, F, F],
];

/// Whether a job may go from `from` to `to`.
pub fn transition_allowed(from: &JobStatus, to: &JobStatus) -> bool {
    match (status_index(from), status_index(to)) {
        (Some(a), Some(b)) => STT[a][b],
        _ => false,
    }
}

/// Whether a job in `status` accepts `verb`.
pub fn verb_allowed(status: &JobStatus, verb: &JobVerb) -> bool {
    let v = VERBS.iter().position(|x| x == verb);
    match (v, status_index(status)) {
        (Some(v), Some(s)) => VERB_TABLE[v][s],
        _ => false,
    }
}

/// QEMU's `job_apply_verb`: `Ok` if allowed, else its error.
pub fn check_verb(id: &str, status: &JobStatus, verb: &JobVerb) -> Result<(), JobError> {
    if verb_allowed(status, verb) {
        return Ok(());
    }
    Err(JobError::generic(format!(
        "Job '{id}' in state '{}' cannot accept command verb '{}'",
        status.as_str(),
        verb.as_str()
    )))
}

/// Whether the job's work is over (QEMU's `job_is_completed`).
pub fn is_completed(s: &JobStatus) -> bool {
    matches!(
        s,
        JobStatus::Waiting
            | JobStatus::Pending
            | JobStatus::Aborting
            | JobStatus::Concluded
            | JobStatus::Null
    )
}

/// Whether the job is ready to be completed (QEMU's `job_is_ready`).
pub fn is_ready(s: &JobStatus) -> bool {
    matches!(s, JobStatus::Ready | JobStatus::Standby)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_in_every_state() {
        // Expected from QEMU 7.2's job.c, written out by verb name.
        let allowed: &[(&str, &[&str])] = &[
            (
                "cancel",
                &[
                    "created", "running", "paused", "ready", "standby", "waiting", "pending",
                ],
            ),
            (
                "pause",
                &["created", "running", "paused", "ready", "standby"],
            ),
            (
                "resume",
                &["created", "running", "paused", "ready", "standby"],
            ),
            (
                "set-speed",
                &["created", "running", "paused", "ready", "standby"],
            ),
            ("complete", &["ready", "standby"]),
            ("dismiss", &["concluded"]),
            ("finalize", &["pending"]),
        ];
        for verb in VERBS {
            let ok = allowed.iter().find(|(v, _)| *v == verb.as_str()).unwrap().1;
            for st in &STATUSES {
                let r = check_verb("j", st, &verb);
                if ok.contains(&st.as_str()) {
                    assert!(r.is_ok(), "{} in {}", verb.as_str(), st.as_str());
                } else {
                    assert_eq!(
                        r.unwrap_err().to_string(),
                        format!(
                            "Job 'j' in state '{}' cannot accept command verb '{}'",
                            st.as_str(),
                            verb.as_str()
                        )
                    );
                }
            }
        }
        let unknown = JobStatus::Unrecognized("x".into());
        assert!(!verb_allowed(&unknown, &JobVerb::Cancel));
    }

    #[test]
    fn transitions() {
        use JobStatus as S;
        let ok = [
            (S::Undefined, S::Created),
            (S::Created, S::Running),
            (S::Created, S::Aborting),
            (S::Created, S::Null),
            (S::Running, S::Paused),
            (S::Running, S::Ready),
            (S::Running, S::Waiting),
            (S::Running, S::Aborting),
            (S::Paused, S::Running),
            (S::Ready, S::Standby),
            (S::Ready, S::Waiting),
            (S::Ready, S::Aborting),
            (S::Standby, S::Ready),
            (S::Waiting, S::Pending),
            (S::Waiting, S::Aborting),
            (S::Pending, S::Aborting),
            (S::Pending, S::Concluded),
            (S::Aborting, S::Aborting),
            (S::Aborting, S::Concluded),
            (S::Concluded, S::Null),
        ];
        let mut n = 0;
        for a in &STATUSES {
            for b in &STATUSES {
                let want = ok.iter().any(|(x, y)| x == a && y == b);
                assert_eq!(transition_allowed(a, b), want, "{a:?} -> {b:?}");
                n += want as usize;
            }
        }
        assert_eq!(n, ok.len());
        assert!(is_completed(&S::Waiting) && !is_completed(&S::Standby));
        assert!(is_ready(&S::Standby) && !is_ready(&S::Paused));
    }
}
