//! Per-connection I/O helpers of the server.

use std::io::{self, Write};
use std::os::fd::AsRawFd;

use mio::{Interest, Registry, Token};

use super::{Conn, ConnStream};

impl ConnStream {
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            ConnStream::Unix(s) => s.as_raw_fd(),
            ConnStream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

pub(super) fn register_conn(registry: &Registry, conn: &mut Conn, token: Token) -> io::Result<()> {
    let interest = Interest::READABLE | Interest::WRITABLE;
    match &mut conn.stream {
        ConnStream::Unix(s) => registry.register(s, token, interest)?,
        ConnStream::Tcp(s) => registry.register(s, token, interest)?,
    }
    conn.registered = true;
    Ok(())
}

/// Re-registering makes epoll report the socket again if it is ready.
pub(super) fn rearm(registry: &Registry, conn: &mut Conn, token: Token) {
    if !conn.registered {
        return;
    }
    let interest = Interest::READABLE | Interest::WRITABLE;
    let r = match &mut conn.stream {
        ConnStream::Unix(s) => registry.reregister(s, token, interest),
        ConnStream::Tcp(s) => registry.reregister(s, token, interest),
    };
    if let Err(e) = r {
        log::warn!("{}: cannot re-register: {e}", conn.id);
        conn.dead = true;
    }
}

/// Writes as much pending output as the socket takes. Returns false if the
/// connection failed.
pub(super) fn flush_conn(conn: &mut Conn) -> bool {
    while conn.session.output_len() > 0 {
        let out = conn.session.pending_output();
        let r = match &mut conn.stream {
            ConnStream::Unix(s) => s.write(out),
            ConnStream::Tcp(s) => s.write(out),
        };
        match r {
            Ok(0) => return false,
            Ok(n) => conn.session.consume_output(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("{}: write failed: {e}", conn.id);
                return false;
            }
        }
    }
    true
}
