//! MSI-X (PCI Local Bus 3.0, section 6.8.2): the vector table and the
//! pending-bit array in a BAR, the message control bits of the capability,
//! and the delivery of each vector through an eventfd that the hypervisor
//! routes (KVM: an irqfd on a GSI whose route is the vector's message).
//!
//! Masking is done here, not in the hypervisor: a masked vector (or a
//! masked function) records its pending bit instead of firing, and fires
//! when unmasked, as the specification asks.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_MASK: u16 = 1 << 14;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The capability id of MSI-X.
pub const CAP_ID: u8 = 0x11;

/// What a device writes to signal a vector: address and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// The message address (0xFEExxxxx on x86: the destination APIC).
    pub address: u64,
    /// The message data (vector and delivery mode on x86).
    pub data: u32,
}

/// What PCI devices need from the hypervisor: MSI routes for their
/// vectors' eventfds, and queue notification eventfds that follow a BAR
/// when the guest moves it.
pub trait VmHooks: Send + Sync {
    /// Points `gsi` at `msg` (None: no route, the vector is disabled).
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>);
    /// Allocates a GSI for a new vector and binds `fd` to it.
    fn alloc_msi(&self, fd: &EventFd) -> std::io::Result<u32>;
    /// Unbinds `fd` from `gsi`, drops its route and frees the GSI.
    fn free_msi(&self, gsi: u32, fd: &EventFd);
    /// Moves the ioeventfd `fd` (a guest write at the address signals it)
    /// from one guest-physical address to another (None: not registered).
    fn move_ioevent(&self, fd: &EventFd, from: Option<u64>, to: Option<u64>);
}

/// One vector: its GSI and the eventfd that fires it.
pub struct MsiVector {
    /// The GSI the eventfd is bound to.
    pub gsi: u32,
    /// Writing 1 raises the interrupt.
    pub fd: EventFd,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address: u64,
    data: u32,
    masked: bool,
}

impl Entry {
    /// The entry as the table lays it out: address, data, vector control.
    fn raw(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.address.to_le_bytes());
        raw[8..12].copy_from_slice(&self.data.to_le_bytes());
        raw[12..16].copy_from_slice(&u32::from(self.masked).to_le_bytes());
        raw
    }
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector is masked at reset.
        Entry {
            address: 0,
            data: 0,
            masked: true,
        }
    }
}

/// The MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsiVector>,
    hooks: Arc<dyn VmHooks>,
}

impl Msix {
    /// `count` vectors (1..=2048), each with an eventfd bound to a GSI of `hooks`.
    pub fn new(count: u16, hooks: Arc<dyn VmHooks>) -> std::io::Result<Msix> {
        let mut vectors = Vec::new();
        for _ in 0..count.clamp(1, 2048) {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            match hooks.alloc_msi(&fd) {
                Ok(gsi) => vectors.push(MsiVector { gsi, fd }),
                Err(e) => {
                    for v in &vectors {
                        hooks.free_msi(v.gsi, &v.fd);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Msix {
            entries: vec![Entry::default(); vectors.len()],
            pending: vec![false; vectors.len()],
            enabled: false,
            function_masked: false,
            vectors,
            hooks,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.vectors.len() as u16
    }

    /// The vectors (their GSIs and eventfds).
    #[cfg(test)]
    pub fn vectors(&self) -> &[MsiVector] {
        &self.vectors
    }

    /// The capability's body (after id and next): message control, table
    /// and PBA offsets, both in BAR 0.
    pub fn capability_body(&self, table: u32, pba: u32) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&(self.len() - 1).to_le_bytes());
        b[2..6].copy_from_slice(&table.to_le_bytes());
        b[6..10].copy_from_slice(&pba.to_le_bytes());
        b
    }

    /// Whether MSI-X is enabled (INTx is not used then).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The enable and mask bits of message control.
    pub fn control_bits(&self) -> u16 {
        (if self.enabled { CONTROL_ENABLE } else { 0 })
            | (if self.function_masked {
                CONTROL_MASK
            } else {
                0
            })
    }

    /// The guest wrote message control.
    pub fn control_write(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_MASK != 0;
        if enabled != self.enabled {
            self.enabled = enabled;
            for i in 0..self.entries.len() {
                self.update_route(i);
            }
        }
        self.function_masked = masked;
        self.fire_pending();
    }

    fn update_route(&self, i: usize) {
        let e = self.entries[i];
        let msg = self.enabled.then_some(MsiMessage {
            address: e.address,
            data: e.data,
        });
        self.hooks.set_msi_route(self.vectors[i].gsi, msg);
    }

    fn fire_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for i in 0..self.entries.len() {
            if self.pending[i] && !self.entries[i].masked {
                self.pending[i] = false;
                let _ = self.vectors[i].fd.write(1);
            }
        }
    }

    /// A read of the table at `offset` (4 or 8 bytes at a time; anything
    /// else reads as zero).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(e) = self.entries.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let raw = e.raw();
        let at = (offset % ENTRY_SIZE) as usize;
        let n = data.len().min(16 - at);
        data[..n].copy_from_slice(&raw[at..at + n]);
    }

    /// A write to the table at `offset`.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let i = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get_mut(i) else {
            return;
        };
        let mut raw = e.raw();
        let at = (offset % ENTRY_SIZE) as usize;
        let n = data.len().min(16 - at);
        raw[at..at + n].copy_from_slice(&data[..n]);
        let before = *e;
        e.address = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        e.data = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        e.masked = raw[12] & 1 != 0;
        let moved = (before.address, before.data) != (e.address, e.data);
        let unmasked = before.masked && !e.masked;
        if moved && self.enabled {
            self.update_route(i);
        }
        if unmasked {
            self.fire_pending();
        }
    }

    /// A read of the pending-bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    /// Signals `vector`: fires it, or records it pending while masked.
    /// Returns false when MSI-X is off or the vector does not exist (the
    /// caller then uses INTx, or nothing).
    pub fn trigger(&mut self, vector: u16) -> bool {
        let i = usize::from(vector);
        if !self.enabled || i >= self.entries.len() {
            return false;
        }
        if self.function_masked || self.entries[i].masked {
            self.pending[i] = true;
        } else {
            let _ = self.vectors[i].fd.write(1);
        }
        true
    }

    /// Back to the power-on state: disabled, every vector masked.
    pub fn reset(&mut self) {
        let was_enabled = self.enabled;
        self.enabled = false;
        self.function_masked = false;
        self.entries.fill(Entry::default());
        self.pending.fill(false);
        if was_enabled {
            for v in &self.vectors {
                self.hooks.set_msi_route(v.gsi, None);
            }
        }
    }
}

