//! The virtual machine: KVM, guest memory, the embedded guest, COM1 and the
//! vCPU threads.

mod boot;
pub mod bus;
mod disks;
mod irq;
pub mod linux;
mod vcpu;

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::PciBus;
use crate::devices::virtio_blk::{BlkEngine, IoErrorStop};
use crate::devices::virtio_mmio::{SharedMmioDevice, VirtioMmioBlk, NOTIFY_OFFSET, WINDOW};
use crate::devices::QueueNotify;
use bus::{EventFdTrigger, InputReady, IoBus, SerialPort, COM1_IRQ};
pub use disks::PciDisk;
use irq::KvmIrqs;
pub use vcpu::VcpuInfo;
use vcpu::Vcpus;

/// The embedded default guest (built from `guest/guest.S` by build.rs).
pub const DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// Smallest guest memory: the boot tables, the stack and the guest at 1 MiB.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest guest memory this layout supports: RAM ends where the PCI
/// devices' BARs (0xc000_0000) and the virtio-mmio windows begin.
pub const MAX_MEMORY: u64 = 3 << 30;

/// What the vCPUs run.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A flat 64-bit program loaded at 1 MiB (the embedded default guest).
    Flat(&'static [u8]),
    /// A Linux kernel with the 64-bit boot protocol.
    Linux(linux::LinuxBoot),
}

/// How a virtio device reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Modern virtio-pci on bus 0 (`virtio-blk-pci`, and `virtio-blk`).
    Pci,
    /// virtio-mmio at a fixed window (`virtio-blk-device`): guests must be
    /// told where (Linux: `virtio_mmio.device=` on the command line).
    Mmio,
}

/// A virtio-blk disk to put on the machine.
pub struct BlockDeviceSpec {
    /// The BlockBackend the device does its I/O on (attached by the caller).
    pub backend: Arc<block_graph::BlockBackend>,
    /// Whether the guest sees a read-only disk.
    pub read_only: bool,
    /// The device id (also the GET_ID serial).
    pub id: String,
    /// Request queues.
    pub queues: u16,
    /// Queue notifications through ioeventfds (QEMU's `ioeventfd` property):
    /// the guest's notify does not exit to the VMM and the main loop
    /// processes the queue; off, the vCPU thread processes it on the exit.
    pub ioeventfd: bool,
    /// Its transport.
    pub transport: Transport,
    /// Its PCI slot (`addr=`); the lowest free one when not given.
    pub slot: Option<u8>,
}

/// A queue notification the main loop waits on: the eventfd KVM signals
/// when the guest writes the queue's index to QueueNotify.
pub struct QueueNotifier {
    /// The eventfd.
    pub fd: EventFd,
    /// The device.
    pub device: Arc<Mutex<dyn QueueNotify>>,
    /// The queue index.
    pub queue: u32,
}

/// Where the first virtio-mmio device's registers are.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The interrupt line of the first virtio-mmio device (then one per device).
pub const VIRTIO_MMIO_IRQ: u32 = 5;

/// How to build the machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Start with the vCPUs paused (`-S`).
    pub paused: bool,
}

