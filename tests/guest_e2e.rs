//! End to end with KVM: the embedded guest boots, writes to COM1 (a ringbuf
//! chardev read over QMP), and obeys stop, cont, system_reset, -S and quit.
//! Every test skips, saying so, when /dev/kvm is not available.

mod common;

use std::time::{Duration, Instant};

use common::{kvm_usable, Raw, Vmm};
use serde_json::{json, Value};

const GREETING: &str = "vmm-reference guest: hello from the embedded guest";

fn guest(extra: &[&str]) -> Vmm {
    let mut args = vec![
        "-m",
        "32M",
        "--chardev",
        "ringbuf,id=con,size=65536",
        "--serial",
        "chardev:con",
    ];
    args.extend(extra);
    Vmm::start_with(&args)
}

fn read_console(c: &mut Raw) -> String {
    let r = c.exec(r#"{"execute": "ringbuf-read", "arguments": {"device": "con", "size": 65536}}"#);
    r["return"]
        .as_str()
        .unwrap_or_else(|| panic!("ringbuf-read: {r}"))
        .to_owned()
}

/// Reads the console until `pred` holds for everything read so far.
fn console_until(c: &mut Raw, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    let mut all = String::new();
    loop {
        all.push_str(&read_console(c));
        if pred(&all) {
            return all;
        }
        assert!(
            start.elapsed() < timeout,
            "console never matched; it shows:\n{all}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ticks(text: &str) -> usize {
    text.matches("tick ").count()
}

/// Reads messages until one is the event `name` (replies in between are not expected).
fn expect_event(c: &mut Raw, name: &str) -> Value {
    let e = c.recv();
    assert_eq!(e["event"], name, "{e}");
    e
}

#[test]
fn guest_boots_and_stop_parks_every_vcpu_until_cont() {
    if !kvm_usable("guest_boots_and_stop_parks_every_vcpu_until_cont") {
        return;
    }
    let mut vmm = guest(&["--smp", "2"]);
    let mut c = vmm.negotiated();
    let out = console_until(&mut c, Duration::from_secs(60), |s| {
        s.contains(GREETING) && ticks(s) >= 2
    });
    assert!(out.starts_with(GREETING), "{out}");
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );

    assert_eq!(
        c.exec(r#"{"execute": "stop"}"#),
        json!({"return": {}}).clone().tap_event(&mut c, "STOP")
    );
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"],
        json!({"running": false, "singlestep": false, "status": "paused"})
    );
    // Parked: whatever was written before the stop is drained, then nothing comes.
    read_console(&mut c);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(read_console(&mut c), "", "the guest wrote while stopped");
    // query-cpus reads the registers of the parked vCPUs: vCPU 0 runs the guest's code.
    let cpus = c.exec(r#"{"execute": "query-cpus"}"#)["return"].clone();
    let pc = cpus[0]["pc"].as_i64().unwrap();
    assert!(
        (0x10_0000..0x10_2000).contains(&pc),
        "pc {pc:#x} outside the guest"
    );
    assert_eq!(cpus[0]["arch"], "x86");
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "paused"
    );

    assert_eq!(
        c.exec(r#"{"execute": "cont"}"#),
        json!({"return": {}}).clone().tap_event(&mut c, "RESUME")
    );
    console_until(&mut c, Duration::from_secs(60), |s| ticks(s) >= 2);

    let fast = c.exec(r#"{"execute": "query-cpus-fast"}"#)["return"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(fast.len(), 2);
    for (i, cpu) in fast.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], i);
        assert_eq!(cpu["target"], "x86_64");
        let tid = cpu["thread-id"].as_i64().unwrap();
        let task = format!("/proc/{}/task/{tid}", vmm.child.id());
        assert!(
            std::path::Path::new(&task).exists(),
            "{task}: not a thread of the VMM"
        );
    }
    assert_eq!(
        c.exec(r#"{"execute": "query-kvm"}"#)["return"],
        json!({"enabled": true, "present": true})
    );

    assert_eq!(c.exec(r#"{"execute": "quit"}"#), json!({"return": {}}));
    expect_event(&mut c, "SHUTDOWN");
    assert!(vmm.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn start_paused_then_cont_and_reset() {
    if !kvm_usable("start_paused_then_cont_and_reset") {
        return;
    }
    let vmm = guest(&["-S"]);
    let mut c = vmm.negotiated();
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "prelaunch"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read_console(&mut c), "", "the guest ran before cont");
    c.exec(r#"{"execute": "cont"}"#);
    expect_event(&mut c, "RESUME");
    console_until(&mut c, Duration::from_secs(60), |s| {
        s.contains(GREETING) && ticks(s) >= 1
    });

    // system_reset brings the guest back to its start: it greets again and counts from 1.
    assert_eq!(
        c.exec(r#"{"execute": "system_reset"}"#),
        json!({"return": {}})
    );
    expect_event(&mut c, "RESET");
    let after = console_until(&mut c, Duration::from_secs(60), |s| {
        s.contains(GREETING) && s.contains("tick 1\n")
    });
    assert!(after.contains(GREETING), "{after}");
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );

    let wake = c.exec(r#"{"execute": "system_wakeup"}"#);
    assert_eq!(wake["error"]["class"], "GenericError");
    assert_eq!(
        c.exec(r#"{"execute": "system_powerdown"}"#),
        json!({"return": {}})
    );
    expect_event(&mut c, "POWERDOWN");
}

#[test]
fn stop_and_cont_are_idempotent_and_no_guest_has_no_run_state_commands() {
    if !kvm_usable("stop_and_cont_are_idempotent_and_no_guest_has_no_run_state_commands") {
        return;
    }
    let vmm = guest(&[]);
    let mut c = vmm.negotiated();
    c.exec(r#"{"execute": "stop"}"#);
    expect_event(&mut c, "STOP");
    // A second stop changes nothing and sends no event; query-status answers at once.
    assert_eq!(c.exec(r#"{"execute": "stop"}"#), json!({"return": {}}));
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "paused"
    );
    c.exec(r#"{"execute": "cont"}"#);
    expect_event(&mut c, "RESUME");
    assert_eq!(c.exec(r#"{"execute": "cont"}"#), json!({"return": {}}));
    assert_eq!(
        c.exec(r#"{"execute": "query-status"}"#)["return"]["status"],
        "running"
    );

    let storage = Vmm::start(&[]);
    let mut s = storage.negotiated();
    for cmd in [
        "stop",
        "cont",
        "system_reset",
        "query-cpus-fast",
        "query-kvm",
    ] {
        let r = s.exec(&json!({"execute": cmd}).to_string());
        assert_eq!(
            r["error"]["class"], "CommandNotFound",
            "{cmd} without a guest: {r}"
        );
    }
}

/// Checks a reply and then the event that follows it.
trait TapEvent {
    fn tap_event(self, c: &mut Raw, name: &str) -> Value;
}

impl TapEvent for Value {
    fn tap_event(self, c: &mut Raw, name: &str) -> Value {
        expect_event(c, name);
        self
    }
}
