//! The I/O engines `bench` drives (qemu-img bench's `-i threads|native|io_uring`).
//!
//! Each engine takes requests (slot index, read or write, buffer, length, file offset) and
//! reports completions as (slot index, bytes transferred or negative errno). A slot's buffer
//! stays valid and untouched until its completion has been reported.

use std::os::unix::io::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use crate::Error;

/// `-i`: which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    /// No `-i`: positional syscalls in place for page-cache I/O (io_uring would hand them to
    /// kernel workers), io_uring for `O_DIRECT`.
    Auto,
    /// A pool of worker threads doing `pread`/`pwrite` (QEMU's default).
    Threads,
    /// Linux native AIO (`io_submit`), `O_DIRECT` only as in QEMU.
    Native,
    /// io_uring for every request.
    IoUring,
}

impl AioMode {
    /// Parses `-i` like QEMU's `bdrv_parse_aio`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "threads" => Ok(AioMode::Threads),
            "native" => Ok(AioMode::Native),
            "io_uring" => Ok(AioMode::IoUring),
            _ => Err(Error::msg(format!("Invalid aio option: {s}"))),
        }
    }
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Slot the completion is reported for.
    pub slot: usize,
    /// Write (else read).
    pub write: bool,
    /// Start of the slot's buffer.
    pub buf: *mut u8,
    /// Bytes to transfer.
    pub len: usize,
    /// File offset.
    pub offset: u64,
}

// SAFETY: a request only carries the address of a buffer that the submitter keeps alive and
// does not touch until the completion arrives (the contract of `Engine::submit`).
unsafe impl Send for Request {}

/// An engine on one file descriptor.
pub enum Engine {
    /// Synchronous syscalls at submission ([`Engine::run_sync`]).
    Inline(RawFd),
    /// io_uring.
    Uring(RawFd, Box<IoUring>, usize),
    /// Worker threads.
    Threads(ThreadPool),
    /// Linux AIO.
    Native(LinuxAio),
}

impl Engine {
    /// An engine of `mode` for `depth` requests in flight on `fd`; `direct` says whether the
    /// file is opened with `O_DIRECT`.
    pub fn new(mode: AioMode, fd: RawFd, depth: usize, direct: bool) -> Result<Self, Error> {
        Ok(match mode {
            AioMode::Auto if !direct => Engine::Inline(fd),
            AioMode::Auto | AioMode::IoUring => Engine::Uring(
                fd,
                Box::new(IoUring::new((depth as u32).next_power_of_two())?),
                0,
            ),
            AioMode::Threads => Engine::Threads(ThreadPool::new(fd, depth.min(64))),
            AioMode::Native => Engine::Native(LinuxAio::new(fd, depth)?),
        })
    }

    /// For the synchronous engine, performs the request right away and returns its result
    /// (bytes or a negative errno); `None` for the others, which take it through
    /// [`Engine::submit`].
    ///
    /// # Safety
    ///
    /// `r.buf` must point at `r.len` bytes that nothing else touches during the call.
    #[inline]
    pub unsafe fn run_sync(&self, r: &Request) -> Option<i64> {
        match self {
            Engine::Inline(fd) => Some(rw(*fd, r)),
            _ => None,
        }
    }

