//! The mirror job's copy loop and dirty tracking: the first pass's dirty bitmap, claiming
//! runs of dirty granules, and the loop that keeps the copy threads busy until source and
//! target converge (READY) and a verb ends the job.

use std::sync::Arc;
use std::time::Duration;

use block_graph::{BlockBackend, ZeroFlags};
use qapi_types::MirrorSyncMode;

use super::pool::copy_run;
use super::{skip_filters, Mirror, Pool, Run, MAX_IN_FLIGHT, MIN_RUN};
use crate::engine::{ErrorAction, JobContext};
use crate::error::{JobError, Result};

impl Mirror {
    pub(super) fn roots(&self) -> Result<(Arc<BlockBackend>, Arc<BlockBackend>)> {
        match (&self.src_root, &self.tgt_root) {
            (Some(s), Some(t)) => Ok((s.clone(), t.clone())),
            _ => Err(JobError::generic("mirror job without its roots")),
        }
    }

    /// The alignment of runs: the granularity, and at least the target's cluster size so
    /// that no partial cluster is written into a target without its backing node yet.
    fn align(&self) -> u64 {
        let tc = self
            .p
            .target
            .driver()
            .image_info()
            .cluster_size
            .unwrap_or(0);
        self.p.granularity.max(tc.next_power_of_two()).max(512)
    }

    /// The first pass's bitmap: what the source allocates (above its backing node for
    /// `top`); ranges reading as zero are zeroed in the target unless it reads as zero
    /// there already.
    fn initial_dirty(&self, ctx: &JobContext, tgt: &BlockBackend) -> Result<()> {
        let len = self.p.source.length();
        let base = match self.p.sync {
            MirrorSyncMode::None => return Ok(()),
            MirrorSyncMode::Top => skip_filters(&self.p.source).backing().map(|b| b.node()),
            _ => None,
        };
        let mut off = 0u64;
        while off < len {
            ctx.pause_point()?;
            let st = self
                .p
                .source
                .block_status_above(base.as_ref(), off, len - off)?;
            let n = st.len.max(1);
            if st.data || (st.allocated && !st.zero) {
                self.bitmap.set_range(off, n);
            } else if st.zero && self.p.sync == MirrorSyncMode::Full {
                let tz = self
                    .p
                    .target
                    .block_status_above(None, off, n)
                    .map(|t| t.zero && t.len >= n)
                    .unwrap_or(false);
                if !tz {
                    // Zeroing may be refused by odd drivers: copying is always right.
                    if tgt
                        .write_zeroes(
                            off,
                            n,
                            ZeroFlags {
                                may_unmap: self.p.unmap,
                                fua: false,
                            },
                        )
                        .is_err()
                    {
                        self.bitmap.set_range(off, n);
                    }
                }
            }
            off += n;
        }
        Ok(())
    }

    /// Takes the next dirty run at or after `*cursor` (wrapping around once), clearing its
    /// bits. Runs overlapping one in flight are left for later: two copies of one range in
    /// flight could finish out of order and leave the older data in the target.
    pub(super) fn claim(&self, cursor: &mut u64, max: u64, busy: &[Run]) -> Option<Run> {
        let len = self.p.source.length();
        let align = self.align();
        let overlap = |s: u64, e: u64| busy.iter().find(|r| r.offset < e && s < r.offset + r.len);
        let mut from = *cursor;
        let mut wrapped = false;
        let start = loop {
            let d = match self.bitmap.next_dirty(from).filter(|&d| d < len) {
                Some(d) => d,
                None if !wrapped && *cursor > 0 => {
                    wrapped = true;
                    from = 0;
                    continue;
                }
                None => return None,
            };
            if wrapped && d >= *cursor {
                return None;
            }
            let start = d / align * align;
            match overlap(start, (start + align).min(len)) {
                Some(r) => from = r.offset + r.len,
                None => break start,
            }
        };
        let mut end = (start + align).min(len);
        while end < len
            && end - start < max
            && self.bitmap.next_dirty(end) == Some(end)
            && overlap(end, (end + align).min(len)).is_none()
        {
            end = (end + align).min(len);
        }
        self.bitmap.reset_range(start, end - start);
        *cursor = end;
        Some(Run {
            offset: start,
            len: end - start,
        })
    }

