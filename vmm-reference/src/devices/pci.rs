//! A PCI bus as x86 firmware-less guests find it: configuration mechanism
//! #1 (the address latch at port 0xCF8, data at 0xCFC..0xCFF), a host
//! bridge at 00:00.0 (Linux's `pci=conf1` probe looks for one), and
//! devices with one 32-bit memory BAR each, placed by the VMM as firmware
//! would so that a kernel without ACPI can use them as it finds them.
//!
//! Everything the guest writes is masked by the per-byte write mask of the
//! function's configuration space, so read-only registers stay read-only
//! and BAR sizing (writing all ones, reading back) works as on hardware.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The configuration address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The first configuration data port (0xCFC..=0xCFF).
pub const CONFIG_DATA: u16 = 0xcfc;
/// Device numbers on bus 0.
pub const SLOTS: usize = 32;
/// Size of a function's configuration space (conventional PCI).
pub const CONFIG_SIZE: usize = 256;

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (DMA).
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command register: INTx emulation disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
const BAR0: usize = 0x10;
const CAP_POINTER: usize = 0x34;
const FIRST_CAP: usize = 0x40;

/// The configuration space of one function: its bytes, which bits the
/// guest may change, and the BAR the VMM placed.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    /// Size of BAR 0 (a 32-bit memory BAR), 0 when there is none.
    bar_size: u32,
    last_cap: Option<usize>,
    next_cap: usize,
    /// The power-on contents, restored by [`ConfigSpace::reset`].
    initial: Option<Box<[u8; CONFIG_SIZE]>>,
}

impl ConfigSpace {
    /// A type-0 header with the identity registers and a writable command
    /// register (I/O, memory, bus master, INTx disable).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bar_size: 0,
            last_cap: None,
            next_cap: FIRST_CAP,
            initial: None,
        };
        c.put(0x00, &vendor.to_le_bytes());
        c.put(0x02, &device.to_le_bytes());
        c.bytes[0x08] = revision;
        c.put(0x09, &class.to_le_bytes()[..3]);
        let cmd_mask = 0x1u16 | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE;
        c.wmask[0x04..0x06].copy_from_slice(&cmd_mask.to_le_bytes());
        c
    }

    /// Sets the subsystem vendor and id.
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.put(0x2c, &vendor.to_le_bytes());
        self.put(0x2e, &id.to_le_bytes());
    }

    /// Gives the function a 32-bit memory BAR 0 of `size` bytes (a power of
    /// two of at least 16) at `addr`, with memory decoding on, as firmware
    /// leaves it.
    pub fn set_bar0(&mut self, size: u32, addr: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16 && addr % size == 0);
        self.bar_size = size;
        self.put(BAR0, &addr.to_le_bytes());
        let mask = !(size - 1) & 0xffff_fff0;
        self.wmask[BAR0..BAR0 + 4].copy_from_slice(&mask.to_le_bytes());
        self.bytes[0x04] |= COMMAND_MEMORY as u8;
    }

    /// Sets the interrupt line (writable by the guest) and pin (1 = INTA).
    pub fn set_interrupt(&mut self, line: u8, pin: u8) {
        self.bytes[0x3c] = line;
        self.bytes[0x3d] = pin;
        self.wmask[0x3c] = 0xff;
    }

    /// Appends a capability `id` with `body` (what follows the id and next
    /// bytes); returns its offset. Nothing in it is writable unless
    /// [`ConfigSpace::set_writable`] says so.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let at = self.next_cap;
        assert!(
            at + 2 + body.len() <= CONFIG_SIZE,
            "capabilities overflow the configuration space"
        );
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = at as u8,
            None => {
                self.bytes[CAP_POINTER] = at as u8;
                let status = u16::from_le_bytes([self.bytes[6], self.bytes[7]]) | STATUS_CAP_LIST;
                self.put(0x06, &status.to_le_bytes());
            }
        }
        self.last_cap = Some(at);
        self.next_cap = (at + 2 + body.len() + 3) & !3;
        at
    }

    /// Lets the guest change the bits of `mask` at `offset`.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.wmask[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Records the current contents as the power-on state.
    pub fn seal(&mut self) {
        self.initial = Some(Box::new(self.bytes));
    }

    /// Restores the power-on state (the BAR where the VMM placed it).
    pub fn reset(&mut self) {
        if let Some(initial) = &self.initial {
            self.bytes = **initial;
        }
    }

    /// Stores bytes as the device (not the guest) sets them.
    pub fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Reads bytes; beyond the space they read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write: only the writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let at = offset + i;
            if at < CONFIG_SIZE {
                let m = self.wmask[at];
                self.bytes[at] = (self.bytes[at] & !m) | (v & m);
            }
        }
    }

    /// A byte of the space.
    pub fn byte(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    /// A little-endian 16-bit register.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.byte(offset), self.byte(offset + 1)])
    }

    /// A little-endian 32-bit register.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from(self.u16_at(offset)) | (u32::from(self.u16_at(offset + 2)) << 16)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(0x04)
    }

    /// Where BAR 0 decodes now (address, size): none while memory decoding
    /// is off or the BAR holds the sizing pattern.
    pub fn bar0(&self) -> Option<(u64, u64)> {
        if self.bar_size == 0 || self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let addr = self.u32_at(BAR0) & 0xffff_fff0;
        let sizing = !(self.bar_size - 1) & 0xffff_fff0;
        (addr != 0 && addr != sizing).then_some((u64::from(addr), u64::from(self.bar_size)))
    }
}

