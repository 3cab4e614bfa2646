//! The read path: guest reads through [`Mapping`]s, decompression of compressed clusters
//! (with a one-cluster cache), block status, and [`BlockRead`] for use as a backing image.

use std::path::Path;
use std::sync::Arc;

use crate::backing::{read_clamped, BlockRead, BlockStatus};
use crate::error::Result;
use crate::events::DebugEvent;
use crate::image::{lock, Mapping, MappingKind, Qcow2};

impl Qcow2 {
    /// Decompresses the cluster at `host_offset` into a cluster-sized buffer.
    pub fn read_compressed(&self, host_offset: u64, compressed_len: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((h, d)) = &*lock(&self.decompressed) {
            if *h == host_offset {
                return Ok(d.clone());
            }
        }
        let cs = self.geo.cs();
        if compressed_len > 2 * cs + 512 {
            return Err(self.signal_corruption(
                format!("Compressed cluster at {host_offset:#x} too large"),
                Some(host_offset),
            ));
        }
        let mut input = vec![0u8; compressed_len as usize];
        self.hooks.event(DebugEvent::ReadCompressed);
        self.file.read_at(&mut input, host_offset)?;
        let mut out = vec![0u8; cs as usize];
        let ty = lock(&self.header).compression_type;
        crate::compress::decompress(ty, &input, &mut out)?;
        let out = Arc::new(out);
        *lock(&self.decompressed) = Some((host_offset, out.clone()));
        Ok(out)
    }

    pub(crate) fn forget_decompressed(&self) {
        *lock(&self.decompressed) = None;
    }

    /// Reads guest data: `buf.len()` bytes from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _g = self.gate.enter();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let m = self.map(pos, (buf.len() - done) as u64)?;
            let n = m.len as usize;
            let dst = &mut buf[done..done + n];
            self.read_mapped(&m, dst)?;
            done += n;
        }
        Ok(())
    }

    /// Performs the data I/O for one mapping (the generic layer).
    pub fn read_mapped(&self, m: &Mapping, dst: &mut [u8]) -> Result<()> {
        match m.kind {
            MappingKind::Data { host_offset } => {
                self.hooks.event(DebugEvent::ReadAio);
                self.data.read_at(dst, host_offset)?
            }
            MappingKind::Zero { .. } => dst.fill(0),
            MappingKind::Unallocated => match self.backing() {
                Some(b) => {
                    self.hooks.event(DebugEvent::ReadBackingAio);
                    read_clamped(&*b, dst, m.offset)?
                }
                None => dst.fill(0),
            },
            MappingKind::Compressed {
                host_offset,
                compressed_len,
            } => {
                let c = self.read_compressed(host_offset, compressed_len)?;
                let o = (m.offset & (self.geo.cs() - 1)) as usize;
                dst.copy_from_slice(&c[o..o + dst.len()]);
            }
        }
        Ok(())
    }

    /// Allocation status of a prefix of `[offset, offset + len)`, following the backing chain
    /// for unallocated ranges (depth counts layers).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let m = self.map(offset, len)?;
        Ok(match m.kind {
            MappingKind::Data { host_offset } => BlockStatus {
                len: m.len,
                allocated: true,
                zero: false,
                data: true,
                depth: 0,
                offset: Some(host_offset),
            },
            MappingKind::Compressed { .. } => BlockStatus {
                len: m.len,
                allocated: true,
                zero: false,
                data: true,
                depth: 0,
                offset: None,
            },
            MappingKind::Zero { .. } => BlockStatus {
                len: m.len,
                allocated: true,
                zero: true,
                data: false,
                depth: 0,
                offset: None,
            },
            MappingKind::Unallocated => match self.backing() {
                Some(b) if offset < b.size() => {
                    let l = m.len.min(b.size() - offset);
                    let mut s = b.block_status(offset, l)?;
                    s.depth += 1;
                    s
                }
                Some(_) => BlockStatus {
                    len: m.len,
                    allocated: false,
                    zero: true,
                    data: false,
                    depth: 1,
                    offset: None,
                },
                None => BlockStatus {
                    len: m.len,
                    allocated: false,
                    zero: true,
                    data: false,
                    depth: 0,
                    offset: None,
                },
            },
        })
    }
}

impl BlockRead for Qcow2 {
    fn size(&self) -> u64 {
        Qcow2::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Qcow2::block_status(self, offset, len)
    }
    fn format_name(&self) -> &str {
        "qcow2"
    }
    fn filename(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    fn backing_image(&self) -> Option<Arc<dyn BlockRead>> {
        self.backing()
    }
}
