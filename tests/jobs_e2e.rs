//! End to end: block jobs in `vmm-reference --no-guest` over a real QMP socket: stream and
//! commit (intermediate and active) on 3-deep qcow2 chains, speed, pause/resume, cancel at
//! random moments, every on-error policy with blkdebug's injected errors, the job verbs'
//! errors and the events; the images judged afterwards by `qemu-img check` and
//! `qemu-img compare` against the chain's flattened content taken before the job. The
//! event sequence and `query-block-jobs` shape of a stream are compared with
//! qemu-storage-daemon 7.2 running the same job.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{chunk_has, Qsd, Vmm};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect(tool);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(img);
    run("qemu-io", &a);
}

/// A 3-deep chain in its own directory: base <- mid <- top, `expected` the flattened top.
struct Chain {
    dir: tempfile::TempDir,
}

impl Chain {
    /// base: 0x11 over [0, 1M) and [2M, 3M); mid: 0x22 over [1M, 2M) and zeros over
    /// [2M, 2.5M); top: 0x33 over [3M, 3.5M).
    fn new() -> Chain {
        let c = Chain {
            dir: tempfile::tempdir().unwrap(),
        };
        let size = (4 * MIB).to_string();
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &c.path("base"), &size],
        );
        qemu_io(
            &c.path("base"),
            &["write -P 0x11 0 1M", "write -P 0x11 2M 1M"],
        );
        for (img, below) in [("mid", "base"), ("top", "mid")] {
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    &c.path(below),
                    &c.path(img),
                ],
            );
        }
        qemu_io(&c.path("mid"), &["write -P 0x22 1M 1M", "write -z 2M 512k"]);
        qemu_io(&c.path("top"), &["write -P 0x33 3M 512k"]);
        run(
            "qemu-img",
            &["convert", "-O", "raw", &c.path("top"), &c.path("expected")],
        );
        c
    }

    fn path(&self, name: &str) -> String {
        let ext = if name == "expected" { "raw" } else { "qcow2" };
        self.dir
            .path()
            .join(format!("{name}.{ext}"))
            .to_string_lossy()
            .into_owned()
    }

    /// `qemu-img check` of every image and `compare` of `img` with the expected content.
    fn judge(&self, img: &str) {
        for n in ["base", "mid", "top"] {
            run("qemu-img", &["check", "-q", &self.path(n)]);
        }
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "qcow2",
                &self.path("expected"),
                &self.path(img),
            ],
        );
    }

    fn backing_of(&self, img: &str) -> Option<String> {
        let v: Value = serde_json::from_str(&run(
            "qemu-img",
            &["info", "-U", "--output=json", &self.path(img)],
        ))
        .unwrap();
        v["backing-filename"].as_str().map(String::from)
    }

    /// `--blockdev` of the top image (its backing chain opens from the image headers).
    fn top_arg(&self, node: &str) -> String {
        json!({"driver": "qcow2", "node-name": node,
               "file": {"driver": "file", "filename": self.path("top")}})
        .to_string()
    }
}

/// The shared job client, with this file's views of its event log.
type Client = common::JobClient;

impl Client {
    /// The statuses `id` went through, in order, as logged so far.
    fn statuses(&self, id: &str) -> Vec<String> {
        self.log
            .iter()
            .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == id)
            .map(|e| e["data"]["status"].as_str().unwrap().to_string())
            .collect()
    }

    /// The names of the job events of `id` (statuses as `status:x`).
    fn job_events(&self, id: &str) -> Vec<String> {
        self.log
            .iter()
            .filter(|e| e["data"]["id"] == id || e["data"]["device"] == id)
            .map(|e| match e["event"].as_str().unwrap() {
                "JOB_STATUS_CHANGE" => format!("status:{}", e["data"]["status"].as_str().unwrap()),
                n => n.to_string(),
            })
            .collect()
    }

    fn quit(mut self, mut vmm: Vmm) {
        let _ = self.cmd("quit", json!({}));
        vmm.wait_exit(Duration::from_secs(20));
    }
}

