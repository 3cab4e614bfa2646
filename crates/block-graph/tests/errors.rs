//! Error paths driven by blkdebug: werror/rerror policies, BLOCK_IO_ERROR, the I/O status
//! and the accounting of failed requests (done as a guest device does it: around each
//! request, with [`block_graph::stats::Stats::account`]).

mod common;

use block_graph::stats::AcctType;
use block_graph::{BlockBackend, BlockError, BlockGraph, WriteFlags};
use common::*;
use qapi_types::{BlockDeviceIoStatus, BlockErrorAction};
use serde_json::{json, Value};

fn setup(
    extra: Value,
    blkdebug: Value,
) -> (
    BlockGraph,
    std::sync::Arc<block_graph::BlockBackend>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("img.raw");
    std::fs::write(&f, vec![0x5au8; 1 << 20]).unwrap();
    let mut dbg =
        json!({"driver": "blkdebug", "image": {"driver": "file", "filename": f.to_str().unwrap()}});
    for (k, v) in blkdebug.as_object().unwrap() {
        dbg[k] = v.clone();
    }
    let mut o = json!({"driver": "raw", "id": "disk0", "node-name": "fmt", "file": dbg});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    let mut g = BlockGraph::new();
    g.blockdev_add(&opts(o)).unwrap();
    let be = g.find_backend("disk0").unwrap();
    g.attach_device(&be, disk("vd0")).unwrap();
    (g, be, dir)
}

fn io_error_data(g: &BlockGraph) -> Vec<Value> {
    g.take_events()
        .into_iter()
        .filter(|e| e.event == "BLOCK_IO_ERROR")
        .map(|e| e.data.unwrap())
        .collect()
}

/// A read as a guest device makes it: accounted around the backend's request.
fn dev_read(be: &BlockBackend, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
    be.stats().account(AcctType::Read, buf.len() as u64, || {
        be.read_buf(offset, buf)
    })
}

/// A write as a guest device makes it.
fn dev_write(be: &BlockBackend, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
    be.stats().account(AcctType::Write, buf.len() as u64, || {
        be.write_buf(offset, buf, WriteFlags::default())
    })
}

#[test]
fn read_errors_are_reported_and_counted() {
    let (g, be, _d) = setup(
        json!({}),
        json!({"inject-error": [{"event": "read_aio", "errno": 5, "once": true}]}),
    );
    let mut buf = [0u8; 512];
    let e = dev_read(&be, 0, &mut buf).unwrap_err();
    assert_eq!(e.errno_value(), libc::EIO);
    assert_eq!(be.io_error(true, &e), BlockErrorAction::Report);
    assert_eq!(
        io_error_data(&g),
        [
            json!({"device": "disk0", "node-name": "fmt", "operation": "read", "action": "report",
                "reason": "Input/output error"})
        ]
    );
    // once: the next read succeeds.
    dev_read(&be, 0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 512]);
    let st = be.stats().report(0);
    assert_eq!(
        (st.failed_rd_operations, st.rd_operations, st.rd_bytes),
        (1, 1, 512)
    );
    assert!(st.rd_total_time_ns > 0);
}

#[test]
fn werror_stop_sets_the_io_status() {
    let (g, be, _d) = setup(
        json!({"werror": "stop", "rerror": "ignore"}),
        json!({"inject-error": [{"event": "write_aio", "errno": 28}]}),
    );
    be.iostatus_enable();
    let e = dev_write(&be, 0, &[1; 512]).unwrap_err();
    assert_eq!(e.errno_value(), libc::ENOSPC);
    assert_eq!(be.io_error(false, &e), BlockErrorAction::Stop);
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Nospace));
    let ev = io_error_data(&g);
    assert_eq!(ev[0]["action"], "stop");
    assert_eq!(ev[0]["nospace"], true);
    assert_eq!(ev[0]["reason"], "No space left on device");
    // rerror=ignore.
    let e = BlockError::errno(libc::EIO);
    assert_eq!(be.io_error(true, &e), BlockErrorAction::Ignore);
    assert_eq!(io_error_data(&g)[0]["action"], "ignore");
    // cont resets the status.
    be.iostatus_reset();
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Ok));
    assert_eq!(be.stats().report(0).failed_wr_operations, 1);
}

#[test]
fn werror_enospc_stops_only_on_enospc() {
    let (g, be, _d) = setup(json!({}), json!({}));
    be.iostatus_enable();
    assert_eq!(
        be.io_error(false, &BlockError::errno(libc::EIO)),
        BlockErrorAction::Report
    );
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Ok));
    assert_eq!(
        be.io_error(false, &BlockError::errno(libc::ENOSPC)),
        BlockErrorAction::Stop
    );
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Nospace));
    let ev = io_error_data(&g);
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0]["nospace"], false);
}

