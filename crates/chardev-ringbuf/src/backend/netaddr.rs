//! Socket addresses of the socket backend: resolution, listening,
//! connecting, and QEMU's `filename` strings.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net as unet;
use std::path::PathBuf;

use super::sys;
use super::{FdResolver, OutFd};
use crate::config::SocketAddrConfig;
use crate::error::strerror;

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL).
const UNIX_PATH_MAX: usize = 108;

/// A connected stream.
pub(crate) enum Stream {
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
}

impl Stream {
    pub(crate) fn fd(&self) -> i32 {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }

    pub(crate) fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Unix(s) => s.take_error(),
            Stream::Tcp(s) => s.take_error(),
        }
    }

    pub(crate) fn is_connected(&self) -> io::Result<bool> {
        let r = match self {
            Stream::Unix(s) => s.peer_addr().map(|_| ()),
            Stream::Tcp(s) => s.peer_addr().map(|_| ()),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// QEMU's `filename` of a connected socket.
    pub(crate) fn filename(&self, proto: &str, server: bool, unix_local: &str) -> String {
        let srv = if server { ",server=on" } else { "" };
        match self {
            // QEMU prints the accepting socket's path for a server and an
            // empty peer path for a client (qemu-storage-daemon 7.2 shows
            // "unix:" for a connected Unix client).
            Stream::Unix(_) if server => format!("unix:{unix_local}{srv}"),
            Stream::Unix(_) => "unix:".into(),
            Stream::Tcp(s) => {
                let fmt = |a: io::Result<SocketAddr>| match a {
                    Ok(SocketAddr::V4(a)) => format!("{}:{}", a.ip(), a.port()),
                    Ok(SocketAddr::V6(a)) => format!("[{}]:{}", a.ip(), a.port()),
                    Err(_) => "?:?".into(),
                };
                format!(
                    "{proto}:{}{srv} <-> {}",
                    fmt(s.local_addr()),
                    fmt(s.peer_addr())
                )
            }
        }
    }
}

impl OutFd for Stream {
    fn write_nb(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_nb(data),
            Stream::Tcp(s) => s.write_nb(data),
        }
    }
}

/// A listening socket.
pub(crate) enum Listener {
    Unix(mio::net::UnixListener),
    Tcp(mio::net::TcpListener),
}

impl Listener {
    pub(crate) fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// Where a client connects.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Unix(unet::SocketAddr),
    Tcp(Vec<SocketAddr>),
}

