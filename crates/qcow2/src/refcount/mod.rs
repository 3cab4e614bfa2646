//! Refcount table, refcount block cache and the cluster allocator.
//!
//! This module holds the [`Refcounts`] state, the entry packing, the block cache, reading and
//! updating single refcounts, and flushing; the allocator is in `alloc`, and the changes to the
//! table's structure (new blocks, growth, dropping unused blocks) are in `table`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::events::{DebugEvent, FreeReason, FreedRuns, Hooks};
use crate::header::MAX_REFTABLE_SIZE;
use crate::storage::Storage;

mod alloc;
mod table;

/// Host offsets are limited to bits 9..55 of table entries.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Refcount table / block offset mask.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

struct Block {
    data: Vec<u8>,
    dirty: bool,
    last_used: u64,
}

/// Reads one refcount entry of `order` at `idx` from a refcount block.
pub(crate) fn get_entry(data: &[u8], order: u32, idx: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            ((data[bit / 8] >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
        }
        3 => data[idx] as u64,
        4 => u16::from_be_bytes([data[2 * idx], data[2 * idx + 1]]) as u64,
        5 => u32::from_be_bytes(data[4 * idx..4 * idx + 4].try_into().expect("4")) as u64,
        _ => u64::from_be_bytes(data[8 * idx..8 * idx + 8].try_into().expect("8")),
    }
}

