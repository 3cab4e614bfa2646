//! The driver API: what a block driver (a format like `qcow2`, a protocol like `file`, a
//! filter like `raw`) implements to become a node of the graph.
//!
//! # How a request reaches a driver
//!
//! A user (a guest device, a job) holds a [`crate::BlockBackend`] or another root. Its request
//! enters the graph at the root node and goes down the edges: each node's generic layer
//! ([`crate::Node`]) checks the request, tracks it for drain, zero-fills reads past the end,
//! applies `detect-zeroes` and `discard=ignore`, sets dirty bitmaps and the write threshold,
//! and then calls the driver. The driver does its own work and sends requests to its children
//! through their [`Edge`]s (never to a node directly: the edge carries the permissions, and
//! the graph may replace the node behind it while the subtree is drained).
//!
//! Requests run on the caller's thread, from many threads at once: every method takes
//! `&self`, and drivers keep their state behind their own fine-grained locks (or none).
//!
//! # Writing a driver
//!
//! 1. Implement [`BlockDriver`] for your state. Only `format_name`, `length`, `read`, `write`
//!    and `flush` are required; the rest have defaults that either do the generic thing
//!    (`write_zeroes` writes zero buffers, `block_status` says "all data") or refuse with
//!    `ENOTSUP`.
//! 2. Write an open function `fn(&mut OpenCtx<'_>, &BlockdevOptions) -> Result<Box<dyn
//!    BlockDriver>>`. Take your driver's branch out of the options, open your children with
//!    [`crate::drivers::OpenCtx::open_child`] (they may be inline definitions or references to existing
//!    nodes), and check every option: an invalid one is an error in QEMU's words, never a
//!    silent default.
//! 3. Register it in `open_driver` (`src/drivers/mod.rs`) under the `BlockdevDriver` value.
//!
//! See `CONTRIBUTING.md` of this crate for a complete example.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::node::Edge;
use crate::perm::{default_child_perm, ChildRole, Perm};

/// Flags of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the request completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The driver may deallocate the range instead of writing zeros, as long as it reads as
    /// zero afterwards.
    pub may_unmap: bool,
    /// Force unit access.
    pub fua: bool,
}

/// Where a range lives, as a driver reports it for its own node.
#[derive(Debug, Clone)]
pub enum StatusKind {
    /// Data allocated in this node; `offset` is its position in the child `file` (or
    /// `data-file`) when it is stored there as is.
    Data {
        /// Host offset in the data child, when the data is stored there unchanged.
        offset: Option<u64>,
    },
    /// Allocated in this node and reads as zero; `offset` as for `Data` (QEMU's
    /// `BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID`: file holes, preallocated zero clusters).
    Zero {
        /// Host offset in the data child (protocols: in the host file), when known.
        offset: Option<u64>,
    },
    /// Not allocated in this node: reads fall through to the backing node (zeros without
    /// one).
    Unallocated,
    /// The node only passes the range through (a filter): ask `child` at `offset`.
    Delegate {
        /// The child that holds the data.
        child: Arc<Edge>,
        /// Offset in the child.
        offset: u64,
    },
}

/// The status of a prefix of the queried range.
#[derive(Debug, Clone)]
pub struct DriverStatus {
    /// Bytes from the queried offset with this status (at least 1, at most the query).
    pub len: u64,
    /// What they are.
    pub kind: StatusKind,
}

impl DriverStatus {
    /// The whole queried range of `len` bytes passes through to `child` at `offset` (what
    /// a filter answers).
    pub fn delegate(child: &Arc<Edge>, offset: u64, len: u64) -> DriverStatus {
        DriverStatus {
            len,
            kind: StatusKind::Delegate {
                child: child.clone(),
                offset,
            },
        }
    }
}

/// What a node reports about its image for `query-named-block-nodes` and `query-block`
/// (QEMU's `ImageInfo`, minus what the generic layer fills in).
#[derive(Debug, Clone, Default)]
pub struct DriverImageInfo {
    /// Cluster size of the format, if it has one.
    pub cluster_size: Option<u64>,
    /// The format's dirty flag (qcow2 lazy refcounts).
    pub dirty_flag: Option<bool>,
    /// Backing file name as recorded in the image.
    pub backing_filename: Option<String>,
    /// Backing file format as recorded in the image.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<qapi_types::SnapshotInfo>,
    /// Format-specific information.
    pub format_specific: Option<qapi_types::ImageInfoSpecific>,
}

/// A block driver: the code behind one node. See the [module documentation](self).
pub trait BlockDriver: Send + Sync {
    /// The driver name as `BlockdevDriver` spells it (`qcow2`, `file`, ...).
    fn format_name(&self) -> &'static str;

