//! `boot`: the harness checks itself.
//!
//! - PCI enumeration: every function listed; virtio functions as `DEVICE` lines (the runner
//!   compares them with what it asked QEMU for, via `expect_types=`);
//! - BAR access: every BAR of every virtio function is assigned, readable, bounds-checked;
//! - time and interrupts: LAPIC timer ticks, self-IPI through a registered handler, the
//!   I/O APIC via the PIT (ISA IRQ 0 → GSI 2);
//! - per `irq=`: MSI-X tables programmed and read back, and a message through each
//!   function's programmed entry delivered to its vector; or INTx routing programmed.

use super::Env;
use crate::apic::{self, Polarity, Trigger};
use crate::arch::outb;
use crate::check;
use crate::cmdline::IrqMode;
use crate::interrupts::{self, SELFTEST_VECTOR, TIMER_VECTOR};
use crate::pci::CAP_MSIX;
use crate::platform::INTX_INDEX;
use crate::report::stat;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use virtio_core::platform::{BarAccess, InterruptMode, InterruptPlatform, PciConfigSpace};

fn type_name(ty: u16) -> &'static str {
    match ty {
        1 => "net",
        2 => "blk",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        8 => "scsi",
        9 => "9p",
        _ => "other",
    }
}

pub fn run(env: &mut Env) {
    stat("tsc_mhz", crate::time::tsc_hz() / 1_000_000);
    stat("pci.functions", env.pci.len());
    for f in &env.pci {
        crate::println!(
            "PCI {} {:04x}:{:04x} class {:02x}.{:02x}.{:02x} rev {:#04x} pin {} line {}",
            f.addr,
            f.vendor,
            f.device,
            f.class,
            f.subclass,
            f.prog_if,
            f.revision,
            f.irq_pin,
            f.irq_line
        );
    }
    let host_bridge = env
        .pci
        .iter()
        .any(|f| f.addr.bus == 0 && f.addr.dev == 0 && f.class == 0x06);
    check!(
        "pci.enumerate",
        host_bridge,
        "{} functions, machine {}",
        env.pci.len(),
        env.chipset.name()
    );

    list_virtio(env);
    check_bars(env);
    check_timer_and_ipi(env);
    check_ioapic_pit();
    match env.irq {
        IrqMode::MsiX => check_msix(env),
        IrqMode::Intx => check_intx(env),
        IrqMode::Poll => {}
    }
}

/// Virtio device type IDs for a report, with names where known: `1 (net), 2 (blk)`.
fn type_ids(types: &[u16]) -> String {
    let words: Vec<String> = types
        .iter()
        .map(|&t| match virtio_core::DeviceType::from_id(u32::from(t)) {
            Some(ty) => format!("{t} ({})", ty.name()),
            None => format!("{t}"),
        })
        .collect();
    if words.is_empty() {
        "none".into()
    } else {
        words.join(", ")
    }
}

fn list_virtio(env: &Env) {
    let mut types: Vec<u16> = Vec::new();
    for f in env.virtio_functions() {
        let ty = f.virtio_type().unwrap_or(0);
        types.push(ty);
        let mut line = String::new();
        let _ = write!(
            line,
            "DEVICE bdf={} id={:04x}:{:04x} subsys={:04x}:{:04x} rev={} type={} name={} modern={} msix={}",
            f.addr,
            f.vendor,
            f.device,
            f.subsys_vendor,
            f.subsys_id,
            f.revision,
            ty,
            type_name(ty),
            f.device >= 0x1040 || f.caps.iter().any(|&(id, _)| id == crate::pci::CAP_VENDOR),
            f.msix_table_size().unwrap_or(0),
        );
        match f.intx_gsi(env.chipset) {
            Some(gsi) => {
                let _ = write!(
                    line,
                    " intx=INT{}:gsi{}",
                    char::from(b'A' + f.irq_pin - 1),
                    gsi
                );
            }
            None => line.push_str(" intx=none"),
        }
        for (i, b) in f.bars.iter().enumerate() {
            if let Some(b) = b {
                let _ = write!(line, " bar{i}={b}");
            }
        }
        crate::println!("{}", line);
    }
    types.sort_unstable();
    stat("virtio.functions", types.len());
    match env.cmdline.get("expect_types") {
        Some(expected) => {
            let mut want: Vec<u16> = expected.split(',').filter_map(|t| t.parse().ok()).collect();
            want.sort_unstable();
            check!(
                "pci.virtio_devices",
                want == types,
                "found device types {}, expected {}",
                type_ids(&types),
                type_ids(&want)
            );
        }
        None => {
            check!(
                "pci.virtio_devices",
                !types.is_empty(),
                "found device types {}",
                type_ids(&types)
            );
        }
    }
}

