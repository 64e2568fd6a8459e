//! `cargo xtask bench blk [--ms MS] [--repeats N]`: the block benchmark; the helpers the
//! benchmarks share (instruction counting in [`insns`], medians in [`Spread`]); `bench
//! ring` in [`ring`].
//!
//! Four QEMU configurations (q35, modern virtio-blk-pci on a `null-co` drive,
//! `ioeventfd=off`), each running 4 KiB random reads at depth 1 and 32, then 64 KiB
//! sequential reads, for `MS` ms per phase (default 2000); our driver then runs four
//! scatter-gather phases (16 KiB to 1 MiB sequential reads at depth 1, each request 4 KiB
//! segments that are not contiguous), which virtio-drivers, without a scatter-gather API,
//! skips:
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
//! ratio table sets our packed session against our split one (both MSI-X). QEMU's
//! `virtio_blk_handle_read` shows the reads the device was asked for: one per device
//! request, and in sum exactly the sectors the guest's requests cover.
//!
//! The scatter-gather table ([`print_sg`]): per size, segments per request, device
//! requests per caller request (chains the driver added / requests: it splits requests
//! above its segment limit), instructions per request and per segment, and the cost of
//! each added segment between consecutive sizes; the verdict says whether that cost is
//! constant within [`SG_TOLERANCE`].

pub mod insns;
pub mod kext;
pub mod ring;
pub mod targets;

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

/// Where every bench writes its files (plugin profiles, callgrind outputs):
/// `target/bench`, created if missing.
pub fn output_dir() -> Result<std::path::PathBuf, String> {
    let dir = qemu::target_dir().join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
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
    /// The driver runs the scatter-gather phases (`PHASES[SG_FIRST..]`).
    sg: bool,
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
        sg: true,
    },
    Config {
        driver: "virtio-blk (ours, packed)",
        scenario: "bench-blk",
        irq: IrqMode::Msix,
        packed: true,
        sg: true,
    },
    Config {
        driver: "virtio-blk (ours)",
        scenario: "bench-blk",
        irq: IrqMode::Intx,
        packed: false,
        sg: true,
    },
    Config {
        driver: "virtio-drivers 0.13",
        scenario: "bench-blk-vd",
        irq: IrqMode::Intx,
        packed: false,
        sg: false,
    },
];

/// The scatter-gather phases: `PHASES[SG_FIRST..]`.
const SG_FIRST: usize = qemu::blk_host::SG_FIRST;

/// How far the cost of an added segment may stray from the reference (its average over
/// the sizes sent as one device request, 16 → 256 KiB) and still count as constant,
/// besides the allowance for split requests ([`sg_steps`]). In six runs the steps of the
/// unsplit sizes stayed within 0.97–1.06 of it. Per-request counts can move between runs
/// by a halt and wake-up per request (about 200 instructions) when the host is slow; that
/// cancels out of a step when all sizes waited alike (halts/req; the verdict says when
/// they did not). A cost that grows with the segment count (a quadratic cursor, or a
/// list walked several times per request) exceeds the tolerance many times over at 1 MiB.
const SG_TOLERANCE: f64 = 0.10;

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
    /// Bytes per caller request.
    bytes: Option<u64>,
    /// Scatter-gather phases: segments per caller request.
    segments: Option<u64>,
    /// Our driver's own counters (virtio-drivers keeps none).
    guest_kicks: Option<u64>,
    guest_irqs: u64,
    /// Chains our driver added (device requests) and saw completed.
    device_requests: Option<u64>,
    guest_completions: Option<u64>,
    qemu_kicks: u64,
    qemu_irqs: u64,
    qemu_completions: u64,
    /// Reads the device took from the ring (`virtio_blk_handle_read`) and their sectors.
    qemu_reads: u64,
    qemu_read_sectors: u64,
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
    /// `PHASES[..phases.len()]`: all of them for our driver, up to `SG_FIRST` for
    /// virtio-drivers.
    phases: Vec<Phase>,
    /// Why the driver skipped the scatter-gather phases (its `bench.sg` check).
    sg_skipped: Option<String>,
    /// Our driver's data segments per device request (`bench.sg.max_segments`).
    max_segments: Option<u64>,
}

