//! Structural changes to the refcount table: creating refcount blocks where a cluster needs
//! one, growing the table QEMU-style, and dropping unused blocks when an image shrinks.

use std::sync::atomic::Ordering;

use super::{get_entry, set_entry, Block, Refcounts, MAX_HOST_OFFSET};
use crate::error::{Error, Result};
use crate::events::DebugEvent;
use crate::header::MAX_REFTABLE_SIZE;

impl Refcounts {
    /// Makes sure the refcount block covering `idx` exists.
    pub(super) fn ensure_block(&mut self, idx: u64) -> Result<()> {
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

    /// Writes a new refcount block `data` at `off` and points table entry `rt` at it.
    pub(super) fn write_block_data(&mut self, rt: usize, off: u64, data: Vec<u8>) -> Result<()> {
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
    pub(super) fn grow_table(&mut self, needed_rt: u64) -> Result<()> {
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
}
