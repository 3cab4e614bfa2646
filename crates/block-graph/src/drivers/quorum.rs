//! The `quorum` driver: several replicas voted on (QEMU's `block/quorum.c`), and the
//! `blkverify` driver: a test image checked against a raw image on every read.
//!
//! Quorum reads all children (read-pattern `quorum`) and returns the version at least
//! `vote-threshold` children agree on; children that disagree or fail are reported with
//! `QUORUM_REPORT_BAD` (and, with `rewrite-corrupted`, rewritten with the winning data); no
//! version reaching the threshold is `QUORUM_FAILURE` and `EIO`. Read-pattern `fifo` reads
//! the children in order until one succeeds. Writes and flushes go to every child and
//! succeed when at least `vote-threshold` children succeed. Children can be added and
//! removed at run time (`x-blockdev-change`). Events are not rate-limited.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, OnceLock, RwLock, Weak};

use qapi_types::event::{QuorumFailure, QuorumFailureData, QuorumReportBad, QuorumReportBadData};
use qapi_types::{
    BlockdevOptionsBlkverify, BlockdevOptionsQuorum, QuorumOpType, QuorumReadPattern,
};

use super::OpenCtx;
use crate::driver::{
    BlockDriver, DriverImageInfo, DriverStatus, StatusKind, WriteFlags, ZeroFlags,
};
use crate::error::{BlockError, Result};
use crate::events::EventQueue;
use crate::iov::{copy_to_iov, gather, iov_len, iov_len_mut};
use crate::node::{rlock, wlock, Edge, Node, Parent};
use crate::perm::{ChildRole, Perm};

/// The quorum driver's state.
pub struct QuorumDriver {
    children: RwLock<Vec<Arc<Edge>>>,
    next_index: RwLock<usize>,
    threshold: usize,
    fifo: bool,
    rewrite: bool,
    blkverify: bool,
    events: Arc<EventQueue>,
    node: Arc<OnceLock<Weak<Node>>>,
    name: String,
    /// The options that change what the node is, as given (QEMU's strong runtime options
    /// of quorum), for `json:` file names.
    given: Vec<(&'static str, serde_json::Value)>,
}

/// Opens a quorum node.
pub(crate) fn open(
    ctx: &mut OpenCtx<'_>,
    o: &BlockdevOptionsQuorum,
) -> Result<Box<dyn BlockDriver>> {
    let n = o.children.len();
    if n < 1 {
        return Err(BlockError::generic(
            "Number of provided children must be 1 or more",
        ));
    }
    if o.vote_threshold < 1 {
        return Err(BlockError::generic(
            "Parameter 'vote-threshold' expects a value >= 1",
        ));
    }
    if o.vote_threshold as usize > n {
        return Err(BlockError::generic(
            "threshold may not exceed children count",
        ));
    }
    let blkverify = o.blkverify.unwrap_or(false);
    if blkverify && (n != 2 || o.vote_threshold != 2) {
        return Err(BlockError::generic(
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ));
    }
    let rewrite = o.rewrite_corrupted.unwrap_or(false);
    if rewrite && blkverify {
        return Err(BlockError::generic(
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ));
    }
    let fifo = matches!(o.read_pattern, Some(QuorumReadPattern::Fifo));
    let mut children = Vec::with_capacity(n);
    for (i, c) in o.children.iter().enumerate() {
        children.push(ctx.open_child(&format!("children.{i}"), c, ChildRole::Replica)?);
    }
    let lens: Vec<u64> = children.iter().map(|c| c.length()).collect();
    if lens.windows(2).any(|w| w[0] != w[1]) {
        // QEMU opens such a quorum and then fails to read its length (quorum_getlength).
        return Err(BlockError::errno(libc::EIO).prepend("Could not refresh total sector count"));
    }
    let mut given = vec![("vote-threshold", serde_json::json!(o.vote_threshold))];
    if let Some(b) = o.blkverify {
        given.push(("blkverify", serde_json::json!(b)));
    }
    if let Some(r) = o.rewrite_corrupted {
        given.push(("rewrite-corrupted", serde_json::json!(r)));
    }
    if let Some(p) = &o.read_pattern {
        given.push(("read-pattern", qapi_types::QapiType::to_qmp(p)));
    }
    Ok(Box::new(QuorumDriver {
        given,
        children: RwLock::new(children),
        next_index: RwLock::new(n),
        threshold: o.vote_threshold as usize,
        fifo,
        rewrite,
        blkverify,
        events: ctx.events(),
        node: ctx.node_cell(),
        name: ctx.node_name().to_string(),
    }))
}

fn sectors(offset: u64, len: u64) -> (i64, i64) {
    let first = offset / 512;
    let end = (offset + len).div_ceil(512);
    (first as i64, (end - first) as i64)
}

impl QuorumDriver {
    fn children(&self) -> Vec<Arc<Edge>> {
        rlock(&self.children).clone()
    }

