//! `sudo cargo xtask install [--dry-run]` (macOS or PureDarwin, a test VM): copies the
//! bundles built by `cargo xtask kexts` to `/Library/Extensions`, owned by root:wheel and not
//! writable by others, rebuilds the kext caches, and loads them (family first) only when no
//! build of them is loaded. It never unloads: `kextunload -b` / `kmutil unload -b` terminate
//! the running drivers (IOCatalogue terminate with kIOServiceRequired), which on a VM that
//! boots from virtio-blk pulls its root disk and over SSH through virtio-net drops the link;
//! and an unload gains nothing, since the new build needs a reboot anyway (the prelinked
//! kernel on 10.x, the auxiliary kext collection on 11+).
//!
//! Two generations of kext tooling, chosen by the running kernel (`uname -r`: Darwin 20 and
//! later, or `/usr/bin/kmutil` present, is macOS 11+):
//! - macOS 10.13–10.15 and PureDarwin (Darwin 17–19): copy, `kextcache -i /` (the prelinked
//!   kernel, so the kexts are there at boot and match in the same pass as AppleVirtIO, where
//!   their probe score wins), then, when none of them is loaded, `kextutil`, family first;
//! - macOS 11 and later: copy, then, when none of them is loaded, one `kmutil load -p
//!   <family> -p <device> ...` (a new third-party kext needs the user's approval and a
//!   reboot: the failure of that load is expected the first time); when a build is loaded,
//!   `kmutil install --update-all` instead (the new build goes into the auxiliary kext
//!   collection for the next boot).
//!
//! What is loaded is read from the kernel (`kextstat -l -b <id>`, `kmutil showloaded
//! --bundle-identifier <id>`), and a loaded UUID is compared with the built executable's
//! `LC_UUID`. `KEXT_INSTALL_DIR=<volume>/Library/Extensions` installs onto another system's
//! volume: files only, nothing loaded, nothing of the running system touched. Its caches are
//! those of the system on that volume, whose generation is read from the volume
//! ([`volume_generation`]) or given with `--target-macos`, not this host's: `kextcache -i
//! <volume>` for a 10.x system when this host is 10.x too; otherwise nothing is run (a macOS
//! 11+ host cannot build a Darwin 17–19 prelinked kernel, and a macOS 11+ system rebuilds its
//! auxiliary collection when it boots), and the last line says what is left to do there.
//!
//! `--uninstall` undoes it; `--remove-console-log` removes only the console's launchd pieces.
//! The plan is data ([`plan`]): `--dry-run` prints it on any host (both generations on a host
//! that is not Darwin, or the one named by `--target-macos`; for another volume, that
//! volume's system from each kind of host) and the tests check it.
//! Signing and security settings: `docs/install.md`.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::{console_log, kexts};

/// Where the kexts go on the running system.
pub const DEFAULT_DIR: &str = "/Library/Extensions";

/// Which kext tooling the target system has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// macOS 10.13–10.15, PureDarwin (Darwin 17–19): kextutil, kextstat, kextcache.
    Kextcache,
    /// macOS 11 and later (Darwin 20+): kmutil and the auxiliary kext collection.
    Kmutil,
}

impl Generation {
    /// Which systems, in short.
    fn name(self) -> &'static str {
        match self {
            Generation::Kextcache => "macOS 10.13-10.15 or PureDarwin",
            Generation::Kmutil => "macOS 11 or later",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Generation::Kextcache => {
                "macOS 10.13-10.15 and PureDarwin (Darwin 17-19: kextutil, kextcache)"
            }
            Generation::Kmutil => "macOS 11 and later (Darwin 20+: kmutil)",
        }
    }

    /// The command that lists the loaded kext `id` (one line, with its UUID from 10.13).
    fn loaded_query(self, id: &str) -> Vec<String> {
        match self {
            Generation::Kextcache => words(&["kextstat", "-l", "-b", id]),
            Generation::Kmutil => words(&["kmutil", "showloaded", "--bundle-identifier", id]),
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

/// The kext tools of this host and of the system whose caches a plan rebuilds: the same for
/// the running system; for another volume, that volume's own (see [`volume_generation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tools {
    /// What this host runs (its kernel's `uname -r`).
    pub host: Generation,
    /// What the system installed to uses.
    pub target: Generation,
}

impl Tools {
    /// The running system: the host is the target.
    pub fn same(g: Generation) -> Tools {
        Tools { host: g, target: g }
    }
}

/// What a macOS version (`10.15.7`, `13`) says about the kext tooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MacosVersion {
    Tools(Generation),
    /// 10.12 or older: the kexts do not load there.
    TooOld,
    Unreadable,
}

/// `10.13`..`10.15`, or `10.16` (what macOS 11 reports to software built against an older
/// SDK) and `11` and later (a minor version may follow).
fn macos_version(v: &str) -> MacosVersion {
    let mut parts = v.trim().split('.');
    let Some(major) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
        return MacosVersion::Unreadable;
    };
    let minor: Option<u32> = match parts.next().map(str::parse) {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(_)) => return MacosVersion::Unreadable,
    };
    match (major, minor) {
        (10, Some(13..=15)) => MacosVersion::Tools(Generation::Kextcache),
        (10, Some(16)) => MacosVersion::Tools(Generation::Kmutil),
        (10, Some(m)) if m < 13 => MacosVersion::TooOld,
        (11.., _) => MacosVersion::Tools(Generation::Kmutil),
        _ => MacosVersion::Unreadable,
    }
}

/// The generation of a `--target-macos` value (see [`macos_version`]).
pub fn parse_target(v: &str) -> Result<Generation, String> {
    match macos_version(v) {
        MacosVersion::Tools(g) => Ok(g),
        MacosVersion::TooOld => Err(format!(
            "--target-macos {}: the kexts need macOS 10.13 or later (they declare the \
             com.apple.kpi.* libraries at 17.0.0)",
            quote(v)
        )),
        MacosVersion::Unreadable => Err(format!(
            "--target-macos {}: give a macOS version, 10.13 to 10.15 (also PureDarwin's \
             kext tooling) or 11 and later, e.g. --target-macos 10.15 or --target-macos 13",
            quote(v)
        )),
    }
}

/// The generation of a Darwin kernel's major version (`uname -r`: 17 is macOS 10.13, 20 is
/// macOS 11); `None` below 17, where the kexts do not load.
fn darwin_generation(major: u32) -> Option<Generation> {
    match major {
        20.. => Some(Generation::Kmutil),
        17..=19 => Some(Generation::Kextcache),
        _ => None,
    }
}

/// Paths, relative to a volume's root, that tell the system on it.
const KERNEL_COLLECTIONS: [&str; 2] = [
    // The boot and system kext collections (macOS 11 and later)...
    "System/Library/KernelCollections",
    // ...and the auxiliary one, on the data volume (kernelmanagerd(8)).
    "Library/KernelCollections",
];
const SYSTEM_VERSION: &str = "System/Library/CoreServices/SystemVersion.plist";
const KERNEL: &str = "System/Library/Kernels/kernel";
const PRELINKED_KERNELS: [&str; 2] = [
    "System/Library/PrelinkedKernels/prelinkedkernel",
    "System/Library/Caches/com.apple.kext.caches/Startup/kernelcache",
];

/// The Darwin release in a kernel image's version string (`Darwin Kernel Version 17.7.0:
/// ...`, what `uname -r` reports when that kernel runs); at most 64 MiB is read.
fn kernel_release(p: &Path) -> Option<String> {
    const MARK: &[u8] = b"Darwin Kernel Version ";
    if std::fs::metadata(p).ok()?.len() > 64 << 20 {
        return None;
    }
    let data = std::fs::read(p).ok()?;
    let at = data.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let release: String = data[at..]
        .iter()
        .take(16)
        .take_while(|c| c.is_ascii_digit() || **c == b'.')
        .map(|&c| c as char)
        .collect();
    (!release.is_empty()).then_some(release)
}

