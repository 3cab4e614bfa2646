//! The few system calls std does not wrap: fcntl flags, FIONREAD, poll,
//! openpty, termios, socket options.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sets `O_NONBLOCK` on a descriptor this crate owns.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL only reads and sets the status
    // flags of `fd`; an invalid fd yields EBADF.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Number of bytes readable without blocking.
pub(crate) fn fionread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points to a
    // live local.
    cvt(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether `fd` reports POLLHUP right now (a pty master whose slave side
/// nobody has open).
pub(crate) fn poll_hup(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return r < 0 || pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
    }
}

/// Opens a pseudo-terminal pair; the slave is in raw mode. Returns the
/// master, the slave and the slave's path.
pub(crate) fn openpty_raw() -> io::Result<(OwnedFd, OwnedFd, String)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes two fds to the pointers (live locals); the
    // name, termios and winsize pointers may be null.
    cvt(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    })?;
    // SAFETY: openpty succeeded: both fds are open and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_cloexec(master.as_raw_fd())?;
    set_cloexec(slave.as_raw_fd())?;
    let mut tio = get_termios(slave.as_raw_fd())?;
    // SAFETY: cfmakeraw only modifies the termios struct it is given.
    unsafe { libc::cfmakeraw(&mut tio) };
    set_termios(slave.as_raw_fd(), &tio)?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))?
        .to_string_lossy()
        .into_owned();
    Ok((master, slave, path))
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and set the fd flags of `fd`.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Whether `fd` is a terminal.
pub(crate) fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty only queries `fd`.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal attributes of `fd`.
pub(crate) fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; all-zero is a valid value to overwrite.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios to a live local.
    cvt(unsafe { libc::tcgetattr(fd, &mut tio) })?;
    Ok(tio)
}

/// Sets the terminal attributes of `fd` now.
pub(crate) fn set_termios(fd: RawFd, tio: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr reads one termios from a live reference.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSANOW, tio) })?;
    Ok(())
}

/// The terminal mode QEMU's stdio backend sets: raw input without echo,
/// output post-processing kept, signals only if `signal`.
pub(crate) fn stdio_termios(old: &libc::termios, signal: bool) -> libc::termios {
    let mut tty = *old;
    tty.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    tty.c_oflag |= libc::OPOST;
    tty.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    tty.c_cflag &= !(libc::CSIZE | libc::PARENB);
    tty.c_cflag |= libc::CS8;
    tty.c_cc[libc::VMIN] = 1;
    tty.c_cc[libc::VTIME] = 0;
    if !signal {
        tty.c_lflag &= !libc::ISIG;
    }
    tty
}

/// A new descriptor (close-on-exec) for process fd `fd`, leaving `fd`
/// itself alone.
pub(crate) fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on any integer either fails with EBADF or
    // returns a new descriptor.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to a live c_int.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(v)
}

/// The address family of a socket (`None`: not a socket).
pub(crate) fn socket_domain(fd: RawFd) -> Option<libc::c_int> {
    sockopt_int(fd, libc::SO_DOMAIN).ok()
}

/// Blocks until `fd` is readable (a listener has a client waiting).
pub(crate) fn wait_readable(fd: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, infinite timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(());
    }
}
