//! Drivers answering as QEMU 7.2's do: internal snapshot apply through filters, null-co's
//! block status, the file driver's first block, quorum's and blkdebug's names, sizes and
//! image information.

mod common;

use std::path::Path;
use std::sync::Arc;

use block_graph::drivers::file::{FileDriver, FileOptions};
use block_graph::drivers::{node_filename, snapshot_goto};
use block_graph::qmp::query::image_info;
use block_graph::{BlockDriver, BlockGraph, Node, WriteFlags};
use common::*;
use serde_json::{json, Value};

fn add(g: &mut BlockGraph, v: Value) -> Arc<Node> {
    g.blockdev_add(&opts(v)).unwrap()
}

fn qcow2_file(dir: &Path, name: &str) -> String {
    let p = dir.join(name).to_string_lossy().into_owned();
    block_graph::ops::create_image(&p, "qcow2", 1 << 20, None).unwrap();
    p
}

fn read(g: &mut BlockGraph, name: &str, node: &Arc<Node>, off: u64) -> u8 {
    let be = g
        .create_backend(name, Some(node), Default::default())
        .unwrap();
    let mut b = [0u8; 1];
    be.read_buf(off, &mut b).unwrap();
    g.delete_backend(name).unwrap();
    b[0]
}

#[test]
fn snapshot_goto_through_filters_like_bdrv_snapshot_goto() {
    let d = tempfile::tempdir().unwrap();
    let p = qcow2_file(d.path(), "a.qcow2");
    let mut g = BlockGraph::new();
    let q = add(
        &mut g,
        json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": p}}),
    );
    let be = g.create_backend("d", Some(&q), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    be.write_buf(0, &[1u8; 4096], WriteFlags::default())
        .unwrap();
    q.driver().snapshot_create("s1").unwrap();
    be.write_buf(0, &[2u8; 4096], WriteFlags::default())
        .unwrap();
    be.flush().unwrap();
    g.detach_device(&be);
    g.delete_backend("d").unwrap();
    drop(be);
    assert_eq!(read(&mut g, "r", &q, 0), 2);
    // raw (with a window: QEMU still falls back to the primary child) over blkdebug over
    // the qcow2 node.
    let top = add(
        &mut g,
        json!({"driver": "raw", "node-name": "top", "offset": 512, "file": {
            "driver": "blkdebug", "node-name": "dbg", "image": "q"}}),
    );
    // By id, from the top node.
    snapshot_goto(&top, "1").unwrap();
    assert_eq!(read(&mut g, "r", &q, 0), 1);
    // Unknown snapshots: qcow2's -ENOENT in bdrv_snapshot_goto's words.
    assert_eq!(
        snapshot_goto(&top, "nope").unwrap_err().to_string(),
        "Failed to load snapshot: No such file or directory"
    );
    // A dirty bitmap on any node on the way refuses the apply.
    g.bitmap_add("dbg", "b0", None, false, false).unwrap();
    assert_eq!(
        snapshot_goto(&top, "s1").unwrap_err().to_string(),
        "Device has active dirty bitmaps"
    );
    g.bitmap_remove("dbg", "b0").unwrap();
    snapshot_goto(&top, "s1").unwrap();
    g.close_all();
    assert_clean(Path::new(&p));
    assert!(qemu_img(&["snapshot", "-l", &p]).contains(" s1 "));
}

#[test]
fn snapshot_goto_refused_without_a_snapshot_driver() {
    let d = tempfile::tempdir().unwrap();
    let p = qcow2_file(d.path(), "b.qcow2");
    let raw = d.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let mut g = BlockGraph::new();
    let nodes = [
        add(&mut g, json!({"driver": "null-co", "node-name": "n"})),
        add(
            &mut g,
            json!({"driver": "raw", "node-name": "rf", "file": {
                "driver": "file", "filename": raw.to_str().unwrap()}}),
        ),
        // Quorum has no primary child to fall back to.
        add(
            &mut g,
            json!({"driver": "quorum", "node-name": "qu", "vote-threshold": 1, "children": [
                {"driver": "qcow2", "file": {"driver": "file", "filename": p}}]}),
        ),
    ];
    for n in &nodes {
        assert_eq!(
            snapshot_goto(n, "s1").unwrap_err().to_string(),
            "Block driver does not support snapshots",
            "{}",
            n.name()
        );
    }
}

#[test]
fn null_co_status_as_in_qemu() {
    let mut g = BlockGraph::new();
    let plain = add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n", "size": 1048576}),
    );
    let zeroes = add(
        &mut g,
        json!({"driver": "null-co", "node-name": "z", "size": 1048576, "read-zeroes": true}),
    );
    let s = plain.block_status_above(None, 0, 1 << 20).unwrap();
    assert_eq!(s.len, 1 << 20);
    assert!(!s.allocated && !s.data, "{s:?}");
    let s = zeroes.block_status_above(None, 0, 1 << 20).unwrap();
    assert!(s.allocated && s.zero && !s.data, "{s:?}");
    // No image information (QEMU's bdrv_get_info: -ENOTSUP), also through raw.
    let raw = add(
        &mut g,
        json!({"driver": "raw", "node-name": "r", "file": "n"}),
    );
    assert_eq!(image_info(&plain).dirty_flag, None);
    assert_eq!(image_info(&raw).dirty_flag, None);
}

