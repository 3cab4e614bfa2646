//! QEMU's block jobs for Rust VMMs: a job engine with QEMU's states and verbs, and the
//! `block-stream` and `block-commit` jobs with their QMP commands.
//!
//! - [`Jobs`] is the registry: it creates jobs, applies the verbs (`job-pause`,
//!   `block-job-cancel`, ...) and, called from the VMM's loop with [`Jobs::poll`], finishes
//!   them on the monitor's thread, which owns the `BlockGraph`.
//! - [`JobDriver`] is what a job implements: a `run` loop on a worker thread of its own,
//!   which sees a [`JobContext`] (pause points, cancellation, rate limiting, progress,
//!   on-error policies), and graph hooks (`prepare`, `commit`, `abort`, `clean`) that run on
//!   the monitor's thread. The engine's module documentation has a complete example.
//! - [`stream`] and [`commit`] are the jobs; [`qmp::register`] installs their commands and
//!   the job commands on a `qapi_types::Dispatcher`; [`txn`] plugs the job actions of
//!   `transaction` into the block graph.
#![deny(missing_docs)]

pub mod backup;
pub mod chain;
pub mod commit;
pub mod copy;
pub mod engine;
pub mod error;
pub mod mirror;
pub mod qmp;
pub mod ratelimit;
pub mod registry;
pub mod status;
pub mod stream;
pub mod txn;

pub use engine::{ErrorAction, Job, JobContext, JobDriver, JobSpec, JobTxn};
pub use error::{JobError, Result};
pub use registry::Jobs;

#[cfg(test)]
mod engine_tests;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
