//! Request throughput through the whole path (BlockBackend -> `throttle` filter without
//! limits -> qcow2 node -> file node) against the qcow2 crate alone on the same image, and
//! against `qemu-img bench` (QEMU's full block layer) on the same image, in the same run.
//!
//! Depth N runs two ways through the graph: N threads with one request each ("threads"),
//! and one thread submitting batches of N requests (`BlockBackend::submit_batch`, io_uring
//! in the file driver: "batch"). The crate alone runs N threads (its API is synchronous);
//! qemu-img bench keeps N requests in flight in its AIO engine. "rand" visits every block
//! of the region in a scattered order (a step of an odd number of blocks, as qemu-img bench
//! can express it). Every case runs `--rounds` times (default 5), the paths interleaved,
//! and the table shows medians.
//!
//! `cargo bench -p block-graph --bench io -- [--quick] [--direct] [--dir DIR] [--rounds N]
//! [--qemu-aio threads|native|io_uring] [--aio threads|io_uring] [--only TEXT]` (`--aio`: the
//! graph's `aio` option, on the qcow2 node and inherited by its file; `--direct`: cache=none everywhere, on /var/tmp
//! unless `--dir` says otherwise). Other modes: `--throttle` (accuracy at 10 MB/s and 1000
//! IOPS over 10 s), `--mem [--vmm PATH]` (100 qcow2 nodes: this process, `vmm-reference
//! --no-guest` and qemu-storage-daemon), `--uring`, `--one graph|graph-acct|crate read|write [--count N]`,
//! `--ab read|write [--pairs N] [--count N] [--acct]` (graph and crate alternated in one
//! process, medians of the pairs' ratios: `benches/io/ab.rs`).

use std::sync::Arc;
use std::time::Instant;

#[path = "io/ab.rs"]
mod ab;

use block_graph::batch::BatchReq;
use block_graph::stats::AcctType;
use block_graph::{BlockBackend, BlockGraph, DeviceAttach, WriteFlags};
use qapi_types::{BlockdevOptions, QapiType};

const REGION: u64 = 256 << 20;