/// Writes one refcount entry (the value must fit the width).
pub(crate) fn set_entry(data: &mut [u8], order: u32, idx: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            data[bit / 8] = (data[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => data[idx] = v as u8,
        4 => data[2 * idx..2 * idx + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => data[4 * idx..4 * idx + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => data[8 * idx..8 * idx + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// The refcount structures of an image and the allocator working on them.
pub(crate) struct Refcounts {
    file: Arc<dyn Storage>,
    pub cluster_bits: u32,
    pub order: u32,
    /// Refcount table entries.
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u32,
    cache: crate::gate::OffsetMap<Block>,
    /// Refcount table offset and size in bytes, readable without the lock.
    pub shared_table: Arc<(AtomicU64, AtomicU64)>,
    cap: usize,
    tick: u64,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// Clusters at or beyond this index have never been written (read as zero).
    pub fresh_from: u64,
    /// Next free byte for compressed data (0: none).
    compressed_pos: u64,
    /// Set when refcount blocks were written since the last sync of the file.
    pub unsynced: bool,
    /// With direct I/O, fresh clusters are reserved (fallocate) this many bytes ahead, so data
    /// writes do not extend the file: file systems serialise extending direct writes.
    reserve_ahead: u64,
    reserved_until: u64,
    /// Debug events and the freed-cluster hooks.
    pub hooks: Hooks,
    /// Clusters that dropped to refcount zero since the last [`Refcounts::finish_frees`].
    freed: FreedRuns,
}

impl Refcounts {
    pub fn load(
        file: Arc<dyn Storage>,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        cache_bytes: u64,
    ) -> Result<Self> {
        let bytes = table_clusters as u64 * (1 << cluster_bits);
        if bytes > MAX_REFTABLE_SIZE {
            return Err(Error::invalid("Reference count table too large"));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_at(&mut raw, table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect();
        let flen = file.len()?;
        let cs = 1u64 << cluster_bits;
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            cache: Default::default(),
            shared_table: Arc::new((
                AtomicU64::new(table_offset),
                AtomicU64::new(table_clusters as u64 * cs),
            )),
            cap: (cache_bytes >> cluster_bits).max(4) as usize,
            tick: 0,
            free_hint: 0,
            fresh_from: flen.div_ceil(cs),
            compressed_pos: 0,
            unsynced: false,
            reserve_ahead: if file.alignment() > 1 { 1 << 20 } else { 0 },
            reserved_until: flen,
            hooks: Hooks::default(),
            freed: FreedRuns::default(),
            file,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of refcount entries per block.
    pub fn rb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// Largest refcount value.
    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// First cluster index not covered by the refcount table.
    pub fn coverage_end(&self) -> u64 {
        (self.table.len() as u64) << self.rb_bits()
    }

    fn block_offset(&self, rt: usize) -> Result<u64> {
        let e = self.table[rt];
        let off = e & REFT_OFFSET_MASK;
        if e & !REFT_OFFSET_MASK != 0 && off == 0 {
            return Err(Error::CorruptionDetected(format!(
                "Refblock offset {e:#x} unaligned (reftable index: {rt:#x})"
            )));
        }
        if off % self.cs() != 0 || off >= MAX_HOST_OFFSET {
            return Err(Error::CorruptionDetected(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {rt:#x})"
            )));
        }
        Ok(off)
    }

    fn load_block(&mut self, off: u64) -> Result<&mut Block> {
        self.tick += 1;
        let tick = self.tick;
        if !self.cache.contains_key(&off) {
            if off + self.cs() > self.file.len()? {
                return Err(Error::CorruptionDetected(format!(
                    "Refblock at {off:#x} lies beyond the end of the image file"
                )));
            }
            if self.cache.len() >= self.cap {
                self.evict()?;
            }
            let mut data = vec![0u8; self.cs() as usize];
            self.hooks.event(DebugEvent::RefblockLoad);
            self.file.read_at(&mut data, off)?;
            self.cache.insert(
                off,
                Block {
                    data,
                    dirty: false,
                    last_used: tick,
                },
            );
        }
        let b = self.cache.get_mut(&off).expect("just inserted");
        b.last_used = tick;
        Ok(b)
    }

    fn evict(&mut self) -> Result<()> {
        let victim = self
            .cache
            .iter()
            .min_by_key(|(_, b)| (b.dirty, b.last_used))
            .map(|(o, _)| *o);
        if let Some(off) = victim {
            let b = self.cache.remove(&off).expect("present");
            if b.dirty {
                self.hooks.event(DebugEvent::RefblockUpdatePart);
                self.file.write_at(&b.data, off)?;
                self.unsynced = true;
            }
        }
        Ok(())
    }

    /// Drops clean cached blocks not used since `since_tick`; returns the current tick.
    pub fn clean_unused(&mut self, since_tick: u64) -> u64 {
        self.cache
            .retain(|_, b| b.dirty || b.last_used > since_tick);
        self.tick
    }

    /// Refcount of cluster `idx`.
    pub fn get(&mut self, idx: u64) -> Result<u64> {
        let rt = (idx >> self.rb_bits()) as usize;
        if rt >= self.table.len() {
            return Ok(0);
        }
        let off = self.block_offset(rt)?;
        if off == 0 {
            return Ok(0);
        }
        let order = self.order;
        let i = (idx & ((1 << self.rb_bits()) - 1)) as usize;
        let b = self.load_block(off)?;
        Ok(get_entry(&b.data, order, i))
    }

    /// Sets the refcount of a cluster whose refcount block exists.
    fn set_existing(&mut self, idx: u64, v: u64) -> Result<()> {
        let rt = (idx >> self.rb_bits()) as usize;
        let off = if rt < self.table.len() {
            self.block_offset(rt)?
        } else {
            0
        };
        if off == 0 {
            return Err(Error::CorruptionDetected(format!(
                "refcount block for cluster {idx:#x} missing"
            )));
        }
        let order = self.order;
        let i = (idx & ((1 << self.rb_bits()) - 1)) as usize;
        let b = self.load_block(off)?;
        set_entry(&mut b.data, order, i, v);
        b.dirty = true;
        Ok(())
    }

    /// Adds `delta` to the refcount of cluster `idx`, creating refcount blocks when needed.
    pub fn update(&mut self, idx: u64, delta: i64) -> Result<u64> {
        self.update_for(idx, delta, FreeReason::Other)
    }

    /// Drops one reference to cluster `idx`; if that frees it, it is reported (and discarded
    /// when `reason` passes) at the next [`Refcounts::finish_frees`].
    pub fn free(&mut self, idx: u64, reason: FreeReason) -> Result<u64> {
        self.update_for(idx, -1, reason)
    }

    pub fn update_for(&mut self, idx: u64, delta: i64, reason: FreeReason) -> Result<u64> {
        if delta < 0 {
            self.hooks.event(DebugEvent::ClusterFree);
        }
        if delta > 0 && idx << self.cluster_bits >= self.file.len()? {
            return Err(Error::CorruptionDetected(format!(
                "reference to cluster {idx:#x} beyond the end of the image file"
            )));
        }
        let cur = self.get(idx)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
                .filter(|v| *v <= self.max_refcount())
                .ok_or_else(|| {
                    Error::CorruptionDetected(format!("refcount overflow for cluster {idx:#x}"))
                })?
        } else {
            cur.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::CorruptionDetected(format!(
                    "refcount of cluster {idx:#x} would drop below zero"
                ))
            })?
        };
        if new > 0 {
            self.ensure_block(idx)?;
        }
        if new != cur {
            self.set_existing(idx, new)?;
        }
        if new == 0 && cur != 0 {
            self.free_hint = self.free_hint.min(idx);
            self.freed.push(idx, reason);
        }
        Ok(new)
    }

    /// Reports the clusters freed since the last call to the freed hook and discards those
    /// whose reason passes. Runs under the refcount lock, and every allocation runs it first,
    /// so no cluster is handed out again before its discard reached the file.
    pub fn finish_frees(&mut self) {
        if !self.freed.is_empty() {
            self.freed
                .process(&self.hooks, &*self.file, self.cluster_bits);
        }
    }

    /// Writes every dirty block (after [`Refcounts::finish_frees`]). Returns whether anything
    /// was written.
    pub fn flush_blocks(&mut self) -> Result<bool> {
        self.finish_frees();
        let mut wrote = false;
        let mut dirty: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            let b = self.cache.get_mut(&off).expect("present");
            self.hooks.event(DebugEvent::RefblockUpdatePart);
            self.file.write_at(&b.data, off)?;
            b.dirty = false;
            wrote = true;
        }
        if wrote {
            self.unsynced = true;
        }
        Ok(wrote)
    }

    /// Index of the last cluster below `end` (a cluster index) with a non-zero refcount.
    pub fn last_used_cluster(&mut self, end: u64) -> Result<Option<u64>> {
        let mut i = end;
        while i > 0 {
            i -= 1;
            let rt = (i >> self.rb_bits()) as usize;
            if rt >= self.table.len() || self.block_offset(rt)? == 0 {
                // No block: nothing in its range is used; skip the range.
                i = (rt as u64) << self.rb_bits();
                continue;
            }
            if self.get(i)? > 0 {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Records that the file was truncated to `len` bytes: everything past it reads as zero.
    pub fn truncated(&mut self, len: u64) {
        self.fresh_from = self.fresh_from.min(len.div_ceil(self.cs()));
        self.reserved_until = len;
        self.compressed_pos = 0;
    }

    /// Reloads the table from disk (after repair).
    pub fn reload(&mut self, table_offset: u64, table_clusters: u32) -> Result<()> {
        let fresh = Self::load(
            self.file.clone(),
            self.cluster_bits,
            self.order,
            table_offset,
            table_clusters,
            (self.cap as u64) << self.cluster_bits,
        )?;
        let fresh_from = self.fresh_from.max(fresh.fresh_from);
        let shared = self.shared_table.clone();
        *self = fresh;
        self.fresh_from = fresh_from;
        shared.0.store(table_offset, Ordering::Release);
        shared
            .1
            .store(table_clusters as u64 * self.cs(), Ordering::Release);
        self.shared_table = shared;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_packing_all_orders() {
        for order in 0..=6u32 {
            let mut data = vec![0u8; 512];
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_entry(&mut data, order, i, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(get_entry(&data, order, i), (i as u64 * 7 + 3) & max);
            }
        }
        // QEMU's bit order for sub-byte widths: LSB first.
        let mut d = vec![0u8; 1];
        set_entry(&mut d, 0, 0, 1);
        assert_eq!(d[0], 1);
    }
}
