//! End-to-end runner: builds the bare-metal guest (`tests/guest`), boots it under QEMU
//! (TCG) with the devices a scenario needs, and turns its serial output into a report.
//!
//! ```no_run
//! use virtio_tests::qemu::{RunConfig, Machine, run_scenario};
//! let report = run_scenario(&RunConfig::new("boot").machine(Machine::Pc)).unwrap();
//! assert!(report.passed(), "{}", report.summary());
//! ```
//!
//! The guest prints (see `tests/guest/src/report.rs`):
//! `CHECK <name> PASS|FAIL <detail>`, `STAT <key>=<value>`, `DEVICE k=v ...`,
//! `DONE checks=<n> failed=<m>`, and exits through `isa-debug-exit` (status (v<<1)|1,
//! mapped by [`GuestExit`]).

pub mod balloon_host;
pub mod blk_host;
pub mod console_host;
pub mod devices;
pub mod net_peer;
pub mod qmp;
pub mod tap;
mod toolchain;

pub use devices::{
    BLK_SERIAL, DISK_BYTES, DeviceSpec, NET_MAC, ScenarioSpec, device, scenario, scenarios,
};
pub use toolchain::{
    GuestProfile, GuestToolchain, build_guest, build_guest_profile, ensure as ensure_toolchain,
    find_workspace, guest_dir, target_dir,
};

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// virtio 1.x only (`disable-legacy=on`): device IDs 0x104x.
    Modern,
    /// Both interfaces (QEMU's default on the root bus): IDs 0x100x, legacy BAR0 + modern caps.
    Transitional,
    /// virtio 0.9.5 only (`disable-modern=on`).
    Legacy,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Machine {
    Q35,
    Pc,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IrqMode {
    Msix,
    Intx,
    Poll,
}

macro_rules! names {
    ($t:ty { $($v:ident = $s:literal),* }) => {
        impl $t {
            pub fn name(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
            pub fn all() -> &'static [$t] {
                &[$(<$t>::$v),*]
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(<$t>::$v),)*
                    _ => Err(format!("\"{s}\" is not one of {}", [$($s),*].join(", "))),
                }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

names!(Transport { Modern = "modern", Transitional = "transitional", Legacy = "legacy" });
names!(Machine { Q35 = "q35", Pc = "pc" });
names!(IrqMode { Msix = "msix", Intx = "intx", Poll = "poll" });

/// One QEMU run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub scenario: String,
    pub transport: Transport,
    pub machine: Machine,
    pub irq: IrqMode,
    /// Appended to QEMU's command line.
    pub extra_qemu_args: Vec<String>,
    /// Appended to the guest command line (`key=value` words).
    pub extra_guest_args: Vec<String>,
    /// Overrides the scenario's timeout.
    pub timeout: Option<Duration>,
    pub memory_mib: u32,
    /// Keep the run directory even when the run passed.
    pub keep_run_dir: bool,
    /// Distinguishes runs of the same scenario and configuration (run directory suffix).
    pub label: Option<String>,
    /// SIGKILL QEMU as soon as the guest's serial output has this line (e.g. a `STAT` line
    /// the guest prints before waiting): durability tests. The report says `killed`.
    pub kill_on: Option<String>,
    /// Install missing toolchain/QEMU packages (root on Debian only).
    pub install_missing: bool,
    /// The guest build to boot: the tests' checked build, or the shipping optimisation
    /// level (the benchmarks).
    pub guest_profile: GuestProfile,
}

impl RunConfig {
    /// Defaults: modern transport, q35, MSI-X, 256 MiB.
    pub fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            transport: Transport::Modern,
            machine: Machine::Q35,
            irq: IrqMode::Msix,
            extra_qemu_args: Vec::new(),
            extra_guest_args: Vec::new(),
            timeout: None,
            memory_mib: 256,
            keep_run_dir: false,
            label: None,
            kill_on: None,
            install_missing: false,
            guest_profile: GuestProfile::Checked,
        }
    }

    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    pub fn machine(mut self, m: Machine) -> Self {
        self.machine = m;
        self
    }

    pub fn irq(mut self, i: IrqMode) -> Self {
        self.irq = i;
        self
    }

    pub fn guest_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_guest_args.push(arg.into());
        self
    }

    /// `<machine>-<transport>-<irq>`, e.g. `q35-modern-msix`.
    pub fn config_name(&self) -> String {
        format!("{}-{}-{}", self.machine, self.transport, self.irq)
    }
}

