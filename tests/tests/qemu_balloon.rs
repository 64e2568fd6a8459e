//! End to end: the `balloon` scenario — the virtio-balloon driver (`BalloonDriver` over
//! `virtio-pci` + `virtio-core`, pages from the guest heap) against QEMU's
//! virtio-balloon-pci driven over QMP (`tests/guest/src/scenarios/balloon.rs`,
//! `tests/src/qemu/balloon_host.rs`).
//!
//! - the full machine × transport × interrupt-mode matrix: targets 192, 128, 224, 160 MiB
//!   and back to 256 MiB of a 256 MiB guest, each reached on both sides (the guest's
//!   balloon and `actual`, QEMU's `query-balloon`); statistics polled by QEMU every second
//!   and read back with `qom-get guest-stats` equal to a set the guest sent; `deflate_all`
//!   after the host's end signal; every page lent by the heap returned exactly once, and
//!   every one zeroed (QEMU discarded it while it was in the balloon);
//! - `deflate-on-oom=on`: `deflate_for_oom` takes 4 MiB back against the target and
//!   `query-balloon` shows it; the balloon stays down until the next target;
//! - `free-page-reporting=on`: 2 × 64 ranges of 256 KiB reported (at bring-up and on
//!   demand), every one acknowledged, returned to the heap and zeroed by QEMU; the same
//!   with `free-page-hint=on` offered too and declined by the guest, where QEMU's reporting
//!   queue is 4 (its free page queue, 3, stays unused);
//! - a 512 MiB guest with deeper targets.
//!
//! Every run also checks the guest's kick count against QEMU's `virtio_queue_notify`
//! trace (per queue) and the interrupts taken against those QEMU sent.

use virtio_tests::qemu::{IrqMode, Machine, RunConfig, RunReport, Transport, run_scenario};

const PAGE: u64 = 4096;

fn execute(cfg: RunConfig) -> RunReport {
    let r = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    println!("{}", r.summary());
    let s = r.summary();
    assert!(r.passed(), "{s}");
    let targets = cfg
        .extra_guest_args
        .iter()
        .find_map(|a| a.strip_prefix("balloon_targets="))
        .map_or(4, |t| t.split(',').count());
    for i in 0..=targets {
        for name in [
            format!("balloon.target{i}"),
            format!("host.balloon.target{i}"),
        ] {
            assert!(r.check(&name).is_some_and(|c| c.passed), "{name}\n{s}");
        }
    }
    for name in [
        "balloon.init",
        "balloon.deflate_all",
        "balloon.stats",
        "balloon.pool",
        "host.balloon.stats",
    ] {
        assert!(r.check(name).is_some_and(|c| c.passed), "{name}\n{s}");
    }
    // Every page lent came back, and QEMU discarded every one while it was ballooned.
    let lent = r.stat_u64("balloon.pool.lent").unwrap();
    assert!(lent > 0, "{s}");
    assert_eq!(r.stat_u64("balloon.pool.returned"), Some(lent), "{s}");
    assert_eq!(
        r.stat_u64("balloon.pool.returned_zeroed"),
        Some(lent),
        "{s}"
    );
    assert_eq!(
        r.stat_u64("balloon.pages_inflated"),
        r.stat_u64("balloon.pages_deflated"),
        "{s}"
    );

    // Kicks: the guest's, per queue, equal QEMU's trace.
    let trace = r.trace.as_ref().expect("balloon records traces");
    for q in 0..5u32 {
        let qemu: u64 = trace
            .kicks_per_queue
            .iter()
            .filter(|((_, n), _)| *n == q)
            .map(|(_, c)| c)
            .sum();
        let guest = r.stat_u64(&format!("balloon.q{q}.kicks")).unwrap_or(0);
        assert_eq!(
            qemu, guest,
            "queue {q}: QEMU virtio_queue_notify vs guest kicks\n{s}"
        );
    }
    assert_eq!(trace.kicks(), r.stat_u64("balloon.kicks").unwrap(), "{s}");
    let taken = r.stat_u64("balloon.irq").unwrap();
    if cfg.irq == IrqMode::Poll {
        assert_eq!(taken, 0, "{s}");
    } else {
        assert!(taken > 0, "{s}");
        // Config-change interrupts (one per target) are not traced as virtio_notify.
        assert!(trace.interrupts() + 64 >= taken, "{s}");
    }
    r
}

