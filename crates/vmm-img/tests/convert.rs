//! `vmm-img convert` against `qemu-img convert`: layout, zero detection, flags, progress.

mod common;

use common::*;

/// An 8 MiB raw source with data, explicitly written zeros, a partial cluster and holes.
fn make_source(d: &std::path::Path) {
    qemu(&["create", "-q", "-f", "raw", "src.raw", "8M"], d);
    ok(run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 0 1M 1M",
            "-c",
            "write -P 2 3M 100k",
            "-c",
            "write -P 3 5M 4k",
            "-c",
            "write -P 4 6300k 8k",
            "src.raw",
        ],
        d,
    ));
}

/// A `map --output=json` as (start, length, host offset or -1 for no data) runs. Whether the
/// host file has holes inside allocated clusters (qemu-img fills fresh clusters around partial
/// writes, vmm-img leaves them sparse) only shows in the "zero" flag of data ranges: ignored.
fn layout(map_json: &str) -> Vec<(u64, u64, i64)> {
    let v: serde_json::Value = serde_json::from_str(map_json).unwrap();
    let mut out: Vec<(u64, u64, i64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let host = if e["data"].as_bool().unwrap() {
            e["offset"].as_i64().unwrap()
        } else {
            -1
        };
        match out.last_mut() {
            Some(l)
                if l.0 + l.1 == start
                    && ((host < 0 && l.2 < 0) || (host >= 0 && l.2 + l.1 as i64 == host)) =>
            {
                l.1 += len
            }
            _ => out.push((start, len, host)),
        }
    }
    out
}

#[test]
fn layout_zero_detection_and_workers_match_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_source(d);
    qemu(&["convert", "-O", "qcow2", "src.raw", "q.qcow2"], d);
    let theirs = layout(&qemu(&["map", "--output=json", "q.qcow2"], d));
    // In-order writes give qemu-img's layout exactly, whatever the number of workers
    // (the copy goes through copy_file_range with cluster probes here).
    for m in ["1", "3", "16"] {
        ok(vmm(
            &["convert", "-m", m, "-O", "qcow2", "src.raw", "v.qcow2"],
            d,
        ));
        let ours = layout(&qemu(&["map", "--output=json", "v.qcow2"], d));
        assert_eq!(ours, theirs, "-m {m}");
        qemu(&["check", "v.qcow2"], d);
    }
    // The same through buffers (4 KiB clusters are not worth probing).
    for (tool, out) in [("qemu", "q4.qcow2"), ("vmm", "v4.qcow2")] {
        let args = [
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "src.raw",
            out,
        ];
        if tool == "qemu" {
            qemu(&args, d);
        } else {
            ok(vmm(&args, d));
        }
    }
    assert_eq!(
        layout(&qemu(&["map", "--output=json", "v4.qcow2"], d)),
        layout(&qemu(&["map", "--output=json", "q4.qcow2"], d))
    );
    // Out of order: any layout, same content, clean.
    ok(vmm(
        &[
            "convert", "-W", "-m", "16", "-O", "qcow2", "src.raw", "w.qcow2",
        ],
        d,
    ));
    qemu(&["check", "w.qcow2"], d);
    assert!(qemu(&["compare", "-F", "raw", "w.qcow2", "src.raw"], d).contains("identical"));
    // qcow2 to raw leaves the same holes as qemu-img (4 KiB zero detection).
    qemu(&["convert", "-O", "raw", "q.qcow2", "q.raw"], d);
    ok(vmm(&["convert", "-W", "-O", "raw", "q.qcow2", "v.raw"], d));
    assert!(qemu(
        &["compare", "-f", "raw", "-F", "raw", "v.raw", "src.raw"],
        d
    )
    .contains("identical"));
    assert_eq!(
        qemu(&["map", "-f", "raw", "--output=json", "v.raw"], d),
        qemu(&["map", "-f", "raw", "--output=json", "q.raw"], d)
    );
}

#[test]
fn progress_and_flag_errors_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_source(d);
    let theirs = qemu(
        &[
            "convert", "-p", "-f", "raw", "-O", "qcow2", "src.raw", "q.qcow2",
        ],
        d,
    );
    let ours = ok(vmm(
        &[
            "convert", "-p", "-f", "raw", "-O", "qcow2", "src.raw", "v.qcow2",
        ],
        d,
    ));
    assert_eq!(ours, theirs);
    assert!(ours.ends_with("    (100.00/100%)\r\n"), "{ours:?}");
    // -q silences -p.
    let quiet = ok(vmm(
        &["convert", "-p", "-q", "-O", "qcow2", "src.raw", "v.qcow2"],
        d,
    ));
    assert_eq!(quiet, "");
    for bad in ["0", "17", "x"] {
        let (code, _, err) = vmm(&["convert", "-m", bad, "src.raw", "o.raw"], d);
        assert_eq!(code, 1);
        assert_eq!(
            err.trim(),
            "vmm-img: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
        );
    }
    let (code, _, err) = vmm(
        &[
            "convert", "-O", "qcow2", "-B", "q.qcow2", "src.raw", "o.qcow2",
        ],
        d,
    );
    assert_eq!(code, 1);
    assert!(err.contains("Use of backing file requires explicit backing format"));
}

#[test]
fn convert_onto_a_backing_file_keeps_zeros_and_holes() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], d);
    ok(run("qemu-io", &["-c", "write -P 17 0 4M", "base.qcow2"], d));
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        d,
    );
    // A zero cluster over backing data, data, and unallocated ranges.
    ok(run(
        "qemu-io",
        &[
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 5 2M 100k",
            "top.qcow2",
        ],
        d,
    ));
    ok(vmm(
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "out.qcow2",
        ],
        d,
    ));
    qemu(&["check", "out.qcow2"], d);
    assert!(qemu(&["compare", "out.qcow2", "top.qcow2"], d).contains("identical"));
    // Only what the top image allocates is copied.
    let map = qemu(&["map", "--output=json", "out.qcow2"], d);
    assert!(map.contains("\"start\": 1048576, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "{map}");
    // A raw source with holes that do not fall on cluster boundaries: the target must read
    // as the source (zeros, not the backing file's data), with copy-on-write around them.
    qemu(&["create", "-q", "-f", "raw", "src.raw", "4M"], d);
    ok(run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 6 0 68k",
            "-c",
            "write -P 7 200k 100k",
            "src.raw",
        ],
        d,
    ));
    ok(vmm(
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.raw",
            "out2.qcow2",
        ],
        d,
    ));
    qemu(&["check", "out2.qcow2"], d);
    assert!(qemu(&["compare", "-F", "raw", "out2.qcow2", "src.raw"], d).contains("identical"));
}
