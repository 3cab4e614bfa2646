//! Schema-driven QMP fuzzing of `vmm-reference --no-guest`: every registered command
//! (read from `query-qmp-schema`, as a client would) is sent thousands of times with
//! arguments built from its declared types, mostly well-typed values picked to hurt
//! (existing and unknown node names, zero, negative and huge sizes, empty and long
//! strings), and some with members of the wrong type, unknown members or no arguments.
//!
//! Every command must get exactly one reply in QEMU's shape (`return`, or `error` with a
//! known class and a description), the server must stay up and answer queries afterwards,
//! exit with status 0 on `quit`, and never panic. The VMM runs with a 4 GiB address-space
//! limit, so an allocation sized by an argument (a dirty bitmap for an exabyte node, a
//! buffer for a huge read) aborts the process and fails the test instead of going unseen.
//!
//! `QMP_FUZZ_SEED` and `QMP_FUZZ_COUNT` run other or longer sequences; `QMP_FUZZ_TRACE`
//! prints every command and its reply.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_for_path, Raw, VMM};
use serde_json::{json, Map, Value};

/// A small deterministic generator (xorshift64*), so that a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Names that exist in the fuzzed VMM, or that commands create (so that commands get past
/// their lookups), picked most of the time.
const LIVE: &[&str] = &[
    "disk0", "file0", "null0", "rb0", "tg0", "bm0", "job0", "vd0", "snap0",
];

/// Other strings. No `/` or `:`: strings used as file names stay in the VMM's private
/// working directory, and none can name a migration or dump protocol.
const OTHER: &[&str] = &[
    "new0",
    "",
    "x",
    "nonexistent",
    "#block001",
    "disk0.qcow2",
    "backing",
    "file",
    "..",
    "ü",
    "qcow2",
    "raw",
    "null-co",
    "throttle",
    "ringbuf",
    "virtio-blk",
    "full",
    "top",
    "none",
];

const INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    511,
    512,
    4096,
    65536,
    1 << 20,
    64 << 20,
    1 << 31,
    1 << 32,
    1 << 53,
    i64::MAX,
    i64::MIN,
];

/// The introspected schema, by type name.
struct Schema {
    types: HashMap<String, Value>,
}

impl Schema {
    /// A value of type `ty` for the member `member` (its name steers string picks).
    fn gen(&self, rng: &mut Rng, ty: &str, member: &str, depth: u32) -> Value {
        if rng.chance(3) {
            return wrong_type(rng);
        }
        if let Some(elem) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            return self.gen_array(rng, elem, depth);
        }
        let Some(t) = self.types.get(ty) else {
            return wrong_type(rng);
        };
        match t["meta-type"].as_str().unwrap_or("") {
            "builtin" => gen_builtin(rng, t["json-type"].as_str().unwrap_or(""), member),
            "enum" => {
                let values = t["values"].as_array().cloned().unwrap_or_default();
                if values.is_empty() || rng.chance(5) {
                    json!("no-such-value")
                } else {
                    rng.pick(&values).clone()
                }
            }
            "array" => self.gen_array(rng, t["element-type"].as_str().unwrap_or(""), depth),
            "alternate" => {
                let members = t["members"].as_array().cloned().unwrap_or_default();
                if members.is_empty() {
                    return wrong_type(rng);
                }
                let m = rng.pick(&members).clone();
                self.gen(rng, m["type"].as_str().unwrap_or(""), member, depth)
            }
            "object" => self.gen_object(rng, t, depth),
            _ => Value::Null,
        }
    }

    fn gen_array(&self, rng: &mut Rng, elem: &str, depth: u32) -> Value {
        if depth > 4 {
            return json!([]);
        }
        let n = rng.below(4);
        Value::Array((0..n).map(|_| self.gen(rng, elem, "", depth + 1)).collect())
    }

    fn gen_object(&self, rng: &mut Rng, t: &Value, depth: u32) -> Value {
        let mut obj = Map::new();
        if depth > 4 {
            return Value::Object(obj);
        }
        let members = t["members"].as_array().cloned().unwrap_or_default();
        // A union's variant members depend on its tag: take them from one variant.
        let variant = t["variants"]
            .as_array()
            .filter(|v| !v.is_empty())
            .map(|v| rng.pick(v).clone());
        for m in &members {
            let name = m["name"].as_str().unwrap_or("");
            let optional = m.get("default").is_some();
            if optional && !rng.chance(35) || !optional && rng.chance(3) {
                continue;
            }
            let mut v = self.gen(rng, m["type"].as_str().unwrap_or(""), name, depth + 1);
            if let (Some(tag), Some(var)) = (t["tag"].as_str(), &variant) {
                if tag == name && !rng.chance(5) {
                    v = var["case"].clone();
                }
            }
            obj.insert(name.to_string(), v);
        }
        if let Some(var) = &variant {
            if let Some(Value::Object(extra)) = self
                .types
                .get(var["type"].as_str().unwrap_or(""))
                .map(|vt| self.gen_object(rng, vt, depth + 1))
            {
                obj.extend(extra);
            }
        }
        if rng.chance(3) {
            obj.insert("no-such-member".into(), json!(1));
        }
        Value::Object(obj)
    }
}

