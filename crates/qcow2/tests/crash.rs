//! Crash safety: a writer killed with SIGKILL at random moments leaves an image that
//! `qemu-img check` finds free of corruption, and every write a completed flush covered reads
//! back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use qcow2::{CreateOptions, FollowFiles, OpenOptions, Qcow2};

#[path = "../examples/crash_writer.rs"]
#[allow(dead_code)]
mod writer;

fn writer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("crash_writer")
}

fn crash_rounds(rounds: u64, opts: CreateOptions, with_backing: bool) {
    if !have_qemu() {
        return;
    }
    let bin = writer_bin();
    if !bin.exists() {
        // `cargo test --test crash` does not build examples; `cargo test` does. Build it
        // into the target directory this test runs from (cargo-llvm-cov uses its own).
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_dir = bin.parent().and_then(Path::parent).unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-p",
            "qcow2",
            "--example",
            "crash_writer",
            "--target-dir",
        ]);
        build.arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let st = build.status().unwrap();
        assert!(st.success());
    }
    assert!(bin.exists(), "crash_writer not found at {}", bin.display());
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "crash.qcow2");
    let journal = p(dir.path(), "journal");
    if with_backing {
        let base = p(dir.path(), "base.raw");
        std::fs::write(&base, vec![0xeeu8; opts.size as usize]).unwrap();
        let o = CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..opts.clone()
        };
        Qcow2::create_path(&img, &o).unwrap();
    } else {
        Qcow2::create_path(&img, &opts).unwrap();
    }
    let mut rng = Rng(0x1234_5678 ^ rounds);
    for round in 0..rounds {
        let mut child = Command::new(&bin)
            .args([s(&img), s(&journal), &(round * 77 + 1).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(15 + rng.below(120)));
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("writer exited early ({status}): {err}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        end_journal_line(&journal);
        // No corruption; leaks are allowed.
        let (c, _, e, text) = qemu_check(&img);
        assert_eq!((c, e), (0, 0), "round {round}: {text}");
        verify(&img, &journal, round);
    }
    // Repair the leaks and make sure QEMU agrees the image is clean.
    run("qemu-img", &["check", "-q", "-r", "leaks", s(&img)]);
    assert_clean(&img, false);
}

/// Ends a line the killed writer left unterminated, so the next round's first number does
/// not extend it (a torn prefix of a number is no larger than the number: still true).
fn end_journal_line(journal: &Path) {
    let j = std::fs::read(journal).unwrap_or_default();
    if j.last().is_some_and(|&b| b != b'\n') {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(journal)
            .unwrap();
        f.write_all(b"\n").unwrap();
    }
}

fn verify(img: &Path, journal: &Path, round: u64) {
    let j = std::fs::read_to_string(journal).unwrap_or_default();
    let flushed: u64 = j.lines().filter_map(|l| l.parse().ok()).max().unwrap_or(0);
    let q = Qcow2::open_path(
        img,
        OpenOptions {
            opener: std::sync::Arc::new(FollowFiles::default()),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..flushed {
        let (off, len) = writer::log_extent(i);
        let mut got = vec![0u8; len as usize];
        q.read_at(&mut got, off).unwrap();
        let want = writer::log_data(i, len);
        if got != want {
            let k = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "round {round}: flushed write {i} at {off:#x}+{len:#x} lost: first difference at +{k:#x}: {:02x?} vs {:02x?}",
                &got[k..(k + 8).min(got.len())],
                &want[k..(k + 8).min(want.len())]
            );
        }
    }
}

#[test]
fn sigkill_writer_fast() {
    crash_rounds(
        20,
        CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::new(24 << 20)
        },
        false,
    );
}

#[test]
fn sigkill_writer_with_backing_and_subclusters_fast() {
    crash_rounds(
        10,
        CreateOptions {
            cluster_size: 65536,
            extended_l2: true,
            ..CreateOptions::new(24 << 20)
        },
        true,
    );
}

#[test]
#[ignore = "long soak: hundreds of kills"]
fn sigkill_writer_subclusters_soak() {
    crash_rounds(
        300,
        CreateOptions {
            cluster_size: 65536,
            extended_l2: true,
            ..CreateOptions::new(24 << 20)
        },
        true,
    );
}

#[test]
#[ignore = "long soak: hundreds of kills"]
fn sigkill_writer_soak() {
    crash_rounds(
        300,
        CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::new(64 << 20)
        },
        false,
    );
    crash_rounds(
        200,
        CreateOptions {
            cluster_size: 65536,
            refcount_bits: 1,
            ..CreateOptions::new(64 << 20)
        },
        true,
    );
}
