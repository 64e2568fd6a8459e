//! The PVH boot ABI's `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h):
//! command line and the E820-style memory map.

use core::mem::size_of;

const HVM_START_MAGIC: u32 = 0x336e_c578;
/// `hvm_memmap_table_entry.type` for usable RAM (E820_RAM).
pub const MEMMAP_RAM: u32 = 1;

#[repr(C)]
#[derive(Copy, Clone)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    // version >= 1:
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

pub const MAX_MEMMAP: usize = 32;
pub const MAX_CMDLINE: usize = 1024;

/// A copy of what the loader handed us, taken before anything (the heap) may overwrite it.
pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    pub memmap: [MemmapEntry; MAX_MEMMAP],
    pub memmap_len: usize,
    /// ACPI RSDP (unused: QEMU's APIC/IOAPIC addresses and ISA overrides are fixed).
    #[allow(dead_code)]
    pub rsdp: u64,
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }
}

#[derive(Debug)]
pub enum PvhError {
    BadMagic(#[allow(dead_code)] u32),
    NoMemmap,
}

/// Copies the start info at physical (= virtual) address `paddr`.
///
/// # Safety
/// `paddr` must be the `%ebx` value from the PVH entry, and the memory it and its
/// pointers refer to must still be intact (call before the heap is set up).
pub unsafe fn read(paddr: u64) -> Result<BootInfo, PvhError> {
    // SAFETY: per the caller, paddr points to a StartInfo (identity-mapped, < 4 GiB);
    // read_unaligned because the ABI only promises 8-byte alignment for 64-bit loaders.
    let si = unsafe { (paddr as *const StartInfo).read_unaligned() };
    if si.magic != HVM_START_MAGIC {
        return Err(PvhError::BadMagic(si.magic));
    }
    let mut info = BootInfo {
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        memmap: [MemmapEntry {
            addr: 0,
            size: 0,
            kind: 0,
            reserved: 0,
        }; MAX_MEMMAP],
        memmap_len: 0,
        rsdp: si.rsdp_paddr,
    };
    if si.cmdline_paddr != 0 {
        let p = si.cmdline_paddr as *const u8;
        while info.cmdline_len < MAX_CMDLINE {
            // SAFETY: a NUL-terminated string placed by the loader; bounded by MAX_CMDLINE.
            let b = unsafe { p.add(info.cmdline_len).read() };
            if b == 0 {
                break;
            }
            info.cmdline[info.cmdline_len] = b;
            info.cmdline_len += 1;
        }
    }
    if si.version < 1 || si.memmap_paddr == 0 || si.memmap_entries == 0 {
        return Err(PvhError::NoMemmap);
    }
    let n = (si.memmap_entries as usize).min(MAX_MEMMAP);
    for i in 0..n {
        let addr = si.memmap_paddr + (i * size_of::<MemmapEntry>()) as u64;
        // SAFETY: entry i < memmap_entries of the loader's table.
        info.memmap[i] = unsafe { (addr as *const MemmapEntry).read_unaligned() };
    }
    info.memmap_len = n;
    Ok(info)
}
