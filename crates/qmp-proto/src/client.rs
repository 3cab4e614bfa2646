//! A blocking QMP client over Unix and TCP stream sockets.
//!
//! It reads the greeting, negotiates capabilities, executes commands
//! (numbered `id`s, replies matched to them), keeps the events that arrive
//! meanwhile, and on Unix sockets passes file descriptors with `SCM_RIGHTS`.
//!
//! Decoding is tolerant: unknown members, unknown error classes and unknown
//! events never break it, so a newer server does not break an older client.
//!
//! ```no_run
//! use qmp_proto::client::Client;
//! use serde_json::json;
//!
//! let mut qmp = Client::connect_unix("/tmp/qmp.sock")?;
//! let status = qmp.execute_raw("query-status", json!({}))?;
//! println!("{status}");
//! for event in qmp.events() {
//!     println!("event {}", event.event);
//! }
//! # Ok::<(), qmp_proto::client::ClientError>(())
//! ```

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::command::Command;
use crate::encode::{write_message, KeyOrder};
use crate::error::{ErrorClass, QmpError};
use crate::framer::Framer;
use crate::message::{EventMessage, Timestamp};
use crate::sys;

/// Errors of the [`Client`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed, or the server closed the connection.
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an error.
    #[error("QMP error ({}): {}", .0.class, .0.desc)]
    Qmp(QmpError),
    /// The server broke the protocol (a bad greeting, invalid JSON...), or
    /// the request cannot be sent this way.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// Nothing arrived in time; the string says what was awaited.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// Arguments could not be encoded or a return value decoded.
    #[error("cannot encode or decode QMP data: {0}")]
    Decode(#[from] serde_json::Error),
}

impl From<QmpError> for ClientError {
    fn from(e: QmpError) -> Self {
        ClientError::Qmp(e)
    }
}

/// The socket a [`Client`] talks over.
#[derive(Debug)]
pub enum ClientStream {
    /// A Unix stream socket (file descriptors can be passed).
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl ClientStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            ClientStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ClientStream::Unix(s) => s.set_read_timeout(t),
            ClientStream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Unix(s) => s.read(buf),
            ClientStream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Unix(s) => s.write(buf),
            ClientStream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Run `qmp_capabilities` after the greeting (default true).
    pub negotiate: bool,
    /// Ask for the `oob` capability when negotiating (default false).
    pub oob: bool,
    /// Time allowed for each reply and for the greeting (default 30 s;
    /// `None` waits forever).
    pub timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            negotiate: true,
            oob: false,
            timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// A blocking QMP client (see the [module docs](self)).
#[derive(Debug)]
pub struct Client {
    stream: ClientStream,
    framer: Framer,
    ready: VecDeque<Value>,
    events: VecDeque<EventMessage>,
    greeting: Value,
    next_id: u64,
    timeout: Option<Duration>,
    negotiated: bool,
}

/// A reply as the client decodes it.
enum Reply {
    Return(Value),
    Error(QmpError),
}

impl Client {
    /// Connects to a Unix socket, reads the greeting and negotiates.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_unix_with(path, &ConnectOptions::default())
    }

    /// Connects to a Unix socket with the given options.
    pub fn connect_unix_with(
        path: impl AsRef<Path>,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        Self::from_stream(ClientStream::Unix(stream), options)
    }

    /// Connects over TCP, reads the greeting and negotiates.
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> Result<Self, ClientError> {
        Self::connect_tcp_with(addr, &ConnectOptions::default())
    }

    /// Connects over TCP with the given options.
    pub fn connect_tcp_with(
        addr: impl ToSocketAddrs,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Self::from_stream(ClientStream::Tcp(stream), options)
    }

