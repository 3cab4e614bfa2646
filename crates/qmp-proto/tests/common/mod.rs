//! A QMP server in a thread with a small test handler.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use qmp_proto::server::{CallContext, ClientId, Handler, QmpServer, ServerConfig};
use qmp_proto::session::SessionConfig;
use qmp_proto::{EventMessage, QmpError, Request};
use serde_json::{json, Value};

pub fn version() -> Value {
    json!({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "qmp-proto-test"})
}

#[derive(Default)]
pub struct Log {
    pub connected: Vec<ClientId>,
    pub disconnected: Vec<ClientId>,
}

pub struct TestHandler {
    pub log: Arc<Mutex<Log>>,
}

impl Handler for TestHandler {
    fn execute(&mut self, call: &mut CallContext<'_>, req: &Request) -> Result<Value, QmpError> {
        match req.command.as_str() {
            "echo" => Ok(Value::Object(req.arguments.clone())),
            "whoami" => Ok(json!({"client": call.client_id().0, "fds": call.fd_count()})),
            "emit" => {
                let name = req
                    .arguments
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("TEST_EVENT");
                call.broadcast(EventMessage::new(name, req.arguments.get("data").cloned()));
                Ok(json!({}))
            }
            "getfd" => {
                let Some(fd) = call.take_fd() else {
                    return Err(QmpError::generic(
                        "No file descriptor supplied via SCM_RIGHTS",
                    ));
                };
                let mut f = std::fs::File::from(fd);
                f.write_all(b"hello from the server")
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            "quit" => {
                call.request_shutdown();
                Ok(json!({}))
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }

    fn client_connected(&mut self, id: ClientId) {
        self.log.lock().unwrap().connected.push(id);
    }

    fn client_disconnected(&mut self, id: ClientId) {
        self.log.lock().unwrap().disconnected.push(id);
    }
}

pub enum Cmd {
    Broadcast(EventMessage),
}

pub struct TestServer {
    pub path: PathBuf,
    pub tcp: SocketAddr,
    pub log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Cmd>,
    handle: Option<thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(SessionConfig::new(version()))
    }

    pub fn start_with(session: SessionConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut server = QmpServer::new(ServerConfig::new(session));
        server.add_unix_listener(&path).unwrap();
        let tcp = server
            .add_tcp_listener("127.0.0.1:0".parse().unwrap())
            .unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Cmd>();
        let mut handler = TestHandler { log: log.clone() };
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            server
                .run_until(&mut handler, |srv| {
                    while let Ok(cmd) = rx.try_recv() {
                        match cmd {
                            Cmd::Broadcast(ev) => {
                                srv.broadcast(&ev);
                            }
                        }
                    }
                    stop2.load(Ordering::SeqCst)
                })
                .unwrap();
        });
        TestServer {
            path,
            tcp,
            log,
            stop,
            tx,
            handle: Some(handle),
            _dir: dir,
        }
    }

    pub fn broadcast(&self, ev: EventMessage) {
        self.tx.send(Cmd::Broadcast(ev)).unwrap();
    }

    /// Waits for the server thread (after `quit`).
    pub fn join(mut self) {
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }

    pub fn wait_disconnects(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log.lock().unwrap().disconnected.len() < n {
            assert!(Instant::now() < deadline, "no disconnect seen");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A raw Unix socket client reading CRLF-terminated lines.
pub struct Raw {
    pub s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(srv: &TestServer) -> Self {
        let s = UnixStream::connect(&srv.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        let g = r.line();
        assert!(g.starts_with("{\"QMP\": "), "{g}");
        r
    }

    pub fn negotiated(srv: &TestServer) -> Self {
        let mut r = Self::connect(srv);
        r.send(b"{\"execute\": \"qmp_capabilities\"}");
        assert_eq!(r.line(), "{\"return\": {}}");
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn line(&mut self) -> String {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..p + 2).collect();
                return String::from_utf8(line[..p].to_vec()).unwrap();
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("reading a reply");
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Asserts nothing arrives for a while.
    pub fn quiet(&mut self, ms: u64) {
        assert!(
            self.buf.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.s
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut chunk = [0u8; 1024];
        match self.s.read(&mut chunk) {
            Ok(n) => panic!("unexpected: {:?}", String::from_utf8_lossy(&chunk[..n])),
            Err(e) => assert!(matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )),
        }
        self.s
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
    }
}
