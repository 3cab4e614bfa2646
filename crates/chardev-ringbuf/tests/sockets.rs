//! Socket chardevs for real: Unix and TCP servers and clients driven through
//! a mio poll, with connecting, disconnecting, one client at a time,
//! reconnection, back-pressure in both directions and telnet.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use chardev_ringbuf::{
    parse_chardev_opts, BackendConfig, ChardevConfig, ChardevEventKind as Ev, SocketAddrConfig,
    SocketConfig,
};
use common::*;

const T: Duration = Duration::from_secs(5);

fn unix_server(path: &str) -> ChardevConfig {
    let mut s = SocketConfig::new(SocketAddrConfig::Unix {
        path: path.into(),
        r#abstract: None,
        tight: None,
    });
    s.wait = Some(false);
    ChardevConfig::new(BackendConfig::Socket(s))
}

#[test]
fn unix_server_connect_exchange_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let p = path.to_str().unwrap();
    let (mut poll, mut reg) = registry();
    reg.add("s0", &unix_server(p)).unwrap();
    assert_eq!(
        filename(&reg, "s0"),
        format!("disconnected:unix:{p},server=on")
    );
    let (fe, seen) = TestFrontend::boxed(1024);
    let h = reg.attach("s0", fe).unwrap();
    assert_eq!(reg.is_open("s0"), Some(false));

    let mut client = UnixStream::connect(&path).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("s0") == Some(true)));
    assert_eq!(filename(&reg, "s0"), format!("unix:{p},server=on"));
    assert_eq!(drain(&mut reg), vec![("s0".to_string(), Ev::Opened)]);

    client.write_all(b"hello").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"hello"));
    assert_eq!(h.write(b"world").unwrap(), 5);
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");

    drop(client);
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("s0") == Some(false)));
    assert_eq!(drain(&mut reg), vec![("s0".to_string(), Ev::Closed)]);
    assert_eq!(seen.lock().unwrap().events, vec![Ev::Opened, Ev::Closed]);
    assert_eq!(
        filename(&reg, "s0"),
        format!("disconnected:unix:{p},server=on")
    );
    // Output with nobody connected is dropped, not refused.
    assert_eq!(h.write(b"lost").unwrap(), 4);

    // Busy while attached; removing unlinks the socket file.
    assert_eq!(
        reg.remove("s0").unwrap_err().to_string(),
        "Chardev 's0' is busy"
    );
    reg.detach("s0").unwrap();
    reg.remove("s0").unwrap();
    assert!(!path.exists());
}

#[test]
fn one_client_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let (mut poll, mut reg) = registry();
    reg.add("s0", &unix_server(path.to_str().unwrap())).unwrap();
    let (fe, seen) = TestFrontend::boxed(1024);
    let _h = reg.attach("s0", fe).unwrap();

    let mut a = UnixStream::connect(&path).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("s0") == Some(true)));
    // B's connect completes in the kernel's backlog, but B is not served.
    let mut b = UnixStream::connect(&path).unwrap();
    b.write_all(b"from-b").unwrap();
    a.write_all(b"from-a").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"from-a"));
    run_for(&mut poll, &mut reg, Duration::from_millis(200));
    assert_eq!(seen.lock().unwrap().total, b"from-a");

    // When A leaves, B is accepted and its waiting data arrives.
    drop(a);
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"from-afrom-b"));
    assert_eq!(
        drain(&mut reg).into_iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![Ev::Opened, Ev::Closed, Ev::Opened]
    );
    drop(b);
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("s0") == Some(false)));
}

