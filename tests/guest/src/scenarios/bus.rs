//! Glue between the guest platform and the virtio crates: a function found on the PCI bus
//! becomes a `virtio_core` bus (`VirtioDevice` over `virtio_pci`'s transport), and
//! interrupts recorded by the handlers are fed to the bus in thread context.
//!
//! # Servicing a driver's interrupts: the one way
//!
//! The guest's interrupt handlers only record (a bit per MSI-X entry, one for INTx); the
//! scenario services them in thread context. A driver that owns its bus (`VirtioRng`,
//! `VirtioConsole`, `VirtioNet`, `BalloonDriver`, ...) follows the same conventions:
//! `bus()` / `bus_mut()` reach the bus, `handle_interrupt(Option<u16>)` takes an MSI-X
//! entry or `None` for INTx (which reads the ISR), and `shutdown()` (also run by `Drop`)
//! resets the device — read its statistics first. The scenario then:
//!
//! - waits with [`wait_until`]`(driver, |d| d.bus_mut(), timeout_ms, handle, done)`: it
//!   halts until an interrupt (bounded 10 ms slices, so `done` is re-checked even if one
//!   is lost), feeds what was recorded to `handle` through [`dispatch`], and in polling
//!   mode just spins on `done` (which should poll the driver);
//! - or, inside its own loop, calls [`dispatch`] directly;
//! - for a bare bus (no driver), [`wait_for`] does the same with `Bus::handle_interrupt`.
//!
//! [`dispatch`] re-arms the INTx line only after `handle(None)` read the ISR (the line is
//! level-triggered and masked until then). The exception is `blk/vd.rs`, which drives the
//! virtio-drivers crate's own transport.

use super::Env;
use crate::pci::PciFunction;
use crate::platform::{GuestDma, INTX_INDEX, PciBars, PciConfig, PciInterrupts};
use crate::report;
use alloc::format;
use alloc::string::String;
use virtio_core::bus::Bus;
use virtio_core::device::VirtioDevice;
use virtio_core::platform::InterruptMode;
use virtio_pci::{PciTransport, Preference, probe};

/// The in-process bus of one device on this platform.
pub type GuestBus = VirtioDevice<PciTransport<PciConfig, PciBars>, GuestDma, PciInterrupts>;

/// The transport the run asked for (`transport=` on the command line): `modern` and
/// `legacy` insist on that interface; `transitional` (both offered) lets the transport
/// choose, i.e. modern.
pub fn preference(env: &Env) -> Preference {
    match env.cmdline.get("transport") {
        Some("modern") => Preference::Modern,
        Some("legacy") => Preference::Legacy,
        _ => Preference::Auto,
    }
}

/// Opens `f` (decode, bus master, BARs mapped) and probes its virtio transport.
pub fn open(env: &Env, f: &PciFunction) -> Result<GuestBus, String> {
    let dev = env.open(f);
    let transport =
        probe(dev.config, dev.bars, preference(env)).map_err(|e| format!("probe: {e:?}"))?;
    Ok(VirtioDevice::new(transport, dev.dma, dev.irq))
}

/// Feeds the interrupts recorded for a device's function to its interrupt entry `handle`
/// (the bus's, or a driver's that owns the bus): INTx → `handle(None)` (which reads the
/// ISR, de-asserting the line), then the line is re-armed; MSI-X entry k →
/// `handle(Some(k))`. `bus` reaches the bus inside `dev`.
pub fn dispatch<D>(
    dev: &mut D,
    bus: fn(&mut D) -> &mut GuestBus,
    mut handle: impl FnMut(&mut D, Option<u16>),
) {
    let pending = bus(dev).interrupt_platform().take_pending();
    if pending & (1 << INTX_INDEX) != 0 {
        handle(dev, None);
        bus(dev).interrupt_platform().intx_done();
    }
    // Visit only the set bits (lowest first): scanning all 63 entries cost the wait loop
    // about 300 instructions per interrupt in `bench blk`.
    let mut msix = pending & !(1 << INTX_INDEX);
    while msix != 0 {
        let k = msix.trailing_zeros() as u16;
        msix &= msix - 1;
        handle(dev, Some(k));
    }
}

/// Waits until `done(bus)` holds, for at most `timeout_ms`: between checks it halts until
/// an interrupt and services it (MSI-X/INTx), or spins (polling mode).
pub fn wait_for(
    bus: &mut GuestBus,
    timeout_ms: u64,
    done: impl FnMut(&mut GuestBus) -> bool,
) -> bool {
    wait_until(
        bus,
        |b| b,
        timeout_ms,
        |b, v| {
            b.handle_interrupt(v);
        },
        done,
    )
}

/// Waits until `done(dev)` holds, for at most `timeout_ms`, for a driver `dev` that owns
/// its bus (reached through `bus`): between checks it halts until an interrupt and feeds
/// the recorded ones to `handle` ([`dispatch`]), or spins in polling mode (`done` should
/// poll the driver then). Returns whether `done` held in time.
pub fn wait_until<D>(
    dev: &mut D,
    bus: fn(&mut D) -> &mut GuestBus,
    timeout_ms: u64,
    mut handle: impl FnMut(&mut D, Option<u16>),
    mut done: impl FnMut(&mut D) -> bool,
) -> bool {
    let deadline = crate::time::now_ns().saturating_add(timeout_ms.saturating_mul(1_000_000));
    loop {
        if done(dev) {
            return true;
        }
        let now = crate::time::now_ns();
        if now >= deadline {
            return false;
        }
        if bus(dev).interrupt_mode() == InterruptMode::Polling {
            core::hint::spin_loop();
        } else {
            // Bounded slices, so `done` is re-checked even if an interrupt is lost.
            let slice = ((deadline - now) / 1_000_000).clamp(1, 10);
            bus(dev).interrupt_platform().wait(u64::MAX, slice);
            dispatch(dev, bus, &mut handle);
        }
    }
}

/// Prints `STAT <name>.kicks/.completions/.irq...` from the bus's queue statistics and the
/// interrupt counters.
pub fn stats(name: &str, bus: &mut GuestBus) {
    let (mut kicks, mut completions, mut added) = (0, 0, 0);
    let queues: alloc::vec::Vec<u16> = bus.queue_indices().collect();
    for q in queues {
        if let Ok(s) = bus.queue_stats(q) {
            kicks += s.kicks;
            completions += s.completions;
            added += s.added;
            report::stat(&format!("{name}.q{q}.kicks"), s.kicks);
            report::stat(&format!("{name}.q{q}.completions"), s.completions);
            report::stat(&format!("{name}.q{q}.interrupts"), s.interrupts);
        }
    }
    report::stat(&format!("{name}.added"), added);
    report::stat(&format!("{name}.spurious"), bus.spurious_interrupts());
    super::device_stats(name, kicks, completions, bus.interrupt_platform());
}
