//! The command line: clap definitions, QEMU's single-dash spellings, and the
//! monitor address syntax (`unix:PATH,server=on,wait=off`, `tcp:HOST:PORT`).

use std::path::PathBuf;
use std::str::FromStr;

use clap::{CommandFactory, Parser};

/// Command-line options of the reference VMM.
#[derive(Debug, Parser)]
#[command(
    name = "vmm-reference",
    version,
    about = "A small KVM virtual machine monitor with QEMU's QMP management interface.",
    long_about = "A small KVM virtual machine monitor with QEMU's QMP management interface.\n\n\
                  QEMU's single-dash spellings are accepted too (-qmp unix:PATH,server=on,wait=off).\n\
                  Set RUST_LOG (e.g. RUST_LOG=debug) for logs on standard error."
)]
pub struct Cli {
    /// Run without a guest: only the monitors and the storage side, like qemu-storage-daemon.
    #[arg(long)]
    pub no_guest: bool,

    /// Serve QMP on ADDR: unix:PATH or tcp:HOST:PORT, optionally followed by QEMU's
    /// ,server=on and ,wait=off (or ,server ,nowait). May be given several times.
    #[arg(long = "qmp", value_name = "ADDR")]
    pub qmp: Vec<MonitorAddr>,

    /// A character device in QEMU's -chardev syntax, e.g. ringbuf,id=rb0,size=4096 or
    /// socket,id=s0,path=/tmp/s.sock,server=on,wait=off. May be given several times.
    #[arg(long = "chardev", value_name = "SPEC")]
    pub chardev: Vec<String>,

    /// Guest memory: a size with an optional K, M or G suffix (QEMU's -m; a plain number is MiB).
    #[arg(short = 'm', long = "memory", value_name = "SIZE", default_value = "128M", value_parser = parse_memory)]
    pub memory: u64,

    /// Number of vCPUs (QEMU's -smp).
    #[arg(long = "smp", visible_alias = "vcpus", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub smp: u8,

    /// Start with the vCPUs paused (run state prelaunch) until `cont`.
    #[arg(short = 'S')]
    pub start_paused: bool,

    /// Boot this Linux kernel (bzImage or ELF vmlinux) instead of the embedded guest.
    #[arg(long = "kernel", value_name = "FILE")]
    pub kernel: Option<PathBuf>,

    /// The kernel command line (QEMU's -append).
    #[arg(
        long = "cmdline",
        visible_alias = "append",
        value_name = "STRING",
        default_value = "",
        requires = "kernel"
    )]
    pub cmdline: String,

    /// An initial RAM disk for the kernel.
    #[arg(long = "initrd", value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Where COM1 goes: none, stdio, file:PATH or chardev:ID (a --chardev).
    #[arg(long = "serial", value_name = "SPEC", default_value = "none")]
    pub serial: SerialSpec,

    /// A block node in QEMU's -blockdev syntax (JSON or key=value with dotted keys),
    /// e.g. driver=qcow2,node-name=disk0,file.driver=file,file.filename=disk.qcow2.
    #[arg(long = "blockdev", value_name = "SPEC")]
    pub blockdev: Vec<String>,

    /// A device: `virtio-blk,drive=NODE,id=ID[,num-queues=N][,read-only=on][,ioeventfd=off][,addr=SLOT][,werror=stop][,rerror=stop]`
    /// (virtio-blk and virtio-blk-pci: virtio-pci; virtio-blk-device: virtio-mmio).
    #[arg(long = "device", value_name = "SPEC")]
    pub device: Vec<DeviceSpec>,

    /// The VM's UUID (reported by query-uuid).
    #[arg(long = "uuid", value_name = "UUID", value_parser = parse_uuid)]
    pub uuid: Option<String>,

    /// Write the process id to FILE (removed at exit).
    #[arg(long = "pidfile", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// A name for the VM (reported by query-name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Where the guest's COM1 is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// Nowhere: output is dropped.
    None,
    /// The VMM's standard input and output.
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// A character device created with --chardev.
    Chardev(String),
}

impl FromStr for SerialSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "null" => Ok(SerialSpec::None),
            "stdio" => Ok(SerialSpec::Stdio),
            _ => {
                if let Some(p) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
                    Ok(SerialSpec::File(PathBuf::from(p)))
                } else if let Some(id) = s.strip_prefix("chardev:").filter(|p| !p.is_empty()) {
                    Ok(SerialSpec::Chardev(id.to_owned()))
                } else {
                    Err(format!(
                        "'{s}' is not a serial backend: use none, stdio, file:PATH or chardev:ID"
                    ))
                }
            }
        }
    }
}

