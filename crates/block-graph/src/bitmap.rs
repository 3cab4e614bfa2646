//! Dirty bitmaps: one bit per granule of a node, set by every write that reaches the node
//! while the bitmap is enabled (QEMU's `BdrvDirtyBitmap`). Setting bits is lock-free, so
//! write interception costs a few atomic operations per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;

use crate::error::{BlockError, Result};

/// The largest granularity QEMU accepts (2 GiB).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// A bitmap as a format stores it: one bit per granule, least significant bit first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The bits.
    pub bits: Vec<u8>,
    /// Whether the bitmap records writes (qcow2's `auto` flag).
    pub enabled: bool,
    /// Whether the image says the bitmap was not stored cleanly (qcow2's `in-use` flag):
    /// such a bitmap is inconsistent and can only be removed.
    pub in_use: bool,
}

/// A dirty bitmap of a node.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    words: RwLock<Vec<AtomicU64>>,
    size: AtomicU64,
    enabled: AtomicBool,
    persistent: AtomicBool,
    busy: AtomicBool,
    inconsistent: bool,
}

fn words_for(size: u64, granularity: u64) -> usize {
    size.div_ceil(granularity).div_ceil(64) as usize
}

/// Memory all dirty bitmaps of the process may take together. A bitmap's size follows its
/// node's (one bit per granule), and node sizes come from clients (`null-co`'s `size`,
/// `block_resize`): without a bound, one command could make the process allocate
/// gigabytes. 1 GiB covers 512 TiB of disk at the default 64 KiB granularity.
pub const BITMAP_MEMORY_LIMIT: u64 = 1 << 30;

/// Bytes of bitmap words allocated in this process.
static BITMAP_MEMORY: AtomicU64 = AtomicU64::new(0);

/// Takes `bytes` of the bitmaps' memory budget.
fn reserve(bytes: u64) -> Result<()> {
    // Only ever add what fits: a refused request must not, even for an instant, make
    // the budget look spent to bitmaps created at the same time.
    let taken = BITMAP_MEMORY.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
        used.checked_add(bytes)
            .filter(|&total| total <= BITMAP_MEMORY_LIMIT)
    });
    if taken.is_err() {
        return Err(BlockError::generic(format!(
            "Bitmap too large: dirty bitmaps may use at most {} MiB of memory in all, and \
             this one needs {} MiB more",
            BITMAP_MEMORY_LIMIT >> 20,
            bytes.div_ceil(1 << 20)
        )));
    }
    Ok(())
}

