//! Mirror and backup jobs on real images, with a guest writing during the job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block_graph::{BlockBackend, BlockGraph, DeviceAttach, DirtyBitmap, Node, Perm, WriteFlags};
use qapi_types::{BlockdevOptions, JobStatus, QapiType};
use serde_json::{json, Value};

use crate::Jobs;

const LEN: u64 = 4 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &str, fmt: &str, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd, img])
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "qemu-io {cmd}");
}

/// Bytes of data the image `t` itself holds (not its backing chain), per `qemu-img map`.
fn own_data(t: &str) -> u64 {
    let map = qemu_img(&["map", "-U", "--output=json", "-f", "qcow2", t]);
    let v: Value = serde_json::from_str(&map).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|x| x["depth"] == 0 && x["data"] == true)
        .map(|x| x["length"].as_u64().unwrap())
        .sum()
}

fn opts(v: Value) -> BlockdevOptions {
    BlockdevOptions::from_qmp_strict(v).unwrap()
}

struct Env {
    g: BlockGraph,
    jobs: Jobs,
    be: Arc<BlockBackend>,
    dir: tempfile::TempDir,
}

impl Env {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

/// A guest disk `disk0` on `src.<fmt>` (qcow2 over a backing `base.qcow2` when `chain`),
/// with data written by qemu-io in both layers.
fn env(fmt: &str, chain: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let src = p(&format!("src.{fmt}"));
    if chain {
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "4M"]);
        qemu_io(&p("base.qcow2"), "qcow2", "write -P 0x11 0 2M");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p("base.qcow2"),
            "-F",
            "qcow2",
            &src,
        ]);
        qemu_io(&src, "qcow2", "write -P 0x22 1M 512k");
    } else {
        qemu_img(&["create", "-q", "-f", fmt, &src, "4M"]);
        qemu_io(&src, fmt, "write -P 0x33 0 1M");
        qemu_io(&src, fmt, "write -P 0x44 3M 64k");
    }
    let mut g = BlockGraph::new();
    let node = g
        .blockdev_add(&opts(json!({"driver": fmt, "node-name": "src",
            "file": {"driver": "file", "filename": src}})))
        .unwrap();
    let be = g
        .create_backend("disk0", Some(&node), Default::default())
        .unwrap();
    g.attach_device(
        &be,
        DeviceAttach {
            resizable: false,
            ..DeviceAttach::disk("vd0")
        },
    )
    .unwrap();
    let jobs = Jobs::for_graph(&g);
    Env { g, jobs, be, dir }
}

fn read_all(g: &mut BlockGraph, n: &Arc<Node>) -> Vec<u8> {
    let r = g
        .new_root(n, Perm::CONSISTENT_READ, Perm::ALL, "a reader")
        .unwrap();
    let mut buf = vec![0u8; n.length() as usize];
    r.read_buf(0, &mut buf).unwrap();
    g.release_root(&r);
    buf
}

/// A guest writing 4 KiB blocks at pseudo-random places until stopped; `model` follows.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(be: &Arc<BlockBackend>, model: Arc<Mutex<Vec<u8>>>, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (be, st) = (be.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut x = seed | 1;
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = x % (LEN / 4096) * 4096;
                let byte = (x >> 32) as u8 | 1;
                // The model is updated under its lock together with the write, so that
                // it always matches what the disk holds once writes stop.
                let mut m = model.lock().unwrap();
                be.write_buf(off, &[byte; 4096], WriteFlags::default())
                    .unwrap();
                m[off as usize..off as usize + 4096].fill(byte);
                drop(m);
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            n
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn wait_status(e: &mut Env, id: &str, want: JobStatus) {
    let end = Instant::now() + Duration::from_secs(30);
    let job = e.jobs.find(id).unwrap();
    while job.status() != want {
        assert!(Instant::now() < end, "job {id} stuck in {:?}", job.status());
        e.jobs.poll(&mut e.g);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The events raised since the last call; a job that ended with an error fails the test
/// unless `allow_error`.
fn events_checked(g: &BlockGraph, allow_error: bool) -> Vec<String> {
    let ev = g.take_events();
    for e in &ev {
        let err = e.data.as_ref().and_then(|d| d.get("error"));
        assert!(allow_error || err.is_none(), "{}: {:?}", e.event, e.data);
    }
    ev.into_iter().map(|e| e.event).collect()
}

fn events(g: &BlockGraph) -> Vec<String> {
    events_checked(g, false)
}

fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => true,
        Some(i) => {
            eprintln!("first difference at {i}: {} != {}", a[i], b[i]);
            false
        }
    }
}

