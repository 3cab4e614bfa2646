//! The chardev commands through a `qapi_types::Dispatcher`, compared byte
//! for byte with qemu-storage-daemon 7.2: the same request lines go to a
//! spawned qemu-storage-daemon over its QMP socket and to our dispatcher,
//! and the reply lines must be identical. Where this crate deliberately
//! differs (strict base64, whole characters in utf8 reads), both sides are
//! asserted separately.

#![cfg(feature = "qmp")]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry, Utf8ReadMode};
use qapi_types::Dispatcher;
use qmp_proto::encode::{to_string, KeyOrder};
use qmp_proto::{Request, Response};
use serde_json::Value;

const CHARDEVS: &[&str] = &[
    "ringbuf,id=rb0,size=4096",
    "ringbuf,id=rb16,size=16",
    "null,id=n0",
];

struct Vmm {
    chardevs: ChardevRegistry,
}

struct Ours {
    d: Dispatcher<Vmm>,
    vmm: Vmm,
}

impl Ours {
    fn new(mode: Utf8ReadMode) -> Self {
        let mut d = Dispatcher::<Vmm>::new();
        d.register_char_commands(|v| &mut v.chardevs);
        let mut chardevs = ChardevRegistry::new();
        chardevs.set_utf8_read_mode(mode);
        for c in CHARDEVS {
            let p = parse_chardev_opts(c).unwrap();
            chardevs.add(&p.id, &p.config).unwrap();
        }
        Ours {
            d,
            vmm: Vmm { chardevs },
        }
    }

    /// The reply line (without CRLF) our dispatcher gives to a request line.
    fn cmd(&mut self, line: &str) -> String {
        let v: Value = serde_json::from_str(line).unwrap();
        let req = Request {
            id: v.get("id").cloned(),
            command: v["execute"].as_str().unwrap().to_owned(),
            arguments: v
                .get("arguments")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            oob: false,
        };
        let result = self.d.dispatch(&mut self.vmm, &req);
        to_string(
            &Response {
                id: req.id.clone(),
                result,
            }
            .to_value(),
            KeyOrder::Qemu,
        )
    }
}

struct Qsd {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    _dir: tempfile::TempDir,
}