/// How the guest (or QEMU) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// Guest wrote 0x10: all checks passed (QEMU status 33).
    Success,
    /// 0x11: ran to DONE with failed checks (35).
    ChecksFailed,
    /// 0x12: Rust panic (37).
    Panic,
    /// 0x13: CPU exception (39).
    Exception,
    /// 0x14: bad command line or unknown scenario (41).
    Usage,
    /// Status 0: the guest reset (e.g. a triple fault; `-no-reboot` turns it into exit).
    Reset,
    /// Status 1: QEMU itself failed (bad arguments, missing file...): see its stderr.
    QemuError,
    Other(i32),
    /// Killed by a signal.
    Signal,
    /// Killed by the runner after the timeout.
    Timeout(Duration),
}

impl GuestExit {
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        match status.code() {
            Some(33) => GuestExit::Success,
            Some(35) => GuestExit::ChecksFailed,
            Some(37) => GuestExit::Panic,
            Some(39) => GuestExit::Exception,
            Some(41) => GuestExit::Usage,
            Some(0) => GuestExit::Reset,
            Some(1) => GuestExit::QemuError,
            Some(c) => GuestExit::Other(c),
            None => GuestExit::Signal,
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::Success => write!(f, "success"),
            GuestExit::ChecksFailed => write!(f, "checks failed"),
            GuestExit::Panic => write!(f, "guest panic"),
            GuestExit::Exception => write!(f, "guest CPU exception"),
            GuestExit::Usage => write!(
                f,
                "guest usage error (unknown scenario or bad command line)"
            ),
            GuestExit::Reset => write!(f, "guest reset (triple fault?)"),
            GuestExit::QemuError => write!(f, "QEMU error (see qemu.stderr)"),
            GuestExit::Other(c) => write!(f, "unexpected QEMU status {c}"),
            GuestExit::Signal => write!(f, "QEMU killed by a signal"),
            GuestExit::Timeout(d) => write!(f, "timeout after {} s", d.as_secs()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Counts of QEMU trace events (`-trace ... -D trace.log`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceCounts {
    /// Event name → number of lines.
    pub events: BTreeMap<String, u64>,
    /// (event, vdev pointer) → count: separates devices (the pointer is per device).
    pub per_device: BTreeMap<(String, String), u64>,
    /// `virtio_queue_notify` per (vdev, queue index).
    pub kicks_per_queue: BTreeMap<(String, u32), u64>,
    /// Per vdev: resets (`virtio_set_status ... val 0`) that came after queue
    /// notifications, i.e. of a device in use. One guest reset traces `val 0` twice (the
    /// status write, then `virtio_reset`): counted once.
    pub resets_after_traffic: BTreeMap<String, u64>,
    /// Per vdev: DRIVER_OK set again after such a reset, i.e. the driver re-initialised a
    /// device it had been using (suspend/resume, a restart after a fault).
    pub reinits_after_traffic: BTreeMap<String, u64>,
}

/// Status bit DRIVER_OK (virtio 1.2 §2.1).
const STATUS_DRIVER_OK: u32 = 4;

/// Where one device stands in a trace, for [`TraceCounts`]' reset counting.
#[derive(Default)]
struct DeviceLife {
    /// Queue notifications since the last reset.
    kicked: bool,
    /// Reset after notifications; waiting for DRIVER_OK.
    reset_in_use: bool,
}

impl TraceCounts {
    pub fn parse(text: &str) -> Self {
        let mut t = TraceCounts::default();
        let mut life: BTreeMap<String, DeviceLife> = BTreeMap::new();
        for line in text.lines() {
            // The log backend prefixes "pid@seconds.micros:"; tolerate its absence.
            let body = match line.split_once(':') {
                Some((prefix, rest)) if prefix.contains('@') => rest,
                _ => line,
            };
            let mut words = body.split_whitespace();
            let Some(event) = words.next() else { continue };
            if !event.starts_with("virtio_") {
                continue;
            }
            let fields: Vec<&str> = words.collect();
            let field = |name: &str| {
                fields
                    .iter()
                    .position(|w| *w == name)
                    .and_then(|i| fields.get(i + 1))
                    .copied()
            };
            *t.events.entry(event.to_string()).or_default() += 1;
            if let Some(vdev) = field("vdev") {
                *t.per_device
                    .entry((event.to_string(), vdev.to_string()))
                    .or_default() += 1;
                if event == "virtio_queue_notify"
                    && let Some(n) = field("n").and_then(|n| n.parse().ok())
                {
                    *t.kicks_per_queue.entry((vdev.to_string(), n)).or_default() += 1;
                }
                let dev = life.entry(vdev.to_string()).or_default();
                match (event, field("val").and_then(|v| v.parse::<u32>().ok())) {
                    ("virtio_queue_notify", _) => dev.kicked = true,
                    ("virtio_set_status", Some(0)) if dev.kicked => {
                        dev.kicked = false;
                        dev.reset_in_use = true;
                        *t.resets_after_traffic.entry(vdev.to_string()).or_default() += 1;
                    }
                    ("virtio_set_status", Some(v))
                        if v & STATUS_DRIVER_OK != 0 && dev.reset_in_use =>
                    {
                        dev.reset_in_use = false;
                        *t.reinits_after_traffic.entry(vdev.to_string()).or_default() += 1;
                    }
                    _ => {}
                }
            }
        }
        t
    }

    /// Kicks seen by QEMU.
    pub fn kicks(&self) -> u64 {
        self.events.get("virtio_queue_notify").copied().unwrap_or(0)
    }

    /// Resets of devices in use, over all devices (see `resets_after_traffic`).
    pub fn resets_after_traffic(&self) -> u64 {
        self.resets_after_traffic.values().sum()
    }

    /// Re-initialisations of devices in use, over all devices (see
    /// `reinits_after_traffic`).
    pub fn reinits_after_traffic(&self) -> u64 {
        self.reinits_after_traffic.values().sum()
    }

    /// One line for a person: what QEMU's trace counted.
    pub fn describe(&self) -> String {
        let status = self.events.get("virtio_set_status").copied().unwrap_or(0);
        format!(
            "QEMU's trace: {} kicks (queue notifications), {} interrupts sent, {status} status writes",
            self.kicks(),
            self.interrupts()
        )
    }

    /// Interrupts QEMU sent (`virtio_notify` + `virtio_notify_irqfd`).
    pub fn interrupts(&self) -> u64 {
        ["virtio_notify", "virtio_notify_irqfd"]
            .iter()
            .map(|e| self.events.get(*e).copied().unwrap_or(0))
            .sum()
    }
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub config: RunConfig,
    pub exit: GuestExit,
    pub checks: Vec<Check>,
    pub stats: BTreeMap<String, String>,
    /// `DEVICE` lines as key/value maps.
    pub devices: Vec<BTreeMap<String, String>>,
    /// Whether the guest printed `DONE`.
    pub done: bool,
    /// `PANIC`/`EXCEPTION`/`FATAL` lines.
    pub fatal: Vec<String>,
    pub trace: Option<TraceCounts>,
    /// What the guest wrote to the virtconsole's chardev.
    pub console_output: Option<Vec<u8>>,
    pub serial_log: String,
    pub qemu_stderr: String,
    pub qemu_command: Vec<String>,
    pub run_dir: PathBuf,
    /// Whether `run_dir` was kept on disk.
    pub kept: bool,
    /// QEMU was SIGKILLed because the guest printed `RunConfig::kill_on`.
    pub killed: bool,
    pub duration: Duration,
}

impl RunReport {
    /// Passed: guest exited with success, printed DONE, ran at least one check, none failed.
    pub fn passed(&self) -> bool {
        self.exit == GuestExit::Success
            && self.done
            && !self.checks.is_empty()
            && self.checks.iter().all(|c| c.passed)
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn stat(&self, key: &str) -> Option<&str> {
        self.stats.get(key).map(String::as_str)
    }

    pub fn stat_u64(&self, key: &str) -> Option<u64> {
        self.stat(key)?.parse().ok()
    }

    pub fn failed_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }

    /// The one-line verdict: `net [q35-modern-msix]: PASS, 14 of 14 checks (success, 6.4 s)`.
    pub fn verdict(&self) -> String {
        let failed = self.failed_checks().count();
        format!(
            "{} [{}]: {}, {} of {} checks passed (guest exit: {}, {:.1} s)",
            self.config.scenario,
            self.config.config_name(),
            if self.passed() { "PASS" } else { "FAIL" },
            self.checks.len() - failed,
            self.checks.len(),
            self.exit,
            self.duration.as_secs_f64()
        )
    }

    /// Human-readable per-check report; the verdict ([`RunReport::verdict`]) is its last line.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== {} [{}] ==",
            self.config.scenario,
            self.config.config_name()
        );
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  {} {:32} {}",
                if c.passed { "PASS" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        if self.checks.is_empty() {
            let _ = writeln!(s, "  (no checks reported)");
        }
        if !self.done {
            let _ = writeln!(s, "  the guest did not reach DONE");
        }
        if self.killed {
            let _ = writeln!(
                s,
                "  QEMU SIGKILLed by the runner on the serial line \"{}\"",
                self.config.kill_on.as_deref().unwrap_or("")
            );
        }
        for f in &self.fatal {
            let _ = writeln!(s, "  {f}");
        }
        for line in self.trace_cross_check() {
            let _ = writeln!(s, "  {line}");
        }
        if !self.passed() {
            let tail: Vec<&str> = self.serial_log.lines().rev().take(15).collect();
            let _ = writeln!(s, "  last serial lines:");
            for l in tail.iter().rev() {
                let _ = writeln!(s, "    | {l}");
            }
            for l in self.qemu_stderr.lines().take(10) {
                let _ = writeln!(s, "    qemu: {l}");
            }
        }
        if self.kept {
            let _ = writeln!(
                s,
                "  logs kept in {} (serial.log, qemu.cmd, qemu.stderr)",
                self.run_dir.display()
            );
        }
        let _ = writeln!(s, "{}", self.verdict());
        s
    }

    /// Kicks the guest's drivers counted (`<device>.kicks` stats, summed), if they report any.
    pub fn guest_kicks(&self) -> Option<u64> {
        let counts: Vec<u64> = self
            .stats
            .iter()
            .filter(|(k, _)| k.matches('.').count() == 1 && k.ends_with(".kicks"))
            .filter_map(|(_, v)| v.parse().ok())
            .collect();
        (!counts.is_empty()).then(|| counts.iter().sum())
    }

    /// QEMU's trace and what it is compared with, one line each, for a person.
    pub fn trace_cross_check(&self) -> Vec<String> {
        let Some(t) = &self.trace else {
            return Vec::new();
        };
        let mut lines = vec![t.describe()];
        if let Some(kicks) = self.guest_kicks() {
            lines.push(if kicks == t.kicks() {
                format!(
                    "kicks: the drivers counted {kicks}, QEMU traced {}: equal, so every notify \
                     the drivers made reached QEMU, and no other",
                    t.kicks()
                )
            } else {
                format!(
                    "kicks: the drivers counted {kicks}, QEMU traced {}: DIFFERENT, a notify was \
                     lost or miscounted",
                    t.kicks()
                )
            });
            lines.push(format!(
                "interrupts: QEMU sent {} (not compared with the kicks: the device decides \
                 when to interrupt)",
                t.interrupts()
            ));
        }
        lines
    }

    /// The report as one JSON object: configuration, verdict, checks, stats, trace counts.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.config.scenario,
            "config": self.config.config_name(),
            "passed": self.passed(),
            "exit": self.exit.to_string(),
            "done": self.done,
            "seconds": self.duration.as_secs_f64(),
            "checks": self.checks.iter().map(|c| serde_json::json!({
                "name": c.name,
                "passed": c.passed,
                "detail": c.detail,
            })).collect::<Vec<_>>(),
            "stats": self.stats,
            "fatal": self.fatal,
            "trace": self.trace.as_ref().map(|t| serde_json::json!({
                "kicks": t.kicks(),
                "interrupts": t.interrupts(),
                "events": t.events,
            })),
            "run_dir": self.kept.then(|| self.run_dir.display().to_string()),
        })
    }

