//! A QMP server on `mio`: Unix and TCP listeners, any number of clients,
//! each with its own [`Session`], driven from a caller-owned `mio::Poll`.
//!
//! The VMM implements [`Handler`]; the server calls it for every request a
//! client sends once the session has checked it. Everything is
//! non-blocking and edge-triggered, with no thread per client: a client
//! that disconnects mid-message, never reads, or sends garbage affects only
//! itself (see [`SessionConfig`] for the output limits).
//!
//! ```no_run
//! use qmp_proto::server::{CallContext, Handler, QmpServer, ServerConfig};
//! use qmp_proto::session::SessionConfig;
//! use qmp_proto::{QmpError, Request};
//! use serde_json::{json, Value};
//!
//! struct Vmm;
//! impl Handler for Vmm {
//!     fn execute(&mut self, call: &mut CallContext<'_>, req: &Request) -> Result<Value, QmpError> {
//!         match req.command.as_str() {
//!             "query-status" => Ok(json!({"status": "running", "running": true})),
//!             "quit" => {
//!                 call.request_shutdown();
//!                 Ok(json!({}))
//!             }
//!             other => Err(QmpError::command_not_found(other)),
//!         }
//!     }
//! }
//!
//! let version = json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""});
//! let mut server = QmpServer::new(ServerConfig::new(SessionConfig::new(version)));
//! server.add_unix_listener("/tmp/vmm-qmp.sock")?;
//! server.run_until(&mut Vmm, |_| false)?; // returns after `quit`
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};

use crate::message::EventMessage;
use crate::session::{Session, SessionConfig};

mod client;
mod conn;
mod handler;

use conn::{flush_conn, register_conn};
pub use handler::{CallContext, ClientId, Handler};

/// Bytes read from a client per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Settings of a [`QmpServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Settings of every client's session.
    pub session: SessionConfig,
    /// First `mio::Token` the server uses (for waking itself; listeners and
    /// clients use the following ones).
    pub first_token: usize,
    /// How many tokens the server may use, from `first_token` on: one for
    /// itself, then one per listener and per client. Connections beyond are
    /// refused (closed at once).
    pub max_tokens: usize,
    /// Most file descriptors held for one client awaiting a request;
    /// more are closed on arrival.
    pub max_fds_per_client: usize,
}

impl ServerConfig {
    /// Tokens `0..1024`, 64 queued descriptors per client.
    pub fn new(session: SessionConfig) -> Self {
        ServerConfig {
            session,
            first_token: 0,
            max_tokens: 1024,
            max_fds_per_client: 64,
        }
    }
}

enum Slot {
    Listener(Listener),
    Client(Box<Conn>),
}

enum ListenerKind {
    Unix(UnixListener),
    Tcp(TcpListener),
}

struct Listener {
    kind: ListenerKind,
    registered: bool,
    /// The socket file to remove when the listener goes (held for its Drop).
    _path: Option<UnixPath>,
}

/// A socket file this server created; removed when the listener goes.
struct UnixPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for UnixPath {
    fn drop(&mut self) {
        // Remove it only if it is still the socket we bound.
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

enum ConnStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

struct Conn {
    id: ClientId,
    stream: ConnStream,
    session: Session,
    /// The socket may have more to read (edge-triggered: set by events,
    /// cleared by `WouldBlock`).
    readable: bool,
    eof: bool,
    dead: bool,
    registered: bool,
    /// Bytes received so far (the stream offset of the next byte).
    received: u64,
    /// Received descriptors with the stream offset they arrived at.
    fds: VecDeque<(u64, OwnedFd)>,
}

/// Wakes the event loop for work found outside of an event (a client that
/// `broadcast` found dead, or took out of back-pressure): one end of a
/// socket pair registered under the server's first token. (A `mio::Waker`
/// is not used: mio allows only one per `Poll`, and that one is the VMM's.)
struct Notifier {
    rx: UnixStream,
    tx: std::os::unix::net::UnixStream,
    registered: bool,
}

/// The mio QMP server (see the [module docs](self)).
pub struct QmpServer {
    config: ServerConfig,
    slots: Vec<Option<Slot>>,
    registry: Option<Registry>,
    notifier: Option<Notifier>,
    /// Slots to pump at the next notification.
    attention: Vec<usize>,
    next_client: u64,
    shutdown: bool,
    read_buf: Vec<u8>,
}

impl fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpServer")
            .field("clients", &self.client_count())
            .field("shutdown_requested", &self.shutdown)
            .finish()
    }
}

