//! Images opened through the block graph (`json:` file names, `--image-opts`, drivers other
//! than qcow2 and raw), each command run by vmm-img and qemu-img 7.2 alike.

mod common;

use std::path::Path;

use common::*;

/// Runs `args` with both tools; asserts the same exit code, stdout and stderr (without the
/// program name) and returns vmm-img's stdout.
fn same(args: &[&str], d: &Path) -> String {
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
fn sh(tool: &str, line: &str, d: &Path) -> String {
    let args: Vec<&str> = line.split(' ').collect();
    ok(run(tool, &args, d))
}

/// A temporary directory (`None` without qemu-img) with a raw file with data at
/// 4 KiB..12 KiB, a qcow2 base with data at 0..64 KiB and a qcow2 top over it with data at
/// 64 KiB..128 KiB.
fn images() -> Option<tempfile::TempDir> {
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

fn raw_window(d: &Path) -> String {
    format!(
        r#"json:{{"driver":"raw","offset":4096,"size":65536,"file":{{"driver":"file","filename":"{}/r.raw"}}}}"#,
        d.display()
    )
}

#[test]
fn convert_from_a_raw_window() {
    let Some(t) = images() else { return };
    let d = t.path();
    let src = raw_window(d);
    ok(vmm(&["convert", "-O", "raw", &src, "v.raw"], d));
    qemu(&["convert", "-O", "raw", &src, "q.raw"], d);
    let v = std::fs::read(d.join("v.raw")).unwrap();
    assert_eq!(v, std::fs::read(d.join("q.raw")).unwrap());
    assert_eq!(v.len(), 65536);
    assert!(v[..8192].iter().all(|&b| b == 3) && v[8192..].iter().all(|&b| b == 0));
    ok(vmm(&["convert", "-O", "qcow2", &src, "v.qcow2"], d));
    assert_eq!(
        qemu(&["compare", "v.qcow2", "q.raw"], d),
        "Images are identical.\n"
    );
    // Only the data was written: the zeros of the window stay unallocated.
    same(&["map", "--output=json", "v.qcow2"], d);
    // The window as the backing file of a qcow2 image (its name in the header is json:).
    let create = ["create", "-f", "qcow2", "-b", &src, "-F", "raw", "ov.qcow2"];
    same(&create, d);
    let ov = same(&["map", "ov.qcow2"], d);
    assert!(ov.contains("r.raw"), "{ov}");
    same(&["info", "--backing-chain", "ov.qcow2"], d);
    ok(vmm(&["convert", "-O", "raw", "ov.qcow2", "ov.raw"], d));
    assert_eq!(std::fs::read(d.join("ov.raw")).unwrap(), v);
    // The same window through --image-opts, with values as strings.
    let opts = format!(
        "driver=raw,offset=4096,size=65536,file.filename={}/r.raw",
        d.display()
    );
    ok(vmm(
        &["convert", "--image-opts", "-O", "raw", &opts, "o.raw"],
        d,
    ));
    assert_eq!(std::fs::read(d.join("o.raw")).unwrap(), v);
    // The file name keeps the values as given (strings from --image-opts).
    let info = same(&["info", "--image-opts", &opts], d);
    assert!(info.contains(r#""offset": "4096""#), "{info}");
    // Progress lines as qemu-img prints them.
    let p = same(&["convert", "-p", "-O", "qcow2", &src, "p.qcow2"], d);
    assert!(p.contains("(100.00/100%)"), "{p}");
    // -n into an existing target named by json: (a plain raw file, opened directly).
    qemu(&["create", "-q", "-f", "raw", "n.raw", "64k"], d);
    let n = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}/n.raw"}}}}"#,
        d.display()
    );
    ok(vmm(&["convert", "-n", "-O", "raw", &src, &n], d));
    assert_eq!(std::fs::read(d.join("n.raw")).unwrap(), v);
}

#[test]
fn compare_through_image_opts() {
    let Some(t) = images() else { return };
    let d = t.path();
    qemu(&["convert", "-O", "raw", "top.qcow2", "top.raw"], d);
    let q = format!("driver=qcow2,file.filename={}/top.qcow2", d.display());
    let r = format!("driver=raw,file.filename={}/top.raw", d.display());
    let other = format!("driver=raw,file.filename={}/r.raw", d.display());
    assert_eq!(
        same(&["compare", "--image-opts", &q, &r], d),
        "Images are identical.\n"
    );
    same(&["compare", "--image-opts", &q, &other], d);
    same(&["compare", "-s", "--image-opts", &r, &q], d);
    // The mixed form qemu-img refuses.
    same(&["compare", "-f", "qcow2", "--image-opts", &q, &r], d);
    // json: on one side, a plain file on the other.
    let j = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}/top.qcow2"}}}}"#,
        d.display()
    );
    assert_eq!(
        same(&["compare", &j, "top.raw"], d),
        "Images are identical.\n"
    );
}

