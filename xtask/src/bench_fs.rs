//! `cargo xtask bench fs [--bytes N] [--files N] [--repeats N]`: the virtio-fs driver
//! against virtiofsd, beside the virtio-blk driver doing the same work on a raw image file
//! of the same size, in the same QEMU run (scenario `bench-fs`,
//! `tests/guest/src/scenarios/fs/bench.rs`; host side `start_bench` in
//! `tests/src/qemu/devices/fs.rs`).
//!
//! Phases, in the guest's order: `fs_write`, `blk_write` (`--bytes` in requests of the
//! file system's `max_write`), `fs_read`, `blk_read` (the same bytes back), `fs_create`,
//! `fs_getattr`, `fs_unlink` (`--files` small files), `blk_4k_wr` (a block device has no
//! metadata operations: for scale only, one 4 KiB write + read per operation). Every
//! operation waits for its reply (depth 1).
//!
//! Per phase: operations, throughput (MiB/s for the sequential phases, operations per
//! second otherwise; guest clock; median and range over the repeats), guest instructions
//! and halts per operation (the project's TCG plugin, between the phase's markers),
//! requests, kicks and interrupts per operation (the guest's own counters: virtiofsd
//! serves the virtio-fs queues through vhost-user, so QEMU's trace never sees them).

use crate::bench::insns::{self, Counters, Counting};
use crate::bench::{Spread, ratio, thousands};
use virtio_tests::qemu::devices::fs::find_virtiofsd;
use virtio_tests::qemu::{self, IrqMode, Machine, RunConfig, Transport};

/// The guest's phases, in order (`PHASES` in the guest's `fs/bench.rs`).
const PHASES: [&str; 8] = [
    "fs_write",
    "blk_write",
    "fs_read",
    "blk_read",
    "fs_create",
    "fs_getattr",
    "fs_unlink",
    "blk_4k_wr",
];

/// What one operation of a phase is, for the table; `chunk` is the request size of the
/// sequential phases.
fn operation(phase: &str, chunk: &str) -> String {
    match phase {
        "fs_write" => format!("WRITE of {chunk}"),
        "blk_write" => format!("block write of {chunk}"),
        "fs_read" => format!("READ of {chunk}"),
        "blk_read" => format!("block read of {chunk}"),
        "fs_create" => "CREATE + RELEASE".into(),
        "fs_getattr" => "GETATTR".into(),
        "fs_unlink" => "UNLINK".into(),
        _ => "4 KiB write + read (scale only)".into(),
    }
}

/// `1048576` → `1 MiB`, `65536` → `64 KiB`.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// One QEMU run: its phases, and the request size and virtiofsd's `max_write`.
struct Run {
    phases: Vec<Phase>,
    chunk: u64,
    max_write: u64,
}

fn sequential(phase: &str) -> bool {
    matches!(phase, "fs_write" | "blk_write" | "fs_read" | "blk_read")
}

/// One phase of one run.
struct Phase {
    ops: u64,
    ns: u64,
    bytes: u64,
    requests: u64,
    kicks: u64,
    irqs: u64,
    counted: Option<Counters>,
}

impl Phase {
    fn per(&self, n: u64) -> f64 {
        n as f64 / self.ops.max(1) as f64
    }
    /// MiB/s for the sequential phases, operations per second otherwise.
    fn rate(&self, phase: &str) -> f64 {
        let secs = self.ns.max(1) as f64 / 1e9;
        if sequential(phase) {
            self.bytes as f64 / 1048576.0 / secs
        } else {
            self.ops as f64 / secs
        }
    }
    fn insns(&self) -> Option<f64> {
        self.counted.map(|c| self.per(c.instructions))
    }
}