    /// Queues (or, inline, performs) a request.
    ///
    /// # Safety
    ///
    /// `r.buf` must point at `r.len` bytes that stay valid, and that nothing else reads or
    /// writes, until the completion of `r.slot` has been returned by [`Engine::wait`].
    pub unsafe fn submit(&mut self, r: Request) -> Result<(), Error> {
        match self {
            Engine::Inline(fd) => {
                return Err(Error::msg(format!(
                    "request of slot {} for the synchronous engine on fd {fd} was queued",
                    r.slot
                )))
            }
            Engine::Uring(fd, ring, queued) => {
                let e = if r.write {
                    opcode::Write::new(types::Fd(*fd), r.buf, r.len as u32)
                        .offset(r.offset)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(*fd), r.buf, r.len as u32)
                        .offset(r.offset)
                        .build()
                }
                .user_data(r.slot as u64);
                // SAFETY: the caller keeps the buffer valid until the completion (see above).
                unsafe {
                    ring.submission()
                        .push(&e)
                        .map_err(|_| Error::msg("submission queue full"))?;
                }
                *queued += 1;
            }
            Engine::Threads(p) => p.submit(r)?,
            Engine::Native(a) => a.queue(r),
        }
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion; completions are
    /// appended to `out` (a buffer the caller reuses, so no request allocates).
    pub fn wait(&mut self, out: &mut Vec<(usize, i64)>) -> Result<(), Error> {
        match self {
            Engine::Inline(_) => {}
            Engine::Uring(_, ring, queued) => {
                ring.submit_and_wait(1)?;
                *queued = 0;
                out.extend(
                    ring.completion()
                        .map(|c| (c.user_data() as usize, c.result() as i64)),
                );
            }
            Engine::Threads(p) => p.wait(out)?,
            Engine::Native(a) => a.submit_and_wait(out)?,
        }
        Ok(())
    }
}

/// One positional read or write; bytes or a negative errno.
fn rw(fd: RawFd, r: &Request) -> i64 {
    let mut done = 0usize;
    while done < r.len {
        // SAFETY: the submitter guarantees `buf` holds `len` bytes reserved for this request.
        let n = unsafe {
            if r.write {
                libc::pwrite(
                    fd,
                    r.buf.add(done) as *const libc::c_void,
                    r.len - done,
                    (r.offset + done as u64) as libc::off_t,
                )
            } else {
                libc::pread(
                    fd,
                    r.buf.add(done) as *mut libc::c_void,
                    r.len - done,
                    (r.offset + done as u64) as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return -(e.raw_os_error().unwrap_or(libc::EIO) as i64);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    done as i64
}

/// Worker threads doing positional syscalls, like QEMU's thread pool.
pub struct ThreadPool {
    jobs: Option<Sender<Request>>,
    done: Receiver<(usize, i64)>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    fn new(fd: RawFd, n: usize) -> Self {
        let (jtx, jrx) = channel::<Request>();
        let (dtx, drx) = channel();
        let jrx = Arc::new(Mutex::new(jrx));
        let workers = (0..n.max(1))
            .map(|_| {
                let jrx = jrx.clone();
                let dtx = dtx.clone();
                std::thread::spawn(move || loop {
                    let r = {
                        let g = jrx.lock().unwrap_or_else(|e| e.into_inner());
                        g.recv()
                    };
                    let Ok(r) = r else { return };
                    if dtx.send((r.slot, rw(fd, &r))).is_err() {
                        return;
                    }
                })
            })
            .collect();
        ThreadPool {
            jobs: Some(jtx),
            done: drx,
            workers,
        }
    }

    fn submit(&mut self, r: Request) -> Result<(), Error> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(r).ok())
            .ok_or_else(|| Error::msg("I/O worker threads are gone"))
    }

    fn wait(&mut self, out: &mut Vec<(usize, i64)>) -> Result<(), Error> {
        let first = self
            .done
            .recv()
            .map_err(|_| Error::msg("I/O worker threads are gone"))?;
        out.push(first);
        out.extend(self.done.try_iter());
        Ok(())
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The kernel's `struct iocb`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;

/// Linux native AIO (`io_setup`/`io_submit`/`io_getevents`).
pub struct LinuxAio {
    ctx: libc::c_ulong,
    fd: RawFd,
    /// One control block per slot (the kernel reads them during `io_submit`).
    iocbs: Vec<Iocb>,
    queued: Vec<usize>,
    events: Vec<IoEvent>,
}

impl LinuxAio {
    fn new(fd: RawFd, depth: usize) -> Result<Self, Error> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context id into `ctx`, a local that outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, depth as libc::c_long, &mut ctx) };
        if r < 0 {
            return Err(Error::msg(format!(
                "Unable to use native AIO: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(LinuxAio {
            ctx,
            fd,
            iocbs: vec![Iocb::default(); depth],
            queued: Vec::with_capacity(depth),
            events: vec![IoEvent::default(); depth],
        })
    }

    fn queue(&mut self, r: Request) {
        self.iocbs[r.slot] = Iocb {
            aio_data: r.slot as u64,
            aio_lio_opcode: if r.write {
                IOCB_CMD_PWRITE
            } else {
                IOCB_CMD_PREAD
            },
            aio_fildes: self.fd as u32,
            aio_buf: r.buf as u64,
            aio_nbytes: r.len as u64,
            aio_offset: r.offset as i64,
            ..Default::default()
        };
        self.queued.push(r.slot);
    }

    fn submit_and_wait(&mut self, out: &mut Vec<(usize, i64)>) -> Result<(), Error> {
        let mut ptrs: Vec<*mut Iocb> = self
            .queued
            .iter()
            .map(|&s| &mut self.iocbs[s] as *mut Iocb)
            .collect();
        let mut off = 0;
        while off < ptrs.len() {
            // SAFETY: the pointers name control blocks in `self.iocbs`, which outlives the
            // call; each describes a buffer its submitter keeps valid until completion.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    (ptrs.len() - off) as libc::c_long,
                    ptrs.as_mut_ptr().add(off),
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e.into());
            }
            off += r as usize;
        }
        self.queued.clear();
        loop {
            // SAFETY: `events` has room for `len` events; no timeout pointer.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    1 as libc::c_long,
                    self.events.len() as libc::c_long,
                    self.events.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e.into());
            }
            out.extend(
                self.events[..n as usize]
                    .iter()
                    .map(|e| (e.data as usize, e.res)),
            );
            return Ok(());
        }
    }
}

