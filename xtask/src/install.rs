//! `sudo cargo xtask install [--dry-run]` (macOS, a test VM): copies the bundles built by
//! `cargo xtask kexts` to `/Library/Extensions` (or `$KEXT_INSTALL_DIR`), owned by
//! root:wheel, and loads them family first — `kmutil load -p` on macOS 11 and later,
//! `kextutil` before. `--dry-run` prints the plan anywhere, without touching the system.
//! Signing and security settings: `docs/install.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{console_log, kexts};

struct Step {
    what: String,
    cmd: Vec<String>,
}

fn step(what: impl Into<String>, cmd: &[&str]) -> Step {
    Step {
        what: what.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
    }
}

/// The macOS major version (`sw_vers -productVersion`), if this is macOS.
fn macos_major() -> Option<u32> {
    let out = Command::new("sw_vers")
        .arg("-productVersion")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().split('.').next()?.parse().ok()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// What `cargo xtask install` was asked to do.
#[derive(Debug, Default)]
pub struct InstallOptions {
    pub dry_run: bool,
    pub console_log: bool,
    pub getty: Option<String>,
    pub remove_console_log: bool,
}

pub fn cmd_install(o: &InstallOptions) -> Result<bool, String> {
    let dry_run = o.dry_run;
    let root = kexts::workspace_root()?;
    if let Some(port) = &o.getty {
        console_log::check_getty_port(port)?;
    }
    let built = root.join("target/kexts");
    let dest = PathBuf::from(
        std::env::var("KEXT_INSTALL_DIR").unwrap_or_else(|_| "/Library/Extensions".into()),
    );
    // `KEXTS` lists the family first: the device kexts link against it.
    let bundles: Vec<(String, PathBuf, PathBuf)> = kexts::present(&root)
        .into_iter()
        .map(|k| {
            let name = format!("{}.kext", k.name);
            (k.name.to_string(), built.join(&name), dest.join(&name))
        })
        .collect();
    let unlinked: Vec<&str> = bundles
        .iter()
        .filter(|(name, src, _)| !src.join("Contents/MacOS").join(name).is_file())
        .map(|(name, _, _)| name.as_str())
        .collect();

    let modern_loader = macos_major().is_none_or(|major| major >= 11);
    let mut steps = Vec::new();
    for (name, src, dst) in &bundles {
        let (src, dst) = (path(src), path(dst));
        steps.push(step(
            format!("remove an older {name}.kext"),
            &["rm", "-rf", &dst],
        ));
        steps.push(step(format!("copy {name}.kext"), &["cp", "-R", &src, &dst]));
        steps.push(step(
            "owned by root:wheel",
            &["chown", "-R", "root:wheel", &dst],
        ));
        steps.push(step(
            "not writable by others",
            &["chmod", "-R", "go-w", &dst],
        ));
    }
    for (i, (name, _, dst)) in bundles.iter().enumerate() {
        let dst = path(dst);
        if modern_loader {
            steps.push(step(
                format!("load {name} (kmutil)"),
                &["kmutil", "load", "-p", &dst],
            ));
        } else if i == 0 {
            steps.push(step(format!("load {name} (kextutil)"), &["kextutil", &dst]));
        } else {
            // kextutil resolves the family from the path given with -d.
            let family = path(&bundles[0].2);
            steps.push(step(
                format!("load {name} (kextutil)"),
                &["kextutil", "-d", &family, &dst],
            ));
        }
    }

    if o.console_log {
        for (what, cmd) in console_log::install_steps(&root, o.getty.as_deref()) {
            steps.push(Step { what, cmd });
        }
    }
    if o.remove_console_log {
        // Removal only: the kexts stay as they are.
        steps = console_log::remove_steps()
            .into_iter()
            .map(|(what, cmd)| Step { what, cmd })
            .collect();
    }
    let unlinked = if o.remove_console_log {
        Vec::new()
    } else {
        unlinked
    };

    if dry_run {
        if o.remove_console_log {
            println!("removal plan (the console log daemon and login prompt):");
        } else {
            println!(
                "install plan ({} bundles from {}):",
                bundles.len(),
                built.display()
            );
        }
        let width = steps.iter().map(|s| s.what.len()).max().unwrap_or(0);
        for s in &steps {
            println!("  {:width$}  {}", s.what, s.cmd.join(" "));
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
            "dry run: {} steps planned, nothing changed (on the macOS test VM: \
             `sudo cargo xtask install`)",
            steps.len()
        );
        return Ok(true);
    }
    if macos_major().is_none() {
        return Err(
            "install runs on macOS (a test VM with reduced security, see docs/install.md); \
                    `cargo xtask install --dry-run` prints the steps anywhere"
                .into(),
        );
    }
    if !unlinked.is_empty() {
        return Err(format!(
            "bundles without an executable: {} (run `cargo xtask kexts` with a Kernel SDK: \
             KERNEL_SDK=<path>, or `cargo xtask kexts --fetch-sdk`)",
            unlinked.join(", ")
        ));
    }
    if !is_root() {
        return Err("run it as root: sudo cargo xtask install".into());
    }
    for s in &steps {
        println!("install: {} ({})", s.what, s.cmd.join(" "));
        let (cmd, rest) = s.cmd.split_first().ok_or("empty step")?;
        if cmd == "write-file" {
            // The getty job, generated for the port asked for.
            let dest = rest.first().ok_or("write-file without a path")?;
            let port = o.getty.as_deref().ok_or("write-file without --getty")?;
            std::fs::write(dest, console_log::getty_plist(port))
                .map_err(|e| format!("install: writing {dest}: {e}"))?;
            continue;
        }
        let ok = Command::new(cmd)
            .args(rest)
            .status()
            .is_ok_and(|st| st.success());
        if !ok {
            return Err(format!("install: `{}` failed", s.cmd.join(" ")));
        }
    }
    println!(
        "installed and loaded; check with `kmutil showloaded | grep virtiodarwin` (or \
         `kextstat`) and `ioreg -l -w0 -r -c org_virtiodarwin_VirtioPCITransport`"
    );
    Ok(true)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
