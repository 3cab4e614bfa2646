//! Booting a Linux kernel (bzImage or ELF vmlinux) with the 64-bit Linux
//! boot protocol: the kernel loaded by rust-vmm's linux-loader, the command
//! line, an optional initrd, and the zero page (boot_params) with an e820
//! map of guest RAM.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::MachineError;

/// Where the zero page (boot_params) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted (the kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Where the kernel is loaded (the protected-mode kernel's usual 1 MiB).
pub const KERNEL_ADDR: u64 = 0x10_0000;
/// End of conventional memory below the EBDA.
const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// A Linux kernel to boot instead of the embedded guest.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// An initial RAM disk.
    pub initrd: Option<PathBuf>,
}

fn open(path: &Path, what: &str) -> Result<File, MachineError> {
    File::open(path).map_err(|e| {
        MachineError::Config(format!("cannot open the {what} {}: {e}", path.display()))
    })
}

/// Loads the kernel, command line, initrd and zero page; returns the
/// 64-bit entry point.
pub fn load(memory: &GuestMemoryMmap, boot: &LinuxBoot) -> Result<u64, MachineError> {
    let mut kernel = open(&boot.kernel, "kernel")?;
    let highmem = Some(GuestAddress(KERNEL_ADDR));
    // A bzImage first (it is what distributions ship), then an ELF vmlinux.
    let (loaded, entry) = match BzImage::load(memory, None, &mut kernel, highmem) {
        // The 64-bit entry of a bzImage is 0x200 past its protected-mode start.
        Ok(r) => {
            let entry = r.kernel_load.raw_value() + 0x200;
            (r, entry)
        }
        Err(bz) => {
            let mut kernel = open(&boot.kernel, "kernel")?;
            let r =
                Elf::load(memory, Some(GuestAddress(0)), &mut kernel, highmem).map_err(|elf| {
                    MachineError::Config(format!(
                        "{} is neither a bzImage ({bz}) nor an ELF vmlinux ({elf})",
                        boot.kernel.display()
                    ))
                })?;
            let entry = r.kernel_load.raw_value();
            (r, entry)
        }
    };

    if boot.cmdline.len() >= CMDLINE_MAX {
        return Err(MachineError::Config(format!(
            "the kernel command line is {} bytes; at most {} fit",
            boot.cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut cmdline = Cmdline::new(CMDLINE_MAX)
        .map_err(|e| MachineError::Config(format!("command line: {e}")))?;
    if !boot.cmdline.is_empty() {
        cmdline
            .insert_str(&boot.cmdline)
            .map_err(|e| MachineError::Config(format!("command line: {e}")))?;
    }
    load_cmdline(memory, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| MachineError::Memory(format!("command line: {e}")))?;

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (boot.cmdline.len() + 1) as u32;

    let mem_end = memory.last_addr().raw_value() + 1;
    if let Some(path) = &boot.initrd {
        let data = std::fs::read(path).map_err(|e| {
            MachineError::Config(format!("cannot read the initrd {}: {e}", path.display()))
        })?;
        // The initrd goes as high as the kernel allows, page aligned.
        let max = u64::from(params.hdr.initrd_addr_max)
            .max(0x37ff_ffff)
            .min(mem_end - 1);
        let start = (max + 1).saturating_sub(data.len() as u64) & !0xfff;
        if start < loaded.kernel_end {
            return Err(MachineError::Config(format!(
                "the initrd ({} bytes) does not fit in guest memory above the kernel",
                data.len()
            )));
        }
        memory
            .write_slice(&data, GuestAddress(start))
            .map_err(|e| MachineError::Memory(format!("initrd: {e}")))?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let e820 = [(0, EBDA_START), (KERNEL_ADDR, mem_end - KERNEL_ADDR)];
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        memory,
    )
    .map_err(|e| MachineError::Memory(format!("zero page: {e}")))?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// A minimal bzImage: one setup sector with the boot protocol header,
    /// then a protected-mode kernel of recognisable bytes.
    fn fake_bzimage(dir: &Path) -> PathBuf {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes()); // protocol 2.12
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        img.extend(std::iter::repeat_n(0x90u8, 4096)); // the "kernel"
        let path = dir.join("bzImage");
        std::fs::write(&path, img).unwrap();
        path
    }

    #[test]
    fn loads_a_bzimage_with_cmdline_initrd_and_e820() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_bzimage(dir.path());
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, b"070701initrd-bytes").unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let boot = LinuxBoot {
            kernel,
            cmdline: "console=ttyS0 panic=1".into(),
            initrd: Some(initrd),
        };
        let entry = load(&mem, &boot).unwrap();
        assert_eq!(entry, KERNEL_ADDR + 0x200);
        let mut k = [0u8; 4];
        mem.read_slice(&mut k, GuestAddress(KERNEL_ADDR)).unwrap();
        assert_eq!(k, [0x90; 4], "the protected-mode kernel is at 1 MiB");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        let mut cmd = [0u8; 22];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 panic=1\0");
        assert_eq!({ params.e820_entries }, 2);
        assert_eq!({ params.e820_table[1].addr }, KERNEL_ADDR);
        assert_eq!({ params.e820_table[1].size }, (64 << 20) - KERNEL_ADDR);
        let (start, size) = ({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size });
        assert_eq!(size, 18);
        assert_eq!(start % 4096, 0);
        let mut rd = [0u8; 6];
        mem.read_slice(&mut rd, GuestAddress(u64::from(start)))
            .unwrap();
        assert_eq!(&rd, b"070701");
    }

    #[test]
    fn refuses_what_is_not_a_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0x41u8; 8192]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let boot = LinuxBoot {
            kernel: path,
            cmdline: String::new(),
            initrd: None,
        };
        let err = load(&mem, &boot).unwrap_err().to_string();
        assert!(err.contains("neither a bzImage"), "{err}");
        let missing = LinuxBoot {
            kernel: dir.path().join("nope"),
            cmdline: String::new(),
            initrd: None,
        };
        assert!(load(&mem, &missing)
            .unwrap_err()
            .to_string()
            .contains("cannot open the kernel"));
        let long = LinuxBoot {
            kernel: fake_bzimage(dir.path()),
            cmdline: "x".repeat(CMDLINE_MAX),
            initrd: None,
        };
        assert!(load(&mem, &long)
            .unwrap_err()
            .to_string()
            .contains("command line"));
    }
}