#[test]
fn info_and_map_of_json_names() {
    let Some(t) = images() else { return };
    let d = t.path();
    let w = raw_window(d);
    let out = same(&["info", &w], d);
    assert!(out.starts_with(r#"image: json:{"offset": 4096, "driver": "raw", "size": 65536"#));
    same(&["info", "--output=json", &w], d);
    same(&["map", &w], d);
    let top = format!("{}/top.qcow2", d.display());
    let no_backing = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{top}"}}}}"#
    );
    let with_backing =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}}}}"#);
    for name in [&no_backing, &with_backing] {
        same(&["info", name], d);
        same(&["info", "--output=json", name], d);
        same(&["map", name], d);
        same(&["map", "--output=json", name], d);
    }
    let map = same(&["map", "--output=json", &no_backing], d);
    assert!(
        !map.contains("\"depth\": 1"),
        "backing: null opens no backing file"
    );
    same(&["info", "--backing-chain", &with_backing], d);
    // Another backing node than the header's: map follows it; info, which opens without
    // backing files, refuses the option like qemu-img.
    let raw_backing = format!(
        r#"json:{{"driver":"qcow2","backing":{{"driver":"raw","file":{{"driver":"file","filename":"{}/r.raw"}}}},"file":{{"driver":"file","filename":"{top}"}}}}"#,
        d.display()
    );
    let m = same(&["map", &raw_backing], d);
    assert!(m.contains("r.raw"), "{m}");
    // (Not --output=json: the graph's file driver gives holes no offset, QEMU's does.)
    same(&["info", &raw_backing], d);
    same(&["info", "--backing-chain", &raw_backing], d);
    same(
        &["info", "--backing-chain", "--output=json", &with_backing],
        d,
    );
    let opts = format!("driver=qcow2,file.filename={top},backing=");
    same(&["info", "--image-opts", &opts], d);
    same(
        &[
            "map",
            "--image-opts",
            &format!("driver=qcow2,file.filename={top}"),
        ],
        d,
    );
    // No driver: the format is probed; dotted keys nest.
    same(
        &["info", &format!(r#"json:{{"file.filename":"{top}"}}"#)],
        d,
    );
    // A blkdebug node shows its rules in QEMU's flattened form.
    let dbg = format!(
        r#"json:{{"driver":"blkdebug","inject-error":[{{"event":"read_aio","errno":5}}],"image":{{"driver":"raw","file":{{"driver":"file","filename":"{}/r.raw"}}}}}}"#,
        d.display()
    );
    same(&["info", &dbg], d);
    // A quorum of two copies reads like one.
    let q = format!(
        r#"json:{{"driver":"quorum","vote-threshold":2,"children":[{{"driver":"raw","file":{{"driver":"file","filename":"{0}/r.raw"}}}},{{"driver":"raw","file":{{"driver":"file","filename":"{0}/r.raw"}}}}]}}"#,
        d.display()
    );
    assert_eq!(
        same(&["compare", &q, "r.raw"], d),
        "Images are identical.\n"
    );
    // Errors.
    for bad in [
        r#"json:{"driver":"nope","file":{"driver":"file","filename":"/nonexistent"}}"#,
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/nonexistent"}}"#,
        r#"json:{"driver":"qcow2","filename":"/nonexistent"}"#,
        r#"json:{"filename":"/nonexistent"}"#,
        r#"json:{"driver":"raw","file":{}}"#,
    ] {
        same(&["info", bad], d);
    }
    let raw_as_qcow2 = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}/r.raw"}}}}"#,
        d.display()
    );
    same(&["info", &raw_as_qcow2], d);
}