fn drive_mirror(e: &mut Env, fmt: &str, sync: &str, target: &str) -> Arc<crate::Job> {
    let a = qapi_types::DriveMirror::from_qmp_strict(json!({
        "device": "disk0", "target": target, "format": fmt, "sync": sync,
        "job-id": "m0"}))
    .unwrap();
    crate::mirror::drive_mirror(&mut e.g, &e.jobs, &a).unwrap()
}

#[test]
fn mirror_full_with_guest_writes_pivots_on_complete() {
    for fmt in ["qcow2", "raw"] {
        let mut e = env(fmt, false);
        let src = e.g.find_node("src").unwrap();
        let model = Arc::new(Mutex::new(read_all(&mut e.g, &src)));
        let w = Writer::start(&e.be, model.clone(), 7);
        let t = e.path(&format!("t.{fmt}"));
        drive_mirror(&mut e, fmt, "full", &t);
        wait_status(&mut e, "m0", JobStatus::Ready);
        std::thread::sleep(Duration::from_millis(30));
        e.jobs.complete("m0").unwrap();
        let st = e
            .jobs
            .wait_finished(&mut e.g, "m0", Duration::from_secs(30));
        assert_eq!(st, Some(JobStatus::Null));
        let writes = w.stop();
        assert!(writes > 0);
        let ev = events(&e.g);
        assert!(ev.contains(&"BLOCK_JOB_READY".to_string()), "{ev:?}");
        assert!(ev.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{ev:?}");
        // The guest now uses the target, which holds every write.
        let root = e.be.root_node().unwrap();
        assert_ne!(root.name(), "src");
        assert!(
            same(&read_all(&mut e.g, &root), &model.lock().unwrap()),
            "{fmt}"
        );
        drop(root);
        drop(src);
        e.g.close_all();
        if fmt == "qcow2" {
            qemu_img(&["check", "-q", &t]);
        }
    }
}

#[test]
fn mirror_cancel_after_ready_keeps_the_source() {
    let mut e = env("qcow2", false);
    let t = e.path("t.qcow2");
    drive_mirror(&mut e, "qcow2", "full", &t);
    wait_status(&mut e, "m0", JobStatus::Ready);
    e.be.write_buf(8192, &[0x77; 4096], WriteFlags::default())
        .unwrap();
    e.jobs.cancel(&mut e.g, "m0", false).unwrap();
    let st = e
        .jobs
        .wait_finished(&mut e.g, "m0", Duration::from_secs(30));
    assert_eq!(st, Some(JobStatus::Null));
    let ev = events(&e.g);
    assert!(ev.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{ev:?}");
    assert_eq!(e.be.root_node().unwrap().name(), "src");
    e.g.close_all();
    let s = e.path("src.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", &s, &t])
        .status()
        .unwrap();
    assert!(out.success(), "the target is the source at the cancel");
}

#[test]
fn mirror_top_and_none_give_the_target_the_right_backing() {
    for sync in ["top", "none"] {
        let mut e = env("qcow2", true);
        let src = e.g.find_node("src").unwrap();
        let before = read_all(&mut e.g, &src);
        let t = e.path("t.qcow2");
        drive_mirror(&mut e, "qcow2", sync, &t);
        wait_status(&mut e, "m0", JobStatus::Ready);
        e.jobs.complete("m0").unwrap();
        assert_eq!(
            e.jobs
                .wait_finished(&mut e.g, "m0", Duration::from_secs(30)),
            Some(JobStatus::Null)
        );
        let root = e.be.root_node().unwrap();
        let backing = root.backing().unwrap().node();
        let want = if sync == "top" { "#" } else { "src" };
        assert!(
            backing.name().starts_with(want),
            "{sync}: {}",
            backing.name()
        );
        assert!(same(&read_all(&mut e.g, &root), &before), "{sync}");
        drop((root, backing, src));
        e.g.close_all();
        qemu_img(&["check", "-q", &t]);
    }
}

#[test]
fn mirror_checks_its_arguments() {
    let mut e = env("raw", false);
    let t = e.path("t.raw");
    let bad = |g: Value| qapi_types::DriveMirror::from_qmp_strict(g).unwrap();
    let a = bad(json!({"device": "disk0", "target": t, "sync": "full", "granularity": 1000}));
    let err = crate::mirror::drive_mirror(&mut e.g, &e.jobs, &a).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Parameter 'granularity' expects a power of 2"
    );
    let a = bad(json!({"device": "disk0", "target": t, "sync": "full", "granularity": 256}));
    let err = crate::mirror::drive_mirror(&mut e.g, &e.jobs, &a).unwrap_err();
    assert!(err.to_string().contains("[512B, 64MB]"), "{err}");
    let a = bad(json!({"device": "disk0", "target": t, "sync": "incremental"}));
    let err = crate::mirror::drive_mirror(&mut e.g, &e.jobs, &a).unwrap_err();
    assert_eq!(err.to_string(), "Sync mode 'incremental' not supported");
    let a = bad(json!({"device": "nope", "target": t, "sync": "full"}));
    assert!(crate::mirror::drive_mirror(&mut e.g, &e.jobs, &a).is_err());
    assert_eq!(
        crate::mirror::default_granularity(&e.g.find_node("src").unwrap()),
        65536
    );
}

