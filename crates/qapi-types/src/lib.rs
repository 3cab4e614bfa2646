//! QEMU's QMP commands, events and types, generated at build time from the
//! QAPI schema in the workspace's `schema/` directory.
//!
//! - [`types`] (re-exported here): every enum, struct, flat union and
//!   alternate, with the exact wire names. Encoding and decoding go through
//!   [`QapiType`]; serde's traits are implemented on top (serialization as
//!   QMP sends it, deserialization lenient like a client should be).
//! - [`cmd`]: a marker type per command implementing
//!   [`qmp_proto::Command`], so a client can execute it with typed
//!   arguments and result.
//! - [`event`]: a marker type per event with a constructor of its message,
//!   and [`event::AnyEvent`] to decode what a server sends.
//! - [`handlers`]: one trait per command group (schema module) for servers,
//!   and [`Dispatcher`], which decodes arguments with QEMU's error messages
//!   and answers `query-commands` and `query-qmp-schema` from what is
//!   registered.
//!
//! Decoding comes in two modes: strict, as a QEMU server decodes arguments
//! (`Parameter 'x' is missing`, `Invalid parameter type for 'size',
//! expected: integer`, `Parameter 'y' is unexpected`), and lenient, for
//! replies and events from a possibly newer server (unknown members ignored,
//! unknown enum values kept as `Unknown`).
//!
//! ```
//! use qapi_types::{QapiType, RunState, StatusInfo};
//! use serde_json::json;
//!
//! let status = StatusInfo::from_qmp_strict(json!({"running": true, "singlestep": false, "status": "running"})).unwrap();
//! assert_eq!(status.status, RunState::Running);
//! let newer = StatusInfo::from_qmp_lenient(json!({"running": false, "singlestep": false, "status": "hibernating", "x": 1})).unwrap();
//! assert_eq!(newer.status, RunState::Unrecognized("hibernating".into()));
//! let err = StatusInfo::from_qmp_strict(json!({"running": "yes"})).unwrap_err();
//! assert_eq!(err.to_string(), "Invalid parameter type for 'running', expected: boolean");
//! ```

#![deny(missing_docs)]

mod dispatch;
pub mod runtime;

include!(concat!(env!("OUT_DIR"), "/qapi.rs"));

pub use dispatch::{full_schema_info, Dispatcher};
pub use handlers::*;
pub use runtime::{CommandSpec, DecodeError, Decoder, Empty, Null, QType, QapiType};
pub use types::*;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
