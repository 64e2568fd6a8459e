//! Finding (or installing) what the guest build and the runs need, and building the guest.
//!
//! The guest needs `-Zbuild-std` for `x86_64-unknown-none`, i.e. a compiler with its
//! library sources: a rustup nightly with `rust-src` if one is installed, else Debian's
//! `rustc-web` + `rust-web-src` (used with `RUSTC_BOOTSTRAP=1`); plus `ld.lld`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Debian packages that provide the guest toolchain.
pub const APT_RUST: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "lld"];
/// Debian packages for QEMU. Pinned to bookworm with `--allow-downgrades`: the image may
/// ship a newer backports `qemu-utils` that conflicts with bookworm's qemu-system 7.2.
pub const APT_QEMU: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils/bookworm",
    "qemu-block-extra/bookworm",
];

/// How to invoke cargo for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestToolchain {
    /// `rustup run nightly cargo` (nightly has `rust-src`).
    RustupNightly,
    /// Debian's `/usr/bin/cargo` with `RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1`.
    Debian { cargo: PathBuf, rustc: PathBuf },
}

impl GuestToolchain {
    pub fn describe(&self) -> String {
        match self {
            GuestToolchain::RustupNightly => "rustup nightly + rust-src".into(),
            GuestToolchain::Debian { rustc, .. } => {
                format!("{} + rust-web-src (RUSTC_BOOTSTRAP=1)", rustc.display())
            }
        }
    }

    /// A `cargo` command for the guest directory, with the outer cargo's environment
    /// removed (when run from `cargo test`/`cargo xtask`, variables such as `RUSTC`,
    /// `RUSTFLAGS`, `CARGO_TARGET_DIR` or the jobserver would leak into the guest build).
    pub fn cargo(&self, guest_dir: &Path) -> Command {
        let mut cmd = match self {
            GuestToolchain::RustupNightly => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo"]);
                c
            }
            GuestToolchain::Debian { cargo, .. } => Command::new(cargo),
        };
        cmd.current_dir(guest_dir);
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            let keep = [
                "CARGO_HOME",
                "CARGO_NET_",
                "CARGO_HTTP_",
                "CARGO_REGISTRIES_",
                "CARGO_TERM_",
            ]
            .iter()
            .any(|k| key.starts_with(k));
            let outer = (key.starts_with("CARGO") && !keep)
                || key.starts_with("RUSTC")
                || key.starts_with("RUSTDOC")
                || key.starts_with("RUSTUP_TOOLCHAIN")
                || matches!(
                    key,
                    "RUSTFLAGS" | "MAKEFLAGS" | "MFLAGS" | "__CARGO_FIX_PLZ"
                );
            if outer {
                cmd.env_remove(key);
            }
        }
        if let GuestToolchain::Debian { rustc, .. } = self {
            cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
        }
        cmd
    }
}

fn works(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn has_library_src(sysroot: &str) -> bool {
    Path::new(sysroot)
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .is_file()
}

/// The best available guest toolchain, without installing anything.
pub fn detect() -> Option<GuestToolchain> {
    // Only an installed nightly: `rustup run` must not start a download.
    let nightly_installed = output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|l| l.starts_with("nightly")));
    if nightly_installed
        && let Some(sysroot) = output(
            Command::new("rustup")
                .args(["run", "nightly", "rustc", "--print", "sysroot"])
                .env("RUSTUP_AUTO_INSTALL", "0"),
        )
        && has_library_src(&sysroot)
    {
        return Some(GuestToolchain::RustupNightly);
    }
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if let Some(sysroot) = output(Command::new(&rustc).args(["--print", "sysroot"]))
        && has_library_src(&sysroot)
        && cargo.is_file()
    {
        return Some(GuestToolchain::Debian { cargo, rustc });
    }
    None
}

pub fn have_lld() -> bool {
    works(Command::new("ld.lld").arg("--version"))
}

pub fn have_qemu() -> bool {
    works(Command::new(super::QEMU).arg("--version"))
}

/// The exact command that installs `packages` (what we run, or print when we cannot).
pub fn apt_command(packages: &[&str]) -> String {
    let extra = if packages.iter().any(|p| p.contains('/')) {
        " --allow-downgrades"
    } else {
        ""
    };
    format!(
        "apt-get install -y --no-install-recommends{extra} {}",
        packages.join(" ")
    )
}

pub(crate) fn is_root_on_debian() -> bool {
    Path::new("/etc/debian_version").exists()
        && output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

pub(crate) fn apt_install(packages: &[&str], updated: &mut bool) -> Result<(), String> {
    if !*updated {
        eprintln!("+ apt-get update");
        if !works(Command::new("apt-get").arg("update")) {
            return Err("apt-get update failed".into());
        }
        *updated = true;
    }
    let cmd = apt_command(packages);
    eprintln!("+ {cmd}");
    let ok = Command::new("sh")
        .args(["-c", &cmd])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed"))
    }
}

