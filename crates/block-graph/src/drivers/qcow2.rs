//! The `qcow2` format driver, on the `qcow2` crate: the crate answers where guest data
//! lives and keeps the metadata; this driver does the data I/O through the node's `file`
//! (or `data-file`) child, reads unallocated ranges through the backing child, and reports
//! run-time corruption as `BLOCK_IMAGE_CORRUPTED`.

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use ::qcow2::{
    BlockRead, CorruptionEvent, MappingKind, OpenOptions, Preallocation, Qcow2, Storage, WritePlan,
};
use qapi_types::event::{BlockImageCorrupted, BlockImageCorruptedData};
use qapi_types::{
    BlkdebugEvent, BlockdevOptionsQcow2, ImageInfoSpecific, ImageInfoSpecificBranch,
    ImageInfoSpecificQCow2, ImageInfoSpecificQCow2Wrapper, Qcow2CompressionType,
    Qcow2OverlapCheckMode, Qcow2OverlapChecks, SnapshotInfo,
};

use super::OpenCtx;
use crate::bitmap::StoredBitmap;
use crate::driver::{
    BlockDriver, CopyExtent, DriverImageInfo, DriverStatus, StatusKind, WriteFlags, ZeroFlags,
};
use crate::error::{BlockError, Result};
use crate::events::EventQueue;
use crate::iov::{copy_to_iov, iov_len, iov_len_mut, slice_iov, slice_iov_mut, zero_iov};
use crate::node::{ChildSlot, Edge, Node, Parent};
use crate::perm::ChildRole;

/// A [`Storage`] that sends the qcow2 crate's I/O through an edge of the graph.
pub struct EdgeStorage(pub Arc<Edge>);

impl Storage for EdgeStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Ok(self.0.read_buf(offset, buf)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        Ok(self.0.write_buf(offset, buf, WriteFlags::default())?)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(self.0.flush()?)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.node().exact_length()?)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        Ok(self.0.truncate(len)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        Ok(self.0.write_zeroes(offset, len, ZeroFlags::default())?)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        Ok(self.0.discard(offset, len)?)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.0.node().driver().allocated_size()
    }
}

/// The backing node as the qcow2 crate sees it (for copy-on-write reads of partial
/// clusters). Follows the node's backing slot, so a backing change takes effect at once.
struct BackingRead(Arc<ChildSlot>);

