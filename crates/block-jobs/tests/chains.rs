//! Stream and commit on real 3-deep qcow2 chains made by qemu-img, driven through the
//! graph directly (the end-to-end tests in the workspace's tests/jobs_e2e.rs go through
//! QMP); qemu-img judges the images afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use block_graph::BlockGraph;
use block_jobs::Jobs;
use qapi_types::cmd::{BlockCommitArguments, BlockStreamArguments};
use qapi_types::{BlockdevOptions, JobStatus, QapiType};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(img);
    let out = Command::new("qemu-io").args(&a).output().expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Chain {
    _dir: tempfile::TempDir,
    base: String,
    mid: String,
    top: String,
    expected: String,
}

/// base: 0x11 over [0, 1M) and [2M, 3M); mid: 0x22 over [1M, 2M), zeros over [2M, 2.5M);
/// top: 0x33 over [3M, 3.5M). `expected` is the flattened top.
fn chain(size: u64) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let (base, mid, top, expected) = (
        p("base.qcow2"),
        p("mid.qcow2"),
        p("top.qcow2"),
        p("expected.raw"),
    );
    let sz = size.to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &base, &sz]);
    qemu_io(&base, &["write -P 0x11 0 1M", "write -P 0x11 2M 1M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &mid,
    ]);
    qemu_io(&mid, &["write -P 0x22 1M 1M", "write -z 2M 512k"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &mid, &top,
    ]);
    qemu_io(&top, &["write -P 0x33 3M 512k"]);
    qemu_img(&["convert", "-O", "raw", &top, &expected]);
    Chain {
        _dir: dir,
        base,
        mid,
        top,
        expected,
    }
}

fn open(g: &mut BlockGraph, name: &str, file: &str) {
    let o = BlockdevOptions::from_qmp_strict(json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "filename": file}
    }))
    .unwrap();
    g.blockdev_add(&o).unwrap();
}

/// `qemu-img compare` of the raw `expected` with the qcow2 `img`.
fn same(expected: &str, img: &str) {
    qemu_img(&["compare", "-q", "-f", "raw", "-F", "qcow2", expected, img]);
}

fn check(img: &str) {
    qemu_img(&["check", "-q", img]);
}

fn backing_of(img: &str) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", img])).unwrap();
    v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(String::from)
}

fn finish(jobs: &Jobs, g: &mut BlockGraph, id: &str) -> Vec<String> {
    let st = jobs.wait_finished(g, id, Duration::from_secs(30));
    assert_eq!(st, Some(JobStatus::Null), "{id}");
    g.take_events().iter().map(|e| e.event.clone()).collect()
}

fn stream_args(device: &str) -> BlockStreamArguments {
    BlockStreamArguments::from_qmp_strict(json!({"device": device})).unwrap()
}

fn commit_args(v: serde_json::Value) -> BlockCommitArguments {
    BlockCommitArguments::from_qmp_strict(v).unwrap()
}

