//! Local APIC (xAPIC, MMIO), I/O APIC and the legacy 8259 PICs (remapped, masked).
//!
//! Addresses are QEMU's fixed ones (also what its ACPI MADT reports): LAPIC 0xFEE0_0000,
//! I/O APIC 0xFEC0_0000. ISA IRQ 0 (PIT) arrives on I/O APIC pin 2 (the MADT's interrupt
//! source override on both `pc` and `q35`).

use crate::arch::{self, outb};
use crate::interrupts::{APIC_ERROR_VECTOR, PIC_BASE_VECTOR, SPURIOUS_VECTOR};
use core::sync::atomic::{AtomicU32, Ordering};

const IA32_APIC_BASE: u32 = 0x1B;
const LAPIC_DEFAULT: u64 = 0xFEE0_0000;
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;

const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_ESR: u32 = 0x280;
const REG_ICR_LO: u32 = 0x300;
const REG_ICR_HI: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const LVT_MASKED: u32 = 1 << 16;

static LAPIC_BASE: AtomicU32 = AtomicU32::new(LAPIC_DEFAULT as u32);

fn lapic_read(reg: u32) -> u32 {
    let addr = u64::from(LAPIC_BASE.load(Ordering::Relaxed)) + u64::from(reg);
    // SAFETY: the LAPIC page is identity-mapped UC (init) and reg is an xAPIC register.
    unsafe { (addr as *const u32).read_volatile() }
}

fn lapic_write(reg: u32, v: u32) {
    let addr = u64::from(LAPIC_BASE.load(Ordering::Relaxed)) + u64::from(reg);
    // SAFETY: as for lapic_read.
    unsafe { (addr as *mut u32).write_volatile(v) };
}

/// Remaps the 8259s away from the exception vectors and masks every line: all interrupts
/// go through the I/O APIC. A spurious PIC interrupt then lands on 0xE7/0xEF (ignored).
fn disable_pic() {
    for (cmd, data, base, cascade) in [
        (0x20, 0x21, PIC_BASE_VECTOR, 4u8),
        (0xA0, 0xA1, PIC_BASE_VECTOR + 8, 2),
    ] {
        outb(cmd, 0x11); // ICW1: init, ICW4 follows
        outb(data, base); // ICW2: vector base
        outb(data, cascade); // ICW3
        outb(data, 0x01); // ICW4: 8086 mode
        outb(data, 0xFF); // OCW1: mask all
    }
}

pub fn init() {
    disable_pic();
    let base_msr = arch::rdmsr(IA32_APIC_BASE);
    let base = base_msr & 0x000f_ffff_ffff_f000;
    LAPIC_BASE.store(base as u32, Ordering::Relaxed);
    // Global enable (bit 11), xAPIC mode (x2APIC bit 10 left clear).
    arch::wrmsr(IA32_APIC_BASE, base_msr | (1 << 11));
    crate::paging::map_mmio(base, 4096).expect("LAPIC below 512 GiB");
    crate::paging::map_mmio(IOAPIC_BASE, 4096).expect("IOAPIC below 512 GiB");
    lapic_write(REG_TPR, 0);
    lapic_write(REG_LVT_LINT0, LVT_MASKED); // ExtINT from the (masked) PIC: off
    lapic_write(REG_LVT_LINT1, 4 << 8); // NMI
    lapic_write(REG_LVT_ERROR, u32::from(APIC_ERROR_VECTOR));
    lapic_write(REG_LVT_TIMER, LVT_MASKED);
    lapic_write(REG_SVR, (1 << 8) | u32::from(SPURIOUS_VECTOR)); // software enable
    lapic_write(REG_ESR, 0);
    lapic_write(REG_EOI, 0);
    ioapic_mask_all();
}

pub fn id() -> u8 {
    (lapic_read(REG_ID) >> 24) as u8
}

pub fn version() -> u32 {
    lapic_read(REG_VERSION)
}

/// End of interrupt. For level-triggered I/O APIC vectors the LAPIC broadcasts the EOI to
/// the I/O APIC, which clears the pin's Remote IRR (re-arming it).
pub fn eoi() {
    lapic_write(REG_EOI, 0);
}

