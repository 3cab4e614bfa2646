//! Debug events at QEMU's `BLKDBG_*` points and the host ranges the image frees, for a block
//! layer that forwards them (blkdebug error injection on the image's `file` child; discards
//! passed down to the file as QEMU's `pass-discard-*` options do).

use std::sync::Arc;

use crate::storage::Storage;

/// A point in the driver where QEMU's qcow2 raises a blkdebug event (`BLKDBG_EVENT`), raised
/// just before the I/O on the image file it names, so error injection rules on that event
/// hit that I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DebugEvent {
    /// An L1 entry is written.
    L1Update,
    /// Growing the L1 table: the new table is allocated.
    L1GrowAllocTable,
    /// Growing the L1 table: the new table is written.
    L1GrowWriteTable,
    /// Growing the L1 table: the header is switched to the new table.
    L1GrowActivateTable,
    /// An L2 table is read from the file.
    L2Load,
    /// A cached L2 table is written back.
    L2Update,
    /// An L2 entry for a compressed cluster is written.
    L2UpdateCompressed,
    /// Allocating an L2 table: the shared old table is read to copy it.
    L2AllocCowRead,
    /// Allocating an L2 table: the new table is written.
    L2AllocWrite,
    /// Guest data is read from the data file.
    ReadAio,
    /// Guest data is read from the backing image.
    ReadBackingAio,
    /// A compressed cluster is read.
    ReadCompressed,
    /// Guest data is written to the data file.
    WriteAio,
    /// A compressed cluster is written.
    WriteCompressed,
    /// Copy-on-write: the untouched part of a cluster is read.
    CowRead,
    /// Copy-on-write: the untouched part of a cluster is written.
    CowWrite,
    /// The refcount table is read (on open).
    ReftableLoad,
    /// The refcount table is moved to a larger place.
    ReftableGrow,
    /// A refcount table entry is written.
    ReftableUpdate,
    /// A refcount block is read from the file.
    RefblockLoad,
    /// A refcount block is written in full.
    RefblockUpdate,
    /// A cached refcount block is written back.
    RefblockUpdatePart,
    /// A new refcount block is needed.
    RefblockAlloc,
    /// A new refcount block is hooked up in the refcount table.
    RefblockAllocHookup,
    /// A new refcount block is written.
    RefblockAllocWrite,
    /// Growing the refcount table: the refcount blocks that cover the new table are written.
    RefblockAllocWriteBlocks,
    /// Growing the refcount table: the new table is written.
    RefblockAllocWriteTable,
    /// Growing the refcount table: the header is switched to the new table.
    RefblockAllocSwitchTable,
    /// Host clusters are allocated.
    ClusterAlloc,
    /// Bytes are allocated for compressed data.
    ClusterAllocBytes,
    /// Host clusters are freed.
    ClusterFree,
    /// Making an image empty (`make_empty`).
    EmptyImagePrepare,
}

impl DebugEvent {
    /// Every event, in QEMU's order.
    pub const ALL: [DebugEvent; 32] = [
        DebugEvent::L1Update,
        DebugEvent::L1GrowAllocTable,
        DebugEvent::L1GrowWriteTable,
        DebugEvent::L1GrowActivateTable,
        DebugEvent::L2Load,
        DebugEvent::L2Update,
        DebugEvent::L2UpdateCompressed,
        DebugEvent::L2AllocCowRead,
        DebugEvent::L2AllocWrite,
        DebugEvent::ReadAio,
        DebugEvent::ReadBackingAio,
        DebugEvent::ReadCompressed,
        DebugEvent::WriteAio,
        DebugEvent::WriteCompressed,
        DebugEvent::CowRead,
        DebugEvent::CowWrite,
        DebugEvent::ReftableLoad,
        DebugEvent::ReftableGrow,
        DebugEvent::ReftableUpdate,
        DebugEvent::RefblockLoad,
        DebugEvent::RefblockUpdate,
        DebugEvent::RefblockUpdatePart,
        DebugEvent::RefblockAlloc,
        DebugEvent::RefblockAllocHookup,
        DebugEvent::RefblockAllocWrite,
        DebugEvent::RefblockAllocWriteBlocks,
        DebugEvent::RefblockAllocWriteTable,
        DebugEvent::RefblockAllocSwitchTable,
        DebugEvent::ClusterAlloc,
        DebugEvent::ClusterAllocBytes,
        DebugEvent::ClusterFree,
        DebugEvent::EmptyImagePrepare,
    ];

