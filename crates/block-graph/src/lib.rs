//! QEMU's block layer for Rust VMMs: a graph of nodes (format, protocol and filter drivers)
//! under named BlockBackends, with QEMU's permission system, drained sections, atomic node
//! replacement, dirty bitmaps that see every write, per-backend accounting, and the QMP
//! handlers of the block commands.
//!
//! - [`BlockGraph`] owns the graph; it is changed on one thread (the monitor's) through
//!   `&mut`. [`BlockGraph::blockdev_add`] opens nodes from `qapi_types::BlockdevOptions`.
//! - [`BlockBackend`] is what a guest device uses: `&self` I/O methods callable from any
//!   thread, gated for drain; the device accounts its requests in the backend's
//!   [`stats::Stats`], as QEMU's devices do.
//! - [`Node`] and [`Edge`] are the graph; [`driver::BlockDriver`] is what a driver
//!   implements.
//!
//! ```
//! use block_graph::stats::AcctType;
//! use block_graph::{BlockGraph, DeviceAttach, WriteFlags};
//! use qapi_types::{BlockdevOptions, QapiType};
//! use serde_json::json;
//!
//! let mut g = BlockGraph::new();
//! let opts = BlockdevOptions::from_qmp_strict(
//!     json!({"driver": "null-co", "node-name": "n0", "size": 1048576, "read-zeroes": true}),
//! ).unwrap();
//! let node = g.blockdev_add(&opts).unwrap();
//! let be = g.create_backend("disk0", Some(&node), Default::default()).unwrap();
//! g.attach_device(&be, DeviceAttach {
//!     id: "virtio0".into(), read_only: false, share_rw: false,
//!     resizable: true, removable: false, has_tray: false,
//! }).unwrap();
//! be.write_buf(0, &[1u8; 512], WriteFlags::default()).unwrap();
//! // A guest device accounts its requests (QEMU's block_acct_*), here a read:
//! let mut buf = [9u8; 512];
//! be.stats().account(AcctType::Read, 512, || be.read_buf(0, &mut buf)).unwrap();
//! assert_eq!(buf, [0u8; 512]);
//! assert_eq!(be.stats().report(0).rd_operations, 1);
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod batch;
pub mod bitmap;
pub mod bitmap_ops;
pub mod cli;
pub mod copy_range;
pub mod driver;
pub mod drivers;
pub mod edge;
pub mod error;
pub mod events;
pub mod filename;
pub mod gate;
pub mod graph;
pub mod iov;
pub mod job_filter;
pub mod media;
pub mod node;
pub mod op_blockers;
pub mod ops;
pub mod options;
pub mod perm;
pub mod qmp;
pub mod reopen;
pub mod stats;
pub mod throttle;
pub mod transaction;

pub use backend::{BackendOptions, BlockBackend, DeviceAttach};
pub use bitmap::DirtyBitmap;
pub use cli::parse_blockdev_arg;
pub use driver::{BlockDriver, CopyExtent, WriteFlags, ZeroFlags};
pub use error::{BlockError, Result};
pub use graph::{BlockGraph, DrainGuard};
pub use node::{DrainParticipant, Edge, Node, NodeOptions, RangeStatus, RootInfo};
pub use op_blockers::OpBlockers;
pub use perm::{ChildRole, Perm};
pub use qmp::register;

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn types_cross_threads() {
        // I/O runs on any thread; the graph may live on the monitor's thread.
        send_sync::<crate::BlockBackend>();
        send_sync::<crate::Node>();
        send_sync::<crate::Edge>();
        send::<crate::BlockGraph>();
    }
}

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
