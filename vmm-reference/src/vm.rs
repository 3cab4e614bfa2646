//! The VM's state as the monitor sees it, and the QMP handlers of the
//! commands that concern the machine as a whole (version, run state, name,
//! quit).

use chardev_ringbuf::ChardevRegistry;
use qapi_types::{
    cmd, event, Dispatcher, EventInfo, NameInfo, RunState, StatusInfo, VersionInfo, VersionTriple,
};
use qmp_proto::EventMessage;

/// The QEMU version whose QMP interface this VMM follows; clients see it in
/// the greeting and in `query-version`.
pub const QEMU_VERSION: (i64, i64, i64) = (7, 2, 0);

/// What the monitor's handlers act on.
pub struct Vmm {
    /// The VM's name (`--name`).
    pub name: Option<String>,
    /// The run state reported by `query-status`.
    pub run_state: RunState,
    /// Events raised by handlers, sent to every negotiated client by the loop.
    pub events: Vec<EventMessage>,
    /// Set by `quit`: the loop flushes the replies and exits.
    pub quit: bool,
    /// The character devices (`--chardev`, `chardev-add`).
    pub chardevs: ChardevRegistry,
}

impl Vmm {
    /// A VM in the given run state with its character devices.
    pub fn new(name: Option<String>, run_state: RunState, chardevs: ChardevRegistry) -> Self {
        Vmm {
            name,
            run_state,
            events: Vec::new(),
            quit: false,
            chardevs,
        }
    }
}

/// The version triple and package string of the greeting and `query-version`.
pub fn version_info() -> VersionInfo {
    let (major, minor, micro) = QEMU_VERSION;
    VersionInfo {
        qemu: VersionTriple {
            major,
            minor,
            micro,
        },
        package: format!("vmm-reference {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Registers the machine-level commands and the groups the VMM's parts implement.
pub fn register(d: &mut Dispatcher<Vmm>) {
    d.register_char_commands(|vmm| &mut vmm.chardevs);
    d.register::<cmd::QueryVersion>(|_, _| Ok(version_info()));
    d.register::<cmd::QueryStatus>(|vmm, _| {
        Ok(StatusInfo {
            running: vmm.run_state == RunState::Running,
            singlestep: false,
            status: vmm.run_state.clone(),
        })
    });
    d.register::<cmd::QueryEvents>(|_, _| {
        Ok(qapi_types::event::ALL
            .iter()
            .map(|name| EventInfo {
                name: (*name).to_owned(),
            })
            .collect())
    });
    d.register::<cmd::QueryName>(|vmm, _| {
        Ok(NameInfo {
            name: vmm.name.clone(),
        })
    });
    d.register::<cmd::Quit>(|vmm, _| {
        vmm.quit = true;
        // QEMU announces the end of the VM before it exits.
        vmm.events.push(event::Shutdown::message());
        Ok(())
    });
}