fn file(path: &Path) -> FileDriver {
    FileDriver::open(&FileOptions {
        filename: path.to_string_lossy().into(),
        read_only: false,
        direct: false,
        locking: false,
        io_uring: false,
    })
    .unwrap()
}

fn first_extent_is_data(f: &FileDriver) -> Option<u64> {
    let s = f.block_status(0, f.length().unwrap()).unwrap();
    match s.kind {
        block_graph::driver::StatusKind::Data { .. } => Some(s.len),
        _ => None,
    }
}

#[test]
fn growing_an_empty_file_allocates_its_first_block() {
    let d = tempfile::tempdir().unwrap();
    for (size, first) in [(1u64 << 20, 4096u64), (2048, 2048), (512, 512)] {
        let p = d.path().join(format!("e{size}"));
        std::fs::write(&p, b"").unwrap();
        let f = file(&p);
        f.truncate(size).unwrap();
        assert_eq!(f.length().unwrap(), size);
        assert_eq!(first_extent_is_data(&f), Some(first), "size {size}");
        // qemu-img sees what it sees after its own resize of an empty file.
        let q = d.path().join(format!("q{size}"));
        std::fs::write(&q, b"").unwrap();
        qemu_img(&[
            "resize",
            "-q",
            "-f",
            "raw",
            q.to_str().unwrap(),
            &size.to_string(),
        ]);
        assert_eq!(
            qemu_img(&["map", "--output=json", "-f", "raw", p.to_str().unwrap()]),
            qemu_img(&["map", "--output=json", "-f", "raw", q.to_str().unwrap()])
        );
    }
    // A file that already had a length keeps its holes.
    let p = d.path().join("h");
    std::fs::File::create(&p).unwrap().set_len(8192).unwrap();
    let f = file(&p);
    f.truncate(1 << 20).unwrap();
    assert_eq!(first_extent_is_data(&f), None);
}

#[test]
fn quorum_names_and_sizes_like_qemu() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    // Sparse children: a has data at 0..4 KiB, b at 32..36 KiB.
    for (p, at) in [(&a, 0u64), (&b, 32768)] {
        let f = std::fs::File::create(p).unwrap();
        f.set_len(1 << 16).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], at).unwrap();
    }
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut g = BlockGraph::new();
    let q = add(
        &mut g,
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2,
            "read-pattern": "quorum", "children": [
            {"driver": "raw", "file": {"driver": "file", "filename": a}},
            {"driver": "raw", "file": {"driver": "file", "filename": b}}]}),
    );
    assert_eq!(
        node_filename(&q),
        format!(
            r#"json:{{"read-pattern": "quorum", "children": [{{"driver": "raw", "file": {{"driver": "file", "filename": "{a}"}}}}, {{"driver": "raw", "file": {{"driver": "file", "filename": "{b}"}}}}], "driver": "quorum", "vote-threshold": 2}}"#
        )
    );
    // Block status as quorum_co_block_status: data where a child has data (the longest
    // run), zero where all read as zero (the shortest run).
    let st = |off: u64| {
        let s = q.block_status_above(None, off, (1 << 16) - off).unwrap();
        (s.data, s.zero, s.len)
    };
    assert_eq!(st(0), (true, false, 4096));
    assert_eq!(st(4096), (false, true, 28672));
    assert_eq!(st(32768), (true, false, 4096));
    assert_eq!(st(36864), (false, true, 28672));
    let info = image_info(&q);
    // The children's allocations summed (QEMU's bdrv_sum_allocated_file_size).
    let sizes: Vec<i64> = q
        .children()
        .iter()
        .map(|c| image_info(&c.node()).actual_size.unwrap())
        .collect();
    assert_eq!(info.actual_size, Some(sizes.iter().sum()));
    assert_eq!(info.dirty_flag, None);
    // Children of different lengths: QEMU fails to read the quorum's length.
    let c = d.path().join("c.raw");
    std::fs::write(&c, vec![0u8; 1 << 17]).unwrap();
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "quorum", "node-name": "q2", "vote-threshold": 1, "children": [
            {"driver": "raw", "file": {"driver": "file", "filename": a}},
            {"driver": "raw", "file": {"driver": "file", "filename": c.to_str().unwrap()}}]}),
        ))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not refresh total sector count: Input/output error"
    );
}