    /// Fills checks/stats/devices/done/fatal from serial output.
    fn parse_serial(&mut self) {
        for raw in self.serial_log.lines() {
            let line = raw.trim_end_matches('\r');
            if let Some(rest) = line.strip_prefix("CHECK ") {
                let mut parts = rest.splitn(3, ' ');
                let name = parts.next().unwrap_or("").to_string();
                let passed = parts.next() == Some("PASS");
                let detail = parts.next().unwrap_or("").trim().to_string();
                self.checks.push(Check {
                    name,
                    passed,
                    detail,
                });
            } else if let Some(rest) = line.strip_prefix("STAT ") {
                if let Some((k, v)) = rest.split_once('=') {
                    self.stats
                        .insert(k.trim().to_string(), v.trim().to_string());
                }
            } else if let Some(rest) = line.strip_prefix("DEVICE ") {
                let map = rest
                    .split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                self.devices.push(map);
            } else if line.starts_with("DONE") {
                self.done = true;
            } else if ["PANIC", "EXCEPTION", "FATAL", "EXIT-FAILED"]
                .iter()
                .any(|p| line.starts_with(p))
            {
                self.fatal.push(line.to_string());
            }
        }
    }
}

/// An optional value as a report shows it: the value, or `none`.
pub fn or_none<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// A line read from a peer as a report shows it: `"the line"`, or `error: <why>`.
pub fn line_read<E: fmt::Display>(line: &Result<String, E>) -> String {
    match line {
        Ok(l) => format!("\"{}\"", l.escape_debug()),
        Err(e) => format!("error: {e}"),
    }
}