#[test]
fn input_back_pressure_never_overruns_the_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let (mut poll, mut reg) = registry();
    reg.add("s0", &unix_server(path.to_str().unwrap())).unwrap();
    let (fe, seen) = TestFrontend::boxed(16);
    let h = reg.attach("s0", fe).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    let sent: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    client.write_all(&sent).unwrap();

    // The frontend fills up and the backend stops reading.
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .data
        .len()
        == 16));
    run_for(&mut poll, &mut reg, Duration::from_millis(100));
    assert_eq!(seen.lock().unwrap().total.len(), 16);

    // The device drains its FIFO from another thread and says so.
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let chunk = std::mem::take(&mut seen.lock().unwrap().data);
        got.extend(chunk);
        let h2 = h.clone();
        std::thread::spawn(move || h2.accept_input())
            .join()
            .unwrap();
        let want = got.len();
        assert!(run_until(&mut poll, &mut reg, T, |_| {
            let s = seen.lock().unwrap();
            !s.data.is_empty() || want == sent.len()
        }));
    }
    assert_eq!(got, sent);
    assert!(seen.lock().unwrap().max_chunk <= 16);
}

#[test]
fn a_client_that_never_reads_blocks_output_not_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let (mut poll, mut reg) = registry();
    reg.add("s0", &unix_server(path.to_str().unwrap())).unwrap();
    let (fe, seen) = TestFrontend::boxed(64);
    let h = reg.attach("s0", fe).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("s0") == Some(true)));

    // Write until refused: the kernel buffers and the bounded queue fill up.
    let chunk: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let mut accepted: Vec<u8> = Vec::new();
    loop {
        match h.write(&chunk) {
            Ok(n) => accepted.extend_from_slice(&chunk[..n]),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::WouldBlock);
                break;
            }
        }
        assert!(accepted.len() < 64 << 20, "output never pushed back");
    }
    // The loop stays responsive meanwhile.
    client.write_all(b"ping").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"ping"));

    // Now the client reads: everything accepted arrives, in order, and the
    // frontend is told it may write again.
    client.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    assert!(run_until(
        &mut poll,
        &mut reg,
        Duration::from_secs(10),
        |_| {
            loop {
                match client.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            got.len() >= accepted.len()
        }
    ));
    assert_eq!(got, accepted);
    assert!(seen.lock().unwrap().output_ready >= 1);
    assert!(h.write(b"more").unwrap() > 0);
}

#[test]
fn client_reconnects_after_failure_and_after_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("srv.sock");
    let p = path.to_str().unwrap();
    let (mut poll, mut reg) = registry();
    let notes = capture_notices(&mut reg);
    let arg = format!("socket,id=c0,path={p},reconnect=1");
    let parsed = parse_chardev_opts(&arg).unwrap();
    // Nobody listens yet: created anyway, the failure reported once.
    reg.add(&parsed.id, &parsed.config).unwrap();
    assert_eq!(filename(&reg, "c0"), format!("disconnected:unix:{p}"));
    assert_eq!(
        notes.lock().unwrap().as_slice(),
        [format!(
            "Unable to connect character device c0: Failed to connect to '{p}': No such file or directory"
        )]
    );
    let (fe, seen) = TestFrontend::boxed(1024);
    let _h = reg.attach("c0", fe).unwrap();

    let listener = UnixListener::bind(&path).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("c0") == Some(true)));
    assert_eq!(filename(&reg, "c0"), "unix:");
    let (mut conn, _) = listener.accept().unwrap();
    conn.write_all(b"one").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"one"));

    // The server drops the connection: closed, then reconnected a second later.
    drop(conn);
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("c0") == Some(false)));
    assert!(reg.next_timeout().is_some());
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("c0") == Some(true)));
    let (mut conn, _) = listener.accept().unwrap();
    conn.write_all(b"two").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"onetwo"));
    assert_eq!(
        seen.lock().unwrap().events,
        vec![Ev::Opened, Ev::Closed, Ev::Opened]
    );
    // Reported once only.
    assert_eq!(notes.lock().unwrap().len(), 1);
}

