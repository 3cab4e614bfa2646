//! The backend side: the [`Backend`] trait every backend implements, the
//! context the registry lends it, and the output sinks shared by the
//! built-in backends.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest, Token};

use crate::frontend::{ChardevEvent, ChardevEventKind, Frontend};
use crate::ring::RingBuf;

pub(crate) mod file;
mod netaddr;
pub(crate) mod pty;
pub(crate) mod simple;
pub(crate) mod socket;
pub(crate) mod stdio;
mod sys;

/// The output path of a backend, callable from any thread (a vCPU thread
/// writes guest output while the event loop runs elsewhere).
pub trait Sink: Send + Sync {
    /// Writes without blocking the caller for long: returns how many bytes
    /// were accepted (possibly fewer than given), or
    /// [`io::ErrorKind::WouldBlock`] when none can be accepted now.
    fn write(&self, data: &[u8]) -> io::Result<usize>;
}

/// A character-device backend.
///
/// The registry owns backends and calls them on its event-loop thread with
/// a [`BackendContext`], through which they register file descriptors
/// with the caller's `mio` poll, deliver input to the attached frontend
/// (with back-pressure) and report events. Output goes through the
/// backend's [`Sink`], from any thread.
pub trait Backend: Send {
    /// The `filename` of `query-chardev` (QEMU's encoding, e.g. `ringbuf`,
    /// `pty:/dev/pts/3`, `disconnected:unix:/tmp/s,server=on`).
    fn filename(&self) -> String;
    /// The output path.
    fn sink(&self) -> Arc<dyn Sink>;
    /// Whether the backend is open (connected), QEMU's `be_open`.
    fn is_open(&self) -> bool;
    /// The ring, for the ring-buffer backend.
    fn ring(&self) -> Option<&Arc<RingBuf>> {
        None
    }
    /// The slave path, for a pty backend.
    fn pty_path(&self) -> Option<&str> {
        None
    }
    /// An event on one of the tokens the backend registered.
    fn handle_event(&mut self, cx: &mut BackendContext<'_>, token: Token, event: &Event);
    /// The frontend can take input (it attached, or called `accept_input`):
    /// read from the source while it can.
    fn pump(&mut self, cx: &mut BackendContext<'_>);
    /// When [`Backend::on_timeout`] wants to run next, if ever.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Runs timers due at `now` (reconnection, pty polling).
    fn on_timeout(&mut self, cx: &mut BackendContext<'_>, now: Instant) {
        let _ = (cx, now);
    }
    /// Deregisters everything and closes the backend (chardev-remove).
    fn shutdown(&mut self, cx: &mut BackendContext<'_>);
}

/// Tokens of the range the registry was given, and which chardev owns each.
pub(crate) struct TokenPool {
    pub(crate) start: usize,
    pub(crate) end: usize,
    next: usize,
    free: VecDeque<usize>,
    pub(crate) owner: HashMap<Token, u64>,
}

impl TokenPool {
    pub(crate) fn new(start: usize, end: usize) -> Self {
        TokenPool {
            start,
            end,
            next: start,
            free: VecDeque::new(),
            owner: HashMap::new(),
        }
    }

    pub(crate) fn alloc(&mut self, key: u64) -> Option<Token> {
        // Freed tokens are reused last (FIFO), so a stale event for a
        // just-closed descriptor rarely reaches a new owner.
        let t = if self.next < self.end {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front()?
        };
        self.owner.insert(Token(t), key);
        Some(Token(t))
    }

    pub(crate) fn release(&mut self, t: Token) {
        if self.owner.remove(&t).is_some() {
            self.free.push_back(t.0);
        }
    }
}

/// What the registry lends a backend for the duration of one call.
pub struct BackendContext<'a> {
    pub(crate) id: &'a str,
    pub(crate) key: u64,
    pub(crate) poll: Option<&'a mio::Registry>,
    pub(crate) tokens: Option<&'a mut TokenPool>,
    pub(crate) frontend: Option<&'a mut Box<dyn Frontend>>,
    pub(crate) events: &'a mut VecDeque<ChardevEvent>,
    pub(crate) notice: &'a mut (dyn FnMut(&str) + Send),
}

impl BackendContext<'_> {
    /// The chardev's id.
    pub fn id(&self) -> &str {
        self.id
    }

    /// Whether an event loop is available (the registry was built with
    /// [`ChardevRegistry::with_poll`](crate::ChardevRegistry::with_poll)).
    pub fn has_poll(&self) -> bool {
        self.poll.is_some()
    }

    /// Registers `fd` with the event loop under a new token of the
    /// registry's range.
    pub fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<Token> {
        let (Some(poll), Some(tokens)) = (self.poll, self.tokens.as_deref_mut()) else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this chardev registry has no event loop",
            ));
        };
        let token = tokens.alloc(self.key).ok_or_else(|| {
            io::Error::new(io::ErrorKind::OutOfMemory, "no free event-loop token")
        })?;
        if let Err(e) = poll.register(&mut SourceFd(&fd), token, interest) {
            tokens.release(token);
            return Err(e);
        }
        Ok(token)
    }

    /// Deregisters `fd` and frees its token.
    pub fn deregister(&mut self, fd: RawFd, token: Token) {
        if let Some(poll) = self.poll {
            if let Err(e) = poll.deregister(&mut SourceFd(&fd)) {
                log::debug!("chardev {}: deregister: {e}", self.id);
            }
        }
        if let Some(tokens) = self.tokens.as_deref_mut() {
            tokens.release(token);
        }
    }

    /// How many input bytes the frontend takes now (0 without a frontend).
    pub fn can_receive(&mut self) -> usize {
        self.frontend.as_mut().map_or(0, |f| f.can_receive())
    }

    /// Whether a frontend is attached.
    pub fn has_frontend(&self) -> bool {
        self.frontend.is_some()
    }

    /// Delivers input (at most what `can_receive` allowed).
    pub fn receive(&mut self, data: &[u8]) {
        if let Some(f) = self.frontend.as_mut() {
            f.receive(data);
        }
    }

    /// Reports an event: delivered to the frontend and queued for the VMM.
    pub fn event(&mut self, kind: ChardevEventKind) {
        if let Some(f) = self.frontend.as_mut() {
            f.event(kind);
        }
        self.events.push_back(ChardevEvent {
            id: self.id.to_owned(),
            kind,
        });
    }

    /// Tells the frontend that refused output can be retried.
    pub fn output_ready(&mut self) {
        if let Some(f) = self.frontend.as_mut() {
            f.output_ready();
        }
    }

    /// A message for the user (QEMU prints these on stderr, e.g. "char
    /// device redirected to /dev/pts/3 (label p)").
    pub fn notice(&mut self, msg: &str) {
        (self.notice)(msg);
    }
}