/// The outcome of an operation without a value: `ok`, or `error: <why>`.
pub fn outcome<E: fmt::Display>(result: &Result<(), E>) -> String {
    match result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    }
}

/// Why a run could not even start (a failing guest is a [`RunReport`], not an error).
#[derive(Debug)]
pub enum RunError {
    UnknownScenario(String),
    Toolchain(String),
    Build(String),
    Io(String, std::io::Error),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::UnknownScenario(s) => {
                let known: Vec<&str> = scenarios().map(|s| s.name).collect();
                write!(f, "unknown scenario \"{s}\" (known: {})", known.join(", "))
            }
            RunError::Toolchain(e) => write!(f, "toolchain: {e}"),
            RunError::Build(e) => write!(f, "{e}"),
            RunError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// What a scenario's host-side hook gets (see [`ScenarioSpec::host`]).
pub struct HostContext<'a> {
    pub config: &'a RunConfig,
    pub run_dir: &'a Path,
    /// The guest's serial output (COM1), written while QEMU runs: a hook may poll it for
    /// markers the guest prints.
    pub serial_log: &'a Path,
}

/// Host-side work running next to QEMU for one run (a network peer, QMP commands...):
/// started before QEMU, which gets `qemu_args` and the guest `guest_args`; `finish` runs
/// once QEMU has exited (or was killed), stops and joins the work, and returns checks and
/// stats (named `host.*`) that join the report.
pub struct HostSide {
    pub guest_args: Vec<String>,
    pub qemu_args: Vec<String>,
    pub finish: Box<dyn FnOnce() -> HostOutcome + Send>,
}