fn blockdev_backup(e: &mut Env, target: &str, sync: &str, bitmap: Option<&str>) {
    let mut v = json!({"device": "disk0", "target": target, "sync": sync, "job-id": "b0"});
    if let Some(b) = bitmap {
        v["bitmap"] = json!(b);
    }
    let job = create_backup(e, v);
    e.jobs.start(&job);
}

fn create_backup(e: &mut Env, args: Value) -> Arc<crate::Job> {
    let a = qapi_types::BlockdevBackup::from_qmp_strict(args).unwrap();
    crate::backup::blockdev_backup(&mut e.g, &e.jobs, &a, None).unwrap()
}

/// Starts `job` and waits until it is gone.
fn run_to_end(e: &mut Env, job: &Arc<crate::Job>) {
    e.jobs.start(job);
    let st = e
        .jobs
        .wait_finished(&mut e.g, job.id(), Duration::from_secs(30));
    assert_eq!(st, Some(JobStatus::Null));
}

fn add_target(e: &mut Env, fmt: &str, name: &str) -> String {
    let t = e.path(&format!("{name}.{fmt}"));
    qemu_img(&["create", "-q", "-f", fmt, &t, "4M"]);
    e.g.blockdev_add(&opts(json!({"driver": fmt, "node-name": name,
        "file": {"driver": "file", "filename": t}})))
        .unwrap();
    t
}

