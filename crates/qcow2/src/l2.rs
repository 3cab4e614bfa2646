//! L1 table, L2 table cache and L2 entry decoding.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::events::{DebugEvent, Hooks};
use crate::refcount::MAX_HOST_OFFSET;
use crate::storage::Storage;

/// L1/L2 entry flag: refcount is exactly one.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag: reads as zero (version 3, standard L2 only).
pub(crate) const OFLAG_ZERO: u64 = 1;
/// Offset mask of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Extended L2 bitmap: every subcluster reads as zero.
pub(crate) const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;
/// Extended L2 bitmap: every subcluster allocated.
pub(crate) const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;

/// The decoded type of a standard L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// No host cluster.
    Unallocated,
    /// Zero flag set; `host` is a preallocated cluster (0: none).
    Zero { host: u64 },
    /// A normal data cluster.
    Normal { host: u64 },
    /// A compressed cluster: data at `host`, `len` bytes to read.
    Compressed { host: u64, len: u64 },
}

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    pub version: u32,
    pub external_data: bool,
}

impl Geometry {
    pub fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// u64 words per L2 entry.
    pub fn words(&self) -> usize {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }
    /// log2 of entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3 - self.extended_l2 as u32
    }
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Decodes a standard L2 entry.
    pub fn decode(&self, e: u64) -> Result<EntryKind> {
        if e & OFLAG_COMPRESSED != 0 {
            if self.external_data {
                return Err(Error::CorruptionDetected(
                    "Compressed cluster in an image with an external data file".into(),
                ));
            }
            let x = 62 - (self.cluster_bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = (e >> x) & ((1u64 << (62 - x)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            return Ok(EntryKind::Compressed { host, len });
        }
        let host = e & OFFSET_MASK;
        if e & OFLAG_ZERO != 0 && !self.extended_l2 {
            if self.version < 3 {
                return Err(Error::CorruptionDetected(format!(
                    "Zero cluster entry {e:#x} in a version 2 image"
                )));
            }
            if host % self.cs() != 0 {
                return Err(Error::CorruptionDetected(format!(
                    "Preallocated zero cluster offset {host:#x} unaligned"
                )));
            }
            return Ok(EntryKind::Zero { host });
        }
        if host == 0 && !(self.external_data && e & OFLAG_COPIED != 0) {
            return Ok(EntryKind::Unallocated);
        }
        if host % self.cs() != 0 {
            return Err(Error::CorruptionDetected(format!(
                "Cluster allocation offset {host:#x} unaligned"
            )));
        }
        Ok(EntryKind::Normal { host })
    }
}

/// One L2 table in memory: its words (entries, and bitmap words of extended entries) in the
/// `Arc`'s own allocation. Entries are atomics: they change only under the metadata lock, but
/// lock-free readers (see `hot.rs`) may load them at any time and see either the old or the
/// new value of an entry.
pub(crate) type L2Table = [AtomicU64];

/// A table holding `v`.
pub(crate) fn l2_table(v: Vec<u64>) -> Arc<L2Table> {
    v.into_iter().map(AtomicU64::new).collect()
}

/// Access to the words of an [`L2Table`].
pub(crate) trait L2Words {
    /// Word `i`.
    fn at(&self, i: usize) -> u64;
    /// Sets word `i` (callers hold the metadata lock).
    fn put(&self, i: usize, v: u64);
    /// A copy of the words.
    fn words(&self) -> Vec<u64>;
}

impl L2Words for L2Table {
    #[inline]
    fn at(&self, i: usize) -> u64 {
        self[i].load(Ordering::Acquire)
    }

    #[inline]
    fn put(&self, i: usize, v: u64) {
        self[i].store(v, Ordering::Release)
    }

    fn words(&self) -> Vec<u64> {
        self.iter().map(|x| x.load(Ordering::Acquire)).collect()
    }
}

struct Table {
    data: Arc<L2Table>,
    dirty: bool,
    last_used: u64,
}

/// An L2 table cache keyed by host offset.
pub(crate) struct L2Cache {
    file: Arc<dyn Storage>,
    geo: Geometry,
    tables: crate::gate::OffsetMap<Table>,
    cap: usize,
    tick: u64,
    /// Bumped whenever a table leaves the cache or a new one enters it, so lock-free readers
    /// holding a table know to look again.
    gen: Arc<AtomicU64>,
    /// Debug events (`l2_load`, `l2_update`).
    pub hooks: Hooks,
}

impl L2Cache {
    pub fn new(file: Arc<dyn Storage>, geo: Geometry, cap: usize, gen: Arc<AtomicU64>) -> Self {
        L2Cache {
            file,
            geo,
            tables: Default::default(),
            cap: cap.max(2),
            tick: 0,
            gen,
            hooks: Hooks::default(),
        }
    }

    fn bump(&self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    pub fn validate_offset(&self, off: u64) -> Result<()> {
        if off % self.geo.cs() != 0 || off == 0 || off >= MAX_HOST_OFFSET {
            return Err(Error::CorruptionDetected(format!(
                "L2 table offset {off:#x} unaligned or invalid"
            )));
        }
        Ok(())
    }

    /// Whether the cache holds a table at `off` (for overlap checks).
    pub fn contains(&self, off: u64) -> bool {
        self.tables.contains_key(&off)
    }

    /// Returns the table at `off`, loading it (and evicting, which may write a dirty table
    /// after `before_write` ran) as needed.
    pub fn get(
        &mut self,
        off: u64,
        before_write: &mut dyn FnMut() -> Result<()>,
    ) -> Result<&Arc<L2Table>> {
        self.tick += 1;
        let tick = self.tick;
        if !self.tables.contains_key(&off) {
            self.validate_offset(off)?;
            if off + self.geo.cs() > self.file.len()? {
                return Err(Error::CorruptionDetected(format!(
                    "L2 table at {off:#x} lies beyond the end of the image file"
                )));
            }
            if self.tables.len() >= self.cap {
                self.evict(before_write)?;
            }
            let mut raw = vec![0u8; self.geo.cs() as usize];
            self.hooks.event(DebugEvent::L2Load);
            self.file.read_at(&mut raw, off)?;
            let data = l2_table(
                raw.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
                    .collect(),
            );
            self.bump();
            self.tables.insert(
                off,
                Table {
                    data,
                    dirty: false,
                    last_used: tick,
                },
            );
        }
        let t = self.tables.get_mut(&off).expect("present");
        t.last_used = tick;
        Ok(&t.data)
    }

    /// The table at `off` if it is cached (no loading, no eviction): the fast path of lookups.
    #[inline]
    pub fn peek(&mut self, off: u64) -> Option<&Arc<L2Table>> {
        self.tick += 1;
        let tick = self.tick;
        let t = self.tables.get_mut(&off)?;
        t.last_used = tick;
        Some(&t.data)
    }

    /// Inserts a table that was just written to disk (clean) or is new (dirty).
    pub fn insert(
        &mut self,
        off: u64,
        data: Vec<u64>,
        dirty: bool,
        before_write: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if !self.tables.contains_key(&off) && self.tables.len() >= self.cap {
            self.evict(before_write)?;
        }
        self.tick += 1;
        self.bump();
        self.tables.insert(
            off,
            Table {
                data: l2_table(data),
                dirty,
                last_used: self.tick,
            },
        );
        Ok(())
    }

    pub fn mark_dirty(&mut self, off: u64) {
        if let Some(t) = self.tables.get_mut(&off) {
            t.dirty = true;
        }
    }

    fn write_table(hooks: &Hooks, file: &dyn Storage, off: u64, data: &L2Table) -> Result<()> {
        hooks.event(DebugEvent::L2Update);
        let mut raw = Vec::with_capacity(data.len() * 8);
        for i in 0..data.len() {
            raw.extend_from_slice(&data.at(i).to_be_bytes());
        }
        file.write_at(&raw, off)?;
        Ok(())
    }

    fn evict(&mut self, before_write: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let victim = self
            .tables
            .iter()
            .min_by_key(|(_, t)| (t.dirty, t.last_used))
            .map(|(o, _)| *o);
        if let Some(off) = victim {
            if self.tables[&off].dirty {
                before_write()?;
                Self::write_table(&self.hooks, &*self.file, off, &self.tables[&off].data)?;
            }
            self.tables.remove(&off);
            self.bump();
        }
        Ok(())
    }

    pub fn has_dirty(&self) -> bool {
        self.tables.values().any(|t| t.dirty)
    }

    /// Writes every dirty table.
    pub fn flush(&mut self) -> Result<bool> {
        let mut wrote = false;
        let mut offs: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(o, _)| *o)
            .collect();
        offs.sort_unstable();
        for off in offs {
            let t = self.tables.get_mut(&off).expect("present");
            Self::write_table(&self.hooks, &*self.file, off, &t.data)?;
            t.dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Forgets a table (its cluster was freed).
    pub fn remove(&mut self, off: u64) {
        self.tables.remove(&off);
        self.bump();
    }

    /// Drops every clean table not used since `since`; returns the current tick.
    pub fn clean_unused(&mut self, since: u64) -> u64 {
        let before = self.tables.len();
        self.tables.retain(|_, t| t.dirty || t.last_used > since);
        if self.tables.len() != before {
            self.bump();
        }
        self.tick
    }

    pub fn clear(&mut self) {
        self.tables.clear();
        self.bump();
    }
}
