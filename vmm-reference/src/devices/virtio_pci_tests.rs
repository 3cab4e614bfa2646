//! A synthetic virtio-pci driver in Rust, talking to the device through
//! the PCI bus (configuration ports and BAR accesses) the way Linux's
//! virtio_pci_modern does: find the function, walk its capabilities,
//! negotiate, set up a queue, use MSI-X or INTx, and survive a hostile queue.

use std::sync::{Arc, Mutex};

use block_graph::BlockGraph;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::msix::tests::FakeHooks;
use crate::devices::pci::{PciBus, CONFIG_ADDRESS, CONFIG_DATA};

const SLOT: u32 = 3;
const BAR: u32 = 0xc003_0000;

struct Driver {
    bus: PciBus,
    dev: Arc<Mutex<VirtioPciBlk>>,
    hooks: Arc<FakeHooks>,
    intx: EventFd,
    mem: GuestMemoryMmap,
    _graph: BlockGraph,
    _dir: tempfile::TempDir,
}

impl Driver {
    fn new(ioeventfds: usize) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let (g, be) = crate::devices::virtio_blk::tests::disk_filled(dir.path(), 0x11);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let hooks = Arc::new(FakeHooks::default());
        let intx = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let place = PciPlacement {
            bar: BAR,
            intx_line: 10,
            intx: intx.try_clone().unwrap(),
            notifiers: (0..ioeventfds)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
        };
        let dev = VirtioPciBlk::new(
            BlkEngine::new(be, false, "vd0"),
            mem.clone(),
            2,
            place,
            hooks.clone(),
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let bus = PciBus::new();
        bus.insert(SLOT as usize, dev.clone()).unwrap();
        Driver {
            bus,
            dev,
            hooks,
            intx,
            mem,
            _graph: g,
            _dir: dir,
        }
    }

    fn cfg_read(&self, reg: u32) -> u32 {
        self.bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | SLOT << 11 | (reg & 0xfc)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        self.bus.pio_read(CONFIG_DATA, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg_write16(&self, reg: u32, v: u16) {
        self.bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | SLOT << 11 | (reg & 0xfc)).to_le_bytes(),
        );
        self.bus
            .pio_write(CONFIG_DATA + (reg & 3) as u16, &v.to_le_bytes());
    }

    fn cfg_write32(&self, reg: u32, v: u32) {
        self.bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | SLOT << 11 | reg).to_le_bytes(),
        );
        self.bus.pio_write(CONFIG_DATA, &v.to_le_bytes());
    }

    /// Walks the capability list: (id, offset) pairs.
    fn caps(&self) -> Vec<(u8, u32)> {
        let mut out = Vec::new();
        let mut at = self.cfg_read(0x34) & 0xfc;
        while at != 0 && out.len() < 48 {
            let head = self.cfg_read(at);
            out.push((head as u8, at));
            at = (head >> 8) & 0xfc;
        }
        out
    }

    /// The BAR offset of the virtio structure of `cfg_type`.
    fn virtio_offset(&self, cfg_type: u8) -> u64 {
        let (_, at) = self
            .caps()
            .into_iter()
            .find(|&(id, at)| id == 9 && (self.cfg_read(at) >> 24) as u8 == cfg_type)
            .unwrap_or_else(|| panic!("no virtio capability of type {cfg_type}"));
        assert_eq!(self.cfg_read(at + 4) & 0xff, 0, "in BAR 0");
        u64::from(self.cfg_read(at + 8))
    }

    fn bar(&self) -> u64 {
        u64::from(self.cfg_read(0x10) & !0xf)
    }

    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.mmio_read(self.bar() + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    fn w(&self, off: u64, len: usize, v: u64) {
        assert!(self
            .bus
            .mmio_write(self.bar() + off, &v.to_le_bytes()[..len]));
    }
}

