//! Developer tasks: `cargo xtask <command>`; `cargo xtask --help` and
//! `cargo xtask <command> --help` say what each command and flag does.
//!
//! - `qemu <scenario>`: build the guest, run one scenario, print the report (`--matrix`:
//!   every machine × transport × irq combination, then a table; `--list`: the scenarios);
//! - `demo`: boot the guest with each device type (net, blk, console, balloon, fs, rng) and
//!   show what each driver did;
//! - `bench blk|net|ring`: our drivers against the virtio-drivers crate (`bench.rs`,
//!   `bench_net.rs`, `bench/ring.rs`); `bench fs`: virtio-fs beside virtio-blk
//!   (`bench_fs.rs`);
//! - `kexts`: build the kext bundles (`kexts.rs`); `install`: copy them to
//!   /Library/Extensions and load them on macOS (`install.rs`);
//! - `test`: fmt, clippy (workspace and guest), guest build, `cargo test --workspace`, a
//!   short run of each fuzz target (`fuzz.rs`).
//! - `fuzz <target>` / `fuzz --all` / `fuzz --replay`: coverage-guided fuzzing of fuzz/ with
//!   cargo-fuzz, or the committed corpus through plain `cargo test` (`fuzz.rs`).
//! - `miri`: the ring and logger tests under Miri, Stacked and Tree Borrows (`miri.rs`; also
//!   steps of `test` when the nightly toolchain has Miri).

mod bench;
mod bench_fs;
mod bench_net;
mod console_log;
mod fuzz;
mod install;
mod kexts;
mod miri;

