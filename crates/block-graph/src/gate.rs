//! Request gating at the roots of the graph, the mechanism behind drain.
//!
//! Every request enters the graph through a root (a [`crate::BlockBackend`], a job's or a
//! temporary user's root edge) and passes its [`RootGate`]. Draining a subtree quiesces every
//! root above it: requests already in flight run to completion, new ones wait at the gate until
//! the drained section ends. Entering and leaving a gate costs two atomic operations when no
//! drain is under way; only a request that meets a drain takes a lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The gate of one root.
#[derive(Debug, Default)]
pub struct RootGate {
    in_flight: AtomicUsize,
    quiesce: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

/// A request inside the gate; leaving happens on drop.
#[must_use = "the request leaves the gate when the guard drops"]
pub struct GateGuard<'a> {
    gate: &'a RootGate,
}

impl RootGate {
    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters the gate, waiting while the root is quiesced.
    #[inline]
    pub fn enter(&self) -> GateGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.quiesce.load(Ordering::SeqCst) == 0 {
            return GateGuard { gate: self };
        }
        self.enter_quiesced()
    }

    /// [`RootGate::enter`] that met a drain: steps back out and waits for its end.
    #[cold]
    fn enter_quiesced(&self) -> GateGuard<'_> {
        loop {
            self.leave();
            let mut g = self.guard();
            while self.quiesce.load(Ordering::SeqCst) > 0 {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            drop(g);
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.quiesce.load(Ordering::SeqCst) == 0 {
                return GateGuard { gate: self };
            }
        }
    }

    /// Enters the gate even while quiesced (for requests a drained section itself issues,
    /// such as the monitor's own I/O during a graph change).
    pub fn enter_unchecked(&self) -> GateGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        GateGuard { gate: self }
    }

    #[inline]
    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.quiesce.load(Ordering::SeqCst) > 0
        {
            self.wake();
        }
    }

    #[cold]
    fn wake(&self) {
        let _g = self.guard();
        self.cv.notify_all();
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether a drain holds the gate.
    pub fn is_quiesced(&self) -> bool {
        self.quiesce.load(Ordering::SeqCst) > 0
    }

    /// Holds new requests back (nests).
    pub fn quiesce(&self) {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until no request is in flight (call after [`RootGate::quiesce`]).
    pub fn wait_idle(&self) {
        let mut g = self.guard();
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Ends one quiesced section; requests flow again when the last one ends.
    pub fn unquiesce(&self) {
        let prev = self.quiesce.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(prev > 0, "unbalanced unquiesce");
        if prev == 1 {
            let _g = self.guard();
            self.cv.notify_all();
        }
    }
}

impl Drop for GateGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.gate.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn drain_waits_for_requests_and_holds_new_ones() {
        let gate = Arc::new(RootGate::default());
        let inside = gate.enter();
        gate.quiesce();
        let g2 = gate.clone();
        let entered = Arc::new(AtomicBool::new(false));
        let e2 = entered.clone();
        let t = std::thread::spawn(move || {
            let _g = g2.enter();
            e2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!entered.load(Ordering::SeqCst), "held while quiesced");
        let g3 = gate.clone();
        let waiter = std::thread::spawn(move || g3.wait_idle());
        std::thread::sleep(Duration::from_millis(10));
        drop(inside);
        waiter.join().unwrap();
        assert_eq!(gate.in_flight(), 0);
        gate.unquiesce();
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
