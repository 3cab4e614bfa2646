//! The write path. This module holds the shared machinery: [`WritePlan`], the registry of
//! guest clusters being allocated, L2 table copy-on-write, and queued frees. The child modules
//! hold allocation planning (`plan`), plan execution and commit (`commit`), write-zeroes and
//! discard (`zero`), compressed writes (`compressed`) and flush/close (`flush`).

use std::ops::Range;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::events::{DebugEvent, FreeReason};
use crate::gate::IoGuard;
use crate::image::{lock, Qcow2, Tables};
use crate::l2::L2Words;
use crate::l2::{EntryKind, OFLAG_COPIED};
use crate::small::SmallVec;

mod commit;
mod compressed;
mod flush;
mod plan;
mod zero;

/// Queued frees that force a metadata flush.
pub(crate) const FORCE_FLUSH_FREES: usize = 16384;

/// Entries a plan keeps inline (more spill to the heap): requests of up to this many
/// clusters need no allocation for their bookkeeping. Small, since every plan (in place
/// ones too) is moved around by value.
const INLINE_COMMITS: usize = 2;

/// One L2 entry a plan publishes.
#[derive(Debug, Clone, Copy, Default)]
struct Commit {
    guest: u64,
    entry: u64,
    bitmap: u64,
    /// The entry it replaces.
    old: u64,
    /// Whether the host clusters `old` references lose a reference (not when reused).
    free_old: bool,
}

/// A write prepared by [`Qcow2::prepare_write`]: write `cow` and then the guest data for
/// `[offset, offset + len)` at `host_offset` in the data storage, then call
/// [`Qcow2::commit_write`]. Dropping it uncommitted aborts (allocated clusters leak until the
/// next repair, which is safe).
pub struct WritePlan<'a> {
    img: &'a Qcow2,
    _guard: IoGuard<'a>,
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Bytes of guest data this plan covers (a prefix of the request).
    pub len: u64,
    /// Host offset in the data storage where the guest data goes.
    pub host_offset: u64,
    /// Copy-on-write data to write first: (host offset, bytes).
    pub cow: Vec<(u64, Vec<u8>)>,
    commits: SmallVec<Commit, INLINE_COMMITS>,
    /// Guest clusters registered as being allocated by this plan.
    registered: Range<u64>,
}

impl<'a> WritePlan<'a> {
    /// A write of `len` bytes at guest `offset` into allocated clusters at `host`: nothing
    /// to copy, nothing to commit.
    #[inline]
    pub(crate) fn in_place(
        img: &'a Qcow2,
        guard: IoGuard<'a>,
        offset: u64,
        len: u64,
        host: u64,
    ) -> Self {
        WritePlan {
            img,
            _guard: guard,
            offset,
            len,
            host_offset: host,
            cow: Vec::new(),
            commits: SmallVec::new(),
            registered: 0..0,
        }
    }

    /// Whether the plan allocates (needs [`Qcow2::commit_write`] to publish anything).
    pub fn needs_commit(&self) -> bool {
        !self.commits.is_empty()
    }
}

impl Drop for WritePlan<'_> {
    fn drop(&mut self) {
        if !self.registered.is_empty() {
            self.img.unregister(self.registered.clone());
        }
    }
}

