//! QEMU's `-chardev` option syntax, as QEMU 7.2 parses it.
//!
//! `backend,id=ID,key=value,...`: the first item without `=` names the
//! backend; `,,` is a literal comma; a bare `key` means `key=on` and a bare
//! `nokey` means `key=off` (deprecated short forms, reported as warnings);
//! every key of QEMU's chardev option list is accepted and type-checked, keys
//! a backend does not use are ignored (as QEMU ignores them), unknown keys
//! are refused. The result is the same [`ChardevConfig`] `chardev-add`
//! describes, with QEMU's command-line defaults made explicit (a socket is a
//! client unless `server=on`, and a server waits unless `wait=off`).

use crate::config::{BackendConfig, ChardevConfig, RingbufName, SocketAddrConfig, SocketConfig};
use crate::error::ChardevError;

/// A parsed `-chardev` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedChardev {
    /// The chardev's id.
    pub id: String,
    /// What to create.
    pub config: ChardevConfig,
    /// Deprecation warnings QEMU prints for this argument.
    pub warnings: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Number,
    Size,
}

/// QEMU 7.2's chardev option list.
const KEYS: &[(&str, Kind)] = &[
    ("backend", Kind::Str),
    ("path", Kind::Str),
    ("host", Kind::Str),
    ("port", Kind::Str),
    ("fd", Kind::Str),
    ("localaddr", Kind::Str),
    ("localport", Kind::Str),
    ("to", Kind::Number),
    ("ipv4", Kind::Bool),
    ("ipv6", Kind::Bool),
    ("wait", Kind::Bool),
    ("server", Kind::Bool),
    ("delay", Kind::Bool),
    ("nodelay", Kind::Bool),
    ("reconnect", Kind::Number),
    ("telnet", Kind::Bool),
    ("tn3270", Kind::Bool),
    ("tls-creds", Kind::Str),
    ("tls-authz", Kind::Str),
    ("websocket", Kind::Bool),
    ("width", Kind::Number),
    ("height", Kind::Number),
    ("cols", Kind::Number),
    ("rows", Kind::Number),
    ("mux", Kind::Bool),
    ("signal", Kind::Bool),
    ("name", Kind::Str),
    ("debug", Kind::Number),
    ("size", Kind::Size),
    ("chardev", Kind::Str),
    ("append", Kind::Bool),
    ("logfile", Kind::Str),
    ("logappend", Kind::Bool),
    ("abstract", Kind::Bool),
    ("tight", Kind::Bool),
];

fn invalid(msg: impl Into<String>) -> ChardevError {
    ChardevError::Invalid(msg.into())
}

/// Splits at single commas; `,,` is a comma.
fn split_items(s: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(i) = items.last_mut() {
                    i.push(',');
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(i) = items.last_mut() {
            i.push(c);
        }
    }
    items
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ChardevError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

fn parse_number(key: &str, v: &str) -> Result<u64, ChardevError> {
    let err = || invalid(format!("Parameter '{key}' expects a number"));
    let (digits, radix) = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        (h, 16)
    } else if v.len() > 1 && v.starts_with('0') {
        (&v[1..], 8)
    } else {
        (v, 10)
    };
    if digits.is_empty() {
        return Err(err());
    }
    u64::from_str_radix(digits, radix).map_err(|_| err())
}

/// QEMU's size syntax: a number with an optional fraction and suffix
/// (B, K, M, G, T, P, E; powers of 1024).
fn parse_size(key: &str, v: &str) -> Result<u64, ChardevError> {
    let err = || {
        invalid(format!(
            "Parameter '{key}' expects a non-negative number below 2^64"
        ))
    };
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(err()),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') {
        return Err(err());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int.parse().map_err(|_| err())?;
    let whole = int.checked_mul(1u64 << shift).ok_or_else(err)?;
    if frac.is_empty() {
        return Ok(whole);
    }
    let f: f64 = format!("0.{frac}").parse().map_err(|_| err())?;
    let extra = f * (1u64 << shift) as f64;
    whole.checked_add(extra as u64).ok_or_else(err)
}

fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

struct Opts {
    items: Vec<(String, String)>,
}

impl Opts {
    fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn bool(&self, key: &str) -> Result<Option<bool>, ChardevError> {
        self.get(key).map(|v| parse_bool(key, v)).transpose()
    }
    fn number(&self, key: &str) -> Result<Option<u64>, ChardevError> {
        self.get(key).map(|v| parse_number(key, v)).transpose()
    }
}

