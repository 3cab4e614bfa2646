//! The mio server on real Unix and TCP sockets, driven by the client and by
//! raw sockets.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Raw, TestServer};
use qmp_proto::client::{Client, ClientError, ConnectOptions};
use qmp_proto::server::{QmpServer, ServerConfig};
use qmp_proto::session::SessionConfig;
use qmp_proto::{ErrorClass, EventMessage};
use serde_json::json;

fn no_negotiation() -> ConnectOptions {
    ConnectOptions {
        negotiate: false,
        ..Default::default()
    }
}

#[test]
fn client_over_unix_and_tcp() {
    let srv = TestServer::start();
    let mut c = Client::connect_unix(&srv.path).unwrap();
    assert_eq!(c.server_version(), Some(&common::version()));
    assert_eq!(c.server_capabilities(), ["oob"]);
    assert_eq!(
        c.execute_raw("echo", json!({"a": [1, "é"]})).unwrap(),
        json!({"a": [1, "é"]})
    );
    let e = c.execute_raw("nope", json!({})).unwrap_err();
    match e {
        ClientError::Qmp(e) => {
            assert_eq!(e.class, ErrorClass::CommandNotFound);
            assert_eq!(e.desc, "The command nope has not been found");
        }
        other => panic!("{other:?}"),
    }

    let mut t = Client::connect_tcp(srv.tcp).unwrap();
    assert_eq!(
        t.execute_raw("echo", json!({"x": 1})).unwrap(),
        json!({"x": 1})
    );
    // Descriptors cannot travel over TCP.
    let (p, _q) = UnixStream::pair().unwrap();
    assert!(matches!(
        t.execute_with_fds("getfd", json!({}), &[p.as_fd()]),
        Err(ClientError::Protocol(_))
    ));
}

#[test]
fn envelope_and_negotiation_errors_over_the_wire() {
    let srv = TestServer::start();
    let mut r = Raw::connect(&srv);
    // Byte-for-byte what QEMU 7.2 answers.
    r.send(b"{\"execute\": \"echo\", \"id\": 1}\n");
    assert_eq!(
        r.line(),
        r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    r.send(b"[]\n{\"execute\": 1}\n{\"exec-oob\": \"x\"}\n@");
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
    );
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#
    );
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
    );
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#
    );
    r.send(b"{'execute': 'qmp_capabilities', 'id': 'it\\'s'}");
    assert_eq!(r.line(), r#"{"return": {}, "id": "it's"}"#);
    r.send(b"{\"execute\": \"qmp_capabilities\"}");
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
    );
    r.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": 0.1}, \"id\": {\"z\": 1, \"a\": 2}}");
    assert_eq!(
        r.line(),
        r#"{"return": {"v": 0.10000000000000001}, "id": {"a": 2, "z": 1}}"#
    );
}

#[test]
fn clients_negotiate_independently_and_events_reach_negotiated_only() {
    let srv = TestServer::start();
    let mut a = Client::connect_unix(&srv.path).unwrap();
    let mut b = Raw::connect(&srv);
    // b is still negotiating: its commands are refused while a's work.
    b.send(b"{\"execute\": \"echo\"}");
    assert!(b.line().contains("Expecting capabilities negotiation"));
    assert_eq!(a.execute_raw("echo", json!({})).unwrap(), json!({}));

    // An event from the server's owner reaches a only.
    srv.broadcast(EventMessage::new("OWNER_EVENT", Some(json!({"n": 1}))));
    let ev = a
        .wait_event("OWNER_EVENT", Duration::from_secs(10))
        .unwrap();
    assert_eq!(ev.data, Some(json!({"n": 1})));
    b.quiet(200);

    // An event raised by a command reaches the caller before its reply,
    // and the other negotiated clients.
    let mut c = Raw::negotiated(&srv);
    a.execute_raw("emit", json!({"name": "CMD_EVENT", "data": {"k": "v"}}))
        .unwrap();
    let evs = a.events();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].event, "CMD_EVENT");
    let line = c.line();
    assert!(line.starts_with("{\"timestamp\": {\"seconds\": "), "{line}");
    assert!(
        line.ends_with("\"event\": \"CMD_EVENT\", \"data\": {\"k\": \"v\"}}"),
        "{line}"
    );
    b.quiet(100);

    // Once b negotiates it gets later events.
    b.send(b"{\"execute\": \"qmp_capabilities\"}");
    assert_eq!(b.line(), "{\"return\": {}}");
    srv.broadcast(EventMessage::new("LATER", None));
    assert!(b.line().contains("\"event\": \"LATER\"}"));
}

