//! `cargo xtask bench ring [--rounds N]`: instructions per add + pop of a 1-descriptor
//! chain on our split ring (`virtio_core::SplitQueue`), on our packed ring
//! (`virtio_core::PackedQueue`) and on the `virtio-drivers` crate's `VirtQueue`,
//! in-process, release build, counted by valgrind's callgrind. The targets compare our
//! split ring with virtio-drivers; packed against split is printed for information.
//!
//! The program is `tests/ring-bench` (one ring, one configuration per process). Callgrind
//! collects only inside its `ring_bench_<ring>_add` or `_pop` wrapper (`--toggle-collect`),
//! so the minimal device side in between is not counted. Each figure is a difference:
//! (instructions over 2N rounds − over N rounds) / N, which cancels anything paid once.
//! Callgrind counts instructions exactly (it executes the program on a synthetic CPU), so
//! the figures do not depend on host load or on the CPU's counters being available.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PACKAGE: &str = "virtio-ring-bench";
const BINARY: &str = "ring-bench";

/// One ring under test: its `ring-bench` argument and the prefix of its measured functions.
struct Ring {
    name: &'static str,
    arg: &'static str,
    symbol_prefix: &'static str,
}

const RINGS: [Ring; 3] = [
    Ring {
        name: "ours (virtio-core SplitQueue)",
        arg: "ours",
        symbol_prefix: "ring_bench_ours",
    },
    Ring {
        name: "ours (virtio-core packed)",
        arg: "packed",
        symbol_prefix: "ring_bench_packed",
    },
    Ring {
        name: "virtio-drivers 0.13 VirtQueue",
        arg: "virtio-drivers",
        symbol_prefix: "ring_bench_vd",
    },
];

/// Makes sure valgrind is there: installs it as root on Debian, else says how.
pub(super) fn ensure_valgrind() -> Result<(), String> {
    let have = || {
        Command::new("valgrind")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have() {
        return Ok(());
    }
    let install = "apt-get install -y --no-install-recommends valgrind";
    let root_on_debian = Path::new("/etc/debian_version").exists()
        && Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root_on_debian {
        eprintln!("+ {install}");
        let ok = Command::new("sh")
            .args(["-c", install])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if ok && have() {
            return Ok(());
        }
    }
    Err(format!(
        "this bench counts instructions with valgrind's callgrind, which is not installed; \
         install it with:\n  {install}"
    ))
}

fn build() -> Result<PathBuf, String> {
    let status = crate::cargo()
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--quiet", "-p", PACKAGE])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release -p {PACKAGE} failed"));
    }
    Ok(virtio_tests::qemu::target_dir()
        .join("release")
        .join(BINARY))
}

/// Instructions callgrind collected inside functions matching `pattern` over `rounds`.
fn collected(
    binary: &Path,
    out_dir: &Path,
    ring: &Ring,
    event_idx: bool,
    pattern: &str,
    rounds: u64,
) -> Result<u64, String> {
    let events = if event_idx {
        "event-idx"
    } else {
        "no-event-idx"
    };
    let mut run = Command::new(binary);
    run.args([ring.arg, events, &rounds.to_string()]);
    let what = format!("{} {events}", ring.arg);
    callgrind_summary(
        run,
        pattern,
        &out_dir.join(format!("callgrind-{what}-{rounds}.out")),
    )
    .map_err(|e| format!("{what}: {e}"))
}

