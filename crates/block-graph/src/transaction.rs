//! `transaction`: several actions applied atomically. Every action is prepared in order
//! (taking effect at once, inside one drained section of every node the actions touch); if
//! one fails, the prepared ones are undone in reverse order and the error is returned,
//! otherwise all are committed.
//!
//! The block graph implements the actions that need no job (`abort`, the bitmap actions,
//! the snapshot actions). Others (`blockdev-backup`, `drive-backup`) come from a
//! [`TransactionExtension`] the job engine installs with
//! [`BlockGraph::set_transaction_extension`].

use std::sync::Arc;

use qapi_types::{
    ActionCompletionMode, NewImageMode, TransactionAction, TransactionActionBranch,
    TransactionProperties,
};

use crate::bitmap::DirtyBitmap;
use crate::error::{BlockError, Result};
use crate::graph::{BlockGraph, DrainGuard};
use crate::node::Node;
use crate::ops::{SnapshotDone, SnapshotSync};

/// An action that took effect during the prepare phase: `commit` makes it final, `abort`
/// undoes it.
pub trait PreparedAction {
    /// Makes the action final (all actions prepared successfully).
    fn commit(self: Box<Self>, g: &mut BlockGraph);
    /// Undoes the action (a later action failed).
    fn abort(self: Box<Self>, g: &mut BlockGraph);
}

/// Actions the block graph does not implement itself (the job engine's).
pub trait TransactionExtension: Send {
    /// Prepares `action` if this extension handles its kind; `Ok(None)` if it does not.
    fn prepare(
        &mut self,
        g: &mut BlockGraph,
        action: &TransactionAction,
        props: &TransactionProperties,
    ) -> Result<Option<Box<dyn PreparedAction>>>;
}

struct Nothing;

impl PreparedAction for Nothing {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {}
    fn abort(self: Box<Self>, _g: &mut BlockGraph) {}
}

struct BitmapAdded(Arc<Node>, String);

impl PreparedAction for BitmapAdded {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {}
    fn abort(self: Box<Self>, _g: &mut BlockGraph) {
        self.0.remove_bitmap(&self.1);
    }
}

struct BitmapRemoved(Arc<Node>, Arc<DirtyBitmap>);

impl PreparedAction for BitmapRemoved {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {
        if self.1.is_persistent() {
            if let Err(e) = crate::bitmap_ops::remove_stored(&self.0, self.1.name()) {
                log::error!("removing stored bitmap '{}' failed: {e}", self.1.name());
            }
        }
    }
    fn abort(self: Box<Self>, _g: &mut BlockGraph) {
        let _ = self.0.add_bitmap(self.1);
    }
}

struct BitsRestore(Arc<DirtyBitmap>, Vec<u64>);

impl PreparedAction for BitsRestore {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {}
    fn abort(self: Box<Self>, _g: &mut BlockGraph) {
        self.0.restore_bits(&self.1);
    }
}

struct EnabledRestore(Arc<DirtyBitmap>, bool);

impl PreparedAction for EnabledRestore {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {}
    fn abort(self: Box<Self>, _g: &mut BlockGraph) {
        self.0.set_enabled(self.1);
    }
}

struct Snapshotted(SnapshotDone);

impl PreparedAction for Snapshotted {
    fn commit(self: Box<Self>, g: &mut BlockGraph) {
        // QEMU reopens the old image read-only once the snapshot is final.
        if let Err(e) = g.reopen_read_only(&self.0.old) {
            log::warn!("reopening '{}' read-only failed: {e}", self.0.old.name());
        }
    }
    fn abort(self: Box<Self>, g: &mut BlockGraph) {
        if let Err(e) = g.undo_snapshot(&self.0) {
            log::error!("undoing a snapshot of '{}' failed: {e}", self.0.old.name());
        }
    }
}

struct InternalSnapshotted(Arc<Node>, String);

impl PreparedAction for InternalSnapshotted {
    fn commit(self: Box<Self>, _g: &mut BlockGraph) {}
    fn abort(self: Box<Self>, g: &mut BlockGraph) {
        let _d = g.drain(std::slice::from_ref(&self.0));
        if let Err(e) = self.0.driver().snapshot_delete(&self.1) {
            log::error!("removing internal snapshot {} failed: {e}", self.1);
        }
    }
}

fn kind_name(a: &TransactionAction) -> String {
    a.r#type.discriminant().as_str().to_string()
}

impl BlockGraph {
    /// Installs the extension that prepares actions the graph does not implement.
    pub fn set_transaction_extension(&mut self, ext: Option<Box<dyn TransactionExtension>>) {
        self.transaction_ext = ext;
    }

    fn check_individual(&self, a: &TransactionAction, props: &TransactionProperties) -> Result<()> {
        if let Some(ActionCompletionMode::Grouped) = props.completion_mode {
            return Err(BlockError::generic(format!(
                "Action '{}' does not support Transaction property completion-mode = grouped",
                kind_name(a)
            )));
        }
        Ok(())
    }

