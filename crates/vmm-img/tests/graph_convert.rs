//! Converting, comparing and benchmarking images opened through the block graph
//! (`json:` file names, `--image-opts`, drivers other than qcow2 and raw), each command
//! run by vmm-img and qemu-img 7.2 alike.

mod common;

use common::*;

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
