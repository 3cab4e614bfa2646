//! The open image: its state ([`Qcow2`], [`Tables`]) and the types that describe it
//! ([`OpenOptions`], [`Mapping`], [`CorruptionEvent`]). The methods live in the child modules:
//! opening and header bits (`open`), lookups (`map`), reads (`read`) and accessors
//! (`accessors`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::backing::BlockRead;
use crate::backing::{DenyImplicitOpen, ImageOpener};
use crate::bitmap::BitmapEntry;
use crate::events::{DebugEventCallback, DiscardPassing, FreedCallback, Hooks};
use crate::gate::IoGate;
use crate::header::Header;
use crate::l2::{Geometry, L2Cache, OFFSET_MASK};
use crate::refcount::Refcounts;
use crate::snapshot_table::Snapshot;
use crate::storage::Storage;

mod accessors;
mod map;
mod open;
mod read;

/// Default upper bound of the L2 cache (QEMU's default on Linux).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// Called when the image is found corrupt at run time (QEMU's BLOCK_IMAGE_CORRUPTED).
pub type CorruptionCallback = Arc<dyn Fn(&CorruptionEvent) + Send + Sync>;

/// What went wrong, for BLOCK_IMAGE_CORRUPTED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptionEvent {
    /// Description of the inconsistency.
    pub msg: String,
    /// Host offset of the affected metadata, if known.
    pub offset: Option<u64>,
    /// Size of the affected area, if known.
    pub size: Option<u64>,
    /// Whether the image was made read-only (always true for a writable image).
    pub fatal: bool,
}

/// How to open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Use O_DIRECT for files this crate opens (cache=none).
    pub direct: bool,
    /// L2 cache size in bytes (default: enough for the whole disk, at most 32 MiB).
    pub l2_cache_size: Option<u64>,
    /// Refcount block cache size in bytes (default: a quarter of the L2 cache, at least 4 clusters).
    pub refcount_cache_size: Option<u64>,
    /// Drop cache entries unused for this long (QEMU's cache-clean-interval); `None` keeps them.
    pub cache_clean_interval: Option<Duration>,
    /// Gate for the backing file and external data file named in the header.
    pub opener: Arc<dyn ImageOpener>,
    /// Use this backing image instead of asking the opener.
    pub backing: Option<Arc<dyn BlockRead>>,
    /// Ignore the backing file named in the header (reads of unallocated ranges return zero).
    pub no_backing: bool,
    /// Use this storage as the external data file instead of asking the opener.
    pub data_file: Option<Arc<dyn Storage>>,
    /// Called when run-time corruption is detected.
    pub on_corrupt: Option<CorruptionCallback>,
    /// Repair refcounts of an image left dirty by lazy refcounts when opening it writable.
    pub repair_dirty: bool,
    /// Allow opening an image with the corrupt bit for writing (for repair).
    pub allow_corrupt: bool,
    /// Receives QEMU's blkdebug events (`l2_load`, `cluster_alloc`, ...) just before the
    /// image-file I/O they name, for a block layer that forwards them to its `file` child.
    pub on_debug_event: Option<DebugEventCallback>,
    /// Receives every host range whose refcount dropped to zero, with the reason.
    pub on_freed: Option<FreedCallback>,
    /// Which freed ranges are discarded on the image file (QEMU's `pass-discard-*`; the
    /// default passes snapshot frees only, as QEMU does without `discard=unmap`).
    pub discard_passing: DiscardPassing,
    /// The metadata data writes are checked against (QEMU's `overlap-check`).
    pub overlap_check: OverlapChecks,
}

/// The metadata a data write is checked not to overlap before it is issued (QEMU's
/// `overlap-check`). A write that would overlap is refused as corruption and the image is
/// marked corrupt. The default checks everything this crate tracks, as QEMU's default mode
/// `cached` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlapChecks {
    /// The header cluster (`main-header`).
    pub main_header: bool,
    /// The active L1 table (`active-l1`).
    pub active_l1: bool,
    /// The refcount table (`refcount-table`).
    pub refcount_table: bool,
    /// Every active L2 table (`active-l2`).
    pub active_l2: bool,
}

impl OverlapChecks {
    /// Every check (QEMU's `cached` and `all`, for the metadata this crate tracks).
    pub const ALL: OverlapChecks = OverlapChecks {
        main_header: true,
        active_l1: true,
        refcount_table: true,
        active_l2: true,
    };
    /// No check (QEMU's `none`).
    pub const NONE: OverlapChecks = OverlapChecks {
        main_header: false,
        active_l1: false,
        refcount_table: false,
        active_l2: false,
    };
    /// The metadata at fixed places, not the L2 tables (QEMU's `constant`).
    pub const CONSTANT: OverlapChecks = OverlapChecks {
        active_l2: false,
        ..OverlapChecks::ALL
    };
}

