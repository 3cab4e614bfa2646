//! QEMU Machine Protocol (QMP): the wire protocol, without any command.
//!
//! This crate knows messages, errors and framing; it knows nothing of what
//! commands exist. Pair it with a schema crate (such as `qapi-types`) for
//! typed commands.

#![deny(missing_docs)]

pub mod client;
pub mod command;
pub mod encode;
pub mod error;
pub mod framer;
pub mod json;
pub mod message;
pub mod server;
pub mod session;
mod sys;

pub use command::{Command, Event};
pub use error::{ErrorClass, QmpError};
pub use message::{EventMessage, Request, Response, Timestamp};
