//! The internal snapshot table: parsing and serialisation.

use crate::error::{Error, Result};
use crate::header::{MAX_L1_SIZE, MAX_SNAPSHOTS_SIZE};
use crate::storage::Storage;

/// Largest extra data QEMU accepts per snapshot entry.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: Option<u64>,
    /// Instruction count for record/replay (None when unset).
    pub icount: Option<u64>,
    /// Extra data beyond the fields above, preserved.
    pub extra_unknown: Vec<u8>,
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4"))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8"))
}

/// Parses `count` entries at `offset`, bounds-checking every size against `file_len` and
/// QEMU's limits before reading.
pub fn parse_table(
    file: &dyn Storage,
    offset: u64,
    count: u32,
    file_len: u64,
    cluster_size: u64,
) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut pos = offset;
    for i in 0..count {
        let used = pos - offset;
        if used + 40 > MAX_SNAPSHOTS_SIZE || pos + 40 > file_len {
            return Err(Error::invalid(format!(
                "Snapshot table entry {i} lies beyond the end of the file or table limit"
            )));
        }
        let mut h = [0u8; 40];
        file.read_at(&mut h, pos)?;
        let l1_table_offset = be64(&h, 0);
        let l1_size = be32(&h, 8);
        let id_len = be16(&h, 12) as u64;
        let name_len = be16(&h, 14) as u64;
        let extra_len = be32(&h, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::invalid(
                "Too much extra metadata in snapshot table entry",
            ));
        }
        let body = extra_len as u64 + id_len + name_len;
        let total = (40 + body).div_ceil(8) * 8;
        if used + total > MAX_SNAPSHOTS_SIZE || pos + 40 + body > file_len {
            return Err(Error::invalid("Snapshot table too large"));
        }
        let mut b = vec![0u8; body as usize];
        file.read_at(&mut b, pos + 40)?;
        let extra = &b[..extra_len as usize];
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            be32(&h, 32) as u64
        };
        let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
        let icount = if extra.len() >= 24 {
            let v = be64(extra, 16);
            (v != u64::MAX).then_some(v)
        } else {
            None
        };
        let extra_unknown = extra.get(24..).map(|s| s.to_vec()).unwrap_or_default();
        let e = extra_len as usize;
        let id = String::from_utf8_lossy(&b[e..e + id_len as usize]).into_owned();
        let n0 = e + id_len as usize;
        let name = String::from_utf8_lossy(&b[n0..n0 + name_len as usize]).into_owned();
        if l1_size as u64 * 8 > MAX_L1_SIZE {
            return Err(Error::invalid(format!(
                "Snapshot L1 table too large (snapshot '{id}')"
            )));
        }
        if l1_size > 0
            && (l1_table_offset % cluster_size != 0
                || l1_table_offset.saturating_add(l1_size as u64 * 8) > file_len)
        {
            return Err(Error::invalid(format!(
                "Snapshot L1 table offset invalid (snapshot '{id}')"
            )));
        }
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&h, 16),
            date_nsec: be32(&h, 20),
            vm_clock_nsec: be64(&h, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_unknown,
        });
        pos += total;
    }
    Ok(out)
}

/// Serialises a snapshot table.
pub fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let start = b.len();
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        b.extend_from_slice(&(24 + s.extra_unknown.len() as u32).to_be_bytes());
        b.extend_from_slice(&s.vm_state_size.to_be_bytes());
        b.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        b.extend_from_slice(&s.extra_unknown);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        let len = b.len() - start;
        b.resize(start + len.div_ceil(8) * 8, 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn roundtrip() {
        let s = vec![
            Snapshot {
                l1_table_offset: 0x30000,
                l1_size: 1,
                id: "1".into(),
                name: "first".into(),
                date_sec: 5,
                date_nsec: 6,
                vm_clock_nsec: 7,
                vm_state_size: 0,
                disk_size: Some(1 << 20),
                icount: None,
                extra_unknown: vec![],
            },
            Snapshot {
                l1_table_offset: 0x40000,
                l1_size: 1,
                id: "2".into(),
                name: "second one".into(),
                date_sec: 1,
                date_nsec: 2,
                vm_clock_nsec: 3,
                vm_state_size: 0,
                disk_size: Some(1 << 20),
                icount: Some(9),
                extra_unknown: vec![1, 2, 3, 4, 5, 6, 7, 8],
            },
        ];
        let b = serialize_table(&s);
        let st = MemStorage::from_vec(vec![0u8; 0x50000]);
        st.write_at(&b, 0x10000).unwrap();
        let p = parse_table(&st, 0x10000, 2, 0x50000, 0x10000).unwrap();
        assert_eq!(p, s);
        // Claiming more entries than the file holds fails cleanly.
        assert!(parse_table(&st, 0x4fff0, 60000, 0x50000, 0x10000).is_err());
    }
}
