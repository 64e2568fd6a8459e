//! `cargo xtask bench blk [--ms MS] [--repeats N]`: the block benchmark; the helpers the
//! benchmarks share (instruction counting in [`insns`], medians in [`Spread`]); `bench
//! ring` in [`ring`].
//!
//! Four QEMU configurations (q35, modern virtio-blk-pci on a `null-co` drive,
//! `ioeventfd=off`), each running 4 KiB random reads at depth 1 and 32, then 64 KiB
//! sequential reads, for `MS` ms per phase (default 2000):
//! - our driver (`bench-blk`) with MSI-X on the split ring, the same on the packed ring
//!   (`-global virtio-blk-pci.packed=on`; the run must show that VIRTIO_F_RING_PACKED was
//!   negotiated), and with INTx on the split ring;
//! - the `virtio-drivers` crate's `VirtIOBlk` (`bench-blk-vd`), which has no MSI-X
//!   support (INTx) and one 16-entry queue (so "depth 32" is depth 16 there).
//!
//! `N` repeats (default 3), interleaved: repeat 1 runs the four configurations one after
//! the other, then repeat 2, and so on, so a change in host load hits every driver alike.
//! The bench guest is the release build (the optimisation level the drivers ship at).
//!
//! Per phase: IOPS (guest clock; median and min–max over the repeats), guest instructions
//! and halts per request (the project's TCG plugin, counted between the phase's markers),
//! kicks and interrupts per request. QEMU's trace (`virtio_queue_notify`, `virtio_notify`,
//! `virtio_blk_req_complete`) is split per phase by the guest's markers and cross-checked
//! against the guest's own counters: QEMU must have completed exactly the requests the
//! guest counted, seen exactly the kicks our driver counted, and sent at least the
//! interrupts the guest took. These checks read generic virtio events of QEMU's, traced
//! alike for both ring layouts, so they hold for the packed session unchanged. A second
//! ratio table sets our packed session against our split one (both MSI-X).

pub mod insns;
pub mod ring;

use insns::{Counters, Counting};
use virtio_tests::qemu::{self, IrqMode, Machine, RunConfig, RunReport, Transport};

/// The median and range of one figure over the repeats.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when there are no values. The median of an even count is the mean of the
    /// middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// `median (min–max)`, whole numbers with thousands separators.
    pub fn with_range(&self) -> String {
        format!(
            "{} ({}–{})",
            thousands(self.median),
            thousands(self.min),
            thousands(self.max)
        )
    }

    /// `median ±p%`: the largest distance of a repeat from the median, in percent.
    pub fn with_deviation(&self) -> String {
        let dev = if self.median > 0.0 {
            (self.max - self.median).max(self.median - self.min) / self.median * 100.0
        } else {
            0.0
        };
        format!("{} ±{dev:.1}%", thousands(self.median))
    }
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if x < -0.5 { format!("-{out}") } else { out }
}

/// `a / b` for the ratio tables: `—` when there is no `b`.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

/// One benchmark configuration.
struct Config {
    driver: &'static str,
    scenario: &'static str,
    irq: IrqMode,
    /// QEMU offers VIRTIO_F_RING_PACKED (`packed=on`), and the run must negotiate it.
    packed: bool,
}

impl Config {
    /// What the messages call the configuration: `virtio-blk (ours, packed) msix`.
    fn what(&self) -> String {
        format!("{} {}", self.driver, self.irq)
    }
}

/// Ours on the split ring with MSI-X and its packed twin run one after the other, so the
/// split-vs-packed comparison sees the same host load.
const CONFIGS: [Config; 4] = [
    Config {
        driver: "virtio-blk (ours)",
        scenario: "bench-blk",
        irq: IrqMode::Msix,
        packed: false,
    },
    Config {
        driver: "virtio-blk (ours, packed)",
        scenario: "bench-blk",
        irq: IrqMode::Msix,
        packed: true,
    },
    Config {
        driver: "virtio-blk (ours)",
        scenario: "bench-blk",
        irq: IrqMode::Intx,
        packed: false,
    },
    Config {
        driver: "virtio-drivers 0.13",
        scenario: "bench-blk-vd",
        irq: IrqMode::Intx,
        packed: false,
    },
];

/// The feature bit's name as the guest's check details print it.
const RING_PACKED: &str = "RING_PACKED";

/// Whether the guest negotiated the packed ring: its `bench.init` check lists the
/// negotiated features by name.
fn negotiated_packed(r: &RunReport) -> bool {
    r.checks.iter().any(|c| c.detail.contains(RING_PACKED))
}

/// One phase of one session.
struct Phase {
    depth: u64,
    reqs: u64,
    ns: u64,
    /// Our driver's own counters (virtio-drivers keeps none).
    guest_kicks: Option<u64>,
    guest_irqs: u64,
    qemu_kicks: u64,
    qemu_irqs: u64,
    qemu_completions: u64,
    /// From the plugin, between the phase's markers.
    counted: Option<Counters>,
}