#[test]
fn disconnect_mid_message_affects_only_that_client() {
    let srv = TestServer::start();
    let mut good = Client::connect_unix(&srv.path).unwrap();
    {
        let mut r = Raw::negotiated(&srv);
        r.send(b"{\"execute\": \"echo\", \"argu");
    }
    srv.wait_disconnects(1);
    assert_eq!(
        good.execute_raw("echo", json!({"still": "fine"})).unwrap(),
        json!({"still": "fine"})
    );
    // A client that sends commands then half-closes still gets its replies.
    let mut s = UnixStream::connect(&srv.path).unwrap();
    s.write_all(
        b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"echo\", \"arguments\": {\"q\": 1}}",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let lines: Vec<&str> = all.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{all}");
    assert_eq!(lines[2], "{\"return\": {\"q\": 1}}");
}

#[test]
fn client_that_never_reads_is_disconnected_while_others_work() {
    let mut cfg = SessionConfig::new(common::version());
    cfg.output_high_water = 64 * 1024;
    cfg.output_hard_limit = 2 << 20;
    let srv = TestServer::start_with(cfg);
    let mut lazy = Raw::negotiated(&srv);
    let mut good = Client::connect_unix(&srv.path).unwrap();
    // The lazy client asks for lots of output and reads none of it.
    let big = "x".repeat(50_000);
    let req = format!("{{\"execute\": \"echo\", \"arguments\": {{\"s\": \"{big}\"}}}}");
    lazy.s.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    for _ in 0..200 {
        match lazy.s.write(req.as_bytes()) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent > 0);
    // The good client keeps working meanwhile.
    for i in 0..20 {
        assert_eq!(
            good.execute_raw("echo", json!({"i": i})).unwrap(),
            json!({"i": i})
        );
    }
    // Events pile up for the lazy client until it is cut off, while the
    // good client reads every one of them. They are sent in batches well
    // under the hard limit, each once the good client has read the last.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    let reader = std::thread::spawn(move || {
        for n in 0..400 {
            if let Err(e) = good.wait_event("PILE", Duration::from_secs(20)) {
                panic!("after {n} events: {e}");
            }
            counter.store(n + 1, std::sync::atomic::Ordering::SeqCst);
        }
        good
    });
    let pad = "e".repeat(10_000);
    for batch in 1..=4 {
        for _ in 0..100 {
            srv.broadcast(EventMessage::new("PILE", Some(json!({"pad": pad}))));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while received.load(std::sync::atomic::Ordering::SeqCst) < batch * 100 {
            assert!(std::time::Instant::now() < deadline, "good client starved");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    srv.wait_disconnects(1);
    let mut good = reader.join().unwrap();
    {
        let log = srv.log.lock().unwrap();
        assert_eq!(
            log.disconnected,
            [log.connected[0]],
            "only the lazy client goes"
        );
    }
    assert_eq!(good.execute_raw("echo", json!({})).unwrap(), json!({}));
}

#[test]
fn file_descriptors_travel_with_their_command() {
    let srv = TestServer::start();
    let mut c = Client::connect_unix(&srv.path).unwrap();
    let (mut mine, theirs) = UnixStream::pair().unwrap();
    c.execute_with_fds("getfd", json!({"fdname": "x"}), &[theirs.as_fd()])
        .unwrap();
    drop(theirs);
    let mut got = String::new();
    mine.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mine.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from the server");

    // No descriptor: QEMU's error.
    let e = c.execute_raw("getfd", json!({"fdname": "y"})).unwrap_err();
    assert!(e.to_string().contains("No file descriptor supplied"), "{e}");

    // Descriptors a command does not take are closed by the server.
    let (mut mine, theirs) = UnixStream::pair().unwrap();
    let r = c
        .execute_with_fds("whoami", json!({}), &[theirs.as_fd(), theirs.as_fd()])
        .unwrap();
    assert_eq!(r["fds"], 2);
    drop(theirs);
    let mut rest = Vec::new();
    mine.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(mine.read_to_end(&mut rest).unwrap(), 0);

    // A descriptor sent ahead with a lone space (as qemu.qmp does) goes
    // with the next command.
    let (mut mine, theirs) = UnixStream::pair().unwrap();
    let raw = UnixStream::connect(&srv.path).unwrap();
    let mut r = Client::from_stream(
        qmp_proto::client::ClientStream::Unix(raw.try_clone().unwrap()),
        &ConnectOptions::default(),
    )
    .unwrap();
    let n = send_fd_with_space(&raw, &theirs);
    assert_eq!(n, 1);
    drop(theirs);
    r.execute_raw("getfd", json!({"fdname": "z"})).unwrap();
    let mut got = String::new();
    mine.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mine.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from the server");
}

/// Sends one space with `fd` attached, like qemu.qmp's `send_fd_scm`.
fn send_fd_with_space(sock: &UnixStream, fd: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    #[repr(C, align(8))]
    struct Buf([u8; 64]);
    let mut cbuf = Buf([0; 64]);
    let data = [b' '];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: test-only sendmsg with a valid header, one iovec and one
    // SCM_RIGHTS control message inside `cbuf`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd.as_raw_fd());
        libc::sendmsg(sock.as_raw_fd(), &msg, 0) as usize
    }
}

#[test]
fn hundred_thousand_nested_brackets() {
    let srv = TestServer::start();
    let mut r = Raw::negotiated(&srv);
    let mut input = vec![b'['; 100_000];
    input.extend(std::iter::repeat_n(b']', 100_000));
    input.extend_from_slice(b"\n{\"execute\": \"echo\", \"arguments\": {\"after\": true}}");
    r.send(&input);
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}"#
    );
    assert_eq!(r.line(), r#"{"return": {"after": true}}"#);
}

