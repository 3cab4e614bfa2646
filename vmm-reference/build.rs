//! Builds the embedded default guest from `guest/guest.S` with GNU as and
//! ld (binutils) into a flat binary that the VMM loads at 1 MiB.

use std::path::PathBuf;
use std::process::Command;

/// Where the VMM loads the guest and enters it.
const LOAD_ADDR: &str = "0x100000";

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (binutils' as and ld build the embedded guest): {e}")
    });
    assert!(status.success(), "{cmd:?} failed");
}

fn main() {
    println!("cargo:rerun-if-changed=guest/guest.S");
    println!("cargo:rerun-if-env-changed=VMM_GUEST_DELAY");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("guest.o");
    let elf = out.join("guest.elf");
    let bin = out.join("guest.bin");
    // Iterations between two tick lines: ~0.1 s on nested KVM (about a
    // million iterations a second), ~0.1 ms at native speed.
    let delay = std::env::var("VMM_GUEST_DELAY").unwrap_or_else(|_| "100000".into());
    run(Command::new("as")
        .args(["--64", &format!("--defsym=DELAY={delay}"), "-o"])
        .arg(&obj)
        .arg("guest/guest.S"));
    run(Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "-e",
            "_start",
            &format!("-Ttext={LOAD_ADDR}"),
        ])
        .arg("-o")
        .arg(&elf)
        .arg(&obj));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin));
}
