//! The ring tests and the console logger's concurrency test under Miri: `cargo xtask miri`,
//! and three steps of `cargo xtask test` when the nightly toolchain has Miri (skipped, with
//! the reason, otherwise).
//!
//! What runs: `virtio-core`'s unit tests (both rings), the `IdentityMemory` unit tests, the
//! ring conformance tests (`conformance_queue`, `conformance_props`: our split ring
//! against rust-vmm's device side; `conformance_packed`: our packed ring against the
//! device side written from §2.8), and `console_logger_threads` (the logger's locks under
//! threads, for the data-race detector), once per borrow model, each with strict
//! provenance. The tests shrink their largest loops and their property-case counts under
//! `cfg(miri)`, never a code path. docs/architecture.md ("The rings and the console logger
//! under Miri") says more.

use std::process::Command;
use std::time::Instant;

use clap::{Args, ValueEnum};

use crate::{Step, workspace_root};

/// Miri's aliasing models; every run also has strict provenance: no pointer in the ring or
/// its test memory is made from an integer, and Miri holds us to that.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// Stacked Borrows, Miri's default
    Stacked,
    /// Tree Borrows
    Tree,
}

impl Model {
    const ALL: [Model; 2] = [Model::Stacked, Model::Tree];

    fn name(self) -> &'static str {
        match self {
            Model::Stacked => "Stacked Borrows",
            Model::Tree => "Tree Borrows",
        }
    }

    /// `MIRIFLAGS` of a run under this model.
    fn flags(self) -> &'static str {
        match self {
            Model::Stacked => "-Zmiri-strict-provenance",
            Model::Tree => "-Zmiri-strict-provenance -Zmiri-tree-borrows",
        }
    }
}

#[derive(Args)]
#[command(after_help = "Examples:
  cargo xtask miri
  cargo xtask miri --model tree")]
pub struct MiriArgs {
    /// Run under this borrow model only (default: both)
    #[arg(long, value_enum, value_name = "MODEL")]
    model: Option<Model>,
}

/// A test target of a package.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Target {
    /// The library's unit tests.
    Lib,
    /// An integration test (`tests/<name>.rs`).
    Test(&'static str),
}

impl Target {
    fn push_args(self, args: &mut Vec<&'static str>) {
        match self {
            Target::Lib => args.push("--lib"),
            Target::Test(name) => args.extend(["--test", name]),
        }
    }
}

/// One `cargo miri test` run: package, test targets, test-name filter.
struct Run {
    package: &'static str,
    targets: &'static [Target],
    filter: Option<&'static str>,
}

/// What runs under each model.
const RUNS: [Run; 4] = [
    Run {
        package: "virtio-core",
        targets: &[Target::Lib],
        filter: None,
    },
    // `IdentityMemory` itself (the test crate's other unit tests drive QEMU).
    Run {
        package: "virtio-tests",
        targets: &[Target::Lib],
        filter: Some("mem::"),
    },
    Run {
        package: "virtio-tests",
        targets: &[
            Target::Test("conformance_queue"),
            Target::Test("conformance_props"),
            Target::Test("conformance_packed"),
        ],
        filter: None,
    },
    // The console logger's two spin locks and its stash, under concurrent threads: the
    // data-race detector and weak-memory emulation check the accesses to its `UnsafeCell`s
    // (the console over the simulated PCI function, and the stash).
    Run {
        package: "virtio-tests",
        targets: &[Target::Test("console_logger_threads")],
        filter: None,
    },
];

/// `cargo +nightly ...` through rustup's `cargo` proxy (the `+toolchain` syntax), not
/// `$CARGO`, which names the stable toolchain's cargo binary.
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root()).arg("+nightly");
    c
}