use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use virtio_tests::qemu::{self, IrqMode, Machine, RunConfig, RunReport, Transport};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for virtio for Darwin: run the drivers under QEMU, test, \
             benchmark, build and install the kexts",
    after_help = "Start with `cargo xtask demo`, then `cargo xtask qemu --list`."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one QEMU scenario (or its whole matrix) and report; --list shows them
    ///
    /// Builds the test guest if needed, boots it under QEMU (TCG) with the scenario's
    /// devices, prints each check and QEMU's trace counts, and the verdict last.
    Qemu(QemuArgs),
    /// Show each driver at work under QEMU, one scenario per device type
    ///
    /// Boots the test guest once per device type (smoke, net, blk, console, balloon, fs, rng)
    /// and shows what each driver did, then a summary; a few minutes under QEMU TCG.
    Demo,
    /// Benchmark our drivers against the virtio-drivers crate under QEMU
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Build and check the kext bundles (target/kexts/<Name>.kext)
    ///
    /// For every kext: Info.plist, the Rust half linked by kextld and checked against the
    /// kernel linker's rules; with a Kernel SDK the C++ shim and the installable executable.
    /// Environment: KERNEL_SDK (SDK root or Headers), KEXT_LD (Apple's ld64 instead of
    /// kextld), CLANG / CLANGXX.
    Kexts {
        /// Fail when a checked-in generated file (header, plist) is stale
        #[arg(long)]
        check: bool,
        /// Clone the public Kernel SDK into target/ first
        #[arg(long)]
        fetch_sdk: bool,
    },
    /// Install and load the built kexts (macOS or PureDarwin test VM, as root)
    ///
    /// Copies the bundles built by `cargo xtask kexts` to /Library/Extensions, owned by
    /// root:wheel and not writable by others (an identical installed bundle is kept), and
    /// rebuilds the kext caches: kextcache -i / on macOS 10.13-10.15 and PureDarwin (Darwin
    /// 17-19), the auxiliary kext collection on 11 and later (Darwin 20+, by `uname -r`).
    /// Loads them (kextutil, family first; one kmutil load) only when none of them is
    /// loaded; never unloads (that would terminate a running disk or NIC driver): a loaded
    /// older build, told by its UUID, is replaced at the next reboot.
    /// KEXT_INSTALL_DIR=<volume>/Library/Extensions installs onto another system's volume:
    /// files only, and that volume's prelinked kernel (kextcache -i <volume>) when the system
    /// on it is 10.13-10.15 or PureDarwin and this host is too; the kext tools are those of
    /// the system on the volume, told by its files (or --target-macos). Running it as root,
    /// signing, approval and security settings: docs/install.md.
    #[command(after_help = "Examples (docs/install.md: running cargo as root):
  sudo -E env \"PATH=$PATH\" cargo xtask install
  sudo -E env \"PATH=$PATH\" cargo xtask install --console-log --getty org.virtiodarwin.login
  cargo build -p xtask && sudo ./target/debug/xtask install --uninstall
  sudo ./target/debug/xtask install --remove-console-log
  sudo KEXT_INSTALL_DIR=/Volumes/Guest/Library/Extensions ./target/debug/xtask install
  sudo KEXT_INSTALL_DIR=/Volumes/PD/Library/Extensions ./target/debug/xtask install --target-macos 10.15
  cargo xtask install --dry-run --console-log
  cargo xtask install --dry-run --target-macos 10.15")]
    Install {
        /// Print the plan without touching the system (works on any host; on a host that is
        /// not Darwin, the plans for both kext tool generations unless --target-macos)
        #[arg(long)]
        dry_run: bool,
        /// The macOS version of the system installed to (10.13 to 10.15, also PureDarwin, or 11
        /// and later; 10.16 is 11): with KEXT_INSTALL_DIR, the system on that volume, instead
        /// of what its files say; otherwise only with --dry-run, for the plan of that version
        /// instead of the running system's
        #[arg(long, value_name = "VERSION")]
        target_macos: Option<String>,
        /// Also install the console log daemon: the kernel's log and the last panic report
        /// to /dev/cu.virtio from boot (docs/kernel-debugging.md)
        #[arg(long)]
        console_log: bool,
        /// With --console-log: a login prompt (getty) on the named console port
        #[arg(long, value_name = "PORT", requires = "console_log")]
        getty: Option<String>,
        /// Stop and remove the console log daemon, the login prompt, their script, state and
        /// log (the kexts stay)
        #[arg(long, conflicts_with_all = ["console_log", "getty"])]
        remove_console_log: bool,
        /// Stop the console's launchd jobs, remove them and the kexts (never unloaded),
        /// refresh the kext caches; then reboot
        #[arg(long, conflicts_with_all = ["console_log", "getty", "remove_console_log"])]
        uninstall: bool,
    },
    /// Everything CI runs, then a summary
    ///
    /// fmt, clippy -D warnings (workspace and guest), the guest build, kexts --check,
    /// cargo test --workspace (with the QEMU end-to-end matrix and the fuzz corpus replay),
    /// 10 s of each fuzz target when cargo-fuzz is installed, and the ring and logger tests under Miri
    /// (Stacked and Tree Borrows) when the nightly toolchain has Miri.
    Test,
    /// Fuzz one target coverage-guided (cargo-fuzz, nightly, ASan), or replay the corpus
    ///
    /// Targets are the binaries of fuzz/Cargo.toml (its own workspace; fuzz/README.md says
    /// what each covers). A run grows fuzz/corpus/<target>; crashes land in
    /// fuzz/artifacts/<target> (move the reproducer to fuzz/regressions/<target> once
    /// fixed). --replay runs every committed input through the same oracles with plain
    /// `cargo test`, as `cargo xtask test` does.
    #[command(after_help = "Examples:
  cargo xtask fuzz ring --seconds 600
  cargo xtask fuzz --all --seconds 60
  cargo xtask fuzz --replay")]
    Fuzz(fuzz::FuzzArgs),
    /// Run the ring and logger tests under Miri, Stacked and Tree Borrows (nightly with Miri)
    ///
    /// virtio-core's unit tests, IdentityMemory's, and the ring conformance tests (the split
    /// ring against rust-vmm's device side, the packed ring against the one written from
    /// §2.8), with strict provenance, both models side by side.
    /// docs/architecture.md ("The ring under Miri").
    Miri(miri::MiriArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Block: our virtio-blk (MSI-X and INTx) against virtio-drivers' VirtIOBlk
    ///
    /// 4 KiB random reads at depth 1 and 32, 64 KiB sequential reads, then (ours only)
    /// scatter-gather reads of 16 KiB to 1 MiB in 4 KiB segments; IOPS (median of
    /// interleaved repeats), guest instructions and halts per request (TCG plugin), kicks
    /// and interrupts per request, cross-checked with QEMU's trace. docs/benchmarks.md.
    Blk {
        /// Milliseconds each phase runs
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        ms: u64,
        /// Sessions per driver configuration, interleaved across drivers
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeats: u32,
        /// Also print, per session and phase, the guest functions that executed the most
        /// instructions per request (from the plugin's per-block counts)
        #[arg(long)]
        profile: bool,
    },
    /// Network: the same TCP transfer both ways over our virtio-net and virtio-drivers'
    ///
    /// Throughput (median of interleaved repeats), guest instructions and halts per packet
    /// (TCG plugin), kicks and interrupts per packet per queue. docs/benchmarks.md.
    Net {
        /// Bytes each way: N, NK, NM or NG (binary units)
        #[arg(long, value_name = "N", default_value = "64M", value_parser = bench_net::parse_bytes_arg)]
        bytes: u64,
        /// Sessions per driver, interleaved across drivers
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeats: u32,
        /// Also print, per session and phase, the guest functions that executed the most
        /// instructions per packet (from the plugin's per-block counts)
        #[arg(long)]
        profile: bool,
    },
    /// Ring: instructions per add + pop on our split ring and virtio-drivers' VirtQueue
    ///
    /// In-process, release build, counted by valgrind's callgrind (installed if missing,
    /// as root on Debian). docs/benchmarks.md.
    Ring {
        /// Rounds of add + pop per measurement (each is measured at N and 2N rounds)
        #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
    },
    /// Kexts: instructions per 4 KiB read through VirtioBlock.kext's C ABI and the family's,
    /// against the same driver crate called directly
    ///
    /// In-process over the simulated device, release build, counted by valgrind's
    /// callgrind; builds the kexts' bundles first (`cargo xtask kexts`). docs/benchmarks.md.
    Kext {
        /// Rounds per measurement (each is measured at N and 2N rounds, at depth 1 and 32)
        #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
    },
    /// File system: our virtio-fs against virtiofsd, beside our virtio-blk doing the same
    ///
    /// Sequential write and read of a file and of a disk image of the same size in
    /// max_write-sized requests; create, getattr and unlink of small files (a 4 KiB write +
    /// read on blk, for scale: a disk has no metadata operations); MiB/s or operations/s
    /// (median of repeats), guest instructions per operation (TCG plugin). Needs
    /// virtiofsd. docs/benchmarks.md.
    Fs {
        /// Bytes of each sequential phase (and of the disk image): N, NK, NM or NG
        #[arg(long, value_name = "N", default_value = "32M", value_parser = bench_net::parse_bytes_arg)]
        bytes: u64,
        /// Small files created, stat'ed and unlinked
        #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..100_000))]
        files: u64,
        /// Runs (each does every phase, fs and blk interleaved)
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeats: u32,
    },
}

