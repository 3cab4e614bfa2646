//! The QMP side (feature `qmp`): the handlers of the chardev commands on
//! [`ChardevRegistry`], and conversions between [`ChardevConfig`] and
//! QEMU's `ChardevBackend`.
//!
//! ```
//! use chardev_ringbuf::ChardevRegistry;
//! use qapi_types::Dispatcher;
//! use qmp_proto::Request;
//! use serde_json::json;
//!
//! struct Vmm { chardevs: ChardevRegistry }
//! let mut d = Dispatcher::<Vmm>::new();
//! d.register_char_commands(|vmm| &mut vmm.chardevs);
//! let mut vmm = Vmm { chardevs: ChardevRegistry::new() };
//! let run = |d: &Dispatcher<Vmm>, vmm: &mut Vmm, cmd: &str, args: serde_json::Value| {
//!     let req = Request {
//!         id: None,
//!         command: cmd.into(),
//!         arguments: args.as_object().cloned().unwrap_or_default(),
//!         oob: false,
//!     };
//!     d.dispatch(vmm, &req)
//! };
//! run(&d, &mut vmm, "chardev-add", json!({"id": "rb0", "backend": {"type": "ringbuf", "data": {"size": 4096}}})).unwrap();
//! run(&d, &mut vmm, "ringbuf-write", json!({"device": "rb0", "data": "abcdefgh"})).unwrap();
//! let r = run(&d, &mut vmm, "ringbuf-read", json!({"device": "rb0", "size": 1000})).unwrap();
//! assert_eq!(r, json!("abcdefgh"));
//! let e = run(&d, &mut vmm, "ringbuf-read", json!({"device": "nope", "size": 1})).unwrap_err();
//! assert_eq!(e.desc, "Device 'nope' not found");
//! ```

use qapi_types::{
    CharCommands, ChardevBackend, ChardevBackendBranch, ChardevBackendInfo, ChardevCommon,
    ChardevCommonWrapper, ChardevFile, ChardevFileWrapper, ChardevReturn, ChardevRingbuf,
    ChardevRingbufWrapper, ChardevSocket, ChardevSocketWrapper, ChardevStdio, ChardevStdioWrapper,
    FdSocketAddress, FdSocketAddressWrapper, InetSocketAddress, InetSocketAddressWrapper,
    SocketAddressLegacy, SocketAddressLegacyBranch, UnixSocketAddress, UnixSocketAddressWrapper,
    VsockSocketAddress, VsockSocketAddressWrapper,
};
use qmp_proto::QmpError;

use crate::config::{BackendConfig, ChardevConfig, RingbufName, SocketAddrConfig, SocketConfig};
use crate::error::ChardevError;
use crate::registry::{ChardevRegistry, DataFormat};

impl From<ChardevError> for QmpError {
    fn from(e: ChardevError) -> Self {
        QmpError::generic(e.to_string())
    }
}

fn format_of(f: &Option<qapi_types::DataFormat>) -> Result<DataFormat, QmpError> {
    match f {
        None | Some(qapi_types::DataFormat::Utf8) => Ok(DataFormat::Utf8),
        Some(qapi_types::DataFormat::Base64) => Ok(DataFormat::Base64),
        Some(qapi_types::DataFormat::Unrecognized(s)) => Err(QmpError::generic(format!(
            "Parameter 'format' does not accept value '{s}'"
        ))),
    }
}

fn socket_addr_from_qapi(a: &SocketAddressLegacy) -> Result<SocketAddrConfig, String> {
    Ok(match &a.r#type {
        SocketAddressLegacyBranch::Inet(w) => {
            if w.data.keep_alive == Some(true) {
                return Err("keep-alive is not supported".into());
            }
            SocketAddrConfig::Inet {
                host: w.data.host.clone(),
                port: w.data.port.clone(),
                to: w.data.to,
                ipv4: w.data.ipv4,
                ipv6: w.data.ipv6,
            }
        }
        SocketAddressLegacyBranch::Unix(w) => SocketAddrConfig::Unix {
            path: w.data.path.clone(),
            r#abstract: w.data.r#abstract,
            tight: w.data.tight,
        },
        SocketAddressLegacyBranch::Vsock(w) => SocketAddrConfig::Vsock {
            cid: w.data.cid.clone(),
            port: w.data.port.clone(),
        },
        SocketAddressLegacyBranch::Fd(w) => SocketAddrConfig::Fd {
            name: w.data.str.clone(),
        },
        SocketAddressLegacyBranch::Unrecognized(t) => {
            return Err(format!("socket address type '{t}' is not supported"))
        }
    })
}