/// Sends a fixed, edge-triggered IPI with `vector` to this CPU (ICR shorthand "self").
pub fn self_ipi(vector: u8) {
    lapic_write(REG_ICR_HI, 0);
    lapic_write(REG_ICR_LO, (1 << 18) | u32::from(vector));
    for _ in 0..1_000_000 {
        if lapic_read(REG_ICR_LO) & (1 << 12) == 0 {
            break; // delivered
        }
        core::hint::spin_loop();
    }
}

/// The MSI address/data pair that targets this CPU with `vector`: fixed delivery,
/// physical destination, edge (Intel SDM vol. 3 §11.11).
pub fn msi_message(vector: u8) -> (u64, u32) {
    (LAPIC_DEFAULT | (u64::from(id()) << 12), u32::from(vector))
}

/// Timer: divide by 16; `start_periodic` takes the count per period.
pub fn timer_start_periodic(vector: u8, count: u32) {
    lapic_write(REG_TIMER_DIVIDE, 0x3); // divide by 16
    lapic_write(REG_LVT_TIMER, (1 << 17) | u32::from(vector)); // periodic
    lapic_write(REG_TIMER_INIT, count);
}

/// Counts the LAPIC timer runs down (divide 16) in `ns` nanoseconds of TSC time.
pub fn timer_calibrate(ns: u64) -> u32 {
    lapic_write(REG_TIMER_DIVIDE, 0x3);
    lapic_write(REG_LVT_TIMER, LVT_MASKED);
    lapic_write(REG_TIMER_INIT, u32::MAX);
    crate::time::delay_ns(ns);
    let left = lapic_read(REG_TIMER_CURRENT);
    lapic_write(REG_TIMER_INIT, 0);
    u32::MAX - left
}

// ---- I/O APIC ----

fn ioapic_read(reg: u32) -> u32 {
    arch::without_interrupts(|| {
        // SAFETY: IOREGSEL/IOWIN of the identity-mapped UC I/O APIC; the select+access pair
        // is made atomic by disabling interrupts (single CPU).
        unsafe {
            (IOAPIC_BASE as *mut u32).write_volatile(reg);
            ((IOAPIC_BASE + 0x10) as *const u32).read_volatile()
        }
    })
}

fn ioapic_write(reg: u32, v: u32) {
    arch::without_interrupts(|| {
        // SAFETY: as for ioapic_read.
        unsafe {
            (IOAPIC_BASE as *mut u32).write_volatile(reg);
            ((IOAPIC_BASE + 0x10) as *mut u32).write_volatile(v);
        }
    })
}

/// Number of redirection entries (pins).
pub fn ioapic_pins() -> u32 {
    ((ioapic_read(1) >> 16) & 0xFF) + 1
}

fn ioapic_mask_all() {
    for pin in 0..ioapic_pins() {
        ioapic_write(0x10 + 2 * pin, LVT_MASKED);
        ioapic_write(0x11 + 2 * pin, 0);
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    Level,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Polarity {
    High,
    Low,
}

/// Routes I/O APIC pin `gsi` to `vector` on this CPU (fixed, physical), masked or not.
pub fn ioapic_route(
    gsi: u32,
    vector: u8,
    trigger: Trigger,
    polarity: Polarity,
    masked: bool,
) -> bool {
    if gsi >= ioapic_pins() {
        return false;
    }
    let mut lo = u32::from(vector);
    if polarity == Polarity::Low {
        lo |= 1 << 13;
    }
    if trigger == Trigger::Level {
        lo |= 1 << 15;
    }
    if masked {
        lo |= LVT_MASKED;
    }
    // High half first, so the entry never points at a stale destination while unmasked.
    ioapic_write(0x10 + 2 * gsi, LVT_MASKED);
    ioapic_write(0x11 + 2 * gsi, u32::from(id()) << 24);
    ioapic_write(0x10 + 2 * gsi, lo);
    true
}

pub fn ioapic_set_masked(gsi: u32, masked: bool) {
    let lo = ioapic_read(0x10 + 2 * gsi);
    let lo = if masked {
        lo | LVT_MASKED
    } else {
        lo & !LVT_MASKED
    };
    ioapic_write(0x10 + 2 * gsi, lo);
}

/// Reads a pin's redirection entry low word (for diagnostics and tests).
pub fn ioapic_entry(gsi: u32) -> u32 {
    ioapic_read(0x10 + 2 * gsi)
}
