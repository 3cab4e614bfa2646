//! Resizing, and the data of `qemu-img info` (QEMU's ImageInfo and ImageInfoSpecificQCow2).

use std::sync::atomic::Ordering;

use crate::create::Preallocation;
use crate::error::{Error, Result};
use crate::header::*;
use crate::image::{lock, Qcow2};
use crate::l2::L2Words;
use crate::l2::{OFFSET_MASK, OFLAG_COPIED};

/// One snapshot in [`ImageInfo`] (QEMU's SnapshotInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Size of saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: u64,
    /// Creation time, nanoseconds.
    pub date_nsec: u64,
    /// Guest clock, seconds.
    pub vm_clock_sec: u64,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, if recorded.
    pub icount: Option<u64>,
}

/// One bitmap in [`ImageInfoSpecificQCow2`] (QEMU's Qcow2BitmapInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Flags: "in-use", "auto".
    pub flags: Vec<String>,
}

/// QEMU's ImageInfoSpecificQCow2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfoSpecificQCow2 {
    /// "0.10" or "1.1".
    pub compat: String,
    /// External data file name.
    pub data_file: Option<String>,
    /// Whether the data file is raw (only with a data file).
    pub data_file_raw: Option<bool>,
    /// Extended L2 entries (version 3).
    pub extended_l2: Option<bool>,
    /// Lazy refcounts (version 3).
    pub lazy_refcounts: Option<bool>,
    /// Corrupt bit (version 3).
    pub corrupt: Option<bool>,
    /// Refcount width.
    pub refcount_bits: u64,
    /// Persistent bitmaps (version 3).
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// "zlib" or "zstd".
    pub compression_type: String,
}

/// QEMU's ImageInfo for a qcow2 image (fields that depend on the host file, `filename` and
/// `actual_size`, are filled from the storage when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// File name, if opened from a path.
    pub filename: Option<String>,
    /// "qcow2".
    pub format: String,
    /// Dirty flag.
    pub dirty_flag: bool,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// Virtual size.
    pub virtual_size: u64,
    /// Cluster size.
    pub cluster_size: u64,
    /// Encrypted (always false: encryption is refused).
    pub encrypted: bool,
    /// Backing file name as recorded.
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Backing file format as recorded.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// qcow2-specific data.
    pub format_specific: ImageInfoSpecificQCow2,
}