impl Qsd {
    fn start() -> Option<Qsd> {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                sock.display()
            ))
            .args(["--monitor", "chardev=m"]);
        for c in CHARDEVS {
            cmd.args(["--chardev", c]);
        }
        let child = match cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("qemu-storage-daemon not available ({e}): comparison skipped");
                return None;
            }
        };
        let mut stream = None;
        for _ in 0..200 {
            if let Ok(s) = UnixStream::connect(&sock) {
                stream = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let writer = stream.expect("qemu-storage-daemon's monitor socket");
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut q = Qsd {
            child,
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
            _dir: dir,
        };
        let greeting = q.line();
        assert!(greeting.starts_with("{\"QMP\""), "{greeting}");
        assert_eq!(
            q.cmd(r#"{"execute": "qmp_capabilities"}"#),
            r#"{"return": {}}"#
        );
        Some(q)
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        l.trim_end_matches("\r\n").to_owned()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        loop {
            let l = self.line();
            if !l.starts_with("{\"timestamp\"") && !l.contains("\"event\"") {
                return l;
            }
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(bytes: &[u8]) -> String {
    chardev_ringbuf::base64::encode(bytes)
}

fn write_b64(dev: &str, bytes: &[u8]) -> String {
    format!(
        r#"{{"execute": "ringbuf-write", "arguments": {{"device": "{dev}", "data": "{}", "format": "base64"}}}}"#,
        b64(bytes)
    )
}

fn read(dev: &str, size: i64, format: &str) -> String {
    format!(
        r#"{{"execute": "ringbuf-read", "arguments": {{"device": "{dev}", "size": {size}, "format": "{format}"}}}}"#
    )
}

/// A sequence of requests, and whether the default (whole characters) mode
/// replies like QEMU 7.2 too.
struct Scenario {
    name: &'static str,
    lines: Vec<String>,
    same_in_whole_mode: bool,
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    let mut s = |name, lines: Vec<String>, same| {
        v.push(Scenario {
            name,
            lines,
            same_in_whole_mode: same,
        })
    };
    s(
        "ascii",
        vec![
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "abcdefgh", "format": "utf8"}, "id": 1}"#.into(),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "rb0", "size": 1000, "format": "utf8"}, "id": "x"}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "tab\tquote\"back\\slash\u007f"}}"#.into(),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "rb0", "size": 5}}"#.into(),
            read("rb0", 100, "utf8"),
        ],
        true,
    );
    s(
        "split two-byte character",
        vec![
            write_b64("rb0", "é".as_bytes()),
            read("rb0", 1, "utf8"),
            read("rb0", 1, "utf8"),
        ],
        false,
    );
    s(
        "split three- and four-byte characters",
        vec![
            write_b64("rb0", "é€😀".as_bytes()),
            read("rb0", 3, "utf8"),
            read("rb0", 4, "utf8"),
            read("rb0", 10, "utf8"),
        ],
        false,
    );
    s(
        "NUL ends QEMU's reply",
        vec![
            write_b64("rb0", b"a\x00b"),
            read("rb0", 3, "utf8"),
            read("rb0", 3, "utf8"),
        ],
        false,
    );
    s(
        "C0 80 is U+0000",
        vec![write_b64("rb0", b"\xc0\x80x"), read("rb0", 5, "utf8")],
        true,
    );
    s(
        "invalid sequences",
        vec![
            write_b64(
                "rb0",
                b"\xef\xb7\x90|\xef\xbf\xbf|\xed\xa0\x80|\xf4\x90\x80\x80|\xf8\x88\x80\x80\x80|\xe2\x82x|\xff|\xfe|\xc1\xbf|\xe0\x80\xaf|\x80\x80|\xfc\x84\x80\x80\x80\x80|ok",
            ),
            read("rb0", 1000, "utf8"),
        ],
        true,
    );
    s(
        "whole characters within the size",
        vec![
            write_b64("rb0", "€€€😀é".as_bytes()),
            read("rb0", 9, "utf8"),
            read("rb0", 6, "utf8"),
        ],
        true,
    );
    s(
        "utf8 write of U+0000 and non-ASCII",
        vec![
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "a\u0000b\u00e9\ud83d\ude00"}}"#.into(),
            read("rb0", 100, "base64"),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "x\u0000y"}}"#.into(),
            read("rb0", 100, "utf8"),
        ],
        true,
    );
    s(
        "binary through base64",
        vec![
            write_b64("rb0", &(0..=255u8).collect::<Vec<_>>()),
            read("rb0", 7, "base64"),
            read("rb0", 100, "base64"),
            read("rb0", 1000, "base64"),
            read("rb0", 1000, "base64"),
        ],
        true,
    );
    s(
        "overwrite keeps the newest bytes",
        vec![
            write_b64("rb16", b"0123456789abcdefghij"),
            read("rb16", 100, "utf8"),
            write_b64("rb16", format!("{}é€", "a".repeat(15)).as_bytes()),
            read("rb16", 100, "utf8"),
            write_b64("rb16", b"0123456789abcdef"),
            read("rb16", 4, "base64"),
            write_b64("rb16", b"XYZW"),
            read("rb16", 100, "base64"),
        ],
        true,
    );
    s(
        "overwrite cuts a character",
        vec![
            write_b64("rb16", "€€€€€€".as_bytes()),
            read("rb16", 100, "utf8"),
        ],
        false,
    );
    s(
        "errors",
        vec![
            r#"{"execute": "ringbuf-write", "arguments": {"device": "nope", "data": "x"}}"#.into(),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "nope", "size": 1}}"#.into(),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "n0", "size": 1}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "n0", "data": "x"}}"#.into(),
            read("rb0", 0, "utf8"),
            read("rb0", -5, "utf8"),
            read("nope", 0, "utf8"),
            read("rb0", i64::MAX, "utf8"),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "rb0", "size": 1, "format": "hex"}}"#.into(),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "rb0", "size": "1"}}"#.into(),
            r#"{"execute": "ringbuf-read", "arguments": {"device": "rb0"}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": 1}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "x", "extra": 1}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "Y Q==", "format": "base64"}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "!!!!", "format": "base64"}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "YWJj\r\n", "format": "base64"}}"#.into(),
            r#"{"execute": "ringbuf-write", "arguments": {"device": "rb0", "data": "YWJ\u00e9", "format": "base64"}}"#.into(),
            read("rb0", 100, "utf8"),
        ],
        true,
    );
    s(
        "chardev-add and chardev-remove",
        vec![
            r#"{"execute": "chardev-add", "arguments": {"id": "x1", "backend": {"type": "null", "data": {}}}, "id": 7}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "x1", "backend": {"type": "null", "data": {}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "rb0", "backend": {"type": "ringbuf", "data": {}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "r3", "backend": {"type": "ringbuf", "data": {"size": 3}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "rn", "backend": {"type": "ringbuf", "data": {"size": -1}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "m2", "backend": {"type": "memory", "data": {"size": 1}}}}"#.into(),
            write_b64("m2", b"abc"),
            read("m2", 10, "utf8"),
            r#"{"execute": "chardev-add", "arguments": {"id": "v", "backend": {"type": "vc", "data": {}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "sp", "backend": {"type": "spicevmc", "data": {"type": "vdagent"}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "bad", "backend": {"type": "nosuch", "data": {}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "f", "backend": {"type": "file", "data": {"out": "/nonexistent/x"}}}}"#.into(),
            r#"{"execute": "chardev-add", "arguments": {"id": "n1", "backend": {"type": "null", "data": {"logfile": "/nonexistent/log"}}}}"#.into(),
            r#"{"execute": "chardev-remove", "arguments": {"id": "x1"}}"#.into(),
            r#"{"execute": "chardev-remove", "arguments": {"id": "x1"}}"#.into(),
            r#"{"execute": "chardev-remove", "arguments": {"id": "m2"}}"#.into(),
            r#"{"execute": "chardev-remove", "arguments": {}}"#.into(),
        ],
        true,
    );
    v
}

