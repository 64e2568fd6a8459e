//! End to end: the `console` scenario — the virtio-console driver (`VirtioConsole` over
//! `virtio-pci` + `virtio-core`) against QEMU's virtio-serial with a virtconsole on port 0
//! and two named `virtserialport`s whose unix-socket chardevs the host side drives
//! (`tests/guest/src/scenarios/console.rs`, `tests/src/qemu/console_host.rs`):
//!
//! emergency write before DRIVER_OK, the `ConsoleLogger` tee (the run's log found on port
//! 0's chardev), port discovery by name, host open/close/reopen seen as PORT_OPEN events,
//! lines on every port, an echo checked by the host, 64 KiB each way with every byte
//! checked at the receiving end — on the full machine × transport × interrupt-mode matrix.
//!
//! Every run also checks the guest's kick count against QEMU's `virtio_queue_notify`
//! trace (ioeventfd is off: one trace line per notify write) and that QEMU sent at least
//! as many queue interrupts as the guest took (config interrupts are not traced).

use virtio_tests::qemu::{IrqMode, RunConfig, RunReport, run_scenario};

const CHECKS: &[&str] = &[
    "console.emergency",
    "console.logger",
    "console.start",
    "console.ports",
    "console.host_open",
    "console.write",
    "console.echo",
    "console.bulk_out",
    "console.bulk_in",
    "console.reopen",
    "console.clean",
    "host.console.port1",
    "host.console.port2",
    "host.console.echo",
    "host.console.bulk_out",
    "host.console.bulk_in",
    "host.console.reopen",
    "host.console.emergency",
    "host.console.port0",
    "host.console.log",
];

fn run(cfg: RunConfig) -> RunReport {
    let r = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    println!("{}", r.summary());
    let s = r.summary();
    assert!(r.passed(), "{s}");
    for c in CHECKS {
        assert!(r.check(c).is_some_and(|c| c.passed), "{c} missing\n{s}");
    }
    let trace = r.trace.as_ref().expect("console records traces");
    let kicks = r.stat_u64("console.kicks").expect("console.kicks");
    assert_eq!(
        kicks,
        trace.kicks(),
        "guest kicks vs QEMU virtio_queue_notify\n{s}"
    );
    let irqs = r.stat_u64("console.irq").expect("console.irq");
    assert!(
        trace.interrupts() >= irqs,
        "QEMU sent fewer interrupts than taken\n{s}"
    );
    if cfg.irq != IrqMode::Poll {
        assert!(irqs > 0, "no interrupts taken\n{s}");
    }
    assert_eq!(r.stat_u64("console.logger.dropped"), Some(0), "{s}");
    // The emergency bytes include the early line and every log record of the run.
    assert!(
        r.stat_u64("console.emergency_bytes").unwrap_or(0) > 100,
        "{s}"
    );
    r
}

virtio_tests::qemu_matrix!("console", run);
virtio_tests::qemu_packed_matrix!("console", "virtio-serial-pci", run);