#[test]
fn hundred_megabyte_string_gets_an_error_and_the_connection_survives() {
    let srv = TestServer::start();
    let mut r = Raw::negotiated(&srv);
    let writer = r.s.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut w = writer;
        w.write_all(b"{\"execute\": \"echo\", \"arguments\": {\"s\": \"")
            .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\"}}\n{\"execute\": \"echo\", \"arguments\": {\"next\": 1}}")
            .unwrap();
    });
    assert_eq!(
        r.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}"#
    );
    assert_eq!(r.line(), r#"{"return": {"next": 1}}"#);
    t.join().unwrap();
}

#[test]
fn quit_stops_the_server_after_the_reply_and_removes_the_socket() {
    let srv = TestServer::start();
    let path = srv.path.clone();
    let mut c = Client::connect_unix(&path).unwrap();
    assert_eq!(c.execute_raw("quit", json!({})).unwrap(), json!({}));
    srv.join();
    assert!(!path.exists());
}

#[test]
fn stale_sockets_are_replaced_live_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    // A stale socket file: bound, then the listener is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut s1 = QmpServer::new(ServerConfig::new(SessionConfig::new(json!({}))));
    s1.add_unix_listener(&path).unwrap();
    // Now it is live (the kernel accepts into the backlog).
    let mut s2 = QmpServer::new(ServerConfig::new(SessionConfig::new(json!({}))));
    let e = s2.add_unix_listener(&path).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    // A regular file is never removed.
    let file = dir.path().join("f");
    std::fs::write(&file, b"data").unwrap();
    assert!(s2.add_unix_listener(&file).is_err());
    assert!(file.exists());
    drop(s1);
    assert!(!path.exists());
}