#[test]
fn blkdebug_names_and_info_like_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.raw");
    std::fs::write(&p, vec![0u8; 1 << 16]).unwrap();
    let p = p.to_str().unwrap();
    let mut g = BlockGraph::new();
    let plain = add(
        &mut g,
        json!({"driver": "blkdebug", "node-name": "b1", "image": {
            "driver": "raw", "file": {"driver": "file", "filename": p}}}),
    );
    assert_eq!(node_filename(&plain), format!("blkdebug::{p}"));
    // bdrv_get_info goes through the filter and raw to the file.
    assert_eq!(image_info(&plain).dirty_flag, Some(false));
    let over = add(
        &mut g,
        json!({"driver": "raw", "node-name": "r", "file": "b1"}),
    );
    assert_eq!(node_filename(&over), format!("blkdebug::{p}"));
    assert_eq!(image_info(&over).dirty_flag, Some(false));
    // With rules of its own the node needs a json: name.
    let rules = add(
        &mut g,
        json!({"driver": "blkdebug", "node-name": "b2", "inject-error": [{"event": "read_aio"}],
            "image": {"driver": "file", "filename": p}}),
    );
    assert!(
        node_filename(&rules).starts_with("json:{"),
        "{}",
        node_filename(&rules)
    );
    // Over a node without a plain name (null-co with options): json: too.
    let null = add(
        &mut g,
        json!({"driver": "blkdebug", "node-name": "b3", "image": {
            "driver": "null-co", "size": 65536}}),
    );
    assert!(node_filename(&null).starts_with("json:{"));
    assert_eq!(image_info(&null).dirty_flag, None);
}

#[test]
fn blkverify_as_a_filter_of_its_raw_image() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("raw");
    let test = d.path().join("test");
    let mut data = vec![0u8; 1 << 20];
    data[8192..12288].fill(7);
    std::fs::write(&test, &data).unwrap();
    // The same contents, sparse: only the raw image starts with a hole.
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data[8192..12288], 8192).unwrap();
    drop(f);
    let (raw, test) = (raw.to_str().unwrap(), test.to_str().unwrap());
    let mut g = BlockGraph::new();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "rf", "filename": raw}),
    );
    let v = add(
        &mut g,
        json!({"driver": "blkverify", "node-name": "v", "raw": "rf",
            "test": {"driver": "raw", "file": {"driver": "file", "filename": test}}}),
    );
    // QEMU's blkverify_refresh_filename: raw first.
    assert_eq!(node_filename(&v), format!("blkverify:{raw}:{test}"));
    assert_eq!(image_info(&v).dirty_flag, Some(false));
    // The raw image is the primary (filtered) child: block status comes from it.
    assert_eq!(v.primary_child().unwrap().name(), "raw");
    let s = v.block_status_above(None, 0, 1 << 20).unwrap();
    assert!(!s.data && s.zero && s.len == 8192, "{s:?}");
    // No snapshot fallback: the test image is a second data child.
    assert_eq!(
        snapshot_goto(&v, "s1").unwrap_err().to_string(),
        "Block driver does not support snapshots"
    );
}