/// The kext tooling of the system on the volume mounted at `root`, and what told it, in
/// this order: kext collections (`System/Library/KernelCollections`, or the auxiliary
/// collection's `Library/KernelCollections`) are macOS 11 or later; else the macOS version
/// in `SystemVersion.plist` (only when its `ProductName` is macOS: PureDarwin's is not a
/// macOS version); else the Darwin release of its kernel (`System/Library/Kernels/kernel`,
/// what `uname -r` says on that system, as for the running system); else a prelinked
/// kernel (`System/Library/PrelinkedKernels/prelinkedkernel` or
/// `.../com.apple.kext.caches/Startup/kernelcache`) is 10.13-10.15 or PureDarwin. A system
/// older than 10.13 (Darwin 17), or one none of these tell, is an error.
pub fn volume_generation(root: &Path) -> Result<(Generation, String), String> {
    if let Some(kc) = KERNEL_COLLECTIONS.iter().find(|p| root.join(p).is_dir()) {
        return Ok((Generation::Kmutil, format!("its kext collections ({kc})")));
    }
    let plist = plist::Value::from_file(root.join(SYSTEM_VERSION)).ok();
    let field = |key: &str| {
        plist
            .as_ref()
            .and_then(plist::Value::as_dictionary)
            .and_then(|d| d.get(key))
            .and_then(plist::Value::as_string)
    };
    if let (Some(name @ ("Mac OS X" | "macOS")), Some(version)) =
        (field("ProductName"), field("ProductVersion"))
    {
        match macos_version(version) {
            MacosVersion::Tools(g) => {
                return Ok((g, format!("its {SYSTEM_VERSION} ({name} {version})")));
            }
            MacosVersion::TooOld => {
                return Err(format!(
                    "the system there is {name} {version} (its {SYSTEM_VERSION}); the kexts \
                     need macOS 10.13 or later"
                ));
            }
            MacosVersion::Unreadable => {}
        }
    }
    if let Some(release) = kernel_release(&root.join(KERNEL)) {
        let major = release.split('.').next().and_then(|m| m.parse().ok());
        match major.map(darwin_generation) {
            Some(Some(g)) => return Ok((g, format!("its kernel ({KERNEL}: Darwin {release})"))),
            Some(None) => {
                return Err(format!(
                    "the system there runs Darwin {release} (its {KERNEL}); the kexts need \
                     Darwin 17 (macOS 10.13) or later"
                ));
            }
            None => {}
        }
    }
    if let Some(p) = PRELINKED_KERNELS.iter().find(|p| root.join(p).is_file()) {
        return Ok((
            Generation::Kextcache,
            format!("its prelinked kernel ({p}) and no kext collections"),
        ));
    }
    Err(format!(
        "which kext tools the system there uses cannot be told: it has none of \
         System/Library/KernelCollections (macOS 11 and later), a macOS {SYSTEM_VERSION}, a \
         {KERNEL} with a Darwin version, a prelinked kernel ({}); name it with \
         --target-macos 10.15 (macOS 10.13-10.15 and PureDarwin) or --target-macos 13 (macOS \
         11 and later)",
        PRELINKED_KERNELS.join(", ")
    ))
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

/// Where the bundles go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The running system's `/Library/Extensions`: caches rebuilt, loaded, launchd jobs.
    Running,
    /// Another system's volume mounted at this root (`/Volumes/Guest`): files only, and
    /// that system's cache rebuild where this host can do it ([`cache_refresh`]); nothing of
    /// the running system is touched.
    Volume(PathBuf),
}

/// `KEXT_INSTALL_DIR` (unset: [`DEFAULT_DIR`]) as a destination: an absolute
/// `<volume>/Library/Extensions`, the volume's root being the part before it.
pub fn parse_dest(dir: &str) -> Result<Dest, String> {
    let bad = |why: &str| format!("KEXT_INSTALL_DIR={}: {why}", quote(dir));
    let example = "give <volume>/Library/Extensions, e.g. \
                   KEXT_INSTALL_DIR=/Volumes/Guest/Library/Extensions, or leave it unset for \
                   the running system's /Library/Extensions";
    let p = Path::new(dir);
    if !p.is_absolute() {
        return Err(bad(&format!("not an absolute path; {example}")));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => match s.to_str() {
                Some(s) => parts.push(s),
                None => return Err(bad("not UTF-8")),
            },
            _ => return Err(bad(&format!("`..` is not taken; {example}"))),
        }
    }
    let [volume @ .., "Library", "Extensions"] = parts.as_slice() else {
        return Err(bad(&format!(
            "does not end in /Library/Extensions, so the volume to rebuild the caches of \
             cannot be told; {example}"
        )));
    };
    match volume {
        [] => Ok(Dest::Running),
        ["System", ..] => Err(bad(&format!(
            "a folder of the running system's own volumes (/System/...); {example}"
        ))),
        _ => Ok(Dest::Volume(PathBuf::from(format!(
            "/{}",
            volume.join("/")
        )))),
    }
}

/// [`parse_dest`] of the environment, checked against the file system: a volume that is the
/// running system (`/Volumes/Macintosh HD` is a link to `/`) is [`Dest::Running`]; one that
/// is not there is refused.
fn dest_from_env() -> Result<(PathBuf, Dest), String> {
    let dir = std::env::var("KEXT_INSTALL_DIR").unwrap_or_else(|_| DEFAULT_DIR.into());
    let dest = match parse_dest(&dir)? {
        Dest::Volume(root) => match std::fs::canonicalize(&root) {
            Ok(c) if c == Path::new("/") => Dest::Running,
            Ok(_) => Dest::Volume(root),
            Err(e) => {
                return Err(format!(
                    "KEXT_INSTALL_DIR={}: the volume {} is not there ({e})",
                    quote(&dir),
                    quote(&path(&root))
                ));
            }
        },
        d => d,
    };
    Ok((PathBuf::from(dir), dest))
}

/// What a failing step means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFail {
    /// Stop: nothing after it is done (a copy, ownership, a file).
    Stop,
    /// Warn and go on; the verdict says so and the exit status is 1.
    Warn,
    /// Expected to fail at times (stopping a job that may not be loaded): say nothing.
    Ignore,
    /// A check that a launchd job is gone (`launchctl list <label>`): its failure is the
    /// expected outcome; its success (the job is still loaded) is a warning.
    JobGone,
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
    /// Nothing to run: what is known or kept (an identical bundle, what is loaded).
    Note,
    /// A command this host does not run: it is left for the system on another volume, to run
    /// there as root once that system is up.
    OnThatSystem(Vec<String>),
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

fn note(what: impl Into<String>) -> Step {
    Step {
        what: what.into(),
        action: Action::Note,
        on_fail: OnFail::Ignore,
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
            Action::Note => "(no command)".into(),
            Action::OnThatSystem(cmd) => format!(
                "(not run here; on that system, as root: {})",
                cmd.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
            ),
        }
    }
}

/// `w` quoted for a POSIX shell when it needs it.
pub fn quote(w: &str) -> String {
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
    /// Byte for byte the built bundle (same files, same contents). Owner and mode are not
    /// compared: the chown and chmod steps run for every bundle.
    Identical,
    Different,
}

/// What the kernel says about one bundle ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loaded {
    No,
    /// Loaded; its UUID when the listing shows one (10.13 and later do).
    Yes(Option<[u8; 16]>),
    /// The listing could not be run or read (why): treated as loaded, of an unknown build.
    Unknown(String),
}

/// A hyphenated UUID (`3A1B...-....-....-....-............`), any case.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn show_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The loaded state of `id` from the standard output of [`Generation::loaded_query`]
/// (which succeeded). A line naming `id` as a word is the kext (its UUID, if one of the
/// words is one); empty output or only a header (`Index Refs Address ...`) is "not
/// loaded"; anything else is not understood, so [`Loaded::Unknown`].
pub fn parse_loaded(id: &str, stdout: &str) -> Loaded {
    let mut other = None;
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.contains(&id) {
            return Loaded::Yes(words.iter().find_map(|w| parse_uuid(w)));
        }
        let known = words.is_empty()
            || words.first() == Some(&"Index")
            || line.trim() == "No variant specified, falling back to release";
        if !known && other.is_none() {
            other = Some(line.trim().chars().take(120).collect::<String>());
        }
    }
    match other {
        None => Loaded::No,
        Some(l) => Loaded::Unknown(format!("unexpected output: {}", quote(&l))),
    }
}

fn probe_loaded(tools: Generation, id: &str) -> Loaded {
    let cmd = tools.loaded_query(id);
    let shown = cmd.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ");
    match Command::new(&cmd[0]).args(&cmd[1..]).output() {
        Ok(o) if o.status.success() => parse_loaded(id, &String::from_utf8_lossy(&o.stdout)),
        Ok(o) => Loaded::Unknown(format!("`{shown}` failed ({})", o.status)),
        Err(e) => Loaded::Unknown(format!("could not run `{shown}`: {e}")),
    }
}

/// The `LC_UUID` of the Mach-O file at `p` (a kext's executable; at most 64 MiB is read).
pub fn macho_uuid(p: &Path) -> Option<[u8; 16]> {
    use object::Object;
    let len = std::fs::metadata(p).ok()?.len();
    if len > 64 << 20 {
        return None;
    }
    let data = std::fs::read(p).ok()?;
    object::File::parse(&*data).ok()?.mach_uuid().ok()?
}

/// One bundle: built at `src`, installed at `dst`.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub name: String,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub installed: Installed,
    /// The built executable's `LC_UUID`.
    pub built_uuid: Option<[u8; 16]>,
    pub loaded: Loaded,
}

/// What the kernel runs of ours, over every bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// None of our bundle IDs is loaded: the new build may be loaded now.
    NoneLoaded,
    /// Every one that is loaded is this build (its UUID is the built executable's).
    ThisBuild,
    /// At least one loaded kext is another build, or one whose build cannot be told (each
    /// said): the new build runs after a reboot.
    OtherBuild(Vec<String>),
    /// What is loaded could not be read (why): nothing is loaded now; reboot.
    Unknown(String),
}

