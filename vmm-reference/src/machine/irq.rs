//! KVM's side of the PCI devices' interrupts and notifications: the GSI
//! routing table (the in-kernel irqchip's default routes plus one MSI route
//! per MSI-X vector, rewritten whole as KVM_SET_GSI_ROUTING requires), the
//! irqfds bound to those GSIs, and ioeventfds that move with a BAR.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::msix::{MsiMessage, VmHooks};

/// GSIs below this are the irqchip's pins (IOAPIC 0..24).
const FIRST_MSI_GSI: u32 = 24;
/// One past the last GSI KVM routes.
const GSI_LIMIT: u32 = 4096;

#[derive(Default)]
struct State {
    allocated: BTreeSet<u32>,
    routes: BTreeMap<u32, MsiMessage>,
}

/// The GSI routes, irqfds and ioeventfds of a VM's PCI devices.
pub struct KvmIrqs {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

/// KVM's default routes (arch/x86/kvm/irq_comm.c): GSIs 0..16 to the PICs
/// and the IOAPIC, 16..24 to the IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..FIRST_MSI_GSI {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    v
}

impl KvmIrqs {
    /// The routes of `vm` (whose irqchip exists).
    pub fn new(vm: Arc<VmFd>) -> Arc<KvmIrqs> {
        Arc::new(KvmIrqs {
            vm,
            state: Mutex::new(State::default()),
        })
    }

    fn commit(&self, st: &State) {
        let mut entries = default_routes();
        for (gsi, m) in &st.routes {
            let mut msi = kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            };
            msi.__bindgen_anon_1.pad = 0;
            entries.push(kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 { msi },
                ..Default::default()
            });
        }
        match KvmIrqRouting::from_entries(&entries) {
            Ok(table) => {
                if let Err(e) = self.vm.set_gsi_routing(&table) {
                    log::error!("KVM_SET_GSI_ROUTING: {e}");
                }
            }
            Err(e) => log::error!("GSI routing table: {e:?}"),
        }
    }
}

impl VmHooks for KvmIrqs {
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match msg {
            Some(m) => st.routes.insert(gsi, m) != Some(m),
            None => st.routes.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&st);
        }
    }

    fn alloc_msi(&self, fd: &EventFd) -> std::io::Result<u32> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = (FIRST_MSI_GSI..GSI_LIMIT)
            .find(|g| !st.allocated.contains(g))
            .ok_or_else(|| std::io::Error::other("no free GSI for an MSI-X vector"))?;
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|e| std::io::Error::other(format!("KVM_IRQFD: {e}")))?;
        st.allocated.insert(gsi);
        Ok(gsi)
    }

    fn free_msi(&self, gsi: u32, fd: &EventFd) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.vm.unregister_irqfd(fd, gsi) {
            log::warn!("unregistering the irqfd of GSI {gsi}: {e}");
        }
        st.allocated.remove(&gsi);
        if st.routes.remove(&gsi).is_some() {
            self.commit(&st);
        }
    }

    fn move_ioevent(&self, fd: &EventFd, from: Option<u64>, to: Option<u64>) {
        if let Some(a) = from {
            if let Err(e) = self
                .vm
                .unregister_ioevent(fd, &IoEventAddress::Mmio(a), NoDatamatch)
            {
                log::warn!("unregistering the ioeventfd at {a:#x}: {e}");
            }
        }
        if let Some(a) = to {
            if let Err(e) = self
                .vm
                .register_ioevent(fd, &IoEventAddress::Mmio(a), NoDatamatch)
            {
                log::error!("registering an ioeventfd at {a:#x}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvms() {
        let r = default_routes();
        assert_eq!(r.len(), 24 + 16);
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: reading the irqchip member of entries built as irqchip routes.
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(10, KVM_IRQCHIP_PIC_SLAVE, 2)));
        assert!(pins.contains(&(20, KVM_IRQCHIP_IOAPIC, 20)));
    }

    #[test]
    fn msi_routes_on_a_real_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("msi_routes_on_a_real_vm: skipped: /dev/kvm is not available");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let irqs = KvmIrqs::new(vm);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let gsi = irqs.alloc_msi(&fd).unwrap();
        assert_eq!(gsi, 24);
        let fd2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert_eq!(irqs.alloc_msi(&fd2).unwrap(), 25);
        irqs.set_msi_route(
            gsi,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x40,
            }),
        );
        fd.write(1).unwrap();
        irqs.move_ioevent(&fd2, None, Some(0xc000_3000));
        irqs.move_ioevent(&fd2, Some(0xc000_3000), Some(0xc001_3000));
        irqs.move_ioevent(&fd2, Some(0xc001_3000), None);
        irqs.free_msi(gsi, &fd);
        // The freed GSI is reused.
        let fd3 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert_eq!(irqs.alloc_msi(&fd3).unwrap(), 24);
    }
}
