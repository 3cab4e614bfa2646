//! Image-changing commands (`snapshot`, `check`, `commit`, `bitmap`, `resize`, `create`)
//! on images opened through the block graph, and how its drivers (quorum, blkverify,
//! blkdebug, null-co, raw windows) answer, each command run by vmm-img and qemu-img 7.2
//! alike.

mod common;

use common::*;

#[test]
fn qcow2_commands_on_graph_sources() {
    let Some(t) = images() else { return };
    let d = t.path();
    let top = format!("{}/top.qcow2", d.display());
    let j = format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}}}}"#);
    same(&["check", &j], d);
    same(
        &[
            "check",
            "--image-opts",
            &format!("driver=qcow2,file.filename={top}"),
        ],
        d,
    );
    same(&["snapshot", "-l", &j], d);
    let n = r#"json:{"driver":"null-co","size":1048576}"#;
    for args in [
        &["check", n][..],
        &["snapshot", "-l", n],
        &["snapshot", "-c", "s1", n],
        &["snapshot", "-a", "s1", n],
        &["snapshot", "-d", "s1", n],
        &["resize", n, "2M"],
        &["commit", n],
    ] {
        same(args, d);
    }
    // A snapshot made through a json: name lands in the file.
    ok(vmm(&["snapshot", "-c", "s1", &j], d));
    assert!(qemu(&["snapshot", "-l", "top.qcow2"], d).contains(" s1 "));
    // A qcow2 that is not a plain file (a blkdebug filter between it and its file): the
    // snapshot calls go through the graph.
    let dbg = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{top}"}}}}}}"#
    );
    ok(vmm(&["snapshot", "-c", "s2", &dbg], d));
    let l = ok(vmm(&["snapshot", "-l", &dbg], d));
    assert!(l.contains(" s1 ") && l.contains(" s2 "), "{l}");
    ok(vmm(&["snapshot", "-d", "s2", &dbg], d));
    assert!(!qemu(&["snapshot", "-l", "top.qcow2"], d).contains(" s2 "));
    assert!(qemu(&["check", "top.qcow2"], d).starts_with("No errors were found"));
    let o = format!("driver=qcow2,file.filename={top}");
    ok(vmm(&["snapshot", "--image-opts", "-d", "s1", &o], d));
    same(&["snapshot", "-l", "--image-opts", &o], d);
    ok(vmm(&["bitmap", "--add", "--image-opts", &o, "b0"], d));
    assert!(qemu(&["info", "top.qcow2"], d).contains("name: b0"));
    // commit --image-opts, by each tool on its own copy of the chain.
    for (tool, dir) in [("vmm", "v"), ("qemu", "q")] {
        let sub = d.join(dir);
        std::fs::create_dir(&sub).unwrap();
        for f in ["base.qcow2", "top.qcow2"] {
            std::fs::copy(d.join(f), sub.join(f)).unwrap();
        }
        let o = format!("driver=qcow2,file.filename={}/top.qcow2", sub.display());
        let args = ["commit", "--image-opts", &o];
        let out = if tool == "vmm" {
            ok(vmm(&args, d))
        } else {
            qemu(&args, d)
        };
        assert_eq!(out, "Image committed.\n");
    }
    assert_eq!(
        qemu(&["compare", "v/base.qcow2", "q/base.qcow2"], d),
        "Images are identical.\n"
    );
    assert_eq!(
        qemu(&["map", "--output=json", "v/top.qcow2"], d),
        qemu(&["map", "--output=json", "q/top.qcow2"], d)
    );
    for args in [
        &["rebase", "-u", "-b", "", n][..],
        &["snapshot", "-l", "--image-opts", "driver=null-co"],
    ] {
        same(args, d);
    }
    // bench through the graph on the qcow2 file.
    let b = ok(vmm(
        &[
            "bench",
            "-c",
            "64",
            "-d",
            "4",
            "-s",
            "64k",
            "--image-opts",
            &format!("driver=qcow2,file.filename={top}"),
        ],
        d,
    ));
    assert!(b.contains("Run completed in "), "{b}");
}