/// Parses a `-chardev` argument (QEMU 7.2's syntax and messages).
///
/// ```
/// use chardev_ringbuf::{parse_chardev_opts, BackendConfig, RingbufName};
/// let p = parse_chardev_opts("ringbuf,id=rb0,size=4K").unwrap();
/// assert_eq!(p.id, "rb0");
/// assert_eq!(p.config.backend, BackendConfig::Ringbuf { name: RingbufName::Ringbuf, size: Some(4096) });
/// let e = parse_chardev_opts("ringbuf,id=rb0,foo=1").unwrap_err();
/// assert_eq!(e.to_string(), "Invalid parameter 'foo'");
/// ```
pub fn parse_chardev_opts(arg: &str) -> Result<ParsedChardev, ChardevError> {
    let mut warnings = Vec::new();
    let mut items: Vec<(String, String)> = Vec::new();
    let mut id: Option<String> = None;
    for (n, item) in split_items(arg).into_iter().enumerate() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None if n == 0 => ("backend".to_owned(), item),
            None if item.is_empty() => continue,
            None => {
                let (key, value) = match item.strip_prefix("no") {
                    Some(k) if KEYS.iter().any(|(n, _)| *n == k) => (k.to_owned(), "off"),
                    _ => (item.clone(), "on"),
                };
                if KEYS.iter().any(|(n, _)| *n == key) {
                    warnings.push(format!(
                        "short-form boolean option '{item}' deprecated\nPlease use {key}={value} instead"
                    ));
                }
                (key, value.to_owned())
            }
        };
        if key == "id" {
            if !id_wellformed(&value) {
                return Err(invalid("Parameter 'id' expects an identifier"));
            }
            id.get_or_insert(value);
            continue;
        }
        let Some((_, kind)) = KEYS.iter().find(|(n, _)| *n == key) else {
            return Err(invalid(format!("Invalid parameter '{key}'")));
        };
        match kind {
            Kind::Str => {}
            Kind::Bool => {
                parse_bool(&key, &value)?;
            }
            Kind::Number => {
                parse_number(&key, &value)?;
            }
            Kind::Size => {
                parse_size(&key, &value)?;
            }
        }
        items.push((key, value));
    }
    let opts = Opts { items };
    let id = id.ok_or_else(|| invalid("chardev: no id specified"))?;
    let backend = match opts.get("backend") {
        Some(b) if !b.is_empty() => b.to_owned(),
        _ => return Err(invalid(format!("chardev: \"{id}\" missing backend"))),
    };
    if opts.bool("mux")? == Some(true) {
        return Err(invalid("chardev: mux=on is not supported"));
    }
    let backend = match backend.as_str() {
        "ringbuf" | "memory" => BackendConfig::Ringbuf {
            name: if backend == "memory" {
                RingbufName::Memory
            } else {
                RingbufName::Ringbuf
            },
            size: match opts.get("size") {
                Some(v) => Some(
                    i64::try_from(parse_size("size", v)?)
                        .map_err(|_| invalid("size of ringbuf chardev must be power of two"))?,
                ),
                None => None,
            },
        },
        "null" => BackendConfig::Null,
        "pty" => BackendConfig::Pty,
        "stdio" => BackendConfig::Stdio {
            signal: opts.bool("signal")?,
        },
        "file" => BackendConfig::File {
            out: opts
                .get("path")
                .ok_or_else(|| invalid("chardev: file: no filename given"))?
                .to_owned(),
            input: None,
            append: opts.bool("append")?,
        },
        "socket" => BackendConfig::Socket(parse_socket(&opts)?),
        other => {
            return Err(invalid(format!(
                "'{other}' is not a valid char driver name"
            )));
        }
    };
    Ok(ParsedChardev {
        id,
        config: ChardevConfig {
            backend,
            logfile: opts.get("logfile").map(str::to_owned),
            logappend: opts.bool("logappend")?,
        },
        warnings,
    })
}