#[derive(Clone, Debug, Default)]
pub struct HostOutcome {
    pub checks: Vec<Check>,
    pub stats: BTreeMap<String, String>,
}

/// A claimed run directory: the lock on `<dir>.lock` is held while the value lives.
struct RunDir {
    path: PathBuf,
    _lock: std::fs::File,
}

/// Claims `target/qemu-runs/<scenario>-<config>[-<label>]`, or `...-2`, `...-3` when
/// another run (in this or another process) holds it: parallel tests never share files.
/// Ownership is an exclusive `flock` on a sibling `.lock` file, so a crashed run leaves no
/// stale claim.
fn claim_run_dir(cfg: &RunConfig) -> Result<RunDir, RunError> {
    let root = target_dir().join("qemu-runs");
    let io = |what: &str, p: &Path, e| RunError::Io(format!("{what} {}", p.display()), e);
    std::fs::create_dir_all(&root).map_err(|e| io("cannot create", &root, e))?;
    let mut name = format!("{}-{}", cfg.scenario, cfg.config_name());
    if let Some(label) = &cfg.label {
        name = format!("{name}-{label}");
    }
    for n in 1..=64 {
        let candidate = if n == 1 {
            name.clone()
        } else {
            format!("{name}-{n}")
        };
        let lock_path = root.join(format!("{candidate}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("cannot open", &lock_path, e))?;
        if lock.try_lock().is_err() {
            continue;
        }
        let path = root.join(&candidate);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| io("cannot clear", &path, e))?;
        }
        std::fs::create_dir_all(&path).map_err(|e| io("cannot create", &path, e))?;
        return Ok(RunDir { path, _lock: lock });
    }
    Err(RunError::Io(
        format!("no free run directory for {name}"),
        std::io::Error::from(std::io::ErrorKind::WouldBlock),
    ))
}