#[test]
fn tcp_client_reconnect_uses_non_blocking_connect() {
    // Find a free port, then close it so the first attempt is refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut poll, mut reg) = registry();
    let notes = capture_notices(&mut reg);
    let parsed = parse_chardev_opts(&format!(
        "socket,id=c1,host=127.0.0.1,port={port},reconnect=1"
    ))
    .unwrap();
    reg.add(&parsed.id, &parsed.config).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| !notes
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(
        notes.lock().unwrap()[0],
        format!(
            "Unable to connect character device c1: Failed to connect to '127.0.0.1:{port}': Connection refused"
        )
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("c1") == Some(true)));
    let (_conn, peer) = listener.accept().unwrap();
    assert_eq!(
        filename(&reg, "c1"),
        format!("tcp:127.0.0.1:{} <-> 127.0.0.1:{port}", peer.port())
    );
}

#[test]
fn client_without_reconnect_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.sock");
    let p = p.to_str().unwrap();
    let (_poll, mut reg) = registry();
    let parsed = parse_chardev_opts(&format!("socket,id=c,path={p}")).unwrap();
    let e = reg.add(&parsed.id, &parsed.config).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Failed to add chardev 'c': Failed to connect to '{p}': No such file or directory")
    );
    assert!(!reg.contains("c"));
    // QEMU's option checks.
    let e = reg
        .add(
            "c",
            &parse_chardev_opts(&format!("socket,id=c,path={p},wait=off"))
                .unwrap()
                .config,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to add chardev 'c': 'wait' option is incompatible with socket in client connect mode"
    );
    let e = reg
        .add(
            "c",
            &parse_chardev_opts(&format!(
                "socket,id=c,path={p},server=on,wait=off,reconnect=1"
            ))
            .unwrap()
            .config,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to add chardev 'c': 'reconnect' option is incompatible with socket in server listen mode"
    );
    let e = reg
        .add("c", &parse_chardev_opts("socket,id=c").unwrap().config)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to add chardev 'c': Unable to parse FD number "
    );
    let e = reg
        .add(
            "c",
            &parse_chardev_opts("socket,id=c,fd=foo,server=on,wait=off")
                .unwrap()
                .config,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to add chardev 'c': File descriptor named 'foo' has not been found"
    );
}

#[test]
fn tcp_server_filenames_and_nodelay() {
    let (mut poll, mut reg) = registry();
    let parsed =
        parse_chardev_opts("socket,id=t0,host=127.0.0.1,port=0,server=on,wait=off,nodelay=on")
            .unwrap();
    reg.add(&parsed.id, &parsed.config).unwrap();
    let f = filename(&reg, "t0");
    let port: u16 = f
        .strip_prefix("disconnected:tcp:127.0.0.1:")
        .and_then(|r| r.strip_suffix(",server=on"))
        .unwrap()
        .parse()
        .unwrap();
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cport = c.local_addr().unwrap().port();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("t0") == Some(true)));
    assert_eq!(
        filename(&reg, "t0"),
        format!("tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{cport}")
    );
    // Port in use.
    let busy = format!("socket,id=t1,host=127.0.0.1,port={port},server=on,wait=off");
    let e = reg
        .add("t1", &parse_chardev_opts(&busy).unwrap().config)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to add chardev 't1': Failed to find an available port: Address already in use"
    );
}

#[test]
fn telnet_server_negotiates_and_filters() {
    let (mut poll, mut reg) = registry();
    let parsed =
        parse_chardev_opts("socket,id=tn,host=127.0.0.1,port=0,server=on,wait=off,telnet=on")
            .unwrap();
    reg.add(&parsed.id, &parsed.config).unwrap();
    let f = filename(&reg, "tn");
    assert!(f.starts_with("disconnected:telnet:127.0.0.1:"), "{f}");
    let port: u16 = f
        .trim_start_matches("disconnected:telnet:127.0.0.1:")
        .trim_end_matches(",server=on")
        .parse()
        .unwrap();
    let (fe, seen) = TestFrontend::boxed(1024);
    let h = reg.attach("tn", fe).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("tn") == Some(true)));
    h.write(b"out").unwrap();
    let mut buf = [0u8; 15];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00out");
    c.write_all(b"a\xff\xfd\x01b\xff\xffc\xff\xf3d").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"ab\xffcd"));
    assert_eq!(seen.lock().unwrap().events, vec![Ev::Opened, Ev::Break]);
}

