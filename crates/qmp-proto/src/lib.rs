//! QEMU Machine Protocol (QMP): the wire protocol, without any command.
//!
//! This crate knows messages, errors and framing; it knows nothing of what
//! commands exist. Pair it with a schema crate (such as `qapi-types`) for
//! typed commands.
//!
//! - [`json`]: QMP's JSON dialect, parsed like QEMU 7.2 (errors included).
//! - [`framer`]: splits a byte stream into messages with QEMU's bounds.
//! - [`encode`]: prints JSON exactly as QEMU does.
//! - [`session`]: a sans-I/O server session (negotiation, envelope checks,
//!   ordered replies, events, back-pressure).
//! - [`client`]: a blocking client over Unix and TCP sockets.
//! - [`server`]: a `mio` server with Unix and TCP listeners and fd passing.

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

pub use server::{CallContext, ClientId, Handler, QmpServer, ServerConfig};
pub use session::{Session, SessionConfig};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
