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
#[path = "common/enospc.rs"]
mod enospc;

use enospc::*;
use serde_json::{json, Value};

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
