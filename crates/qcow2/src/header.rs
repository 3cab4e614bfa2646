//! The qcow2 header, its extensions and feature bits: parsing, validation and serialisation.

use crate::error::{Error, Result};

/// The magic bytes `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest supported cluster size (512 B) as a power of two.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster size (2 MiB) as a power of two.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_SIZE: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table, in bytes.
pub const MAX_SNAPSHOTS_SIZE: u64 = 64 << 20;
/// Longest backing file name.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Size of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the version 3 header written by this crate (with compression type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bit: refcounts may be inconsistent (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit: extended L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits this crate implements.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// All autoclear bits this crate implements.
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (window 4 KiB), QEMU's default.
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The name QEMU uses (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// Parses QEMU's name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// Kind of a feature bit in the feature name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureType {
    /// Incompatible feature.
    Incompatible,
    /// Compatible feature.
    Compatible,
    /// Autoclear feature.
    Autoclear,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which feature field the bit belongs to.
    pub kind: FeatureType,
    /// Bit number (0..63).
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory in the image file.
    pub directory_offset: u64,
}

/// A parsed and validated qcow2 header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version (2 or 3).
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (0: none; others are refused).
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing file format, if recorded.
    pub backing_format: Option<String>,
    /// External data file name, if recorded.
    pub data_file: Option<String>,
    /// The feature name table.
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension (only when the autoclear bit says it is consistent).
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions this crate does not know, preserved on rewrite (type, data).
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The feature name table this crate writes.
pub fn default_feature_names() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    use FeatureType::*;
    vec![
        f(Incompatible, 0, "dirty bit"),
        f(Incompatible, 1, "corrupt bit"),
        f(Incompatible, 2, "external data file"),
        f(Incompatible, 3, "compression type"),
        f(Incompatible, 4, "extended L2 entries"),
        f(Compatible, 0, "lazy refcounts"),
        f(Autoclear, 0, "bitmaps"),
        f(Autoclear, 1, "raw external data"),
    ]
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether extended L2 entries (subclusters) are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Bytes of guest data one L1 entry covers.
    pub fn l1_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// L1 entries needed for `size` bytes of guest data.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_coverage())
    }

    /// Parses and validates a header.
    ///
    /// `first` must hold at least the first `min(file_len, 2 MiB)` bytes; `file_len` is the image
    /// file's size, against which every table is bounds-checked.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header> {
        if first.len() < V2_HEADER_LEN as usize {
            if first.len() >= 4 && be32(first, 0) != MAGIC {
                return Err(Error::NotQcow2);
            }
            return Err(Error::invalid("file too short for a qcow2 header"));
        }
        if be32(first, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(first, 8),
            backing_file_size: be32(first, 16),
            cluster_bits,
            size: be64(first, 24),
            crypt_method: be32(first, 32),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if first.len() < 104 {
                return Err(Error::invalid("file too short for a version 3 header"));
            }
            h.incompatible_features = be64(first, 72);
            h.compatible_features = be64(first, 80);
            h.autoclear_features = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > first.len() {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = match first[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(Error::UnsupportedFeature(format!(
                            "Unknown compression type {t}"
                        )))
                    }
                };
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.crypt_method != 0 {
            return Err(Error::UnsupportedFeature("encryption".into()));
        }
        // Header extensions live in the first cluster, up to the backing file name.
        let ext_start = h.header_length as u64;
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        }
        .min(cluster_size)
        .min(first.len() as u64);
        h.parse_extensions(first, ext_start, ext_end)?;

        // Now that the feature names are known, refuse what we cannot handle.
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::UnsupportedFeature(
                h.describe_features(FeatureType::Incompatible, unknown),
            ));
        }
        match h.compression_type {
            CompressionType::Zlib if h.incompatible_features & INCOMPAT_COMPRESSION != 0 => {
                return Err(Error::invalid(
                    "Compression type incompatible feature bit must not be set",
                ))
            }
            CompressionType::Zstd if h.incompatible_features & INCOMPAT_COMPRESSION == 0 => {
                return Err(Error::invalid(
                    "Compression type incompatible feature bit must be set",
                ))
            }
            _ => {}
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE == 0
            && h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
        {
            // QEMU clears the bit on open; it means nothing without a data file.
            h.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE == 0 && h.data_file.is_some() {
            return Err(Error::invalid(
                "data-file extension present, but external data file bit is not set",
            ));
        }

        // Backing file name.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_FILE_NAME
                || h.backing_file_offset > cluster_size
                || h.backing_file_offset + h.backing_file_size as u64 > cluster_size
            {
                return Err(Error::invalid("Backing file name too long"));
            }
            let s = h.backing_file_offset as usize;
            let e = s + h.backing_file_size as usize;
            if e > first.len() {
                return Err(Error::invalid(
                    "backing file name lies beyond the end of the file",
                ));
            }
            h.backing_file = Some(
                String::from_utf8(first[s..e].to_vec())
                    .map_err(|_| Error::invalid("backing file name is not UTF-8"))?,
            );
        }

        h.validate_tables(file_len)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, b: &[u8], start: u64, end: u64) -> Result<()> {
        let mut off = start;
        while off < end {
            if off + 8 > end {
                return Err(Error::invalid("Header extension too large"));
            }
            let o = off as usize;
            let ty = be32(b, o);
            let len = be32(b, o + 4) as u64;
            off += 8;
            if len > end - off {
                return Err(Error::invalid(format!(
                    "Header extension 0x{ty:08x} too large ({len} bytes)"
                )));
            }
            let data = &b[off as usize..(off + len) as usize];
            match ty {
                EXT_END => return Ok(()),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(Error::invalid(format!(
                            "ext_backing_format: len={len} too large"
                        )));
                    }
                    self.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| Error::invalid("backing format is not UTF-8"))?,
                    );
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let kind = match e[0] {
                            0 => FeatureType::Incompatible,
                            1 => FeatureType::Compatible,
                            2 => FeatureType::Autoclear,
                            _ => continue,
                        };
                        let raw = &e[2..48];
                        let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind,
                            bit: e[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
                    }
                    let ext = BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    };
                    if self.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
                        log::warn!(
                            "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
                        );
                    } else {
                        if ext.nb_bitmaps == 0 {
                            return Err(Error::invalid("bitmaps_ext: Image has no bitmaps"));
                        }
                        if ext.nb_bitmaps > crate::bitmap::MAX_BITMAPS {
                            return Err(Error::invalid(format!(
                                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {}",
                                ext.nb_bitmaps,
                                crate::bitmap::MAX_BITMAPS
                            )));
                        }
                        if ext.directory_size > crate::bitmap::MAX_DIRECTORY_SIZE {
                            return Err(Error::invalid(
                                "bitmaps_ext: Bitmap directory is too large",
                            ));
                        }
                        self.bitmaps = Some(ext);
                    }
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| Error::invalid("data file name is not UTF-8"))?,
                    );
                }
                EXT_CRYPTO => {
                    return Err(Error::UnsupportedFeature("encryption".into()));
                }
                _ => self.unknown_extensions.push((ty, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn validate_table(
        &self,
        what: &str,
        offset: u64,
        entries: u64,
        entry_size: u64,
        file_len: u64,
    ) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        if offset % self.cluster_size() != 0 {
            return Err(Error::invalid(format!("{what} offset invalid")));
        }
        let bytes = entries
            .checked_mul(entry_size)
            .ok_or_else(|| Error::invalid(format!("{what} too large")))?;
        let end = offset
            .checked_add(bytes)
            .ok_or_else(|| Error::invalid(format!("{what} offset invalid")))?;
        if end > file_len {
            return Err(Error::invalid(format!(
                "{what} lies beyond the end of the image file ({end} > {file_len})"
            )));
        }
        Ok(())
    }

    fn validate_tables(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_SIZE {
            return Err(Error::invalid("Reference count table too large"));
        }
        self.validate_table(
            "Reference count table",
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * cs / 8,
            8,
            file_len,
        )?;
        if self.refcount_table_clusters == 0 {
            return Err(Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        if self.l1_size as u64 * 8 > MAX_L1_SIZE {
            return Err(Error::invalid("Active L1 table too large"));
        }
        let needed = self.l1_entries_for(self.size);
        if (self.l1_size as u64) < needed {
            return Err(Error::invalid("L1 table is too small"));
        }
        if self.size > (1u64 << 62) {
            return Err(Error::invalid("Image size too large"));
        }
        self.validate_table(
            "Active L1 table",
            self.l1_table_offset,
            self.l1_size as u64,
            8,
            file_len,
        )?;
        // The fixed tables must not overlap each other or the header cluster.
        let cs = self.cluster_size();
        let round = |b: u64| b.div_ceil(cs) * cs;
        let mut ranges = vec![(0u64, cs, "header")];
        ranges.push((
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * cs,
            "reference count table",
        ));
        if self.l1_size > 0 {
            ranges.push((
                self.l1_table_offset,
                round(self.l1_size as u64 * 8),
                "active L1 table",
            ));
        }
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                if a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                    return Err(Error::invalid(format!("{} overlaps with {}", b.2, a.2)));
                }
            }
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid("Too many snapshots"));
        }
        if self.nb_snapshots > 0 {
            // Each entry takes at least 40 bytes.
            let min = self.nb_snapshots as u64 * 40;
            if min > MAX_SNAPSHOTS_SIZE {
                return Err(Error::invalid("Snapshot table too large"));
            }
            self.validate_table("Snapshot table", self.snapshots_offset, min, 1, file_len)?;
        }
        Ok(())
    }

    /// Describes feature bits using the feature name table, like QEMU's error messages.
    pub fn describe_features(&self, kind: FeatureType, mask: u64) -> String {
        let mut parts = Vec::new();
        for bit in 0..64u8 {
            if mask & (1u64 << bit) == 0 {
                continue;
            }
            match self
                .feature_names
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
            {
                Some(f) => parts.push(f.name.clone()),
                None => parts.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
            }
        }
        parts.join(", ")
    }

    /// Serialises header, extensions and backing file name into one cluster-sized buffer.
    ///
    /// Updates `backing_file_offset`/`backing_file_size` to where the name is placed.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        let ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            ext(&mut b, EXT_DATA_FILE, f.as_bytes());
        }
        if self.version >= 3 {
            if self.feature_names.is_empty() {
                self.feature_names = default_feature_names();
            }
            let mut t = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = match f.kind {
                    FeatureType::Incompatible => 0,
                    FeatureType::Compatible => 1,
                    FeatureType::Autoclear => 2,
                };
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                t.extend_from_slice(&e);
            }
            ext(&mut b, EXT_FEATURE_TABLE, &t);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = [0u8; 24];
            d[0..4].copy_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d[8..16].copy_from_slice(&bm.directory_size.to_be_bytes());
            d[16..24].copy_from_slice(&bm.directory_offset.to_be_bytes());
            ext(&mut b, EXT_BITMAPS, &d);
        }
        for (ty, data) in &self.unknown_extensions {
            ext(&mut b, *ty, data);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(Error::InvalidArgument("Backing file name too long".into()));
            }
            self.backing_file_offset = b.len() as u64;
            self.backing_file_size = name.len() as u32;
            b.extend_from_slice(name.as_bytes());
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        if b.len() > cs {
            return Err(Error::InvalidArgument(
                "header and extensions do not fit in one cluster".into(),
            ));
        }
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            data_file: None,
            feature_names: default_feature_names(),
            bitmaps: None,
            unknown_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    #[test]
    fn roundtrip() {
        let mut h = sample();
        let b = h.serialize().unwrap();
        let p = Header::parse(&b, 4 << 16).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn unknown_incompatible_named() {
        let mut h = sample();
        h.incompatible_features = 1 << 5 | 1 << 40;
        h.feature_names.push(FeatureName {
            kind: FeatureType::Incompatible,
            bit: 5,
            name: "teleportation".into(),
        });
        let b = h.serialize().unwrap();
        let e = Header::parse(&b, 4 << 16).unwrap_err().to_string();
        assert!(e.contains("teleportation"), "{e}");
        assert!(
            e.contains("Unknown incompatible feature: 10000000000"),
            "{e}"
        );
    }

    #[test]
    fn absurd_fields_rejected() {
        let mut h = sample();
        let good = h.serialize().unwrap();
        let patch = |o: usize, v: &[u8]| {
            let mut b = good.clone();
            b[o..o + v.len()].copy_from_slice(v);
            Header::parse(&b, 4 << 16)
        };
        assert!(patch(20, &8u32.to_be_bytes()).is_err());
        assert!(patch(20, &22u32.to_be_bytes()).is_err());
        assert!(patch(36, &u32::MAX.to_be_bytes()).is_err());
        assert!(patch(56, &u32::MAX.to_be_bytes()).is_err());
        assert!(patch(60, &u32::MAX.to_be_bytes()).is_err());
        assert!(patch(96, &7u32.to_be_bytes()).is_err());
        assert!(patch(40, &(1u64 << 40).to_be_bytes()).is_err());
        assert!(patch(116, &0xffff_fff0u32.to_be_bytes()).is_err());
        assert!(matches!(patch(0, b"XXXX"), Err(Error::NotQcow2)));
        assert!(matches!(
            patch(4, &4u32.to_be_bytes()),
            Err(Error::UnsupportedVersion(4))
        ));
    }
}
