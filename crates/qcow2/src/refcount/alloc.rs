//! The cluster allocator: finding free runs of clusters (creating the refcount blocks they
//! need right after them), reserving file space ahead of fresh clusters, and packing
//! compressed data into shared clusters.

use super::{set_entry, Refcounts, MAX_HOST_OFFSET};
use crate::error::{Error, Result};
use crate::events::DebugEvent;

impl Refcounts {
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
}
