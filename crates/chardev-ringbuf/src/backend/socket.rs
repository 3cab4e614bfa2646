//! The `socket` backend: a stream socket over Unix or TCP, as a server
//! (one client at a time; later clients wait in the backlog until the
//! current one leaves) or a client (optionally reconnecting every
//! `reconnect` seconds), with QEMU's telnet handling on servers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Interest, Token};

use super::netaddr::{self, Listener, Stream, Target, UnlinkOnClose};
use super::{sys, Backend, BackendContext, OpenEnv, OutFd, Sink, StreamSink, OUT_QUEUE_LIMIT};
use crate::config::{SocketAddrConfig, SocketConfig};
use crate::error::strerror;
use crate::frontend::ChardevEventKind;

const IAC: u8 = 0xFF;
const IAC_BREAK: u8 = 0xF3;
/// What a telnet server sends first: WILL ECHO, WILL SUPPRESS-GO-AHEAD,
/// WILL BINARY, DO BINARY (QEMU's negotiation).
pub(crate) const TELNET_INIT: [u8; 12] = [
    0xff, 0xfb, 0x01, 0xff, 0xfb, 0x03, 0xff, 0xfb, 0x00, 0xff, 0xfd, 0x00,
];

/// QEMU's telnet input filter: removes IAC sequences (commands are taken to
/// be three bytes long, except `IAC IAC`, a literal 0xFF, and `IAC BREAK`).
/// `state` is 1 between sequences. Returns the filtered length and the
/// number of breaks seen.
pub(crate) fn telnet_filter(state: &mut u8, buf: &mut [u8]) -> (usize, usize) {
    let mut j = 0;
    let mut breaks = 0;
    for i in 0..buf.len() {
        let b = buf[i];
        if *state > 1 {
            if b == IAC && *state == 2 {
                buf[j] = b;
                j += 1;
                *state = 1;
            } else {
                if b == IAC_BREAK && *state == 2 {
                    breaks += 1;
                    *state += 1;
                }
                *state += 1;
            }
            if *state >= 4 {
                *state = 1;
            }
        } else if b == IAC {
            *state = 2;
        } else {
            buf[j] = b;
            j += 1;
        }
    }
    (j, breaks)
}

struct Conn {
    stream: Arc<Stream>,
    token: Token,
    /// The peer closed its side (or the socket failed).
    hup: bool,
}

struct Connecting {
    stream: Stream,
    token: Token,
    /// TCP addresses not tried yet in this attempt.
    rest: Vec<std::net::SocketAddr>,
}

/// The socket backend.
pub(crate) struct SocketBackend {
    server: bool,
    telnet: bool,
    nodelay: bool,
    proto: &'static str,
    /// The address part of the disconnected filename.
    desc: String,
    /// The path a Unix server shows when connected.
    unix_local: String,
    listener: Option<(Listener, Token)>,
    unlink: Option<UnlinkOnClose>,
    conn: Option<Conn>,
    target: Option<(Target, String)>,
    reconnect: Option<Duration>,
    connecting: Option<Connecting>,
    next_attempt: Option<Instant>,
    err_reported: bool,
    sink: Arc<StreamSink>,
    filename: String,
    telnet_state: u8,
}