    fn remaining(&self) -> u64 {
        self.bitmap.count().min(self.p.source.length())
    }

    /// The job's `run`: copies until source and target converge, reports READY, and goes
    /// on copying guest writes until the job is completed or cancelled.
    pub(super) fn copy(&mut self, ctx: &JobContext) -> Result<()> {
        let (src, tgt) = self.roots()?;
        self.initial_dirty(ctx, &tgt)?;
        let max_run = (self.p.buf_size / MAX_IN_FLIGHT as u64)
            .max(MIN_RUN)
            .min(self.p.buf_size)
            .max(self.align());
        let threads = ((self.p.buf_size / max_run) as usize).clamp(1, MAX_IN_FLIGHT);
        let unmap = self.p.unmap;
        let (s2, t2) = (src.clone(), tgt.clone());
        let mut pool = Pool::new(
            &format!("mirror {}", ctx.id()),
            threads,
            Arc::new(move |r, buf: &mut Vec<u8>| copy_run(&s2, &t2, r, unmap, buf)),
        )?;
        let mut cursor = 0u64;
        let mut busy: Vec<Run> = Vec::new();
        let mut failed: Option<JobError> = None;
        loop {
            let remaining = self.remaining();
            ctx.progress_set_remaining(remaining + pool.bytes());
            // Like QEMU's mirror_pause, pause only once the runs in flight are done:
            // one failing after a resume would pause the job again.
            if failed.is_none() && (pool.in_flight() == 0 || !ctx.should_stop()) {
                if let Err(e) = ctx.pause_point() {
                    failed = Some(e);
                }
            }
            if failed.is_some() {
                // Let the runs in flight finish, then end.
                if pool.in_flight() == 0 {
                    break;
                }
                pool.next(Duration::from_millis(100));
                continue;
            }
            // Fill the pipeline.
            let mut submitted = 0;
            while pool.in_flight() < threads && pool.bytes() < self.p.buf_size && !ctx.should_stop()
            {
                let Some(run) = self.claim(&mut cursor, max_run, &busy) else {
                    break;
                };
                busy.push(run);
                pool.submit(run);
                submitted += 1;
                if let Err(e) = ctx.rate_limit(run.len) {
                    failed = Some(e);
                    break;
                }
            }
            // Collect what finished.
            let wait = if pool.in_flight() >= threads || submitted == 0 {
                Duration::from_millis(20)
            } else {
                Duration::ZERO
            };
            while let Some((run, res)) = pool.next(wait) {
                if let Some(i) = busy.iter().position(|r| r.offset == run.offset) {
                    busy.swap_remove(i);
                }
                match res {
                    Ok(()) => ctx.progress_done(run.len),
                    Err((is_read, e)) => {
                        self.bitmap.set_range(run.offset, run.len);
                        match ctx.error_action(self.p.opts.policy(is_read), is_read, &e) {
                            ErrorAction::Report => {
                                failed = Some(e.into());
                                break;
                            }
                            ErrorAction::Ignore | ErrorAction::Stop => {}
                        }
                    }
                }
                if pool.in_flight() < threads {
                    break;
                }
            }
            if failed.is_some() {
                continue;
            }
            if pool.in_flight() == 0 && self.remaining() == 0 {
                if !ctx.is_ready() {
                    tgt.flush()?;
                    ctx.set_ready();
                }
                if ctx.complete_requested() || ctx.cancel_requested() {
                    break;
                }
                // Converged: wait for guest writes (or a verb).
                if let Err(e) = ctx.sleep(Duration::from_millis(5)) {
                    failed = Some(e);
                }
            }
        }
        drop(pool);
        if let Some(e) = failed {
            return Err(e);
        }
        tgt.flush()?;
        Ok(())
    }
}