impl Qcow2 {
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only.load(Ordering::Acquire) {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Registers the guest clusters `clusters` as being allocated, unless one already is.
    fn try_register(&self, clusters: Range<u64>) -> bool {
        let mut s = lock(&self.inflight);
        if clusters.clone().any(|c| s.set.contains(&c)) {
            return false;
        }
        s.set.extend(clusters);
        true
    }

    /// Registers the guest clusters `clusters` as being allocated, waiting until none is.
    fn register(&self, clusters: Range<u64>) {
        let mut s = lock(&self.inflight);
        while clusters.clone().any(|c| s.set.contains(&c)) {
            s.waiters += 1;
            s = self.inflight_cv.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiters -= 1;
        }
        s.set.extend(clusters);
    }

    pub(crate) fn unregister(&self, clusters: Range<u64>) {
        let mut s = lock(&self.inflight);
        for c in clusters {
            s.set.remove(&c);
        }
        // Waking costs a system call: only when someone waits.
        if s.waiters > 0 {
            self.inflight_cv.notify_all();
        }
    }

    fn write_l1_entry(&self, t: &mut Tables, idx: usize, v: u64) -> Result<()> {
        t.l1[idx] = v;
        t.l1_changed();
        self.hooks.event(DebugEvent::L1Update);
        self.file
            .write_at(&v.to_be_bytes(), t.l1_offset + idx as u64 * 8)?;
        Ok(())
    }

    /// Makes sure the L2 table for `guest` exists and is not shared; returns its offset.
    pub(crate) fn ensure_l2_writable(&self, t: &mut Tables, guest: u64) -> Result<u64> {
        let (idx, old) = self.l2_for(t, guest);
        if idx >= t.l1.len() {
            return Err(Error::CorruptionDetected(format!(
                "guest offset {guest:#x} beyond the L1 table"
            )));
        }
        if old != 0 && Self::l1_entry_copied(t.l1[idx]) {
            return Ok(old);
        }
        self.mark_dirty()?;
        let (new, _) = lock(&self.refs).alloc(1)?;
        let words = (self.geo.cs() / 8) as usize;
        let content = if old == 0 {
            vec![0u64; words]
        } else {
            self.hooks.event(DebugEvent::L2AllocCowRead);
            let mut dep = self.l2_write_dependency();
            t.l2.get(old, &mut dep)?.words()
        };
        let mut raw = Vec::with_capacity(words * 8);
        for e in &content {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.hooks.event(DebugEvent::L2AllocWrite);
        self.file.write_at(&raw, new)?;
        {
            let mut dep = self.l2_write_dependency();
            dep()?;
            t.l2.insert(new, content, false, &mut dep)?;
        }
        self.write_l1_entry(t, idx, new | OFLAG_COPIED)?;
        if old != 0 {
            self.queue_frees(vec![old >> self.geo.cluster_bits], FreeReason::Other);
        }
        Ok(new)
    }

    /// Queues decrements for clusters no longer referenced by the active tables.
    pub(crate) fn queue_frees(&self, clusters: Vec<u64>, reason: FreeReason) {
        if clusters.is_empty() {
            return;
        }
        let tag = self.gate.bump();
        let n = clusters.len();
        let mut p = lock(&self.pending_tags);
        p.push((tag, clusters, reason));
        self.pending_count
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies queued frees through a metadata flush once many have piled up (guests that
    /// never flush would otherwise never get their clusters back). Callers hold no lock.
    fn maybe_apply_frees(&self) -> Result<()> {
        let pending = self.pending_count.load(Ordering::Relaxed);
        if pending > self.force_flush_at.load(Ordering::Relaxed) {
            self.flush()?;
            // Frees held back by long-running requests must not make every write flush.
            let left = self.pending_count.load(Ordering::Relaxed);
            self.force_flush_at
                .store((2 * left).max(FORCE_FLUSH_FREES), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Host clusters an entry references (for dropping references).
    pub(crate) fn entry_clusters(&self, entry: u64) -> Result<Vec<u64>> {
        let cb = self.geo.cluster_bits;
        Ok(match self.geo.decode(entry)? {
            EntryKind::Normal { host } | EntryKind::Zero { host } if host != 0 => {
                if self.external_data {
                    // Data clusters of external data files carry no refcounts.
                    Vec::new()
                } else {
                    vec![host >> cb]
                }
            }
            EntryKind::Compressed { host, len } => {
                let first = host >> cb;
                let last = (host + len - 1) >> cb;
                (first..=last).collect()
            }
            _ => Vec::new(),
        })
    }
}

/// Bitmap with bits `s0..=s1` set.
pub(crate) fn sc_mask(s0: u32, s1: u32) -> u64 {
    let hi = if s1 >= 31 {
        u32::MAX as u64
    } else {
        (1u64 << (s1 + 1)) - 1
    };
    hi & !((1u64 << s0) - 1)
}