/// Anything the stream sink can write to without blocking.
pub(crate) trait OutFd: Send + Sync {
    fn write_nb(&self, data: &[u8]) -> io::Result<usize>;
    /// For a backend that is not connected: whether a peer is there anyway
    /// (a pty whose slave was reopened before the poll timer noticed).
    fn peer_present(&self) -> bool {
        false
    }
}

impl OutFd for mio::net::UnixStream {
    fn write_nb(&self, data: &[u8]) -> io::Result<usize> {
        (&*self).write(data)
    }
}

impl OutFd for mio::net::TcpStream {
    fn write_nb(&self, data: &[u8]) -> io::Result<usize> {
        (&*self).write(data)
    }
}

/// Default bound of a stream's output queue (beyond the kernel's buffer).
pub(crate) const OUT_QUEUE_LIMIT: usize = 64 * 1024;

struct StreamOut {
    conn: Option<Arc<dyn OutFd>>,
    connected: bool,
    queue: VecDeque<u8>,
    refused: bool,
}

/// The output of a connection-oriented backend (socket, pty): writes go
/// straight to the descriptor while it takes them, then into a bounded
/// queue that the event loop flushes when the descriptor is writable.
pub(crate) struct StreamSink {
    inner: Mutex<StreamOut>,
    limit: usize,
}

