//! Helpers of the ENOSPC end-to-end tests (`jobs_enospc_e2e.rs`,
//! `jobs_enospc_stream_commit_e2e.rs`): a small tmpfs filled to a given free space, the
//! two daemons (ours and qemu-storage-daemon) behind one client, image checks. Included by
//! those two files only (`#[path]`): its `JobClient` helpers would clash with other tests'.

// Each of the two test binaries uses a part of these helpers.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use crate::common::run;
use crate::common::{Qsd, Vmm};

pub const MIB: u64 = 1 << 20;
/// The tmpfs's size and what its filler leaves free: less than a 4 MiB source needs.
pub const TMPFS_MIB: u64 = 6;
pub const FREE_KIB: u64 = 1536;

/// `qemu-img compare` of two images (formats probed), true when identical.
pub fn identical(a: &str, b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-U", a, b])
        .status()
        .expect("qemu-img")
        .success()
}

/// `qemu-img check` of an image a job wrote while the filesystem was full: no corruption
/// and no check error. Leaked clusters are allowed (QEMU 7.2 leaks them too when a data
/// write fails with ENOSPC after its cluster was allocated: they waste space, nothing
/// more, and `qemu-img check -r leaks` reclaims them); returns how many.
pub fn check(img: &str) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json", img])
        .output()
        .expect("qemu-img");
    // 0: clean, 3: leaks only; 2 (corruption) and 1 (check failed) are errors.
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {img}: {code:?} {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    assert_eq!(
        v.get("corruptions").map_or(0, |c| c.as_u64().unwrap()),
        0,
        "{v}"
    );
    assert_eq!(
        v.get("check-errors").map_or(0, |c| c.as_u64().unwrap()),
        0,
        "{v}"
    );
    v.get("leaks").map_or(0, |c| c.as_u64().unwrap())
}

/// A size-limited tmpfs mounted on a private directory, unmounted on drop (even when the
/// test panics).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it, or says why the test is skipped.
    pub fn mount(test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}M"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "{test}: skipped: cannot mount a tmpfs ({})",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                );
                None
            }
            Err(e) => {
                eprintln!("{test}: skipped: cannot mount a tmpfs ({e})");
                None
            }
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Fills the filesystem but for `FREE_KIB` (what is there stays).
    pub fn fill(&self) {
        let st = free_bytes(self.dir.path());
        let want_free = FREE_KIB * 1024;
        assert!(st > want_free, "the tmpfs has only {st} bytes free");
        std::fs::write(self.path("filler"), vec![0xffu8; (st - want_free) as usize])
            .expect("filler");
    }

    /// Frees the space again.
    pub fn free(&self) {
        std::fs::remove_file(self.path("filler")).expect("remove the filler");
    }

    /// Removes everything but the filler.
    pub fn clear(&self) {
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "filler" {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Something still holds a file open (a daemon being killed): detach it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Free bytes of the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> u64 {
    let out = run("stat", &["-f", "-c", "%a %S", path.to_str().unwrap()]);
    let mut it = out.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

/// The shared job client, with this file's helpers.
pub type Client = crate::common::JobClient;

impl Client {
    /// The data of the next block job event `name` of job `id`.
    pub fn job_data(&mut self, name: &str, id: &str) -> Value {
        self.wait_job_event(name, id)["data"].clone()
    }

    /// The job events of `id` as short strings, consecutive duplicates folded.
    pub fn job_events(&self, id: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in &self.log {
            let d = &e["data"];
            if d["id"] != id && d["device"] != id {
                continue;
            }
            let s = match e["event"].as_str().unwrap() {
                "JOB_STATUS_CHANGE" => format!("status:{}", d["status"].as_str().unwrap()),
                "BLOCK_JOB_ERROR" => format!(
                    "ERROR:{}:{}",
                    d["operation"].as_str().unwrap(),
                    d["action"].as_str().unwrap()
                ),
                "BLOCK_JOB_COMPLETED" => match d["error"].as_str() {
                    Some(err) => format!("COMPLETED:{err}"),
                    None => "COMPLETED".to_string(),
                },
                n => n.to_string(),
            };
            if out.last() != Some(&s) {
                out.push(s);
            }
        }
        out
    }

    pub fn jobs(&mut self) -> Vec<Value> {
        self.ok("query-block-jobs", json!({}))
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits until query-block-jobs shows job `id` paused by its error (the pause takes
    /// effect once the requests in flight are done); returns that entry.
    pub fn wait_paused(&mut self, id: &str) -> Value {
        self.wait_status(id, "paused");
        let j = self
            .jobs()
            .into_iter()
            .find(|j| j["device"] == id)
            .unwrap_or_else(|| panic!("no job {id}"));
        assert_eq!(j["status"], "paused", "{j}");
        assert_eq!(j["paused"], true, "{j}");
        assert_eq!(j["io-status"], "nospace", "{j}");
        j
    }

    /// Bitmap `name` as query-named-block-nodes reports it.
    pub fn bitmap(&mut self, name: &str) -> Value {
        let blocks = self.ok("query-named-block-nodes", json!({}));
        blocks
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no bitmap {name}: {blocks}"))
    }

    /// The dirty count of bitmap `name`.
    pub fn bitmap_count(&mut self, name: &str) -> u64 {
        self.bitmap(name)["count"].as_u64().unwrap()
    }
}

/// The daemon a scenario runs on.
pub enum Daemon {
    Ours(Vmm),
    Qemu(Qsd),
}

impl Daemon {
    pub fn start(qemu: bool, blockdev: &Value) -> (Daemon, Client) {
        let arg = blockdev.to_string();
        let (d, raw) = if qemu {
            let q = Qsd::start(&["--blockdev", &arg]);
            let raw = q.negotiated();
            (Daemon::Qemu(q), raw)
        } else {
            let v = Vmm::start(&["--blockdev", &arg]);
            // The socket appears at bind(), a moment before listen().
            let end = Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(&v.sock).is_err() {
                assert!(Instant::now() < end, "the monitor never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
            let raw = v.negotiated();
            (Daemon::Ours(v), raw)
        };
        (d, Client::new(raw))
    }

    /// Quits (QEMU writes its qcow2 metadata at exit) and waits for the exit.
    pub fn quit(self, mut c: Client) {
        let _ = c.cmd("quit", json!({}));
        let child = match self {
            Daemon::Ours(mut v) => {
                v.wait_exit(Duration::from_secs(20));
                return;
            }
            Daemon::Qemu(q) => q,
        };
        let mut q = child;
        let end = Instant::now() + Duration::from_secs(20);
        while q.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "qemu-storage-daemon did not quit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn name(qemu: bool) -> &'static str {
    if qemu {
        "qemu-storage-daemon"
    } else {
        "vmm-reference"
    }
}

pub fn file_node(driver: &str, node: &str, file: &str) -> Value {
    json!({"driver": driver, "node-name": node,
           "file": {"driver": "file", "filename": file}})
}

/// A 4 MiB raw source full of data (two patterns), in a private directory.
pub fn raw_source() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw").to_str().unwrap().to_string();
    run("qemu-img", &["create", "-q", "-f", "raw", &src, "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 2M",
            "-c",
            "write -P 0xa5 2M 2M",
            &src,
        ],
    );
    (dir, src)
}
