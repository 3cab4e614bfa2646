//! Shared harness of the end-to-end tests: starts `vmm-reference` on a
//! private socket and talks to it with raw JSON lines.

#![allow(dead_code)]

use std::collections::VecDeque;
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

    /// Starts the embedded guest (32 MiB) with the qcow2 image `img` as node `disk0`
    /// behind the virtio-blk device `device` (e.g. `virtio-blk,drive=disk0,id=vd0`) and its
    /// console on the ringbuf chardev `con`.
    pub fn start_guest_with_disk(img: &str, device: &str) -> Vmm {
        let bd = format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}");
        Vmm::start_with(&[
            "-m",
            "32M",
            "--blockdev",
            &bd,
            "--device",
            device,
            "--chardev",
            "ringbuf,id=con,size=65536",
            "--serial",
            "chardev:con",
        ])
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

/// Runs `prog` with `args`, which must succeed; returns its standard output.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().expect(prog);
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// A QMP client for the job tests: keeps the events it reads while waiting for replies,
/// both still to be waited for (`pending`) and all of them in order (`log`).
pub struct JobClient {
    pub raw: Raw,
    pub pending: VecDeque<Value>,
    pub log: Vec<Value>,
}

impl JobClient {
    /// A client on a negotiated connection.
    pub fn new(raw: Raw) -> JobClient {
        JobClient {
            raw,
            pending: VecDeque::new(),
            log: Vec::new(),
        }
    }

    /// Runs a command: its `return`, or its `error` object.
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        let line = serde_json::json!({"execute": name, "arguments": args}).to_string();
        self.raw.send(&format!("{line}\n"));
        loop {
            let m = self.raw.recv();
            if m.get("event").is_some() {
                self.log.push(m.clone());
                self.pending.push_back(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            return Err(m["error"].clone());
        }
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        self.cmd(name, args.clone())
            .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
    }

    /// Runs a command that must fail; returns its error's description.
    pub fn err(&mut self, name: &str, args: Value) -> String {
        let e = self
            .cmd(name, args.clone())
            .expect_err(&format!("{name} {args} should fail"));
        e["desc"].as_str().unwrap().to_string()
    }

    /// The next event matching `pred` (earlier ones that do not match stay logged).
    pub fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.pending.iter().position(&pred) {
                let e = self.pending.remove(i).unwrap();
                self.pending.drain(..i);
                return e;
            }
            assert!(Instant::now() < end, "no {what}; log: {:?}", self.log);
            let m = self.raw.recv();
            if m.get("event").is_some() {
                self.log.push(m.clone());
                self.pending.push_back(m);
            }
        }
    }

    /// Waits for job `id`'s JOB_STATUS_CHANGE to `status`.
    pub fn wait_status(&mut self, id: &str, status: &str) {
        self.wait_event(&format!("{id} {status}"), |e| {
            e["event"] == "JOB_STATUS_CHANGE"
                && e["data"]["id"] == id
                && e["data"]["status"] == status
        });
    }

    /// Waits for the block job event `name` of job `id`; returns the whole event.
    pub fn wait_job_event(&mut self, name: &str, id: &str) -> Value {
        self.wait_event(name, |e| e["event"] == name && e["data"]["device"] == id)
    }
}

/// Whether the 4 KiB chunk `chunk` of the qcow2 image `img` holds the byte `pattern`
/// (checked by qemu-io, as the embedded guest writes its passes).
pub fn chunk_has(img: &str, chunk: u64, pattern: u64) -> bool {
    let cmd = format!("read -P {} {} 4k", pattern & 0xff, chunk * 4096);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", &cmd, img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    out.status.success()
        && !text.contains("Pattern verification failed")
        && text.contains("read 4096/4096")
}

/// `--blockdev` arguments for new 64 MiB qcow2 images in `dir`, one per name (node `src`
/// on `src.qcow2`); the first `with_data` of them get 32 MiB written by qemu-io.
pub fn qcow2_node_args(dir: &Path, names: &[&str], with_data: usize) -> Vec<String> {
    let mut args = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let f = dir.join(format!("{n}.qcow2"));
        let f = f.to_str().expect("UTF-8 path");
        run("qemu-img", &["create", "-q", "-f", "qcow2", f, "64M"]);
        if i < with_data {
            run("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 32M", f]);
        }
        args.push("--blockdev".to_string());
        args.push(format!(
            "driver=qcow2,node-name={n},file.driver=file,file.filename={f}"
        ));
    }
    args
}

/// Starts `vmm-reference --no-guest` with `args` and waits until its monitor listens (the
/// socket file appears at bind, a moment before listen).
pub fn start_listening(args: &[String]) -> Vmm {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = Vmm::start(&args);
    let end = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&vmm.sock).is_err() {
        assert!(Instant::now() < end, "the monitor never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm
}
