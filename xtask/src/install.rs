//! `sudo cargo xtask install [--dry-run]` (macOS or PureDarwin, a test VM): copies the
//! bundles built by `cargo xtask kexts` to `/Library/Extensions` (or `$KEXT_INSTALL_DIR`),
//! owned by root:wheel and not writable by others, and loads them family first.
//!
//! Two generations of kext tooling, chosen by the running kernel (`uname -r`: Darwin 20 and
//! later, or `/usr/bin/kmutil` present, is macOS 11+):
//! - macOS 10.13–10.15 and PureDarwin (Darwin 17–19): `kextunload -b` of a loaded older
//!   build, copy, `kextcache -i /` (the prelinked kernel, so the kexts win boot-time matching
//!   over AppleVirtIO), then `kextutil`, family first;
//! - macOS 11 and later: `kmutil unload -b` of a loaded older build, copy, then one
//!   `kmutil load -p <family> -p <device> ...` (a new third-party kext needs the user's
//!   approval and a reboot: the failure of that load is expected the first time).
//!
//! `--uninstall` undoes it; `--remove-console-log` removes only the console's launchd pieces.
//! The plan is data ([`plan`]): `--dry-run` prints it on any host (both generations on a host
//! that is not Darwin, or the one named by `--target-macos`) and the tests check it.
//! Signing and security settings: `docs/install.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{console_log, kexts};

/// Which kext tooling the target system has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// macOS 10.13–10.15, PureDarwin (Darwin 17–19): kextutil, kextunload, kextcache.
    Kextcache,
    /// macOS 11 and later (Darwin 20+): kmutil and the auxiliary kext collection.
    Kmutil,
}

impl Generation {
    fn label(self) -> &'static str {
        match self {
            Generation::Kextcache => {
                "macOS 10.13-10.15 and PureDarwin (Darwin 17-19: kextutil, kextcache)"
            }
            Generation::Kmutil => "macOS 11 and later (Darwin 20+: kmutil)",
        }
    }

    fn unload(self, id: &str) -> Vec<String> {
        match self {
            Generation::Kextcache => words(&["kextunload", "-b", id]),
            Generation::Kmutil => words(&["kmutil", "unload", "-b", id]),
        }
    }

    /// How to list what is loaded.
    fn showloaded(self) -> &'static str {
        match self {
            Generation::Kextcache => "kextstat | grep virtiodarwin",
            Generation::Kmutil => "kmutil showloaded | grep virtiodarwin",
        }
    }

    /// Where the user approves a blocked kext.
    fn approval(self) -> &'static str {
        match self {
            Generation::Kextcache => {
                "System Preferences -> Security & Privacy -> General -> Allow (needed with SIP on)"
            }
            Generation::Kmutil => {
                "System Preferences -> Security & Privacy (macOS 11, 12) or System Settings -> \
                 Privacy & Security (13 and later), Allow"
            }
        }
    }
}

/// The generation of a `--target-macos` value: `10.13`..`10.15` or `11` and later (a minor
/// version may follow).
pub fn parse_target(v: &str) -> Result<Generation, String> {
    let bad = || {
        format!(
            "--target-macos {v:?}: give a macOS version, 10.13 to 10.15 (also PureDarwin's \
             kext tooling) or 11 and later, e.g. --target-macos 10.15 or --target-macos 13"
        )
    };
    let mut parts = v.trim().split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor: Option<u32> = match parts.next() {
        None => None,
        Some(p) => Some(p.parse().map_err(|_| bad())?),
    };
    match (major, minor) {
        (10, Some(13..=15)) => Ok(Generation::Kextcache),
        (10, Some(m)) if m < 13 => Err(format!(
            "--target-macos {v}: the kexts need macOS 10.13 or later (they declare the \
             com.apple.kpi.* libraries at 17.0.0)"
        )),
        (11.., _) => Ok(Generation::Kmutil),
        _ => Err(bad()),
    }
}