#[test]
fn the_socket_file_appears_only_once_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sock");
    let mut s = QmpServer::new(ServerConfig::new(SessionConfig::new(json!({}))));
    s.add_unix_listener(&path).unwrap();
    // Bound under a temporary name and renamed into place: only the socket
    // is left, and it accepts connections.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("q.sock")]);
    std::os::unix::net::UnixStream::connect(&path).unwrap();
    // A path too long for a temporary name is bound directly.
    let long = dir
        .path()
        .join("l".repeat(100 - dir.path().as_os_str().len().min(99)));
    let mut s2 = QmpServer::new(ServerConfig::new(SessionConfig::new(json!({}))));
    if long.as_os_str().len() < 108 {
        s2.add_unix_listener(&long).unwrap();
        std::os::unix::net::UnixStream::connect(&long).unwrap();
    }
    drop(s);
    drop(s2);
    assert!(!path.exists());
    assert!(!long.exists());
}

#[test]
fn client_without_negotiation_sees_raw_errors() {
    let srv = TestServer::start();
    let mut c = Client::connect_unix_with(&srv.path, &no_negotiation()).unwrap();
    assert!(!c.is_negotiated());
    let e = c.execute_raw("echo", json!({})).unwrap_err();
    assert!(
        matches!(&e, ClientError::Qmp(q) if q.class == ErrorClass::CommandNotFound),
        "{e}"
    );
    c.negotiate(true).unwrap();
    // oob enabled: exec-oob reaches the handler.
    assert_eq!(
        c.execute_oob_raw("echo", json!({"o": 1})).unwrap(),
        json!({"o": 1})
    );
    c.send_raw(b"{\"execute\": ").unwrap();
    c.send_raw(b"\"echo\", \"id\": \"raw\"}").unwrap();
    let v = c.recv_raw().unwrap();
    assert_eq!(v, json!({"return": {}, "id": "raw"}));
}

#[test]
fn caller_owned_poll_with_a_token_range() {
    use mio::{Events, Interest, Poll, Token};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("own.sock");
    let mut cfg = ServerConfig::new(SessionConfig::new(common::version()));
    cfg.first_token = 100;
    cfg.max_tokens = 3; // the server itself, one listener, one client
    let mut server = QmpServer::new(cfg);
    server.add_unix_listener(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut poll = Poll::new().unwrap();
        // Something else of the VMM's on the same Poll.
        let (mut mine, _peer) = mio::net::UnixStream::pair().unwrap();
        poll.registry()
            .register(&mut mine, Token(5), Interest::READABLE)
            .unwrap();
        server.register(poll.registry()).unwrap();
        assert!(!server.owns(Token(5)));
        assert!(server.owns(Token(100)) && server.owns(Token(102)));
        assert!(!server.owns(Token(103)));
        let log = Arc::new(std::sync::Mutex::new(common::Log::default()));
        let mut handler = common::TestHandler { log };
        let mut events = Events::with_capacity(64);
        while !stop2.load(Ordering::SeqCst) {
            poll.poll(&mut events, Some(Duration::from_millis(20)))
                .unwrap();
            for ev in events.iter() {
                if server.owns(ev.token()) {
                    server.handle_event(poll.registry(), ev, &mut handler);
                }
            }
        }
        server.client_count()
    });
    let mut c = Client::connect_unix(&path).unwrap();
    assert_eq!(
        c.execute_raw("echo", json!({"t": 1})).unwrap(),
        json!({"t": 1})
    );
    // No token left for a second client: it is closed at once.
    let mut second = UnixStream::connect(&path).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(second.read_to_end(&mut buf).unwrap(), 0);
    assert_eq!(
        c.execute_raw("echo", json!({"t": 2})).unwrap(),
        json!({"t": 2})
    );
    stop.store(true, Ordering::SeqCst);
    assert_eq!(t.join().unwrap(), 1);
}