impl Phase {
    fn iops(&self) -> f64 {
        self.reqs as f64 * 1e9 / self.ns.max(1) as f64
    }
    fn per(&self, n: u64) -> f64 {
        n as f64 / self.reqs.max(1) as f64
    }
}

/// One QEMU run of one configuration.
struct Session {
    config: usize,
    phases: Vec<Phase>,
}

fn phases(r: &RunReport) -> Result<Vec<Phase>, String> {
    let get = |k: String| {
        r.stat_u64(&k)
            .ok_or_else(|| format!("missing stat {k}\n{}", r.summary()))
    };
    qemu::blk_host::PHASES
        .iter()
        .map(|&name| {
            Ok(Phase {
                depth: get(format!("bench.{name}.depth"))?,
                reqs: get(format!("bench.{name}.reqs"))?,
                ns: get(format!("bench.{name}.ns"))?,
                guest_kicks: r.stat_u64(&format!("bench.{name}.kicks")),
                guest_irqs: get(format!("bench.{name}.irqs"))?,
                qemu_kicks: get(format!("host.bench.{name}.kicks"))?,
                qemu_irqs: get(format!("host.bench.{name}.interrupts"))?,
                qemu_completions: get(format!("host.bench.{name}.completions"))?,
                counted: None,
            })
        })
        .collect()
}

/// Runs one session; `Ok(None)` when the run failed (its report is printed).
fn run_session(
    counting: &Counting,
    config: usize,
    repeat: u32,
    ms: u64,
    problems: &mut Vec<String>,
) -> Result<Option<Session>, String> {
    let c = &CONFIGS[config];
    let mut cfg = RunConfig::new(c.scenario)
        .machine(Machine::Q35)
        .transport(Transport::Modern)
        .irq(c.irq)
        .guest_arg(format!("bench_ms={ms}"));
    cfg.install_missing = true;
    let ring = if c.packed { "-packed" } else { "" };
    cfg.label = Some(format!("bench{ring}-{repeat}"));
    cfg.timeout = Some(std::time::Duration::from_secs(90 + 3 * ms / 1000 * 4));
    if c.packed {
        cfg.extra_qemu_args.extend([
            "-global".to_string(),
            "virtio-blk-pci.packed=on".to_string(),
        ]);
    }
    let run = format!("{}-{}{ring}", c.scenario, c.irq);
    let plugin_out = counting.instrument(&mut cfg, &run);
    eprintln!(
        "xtask: bench blk: repeat {repeat}: {}: {} ({ms} ms per phase)...",
        c.what(),
        c.scenario
    );
    let report = qemu::run_scenario(&cfg).map_err(|e| e.to_string())?;
    if !report.passed() {
        print!("{}", report.summary());
        problems.push(format!(
            "repeat {repeat}, {}: the run failed (logs in {})",
            c.what(),
            report.run_dir.display()
        ));
        return Ok(None);
    }
    // The ring the session is named for: packed=on must have been negotiated, and the
    // split sessions (QEMU's default, packed=off) must not have it.
    if negotiated_packed(&report) != c.packed {
        print!("{}", report.summary());
        problems.push(format!(
            "repeat {repeat}, {}: the guest {} the packed ring ({RING_PACKED} {} the \
             negotiated features; logs in {})",
            c.what(),
            if c.packed {
                "did not negotiate"
            } else {
                "negotiated"
            },
            if c.packed { "missing from" } else { "among" },
            report.run_dir.display()
        ));
        return Ok(None);
    }
    let mut phases = phases(&report)?;
    match insns::read_run(&plugin_out, &report.run_dir) {
        Ok(at) => {
            for (i, p) in phases.iter_mut().enumerate() {
                p.counted = insns::between(&at, 0x10 + i as u8, 0x20 + i as u8);
            }
        }
        Err(e) => problems.push(format!(
            "repeat {repeat}, {}: no instruction counts: {e}",
            c.what()
        )),
    }
    if counting.profile {
        let units: Vec<(&str, u8, u64)> = phases
            .iter()
            .zip(qemu::blk_host::PHASES)
            .enumerate()
            .map(|(i, (p, name))| (name, 0x10 + i as u8, p.reqs))
            .collect();
        let title = format!("repeat {repeat}, {}", c.what());
        insns::print_run_profile(counting, &run, &report.run_dir, &title, &units)?;
    }
    let _ = std::fs::remove_dir_all(&report.run_dir);
    // Cross-checks against QEMU's trace.
    let names = qemu::blk_host::PHASES;
    for (p, name) in phases.iter().zip(names) {
        let mut notes = Vec::new();
        if p.qemu_completions != p.reqs {
            notes.push(format!(
                "QEMU completed {} requests, the guest counted {}",
                p.qemu_completions, p.reqs
            ));
        }
        if let Some(k) = p.guest_kicks
            && k != p.qemu_kicks
        {
            notes.push(format!(
                "the driver counted {k} kicks, QEMU {}",
                p.qemu_kicks
            ));
        }
        if p.guest_irqs > p.qemu_irqs {
            notes.push(format!(
                "{} interrupts taken but {} sent",
                p.guest_irqs, p.qemu_irqs
            ));
        }
        if p.counted.is_none() {
            notes.push("no instruction count".into());
        }
        for n in notes {
            problems.push(format!("repeat {repeat}, {}, {name}: {n}", c.what()));
        }
    }
    Ok(Some(Session { config, phases }))
}

