//! Lock-free lookups of plain data clusters in the L2 tables a thread used last.
//!
//! Each thread keeps the last few L2 tables it looked up (shared `Arc`s of the cache's
//! tables, whose entries are atomics) together with the metadata generation they were taken
//! at. While the generation has not moved (no L1 entry changed, no table entered or left the
//! cache), a guest offset in one of those tables maps without taking the metadata lock: one
//! atomic load of the generation and one of the entry. Entry updates (allocations, zeroing,
//! discards) are stores into the same atomics, so they are seen at once; anything that
//! replaces a table object bumps the generation. Callers hold an [`crate::IoGuard`] before
//! looking up, so host clusters dropped concurrently are not reused meanwhile, exactly as on
//! the locked path.
//!
//! Only standard L2 entries are served here (an extended entry is two words that change
//! together under the lock), and no external data file. The tables a thread keeps are
//! bounded to [`SLOTS`] tables of at most [`MAX_TABLE`] bytes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::image::{Qcow2, Tables};
use crate::l2::{L2Table, L2Words, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};

/// Tables a thread keeps (indexed by L1 index modulo this).
const SLOTS: usize = 4;
/// Largest table (cluster) a thread keeps, to bound what it retains.
const MAX_TABLE: u64 = 64 << 10;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique image id.
pub(crate) fn next_image_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

struct Hot {
    img: u64,
    gen: u64,
    /// The L1 table's place (cluster-rounded bytes), for the overlap check of writes.
    l1_offset: u64,
    l1_bytes: u64,
    /// Sorted host offsets of the active L2 tables at `gen`.
    l2_offsets: Option<Arc<[u64]>>,
    slots: [Option<(u64, Arc<L2Table>)>; SLOTS],
}

impl Hot {
    const EMPTY: Hot = Hot {
        img: 0,
        gen: 0,
        l1_offset: 0,
        l1_bytes: 0,
        l2_offsets: None,
        slots: [const { None }; SLOTS],
    };
}

thread_local! {
    static HOT: RefCell<Hot> = const { RefCell::new(Hot::EMPTY) };
}

/// The run of plain data clusters in `tab` that `[offset, offset + len)` starts with, as
/// (bytes, host offset); `None` when the first cluster is anything else. With `writable`,
/// only clusters with refcount 1 (COPIED) count. Stops at the end of the table.
#[inline]
pub(crate) fn run_in(
    tab: &L2Table,
    cluster_bits: u32,
    l2_bits: u32,
    offset: u64,
    len: u64,
    writable: bool,
) -> Option<(u64, u64)> {
    let cs = 1u64 << cluster_bits;
    let mask = (1u64 << l2_bits) - 1;
    let mut i = ((offset >> cluster_bits) & mask) as usize;
    // Compressed or zero entries, (for writes) entries without COPIED, and offsets that are
    // zero or unaligned go to the general path, which handles or reports them.
    let need = if writable { OFLAG_COPIED } else { 0 };
    let plain = |e: u64| -> Option<u64> {
        let host = e & OFFSET_MASK;
        (e & (OFLAG_COMPRESSED | OFLAG_ZERO) == 0
            && e & need == need
            && host != 0
            && host & (cs - 1) == 0)
            .then_some(host)
    };
    let host = plain(tab.at(i))?;
    let in_c = offset & (cs - 1);
    let mut n = (cs - in_c).min(len);
    let mut expect = host + cs;
    while n < len && i < mask as usize {
        i += 1;
        match plain(tab.at(i)) {
            Some(h) if h == expect => {
                n += cs.min(len - n);
                expect += cs;
            }
            _ => break,
        }
    }
    Some((n, host + in_c))
}

/// Whether threads' tables may serve an image at all (computed once when it opens).
pub(crate) fn eligible(extended_l2: bool, external_data: bool, cluster_size: u64) -> bool {
    !extended_l2 && !external_data && cluster_size <= MAX_TABLE
}

/// Looks `[offset, offset + len)` up in the thread's tables without any lock; `None` when
/// they cannot answer (the caller then takes the locked path). With `writable`, the run must
/// be writable in place and clear of the image's fixed metadata.
#[inline]
pub(crate) fn data_run(img: &Qcow2, offset: u64, len: u64, writable: bool) -> Option<(u64, u64)> {
    if !img.hot {
        return None;
    }
    HOT.try_with(|h| {
        let h = h.try_borrow().ok()?;
        if h.img != img.id || h.gen != img.gen.load(Ordering::Acquire) {
            return None;
        }
        let cb = img.geo.cluster_bits;
        let l2_bits = img.geo.l2_bits();
        let l1i = offset >> (cb + l2_bits);
        let (i, tab) = h.slots[(l1i % SLOTS as u64) as usize].as_ref()?;
        if *i != l1i {
            return None;
        }
        let (n, host) = run_in(tab, cb, l2_bits, offset, len, writable)?;
        if writable && overlaps_metadata(img, &h, host, n) {
            // The locked path reports it.
            return None;
        }
        Some((n, host))
    })
    .ok()
    .flatten()
}