#[test]
fn server_wait_blocks_until_a_client_connects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.sock");
    let p = path.to_str().unwrap().to_owned();
    let (mut poll, mut reg) = registry();
    let notes = capture_notices(&mut reg);
    let parsed = parse_chardev_opts(&format!("socket,id=w,path={p},server=on")).unwrap();
    let p2 = path.clone();
    let t = std::thread::spawn(move || {
        for _ in 0..500 {
            if let Ok(mut c) = UnixStream::connect(&p2) {
                c.write_all(b"early").unwrap();
                return c;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("never connected");
    });
    reg.add(&parsed.id, &parsed.config).unwrap();
    let _client = t.join().unwrap();
    assert_eq!(reg.is_open("w"), Some(true));
    assert_eq!(
        notes.lock().unwrap().as_slice(),
        [format!(
            "waiting for connection on: disconnected:unix:{p},server=on"
        )]
    );
    assert_eq!(drain(&mut reg), vec![("w".to_string(), Ev::Opened)]);
    // Data sent before a frontend attached is read once it attaches.
    let (fe, seen) = TestFrontend::boxed(64);
    let _h = reg.attach("w", fe).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"early"));
    assert_eq!(seen.lock().unwrap().events, vec![Ev::Opened]);
}

#[test]
fn registry_drop_closes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    {
        let (_poll, mut reg) = registry();
        reg.add("d", &unix_server(path.to_str().unwrap())).unwrap();
        assert!(path.exists());
    }
    assert!(!path.exists());
    // A stale socket file is replaced, as QEMU does.
    let stale = UnixListener::bind(&path).unwrap();
    drop(stale);
    let (_poll, mut reg) = registry();
    reg.add("d", &unix_server(path.to_str().unwrap())).unwrap();
    UnixStream::connect(&path).unwrap();
}

#[test]
fn fd_addresses_by_number_and_by_name() {
    use std::os::fd::{AsRawFd, OwnedFd};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (mut poll, mut reg) = registry();
    // A listening socket passed by number (the process keeps its own fd).
    let arg = format!(
        "socket,id=byno,fd={},server=on,wait=off",
        listener.as_raw_fd()
    );
    reg.add("byno", &parse_chardev_opts(&arg).unwrap().config)
        .unwrap();
    assert_eq!(
        filename(&reg, "byno"),
        format!("disconnected:fd:{},server=on", listener.as_raw_fd())
    );
    let _c = UnixStream::connect(&path).unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("byno") == Some(true)));

    // A connected socket passed by name through the VMM's resolver.
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut slot = Some(OwnedFd::from(ours));
    reg.set_fd_resolver(Box::new(move |name| {
        if name == "monfd" {
            slot.take().ok_or_else(|| "already used".to_string())
        } else {
            Err(format!("File descriptor named '{name}' has not been found"))
        }
    }));
    let arg = "socket,id=byname,fd=monfd";
    reg.add("byname", &parse_chardev_opts(arg).unwrap().config)
        .unwrap();
    assert_eq!(reg.is_open("byname"), Some(true));
    let (fe, seen) = TestFrontend::boxed(64);
    let h = reg.attach("byname", fe).unwrap();
    theirs.write_all(b"in").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"in"));
    h.write(b"out").unwrap();
    let mut buf = [0u8; 3];
    theirs.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"out");
    // Not a socket.
    let file = std::fs::File::open("/dev/null").unwrap();
    let arg = format!("socket,id=nf,fd={},server=on,wait=off", file.as_raw_fd());
    assert_eq!(
        reg.add("nf", &parse_chardev_opts(&arg).unwrap().config)
            .unwrap_err()
            .to_string(),
        format!(
            "Failed to add chardev 'nf': File descriptor '{}' is not a socket",
            file.as_raw_fd()
        )
    );
}
