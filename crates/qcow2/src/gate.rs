//! Tracking of in-flight data I/O, so that host clusters are never freed (and reused) while a
//! request that mapped them may still touch them, and so that exclusive operations can drain.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};

/// The gate every data request passes.
///
/// Entering and leaving are lock-free: a request increments the counter of the current epoch's
/// parity and checks that the epoch did not move meanwhile (else it retries in the new epoch).
/// The epoch advances (in [`IoGate::bump`] and [`IoGate::retired`]) only when no request of the
/// previous epoch of the same parity is left, so two counters suffice: frees tagged with epoch
/// `t` may be applied once the epoch is past `t + 1`, or at `t + 1` with `t`'s counter at zero.
/// Exclusive operations and the requests they hold back wait on a mutex and condition
/// variable, which leaving requests signal only when someone waits.
#[derive(Default)]
pub(crate) struct IoGate {
    epoch: AtomicU64,
    count: [AtomicUsize; 2],
    /// Set while an exclusive operation runs (or checks whether it may).
    exclusive: AtomicBool,
    /// Threads waiting on `cv` (exclusive operations and requests held back by one).
    waiters: AtomicUsize,
    slow: Mutex<()>,
    cv: Condvar,
}

/// Held by a request while it may use a mapping.
pub struct IoGuard<'a> {
    gate: &'a IoGate,
    epoch: u64,
}

/// Held by an exclusive operation: no request is in flight while it lives.
pub(crate) struct ExclusiveGuard<'a> {
    gate: &'a IoGate,
}

impl IoGate {
    fn slow(&self) -> std::sync::MutexGuard<'_, ()> {
        self.slow.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn in_flight(&self) -> usize {
        self.count[0].load(SeqCst) + self.count[1].load(SeqCst)
    }

    /// Wakes waiters, if any.
    fn wake(&self) {
        if self.waiters.load(SeqCst) > 0 {
            let _g = self.slow();
            self.cv.notify_all();
        }
    }

    /// Enters the gate, waiting while an exclusive operation runs.
    #[inline]
    pub fn enter(&self) -> IoGuard<'_> {
        loop {
            if self.exclusive.load(SeqCst) {
                let mut g = self.slow();
                self.waiters.fetch_add(1, SeqCst);
                while self.exclusive.load(SeqCst) {
                    g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                self.waiters.fetch_sub(1, SeqCst);
                drop(g);
            }
            let e = self.epoch.load(SeqCst);
            let c = &self.count[(e & 1) as usize];
            c.fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e && !self.exclusive.load(SeqCst) {
                return IoGuard {
                    gate: self,
                    epoch: e,
                };
            }
            // The epoch moved or an exclusive operation began: back off and retry.
            c.fetch_sub(1, SeqCst);
            self.wake();
        }
    }

    /// Moves to the next epoch if no request of the one before the current is left.
    fn try_advance(&self) {
        let e = self.epoch.load(SeqCst);
        if self.count[((e + 1) & 1) as usize].load(SeqCst) == 0 {
            let _ = self.epoch.compare_exchange(e, e + 1, SeqCst, SeqCst);
        }
    }

    /// Returns the tag for frees queued now: they may be applied once [`IoGate::retired`]
    /// says so. Starts a new epoch when it can.
    pub fn bump(&self) -> u64 {
        let e = self.epoch.load(SeqCst);
        self.try_advance();
        e
    }

    /// Whether every request that entered in epoch `tag` or earlier has left.
    pub fn retired(&self, tag: u64) -> bool {
        self.try_advance();
        let e = self.epoch.load(SeqCst);
        if e >= tag + 2 {
            return true;
        }
        // At `tag + 1` the epoch of `tag - 1` had drained before it was entered; `tag`'s
        // counter holds only requests of epoch `tag`.
        e == tag + 1 && self.count[(tag & 1) as usize].load(SeqCst) == 0
    }

    /// Waits for all requests to leave and keeps new ones out until the guard drops.
    pub fn exclusive(&self) -> ExclusiveGuard<'_> {
        // New requests are only held back once the gate is empty, so a thread that holds a
        // guard and enters again (nested I/O) cannot deadlock against a waiting exclusive user.
        let mut g = self.slow();
        self.waiters.fetch_add(1, SeqCst);
        loop {
            if self
                .exclusive
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_ok()
            {
                if self.in_flight() == 0 {
                    break;
                }
                self.exclusive.store(false, SeqCst);
                // Requests that backed off meanwhile may go on.
                self.cv.notify_all();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.waiters.fetch_sub(1, SeqCst);
        drop(g);
        ExclusiveGuard { gate: self }
    }
}

impl Drop for IoGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let left = self.gate.count[(self.epoch & 1) as usize].fetch_sub(1, SeqCst);
        if left == 1 {
            self.gate.wake();
        }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        let _g = self.gate.slow();
        self.gate.exclusive.store(false, SeqCst);
        self.gate.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_retire() {
        let g = IoGate::default();
        let a = g.enter();
        let tag = g.bump();
        let b = g.enter();
        assert!(!g.retired(tag));
        drop(a);
        assert!(g.retired(tag));
        let tag2 = g.bump();
        assert!(!g.retired(tag2));
        drop(b);
        assert!(g.retired(tag2));
        drop(g.exclusive());
    }

    #[test]
    fn frees_wait_for_every_older_request() {
        let g = IoGate::default();
        // A request from long ago keeps every later tag from retiring while it lives.
        let old = g.enter();
        let mut tags = Vec::new();
        let mut guards = Vec::new();
        for _ in 0..5 {
            tags.push(g.bump());
            guards.push(g.enter());
        }
        for &t in &tags {
            assert!(!g.retired(t));
        }
        drop(old);
        drop(guards);
        for &t in &tags {
            assert!(g.retired(t), "tag {t}");
        }
    }

    #[test]
    fn exclusive_waits_for_requests_and_holds_new_ones() {
        let g = std::sync::Arc::new(IoGate::default());
        let r = g.enter();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let t = {
            let (g, done) = (g.clone(), done.clone());
            std::thread::spawn(move || {
                let _x = g.exclusive();
                done.store(true, SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                // Still exclusive: nothing entered meanwhile.
                assert_eq!(g.in_flight(), 0);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!done.load(SeqCst));
        // Nested entry while an exclusive user waits does not deadlock.
        let nested = g.enter();
        drop(nested);
        drop(r);
        while !done.load(SeqCst) {
            std::thread::yield_now();
        }
        let after = g.enter();
        drop(after);
        t.join().unwrap();
    }
}

/// A fast hasher for u64 keys (cluster offsets and indices): one multiply.
#[derive(Default, Clone, Copy)]
pub(crate) struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Hash maps keyed by offsets.
pub(crate) type OffsetMap<V> =
    std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<OffsetHasher>>;
/// Hash sets of offsets.
pub(crate) type OffsetSet =
    std::collections::HashSet<u64, std::hash::BuildHasherDefault<OffsetHasher>>;

/// Guest clusters being allocated by requests in flight, and how many requests wait for one.
#[derive(Default)]
pub(crate) struct Inflight {
    pub set: OffsetSet,
    pub waiters: usize,
}
