//! Entering a flat 64-bit guest: the guest memory layout, identity-mapped
//! page tables, a GDT, and the registers for long mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the embedded guest is loaded and entered.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;
/// The guest's initial stack pointer (grows down, below the EBDA).
pub const GUEST_STACK: u64 = 0x8_0000;

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Maps the fourth GiB, where the virtio-mmio devices are.
const PD_HIGH_ADDR: u64 = 0xc000;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags, base and limit (the x86 descriptor layout).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment a GDT entry describes.
fn segment(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: ((((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32) << 12 | 0xfff,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// Writes the GDT and the page tables identity-mapping the first GiB (RAM)
/// and the fourth (the virtio-mmio devices) with 2 MiB pages.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PD_ADDR | 0x03, GuestAddress(PDPT_ADDR))?;
    mem.write_obj(PD_HIGH_ADDR | 0x03, GuestAddress(PDPT_ADDR + 3 * 8))?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))?;
        // Present, writable, cache-disabled, 2 MiB page.
        mem.write_obj(
            ((3 << 30) + (i << 21)) | 0x93,
            GuestAddress(PD_HIGH_ADDR + i * 8),
        )?;
    }
    Ok(())
}

/// Puts a vCPU in 64-bit mode at `entry`, with the tables of
/// [`write_tables`] and `rsi` pointing at the zero page for Linux (0 for
/// the embedded guest).
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64, rsi: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
    let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
    let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;
    vcpu.set_regs(&kvm_regs {
        rip: entry,
        rsi,
        rsp: GUEST_STACK,
        rbp: GUEST_STACK,
        rflags: 0x2,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.l, code.db, code.present, code.type_, code.selector),
            (1, 0, 1, 0xb, 8)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.type_, data.s), (1, 3, 1));
    }
}