/// Negotiates VERSION_1 and sets up queue 0 on `mock`'s rings; returns the
/// common configuration's offset.
fn bring_up(d: &Driver, mock: &MockSplitQueue<'_, GuestMemoryMmap>, vector: Option<u16>) -> u64 {
    let common = d.virtio_offset(1);
    d.w(common + 0x14, 1, 0);
    d.w(common + 0x14, 1, 1 | 2);
    d.w(common, 4, 1);
    assert_eq!(d.r(common + 4, 4) & 1, 1, "VERSION_1 offered");
    d.w(common + 8, 4, 1);
    d.w(common + 0xc, 4, 1);
    d.w(common + 8, 4, 0);
    d.w(common + 0xc, 4, 1 << 9);
    d.w(common + 0x14, 1, 1 | 2 | 8);
    assert_eq!(d.r(common + 0x14, 1) & 8, 8, "FEATURES_OK");
    assert_eq!(d.r(common + 0x12, 2), 2, "num_queues");
    d.w(common + 0x16, 2, 0);
    assert_eq!(d.r(common + 0x18, 2), u64::from(QUEUE_MAX));
    d.w(common + 0x18, 2, 16);
    if let Some(v) = vector {
        d.w(common + 0x1a, 2, u64::from(v));
        assert_eq!(d.r(common + 0x1a, 2), u64::from(v));
    }
    // 64-bit fields in two 32-bit halves, as Linux writes them.
    for (field, addr) in [
        (0x20, mock.desc_table_addr().0),
        (0x28, mock.avail_addr().0),
        (0x30, mock.used_addr().0),
    ] {
        d.w(common + field, 4, addr & 0xffff_ffff);
        d.w(common + field + 4, 4, addr >> 32);
        assert_eq!(d.r(common + field, 8), addr);
    }
    d.w(common + 0x1c, 2, 1);
    d.w(common + 0x14, 1, 1 | 2 | 8 | 4);
    common
}

/// Queues a read of sector 0 into 0x20_0000.
fn queue_read(d: &Driver, mock: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16) {
    let h = [0u8; 16];
    d.mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(0x10_0000, 16, 1, first + 1)),
        RawDescriptor::from(Descriptor::new(0x20_0000, 512, 1 | 2, first + 2)),
        RawDescriptor::from(Descriptor::new(0x30_0000, 1, 2, 0)),
    ];
    mock.add_desc_chains(&descs, first).unwrap();
}

#[test]
fn identity_capabilities_and_bar_layout() {
    let d = Driver::new(0);
    assert_eq!(d.cfg_read(0), 0x1042_1af4);
    assert_eq!(d.cfg_read(8), 0x0100_0001, "class 0x0100, revision 1");
    assert_eq!(d.cfg_read(0x2c), 0x1100_1af4);
    assert_eq!(d.cfg_read(0x3c) & 0xffff, 0x010a, "INTA on line 10");
    let ids: Vec<u8> = d.caps().iter().map(|c| c.0).collect();
    assert_eq!(ids, [0x11, 9, 9, 9, 9, 9]);
    // The BAR sizes as 32 KiB.
    d.cfg_write32(0x10, 0xffff_ffff);
    assert_eq!(d.cfg_read(0x10), !(BAR_SIZE - 1));
    d.cfg_write32(0x10, BAR);
    // Notify: multiplier 4, queue 1 notifies at + 4.
    let (_, notify_cap) = d
        .caps()
        .into_iter()
        .find(|&(id, at)| id == 9 && (d.cfg_read(at) >> 24) == 2)
        .unwrap();
    assert_eq!(d.cfg_read(notify_cap + 16), 4);
    let common = d.virtio_offset(1);
    d.w(common + 0x16, 2, 1);
    assert_eq!(d.r(common + 0x1e, 2), 1, "queue_notify_off");
    // The device configuration: capacity in sectors, num_queues.
    let dev_cfg = d.virtio_offset(4);
    assert_eq!(d.r(dev_cfg, 8), 2048);
    assert_eq!(d.r(dev_cfg + 34, 2), 2);
    // The PCI configuration access window reads the BAR: num_queues.
    let (_, win) = d
        .caps()
        .into_iter()
        .find(|&(id, at)| id == 9 && (d.cfg_read(at) >> 24) == 5)
        .unwrap();
    d.cfg_write32(win + 4, 0);
    d.cfg_write32(win + 8, (common + 0x12) as u32);
    d.cfg_write32(win + 12, 2);
    assert_eq!(d.cfg_read(win + 16) & 0xffff, 2);
    // A 1-byte window writes through: device_status = ACKNOWLEDGE.
    d.cfg_write32(win + 8, (common + 0x14) as u32);
    d.cfg_write32(win + 12, 1);
    d.cfg_write16(win + 16, 1);
    assert_eq!(d.r(common + 0x14, 1), 1);
    d.w(common + 0x14, 1, 0);
    // Vectors beyond the table read back as NO_VECTOR.
    d.w(common + 0x10, 2, 9);
    assert_eq!(d.r(common + 0x10, 2), u64::from(NO_VECTOR));
    // Read-only registers do not move.
    d.w(common + 0x12, 2, 7);
    assert_eq!(d.r(common + 0x12, 2), 2);
}

