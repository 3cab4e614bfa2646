//! Byte-range locks of the `file` driver's unaligned `O_DIRECT` writes.

use std::sync::{Condvar, Mutex};

use crate::node::mlock;

/// Byte ranges being written, so that a read-modify-write of an unaligned `O_DIRECT` write
/// never overlaps another write of the same blocks.
#[derive(Default)]
pub(super) struct RangeLocks {
    ranges: Mutex<Vec<(u64, u64, bool)>>,
    cv: Condvar,
}

pub(super) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64, bool),
}

impl RangeLocks {
    pub(super) fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut r = mlock(&self.ranges);
        while r
            .iter()
            .any(|&(s, e, x)| s < end && start < e && (x || exclusive))
        {
            r = self.cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        r.push((start, end, exclusive));
        RangeGuard {
            locks: self,
            range: (start, end, exclusive),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut r = mlock(&self.locks.ranges);
        if let Some(i) = r.iter().position(|x| *x == self.range) {
            r.swap_remove(i);
        }
        self.locks.cv.notify_all();
    }
}
