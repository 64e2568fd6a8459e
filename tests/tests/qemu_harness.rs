//! The runner's handling of guests that end badly: a panic, a CPU exception, a hang
//! (timeout), and an unknown scenario. Each must be reported as what it is, with the logs
//! kept for inspection.

use std::time::Duration;
use virtio_tests::qemu::{GuestExit, RunConfig, RunError, run_scenario};

fn run(cfg: RunConfig) -> virtio_tests::qemu::RunReport {
    run_scenario(&cfg).unwrap_or_else(|e| panic!("{}: {e}", cfg.scenario))
}

#[test]
fn panic_is_reported() {
    let r = run(RunConfig::new("panic"));
    assert_eq!(r.exit, GuestExit::Panic, "{}", r.summary());
    assert!(!r.passed());
    assert!(
        r.fatal.iter().any(|l| l.contains("deliberate panic")),
        "{}",
        r.summary()
    );
    assert!(
        r.kept && r.run_dir.join("serial.log").is_file(),
        "{}",
        r.summary()
    );
}

#[test]
fn exception_is_reported() {
    let r = run(RunConfig::new("fault"));
    assert_eq!(r.exit, GuestExit::Exception, "{}", r.summary());
    assert!(r.fatal.iter().any(|l| l.contains("#PF")), "{}", r.summary());
    assert!(
        r.serial_log.contains("cr2=0x0000009600000000"),
        "{}",
        r.summary()
    );
}

#[test]
fn hang_times_out() {
    let mut cfg = RunConfig::new("hang");
    cfg.timeout = Some(Duration::from_secs(3));
    let r = run(cfg);
    assert_eq!(
        r.exit,
        GuestExit::Timeout(Duration::from_secs(3)),
        "{}",
        r.summary()
    );
    assert!(r.check("selftest.before_hang").is_some_and(|c| c.passed));
    assert!(!r.done && !r.passed());
}

#[test]
fn unknown_scenario_is_an_error() {
    assert!(matches!(
        run_scenario(&RunConfig::new("no-such-scenario")),
        Err(RunError::UnknownScenario(_))
    ));
}

#[test]
fn unknown_guest_scenario_is_a_usage_exit() {
    // The guest takes the last `scenario=` on its command line: one it does not know.
    let r = run(RunConfig::new("boot").guest_arg("scenario=no-such-guest-scenario"));
    assert_eq!(r.exit, GuestExit::Usage, "{}", r.summary());
    assert!(
        r.fatal.iter().any(|l| l.contains("unknown scenario")),
        "{}",
        r.summary()
    );
}
