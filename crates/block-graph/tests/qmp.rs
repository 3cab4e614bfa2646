//! The QMP handlers through a `qapi_types::Dispatcher`, compared with qemu-storage-daemon
//! 7.2 where it has the command.

mod common;

use std::path::Path;

use block_graph::{BlockGraph, WriteFlags};
use common::*;
use qapi_types::Dispatcher;
use qmp_proto::{ErrorClass, Request};
use serde_json::{json, Value};

struct Vmm {
    block: BlockGraph,
}

struct Monitor {
    d: Dispatcher<Vmm>,
    vmm: Vmm,
}

impl Monitor {
    fn new() -> Self {
        let mut d = Dispatcher::<Vmm>::new();
        block_graph::register(&mut d, |v| &mut v.block);
        Monitor {
            d,
            vmm: Vmm {
                block: BlockGraph::new(),
            },
        }
    }

    fn run(&mut self, cmd: &str, args: Value) -> Result<Value, qmp_proto::QmpError> {
        let req = Request {
            id: None,
            command: cmd.into(),
            arguments: args.as_object().cloned().unwrap_or_default(),
            oob: false,
        };
        self.d.dispatch(&mut self.vmm, &req)
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.run(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {}", e.desc))
    }

    fn err(&mut self, cmd: &str, args: Value) -> String {
        match self.run(cmd, args.clone()) {
            Ok(v) => panic!("{cmd} {args} succeeded: {v}"),
            Err(e) => e.desc,
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Replaces generated node names (`#blockNNN`) by their order of appearance, and drops
/// what the schemas of QEMU 7.2 and of the seeds do not share.
fn normalize(v: &mut Value, names: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for k in [
                "encryption_key_missing",
                "driver-specific",
                "unmap_operations",
                "unmap_merged",
                "unmap_bytes",
                "unmap_total_time_ns",
                "failed_unmap_operations",
                "invalid_unmap_operations",
            ] {
                m.remove(k);
            }
            for (_, x) in m.iter_mut() {
                normalize(x, names);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| normalize(x, names)),
        Value::String(s) if s.starts_with("#block") => {
            let i = names.iter().position(|n| n == s).unwrap_or_else(|| {
                names.push(s.clone());
                names.len() - 1
            });
            *s = format!("#gen{i}");
        }
        _ => {}
    }
}

#[test]
fn query_shapes_match_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let raw = dir.path().join("r.img");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_img(&["create", "-q", "-f", "raw", p(&raw), "1M"]);
    let cmds = [
        json!({"driver": "raw", "node-name": "r1", "file": {"driver": "file", "filename": p(&raw), "locking": "off"}}),
        json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": p(&top), "locking": "off"}}),
        json!({"driver": "null-co", "node-name": "n1", "size": 65536}),
        json!({"driver": "file", "node-name": "f2", "filename": p(&raw), "read-only": true, "locking": "off", "cache": {"direct": false, "no-flush": true}}),
    ];
    // Both processes open the same images read-write: neither takes file locks here (the
    // locks themselves are tested in `file_locks_keep_qemu_out`).
    let mut qsd = Qsd::start();
    let mut m = Monitor::new();
    for c in &cmds {
        qsd.execute("blockdev-add", c.clone()).unwrap();
        m.ok("blockdev-add", c.clone());
    }
    for (cmd, args) in [
        ("query-named-block-nodes", json!({})),
        ("query-named-block-nodes", json!({"flat": true})),
        ("query-blockstats", json!({"query-nodes": true})),
        ("query-block", json!({})),
    ] {
        let mut want = qsd.execute(cmd, args.clone()).unwrap();
        let mut got = m.ok(cmd, args.clone());
        normalize(&mut want, &mut Vec::new());
        normalize(&mut got, &mut Vec::new());
        assert_eq!(got, want, "{cmd} {args}");
    }
    // Errors in the same words.
    for (cmd, args) in [
        ("blockdev-del", json!({"node-name": "nope"})),
        ("blockdev-del", json!({"node-name": "f2x"})),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "x", "file": "nope"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "f2", "filename": p(&raw)}),
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "filename": p(&raw)}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "q", "file": {"driver": "file"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": "r1"}),
        ),
        ("block_resize", json!({"node-name": "nope", "size": 512})),
        ("block_resize", json!({"node-name": "top", "size": -1})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "top", "name": "b", "granularity": 1000}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "r1", "name": "b", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "nope", "name": "b"}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "top", "name": "zz"}),
        ),
        (
            "block-set-write-threshold",
            json!({"node-name": "nope", "write-threshold": 1}),
        ),
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "n1", "name": "x"}),
        ),
        (
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "top"}),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "top", "snapshot-file": "/tmp/x"}),
        ),
        (
            "blockdev-snapshot",
            json!({"node": "top", "overlay": "top"}),
        ),
        (
            "transaction",
            json!({"actions": [{"type": "abort", "data": {}}]}),
        ),
    ] {
        let want = qsd.execute(cmd, args.clone()).unwrap_err();
        let got = m.err(cmd, args.clone());
        assert_eq!(got, want["desc"].as_str().unwrap(), "{cmd} {args}");
    }
    // The backing node of a snapshot is busy.
    let ov = dir.path().join("ov.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&ov), "4M"]);
    let add = json!({"driver": "qcow2", "node-name": "ov", "backing": null, "file": {"driver": "file", "filename": p(&ov), "locking": "off"}});
    qsd.execute("blockdev-add", add.clone()).unwrap();
    m.ok("blockdev-add", add);
    qsd.execute("blockdev-snapshot", json!({"node": "top", "overlay": "ov"}))
        .unwrap();
    m.ok("blockdev-snapshot", json!({"node": "top", "overlay": "ov"}));
    let want = qsd
        .execute("blockdev-del", json!({"node-name": "top"}))
        .unwrap_err();
    assert_eq!(
        m.err("blockdev-del", json!({"node-name": "top"})),
        want["desc"].as_str().unwrap()
    );
    let mut want = qsd.execute("query-named-block-nodes", json!({})).unwrap();
    let mut got = m.ok("query-named-block-nodes", json!({}));
    normalize(&mut want, &mut Vec::new());
    normalize(&mut got, &mut Vec::new());
    assert_same(&got, &want);
}