/// The generation of the running system: Darwin's major version (`uname -r`), else whether
/// `/usr/bin/kmutil` exists; `None` when this is not Darwin.
fn host_generation() -> Option<Generation> {
    let out = |arg: &str| {
        Command::new("uname")
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if out("-s")? != "Darwin" {
        return None;
    }
    let major = out("-r").and_then(|r| r.split('.').next()?.parse::<u32>().ok());
    Some(match major {
        Some(m) if m >= 20 => Generation::Kmutil,
        Some(_) => Generation::Kextcache,
        None if Path::new("/usr/bin/kmutil").exists() => Generation::Kmutil,
        None => Generation::Kextcache,
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// What a failing step means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFail {
    /// Stop: nothing after it is done (a copy, ownership, a file).
    Stop,
    /// Warn and go on; the verdict says so and the exit status is 1.
    Warn,
    /// Expected to fail at times (stopping a job that may not run): say nothing.
    Ignore,
    /// A kext unload: "not loaded" is fine; anything else means the old build stays in the
    /// kernel until a reboot (and the load steps are skipped).
    Unload,
    /// A kext load: on failure, approval and a reboot may be needed; the other steps go on.
    Load,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Run(Vec<String>),
    /// A file generated here (the getty job), written with `mode`.
    Write {
        path: String,
        contents: String,
        mode: u32,
    },
    /// Nothing to do (said in the plan: an identical bundle kept, say).
    Note,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub what: String,
    pub action: Action,
    pub on_fail: OnFail,
}

pub fn run_step(what: impl Into<String>, cmd: &[&str], on_fail: OnFail) -> Step {
    Step {
        what: what.into(),
        action: Action::Run(words(cmd)),
        on_fail,
    }
}

fn words(cmd: &[&str]) -> Vec<String> {
    cmd.iter().map(|s| s.to_string()).collect()
}

impl Step {
    /// The step as the plan prints it: a command a shell takes as is, or what is written.
    pub fn shown(&self) -> String {
        match &self.action {
            Action::Run(cmd) => cmd.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "),
            Action::Write {
                path,
                contents,
                mode,
            } => format!(
                "writes {} ({} bytes, mode {mode:04o}, generated by xtask/src/console_log.rs)",
                quote(path),
                contents.len()
            ),
            Action::Note => "(nothing to do)".into(),
        }
    }
}

/// `w` quoted for a POSIX shell when it needs it.
fn quote(w: &str) -> String {
    let plain = !w.is_empty()
        && w.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// An installed copy compared with the built bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    Absent,
    /// Byte for byte the built bundle (same files, same contents).
    Identical,
    Different,
}

/// One bundle: built at `src`, installed at `dst`.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub name: String,
    pub id: String,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub installed: Installed,
}

/// What `cargo xtask install` was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode<'a> {
    Install {
        console_log: bool,
        getty: Option<&'a str>,
    },
    RemoveConsoleLog,
    Uninstall,
}

/// The steps, in order, for `tools`. `bundles` lists the family first (the device kexts link
/// against it); `console` says which launchd pieces are in place now.
pub fn plan(
    tools: Generation,
    mode: Mode,
    bundles: &[Bundle],
    console: &console_log::Present,
    root: &Path,
) -> Vec<Step> {
    let mut steps = Vec::new();
    match mode {
        Mode::RemoveConsoleLog => steps.extend(console_log::remove_steps(console)),
        Mode::Uninstall => {
            // Devices first, then the family they link against.
            for b in bundles.iter().rev() {
                steps.push(Step {
                    what: format!("unload {}", b.name),
                    action: Action::Run(tools.unload(&b.id)),
                    on_fail: OnFail::Unload,
                });
            }
            if console.any() {
                steps.extend(console_log::remove_steps(console));
            }
            for b in bundles {
                let dst = path(&b.dst);
                steps.push(run_step(
                    format!("remove {}.kext", b.name),
                    &["rm", "-rf", &dst],
                    OnFail::Stop,
                ));
            }
            steps.push(match tools {
                Generation::Kextcache => run_step(
                    "rebuild the prelinked kernel without them",
                    &["kextcache", "-i", "/"],
                    OnFail::Warn,
                ),
                Generation::Kmutil => run_step(
                    "rebuild the auxiliary kext collection without them",
                    &["kmutil", "install", "--update-all"],
                    OnFail::Warn,
                ),
            });
        }
        Mode::Install { console_log, getty } => {
            // A changed family takes every loaded device kext with it; a changed device kext
            // only itself. Devices first, then the family.
            let family_changed = bundles
                .first()
                .is_some_and(|b| b.installed == Installed::Different);
            for b in bundles.iter().rev() {
                let unload = match b.installed {
                    Installed::Different => true,
                    Installed::Identical => family_changed,
                    Installed::Absent => false,
                };
                if unload {
                    steps.push(Step {
                        what: format!("unload {}", b.name),
                        action: Action::Run(tools.unload(&b.id)),
                        on_fail: OnFail::Unload,
                    });
                }
            }
            for b in bundles {
                let (src, dst) = (path(&b.src), path(&b.dst));
                if b.installed == Installed::Identical {
                    steps.push(Step {
                        what: format!("{}.kext: the installed copy is identical, kept", b.name),
                        action: Action::Note,
                        on_fail: OnFail::Ignore,
                    });
                    continue;
                }
                let n = &b.name;
                steps.push(run_step(
                    format!("remove an older {n}.kext"),
                    &["rm", "-rf", &dst],
                    OnFail::Stop,
                ));
                steps.push(run_step(
                    format!("copy {n}.kext"),
                    &["cp", "-R", &src, &dst],
                    OnFail::Stop,
                ));
                steps.push(run_step(
                    format!("{n}.kext owned by root:wheel"),
                    &["chown", "-R", "root:wheel", &dst],
                    OnFail::Stop,
                ));
                steps.push(run_step(
                    format!("{n}.kext not writable by others"),
                    &["chmod", "-R", "go-w", &dst],
                    OnFail::Stop,
                ));
            }
            match tools {
                Generation::Kextcache => {
                    steps.push(run_step(
                        "prelinked kernel: the kexts match at boot, before AppleVirtIO",
                        &["kextcache", "-i", "/"],
                        OnFail::Warn,
                    ));
                    if let Some((family, devices)) = bundles.split_first() {
                        let fam = path(&family.dst);
                        steps.push(run_step(
                            format!("load {} now (kextutil)", family.name),
                            &["kextutil", &fam],
                            OnFail::Load,
                        ));
                        for b in devices {
                            // kextutil resolves the family from the path given with -d.
                            steps.push(run_step(
                                format!("load {} now (kextutil)", b.name),
                                &["kextutil", "-d", &fam, &path(&b.dst)],
                                OnFail::Load,
                            ));
                        }
                    }
                }
                Generation::Kmutil => {
                    if !bundles.is_empty() {
                        // One call: kmutil links them together into the auxiliary collection.
                        let mut cmd = words(&["kmutil", "load"]);
                        for b in bundles {
                            cmd.push("-p".into());
                            cmd.push(path(&b.dst));
                        }
                        steps.push(Step {
                            what: "load them, family first (kmutil)".into(),
                            action: Action::Run(cmd),
                            on_fail: OnFail::Load,
                        });
                    }
                }
            }
            if console_log {
                steps.extend(console_log::install_steps(root, getty, console));
            }
        }
    }
    steps
}

/// Whether the trees at `a` and `b` hold the same files with the same contents (and nothing
/// else: no stray `_CodeSignature`, say).
fn same_tree(a: &Path, b: &Path) -> bool {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Option<Vec<u8>>)>) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                return false;
            };
            if meta.is_dir() {
                out.push((rel, None));
                if !walk(root, &p, out) {
                    return false;
                }
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((rel, Some(bytes)));
            } else {
                return false;
            }
        }
        true
    }
    let (mut x, mut y) = (Vec::new(), Vec::new());
    if !walk(a, a, &mut x) || !walk(b, b, &mut y) {
        return false;
    }
    x.sort();
    y.sort();
    x == y
}