/// Every memory BAR of every virtio function must be assigned and reachable, and
/// `PciBars` must refuse out-of-range and misaligned accesses.
fn check_bars(env: &Env) {
    let mut ok = true;
    let mut detail = String::new();
    for f in env.virtio_functions() {
        let dev = env.open(f);
        for bar in 0..6u8 {
            let Some(len) = dev.bars.bar_len(bar) else {
                continue;
            };
            let inside =
                dev.bars.read8(bar, 0).is_some() && dev.bars.read32(bar, len - 4).is_some();
            let outside = dev.bars.read8(bar, len).is_none()
                && dev.bars.read32(bar, len - 2).is_none()
                && dev.bars.read16(bar, 1).is_none()
                && dev.bars.read32(bar, u64::MAX - 1).is_none();
            if !inside || !outside {
                ok = false;
                let _ = write!(
                    detail,
                    " {} bar{bar}: inside={inside} bounds={outside};",
                    f.addr
                );
            }
        }
        // Config space through the trait: vendor ID, and out-of-range offsets refused.
        if dev.config.read16(0) != 0x1AF4 || dev.config.read32(256) != u32::MAX {
            ok = false;
            let _ = write!(detail, " {} config;", f.addr);
        }
        // Anything above 4 GiB proves the identity map reaches SeaBIOS' 64-bit window.
        for b in f.bars.iter().flatten().filter(|b| b.base >= 1 << 32) {
            let _ = write!(detail, " {} high bar at {:#x};", f.addr, b.base);
        }
    }
    check!(
        "pci.bar_access",
        ok,
        "{}",
        if detail.is_empty() {
            "all virtio BARs readable and bounded"
        } else {
            &detail
        }
    );
}

static SELFTEST_HITS: AtomicU64 = AtomicU64::new(0);

fn check_timer_and_ipi(env: &Env) {
    if env.irq != IrqMode::Poll {
        let before = interrupts::count(TIMER_VECTOR);
        crate::time::delay_ns(50_000_000);
        let ticks = interrupts::count(TIMER_VECTOR) - before;
        // 100 Hz over 50 ms: 5 expected; TCG timing is loose, demand at least 2.
        check!(
            "irq.lapic_timer",
            ticks >= 2,
            "{ticks} ticks in 50 ms at {} Hz",
            crate::time::TICK_HZ
        );
    }
    let id = interrupts::register(
        SELFTEST_VECTOR,
        alloc::boxed::Box::new(|_| {
            SELFTEST_HITS.fetch_add(1, Ordering::Relaxed);
        }),
    );
    apic::self_ipi(SELFTEST_VECTOR);
    let ok = crate::time::wait_until(1000, || SELFTEST_HITS.load(Ordering::Relaxed) >= 1);
    interrupts::unregister(SELFTEST_VECTOR, id);
    check!(
        "irq.self_ipi",
        ok,
        "vector {:#x} handler ran {} time(s)",
        SELFTEST_VECTOR,
        SELFTEST_HITS.load(Ordering::Relaxed)
    );
}

static PIT_HITS: AtomicU64 = AtomicU64::new(0);