impl SocketBackend {
    pub(crate) fn open(
        cx: &mut BackendContext<'_>,
        cfg: &SocketConfig,
        env: &mut OpenEnv<'_>,
    ) -> Result<Self, String> {
        if let Some(creds) = &cfg.tls_creds {
            return Err(format!("No TLS credentials with id '{creds}'"));
        }
        let server = cfg.server.unwrap_or(true);
        match &cfg.addr {
            SocketAddrConfig::Fd { .. } if cfg.reconnect.is_some() => {
                return Err("'reconnect' option is incompatible with 'fd' address type".into())
            }
            SocketAddrConfig::Vsock { .. } => return Err(netaddr::VSOCK_UNSUPPORTED.into()),
            _ => {}
        }
        if server && cfg.reconnect.is_some() {
            return Err(
                "'reconnect' option is incompatible with socket in server listen mode".into(),
            );
        }
        if !server && cfg.wait.is_some() {
            return Err("'wait' option is incompatible with socket in client connect mode".into());
        }
        if !cx.has_poll() {
            return Err("a socket chardev needs an event loop".into());
        }
        let telnet = cfg.telnet.unwrap_or(false);
        let proto = if telnet { "telnet" } else { "tcp" };
        let unix_local = match &cfg.addr {
            SocketAddrConfig::Unix {
                path, r#abstract, ..
            } if r#abstract != &Some(true) => path.clone(),
            _ => String::new(),
        };
        let mut b = SocketBackend {
            server,
            telnet: telnet && server,
            nodelay: cfg.nodelay.unwrap_or(false),
            proto,
            desc: netaddr::describe(&cfg.addr, proto),
            unix_local,
            listener: None,
            unlink: None,
            conn: None,
            target: None,
            reconnect: cfg
                .reconnect
                .filter(|&r| r > 0)
                .map(|r| Duration::from_secs(r.unsigned_abs())),
            connecting: None,
            next_attempt: None,
            err_reported: false,
            sink: Arc::new(StreamSink::new(OUT_QUEUE_LIMIT)),
            filename: String::new(),
            telnet_state: 1,
        };
        if server {
            let (listener, desc, unlink) =
                netaddr::listen(&cfg.addr, proto, env.fd_resolver.as_deref_mut())?;
            b.desc = desc;
            b.unlink = unlink;
            b.set_disconnected_filename();
            let token = match cx.register(listener.fd(), Interest::READABLE) {
                Ok(t) => t,
                Err(e) => {
                    if let Some(u) = &b.unlink {
                        u.run();
                    }
                    return Err(format!("Failed to poll socket: {}", strerror(&e)));
                }
            };
            if cfg.wait.unwrap_or(false) {
                cx.notice(&format!("waiting for connection on: {}", b.filename));
                loop {
                    if let Err(e) = sys::wait_readable(listener.fd()) {
                        b.listener = Some((listener, token));
                        b.shutdown(cx);
                        return Err(format!("Failed to accept connection: {}", strerror(&e)));
                    }
                    match listener.accept() {
                        Ok(s) => {
                            b.listener = Some((listener, token));
                            b.new_client(cx, s);
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            b.listener = Some((listener, token));
                            b.shutdown(cx);
                            return Err(format!("Failed to accept connection: {}", strerror(&e)));
                        }
                    }
                }
            } else {
                b.listener = Some((listener, token));
            }
        } else if let SocketAddrConfig::Fd { name } = &cfg.addr {
            let fd = netaddr::resolve_fd(name, env.fd_resolver.as_deref_mut())?;
            let s = netaddr::stream_from_fd(fd, name)?;
            b.set_disconnected_filename();
            b.new_client(cx, s);
        } else {
            let (target, desc) = netaddr::target(&cfg.addr)?;
            b.set_disconnected_filename();
            if b.reconnect.is_some() {
                b.target = Some((target, desc));
                b.start_connect(cx);
            } else {
                let s = netaddr::connect_sync(&target, &desc)?;
                b.target = Some((target, desc));
                b.new_client(cx, s);
            }
        }
        Ok(b)
    }

    fn set_disconnected_filename(&mut self) {
        let srv = if self.server { ",server=on" } else { "" };
        self.filename = format!("disconnected:{}{srv}", self.desc);
    }