    fn report_bad(
        &self,
        ty: QuorumOpType,
        child: &Edge,
        offset: u64,
        len: u64,
        err: Option<&BlockError>,
    ) {
        let (s, c) = sectors(offset, len);
        self.events
            .push(QuorumReportBad::message(&QuorumReportBadData {
                r#type: ty,
                error: err.map(|e| e.to_string()),
                node_name: child.node().name().to_string(),
                sector_num: s,
                sectors_count: c,
            }));
    }

    fn report_failure(&self, offset: u64, len: u64) {
        let reference = self
            .node
            .get()
            .and_then(Weak::upgrade)
            .and_then(|n| {
                n.parents().iter().find_map(|e| match e.parent() {
                    Some(Parent::Root(r)) => crate::backend::device_name_of(r),
                    _ => None,
                })
            })
            .unwrap_or_else(|| self.name.clone());
        let (s, c) = sectors(offset, len);
        self.events.push(QuorumFailure::message(&QuorumFailureData {
            reference,
            sector_num: s,
            sectors_count: c,
        }));
    }

    /// The error most children returned (QEMU's `quorum_vote_error`).
    fn vote_error(errors: &[BlockError]) -> BlockError {
        let mut best: Option<(&BlockError, usize)> = None;
        for e in errors {
            let n = errors
                .iter()
                .filter(|x| x.errno_value() == e.errno_value())
                .count();
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((e, n));
            }
        }
        best.map(|(e, _)| e.clone())
            .unwrap_or_else(|| BlockError::errno(libc::EIO))
    }

    fn read_quorum(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len_mut(iov);
        let children = self.children();
        let mut results: Vec<(Arc<Edge>, Result<Vec<u8>>)> = Vec::with_capacity(children.len());
        for c in &children {
            let mut buf = vec![0u8; len];
            let r = c.read_buf(offset, &mut buf).map(|_| buf);
            results.push((c.clone(), r));
        }
        let errors: Vec<BlockError> = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect();
        for (c, r) in &results {
            if let Err(e) = r {
                self.report_bad(QuorumOpType::Read, c, offset, len as u64, Some(e));
            }
        }
        let ok: Vec<(&Arc<Edge>, &Vec<u8>)> = results
            .iter()
            .filter_map(|(c, r)| r.as_ref().ok().map(|b| (c, b)))
            .collect();
        if ok.len() < self.threshold {
            self.report_failure(offset, len as u64);
            return Err(Self::vote_error(&errors));
        }
        // Group identical versions; the largest group wins.
        let mut groups: Vec<(&Vec<u8>, Vec<&Arc<Edge>>)> = Vec::new();
        for (c, b) in &ok {
            match groups.iter_mut().find(|(v, _)| *v == *b) {
                Some((_, members)) => members.push(c),
                None => groups.push((b, vec![c])),
            }
        }
        let (winner, voters) = groups
            .iter()
            .max_by_key(|(_, m)| m.len())
            .map(|(v, m)| (*v, m.len()))
            .expect("at least one version");
        if voters < self.threshold {
            self.report_failure(offset, len as u64);
            return Err(BlockError::errno(libc::EIO));
        }
        if self.blkverify && groups.len() > 1 {
            log::error!(
                "quorum/blkverify '{}': contents mismatch at offset {offset} ({len} bytes)",
                self.name
            );
            return Err(BlockError::io(libc::EIO, "blkverify: contents mismatch"));
        }
        for (v, members) in &groups {
            if *v == winner {
                continue;
            }
            for c in members {
                self.report_bad(QuorumOpType::Read, c, offset, len as u64, None);
                if self.rewrite {
                    if let Err(e) = c.write_buf(offset, winner, WriteFlags::default()) {
                        log::warn!(
                            "quorum '{}': rewriting a corrupted child failed: {e}",
                            self.name
                        );
                    }
                }
            }
        }
        copy_to_iov(iov, 0, winner);
        Ok(())
    }

