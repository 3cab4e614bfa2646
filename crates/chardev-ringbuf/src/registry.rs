//! The registry of chardevs by id, owned by the VMM: creation and removal,
//! frontends, the ring-buffer commands, and the `mio` integration.

use std::collections::VecDeque;
use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Interest, Token};

use crate::backend::file::open_out;
use crate::backend::{open_backend, Backend, BackendContext, FdResolver, OpenEnv, TokenPool};
use crate::config::{ChardevConfig, BACKEND_NAMES};
use crate::error::ChardevError;
use crate::frontend::{ChardevEvent, ChardevEventKind, ChardevOut, Frontend, FrontendHandle, Kick};
use crate::ring::RingBuf;
use crate::utf8::{self, Utf8ReadMode};

/// The encoding of `ringbuf-write` data and `ringbuf-read` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataFormat {
    /// Text (the default).
    #[default]
    Utf8,
    /// Base64 of the bytes.
    Base64,
}

/// One line of `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    /// The chardev's id.
    pub label: String,
    /// QEMU's encoding of the backend and its state.
    pub filename: String,
    /// Whether a frontend is attached and open.
    pub frontend_open: bool,
}

/// What creating a chardev returns (`chardev-add`'s `ChardevReturn`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddOutcome {
    /// The slave path of a new pty.
    pub pty: Option<String>,
}

struct Entry {
    id: String,
    key: u64,
    backend: Box<dyn Backend>,
    out: Arc<ChardevOut>,
    frontend: Option<Box<dyn Frontend>>,
    frontend_open: bool,
}

struct PollState {
    registry: mio::Registry,
    tokens: TokenPool,
    kick_token: Token,
    kick_rx: mio::net::UnixStream,
}

type Notice = Box<dyn FnMut(&str) + Send>;

/// The chardevs of a VMM, by id.
///
/// Backends with descriptors (socket, pty, stdio, file input) need an event
/// loop: build the registry with [`ChardevRegistry::with_poll`], route the
/// events of its tokens ([`owns`](Self::owns)) to
/// [`handle_event`](Self::handle_event), bound the poll timeout by
/// [`next_timeout`](Self::next_timeout) and call
/// [`on_timeout`](Self::on_timeout) when it passes, and drain
/// [`drain_events`](Self::drain_events). No thread is started.
///
/// ```
/// use chardev_ringbuf::{BackendConfig, ChardevConfig, ChardevRegistry, DataFormat, RingbufName};
///
/// let mut reg = ChardevRegistry::new();
/// reg.add("rb0", &ChardevConfig::new(BackendConfig::Ringbuf { name: RingbufName::Ringbuf, size: Some(4096) }))
///     .unwrap();
/// reg.ringbuf_write_str("rb0", "hello", DataFormat::Utf8).unwrap();
/// assert_eq!(reg.ringbuf_read("rb0", 3, DataFormat::Utf8).unwrap(), "hel");
/// assert_eq!(reg.ringbuf_read("rb0", 10, DataFormat::Base64).unwrap(), "bG8=");
/// ```
pub struct ChardevRegistry {
    entries: Vec<Entry>,
    poll: Option<PollState>,
    kick: Arc<Kick>,
    events: VecDeque<ChardevEvent>,
    utf8_mode: Utf8ReadMode,
    notice: Notice,
    fd_resolver: Option<FdResolver>,
    next_key: u64,
}

impl std::fmt::Debug for ChardevRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChardevRegistry")
            .field("ids", &self.ids())
            .field("has_poll", &self.poll.is_some())
            .finish()
    }
}

impl Default for ChardevRegistry {
    fn default() -> Self {
        Self::new()
    }
}

fn default_notice() -> Notice {
    // QEMU prints these on stderr ("char device redirected to ...").
    Box::new(|msg: &str| eprintln!("{msg}"))
}

