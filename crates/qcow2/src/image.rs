//! The open image: state, opening, mapping and reads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::backing::{read_clamped, BackingRequest, BlockRead, BlockStatus, DataFileRequest};
use crate::backing::{DenyImplicitOpen, ImageOpener};
use crate::bitmap::BitmapEntry;
use crate::error::{Error, Result};
use crate::events::{DebugEvent, DebugEventCallback, DiscardPassing, FreedCallback, Hooks};
use crate::gate::{IoGate, IoGuard};
use crate::header::*;
use crate::l2::L2Words;
use crate::l2::{EntryKind, Geometry, L2Cache, OFFSET_MASK, OFLAG_COPIED};
use crate::refcount::Refcounts;
use crate::snapshot_table::{parse_table, Snapshot};
use crate::storage::{FileStorage, Storage};

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

impl Qcow2 {
    /// Opens the image at `path`.
    pub fn open_path(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Self> {
        let canon = path.as_ref().canonicalize()?;
        Self::open_path_in_chain(path.as_ref(), opts, 0, &[canon])
    }

    /// Opens the image at `path` as layer `depth` of a chain whose upper layers are `chain`.
    pub fn open_path_in_chain(
        path: &Path,
        opts: OpenOptions,
        depth: u32,
        chain: &[PathBuf],
    ) -> Result<Self> {
        let st = FileStorage::open(path, opts.writable, opts.direct)?;
        let mut chain = chain.to_vec();
        if let Ok(c) = path.canonicalize() {
            if !chain.contains(&c) {
                chain.push(c);
            }
        }
        Self::open_inner(Arc::new(st), Some(path.to_path_buf()), opts, depth, &chain)
    }

    /// Opens an image on any storage.
    pub fn open(file: Arc<dyn Storage>, opts: OpenOptions) -> Result<Self> {
        Self::open_inner(file, None, opts, 0, &[])
    }

    fn open_inner(
        file: Arc<dyn Storage>,
        path: Option<PathBuf>,
        opts: OpenOptions,
        depth: u32,
        chain: &[PathBuf],
    ) -> Result<Self> {
        let flen = file.len()?;
        let mut probe = vec![0u8; 104.min(flen as usize)];
        file.read_at(&mut probe, 0)?;
        if probe.len() >= 24 && u32::from_be_bytes(probe[0..4].try_into().expect("4")) == MAGIC {
            let cb = u32::from_be_bytes(probe[20..24].try_into().expect("4"));
            if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
                return Err(Error::invalid(format!("Unsupported cluster size: 2^{cb}")));
            }
            probe = vec![0u8; (1u64 << cb).min(flen) as usize];
            file.read_at(&mut probe, 0)?;
        }
        let h = Header::parse(&probe, flen)?;
        drop(probe);
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 && opts.writable && !opts.allow_corrupt {
            return Err(Error::CorruptImage);
        }
        let external_data = h.incompatible_features & INCOMPAT_DATA_FILE != 0;
        let data: Arc<dyn Storage> = if external_data {
            match &opts.data_file {
                Some(d) => d.clone(),
                None => {
                    let name = h.data_file.clone().ok_or_else(|| {
                        Error::invalid("Image has an external data file but no data file name")
                    })?;
                    opts.opener.open_data_file(&DataFileRequest {
                        name: &name,
                        image_path: path.as_deref(),
                        writable: opts.writable,
                    })?
                }
            }
        } else {
            file.clone()
        };
        let backing = if opts.no_backing {
            None
        } else if let Some(b) = &opts.backing {
            Some(b.clone())
        } else if let Some(name) = &h.backing_file {
            Some(opts.opener.open_backing(&BackingRequest {
                name,
                format: h.backing_format.as_deref(),
                image_path: path.as_deref(),
                depth,
                chain,
            })?)
        } else {
            None
        };
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2(),
            version: h.version,
            external_data,
        };
        let cs = h.cluster_size();
        let mut raw = vec![0u8; h.l1_size as usize * 8];
        file.read_at(&mut raw, h.l1_table_offset)?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect();
        drop(raw);
        let full_l2 = h.l1_entries_for(h.size) * cs;
        let l2_bytes = opts
            .l2_cache_size
            .unwrap_or_else(|| full_l2.min(DEFAULT_L2_CACHE_MAX))
            .max(2 * cs);
        let rc_bytes = opts.refcount_cache_size.unwrap_or(l2_bytes / 4).max(4 * cs);
        let hooks = Hooks {
            debug: opts.on_debug_event.clone(),
            freed: opts.on_freed.clone(),
            pass: opts.discard_passing,
        };
        hooks.event(DebugEvent::ReftableLoad);
        let mut refs = Refcounts::load(
            file.clone(),
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            rc_bytes,
        )?;
        let snapshots = parse_table(&*file, h.snapshots_offset, h.nb_snapshots, flen, cs)?;
        let bitmaps = match &h.bitmaps {
            Some(ext) => crate::bitmap::parse_directory(&*file, ext, flen, cs)?,
            None => Vec::new(),
        };
        let gen = Arc::new(AtomicU64::new(0));
        refs.hooks = hooks.clone();
        let mut l2 = L2Cache::new(file.clone(), geo, (l2_bytes / cs) as usize, gen.clone());
        l2.hooks = hooks.clone();
        let rt_range = refs.shared_table.clone();
        let lazy = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
        let dirty = h.incompatible_features & INCOMPAT_DIRTY != 0;
        let size = h.size;
        let img = Qcow2 {
            file,
            data,
            external_data,
            path,
            backing: RwLock::new(backing),
            geo,
            size: AtomicU64::new(size),
            tables: Mutex::new({
                let mut t = Tables {
                    l1,
                    l1_offset: h.l1_table_offset,
                    l2,
                    l2_offsets: Arc::new([]),
                    gen: gen.clone(),
                };
                t.l1_changed();
                t
            }),
            gen,
            id: crate::hot::next_image_id(),
            hot: crate::hot::eligible(geo.extended_l2, external_data, cs),
            refs: Mutex::new(refs),
            gate: IoGate::default(),
            inflight: Mutex::new(Default::default()),
            rt_range,
            inflight_cv: Condvar::new(),
            writable: AtomicBool::new(opts.writable),
            read_only: AtomicBool::new(!opts.writable),
            corrupt: AtomicBool::new(h.incompatible_features & INCOMPAT_CORRUPT != 0),
            lazy,
            dirty_marked: AtomicBool::new(dirty),
            on_corrupt: opts.on_corrupt.clone(),
            clean_interval: opts.cache_clean_interval,
            clean: Mutex::new(CleanState {
                last: Instant::now(),
                l2_tick: 0,
                rc_tick: 0,
            }),
            snapshots: Mutex::new(snapshots),
            bitmaps: Mutex::new(bitmaps),
            pending_tags: Mutex::new(Vec::new()),
            pending_count: std::sync::atomic::AtomicUsize::new(0),
            force_flush_at: std::sync::atomic::AtomicUsize::new(crate::write::FORCE_FLUSH_FREES),
            decompressed: Mutex::new(None),
            closed: AtomicBool::new(false),
            header: Mutex::new(h),
            hooks,
        };
        if opts.writable {
            img.open_writable_fixups(opts.repair_dirty)?;
        }
        Ok(img)
    }

    fn open_writable_fixups(&self, repair_dirty: bool) -> Result<()> {
        let mut rewrite = false;
        {
            let mut h = lock(&self.header);
            if h.autoclear_features & !AUTOCLEAR_KNOWN != 0 {
                h.autoclear_features &= AUTOCLEAR_KNOWN;
                rewrite = true;
            }
            if h.bitmaps.is_none() && h.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
                h.autoclear_features &= !AUTOCLEAR_BITMAPS;
                rewrite = true;
            }
        }
        if rewrite {
            let mut h = lock(&self.header);
            self.write_header(&mut h)?;
        }
        if self.dirty_marked.load(Ordering::SeqCst) && repair_dirty {
            log::info!("repairing refcounts of an image left dirty");
            let res = crate::check::check_locked(self, crate::check::Fix::ALL)?;
            if res.corruptions > 0 {
                log::warn!("repair left {} corruptions", res.corruptions);
            }
            self.clear_dirty()?;
        }
        Ok(())
    }

    /// Writes the whole header cluster from `h`.
    pub(crate) fn write_header(&self, h: &mut Header) -> Result<()> {
        let buf = h.serialize()?;
        self.file.write_at(&buf, 0)?;
        self.file.flush()?;
        Ok(())
    }

    pub(crate) fn write_incompat(&self, bits: u64) -> Result<()> {
        self.file.write_at(&bits.to_be_bytes(), 72)?;
        self.file.flush()?;
        Ok(())
    }

    /// Sets the dirty bit before the first unordered metadata update (lazy refcounts).
    pub(crate) fn mark_dirty(&self) -> Result<()> {
        if !self.lazy || self.dirty_marked.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut h = lock(&self.header);
        if self.dirty_marked.load(Ordering::Acquire) {
            return Ok(());
        }
        h.incompatible_features |= INCOMPAT_DIRTY;
        self.write_incompat(h.incompatible_features)?;
        self.dirty_marked.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn clear_dirty(&self) -> Result<()> {
        let mut h = lock(&self.header);
        if h.incompatible_features & INCOMPAT_DIRTY != 0 {
            h.incompatible_features &= !INCOMPAT_DIRTY;
            self.write_incompat(h.incompatible_features)?;
        }
        self.dirty_marked.store(false, Ordering::Release);
        Ok(())
    }

    /// Marks the image corrupt (once), makes it read-only and tells the caller.
    pub(crate) fn signal_corruption(&self, msg: String, offset: Option<u64>) -> Error {
        if !self.corrupt.swap(true, Ordering::SeqCst) {
            log::error!("qcow2: Marking image as corrupt: {msg}");
            if self.is_writable() {
                let mut h = lock(&self.header);
                h.incompatible_features |= INCOMPAT_CORRUPT;
                if let Err(e) = self.write_incompat(h.incompatible_features) {
                    log::error!("could not set the corrupt bit: {e}");
                }
            }
            self.read_only.store(true, Ordering::SeqCst);
            if let Some(cb) = &self.on_corrupt {
                cb(&CorruptionEvent {
                    msg: msg.clone(),
                    offset,
                    size: None,
                    fatal: self.is_writable(),
                });
            }
        }
        Error::CorruptionDetected(msg)
    }

    /// Routes corruption found deep inside to [`Qcow2::signal_corruption`].
    pub(crate) fn c<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Err(Error::CorruptionDetected(m)) => Err(self.signal_corruption(m, None)),
            other => other,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cs()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        lock(&self.header).clone()
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<Arc<dyn BlockRead>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether writes are refused (opened read-only, or made read-only by corruption).
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Whether the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The image file's storage.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The storage holding guest data (the image file or the external data file).
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.data
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Enters the I/O gate: hold the guard while using mappings from [`Qcow2::map`], so that
    /// the host clusters they name are not freed and reused meanwhile.
    pub fn io_guard(&self) -> IoGuard<'_> {
        self.gate.enter()
    }

    fn maybe_clean(&self, t: &mut Tables) {
        let Some(iv) = self.clean_interval else {
            return;
        };
        let mut c = lock(&self.clean);
        if c.last.elapsed() < iv {
            return;
        }
        c.l2_tick = t.l2.clean_unused(c.l2_tick);
        if let Ok(mut r) = self.refs.try_lock() {
            c.rc_tick = r.clean_unused(c.rc_tick);
        }
        c.last = Instant::now();
    }

    /// The hook run before a dirty L2 table is written: refcounts go first.
    pub(crate) fn l2_write_dependency(&self) -> impl FnMut() -> Result<()> + '_ {
        move || {
            if self.lazy {
                return Ok(());
            }
            let mut r = lock(&self.refs);
            r.flush_blocks()?;
            if r.unsynced {
                self.file.flush()?;
                r.unsynced = false;
            }
            Ok(())
        }
    }

    /// Finds the L2 table for guest offset `guest`; returns (l1 index, L2 offset or 0).
    pub(crate) fn l2_for(&self, t: &Tables, guest: u64) -> (usize, u64) {
        let idx = (guest >> (self.geo.cluster_bits + self.geo.l2_bits())) as usize;
        let e = t.l1.get(idx).copied().unwrap_or(0);
        (idx, e & OFFSET_MASK)
    }

    /// Reads the (entry, bitmap) pair for guest cluster `guest` from the table at `l2_off`.
    pub(crate) fn entry_at(&self, t: &mut Tables, l2_off: u64, guest: u64) -> Result<(u64, u64)> {
        let i = ((guest >> self.geo.cluster_bits) & ((1 << self.geo.l2_bits()) - 1)) as usize;
        let w = self.geo.words();
        let mut dep = self.l2_write_dependency();
        let tab = t.l2.get(l2_off, &mut dep)?;
        Ok((tab.at(i * w), if w == 2 { tab.at(i * w + 1) } else { 0 }))
    }

    /// Classifies one subcluster (or cluster) of an entry.
    pub(crate) fn classify(&self, entry: u64, bitmap: u64, sc: u32) -> Result<MappingKind> {
        let kind = self.geo.decode(entry)?;
        if let EntryKind::Compressed { host, len } = kind {
            return Ok(MappingKind::Compressed {
                host_offset: host,
                compressed_len: len,
            });
        }
        if !self.geo.extended_l2 {
            return Ok(match kind {
                EntryKind::Unallocated => MappingKind::Unallocated,
                EntryKind::Zero { host } => MappingKind::Zero {
                    allocated: host != 0,
                },
                EntryKind::Normal { host } => MappingKind::Data { host_offset: host },
                EntryKind::Compressed { .. } => unreachable!("handled above"),
            });
        }
        let alloc = bitmap & (1 << sc) != 0;
        let zero = bitmap & (1 << (sc + 32)) != 0;
        if alloc && zero {
            return Err(Error::CorruptionDetected(format!(
                "Subcluster {sc} both allocated and zero (L2 bitmap {bitmap:#x})"
            )));
        }
        let host = match kind {
            EntryKind::Normal { host } => Some(host),
            _ => None,
        };
        if zero {
            return Ok(MappingKind::Zero {
                allocated: host.is_some(),
            });
        }
        if alloc {
            let host = host.ok_or_else(|| {
                Error::CorruptionDetected(format!(
                    "Subcluster {sc} allocated in an unallocated cluster (entry {entry:#x})"
                ))
            })?;
            return Ok(MappingKind::Data {
                host_offset: host + ((sc as u64) << self.geo.subcluster_bits()),
            });
        }
        Ok(MappingKind::Unallocated)
    }

    /// Maps the longest prefix of `[offset, offset + len)` with one kind of mapping (within one
    /// L2 table). Hold an [`IoGuard`] while using the result for data I/O.
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::InvalidArgument("empty range".into()));
        }
        if let Some((n, host)) = crate::hot::data_run(self, offset, len, false) {
            return Ok(Mapping {
                offset,
                len: n,
                kind: MappingKind::Data { host_offset: host },
            });
        }
        // Holding the gate keeps exclusive operations (which rewrite tables on disk) out while
        // a missing table is read without the lock.
        let _g = self.gate.enter();
        let mut t = self.lock_tables_for(offset);
        if let Some((n, host)) = self.data_run_fast(&mut t, offset, len, false) {
            self.maybe_clean(&mut t);
            return Ok(Mapping {
                offset,
                len: n,
                kind: MappingKind::Data { host_offset: host },
            });
        }
        let r = self.map_locked(&mut t, offset, len);
        self.maybe_clean(&mut t);
        drop(t);
        self.c(r)
    }

    /// Takes the metadata lock with the L2 table for guest offset `guest` in the cache when it
    /// can: a table that is not cached is read from the file *without* the lock (so a cache
    /// miss does not hold up other requests' lookups), then inserted if nothing entered or left
    /// the cache and no L1 entry changed meanwhile (the metadata generation did not move, so
    /// the table on disk was current). Anything unusual (invalid offset, read error, a moved
    /// generation) is left to the locked path, which loads or reports it. The caller holds an
    /// [`IoGuard`], which keeps exclusive operations out meanwhile.
    pub(crate) fn lock_tables_for(&self, guest: u64) -> MutexGuard<'_, Tables> {
        let t = lock(&self.tables);
        let (_, off) = self.l2_for(&t, guest);
        // With a debug listener every table load takes the locked path, so an error injected
        // on `l2_load` hits the load whose failure is reported.
        if off == 0
            || t.l2.contains(off)
            || t.l2.validate_offset(off).is_err()
            || self.hooks.debug.is_some()
        {
            return t;
        }
        let gen = t.gen.load(Ordering::Acquire);
        drop(t);
        let cs = self.geo.cs();
        let mut raw = vec![0u8; cs as usize];
        let read = self.file.len().is_ok_and(|l| off + cs <= l)
            && self.file.read_at(&mut raw, off).is_ok();
        let mut t = lock(&self.tables);
        if read && t.gen.load(Ordering::Acquire) == gen && !t.l2.contains(off) {
            let data = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
                .collect();
            let mut dep = self.l2_write_dependency();
            if let Err(e) = t.l2.insert(off, data, false, &mut dep) {
                // The locked path meets (and reports) it again.
                log::debug!("loading the L2 table at {off:#x} ahead failed: {e}");
            }
        }
        t
    }

    /// The locked fast path of lookups: the run of plain data clusters (standard L2 entries,
    /// table cached) that `[offset, offset + len)` starts with, as (bytes, host offset);
    /// `None` for anything else (unallocated, zero, compressed, subclusters, external data
    /// file, a table to load, an entry to report as corrupt), which the general path handles.
    /// With `writable`, only clusters that may be written in place (refcount 1) count. The
    /// table is remembered for this thread's lock-free lookups ([`crate::hot`]).
    #[inline]
    pub(crate) fn data_run_fast(
        &self,
        t: &mut Tables,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Option<(u64, u64)> {
        if self.geo.extended_l2 || self.external_data {
            return None;
        }
        let cb = self.geo.cluster_bits;
        let l2_bits = self.geo.l2_bits();
        let l1i = offset >> (cb + l2_bits);
        let l1e = *t.l1.get(l1i as usize)?;
        let tab = t.l2.peek(l1e & OFFSET_MASK)?.clone();
        crate::hot::remember(self, t, l1i, &tab);
        crate::hot::run_in(&tab, cb, l2_bits, offset, len, writable)
    }

    pub(crate) fn map_locked(&self, t: &mut Tables, offset: u64, len: u64) -> Result<Mapping> {
        let cb = self.geo.cluster_bits;
        let scb = self.geo.subcluster_bits();
        let l1_span = 1u64 << (cb + self.geo.l2_bits());
        let end = (offset + len).min((offset / l1_span + 1) * l1_span);
        let (_, l2_off) = self.l2_for(t, offset);
        if l2_off == 0 {
            return Ok(Mapping {
                offset,
                len: end - offset,
                kind: MappingKind::Unallocated,
            });
        }
        let scs = 1u64 << scb;
        let mut pos = offset;
        let mut first: Option<MappingKind> = None;
        let mut expect_host = 0u64;
        while pos < end {
            let (e, bm) = self.entry_at(t, l2_off, pos)?;
            let sc = ((pos >> scb) & ((1 << (cb - scb)) - 1)) as u32;
            let kind = self.classify(e, bm, sc)?;
            let in_sc = pos & (scs - 1);
            let step = (scs - in_sc).min(end - pos);
            match (first, kind) {
                (None, k) => {
                    first = Some(match k {
                        MappingKind::Data { host_offset } => {
                            expect_host = host_offset + in_sc + step;
                            MappingKind::Data {
                                host_offset: host_offset + in_sc,
                            }
                        }
                        k => k,
                    });
                    if let MappingKind::Compressed { .. } = k {
                        // One cluster at a time.
                        let cend = ((pos >> cb) + 1) << cb;
                        return Ok(Mapping {
                            offset,
                            len: cend.min(end) - offset,
                            kind: first.expect("set"),
                        });
                    }
                }
                (Some(MappingKind::Data { .. }), MappingKind::Data { host_offset })
                    if host_offset == expect_host =>
                {
                    expect_host += step;
                }
                (Some(MappingKind::Zero { allocated: a }), MappingKind::Zero { allocated: b })
                    if a == b => {}
                (Some(MappingKind::Unallocated), MappingKind::Unallocated) => {}
                _ => break,
            }
            pos += step;
        }
        Ok(Mapping {
            offset,
            len: pos - offset,
            kind: first.expect("at least one step"),
        })
    }

    /// Decompresses the cluster at `host_offset` into a cluster-sized buffer.
    pub fn read_compressed(&self, host_offset: u64, compressed_len: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((h, d)) = &*lock(&self.decompressed) {
            if *h == host_offset {
                return Ok(d.clone());
            }
        }
        let cs = self.geo.cs();
        if compressed_len > 2 * cs + 512 {
            return Err(self.signal_corruption(
                format!("Compressed cluster at {host_offset:#x} too large"),
                Some(host_offset),
            ));
        }
        let mut input = vec![0u8; compressed_len as usize];
        self.hooks.event(DebugEvent::ReadCompressed);
        self.file.read_at(&mut input, host_offset)?;
        let mut out = vec![0u8; cs as usize];
        let ty = lock(&self.header).compression_type;
        crate::compress::decompress(ty, &input, &mut out)?;
        let out = Arc::new(out);
        *lock(&self.decompressed) = Some((host_offset, out.clone()));
        Ok(out)
    }

    pub(crate) fn forget_decompressed(&self) {
        *lock(&self.decompressed) = None;
    }

    /// Reads guest data: `buf.len()` bytes from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _g = self.gate.enter();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let m = self.map(pos, (buf.len() - done) as u64)?;
            let n = m.len as usize;
            let dst = &mut buf[done..done + n];
            self.read_mapped(&m, dst)?;
            done += n;
        }
        Ok(())
    }

    /// Performs the data I/O for one mapping (the generic layer).
    pub fn read_mapped(&self, m: &Mapping, dst: &mut [u8]) -> Result<()> {
        match m.kind {
            MappingKind::Data { host_offset } => {
                self.hooks.event(DebugEvent::ReadAio);
                self.data.read_at(dst, host_offset)?
            }
            MappingKind::Zero { .. } => dst.fill(0),
            MappingKind::Unallocated => match self.backing() {
                Some(b) => {
                    self.hooks.event(DebugEvent::ReadBackingAio);
                    read_clamped(&*b, dst, m.offset)?
                }
                None => dst.fill(0),
            },
            MappingKind::Compressed {
                host_offset,
                compressed_len,
            } => {
                let c = self.read_compressed(host_offset, compressed_len)?;
                let o = (m.offset & (self.geo.cs() - 1)) as usize;
                dst.copy_from_slice(&c[o..o + dst.len()]);
            }
        }
        Ok(())
    }

    /// Allocation status of a prefix of `[offset, offset + len)`, following the backing chain
    /// for unallocated ranges (depth counts layers).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let m = self.map(offset, len)?;
        Ok(match m.kind {
            MappingKind::Data { host_offset } => BlockStatus {
                len: m.len,
                allocated: true,
                zero: false,
                data: true,
                depth: 0,
                offset: Some(host_offset),
            },
            MappingKind::Compressed { .. } => BlockStatus {
                len: m.len,
                allocated: true,
                zero: false,
                data: true,
                depth: 0,
                offset: None,
            },
            MappingKind::Zero { .. } => BlockStatus {
                len: m.len,
                allocated: true,
                zero: true,
                data: false,
                depth: 0,
                offset: None,
            },
            MappingKind::Unallocated => match self.backing() {
                Some(b) if offset < b.size() => {
                    let l = m.len.min(b.size() - offset);
                    let mut s = b.block_status(offset, l)?;
                    s.depth += 1;
                    s
                }
                Some(_) => BlockStatus {
                    len: m.len,
                    allocated: false,
                    zero: true,
                    data: false,
                    depth: 1,
                    offset: None,
                },
                None => BlockStatus {
                    len: m.len,
                    allocated: false,
                    zero: true,
                    data: false,
                    depth: 0,
                    offset: None,
                },
            },
        })
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        lock(&self.snapshots).clone()
    }

    pub(crate) fn l1_entry_copied(e: u64) -> bool {
        e & OFLAG_COPIED != 0
    }
}

impl BlockRead for Qcow2 {
    fn size(&self) -> u64 {
        Qcow2::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Qcow2::block_status(self, offset, len)
    }
    fn format_name(&self) -> &str {
        "qcow2"
    }
    fn filename(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    fn backing_image(&self) -> Option<Arc<dyn BlockRead>> {
        self.backing()
    }
}
