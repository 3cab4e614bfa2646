//! Side by side with QEMU: the same bytes go to qemu-storage-daemon's QMP
//! monitor and to a `Session`, and the replies must be identical, byte for
//! byte (greeting included). Skipped, with a note, where QEMU is missing.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmp_proto::session::{Session, SessionConfig};
use qmp_proto::QmpError;

struct Qsd {
    child: Child,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qsd() -> Option<Qsd> {
    let dir = tempfile::tempdir().ok()?;
    let path = dir.path().join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=m",
            path.display()
        ))
        .arg("--monitor")
        .arg("chardev=m")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Qsd {
        child,
        path,
        _dir: dir,
    })
}

/// Reads `n` CRLF-terminated lines.
fn read_lines(s: &mut UnixStream, buf: &mut Vec<u8>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..p + 2).collect();
            out.push(String::from_utf8_lossy(&line[..p]).into_owned());
            continue;
        }
        assert!(Instant::now() < deadline, "QEMU did not answer: {out:?}");
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) => panic!("QEMU closed the connection"),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{e}"),
        }
    }
    out
}

/// Runs `input` through a session whose caller knows no command (like
/// QEMU for the made-up names used here); returns the output lines.
fn ours(version: &serde_json::Value, input: &[u8]) -> Vec<String> {
    let mut s = Session::new(SessionConfig::new(version.clone()));
    s.feed(input);
    while let Some(req) = s.next_request() {
        s.respond(Err(QmpError::command_not_found(&req.command)));
    }
    String::from_utf8(s.pending_output().to_vec())
        .unwrap()
        .split_terminator("\r\n")
        .map(str::to_owned)
        .collect()
}

#[test]
fn replies_match_qemu_storage_daemon() {
    let Some(qsd) = start_qsd() else {
        eprintln!("qemu-storage-daemon not available: comparison skipped");
        return;
    };
    let cases: &[&[u8]] = &[
        b"{\"execute\": \"x-nosuch\", \"id\": 1}\n",
        b"[]\n{}\n{\"id\": [1, {\"b\": 2, \"a\": 1}]}\n",
        b"{\"execute\": 1}\n{\"execute\": \"x\", \"arguments\": []}\n{\"execute\": \"x\", \"foo\": 1, \"id\": \"f\"}\n",
        b"{\"exec-oob\": \"x\", \"id\": 1}\n{\"execute\": \"x\", \"exec-oob\": \"y\"}\n",
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"foo\"]}}\n",
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": \"oob\"}}\n",
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [1]}}\n",
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"bogus\": 1}, \"id\": 2}\n",
        b"{'execute': 'qmp_capabilities', 'id': 'it\\'s'}\n{\"execute\": \"x-nosuch\", \"id\": 0.1}\n{\"execute\": \"qmp_capabilities\"}\n{\"exec-oob\": \"x-nosuch\"}\n",
        // QEMU runs out-of-band requests at once, ahead of queued in-band
        // ones; the session runs everything in order. Only the in-band
        // request comes last here, so the orders agree.
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}\n{\"exec-oob\": \"qmp_capabilities\", \"id\": 3}\n{\"exec-oob\": \"x-nosuch\", \"id\": 4}\n{\"exec-oob\": 1}\n{\"exec-oob\": \"x\", \"execute\": \"y\"}\n",
        b"@\n{\"a\" 1}\n[1 2]\n{1: 2}\n{\"a\": }\n[1,]\n}\n{]\n[}]\njunk \n",
        b"\"\\x\"\n\"\\u12G4\"\n\"\\uD800\\u0041\"\n\"\\uFFFF\"\n\"\xc3(\"\n\"\xef\xbf\xbf\"\n\"a\tb\"\n\xff\n01\n-x\n1.e5 \n1e+ \n%d\nTRUE\n",
        b"{\"execute\": \"x\", \"id\": 1, \"id\": 2}\n{\"execute\": \"x\", \"id\": \"\\u00e9\\ud83d\\ude00\\u007f/\xc3\xa9\"}\n{\"id\": {\"z\": 1e20, \"y\": 1e-5, \"x\": -0.0, \"w\": 18446744073709551615, \"v\": -9223372036854775809}}\n",
    ];
    let mut version = None;
    for input in cases {
        let mut s = UnixStream::connect(&qsd.path).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = Vec::new();
        let greeting = read_lines(&mut s, &mut buf, 1).remove(0);
        let v = version.get_or_insert_with(|| {
            // Rebuilt in QEMU's insertion order (VersionInfo's member
            // order): within a hash bucket, QEMU prints the newest first.
            let g: serde_json::Value = serde_json::from_str(&greeting).unwrap();
            let v = &g["QMP"]["version"];
            serde_json::json!({
                "qemu": {
                    "major": v["qemu"]["major"],
                    "minor": v["qemu"]["minor"],
                    "micro": v["qemu"]["micro"],
                },
                "package": v["package"],
            })
        });
        let expected = ours(v, input);
        s.write_all(input).unwrap();
        let mut got = vec![greeting];
        got.extend(read_lines(&mut s, &mut buf, expected.len() - 1));
        assert_eq!(got, expected, "input {:?}", String::from_utf8_lossy(input));
        // And nothing more.
        let mut extra = [0u8; 256];
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(k) = s.read(&mut extra) {
            assert_eq!(
                k,
                0,
                "QEMU said more: {:?}",
                String::from_utf8_lossy(&extra[..k])
            );
        }
    }
}