    fn all<F>(&self, ty: QuorumOpType, offset: u64, len: u64, f: F) -> Result<()>
    where
        F: Fn(&Edge) -> Result<()>,
    {
        let mut errors = Vec::new();
        let mut ok = 0;
        for c in self.children() {
            match f(&c) {
                Ok(()) => ok += 1,
                Err(e) => {
                    self.report_bad(ty.clone(), &c, offset, len, Some(&e));
                    errors.push(e);
                }
            }
        }
        if ok >= self.threshold {
            Ok(())
        } else {
            Err(Self::vote_error(&errors))
        }
    }
}

impl BlockDriver for QuorumDriver {
    fn format_name(&self) -> &'static str {
        "quorum"
    }

    fn length(&self) -> Result<u64> {
        let lens: Vec<u64> = self.children().iter().map(|c| c.length()).collect();
        match lens.first() {
            Some(l) if lens.iter().all(|x| x == l) => Ok(*l),
            _ => Err(BlockError::errno(libc::EIO)),
        }
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        if !self.fifo {
            return self.read_quorum(offset, iov);
        }
        let mut last = BlockError::errno(libc::EIO);
        for c in self.children() {
            match c.read(offset, iov) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.report_bad(
                        QuorumOpType::Read,
                        &c,
                        offset,
                        iov_len_mut(iov) as u64,
                        Some(&e),
                    );
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        let len = iov_len(iov) as u64;
        self.all(QuorumOpType::Write, offset, len, |c| {
            c.write(offset, iov, flags)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.all(QuorumOpType::Write, offset, len, |c| {
            c.write_zeroes(offset, len, flags)
        })
    }

    fn flush(&self) -> Result<()> {
        self.all(QuorumOpType::Flush, 0, 0, |c| c.flush())
    }

    fn child_perm(
        &self,
        _role: ChildRole,
        perm: Perm,
        shared: Perm,
        _writable: bool,
    ) -> (Perm, Perm) {
        let mut p = perm & Perm::PASSTHROUGH;
        if self.rewrite {
            p |= Perm::WRITE;
        }
        // Children may not be written or resized by others: they would differ.
        let s = (shared & (Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED)) | !Perm::PASSTHROUGH;
        (p, s)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        // QEMU's quorum_co_block_status: zero where every child reads as zero (the shortest
        // such run), else data (the longest run a child reports as not zero).
        let mut zero = len;
        let mut data = 0u64;
        for c in self.children() {
            match c.node().block_status_above(None, offset, len) {
                Ok(s) if s.zero => zero = zero.min(s.len),
                Ok(s) => data = data.max(s.len),
                Err(e) => {
                    self.report_bad(QuorumOpType::Read, &c, offset, len, Some(&e));
                    data = len;
                    break;
                }
            }
        }
        Ok(if data > 0 {
            DriverStatus {
                len: data,
                kind: StatusKind::Data { offset: None },
            }
        } else {
            DriverStatus {
                len: zero,
                kind: StatusKind::Zero { offset: None },
            }
        })
    }

    fn strong_options(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.given.clone()
    }

    fn allocated_size(&self) -> Option<u64> {
        // QEMU's bdrv_sum_allocated_file_size: all children, or nothing if one cannot tell.
        self.children()
            .iter()
            .map(|c| super::allocated_size_of(&c.node()))
            .sum()
    }

    fn supports_child_change(&self) -> bool {
        true
    }

    fn next_child_name(&self) -> Result<String> {
        if self.blkverify {
            return Err(BlockError::generic(
                "Cannot add a child to a quorum in blkverify mode",
            ));
        }
        Ok(format!("children.{}", rlock(&self.next_index)))
    }

    fn add_child(&self, e: Arc<Edge>) -> Result<()> {
        let len = self.length()?;
        if e.length() != len {
            return Err(BlockError::generic("Children have different lengths"));
        }
        wlock(&self.children).push(e);
        *wlock(&self.next_index) += 1;
        Ok(())
    }

    fn del_child(&self, name: &str) -> Result<()> {
        if self.blkverify {
            return Err(BlockError::generic(
                "Cannot delete a child from a quorum in blkverify mode",
            ));
        }
        let mut c = wlock(&self.children);
        if c.len() <= self.threshold {
            return Err(BlockError::generic(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.threshold
            )));
        }
        c.retain(|e| e.name() != name);
        Ok(())
    }
}

/// The blkverify driver: reads from both children and fails on a mismatch; writes go to
/// both. (QEMU exits the process on a mismatch; here the request fails with `EIO` and the
/// mismatch is logged.)
pub struct BlkverifyDriver {
    test: Arc<Edge>,
    raw: Arc<Edge>,
}

/// Opens a blkverify node.
pub(crate) fn open_blkverify(
    ctx: &mut OpenCtx<'_>,
    o: &BlockdevOptionsBlkverify,
) -> Result<Box<dyn BlockDriver>> {
    // QEMU's roles: the raw image is the filtered (primary) child, the test image data.
    let raw = ctx.open_child("raw", &o.raw, ChildRole::Filtered)?;
    let test = ctx.open_child("test", &o.test, ChildRole::Data)?;
    Ok(Box::new(BlkverifyDriver { test, raw }))
}

impl BlockDriver for BlkverifyDriver {
    fn format_name(&self) -> &'static str {
        "blkverify"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn length(&self) -> Result<u64> {
        Ok(self.test.length())
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len_mut(iov);
        let mut raw = vec![0u8; len];
        self.raw.read_buf(offset, &mut raw)?;
        self.test.read(offset, iov)?;
        let test: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
        if let Some(i) = test.iter().zip(&raw).position(|(a, b)| a != b) {
            log::error!(
                "blkverify: read offset={offset} bytes={len} contents mismatch at byte {}",
                offset + i as u64
            );
            return Err(BlockError::io(libc::EIO, "blkverify: contents mismatch"));
        }
        Ok(())
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        let data = gather(iov);
        self.raw.write_buf(offset, &data, flags)?;
        self.test.write(offset, iov, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.raw.write_zeroes(offset, len, flags)?;
        self.test.write_zeroes(offset, len, flags)
    }

    fn flush(&self) -> Result<()> {
        self.raw.flush()?;
        self.test.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        // QEMU's bdrv_co_block_status_from_file: the raw image's status.
        Ok(DriverStatus::delegate(&self.raw, offset, len))
    }

    fn filename(&self) -> Option<String> {
        // QEMU's blkverify_refresh_filename: both plain names, raw first.
        let raw = crate::filename::node_filename(&self.raw.node());
        let test = crate::filename::node_filename(&self.test.node());
        let plain = |f: &str| !f.is_empty() && !f.starts_with("json:");
        (plain(&raw) && plain(&test)).then(|| format!("blkverify:{raw}:{test}"))
    }

    fn image_info(&self) -> DriverImageInfo {
        // A filter of the raw image: QEMU's bdrv_get_info asks that child.
        super::info_of_child(&self.raw)
    }
}