fn drain(ours: &mut Ours, qsd: &mut Qsd) {
    for dev in ["rb0", "rb16"] {
        ours.cmd(&read(dev, 1 << 20, "base64"));
        qsd.cmd(&read(dev, 1 << 20, "base64"));
    }
}

#[test]
fn replies_match_qemu_storage_daemon() {
    let Some(mut qsd) = Qsd::start() else {
        return;
    };
    let mut compared = 0;
    for mode in [Utf8ReadMode::Qemu72, Utf8ReadMode::WholeCharacters] {
        for sc in scenarios() {
            if mode == Utf8ReadMode::WholeCharacters && !sc.same_in_whole_mode {
                continue;
            }
            let mut ours = Ours::new(mode);
            drain(&mut ours, &mut qsd);
            for line in &sc.lines {
                let theirs = qsd.cmd(line);
                let mine = ours.cmd(line);
                assert_eq!(mine, theirs, "scenario '{}' ({mode:?}): {line}", sc.name);
                compared += 1;
            }
            // Leave qsd as it started.
            for id in ["x1", "m2"] {
                qsd.cmd(&format!(
                    r#"{{"execute": "chardev-remove", "arguments": {{"id": "{id}"}}}}"#
                ));
            }
        }
    }
    assert!(compared > 100, "only {compared} replies compared");
    eprintln!("{compared} replies identical to qemu-storage-daemon's");
}

