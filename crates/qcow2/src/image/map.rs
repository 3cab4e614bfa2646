//! The lookup path: guest offset to [`Mapping`] through the L1 table and the L2 cache
//! (lock-free, locked fast path and general path), loading missing L2 tables without the
//! lock, entry classification and cache cleaning.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::image::{lock, Mapping, MappingKind, Qcow2, Tables};
use crate::l2::L2Words;
use crate::l2::{EntryKind, OFFSET_MASK};

impl Qcow2 {
    fn maybe_clean(&self, t: &mut Tables) {
        let Some(iv) = self.clean_interval else {
            return;
        };
        let mut c = lock(&self.clean);
        if c.last.elapsed() < iv {
            return;
        }
        c.l2_tick = t.l2.clean_unused(c.l2_tick);
        if let Ok(mut r) = self.refs.try_lock() {
            c.rc_tick = r.clean_unused(c.rc_tick);
        }
        c.last = Instant::now();
    }

    /// The hook run before a dirty L2 table is written: refcounts go first.
    pub(crate) fn l2_write_dependency(&self) -> impl FnMut() -> Result<()> + '_ {
        move || {
            if self.lazy {
                return Ok(());
            }
            let mut r = lock(&self.refs);
            r.flush_blocks()?;
            if r.unsynced {
                self.file.flush()?;
                r.unsynced = false;
            }
            Ok(())
        }
    }

    /// Finds the L2 table for guest offset `guest`; returns (l1 index, L2 offset or 0).
    pub(crate) fn l2_for(&self, t: &Tables, guest: u64) -> (usize, u64) {
        let idx = (guest >> (self.geo.cluster_bits + self.geo.l2_bits())) as usize;
        let e = t.l1.get(idx).copied().unwrap_or(0);
        (idx, e & OFFSET_MASK)
    }

    /// Reads the (entry, bitmap) pair for guest cluster `guest` from the table at `l2_off`.
    pub(crate) fn entry_at(&self, t: &mut Tables, l2_off: u64, guest: u64) -> Result<(u64, u64)> {
        let i = ((guest >> self.geo.cluster_bits) & ((1 << self.geo.l2_bits()) - 1)) as usize;
        let w = self.geo.words();
        let mut dep = self.l2_write_dependency();
        let tab = t.l2.get(l2_off, &mut dep)?;
        Ok((tab.at(i * w), if w == 2 { tab.at(i * w + 1) } else { 0 }))
    }

    /// Classifies one subcluster (or cluster) of an entry.
    pub(crate) fn classify(&self, entry: u64, bitmap: u64, sc: u32) -> Result<MappingKind> {
        let kind = self.geo.decode(entry)?;
        if let EntryKind::Compressed { host, len } = kind {
            return Ok(MappingKind::Compressed {
                host_offset: host,
                compressed_len: len,
            });
        }
        if !self.geo.extended_l2 {
            return Ok(match kind {
                EntryKind::Unallocated => MappingKind::Unallocated,
                EntryKind::Zero { host } => MappingKind::Zero {
                    allocated: host != 0,
                },
                EntryKind::Normal { host } => MappingKind::Data { host_offset: host },
                EntryKind::Compressed { .. } => unreachable!("handled above"),
            });
        }
        let alloc = bitmap & (1 << sc) != 0;
        let zero = bitmap & (1 << (sc + 32)) != 0;
        if alloc && zero {
            return Err(Error::CorruptionDetected(format!(
                "Subcluster {sc} both allocated and zero (L2 bitmap {bitmap:#x})"
            )));
        }
        let host = match kind {
            EntryKind::Normal { host } => Some(host),
            _ => None,
        };
        if zero {
            return Ok(MappingKind::Zero {
                allocated: host.is_some(),
            });
        }
        if alloc {
            let host = host.ok_or_else(|| {
                Error::CorruptionDetected(format!(
                    "Subcluster {sc} allocated in an unallocated cluster (entry {entry:#x})"
                ))
            })?;
            return Ok(MappingKind::Data {
                host_offset: host + ((sc as u64) << self.geo.subcluster_bits()),
            });
        }
        Ok(MappingKind::Unallocated)
    }

    /// Maps the longest prefix of `[offset, offset + len)` with one kind of mapping (within one
    /// L2 table). Hold an [`IoGuard`](crate::IoGuard) while using the result for data I/O.
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::InvalidArgument("empty range".into()));
        }
        if let Some((n, host)) = crate::hot::data_run(self, offset, len, false) {
            return Ok(Mapping {
                offset,
                len: n,
                kind: MappingKind::Data { host_offset: host },
            });
        }
        // Holding the gate keeps exclusive operations (which rewrite tables on disk) out while
        // a missing table is read without the lock.
        let _g = self.gate.enter();
        let mut t = self.lock_tables_for(offset);
        if let Some((n, host)) = self.data_run_fast(&mut t, offset, len, false) {
            self.maybe_clean(&mut t);
            return Ok(Mapping {
                offset,
                len: n,
                kind: MappingKind::Data { host_offset: host },
            });
        }
        let r = self.map_locked(&mut t, offset, len);
        self.maybe_clean(&mut t);
        drop(t);
        self.c(r)
    }

    /// Takes the metadata lock with the L2 table for guest offset `guest` in the cache when it
    /// can: a table that is not cached is read from the file *without* the lock (so a cache
    /// miss does not hold up other requests' lookups), then inserted if nothing entered or left
    /// the cache and no L1 entry changed meanwhile (the metadata generation did not move, so
    /// the table on disk was current). Anything unusual (invalid offset, read error, a moved
    /// generation) is left to the locked path, which loads or reports it. The caller holds an
    /// [`IoGuard`](crate::IoGuard), which keeps exclusive operations out meanwhile.
    pub(crate) fn lock_tables_for(&self, guest: u64) -> MutexGuard<'_, Tables> {
        let t = lock(&self.tables);
        let (_, off) = self.l2_for(&t, guest);
        // With a debug listener every table load takes the locked path, so an error injected
        // on `l2_load` hits the load whose failure is reported.
        if off == 0
            || t.l2.contains(off)
            || t.l2.validate_offset(off).is_err()
            || self.hooks.debug.is_some()
        {
            return t;
        }
        let gen = t.gen.load(Ordering::Acquire);
        drop(t);
        let cs = self.geo.cs();
        let mut raw = vec![0u8; cs as usize];
        let read = self.file.len().is_ok_and(|l| off + cs <= l)
            && self.file.read_at(&mut raw, off).is_ok();
        let mut t = lock(&self.tables);
        if read && t.gen.load(Ordering::Acquire) == gen && !t.l2.contains(off) {
            let data = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
                .collect();
            let mut dep = self.l2_write_dependency();
            if let Err(e) = t.l2.insert(off, data, false, &mut dep) {
                // The locked path meets (and reports) it again.
                log::debug!("loading the L2 table at {off:#x} ahead failed: {e}");
            }
        }
        t
    }

    /// The locked fast path of lookups: the run of plain data clusters (standard L2 entries,
    /// table cached) that `[offset, offset + len)` starts with, as (bytes, host offset);
    /// `None` for anything else (unallocated, zero, compressed, subclusters, external data
    /// file, a table to load, an entry to report as corrupt), which the general path handles.
    /// With `writable`, only clusters that may be written in place (refcount 1) count. The
    /// table is remembered for this thread's lock-free lookups ([`crate::hot`]).
    #[inline]
    pub(crate) fn data_run_fast(
        &self,
        t: &mut Tables,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Option<(u64, u64)> {
        if self.geo.extended_l2 || self.external_data {
            return None;
        }
        let cb = self.geo.cluster_bits;
        let l2_bits = self.geo.l2_bits();
        let l1i = offset >> (cb + l2_bits);
        let l1e = *t.l1.get(l1i as usize)?;
        let tab = t.l2.peek(l1e & OFFSET_MASK)?.clone();
        crate::hot::remember(self, t, l1i, &tab);
        crate::hot::run_in(&tab, cb, l2_bits, offset, len, writable)
    }

    pub(crate) fn map_locked(&self, t: &mut Tables, offset: u64, len: u64) -> Result<Mapping> {
        let cb = self.geo.cluster_bits;
        let scb = self.geo.subcluster_bits();
        let l1_span = 1u64 << (cb + self.geo.l2_bits());
        let end = (offset + len).min((offset / l1_span + 1) * l1_span);
        let (_, l2_off) = self.l2_for(t, offset);
        if l2_off == 0 {
            return Ok(Mapping {
                offset,
                len: end - offset,
                kind: MappingKind::Unallocated,
            });
        }
        let scs = 1u64 << scb;
        let mut pos = offset;
        let mut first: Option<MappingKind> = None;
        let mut expect_host = 0u64;
        while pos < end {
            let (e, bm) = self.entry_at(t, l2_off, pos)?;
            let sc = ((pos >> scb) & ((1 << (cb - scb)) - 1)) as u32;
            let kind = self.classify(e, bm, sc)?;
            let in_sc = pos & (scs - 1);
            let step = (scs - in_sc).min(end - pos);
            match (first, kind) {
                (None, k) => {
                    first = Some(match k {
                        MappingKind::Data { host_offset } => {
                            expect_host = host_offset + in_sc + step;
                            MappingKind::Data {
                                host_offset: host_offset + in_sc,
                            }
                        }
                        k => k,
                    });
                    if let MappingKind::Compressed { .. } = k {
                        // One cluster at a time.
                        let cend = ((pos >> cb) + 1) << cb;
                        return Ok(Mapping {
                            offset,
                            len: cend.min(end) - offset,
                            kind: first.expect("set"),
                        });
                    }
                }
                (Some(MappingKind::Data { .. }), MappingKind::Data { host_offset })
                    if host_offset == expect_host =>
                {
                    expect_host += step;
                }
                (Some(MappingKind::Zero { allocated: a }), MappingKind::Zero { allocated: b })
                    if a == b => {}
                (Some(MappingKind::Unallocated), MappingKind::Unallocated) => {}
                _ => break,
            }
            pos += step;
        }
        Ok(Mapping {
            offset,
            len: pos - offset,
            kind: first.expect("at least one step"),
        })
    }
}
