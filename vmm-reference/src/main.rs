//! `vmm-reference`: a small KVM VMM with QEMU's QMP interface.
//!
//! With `--no-guest` it serves the monitors alone, like qemu-storage-daemon.

mod cli;
mod devices;
mod fds;
mod hmp;
mod hotplug;
mod machine;
mod monitor;
mod vm;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use std::sync::Arc;

use crate::cli::{Cli, SerialSpec};
use crate::machine::bus::InputReady;
use crate::machine::linux::LinuxBoot;
use crate::machine::{BootSource, Machine, MachineConfig};
use crate::monitor::Monitors;
use crate::vm::Vmm;

const SIGNAL_TOKEN: Token = Token(0);
/// Wakes the loop for the machine's requests (reset, shutdown).
const MACHINE_TOKEN: Token = Token((1 << 20) - 1);
/// Tokens of the character devices.
const CHARDEV_TOKENS: std::ops::Range<usize> = 1..NOTIFIER_TOKENS;
/// First token of the virtqueue notifiers (one per queue with an ioeventfd).
const NOTIFIER_TOKENS: usize = 1 << 19;
/// First token of the QMP monitors (listeners and clients follow).
const MONITOR_TOKENS: Token = Token(1 << 20);

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    let cli = match Cli::parse_from_qemu_style(std::env::args()) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One clear line, not clap's page of usage.
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            eprintln!("vmm-reference: {first} (try --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-reference: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    // First, as QEMU does: whoever waits for the monitor socket can rely on
    // the pid file being there.
    let _pidfile = match &cli.pidfile {
        Some(path) => Some(PidFile::create(path)?),
        None => None,
    };
    if cli.no_guest && !cli.device.is_empty() {
        return Err("--device needs a guest: it can't be combined with --no-guest".into());
    }
    if cli.qmp.is_empty() {
        log::warn!("no --qmp monitor given: nothing can talk to this process");
    }
    let mut poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("cannot watch signals: {e}"))?;
    poll.registry()
        .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    let mut monitors = Monitors::new(&cli.qmp, MONITOR_TOKENS, !cli.no_guest)
        .map_err(|e| format!("cannot open a monitor: {e}"))?;
    monitors
        .register(poll.registry())
        .map_err(|e| format!("cannot watch the monitors: {e}"))?;
    let mut chardevs = ChardevRegistry::with_poll(poll.registry(), CHARDEV_TOKENS)
        .map_err(|e| format!("cannot set up character devices: {e}"))?;
    for spec in &cli.chardev {
        let parsed = parse_chardev_opts(spec).map_err(|e| format!("--chardev {spec}: {e}"))?;
        for warning in &parsed.warnings {
            eprintln!("vmm-reference: warning: {warning}");
        }
        chardevs
            .add(&parsed.id, &parsed.config)
            .map_err(|e| format!("--chardev {spec}: {e}"))?;
    }
    let run_state = if !cli.no_guest && cli.start_paused {
        qapi_types::RunState::Prelaunch
    } else {
        qapi_types::RunState::Running
    };
    let mut vmm = Vmm::new(cli.name.clone(), run_state, chardevs);
    if let Some(uuid) = &cli.uuid {
        vmm.uuid = uuid.clone();
    }
    let resolver = vmm.fds.resolver();
    vmm.chardevs.set_fd_resolver(resolver);
    // One waker for the loop (mio allows one per poll): the machine's
    // requests and the block layer's events from I/O threads.
    let waker = Arc::new(
        mio::Waker::new(poll.registry(), MACHINE_TOKEN)
            .map_err(|e| format!("cannot create a waker: {e}"))?,
    );
    let block_waker = waker.clone();
    vmm.block.set_event_notifier(Some(Arc::new(move || {
        let _ = block_waker.wake();
    })));
    // Jobs whose work is done wake the loop, which finishes them (Jobs::poll).
    let jobs_waker = waker.clone();
    vmm.jobs.set_notifier(Some(Arc::new(move || {
        let _ = jobs_waker.wake();
    })));
    for spec in &cli.blockdev {
        let opts = block_graph::cli::parse_blockdev_arg(spec)
            .map_err(|e| format!("--blockdev {spec}: {e}"))?;
        vmm.block
            .blockdev_add(&opts)
            .map_err(|e| format!("--blockdev {spec}: {e}"))?;
    }
    if !cli.no_guest {
        let machine = start_machine(&cli, &mut vmm.chardevs, &mut vmm.block, waker)?;
        vmm.machine = Some(machine);
    }
    let mut events = Events::with_capacity(256);
    log::info!("serving QMP on {:?}", cli.qmp);
    // Queue notifiers registered with the loop (the machine's, then hot-added devices').
    let mut watched = 0;
    'outer: loop {
        hotplug::watch_notifiers(
            poll.registry(),
            &vmm,
            &mut watched,
            NOTIFIER_TOKENS..MACHINE_TOKEN.0,
        )?;
        let timeout = vmm.chardevs.poll_timeout(Instant::now());
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("event loop failed: {e}"));
        }
        for ev in events.iter() {
            if ev.token() == SIGNAL_TOKEN {
                if let Some(sig) = signals.pending().next() {
                    log::info!("signal {sig}: shutting down");
                    break 'outer;
                }
            } else if monitors.owns(ev.token()) {
                monitors.handle_event(poll.registry(), ev, &mut vmm);
            } else if (NOTIFIER_TOKENS..MACHINE_TOKEN.0).contains(&ev.token().0) {
                let index = ev.token().0 - NOTIFIER_TOKENS;
                if let Some(n) = vmm.machine.as_ref().and_then(|m| m.notifiers().get(index)) {
                    // Clear the eventfd first: a notification after this read
                    // wakes the loop again, so no request is left behind.
                    let _ = n.fd.read();
                    // A stopped VM does no I/O (QEMU stops its devices' queue
                    // handlers with the vCPUs): what was queued before the stop
                    // is served when `cont` restarts every queue.
                    if vmm.run_state == qapi_types::RunState::Running {
                        n.device
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .notify(n.queue);
                    }
                }
            } else if vmm.chardevs.owns(ev.token()) {
                vmm.chardevs.handle_event(ev);
            } else if ev.token() == MACHINE_TOKEN && machine_requests(&mut vmm) {
                monitors.flush_events(&mut vmm);
                break 'outer;
            }
        }
        vmm.chardevs.on_timeout(Instant::now());
        vmm.jobs.poll(&mut vmm.block);
        vmm.events.extend(vmm.block.take_events());
        for e in vmm.chardevs.drain_events() {
            log::debug!("chardev {}: {:?}", e.id, e.kind);
        }
        monitors.flush_events(&mut vmm);
        if monitors.shutdown_requested() {
            break;
        }
    }
    monitors.shutdown(Duration::from_secs(2));
    // The vCPUs stop first (no request can arrive), then every image is
    // flushed and closed, so a clean exit never loses acknowledged writes.
    if let Some(m) = &mut vmm.machine {
        m.shutdown();
    }
    // Jobs stop (QEMU's job_cancel_sync_all) before the images are flushed and closed.
    vmm.jobs
        .cancel_all_sync(&mut vmm.block, Duration::from_secs(10));
    if let Err(e) = vmm.block.flush_all() {
        log::error!("flushing the images at exit: {e}");
    }
    vmm.block.close_all();
    Ok(())
}

