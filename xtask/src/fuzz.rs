//! `cargo xtask fuzz`: coverage-guided fuzzing of the `fuzz/` workspace with cargo-fuzz
//! (nightly, libFuzzer, AddressSanitizer, optimised with debug assertions and overflow
//! checks; the simulated device built without coverage instrumentation), the replay of the committed inputs through plain `cargo test`, and the short
//! run of every target that `cargo xtask test` does when cargo-fuzz is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Args;

/// The binaries of fuzz/Cargo.toml, read at build time: the targets.
const FUZZ_MANIFEST: &str = include_str!("../../fuzz/Cargo.toml");

/// Seconds `cargo xtask test` fuzzes each target (a smoke run from the committed corpus:
/// it catches a target that no longer builds, or an easy new crash; campaigns are longer).
pub const SMOKE_SECONDS: u64 = 10;

/// The `RUSTC_WRAPPER` (in fuzz/) that builds the device side without SanitizerCoverage.
const UNINSTRUMENTED_WRAPPER: &str = "rustc-device-uninstrumented.sh";

/// libFuzzer's per-input time limit in our runs: an input that takes longer is a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 20;

#[derive(Args)]
pub struct FuzzArgs {
    /// The fuzz target (a binary in fuzz/Cargo.toml)
    #[arg(required_unless_present_any = ["replay", "all"], conflicts_with_all = ["replay", "all"])]
    target: Option<String>,
    /// Every target in turn, each for --seconds
    #[arg(long, conflicts_with = "replay")]
    all: bool,
    /// Seconds to fuzz (each target, with --all)
    #[arg(long, value_name = "N", default_value_t = 60)]
    seconds: u64,
    /// Replay the committed corpus and reproducers instead (no nightly needed)
    #[arg(long)]
    replay: bool,
}

/// `cargo xtask fuzz ...`.
pub fn cmd_fuzz(args: FuzzArgs) -> Result<bool, String> {
    if args.replay {
        return cmd_fuzz_replay();
    }
    if let Err(why) = cargo_fuzz_available() {
        eprintln!(
            "xtask fuzz: {why}. cargo-fuzz with a nightly toolchain is needed. Install them \
             with:\n  rustup toolchain install nightly\n  cargo install cargo-fuzz --locked\n\
             (`cargo xtask fuzz --replay` replays the corpus without either)"
        );
        return Ok(false);
    }
    let targets: Vec<String> = match args.target {
        Some(t) => vec![t],
        None => targets().into_iter().map(String::from).collect(),
    };
    let mut ok = true;
    for t in &targets {
        // A campaign grows the committed corpus (minimise it before committing).
        let corpus = fuzz_dir().join("corpus").join(t);
        ok &= run_target(t, args.seconds, &[corpus])?;
    }
    Ok(ok)
}

/// The targets, in fuzz/Cargo.toml's order.
pub fn targets() -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in FUZZ_MANIFEST.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin
            && let Some(name) = line.strip_prefix("name = \"")
            && let Some(name) = name.strip_suffix('"')
        {
            out.push(name);
        }
    }
    out
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .join("fuzz")
}

/// `cargo +nightly fuzz --version` works: rustup's `cargo` proxy (the `+toolchain`
/// syntax), not `$CARGO`, which names the stable toolchain's cargo binary.
fn cargo_fuzz_available() -> Result<(), String> {
    match Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`cargo +nightly fuzz --version` failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("no output")
        )),
        Err(e) => Err(format!("cannot run `cargo +nightly fuzz --version`: {e}")),
    }
}

/// `cargo +nightly fuzz run --sanitizer=address <target> <corpora...>` for `seconds`.
/// libFuzzer writes new inputs into the first corpus directory and only reads the others;
/// crashes land in fuzz/artifacts/<target>/.
fn run_target(target: &str, seconds: u64, corpora: &[PathBuf]) -> Result<bool, String> {
    println!("xtask fuzz: {target}, {seconds} s");
    let status = Command::new("cargo")
        .current_dir(fuzz_dir())
        // The simulated device and the rust-vmm crates without coverage instrumentation
        // (see the script): about a third less time per input on the driver targets.
        .env("RUSTC_WRAPPER", fuzz_dir().join(UNINSTRUMENTED_WRAPPER))
        .args(["+nightly", "fuzz", "run", "--sanitizer=address", target])
        .args(corpora)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .status()
        .map_err(|e| format!("running cargo fuzz: {e}"))?;
    Ok(status.success())
}

/// `cargo xtask fuzz --replay`: every committed input through the oracles, plain `cargo test`.
pub fn cmd_fuzz_replay() -> Result<bool, String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(fuzz_dir().parent().expect("workspace root"))
        .args(["test", "-p", "virtio-tests", "--test", "fuzz_replay"])
        .status()
        .map_err(|e| format!("running cargo test: {e}"))?;
    Ok(status.success())
}

/// The `cargo xtask test` step: every target for [`SMOKE_SECONDS`] from the committed
/// corpus and reproducers (new inputs go to a scratch directory, so the committed corpus
/// does not change), or a skip with the reason when cargo-fuzz is not there. Returns the
/// step's name and whether it passed (a skip passes: the replay in `cargo test` still ran).
pub fn smoke() -> (String, bool) {
    println!("\n=== xtask test: cargo fuzz, each target {SMOKE_SECONDS} s ===");
    if let Err(why) = cargo_fuzz_available() {
        println!(
            "skipped: {why} (install with `rustup toolchain install nightly` and \
             `cargo install cargo-fuzz --locked`; the committed corpus was replayed by \
             `cargo test` all the same)"
        );
        return ("cargo fuzz: skipped, cargo-fuzz not available".into(), true);
    }
    let targets = targets();
    let scratch = std::env::temp_dir().join(format!("xtask-fuzz-{}", std::process::id()));
    let start = Instant::now();
    let mut failed = Vec::new();
    for t in &targets {
        let new = scratch.join(t);
        let ok = std::fs::create_dir_all(&new).is_ok()
            && run_target(t, SMOKE_SECONDS, &smoke_corpora(new, t)).unwrap_or_else(|e| {
                eprintln!("{e}");
                false
            });
        if !ok {
            failed.push(*t);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if !failed.is_empty() {
        eprintln!(
            "xtask fuzz: failed: {} (reproducers in fuzz/artifacts/<target>/)",
            failed.join(", ")
        );
    }
    println!(
        "cargo fuzz: {} targets, {:.0} s",
        targets.len(),
        start.elapsed().as_secs_f64()
    );
    (
        format!("cargo fuzz, {} targets x {SMOKE_SECONDS} s", targets.len()),
        failed.is_empty(),
    )
}

/// The scratch directory, then the committed corpus and reproducers that exist (libFuzzer
/// refuses a corpus directory that does not).
fn smoke_corpora(scratch: PathBuf, target: &str) -> Vec<PathBuf> {
    let committed = ["corpus", "regressions"]
        .into_iter()
        .map(|d| fuzz_dir().join(d).join(target))
        .filter(|d| d.is_dir());
    std::iter::once(scratch).chain(committed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_of_the_fuzz_manifest_is_known() {
        let t = targets();
        for name in [
            "ring", "packed", "pci", "blk", "net", "net_ctrl", "console", "balloon", "rng", "fs",
            "kext", "family",
        ] {
            assert!(t.contains(&name), "{name} missing from {t:?}");
        }
        assert_eq!(t.len(), 12, "{t:?}");
    }

    #[test]
    fn the_rustc_wrapper_is_there() {
        assert!(fuzz_dir().join(UNINSTRUMENTED_WRAPPER).is_file());
    }
}
