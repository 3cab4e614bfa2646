//! End to end: `vmm-reference --no-guest` serving QMP on real sockets,
//! judged by raw JSON lines, by QEMU's own Python client (qemu.qmp) and by
//! its qmp-shell.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Raw, Vmm, VMM};
use serde_json::{json, Value};

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[test]
fn greeting_negotiation_and_envelope_errors_follow_qemu() {
    let vmm = Vmm::start(&[]);
    let (mut c, greeting) = vmm.connect();
    assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_i64(),
        "{greeting}"
    );
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#),
        error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(
        c.exec(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    assert_eq!(
        c.exec(r#"{"execute": "qmp_capabilities"}"#),
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    for (input, desc) in [
        ("[1]", "QMP input must be a JSON object"),
        (
            r#"{"execute": 1}"#,
            "QMP input member 'execute' must be a string",
        ),
        (
            r#"{"execute": "query-status", "foo": 1}"#,
            "QMP input member 'foo' is unexpected",
        ),
        (
            r#"{"execute": "query-status", "arguments": []}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute": "query-status", "arguments": {"x": 1}}"#,
            "Parameter 'x' is unexpected",
        ),
    ] {
        assert_eq!(c.exec(input), error("GenericError", desc), "{input}");
    }
    assert_eq!(
        c.exec(r#"{"execute": "no-such"}"#),
        error("CommandNotFound", "The command no-such has not been found")
    );
    // `id` of any JSON type is echoed, and single-quoted input is accepted.
    for id in [
        json!(1),
        json!("x"),
        json!({"a": [1, null]}),
        json!([true]),
        json!(-2.5),
    ] {
        let reply = c.exec(&json!({"execute": "query-status", "id": id}).to_string());
        assert_eq!(reply["id"], id);
        assert_eq!(reply["return"]["status"], "running");
    }
    let reply = c.exec("{'execute': 'query-name', 'id': 'sq'}");
    assert_eq!(reply, json!({"return": {}, "id": "sq"}));
}

#[test]
fn query_commands_lists_exactly_what_runs_and_schema_agrees() {
    let vmm = Vmm::start(&["--name", "vm-e2e"]);
    let mut c = vmm.negotiated();
    let commands: Vec<String> = c.exec(r#"{"execute": "query-commands"}"#)["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    for name in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "query-status",
        "quit",
    ] {
        assert!(
            commands.iter().any(|c| c == name),
            "{name} missing from {commands:?}"
        );
    }
    // Every listed command runs (none answers CommandNotFound); quit is left for last.
    for name in &commands {
        if name == "quit" || name == "qmp_capabilities" {
            continue;
        }
        // Without arguments a command may run or refuse (a missing argument,
        // no descriptor passed), but a listed command never claims not to exist.
        let reply = c.exec(&json!({"execute": name}).to_string());
        assert_ne!(
            reply["error"]["class"], "CommandNotFound",
            "{name}: {reply}"
        );
    }
    assert_eq!(
        c.exec(r#"{"execute": "query-name"}"#)["return"],
        json!({"name": "vm-e2e"})
    );
    let schema = c.exec(r#"{"execute": "query-qmp-schema"}"#)["return"]
        .as_array()
        .unwrap()
        .clone();
    let listed: Vec<&str> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    let mut expected: Vec<&str> = commands.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(
        sorted, expected,
        "query-qmp-schema and query-commands disagree"
    );
    assert!(schema
        .iter()
        .any(|e| e["name"] == "SHUTDOWN" && e["meta-type"] == "event"));
}

#[test]
fn events_reach_negotiated_clients_only_and_quit_exits_cleanly() {
    let mut vmm = Vmm::start(&[]);
    let mut a = vmm.negotiated();
    let (mut unnegotiated, _) = vmm.connect();
    let mut b = vmm.negotiated();
    assert_eq!(
        b.exec(r#"{"execute": "quit", "id": 7}"#),
        json!({"return": {}, "id": 7})
    );
    let event = b.recv();
    assert_eq!(event["event"], "SHUTDOWN");
    assert!(event["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000);
    assert!(event["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    assert_eq!(a.recv()["event"], "SHUTDOWN");
    assert_eq!(unnegotiated.recv_until_eof(), Vec::<Value>::new());
    assert!(vmm.wait_exit(Duration::from_secs(10)).success());
    assert!(!vmm.sock.exists(), "the socket file is removed on exit");
}

#[test]
fn hostile_clients_affect_only_themselves() {
    let vmm = Vmm::start(&[]);
    let mut good = vmm.negotiated();

    // Garbage, then a valid command on the same connection: a parse error, then service.
    let mut bad = vmm.negotiated();
    bad.send("{\"execute\": ]\n");
    let r = bad.recv();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(r.get("id").is_none());
    assert_eq!(
        bad.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );

    // 100,000 nested brackets: an error, no crash.
    let mut deep = vmm.negotiated();
    deep.send(&"[".repeat(100_000));
    deep.send(&"]".repeat(100_000));
    deep.send("\n");
    assert_eq!(deep.recv()["error"]["class"], "GenericError");

    // A message cut off by a disconnect.
    let mut cut = vmm.negotiated();
    cut.send(r#"{"execute": "query-sta"#);
    drop(cut);

    // Invalid UTF-8.
    let mut bin = vmm.negotiated();
    bin.writer
        .write_all(b"{\"execute\": \"\xff\xfe\"}\n")
        .unwrap();
    assert_eq!(bin.recv()["error"]["class"], "GenericError");

    // A client that floods requests and never reads its replies.
    let (mut flood, _) = vmm.connect();
    flood.send("{\"execute\": \"qmp_capabilities\"}\n");
    flood.writer.set_nonblocking(true).unwrap();
    let request = "{\"execute\": \"query-qmp-schema\"}\n".repeat(64);
    let mut sent = 0usize;
    for _ in 0..20_000 {
        match flood.writer.write(request.as_bytes()) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => break,
        }
    }
    assert!(sent > 0);

    // Everyone else is still served, and memory stays bounded.
    for _ in 0..5 {
        assert_eq!(
            good.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
            "running"
        );
    }
    let rss = vmm.rss_kib();
    assert!(rss < 256 * 1024, "RSS grew to {rss} KiB");
}

#[test]
fn a_huge_string_is_refused_without_holding_it() {
    let vmm = Vmm::start(&[]);
    let mut good = vmm.negotiated();
    let mut huge = vmm.negotiated();
    huge.writer
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    huge.send("{\"execute\": \"query-status\", \"id\": \"");
    let chunk = "a".repeat(1 << 20);
    for _ in 0..100 {
        if huge.writer.write_all(chunk.as_bytes()).is_err() {
            break; // The server may close a client that exceeds its limits.
        }
    }
    let _ = huge.writer.write_all(b"\"}\n");
    assert_eq!(
        good.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );
    assert!(vmm.rss_kib() < 256 * 1024, "RSS {} KiB", vmm.rss_kib());
}

#[test]
fn tcp_monitors_and_several_monitors_work() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let second = tempfile::tempdir().unwrap();
    let second_sock = second.path().join("b.sock");
    let vmm = Vmm::start(&[
        "-qmp",
        &format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        "-qmp",
        &format!("unix:{},server,nowait", second_sock.display()),
    ]);
    common::wait_for_path(&second_sock);
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\"}\n")
        .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("\r\n").count() < 3 {
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0);
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    assert!(got.contains("\"status\": \"running\""), "{got}");
    let mut b = Raw::connect(&second_sock);
    b.recv();
    assert_eq!(
        b.exec(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    drop(vmm);
}

#[test]
fn sigterm_shuts_down_and_removes_the_socket() {
    let mut vmm = Vmm::start(&[]);
    let _client = vmm.negotiated();
    // SAFETY: kill(2) on the child's pid, which we own and have not reaped.
    let rc = unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert!(vmm.wait_exit(Duration::from_secs(10)).success());
    assert!(!vmm.sock.exists());
    assert!(UnixStream::connect(&vmm.sock).is_err());
}

#[test]
fn bad_flags_get_one_clear_line() {
    for (args, needle) in [
        (&["--frobnicate"][..], "--frobnicate"),
        (&["--no-guest", "--qmp", "stdio"], "not a monitor address"),
        (&["--no-guest", "-m", "12X"], "memory size"),
        (&["--no-guest", "--serial", "tcp:x"], "serial backend"),
    ] {
        let out = Command::new(VMM)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let help = Command::new(VMM).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--qmp"));
}

fn python_ok() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 with PyPI's qemu.qmp is required (pip install qemu.qmp; .ci/run installs it)"
    );
    ok
}

#[test]
fn qemu_python_client_drives_a_whole_session() {
    python_ok();
    let mut vmm = Vmm::start(&[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/python/qmp_session.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(&vmm.sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu.qmp session failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    assert!(vmm.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn qmp_shell_talks_to_the_vmm() {
    python_ok();
    let vmm = Vmm::start(&[]);
    let mut shell = Command::new("qmp-shell")
        .arg(&vmm.sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qmp-shell is installed with qemu.qmp");
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-status\nquery-name\nquery-status bogus=1\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"status\": \"running\""),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Parameter 'bogus' is unexpected"),
        "{stdout}"
    );
}
