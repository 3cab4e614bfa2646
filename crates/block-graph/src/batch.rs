//! Batched requests: many reads and writes submitted together from one thread, so that
//! depth N needs no N threads. A batch goes down the graph as one call per node
//! ([`crate::BlockBackend::submit_batch`] -> [`crate::Edge::submit_batch`] -> the driver's
//! [`crate::BlockDriver::submit_batch`]); the `file` driver hands its part to the kernel
//! in one `io_uring` submission and waits for all of it, `qcow2` maps every request first
//! and sends the data I/O of all of them to its file in one batch, filters pass batches on.
//! Drivers without batch support run the requests one after the other (the default).
//!
//! Convention: a request whose `result` is `Some` is done; a driver handles the requests
//! whose `result` is `None` and sets it for each of them.
//!
//! ```
//! use block_graph::batch::BatchReq;
//! use block_graph::{BlockGraph, Perm};
//! use qapi_types::{BlockdevOptions, QapiType};
//!
//! let mut g = BlockGraph::new();
//! let o = BlockdevOptions::from_qmp_strict(serde_json::json!(
//!     {"driver": "null-co", "node-name": "n", "size": 1 << 20, "read-zeroes": true})).unwrap();
//! let n = g.blockdev_add(&o).unwrap();
//! let be = g.new_root(&n, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL, "example").unwrap();
//! let mut bufs = vec![[7u8; 512]; 4];
//! let data = [1u8; 512];
//! let mut reqs: Vec<BatchReq<'_>> = bufs
//!     .iter_mut()
//!     .enumerate()
//!     .map(|(i, b)| BatchReq::read(i as u64 * 512, b))
//!     .collect();
//! reqs.push(BatchReq::write(8192, &data));
//! be.submit_batch(&mut reqs);
//! assert!(reqs.iter().all(|r| matches!(r.result, Some(Ok(())))));
//! drop(reqs);
//! assert_eq!(bufs[3], [0u8; 512]);
//! ```

use std::io::{IoSlice, IoSliceMut};

use crate::driver::{BlockDriver, WriteFlags};
use crate::error::Result;

/// The buffer of a batched request: where a read lands, or what a write writes.
#[derive(Debug)]
pub enum BatchBuf<'a> {
    /// A read into this buffer.
    Read(&'a mut [u8]),
    /// A write of this buffer.
    Write(&'a [u8]),
}

/// One request of a batch.
#[derive(Debug)]
pub struct BatchReq<'a> {
    /// Byte offset in the node.
    pub offset: u64,
    /// The data.
    pub buf: BatchBuf<'a>,
    /// Force unit access (writes).
    pub fua: bool,
    /// The outcome, once done.
    pub result: Option<Result<()>>,
}

impl<'a> BatchReq<'a> {
    /// A read of `buf.len()` bytes at `offset`.
    pub fn read(offset: u64, buf: &'a mut [u8]) -> Self {
        BatchReq {
            offset,
            buf: BatchBuf::Read(buf),
            fua: false,
            result: None,
        }
    }

    /// A write of `buf` at `offset`.
    pub fn write(offset: u64, buf: &'a [u8]) -> Self {
        BatchReq {
            offset,
            buf: BatchBuf::Write(buf),
            fua: false,
            result: None,
        }
    }

    /// Bytes the request moves.
    pub fn len(&self) -> usize {
        match &self.buf {
            BatchBuf::Read(b) => b.len(),
            BatchBuf::Write(b) => b.len(),
        }
    }

    /// Whether the request moves no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is a write.
    pub fn is_write(&self) -> bool {
        matches!(self.buf, BatchBuf::Write(_))
    }

    /// Whether it still waits for a result.
    pub fn is_pending(&self) -> bool {
        self.result.is_none()
    }

    /// The same request at another offset (for the layer below), borrowing the buffer.
    pub fn forward(&mut self, offset: u64) -> BatchReq<'_> {
        BatchReq {
            offset,
            buf: match &mut self.buf {
                BatchBuf::Read(b) => BatchBuf::Read(b),
                BatchBuf::Write(b) => BatchBuf::Write(b),
            },
            fua: self.fua,
            result: None,
        }
    }
}

/// Sets how many requests of the calling thread's batches the `file` driver keeps in
/// flight at once with `O_DIRECT` (QEMU's queue depth; 1 to 128, default 128): a batch
/// larger than that runs as a sliding window, the next request going as soon as one
/// completes.
pub fn set_queue_depth(n: usize) {
    crate::drivers::file::uring::set_queue_depth(n)
}

/// The calling thread's queue depth (see [`set_queue_depth`]).
pub fn queue_depth() -> usize {
    crate::drivers::file::uring::queue_depth()
}

/// Runs one request with a driver's single-request methods.
pub fn run_one(d: &(impl BlockDriver + ?Sized), r: &mut BatchReq<'_>) -> Result<()> {
    let offset = r.offset;
    match &mut r.buf {
        BatchBuf::Read(b) => d.read(offset, &mut [IoSliceMut::new(b)]),
        BatchBuf::Write(b) => d.write(offset, &[IoSlice::new(b)], WriteFlags { fua: r.fua }),
    }
}

/// The default of [`BlockDriver::submit_batch`]: every pending request, one after the
/// other.
pub fn run_each(d: &(impl BlockDriver + ?Sized), reqs: &mut [BatchReq<'_>]) {
    for r in reqs.iter_mut().filter(|r| r.is_pending()) {
        r.result = Some(run_one(d, r));
    }
}

/// Copies the results of forwarded requests back: `results[k]` belongs to `reqs[idx[k]]`.
pub fn forward_results(
    reqs: &mut [BatchReq<'_>],
    idx: &[usize],
    results: impl IntoIterator<Item = Option<Result<()>>>,
) {
    for (&i, r) in idx.iter().zip(results) {
        reqs[i].result = r;
    }
}