/// ISA IRQ 0 arrives on I/O APIC pin 2 (interrupt source override on QEMU's machines).
/// PIT channel 0 in mode 0 raises its output once at terminal count: one edge.
fn check_ioapic_pit() {
    const PIT_GSI: u32 = 2;
    let Some(vector) = interrupts::alloc_vector() else {
        check!("irq.ioapic_pit", false, "no free vector");
        return;
    };
    let id = interrupts::register(
        vector,
        alloc::boxed::Box::new(|_| {
            PIT_HITS.fetch_add(1, Ordering::Relaxed);
        }),
    );
    // Stop whatever SeaBIOS left running (mode 2, 18.2 Hz) before routing the pin.
    outb(0x43, 0x30); // channel 0, lobyte/hibyte, mode 0
    outb(0x40, 0);
    outb(0x40, 0);
    apic::ioapic_route(PIT_GSI, vector, Trigger::Edge, Polarity::High, false);
    let count: u16 = 1193; // ~1 ms
    outb(0x43, 0x30);
    outb(0x40, count as u8);
    outb(0x40, (count >> 8) as u8);
    let ok = crate::time::wait_until(1000, || PIT_HITS.load(Ordering::Relaxed) >= 1);
    apic::ioapic_set_masked(PIT_GSI, true);
    interrupts::unregister(vector, id);
    interrupts::free_vector(vector);
    check!(
        "irq.ioapic_pit",
        ok,
        "GSI {PIT_GSI} -> vector {vector:#x}: {} interrupt(s)",
        PIT_HITS.load(Ordering::Relaxed)
    );
}

/// Per virtio function with MSI-X: program two entries through `InterruptPlatform`, read
/// the table back, and deliver a message through entry 0 exactly as the device would
/// (a dword write of the entry's data to the entry's address, which QEMU's APIC treats as
/// an MSI). Device-originated MSI-X is exercised by the device scenarios.
fn check_msix(env: &Env) {
    for f in env
        .virtio_functions()
        .filter(|f| f.find_cap(CAP_MSIX).is_some())
    {
        let mut dev = env.open(f);
        let name = format!("irq.msix.{}", f.addr);
        if !dev.irq.enable_msix(2) {
            check!(&name, false, "enable_msix(2) refused");
            continue;
        }
        let cap = u16::from(f.find_cap(CAP_MSIX).unwrap_or(0));
        let enabled = dev.config.read16(cap + 2) & (1 << 15) != 0;
        let mut table_ok = true;
        for i in 0..2 {
            let vector = dev.irq.vector(i).unwrap_or(0);
            let (addr, data) = apic::msi_message(vector);
            table_ok &= dev.irq.msix_entry(i) == Some((addr, data, 0));
        }
        let (addr, data, _) = dev.irq.msix_entry(0).unwrap_or((0, 0, 1));
        if addr & 0xFFF0_0000 == 0xFEE0_0000 {
            // SAFETY: the LAPIC/MSI page is identity-mapped UC; QEMU decodes a dword write
            // at offset 0 of it as an MSI (its APIC model shares the window with MSIs).
            unsafe { (addr as *mut u32).write_volatile(data) };
        }
        let delivered = dev.irq.wait(1, 1000);
        let pending = dev.irq.take_pending();
        check!(
            &name,
            enabled && table_ok && delivered && pending == 1 && dev.irq.count(0) == 1,
            "enable={enabled} table={table_ok} vectors={:#x},{:#x} delivered={delivered} pending={pending:#b}",
            dev.irq.vector(0).unwrap_or(0),
            dev.irq.vector(1).unwrap_or(0)
        );
        super::irq_stats(&format!("dev.{}", f.addr), &dev.irq);
        dev.irq.disable();
        check!(
            &format!("{name}.disable"),
            dev.config.read16(cap + 2) & (1 << 15) == 0,
            "MSI-X Enable cleared"
        );
    }
}

/// Per virtio function with an interrupt pin: program INTx and check the I/O APIC entry.
/// Device-originated INTx is exercised by the device scenarios.
fn check_intx(env: &Env) {
    for f in env.virtio_functions() {
        let mut dev = env.open(f);
        let name = format!("irq.intx.{}", f.addr);
        if !dev.irq.enable_intx() {
            check!(
                &name,
                f.irq_pin == 0,
                "enable_intx refused (pin {})",
                f.irq_pin
            );
            continue;
        }
        let (gsi, vector) = (
            dev.irq.gsi().unwrap_or(0),
            dev.irq.vector(INTX_INDEX).unwrap_or(0),
        );
        let entry = apic::ioapic_entry(gsi);
        let level = entry & (1 << 15) != 0;
        let unmasked = entry & (1 << 16) == 0;
        let ok = dev.irq.mode() == InterruptMode::Intx
            && entry & 0xFF == u32::from(vector)
            && level
            && unmasked;
        check!(
            &name,
            ok,
            "gsi {gsi} vector {vector:#x} ioapic entry {entry:#x} (line {})",
            f.irq_line
        );
        dev.irq.disable();
    }
}
