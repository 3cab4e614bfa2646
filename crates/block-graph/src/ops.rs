//! Graph operations behind the QMP commands: resize, external snapshots (node
//! replacement), internal snapshots, the backing file name. Each checks its arguments as
//! QEMU does and words its errors the same way.

use std::sync::Arc;

use qapi_types::{BlockIOThrottle, BlockdevOptions, NewImageMode, QapiType, SnapshotInfo};

use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::{Node, Parent};
use crate::options::Inherit;
use crate::perm::Perm;

/// How `blockdev-snapshot-sync` creates the overlay.
#[derive(Debug, Clone)]
pub struct SnapshotSync {
    /// Device whose root node gets the snapshot.
    pub device: Option<String>,
    /// Or the node.
    pub node_name: Option<String>,
    /// The new overlay's file.
    pub snapshot_file: String,
    /// The new overlay's node name.
    pub snapshot_node_name: Option<String>,
    /// The overlay's format (default qcow2).
    pub format: Option<String>,
    /// Create the file (`absolute-paths`, the default) or use an existing one.
    pub mode: NewImageMode,
}

/// The result of preparing an external snapshot, for transactions to undo.
#[derive(Debug)]
pub struct SnapshotDone {
    /// The node that got the overlay.
    pub old: Arc<Node>,
    /// The overlay.
    pub overlay: Arc<Node>,
    /// Whether the overlay was opened by the command (then it is dropped on undo).
    pub opened_here: bool,
}

impl BlockGraph {
    /// Whether every parent of `n` is a root (QEMU's `bdrv_is_root_node`).
    pub fn is_root_node(&self, n: &Arc<Node>) -> bool {
        n.parents()
            .iter()
            .all(|e| matches!(e.parent(), Some(Parent::Root(_))))
    }

    /// QEMU's `qmp_get_root_bs`.
    pub fn root_bs(&self, name: &str) -> Result<Arc<Node>> {
        let n = self.lookup_either(name)?;
        if !self.is_root_node(&n) {
            return Err(BlockError::generic("Need a root block node"));
        }
        Ok(n)
    }

    /// `block_resize`: changes a node's length through a temporary user holding the
    /// resize permission, with the node drained.
    pub fn block_resize(
        &mut self,
        device: Option<&str>,
        node_name: Option<&str>,
        size: i64,
    ) -> Result<()> {
        let node = self.lookup(device, node_name)?;
        if size < 0 {
            return Err(BlockError::generic("Parameter 'size' expects a >0 size"));
        }
        // QEMU's bdrv_op_is_blocked(RESIZE) (a job's node, a backing node), worded with
        // the `device` argument as QEMU's QERR_DEVICE_IN_USE, '(null)' without one.
        if self.check_op_blockers(&node).is_err() {
            return Err(BlockError::generic(format!(
                "Device '{}' is in use",
                device.unwrap_or("(null)")
            )));
        }
        let user = self.new_root(&node, Perm::RESIZE, Perm::ALL, "an unnamed block device")?;
        let r = {
            let _d = self.drain(std::slice::from_ref(&node));
            let e = user.root_edge().expect("just inserted");
            e.truncate(size as u64)
        };
        self.release_root(&user);
        r?;
        for b in self.backends.clone() {
            if b.root_node().is_some_and(|r| Arc::ptr_eq(&r, &node)) {
                b.notify_resize(node.length());
            }
        }
        Ok(())
    }

    /// `blockdev-snapshot`: installs `node` as the backing node of `overlay`, replaces
    /// `node` by `overlay` for all of `node`'s users atomically (drained, permission
    /// checked, undone on failure), then makes `node` read-only.
    pub fn blockdev_snapshot(&mut self, node: &str, overlay: &str) -> Result<SnapshotDone> {
        let done = self.prepare_snapshot(node, overlay)?;
        self.reopen_read_only(&done.old)?;
        Ok(done)
    }

    /// `blockdev-snapshot-sync`: like [`BlockGraph::prepare_snapshot_sync`], then makes the
    /// old image read-only.
    pub fn blockdev_snapshot_sync(&mut self, s: &SnapshotSync) -> Result<SnapshotDone> {
        let done = self.prepare_snapshot_sync(s)?;
        self.reopen_read_only(&done.old)?;
        Ok(done)
    }

    /// The prepare phase of `blockdev-snapshot` (the old node stays writable; undo with
    /// [`BlockGraph::undo_snapshot`]).
    pub fn prepare_snapshot(&mut self, node: &str, overlay: &str) -> Result<SnapshotDone> {
        let old = self.lookup_either(node)?;
        self.check_op_blockers(&old)?;
        let new = self.lookup_either(overlay)?;
        self.append_overlay(&old, &new)?;
        Ok(SnapshotDone {
            old,
            overlay: new,
            opened_here: false,
        })
    }

