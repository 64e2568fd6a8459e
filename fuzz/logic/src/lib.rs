//! Fuzz target bodies. Each `run(&[u8])` decodes the input into device behaviour, drives the
//! driver code against it and panics when an oracle fails. libFuzzer calls them from
//! `fuzz/fuzz_targets/`; the main workspace's `fuzz_replay` test calls them on the committed
//! corpus and reproducers, so CI checks them without nightly or cargo-fuzz.

pub mod balloon;
pub mod blk;
pub mod console;
pub mod input;
pub mod mem;
pub mod net;
pub mod net_ctrl;
pub mod packed;
pub mod pci;
pub mod ring;
pub mod rng;

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
];