#[test]
fn blkdebug_read_error_fails_convert() {
    let Some(t) = images() else { return };
    let d = t.path();
    // Data from the first byte (QEMU's file driver reports the first 4 KiB of any file as
    // data; the graph's reports holes as they are, so a file starting with a hole would
    // fail at its first data instead).
    qemu(&["convert", "-O", "raw", "top.qcow2", "d.raw"], d);
    // raw raises read_aio on its file, where blkdebug injects EIO.
    let src = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"blkdebug","inject-error":[{{"event":"read_aio","errno":5}}],"image":{{"driver":"file","filename":"{}/d.raw"}}}}}}"#,
        d.display()
    );
    let v = vmm(&["convert", "-O", "raw", &src, "v.raw"], d);
    let q = run("qemu-img", &["convert", "-O", "raw", &src, "q.raw"], d);
    assert_eq!(v.0, 1);
    assert_eq!(q.0, 1);
    assert_eq!(
        v.2, "vmm-img: error while reading at byte 0: Input/output error\n",
        "{v:?}"
    );
    assert_eq!(v.2.replace("vmm-img", "qemu-img"), q.2);
    // compare reports the failed read with exit code 4.
    let c = vmm(&["compare", &src, "d.raw"], d);
    assert_eq!(c.0, 4, "{c:?}");
    assert!(
        c.2.contains("Error while reading offset 0 of json:")
            && c.2.ends_with(": Input/output error\n"),
        "{c:?}"
    );
}

#[test]
fn null_co_is_a_zero_source() {
    let Some(t) = images() else { return };
    let d = t.path();
    let z = r#"json:{"driver":"null-co","size":1048576,"read-zeroes":true}"#;
    same(&["info", z], d);
    same(&["info", "--output=json", z], d);
    ok(vmm(&["convert", "-O", "qcow2", z, "z.qcow2"], d));
    qemu(&["convert", "-O", "qcow2", z, "q.qcow2"], d);
    // Nothing allocated in either target, and both read as zeros.
    assert_eq!(
        same(&["map", "--output=json", "z.qcow2"], d),
        qemu(&["map", "--output=json", "q.qcow2"], d)
    );
    assert_eq!(
        same(&["compare", "z.qcow2", z], d),
        "Images are identical.\n"
    );
    same(&["info", "-f", "null-co", "null-co://"], d);
    same(&["info", "-f", "null-co", "/nonexistent"], d);
    // bench through the graph.
    let b = ok(vmm(
        &[
            "bench",
            "-c",
            "256",
            "-d",
            "8",
            "-f",
            "null-co",
            "null-co://",
        ],
        d,
    ));
    assert!(b.starts_with("Sending 256 read requests, 4096 bytes each, 8 in parallel"));
    assert!(b.contains("Run completed in "));
}

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

/// Stops the process on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_image_locks_apply() {
    let Some(t) = images() else { return };
    let d = t.path();
    // qemu-nbd holds top.qcow2 writable (and its backing file read-only).
    let sock = d.join("nbd.sock");
    let nbd = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-t", "-k"])
        .arg(&sock)
        .arg(d.join("top.qcow2"))
        .spawn();
    let Ok(nbd) = nbd else { return };
    let _nbd = Child(nbd);
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(sock.exists(), "qemu-nbd did not start");
    let j = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}/top.qcow2"}}}}"#,
        d.display()
    );
    let err = same(&["info", &j], d);
    assert!(err.is_empty());
    assert!(vmm(&["info", &j], d)
        .2
        .contains("Failed to get shared \"write\" lock\nIs another process using the image"));
    // -U shares the image, as in qemu-img.
    same(&["info", "-U", &j], d);
    same(&["map", "-U", "--output=json", &j], d);
    // snapshot -l through the graph takes the lock unless -U.
    let dbg = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}/top.qcow2"}}}}}}"#,
        d.display()
    );
    same(&["snapshot", "-l", &dbg], d);
    same(&["snapshot", "-l", "-U", &dbg], d);
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
fn block_status_offsets_of_zero_extents_like_qemu() {
    // QEMU reports the host offset of zero extents in files (holes) and of null-co with
    // read-zeroes; null-co without read-zeroes is neither data nor zero.
    let Some(t) = images() else { return };
    let d = t.path();
    let raw = format!("{}/r.raw", d.display());
    for j in [
        format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{raw}"}}}}"#),
        format!(
            r#"json:{{"driver":"raw","offset":2048,"file":{{"driver":"file","filename":"{raw}"}}}}"#
        ),
        r#"json:{"driver":"null-co","size":1048576,"read-zeroes":true}"#.to_string(),
        r#"json:{"driver":"null-co","size":1048576}"#.to_string(),
    ] {
        // Exit code, output and errors as qemu-img's.
        same(&["map", "--output=json", &j], d);
    }
}