/// Miri's version line, or why Miri cannot run here.
fn available() -> Result<String, String> {
    let out = nightly_cargo()
        .args(["miri", "--version"])
        .output()
        .map_err(|e| format!("cannot run `cargo +nightly miri --version` ({e})"))?;
    if !out.status.success() {
        return Err(
            "`cargo +nightly miri --version` failed: no nightly toolchain with Miri \
                    (rustup toolchain install nightly --component miri,rust-src)"
                .into(),
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds Miri's sysroot if needed, quietly (`cargo miri test` would otherwise ask first).
fn setup() -> Result<(), String> {
    let out = nightly_cargo()
        .args(["miri", "setup"])
        .output()
        .map_err(|e| format!("running cargo miri setup: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo +nightly miri setup` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Builds every test of [`RUNS`] for Miri, once: the models then only run them, side by
/// side, without two cargo processes building at once.
fn build() -> Result<(), String> {
    let mut packages: Vec<&str> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for run in &RUNS {
        if !packages.contains(&run.package) {
            packages.push(run.package);
        }
        for t in run.targets {
            if !targets.contains(t) {
                targets.push(*t);
            }
        }
    }
    let mut args = vec!["miri", "test", "-q", "--no-run"];
    for p in packages {
        args.extend(["-p", p]);
    }
    for t in targets {
        t.push_args(&mut args);
    }
    let status = nightly_cargo()
        .args(&args)
        .status()
        .map_err(|e| format!("running cargo miri: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo +nightly {}` failed", args.join(" ")))
    }
}

/// The command of `run` under `model`. Miri's isolation stays on (no host files, clock or
/// entropy): the tests need none.
fn command(model: Model, run: &Run) -> Command {
    let mut args = vec!["miri", "test", "-q", "-p", run.package];
    for t in run.targets {
        t.push_args(&mut args);
    }
    if let Some(filter) = run.filter {
        args.extend(["--", filter]);
    }
    let mut c = nightly_cargo();
    c.env("MIRIFLAGS", model.flags()).args(args);
    c
}

/// The command line of `c` with its `MIRIFLAGS`, for a person to rerun.
fn describe(c: &Command) -> String {
    let flags = c
        .get_envs()
        .find(|(k, _)| *k == "MIRIFLAGS")
        .and_then(|(_, v)| v)
        .map(|v| format!("MIRIFLAGS='{}' ", v.to_string_lossy()))
        .unwrap_or_default();
    let args: Vec<String> = c
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("{flags}cargo {}", args.join(" "))
}

/// What one model's runs did.
struct Outcome {
    model: Model,
    ok: bool,
    secs: f64,
    /// Everything they printed (with the command to rerun a failed one).
    log: String,
}

/// Every run of [`RUNS`] under `model`, stopping at the first failure, output captured.
fn run_model(model: Model) -> Outcome {
    let start = Instant::now();
    let mut log = String::new();
    let mut ok = true;
    for run in &RUNS {
        let mut c = command(model, run);
        match c.output() {
            Ok(out) => {
                log.push_str(&String::from_utf8_lossy(&out.stdout));
                log.push_str(&String::from_utf8_lossy(&out.stderr));
                ok = out.status.success();
            }
            Err(e) => {
                log.push_str(&format!("cannot run cargo miri: {e}\n"));
                ok = false;
            }
        }
        if !ok {
            log.push_str(&format!(
                "xtask miri: {} failed; to rerun:\n  {}\n",
                model.name(),
                describe(&c)
            ));
            break;
        }
    }
    Outcome {
        model,
        ok,
        secs: start.elapsed().as_secs_f64(),
        log,
    }
}

/// Runs `models` side by side (each Miri process is single-threaded, so two models take
/// the wall time of one on two cores), then prints each one's output in turn.
fn run_models(models: &[Model]) -> Vec<Outcome> {
    for m in models {
        println!(
            "xtask miri: ring tests under {} (MIRIFLAGS='{}')",
            m.name(),
            m.flags()
        );
    }
    println!("xtask miri: (their output follows when all are done)");
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let runs: Vec<_> = models
            .iter()
            .map(|&m| s.spawn(move || run_model(m)))
            .collect();
        runs.into_iter()
            .zip(models)
            .map(|(r, &model)| {
                r.join().unwrap_or_else(|_| Outcome {
                    model,
                    ok: false,
                    secs: 0.0,
                    log: "xtask miri: the run's thread panicked\n".into(),
                })
            })
            .collect()
    });
    for o in &outcomes {
        println!("\n--- {} ---\n{}", o.model.name(), o.log.trim_end());
        println!(
            "xtask miri: {}: {} in {:.0} s",
            o.model.name(),
            if o.ok { "ok" } else { "FAILED" },
            o.secs
        );
    }
    outcomes
}

/// `cargo xtask miri`: both models (or the one asked for).
pub fn cmd_miri(args: MiriArgs) -> Result<bool, String> {
    println!("xtask miri: {}", available()?);
    setup()?;
    build()?;
    let models: Vec<Model> = Model::ALL
        .into_iter()
        .filter(|&m| args.model.is_none_or(|only| only == m))
        .collect();
    Ok(run_models(&models).iter().all(|o| o.ok))
}

/// The `cargo xtask test` steps: the build, then one per borrow model; when the toolchain
/// has no Miri, one passing "skipped" step, with the reason printed.
pub fn test_steps(steps: &mut Vec<Step>) {
    println!("\n=== xtask test: ring and logger tests under Miri ===");
    match available().and_then(|version| setup().map(|()| version)) {
        Ok(version) => println!("{version}"),
        Err(why) => {
            println!("xtask test: skipping the Miri runs: {why}");
            steps.push(Step {
                name: "ring and logger tests under Miri: skipped (no Miri)".into(),
                ok: true,
                secs: 0.0,
            });
            return;
        }
    }
    let start = Instant::now();
    let built = build().inspect_err(|e| eprintln!("{e}")).is_ok();
    steps.push(Step {
        name: "ring and logger tests under Miri: build".into(),
        ok: built,
        secs: start.elapsed().as_secs_f64(),
    });
    if !built {
        return;
    }
    for o in run_models(&Model::ALL) {
        steps.push(Step {
            name: format!("ring and logger tests under Miri ({})", o.model.name()),
            ok: o.ok,
            secs: o.secs,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_the_model_and_the_tests() {
        let line = describe(&command(Model::Tree, &RUNS[2]));
        assert_eq!(
            line,
            "MIRIFLAGS='-Zmiri-strict-provenance -Zmiri-tree-borrows' cargo +nightly miri test \
             -q -p virtio-tests --test conformance_queue --test conformance_props \
             --test conformance_packed"
        );
        let line = describe(&command(Model::Stacked, &RUNS[1]));
        assert!(line.ends_with("-p virtio-tests --lib -- mem::"), "{line}");
        let line = describe(&command(Model::Stacked, &RUNS[3]));
        assert!(
            line.ends_with("-p virtio-tests --test console_logger_threads"),
            "{line}"
        );
    }
}