fn socket_addr_to_qapi(a: &SocketAddrConfig) -> SocketAddressLegacy {
    let branch = match a {
        SocketAddrConfig::Inet {
            host,
            port,
            to,
            ipv4,
            ipv6,
        } => SocketAddressLegacyBranch::Inet(InetSocketAddressWrapper {
            data: InetSocketAddress {
                host: host.clone(),
                port: port.clone(),
                to: *to,
                ipv4: *ipv4,
                ipv6: *ipv6,
                ..Default::default()
            },
        }),
        SocketAddrConfig::Unix {
            path,
            r#abstract,
            tight,
        } => SocketAddressLegacyBranch::Unix(UnixSocketAddressWrapper {
            data: UnixSocketAddress {
                path: path.clone(),
                r#abstract: *r#abstract,
                tight: *tight,
            },
        }),
        SocketAddrConfig::Vsock { cid, port } => {
            SocketAddressLegacyBranch::Vsock(VsockSocketAddressWrapper {
                data: VsockSocketAddress {
                    cid: cid.clone(),
                    port: port.clone(),
                },
            })
        }
        SocketAddrConfig::Fd { name } => SocketAddressLegacyBranch::Fd(FdSocketAddressWrapper {
            data: FdSocketAddress { str: name.clone() },
        }),
    };
    SocketAddressLegacy { r#type: branch }
}

/// The model configuration of a QAPI `ChardevBackend`; backends this crate
/// does not implement are refused as QEMU refuses backends it was built
/// without ("'vc' is not a valid char driver name").
pub fn config_from_qapi(b: &ChardevBackend) -> Result<ChardevConfig, String> {
    let common = |logfile: &Option<String>, logappend: &Option<bool>, backend| ChardevConfig {
        backend,
        logfile: logfile.clone(),
        logappend: *logappend,
    };
    Ok(match &b.r#type {
        ChardevBackendBranch::Ringbuf(w) | ChardevBackendBranch::Memory(w) => {
            let name = if matches!(b.r#type, ChardevBackendBranch::Memory(_)) {
                RingbufName::Memory
            } else {
                RingbufName::Ringbuf
            };
            common(
                &w.data.logfile,
                &w.data.logappend,
                BackendConfig::Ringbuf {
                    name,
                    size: w.data.size,
                },
            )
        }
        ChardevBackendBranch::Null(w) => {
            common(&w.data.logfile, &w.data.logappend, BackendConfig::Null)
        }
        ChardevBackendBranch::Pty(w) => {
            common(&w.data.logfile, &w.data.logappend, BackendConfig::Pty)
        }
        ChardevBackendBranch::File(w) => common(
            &w.data.logfile,
            &w.data.logappend,
            BackendConfig::File {
                out: w.data.out.clone(),
                input: w.data.r#in.clone(),
                append: w.data.append,
            },
        ),
        ChardevBackendBranch::Stdio(w) => common(
            &w.data.logfile,
            &w.data.logappend,
            BackendConfig::Stdio {
                signal: w.data.signal,
            },
        ),
        ChardevBackendBranch::Socket(w) => {
            let s = &w.data;
            common(
                &s.logfile,
                &s.logappend,
                BackendConfig::Socket(SocketConfig {
                    addr: socket_addr_from_qapi(&s.addr)?,
                    server: s.server,
                    wait: s.wait,
                    nodelay: s.nodelay,
                    telnet: s.telnet,
                    reconnect: s.reconnect,
                    tls_creds: s.tls_creds.clone(),
                }),
            )
        }
        other => {
            return Err(format!(
                "'{}' is not a valid char driver name",
                other.discriminant().as_str()
            ))
        }
    })
}

