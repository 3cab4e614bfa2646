//! The modern virtio-pci transport (virtio 1.x, section 4.1) for the
//! virtio-blk engine: a PCI function 1af4:1042 whose BAR 0 holds the common
//! configuration, the ISR, the device configuration, the queue notify
//! addresses and the MSI-X table and PBA, each found through a vendor
//! capability as the specification lays out. This is what distribution
//! kernels bind with their built-in `virtio_pci` driver.
//!
//! Interrupts: MSI-X vectors (one per queue plus one for configuration
//! changes) through eventfds the hypervisor routes, or INTx (the ISR and an
//! eventfd on the interrupt line) while the driver has MSI-X off.
//! Notifications: the notify addresses are ioeventfds that follow the BAR
//! wherever the guest places it, or, without ioeventfds, writes served on
//! the vCPU thread. A hostile virtqueue sets DEVICE_NEEDS_RESET.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::msix::{self, Msix, VmHooks};
use super::pci::{ConfigSpace, PciDevice, COMMAND_INTX_DISABLE};
use super::virtio_blk::{features, BlkEngine, Served, CONFIG_SIZE};
use super::virtio_mmio::QUEUE_MAX;

/// The virtio vendor id.
pub const VENDOR: u16 = 0x1af4;
/// The modern (non-transitional) virtio-blk device id: 0x1040 + 2.
pub const DEVICE_BLK: u16 = 0x1042;
/// Size of BAR 0.
pub const BAR_SIZE: u32 = 0x8000;
/// "No vector" for config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
/// Where the queue notify addresses start in BAR 0 (queue q at + 4 q).
pub const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

const STATUS_FEATURES_OK: u8 = 0x08;
const STATUS_NEEDS_RESET: u8 = 0x40;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// How the machine placed a new function.
pub struct PciPlacement {
    /// Where BAR 0 starts (aligned to [`BAR_SIZE`]).
    pub bar: u32,
    /// The INTx line (interrupt line register) and the eventfd raising it.
    pub intx_line: u8,
    /// Raises the INTx line.
    pub intx: EventFd,
    /// One ioeventfd per queue (empty: notifications exit to the vCPU).
    pub notifiers: Vec<EventFd>,
}

/// One virtio-blk function on the PCI bus.
pub struct VirtioPciBlk {
    config: ConfigSpace,
    msix_cap: usize,
    pci_cfg_cap: usize,
    msix: Msix,
    engine: BlkEngine,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u16,
    status: u8,
    isr: u8,
    config_generation: u8,
    intx: EventFd,
    notifiers: Vec<EventFd>,
    notify_base: Option<u64>,
    hooks: Arc<dyn VmHooks>,
    on_reset: Option<Box<dyn Fn() + Send>>,
}

