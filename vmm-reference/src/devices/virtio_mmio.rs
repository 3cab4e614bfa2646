//! The virtio-mmio transport (virtio 1.x, section 4.2, version 2) for the
//! virtio-blk engine: the register file, feature negotiation, queue setup,
//! and notifications processed right where they arrive (on the vCPU thread
//! that wrote QueueNotify), with the interrupt raised through an irqfd.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::virtio_blk::{BlkEngine, Served};

/// Size of one device's register window.
pub const WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register in the window.
pub const NOTIFY_OFFSET: u64 = 0x050;
/// Entries per virtqueue the device allows.
pub const QUEUE_MAX: u16 = 256;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const DEVICE_BLOCK: u32 = 2;
const VENDOR: u32 = 0x554d_4551; // "QEMU", as QEMU's devices report
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FEATURES_OK: u32 = 0x08;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// One virtio-blk device on the MMIO bus.
pub struct VirtioMmioBlk {
    engine: BlkEngine,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl VirtioMmioBlk {
    /// A device over `engine` with `queues` request queues.
    pub fn new(engine: BlkEngine, mem: GuestMemoryMmap, irq: EventFd, queues: u16) -> Self {
        let queues = (0..queues.max(1))
            .map(|_| Queue::new(QUEUE_MAX).expect("QUEUE_MAX is a valid queue size"))
            .collect();
        VirtioMmioBlk {
            engine,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    fn features(&self) -> u64 {
        self.engine.features(self.queues.len() as u16)
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.engine.reset();
        self.status = 0;
        self.interrupt_status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    /// A read of the register window at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let cfg = self.engine.config_space(self.queues.len() as u16);
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get((offset - 0x100) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => DEVICE_BLOCK,
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A write to the register window at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // The block config space is read-only for the driver here.
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                let offered = self.features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
                self.driver_features &= offered;
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => self.notify(v),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    // FEATURES_OK only sticks when the driver accepted VERSION_1.
                    let mut v = v;
                    if v & STATUS_FEATURES_OK != 0
                        && self.driver_features & super::virtio_blk::features::VERSION_1 == 0
                    {
                        v &= !STATUS_FEATURES_OK;
                    }
                    self.status = v;
                }
            }
            0x080 => self.queue_addr(|q, lo| q.set_desc_table_address(Some(lo), None), v),
            0x084 => self.queue_addr(|q, hi| q.set_desc_table_address(None, Some(hi)), v),
            0x090 => self.queue_addr(|q, lo| q.set_avail_ring_address(Some(lo), None), v),
            0x094 => self.queue_addr(|q, hi| q.set_avail_ring_address(None, Some(hi)), v),
            0x0a0 => self.queue_addr(|q, lo| q.set_used_ring_address(Some(lo), None), v),
            0x0a4 => self.queue_addr(|q, hi| q.set_used_ring_address(None, Some(hi)), v),
            _ => {}
        }
    }

    fn queue_addr(&mut self, set: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.queue() {
            set(q, v);
        }
    }

    /// The VM resumes: every queue is served (QEMU kicks them all when a
    /// stopped VM runs again), since notifications that came while it was
    /// stopped were only taken note of; a queue holding a request kept by
    /// the `stop` error policy is served again, the kept request first.
    pub fn restart_queues(&mut self) {
        self.engine.take_held();
        for q in 0..self.queues.len() {
            self.notify(q as u32);
        }
    }

    /// QueueNotify: processes the queue's requests on the calling thread
    /// (the vCPU that wrote the register, or the main loop woken by the
    /// queue's ioeventfd) and interrupts the driver when it asks for it.
    pub fn notify(&mut self, index: u32) {
        if self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(index as usize) else {
            return;
        };
        match self.engine.serve(index as u16, q, &self.mem) {
            Served::Idle => {}
            Served::Interrupt => {
                self.interrupt_status |= INT_VRING;
                let _ = self.irq.write(1);
            }
            Served::Broken => {
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt_status |= INT_CONFIG;
                self.config_generation = self.config_generation.wrapping_add(1);
                let _ = self.irq.write(1);
            }
        }
    }
}

impl super::QueueNotify for VirtioMmioBlk {
    fn notify(&mut self, queue: u32) {
        VirtioMmioBlk::notify(self, queue)
    }
}

/// A device on the MMIO bus, shared by the vCPU threads.
pub type SharedMmioDevice = Arc<std::sync::Mutex<VirtioMmioBlk>>;

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn r32(d: &mut VirtioMmioBlk, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(d: &mut VirtioMmioBlk, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    #[test]
    fn a_driver_negotiates_sets_up_a_queue_and_gets_its_request_done() {
        let dir = tempfile::tempdir().unwrap();
        let (_g, be) = crate::devices::virtio_blk::tests::disk_filled(dir.path(), 0x11);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = VirtioMmioBlk::new(
            BlkEngine::new(be, false, "vd0"),
            mem.clone(),
            irq.try_clone().unwrap(),
            2,
        );
        assert_eq!(
            (r32(&mut d, 0), r32(&mut d, 4), r32(&mut d, 8)),
            (MAGIC, 2, 2)
        );
        let mut cap = [0u8; 8];
        d.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        w32(&mut d, 0x014, 1);
        assert_eq!(r32(&mut d, 0x010) & 1, 1, "VERSION_1 offered");
        // The driver accepts VERSION_1 and FLUSH, then FEATURES_OK.
        w32(&mut d, 0x024, 1);
        w32(&mut d, 0x020, 1);
        w32(&mut d, 0x024, 0);
        w32(&mut d, 0x020, 1 << 9);
        w32(&mut d, 0x070, 1 | 2 | STATUS_FEATURES_OK);
        assert_eq!(r32(&mut d, 0x070) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        // Queue 0 at the mock's rings.
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        w32(&mut d, 0x030, 0);
        assert_eq!(r32(&mut d, 0x034), u32::from(QUEUE_MAX));
        w32(&mut d, 0x038, 16);
        w32(&mut d, 0x080, mock.desc_table_addr().0 as u32);
        w32(&mut d, 0x090, mock.avail_addr().0 as u32);
        w32(&mut d, 0x0a0, mock.used_addr().0 as u32);
        w32(&mut d, 0x044, 1);
        w32(&mut d, 0x070, 1 | 2 | STATUS_FEATURES_OK | 4);
        // A read of sector 0 into 0x20_0000.
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&0u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, 1, 1)),
            RawDescriptor::from(Descriptor::new(0x20_0000, 512, 1 | 2, 2)),
            RawDescriptor::from(Descriptor::new(0x30_0000, 1, 2, 0)),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        w32(&mut d, 0x050, 0);
        assert_eq!(mock.used().idx().load(), 1, "one request completed");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0x11);
        assert_eq!(r32(&mut d, 0x060) & INT_VRING, INT_VRING);
        assert_eq!(irq.read().unwrap(), 1, "the irqfd fired");
        w32(&mut d, 0x064, INT_VRING);
        assert_eq!(r32(&mut d, 0x060), 0);
        // Reset by writing 0 to Status.
        w32(&mut d, 0x070, 0);
        assert_eq!(r32(&mut d, 0x044), 0);
    }
}