/// Compares two query results element by element, naming the first difference.
fn assert_same(got: &Value, want: &Value) {
    let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
    for (i, (a, b)) in g.iter().zip(w).enumerate() {
        assert_eq!(a, b, "element {i}");
    }
    assert_eq!(g.len(), w.len());
}

#[test]
fn blockdev_add_takes_both_forms_and_words_errors_like_qemu() {
    let mut m = Monitor::new();
    m.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "a"}),
    );
    m.ok(
        "blockdev-add",
        json!({"options": {"driver": "null-co", "node-name": "b"}}),
    );
    assert_eq!(
        m.err(
            "blockdev-add",
            json!({"options": {"driver": "raw", "node-name": "c", "file": {"driver": "file"}}})
        ),
        "Parameter 'options.file.filename' is missing"
    );
    assert_eq!(
        m.err(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "c", "file": {"driver": "file"}})
        ),
        "Parameter 'file.filename' is missing"
    );
    assert_eq!(
        m.err(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "c", "size": "big"})
        ),
        "Invalid parameter type for 'size', expected: integer"
    );
    assert_eq!(
        m.err("blockdev-add", json!({"driver": "nope", "node-name": "c"})),
        "Parameter 'driver' does not accept value 'nope'"
    );
    assert_eq!(
        m.err(
            "blockdev-add",
            json!({"driver": "vmdk", "node-name": "c", "file": "a"})
        ),
        "Driver 'vmdk' is not supported by this block layer"
    );
    assert_eq!(
        m.err(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "c", "x": 1})
        ),
        "Parameter 'x' is unexpected"
    );
    // QEMU 2.x: id creates a BlockBackend.
    m.ok(
        "blockdev-add",
        json!({"driver": "null-co", "id": "disk0", "stats-intervals": [60], "werror": "stop"}),
    );
    let qb = m.ok("query-block", json!({}));
    assert_eq!(qb[0]["device"], "disk0");
    assert_eq!(qb[0]["removable"], true);
    assert!(qb[0].get("tray_open").is_none());
    let st = m.ok("query-blockstats", json!({}));
    assert_eq!(st[0]["device"], "disk0");
    assert_eq!(st[0]["stats"]["timed_stats"][0]["interval_length"], 60);
    assert_eq!(
        m.err("blockdev-add", json!({"driver": "null-co", "id": "disk0"})),
        "Device with id 'disk0' already exists"
    );
    assert_eq!(
        m.err("x-blockdev-del", json!({"id": "nope"})),
        "Cannot find block backend nope"
    );
    let root = qb[0]["inserted"]["node-name"].as_str().unwrap().to_string();
    assert_eq!(
        m.err("x-blockdev-del", json!({"node-name": root})),
        format!("Node {root} is in use by disk0")
    );
    assert_eq!(
        m.err("x-blockdev-del", json!({"id": "disk0", "node-name": "a"})),
        "Only one of id and node-name must be specified"
    );
    m.ok("x-blockdev-del", json!({"id": "disk0"}));
    assert!(m.vmm.block.find_node(&root).is_none());
    m.ok("x-blockdev-del", json!({"node-name": "a"}));
    assert_eq!(
        m.err("x-blockdev-del", json!({"node-name": "a"})),
        "Cannot find node a"
    );
    let names: Vec<Value> = m
        .ok("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    assert_eq!(names, [json!("b")]);
}

