//! Plan execution and commit: the data I/O of a [`WritePlan`] (copy-on-write merged with
//! the guest data), publishing its L2 entries, and [`Qcow2::write_at`] on top of both.

use crate::error::Result;
use crate::events::{DebugEvent, FreeReason};
use crate::image::{lock, Qcow2};
use crate::l2::L2Words;
use crate::write::WritePlan;

impl Qcow2 {
    /// Publishes the L2 entries of an executed plan.
    pub fn commit_write(&self, mut plan: WritePlan<'_>) -> Result<()> {
        if plan.commits.is_empty() {
            return Ok(());
        }
        let r = self.commit_inner(&mut plan);
        self.c(r)
    }

    pub(super) fn commit_inner(&self, plan: &mut WritePlan<'_>) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let w = self.geo.words();
        let mut t = lock(&self.tables);
        let mut frees = Vec::new();
        for c in plan.commits.iter() {
            let l2_off = self.ensure_l2_writable(&mut t, c.guest)?;
            let i = ((c.guest >> cb) & ((1 << self.geo.l2_bits()) - 1)) as usize;
            let mut dep = self.l2_write_dependency();
            let tab = t.l2.get(l2_off, &mut dep)?;
            tab.put(i * w, c.entry);
            if w == 2 {
                tab.put(i * w + 1, c.bitmap);
            }
            t.l2.mark_dirty(l2_off);
            if c.free_old {
                frees.extend(self.entry_clusters(c.old)?);
            }
        }
        drop(t);
        if !frees.is_empty() {
            self.forget_decompressed();
        }
        self.queue_frees(frees, FreeReason::Other);
        let regs = std::mem::replace(&mut plan.registered, 0..0);
        self.unregister(regs);
        Ok(())
    }

    /// Writes guest data at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let plan = self.prepare_write(offset + done as u64, (buf.len() - done) as u64)?;
            let n = plan.len as usize;
            let data = &buf[done..done + n];
            self.execute_plan(&plan, data)?;
            self.commit_write(plan)?;
            done += n;
        }
        self.maybe_apply_frees()
    }

    /// Performs the data I/O of a plan (the generic layer): COW regions merged with the data
    /// into as few writes as possible.
    pub fn execute_plan(&self, plan: &WritePlan<'_>, data: &[u8]) -> Result<()> {
        if plan.cow.is_empty() {
            self.hooks.event(DebugEvent::WriteAio);
            self.data.write_at(data, plan.host_offset)?;
            return Ok(());
        }
        let start = plan
            .cow
            .iter()
            .map(|(h, _)| *h)
            .chain(std::iter::once(plan.host_offset))
            .min()
            .expect("non-empty");
        let end = plan
            .cow
            .iter()
            .map(|(h, b)| h + b.len() as u64)
            .chain(std::iter::once(plan.host_offset + data.len() as u64))
            .max()
            .expect("non-empty");
        let covered: u64 =
            plan.cow.iter().map(|(_, b)| b.len() as u64).sum::<u64>() + data.len() as u64;
        if covered == end - start {
            let mut merged = vec![0u8; (end - start) as usize];
            for (h, b) in &plan.cow {
                let o = (h - start) as usize;
                merged[o..o + b.len()].copy_from_slice(b);
            }
            let o = (plan.host_offset - start) as usize;
            merged[o..o + data.len()].copy_from_slice(data);
            // One write for data and copy-on-write regions, as QEMU's merged COW.
            self.hooks.event(DebugEvent::WriteAio);
            self.data.write_at(&merged, start)?;
        } else {
            for (h, b) in &plan.cow {
                self.hooks.event(DebugEvent::CowWrite);
                self.data.write_at(b, *h)?;
            }
            self.hooks.event(DebugEvent::WriteAio);
            self.data.write_at(data, plan.host_offset)?;
        }
        Ok(())
    }
}