/// The guest command line for `cfg`.
pub fn guest_cmdline(cfg: &RunConfig, spec: &ScenarioSpec) -> String {
    let mut types: Vec<String> = spec.devices.iter().map(|d| d.id().to_string()).collect();
    types.sort();
    let mut words = vec![
        format!("scenario={}", cfg.scenario),
        format!("irq={}", cfg.irq),
        format!("machine={}", cfg.machine),
        format!("transport={}", cfg.transport),
        format!("expect_types={}", types.join(",")),
    ];
    if spec.devices.contains(&virtio_core::DeviceType::Block) {
        words.push(format!("blk_serial={BLK_SERIAL}"));
        words.push(format!("blk_bytes={DISK_BYTES}"));
    }
    words.extend(cfg.extra_guest_args.iter().cloned());
    words.join(" ")
}

/// Builds the guest if needed and runs one scenario.
pub fn run_scenario(cfg: &RunConfig) -> Result<RunReport, RunError> {
    let spec =
        scenario(&cfg.scenario).ok_or_else(|| RunError::UnknownScenario(cfg.scenario.clone()))?;
    let toolchain = toolchain::ensure(cfg.install_missing).map_err(RunError::Toolchain)?;
    let elf = build_guest_profile(&toolchain, cfg.guest_profile).map_err(RunError::Build)?;
    let run_dir = claim_run_dir(cfg)?;
    let dir = run_dir.path.clone();
    let serial = dir.join("serial.log");
    let trace_log = dir.join("trace.log");
    let host = match spec.host {
        Some(start) => Some(
            start(&HostContext {
                config: cfg,
                run_dir: &dir,
                serial_log: &serial,
            })
            .map_err(|e| RunError::Io("cannot start the host side".into(), e))?,
        ),
        None => None,
    };
    let (device_args, files) = devices::qemu_args(
        spec.devices,
        cfg.machine,
        cfg.transport,
        &dir,
        host.is_some(),
    )
    .map_err(|e| RunError::Io("cannot prepare device files".into(), e))?;
    let mut cmdline = guest_cmdline(cfg, spec);
    for a in host.iter().flat_map(|h| &h.guest_args) {
        cmdline.push(' ');
        cmdline.push_str(a);
    }

    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-M".into(),
        cfg.machine.name().into(),
        "-m".into(),
        format!("{}M", cfg.memory_mib),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-device".into(),
        "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
        "-kernel".into(),
        elf.display().to_string(),
        "-append".into(),
        cmdline,
    ];
    if spec.trace {
        for ev in [
            "virtio_queue_notify",
            "virtio_notify",
            "virtio_notify_irqfd",
            "virtio_set_status",
        ] {
            args.push("-trace".into());
            args.push(ev.into());
        }
        args.push("-D".into());
        args.push(trace_log.display().to_string());
    }
    args.extend(device_args);
    args.extend(host.iter().flat_map(|h| h.qemu_args.iter().cloned()));
    args.extend(cfg.extra_qemu_args.iter().cloned());
    let _ = std::fs::write(dir.join("qemu.cmd"), shell_words(QEMU, &args));

    let stderr_path = dir.join("qemu.stderr");
    let stderr_file = std::fs::File::create(&stderr_path)
        .map_err(|e| RunError::Io("cannot create qemu.stderr".into(), e))?;
    let start = Instant::now();
    let spawned = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            if let Some(h) = host {
                (h.finish)();
            }
            return Err(RunError::Io(format!("cannot start {QEMU}"), e));
        }
    };
    let timeout = cfg
        .timeout
        .unwrap_or(Duration::from_secs(spec.timeout_secs));
    let mut killed = false;
    let exit = loop {
        match child.try_wait() {
            Ok(Some(status)) => break GuestExit::from_status(status),
            Ok(None)
                if cfg.kill_on.as_deref().is_some_and(|want| {
                    String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
                        .lines()
                        .any(|l| l.trim_end() == want)
                }) =>
            {
                // std's `Child::kill` is SIGKILL on Unix: no chance for QEMU to flush.
                let _ = child.kill();
                let _ = child.wait();
                killed = true;
                break GuestExit::Signal;
            }
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break GuestExit::Timeout(timeout);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(RunError::Io("waiting for QEMU".into(), e)),
        }
    };
    let duration = start.elapsed();

    let mut report = RunReport {
        config: cfg.clone(),
        exit,
        checks: Vec::new(),
        stats: BTreeMap::new(),
        devices: Vec::new(),
        done: false,
        fatal: Vec::new(),
        trace: spec
            .trace
            .then(|| TraceCounts::parse(&std::fs::read_to_string(&trace_log).unwrap_or_default())),
        console_output: files.console.as_ref().and_then(|p| std::fs::read(p).ok()),
        serial_log: String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
            .into_owned(),
        qemu_stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        qemu_command: std::iter::once(QEMU.to_string()).chain(args).collect(),
        run_dir: dir.clone(),
        kept: true,
        killed,
        duration,
    };
    report.parse_serial();
    if let Some(h) = host {
        let out = (h.finish)();
        report.checks.extend(out.checks);
        report.stats.extend(out.stats);
    }
    if report.passed() && !cfg.keep_run_dir {
        report.kept = std::fs::remove_dir_all(&dir).is_err();
    }
    Ok(report)
}

