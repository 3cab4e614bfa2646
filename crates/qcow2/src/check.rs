//! Consistency check and repair with the counts of `qemu-img check`.

use crate::error::{Error, Result};
use crate::image::{lock, Qcow2};
use crate::l2::{EntryKind, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::refcount::{set_entry, REFT_OFFSET_MASK};

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fix {
    /// Repair leaked clusters (refcount higher than references).
    pub leaks: bool,
    /// Repair refcount errors (refcount lower than references) and wrong COPIED flags.
    pub errors: bool,
}

impl Fix {
    /// Check only.
    pub const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
    /// `-r leaks`.
    pub const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
    };
    /// `-r all`.
    pub const ALL: Fix = Fix {
        leaks: true,
        errors: true,
    };
}

/// The result of a check, with `qemu-img check`'s fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Corruptions found (and not fixed).
    pub corruptions: u64,
    /// Leaked clusters found (and not fixed).
    pub leaks: u64,
    /// Errors that prevented checking.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last used cluster in the image file.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1 table.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem, in qemu-img's words.
    pub messages: Vec<String>,
}

struct Ctx<'a> {
    img: &'a Qcow2,
    refs: Vec<u64>,
    file_clusters: u64,
    file_len: u64,
    res: CheckResult,
}

impl Ctx<'_> {
    fn cs(&self) -> u64 {
        self.img.geo.cs()
    }

    fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cb = self.img.geo.cluster_bits;
        let first = offset >> cb;
        let last = (offset + size - 1) >> cb;
        if offset.saturating_add(size) >= self.file_len + self.cs() {
            self.res.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            self.res.corruptions += 1;
            return;
        }
        for c in first..=last {
            let c = c as usize;
            if c >= self.refs.len() {
                self.refs.resize(c + 1, 0);
            }
            self.refs[c] = self.refs[c].saturating_add(1);
        }
    }

    fn read_table(&mut self, off: u64, bytes: u64) -> Option<Vec<u64>> {
        let mut raw = vec![0u8; bytes as usize];
        if let Err(e) = self.img.file.read_at(&mut raw, off) {
            self.res
                .messages
                .push(format!("ERROR: I/O error reading table at 0x{off:x}: {e}"));
            self.res.check_errors += 1;
            return None;
        }
        Some(
            raw.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
                .collect(),
        )
    }

    /// Walks one L1 table; `active` collects allocation statistics.
    fn walk_l1(&mut self, l1_off: u64, l1_size: u32, active: bool) {
        let cs = self.cs();
        self.inc(l1_off, l1_size as u64 * 8);
        let Some(l1) = self.read_table(l1_off, l1_size as u64 * 8) else {
            return;
        };
        let mut next_contig = 0u64;
        for (i, e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % cs != 0 {
                self.res.messages.push(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.res.corruptions += 1;
                continue;
            }
            self.inc(l2, cs);
            if l2 >= self.file_clusters * cs {
                continue;
            }
            let Some(tab) = self.read_table(l2, cs) else {
                continue;
            };
            let w = self.img.geo.words();
            for j in 0..tab.len() / w {
                let entry = tab[j * w];
                let bm = if w == 2 { tab[j * w + 1] } else { 0 };
                let kind = match self.img.geo.decode(entry) {
                    Ok(k) => k,
                    Err(e) => {
                        self.res
                            .messages
                            .push(format!("ERROR: {e} (L1 index {i}, L2 index {j})"));
                        self.res.corruptions += 1;
                        continue;
                    }
                };
                if self.img.geo.extended_l2 {
                    let alloc = bm & 0xffff_ffff;
                    let zero = bm >> 32;
                    let bad = match kind {
                        EntryKind::Compressed { .. } => bm != 0,
                        EntryKind::Unallocated => alloc != 0,
                        _ => alloc & zero != 0,
                    } || entry & OFLAG_ZERO != 0;
                    if bad {
                        self.res.messages.push(format!(
                            "ERROR: Invalid cluster entry found  (L2 offset: 0x{l2:x}, L2 index: 0x{j:x})"
                        ));
                        self.res.corruptions += 1;
                    }
                }
                match kind {
                    EntryKind::Compressed { host, len } => {
                        if active {
                            self.res.compressed_clusters += 1;
                            self.res.allocated_clusters += 1;
                            next_contig = 0;
                        }
                        self.inc(host & !511, len + (host & 511));
                    }
                    EntryKind::Normal { host } | EntryKind::Zero { host }
                        if host != 0
                            || (self.img.external_data
                                && matches!(kind, EntryKind::Normal { .. })) =>
                    {
                        if active {
                            self.res.allocated_clusters += 1;
                            if next_contig != 0 && host != next_contig {
                                self.res.fragmented_clusters += 1;
                            }
                            next_contig = host + cs;
                        }
                        if !self.img.external_data {
                            self.inc(host, cs);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Checks (and with `fix`, repairs) an image. Callers hold no request in flight.
pub(crate) fn check_locked(img: &Qcow2, fix: Fix) -> Result<CheckResult> {
    if img.is_writable() && !img.is_read_only() {
        img.flush()?;
    }
    let before = run_check(img)?;
    let need_fix = (fix.leaks && before.leaks > 0) || (fix.errors && before.corruptions > 0);
    if !need_fix || !img.is_writable() {
        return Ok(before);
    }
    rebuild(img, &before, fix)?;
    let mut after = run_check(img)?;
    after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
    after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
    let mut msgs = before.messages;
    msgs.extend(after.messages);
    after.messages = msgs;
    Ok(after)
}

fn compute(img: &Qcow2) -> Result<Ctx<'_>> {
    let cs = img.geo.cs();
    let flen = img.file.len()?;
    let file_clusters = flen.div_ceil(cs);
    if file_clusters > (1 << 32) {
        return Err(Error::NotSupported("image file too large to check".into()));
    }
    let mut ctx = Ctx {
        img,
        refs: vec![0u64; file_clusters as usize],
        file_clusters,
        file_len: flen,
        res: CheckResult::default(),
    };
    let h = img.header();
    ctx.res.total_clusters = img.size().div_ceil(cs);
    ctx.inc(0, cs);
    let (l1_off, l1_size) = {
        let t = lock(&img.tables);
        (t.l1_offset, t.l1.len() as u32)
    };
    ctx.walk_l1(l1_off, l1_size, true);
    for s in img.snapshots() {
        ctx.walk_l1(s.l1_table_offset, s.l1_size, false);
    }
    let snap_bytes = crate::snapshot_table::serialize_table(&img.snapshots()).len() as u64;
    ctx.inc(h.snapshots_offset, snap_bytes);
    let (rt_off, rt_clusters) = {
        let r = lock(&img.refs);
        (r.table_offset, r.table_clusters)
    };
    ctx.inc(rt_off, rt_clusters as u64 * cs);
    if let Some(ext) = &h.bitmaps {
        ctx.inc(ext.directory_offset, ext.directory_size);
        for b in lock(&img.bitmaps).clone() {
            ctx.inc(b.table_offset, b.table_size as u64 * 8);
            if let Some(tab) = ctx.read_table(b.table_offset, b.table_size as u64 * 8) {
                for e in tab {
                    let off = e & 0x00ff_ffff_ffff_fe00;
                    if off != 0 {
                        ctx.inc(off, cs);
                    }
                }
            }
        }
    }
    let table = lock(&img.refs).table.clone();
    for (i, e) in table.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            ctx.res.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            ctx.res.corruptions += 1;
            continue;
        }
        if off >= file_clusters * cs {
            ctx.res
                .messages
                .push(format!("ERROR refcount block {i} is outside image"));
            ctx.res.corruptions += 1;
            continue;
        }
        ctx.inc(off, cs);
    }
    Ok(ctx)
}

fn run_check(img: &Qcow2) -> Result<CheckResult> {
    let mut ctx = compute(img)?;
    let cs = img.geo.cs();
    let mut r = lock(&img.refs);
    let n = (ctx.refs.len() as u64).max(r.coverage_end().min(ctx.file_clusters));
    let mut highest = 0u64;
    for i in 0..n {
        let on_disk = match r.get(i) {
            Ok(v) => v,
            Err(e) => {
                ctx.res
                    .messages
                    .push(format!("ERROR: cannot read refcount of cluster {i}: {e}"));
                ctx.res.check_errors += 1;
                continue;
            }
        };
        let computed = ctx.refs.get(i as usize).copied().unwrap_or(0);
        if on_disk > 0 || computed > 0 {
            highest = i;
        }
        if on_disk != computed {
            if on_disk < computed {
                ctx.res.messages.push(format!(
                    "ERROR cluster {i} refcount={on_disk} reference={computed}"
                ));
                ctx.res.corruptions += 1;
            } else {
                ctx.res.messages.push(format!(
                    "Leaked cluster {i} refcount={on_disk} reference={computed}"
                ));
                ctx.res.leaks += 1;
            }
        }
    }
    drop(r);
    ctx.res.image_end_offset = (highest + 1) * cs;
    // COPIED flags of the active tables.
    let (l1_off, l1) = {
        let t = lock(&img.tables);
        (t.l1_offset, t.l1.clone())
    };
    let _ = l1_off;
    let cb = img.geo.cluster_bits;
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 || l2 % cs != 0 || l2 >= ctx.file_clusters * cs {
            continue;
        }
        let rc = ctx.refs.get((l2 >> cb) as usize).copied().unwrap_or(0);
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            ctx.res.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
            ));
            ctx.res.corruptions += 1;
        }
        let Some(tab) = ctx.read_table(l2, cs) else {
            continue;
        };
        let w = img.geo.words();
        for j in 0..tab.len() / w {
            let entry = tab[j * w];
            if entry & OFLAG_COMPRESSED != 0 || img.external_data {
                continue;
            }
            let host = entry & OFFSET_MASK;
            if host == 0 || host % cs != 0 {
                continue;
            }
            let rc = ctx.refs.get((host >> cb) as usize).copied().unwrap_or(0);
            if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                ctx.res.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                ));
                ctx.res.corruptions += 1;
            }
        }
    }
    Ok(ctx.res)
}

