//! Emulated devices.

pub mod msix;
pub mod pci;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_pci;

/// A device whose virtqueues the main loop serves when their ioeventfd fires.
pub trait QueueNotify: Send {
    /// The driver notified queue `queue`.
    fn notify(&mut self, queue: u32);
}
