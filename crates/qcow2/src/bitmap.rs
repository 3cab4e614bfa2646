//! Persistent dirty bitmaps: the bitmaps extension's directory and bitmap tables.

use crate::error::{Error, Result};
use crate::header::BitmapsExt;
use crate::storage::Storage;

/// Most bitmaps an image may hold.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name.
pub const MAX_NAME_SIZE: usize = 1023;
/// Bitmap flag: in use (not saved consistently).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: auto (tracks writes while enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag: extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Largest bitmap table QEMU accepts, in entries.
pub const MAX_TABLE_SIZE: u64 = 1 << 24;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Name.
    pub name: String,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags (`FLAG_*`).
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Bitmap type (1: dirty tracking).
    pub ty: u8,
    /// Extra data, preserved.
    pub extra_data: Vec<u8>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4"))
}

/// Parses and validates the bitmap directory described by `ext`.
pub fn parse_directory(
    file: &dyn Storage,
    ext: &BitmapsExt,
    file_len: u64,
    cluster_size: u64,
) -> Result<Vec<BitmapEntry>> {
    if ext.directory_size > MAX_DIRECTORY_SIZE
        || ext.directory_offset % cluster_size != 0
        || ext.directory_offset.saturating_add(ext.directory_size) > file_len
    {
        return Err(Error::invalid(
            "bitmaps_ext: invalid bitmap directory offset or size",
        ));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut dir, ext.directory_offset)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        if pos + 24 > dir.len() {
            return Err(Error::invalid("Bitmap directory is truncated"));
        }
        let e = &dir[pos..];
        let table_offset = u64::from_be_bytes(e[0..8].try_into().expect("8"));
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let ty = e[16];
        let granularity_bits = e[17];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = be32(e, 20) as usize;
        let len = (24 + extra + name_size).div_ceil(8) * 8;
        if pos + 24 + extra + name_size > dir.len() {
            return Err(Error::invalid(
                "Bitmap directory entry exceeds the directory",
            ));
        }
        if name_size > MAX_NAME_SIZE
            || ty != 1
            || !(9..=31).contains(&granularity_bits)
            || table_offset % cluster_size != 0
            || table_size as u64 > MAX_TABLE_SIZE
            || table_offset.saturating_add(table_size as u64 * 8) > file_len
            || flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0
        {
            return Err(Error::invalid(format!(
                "Bitmap directory entry {} is invalid",
                out.len()
            )));
        }
        let extra_data = e[24..24 + extra].to_vec();
        let name = String::from_utf8_lossy(&e[24 + extra..24 + extra + name_size]).into_owned();
        out.push(BitmapEntry {
            name,
            table_offset,
            table_size,
            flags,
            granularity_bits,
            ty,
            extra_data,
        });
        pos += len;
    }
    Ok(out)
}

/// Serialises a bitmap directory.
pub fn serialize_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let start = b.len();
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(e.ty);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.extra_data.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra_data);
        b.extend_from_slice(e.name.as_bytes());
        let l = b.len() - start;
        b.resize(start + l.div_ceil(8) * 8, 0);
    }
    b
}

/// A persistent dirty bitmap's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Name.
    pub name: String,
    /// Bytes of guest data per bit (a power of two, 512 B to 2 GiB).
    pub granularity: u64,
    /// Flags (`FLAG_IN_USE`, `FLAG_AUTO`).
    pub flags: u32,
    /// One bit per granule, least significant bit first: bit `i` covers guest bytes
    /// `[i * granularity, (i + 1) * granularity)`.
    pub bits: Vec<u8>,
}

impl DirtyBitmap {
    /// An empty bitmap for a disk of `size` bytes.
    pub fn new(name: &str, granularity: u64, size: u64) -> Self {
        let n = size.div_ceil(granularity.max(1));
        DirtyBitmap {
            name: name.to_string(),
            granularity,
            flags: FLAG_AUTO,
            bits: vec![0u8; n.div_ceil(8) as usize],
        }
    }

    /// Marks `[offset, offset + len)` dirty.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1) / self.granularity;
        for i in first..=last {
            if let Some(b) = self.bits.get_mut((i / 8) as usize) {
                *b |= 1 << (i % 8);
            }
        }
    }

    /// Whether the granule containing `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let i = offset / self.granularity;
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Number of dirty granules.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum()
    }
}

/// Largest bitmap QEMU handles, in bytes of bitmap data.
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;

use crate::events::FreeReason;
use crate::image::{lock, Qcow2};

impl Qcow2 {
    /// The bitmap directory.
    pub fn bitmap_list(&self) -> Vec<BitmapEntry> {
        lock(&self.bitmaps).clone()
    }

    fn bitmap_bytes(&self, granularity_bits: u8) -> u64 {
        self.size().div_ceil(1u64 << granularity_bits).div_ceil(8)
    }

