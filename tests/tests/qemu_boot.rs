//! End to end: the `boot` scenario under QEMU (TCG) on both machine types, with every
//! transport and interrupt mode. The guest is built by the runner on first use.

use virtio_tests::qemu::{RunConfig, run_scenario};

fn run(cfg: RunConfig) {
    let report = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    println!("{}", report.summary());
    assert!(report.passed(), "{}", report.summary());
    // The runner attached net, blk, balloon and console: the guest must list all four.
    let mut types: Vec<&str> = report
        .devices
        .iter()
        .filter_map(|d| d.get("type").map(String::as_str))
        .collect();
    types.sort();
    assert_eq!(types, ["1", "2", "3", "5"], "{}", report.summary());
    // Device-originated interrupts through the real stack are `qemu_smoke`'s job; `boot`
    // touches no virtqueue, so QEMU must have traced no kick.
    let trace = report.trace.as_ref().expect("boot records traces");
    assert_eq!(trace.kicks(), 0, "{}", report.summary());
}

// One test per machine × transport × interrupt mode.
virtio_tests::qemu_matrix!("boot", run);

/// 64-bit BARs above the boot identity map (64 GiB): `pref64-reserve` makes SeaBIOS give each
/// root port a 32 GiB prefetchable window, so some BARs land beyond 64 GiB and the guest must
/// extend its page tables on demand.
#[test]
fn boot_q35_high_bars() {
    let mut cfg = RunConfig::new("boot");
    cfg.label = Some("high-bars".into());
    cfg.extra_qemu_args = vec!["-global".into(), "pcie-root-port.pref64-reserve=32G".into()];
    let report = run_scenario(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.passed(), "{}", report.summary());
    let beyond_64g = report
        .devices
        .iter()
        .flat_map(|d| d.iter().filter(|(k, _)| k.starts_with("bar")))
        .filter_map(|(_, v)| {
            v.split_once(':')
                .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
        })
        .filter_map(|base| u64::from_str_radix(base.trim_start_matches("0x"), 16).ok())
        .any(|base| base >= 64 << 30);
    assert!(beyond_64g, "no BAR above 64 GiB:\n{}", report.summary());
}
