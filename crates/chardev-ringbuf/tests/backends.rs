//! The pty, file, null, ringbuf and stdio backends, and the registry's
//! rules (ids, frontends, log files), on a real poll.

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use chardev_ringbuf::{
    parse_chardev_opts, BackendConfig, ChardevConfig, ChardevEventKind as Ev, ChardevRegistry,
    DataFormat, RingbufName,
};
use common::*;

const T: Duration = Duration::from_secs(5);

fn add(reg: &mut ChardevRegistry, arg: &str) -> Result<Option<String>, String> {
    let p = parse_chardev_opts(arg).map_err(|e| e.to_string())?;
    reg.add(&p.id, &p.config)
        .map(|o| o.pty)
        .map_err(|e| e.to_string())
}

#[test]
fn pty_prints_its_path_and_follows_the_slave() {
    let (mut poll, mut reg) = registry();
    let notes = capture_notices(&mut reg);
    let path = add(&mut reg, "pty,id=p").unwrap().expect("a pty path");
    assert!(path.starts_with("/dev/pts/"), "{path}");
    assert_eq!(
        notes.lock().unwrap().as_slice(),
        [format!("char device redirected to {path} (label p)")]
    );
    assert_eq!(filename(&reg, "p"), format!("pty:{path}"));
    assert_eq!(reg.is_open("p"), Some(false));
    let (fe, seen) = TestFrontend::boxed(256);
    let h = reg.attach("p", fe).unwrap();
    // Output while nobody has the slave open is dropped.
    assert_eq!(h.write(b"nobody").unwrap(), 6);

    let mut slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap();
    // Noticed by the one-second poll (or by input).
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("p") == Some(true)));
    slave.write_all(b"typed").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"typed"));
    h.write(b"shown").unwrap();
    let mut buf = [0u8; 5];
    slave.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"shown");
    drop(slave);
    assert!(run_until(&mut poll, &mut reg, T, |r| r.is_open("p") == Some(false)));
    assert_eq!(
        drain(&mut reg).into_iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![Ev::Opened, Ev::Closed]
    );
}

#[test]
fn file_output_append_and_input_with_back_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let input = dir.path().join("in");
    std::fs::write(&out, b"old-").unwrap();
    let content: Vec<u8> = (0..3000u32).map(|i| (i % 200) as u8).collect();
    std::fs::write(&input, &content).unwrap();
    let (mut poll, mut reg) = registry();
    let cfg = ChardevConfig::new(BackendConfig::File {
        out: out.to_str().unwrap().into(),
        input: Some(input.to_str().unwrap().into()),
        append: Some(true),
    });
    reg.add("f", &cfg).unwrap();
    assert_eq!(filename(&reg, "f"), "file");
    let (fe, seen) = TestFrontend::boxed(100);
    let h = reg.attach("f", fe).unwrap();
    h.write(b"new").unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"old-new");
    // A regular file is always readable: it is read as the frontend drains.
    let mut got = Vec::new();
    while got.len() < content.len() {
        let chunk = std::mem::take(&mut seen.lock().unwrap().data);
        assert!(chunk.len() <= 100);
        got.extend(chunk);
        h.accept_input();
        run_until(&mut poll, &mut reg, T, |_| {
            !seen.lock().unwrap().data.is_empty()
                || seen.lock().unwrap().events.contains(&Ev::Closed)
        });
        if seen.lock().unwrap().events.contains(&Ev::Closed) {
            got.extend(std::mem::take(&mut seen.lock().unwrap().data));
            break;
        }
    }
    assert_eq!(got, content);
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .events
        .contains(&Ev::Closed)));

    // Truncating mode, and QEMU's message for a bad path.
    add(&mut reg, &format!("file,id=g,path={}", out.display())).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"");
    assert_eq!(
        add(&mut reg, "file,id=h,path=/nonexistent/x").unwrap_err(),
        "Failed to add chardev 'h': Could not open '/nonexistent/x': No such file or directory"
    );
    let cfg = ChardevConfig::new(BackendConfig::File {
        out: out.to_str().unwrap().into(),
        input: Some("/nonexistent/in".into()),
        append: None,
    });
    assert_eq!(
        reg.add("i", &cfg).unwrap_err().to_string(),
        "Failed to add chardev 'i': Could not open '/nonexistent/in': No such file or directory"
    );
}

