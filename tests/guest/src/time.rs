//! Time base: the TSC, calibrated against PIT channel 2 (a fixed 1.193182 MHz clock that
//! needs no interrupt), and bounded waits.
//!
//! Waits either halt between checks (interrupt modes: the LAPIC timer tick, started by
//! `start_tick`, bounds every `hlt`) or spin (`irq=poll`).

use crate::arch::{self, inb, outb, rdtsc};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const PIT_HZ: u64 = 1_193_182;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick in 32.32 fixed point (`now_ns` multiplies instead of dividing:
/// a 128-bit division is a library call of about 30 instructions, paid on every wait-loop
/// check and counted in the benchmarks' instructions per request).
/// Before calibration: 1 ns per tick, so time still advances.
static NS_PER_TICK_32: AtomicU64 = AtomicU64::new(1 << 32);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
/// Whether waits may `hlt` (set once the tick runs and the run is not `irq=poll`).
static HALT_OK: AtomicBool = AtomicBool::new(false);
pub const TICK_HZ: u32 = 100;

/// Measures the TSC frequency over `ms` milliseconds of PIT channel 2 (mode 0, gate via
/// port 0x61 bit 0, output read back on port 0x61 bit 5).
pub fn calibrate(ms: u64) -> u64 {
    let count = (PIT_HZ * ms / 1000).min(0xFFFF) as u16;
    let ms = u64::from(count) * 1000 / PIT_HZ; // what we actually measure
    let port61 = inb(0x61);
    outb(0x61, (port61 & !0x02) & !0x01); // speaker off, gate low
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let t0 = rdtsc();
    outb(0x61, (port61 & !0x02) | 0x01); // gate high: count starts
    let mut spins: u64 = 0;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 100_000_000 {
            break; // no PIT? fall through with whatever we measured
        }
    }
    let t1 = rdtsc();
    outb(0x61, port61);
    let hz = (t1 - t0) * 1000 / ms.max(1);
    let hz = hz.max(1_000_000);
    TSC_HZ.store(hz, Ordering::Relaxed);
    // hz >= 1 MHz, so this is at most 1000 << 32: no overflow.
    NS_PER_TICK_32.store(
        ((1_000_000_000u128 << 32) / u128::from(hz)) as u64,
        Ordering::Relaxed,
    );
    BOOT_TSC.store(t0, Ordering::Relaxed);
    hz
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since calibration.
#[inline]
pub fn now_ns() -> u64 {
    let ticks = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ((u128::from(ticks) * u128::from(NS_PER_TICK_32.load(Ordering::Relaxed))) >> 32) as u64
}

pub fn delay_ns(ns: u64) {
    let end = now_ns() + ns;
    while now_ns() < end {
        core::hint::spin_loop();
    }
}

/// Starts the periodic LAPIC timer tick that bounds every `hlt`, and allows halting waits.
pub fn start_tick() -> u32 {
    let per_10ms = crate::apic::timer_calibrate(10_000_000).max(1);
    let count = per_10ms * 100 / TICK_HZ;
    crate::apic::timer_start_periodic(crate::interrupts::TIMER_VECTOR, count);
    HALT_OK.store(true, Ordering::Relaxed);
    count
}

/// Makes waits spin instead of halting (the `irq=poll` mode).
pub fn set_polling(polling: bool) {
    if polling {
        HALT_OK.store(false, Ordering::Relaxed);
    }
}

/// A wait's time limit that starts only when first needed, so that a wait ended by its
/// first wake-up reads no clock outside the halt (the block benches' waits, whose clock
/// reads would count as per-request work). Halts go in slices of at most 10 ms, so a lost
/// interrupt costs a slice, not the whole limit; once the limit runs they stop at it.
pub struct LazyDeadline {
    timeout_ns: u64,
    at: Option<u64>,
}

impl LazyDeadline {
    pub fn new(timeout_ms: u64) -> Self {
        LazyDeadline {
            timeout_ns: timeout_ms.saturating_mul(1_000_000),
            at: None,
        }
    }

    /// Starts the limit if it is not running yet; whether it has passed.
    pub fn expired(&mut self) -> bool {
        let now = now_ns();
        now >= *self.at.get_or_insert(now.saturating_add(self.timeout_ns))
    }

    /// How long the next halt may last, in ms: 10, or less once the limit runs.
    pub fn slice_ms(&self) -> u64 {
        match self.at {
            None => 10,
            Some(at) => (at.saturating_sub(now_ns()) / 1_000_000).clamp(1, 10),
        }
    }
}

/// Waits until `cond()` holds or `timeout_ms` passes; returns whether it held.
///
/// `cond` is checked with interrupts disabled right before halting, and `sti; hlt` is
/// atomic, so an interrupt that makes `cond` true cannot slip in between check and halt.
#[inline]
pub fn wait_until(timeout_ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = now_ns() + timeout_ms * 1_000_000;
    loop {
        if HALT_OK.load(Ordering::Relaxed) && arch::interrupts_enabled() {
            arch::disable_interrupts();
            if cond() {
                arch::enable_interrupts();
                return true;
            }
            if now_ns() >= deadline {
                arch::enable_interrupts();
                return false;
            }
            arch::enable_interrupts_and_halt();
        } else {
            if cond() {
                return true;
            }
            if now_ns() >= deadline {
                return false;
            }
            core::hint::spin_loop();
        }
    }
}