impl QmpServer {
    /// A server with no listener yet.
    pub fn new(config: ServerConfig) -> Self {
        QmpServer {
            config,
            slots: Vec::new(),
            registry: None,
            notifier: None,
            attention: Vec::new(),
            next_client: 1,
            shutdown: false,
            read_buf: vec![0; READ_CHUNK],
        }
    }

    /// Listens on a Unix socket. A stale socket file (nobody listening) is
    /// removed first; a live one, or a file that is not a socket, is an
    /// error. The file is removed again when the server goes.
    ///
    /// Call [`register`](Self::register) afterwards if the server is
    /// already registered with a `Poll`.
    pub fn add_unix_listener(&mut self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref();
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(md) if md.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("a server is already listening on {}", path.display()),
                    ));
                }
                log::info!("removing stale QMP socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
        }
        let listener = bind_then_publish(path)?;
        let md = std::fs::symlink_metadata(path)?;
        let unix_path = UnixPath {
            path: path.to_owned(),
            dev: md.dev(),
            ino: md.ino(),
        };
        self.add_listener(ListenerKind::Unix(listener), Some(unix_path))
    }

    /// Listens on a TCP address; returns the bound address (useful with
    /// port 0).
    pub fn add_tcp_listener(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        self.add_listener(ListenerKind::Tcp(listener), None)?;
        Ok(local)
    }

    fn add_listener(&mut self, kind: ListenerKind, path: Option<UnixPath>) -> io::Result<()> {
        let idx = self.free_slot().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                "no mio token left for a listener",
            )
        })?;
        self.slots[idx] = Some(Slot::Listener(Listener {
            kind,
            registered: false,
            _path: path,
        }));
        if let Some(registry) = self.registry.take() {
            let r = self.register(&registry);
            self.registry = Some(registry);
            r?;
        }
        Ok(())
    }

    /// Registers the listeners (and any client) with `registry`. Call it
    /// after adding listeners; calling it again only registers what is new.
    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        if self.registry.is_none() {
            self.registry = Some(registry.try_clone()?);
        }
        if self.notifier.is_none() {
            let (tx, rx) = std::os::unix::net::UnixStream::pair()?;
            tx.set_nonblocking(true)?;
            rx.set_nonblocking(true)?;
            self.notifier = Some(Notifier {
                rx: UnixStream::from_std(rx),
                tx,
                registered: false,
            });
        }
        if let Some(n) = self.notifier.as_mut().filter(|n| !n.registered) {
            registry.register(
                &mut n.rx,
                Token(self.config.first_token),
                Interest::READABLE,
            )?;
            n.registered = true;
        }
        for idx in 0..self.slots.len() {
            let token = self.token(idx);
            match &mut self.slots[idx] {
                Some(Slot::Listener(l)) if !l.registered => {
                    match &mut l.kind {
                        ListenerKind::Unix(s) => registry.register(s, token, Interest::READABLE)?,
                        ListenerKind::Tcp(s) => registry.register(s, token, Interest::READABLE)?,
                    }
                    l.registered = true;
                }
                Some(Slot::Client(c)) if !c.registered => {
                    register_conn(registry, c, token)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Deregisters everything from `registry` (for instance before dropping
    /// the `Poll`); [`register`](Self::register) registers it all again.
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        if let Some(n) = self.notifier.as_mut().filter(|n| n.registered) {
            registry.deregister(&mut n.rx)?;
            n.registered = false;
        }
        for slot in self.slots.iter_mut().flatten() {
            match slot {
                Slot::Listener(l) if l.registered => {
                    match &mut l.kind {
                        ListenerKind::Unix(s) => registry.deregister(s)?,
                        ListenerKind::Tcp(s) => registry.deregister(s)?,
                    }
                    l.registered = false;
                }
                Slot::Client(c) if c.registered => {
                    match &mut c.stream {
                        ConnStream::Unix(s) => registry.deregister(s)?,
                        ConnStream::Tcp(s) => registry.deregister(s)?,
                    }
                    c.registered = false;
                }
                _ => {}
            }
        }
        self.registry = None;
        Ok(())
    }

    /// Whether `token` is in the server's token range (`first_token` and
    /// the `max_tokens - 1` after it).
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.config.first_token
            && token.0 - self.config.first_token < self.config.max_tokens
    }

    /// Handles one event for a token the server [owns](Self::owns).
    pub fn handle_event(&mut self, registry: &Registry, event: &Event, handler: &mut impl Handler) {
        if !self.owns(event.token()) {
            return;
        }
        if event.token().0 == self.config.first_token {
            self.attend(registry, handler);
            return;
        }
        let idx = event.token().0 - self.config.first_token - 1;
        match self.slots.get_mut(idx) {
            Some(Some(Slot::Listener(_))) => self.accept_all(idx, registry, handler),
            Some(Some(Slot::Client(conn))) => {
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    conn.readable = true;
                }
                self.pump_slot(idx, registry, handler);
            }
            _ => {}
        }
    }

    /// Sends an event to every negotiated client; returns how many got it.
    pub fn broadcast(&mut self, event: &EventMessage) -> usize {
        let mut count = 0;
        for idx in 0..self.slots.len() {
            let Some(Some(Slot::Client(conn))) = self.slots.get_mut(idx) else {
                continue;
            };
            if conn.session.push_event(event) {
                count += 1;
            }
            let was_backpressured = conn.session.is_backpressured();
            if !flush_conn(conn) || conn.session.must_disconnect() {
                conn.dead = true;
            }
            // Let the event loop close dead clients, or resume one that
            // this write took out of back-pressure.
            if conn.dead || (was_backpressured && !conn.session.is_backpressured()) {
                self.attention.push(idx);
                if let Some(n) = &self.notifier {
                    let _ = (&n.tx).write(&[1]);
                }
            }
        }
        count
    }

    /// Handles the work `broadcast` left for the event loop.
    fn attend(&mut self, registry: &Registry, handler: &mut impl Handler) {
        if let Some(n) = self.notifier.as_mut() {
            let mut sink = [0u8; 64];
            while matches!(n.rx.read(&mut sink), Ok(k) if k > 0) {}
        }
        let mut todo = std::mem::take(&mut self.attention);
        todo.sort_unstable();
        todo.dedup();
        for idx in todo {
            self.pump_slot(idx, registry, handler);
        }
    }

    /// Whether a handler asked the server to stop (see
    /// [`CallContext::request_shutdown`]).
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// Asks the server to stop (what a handler's `request_shutdown` does).
    pub fn request_shutdown(&mut self) {
        self.shutdown = true;
    }

    /// The connected clients.
    pub fn clients(&self) -> Vec<ClientId> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Slot::Client(c) => Some(c.id),
                Slot::Listener(_) => None,
            })
            .collect()
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.clients().len()
    }

    /// The bound addresses of the TCP listeners.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Slot::Listener(Listener {
                    kind: ListenerKind::Tcp(l),
                    ..
                }) => l.local_addr().ok(),
                _ => None,
            })
            .collect()
    }

    /// Disconnects a client.
    pub fn disconnect(&mut self, id: ClientId, handler: &mut impl Handler) {
        let found = self
            .slots
            .iter()
            .position(|s| matches!(s, Some(Slot::Client(c)) if c.id == id));
        if let Some(idx) = found {
            if let Some(Some(Slot::Client(conn))) = self.slots.get_mut(idx).map(Option::take) {
                self.close_conn(conn, handler);
            }
        }
    }

    /// Writes pending output to every client until all is sent or `timeout`
    /// passes. Returns whether everything was sent.
    pub fn flush_all(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut waiting: Vec<libc::pollfd> = Vec::new();
            for conn in self.slots.iter_mut().flatten().filter_map(|s| match s {
                Slot::Client(c) => Some(c),
                Slot::Listener(_) => None,
            }) {
                if conn.dead {
                    continue;
                }
                if !flush_conn(conn) {
                    conn.dead = true;
                    continue;
                }
                if conn.session.output_len() > 0 {
                    waiting.push(libc::pollfd {
                        fd: conn.stream.raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                }
            }
            if waiting.is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = left.as_millis().clamp(1, 100) as libc::c_int;
            // SAFETY: `waiting` is a live array of `waiting.len()` pollfd
            // structures for descriptors owned by this server.
            let r = unsafe { libc::poll(waiting.as_mut_ptr(), waiting.len() as libc::nfds_t, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("poll failed while flushing QMP output: {e}");
                    return false;
                }
            }
        }
    }

    /// A simple event loop: runs the server on its own `Poll` until a
    /// handler requests shutdown or `until` returns true (it is checked at
    /// least every 50 ms and may use the server, e.g. to broadcast). Output
    /// is flushed (for up to 5 s) before returning; listeners and clients
    /// stay open.
    pub fn run_until(
        &mut self,
        handler: &mut impl Handler,
        mut until: impl FnMut(&mut Self) -> bool,
    ) -> io::Result<()> {
        let mut poll = Poll::new()?;
        self.register(poll.registry())?;
        let mut events = Events::with_capacity(256);
        let result = loop {
            if self.shutdown || until(self) {
                break Ok(());
            }
            match poll.poll(&mut events, Some(Duration::from_millis(50))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
            for event in events.iter() {
                self.handle_event(poll.registry(), event, handler);
            }
        };
        self.flush_all(Duration::from_secs(5));
        self.deregister(poll.registry())?;
        result
    }

    /// Closes every client and listener (socket files are removed).
    /// [`Handler::client_disconnected`] is not called.
    pub fn shutdown(&mut self) {
        for slot in self.slots.drain(..).flatten() {
            if let Slot::Client(c) = slot {
                log::debug!("closing {}", c.id);
            }
        }
        self.registry = None;
        self.notifier = None;
        self.attention.clear();
    }

    fn token(&self, idx: usize) -> Token {
        Token(self.config.first_token + 1 + idx)
    }

    fn free_slot(&mut self) -> Option<usize> {
        if let Some(idx) = self.slots.iter().position(Option::is_none) {
            return Some(idx);
        }
        if self.slots.len() + 1 < self.config.max_tokens {
            self.slots.push(None);
            return Some(self.slots.len() - 1);
        }
        None
    }

    fn accept_all(&mut self, idx: usize, registry: &Registry, handler: &mut impl Handler) {
        loop {
            let Some(Some(Slot::Listener(l))) = self.slots.get(idx) else {
                return;
            };
            let accepted = match &l.kind {
                ListenerKind::Unix(s) => s.accept().map(|(c, _)| ConnStream::Unix(c)),
                ListenerKind::Tcp(s) => s.accept().map(|(c, _)| {
                    let _ = c.set_nodelay(true);
                    ConnStream::Tcp(c)
                }),
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. EMFILE: keep the listener, try again on the next event.
                    log::warn!("QMP accept failed: {e}");
                    return;
                }
            };
            let Some(cidx) = self.free_slot() else {
                log::warn!("too many QMP connections; refusing one");
                continue;
            };
            let id = ClientId(self.next_client);
            self.next_client += 1;
            let mut conn = Box::new(Conn {
                id,
                stream,
                session: Session::new(self.config.session.clone()),
                readable: true,
                eof: false,
                dead: false,
                registered: false,
                received: 0,
                fds: VecDeque::new(),
            });
            if let Err(e) = register_conn(registry, &mut conn, self.token(cidx)) {
                log::warn!("cannot register QMP connection: {e}");
                continue;
            }
            log::debug!("{id} connected");
            self.slots[cidx] = Some(Slot::Client(conn));
            handler.client_connected(id);
            self.pump_slot(cidx, registry, handler);
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds a listening Unix socket at `path` so that the socket file appears
/// only once it accepts connections: it is bound and listening under a
/// temporary name in the same directory, then renamed into place (a client
/// that waits for the file to exist is never refused). Where the temporary
/// name would not fit in `sun_path`, it binds at `path` directly.
fn bind_then_publish(path: &Path) -> io::Result<UnixListener> {
    let Some(name) = path.file_name() else {
        return UnixListener::bind(path);
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // sun_path holds 108 bytes including the terminating NUL.
    if tmp.as_os_str().len() >= 108 {
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}