/// Negotiates with `vmm` once its monitor listens (the socket's path appears at `bind`, a
/// moment before `listen`: a connection then is refused).
fn negotiated(vmm: &Vmm) -> Client {
    let end = Instant::now() + Duration::from_secs(10);
    while let Err(e) = std::os::unix::net::UnixStream::connect(&vmm.sock) {
        assert!(Instant::now() < end, "monitor never listened: {e}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Client::new(vmm.negotiated())
}

fn start(chain: &Chain) -> (Vmm, Client) {
    let vmm = Vmm::start(&["--blockdev", &chain.top_arg("top")]);
    let c = negotiated(&vmm);
    (vmm, c)
}

#[test]
fn stream_with_speed_events_and_backing_file() {
    let chain = Chain::new();
    let (vmm, mut c) = start(&chain);
    // Copied: mid's 1 MiB of data and 0.5 MiB of zeros, base's 2 MiB: 3.5 MiB at 8 MiB/s.
    let t = Instant::now();
    c.ok(
        "block-stream",
        json!({"device": "top", "job-id": "s0", "speed": 8 * MIB}),
    );
    let jobs = c.ok("query-block-jobs", json!({}));
    let j = &jobs[0];
    let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "auto-dismiss",
            "auto-finalize",
            "busy",
            "device",
            "io-status",
            "len",
            "offset",
            "paused",
            "ready",
            "speed",
            "status",
            "type"
        ]
    );
    assert_eq!(j["type"], "stream");
    assert_eq!(j["speed"], 8 * MIB);
    assert_eq!(j["len"], 4 * MIB);
    assert_eq!(j["io-status"], "ok");
    let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "s0");
    let secs = t.elapsed().as_secs_f64();
    assert!(secs > 0.3, "speed limit not honoured: {secs} s");
    assert_eq!(
        done["data"],
        json!({"type": "stream", "device": "s0", "len": 4 * MIB, "offset": 4 * MIB, "speed": 8 * MIB})
    );
    c.wait_status("s0", "null");
    assert_eq!(
        c.statuses("s0"),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    let nodes = c.ok("query-named-block-nodes", json!({}));
    let top = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap();
    assert!(top.get("backing_file").is_none(), "{top}");
    c.quit(vmm);
    chain.judge("top");
    assert_eq!(chain.backing_of("top"), None);

    // To a base, with the backing file name given.
    let chain = Chain::new();
    let (vmm, mut c) = start(&chain);
    c.ok(
        "block-stream",
        json!({"device": "top", "job-id": "s1", "base": chain.path("base"),
               "backing-file": "base.qcow2", "speed": 8 * MIB}),
    );
    // The job outlives the client that started it.
    drop(c);
    let mut c = negotiated(&vmm);
    let end = Instant::now() + Duration::from_secs(30);
    while c.ok("query-jobs", json!({})) != json!([]) {
        assert!(Instant::now() < end, "the stream never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.quit(vmm);
    chain.judge("top");
    assert_eq!(chain.backing_of("top").as_deref(), Some("base.qcow2"));
}

#[test]
fn commit_intermediate_then_active() {
    let chain = Chain::new();
    let (vmm, mut c) = start(&chain);
    assert_eq!(
        c.err("block-commit", json!({"device": "nope"})),
        "Device 'nope' not found"
    );
    assert_eq!(
        c.err(
            "block-commit",
            json!({"device": "top", "top": chain.path("base")})
        ),
        "There is no backimg image"
    );
    c.ok(
        "block-commit",
        json!({"device": "top", "job-id": "c0", "top": chain.path("mid"),
               "backing-file": "base.qcow2", "speed": 64 * MIB}),
    );
    let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "c0");
    assert_eq!(done["data"]["type"], "commit");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.wait_status("c0", "null");
    // top's backing is base now, in the graph and in the image.
    let nodes = c.ok("query-named-block-nodes", json!({}));
    let top = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap();
    assert_eq!(top["image"]["backing-filename"], "base.qcow2", "{top}");

    // Active commit: ready, then complete pivots to base.
    c.ok(
        "block-commit",
        json!({"device": "top", "job-id": "c1", "auto-dismiss": false}),
    );
    let ready = c.wait_job_event("BLOCK_JOB_READY", "c1");
    assert_eq!(ready["data"]["type"], "commit");
    let j = &c.ok("query-block-jobs", json!({}))[0];
    assert_eq!(j["ready"], true);
    assert_eq!(j["status"], "ready");
    assert_eq!(j["auto-dismiss"], false);
    assert_eq!(j["offset"], j["len"]);
    c.ok("block-job-complete", json!({"device": "c1"}));
    c.wait_job_event("BLOCK_JOB_COMPLETED", "c1");
    c.wait_status("c1", "concluded");
    assert_eq!(
        c.err("block-job-complete", json!({"device": "c1"})),
        "Job 'c1' in state 'concluded' cannot accept command verb 'complete'"
    );
    c.ok("job-dismiss", json!({"id": "c1"}));
    c.wait_status("c1", "null");
    assert_eq!(
        c.statuses("c1"),
        [
            "created",
            "running",
            "ready",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    c.quit(vmm);
    chain.judge("base");
}

#[test]
fn pause_resume_verbs_and_cancel_at_random_moments() {
    let chain = Chain::new();
    let (vmm, mut c) = start(&chain);
    c.ok(
        "block-stream",
        json!({"device": "top", "job-id": "p0", "speed": MIB}),
    );
    assert_eq!(
        c.err("block-job-complete", json!({"device": "p0"})),
        "Job 'p0' in state 'running' cannot accept command verb 'complete'"
    );
    assert_eq!(
        c.err("block-job-resume", json!({"device": "p0"})),
        "Can't resume a job that was not paused"
    );
    assert_eq!(c.err("job-pause", json!({"id": "zz"})), "Job not found");
    let e = c
        .cmd("block-job-pause", json!({"device": "zz"}))
        .unwrap_err();
    assert_eq!(e["class"], "DeviceNotActive");
    assert_eq!(
        c.err("block-job-set-speed", json!({"device": "p0", "speed": -1})),
        "Invalid parameter 'speed'"
    );
    c.ok("job-pause", json!({"id": "p0"}));
    c.wait_status("p0", "paused");
    let j = &c.ok("query-jobs", json!({}))[0];
    assert_eq!(j["status"], "paused");
    assert_eq!(j["type"], "stream");
    let off = c.ok("query-block-jobs", json!({}))[0]["offset"].clone();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c.ok("query-block-jobs", json!({}))[0]["offset"], off);
    assert_eq!(
        c.err("block-job-cancel", json!({"device": "p0"})),
        "The block job for device 'p0' is currently paused"
    );
    c.ok("block-job-resume", json!({"device": "p0"}));
    c.wait_status("p0", "running");
    // Progress only grows, and never past the length.
    let mut last = 0;
    for _ in 0..10 {
        let j = c.ok("query-block-jobs", json!({}))[0].clone();
        let (o, l) = (j["offset"].as_u64().unwrap(), j["len"].as_u64().unwrap());
        assert!(o >= last && o <= l, "offset {o} after {last}, len {l}");
        last = o;
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok("block-job-set-speed", json!({"device": "p0", "speed": 0}));
    c.wait_status("p0", "null");
    c.quit(vmm);
    chain.judge("top");

    // Cancel at pseudo-random moments: the image stays valid with the same content, and
    // the backing chain is only cut when the job completed.
    let mut seed = std::process::id() as u64 | 1;
    for round in 0..3 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 150);
        let chain = Chain::new();
        let (vmm, mut c) = start(&chain);
        let id = format!("r{round}");
        c.ok(
            "block-stream",
            json!({"device": "top", "job-id": id, "speed": 16 * MIB}),
        );
        std::thread::sleep(delay);
        let r = c.cmd("block-job-cancel", json!({"device": id}));
        let ended = c.wait_event("end", |e| {
            e["event"] == "BLOCK_JOB_CANCELLED" || e["event"] == "BLOCK_JOB_COMPLETED"
        });
        c.wait_status(&id, "null");
        let cancelled = ended["event"] == "BLOCK_JOB_CANCELLED";
        if cancelled {
            assert!(r.is_ok());
            assert!(c.statuses(&id).contains(&"aborting".to_string()));
        }
        c.quit(vmm);
        chain.judge("top");
        assert_eq!(
            chain.backing_of("top").is_some(),
            cancelled,
            "round {round} after {delay:?}"
        );
    }
}

/// The chain with a blkdebug node under mid's qcow2, failing mid's first data read with
/// `errno`; the nodes are added over QMP.
fn start_with_blkdebug(chain: &Chain, errno: i32) -> (Vmm, Client) {
    let vmm = Vmm::start(&[]);
    let mut c = negotiated(&vmm);
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": {"driver": "file", "filename": chain.path("base")}}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
               "file": {"driver": "blkdebug",
                        "inject-error": [{"event": "read_aio", "errno": errno, "once": true}],
                        "image": {"driver": "file", "filename": chain.path("mid")}}}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
               "file": {"driver": "file", "filename": chain.path("top")}}),
    );
    (vmm, c)
}

