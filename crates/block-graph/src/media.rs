//! Removable media: trays, inserting and removing media, `eject`, `blockdev-change-medium`
//! (QEMU's blockdev.c semantics and messages).

use std::sync::Arc;

use qapi_types::{BlockdevChangeReadOnlyMode, BlockdevOptions, QapiType};

use crate::backend::BlockBackend;
use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::node::Node;
use crate::options::Inherit;

impl BlockGraph {
    /// QEMU's `qmp_get_blk`: the backend named `device`, or the one of guest device `id`.
    pub fn get_blk(&self, device: Option<&str>, id: Option<&str>) -> Result<Arc<BlockBackend>> {
        match (device, id) {
            (Some(d), None) => self
                .find_backend(d)
                .ok_or_else(|| BlockError::not_found(format!("Device '{d}' not found"))),
            (None, Some(i)) => {
                let be = self
                    .backends
                    .iter()
                    .find(|b| b.device().is_some_and(|dev| dev.id == i))
                    .cloned();
                be.ok_or_else(|| BlockError::not_found(format!("Device '{i}' not found")))
            }
            _ => Err(BlockError::generic("Need exactly one of 'device' and 'id'")),
        }
    }

    /// Opens the tray; `Ok(false)` when the device has no tray (nothing to do).
    fn do_open_tray(
        &mut self,
        device: Option<&str>,
        id: Option<&str>,
        force: bool,
    ) -> Result<bool> {
        let be = self.get_blk(device, id)?;
        let name = device.or(id).unwrap_or("");
        if !be.is_removable() {
            return Err(BlockError::generic(format!(
                "Device '{name}' is not removable"
            )));
        }
        if !be.has_tray() {
            return Ok(false);
        }
        if be.is_tray_open() {
            return Ok(true);
        }
        let locked = be.is_locked();
        if locked {
            be.request_eject();
        }
        if !locked || force {
            be.set_tray(true);
        }
        if locked && !force {
            return Err(BlockError::generic(format!(
                "Device '{name}' is locked and force was not specified, wait for tray to open \
                 and try again"
            )));
        }
        Ok(true)
    }

    /// `blockdev-open-tray`.
    pub fn open_tray(&mut self, device: Option<&str>, id: Option<&str>, force: bool) -> Result<()> {
        self.do_open_tray(device, id, force).map(|_| ())
    }

    /// `blockdev-close-tray`.
    pub fn close_tray(&mut self, device: Option<&str>, id: Option<&str>) -> Result<()> {
        let be = self.get_blk(device, id)?;
        let name = device.or(id).unwrap_or("");
        if !be.is_removable() {
            return Err(BlockError::generic(format!(
                "Device '{name}' is not removable"
            )));
        }
        if !be.has_tray() || !be.is_tray_open() {
            return Ok(());
        }
        be.set_tray(false);
        Ok(())
    }

    /// `blockdev-remove-medium` (and `x-blockdev-remove-medium`).
    pub fn remove_medium(&mut self, device: Option<&str>, id: Option<&str>) -> Result<()> {
        let be = self.get_blk(device, id)?;
        let name = device.or(id).unwrap_or("");
        let has_dev = be.device().is_some();
        if has_dev && !be.is_removable() {
            return Err(BlockError::generic(format!(
                "Device '{name}' is not removable"
            )));
        }
        if has_dev && be.has_tray() && !be.is_tray_open() {
            return Err(BlockError::generic(format!(
                "Tray of device '{name}' is not open"
            )));
        }
        let Some(root) = be.root_node() else {
            return Ok(());
        };
        self.check_op_blockers(&root)?;
        self.remove_medium_node(&be);
        self.prune();
        Ok(())
    }

    fn insert_anon_medium(&mut self, be: &Arc<BlockBackend>, node: &Arc<Node>) -> Result<()> {
        let has_dev = be.device().is_some();
        if has_dev && !be.is_removable() {
            return Err(BlockError::generic("Device is not removable"));
        }
        if has_dev && be.has_tray() && !be.is_tray_open() {
            return Err(BlockError::generic("Tray of the device is not open"));
        }
        if be.root_node().is_some() {
            return Err(BlockError::generic(
                "There already is a medium in the device",
            ));
        }
        self.insert_medium_node(be, node)
    }

    /// `blockdev-insert-medium` (and `x-blockdev-insert-medium`).
    pub fn insert_medium(
        &mut self,
        device: Option<&str>,
        id: Option<&str>,
        node_name: &str,
    ) -> Result<()> {
        let be = self.get_blk(device, id)?;
        let Some(node) = self.find_node(node_name) else {
            return Err(BlockError::generic(format!("Node '{node_name}' not found")));
        };
        if self.backend_of(&node).is_some() {
            return Err(BlockError::generic(format!(
                "Node '{node_name}' is already in use"
            )));
        }
        self.insert_anon_medium(&be, &node)
    }

    /// `eject`: opens the tray and removes the medium.
    pub fn eject(&mut self, device: Option<&str>, id: Option<&str>, force: bool) -> Result<()> {
        self.do_open_tray(device, id, force)?;
        self.remove_medium(device, id)
    }

    /// `blockdev-change-medium` (and `change` for block devices): opens `filename` as the
    /// new medium and swaps it in (open tray, remove, insert, close tray).
    pub fn change_medium(
        &mut self,
        device: Option<&str>,
        id: Option<&str>,
        filename: &str,
        format: Option<&str>,
        force: bool,
        mode: BlockdevChangeReadOnlyMode,
    ) -> Result<()> {
        let be = self.get_blk(device, id)?;
        let read_only = match mode {
            BlockdevChangeReadOnlyMode::ReadOnly => true,
            BlockdevChangeReadOnlyMode::ReadWrite => false,
            BlockdevChangeReadOnlyMode::Retain => be.read_only_hint(),
            BlockdevChangeReadOnlyMode::Unrecognized(s) => {
                return Err(BlockError::generic(format!(
                    "Parameter 'read-only-mode' does not accept value '{s}'"
                )))
            }
        };
        let detect_zeroes = be
            .root_node()
            .is_some_and(|n| n.options().detect_zeroes != crate::node::DetectZeroes::Off);
        let fmt = match format {
            Some(f) => f.to_string(),
            None => crate::drivers::probe_format(filename)?.to_string(),
        };
        let v = serde_json::json!({
            "driver": fmt,
            "file": {"driver": "file", "filename": filename},
            "read-only": read_only,
            "detect-zeroes": if detect_zeroes { "on" } else { "off" },
        });
        let o =
            BlockdevOptions::from_qmp_strict(v).map_err(|e| BlockError::generic(e.to_string()))?;
        let medium = self.open_node(&o, &Inherit::top(), false)?;
        self.do_open_tray(device, id, force)?;
        self.remove_medium(device, id)?;
        self.insert_anon_medium(&be, &medium)?;
        be.set_read_only_hint(read_only);
        self.close_tray(device, id)
    }
}
