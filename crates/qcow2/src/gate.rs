//! Tracking of in-flight data I/O, so that host clusters are never freed (and reused) while a
//! request that mapped them may still touch them, and so that exclusive operations can drain.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    generation: u64,
    /// (generation, requests of that generation in flight), oldest first.
    active: VecDeque<(u64, usize)>,
    exclusive: bool,
}

/// The gate every data request passes.
#[derive(Default)]
pub(crate) struct IoGate {
    state: Mutex<State>,
    cv: Condvar,
}

/// Held by a request while it may use a mapping.
pub struct IoGuard<'a> {
    gate: &'a IoGate,
    generation: u64,
}

/// Held by an exclusive operation: no request is in flight while it lives.
pub(crate) struct ExclusiveGuard<'a> {
    gate: &'a IoGate,
}

impl IoGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters the gate, waiting while an exclusive operation runs.
    pub fn enter(&self) -> IoGuard<'_> {
        let mut s = self.lock();
        while s.exclusive {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let g = s.generation;
        match s.active.back_mut() {
            Some((bg, n)) if *bg == g => *n += 1,
            _ => s.active.push_back((g, 1)),
        }
        IoGuard {
            gate: self,
            generation: g,
        }
    }

    /// Starts a new generation and returns the tag for frees queued now: they may be applied
    /// once [`IoGate::retired`] says so.
    pub fn bump(&self) -> u64 {
        let mut s = self.lock();
        let g = s.generation;
        s.generation += 1;
        g
    }

    /// Whether every request that entered in generation `tag` or earlier has left.
    pub fn retired(&self, tag: u64) -> bool {
        let s = self.lock();
        s.active
            .iter()
            .find(|(_, n)| *n > 0)
            .is_none_or(|&(oldest, _)| oldest > tag)
    }

    /// Waits for all requests to leave and keeps new ones out until the guard drops.
    pub fn exclusive(&self) -> ExclusiveGuard<'_> {
        // New requests are only held back once the gate is empty, so a thread that holds a
        // guard and enters again (nested I/O) cannot deadlock against a waiting exclusive user.
        let mut s = self.lock();
        while s.exclusive || !s.active.is_empty() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.exclusive = true;
        ExclusiveGuard { gate: self }
    }
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        if let Some((_, n)) = s.active.iter_mut().find(|(g, _)| *g == self.generation) {
            *n -= 1;
        }
        while s.active.front().is_some_and(|(_, n)| *n == 0) {
            s.active.pop_front();
        }
        if s.active.is_empty() {
            self.gate.cv.notify_all();
        }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.exclusive = false;
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
