//! End to end: the `smoke` scenario (every device through `virtio-pci` + `virtio-core`
//! against real QEMU devices) on a spread of machine × transport × interrupt mode.
//!
//! Host-side checks beyond the guest's own: QEMU's trace must show exactly as many kicks as
//! the guest's queues counted (ioeventfd is off, so each notify write is one trace line),
//! and at least one interrupt sent per interrupt the guest took.

use virtio_tests::qemu::{IrqMode, RunConfig, run_scenario};

fn run(cfg: RunConfig) {
    let report = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    println!("{}", report.summary());
    assert!(report.passed(), "{}", report.summary());
    // The console's line reached the chardev the host reads.
    let console = report.console_output.as_deref().unwrap_or_default();
    assert_eq!(
        console,
        b"virtio-test-guest smoke: hello through virtio-core\n",
        "{}",
        report.summary()
    );
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

// The whole machine × transport × interrupt-mode matrix.
virtio_tests::qemu_matrix!("smoke", run);
