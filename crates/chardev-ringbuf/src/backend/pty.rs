//! The `pty` backend: a new pseudo-terminal whose slave path is printed and
//! reported. As in QEMU, the backend is connected while some process has the
//! slave side open; output written while nobody has it open is dropped, and
//! a disconnected pty is checked for a new reader once a second.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Interest, Token};

use super::{sys, Backend, BackendContext, OutFd, Sink, StreamSink, OUT_QUEUE_LIMIT};
use crate::error::strerror;
use crate::frontend::ChardevEventKind;

/// How often a disconnected pty is checked for a reader (QEMU: 1 s).
const PTY_POLL: Duration = Duration::from_secs(1);

struct Master(File);

impl OutFd for Master {
    fn write_nb(&self, data: &[u8]) -> io::Result<usize> {
        (&self.0).write(data)
    }
    fn peer_present(&self) -> bool {
        !sys::poll_hup(self.0.as_raw_fd())
    }
}

/// The pty backend.
pub(crate) struct PtyBackend {
    master: Arc<Master>,
    token: Option<Token>,
    path: String,
    connected: bool,
    next_check: Option<Instant>,
    sink: Arc<StreamSink>,
}

impl PtyBackend {
    pub(crate) fn open(cx: &mut BackendContext<'_>) -> Result<Self, String> {
        if !cx.has_poll() {
            return Err("a pty chardev needs an event loop".into());
        }
        let (master, slave, path) =
            sys::openpty_raw().map_err(|e| format!("Failed to create PTY: {}", strerror(&e)))?;
        drop(slave);
        sys::set_nonblocking(master.as_raw_fd()).map_err(|e| strerror(&e))?;
        let master = Arc::new(Master(File::from(master)));
        let token = cx
            .register(
                master.0.as_raw_fd(),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("Failed to poll PTY: {}", strerror(&e)))?;
        let sink = Arc::new(StreamSink::new(OUT_QUEUE_LIMIT));
        sink.set_conn(Some(master.clone() as Arc<dyn OutFd>), false);
        cx.notice(&format!(
            "char device redirected to {path} (label {})",
            cx.id()
        ));
        let mut b = PtyBackend {
            master,
            token: Some(token),
            path,
            connected: false,
            next_check: Some(Instant::now() + PTY_POLL),
            sink,
        };
        b.check(cx);
        Ok(b)
    }

    fn fd(&self) -> i32 {
        self.master.0.as_raw_fd()
    }

    /// Updates the connection state from the master's POLLHUP.
    fn check(&mut self, cx: &mut BackendContext<'_>) {
        let hup = sys::poll_hup(self.fd());
        if hup && self.connected {
            self.disconnect(cx);
        } else if !hup && !self.connected {
            self.connected = true;
            self.next_check = None;
            self.sink.set_connected(true);
            cx.event(ChardevEventKind::Opened);
        }
    }

    fn disconnect(&mut self, cx: &mut BackendContext<'_>) {
        self.connected = false;
        self.sink.set_connected(false);
        self.next_check = Some(Instant::now() + PTY_POLL);
        cx.event(ChardevEventKind::Closed);
    }

    fn read_input(&mut self, cx: &mut BackendContext<'_>) {
        let mut buf = [0u8; 4096];
        while self.connected {
            let room = cx.can_receive();
            if room == 0 {
                return;
            }
            let n = room.min(buf.len());
            match (&self.master.0).read(&mut buf[..n]) {
                Ok(0) => return self.disconnect(cx),
                Ok(k) => cx.receive(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // EIO: the last slave descriptor was closed.
                Err(_) => return self.disconnect(cx),
            }
        }
    }
}

impl Backend for PtyBackend {
    fn filename(&self) -> String {
        format!("pty:{}", self.path)
    }
    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }
    fn is_open(&self) -> bool {
        self.connected
    }
    fn pty_path(&self) -> Option<&str> {
        Some(&self.path)
    }
    fn handle_event(&mut self, cx: &mut BackendContext<'_>, token: Token, event: &Event) {
        if Some(token) != self.token {
            return;
        }
        if event.is_writable() && self.sink.flush() {
            cx.output_ready();
        }
        if !self.connected {
            self.check(cx);
        }
        self.read_input(cx);
        if self.connected
            && sys::poll_hup(self.fd())
            && (!cx.has_frontend() || cx.can_receive() > 0)
        {
            // Everything readable was delivered and the slave is gone.
            self.disconnect(cx);
        }
    }
    fn pump(&mut self, cx: &mut BackendContext<'_>) {
        self.read_input(cx);
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.next_check
    }
    fn on_timeout(&mut self, cx: &mut BackendContext<'_>, now: Instant) {
        if self.next_check.is_some_and(|t| t <= now) {
            self.next_check = None;
            self.check(cx);
            if self.connected {
                self.read_input(cx);
            } else {
                self.next_check = Some(now + PTY_POLL);
            }
        }
    }
    fn shutdown(&mut self, cx: &mut BackendContext<'_>) {
        if let Some(t) = self.token.take() {
            cx.deregister(self.fd(), t);
        }
        self.sink.set_conn(None, false);
        self.next_check = None;
    }
}