/// A file the listener created, removed again on close if it is still ours.
pub(crate) struct UnlinkOnClose {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl UnlinkOnClose {
    pub(crate) fn run(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The address part of QEMU's disconnected `filename` (without the
/// `disconnected:` prefix and the `,server=on` suffix).
pub(crate) fn describe(addr: &SocketAddrConfig, proto: &str) -> String {
    match addr {
        SocketAddrConfig::Inet { host, port, .. } => format!("{proto}:{host}:{port}"),
        SocketAddrConfig::Unix {
            path,
            r#abstract,
            tight,
        } => {
            let mut s = format!("unix:{path}");
            if r#abstract == &Some(true) {
                s.push_str(",abstract=on");
                if tight != &Some(false) {
                    s.push_str(",tight=on");
                }
            }
            s
        }
        SocketAddrConfig::Vsock { cid, port } => format!("vsock:{cid}:{port}"),
        SocketAddrConfig::Fd { name } => format!("fd:{name}"),
    }
}

fn unix_addr(path: &str, is_abstract: bool, tight: bool) -> Result<unet::SocketAddr, String> {
    if path.len() >= UNIX_PATH_MAX {
        return Err(format!("UNIX socket path '{path}' is too long"));
    }
    if is_abstract {
        if !tight {
            return Err("abstract socket addresses with tight=off are not supported".into());
        }
        use std::os::linux::net::SocketAddrExt;
        unet::SocketAddr::from_abstract_name(path.as_bytes()).map_err(|e| strerror(&e))
    } else {
        unet::SocketAddr::from_pathname(path).map_err(|e| strerror(&e))
    }
}

/// Resolves a TCP address as QEMU's getaddrinfo does for it.
pub(crate) fn resolve_inet(
    host: &str,
    port: &str,
    ipv4: Option<bool>,
    ipv6: Option<bool>,
    server: bool,
) -> Result<Vec<SocketAddr>, String> {
    let fail = |msg: &str| format!("address resolution failed for {host}:{port}: {msg}");
    let portnum: u16 = port
        .parse()
        .map_err(|_| fail("Servname not supported for ai_socktype"))?;
    let h = host.trim_start_matches('[').trim_end_matches(']');
    let h = match (h.is_empty(), server) {
        (true, true) => "0.0.0.0",
        (true, false) => "localhost",
        (false, _) => h,
    };
    let addrs = (h, portnum).to_socket_addrs().map_err(|e| {
        let s = strerror(&e);
        fail(
            s.strip_prefix("failed to lookup address information: ")
                .unwrap_or(&s),
        )
    })?;
    let want_v4 = !(ipv6 == Some(true) && ipv4 != Some(true)) && ipv4 != Some(false);
    let want_v6 = !(ipv4 == Some(true) && ipv6 != Some(true)) && ipv6 != Some(false);
    let v: Vec<SocketAddr> = addrs
        .filter(|a| if a.is_ipv4() { want_v4 } else { want_v6 })
        .collect();
    if v.is_empty() {
        return Err(fail("Address family for hostname not supported"));
    }
    Ok(v)
}

/// A listening socket, the `filename` address part QEMU shows for it (the
/// bound address for TCP) and the file to remove on close.
pub(crate) fn listen(
    addr: &SocketAddrConfig,
    proto: &str,
    resolver: Option<&mut FdResolver>,
) -> Result<(Listener, String, Option<UnlinkOnClose>), String> {
    match addr {
        SocketAddrConfig::Unix {
            path,
            r#abstract,
            tight,
        } => {
            let is_abstract = r#abstract == &Some(true);
            let sa = unix_addr(path, is_abstract, tight.unwrap_or(true))?;
            if !is_abstract {
                // QEMU removes a stale socket file first; anything that is
                // not a socket is left alone (bind then fails).
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    if m.file_type().is_socket() {
                        std::fs::remove_file(path).map_err(|e| {
                            format!("Failed to unlink socket {path}: {}", strerror(&e))
                        })?;
                    }
                }
            }
            let l = unet::UnixListener::bind_addr(&sa)
                .map_err(|e| format!("Failed to bind socket to {path}: {}", strerror(&e)))?;
            l.set_nonblocking(true).map_err(|e| strerror(&e))?;
            let cleanup = if is_abstract {
                None
            } else {
                std::fs::symlink_metadata(path).ok().map(|m| UnlinkOnClose {
                    path: PathBuf::from(path),
                    dev: m.dev(),
                    ino: m.ino(),
                })
            };
            Ok((
                Listener::Unix(mio::net::UnixListener::from_std(l)),
                describe(addr, proto),
                cleanup,
            ))
        }
        SocketAddrConfig::Inet {
            host,
            port,
            to,
            ipv4,
            ipv6,
        } => {
            let addrs = resolve_inet(host, port, *ipv4, *ipv6, true)?;
            let first = addrs[0].port();
            let last = to.map_or(first, |t| t.max(first));
            let mut err = io::Error::from_raw_os_error(libc::EADDRINUSE);
            for p in first..=last {
                for a in &addrs {
                    let mut a = *a;
                    a.set_port(p);
                    match mio::net::TcpListener::bind(a) {
                        Ok(l) => {
                            let local = l.local_addr().map_err(|e| strerror(&e))?;
                            let desc = format!("{proto}:{}:{}", local.ip(), local.port());
                            return Ok((Listener::Tcp(l), desc, None));
                        }
                        Err(e) => err = e,
                    }
                }
            }
            Err(format!(
                "Failed to find an available port: {}",
                strerror(&err)
            ))
        }
        SocketAddrConfig::Fd { name } => {
            let fd = resolve_fd(name, resolver)?;
            match sys::socket_domain(fd.as_raw_fd()) {
                Some(libc::AF_UNIX) => {
                    let l = unet::UnixListener::from(fd);
                    l.set_nonblocking(true).map_err(|e| strerror(&e))?;
                    Ok((
                        Listener::Unix(mio::net::UnixListener::from_std(l)),
                        describe(addr, proto),
                        None,
                    ))
                }
                Some(libc::AF_INET | libc::AF_INET6) => {
                    let l = std::net::TcpListener::from(fd);
                    l.set_nonblocking(true).map_err(|e| strerror(&e))?;
                    Ok((
                        Listener::Tcp(mio::net::TcpListener::from_std(l)),
                        describe(addr, proto),
                        None,
                    ))
                }
                _ => Err(format!("File descriptor '{name}' is not a socket")),
            }
        }
        SocketAddrConfig::Vsock { .. } => Err(VSOCK_UNSUPPORTED.into()),
    }
}

pub(crate) const VSOCK_UNSUPPORTED: &str = "vsock socket addresses are not supported";

/// A descriptor named in a socket address: by the VMM's resolver (names of
/// `getfd`/`add-fd`), or a decimal fd number of the process (duplicated,
/// the original stays open).
pub(crate) fn resolve_fd(name: &str, resolver: Option<&mut FdResolver>) -> Result<OwnedFd, String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        let n: i32 = name
            .parse()
            .map_err(|_| format!("Unable to parse FD number {name}"))?;
        let fd =
            sys::dup_fd(n).map_err(|e| format!("Unable to use FD {name}: {}", strerror(&e)))?;
        if sys::socket_domain(fd.as_raw_fd()).is_none() {
            return Err(format!("File descriptor '{name}' is not a socket"));
        }
        return Ok(fd);
    }
    if name.is_empty() {
        return Err(format!("Unable to parse FD number {name}"));
    }
    match resolver {
        Some(r) => r(name),
        None => Err(format!("File descriptor named '{name}' has not been found")),
    }
}

