//! Creating images, with every option of `qemu-img create -f qcow2`.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::header::*;
use crate::image::{lock, OpenOptions, Qcow2};
use crate::l2::L2Words;
use crate::l2::{BITMAP_ALL_ALLOC, OFLAG_COPIED};
use crate::refcount::set_entry;
use crate::storage::{FileStorage, Storage};

/// Preallocation mode (`-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only the minimal metadata.
    #[default]
    Off,
    /// All L2 tables and data clusters allocated, file sparse.
    Metadata,
    /// Like metadata, and the data area reserved with fallocate.
    Falloc,
    /// Like metadata, and the data area written with zeros.
    Full,
}

impl Preallocation {
    /// Parses QEMU's names.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Options of a new image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (power of two, 512 B to 2 MiB).
    pub cluster_size: u64,
    /// Version: 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Lazy refcounts (version 3 only).
    pub lazy_refcounts: bool,
    /// Refcount width in bits (power of two, 1 to 64; version 2 needs 16).
    pub refcount_bits: u32,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing file format to record.
    pub backing_format: Option<String>,
    /// Compression type (zstd needs version 3).
    pub compression_type: CompressionType,
    /// Extended L2 entries with subclusters (version 3, clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// External data file name to record (the file must exist; version 3).
    pub data_file: Option<String>,
    /// Whether the external data file is a valid raw image.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            lazy_refcounts: false,
            refcount_bits: 16,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
        }
    }
}