/// Runs `program` under callgrind collecting only inside functions matching `pattern`
/// (`--toggle-collect`), and returns the instructions collected (its summary line).
pub(super) fn callgrind_summary(
    program: Command,
    pattern: &str,
    out: &Path,
) -> Result<u64, String> {
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--toggle-collect={pattern}"))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(program.get_program())
        .args(program.get_args())
        .envs(program.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    if !run.status.success() {
        return Err(format!(
            "the program failed under callgrind:\n{}",
            String::from_utf8_lossy(&run.stderr)
        ));
    }
    let text = std::fs::read_to_string(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let _ = std::fs::remove_file(out);
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no summary line in callgrind's output {}", out.display()))
}

/// Instructions per round inside `pattern`: the difference between 2N and N rounds.
fn per_round(
    binary: &Path,
    out_dir: &Path,
    ring: &Ring,
    event_idx: bool,
    pattern: &str,
    rounds: u64,
) -> Result<f64, String> {
    difference_per(rounds, rounds, |n| {
        collected(binary, out_dir, ring, event_idx, pattern, n)
    })
}

/// (`count(2N)` − `count(N)`) / `units`: what `units` more of the measured work cost, with
/// everything paid once (setup, the first call's warm-up) cancelled out.
pub(super) fn difference_per(
    rounds: u64,
    units: u64,
    count: impl Fn(u64) -> Result<u64, String>,
) -> Result<f64, String> {
    let once = count(rounds)?;
    let twice = count(2 * rounds)?;
    Ok(twice.saturating_sub(once) as f64 / units as f64)
}

/// Add, pop and their sum for one ring and configuration.
struct Cost {
    add: f64,
    pop: f64,
}

impl Cost {
    fn both(&self) -> f64 {
        self.add + self.pop
    }
}

/// Add + pop of the ring whose `ring-bench` argument is `arg`, EVENT_IDX as given, if it
/// was measured.
fn add_and_pop(costs: &[(&Ring, bool, Cost)], arg: &str, event_idx: bool) -> Option<f64> {
    costs
        .iter()
        .find(|(r, e, _)| r.arg == arg && *e == event_idx)
        .map(|(_, _, c)| c.both())
}

pub fn cmd(rounds: u64) -> Result<bool, String> {
    ensure_valgrind()?;
    eprintln!("xtask: bench ring: building {PACKAGE} (release)...");
    let binary = build()?;
    let out_dir = super::output_dir()?;
    let mut costs = Vec::new();
    for event_idx in [true, false] {
        for ring in &RINGS {
            eprintln!(
                "xtask: bench ring: {}, EVENT_IDX {} (callgrind, {rounds} and {} rounds)...",
                ring.name,
                if event_idx { "on" } else { "off" },
                2 * rounds
            );
            let p = ring.symbol_prefix;
            let add = per_round(
                &binary,
                &out_dir,
                ring,
                event_idx,
                &format!("{p}_add"),
                rounds,
            )?;
            let pop = per_round(
                &binary,
                &out_dir,
                ring,
                event_idx,
                &format!("{p}_pop"),
                rounds,
            )?;
            costs.push((ring, event_idx, Cost { add, pop }));
        }
    }

    println!(
        "\nsplit ring, driver side: one add + pop of a 1-descriptor chain (one 4 KiB \
         device-writable buffer), queue size 256, release build, in-process on the host \
         (x86_64); instructions counted by callgrind inside add and pop only, per round \
         (our packed ring, the same chain on a packed ring of 256 entries, in its own row)\n"
    );
    println!("| ring                          | EVENT_IDX |   add |   pop | add + pop |");
    println!("|-------------------------------|-----------|------:|------:|----------:|");
    for (ring, event_idx, c) in &costs {
        println!(
            "| {:29} | {:9} | {:5.0} | {:5.0} | {:9.0} |",
            ring.name,
            if *event_idx { "on" } else { "off" },
            c.add,
            c.pop,
            c.both()
        );
    }
    println!("\nvirtio-drivers / ours, add + pop (above 1: ours executes fewer instructions)\n");
    let mut ok = true;
    let mut targets = Vec::new();
    for event_idx in [true, false] {
        let find = |arg: &str| add_and_pop(&costs, arg, event_idx);
        let (Some(ours), Some(theirs)) = (find("ours"), find("virtio-drivers")) else {
            ok = false;
            continue;
        };
        ok &= ours > 0.0 && theirs > 0.0;
        println!(
            "  {:15} {} ({theirs:.0} / {ours:.0})",
            format!("EVENT_IDX {}:", if event_idx { "on" } else { "off" }),
            super::ratio(theirs, ours)
        );
        targets.push(super::targets::Target {
            what: if event_idx {
                "add + pop instructions, EVENT_IDX on, theirs / ours"
            } else {
                "add + pop instructions, EVENT_IDX off, theirs / ours"
            },
            ratio: if ours > 0.0 { theirs / ours } else { f64::NAN },
            bound: 1.5,
            at_most: false,
        });
    }
    println!(
        "\nours, packed / split, add + pop (information, not a target; above 1: the packed \
         ring executes more instructions)\n"
    );
    for event_idx in [true, false] {
        let find = |arg: &str| add_and_pop(&costs, arg, event_idx);
        let (Some(split), Some(packed)) = (find("ours"), find("packed")) else {
            ok = false;
            continue;
        };
        ok &= packed > 0.0;
        println!(
            "  {:15} {} ({packed:.0} / {split:.0})",
            format!("EVENT_IDX {}:", if event_idx { "on" } else { "off" }),
            super::ratio(packed, split)
        );
    }
    let targets = super::targets::report("ratios of callgrind's counts", &targets);
    println!(
        "bench ring: {} (each ring ran {rounds} and {} rounds per configuration under \
         callgrind and got every chain back with the expected token and length); {targets}",
        if ok { "PASS" } else { "FAIL" },
        2 * rounds
    );
    Ok(ok)
}