    /// Whether the driver is a protocol (talks to host storage, has no `file` child).
    fn is_protocol(&self) -> bool {
        false
    }

    /// Whether the driver is a filter: the node's data is exactly its filtered child's
    /// (QEMU skips implicitly created filters in `query-block`).
    fn is_filter(&self) -> bool {
        false
    }

    /// The length of the node in bytes.
    fn length(&self) -> Result<u64>;

    /// Reads `iov.len()` bytes at `offset`. The generic layer guarantees
    /// `offset + len <= length()`.
    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()>;

    /// Writes at `offset`. A write may extend a protocol node (the edge must hold
    /// [`Perm::RESIZE`]); formats refuse writes past their end.
    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zero. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write(
                offset + done,
                &[IoSlice::new(&chunk[..n])],
                WriteFlags { fua: flags.fua },
            )?;
            done += n as u64;
        }
        Ok(())
    }

    /// Runs a batch of reads and writes (see [`crate::batch`]): sets `result` of every
    /// request whose `result` is `None`. The generic layer guarantees each pending read
    /// lies inside `length()`. Drivers that can have many requests in flight at once
    /// override it; the default runs them one after the other.
    fn submit_batch(&self, reqs: &mut [crate::batch::BatchReq<'_>]) {
        crate::batch::run_each(self, reqs)
    }

    /// Hints that `[offset, offset + len)` is unused. The default ignores the hint.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Makes every completed write durable, including those the driver sent to its
    /// children (flush them too).
    fn flush(&self) -> Result<()>;

    /// Allocation status of a prefix of `[offset, offset + len)` within this node. The
    /// default says "data", which is always correct, merely pessimistic.
    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        let _ = offset;
        Ok(DriverStatus {
            len,
            kind: StatusKind::Data { offset: None },
        })
    }

    /// Changes the length (`block_resize`). The default refuses.
    fn truncate(&self, _len: u64) -> Result<()> {
        Err(BlockError::generic(
            "Image format driver does not support resize",
        ))
    }

    /// The permissions this node takes on a child in `role`, given what the node's own
    /// parents need (`perm`) and share (`shared`). Override only when the defaults (QEMU's
    /// `bdrv_default_perms`) do not fit.
    fn child_perm(
        &self,
        role: ChildRole,
        perm: Perm,
        shared: Perm,
        writable: bool,
    ) -> (Perm, Perm) {
        default_child_perm(role, perm, shared, writable)
    }

    /// Checks that the node's users may have `perm` and share only `shared` as far as the
    /// outside world is concerned (the `file` driver checks the locks other processes
    /// hold). Called while the graph checks a change; nothing may change yet.
    fn check_perm(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
    }

    /// Makes `perm`/`shared` the node's permissions (the `file` driver takes the matching
    /// locks). Called once a change is final.
    fn set_perm(&self, _perm: Perm, _shared: Perm) {}

    /// The host file name for protocol drivers (`/path/img`, `null-co://`). Formats and
    /// filters return `None` and show their primary child's name.
    fn filename(&self) -> Option<String> {
        None
    }

    /// The options that change what the node's data is (QEMU's strong runtime options:
    /// raw's `offset` and `size`, null's `size`, ...), for `json:` file names.
    fn strong_options(&self) -> Vec<(&'static str, serde_json::Value)> {
        Vec::new()
    }

    /// Host bytes allocated, for `actual-size` (`None`: ask the primary child).
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// Image details for `query-named-block-nodes`.
    fn image_info(&self) -> DriverImageInfo {
        DriverImageInfo::default()
    }

    /// The backing file recorded in the image (name, format), which the graph opens when
    /// the options do not say otherwise.
    fn backing_file(&self) -> Option<(String, Option<String>)> {
        None
    }

    /// Whether the format can have a backing node.
    fn supports_backing(&self) -> bool {
        false
    }

    /// Rewrites the backing file name recorded in the image (`change-backing-file`,
    /// snapshots). The default refuses.
    fn change_backing_file(&self, _name: Option<&str>, _format: Option<&str>) -> Result<()> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Internal snapshots: creates one (`blockdev-snapshot-internal-sync`).
    fn snapshot_create(&self, _name: &str) -> Result<qapi_types::SnapshotInfo> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Internal snapshots: finds one by id and/or name.
    fn snapshot_find(
        &self,
        _id: Option<&str>,
        _name: Option<&str>,
    ) -> Option<qapi_types::SnapshotInfo> {
        None
    }

    /// Internal snapshots: deletes the one with this id (exact).
    fn snapshot_delete(&self, _id: &str) -> Result<()> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Internal snapshots: reverts the image to the snapshot with this id or, failing
    /// that, this name (QEMU's `bdrv_snapshot_goto`, `qemu-img snapshot -a`). Call it
    /// through [`crate::drivers::snapshot_goto`], which checks the node first. Drivers whose
    /// only data child is their primary child forward it there (QEMU's fallback child);
    /// the default refuses with QEMU's words.
    fn snapshot_goto(&self, _id_or_name: &str) -> Result<()> {
        Err(BlockError::io(
            libc::ENOTSUP,
            "Block driver does not support snapshots",
        ))
    }

    /// Whether the format stores persistent dirty bitmaps.
    fn supports_persistent_bitmaps(&self) -> bool {
        false
    }

    /// Persistent bitmaps found in the image when it was opened: (name, granularity, bits,
    /// in-use flag), loaded into the node's bitmaps by the graph.
    fn load_bitmaps(&self) -> Result<Vec<crate::bitmap::StoredBitmap>> {
        Ok(Vec::new())
    }

    /// Stores a persistent bitmap (on close, or when it is created).
    fn store_bitmap(&self, _bm: &crate::bitmap::StoredBitmap) -> Result<()> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Removes a persistent bitmap from the image.
    fn remove_bitmap(&self, _name: &str) -> Result<()> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Prepares for read-only use: writes everything cached so that nothing needs writing
    /// later (the node was flushed just before). The default does nothing.
    fn reopen_read_only(&self) -> Result<()> {
        Ok(())
    }

    /// Prepares for read-write use after a read-only phase (QEMU's reopen with
    /// `read-only=off`): the `file` driver reopens its descriptor for writing, formats accept
    /// writes again. Called children first, with the node drained; the default does nothing
    /// (drivers without state of their own).
    fn reopen_read_write(&self) -> Result<()> {
        Ok(())
    }

    /// Writes one full cluster compressed at the cluster-aligned `offset` (backup's
    /// `compress`). The default refuses.
    fn write_compressed(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(BlockError::io(
            libc::ENOTSUP,
            "Compression is not supported for this drive",
        ))
    }

    /// The driver as `Any`, for users that need the concrete driver of a node (a backup
    /// job finds its copy-before-write filter's state). The default is `None`.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Whether children can be added and removed at run time (`x-blockdev-change`).
    fn supports_child_change(&self) -> bool {
        false
    }

    /// The name the next added child gets (`children.N`), or why none can be added.
    fn next_child_name(&self) -> Result<String> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Takes a new child (already attached by the graph, permissions checked).
    fn add_child(&self, _e: Arc<Edge>) -> Result<()> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// Lets go of the child named `name` (the graph detaches it afterwards).
    fn del_child(&self, _name: &str) -> Result<()> {
        Err(BlockError::io(libc::ENOTSUP, "Operation not supported"))
    }

    /// An event a parent raises at this node (QEMU's `bdrv_debug_event`): only `blkdebug`
    /// reacts to them. The default ignores them.
    fn debug_event(&self, _ev: &qapi_types::BlkdebugEvent) {}

    /// Closes the driver: writes cached state (the graph calls it when the node goes away,
    /// after the node's persistent bitmaps were stored).
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Copy offload, source side (QEMU's `bdrv_co_copy_range_from`): finds where the data
    /// of `[offset, offset + len)` lives in a host file, for as many bytes from `offset` as
    /// are contiguous there, and hands that extent to `to` (the target side) while the
    /// mapping is held valid. Returns the bytes copied from `offset`: 0 when the kernel
    /// cannot copy them (zeros, compressed clusters, `O_DIRECT`, drivers
    /// without the support: the default). See [`crate::copy_range`].
    fn copy_range_from(
        &self,
        _offset: u64,
        _len: u64,
        _to: &mut dyn FnMut(&CopyExtent) -> Result<()>,
    ) -> Result<u64> {
        Ok(0)
    }

    /// Whether [`BlockDriver::copy_range_to`] can be called (the default: no).
    fn can_copy_range_to(&self) -> bool {
        false
    }

    /// Copy offload, target side (QEMU's `bdrv_co_copy_range_to`): writes the whole of
    /// `src` at `offset`, or fails. The default refuses with `ENOTSUP`.
    fn copy_range_to(&self, _offset: u64, _src: &CopyExtent) -> Result<()> {
        Err(BlockError::errno(libc::ENOTSUP))
    }
}

/// A range of a host file that a copy offload reads (see
/// [`BlockDriver::copy_range_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyExtent {
    /// The file's descriptor, valid while the node that returned it stays open.
    pub fd: std::os::fd::RawFd,
    /// Offset of the range in the file.
    pub offset: u64,
    /// Length of the range in bytes.
    pub len: u64,
}
