//! Developer tasks: `cargo xtask <command>`.
//!
//! - `qemu <scenario> [--transport modern|transitional|legacy] [--machine q35|pc]
//!   [--irq msix|intx|poll] [--matrix] [--timeout SECS] [--keep] [--verbose]
//!   [--guest-arg K=V]... [-- extra qemu args]`: build the guest, run one scenario, print
//!   the report (`--matrix`: every machine × transport × irq combination, then a table);
//! - `demo`: boot the guest with each device type (net, blk, console, balloon, rng) and
//!   show what each driver did;
//! - `bench net [--bytes N]`: our virtio-net vs the virtio-drivers crate over the same
//!   TCP transfer (`bench_net.rs`);
//! - `kexts [--check]`: build the kext bundles (`kexts.rs`); `install [--dry-run]`: copy
//!   them to /Library/Extensions and load them on macOS (`install.rs`);
//! - `test`: fmt, clippy (workspace and guest), guest build, `cargo test --workspace`.

mod bench;
mod bench_net;
mod install;
mod kexts;

use std::process::{Command, ExitCode};
use std::time::Instant;
use virtio_tests::qemu::{self, IrqMode, Machine, RunConfig, RunReport, Transport};

const USAGE: &str = "usage:
  cargo xtask qemu <scenario> [--transport modern|transitional|legacy] [--machine q35|pc]
                   [--irq msix|intx|poll] [--matrix] [--timeout SECS] [--keep] [--verbose]
                   [--guest-arg KEY=VALUE]... [-- extra qemu args]
  cargo xtask demo
  cargo xtask bench blk [--ms MS-PER-PHASE]
  cargo xtask bench net [--bytes N]
  cargo xtask kexts [--check]
  sudo cargo xtask install [--dry-run]   (macOS test VM; --dry-run prints the plan anywhere)
  cargo xtask test";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("qemu") => cmd_qemu(&args[1..]),
        Some("demo") => cmd_demo(),
        Some("bench") => bench::cmd_bench(&args[1..]),
        Some("kexts") => kexts::cmd_kexts(&args[1..]),
        Some("install") => install::cmd_install(&args[1..]),
        Some("test") => cmd_test(),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(true)
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::from(2)
        }
    }
}

/// Options of `cargo xtask qemu` beyond the run configuration.
struct QemuOptions {
    verbose: bool,
    /// Run every machine × transport × irq combination (the given ones are ignored).
    matrix: bool,
}

fn parse_qemu_args(args: &[String]) -> Result<(RunConfig, QemuOptions), String> {
    let mut it = args.iter();
    let mut cfg: Option<RunConfig> = None;
    let mut verbose = false;
    let mut matrix = false;
    let (mut transport, mut machine, mut irq) = (None, None, None);
    let (mut timeout, mut keep, mut guest_args, mut extra) = (None, false, Vec::new(), Vec::new());
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--transport" => transport = Some(value("--transport")?.parse::<Transport>()?),
            "--machine" => machine = Some(value("--machine")?.parse::<Machine>()?),
            "--irq" => irq = Some(value("--irq")?.parse::<IrqMode>()?),
            "--timeout" => {
                let secs: u64 = value("--timeout")?
                    .parse()
                    .map_err(|e| format!("--timeout: {e}"))?;
                timeout = Some(std::time::Duration::from_secs(secs));
            }
            "--guest-arg" => guest_args.push(value("--guest-arg")?),
            "--keep" => keep = true,
            "--verbose" | "-v" => verbose = true,
            "--matrix" => matrix = true,
            "--" => {
                extra.extend(it.by_ref().cloned());
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            s if cfg.is_none() => cfg = Some(RunConfig::new(s)),
            s => return Err(format!("unexpected argument {s}\n{USAGE}")),
        }
    }
    let mut cfg = cfg.ok_or_else(|| format!("missing scenario\n{USAGE}"))?;
    cfg.transport = transport.unwrap_or(cfg.transport);
    cfg.machine = machine.unwrap_or(cfg.machine);
    cfg.irq = irq.unwrap_or(cfg.irq);
    cfg.timeout = timeout;
    cfg.keep_run_dir = keep;
    cfg.extra_guest_args = guest_args;
    cfg.extra_qemu_args = extra;
    cfg.install_missing = true;
    Ok((cfg, QemuOptions { verbose, matrix }))
}

