//! The per-client state machine of the server: moving a connection's data
//! (flush output, run the requests its session has parsed, read more input
//! within a budget, note end of file), attaching received file descriptors
//! to the request they came with, and closing the connection when it is done.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsFd;

use mio::{Registry, Token};

use super::conn::{flush_conn, rearm};
use super::{CallContext, Conn, ConnStream, Handler, QmpServer, Slot};
use crate::message::{Request, Response};
use crate::sys;

/// Reads per client per event before yielding to other clients.
const READ_BUDGET: usize = 16;

impl QmpServer {
    pub(super) fn pump_slot(
        &mut self,
        idx: usize,
        registry: &Registry,
        handler: &mut impl Handler,
    ) {
        let Some(Some(Slot::Client(mut conn))) = self.slots.get_mut(idx).map(Option::take) else {
            return;
        };
        let token = self.token(idx);
        if self.pump(&mut conn, registry, token, handler) {
            self.slots[idx] = Some(Slot::Client(conn));
        } else {
            if conn.registered {
                let _ = match &mut conn.stream {
                    ConnStream::Unix(s) => registry.deregister(s),
                    ConnStream::Tcp(s) => registry.deregister(s),
                };
                conn.registered = false;
            }
            self.close_conn(conn, handler);
        }
    }

    pub(super) fn close_conn(&mut self, conn: Box<Conn>, handler: &mut impl Handler) {
        let id = conn.id;
        log::debug!("{id} disconnected");
        drop(conn);
        handler.client_disconnected(id);
    }

    /// Moves a client's data as far as it goes. Returns false when the
    /// client must be closed.
    fn pump(
        &mut self,
        conn: &mut Conn,
        registry: &Registry,
        token: Token,
        handler: &mut impl Handler,
    ) -> bool {
        let mut reads = 0;
        loop {
            if conn.dead || !flush_conn(conn) {
                return false;
            }
            while let Some(request) = conn.session.next_request() {
                self.run_request(conn, request, handler);
                if !flush_conn(conn) {
                    return false;
                }
            }
            if conn.session.must_disconnect() {
                return false;
            }
            if conn.eof {
                // Everything received is processed unless output is backed
                // up; close once the client has been sent its replies.
                return conn.session.output_len() > 0;
            }
            if !(conn.readable && conn.session.wants_input()) {
                return true;
            }
            if reads == READ_BUDGET {
                // Let other clients have a turn; an event brings us back.
                rearm(registry, conn, token);
                return true;
            }
            reads += 1;
            match self.read_conn(conn) {
                Ok(0) => conn.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: read failed: {e}", conn.id);
                    return false;
                }
            }
        }
    }

    fn read_conn(&mut self, conn: &mut Conn) -> io::Result<usize> {
        let buf = &mut self.read_buf[..];
        let n = match &mut conn.stream {
            ConnStream::Tcp(s) => s.read(buf)?,
            ConnStream::Unix(s) => {
                let mut fds = Vec::new();
                let n = sys::recv_with_fds(s.as_fd(), buf, &mut fds)?;
                if !fds.is_empty() {
                    // Linux ends a read after the data that carried the
                    // descriptors, so they belong with the end of the read:
                    // its last non-blank byte (a command sent with them), or
                    // the blank sent alone with them ahead of a command, as
                    // qemu.qmp does.
                    let data = &buf[..n];
                    let last = data
                        .iter()
                        .rposition(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                        .unwrap_or(n.saturating_sub(1));
                    let at = conn.received + last as u64;
                    for fd in fds {
                        if conn.fds.len() >= self.config.max_fds_per_client {
                            log::warn!(
                                "{}: too many file descriptors pending; closing one",
                                conn.id
                            );
                            continue;
                        }
                        conn.fds.push_back((at, fd));
                    }
                }
                n
            }
        };
        conn.received += n as u64;
        conn.session.feed(&buf[..n]);
        Ok(n)
    }

    fn run_request(&mut self, conn: &mut Conn, request: Request, handler: &mut impl Handler) {
        let span = conn.session.request_span().unwrap_or(0..0);
        let mut fds = VecDeque::new();
        while conn.fds.front().is_some_and(|(at, _)| *at < span.end) {
            if let Some((at, fd)) = conn.fds.pop_front() {
                if at >= span.start {
                    fds.push_back(fd);
                } else {
                    log::debug!(
                        "{}: closing a file descriptor that came with no command",
                        conn.id
                    );
                }
            }
        }
        let mut shutdown = false;
        let mut events = Vec::new();
        let mut call = CallContext {
            client: conn.id,
            fds: &mut fds,
            shutdown: &mut shutdown,
            events: &mut events,
        };
        let result = handler.execute(&mut call, &request);
        drop(fds);
        for event in &events {
            conn.session.push_event(event);
        }
        conn.session.reply(Response {
            id: request.id,
            result,
        });
        if shutdown {
            self.shutdown = true;
        }
        // The calling client is out of `slots` now: this reaches the others.
        for event in &events {
            self.broadcast(event);
        }
    }
}