/// What `cargo xtask install` was asked to do (the command line).
#[derive(Debug, Default)]
pub struct InstallOptions {
    pub dry_run: bool,
    pub console_log: bool,
    pub getty: Option<String>,
    pub remove_console_log: bool,
    pub uninstall: bool,
    pub target_macos: Option<String>,
}

fn print_plan(label: &str, steps: &[Step]) {
    println!("  for {label}:");
    let width = steps.iter().map(|s| s.what.len()).max().unwrap_or(0);
    for s in steps {
        println!("    {:width$}  {}", s.what, s.shown());
    }
}

pub fn cmd_install(o: &InstallOptions) -> Result<bool, String> {
    let root = kexts::workspace_root()?;
    if let Some(port) = &o.getty {
        console_log::check_getty_port(port)?;
    }
    let target = o.target_macos.as_deref().map(parse_target).transpose()?;
    let mode = if o.uninstall {
        Mode::Uninstall
    } else if o.remove_console_log {
        Mode::RemoveConsoleLog
    } else {
        Mode::Install {
            console_log: o.console_log,
            getty: o.getty.as_deref(),
        }
    };
    let built = root.join("target/kexts");
    let dest = PathBuf::from(
        std::env::var("KEXT_INSTALL_DIR").unwrap_or_else(|_| "/Library/Extensions".into()),
    );
    // `present` lists the family first: the device kexts link against it.
    let bundles: Vec<Bundle> = kexts::present(&root)
        .into_iter()
        .map(|k| {
            let name = format!("{}.kext", k.name);
            let (src, dst) = (built.join(&name), dest.join(&name));
            let installed = if !dst.exists() {
                Installed::Absent
            } else if same_tree(&src, &dst) {
                Installed::Identical
            } else {
                Installed::Different
            };
            Bundle {
                name: k.name.to_string(),
                id: k.bundle_id(),
                src,
                dst,
                installed,
            }
        })
        .collect();
    let unlinked: Vec<&str> = match mode {
        Mode::Install { .. } => bundles
            .iter()
            .filter(|b| !b.src.join("Contents/MacOS").join(&b.name).is_file())
            .map(|b| b.name.as_str())
            .collect(),
        _ => Vec::new(),
    };
    let console = console_log::Present::probe();
    let host = host_generation();

    if o.dry_run {
        let gens: Vec<Generation> = match (target, host) {
            (Some(g), _) | (None, Some(g)) => vec![g],
            // The same on every system.
            (None, None) if mode == Mode::RemoveConsoleLog => vec![Generation::Kmutil],
            (None, None) => {
                println!(
                    "this host is not Darwin: both plans follow (one only: --target-macos \
                     10.15 or --target-macos 13, say)"
                );
                vec![Generation::Kextcache, Generation::Kmutil]
            }
        };
        match mode {
            Mode::Install { .. } => println!(
                "install plan ({} bundles from {} to {}):",
                bundles.len(),
                built.display(),
                dest.display()
            ),
            Mode::RemoveConsoleLog => {
                println!("removal plan (the console log daemon and login prompt; the kexts stay):")
            }
            Mode::Uninstall => println!("uninstall plan ({} bundles in {}):", bundles.len(), {
                dest.display()
            }),
        }
        let mut counts = Vec::new();
        for g in gens {
            let steps = plan(g, mode, &bundles, &console, &root);
            counts.push(steps.len().to_string());
            let label = match mode {
                Mode::RemoveConsoleLog => "every macOS and PureDarwin",
                _ => g.label(),
            };
            print_plan(label, &steps);
        }
        if !unlinked.is_empty() {
            // Nothing half-installable: a plan with a bundle that cannot load is a failure.
            return Err(format!(
                "not installable: no linked executable in {} (run `cargo xtask kexts` with a \
                 Kernel SDK: KERNEL_SDK=<path>, or `cargo xtask kexts --fetch-sdk`)",
                unlinked.join(", ")
            ));
        }
        println!(
            "dry run: {} steps planned, nothing changed (on the VM: `sudo cargo xtask \
             install` with the same flags but --dry-run and --target-macos)",
            counts.join(" and ")
        );
        return Ok(true);
    }

    let Some(tools) = host else {
        return Err(
            "install runs on macOS or PureDarwin (a test VM, see docs/install.md); \
             `cargo xtask install --dry-run` prints the steps anywhere"
                .into(),
        );
    };
    if !unlinked.is_empty() {
        return Err(format!(
            "bundles without an executable: {} (run `cargo xtask kexts` with a Kernel SDK: \
             KERNEL_SDK=<path>, or `cargo xtask kexts --fetch-sdk`)",
            unlinked.join(", ")
        ));
    }
    if !is_root() {
        return Err(
            "run it as root: sudo cargo xtask install (KEXT_INSTALL_DIR goes \
                    after sudo: sudo KEXT_INSTALL_DIR=<dir> cargo xtask install)"
                .into(),
        );
    }
    let steps = plan(tools, mode, &bundles, &console, &root);
    execute(tools, mode, &steps)
}

