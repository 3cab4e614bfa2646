//! Helpers shared by the integration tests: QEMU's tools as judges, option builders.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use block_graph::{BlockGraph, DeviceAttach};
use qapi_types::{BlockdevOptions, QapiType};
use serde_json::Value;

/// Runs qemu-img and returns its stdout; panics with its stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io commands on an image (read-only unless `rw`), returns stdout.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(img);
    let out = c.output().expect("qemu-io runs");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-io failed: {s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

/// `qemu-img check` must report no errors (leaks are allowed).
pub fn assert_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(img)
        .output()
        .expect("qemu-img runs");
    let s = String::from_utf8_lossy(&out.stdout);
    // Exit code 0: clean; 3: leaks only.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check {}: {s}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Strict decoding of blockdev options.
pub fn opts(v: Value) -> BlockdevOptions {
    BlockdevOptions::from_qmp_strict(v).expect("valid options")
}

/// A read-write guest device.
pub fn disk(id: &str) -> DeviceAttach {
    DeviceAttach::disk(id)
}

/// A CD-ROM-like device with a tray.
pub fn cdrom(id: &str) -> DeviceAttach {
    DeviceAttach {
        id: id.into(),
        read_only: true,
        share_rw: false,
        resizable: false,
        removable: true,
        has_tray: true,
    }
}

/// Adds a qcow2-over-file node named `name` for `path`.
pub fn add_qcow2(g: &mut BlockGraph, name: &str, path: &Path) -> std::sync::Arc<block_graph::Node> {
    g.blockdev_add(&opts(serde_json::json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": path.to_str().unwrap()}
    })))
    .expect("blockdev-add")
}

/// A deterministic byte pattern for block `i`, version `v`.
pub fn pattern(i: u64, v: u64, len: usize) -> Vec<u8> {
    let seed = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v.wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A qemu-storage-daemon 7.2 with a QMP monitor, as the reference for reply shapes.
pub struct Qsd {
    child: std::process::Child,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    _dir: tempfile::TempDir,
}

impl Qsd {
    /// Starts the daemon and negotiates capabilities.
    pub fn start() -> Qsd {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                sock.display()
            ))
            .args(["--monitor", "chardev=m"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon runs");
        let mut tries = 0;
        let s = loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if tries < 200 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to qemu-storage-daemon: {e}"),
            }
        };
        let mut q = Qsd {
            child,
            reader: std::io::BufReader::new(s.try_clone().unwrap()),
            writer: s,
            _dir: dir,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).unwrap();
        q.execute("qmp_capabilities", serde_json::json!({}))
            .expect("capabilities negotiated");
        q
    }

    /// Runs a command; returns its `return` or `error` object.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        use std::io::{BufRead, Write};
        let req = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{req}").unwrap();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(v["error"].clone());
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
