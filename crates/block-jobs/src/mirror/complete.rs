//! The mirror job's completion, on the monitor's thread: `prepare` copies the last dirty
//! runs in a drained section, gives the target its backing node and switches every user
//! of the source (or of `replaces`) to the target; `clean` releases the job's roots and
//! its dirty bitmap whatever the outcome.

use std::sync::Arc;

use block_graph::{BlockGraph, RootInfo, WriteFlags};
use qapi_types::{JobType, MirrorSyncMode};

use super::{skip_filters, BackingMode, Mirror, MIN_RUN};
use crate::engine::{JobContext, JobDriver};
use crate::error::{JobError, Result};

impl JobDriver for Mirror {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }

    fn roots(&self) -> Vec<Arc<RootInfo>> {
        [&self.src_root, &self.tgt_root]
            .into_iter()
            .flatten()
            .map(|r| r.root_info().clone())
            .collect()
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        self.copy(ctx)
    }

    fn prepare(&mut self, ctx: &JobContext, g: &mut BlockGraph) -> Result<()> {
        if !ctx.complete_requested() || ctx.cancel_requested() {
            return Ok(());
        }
        let (src, tgt) = self.roots()?;
        let to_replace = self.p.replaces.clone().unwrap_or(self.p.source.clone());
        {
            // Nothing reaches the source or the target while the last writes are copied
            // and every user moves over.
            let _d = g.drain(&[self.p.source.clone(), self.p.target.clone()]);
            {
                let (se, te) = match (src.root_edge(), tgt.root_edge()) {
                    (Some(s), Some(t)) => (s, t),
                    _ => return Err(JobError::generic("mirror job without its roots")),
                };
                let mut cursor = 0;
                while let Some(run) = self.claim(&mut cursor, MIN_RUN, &[]) {
                    let mut buf = vec![0u8; run.len as usize];
                    se.read_buf(run.offset, &mut buf)?;
                    te.write_buf(run.offset, &buf, WriteFlags::default())?;
                    ctx.progress_done(run.len);
                }
                te.flush()?;
                // The edges go with this scope: a live edge keeps its permissions.
            }
            drop((src, tgt));
            // The job's roots must not follow the source, nor keep others off the target.
            if let Some(r) = self.src_root.take() {
                g.release_root(&r);
            }
            if let Some(r) = self.tgt_root.take() {
                g.release_root(&r);
            }
            self.p.source.remove_bitmap("");
            if self.p.backing_mode == BackingMode::FromSource {
                let backing = match self.p.sync {
                    MirrorSyncMode::None => Some(self.p.source.clone()),
                    _ => skip_filters(&self.p.source).backing().map(|b| b.node()),
                };
                let tgt_fmt = skip_filters(&self.p.target);
                let cur = tgt_fmt.backing().map(|b| b.node());
                let same = match (&cur, &backing) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    g.set_backing(&tgt_fmt, backing.as_ref())?;
                }
            }
            g.replace_node(&to_replace, &self.p.target)?;
            self.remove_filter(g);
        }
        log::info!(
            "mirror job '{}': '{}' replaced by '{}'",
            ctx.id(),
            to_replace.name(),
            self.p.target.name()
        );
        Ok(())
    }

    fn clean(&mut self, _ctx: &JobContext, g: &mut BlockGraph) {
        self.release(g);
        if let Some(b) = self.p.source.bitmap("") {
            if Arc::ptr_eq(&b, &self.bitmap) {
                self.p.source.remove_bitmap("");
            }
        }
    }
}