/// Errors building or running the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// /dev/kvm can't be used.
    #[error("KVM is not available: {0}")]
    Kvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("{0}: {1}")]
    KvmCall(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The configuration is outside what this machine supports.
    #[error("{0}")]
    Config(String),
    /// A thread or descriptor could not be created.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running (or paused) virtual machine.
pub struct Machine {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    irqs: Arc<KvmIrqs>,
    pci_disks: Vec<PciDisk>,
    mmio_ids: Vec<String>,
    mmio_disks: Vec<SharedMmioDevice>,
    /// The disks' requests to stop the VM on an I/O error (werror/rerror=stop).
    io_error_stop: Arc<IoErrorStop>,
    memory: GuestMemoryMmap,
    vcpus: Vcpus,
    bus: Arc<IoBus>,
    serial: Arc<Mutex<SerialPort>>,
    boot: BootSource,
    notifiers: Vec<QueueNotifier>,
    /// Entry point and `rsi` of the loaded program, read by the vCPUs at (re)boot.
    entry: Arc<Mutex<(u64, u64)>>,
}

impl Machine {
    /// Creates the VM, loads what `boot_source` names and starts its vCPUs (paused if asked).
    /// `serial_out` receives what the guest writes to COM1; `input` is told
    /// when COM1 can take input again; `waker` wakes the main loop for the
    /// machine's requests (reset, shutdown).
    pub fn new(
        cfg: &MachineConfig,
        boot_source: BootSource,
        serial_out: Box<dyn Write + Send>,
        input: InputReady,
        disks: Vec<BlockDeviceSpec>,
        waker: Arc<mio::Waker>,
    ) -> Result<Machine, MachineError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&cfg.memory) {
            return Err(MachineError::Config(format!(
                "memory size {} MiB is outside the supported {}..{} MiB",
                cfg.memory >> 20,
                MIN_MEMORY >> 20,
                MAX_MEMORY >> 20
            )));
        }
        if cfg.vcpus == 0 {
            return Err(MachineError::Config("at least one vCPU is needed".into()));
        }
        let kvm = Kvm::new().map_err(MachineError::Kvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| MachineError::KvmCall("KVM_CREATE_VM", e))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| MachineError::KvmCall("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| MachineError::KvmCall("KVM_CREATE_IRQCHIP", e))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| MachineError::KvmCall("KVM_CREATE_PIT2", e))?;

        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), cfg.memory as usize)])
            .map_err(|e| MachineError::Memory(e.to_string()))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| MachineError::Memory(e.to_string()))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is mapped by `memory`, which the Machine owns
            // and keeps alive (and unmoved) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|e| MachineError::KvmCall("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        let entry = Arc::new(Mutex::new(load(&memory, &boot_source)?));

        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|e| MachineError::KvmCall("KVM_IRQFD", e))?;
        let serial = Arc::new(Mutex::new(SerialPort::with_events(
            EventFdTrigger(irq),
            input,
            serial_out,
        )));
        let vm = Arc::new(vm);
        let irqs = KvmIrqs::new(vm.clone());
        let stop_waker = waker.clone();
        let io_error_stop = IoErrorStop::new(Some(Box::new(move || {
            let _ = stop_waker.wake();
        })));
        let mut mmio = Vec::new();
        let mut mmio_disks = Vec::new();
        let mut mmio_ids = Vec::new();
        let mut notifiers = Vec::new();
        let (pci_specs, mmio_specs): (Vec<_>, Vec<_>) = disks
            .into_iter()
            .partition(|d| d.transport == Transport::Pci);
        for (i, disk) in mmio_specs.into_iter().enumerate() {
            let irq = EventFd::new(libc::EFD_NONBLOCK)?;
            vm.register_irqfd(&irq, VIRTIO_MMIO_IRQ + i as u32)
                .map_err(|e| MachineError::KvmCall("KVM_IRQFD", e))?;
            mmio_ids.push(disk.id.clone());
            let mut engine = BlkEngine::new(disk.backend, disk.read_only, &disk.id);
            engine.set_io_error_stop(io_error_stop.clone());
            let dev: SharedMmioDevice = Arc::new(Mutex::new(VirtioMmioBlk::new(
                engine,
                memory.clone(),
                irq,
                disk.queues,
            )));
            let base = VIRTIO_MMIO_BASE + i as u64 * WINDOW;
            if disk.ioeventfd {
                for queue in 0..u32::from(disk.queues.max(1)) {
                    let fd = EventFd::new(libc::EFD_NONBLOCK)?;
                    vm.register_ioevent(&fd, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), queue)
                        .map_err(|e| MachineError::KvmCall("KVM_IOEVENTFD", e))?;
                    notifiers.push(QueueNotifier {
                        fd,
                        device: dev.clone(),
                        queue,
                    });
                }
            }
            mmio_disks.push(dev.clone());
            mmio.push((base, dev));
        }
        let bus = Arc::new(IoBus::new(
            serial.clone(),
            mmio,
            Arc::new(PciBus::new()),
            waker,
        ));
        let mut pci_disks = Vec::new();
        for disk in pci_specs {
            let slot = disk.slot;
            let cx = disks::PlugContext {
                vm: &vm,
                irqs: &irqs,
                pci: bus.pci(),
                memory: &memory,
                bus: Arc::downgrade(&bus),
                io_error_stop: &io_error_stop,
            };
            let (d, n) = disks::plug(cx, disk, slot)?;
            pci_disks.push(d);
            notifiers.extend(n);
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| MachineError::KvmCall("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut fds: Vec<VcpuFd> = Vec::new();
        for index in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| MachineError::KvmCall("KVM_CREATE_VCPU", e))?;
            let mut cpuid = cpuid.clone();
            for e in cpuid.as_mut_slice() {
                if e.function == 1 {
                    // The initial APIC id of this vCPU.
                    e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
                }
            }
            vcpu.set_cpuid2(&cpuid)
                .map_err(|e| MachineError::KvmCall("KVM_SET_CPUID2", e))?;
            fds.push(vcpu);
        }
        let boot_entry = entry.clone();
        let boot: Arc<vcpu::BootFn> = Arc::new(move |vcpu: &VcpuFd, index: usize| {
            if index == 0 {
                let (rip, rsi) = *boot_entry.lock().unwrap_or_else(|e| e.into_inner());
                boot::setup_vcpu(vcpu, rip, rsi)
            } else {
                // Application processors wait for INIT/SIPI, as on real hardware.
                vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
                })
            }
        });
        let vcpus = Vcpus::spawn(fds, bus.clone(), cfg.paused, boot)?;
        Ok(Machine {
            _kvm: kvm,
            vm,
            irqs,
            pci_disks,
            mmio_ids,
            mmio_disks,
            io_error_stop,
            memory,
            vcpus,
            bus,
            serial,
            boot: boot_source,
            notifiers,
            entry,
        })
    }

    /// Parks every vCPU; returns when none runs guest code.
    pub fn pause(&self) {
        self.vcpus.pause();
    }

    /// Lets the vCPUs run.
    pub fn resume(&self) {
        self.vcpus.resume();
    }

    /// Takes a disk's pending request to stop the VM for an I/O error
    /// (werror/rerror=stop); the main loop acts on it, since a disk served
    /// on a vCPU thread can't wait for the vCPUs to park.
    pub fn take_io_error_stop(&self) -> bool {
        self.io_error_stop.take()
    }

    /// The VM resumed: every disk serves all its queues, first the requests
    /// it kept when an I/O error stopped the VM (QEMU's
    /// virtio_blk_dma_restart_cb; they may fail and stop the VM again), and
    /// what the driver queued while the VM was stopped.
    pub fn restart_queues(&self) {
        for d in &self.pci_disks {
            d.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restart_queues();
        }
        for d in &self.mmio_disks {
            d.lock().unwrap_or_else(|e| e.into_inner()).restart_queues();
        }
    }

    /// Puts the machine back in its power-on state; the vCPUs are left
    /// paused (the caller resumes them if the VM was running).
    pub fn reset(&self) -> Result<(), MachineError> {
        self.vcpus.pause();
        *self.entry.lock().unwrap_or_else(|e| e.into_inner()) = load(&self.memory, &self.boot)?;
        // The PCI functions go back to their power-on state (BARs where
        // the VMM placed them, MSI-X off, virtio status 0).
        self.bus.pci().reset();
        self.vcpus.request_reset();
        Ok(())
    }

    /// What each vCPU published (thread id, last parked pc).
    pub fn vcpu_info(&self) -> &[Arc<VcpuInfo>] {
        self.vcpus.info()
    }

    /// The machine's requests to the main loop.
    pub fn bus(&self) -> &IoBus {
        &self.bus
    }

    /// COM1 as a frontend for its chardev.
    pub fn serial_frontend(&self) -> bus::SerialFrontend {
        bus::SerialFrontend(self.serial.clone())
    }

    /// The queue notifications the main loop must watch (devices with ioeventfd).
    pub fn notifiers(&self) -> &[QueueNotifier] {
        &self.notifiers
    }

    /// Delivers an NMI to every vCPU (`inject-nmi`).
    pub fn inject_nmi(&self) {
        self.vcpus.request_nmi();
    }

    /// Translates a guest-virtual address of vCPU `cpu` (parked) by walking
    /// its page tables in guest memory: 4-level paging with 4 KiB, 2 MiB and
    /// 1 GiB pages, or the identity when paging is off.
    pub fn translate(&self, cpu: usize, gva: u64) -> Option<u64> {
        let info = self.vcpus.info().get(cpu)?;
        let [cr0, cr3, cr4, efer] =
            [0, 1, 2, 3].map(|i| info.paging[i].load(std::sync::atomic::Ordering::Relaxed));
        if cr0 & (1 << 31) == 0 {
            return Some(gva);
        }
        if cr4 & (1 << 5) == 0 || efer & (1 << 10) == 0 {
            return None; // 32-bit paging modes are not walked here.
        }
        let mut table = cr3 & 0x000f_ffff_ffff_f000;
        for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
            let index = (gva >> shift) & 0x1ff;
            let entry: u64 = self.memory.read_obj(GuestAddress(table + index * 8)).ok()?;
            if entry & 1 == 0 {
                return None;
            }
            let frame = entry & 0x000f_ffff_ffff_f000;
            // A large page at the PDPT (1 GiB) or PD (2 MiB) level.
            if (level == 1 || level == 2) && entry & 0x80 != 0 {
                let mask = (1u64 << shift) - 1;
                return Some((frame & !mask) | (gva & mask));
            }
            if level == 3 {
                return Some(frame | (gva & 0xfff));
            }
            table = frame;
        }
        None
    }

    /// Writes `size` bytes of guest-virtual memory of vCPU `cpu` from `addr`
    /// (`memsave`); the vCPUs must be parked.
    pub fn save_virtual(
        &self,
        cpu: usize,
        addr: i64,
        size: i64,
        mut out: impl Write,
    ) -> Result<(), MachineError> {
        let invalid =
            || MachineError::Config(format!("Invalid addr 0x{addr:016x}/size {size} specified"));
        if addr < 0 || size < 0 || (size as u64) > self.memory.last_addr().0 + 1 {
            return Err(invalid());
        }
        let (mut at, end) = (
            addr as u64,
            (addr as u64).checked_add(size as u64).ok_or_else(invalid)?,
        );
        let mut buf = [0u8; 4096];
        while at < end {
            let n = (4096 - (at & 0xfff)).min(end - at) as usize;
            let gpa = self.translate(cpu, at).ok_or_else(invalid)?;
            self.memory
                .read_slice(&mut buf[..n], GuestAddress(gpa))
                .map_err(|_| invalid())?;
            out.write_all(&buf[..n])?;
            at += n as u64;
        }
        out.flush()?;
        Ok(())
    }

    /// Writes `size` bytes of guest physical memory from `addr` (`pmemsave`).
    pub fn save_physical(
        &self,
        addr: i64,
        size: i64,
        mut out: impl Write,
    ) -> Result<(), MachineError> {
        let end = addr.checked_add(size).filter(|_| addr >= 0 && size >= 0);
        let limit = self.memory.last_addr().0 + 1;
        let (start, end) = match end {
            Some(end) if end as u64 <= limit => (addr as u64, end as u64),
            _ => {
                return Err(MachineError::Config(format!(
                    "Invalid parameter: [{addr}, {addr}+{size}) is outside guest memory (0..{limit:#x})"
                )))
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            self.memory
                .read_slice(&mut buf[..n], GuestAddress(at))
                .map_err(|e| MachineError::Memory(e.to_string()))?;
            out.write_all(&buf[..n])?;
            at += n as u64;
        }
        out.flush()?;
        Ok(())
    }

    /// Stops and joins the vCPU threads.
    pub fn shutdown(&mut self) {
        self.vcpus.shutdown();
    }
}

/// Writes the boot tables and the program; returns its entry point and `rsi`.
fn load(memory: &GuestMemoryMmap, boot: &BootSource) -> Result<(u64, u64), MachineError> {
    boot::write_tables(memory).map_err(|e| MachineError::Memory(e.to_string()))?;
    match boot {
        BootSource::Flat(image) => {
            memory
                .write_slice(image, GuestAddress(boot::GUEST_LOAD_ADDR))
                .map_err(|e| MachineError::Memory(format!("loading the guest: {e}")))?;
            Ok((boot::GUEST_LOAD_ADDR, 0))
        }
        BootSource::Linux(linux) => Ok((linux::load(memory, linux)?, linux::ZERO_PAGE)),
    }
}