    fn append_overlay(&mut self, old: &Arc<Node>, new: &Arc<Node>) -> Result<()> {
        if self.backend_of(new).is_some() {
            return Err(BlockError::generic("The overlay is already in use"));
        }
        if new.backing().is_some() {
            return Err(BlockError::generic(
                "The overlay already has a backing image",
            ));
        }
        if !new.driver().supports_backing() {
            return Err(BlockError::generic(
                "The overlay does not support backing images",
            ));
        }
        if Arc::ptr_eq(old, new) {
            // QEMU's bdrv_append meets the cycle when it attaches the backing child.
            return Err(BlockError::generic(format!(
                "Making '{}' a backing child of '{}' would create a cycle",
                old.name(),
                new.name()
            )));
        }
        if !old.is_read_only() {
            old.flush()
                .map_err(|_| BlockError::generic("An IO error has occurred"))?;
        }
        let _d = self.drain(&[old.clone(), new.clone()]);
        self.set_backing(new, Some(old))?;
        if let Err(e) = self.replace_node(old, new) {
            let _ = self.set_backing(new, None);
            return Err(e);
        }
        Ok(())
    }

    /// Undoes a snapshot prepared by [`BlockGraph::prepare_snapshot`] or
    /// [`BlockGraph::prepare_snapshot_sync`] (for transactions).
    pub fn undo_snapshot(&mut self, s: &SnapshotDone) -> Result<()> {
        let _d = self.drain(&[s.old.clone(), s.overlay.clone()]);
        self.replace_node(&s.overlay, &s.old)?;
        self.set_backing(&s.overlay, None)?;
        if s.opened_here {
            self.disown(&s.overlay);
        }
        Ok(())
    }

    /// The prepare phase of `blockdev-snapshot-sync`: creates (or, with mode `existing`,
    /// opens) an overlay file backed by the device's current image and installs it.
    pub fn prepare_snapshot_sync(&mut self, s: &SnapshotSync) -> Result<SnapshotDone> {
        let old = self.lookup(s.device.as_deref(), s.node_name.as_deref())?;
        self.check_op_blockers(&old)?;
        let format = s.format.clone().unwrap_or_else(|| "qcow2".into());
        if s.node_name.is_some() && s.snapshot_node_name.is_none() {
            return Err(BlockError::generic("New overlay node-name missing"));
        }
        if let Some(n) = &s.snapshot_node_name {
            if self.lookup_either(n).is_ok() {
                return Err(BlockError::generic("New overlay node-name already in use"));
            }
        }
        if !old.is_read_only() {
            old.flush()
                .map_err(|_| BlockError::generic("An IO error has occurred"))?;
        }
        if s.mode != NewImageMode::Existing {
            let backing = crate::drivers::node_filename(&old);
            create_image(
                &s.snapshot_file,
                &format,
                old.length(),
                Some((&backing, old.driver_name())),
            )?;
        }
        let mut v = serde_json::json!({
            "driver": format,
            "file": {"driver": "file", "filename": s.snapshot_file},
        });
        if format == "qcow2" {
            v["backing"] = serde_json::Value::Null;
        }
        if let Some(n) = &s.snapshot_node_name {
            v["node-name"] = serde_json::Value::String(n.clone());
        }
        let o =
            BlockdevOptions::from_qmp_strict(v).map_err(|e| BlockError::generic(e.to_string()))?;
        let mut inh = Inherit::top();
        inh.read_only = Some(old.is_read_only());
        inh.cache_direct = Some(old.options().cache_direct);
        inh.cache_no_flush = Some(old.options().cache_no_flush);
        let new = self.open_node(&o, &inh, false)?;
        self.append_overlay(&old, &new)?;
        self.adopt(&new);
        Ok(SnapshotDone {
            old,
            overlay: new,
            opened_here: true,
        })
    }

    /// `blockdev-snapshot-internal-sync`: takes an internal snapshot of a root node.
    pub fn snapshot_internal(&mut self, device: &str, name: &str) -> Result<SnapshotInfo> {
        let n = self.root_bs(device)?;
        let _d = self.drain(std::slice::from_ref(&n));
        self.check_op_blockers(&n)?;
        if n.is_read_only() {
            return Err(BlockError::generic(format!(
                "Device '{device}' is read only"
            )));
        }
        let fmt = snapshot_format_node(&n);
        if !fmt.driver_name().eq("qcow2") {
            return Err(BlockError::generic(format!(
                "Block format '{}' used by device '{device}' does not support internal snapshots",
                n.driver_name()
            )));
        }
        if name.is_empty() {
            return Err(BlockError::generic("Name is empty"));
        }
        if fmt.driver().snapshot_find(None, Some(name)).is_some() {
            return Err(BlockError::generic(format!(
                "Snapshot with name '{name}' already exists on device '{device}'"
            )));
        }
        fmt.flush()?;
        fmt.driver().snapshot_create(name).map_err(|e| {
            BlockError::generic(format!(
                "Failed to create snapshot '{name}' on device '{device}': {e}"
            ))
        })
    }

