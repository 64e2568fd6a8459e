//! `cargo xtask bench kext [--rounds N]`: what the installed kexts' I/O path costs. 4 KiB
//! reads at depth 1 and 32 through VirtioBlock.kext's C ABI (`vblk_submit_rw` per read,
//! then the family's interrupt entry `vfam_deliver_interrupt`), against the same driver
//! crate called directly (`BlkDriver` on an in-process `VirtioDevice`), over the same
//! simulated device, in-process on the host, counted by callgrind.
//!
//! The program is the `bench_read_4k` test of `tests/tests/kext_block.rs` (release
//! build): each path's submission of one read and its completion of one interrupt run
//! inside never-inlined functions, `kext_bench_{kext,direct}_{submit,complete}`, and
//! callgrind collects only there (`--toggle-collect`), so the device model serving the
//! queue in between is not counted. Both paths' submissions include the simulation of the
//! notify register write where the device asks for one (the same code for both). The kext
//! path is measured twice: the bundles `cargo xtask kexts` links (the kernel code that
//! ships, loaded the way the kernel loads it) and the same crates linked into the test.
//! Each figure is (instructions over 2N rounds − over N rounds) / (N × depth): per read,
//! with setup cancelled.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ring::{callgrind_summary, difference_per, ensure_valgrind};

const TEST_BINARY: &str = "kext_block";
const TEST: &str = "bench_read_4k";
/// Reads in flight per round: one at a time, and a full batch (one interrupt for 32).
const DEPTHS: [u64; 2] = [1, 32];

/// One measured path: its `KEXT_BENCH_PATH` value and the prefix of its functions.
struct Measured {
    name: &'static str,
    env: &'static str,
    functions: &'static str,
}

const PATHS: [Measured; 3] = [
    Measured {
        name: "kexts, linked bundles (as shipped)",
        env: "loaded",
        functions: "kext_bench_kext",
    },
    Measured {
        name: "kexts, Rust halves linked into the test",
        env: "kext",
        functions: "kext_bench_kext",
    },
    Measured {
        name: "driver crate called directly",
        env: "direct",
        functions: "kext_bench_direct",
    },
];

/// Builds the bundles (`cargo xtask kexts`) and the test binary; returns the binary.
fn build() -> Result<PathBuf, String> {
    let xtask = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
    let status = Command::new(xtask)
        .arg("kexts")
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo xtask kexts: {e}"))?;
    if !status.success() {
        return Err("`cargo xtask kexts` failed: the bundles are needed".into());
    }
    let out = crate::cargo()
        .current_dir(crate::workspace_root())
        .args([
            "test",
            "--release",
            "-p",
            "virtio-tests",
            "--test",
            TEST_BINARY,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the {TEST_BINARY} test failed"));
    }
    // The artifact line of the test target: `"executable":"<path>"`.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("\"name\":\"{TEST_BINARY}\"")))
        .find_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + 14..];
            Some(PathBuf::from(&rest[..rest.find('"')?]))
        })
        .ok_or_else(|| format!("cargo named no executable for the {TEST_BINARY} test"))
}

/// Instructions per read inside `function` on `path` at `depth`: the difference between 2N
/// and N rounds, over N × depth reads.
fn per_read(
    binary: &Path,
    out_dir: &Path,
    path: &Measured,
    depth: u64,
    function: &str,
    rounds: u64,
) -> Result<f64, String> {
    let run = |n: u64| {
        let mut c = Command::new(binary);
        c.args(["--ignored", "--exact", TEST, "--test-threads=1"])
            .env("KEXT_BENCH_PATH", path.env)
            .env("KEXT_BENCH_DEPTH", depth.to_string())
            .env("KEXT_BENCH_ROUNDS", n.to_string());
        let out = out_dir.join(format!("callgrind-kext-{}-{depth}-{n}.out", path.env));
        callgrind_summary(c, function, &out)
            .map_err(|e| format!("{} at depth {depth} ({function}): {e}", path.name))
    };
    difference_per(rounds, rounds * depth, run)
}

pub fn cmd(rounds: u64) -> Result<bool, String> {
    ensure_valgrind()?;
    eprintln!("xtask: bench kext: building the kexts and the {TEST_BINARY} test (release)...");
    let binary = build()?;
    let out_dir = super::output_dir()?;
    let mut rows = Vec::new();
    for depth in DEPTHS {
        for path in &PATHS {
            eprintln!(
                "xtask: bench kext: {}, depth {depth} (callgrind, {rounds} and {} rounds)...",
                path.name,
                2 * rounds
            );
            let f = path.functions;
            let submit = per_read(
                &binary,
                &out_dir,
                path,
                depth,
                &format!("{f}_submit"),
                rounds,
            )?;
            let complete = per_read(
                &binary,
                &out_dir,
                path,
                depth,
                &format!("{f}_complete"),
                rounds,
            )?;
            rows.push((depth, path, submit, complete));
        }
    }

    println!(
        "\nvirtio-blk, 4 KiB reads (split ring, EVENT_IDX, indirect descriptors, MSI-X), \
         in-process on the host (x86_64, release build) over the simulated PCI device; \
         instructions per read counted by callgrind. Depth 32: 32 reads submitted one by one \
         (each kicks if the device asks), served together, completed from one interrupt. \
         submit: the read and its kick (both paths include the simulation of the notify \
         register write where there is one); complete: the interrupt entry through the \
         completion callback\n"
    );
    println!("| depth | path                                    | submit | complete |  total |");
    println!("|------:|-----------------------------------------|-------:|---------:|-------:|");
    for (depth, p, s, c) in &rows {
        println!(
            "| {depth:5} | {:39} | {s:6.0} | {c:8.0} | {:6.0} |",
            p.name,
            s + c
        );
    }
    let total = |depth: u64, env: &str| {
        rows.iter()
            .find(|(d, p, _, _)| *d == depth && p.env == env)
            .map_or(f64::NAN, |(_, _, s, c)| s + c)
    };
    println!();
    for depth in DEPTHS {
        let (shipped, direct) = (total(depth, "loaded"), total(depth, "direct"));
        println!(
            "  depth {depth:2}: the kexts as shipped execute {:.0} more instructions per read \
             than the driver crate called directly ({}× its total)",
            shipped - direct,
            super::ratio(shipped, direct)
        );
    }
    let ok = rows.iter().all(|(_, _, s, c)| *s > 0.0 && *c > 0.0);
    println!(
        "bench kext: {} (each path ran {rounds} and {} rounds at each depth under callgrind; \
         every read completed OK with its own token)",
        if ok { "PASS" } else { "FAIL" },
        2 * rounds
    );
    Ok(ok)
}
