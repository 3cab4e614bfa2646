//! The VM's state as the monitor sees it, and the QMP handlers of the
//! commands that concern the machine as a whole (version, run state, name,
//! quit).

use std::sync::atomic::Ordering;

use block_graph::BlockGraph;
use chardev_ringbuf::ChardevRegistry;
use qapi_types::{
    cmd, event, CpuInfo, CpuInfoBranch, CpuInfoFast, CpuInfoX86, Dispatcher, EventInfo, KvmInfo,
    NameInfo, RunState, StatusInfo, SysEmuTarget, UuidInfo, VersionInfo, VersionTriple,
};
use qmp_proto::{EventMessage, QmpError};

use crate::fds::FdStore;
use crate::machine::Machine;

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
    /// The guest, unless `--no-guest`.
    pub machine: Option<Machine>,
    /// The block layer: nodes, backends and their QMP commands.
    pub block: BlockGraph,
    /// The block jobs (stream, commit, ...): finished on this thread by `Jobs::poll`.
    pub jobs: block_jobs::Jobs,
    /// File descriptors passed by clients (getfd, add-fd).
    pub fds: FdStore,
    /// The VM's UUID (`--uuid`), reported by query-uuid.
    pub uuid: String,
}

impl Vmm {
    /// A VM in the given run state with its character devices.
    pub fn new(name: Option<String>, run_state: RunState, chardevs: ChardevRegistry) -> Self {
        let mut block = BlockGraph::new();
        let jobs = block_jobs::Jobs::for_graph(&block);
        block_jobs::qmp::install_transaction_actions(&mut block, &jobs);
        block_jobs::qmp::install_op_blockers(&mut block, &jobs);
        Vmm {
            name,
            run_state,
            events: Vec::new(),
            quit: false,
            chardevs,
            machine: None,
            block,
            jobs,
            fds: FdStore::default(),
            uuid: "00000000-0000-0000-0000-000000000000".to_owned(),
        }
    }

    /// `stop`: parks every vCPU (returns once they are parked) and sends STOP.
    pub fn stop(&mut self) {
        if let Some(m) = &self.machine {
            if self.run_state == RunState::Running {
                m.pause();
                self.run_state = RunState::Paused;
                self.events.push(event::Stop::message());
            }
        }
    }

    /// `cont`: resets the I/O status of every BlockBackend and block job (as
    /// QEMU's qmp_cont), runs the vCPUs again, sends RESUME, and lets the disks
    /// retry the requests an I/O error stopped the VM on.
    pub fn cont(&mut self) {
        if let Some(m) = &self.machine {
            for be in self.block.backends() {
                be.iostatus_reset();
            }
            self.jobs.iostatus_reset_all();
            if matches!(
                self.run_state,
                RunState::Paused | RunState::Prelaunch | RunState::IoError
            ) {
                m.resume();
                self.run_state = RunState::Running;
                self.events.push(event::Resume::message());
                m.restart_queues();
            }
        }
    }

    /// Acts on a disk's request to stop the VM after an I/O error with the
    /// `stop` policy: a running VM is paused with run state `io-error` and
    /// STOP follows the disk's BLOCK_IO_ERROR. A VM that is not running
    /// stays in its state (QEMU's do_vm_stop). Called by the main loop.
    pub fn handle_io_error_stop(&mut self) {
        let Some(m) = &self.machine else { return };
        if !m.take_io_error_stop() {
            return;
        }
        self.events.extend(self.block.take_events());
        if self.run_state == RunState::Running {
            m.pause();
            self.run_state = RunState::IoError;
            self.events.push(event::Stop::message());
        }
    }

