//! Shared harness of the end-to-end tests: starts `vmm-reference` on a
//! private socket and talks to it with raw JSON lines.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const VMM: &str = env!("CARGO_BIN_EXE_vmm-reference");

/// A running `vmm-reference --no-guest` with a QMP socket in a private directory.
pub struct Vmm {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Vmm {
    /// Starts the VMM with one Unix monitor and `extra` arguments.
    pub fn start(extra: &[&str]) -> Vmm {
        let mut args = vec!["--no-guest"];
        args.extend(extra);
        Vmm::start_with(&args)
    }

    /// Starts the VMM with one Unix monitor and exactly `extra` arguments
    /// (a guest runs unless they say `--no-guest`).
    pub fn start_with(extra: &[&str]) -> Vmm {
        let dir = tempfile::tempdir().expect("temporary directory");
        let sock = dir.path().join("qmp.sock");
        let mut args = vec!["--qmp".to_owned(), format!("unix:{}", sock.display())];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(VMM)
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vmm-reference");
        wait_for_path(&sock);
        Vmm { child, dir, sock }
    }

    /// Connects a raw client and reads the greeting.
    pub fn connect(&self) -> (Raw, Value) {
        let mut raw = Raw::connect(&self.sock);
        let greeting = raw.recv();
        (raw, greeting)
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(&self) -> Raw {
        let (mut raw, _) = self.connect();
        assert_eq!(
            raw.exec(r#"{"execute": "qmp_capabilities"}"#),
            serde_json::json!({"return": {}})
        );
        raw
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "vmm-reference did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether KVM can be used here; says so on standard error when it can't,
/// so that tests needing it skip visibly.
pub fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("{test}: skipped: /dev/kvm is not available on this machine");
    }
    ok
}

/// Waits until a path exists (the VMM creates its socket when ready).
pub fn wait_for_path(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client that writes and reads JSON lines with no protocol logic, so that
/// the tests judge the server independently of our own client code.
pub struct Raw {
    pub writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    /// Connects to a Unix socket.
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Raw {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        }
    }

    /// Sends bytes as they are.
    pub fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).expect("send");
    }

    /// Reads one line; checks QMP's framing (CRLF, ASCII) and parses it.
    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a reply");
        assert!(n > 0, "connection closed while waiting for a reply");
        assert!(line.ends_with("\r\n"), "line not ended by CRLF: {line:?}");
        assert!(line.is_ascii(), "non-ASCII output: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Reads until EOF; returns the lines read (none expected to be partial).
    pub fn recv_until_eof(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return out,
                Ok(_) => out.push(serde_json::from_str(&line).expect("JSON line")),
                Err(e) => panic!("read failed before EOF: {e}"),
            }
        }
    }

    /// Sends a line and reads the next message.
    pub fn exec(&mut self, line: &str) -> Value {
        // One write: the server acts on a complete object at once, and after
        // `quit` a separate newline would meet a closed socket.
        self.send(&format!("{line}\n"));
        self.recv()
    }
}

/// QEMU 7.2's qemu-storage-daemon with one QMP monitor, as the reference.
pub struct Qsd {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Qsd {
    /// Starts it with `extra` arguments (e.g. `--chardev ringbuf,id=rb0`).
    pub fn start(extra: &[&str]) -> Qsd {
        let dir = tempfile::tempdir().expect("temporary directory");
        let sock = dir.path().join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp0",
                sock.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (Debian's qemu-system-x86; .ci/run installs it)");
        wait_for_path(&sock);
        // Let it finish starting: 7.2 can lose a connection made in its first milliseconds.
        std::thread::sleep(Duration::from_millis(100));
        Qsd { child, dir, sock }
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(&self) -> Raw {
        let mut raw = Raw::connect(&self.sock);
        raw.recv();
        assert_eq!(
            raw.exec(r#"{"execute": "qmp_capabilities"}"#),
            serde_json::json!({"return": {}})
        );
        raw
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