#[test]
fn a_request_completes_with_an_msix_interrupt() {
    let d = Driver::new(0);
    // MSI-X on: the table entry for vector 1 points at APIC 0, vector 0x41.
    let (_, msix) = d.caps()[0];
    let table = u64::from(d.cfg_read(msix + 4));
    d.cfg_write16(msix + 2, 1 << 15);
    assert_ne!(d.cfg_read(msix) & (1 << 31), 0, "enable reads back");
    d.w(table + 16, 4, 0xfee0_0000);
    d.w(table + 16 + 8, 4, 0x41);
    d.w(table + 16 + 12, 4, 0);
    let gsi = d.dev.lock().unwrap().msix.vectors()[1].gsi;
    assert_eq!(d.hooks.routes.lock().unwrap()[&gsi].data, 0x41);

    let mock = MockSplitQueue::create(&d.mem, GuestAddress(0x1000), 16);
    let common = bring_up(&d, &mock, Some(1));
    queue_read(&d, &mock, 0);
    d.w(NOTIFY, 2, 0);
    assert_eq!(mock.used().idx().load(), 1, "one request completed");
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0x11);
    let dev = d.dev.lock().unwrap();
    assert_eq!(
        dev.msix.vectors()[1].fd.read().unwrap(),
        1,
        "vector 1 fired"
    );
    assert!(d.intx.read().is_err(), "no INTx with MSI-X on");
    drop(dev);
    assert_eq!(d.r(0x1000, 1), 0, "the ISR is not used with MSI-X");
    // Reset: status 0, the queue is gone and the vectors unassigned.
    d.w(common + 0x14, 1, 0);
    assert_eq!(d.r(common + 0x1c, 2), 0);
    assert_eq!(d.r(common + 0x1a, 2), u64::from(NO_VECTOR));
    assert!(!d.dev.lock().unwrap().in_use());
}

#[test]
fn intx_and_the_isr_without_msix() {
    let d = Driver::new(0);
    let mock = MockSplitQueue::create(&d.mem, GuestAddress(0x1000), 16);
    bring_up(&d, &mock, None);
    queue_read(&d, &mock, 0);
    d.w(NOTIFY, 2, 0);
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(d.intx.read().unwrap(), 1, "INTx raised");
    assert_eq!(d.r(0x1000, 1), 1, "ISR: queue interrupt");
    assert_eq!(d.r(0x1000, 1), 0, "reading the ISR clears it");
}

#[test]
fn a_hostile_queue_needs_a_reset_and_says_so() {
    let d = Driver::new(0);
    let mock = MockSplitQueue::create(&d.mem, GuestAddress(0x1000), 16);
    let common = bring_up(&d, &mock, None);
    // A chain whose data lies outside guest memory and a header too short.
    let descs = [
        RawDescriptor::from(Descriptor::new(0x10_0000, 8, 1, 1)),
        RawDescriptor::from(Descriptor::new(1 << 40, 4096, 1 | 2, 2)),
        RawDescriptor::from(Descriptor::new(0x30_0000, 1, 2, 0)),
    ];
    mock.add_desc_chains(&descs, 0).unwrap();
    d.w(NOTIFY, 2, 0);
    assert_eq!(d.r(common + 0x14, 1) & 0x40, 0x40, "DEVICE_NEEDS_RESET");
    assert_eq!(d.r(0x1000, 1), 2, "ISR: configuration change");
    // Further notifications are ignored until the driver resets.
    d.w(NOTIFY, 2, 0);
    d.w(common + 0x14, 1, 0);
    assert_eq!(d.r(common + 0x14, 1), 0);
    // Garbage register accesses change nothing and never panic.
    for off in [0x0fff, 0x1003, 0x2fff, 0x3ffe, 0x4ffc, 0x5004, 0x7fff] {
        d.w(off, 1, 0xff);
        d.r(off, 1);
    }
    d.w(common + 0x16, 2, 999);
    d.w(common + 0x18, 2, 7);
    d.w(common + 0x1c, 2, 1);
    assert_eq!(d.r(common + 0x18, 2), 0, "no queue 999");
    d.w(NOTIFY + 4 * 999, 2, 999);
}