/// A UUID in its canonical 8-4-4-4-12 hex form, as QEMU's -uuid takes it.
fn parse_uuid(s: &str) -> Result<String, String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "'{s}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        ))
    }
}

/// A `--device` of the only model the VMM has: virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The block node or BlockBackend it uses.
    pub drive: String,
    /// The device id.
    pub id: String,
    /// Request queues.
    pub queues: u16,
    /// Whether the guest sees the disk read-only.
    pub read_only: bool,
    /// Queue notifications through ioeventfds (default on, as in QEMU).
    pub ioeventfd: bool,
    /// virtio-pci (virtio-blk, virtio-blk-pci) or virtio-mmio (virtio-blk-device).
    pub transport: crate::machine::Transport,
    /// The PCI slot (`addr=`, QEMU's hexadecimal `SLOT[.0]`).
    pub slot: Option<u8>,
    /// `werror=`: what a failed write does (report, ignore, enospc, stop; `auto`, the
    /// default, keeps the backend's: enospc).
    pub werror: Option<qapi_types::BlockdevOnError>,
    /// `rerror=`: what a failed read does (report, ignore, stop; `auto`, the default,
    /// keeps the backend's: report).
    pub rerror: Option<qapi_types::BlockdevOnError>,
}

/// QEMU's `BlockdevOnError` device property values (`auto`: the backend's policy).
fn parse_on_error(
    model: &str,
    prop: &str,
    v: &str,
) -> Result<Option<qapi_types::BlockdevOnError>, String> {
    use qapi_types::BlockdevOnError as E;
    Ok(Some(match v {
        "auto" => return Ok(None),
        "report" => E::Report,
        "ignore" => E::Ignore,
        "stop" => E::Stop,
        // QEMU refuses enospc for reads (a read can't run out of space).
        "enospc" if prop == "werror" => E::Enospc,
        _ => {
            return Err(format!(
                "Property '{model}.{prop}' doesn't take value '{v}'"
            ))
        }
    }))
}

impl DeviceSpec {
    /// How the device uses its BlockBackend (permissions, as QEMU's virtio-blk).
    pub fn device_attach(&self) -> block_graph::DeviceAttach {
        block_graph::DeviceAttach {
            id: self.id.clone(),
            read_only: self.read_only,
            share_rw: false,
            resizable: true,
            removable: false,
            has_tray: false,
        }
    }

    /// The options of the device's BlockBackend: its `werror`/`rerror` where given.
    pub fn backend_options(&self) -> block_graph::BackendOptions {
        let mut o = block_graph::BackendOptions::default();
        if let Some(w) = &self.werror {
            o.werror = w.clone();
        }
        if let Some(r) = &self.rerror {
            o.rerror = r.clone();
        }
        o
    }

    /// The disk to put on the machine, doing its I/O on `backend`.
    pub fn block_device(
        &self,
        backend: std::sync::Arc<block_graph::BlockBackend>,
    ) -> crate::machine::BlockDeviceSpec {
        crate::machine::BlockDeviceSpec {
            backend,
            read_only: self.read_only,
            id: self.id.clone(),
            queues: self.queues,
            ioeventfd: self.ioeventfd,
            transport: self.transport,
            slot: self.slot,
        }
    }
}

