//! What the VMM implements ([`Handler`]) and what it gets per call
//! ([`CallContext`]).

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::OwnedFd;

use serde_json::Value;

use crate::error::QmpError;
use crate::message::{EventMessage, Request};

/// Identifies one client connection for the server's lifetime (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qmp-client-{}", self.0)
    }
}

/// What the VMM implements to execute QMP commands.
pub trait Handler {
    /// Executes one request (never `qmp_capabilities`, which the session
    /// handles). Commands without a return value return `json!({})`, as
    /// QEMU does. For an unknown command return
    /// [`QmpError::command_not_found`]; for `request.oob` on a command that
    /// cannot run out of band, [`QmpError::oob_not_supported`].
    fn execute(&mut self, call: &mut CallContext<'_>, request: &Request)
        -> Result<Value, QmpError>;

    /// A client connected (its greeting is queued).
    fn client_connected(&mut self, _id: ClientId) {}

    /// A client is gone (it disconnected, or was disconnected).
    fn client_disconnected(&mut self, _id: ClientId) {}
}

/// What a [`Handler`] gets besides the request.
pub struct CallContext<'a> {
    pub(super) client: ClientId,
    pub(super) fds: &'a mut VecDeque<OwnedFd>,
    pub(super) shutdown: &'a mut bool,
    pub(super) events: &'a mut Vec<EventMessage>,
}

impl fmt::Debug for CallContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("client", &self.client)
            .field("fds", &self.fds.len())
            .field("shutdown", &*self.shutdown)
            .field("events", &self.events.len())
            .finish()
    }
}

impl CallContext<'_> {
    /// The client that sent the request.
    pub fn client_id(&self) -> ClientId {
        self.client
    }

    /// Number of file descriptors that arrived with the request's bytes
    /// (Unix sockets only) and are not taken yet.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }

    /// Takes the first file descriptor that arrived with the request.
    /// Descriptors not taken are closed after the call.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Takes all file descriptors that arrived with the request.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.fds.drain(..).collect()
    }

    /// Asks the server to stop once this reply is sent (for `quit`): see
    /// [`QmpServer::shutdown_requested`](super::QmpServer::shutdown_requested).
    pub fn request_shutdown(&mut self) {
        *self.shutdown = true;
    }

    /// Sends an event to every negotiated client. The calling client gets
    /// it before this request's reply, as with QEMU's events raised while a
    /// command runs.
    pub fn broadcast(&mut self, event: EventMessage) {
        self.events.push(event);
    }
}