fn phases(r: &RunReport, names: &[&str]) -> Result<Vec<Phase>, String> {
    let get = |k: String| {
        r.stat_u64(&k)
            .ok_or_else(|| format!("missing stat {k}\n{}", r.summary()))
    };
    names
        .iter()
        .map(|&name| {
            Ok(Phase {
                depth: get(format!("bench.{name}.depth"))?,
                reqs: get(format!("bench.{name}.reqs"))?,
                ns: get(format!("bench.{name}.ns"))?,
                bytes: r.stat_u64(&format!("bench.{name}.bytes")),
                segments: r.stat_u64(&format!("bench.{name}.segments")),
                guest_kicks: r.stat_u64(&format!("bench.{name}.kicks")),
                guest_irqs: get(format!("bench.{name}.irqs"))?,
                device_requests: r.stat_u64(&format!("bench.{name}.device_requests")),
                guest_completions: r.stat_u64(&format!("bench.{name}.completions")),
                qemu_kicks: get(format!("host.bench.{name}.kicks"))?,
                qemu_irqs: get(format!("host.bench.{name}.interrupts"))?,
                qemu_completions: get(format!("host.bench.{name}.completions"))?,
                qemu_reads: get(format!("host.bench.{name}.reads"))?,
                qemu_read_sectors: get(format!("host.bench.{name}.read_sectors"))?,
                counted: None,
            })
        })
        .collect()
}