#[test]
fn backup_full_keeps_the_point_in_time_view_under_guest_writes() {
    for fmt in ["qcow2", "raw"] {
        let mut e = env(fmt, false);
        let src = e.g.find_node("src").unwrap();
        add_target(&mut e, fmt, "tgt");
        let job = create_backup(
            &mut e,
            json!({"device": "disk0",
            "target": "tgt", "sync": "full", "job-id": "b0", "speed": 8 << 20}),
        );
        // The point in time is the job's creation (the filter is in place from then on).
        let snapshot = read_all(&mut e.g, &src);
        let model = Arc::new(Mutex::new(snapshot.clone()));
        // The job is slow: the guest overwrites data it has not copied yet.
        let w = Writer::start(&e.be, model.clone(), 99);
        e.jobs.start(&job);
        let st = e
            .jobs
            .wait_finished(&mut e.g, "b0", Duration::from_secs(30));
        w.stop();
        assert_eq!(st, Some(JobStatus::Null));
        assert!(events(&e.g).contains(&"BLOCK_JOB_COMPLETED".to_string()));
        let tgt = e.g.find_node("tgt").unwrap();
        assert!(same(&read_all(&mut e.g, &tgt), &snapshot), "{fmt}");
        assert!(same(&read_all(&mut e.g, &src), &model.lock().unwrap()));
        // The filter is gone.
        assert_eq!(e.be.root_node().unwrap().name(), "src");
    }
}

#[test]
fn incremental_backup_copies_the_bitmap_and_resets_it_on_success_only() {
    let mut e = env("qcow2", false);
    let src = e.g.find_node("src").unwrap();
    let bm = Arc::new(DirtyBitmap::new("b", 65536, LEN).unwrap());
    src.add_bitmap(bm.clone()).unwrap();
    e.be.write_buf(2 << 20, &[0x55; 65536], WriteFlags::default())
        .unwrap();
    assert_eq!(bm.count(), 65536);
    let snapshot = read_all(&mut e.g, &src);
    // A failed incremental backup (target too small) is refused before it starts.
    add_target(&mut e, "qcow2", "inc");
    blockdev_backup(&mut e, "inc", "incremental", Some("b"));
    let st = e
        .jobs
        .wait_finished(&mut e.g, "b0", Duration::from_secs(30));
    assert_eq!(st, Some(JobStatus::Null));
    assert_eq!(bm.count(), 0, "reset on success");
    assert!(!bm.is_busy());
    let inc = e.g.find_node("inc").unwrap();
    let t = read_all(&mut e.g, &inc);
    // Only the dirty cluster was copied.
    assert_eq!(
        t[2 << 20..(2 << 20) + 65536],
        snapshot[2 << 20..(2 << 20) + 65536]
    );
    assert!(t[..1 << 20].iter().all(|b| *b == 0));

    // Failure: cancelled with force, the bitmap keeps its bits and the new writes.
    e.be.write_buf(1 << 20, &[0x66; 4096], WriteFlags::default())
        .unwrap();
    add_target(&mut e, "qcow2", "inc2");
    let job = create_backup(
        &mut e,
        json!({"device": "disk0",
        "target": "inc2", "sync": "incremental", "bitmap": "b", "job-id": "b1",
        "speed": 1}),
    );
    assert!(bm.is_busy());
    assert_eq!(bm.count(), 0, "frozen: the job's copy holds the bits");
    e.jobs.start(&job);
    e.be.write_buf(3 << 20, &[0x67; 4096], WriteFlags::default())
        .unwrap();
    e.jobs.cancel(&mut e.g, "b1", true).unwrap();
    let st = e
        .jobs
        .wait_finished(&mut e.g, "b1", Duration::from_secs(30));
    assert_eq!(st, Some(JobStatus::Null));
    assert!(bm.get(1 << 20) && bm.get(3 << 20));
    assert!(!bm.is_busy());
    let ev = events_checked(&e.g, true);
    assert!(ev.contains(&"BLOCK_JOB_CANCELLED".to_string()), "{ev:?}");
}