fn run(cfg: &RunConfig) -> Result<RunReport, String> {
    eprintln!(
        "xtask: building guest and running {} [{}]...",
        cfg.scenario,
        cfg.config_name()
    );
    qemu::run_scenario(cfg).map_err(|e| e.to_string())
}

fn cmd_qemu(args: &[String]) -> Result<bool, String> {
    let (cfg, opts) = parse_qemu_args(args)?;
    if opts.matrix {
        return cmd_matrix(&cfg);
    }
    let report = run(&cfg)?;
    if opts.verbose {
        println!("$ {}", report.qemu_command.join(" "));
        println!("--- serial ---\n{}--- end serial ---", report.serial_log);
    }
    print!("{}", report.summary());
    if !report.stats.is_empty() {
        println!("  stats:");
        for (k, v) in &report.stats {
            println!("    {k} = {v}");
        }
    }
    if let Some(out) = &report.console_output
        && !out.is_empty()
    {
        println!("  virtconsole output: {:?}", String::from_utf8_lossy(out));
    }
    if report.kept {
        println!("  run directory: {}", report.run_dir.display());
    }
    Ok(report.passed())
}

/// One run per machine × transport × irq mode, then a table.
fn cmd_matrix(base: &RunConfig) -> Result<bool, String> {
    let mut rows = Vec::new();
    for &machine in Machine::all() {
        for &transport in Transport::all() {
            for &irq in IrqMode::all() {
                let cfg = base.clone().machine(machine).transport(transport).irq(irq);
                let report = run(&cfg)?;
                if !report.passed() {
                    print!("{}", report.summary());
                }
                let failed = report.failed_checks().count();
                rows.push((
                    cfg.config_name(),
                    report.passed(),
                    report.checks.len(),
                    failed,
                    report.exit.to_string(),
                ));
            }
        }
    }
    println!("\n{} across {} configurations:", base.scenario, rows.len());
    for (name, passed, checks, failed, exit) in &rows {
        println!(
            "  {} {name:26} {checks:3} checks, {failed} failed ({exit})",
            if *passed { "PASS" } else { "FAIL" }
        );
    }
    Ok(rows.iter().all(|r| r.1))
}

/// The demo's parts: scenario, what it shows, guest arguments.
const DEMO_PARTS: &[(&str, &str, &[&str])] = &[
    (
        "smoke",
        "Every device through virtio-pci + virtio-core: reset, features, all queues, \
         DRIVER_OK, one request each completed by an interrupt",
        &[],
    ),
    (
        "net",
        "virtio-net under the smoltcp TCP/IP stack: DHCP lease from QEMU's user network, \
         then a TCP transfer both ways with a server on the host's loopback",
        &["net_bytes=8388608"],
    ),
    (
        "blk",
        "virtio-blk: a pattern written over the 8 MiB disk (split requests), flushed, read \
         back and verified, discard / write-zeroes, GET_ID; the host checks the image file",
        &["blk_seed=2024"],
    ),
    (
        "console",
        "virtio-console: emergency write before DRIVER_OK, the kernel logger on port 0, two \
         named ports with a host peer on unix sockets (lines, echo, 64 KiB each way, close \
         and reopen from the host)",
        &[],
    ),
    (
        "balloon",
        "virtio-balloon: QMP targets up and down (192, 128, 224, 160, 256 MiB of a 256 MiB \
         guest) reached on both sides, statistics read back with qom-get, every page lent by \
         the heap returned once",
        &[],
    ),
    (
        "rng",
        "virtio-rng: 4 KiB of entropy read in order from QEMU's rng-random backend, which \
         reads a host file of known bytes through a rate limit of 1024 bytes per 100 ms; the \
         host compares the bytes with the file and QEMU's trace with the limit",
        &[],
    ),
];

