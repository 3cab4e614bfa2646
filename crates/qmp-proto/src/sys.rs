//! `sendmsg`/`recvmsg` with `SCM_RIGHTS`: passing file descriptors over a
//! Unix stream socket, as QMP's `getfd` and `add-fd` expect.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors accepted with one read (QEMU's `TCP_MAX_FDS`).
pub(crate) const MAX_FDS_PER_MSG: usize = 16;

/// Control buffer, aligned for `cmsghdr`, big enough for `MAX_FDS_PER_MSG`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

fn cmsg_space(n_fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE((n_fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` with `fds` attached (to the first byte). Returns the number
/// of bytes sent, which may be fewer than `data.len()`; the descriptors go
/// with whatever was sent.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_MSG} file descriptors can be passed at once"),
        ));
    }
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "file descriptors need at least one byte of data to travel with",
        ));
    }
    let mut cbuf = CmsgBuf([0; 128]);
    let space = cmsg_space(fds.len());
    debug_assert!(space <= cbuf.0.len());
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to a zeroed, aligned buffer of at least
        // `space` bytes, so the first header and its data area are in bounds;
        // the descriptors are copied with unaligned writes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data_ptr.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: msg describes live buffers (data, cbuf) for the duration of
        // the call; the socket descriptor is borrowed and valid.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives into `buf`; descriptors that came along are appended to `fds`
/// (with close-on-exec set). Returns the number of bytes read (0 at end of
/// stream).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut cbuf = CmsgBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(MAX_FDS_PER_MSG) as _;
    let n = loop {
        // SAFETY: msg points at live, writable buffers (buf, cbuf) whose
        // sizes are given in iov_len and msg_controllen.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!(
            "more than {MAX_FDS_PER_MSG} file descriptors sent at once; the rest were dropped"
        );
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed control messages; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // them, and each SCM_RIGHTS payload holds `count` descriptors that are
    // now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / std::mem::size_of::<RawFd>();
                let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data_ptr.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut p1, p2) = UnixStream::pair().unwrap();
        let n = send_with_fds(a.as_fd(), b"hello", &[p2.as_fd()]).unwrap();
        assert_eq!(n, 5);
        drop(p2);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the other end of p1.
        let mut received = UnixStream::from(fds.pop().unwrap());
        received.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        p1.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        // Plain data carries no descriptors.
        (&a).write_all(b"z").unwrap();
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
    }

    #[test]
    fn refuses_too_many() {
        let (a, _b) = UnixStream::pair().unwrap();
        let many: Vec<BorrowedFd<'_>> = (0..17).map(|_| a.as_fd()).collect();
        assert!(send_with_fds(a.as_fd(), b"x", &many).is_err());
    }
}
