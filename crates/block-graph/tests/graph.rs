//! The graph and its drivers against QEMU's own tools.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block_graph::{BlockGraph, Perm, WriteFlags, ZeroFlags};
use common::*;
use serde_json::json;

#[test]
fn qcow2_io_round_trip_is_clean_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    {
        let mut g = BlockGraph::new();
        let n = add_qcow2(&mut g, "d0", &img);
        assert_eq!(n.length(), 64 << 20);
        let be = g
            .create_backend("disk0", Some(&n), Default::default())
            .unwrap();
        g.attach_device(&be, disk("vd0")).unwrap();
        // Aligned, unaligned, cross-cluster and vectored writes.
        be.write_buf(0, &[0xab; 4096], WriteFlags::default())
            .unwrap();
        be.write_buf(65536 - 100, &[0xcd; 300], WriteFlags { fua: true })
            .unwrap();
        let a = [1u8; 1000];
        let b = [2u8; 3096];
        be.write(
            1 << 20,
            &[IoSlice::new(&a), IoSlice::new(&b)],
            WriteFlags::default(),
        )
        .unwrap();
        be.write_zeroes(2 << 20, 1 << 20, ZeroFlags::default())
            .unwrap();
        let mut x = [0u8; 2000];
        let mut y = [0u8; 2096];
        be.read(
            1 << 20,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        )
        .unwrap();
        assert_eq!(&x[..1000], &a[..]);
        assert_eq!(&x[1000..], &[2u8; 1000][..]);
        assert_eq!(&y[..], &[2u8; 2096][..]);
        let mut c = [0u8; 400];
        be.read_buf(65536 - 150, &mut c).unwrap();
        assert_eq!(&c[..50], &[0u8; 50][..]);
        assert_eq!(&c[50..350], &[0xcd; 300][..]);
        // Out of range requests are refused.
        assert_eq!(
            be.read_buf(64 << 20, &mut c).unwrap_err().errno_value(),
            libc::EIO
        );
        be.flush().unwrap();
        // The backend's own requests are not accounted (a guest device accounts its
        // requests, as in QEMU); the highest written offset is the node's.
        let st = be.stats().report(n.wr_highest_offset());
        assert_eq!(
            (st.wr_operations, st.rd_operations, st.flush_operations),
            (0, 0, 0)
        );
        assert_eq!(st.invalid_rd_operations, 0);
        assert_eq!(st.wr_highest_offset, 3 << 20);
        let s = be.block_status(0, 64 << 20).unwrap();
        assert!(s.allocated && s.data && s.depth == 0);
        let s = be.block_status(2 << 20, 1 << 20).unwrap();
        assert!(s.zero);
    }
    assert_clean(&img);
    let out = qemu_io(
        &img,
        "qcow2",
        &[
            "read -P 0xab 0 4096",
            "read -P 0xcd 65436 300",
            "read -P 1 1048576 1000",
            "read -P 0 2097152 1048576",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn permission_conflicts_are_worded_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let mut g = BlockGraph::new();
    g.blockdev_add(&opts(
        json!({"driver": "file", "node-name": "f1", "filename": img.to_str().unwrap()}),
    ))
    .unwrap();
    g.blockdev_add(&opts(
        json!({"driver": "qcow2", "node-name": "q1", "file": "f1"}),
    ))
    .unwrap();
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "qcow2", "node-name": "q2", "file": "f1"}),
        ))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Permission conflict on node 'f1': permissions 'write, resize' are both required by \
         node 'q1' (uses node 'f1' as 'file' child) and unshared by node 'q2' (uses node 'f1' \
         as 'file' child)."
    );
    assert!(
        g.find_node("q2").is_none(),
        "a refused node is not left behind"
    );
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "qcow2", "node-name": "q3", "file": "f1", "read-only": true}),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("unshared by node 'q3'"), "{e}");
    // raw shares everything.
    g.blockdev_add(&opts(
        json!({"driver": "raw", "node-name": "r3", "file": "f1"}),
    ))
    .unwrap();
    let e = g.block_resize(None, Some("f1"), 1 << 20).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Permission conflict on node 'f1': permissions 'resize' are both required by an \
         unnamed block device (uses node 'f1' as 'root' child) and unshared by node 'q1' \
         (uses node 'f1' as 'file' child)."
    );
    g.block_resize(None, Some("q1"), 1 << 20).unwrap();
    assert_eq!(g.find_node("q1").unwrap().length(), 1 << 20);
    assert_eq!(
        g.block_resize(None, Some("q1"), 1000)
            .unwrap_err()
            .to_string(),
        "The new size must be a multiple of 512"
    );
    assert_eq!(
        g.block_resize(Some("nope"), None, 512)
            .unwrap_err()
            .to_string(),
        "Cannot find device='nope' nor node-name=''"
    );
    // A second writer device on q1 conflicts with the first (devices do not share write).
    let q1 = g.find_node("q1").unwrap();
    let be1 = g
        .create_backend("disk1", Some(&q1), Default::default())
        .unwrap();
    g.attach_device(&be1, disk("vd1")).unwrap();
    let be2 = g
        .create_backend("disk2", Some(&q1), Default::default())
        .unwrap();
    let e = g.attach_device(&be2, disk("vd2")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Permission conflict on node 'q1': permissions 'write'"),
        "{e}"
    );
    assert!(be2.device().is_none(), "a refused attach changes nothing");
}