fn run(cfg: RunConfig) -> RunReport {
    execute(cfg)
}

virtio_tests::qemu_matrix!("balloon", run);
virtio_tests::qemu_packed_matrix!("balloon", "virtio-balloon-pci", run);

fn variant(test: &str, m: Machine, t: Transport, i: IrqMode) -> RunConfig {
    let mut cfg = RunConfig::new("balloon")
        .machine(m)
        .transport(t)
        .irq(i)
        .guest_arg(format!("balloon_test={test}"));
    cfg.label = Some(test.to_string());
    cfg
}

fn oom(cfg: RunConfig) {
    let r = execute(cfg);
    let s = r.summary();
    for name in ["balloon.oom", "host.balloon.oom"] {
        assert!(r.check(name).is_some_and(|c| c.passed), "{name}\n{s}");
    }
    assert_eq!(r.stat_u64("balloon.oom_pages"), Some(1024), "{s}");
    // 160 MiB left + the 4 MiB taken back.
    assert_eq!(
        r.stat_u64("balloon.oom.actual"),
        Some((96 << 20) / PAGE - 1024),
        "{s}"
    );
}

#[test]
fn oom_q35_modern_msix() {
    oom(variant(
        "oom",
        Machine::Q35,
        Transport::Modern,
        IrqMode::Msix,
    ));
}

#[test]
fn oom_pc_legacy_intx() {
    oom(variant(
        "oom",
        Machine::Pc,
        Transport::Legacy,
        IrqMode::Intx,
    ));
}

#[test]
fn oom_q35_transitional_poll() {
    oom(variant(
        "oom",
        Machine::Q35,
        Transport::Transitional,
        IrqMode::Poll,
    ));
}

/// `queue`: QEMU's reporting queue (3 after stats, 4 when free page hinting is offered).
fn report(cfg: RunConfig, queue: u32) {
    let r = execute(cfg);
    let s = r.summary();
    for name in ["balloon.report", "balloon.report_round"] {
        assert!(r.check(name).is_some_and(|c| c.passed), "{name}\n{s}");
    }
    assert_eq!(r.stat_u64("balloon.ranges_reported"), Some(128), "{s}");
    // QEMU discarded every reported range (its side of free page reporting).
    assert_eq!(r.stat_u64("balloon.report.ranges_zeroed"), Some(128), "{s}");
    // The reporting queue: one kick per report; none on another optional queue.
    let trace = r.trace.as_ref().unwrap();
    let kicks = |q: u32| -> u64 {
        trace
            .kicks_per_queue
            .iter()
            .filter(|((_, n), _)| *n == q)
            .map(|(_, c)| c)
            .sum()
    };
    assert_eq!(Some(kicks(queue)), r.stat_u64("balloon.reports"), "{s}");
    if queue == 4 {
        assert_eq!(kicks(3), 0, "QEMU's free page queue: {s}");
    }
}

#[test]
fn report_q35_modern_msix() {
    report(
        variant("report", Machine::Q35, Transport::Modern, IrqMode::Msix),
        3,
    );
}

#[test]
fn report_pc_legacy_intx() {
    report(
        variant("report", Machine::Pc, Transport::Legacy, IrqMode::Intx),
        3,
    );
}

#[test]
fn report_q35_transitional_poll() {
    report(
        variant(
            "report",
            Machine::Q35,
            Transport::Transitional,
            IrqMode::Poll,
        ),
        3,
    );
}

#[test]
fn report_declined_hint_q35_modern_msix() {
    report(
        variant(
            "report_nohint",
            Machine::Q35,
            Transport::Modern,
            IrqMode::Msix,
        ),
        4,
    );
}

#[test]
fn report_declined_hint_pc_legacy_intx() {
    report(
        variant(
            "report_nohint",
            Machine::Pc,
            Transport::Legacy,
            IrqMode::Intx,
        ),
        4,
    );
}

/// A 512 MiB guest: deeper targets (the balloon takes up to 384 MiB).
#[test]
fn big_guest_q35_modern_msix() {
    let mut cfg = RunConfig::new("balloon").guest_arg("balloon_targets=384,128,448,256");
    cfg.memory_mib = 512;
    cfg.label = Some("512m".into());
    execute(cfg);
}
