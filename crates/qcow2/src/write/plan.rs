//! Allocation planning: [`Qcow2::prepare_write`] finds the in-place run of a write or
//! allocates host clusters for it, builds the L2 entries to publish and reads the
//! copy-on-write data, refusing writes onto active metadata.

use std::sync::atomic::Ordering;

use crate::backing::read_clamped;
use crate::error::{Error, Result};
use crate::events::DebugEvent;
use crate::gate::IoGuard;
use crate::image::{lock, MappingKind, Qcow2, Tables};
use crate::l2::{EntryKind, BITMAP_ALL_ALLOC, OFFSET_MASK, OFLAG_COMPRESSED};
use crate::l2::{OFLAG_COPIED, OFLAG_ZERO};
use crate::small::SmallVec;
use crate::write::{sc_mask, Commit, WritePlan};

/// Largest number of clusters one allocation plan covers.
const MAX_PLAN_CLUSTERS: u64 = 512;

/// Old entries an allocation collects on the stack (more spill to the heap).
const INLINE_CLUSTERS: usize = 16;

impl Qcow2 {
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
            return Ok(Some(WritePlan::in_place(self, guard, offset, n, host)));
        }
        {
            let mut t = self.lock_tables_for(offset);
            let (n, host) = match self.data_run_fast(&mut t, offset, len, true) {
                Some(r) => r,
                None => self.in_place_run(&mut t, offset, len)?,
            };
            if n > 0 {
                self.overlap_check(&t, host, n)?;
                return Ok(Some(WritePlan::in_place(self, guard, offset, n, host)));
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
        let ol = self.overlap;
        let cs = self.geo.cs();
        let overlaps = |a: u64, l: u64| l > 0 && host < a + l && a < host + len;
        let l1_bytes = (t.l1.len() as u64 * 8).div_ceil(cs) * cs;
        let rt_off = self.rt_range.0.load(Ordering::Acquire);
        let rt_len = self.rt_range.1.load(Ordering::Acquire);
        if (ol.main_header && overlaps(0, cs))
            || (ol.active_l1 && overlaps(t.l1_offset, l1_bytes))
            || (ol.refcount_table && overlaps(rt_off, rt_len))
        {
            return Err(Error::CorruptionDetected(format!(
                "Preventing invalid write on metadata (overlaps with active metadata) at {host:#x}"
            )));
        }
        let mut c = host / cs * cs;
        while ol.active_l2 && c < host + len {
            if t.l2.contains(c) {
                return Err(Error::CorruptionDetected(format!(
                    "Preventing invalid write on metadata (overlaps with active L2 table) at {c:#x}"
                )));
            }
            c += cs;
        }
        Ok(())
    }
}
