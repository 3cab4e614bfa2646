//! Helpers shared by the command-line tests: run vmm-img and qemu-img in a directory.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

pub fn run(cmd: &str, args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("spawn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn vmm(args: &[&str], dir: &Path) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_vmm-img"), args, dir)
}

pub fn ok(r: (i32, String, String)) -> String {
    assert_eq!(r.0, 0, "stdout: {}\nstderr: {}", r.1, r.2);
    r.1
}

pub fn qemu(args: &[&str], dir: &Path) -> String {
    ok(run("qemu-img", args, dir))
}