    /// `blockdev-snapshot-delete-internal-sync`: deletes an internal snapshot by id and/or
    /// name; returns it.
    pub fn snapshot_delete_internal(
        &mut self,
        device: &str,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<SnapshotInfo> {
        let n = self.root_bs(device)?;
        self.check_op_blockers(&n)?;
        if id.is_none() && name.is_none() {
            return Err(BlockError::generic("Name or id must be provided"));
        }
        let fmt = snapshot_format_node(&n);
        if fmt.driver_name() != "qcow2" {
            // QEMU looks the snapshot up first, and listing them is what fails.
            return Err(BlockError::generic(
                "Failed to get a snapshot list: Operation not supported",
            ));
        }
        let Some(sn) = fmt.driver().snapshot_find(id, name) else {
            return Err(BlockError::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                // QEMU's STR_OR_NULL.
                id.unwrap_or("null"),
                name.unwrap_or("null")
            )));
        };
        let _d = self.drain(std::slice::from_ref(&n));
        fmt.driver().snapshot_delete(&sn.id)?;
        Ok(sn)
    }

    /// `change-backing-file`: rewrites the backing file name recorded in `image_node_name`,
    /// which must be in the backing chain of `device`'s root.
    pub fn change_backing_file(
        &mut self,
        device: &str,
        image_node_name: &str,
        backing_file: &str,
    ) -> Result<()> {
        let root = self.root_bs(device)?;
        let image = self.lookup(None, Some(image_node_name))?;
        if image.backing().is_none() {
            return Err(BlockError::generic(
                "not allowing backing file change on an image without a backing file",
            ));
        }
        // QEMU checks the device's root, not the image: jobs block the chain from there.
        self.check_op_blockers(&root)?;
        let mut cur = Some(root.clone());
        let mut found = false;
        while let Some(c) = cur {
            if Arc::ptr_eq(&c, &image) {
                found = true;
                break;
            }
            cur = c.backing().map(|e| e.node()).or_else(|| {
                c.driver()
                    .is_filter()
                    .then(|| c.primary_child().map(|e| e.node()))
                    .flatten()
            });
        }
        if !found {
            return Err(BlockError::generic(format!(
                "'{device}' and image file are not in the same chain"
            )));
        }
        // As QEMU's qmp_change_backing_file: a read-only image (an old active layer) is
        // reopened read-write for the header update, and read-only again afterwards.
        let changed = if image.is_read_only() {
            self.reopen_read_write(&image).map_err(|e| {
                BlockError::generic(format!(
                    "Could not change backing file to '{backing_file}': {e}"
                ))
            })?
        } else {
            Vec::new()
        };
        let fmt = image.backing().map(|b| b.node().driver_name().to_string());
        let r = {
            let _d = self.drain(std::slice::from_ref(&image));
            image
                .driver()
                .change_backing_file(Some(backing_file), fmt.as_deref())
                .map_err(|e| {
                    BlockError::generic(format!(
                        "Could not change backing file to '{backing_file}': {e}"
                    ))
                })
        };
        if changed.is_empty() {
            return r;
        }
        let restored = self.restore_read_only(&changed);
        r.and(restored)
    }
}

impl BlockGraph {
    /// `block_set_io_throttle`: sets (or, with all limits 0, removes) a backend's I/O
    /// limits; `group` moves it to another throttle group.
    pub fn set_io_throttle(&mut self, a: &BlockIOThrottle) -> Result<()> {
        use crate::throttle::{BucketLimit, ThrottleLimits};
        let be = self.get_blk(a.device.as_deref(), a.id.as_deref())?;
        if be.root_node().is_none() {
            return Err(BlockError::generic("Device has no medium"));
        }
        let b = |avg: i64, max: Option<i64>, len: Option<i64>| BucketLimit {
            avg: avg as u64,
            max: max.unwrap_or(0) as u64,
            burst_length: len.unwrap_or(1) as u64,
        };
        let limits = ThrottleLimits {
            bps_total: b(a.bps, a.bps_max, a.bps_max_length),
            bps_read: b(a.bps_rd, a.bps_rd_max, a.bps_rd_max_length),
            bps_write: b(a.bps_wr, a.bps_wr_max, a.bps_wr_max_length),
            iops_total: b(a.iops, a.iops_max, a.iops_max_length),
            iops_read: b(a.iops_rd, a.iops_rd_max, a.iops_rd_max_length),
            iops_write: b(a.iops_wr, a.iops_wr_max, a.iops_wr_max_length),
            iops_size: a.iops_size.unwrap_or(0) as u64,
            group: String::new(),
        };
        limits.validate()?;
        if !limits.enabled() {
            be.set_throttle_group(None);
            return Ok(());
        }
        let name = match (be.throttle_group(), &a.group) {
            (_, Some(g)) => g.clone(),
            (Some(cur), None) => cur.name().to_string(),
            (None, None) => a
                .device
                .clone()
                .or_else(|| a.id.clone())
                .unwrap_or_default(),
        };
        let g = self.throttle_groups.get_or_create(&name, limits);
        be.set_throttle_group(Some(g));
        Ok(())
    }
}

