//! `human-monitor-command`: a useful subset of QEMU's HMP, answering with
//! the text QEMU prints (lines end in CRLF; an unknown command is a text
//! answer, not an error, as in QEMU).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use qapi_types::RunState;
use qmp_proto::QmpError;

use crate::vm::{version_info, Vmm};

/// The commands this HMP understands, for `help`.
const HELP: &str = "cont -- resume emulation\r\n\
                    help -- show this help\r\n\
                    info chardev -- show the character devices\r\n\
                    info cpus -- show infos for each CPU\r\n\
                    info kvm -- show KVM information\r\n\
                    info name -- show the current VM name\r\n\
                    info status -- show the current VM status (running|paused)\r\n\
                    info version -- show the version of QEMU\r\n\
                    stop -- stop emulation\r\n\
                    system_reset -- reset the system\r\n";

/// Runs one HMP command line and returns its output.
pub fn execute(vmm: &mut Vmm, line: &str) -> Result<String, QmpError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out = String::new();
    let guest = vmm.machine.is_some();
    match words.as_slice() {
        [] => {}
        ["help" | "?"] => out.push_str(HELP),
        ["info", "status"] => {
            let running = vmm.run_state == RunState::Running;
            out.push_str(if running {
                "VM status: running"
            } else {
                "VM status: paused"
            });
            if !running && vmm.run_state != RunState::Paused {
                let _ = write!(out, " ({})", vmm.run_state);
            }
            out.push_str("\r\n");
        }
        ["info", "version"] => {
            let v = version_info();
            let _ = write!(
                out,
                "{}.{}.{}{}\r\n",
                v.qemu.major, v.qemu.minor, v.qemu.micro, v.package
            );
        }
        ["info", "name"] => {
            if let Some(name) = &vmm.name {
                let _ = write!(out, "{name}\r\n");
            }
        }
        ["info", "kvm"] => {
            let _ = write!(
                out,
                "kvm support: {}\r\n",
                if guest { "enabled" } else { "disabled" }
            );
        }
        ["info", "chardev"] => {
            for c in vmm.chardevs.info() {
                let _ = write!(out, "{}: filename={}\r\n", c.label, c.filename);
            }
        }
        ["info", "cpus"] if guest => {
            if let Some(m) = &vmm.machine {
                for (i, cpu) in m.vcpu_info().iter().enumerate() {
                    let mark = if i == 0 { '*' } else { ' ' };
                    let tid = cpu.thread_id.load(Ordering::Relaxed);
                    let _ = write!(out, "{mark} CPU #{i}: thread_id={tid}\r\n");
                }
            }
        }
        ["stop"] if guest => vmm.stop(),
        ["cont" | "c"] if guest => vmm.cont(),
        ["system_reset"] if guest => vmm.reset()?,
        _ => {
            let _ = write!(out, "unknown command: '{}'\r\n", words.join(" "));
        }
    }
    Ok(out)
}
