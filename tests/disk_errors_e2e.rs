//! End to end with KVM: I/O errors under the embedded guest's virtio-blk
//! disk, injected by a blkdebug node, meet the BlockBackend's error policy
//! as in QEMU. The guest writes each 4 KiB chunk, reads it back and checks
//! it; the rule fails the write of chunk 10 once.
//!
//! - ENOSPC (werror's default policy, `enospc`, stops): BLOCK_IO_ERROR with
//!   action `stop`, STOP, query-status `io-error`, query-block io-status
//!   `nospace`; `cont` resets the io-status, RESUME, the kept write is
//!   retried and succeeds, and the guest goes on without seeing an error.
//!   With the queue served by the main loop (ioeventfd), by the vCPU thread
//!   that notified it (ioeventfd=off: the stop must not wait for that vCPU
//!   while it serves the queue), and on virtio-mmio.
//! - A write failing again when `cont` retries it stops the VM again.
//! - EIO (reported under `enospc`): BLOCK_IO_ERROR with action `report`,
//!   the guest sees the error, query-blockstats counts a failed write.

mod common;

use std::time::{Duration, Instant};

use common::{kvm_usable, JobClient, Vmm};
use serde_json::{json, Value};

/// The chunk whose write fails; the guest writes it at sector 8 * chunk.
const CHUNK: u64 = 10;

/// A guest with a 1 MiB raw disk `disk0` over a blkdebug node whose rule
/// fails the first write touching chunk [`CHUNK`] (every one unless `once`)
/// with `errno`, behind the device `model` as `vd0` (`dev_opts` appended);
/// its console on `con`.
fn guest(errno: i32, once: bool, model: &str, dev_opts: &str) -> (tempfile::TempDir, String, Vmm) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw").to_str().unwrap().to_owned();
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let blockdev = json!({
        "driver": "raw", "node-name": "disk0",
        "file": {
            "driver": "blkdebug", "node-name": "dbg",
            "image": {"driver": "file", "filename": img},
            "inject-error": [{"event": "write_aio", "errno": errno,
                              "sector": CHUNK * 8, "once": once}]
        }
    })
    .to_string();
    let device = format!("{model},drive=disk0,id=vd0{dev_opts}");
    let vmm = Vmm::start_with(&[
        "-m",
        "32M",
        "--blockdev",
        &blockdev,
        "--device",
        &device,
        "--chardev",
        "ringbuf,id=con,size=65536",
        "--serial",
        "chardev:con",
    ]);
    (dir, img, vmm)
}

fn console(c: &mut JobClient) -> String {
    let r = c.ok("ringbuf-read", json!({"device": "con", "size": 65536}));
    r.as_str().unwrap_or_default().to_owned()
}