/// Creates the guest with COM1 connected as `--serial` says.
fn start_machine(
    cli: &Cli,
    chardevs: &mut ChardevRegistry,
    block: &mut block_graph::BlockGraph,
    waker: Arc<mio::Waker>,
) -> Result<Machine, String> {
    let serial_chardev = match &cli.serial {
        SerialSpec::None => None,
        SerialSpec::Chardev(id) => Some(id.clone()),
        spec @ (SerialSpec::Stdio | SerialSpec::File(_)) => {
            let opts = match spec {
                SerialSpec::File(path) => format!("file,id=serial0,path={}", path.display()),
                _ => "stdio,id=serial0".to_owned(),
            };
            let parsed = parse_chardev_opts(&opts).map_err(|e| format!("--serial: {e}"))?;
            chardevs
                .add(&parsed.id, &parsed.config)
                .map_err(|e| format!("--serial: {e}"))?;
            Some(parsed.id)
        }
    };
    let (out, input): (Box<dyn std::io::Write + Send>, InputReady) = match &serial_chardev {
        Some(id) => {
            let handle = chardevs
                .handle(id)
                .map_err(|e| format!("--serial chardev:{id}: {e}"))?;
            (Box::new(handle.writer()), InputReady(Some(handle)))
        }
        None => (Box::new(std::io::sink()), InputReady(None)),
    };
    let config = MachineConfig {
        memory: cli.memory,
        vcpus: cli.smp,
        paused: cli.start_paused,
    };
    let boot = match &cli.kernel {
        Some(kernel) => BootSource::Linux(LinuxBoot {
            kernel: kernel.clone(),
            cmdline: cli.cmdline.clone(),
            initrd: cli.initrd.clone(),
        }),
        None => BootSource::Flat(machine::DEFAULT_GUEST),
    };
    let mut disks = Vec::new();
    for dev in &cli.device {
        let node = block
            .lookup_either(&dev.drive)
            .map_err(|e| format!("--device drive={}: {e}", dev.drive))?;
        let backend = block
            .create_backend(&dev.id, Some(&node), dev.backend_options())
            .map_err(|e| format!("--device id={}: {e}", dev.id))?;
        block
            .attach_device(&backend, dev.device_attach())
            .map_err(|e| format!("--device id={}: {e}", dev.id))?;
        disks.push(dev.block_device(backend));
    }
    let machine =
        Machine::new(&config, boot, out, input, disks, waker).map_err(|e| e.to_string())?;
    if let Some(id) = serial_chardev {
        chardevs
            .attach(&id, Box::new(machine.serial_frontend()))
            .map_err(|e| format!("--serial chardev:{id}: {e}"))?;
    }
    Ok(machine)
}

/// Acts on what the machine asked for; returns whether the VMM must exit.
fn machine_requests(vmm: &mut Vmm) -> bool {
    hotplug::complete_unplugs(vmm);
    let Some(m) = &vmm.machine else { return false };
    if m.bus().take_shutdown() {
        vmm.events.push(qapi_types::event::Shutdown::message());
        return true;
    }
    if m.bus().take_reset() {
        if let Err(e) = vmm.reset() {
            log::error!("guest reset failed: {}", e.desc);
            return true;
        }
    }
    false
}

/// The text of an OS error without Rust's " (os error N)" suffix, as QEMU words it.
pub(crate) fn os_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// `--pidfile`: holds the process id while the VMM runs, removed on exit.
struct PidFile(std::path::PathBuf);

impl PidFile {
    fn create(path: &std::path::Path) -> Result<PidFile, String> {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
            format!(
                "cannot write the pid file {}: {}",
                path.display(),
                os_error(&e)
            )
        })?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