/// The live names a member called `member` most likely wants.
fn names_for(member: &str) -> &'static [&'static str] {
    if member.contains("node") || member == "base" || member == "top" || member == "file" {
        &["disk0", "file0", "null0", "snap0"]
    } else if member.contains("job") {
        &["job0"]
    } else if member == "name" || member.contains("bitmap") || member == "target" {
        &["bm0", "disk0", "snap0"]
    } else if member == "device" || member == "drive" || member == "id" {
        &["vd0", "disk0", "rb0", "tg0", "job0"]
    } else {
        LIVE
    }
}

fn gen_builtin(rng: &mut Rng, json_type: &str, member: &str) -> Value {
    match json_type {
        "string" => {
            if rng.chance(3) {
                json!("a".repeat(5000))
            } else if rng.chance(65) {
                json!(rng.pick(names_for(member)))
            } else {
                json!(rng.pick(OTHER))
            }
        }
        "int" => {
            if rng.chance(5) {
                json!(u64::MAX)
            } else {
                json!(rng.pick(INTS))
            }
        }
        "number" => json!(*rng.pick(&[0.0, -1.5, 1e300, 0.5])),
        "boolean" => json!(rng.chance(50)),
        "null" => Value::Null,
        _ => wrong_type(rng),
    }
}

fn wrong_type(rng: &mut Rng) -> Value {
    rng.pick(&[
        json!(null),
        json!(true),
        json!(-7),
        json!(1.25),
        json!("str"),
        json!([1, "a"]),
        json!({"k": {}}),
    ])
    .clone()
}

/// Commands that end the run or could (HMP could be told `quit`, a powered-down guest
/// exits); the other tests exercise them.
const ENDS_RUN: &[&str] = &["quit", "human-monitor-command", "system_powerdown"];

/// The error classes QEMU's monitor uses.
const CLASSES: &[&str] = &[
    "GenericError",
    "CommandNotFound",
    "DeviceNotActive",
    "DeviceNotFound",
    "KVMMissingCap",
];

/// Reads messages until the reply with `id`, skipping events; checks the reply's shape.
fn reply(raw: &mut Raw, id: u64, sent: &str) -> Value {
    loop {
        let msg = raw.recv();
        if msg.get("event").is_some() {
            continue;
        }
        assert_eq!(msg["id"], json!(id), "reply out of order for {sent}: {msg}");
        let obj = msg.as_object().expect("reply is an object");
        match (obj.get("return"), obj.get("error")) {
            (Some(_), None) => {}
            (None, Some(e)) => {
                let class = e["class"].as_str().unwrap_or("");
                assert!(
                    CLASSES.contains(&class),
                    "unknown error class for {sent}: {msg}"
                );
                let desc = e["desc"].as_str().unwrap_or("");
                assert!(
                    !desc.is_empty(),
                    "error without description for {sent}: {msg}"
                );
            }
            _ => panic!("reply with neither or both of return/error for {sent}: {msg}"),
        }
        return msg;
    }
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("qemu-img (package qemu-utils) must be installed");
    assert!(st.success(), "qemu-img {args:?}");
}

#[test]
fn schema_driven_commands_never_break_the_storage_daemon() {
    fuzz("--no-guest", 0x5eed_0fc0_ffee);
}

#[test]
fn schema_driven_commands_never_break_a_running_guest() {
    // The machine commands (stop, cont, system_reset, device_add/del, query-pci, ...)
    // exist only with a guest, and the disk is then a guest device's backend.
    if !common::kvm_usable("schema_driven_commands_never_break_a_running_guest") {
        return;
    }
    fuzz(
        "-m 32M --device virtio-blk,drive=disk0,id=vd0 --serial chardev:rb0",
        0xdead_beef_f00d,
    );
}