#[test]
fn drivers_answer_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    let top = format!("{}/top.qcow2", d.display());
    // snapshot -a through filters falls back to the qcow2 node, as bdrv_snapshot_goto.
    qemu(&["snapshot", "-c", "s1", "top.qcow2"], d);
    let io = |cmd: &str| ok(run("qemu-io", &["-f", "qcow2", "-c", cmd, "top.qcow2"], d));
    io("write -P 9 64k 64k");
    for j in [
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{top}"}}}}}}"#
        ),
        format!(
            r#"json:{{"driver":"raw","offset":512,"file":{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}}}}}}"#
        ),
    ] {
        assert_eq!(same(&["snapshot", "-a", "s1", &j], d), "");
        assert!(io("read -P 2 64k 64k").contains("read 65536/65536"));
        io("write -P 9 64k 64k");
        same(&["snapshot", "-a", "nope", &j], d);
    }
    let q1 = format!(
        r#"json:{{"driver":"quorum","vote-threshold":1,"children":[{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}}}}]}}"#
    );
    same(&["snapshot", "-a", "s1", &q1], d);
    assert!(qemu(&["check", "top.qcow2"], d).starts_with("No errors were found"));
    // quorum: its options in the json: name, the children's allocations summed.
    std::fs::copy(d.join("r.raw"), d.join("r2.raw")).unwrap();
    let q = format!(
        r#"json:{{"driver":"quorum","vote-threshold":2,"read-pattern":"quorum","children":[{{"driver":"raw","file":{{"driver":"file","filename":"{0}/r.raw"}}}},{{"driver":"raw","file":{{"driver":"file","filename":"{0}/r2.raw"}}}}]}}"#,
        d.display()
    );
    let out = same(&["info", &q], d);
    assert!(out.contains(r#""vote-threshold": 2"#) && out.contains("disk size: "));
    same(&["info", "--output=json", &q], d);
    // Block status: zero where all children read as zero, else data (without offset).
    same(&["map", "--output=json", &q], d);
    let qo = format!(
        "driver=quorum,vote-threshold=2,children.0.driver=raw,children.0.file.filename={0}/r.raw,children.1.driver=raw,children.1.file.filename={0}/r2.raw",
        d.display()
    );
    same(&["info", "--image-opts", &qo], d);
    // Children of different lengths.
    let bad = format!(
        r#"json:{{"driver":"quorum","vote-threshold":1,"children":[{{"driver":"raw","file":{{"driver":"file","filename":"{0}/r.raw"}}}},{{"driver":"null-co"}}]}}"#,
        d.display()
    );
    same(&["info", &bad], d);
    // No dirty flag where bdrv_get_info has no answer (raw over null-co), one through
    // blkdebug; blkdebug without options of its own is named blkdebug::FILE.
    let raw_null = r#"json:{"driver":"raw","file":{"driver":"null-co","size":1048576}}"#;
    same(&["info", raw_null], d);
    same(&["info", "--output=json", raw_null], d);
    let dbg = format!(
        r#"json:{{"driver":"blkdebug","image":{{"driver":"raw","file":{{"driver":"file","filename":"{}/r.raw"}}}}}}"#,
        d.display()
    );
    assert!(same(&["info", &dbg], d).starts_with("image: blkdebug::/"));
    same(&["info", "--output=json", &dbg], d);
    let qdbg = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}/base.qcow2"}}}}}}"#,
        d.display()
    );
    same(&["info", "--output=json", "--backing-chain", &qdbg], d);
    // null-co without read-zeroes is not allocated (QEMU also says "zero": false, which
    // the graph's generic layer does not yet).
    let m = ok(vmm(&["map", "--output=json", raw_null], d));
    assert!(m.contains(r#""present": false"#), "{m}");
    same(&["map", raw_null], d);
}

#[test]
fn blkverify_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    std::fs::copy(d.join("r.raw"), d.join("r2.raw")).unwrap();
    let b = format!(
        r#"json:{{"driver":"blkverify","test":{{"driver":"raw","file":{{"driver":"file","filename":"{0}/r.raw"}}}},"raw":{{"driver":"file","filename":"{0}/r2.raw"}}}}"#,
        d.display()
    );
    // The name (blkverify:RAW:TEST); disk size is "unavailable" (a protocol-style driver).
    let v = same(&["info", &b], d);
    assert!(v.starts_with("image: blkverify:/"), "{v}");
    assert!(v.contains("disk size: unavailable"), "{v}");
    same(&["map", &b], d);
    same(&["compare", &b, "r.raw"], d);
    // Snapshots: the raw image is the primary child, so QEMU neither lists the test
    // image's snapshots nor applies one.
    qemu(&["snapshot", "-c", "s1", "top.qcow2"], d);
    let b2 = format!(
        r#"json:{{"driver":"blkverify","test":{{"driver":"qcow2","file":{{"driver":"file","filename":"{0}/top.qcow2"}}}},"raw":{{"driver":"file","filename":"{0}/r2.raw"}}}}"#,
        d.display()
    );
    same(&["snapshot", "-l", &b2], d);
    same(&["snapshot", "-a", "s1", &b2], d);
}

