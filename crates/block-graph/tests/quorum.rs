//! quorum and blkverify: voting, repairs, events, children changed at run time.

mod common;

use block_graph::{BlockGraph, WriteFlags};
use common::*;
use serde_json::{json, Value};

fn files(dir: &std::path::Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("c{i}.raw"));
            std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect()
}

fn events(g: &BlockGraph, name: &str) -> Vec<Value> {
    g.take_events()
        .into_iter()
        .filter(|e| e.event == name)
        .map(|e| e.data.unwrap())
        .collect()
}

fn quorum(
    g: &mut BlockGraph,
    f: &[String],
    extra: Value,
) -> std::sync::Arc<block_graph::BlockBackend> {
    let children: Vec<Value> = f
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"driver": "raw", "node-name": format!("r{i}"), "file": {"driver": "file", "filename": p}}))
        .collect();
    let mut o =
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": children});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    let n = g.blockdev_add(&opts(o)).unwrap();
    let be = g
        .create_backend("qd", Some(&n), Default::default())
        .unwrap();
    g.attach_device(&be, disk("vq")).unwrap();
    be
}

#[test]
fn votes_reports_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path(), 3);
    let mut g = BlockGraph::new();
    let be = quorum(&mut g, &f, json!({"rewrite-corrupted": true}));
    be.write_buf(4096, &[7; 4096], WriteFlags::default())
        .unwrap();
    for p in &f {
        assert_eq!(&std::fs::read(p).unwrap()[4096..8192], &[7u8; 4096][..]);
    }
    // Corrupt one replica behind the quorum's back.
    let mut d = std::fs::read(&f[1]).unwrap();
    d[5000] = 0xee;
    std::fs::write(&f[1], &d).unwrap();
    let mut buf = [0u8; 4096];
    be.read_buf(4096, &mut buf).unwrap();
    assert_eq!(buf, [7; 4096]);
    let bad = events(&g, "QUORUM_REPORT_BAD");
    assert_eq!(
        bad,
        [json!({"type": "read", "node-name": "r1", "sector-num": 8, "sectors-count": 8})]
    );
    assert_eq!(std::fs::read(&f[1]).unwrap()[5000], 7, "rewritten");
    // Two replicas corrupted differently: no version reaches the threshold.
    for (i, b) in [(0usize, 1u8), (1, 2)] {
        let mut d = std::fs::read(&f[i]).unwrap();
        d[4096] = b;
        std::fs::write(&f[i], &d).unwrap();
    }
    assert_eq!(
        be.read_buf(4096, &mut buf).unwrap_err().errno_value(),
        libc::EIO
    );
    let fail = events(&g, "QUORUM_FAILURE");
    assert_eq!(
        fail,
        [json!({"reference": "qd", "sector-num": 8, "sectors-count": 8})]
    );
}

#[test]
fn fifo_reads_and_failed_children() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path(), 2);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1,
            "read-pattern": "fifo", "children": [
                {"driver": "raw", "node-name": "bad", "file": {"driver": "blkdebug",
                    "inject-error": [{"event": "read_aio", "errno": 5}],
                    "image": {"driver": "file", "filename": f[0]}}},
                {"driver": "raw", "node-name": "good", "file": {"driver": "file", "filename": f[1]}}
            ]}),
        ))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("v")).unwrap();
    be.write_buf(0, &[3; 512], WriteFlags::default()).unwrap();
    let mut buf = [0u8; 512];
    be.read_buf(0, &mut buf).unwrap();
    assert_eq!(buf, [3; 512]);
    let bad = events(&g, "QUORUM_REPORT_BAD");
    assert_eq!(bad[0]["node-name"], "bad");
    assert_eq!(bad[0]["error"], "Input/output error");
}

#[test]
fn children_change_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path(), 4);
    let mut g = BlockGraph::new();
    let be = quorum(&mut g, &f[..3], json!({}));
    be.write_buf(0, &[9; 512], WriteFlags::default()).unwrap();
    let e = |g: &mut BlockGraph, p: &str, c: Option<&str>, n: Option<&str>| {
        g.x_blockdev_change(p, c, n).unwrap_err().to_string()
    };
    assert_eq!(
        e(&mut g, "q", None, None),
        "Either child or node must be specified"
    );
    assert_eq!(
        e(&mut g, "q", Some("a"), Some("b")),
        "The parameters child and node are in conflict"
    );
    assert_eq!(
        e(&mut g, "q", Some("children.7"), None),
        "Node 'q' does not have child 'children.7'"
    );
    g.x_blockdev_change("q", Some("children.2"), None).unwrap();
    assert!(g.find_node("r2").is_none(), "the removed child goes away");
    assert_eq!(
        e(&mut g, "q", Some("children.1"), None),
        "The number of children cannot be lower than the vote threshold 2"
    );
    std::fs::write(&f[3], std::fs::read(&f[0]).unwrap()).unwrap();
    g.blockdev_add(&opts(
        json!({"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": f[3]}}),
    ))
    .unwrap();
    g.x_blockdev_change("q", None, Some("r3")).unwrap();
    let q = g.find_node("q").unwrap();
    assert!(q.child("children.3").is_some());
    be.write_buf(512, &[8; 512], WriteFlags::default()).unwrap();
    assert_eq!(&std::fs::read(&f[3]).unwrap()[512..1024], &[8u8; 512][..]);
    assert_eq!(
        e(&mut g, "q", None, Some("r3")),
        "The node r3 already has a parent"
    );
    assert_eq!(
        e(&mut g, "r0", None, Some("r3")),
        "The node r0 does not support adding a child"
    );
    // Option errors.
    let bad = |g: &mut BlockGraph, t: i64| {
        g.blockdev_add(&opts(
            json!({"driver": "quorum", "node-name": "x", "vote-threshold": t,
            "children": [{"driver": "null-co"}]}),
        ))
        .unwrap_err()
        .to_string()
    };
    assert_eq!(bad(&mut g, 2), "threshold may not exceed children count");
    assert_eq!(
        bad(&mut g, 0),
        "Parameter 'vote-threshold' expects a value >= 1"
    );
}

#[test]
fn blkverify_catches_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path(), 2);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(json!({"driver": "blkverify", "node-name": "v",
            "test": {"driver": "raw", "file": {"driver": "file", "filename": f[0]}},
            "raw": {"driver": "file", "filename": f[1]}})))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("v")).unwrap();
    be.write_buf(0, &[4; 1024], WriteFlags::default()).unwrap();
    let mut buf = [0u8; 1024];
    be.read_buf(0, &mut buf).unwrap();
    let mut d = std::fs::read(&f[0]).unwrap();
    d[100] = 0;
    std::fs::write(&f[0], &d).unwrap();
    assert_eq!(
        be.read_buf(0, &mut buf).unwrap_err().to_string(),
        "blkverify: contents mismatch"
    );
}