/// `--qemu-aio`: qemu-img bench's `-i` (default `threads`, QEMU's default).
static QEMU_AIO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--aio`: the graph's `aio` option (default `threads`).
static AIO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn aio() -> &'static str {
    AIO.get().map_or("threads", String::as_str)
}

/// `--direct`: cache=none (O_DIRECT) on every path.
static DIRECT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn direct() -> bool {
    DIRECT.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Clone, Copy)]
struct Case {
    write: bool,
    rand: bool,
    bs: u64,
    depth: usize,
    count: u64,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} {} {}k QD{}",
            if self.write { "write" } else { "read" },
            if self.rand { "rand" } else { "seq" },
            self.bs >> 10,
            self.depth
        )
    }

    /// Offset of request `i`: sequential, or a scattered permutation of the blocks.
    fn offset(&self, i: u64) -> u64 {
        let blocks = REGION / self.bs;
        let b = if self.rand {
            // An odd step co-prime with the (power of two) block count visits every block.
            (i * (blocks / 2 + 1 + 2 * 7919)) % blocks
        } else {
            i % blocks
        };
        b * self.bs
    }
}

/// One request: offset and buffer.
type Request = Arc<dyn Fn(u64, &mut [u8]) + Send + Sync>;

/// A buffer for `bs` bytes, aligned for O_DIRECT (so that no path bounces).
fn buffer(bs: u64) -> qcow2::AlignedBuf {
    let mut b = qcow2::AlignedBuf::new(bs as usize, 4096);
    b.fill(0x5a);
    b
}

/// CPU time (user + system) of the calling thread in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the request threads of the last [`run_threads`], in nanoseconds: on a
/// shared machine it is less disturbed by other processes than the wall-clock time.
static LAST_CPU_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn run_threads(c: Case, f: Request) -> f64 {
    let per = c.count / c.depth as u64;
    let start = Instant::now();
    let hs: Vec<_> = (0..c.depth)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut buf = buffer(c.bs);
                let cpu = thread_cpu_ns();
                for k in 0..per {
                    let i = k * c.depth as u64 + t as u64;
                    f(c.offset(i), &mut buf);
                }
                thread_cpu_ns() - cpu
            })
        })
        .collect();
    let cpu: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    LAST_CPU_NS.store(cpu, std::sync::atomic::Ordering::Relaxed);
    start.elapsed().as_secs_f64()
}

/// The graph of the benchmark: a throttle group without limits, the qcow2 node over its
/// file, a `throttle` filter over it, and a guest device's backend on the filter.
fn open_graph(img: &str) -> (BlockGraph, Arc<BlockBackend>) {
    let mut g = BlockGraph::new();
    g.object_add("throttle-group", "unlimited", serde_json::json!({}))
        .unwrap();
    let o = BlockdevOptions::from_qmp_strict(serde_json::json!({
        "driver": "qcow2", "node-name": "q", "cache": {"direct": direct()}, "aio": aio(),
        "file": {"driver": "file", "filename": img}
    }))
    .unwrap();
    g.blockdev_add(&o).unwrap();
    let t = BlockdevOptions::from_qmp_strict(serde_json::json!({
        "driver": "throttle", "node-name": "t", "throttle-group": "unlimited", "file": "q"
    }))
    .unwrap();
    let n = g.blockdev_add(&t).unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, DeviceAttach::disk("v")).unwrap();
    (g, be)
}

/// Depth N as N threads with one request each.
fn graph_path(img: &str, c: Case) -> f64 {
    graph_path_with(img, c, false)
}

/// The graph path; `accounted`: each request also accounted as a guest device does it
/// (`Stats::account` around it: two clock reads and the counters).
fn graph_path_with(img: &str, c: Case, accounted: bool) -> f64 {
    let (mut g, be) = open_graph(img);
    let b2 = be.clone();
    let t = run_threads(
        c,
        Arc::new(move |off, buf: &mut [u8]| {
            let len = buf.len() as u64;
            let mut io = || {
                if c.write {
                    b2.write_buf(off, buf, WriteFlags::default())
                } else {
                    b2.read_buf(off, buf)
                }
            };
            if accounted {
                let ty = if c.write {
                    AcctType::Write
                } else {
                    AcctType::Read
                };
                b2.stats().account(ty, len, io).unwrap();
            } else {
                io().unwrap();
            }
        }),
    );
    drop(be);
    g.close_all();
    t
}

/// Depth N from one thread: batches of 8 N requests, N of them in flight at once (the
/// file driver's queue depth).
fn batch_path(img: &str, c: Case) -> f64 {
    let (mut g, be) = open_graph(img);
    block_graph::batch::set_queue_depth(c.depth);
    let per = 8 * c.depth;
    let mut bufs: Vec<qcow2::AlignedBuf> = (0..per).map(|_| buffer(c.bs)).collect();
    let start = Instant::now();
    let mut i = 0u64;
    while i < c.count {
        let n = (c.count - i).min(per as u64) as usize;
        let mut reqs: Vec<BatchReq<'_>> = bufs[..n]
            .iter_mut()
            .enumerate()
            .map(|(k, b)| {
                let off = c.offset(i + k as u64);
                if c.write {
                    BatchReq::write(off, b)
                } else {
                    BatchReq::read(off, b)
                }
            })
            .collect();
        be.submit_batch(&mut reqs);
        for r in &reqs {
            assert!(matches!(r.result, Some(Ok(()))), "{:?}", r.result);
        }
        i += n as u64;
    }
    let t = start.elapsed().as_secs_f64();
    drop(be);
    g.close_all();
    t
}

fn crate_path(img: &str, c: Case) -> f64 {
    let q = Arc::new(
        qcow2::Qcow2::open_path(
            img,
            qcow2::OpenOptions {
                writable: true,
                direct: direct(),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    run_threads(
        c,
        Arc::new(move |off, buf: &mut [u8]| {
            if c.write {
                q.write_at(buf, off).unwrap();
            } else {
                q.read_at(buf, off).unwrap();
            }
        }),
    )
}

fn qemu_path(img: &str, c: Case) -> Option<f64> {
    let step = if c.rand {
        (REGION / c.bs / 2 + 1 + 2 * 7919) * c.bs
    } else {
        c.bs
    };
    let mut cmd = std::process::Command::new("qemu-img");
    let cache = if direct() { "none" } else { "writeback" };
    let aio = QEMU_AIO.get().map(String::as_str).unwrap_or("threads");
    cmd.args(["bench", "-f", "qcow2", "-t", cache, "-i", aio])
        .args(["-c", &c.count.to_string(), "-d", &c.depth.to_string()])
        .args(["-s", &c.bs.to_string(), "-S", &step.to_string()]);
    if c.write {
        cmd.arg("-w");
    }
    let out = cmd.arg(img).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(a) = arg_value(&args, "--qemu-aio") {
        let _ = QEMU_AIO.set(a);
    }
    if let Some(a) = arg_value(&args, "--aio") {
        let _ = AIO.set(a);
    }
    let quick = args.iter().any(|a| a == "--quick");
    DIRECT.store(
        args.iter().any(|a| a == "--direct"),
        std::sync::atomic::Ordering::Relaxed,
    );
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| {
            if direct() {
                "/var/tmp".into()
            } else {
                "/dev/shm".into()
            }
        });
    let img = format!("{dir}/block-graph-bench-{}.qcow2", std::process::id());
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &img, &REGION.to_string()])
        .status()
        .expect("qemu-img");
    assert!(status.success());
    // Allocate everything first so that every path measures the same steady state.
    std::process::Command::new("qemu-img")
        .args([
            "bench",
            "-q",
            "-w",
            "-c",
            &(REGION >> 16).to_string(),
            "-s",
            "64k",
            &img,
        ])
        .status()
        .expect("qemu-img bench");
    if let Some(i) = args.iter().position(|a| a == "--ab") {
        // --ab read|write [--pairs N] [--count N] [--acct]: graph and crate alternated in
        // this process (see benches/io/ab.rs).
        let write = args.get(i + 1).map(String::as_str) == Some("write");
        let pairs = arg_value(&args, "--pairs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        let count = arg_value(&args, "--count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let side = if args.iter().any(|a| a == "--acct") {
            ab::GraphSide::Accounted
        } else {
            ab::GraphSide::Plain
        };
        ab::run(&img, write, pairs, count, side);
        let _ = std::fs::remove_file(&img);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--one") {
        // One case on one path, for profilers: --one graph|graph-acct|crate read|write
        // (graph-acct: the graph path with each request accounted as a device does).
        let which = args.get(i + 1).map(String::as_str).unwrap_or("graph");
        let write = args.get(i + 2).map(String::as_str) == Some("write");
        // `--count N` (default 400000): few requests for instruction counters such as
        // `valgrind --tool=callgrind` (run two counts and divide the difference).
        let count = arg_value(&args, "--count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(400_000);
        let c = Case {
            write,
            rand: false,
            bs: 4096,
            depth: 1,
            count,
        };
        let t = match which {
            "crate" => crate_path(&img, c),
            "graph-acct" => graph_path_with(&img, c, true),
            _ => graph_path(&img, c),
        };
        let cpu = LAST_CPU_NS.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "{which} {}: {:.3} s, {:.0} ns/request, {:.0} CPU ns/request",
            c.name(),
            t,
            t * 1e9 / c.count as f64,
            cpu as f64 / c.count as f64
        );
        let _ = std::fs::remove_file(&img);
        return;
    }
    if args.iter().any(|a| a == "--throttle") {
        throttle_accuracy();
        let _ = std::fs::remove_file(&img);
        return;
    }
    if args.iter().any(|a| a == "--mem") {
        memory(&dir);
        let _ = std::fs::remove_file(&img);
        return;
    }
    if args.iter().any(|a| a == "--uring") {
        uring_vs_pread(&img);
        let _ = std::fs::remove_file(&img);
        return;
    }
    let scale = if quick { 1 } else { 4 };
    // `--only TEXT`: the cases whose name contains TEXT ("64k QD32", "write rand").
    let only = arg_value(&args, "--only");
    let rounds: usize = arg_value(&args, "--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    println!(
        "{} rounds per case, medians in seconds; {}; qemu-img bench -i {}",
        rounds,
        if direct() {
            "cache=none (O_DIRECT)"
        } else {
            "cache=writeback"
        },
        QEMU_AIO.get().map(String::as_str).unwrap_or("threads")
    );
    println!("| case | requests | graph threads | graph batch | qcow2 crate | qemu-img | threads/crate | batch/crate | qemu/threads | qemu/batch |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &bs in &[4096u64, 65536] {
        for &depth in &[1usize, 32] {
            for &rand in &[false, true] {
                for &write in &[false, true] {
                    let count = if bs == 4096 {
                        20_000 * scale
                    } else {
                        4_000 * scale
                    };
                    let c = Case {
                        write,
                        rand,
                        bs,
                        depth,
                        count: count / depth as u64 * depth as u64,
                    };
                    if only
                        .as_ref()
                        .is_some_and(|o| !c.name().contains(o.as_str()))
                    {
                        continue;
                    }
                    let (mut g, mut b, mut k, mut q) = (vec![], vec![], vec![], vec![]);
                    // Interleaved rounds: the machine is shared, so every path sees the
                    // same mix of load.
                    for _ in 0..rounds {
                        g.push(graph_path(&img, c));
                        if depth > 1 {
                            b.push(batch_path(&img, c));
                        }
                        k.push(crate_path(&img, c));
                        if let Some(x) = qemu_path(&img, c) {
                            q.push(x);
                        }
                    }
                    let (g, k, q) = (median(g), median(k), median(q));
                    // At depth 1 a batch is one request: the batch column is the
                    // single-request path.
                    let b = if depth > 1 { median(b) } else { g };
                    println!(
                        "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} |",
                        c.name(),
                        c.count,
                        g,
                        b,
                        k,
                        q,
                        g / k,
                        b / k,
                        q / g,
                        q / b
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_file(&img);
}

/// One request at a time on one thread, as the block graph issues them: `pread` against an
/// io_uring submit-and-wait of the same read (O_DIRECT with `--direct`).
fn uring_vs_pread(img: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct() {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(img).unwrap();
    let fd = f.as_raw_fd();
    let n = if direct() { 20_000u64 } else { 200_000 };
    let mut buf = qcow2::AlignedBuf::new(4096, 4096);
    let blocks = REGION / 4096;
    let off = |i: u64| (i * 7919 % blocks) * 4096;
    let t = Instant::now();
    for i in 0..n {
        // SAFETY: pread into our own 4 KiB aligned buffer.
        let r = unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                4096,
                off(i) as i64,
            )
        };
        assert_eq!(r, 4096);
    }
    let p = t.elapsed().as_secs_f64();
    let mut ring = io_uring::IoUring::new(8).unwrap();
    let t = Instant::now();
    for i in 0..n {
        let e = io_uring::opcode::Read::new(io_uring::types::Fd(fd), buf.as_mut_ptr(), 4096)
            .offset(off(i))
            .build();
        // SAFETY: the buffer outlives the request, which completes before the next loop.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let c = ring.completion().next().unwrap();
        assert_eq!(c.result(), 4096);
    }
    let u = t.elapsed().as_secs_f64();
    println!(
        "4 KiB reads, one at a time{}: pread {:.0} ns/request, io_uring {:.0} ns/request",
        if direct() { " (O_DIRECT)" } else { "" },
        p * 1e9 / n as f64,
        u * 1e9 / n as f64
    );
}

fn rss_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// Memory for 100 qcow2 nodes (1 GiB images): this process's growth against a
/// qemu-storage-daemon opening the same nodes.
fn memory(dir: &str) {
    let n = 100;
    let imgs: Vec<String> = (0..n)
        .map(|i| {
            let p = format!("{dir}/block-graph-mem-{}-{i}.qcow2", std::process::id());
            let st = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", &p, "1G"])
                .status()
                .unwrap();
            assert!(st.success());
            p
        })
        .collect();
    let before = rss_kib("self", "VmRSS:");
    let mut g = BlockGraph::new();
    for (i, p) in imgs.iter().enumerate() {
        let o = BlockdevOptions::from_qmp_strict(serde_json::json!({
            "driver": "qcow2", "node-name": format!("n{i}"),
            "file": {"driver": "file", "filename": p}
        }))
        .unwrap();
        g.blockdev_add(&o).unwrap();
    }
    let after = rss_kib("self", "VmRSS:");
    g.close_all();
    drop(g);
    let blockdevs: Vec<String> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| format!("driver=qcow2,node-name=n{i},file.driver=file,file.filename={p}"))
        .collect();
    // Peak RSS of a daemon with no node and with the 100 nodes (QMP monitor in both).
    let peak = |prog: &str, with: bool| -> u64 {
        let sock = format!("{dir}/block-graph-mem-{}.sock", std::process::id());
        let _ = std::fs::remove_file(&sock);
        let mut cmd = std::process::Command::new(prog);
        if prog == "qemu-storage-daemon" {
            cmd.args([
                "--chardev",
                &format!("socket,id=m,path={sock},server=on,wait=off"),
            ])
            .args(["--monitor", "chardev=m"]);
        } else {
            cmd.args(["--no-guest", "--qmp", &format!("unix:{sock}")]);
        }
        if with {
            for b in &blockdevs {
                cmd.arg("--blockdev").arg(b);
            }
        }
        let mut child = cmd.stdout(std::process::Stdio::null()).spawn().expect(prog);
        // Started when the monitor socket exists (all --blockdev nodes are open by then).
        let t = Instant::now();
        while !std::path::Path::new(&sock).exists() && t.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let kib = rss_kib(&child.id().to_string(), "VmHWM:");
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&sock);
        kib
    };
    let vmm = arg_value(&std::env::args().collect::<Vec<_>>(), "--vmm");
    let mut lines = vec![format!(
        "{n} qcow2 nodes (1 GiB images): block-graph in this process +{} KiB RSS ({} KiB per node)",
        after - before,
        (after - before) / n
    )];
    let mut rows = vec![("qemu-storage-daemon".to_string(), "qemu-storage-daemon")];
    if let Some(v) = &vmm {
        rows.insert(0, (format!("vmm-reference --no-guest ({v})"), v.as_str()));
    }
    for (label, prog) in rows {
        let (base, full) = (peak(prog, false), peak(prog, true));
        lines.push(format!(
            "{label}: peak RSS {base} KiB without nodes, {full} KiB with {n} ({} KiB per node)",
            full.saturating_sub(base) / n
        ));
    }
    for p in &imgs {
        let _ = std::fs::remove_file(p);
    }
    for l in lines {
        println!("{l}");
    }
}

/// Throttling accuracy over 10 s: 10 MB/s with 64 KiB writes, 1000 IOPS with 4 KiB reads,
/// four threads keeping the limit saturated, on a null-co node: once with
/// `block_set_io_throttle` on the backend, once through a `throttle` filter node.
fn throttle_accuracy() {
    let cases = [
        (
            "10 MB/s, 64 KiB writes",
            10_000_000i64,
            0i64,
            65536usize,
            true,
        ),
        ("1000 IOPS, 4 KiB reads", 0, 1000, 4096, false),
    ];
    for (filter, (label, bps, iops, bs, write)) in [false, true]
        .into_iter()
        .flat_map(|f| cases.into_iter().map(move |c| (f, c)))
    {
        let mut g = BlockGraph::new();
        let o = BlockdevOptions::from_qmp_strict(serde_json::json!({
            "driver": "null-co", "node-name": "n", "size": 1u64 << 30
        }))
        .unwrap();
        let mut n = g.blockdev_add(&o).unwrap();
        if filter {
            // The same limits in a throttle-group object, applied by a throttle node.
            let limits = if bps > 0 {
                serde_json::json!({"bps-total": bps})
            } else {
                serde_json::json!({"iops-total": iops})
            };
            g.object_add(
                "throttle-group",
                "tg",
                serde_json::json!({ "limits": limits }),
            )
            .unwrap();
            let t = BlockdevOptions::from_qmp_strict(serde_json::json!({
                "driver": "throttle", "node-name": "t", "throttle-group": "tg", "file": "n"
            }))
            .unwrap();
            n = g.blockdev_add(&t).unwrap();
        }
        let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
        g.attach_device(&be, DeviceAttach::disk("v")).unwrap();
        if !filter {
            let t = qapi_types::BlockIOThrottle::from_qmp_strict(serde_json::json!({
                "device": "d", "bps": bps, "bps_rd": 0, "bps_wr": 0,
                "iops": iops, "iops_rd": 0, "iops_wr": 0
            }))
            .unwrap();
            g.set_io_throttle(&t).unwrap();
        }
        let label = format!(
            "{label} ({})",
            if filter {
                "throttle filter node"
            } else {
                "block_set_io_throttle"
            }
        );
        let secs = 10.0;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let be = be.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; bs];
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if write {
                            be.write_buf(0, &buf, WriteFlags::default()).unwrap();
                        } else {
                            be.read_buf(0, &mut buf).unwrap();
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ops: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        let el = start.elapsed().as_secs_f64();
        // The bucket lets avg/10 through before throttling starts, as QEMU's does.
        let (got, want) = if bps > 0 {
            ((ops * bs as u64) as f64 / el, bps as f64 * (1.0 + 0.1 / el))
        } else {
            (ops as f64 / el, iops as f64 * (1.0 + 0.1 / el))
        };
        println!(
            "{label}: {got:.0}/s over {el:.2} s, expected {want:.0}/s ({:+.2} %)",
            (got / want - 1.0) * 100.0
        );
    }
}