#[test]
fn logfile_copies_frontend_output() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut reg = ChardevRegistry::new();
    add(&mut reg, &format!("null,id=n,logfile={}", log.display())).unwrap();
    add(
        &mut reg,
        &format!("ringbuf,id=r,logfile={},logappend=on", log.display()),
    )
    .unwrap();
    let (fe, _) = TestFrontend::boxed(1);
    let hn = reg.attach("n", fe).unwrap();
    hn.write(b"to-null;").unwrap();
    let (fe, _) = TestFrontend::boxed(1);
    let hr = reg.attach("r", fe).unwrap();
    hr.write(b"to-ring;").unwrap();
    // ringbuf-write goes to the ring only, as in QEMU.
    reg.ringbuf_write("r", b"qmp;").unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), b"to-null;to-ring;");
    assert_eq!(
        reg.ringbuf_read("r", 100, DataFormat::Utf8).unwrap(),
        "to-ring;qmp;"
    );
    assert_eq!(
        add(&mut reg, "null,id=x,logfile=/nonexistent/log").unwrap_err(),
        "Failed to add chardev 'x': Could not create '/nonexistent/log': No such file or directory"
    );
}

#[test]
fn registry_rules() {
    let mut reg = ChardevRegistry::new();
    add(&mut reg, "ringbuf,id=rb0,size=4096").unwrap();
    add(&mut reg, "memory,id=m0").unwrap();
    add(&mut reg, "null,id=n0").unwrap();
    assert_eq!(
        add(&mut reg, "null,id=rb0").unwrap_err(),
        "Chardev with id 'rb0' already exists"
    );
    assert_eq!(
        add(&mut reg, "ringbuf,id=r3,size=3").unwrap_err(),
        "Failed to add chardev 'r3': size of ringbuf chardev must be power of two"
    );
    assert_eq!(
        reg.add(
            "r0",
            &ChardevConfig::new(BackendConfig::Ringbuf {
                name: RingbufName::Ringbuf,
                size: Some(0)
            })
        )
        .unwrap_err()
        .to_string(),
        "Failed to add chardev 'r0': size of ringbuf chardev must be power of two"
    );
    // Descriptor backends need an event loop.
    assert!(add(&mut reg, "pty,id=p")
        .unwrap_err()
        .contains("needs an event loop"));
    let names: Vec<_> = reg
        .info()
        .into_iter()
        .map(|i| (i.label, i.filename))
        .collect();
    assert_eq!(
        names,
        vec![
            ("rb0".to_string(), "ringbuf".to_string()),
            ("m0".to_string(), "memory".to_string()),
            ("n0".to_string(), "null".to_string())
        ]
    );
    let (fe, _) = TestFrontend::boxed(1);
    reg.attach("n0", fe).unwrap();
    let (fe, _) = TestFrontend::boxed(1);
    assert_eq!(
        reg.attach("n0", fe).unwrap_err().to_string(),
        "Device 'n0' is in use"
    );
    let (fe, _) = TestFrontend::boxed(1);
    assert_eq!(
        reg.attach("zz", fe).unwrap_err().to_string(),
        "Chardev 'zz' not found"
    );
    assert!(reg
        .info()
        .iter()
        .any(|i| i.label == "n0" && i.frontend_open));
    assert_eq!(
        reg.remove("n0").unwrap_err().to_string(),
        "Chardev 'n0' is busy"
    );
    assert!(reg.detach("n0").is_some());
    reg.remove("n0").unwrap();
    assert_eq!(
        reg.remove("n0").unwrap_err().to_string(),
        "Chardev 'n0' not found"
    );
    // The frontend of a ring gets Opened at once: the backend is open.
    let (fe, seen) = TestFrontend::boxed(1);
    reg.attach("rb0", fe).unwrap();
    assert_eq!(seen.lock().unwrap().events, vec![Ev::Opened]);
}