/// The overlap check of the locked path, on the thread's copy of the metadata layout: the
/// header cluster, the L1 table, the refcount table and every active L2 table (those the
/// image's [`crate::OverlapChecks`] select).
fn overlaps_metadata(img: &Qcow2, h: &Hot, host: u64, len: u64) -> bool {
    let cs = img.geo.cs();
    let start = host & !(cs - 1);
    let end = host + len;
    let overlaps = |a: u64, l: u64| l > 0 && start < a + l && a < end;
    let rt_off = img.rt_range.0.load(Ordering::Acquire);
    let rt_len = img.rt_range.1.load(Ordering::Acquire);
    let ol = img.overlap;
    if (ol.main_header && overlaps(0, cs))
        || (ol.active_l1 && overlaps(h.l1_offset, h.l1_bytes))
        || (ol.refcount_table && overlaps(rt_off, rt_len))
    {
        return true;
    }
    if !ol.active_l2 {
        return false;
    }
    let Some(offs) = &h.l2_offsets else {
        return true;
    };
    // The first table at or after the start of the range.
    let i = offs.partition_point(|&o| o < start);
    offs.get(i).is_some_and(|&o| o < end)
}

/// Remembers `tab`, the table of L1 index `l1i`, for lock-free lookups by this thread.
/// Called with the metadata lock held (`t`), so the generation read matches the tables.
pub(crate) fn remember(img: &Qcow2, t: &Tables, l1i: u64, tab: &Arc<L2Table>) {
    if !img.hot {
        return;
    }
    let _ = HOT.try_with(|h| {
        let Ok(mut h) = h.try_borrow_mut() else {
            return;
        };
        let gen = t.gen.load(Ordering::Acquire);
        if h.img != img.id || h.gen != gen {
            let cs = img.geo.cs();
            *h = Hot {
                img: img.id,
                gen,
                l1_offset: t.l1_offset,
                l1_bytes: (t.l1.len() as u64 * 8).div_ceil(cs) * cs,
                l2_offsets: Some(t.l2_offsets.clone()),
                slots: [const { None }; SLOTS],
            };
        }
        let slot = &mut h.slots[(l1i % SLOTS as u64) as usize];
        if slot
            .as_ref()
            .is_none_or(|(i, s)| *i != l1i || !Arc::ptr_eq(s, tab))
        {
            *slot = Some((l1i, tab.clone()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::l2_table;

    #[test]
    fn runs_of_plain_clusters() {
        // 64 KiB clusters, 8192 entries per table; entries 0..3 contiguous from 0x50000,
        // entry 3 elsewhere, entry 4 zero-flagged, entry 5 without COPIED, 6 compressed.
        let cb = 16;
        let l2_bits = 13;
        let cs = 1u64 << cb;
        let mut v = vec![0u64; 1 << l2_bits];
        for (i, e) in v.iter_mut().enumerate().take(3) {
            *e = (0x50000 + i as u64 * cs) | OFLAG_COPIED;
        }
        v[3] = 0x900000 | OFLAG_COPIED;
        v[4] = 0xa00000 | OFLAG_COPIED | OFLAG_ZERO;
        v[5] = 0xb00000;
        v[6] = OFLAG_COMPRESSED | 0xc00000;
        v[7] = 0xd00200 | OFLAG_COPIED; // unaligned: the general path reports it
        let t = l2_table(v);
        // Inside one cluster.
        assert_eq!(
            run_in(&t, cb, l2_bits, 4096, 4096, false),
            Some((4096, 0x51000))
        );
        // Across the contiguous clusters, stopping where the host offsets jump.
        assert_eq!(
            run_in(&t, cb, l2_bits, 100, 10 * cs, true),
            Some((3 * cs - 100, 0x50064))
        );
        assert_eq!(
            run_in(&t, cb, l2_bits, 3 * cs, 2 * cs, false),
            Some((cs, 0x900000))
        );
        assert_eq!(run_in(&t, cb, l2_bits, 4 * cs, 512, false), None);
        // Refcount > 1 (no COPIED): readable, not writable in place.
        assert_eq!(
            run_in(&t, cb, l2_bits, 5 * cs, 512, false),
            Some((512, 0xb00000))
        );
        assert_eq!(run_in(&t, cb, l2_bits, 5 * cs, 512, true), None);
        assert_eq!(run_in(&t, cb, l2_bits, 6 * cs, 512, false), None);
        assert_eq!(run_in(&t, cb, l2_bits, 7 * cs, 512, false), None);
        // Unallocated.
        assert_eq!(run_in(&t, cb, l2_bits, 9 * cs, 512, false), None);
        // The last entry of the table: the run ends with the table.
        assert_eq!(
            run_in(&t, cb, l2_bits, (8191 << cb) + 10, 3 * cs, false),
            None
        );
    }
}