fn parse_socket(opts: &Opts) -> Result<SocketConfig, ChardevError> {
    let path = opts.get("path");
    let host = opts.get("host");
    let port = opts.get("port");
    let fd = opts.get("fd");
    if usize::from(path.is_some()) + usize::from(fd.is_some()) + usize::from(host.is_some()) > 1 {
        return Err(invalid(
            "None or one of 'path', 'fd' or 'host' option required.",
        ));
    }
    if host.is_some() && port.is_none() {
        return Err(invalid("chardev: socket: no port given"));
    }
    for unsupported in ["tn3270", "websocket"] {
        if opts.bool(unsupported)? == Some(true) {
            return Err(invalid(format!(
                "chardev: socket: {unsupported} is not supported"
            )));
        }
    }
    if opts.get("tls-authz").is_some() {
        return Err(invalid("chardev: socket: tls-authz is not supported"));
    }
    let server = opts.bool("server")?.unwrap_or(false);
    let nodelay = match (opts.bool("delay")?, opts.bool("nodelay")?) {
        (Some(d), None) => Some(!d),
        (None, Some(n)) => Some(n),
        (Some(_), Some(_)) => {
            return Err(invalid("'delay' and 'nodelay' are mutually exclusive"));
        }
        (None, None) => None,
    };
    let addr = if let Some(path) = path {
        SocketAddrConfig::Unix {
            path: path.to_owned(),
            r#abstract: Some(opts.bool("abstract")?.unwrap_or(false)),
            tight: Some(opts.bool("tight")?.unwrap_or(true)),
        }
    } else if let Some(host) = host {
        let to = match opts.number("to")? {
            Some(t) => Some(
                u16::try_from(t).map_err(|_| invalid("Parameter 'to' expects a port number"))?,
            ),
            None => None,
        };
        SocketAddrConfig::Inet {
            host: host.to_owned(),
            port: port.unwrap_or_default().to_owned(),
            to,
            ipv4: opts.bool("ipv4")?,
            ipv6: opts.bool("ipv6")?,
        }
    } else {
        SocketAddrConfig::Fd {
            name: fd.unwrap_or_default().to_owned(),
        }
    };
    Ok(SocketConfig {
        addr,
        server: Some(server),
        wait: if opts.get("wait").is_some() || server {
            Some(opts.bool("wait")?.unwrap_or(true))
        } else {
            None
        },
        nodelay,
        telnet: opts.bool("telnet")?,
        reconnect: match opts.number("reconnect")? {
            Some(r) => Some(
                i64::try_from(r).map_err(|_| invalid("Parameter 'reconnect' expects a number"))?,
            ),
            None => None,
        },
        tls_creds: opts.get("tls-creds").map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        parse_chardev_opts(s).unwrap_err().to_string()
    }

    // Messages observed on qemu-storage-daemon 7.2 with the same arguments.
    #[test]
    fn qemu_messages() {
        assert_eq!(
            err("ringbuf,id=rb0,size=abc"),
            "Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(
            err("ringbuf,id=rb0,size=-1"),
            "Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(err("ringbuf,size=4096"), "chardev: no id specified");
        assert_eq!(err(""), "chardev: no id specified");
        assert_eq!(
            err("ringbuf,id=,size=4096"),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            err("ringbuf,id=a b"),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(err("ringbuf,id=9x"), "Parameter 'id' expects an identifier");
        assert_eq!(err("null,id=n,,x"), "Parameter 'id' expects an identifier");
        assert_eq!(err("ringbuf,id=rb0,foo=1"), "Invalid parameter 'foo'");
        assert_eq!(err("foo,id=x"), "'foo' is not a valid char driver name");
        assert_eq!(err("id=x"), "chardev: \"x\" missing backend");
        assert_eq!(
            err("null,id=n,logappend=maybe"),
            "Parameter 'logappend' expects 'on' or 'off'"
        );
        assert_eq!(err("file,id=f"), "chardev: file: no filename given");
        assert_eq!(
            err("file,id=f,path=/tmp/o,input-path=/tmp/i"),
            "Invalid parameter 'input-path'"
        );
        assert_eq!(
            err("socket,id=s,host=localhost"),
            "chardev: socket: no port given"
        );
        assert_eq!(
            err("socket,id=s,path=/tmp/s,host=x,port=1"),
            "None or one of 'path', 'fd' or 'host' option required."
        );
        assert_eq!(
            err("stdio,id=c,signal=maybe"),
            "Parameter 'signal' expects 'on' or 'off'"
        );
        assert_eq!(err("udp,id=u"), "'udp' is not a valid char driver name");
    }

    #[test]
    fn backends() {
        let p = parse_chardev_opts("ringbuf,id=rb0,size=4096").unwrap();
        assert_eq!(
            p.config,
            ChardevConfig::new(BackendConfig::Ringbuf {
                name: RingbufName::Ringbuf,
                size: Some(4096)
            })
        );
        let p = parse_chardev_opts("memory,id=m0").unwrap();
        assert_eq!(
            p.config.backend,
            BackendConfig::Ringbuf {
                name: RingbufName::Memory,
                size: None
            }
        );
        let p = parse_chardev_opts("file,id=f,path=/tmp/out,append=on").unwrap();
        assert_eq!(
            p.config.backend,
            BackendConfig::File {
                out: "/tmp/out".into(),
                input: None,
                append: Some(true)
            }
        );
        let p = parse_chardev_opts("pty,id=p").unwrap();
        assert_eq!(p.config.backend, BackendConfig::Pty);
        let p = parse_chardev_opts("null,id=n,logfile=/tmp/l,logappend=on").unwrap();
        assert_eq!(p.config.logfile.as_deref(), Some("/tmp/l"));
        assert_eq!(p.config.logappend, Some(true));
        let p = parse_chardev_opts("stdio,id=c,signal=off").unwrap();
        assert_eq!(
            p.config.backend,
            BackendConfig::Stdio {
                signal: Some(false)
            }
        );
        // The first id wins, as in QEMU.
        assert_eq!(parse_chardev_opts("null,id=n,id=m").unwrap().id, "n");
    }

    #[test]
    fn socket_defaults_differ_from_qmp() {
        let p = parse_chardev_opts("socket,id=s0,path=/tmp/s,server=on,wait=off").unwrap();
        let BackendConfig::Socket(s) = p.config.backend else {
            panic!("not a socket")
        };
        assert_eq!(s.server, Some(true));
        assert_eq!(s.wait, Some(false));
        assert_eq!(
            s.addr,
            SocketAddrConfig::Unix {
                path: "/tmp/s".into(),
                r#abstract: Some(false),
                tight: Some(true)
            }
        );
        // A server waits by default on the command line.
        let p = parse_chardev_opts("socket,id=s0,path=/tmp/s,server=on").unwrap();
        let BackendConfig::Socket(s) = p.config.backend else {
            panic!("not a socket")
        };
        assert_eq!(s.wait, Some(true));
        // A client has no wait at all.
        let p = parse_chardev_opts("socket,id=s0,host=127.0.0.1,port=4444,reconnect=2").unwrap();
        let BackendConfig::Socket(s) = p.config.backend else {
            panic!("not a socket")
        };
        assert_eq!(s.server, Some(false));
        assert_eq!(s.wait, None);
        assert_eq!(s.reconnect, Some(2));
        // Deprecated short forms.
        let p = parse_chardev_opts("socket,id=s,path=/tmp/s3,server,nowait").unwrap();
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[1].starts_with("short-form boolean option 'nowait' deprecated"));
        let BackendConfig::Socket(s) = p.config.backend else {
            panic!("not a socket")
        };
        assert_eq!((s.server, s.wait), (Some(true), Some(false)));
        // No address: an fd address without a name (QEMU then says
        // "Unable to parse FD number ").
        let p = parse_chardev_opts("socket,id=s").unwrap();
        let BackendConfig::Socket(s) = p.config.backend else {
            panic!("not a socket")
        };
        assert_eq!(
            s.addr,
            SocketAddrConfig::Fd {
                name: String::new()
            }
        );
    }

    #[test]
    fn sizes_and_escapes() {
        assert_eq!(parse_size("size", "4K").unwrap(), 4096);
        assert_eq!(parse_size("size", "1.5k").unwrap(), 1536);
        assert_eq!(parse_size("size", "2M").unwrap(), 2 << 20);
        assert!(parse_size("size", "16E").is_err());
        assert!(parse_size("size", "1Q").is_err());
        assert_eq!(
            split_items("file,id=f,path=/tmp/a,,b"),
            ["file", "id=f", "path=/tmp/a,b"]
        );
        let p = parse_chardev_opts("file,id=f,path=/tmp/a,,b").unwrap();
        assert!(
            matches!(p.config.backend, BackendConfig::File { ref out, .. } if out == "/tmp/a,b")
        );
    }
}
