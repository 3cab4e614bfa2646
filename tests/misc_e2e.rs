//! End to end: file descriptors passed over the QMP socket (SCM_RIGHTS),
//! the HMP subset, query-uuid, query-iothreads, pmemsave, inject-nmi and
//! --pidfile, with replies checked against what QEMU 7.2 answers.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::{kvm_usable, Vmm};
use qmp_proto::client::{Client, ClientError};
use serde_json::{json, Value};

fn err_desc(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Qmp(e)) => e.desc,
        other => panic!("expected a QMP error, got {other:?}"),
    }
}

#[test]
fn file_descriptors_pass_over_the_socket_as_with_qemu() {
    let vmm = Vmm::start(&[]);
    let mut c = Client::connect_unix(&vmm.sock).unwrap();
    let (r, w) = std::io::pipe().unwrap();
    assert_eq!(
        err_desc(c.execute_raw("getfd", json!({"fdname": "a"}))),
        "No file descriptor supplied via SCM_RIGHTS"
    );
    assert_eq!(
        err_desc(c.execute_with_fds("getfd", json!({"fdname": "1a"}), &[r.as_fd()])),
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    assert_eq!(
        c.execute_with_fds("getfd", json!({"fdname": "a"}), &[r.as_fd()])
            .unwrap(),
        json!({})
    );
    assert_eq!(
        c.execute_raw("closefd", json!({"fdname": "a"})).unwrap(),
        json!({})
    );
    assert_eq!(
        err_desc(c.execute_raw("closefd", json!({"fdname": "a"}))),
        "File descriptor named 'a' not found"
    );
    assert_eq!(
        err_desc(c.execute_raw("add-fd", json!({}))),
        "No file descriptor supplied via SCM_RIGHTS"
    );
    let a = c
        .execute_with_fds("add-fd", json!({"opaque": "rdonly"}), &[r.as_fd()])
        .unwrap();
    assert_eq!(a["fdset-id"], 0);
    let fd0 = a["fd"].as_i64().unwrap();
    c.execute_with_fds("add-fd", json!({"fdset-id": 1}), &[w.as_fd()])
        .unwrap();
    c.execute_with_fds("add-fd", json!({"fdset-id": 1}), &[w.as_fd()])
        .unwrap();
    assert_eq!(
        c.execute_with_fds("add-fd", json!({}), &[w.as_fd()])
            .unwrap()["fdset-id"],
        2
    );
    let sets = c.execute_raw("query-fdsets", json!({})).unwrap();
    let ids: Vec<i64> = sets
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["fdset-id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [2, 1, 0],
        "newest set first, as QEMU lists them: {sets}"
    );
    assert_eq!(sets[2]["fds"], json!([{"fd": fd0, "opaque": "rdonly"}]));
    assert_eq!(sets[1]["fds"].as_array().unwrap().len(), 2);
    // The descriptors really are the VMM's: /proc shows them as our pipe.
    let link = std::fs::read_link(format!("/proc/{}/fd/{fd0}", vmm.child.id())).unwrap();
    assert!(link.to_string_lossy().starts_with("pipe:"), "{link:?}");
    assert_eq!(
        err_desc(c.execute_raw("remove-fd", json!({"fdset-id": 7}))),
        "File descriptor named 'fdset-id:7' not found"
    );
    assert_eq!(
        err_desc(c.execute_raw("remove-fd", json!({"fdset-id": 1, "fd": 99}))),
        "File descriptor named 'fdset-id:1, fd:99' not found"
    );
    assert_eq!(
        c.execute_raw("remove-fd", json!({"fdset-id": 0})).unwrap(),
        json!({})
    );
    assert!(
        std::fs::read_link(format!("/proc/{}/fd/{fd0}", vmm.child.id())).is_err(),
        "closed"
    );
    assert_eq!(
        c.execute_raw("query-fdsets", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

fn hmp(c: &mut Client, line: &str) -> String {
    c.execute_raw("human-monitor-command", json!({"command-line": line}))
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn hmp_subset_answers_like_qemu() {
    let vmm = Vmm::start(&[
        "--name",
        "hmp-vm",
        "--chardev",
        "ringbuf,id=rb0",
        "--uuid",
        "12345678-9abc-def0-1234-56789abcdef0",
    ]);
    let mut c = Client::connect_unix(&vmm.sock).unwrap();
    assert_eq!(hmp(&mut c, "info status"), "VM status: running\r\n");
    assert!(hmp(&mut c, "info version").starts_with("7.2.0vmm-reference "));
    assert_eq!(hmp(&mut c, "info name"), "hmp-vm\r\n");
    assert_eq!(hmp(&mut c, "info kvm"), "kvm support: disabled\r\n");
    assert_eq!(hmp(&mut c, "info chardev"), "rb0: filename=ringbuf\r\n");
    assert_eq!(hmp(&mut c, "bogus"), "unknown command: 'bogus'\r\n");
    assert_eq!(
        hmp(&mut c, "info bogus"),
        "unknown command: 'info bogus'\r\n"
    );
    assert_eq!(hmp(&mut c, ""), "");
    // Without a guest there is nothing to stop.
    assert_eq!(hmp(&mut c, "stop"), "unknown command: 'stop'\r\n");
    assert_eq!(
        c.execute_raw("query-uuid", json!({})).unwrap(),
        json!({"UUID": "12345678-9abc-def0-1234-56789abcdef0"})
    );
    assert_eq!(
        c.execute_raw("query-iothreads", json!({})).unwrap(),
        json!([])
    );
}

#[test]
fn guest_hmp_pmemsave_nmi_and_pidfile() {
    if !kvm_usable("guest_hmp_pmemsave_nmi_and_pidfile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("vmm.pid");
    let mut vmm = Vmm::start_with(&["-m", "32M", "-S", "--pidfile", pidfile.to_str().unwrap()]);
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(pid.trim(), vmm.child.id().to_string());
    let mut c = Client::connect_unix(&vmm.sock).unwrap();
    assert_eq!(
        hmp(&mut c, "info status"),
        "VM status: paused (prelaunch)\r\n"
    );
    assert_eq!(hmp(&mut c, "info kvm"), "kvm support: enabled\r\n");
    assert!(hmp(&mut c, "info cpus").starts_with("* CPU #0: thread_id="));
    assert_eq!(hmp(&mut c, "cont"), "");
    c.wait_event("RESUME", Duration::from_secs(10)).unwrap();
    assert_eq!(hmp(&mut c, "info status"), "VM status: running\r\n");
    assert_eq!(hmp(&mut c, "stop"), "");
    c.wait_event("STOP", Duration::from_secs(10)).unwrap();
    assert_eq!(hmp(&mut c, "info status"), "VM status: paused\r\n");

    // pmemsave writes guest physical memory: the guest's program is at 1 MiB.
    let dump = dir.path().join("mem.bin");
    let r = c
        .execute_raw(
            "pmemsave",
            json!({"val": 0x10_0000, "size": 0x2000, "filename": dump.to_str().unwrap()}),
        )
        .unwrap();
    assert_eq!(r, json!({}));
    let mem = std::fs::read(&dump).unwrap();
    assert_eq!(mem.len(), 0x2000);
    let text = String::from_utf8_lossy(&mem);
    assert!(
        text.contains("hello from the embedded guest"),
        "the dump holds the guest image"
    );
    assert_eq!(
        err_desc(c.execute_raw(
            "pmemsave",
            json!({"val": 0, "size": 16, "filename": "/nonexistent/x"})
        )),
        "Could not open '/nonexistent/x': No such file or directory"
    );
    assert!(err_desc(c.execute_raw(
        "pmemsave",
        json!({"val": 0, "size": 1_i64 << 40, "filename": dump.to_str().unwrap()})
    ))
    .contains("outside guest memory"));

    // memsave reads guest-virtual memory through vCPU 0's page tables.
    let vdump = dir.path().join("vmem.bin");
    let r = c
        .execute_raw(
            "memsave",
            json!({"val": 0x10_0000, "size": 0x2000, "filename": vdump.to_str().unwrap()}),
        )
        .unwrap();
    assert_eq!(r, json!({}));
    assert_eq!(
        std::fs::read(&vdump).unwrap(),
        mem,
        "identity-mapped: the same bytes as pmemsave"
    );
    assert_eq!(
        err_desc(c.execute_raw(
            "memsave",
            json!({"val": 0x8000_0000_0000_i64, "size": 16, "filename": vdump.to_str().unwrap()})
        )),
        "Invalid addr 0x0000800000000000/size 16 specified"
    );
    assert_eq!(
        err_desc(c.execute_raw(
            "memsave",
            json!({"val": 0, "size": 16, "filename": vdump.to_str().unwrap(), "cpu-index": 7})
        )),
        "Parameter 'cpu-index' expects a CPU number"
    );

    // The embedded guest has no NMI handler: the NMI triple-faults it and
    // the machine resets, as QEMU does with such a guest.
    c.execute_raw("cont", json!({})).unwrap();
    c.wait_event("RESUME", Duration::from_secs(10)).unwrap();
    assert_eq!(c.execute_raw("inject-nmi", json!({})).unwrap(), json!({}));
    c.wait_event("RESET", Duration::from_secs(30)).unwrap();

    c.execute_raw("quit", json!({})).unwrap();
    assert!(vmm.wait_exit(Duration::from_secs(20)).success());
    assert!(!pidfile.exists(), "the pid file is removed at exit");
}