#[test]
fn deletion_rules() {
    let mut g = BlockGraph::new();
    g.blockdev_add(&opts(json!({"driver": "null-co", "node-name": "n0"})))
        .unwrap();
    let r = g
        .blockdev_add(&opts(
            json!({"driver": "raw", "node-name": "r0", "file": {"driver": "null-co"}}),
        ))
        .unwrap();
    let child = r.child("file").unwrap().node();
    assert!(child.name().starts_with("#block"));
    assert_eq!(
        g.blockdev_del("nope").unwrap_err().to_string(),
        "Failed to find node with node-name='nope'"
    );
    assert_eq!(
        g.blockdev_del(child.name()).unwrap_err().to_string(),
        format!("Node {} is not owned by the monitor", child.name())
    );
    g.blockdev_add(&opts(
        json!({"driver": "raw", "node-name": "r1", "file": "n0"}),
    ))
    .unwrap();
    assert_eq!(
        g.blockdev_del("n0").unwrap_err().to_string(),
        "Block device n0 is in use"
    );
    let be = g.create_backend("d", Some(&r), Default::default()).unwrap();
    assert_eq!(
        g.blockdev_del("r0").unwrap_err().to_string(),
        "Node r0 is in use"
    );
    g.delete_backend("d").unwrap();
    drop(be);
    let name = child.name().to_string();
    drop(child);
    drop(r);
    g.blockdev_del("r0").unwrap();
    assert!(
        g.find_node(&name).is_none(),
        "implicit children go with their parent"
    );
    g.blockdev_del("r1").unwrap();
    g.blockdev_del("n0").unwrap();
    assert!(g.nodes().is_empty());
    assert_eq!(
        g.blockdev_add(&opts(json!({"driver": "null-co"})))
            .unwrap_err()
            .to_string(),
        "'node-name' must be specified for the root node"
    );
    assert_eq!(
        g.blockdev_add(&opts(json!({"driver": "null-co", "node-name": "#x"})))
            .unwrap_err()
            .to_string(),
        "Invalid node-name: '#x'"
    );
    g.blockdev_add(&opts(json!({"driver": "null-co", "node-name": "x"})))
        .unwrap();
    assert_eq!(
        g.blockdev_add(&opts(json!({"driver": "null-co", "node-name": "x"})))
            .unwrap_err()
            .to_string(),
        "Duplicate nodes with node-name='x'"
    );
}