impl Qcow2 {
    /// The data of `qemu-img info`.
    pub fn info(&self) -> ImageInfo {
        let h = self.header();
        let v3 = h.version >= 3;
        let bitmaps = lock(&self.bitmaps)
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.flags & crate::bitmap::FLAG_IN_USE != 0 {
                    flags.push("in-use".to_string());
                }
                if b.flags & crate::bitmap::FLAG_AUTO != 0 {
                    flags.push("auto".to_string());
                }
                BitmapInfo {
                    name: b.name.clone(),
                    granularity: 1 << b.granularity_bits,
                    flags,
                }
            })
            .collect::<Vec<_>>();
        let full_backing = h.backing_file.as_ref().map(|b| {
            crate::backing::resolve_relative(b, self.path())
                .to_string_lossy()
                .into_owned()
        });
        ImageInfo {
            filename: self.path().map(|p| p.to_string_lossy().into_owned()),
            format: "qcow2".into(),
            dirty_flag: h.incompatible_features & INCOMPAT_DIRTY != 0,
            actual_size: self.file.allocated_size(),
            virtual_size: self.size(),
            cluster_size: h.cluster_size(),
            encrypted: false,
            backing_filename: h.backing_file.clone(),
            full_backing_filename: full_backing,
            backing_filename_format: h.backing_format.clone(),
            snapshots: self
                .snapshots()
                .into_iter()
                .map(|s| SnapshotInfo {
                    id: s.id,
                    name: s.name,
                    vm_state_size: s.vm_state_size,
                    date_sec: s.date_sec as u64,
                    date_nsec: s.date_nsec as u64,
                    vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
                    vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
                    icount: s.icount,
                })
                .collect(),
            format_specific: ImageInfoSpecificQCow2 {
                compat: if v3 { "1.1".into() } else { "0.10".into() },
                data_file: h.data_file.clone(),
                data_file_raw: h
                    .data_file
                    .as_ref()
                    .map(|_| h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
                extended_l2: v3.then_some(h.extended_l2()),
                lazy_refcounts: v3.then_some(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
                corrupt: v3.then_some(h.incompatible_features & INCOMPAT_CORRUPT != 0),
                refcount_bits: 1 << h.refcount_order,
                bitmaps: (v3 && !bitmaps.is_empty()).then_some(bitmaps),
                compression_type: h.compression_type.name().into(),
            },
        }
    }

    /// Points the image at another backing file (or none), rewriting the header; with
    /// `image`, reads of unallocated ranges use it from now on. This does not copy data: see
    /// `vmm-img rebase` for the safe variant.
    pub fn set_backing(
        &self,
        name: Option<&str>,
        format: Option<&str>,
        image: Option<std::sync::Arc<dyn crate::backing::BlockRead>>,
    ) -> Result<()> {
        self.check_writable()?;
        let _x = self.gate.exclusive();
        let mut h = lock(&self.header);
        let old = h.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format).map(str::to_string);
        if let Err(e) = self.write_header(&mut h) {
            *h = old;
            return Err(e);
        }
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = image;
        Ok(())
    }

    /// Changes the virtual size. Growing may preallocate the new area; shrinking discards the
    /// clusters beyond the new end. Refused with internal snapshots or bitmaps, as in QEMU.
    pub fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_writable()?;
        if !lock(&self.snapshots).is_empty() {
            return Err(Error::NotSupported(
                "Can't resize an image which has snapshots".into(),
            ));
        }
        if !lock(&self.bitmaps).is_empty() {
            return Err(Error::NotSupported(
                "Can't resize an image which has persistent bitmaps".into(),
            ));
        }
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(
                "The new size must be a multiple of 512".into(),
            ));
        }
        let _x = self.gate.exclusive();
        let old = self.size();
        let r = if new_size >= old {
            self.set_size_field(new_size).and_then(|_| {
                if prealloc != Preallocation::Off {
                    let cs = self.geo.cs();
                    let start = old.div_ceil(cs) * cs;
                    if start < new_size {
                        self.preallocate(start, new_size, prealloc)?;
                    }
                }
                Ok(())
            })
        } else {
            if prealloc != Preallocation::Off {
                return Err(Error::NotSupported(
                    "Preallocation can't be used for shrinking an image".into(),
                ));
            }
            self.shrink(new_size)
        };
        self.c(r)
    }

    fn shrink(&self, new_size: u64) -> Result<()> {
        let cs = self.geo.cs();
        let cb = self.geo.cluster_bits;
        let w = self.geo.words();
        self.flush()?;
        let first_free = new_size.div_ceil(cs);
        let span_bits = cb + self.geo.l2_bits();
        let mut frees = Vec::new();
        let mut t = lock(&self.tables);
        for i in 0..t.l1.len() {
            let l1e = t.l1[i];
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let first_c = (i as u64) << (span_bits - cb);
            let n = 1u64 << self.geo.l2_bits();
            if first_c + n <= first_free {
                continue;
            }
            if l1e & OFLAG_COPIED == 0 {
                return Err(Error::NotSupported(
                    "shared L2 table while shrinking".into(),
                ));
            }
            let mut dep = self.l2_write_dependency();
            let tab = t.l2.get(l2, &mut dep)?.clone();
            if first_c >= first_free {
                // The whole table goes: clear the L1 entry first, then free the table.
                for j in 0..n as usize {
                    frees.extend(self.entry_clusters(tab.at(j * w))?);
                }
                t.l1[i] = 0;
                t.l1_changed();
                self.file
                    .write_at(&0u64.to_be_bytes(), t.l1_offset + i as u64 * 8)?;
                frees.push(l2 >> cb);
                t.l2.remove(l2);
            } else {
                for j in 0..n {
                    if first_c + j < first_free {
                        continue;
                    }
                    let j = j as usize;
                    frees.extend(self.entry_clusters(tab.at(j * w))?);
                    tab.put(j * w, 0);
                    if w == 2 {
                        tab.put(j * w + 1, 0);
                    }
                }
                t.l2.mark_dirty(l2);
            }
        }
        drop(t);
        self.queue_frees(frees, crate::events::FreeReason::Always);
        self.file.write_at(&new_size.to_be_bytes(), 24)?;
        self.file.flush()?;
        lock(&self.header).size = new_size;
        self.size.store(new_size, Ordering::Release);
        // Writes the tables and applies the frees (no request is in flight).
        self.flush()?;
        self.truncate_tail(new_size)
    }

    /// Cuts the file after the last cluster in use, as QEMU does after shrinking (refcount
    /// blocks that count nothing are dropped first), and an external data file to the new
    /// virtual size. Runs with the gate held exclusively.
    fn truncate_tail(&self, new_size: u64) -> Result<()> {
        let cs = self.geo.cs();
        let mut r = lock(&self.refs);
        r.drop_unused_blocks()?;
        r.flush_blocks()?;
        self.file.flush()?;
        r.unsynced = false;
        let flen = self.file.len()?;
        let last = r.last_used_cluster(flen.div_ceil(cs))?.ok_or_else(|| {
            Error::CorruptionDetected("There are no references in the refcount table.".into())
        })?;
        let end = (last + 1) * cs;
        if end < flen {
            if let Err(e) = self.file.set_len(end) {
                log::warn!("Failed to truncate the tail of the image: {e}");
            } else {
                r.truncated(end);
            }
        }
        drop(r);
        if self.external_data {
            self.data.set_len(new_size)?;
        }
        self.file.flush()?;
        Ok(())
    }
}