    /// The event's name in QEMU's `BlkdebugEvent` enumeration (`"l2_load"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DebugEvent::L1Update => "l1_update",
            DebugEvent::L1GrowAllocTable => "l1_grow_alloc_table",
            DebugEvent::L1GrowWriteTable => "l1_grow_write_table",
            DebugEvent::L1GrowActivateTable => "l1_grow_activate_table",
            DebugEvent::L2Load => "l2_load",
            DebugEvent::L2Update => "l2_update",
            DebugEvent::L2UpdateCompressed => "l2_update_compressed",
            DebugEvent::L2AllocCowRead => "l2_alloc_cow_read",
            DebugEvent::L2AllocWrite => "l2_alloc_write",
            DebugEvent::ReadAio => "read_aio",
            DebugEvent::ReadBackingAio => "read_backing_aio",
            DebugEvent::ReadCompressed => "read_compressed",
            DebugEvent::WriteAio => "write_aio",
            DebugEvent::WriteCompressed => "write_compressed",
            DebugEvent::CowRead => "cow_read",
            DebugEvent::CowWrite => "cow_write",
            DebugEvent::ReftableLoad => "reftable_load",
            DebugEvent::ReftableGrow => "reftable_grow",
            DebugEvent::ReftableUpdate => "reftable_update",
            DebugEvent::RefblockLoad => "refblock_load",
            DebugEvent::RefblockUpdate => "refblock_update",
            DebugEvent::RefblockUpdatePart => "refblock_update_part",
            DebugEvent::RefblockAlloc => "refblock_alloc",
            DebugEvent::RefblockAllocHookup => "refblock_alloc_hookup",
            DebugEvent::RefblockAllocWrite => "refblock_alloc_write",
            DebugEvent::RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
            DebugEvent::RefblockAllocWriteTable => "refblock_alloc_write_table",
            DebugEvent::RefblockAllocSwitchTable => "refblock_alloc_switch_table",
            DebugEvent::ClusterAlloc => "cluster_alloc",
            DebugEvent::ClusterAllocBytes => "cluster_alloc_bytes",
            DebugEvent::ClusterFree => "cluster_free",
            DebugEvent::EmptyImagePrepare => "empty_image_prepare",
        }
    }

    /// The event named `name` in QEMU's enumeration, if this crate raises it.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        DebugEvent::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// Receives [`DebugEvent`]s. Called synchronously on the thread doing the operation, possibly
/// with metadata locks held: it must not call back into the image.
pub type DebugEventCallback = Arc<dyn Fn(DebugEvent) + Send + Sync>;

/// Why host clusters were freed: QEMU's discard types, which its `pass-discard-request`,
/// `pass-discard-snapshot` and `pass-discard-other` options select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FreeReason {
    /// Always passed down (QEMU's `QCOW2_DISCARD_ALWAYS`): shrinking, removed bitmaps.
    Always,
    /// A guest discard or an unmapping write-zeroes request.
    Request,
    /// Deleting, reverting to or creating a snapshot, or emptying the image.
    Snapshot,
    /// Anything else: clusters replaced by copy-on-write, metadata moved elsewhere.
    Other,
}

/// A host range whose refcount dropped to zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedRange {
    /// Host offset in the image file.
    pub offset: u64,
    /// Length in bytes (whole clusters).
    pub len: u64,
    /// Why it was freed.
    pub reason: FreeReason,
}

/// Receives every [`FreedRange`], whether or not it is passed down as a discard. Called with
/// the refcount lock held: it must not call back into the image.
pub type FreedCallback = Arc<dyn Fn(&FreedRange) + Send + Sync>;

/// Which freed ranges are discarded on the file (QEMU's `pass-discard-*` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardPassing {
    /// Guest discards and unmapping write-zeroes (`pass-discard-request`).
    pub request: bool,
    /// Snapshot operations (`pass-discard-snapshot`).
    pub snapshot: bool,
    /// Everything else (`pass-discard-other`).
    pub other: bool,
}