impl CreateOptions {
    /// Options for an image of `size` bytes with QEMU's defaults.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<u32> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        if !self.cluster_size.is_power_of_two()
            || self.cluster_size < 512
            || self.cluster_size > (2 << 20)
        {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version != 2 && self.version != 3 {
            return bad("Invalid compatibility level");
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
            if self.lazy_refcounts {
                return bad("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.extended_l2 {
                return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.compression_type != CompressionType::Zlib {
                return bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
            if self.data_file.is_some() {
                return bad("Data file is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            }
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return bad("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if self.backing_file.is_some() && self.data_file_raw {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        Ok(self.cluster_size.trailing_zeros())
    }
}

impl Qcow2 {
    /// Creates a new image file at `path` (truncating it).
    pub fn create_path(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let st: Arc<dyn Storage> = Arc::new(FileStorage::create(path.as_ref())?);
        Self::create(st, opts)?;
        Ok(())
    }

    /// Writes a new image onto `file` (its previous contents are discarded). With
    /// preallocation or an external data file, `data_file` must be the data storage.
    pub fn create(file: Arc<dyn Storage>, opts: &CreateOptions) -> Result<()> {
        Self::create_with_data(file, None, opts)
    }

    /// Like [`Qcow2::create`], with the storage of the external data file.
    pub fn create_with_data(
        file: Arc<dyn Storage>,
        data_file: Option<Arc<dyn Storage>>,
        opts: &CreateOptions,
    ) -> Result<()> {
        let cb = opts.validate()?;
        let cs = 1u64 << cb;
        let mut h = Header {
            version: opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: cb,
            size: opts.size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: opts.refcount_bits.trailing_zeros(),
            header_length: if opts.version == 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            compression_type: opts.compression_type,
            backing_file: opts.backing_file.clone(),
            backing_format: opts.backing_format.clone(),
            data_file: opts.data_file.clone(),
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_extensions: Vec::new(),
        };
        if opts.extended_l2 {
            h.incompatible_features |= INCOMPAT_EXTL2;
        }
        if opts.compression_type != CompressionType::Zlib {
            h.incompatible_features |= INCOMPAT_COMPRESSION;
        }
        if opts.data_file.is_some() {
            h.incompatible_features |= INCOMPAT_DATA_FILE;
            if opts.data_file_raw {
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
            }
        }
        if opts.lazy_refcounts {
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
        }
        let l1_entries = h.l1_entries_for(opts.size);
        if l1_entries * 8 > MAX_L1_SIZE {
            return Err(Error::InvalidArgument(
                "Image size too large for this cluster size".into(),
            ));
        }
        h.l1_size = l1_entries as u32;
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let rb_entries = cs * 8 / opts.refcount_bits as u64;
        // Fixed point: header + table + blocks + L1 covered by the blocks.
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let meta = 1 + rt + rb + l1_clusters;
            let nrb = meta.div_ceil(rb_entries);
            let nrt = (nrb * 8).div_ceil(cs);
            if nrb == rb && nrt == rt {
                break;
            }
            rb = nrb.max(rb);
            rt = nrt.max(rt);
        }
        if rt * cs > MAX_REFTABLE_SIZE {
            return Err(Error::InvalidArgument("Image size too large".into()));
        }
        h.refcount_table_clusters = rt as u32;
        let rb_start = 1 + rt;
        h.l1_table_offset = if l1_entries > 0 {
            (rb_start + rb) * cs
        } else {
            0
        };
        let total = 1 + rt + rb + l1_clusters;
        file.set_len(0)?;
        let hdr = h.serialize()?;
        let mut first = vec![0u8; cs as usize];
        first[..hdr.len()].copy_from_slice(&hdr);
        file.write_at(&first, 0)?;
        let mut table = vec![0u8; (rt * cs) as usize];
        for i in 0..rb {
            let off = (rb_start + i) * cs;
            table[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
        }
        file.write_at(&table, cs)?;
        for i in 0..rb {
            let mut block = vec![0u8; cs as usize];
            for c in i * rb_entries..((i + 1) * rb_entries).min(total) {
                set_entry(
                    &mut block,
                    h.refcount_order,
                    (c - i * rb_entries) as usize,
                    1,
                );
            }
            file.write_at(&block, (rb_start + i) * cs)?;
        }
        if l1_clusters > 0 {
            file.write_at(&vec![0u8; (l1_clusters * cs) as usize], h.l1_table_offset)?;
        }
        file.flush()?;
        let prealloc = if opts.data_file_raw && opts.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            opts.preallocation
        };
        if prealloc != Preallocation::Off {
            let img = Qcow2::open(
                file,
                OpenOptions {
                    writable: true,
                    no_backing: true,
                    data_file: data_file.clone(),
                    ..Default::default()
                },
            )?;
            img.preallocate(0, opts.size, prealloc)?;
            img.close()?;
        }
        Ok(())
    }

    /// Allocates every cluster of `[start, end)` (cluster-aligned start), as preallocation does.
    pub(crate) fn preallocate(&self, start: u64, end: u64, mode: Preallocation) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cs();
        let w = self.geo.words();
        let span = 1u64 << self.geo.l2_bits();
        let mut c = start >> cb;
        let c_end = end.div_ceil(cs);
        let mut data_end = 0u64;
        while c < c_end {
            let n = (c_end - c).min(span - (c % span));
            let mut t = lock(&self.tables);
            let l2_off = self.ensure_l2_writable(&mut t, c << cb)?;
            let host = if self.external_data {
                c << cb
            } else {
                lock(&self.refs).alloc(n)?.0
            };
            let mut dep = self.l2_write_dependency();
            let tab = t.l2.get(l2_off, &mut dep)?;
            for i in 0..n {
                let idx = ((c + i) % span) as usize;
                if tab.at(idx * w) != 0 {
                    continue;
                }
                tab.put(idx * w, (host + (i << cb)) | OFLAG_COPIED);
                if w == 2 {
                    tab.put(idx * w + 1, BITMAP_ALL_ALLOC);
                }
            }
            t.l2.mark_dirty(l2_off);
            drop(t);
            if self.external_data {
                data_end = data_end.max(end);
            } else {
                data_end = data_end.max(host + (n << cb));
                match mode {
                    Preallocation::Falloc => self.data.write_zeroes(host, n << cb)?,
                    Preallocation::Full => {
                        let z = vec![0u8; (n << cb).min(1 << 20) as usize];
                        let mut done = 0;
                        while done < n << cb {
                            let k = ((n << cb) - done).min(z.len() as u64);
                            self.data.write_at(&z[..k as usize], host + done)?;
                            done += k;
                        }
                    }
                    _ => {}
                }
            }
            c += n;
        }
        self.flush()?;
        if self.data.len()? < data_end {
            self.data.set_len(data_end)?;
        }
        Ok(())
    }
}