impl ChardevRegistry {
    /// A registry without an event loop: ringbuf, memory, null and file
    /// (output only) backends work; the others are refused.
    pub fn new() -> Self {
        ChardevRegistry {
            entries: Vec::new(),
            poll: None,
            kick: Arc::new(Kick {
                pending: Mutex::new(Default::default()),
                waker: None,
            }),
            events: VecDeque::new(),
            utf8_mode: Utf8ReadMode::default(),
            notice: default_notice(),
            fd_resolver: None,
            next_key: 1,
        }
    }

    /// A registry on the caller's `mio` poll, using the tokens in `tokens`
    /// (at least one; the first wakes the loop for
    /// [`FrontendHandle::accept_input`]).
    pub fn with_poll(registry: &mio::Registry, tokens: Range<usize>) -> Result<Self, ChardevError> {
        if tokens.start >= tokens.end {
            return Err(ChardevError::Invalid(
                "the chardev token range is empty".into(),
            ));
        }
        let registry = registry
            .try_clone()
            .map_err(|e| ChardevError::io("cloning the mio registry", e))?;
        let (tx, rx) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ChardevError::io("creating the chardev wake-up socket", e))?;
        tx.set_nonblocking(true)
            .and_then(|()| rx.set_nonblocking(true))
            .map_err(|e| ChardevError::io("creating the chardev wake-up socket", e))?;
        let mut kick_rx = mio::net::UnixStream::from_std(rx);
        let kick_token = Token(tokens.start);
        registry
            .register(&mut kick_rx, kick_token, Interest::READABLE)
            .map_err(|e| ChardevError::io("registering the chardev wake-up socket", e))?;
        let mut reg = Self::new();
        reg.kick = Arc::new(Kick {
            pending: Mutex::new(Default::default()),
            waker: Some(tx),
        });
        reg.poll = Some(PollState {
            registry,
            tokens: TokenPool::new(tokens.start + 1, tokens.end),
            kick_token,
            kick_rx,
        });
        Ok(reg)
    }

    /// Sets where user messages go (default: stderr, as QEMU prints them):
    /// "char device redirected to /dev/pts/N (label X)", "waiting for
    /// connection on: ...", reconnection failures.
    pub fn set_notice(&mut self, notice: impl FnMut(&str) + Send + 'static) {
        self.notice = Box::new(notice);
    }

    /// Sets how socket addresses of type `fd` resolve names (the VMM's
    /// `getfd`/`add-fd` table). Decimal names are process fds either way.
    pub fn set_fd_resolver(&mut self, resolver: FdResolver) {
        self.fd_resolver = Some(resolver);
    }

    /// Sets how `ringbuf-read` in utf8 format behaves (default:
    /// [`Utf8ReadMode::WholeCharacters`]).
    pub fn set_utf8_read_mode(&mut self, mode: Utf8ReadMode) {
        self.utf8_mode = mode;
    }

    /// The current `ringbuf-read` utf8 mode.
    pub fn utf8_read_mode(&self) -> Utf8ReadMode {
        self.utf8_mode
    }

    fn find(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }

    fn with_cx<R>(
        &mut self,
        idx: usize,
        f: impl FnOnce(&mut dyn Backend, &mut BackendContext<'_>) -> R,
    ) -> R {
        let ChardevRegistry {
            entries,
            poll,
            events,
            notice,
            ..
        } = self;
        let e = &mut entries[idx];
        let (registry, tokens) = match poll {
            Some(p) => (Some(&p.registry), Some(&mut p.tokens)),
            None => (None, None),
        };
        let mut cx = BackendContext {
            id: &e.id,
            key: e.key,
            poll: registry,
            tokens,
            frontend: e.frontend.as_mut(),
            events,
            notice: &mut **notice,
        };
        f(&mut *e.backend, &mut cx)
    }

    /// Creates a chardev (`chardev-add`, `-chardev`).
    pub fn add(&mut self, id: &str, config: &ChardevConfig) -> Result<AddOutcome, ChardevError> {
        self.add_with(
            id,
            config.logfile.as_deref(),
            config.logappend,
            |cx, env| open_backend(cx, &config.backend, env),
        )
    }

    /// Creates a chardev with a backend of the caller's (anything
    /// implementing [`Backend`]); `open` may register descriptors through
    /// the context. Errors are reported as "Failed to add chardev 'id': ...".
    pub fn add_backend(
        &mut self,
        id: &str,
        open: impl FnOnce(&mut BackendContext<'_>) -> Result<Box<dyn Backend>, String>,
    ) -> Result<AddOutcome, ChardevError> {
        self.add_with(id, None, None, |cx, _| open(cx))
    }

    fn add_with(
        &mut self,
        id: &str,
        logfile: Option<&str>,
        logappend: Option<bool>,
        open: impl FnOnce(&mut BackendContext<'_>, &mut OpenEnv<'_>) -> Result<Box<dyn Backend>, String>,
    ) -> Result<AddOutcome, ChardevError> {
        if self.find(id).is_some() {
            return Err(ChardevError::Duplicate(id.to_owned()));
        }
        let open_err = |reason: String| ChardevError::Open {
            id: id.to_owned(),
            reason,
        };
        let log = match logfile {
            Some(path) => Some(Mutex::new(
                open_out(path, logappend.unwrap_or(false), "create").map_err(open_err)?,
            )),
            None => None,
        };
        let key = self.next_key;
        self.next_key += 1;
        let ChardevRegistry {
            poll,
            events,
            notice,
            fd_resolver,
            ..
        } = self;
        let (registry, tokens) = match poll {
            Some(p) => (Some(&p.registry), Some(&mut p.tokens)),
            None => (None, None),
        };
        let mut cx = BackendContext {
            id,
            key,
            poll: registry,
            tokens,
            frontend: None,
            events,
            notice: &mut **notice,
        };
        let mut env = OpenEnv {
            fd_resolver: fd_resolver.as_mut(),
        };
        let backend = open(&mut cx, &mut env).map_err(open_err)?;
        let out = Arc::new(ChardevOut {
            sink: backend.sink(),
            log,
        });
        let pty = backend.pty_path().map(str::to_owned);
        log::debug!("chardev {id}: created ({})", backend.filename());
        self.entries.push(Entry {
            id: id.to_owned(),
            key,
            backend,
            out,
            frontend: None,
            frontend_open: false,
        });
        Ok(AddOutcome { pty })
    }

    /// A handle on a chardev's output and input wake-up, without attaching:
    /// for devices that need it before they exist (a `vm-superio` serial
    /// port takes its output writer and its event sink at creation; attach
    /// it afterwards).
    pub fn handle(&self, id: &str) -> Result<FrontendHandle, ChardevError> {
        let idx = self
            .find(id)
            .ok_or_else(|| ChardevError::NotFound(id.to_owned()))?;
        let e = &self.entries[idx];
        Ok(FrontendHandle {
            id: Arc::from(id),
            key: e.key,
            out: e.out.clone(),
            kick: self.kick.clone(),
        })
    }

    /// Removes a chardev (`chardev-remove`); refused while a frontend is
    /// attached.
    pub fn remove(&mut self, id: &str) -> Result<(), ChardevError> {
        let idx = self
            .find(id)
            .ok_or_else(|| ChardevError::NotFound(id.to_owned()))?;
        if self.entries[idx].frontend.is_some() {
            return Err(ChardevError::Busy(id.to_owned()));
        }
        self.close(idx);
        Ok(())
    }

    fn close(&mut self, idx: usize) {
        self.with_cx(idx, |b, cx| b.shutdown(cx));
        let e = self.entries.remove(idx);
        if let Some(p) = self.poll.as_mut() {
            let stale: Vec<Token> = p
                .tokens
                .owner
                .iter()
                .filter(|(_, &k)| k == e.key)
                .map(|(t, _)| *t)
                .collect();
            for t in stale {
                p.tokens.release(t);
            }
        }
        log::debug!("chardev {}: removed", e.id);
    }

    /// Attaches a frontend. It receives input from now on (and `Opened` at
    /// once if the backend is already open, as QEMU does); the returned
    /// handle writes output.
    pub fn attach(
        &mut self,
        id: &str,
        frontend: Box<dyn Frontend>,
    ) -> Result<FrontendHandle, ChardevError> {
        let idx = self
            .find(id)
            .ok_or_else(|| ChardevError::NotFound(id.to_owned()))?;
        let e = &mut self.entries[idx];
        if e.frontend.is_some() {
            return Err(ChardevError::InUse(id.to_owned()));
        }
        e.frontend = Some(frontend);
        e.frontend_open = true;
        if e.backend.is_open() {
            if let Some(f) = e.frontend.as_mut() {
                f.event(ChardevEventKind::Opened);
            }
        }
        self.with_cx(idx, |b, cx| b.pump(cx));
        self.handle(id)
    }

    /// Detaches the frontend and gives it back.
    pub fn detach(&mut self, id: &str) -> Option<Box<dyn Frontend>> {
        let idx = self.find(id)?;
        let e = &mut self.entries[idx];
        e.frontend_open = false;
        e.frontend.take()
    }

    /// Sets `frontend-open` (a virtio-serial port opened by the guest, for
    /// example); attaching sets it, detaching clears it.
    pub fn set_frontend_open(&mut self, id: &str, open: bool) -> Result<(), ChardevError> {
        let idx = self
            .find(id)
            .ok_or_else(|| ChardevError::NotFound(id.to_owned()))?;
        self.entries[idx].frontend_open = open;
        Ok(())
    }

    /// On the event-loop thread: the frontend of `id` can take input again.
    /// (From other threads use [`FrontendHandle::accept_input`].)
    pub fn accept_input(&mut self, id: &str) {
        if let Some(idx) = self.find(id) {
            self.with_cx(idx, |b, cx| b.pump(cx));
        }
    }

    /// Whether `token` is one of the registry's.
    pub fn owns(&self, token: Token) -> bool {
        self.poll.as_ref().is_some_and(|p| {
            token == p.kick_token || (p.tokens.start..p.tokens.end).contains(&token.0)
        })
    }

    /// Handles a readiness event of one of the registry's tokens.
    pub fn handle_event(&mut self, event: &Event) {
        let token = event.token();
        let Some(p) = self.poll.as_mut() else {
            return;
        };
        if token == p.kick_token {
            let mut buf = [0u8; 64];
            while matches!((&p.kick_rx).read(&mut buf), Ok(n) if n > 0) {}
            for key in self.kick.take() {
                if let Some(idx) = self.entries.iter().position(|e| e.key == key) {
                    self.with_cx(idx, |b, cx| b.pump(cx));
                }
            }
            return;
        }
        let Some(&key) = p.tokens.owner.get(&token) else {
            return;
        };
        if let Some(idx) = self.entries.iter().position(|e| e.key == key) {
            self.with_cx(idx, |b, cx| b.handle_event(cx, token, event));
        }
    }

    /// The earliest time a backend timer (reconnection, pty polling) is due.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter_map(|e| e.backend.next_deadline())
            .min()
    }

    /// The poll timeout until [`next_timeout`](Self::next_timeout), from `now`.
    pub fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        self.next_timeout()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Runs the timers due at `now`.
    pub fn on_timeout(&mut self, now: Instant) {
        let mut idx = 0;
        while idx < self.entries.len() {
            if self.entries[idx]
                .backend
                .next_deadline()
                .is_some_and(|t| t <= now)
            {
                self.with_cx(idx, |b, cx| b.on_timeout(cx, now));
            }
            idx += 1;
        }
    }

    /// Takes the queued events (backends opening and closing, breaks), in
    /// order.
    pub fn drain_events(&mut self) -> std::collections::vec_deque::Drain<'_, ChardevEvent> {
        self.events.drain(..)
    }

    /// The ids, in creation order.
    pub fn ids(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.id.as_str()).collect()
    }

    /// Whether a chardev exists.
    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    /// Whether a chardev's backend is open (connected).
    pub fn is_open(&self, id: &str) -> Option<bool> {
        self.find(id).map(|i| self.entries[i].backend.is_open())
    }

    /// `query-chardev`: every chardev, in creation order.
    pub fn info(&self) -> Vec<ChardevInfo> {
        self.entries
            .iter()
            .map(|e| ChardevInfo {
                label: e.id.clone(),
                filename: e.backend.filename(),
                frontend_open: e.frontend_open,
            })
            .collect()
    }

    /// `query-chardev-backends`: the backend names this crate implements.
    pub fn backend_names(&self) -> &'static [&'static str] {
        BACKEND_NAMES
    }

    /// The ring of a ring-buffer chardev.
    pub fn ring(&self, id: &str) -> Option<Arc<RingBuf>> {
        self.find(id)
            .and_then(|i| self.entries[i].backend.ring().cloned())
    }

    fn ring_for_command(&self, device: &str) -> Result<Arc<RingBuf>, ChardevError> {
        let idx = self
            .find(device)
            .ok_or_else(|| ChardevError::DeviceNotFound(device.to_owned()))?;
        self.entries[idx]
            .backend
            .ring()
            .cloned()
            .ok_or_else(|| ChardevError::NotRingbuf(device.to_owned()))
    }

    /// `ringbuf-write` of raw bytes.
    pub fn ringbuf_write(&self, device: &str, data: &[u8]) -> Result<(), ChardevError> {
        self.ring_for_command(device)?.write(data);
        Ok(())
    }

    /// `ringbuf-write`: `data` is text (written as QEMU writes a QMP string:
    /// UTF-8, U+0000 as `C0 80`) or base64 (decoded strictly).
    pub fn ringbuf_write_str(
        &self,
        device: &str,
        data: &str,
        format: DataFormat,
    ) -> Result<(), ChardevError> {
        let ring = self.ring_for_command(device)?;
        let bytes = match format {
            DataFormat::Utf8 => utf8::encode_modified_utf8(data),
            DataFormat::Base64 => crate::base64::decode(data)?,
        };
        ring.write(&bytes);
        Ok(())
    }

    /// `ringbuf-read`: at most `size` bytes, as text (see [`Utf8ReadMode`])
    /// or base64.
    pub fn ringbuf_read(
        &self,
        device: &str,
        size: i64,
        format: DataFormat,
    ) -> Result<String, ChardevError> {
        let ring = self.ring_for_command(device)?;
        if size <= 0 {
            return Err(ChardevError::ReadSize);
        }
        let max = usize::try_from(size).unwrap_or(usize::MAX);
        Ok(match (format, self.utf8_mode) {
            (DataFormat::Base64, _) => crate::base64::encode(&ring.read_vec(max)),
            (DataFormat::Utf8, Utf8ReadMode::Qemu72) => utf8::qemu72_reply(&ring.read_vec(max)),
            (DataFormat::Utf8, Utf8ReadMode::WholeCharacters) => {
                let mut skip = 0;
                let (bytes, _) = ring.read_with(max, |b, lost| {
                    let (s, t) = utf8::whole_split(b, lost);
                    skip = s;
                    s + t
                });
                utf8::whole_reply(&bytes[skip..])
            }
        })
    }
}

impl Drop for ChardevRegistry {
    fn drop(&mut self) {
        while !self.entries.is_empty() {
            let last = self.entries.len() - 1;
            self.close(last);
        }
        if let Some(p) = self.poll.as_mut() {
            let _ = p.registry.deregister(&mut p.kick_rx);
        }
    }
}