/// Runs the steps and ends with the verdict.
fn execute(tools: Generation, mode: Mode, steps: &[Step]) -> Result<bool, String> {
    let mut still_loaded: Vec<String> = Vec::new();
    let mut load_failed = false;
    let mut loads = 0;
    let mut warnings: Vec<String> = Vec::new();
    for s in steps {
        let cmd = match &s.action {
            Action::Note => {
                println!("install: {}", s.what);
                continue;
            }
            Action::Write {
                path,
                contents,
                mode,
            } => {
                println!("install: {} ({})", s.what, s.shown());
                write_file(path, contents, *mode)?;
                continue;
            }
            Action::Run(cmd) => cmd,
        };
        // 10.13-10.15: the new build is in the prelinked kernel already and a load beside
        // the old one fails. 11+: `kmutil load` still runs, to put the new build in the
        // auxiliary kext collection for the next boot.
        if s.on_fail == OnFail::Load && !still_loaded.is_empty() && tools == Generation::Kextcache {
            println!(
                "install: {}: skipped (the older build is still loaded)",
                s.what
            );
            continue;
        }
        println!("install: {} ({})", s.what, s.shown());
        let (prog, args) = cmd.split_first().ok_or("an empty step")?;
        let (ok, text) = match Command::new(prog).args(args).output() {
            Ok(out) => {
                let mut t = String::from_utf8_lossy(&out.stdout).into_owned();
                t.push_str(&String::from_utf8_lossy(&out.stderr));
                (out.status.success(), t.trim().to_string())
            }
            Err(e) => (false, format!("could not run {prog}: {e}")),
        };
        if !text.is_empty() && (s.on_fail != OnFail::Ignore || ok) {
            for line in text.lines() {
                println!("    {line}");
            }
        }
        if s.on_fail == OnFail::Load {
            loads += 1;
        }
        if ok {
            continue;
        }
        match s.on_fail {
            OnFail::Stop => {
                return Err(format!("`{}` failed; nothing after it was done", s.shown()));
            }
            OnFail::Ignore => {}
            OnFail::Warn => warnings.push(format!("`{}` failed", s.shown())),
            OnFail::Unload => {
                if not_loaded(&text) {
                    println!("    (it was not loaded)");
                } else {
                    still_loaded.push(s.what.trim_start_matches("unload ").to_string());
                }
            }
            OnFail::Load => load_failed = true,
        }
    }

    // The verdict, last.
    for w in &warnings {
        println!("warning: {w}");
    }
    let failed = match warnings.len() {
        0 => String::new(),
        1 => " (but 1 step failed: see the warning above)".into(),
        n => format!(" (but {n} steps failed: see the warnings above)"),
    };
    let check = format!(
        "`{}` and `ioreg -l -w0 -r -c org_virtiodarwin_VirtioPCITransport`",
        tools.showloaded()
    );
    match mode {
        Mode::RemoveConsoleLog => {
            println!("console log daemon and login prompt removed{failed}")
        }
        Mode::Uninstall => {
            if !still_loaded.is_empty() {
                println!(
                    "still loaded (in use): {}; they go at the reboot",
                    still_loaded.join(", ")
                );
            }
            println!(
                "uninstalled{failed}: reboot now (until then the kernel may hold them); \
                 after it, `{}` shows nothing of ours",
                tools.showloaded()
            );
        }
        Mode::Install { .. } => {
            let boot = match tools {
                Generation::Kextcache => {
                    "they are in the prelinked kernel: reboot, so they take the virtio \
                     devices at boot (a runtime load does not take a device AppleVirtIO \
                     already drives)"
                }
                Generation::Kmutil => {
                    "no need to re-run this command after the reboot: the auxiliary kext \
                     collection holds them"
                }
            };
            if !still_loaded.is_empty() {
                println!(
                    "installed{failed}, not loaded: the older build of {} is still loaded (in \
                     use): reboot to run the new one, then check with {check}",
                    still_loaded.join(", ")
                );
            } else if load_failed {
                println!(
                    "installed{failed}, not loaded now: approval and a reboot may be needed: \
                     {}, then reboot; {boot}; then check with {check}",
                    tools.approval()
                );
            } else if loads > 0 {
                let then = match tools {
                    Generation::Kextcache => format!("; {boot}"),
                    Generation::Kmutil => String::new(),
                };
                println!("installed and loaded{failed}{then}; check with {check}");
            } else {
                println!("installed{failed}; check with {check}");
            }
        }
    }
    Ok(warnings.is_empty())
}