#[derive(Args)]
#[command(after_help = "Examples:
  cargo xtask qemu --list
  cargo xtask qemu net
  cargo xtask qemu blk --transport legacy --irq intx
  cargo xtask qemu rng --matrix
  cargo xtask qemu blk -- -global virtio-blk-pci.event_idx=off")]
struct QemuArgs {
    /// The scenario to run (`--list` shows each one's purpose and devices)
    #[arg(value_name = "SCENARIO", required_unless_present = "list",
          value_parser = PossibleValuesParser::new(qemu::scenarios().map(|s| s.name)),
          hide_possible_values = true)]
    scenario: Option<String>,
    /// List the scenarios with what each does and the devices it attaches, then exit
    #[arg(long)]
    list: bool,
    /// virtio-pci interface the devices offer: 1.x only, both, or 0.9.5 only
    #[arg(long, value_name = "TRANSPORT", default_value = "modern",
          value_parser = PossibleValuesParser::new(Transport::all().iter().map(|t| t.name())))]
    transport: String,
    /// QEMU machine type
    #[arg(long, value_name = "MACHINE", default_value = "q35",
          value_parser = PossibleValuesParser::new(Machine::all().iter().map(|m| m.name())))]
    machine: String,
    /// How the guest takes device interrupts
    #[arg(long, value_name = "IRQ", default_value = "msix",
          value_parser = PossibleValuesParser::new(IrqMode::all().iter().map(|i| i.name())))]
    irq: String,
    /// Run every machine × transport × irq combination (ignores the three flags above)
    #[arg(long)]
    matrix: bool,
    /// Wall-clock limit for the QEMU run, in seconds (default: the scenario's own)
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<u64>,
    /// Keep the run directory (serial log, QEMU command, trace) even when the run passes
    #[arg(long)]
    keep: bool,
    /// Also print the QEMU command, the serial log and every STAT line
    #[arg(short, long)]
    verbose: bool,
    /// Print the report as one JSON object (checks, stats, trace counts) instead of text
    #[arg(long, conflicts_with = "matrix")]
    json: bool,
    /// Extra word for the guest's command line (repeatable), e.g. blk_test=ro
    #[arg(long = "guest-arg", value_name = "KEY=VALUE")]
    guest_args: Vec<String>,
    /// Extra QEMU arguments, after `--`
    #[arg(last = true, value_name = "QEMU ARGS")]
    qemu_args: Vec<String>,
}