    /// Starts a session on a connected stream: reads the greeting, and
    /// negotiates if the options say so.
    pub fn from_stream(
        stream: ClientStream,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        stream.set_timeouts(options.timeout)?;
        let mut client = Client {
            stream,
            framer: Framer::new(),
            ready: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            timeout: options.timeout,
            negotiated: false,
        };
        let deadline = client.deadline(options.timeout);
        let greeting = client.read_message(deadline, "the QMP greeting")?;
        if greeting.get("QMP").is_none_or(|g| !g.is_object()) {
            return Err(ClientError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        if options.negotiate {
            client.negotiate(options.oob)?;
        }
        Ok(client)
    }

    /// The greeting as the server sent it.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The greeting's `version` member.
    pub fn server_version(&self) -> Option<&Value> {
        self.greeting.get("QMP").and_then(|g| g.get("version"))
    }

    /// The capabilities the server offered.
    pub fn server_capabilities(&self) -> Vec<String> {
        self.greeting
            .get("QMP")
            .and_then(|g| g.get("capabilities"))
            .and_then(Value::as_array)
            .map(|caps| {
                caps.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `qmp_capabilities` succeeded.
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// The underlying stream.
    pub fn stream(&self) -> &ClientStream {
        &self.stream
    }

    /// Sets the time allowed for each reply (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_timeouts(timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Runs `qmp_capabilities`, enabling `oob` if asked to.
    pub fn negotiate(&mut self, oob: bool) -> Result<(), ClientError> {
        let args = if oob {
            json!({"enable": ["oob"]})
        } else {
            json!({})
        };
        self.execute_raw("qmp_capabilities", args)?;
        self.negotiated = true;
        Ok(())
    }

    /// Executes a command and returns its `return` value. `arguments` must
    /// be an object, or `null` for none.
    pub fn execute_raw(&mut self, name: &str, arguments: Value) -> Result<Value, ClientError> {
        self.call("execute", name, arguments, &[])
    }

    /// Executes a command out of band (`exec-oob`; needs the `oob`
    /// capability).
    pub fn execute_oob_raw(&mut self, name: &str, arguments: Value) -> Result<Value, ClientError> {
        self.call("exec-oob", name, arguments, &[])
    }

    /// Executes a typed command.
    pub fn execute<C: Command>(
        &mut self,
        arguments: &C::Arguments,
    ) -> Result<C::Returns, ClientError> {
        let args = serde_json::to_value(arguments)?;
        let ret = self.execute_raw(C::NAME, args)?;
        Ok(serde_json::from_value(ret)?)
    }

    /// Executes a command, passing file descriptors with its bytes (Unix
    /// sockets only), as `getfd` and `add-fd` expect.
    pub fn execute_with_fds(
        &mut self,
        name: &str,
        arguments: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, ClientError> {
        if !fds.is_empty() && !matches!(self.stream, ClientStream::Unix(_)) {
            return Err(ClientError::Protocol(
                "file descriptors can only be passed over a Unix socket".into(),
            ));
        }
        self.call("execute", name, arguments, fds)
    }

    /// Takes the events received so far.
    pub fn events(&mut self) -> Vec<EventMessage> {
        self.drain_ready();
        self.events.drain(..).collect()
    }

    /// Waits for the event `name` (events received before it stay queued).
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<EventMessage, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain_ready();
            if let Some(pos) = self.events.iter().position(|e| e.event == name) {
                if let Some(ev) = self.events.remove(pos) {
                    return Ok(ev);
                }
            }
            let msg = self.read_message(Some(deadline), &format!("event {name}"))?;
            self.ready.push_back(msg);
        }
    }

    /// Sends raw bytes (for testing servers with malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Receives the next message of any kind, as JSON (events included:
    /// they are not queued by this call).
    pub fn recv_raw(&mut self) -> Result<Value, ClientError> {
        let deadline = self.deadline(self.timeout);
        self.read_message(deadline, "a QMP message")
    }

    fn deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        timeout.map(|t| Instant::now() + t)
    }

    fn call(
        &mut self,
        verb: &str,
        name: &str,
        arguments: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert(verb.into(), Value::String(name.into()));
        match arguments {
            Value::Null => {}
            Value::Object(args) => {
                req.insert("arguments".into(), Value::Object(args));
            }
            other => {
                return Err(ClientError::Decode(serde::ser::Error::custom(format!(
                    "arguments of {name} must be a JSON object, not {other}"
                ))))
            }
        }
        req.insert("id".into(), json!(id));
        let mut bytes = Vec::new();
        write_message(&mut bytes, &Value::Object(req), KeyOrder::Insertion);
        self.send(&bytes, fds)?;
        match self.wait_reply(id, name)? {
            Reply::Return(v) => Ok(v),
            Reply::Error(e) => Err(ClientError::Qmp(e)),
        }
    }

    fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        let mut sent = 0;
        if let (false, ClientStream::Unix(s)) = (fds.is_empty(), &self.stream) {
            sent = sys::send_with_fds(s.as_fd(), bytes, fds)?;
        }
        self.stream.write_all(&bytes[sent..])?;
        Ok(())
    }

    fn wait_reply(&mut self, id: u64, name: &str) -> Result<Reply, ClientError> {
        let deadline = self.deadline(self.timeout);
        loop {
            let msg = match self.ready.pop_front() {
                Some(m) => m,
                None => self.read_message(deadline, &format!("the reply to {name}"))?,
            };
            let Value::Object(obj) = msg else {
                log::warn!("ignoring a QMP message that is not an object: {msg}");
                continue;
            };
            if obj.contains_key("event") {
                self.queue_event(obj);
                continue;
            }
            let reply = if let Some(ret) = obj.get("return") {
                Reply::Return(ret.clone())
            } else if let Some(err) = obj.get("error") {
                Reply::Error(decode_error(err))
            } else {
                log::warn!("ignoring an unknown QMP message: {}", Value::Object(obj));
                continue;
            };
            match obj.get("id") {
                // Replies without id answer requests that could not be
                // parsed; they come in order, so this one is ours.
                None => return Ok(reply),
                Some(v) if v.as_u64() == Some(id) => return Ok(reply),
                Some(v) => log::warn!("ignoring a reply to another request (id {v})"),
            }
        }
    }

    fn drain_ready(&mut self) {
        let mut keep = VecDeque::new();
        while let Some(msg) = self.ready.pop_front() {
            match msg {
                Value::Object(obj) if obj.contains_key("event") => self.queue_event(obj),
                other => keep.push_back(other),
            }
        }
        self.ready = keep;
        // Events that already arrived on the socket are taken too.
        if self
            .stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .is_ok()
        {
            let _ = self.fill(Some(Instant::now()));
            let _ = self.stream.set_read_timeout(self.timeout);
            let mut keep = VecDeque::new();
            while let Some(msg) = self.ready.pop_front() {
                match msg {
                    Value::Object(obj) if obj.contains_key("event") => self.queue_event(obj),
                    other => keep.push_back(other),
                }
            }
            self.ready = keep;
        }
    }

    fn queue_event(&mut self, obj: Map<String, Value>) {
        match decode_event(obj) {
            Some(ev) => self.events.push_back(ev),
            None => log::warn!("ignoring a malformed QMP event"),
        }
    }

    /// Reads the next message, waiting until `deadline`.
    fn read_message(
        &mut self,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<Value, ClientError> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(m);
            }
            if !self.fill(deadline)? {
                return Err(ClientError::Timeout(what.to_owned()));
            }
        }
    }