#[test]
fn stream_whole_chain() {
    let c = chain(4 * MIB);
    let mut g = BlockGraph::new();
    open(&mut g, "top", &c.top);
    let jobs = Jobs::for_graph(&g);
    let mut a = stream_args("top");
    a.job_id = Some("s0".into());
    block_jobs::stream::block_stream(&jobs, &mut g, &a).unwrap();
    let ev = finish(&jobs, &mut g, "s0");
    assert!(ev.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{ev:?}");
    assert!(g.find_node("top").unwrap().backing().is_none());
    drop(g);
    check(&c.top);
    assert_eq!(backing_of(&c.top), None);
    same(&c.expected, &c.top);
}

#[test]
fn stream_to_base_with_backing_file_and_errors() {
    let c = chain(4 * MIB);
    let mut g = BlockGraph::new();
    open(&mut g, "top", &c.top);
    let jobs = Jobs::for_graph(&g);
    // Argument errors, in QEMU's words.
    let e = |v| {
        let a = BlockStreamArguments::from_qmp_strict(v).unwrap();
        block_jobs::stream::block_stream(&jobs, &mut BlockGraph::new(), &a)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        e(json!({"device": "x", "base": "a", "base-node": "b"})),
        "'base' and 'base-node' cannot be specified at the same time"
    );
    let err = |g: &mut BlockGraph, v| {
        let a = BlockStreamArguments::from_qmp_strict(v).unwrap();
        block_jobs::stream::block_stream(&jobs, g, &a)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&mut g, json!({"device": "top", "base": "/nonexistent"})),
        "Can't find '/nonexistent' in the backing chain"
    );
    assert_eq!(
        err(&mut g, json!({"device": "top", "base-node": "top"})),
        "Node 'top' is not a backing image of 'top'"
    );
    assert_eq!(
        err(&mut g, json!({"device": "top", "backing-file": "x"})),
        "backing file specified, but streaming the entire chain"
    );
    assert_eq!(err(&mut g, json!({"device": "top"})), "Invalid job ID ''");
    let mut a = stream_args("top");
    a.job_id = Some("s1".into());
    a.base = Some(c.base.clone());
    a.backing_file = Some("base.qcow2".into());
    block_jobs::stream::block_stream(&jobs, &mut g, &a).unwrap();
    finish(&jobs, &mut g, "s1");
    let top = g.find_node("top").unwrap();
    let b = top.backing().unwrap().node();
    assert_eq!(block_graph::filename::node_filename(&b), c.base);
    drop((top, b));
    drop(g);
    check(&c.top);
    assert_eq!(backing_of(&c.top).as_deref(), Some("base.qcow2"));
    same(&c.expected, &c.top);
    // The mid layer's data is in top now: the chain top -> base alone gives the same.
    let _ = Path::new(&c.mid);
}

#[test]
fn intermediate_commit() {
    let c = chain(4 * MIB);
    let mut g = BlockGraph::new();
    open(&mut g, "top", &c.top);
    let jobs = Jobs::for_graph(&g);
    let mut a = commit_args(json!({"device": "top", "job-id": "c0", "top": c.mid}));
    a.speed = Some(0);
    block_jobs::commit::block_commit(&jobs, &mut g, &a).unwrap();
    let ev = finish(&jobs, &mut g, "c0");
    assert!(ev.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{ev:?}");
    let top = g.find_node("top").unwrap();
    let b = top.backing().unwrap().node();
    assert_eq!(block_graph::filename::node_filename(&b), c.base);
    drop((top, b));
    drop(g);
    for i in [&c.top, &c.base] {
        check(i);
    }
    assert_eq!(backing_of(&c.top).as_deref(), Some(c.base.as_str()));
    same(&c.expected, &c.top);
}

#[test]
fn active_commit_and_commit_errors() {
    let c = chain(4 * MIB);
    let mut g = BlockGraph::new();
    open(&mut g, "top", &c.top);
    let jobs = Jobs::for_graph(&g);
    let err = |g: &mut BlockGraph, v| {
        block_jobs::commit::block_commit(&jobs, g, &commit_args(v))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&mut g, json!({"device": "nope"})),
        "Device 'nope' not found"
    );
    assert_eq!(
        err(
            &mut g,
            json!({"device": "top", "top": "/x", "top-node": "top"})
        ),
        "'top-node' and 'top' are mutually exclusive"
    );
    assert_eq!(
        err(&mut g, json!({"device": "top", "top": "/nonexistent"})),
        "Top image file /nonexistent not found"
    );
    assert_eq!(
        err(
            &mut g,
            json!({"device": "top", "job-id": "x", "backing-file": "b"})
        ),
        "'backing-file' specified, but 'top' is the active layer"
    );
    assert_eq!(
        err(&mut g, json!({"device": "top", "base": "/nowhere"})),
        "Can't find '/nowhere' in the backing chain"
    );
    let bname = g
        .find_node("top")
        .unwrap()
        .backing()
        .unwrap()
        .node()
        .backing()
        .unwrap()
        .node()
        .name()
        .to_string();
    assert_eq!(
        err(
            &mut g,
            json!({"device": "top", "top-node": bname.clone(), "base-node": bname})
        ),
        "cannot commit an image into itself"
    );
    block_jobs::commit::block_commit(
        &jobs,
        &mut g,
        &commit_args(json!({"device": "top", "job-id": "a0"})),
    )
    .unwrap();
    // Ready, then complete pivots the users of top to base.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while jobs.find("a0").unwrap().status() != JobStatus::Ready {
        jobs.poll(&mut g);
        assert!(std::time::Instant::now() < end);
        std::thread::sleep(Duration::from_millis(2));
    }
    // The filter above top makes it a non-root node; a stream on it meets the blocker.
    assert_eq!(
        err(&mut g, json!({"device": "top", "job-id": "a1"})),
        "Need a root block node"
    );
    let mut s = stream_args("top");
    s.job_id = Some("s9".into());
    assert_eq!(
        block_jobs::stream::block_stream(&jobs, &mut g, &s)
            .unwrap_err()
            .to_string(),
        "Node 'top' is busy: block device is in use by block job: commit"
    );
    jobs.complete("a0").unwrap();
    let ev = finish(&jobs, &mut g, "a0");
    assert!(ev.contains(&"BLOCK_JOB_READY".to_string()), "{ev:?}");
    assert!(ev.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{ev:?}");
    drop(g);
    check(&c.base);
    same(&c.expected, &c.base);
    let _: Option<PathBuf> = None;
}