/// Whether an unload's output says the kext was not loaded in the first place (kextunload:
/// "not found for unload request"; kmutil: "not loaded" / "No kernel extension").
fn not_loaded(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "not found",
        "not loaded",
        "isn't loaded",
        "no kernel extension",
        "can't find",
        "could not find",
    ]
    .iter()
    .any(|m| t.contains(m))
}

fn write_file(dest: &str, contents: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dest, contents).map_err(|e| format!("install: writing {dest}: {e}"))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("install: chmod {mode:o} {dest}: {e}"))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENS: [Generation; 2] = [Generation::Kextcache, Generation::Kmutil];

    fn bundles(states: &[Installed]) -> Vec<Bundle> {
        let names = ["VirtioFamily", "VirtioNet", "VirtioBlock"];
        names
            .iter()
            .zip(states)
            .map(|(n, &installed)| Bundle {
                name: n.to_string(),
                id: format!("org.virtiodarwin.driver.{n}"),
                src: PathBuf::from(format!("/src/target/kexts/{n}.kext")),
                dst: PathBuf::from(format!("/Library/Extensions/{n}.kext")),
                installed,
            })
            .collect()
    }

    fn shown(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.shown()).collect()
    }

    fn index(cmds: &[String], prefix: &str) -> usize {
        cmds.iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in {cmds:#?}"))
    }

    const NONE: console_log::Present = console_log::Present {
        log_plist: false,
        getty_plist: false,
    };
    const INSTALL: Mode = Mode::Install {
        console_log: false,
        getty: None,
    };

    #[test]
    fn fresh_install_copies_then_loads_family_first() {
        let b = bundles(&[Installed::Absent; 3]);
        let root = Path::new("/src");
        let old = shown(&plan(Generation::Kextcache, INSTALL, &b, &NONE, root));
        assert!(!old.iter().any(|c| c.contains("unload")), "{old:#?}");
        let cache = index(&old, "kextcache -i /");
        let fam = "kextutil /Library/Extensions/VirtioFamily.kext";
        assert!(index(&old, "chmod -R go-w /Library/Extensions/VirtioBlock.kext") < cache);
        assert!(cache < index(&old, fam));
        assert!(
            index(&old, fam)
                < index(
                    &old,
                    "kextutil -d /Library/Extensions/VirtioFamily.kext \
                     /Library/Extensions/VirtioNet.kext"
                )
        );
        assert!(!old.iter().any(|c| c.contains("kmutil")));

        let new = shown(&plan(Generation::Kmutil, INSTALL, &b, &NONE, root));
        let loads: Vec<&String> = new.iter().filter(|c| c.contains(" load")).collect();
        assert_eq!(
            loads,
            ["kmutil load -p /Library/Extensions/VirtioFamily.kext -p \
                 /Library/Extensions/VirtioNet.kext -p /Library/Extensions/VirtioBlock.kext"],
            "one kmutil call, family first"
        );
        assert!(
            !new.iter()
                .any(|c| c.contains("kextcache") || c.contains("kextutil"))
        );
        for g in GENS {
            let p = plan(g, INSTALL, &b, &NONE, root);
            // Loads may fail (approval): never a step that stops the rest.
            assert!(
                p.iter()
                    .filter(|s| shown(std::slice::from_ref(s))[0].contains("load"))
                    .all(|s| s.on_fail == OnFail::Load)
            );
            let c = shown(&p);
            for n in ["VirtioFamily", "VirtioNet", "VirtioBlock"] {
                let dst = format!("/Library/Extensions/{n}.kext");
                let rm = index(&c, &format!("rm -rf {dst}"));
                assert!(rm < index(&c, &format!("cp -R /src/target/kexts/{n}.kext {dst}")));
                assert!(rm < index(&c, &format!("chown -R root:wheel {dst}")));
            }
        }
    }

    #[test]
    fn reinstall_unloads_what_changes_and_keeps_identical_bundles() {
        let root = Path::new("/src");
        // Only a device kext changed: only it is unloaded and copied.
        let b = bundles(&[
            Installed::Identical,
            Installed::Different,
            Installed::Identical,
        ]);
        for g in GENS {
            let c = shown(&plan(g, INSTALL, &b, &NONE, root));
            let unloads: Vec<&String> = c.iter().filter(|c| c.contains("unload -b")).collect();
            assert_eq!(unloads.len(), 1, "{c:#?}");
            assert!(unloads[0].ends_with("org.virtiodarwin.driver.VirtioNet"));
            assert!(index(&c, unloads[0]) < index(&c, "cp -R"));
            assert!(
                !c.iter()
                    .any(|c| c.contains("cp -R") && c.contains("Family"))
            );
            assert_eq!(c.iter().filter(|c| c.starts_with("cp -R")).count(), 1);
        }
        // The family changed: every device kext first, then the family.
        let b = bundles(&[
            Installed::Different,
            Installed::Identical,
            Installed::Different,
        ]);
        let old = shown(&plan(Generation::Kextcache, INSTALL, &b, &NONE, root));
        let u: Vec<&String> = old.iter().filter(|c| c.contains("unload")).collect();
        assert_eq!(
            u,
            [
                "kextunload -b org.virtiodarwin.driver.VirtioBlock",
                "kextunload -b org.virtiodarwin.driver.VirtioNet",
                "kextunload -b org.virtiodarwin.driver.VirtioFamily"
            ]
        );
        let new = shown(&plan(Generation::Kmutil, INSTALL, &b, &NONE, root));
        assert_eq!(
            new.iter()
                .filter(|c| c.contains("unload"))
                .collect::<Vec<_>>()[2],
            "kmutil unload -b org.virtiodarwin.driver.VirtioFamily"
        );
        // Nothing changed: no unload, no copy (no needless collection rebuild).
        let b = bundles(&[Installed::Identical; 3]);
        for g in GENS {
            let c = shown(&plan(g, INSTALL, &b, &NONE, root));
            assert!(
                !c.iter()
                    .any(|c| c.contains("unload") || c.starts_with("cp"))
            );
        }
    }

    #[test]
    fn console_log_steps_follow_the_loads_and_survive_a_failed_load() {
        let b = bundles(&[Installed::Absent; 3]);
        let root = Path::new("/src");
        let mode = Mode::Install {
            console_log: true,
            getty: Some("org.virtiodarwin.login"),
        };
        for g in GENS {
            let p = plan(g, mode, &b, &NONE, root);
            let c = shown(&p);
            let last_load = c
                .iter()
                .rposition(|c| c.starts_with("kextutil") || c.starts_with("kmutil load"))
                .unwrap();
            let daemon = index(
                &c,
                "launchctl load -w /Library/LaunchDaemons/org.virtiodarwin.console-log.plist",
            );
            assert!(last_load < daemon);
            // The getty job: a written file, shown as such (not a pseudo-command).
            let w = p
                .iter()
                .find(|s| matches!(s.action, Action::Write { .. }))
                .unwrap();
            let Action::Write {
                path,
                contents,
                mode,
            } = &w.action
            else {
                unreachable!()
            };
            assert_eq!(
                path,
                "/Library/LaunchDaemons/org.virtiodarwin.console-getty.plist"
            );
            assert_eq!(
                contents,
                &console_log::getty_plist("org.virtiodarwin.login")
            );
            assert_eq!(*mode, 0o644);
            assert!(
                w.shown().starts_with("writes /Library/LaunchDaemons/"),
                "{}",
                w.shown()
            );
            assert!(w.shown().contains(&format!("({} bytes", contents.len())));
        }
    }

    #[test]
    fn uninstall_unloads_removes_and_refreshes_the_caches() {
        let b = bundles(&[Installed::Identical; 3]);
        let root = Path::new("/src");
        let both = console_log::Present {
            log_plist: true,
            getty_plist: false,
        };
        for (g, unload, refresh) in [
            (Generation::Kextcache, "kextunload -b", "kextcache -i /"),
            (
                Generation::Kmutil,
                "kmutil unload -b",
                "kmutil install --update-all",
            ),
        ] {
            let p = plan(g, Mode::Uninstall, &b, &both, root);
            let c = shown(&p);
            assert_eq!(
                c[..3],
                [
                    format!("{unload} org.virtiodarwin.driver.VirtioBlock"),
                    format!("{unload} org.virtiodarwin.driver.VirtioNet"),
                    format!("{unload} org.virtiodarwin.driver.VirtioFamily"),
                ]
            );
            assert!(p[..3].iter().all(|s| s.on_fail == OnFail::Unload));
            let rm = index(&c, "rm -rf /Library/Extensions/VirtioFamily.kext");
            assert!(
                index(
                    &c,
                    "launchctl unload /Library/LaunchDaemons/org.virtiodarwin.console-log.plist"
                ) < rm
            );
            assert_eq!(c.last().unwrap(), refresh);
            assert!(
                !c.iter().any(|c| c.contains("console-getty")),
                "absent: {c:#?}"
            );
            // Without console pieces in place: none of their steps.
            let c = shown(&plan(g, Mode::Uninstall, &b, &NONE, root));
            assert!(
                !c.iter()
                    .any(|c| c.contains("launchctl") || c.contains("VirtioDarwin"))
            );
        }
    }

    #[test]
    fn target_versions() {
        assert_eq!(parse_target("10.13"), Ok(Generation::Kextcache));
        assert_eq!(parse_target("10.15.7"), Ok(Generation::Kextcache));
        assert_eq!(parse_target("11"), Ok(Generation::Kmutil));
        assert_eq!(parse_target("14.5"), Ok(Generation::Kmutil));
        for bad in ["10.12", "10", "9", "", "sonoma", "13.x"] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.contains("--target-macos"), "{e}");
        }
    }

    #[test]
    fn shown_commands_paste_into_a_shell() {
        let s = run_step(
            "x",
            &["mkdir", "-p", "/Library/Application Support/VirtioDarwin"],
            OnFail::Stop,
        );
        assert_eq!(
            s.shown(),
            "mkdir -p '/Library/Application Support/VirtioDarwin'"
        );
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert!(not_loaded(
            "(kernel) Kext org.virtiodarwin.driver.VirtioNet not found for unload request."
        ));
        assert!(!not_loaded("(kernel) Kext org.x is in use"));
    }

    #[test]
    fn identical_trees() {
        let tmp = std::env::temp_dir().join(format!("virtio-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (a, b) = (tmp.join("a/X.kext"), tmp.join("b/X.kext"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("Contents/MacOS")).unwrap();
            std::fs::write(d.join("Contents/MacOS/X"), b"code").unwrap();
        }
        assert!(same_tree(&a, &b));
        std::fs::create_dir_all(b.join("Contents/_CodeSignature")).unwrap();
        assert!(!same_tree(&a, &b), "a stray folder");
        std::fs::remove_dir_all(b.join("Contents/_CodeSignature")).unwrap();
        std::fs::write(b.join("Contents/MacOS/X"), b"code2").unwrap();
        assert!(!same_tree(&a, &b));
        assert!(!same_tree(&a, &tmp.join("absent")));
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// The runner: a failed load does not stop the steps after it; a busy unload skips the
    /// loads; a failed `Warn` step makes the exit status 1; a failed `Stop` step ends it.
    #[test]
    fn failures_do_what_the_plan_says() {
        let tmp = std::env::temp_dir().join(format!("virtio-install-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let mark = |n: &str| tmp.join(n).display().to_string();
        let sh = |what: &str, script: &str, on_fail| run_step(what, &["sh", "-c", script], on_fail);
        let (a, b) = (mark("after-load"), mark("load-ran"));
        let steps = [
            sh(
                "unload X",
                "echo 'Kext X not found for unload request.'; exit 1",
                OnFail::Unload,
            ),
            sh("load", &format!("touch {b}; exit 1"), OnFail::Load),
            sh("console", &format!("touch {a}"), OnFail::Stop),
        ];
        let mode = INSTALL;
        assert_eq!(execute(Generation::Kmutil, mode, &steps), Ok(true));
        assert!(Path::new(&a).exists() && Path::new(&b).exists());
        // Busy: the load is skipped, the rest runs.
        std::fs::remove_file(&b).unwrap();
        let busy = [
            sh(
                "unload X",
                "echo 'Kext X is in use'; exit 1",
                OnFail::Unload,
            ),
            steps[1].clone(),
            steps[2].clone(),
        ];
        assert_eq!(execute(Generation::Kextcache, mode, &busy), Ok(true));
        assert!(!Path::new(&b).exists());
        let warn = [sh("cache", "exit 1", OnFail::Warn), steps[2].clone()];
        assert_eq!(execute(Generation::Kextcache, mode, &warn), Ok(false));
        let stop = [sh("copy", "exit 1", OnFail::Stop)];
        let e = execute(Generation::Kmutil, mode, &stop).unwrap_err();
        assert!(e.contains("nothing after it was done"), "{e}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