#[test]
fn states_and_sectors() {
    let (_g, be, _d) = setup(
        json!({}),
        json!({
            "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}],
            "inject-error": [{"event": "read_aio", "state": 2, "sector": 8}]
        }),
    );
    let mut buf = [0u8; 4096];
    // State 1: no error.
    be.read_buf(4096, &mut buf).unwrap();
    be.write_buf(0, &[1; 512], WriteFlags::default()).unwrap();
    // State 2: the rule is active for reads touching sector 8 only.
    be.read_buf(0, &mut buf[..512]).unwrap();
    assert_eq!(
        be.read_buf(4096, &mut buf).unwrap_err().errno_value(),
        libc::EIO
    );
    // Bytes 0..4096 end before sector 8.
    be.read_buf(0, &mut buf).unwrap();
    let mut big = [0u8; 8192];
    assert_eq!(
        be.read_buf(0, &mut big).unwrap_err().errno_value(),
        libc::EIO
    );
}

#[test]
fn failed_requests_without_account_failed() {
    let (_g, be, _d) = setup(
        json!({"stats-account-failed": false, "stats-account-invalid": false}),
        json!({"inject-error": [{"event": "pwritev", "errno": 5}]}),
    );
    // pwritev is raised by the generic layer at the blkdebug node itself.
    let e = dev_write(&be, 0, &[1; 512]).unwrap_err();
    assert_eq!(e.errno_value(), libc::EIO);
    // A request past the end: the backend refuses it without counting it; the device
    // that checks the range first counts it as invalid (QEMU's block_acct_invalid).
    let mut buf = [0u8; 16];
    assert_eq!(
        be.read_buf(2 << 20, &mut buf).unwrap_err().errno_value(),
        libc::EIO
    );
    assert_eq!(be.stats().report(0).invalid_rd_operations, 0);
    be.stats().invalid(AcctType::Read);
    let st = be.stats().report(0);
    assert_eq!(st.failed_wr_operations, 1);
    assert_eq!(st.wr_total_time_ns, 0);
    assert_eq!(st.invalid_rd_operations, 1);
    assert!(st.idle_time_ns.is_none(), "neither counts as an access");
    assert!(!st.account_failed && !st.account_invalid);
}

#[test]
fn blkdebug_under_qcow2_fails_guest_data_reads() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    qemu_io(&img, "qcow2", &["write -P 0x33 0 64k"]);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(json!({"driver": "qcow2", "node-name": "q", "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "read_aio", "errno": 5, "once": true}],
            "image": {"driver": "file", "filename": img.to_str().unwrap()}}})))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let mut buf = [0u8; 512];
    // Unallocated: no data read, no event, no error.
    be.read_buf(512 << 10, &mut buf).unwrap();
    assert_eq!(
        be.read_buf(0, &mut buf).unwrap_err().errno_value(),
        libc::EIO
    );
    be.read_buf(0, &mut buf).unwrap();
    assert_eq!(buf, [0x33; 512]);
    let blk = n.child("file").unwrap().node();
    assert_eq!(blk.driver_name(), "blkdebug");
    // Options errors.
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "blkdebug", "node-name": "x", "align": 3,
            "image": {"driver": "null-co"}}),
        ))
        .unwrap_err();
    assert_eq!(e.to_string(), "Cannot meet constraints with align 3");
}

/// A 1 MiB qcow2 image in `dir` with its first 64 KiB written, whose first L2 entry is then
/// replaced by `f(entry, l1_table_offset)`.
fn qcow2_with_first_entry(dir: &std::path::Path, f: fn(u64, u64) -> u64) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let img = dir.join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 64k"]);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    file.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    file.read_exact_at(&mut b, l2).unwrap();
    let e = f(u64::from_be_bytes(b), l1);
    file.write_all_at(&e.to_be_bytes(), l2).unwrap();
    img
}

#[test]
fn qcow2_corruption_raises_block_image_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    // Make the first L2 entry point at an unaligned host offset.
    let img = qcow2_with_first_entry(dir.path(), |e, _| e | 0x200);
    let path = img.to_str().unwrap();
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "qcow2", "id": "disk0", "node-name": "q",
            "file": {"driver": "file", "filename": path}}),
        ))
        .unwrap();
    let be = g.find_backend("disk0").unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let mut buf = [0u8; 512];
    let err = be.read_buf(0, &mut buf).unwrap_err();
    assert_eq!(err.errno_value(), libc::EIO);
    let ev: Vec<_> = g
        .take_events()
        .into_iter()
        .filter(|e| e.event == "BLOCK_IMAGE_CORRUPTED")
        .collect();
    assert_eq!(ev.len(), 1);
    let d = ev[0].data.as_ref().unwrap();
    assert_eq!(d["device"], "disk0");
    assert_eq!(d["node-name"], "q");
    assert_eq!(d["fatal"], true);
    assert!(d["msg"].as_str().unwrap().contains("unaligned"), "{d}");
    // The image is now read-only and marked corrupt.
    assert!(be
        .write_buf(65536, &[1; 512], WriteFlags::default())
        .is_err());
    drop((n, be));
    g.close_all();
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", path])).unwrap();
    assert_eq!(info["format-specific"]["data"]["corrupt"], true);
}