/// A function on the bus: its configuration space and its BAR 0.
pub trait PciDevice: Send {
    /// A configuration read of `data.len()` bytes at `offset`.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// A configuration write at `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// A read of BAR 0 at `offset`.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// A write to BAR 0 at `offset`.
    fn bar_write(&mut self, offset: u64, data: &[u8]);
    /// Where BAR 0 decodes now (address, size).
    fn bar0(&self) -> Option<(u64, u64)>;
    /// Back to the power-on state (machine reset).
    fn reset(&mut self);
}

/// A function shared by the vCPU threads and the main loop.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The host bridge at 00:00.0 (Red Hat's generic PCIe host bridge id, as
/// QEMU's gpex uses): nothing but a header of class 0x0600.
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        let mut c = ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0);
        c.seal();
        HostBridge(c)
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data)
    }
    fn bar_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _: u64, _: &[u8]) {}
    fn bar0(&self) -> Option<(u64, u64)> {
        None
    }
    fn reset(&mut self) {
        self.0.reset()
    }
}

#[derive(Clone)]
struct Slot {
    dev: SharedPciDevice,
    /// Where its BAR 0 decodes (refreshed after every configuration write).
    bar: Option<(u64, u64)>,
}

/// Bus 0: the configuration ports and the memory BARs of its devices.
pub struct PciBus {
    address: AtomicU32,
    slots: RwLock<Vec<Option<Slot>>>,
}