#[test]
fn commands_listed_are_exactly_those_implemented() {
    let m = Monitor::new();
    let listed = m.d.commands();
    for c in block_graph::qmp::COMMANDS {
        assert!(listed.contains(c), "{c} not registered");
    }
    let extra: Vec<_> = listed
        .iter()
        .filter(|c| !block_graph::qmp::COMMANDS.contains(c))
        .filter(|c| !["qmp_capabilities", "query-commands", "query-qmp-schema"].contains(c))
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
    assert!(listed.contains(&"x-blockdev-change"));
}

#[test]
fn bitmaps_through_qmp_and_persisted_in_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    {
        let mut m = Monitor::new();
        m.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": p(&img)}}));
        m.ok("block-dirty-bitmap-add", json!({"node": "q", "name": "b0"}));
        m.ok(
            "block-dirty-bitmap-add",
            json!({"node": "q", "name": "p", "persistent": true, "granularity": 65536}),
        );
        m.ok(
            "block-dirty-bitmap-add",
            json!({"node": "q", "name": "off", "disabled": true}),
        );
        assert_eq!(
            m.err("block-dirty-bitmap-add", json!({"node": "q", "name": "b0"})),
            "Bitmap already exists: b0"
        );
        assert_eq!(
            m.err("block-dirty-bitmap-add", json!({"node": "q", "name": ""})),
            "Bitmap name cannot be empty"
        );
        let q = m.vmm.block.find_node("q").unwrap();
        let be = m
            .vmm
            .block
            .create_backend("d", Some(&q), Default::default())
            .unwrap();
        m.vmm.block.attach_device(&be, disk("vd")).unwrap();
        be.write_buf(0, &[1; 4096], WriteFlags::default()).unwrap();
        be.write_buf(1 << 20, &[1; 4096], WriteFlags::default())
            .unwrap();
        let qb = m.ok("query-block", json!({}));
        let bms = qb[0]["inserted"]["dirty-bitmaps"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(bms.len(), 3);
        assert_eq!(bms[0]["name"], "off", "newest first");
        assert_eq!(bms[0]["count"], 0);
        assert_eq!(bms[0]["status"], "disabled");
        assert_eq!(bms[0]["recording"], false);
        assert_eq!(bms[1]["name"], "p");
        assert_eq!(bms[1]["persistent"], true);
        assert_eq!(bms[1]["count"], 131072);
        assert_eq!(bms[2]["status"], "active");
        assert_eq!(qb[0]["dirty-bitmaps"], qb[0]["inserted"]["dirty-bitmaps"]);
        m.ok(
            "block-dirty-bitmap-merge",
            json!({"node": "q", "target": "off", "bitmaps": ["b0", {"node": "q", "name": "p"}]}),
        );
        assert_eq!(q.bitmap("off").unwrap().count(), 131072);
        assert_eq!(
            m.err(
                "block-dirty-bitmap-merge",
                json!({"node": "q", "target": "off", "bitmaps": ["nope"]})
            ),
            "Dirty bitmap 'nope' not found"
        );
        m.ok(
            "block-dirty-bitmap-clear",
            json!({"node": "q", "name": "b0"}),
        );
        assert_eq!(q.bitmap("b0").unwrap().count(), 0);
        m.ok(
            "block-dirty-bitmap-enable",
            json!({"node": "q", "name": "off"}),
        );
        m.ok(
            "block-dirty-bitmap-disable",
            json!({"node": "d", "name": "b0"}),
        );
        be.write_buf(8 << 20, &[1; 512], WriteFlags::default())
            .unwrap();
        assert_eq!(q.bitmap("b0").unwrap().count(), 0);
        assert_eq!(q.bitmap("off").unwrap().count(), 3 * 65536);
        m.ok(
            "block-dirty-bitmap-remove",
            json!({"node": "q", "name": "off"}),
        );
        assert!(q.bitmap("off").is_none());
        // Busy bitmaps are refused.
        q.bitmap("b0").unwrap().set_busy(true);
        assert_eq!(
            m.err(
                "block-dirty-bitmap-clear",
                json!({"node": "q", "name": "b0"})
            ),
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
        m.vmm.block.close_all();
    }
    assert_clean(&img);
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", p(&img)])).unwrap();
    let bms = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bms.as_array().unwrap().len(), 1, "{info}");
    assert_eq!(bms[0]["name"], "p");
    assert_eq!(bms[0]["flags"], json!(["auto"]));
    // Loaded on open, with its bits, and marked in use while open.
    let mut m = Monitor::new();
    m.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": p(&img)}}));
    let q = m.vmm.block.find_node("q").unwrap();
    let b = q.bitmap("p").unwrap();
    assert!(b.is_persistent() && b.get(0) && b.get(1 << 20) && b.get(8 << 20));
    assert_eq!(b.count(), 3 * 65536);
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p(&img)])).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["flags"],
        json!(["in-use", "auto"])
    );
    m.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "p"}),
    );
    drop((q, b));
    m.vmm.block.close_all();
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", p(&img)])).unwrap();
    assert!(
        info["format-specific"]["data"].get("bitmaps").is_none(),
        "{info}"
    );
    assert_clean(&img);
}