#[test]
fn intermediate_commit_stops_on_an_injected_error_and_resumes() {
    let c = chain(4 * MIB);
    let mut g = BlockGraph::new();
    for (name, v) in [
        (
            "base",
            json!({"driver": "qcow2", "node-name": "base", "read-only": true,
                        "file": {"driver": "file", "filename": c.base}}),
        ),
        (
            "mid",
            json!({"driver": "qcow2", "node-name": "mid", "read-only": true,
                       "backing": "base",
                       "file": {"driver": "blkdebug",
                                "inject-error": [{"event": "read_aio", "errno": 5, "once": true}],
                                "image": {"driver": "file", "filename": c.mid}}}),
        ),
        (
            "top",
            json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
                       "file": {"driver": "file", "filename": c.top}}),
        ),
    ] {
        let o = BlockdevOptions::from_qmp_strict(v).unwrap();
        g.blockdev_add(&o).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let jobs = Jobs::for_graph(&g);
    let a = commit_args(json!({"device": "top", "job-id": "ce", "top-node": "mid"}));
    block_jobs::commit::block_commit_with(&jobs, &mut g, &a, qapi_types::BlockdevOnError::Stop)
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        jobs.poll(&mut g);
        let j = jobs.find("ce").unwrap();
        if j.status() == JobStatus::Paused && j.is_user_paused() {
            break;
        }
        assert!(std::time::Instant::now() < end, "{:?}", j.status());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        jobs.query_block_jobs()[0].io_status,
        qapi_types::BlockDeviceIoStatus::Failed
    );
    jobs.resume("ce").unwrap();
    let ev = finish(&jobs, &mut g, "ce");
    assert!(ev.contains(&"BLOCK_JOB_ERROR".to_string()), "{ev:?}");
    assert!(ev.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{ev:?}");
    // base is read-only again; top's backing is base.
    let base = g.find_node("base").unwrap();
    assert!(base.is_read_only());
    let top = g.find_node("top").unwrap();
    assert!(Arc::ptr_eq(&top.backing().unwrap().node(), &base));
    drop((top, base));
    drop(g);
    check(&c.base);
    check(&c.top);
    same(&c.expected, &c.top);
    assert_eq!(backing_of(&c.top).as_deref(), Some(c.base.as_str()));
}
