//! Helpers shared by the command-line tests: run vmm-img and qemu-img in a directory, compare
//! their answers, and the small image set of the block-graph tests.
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

/// Runs `args` with both tools; asserts the same exit code, stdout and stderr (without the
/// program name) and returns vmm-img's stdout.
pub fn same(args: &[&str], d: &Path) -> String {
    let q = run("qemu-img", args, d);
    let v = vmm(args, d);
    assert_eq!(v.0, q.0, "exit code of {args:?}: {v:?} / {q:?}");
    assert_eq!(v.1, q.1, "stdout of {args:?}");
    assert_eq!(
        v.2.replace("vmm-img:", "qemu-img:"),
        q.2,
        "stderr of {args:?}"
    );
    v.1
}

/// Runs a tool with a command line split at spaces.
pub fn sh(tool: &str, line: &str, d: &Path) -> String {
    let args: Vec<&str> = line.split(' ').collect();
    ok(run(tool, &args, d))
}

/// A temporary directory (`None` without qemu-img) with a raw file with data at
/// 4 KiB..12 KiB, a qcow2 base with data at 0..64 KiB and a qcow2 top over it with data at
/// 64 KiB..128 KiB.
pub fn images() -> Option<tempfile::TempDir> {
    if !have_qemu() {
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sh("qemu-img", "create -q -f raw r.raw 1M", d);
    sh("qemu-img", "create -q -f qcow2 base.qcow2 1M", d);
    sh(
        "qemu-img",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
        d,
    );
    let io = |img: &str, fmt: &str, cmd: &str| ok(run("qemu-io", &["-f", fmt, "-c", cmd, img], d));
    io("r.raw", "raw", "write -P 3 4096 8192");
    io("base.qcow2", "qcow2", "write -P 1 0 64k");
    io("top.qcow2", "qcow2", "write -P 2 64k 64k");
    Some(t)
}

/// The json: name of a 64 KiB raw window at 4 KiB into [`images`]'s r.raw (data in its
/// first 8 KiB).
pub fn raw_window(d: &Path) -> String {
    format!(
        r#"json:{{"driver":"raw","offset":4096,"size":65536,"file":{{"driver":"file","filename":"{}/r.raw"}}}}"#,
        d.display()
    )
}