/// `--timeout`'s value parser.
fn parse_seconds(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "expected a whole number of seconds, like 300".to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Qemu(args) => cmd_qemu(args),
        Cmd::Demo => cmd_demo(),
        Cmd::Bench(BenchCmd::Blk {
            ms,
            repeats,
            profile,
        }) => bench::bench_blk(ms, repeats, profile),
        Cmd::Bench(BenchCmd::Net {
            bytes,
            repeats,
            profile,
        }) => bench_net::cmd(bytes, repeats, profile),
        Cmd::Bench(BenchCmd::Ring { rounds }) => bench::ring::cmd(rounds),
        Cmd::Bench(BenchCmd::Kext { rounds }) => bench::kext::cmd(rounds),
        Cmd::Bench(BenchCmd::Fs {
            bytes,
            files,
            repeats,
        }) => bench_fs::cmd(bytes, files, repeats),
        Cmd::Kexts { check, fetch_sdk } => {
            let mut args = Vec::new();
            if check {
                args.push("--check".to_string());
            }
            if fetch_sdk {
                args.push("--fetch-sdk".to_string());
            }
            kexts::cmd_kexts(&args)
        }
        Cmd::Install {
            dry_run,
            target_macos,
            console_log,
            getty,
            remove_console_log,
            uninstall,
        } => install::cmd_install(&install::InstallOptions {
            dry_run,
            console_log,
            getty,
            remove_console_log,
            uninstall,
            target_macos,
        }),
        Cmd::Test => cmd_test(),
        Cmd::Fuzz(args) => fuzz::cmd_fuzz(args),
        Cmd::Miri(args) => miri::cmd_miri(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Each guest scenario's one-line purpose, as the guest's scenario table states it
/// (`about` in tests/guest/src/scenarios/mod.rs).
const GUEST_SCENARIO_TABLE: &str = include_str!("../../tests/guest/src/scenarios/mod.rs");

/// The `about` of guest scenario `name`, read from [`GUEST_SCENARIO_TABLE`].
fn scenario_about(name: &str) -> Option<&'static str> {
    let quoted = format!("name: \"{name}\",");
    let rest = &GUEST_SCENARIO_TABLE[GUEST_SCENARIO_TABLE.find(&quoted)? + quoted.len()..];
    let rest = rest.trim_start().strip_prefix("about: \"")?;
    rest.split_once("\",").map(|(about, _)| about)
}

fn cmd_list() -> Result<bool, String> {
    println!("Scenarios (cargo xtask qemu <scenario>):");
    for spec in qemu::scenarios() {
        let mut devices: Vec<&str> = spec.devices.iter().map(|d| d.name()).collect();
        if devices.is_empty() {
            // A device type's scenarios whose host side attaches the device itself.
            devices.extend(
                qemu::devices::DEVICES
                    .iter()
                    .filter(|d| d.scenarios.iter().any(|s| s.name == spec.name))
                    .map(|d| d.device_type.name()),
            );
        }
        let devices = if devices.is_empty() {
            "none".to_string()
        } else {
            devices.join(", ")
        };
        println!(
            "  {:13} {}",
            spec.name,
            scenario_about(spec.name).unwrap_or("")
        );
        println!(
            "  {:13} devices: {devices}; time limit {} s",
            "", spec.timeout_secs
        );
    }
    println!(
        "\nOptions for any of them: --transport, --machine, --irq, --matrix, --verbose, --json \
         (cargo xtask qemu --help)."
    );
    Ok(true)
}

/// The start line of one run, printed before it (the guest build, if needed, says so
/// itself).
fn run(cfg: &RunConfig) -> Result<RunReport, String> {
    eprintln!("xtask: running {} [{}]...", cfg.scenario, cfg.config_name());
    qemu::run_scenario(cfg).map_err(|e| e.to_string())
}

fn cmd_qemu(args: QemuArgs) -> Result<bool, String> {
    if args.list {
        return cmd_list();
    }
    let scenario = args.scenario.as_deref().ok_or("no scenario given")?;
    // The value parsers only let through names these parse.
    let mut cfg = RunConfig::new(scenario);
    cfg.transport = args.transport.parse()?;
    cfg.machine = args.machine.parse()?;
    cfg.irq = args.irq.parse()?;
    cfg.timeout = args.timeout.map(Duration::from_secs);
    cfg.keep_run_dir = args.keep;
    cfg.extra_guest_args = args.guest_args;
    cfg.extra_qemu_args = args.qemu_args;
    cfg.install_missing = true;
    if args.matrix {
        return cmd_matrix(&cfg);
    }
    let report = run(&cfg)?;
    if args.json {
        println!("{:#}", report.to_json());
        return Ok(report.passed());
    }
    if args.verbose {
        println!("$ {}", report.qemu_command.join(" "));
        println!("--- serial ---\n{}--- end serial ---", report.serial_log);
        if !report.stats.is_empty() {
            println!("stats:");
            for (k, v) in &report.stats {
                println!("    {k} = {v}");
            }
        }
    }
    print!("{}", console_text(&report, args.verbose));
    print!("{}", report.summary());
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
            "  {} {name:26} {checks:3} checks, {failed} failed (guest exit: {exit})",
            if *passed { "PASS" } else { "FAIL" }
        );
    }
    let passed = rows.iter().filter(|r| r.1).count();
    println!(
        "{}: {}, {passed} of {} configurations passed",
        base.scenario,
        if passed == rows.len() { "PASS" } else { "FAIL" },
        rows.len()
    );
    Ok(passed == rows.len())
}

