//! The QMP handlers through a `qapi_types::Dispatcher`, with the exact
//! reply lines, for the backends the qemu-storage-daemon comparison does not
//! cover (pty, sockets, frontends), and the `-chardev` to `chardev-add`
//! equivalence.

#![cfg(feature = "qmp")]

mod common;

use chardev_ringbuf::qmp::{config_from_qapi, config_to_qapi};
use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry};
use qapi_types::{ChardevBackend, Dispatcher, QapiType};
use qmp_proto::encode::{to_string, KeyOrder};
use qmp_proto::{Request, Response};
use serde_json::{json, Value};

struct Vmm {
    chardevs: ChardevRegistry,
}

fn dispatcher() -> Dispatcher<Vmm> {
    let mut d = Dispatcher::<Vmm>::new();
    d.register_char_commands(|v| &mut v.chardevs);
    d
}

fn cmd(d: &Dispatcher<Vmm>, vmm: &mut Vmm, command: &str, args: Value) -> String {
    let req = Request {
        id: None,
        command: command.into(),
        arguments: args.as_object().cloned().unwrap_or_default(),
        oob: false,
    };
    let result = d.dispatch(vmm, &req);
    to_string(&Response { id: None, result }.to_value(), KeyOrder::Qemu)
}

#[test]
fn every_chardev_command_is_registered() {
    let d = dispatcher();
    for c in [
        "query-chardev",
        "query-chardev-backends",
        "ringbuf-write",
        "ringbuf-read",
        "chardev-add",
        "chardev-remove",
    ] {
        assert!(d.is_registered(c), "{c}");
    }
}

#[test]
fn pty_and_socket_through_qmp() {
    let (_poll, chardevs) = common::registry();
    let mut vmm = Vmm { chardevs };
    let _notes = common::capture_notices(&mut vmm.chardevs);
    let d = dispatcher();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();

    let reply = cmd(
        &d,
        &mut vmm,
        "chardev-add",
        json!({"id": "p", "backend": {"type": "pty", "data": {}}}),
    );
    let v: Value = serde_json::from_str(&reply).unwrap();
    let pty = v["return"]["pty"].as_str().unwrap().to_owned();
    assert!(pty.starts_with("/dev/pts/"));
    assert_eq!(reply, format!(r#"{{"return": {{"pty": "{pty}"}}}}"#));

    // QMP's socket defaults: a server, not waiting.
    assert_eq!(
        cmd(
            &d,
            &mut vmm,
            "chardev-add",
            json!({"id": "s", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": sock}}}}})
        ),
        r#"{"return": {}}"#
    );
    assert_eq!(
        cmd(
            &d,
            &mut vmm,
            "chardev-add",
            json!({"id": "c", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": sock}}, "server": false, "wait": false}}})
        ),
        r#"{"error": {"class": "GenericError", "desc": "Failed to add chardev 'c': 'wait' option is incompatible with socket in client connect mode"}}"#
    );
    assert_eq!(
        cmd(
            &d,
            &mut vmm,
            "chardev-add",
            json!({"id": "t", "backend": {"type": "socket", "data": {
            "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "1"}}, "tls-creds": "x"}}})
        ),
        r#"{"error": {"class": "GenericError", "desc": "Failed to add chardev 't': No TLS credentials with id 'x'"}}"#
    );
    assert_eq!(
        cmd(
            &d,
            &mut vmm,
            "chardev-add",
            json!({"id": "v", "backend": {"type": "socket", "data": {
            "addr": {"type": "vsock", "data": {"cid": "2", "port": "1"}}, "server": false}}})
        ),
        r#"{"error": {"class": "GenericError", "desc": "Failed to add chardev 'v': vsock socket addresses are not supported"}}"#
    );
    assert_eq!(
        cmd(&d, &mut vmm, "query-chardev", json!({})),
        format!(
            r#"{{"return": [{{"frontend-open": false, "filename": "pty:{pty}", "label": "p"}}, {{"frontend-open": false, "filename": "disconnected:unix:{sock},server=on", "label": "s"}}]}}"#
        )
    );
    // A frontend makes it busy.
    let (fe, _) = common::TestFrontend::boxed(8);
    let _h = vmm.chardevs.attach("s", fe).unwrap();
    assert_eq!(
        cmd(&d, &mut vmm, "chardev-remove", json!({"id": "s"})),
        r#"{"error": {"class": "GenericError", "desc": "Chardev 's' is busy"}}"#
    );
    assert!(cmd(&d, &mut vmm, "query-chardev", json!({}))
        .contains(r#"{"frontend-open": true, "filename": "disconnected:unix:"#));
    vmm.chardevs.detach("s");
    assert_eq!(
        cmd(&d, &mut vmm, "chardev-remove", json!({"id": "s"})),
        r#"{"return": {}}"#
    );
    assert_eq!(
        cmd(&d, &mut vmm, "chardev-remove", json!({"id": "p"})),
        r#"{"return": {}}"#
    );
    assert_eq!(
        cmd(&d, &mut vmm, "query-chardev", json!({})),
        r#"{"return": []}"#
    );
}

/// A `-chardev` argument and the `chardev-add` backend it corresponds to
/// describe the same chardev (the configuration survives the QAPI form).
#[test]
fn command_line_and_chardev_add_are_equivalent() {
    for arg in [
        "ringbuf,id=a,size=4096",
        "memory,id=a",
        "null,id=a,logfile=/tmp/l,logappend=on",
        "file,id=a,path=/tmp/out,append=on",
        "pty,id=a",
        "stdio,id=a,signal=off",
        "socket,id=a,path=/tmp/s,server=on,wait=off",
        "socket,id=a,path=/tmp/s,abstract=on",
        "socket,id=a,host=127.0.0.1,port=4444,to=4450,server=on,telnet=on,nodelay=on,ipv4=on",
        "socket,id=a,host=localhost,port=4444,reconnect=3",
        "socket,id=a,fd=monfd,server=on,wait=off",
    ] {
        let p = parse_chardev_opts(arg).unwrap();
        let wire = config_to_qapi(&p.config).to_qmp();
        let back = ChardevBackend::from_qmp_strict(wire.clone()).unwrap();
        assert_eq!(config_from_qapi(&back).unwrap(), p.config, "{arg}: {wire}");
    }
    let p = parse_chardev_opts("socket,id=s0,path=/tmp/s,server=on,wait=off").unwrap();
    assert_eq!(
        config_to_qapi(&p.config).to_qmp(),
        json!({"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": "/tmp/s", "abstract": false, "tight": true}},
            "server": true, "wait": false}})
    );
    let p = parse_chardev_opts("ringbuf,id=rb0,size=4096").unwrap();
    assert_eq!(
        config_to_qapi(&p.config).to_qmp(),
        json!({"type": "ringbuf", "data": {"size": 4096}})
    );
    // Backends this crate does not implement, in QEMU's words.
    let mux =
        ChardevBackend::from_qmp_strict(json!({"type": "mux", "data": {"chardev": "x"}})).unwrap();
    assert_eq!(
        config_from_qapi(&mux).unwrap_err(),
        "'mux' is not a valid char driver name"
    );
}