/// Where a client connects, and the text of its connection errors.
pub(crate) fn target(addr: &SocketAddrConfig) -> Result<(Target, String), String> {
    match addr {
        SocketAddrConfig::Unix {
            path,
            r#abstract,
            tight,
        } => Ok((
            Target::Unix(unix_addr(
                path,
                r#abstract == &Some(true),
                tight.unwrap_or(true),
            )?),
            path.clone(),
        )),
        SocketAddrConfig::Inet {
            host,
            port,
            ipv4,
            ipv6,
            ..
        } => Ok((
            Target::Tcp(resolve_inet(host, port, *ipv4, *ipv6, false)?),
            format!("{host}:{port}"),
        )),
        SocketAddrConfig::Vsock { .. } => Err(VSOCK_UNSUPPORTED.into()),
        SocketAddrConfig::Fd { .. } => Err("internal: fd addresses have no target".into()),
    }
}

/// A blocking connect (a client without `reconnect`), then non-blocking.
pub(crate) fn connect_sync(target: &Target, desc: &str) -> Result<Stream, String> {
    let fail = |e: io::Error| format!("Failed to connect to '{desc}': {}", strerror(&e));
    match target {
        Target::Unix(a) => {
            let s = unet::UnixStream::connect_addr(a).map_err(fail)?;
            s.set_nonblocking(true).map_err(|e| strerror(&e))?;
            Ok(Stream::Unix(mio::net::UnixStream::from_std(s)))
        }
        Target::Tcp(addrs) => {
            let s = std::net::TcpStream::connect(&addrs[..]).map_err(fail)?;
            s.set_nonblocking(true).map_err(|e| strerror(&e))?;
            Ok(Stream::Tcp(mio::net::TcpStream::from_std(s)))
        }
    }
}

/// A connected stream from a passed descriptor.
pub(crate) fn stream_from_fd(fd: OwnedFd, name: &str) -> Result<Stream, String> {
    match sys::socket_domain(fd.as_raw_fd()) {
        Some(libc::AF_UNIX) => {
            let s = unet::UnixStream::from(fd);
            s.set_nonblocking(true).map_err(|e| strerror(&e))?;
            Ok(Stream::Unix(mio::net::UnixStream::from_std(s)))
        }
        Some(libc::AF_INET | libc::AF_INET6) => {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true).map_err(|e| strerror(&e))?;
            Ok(Stream::Tcp(mio::net::TcpStream::from_std(s)))
        }
        _ => Err(format!("File descriptor '{name}' is not a socket")),
    }
}