fn lock(d: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let bus = PciBus {
            address: AtomicU32::new(0),
            slots: RwLock::new(vec![None; SLOTS]),
        };
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::default()));
        bus.slots.write().unwrap_or_else(|e| e.into_inner())[0] = Some(Slot {
            dev: bridge,
            bar: None,
        });
        bus
    }

    /// Every function on the bus: its slot and its device.
    pub fn functions(&self) -> Vec<(usize, SharedPciDevice)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.dev.clone())))
            .collect()
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Option<usize> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().position(Option::is_none)
    }

    /// Puts `dev` in `slot`; fails when the slot is taken or out of range.
    pub fn insert(&self, slot: usize, dev: SharedPciDevice) -> Result<(), String> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(slot) {
            None => Err(format!("PCI slot {slot} does not exist (0..{SLOTS})")),
            Some(Some(_)) => Err(format!(
                "PCI: slot {slot} function 0 not available for the device, in use by another device"
            )),
            Some(s) => {
                let bar = lock(&dev).bar0();
                *s = Some(Slot { dev, bar });
                Ok(())
            }
        }
    }

    /// Takes the device out of `slot`.
    pub fn remove(&self, slot: usize) -> Option<SharedPciDevice> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        slots.get_mut(slot)?.take().map(|s| s.dev)
    }

    /// The device in `slot`.
    pub fn device(&self, slot: usize) -> Option<SharedPciDevice> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(slot)?.as_ref().map(|s| s.dev.clone())
    }

    /// Resets every device and refreshes where their BARs decode.
    pub fn reset(&self) {
        self.address.store(0, Ordering::SeqCst);
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        for s in slots.iter_mut().flatten() {
            let mut d = lock(&s.dev);
            d.reset();
            s.bar = d.bar0();
        }
    }

    /// The slot and register offset the latch selects for data port `port`,
    /// when it selects a function of bus 0 that exists.
    fn selected(&self, port: u16) -> Option<(usize, usize)> {
        let a = self.address.load(Ordering::SeqCst);
        let (enabled, bus, dev, func) = (a >> 31, (a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if enabled == 0 || bus != 0 || func != 0 {
            return None;
        }
        Some((
            dev as usize,
            (a & 0xfc) as usize + usize::from(port - CONFIG_DATA),
        ))
    }

    /// A port read in 0xCF8..=0xCFF (others are not the bus's).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::SeqCst).to_le_bytes());
            return;
        }
        data.fill(0xff);
        if !(CONFIG_DATA..=CONFIG_DATA + 3).contains(&port) {
            return;
        }
        if let Some((slot, offset)) = self.selected(port) {
            if let Some(dev) = self.device(slot) {
                let n = data.len().min(CONFIG_SIZE - offset);
                lock(&dev).config_read(offset, &mut data[..n]);
            }
        }
    }

    /// A port write in 0xCF8..=0xCFF.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS {
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                self.address.store(u32::from_le_bytes(v), Ordering::SeqCst);
            }
            return;
        }
        if !(CONFIG_DATA..=CONFIG_DATA + 3).contains(&port) {
            return;
        }
        let Some((slot, offset)) = self.selected(port) else {
            return;
        };
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(s)) = slots.get_mut(slot) {
            let n = data.len().min(CONFIG_SIZE - offset);
            let mut d = lock(&s.dev);
            d.config_write(offset, &data[..n]);
            s.bar = d.bar0();
        }
    }

    /// The device whose BAR holds `addr`, and the offset in the BAR.
    fn bar_device(&self, addr: u64) -> Option<(SharedPciDevice, u64)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().flatten().find_map(|s| {
            let (base, size) = s.bar?;
            (base..base + size)
                .contains(&addr)
                .then(|| (s.dev.clone(), addr - base))
        })
    }

    /// A guest read of memory space; returns false when no BAR claims it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.bar_device(addr) {
            Some((dev, off)) => {
                lock(&dev).bar_read(off, data);
                true
            }
            None => false,
        }
    }

    /// A guest write to memory space; returns false when no BAR claims it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.bar_device(addr) {
            Some((dev, off)) => {
                lock(&dev).bar_write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with a 4 KiB BAR whose bytes read back their offset.
    struct Echo(ConfigSpace, Vec<(u64, u8)>);

    impl PciDevice for Echo {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.0.read(offset, data)
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.0.write(offset, data)
        }
        fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8)
        }
        fn bar_write(&mut self, offset: u64, data: &[u8]) {
            self.1.push((offset, data[0]))
        }
        fn bar0(&self) -> Option<(u64, u64)> {
            self.0.bar0()
        }
        fn reset(&mut self) {
            self.0.reset()
        }
    }

    fn cfg_read(bus: &PciBus, slot: u32, reg: u32) -> u32 {
        bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | slot << 11 | reg).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_DATA, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg_write(bus: &PciBus, slot: u32, reg: u32, v: u32) {
        bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | slot << 11 | reg).to_le_bytes(),
        );
        bus.pio_write(CONFIG_DATA, &v.to_le_bytes());
    }

    #[test]
    fn conf1_probe_finds_the_host_bridge_and_empty_slots_read_all_ones() {
        let bus = PciBus::new();
        // Linux's pci_check_type1: the latch reads back what was written.
        bus.pio_write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_ADDRESS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        assert_eq!(cfg_read(&bus, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read(&bus, 0, 8) >> 8, 0x06_00_00, "class: host bridge");
        assert_eq!(cfg_read(&bus, 3, 0), 0xffff_ffff);
        // Other buses and functions do not exist.
        bus.pio_write(CONFIG_ADDRESS, &0x8001_0000u32.to_le_bytes());
        bus.pio_read(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.pio_write(CONFIG_ADDRESS, &0x8000_0100u32.to_le_bytes());
        bus.pio_read(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The latch's enable bit off: no function is selected.
        bus.pio_write(CONFIG_ADDRESS, &0u32.to_le_bytes());
        bus.pio_read(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn bar_sizing_moving_and_decoding() {
        let bus = PciBus::new();
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_00_00, 1);
        c.set_bar0(0x1000, 0xc000_0000);
        c.add_capability(0x09, &[0; 14]);
        let second = c.add_capability(0x11, &[0; 10]);
        c.seal();
        let dev = Arc::new(Mutex::new(Echo(c, Vec::new())));
        bus.insert(1, dev.clone()).unwrap();
        assert!(bus.insert(1, dev.clone()).unwrap_err().contains("in use"));
        assert_eq!(bus.free_slot(), Some(2));

        // The capability list: status bit, pointer, chain.
        assert_ne!(cfg_read(&bus, 1, 4) & (1 << 20), 0);
        assert_eq!(cfg_read(&bus, 1, 0x34) & 0xff, 0x40);
        assert_eq!((cfg_read(&bus, 1, 0x40) >> 8) & 0xff, second as u32);
        // Read-only registers stay put.
        cfg_write(&bus, 1, 0, 0);
        assert_eq!(cfg_read(&bus, 1, 0), 0x1042_1af4);

        let mut b = [0u8; 1];
        assert!(bus.mmio_read(0xc000_0010, &mut b));
        assert_eq!(b[0], 0x10);
        // Sizing: all ones read back as the size mask; nothing decodes meanwhile.
        cfg_write(&bus, 1, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read(&bus, 1, 0x10), 0xffff_f000);
        assert!(!bus.mmio_read(0xc000_0010, &mut b));
        // Moved to a new address, the BAR decodes there.
        cfg_write(&bus, 1, 0x10, 0xc010_0000);
        assert!(bus.mmio_read(0xc010_0020, &mut b));
        assert!(bus.mmio_write(0xc010_0004, &[7]));
        assert_eq!(dev.lock().unwrap().1, [(4, 7)]);
        // Memory decoding off: the BAR is gone.
        cfg_write(&bus, 1, 4, 0);
        assert!(!bus.mmio_read(0xc010_0020, &mut b));
        // Reset puts it back where the VMM placed it.
        bus.reset();
        assert!(bus.mmio_read(0xc000_0020, &mut b));
        assert!(bus.remove(1).is_some());
        assert_eq!(cfg_read(&bus, 1, 0), 0xffff_ffff);
    }
}
