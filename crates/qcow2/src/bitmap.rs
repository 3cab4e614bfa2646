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