#[test]
fn raw_create_allocates_the_first_block_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    // file-posix's allocate_first_block: 4 KiB (512 bytes below 4 KiB) of zeros written.
    for (size, prealloc) in [
        ("1M", "off"),
        ("100", "off"),
        ("1M", "falloc"),
        ("1M", "full"),
    ] {
        let o = format!("preallocation={prealloc}");
        let args = ["create", "-f", "raw", "-o", &o, "n.raw", size];
        let q = qemu(&args, d);
        let qmap = qemu(&["map", "--output=json", "-f", "raw", "n.raw"], d);
        let qlen = std::fs::metadata(d.join("n.raw")).unwrap().len();
        std::fs::remove_file(d.join("n.raw")).unwrap();
        assert_eq!(ok(vmm(&args, d)), q);
        assert_eq!(
            qemu(&["map", "--output=json", "-f", "raw", "n.raw"], d),
            qmap
        );
        assert_eq!(std::fs::metadata(d.join("n.raw")).unwrap().len(), qlen);
    }
    // Errors name the file, as bdrv_img_create's do.
    for args in [
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "m.raw",
            "1M",
        ][..],
        &["create", "-q", "-f", "raw", "/nonexistent/x.raw", "1M"],
        &[
            "create",
            "-q",
            "-f",
            "raw",
            "-b",
            "nope.qcow2",
            "b.raw",
            "1M",
        ],
        &["create", "-q", "-f", "nope", "b.raw", "1M"],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "c.qcow2",
            "1M",
        ],
    ] {
        same(args, d);
    }
    // -o values as QEMU's option parser reads them (strtosz sizes, numbers, enums), the
    // options raw images know, a size given twice.
    for (fmt, o, size) in [
        ("qcow2", "size=1Q", None),
        ("qcow2", "size=16E", None),
        ("qcow2", "compat=9", Some("1M")),
        ("qcow2", "refcount_bits=x", Some("1M")),
        ("qcow2", "compression_type=x", Some("1M")),
        ("qcow2", "size=64k", Some("1M")),
        ("raw", "cluster_size=4k", Some("1M")),
        ("raw", "size=1.5k", None),
    ] {
        let mut args = vec!["create", "-q", "-f", fmt, "-o", o, "o.img"];
        args.extend(size);
        same(&args, d);
    }
}