/// One part of the demo.
struct DemoPart {
    scenario: &'static str,
    /// What it shows.
    what: &'static str,
    guest_args: &'static [&'static str],
    /// How the demo's run differs from the full scenario, if it does.
    shorter: Option<&'static str>,
}

const DEMO_PARTS: &[DemoPart] = &[
    DemoPart {
        scenario: "smoke",
        what: "Every device through virtio-pci + virtio-core: reset, features, all queues, \
               DRIVER_OK, one request each completed by an interrupt",
        guest_args: &[],
        shorter: None,
    },
    DemoPart {
        scenario: "net",
        what: "virtio-net under the smoltcp TCP/IP stack: DHCP lease from QEMU's user network, \
               then a TCP transfer both ways with a server on the host's loopback",
        guest_args: &["net_bytes=8388608"],
        shorter: Some("8 MiB each way here; `cargo xtask qemu net` moves the full 64 MiB each way"),
    },
    DemoPart {
        scenario: "blk",
        what: "virtio-blk: a pattern written over the 8 MiB disk (split requests), flushed, \
               read back and verified, discard / write-zeroes, GET_ID; the host checks the \
               image file",
        guest_args: &["blk_seed=2024"],
        shorter: None,
    },
    DemoPart {
        scenario: "console",
        what: "virtio-console: emergency write before DRIVER_OK, the kernel logger on port 0, \
               two named ports with a host peer on unix sockets (lines, echo, 64 KiB each way, \
               close and reopen from the host)",
        guest_args: &[],
        shorter: None,
    },
    DemoPart {
        scenario: "balloon",
        what: "virtio-balloon: QMP targets up and down (192, 128, 224, 160, 256 MiB of a \
               256 MiB guest) reached on both sides, statistics read back with qom-get, every \
               page lent by the heap returned once",
        guest_args: &[],
        shorter: None,
    },
    DemoPart {
        scenario: "fs",
        what: "virtio-fs against the real virtiofsd (vhost-user-fs-pci) sharing a host \
               directory: FUSE_INIT, host files read (a UTF-8 name, 64 MiB by hash), 64 MiB \
               written, mkdir/rmdir, rename, unlink, link, symlink, setattr, statfs, xattrs, \
               fallocate/lseek, readdirplus of 10,000 entries; the host checks its directory",
        guest_args: &[],
        shorter: None,
    },
    DemoPart {
        scenario: "rng",
        what: "virtio-rng: 4 KiB of entropy read in order from QEMU's rng-random backend, \
               which reads a host file of known bytes through a rate limit of 1024 bytes per \
               100 ms; the host compares the bytes with the file and QEMU's trace with the limit",
        guest_args: &[],
        shorter: None,
    },
];