/// Makes sure the guest toolchain, `ld.lld` and QEMU exist. With `install`, missing pieces
/// are installed when running as root on Debian (one `apt-get update` first); otherwise
/// the error names the exact command to run.
pub fn ensure(install: bool) -> Result<GuestToolchain, String> {
    let mut updated = false;
    let mut missing: Vec<&[&str]> = Vec::new();
    if detect().is_none() || !have_lld() {
        missing.push(APT_RUST);
    }
    if !have_qemu() {
        missing.push(APT_QEMU);
    }
    if !missing.is_empty() {
        if install && is_root_on_debian() {
            for packages in &missing {
                apt_install(packages, &mut updated)?;
            }
        } else {
            let cmds: Vec<String> = missing.iter().map(|p| apt_command(p)).collect();
            return Err(format!(
                "missing guest toolchain or QEMU; install with:\n  apt-get update && {}",
                cmds.join(" && ")
            ));
        }
    }
    detect().ok_or_else(|| {
        format!(
            "no toolchain with library sources found even after `{}`",
            apt_command(APT_RUST)
        )
    })
}

/// The workspace, found at run time rather than from a path compiled in (a binary such as
/// xtask may run from another clone): the nearest directory above the current one, or
/// above the running executable, holding this project's `Cargo.toml` with `kexts/` and
/// `tests/guest/` beside it.
pub fn find_workspace() -> Option<PathBuf> {
    let is_root = |d: &Path| {
        d.join("kexts").is_dir()
            && d.join("tests/guest").is_dir()
            && std::fs::read_to_string(d.join("Cargo.toml"))
                .is_ok_and(|t| t.contains("[workspace]"))
    };
    [std::env::current_dir().ok(), std::env::current_exe().ok()]
        .into_iter()
        .flatten()
        .find_map(|start| {
            start
                .ancestors()
                .find(|d| is_root(d))
                .map(Path::to_path_buf)
        })
}

fn workspace_or_cwd() -> PathBuf {
    find_workspace().unwrap_or_else(|| PathBuf::from("."))
}

/// The guest project directory (`tests/guest`).
pub fn guest_dir() -> PathBuf {
    workspace_or_cwd().join("tests/guest")
}

/// The workspace's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_or_cwd().join("target"),
    }
}

/// The cargo profile the guest is built with.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum GuestProfile {
    /// `dev` (tests/guest/Cargo.toml: opt-level 1, debug assertions and overflow checks
    /// on): what the tests boot.
    #[default]
    Checked,
    /// `release`: the optimisation level the drivers ship at (the kexts build with
    /// `--release`); what the benchmarks boot.
    Release,
}

impl GuestProfile {
    /// Cargo's output directory for the profile.
    fn dir(self) -> &'static str {
        match self {
            GuestProfile::Checked => "debug",
            GuestProfile::Release => "release",
        }
    }
}

/// Serialises guest builds inside one process (cargo's own lock does it across processes)
/// and remembers the successful ones, per profile.
static BUILT: Mutex<Vec<(GuestProfile, PathBuf)>> = Mutex::new(Vec::new());

/// Builds the guest for the tests ([`GuestProfile::Checked`], once per process) and
/// returns the ELF's path.
pub fn build_guest(toolchain: &GuestToolchain) -> Result<PathBuf, String> {
    build_guest_profile(toolchain, GuestProfile::Checked)
}

/// Builds the guest with `profile` (once per process and profile) and returns the ELF's
/// path.
pub fn build_guest_profile(
    toolchain: &GuestToolchain,
    profile: GuestProfile,
) -> Result<PathBuf, String> {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(p, _)| *p == profile) {
        return Ok(path.clone());
    }
    let guest_target = target_dir().join("guest");
    let mut cargo = toolchain.cargo(&guest_dir());
    cargo.args(["build", "--target-dir"]).arg(&guest_target);
    if profile == GuestProfile::Release {
        cargo.arg("--release");
    }
    // At a terminal, cargo's own progress (a cold build takes minutes); elsewhere (tests,
    // CI) its output only when the build fails.
    let interactive = std::io::stderr().is_terminal();
    if interactive {
        eprintln!(
            "xtask: building the test guest ({}; minutes when cold, a second when up to date)",
            toolchain.describe()
        );
        cargo.stderr(Stdio::inherit());
    } else {
        cargo.arg("--quiet").stderr(Stdio::piped());
    }
    let out = cargo.stdout(Stdio::null()).output().map_err(|e| {
        format!(
            "cannot run cargo for the guest ({}): {e}",
            toolchain.describe()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "guest build failed ({}){}",
            toolchain.describe(),
            if interactive {
                " (cargo's output is above)".to_string()
            } else {
                format!(":\n{}", String::from_utf8_lossy(&out.stderr))
            }
        ));
    }
    let elf = guest_target
        .join("x86_64-unknown-none")
        .join(profile.dir())
        .join("guest");
    if !elf.is_file() {
        return Err(format!("guest build produced no {}", elf.display()));
    }
    built.push((profile, elf.clone()));
    Ok(elf)
}
