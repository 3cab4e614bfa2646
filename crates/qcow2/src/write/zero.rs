//! Write-zeroes, discard and `make_empty`: whole clusters (or subclusters) become zero or
//! unallocated in the L2 tables, partial ones are written with zeros.

use crate::error::Result;
use crate::events::{DebugEvent, FreeReason};
use crate::image::{lock, Qcow2};
use crate::l2::L2Words;
use crate::l2::{BITMAP_ALL_ALLOC, BITMAP_ALL_ZERO, OFFSET_MASK, OFLAG_COMPRESSED};
use crate::l2::{OFLAG_COPIED, OFLAG_ZERO};
use crate::write::sc_mask;

impl Qcow2 {
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