#[test]
fn legacy_blkdebug_names_and_sizes_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    // -f blkdebug FILE: the file is blkdebug's image (a protocol: not probed), also in
    // the legacy blkdebug:CONFIG:FILE form.
    for name in ["top.qcow2", "blkdebug::r.raw", "blkdebug:r.raw"] {
        same(&["info", "-f", "blkdebug", name], d);
    }
    let image_only = format!(
        r#"json:{{"driver":"blkdebug","image":{{"filename":"{}/base.qcow2"}}}}"#,
        d.display()
    );
    assert!(same(&["info", &image_only], d).contains("file format: blkdebug"));
    same(&["info", r#"json:{"driver":"blkdebug","image":{}}"#], d);
    // Size options take QEMU's suffixes; bad ones are refused with its words.
    let opts = format!(
        "driver=raw,offset=4k,size=8k,file.filename={}/r.raw",
        d.display()
    );
    let info = same(&["info", "--image-opts", &opts], d);
    assert!(info.contains(r#""offset": "4k""#), "{info}");
    assert_eq!(
        ok(vmm(&["map", "--output=json", "--image-opts", &opts], d)),
        qemu(&["map", "--output=json", "--image-opts", &opts], d)
    );
    for z in [
        r#"json:{"driver":"null-co","size":"64k"}"#,
        r#"json:{"driver":"null-co","size":"1.5k"}"#,
        r#"json:{"driver":"null-co","size":"0x10k"}"#,
    ] {
        same(&["info", z], d);
    }
    for bad in ["abc", "16E", "1.5"] {
        let o = format!(
            "driver=raw,offset={bad},file.filename={}/r.raw",
            d.display()
        );
        same(&["info", "--image-opts", &o], d);
    }
}

#[test]
fn info_and_map_name_filters_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    // info opens without backing files and without I/O: the closed backing file does not
    // make the name json:, so a qcow2 image over blkdebug is blkdebug::FILE.
    let over_dbg = |f: &str| {
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}/{f}"}}}}}}"#,
            d.display()
        )
    };
    let top = over_dbg("top.qcow2");
    assert!(same(&["info", &top], d).starts_with("image: blkdebug::/"));
    same(&["info", "--output=json", &top], d);
    // Not through a format node in between (qcow2 over raw keeps its json: name).
    let over_raw = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"raw","file":{{"driver":"file","filename":"{}/top.qcow2"}}}}}}"#,
        d.display()
    );
    assert!(same(&["info", &over_raw], d).starts_with("image: json:"));
    // map's File column names the node block status returns: the qcow2 node's file child.
    let base = over_dbg("base.qcow2");
    assert!(same(&["map", &base], d).contains(" blkdebug::/"));
    same(&["map", &top], d);
    // Data without an offset (quorum, compressed clusters) cannot be shown by the human
    // format.
    qemu(&["convert", "-c", "-O", "qcow2", "top.qcow2", "c.qcow2"], d);
    same(&["map", "c.qcow2"], d);
    let q = format!(
        r#"json:{{"driver":"quorum","vote-threshold":1,"children":[{{"driver":"raw","file":{{"driver":"file","filename":"{}/r.raw"}}}}]}}"#,
        d.display()
    );
    same(&["map", &q], d);
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
fn open_errors_and_data_files_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    // Backing files that do not open, at each depth; the file itself missing.
    sh(
        "qemu-img",
        "create -q -f qcow2 -u -b gone.qcow2 -F qcow2 mb.qcow2 1M",
        d,
    );
    sh(
        "qemu-img",
        "create -q -f qcow2 -u -b mb.qcow2 -F qcow2 c2.qcow2 1M",
        d,
    );
    sh(
        "qemu-img",
        "create -q -f qcow2 -u -b r.raw -F qcow2 bad.qcow2 1M",
        d,
    );
    let abs = format!("{}/c2.qcow2", d.display());
    for args in [
        &["info", "nonexist.qcow2"][..],
        &["info", "."],
        &["check", "."],
        &["map", "mb.qcow2"],
        &["map", "c2.qcow2"],
        &["map", &abs],
        &["map", "bad.qcow2"],
        &["info", "--backing-chain", "mb.qcow2"],
        &["compare", "mb.qcow2", "r.raw"],
        // check, snapshot, resize and commit open the backing chain too.
        &["check", "mb.qcow2"],
        &["check", "nonexist.qcow2"],
        &["snapshot", "-l", "mb.qcow2"],
        &["snapshot", "-c", "s", "c2.qcow2"],
        &["resize", "mb.qcow2", "2M"],
        &["commit", "c2.qcow2"],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "nonexist.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
            "1M",
        ],
        &[
            "create", "-q", "-f", "qcow2", "-b", "mb.qcow2", "-F", "qcow2", "x.qcow2", "1M",
        ],
    ] {
        same(args, d);
    }
    // map names an external data file as the header does.
    sh(
        "qemu-img",
        "create -q -f qcow2 -o data_file=df.raw df.qcow2 1M",
        d,
    );
    ok(run("qemu-io", &["-c", "write 0 64k", "df.qcow2"], d));
    assert!(same(&["map", "df.qcow2"], d).contains(" df.raw\n"));
}

