//! `cargo xtask bench kext [--rounds N]`: what the installed kexts' I/O path costs. One
//! 4 KiB read at depth 1 per round through VirtioBlock.kext's C ABI (`vblk_submit_rw`, then
//! the family's interrupt entry `vfam_deliver_interrupt`), against the same driver crate
//! called directly (`BlkDriver` on an in-process `VirtioDevice`), over the same simulated
//! device, in-process on the host, counted by callgrind.
//!
//! The program is the `bench_read_4k_depth1` test of `tests/tests/kext_block.rs` (release
//! build): each path's submission and completion run inside one never-inlined function,
//! `kext_bench_{kext,direct}_{submit,complete}`, and callgrind collects only there
//! (`--toggle-collect`), so the device model serving the queue in between is not counted.
//! Both submissions include the simulation of the one notify register write (the same
//! code for both paths). The kext path is measured twice: the bundles `cargo xtask kexts`
//! links (the kernel code that ships, loaded the way the kernel loads it) and the same
//! crates linked into the test. Each figure is (instructions over 2N rounds − over N
//! rounds) / N, which cancels setup.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ring::{callgrind_summary, ensure_valgrind};

const TEST_BINARY: &str = "kext_block";
const TEST: &str = "bench_read_4k_depth1";

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

/// Instructions per round inside `function` on `path`: the difference between 2N and N.
fn per_round(
    binary: &Path,
    out_dir: &Path,
    path: &Measured,
    function: &str,
    rounds: u64,
) -> Result<f64, String> {
    let run = |n: u64| {
        let mut c = Command::new(binary);
        c.args(["--ignored", "--exact", TEST, "--test-threads=1"])
            .env("KEXT_BENCH_PATH", path.env)
            .env("KEXT_BENCH_ROUNDS", n.to_string());
        callgrind_summary(
            c,
            function,
            &out_dir.join(format!("callgrind-kext-{}-{n}.out", path.env)),
        )
        .map_err(|e| format!("{} ({function}): {e}", path.name))
    };
    let once = run(rounds)?;
    let twice = run(2 * rounds)?;
    Ok(twice.saturating_sub(once) as f64 / rounds as f64)
}

pub fn cmd(rounds: u64) -> Result<bool, String> {
    ensure_valgrind()?;
    eprintln!("xtask: bench kext: building the kexts and the {TEST_BINARY} test (release)...");
    let binary = build()?;
    let out_dir = virtio_tests::qemu::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut rows = Vec::new();
    for path in &PATHS {
        eprintln!(
            "xtask: bench kext: {} (callgrind, {rounds} and {} rounds)...",
            path.name,
            2 * rounds
        );
        let f = path.functions;
        let submit = per_round(&binary, &out_dir, path, &format!("{f}_submit"), rounds)?;
        let complete = per_round(&binary, &out_dir, path, &format!("{f}_complete"), rounds)?;
        rows.push((path, submit, complete));
    }

    println!(
        "\nvirtio-blk, one 4 KiB read at depth 1 (split ring, EVENT_IDX, indirect \
         descriptors, MSI-X), in-process on the host (x86_64, release build) over the \
         simulated PCI device; instructions per read counted by callgrind. submit: the \
         read and its kick (both paths include the simulation of the notify register \
         write); complete: the interrupt entry through the completion callback\n"
    );
    println!("| path                                    | submit | complete |  total |");
    println!("|-----------------------------------------|-------:|---------:|-------:|");
    for (p, s, c) in &rows {
        println!("| {:39} | {s:6.0} | {c:8.0} | {:6.0} |", p.name, s + c);
    }
    let total = |env: &str| {
        rows.iter()
            .find(|(p, _, _)| p.env == env)
            .map_or(f64::NAN, |(_, s, c)| s + c)
    };
    let (shipped, direct) = (total("loaded"), total("direct"));
    let ok = rows.iter().all(|(_, s, c)| *s > 0.0 && *c > 0.0);
    println!(
        "\nthe kexts as shipped execute {:.0} more instructions per read than the driver \
         crate called directly ({}× its total)",
        shipped - direct,
        super::ratio(shipped, direct)
    );
    println!(
        "bench kext: {} (each path ran {rounds} and {} reads under callgrind, every one \
         completed OK with its own token)",
        if ok { "PASS" } else { "FAIL" },
        2 * rounds
    );
    Ok(ok)
}