/// What the guest wrote to the virtio console, as the host read it: every line with
/// `verbose`, otherwise the lines the scenario wrote itself and a count of the guest's log
/// records (`[LEVEL module] ...`, the driver's own wording).
fn console_text(report: &RunReport, verbose: bool) -> String {
    use std::fmt::Write as _;
    let Some(out) = report.console_output.as_ref().filter(|o| !o.is_empty()) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(out);
    let mut s = String::from("  the host read from the virtio console:\n");
    let mut log_records = 0;
    for line in text.lines() {
        if verbose || !line.starts_with('[') {
            let _ = writeln!(s, "    | {line}");
        } else {
            log_records += 1;
        }
    }
    if log_records > 0 {
        let _ = writeln!(
            s,
            "    | (and {log_records} log records of the guest; --verbose shows them)"
        );
    }
    s
}

/// The demo's text for one part: what it shows, each check, the cross-check with QEMU's
/// trace, and a one-line result.
fn demo_part_report(part: &DemoPart, report: &RunReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n== {} ({}, {:.1} s) ==",
        part.scenario,
        report.config.config_name(),
        report.duration.as_secs_f64()
    );
    let _ = writeln!(s, "   {}", part.what);
    if let Some(shorter) = part.shorter {
        let _ = writeln!(s, "   (shorter than the full scenario: {shorter})");
    }
    for c in &report.checks {
        let _ = writeln!(
            s,
            "  {} {:28} {}",
            if c.passed { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    s.push_str(&console_text(report, false));
    for line in report.trace_cross_check() {
        let _ = writeln!(s, "  {line}");
    }
    if !report.passed() {
        s.push_str(&report.summary());
    }
    let _ = writeln!(
        s,
        "  => {}: {}, {} of {} checks",
        part.scenario,
        if report.passed() { "ok" } else { "FAILED" },
        report.checks.iter().filter(|c| c.passed).count(),
        report.checks.len()
    );
    s
}

/// Why `part` cannot run on this machine, if it cannot (a host program it needs is
/// missing and could not be installed: virtiofsd is, as root on Debian); the demo then
/// says so and goes on.
fn demo_skip(part: &DemoPart) -> Option<String> {
    if part.scenario == "fs" {
        return qemu::devices::fs::ensure_virtiofsd(true).err();
    }
    None
}

fn cmd_demo() -> Result<bool, String> {
    let names: Vec<&str> = DEMO_PARTS.iter().map(|p| p.scenario).collect();
    println!(
        "virtio for Darwin: the project's Rust drivers in a bare-metal guest against QEMU's \
         virtio devices (TCG, no KVM needed).\n\
         {} QEMU runs ({}), seconds each (up to a minute on a slow host); the first also \
         builds the guest (minutes on a cold checkout).",
        DEMO_PARTS.len(),
        names.join(", ")
    );
    let start = Instant::now();
    let mut results = Vec::new();
    for part in DEMO_PARTS {
        if let Some(why) = demo_skip(part) {
            println!(
                "\n== {} (skipped) ==\n   {}\n  => {}: skipped: {why}",
                part.scenario, part.what, part.scenario
            );
            results.push((part.scenario, None, 0, 0));
            continue;
        }
        let mut cfg = RunConfig::new(part.scenario);
        cfg.install_missing = true;
        for a in part.guest_args {
            cfg = cfg.guest_arg(*a);
        }
        let report = run(&cfg)?;
        if report.exit == qemu::GuestExit::Usage && report.checks.is_empty() {
            println!(
                "\n== {} ==\n   (this guest has no such scenario yet)",
                part.scenario
            );
            results.push((part.scenario, Some(false), 0, 0));
            continue;
        }
        print!("{}", demo_part_report(part, &report));
        let passed_checks = report.checks.iter().filter(|c| c.passed).count();
        results.push((
            part.scenario,
            Some(report.passed()),
            passed_checks,
            report.checks.len() - passed_checks,
        ));
    }
    // A skipped part (`None`) fails nothing.
    let all_passed = results.iter().all(|r| r.1 != Some(false));
    let skipped = results.iter().filter(|r| r.1.is_none()).count();
    let passed: usize = results.iter().map(|r| r.2).sum();
    let failed: usize = results.iter().map(|r| r.3).sum();
    println!("\nSummary:");
    for (scenario, ok, passed, failed) in &results {
        match ok {
            None => println!("  skip {scenario:8} not run (see above)"),
            Some(ok) => println!(
                "  {} {scenario:8} {passed} checks passed, {failed} failed",
                if *ok { "ok  " } else { "FAIL" }
            ),
        }
    }
    println!(
        "\nNext: `cargo xtask test` (everything CI runs), `cargo xtask qemu --list` and \
         `cargo xtask qemu <scenario> --matrix` (one scenario on all 18 machine × transport \
         × irq configurations), `cargo xtask kexts` (the kext bundles); docs/ for the design."
    );
    println!(
        "demo: {}: {passed} checks passed, {failed} failed in {} scenarios{}, {:.0} s",
        if all_passed { "PASS" } else { "FAIL" },
        results.len() - skipped,
        if skipped > 0 {
            format!(" ({skipped} skipped)")
        } else {
            String::new()
        },
        start.elapsed().as_secs_f64()
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

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
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

    // Each fuzz target for a short fixed time (skipped, with the reason, without cargo-fuzz).
    let start = Instant::now();
    let (name, ok) = fuzz::smoke();
    steps.push(Step {
        name,
        ok,
        secs: start.elapsed().as_secs_f64(),
    });

    miri::test_steps(&mut steps);

    println!("\n=== xtask test: summary ===");
    for s in &steps {
        println!(
            "  {} {:55} {:6.1} s",
            if s.ok { "ok  " } else { "FAIL" },
            s.name,
            s.secs
        );
    }
    let passed = steps.iter().filter(|s| s.ok).count();
    let ok = passed == steps.len();
    println!(
        "test: {}, {passed} of {} steps passed, {:.0} s",
        if ok { "PASS" } else { "FAIL" },
        steps.len(),
        steps.iter().map(|s| s.secs).sum::<f64>()
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Rust `Debug` output a person should never read in a report.
    fn assert_readable(what: &str, text: &str) {
        for dump in ["Some(", "None", "Ok(", "Err(", " { "] {
            assert!(
                !text.contains(dump),
                "{what}: `{dump}` (a Debug dump) in\n{text}"
            );
        }
    }

    #[test]
    fn fuzz_takes_a_target_or_replay() {
        assert!(Cli::try_parse_from(["xtask", "fuzz", "ring", "--seconds", "5"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--replay"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "fuzz"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "fuzz", "ring", "--replay"]).is_err());
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_and_bad_values_name_the_flag() {
        let help = Cli::try_parse_from(["xtask", "qemu", "--help"])
            .err()
            .unwrap();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        let err = Cli::try_parse_from(["xtask", "qemu", "net", "--transport", "modrn"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--transport") && err.contains("'modrn'"),
            "{err}"
        );
        assert!(
            err.contains("'modern'"),
            "a close match is suggested: {err}"
        );
        let err = Cli::try_parse_from(["xtask", "qemu", "net", "--timeout", "1x"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--timeout") && err.contains("'1x'"), "{err}");
        let err = Cli::try_parse_from(["xtask", "qemu", "nett"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("'nett'") && err.contains("'net'"), "{err}");
        let err = Cli::try_parse_from(["xtask", "demoo"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("'demoo'") && err.contains("'demo'"), "{err}");
    }

    #[test]
    fn every_scenario_has_a_purpose() {
        for spec in qemu::scenarios() {
            let about = scenario_about(spec.name);
            assert!(
                about.is_some_and(|a| !a.is_empty()),
                "{}: no `about` in the guest's scenario table",
                spec.name
            );
        }
    }

    /// Every demo part run under QEMU, and its report as the demo and `cargo xtask qemu`
    /// print it checked for Debug dumps.
    #[test]
    fn demo_reports_are_readable() {
        for part in DEMO_PARTS {
            if let Some(why) = demo_skip(part) {
                eprintln!("SKIPPED demo part {}: {why}", part.scenario);
                continue;
            }
            let mut cfg = RunConfig::new(part.scenario);
            cfg.label = Some("readable".into());
            for a in part.guest_args {
                cfg = cfg.guest_arg(*a);
            }
            let report = qemu::run_scenario(&cfg).expect("the scenario runs");
            let demo = demo_part_report(part, &report);
            assert!(report.passed(), "{demo}");
            assert_readable(part.scenario, &demo);
            assert_readable(part.scenario, &report.summary());
            assert!(
                report.summary().trim_end().ends_with(&report.verdict()),
                "the verdict comes last"
            );
        }
    }
}
