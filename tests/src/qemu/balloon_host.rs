//! Host side of the `balloon` scenario (guest: `tests/guest/src/scenarios/balloon.rs`).
//!
//! Attaches `virtio-balloon-pci,id=balloon0` itself (behind a `pcie-root-port` on q35 with
//! the modern transport), with `deflate-on-oom=on` for `balloon_test=oom` and
//! `free-page-reporting=on` for `balloon_test=report` (with `free-page-hint=on` and its
//! iothread for `balloon_test=report_nohint`), and tells the guest its memory size
//! (`balloon_mem=`, from `RunConfig::memory_mib`: QMP's `balloon value=` is the memory the
//! guest keeps, so the balloon holds `memory - value`). Over QMP it:
//!
//! 1. turns statistics polling on (`qom-set /machine/peripheral/balloon0
//!    guest-stats-polling-interval 1`);
//! 2. after the guest's `STAT balloon.phase=ready`, sets each target of `balloon_targets`
//!    (MiB) and waits until `query-balloon` reports it (`host.balloon.target<i>`);
//! 3. reads `qom-get … guest-stats` until it is refreshed and matches a set the guest
//!    printed (`BALLOON-STATS …` on COM1) (`host.balloon.stats`);
//! 4. `oom`: after the guest's `STAT balloon.oom=done`, checks that `query-balloon` shows
//!    the memory the guest took back (`host.balloon.oom`);
//! 5. sets the whole memory as the last target (an empty balloon) and waits for it, then
//!    sets one more (4 MiB below) as the end signal: the guest empties the balloon with
//!    `deflate_all` and exits (so QEMU never exits under a pending `query-balloon`).

use super::devices::transport_props;
use super::qmp::Qmp;
use super::{Check, HostContext, HostOutcome, HostSide, Machine, Transport};
use serde_json::json;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The balloon's QOM id.
pub const BALLOON_ID: &str = "balloon0";
/// Default targets (MiB the guest keeps), for the default 256 MiB guest.
pub const DEFAULT_TARGETS: &str = "192,128,224,160";
const MIB: u64 = 1 << 20;
/// The last target: this much below the whole memory, as "the host is done".
const END_SIGNAL_MIB: u64 = 4;
/// Bound on reaching one target, and on every other wait.
const STEP: Duration = Duration::from_secs(60);

fn guest_word<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
    args.iter()
        .rev()
        .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

/// One statistics set the guest printed: (total, free, available).
pub fn printed_stats(serial: &str) -> Vec<(i64, i64, i64)> {
    serial
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("BALLOON-STATS "))
        .filter_map(|rest| {
            let get = |k: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse::<i64>().ok())
            };
            Some((get("total")?, get("free")?, get("avail")?))
        })
        .collect()
}

/// The `STAT key=value` value the guest printed last for `key`.
fn serial_stat(serial: &str, key: &str) -> Option<String> {
    serial
        .lines()
        .rev()
        .filter_map(|l| l.trim_end().strip_prefix("STAT "))
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

pub fn start(ctx: &HostContext<'_>) -> io::Result<HostSide> {
    let cfg = ctx.config;
    let mem = u64::from(cfg.memory_mib) * MIB;
    let args = &cfg.extra_guest_args;
    let test = guest_word(args, "balloon_test")
        .unwrap_or("main")
        .to_string();
    let mut guest_args = vec![format!("balloon_mem={mem}"), "expect_types=5".to_string()];
    let targets_text = match guest_word(args, "balloon_targets") {
        Some(t) => t.to_string(),
        None => {
            guest_args.push(format!("balloon_targets={DEFAULT_TARGETS}"));
            DEFAULT_TARGETS.to_string()
        }
    };
    let targets: Vec<u64> = targets_text
        .split(',')
        .map(|t| t.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::other(format!("balloon_targets={targets_text}: {e}")))?;
    if let Some(t) = targets
        .iter()
        .find(|&&t| t == 0 || t > u64::from(cfg.memory_mib))
    {
        return Err(io::Error::other(format!(
            "balloon target {t} MiB outside 1..={} MiB",
            cfg.memory_mib
        )));
    }

    let mut props = transport_props(cfg.transport).to_string();
    let mut qemu_args: Vec<String> = Vec::new();
    match test.as_str() {
        "oom" => props += ",deflate-on-oom=on",
        "report" => props += ",free-page-reporting=on",
        "report_nohint" => {
            // QEMU's free page hinting needs an iothread; the guest declines it.
            qemu_args.push("-object".into());
            qemu_args.push("iothread,id=balloon-io".into());
            props += ",free-page-hint=on,iothread=balloon-io,free-page-reporting=on";
        }
        _ => {}
    }
    let mut bus = String::new();
    if cfg.machine == Machine::Q35 && cfg.transport == Transport::Modern {
        qemu_args.push("-device".into());
        qemu_args.push("pcie-root-port,id=rpm,chassis=1,bus=pcie.0,addr=0x10".into());
        bus = ",bus=rpm".into();
    }
    qemu_args.push("-device".into());
    qemu_args.push(format!("virtio-balloon-pci,id={BALLOON_ID}{props}{bus}"));
    let qmp_path = ctx.run_dir.join("qmp.sock");
    qemu_args.push("-qmp".into());
    qemu_args.push(format!("unix:{},server=on,wait=off", qmp_path.display()));

    let stop = Arc::new(AtomicBool::new(false));
    let out: Arc<Mutex<HostOutcome>> = Arc::default();
    let worker = {
        let (stop, out) = (stop.clone(), out.clone());
        let serial = ctx.serial_log.to_path_buf();
        std::thread::Builder::new()
            .name("balloon-qmp".into())
            .spawn(move || {
                let mut h = Host {
                    serial,
                    stop: &stop,
                    out: HostOutcome::default(),
                };
                if let Err(e) = h.run(&qmp_path, mem, &targets, &test) {
                    h.check("host.balloon.qmp", false, e.to_string());
                }
                *out.lock().unwrap() = h.out;
            })?
    };
    Ok(HostSide {
        guest_args,
        qemu_args,
        finish: Box::new(move || {
            stop.store(true, Ordering::Relaxed);
            let _ = worker.join();
            std::mem::take(&mut *out.lock().unwrap())
        }),
    })
}

struct Host<'a> {
    serial: PathBuf,
    stop: &'a AtomicBool,
    out: HostOutcome,
}