#[test]
fn snapshots_of_raw_and_bitmap_images_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    // A raw image, plain (probed: QEMU warns on writable opens) or named by json:.
    let j = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}/r.raw"}}}}"#,
        d.display()
    );
    for name in [&j[..], "r.raw"] {
        for op in [&["-l"][..], &["-c", "s1"], &["-a", "s1"], &["-d", "s1"]] {
            let mut args = vec!["snapshot"];
            args.extend_from_slice(op);
            args.push(name);
            same(&args, d);
        }
    }
    // A missing snapshot is an errno from the driver; persistent bitmaps refuse any.
    same(&["snapshot", "-a", "nope", "base.qcow2"], d);
    qemu(&["snapshot", "-c", "s1", "base.qcow2"], d);
    qemu(&["bitmap", "--add", "base.qcow2", "b0"], d);
    for n in ["s1", "nope"] {
        same(&["snapshot", "-a", n, "base.qcow2"], d);
    }
}

#[test]
fn resize_and_bitmap_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    // resize through the graph (qcow2 over a filter, a raw window), refusals as 7.2's.
    std::fs::copy(d.join("top.qcow2"), d.join("v.qcow2")).unwrap();
    std::fs::copy(d.join("top.qcow2"), d.join("q.qcow2")).unwrap();
    sh("qemu-img", "create -q -f raw v.raw 1M", d);
    sh("qemu-img", "create -q -f raw q.raw 1M", d);
    for (tool, img) in [("vmm", "v"), ("qemu", "q")] {
        let dbg = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}/{img}.qcow2"}}}}}}"#,
            d.display()
        );
        let win = format!(
            r#"json:{{"driver":"raw","offset":4096,"file":{{"driver":"file","filename":"{}/{img}.raw"}}}}"#,
            d.display()
        );
        for args in [["resize", &dbg, "2M"], ["resize", &win, "+1M"]] {
            let r = if tool == "vmm" {
                vmm(&args, d)
            } else {
                run("qemu-img", &args, d)
            };
            assert_eq!(ok(r), "Image resized.\n");
        }
    }
    assert_eq!(
        std::fs::metadata(d.join("v.raw")).unwrap().len(),
        std::fs::metadata(d.join("q.raw")).unwrap().len()
    );
    assert_eq!(
        qemu(&["info", "v.qcow2"], d).replace("v.qcow2", "x"),
        qemu(&["info", "q.qcow2"], d).replace("q.qcow2", "x")
    );
    let fixed = format!(
        r#"json:{{"driver":"raw","size":4096,"file":{{"driver":"file","filename":"{}/v.raw"}}}}"#,
        d.display()
    );
    for args in [
        &["resize", &fixed, "2M"][..],
        &["resize", "v.qcow2", "1M"],
        &["resize", "-f", "raw", "v.raw", "64k"],
        &["resize", "v.qcow2", "1Q"],
        &["create", "-q", "-f", "qcow2", "x.qcow2", "1Q"],
    ] {
        same(args, d);
    }
    // bitmap: qemu-img's "Operation ... failed" errors; a qcow2 image over a filter.
    qemu(&["bitmap", "--add", "v.qcow2", "b"], d);
    for args in [
        &["bitmap", "--add", "v.qcow2", "b"][..],
        &["bitmap", "--remove", "v.qcow2", "x"],
        &["bitmap", "--clear", "v.qcow2", "x"],
        &["bitmap", "--merge", "x", "v.qcow2", "b"],
        &["bitmap", "--add", "-g", "3k", "v.qcow2", "c"],
        &["bitmap", "--add", "-g", "abc", "v.qcow2", "c"],
        &["bitmap", "--enable", "-f", "raw", "r.raw", "b"],
        &["bitmap", "--remove", r#"json:{"driver":"null-co"}"#, "b"],
    ] {
        same(args, d);
    }
    let dbg = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}/v.qcow2"}}}}}}"#,
        d.display()
    );
    ok(vmm(&["bitmap", "--add", &dbg, "b2"], d));
    let info = same(&["info", "-U", &dbg], d);
    assert!(info.contains("name: b2"), "{info}");
    assert!(qemu(&["check", "v.qcow2"], d).starts_with("No errors were found"));
}
