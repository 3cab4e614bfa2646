//! The `null-co` and `null-aio` protocol drivers: a device of a given size that stores
//! nothing, with optional emulated latency and zeroed reads (for benchmarks and tests).

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::driver::{BlockDriver, DriverStatus, StatusKind, WriteFlags};
use crate::error::Result;
use crate::iov::zero_iov;
use crate::node::Node;

/// The null driver's state.
#[derive(Debug, Clone)]
pub struct NullDriver {
    /// `null-co` or `null-aio`.
    pub name: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Emulated latency per request.
    pub latency: Duration,
    /// Reads fill the buffer with zeros (otherwise it is left as it is).
    pub read_zeroes: bool,
    /// The options given explicitly, in QEMU's order, for the `json:` filename.
    pub given: Vec<(&'static str, serde_json::Value)>,
    /// The node of this driver (filled once it is open), to see drains above it.
    pub node: Arc<OnceLock<Weak<Node>>>,
}

/// The longest sleep of an emulated latency between two looks for a drain.
const LATENCY_SLICE: Duration = Duration::from_millis(10);

/// The longest emulated latency of one request. QEMU takes any 64-bit `latency-ns`, but the
/// monitor flushes nodes itself (snapshots, `quit`), so a latency of hours would stop it
/// answering for as long; longer values wait this long.
pub const MAX_EMULATED_LATENCY: Duration = Duration::from_secs(1);

impl NullDriver {
    /// Waits the emulated latency (at most [`MAX_EMULATED_LATENCY`]). A drain above the
    /// node ends the wait early: a drain waits for the requests in flight.
    fn wait(&self) {
        if self.latency.is_zero() {
            return;
        }
        let end = Instant::now() + self.latency.min(MAX_EMULATED_LATENCY);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(LATENCY_SLICE));
            let drained = self
                .node
                .get()
                .and_then(Weak::upgrade)
                .is_some_and(|n| n.drained_above());
            if drained {
                return;
            }
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        self.name
    }

    fn is_protocol(&self) -> bool {
        true
    }

    fn length(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn read(&self, _offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.wait();
        if self.read_zeroes {
            zero_iov(iov);
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _iov: &[IoSlice<'_>], _flags: WriteFlags) -> Result<()> {
        self.wait();
        Ok(())
    }

    fn write_zeroes(&self, _o: u64, _l: u64, _f: crate::driver::ZeroFlags) -> Result<()> {
        self.wait();
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.wait();
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        // QEMU 7.2's null_co_block_status: zero with read-zeroes, otherwise neither data
        // nor zero, which the block layer reports as not allocated.
        Ok(DriverStatus {
            len,
            kind: if self.read_zeroes {
                StatusKind::Zero {
                    offset: Some(offset),
                }
            } else {
                StatusKind::Unallocated
            },
        })
    }

    fn filename(&self) -> Option<String> {
        if self.given.is_empty() {
            return Some(format!("{}://", self.name));
        }
        // QEMU's refresh_filename: options that change the data make a json: filename.
        let mut m = serde_json::Map::new();
        m.insert("driver".into(), self.name.into());
        for (k, v) in &self.given {
            m.insert((*k).into(), v.clone());
        }
        Some(format!(
            "json:{}",
            crate::filename::qemu_json(&serde_json::Value::Object(m))
        ))
    }

    fn strong_options(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.given.clone()
    }

    fn allocated_size(&self) -> Option<u64> {
        Some(0)
    }
}