    fn prepare_action(
        &mut self,
        a: &TransactionAction,
        props: &TransactionProperties,
    ) -> Result<Box<dyn PreparedAction>> {
        use TransactionActionBranch as B;
        // Backups take part in grouped completion; `abort` fails before any check (QEMU's
        // abort_prepare does not call action_check_completion_mode).
        let individual_only = !matches!(
            a.r#type,
            B::BlockdevBackup(_) | B::DriveBackup(_) | B::Abort(_) | B::Unrecognized(_)
        );
        if individual_only {
            self.check_individual(a, props)?;
        }
        Ok(match &a.r#type {
            B::Abort(_) => {
                return Err(BlockError::generic(
                    "Transaction aborted using Abort action",
                ))
            }
            B::BlockDirtyBitmapAdd(w) => {
                let d = &w.data;
                self.bitmap_add(
                    &d.node,
                    &d.name,
                    d.granularity,
                    d.persistent.unwrap_or(false),
                    d.disabled.unwrap_or(false),
                )?;
                let n = self.lookup_either(&d.node)?;
                Box::new(BitmapAdded(n, d.name.clone()))
            }
            B::BlockDirtyBitmapRemove(w) => {
                let (n, b) = self.lookup_bitmap(&w.data.node, &w.data.name)?;
                crate::bitmap_ops::check_bitmap(&b, &n, crate::bitmap_ops::BitmapCheck::Remove)?;
                n.remove_bitmap(b.name());
                Box::new(BitmapRemoved(n, b))
            }
            B::BlockDirtyBitmapClear(w) => {
                let (n, b) = self.lookup_bitmap(&w.data.node, &w.data.name)?;
                crate::bitmap_ops::check_bitmap(&b, &n, crate::bitmap_ops::BitmapCheck::Default)?;
                let bits = b.snapshot_bits();
                b.clear();
                Box::new(BitsRestore(b, bits))
            }
            B::BlockDirtyBitmapEnable(w) | B::BlockDirtyBitmapDisable(w) => {
                let on = matches!(a.r#type, B::BlockDirtyBitmapEnable(_));
                let (n, b) = self.lookup_bitmap(&w.data.node, &w.data.name)?;
                crate::bitmap_ops::check_bitmap(&b, &n, crate::bitmap_ops::BitmapCheck::AllowRo)?;
                let old = b.is_enabled();
                b.set_enabled(on);
                Box::new(EnabledRestore(b, old))
            }
            B::BlockDirtyBitmapMerge(w) => {
                let (b, bits) = self.bitmap_merge(&w.data.node, &w.data.target, &w.data.bitmaps)?;
                Box::new(BitsRestore(b, bits))
            }
            B::BlockdevSnapshot(w) => Box::new(Snapshotted(
                self.prepare_snapshot(&w.data.node, &w.data.overlay)?,
            )),
            B::BlockdevSnapshotSync(w) => {
                let d = &w.data;
                Box::new(Snapshotted(self.prepare_snapshot_sync(&SnapshotSync {
                    device: d.device.clone(),
                    node_name: d.node_name.clone(),
                    snapshot_file: d.snapshot_file.clone(),
                    snapshot_node_name: d.snapshot_node_name.clone(),
                    format: d.format.clone(),
                    mode: d.mode.clone().unwrap_or(NewImageMode::AbsolutePaths),
                })?))
            }
            B::BlockdevSnapshotInternalSync(w) => {
                let s = self.snapshot_internal(&w.data.device, &w.data.name)?;
                let n = self.root_bs(&w.data.device)?;
                Box::new(InternalSnapshotted(n, s.id))
            }
            _ => {
                let mut ext = self.transaction_ext.take();
                let r = match ext.as_mut() {
                    Some(x) => x.prepare(self, a, props),
                    None => Ok(None),
                };
                self.transaction_ext = ext;
                match r? {
                    Some(p) => p,
                    None => {
                        return Err(BlockError::generic(format!(
                            "Action '{}' is not supported: it needs a block job engine",
                            kind_name(a)
                        )))
                    }
                }
            }
        })
    }

    fn transaction_nodes(&self, actions: &[TransactionAction]) -> Vec<Arc<Node>> {
        use TransactionActionBranch as B;
        actions
            .iter()
            .filter_map(|a| match &a.r#type {
                B::BlockdevSnapshot(w) => self.lookup_either(&w.data.node).ok(),
                B::BlockdevSnapshotSync(w) => self
                    .lookup(w.data.device.as_deref(), w.data.node_name.as_deref())
                    .ok(),
                B::BlockdevSnapshotInternalSync(w) => self.lookup_either(&w.data.device).ok(),
                // QEMU drains everything first (`bdrv_drain_all`): a bitmap changes at the
                // same instant of the guest's I/O as the snapshots beside it, and jobs on
                // its node pause for that moment too.
                B::BlockDirtyBitmapAdd(w) => self.lookup_either(&w.data.node).ok(),
                B::BlockDirtyBitmapRemove(w)
                | B::BlockDirtyBitmapClear(w)
                | B::BlockDirtyBitmapEnable(w)
                | B::BlockDirtyBitmapDisable(w) => self.lookup_either(&w.data.node).ok(),
                B::BlockDirtyBitmapMerge(w) => self.lookup_either(&w.data.node).ok(),
                _ => None,
            })
            .collect()
    }

    /// `transaction`: all actions take effect, or none does.
    pub fn transaction(
        &mut self,
        actions: &[TransactionAction],
        props: Option<&TransactionProperties>,
    ) -> Result<()> {
        let props = props.cloned().unwrap_or(TransactionProperties {
            completion_mode: None,
        });
        // One drained section around everything, so that all snapshots see the same
        // instant of the guest's I/O.
        let nodes = self.transaction_nodes(actions);
        let _drain: DrainGuard = self.drain(&nodes);
        let mut done: Vec<Box<dyn PreparedAction>> = Vec::with_capacity(actions.len());
        for a in actions {
            match self.prepare_action(a, &props) {
                Ok(p) => done.push(p),
                Err(e) => {
                    while let Some(p) = done.pop() {
                        p.abort(self);
                    }
                    return Err(e);
                }
            }
        }
        if done.is_empty() {
            done.push(Box::new(Nothing));
        }
        for p in done {
            p.commit(self);
        }
        Ok(())
    }
}
