//! compare, rebase and commit against qemu-img, with qemu-img as the judge.

mod common;

use std::path::Path;

use common::*;

/// base (8 MiB of 1s) <- mid (2s at 1M) <- top (3s over both, a zero cluster, 4s at 7M).
/// With `small_base`, the base is 4 MiB (a backing file smaller than its overlay).
fn make_chain(d: &Path, small_base: bool) {
    let bsize = if small_base { "4M" } else { "8M" };
    qemu(&["create", "-q", "-f", "qcow2", "base.qcow2", bsize], d);
    let fill = format!("write -P 1 0 {bsize}");
    ok(run("qemu-io", &["-c", &fill, "base.qcow2"], d));
    for (img, below) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu(
            &[
                "create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", img, "8M",
            ],
            d,
        );
    }
    ok(run("qemu-io", &["-c", "write -P 2 1M 1M", "mid.qcow2"], d));
    ok(run(
        "qemu-io",
        &[
            "-c",
            "write -P 3 1536k 1M",
            "-c",
            "write -z 3M 64k",
            "-c",
            "write -P 4 7M 100k",
            "top.qcow2",
        ],
        d,
    ));
}

/// Runs `args` with qemu-img in `q` and vmm-img in `v`; returns their outputs.
fn both(args: &[&str], q: &Path, v: &Path) -> (String, String) {
    let theirs = run("qemu-img", args, q);
    let ours = vmm(args, v);
    assert_eq!(ours.0, theirs.0, "{args:?}: {ours:?} vs {theirs:?}");
    (ours.1, theirs.1)
}

/// A `map --output=json` without host offsets (the order in which a commit job allocates
/// clusters is its own business): (start, length, depth, present, zero, data) runs.
fn allocation(map_json: &str) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(map_json).unwrap();
    let mut out: Vec<(u64, u64, u64, bool, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let r = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["depth"].as_u64().unwrap(),
            e["present"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        );
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && (l.2, l.3, l.4, l.5) == (r.2, r.3, r.4, r.5) => {
                l.1 += r.1
            }
            _ => out.push(r),
        }
    }
    out
}

fn same_images(q: &Path, v: &Path, names: &[&str]) {
    for f in names {
        let a = allocation(&qemu(&["map", "--output=json", f], q));
        let b = allocation(&qemu(&["map", "--output=json", f], v));
        assert_eq!(b, a, "map of {f}");
        let ia = qemu(&["info", "--output=json", f], q);
        let ib = qemu(&["info", "--output=json", f], v);
        let size = |s: &str| {
            s.lines()
                .find(|l| l.contains("\"virtual-size\""))
                .map(str::to_string)
        };
        assert_eq!(size(&ib), size(&ia), "size of {f}");
        qemu(&["check", f], v);
    }
}

#[test]
fn commit_into_any_layer_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // (flags, base smaller than the top)
    let cases: [(&[&str], bool); 5] = [
        (&["-b", "base.qcow2"], false),
        (&["-b", "base.qcow2"], true),
        (&[], false),
        (&["-d"], false),
        (&["-b", "mid.qcow2"], false),
    ];
    for (i, (flags, small)) in cases.iter().enumerate() {
        let q = t.path().join(format!("q{i}"));
        let v = t.path().join(format!("v{i}"));
        std::fs::create_dir(&q).unwrap();
        std::fs::create_dir(&v).unwrap();
        make_chain(&q, *small);
        make_chain(&v, *small);
        qemu(&["convert", "-O", "raw", "top.qcow2", "view.raw"], &q);
        let mut args = vec!["commit"];
        args.extend_from_slice(flags);
        args.push("top.qcow2");
        let (ours, theirs) = both(&args, &q, &v);
        assert_eq!(ours, theirs);
        same_images(&q, &v, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
        // The top image still shows what it showed.
        let view = q.join("view.raw");
        let view = view.to_str().unwrap();
        assert!(qemu(&["compare", "-F", "raw", "top.qcow2", view], &v).contains("identical"));
    }
    let v = t.path().join("v0");
    let (code, _, err) = vmm(&["commit", "-b", "nope.qcow2", "top.qcow2"], &v);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "vmm-img: Did not find 'nope.qcow2' in the backing chain of 'top.qcow2'"
    );
    let (code, _, err) = vmm(&["commit", "base.qcow2"], &v);
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "vmm-img: Image does not have a backing file");
    // Progress ends at 100% before the message, like qemu-img's.
    std::fs::create_dir(t.path().join("p")).unwrap();
    make_chain(&t.path().join("p"), false);
    let out = ok(vmm(&["commit", "-p", "top.qcow2"], &t.path().join("p")));
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(
        out.ends_with("    (100.00/100%)\r\nImage committed.\n"),
        "{out:?}"
    );
}

#[test]
fn compare_and_rebase_progress_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("q");
    let v = t.path().join("v");
    std::fs::create_dir(&q).unwrap();
    std::fs::create_dir(&v).unwrap();
    for d in [&q, &v] {
        make_chain(d, false);
        qemu(&["create", "-q", "-f", "raw", "big.raw", "10M"], d);
        ok(run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 9 9M 4k", "big.raw"],
            d,
        ));
        qemu(&["convert", "-O", "raw", "top.qcow2", "view.raw"], d);
        qemu(&["create", "-q", "-f", "qcow2", "new.qcow2", "8M"], d);
        ok(run(
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 2M",
                "-c",
                "write -P 2 1M 512k",
                "new.qcow2",
            ],
            d,
        ));
    }
    for args in [
        &["compare", "-p", "top.qcow2", "view.raw"][..],
        &["compare", "-p", "base.qcow2", "view.raw"][..],
        &["compare", "-p", "-s", "top.qcow2", "view.raw"][..],
        &["compare", "-p", "mid.qcow2", "top.qcow2"][..],
        &[
            "compare", "-p", "-f", "raw", "-F", "raw", "view.raw", "big.raw",
        ][..],
        &["compare", "-f", "raw", "-F", "raw", "big.raw", "view.raw"][..],
        &["compare", "-q", "-p", "base.qcow2", "view.raw"][..],
    ] {
        let (ours, theirs) = both(args, &q, &v);
        assert_eq!(ours, theirs, "{args:?}");
    }
    let (ours, theirs) = both(
        &[
            "rebase",
            "-p",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &q,
        &v,
    );
    assert_eq!(ours, theirs);
    same_images(&q, &v, &["top.qcow2"]);
    assert!(qemu(&["compare", "-F", "raw", "top.qcow2", "view.raw"], &v).contains("identical"));
}