    /// Reads a persistent bitmap.
    pub fn bitmap_read(&self, name: &str) -> Result<DirtyBitmap> {
        let e = lock(&self.bitmaps)
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| Error::BitmapNotFound(name.to_string()))?;
        let cs = self.cluster_size();
        let bytes = self.bitmap_bytes(e.granularity_bits);
        if bytes > MAX_BITMAP_BYTES || e.table_size as u64 != bytes.div_ceil(cs) {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' has an invalid table size"
            )));
        }
        let mut raw = vec![0u8; e.table_size as usize * 8];
        self.file.read_at(&mut raw, e.table_offset)?;
        let mut bits = vec![0u8; bytes as usize];
        let flen = self.file.len()?;
        for (k, c) in raw.chunks_exact(8).enumerate() {
            let ent = u64::from_be_bytes(c.try_into().expect("8"));
            let off = ent & 0x00ff_ffff_ffff_fe00;
            let start = k * cs as usize;
            let end = (start + cs as usize).min(bits.len());
            if off == 0 {
                if ent & 1 != 0 {
                    bits[start..end].fill(0xff);
                }
                continue;
            }
            if off % cs != 0 || off >= flen {
                return Err(Error::invalid(format!(
                    "Bitmap '{name}' data cluster offset {off:#x} invalid"
                )));
            }
            self.file.read_at(&mut bits[start..end], off)?;
        }
        Ok(DirtyBitmap {
            name: e.name,
            granularity: 1 << e.granularity_bits,
            flags: e.flags,
            bits,
        })
    }

    fn bitmap_clusters(&self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let cb = self.geo.cluster_bits;
        let cs = self.cluster_size();
        let mut out = Vec::new();
        let mut raw = vec![0u8; e.table_size as usize * 8];
        self.file.read_at(&mut raw, e.table_offset)?;
        for c in raw.chunks_exact(8) {
            let off = u64::from_be_bytes(c.try_into().expect("8")) & 0x00ff_ffff_ffff_fe00;
            if off != 0 {
                out.push(off >> cb);
            }
        }
        for i in 0..(e.table_size as u64 * 8).div_ceil(cs) {
            out.push((e.table_offset >> cb) + i);
        }
        Ok(out)
    }

    /// Writes the directory and switches the header's extension to it; frees the old one and
    /// `also_free` clusters afterwards.
    fn bitmap_commit_directory(&self, list: Vec<BitmapEntry>, also_free: Vec<u64>) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.geo.cluster_bits;
        let dir = serialize_directory(&list);
        let new_off = if dir.is_empty() {
            0
        } else {
            let (off, _) = lock(&self.refs).alloc((dir.len() as u64).div_ceil(cs))?;
            self.file.write_at(&dir, off)?;
            off
        };
        self.flush_refcounts()?;
        let old_ext = {
            let mut h = lock(&self.header);
            let old = h.bitmaps;
            if list.is_empty() {
                h.bitmaps = None;
                h.autoclear_features &= !crate::header::AUTOCLEAR_BITMAPS;
            } else {
                h.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: list.len() as u32,
                    directory_size: dir.len() as u64,
                    directory_offset: new_off,
                });
                h.autoclear_features |= crate::header::AUTOCLEAR_BITMAPS;
            }
            self.write_header(&mut h)?;
            old
        };
        *lock(&self.bitmaps) = list;
        let mut r = lock(&self.refs);
        if let Some(o) = old_ext {
            for i in 0..o.directory_size.div_ceil(cs) {
                r.free((o.directory_offset >> cb) + i, FreeReason::Always)?;
            }
        }
        for c in also_free {
            r.free(c, FreeReason::Always)?;
        }
        drop(r);
        self.flush_refcounts()
    }

    /// Stores a bitmap, replacing one of the same name.
    pub fn bitmap_store(&self, bm: &DirtyBitmap) -> Result<()> {
        self.check_writable()?;
        if self.header().version < 3 {
            return Err(Error::NotSupported(
                "persistent bitmaps need a version 3 image".into(),
            ));
        }
        if bm.name.is_empty() || bm.name.len() > MAX_NAME_SIZE {
            return Err(Error::InvalidArgument("invalid bitmap name".into()));
        }
        if !bm.granularity.is_power_of_two() || !(512..=(1u64 << 31)).contains(&bm.granularity) {
            return Err(Error::InvalidArgument(
                "Granularity must be a power of two between 512 and 2 GiB".into(),
            ));
        }
        let gb = bm.granularity.trailing_zeros() as u8;
        let bytes = self.bitmap_bytes(gb);
        if bm.bits.len() as u64 != bytes {
            return Err(Error::InvalidArgument(format!(
                "bitmap has {} bytes, the disk needs {bytes}",
                bm.bits.len()
            )));
        }
        let _x = self.gate.exclusive();
        let cs = self.cluster_size();
        let table_size = bytes.div_ceil(cs);
        let mut table = vec![0u64; table_size as usize];
        for (k, chunk) in bm.bits.chunks(cs as usize).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let (off, _) = lock(&self.refs).alloc(1)?;
            let mut c = chunk.to_vec();
            c.resize(cs as usize, 0);
            self.file.write_at(&c, off)?;
            table[k] = off;
        }
        let (t_off, _) = lock(&self.refs).alloc((table_size * 8).div_ceil(cs).max(1))?;
        self.write_u64_table(t_off, &table)?;
        let mut list = self.bitmap_list();
        let mut also_free = Vec::new();
        if let Some(pos) = list.iter().position(|b| b.name == bm.name) {
            let old = list.remove(pos);
            also_free = self.bitmap_clusters(&old)?;
        }
        if list.len() as u32 >= MAX_BITMAPS {
            return Err(Error::InvalidArgument("too many bitmaps".into()));
        }
        list.push(BitmapEntry {
            name: bm.name.clone(),
            table_offset: t_off,
            table_size: table_size as u32,
            flags: bm.flags & (FLAG_IN_USE | FLAG_AUTO),
            granularity_bits: gb,
            ty: 1,
            extra_data: Vec::new(),
        });
        let r = self.bitmap_commit_directory(list, also_free);
        self.c(r)
    }

    /// Removes a bitmap.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let _x = self.gate.exclusive();
        let mut list = self.bitmap_list();
        let pos = list
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| Error::BitmapNotFound(name.to_string()))?;
        let old = list.remove(pos);
        let free = self.bitmap_clusters(&old)?;
        let r = self.bitmap_commit_directory(list, free);
        self.c(r)
    }
}
