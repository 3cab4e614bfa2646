//! Opening and naming images through the block graph (`json:` file names, `--image-opts`,
//! legacy file names, image locks, open errors) and what `info` and `map` show of them,
//! each command run by vmm-img and qemu-img 7.2 alike.

mod common;

use common::*;

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