#[test]
fn transactions_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    let mut m = Monitor::new();
    m.ok("blockdev-add", json!({"driver": "qcow2", "id": "d", "node-name": "q", "file": {"driver": "file", "filename": p(&img)}}));
    m.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "keep"}),
    );
    let be = m.vmm.block.find_backend("d").unwrap();
    m.vmm.block.attach_device(&be, disk("vd")).unwrap();
    be.write_buf(0, &[7; 4096], WriteFlags::default()).unwrap();
    let s1 = dir.path().join("s1.qcow2");
    let e = m.err(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "new"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "keep"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "q", "name": "keep"}},
            {"type": "blockdev-snapshot-sync", "data": {"device": "d", "snapshot-file": p(&s1), "snapshot-node-name": "s1"}},
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "s1", "name": "i1"}},
            {"type": "abort", "data": {}}
        ]}),
    );
    assert_eq!(e, "Transaction aborted using Abort action");
    let q = m.vmm.block.find_node("q").unwrap();
    assert!(q.bitmap("new").is_none());
    let keep = q.bitmap("keep").unwrap();
    assert_eq!(keep.count(), 65536, "clear undone");
    assert!(keep.is_enabled(), "disable undone");
    assert_eq!(be.root_node().unwrap().name(), "q", "snapshot undone");
    assert!(m.vmm.block.find_node("s1").is_none());
    // The same without abort takes effect.
    m.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "new"}},
            {"type": "blockdev-snapshot-sync", "data": {"device": "d", "snapshot-file": p(&s1), "snapshot-node-name": "s1"}},
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d", "name": "i1"}}
        ]}),
    );
    assert_eq!(be.root_node().unwrap().name(), "s1");
    assert!(q.bitmap("new").is_some());
    let mut b = [0u8; 16];
    be.read_buf(0, &mut b).unwrap();
    assert_eq!(b, [7; 16]);
    assert_eq!(
        m.err("transaction", json!({"actions": [{"type": "drive-backup", "data": {"device": "d", "target": "/tmp/x", "sync": "full"}}]})),
        "Action 'drive-backup' is not supported: it needs a block job engine"
    );
    let qb = m.ok("query-block", json!({}));
    assert_eq!(qb[0]["inserted"]["backing_file_depth"], 1);
    assert_eq!(qb[0]["inserted"]["backing_file"], p(&img));
    assert_eq!(qb[0]["inserted"]["image"]["backing-filename"], p(&img));
    drop(q);
    drop(keep);
    drop(be);
    m.vmm.block.close_all();
    assert_clean(&img);
    assert_clean(&s1);
    let l = qemu_img(&["snapshot", "-l", p(&s1)]);
    assert!(l.contains("i1"), "{l}");
}