#[test]
fn backup_top_and_none() {
    let mut e = env("qcow2", true);
    let src = e.g.find_node("src").unwrap();
    let snapshot = read_all(&mut e.g, &src);
    // top: only the top layer's clusters reach the target.
    let t = e.path("top.qcow2");
    let a = qapi_types::DriveBackup::from_qmp_strict(json!({"device": "disk0",
        "target": t, "sync": "top", "job-id": "b0"}))
    .unwrap();
    let job = crate::backup::drive_backup(&mut e.g, &e.jobs, &a, None).unwrap();
    run_to_end(&mut e, &job);
    assert_eq!(own_data(&t), 512 * 1024);
    qemu_img(&["check", "-q", &t]);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-U", &e.path("src.qcow2"), &t])
        .status()
        .unwrap();
    assert!(out.success());

    // none: the guest's overwrites are copied first, then the job waits for a cancel.
    let t = e.path("none.qcow2");
    let a = qapi_types::DriveBackup::from_qmp_strict(json!({"device": "disk0",
        "target": t, "sync": "none", "job-id": "b1"}))
    .unwrap();
    let job = crate::backup::drive_backup(&mut e.g, &e.jobs, &a, None).unwrap();
    e.jobs.start(&job);
    e.be.write_buf(0, &[0x99; 65536], WriteFlags::default())
        .unwrap();
    wait_status(&mut e, "b1", JobStatus::Running);
    e.jobs.cancel(&mut e.g, "b1", false).unwrap();
    assert_eq!(
        e.jobs
            .wait_finished(&mut e.g, "b1", Duration::from_secs(30)),
        Some(JobStatus::Null)
    );
    // The target holds the old data of the overwritten cluster only; through its backing
    // (the source) it would read the new data elsewhere.
    assert_eq!(own_data(&t), 65536);
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0x11 0 64k", &t])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("read 65536/65536"));
    drop(src);
    drop(snapshot);
}

#[test]
fn backup_checks_its_arguments() {
    let mut e = env("qcow2", false);
    add_target(&mut e, "raw", "r");
    let try_backup = |e: &mut Env, v: Value| {
        let a = qapi_types::BlockdevBackup::from_qmp_strict(v).unwrap();
        crate::backup::blockdev_backup(&mut e.g, &e.jobs, &a, None)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        try_backup(
            &mut e,
            json!({"device": "disk0", "target": "r", "sync": "incremental"})
        ),
        "must provide a valid bitmap name for \"incremental\" sync mode"
    );
    assert_eq!(
        try_backup(
            &mut e,
            json!({"device": "disk0", "target": "r", "sync": "full",
            "compress": true})
        ),
        "Compression is not supported for this drive r"
    );
    assert_eq!(
        try_backup(
            &mut e,
            json!({"device": "disk0", "target": "r", "sync": "incremental",
            "bitmap": "x"})
        ),
        "Bitmap 'x' could not be found"
    );
    // Nothing was left behind.
    assert_eq!(e.be.root_node().unwrap().name(), "src");
}

#[test]
fn compressed_backup_to_qcow2() {
    let mut e = env("qcow2", false);
    let t = add_target(&mut e, "qcow2", "c");
    let job = create_backup(
        &mut e,
        json!({"device": "disk0",
        "target": "c", "sync": "full", "compress": true, "job-id": "b0"}),
    );
    run_to_end(&mut e, &job);
    e.g.close_all();
    qemu_img(&["check", "-q", &t]);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", &e.path("src.qcow2"), &t])
        .status()
        .unwrap();
    assert!(out.success());
    let info = qemu_img(&["check", "--output=json", &t]);
    let v: Value = serde_json::from_str(&info).unwrap();
    assert!(v["compressed-clusters"].as_u64().unwrap() > 0, "{info}");
}

fn txn(
    actions: Value,
    grouped: bool,
) -> (
    Vec<qapi_types::TransactionAction>,
    qapi_types::TransactionProperties,
) {
    let acts = actions
        .as_array()
        .unwrap()
        .iter()
        .map(|a| qapi_types::TransactionAction::from_qmp_strict(a.clone()).unwrap())
        .collect();
    let props = qapi_types::TransactionProperties::from_qmp_strict(if grouped {
        json!({"completion-mode": "grouped"})
    } else {
        json!({})
    })
    .unwrap();
    (acts, props)
}

