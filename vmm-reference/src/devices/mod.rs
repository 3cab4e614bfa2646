//! Emulated devices.

pub mod virtio_blk;
pub mod virtio_mmio;
