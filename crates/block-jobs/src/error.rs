//! The crate's error type.

use block_graph::BlockError;
use qmp_proto::{ErrorClass, QmpError};

/// Errors of the job engine and of the jobs.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job was cancelled (QEMU's `-ECANCELED`).
    #[error("Operation canceled")]
    Cancelled,
    /// A block layer error (an I/O error of the job, a graph change that failed).
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A command refused with a message (QEMU's `GenericError`).
    #[error("{0}")]
    Generic(String),
    /// A job or device that does not exist (QEMU's `DeviceNotActive`).
    #[error("{0}")]
    NotActive(String),
    /// A device that does not exist (QEMU's `DeviceNotFound`).
    #[error("{0}")]
    DeviceNotFound(String),
}

impl JobError {
    /// A generic error with `msg`.
    pub fn generic(msg: impl Into<String>) -> Self {
        JobError::Generic(msg.into())
    }

    /// The text QEMU shows for a job that ended with this error (`error` of
    /// `query-block-jobs` and `BLOCK_JOB_COMPLETED`): `strerror` of the errno for I/O
    /// errors, the message otherwise.
    pub fn job_message(&self) -> String {
        match self {
            JobError::Block(e @ BlockError::Io { .. }) => {
                block_graph::error::strerror(e.errno_value())
            }
            other => other.to_string(),
        }
    }
}

impl From<JobError> for QmpError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Block(b) => b.into(),
            JobError::NotActive(m) => QmpError::new(ErrorClass::DeviceNotActive, m),
            JobError::DeviceNotFound(m) => QmpError::new(ErrorClass::DeviceNotFound, m),
            other => QmpError::generic(other.to_string()),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = JobError> = std::result::Result<T, E>;
