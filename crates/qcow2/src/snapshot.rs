//! Internal snapshots: create, apply (revert), delete, with refcounts as QEMU keeps them.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::events::FreeReason;
use crate::image::{lock, Qcow2};
use crate::l2::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::snapshot_table::{serialize_table, Snapshot};

impl Qcow2 {
    fn read_u64_table(&self, off: u64, entries: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; (entries * 8) as usize];
        self.file.read_at(&mut raw, off)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect())
    }

    pub(crate) fn write_u64_table(&self, off: u64, t: &[u64]) -> Result<()> {
        let mut raw = Vec::with_capacity(t.len() * 8);
        for e in t {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.file.write_at(&raw, off)?;
        Ok(())
    }

    /// Adds `addend` to the refcount of every cluster reachable from `l1` and recomputes the
    /// COPIED flags of its L1 and L2 entries (QEMU's update_snapshot_refcount). The L2 tables
    /// are rewritten on disk; `l1` is updated in memory only.
    pub(crate) fn update_tree_refcounts(&self, l1: &mut [u64], addend: i64) -> Result<()> {
        let cs = self.geo.cs();
        let cb = self.geo.cluster_bits;
        let w = self.geo.words();
        let mut r = lock(&self.refs);
        for e in l1.iter_mut() {
            let l2 = *e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % cs != 0 || l2 + cs > self.file.len()? {
                return Err(Error::CorruptionDetected(format!(
                    "L2 table offset {l2:#x} unaligned or beyond the end of the file"
                )));
            }
            let mut tab = self.read_u64_table(l2, cs / 8)?;
            let mut changed = false;
            for j in 0..tab.len() / w {
                let entry = tab[j * w];
                let clusters = self.entry_clusters(entry)?;
                if addend != 0 {
                    for c in &clusters {
                        r.update_for(*c, addend, FreeReason::Snapshot)?;
                    }
                }
                if entry & OFLAG_COMPRESSED == 0 && clusters.len() == 1 {
                    let rc = r.get(clusters[0])?;
                    let n = if rc == 1 {
                        entry | OFLAG_COPIED
                    } else {
                        entry & !OFLAG_COPIED
                    };
                    if n != entry {
                        tab[j * w] = n;
                        changed = true;
                    }
                }
            }
            if changed {
                self.write_u64_table(l2, &tab)?;
            }
            let rc = if addend != 0 {
                r.update_for(l2 >> cb, addend, FreeReason::Snapshot)?
            } else {
                r.get(l2 >> cb)?
            };
            *e = if rc == 1 {
                *e | OFLAG_COPIED
            } else {
                *e & !OFLAG_COPIED
            };
        }
        r.reset_compressed_pos();
        r.finish_frees();
        Ok(())
    }

    /// Writes the snapshot table to new clusters, switches the header to it and frees the old.
    fn write_snapshot_table(&self, snaps: &[Snapshot]) -> Result<()> {
        let cs = self.geo.cs();
        let data = serialize_table(snaps);
        let new_off = if data.is_empty() {
            0
        } else {
            let (off, _) = lock(&self.refs).alloc((data.len() as u64).div_ceil(cs))?;
            self.file.write_at(&data, off)?;
            off
        };
        self.flush_refcounts()?;
        let mut h = lock(&self.header);
        let old_off = h.snapshots_offset;
        let old_len = serialize_table(&lock(&self.snapshots)).len() as u64;
        let mut buf = [0u8; 12];
        buf[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        buf[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file.write_at(&buf, 60)?;
        self.file.flush()?;
        h.nb_snapshots = snaps.len() as u32;
        h.snapshots_offset = new_off;
        drop(h);
        *lock(&self.snapshots) = snaps.to_vec();
        if old_off != 0 && old_len > 0 {
            let mut r = lock(&self.refs);
            for c in 0..old_len.div_ceil(cs) {
                r.free((old_off >> self.geo.cluster_bits) + c, FreeReason::Snapshot)?;
            }
            r.finish_frees();
        }
        Ok(())
    }

    pub(crate) fn flush_refcounts(&self) -> Result<()> {
        let mut r = lock(&self.refs);
        r.flush_blocks()?;
        self.file.flush()?;
        r.unsynced = false;
        Ok(())
    }

    fn snapshot_prologue(&self) -> Result<()> {
        self.check_writable()?;
        if self.external_data {
            return Err(Error::NotSupported(
                "internal snapshots are not supported with an external data file".into(),
            ));
        }
        // Make the on-disk tables current, then work on them directly.
        self.flush()?;
        self.flush()?;
        Ok(())
    }

    fn snapshot_epilogue(&self) -> Result<()> {
        lock(&self.tables).l2.clear();
        self.forget_decompressed();
        self.flush_refcounts()
    }

    /// Finds a snapshot by id, then by name (like `qemu-img snapshot`).
    pub fn find_snapshot(&self, id_or_name: &str) -> Option<Snapshot> {
        let s = lock(&self.snapshots);
        s.iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| s.iter().find(|s| s.name == id_or_name))
            .cloned()
    }

    /// Creates an internal snapshot of the disk named `name`; returns it.
    pub fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        let _x = self.gate.exclusive();
        let r = self.snapshot_create_inner(name);
        let e = self.snapshot_epilogue();
        let s = self.c(r)?;
        e?;
        Ok(s)
    }

    fn snapshot_create_inner(&self, name: &str) -> Result<Snapshot> {
        self.snapshot_prologue()?;
        let mut snaps = self.snapshots();
        if snaps.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "Snapshot with name '{name}' already exists"
            )));
        }
        if snaps.len() as u32 >= crate::header::MAX_SNAPSHOTS {
            return Err(Error::InvalidArgument("Too many snapshots".into()));
        }
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let cs = self.geo.cs();
        let mut t = lock(&self.tables);
        let l1_size = t.l1.len() as u64;
        let sn_l1_off = if l1_size > 0 {
            let (off, _) = lock(&self.refs).alloc((l1_size * 8).div_ceil(cs))?;
            self.write_u64_table(off, &t.l1)?;
            off
        } else {
            0
        };
        let mut l1 = t.l1.clone();
        self.update_tree_refcounts(&mut l1, 1)?;
        self.flush_refcounts()?;
        self.write_u64_table(t.l1_offset, &l1)?;
        t.l1 = l1;
        t.l1_changed();
        drop(t);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let sn = Snapshot {
            l1_table_offset: sn_l1_off,
            l1_size: l1_size as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            icount: Some(0),
            extra_unknown: Vec::new(),
        };
        snaps.push(sn.clone());
        self.write_snapshot_table(&snaps)?;
        Ok(sn)
    }

    /// Reverts the disk to a snapshot (`qemu-img snapshot -a`).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let _x = self.gate.exclusive();
        let r = self.snapshot_apply_inner(id_or_name);
        let e = self.snapshot_epilogue();
        self.c(r)?;
        e
    }

    fn snapshot_apply_inner(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_prologue()?;
        let sn = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| Error::SnapshotNotFound(id_or_name.to_string()))?;
        let cs = self.geo.cs();
        let mut sn_l1 = self.read_u64_table(sn.l1_table_offset, sn.l1_size as u64)?;
        // The snapshot's tree gains the active table's reference.
        self.update_tree_refcounts(&mut sn_l1, 1)?;
        self.flush_refcounts()?;
        let mut t = lock(&self.tables);
        let old_l1 = t.l1.clone();
        let new_len = (sn.l1_size as usize).max(old_l1.len());
        let mut new_l1 = sn_l1;
        new_l1.resize(new_len, 0);
        if new_len > old_l1.len() {
            let (off, _) = lock(&self.refs).alloc((new_len as u64 * 8).div_ceil(cs))?;
            self.write_u64_table(off, &new_l1)?;
            self.flush_refcounts()?;
            let mut buf = [0u8; 12];
            buf[..4].copy_from_slice(&(new_len as u32).to_be_bytes());
            buf[4..].copy_from_slice(&off.to_be_bytes());
            self.file.write_at(&buf, 36)?;
            self.file.flush()?;
            let old_off = t.l1_offset;
            t.l1_offset = off;
            t.l1_changed();
            {
                let mut h = lock(&self.header);
                h.l1_size = new_len as u32;
                h.l1_table_offset = off;
            }
            let mut r = lock(&self.refs);
            for c in 0..(old_l1.len() as u64 * 8).div_ceil(cs) {
                r.free((old_off >> self.geo.cluster_bits) + c, FreeReason::Snapshot)?;
            }
            r.finish_frees();
        } else {
            self.write_u64_table(t.l1_offset, &new_l1)?;
            self.file.flush()?;
        }
        t.l1 = new_l1.clone();
        t.l1_changed();
        // The old tree loses the active table's reference.
        let mut old = old_l1;
        self.update_tree_refcounts(&mut old, -1)?;
        let mut cur = new_l1;
        self.update_tree_refcounts(&mut cur, 0)?;
        self.write_u64_table(t.l1_offset, &cur)?;
        t.l1 = cur;
        t.l1_changed();
        drop(t);
        if let Some(ds) = sn.disk_size {
            if ds != self.size() {
                self.set_size_field(ds)?;
            }
        }
        Ok(())
    }

    /// Deletes a snapshot (`qemu-img snapshot -d`).
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        let _x = self.gate.exclusive();
        let r = self.snapshot_delete_inner(id_or_name);
        let e = self.snapshot_epilogue();
        self.c(r)?;
        e
    }

    fn snapshot_delete_inner(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_prologue()?;
        let sn = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| Error::SnapshotNotFound(id_or_name.to_string()))?;
        let snaps: Vec<Snapshot> = self
            .snapshots()
            .into_iter()
            .filter(|s| s.id != sn.id)
            .collect();
        self.write_snapshot_table(&snaps)?;
        let mut sn_l1 = self.read_u64_table(sn.l1_table_offset, sn.l1_size as u64)?;
        self.update_tree_refcounts(&mut sn_l1, -1)?;
        let cs = self.geo.cs();
        {
            let mut r = lock(&self.refs);
            for c in 0..(sn.l1_size as u64 * 8).div_ceil(cs) {
                r.free(
                    (sn.l1_table_offset >> self.geo.cluster_bits) + c,
                    FreeReason::Snapshot,
                )?;
            }
            r.finish_frees();
        }
        let mut t = lock(&self.tables);
        let mut cur = t.l1.clone();
        self.update_tree_refcounts(&mut cur, 0)?;
        if cur != t.l1 {
            self.write_u64_table(t.l1_offset, &cur)?;
            t.l1 = cur;
            t.l1_changed();
            t.l1_changed();
        }
        Ok(())
    }

    /// Writes the virtual size field and updates the in-memory size.
    pub(crate) fn set_size_field(&self, size: u64) -> Result<()> {
        let needed = lock(&self.header).l1_entries_for(size);
        if needed > lock(&self.tables).l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        self.file.write_at(&size.to_be_bytes(), 24)?;
        self.file.flush()?;
        lock(&self.header).size = size;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Replaces the active L1 table by a larger copy.
    pub(crate) fn grow_l1(&self, entries: u64) -> Result<()> {
        if entries * 8 > crate::header::MAX_L1_SIZE {
            return Err(Error::InvalidArgument("Image size too large".into()));
        }
        let cs = self.geo.cs();
        let mut t = lock(&self.tables);
        let mut new_l1 = t.l1.clone();
        new_l1.resize(entries as usize, 0);
        let (off, _) = lock(&self.refs).alloc((entries * 8).div_ceil(cs))?;
        self.write_u64_table(off, &new_l1)?;
        self.flush_refcounts()?;
        let mut buf = [0u8; 12];
        buf[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        buf[4..].copy_from_slice(&off.to_be_bytes());
        self.file.write_at(&buf, 36)?;
        self.file.flush()?;
        let old_off = t.l1_offset;
        let old_len = t.l1.len() as u64;
        t.l1 = new_l1;
        t.l1_offset = off;
        t.l1_changed();
        {
            let mut h = lock(&self.header);
            h.l1_size = entries as u32;
            h.l1_table_offset = off;
        }
        if old_len > 0 {
            let mut r = lock(&self.refs);
            for c in 0..(old_len * 8).div_ceil(cs) {
                r.free((old_off >> self.geo.cluster_bits) + c, FreeReason::Snapshot)?;
            }
            r.finish_frees();
        }
        Ok(())
    }
}