impl BlockGraph {
    /// `x-blockdev-change`: adds `node` as a new child of `parent`, or removes `parent`'s
    /// child named `child` (quorum).
    pub fn x_blockdev_change(
        &mut self,
        parent: &str,
        child: Option<&str>,
        node: Option<&str>,
    ) -> Result<()> {
        let p = self.lookup_either(parent)?;
        match (child, node) {
            (Some(_), Some(_)) => {
                return Err(BlockError::generic(
                    "The parameters child and node are in conflict",
                ))
            }
            (None, None) => {
                return Err(BlockError::generic(
                    "Either child or node must be specified",
                ))
            }
            _ => {}
        }
        let pname = self.device_or_node_name(&p);
        if let Some(c) = child {
            let Some(e) = p.child(c) else {
                return Err(BlockError::generic(format!(
                    "Node '{parent}' does not have child '{c}'"
                )));
            };
            if !p.driver().supports_child_change() {
                return Err(BlockError::generic(format!(
                    "The node {pname} does not support removing a child"
                )));
            }
            let _d = self.drain(std::slice::from_ref(&p));
            p.driver().del_child(c)?;
            crate::node::wlock(&p.children).retain(|x| !Arc::ptr_eq(x, &e));
            drop(e);
            self.prune();
            return self.refresh_perms();
        }
        let n = node.expect("checked");
        let Some(nb) = self.find_node(n) else {
            return Err(BlockError::generic(format!("Node '{n}' not found")));
        };
        if !p.driver().supports_child_change() {
            return Err(BlockError::generic(format!(
                "The node {pname} does not support adding a child"
            )));
        }
        if !nb.parents().is_empty() {
            return Err(BlockError::generic(format!(
                "The node {} already has a parent",
                nb.name()
            )));
        }
        let name = p.driver().next_child_name()?;
        let _d = self.drain(std::slice::from_ref(&p));
        let e = crate::node::Edge::new(
            &name,
            crate::perm::ChildRole::Replica,
            nb,
            Perm::NONE,
            Perm::ALL,
        );
        e.set_parent(Parent::Node(Arc::downgrade(&p)));
        crate::node::wlock(&p.children).push(e.clone());
        let undo = |g: &mut BlockGraph, e: &Arc<crate::node::Edge>| {
            crate::node::wlock(&p.children).retain(|x| !Arc::ptr_eq(x, e));
            let _ = g.refresh_perms();
        };
        if let Err(err) = self.refresh_perms() {
            undo(self, &e);
            return Err(err);
        }
        if let Err(err) = p.driver().add_child(e.clone()) {
            undo(self, &e);
            return Err(err);
        }
        Ok(())
    }
}

/// The node whose format takes internal snapshots: the node itself, or below filters.
fn snapshot_format_node(n: &Arc<Node>) -> Arc<Node> {
    let mut cur = n.clone();
    while cur.driver().is_filter() {
        match cur.primary_child() {
            Some(c) => cur = c.node(),
            None => break,
        }
    }
    cur
}

/// Creates an image file (`qcow2` or `raw`) of `size` bytes, optionally backed.
pub fn create_image(
    path: &str,
    format: &str,
    size: u64,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    match format {
        "qcow2" => {
            let mut o = ::qcow2::CreateOptions::new(size);
            if let Some((b, f)) = backing {
                if !b.is_empty() {
                    o.backing_file = Some(b.to_string());
                    o.backing_format = Some(f.to_string());
                }
            }
            ::qcow2::Qcow2::create_path(path, &o)
                .map_err(|e| BlockError::from(e).prepend(&format!("Could not create '{path}'")))
        }
        "raw" => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| BlockError::from(e).prepend(&format!("Could not create '{path}'")))?;
            f.set_len(size).map_err(BlockError::from)?;
            Ok(())
        }
        other => Err(BlockError::generic(format!(
            "Driver '{other}' does not support image creation"
        ))),
    }
}
