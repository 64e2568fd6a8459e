//! `rng`: the virtio-rng driver (`virtio_rng::VirtioRng` over `virtio-pci` + `virtio-core`)
//! against QEMU's virtio-rng-pci, whose backend reads a host file of known bytes through a
//! rate limiter (`tests/src/qemu/devices/rng.rs` sets both up and checks the result):
//!
//! 1. `rng.init`: the device at DRIVER_OK with its buffers posted, in the run's interrupt
//!    mode;
//! 2. `rng.read`: `rng_bytes=` bytes (default 4096) read in odd-sized pieces, waiting for
//!    the device through [`bus::wait_until`] (interrupts, or polling with `irq=poll`);
//!    printed as `RNG-DATA <offset> <hex>` lines for the host to compare with its file,
//!    and the time it took by the guest's clock (`STAT rng.elapsed_us`; the host checks
//!    the rate limit on QEMU's timestamps instead);
//! 3. `rng.clean`: statistics printed, then `shutdown` resets the device.

use super::Env;
use super::bus::{self, GuestBus};
use crate::check;
use crate::cmdline::IrqMode;
use crate::report;
use crate::report::show::FeatureSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use core::cell::Cell;
use core::fmt::Write as _;
use virtio_core::platform::InterruptMode;
use virtio_core::transport::Transport;
use virtio_core::{Bus, DeviceType, Error};
use virtio_rng::{RngOptions, VirtioRng};

type Rng = VirtioRng<GuestBus>;

/// The driver's defaults: eight 64-byte buffers.
const OPTIONS: RngOptions = RngOptions {
    buffers: 8,
    buffer_size: 64,
};

/// Bytes per `RNG-DATA` line.
const LINE: usize = 64;

pub fn run(env: &mut Env) {
    let want = env.cmdline.get_u64("rng_bytes", 4096) as usize;
    let timeout_ms = env.cmdline.get_u64("rng_timeout_ms", 20_000);
    let Some(func) = env.find_virtio(DeviceType::Entropy) else {
        check!("rng.present", false, "no virtio-rng on the bus");
        return;
    };
    // From before DRIVER_OK: QEMU starts its rate-limit period there.
    let start = crate::time::now_ns();
    let bus = match bus::open(env, func) {
        Ok(b) => b,
        Err(e) => {
            check!("rng.init", false, "{} {e}", func.addr);
            return;
        }
    };
    let mut rng: Rng = match VirtioRng::new(bus, OPTIONS) {
        Ok(r) => r,
        Err(e) => {
            check!("rng.init", false, "{e}");
            return;
        }
    };
    let mode = rng.bus().interrupt_mode();
    let (mode_ok, mode_name) = match (env.irq, mode) {
        (IrqMode::MsiX, InterruptMode::MsiX { vectors }) => {
            (true, format!("MSI-X, {vectors} vectors"))
        }
        (IrqMode::Intx, InterruptMode::Intx) => (true, "INTx".into()),
        (IrqMode::Poll, InterruptMode::Polling) => (true, "polling".into()),
        (_, InterruptMode::MsiX { .. }) => (false, "MSI-X".into()),
        (_, InterruptMode::Intx) => (false, "INTx".into()),
        (_, InterruptMode::Polling) => (false, "polling".into()),
    };
    let features = rng.bus().features().bits();
    check!(
        "rng.init",
        mode_ok,
        "{} buffers of {} bytes posted; features {}; interrupts: {mode_name} (irq={})",
        rng.buffers(),
        OPTIONS.buffer_size,
        FeatureSet(DeviceType::Entropy, features),
        env.irq.name()
    );

    let mut data = vec![0u8; want];
    let mut got = 0usize;
    let mut reads = 0u64;
    let error: Cell<Option<Error>> = Cell::new(None);
    let done = bus::wait_until(
        &mut rng,
        |r| r.bus_mut(),
        timeout_ms,
        |r, vector| {
            if let Err(e) = r.handle_interrupt(vector) {
                error.set(Some(e));
            }
        },
        |r| {
            // Odd piece sizes, so reads straddle the device's buffers.
            while got < want && error.get().is_none() {
                let piece = (want - got).min(1 + (reads as usize * 37) % 200);
                let Some(out) = data.get_mut(got..got + piece) else {
                    break;
                };
                match r.read(out) {
                    Ok(0) => break,
                    Ok(n) => {
                        got += n;
                        reads += 1;
                    }
                    Err(e) => error.set(Some(e)),
                }
            }
            got == want || error.get().is_some()
        },
    );
    let elapsed_us = (crate::time::now_ns() - start) / 1000;
    match error.get() {
        Some(e) => {
            check!("rng.read", false, "after {got} of {want} bytes: {e}");
        }
        None => {
            check!(
                "rng.read",
                done && got == want,
                "{got} of {want} bytes in {reads} reads"
            );
        }
    }
    for (i, chunk) in data.get(..got).unwrap_or(&[]).chunks(LINE).enumerate() {
        let mut hex = String::with_capacity(2 * LINE);
        for b in chunk {
            let _ = write!(hex, "{b:02x}");
        }
        crate::println!("RNG-DATA {} {hex}", i * LINE);
    }
    let s = rng.stats();
    report::stat("rng.bytes", got);
    report::stat("rng.elapsed_us", elapsed_us);
    report::stat("rng.bytes_received", s.bytes_received);
    report::stat("rng.empty_completions", s.empty_completions);
    // Statistics before shutdown: the reset clears the device's view of the queue.
    bus::stats("rng", rng.bus_mut());
    rng.shutdown();
    let status = rng.bus().transport().status();
    check!(
        "rng.clean",
        status.is_empty(),
        "device reset (status {:#x}) after {} completions, {} of them empty",
        status.bits(),
        s.completions,
        s.empty_completions
    );
}