#[test]
fn media_and_throttling_through_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("a.iso");
    std::fs::write(&iso, vec![1u8; 1 << 20]).unwrap();
    let mut m = Monitor::new();
    m.ok("blockdev-add", json!({"driver": "raw", "node-name": "cd", "read-only": true, "file": {"driver": "file", "filename": p(&iso)}}));
    let n = m.vmm.block.find_node("cd").unwrap();
    let be = m
        .vmm
        .block
        .create_backend("ide-cd0", Some(&n), Default::default())
        .unwrap();
    m.vmm.block.attach_device(&be, cdrom("cd0")).unwrap();
    let qb = m.ok("query-block", json!({}));
    assert_eq!(qb[0]["tray_open"], false);
    assert_eq!(qb[0]["qdev"], "cd0");
    assert_eq!(qb[0]["inserted"]["ro"], true);
    m.ok("blockdev-open-tray", json!({"id": "cd0"}));
    let ev = m.vmm.block.take_events();
    assert_eq!(ev[0].event, "DEVICE_TRAY_MOVED");
    m.ok("blockdev-remove-medium", json!({"id": "cd0"}));
    assert!(m.ok("query-block", json!({}))[0].get("inserted").is_none());
    assert_eq!(
        m.err(
            "blockdev-insert-medium",
            json!({"id": "cd0", "node-name": "zz"})
        ),
        "Node 'zz' not found"
    );
    m.ok(
        "blockdev-insert-medium",
        json!({"id": "cd0", "node-name": "cd"}),
    );
    m.ok("blockdev-close-tray", json!({"device": "ide-cd0"}));
    m.ok(
        "change",
        json!({"device": "ide-cd0", "target": p(&iso), "arg": "raw"}),
    );
    m.ok(
        "blockdev-change-medium",
        json!({"id": "cd0", "filename": p(&iso), "read-only-mode": "read-only"}),
    );
    m.ok("eject", json!({"device": "ide-cd0"}));
    let e = m.run("eject", json!({"device": "nope"})).unwrap_err();
    assert_eq!(e.class, ErrorClass::DeviceNotFound);
    assert_eq!(e.desc, "Device 'nope' not found");

    // Throttling.
    m.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n", "size": 1073741824}),
    );
    let n = m.vmm.block.find_node("n").unwrap();
    let be = m
        .vmm
        .block
        .create_backend("disk", Some(&n), Default::default())
        .unwrap();
    m.vmm.block.attach_device(&be, disk("vd")).unwrap();
    let zero = json!({"device": "disk", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0});
    let with = |k: &str, v: Value| {
        let mut a = zero.clone();
        a[k] = v;
        a
    };
    assert_eq!(
        m.err("block_set_io_throttle", with("bps_max", json!(100))),
        "bps_max/iops_max require corresponding bps/iops values"
    );
    assert_eq!(
        m.err("block_set_io_throttle", with("iops", json!(-1))),
        "bps/iops/max values must be within [0, 1000000000000000]"
    );
    let mut a = with("bps", json!(4 << 20));
    a["bps_max"] = json!(8 << 20);
    a["bps_max_length"] = json!(2);
    a["group"] = json!("g1");
    m.ok("block_set_io_throttle", a);
    let qb = m.ok("query-block", json!({}));
    let ins = &qb[1]["inserted"];
    assert_eq!(ins["bps"], 4 << 20);
    assert_eq!(ins["bps_max"], 8 << 20);
    assert_eq!(ins["bps_max_length"], 2);
    assert_eq!(ins["group"], "g1");
    assert!(ins.get("iops_max").is_none());
    // 1 MiB/s with no burst: about avg/10 of slack, then the average.
    let mut a = with("bps", json!(1 << 20));
    a["group"] = json!("g2");
    m.ok("block_set_io_throttle", a);
    let start = std::time::Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < std::time::Duration::from_millis(600) {
        be.write_buf(0, &[0; 65536], WriteFlags::default()).unwrap();
        bytes += 65536;
    }
    let secs = start.elapsed().as_secs_f64();
    let expected = (1u64 << 20) as f64 * (secs + 0.1);
    let ratio = bytes as f64 / expected;
    assert!(
        (0.85..1.15).contains(&ratio),
        "throttled to {bytes} bytes in {secs} s"
    );
    m.ok("block_set_io_throttle", zero);
    assert!(m.ok("query-block", json!({}))[1]["inserted"]
        .get("group")
        .is_none());
}

