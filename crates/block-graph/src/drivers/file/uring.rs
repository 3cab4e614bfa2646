//! `io_uring` submission of a batch on the calling thread: one ring per thread (created on
//! first use, [`ENTRIES`] entries), every I/O of the batch submitted with one system call
//! and the thread waiting until all of them completed. Where `io_uring` is unavailable
//! (old kernel, seccomp) [`run`] says so once and for all and the caller uses `preadv`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, types, IoUring};

/// Entries of each thread's ring: larger batches go in several rounds.
pub const ENTRIES: usize = 64;

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
                Ok(r) => *slot = Some(r),
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

/// Submits and completes `ios` in rounds of [`ENTRIES`]; false when the first submission
/// of a round fails (nothing of that round is in flight then).
fn submit_all(ring: &mut IoUring, ios: &[Io], out: &mut Vec<i32>) -> bool {
    out.clear();
    out.resize(ios.len(), -libc::EIO);
    for start in (0..ios.len()).step_by(ENTRIES) {
        let end = (start + ENTRIES).min(ios.len());
        {
            let mut sq = ring.submission();
            for (i, io) in ios.iter().enumerate().take(end).skip(start) {
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
                if unsafe { sq.push(&e.user_data(i as u64)) }.is_err() {
                    unreachable!("the queue is empty and holds ENTRIES entries");
                }
            }
        }
        let mut left = end - start;
        let mut submitted = false;
        while left > 0 {
            match ring.submit_and_wait(left) {
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
                    left -= 1;
                }
            }
        }
    }
    true
}