/// A copy-pasteable command line.
fn shell_words(program: &str, args: &[String]) -> String {
    let quote = |a: &str| {
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,.:/@+".contains(c))
            && !a.is_empty()
        {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
        + "\n"
}

/// Declares one `#[test]` per machine × transport × interrupt mode, each calling
/// `$run(RunConfig::new($scenario).machine(..).transport(..).irq(..))`:
/// `qemu_matrix!("boot", run);` expands to all 18 combinations.
#[macro_export]
macro_rules! qemu_matrix {
    ($scenario:literal, $run:ident) => {
        $crate::qemu_matrix!(@tests $scenario, $run;
            q35_modern_msix: Q35 Modern Msix;
            q35_modern_intx: Q35 Modern Intx;
            q35_modern_poll: Q35 Modern Poll;
            q35_transitional_msix: Q35 Transitional Msix;
            q35_transitional_intx: Q35 Transitional Intx;
            q35_transitional_poll: Q35 Transitional Poll;
            q35_legacy_msix: Q35 Legacy Msix;
            q35_legacy_intx: Q35 Legacy Intx;
            q35_legacy_poll: Q35 Legacy Poll;
            pc_modern_msix: Pc Modern Msix;
            pc_modern_intx: Pc Modern Intx;
            pc_modern_poll: Pc Modern Poll;
            pc_transitional_msix: Pc Transitional Msix;
            pc_transitional_intx: Pc Transitional Intx;
            pc_transitional_poll: Pc Transitional Poll;
            pc_legacy_msix: Pc Legacy Msix;
            pc_legacy_intx: Pc Legacy Intx;
            pc_legacy_poll: Pc Legacy Poll;
        );
    };
    (@tests $scenario:literal, $run:ident; $($name:ident: $m:ident $t:ident $i:ident;)*) => {$(
        #[test]
        fn $name() {
            $run($crate::qemu::RunConfig::new($scenario)
                .machine($crate::qemu::Machine::$m)
                .transport($crate::qemu::Transport::$t)
                .irq($crate::qemu::IrqMode::$i));
        }
    )*};
}

/// The packed-ring matrix (VIRTIO_F_RING_PACKED, §2.8): q35 × the transports that can
/// offer it (modern and transitional functions; a legacy interface has no bit 34) × every
/// interrupt mode, with `packed=on` on QEMU's `$device`. `$run` runs a configuration with
/// the scenario's usual checks and returns its report; each test then also asserts that
/// the guest negotiated the packed ring (a check detail lists `RING_PACKED`).
#[macro_export]
macro_rules! qemu_packed_matrix {
    ($scenario:literal, $device:literal, $run:ident) => {
        mod packed {
            use super::*;
            $crate::qemu_packed_matrix!(@tests $scenario, $device, $run;
                q35_modern_msix: Modern Msix;
                q35_modern_intx: Modern Intx;
                q35_modern_poll: Modern Poll;
                q35_transitional_msix: Transitional Msix;
                q35_transitional_intx: Transitional Intx;
                q35_transitional_poll: Transitional Poll;
            );
        }
    };
    (@tests $scenario:literal, $device:literal, $run:ident; $($name:ident: $t:ident $i:ident;)*) => {$(
        #[test]
        fn $name() {
            let mut cfg = $crate::qemu::RunConfig::new($scenario)
                .machine($crate::qemu::Machine::Q35)
                .transport($crate::qemu::Transport::$t)
                .irq($crate::qemu::IrqMode::$i);
            cfg.label = Some("packed".into());
            cfg.extra_qemu_args = vec!["-global".into(), format!("{}.packed=on", $device)];
            let report = $run(cfg);
            assert!(
                report.checks.iter().any(|c| c.detail.contains("RING_PACKED")),
                "the packed ring was not negotiated\n{}",
                report.summary()
            );
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serial_lines() {
        let mut r = RunReport {
            config: RunConfig::new("boot"),
            exit: GuestExit::Success,
            checks: Vec::new(),
            stats: BTreeMap::new(),
            devices: Vec::new(),
            done: false,
            fatal: Vec::new(),
            trace: None,
            console_output: None,
            serial_log: "noise\r\nCHECK a.b PASS all good here\nCHECK c FAIL\nSTAT x.y=42\r\n\
                         DEVICE bdf=00:01.0 type=1\nDONE checks=2 failed=1\n"
                .into(),
            qemu_stderr: String::new(),
            qemu_command: Vec::new(),
            run_dir: PathBuf::new(),
            kept: false,
            killed: false,
            duration: Duration::ZERO,
        };
        r.parse_serial();
        assert_eq!(r.checks.len(), 2);
        assert_eq!(
            r.check("a.b").map(|c| (c.passed, c.detail.as_str())),
            Some((true, "all good here"))
        );
        assert!(!r.check("c").unwrap().passed);
        assert_eq!(r.stat_u64("x.y"), Some(42));
        assert_eq!(r.devices[0]["type"], "1");
        assert!(r.done);
        assert!(!r.passed());
    }

    #[test]
    fn parses_trace_log() {
        let t = TraceCounts::parse(
            "123@1.5:virtio_queue_notify vdev 0xa n 0 vq 0xb\n\
             123@1.6:virtio_queue_notify vdev 0xa n 1 vq 0xc\n\
             123@1.7:virtio_notify vdev 0xa vq 0xb\n\
             virtio_notify_irqfd vdev 0xd vq 0xe\n",
        );
        assert_eq!(t.kicks(), 2);
        assert_eq!(t.interrupts(), 2);
        assert_eq!(t.kicks_per_queue[&("0xa".to_string(), 1)], 1);
    }

    #[test]
    fn counts_resets_of_devices_in_use() {
        // Device 0xa: initialised (reset traced twice), used, reset and re-initialised
        // (a resume), used, reset at the end. Device 0xd: initialised, never used, reset.
        let t = TraceCounts::parse(
            "1@1.0:virtio_set_status vdev 0xa val 0\n\
             1@1.0:virtio_set_status vdev 0xa val 0\n\
             1@1.0:virtio_set_status vdev 0xa val 15\n\
             1@1.0:virtio_set_status vdev 0xd val 0\n\
             1@1.0:virtio_set_status vdev 0xd val 15\n\
             1@1.1:virtio_queue_notify vdev 0xa n 0 vq 0xb\n\
             1@1.2:virtio_set_status vdev 0xa val 0\n\
             1@1.2:virtio_set_status vdev 0xa val 0\n\
             1@1.2:virtio_set_status vdev 0xa val 1\n\
             1@1.2:virtio_set_status vdev 0xa val 11\n\
             1@1.2:virtio_set_status vdev 0xa val 15\n\
             1@1.3:virtio_queue_notify vdev 0xa n 1 vq 0xc\n\
             1@1.4:virtio_set_status vdev 0xa val 0\n\
             1@1.4:virtio_set_status vdev 0xa val 0\n\
             1@1.4:virtio_set_status vdev 0xd val 0\n",
        );
        assert_eq!(t.resets_after_traffic(), 2);
        assert_eq!(t.reinits_after_traffic(), 1);
        assert_eq!(t.reinits_after_traffic[&"0xa".to_string()], 1);
        assert!(!t.resets_after_traffic.contains_key("0xd"));
    }

    #[test]
    fn exit_statuses() {
        use std::os::unix::process::ExitStatusExt;
        let st = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(GuestExit::from_status(st(33)), GuestExit::Success);
        assert_eq!(GuestExit::from_status(st(37)), GuestExit::Panic);
        assert_eq!(GuestExit::from_status(st(0)), GuestExit::Reset);
    }

    #[test]
    fn transport_mapping() {
        assert_eq!(
            devices::transport_props(Transport::Modern),
            ",disable-legacy=on,disable-modern=off"
        );
        assert_eq!(
            devices::transport_props(Transport::Legacy),
            ",disable-modern=on,disable-legacy=off"
        );
        assert_eq!(devices::transport_props(Transport::Transitional), "");
        assert_eq!("q35".parse::<Machine>(), Ok(Machine::Q35));
        assert!("kvm".parse::<IrqMode>().is_err());
    }
}