pub fn kernel_state(bundles: &[Bundle]) -> Kernel {
    let mut other = Vec::new();
    let mut any = false;
    for b in bundles {
        match &b.loaded {
            Loaded::No => {}
            Loaded::Unknown(why) => return Kernel::Unknown(format!("{}: {why}", b.name)),
            Loaded::Yes(running) => {
                any = true;
                match (running, b.built_uuid) {
                    (Some(r), Some(u)) if *r == u => {}
                    (Some(r), Some(u)) => other.push(format!(
                        "{} (running {}, built {})",
                        b.name,
                        show_uuid(r),
                        show_uuid(&u)
                    )),
                    _ => other.push(format!("{} (which build could not be read)", b.name)),
                }
            }
        }
    }
    match (any, other.is_empty()) {
        (false, _) => Kernel::NoneLoaded,
        (true, true) => Kernel::ThisBuild,
        (true, false) => Kernel::OtherBuild(other),
    }
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

/// Refuses the console's launchd pieces with another volume: they are jobs of the running
/// system.
pub fn check_mode(mode: Mode, dest: &Dest) -> Result<(), String> {
    let Dest::Volume(root) = dest else {
        return Ok(());
    };
    let flag = match mode {
        Mode::Install { getty: Some(_), .. } => "--console-log --getty",
        Mode::Install {
            console_log: true, ..
        } => "--console-log",
        Mode::RemoveConsoleLog => "--remove-console-log",
        _ => return Ok(()),
    };
    Err(format!(
        "{flag} installs or removes launchd jobs of the running system, but KEXT_INSTALL_DIR \
         names another volume ({}): leave KEXT_INSTALL_DIR unset and run it on that system",
        quote(&path(root))
    ))
}

fn copy_steps(bundles: &[Bundle], steps: &mut Vec<Step>) {
    for b in bundles {
        let (src, dst, n) = (path(&b.src), path(&b.dst), &b.name);
        if b.installed == Installed::Identical {
            steps.push(note(format!(
                "{n}.kext: the installed copy is identical, kept"
            )));
        } else {
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
        }
        // Always (idempotent): an identical copy may still have the wrong owner or mode.
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
}

/// What is loaded, as the plan says it.
fn kernel_note(kernel: &Kernel) -> Step {
    note(match kernel {
        Kernel::NoneLoaded => "loaded now: none of them (they are loaded below)".to_string(),
        Kernel::ThisBuild => "loaded now: this build (nothing to load)".to_string(),
        Kernel::OtherBuild(v) => format!(
            "loaded now: another build of {} (never unloaded: the new build runs after a \
             reboot)",
            v.join(", ")
        ),
        Kernel::Unknown(why) => format!(
            "loaded now: unknown ({why}); nothing is loaded, the new build runs after a reboot"
        ),
    })
}

/// The steps, in order, for `tools` (on the running system `tools.target` is the host's own
/// generation). `bundles` lists the family first (the device kexts link against it). Nothing
/// is ever unloaded (see the module's documentation).
pub fn plan(tools: Tools, mode: Mode, dest: &Dest, bundles: &[Bundle], root: &Path) -> Vec<Step> {
    let mut steps = Vec::new();
    let kernel = kernel_state(bundles);
    let changed = bundles.iter().any(|b| b.installed != Installed::Identical);
    match (mode, dest) {
        (Mode::RemoveConsoleLog, Dest::Running) => steps.extend(console_log::remove_steps()),
        // Refused by `check_mode`.
        (Mode::RemoveConsoleLog, Dest::Volume(_)) => {}
        (Mode::Uninstall, _) => {
            if *dest == Dest::Running {
                // The jobs hold /dev/cu.virtio and /dev/tty.<port>: stopped first.
                steps.extend(console_log::remove_steps());
            }
            for b in bundles {
                steps.push(run_step(
                    format!("remove {}.kext", b.name),
                    &["rm", "-rf", &path(&b.dst)],
                    OnFail::Stop,
                ));
            }
            steps.push(cache_refresh(tools, dest, "without them"));
        }
        (Mode::Install { .. }, Dest::Volume(_)) => {
            copy_steps(bundles, &mut steps);
            steps.push(cache_refresh(tools, dest, "with them"));
        }
        (Mode::Install { console_log, getty }, Dest::Running) => {
            steps.push(kernel_note(&kernel));
            copy_steps(bundles, &mut steps);
            let load = kernel == Kernel::NoneLoaded;
            match tools.target {
                Generation::Kextcache => {
                    // The prelinked kernel: the kexts are there at boot and match in the
                    // same pass as AppleVirtIO (the probe score decides).
                    steps.push(cache_refresh(tools, dest, "with them"));
                    if let (true, Some((family, devices))) = (load, bundles.split_first()) {
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
                    if load && !bundles.is_empty() {
                        // One call: kmutil links them together. A kext not yet in a
                        // collection is staged by kernelmanagerd, which asks the user to
                        // approve a rebuild of the auxiliary kext collection (kmutil(8),
                        // load): that step is the collection rebuild, so no `kmutil install`
                        // is needed here.
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
                    } else if changed || kernel != Kernel::ThisBuild {
                        // A build is loaded (or that could not be read): `kmutil load` of
                        // the same bundle IDs would fail, and unloading is not an option.
                        // The auxiliary collection is rebuilt from /Library/Extensions
                        // instead, for the next boot (approval may be asked again).
                        steps.push(cache_refresh(tools, dest, "with the new build"));
                    }
                }
            }
            if console_log {
                steps.extend(console_log::install_steps(root, getty));
            }
        }
    }
    steps
}

/// The cache rebuild of `dest`'s system, with the tools of that system (`tools.target`):
/// 10.x `kextcache -i <volume root>`; 11+ on the running system `kmutil install
/// --update-all`, on another volume nothing (that system rebuilds its auxiliary collection
/// when it boots and the user approves). A 10.x volume on a macOS 11+ host gets nothing
/// either: that host's tools build kext collections, not a prelinked kernel for Darwin
/// 17-19, and the verdict says what to run on that system instead.
fn cache_refresh(tools: Tools, dest: &Dest, how: &str) -> Step {
    match (dest, tools.target, tools.host) {
        (Dest::Running, Generation::Kextcache, _) => run_step(
            format!("rebuild the prelinked kernel {how}"),
            &["kextcache", "-i", "/"],
            OnFail::Warn,
        ),
        (Dest::Running, Generation::Kmutil, _) => run_step(
            format!("rebuild the auxiliary kext collection {how}"),
            &["kmutil", "install", "--update-all"],
            OnFail::Warn,
        ),
        (Dest::Volume(r), Generation::Kextcache, Generation::Kextcache) => run_step(
            format!("rebuild that volume's prelinked kernel {how}"),
            &["kextcache", "-i", &path(r)],
            OnFail::Warn,
        ),
        (Dest::Volume(_), Generation::Kextcache, Generation::Kmutil) => Step {
            what: format!("that volume's prelinked kernel: NOT rebuilt {how}"),
            action: Action::OnThatSystem(words(&["kextcache", "-i", "/"])),
            on_fail: OnFail::Ignore,
        },
        (Dest::Volume(_), Generation::Kmutil, _) => note(format!(
            "auxiliary kext collection: rebuilt {how} when that system boots and the user \
             approves"
        )),
    }
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

/// `--target-macos` without `--dry-run` names the system on another volume; the running
/// system's kext tools are those of its own kernel.
pub fn check_target(target_given: bool, dry_run: bool, dest: &Dest) -> Result<(), String> {
    if target_given && !dry_run && *dest == Dest::Running {
        return Err(
            "--target-macos without --dry-run names the system on another volume \
             (KEXT_INSTALL_DIR=<volume>/Library/Extensions); the running system's kext tools \
             are those of its own kernel (uname -r): drop --target-macos, or add --dry-run to \
             print the plan for another version"
                .into(),
        );
    }
    Ok(())
}

/// The generation of the system on the volume at `root` and what told it:
/// `--target-macos` when given (`given`: its text and generation; the volume's own
/// evidence is mentioned when it disagrees), else [`volume_generation`].
pub fn volume_target(
    root: &Path,
    given: Option<(&str, Generation)>,
) -> Result<(Generation, String), String> {
    let seen = volume_generation(root);
    let Some((text, g)) = given else {
        return seen;
    };
    let mut by = format!("--target-macos {}", quote(text));
    if let Ok((other, evidence)) = seen
        && other != g
    {
        by.push_str(&format!(
            "; the volume itself looks like {}, by {evidence}",
            other.name()
        ));
    }
    Ok((g, by))
}

fn print_plan(heading: &str, steps: &[Step]) {
    println!("  {heading}:");
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
    let (dir, dest) = dest_from_env()?;
    check_mode(mode, &dest)?;
    check_target(target.is_some(), o.dry_run, &dest)?;
    // Another volume: the kext tools of the system on it, not this host's.
    let volume = match &dest {
        Dest::Running => None,
        Dest::Volume(r) => {
            let given = o.target_macos.as_deref().zip(target);
            Some(
                volume_target(r, given)
                    .map_err(|e| format!("KEXT_INSTALL_DIR={}: {e}", quote(&path(&dir))))?,
            )
        }
    };
    let built = root.join("target/kexts");
    let host = host_generation();
    // What is loaded is read from this kernel, with its own tools, for the running system
    // only (and not for a dry run's --target-macos of another generation).
    let probe = match (host, &dest, mode) {
        (Some(h), Dest::Running, Mode::Install { .. }) if target.is_none_or(|t| t == h) => Some(h),
        _ => None,
    };
    // `present` lists the family first: the device kexts link against it.
    let bundles: Vec<Bundle> = kexts::present(&root)
        .into_iter()
        .map(|k| {
            let name = format!("{}.kext", k.name);
            let (src, dst) = (built.join(&name), dir.join(&name));
            let installed = if !dst.exists() {
                Installed::Absent
            } else if same_tree(&src, &dst) {
                Installed::Identical
            } else {
                Installed::Different
            };
            let id = k.bundle_id();
            Bundle {
                name: k.name.to_string(),
                built_uuid: macho_uuid(&src.join("Contents/MacOS").join(k.name)),
                loaded: probe.map_or(Loaded::No, |g| probe_loaded(g, &id)),
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

    if o.dry_run {
        let both = [Generation::Kextcache, Generation::Kmutil];
        let plans: Vec<(String, Tools)> = match (&volume, target, host) {
            (Some((t, _)), _, Some(h)) => vec![(
                format!("on this host, {}", h.label()),
                Tools {
                    host: h,
                    target: *t,
                },
            )],
            (Some((t, _)), _, None) => both
                .iter()
                .map(|&h| {
                    (
                        format!("on a host running {}", h.label()),
                        Tools {
                            host: h,
                            target: *t,
                        },
                    )
                })
                .collect(),
            (None, Some(g), _) | (None, None, Some(g)) => {
                vec![(format!("for {}", g.label()), Tools::same(g))]
            }
            // The same on every system.
            (None, None, None) if mode == Mode::RemoveConsoleLog => vec![(
                "for every macOS and PureDarwin".into(),
                Tools::same(Generation::Kmutil),
            )],
            (None, None, None) => {
                println!(
                    "this host is not Darwin: both plans follow (one only: --target-macos \
                     10.15 or --target-macos 13, say)"
                );
                both.iter()
                    .map(|&g| (format!("for {}", g.label()), Tools::same(g)))
                    .collect()
            }
        };
        let on = match &dest {
            Dest::Running => String::new(),
            Dest::Volume(r) => format!(
                "; another volume, {}: files only, nothing loaded, no launchd job",
                quote(&path(r))
            ),
        };
        match mode {
            Mode::Install { .. } => println!(
                "install plan ({} bundles from {} to {}{on}):",
                bundles.len(),
                built.display(),
                dir.display()
            ),
            Mode::RemoveConsoleLog => {
                println!("removal plan (the console log daemon and login prompt; the kexts stay):")
            }
            Mode::Uninstall => println!(
                "uninstall plan ({} bundles in {}{on}):",
                bundles.len(),
                dir.display()
            ),
        }
        if probe.is_none() && dest == Dest::Running && matches!(mode, Mode::Install { .. }) {
            println!(
                "  (what is loaded is read on the system itself; planned here as if none of \
                 them were loaded)"
            );
        }
        if let Some((t, by)) = &volume {
            println!("  that volume's system: {}, told by {by}", t.label());
        }
        let mut planned: Vec<(String, Vec<Step>)> = plans
            .into_iter()
            .map(|(heading, tools)| (heading, plan(tools, mode, &dest, &bundles, &root)))
            .collect();
        if let [(_, a), (_, b)] = planned.as_slice()
            && a == b
        {
            // Another volume's plan that does not depend on the host.
            let steps = planned.swap_remove(0).1;
            planned = vec![("on any macOS or PureDarwin host".into(), steps)];
        } else if volume.is_some() && host.is_none() {
            println!("  this host is not Darwin: the plan from each kind of Darwin host follows");
        }
        let mut counts = Vec::new();
        for (heading, steps) in &planned {
            counts.push(steps.len().to_string());
            print_plan(heading, steps);
        }
        if !unlinked.is_empty() {
            // Nothing half-installable: a plan with a bundle that cannot load is a failure.
            return Err(format!(
                "not installable: no linked executable in {} (run `cargo xtask kexts` with a \
                 Kernel SDK: KERNEL_SDK=<path>, or `cargo xtask kexts --fetch-sdk`)",
                unlinked.join(", ")
            ));
        }
        let how = match dest {
            Dest::Running => {
                "on the VM: `install` as root, docs/install.md, with the same flags but \
                 --dry-run and --target-macos"
            }
            Dest::Volume(_) if host.is_some() => {
                "to run it: the same command as root, without --dry-run"
            }
            Dest::Volume(_) => {
                "to run it: the same command as root, without --dry-run, on a macOS or \
                 PureDarwin host with that volume mounted"
            }
        };
        println!(
            "dry run: {} steps planned, nothing changed ({how})",
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
            "run it as root (docs/install.md: `sudo -E env \"PATH=$PATH\" cargo \
                    xtask install`, or `cargo build -p xtask` then `sudo ./target/debug/xtask \
                    install`)"
                .into(),
        );
    }
    let tools = match &volume {
        None => Tools::same(tools),
        Some((t, by)) => {
            println!("install: that volume's system: {}, told by {by}", t.label());
            Tools {
                host: tools,
                target: *t,
            }
        }
    };
    let steps = plan(tools, mode, &dest, &bundles, &root);
    execute(tools, mode, &dest, &kernel_state(&bundles), &steps)
}

/// Runs the steps and ends with the verdict.
fn execute(
    tools: Tools,
    mode: Mode,
    dest: &Dest,
    kernel: &Kernel,
    steps: &[Step],
) -> Result<bool, String> {
    let mut load_failed = false;
    let mut loads = 0;
    let mut warnings: Vec<String> = Vec::new();
    for s in steps {
        let cmd = match &s.action {
            Action::Note => {
                println!("install: {}", s.what);
                continue;
            }
            Action::OnThatSystem(_) => {
                println!("install: {} {}", s.what, s.shown());
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
        // A failure that is the expected outcome ("not loaded") is not shown.
        let quiet = !ok && matches!(s.on_fail, OnFail::Ignore | OnFail::JobGone);
        if !text.is_empty() && !quiet {
            for line in text.lines() {
                println!("    {line}");
            }
        }
        if s.on_fail == OnFail::Load {
            loads += 1;
        }
        match (ok, s.on_fail) {
            (true, OnFail::JobGone) => {
                warnings.push(format!("`{}`: the job is still loaded", s.shown()))
            }
            (true, _) | (false, OnFail::Ignore | OnFail::JobGone) => {}
            (false, OnFail::Stop) => {
                return Err(format!("`{}` failed; nothing after it was done", s.shown()));
            }
            (false, OnFail::Warn) => warnings.push(format!("`{}` failed", s.shown())),
            (false, OnFail::Load) => load_failed = true,
        }
    }

    // The verdict, last.
    for w in &warnings {
        println!("warning: {w}");
    }
    println!(
        "{}",
        verdict(
            tools,
            mode,
            dest,
            kernel,
            loads,
            load_failed,
            warnings.len()
        )
    );
    Ok(warnings.is_empty())
}

/// The last line: what was done and what is left to do.
fn verdict(
    tools: Tools,
    mode: Mode,
    dest: &Dest,
    kernel: &Kernel,
    loads: usize,
    load_failed: bool,
    warnings: usize,
) -> String {
    let failed = match warnings {
        0 => String::new(),
        1 => " (but 1 step failed: see the warning above)".into(),
        n => format!(" (but {n} steps failed: see the warnings above)"),
    };
    if let Dest::Volume(r) = dest {
        return volume_verdict(tools, mode, &quote(&path(r)), warnings, &failed);
    }
    let tools = tools.target;
    let check = format!(
        "`{}` and `ioreg -l -w0 -r -c org_virtiodarwin_VirtioPCITransport`",
        tools.showloaded()
    );
    match mode {
        Mode::RemoveConsoleLog => format!("console log daemon and login prompt removed{failed}"),
        Mode::Uninstall => format!(
            "uninstalled{failed}: reboot now (nothing is unloaded: until the reboot the kernel \
             keeps running them); after it, `{}` shows nothing of ours",
            tools.showloaded()
        ),
        Mode::Install { .. } => match kernel {
            Kernel::ThisBuild => {
                format!(
                    "installed{failed}; already running this build (same UUIDs); check with {check}"
                )
            }
            Kernel::OtherBuild(v) => format!(
                "installed{failed}; an older build is running ({}): reboot to run the new \
                 one (approval may be asked first: {}); then check with {check}",
                v.join(", "),
                tools.approval()
            ),
            Kernel::Unknown(why) => format!(
                "installed{failed}, not loaded now: what is loaded could not be read ({why}); \
                 reboot to run the new build, then check with {check}"
            ),
            Kernel::NoneLoaded => {
                let boot = match tools {
                    Generation::Kextcache => {
                        "they are in the prelinked kernel: reboot, so they take the virtio \
                         devices at boot (a runtime load does not take a device AppleVirtIO \
                         already drives)"
                    }
                    Generation::Kmutil => {
                        "no need to re-run this command after the reboot: the auxiliary kext \
                         collection holds them, loaded once the system is up (not in time for \
                         its boot disk; a device AppleVirtIO already drives stays with it)"
                    }
                };
                if load_failed {
                    format!(
                        "installed{failed}, not loaded now: approval and a reboot may be \
                         needed: {}, then reboot; {boot}; then check with {check}",
                        tools.approval()
                    )
                } else if loads > 0 {
                    let then = match tools {
                        Generation::Kextcache => format!("; {boot}"),
                        Generation::Kmutil => {
                            "; a device AppleVirtIO already drives stays with it".to_string()
                        }
                    };
                    format!("installed and loaded{failed}{then}; check with {check}")
                } else {
                    format!("installed{failed}; check with {check}")
                }
            }
        },
    }
}

/// The last line for another volume `r`: whether that system's caches hold what was done,
/// and if not, what to run and where. With a 10.x system, the only step that can warn is
/// its `kextcache -i`, so a warning means its prelinked kernel was not rebuilt.
fn volume_verdict(tools: Tools, mode: Mode, r: &str, warnings: usize, failed: &str) -> String {
    let why = match tools.host {
        Generation::Kmutil => {
            "this host runs macOS 11 or later, whose kext tools build kext collections, not \
             a prelinked kernel for macOS 10.13-10.15 or PureDarwin"
        }
        Generation::Kextcache => "`kextcache -i` failed: see the warning above",
    };
    let rebuilt = tools.host == Generation::Kextcache && warnings == 0;
    let or_here = match tools.host {
        Generation::Kmutil => ", or run this install from a macOS 10.13-10.15 or PureDarwin host",
        Generation::Kextcache => "",
    };
    match (mode, tools.target) {
        (Mode::Uninstall, Generation::Kextcache) if rebuilt => {
            format!("removed from {r}; its prelinked kernel was rebuilt without them")
        }
        (Mode::Uninstall, Generation::Kextcache) => format!(
            "removed from {r}, but its prelinked kernel was NOT rebuilt and still holds them \
             ({why}): on that system, once it is up, run `sudo kextcache -i /` and reboot it"
        ),
        (Mode::Uninstall, Generation::Kmutil) => format!(
            "removed from {r}{failed}; that system drops them from its auxiliary kext \
             collection when it boots"
        ),
        (_, Generation::Kextcache) if rebuilt => format!(
            "copied to {r}; its prelinked kernel holds them: boot that system (nothing was \
             loaded here)"
        ),
        (_, Generation::Kextcache) => format!(
            "copied to {r}, but they are NOT yet in its prelinked kernel ({why}); boot that \
             system (it starts without them, so not from a virtio disk), run `sudo kextcache \
             -i /` on it and reboot it{or_here} (nothing was loaded here)"
        ),
        (_, Generation::Kmutil) => format!(
            "copied to {r}{failed}; they are NOT yet in that system's auxiliary kext \
             collection: it is rebuilt when that system boots and the user approves ({}), \
             then reboot it once more (nothing was loaded here)",
            Generation::Kmutil.approval()
        ),
    }
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
    const NAMES: [&str; 3] = ["VirtioFamily", "VirtioNet", "VirtioBlock"];
    const BUILT: [u8; 16] = [0x11; 16];
    const OLDER: [u8; 16] = [0x22; 16];

    fn bundles_in(dir: &str, states: &[Installed], loaded: &[Loaded]) -> Vec<Bundle> {
        NAMES
            .iter()
            .zip(states)
            .zip(loaded)
            .map(|((n, &installed), loaded)| Bundle {
                name: n.to_string(),
                src: PathBuf::from(format!("/src/target/kexts/{n}.kext")),
                dst: PathBuf::from(format!("{dir}/{n}.kext")),
                installed,
                built_uuid: Some(BUILT),
                loaded: loaded.clone(),
            })
            .collect()
    }

    fn bundles(states: &[Installed]) -> Vec<Bundle> {
        bundles_in(DEFAULT_DIR, states, &[Loaded::No, Loaded::No, Loaded::No])
    }

    fn loaded(l: [Loaded; 3]) -> Vec<Bundle> {
        bundles_in(DEFAULT_DIR, &[Installed::Different; 3], &l)
    }

    fn shown(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.shown()).collect()
    }

    fn index(cmds: &[String], prefix: &str) -> usize {
        cmds.iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in {cmds:#?}"))
    }

    fn has(cmds: &[String], part: &str) -> bool {
        cmds.iter().any(|c| c.contains(part))
    }

    const INSTALL: Mode = Mode::Install {
        console_log: false,
        getty: None,
    };
    const CONSOLE: Mode = Mode::Install {
        console_log: true,
        getty: Some("org.virtiodarwin.login"),
    };
    const ALL_MODES: [Mode; 4] = [INSTALL, CONSOLE, Mode::Uninstall, Mode::RemoveConsoleLog];

    fn root() -> &'static Path {
        Path::new("/src")
    }

    #[test]
    fn fresh_install_copies_then_loads_family_first() {
        let b = bundles(&[Installed::Absent; 3]);
        assert_eq!(kernel_state(&b), Kernel::NoneLoaded);
        let old = shown(&plan(
            Tools::same(Generation::Kextcache),
            INSTALL,
            &Dest::Running,
            &b,
            root(),
        ));
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
        assert!(!has(&old, "kmutil"));

        let new = shown(&plan(
            Tools::same(Generation::Kmutil),
            INSTALL,
            &Dest::Running,
            &b,
            root(),
        ));
        let loads: Vec<&String> = new.iter().filter(|c| c.contains(" load")).collect();
        assert_eq!(
            loads,
            ["kmutil load -p /Library/Extensions/VirtioFamily.kext -p \
                 /Library/Extensions/VirtioNet.kext -p /Library/Extensions/VirtioBlock.kext"],
            "one kmutil call, family first"
        );
        assert!(!has(&new, "kextcache") && !has(&new, "kextutil"));
        assert!(
            !has(&new, "kmutil install"),
            "the load stages the collection"
        );
        for g in GENS {
            let p = plan(Tools::same(g), INSTALL, &Dest::Running, &b, root());
            // Loads may fail (approval): never a step that stops the rest.
            assert!(
                p.iter()
                    .filter(|s| s.shown().contains("load"))
                    .all(|s| s.on_fail == OnFail::Load)
            );
            let c = shown(&p);
            for n in NAMES {
                let dst = format!("/Library/Extensions/{n}.kext");
                let rm = index(&c, &format!("rm -rf {dst}"));
                assert!(rm < index(&c, &format!("cp -R /src/target/kexts/{n}.kext {dst}")));
                assert!(rm < index(&c, &format!("chown -R root:wheel {dst}")));
            }
        }
    }

    /// No plan, in any mode, state or destination, ever unloads a kext.
    #[test]
    fn nothing_ever_unloads() {
        let states = [
            [Loaded::No, Loaded::No, Loaded::No],
            [Loaded::Yes(Some(OLDER)), Loaded::Yes(None), Loaded::No],
            [Loaded::Unknown("x".into()), Loaded::No, Loaded::No],
        ];
        let dests = [Dest::Running, Dest::Volume("/Volumes/Guest".into())];
        for l in states {
            for installed in [
                Installed::Absent,
                Installed::Identical,
                Installed::Different,
            ] {
                let b = bundles_in(DEFAULT_DIR, &[installed; 3], &l);
                for (g, mode, dest) in GENS
                    .iter()
                    .flat_map(|g| ALL_MODES.iter().map(move |m| (*g, *m)))
                    .flat_map(|(g, m)| dests.iter().map(move |d| (g, m, d)))
                {
                    let c = shown(&plan(Tools::same(g), mode, dest, &b, root()));
                    assert!(!has(&c, "unload"), "{c:#?}");
                }
            }
        }
    }

    #[test]
    fn identical_bundles_are_kept_but_their_owner_and_mode_are_set() {
        let b = bundles(&[
            Installed::Identical,
            Installed::Different,
            Installed::Identical,
        ]);
        for g in GENS {
            let c = shown(&plan(Tools::same(g), INSTALL, &Dest::Running, &b, root()));
            assert_eq!(c.iter().filter(|c| c.starts_with("cp -R")).count(), 1);
            assert!(has(&c, "cp -R /src/target/kexts/VirtioNet.kext"));
            for n in NAMES {
                let dst = format!("/Library/Extensions/{n}.kext");
                index(&c, &format!("chown -R root:wheel {dst}"));
                index(&c, &format!("chmod -R go-w {dst}"));
            }
        }
    }

    /// The last line after a fresh install promises boot-time matching only where the kexts
    /// are in the prelinked kernel (10.13-10.15, PureDarwin); on 11+ it says that they come
    /// after the system is up and leave a device AppleVirtIO drives alone.
    #[test]
    fn verdicts_promise_boot_time_matching_only_on_10x() {
        let none = Kernel::NoneLoaded;
        for (loads, failed) in [(1, false), (1, true)] {
            let old = verdict(
                Tools::same(Generation::Kextcache),
                INSTALL,
                &Dest::Running,
                &none,
                loads,
                failed,
                0,
            );
            assert!(old.contains("take the virtio devices at boot"), "{old}");
            let new = verdict(
                Tools::same(Generation::Kmutil),
                INSTALL,
                &Dest::Running,
                &none,
                loads,
                failed,
                0,
            );
            assert!(!new.contains("at boot"), "{new}");
            assert!(
                new.contains("a device AppleVirtIO already drives stays with it"),
                "{new}"
            );
        }
    }

    /// A loaded build (of any UUID, or one that cannot be read) is left alone: no load, the
    /// caches rebuilt for the next boot, and the verdict says to reboot.
    #[test]
    fn a_loaded_build_is_not_loaded_again() {
        let older = loaded([Loaded::Yes(Some(OLDER)), Loaded::No, Loaded::No]);
        let Kernel::OtherBuild(v) = kernel_state(&older) else {
            panic!("{:?}", kernel_state(&older))
        };
        assert!(v[0].contains("VirtioFamily") && v[0].contains(&show_uuid(&OLDER)));
        let unread = loaded([Loaded::No, Loaded::Yes(None), Loaded::No]);
        assert!(matches!(kernel_state(&unread), Kernel::OtherBuild(_)));
        let unknown = loaded([Loaded::No, Loaded::No, Loaded::Unknown("odd".into())]);
        assert!(matches!(kernel_state(&unknown), Kernel::Unknown(w) if w.contains("odd")));
        for b in [&older, &unread, &unknown] {
            let old = shown(&plan(
                Tools::same(Generation::Kextcache),
                INSTALL,
                &Dest::Running,
                b,
                root(),
            ));
            assert!(!has(&old, "kextutil"), "{old:#?}");
            index(&old, "kextcache -i /");
            let new = shown(&plan(
                Tools::same(Generation::Kmutil),
                INSTALL,
                &Dest::Running,
                b,
                root(),
            ));
            assert!(!has(&new, "kmutil load"), "{new:#?}");
            assert!(index(&new, "chmod") < index(&new, "kmutil install --update-all"));
            for g in GENS {
                let v = verdict(
                    Tools::same(g),
                    INSTALL,
                    &Dest::Running,
                    &kernel_state(b),
                    0,
                    false,
                    0,
                );
                assert!(v.contains("reboot"), "{v}");
                assert!(!v.contains("installed and loaded"), "{v}");
            }
        }
        let v = verdict(
            Tools::same(Generation::Kmutil),
            INSTALL,
            &Dest::Running,
            &kernel_state(&older),
            0,
            false,
            0,
        );
        assert!(v.contains("an older build is running"), "{v}");
        // This build running, nothing changed: nothing to load, no collection rebuild.
        let same = bundles_in(
            DEFAULT_DIR,
            &[Installed::Identical; 3],
            &[
                Loaded::Yes(Some(BUILT)),
                Loaded::Yes(Some(BUILT)),
                Loaded::No,
            ],
        );
        assert_eq!(kernel_state(&same), Kernel::ThisBuild);
        let new = shown(&plan(
            Tools::same(Generation::Kmutil),
            INSTALL,
            &Dest::Running,
            &same,
            root(),
        ));
        assert!(!has(&new, "kmutil"), "{new:#?}");
        let old = shown(&plan(
            Tools::same(Generation::Kextcache),
            INSTALL,
            &Dest::Running,
            &same,
            root(),
        ));
        assert!(!has(&old, "kextutil"));
        let v = verdict(
            Tools::same(Generation::Kextcache),
            INSTALL,
            &Dest::Running,
            &Kernel::ThisBuild,
            0,
            false,
            0,
        );
        assert!(v.contains("already running this build"), "{v}");
    }

    #[test]
    fn loaded_listings_are_read_defensively() {
        let id = "org.virtiodarwin.driver.VirtioNet";
        // kextstat -l -b (10.13+: the UUID after the version).
        let line = "  151    0 0xffffff7f83a5e000 0x9000     0x9000     \
                    org.virtiodarwin.driver.VirtioNet (0.1.0) \
                    6F1D2C3B-4A59-3E2F-8D7C-0B1A29384756 <150 7 5 4 3 1>\n";
        let u = parse_uuid("6F1D2C3B-4A59-3E2F-8D7C-0B1A29384756").unwrap();
        assert_eq!(parse_loaded(id, line), Loaded::Yes(Some(u)));
        assert_eq!(show_uuid(&u), "6F1D2C3B-4A59-3E2F-8D7C-0B1A29384756");
        assert_eq!(
            parse_uuid("6f1d2c3b-4a59-3e2f-8d7c-0b1a29384756"),
            Some(u),
            "any case"
        );
        // kmutil showloaded: a header, then the line.
        let kmutil = format!(
            "Index Refs Address            Size       Wired      Name (Version) UUID <Linked \
             Against>\n{line}"
        );
        assert_eq!(parse_loaded(id, &kmutil), Loaded::Yes(Some(u)));
        // Before 10.13, or a line without one: loaded, build unknown.
        assert_eq!(
            parse_loaded(
                id,
                "  151 0 0xff 0x9 0x9 org.virtiodarwin.driver.VirtioNet (0.1.0) <1>"
            ),
            Loaded::Yes(None)
        );
        for none in [
            "",
            "\n\n",
            "Index Refs Address Size Wired Name (Version) UUID\n",
        ] {
            assert_eq!(parse_loaded(id, none), Loaded::No, "{none:?}");
        }
        // Another kext whose ID starts with ours is not ours; unknown text is "unknown".
        for odd in [
            "  151 0 0xff 0x9 0x9 org.virtiodarwin.driver.VirtioNetX (0.1.0)",
            "Error: something changed",
            "\u{feff}\u{0}ünïcödé",
        ] {
            assert!(
                matches!(parse_loaded(id, odd), Loaded::Unknown(_)),
                "{odd:?}"
            );
        }
        let long = "x".repeat(100_000);
        let Loaded::Unknown(why) = parse_loaded(id, &long) else {
            panic!()
        };
        assert!(why.len() < 200, "bounded: {}", why.len());
        for bad in [
            "",
            "6F1D2C3B",
            "6F1D2C3B-4A59-3E2F-8D7C-0B1A2938475G",
            "é-é-é-é-é",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }

    #[test]
    fn macho_uuid_reads_lc_uuid() {
        let tmp = std::env::temp_dir().join(format!("virtio-install-uuid-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // mach_header_64 (x86_64, MH_KEXT_BUNDLE), one LC_UUID.
        let mut m = Vec::new();
        for w in [0xfeed_facfu32, 0x0100_0007, 3, 0xb, 1, 24, 0, 0, 0x1b, 24] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m.extend_from_slice(&BUILT);
        let f = tmp.join("X");
        std::fs::write(&f, &m).unwrap();
        assert_eq!(macho_uuid(&f), Some(BUILT));
        std::fs::write(&f, &m[..40]).unwrap();
        assert_eq!(macho_uuid(&f), None, "truncated");
        std::fs::write(&f, b"not a Mach-O").unwrap();
        assert_eq!(macho_uuid(&f), None);
        assert_eq!(macho_uuid(&tmp.join("absent")), None);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn install_dirs() {
        assert_eq!(parse_dest("/Library/Extensions"), Ok(Dest::Running));
        assert_eq!(parse_dest("/Library/Extensions/"), Ok(Dest::Running));
        assert_eq!(
            parse_dest("/Volumes/Guest HD/Library/Extensions"),
            Ok(Dest::Volume("/Volumes/Guest HD".into()))
        );
        for bad in [
            "/Volumes/Guest/Extensions",
            "/Volumes/Guest",
            "Library/Extensions",
            "/Volumes/Guest/../x/Library/Extensions",
            "/System/Library/Extensions",
            "/System/Volumes/Data/Library/Extensions",
            "/tmp/it's/kexts",
        ] {
            let e = parse_dest(bad).unwrap_err();
            assert!(e.starts_with("KEXT_INSTALL_DIR="), "{e}");
            assert!(!e.contains('"'), "shell quoting, not Rust escaping: {e}");
        }
        assert!(
            parse_dest("/tmp/it's/kexts")
                .unwrap_err()
                .contains(r"'/tmp/it'\''s/kexts'")
        );
    }

    /// Another volume: files, and on 10.x that volume's prelinked kernel; nothing loaded,
    /// nothing of the running system (caches, kernel, launchd) touched.
    #[test]
    fn another_volume_gets_files_only() {
        let dir = "/Volumes/Guest/Library/Extensions";
        let vol = Dest::Volume("/Volumes/Guest".into());
        let b = bundles_in(
            dir,
            &[Installed::Absent; 3],
            &[Loaded::No, Loaded::No, Loaded::No],
        );
        for mode in [INSTALL, Mode::Uninstall] {
            for g in GENS {
                let p = plan(Tools::same(g), mode, &vol, &b, root());
                let c = shown(&p);
                for word in ["kextutil", "kmutil", "launchctl", "kextstat"] {
                    assert!(!has(&c, word), "{word}: {c:#?}");
                }
                assert!(c.iter().all(|c| !c.ends_with("kextcache -i /")));
                let runs: Vec<&String> = p
                    .iter()
                    .filter(|s| matches!(s.action, Action::Run(_)))
                    .map(|s| &c[p.iter().position(|x| x == s).unwrap()])
                    .collect();
                assert!(
                    runs.iter().all(|r| r.contains("/Volumes/Guest")),
                    "{runs:#?}"
                );
                match g {
                    Generation::Kextcache => {
                        assert_eq!(c.last().unwrap(), "kextcache -i /Volumes/Guest")
                    }
                    Generation::Kmutil => {
                        assert!(p.last().unwrap().what.contains("when that system boots"))
                    }
                }
            }
        }
        let v = verdict(
            Tools::same(Generation::Kmutil),
            INSTALL,
            &vol,
            &Kernel::NoneLoaded,
            0,
            false,
            0,
        );
        assert!(
            v.contains("rebuilt when that system boots and the user approves"),
            "{v}"
        );
        // The console's launchd pieces are the running system's: refused, naming the flag
        // and the variable.
        assert_eq!(check_mode(INSTALL, &vol), Ok(()));
        assert_eq!(check_mode(Mode::Uninstall, &vol), Ok(()));
        assert_eq!(check_mode(CONSOLE, &Dest::Running), Ok(()));
        for (mode, flag) in [
            (
                Mode::Install {
                    console_log: true,
                    getty: None,
                },
                "--console-log",
            ),
            (CONSOLE, "--getty"),
            (Mode::RemoveConsoleLog, "--remove-console-log"),
        ] {
            let e = check_mode(mode, &vol).unwrap_err();
            assert!(e.contains(flag) && e.contains("KEXT_INSTALL_DIR"), "{e}");
        }
    }

    /// A temporary tree shaped like a mounted volume: `files` (relative path, contents),
    /// `dirs` (relative paths).
    fn volume_tree(name: &str, dirs: &[&str], files: &[(&str, &[u8])]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("virtio-install-vol-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (f, contents) in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, contents).unwrap();
        }
        root
    }

    fn system_version(name: &str, version: &str) -> Vec<u8> {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n\
             \t<key>ProductName</key>\n\t<string>{name}</string>\n\
             \t<key>ProductVersion</key>\n\t<string>{version}</string>\n</dict>\n</plist>\n"
        )
        .into_bytes()
    }

    /// A kernel image as far as its version string goes.
    fn kernel_image(release: &str) -> Vec<u8> {
        let mut k = vec![0xcf, 0xfa, 0xed, 0xfe, 0, 0, 0, 0];
        k.extend(std::iter::repeat_n(0x90u8, 4096));
        k.extend_from_slice(
            format!(
                "Darwin Kernel Version {release}: Thu Jun 21 22:53:14 PDT 2018; \
                 root:xnu-4570.71.2~1/RELEASE_X86_64\0"
            )
            .as_bytes(),
        );
        k.extend(std::iter::repeat_n(0u8, 512));
        k
    }

    /// The generation of another volume's system comes from the volume, whatever the host.
    #[test]
    fn volume_generation_is_read_from_the_volume() {
        let sv = SYSTEM_VERSION;
        let kernel = KERNEL;
        let prelinked = PRELINKED_KERNELS[0];
        let (mac13, mac10_15) = (
            system_version("macOS", "13.6.1"),
            system_version("Mac OS X", "10.15.7"),
        );
        /// A volume: its name, folders, files, the generation and the evidence expected.
        type Case<'a> = (
            &'a str,
            Vec<&'a str>,
            Vec<(&'a str, Vec<u8>)>,
            Generation,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            // macOS 11+: kext collections, even next to a prelinked kernel and a kernel.
            (
                "mac13",
                vec!["System/Library/KernelCollections"],
                vec![
                    (sv, mac13.clone()),
                    (prelinked, b"x".to_vec()),
                    (kernel, kernel_image("22.6.0")),
                ],
                Generation::Kmutil,
                "KernelCollections",
            ),
            // A macOS 11+ data volume: the auxiliary collection's folder.
            (
                "data",
                vec!["Library/KernelCollections", "Library/Extensions"],
                vec![],
                Generation::Kmutil,
                "Library/KernelCollections",
            ),
            // macOS 11 by its SystemVersion.plist alone.
            (
                "mac11",
                vec![],
                vec![(sv, system_version("macOS", "11.7"))],
                Generation::Kmutil,
                "macOS 11.7",
            ),
            (
                "mac10_15",
                vec![],
                vec![(sv, mac10_15.clone()), (prelinked, b"x".to_vec())],
                Generation::Kextcache,
                "Mac OS X 10.15.7",
            ),
            // PureDarwin without SystemVersion.plist: its kernel's Darwin release.
            (
                "pd-kernel",
                vec![],
                vec![(kernel, kernel_image("17.7.0"))],
                Generation::Kextcache,
                "Darwin 17.7.0",
            ),
            // A SystemVersion.plist that is not macOS's is not read as a macOS version
            // (17.4 would otherwise be "11 and later").
            (
                "pd-named",
                vec![],
                vec![
                    (sv, system_version("PureDarwin", "17.4")),
                    (kernel, kernel_image("17.4.0")),
                ],
                Generation::Kextcache,
                "Darwin 17.4.0",
            ),
            // Only a prelinked kernel (in the older cache folder).
            (
                "pd-cache",
                vec![],
                vec![(PRELINKED_KERNELS[1], b"x".to_vec())],
                Generation::Kextcache,
                "com.apple.kext.caches",
            ),
            // A kernel with no version string: the prelinked kernel decides.
            (
                "pd-stripped",
                vec![],
                vec![(kernel, vec![0; 64]), (prelinked, b"x".to_vec())],
                Generation::Kextcache,
                "prelinked kernel",
            ),
        ];
        for (name, dirs, files, want, evidence) in cases {
            let files: Vec<(&str, &[u8])> = files.iter().map(|(f, c)| (*f, c.as_slice())).collect();
            let root = volume_tree(name, &dirs, &files);
            let (g, by) = volume_generation(&root).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(g, want, "{name}: {by}");
            assert!(by.contains(evidence), "{name}: {by}");
            let _ = std::fs::remove_dir_all(&root);
        }
        // A binary SystemVersion.plist reads the same.
        let root = volume_tree("binary", &[], &[]);
        let mut d = plist::Dictionary::new();
        d.insert("ProductName".into(), "Mac OS X".into());
        d.insert("ProductVersion".into(), "10.14.6".into());
        std::fs::create_dir_all(root.join("System/Library/CoreServices")).unwrap();
        plist::Value::Dictionary(d)
            .to_file_binary(root.join(sv))
            .unwrap();
        assert_eq!(
            volume_generation(&root).map(|(g, _)| g),
            Ok(Generation::Kextcache)
        );
        let _ = std::fs::remove_dir_all(&root);

        // Too old, and nothing to tell: refused, saying why and what to give.
        for (name, files, says) in [
            (
                "mac10_12",
                vec![(sv, system_version("Mac OS X", "10.12.6"))],
                "10.13",
            ),
            (
                "darwin16",
                vec![(kernel, kernel_image("16.7.0"))],
                "Darwin 17",
            ),
            ("empty", vec![], "--target-macos"),
            (
                "garbage",
                vec![
                    (sv, b"not a plist".to_vec()),
                    (kernel, b"no version".to_vec()),
                ],
                "--target-macos",
            ),
        ] {
            let files: Vec<(&str, &[u8])> = files.iter().map(|(f, c)| (*f, c.as_slice())).collect();
            let root = volume_tree(name, &[], &files);
            let e = volume_generation(&root).unwrap_err();
            assert!(e.contains(says), "{name}: {e}");
            let _ = std::fs::remove_dir_all(&root);
        }
    }

    /// `--target-macos` overrides what the volume says (and the plan says both); without
    /// `--dry-run` it is taken only for another volume.
    #[test]
    fn target_macos_names_the_volume_system() {
        let kernel = kernel_image("17.7.0");
        let root = volume_tree("override", &[], &[(KERNEL, &kernel)]);
        let (g, by) = volume_target(&root, Some(("13", Generation::Kmutil))).unwrap();
        assert_eq!(g, Generation::Kmutil);
        assert!(
            by.starts_with("--target-macos 13") && by.contains("Darwin 17.7.0"),
            "{by}"
        );
        let (g, by) = volume_target(&root, Some(("10.15", Generation::Kextcache))).unwrap();
        assert_eq!(
            (g, by.as_str()),
            (Generation::Kextcache, "--target-macos 10.15")
        );
        assert_eq!(volume_target(&root, None).unwrap().0, Generation::Kextcache);
        // Nothing on the volume: --target-macos still names it.
        let empty = volume_tree("override-empty", &[], &[]);
        assert!(volume_target(&empty, None).is_err());
        assert_eq!(
            volume_target(&empty, Some(("11", Generation::Kmutil))).map(|(g, _)| g),
            Ok(Generation::Kmutil)
        );
        for r in [&root, &empty] {
            let _ = std::fs::remove_dir_all(r);
        }

        let vol = Dest::Volume("/Volumes/PD".into());
        assert_eq!(check_target(true, false, &vol), Ok(()));
        assert_eq!(check_target(true, true, &Dest::Running), Ok(()));
        assert_eq!(check_target(false, false, &Dest::Running), Ok(()));
        let e = check_target(true, false, &Dest::Running).unwrap_err();
        assert!(
            e.starts_with("--target-macos")
                && e.contains("KEXT_INSTALL_DIR")
                && e.contains("--dry-run"),
            "{e}"
        );
    }

    /// Another volume gets its own system's cache rebuild, run only when this host's tools
    /// can do it; otherwise no wrong tool runs, and the last line says the kexts are not yet
    /// in that volume's caches and what to run where.
    #[test]
    fn volume_plans_follow_that_systems_tools_not_the_hosts() {
        let vol = Dest::Volume("/Volumes/PD".into());
        let b = bundles_in(
            "/Volumes/PD/Library/Extensions",
            &[Installed::Absent; 3],
            &[Loaded::No, Loaded::No, Loaded::No],
        );
        let k = Kernel::NoneLoaded;
        for mode in [INSTALL, Mode::Uninstall] {
            for host in GENS {
                for target in GENS {
                    let tools = Tools { host, target };
                    let p = plan(tools, mode, &vol, &b, root());
                    let c = shown(&p);
                    let last = p.last().unwrap();
                    let ran_kextcache = c.iter().any(|c| c.starts_with("kextcache"));
                    assert!(!has(&c, "kmutil") && !has(&c, "kextutil"), "{c:#?}");
                    let v = |warnings| verdict(tools, mode, &vol, &k, 0, false, warnings);
                    match (host, target) {
                        (Generation::Kextcache, Generation::Kextcache) => {
                            assert_eq!(c.last().unwrap(), "kextcache -i /Volumes/PD");
                            assert_eq!(last.on_fail, OnFail::Warn);
                            assert!(!v(0).contains("NOT"), "{}", v(0));
                            // Its kextcache failed: the caches do not hold what was done.
                            assert!(v(1).contains("NOT"), "{}", v(1));
                            assert!(v(1).contains("sudo kextcache -i /"), "{}", v(1));
                            assert!(!v(1).contains("run this install from"), "{}", v(1));
                        }
                        (Generation::Kmutil, Generation::Kextcache) => {
                            // A PureDarwin image on a macOS 11+ host: nothing run, and said.
                            assert!(!ran_kextcache, "{c:#?}");
                            assert_eq!(
                                last.action,
                                Action::OnThatSystem(words(&["kextcache", "-i", "/"]))
                            );
                            assert!(last.what.contains("NOT rebuilt"), "{}", last.what);
                            assert!(last.shown().contains("not run here"), "{}", last.shown());
                            let v = v(0);
                            assert!(v.contains("NOT"), "{v}");
                            assert!(v.contains("prelinked kernel"), "{v}");
                            assert!(v.contains("sudo kextcache -i /"), "{v}");
                            assert!(v.contains("macOS 11 or later"), "{v}");
                        }
                        (_, Generation::Kmutil) => {
                            // A kernel-collection system: never the host's kextcache.
                            assert!(!ran_kextcache, "{c:#?}");
                            assert!(
                                last.what.contains("when that system boots"),
                                "{}",
                                last.what
                            );
                            if mode == INSTALL {
                                let v = v(0);
                                assert!(v.contains("NOT yet in that system's auxiliary"), "{v}");
                            }
                        }
                    }
                }
            }
        }
        let v = verdict(
            Tools {
                host: Generation::Kmutil,
                target: Generation::Kextcache,
            },
            INSTALL,
            &vol,
            &k,
            0,
            false,
            0,
        );
        assert!(
            v.starts_with("copied to /Volumes/PD, but they are NOT yet in its prelinked kernel"),
            "{v}"
        );
    }

    #[test]
    fn console_log_steps_follow_the_loads() {
        let b = bundles(&[Installed::Absent; 3]);
        for g in GENS {
            let p = plan(Tools::same(g), CONSOLE, &Dest::Running, &b, root());
            let c = shown(&p);
            let last_load = c
                .iter()
                .rposition(|c| c.starts_with("kextutil") || c.starts_with("kmutil load"))
                .unwrap();
            let daemon = index(
                &c,
                "launchctl bootstrap system /Library/LaunchDaemons/org.virtiodarwin.console-log.plist",
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
            assert!(w.shown().starts_with("writes /Library/LaunchDaemons/"));
            assert!(w.shown().contains(&format!("({} bytes", contents.len())));
        }
    }

    #[test]
    fn uninstall_stops_the_jobs_first_removes_and_refreshes_the_caches() {
        let b = bundles(&[Installed::Identical; 3]);
        for (g, refresh) in [
            (Generation::Kextcache, "kextcache -i /"),
            (Generation::Kmutil, "kmutil install --update-all"),
        ] {
            let p = plan(Tools::same(g), Mode::Uninstall, &Dest::Running, &b, root());
            let c = shown(&p);
            assert!(c[0].starts_with("launchctl bootout system/"), "{c:#?}");
            let rm = index(&c, "rm -rf /Library/Extensions/VirtioFamily.kext");
            assert!(index(&c, "launchctl bootout system/org.virtiodarwin.console-log") < rm);
            // The console's files go whether or not a plist was found.
            for f in [
                "rm -rf '/Library/Application Support/VirtioDarwin'",
                "rm -rf /var/db/virtiodarwin",
                "rm -f /var/log/virtio-console-log.log",
            ] {
                assert!(index(&c, f) < rm);
            }
            assert_eq!(c.last().unwrap(), refresh);
            assert_eq!(p.last().unwrap().on_fail, OnFail::Warn);
            let v = verdict(
                Tools::same(g),
                Mode::Uninstall,
                &Dest::Running,
                &Kernel::NoneLoaded,
                0,
                false,
                0,
            );
            assert!(v.contains("reboot"), "{v}");
        }
    }

    #[test]
    fn target_versions() {
        assert_eq!(parse_target("10.13"), Ok(Generation::Kextcache));
        assert_eq!(parse_target("10.15.7"), Ok(Generation::Kextcache));
        assert_eq!(
            parse_target("10.16"),
            Ok(Generation::Kmutil),
            "macOS 11's compat name"
        );
        assert_eq!(parse_target("11"), Ok(Generation::Kmutil));
        assert_eq!(parse_target("14.5"), Ok(Generation::Kmutil));
        for bad in ["10.12", "10", "10.17", "9", "", "sonoma", "13.x", "big sur"] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.contains("--target-macos"), "{e}");
            assert!(!e.contains('"'), "shell quoting, not Rust escaping: {e}");
        }
        assert!(
            parse_target("big sur")
                .unwrap_err()
                .starts_with("--target-macos 'big sur':")
        );
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
        assert_eq!(quote(""), "''");
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

    /// The runner: a failed load does not stop the steps after it; an ignored failure is
    /// silent; a `JobGone` check warns only when the job is still there; a failed `Warn`
    /// step makes the exit status 1; a failed `Stop` step ends it.
    #[test]
    fn failures_do_what_the_plan_says() {
        let tmp = std::env::temp_dir().join(format!("virtio-install-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let mark = |n: &str| tmp.join(n).display().to_string();
        let sh = |what: &str, script: &str, on_fail| run_step(what, &["sh", "-c", script], on_fail);
        let (a, b) = (mark("after-load"), mark("load-ran"));
        let k = Kernel::NoneLoaded;
        let run = |g, steps: &[Step]| execute(Tools::same(g), INSTALL, &Dest::Running, &k, steps);
        let steps = [
            sh(
                "bootout",
                "echo 'Could not find service'; exit 113",
                OnFail::Ignore,
            ),
            sh("gone?", "exit 113", OnFail::JobGone),
            sh("load", &format!("touch {b}; exit 1"), OnFail::Load),
            sh("console", &format!("touch {a}"), OnFail::Stop),
        ];
        assert_eq!(run(Generation::Kmutil, &steps), Ok(true));
        assert!(Path::new(&a).exists() && Path::new(&b).exists());
        let still = [sh("gone?", "exit 0", OnFail::JobGone), steps[3].clone()];
        assert_eq!(run(Generation::Kextcache, &still), Ok(false));
        let warn = [sh("cache", "exit 1", OnFail::Warn), steps[3].clone()];
        assert_eq!(run(Generation::Kextcache, &warn), Ok(false));
        let stop = [sh("copy", "exit 1", OnFail::Stop), steps[3].clone()];
        std::fs::remove_file(&a).unwrap();
        let e = run(Generation::Kmutil, &stop).unwrap_err();
        assert!(e.contains("nothing after it was done"), "{e}");
        assert!(!Path::new(&a).exists());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