/// QEMU's PCI `addr` property: a hexadecimal slot, optionally `.0`.
pub fn parse_pci_addr(v: &str) -> Result<u8, String> {
    let slot = v.strip_suffix(".0").unwrap_or(v);
    let slot = slot.strip_prefix("0x").unwrap_or(slot);
    u8::from_str_radix(slot, 16)
        .ok()
        .filter(|s| (1..32).contains(s))
        .ok_or_else(|| {
            format!("Property 'virtio-blk-pci.addr' doesn't take value '{v}' (a slot 1..1f, function 0)")
        })
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let model = parts.next().unwrap_or_default();
        let transport = match model {
            "virtio-blk" | "virtio-blk-pci" => crate::machine::Transport::Pci,
            "virtio-blk-device" => crate::machine::Transport::Mmio,
            _ => return Err(format!("'{model}' is not a valid device model name")),
        };
        let (mut drive, mut id, mut queues, mut read_only, mut ioeventfd) =
            (None, None, 1u16, false, true);
        let mut slot = None;
        let (mut werror, mut rerror) = (None, None);
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("'{opt}' is not key=value"))?;
            match k {
                "drive" => drive = Some(v.to_owned()),
                "id" => id = Some(v.to_owned()),
                "num-queues" => {
                    queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=16).contains(n))
                        .ok_or_else(|| format!("num-queues must be 1 to 16, not '{v}'"))?
                }
                "read-only" => read_only = matches!(v, "on" | "true" | "yes"),
                "ioeventfd" => ioeventfd = matches!(v, "on" | "true" | "yes"),
                "werror" => werror = parse_on_error(model, k, v)?,
                "rerror" => rerror = parse_on_error(model, k, v)?,
                "addr" if transport == crate::machine::Transport::Pci => {
                    slot = Some(parse_pci_addr(v)?)
                }
                // The only bus there is.
                "bus" if v == "pci.0" && transport == crate::machine::Transport::Pci => {}
                _ => return Err(format!("Property '{model}.{k}' not found")),
            }
        }
        let drive = drive.ok_or("virtio-blk needs drive=NODE")?;
        Ok(DeviceSpec {
            id: id.unwrap_or_else(|| drive.clone()),
            drive,
            queues,
            read_only,
            ioeventfd,
            transport,
            slot,
            werror,
            rerror,
        })
    }
}