/// Rewrites the refcount structures from the computed references (QEMU's rebuild), then
/// fixes COPIED flags of the active tables.
fn rebuild(img: &Qcow2, before: &CheckResult, fix: Fix) -> Result<()> {
    let _ = before;
    let ctx = compute(img)?;
    let cs = img.geo.cs();
    let cb = img.geo.cluster_bits;
    let order = img.header().refcount_order;
    let mut refs = ctx.refs;
    // The old refcount structures are replaced: drop their references.
    {
        let r = lock(&img.refs);
        let mut drop_ref = |c: u64| {
            if let Some(v) = refs.get_mut(c as usize) {
                *v = v.saturating_sub(1);
            }
        };
        for i in 0..r.table_clusters as u64 {
            drop_ref((r.table_offset >> cb) + i);
        }
        for e in &r.table {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 && off % cs == 0 {
                drop_ref(off >> cb);
            }
        }
    }
    if !fix.errors {
        // Leaks only: never raise a refcount.
        let mut r = lock(&img.refs);
        for (i, v) in refs.iter_mut().enumerate() {
            let d = r.get(i as u64).unwrap_or(0);
            if d < *v {
                *v = d;
            }
        }
    }
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    };
    let rb_entries = cs * 8 / (1u64 << order);
    let start = (refs.len() as u64).max(img.file.len()?.div_ceil(cs));
    // Place blocks then table at `start`; fixed point for how many blocks cover everything.
    let (mut nb, mut nt) = (1u64, 1u64);
    loop {
        let end = start + nb + nt;
        let nnb = end.div_ceil(rb_entries);
        let nnt = (nnb * 8).div_ceil(cs);
        if nnb <= nb && nnt <= nt {
            break;
        }
        nb = nnb.max(nb);
        nt = nnt.max(nt);
    }
    if nt * cs > crate::header::MAX_REFTABLE_SIZE {
        return Err(Error::NotSupported(
            "refcount table too large to rebuild".into(),
        ));
    }
    let end = start + nb + nt;
    refs.resize(end as usize, 0);
    for c in start..end {
        refs[c as usize] = 1;
    }
    let mut table = vec![0u64; (nt * cs / 8) as usize];
    for b in 0..nb {
        let mut block = vec![0u8; cs as usize];
        for k in 0..rb_entries {
            let c = b * rb_entries + k;
            if c >= end {
                break;
            }
            let v = refs[c as usize].min(max);
            set_entry(&mut block, order, k as usize, v);
        }
        let off = (start + b) << cb;
        img.file.write_at(&block, off)?;
        table[b as usize] = off;
    }
    let mut raw = Vec::with_capacity(table.len() * 8);
    for e in &table {
        raw.extend_from_slice(&e.to_be_bytes());
    }
    let t_off = (start + nb) << cb;
    img.file.write_at(&raw, t_off)?;
    img.file.flush()?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&t_off.to_be_bytes());
    hdr[8..].copy_from_slice(&(nt as u32).to_be_bytes());
    img.file.write_at(&hdr, 48)?;
    img.file.flush()?;
    {
        let mut h = lock(&img.header);
        h.refcount_table_offset = t_off;
        h.refcount_table_clusters = nt as u32;
    }
    lock(&img.refs).reload(t_off, nt as u32)?;
    lock(&img.pending_tags).clear();
    img.pending_count
        .store(0, std::sync::atomic::Ordering::Relaxed);
    if fix.errors {
        fix_copied(img, &refs)?;
    }
    img.forget_decompressed();
    Ok(())
}