#[test]
fn backup_transaction_actions() {
    let mut e = env("qcow2", false);
    crate::qmp::install_transaction_actions(&mut e.g, &e.jobs);
    add_target(&mut e, "qcow2", "t1");
    let t2 = e.path("t2.qcow2");
    let src = e.g.find_node("src").unwrap();
    let snapshot = read_all(&mut e.g, &src);
    // A failing action undoes the others: no job is left, the filter is gone.
    let (acts, props) = txn(
        json!([
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "t1",
                "sync": "full", "job-id": "j1"}},
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "nope",
                "sync": "full", "job-id": "j2"}}
        ]),
        true,
    );
    assert!(e.g.transaction(&acts, Some(&props)).is_err());
    e.jobs.poll(&mut e.g);
    assert!(e.jobs.find("j1").is_none());
    assert_eq!(e.be.root_node().unwrap().name(), "src");
    // Grouped: both jobs run and complete together.
    let (acts, props) = txn(
        json!([
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "t1",
                "sync": "full", "job-id": "j1"}},
            {"type": "drive-backup", "data": {"device": "src", "target": t2,
                "sync": "full", "job-id": "j2", "format": "qcow2"}}
        ]),
        true,
    );
    let err = e.g.transaction(&acts, Some(&props));
    // Two backups of one device at once are refused (the first job uses the node).
    assert!(err.is_err(), "{err:?}");
    assert!(e.jobs.find("j1").is_none());
    let (acts, props) = txn(
        json!([
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "t1",
                "sync": "full", "job-id": "j1"}}
        ]),
        true,
    );
    e.g.transaction(&acts, Some(&props)).unwrap();
    assert_eq!(
        e.jobs
            .wait_finished(&mut e.g, "j1", Duration::from_secs(30)),
        Some(JobStatus::Null)
    );
    let t1 = e.g.find_node("t1").unwrap();
    assert!(same(&read_all(&mut e.g, &t1), &snapshot));
}

/// A raw target `name` whose first write fails with ENOSPC (blkdebug).
fn failing_target(e: &mut Env, name: &str) -> String {
    let t = e.path(&format!("{name}.raw"));
    qemu_img(&["create", "-q", "-f", "raw", &t, "4M"]);
    e.g.blockdev_add(&opts(json!({"driver": "raw", "node-name": name,
        "file": {"driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 28, "once": true}],
            "image": {"driver": "file", "filename": t}}})))
        .unwrap();
    t
}

#[test]
fn mirror_on_target_error_stop_pauses_and_resume_retries() {
    let mut e = env("qcow2", false);
    failing_target(&mut e, "tgt");
    let a = qapi_types::cmd::BlockdevMirrorArguments::from_qmp_strict(json!({
        "device": "disk0", "target": "tgt", "sync": "full", "job-id": "m0",
        "on-target-error": "stop"}))
    .unwrap();
    crate::mirror::blockdev_mirror(&mut e.g, &e.jobs, &a).unwrap();
    wait_status(&mut e, "m0", JobStatus::Paused);
    let ev = e.g.take_events();
    let err = ev.iter().find(|x| x.event == "BLOCK_JOB_ERROR").unwrap();
    let d = err.data.as_ref().unwrap();
    assert_eq!(
        (d["action"].as_str(), d["operation"].as_str()),
        (Some("stop"), Some("write"))
    );
    let info = e.jobs.query_block_jobs();
    assert_eq!(info[0].io_status, qapi_types::BlockDeviceIoStatus::Nospace);
    e.jobs.resume("m0").unwrap();
    wait_status(&mut e, "m0", JobStatus::Ready);
    e.jobs.complete("m0").unwrap();
    assert_eq!(
        e.jobs
            .wait_finished(&mut e.g, "m0", Duration::from_secs(30)),
        Some(JobStatus::Null)
    );
    let src = e.g.find_node("src").unwrap();
    let root = e.be.root_node().unwrap();
    assert_eq!(root.name(), "tgt");
    assert!(same(&read_all(&mut e.g, &root), &read_all(&mut e.g, &src)));
}