#[test]
fn on_error_policies_with_injected_errors() {
    // stop: paused with io-status failed; resume retries the range and completes.
    let chain = Chain::new();
    let (vmm, mut c) = start_with_blkdebug(&chain, 5);
    c.ok(
        "block-stream",
        json!({"device": "top", "job-id": "e0", "on-error": "stop", "base-node": "base"}),
    );
    let err = c.wait_job_event("BLOCK_JOB_ERROR", "e0");
    assert_eq!(
        err["data"],
        json!({"device": "e0", "operation": "read", "action": "stop"})
    );
    c.wait_status("e0", "paused");
    let j = &c.ok("query-block-jobs", json!({}))[0];
    assert_eq!(j["io-status"], "failed");
    assert_eq!(j["paused"], true);
    c.ok("block-job-resume", json!({"device": "e0"}));
    let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "e0");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.wait_status("e0", "null");
    assert_eq!(
        c.statuses("e0"),
        [
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    c.quit(vmm);
    chain.judge("top");

    // report: the job fails with the errno's text; the chain is left as it was.
    for (policy, errno, action) in [
        ("report", 5, "report"),
        ("enospc", 5, "report"),
        ("ignore", 5, "ignore"),
        ("enospc", 28, "stop"),
    ] {
        let chain = Chain::new();
        let (vmm, mut c) = start_with_blkdebug(&chain, errno);
        c.ok(
            "block-stream",
            json!({"device": "top", "job-id": "e1", "on-error": policy, "base-node": "base"}),
        );
        let err = c.wait_job_event("BLOCK_JOB_ERROR", "e1");
        assert_eq!(err["data"]["action"], action, "{policy} {errno}");
        if action == "stop" {
            c.wait_status("e1", "paused");
            assert_eq!(
                c.ok("query-block-jobs", json!({}))[0]["io-status"],
                "nospace"
            );
            c.ok("block-job-cancel", json!({"device": "e1", "force": true}));
            c.wait_job_event("BLOCK_JOB_CANCELLED", "e1");
        } else {
            let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "e1");
            let want = if errno == 5 {
                "Input/output error"
            } else {
                "No space left on device"
            };
            assert_eq!(done["data"]["error"], want, "{policy}: {done}");
            if policy == "ignore" {
                assert_eq!(done["data"]["offset"], 4 * MIB, "ignore goes on to the end");
            }
        }
        c.wait_status("e1", "null");
        c.quit(vmm);
        chain.judge("top");
        assert_eq!(
            chain.backing_of("top").as_deref(),
            Some(chain.path("mid").as_str())
        );
    }
}

