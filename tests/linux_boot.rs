//! Booting a real Linux kernel on KVM. Runs only where it can finish: KVM
//! must be there, a quick probe must show guest code running at about
//! native speed (nested KVM here is ~1000 times slower, where a kernel can't
//! boot in useful time), and a kernel must be found ($VMM_TEST_KERNEL, else
//! /boot/vmlinuz-*). Otherwise the test says why it skips.
//!
//! The kernel gets a virtio-blk-pci disk with no command-line help (no
//! ACPI, no MP table, no `virtio_mmio.device=`): its PCI core must find the
//! function by itself through ports 0xCF8/0xCFC.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{kvm_usable, Raw, Vmm};

fn console(c: &mut Raw) -> String {
    let r = c.exec(r#"{"execute": "ringbuf-read", "arguments": {"device": "con", "size": 65536}}"#);
    r["return"].as_str().unwrap_or_default().to_owned()
}

/// Tick lines the embedded guest prints in one second: about ten on
/// nested KVM, thousands at native speed.
fn guest_speed() -> usize {
    let vmm = Vmm::start_with(&[
        "-m",
        "16M",
        "--chardev",
        "ringbuf,id=con,size=65536",
        "--serial",
        "chardev:con",
    ]);
    let mut c = vmm.negotiated();
    let start = Instant::now();
    while !console(&mut c).contains("hello") && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    console(&mut c).matches("tick ").count()
}

fn find_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("VMM_TEST_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .collect();
    ks.sort();
    ks.pop()
}

#[test]
fn linux_boots_to_its_banner_on_the_serial_console() {
    let name = "linux_boots_to_its_banner_on_the_serial_console";
    if !kvm_usable(name) {
        return;
    }
    let ticks = guest_speed();
    if ticks < 500 {
        eprintln!(
            "{name}: skipped: KVM runs guest code far below native speed here \
             ({ticks} probe ticks in a second; native speed gives thousands)"
        );
        return;
    }
    let Some(kernel) = find_kernel() else {
        eprintln!("{name}: skipped: no kernel (set VMM_TEST_KERNEL or install one in /boot)");
        return;
    };
    let kernel = kernel.to_string_lossy().into_owned();
    let vmm = Vmm::start_with(&[
        "-m",
        "256M",
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 earlyprintk=serial panic=-1 reboot=t",
        "--chardev",
        "ringbuf,id=con,size=65536",
        "--serial",
        "chardev:con",
        "--blockdev",
        "driver=null-co,node-name=n0,size=67108864",
        "--device",
        "virtio-blk-pci,drive=n0,id=vda",
    ]);
    let mut c = vmm.negotiated();
    let start = Instant::now();
    let mut out = String::new();
    // The banner, then the PCI core's line for the disk
    // ("pci 0000:00:01.0: [1af4:1042] type 00 class 0x010000").
    while !(out.contains("Linux version") && out.contains("[1af4:1042]")) {
        out.push_str(&console(&mut c));
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no kernel banner or no virtio-blk-pci function found in 60 s:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