/// A phase's figure over every session of one configuration.
fn spread_of(
    sessions: &[Session],
    config: usize,
    phase: usize,
    figure: impl Fn(&Phase) -> Option<f64>,
) -> Option<Spread> {
    let values: Vec<f64> = sessions
        .iter()
        .filter(|s| s.config == config)
        .filter_map(|s| s.phases.get(phase).and_then(&figure))
        .collect();
    Spread::of(&values)
}

fn insns_per_req(p: &Phase) -> Option<f64> {
    p.counted.map(|c| p.per(c.instructions))
}

fn halts_per_req(p: &Phase) -> Option<f64> {
    p.counted.map(|c| p.per(c.halts))
}

pub fn bench_blk(ms: u64, repeats: u32, profile: bool) -> Result<bool, String> {
    let mut counting = Counting::prepare()?;
    counting.profile = profile;
    let mut sessions = Vec::new();
    let mut problems = Vec::new();
    for repeat in 1..=repeats {
        for config in 0..CONFIGS.len() {
            if let Some(s) = run_session(&counting, config, repeat, ms, &mut problems)? {
                sessions.push(s);
            }
        }
    }

    println!(
        "\nvirtio-blk on QEMU 7.2 (TCG, q35, modern, null-co 1 GiB, ioeventfd=off), release \
         guest, {ms} ms per phase, {repeats} interleaved repeats"
    );
    println!(
        "IOPS: median (min–max) of the repeats, guest clock. insns/req: guest instructions per \
         request (TCG plugin, between the phase's markers; median ±largest deviation). \
         halts/req: hlt instructions per request. kicks = QEMU virtio_queue_notify, irq sent = \
         QEMU virtio_notify, irq taken = guest handler runs; all per request, medians. \
         \"ours, packed\": our driver on the packed ring (QEMU packed=on, VIRTIO_F_RING_PACKED \
         negotiated); the other rows of ours use the split ring\n"
    );
    println!(
        "| driver                    | irq  | phase       | depth | IOPS                      | insns/req       | halts/req | kicks/req | irq sent/req | irq taken/req |"
    );
    println!(
        "|---------------------------|------|-------------|------:|--------------------------:|----------------:|----------:|----------:|-------------:|--------------:|"
    );
    let names = qemu::blk_host::PHASES;
    for (ci, c) in CONFIGS.iter().enumerate() {
        for (pi, name) in names.iter().enumerate() {
            let med = |f: &dyn Fn(&Phase) -> Option<f64>| {
                spread_of(&sessions, ci, pi, f).map(|s| s.median)
            };
            let Some(iops) = spread_of(&sessions, ci, pi, |p| Some(p.iops())) else {
                continue;
            };
            let depth = med(&|p| Some(p.depth as f64)).unwrap_or(0.0);
            println!(
                "| {:25} | {:4} | {:11} | {:5.0} | {:>25} | {:>15} | {:9.3} | {:9.3} | {:12.3} | {:13.3} |",
                c.driver,
                c.irq.name(),
                name,
                depth,
                iops.with_range(),
                spread_of(&sessions, ci, pi, insns_per_req)
                    .map_or("—".into(), |s| s.with_deviation()),
                med(&halts_per_req).unwrap_or(f64::NAN),
                med(&|p| Some(p.per(p.qemu_kicks))).unwrap_or(f64::NAN),
                med(&|p| Some(p.per(p.qemu_irqs))).unwrap_or(f64::NAN),
                med(&|p| Some(p.per(p.guest_irqs))).unwrap_or(f64::NAN),
            );
        }
    }

    // The median ratio of one figure between two configurations, for one phase.
    let ratio_of = |a: usize, b: usize, pi: usize, f: &dyn Fn(&Phase) -> Option<f64>| {
        let x = spread_of(&sessions, a, pi, f).map_or(f64::NAN, |s| s.median);
        let y = spread_of(&sessions, b, pi, f).map_or(f64::NAN, |s| s.median);
        ratio(x, y)
    };
    let position = |f: fn(&Config) -> bool| CONFIGS.iter().position(f);
    let vd = position(|c| c.scenario == "bench-blk-vd").expect("a virtio-drivers configuration");
    println!(
        "\nratios ours / virtio-drivers, medians (IOPS: higher is better; instructions, kicks, \
         interrupts: lower is better)\n"
    );
    println!("| ours         | phase       | IOPS  | insns/req | kicks/req | irq sent/req |");
    println!("|--------------|-------------|------:|----------:|----------:|-------------:|");
    for (ci, c) in CONFIGS.iter().enumerate().filter(|(i, _)| *i != vd) {
        for (pi, name) in names.iter().enumerate() {
            println!(
                "| {:12} | {:11} | {:>5} | {:>9} | {:>9} | {:>12} |",
                format!("{}{}", c.irq.name(), if c.packed { ", packed" } else { "" }),
                name,
                ratio_of(ci, vd, pi, &|p| Some(p.iops())),
                ratio_of(ci, vd, pi, &insns_per_req),
                ratio_of(ci, vd, pi, &|p| Some(p.per(p.qemu_kicks))),
                ratio_of(ci, vd, pi, &|p| Some(p.per(p.qemu_irqs))),
            );
        }
    }

    // Split against packed: the same driver, interrupt mode and device, one feature bit.
    let split = position(|c| c.scenario == "bench-blk" && c.irq == IrqMode::Msix && !c.packed)
        .expect("our split MSI-X configuration");
    let packed = position(|c| c.packed).expect("our packed configuration");
    println!(
        "\nratios ours packed / ours split (both MSI-X, run back to back in every repeat), \
         medians (IOPS: higher is better; instructions, kicks, interrupts: lower is better)\n"
    );
    println!("| phase       | IOPS  | insns/req | kicks/req | irq sent/req |");
    println!("|-------------|------:|----------:|----------:|-------------:|");
    for (pi, name) in names.iter().enumerate() {
        println!(
            "| {:11} | {:>5} | {:>9} | {:>9} | {:>12} |",
            name,
            ratio_of(packed, split, pi, &|p| Some(p.iops())),
            ratio_of(packed, split, pi, &insns_per_req),
            ratio_of(packed, split, pi, &|p| Some(p.per(p.qemu_kicks))),
            ratio_of(packed, split, pi, &|p| Some(p.per(p.qemu_irqs))),
        );
    }

    if let Some(depth) = spread_of(&sessions, vd, 1, |p| Some(p.depth as f64)) {
        println!(
            "\nvirtio-drivers: one 16-entry queue, so its \"depth 32\" phase runs at depth {:.0}; \
             it notifies per request (read_blocks_nb) when the device asks, and takes INTx only.",
            depth.median
        );
    }
    let packed_runs = sessions.iter().filter(|s| s.config == packed).count();
    println!(
        "packed ring: {RING_PACKED} was among the guest's negotiated features in every measured \
         packed run ({packed_runs} of {repeats}) and in no split run; the packed runs had the \
         same cross-checks as the split ones (QEMU's virtio_blk_req_complete, \
         virtio_queue_notify and virtio_notify are traced alike for both ring layouts)."
    );

    // At depth 32 our driver batches: one kick per batch and EVENT_IDX interrupts (on the
    // packed ring, the same through its event suppression structures' offsets).
    let mut ok = problems.is_empty();
    for s in sessions.iter().filter(|s| s.config != vd) {
        if let Some(p) = s.phases.iter().find(|p| p.depth == 32) {
            let per = p.per(p.qemu_kicks) + p.per(p.qemu_irqs);
            if per >= 0.5 {
                problems.push(format!(
                    "{}: {per:.3} kicks+interrupts per request at depth 32 (bound: 0.5)",
                    CONFIGS[s.config].what()
                ));
                ok = false;
            }
        }
    }
    if !problems.is_empty() {
        println!("\nproblems:");
        for p in &problems {
            println!("  {p}");
        }
    }
    let planned = repeats as usize * CONFIGS.len();
    ok &= sessions.len() == planned;
    println!(
        "bench blk: {} ({} of {planned} runs measured; each run's cross-checks with QEMU's trace, \
         the plugin's markers, the ring it was meant to negotiate, and the batching bound at \
         depth 32)",
        if ok { "PASS" } else { "FAIL" },
        sessions.len()
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_formatting() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        let s = Spread::of(&[1000.0, 1010.0, 990.0]).unwrap();
        assert_eq!(s.with_range(), "1,000 (990–1,010)");
        assert_eq!(s.with_deviation(), "1,000 ±1.0%");
        assert_eq!(ratio(1.0, 0.0), "—");
        assert_eq!(ratio(3.0, 2.0), "1.50");
    }
}
