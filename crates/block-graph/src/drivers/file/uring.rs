//! `io_uring` submission of a batch on the calling thread: one ring per thread (created on
//! first use, [`ENTRIES`] entries), up to [`queue_depth`] I/Os of the batch in flight at
//! once (the next one submitted as soon as one completes), the thread returning when all
//! of them completed. Where `io_uring` is unavailable
//! (old kernel, seccomp) [`run`] says so once and for all and the caller uses `preadv`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, types, IoUring};

/// Entries of each thread's ring: larger batches go in several rounds.
pub const ENTRIES: usize = 128;

static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// One read or write of a batch. The memory behind `ptr` must stay valid, and (reads)
/// unaliased, until [`run`] returns.
pub struct Io {
    /// File descriptor.
    pub fd: i32,
    /// A write (else a read).
    pub write: bool,
    /// The buffer.
    pub ptr: *mut u8,
    /// Its length.
    pub len: u32,
    /// File offset.
    pub offset: u64,
    /// `RWF_DSYNC` (writes).
    pub dsync: bool,
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

/// Whether `io_uring` can be set up here (`aio=io_uring` nodes check it when they open,
/// as QEMU's do): the error of a ring's creation, else `Ok`.
pub fn probe() -> std::io::Result<()> {
    IoUring::new(2).map(drop)
}

/// Runs `ios`, filling `out` with each result (bytes moved, or `-errno`). Returns false,
/// having done nothing, when `io_uring` cannot be used on this thread.
pub fn run(ios: &[Io], out: &mut Vec<i32>) -> bool {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return false;
    }
    RING.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return false;
        };
        if slot.is_none() {
            match IoUring::new(ENTRIES as u32) {
                Ok(r) => {
                    // I/O the kernel cannot start without blocking goes to the ring's
                    // worker threads, by default at most 4 per CPU for files: allow one
                    // per entry, so that the queue depth is real (QEMU's thread pool has
                    // 64 workers). Older kernels lack the call; the default then stays.
                    let mut max = [ENTRIES as u32, 0];
                    if let Err(e) = r.submitter().register_iowq_max_workers(&mut max) {
                        log::debug!("io_uring worker limit unchanged: {e}");
                    }
                    *slot = Some(r)
                }
                Err(e) => {
                    log::info!("io_uring unavailable ({e}): batches use preadv/pwritev");
                    UNAVAILABLE.store(true, Ordering::Relaxed);
                    return false;
                }
            }
        }
        let Some(ring) = slot.as_mut() else {
            return false;
        };
        if submit_all(ring, ios, out) {
            return true;
        }
        // Nothing was taken by the kernel: forget the ring (its entries with it) and let
        // the caller use the plain system calls.
        UNAVAILABLE.store(true, Ordering::Relaxed);
        *slot = None;
        false
    })
}

/// Submits and completes `ios` keeping up to [`queue_depth`] of them in flight (a new one
/// goes as soon as one completes); false when a submission fails before anything was in
/// flight (nothing is then).
fn submit_all(ring: &mut IoUring, ios: &[Io], out: &mut Vec<i32>) -> bool {
    out.clear();
    out.resize(ios.len(), -libc::EIO);
    let depth = queue_depth().min(ENTRIES);
    let (mut next, mut in_flight, mut done) = (0usize, 0usize, 0usize);
    let mut submitted = false;
    while done < ios.len() {
        {
            let mut sq = ring.submission();
            while next < ios.len() && in_flight < depth {
                let io = &ios[next];
                let fd = types::Fd(io.fd);
                let e = if io.write {
                    opcode::Write::new(fd, io.ptr, io.len)
                        .offset(io.offset)
                        .rw_flags(if io.dsync { libc::RWF_DSYNC } else { 0 })
                        .build()
                } else {
                    opcode::Read::new(fd, io.ptr, io.len)
                        .offset(io.offset)
                        .build()
                };
                // SAFETY: the caller keeps every buffer valid until `run` returns, which
                // is after the kernel completed every entry it took.
                if unsafe { sq.push(&e.user_data(next as u64)) }.is_err() {
                    break;
                }
                next += 1;
                in_flight += 1;
            }
        }
        // With nothing left to submit, wait for all that is in flight in one call;
        // otherwise for the first completion, which frees a slot.
        let want = if next == ios.len() { in_flight } else { 1 };
        match ring.submit_and_wait(want) {
            Ok(_) => submitted = true,
            Err(e) if retryable(&e) => {}
            Err(e) if !submitted => {
                log::warn!("io_uring submission failed ({e}): batches use preadv/pwritev");
                return false;
            }
            Err(e) => {
                // Requests are in flight in the caller's buffers: keep waiting.
                log::error!("io_uring wait failed ({e}); waiting again");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        for c in ring.completion() {
            if let Some(o) = out.get_mut(c.user_data() as usize) {
                *o = c.result();
                in_flight -= 1;
                done += 1;
            }
        }
    }
    true
}

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(ENTRIES) };
}

/// The most requests of a batch this thread keeps in flight.
pub fn queue_depth() -> usize {
    DEPTH.with(|d| d.get())
}

/// Sets [`queue_depth`] for this thread (1 to [`ENTRIES`]).
pub fn set_queue_depth(n: usize) {
    DEPTH.with(|d| d.set(n.clamp(1, ENTRIES)));
}