/// Where this crate differs on purpose: reads never split a character (the
/// behaviour QEMU's schema documents and its source's FIXME asks for) and
/// base64 is validated strictly (the seed's "invalid base64 is currently
/// not rejected" bug). QEMU 7.2's side is asserted too when it is
/// installed, so the test shows the difference.
#[test]
fn deliberate_differences_from_qemu() {
    let mut qsd = Qsd::start();
    let mut ours = Ours::new(Utf8ReadMode::WholeCharacters);
    let mut check = |line: String, mine: &str, theirs: &str| {
        assert_eq!(ours.cmd(&line), mine, "ours: {line}");
        if let Some(q) = qsd.as_mut() {
            assert_eq!(q.cmd(&line), theirs, "qemu: {line}");
        }
    };
    let r = |s: &str| format!(r#"{{"return": "{s}"}}"#);
    check(
        write_b64("rb0", "é".as_bytes()),
        r#"{"return": {}}"#,
        r#"{"return": {}}"#,
    );
    check(read("rb0", 1, "utf8"), &r(""), &r("\\uFFFD"));
    check(read("rb0", 2, "utf8"), &r("\\u00E9"), &r("\\uFFFD"));
    check(
        write_b64("rb0", "é€😀".as_bytes()),
        r#"{"return": {}}"#,
        r#"{"return": {}}"#,
    );
    check(read("rb0", 3, "utf8"), &r("\\u00E9"), &r("\\u00E9\\uFFFD"));
    check(
        read("rb0", 4, "utf8"),
        &r("\\u20AC"),
        &r("\\uFFFD\\uFFFD\\uFFFD"),
    );
    check(
        read("rb0", 10, "utf8"),
        &r("\\uD83D\\uDE00"),
        &r("\\uFFFD\\uFFFD"),
    );
    check(
        write_b64("rb0", b"a\x00b"),
        r#"{"return": {}}"#,
        r#"{"return": {}}"#,
    );
    check(read("rb0", 3, "utf8"), &r("a\\u0000b"), &r("a"));
    check(
        write_b64("rb16", "€€€€€€".as_bytes()),
        r#"{"return": {}}"#,
        r#"{"return": {}}"#,
    );
    check(
        read("rb16", 100, "utf8"),
        &r("\\u20AC\\u20AC\\u20AC\\u20AC\\u20AC"),
        &r("\\uFFFD\\u20AC\\u20AC\\u20AC\\u20AC\\u20AC"),
    );
    // Invalid base64 QEMU 7.2 accepts (writing garbage or nothing).
    for (data, desc) in [
        ("YQ=", "Base64 data length is not a multiple of 4"),
        ("YQ==\\n", "Base64 data contains invalid characters"),
        ("YW\\nJj", "Base64 data contains invalid characters"),
        ("=YQ=", "Base64 data contains padding '=' before its end"),
        ("Y=Q=", "Base64 data contains padding '=' before its end"),
        (
            "YQ==YQ==",
            "Base64 data contains padding '=' before its end",
        ),
        ("Y===", "Base64 data contains padding '=' before its end"),
        ("====", "Base64 data contains padding '=' before its end"),
    ] {
        check(
            format!(
                r#"{{"execute": "ringbuf-write", "arguments": {{"device": "rb0", "data": "{data}", "format": "base64"}}}}"#
            ),
            &format!(r#"{{"error": {{"class": "GenericError", "desc": "{desc}"}}}}"#),
            r#"{"return": {}}"#,
        );
    }
    check(read("rb0", 100, "base64"), &r(""), &r("YWFiYwGEYARhYWAA"));
    // A ring of size 0 (QEMU accepts it, then crashes on the first write).
    check(
        r#"{"execute": "chardev-add", "arguments": {"id": "z", "backend": {"type": "ringbuf", "data": {"size": 0}}}}"#.into(),
        r#"{"error": {"class": "GenericError", "desc": "Failed to add chardev 'z': size of ringbuf chardev must be power of two"}}"#,
        r#"{"return": {}}"#,
    );
    assert_eq!(
        ours.cmd(r#"{"execute": "query-chardev-backends"}"#),
        r#"{"return": [{"name": "file"}, {"name": "socket"}, {"name": "pty"}, {"name": "null"}, {"name": "stdio"}, {"name": "ringbuf"}, {"name": "memory"}]}"#
    );
    assert_eq!(
        ours.cmd(r#"{"execute": "query-chardev"}"#),
        r#"{"return": [{"frontend-open": false, "filename": "ringbuf", "label": "rb0"}, {"frontend-open": false, "filename": "ringbuf", "label": "rb16"}, {"frontend-open": false, "filename": "null", "label": "n0"}]}"#
    );
}