/// The stdio backend on a real terminal: this test runs itself again as a
/// child whose stdin is a pty slave.
#[test]
fn stdio_on_a_terminal() {
    if std::env::var_os("CHARDEV_STDIO_CHILD").is_some() {
        return stdio_child();
    }
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes two fds to live locals; other pointers null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: both fds were just created by openpty and are owned here.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stdio_on_a_terminal",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CHARDEV_STDIO_CHILD", "1")
        .stdin(std::process::Stdio::from(slave))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // Wait for the child to be ready, then type a ^C that must arrive as
    // input (signal=off), and a line.
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("READY") {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "child ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    master.write_all(b"\x03hi\r").unwrap();
    out.read_to_end(&mut seen).unwrap();
    let status = child.wait().unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(status.success(), "child failed: {text}");
    assert!(text.contains("ISIG=off"), "{text}");
    assert!(text.contains("GOT=[3, 104, 105, 13]"), "{text}");
    assert!(
        text.contains("SECOND=cannot use stdio by multiple character devices"),
        "{text}"
    );
}

fn stdio_child() {
    let (mut poll, mut reg) = registry();
    add(&mut reg, "stdio,id=c,signal=off").unwrap();
    let second = add(&mut reg, "stdio,id=d").unwrap_err();
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is the pty slave; tio is a live local.
    assert_eq!(unsafe { libc::tcgetattr(0, &mut tio) }, 0);
    let isig = tio.c_lflag & libc::ISIG != 0;
    let (fe, seen) = TestFrontend::boxed(64);
    let h = reg.attach("c", fe).unwrap();
    h.write(b"READY\n").unwrap();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        .len()
        >= 4));
    let got = seen.lock().unwrap().total.clone();
    let report = format!(
        "ISIG={} GOT={got:?} SECOND={}\n",
        if isig { "on" } else { "off" },
        second.trim_start_matches("Failed to add chardev 'd': ")
    );
    h.write(report.as_bytes()).unwrap();
    reg.remove("c").unwrap_err(); // busy
    reg.detach("c");
    reg.remove("c").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::tcgetattr(0, &mut tio) }, 0);
    assert!(tio.c_lflag & libc::ISIG != 0, "terminal mode not restored");
}

#[test]
fn types_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<ChardevRegistry>();
    send_sync::<chardev_ringbuf::FrontendHandle>();
    send_sync::<chardev_ringbuf::RingBuf>();
    send_sync::<chardev_ringbuf::ChardevWriter>();
}

/// A backend of the caller's: a loopback that echoes output back as input,
/// through the public `Backend` trait.
#[test]
fn custom_backend_and_handle_before_attach() {
    use chardev_ringbuf::{Backend, BackendContext, Sink};
    use std::sync::{Arc, Mutex};

    struct Loop(Arc<Mutex<Vec<u8>>>);
    impl Sink for Loop {
        fn write(&self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
    }
    struct Loopback(Arc<Mutex<Vec<u8>>>);
    impl Backend for Loopback {
        fn filename(&self) -> String {
            "loopback".into()
        }
        fn sink(&self) -> Arc<dyn Sink> {
            Arc::new(Loop(self.0.clone()))
        }
        fn is_open(&self) -> bool {
            true
        }
        fn handle_event(
            &mut self,
            _: &mut BackendContext<'_>,
            _: mio::Token,
            _: &mio::event::Event,
        ) {
        }
        fn pump(&mut self, cx: &mut BackendContext<'_>) {
            let mut q = self.0.lock().unwrap();
            let n = cx.can_receive().min(q.len());
            let chunk: Vec<u8> = q.drain(..n).collect();
            drop(q);
            if !chunk.is_empty() {
                cx.receive(&chunk);
            }
        }
        fn shutdown(&mut self, _: &mut BackendContext<'_>) {}
    }

    let (mut poll, mut reg) = registry();
    reg.add_backend("lo", |_| Ok(Box::new(Loopback(Arc::default()))))
        .unwrap();
    assert_eq!(filename(&reg, "lo"), "loopback");
    // A device built before attaching gets its handle first.
    let h = reg.handle("lo").unwrap();
    h.write(b"abcdef").unwrap();
    let (fe, seen) = TestFrontend::boxed(4);
    reg.attach("lo", fe).unwrap();
    assert_eq!(seen.lock().unwrap().total, b"abcd");
    seen.lock().unwrap().data.clear();
    h.accept_input();
    assert!(run_until(&mut poll, &mut reg, T, |_| seen
        .lock()
        .unwrap()
        .total
        == b"abcdef"));
    assert_eq!(
        reg.add_backend("lo2", |_| Err("no device".into()))
            .unwrap_err()
            .to_string(),
        "Failed to add chardev 'lo2': no device"
    );
}
