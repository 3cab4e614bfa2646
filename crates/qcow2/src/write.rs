//! The write path: in-place writes, allocation with copy-on-write, commit of L2 entries,
//! write-zeroes, discard, compressed writes and flush.

use std::ops::Range;
use std::sync::atomic::Ordering;

use crate::backing::read_clamped;
use crate::error::{Error, Result};
use crate::events::{DebugEvent, FreeReason};
use crate::gate::IoGuard;
use crate::image::{lock, MappingKind, Qcow2, Tables};
use crate::l2::L2Words;
use crate::l2::{EntryKind, BITMAP_ALL_ALLOC, BITMAP_ALL_ZERO, OFFSET_MASK, OFLAG_COMPRESSED};
use crate::l2::{OFLAG_COPIED, OFLAG_ZERO};
use crate::small::SmallVec;

/// Queued frees that force a metadata flush.
pub(crate) const FORCE_FLUSH_FREES: usize = 16384;

/// Largest number of clusters one allocation plan covers.
const MAX_PLAN_CLUSTERS: u64 = 512;

/// Old entries an allocation collects on the stack (more spill to the heap).
const INLINE_CLUSTERS: usize = 16;
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

impl WritePlan<'_> {
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

    /// Plans a write of `[offset, offset + len)`; see [`WritePlan`].
    pub fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<'_>> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::InvalidArgument("empty write".into()));
        }
        let guard = self.gate.enter();
        let r = self.prepare_inner(offset, len, guard, true);
        self.c(r)
            .map(|p| p.expect("blocking prepare always yields a plan"))
    }

    /// Like [`Qcow2::prepare_write`], but returns `Ok(None)` instead of waiting when another
    /// in-flight plan is allocating the same clusters (for single-threaded event loops, which
    /// must complete that plan first).
    pub fn try_prepare_write(&self, offset: u64, len: u64) -> Result<Option<WritePlan<'_>>> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::InvalidArgument("empty write".into()));
        }
        let guard = self.gate.enter();
        let r = self.prepare_inner(offset, len, guard, false);
        self.c(r)
    }

    /// The extent of in-place writable data from `offset` (0 if the first cluster needs work).
    fn in_place_run(&self, t: &mut Tables, offset: u64, len: u64) -> Result<(u64, u64)> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cs();
        let scb = self.geo.subcluster_bits();
        let mut pos = offset;
        let end = offset + len;
        let mut host0 = 0u64;
        let mut expect = 0u64;
        while pos < end {
            let (_, l2_off) = self.l2_for(t, pos);
            if l2_off == 0 {
                break;
            }
            let (e, bm) = self.entry_at(t, l2_off, pos)?;
            if e & OFLAG_COPIED == 0
                || e & OFLAG_COMPRESSED != 0
                || e & OFLAG_ZERO != 0 && !self.geo.extended_l2
            {
                break;
            }
            let host = e & OFFSET_MASK;
            if host == 0 && !self.external_data {
                break;
            }
            let cend = ((pos >> cb) + 1) << cb;
            let stop = cend.min(end);
            if self.geo.extended_l2 {
                let s0 = ((pos & (cs - 1)) >> scb) as u32;
                let s1 = (((stop - 1) & (cs - 1)) >> scb) as u32;
                let mask = sc_mask(s0, s1);
                if bm & mask != mask || (bm >> 32) & mask != 0 {
                    break;
                }
            }
            let h = host + (pos & (cs - 1));
            if pos == offset {
                host0 = h;
            } else if h != expect {
                break;
            }
            expect = h + (stop - pos);
            pos = stop;
        }
        Ok((pos - offset, host0))
    }

    fn prepare_inner<'a>(
        &'a self,
        offset: u64,
        len: u64,
        guard: IoGuard<'a>,
        wait: bool,
    ) -> Result<Option<WritePlan<'a>>> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cs();
        if let Some((n, host)) = crate::hot::data_run(self, offset, len, true) {
            // Written in place, found without the lock (and clear of metadata).
            return Ok(Some(WritePlan {
                img: self,
                _guard: guard,
                offset,
                len: n,
                host_offset: host,
                cow: Vec::new(),
                commits: SmallVec::new(),
                registered: 0..0,
            }));
        }
        {
            let mut t = self.lock_tables_for(offset);
            let (n, host) = match self.data_run_fast(&mut t, offset, len, true) {
                Some(r) => r,
                None => self.in_place_run(&mut t, offset, len)?,
            };
            if n > 0 {
                self.overlap_check(&t, host, n)?;
                return Ok(Some(WritePlan {
                    img: self,
                    _guard: guard,
                    offset,
                    len: n,
                    host_offset: host,
                    cow: Vec::new(),
                    commits: SmallVec::new(),
                    registered: 0..0,
                }));
            }
        }
        // Allocation: a run of clusters within one L2 table.
        let l2_span_clusters = 1u64 << self.geo.l2_bits();
        let c0 = offset >> cb;
        let c_last = (offset + len - 1) >> cb;
        let table_end = (c0 / l2_span_clusters + 1) * l2_span_clusters;
        let c_end = (c_last + 1).min(table_end).min(c0 + MAX_PLAN_CLUSTERS);
        let wanted = c0..c_end;
        if wait {
            self.register(wanted.clone());
        } else if !self.try_register(wanted.clone()) {
            return Ok(None);
        }
        let mut plan = WritePlan {
            img: self,
            _guard: guard,
            offset,
            len: 0,
            host_offset: 0,
            cow: Vec::new(),
            commits: SmallVec::new(),
            registered: wanted,
        };
        self.mark_dirty()?;
        let mut t = lock(&self.tables);
        // State may have changed while waiting.
        let (n, host) = self.in_place_run(&mut t, offset, len)?;
        if n > 0 {
            drop(t);
            self.unregister(std::mem::replace(&mut plan.registered, 0..0));
            plan.len = n;
            plan.host_offset = host;
            return Ok(Some(plan));
        }
        let l2_off = self.ensure_l2_writable(&mut t, offset)?;
        // Collect old entries; the run stops at the first cluster that is writable in place.
        let mut olds: SmallVec<(u64, u64), INLINE_CLUSTERS> = SmallVec::new();
        for c in c0..c_end {
            let (e, bm) = self.entry_at(&mut t, l2_off, c << cb)?;
            if c > c0 {
                let (n, _) = self.in_place_run(&mut t, c << cb, cs)?;
                if n > 0 {
                    break;
                }
            }
            olds.push((e, bm));
            // Clusters whose host cluster is reused are handled alone.
            if c == c0 && self.reusable_host(e).is_some() {
                break;
            }
        }
        let n = olds.len() as u64;
        self.unregister(c0 + n..c_end);
        plan.registered = c0..c0 + n;
        plan.commits = SmallVec::with_capacity(olds.len());
        let req_end = (offset + len).min((c0 + n) << cb);
        plan.len = req_end - offset;

        // Host clusters.
        let (host0, fresh, reused) = if let Some(h) = self.reusable_host(olds[0].0) {
            (h, false, true)
        } else if self.external_data {
            // External data files map guest offsets 1:1 and carry no refcounts.
            (c0 << cb, false, false)
        } else {
            let (h, fresh) = lock(&self.refs).alloc(n)?;
            (h, fresh, false)
        };
        self.overlap_check(&t, host0, n << cb)?;
        plan.host_offset = host0 + (offset & (cs - 1));

        // Entries and copy-on-write regions.
        // (guest, len, entry, bitmap)
        let mut cow_regions: SmallVec<(u64, u64, u64, u64), 4> = SmallVec::new();
        for (i, &(e, bm)) in olds.iter().enumerate() {
            let g = (c0 + i as u64) << cb;
            let w0 = offset.max(g);
            let w1 = req_end.min(g + cs);
            let host = host0 + ((i as u64) << cb);
            let old_kind = self.geo.decode(e)?;
            let (new_bm, regions) = if self.geo.extended_l2 {
                let scb = self.geo.subcluster_bits();
                let s0 = ((w0 - g) >> scb) as u32;
                let s1 = ((w1 - 1 - g) >> scb) as u32;
                let touched = sc_mask(s0, s1);
                let has_data = matches!(
                    old_kind,
                    EntryKind::Normal { .. } | EntryKind::Compressed { .. }
                );
                let (alloc, zero) = match old_kind {
                    EntryKind::Compressed { .. } => (BITMAP_ALL_ALLOC, 0),
                    _ => (bm & BITMAP_ALL_ALLOC, bm >> 32),
                };
                let new_alloc = alloc | touched;
                let new_zero = zero & !touched;
                let regions = if has_data && !reused {
                    // Copy the whole old cluster around the written range.
                    [(g, w0 - g), (w1, g + cs - w1)]
                } else {
                    // Only the partial subclusters at the edges.
                    let a = g + ((s0 as u64) << scb);
                    let b = g + ((s1 as u64 + 1) << scb);
                    [(a, w0 - a), (w1, b - w1)]
                };
                ((new_zero << 32) | new_alloc, regions)
            } else {
                (0, [(g, w0 - g), (w1, g + cs - w1)])
            };
            for (rg, rl) in regions {
                if rl > 0 {
                    cow_regions.push((rg, rl, e, bm));
                }
            }
            let entry = if self.external_data {
                g | OFLAG_COPIED
            } else {
                host | OFLAG_COPIED
            };
            plan.commits.push(Commit {
                guest: g,
                entry,
                bitmap: new_bm,
                old: e,
                free_old: !reused,
            });
        }
        drop(t);
        // A fresh cluster (reads as zero) replacing content that reads as zero with nothing
        // below: publishing the entry before the data lands is invisible (readers see the
        // same zeros, a crash leaves zeros), so commit now and let writes to the rest of
        // the cluster go in place instead of waiting for this one.
        let zero_old = olds.iter().all(|&(e, bm)| {
            e & OFLAG_COMPRESSED == 0
                && e & OFFSET_MASK == 0
                && (!self.geo.extended_l2 || bm & BITMAP_ALL_ALLOC == 0)
        });
        if fresh && !reused && !self.external_data && zero_old && self.backing().is_none() {
            self.commit_inner(&mut plan)?;
            plan.commits.clear();
            return Ok(Some(plan));
        }
        // Read COW sources without any metadata lock, piece by piece (one subcluster at most).
        let scb = self.geo.subcluster_bits();
        for &(rg, rl, e, bm) in cow_regions.iter() {
            let mut pos = rg;
            while pos < rg + rl {
                let stop = (((pos >> scb) + 1) << scb).min(rg + rl);
                let sc = ((pos & (cs - 1)) >> scb) as u32;
                if reused && matches!(self.classify(e, bm, sc)?, MappingKind::Data { .. }) {
                    // Already in place in the reused cluster.
                    pos = stop;
                    continue;
                }
                let mut buf = vec![0u8; (stop - pos) as usize];
                let all_zero = self.read_old(&mut buf, pos, e, bm)?;
                if !(all_zero && fresh) {
                    plan.cow.push((host0 + (pos - (c0 << cb)), buf));
                }
                pos = stop;
            }
        }
        Ok(Some(plan))
    }

    /// A host cluster an entry keeps that a write can fill in place (preallocated zero cluster
    /// or, with subclusters, a cluster with unallocated subclusters), if any.
    fn reusable_host(&self, e: u64) -> Option<u64> {
        if e & OFLAG_COPIED == 0 || e & OFLAG_COMPRESSED != 0 {
            return None;
        }
        let host = e & OFFSET_MASK;
        if host == 0 && !self.external_data {
            return None;
        }
        if self.geo.extended_l2 || e & OFLAG_ZERO != 0 {
            Some(host)
        } else {
            None
        }
    }

    /// Reads what `[g, g+len)` of the old entry shows. Returns whether it is all zero without
    /// data behind it.
    fn read_old(&self, buf: &mut [u8], g: u64, e: u64, bm: u64) -> Result<bool> {
        let scb = self.geo.subcluster_bits();
        let cs = self.geo.cs();
        let mut pos = g;
        let end = g + buf.len() as u64;
        let mut all_zero = true;
        self.hooks.event(DebugEvent::CowRead);
        while pos < end {
            let sc = ((pos & (cs - 1)) >> scb) as u32;
            let stop = (((pos >> scb) + 1) << scb).min(end);
            let dst = &mut buf[(pos - g) as usize..(stop - g) as usize];
            match self.classify(e, bm, sc)? {
                MappingKind::Data { host_offset } => {
                    self.data
                        .read_at(dst, host_offset + (pos & ((1 << scb) - 1)))?;
                    all_zero = false;
                }
                MappingKind::Zero { .. } => dst.fill(0),
                MappingKind::Unallocated => {
                    if let Some(b) = self.backing() {
                        read_clamped(&*b, dst, pos)?;
                        all_zero = false;
                    } else {
                        dst.fill(0);
                    }
                }
                MappingKind::Compressed {
                    host_offset,
                    compressed_len,
                } => {
                    let c = self.read_compressed(host_offset, compressed_len)?;
                    let o = (pos & (cs - 1)) as usize;
                    dst.copy_from_slice(&c[o..o + dst.len()]);
                    all_zero = false;
                }
            }
            pos = stop;
        }
        Ok(all_zero)
    }

    /// Refuses data writes that would hit fixed metadata (QEMU's overlap check, cheap part).
    fn overlap_check(&self, t: &Tables, host: u64, len: u64) -> Result<()> {
        if self.external_data {
            return Ok(());
        }
        let cs = self.geo.cs();
        let overlaps = |a: u64, l: u64| l > 0 && host < a + l && a < host + len;
        let l1_bytes = (t.l1.len() as u64 * 8).div_ceil(cs) * cs;
        let rt_off = self.rt_range.0.load(Ordering::Acquire);
        let rt_len = self.rt_range.1.load(Ordering::Acquire);
        if overlaps(0, cs) || overlaps(t.l1_offset, l1_bytes) || overlaps(rt_off, rt_len) {
            return Err(Error::CorruptionDetected(format!(
                "Preventing invalid write on metadata (overlaps with active metadata) at {host:#x}"
            )));
        }
        let mut c = host / cs * cs;
        while c < host + len {
            if t.l2.contains(c) {
                return Err(Error::CorruptionDetected(format!(
                    "Preventing invalid write on metadata (overlaps with active L2 table) at {c:#x}"
                )));
            }
            c += cs;
        }
        Ok(())
    }

    /// Publishes the L2 entries of an executed plan.
    pub fn commit_write(&self, mut plan: WritePlan<'_>) -> Result<()> {
        if plan.commits.is_empty() {
            return Ok(());
        }
        let r = self.commit_inner(&mut plan);
        self.c(r)
    }

    fn commit_inner(&self, plan: &mut WritePlan<'_>) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let w = self.geo.words();
        let mut t = lock(&self.tables);
        let mut frees = Vec::new();
        for c in plan.commits.iter() {
            let l2_off = self.ensure_l2_writable(&mut t, c.guest)?;
            let i = ((c.guest >> cb) & ((1 << self.geo.l2_bits()) - 1)) as usize;
            let mut dep = self.l2_write_dependency();
            let tab = t.l2.get(l2_off, &mut dep)?;
            tab.put(i * w, c.entry);
            if w == 2 {
                tab.put(i * w + 1, c.bitmap);
            }
            t.l2.mark_dirty(l2_off);
            if c.free_old {
                frees.extend(self.entry_clusters(c.old)?);
            }
        }
        drop(t);
        if !frees.is_empty() {
            self.forget_decompressed();
        }
        self.queue_frees(frees, FreeReason::Other);
        let regs = std::mem::replace(&mut plan.registered, 0..0);
        self.unregister(regs);
        Ok(())
    }

    /// Writes guest data at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let plan = self.prepare_write(offset + done as u64, (buf.len() - done) as u64)?;
            let n = plan.len as usize;
            let data = &buf[done..done + n];
            self.execute_plan(&plan, data)?;
            self.commit_write(plan)?;
            done += n;
        }
        self.maybe_apply_frees()
    }

    /// Performs the data I/O of a plan (the generic layer): COW regions merged with the data
    /// into as few writes as possible.
    pub fn execute_plan(&self, plan: &WritePlan<'_>, data: &[u8]) -> Result<()> {
        if plan.cow.is_empty() {
            self.hooks.event(DebugEvent::WriteAio);
            self.data.write_at(data, plan.host_offset)?;
            return Ok(());
        }
        let start = plan
            .cow
            .iter()
            .map(|(h, _)| *h)
            .chain(std::iter::once(plan.host_offset))
            .min()
            .expect("non-empty");
        let end = plan
            .cow
            .iter()
            .map(|(h, b)| h + b.len() as u64)
            .chain(std::iter::once(plan.host_offset + data.len() as u64))
            .max()
            .expect("non-empty");
        let covered: u64 =
            plan.cow.iter().map(|(_, b)| b.len() as u64).sum::<u64>() + data.len() as u64;
        if covered == end - start {
            let mut merged = vec![0u8; (end - start) as usize];
            for (h, b) in &plan.cow {
                let o = (h - start) as usize;
                merged[o..o + b.len()].copy_from_slice(b);
            }
            let o = (plan.host_offset - start) as usize;
            merged[o..o + data.len()].copy_from_slice(data);
            // One write for data and copy-on-write regions, as QEMU's merged COW.
            self.hooks.event(DebugEvent::WriteAio);
            self.data.write_at(&merged, start)?;
        } else {
            for (h, b) in &plan.cow {
                self.hooks.event(DebugEvent::CowWrite);
                self.data.write_at(b, *h)?;
            }
            self.hooks.event(DebugEvent::WriteAio);
            self.data.write_at(data, plan.host_offset)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zero. With `unmap`, host clusters of fully covered
    /// clusters are released; otherwise they are kept (preallocated zero clusters).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.geo.cs();
        let gran = if self.geo.extended_l2 {
            1u64 << self.geo.subcluster_bits()
        } else {
            cs
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let aligned_start = pos % gran == 0;
            let next = ((pos / gran) + 1) * gran;
            if !aligned_start || next > end || !self.zero_flag_supported() {
                // Partial granule (or no zero flag): write zeros.
                let stop = next.min(end);
                let stop = if self.zero_flag_supported() {
                    stop
                } else {
                    end.min(pos + (1 << 20))
                };
                let z = vec![0u8; (stop - pos) as usize];
                self.write_at(&z, pos)?;
                pos = stop;
                continue;
            }
            // Whole clusters/subclusters up to the end of this cluster run.
            let stop = (end / gran * gran).min(((pos / cs) + 1) * cs);
            let r = self.zero_range(pos, stop - pos, unmap, ZeroMode::Zero);
            self.c(r)?;
            pos = stop;
        }
        self.maybe_apply_frees()
    }

    fn zero_flag_supported(&self) -> bool {
        self.geo.version >= 3 || self.backing().is_none()
    }

    /// Discards `[offset, offset+len)`: whole clusters are released and read as zero (version
    /// 3) or fall through to the backing image (version 2); partial clusters are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_mode(offset, len, ZeroMode::Discard)
    }

    /// Makes the whole image unallocated (reads fall through to the backing image), as
    /// `qemu-img commit` leaves the top image.
    pub fn make_empty(&self) -> Result<()> {
        self.hooks.event(DebugEvent::EmptyImagePrepare);
        self.discard_mode(0, self.size(), ZeroMode::Unallocate)
    }

    fn discard_mode(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.geo.cs();
        let start = offset.div_ceil(cs) * cs;
        let mut end = (offset + len) / cs * cs;
        if offset + len == self.size() {
            end = (offset + len).div_ceil(cs) * cs;
        }
        let mut pos = start;
        while pos < end {
            let stop = end
                .min(pos + (cs << self.geo.l2_bits()) - (pos & ((cs << self.geo.l2_bits()) - 1)));
            let r = self.zero_range(pos, stop - pos, true, mode);
            self.c(r)?;
            pos = stop;
        }
        self.maybe_apply_frees()
    }

    /// Sets whole clusters (or subclusters) in `[pos, pos+len)` (within one L2 table) to zero or
    /// discarded.
    pub(crate) fn zero_range(&self, pos: u64, len: u64, unmap: bool, mode: ZeroMode) -> Result<()> {
        let discard = mode != ZeroMode::Zero;
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cs();
        let w = self.geo.words();
        let c0 = pos >> cb;
        let c1 = (pos + len - 1) >> cb;
        let clusters = c0..c1 + 1;
        let _guard = self.gate.enter();
        self.register(clusters.clone());
        let res = (|| -> Result<()> {
            self.mark_dirty()?;
            let mut t = lock(&self.tables);
            let (_, cur) = self.l2_for(&t, pos);
            if cur == 0 && discard && self.backing().is_none() && self.geo.version < 3 {
                return Ok(());
            }
            let l2_off = self.ensure_l2_writable(&mut t, pos)?;
            let mut frees = Vec::new();
            let has_backing = self.backing().is_some();
            for c in c0..=c1 {
                let g = c << cb;
                let i = (c & ((1 << self.geo.l2_bits()) - 1)) as usize;
                let (e, bm) = self.entry_at(&mut t, l2_off, g)?;
                let (ne, nbm) = if self.geo.extended_l2 {
                    let scb = self.geo.subcluster_bits();
                    let a = pos.max(g);
                    let b = (pos + len).min(g + cs);
                    let mask = sc_mask(((a - g) >> scb) as u32, ((b - 1 - g) >> scb) as u32);
                    if mode == ZeroMode::Unallocate && mask == BITMAP_ALL_ALLOC {
                        frees.extend(self.entry_clusters(e)?);
                        (0, 0)
                    } else if mask == BITMAP_ALL_ALLOC && (unmap || e & OFLAG_COPIED == 0) {
                        frees.extend(self.entry_clusters(e)?);
                        (0, BITMAP_ALL_ZERO)
                    } else if e & OFLAG_COMPRESSED != 0
                        || (e & OFFSET_MASK != 0 && e & OFLAG_COPIED == 0)
                    {
                        // Partial zeroing of a compressed/shared cluster: fall back to writing.
                        drop(t);
                        let z = vec![0u8; (b - a) as usize];
                        self.unregister(clusters.clone());
                        let r = self.write_at(&z, a);
                        self.register(clusters.clone());
                        r?;
                        t = lock(&self.tables);
                        continue;
                    } else {
                        (e, (bm & !mask) | (mask << 32))
                    }
                } else {
                    let keep = !unmap
                        && e & OFLAG_COPIED != 0
                        && e & OFLAG_COMPRESSED == 0
                        && e & OFFSET_MASK != 0;
                    if keep {
                        (e | OFLAG_ZERO, 0)
                    } else {
                        frees.extend(self.entry_clusters(e)?);
                        let allocated = e & OFFSET_MASK != 0 || e & OFLAG_ZERO != 0;
                        if mode == ZeroMode::Unallocate {
                            (0, 0)
                        } else if self.geo.version >= 3 && (!discard || has_backing || allocated) {
                            (OFLAG_ZERO, 0)
                        } else {
                            (0, 0)
                        }
                    }
                };
                let mut dep = self.l2_write_dependency();
                let tab = t.l2.get(l2_off, &mut dep)?;
                tab.put(i * w, ne);
                if w == 2 {
                    tab.put(i * w + 1, nbm);
                }
                t.l2.mark_dirty(l2_off);
            }
            drop(t);
            if !frees.is_empty() {
                self.forget_decompressed();
            }
            self.queue_frees(frees, mode.free_reason());
            Ok(())
        })();
        self.unregister(clusters);
        res
    }

    /// Writes one cluster compressed at the cluster-aligned `offset` (`buf` is a full cluster,
    /// or the rest of the disk for the last cluster). Falls back to a normal write when the
    /// data does not compress.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.compress_cluster(buf, offset)? {
            Some(comp) => self.write_compressed_cluster(&comp, offset),
            None => self.write_at(buf, offset),
        }
    }

    fn check_compressed_target(&self, len: u64, offset: u64) -> Result<()> {
        self.check_writable()?;
        let cs = self.geo.cs();
        if offset % cs != 0 || len > cs {
            return Err(Error::InvalidArgument(
                "compressed writes must cover one aligned cluster".into(),
            ));
        }
        if self.external_data {
            return Err(Error::NotSupported(
                "compression is not supported with an external data file".into(),
            ));
        }
        Ok(())
    }

    /// The first half of [`Qcow2::write_compressed`], which touches no image state (callers
    /// compress in parallel and store in order): compresses the cluster `buf` destined for
    /// the cluster-aligned `offset` with the image's compression type. `None` when it does not
    /// compress; the caller then writes `buf` with [`Qcow2::write_at`].
    pub fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<Option<Vec<u8>>> {
        self.check_compressed_target(buf.len() as u64, offset)?;
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.geo.cs();
        let padded;
        let data: &[u8] = if (buf.len() as u64) < cs {
            let mut v = vec![0u8; cs as usize];
            v[..buf.len()].copy_from_slice(buf);
            padded = v;
            &padded
        } else {
            buf
        };
        let ty = lock(&self.header).compression_type;
        crate::compress::compress(ty, data)
    }

    /// The second half of [`Qcow2::write_compressed`]: stores `comp`, the output of
    /// [`Qcow2::compress_cluster`], as the cluster at `offset`.
    pub fn write_compressed_cluster(&self, comp: &[u8], offset: u64) -> Result<()> {
        self.check_compressed_target(comp.len() as u64, offset)?;
        self.check_range(offset, 1)?;
        if comp.is_empty() || comp.len() as u64 >= self.geo.cs() {
            return Err(Error::InvalidArgument(
                "compressed data must be shorter than a cluster".into(),
            ));
        }
        let _guard = self.gate.enter();
        let c = offset >> self.geo.cluster_bits;
        self.register(c..c + 1);
        let r = (|| -> Result<()> {
            self.mark_dirty()?;
            let mut t = lock(&self.tables);
            let l2_off = self.ensure_l2_writable(&mut t, offset)?;
            let (old, _) = self.entry_at(&mut t, l2_off, offset)?;
            drop(t);
            let host = lock(&self.refs).alloc_bytes(comp.len() as u64)?;
            self.hooks.event(DebugEvent::WriteCompressed);
            self.file.write_at(comp, host)?;
            let x = 62 - (self.geo.cluster_bits - 8);
            let sectors = (host + comp.len() as u64 - 1) / 512 - host / 512;
            let entry = OFLAG_COMPRESSED | (sectors << x) | host;
            self.hooks.event(DebugEvent::L2UpdateCompressed);
            let mut t = lock(&self.tables);
            let l2_off = self.ensure_l2_writable(&mut t, offset)?;
            let w = self.geo.words();
            let i = (c & ((1 << self.geo.l2_bits()) - 1)) as usize;
            let mut dep = self.l2_write_dependency();
            let tab = t.l2.get(l2_off, &mut dep)?;
            tab.put(i * w, entry);
            if w == 2 {
                tab.put(i * w + 1, 0);
            }
            t.l2.mark_dirty(l2_off);
            drop(t);
            let frees = self.entry_clusters(old)?;
            if !frees.is_empty() {
                self.forget_decompressed();
            }
            self.queue_frees(frees, FreeReason::Other);
            Ok(())
        })();
        self.unregister(c..c + 1);
        self.c(r)?;
        self.maybe_apply_frees()
    }

    /// Writes all cached metadata in a crash-consistent order and flushes the storage:
    /// refcounts, then L2 tables, then the deferred refcount decrements.
    pub fn flush(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        let r = self.flush_inner();
        self.c(r)
    }

    fn flush_inner(&self) -> Result<()> {
        if self.external_data {
            self.data.flush()?;
        }
        let mut t = lock(&self.tables);
        {
            let mut dep = self.l2_write_dependency();
            if t.l2.has_dirty() {
                dep()?;
            }
            t.l2.flush()?;
        }
        let ready: Vec<(Vec<u64>, FreeReason)> = {
            let mut p = lock(&self.pending_tags);
            let mut ready = Vec::new();
            p.retain_mut(|(tag, cl, reason)| {
                if self.gate.retired(*tag) {
                    self.pending_count.fetch_sub(cl.len(), Ordering::Relaxed);
                    ready.push((std::mem::take(cl), *reason));
                    false
                } else {
                    true
                }
            });
            ready
        };
        let mut r = lock(&self.refs);
        if !ready.is_empty() {
            // The tables that stopped referencing these clusters are written; make that
            // durable before the decrements can reach the disk.
            self.file.flush()?;
            for (cl, reason) in ready {
                for c in cl {
                    r.free(c, reason)?;
                }
            }
            r.reset_compressed_pos();
        }
        r.flush_blocks()?;
        r.unsynced = false;
        drop(r);
        drop(t);
        self.file.flush()?;
        Ok(())
    }

    /// Flushes and, for lazy refcounts, clears the dirty bit. Called on drop as well.
    pub fn close(&self) -> Result<()> {
        if !self.is_writable() || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if self.is_corrupt() {
            return Ok(());
        }
        self.flush()?;
        // Apply frees that could not retire before (no I/O is in flight any more).
        self.flush()?;
        if self.dirty_marked.load(Ordering::Acquire) {
            self.clear_dirty()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("qcow2: closing the image failed: {e}");
        }
    }
}

/// What [`Qcow2::zero_range`] leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// Reads as zero.
    Zero,
    /// Guest discard: zero (version 3) or unallocated.
    Discard,
    /// Unallocated: reads fall through to the backing image.
    Unallocate,
}

impl ZeroMode {
    /// The discard type of the clusters this mode drops (QEMU's: guest requests, or
    /// `make_empty`'s snapshot type).
    fn free_reason(self) -> FreeReason {
        match self {
            ZeroMode::Zero | ZeroMode::Discard => FreeReason::Request,
            ZeroMode::Unallocate => FreeReason::Snapshot,
        }
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