/// Streams `top` with auto-finalize off: query-block-jobs while pending, then finalize;
/// returns that reply and the job's events.
fn stream_pending_then_finalize(c: &mut Client) -> (Value, Vec<String>) {
    c.ok(
        "block-stream",
        json!({"device": "top", "job-id": "q0", "auto-finalize": false}),
    );
    c.wait_status("q0", "pending");
    let query = c.ok("query-block-jobs", json!({}));
    c.ok("job-finalize", json!({"id": "q0"}));
    c.wait_status("q0", "null");
    (query, c.job_events("q0"))
}

#[test]
fn events_and_query_shapes_match_qemu_storage_daemon() {
    let ours = Chain::new();
    let (vmm, mut c) = start(&ours);
    let (mine, our_events) = stream_pending_then_finalize(&mut c);
    c.quit(vmm);

    let theirs = Chain::new();
    let qsd = Qsd::start(&["--blockdev", &theirs.top_arg("top")]);
    let mut q = Client::new(qsd.negotiated());
    let (qemu, qemu_events) = stream_pending_then_finalize(&mut q);
    assert_eq!(our_events, qemu_events);
    assert_eq!(mine, qemu, "query-block-jobs while pending");
    // QEMU writes its qcow2 metadata at exit: quit, don't kill.
    let _ = q.cmd("quit", json!({}));
    let mut qsd = qsd;
    let end = Instant::now() + Duration::from_secs(20);
    while qsd.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "qemu-storage-daemon did not quit");
        std::thread::sleep(Duration::from_millis(10));
    }
    theirs.judge("top");
    ours.judge("top");
}

