//! Disks on the PCI bus: where a virtio-blk-pci function goes (slot, BAR,
//! INTx line), its KVM plumbing (MSI-X routes, irqfds, ioeventfds), and
//! taking it out again for hot-unplug.

use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::bus::IoBus;
use super::irq::KvmIrqs;
use super::{BlockDeviceSpec, Machine, MachineError, QueueNotifier};
use crate::devices::pci::{PciBus, SharedPciDevice, SLOTS};
use crate::devices::virtio_blk::{BlkEngine, IoErrorStop};
use crate::devices::virtio_pci::{PciPlacement, VirtioPciBlk};

/// Where the BARs of the PCI devices go: slot N at this + N * 64 KiB.
pub const PCI_MMIO_BASE: u64 = 0xc000_0000;
const SLOT_WINDOW: u64 = 0x1_0000;
/// The INTx lines of the PCI slots (as QEMU's i440FX routes PIRQ A..D).
const INTX_LINES: [u8; 2] = [10, 11];

/// A virtio-blk-pci disk of the machine.
pub struct PciDisk {
    /// Its device id.
    pub id: String,
    /// Its slot on bus 0.
    pub slot: u8,
    /// The function.
    pub device: Arc<Mutex<VirtioPciBlk>>,
    /// The BlockBackend it does its I/O on.
    pub backend: Arc<block_graph::BlockBackend>,
    /// `device_del` was asked: it goes once the driver lets go of it.
    pub unplug_requested: bool,
    intx: EventFd,
    intx_line: u8,
}

/// What plugging a disk needs of the machine.
pub(super) struct PlugContext<'a> {
    pub vm: &'a Arc<VmFd>,
    pub irqs: &'a Arc<KvmIrqs>,
    pub pci: &'a PciBus,
    pub memory: &'a GuestMemoryMmap,
    pub bus: Weak<IoBus>,
    pub io_error_stop: &'a Arc<IoErrorStop>,
}

/// Puts `disk` in `slot` (or the lowest free one); returns the disk and the
/// queue notifiers the main loop must watch (none without ioeventfd).
pub(super) fn plug(
    cx: PlugContext<'_>,
    disk: BlockDeviceSpec,
    slot: Option<u8>,
) -> Result<(PciDisk, Vec<QueueNotifier>), MachineError> {
    let slot = match slot {
        Some(s) if usize::from(s) >= SLOTS || s == 0 => {
            return Err(MachineError::Config(format!(
                "PCI: slot {s} is not available (1..{})",
                SLOTS - 1
            )))
        }
        Some(s) if cx.pci.device(usize::from(s)).is_some() => {
            return Err(MachineError::Config(format!(
                "PCI: slot {s} function 0 not available for virtio-blk-pci, in use by another device"
            )))
        }
        Some(s) => s,
        None => cx
            .pci
            .free_slot()
            .ok_or_else(|| MachineError::Config("PCI: no free slot on bus pci.0".into()))?
            as u8,
    };
    let line = INTX_LINES[usize::from(slot) % INTX_LINES.len()];
    let intx = EventFd::new(libc::EFD_NONBLOCK)?;
    cx.vm
        .register_irqfd(&intx, u32::from(line))
        .map_err(|e| MachineError::KvmCall("KVM_IRQFD", e))?;
    let queues = disk.queues.clamp(1, 16);
    let mut fds = Vec::new();
    if disk.ioeventfd {
        for _ in 0..queues {
            fds.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
    }
    let clones = fds
        .iter()
        .map(|f| f.try_clone())
        .collect::<Result<Vec<_>, _>>()?;
    let place = PciPlacement {
        bar: (PCI_MMIO_BASE + u64::from(slot) * SLOT_WINDOW) as u32,
        intx_line: line,
        intx: intx.try_clone()?,
        notifiers: clones,
    };
    let mut engine = BlkEngine::new(disk.backend.clone(), disk.read_only, &disk.id);
    engine.set_io_error_stop(cx.io_error_stop.clone());
    let hooks: Arc<dyn crate::devices::msix::VmHooks> = cx.irqs.clone();
    let mut dev = match VirtioPciBlk::new(engine, cx.memory.clone(), queues, place, hooks) {
        Ok(d) => d,
        Err(e) => {
            let _ = cx.vm.unregister_irqfd(&intx, u32::from(line));
            return Err(MachineError::Io(e));
        }
    };
    let waker = cx.bus;
    dev.set_reset_callback(Box::new(move || {
        if let Some(bus) = waker.upgrade() {
            bus.request_device_check();
        }
    }));
    let device = Arc::new(Mutex::new(dev));
    let shared: SharedPciDevice = device.clone();
    cx.pci
        .insert(usize::from(slot), shared)
        .map_err(MachineError::Config)?;
    let notifiers = fds
        .into_iter()
        .enumerate()
        .map(|(q, fd)| QueueNotifier {
            fd,
            device: device.clone(),
            queue: q as u32,
        })
        .collect();
    Ok((
        PciDisk {
            id: disk.id,
            slot,
            device,
            backend: disk.backend,
            unplug_requested: false,
            intx,
            intx_line: line,
        },
        notifiers,
    ))
}

impl Machine {
    /// The machine's PCI disks.
    pub fn pci_disks(&self) -> &[PciDisk] {
        &self.pci_disks
    }

    /// The ids of the virtio-mmio disks (they can't be unplugged).
    pub fn mmio_ids(&self) -> &[String] {
        &self.mmio_ids
    }

    /// The PCI disk `id`, to mark for unplug.
    pub fn pci_disk_mut(&mut self, id: &str) -> Option<&mut PciDisk> {
        self.pci_disks.iter_mut().find(|d| d.id == id)
    }

    /// Hot-plugs a virtio-blk-pci disk into its slot (or the lowest free one)
    /// while the machine runs; returns its slot. Its queue notifiers are
    /// appended to [`Machine::notifiers`] for the main loop to watch.
    pub fn hot_add_pci_disk(&mut self, disk: BlockDeviceSpec) -> Result<u8, MachineError> {
        if self.pci_disks.iter().any(|d| d.id == disk.id) {
            return Err(MachineError::Config(format!(
                "Duplicate device ID '{}'",
                disk.id
            )));
        }
        let cx = PlugContext {
            vm: &self.vm,
            irqs: &self.irqs,
            pci: self.bus.pci(),
            memory: &self.memory,
            bus: Arc::downgrade(&self.bus),
            io_error_stop: &self.io_error_stop,
        };
        let slot = disk.slot;
        let (d, notifiers) = plug(cx, disk, slot)?;
        let slot = d.slot;
        self.pci_disks.push(d);
        self.notifiers.extend(notifiers);
        Ok(slot)
    }

    /// Takes the PCI disk `id` off the bus (its interrupts and notifiers
    /// are released with it); returns it so that the caller can release
    /// its BlockBackend.
    pub fn remove_pci_disk(&mut self, id: &str) -> Option<PciDisk> {
        let i = self.pci_disks.iter().position(|d| d.id == id)?;
        let d = self.pci_disks.remove(i);
        self.bus.pci().remove(usize::from(d.slot));
        d.device.lock().unwrap_or_else(|e| e.into_inner()).detach();
        if let Err(e) = self.vm.unregister_irqfd(&d.intx, u32::from(d.intx_line)) {
            log::warn!("unregistering the INTx irqfd of {id}: {e}");
        }
        Some(d)
    }
}
