//! A device-originated interrupt for the `boot` scenario, independent of the virtio crates:
//! the smallest complete virtio transaction. The console's port 0 transmit queue (queue 1)
//! gets one descriptor with a line of text; QEMU writes it to the virtconsole's chardev
//! (the runner reads it back) and signals completion with a real interrupt: MSI-X entry 0,
//! or INTx (level, shared; the ISR read de-asserts it), or nothing in `irq=poll`.
//!
//! Modern (virtio 1.x capabilities) when the function has them, else legacy BAR0 I/O.
//! Only what this one transaction needs, with bounded waits everywhere; the real
//! transports live in `virtio-pci`.

use super::{Device, Env};
use crate::cmdline::IrqMode;
use crate::pci::{CAP_VENDOR, PciFunction};
use crate::platform::INTX_INDEX;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};
use virtio_core::platform::{BarAccess, Dma, DmaRegion, InterruptMode, InterruptPlatform};

/// The text the runner expects in the virtconsole chardev.
pub const MESSAGE: &[u8] = b"virtio-test-guest: hello over virtqueue\n";
const TX_QUEUE: u16 = 1;
const QSIZE_MAX: u16 = 8;

// Status bits (virtio 1.2 §2.1).
const ACK: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;

// Modern common configuration layout (virtio 1.2 §4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const MSIX_CONFIG: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

// Legacy BAR0 layout (virtio 1.2 §4.1.4.8).
const LEGACY_GUEST_FEATURES: u64 = 4;
const LEGACY_QUEUE_PFN: u64 = 8;
const LEGACY_QUEUE_SIZE: u64 = 12;
const LEGACY_QUEUE_SELECT: u64 = 14;
const LEGACY_QUEUE_NOTIFY: u64 = 16;
const LEGACY_STATUS: u64 = 18;
const LEGACY_ISR: u64 = 19;
const LEGACY_CONFIG_VECTOR: u64 = 20;
const LEGACY_QUEUE_VECTOR: u64 = 22;

/// Where the modern structures are: (bar, offset) of common, notify, ISR; the notify
/// offset multiplier.
struct Modern {
    common: (u8, u64),
    notify: (u8, u64),
    isr: (u8, u64),
    multiplier: u32,
}

fn modern_caps(f: &PciFunction) -> Option<Modern> {
    let (mut common, mut notify, mut isr, mut multiplier) = (None, None, None, 0);
    for &(id, off) in &f.caps {
        if id != CAP_VENDOR {
            continue;
        }
        let off = u16::from(off);
        let cfg_type = f.addr.read8(off + 3);
        let loc = Some((f.addr.read8(off + 4), u64::from(f.addr.read32(off + 8))));
        // The first capability of each type is the device's preference (§4.1.4).
        match cfg_type {
            1 if common.is_none() => common = loc,
            2 if notify.is_none() => {
                notify = loc;
                multiplier = f.addr.read32(off + 16);
            }
            3 if isr.is_none() => isr = loc,
            _ => {}
        }
    }
    Some(Modern {
        common: common?,
        notify: notify?,
        isr: isr?,
        multiplier,
    })
}

/// Split-ring pieces in one coherent region (legacy layout, which modern accepts too).
struct Ring {
    mem: DmaRegion,
    avail_off: usize,
    used_off: usize,
}

impl Ring {
    fn new(dma: &crate::platform::GuestDma, size: u16) -> Option<Self> {
        let n = usize::from(size);
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n).next_multiple_of(4096);
        let len = used_off + (6 + 8 * n).next_multiple_of(4096);
        let mem = dma.alloc_coherent(len, 4096).ok()?;
        Some(Self {
            mem,
            avail_off,
            used_off,
        })
    }

    fn ptr<T>(&self, off: usize) -> NonNull<T> {
        self.mem
            .ptr_at(off, size_of::<T>())
            .expect("ring offsets are within the region")
            .cast()
    }

    fn addr(&self, off: usize) -> u64 {
        self.mem.daddr + off as u64
    }

    /// Posts one device-readable buffer as descriptor 0 and publishes it.
    fn post(&self, buf: &DmaRegion, len: u32) {
        // SAFETY: all pointers are inside the zeroed ring region we own; the device reads
        // them only after the avail index store below (release fence, §2.7.13).
        unsafe {
            self.ptr::<u64>(0).write_volatile(buf.daddr);
            self.ptr::<u32>(8).write_volatile(len);
            self.ptr::<u16>(12).write_volatile(0); // flags: device-readable, no next
            self.ptr::<u16>(self.avail_off + 4).write_volatile(0); // ring[0] = desc 0
            fence(Ordering::Release);
            self.ptr::<u16>(self.avail_off + 2).write_volatile(1); // avail idx
        }
        fence(Ordering::SeqCst); // idx visible before the notify (§2.7.13.4)
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: inside the ring region; the device writes it, so volatile.
        let idx = unsafe { self.ptr::<u16>(self.used_off + 2).read_volatile() };
        fence(Ordering::Acquire); // used elements are read after the index (§2.7.14)
        idx
    }

    fn used_elem(&self) -> (u32, u32) {
        // SAFETY: used ring element 0 lies inside the region.
        unsafe {
            (
                self.ptr::<u32>(self.used_off + 4).read_volatile(),
                self.ptr::<u32>(self.used_off + 8).read_volatile(),
            )
        }
    }
}