#[test]
fn blkdebug_rules_fire_on_qcow2_metadata_events() {
    // QEMU's iotests inject errors on the format's metadata events; here `l2_load`
    // (an L2 table read from the file on a cache miss) fails the read that needed it.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    qemu_io(&img, "qcow2", &["write -P 0x44 0 64k"]);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(json!({"driver": "qcow2", "node-name": "q", "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "l2_load", "errno": 5, "once": true}],
            "image": {"driver": "file", "filename": img.to_str().unwrap()}}})))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let mut buf = [0u8; 512];
    assert_eq!(
        be.read_buf(0, &mut buf).unwrap_err().errno_value(),
        libc::EIO
    );
    // `once`: the retry loads the table and reads the data.
    be.read_buf(0, &mut buf).unwrap();
    assert_eq!(buf, [0x44; 512]);
    drop((n, be));
    g.close_all();
    assert_clean(&img);
}

/// Discards and write-zeroes fail as reads and writes do when an active blkdebug rule
/// covers their range, and the image keeps what they would have changed: the same
/// sequence through `qemu-io` 7.2 on the same graph gives the same failures.
#[test]
fn discard_and_write_zeroes_errors_come_back() {
    let errno = |r: Result<(), BlockError>| match r {
        Err(BlockError::Io { errno, .. }) => errno,
        other => panic!("expected an I/O error, got {other:?}"),
    };
    // The rule becomes active at the first write that reaches blkdebug, and covers sector 8.
    let (mut g, be, dir) = setup(
        json!({"discard": "unmap"}),
        json!({"discard": "unmap",
               "inject-error": [{"event": "pwritev", "sector": 8, "errno": 5}]}),
    );
    be.write_buf(0, &[1u8; 4096], WriteFlags::default())
        .unwrap();
    assert_eq!(errno(be.discard(0, 8192)), libc::EIO);
    assert_eq!(
        errno(be.write_zeroes(4096, 4096, Default::default())),
        libc::EIO
    );
    // Requests that miss the sector pass, flushes too (the rule names a sector).
    be.discard(0, 4096).unwrap();
    be.write_zeroes(8192, 4096, Default::default()).unwrap();
    be.flush().unwrap();
    // Reads of sector 8 fail too; the file itself tells what happened.
    let mut one = [0u8; 512];
    assert_eq!(errno(be.read_buf(4096, &mut one)), libc::EIO);
    drop(be);
    g.close_all();
    let back = std::fs::read(dir.path().join("img.raw")).unwrap();
    assert!(
        back[..4096].iter().all(|&b| b == 0),
        "the discard took effect"
    );
    assert!(
        back[4096..8192].iter().all(|&b| b == 0x5a),
        "the failed discard and write-zeroes changed nothing"
    );
    assert!(
        back[8192..12288].iter().all(|&b| b == 0),
        "write-zeroes took effect"
    );
    drop(dir);
}

#[test]
fn qcow2_discards_reach_the_file_with_discard_unmap_only() {
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    for unmap in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let path = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", path, "8M"]);
        qemu_io(&img, "qcow2", &["write -P 0x55 0 4M"]);
        let before = allocated(&img);
        let mut o = json!({"driver": "qcow2", "id": "disk0", "node-name": "q",
                           "file": {"driver": "file", "filename": path}});
        if unmap {
            o["discard"] = "unmap".into();
            o["file"]["discard"] = "unmap".into();
        }
        let mut g = BlockGraph::new();
        g.blockdev_add(&opts(o)).unwrap();
        let be = g.find_backend("disk0").unwrap();
        g.attach_device(&be, disk("vd")).unwrap();
        be.discard(0, 4 << 20).unwrap();
        be.flush().unwrap();
        drop(be);
        g.close_all();
        let after = allocated(&img);
        if unmap {
            assert!(
                after + (3 << 20) <= before,
                "{before} -> {after}: not punched"
            );
        } else {
            assert!(after + (1 << 20) > before, "{before} -> {after}: punched");
        }
        assert_clean(&img);
    }
}