/// What a mirror shows while it runs, and its events: see [`mirror_across_a_transaction`].
struct MirrorSeen {
    events: Vec<String>,
    /// query-named-block-nodes while the job runs: (node name, `#` for generated ones;
    /// driver; file name, the chain's directory as `<dir>`), sorted.
    nodes: Vec<(String, String, String)>,
    /// Errors of commands on the source during the job.
    errors: Vec<Value>,
    /// query-named-block-nodes after the job (the filter gone).
    after: Vec<(String, String, String)>,
}

fn node_list(c: &mut Client, chain: &Chain) -> Vec<(String, String, String)> {
    let dir = chain.dir.path().to_str().unwrap().to_owned();
    let r = c.ok("query-named-block-nodes", json!({}));
    let mut v: Vec<(String, String, String)> = r
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n["node-name"].as_str().unwrap();
            let name = if name.starts_with('#') { "#" } else { name };
            (
                name.to_owned(),
                n["drv"].as_str().unwrap().to_owned(),
                n["file"].as_str().unwrap().replace(&dir, "<dir>"),
            )
        })
        .collect();
    v.sort();
    v
}

/// A slow mirror of `top` to a new node, a `transaction` adding a bitmap to `top` while it
/// runs, then a forced cancel: the nodes during the job (QEMU's implicit `mirror_top`
/// filter above the source), commands refused on the source, the job's events.
fn mirror_across_a_transaction(c: &mut Client, chain: &Chain) -> MirrorSeen {
    let tgt = chain.dir.path().join("tgt.qcow2");
    let tgt = tgt.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", tgt, "4M"]);
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt",
               "file": {"driver": "file", "filename": tgt}}),
    );
    // 256 KiB/s: the 3.5 MiB of data take seconds.
    c.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "top", "target": "tgt", "sync": "full",
               "speed": 262_144}),
    );
    c.wait_status("m0", "running");
    let nodes = node_list(c, chain);
    let mut errors = Vec::new();
    for (cmd, args) in [
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "top", "name": "s1"}),
        ),
        (
            "change-backing-file",
            json!({"device": "top", "image-node-name": "top", "backing-file": "x"}),
        ),
        ("blockdev-del", json!({"node-name": "top"})),
        ("blockdev-del", json!({"node-name": "tgt"})),
        ("block_resize", json!({"node-name": "top", "size": 8 * MIB})),
    ] {
        errors.push(c.cmd(cmd, args).expect_err(cmd));
    }
    std::thread::sleep(Duration::from_millis(300));
    c.ok(
        "transaction",
        json!({"actions": [{"type": "block-dirty-bitmap-add",
                            "data": {"node": "top", "name": "b0"}}]}),
    );
    // The transaction's drain paused the job for its moment.
    c.wait_status("m0", "paused");
    c.wait_status("m0", "running");
    c.ok("block-job-cancel", json!({"device": "m0", "force": true}));
    c.wait_status("m0", "null");
    MirrorSeen {
        events: c.job_events("m0"),
        nodes,
        errors,
        after: node_list(c, chain),
    }
}