/// One QEMU run; `Ok(None)` when it failed (reported in `problems`).
fn run_session(
    counting: &Counting,
    repeat: u32,
    bytes: u64,
    files: u64,
    problems: &mut Vec<String>,
) -> Result<Option<Run>, String> {
    let mut cfg = RunConfig::new("bench-fs")
        .machine(Machine::Q35)
        .transport(Transport::Modern)
        .irq(IrqMode::Msix)
        .guest_arg(format!("bench_bytes={bytes}"))
        .guest_arg(format!("bench_files={files}"));
    cfg.install_missing = true;
    cfg.label = Some(format!("bench-fs-{repeat}"));
    cfg.timeout = Some(std::time::Duration::from_secs(
        300 + bytes / (64 << 10) / 10 + files / 10,
    ));
    let plugin_out = counting.instrument(&mut cfg, "bench-fs");
    eprintln!("xtask: bench fs: repeat {repeat}: virtio-fs and virtio-blk, MSI-X...");
    let report = qemu::run_scenario(&cfg).map_err(|e| e.to_string())?;
    if !report.passed() {
        print!("{}", report.summary());
        problems.push(format!(
            "repeat {repeat}: the run failed (logs in {})",
            report.run_dir.display()
        ));
        return Ok(None);
    }
    let get = |k: String| {
        report
            .stat_u64(&k)
            .ok_or_else(|| format!("missing stat {k}\n{}", report.summary()))
    };
    let mut phases = Vec::new();
    for name in PHASES {
        phases.push(Phase {
            ops: get(format!("bench.{name}.ops"))?,
            ns: get(format!("bench.{name}.ns"))?,
            bytes: get(format!("bench.{name}.bytes"))?,
            requests: get(format!("bench.{name}.requests"))?,
            kicks: get(format!("bench.{name}.kicks"))?,
            irqs: get(format!("bench.{name}.irqs"))?,
            counted: None,
        });
    }
    match insns::read_run(&plugin_out, &report.run_dir) {
        Ok(at) => {
            for (i, (p, name)) in phases.iter_mut().zip(PHASES).enumerate() {
                p.counted = insns::between(&at, 0x10 + i as u8, 0x20 + i as u8);
                if p.counted.is_none() {
                    problems.push(format!("repeat {repeat}, {name}: no instruction count"));
                }
            }
        }
        Err(e) => problems.push(format!("repeat {repeat}: no instruction counts: {e}")),
    }
    let run = Run {
        phases,
        chunk: get("bench.chunk".into())?,
        max_write: get("bench.max_write".into())?,
    };
    let _ = std::fs::remove_dir_all(&report.run_dir);
    Ok(Some(run))
}

fn spread(runs: &[Run], phase: usize, f: impl Fn(&Phase) -> Option<f64>) -> Option<Spread> {
    let values: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.phases.get(phase).and_then(&f))
        .collect();
    Spread::of(&values)
}

/// `median (min–max)` with one decimal below 100, whole numbers above.
fn with_range(s: &Spread) -> String {
    if s.median < 100.0 {
        format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
    } else {
        s.with_range()
    }
}

