//! Fuzz target bodies. Each `run(&[u8])` decodes the input into device behaviour, drives the
//! driver code against it and panics when an oracle fails. libFuzzer calls them from
//! `fuzz/fuzz_targets/`; the main workspace's `fuzz_replay` test calls them on the committed
//! corpus and reproducers, so CI checks them without nightly or cargo-fuzz.

pub mod balloon;
pub mod blk;
pub mod console;
pub mod family;
pub mod fs;
pub mod input;
pub mod kext;
pub mod mem;
pub mod net;
pub mod net_ctrl;
pub mod packed;
pub mod pci;
pub mod ring;
pub mod rng;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_core::VirtioDevice;
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{Sim, SimBars, SimConfig, SimIrq};

/// The in-process bus over the simulated PCI function, which every driver target drives.
pub(crate) type SimDevice = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;

/// Probes the simulated function with `preference` and puts the bus over it; `None` when
/// the probe refuses the function the input configured.
pub(crate) fn sim_device(sim: &Sim, preference: Preference) -> Option<SimDevice> {
    let transport = probe(sim.config_space(), sim.bars(), preference).ok()?;
    Some(VirtioDevice::new(transport, sim.memory(), sim.irq()))
}

/// VIRTIO_F_RING_PACKED when `packed`: the simulated function then serves every queue the
/// driver enables as a packed ring (`virtio_tests::sim::F_RING_PACKED`), and the driver
/// under test, which negotiates it whenever offered, runs over `PackedQueue`. Taken from a
/// spare bit of the input that already picks INDIRECT_DESC and EVENT_IDX (or other
/// features), so that choice does not move any other. fuzz/README.md says what a lying
/// device does on a packed ring.
pub(crate) fn packed_if(packed: bool) -> u64 {
    if packed {
        virtio_tests::sim::F_RING_PACKED
    } else {
        0
    }
}

/// The oracle after a driver refused to start: every DMA byte its setup took is back
/// (`free_at_start`: the memory's free bytes before the driver was created).
pub(crate) fn assert_setup_freed(mem: &IdentityMemory, free_at_start: usize) {
    assert_eq!(
        mem.free_bytes(),
        free_at_start,
        "failed init leaked DMA memory"
    );
}

/// Notifications one driver call may trigger before a flooding device gives up: far above
/// every driver's own bound per call, so reaching it means a call kept notifying.
pub(crate) const FLOOD_LIMIT: usize = 256;

/// The flood oracle: one driver call got fewer than [`FLOOD_LIMIT`] answers from a device
/// that answers every notification (`answered` counts them since the call began).
pub(crate) fn check_flood_bound(answered: usize, what: &str) {
    assert!(
        answered < FLOOD_LIMIT,
        "one driver call {what} {FLOOD_LIMIT} times"
    );
}

/// A flooding device's answers to the current driver call, shared between the target and
/// the device's notify hook. Relaxed: the count is the only datum, and the hook runs on
/// the target's own thread, inside the driver call it counts.
#[derive(Clone, Default)]
pub(crate) struct FloodCount(Arc<AtomicUsize>);

impl FloodCount {
    /// In the notify hook: counts one answer; false once [`FLOOD_LIMIT`] is reached, when
    /// the device stops answering (so a driver that keeps notifying cannot hang the run).
    pub(crate) fn answer(&self) -> bool {
        self.0.fetch_add(1, Ordering::Relaxed) < FLOOD_LIMIT
    }

    /// A new driver call begins: its answers count from zero.
    pub(crate) fn start(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// The flood oracle ([`check_flood_bound`]) for the call since [`FloodCount::start`].
    pub(crate) fn check(&self, what: &str) {
        check_flood_bound(self.0.load(Ordering::Relaxed), what);
    }

    /// Runs `call`, one driver call, counted on its own, and checks the bound after it.
    pub(crate) fn per_call<R>(&self, what: &str, call: impl FnOnce() -> R) -> R {
        self.start();
        let r = call();
        self.check(what);
        r
    }
}

/// One fuzz target: the name its corpus directory (`fuzz/corpus/<name>`) and cargo-fuzz
/// binary carry, and its body, which panics when an oracle fails on the input.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "ring",
        run: ring::run,
    },
    Target {
        name: "packed",
        run: packed::run,
    },
    Target {
        name: "pci",
        run: pci::run,
    },
    Target {
        name: "blk",
        run: blk::run,
    },
    Target {
        name: "net",
        run: net::run,
    },
    Target {
        name: "net_ctrl",
        run: net_ctrl::run,
    },
    Target {
        name: "console",
        run: console::run,
    },
    Target {
        name: "balloon",
        run: balloon::run,
    },
    Target {
        name: "rng",
        run: rng::run,
    },
    Target {
        name: "fs",
        run: fs::run,
    },
    Target {
        name: "kext",
        run: kext::run,
    },
    Target {
        name: "family",
        run: family::run,
    },
];