#[test]
fn remaining_commands_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    let mut m = Monitor::new();
    m.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": p(&img)}}));
    assert_eq!(
        m.err("block_passwd", json!({"node-name": "q", "password": "x"})),
        "Device 'q' is not encrypted"
    );
    assert_eq!(
        m.err("block_passwd", json!({"device": "x", "password": "x"})),
        "Cannot find device='x' nor node-name=''"
    );
    m.ok(
        "block-set-write-threshold",
        json!({"node-name": "q", "write-threshold": 4096}),
    );
    let ni = m.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(ni[0]["write_threshold"], 4096);
    let q = m.vmm.block.find_node("q").unwrap();
    let be = m
        .vmm
        .block
        .create_backend("d", Some(&q), Default::default())
        .unwrap();
    m.vmm.block.attach_device(&be, disk("vd")).unwrap();
    be.write_buf(0, &[1; 8192], WriteFlags::default()).unwrap();
    let ev = m.vmm.block.take_events();
    assert_eq!(ev[0].event, "BLOCK_WRITE_THRESHOLD");
    m.ok("block_resize", json!({"device": "d", "size": 32 << 20}));
    assert_eq!(be.length(), 32 << 20);
    m.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "d", "name": "s"}),
    );
    let del = m.ok(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "d", "name": "s"}),
    );
    assert_eq!(del["name"], "s");
    assert_eq!(del["id"], "1");
    // Permission conflicts surface through QMP too.
    assert!(m
        .err("blockdev-add", json!({"driver": "qcow2", "node-name": "q2", "file": q.child("file").unwrap().node().name()}))
        .starts_with("Permission conflict on node '"));
    // change-backing-file needs an image with a backing file, in the device's chain.
    let ov = dir.path().join("ov.qcow2");
    m.ok("blockdev-snapshot-sync", json!({"device": "d", "snapshot-file": p(&ov), "snapshot-node-name": "ov", "format": "qcow2"}));
    assert_eq!(
        m.err(
            "change-backing-file",
            json!({"device": "d", "image-node-name": "q", "backing-file": "x"})
        ),
        "not allowing backing file change on an image without a backing file"
    );
    m.ok(
        "change-backing-file",
        json!({"device": "d", "image-node-name": "ov", "backing-file": "c.qcow2"}),
    );
    let node_ov = |m: &mut Monitor| {
        let ni = m.ok("query-named-block-nodes", json!({}));
        ni.as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "ov")
            .unwrap()
            .clone()
    };
    assert_eq!(node_ov(&mut m)["image"]["backing-filename"], "c.qcow2");
    // Once another snapshot made `ov` a read-only backing image, it is reopened read-write
    // for the change and read-only again afterwards, as QEMU does.
    let ov2 = dir.path().join("ov2.qcow2");
    m.ok("blockdev-snapshot-sync", json!({"device": "d", "snapshot-file": p(&ov2), "snapshot-node-name": "ov2", "format": "qcow2"}));
    m.ok(
        "change-backing-file",
        json!({"device": "d", "image-node-name": "ov", "backing-file": "./c.qcow2"}),
    );
    let ovi = node_ov(&mut m);
    assert_eq!(ovi["image"]["backing-filename"], "./c.qcow2");
    assert_eq!(ovi["ro"], true, "read-only again: {ovi}");
    drop(q);
    drop(be);
    m.vmm.block.close_all();
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", p(&ov)])).unwrap();
    assert_eq!(info["backing-filename"], "./c.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_clean(&ov);
    assert_clean(&ov2);
    assert_clean(&img);
}