#[test]
fn a_transaction_pauses_a_running_job_like_qemu_storage_daemon() {
    let ours = Chain::new();
    let (vmm, mut c) = start(&ours);
    let our = mirror_across_a_transaction(&mut c, &ours);
    c.quit(vmm);

    let theirs = Chain::new();
    let qsd = Qsd::start(&["--blockdev", &theirs.top_arg("top")]);
    let mut q = Client::new(qsd.negotiated());
    let qemu = mirror_across_a_transaction(&mut q, &theirs);
    // The same nodes, with the implicit mirror_top above the source while the job runs.
    assert_eq!(our.nodes, qemu.nodes);
    assert!(
        our.nodes
            .iter()
            .any(|(n, d, _)| n == "#" && d == "mirror_top"),
        "{:?}",
        our.nodes
    );
    assert_eq!(our.after, qemu.after);
    assert_eq!(our.errors, qemu.errors);
    let (our_events, qemu_events) = (our.events, qemu.events);
    // The drained moment, as QEMU has it; the cancel at the end. Between them QEMU may
    // already be ready: its mirror copies its first buffer before the speed limit counts.
    assert_eq!(our_events[..4], qemu_events[..4]);
    assert_eq!(
        our_events[..4],
        [
            "status:created",
            "status:running",
            "status:paused",
            "status:running"
        ]
    );
    let tail = [
        "status:aborting",
        "BLOCK_JOB_CANCELLED",
        "status:concluded",
        "status:null",
    ];
    let tail = tail.map(String::from);
    assert!(our_events.ends_with(&tail), "{our_events:?}");
    assert!(qemu_events.ends_with(&tail), "{qemu_events:?}");
    let _ = q.cmd("quit", json!({}));
    drop(qsd);
}

/// Reads the guest's console (ringbuf `con`) until `text` appears, failing on a mismatch.
fn console_until(c: &mut Client, out: &mut String, text: &str) {
    let end = Instant::now() + Duration::from_secs(120);
    while !out.contains(text) {
        let r = c.ok("ringbuf-read", json!({"device": "con", "size": 65536}));
        out.push_str(r.as_str().unwrap_or_default());
        assert!(
            !out.contains("MISMATCH") && !out.contains("I/O error"),
            "{out}"
        );
        assert!(Instant::now() < end, "{text:?} not in 120 s:\n{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A guest on a 2 MiB disk `top.qcow2` over `base.qcow2` (filled with 0x77), its console on
/// ringbuf `con`, after its first pass.
fn guest_on_chain() -> (tempfile::TempDir, String, String, Vmm, Client, String) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2").to_string_lossy().into_owned();
    let top = dir.path().join("top.qcow2").to_string_lossy().into_owned();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "2M"]);
    qemu_io(&base, &["write -P 0x77 0 2M"]);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &top,
        ],
    );
    let (vmm, mut c) = start_guest(&top);
    let mut out = String::new();
    console_until(&mut c, &mut out, "pass 1 done");
    (dir, base, top, vmm, c, out)
}

/// A guest on the qcow2 disk `top` (node `disk0`, device `vd0`), its console on ringbuf
/// `con`.
fn start_guest(top: &str) -> (Vmm, Client) {
    let vmm = Vmm::start_guest_with_disk(top, "virtio-blk,drive=disk0,id=vd0");
    let c = negotiated(&vmm);
    (vmm, c)
}