    /// Puts the guest back in its power-on state, keeping the run state, and sends RESET.
    pub fn reset(&mut self) -> Result<(), QmpError> {
        let Some(m) = &self.machine else {
            return Ok(());
        };
        m.reset().map_err(|e| QmpError::generic(e.to_string()))?;
        self.events.push(event::Reset::message());
        // The reset let go of every device: unplugs waiting for their driver complete
        // now, before the guest runs again and drives those devices anew.
        crate::hotplug::complete_unplugs(self);
        if self.run_state == RunState::Running {
            if let Some(m) = &self.machine {
                m.resume();
            }
        }
        Ok(())
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

/// Registers the machine-level commands and the groups the VMM's parts
/// implement; the commands that act on a guest only when there is one.
pub fn register(d: &mut Dispatcher<Vmm>, with_guest: bool) {
    d.register_char_commands(|vmm| &mut vmm.chardevs);
    block_graph::register(d, |vmm| &mut vmm.block);
    block_jobs::qmp::register(d, |vmm| (&vmm.jobs, &mut vmm.block));
    if with_guest {
        register_guest_commands(d);
    }
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
    d.register::<cmd::QueryUuid>(|vmm, _| {
        Ok(UuidInfo {
            uuid: vmm.uuid.clone(),
        })
    });
    // No I/O threads are configured (-object iothread is not supported).
    d.register::<cmd::QueryIothreads>(|_, _| Ok(Vec::new()));
    d.register::<cmd::HumanMonitorCommand>(|vmm, a| crate::hmp::execute(vmm, &a.command_line));
    crate::fds::register(d);
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

/// The commands that act on the guest: run state, reset, vCPUs, KVM.
fn register_guest_commands(d: &mut Dispatcher<Vmm>) {
    crate::hotplug::register(d);
    d.register::<cmd::Stop>(|vmm, _| {
        vmm.stop();
        Ok(())
    });
    d.register::<cmd::Cont>(|vmm, _| {
        vmm.cont();
        Ok(())
    });
    d.register::<cmd::SystemReset>(|vmm, _| vmm.reset());
    d.register::<cmd::SystemPowerdown>(|vmm, _| {
        // The embedded guest has no ACPI; like QEMU with such a guest, the
        // request is announced and the guest may ignore it.
        vmm.events.push(event::Powerdown::message());
        Ok(())
    });
    d.register::<cmd::SystemWakeup>(|_, _| {
        Err(QmpError::generic(
            "wake-up from suspend is not supported by this guest",
        ))
    });
    d.register::<cmd::QueryKvm>(|_, _| {
        Ok(KvmInfo {
            enabled: true,
            present: true,
        })
    });
    d.register::<cmd::InjectNmi>(|vmm, _| {
        if let Some(m) = &vmm.machine {
            m.inject_nmi();
        }
        Ok(())
    });
    d.register::<cmd::Memsave>(|vmm, a| {
        let Some(m) = &vmm.machine else {
            return Ok(());
        };
        let cpu = a.cpu_index.or(a.cpu).unwrap_or(0);
        if cpu < 0 || cpu as usize >= m.vcpu_info().len() {
            return Err(QmpError::generic(
                "Parameter 'cpu-index' expects a CPU number",
            ));
        }
        let file = std::fs::File::create(&a.filename).map_err(|e| {
            QmpError::generic(format!(
                "Could not open '{}': {}",
                a.filename,
                crate::os_error(&e)
            ))
        })?;
        // The page tables are read from parked vCPUs; a running VM is
        // paused for the moment it takes.
        let running = vmm.run_state == RunState::Running;
        m.pause();
        let r = m.save_virtual(cpu as usize, a.val, a.size, file);
        if running {
            m.resume();
        }
        r.map_err(|e| QmpError::generic(e.to_string()))
    });
    d.register::<cmd::Pmemsave>(|vmm, a| {
        let Some(m) = &vmm.machine else {
            return Ok(());
        };
        let file = std::fs::File::create(&a.filename).map_err(|e| {
            QmpError::generic(format!(
                "Could not open '{}': {}",
                a.filename,
                crate::os_error(&e)
            ))
        })?;
        m.save_physical(a.val, a.size, file)
            .map_err(|e| QmpError::generic(e.to_string()))
    });
    d.register::<cmd::QueryCpusFast>(|vmm, _| {
        let Some(m) = &vmm.machine else {
            return Ok(Vec::new());
        };
        Ok(m.vcpu_info()
            .iter()
            .enumerate()
            .map(|(i, info)| CpuInfoFast {
                cpu_index: i as i64,
                qom_path: format!("/machine/unattached/device[{i}]"),
                thread_id: info.thread_id.load(Ordering::Relaxed),
                props: None,
                target: SysEmuTarget::X8664,
            })
            .collect())
    });
    d.register::<cmd::QueryCpus>(|vmm, _| {
        let Some(m) = &vmm.machine else {
            return Ok(Vec::new());
        };
        // Registers are read from parked vCPUs: a running VM is paused for
        // the moment it takes, as QEMU interrupts each vCPU for this query.
        let running = vmm.run_state == RunState::Running;
        m.pause();
        let cpus = m
            .vcpu_info()
            .iter()
            .enumerate()
            .map(|(i, info)| CpuInfo {
                cpu: i as i64,
                current: i == 0,
                halted: false,
                qom_path: format!("/machine/unattached/device[{i}]"),
                thread_id: info.thread_id.load(Ordering::Relaxed),
                arch: CpuInfoBranch::X86(CpuInfoX86 {
                    pc: info.pc.load(Ordering::Relaxed) as i64,
                }),
            })
            .collect();
        if running {
            m.resume();
        }
        Ok(cpus)
    });
}
