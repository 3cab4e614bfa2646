//! Compressed writes: compressing a cluster (no image state touched, so callers can do it
//! in parallel) and storing the compressed data with its L2 entry.

use crate::error::{Error, Result};
use crate::events::{DebugEvent, FreeReason};
use crate::image::{lock, Qcow2};
use crate::l2::L2Words;
use crate::l2::OFLAG_COMPRESSED;

impl Qcow2 {
    /// Writes one cluster compressed at the cluster-aligned `offset` (`buf` is a full cluster,
    /// or the rest of the disk for the last cluster). Falls back to a normal write when the
    /// data does not compress.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.compress_cluster(buf, offset)? {
            Some(comp) => self.write_compressed_cluster(&comp, offset),
            None => self.write_at(buf, offset),
        }
    }

    fn check_compressed_target(&self, len: u64, offset: u64) -> Result<()> {
        self.check_writable()?;
        let cs = self.geo.cs();
        if offset % cs != 0 || len > cs {
            return Err(Error::InvalidArgument(
                "compressed writes must cover one aligned cluster".into(),
            ));
        }
        if self.external_data {
            return Err(Error::NotSupported(
                "compression is not supported with an external data file".into(),
            ));
        }
        Ok(())
    }

    /// The first half of [`Qcow2::write_compressed`], which touches no image state (callers
    /// compress in parallel and store in order): compresses the cluster `buf` destined for
    /// the cluster-aligned `offset` with the image's compression type. `None` when it does not
    /// compress; the caller then writes `buf` with [`Qcow2::write_at`].
    pub fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<Option<Vec<u8>>> {
        self.check_compressed_target(buf.len() as u64, offset)?;
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.geo.cs();
        let padded;
        let data: &[u8] = if (buf.len() as u64) < cs {
            let mut v = vec![0u8; cs as usize];
            v[..buf.len()].copy_from_slice(buf);
            padded = v;
            &padded
        } else {
            buf
        };
        let ty = lock(&self.header).compression_type;
        crate::compress::compress(ty, data)
    }

    /// The second half of [`Qcow2::write_compressed`]: stores `comp`, the output of
    /// [`Qcow2::compress_cluster`], as the cluster at `offset`.
    pub fn write_compressed_cluster(&self, comp: &[u8], offset: u64) -> Result<()> {
        self.check_compressed_target(comp.len() as u64, offset)?;
        self.check_range(offset, 1)?;
        if comp.is_empty() || comp.len() as u64 >= self.geo.cs() {
            return Err(Error::InvalidArgument(
                "compressed data must be shorter than a cluster".into(),
            ));
        }
        let _guard = self.gate.enter();
        let c = offset >> self.geo.cluster_bits;
        self.register(c..c + 1);
        let r = (|| -> Result<()> {
            self.mark_dirty()?;
            let mut t = lock(&self.tables);
            let l2_off = self.ensure_l2_writable(&mut t, offset)?;
            let (old, _) = self.entry_at(&mut t, l2_off, offset)?;
            drop(t);
            let host = lock(&self.refs).alloc_bytes(comp.len() as u64)?;
            self.hooks.event(DebugEvent::WriteCompressed);
            self.file.write_at(comp, host)?;
            let x = 62 - (self.geo.cluster_bits - 8);
            let sectors = (host + comp.len() as u64 - 1) / 512 - host / 512;
            let entry = OFLAG_COMPRESSED | (sectors << x) | host;
            self.hooks.event(DebugEvent::L2UpdateCompressed);
            let mut t = lock(&self.tables);
            let l2_off = self.ensure_l2_writable(&mut t, offset)?;
            let w = self.geo.words();
            let i = (c & ((1 << self.geo.l2_bits()) - 1)) as usize;
            let mut dep = self.l2_write_dependency();
            let tab = t.l2.get(l2_off, &mut dep)?;
            tab.put(i * w, entry);
            if w == 2 {
                tab.put(i * w + 1, 0);
            }
            t.l2.mark_dirty(l2_off);
            drop(t);
            let frees = self.entry_clusters(old)?;
            if !frees.is_empty() {
                self.forget_decompressed();
            }
            self.queue_frees(frees, FreeReason::Other);
            Ok(())
        })();
        self.unregister(c..c + 1);
        self.c(r)?;
        self.maybe_apply_frees()
    }
}