impl Msix {
    /// Frees every vector (hot-unplug): the function interrupts no more.
    pub fn release(&mut self) {
        self.reset();
        for v in self.vectors.drain(..) {
            self.hooks.free_msi(v.gsi, &v.fd);
        }
        self.entries.clear();
        self.pending.clear();
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for v in &self.vectors {
            self.hooks.free_msi(v.gsi, &v.fd);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what a device asks of the hypervisor.
    #[derive(Default)]
    pub struct FakeHooks {
        pub routes: Mutex<std::collections::BTreeMap<u32, MsiMessage>>,
        pub next: Mutex<u32>,
        pub freed: Mutex<Vec<u32>>,
        pub ioevents: Mutex<Vec<(Option<u64>, Option<u64>)>>,
    }

    impl VmHooks for FakeHooks {
        fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) {
            let mut r = self.routes.lock().unwrap();
            match msg {
                Some(m) => r.insert(gsi, m),
                None => r.remove(&gsi),
            };
        }
        fn alloc_msi(&self, _: &EventFd) -> std::io::Result<u32> {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            Ok(23 + *n)
        }
        fn free_msi(&self, gsi: u32, _: &EventFd) {
            self.freed.lock().unwrap().push(gsi);
        }
        fn move_ioevent(&self, _: &EventFd, from: Option<u64>, to: Option<u64>) {
            self.ioevents.lock().unwrap().push((from, to));
        }
    }

    fn w32(m: &mut Msix, off: u64, v: u32) {
        m.table_write(off, &v.to_le_bytes());
    }

    #[test]
    fn routes_follow_the_table_and_masking_defers_delivery() {
        let hooks = Arc::new(FakeHooks::default());
        let mut m = Msix::new(2, hooks.clone()).unwrap();
        assert_eq!(m.capability_body(0x4000, 0x5000)[0..2], [1, 0]);
        // Disabled: no route, triggers go elsewhere.
        assert!(!m.trigger(0));
        w32(&mut m, 0, 0xfee0_0000);
        w32(&mut m, 8, 0x41);
        assert!(hooks.routes.lock().unwrap().is_empty());
        m.control_write(CONTROL_ENABLE);
        assert_eq!(
            hooks.routes.lock().unwrap()[&24],
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        );
        // Masked at reset: the trigger is pending, the eventfd silent.
        assert!(m.trigger(0));
        assert!(m.vectors()[0].fd.read().is_err());
        let mut pba = [0u8; 1];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        // Unmasking delivers it.
        w32(&mut m, 12, 0);
        assert_eq!(m.vectors()[0].fd.read().unwrap(), 1);
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Function mask defers too.
        m.control_write(CONTROL_ENABLE | CONTROL_MASK);
        assert!(m.trigger(0));
        assert!(m.vectors()[0].fd.read().is_err());
        m.control_write(CONTROL_ENABLE);
        assert_eq!(m.vectors()[0].fd.read().unwrap(), 1);
        // A new message moves the route; reading the entry gives it back.
        w32(&mut m, 8, 0x42);
        assert_eq!(hooks.routes.lock().unwrap()[&24].data, 0x42);
        let mut e = [0u8; 4];
        m.table_read(8, &mut e);
        assert_eq!(u32::from_le_bytes(e), 0x42);
        // Out-of-range accesses and vectors are ignored.
        w32(&mut m, 0x1000, 1);
        assert!(!m.trigger(7));
        m.reset();
        assert!(hooks.routes.lock().unwrap().is_empty());
        drop(m);
        assert_eq!(*hooks.freed.lock().unwrap(), [24, 25]);
    }
}