/// Runs the fuzzer on a VMM started with `machine` arguments (plus a qcow2 disk `disk0`
/// over `file0`, a null node `null0` and a ring buffer `rb0`; a throttle group `tg0`, a
/// bitmap `bm0`, a node `snap0` and a mirror job `job0` are added over QMP first).
fn fuzz(machine: &str, default_seed: u64) {
    let seed: u64 = std::env::var("QMP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed);
    let count: u64 = std::env::var("QMP_FUZZ_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    let img = d.join("disk0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let sock = d.join("qmp.sock");
    let stderr = std::fs::File::create(d.join("stderr.log")).expect("stderr file");
    // A 4 GiB address-space limit turns an allocation sized by an argument into an abort.
    let script = format!(
        "ulimit -v 4194304 && exec \"$0\" --qmp unix:{} \
         --blockdev driver=qcow2,node-name=disk0,file.driver=file,file.node-name=file0,file.filename={} \
         --blockdev driver=null-co,node-name=null0,size=1048576 \
         --chardev ringbuf,id=rb0,size=4096 {machine}",
        sock.display(),
        img.display()
    );
    let mut child = KillOnDrop(
        Command::new("sh")
            .args(["-c", &script, VMM])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start vmm-reference"),
    );
    wait_for_path(&sock);
    let mut raw = Raw::connect(&sock);
    raw.recv();
    assert_eq!(
        raw.exec(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    // Live objects under the names the generator picks most, so that commands get past
    // their lookups: a throttle group, a bitmap, a spare node and a mirror job that stays
    // running (1 byte/s) for the job verbs to act on.
    for (i, (cmd, args)) in [
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg0", "limits": {}}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "bm0"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "snap0", "size": 1048576}),
        ),
        (
            "blockdev-mirror",
            json!({"job-id": "job0", "device": "null0", "target": "snap0",
                   "sync": "full", "speed": 1}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = 1_000_000 + i as u64;
        let text = json!({"execute": cmd, "arguments": args, "id": id}).to_string();
        raw.send(&format!("{text}\n"));
        let r = reply(&mut raw, id, &text);
        assert!(r.get("return").is_some(), "setup {text}: {r}");
    }
    raw.send("{\"execute\": \"query-qmp-schema\", \"id\": 0}\n");
    let entries = reply(&mut raw, 0, "query-qmp-schema")["return"]
        .as_array()
        .cloned()
        .expect("schema list");
    let schema = Schema {
        types: entries
            .iter()
            .filter(|e| e["meta-type"] != "command" && e["meta-type"] != "event")
            .map(|e| (e["name"].as_str().unwrap_or("").to_string(), e.clone()))
            .collect(),
    };
    let commands: Vec<(String, String)> = entries
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_string(),
                e["arg-type"].as_str().unwrap_or("").to_string(),
            )
        })
        .filter(|(n, _)| !ENDS_RUN.contains(&n.as_str()))
        .collect();
    assert!(
        commands.len() > 40,
        "schema lists {} commands",
        commands.len()
    );

    let mut rng = Rng(seed.wrapping_mul(2).wrapping_add(1));
    let mut errors = 0u64;
    for id in 1..=count {
        let (name, arg_type) = rng.pick(&commands).clone();
        let mut cmd = Map::new();
        cmd.insert("execute".into(), json!(name));
        cmd.insert("id".into(), json!(id));
        if !rng.chance(5) {
            let args = schema.gen(&mut rng, &arg_type, "", 0);
            if args.as_object().is_none_or(|o| !o.is_empty()) {
                cmd.insert("arguments".into(), args);
            }
        }
        let text = Value::Object(cmd).to_string();
        let trace = std::env::var_os("QMP_FUZZ_TRACE").is_some();
        if trace {
            eprintln!("{text}");
        }
        raw.send(&format!("{text}\n"));
        let r = reply(&mut raw, id, &text);
        if trace {
            eprintln!("  -> {r}");
        }
        if r.get("error").is_some() {
            errors += 1;
        }
    }
    // Some commands must have succeeded, or the arguments never got past the decoder.
    assert!(
        errors < count,
        "every one of {count} commands failed (seed {seed})"
    );
    eprintln!("qmp fuzz: {count} commands (seed {seed}), {errors} errors");

    for q in [
        "query-status",
        "query-block",
        "query-named-block-nodes",
        "query-jobs",
    ] {
        let text = format!("{{\"execute\": \"{q}\", \"id\": \"end\"}}");
        raw.send(&format!("{text}\n"));
        let msg = loop {
            let m = raw.recv();
            if m.get("event").is_none() {
                break m;
            }
        };
        assert!(msg.get("return").is_some(), "{q} after fuzzing: {msg}");
    }
    raw.send("{\"execute\": \"quit\"}\n");
    let status = wait(&mut child.0, Duration::from_secs(60));
    let log = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
    assert!(
        !log.contains("panicked") && !log.contains("memory allocation"),
        "vmm-reference stderr (seed {seed}):\n{log}"
    );
    assert!(
        status.success(),
        "exit status {status} (seed {seed}):\n{log}"
    );
}

/// The VMM under test, killed when the test ends in any way (a failed assertion included),
/// so that a failing run leaves no process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("vmm-reference did not exit within {timeout:?} after quit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
