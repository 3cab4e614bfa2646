//! Block status through filters and the backing chain (`Node::block_status_above`).

use std::sync::Arc;

use super::Node;
use crate::driver::StatusKind;
use crate::error::{BlockError, Result};

/// The allocation status of a range, through filters and the backing chain (what
/// `qemu-img map` shows and jobs rely on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeStatus {
    /// Bytes from the queried offset with this status.
    pub len: u64,
    /// Whether a layer of the chain (at `depth`) allocates the range.
    pub allocated: bool,
    /// Whether the range reads as zero.
    pub zero: bool,
    /// Whether the range is backed by data.
    pub data: bool,
    /// The layer that answers: 0 the node itself, 1 its backing node, ... For unallocated
    /// ranges, the last layer examined.
    pub depth: u32,
    /// Offset of the data in the answering layer's file, when stored there as is.
    pub offset: Option<u64>,
    /// Name of the node that answers.
    pub node: String,
}

impl Node {
    /// Allocation status of a prefix of `[offset, offset + len)` through filters and the
    /// backing chain, down to (not including) `base` when given.
    pub fn block_status_above(
        self: &Arc<Self>,
        base: Option<&Arc<Node>>,
        offset: u64,
        len: u64,
    ) -> Result<RangeStatus> {
        let size = self.length();
        if offset >= size || len == 0 {
            return Err(BlockError::errno(libc::EINVAL));
        }
        let mut len = len.min(size - offset);
        let mut cur = self.clone();
        let mut off = offset;
        let mut depth = 0u32;
        loop {
            let st = cur.driver.block_status(off, len)?;
            if st.len == 0 {
                return Err(BlockError::errno(libc::EIO));
            }
            len = len.min(st.len);
            let answer = |allocated, zero, data, offset, depth, node: &Node| RangeStatus {
                len,
                allocated,
                zero,
                data,
                depth,
                offset,
                node: node.name.clone(),
            };
            match st.kind {
                StatusKind::Data { offset } => {
                    return Ok(answer(true, false, true, offset, depth, &cur))
                }
                StatusKind::Zero { offset } => {
                    return Ok(answer(true, true, false, offset, depth, &cur))
                }
                StatusKind::Delegate { child, offset } => {
                    let next = child.node();
                    let clen = next.length();
                    if offset >= clen {
                        return Ok(answer(true, true, false, None, depth, &cur));
                    }
                    len = len.min(clen - offset);
                    cur = next;
                    off = offset;
                }
                StatusKind::Unallocated => {
                    let Some(b) = cur.backing() else {
                        // QEMU's bdrv_co_block_status: reads as zero only for formats that
                        // could have a backing file (null-co without read-zeroes: unknown).
                        let zero = cur.driver.supports_backing();
                        return Ok(answer(false, zero, false, None, depth, &cur));
                    };
                    let next = b.node();
                    if base.is_some_and(|base| Arc::ptr_eq(base, &next)) {
                        return Ok(answer(false, false, false, None, depth, &cur));
                    }
                    let blen = next.length();
                    if off >= blen {
                        return Ok(answer(false, true, false, None, depth + 1, &next));
                    }
                    len = len.min(blen - off);
                    cur = next;
                    depth += 1;
                }
            }
        }
    }
}