    fn new_client(&mut self, cx: &mut BackendContext<'_>, stream: Stream) {
        if self.nodelay {
            if let Stream::Tcp(s) = &stream {
                let _ = s.set_nodelay(true);
            }
        }
        let token = match cx.register(stream.fd(), Interest::READABLE | Interest::WRITABLE) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("chardev {}: dropping a connection: {e}", cx.id());
                return;
            }
        };
        let stream = Arc::new(stream);
        self.filename = stream.filename(self.proto, self.server, &self.unix_local);
        self.sink
            .set_conn(Some(stream.clone() as Arc<dyn OutFd>), true);
        if self.telnet {
            self.telnet_state = 1;
            self.sink.push_front_bytes(&TELNET_INIT);
            self.sink.flush();
        }
        self.conn = Some(Conn {
            stream,
            token,
            hup: false,
        });
        self.err_reported = false;
        cx.event(ChardevEventKind::Opened);
        self.read(cx);
    }

    fn disconnect(&mut self, cx: &mut BackendContext<'_>) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        cx.deregister(conn.stream.fd(), conn.token);
        self.sink.set_conn(None, false);
        drop(conn);
        self.set_disconnected_filename();
        cx.event(ChardevEventKind::Closed);
        if self.listener.is_some() {
            self.accept(cx);
        } else if let Some(r) = self.reconnect {
            self.next_attempt = Some(Instant::now() + r);
        }
    }

    fn accept(&mut self, cx: &mut BackendContext<'_>) {
        if self.conn.is_some() {
            // One client at a time: others wait in the backlog.
            return;
        }
        let Some((listener, _)) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok(s) => return self.new_client(cx, s),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("chardev {}: accept: {e}", cx.id());
                    return;
                }
            }
        }
    }

    /// Delivers input while the frontend has room.
    fn read(&mut self, cx: &mut BackendContext<'_>) {
        let mut buf = [0u8; 4096];
        loop {
            let Some(conn) = &self.conn else {
                return;
            };
            let room = cx.can_receive();
            if room == 0 {
                if conn.hup && !cx.has_frontend() {
                    self.disconnect(cx);
                }
                return;
            }
            let want = room.min(buf.len());
            match conn.stream.read(&mut buf[..want]) {
                Ok(0) => return self.disconnect(cx),
                Ok(n) => {
                    let mut n = n;
                    if self.telnet {
                        let (m, breaks) = telnet_filter(&mut self.telnet_state, &mut buf[..n]);
                        for _ in 0..breaks {
                            cx.event(ChardevEventKind::Break);
                        }
                        n = m;
                    }
                    if n > 0 {
                        cx.receive(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("chardev {}: read: {e}", cx.id());
                    return self.disconnect(cx);
                }
            }
        }
    }

    /// Starts a non-blocking connection attempt (client with reconnect).
    fn start_connect(&mut self, cx: &mut BackendContext<'_>) {
        self.next_attempt = None;
        let Some((target, _)) = &self.target else {
            return;
        };
        let attempt = match target {
            Target::Unix(a) => {
                mio::net::UnixStream::connect_addr(a).map(|s| (Stream::Unix(s), Vec::new()))
            }
            Target::Tcp(addrs) => {
                let mut rest: Vec<_> = addrs.iter().rev().copied().collect();
                let mut last = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
                let mut got = None;
                while let Some(a) = rest.pop() {
                    match mio::net::TcpStream::connect(a) {
                        Ok(s) => {
                            got = Some((Stream::Tcp(s), rest));
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                got.ok_or(last)
            }
        };
        match attempt {
            Ok((stream, rest)) => {
                match cx.register(stream.fd(), Interest::READABLE | Interest::WRITABLE) {
                    Ok(token) => {
                        self.connecting = Some(Connecting {
                            stream,
                            token,
                            rest,
                        })
                    }
                    Err(e) => self.connect_failed(cx, e),
                }
            }
            Err(e) => self.connect_failed(cx, e),
        }
    }

    fn connect_failed(&mut self, cx: &mut BackendContext<'_>, e: std::io::Error) {
        if !self.err_reported {
            let desc = self.target.as_ref().map_or("", |t| t.1.as_str());
            let msg = format!(
                "Unable to connect character device {}: Failed to connect to '{desc}': {}",
                cx.id(),
                strerror(&e)
            );
            cx.notice(&msg);
            self.err_reported = true;
        }
        if let Some(r) = self.reconnect {
            self.next_attempt = Some(Instant::now() + r);
        }
    }

    fn finish_connect(&mut self, cx: &mut BackendContext<'_>) {
        let Some(c) = self.connecting.take() else {
            return;
        };
        let outcome = match c.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => c.stream.is_connected(),
        };
        match outcome {
            Ok(false) => self.connecting = Some(c),
            Ok(true) => {
                cx.deregister(c.stream.fd(), c.token);
                self.new_client(cx, c.stream);
            }
            Err(e) => {
                cx.deregister(c.stream.fd(), c.token);
                let mut rest = c.rest;
                while let Some(a) = rest.pop() {
                    if let Ok(s) = mio::net::TcpStream::connect(a) {
                        let s = Stream::Tcp(s);
                        if let Ok(token) =
                            cx.register(s.fd(), Interest::READABLE | Interest::WRITABLE)
                        {
                            self.connecting = Some(Connecting {
                                stream: s,
                                token,
                                rest,
                            });
                            return;
                        }
                    }
                }
                self.connect_failed(cx, e);
            }
        }
    }

    /// Whether a client is connected (for tests and diagnostics).
    pub(crate) fn connected(&self) -> bool {
        self.conn.is_some()
    }
}

impl Backend for SocketBackend {
    fn filename(&self) -> String {
        self.filename.clone()
    }
    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }
    fn is_open(&self) -> bool {
        self.connected()
    }
    fn handle_event(&mut self, cx: &mut BackendContext<'_>, token: Token, event: &Event) {
        if self.listener.as_ref().is_some_and(|(_, t)| *t == token) {
            self.accept(cx);
        } else if self.connecting.as_ref().is_some_and(|c| c.token == token) {
            self.finish_connect(cx);
        } else if let Some(conn) = self.conn.as_mut().filter(|c| c.token == token) {
            if event.is_read_closed() || event.is_error() {
                conn.hup = true;
            }
            if event.is_writable() && self.sink.flush() {
                cx.output_ready();
            }
            self.read(cx);
        }
    }
    fn pump(&mut self, cx: &mut BackendContext<'_>) {
        self.read(cx);
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.next_attempt
    }
    fn on_timeout(&mut self, cx: &mut BackendContext<'_>, now: Instant) {
        if self.next_attempt.is_some_and(|t| t <= now) && self.conn.is_none() {
            self.start_connect(cx);
        }
    }
    fn shutdown(&mut self, cx: &mut BackendContext<'_>) {
        if let Some(conn) = self.conn.take() {
            cx.deregister(conn.stream.fd(), conn.token);
        }
        if let Some(c) = self.connecting.take() {
            cx.deregister(c.stream.fd(), c.token);
        }
        if let Some((l, t)) = self.listener.take() {
            cx.deregister(l.fd(), t);
        }
        if let Some(u) = self.unlink.take() {
            u.run();
        }
        self.sink.set_conn(None, false);
        self.next_attempt = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telnet_filter_like_qemu() {
        let mut st = 1;
        let mut b = *b"a\xff\xfb\x01b\xff\xffc\xff\xf3d";
        let (n, br) = telnet_filter(&mut st, &mut b);
        assert_eq!(&b[..n], b"ab\xffcd");
        assert_eq!(br, 1);
        assert_eq!(st, 1);
        // A sequence split across reads.
        let mut st = 1;
        let mut b1 = *b"x\xff";
        let (n1, _) = telnet_filter(&mut st, &mut b1);
        assert_eq!(&b1[..n1], b"x");
        let mut b2 = *b"\xfd\x03y";
        let (n2, _) = telnet_filter(&mut st, &mut b2);
        assert_eq!(&b2[..n2], b"y");
    }
}