impl BlockRead for BackingRead {
    fn size(&self) -> u64 {
        self.0.get().map_or(0, |e| e.length())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> ::qcow2::Result<()> {
        match self.0.get() {
            Some(e) => e
                .read_buf(offset, buf)
                .map_err(|e| ::qcow2::Error::Io(e.into())),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
    fn format_name(&self) -> &str {
        "backing"
    }
}

/// The qcow2 driver's state.
pub struct Qcow2Driver {
    img: Qcow2,
    file: Arc<Edge>,
    data: Arc<Edge>,
    backing: Arc<ChildSlot>,
    cluster_size: u64,
}

fn size_opt(v: Option<i64>, name: &str) -> Result<Option<u64>> {
    super::non_negative(v, name)
}

/// QEMU's cache size rules (`read_cache_sizes`).
fn cache_sizes(
    q: &BlockdevOptionsQcow2,
    cluster_size: u64,
    virtual_size: u64,
) -> Result<(Option<u64>, Option<u64>)> {
    let combined = size_opt(q.cache_size, "cache-size")?;
    let l2 = size_opt(q.l2_cache_size, "l2-cache-size")?;
    let rc = size_opt(q.refcount_cache_size, "refcount-cache-size")?;
    let Some(combined) = combined else {
        return Ok((l2, rc));
    };
    let min_rc = 4 * cluster_size;
    let max_l2 = virtual_size.div_ceil(cluster_size) * 8;
    match (l2, rc) {
        (Some(_), Some(_)) => Err(BlockError::generic(
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
        )),
        (Some(l), None) => {
            if l > combined {
                return Err(BlockError::generic(
                    "l2-cache-size may not exceed cache-size",
                ));
            }
            Ok((Some(l), Some(combined - l)))
        }
        (None, Some(r)) => {
            if r > combined {
                return Err(BlockError::generic(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
            Ok((Some(combined - r), Some(r)))
        }
        (None, None) => {
            if combined >= max_l2 + min_rc {
                Ok((Some(max_l2), Some(combined - max_l2)))
            } else {
                let r = combined.min(min_rc);
                Ok((Some(combined - r), Some(r)))
            }
        }
    }
}

/// QEMU's `overlap-check` option as the qcow2 crate's checks. The crate tracks the header,
/// the active L1 and L2 tables and the refcount table; the flags for other metadata
/// (refcount blocks, snapshot table, inactive tables, bitmap directory) are accepted and
/// have nothing to select.
fn overlap_checks(o: &Option<Qcow2OverlapChecks>) -> Result<::qcow2::OverlapChecks> {
    use ::qcow2::OverlapChecks as C;
    let mode = |m: &Qcow2OverlapCheckMode| match m {
        Qcow2OverlapCheckMode::None => Ok(C::NONE),
        Qcow2OverlapCheckMode::Constant => Ok(C::CONSTANT),
        Qcow2OverlapCheckMode::Cached | Qcow2OverlapCheckMode::All => Ok(C::ALL),
        Qcow2OverlapCheckMode::Unrecognized(s) => Err(BlockError::generic(format!(
            "Unsupported value '{s}' for qcow2 option 'overlap-check'. Allowed are any of the \
             following: none, constant, cached, all"
        ))),
    };
    match o {
        None => Ok(C::default()),
        Some(Qcow2OverlapChecks::Mode(m)) => mode(m),
        Some(Qcow2OverlapChecks::Flags(f)) => {
            // The template (QEMU's default `cached`) first, then each flag given.
            let mut c = f.template.as_ref().map_or(Ok(C::default()), mode)?;
            let set = |v: &mut bool, flag: Option<bool>| *v = flag.unwrap_or(*v);
            set(&mut c.main_header, f.main_header);
            set(&mut c.active_l1, f.active_l1);
            set(&mut c.active_l2, f.active_l2);
            set(&mut c.refcount_table, f.refcount_table);
            Ok(c)
        }
    }
}

/// Reports run-time corruption as QEMU's `BLOCK_IMAGE_CORRUPTED`.
fn corruption_reporter(
    events: Arc<EventQueue>,
    node: Arc<OnceLock<Weak<Node>>>,
    name: String,
) -> ::qcow2::CorruptionCallback {
    Arc::new(move |ev: &CorruptionEvent| {
        let device = node
            .get()
            .and_then(Weak::upgrade)
            .map(|n| {
                n.parents()
                    .iter()
                    .find_map(|e| match e.parent() {
                        Some(Parent::Root(r)) => crate::backend::device_name_of(r),
                        _ => None,
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        events.push(BlockImageCorrupted::message(&BlockImageCorruptedData {
            device,
            node_name: Some(name.clone()),
            msg: ev.msg.clone(),
            offset: ev.offset.map(|o| o as i64),
            size: ev.size.map(|s| s as i64),
            fatal: ev.fatal,
        }));
    })
}

/// Opens a qcow2 node.
pub(crate) fn open(
    ctx: &mut OpenCtx<'_>,
    q: &BlockdevOptionsQcow2,
) -> Result<Box<dyn BlockDriver>> {
    let overlap_check = overlap_checks(&q.overlap_check)?;
    let file = ctx.open_child("file", &q.file, ChildRole::Image)?;
    let writable = !ctx.options().read_only;
    // Read the header first: cache sizes and checks depend on it.
    let storage: Arc<dyn Storage> = Arc::new(EdgeStorage(file.clone()));
    let flen = file.node().exact_length()?;
    let mut probe = [0u8; 24];
    storage.read_at(&mut probe, 0).map_err(BlockError::from)?;
    if flen < 24 || u32::from_be_bytes(probe[0..4].try_into().expect("4")) != ::qcow2::header::MAGIC
    {
        return Err(BlockError::generic("Image is not in qcow2 format"));
    }
    let cb = u32::from_be_bytes(probe[20..24].try_into().expect("4"));
    if !(::qcow2::header::MIN_CLUSTER_BITS..=::qcow2::header::MAX_CLUSTER_BITS).contains(&cb) {
        return Err(BlockError::generic(format!(
            "Unsupported cluster size: 2^{cb}"
        )));
    }
    let mut hdr_buf = vec![0u8; (1u64 << cb).min(flen) as usize];
    storage.read_at(&mut hdr_buf, 0).map_err(BlockError::from)?;
    let hdr = ::qcow2::Header::parse(&hdr_buf, flen).map_err(BlockError::from)?;
    let cs = hdr.cluster_size();
    let (l2, rc) = cache_sizes(q, cs, hdr.size)?;
    let interval = match q.cache_clean_interval {
        Some(i) if i < 0 || i > u32::MAX as i64 => {
            return Err(BlockError::generic("Cache clean interval too big"))
        }
        Some(0) | None => None,
        Some(i) => Some(Duration::from_secs(i as u64)),
    };
    let lazy_in_image = hdr.compatible_features & ::qcow2::header::COMPAT_LAZY_REFCOUNTS != 0;
    match q.lazy_refcounts {
        Some(true) if hdr.version < 3 => {
            return Err(BlockError::generic(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ))
        }
        Some(v) if v != lazy_in_image => {
            return Err(BlockError::generic(format!(
                "lazy-refcounts={} differs from the image's lazy_refcounts setting; change the \
                 image with 'qemu-img amend -o lazy_refcounts={}'",
                if v { "on" } else { "off" },
                if v { "on" } else { "off" }
            )))
        }
        _ => {}
    }
    let external = hdr.incompatible_features & ::qcow2::header::INCOMPAT_DATA_FILE != 0;
    let data = match (&q.data_file, external) {
        (Some(_), false) => {
            return Err(BlockError::generic(
                "'data-file' can only be set for images with an external data file",
            ))
        }
        (Some(r), true) => ctx.open_child("data-file", r, ChildRole::Data)?,
        (None, true) => {
            let Some(name) = hdr.data_file.clone() else {
                return Err(BlockError::generic(
                    "'data-file' is required for this image",
                ));
            };
            let base = super::node_filename(&file.node());
            let full = super::full_backing_filename(&base, &name)?;
            let def = qapi_types::BlockdevRef::Definition(Box::new(
                <qapi_types::BlockdevOptions as qapi_types::QapiType>::from_qmp_strict(
                    serde_json::json!({"driver": "file", "filename": full}),
                )
                .map_err(|e| BlockError::generic(e.to_string()))?,
            ));
            ctx.open_child("data-file", &def, ChildRole::Data)?
        }
        (None, false) => file.clone(),
    };
    let backing = ctx.backing_slot();
    let opts = OpenOptions {
        writable,
        direct: false,
        l2_cache_size: l2,
        refcount_cache_size: rc,
        cache_clean_interval: interval,
        backing: Some(Arc::new(BackingRead(backing.clone()))),
        no_backing: false,
        data_file: external.then(|| Arc::new(EdgeStorage(data.clone())) as Arc<dyn Storage>),
        on_corrupt: Some(corruption_reporter(
            ctx.events(),
            ctx.node_cell(),
            ctx.node_name().to_string(),
        )),
        on_debug_event: debug_event_forwarder(&file),
        // QEMU's defaults: guest discards pass down with discard=unmap, snapshot frees
        // always, other frees never.
        discard_passing: ::qcow2::DiscardPassing {
            request: q
                .pass_discard_request
                .unwrap_or(ctx.options().discard_unmap),
            snapshot: q.pass_discard_snapshot.unwrap_or(true),
            other: q.pass_discard_other.unwrap_or(false),
        },
        overlap_check,
        ..OpenOptions::default()
    };
    let img = Qcow2::open(storage, opts).map_err(BlockError::from)?;
    Ok(Box::new(Qcow2Driver {
        cluster_size: img.cluster_size(),
        img,
        file,
        data,
        backing,
    }))
}

/// Forwards the image's blkdebug events (`l2_load`, `refblock_alloc`, ...) to its `file`
/// child when that is a `blkdebug` node, so rules on those events fire as in QEMU. Other
/// children get no listener: with one, the image takes its locked path on L2 cache misses.
fn debug_event_forwarder(file: &Arc<Edge>) -> Option<::qcow2::DebugEventCallback> {
    if file.node().driver_name() != "blkdebug" {
        return None;
    }
    let file = Arc::downgrade(file);
    Some(Arc::new(move |e: ::qcow2::DebugEvent| {
        let (Some(file), Some(ev)) = (file.upgrade(), BlkdebugEvent::from_wire(e.name())) else {
            return;
        };
        file.debug_event(ev);
    }))
}

fn snapshot_info(s: &::qcow2::Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        vm_state_size: s.vm_state_size as i64,
        date_sec: s.date_sec as i64,
        date_nsec: s.date_nsec as i64,
        vm_clock_sec: (s.vm_clock_nsec / 1_000_000_000) as i64,
        vm_clock_nsec: (s.vm_clock_nsec % 1_000_000_000) as i64,
    }
}

impl Qcow2Driver {
    /// The image (for tools that need format details).
    pub fn image(&self) -> &Qcow2 {
        &self.img
    }

    fn read_backing(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        match self.backing.get() {
            Some(b) => {
                self.file.debug_event(BlkdebugEvent::ReadBackingAio);
                b.read(offset, iov)
            }
            None => {
                zero_iov(iov);
                Ok(())
            }
        }
    }

    /// The data I/O of one mapping.
    fn read_mapping(&self, m: &::qcow2::Mapping, sub: &mut [IoSliceMut<'_>]) -> Result<()> {
        match m.kind {
            MappingKind::Data { host_offset } => {
                self.file.debug_event(BlkdebugEvent::ReadAio);
                self.data.read(host_offset, sub)
            }
            MappingKind::Zero { .. } => {
                zero_iov(sub);
                Ok(())
            }
            MappingKind::Unallocated => self.read_backing(m.offset, sub),
            MappingKind::Compressed {
                host_offset,
                compressed_len,
            } => {
                let c = self
                    .img
                    .read_compressed(host_offset, compressed_len)
                    .map_err(BlockError::from)?;
                let o = (m.offset % self.cluster_size) as usize;
                copy_to_iov(sub, 0, &c[o..o + m.len as usize]);
                Ok(())
            }
        }
    }

    fn execute(&self, plan: &WritePlan<'_>, data: &[IoSlice<'_>]) -> Result<()> {
        if plan.cow.is_empty() {
            return self
                .data
                .write(plan.host_offset, data, WriteFlags::default());
        }
        // Merge the copy-on-write regions and the data into one vectored write when they
        // are contiguous on the host.
        let dlen = iov_len(data) as u64;
        let mut parts: Vec<(u64, Vec<IoSlice<'_>>)> = plan
            .cow
            .iter()
            .map(|(h, b)| (*h, vec![IoSlice::new(b)]))
            .collect();
        parts.push((plan.host_offset, data.to_vec()));
        parts.sort_by_key(|(h, _)| *h);
        let contiguous = parts.windows(2).all(|w| {
            let len: u64 = iov_len(&w[0].1) as u64;
            w[0].0 + len == w[1].0
        });
        if contiguous {
            let start = parts[0].0;
            let all: Vec<IoSlice<'_>> = parts.into_iter().flat_map(|(_, v)| v).collect();
            return self.data.write(start, &all, WriteFlags::default());
        }
        for (h, b) in &plan.cow {
            self.data.write_buf(*h, b, WriteFlags::default())?;
        }
        let _ = dlen;
        self.data
            .write(plan.host_offset, data, WriteFlags::default())
    }
}

mod batch;

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.img.size())
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let total = iov_len_mut(iov) as u64;
        let _g = self.img.io_guard();
        let mut done = 0u64;
        while done < total {
            let m = self
                .img
                .map(offset + done, total - done)
                .map_err(BlockError::from)?;
            if done == 0 && m.len == total {
                // One mapping covers the request: no sub-vector.
                self.read_mapping(&m, iov)?;
            } else {
                let mut sub = slice_iov_mut(iov, done as usize, m.len as usize);
                self.read_mapping(&m, &mut sub)?;
            }
            done += m.len;
        }
        Ok(())
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        let total = iov_len(iov) as u64;
        let mut done = 0u64;
        while done < total {
            // `?` converts the error itself; `map_err(..)?` would move the plan (a few
            // hundred bytes) into a Result of another layout first.
            let plan = self.img.prepare_write(offset + done, total - done)?;
            let n = plan.len;
            self.file.debug_event(BlkdebugEvent::WriteAio);
            if done == 0 && n == total {
                self.execute(&plan, iov)?;
            } else {
                let sub = slice_iov(iov, done as usize, n as usize);
                self.execute(&plan, &sub)?;
            }
            self.img.commit_write(plan).map_err(BlockError::from)?;
            done += n;
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn copy_range_from(
        &self,
        offset: u64,
        len: u64,
        to: &mut dyn FnMut(&CopyExtent) -> Result<()>,
    ) -> Result<u64> {
        // Held while the data file range is copied: no exclusive operation moves it.
        let _g = self.img.io_guard();
        let m = self.img.map(offset, len).map_err(BlockError::from)?;
        match m.kind {
            MappingKind::Data { host_offset } => {
                self.file.debug_event(BlkdebugEvent::ReadAio);
                self.data
                    .with_node(|n| n.copy_range_from(host_offset, m.len, to))
            }
            // Backing data is copied from where the backing node keeps it (past its end,
            // or without one, the range reads as zeros: the caller's).
            MappingKind::Unallocated => match self.backing.get() {
                Some(b) => {
                    self.file.debug_event(BlkdebugEvent::ReadBackingAio);
                    b.with_node(|n| n.copy_range_from(offset, m.len, to))
                }
                None => Ok(0),
            },
            _ => Ok(0),
        }
    }

    fn can_copy_range_to(&self) -> bool {
        self.data.with_node(|n| n.driver().can_copy_range_to())
    }

    fn copy_range_to(&self, offset: u64, src: &CopyExtent) -> Result<()> {
        let mut done = 0u64;
        while done < src.len {
            // Clusters allocated (or found) as for a write, the data copied by the data
            // file's driver, then the mapping published.
            let plan = self
                .img
                .prepare_write(offset + done, src.len - done)
                .map_err(BlockError::from)?;
            let part = CopyExtent {
                fd: src.fd,
                offset: src.offset + done,
                len: plan.len,
            };
            self.file.debug_event(BlkdebugEvent::WriteAio);
            for (h, b) in &plan.cow {
                self.data.write_buf(*h, b, WriteFlags::default())?;
            }
            self.data
                .with_node(|n| n.copy_range_to(plan.host_offset, &part))?;
            done += plan.len;
            self.img.commit_write(plan).map_err(BlockError::from)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.img
            .write_zeroes(offset, len, flags.may_unmap)
            .map_err(BlockError::from)?;
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn submit_batch(&self, reqs: &mut [crate::batch::BatchReq<'_>]) {
        self.batch(reqs)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.img.discard(offset, len).map_err(BlockError::from)
    }

    fn flush(&self) -> Result<()> {
        self.img.flush().map_err(BlockError::from)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        let m = self.img.map(offset, len).map_err(BlockError::from)?;
        let kind = match m.kind {
            MappingKind::Data { host_offset } => StatusKind::Data {
                offset: Some(host_offset),
            },
            MappingKind::Compressed { .. } => StatusKind::Data { offset: None },
            MappingKind::Zero { .. } => StatusKind::Zero { offset: None },
            MappingKind::Unallocated => StatusKind::Unallocated,
        };
        Ok(DriverStatus { len: m.len, kind })
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.img
            .resize(len, Preallocation::Off)
            .map_err(|e| match e {
                ::qcow2::Error::NotSupported(m) | ::qcow2::Error::InvalidArgument(m) => {
                    BlockError::generic(m)
                }
                other => BlockError::from(other),
            })
    }

    fn allocated_size(&self) -> Option<u64> {
        self.img.file().allocated_size()
    }

    fn image_info(&self) -> DriverImageInfo {
        let i = self.img.info();
        let fs = &i.format_specific;
        DriverImageInfo {
            cluster_size: Some(i.cluster_size),
            dirty_flag: Some(i.dirty_flag),
            backing_filename: i.backing_filename.clone(),
            backing_filename_format: i.backing_filename_format.clone(),
            snapshots: self.img.snapshots().iter().map(snapshot_info).collect(),
            format_specific: Some(ImageInfoSpecific {
                r#type: ImageInfoSpecificBranch::Qcow2(ImageInfoSpecificQCow2Wrapper {
                    data: ImageInfoSpecificQCow2 {
                        compat: fs.compat.clone(),
                        data_file: fs.data_file.clone(),
                        data_file_raw: fs.data_file_raw,
                        extended_l2: fs.extended_l2,
                        lazy_refcounts: fs.lazy_refcounts,
                        corrupt: fs.corrupt,
                        refcount_bits: fs.refcount_bits as i64,
                        compression_type: Some(if fs.compression_type == "zstd" {
                            Qcow2CompressionType::Zstd
                        } else {
                            Qcow2CompressionType::Zlib
                        }),
                    },
                }),
            }),
        }
    }

    fn backing_file(&self) -> Option<(String, Option<String>)> {
        let h = self.img.header();
        h.backing_file.map(|b| (b, h.backing_format))
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let cur = self.img.backing();
        self.img
            .set_backing(name, format, cur)
            .map_err(BlockError::from)
    }

    fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        let s = self.img.snapshot_create(name).map_err(BlockError::from)?;
        Ok(snapshot_info(&s))
    }

    fn snapshot_find(&self, id: Option<&str>, name: Option<&str>) -> Option<SnapshotInfo> {
        self.img
            .snapshots()
            .iter()
            .find(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
            .map(snapshot_info)
    }

    fn snapshot_delete(&self, id: &str) -> Result<()> {
        self.img.snapshot_delete(id).map_err(BlockError::from)
    }

    fn snapshot_goto(&self, id_or_name: &str) -> Result<()> {
        // QEMU's qcow2_snapshot_goto: -ENOENT for an unknown snapshot, reported by
        // bdrv_snapshot_goto as "Failed to load snapshot: <strerror>".
        self.img.snapshot_apply(id_or_name).map_err(|e| {
            match e {
                ::qcow2::Error::SnapshotNotFound(_) => BlockError::errno(libc::ENOENT),
                other => BlockError::from(other),
            }
            .prepend("Failed to load snapshot")
        })
    }

    fn supports_persistent_bitmaps(&self) -> bool {
        self.img.header().version >= 3
    }

    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>> {
        let mut out = Vec::new();
        for e in self.img.bitmap_list() {
            let bm = self.img.bitmap_read(&e.name).map_err(BlockError::from)?;
            let in_use = bm.flags & ::qcow2::bitmap::FLAG_IN_USE != 0;
            let enabled = bm.flags & ::qcow2::bitmap::FLAG_AUTO != 0;
            if !self.img.is_read_only() && !in_use {
                // Mark the stored copy in use while the bitmap lives in memory: a crash
                // then leaves it recognisably stale.
                let mut marked = bm.clone();
                marked.flags |= ::qcow2::bitmap::FLAG_IN_USE;
                self.img.bitmap_store(&marked).map_err(BlockError::from)?;
            }
            out.push(StoredBitmap {
                name: bm.name,
                granularity: bm.granularity,
                bits: bm.bits,
                enabled,
                in_use,
            });
        }
        Ok(out)
    }

    fn store_bitmap(&self, bm: &StoredBitmap) -> Result<()> {
        let mut flags = 0;
        if bm.enabled {
            flags |= ::qcow2::bitmap::FLAG_AUTO;
        }
        self.img
            .bitmap_store(&::qcow2::DirtyBitmap {
                name: bm.name.clone(),
                granularity: bm.granularity,
                flags,
                bits: bm.bits.clone(),
            })
            .map_err(BlockError::from)
    }

    fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.img.bitmap_remove(name).map_err(BlockError::from)
    }

    fn reopen_read_only(&self) -> Result<()> {
        // Waits for requests in flight, writes the metadata, applies deferred frees, clears
        // the dirty bit, then refuses writes (and can be made writable again).
        self.img.reopen_read_only().map_err(BlockError::from)
    }

    fn reopen_read_write(&self) -> Result<()> {
        self.img.reopen_read_write().map_err(BlockError::from)
    }

    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.img
            .write_compressed(buf, offset)
            .map_err(BlockError::from)
    }

    fn close(&self) -> Result<()> {
        self.img.close().map_err(BlockError::from)
    }
}

/// Whether `path` holds a qcow2 image (by its magic).
pub fn is_qcow2(path: &Path) -> bool {
    matches!(::qcow2::backing::probe_format(path), Ok("qcow2"))
}