impl StreamSink {
    pub(crate) fn new(limit: usize) -> Self {
        StreamSink {
            inner: Mutex::new(StreamOut {
                conn: None,
                connected: false,
                queue: VecDeque::new(),
                refused: false,
            }),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamOut> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the descriptor and whether it is connected. A new connection
    /// starts with an empty queue.
    pub(crate) fn set_conn(&self, conn: Option<Arc<dyn OutFd>>, connected: bool) {
        let mut o = self.lock();
        o.conn = conn;
        o.connected = connected;
        o.queue.clear();
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        let mut o = self.lock();
        o.connected = connected;
        if !connected {
            o.queue.clear();
        }
    }

    /// Queues bytes that must precede anything the frontend writes (the
    /// telnet negotiation).
    pub(crate) fn push_front_bytes(&self, data: &[u8]) {
        let mut o = self.lock();
        o.queue.extend(data.iter().copied());
    }

    /// Writes queued bytes until the descriptor would block. Returns true
    /// when a writer was refused earlier and there is room now.
    pub(crate) fn flush(&self) -> bool {
        let mut o = self.lock();
        let Some(conn) = o.conn.clone() else {
            return false;
        };
        while !o.queue.is_empty() {
            let (a, _) = o.queue.as_slices();
            match conn.write_nb(a) {
                Ok(0) => break,
                Ok(n) => {
                    o.queue.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // The event loop sees the hang-up and disconnects.
                    log::debug!("chardev output: {e}");
                    o.queue.clear();
                    break;
                }
            }
        }
        if o.refused && o.queue.len() < self.limit {
            o.refused = false;
            return true;
        }
        false
    }
}

impl Sink for StreamSink {
    fn write(&self, data: &[u8]) -> io::Result<usize> {
        let mut o = self.lock();
        let Some(conn) = o.conn.clone() else {
            return Ok(data.len());
        };
        if !o.connected && !conn.peer_present() {
            // Nobody to send to: dropped, as QEMU drops it.
            return Ok(data.len());
        }
        let mut n = 0;
        if o.queue.is_empty() {
            loop {
                match conn.write_nb(data) {
                    Ok(k) => n = k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        log::debug!("chardev output: {e}");
                        return Ok(data.len());
                    }
                }
                break;
            }
        }
        let room = self.limit.saturating_sub(o.queue.len());
        let extra = room.min(data.len() - n);
        o.queue.extend(data[n..n + extra].iter().copied());
        n += extra;
        if n < data.len() {
            o.refused = true;
        }
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

/// Output to a file or a blocking descriptor (file backend, stdout).
pub(crate) struct FileSink(pub(crate) Mutex<File>);

impl Sink for FileSink {
    fn write(&self, data: &[u8]) -> io::Result<usize> {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match f.write_all(data) {
            Ok(()) => Ok(data.len()),
            Err(e) => {
                log::warn!("chardev output: {e}");
                Ok(data.len())
            }
        }
    }
}

/// How an input descriptor is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputMode {
    /// Registered with the event loop, `O_NONBLOCK` set (our own fd).
    Nonblocking,
    /// Registered, shared with others (stdin): never made non-blocking,
    /// reads are bounded by `FIONREAD` so they cannot block.
    Fionread,
    /// Not pollable (regular file, /dev/null): always readable, read
    /// whenever the frontend has room.
    Always,
}

/// Input from a descriptor (file `in`, stdin, pty master).
pub(crate) struct Input {
    pub(crate) file: File,
    pub(crate) token: Option<Token>,
    pub(crate) mode: InputMode,
    pub(crate) eof: bool,
    /// The event loop reported the writer side closed.
    pub(crate) hup: bool,
}

/// What one pump of an [`Input`] ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PumpEnd {
    /// Nothing more to read now, or the frontend is full.
    Idle,
    /// End of input (or an error): the source is done.
    Eof,
}

impl Input {
    /// Opens input on `fd`: registers it if the event loop accepts it.
    pub(crate) fn new(cx: &mut BackendContext<'_>, fd: OwnedFd, shared: bool) -> io::Result<Input> {
        let file = File::from(fd);
        match cx.register(file.as_raw_fd(), Interest::READABLE) {
            Ok(token) => {
                let mode = if shared {
                    InputMode::Fionread
                } else {
                    sys::set_nonblocking(file.as_raw_fd())?;
                    InputMode::Nonblocking
                };
                Ok(Input {
                    file,
                    token: Some(token),
                    mode,
                    eof: false,
                    hup: false,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(Input {
                file,
                token: None,
                mode: InputMode::Always,
                eof: false,
                hup: false,
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads into the frontend while it has room. `hup` says the event loop
    /// reported the writer side closed (used where reads cannot see EOF
    /// without blocking).
    pub(crate) fn pump(&mut self, cx: &mut BackendContext<'_>, hup: bool) -> PumpEnd {
        self.hup |= hup;
        let mut buf = [0u8; 4096];
        while !self.eof {
            let room = cx.can_receive();
            if room == 0 {
                return PumpEnd::Idle;
            }
            let mut want = room.min(buf.len());
            if self.mode == InputMode::Fionread {
                match sys::fionread(self.file.as_raw_fd()) {
                    Ok(0) if self.hup => {
                        self.eof = true;
                        return PumpEnd::Eof;
                    }
                    Ok(0) => return PumpEnd::Idle,
                    Ok(avail) => want = want.min(avail),
                    Err(_) => {}
                }
            }
            match self.file.read(&mut buf[..want]) {
                Ok(0) => {
                    self.eof = true;
                    return PumpEnd::Eof;
                }
                Ok(n) => cx.receive(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return PumpEnd::Idle,
                Err(e) => {
                    log::debug!("chardev {} input: {e}", cx.id());
                    self.eof = true;
                    return PumpEnd::Eof;
                }
            }
        }
        PumpEnd::Eof
    }

    pub(crate) fn close(&mut self, cx: &mut BackendContext<'_>) {
        if let Some(t) = self.token.take() {
            cx.deregister(self.file.as_raw_fd(), t);
        }
        self.eof = true;
    }
}

/// Resolves a file-descriptor name of a socket address (`getfd`/`add-fd`
/// names are the VMM's; decimal numbers are fds of the process).
pub type FdResolver = Box<dyn FnMut(&str) -> Result<OwnedFd, String> + Send>;

/// What opening a backend needs besides its configuration.
pub(crate) struct OpenEnv<'a> {
    pub(crate) fd_resolver: Option<&'a mut FdResolver>,
}

/// Creates the backend a configuration describes. Errors are QEMU's reasons
/// (the caller adds "Failed to add chardev 'id': ").
pub(crate) fn open_backend(
    cx: &mut BackendContext<'_>,
    config: &crate::config::BackendConfig,
    env: &mut OpenEnv<'_>,
) -> Result<Box<dyn Backend>, String> {
    use crate::config::BackendConfig as B;
    Ok(match config {
        B::Ringbuf { name, size } => {
            let size =
                crate::ring::check_ring_size(size.unwrap_or(crate::ring::DEFAULT_RING_SIZE as i64))
                    .map_err(|e| e.to_string())?;
            let ring = RingBuf::new(size).map_err(|e| e.to_string())?;
            Box::new(simple::RingbufBackend::new(ring, *name))
        }
        B::Null => Box::new(simple::NullBackend),
        B::File { out, input, append } => Box::new(file::FileBackend::open(
            cx,
            out,
            input.as_deref(),
            append.unwrap_or(false),
        )?),
        B::Socket(s) => Box::new(socket::SocketBackend::open(cx, s, env)?),
        B::Pty => Box::new(pty::PtyBackend::open(cx)?),
        B::Stdio { signal } => Box::new(stdio::StdioBackend::open(cx, signal.unwrap_or(true))?),
    })
}
