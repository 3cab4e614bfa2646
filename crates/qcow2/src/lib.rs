//! The qcow2 image format for Rust VMMs: open, create, read, write, check and repair images,
//! internal snapshots and persistent dirty bitmaps, interoperable with QEMU.
//!
//! The format layer answers "where does guest range `[off, off+len)` live?" with a
//! [`Mapping`]; a generic layer ([`Qcow2::read_at`], [`Qcow2::write_at`]) performs the data
//! I/O. Callers that do their own I/O (io_uring) use [`Qcow2::map`] and
//! [`Qcow2::prepare_write`]/[`Qcow2::commit_write`] directly.
#![deny(missing_docs)]

pub mod backing;
pub mod bitmap;
pub mod check;
mod compress;
mod create;
mod error;
pub mod events;
mod gate;
pub mod header;
mod hot;
mod image;
mod info;
mod l2;
mod refcount;
mod reopen;
mod small;
mod snapshot;
pub mod snapshot_table;
pub mod storage;
mod write;

pub use backing::{BlockRead, BlockStatus, DenyImplicitOpen, FollowFiles, ImageOpener, RawImage};
pub use bitmap::DirtyBitmap;
pub use create::{CreateOptions, Preallocation};
pub use error::{Error, Result};
pub use events::{
    DebugEvent, DebugEventCallback, DiscardPassing, FreeReason, FreedCallback, FreedRange,
};
pub use gate::IoGuard;
pub use header::{CompressionType, Header};
pub use image::{
    CorruptionCallback, CorruptionEvent, Mapping, MappingKind, OpenOptions, OverlapChecks, Qcow2,
};
pub use info::{BitmapInfo, ImageInfo, ImageInfoSpecificQCow2, SnapshotInfo};
pub use snapshot_table::Snapshot;
pub use storage::{AlignedBuf, FileStorage, MemStorage, Storage};
pub use write::WritePlan;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