    /// One read; parsed messages go to `ready`. Returns false on timeout.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<bool, ClientError> {
        let wait = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            // A zero timeout means "block" to the OS: take one last short look.
            left.max(Duration::from_micros(1))
        });
        self.stream.set_read_timeout(wait)?;
        let mut buf = [0u8; 16384];
        let n = match self.stream.read(&mut buf) {
            Ok(0) => {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the QMP server closed the connection",
                )))
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        for item in self.framer.feed(&buf[..n]) {
            match item {
                Ok(v) => self.ready.push_back(v),
                Err(e) => {
                    return Err(ClientError::Protocol(format!(
                        "the server sent invalid JSON: {e}"
                    )))
                }
            }
        }
        Ok(true)
    }
}

fn decode_error(err: &Value) -> QmpError {
    let class = err
        .get("class")
        .and_then(Value::as_str)
        .map(ErrorClass::from_wire)
        .unwrap_or(ErrorClass::GenericError);
    let desc = err
        .get("desc")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    QmpError { class, desc }
}

fn decode_event(mut obj: Map<String, Value>) -> Option<EventMessage> {
    let Value::String(event) = obj.remove("event")? else {
        return None;
    };
    let ts = obj.get("timestamp");
    let field = |name: &str| {
        ts.and_then(|t| t.get(name))
            .and_then(Value::as_i64)
            .unwrap_or(-1)
    };
    let timestamp = Timestamp {
        seconds: field("seconds"),
        microseconds: field("microseconds"),
    };
    Some(EventMessage {
        event,
        data: obj.remove("data"),
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A scripted server on one end of a socket pair.
    fn scripted(
        script: Vec<(&'static [u8], &'static [u8])>,
    ) -> (ClientStream, thread::JoinHandle<Vec<u8>>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let h = thread::spawn(move || {
            let mut seen = Vec::new();
            for (expect_prefix, send) in script {
                if !expect_prefix.is_empty() {
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while !line.ends_with(b"\n") {
                        if b.read(&mut byte).unwrap() == 0 {
                            return seen;
                        }
                        line.push(byte[0]);
                    }
                    assert!(
                        line.starts_with(expect_prefix),
                        "{}",
                        String::from_utf8_lossy(&line)
                    );
                    seen.extend_from_slice(&line);
                }
                b.write_all(send).unwrap();
            }
            seen
        });
        (ClientStream::Unix(a), h)
    }

    #[test]
    fn negotiates_and_keeps_events() {
        let (s, h) = scripted(vec![
            (b"", b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n"),
            (b"{\"execute\": \"qmp_capabilities\"", b"{\"return\": {}, \"id\": 1}\r\n"),
            (
                b"{\"execute\": \"query-x\", \"arguments\": {\"a\": 1}, \"id\": 2}",
                b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"NEW_THING\", \"data\": {\"x\": 1}, \"extra\": true}\r\n{\"return\": {\"v\": 1}, \"id\": 2, \"unknown\": 5}\r\n",
            ),
            (
                b"{\"execute\": \"bad\"",
                b"{\"id\": 3, \"error\": {\"class\": \"BrandNewClass\", \"desc\": \"nope\"}}\r\n{\"event\": \"LATER\"}\r\n",
            ),
        ]);
        let mut c = Client::from_stream(s, &ConnectOptions::default()).unwrap();
        assert!(c.is_negotiated());
        assert_eq!(c.server_capabilities(), ["oob"]);
        assert_eq!(
            c.execute_raw("query-x", json!({"a": 1})).unwrap(),
            json!({"v": 1})
        );
        let err = c.execute_raw("bad", Value::Null).unwrap_err();
        match err {
            ClientError::Qmp(e) => {
                assert_eq!(e.class, ErrorClass::Other("BrandNewClass".into()));
                assert_eq!(e.desc, "nope");
            }
            other => panic!("{other:?}"),
        }
        let ev = c.wait_event("LATER", Duration::from_secs(5)).unwrap();
        assert_eq!(ev.timestamp.seconds, -1);
        let evs = c.events();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].event, "NEW_THING");
        assert_eq!(evs[0].data, Some(json!({"x": 1})));
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn times_out_and_rejects_bad_greeting() {
        let (s, _h) = scripted(vec![(b"", b"{\"return\": {}}\r\n")]);
        let e = Client::from_stream(s, &ConnectOptions::default()).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e}");

        let (a, _b) = UnixStream::pair().unwrap();
        let opts = ConnectOptions {
            timeout: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        let e = Client::from_stream(ClientStream::Unix(a), &opts).unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    }

    #[test]
    fn arguments_must_be_an_object() {
        let (s, _h) = scripted(vec![(
            b"",
            b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n",
        )]);
        let opts = ConnectOptions {
            negotiate: false,
            ..Default::default()
        };
        let mut c = Client::from_stream(s, &opts).unwrap();
        assert!(matches!(
            c.execute_raw("x", json!([1])),
            Err(ClientError::Decode(_))
        ));
    }
}