/// The QAPI `ChardevBackend` of a model configuration (what `chardev-add`
/// would take to create the same chardev).
pub fn config_to_qapi(c: &ChardevConfig) -> ChardevBackend {
    let common = || ChardevCommon {
        logfile: c.logfile.clone(),
        logappend: c.logappend,
    };
    let branch = match &c.backend {
        BackendConfig::Ringbuf { name, size } => {
            let w = ChardevRingbufWrapper {
                data: ChardevRingbuf {
                    logfile: c.logfile.clone(),
                    logappend: c.logappend,
                    size: *size,
                },
            };
            match name {
                RingbufName::Ringbuf => ChardevBackendBranch::Ringbuf(w),
                RingbufName::Memory => ChardevBackendBranch::Memory(w),
            }
        }
        BackendConfig::Null => ChardevBackendBranch::Null(ChardevCommonWrapper { data: common() }),
        BackendConfig::Pty => ChardevBackendBranch::Pty(ChardevCommonWrapper { data: common() }),
        BackendConfig::File { out, input, append } => {
            ChardevBackendBranch::File(ChardevFileWrapper {
                data: ChardevFile {
                    logfile: c.logfile.clone(),
                    logappend: c.logappend,
                    r#in: input.clone(),
                    out: out.clone(),
                    append: *append,
                },
            })
        }
        BackendConfig::Stdio { signal } => ChardevBackendBranch::Stdio(ChardevStdioWrapper {
            data: ChardevStdio {
                logfile: c.logfile.clone(),
                logappend: c.logappend,
                signal: *signal,
            },
        }),
        BackendConfig::Socket(s) => ChardevBackendBranch::Socket(ChardevSocketWrapper {
            data: ChardevSocket {
                logfile: c.logfile.clone(),
                logappend: c.logappend,
                addr: socket_addr_to_qapi(&s.addr),
                tls_creds: s.tls_creds.clone(),
                server: s.server,
                wait: s.wait,
                nodelay: s.nodelay,
                telnet: s.telnet,
                reconnect: s.reconnect,
            },
        }),
    };
    ChardevBackend { r#type: branch }
}

impl CharCommands for ChardevRegistry {
    fn query_chardev(&mut self) -> Result<Vec<qapi_types::ChardevInfo>, QmpError> {
        Ok(self
            .info()
            .into_iter()
            .map(|i| qapi_types::ChardevInfo {
                label: i.label,
                filename: i.filename,
                frontend_open: i.frontend_open,
            })
            .collect())
    }

    fn query_chardev_backends(&mut self) -> Result<Vec<ChardevBackendInfo>, QmpError> {
        Ok(self
            .backend_names()
            .iter()
            .map(|n| ChardevBackendInfo {
                name: (*n).to_owned(),
            })
            .collect())
    }

    fn ringbuf_write(
        &mut self,
        args: qapi_types::cmd::RingbufWriteArguments,
    ) -> Result<(), QmpError> {
        let format = format_of(&args.format)?;
        Ok(self.ringbuf_write_str(&args.device, &args.data, format)?)
    }

    fn ringbuf_read(
        &mut self,
        args: qapi_types::cmd::RingbufReadArguments,
    ) -> Result<String, QmpError> {
        let format = format_of(&args.format)?;
        Ok(ChardevRegistry::ringbuf_read(
            self,
            &args.device,
            args.size,
            format,
        )?)
    }

    fn chardev_add(
        &mut self,
        args: qapi_types::cmd::ChardevAddArguments,
    ) -> Result<ChardevReturn, QmpError> {
        let config = config_from_qapi(&args.backend).map_err(|reason| ChardevError::Open {
            id: args.id.clone(),
            reason,
        })?;
        let outcome = self.add(&args.id, &config)?;
        Ok(ChardevReturn { pty: outcome.pty })
    }

    fn chardev_remove(
        &mut self,
        args: qapi_types::cmd::ChardevRemoveArguments,
    ) -> Result<(), QmpError> {
        Ok(self.remove(&args.id)?)
    }
}