/// QEMU's `-m` sizes: `512`, `512M`, `2G`, `65536K` (a plain number is MiB).
fn parse_memory(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "M"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a memory size"))?;
    let shift = match unit {
        "K" | "k" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        _ => return Err(format!("'{s}' is not a memory size (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Where a QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorAddr {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP socket on this host and port.
    Tcp(String, u16),
}

impl FromStr for MonitorAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parts.next().unwrap_or_default();
        for opt in parts {
            let (key, value) = opt.split_once('=').unwrap_or((opt, "on"));
            let on = match value {
                "on" | "yes" | "true" => true,
                "off" | "no" | "false" => false,
                _ => return Err(format!("Parameter '{key}' expects 'on' or 'off'")),
            };
            match key {
                "server" if !on => {
                    return Err("client-mode monitors (server=off) are not supported".into())
                }
                "server" => {}
                // QEMU's wait=on holds start-up until a client connects; nothing here
                // runs before a client could connect, so both values behave alike.
                "wait" => {}
                "nowait" => {}
                _ => return Err(format!("Invalid parameter '{key}'")),
            }
        }
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(MonitorAddr::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = addr.strip_prefix("tcp:") {
            let (host, port) = hostport
                .rsplit_once(':')
                .ok_or_else(|| format!("'{hostport}' is not HOST:PORT"))?;
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("'{port}' is not a port number"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let host = if host.is_empty() { "127.0.0.1" } else { host };
            return Ok(MonitorAddr::Tcp(host.to_owned(), port));
        }
        Err(format!(
            "'{addr}' is not a monitor address: use unix:PATH or tcp:HOST:PORT"
        ))
    }
}

impl Cli {
    /// Parses the arguments, accepting QEMU's single-dash long options
    /// (`-qmp`, `-name`) as their double-dash forms.
    pub fn parse_from_qemu_style<I: IntoIterator<Item = String>>(
        args: I,
    ) -> Result<Cli, clap::Error> {
        let longs: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        let args = args.into_iter().enumerate().map(|(i, a)| {
            if i > 0 && a.len() > 2 && a.starts_with('-') && !a.starts_with("--") {
                let name = a[1..].split('=').next().unwrap_or_default();
                if longs.iter().any(|l| l == name) {
                    return format!("-{a}");
                }
            }
            a
        });
        Cli::try_parse_from(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_from_qemu_style(
            std::iter::once("vmm-reference")
                .chain(args.iter().copied())
                .map(str::to_owned),
        )
    }

    #[test]
    fn parses_monitor_addresses() {
        let cli = parse(&[
            "--no-guest",
            "--qmp",
            "unix:/tmp/a.sock",
            "-qmp",
            "unix:/tmp/b.sock,server=on,wait=off",
            "--qmp",
            "tcp:localhost:4444,server,nowait",
            "-name",
            "vm0",
            "-chardev",
            "ringbuf,id=rb0,size=4096",
        ])
        .unwrap();
        assert!(cli.no_guest);
        assert_eq!(
            cli.qmp,
            vec![
                MonitorAddr::Unix("/tmp/a.sock".into()),
                MonitorAddr::Unix("/tmp/b.sock".into()),
                MonitorAddr::Tcp("localhost".into(), 4444),
            ]
        );
        assert_eq!(cli.name.as_deref(), Some("vm0"));
        assert_eq!(cli.chardev, ["ringbuf,id=rb0,size=4096"]);
    }

    #[test]
    fn parses_machine_options() {
        let cli = parse(&["-m", "64M", "-smp", "2", "-S", "-serial", "chardev:rb0"]).unwrap();
        assert_eq!(cli.memory, 64 << 20);
        assert_eq!(cli.smp, 2);
        assert!(cli.start_paused);
        assert_eq!(cli.serial, SerialSpec::Chardev("rb0".into()));
        let cli = parse(&[
            "--memory",
            "1G",
            "--vcpus",
            "4",
            "--serial",
            "file:/tmp/out",
        ])
        .unwrap();
        assert_eq!((cli.memory, cli.smp), (1 << 30, 4));
        assert_eq!(cli.serial, SerialSpec::File("/tmp/out".into()));
        assert_eq!(parse(&["-m", "256"]).unwrap().memory, 256 << 20);
        let defaults = parse(&[]).unwrap();
        assert_eq!(
            (defaults.memory, defaults.smp, defaults.serial),
            (128 << 20, 1, SerialSpec::None)
        );
        for bad in [&["-m", "12X"][..], &["-smp", "0"], &["--serial", "tcp:x"]] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_devices() {
        let dev = parse(&[
            "-device",
            "virtio-blk-pci,drive=disk0,id=vd0,num-queues=2,ioeventfd=off",
        ])
        .unwrap();
        assert_eq!(
            dev.device,
            [DeviceSpec {
                drive: "disk0".into(),
                id: "vd0".into(),
                queues: 2,
                read_only: false,
                ioeventfd: false,
                transport: crate::machine::Transport::Pci,
                slot: None,
                werror: None,
                rerror: None,
            }]
        );
        // werror/rerror: QEMU's BlockdevOnError values, auto keeps the backend's.
        let dev = parse(&["--device", "virtio-blk,drive=d,werror=stop,rerror=ignore"]).unwrap();
        let o = dev.device[0].backend_options();
        assert_eq!(
            (o.werror, o.rerror),
            (
                qapi_types::BlockdevOnError::Stop,
                qapi_types::BlockdevOnError::Ignore
            )
        );
        let dev = parse(&["--device", "virtio-blk,drive=d,werror=auto"]).unwrap();
        assert_eq!(
            dev.device[0].backend_options().werror,
            qapi_types::BlockdevOnError::Enospc
        );
        let err = parse(&["--device", "virtio-blk,drive=x,rerror=enospc"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Property 'virtio-blk.rerror' doesn't take value 'enospc'"),
            "{err}"
        );
        let dev = parse(&["--device", "virtio-blk-device,drive=d,id=m"]).unwrap();
        assert_eq!(dev.device[0].transport, crate::machine::Transport::Mmio);
        let dev = parse(&["--device", "virtio-blk,drive=d,addr=0x1f.0,bus=pci.0"]).unwrap();
        assert_eq!(dev.device[0].slot, Some(0x1f));
        assert_eq!(parse_pci_addr("5"), Ok(5));
        let dev = parse(&["--device", "virtio-blk,drive=d"]).unwrap();
        assert_eq!(
            (dev.device[0].id.as_str(), dev.device[0].ioeventfd),
            ("d", true)
        );
        for bad in [
            "e1000,drive=x",
            "virtio-blk,id=x",
            "virtio-blk,drive=x,bogus=1",
            "virtio-blk,drive=x,num-queues=0",
            "virtio-blk,drive",
            "virtio-blk,drive=x,addr=0",
            "virtio-blk,drive=x,addr=20",
            "virtio-blk,drive=x,addr=3.1",
            "virtio-blk-device,drive=x,addr=3",
            "virtio-blk,drive=x,bus=pci.1",
            "virtio-blk,drive=x,werror=sometimes",
        ] {
            assert!(parse(&["--device", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_addresses_and_flags_with_one_clear_line() {
        for (args, needle) in [
            (&["--qmp", "stdio"][..], "is not a monitor address"),
            (&["--qmp", "unix:/x,server=off"], "not supported"),
            (&["--qmp", "unix:/x,bogus=on"], "Invalid parameter 'bogus'"),
            (&["--qmp", "tcp:host:99999"], "is not a port number"),
            (&["--frobnicate"], "unexpected argument"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