fn cmd_demo() -> Result<bool, String> {
    println!(
        "virtio for Darwin: the project's Rust drivers running in a bare-metal guest against \
         QEMU's virtio devices (TCG)"
    );
    let mut all_passed = true;
    for (scenario, what, args) in DEMO_PARTS {
        let mut cfg = RunConfig::new(scenario);
        cfg.install_missing = true;
        for a in *args {
            cfg = cfg.guest_arg(*a);
        }
        let report = run(&cfg)?;
        println!();
        println!(
            "== {scenario} ({}, {:.1} s) ==",
            cfg.config_name(),
            report.duration.as_secs_f64()
        );
        println!("   {what}");
        if report.exit == qemu::GuestExit::Usage && report.checks.is_empty() {
            println!("   (this guest has no `{scenario}` scenario yet)");
            continue;
        }
        for c in &report.checks {
            println!(
                "  {} {:28} {}",
                if c.passed { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        if let Some(out) = report.console_output.as_ref().filter(|o| !o.is_empty()) {
            println!(
                "  the host read from the virtio console: {:?}",
                String::from_utf8_lossy(out)
            );
        }
        if let Some(t) = &report.trace {
            let guest_kicks: u64 = report
                .stats
                .iter()
                .filter(|(k, _)| k.matches('.').count() == 1 && k.ends_with(".kicks"))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum();
            println!(
                "  kicks: guest counted {guest_kicks}, QEMU traced {}; interrupts QEMU sent: {}",
                t.kicks(),
                t.interrupts()
            );
        }
        if !report.passed() {
            all_passed = false;
            print!("{}", report.summary());
        }
    }
    println!();
    println!(
        "{}",
        if all_passed {
            "All checks passed."
        } else {
            "Some checks FAILED; see above."
        }
    );
    Ok(all_passed)
}

struct Step {
    name: String,
    ok: bool,
    secs: f64,
}

fn step(steps: &mut Vec<Step>, name: &str, mut cmd: Command) {
    println!("\n=== xtask test: {name} ===");
    let start = Instant::now();
    let ok = cmd.status().is_ok_and(|s| s.success());
    steps.push(Step {
        name: name.to_string(),
        ok,
        secs: start.elapsed().as_secs_f64(),
    });
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn cmd_test() -> Result<bool, String> {
    let workspace = qemu::guest_dir()
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.to_path_buf())
        .ok_or("no workspace root")?;
    let guest = qemu::guest_dir();
    let guest_clippy_dir = qemu::target_dir().join("guest-clippy");
    let toolchain = qemu::ensure_toolchain(true)?;
    let mut steps = Vec::new();

    let mut c = cargo();
    c.current_dir(&workspace).args(["fmt", "--all", "--check"]);
    step(&mut steps, "cargo fmt --all --check", c);

    // The guest is its own workspace; rustfmt needs no target, so the host toolchain works.
    let mut c = cargo();
    c.current_dir(&guest).args(["fmt", "--check"]);
    step(&mut steps, "cargo fmt --check (tests/guest)", c);

    let mut c = cargo();
    c.current_dir(&workspace).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    step(
        &mut steps,
        "cargo clippy --workspace --all-targets -D warnings",
        c,
    );

    // Clippy for the guest: the Debian toolchain has no clippy, and rustup's has no
    // rust-src for x86_64-unknown-none; linting (not linting + linking) the same code for
    // the host target with rustup's prebuilt `core`/`alloc` covers all of it.
    let mut c = cargo();
    c.current_dir(&guest)
        .args([
            "clippy",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&guest_clippy_dir)
        .args(["--", "-D", "warnings"]);
    step(
        &mut steps,
        "cargo clippy (tests/guest, host target) -D warnings",
        c,
    );

    println!(
        "\n=== xtask test: guest build ({}) ===",
        toolchain.describe()
    );
    let start = Instant::now();
    let built = qemu::build_guest(&toolchain);
    if let Err(e) = &built {
        eprintln!("{e}");
    }
    steps.push(Step {
        name: "guest build".into(),
        ok: built.is_ok(),
        secs: start.elapsed().as_secs_f64(),
    });

    // The kexts: plists parsed, headers fresh, each Rust half cross-built, linked by kextld
    // into an MH_KEXT_BUNDLE and checked against the kernel linker's rules (the C++ shims
    // need a Kernel SDK, which CI does not have).
    let mut c = cargo();
    c.current_dir(&workspace)
        .args(["run", "-q", "-p", "xtask", "--", "kexts", "--check"]);
    step(&mut steps, "cargo xtask kexts --check", c);

    // The loaded-bundle tests must find the bundles just linked, not skip.
    let mut c = cargo();
    c.current_dir(&workspace)
        .env("VIRTIO_REQUIRE_KEXT_BUNDLES", "1")
        .args(["test", "--workspace"]);
    step(&mut steps, "cargo test --workspace", c);

    println!("\n=== xtask test: summary ===");
    for s in &steps {
        println!(
            "  {} {:55} {:6.1} s",
            if s.ok { "ok  " } else { "FAIL" },
            s.name,
            s.secs
        );
    }
    let ok = steps.iter().all(|s| s.ok);
    println!("{}", if ok { "all steps passed" } else { "FAILED" });
    Ok(ok)
}