/// A virtio vendor capability body (after id and next).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPciBlk {
    /// A function over `engine` with `queues` request queues (1..=16).
    pub fn new(
        engine: BlkEngine,
        mem: GuestMemoryMmap,
        queues: u16,
        place: PciPlacement,
        hooks: Arc<dyn VmHooks>,
    ) -> std::io::Result<Self> {
        let queues = queues.clamp(1, 16);
        let msix = Msix::new(queues + 1, hooks.clone())?;
        // Class 0x0100 (SCSI storage), as QEMU's virtio-blk-pci; subsystem
        // as QEMU's devices.
        let mut config = ConfigSpace::new(VENDOR, DEVICE_BLK, 0x01_00_00, 1);
        config.set_subsystem(VENDOR, 0x1100);
        config.set_bar0(BAR_SIZE, place.bar);
        config.set_interrupt(place.intx_line, 1);
        let msix_cap = config.add_capability(
            msix::CAP_ID,
            &msix.capability_body(MSIX_TABLE as u32, MSIX_PBA as u32),
        );
        config.set_writable(msix_cap + 3, &[0xc0]);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON, COMMON_LEN, None),
        );
        config.add_capability(CAP_VENDOR, &virtio_cap(CFG_ISR, ISR, 4, None));
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_CFG, CONFIG_SIZE as u64, None),
        );
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY,
                u64::from(queues) * u64::from(NOTIFY_MULTIPLIER),
                Some(NOTIFY_MULTIPLIER),
            ),
        );
        let pci_cfg_cap = config.add_capability(CAP_VENDOR, &virtio_cap(CFG_PCI, 0, 0, Some(0)));
        // The driver chooses bar, offset, length and data of the PCI window.
        config.set_writable(pci_cfg_cap + 4, &[0xff]);
        config.set_writable(pci_cfg_cap + 8, &[0xff; 8]);
        config.seal();
        let mut dev = VirtioPciBlk {
            config,
            msix_cap,
            pci_cfg_cap,
            msix,
            engine,
            mem,
            queues: (0..queues)
                .map(|_| Queue::new(QUEUE_MAX).expect("QUEUE_MAX is a valid queue size"))
                .collect(),
            queue_vectors: vec![NO_VECTOR; usize::from(queues)],
            config_vector: NO_VECTOR,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            isr: 0,
            config_generation: 0,
            intx: place.intx,
            notifiers: place.notifiers,
            notify_base: None,
            hooks,
            on_reset: None,
        };
        dev.sync_ioevents();
        Ok(dev)
    }

    /// Calls `f` whenever the driver resets the device (hot-unplug waits
    /// for the driver to let go of it).
    pub fn set_reset_callback(&mut self, f: Box<dyn Fn() + Send>) {
        self.on_reset = Some(f);
    }

    /// Detaches the function from the VM (hot-unplug): its notify
    /// addresses and MSI-X vectors are released, and it serves no queue
    /// any more, whoever still holds it.
    pub fn detach(&mut self) {
        self.on_reset = None;
        self.reset_device();
        self.config.put(0x04, &0u16.to_le_bytes());
        self.sync_ioevents();
        self.msix.release();
        self.status = STATUS_NEEDS_RESET;
    }

    /// Whether a driver is using the device (its status is not 0).
    pub fn in_use(&self) -> bool {
        self.status != 0
    }

    fn features(&self) -> u64 {
        self.engine.features(self.queues.len() as u16)
    }

    /// Puts the ioeventfds where BAR 0 decodes now (none while it does not).
    fn sync_ioevents(&mut self) {
        let base = self.config.bar0().map(|(b, _)| b);
        if base == self.notify_base {
            return;
        }
        let at = |b: u64, q: usize| b + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
        for (q, fd) in self.notifiers.iter().enumerate() {
            self.hooks.move_ioevent(
                fd,
                self.notify_base.map(|b| at(b, q)),
                base.map(|b| at(b, q)),
            );
        }
        self.notify_base = base;
    }

    /// The driver wrote 0 to device_status.
    fn reset_device(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.engine.reset();
        self.queue_vectors.fill(NO_VECTOR);
        self.config_vector = NO_VECTOR;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.isr = 0;
        if let Some(f) = &self.on_reset {
            f();
        }
    }

    fn interrupt(&mut self, vector: u16, isr: u8) {
        if self.msix.enabled() {
            // With MSI-X on, NO_VECTOR means no interrupt at all.
            if vector != NO_VECTOR {
                self.msix.trigger(vector);
            }
            return;
        }
        self.isr |= isr;
        if self.config.command() & COMMAND_INTX_DISABLE == 0 {
            let _ = self.intx.write(1);
        }
    }

    /// A queue notification: serves the queue and interrupts the driver.
    pub fn notify(&mut self, index: u32) {
        if self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        let i = index as usize;
        let Some(q) = self.queues.get_mut(i) else {
            return;
        };
        match self.engine.serve(i as u16, q, &self.mem) {
            Served::Idle => {}
            Served::Interrupt => self.interrupt(self.queue_vectors[i], ISR_QUEUE),
            Served::Broken => {
                self.status |= STATUS_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                self.interrupt(self.config_vector, ISR_CONFIG);
            }
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

    /// The common configuration structure as the driver reads it.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut c = [0u8; COMMON_LEN as usize];
        let features = self.features();
        let device_feature = match self.device_features_sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let driver_feature = match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        c[0x00..0x04].copy_from_slice(&self.device_features_sel.to_le_bytes());
        c[0x04..0x08].copy_from_slice(&device_feature.to_le_bytes());
        c[0x08..0x0c].copy_from_slice(&self.driver_features_sel.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&driver_feature.to_le_bytes());
        c[0x10..0x12].copy_from_slice(&self.config_vector.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        c[0x14] = self.status;
        c[0x15] = self.config_generation;
        c[0x16..0x18].copy_from_slice(&self.queue_sel.to_le_bytes());
        let sel = usize::from(self.queue_sel);
        if let Some(q) = self.queues.get(sel) {
            c[0x18..0x1a].copy_from_slice(&q.size().to_le_bytes());
            c[0x1a..0x1c].copy_from_slice(&self.queue_vectors[sel].to_le_bytes());
            c[0x1c..0x1e].copy_from_slice(&u16::from(q.ready()).to_le_bytes());
            c[0x1e..0x20].copy_from_slice(&self.queue_sel.to_le_bytes()); // queue_notify_off
            c[0x20..0x28].copy_from_slice(&q.desc_table().to_le_bytes());
            c[0x28..0x30].copy_from_slice(&q.avail_ring().to_le_bytes());
            c[0x30..0x38].copy_from_slice(&q.used_ring().to_le_bytes());
            c[0x38..0x3a].copy_from_slice(&self.queue_sel.to_le_bytes()); // queue_notify_data
        }
        c
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// A write to the common configuration: the bytes are merged into the
    /// fields they cover, and each field written takes its new value.
    fn common_write(&mut self, offset: u64, data: &[u8]) {
        const FIELDS: [(usize, usize); 17] = [
            (0x00, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x14, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x20, 4),
            (0x24, 4),
            (0x28, 4),
            (0x2c, 4),
            (0x30, 4),
            (0x34, 4),
            (0x38, 2),
            (0x3a, 2),
        ];
        let mut img = self.common_image();
        let start = offset as usize;
        let end = (start + data.len()).min(img.len());
        if start >= end {
            return;
        }
        img[start..end].copy_from_slice(&data[..end - start]);
        for (at, len) in FIELDS {
            if at < end && start < at + len {
                let mut v = [0u8; 4];
                v[..len].copy_from_slice(&img[at..at + len]);
                self.common_field(at, u32::from_le_bytes(v));
            }
        }
    }

    fn vector_or_none(&self, v: u32) -> u16 {
        if v < u32::from(self.msix.len()) {
            v as u16
        } else {
            NO_VECTOR
        }
    }

    fn common_field(&mut self, at: usize, v: u32) {
        let sel = usize::from(self.queue_sel);
        match at {
            0x00 => self.device_features_sel = v,
            0x08 => self.driver_features_sel = v,
            0x0c => {
                let v = u64::from(v);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
                self.driver_features &= self.features();
            }
            0x10 => self.config_vector = self.vector_or_none(v),
            0x14 => {
                let mut v = v as u8;
                if v == 0 {
                    self.reset_device();
                    return;
                }
                // FEATURES_OK sticks only when the driver accepted VERSION_1.
                if v & STATUS_FEATURES_OK != 0 && self.driver_features & features::VERSION_1 == 0 {
                    v &= !STATUS_FEATURES_OK;
                }
                self.status = v | (self.status & STATUS_NEEDS_RESET);
            }
            0x16 => self.queue_sel = v as u16,
            _ => {
                let vector = self.vector_or_none(v);
                if sel >= self.queues.len() {
                    return;
                }
                let q = &mut self.queues[sel];
                match at {
                    0x18 if !q.ready() => q.set_size(v as u16),
                    0x1a => self.queue_vectors[sel] = vector,
                    0x1c if v == 1 => q.set_ready(true),
                    0x20 if !q.ready() => q.set_desc_table_address(Some(v), None),
                    0x24 if !q.ready() => q.set_desc_table_address(None, Some(v)),
                    0x28 if !q.ready() => q.set_avail_ring_address(Some(v), None),
                    0x2c if !q.ready() => q.set_avail_ring_address(None, Some(v)),
                    0x30 if !q.ready() => q.set_used_ring_address(Some(v), None),
                    0x34 if !q.ready() => q.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
        }
    }

    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let cap = self.pci_cfg_cap;
        let len = self.config.u32_at(cap + 12);
        (
            self.config.byte(cap + 4),
            u64::from(self.config.u32_at(cap + 8)),
            if matches!(len, 1 | 2 | 4) {
                len as usize
            } else {
                0
            },
        )
    }
}

impl super::QueueNotify for VirtioPciBlk {
    fn notify(&mut self, queue: u32) {
        VirtioPciBlk::notify(self, queue)
    }
}

impl PciDevice for VirtioPciBlk {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        // Message control's enable and mask bits are the MSI-X state's.
        let ctrl = self.msix_cap + 2;
        let bits = (self.config.u16_at(ctrl) & 0x3fff) | self.msix.control_bits();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            if at == ctrl || at == ctrl + 1 {
                *b = bits.to_le_bytes()[at - ctrl];
            }
        }
        // The PCI configuration access window into the BAR: an access of
        // the window's length (cap.length: 1, 2 or 4) at pci_cfg_data.
        let win = self.pci_cfg_cap + 16;
        let (bar, off, len) = self.pci_cfg_window();
        if offset == win && bar == 0 && len > 0 && data.len() >= len {
            data.fill(0);
            self.bar_read(off, &mut data[..len]);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let win = self.pci_cfg_cap + 16;
        let (bar, off, len) = self.pci_cfg_window();
        if offset == win && bar == 0 && len > 0 && data.len() >= len {
            self.bar_write(off, &data[..len]);
            return;
        }
        self.config.write(offset, data);
        let ctrl = self.msix_cap + 2;
        if offset <= ctrl + 1 && ctrl < offset + data.len() {
            self.msix.control_write(self.config.u16_at(ctrl));
        }
        self.sync_ioevents();
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..0x1000 => self.common_read(offset, data),
            ISR..0x2000 => {
                data.fill(0);
                if offset == ISR {
                    // Reading the ISR acknowledges it.
                    data[0] = std::mem::take(&mut self.isr);
                }
            }
            DEVICE_CFG..NOTIFY => {
                let cfg = self.engine.config_space(self.queues.len() as u16);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg
                        .get((offset - DEVICE_CFG) as usize + i)
                        .copied()
                        .unwrap_or(0);
                }
            }
            MSIX_TABLE..MSIX_PBA => self.msix.table_read(offset - MSIX_TABLE, data),
            MSIX_PBA..0x6000 => self.msix.pba_read(offset - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON..0x1000 => self.common_write(offset, data),
            NOTIFY..MSIX_TABLE => {
                let q = (offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                self.notify(q as u32);
            }
            MSIX_TABLE..MSIX_PBA => self.msix.table_write(offset - MSIX_TABLE, data),
            // ISR and device configuration are read-only for the driver.
            _ => {}
        }
    }

    fn bar0(&self) -> Option<(u64, u64)> {
        self.config.bar0()
    }

    fn reset(&mut self) {
        self.config.reset();
        self.msix.reset();
        self.config_generation = 0;
        self.reset_device();
        self.sync_ioevents();
    }
}

impl Drop for VirtioPciBlk {
    fn drop(&mut self) {
        for (q, fd) in self.notifiers.iter().enumerate() {
            if let Some(b) = self.notify_base {
                let at = b + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
                self.hooks.move_ioevent(fd, Some(at), None);
            }
        }
    }
}

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
