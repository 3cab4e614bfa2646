//! Accessors of the open image: size, geometry, header, backing image, state flags, storage,
//! snapshots, and the range check and I/O guard every request starts with.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backing::BlockRead;
use crate::error::{Error, Result};
use crate::gate::IoGuard;
use crate::header::Header;
use crate::image::{lock, Qcow2};
use crate::l2::OFLAG_COPIED;
use crate::snapshot_table::Snapshot;
use crate::storage::Storage;

impl Qcow2 {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cs()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        lock(&self.header).clone()
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<Arc<dyn BlockRead>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether writes are refused (opened read-only, or made read-only by corruption).
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Whether the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The image file's storage.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The storage holding guest data (the image file or the external data file).
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.data
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Enters the I/O gate: hold the guard while using mappings from [`Qcow2::map`], so that
    /// the host clusters they name are not freed and reused meanwhile.
    pub fn io_guard(&self) -> IoGuard<'_> {
        self.gate.enter()
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        lock(&self.snapshots).clone()
    }

    pub(crate) fn l1_entry_copied(e: u64) -> bool {
        e & OFLAG_COPIED != 0
    }
}
