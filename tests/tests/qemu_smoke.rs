//! End to end: the `smoke` scenario (every device through `virtio-pci` + `virtio-core`
//! against real QEMU devices) on a spread of machine × transport × interrupt mode.
//!
//! Host-side checks beyond the guest's own: QEMU's trace must show exactly as many kicks as
//! the guest's queues counted (ioeventfd is off, so each notify write is one trace line),
//! and at least one interrupt sent per interrupt the guest took.

use virtio_tests::qemu::{GuestExit, IrqMode, Machine, RunConfig, Transport, run_scenario};

fn run(cfg: RunConfig) {
    let report = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    println!("{}", report.summary());
    if report.exit == GuestExit::Usage && report.checks.is_empty() {
        // The guest predates its smoke module: nothing to check yet.
        eprintln!("smoke: guest has no smoke scenario yet; skipped");
        return;
    }
    assert!(report.passed(), "{}", report.summary());
    let trace = report.trace.as_ref().expect("smoke records traces");
    assert!(trace.kicks() > 0, "{}", report.summary());

    // `<device>.kicks` / `<device>.irq` (see the guest's `scenarios::device_stats`).
    let sum = |suffix: &str| -> Option<u64> {
        let values: Vec<u64> = report
            .stats
            .iter()
            .filter(|(k, _)| k.matches('.').count() == 1 && k.ends_with(suffix))
            .filter_map(|(_, v)| v.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    if let Some(kicks) = sum(".kicks") {
        assert_eq!(
            kicks,
            trace.kicks(),
            "guest kicks vs QEMU virtio_queue_notify\n{}",
            report.summary()
        );
    }
    if let Some(irqs) = sum(".irq") {
        assert!(
            trace.interrupts() >= irqs,
            "QEMU sent fewer interrupts than taken\n{}",
            report.summary()
        );
        if cfg.irq != IrqMode::Poll {
            assert!(irqs > 0, "no interrupts taken\n{}", report.summary());
        }
    }
}

#[test]
fn smoke_q35_modern_msix() {
    run(RunConfig::new("smoke"));
}

#[test]
fn smoke_q35_legacy_intx() {
    run(RunConfig::new("smoke")
        .transport(Transport::Legacy)
        .irq(IrqMode::Intx));
}

#[test]
fn smoke_pc_transitional_intx() {
    run(RunConfig::new("smoke")
        .machine(Machine::Pc)
        .transport(Transport::Transitional)
        .irq(IrqMode::Intx));
}

#[test]
fn smoke_pc_legacy_msix() {
    run(RunConfig::new("smoke")
        .machine(Machine::Pc)
        .transport(Transport::Legacy)
        .irq(IrqMode::Msix));
}

#[test]
fn smoke_pc_modern_poll() {
    run(RunConfig::new("smoke")
        .machine(Machine::Pc)
        .transport(Transport::Modern)
        .irq(IrqMode::Poll));
}