impl Default for OverlapChecks {
    fn default() -> Self {
        OverlapChecks::ALL
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            direct: false,
            l2_cache_size: None,
            refcount_cache_size: None,
            cache_clean_interval: None,
            opener: Arc::new(DenyImplicitOpen),
            backing: None,
            no_backing: false,
            data_file: None,
            on_corrupt: None,
            repair_dirty: true,
            allow_corrupt: false,
            on_debug_event: None,
            on_freed: None,
            discard_passing: DiscardPassing::default(),
            overlap_check: OverlapChecks::default(),
        }
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("writable", &self.writable)
            .field("direct", &self.direct)
            .field("l2_cache_size", &self.l2_cache_size)
            .field("refcount_cache_size", &self.refcount_cache_size)
            .field("cache_clean_interval", &self.cache_clean_interval)
            .field("discard_passing", &self.discard_passing)
            .field("overlap_check", &self.overlap_check)
            .finish_non_exhaustive()
    }
}

/// Where a guest range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingKind {
    /// Plain data at `host_offset` in the data file (the image file, or the external data file).
    Data {
        /// Host offset of the first byte of the range.
        host_offset: u64,
    },
    /// Reads as zero; `allocated` says whether a host cluster is kept.
    Zero {
        /// A preallocated host cluster exists.
        allocated: bool,
    },
    /// Not allocated here: read from the backing image (zeros without one).
    Unallocated,
    /// Inside a compressed cluster; decompress with [`Qcow2::read_compressed`].
    Compressed {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// Bytes of compressed data to read.
        compressed_len: u64,
    },
}

/// A guest range with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Guest offset of the range.
    pub offset: u64,
    /// Length of the range in bytes.
    pub len: u64,
    /// Where it lives.
    pub kind: MappingKind,
}

pub(crate) struct Tables {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l2: L2Cache,
    /// The host offsets of the active L2 tables, sorted: what lock-free writers check their
    /// data clusters against (the L2 part of the overlap check).
    pub l2_offsets: Arc<[u64]>,
    /// Bumped whenever a guest range may map to another L2 table object (L1 entries, tables
    /// entering or leaving the cache), shared with the L2 cache and read lock-free.
    pub gen: Arc<AtomicU64>,
}

impl Tables {
    /// Call after changing the L1 table (an entry, or the whole table or its place).
    pub fn l1_changed(&mut self) {
        let mut offs: Vec<u64> = self
            .l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        offs.sort_unstable();
        self.l2_offsets = offs.into();
        self.gen.fetch_add(1, Ordering::AcqRel);
    }
}

struct CleanState {
    last: Instant,
    l2_tick: u64,
    rc_tick: u64,
}

/// An open qcow2 image.
///
/// All I/O methods take `&self` and may be called from many threads at once. Metadata lives
/// behind short-lived locks (`tables`: L1 and the L2 cache; `refs`: refcounts and allocation);
/// data I/O runs without holding them.
pub struct Qcow2 {
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) data: Arc<dyn Storage>,
    pub(crate) external_data: bool,
    /// What data writes are checked against.
    pub(crate) overlap: OverlapChecks,
    pub(crate) path: Option<PathBuf>,
    pub(crate) backing: RwLock<Option<Arc<dyn BlockRead>>>,
    pub(crate) geo: Geometry,
    pub(crate) header: Mutex<Header>,
    pub(crate) size: AtomicU64,
    pub(crate) tables: Mutex<Tables>,
    /// The metadata generation ([`Tables::gen`]), for lock-free readers.
    pub(crate) gen: Arc<AtomicU64>,
    /// Unique for the process: tells lock-free readers' cached tables of images apart.
    pub(crate) id: u64,
    /// Whether lock-free lookups ([`crate::hot`]) serve this image.
    pub(crate) hot: bool,
    pub(crate) refs: Mutex<Refcounts>,
    pub(crate) gate: IoGate,
    pub(crate) inflight: Mutex<crate::gate::Inflight>,
    pub(crate) rt_range: Arc<(AtomicU64, AtomicU64)>,
    pub(crate) inflight_cv: Condvar,
    pub(crate) writable: AtomicBool,
    pub(crate) read_only: AtomicBool,
    pub(crate) corrupt: AtomicBool,
    pub(crate) lazy: bool,
    pub(crate) dirty_marked: AtomicBool,
    pub(crate) on_corrupt: Option<CorruptionCallback>,
    clean_interval: Option<Duration>,
    clean: Mutex<CleanState>,
    pub(crate) snapshots: Mutex<Vec<Snapshot>>,
    pub(crate) bitmaps: Mutex<Vec<BitmapEntry>>,
    pub(crate) pending_tags: Mutex<Vec<(u64, Vec<u64>, crate::events::FreeReason)>>,
    pub(crate) pending_count: std::sync::atomic::AtomicUsize,
    pub(crate) force_flush_at: std::sync::atomic::AtomicUsize,
    decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    pub(crate) closed: AtomicBool,
    /// Debug events and freed-cluster hooks (shared with the caches).
    pub(crate) hooks: Hooks,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