#[test]
fn backing_chains_fall_through_and_report_depth() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x11 0 64k", "write -P 0x33 1M 64k"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_io(&top, "qcow2", &["write -P 0x22 64k 64k", "write -z 1M 64k"]);
    let mut g = BlockGraph::new();
    let n = add_qcow2(&mut g, "top", &top);
    let b = n.backing().expect("backing opened from the header").node();
    assert!(b.is_read_only());
    assert_eq!(b.driver_name(), "qcow2");
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    be.read_buf(0, &mut buf).unwrap();
    assert!(buf[..64 << 10].iter().all(|&x| x == 0x11));
    assert!(buf[64 << 10..128 << 10].iter().all(|&x| x == 0x22));
    assert!(buf[128 << 10..].iter().all(|&x| x == 0));
    let s = be.block_status(0, 4 << 20).unwrap();
    assert_eq!((s.allocated, s.depth, s.len), (true, 1, 64 << 10));
    assert_eq!(s.node, b.name());
    let s = be.block_status(64 << 10, 4 << 20).unwrap();
    assert_eq!((s.allocated, s.depth, s.data), (true, 0, true));
    let s = be.block_status(1 << 20, 64 << 10).unwrap();
    assert_eq!(
        (s.allocated, s.zero, s.depth),
        (true, true, 0),
        "zero cluster in top hides base"
    );
    let s = be.block_status(2 << 20, 1 << 20).unwrap();
    assert_eq!((s.allocated, s.zero, s.depth), (false, true, 1));
    // A partial write to an unallocated cluster copies the rest from the backing node.
    be.write_buf(100, &[0x44; 10], WriteFlags::default())
        .unwrap();
    be.read_buf(0, &mut buf[..4096]).unwrap();
    assert!(buf[..100].iter().all(|&x| x == 0x11));
    assert!(buf[100..110].iter().all(|&x| x == 0x44));
    assert!(buf[110..4096].iter().all(|&x| x == 0x11));
    drop((be, n, b));
    g.close_all();
    drop(g);
    assert_clean(&top);
    // backing: null ignores the header.
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "qcow2", "node-name": "t", "backing": null,
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}),
        ))
        .unwrap();
    assert!(n.backing().is_none());
    let u = g
        .new_root(&n, Perm::CONSISTENT_READ, Perm::ALL, "test")
        .unwrap();
    let mut c = [9u8; 16];
    u.read_buf(3 << 20, &mut c).unwrap();
    assert_eq!(c, [0u8; 16], "base's data is not seen");
    u.read_buf(200, &mut c).unwrap();
    assert_eq!(c, [0x11; 16], "the copied-on-write cluster is top's own");
    // A missing backing file is QEMU's error.
    let lost = dir.path().join("lost.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "/nonexistent/b.qcow2",
        "-F",
        "qcow2",
        lost.to_str().unwrap(),
        "1M",
    ]);
    let e = g
        .blockdev_add(&opts(json!({"driver": "qcow2", "node-name": "l",
            "file": {"driver": "file", "filename": lost.to_str().unwrap()}})))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not open backing file: Could not open '/nonexistent/b.qcow2': No such file or directory"
    );
}

#[test]
fn raw_windows() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.img");
    std::fs::write(&f, vec![7u8; 64 << 10]).unwrap();
    let mut g = BlockGraph::new();
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "raw", "node-name": "r", "offset": 4096, "size": 100000,
            "file": {"driver": "file", "filename": f.to_str().unwrap()}}),
        ))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "The sum of offset (4096) and size (100000) has to be smaller or equal to the  actual size of the containing file (65536)"
    );
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "raw", "node-name": "r", "offset": 4096, "size": 8192,
            "file": {"driver": "file", "filename": f.to_str().unwrap()}}),
        ))
        .unwrap();
    assert_eq!(n.length(), 8192);
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    be.write_buf(0, &[1u8; 512], WriteFlags::default()).unwrap();
    assert!(be
        .write_buf(8192, &[1u8; 512], WriteFlags::default())
        .is_err());
    drop(be);
    drop(n);
    drop(g);
    let data = std::fs::read(&f).unwrap();
    assert!(data[..4096].iter().all(|&x| x == 7));
    assert!(data[4096..4608].iter().all(|&x| x == 1));
    assert!(data[4608..].iter().all(|&x| x == 7));
}

#[test]
fn write_threshold_bitmaps_and_detect_zeroes() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "null-co", "node-name": "n", "size": 16777216,
            "detect-zeroes": "on"}),
        ))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    n.set_write_threshold(1 << 20);
    let bm = Arc::new(block_graph::DirtyBitmap::new("b", 65536, n.length()).unwrap());
    n.add_bitmap(bm.clone()).unwrap();
    be.write_buf(0, &[1; 4096], WriteFlags::default()).unwrap();
    assert!(g.take_events().is_empty());
    be.write_buf((1 << 20) - 512, &[1; 4096], WriteFlags::default())
        .unwrap();
    let ev = g.take_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event, "BLOCK_WRITE_THRESHOLD");
    assert_eq!(
        ev[0].data.as_ref().unwrap(),
        &json!({"node-name": "n", "amount-exceeded": 3584, "write-threshold": 1048576})
    );
    assert_eq!(n.write_threshold(), 0, "one shot");
    be.write_buf(4 << 20, &[0; 4096], WriteFlags::default())
        .unwrap();
    assert!(g.take_events().is_empty());
    // Granules 0, 15 and 16 (the write crossing 1 MiB), and 64 (zeros are writes too).
    assert_eq!(bm.count(), 4 * 65536);
    assert!(bm.get(0) && bm.get((1 << 20) - 1) && bm.get(1 << 20) && bm.get(4 << 20));
    assert!(!bm.get(2 << 20));
}