#[test]
fn ioeventfds_follow_the_bar() {
    let d = Driver::new(2);
    let base = u64::from(BAR);
    assert_eq!(
        *d.hooks.ioevents.lock().unwrap(),
        [(None, Some(base + NOTIFY)), (None, Some(base + NOTIFY + 4))]
    );
    d.hooks.ioevents.lock().unwrap().clear();
    // Memory decoding off (as Linux does around BAR sizing): unregistered.
    d.cfg_write16(4, 0);
    d.cfg_write32(0x10, 0xffff_ffff);
    d.cfg_write32(0x10, 0xc010_0000);
    d.cfg_write16(4, 2);
    assert_eq!(
        *d.hooks.ioevents.lock().unwrap(),
        [
            (Some(base + NOTIFY), None),
            (Some(base + NOTIFY + 4), None),
            (None, Some(0xc010_0000 + NOTIFY)),
            (None, Some(0xc010_0000 + NOTIFY + 4)),
        ]
    );
    d.hooks.ioevents.lock().unwrap().clear();
    // A machine reset puts the BAR back; removing the device unregisters.
    d.bus.reset();
    assert_eq!(d.hooks.ioevents.lock().unwrap().len(), 2);
    d.hooks.ioevents.lock().unwrap().clear();
    let Driver {
        bus, dev, hooks, ..
    } = d;
    drop(bus);
    drop(dev);
    assert_eq!(
        *hooks.ioevents.lock().unwrap(),
        [(Some(base + NOTIFY), None), (Some(base + NOTIFY + 4), None)]
    );
    assert_eq!(hooks.freed.lock().unwrap().len(), 3, "3 vectors freed");
}

#[test]
fn random_register_garbage_never_panics() {
    let d = Driver::new(2);
    let mock = MockSplitQueue::create(&d.mem, GuestAddress(0x1000), 16);
    bring_up(&d, &mock, Some(0));
    // A xorshift generator: the same garbage on every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let r = next();
        let len = [1usize, 2, 4, 8][(r & 3) as usize];
        let value = next().to_le_bytes();
        let mut buf = [0u8; 8];
        match (r >> 2) % 4 {
            0 => {
                // Configuration space through the ports, any register.
                let reg = ((r >> 8) & 0xff) as u32;
                d.bus.pio_write(
                    CONFIG_ADDRESS,
                    &(0x8000_0000 | SLOT << 11 | (reg & 0xfc)).to_le_bytes(),
                );
                let port = CONFIG_DATA + (reg & 3) as u16;
                d.bus.pio_write(port, &value[..len.min(4)]);
                d.bus.pio_read(port, &mut buf[..len.min(4)]);
            }
            1 | 2 => {
                // BAR 0, wherever it decodes now (or nowhere).
                let off = (r >> 8) % u64::from(BAR_SIZE);
                let base = d.dev.lock().unwrap().bar0().map_or(0, |(b, _)| b);
                d.bus.mmio_write(base + off, &value[..len]);
                d.bus.mmio_read(base + off, &mut buf[..len]);
            }
            _ => {
                // A notification of any queue, served with whatever is in the rings.
                d.dev.lock().unwrap().notify((r >> 8) as u32 % 4);
            }
        }
    }
    // Still the same function, and a reset brings it back to a clean state.
    d.bus.reset();
    assert_eq!(d.cfg_read(0), 0x1042_1af4);
    let common = d.virtio_offset(1);
    assert_eq!(d.r(common + 0x14, 1), 0);
    assert_eq!(d.r(common + 0x12, 2), 2);
}

#[test]
fn restart_serves_what_was_queued_while_the_vm_was_stopped() {
    // The main loop drops notifications while the VM is stopped; `cont` restarts every
    // queue, which serves the requests the driver queued meanwhile.
    let d = Driver::new(0);
    let mock = MockSplitQueue::create(&d.mem, GuestAddress(0x1000), 16);
    bring_up(&d, &mock, None);
    queue_read(&d, &mock, 0);
    assert_eq!(mock.used().idx().load(), 0, "not notified: nothing served");
    d.dev.lock().unwrap().restart_queues();
    assert_eq!(mock.used().idx().load(), 1, "served by the restart");
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0x11);
    // A second restart finds nothing more to do.
    d.dev.lock().unwrap().restart_queues();
    assert_eq!(mock.used().idx().load(), 1);
}