#[test]
fn devices_on_nodes_without_a_backend_name() {
    // What `-blockdev ...,node-name=n0 -device virtio-blk,drive=n0,id=vd0` sets up.
    let mut m = Monitor::new();
    let o = block_graph::parse_blockdev_arg("null-co,node-name=n0,size=1048576").unwrap();
    let n = m.vmm.block.blockdev_add(&o).unwrap();
    // A root as vmm-reference makes for a device on a node without a backend name.
    let unnamed_root = |g: &mut block_graph::BlockGraph| {
        g.new_root(
            &n,
            block_graph::Perm::NONE,
            block_graph::Perm::ALL,
            "an unnamed block device",
        )
        .unwrap()
    };
    let be = unnamed_root(&mut m.vmm.block);
    m.vmm.block.attach_device(&be, disk("vd0")).unwrap();
    let qb = m.ok("query-block", json!({}));
    assert_eq!(qb.as_array().unwrap().len(), 1);
    assert_eq!(qb[0]["device"], "");
    assert_eq!(qb[0]["qdev"], "vd0");
    assert_eq!(qb[0]["inserted"]["node-name"], "n0");
    let st = m.ok("query-blockstats", json!({}));
    assert_eq!(st[0]["device"], "");
    // The device is named in permission errors.
    let be2 = unnamed_root(&mut m.vmm.block);
    let e = m.vmm.block.attach_device(&be2, disk("vd1")).unwrap_err();
    assert!(e.to_string().contains("block device 'vd0'"), "{e}");
    // Media commands address it by its device id.
    assert_eq!(
        m.err("eject", json!({"id": "vd0"})),
        "Device 'vd0' is not removable"
    );
    assert_eq!(
        m.err("blockdev-del", json!({"node-name": "n0"})),
        "Node n0 is in use"
    );
}