impl Host<'_> {
    fn check(&mut self, name: &str, passed: bool, detail: String) -> bool {
        self.out.checks.push(Check {
            name: name.into(),
            passed,
            detail,
        });
        passed
    }

    fn stat(&mut self, key: &str, value: impl ToString) {
        self.out.stats.insert(key.into(), value.to_string());
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    fn stopped(&self) -> io::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            Err(io::Error::other("QEMU exited"))
        } else {
            Ok(())
        }
    }

    fn wait_serial(&self, want: &str) -> io::Result<()> {
        let t0 = Instant::now();
        loop {
            if self.serial_text().lines().any(|l| l.trim_end() == want) {
                return Ok(());
            }
            if t0.elapsed() > STEP {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("guest never printed {want:?}"),
                ));
            }
            self.stopped()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn actual(q: &mut Qmp) -> io::Result<u64> {
        let r = q.execute("query-balloon", None)?;
        r["actual"]
            .as_u64()
            .ok_or_else(|| io::Error::other(format!("query-balloon: {r}")))
    }

    /// `balloon value=` then waits until `query-balloon` reports it. With `oom_next`, the
    /// guest takes pages back (`deflate_for_oom`) half a second after reaching this target:
    /// should this poll miss the moment, `actual` = target + the pages the guest says it
    /// took back (after its `STAT balloon.oom=done`) counts too, and the detail says so.
    fn target(&mut self, q: &mut Qmp, i: usize, mib: u64, oom_next: bool) -> io::Result<bool> {
        let want = mib * MIB;
        let t0 = Instant::now();
        q.execute("balloon", Some(json!({ "value": want })))?;
        let mut last;
        let mut via_oom = false;
        let reached = loop {
            last = Self::actual(q)?;
            if last == want {
                break true;
            }
            if oom_next {
                let serial = self.serial_text();
                let pages: Option<u64> =
                    serial_stat(&serial, "balloon.oom.pages").and_then(|v| v.parse().ok());
                if serial
                    .lines()
                    .any(|l| l.trim_end() == "STAT balloon.oom=done")
                    && pages.is_some_and(|p| last == want + p * 4096)
                {
                    via_oom = true;
                    break true;
                }
            }
            if t0.elapsed() > STEP || self.stop.load(Ordering::Relaxed) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        let ms = t0.elapsed().as_millis();
        self.stat(&format!("host.balloon.target{i}_ms"), ms);
        Ok(self.check(
            &format!("host.balloon.target{i}"),
            reached,
            format!(
                "balloon value={want} ({mib} MiB): query-balloon actual {last} after {ms} ms{}",
                if via_oom {
                    " (the target plus the guest's OOM deflate: this poll missed the moment)"
                } else {
                    ""
                }
            ),
        ))
    }

    fn stats(&mut self, q: &mut Qmp) -> io::Result<()> {
        let path = format!("/machine/peripheral/{BALLOON_ID}");
        let get = |q: &mut Qmp| {
            q.execute(
                "qom-get",
                Some(json!({ "path": path, "property": "guest-stats" })),
            )
        };
        let first = get(q)?;
        let t0 = Instant::now();
        let mut cur = first.clone();
        let mut matched = None;
        loop {
            let s = &cur["stats"];
            let vals = (
                s["stat-total-memory"].as_i64().unwrap_or(-1),
                s["stat-free-memory"].as_i64().unwrap_or(-1),
                s["stat-available-memory"].as_i64().unwrap_or(-1),
            );
            let refreshed = cur["last-update"] != first["last-update"];
            if refreshed && printed_stats(&self.serial_text()).contains(&vals) {
                matched = Some(vals);
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                break;
            }
            self.stopped()?;
            std::thread::sleep(Duration::from_millis(100));
            cur = get(q)?;
        }
        // Tags the guest does not send stay at -1.
        let unsent: Vec<String> = cur["stats"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, v)| {
                        ![
                            "stat-total-memory",
                            "stat-free-memory",
                            "stat-available-memory",
                        ]
                        .contains(&k.as_str())
                            // -1 (QEMU prints it as u64::MAX)
                            && v.as_i64() != Some(-1)
                            && v.as_u64() != Some(u64::MAX)
                    })
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect()
            })
            .unwrap_or_default();
        self.stat("host.balloon.stats.last_update", &cur["last-update"]);
        self.check(
            "host.balloon.stats",
            matched.is_some() && unsent.is_empty(),
            format!(
                "qom-get guest-stats refreshed (last-update {} -> {}): {}; tags the guest did not \
                 send but QEMU shows set: {}",
                first["last-update"],
                cur["last-update"],
                match matched {
                    Some((total, free, available)) => format!(
                        "total {total}, free {free}, available {available} bytes, as the guest sent"
                    ),
                    None => "no answer with the values the guest sent within 10 s".to_string(),
                },
                if unsent.is_empty() {
                    "none".to_string()
                } else {
                    unsent.join(", ")
                }
            ),
        );
        Ok(())
    }

    fn oom(&mut self, q: &mut Qmp, target_mib: u64) -> io::Result<()> {
        self.wait_serial("STAT balloon.oom=done")?;
        let serial = self.serial_text();
        let pages: u64 = serial_stat(&serial, "balloon.oom.pages")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let want = target_mib * MIB + pages * 4096;
        let t0 = Instant::now();
        let mut actual = Self::actual(q)?;
        while actual != want && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(25));
            actual = Self::actual(q)?;
        }
        self.check(
            "host.balloon.oom",
            pages > 0 && actual == want,
            format!(
                "guest took {pages} pages back under memory pressure: query-balloon actual {actual} (target {} + {} = {want})",
                target_mib * MIB,
                pages * 4096
            ),
        );
        Ok(())
    }

    fn run(&mut self, qmp: &Path, mem: u64, targets: &[u64], test: &str) -> io::Result<()> {
        let mut q = Qmp::connect(qmp, Duration::from_secs(10))?;
        self.stat("host.balloon.qemu", &q.version);
        q.execute(
            "qom-set",
            Some(json!({
                "path": format!("/machine/peripheral/{BALLOON_ID}"),
                "property": "guest-stats-polling-interval",
                "value": 1
            })),
        )?;
        self.wait_serial("STAT balloon.phase=ready")?;
        let mut i = 0;
        for (k, &t) in targets.iter().enumerate() {
            let oom_next = test == "oom" && k + 1 == targets.len();
            if !self.target(&mut q, i, t, oom_next)? {
                return Ok(());
            }
            i += 1;
        }
        self.stats(&mut q)?;
        if test == "oom"
            && let Some(&last) = targets.last()
        {
            self.oom(&mut q, last)?;
        }
        if self.target(&mut q, i, mem / MIB, false)? {
            // The end signal: any new target tells the guest we have seen the last one
            // (it then empties the balloon with `deflate_all` and exits). The guest can act
            // on it and QEMU exit before QMP's answer reaches us (on a loaded host the
            // connection is then reset), so the answer is not awaited as a check: the
            // guest's `balloon.deflate_all` check says whether the signal arrived.
            let _ = q.execute(
                "balloon",
                Some(json!({ "value": mem - END_SIGNAL_MIB * MIB })),
            );
        }
        let events: BTreeMap<String, usize> = q.events.iter().fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e["event"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            m
        });
        let changes = events.get("BALLOON_CHANGE").copied().unwrap_or(0);
        self.stat("host.balloon.change_events", changes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let s = "x\nBALLOON-STATS seq=1 total=268435456 free=1000 avail=1000\r\n\
                 STAT balloon.oom.pages=1024\nBALLOON-STATS seq=2 total=5 free=6 avail=7\n";
        assert_eq!(printed_stats(s), vec![(268435456, 1000, 1000), (5, 6, 7)]);
        assert_eq!(serial_stat(s, "balloon.oom.pages").as_deref(), Some("1024"));
        assert_eq!(serial_stat(s, "balloon.oom"), None);
    }
}
