//! End to end: throttle groups (`object-add`/`object-del` of `throttle-group`) and the
//! `throttle` filter driver in vmm-reference, with qemu-storage-daemon 7.2 as the judge of
//! the replies (same commands, same answers) and of the data (`qemu-img compare`).

mod common;

use std::process::Command;

use common::{Qsd, Raw, Vmm};
use serde_json::{json, Value};

/// Runs `cmds` on a client and returns each reply with the `error` class and message or
/// `return` (query results are compared separately).
fn run(c: &mut Raw, cmds: &[Value]) -> Vec<Value> {
    cmds.iter()
        .map(|cmd| {
            let r = c.exec(&cmd.to_string());
            match r.get("error") {
                Some(e) => json!({"error": e["desc"]}),
                None => json!({"ok": true}),
            }
        })
        .collect()
}

fn exec(name: &str, args: Value) -> Value {
    json!({"execute": name, "arguments": args})
}

#[test]
fn throttle_groups_and_filter_answer_as_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // One image each: the two processes lock their images.
    let img = dir.path().join("t.qcow2");
    let img2 = dir.path().join("qsd.qcow2");
    for i in [&img, &img2] {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", i.to_str().unwrap(), "4M"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let tg = |id: &str, limits: Value| {
        // QEMU 7.2 takes the properties flat; the seed schema's form wraps them in `props`.
        exec(
            "object-add",
            json!({"qom-type": "throttle-group", "id": id, "limits": limits}),
        )
    };
    let cmds = |img: &std::path::Path| {
        [
            tg("tg0", json!({"iops-total": 1000, "bps-total-max": 5})),
            tg(
                "tg0",
                json!({"iops-total": 1000000, "bps-total": 100000000}),
            ),
            tg("tg0", json!({"iops-total": 1})),
            tg("tg1", json!({"foo": 1})),
            tg("tg1", json!({"iops-total": "x"})),
            tg("tg1", json!({"iops-total": -1})),
            tg("t g", json!({})),
            exec(
                "object-add",
                json!({"qom-type": "throttle-group", "id": "tg2", "x-iops-total": -5}),
            ),
            exec("object-add", json!({"qom-type": "nope", "id": "x"})),
            exec(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "q0",
                   "file": {"driver": "file", "filename": img.to_str().unwrap()}}),
            ),
            exec(
                "blockdev-add",
                json!({"driver": "throttle", "node-name": "t0", "file": "q0"}),
            ),
            exec(
                "blockdev-add",
                json!({"driver": "throttle", "node-name": "t0", "file": "q0",
                   "throttle-group": "zz"}),
            ),
            exec(
                "blockdev-add",
                json!({"driver": "throttle", "node-name": "t0", "file": "q0",
                   "throttle-group": "tg0"}),
            ),
            exec("object-del", json!({"id": "tg0"})),
            exec("object-del", json!({"id": "nope"})),
        ]
    };
    let vmm = Vmm::start(&[]);
    let mut ours = vmm.negotiated();
    let qsd = Qsd::start(&[]);
    let mut theirs = qsd.negotiated();
    let a = run(&mut ours, &cmds(&img));
    let b = run(&mut theirs, &cmds(&img2));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "command {}: {}", i, cmds(&img)[i]);
    }

    // The filter node as query-named-block-nodes shows it.
    let find = |c: &mut Raw| {
        let r = c.exec(r#"{"execute": "query-named-block-nodes"}"#);
        r["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "t0")
            .cloned()
            .unwrap()
    };
    let (n1, n2) = (find(&mut ours), find(&mut theirs));
    for k in ["drv", "ro", "backing_file_depth"] {
        assert_eq!(n1[k], n2[k], "{k}: ours {n1}, qsd {n2}");
    }
    assert_eq!(n1["image"]["virtual-size"], n2["image"]["virtual-size"]);
    assert!(
        n1["file"]
            .as_str()
            .unwrap()
            .contains("\"throttle-group\": \"tg0\""),
        "{n1}"
    );
    // Let qemu-storage-daemon go: the image is ours from here on.
    drop(theirs);
    drop(qsd);

    // The seed schema's form, and the group shared with block_set_io_throttle's `group`.
    let r = ours.exec(
        &exec(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "slow",
                   "props": {"limits": {"bps-total": 1000000}}}),
        )
        .to_string(),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = ours.exec(
        &exec(
            "blockdev-add",
            json!({"options": {"driver": "throttle", "node-name": "t1", "file": "t0",
                               "throttle-group": "slow"}}),
        )
        .to_string(),
    );
    assert_eq!(r, json!({"return": {}}), "the seed's options form");
    let r = ours.exec(&exec("blockdev-del", json!({"node-name": "t1"})).to_string());
    assert_eq!(r, json!({"return": {}}));
    let r = ours.exec(&exec("object-del", json!({"id": "slow"})).to_string());
    assert_eq!(r, json!({"return": {}}));
    let r = ours.exec(&exec("object-del", json!({"id": "slow"})).to_string());
    assert_eq!(r["error"]["desc"], "object 'slow' not found");

    // Deleting in order: the node, then its group.
    let r = ours.exec(&exec("object-del", json!({"id": "tg0"})).to_string());
    assert_eq!(
        r["error"]["desc"],
        "object 'tg0' is in use, can not be deleted"
    );
    let r = ours.exec(&exec("blockdev-del", json!({"node-name": "t0"})).to_string());
    assert_eq!(r, json!({"return": {}}));
    let r = ours.exec(&exec("object-del", json!({"id": "tg0"})).to_string());
    assert_eq!(r, json!({"return": {}}));
    let r = ours.exec(&exec("blockdev-del", json!({"node-name": "q0"})).to_string());
    assert_eq!(r, json!({"return": {}}));
    drop(ours);
    drop(vmm);
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
