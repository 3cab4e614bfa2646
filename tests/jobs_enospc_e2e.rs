//! End to end: the block jobs' error policies against a really full target filesystem (a
//! small tmpfs, mounted for the test and filled with a filler file), through QMP on a real
//! socket of `vmm-reference --no-guest`. Every scenario runs on our daemon and on
//! qemu-storage-daemon 7.2 with the same images, and the job's events (consecutive
//! duplicates folded: how many in-flight requests fail at once is timing) and
//! `query-block-jobs` while paused must be the same; the images are judged by `qemu-img
//! check` and `qemu-img compare` afterwards.
//!
//! Mounting needs root: where it is not permitted, each test says "skipped" and returns.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Qsd, Vmm};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// The tmpfs's size and what its filler leaves free: less than a 4 MiB source needs.
const TMPFS_MIB: u64 = 6;
const FREE_KIB: u64 = 1536;

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().expect(prog);
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img compare` of two images (formats probed), true when identical.
fn identical(a: &str, b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-U", a, b])
        .status()
        .expect("qemu-img")
        .success()
}

/// `qemu-img check` of an image a job wrote while the filesystem was full: no corruption
/// and no check error. Leaked clusters are allowed (QEMU 7.2 leaks them too when a data
/// write fails with ENOSPC after its cluster was allocated: they waste space, nothing
/// more, and `qemu-img check -r leaks` reclaims them); returns how many.
fn check(img: &str) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json", img])
        .output()
        .expect("qemu-img");
    // 0: clean, 3: leaks only; 2 (corruption) and 1 (check failed) are errors.
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {img}: {code:?} {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    assert_eq!(
        v.get("corruptions").map_or(0, |c| c.as_u64().unwrap()),
        0,
        "{v}"
    );
    assert_eq!(
        v.get("check-errors").map_or(0, |c| c.as_u64().unwrap()),
        0,
        "{v}"
    );
    v.get("leaks").map_or(0, |c| c.as_u64().unwrap())
}

/// A size-limited tmpfs mounted on a private directory, unmounted on drop (even when the
/// test panics).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it, or says why the test is skipped.
    fn mount(test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}M"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "{test}: skipped: cannot mount a tmpfs ({})",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                );
                None
            }
            Err(e) => {
                eprintln!("{test}: skipped: cannot mount a tmpfs ({e})");
                None
            }
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Fills the filesystem but for `FREE_KIB` (what is there stays).
    fn fill(&self) {
        let st = free_bytes(self.dir.path());
        let want_free = FREE_KIB * 1024;
        assert!(st > want_free, "the tmpfs has only {st} bytes free");
        std::fs::write(self.path("filler"), vec![0xffu8; (st - want_free) as usize])
            .expect("filler");
    }

    /// Frees the space again.
    fn free(&self) {
        std::fs::remove_file(self.path("filler")).expect("remove the filler");
    }

    /// Removes everything but the filler.
    fn clear(&self) {
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "filler" {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Something still holds a file open (a daemon being killed): detach it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let out = run("stat", &["-f", "-c", "%a %S", path.to_str().unwrap()]);
    let mut it = out.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

/// The shared job client, with this file's helpers.
type Client = common::JobClient;

impl Client {
    /// The data of the next block job event `name` of job `id`.
    fn job_data(&mut self, name: &str, id: &str) -> Value {
        self.wait_job_event(name, id)["data"].clone()
    }

    /// The job events of `id` as short strings, consecutive duplicates folded.
    fn job_events(&self, id: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in &self.log {
            let d = &e["data"];
            if d["id"] != id && d["device"] != id {
                continue;
            }
            let s = match e["event"].as_str().unwrap() {
                "JOB_STATUS_CHANGE" => format!("status:{}", d["status"].as_str().unwrap()),
                "BLOCK_JOB_ERROR" => format!(
                    "ERROR:{}:{}",
                    d["operation"].as_str().unwrap(),
                    d["action"].as_str().unwrap()
                ),
                "BLOCK_JOB_COMPLETED" => match d["error"].as_str() {
                    Some(err) => format!("COMPLETED:{err}"),
                    None => "COMPLETED".to_string(),
                },
                n => n.to_string(),
            };
            if out.last() != Some(&s) {
                out.push(s);
            }
        }
        out
    }

    fn jobs(&mut self) -> Vec<Value> {
        self.ok("query-block-jobs", json!({}))
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits until query-block-jobs shows job `id` paused by its error (the pause takes
    /// effect once the requests in flight are done); returns that entry.
    fn wait_paused(&mut self, id: &str) -> Value {
        self.wait_status(id, "paused");
        let j = self
            .jobs()
            .into_iter()
            .find(|j| j["device"] == id)
            .unwrap_or_else(|| panic!("no job {id}"));
        assert_eq!(j["status"], "paused", "{j}");
        assert_eq!(j["paused"], true, "{j}");
        assert_eq!(j["io-status"], "nospace", "{j}");
        j
    }

    /// Bitmap `name` as query-named-block-nodes reports it.
    fn bitmap(&mut self, name: &str) -> Value {
        let blocks = self.ok("query-named-block-nodes", json!({}));
        blocks
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no bitmap {name}: {blocks}"))
    }

    /// The dirty count of bitmap `name`.
    fn bitmap_count(&mut self, name: &str) -> u64 {
        self.bitmap(name)["count"].as_u64().unwrap()
    }
}

/// The daemon a scenario runs on.
enum Daemon {
    Ours(Vmm),
    Qemu(Qsd),
}

impl Daemon {
    fn start(qemu: bool, blockdev: &Value) -> (Daemon, Client) {
        let arg = blockdev.to_string();
        let (d, raw) = if qemu {
            let q = Qsd::start(&["--blockdev", &arg]);
            let raw = q.negotiated();
            (Daemon::Qemu(q), raw)
        } else {
            let v = Vmm::start(&["--blockdev", &arg]);
            // The socket appears at bind(), a moment before listen().
            let end = Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(&v.sock).is_err() {
                assert!(Instant::now() < end, "the monitor never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
            let raw = v.negotiated();
            (Daemon::Ours(v), raw)
        };
        (d, Client::new(raw))
    }

    /// Quits (QEMU writes its qcow2 metadata at exit) and waits for the exit.
    fn quit(self, mut c: Client) {
        let _ = c.cmd("quit", json!({}));
        let child = match self {
            Daemon::Ours(mut v) => {
                v.wait_exit(Duration::from_secs(20));
                return;
            }
            Daemon::Qemu(q) => q,
        };
        let mut q = child;
        let end = Instant::now() + Duration::from_secs(20);
        while q.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "qemu-storage-daemon did not quit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn name(qemu: bool) -> &'static str {
    if qemu {
        "qemu-storage-daemon"
    } else {
        "vmm-reference"
    }
}

fn file_node(driver: &str, node: &str, file: &str) -> Value {
    json!({"driver": driver, "node-name": node,
           "file": {"driver": "file", "filename": file}})
}

/// A 4 MiB raw source full of data (two patterns), in a private directory.
fn raw_source() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw").to_str().unwrap().to_string();
    run("qemu-img", &["create", "-q", "-f", "raw", &src, "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 2M",
            "-c",
            "write -P 0xa5 2M 2M",
            &src,
        ],
    );
    (dir, src)
}

/// A mirror to a target on the full tmpfs with on-target-error `policy`; the target is a
/// `fmt` image made by drive-mirror (`drive`) or a node added for blockdev-mirror.
/// Returns the job's events and query-block-jobs while paused (stop, enospc).
fn mirror_scenario(
    qemu: bool,
    fs: &Tmpfs,
    policy: &str,
    fmt: &str,
    drive: bool,
) -> (Vec<String>, Option<Value>) {
    let who = name(qemu);
    let (_d, src) = raw_source();
    let t = fs.path(&format!("t.{fmt}"));
    fs.fill();
    let (daemon, mut c) = Daemon::start(qemu, &file_node("raw", "src", &src));
    if drive {
        c.ok(
            "drive-mirror",
            json!({"device": "src", "job-id": "m", "target": t, "format": fmt,
                   "sync": "full", "on-target-error": policy}),
        );
    } else {
        run("qemu-img", &["create", "-q", "-f", fmt, &t, "4M"]);
        c.ok("blockdev-add", file_node(fmt, "tgt", &t));
        c.ok(
            "blockdev-mirror",
            json!({"device": "src", "job-id": "m", "target": "tgt", "sync": "full",
                   "on-target-error": policy}),
        );
    }
    let err = c.job_data("BLOCK_JOB_ERROR", "m");
    let mut paused = None;
    match policy {
        "stop" | "enospc" => {
            assert_eq!(
                err,
                json!({"device": "m", "operation": "write", "action": "stop"}),
                "{who}"
            );
            paused = Some(c.wait_paused("m"));
            fs.free();
            c.ok("block-job-resume", json!({"device": "m"}));
            assert_eq!(c.jobs()[0]["io-status"], "ok", "{who}: reset on resume");
        }
        "ignore" => {
            assert_eq!(
                err,
                json!({"device": "m", "operation": "write", "action": "ignore"}),
                "{who}"
            );
            // The failed range stays dirty and is tried again and again: the job neither
            // pauses nor gets ready while the filesystem is full.
            c.job_data("BLOCK_JOB_ERROR", "m");
            let j = &c.jobs()[0];
            assert_eq!(j["status"], "running", "{who}: {j}");
            assert_eq!(j["ready"], false, "{who}: {j}");
            assert_eq!(j["io-status"], "ok", "{who}: ignore sets no io-status: {j}");
            fs.free();
        }
        _ => {
            assert_eq!(
                err,
                json!({"device": "m", "operation": "write", "action": "report"}),
                "{who}"
            );
            let done = c.job_data("BLOCK_JOB_COMPLETED", "m");
            assert_eq!(done["error"], "No space left on device", "{who}: {done}");
            c.wait_status("m", "null");
            assert!(c.jobs().is_empty(), "{who}");
            let events = c.job_events("m");
            daemon.quit(c);
            fs.free();
            fs.clear();
            return (events, None);
        }
    }
    c.job_data("BLOCK_JOB_READY", "m");
    c.ok("block-job-complete", json!({"device": "m"}));
    let done = c.job_data("BLOCK_JOB_COMPLETED", "m");
    assert!(done.get("error").is_none(), "{who}: {done}");
    assert_eq!(done["offset"], done["len"], "{who}: {done}");
    c.wait_status("m", "null");
    let events = c.job_events("m");
    daemon.quit(c);
    if fmt == "qcow2" {
        check(&t);
    }
    assert!(identical(&src, &t), "{who} {policy}: the target differs");
    fs.clear();
    (events, paused)
}

/// Fields of a paused job's query-block-jobs entry that both daemons must agree on
/// (the offset depends on how far the copy got before the filesystem filled up).
fn shape(j: &Value) -> Value {
    let mut j = j.clone();
    let o = j.as_object_mut().unwrap();
    assert!(o.remove("offset").unwrap().as_u64().unwrap() < 4 * MIB);
    j
}

#[test]
fn mirror_on_a_full_filesystem_stop_enospc_report_ignore_like_qemu() {
    let Some(fs) = Tmpfs::mount("mirror_on_a_full_filesystem") else {
        return;
    };
    for (policy, fmt, drive) in [
        ("stop", "raw", false),
        ("enospc", "qcow2", true),
        ("report", "raw", true),
        ("ignore", "qcow2", false),
    ] {
        let (ours, our_q) = mirror_scenario(false, &fs, policy, fmt, drive);
        let (qemu, qemu_q) = mirror_scenario(true, &fs, policy, fmt, drive);
        assert_eq!(ours, qemu, "{policy} {fmt}: events");
        assert_eq!(
            our_q.as_ref().map(shape),
            qemu_q.as_ref().map(shape),
            "{policy}: query-block-jobs while paused"
        );
    }
}

/// A full backup to a target on the full tmpfs with on-target-error `policy`.
fn backup_scenario(
    qemu: bool,
    fs: &Tmpfs,
    policy: &str,
    drive: bool,
) -> (Vec<String>, Option<Value>) {
    let who = name(qemu);
    let (_d, src) = raw_source();
    let t = fs.path("b.qcow2");
    if drive {
        fs.fill();
    } else {
        run("qemu-img", &["create", "-q", "-f", "qcow2", &t, "4M"]);
        fs.fill();
    }
    let (daemon, mut c) = Daemon::start(qemu, &file_node("raw", "src", &src));
    if drive {
        // The daemon creates the target on the full filesystem.
        c.ok(
            "drive-backup",
            json!({"device": "src", "job-id": "b", "target": t, "format": "qcow2",
                   "sync": "full", "on-target-error": policy}),
        );
    } else {
        c.ok("blockdev-add", file_node("qcow2", "tgt", &t));
        c.ok(
            "blockdev-backup",
            json!({"device": "src", "job-id": "b", "target": "tgt", "sync": "full",
                   "on-target-error": policy}),
        );
    }
    let err = c.job_data("BLOCK_JOB_ERROR", "b");
    let action = if policy == "enospc" { "stop" } else { policy };
    assert_eq!(
        err,
        json!({"device": "b", "operation": "write", "action": action}),
        "{who}"
    );
    let mut paused = None;
    let done = if action == "ignore" {
        // QEMU's backup_loop starts a new block-copy call at once: the job goes on
        // failing, unpaused, until there is space, then finishes the copy.
        c.job_data("BLOCK_JOB_ERROR", "b");
        let j = &c.jobs()[0];
        assert_eq!(j["status"], "running", "{who}: {j}");
        assert_eq!(j["io-status"], "ok", "{who}: {j}");
        fs.free();
        let done = c.job_data("BLOCK_JOB_COMPLETED", "b");
        assert!(done.get("error").is_none(), "{who}: {done}");
        done
    } else if action == "stop" {
        paused = Some(c.wait_paused("b"));
        fs.free();
        c.ok("block-job-resume", json!({"device": "b"}));
        let done = c.job_data("BLOCK_JOB_COMPLETED", "b");
        assert!(done.get("error").is_none(), "{who}: {done}");
        done
    } else {
        let done = c.job_data("BLOCK_JOB_COMPLETED", "b");
        assert_eq!(done["error"], "No space left on device", "{who}: {done}");
        fs.free();
        done
    };
    c.wait_status("b", "null");
    let events = c.job_events("b");
    daemon.quit(c);
    check(&t);
    assert_eq!(
        identical(&src, &t),
        done.get("error").is_none(),
        "{who} {policy}: a finished backup is the source, a failed one is not"
    );
    fs.clear();
    (events, paused)
}

#[test]
fn backup_on_a_full_filesystem_stop_then_resume_and_report_like_qemu() {
    let Some(fs) = Tmpfs::mount("backup_on_a_full_filesystem") else {
        return;
    };
    for (policy, drive) in [
        ("stop", true),
        ("stop", false),
        ("enospc", false),
        ("report", true),
        ("ignore", false),
    ] {
        let (ours, our_q) = backup_scenario(false, &fs, policy, drive);
        let (mut qemu, qemu_q) = backup_scenario(true, &fs, policy, drive);
        // QEMU starts drive-/blockdev-backup (transaction actions) inside the action's drained
        // section: its job pauses at its first yield and resumes when the drain ends.
        // Ours starts after the graph change, with nothing to drain.
        assert_eq!(
            qemu[..4],
            [
                "status:created",
                "status:running",
                "status:paused",
                "status:running"
            ],
            "{policy}: {qemu:?}"
        );
        qemu.drain(2..4);
        assert_eq!(ours, qemu, "{policy}: events");
        assert_eq!(
            our_q.as_ref().map(shape),
            qemu_q.as_ref().map(shape),
            "{policy}: query-block-jobs while paused"
        );
    }
}

#[test]
fn incremental_backup_failing_on_a_full_filesystem_keeps_its_bitmap() {
    let Some(fs) = Tmpfs::mount("incremental_backup_failing_on_a_full_filesystem") else {
        return;
    };
    for policy in ["report", "stop"] {
        let ours = incremental_scenario(false, &fs, policy);
        let mut qemu = incremental_scenario(true, &fs, policy);
        // QEMU's transaction drain at the start (see the full backup test).
        assert_eq!(qemu[2..4], ["status:paused", "status:running"], "{qemu:?}");
        qemu.drain(2..4);
        assert_eq!(ours, qemu, "{policy}: events");
    }
}

/// An incremental backup of 3 MiB dirty in a persistent bitmap to a target on the full
/// tmpfs: the bitmap is kept while the job is failed or paused, reset once it succeeds.
fn incremental_scenario(qemu: bool, fs: &Tmpfs, policy: &str) -> Vec<String> {
    let who = name(qemu);
    // A persistent bitmap that qemu-io's writes mark.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2").to_str().unwrap().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &src, "4M"]);
    run("qemu-img", &["bitmap", "--add", &src, "b0"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x61 0 3M", &src],
    );
    let (daemon, mut c) = Daemon::start(qemu, &file_node("qcow2", "src", &src));
    assert_eq!(c.bitmap_count("b0"), 3 * MIB, "{who}");
    let t = fs.path("inc.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &t, "4M"]);
    c.ok("blockdev-add", file_node("qcow2", "tgt", &t));
    fs.fill();
    c.ok(
        "blockdev-backup",
        json!({"device": "src", "job-id": "i", "target": "tgt", "sync": "incremental",
               "bitmap": "b0", "on-target-error": policy}),
    );
    if policy == "stop" {
        let err = c.job_data("BLOCK_JOB_ERROR", "i");
        assert_eq!(err["action"], "stop", "{who}: {err}");
        c.wait_paused("i");
        // Busy while the job holds it. (Its count differs meanwhile: QEMU's stays frozen
        // at 3 MiB, its successor taking new writes; ours moves the bits into the job and
        // counts only new writes until the job ends.)
        assert_eq!(c.bitmap("b0")["busy"], true, "{who}: busy while paused");
        fs.free();
        c.ok("block-job-resume", json!({"device": "i"}));
        let done = c.job_data("BLOCK_JOB_COMPLETED", "i");
        assert!(done.get("error").is_none(), "{who}: {done}");
        c.wait_status("i", "null");
    } else {
        let done = c.job_data("BLOCK_JOB_COMPLETED", "i");
        assert_eq!(done["error"], "No space left on device", "{who}: {done}");
        c.wait_status("i", "null");
        // Kept on failure: the next incremental backup copies everything again.
        assert_eq!(c.bitmap_count("b0"), 3 * MIB, "{who}: kept on failure");
        fs.free();
        c.ok(
            "blockdev-backup",
            json!({"device": "src", "job-id": "i2", "target": "tgt", "sync": "incremental",
                   "bitmap": "b0"}),
        );
        let done = c.job_data("BLOCK_JOB_COMPLETED", "i2");
        assert!(done.get("error").is_none(), "{who}: {done}");
        c.wait_status("i2", "null");
    }
    assert_eq!(c.bitmap_count("b0"), 0, "{who}: reset on success");
    let events = c.job_events("i");
    daemon.quit(c);
    check(&t);
    assert!(identical(&src, &t), "{who} {policy}");
    fs.clear();
    events
}

/// `base` (4 MiB of data) <- `top` (empty) with `top` on the tmpfs: block-stream writes
/// the whole base into top.
fn stream_scenario(qemu: bool, fs: &Tmpfs, policy: &str) -> Vec<String> {
    let who = name(qemu);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2").to_str().unwrap().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x71 0 4M", &base],
    );
    let top = fs.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
        ],
    );
    fs.fill();
    let (daemon, mut c) = Daemon::start(qemu, &file_node("qcow2", "top", &top));
    c.ok(
        "block-stream",
        json!({"device": "top", "job-id": "s", "on-error": policy}),
    );
    let err = c.job_data("BLOCK_JOB_ERROR", "s");
    // QEMU's stream reports every error as a read (stream_run passes is_read = true).
    let action = if policy == "enospc" { "stop" } else { policy };
    assert_eq!(
        err,
        json!({"device": "s", "operation": "read", "action": action}),
        "{who}"
    );
    let ok = if action == "stop" {
        c.wait_paused("s");
        fs.free();
        c.ok("block-job-resume", json!({"device": "s"}));
        true
    } else {
        false
    };
    let done = c.job_data("BLOCK_JOB_COMPLETED", "s");
    if ok {
        assert!(done.get("error").is_none(), "{who}: {done}");
    } else {
        assert_eq!(done["error"], "No space left on device", "{who}: {done}");
        fs.free();
    }
    c.wait_status("s", "null");
    let events = c.job_events("s");
    daemon.quit(c);
    check(&top);
    assert!(identical(&base, &top), "{who} {policy}");
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "-U", "--output=json", &top])).unwrap();
    // Streamed: the backing link is gone; failed: it stays.
    assert_eq!(info.get("backing-filename").is_none(), ok, "{who}: {info}");
    fs.clear();
    events
}

/// `base` (on the tmpfs, empty) <- `mid` (4 MiB of data) <- `top`: committing `mid` (or,
/// `active`, `top` and `mid`) into `base` fills the tmpfs; `policy` is the on-error
/// (none: QEMU's default, report).
fn commit_scenario(qemu: bool, fs: &Tmpfs, active: bool, policy: Option<&str>) -> Vec<String> {
    let who = name(qemu);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let base = fs.path("base.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    let (mid, top) = (p("mid.qcow2"), p("top.qcow2"));
    for (img, back) in [(&mid, &base), (&top, &mid)] {
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img,
            ],
        );
    }
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x81 0 4M", &mid],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x82 0 64k", &top],
    );
    let before = p("before.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &top, &before],
    );
    fs.fill();
    let (daemon, mut c) = Daemon::start(qemu, &file_node("qcow2", "top", &top));
    // Intermediate: mid into base; active: top and mid into base (a mirror in QEMU).
    let mut args = json!({"device": "top", "job-id": "c"});
    if !active {
        args["top"] = json!(mid);
    }
    if let Some(p) = policy {
        let mut bad = args.clone();
        bad["on-error"] = json!("bogus");
        let e = c.cmd("block-commit", bad).expect_err("a bad on-error");
        assert_eq!(
            e["desc"], "Parameter 'on-error' does not accept value 'bogus'",
            "{who}"
        );
        args["on-error"] = json!(p);
    }
    c.ok("block-commit", args);
    let err = c.job_data("BLOCK_JOB_ERROR", "c");
    let action = match policy {
        None | Some("report") => "report",
        Some("stop") | Some("enospc") => "stop",
        Some(other) => other,
    };
    assert_eq!(
        err,
        json!({"device": "c", "operation": "write", "action": action}),
        "{who}"
    );
    match action {
        "stop" => {
            c.wait_paused("c");
            fs.free();
            c.ok("block-job-resume", json!({"device": "c"}));
        }
        "ignore" => {
            // QEMU's commit_run tries the failed range again at once: the job goes on
            // failing, unpaused, until there is space.
            c.job_data("BLOCK_JOB_ERROR", "c");
            let j = &c.jobs()[0];
            assert_eq!(j["status"], "running", "{who}: {j}");
            fs.free();
        }
        _ => {}
    }
    let ok = action != "report";
    if ok && active {
        c.job_data("BLOCK_JOB_READY", "c");
        c.ok("block-job-complete", json!({"device": "c"}));
    }
    let done = c.job_data("BLOCK_JOB_COMPLETED", "c");
    if ok {
        assert!(done.get("error").is_none(), "{who}: {done}");
    } else {
        assert_eq!(done["error"], "No space left on device", "{who}: {done}");
        fs.free();
    }
    c.wait_status("c", "null");
    let events = c.job_events("c");
    daemon.quit(c);
    check(&base);
    assert_eq!(check(&mid), 0, "{who}: mid is only read");
    if !(ok && active) {
        assert_eq!(check(&top), 0, "{who}: top is only read");
        // Committed: top over base; failed: the chain is as it was. Either way the
        // guest's view is unchanged.
        let info: Value =
            serde_json::from_str(&run("qemu-img", &["info", "-U", "--output=json", &top])).unwrap();
        let want = if ok { &base } else { &mid };
        assert_eq!(info["backing-filename"], want.as_str(), "{who} {policy:?}");
        assert!(identical(&before, &top), "{who}: the guest's view changed");
    } else {
        // Pivoted to base, which holds everything now.
        assert!(identical(&before, &base), "{who}: base differs");
    }
    fs.clear();
    events
}

#[test]
fn stream_and_commit_writing_to_a_full_filesystem_like_qemu() {
    let Some(fs) = Tmpfs::mount("stream_and_commit_writing_to_a_full_filesystem") else {
        return;
    };
    for policy in ["stop", "enospc", "report", "ignore"] {
        let ours = stream_scenario(false, &fs, policy);
        let qemu = stream_scenario(true, &fs, policy);
        assert_eq!(ours, qemu, "stream {policy}: events");
    }
    // block-commit's on-error: not in this tree's schema, but QEMU 7.2 takes it.
    for (active, policy) in [
        (false, None),
        (true, None),
        (false, Some("stop")),
        (false, Some("enospc")),
        (false, Some("ignore")),
        (true, Some("stop")),
    ] {
        let ours = commit_scenario(false, &fs, active, policy);
        let qemu = commit_scenario(true, &fs, active, policy);
        assert_eq!(ours, qemu, "commit (active: {active}, {policy:?}): events");
    }
}
