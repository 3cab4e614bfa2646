//! The port-I/O devices the vCPUs reach: COM1 (a vm-superio 16550 on a
//! chardev) and the i8042's reset line. Requests for the main loop (reset,
//! shutdown) are queued here and wake it through a `mio::Waker`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chardev_ringbuf::FrontendHandle;

use crate::devices::pci::{PciBus, CONFIG_ADDRESS};
use crate::devices::virtio_mmio::{SharedMmioDevice, WINDOW};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
const I8042_COMMAND: u16 = 0x64;
const I8042_DATA: u16 = 0x60;
const I8042_RESET: u8 = 0xfe;
/// The reset control register (a byte at 0xCF9, beside the PCI address latch).
const RESET_CONTROL: u16 = 0xcf9;
const RESET_CPU: u8 = 0x04;

/// Raises the serial port's interrupt through an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the chardev to read input again once the guest drained the
/// receive FIFO (the back-pressure of the chardev model).
pub struct InputReady(pub Option<FrontendHandle>);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(h) = &self.0 {
            h.accept_input();
        }
    }
}

/// The 16550 of COM1, writing the guest's output to a chardev.
pub type SerialPort = Serial<EventFdTrigger, InputReady, Box<dyn Write + Send>>;

/// COM1 as a chardev frontend: input goes to its receive FIFO, never more
/// than the FIFO has room for.
pub struct SerialFrontend(pub Arc<Mutex<SerialPort>>);

impl chardev_ringbuf::Frontend for SerialFrontend {
    fn can_receive(&mut self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fifo_capacity()
    }

    fn receive(&mut self, data: &[u8]) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = s.enqueue_raw_bytes(data) {
            log::debug!("serial input: {e:?}");
        }
    }
}

/// What the vCPU threads see of the machine.
pub struct IoBus {
    serial: Arc<Mutex<SerialPort>>,
    /// Devices on the MMIO bus: base address and device.
    mmio: Vec<(u64, SharedMmioDevice)>,
    /// PCI bus 0.
    pci: Arc<PciBus>,
    reset: AtomicBool,
    /// A device was reset by its driver (pending hot-unplugs may complete).
    device_check: AtomicBool,
    shutdown: AtomicBool,
    waker: Arc<mio::Waker>,
}

impl IoBus {
    /// A bus with COM1, the MMIO devices, PCI bus 0 and a waker of the main loop.
    pub fn new(
        serial: Arc<Mutex<SerialPort>>,
        mmio: Vec<(u64, SharedMmioDevice)>,
        pci: Arc<PciBus>,
        waker: Arc<mio::Waker>,
    ) -> Self {
        IoBus {
            serial,
            mmio,
            pci,
            reset: AtomicBool::new(false),
            device_check: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            waker,
        }
    }

    /// A port write from the guest.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match (port, data) {
            (COM1..=0x3ff, [value]) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = s.write((port - COM1) as u8, *value) {
                    log::debug!("serial write: {e:?}");
                }
            }
            (I8042_COMMAND, [I8042_RESET]) => self.request_reset(),
            // The reset control register of PC chipsets (Linux's reboot=pci).
            (RESET_CONTROL, [v]) if v & RESET_CPU != 0 => self.request_reset(),
            (CONFIG_ADDRESS..=0xcff, _) => self.pci.pio_write(port, data),
            _ => {}
        }
    }

    /// A port read from the guest; unclaimed ports read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match (port, data.len()) {
            (COM1..=0x3ff, 1) => {
                data[0] = self
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read((port - COM1) as u8);
            }
            (I8042_COMMAND | I8042_DATA, 1) => data[0] = 0,
            (CONFIG_ADDRESS..=0xcff, _) => self.pci.pio_read(port, data),
            _ => data.fill(0xff),
        }
    }

    fn mmio_device(&self, addr: u64) -> Option<(u64, &SharedMmioDevice)> {
        self.mmio
            .iter()
            .find(|(base, _)| (*base..*base + WINDOW).contains(&addr))
            .map(|(base, d)| (addr - base, d))
    }

    /// A guest read of MMIO space; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio_device(addr) {
            Some((off, d)) => d.lock().unwrap_or_else(|e| e.into_inner()).read(off, data),
            None => {
                if !self.pci.mmio_read(addr, data) {
                    data.fill(0xff)
                }
            }
        }
    }

    /// A guest write to MMIO space.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.mmio_device(addr) {
            Some((off, d)) => d.lock().unwrap_or_else(|e| e.into_inner()).write(off, data),
            None => {
                self.pci.mmio_write(addr, data);
            }
        }
    }

    /// PCI bus 0.
    pub fn pci(&self) -> &PciBus {
        &self.pci
    }

    /// Tells the main loop that a device was reset by its driver.
    pub fn request_device_check(&self) {
        self.device_check.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Takes a pending device check.
    pub fn take_device_check(&self) -> bool {
        self.device_check.swap(false, Ordering::SeqCst)
    }

    /// Asks the main loop to reset the machine.
    pub fn request_reset(&self) {
        self.reset.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Asks the main loop to shut the machine down.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Takes a pending reset request.
    pub fn take_reset(&self) -> bool {
        self.reset.swap(false, Ordering::SeqCst)
    }

    /// Takes a pending shutdown request.
    pub fn take_shutdown(&self) -> bool {
        self.shutdown.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (mio::Poll, IoBus) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let serial = Arc::new(Mutex::new(SerialPort::with_events(
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            InputReady(None),
            Box::new(std::io::sink()),
        )));
        let bus = IoBus::new(serial, Vec::new(), Arc::new(PciBus::new()), waker);
        (poll, bus)
    }

    #[test]
    fn resets_from_the_i8042_and_the_reset_control_register() {
        let (_poll, bus) = bus();
        bus.pio_write(RESET_CONTROL, &[0x02]);
        assert!(!bus.take_reset(), "bit 2 (reset CPU) not set");
        bus.pio_write(RESET_CONTROL, &[0x06]);
        assert!(bus.take_reset());
        // A dword at 0xCF8 is the PCI address latch, not a reset.
        bus.pio_write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        assert!(!bus.take_reset());
        let mut v = [0u8; 4];
        bus.pio_read(CONFIG_ADDRESS, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x8000_0000);
        bus.pio_write(I8042_COMMAND, &[I8042_RESET]);
        assert!(bus.take_reset());
        // Nothing claims these: all ones.
        let mut b = [0u8; 2];
        bus.pio_read(0x510, &mut b);
        assert_eq!(b, [0xff; 2]);
        bus.mmio_read(0xe000_0000, &mut v);
        assert_eq!(v, [0xff; 4]);
    }
}
