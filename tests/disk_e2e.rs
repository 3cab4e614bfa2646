//! End to end with KVM: the embedded guest drives a virtio-blk disk on a
//! qcow2 image through the block graph, writing and checking patterns pass
//! after pass; stop parks it mid-I/O, and the image it leaves behind is
//! clean for `qemu-img check` and holds the guest's pattern for `qemu-io`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{chunk_has, kvm_usable, Raw, Vmm};
use serde_json::json;

fn console(c: &mut Raw) -> String {
    let r = c.exec(r#"{"execute": "ringbuf-read", "arguments": {"device": "con", "size": 65536}}"#);
    r["return"].as_str().unwrap_or_default().to_owned()
}

/// A guest with a fresh qcow2 disk of `size` as virtio-blk `vd0` (device
/// options `dev_opts` appended), its console on ringbuf `con`.
fn guest_with_disk(size: &str, dev_opts: &str) -> (tempfile::TempDir, String, Vmm) {
    guest_with_device(size, "virtio-blk", dev_opts)
}

/// The same with the device model `model` (virtio-blk-pci, virtio-blk-device, ...).
fn guest_with_device(size: &str, model: &str, dev_opts: &str) -> (tempfile::TempDir, String, Vmm) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2").to_str().unwrap().to_owned();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &img, size])
        .status()
        .unwrap();
    assert!(st.success());
    let dev = format!("{model},drive=disk0,id=vd0{dev_opts}");
    let vmm = Vmm::start_guest_with_disk(&img, &dev);
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

#[test]
fn the_guest_writes_and_checks_its_disk_and_the_image_stays_clean() {
    if !kvm_usable("the_guest_writes_and_checks_its_disk_and_the_image_stays_clean") {
        return;
    }
    let (_dir, img, mut vmm) = guest_with_disk("2M", "");
    let mut c = vmm.negotiated();
    let mut out = console_until(&mut c, "pass 1 done");
    assert!(out.contains("virtio-blk disk of 2048 KiB"), "{out}");
    // virtio-blk is a virtio-pci function the guest found by scanning bus
    // 0, and its MSI-X vector reached the guest's local APIC through KVM's
    // GSI routing and the irqfd.
    assert!(out.contains("virtio-blk-pci in slot 1\n"), "{out}");
    assert!(
        out.contains("MSI-X interrupt delivered to the local APIC"),
        "{out}"
    );

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
    let (_dir, img, mut vmm) =
        guest_with_device("1M", "virtio-blk-pci", ",ioeventfd=off,addr=0x1f.0");
    let mut c = vmm.negotiated();
    let out = console_until(&mut c, "pass 2 done");
    assert!(out.contains("virtio-blk-pci in slot 31\n"), "{out}");
    assert!(out.contains("MSI-X interrupt delivered"), "{out}");
    c.exec(r#"{"execute": "quit"}"#);
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_clean(&img);
}

#[test]
fn virtio_blk_device_is_the_virtio_mmio_transport() {
    if !kvm_usable("virtio_blk_device_is_the_virtio_mmio_transport") {
        return;
    }
    let (_dir, img, mut vmm) = guest_with_device("1M", "virtio-blk-device", "");
    let mut c = vmm.negotiated();
    let out = console_until(&mut c, "pass 1 done");
    assert!(
        out.contains("virtio-blk on virtio-mmio at 0xd0000000"),
        "{out}"
    );
    assert!(!out.contains("virtio-blk-pci"), "{out}");
    let r = c.exec(r#"{"execute": "device_del", "arguments": {"id": "vd0"}}"#);
    assert_eq!(
        r["error"]["desc"], "Bus 'virtio-mmio-bus.0' does not support hotplugging",
        "{r}"
    );
    c.exec(r#"{"execute": "quit"}"#);
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_clean(&img);
}

/// Reads the next message: it must be the event `name`; returns its data.
fn expect_event(c: &mut Raw, name: &str) -> serde_json::Value {
    let e = c.recv();
    assert_eq!(e["event"], name, "{e}");
    e["data"].clone()
}

#[test]
fn device_add_hot_plugs_a_pci_disk_and_device_del_releases_it() {
    if !kvm_usable("device_add_hot_plugs_a_pci_disk_and_device_del_releases_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("hot.qcow2").to_str().unwrap().to_owned();
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &img, "1M"])
        .status()
        .unwrap()
        .success());
    let bd = format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}");
    let mut vmm = Vmm::start_with(&[
        "-m",
        "32M",
        "--blockdev",
        &bd,
        "--chardev",
        "ringbuf,id=con,size=65536",
        "--serial",
        "chardev:con",
    ]);
    let mut c = vmm.negotiated();
    // No disk yet: the guest ticks (and rescans the PCI bus after each tick).
    console_until(&mut c, "tick 1\n");
    let add = json!({"execute": "device_add", "arguments": {
        "driver": "virtio-blk-pci", "id": "hp0", "drive": "disk0", "addr": "5", "num-queues": 2}});
    assert_eq!(c.exec(&add.to_string()), json!({"return": {}}));
    let out = console_until(&mut c, "pass 1 done");
    assert!(out.contains("virtio-blk-pci in slot 5\n"), "{out}");
    let stats = c.exec(r#"{"execute": "query-blockstats"}"#).to_string();
    assert!(stats.contains("hp0"), "{stats}");
    // query-pci: the host bridge, and hp0 in slot 5 with its BAR and INTx line.
    let pci = c.exec(r#"{"execute": "query-pci"}"#)["return"][0]["devices"].clone();
    assert_eq!(pci[0]["class_info"]["desc"], "Host bridge", "{pci}");
    assert_eq!(
        pci[1],
        json!({"bus": 0, "slot": 5, "function": 0, "irq": 11, "qdev_id": "hp0",
               "class_info": {"desc": "SCSI controller", "class": 256},
               "id": {"device": 0x1042, "vendor": 0x1af4},
               "regions": [{"bar": 0, "type": "memory", "address": 0xc005_0000u32,
                            "size": 32768, "prefetch": false, "mem_type_64": false}]})
    );

    // Errors in QEMU's words.
    for (args, class, desc) in [
        (
            json!({"driver": "virtio-blk-pci", "id": "hp0", "drive": "disk0"}),
            "GenericError",
            "Duplicate device ID 'hp0'",
        ),
        (
            json!({"driver": "e1000", "id": "n0"}),
            "GenericError",
            "'e1000' is not a valid device model name",
        ),
        (
            json!({"driver": "virtio-blk-pci", "id": "x", "drive": "disk0", "bogus": 1}),
            "GenericError",
            "Property 'virtio-blk-pci.bogus' not found",
        ),
        (
            json!({"driver": "virtio-blk-pci", "id": "x", "drive": "disk0", "bus": "pci.1"}),
            "DeviceNotFound",
            "Bus 'pci.1' not found",
        ),
        (
            json!({"driver": "virtio-blk-device", "id": "x", "drive": "disk0"}),
            "GenericError",
            "Bus 'virtio-mmio-bus.0' does not support hotplugging",
        ),
        (
            json!({"id": "x"}),
            "GenericError",
            "Parameter 'driver' is missing",
        ),
    ] {
        let r = c.exec(&json!({"execute": "device_add", "arguments": args}).to_string());
        assert_eq!(r["error"]["class"], class, "{args}: {r}");
        assert_eq!(r["error"]["desc"], desc, "{args}: {r}");
    }
    let r = c.exec(r#"{"execute": "device_del", "arguments": {"id": "nope"}}"#);
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");
    assert_eq!(r["error"]["desc"], "Device 'nope' not found", "{r}");

    // The guest drives hp0: the removal waits for the driver to let go.
    let del = r#"{"execute": "device_del", "arguments": {"id": "hp0"}}"#;
    assert_eq!(c.exec(del), json!({"return": {}}));
    let r = c.exec(del);
    assert_eq!(
        r["error"]["desc"], "Device hp0 is already in the process of unplug",
        "{r}"
    );
    // A machine reset completes it.
    assert_eq!(
        c.exec(r#"{"execute": "system_reset"}"#),
        json!({"return": {}})
    );
    expect_event(&mut c, "RESET");
    assert_eq!(
        expect_event(&mut c, "DEVICE_DELETED"),
        json!({"path": "/machine/peripheral/hp0/virtio-backend"})
    );
    assert_eq!(
        expect_event(&mut c, "DEVICE_DELETED"),
        json!({"device": "hp0", "path": "/machine/peripheral/hp0"})
    );
    // Its BlockBackend is gone: the node is free again.
    let r = c.exec(r#"{"execute": "device_del", "arguments": {"id": "hp0"}}"#);
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");
    let pci = c.exec(r#"{"execute": "query-pci"}"#)["return"][0]["devices"].clone();
    assert_eq!(
        pci.as_array().unwrap().len(),
        1,
        "only the host bridge: {pci}"
    );
    assert_eq!(
        c.exec(r#"{"execute": "blockdev-del", "arguments": {"node-name": "disk0"}}"#),
        json!({"return": {}})
    );
    c.exec(r#"{"execute": "quit"}"#);
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
    assert_clean(&img);
}

#[test]
fn device_del_of_a_disk_no_driver_uses_completes_at_once() {
    if !kvm_usable("device_del_of_a_disk_no_driver_uses_completes_at_once") {
        return;
    }
    let mut vmm = Vmm::start_with(&[
        "-S",
        "-m",
        "32M",
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
    ]);
    let mut c = vmm.negotiated();
    for round in 0..2 {
        let add = json!({"execute": "device_add", "arguments": {
            "driver": "virtio-blk", "id": "vdx", "drive": "n0", "ioeventfd": false}});
        assert_eq!(
            c.exec(&add.to_string()),
            json!({"return": {}}),
            "round {round}"
        );
        assert_eq!(
            c.exec(r#"{"execute": "device_del", "arguments": {"id": "/machine/peripheral/vdx"}}"#),
            json!({"return": {}})
        );
        expect_event(&mut c, "DEVICE_DELETED");
        assert_eq!(
            expect_event(&mut c, "DEVICE_DELETED")["device"],
            "vdx",
            "round {round}"
        );
    }
    c.exec(r#"{"execute": "quit"}"#);
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
}
