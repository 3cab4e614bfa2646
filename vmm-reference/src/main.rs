//! `vmm-reference`: a small KVM VMM with QEMU's QMP interface.
//!
//! With `--no-guest` it serves the monitors alone, like qemu-storage-daemon.

mod cli;
mod monitor;
mod vm;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::cli::Cli;
use crate::monitor::Monitors;
use crate::vm::Vmm;

const SIGNAL_TOKEN: Token = Token(0);
/// Tokens of the character devices.
const CHARDEV_TOKENS: std::ops::Range<usize> = 1..(1 << 20);
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
    if !cli.no_guest {
        return Err(
            "running a guest is not available in this version yet; start with --no-guest".into(),
        );
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
    let mut monitors = Monitors::new(&cli.qmp, MONITOR_TOKENS)
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
    let mut vmm = Vmm::new(cli.name, qapi_types::RunState::Running, chardevs);
    let mut events = Events::with_capacity(256);
    log::info!("serving QMP on {:?}", cli.qmp);
    'outer: loop {
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
            } else if vmm.chardevs.owns(ev.token()) {
                vmm.chardevs.handle_event(ev);
            }
        }
        vmm.chardevs.on_timeout(Instant::now());
        for e in vmm.chardevs.drain_events() {
            log::debug!("chardev {}: {:?}", e.id, e.kind);
        }
        monitors.flush_events(&mut vmm);
        if monitors.shutdown_requested() {
            break;
        }
    }
    monitors.shutdown(Duration::from_secs(2));
    Ok(())
}
