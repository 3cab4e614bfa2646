//! The copy threads shared by the mirror and backup jobs: a [`Pool`] that runs [`Run`]s
//! handed over by the job's thread, and the copy of one mirror run (copy offload first,
//! then read and write, zeroes as write-zeroes requests).

use std::io::IoSlice;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block_graph::{BlockBackend, BlockError, WriteFlags, ZeroFlags};

use crate::error::{JobError, Result};

/// One run of the copy: `len` bytes at `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// A failed run: whether the read failed (else the write), and the error.
pub(crate) type RunResult = std::result::Result<(), (bool, BlockError)>;

/// What a copy thread does with a run (with its scratch buffer).
pub(crate) type Work = Arc<dyn Fn(Run, &mut Vec<u8>) -> RunResult + Send + Sync>;

/// A pool of copy threads fed with runs by the job's thread, which alone takes pause
/// points, applies error policies and rate limits.
pub(crate) struct Pool {
    tx: Option<mpsc::SyncSender<Run>>,
    done: mpsc::Receiver<(Run, RunResult)>,
    threads: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    bytes: u64,
}

impl Pool {
    /// `n` threads running `work` on each run.
    pub(crate) fn new(name: &str, n: usize, work: Work) -> Result<Pool> {
        let (tx, rx) = mpsc::sync_channel::<Run>(n);
        let rx = Arc::new(Mutex::new(rx));
        let (dtx, done) = mpsc::channel();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            let dtx = dtx.clone();
            let work = work.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name} {i}"))
                .spawn(move || {
                    // One buffer per thread, reused: no allocation (and page faults) per run.
                    let mut scratch = Vec::new();
                    loop {
                        let r = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(run) = r else { break };
                        let res = work(run, &mut scratch);
                        if dtx.send((run, res)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| JobError::generic(format!("cannot start a copy thread: {e}")))?;
            threads.push(h);
        }
        Ok(Pool {
            tx: Some(tx),
            done,
            threads,
            in_flight: 0,
            bytes: 0,
        })
    }

    pub(crate) fn submit(&mut self, r: Run) {
        if let Some(tx) = &self.tx {
            if tx.send(r).is_ok() {
                self.in_flight += 1;
                self.bytes += r.len;
            }
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The next finished run, waiting up to `wait`.
    pub(crate) fn next(&mut self, wait: Duration) -> Option<(Run, RunResult)> {
        if self.in_flight == 0 {
            return None;
        }
        let r = if wait.is_zero() {
            self.done.try_recv().ok()
        } else {
            self.done.recv_timeout(wait).ok()
        };
        if let Some((run, _)) = &r {
            self.in_flight -= 1;
            self.bytes -= run.len;
        }
        r
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        // Runs still queued or in flight finish; their results are dropped.
        while self.in_flight > 0 {
            if self.done.recv().is_err() {
                break;
            }
            self.in_flight -= 1;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Copies one run from `src` to `tgt`.
pub(super) fn copy_run(
    src: &BlockBackend,
    tgt: &BlockBackend,
    r: Run,
    unmap: bool,
    scratch: &mut Vec<u8>,
) -> RunResult {
    // The kernel copies what it can (copy offload), the rest is read and written.
    let n = block_graph::copy_range::copy_range_backends(src, tgt, r.offset, r.len)
        .map_err(|e| (e.is_read, e.error))?;
    if n == r.len {
        return Ok(());
    }
    let r = Run {
        offset: r.offset + n,
        len: r.len - n,
    };
    scratch.resize(r.len as usize, 0);
    let buf = &mut scratch[..];
    src.read_buf(r.offset, buf).map_err(|e| (true, e))?;
    let res = if block_graph::iov::is_zero(&[IoSlice::new(buf)]) {
        tgt.write_zeroes(
            r.offset,
            r.len,
            ZeroFlags {
                may_unmap: unmap,
                fua: false,
            },
        )
    } else {
        tgt.write_buf(r.offset, buf, WriteFlags::default())
    };
    res.map_err(|e| (false, e))
}
