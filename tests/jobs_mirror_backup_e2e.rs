//! End to end: drive-mirror, blockdev-mirror, drive-backup and blockdev-backup through QMP
//! on a real socket of `vmm-reference --no-guest`, with the images judged by `qemu-img
//! compare` and `qemu-img check`: commands, events, query-block after a pivot, transactions,
//! incremental chains restored. With KVM, the embedded guest writes (pass after pass of
//! known patterns) during a mirror, which then pivots the guest to the target (whose content
//! must be exactly a state of the guest's passes), and during a backup, which must equal a
//! copy of the disk taken while the guest was stopped at the backup's start.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{run, Raw, Vmm};
use serde_json::{json, Value};

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-img compare` of two images (formats probed), true when identical.
fn identical(a: &str, b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-U", a, b])
        .status()
        .expect("qemu-img")
        .success()
}

/// A QMP client that keeps the events it reads while waiting for replies.
struct Client {
    raw: Raw,
    events: Vec<Value>,
}

impl Client {
    fn new(vmm: &Vmm) -> Client {
        // The socket file appears at bind(), a moment before listen(): under load a first
        // connect can be refused.
        let end = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&vmm.sock).is_err() {
            assert!(
                Instant::now() < end,
                "the monitor never accepted a connection"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Client {
            raw: vmm.negotiated(),
            events: Vec::new(),
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let mut req = json!({"execute": name});
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.raw.send(&format!("{req}\n"));
        loop {
            let v = self.raw.recv();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return v;
        }
    }

    fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args.clone());
        assert!(r.get("return").is_some(), "{name} {args}: {r}");
        r["return"].clone()
    }

    fn err(&mut self, name: &str, args: Value) -> String {
        let r = self.cmd(name, args.clone());
        r["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} {args} succeeded: {r}"))
            .to_string()
    }

    /// Waits for the event `name` (for job `id`), returns its data.
    fn wait_event(&mut self, name: &str, id: &str) -> Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && e["data"]["device"] == id)
            {
                return self.events.remove(i)["data"].clone();
            }
            assert!(
                Instant::now() < end,
                "no {name} for {id}: {:?}",
                self.events
            );
            let v = self.raw.recv();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    fn jobs(&mut self) -> Vec<Value> {
        self.ok("query-block-jobs", Value::Null)
            .as_array()
            .unwrap()
            .clone()
    }

    /// The file of device `dev` as query-block reports it.
    fn device_file(&mut self, dev: &str) -> String {
        let blocks = self.ok("query-block", Value::Null);
        let b = blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == dev)
            .unwrap_or_else(|| panic!("no device {dev}: {blocks}"))
            .clone();
        b["inserted"]["file"].as_str().unwrap().to_string()
    }
}

struct Setup {
    vmm: Vmm,
    c: Client,
    dir: tempfile::TempDir,
}

impl Setup {
    fn path(&self, n: &str) -> String {
        self.dir.path().join(n).to_str().unwrap().to_string()
    }
}

/// A daemon with device `disk0` on `src.<fmt>` (for qcow2 with `chain`: over
/// `base.qcow2`), holding data in every layer.
fn setup(fmt: &str, chain: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let src = p(&format!("src.{fmt}"));
    if chain {
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "4M"]);
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 0 2M", &p("base.qcow2")],
        );
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
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x22 1M 512k", &src],
        );
    } else {
        qemu_img(&["create", "-q", "-f", fmt, &src, "4M"]);
        run("qemu-io", &["-f", fmt, "-c", "write -P 0x33 0 1M", &src]);
        run("qemu-io", &["-f", fmt, "-c", "write -P 0x44 3M 64k", &src]);
    }
    let vmm = Vmm::start(&[]);
    let mut c = Client::new(&vmm);
    c.ok(
        "blockdev-add",
        json!({"driver": fmt, "id": "disk0", "node-name": "src",
               "file": {"driver": "file", "filename": src}}),
    );
    Setup { vmm, c, dir }
}

fn quit(mut s: Setup) -> tempfile::TempDir {
    s.c.ok("quit", Value::Null);
    s.vmm.wait_exit(Duration::from_secs(20));
    s.dir
}

#[test]
fn drive_mirror_each_sync_mode_to_ready_then_complete() {
    for (fmt, chain, sync) in [
        ("qcow2", false, "full"),
        ("raw", false, "full"),
        ("qcow2", true, "top"),
        ("qcow2", true, "none"),
    ] {
        let mut s = setup(fmt, chain);
        let t = s.path(&format!("t-{sync}.{fmt}"));
        s.c.ok(
            "drive-mirror",
            json!({"device": "disk0", "target": t, "sync": sync, "format": fmt}),
        );
        let ready = s.c.wait_event("BLOCK_JOB_READY", "disk0");
        assert_eq!(ready["type"], "mirror");
        assert_eq!(ready["len"], ready["offset"], "{ready}");
        let jobs = s.c.jobs();
        assert_eq!(jobs[0]["ready"], true, "{jobs:?}");
        assert_eq!(jobs[0]["type"], "mirror");
        s.c.ok("block-job-complete", json!({"device": "disk0"}));
        let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "disk0");
        assert!(done.get("error").is_none(), "{done}");
        // The device uses the target now.
        assert_eq!(s.c.device_file("disk0"), t, "{fmt} {sync}");
        let src = s.path(&format!("src.{fmt}"));
        let dir = quit(s);
        if fmt == "qcow2" {
            qemu_img(&["check", "-q", &t]);
        }
        assert!(identical(&src, &t), "{fmt} {sync}");
        if sync != "full" {
            // The new image records its backing file (QEMU's absolute-paths mode).
            let info = qemu_img(&["info", "-U", "--output=json", &t]);
            assert!(info.contains("backing-filename"), "{info}");
        }
        drop(dir);
    }
}

#[test]
fn blockdev_mirror_cancel_after_ready_keeps_the_source() {
    let mut s = setup("qcow2", false);
    let t = s.path("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &t, "4M"]);
    s.c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt",
               "file": {"driver": "file", "filename": t}}),
    );
    // Argument errors, in QEMU's words.
    let e = s.c.err(
        "blockdev-mirror",
        json!({"device": "disk0", "target": "tgt", "sync": "full", "granularity": 3000}),
    );
    assert_eq!(e, "Parameter 'granularity' expects a power of 2");
    let e = s.c.err(
        "blockdev-mirror",
        json!({"device": "disk0", "target": "src", "sync": "full"}),
    );
    assert_eq!(e, "Can't mirror node into itself");
    s.c.ok(
        "blockdev-mirror",
        json!({"device": "disk0", "target": "tgt", "sync": "full", "job-id": "m1",
               "granularity": 65536, "buf-size": 1048576}),
    );
    s.c.wait_event("BLOCK_JOB_READY", "m1");
    s.c.ok("block-job-cancel", json!({"device": "m1"}));
    // Cancelled after READY: completed, without the switch.
    let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "m1");
    assert!(done.get("error").is_none(), "{done}");
    let src = s.path("src.qcow2");
    assert_eq!(s.c.device_file("disk0"), src);
    assert!(s.c.jobs().is_empty());
    let _dir = quit(s);
    qemu_img(&["check", "-q", &t]);
    assert!(identical(&src, &t));
}

#[test]
fn drive_backup_full_top_none_on_qcow2_and_raw() {
    for (fmt, chain, sync) in [
        ("qcow2", false, "full"),
        ("raw", false, "full"),
        ("qcow2", true, "top"),
        ("qcow2", true, "none"),
    ] {
        let mut s = setup(fmt, chain);
        let t = s.path(&format!("b-{sync}.{fmt}"));
        s.c.ok(
            "drive-backup",
            json!({"device": "disk0", "target": t, "sync": sync, "format": fmt,
                   "job-id": "b0"}),
        );
        if sync == "none" {
            // Runs until cancelled (nothing is written here).
            assert_eq!(s.c.jobs()[0]["type"], "backup");
            s.c.ok("block-job-cancel", json!({"device": "b0"}));
            let ev = s.c.wait_event("BLOCK_JOB_CANCELLED", "b0");
            assert_eq!(ev["type"], "backup");
        } else {
            let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "b0");
            assert!(done.get("error").is_none(), "{done}");
            assert_eq!(done["len"], done["offset"], "{done}");
        }
        // The device is back on its own node (the filter is gone).
        let src = s.path(&format!("src.{fmt}"));
        assert_eq!(s.c.device_file("disk0"), src);
        let _dir = quit(s);
        if fmt == "qcow2" {
            qemu_img(&["check", "-q", &t]);
        }
        // full and top (with its backing chain) and none (backed by the unchanged
        // source) all read as the source.
        assert!(identical(&src, &t), "{fmt} {sync}");
    }
}

#[test]
fn incremental_backup_chain_restores_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let src = p("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &src, "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x31 0 1M", &src],
    );
    let session = |f: &dyn Fn(&mut Client)| {
        let mut vmm = Vmm::start(&[]);
        let mut c = Client::new(&vmm);
        c.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "id": "disk0", "node-name": "src",
                   "file": {"driver": "file", "filename": src}}),
        );
        f(&mut c);
        c.ok("quit", Value::Null);
        vmm.wait_exit(Duration::from_secs(20));
    };
    // Full backup and a persistent bitmap in one transaction.
    let full = p("full.qcow2");
    session(&|c| {
        c.ok(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0",
                    "persistent": true, "granularity": 65536}},
                {"type": "drive-backup", "data": {"device": "disk0", "target": full,
                    "sync": "full", "format": "qcow2", "job-id": "full"}}
            ]}),
        );
        c.wait_event("BLOCK_JOB_COMPLETED", "full");
    });
    // The guest writes (qemu-io updates the persistent bitmap as QEMU's block layer does).
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x32 512k 64k", &src],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 2M 128k", &src],
    );
    let inc1 = p("inc1.qcow2");
    session(&|c| {
        let e = c.err(
            "drive-backup",
            json!({"device": "disk0", "target": inc1, "sync": "incremental",
                   "format": "qcow2"}),
        );
        assert_eq!(
            e,
            "must provide a valid bitmap name for \"incremental\" sync mode"
        );
        c.ok(
            "drive-backup",
            json!({"device": "disk0", "target": inc1, "sync": "incremental",
                   "bitmap": "b0", "format": "qcow2", "job-id": "inc1"}),
        );
        let done = c.wait_event("BLOCK_JOB_COMPLETED", "inc1");
        assert!(done.get("error").is_none(), "{done}");
        // Reset on success.
        let blocks = c.ok("query-block", Value::Null);
        let bm = &blocks[0]["dirty-bitmaps"][0];
        assert_eq!(bm["name"], "b0", "{blocks}");
        assert_eq!(bm["count"], 0, "{blocks}");
    });
    qemu_img(&["check", "-q", &inc1]);
    // Only the two dirty ranges were copied.
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "qcow2", &inc1])).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["data"] == true)
        .map(|x| x["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 64 * 1024 + 128 * 1024, "{map}");
    // The chain full <- inc1 restores the image.
    qemu_img(&["rebase", "-q", "-u", "-b", &full, "-F", "qcow2", &inc1]);
    assert!(identical(&src, &inc1));
    assert!(!identical(&src, &full));
}

#[test]
fn grouped_backup_transaction_and_blockdev_backup_errors() {
    let mut s = setup("qcow2", false);
    let (t1, t2) = (s.path("g1.qcow2"), s.path("g2.raw"));
    qemu_img(&["create", "-q", "-f", "qcow2", &t1, "4M"]);
    qemu_img(&["create", "-q", "-f", "raw", &t2, "4M"]);
    s.c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "g1",
               "file": {"driver": "file", "filename": t1}}),
    );
    s.c.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "g2",
               "file": {"driver": "file", "filename": t2}}),
    );
    let e = s.c.err(
        "blockdev-backup",
        json!({"device": "disk0", "target": "g2", "sync": "full", "compress": true}),
    );
    assert_eq!(e, "Compression is not supported for this drive g2");
    let e = s.c.err(
        "blockdev-backup",
        json!({"device": "disk0", "target": "g1", "sync": "incremental", "bitmap": "x"}),
    );
    assert_eq!(e, "Bitmap 'x' could not be found");
    // A failing action: nothing happens.
    let r = s.c.cmd(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "g1",
                "sync": "full", "job-id": "j1"}},
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "nope",
                "sync": "full", "job-id": "j2"}}],
            "properties": {"completion-mode": "grouped"}}),
    );
    assert!(r.get("error").is_some(), "{r}");
    assert!(s.c.jobs().is_empty());
    // Compressed backup in a grouped transaction.
    s.c.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "g1",
                "sync": "full", "job-id": "j1", "compress": true}}],
            "properties": {"completion-mode": "grouped"}}),
    );
    let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "j1");
    assert!(done.get("error").is_none(), "{done}");
    let src = s.path("src.qcow2");
    let _dir = quit(s);
    qemu_img(&["check", "-q", &t1]);
    assert!(identical(&src, &t1));
    let check: Value = serde_json::from_str(&qemu_img(&["check", "--output=json", &t1])).unwrap();
    assert!(
        check["compressed-clusters"].as_u64().unwrap_or(0) > 0,
        "{check}"
    );
}

// ---- with the embedded guest writing ------------------------------------------------------

const GUEST_DISK_CHUNKS: usize = 512; // the guest's 2 MiB disk in 4 KiB chunks

/// A guest (KVM) writing pass after pass over its 2 MiB virtio-blk disk on `src.qcow2`
/// (node `disk0`), its console on ringbuf `con`, after its first pass.
fn guest_setup() -> (Setup, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2").to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &src, "2M"]);
    let vmm = Vmm::start_guest_with_disk(&src, "virtio-blk,drive=disk0,id=vd0");
    let c = Client::new(&vmm);
    let mut s = Setup { vmm, c, dir };
    let mut out = String::new();
    console_until(&mut s.c, &mut out, "pass 1 done");
    (s, out)
}

/// Reads the guest's console until `text` appears, failing on a reported mismatch.
fn console_until(c: &mut Client, out: &mut String, text: &str) {
    let end = Instant::now() + Duration::from_secs(120);
    while !out.contains(text) {
        let r = c.ok("ringbuf-read", json!({"device": "con", "size": 65536}));
        out.push_str(r.as_str().unwrap_or_default());
        assert!(
            !out.contains("MISMATCH") && !out.contains("I/O error"),
            "{out}"
        );
        assert!(Instant::now() < end, "{text:?} not in 120 s:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Passes the guest has finished according to its console.
fn passes_done(out: &str) -> usize {
    out.matches(" done, checksum").count()
}

/// The whole guest-visible content of `img` (qcow2), read by `qemu-img convert`.
fn contents(img: &str, scratch: &std::path::Path) -> Vec<u8> {
    let raw = scratch.join("contents.raw");
    let raw = raw.to_str().unwrap();
    qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", img, raw]);
    let data = std::fs::read(raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

/// Checks that `data` is a state the guest's disk went through: every 4 KiB chunk `i`
/// filled with `(i + pass) & 0xff`, chunks `0..k` from some pass `p + 1` and the rest
/// from pass `p` (the guest writes its chunks in order). Returns `(p, k)`.
fn guest_state(data: &[u8]) -> (usize, usize) {
    assert_eq!(data.len(), GUEST_DISK_CHUNKS * 4096);
    let pass_of = |i: usize| -> usize {
        let c = &data[i * 4096..(i + 1) * 4096];
        assert!(
            c.iter().all(|&b| b == c[0]),
            "chunk {i} is not one pattern: a torn write"
        );
        (c[0] as usize + 256 - i % 256) % 256
    };
    let last = pass_of(GUEST_DISK_CHUNKS - 1);
    let first = pass_of(0);
    let k = (0..GUEST_DISK_CHUNKS)
        .find(|&i| pass_of(i) != first)
        .unwrap_or(GUEST_DISK_CHUNKS);
    for i in 0..GUEST_DISK_CHUNKS {
        let want = if i < k { first } else { last };
        assert_eq!(
            pass_of(i),
            want,
            "chunk {i}: not one point of the guest's passes"
        );
    }
    if k < GUEST_DISK_CHUNKS {
        assert_eq!(
            first,
            (last + 1) % 256,
            "chunks 0..{k} are not the next pass"
        );
        (last, k)
    } else {
        (first, 0)
    }
}

#[test]
fn mirror_while_the_guest_writes_then_pivot() {
    if !common::kvm_usable("mirror_while_the_guest_writes_then_pivot") {
        return;
    }
    let (mut s, mut out) = guest_setup();
    let t = s.path("t.qcow2");
    // Slow enough that the guest rewrites chunks the job has already copied.
    s.c.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": t, "sync": "full", "format": "qcow2",
               "job-id": "gm", "speed": 8 << 20}),
    );
    let before = passes_done(&out);
    s.c.wait_event("BLOCK_JOB_READY", "gm");
    // The guest keeps writing while the job is ready (writes mirrored to both).
    console_until(&mut s.c, &mut out, &format!("pass {} done", before + 2));
    assert!(
        passes_done(&out) > before,
        "the guest wrote nothing during the copy"
    );
    s.c.ok("block-job-complete", json!({"device": "gm"}));
    let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "gm");
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(s.c.device_file("vd0"), t);
    // A whole pass after the pivot, written to the target and read back from it.
    let pivot = passes_done(&out);
    console_until(&mut s.c, &mut out, &format!("pass {} done", pivot + 2));
    s.c.ok("stop", Value::Null);
    std::thread::sleep(Duration::from_millis(200));
    let r =
        s.c.ok("ringbuf-read", json!({"device": "con", "size": 65536}));
    out.push_str(r.as_str().unwrap_or_default());
    assert!(!out.contains("MISMATCH"), "{out}");
    let passes = passes_done(&out);
    let src = s.path("src.qcow2");
    let dir = quit(s);
    qemu_img(&["check", "-q", &t]);
    // The target holds exactly what the guest wrote: its last finished pass, and
    // possibly part of the next one.
    let (p, k) = guest_state(&contents(&t, dir.path()));
    assert!(
        p == passes % 256 || (p == (passes + 1) % 256 && k == 0),
        "target holds pass {p} (+{k} chunks), the guest finished {passes}"
    );
    // The source stopped at the pivot: it is behind the target.
    qemu_img(&["check", "-q", &src]);
    assert!(!identical(&src, &t));
}

#[test]
fn backup_while_the_guest_writes_is_point_in_time() {
    if !common::kvm_usable("backup_while_the_guest_writes_is_point_in_time") {
        return;
    }
    let (mut s, mut out) = guest_setup();
    // A copy of the stopped guest's disk, made while nothing writes.
    s.c.ok("stop", Value::Null);
    std::thread::sleep(Duration::from_millis(100));
    let (still, pit) = (s.path("still.qcow2"), s.path("pit.qcow2"));
    s.c.ok(
        "drive-backup",
        json!({"device": "disk0", "target": still, "sync": "full", "format": "qcow2",
               "job-id": "still"}),
    );
    let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "still");
    assert!(done.get("error").is_none(), "{done}");
    // The backup under test starts at the same point, and the guest writes through it.
    s.c.ok(
        "transaction",
        json!({"actions": [{"type": "drive-backup", "data": {"device": "disk0",
            "target": pit, "sync": "full", "format": "qcow2", "job-id": "pit",
            "speed": 1 << 20}}]}),
    );
    let before = passes_done(&out);
    s.c.ok("cont", Value::Null);
    let done = s.c.wait_event("BLOCK_JOB_COMPLETED", "pit");
    assert!(done.get("error").is_none(), "{done}");
    console_until(&mut s.c, &mut out, &format!("pass {} done", before + 1));
    s.c.ok("stop", Value::Null);
    let src = s.path("src.qcow2");
    let dir = quit(s);
    for img in [&still, &pit, &src] {
        qemu_img(&["check", "-q", img]);
    }
    // The stopped state is a state of the guest's passes, the backup is exactly it,
    // and the guest has moved on since.
    let (p, k) = guest_state(&contents(&still, dir.path()));
    assert!(p >= 1 && p + 1 >= before, "pass {p} (+{k}) before {before}");
    assert!(
        identical(&still, &pit),
        "the backup is not the point in time"
    );
    assert!(
        !identical(&src, &pit),
        "the guest wrote nothing during the backup"
    );
}

/// A mirror of node `src` (32 MiB of data) to node `tgt` at 1 MiB/s over `raw`, then the
/// commands QEMU's op blockers refuse on the job's nodes: their errors.
fn refused_during_a_mirror(raw: Raw, dir: &std::path::Path) -> Vec<String> {
    let mut c = common::JobClient::new(raw);
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
               "speed": 1 << 20}),
    );
    c.wait_status("m0", "running");
    let snap = dir.join("snap.qcow2");
    let errors = vec![
        c.err(
            "blockdev-snapshot-sync",
            json!({"node-name": "src", "snapshot-file": snap.to_str().unwrap(),
                   "snapshot-node-name": "snap", "format": "qcow2"}),
        ),
        c.err("blockdev-del", json!({"node-name": "tgt"})),
    ];
    c.ok("block-job-cancel", json!({"device": "m0", "force": true}));
    c.wait_status("m0", "null");
    // Once the job is gone, the snapshot is allowed.
    c.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "src", "snapshot-file": snap.to_str().unwrap(),
               "snapshot-node-name": "snap", "format": "qcow2"}),
    );
    let _ = c.cmd("quit", json!({}));
    errors
}

#[test]
fn a_running_jobs_nodes_refuse_changes_as_qemu_storage_daemon_does() {
    let ours = tempfile::tempdir().unwrap();
    let vmm = common::start_listening(&common::qcow2_node_args(ours.path(), &["src", "tgt"], 1));
    let mine = refused_during_a_mirror(vmm.negotiated(), ours.path());
    let theirs = tempfile::tempdir().unwrap();
    let args = common::qcow2_node_args(theirs.path(), &["src", "tgt"], 1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qsd = common::Qsd::start(&args);
    let qemu = refused_during_a_mirror(qsd.negotiated(), theirs.path());
    assert_eq!(
        mine,
        [
            "Node 'src' is busy: block device is in use by block job: mirror",
            "Node tgt is in use"
        ]
    );
    assert_eq!(mine, qemu);
}
