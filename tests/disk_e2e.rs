//! End to end with KVM: the embedded guest drives a virtio-blk disk on a
//! qcow2 image through the block graph, writing and checking patterns pass
//! after pass; stop parks it mid-I/O, and the image it leaves behind is
//! clean for `qemu-img check` and holds the guest's pattern for `qemu-io`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{kvm_usable, Raw, Vmm};
use serde_json::json;

fn console(c: &mut Raw) -> String {
    let r = c.exec(r#"{"execute": "ringbuf-read", "arguments": {"device": "con", "size": 65536}}"#);
    r["return"].as_str().unwrap_or_default().to_owned()
}

/// A guest with a fresh qcow2 disk of `size` as virtio-blk `vd0` (device
/// options `dev_opts` appended), its console on ringbuf `con`.
fn guest_with_disk(size: &str, dev_opts: &str) -> (tempfile::TempDir, String, Vmm) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2").to_str().unwrap().to_owned();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &img, size])
        .status()
        .unwrap();
    assert!(st.success());
    let bd = format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}");
    let dev = format!("virtio-blk,drive=disk0,id=vd0{dev_opts}");
    let vmm = Vmm::start_with(&[
        "-m",
        "32M",
        "--blockdev",
        &bd,
        "--device",
        &dev,
        "--chardev",
        "ringbuf,id=con,size=65536",
        "--serial",
        "chardev:con",
    ]);
    (dir, img, vmm)
}

/// Reads the console until `text` appears (failing on a mismatch or an I/O
/// error the guest reports); returns everything read.
fn console_until(c: &mut Raw, text: &str) -> String {
    let start = Instant::now();
    let mut out = String::new();
    while !out.contains(text) {
        out.push_str(&console(c));
        assert!(
            !out.contains("MISMATCH") && !out.contains("I/O error"),
            "{out}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{text:?} not in 120 s:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

/// `qemu-img check` finds the image clean.
fn assert_clean(img: &str) {
    let check = Command::new("qemu-img")
        .args(["check", img])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Whether the 4 KiB chunk at `chunk` holds the byte `pattern`, read by qemu-io.
fn chunk_has(img: &str, chunk: u64, pattern: u64) -> bool {
    let cmd = format!("read -P {} {} 4k", pattern & 0xff, chunk * 4096);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", &cmd, img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    out.status.success()
        && !text.contains("Pattern verification failed")
        && text.contains("read 4096/4096")
}

#[test]
fn the_guest_writes_and_checks_its_disk_and_the_image_stays_clean() {
    if !kvm_usable("the_guest_writes_and_checks_its_disk_and_the_image_stays_clean") {
        return;
    }
    let (_dir, img, mut vmm) = guest_with_disk("2M", "");
    let mut c = vmm.negotiated();
    let mut out = console_until(&mut c, "pass 1 done");
    assert!(out.contains("virtio-blk disk of 2048 KiB"), "{out}");

    // Stop parks the guest mid-I/O: no more progress while stopped.
    c.exec(r#"{"execute": "stop"}"#);
    assert_eq!(c.recv()["event"], "STOP");
    out.push_str(&console(&mut c));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(console(&mut c), "", "the guest progressed while stopped");
    // The device's accounting saw the guest's I/O.
    let stats = c.exec(r#"{"execute": "query-blockstats"}"#)["return"].clone();
    let vd0 = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["qdev"] == "vd0" || s["device"] == "vd0")
        .cloned()
        .unwrap_or_else(|| panic!("no stats for vd0: {stats}"));
    assert!(
        vd0["stats"]["wr_operations"].as_u64().unwrap() >= 512,
        "{vd0}"
    );
    assert!(
        vd0["stats"]["rd_operations"].as_u64().unwrap() >= 512,
        "{vd0}"
    );

    assert_eq!(c.exec(r#"{"execute": "quit"}"#), json!({"return": {}}));
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_clean(&img);
    // The last completed pass P wrote every chunk k with (k + P); pass P + 1
    // may have rewritten a prefix with (k + P + 1).
    let done = out.matches(" done, checksum").count() as u64;
    for chunk in [0, 255, 511] {
        assert!(
            chunk_has(&img, chunk, chunk + done) || chunk_has(&img, chunk, chunk + done + 1),
            "chunk {chunk} holds neither pass {done} nor {} pattern",
            done + 1
        );
    }
}

#[test]
fn qemu_python_client_drives_the_guest_scenario() {
    if !kvm_usable("qemu_python_client_drives_the_guest_scenario") {
        return;
    }
    let (_dir, img, mut vmm) = guest_with_disk("1M", "");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/python/guest_scenario.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(&vmm.sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu.qmp scenario failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_clean(&img);
}

#[test]
fn without_ioeventfd_the_vcpu_thread_serves_the_queue() {
    if !kvm_usable("without_ioeventfd_the_vcpu_thread_serves_the_queue") {
        return;
    }
    let (_dir, img, mut vmm) = guest_with_disk("1M", ",ioeventfd=off");
    let mut c = vmm.negotiated();
    console_until(&mut c, "pass 2 done");
    c.exec(r#"{"execute": "quit"}"#);
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_clean(&img);
}
