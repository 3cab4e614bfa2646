//! Opening an image (header, L1 table, refcounts, snapshots, bitmaps, backing image and
//! external data file) and the header bits kept current while it is open: dirty (lazy
//! refcounts) and corrupt (run-time corruption).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use crate::backing::{BackingRequest, DataFileRequest};
use crate::error::{Error, Result};
use crate::events::{DebugEvent, Hooks};
use crate::gate::IoGate;
use crate::header::*;
use crate::image::{
    lock, CleanState, CorruptionEvent, OpenOptions, Qcow2, Tables, DEFAULT_L2_CACHE_MAX,
};
use crate::l2::{Geometry, L2Cache};
use crate::refcount::Refcounts;
use crate::snapshot_table::parse_table;
use crate::storage::{FileStorage, Storage};

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
            overlap: opts.overlap_check,
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
}