pub fn cmd(bytes: u64, files: u64, repeats: u32) -> Result<bool, String> {
    if find_virtiofsd().is_none() {
        println!(
            "bench fs: FAIL (virtiofsd not found: $VIRTIOFSD, /usr/libexec/virtiofsd, PATH, \
             ~/.cargo/bin; install it with `cargo install virtiofsd`, which needs \
             libcap-ng-dev and libseccomp-dev)"
        );
        return Ok(false);
    }
    if bytes < 4096 || files == 0 {
        return Err("--bytes must be at least 4K and --files at least 1".into());
    }
    let counting = Counting::prepare()?;
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    for repeat in 1..=repeats {
        if let Some(r) = run_session(&counting, repeat, bytes, files, &mut problems)? {
            runs.push(r);
        }
    }

    let (chunk, max_write) = runs.first().map_or((0, 0), |r| (r.chunk, r.max_write));
    println!(
        "\nvirtio-fs (virtiofsd, vhost-user-fs-pci) beside virtio-blk (a raw image file of {}, \
         ioeventfd=off) in the same QEMU 7.2 runs (TCG, q35, modern, MSI-X, 1 vCPU), release \
         guest, {repeats} run{}; every operation waits for its reply (depth 1)",
        size(bytes),
        if repeats == 1 { "" } else { "s" }
    );
    println!(
        "sequential phases: {} each way in requests of {} (virtiofsd's max_write is {}; the \
         driver's largest slot buffer is 1 MiB); metadata phases: {files} files",
        size(bytes),
        size(chunk),
        size(max_write)
    );
    println!(
        "rate: MiB/s for the sequential phases, operations/s for the others; median \
         (min–max) of the repeats, guest clock. insns/op: guest instructions per operation \
         (TCG plugin, between the phase's markers; median ±largest deviation). halts/op: hlt \
         per operation. req/op: FUSE requests (fs) or block requests (blk) per operation; \
         kicks/op and irq/op: the guest driver's own counts (QEMU does not see the vhost-user \
         queues); all medians\n"
    );
    println!(
        "| phase      | one operation                   |    ops | rate                      | unit  | insns/op         | halts/op | req/op | kicks/op | irq/op |"
    );
    println!(
        "|------------|---------------------------------|-------:|--------------------------:|-------|-----------------:|---------:|-------:|---------:|-------:|"
    );
    for (pi, name) in PHASES.iter().enumerate() {
        let Some(rate) = spread(&runs, pi, |p| Some(p.rate(name))) else {
            continue;
        };
        let med =
            |f: &dyn Fn(&Phase) -> Option<f64>| spread(&runs, pi, f).map_or(f64::NAN, |s| s.median);
        println!(
            "| {:10} | {:31} | {:>6} | {:>25} | {:5} | {:>16} | {:8.3} | {:6.2} | {:8.2} | {:6.2} |",
            name,
            operation(name, &size(chunk)),
            thousands(med(&|p| Some(p.ops as f64))),
            with_range(&rate),
            if sequential(name) { "MiB/s" } else { "ops/s" },
            spread(&runs, pi, Phase::insns).map_or("—".into(), |s| s.with_deviation()),
            med(&|p| p.counted.map(|c| p.per(c.halts))),
            med(&|p| Some(p.per(p.requests))),
            med(&|p| Some(p.per(p.kicks))),
            med(&|p| Some(p.per(p.irqs))),
        );
    }

    println!(
        "\nvirtio-fs / virtio-blk, medians (rate: above 1 means the file system is faster; \
         insns/op: above 1 means it executes more guest instructions per operation)\n"
    );
    println!("| fs phase   | against    | rate  | insns/op | note |");
    println!("|------------|------------|------:|---------:|------|");
    let index = |n: &str| PHASES.iter().position(|p| *p == n).expect("a phase");
    for (fs, blk, note) in [
        ("fs_write", "blk_write", "same bytes, same request size"),
        ("fs_read", "blk_read", "same bytes, same request size"),
        (
            "fs_create",
            "blk_4k_wr",
            "no block equivalent: a 4 KiB write + read, for scale",
        ),
        (
            "fs_getattr",
            "blk_4k_wr",
            "no block equivalent: a 4 KiB write + read, for scale",
        ),
        (
            "fs_unlink",
            "blk_4k_wr",
            "no block equivalent: a 4 KiB write + read, for scale",
        ),
    ] {
        let (f, b) = (index(fs), index(blk));
        let med = |i: usize, name: &str, insns: bool| {
            spread(
                &runs,
                i,
                |p| if insns { p.insns() } else { Some(p.rate(name)) },
            )
            .map_or(f64::NAN, |s| s.median)
        };
        println!(
            "| {fs:10} | {blk:10} | {:>5} | {:>8} | {note} |",
            ratio(med(f, fs, false), med(b, blk, false)),
            ratio(med(f, fs, true), med(b, blk, true)),
        );
    }

    if !problems.is_empty() {
        println!("\nproblems:");
        for p in &problems {
            println!("  {p}");
        }
    }
    let ok = problems.is_empty() && runs.len() == repeats as usize;
    println!(
        "bench fs: {} ({} of {repeats} runs measured; each run's guest checks (data read back \
         equals data written, FUSE replies complete), the host's check of the share, the \
         plugin's markers against QEMU's trace)",
        if ok { "PASS" } else { "FAIL" },
        runs.len()
    );
    Ok(ok)
}
