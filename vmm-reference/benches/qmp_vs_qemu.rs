//! QMP round trips and start-up time, vmm-reference against QEMU 7.2's
//! qemu-storage-daemon, measured in the same run with the same client.
//!
//! `cargo bench -p vmm-reference --bench qmp_vs_qemu` prints, for each
//! measure, the median of several runs for both and the ratio.
//! Set QMP_BENCH_ROUNDS (default 20000 round trips per run) and
//! QMP_BENCH_RUNS (default 7) to change the effort, and VMM_REFERENCE_BIN to
//! measure another build of the binary (e.g. the static release build that
//! `scripts/build-static.sh` makes).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm-reference");

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Ours,
    Qemu,
}

fn spawn(kind: Kind, extra: &[&str]) -> (Server, Instant) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("qmp.sock");
    let mut cmd = match kind {
        Kind::Ours => {
            let bin = std::env::var("VMM_REFERENCE_BIN").unwrap_or_else(|_| VMM.to_owned());
            let mut c = Command::new(bin);
            c.arg("--no-guest")
                .arg("--qmp")
                .arg(format!("unix:{}", sock.display()));
            c
        }
        Kind::Qemu => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--chardev")
                .arg(format!(
                    "socket,path={},server=on,wait=off,id=m0",
                    sock.display()
                ))
                .arg("--monitor")
                .arg("chardev=m0");
            c
        }
    };
    cmd.args(extra);
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn server");
    (
        Server {
            child,
            _dir: dir,
            sock,
        },
        start,
    )
}

/// Connects as soon as the socket accepts and reads the greeting. `None`
/// when the greeting never comes: qemu-storage-daemon 7.2 sometimes loses a
/// connection made in the first milliseconds of its start-up.
fn connect(sock: &Path, deadline: Duration) -> Option<BufReader<UnixStream>> {
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(sock) {
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut r = BufReader::new(s);
            let mut greeting = String::new();
            r.read_line(&mut greeting).ok()?;
            assert!(greeting.contains("\"QMP\""), "{greeting}");
            return Some(r);
        }
        assert!(start.elapsed() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn exec(r: &mut BufReader<UnixStream>, line: &[u8]) -> String {
    r.get_mut().write_all(line).expect("send");
    let mut reply = String::new();
    r.read_line(&mut reply).expect("reply");
    reply
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn round_trips(kind: Kind, rounds: usize) -> f64 {
    let (server, _) = spawn(kind, &[]);
    // Let the server settle: this measures steady-state round trips.
    std::thread::sleep(Duration::from_millis(100));
    let mut c = connect(&server.sock, Duration::from_secs(10)).expect("greeting");
    assert!(exec(&mut c, b"{\"execute\": \"qmp_capabilities\"}\n").contains("return"));
    for _ in 0..200 {
        exec(&mut c, b"{\"execute\": \"query-version\"}\n");
    }
    let start = Instant::now();
    for _ in 0..rounds {
        let reply = exec(&mut c, b"{\"execute\": \"query-version\"}\n");
        debug_assert!(reply.contains("return"));
    }
    rounds as f64 / start.elapsed().as_secs_f64()
}

/// `ringbuf-write` then `ringbuf-read` of 64 bytes, pairs per second.
fn ringbuf_round_trips(kind: Kind, rounds: usize) -> f64 {
    let (server, _) = spawn(kind, &["--chardev", "ringbuf,id=rb0,size=65536"]);
    std::thread::sleep(Duration::from_millis(100));
    let mut c = connect(&server.sock, Duration::from_secs(10)).expect("greeting");
    assert!(exec(&mut c, b"{\"execute\": \"qmp_capabilities\"}\n").contains("return"));
    let data = "0123456789abcdef".repeat(4);
    let write = format!(
        "{{\"execute\": \"ringbuf-write\", \"arguments\": {{\"device\": \"rb0\", \"data\": \"{data}\"}}}}\n"
    );
    let read =
        b"{\"execute\": \"ringbuf-read\", \"arguments\": {\"device\": \"rb0\", \"size\": 64}}\n";
    let start = Instant::now();
    for _ in 0..rounds {
        exec(&mut c, write.as_bytes());
        let reply = exec(&mut c, read);
        assert!(reply.contains(&data), "{reply}");
    }
    rounds as f64 / start.elapsed().as_secs_f64()
}

fn start_to_greeting(kind: Kind) -> Option<f64> {
    let (server, start) = spawn(kind, &[]);
    let c = connect(&server.sock, Duration::from_secs(10));
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(server);
    c.map(|_| ms)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing useful to us.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-storage-daemon (Debian's qemu-system-x86) is needed as the reference");
        std::process::exit(1);
    }
    let rounds = env_usize("QMP_BENCH_ROUNDS", 20_000);
    let runs = env_usize("QMP_BENCH_RUNS", 7);

    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for _ in 0..runs {
        // Interleave so that machine noise hits both alike.
        ours.push(round_trips(Kind::Ours, rounds));
        qemu.push(round_trips(Kind::Qemu, rounds));
    }
    let (o, q) = (median(ours), median(qemu));
    println!("QMP query-version round trips/s, one Unix connection ({rounds} per run, median of {runs}):");
    println!("  vmm-reference       {o:>10.0}");
    println!("  qemu-storage-daemon {q:>10.0}");
    println!("  ratio ours/qemu     {:>10.2}x (target >= 2x)", o / q);

    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for _ in 0..runs {
        ours.push(ringbuf_round_trips(Kind::Ours, rounds / 2));
        qemu.push(ringbuf_round_trips(Kind::Qemu, rounds / 2));
    }
    let (o, q) = (median(ours), median(qemu));
    println!(
        "ringbuf-write + ringbuf-read (64 bytes) pairs/s ({} per run, median of {runs}):",
        rounds / 2
    );
    println!("  vmm-reference       {o:>10.0}");
    println!("  qemu-storage-daemon {q:>10.0}");
    println!("  ratio ours/qemu     {:>10.2}x (target >= 2x)", o / q);

    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    let mut lost = [0usize; 2];
    while ours.len() < runs.max(9) || qemu.len() < runs.max(9) {
        for (i, (kind, v)) in [(Kind::Ours, &mut ours), (Kind::Qemu, &mut qemu)]
            .into_iter()
            .enumerate()
        {
            match start_to_greeting(kind) {
                Some(ms) => v.push(ms),
                None => lost[i] += 1,
            }
        }
        assert!(
            lost.iter().all(|&l| l < 50),
            "too many lost greetings: {lost:?}"
        );
    }
    let (o, q) = (median(ours), median(qemu));
    println!(
        "Process start to QMP greeting received, ms (median of {}):",
        runs.max(9)
    );
    println!("  vmm-reference       {o:>10.2}");
    println!("  qemu-storage-daemon {q:>10.2}");
    println!("  ratio ours/qemu     {:>10.2} (target <= 0.2)", o / q);
    let floor: Vec<f64> = (0..runs.max(9))
        .map(|_| {
            let start = Instant::now();
            Command::new("/bin/true").status().expect("/bin/true");
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!(
        "  spawning /bin/true and reaping it: {:.2} ms here, the floor for any process",
        median(floor)
    );
    println!(
        "  connections that never got a greeting (sample dropped): ours {}, qemu {}",
        lost[0], lost[1]
    );
}