impl Drop for LinuxAio {
    fn drop(&mut self) {
        // SAFETY: destroys the context we created; it waits for requests still in flight.
        unsafe {
            libc::syscall(libc::SYS_io_destroy, self.ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    fn roundtrip(mode: AioMode, direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true);
        if direct {
            use std::os::unix::fs::OpenOptionsExt;
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(&p).unwrap();
        let mut e = Engine::new(mode, f.as_raw_fd(), 8, direct).unwrap();
        let mut bufs: Vec<qcow2::AlignedBuf> = (0..8)
            .map(|i| {
                let mut b = qcow2::AlignedBuf::new(4096, 4096);
                b.fill(i as u8 + 1);
                b
            })
            .collect();
        let mut seen = 0;
        for (i, b) in bufs.iter_mut().enumerate() {
            let r = Request {
                slot: i,
                write: true,
                buf: b.as_mut_ptr(),
                len: 4096,
                offset: i as u64 * 8192,
            };
            // SAFETY: the buffers live until every completion was reaped below.
            match unsafe { e.run_sync(&r) } {
                Some(res) => {
                    assert_eq!(res, 4096);
                    seen += 1;
                }
                // SAFETY: as above.
                None => unsafe { e.submit(r).unwrap() },
            }
        }
        let mut done = Vec::new();
        while seen < 8 {
            done.clear();
            e.wait(&mut done).unwrap();
            for &(slot, res) in &done {
                assert!(slot < 8);
                assert_eq!(res, 4096, "{mode:?}");
                seen += 1;
            }
        }
        drop(e);
        let data = std::fs::read(&p).unwrap();
        for i in 0..8 {
            assert!(data[i * 8192..i * 8192 + 4096]
                .iter()
                .all(|&x| x == i as u8 + 1));
            assert!(data[i * 8192 + 4096..(i + 1) * 8192]
                .iter()
                .all(|&x| x == 0));
        }
    }

    #[test]
    fn every_engine_writes() {
        roundtrip(AioMode::Auto, false);
        roundtrip(AioMode::Threads, false);
        roundtrip(AioMode::IoUring, false);
        // O_DIRECT may be refused by the file system the tests run on (tmpfs).
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"x").unwrap();
        use std::os::unix::fs::OpenOptionsExt;
        if std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok()
        {
            roundtrip(AioMode::Native, true);
            roundtrip(AioMode::Auto, true);
        }
        assert!(AioMode::parse("foo").is_err());
    }
}
