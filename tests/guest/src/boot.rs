//! PVH entry: QEMU (after SeaBIOS has run and assigned every PCI BAR) jumps to
//! `pvh_start32` in 32-bit protected mode with paging off and `%ebx` = physical address of
//! the `hvm_start_info`. We build identity page tables, enter long mode and call
//! `rust_entry(start_info)`.
//!
//! Identity map: the first 64 GiB with 2 MiB pages (one PML4 entry, 64 page directories).
//! That covers RAM, the 32-bit PCI hole, the LAPIC/IOAPIC and the 64-bit PCI window
//! SeaBIOS uses (it places 64-bit BARs at 32 GiB+ on q35 behind root ports).
//! `paging::map_mmio` marks BAR ranges uncacheable and extends the map up to 512 GiB for
//! BARs beyond 64 GiB.

use core::arch::global_asm;

/// Number of 1 GiB slots mapped by the entry code (one page directory each).
pub const BOOT_MAPPED_GIB: usize = 64;

unsafe extern "C" {
    /// Level-3 table: slot i maps [i GiB, i+1 GiB).
    pub static mut boot_pdpt: [u64; 512];
    /// 64 page directories of 512 2-MiB entries, contiguous.
    pub static mut boot_pd: [u64; BOOT_MAPPED_GIB * 512];
    pub static __image_start: u8;
    pub static __image_end: u8;
}

global_asm!(
    // Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit physical entry point. QEMU's
    // PVH loader accepts a 4- or 8-byte descriptor; 8 matches what Linux emits.
    ".section .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",         // namesz ("Xen\0")
    ".long 8",         // descsz
    ".long 18",        // type
    ".asciz \"Xen\"",
    ".balign 4",
    ".quad pvh_start32",
    ".balign 4",
    //
    ".section .bss.boot, \"aw\", @nobits",
    ".balign 4096",
    ".global boot_pml4",
    "boot_pml4: .space 4096",
    ".global boot_pdpt",
    "boot_pdpt: .space 4096",
    ".global boot_pd",
    "boot_pd: .space 4096 * {gib}",
    ".balign 16",
    "boot_stack: .space 256 * 1024",
    "boot_stack_top:",
    //
    ".section .rodata.boot, \"a\"",
    ".balign 16",
    // Flat GDT: null, 64-bit code (0x08), data (0x10). No TSS: the guest never changes
    // privilege level and uses no IST stacks.
    "gdt64:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    "gdt64_end:",
    "gdt64_ptr:",
    ".word gdt64_end - gdt64 - 1",
    ".quad gdt64",
    //
    ".section .text.boot, \"ax\"",
    ".code32",
    ".global pvh_start32",
    "pvh_start32:",
    "    cli",
    "    cld",
    "    mov esi, ebx",                       // keep hvm_start_info (esi survives to 64-bit)
    // Zero .bss (QEMU zero-fills p_memsz beyond p_filesz, but do not depend on it).
    "    mov edi, offset __bss_start",
    "    mov ecx, offset __bss_end",
    "    sub ecx, edi",
    "    shr ecx, 2",
    "    xor eax, eax",
    "    rep stosd",
    "    mov esp, offset boot_stack_top",
    // PML4[0] -> PDPT
    "    mov eax, offset boot_pdpt",
    "    or eax, 3",                           // present | writable
    "    mov dword ptr [boot_pml4], eax",
    // PDPT[i] -> PD i, i < 64
    "    xor ecx, ecx",
    "2:",
    "    mov eax, ecx",
    "    shl eax, 12",
    "    add eax, offset boot_pd",
    "    or eax, 3",
    "    mov dword ptr [boot_pdpt + ecx * 8], eax",
    "    inc ecx",
    "    cmp ecx, {gib}",
    "    jb 2b",
    // PD entry j maps physical j * 2 MiB: low dword (j << 21) | PS | W | P, high j >> 11.
    "    xor ecx, ecx",
    "3:",
    "    mov eax, ecx",
    "    shl eax, 21",
    "    or eax, 0x83",
    "    mov edx, ecx",
    "    shr edx, 11",
    "    mov dword ptr [boot_pd + ecx * 8], eax",
    "    mov dword ptr [boot_pd + ecx * 8 + 4], edx",
    "    inc ecx",
    "    cmp ecx, {gib} * 512",
    "    jb 3b",
    "    mov eax, offset boot_pml4",
    "    mov cr3, eax",
    "    mov eax, cr4",
    "    or eax, 1 << 5",                      // PAE
    "    mov cr4, eax",
    "    mov ecx, 0xC0000080",                 // EFER
    "    rdmsr",
    "    or eax, 1 << 8",                      // LME
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001",                  // PG | PE
    "    mov cr0, eax",
    "    lgdt [gdt64_ptr]",
    // Far return into the 64-bit code segment (compatibility -> long mode).
    // (32-bit pushes through a register: `push imm` would assemble as a 16-bit push.)
    "    mov eax, 0x08",
    "    push eax",
    "    mov eax, offset pvh_long_mode",
    "    push eax",
    "    retf",
    ".code64",
    "pvh_long_mode:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    xor eax, eax",
    "    mov fs, ax",
    "    mov gs, ax",
    "    lea rsp, [rip + boot_stack_top]",
    "    mov edi, esi",                        // rust_entry(start_info_paddr)
    "    xor ebp, ebp",
    "    call {entry}",
    "    ud2",
    gib = const BOOT_MAPPED_GIB,
    entry = sym crate::rust_entry,
);