#[test]
fn legacy_open_rules_and_check_through_filters_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    let top = format!("{}/top.qcow2", d.display());
    // check of a qcow2 image over a filter runs through the graph; JSON names the image
    // as given.
    let dbg = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{top}"}}}}}}"#
    );
    let plain =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{top}"}}}}"#);
    for args in [
        &["check", &dbg][..],
        &["check", "--output=json", &dbg],
        &["check", "-r", "all", &dbg],
        &["check", "--output=json", &plain],
    ] {
        same(args, d);
    }
    // A file name in the options is a file, whatever prefix it has; quorum's legacy
    // checks come in QEMU's order.
    for args in [
        &[
            "info",
            "--image-opts",
            "driver=raw,file.filename=null-co://",
        ][..],
        &["info", r#"json:{"driver":"quorum"}"#],
        &["info", r#"json:{"driver":"quorum","children":[]}"#],
        &[
            "info",
            r#"json:{"driver":"quorum","children":[{"driver":"null-co"}]}"#,
        ],
    ] {
        same(args, d);
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

#[test]
fn strict_compare_sees_the_end_of_file_flag() {
    let Some(t) = images() else { return };
    let d = t.path();
    // top.qcow2 reads base.qcow2's data at 0, nothing at 64k..128k; base ends its
    // unallocated tail at EOF, so QEMU's flag words differ at 64k.
    let dbg = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}/top.qcow2"}}}}}}"#,
        d.display()
    );
    for args in [
        &["compare", "-s", "top.qcow2", "base.qcow2"][..],
        &["compare", "-s", &dbg, "base.qcow2"],
        &["compare", "-s", "base.qcow2", "base.qcow2"],
    ] {
        same(args, d);
    }
}

#[test]
fn names_and_backing_chains_of_nested_formats_like_qemu() {
    let Some(t) = images() else { return };
    let d = t.path();
    let top = format!("{}/top.qcow2", d.display());
    let raw = format!("{}/r.raw", d.display());
    // A format over a format node keeps a json: name (QEMU names a node after its
    // child only when that child is a protocol); --backing-chain follows the header's
    // backing file even where the options leave it closed.
    for name in [
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"raw","file":{{"driver":"file","filename":"{raw}"}}}}}}"#
        ),
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"raw","file":{{"driver":"file","filename":"{top}"}}}}}}"#
        ),
        format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{top}"}}}}}}"#
        ),
    ] {
        same(&["info", &name], d);
        same(&["info", "--backing-chain", &name], d);
        same(&["info", "--output=json", "--backing-chain", &name], d);
    }
}