/// Gives `bytes` of the budget back.
fn release(bytes: u64) {
    BITMAP_MEMORY.fetch_sub(bytes, Ordering::Relaxed);
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn lock_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Checks a granularity as `block-dirty-bitmap-add` does.
pub fn check_granularity(granularity: u64) -> Result<()> {
    if !(512..=MAX_GRANULARITY).contains(&granularity) || !granularity.is_power_of_two() {
        return Err(BlockError::generic(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    Ok(())
}

impl DirtyBitmap {
    /// An empty, enabled bitmap over `size` bytes.
    pub fn new(name: &str, granularity: u64, size: u64) -> Result<Self> {
        check_granularity(granularity)?;
        let n = words_for(size, granularity);
        reserve(n as u64 * 8)?;
        Ok(DirtyBitmap {
            name: name.to_string(),
            granularity,
            words: RwLock::new((0..n).map(|_| AtomicU64::new(0)).collect()),
            size: AtomicU64::new(size),
            enabled: AtomicBool::new(true),
            persistent: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            inconsistent: false,
        })
    }

    /// A bitmap loaded from an image, over `size` bytes.
    pub fn from_stored(s: &StoredBitmap, size: u64) -> Result<Self> {
        let mut bm = DirtyBitmap::new(&s.name, s.granularity, size)?;
        {
            let w = lock_write(&bm.words);
            for (i, byte) in s.bits.iter().enumerate() {
                let bit0 = (i * 8) as u64;
                if let Some(word) = w.get((bit0 / 64) as usize) {
                    word.fetch_or((*byte as u64) << (bit0 % 64), Ordering::Relaxed);
                }
            }
        }
        bm.enabled.store(s.enabled && !s.in_use, Ordering::Relaxed);
        bm.persistent.store(true, Ordering::Relaxed);
        bm.inconsistent = s.in_use;
        Ok(bm)
    }

    /// The bitmap as a format stores it.
    pub fn to_stored(&self) -> StoredBitmap {
        let w = lock_read(&self.words);
        let granules = self.size().div_ceil(self.granularity);
        let mut bits = vec![0u8; granules.div_ceil(8) as usize];
        for (i, b) in bits.iter_mut().enumerate() {
            let bit0 = (i * 8) as u64;
            let word = w[(bit0 / 64) as usize].load(Ordering::Relaxed);
            *b = (word >> (bit0 % 64)) as u8;
        }
        StoredBitmap {
            name: self.name.clone(),
            granularity: self.granularity,
            bits,
            enabled: self.is_enabled(),
            in_use: false,
        }
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Bytes covered.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether writes are recorded.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Starts or stops recording writes.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// Whether the bitmap is stored in the image.
    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    /// Marks the bitmap persistent (or not).
    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Release);
    }

    /// Whether an operation (a job, an export) uses the bitmap; it is then read-only to QMP.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Marks the bitmap in use by an operation.
    pub fn set_busy(&self, on: bool) {
        self.busy.store(on, Ordering::Release);
    }

    /// Whether the stored copy was found not cleanly written: unusable, only removable.
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// Records a write of `[offset, offset + len)` if the bitmap is enabled.
    pub fn record_write(&self, offset: u64, len: u64) {
        if self.is_enabled() {
            self.set_range(offset, len);
        }
    }

    /// Marks `[offset, offset + len)` dirty.
    pub fn set_range(&self, offset: u64, len: u64) {
        self.update_range(offset, len, true);
    }

    /// Marks `[offset, offset + len)` clean (whole granules only are affected when the range
    /// covers them partially: such granules stay dirty).
    pub fn reset_range(&self, offset: u64, len: u64) {
        let g = self.granularity;
        let start = offset.div_ceil(g) * g;
        let end = (offset + len) / g * g;
        let end = if offset + len >= self.size() {
            (offset + len).div_ceil(g) * g
        } else {
            end
        };
        if end > start {
            self.update_range(start, end - start, false);
        }
    }

    fn update_range(&self, offset: u64, len: u64, set: bool) {
        if len == 0 {
            return;
        }
        let w = lock_read(&self.words);
        let first = offset / self.granularity;
        let last = (offset + len - 1) / self.granularity;
        let mut bit = first;
        while bit <= last {
            let wi = (bit / 64) as usize;
            let Some(word) = w.get(wi) else { break };
            let lo = bit % 64;
            let hi = (last - (wi as u64) * 64).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            if set {
                word.fetch_or(mask, Ordering::Relaxed);
            } else {
                word.fetch_and(!mask, Ordering::Relaxed);
            }
            bit = (wi as u64 + 1) * 64;
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in lock_read(&self.words).iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the granule holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let bit = offset / self.granularity;
        lock_read(&self.words)
            .get((bit / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    /// Dirty bytes (dirty granules times the granularity, as QEMU counts).
    pub fn count(&self) -> u64 {
        let n: u64 = lock_read(&self.words)
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        n * self.granularity
    }

    /// The first dirty byte offset at or after `offset` (granule aligned), if any.
    pub fn next_dirty(&self, offset: u64) -> Option<u64> {
        let w = lock_read(&self.words);
        let granules = self.size().div_ceil(self.granularity);
        let mut bit = offset / self.granularity;
        while bit < granules {
            let wi = (bit / 64) as usize;
            let word = w.get(wi)?.load(Ordering::Relaxed) & (u64::MAX << (bit % 64));
            if word != 0 {
                let b = wi as u64 * 64 + word.trailing_zeros() as u64;
                return (b < granules).then_some(b * self.granularity);
            }
            bit = (wi as u64 + 1) * 64;
        }
        None
    }

    /// Adds the bits of `other` (same granularity and size).
    pub fn merge_from(&self, other: &DirtyBitmap) -> Result<()> {
        if other.granularity != self.granularity || other.size() != self.size() {
            return Err(BlockError::generic(format!(
                "Bitmap '{}' is incompatible with bitmap '{}'",
                other.name, self.name
            )));
        }
        if std::ptr::eq(self, other) {
            return Ok(());
        }
        let src: Vec<u64> = lock_read(&other.words)
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        for (d, s) in lock_read(&self.words).iter().zip(src) {
            d.fetch_or(s, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A copy of the bits (for transactions that may have to restore them).
    pub fn snapshot_bits(&self) -> Vec<u64> {
        lock_read(&self.words)
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    /// Restores bits taken with [`DirtyBitmap::snapshot_bits`].
    pub fn restore_bits(&self, bits: &[u64]) {
        for (d, s) in lock_read(&self.words).iter().zip(bits) {
            d.store(*s, Ordering::Relaxed);
        }
    }

    /// Follows a resize of the node: new granules start clean. Fails, changing nothing,
    /// when the larger bitmap would exceed [`BITMAP_MEMORY_LIMIT`].
    pub fn resize(&self, size: u64) -> Result<()> {
        let n = words_for(size, self.granularity);
        let mut w = lock_write(&self.words);
        let old = w.len();
        if n > old {
            reserve((n - old) as u64 * 8)?;
        } else {
            release((old - n) as u64 * 8);
        }
        w.resize_with(n, || AtomicU64::new(0));
        // Clear bits past the new end in the last word.
        let granules = size.div_ceil(self.granularity);
        if let Some(last) = w.last() {
            let used = granules % 64;
            if used != 0 {
                last.fetch_and((1u64 << used) - 1, Ordering::Relaxed);
            }
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }
}

impl Drop for DirtyBitmap {
    fn drop(&mut self) {
        release(lock_read(&self.words).len() as u64 * 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_count_reset() {
        let b = DirtyBitmap::new("b", 65536, 10 << 20).unwrap();
        b.set_range(1, 1);
        b.set_range(65536 * 3 + 5, 65536 * 70);
        assert!(b.get(0) && b.get(65536 * 3) && b.get(65536 * 73));
        assert!(!b.get(65536 * 2) && !b.get(65536 * 74));
        assert_eq!(b.count(), 65536 * 72);
        assert_eq!(b.next_dirty(65536), Some(65536 * 3));
        b.reset_range(65536 * 3 + 1, 65536 * 2);
        assert!(b.get(65536 * 3) && !b.get(65536 * 4) && b.get(65536 * 5));
        b.clear();
        assert_eq!(b.count(), 0);
        assert_eq!(b.next_dirty(0), None);
    }

    #[test]
    fn disabled_bitmaps_ignore_writes() {
        let b = DirtyBitmap::new("b", 512, 4096).unwrap();
        b.set_enabled(false);
        b.record_write(0, 4096);
        assert_eq!(b.count(), 0);
        b.set_enabled(true);
        b.record_write(0, 4096);
        assert_eq!(b.count(), 4096);
    }

    #[test]
    fn stored_round_trip_and_merge() {
        let b = DirtyBitmap::new("b", 512, 100_000).unwrap();
        b.set_range(512 * 9, 512 * 3);
        b.set_range(99_999, 1);
        let s = b.to_stored();
        let c = DirtyBitmap::from_stored(&s, 100_000).unwrap();
        assert_eq!(c.count(), b.count());
        assert!(c.is_persistent());
        let d = DirtyBitmap::new("d", 512, 100_000).unwrap();
        d.set_range(0, 512);
        d.merge_from(&c).unwrap();
        assert_eq!(d.count(), b.count() + 512);
        let e = DirtyBitmap::new("e", 1024, 100_000).unwrap();
        assert!(e.merge_from(&d).is_err());
    }

    #[test]
    fn granularity_rules() {
        assert!(DirtyBitmap::new("x", 1000, 1 << 20).is_err());
        assert!(DirtyBitmap::new("x", 256, 1 << 20).is_err());
        assert_eq!(
            check_granularity(3).unwrap_err().to_string(),
            "Granularity must be power of 2 and at least 512"
        );
    }

    #[test]
    fn bitmaps_past_the_memory_budget_are_refused() {
        // 2^43 bytes at 512-byte granules: 2 GiB of words, past the 1 GiB budget.
        let e = DirtyBitmap::new("big", 512, 1 << 43).unwrap_err();
        assert!(e.to_string().starts_with("Bitmap too large"), "{e}");
        let b = DirtyBitmap::new("b", 512, 1 << 20).unwrap();
        assert!(b.resize(1 << 43).is_err());
        assert_eq!(b.size(), 1 << 20, "a refused resize changes nothing");
        b.resize(2 << 20).unwrap();
        assert_eq!(b.size(), 2 << 20);
    }

    #[test]
    fn resize_clears_tail() {
        let b = DirtyBitmap::new("b", 512, 512 * 100).unwrap();
        b.set_range(0, 512 * 100);
        b.resize(512 * 10).unwrap();
        assert_eq!(b.count(), 512 * 10);
        b.resize(512 * 200).unwrap();
        assert_eq!(b.count(), 512 * 10);
        assert_eq!(b.next_dirty(512 * 10), None);
    }
}
