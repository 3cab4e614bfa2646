//! The dirty bitmap commands (`block-dirty-bitmap-*`), with QEMU's checks and messages.

use std::sync::Arc;

use qapi_types::BlockDirtyBitmapOrStr;

use crate::bitmap::{check_granularity, DirtyBitmap};
use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::Node;

/// Longest bitmap name.
pub const MAX_BITMAP_NAME: usize = 1023;

/// What a command needs of a bitmap (QEMU's `BDRV_BITMAP_*` checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapCheck {
    /// Not busy, not read-only, not inconsistent.
    Default,
    /// Not busy, not inconsistent (read-only is fine).
    AllowRo,
    /// Not busy, not read-only (inconsistent is fine: removal).
    Remove,
}

/// Refuses a bitmap the command may not use.
pub fn check_bitmap(b: &DirtyBitmap, node: &Node, c: BitmapCheck) -> Result<()> {
    if b.is_busy() {
        return Err(BlockError::generic(format!(
            "Bitmap '{}' is currently in use by another operation and cannot be used",
            b.name()
        )));
    }
    if c != BitmapCheck::AllowRo && b.is_persistent() && node.is_read_only() {
        return Err(BlockError::generic(format!(
            "Bitmap '{}' is readonly and cannot be modified",
            b.name()
        )));
    }
    if c != BitmapCheck::Remove && b.is_inconsistent() {
        return Err(BlockError::generic(format!(
            "Bitmap '{}' is inconsistent and cannot be used",
            b.name()
        )));
    }
    Ok(())
}

impl BlockGraph {
    /// QEMU's `block_dirty_bitmap_lookup`.
    pub fn lookup_bitmap(&self, node: &str, name: &str) -> Result<(Arc<Node>, Arc<DirtyBitmap>)> {
        let n = self
            .lookup_either(node)
            .map_err(|_| BlockError::generic(format!("Node '{node}' not found")))?;
        // Jobs' anonymous bitmaps are not the user's to touch.
        let b = n
            .bitmap(name)
            .filter(|_| !name.is_empty())
            .ok_or_else(|| BlockError::generic(format!("Dirty bitmap '{name}' not found")))?;
        Ok((n, b))
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(
        &mut self,
        node: &str,
        name: &str,
        granularity: Option<u32>,
        persistent: bool,
        disabled: bool,
    ) -> Result<Arc<DirtyBitmap>> {
        if name.is_empty() {
            return Err(BlockError::generic("Bitmap name cannot be empty"));
        }
        let n = self.lookup_either(node)?;
        let gran = match granularity {
            Some(g) => {
                check_granularity(g as u64)?;
                g as u64
            }
            None => {
                let cs = n.driver().image_info().cluster_size.unwrap_or(0);
                if cs > 0 {
                    cs.clamp(4096, 65536)
                } else {
                    65536
                }
            }
        };
        if persistent {
            let dev = self.backend_of(&n).map(|b| b.name().to_string());
            let who = dev
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| n.name().to_string());
            if !n.driver().supports_persistent_bitmaps() {
                return Err(BlockError::generic(format!(
                    "Can't store persistent bitmaps to {who}: Operation not supported"
                )));
            }
            if n.is_read_only() {
                return Err(BlockError::generic(format!(
                    "Can't store persistent bitmaps to {who}: Cannot store dirty bitmaps in a \
                     read-only image"
                )));
            }
        }
        if n.bitmap(name).is_some() {
            return Err(BlockError::generic(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(BlockError::generic(format!("Bitmap name too long: {name}")));
        }
        let bm = Arc::new(DirtyBitmap::new(name, gran, n.length())?);
        bm.set_enabled(!disabled);
        bm.set_persistent(persistent);
        n.add_bitmap(bm.clone())?;
        Ok(bm)
    }

    /// `block-dirty-bitmap-remove`; persistent bitmaps are removed from the image too.
    pub fn bitmap_remove(&mut self, node: &str, name: &str) -> Result<Arc<DirtyBitmap>> {
        let (n, b) = self.lookup_bitmap(node, name)?;
        check_bitmap(&b, &n, BitmapCheck::Remove)?;
        if b.is_persistent() {
            remove_stored(&n, name)?;
        }
        n.remove_bitmap(name);
        Ok(b)
    }

    /// `block-dirty-bitmap-clear`.
    pub fn bitmap_clear(&mut self, node: &str, name: &str) -> Result<()> {
        let (n, b) = self.lookup_bitmap(node, name)?;
        check_bitmap(&b, &n, BitmapCheck::Default)?;
        b.clear();
        Ok(())
    }

    /// `block-dirty-bitmap-enable` / `-disable`.
    pub fn bitmap_set_enabled(&mut self, node: &str, name: &str, on: bool) -> Result<()> {
        let (n, b) = self.lookup_bitmap(node, name)?;
        check_bitmap(&b, &n, BitmapCheck::AllowRo)?;
        b.set_enabled(on);
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: ORs `sources` into `target`; `target` is unchanged on
    /// failure. Returns the target and its bits before the merge (for transactions).
    pub fn bitmap_merge(
        &mut self,
        node: &str,
        target: &str,
        sources: &[BlockDirtyBitmapOrStr],
    ) -> Result<(Arc<DirtyBitmap>, Vec<u64>)> {
        let (n, dst) = self.lookup_bitmap(node, target)?;
        check_bitmap(&dst, &n, BitmapCheck::Default)?;
        let anon = DirtyBitmap::new("", dst.granularity(), dst.size())?;
        for s in sources {
            let src = match s {
                BlockDirtyBitmapOrStr::Local(name) => n.bitmap(name).ok_or_else(|| {
                    BlockError::generic(format!("Dirty bitmap '{name}' not found"))
                })?,
                BlockDirtyBitmapOrStr::External(e) => self.lookup_bitmap(&e.node, &e.name)?.1,
            };
            if src.is_inconsistent() {
                return Err(BlockError::generic(format!(
                    "Bitmap '{}' is inconsistent and cannot be used",
                    src.name()
                )));
            }
            if src.size() != anon.size() {
                return Err(BlockError::generic(
                    "Bitmaps are incompatible and can't be merged",
                ));
            }
            merge_any(&anon, &src);
        }
        let backup = dst.snapshot_bits();
        dst.merge_from(&anon)?;
        Ok((dst, backup))
    }
}

/// ORs `src` into `dst` (same size, any granularities).
fn merge_any(dst: &DirtyBitmap, src: &DirtyBitmap) {
    if dst.granularity() == src.granularity() {
        // Same geometry: word-wise.
        let _ = dst.merge_from(src);
        return;
    }
    let mut off = 0;
    while let Some(d) = src.next_dirty(off) {
        dst.set_range(d, src.granularity());
        off = d + src.granularity();
    }
}

/// Removes a persistent bitmap from the image, if it is stored there.
pub(crate) fn remove_stored(n: &Node, name: &str) -> Result<()> {
    if n.is_read_only() || !n.driver().supports_persistent_bitmaps() {
        return Ok(());
    }
    match n.driver().remove_bitmap(name) {
        Ok(()) => Ok(()),
        // Created since the image was opened: not stored yet.
        Err(BlockError::Generic(m)) if m == format!("Bitmap '{name}' not found") => Ok(()),
        Err(e) => Err(e),
    }
}