#[test]
fn snapshot_under_concurrent_writes_loses_nothing() {
    const BLOCK: usize = 4096;
    const THREADS: u64 = 6;
    const BLOCKS_PER_THREAD: u64 = 64;
    const ROUNDS: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("base.qcow2");
    let size = THREADS * BLOCKS_PER_THREAD * BLOCK as u64;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut g = BlockGraph::new();
    let n = add_qcow2(&mut g, "base", &img);
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let be = be.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            let mut round = 0u64;
            // Keep writing until told to stop, at least ROUNDS full passes.
            while round < ROUNDS || !stop.load(Ordering::SeqCst) {
                for b in 0..BLOCKS_PER_THREAD {
                    let blk = t * BLOCKS_PER_THREAD + b;
                    let data = pattern(blk, round, BLOCK);
                    be.write_buf(blk * BLOCK as u64, &data, WriteFlags::default())
                        .unwrap();
                }
                round += 1;
            }
            round
        }));
    }
    let mut snaps = Vec::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(15));
        let f = dir.path().join(format!("s{i}.qcow2"));
        let done = g
            .blockdev_snapshot_sync(&block_graph::ops::SnapshotSync {
                device: Some("d".into()),
                node_name: None,
                snapshot_file: f.to_str().unwrap().into(),
                snapshot_node_name: Some(format!("s{i}")),
                format: None,
                mode: qapi_types::NewImageMode::AbsolutePaths,
            })
            .unwrap();
        assert!(Arc::ptr_eq(&be.root_node().unwrap(), &done.overlay));
        snaps.push(f);
    }
    stop.store(true, Ordering::SeqCst);
    let rounds: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Every block holds the last pattern its thread wrote.
    let mut expected = Vec::with_capacity(size as usize);
    for t in 0..THREADS {
        for b in 0..BLOCKS_PER_THREAD {
            let blk = t * BLOCKS_PER_THREAD + b;
            let want = pattern(blk, rounds[t as usize] - 1, BLOCK);
            let mut got = vec![0u8; BLOCK];
            be.read_buf(blk * BLOCK as u64, &mut got).unwrap();
            assert!(got == want, "block {blk} lost a write");
            expected.extend_from_slice(&want);
        }
    }
    let top = be.root_node().unwrap();
    assert_eq!(top.name(), "s2");
    let chain: Vec<String> = {
        let mut v = Vec::new();
        let mut c = Some(top.clone());
        while let Some(x) = c {
            v.push(x.name().to_string());
            c = x.backing().map(|e| e.node());
        }
        v
    };
    assert_eq!(chain, ["s2", "s1", "s0", "base"]);
    drop(top);
    drop(be);
    drop(n);
    g.close_all();
    drop(g);
    for f in snaps.iter().chain(std::iter::once(&img)) {
        assert_clean(f);
    }
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        snaps[2].to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

#[test]
fn internal_snapshots_and_resize_seen_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let mut g = BlockGraph::new();
    let n = add_qcow2(&mut g, "q", &img);
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    be.write_buf(0, &[5; 65536], WriteFlags::default()).unwrap();
    let s = g.snapshot_internal("d", "snap1").unwrap();
    assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "snap1"));
    assert_eq!(
        g.snapshot_internal("d", "snap1").unwrap_err().to_string(),
        "Snapshot with name 'snap1' already exists on device 'd'"
    );
    assert_eq!(
        g.snapshot_internal("d", "").unwrap_err().to_string(),
        "Name is empty"
    );
    g.snapshot_internal("q", "snap2").unwrap();
    be.write_buf(0, &[6; 512], WriteFlags::default()).unwrap();
    assert_eq!(
        g.snapshot_delete_internal("d", Some("9"), None)
            .unwrap_err()
            .to_string(),
        "Snapshot with id '9' and name 'null' does not exist on device 'd'"
    );
    let del = g
        .snapshot_delete_internal("d", None, Some("snap2"))
        .unwrap();
    assert_eq!(del.id, "2");
    drop(be);
    drop(n);
    g.close_all();
    drop(g);
    assert_clean(&img);
    let l = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    assert!(l.contains("snap1") && !l.contains("snap2"), "{l}");
    let mut g = BlockGraph::new();
    add_qcow2(&mut g, "q", &img);
    let e = g.block_resize(None, Some("q"), 16 << 20).unwrap_err();
    assert_eq!(e.to_string(), "Can't resize an image which has snapshots");
    g.snapshot_delete_internal("q", Some("1"), Some("snap1"))
        .unwrap();
    g.block_resize(None, Some("q"), 16 << 20).unwrap();
    g.close_all();
    drop(g);
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 16 << 20);
    assert_clean(&img);
}