/// Outcome for the check line.
pub struct Outcome {
    pub ok: bool,
    pub detail: alloc::string::String,
}

fn wait_status_zero(read: impl Fn() -> u8) -> bool {
    crate::time::wait_until(1000, || read() == 0)
}

/// Runs the transaction on `dev` (a virtio console function) in `env.irq` mode.
pub fn run(env: &Env, dev: &mut Device) -> Outcome {
    let modern = modern_caps(&dev.func);
    let legacy_io = dev.bars.bar_is_io(0) && dev.func.device < 0x1040;
    let fail = |why: &str| Outcome {
        ok: false,
        detail: why.into(),
    };

    // Interrupts first: with MSI-X on, legacy device config moves and vectors are accepted.
    let mode = match env.irq {
        IrqMode::MsiX if dev.irq.enable_msix(1) => InterruptMode::MsiX { vectors: 1 },
        IrqMode::MsiX => return fail("enable_msix(1) refused"),
        IrqMode::Intx if dev.irq.enable_intx() => InterruptMode::Intx,
        IrqMode::Intx => return fail("enable_intx refused"),
        IrqMode::Poll => InterruptMode::Polling,
    };
    let msix = matches!(mode, InterruptMode::MsiX { .. });
    let vector: u16 = if msix { 0 } else { 0xFFFF };
    let bars = &dev.bars;

    let Some(buf) = dev.dma.alloc_coherent(MESSAGE.len(), 16).ok() else {
        return fail("no DMA memory");
    };
    // SAFETY: buf is a fresh region of exactly MESSAGE.len() bytes.
    unsafe { core::ptr::copy_nonoverlapping(MESSAGE.as_ptr(), buf.vaddr.as_ptr(), MESSAGE.len()) };

    let (ring, notify, isr, transport) = if let Some(m) = modern {
        let (cb, co) = m.common;
        let status = |v: u8| bars.write8(cb, co + DEVICE_STATUS, v);
        let get_status = || bars.read8(cb, co + DEVICE_STATUS).unwrap_or(0xFF);
        status(0);
        if !wait_status_zero(get_status) {
            return fail("reset did not complete");
        }
        status(ACK | DRIVER);
        bars.write32(cb, co + DEVICE_FEATURE_SELECT, 1); // device_feature_select: bits 32..63
        let hi = bars.read32(cb, co + DEVICE_FEATURE).unwrap_or(0);
        if hi & 1 == 0 {
            return fail("VERSION_1 not offered");
        }
        bars.write32(cb, co + DRIVER_FEATURE_SELECT, 0);
        bars.write32(cb, co + DRIVER_FEATURE, 0); // no feature bits 0..31 (no MULTIPORT: port 0 only)
        bars.write32(cb, co + DRIVER_FEATURE_SELECT, 1);
        bars.write32(cb, co + DRIVER_FEATURE, 1); // VERSION_1
        status(ACK | DRIVER | FEATURES_OK);
        if get_status() & FEATURES_OK == 0 {
            return fail("FEATURES_OK not accepted");
        }
        bars.write16(cb, co + MSIX_CONFIG, 0xFFFF); // msix_config: no config interrupts
        bars.write16(cb, co + QUEUE_SELECT, TX_QUEUE);
        let max = bars.read16(cb, co + QUEUE_SIZE).unwrap_or(0);
        if max == 0 {
            return fail("tx queue missing");
        }
        let size = max.min(QSIZE_MAX);
        let Some(ring) = Ring::new(&dev.dma, size) else {
            return fail("no DMA memory");
        };
        bars.write16(cb, co + QUEUE_SIZE, size);
        for (reg, off) in [
            (QUEUE_DESC, 0),
            (QUEUE_DRIVER, ring.avail_off),
            (QUEUE_DEVICE, ring.used_off),
        ] {
            let a = ring.addr(off);
            bars.write32(cb, co + reg, a as u32);
            bars.write32(cb, co + reg + 4, (a >> 32) as u32);
        }
        bars.write16(cb, co + QUEUE_MSIX_VECTOR, vector);
        if bars.read16(cb, co + QUEUE_MSIX_VECTOR) != Some(vector) {
            return fail("queue MSI-X vector rejected");
        }
        let notify_off = u64::from(bars.read16(cb, co + QUEUE_NOTIFY_OFF).unwrap_or(0));
        bars.write16(cb, co + QUEUE_ENABLE, 1); // queue_enable
        status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        let notify = (
            m.notify.0,
            m.notify.1 + notify_off * u64::from(m.multiplier),
        );
        (ring, notify, m.isr, "modern")
    } else if legacy_io {
        bars.write8(0, LEGACY_STATUS, 0);
        if !wait_status_zero(|| bars.read8(0, LEGACY_STATUS).unwrap_or(0xFF)) {
            return fail("reset did not complete");
        }
        bars.write8(0, LEGACY_STATUS, ACK | DRIVER);
        bars.write32(0, LEGACY_GUEST_FEATURES, 0); // no features
        bars.write16(0, LEGACY_QUEUE_SELECT, TX_QUEUE);
        let size = bars.read16(0, LEGACY_QUEUE_SIZE).unwrap_or(0);
        if size == 0 || !size.is_power_of_two() {
            return fail("tx queue missing");
        }
        // Legacy sizes are fixed by the device; the whole ring must be allocated.
        let Some(ring) = Ring::new(&dev.dma, size) else {
            return fail("no DMA memory");
        };
        if msix {
            bars.write16(0, LEGACY_CONFIG_VECTOR, 0xFFFF); // config vector: none
            bars.write16(0, LEGACY_QUEUE_VECTOR, vector);
            if bars.read16(0, LEGACY_QUEUE_VECTOR) != Some(vector) {
                return fail("queue MSI-X vector rejected");
            }
        }
        bars.write32(0, LEGACY_QUEUE_PFN, (ring.mem.daddr >> 12) as u32); // PFN, 4096-aligned ring
        bars.write8(0, LEGACY_STATUS, ACK | DRIVER | DRIVER_OK);
        (ring, (0, LEGACY_QUEUE_NOTIFY), (0, LEGACY_ISR), "legacy")
    } else {
        return fail("neither modern capabilities nor a legacy I/O BAR");
    };

    let before = dev.irq.total();
    ring.post(&buf, MESSAGE.len() as u32);
    bars.write16(notify.0, notify.1, TX_QUEUE); // the kick

    let (irq_ok, isr_val) = match mode {
        InterruptMode::MsiX { .. } => (dev.irq.wait(1, 2000) && dev.irq.take_pending() & 1 != 0, 0),
        InterruptMode::Intx => {
            let got = dev.irq.wait(1 << INTX_INDEX, 2000);
            // Reading the ISR de-asserts the line (§4.1.4.5); then re-arm the I/O APIC pin.
            let isr_val = bars.read8(isr.0, isr.1).unwrap_or(0);
            dev.irq.take_pending();
            dev.irq.intx_done();
            (got && isr_val & 1 != 0, isr_val)
        }
        InterruptMode::Polling => (true, 0),
    };
    let completed = crate::time::wait_until(2000, || ring.used_idx() == 1);
    let (id, len) = ring.used_elem();
    let irqs = dev.irq.total() - before;

    // Reset: the device stops using the ring before we free it.
    if transport == "legacy" {
        bars.write8(0, LEGACY_STATUS, 0);
    } else if let Some(m) = modern_caps(&dev.func) {
        bars.write8(m.common.0, m.common.1 + DEVICE_STATUS, 0);
    }
    dev.irq.disable();
    // SAFETY: the device was reset above, so it no longer accesses either region.
    unsafe {
        dev.dma.free_coherent(ring.mem);
        dev.dma.free_coherent(buf);
    }
    Outcome {
        ok: irq_ok && completed && id == 0,
        detail: alloc::format!(
            "{transport} {mode:?}: interrupt={irq_ok} (taken {irqs}, isr {isr_val:#x}) completed={completed} used id={id} len={len}"
        ),
    }
}
