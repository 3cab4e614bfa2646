//! Batches through qcow2: every request is mapped first (reads: [`::qcow2::Qcow2::map`];
//! writes: [`::qcow2::Qcow2::try_prepare_write`]), the data I/O of all requests that map to
//! one run of host clusters goes to the data file in one batch, then the write plans are
//! committed. Requests that need more (backing or compressed data, zero clusters,
//! copy-on-write, several mappings) run on the single-request path. A write that would wait
//! for a cluster another plan of this batch is allocating runs after the batch.

use std::io::{IoSlice, IoSliceMut};

use ::qcow2::MappingKind;

use super::Qcow2Driver;
use crate::batch::{forward_results, BatchBuf, BatchReq};
use crate::error::{BlockError, Result};

impl Qcow2Driver {
    /// Reads one request on the single-request path, inside the caller's I/O guard.
    fn read_one(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let total = buf.len() as u64;
        let mut done = 0u64;
        while done < total {
            let m = self
                .img
                .map(offset + done, total - done)
                .map_err(BlockError::from)?;
            let s = &mut buf[done as usize..(done + m.len) as usize];
            self.read_mapping(&m, &mut [IoSliceMut::new(s)])?;
            done += m.len;
        }
        Ok(())
    }

    /// Writes the part of `buf` a plan covers, publishes it, and says how much was written.
    fn write_planned(&self, plan: ::qcow2::WritePlan<'_>, buf: &[u8]) -> Result<u64> {
        let n = plan.len;
        self.execute(&plan, &[IoSlice::new(&buf[..n as usize])])?;
        self.img.commit_write(plan).map_err(BlockError::from)?;
        Ok(n)
    }

    /// [`crate::BlockDriver::submit_batch`] for qcow2.
    pub(super) fn batch(&self, reqs: &mut [BatchReq<'_>]) {
        let _g = self.img.io_guard();
        let mut idx = Vec::with_capacity(reqs.len());
        let mut host = Vec::with_capacity(reqs.len());
        let mut plans = Vec::new();
        // (request, bytes already written) of writes finished after the batch.
        let mut deferred: Vec<(usize, u64)> = Vec::new();
        let mut fua = false;
        for (i, r) in reqs.iter_mut().enumerate() {
            if !r.is_pending() {
                continue;
            }
            let (offset, len) = (r.offset, r.len() as u64);
            match &mut r.buf {
                BatchBuf::Read(b) => match self.img.map(offset, len) {
                    Ok(m) if m.len == len => match m.kind {
                        MappingKind::Data { host_offset } => {
                            idx.push(i);
                            host.push(host_offset);
                        }
                        _ => r.result = Some(self.read_mapping(&m, &mut [IoSliceMut::new(b)])),
                    },
                    Ok(_) => r.result = Some(self.read_one(offset, b)),
                    Err(e) => r.result = Some(Err(e.into())),
                },
                BatchBuf::Write(b) => {
                    fua |= r.fua;
                    match self.img.try_prepare_write(offset, len) {
                        Ok(Some(p)) if p.len == len && p.cow.is_empty() => {
                            idx.push(i);
                            host.push(p.host_offset);
                            plans.push((i, p));
                        }
                        Ok(Some(p)) => match self.write_planned(p, b) {
                            Ok(n) if n == len => r.result = Some(Ok(())),
                            Ok(n) => deferred.push((i, n)),
                            Err(e) => r.result = Some(Err(e)),
                        },
                        Ok(None) => deferred.push((i, 0)),
                        Err(e) => r.result = Some(Err(e.into())),
                    }
                }
            }
        }
        if !idx.is_empty() {
            let mut down: Vec<BatchReq<'_>> = Vec::with_capacity(idx.len());
            let mut k = 0;
            for (i, r) in reqs.iter_mut().enumerate() {
                if idx.get(k) == Some(&i) {
                    let mut d = r.forward(host[k]);
                    // FUA is one flush of the image after the batch.
                    d.fua = false;
                    down.push(d);
                    k += 1;
                }
            }
            self.data.submit_batch(&mut down);
            let results: Vec<_> = down.into_iter().map(|d| d.result).collect();
            forward_results(reqs, &idx, results);
        }
        for (i, p) in plans {
            if matches!(reqs[i].result, Some(Ok(()))) {
                reqs[i].result = Some(self.img.commit_write(p).map_err(BlockError::from));
            }
        }
        for (i, done) in deferred {
            let r = &mut reqs[i];
            let offset = r.offset + done;
            r.result = Some(match &r.buf {
                BatchBuf::Write(b) => self.write_rest(offset, &b[done as usize..]),
                BatchBuf::Read(_) => unreachable!("only writes are deferred"),
            });
        }
        if fua {
            let f = crate::driver::BlockDriver::flush(self);
            for r in reqs.iter_mut().filter(|r| r.fua) {
                if let (Some(Ok(())), Err(e)) = (&r.result, &f) {
                    r.result = Some(Err(e.clone()));
                }
            }
        }
    }

    /// The rest of a write, plan by plan (may wait for other requests' allocations).
    fn write_rest(&self, mut offset: u64, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let plan = self
                .img
                .prepare_write(offset, buf.len() as u64)
                .map_err(BlockError::from)?;
            let n = self.write_planned(plan, buf)?;
            offset += n;
            buf = &buf[n as usize..];
        }
        Ok(())
    }
}