/// Stops the guest, quits, and checks that chunks of `img` hold the last passes' patterns.
fn stop_quit_and_check(mut c: Client, vmm: Vmm, mut out: String, img: &str) {
    c.ok("stop", json!({}));
    std::thread::sleep(Duration::from_millis(200));
    let r = c.ok("ringbuf-read", json!({"device": "con", "size": 65536}));
    out.push_str(r.as_str().unwrap_or_default());
    assert!(!out.contains("MISMATCH"), "{out}");
    c.quit(vmm);
    run("qemu-img", &["check", "-q", img]);
    let passes = out.matches(" done, checksum").count() as u64;
    for chunk in [0, 255, 511] {
        assert!(
            chunk_has(img, chunk, chunk + passes) || chunk_has(img, chunk, chunk + passes + 1),
            "chunk {chunk} of {img} holds neither pass {passes} nor {} pattern",
            passes + 1
        );
    }
}

#[test]
fn stream_while_the_guest_writes() {
    if !common::kvm_usable("stream_while_the_guest_writes") {
        return;
    }
    let (_dir, _base, top, vmm, mut c, mut out) = guest_on_chain();
    // Slow enough that the guest writes between the job's ranges.
    c.ok(
        "block-stream",
        json!({"device": "disk0", "job-id": "gs", "speed": 2 * MIB}),
    );
    let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "gs");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.wait_status("gs", "null");
    console_until(&mut c, &mut out, "pass 3 done");
    stop_quit_and_check(c, vmm, out, &top);
    let v: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", &top])).unwrap();
    assert!(v.get("backing-filename").is_none(), "{v}");
}

#[test]
fn intermediate_commit_below_a_writing_guest() {
    if !common::kvm_usable("intermediate_commit_below_a_writing_guest") {
        return;
    }
    // base <- mid <- top, the guest on top; mid holds data of its own.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &base, "2M"]);
    qemu_io(&base, &["write -P 0x77 0 2M"]);
    for (img, below) in [(&mid, &base), (&top, &mid)] {
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", below, img,
            ],
        );
    }
    qemu_io(&mid, &["write -P 0x66 0 1M"]);
    let (vmm, mut c) = start_guest(&top);
    let mut out = String::new();
    console_until(&mut c, &mut out, "pass 1 done");
    // The guest device on top does not share `write`; the job's filter above mid lets
    // the commit write base all the same.
    c.ok(
        "block-commit",
        json!({"device": "disk0", "job-id": "ic", "top": mid}),
    );
    let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "ic");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.wait_status("ic", "null");
    console_until(&mut c, &mut out, "pass 2 done");
    stop_quit_and_check(c, vmm, out, &top);
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", &top])).unwrap();
    assert_eq!(info["backing-filename"], base.as_str());
    run("qemu-img", &["check", "-q", &base]);
}

#[test]
fn active_commit_while_the_guest_writes() {
    if !common::kvm_usable("active_commit_while_the_guest_writes") {
        return;
    }
    let (_dir, base, _top, vmm, mut c, mut out) = guest_on_chain();
    // The guest device does not share `write`: the job's filter makes base writable.
    c.ok("block-commit", json!({"device": "disk0", "job-id": "ac"}));
    c.wait_job_event("BLOCK_JOB_READY", "ac");
    // The guest keeps writing while ready; complete pivots it to base.
    console_until(&mut c, &mut out, "pass 2 done");
    c.ok("block-job-complete", json!({"device": "ac"}));
    let done = c.wait_job_event("BLOCK_JOB_COMPLETED", "ac");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.wait_status("ac", "null");
    let blocks = c.ok("query-block", json!({}));
    let vd0 = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "vd0" || b["device"] == "vd0")
        .unwrap_or_else(|| panic!("{blocks}"))
        .clone();
    assert_eq!(vd0["inserted"]["file"], base.as_str(), "{vd0}");
    // Another whole pass, written and read back on base.
    console_until(&mut c, &mut out, "pass 3 done");
    stop_quit_and_check(c, vmm, out, &base);
}
