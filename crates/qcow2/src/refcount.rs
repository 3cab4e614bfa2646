//! Refcount table, refcount block cache and the cluster allocator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::events::{DebugEvent, FreeReason, FreedRuns, Hooks};
use crate::header::MAX_REFTABLE_SIZE;
use crate::storage::Storage;

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

    /// Makes sure the refcount block covering `idx` exists.
    fn ensure_block(&mut self, idx: u64) -> Result<()> {
        loop {
            let rt = idx >> self.rb_bits();
            if rt >= self.table.len() as u64 {
                self.grow_table(rt)?;
                continue;
            }
            if self.block_offset(rt as usize)? != 0 {
                return Ok(());
            }
            // Place the new block at the first free cluster it covers (other than idx), or
            // anywhere else free.
            let first = rt << self.rb_bits();
            let end = first + (1 << self.rb_bits());
            let pos = if idx != first { first } else { first + 1 };
            if pos < end {
                self.install_block(rt as usize, pos)?;
            } else {
                // One-entry blocks cannot cover themselves and another cluster.
                let (off, _) = self.alloc(1)?;
                self.write_block_at(rt as usize, off, None)?;
            }
        }
    }

    /// Creates the refcount block for table index `rt` at cluster `pos`, which it covers.
    fn install_block(&mut self, rt: usize, pos: u64) -> Result<()> {
        let off = pos << self.cluster_bits;
        let i = (pos & ((1 << self.rb_bits()) - 1)) as usize;
        self.write_block_at(rt, off, Some(i))
    }

    fn write_block_at(&mut self, rt: usize, off: u64, self_index: Option<usize>) -> Result<()> {
        let mut data = vec![0u8; self.cs() as usize];
        if let Some(i) = self_index {
            set_entry(&mut data, self.order, i, 1);
        }
        self.write_block_data(rt, off, data)
    }

    /// The refcount table indices without a block among those covering the clusters
    /// `[start, start + n + k)`, where `k` is their number (the new blocks go right after the
    /// `n` clusters and may need blocks themselves). Indices past the table count as missing.
    fn missing_blocks_for(&mut self, start: u64, n: u64) -> Result<u64> {
        Ok(self.missing_ranges(start, n)?.len() as u64)
    }

    fn missing_ranges(&mut self, start: u64, n: u64) -> Result<Vec<u64>> {
        let rb = self.rb_bits();
        let mut missing = Vec::new();
        loop {
            let end = start + n + missing.len() as u64;
            let mut now = Vec::new();
            for rt in (start >> rb)..=((end - 1) >> rb) {
                if rt >= self.table.len() as u64 || self.block_offset(rt as usize)? == 0 {
                    now.push(rt);
                }
            }
            if now.len() <= missing.len() {
                return Ok(missing);
            }
            missing = now;
        }
    }

    /// Creates the blocks [`Refcounts::missing_ranges`] names for an allocation of `n`
    /// clusters at `start`, at the clusters right after them, each block written with the
    /// refcounts of the new blocks it covers before the table points at it. Returns how many
    /// clusters the blocks take.
    fn create_blocks_for(&mut self, start: u64, n: u64) -> Result<u64> {
        let rb = self.rb_bits();
        let ranges = self.missing_ranges(start, n)?;
        let k = ranges.len() as u64;
        if k == 0 {
            return Ok(0);
        }
        if ranges.iter().any(|&rt| rt >= self.table.len() as u64) {
            return Err(Error::CorruptionDetected(
                "allocation beyond the refcount table".into(),
            ));
        }
        let places: Vec<u64> = (start + n..start + n + k).collect();
        // Block clusters covered by blocks that exist already: counted there first.
        let mut counted_elsewhere = false;
        for &p in &places {
            if !ranges.contains(&(p >> rb)) {
                self.set_existing(p, 1)?;
                counted_elsewhere = true;
            }
        }
        if counted_elsewhere {
            self.flush_blocks()?;
        }
        for (&rt, &p) in ranges.iter().zip(&places) {
            let mut data = vec![0u8; self.cs() as usize];
            for &q in &places {
                if q >> rb == rt {
                    set_entry(&mut data, self.order, (q & ((1 << rb) - 1)) as usize, 1);
                }
            }
            self.write_block_data(rt as usize, p << self.cluster_bits, data)?;
        }
        Ok(k)
    }

    /// Writes a new refcount block `data` at `off` and points table entry `rt` at it.
    fn write_block_data(&mut self, rt: usize, off: u64, data: Vec<u8>) -> Result<()> {
        if off >= MAX_HOST_OFFSET {
            return Err(Error::NotSupported("image file too large".into()));
        }
        self.hooks.event(DebugEvent::RefblockAlloc);
        self.hooks.event(DebugEvent::RefblockAllocWrite);
        self.file.write_at(&data, off)?;
        self.table[rt] = off;
        self.hooks.event(DebugEvent::RefblockAllocHookup);
        self.file
            .write_at(&off.to_be_bytes(), self.table_offset + rt as u64 * 8)?;
        self.unsynced = true;
        self.fresh_from = self.fresh_from.max((off >> self.cluster_bits) + 1);
        if self.cache.len() >= self.cap {
            self.evict()?;
        }
        self.tick += 1;
        self.cache.insert(
            off,
            Block {
                data,
                dirty: false,
                last_used: self.tick,
            },
        );
        Ok(())
    }

    /// Grows the refcount table so that index `needed_rt` exists, QEMU-style: the new table and
    /// the blocks covering it go past everything in use, then the header is switched over.
    fn grow_table(&mut self, needed_rt: u64) -> Result<()> {
        self.hooks.event(DebugEvent::ReftableGrow);
        let cs = self.cs();
        let per_cluster = cs / 8;
        let rb = self.rb_bits();
        let mut new_clusters =
            (self.table_clusters as u64 * 3 / 2 + 1).max((needed_rt + 1).div_ceil(per_cluster));
        let area = self.coverage_end().max(self.fresh_from);
        let mut blocks;
        loop {
            blocks = 0u64;
            loop {
                let total = new_clusters + blocks;
                let first_rt = area >> rb;
                let last_rt = (area + total - 1) >> rb;
                let need = (first_rt..=last_rt)
                    .filter(|&r| r >= self.table.len() as u64 || self.table[r as usize] == 0)
                    .count() as u64;
                if need <= blocks {
                    break;
                }
                blocks = need;
            }
            let last_rt = (area + new_clusters + blocks - 1) >> rb;
            if new_clusters * per_cluster > last_rt.max(needed_rt) {
                break;
            }
            new_clusters = (last_rt.max(needed_rt) + 1).div_ceil(per_cluster);
        }
        if new_clusters * cs > MAX_REFTABLE_SIZE {
            return Err(Error::NotSupported(
                "refcount table would exceed its maximum size".into(),
            ));
        }
        let total = new_clusters + blocks;
        if (area + total) << self.cluster_bits >= MAX_HOST_OFFSET {
            return Err(Error::NotSupported("image file too large".into()));
        }
        // Build the new blocks.
        let mut new_table = self.table.clone();
        new_table.resize((new_clusters * per_cluster) as usize, 0);
        let first_rt = area >> rb;
        let last_rt = (area + total - 1) >> rb;
        let mut next_block = area;
        for r in first_rt..=last_rt {
            let missing = r >= self.table.len() as u64 || self.table[r as usize] == 0;
            if !missing {
                // Existing block: bump the refcounts of area clusters it covers.
                let lo = (r << rb).max(area);
                let hi = ((r + 1) << rb).min(area + total);
                for c in lo..hi {
                    self.set_existing(c, 1)?;
                }
                continue;
            }
            let mut data = vec![0u8; cs as usize];
            let lo = (r << rb).max(area);
            let hi = ((r + 1) << rb).min(area + total);
            for c in lo..hi {
                set_entry(&mut data, self.order, (c - (r << rb)) as usize, 1);
            }
            let off = next_block << self.cluster_bits;
            next_block += 1;
            self.hooks.event(DebugEvent::RefblockAllocWriteBlocks);
            self.file.write_at(&data, off)?;
            new_table[r as usize] = off;
        }
        self.flush_blocks()?;
        let table_off = (area + blocks) << self.cluster_bits;
        let mut raw = Vec::with_capacity(new_table.len() * 8);
        for e in &new_table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.hooks.event(DebugEvent::RefblockAllocWriteTable);
        self.file.write_at(&raw, table_off)?;
        self.file.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(new_clusters as u32).to_be_bytes());
        self.hooks.event(DebugEvent::RefblockAllocSwitchTable);
        self.file.write_at(&hdr, 48)?;
        self.file.flush()?;
        let old_off = self.table_offset;
        let old_clusters = self.table_clusters as u64;
        self.table = new_table;
        self.table_offset = table_off;
        self.table_clusters = new_clusters as u32;
        self.shared_table.0.store(table_off, Ordering::Release);
        self.shared_table
            .1
            .store(new_clusters * cs, Ordering::Release);
        self.fresh_from = self.fresh_from.max(area + total);
        // Drop the cached copies of new blocks (none were cached) and free the old table.
        for c in 0..old_clusters {
            self.update((old_off >> self.cluster_bits) + c, -1)?;
        }
        log::debug!(
            "refcount table grown to {new_clusters} clusters at {table_off:#x} ({blocks} new blocks)"
        );
        Ok(())
    }

    /// Allocates `n` contiguous clusters with refcount 1. Returns the byte offset and whether
    /// the clusters are fresh (never written, so they read as zero).
    pub fn alloc(&mut self, n: u64) -> Result<(u64, bool)> {
        self.hooks.event(DebugEvent::ClusterAlloc);
        let mut start = self.free_hint;
        let mut run = 0u64;
        let mut i = start;
        let rb = self.rb_bits();
        // First free cluster seen: everything before it is in use.
        let mut first_free: Option<u64> = None;
        // Ranges without a refcount block are entirely free; the blocks they need go right
        // after the allocated clusters (placing them at the start of their ranges would cut
        // every run longer than one block's coverage, so large allocations never fit).
        loop {
            if run > 0 && run >= n && run >= n + self.missing_blocks_for(start, n)? {
                break;
            }
            if (i + n) << self.cluster_bits >= MAX_HOST_OFFSET {
                return Err(Error::NotSupported("image file too large".into()));
            }
            let rt = i >> rb;
            if rt >= self.table.len() as u64 {
                self.grow_table(rt)?;
                start = self.free_hint;
                i = start;
                run = 0;
                first_free = None;
                continue;
            }
            if self.block_offset(rt as usize)? == 0 {
                let end = (rt + 1) << rb;
                if run == 0 {
                    start = i;
                }
                first_free.get_or_insert(i);
                run += end - i;
                i = end;
                continue;
            }
            if self.get(i)? == 0 {
                if run == 0 {
                    start = i;
                }
                first_free.get_or_insert(i);
                run += 1;
            } else {
                run = 0;
            }
            i += 1;
        }
        if start == 0 {
            return Err(Error::CorruptionDetected(
                "the header cluster has refcount 0".into(),
            ));
        }
        // Clusters freed since the last batch may be among those handed out now: their
        // discards must reach the file before the new owner writes them.
        self.finish_frees();
        let fresh = start >= self.fresh_from;
        let n_all = n + self.create_blocks_for(start, n)?;
        for c in start..start + n {
            self.set_existing(c, 1)?;
        }
        self.free_hint = match first_free {
            Some(f) if f < start => f,
            _ => start + n_all,
        };
        self.fresh_from = self.fresh_from.max(start + n_all);
        let end = (start + n_all) << self.cluster_bits;
        if fresh && end > self.reserved_until {
            // Everything from here on is unallocated and was never written, and every data
            // write in flight targets clusters below `start`: growing the file here cannot
            // cut anything off.
            if self.reserve_ahead > 0 {
                // Direct I/O: reserve ahead so data writes never extend the file (file
                // systems serialise extending direct writes).
                let from = self.reserved_until.max(start << self.cluster_bits);
                let to = end + self.reserve_ahead;
                self.file.write_zeroes(from, to - from)?;
                self.reserved_until = to;
            } else {
                // A cluster published before its data lands (see prepare_write) must lie
                // inside the file, or a crash leaves an entry past the end of the file.
                // Grown in 1 MiB steps: one truncate per many allocations.
                let to = end + (1 << 20);
                if self.file.len()? < to {
                    self.file.set_len(to)?;
                }
                self.reserved_until = to;
            }
        }
        Ok((start << self.cluster_bits, fresh))
    }

    /// Allocates `size` bytes for compressed data (sharing clusters like QEMU does).
    pub fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        self.hooks.event(DebugEvent::ClusterAllocBytes);
        let cs = self.cs();
        let pos = self.compressed_pos;
        if pos != 0 && pos % cs != 0 && size <= cs - pos % cs {
            let idx = pos >> self.cluster_bits;
            let cur = self.get(idx)?;
            if cur > 0 && cur < self.max_refcount() {
                self.update(idx, 1)?;
                self.compressed_pos = pos + size;
                return Ok(pos);
            }
        }
        let (off, _) = self.alloc(size.div_ceil(cs))?;
        self.compressed_pos = off + size;
        Ok(off)
    }

    /// Forgets the shared compressed-data cluster (after frees that may have touched it).
    pub fn reset_compressed_pos(&mut self) {
        self.compressed_pos = 0;
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

    /// Drops refcount blocks that count nothing but (possibly) themselves, as QEMU does when
    /// shrinking an image (`qcow2_shrink_reftable`): the table is rewritten without them and
    /// their own refcounts are cleared. One pass, like QEMU's.
    pub fn drop_unused_blocks(&mut self) -> Result<()> {
        let rb = self.rb_bits();
        let cb = self.cluster_bits;
        let order = self.order;
        let mut dropped = Vec::new();
        for i in 0..self.table.len() {
            let off = self.block_offset(i)?;
            if off == 0 {
                continue;
            }
            let own = (off >> cb) >> rb == i as u64;
            let own_idx = ((off >> cb) & ((1 << rb) - 1)) as usize;
            let b = self.load_block(off)?;
            let unused = if own {
                let saved = get_entry(&b.data, order, own_idx);
                set_entry(&mut b.data, order, own_idx, 0);
                let z = b.data.iter().all(|&x| x == 0);
                set_entry(&mut b.data, order, own_idx, saved);
                z
            } else {
                b.data.iter().all(|&x| x == 0)
            };
            if unused {
                dropped.push(i);
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        let mut raw = Vec::with_capacity(self.table.len() * 8);
        for (i, e) in self.table.iter().enumerate() {
            let v = if dropped.contains(&i) { 0 } else { *e };
            raw.extend_from_slice(&v.to_be_bytes());
        }
        self.hooks.event(DebugEvent::ReftableUpdate);
        self.file.write_at(&raw, self.table_offset)?;
        self.file.flush()?;
        for &i in &dropped {
            let off = self.block_offset(i)?;
            let idx = off >> cb;
            let covering = (idx >> rb) as usize;
            if covering != i && !dropped.contains(&covering) {
                if self.get(idx)? != 1 {
                    return Err(Error::CorruptionDetected(format!(
                        "Invalid refcount of refcount block at {off:#x}"
                    )));
                }
                self.set_existing(idx, 0)?;
            }
            self.free_hint = self.free_hint.min(idx);
            self.cache.remove(&off);
            self.table[i] = 0;
        }
        log::debug!("dropped {} unused refcount blocks", dropped.len());
        Ok(())
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