impl Default for DiscardPassing {
    /// QEMU's defaults for a node opened without `discard=unmap`: snapshot frees only.
    fn default() -> Self {
        DiscardPassing {
            request: false,
            snapshot: true,
            other: false,
        }
    }
}

impl DiscardPassing {
    /// Passes nothing down.
    pub const NONE: DiscardPassing = DiscardPassing {
        request: false,
        snapshot: false,
        other: false,
    };

    /// Whether ranges freed for `reason` are discarded.
    pub fn passes(&self, reason: FreeReason) -> bool {
        match reason {
            FreeReason::Always => true,
            FreeReason::Request => self.request,
            FreeReason::Snapshot => self.snapshot,
            FreeReason::Other => self.other,
        }
    }
}

/// The hooks an image was opened with, shared by its metadata caches.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub debug: Option<DebugEventCallback>,
    pub freed: Option<FreedCallback>,
    pub pass: DiscardPassing,
}

impl Hooks {
    /// Raises `e` (a branch on `None` when nobody listens).
    #[inline]
    pub fn event(&self, e: DebugEvent) {
        if let Some(cb) = &self.debug {
            cb(e);
        }
    }
}

/// Freed clusters collected during one batch of refcount updates, coalesced into runs and
/// reported (and discarded) at the end of the batch, still under the refcount lock so that
/// the allocator cannot hand them out before the discard reaches the file.
#[derive(Default)]
pub(crate) struct FreedRuns {
    runs: Vec<(u64, u64, FreeReason)>,
}

impl FreedRuns {
    /// Records that cluster `idx` dropped to refcount zero.
    pub fn push(&mut self, idx: u64, reason: FreeReason) {
        if let Some((start, n, r)) = self.runs.last_mut() {
            if *r == reason && *start + *n == idx {
                *n += 1;
                return;
            }
        }
        self.runs.push((idx, 1, reason));
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Reports and discards every pending run on `file` (clusters of `1 << cluster_bits`).
    /// Discard failures are logged, not returned: the clusters are free either way.
    pub fn process(&mut self, hooks: &Hooks, file: &dyn Storage, cluster_bits: u32) {
        for (start, n, reason) in self.runs.drain(..) {
            let range = FreedRange {
                offset: start << cluster_bits,
                len: n << cluster_bits,
                reason,
            };
            report(hooks, file, &range);
        }
    }
}

/// Tells the freed callback about `range` and discards it on `file` when its reason passes.
pub(crate) fn report(hooks: &Hooks, file: &dyn Storage, range: &FreedRange) {
    if let Some(cb) = &hooks.freed {
        cb(range);
    }
    if hooks.pass.passes(range.reason) {
        if let Err(e) = file.discard(range.offset, range.len) {
            log::warn!(
                "qcow2: discarding freed range {:#x}+{:#x}: {e}",
                range.offset,
                range.len
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in DebugEvent::ALL {
            assert!(seen.insert(e.name()), "duplicate name {}", e.name());
            assert_eq!(DebugEvent::from_name(e.name()), Some(e));
        }
        assert_eq!(DebugEvent::from_name("l2_load"), Some(DebugEvent::L2Load));
        assert_eq!(DebugEvent::from_name("pwritev"), None);
    }

    #[test]
    fn runs_coalesce_by_reason_and_adjacency() {
        let mut f = FreedRuns::default();
        for c in [4, 5, 6] {
            f.push(c, FreeReason::Snapshot);
        }
        f.push(7, FreeReason::Other);
        f.push(9, FreeReason::Other);
        assert_eq!(
            f.runs,
            vec![
                (4, 3, FreeReason::Snapshot),
                (7, 1, FreeReason::Other),
                (9, 1, FreeReason::Other)
            ]
        );
    }

    #[test]
    fn passing_follows_qemu_defaults() {
        let d = DiscardPassing::default();
        assert!(d.passes(FreeReason::Always));
        assert!(d.passes(FreeReason::Snapshot));
        assert!(!d.passes(FreeReason::Request));
        assert!(!d.passes(FreeReason::Other));
        assert!(DiscardPassing::NONE.passes(FreeReason::Always));
    }
}
