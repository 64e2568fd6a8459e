//! End to end: the `rng` scenario — the virtio-rng driver (`VirtioRng` over `virtio-pci` +
//! `virtio-core`) against QEMU's virtio-rng-pci, whose `rng-random` backend reads a host
//! file of known bytes through a rate limiter (`tests/guest/src/scenarios/rng.rs`,
//! `tests/src/qemu/devices/rng.rs`) — on the full machine × transport × interrupt-mode
//! matrix.
//!
//! The host compares the guest's bytes with the file and checks QEMU's own timestamped
//! trace against the rate limit (bytes per time, both ways), and every run checks the
//! guest's kick count against QEMU's `virtio_queue_notify` trace (ioeventfd is off: one
//! trace line per notify write) and that QEMU sent at least as many interrupts as the
//! guest took.

use virtio_tests::qemu::{IrqMode, RunConfig, RunReport, run_scenario};

const CHECKS: &[&str] = &[
    "rng.init",
    "rng.read",
    "rng.clean",
    "host.rng.data",
    "host.rng.rate_limit",
    "host.rng.accounting",
];

fn run(cfg: RunConfig) -> RunReport {
    let r = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    let s = r.summary();
    println!("{s}");
    assert!(r.passed(), "{s}");
    for c in CHECKS {
        assert!(r.check(c).is_some_and(|c| c.passed), "{c} missing\n{s}");
    }
    let trace = r.trace.as_ref().expect("rng records traces");
    let kicks = r.stat_u64("rng.kicks").expect("rng.kicks");
    assert_eq!(
        kicks,
        trace.kicks(),
        "guest kicks vs QEMU virtio_queue_notify\n{s}"
    );
    let irqs = r.stat_u64("rng.irq").expect("rng.irq");
    assert!(
        trace.interrupts() >= irqs,
        "QEMU sent fewer interrupts than taken\n{s}"
    );
    if cfg.irq != IrqMode::Poll {
        assert!(irqs > 0, "no interrupts taken\n{s}");
    }
    r
}

virtio_tests::qemu_matrix!("rng", run);
