//! vmm-img against qemu-img, command for command.

mod common;

use common::*;

#[test]
fn outputs_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(vmm(&["create", "-q", "-f", "raw", "base.raw", "4M"], d));
    ok(run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 3M", "base.raw"],
        d,
    ));
    ok(vmm(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
        d,
    ));
    ok(run(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 200k",
            "-c",
            "write -z 2M 64k",
            "top.qcow2",
        ],
        d,
    ));
    ok(vmm(&["snapshot", "-c", "snap", "top.qcow2"], d));
    ok(vmm(
        &["bitmap", "--add", "-g", "128k", "top.qcow2", "bm"],
        d,
    ));
    for args in [
        &["info", "--output=json", "top.qcow2"][..],
        &["info", "top.qcow2"][..],
        &["check", "--output=json", "top.qcow2"][..],
        &["check", "top.qcow2"][..],
        &["map", "--output=json", "top.qcow2"][..],
        &["map", "top.qcow2"][..],
        &["snapshot", "-l", "top.qcow2"][..],
        &["info", "--output=json", "base.raw"][..],
    ] {
        let ours = ok(vmm(args, d));
        let theirs = qemu(args, d);
        // The disk usage of the file may differ by what the file system reports.
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.contains("actual-size") && !l.contains("disk size"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&ours), strip(&theirs), "vmm-img {args:?}");
    }
}

#[test]
fn data_commands_agree_with_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu(&["create", "-q", "-f", "qcow2", "src.qcow2", "8M"], d);
    ok(run(
        "qemu-io",
        &[
            "-c",
            "write -P 7 0 1M",
            "-c",
            "write -P 9 5M 300k",
            "src.qcow2",
        ],
        d,
    ));
    // convert both ways, with and without compression.
    ok(vmm(&["convert", "-O", "raw", "src.qcow2", "a.raw"], d));
    ok(vmm(
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "a.raw",
            "c.qcow2",
        ],
        d,
    ));
    ok(vmm(
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=off",
            "c.qcow2",
            "d.qcow2",
        ],
        d,
    ));
    for f in ["c.qcow2", "d.qcow2"] {
        qemu(&["check", f], d);
        assert!(qemu(&["compare", f, "a.raw"], d).contains("identical"));
        assert!(ok(vmm(&["compare", f, "src.qcow2"], d)).contains("identical"));
    }
    let info = qemu(&["info", "c.qcow2"], d);
    assert!(info.contains("zstd"));
    // compare finds a difference and exits 1.
    ok(run("qemu-io", &["-c", "write -P 1 4096 512", "d.qcow2"], d));
    let (code, out, _) = vmm(&["compare", "d.qcow2", "a.raw"], d);
    assert_eq!(code, 1);
    assert_eq!(out.trim(), "Content mismatch at offset 4096!");
    // resize, snapshot apply/delete and bitmaps through our tool stay clean for qemu.
    ok(vmm(&["resize", "c.qcow2", "+2M"], d));
    ok(vmm(&["snapshot", "-c", "one", "c.qcow2"], d));
    ok(run("qemu-io", &["-c", "write -P 3 0 64k", "c.qcow2"], d));
    ok(vmm(&["snapshot", "-a", "one", "c.qcow2"], d));
    ok(vmm(&["snapshot", "-d", "one", "c.qcow2"], d));
    ok(vmm(&["bitmap", "--add", "c.qcow2", "b"], d));
    ok(vmm(&["bitmap", "--disable", "c.qcow2", "b"], d));
    ok(vmm(&["bitmap", "--remove", "c.qcow2", "b"], d));
    qemu(&["check", "c.qcow2"], d);
    ok(vmm(&["resize", "a.raw", "10M"], d));
    assert!(qemu(&["compare", "c.qcow2", "a.raw"], d).contains("identical"));
    // rebase (safe) and commit.
    qemu(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        d,
    );
    ok(run("qemu-io", &["-c", "write -P 4 2M 64k", "top.qcow2"], d));
    qemu(&["convert", "-O", "raw", "top.qcow2", "ref.raw"], d);
    qemu(&["create", "-q", "-f", "qcow2", "empty.qcow2", "8M"], d);
    ok(vmm(
        &["rebase", "-b", "empty.qcow2", "-F", "qcow2", "top.qcow2"],
        d,
    ));
    assert!(qemu(&["compare", "top.qcow2", "ref.raw"], d).contains("identical"));
    assert!(qemu(&["info", "top.qcow2"], d).contains("backing file: empty.qcow2"));
    assert!(ok(vmm(&["commit", "top.qcow2"], d)).contains("Image committed."));
    assert!(qemu(&["compare", "empty.qcow2", "ref.raw"], d).contains("identical"));
    qemu(&["check", "empty.qcow2"], d);
    qemu(&["check", "top.qcow2"], d);
    // check reports leaks with qemu's exit code and repairs them.
    let (code, _, _) = vmm(&["check", "top.qcow2"], d);
    assert_eq!(code, 0);
}

#[test]
fn bench_runs_like_qemu_img_bench() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(vmm(&["create", "-q", "-f", "qcow2", "b.qcow2", "16M"], d));
    let out = ok(vmm(
        &[
            "bench",
            "-w",
            "-c",
            "2000",
            "-d",
            "32",
            "-s",
            "4k",
            "-S",
            "20480k",
            "--pattern=5",
            "b.qcow2",
        ],
        d,
    ));
    assert!(out.starts_with(
        "Sending 2000 write requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 20971520)"
    ));
    assert!(out.contains("Run completed in"));
    qemu(&["check", "b.qcow2"], d);
    ok(vmm(
        &["bench", "-c", "2000", "-d", "32", "-t", "none", "b.qcow2"],
        d,
    ));
    // Every engine of -i writes the pattern; native AIO needs O_DIRECT, as in qemu-img.
    for aio in [
        &["-i", "threads"][..],
        &["-i", "io_uring"][..],
        &["-i", "threads", "-t", "none"][..],
    ] {
        let mut args = vec!["bench", "-w", "-c", "500", "-d", "16", "--pattern=5"];
        args.extend_from_slice(aio);
        args.push("b.qcow2");
        ok(vmm(&args, d));
    }
    for (args, msg) in [
        (&["bench", "-n", "b.qcow2"][..], "vmm-img: Could not open 'b.qcow2': aio=native was specified, but it requires cache.direct=on, which was not specified."),
        (&["bench", "-i", "foo", "b.qcow2"][..], "vmm-img: Invalid aio option: foo"),
    ] {
        let (code, _, err) = vmm(args, d);
        assert_eq!(code, 1);
        assert_eq!(err.trim(), msg);
        let (qcode, _, qerr) = run("qemu-img", args, d);
        assert_eq!(qcode, 1);
        assert_eq!(qerr.trim().replace("qemu-img", "vmm-img"), msg);
    }
    // Every written block carries the pattern.
    qemu(&["create", "-q", "-f", "raw", "ref.raw", "16M"], d);
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 5 0 4k", "b.qcow2"],
        d,
    );
    assert_eq!(out.0, 0, "{}{}", out.1, out.2);
    assert!(!out.1.contains("Pattern verification failed"), "{}", out.1);
}