#[test]
fn removable_media_and_trays() {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("a.iso");
    std::fs::write(&iso, vec![0x41u8; 1 << 20]).unwrap();
    let iso2 = dir.path().join("b.iso");
    std::fs::write(&iso2, vec![0x42u8; 1 << 20]).unwrap();
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "raw", "node-name": "cd0", "read-only": true,
            "file": {"driver": "file", "filename": iso.to_str().unwrap()}}),
        ))
        .unwrap();
    let be = g
        .create_backend("ide0-cd0", Some(&n), Default::default())
        .unwrap();
    g.attach_device(&be, cdrom("cd")).unwrap();
    let mut b = [0u8; 16];
    be.read_buf(0, &mut b).unwrap();
    assert_eq!(b, [0x41; 16]);
    // A locked tray does not open without force; the guest gets an eject request.
    be.set_locked(true);
    assert_eq!(
        g.eject(Some("ide0-cd0"), None, false).unwrap_err().to_string(),
        "Device 'ide0-cd0' is locked and force was not specified, wait for tray to open and try again"
    );
    assert!(be.take_eject_request());
    assert!(g.take_events().is_empty());
    g.eject(None, Some("cd"), true).unwrap();
    let ev = g.take_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].data.as_ref().unwrap(),
        &json!({"device": "ide0-cd0", "id": "cd", "tray-open": true})
    );
    assert!(be.root_node().is_none());
    assert_eq!(
        be.read_buf(0, &mut b).unwrap_err().errno_value(),
        libc::ENOMEDIUM
    );
    // The node added by blockdev-add survives the eject (the monitor owns it).
    assert!(g.find_node("cd0").is_some());
    g.insert_medium(None, Some("cd"), "cd0").unwrap();
    assert_eq!(
        g.insert_medium(None, Some("cd"), "cd0")
            .unwrap_err()
            .to_string(),
        "Node 'cd0' is already in use"
    );
    g.close_tray(Some("ide0-cd0"), None).unwrap();
    be.set_locked(false);
    g.change_medium(
        Some("ide0-cd0"),
        None,
        iso2.to_str().unwrap(),
        Some("raw"),
        false,
        qapi_types::BlockdevChangeReadOnlyMode::Retain,
    )
    .unwrap();
    be.read_buf(0, &mut b).unwrap();
    assert_eq!(b, [0x42; 16]);
    let names: Vec<_> = g
        .take_events()
        .iter()
        .map(|e| e.data.as_ref().unwrap()["tray-open"].clone())
        .collect();
    assert_eq!(names, [json!(false), json!(true), json!(false)]);
    assert_eq!(
        g.remove_medium(Some("ide0-cd0"), None)
            .unwrap_err()
            .to_string(),
        "Tray of device 'ide0-cd0' is not open"
    );
    assert_eq!(
        g.open_tray(Some("nope"), None, false)
            .unwrap_err()
            .to_string(),
        "Device 'nope' not found"
    );
    assert_eq!(
        g.open_tray(Some("a"), Some("b"), false)
            .unwrap_err()
            .to_string(),
        "Need exactly one of 'device' and 'id'"
    );
}

#[test]
fn file_locks_keep_qemu_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    let path = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, "1M"]);
    {
        let mut g = BlockGraph::new();
        add_qcow2(&mut g, "q", &img);
        let out = std::process::Command::new("qemu-img")
            .args(["info", path])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu_img(&["info", "-U", path]);
    }
    qemu_img(&["check", path]);
    // The other way round: qemu-storage-daemon holds the image.
    let mut qsd = Qsd::start();
    qsd.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": path}}),
    )
    .unwrap();
    let mut g = BlockGraph::new();
    let e = g
        .blockdev_add(&opts(json!({"driver": "qcow2", "node-name": "q",
            "file": {"driver": "file", "filename": path}})))
        .unwrap_err();
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "qcow2", "node-name": "q", "read-only": true,
            "file": {"driver": "file", "filename": path}}),
        ))
        .unwrap_err();
    assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
    g.blockdev_add(&opts(
        json!({"driver": "qcow2", "node-name": "q", "read-only": true,
        "force-share": true, "file": {"driver": "file", "filename": path}}),
    ))
    .unwrap();
    assert!(g.find_node("q").unwrap().is_read_only());
}