/// The cross-checks of one phase against QEMU's trace; what failed.
fn phase_problems(p: &Phase, sg: bool) -> Vec<String> {
    let mut notes = Vec::new();
    // Device requests: one per caller request, except where our driver split them (the
    // scatter-gather phases), where its own count of chains added says how many.
    let device_reqs = if sg { p.device_requests } else { Some(p.reqs) };
    match device_reqs {
        Some(d) => {
            if p.qemu_completions != d {
                notes.push(format!(
                    "QEMU completed {} requests, the guest {} {d}",
                    p.qemu_completions,
                    if sg { "added" } else { "counted" }
                ));
            }
            if p.qemu_reads != d {
                notes.push(format!(
                    "QEMU took {} reads from the ring, the guest {} {d}",
                    p.qemu_reads,
                    if sg { "added" } else { "counted" }
                ));
            }
            if sg && d < p.reqs {
                notes.push(format!(
                    "{d} device requests for {} caller requests",
                    p.reqs
                ));
            }
        }
        None => notes.push("no device request count from the driver".into()),
    }
    if sg && p.guest_completions != p.device_requests {
        notes.push(format!(
            "the driver saw {:?} chains complete of {:?} added",
            p.guest_completions, p.device_requests
        ));
    }
    if sg && p.segments.is_none() {
        notes.push("no segment count".into());
    }
    if let Some(b) = p.bytes
        && p.qemu_read_sectors != p.reqs * (b / 512)
    {
        notes.push(format!(
            "QEMU was asked for {} sectors, the guest's {} requests of {b} bytes cover {}",
            p.qemu_read_sectors,
            p.reqs,
            p.reqs * (b / 512)
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
    notes
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
    // Four times each phase's time, on top of boot and set-up.
    let phase_count = qemu::blk_host::PHASES.len() as u64;
    cfg.timeout = Some(std::time::Duration::from_secs(
        90 + phase_count * ms / 1000 * 4,
    ));
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
    let names = &qemu::blk_host::PHASES[..if c.sg {
        qemu::blk_host::PHASES.len()
    } else {
        SG_FIRST
    }];
    let mut phases = phases(&report, names)?;
    let sg_skipped = if c.sg {
        None
    } else {
        Some(
            report
                .check("bench.sg")
                .map_or("the guest did not say why".into(), |k| k.detail.clone()),
        )
    };
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
    for (i, (p, name)) in phases.iter().zip(names).enumerate() {
        for n in phase_problems(p, i >= SG_FIRST) {
            problems.push(format!("repeat {repeat}, {}, {name}: {n}", c.what()));
        }
    }
    Ok(Some(Session {
        config,
        phases,
        sg_skipped,
        max_segments: report.stat_u64("bench.sg.max_segments"),
    }))
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
    let names = &qemu::blk_host::PHASES[..SG_FIRST];
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

    // The ratio of one figure's medians between two configurations, for one phase.
    let ratio_value = |a: usize, b: usize, pi: usize, f: &dyn Fn(&Phase) -> Option<f64>| {
        let x = spread_of(&sessions, a, pi, f).map_or(f64::NAN, |s| s.median);
        let y = spread_of(&sessions, b, pi, f).map_or(f64::NAN, |s| s.median);
        if y > 0.0 { x / y } else { f64::NAN }
    };
    let ratio_of = |a: usize, b: usize, pi: usize, f: &dyn Fn(&Phase) -> Option<f64>| {
        let r = ratio_value(a, b, pi, f);
        if r.is_finite() {
            format!("{r:.2}")
        } else {
            "—".into()
        }
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

    let sg = print_sg(&sessions);

    // Issue 15's targets: our driver as it ships (split ring, MSI-X) against virtio-drivers.
    let phase = |name: &str| names.iter().position(|n| *n == name);
    let target = |what, name: &str, figure: &dyn Fn(&Phase) -> Option<f64>, bound, at_most| {
        targets::Target {
            what,
            ratio: phase(name).map_or(f64::NAN, |pi| ratio_value(split, vd, pi, figure)),
            bound,
            at_most,
        }
    };
    let iops = |p: &Phase| Some(p.iops());
    let targets = targets::report(
        "ratios of medians over this run's repeats",
        &[
            target(
                "4K random QD1, guest instructions per request, ours / theirs",
                "rand4k_qd1",
                &insns_per_req,
                0.8,
                true,
            ),
            target(
                "4K random QD32, guest instructions per request, ours / theirs",
                "rand4k_qd32",
                &insns_per_req,
                0.7,
                true,
            ),
            target(
                "4K random QD1, IOPS, ours / theirs",
                "rand4k_qd1",
                &iops,
                1.5,
                false,
            ),
            target(
                "4K random QD32, IOPS, ours / theirs",
                "rand4k_qd32",
                &iops,
                2.5,
                false,
            ),
        ],
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
         depth 32); scatter-gather cost per added segment {}; {targets} (split ring, MSI-X)",
        if ok { "PASS" } else { "FAIL" },
        sessions.len(),
        match sg {
            Some(true) => format!(
                "constant within ±{:.0}% from 16 KiB to 1 MiB",
                SG_TOLERANCE * 100.0
            ),
            Some(false) => format!(
                "NOT constant within ±{:.0}% (see above; a target, not a cross-check)",
                SG_TOLERANCE * 100.0
            ),
            None => "not measured".into(),
        }
    );
    Ok(ok)
}

/// One scatter-gather phase of one configuration, medians over its sessions.
struct SgRow {
    name: &'static str,
    bytes: f64,
    segments: f64,
    /// Device requests (chains added) per caller request.
    device_per_req: f64,
    iops: Option<Spread>,
    insns: Option<Spread>,
    halts_per_req: f64,
}

impl SgRow {
    fn insns_per_segment(&self) -> f64 {
        self.insns.map_or(f64::NAN, |s| s.median / self.segments)
    }
}

/// The instructions each segment added between two consecutive sizes cost:
/// `(insns/req(b) − insns/req(a)) / (segments(b) − segments(a))`. The per-request work
/// that does not depend on the segment count cancels out.
fn added_segment_cost(a: &SgRow, b: &SgRow) -> f64 {
    match (a.insns, b.insns) {
        (Some(x), Some(y)) if b.segments > a.segments => {
            (y.median - x.median) / (b.segments - a.segments)
        }
        _ => f64::NAN,
    }
}

/// One step between consecutive scatter-gather sizes.
#[derive(Copy, Clone, Debug, PartialEq)]
struct SgStep {
    /// Its cost per added segment over the reference ([`sg_reference`]).
    ratio: f64,
    /// The range of `ratio` that counts as constant.
    low: f64,
    high: f64,
}

/// The reference cost per added segment: from the first size to the largest whose
/// requests become as many device requests as the first's (16 → 256 KiB: one each).
fn sg_reference(rows: &[SgRow]) -> Option<f64> {
    let first = rows.first()?;
    let last = rows
        .iter()
        .skip(1)
        .take_while(|r| r.device_per_req == first.device_per_req)
        .last()
        .or(rows.get(1))?;
    let cost = added_segment_cost(first, last);
    (cost.is_finite() && cost > 0.0).then_some(cost)
}

/// Each step's cost per added segment against the reference ([`sg_reference`]):
/// constant when within ±[`SG_TOLERANCE`], plus an allowance where the step adds device
/// requests (the driver splits requests above its segment limit): each extra device
/// request may cost up to a whole request's fixed cost, the instructions a request
/// costs besides its segments (`insns/req(16 KiB) − 4 × the reference`). That is
/// generous (an extra part is queued and completed but needs no kick, interrupt or
/// bench-loop turn of its own) and still far below what a quadratic or repeated walk of
/// the list costs. `None` when a figure is missing.
fn sg_steps(rows: &[SgRow]) -> Option<Vec<SgStep>> {
    let reference = sg_reference(rows)?;
    let first_row = rows.first()?;
    let fixed = (first_row.insns?.median - first_row.segments * reference).max(0.0);
    rows.windows(2)
        .map(|w| {
            let cost = added_segment_cost(&w[0], &w[1]);
            let extra = (w[1].device_per_req - w[0].device_per_req).max(0.0);
            let allowance = extra * fixed / (w[1].segments - w[0].segments);
            cost.is_finite().then(|| SgStep {
                ratio: cost / reference,
                low: 1.0 - SG_TOLERANCE,
                high: 1.0 + SG_TOLERANCE + allowance / reference,
            })
        })
        .collect()
}

impl SgStep {
    fn within(&self) -> bool {
        self.ratio >= self.low && self.ratio <= self.high
    }
}

/// Whether every step is within its range; `None` without the figures.
fn sg_constant(rows: &[SgRow]) -> Option<bool> {
    Some(sg_steps(rows)?.iter().all(SgStep::within))
}

/// The scatter-gather table and its verdict line; returns the verdict (`None`: nothing
/// measured).
fn print_sg(sessions: &[Session]) -> Option<bool> {
    let names = &qemu::blk_host::PHASES[SG_FIRST..];
    println!(
        "\nscatter-gather, our driver only: sequential reads at depth 1, each request 4 KiB \
         segments on every other page of a buffer (no two contiguous). dev req/req: chains the \
         driver added / caller requests (it splits a request above its segment limit). \
         halts/req as above. insns/seg: insns/req / segments, and ×16K that over the 16 KiB row's (falls with size \
         as the per-request cost is shared by more segments). insns/added seg: \
         (insns/req − the previous row's) / (segments − the previous row's), the cost of one \
         more segment with the per-request cost cancelled out; ×ref: that over the reference, \
         the same cost from 16 KiB to 256 KiB (the sizes sent as one device request); \
         allowed: the range of ×ref that counts as constant (see the verdict)\n"
    );
    println!(
        "| driver                    | irq  | phase      | request  | segs/req | dev req/req | IOPS                      | insns/req        | halts/req | insns/seg | ×16K | insns/added seg | ×ref | allowed     |"
    );
    println!(
        "|---------------------------|------|------------|---------:|---------:|------------:|--------------------------:|-----------------:|----------:|----------:|-----:|----------------:|-----:|------------:|"
    );
    // Per configuration of ours: what, the verdict, the steps, whether halts/req differ
    // between the sizes.
    let mut verdicts: Vec<(String, Option<bool>, Vec<SgStep>, bool)> = Vec::new();
    for (ci, c) in CONFIGS.iter().enumerate() {
        if !c.sg {
            let why = sessions
                .iter()
                .find(|s| s.config == ci)
                .and_then(|s| s.sg_skipped.clone())
                .unwrap_or_else(|| "no run".into());
            println!(
                "| {:25} | {:4} | {:10} | {:>8} | {:>8} | {:>11} | {:>25} | {:>16} | {:>9} | {:>9} | {:>4} | {:>15} | {:>4} | {:>11} |",
                c.driver,
                c.irq.name(),
                "sg*",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a",
                "n/a"
            );
            println!("  {}: n/a, {why}", c.driver);
            continue;
        }
        let what = format!("{} {}", c.irq.name(), ring_name(c));
        let rows: Vec<SgRow> = names
            .iter()
            .enumerate()
            .filter_map(|(k, &name)| {
                let pi = SG_FIRST + k;
                let med = |f: &dyn Fn(&Phase) -> Option<f64>| {
                    spread_of(sessions, ci, pi, f).map(|s| s.median)
                };
                Some(SgRow {
                    name,
                    bytes: med(&|p| p.bytes.map(|b| b as f64))?,
                    segments: med(&|p| p.segments.map(|n| n as f64))?,
                    device_per_req: med(&|p| p.device_requests.map(|d| p.per(d)))
                        .unwrap_or(f64::NAN),
                    iops: spread_of(sessions, ci, pi, |p| Some(p.iops())),
                    insns: spread_of(sessions, ci, pi, insns_per_req),
                    halts_per_req: med(&halts_per_req).unwrap_or(f64::NAN),
                })
            })
            .collect();
        if rows.len() != names.len() {
            verdicts.push((what, None, Vec::new(), false));
            continue;
        }
        let steps = sg_steps(&rows);
        let base = rows.first().map_or(f64::NAN, SgRow::insns_per_segment);
        for (k, r) in rows.iter().enumerate() {
            let step = k
                .checked_sub(1)
                .and_then(|j| Some((rows.get(j)?, steps.as_ref()?.get(j)?)));
            let (added, added_ratio, allowed) = match step {
                Some((prev, st)) => (
                    format!("{:.1}", added_segment_cost(prev, r)),
                    format!("{:.2}", st.ratio),
                    format!("{:.2}–{:.2}", st.low, st.high),
                ),
                None => ("—".into(), "—".into(), "—".into()),
            };
            println!(
                "| {:25} | {:4} | {:10} | {:>8} | {:8.0} | {:11.2} | {:>25} | {:>16} | {:9.3} | {:9.1} | {:>4} | {:>15} | {:>4} | {:>11} |",
                c.driver,
                c.irq.name(),
                r.name,
                size_name(r.bytes),
                r.segments,
                r.device_per_req,
                r.iops.map_or("—".into(), |s| s.with_range()),
                r.insns.map_or("—".into(), |s| s.with_deviation()),
                r.halts_per_req,
                r.insns_per_segment(),
                ratio(r.insns_per_segment(), base),
                added,
                added_ratio,
                allowed,
            );
        }
        verdicts.push((
            what,
            sg_constant(&rows),
            steps.unwrap_or_default(),
            uneven_halts(&rows),
        ));
    }
    if verdicts.is_empty() || verdicts.iter().any(|v| v.1.is_none()) {
        println!(
            "\nscatter-gather verdict: not measured (no instruction counts for every size in \
             every configuration of ours)"
        );
        return None;
    }
    let ok = verdicts.iter().all(|v| v.1 == Some(true));
    let detail: Vec<String> = verdicts
        .iter()
        .map(|(what, _, st, uneven)| {
            let r: Vec<String> = st
                .iter()
                .zip(names.windows(2))
                .map(|(st, w)| {
                    format!(
                        "{}→{} {:.2}{}",
                        w[0].trim_start_matches("sg").trim_end_matches("_qd1"),
                        w[1].trim_start_matches("sg").trim_end_matches("_qd1"),
                        st.ratio,
                        if st.within() { "" } else { " (out)" }
                    )
                })
                .collect();
            format!(
                "{what}: {}{}",
                r.join(", "),
                if *uneven {
                    " — halts/req differ between the sizes: the host's timing added a wait to \
                     some requests' cost, not the driver; compare another run"
                } else {
                    ""
                }
            )
        })
        .collect();
    println!(
        "\nscatter-gather verdict: the cost per added segment is {} from 16 KiB to 1 MiB in \
         every configuration of ours (each step's cost per added segment over the reference, \
         the same from 16 to 256 KiB: {}). Constant means each step within ±{:.0}% of the \
         reference (in one run, the steps of the unsplit sizes stay within a few per cent \
         of it: what moves per-request counts between runs, a halt and wake-up more per \
         request on a slow host, cancels out of a step when all sizes wait alike), plus, where a step adds device requests (the driver splits requests \
         above {} segments), up to one whole request's fixed cost (insns/req at 16 KiB − 4 × \
         the reference) per extra device request: the \"allowed\" column.",
        if ok { "CONSTANT" } else { "NOT constant" },
        detail.join("; "),
        SG_TOLERANCE * 100.0,
        max_segments(sessions).map_or("its limit of".into(), |m| m.to_string()),
    );
    Some(ok)
}

/// The driver's data segments per device request, as the guest reported it.
fn max_segments(sessions: &[Session]) -> Option<u64> {
    sessions.iter().find_map(|s| s.max_segments)
}

/// Whether the sizes waited differently (halts per request more than 0.25 apart): a
/// halt and its wake-up cost about 200 instructions per request, which a step between
/// two such sizes spreads over its added segments.
fn uneven_halts(rows: &[SgRow]) -> bool {
    let h = rows.iter().map(|r| r.halts_per_req);
    let (lo, hi) = h.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    hi - lo > 0.25
}

/// `msix, split` for the verdict lines.
fn ring_name(c: &Config) -> &'static str {
    if c.packed { "packed" } else { "split" }
}

/// `16 KiB`, `1 MiB`.
fn size_name(bytes: f64) -> String {
    if bytes >= 1048576.0 && bytes % 1048576.0 == 0.0 {
        format!("{:.0} MiB", bytes / 1048576.0)
    } else {
        format!("{:.0} KiB", bytes / 1024.0)
    }
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
        assert_eq!(size_name(16384.0), "16 KiB");
        assert_eq!(size_name(1048576.0), "1 MiB");
    }

    fn row(segments: f64, device_per_req: f64, insns: f64) -> SgRow {
        SgRow {
            name: "x",
            bytes: segments * 4096.0,
            segments,
            device_per_req,
            iops: None,
            halts_per_req: 0.1,
            insns: Spread::of(&[insns]),
        }
    }

    /// 16 KiB to 1 MiB: 1, 1, 1 and 4 device requests per request; `cost(n, parts)`.
    fn rows(cost: impl Fn(f64, f64) -> f64) -> Vec<SgRow> {
        [(4.0, 1.0), (16.0, 1.0), (64.0, 1.0), (256.0, 4.0)]
            .iter()
            .map(|&(n, d)| row(n, d, cost(n, d)))
            .collect()
    }

    #[test]
    fn scatter_gather_verdict() {
        // 2000 per request + 50 per segment: constant, though insns/seg falls with size.
        let linear = rows(|n, _| 2000.0 + 50.0 * n);
        assert_eq!(added_segment_cost(&linear[0], &linear[1]), 50.0);
        // The reference spans the sizes sent as one device request: 4 → 64 segments.
        let bent = rows(|n, _| 2000.0 + 50.0 * n + if n >= 64.0 { 600.0 } else { 0.0 });
        assert_eq!(sg_reference(&bent), Some(60.0));
        assert_eq!(sg_constant(&linear), Some(true));
        let steps = sg_steps(&linear).unwrap();
        assert_eq!(steps.len(), 3);
        assert!(steps.iter().all(|s| s.ratio == 1.0));
        // The split step may cost up to the fixed 2000 per extra part: 3 × 2000 / 192.
        assert!((steps[2].high - (1.1 + 6000.0 / 192.0 / 50.0)).abs() < 1e-9);
        assert!(linear[3].insns_per_segment() < linear[0].insns_per_segment());
        // Extra parts at 600 instructions each: constant.
        assert_eq!(
            sg_constant(&rows(|n, d| 2000.0 + 50.0 * n + 600.0 * (d - 1.0))),
            Some(true)
        );
        // A quadratic term: the added segments cost more and more.
        assert_eq!(
            sg_constant(&rows(|n, _| 2000.0 + 50.0 * n + 0.5 * n * n)),
            Some(false)
        );
        // The list walked three times when the request is split (today's 1 MiB shape).
        assert_eq!(
            sg_constant(&rows(|n, d| 2000.0
                + 50.0 * n
                + if d > 1.0 { 2.0 * 47.0 * n } else { 0.0 })),
            Some(false)
        );
        // Too slow a step without a split fails too.
        assert_eq!(
            sg_constant(&rows(|n, _| 2000.0
                + 50.0 * n
                + if n > 16.0 { 10.0 * (n - 16.0) } else { 0.0 })),
            Some(false)
        );
        assert_eq!(sg_constant(&[]), None);
        assert!(!uneven_halts(&linear));
        let mut waited = rows(|n, _| 2000.0 + 50.0 * n);
        waited[1].halts_per_req = 1.0;
        assert!(uneven_halts(&waited));
    }
}