/// Reads the console until `text` appears; returns everything read.
fn console_until(c: &mut JobClient, text: &str) -> String {
    let start = Instant::now();
    let mut out = String::new();
    while !out.contains(text) {
        out.push_str(&console(c));
        assert!(!out.contains("MISMATCH"), "{out}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{text:?} not in 60 s:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}

/// vd0's entry in the answer of the query `cmd`.
fn vd0_entry(c: &mut JobClient, cmd: &str) -> Value {
    let all = c.ok(cmd, json!({}));
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["qdev"] == "vd0" || s["device"] == "vd0")
        .unwrap_or_else(|| panic!("no vd0 in {cmd}: {all}"))
        .clone()
}

/// vd0's statistics in query-blockstats.
fn vd0_stats(c: &mut JobClient) -> Value {
    vd0_entry(c, "query-blockstats")["stats"].clone()
}

/// vd0's io-status in query-block.
fn io_status(c: &mut JobClient) -> Value {
    vd0_entry(c, "query-block")["io-status"].clone()
}

/// The write of chunk [`CHUNK`] fails with ENOSPC (or, with `werror=stop`
/// in `dev_opts`, `errno`): the VM stops on it and `cont` retries it.
fn stop_then_cont_retries(test: &str, model: &str, dev_opts: &str) {
    stop_on_errno_then_cont_retries(test, libc::ENOSPC, model, dev_opts)
}

fn stop_on_errno_then_cont_retries(test: &str, errno: i32, model: &str, dev_opts: &str) {
    if !kvm_usable(test) {
        return;
    }
    let nospace = errno == libc::ENOSPC;
    let (_dir, img, mut vmm) = guest(errno, true, model, dev_opts);
    let mut c = JobClient::new(vmm.negotiated());
    let err = c.wait_event("BLOCK_IO_ERROR", |e| e["event"] == "BLOCK_IO_ERROR");
    assert_eq!(err["data"]["operation"], "write", "{err}");
    assert_eq!(err["data"]["action"], "stop", "{err}");
    assert_eq!(err["data"]["nospace"], nospace, "{err}");
    assert_eq!(err["data"]["node-name"], "disk0", "{err}");
    c.wait_event("STOP", |e| e["event"] == "STOP");
    assert_eq!(
        c.ok("query-status", json!({})),
        json!({"status": "io-error", "singlestep": false, "running": false})
    );
    assert_eq!(
        io_status(&mut c),
        if nospace { "nospace" } else { "failed" }
    );
    // The guest waits for its write: nothing completed, no progress.
    let before = console(&mut c);
    assert!(!before.contains("I/O error"), "{before}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console(&mut c), "", "the guest progressed while stopped");
    let s = vd0_stats(&mut c);
    assert_eq!(s["failed_wr_operations"], 0, "{s}");
    assert_eq!(s["wr_operations"], CHUNK, "chunks 0..{CHUNK} written: {s}");

    c.ok("cont", json!({}));
    c.wait_event("RESUME", |e| e["event"] == "RESUME");
    assert_eq!(io_status(&mut c), "ok");
    assert_eq!(c.ok("query-status", json!({}))["status"], "running");
    // The kept write was retried: the guest reads chunk 10 back intact and
    // finishes the pass without an error.
    let out = before + &console_until(&mut c, "pass 1 done");
    assert!(!out.contains("I/O error"), "{out}");
    let s = vd0_stats(&mut c);
    assert_eq!(s["failed_wr_operations"], 0, "{s}");
    assert!(s["wr_operations"].as_u64().unwrap() >= 256, "{s}");
    assert!(s["rd_operations"].as_u64().unwrap() >= 256, "{s}");
    let errors = c.log.iter().filter(|e| e["event"] == "BLOCK_IO_ERROR");
    assert_eq!(errors.count(), 1, "one error only: {:?}", c.log);
    c.ok("quit", json!({}));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    let data = std::fs::read(&img).unwrap();
    let at = (CHUNK * 4096) as usize;
    // Pass 1 wrote the byte (chunk + 1) into every chunk; pass 2 may have
    // rewritten chunk 10 with (chunk + 2).
    let b = data[at];
    assert!(b == (CHUNK + 1) as u8 || b == (CHUNK + 2) as u8, "{b}");
    assert!(data[at..at + 4096].iter().all(|&x| x == b));
}

/// `werror=stop` on the device (QEMU's device property): any write error
/// stops the VM, not only ENOSPC.
#[test]
fn eio_with_werror_stop_on_the_device_stops_the_vm() {
    stop_on_errno_then_cont_retries(
        "eio_with_werror_stop_on_the_device_stops_the_vm",
        libc::EIO,
        "virtio-blk",
        ",werror=stop",
    );
}

#[test]
fn enospc_stops_the_vm_and_cont_retries_the_write() {
    stop_then_cont_retries(
        "enospc_stops_the_vm_and_cont_retries_the_write",
        "virtio-blk",
        "",
    );
}

#[test]
fn enospc_stop_from_the_vcpu_thread_serving_the_queue() {
    stop_then_cont_retries(
        "enospc_stop_from_the_vcpu_thread_serving_the_queue",
        "virtio-blk-pci",
        ",ioeventfd=off",
    );
}

#[test]
fn enospc_stop_and_retry_on_virtio_mmio() {
    stop_then_cont_retries(
        "enospc_stop_and_retry_on_virtio_mmio",
        "virtio-blk-device",
        "",
    );
}

#[test]
fn eio_is_reported_to_the_guest_and_counted_as_a_failed_write() {
    if !kvm_usable("eio_is_reported_to_the_guest_and_counted_as_a_failed_write") {
        return;
    }
    let (_dir, _img, mut vmm) = guest(libc::EIO, true, "virtio-blk", "");
    let mut c = JobClient::new(vmm.negotiated());
    let err = c.wait_event("BLOCK_IO_ERROR", |e| e["event"] == "BLOCK_IO_ERROR");
    assert_eq!(err["data"]["operation"], "write", "{err}");
    assert_eq!(err["data"]["action"], "report", "{err}");
    assert_eq!(err["data"]["nospace"], false, "{err}");
    // The guest was told: it says so, then finds chunk 10 does not hold
    // what it wrote and halts.
    let start = Instant::now();
    let mut out = String::new();
    while !out.contains("MISMATCH") {
        out.push_str(&console(&mut c));
        assert!(start.elapsed() < Duration::from_secs(60), "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        out.contains(&format!("I/O error in chunk {CHUNK}\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("MISMATCH in chunk {CHUNK}\n")),
        "{out}"
    );
    // Report does not stop the VM nor mark the device.
    assert_eq!(c.ok("query-status", json!({}))["status"], "running");
    assert_eq!(io_status(&mut c), "ok");
    let s = vd0_stats(&mut c);
    assert_eq!(s["failed_wr_operations"], 1, "{s}");
    assert_eq!(s["wr_operations"], CHUNK, "{s}");
    assert_eq!(s["rd_operations"], CHUNK + 1, "{s}");
    assert_eq!(s["invalid_wr_operations"], 0, "{s}");
    assert!(!c.log.iter().any(|e| e["event"] == "STOP"), "{:?}", c.log);
    c.ok("quit", json!({}));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn a_write_failing_again_on_cont_stops_the_vm_again() {
    if !kvm_usable("a_write_failing_again_on_cont_stops_the_vm_again") {
        return;
    }
    let (_dir, _img, mut vmm) = guest(libc::ENOSPC, false, "virtio-blk", "");
    let mut c = JobClient::new(vmm.negotiated());
    for round in 0..3 {
        let err = c.wait_event("BLOCK_IO_ERROR", |e| e["event"] == "BLOCK_IO_ERROR");
        assert_eq!(err["data"]["action"], "stop", "round {round}: {err}");
        c.wait_event("STOP", |e| e["event"] == "STOP");
        assert_eq!(c.ok("query-status", json!({}))["status"], "io-error");
        assert_eq!(io_status(&mut c), "nospace");
        c.ok("cont", json!({}));
        c.wait_event("RESUME", |e| e["event"] == "RESUME");
    }
    let err = c.wait_event("BLOCK_IO_ERROR", |e| e["event"] == "BLOCK_IO_ERROR");
    assert_eq!(err["data"]["action"], "stop", "{err}");
    c.wait_event("STOP", |e| e["event"] == "STOP");
    let out = console(&mut c);
    assert!(!out.contains("I/O error"), "{out}");
    let s = vd0_stats(&mut c);
    assert_eq!(s["wr_operations"], CHUNK, "{s}");
    assert_eq!(s["failed_wr_operations"], 0, "{s}");
    c.ok("quit", json!({}));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
}