#[test]
fn failed_incremental_backup_reports_and_keeps_the_bitmap() {
    let mut e = env("qcow2", false);
    let src = e.g.find_node("src").unwrap();
    let bm = Arc::new(DirtyBitmap::new("b", 65536, LEN).unwrap());
    src.add_bitmap(bm.clone()).unwrap();
    e.be.write_buf(1 << 20, &[0x55; 8192], WriteFlags::default())
        .unwrap();
    let before = bm.snapshot_bits();
    failing_target(&mut e, "tgt");
    let job = create_backup(
        &mut e,
        json!({"device": "disk0",
        "target": "tgt", "sync": "incremental", "bitmap": "b", "job-id": "b0"}),
    );
    run_to_end(&mut e, &job);
    let ev = e.g.take_events();
    let done = ev
        .iter()
        .find(|x| x.event == "BLOCK_JOB_COMPLETED")
        .unwrap();
    assert_eq!(
        done.data.as_ref().unwrap()["error"],
        "No space left on device",
        "{:?}",
        done.data
    );
    let err = ev.iter().find(|x| x.event == "BLOCK_JOB_ERROR").unwrap();
    assert_eq!(err.data.as_ref().unwrap()["action"], "report");
    assert_eq!(bm.snapshot_bits(), before, "the bitmap keeps its bits");
    assert!(!bm.is_busy());
    assert_eq!(e.be.root_node().unwrap().name(), "src");
}

#[test]
fn a_drained_section_pauses_the_job_until_it_ends() {
    let mut e = env("qcow2", false);
    let t = e.path("t.qcow2");
    e.be.write_buf(0, &vec![0x5a; LEN as usize], WriteFlags::default())
        .unwrap();
    // 64 KiB/s: the 4 MiB of data take a minute, so the job is still copying.
    let a = qapi_types::DriveMirror::from_qmp_strict(json!({
        "device": "disk0", "target": t, "format": "qcow2", "sync": "full",
        "job-id": "m0", "speed": 65_536}))
    .unwrap();
    let job = crate::mirror::drive_mirror(&mut e.g, &e.jobs, &a).unwrap();
    assert_eq!(job.status(), JobStatus::Running);
    std::thread::sleep(Duration::from_millis(50));
    let src = e.g.find_node("src").unwrap();
    let drained = e.g.drain(std::slice::from_ref(&src));
    let end = Instant::now() + Duration::from_secs(30);
    while job.status() != JobStatus::Paused {
        assert!(Instant::now() < end, "not paused: {:?}", job.status());
        std::thread::sleep(Duration::from_millis(1));
    }
    // No request of the job while drained: its progress stands still.
    let at = job.progress().0;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(job.progress().0, at);
    assert_eq!(job.status(), JobStatus::Paused);
    drop(drained);
    e.jobs.set_speed(&job, 0).unwrap();
    wait_status(&mut e, "m0", JobStatus::Ready);
    assert!(job.progress().0 > at);
    let changes: Vec<String> =
        e.g.take_events()
            .into_iter()
            .filter(|ev| ev.event == "JOB_STATUS_CHANGE")
            .filter_map(|ev| Some(ev.data?["status"].as_str()?.to_string()))
            .collect();
    assert_eq!(
        changes,
        ["created", "running", "paused", "running", "ready"],
        "QEMU's sequence for a job drained while running"
    );
    e.jobs.cancel(&mut e.g, "m0", false).unwrap();
    let st = e
        .jobs
        .wait_finished(&mut e.g, "m0", Duration::from_secs(30));
    assert_eq!(st, Some(JobStatus::Null));
}