fn fix_copied(img: &Qcow2, refs: &[u64]) -> Result<()> {
    let cs = img.geo.cs();
    let cb = img.geo.cluster_bits;
    let mut t = lock(&img.tables);
    t.l2.clear();
    let l1_off = t.l1_offset;
    let flen = img.file.len()?;
    for i in 0..t.l1.len() {
        let e = t.l1[i];
        let l2 = e & OFFSET_MASK;
        if l2 == 0 || l2 % cs != 0 || l2 + cs > flen {
            continue;
        }
        let rc = refs.get((l2 >> cb) as usize).copied().unwrap_or(0);
        let ne = if rc == 1 {
            e | OFLAG_COPIED
        } else {
            e & !OFLAG_COPIED
        };
        if ne != e {
            t.l1[i] = ne;
            t.l1_changed();
            img.file
                .write_at(&ne.to_be_bytes(), l1_off + i as u64 * 8)?;
        }
        let mut raw = vec![0u8; cs as usize];
        img.file.read_at(&mut raw, l2)?;
        let w = img.geo.words();
        let mut changed = false;
        for j in 0..(cs as usize / 8 / w) {
            let o = j * w * 8;
            let entry = u64::from_be_bytes(raw[o..o + 8].try_into().expect("8"));
            if entry & OFLAG_COMPRESSED != 0 || img.external_data {
                continue;
            }
            let host = entry & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            let rc = refs.get((host >> cb) as usize).copied().unwrap_or(0);
            let n = if rc == 1 {
                entry | OFLAG_COPIED
            } else {
                entry & !OFLAG_COPIED
            };
            if n != entry {
                raw[o..o + 8].copy_from_slice(&n.to_be_bytes());
                changed = true;
            }
        }
        if changed && rc == 1 {
            img.file.write_at(&raw, l2)?;
        }
    }
    img.file.flush()?;
    Ok(())
}

impl Qcow2 {
    /// Checks the image like `qemu-img check` (and repairs with `fix`). Waits for in-flight
    /// requests and holds new ones back while it runs.
    pub fn check(&self, fix: Fix) -> Result<CheckResult> {
        let _x = self.gate.exclusive();
        check_locked(self, fix)
    }
}
