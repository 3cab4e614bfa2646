//! The description of a chardev to create: what `chardev-add` takes (QEMU's
//! `ChardevBackend`) and what a `-chardev` option string parses to, without
//! any dependency on the QAPI crates.
//!
//! Optional members stay optional (`None` = not given), exactly as in the
//! QAPI types, because QEMU's defaults and checks depend on presence: a
//! socket's `server` defaults to on through QMP, `wait` given for a client
//! is an error even when false, `reconnect` given for a server too.

/// A chardev's configuration: its backend and the options every backend has.
#[derive(Debug, Clone, PartialEq)]
pub struct ChardevConfig {
    /// The backend and its options.
    pub backend: BackendConfig,
    /// A file that receives a copy of everything the frontend writes
    /// (QEMU's `logfile`).
    pub logfile: Option<String>,
    /// Append to `logfile` instead of truncating it (default false).
    pub logappend: Option<bool>,
}

impl ChardevConfig {
    /// A configuration with no log file.
    pub fn new(backend: BackendConfig) -> Self {
        ChardevConfig {
            backend,
            logfile: None,
            logappend: None,
        }
    }
}

/// Which of the two names of the ring-buffer backend was used (QEMU reports
/// it back in `query-chardev`'s `filename`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingbufName {
    /// `ringbuf`.
    Ringbuf,
    /// `memory`, the older alias.
    Memory,
}

/// A backend and its options.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    /// An overwriting in-memory ring (`ringbuf` or `memory`).
    Ringbuf {
        /// Which name was used.
        name: RingbufName,
        /// Size in bytes, a power of two (default 65536).
        size: Option<i64>,
    },
    /// Discards output, never has input.
    Null,
    /// Output to a file, optional input from another.
    File {
        /// The output file (created; truncated unless `append`).
        out: String,
        /// The input file, if any.
        input: Option<String>,
        /// Append instead of truncating (default false).
        append: Option<bool>,
    },
    /// A stream socket, server or client.
    Socket(SocketConfig),
    /// A new pseudo-terminal; its path is printed and returned.
    Pty,
    /// The process's standard input and output.
    Stdio {
        /// Let the terminal deliver signals such as SIGINT on ^C (default
        /// true); `false` puts the terminal in a mode where ^C is input.
        signal: Option<bool>,
    },
}

impl BackendConfig {
    /// The backend's name as QEMU spells it (`ringbuf`, `memory`, `socket`...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            BackendConfig::Ringbuf {
                name: RingbufName::Ringbuf,
                ..
            } => "ringbuf",
            BackendConfig::Ringbuf {
                name: RingbufName::Memory,
                ..
            } => "memory",
            BackendConfig::Null => "null",
            BackendConfig::File { .. } => "file",
            BackendConfig::Socket(_) => "socket",
            BackendConfig::Pty => "pty",
            BackendConfig::Stdio { .. } => "stdio",
        }
    }
}

/// The backend names this crate implements, for `query-chardev-backends`.
pub const BACKEND_NAMES: &[&str] = &[
    "file", "socket", "pty", "null", "stdio", "ringbuf", "memory",
];

/// A socket chardev (QEMU's `ChardevSocket`).
#[derive(Debug, Clone, PartialEq)]
pub struct SocketConfig {
    /// Where to listen (server) or connect (client).
    pub addr: SocketAddrConfig,
    /// Listen instead of connecting. QMP's default is true.
    pub server: Option<bool>,
    /// For a server, block until the first client connects (default false).
    /// Giving it for a client is an error.
    pub wait: Option<bool>,
    /// Set `TCP_NODELAY` (default false).
    pub nodelay: Option<bool>,
    /// Speak telnet on a server's connections (default false).
    pub telnet: Option<bool>,
    /// For a client, seconds between reconnection attempts; 0 or less: no
    /// reconnection. Giving it for a server is an error.
    pub reconnect: Option<i64>,
    /// TLS credentials object (not supported: always refused).
    pub tls_creds: Option<String>,
}

impl SocketConfig {
    /// A configuration with every option left at its default.
    pub fn new(addr: SocketAddrConfig) -> Self {
        SocketConfig {
            addr,
            server: None,
            wait: None,
            nodelay: None,
            telnet: None,
            reconnect: None,
            tls_creds: None,
        }
    }
}

/// A socket address (QEMU's `SocketAddressLegacy`).
#[derive(Debug, Clone, PartialEq)]
pub enum SocketAddrConfig {
    /// A TCP address.
    Inet {
        /// Host name or numeric address; empty means any address.
        host: String,
        /// Port number (a string, as QEMU takes it).
        port: String,
        /// For a server, the last port of a range to try.
        to: Option<u16>,
        /// Use IPv4 addresses (default: both families).
        ipv4: Option<bool>,
        /// Use IPv6 addresses (default: both families).
        ipv6: Option<bool>,
    },
    /// A Unix domain socket.
    Unix {
        /// The path (or the abstract name with `abstract`).
        path: String,
        /// Linux abstract namespace (default false).
        r#abstract: Option<bool>,
        /// For an abstract name, use only its length (default true).
        tight: Option<bool>,
    },
    /// A vsock address (not supported: refused).
    Vsock {
        /// Context id.
        cid: String,
        /// Port.
        port: String,
    },
    /// A file descriptor passed in advance, by name or number.
    Fd {
        /// The name given to `getfd`/`add-fd`, or a decimal fd number.
        name: String,
    },
}
