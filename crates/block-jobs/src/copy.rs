//! The copy loop stream and commit share: the range `[0, len)` cut into runs that a few
//! threads copy at once (each with its own buffer, allocated once), while the job's thread
//! hands out runs, takes the pause points, applies the rate limit and the error policy,
//! and counts progress. With a speed limit one run is in flight at a time, so the limiter
//! stays exact.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::Mutex;

use block_graph::BlockError;
use qapi_types::BlockdevOnError;

use crate::chain::JobRoot;
use crate::engine::{ErrorAction, JobContext};
use crate::error::Result;

/// Threads copying at once when no speed limit applies.
pub const COPY_THREADS: usize = 4;

/// A run that failed: the error and whether reading (else writing) failed.
#[derive(Debug)]
pub struct RunError {
    /// The error.
    pub err: BlockError,
    /// Whether the read failed (the write otherwise).
    pub is_read: bool,
}

impl RunError {
    /// A failed read.
    pub fn read(err: BlockError) -> Self {
        RunError { err, is_read: true }
    }

    /// A failed write.
    pub fn write(err: BlockError) -> Self {
        RunError {
            err,
            is_read: false,
        }
    }
}

/// What `ignore` does with a failed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIgnore {
    /// Skip it and fail the job at the end (QEMU's stream).
    SkipAndFail,
    /// Copy it again (QEMU's commit).
    Retry,
}

type Outcome = ((u64, u64), std::result::Result<bool, RunError>);

/// Copies `[0, len)` in runs of up to `max_chunk` bytes: `work(offset, len, buf)` copies
/// one whole run (returning whether it wrote anything, which the rate limit counts).
pub fn copy_range<F>(
    ctx: &JobContext,
    len: u64,
    max_chunk: u64,
    policy: &BlockdevOnError,
    on_ignore: OnIgnore,
    work: F,
) -> Result<()>
where
    F: Fn(u64, u64, &mut Vec<u8>) -> std::result::Result<bool, RunError> + Sync,
{
    let (run_tx, run_rx) = mpsc::channel::<(u64, u64)>();
    let run_rx = Mutex::new(run_rx);
    let (done_tx, done_rx) = mpsc::channel::<Outcome>();
    std::thread::scope(|s| {
        for _ in 0..COPY_THREADS {
            let done_tx = done_tx.clone();
            let (run_rx, work) = (&run_rx, &work);
            s.spawn(move || {
                let mut buf = Vec::new();
                loop {
                    let next = run_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((off, n)) = next else { break };
                    let r = work(off, n, &mut buf);
                    if done_tx.send(((off, n), r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let r = drive(ctx, len, max_chunk, policy, on_ignore, &run_tx, &done_rx);
        // The threads finish the runs they hold and stop.
        drop(run_tx);
        r
    })
}

fn drive(
    ctx: &JobContext,
    len: u64,
    max_chunk: u64,
    policy: &BlockdevOnError,
    on_ignore: OnIgnore,
    run_tx: &mpsc::Sender<(u64, u64)>,
    done_rx: &mpsc::Receiver<Outcome>,
) -> Result<()> {
    let mut off = 0u64;
    let mut in_flight = 0usize;
    let mut retry: VecDeque<(u64, u64)> = VecDeque::new();
    let mut first_error: Option<BlockError> = None;
    loop {
        let limit = if ctx.speed() > 0 { 1 } else { COPY_THREADS };
        while in_flight < limit && !ctx.should_stop() {
            let run = if let Some(r) = retry.pop_front() {
                r
            } else if off < len {
                let n = ctx.chunk_size(max_chunk).min(len - off);
                off += n;
                (off - n, n)
            } else {
                break;
            };
            if run_tx.send(run).is_err() {
                return Err(crate::error::JobError::generic("the copy threads stopped"));
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            if off >= len && retry.is_empty() {
                break;
            }
            // Paused or cancelled, with nothing in flight.
            ctx.pause_point()?;
            continue;
        }
        let Ok(((o, n), r)) = done_rx.recv() else {
            return Err(crate::error::JobError::generic("the copy threads stopped"));
        };
        in_flight -= 1;
        match r {
            Ok(copied) => {
                ctx.progress_done(n);
                // With a limit, this was the only run in flight: sleeping (and pausing)
                // here leaves no I/O behind.
                if copied && ctx.speed() > 0 {
                    ctx.rate_limit(n)?;
                }
            }
            Err(e) => match ctx.error_action(policy, e.is_read, &e.err) {
                ErrorAction::Report => return Err(e.err.into()),
                ErrorAction::Stop => retry.push_back((o, n)),
                ErrorAction::Ignore if on_ignore == OnIgnore::Retry => retry.push_back((o, n)),
                ErrorAction::Ignore => {
                    first_error.get_or_insert(e.err);
                    ctx.progress_done(n);
                }
            },
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Copies `[off, off + n)` from `src` to `dst` as block-status described it: write-zeroes
/// when it reads as zero, else read and write through `buf` (grown once to the largest
/// run).
pub fn copy_data(
    src: &JobRoot,
    dst: &JobRoot,
    buf: &mut Vec<u8>,
    off: u64,
    n: u64,
    zero: bool,
) -> std::result::Result<(), RunError> {
    if zero {
        return dst.write_zeroes(off, n).map_err(RunError::write);
    }
    if buf.len() < n as usize {
        buf.resize(n as usize, 0);
    }
    let b = &mut buf[..n as usize];
    src.read(off, b).map_err(RunError::read)?;
    dst.write(off, b).map_err(RunError::write)
}

/// Runs `step(offset, len)`, which handles a prefix of the range it is given (returning
/// the prefix's length and whether it wrote), until `[off, off + n)` is done; returns
/// whether anything was written.
pub fn whole_run(
    off: u64,
    n: u64,
    mut step: impl FnMut(u64, u64) -> std::result::Result<(u64, bool), RunError>,
) -> std::result::Result<bool, RunError> {
    let mut done = 0;
    let mut copied = false;
    while done < n {
        let (k, c) = step(off + done, n - done)?;
        if k == 0 {
            // Block-status never answers an empty prefix; refuse to loop forever.
            return Err(RunError::read(BlockError::errno(libc::EIO)));
        }
        done += k.min(n - done);
        copied |= c;
    }
    Ok(copied)
}
