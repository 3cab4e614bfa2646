//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether QEMU's tools are installed (they are on every machine of this project).
pub fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qemu-img check --output=json`, parsed into (corruptions, leaks, check_errors).
pub fn qemu_check(path: &Path) -> (u64, u64, u64, String) {
    let (_, out, err) = run_status(
        "qemu-img",
        &[
            "check",
            "--output=json",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
        ],
    );
    let num = |k: &str| -> u64 {
        out.find(&format!("\"{k}\": "))
            .map(|i| {
                out[i + k.len() + 4..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
                    .parse()
                    .unwrap()
            })
            .unwrap_or(0)
    };
    (
        num("corruptions"),
        num("leaks"),
        num("check-errors"),
        format!("{out}{err}"),
    )
}

/// Asserts qemu-img check finds no corruption (and no leak unless allowed).
pub fn assert_clean(path: &Path, allow_leaks: bool) {
    let (c, l, e, text) = qemu_check(path);
    assert_eq!(c, 0, "corruptions: {text}");
    assert_eq!(e, 0, "check errors: {text}");
    if !allow_leaks {
        assert_eq!(l, 0, "leaks: {text}");
    }
}

/// Asserts `qemu-img compare` finds the two images identical.
pub fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (code, out, err) = run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "compare: {out}{err}");
}

/// A small deterministic PRNG.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