#[test]
fn qcow2_overlap_check_modes() {
    // Guest cluster 0's entry points at the L1 table: a write there hits metadata.
    let try_write = |check: Value| -> std::result::Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let img = qcow2_with_first_entry(dir.path(), |_, l1| (1 << 63) | l1);
        let path = img.to_str().unwrap();
        let mut g = BlockGraph::new();
        let mut o = json!({"driver": "qcow2", "id": "disk0", "node-name": "q",
            "file": {"driver": "file", "filename": path}});
        if !check.is_null() {
            o["overlap-check"] = check;
        }
        g.blockdev_add(&opts(o)).map_err(|e| e.to_string())?;
        let be = g.find_backend("disk0").unwrap();
        g.attach_device(&be, disk("vd")).unwrap();
        let r = be.write_buf(0, &[0xff; 512], WriteFlags::default());
        let corrupted: Vec<_> = g
            .take_events()
            .into_iter()
            .filter(|e| e.event == "BLOCK_IMAGE_CORRUPTED")
            .collect();
        let refused = r.is_err();
        assert_eq!(corrupted.len(), refused as usize);
        if let Some(e) = corrupted.first() {
            let msg = e.data.as_ref().unwrap()["msg"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                msg.starts_with("Preventing invalid write on metadata"),
                "{msg}"
            );
            return Err(msg);
        }
        r.map_err(|e| e.to_string())
    };
    // QEMU's default (`cached`), `constant` and `all` refuse it; `none` lets it through.
    assert!(try_write(Value::Null).is_err());
    assert!(try_write(json!("constant")).is_err());
    assert!(try_write(json!("all")).is_err());
    try_write(json!("none")).unwrap();
    // The flags form: a template, then single checks on or off.
    try_write(json!({"active-l1": false})).unwrap();
    assert!(try_write(json!({"template": "none", "active-l1": true})).is_err());
    try_write(json!({"template": "none", "active-l2": true})).unwrap();
}

/// Blocks every node whose name starts with "busy", as a job blocks its nodes.
struct BusyNodes;

impl block_graph::OpBlockers for BusyNodes {
    fn blocker(&self, node: &std::sync::Arc<block_graph::Node>) -> Option<String> {
        node.name()
            .starts_with("busy")
            .then(|| "in use by a test".to_string())
    }
}

#[test]
fn op_blockers_refuse_the_commands_that_change_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", base, "1M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top,
    ]);
    let mut g = BlockGraph::new();
    g.blockdev_add(&opts(
        json!({"driver": "qcow2", "id": "d0", "node-name": "busy-top",
        "file": {"driver": "file", "filename": top}}),
    ))
    .unwrap();
    g.blockdev_add(&opts(
        json!({"driver": "null-co", "node-name": "busy-alone"}),
    ))
    .unwrap();
    g.set_op_blockers(Some(std::sync::Arc::new(BusyNodes)));
    let busy = |r: block_graph::Result<()>| r.unwrap_err().to_string();
    let msg = "Node 'd0' is busy: in use by a test";
    let sync = block_graph::ops::SnapshotSync {
        device: Some("d0".into()),
        node_name: None,
        snapshot_file: dir.path().join("s.qcow2").to_str().unwrap().into(),
        snapshot_node_name: None,
        format: None,
        mode: qapi_types::NewImageMode::AbsolutePaths,
    };
    assert_eq!(busy(g.blockdev_snapshot_sync(&sync).map(drop)), msg);
    assert_eq!(busy(g.snapshot_internal("d0", "s").map(drop)), msg);
    assert_eq!(
        busy(g.snapshot_delete_internal("d0", None, Some("s")).map(drop)),
        msg
    );
    assert_eq!(
        busy(g.change_backing_file("d0", "busy-top", "x")),
        msg,
        "QEMU checks the device's root"
    );
    assert_eq!(busy(g.remove_medium(Some("d0"), None)), msg);
    assert_eq!(
        busy(g.blockdev_del("busy-alone")),
        "Node 'busy-alone' is busy: in use by a test"
    );
    // A node used as another's backing node is blocked too (QEMU's backing blocker).
    let ov = dir.path().join("ov.qcow2");
    let ov = ov.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ov, "1M"]);
    g.blockdev_add(&opts(
        json!({"driver": "qcow2", "node-name": "ov", "backing": null,
        "file": {"driver": "file", "filename": ov}}),
    ))
    .unwrap();
    g.blockdev_add(&opts(json!({"driver": "null-co", "node-name": "old"})))
        .unwrap();
    g.blockdev_snapshot("old", "ov").unwrap();
    assert_eq!(
        busy(g.blockdev_snapshot("old", "ov").map(drop)),
        "Node 'old' is busy: node is used as backing hd of 'ov'"
    );
    // Without the blocker, the same commands go through.
    g.set_op_blockers(None);
    g.snapshot_internal("d0", "s").unwrap();
    g.remove_medium(Some("d0"), None).unwrap();
    g.blockdev_del("busy-alone").unwrap();
}
