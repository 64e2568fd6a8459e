//! `cargo xtask bench net [--bytes N] [--repeats R]`: the network benchmark.
//!
//! Three QEMU configurations on the same machine and device (q35, modern virtio-net-pci behind a
//! root port, user networking, `ioeventfd=off` so every notify write is one trace line),
//! each running the `net` scenarios' TCP transfer with the host peer: `N` bytes (default
//! 64 MiB) host → guest, then `N` bytes guest → host, every byte checked and hashed at
//! both ends:
//! - ours: the `net` scenario (virtio-net crate under smoltcp), MSI-X, on the split ring;
//! - ours, packed: the same with `-global virtio-net-pci.packed=on`; the run must show that
//!   VIRTIO_F_RING_PACKED was negotiated (the guest's `net.features`), or it fails;
//! - theirs: `net-vd`, the same smoltcp stack and transfer code over the `virtio-drivers`
//!   crate's `VirtIONet`, polled (it has no interrupt handling).
//!
//! - where this host allows a network namespace with a tap (root, `/dev/net/tun`, `ip
//!   netns`; otherwise the bench says why and leaves them out): ours on a tap with a vnet
//!   header (`net-tap`, `tests/src/qemu/tap.rs`) against a Linux TCP server in the
//!   namespace, twice: with TSO (`net_offload=all`: CSUM + HOST_TSO4, GUEST_CSUM +
//!   GUEST_TSO4) and without (`net_offload=notso`: the same minus HOST_TSO4/6). A TSO
//!   session that sent no TSO frame, or a no-TSO one that sent any, fails. Then theirs
//!   over the same tap (`net-vd-tap`): slirp's per-packet work sets our driver's pace in
//!   the sessions above (theirs moves about as much through slirp as over the tap), a tap
//!   does not, so this is where the drivers' own difference shows.
//!   Issue 15's targets stay judged on the slirp sessions; the tap ratios are printed
//!   beside them as information.
//!
//! `R` repeats (default 3), interleaved (ours, ours packed, theirs, tap TSO, tap no TSO,
//! theirs on the tap, ours, ...), with the release build of the bench guest (the
//! optimisation level the drivers ship at).
//!
//! Per phase: throughput (guest clock; median and min–max over the repeats), packets
//! (guest), guest instructions and halts per packet (the project's TCG plugin, between
//! the phase's markers; see `bench/insns.rs`), and kicks and interrupts per packet per
//! queue; all but the throughput are medians over the repeats. QEMU's trace (`virtio_queue_notify`, `virtio_notify`) is split by the
//! guest's phase markers (`fw_cfg_select` of key `0x3F50..0x3F53`, see the guest's
//! `net/stack.rs`); interrupts are attributed to a queue through the `vq` pointer its
//! kicks show. For ours the guest's own counters (interrupts *taken*) are shown too and
//! its kicks are cross-checked against QEMU's; QEMU's column counts interrupts *sent*.
//! The packed session gets the same checks: QEMU traces `virtio_queue_notify` and
//! `virtio_notify` alike for both ring layouts. A table sets ours packed against ours
//! split; then the tap sessions with TSO against without (see `print_tap_table`), and
//! both against theirs on the tap (`print_tap_against_theirs`).

use crate::bench::Spread;
use crate::bench::insns::{self, Counters, Counting};
use std::collections::BTreeMap;
use virtio_tests::qemu::{self, IrqMode, Machine, RunConfig, RunReport, Transport, tap};

/// Guest marker values (`MARK_*` in the guest's `net/stack.rs`): phase `i` (0 recv,
/// 1 send) starts at `0x50 + 2i` and ends at `0x51 + 2i`.
const MARK_BASE: usize = 0x50;
const PHASES: [(&str, &str); 2] = [("recv", "host → guest"), ("send", "guest → host")];
const RX: u32 = 0;
const TX: u32 = 1;

/// VIRTIO_F_RING_PACKED (virtio 1.2 §6).
const RING_PACKED_BIT: u32 = 34;

/// `cargo xtask bench net --bytes N --repeats R`: `bytes` each way over each driver, `R`
/// times, interleaved.
pub fn cmd(bytes: u64, repeats: u32, profile: bool) -> Result<bool, String> {
    let mut counting = Counting::prepare()?;
    counting.profile = profile;
    let (mut ours, mut packed, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tso, mut no_tso, mut theirs_tap) = (Vec::new(), Vec::new(), Vec::new());
    let tap_ok = tap::available();
    if let Err(why) = &tap_ok {
        eprintln!("xtask: bench net: no tap sessions (TSO comparison left out): {why}");
    }
    for repeat in 1..=repeats {
        // (scenario, interrupts, packed ring, offloads, where its session goes), in the
        // order they run.
        type Plan<'a> = (
            &'static str,
            IrqMode,
            bool,
            Option<&'static str>,
            &'a mut Vec<Session>,
        );
        let mut plan: Vec<Plan> = vec![
            ("net", IrqMode::Msix, false, None, &mut ours),
            ("net", IrqMode::Msix, true, None, &mut packed),
            ("net-vd", IrqMode::Poll, false, None, &mut theirs),
        ];
        if tap_ok.is_ok() {
            plan.extend([
                ("net-tap", IrqMode::Msix, false, Some("all"), &mut tso),
                ("net-tap", IrqMode::Msix, false, Some("notso"), &mut no_tso),
                ("net-vd-tap", IrqMode::Poll, false, None, &mut theirs_tap),
            ]);
        }
        for (scenario, irq, packed, offload, list) in plan {
            list.push(session(
                &counting, scenario, irq, packed, offload, bytes, repeat,
            )?);
        }
    }
    print_table(bytes, &ours, &packed, &theirs);
    match &tap_ok {
        Ok(()) => {
            print_tap_table(bytes, &tso, &no_tso);
            print_tap_against_theirs(&tso, &no_tso, &theirs_tap);
        }
        Err(why) => {
            println!();
            println!("tap sessions (TSO against no TSO): not run on this host: {why}");
        }
    }
    let all = || {
        ours.iter()
            .chain(&packed)
            .chain(&theirs)
            .chain(&tso)
            .chain(&no_tso)
            .chain(&theirs_tap)
    };
    // Issue 15's targets: our driver as it ships (split ring) against virtio-drivers.
    let phase = |name: &str| PHASES.iter().position(|(p, _)| *p == name);
    let targets = crate::bench::targets::report(
        "ratios of medians over this run's repeats",
        &[
            crate::bench::targets::Target {
                what: "receive throughput, ours / theirs",
                ratio: throughput_ratio(&ours, &theirs, phase("recv")),
                bound: 1.5,
                at_most: false,
            },
            crate::bench::targets::Target {
                what: "send throughput, ours / theirs",
                ratio: throughput_ratio(&ours, &theirs, phase("send")),
                bound: 3.0,
                at_most: false,
            },
        ],
    );
    if tap_ok.is_ok() {
        let ratio_of = |ours: &[Session], name| throughput_ratio(ours, &theirs_tap, phase(name));
        println!(
            "the same ratios on the tap (information, not the targets): receive {:.3}, send \
             {:.3} with our driver as it ships (TSO negotiated); {:.3} and {:.3} without TSO",
            ratio_of(&tso, "recv"),
            ratio_of(&tso, "send"),
            ratio_of(&no_tso, "recv"),
            ratio_of(&no_tso, "send")
        );
    }
    let failed = all().filter(|s| !s.ok).count();
    let ok = failed == 0;
    let what = if ok {
        "each passed its checks, the bytes' hashes matched on both sides, our driver's kicks \
         matched QEMU's, the plugin's markers matched the trace, and each of ours ran on the \
         ring it is named for"
    } else {
        "failed runs are reported above and left out of the figures"
    };
    println!(
        "bench net: {} ({} runs{}; {what}); {targets} (split ring)",
        if ok { "PASS" } else { "FAIL" },
        all().count(),
        if ok {
            String::new()
        } else {
            format!(", {failed} failed")
        }
    );
    Ok(ok)
}

/// `--bytes`' value parser: what [`parse_bytes`] accepts, or why not.
pub fn parse_bytes_arg(s: &str) -> Result<u64, String> {
    parse_bytes(s).ok_or_else(|| {
        format!("{s:?} is not a byte count: expected N, NK, NM or NG (binary units), above 0")
    })
}

/// `N`, `NK`, `NM`, `NG` (binary units).
fn parse_bytes(s: &str) -> Option<u64> {
    let (num, shift) = match s.to_ascii_uppercase().chars().last()? {
        'K' => (&s[..s.len() - 1], 10),
        'M' => (&s[..s.len() - 1], 20),
        'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
}

/// Kicks and interrupts of one queue.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct QueueCounts {
    kicks: u64,
    irqs: u64,
}

/// One phase of a session.
#[derive(Clone, Debug, Default)]
struct Phase {
    mib_s: f64,
    rx_packets: u64,
    tx_packets: u64,
    /// The guest driver's counters (ours only): rx, tx queue; all interrupts taken.
    guest: Option<(QueueCounts, QueueCounts, u64)>,
    /// From QEMU's trace: per queue index, and all interrupts sent.
    qemu: BTreeMap<u32, QueueCounts>,
    qemu_irqs: u64,
    /// Guest instructions and halts between the phase's markers (the TCG plugin).
    counted: Option<Counters>,
    /// Bytes the phase moved (its direction's payload).
    bytes: u64,
    /// Offloads (tap sessions; 0 elsewhere): TSO frames sent, the segments they become,
    /// and every frame sent counted as the segments the wire carries.
    tso_frames: u64,
    tso_segments: u64,
    wire_segments: u64,
    csum_offloaded: u64,
    rx_gso_frames: u64,
    /// Frames received, each coalesced one counted as the segments it joins.
    rx_wire_segments: u64,
}

impl Phase {
    fn packets(&self) -> u64 {
        self.rx_packets + self.tx_packets
    }
}

struct Session {
    name: &'static str,
    config: String,
    /// QEMU offered the packed ring (`packed=on`).
    packed: bool,
    ok: bool,
    phases: Vec<Phase>,
    /// Tap sessions: frames the tap received from the guest over the whole run.
    tap_rx_frames: Option<u64>,
}

/// Whether the guest negotiated the packed ring: `net.features` (hex) has bit 34, or a
/// check detail names it.
fn negotiated_packed(r: &RunReport) -> bool {
    r.stat("net.features").is_some_and(has_ring_packed)
        || r.checks.iter().any(|c| c.detail.contains("RING_PACKED"))
}

/// Whether a feature word as the guest prints it (`0x...`) has VIRTIO_F_RING_PACKED.
fn has_ring_packed(features: &str) -> bool {
    u64::from_str_radix(features.trim_start_matches("0x"), 16)
        .is_ok_and(|f| f & 1 << RING_PACKED_BIT != 0)
}

/// One run of `scenario`; `offload` is a tap session's `net_offload=`.
fn session(
    counting: &Counting,
    scenario: &'static str,
    irq: IrqMode,
    packed: bool,
    offload: Option<&str>,
    bytes: u64,
    repeat: u32,
) -> Result<Session, String> {
    let mut cfg = RunConfig::new(scenario)
        .machine(Machine::Q35)
        .transport(Transport::Modern)
        .irq(irq)
        .guest_arg(format!("net_bytes={bytes}"))
        .guest_arg("net_link=0");
    if let Some(o) = offload {
        cfg = cfg.guest_arg(format!("net_offload={o}"));
    }
    let ring = match (packed, offload) {
        (true, _) => "-packed".to_string(),
        (false, Some(o)) => format!("-{o}"),
        (false, None) => String::new(),
    };
    if packed {
        cfg.extra_qemu_args.extend([
            "-global".to_string(),
            "virtio-net-pci.packed=on".to_string(),
        ]);
    }
    // The release guest, the plugin, and the trace of the guest's phase markers (the
    // runner traces the virtio events already); keeps the run directory for the trace.
    let plugin_out = counting.instrument(&mut cfg, &format!("{scenario}{ring}"));
    cfg.install_missing = true;
    cfg.label = Some(format!("bench{ring}"));
    // TCG moves 20-40 MiB/s; leave room for slow hosts.
    cfg.timeout = Some(std::time::Duration::from_secs(120 + 2 * (bytes >> 20)));
    eprintln!(
        "xtask: bench net: repeat {repeat}: {scenario} [{}]{}{}, {bytes} bytes each way...",
        cfg.config_name(),
        if packed { " on the packed ring" } else { "" },
        offload
            .map(|o| format!(" net_offload={o}"))
            .unwrap_or_default()
    );
    let r = qemu::run_scenario(&cfg).map_err(|e| e.to_string())?;
    let trace = std::fs::read_to_string(r.run_dir.join("trace.log")).unwrap_or_default();
    let mut ok = r.passed() && hashes_match(&r);
    if !ok {
        print!("{}", r.summary());
    }
    // Every session must run on the ring it is named for (QEMU's default is packed=off).
    if r.passed() && negotiated_packed(&r) != packed {
        eprintln!(
            "xtask: bench net: {scenario}{}: the guest {} the packed ring (net.features={})",
            if packed { " packed=on" } else { "" },
            if packed {
                "did not negotiate"
            } else {
                "negotiated"
            },
            r.stat("net.features").unwrap_or("not reported")
        );
        ok = false;
    }
    // A tap session must have used the offload it is named for.
    if r.passed() && offload.is_some() {
        let tso = r.stat_u64("net.send.tso_frames").unwrap_or(0);
        let want_tso = offload == Some("all");
        if (tso > 0) != want_tso {
            eprintln!(
                "xtask: bench net: net-tap net_offload={}: {tso} TSO frames sent",
                offload.unwrap_or_default()
            );
            ok = false;
        }
    }
    let by_phase = phase_trace(&trace);
    if counting.profile {
        let units: Vec<(&str, u8, u64)> = PHASES
            .iter()
            .enumerate()
            .map(|(i, (p, _))| {
                let n = |k: &str| r.stat_u64(&format!("net.{p}.{k}")).unwrap_or(0);
                (
                    *p,
                    (MARK_BASE + 2 * i) as u8,
                    n("rx_packets") + n("tx_packets"),
                )
            })
            .collect();
        let title = format!("repeat {repeat}, {scenario}{ring} (per packet, both directions)");
        insns::print_run_profile(
            counting,
            &format!("{scenario}{ring}"),
            &r.run_dir,
            &title,
            &units,
        )?;
    }
    let counted = insns::read_run(&plugin_out, &r.run_dir);
    if let Err(e) = &counted {
        eprintln!("xtask: bench net: {scenario}: no instruction counts: {e}");
        ok = false;
    }
    let mut phases = Vec::new();
    for (i, (p, _)) in PHASES.iter().enumerate() {
        let get = |k: &str| r.stat(&format!("net.{p}.{k}")).map(str::to_string);
        let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        let Some(mib_s) = get("mib_s").and_then(|v| v.parse::<f64>().ok()) else {
            ok = false;
            phases.push(Phase::default());
            continue;
        };
        let guest = match (
            num("rx_kicks"),
            num("tx_kicks"),
            num("rx_irqs"),
            num("tx_irqs"),
            num("irqs"),
        ) {
            (Some(rk), Some(tk), Some(ri), Some(ti), Some(all)) => Some((
                QueueCounts {
                    kicks: rk,
                    irqs: ri,
                },
                QueueCounts {
                    kicks: tk,
                    irqs: ti,
                },
                all,
            )),
            _ => None,
        };
        let (qemu, qemu_irqs) = by_phase.get(&i).cloned().unwrap_or_default();
        if qemu.is_empty() && qemu_irqs == 0 {
            eprintln!("xtask: bench net: {scenario}: no trace lines for phase {p}");
            ok = false;
        }
        let start = (MARK_BASE + 2 * i) as u8;
        let phase = Phase {
            mib_s,
            rx_packets: num("rx_packets").unwrap_or(0),
            tx_packets: num("tx_packets").unwrap_or(0),
            guest,
            qemu,
            qemu_irqs,
            counted: counted
                .as_ref()
                .ok()
                .and_then(|at| insns::between(at, start, start + 1)),
            bytes: num("bytes").unwrap_or(0),
            tso_frames: num("tso_frames").unwrap_or(0),
            tso_segments: num("tso_segments").unwrap_or(0),
            wire_segments: num("wire_segments").unwrap_or(0),
            csum_offloaded: num("csum_offloaded").unwrap_or(0),
            rx_gso_frames: num("rx_gso_frames").unwrap_or(0),
            rx_wire_segments: num("rx_wire_segments").unwrap_or(0),
        };
        // ioeventfd=off: QEMU sees exactly the kicks our driver counted.
        if let Some((rx, tx, _)) = phase.guest {
            let q = |n| phase.qemu.get(&n).map_or(0, |c: &QueueCounts| c.kicks);
            if (q(RX), q(TX)) != (rx.kicks, tx.kicks) {
                eprintln!(
                    "xtask: bench net: {scenario} {p}: guest counted kicks rx {} tx {}, QEMU traced rx {} tx {}",
                    rx.kicks,
                    tx.kicks,
                    q(RX),
                    q(TX)
                );
                ok = false;
            }
        }
        phases.push(phase);
    }
    if ok && !r.kept {
        // Already removed.
    } else if ok {
        let _ = std::fs::remove_dir_all(&r.run_dir);
    } else {
        eprintln!("xtask: bench net: logs kept in {}", r.run_dir.display());
    }
    Ok(Session {
        name: scenario,
        config: cfg.config_name(),
        packed,
        ok,
        phases,
        tap_rx_frames: r.stat_u64("host.tap.rx_packets"),
    })
}

/// Both ends hashed the same bytes in both directions.
fn hashes_match(r: &RunReport) -> bool {
    let pairs = [
        ("net.recv.hash", "host.net.conn0.down_hash"),
        ("net.send.hash", "host.net.conn0.up_hash"),
    ];
    pairs.iter().all(|(g, h)| {
        let ok = r.stat(g).is_some() && r.stat(g) == r.stat(h);
        if !ok {
            eprintln!(
                "xtask: bench net: {g}={:?} but {h}={:?}",
                r.stat(g),
                r.stat(h)
            );
        }
        ok
    })
}

/// Per phase (0 recv, 1 send): kicks and interrupts per queue index, and all interrupts
/// QEMU sent. A `virtio_notify` is attributed to the queue whose kicks show its `vq`
/// pointer (over the whole trace); one that never kicked counts only in the total.
fn phase_trace(trace: &str) -> BTreeMap<usize, (BTreeMap<u32, QueueCounts>, u64)> {
    let mut vq_index: BTreeMap<String, u32> = BTreeMap::new();
    let mut events: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for line in trace.lines() {
        // The log backend prefixes "pid@seconds.micros:".
        let body = match line.split_once(':') {
            Some((prefix, rest)) if prefix.contains('@') => rest,
            _ => line,
        };
        let mut words = body.split_whitespace();
        let Some(event) = words.next() else { continue };
        if !matches!(
            event,
            "fw_cfg_select" | "virtio_queue_notify" | "virtio_notify" | "virtio_notify_irqfd"
        ) {
            continue;
        }
        let w: Vec<&str> = words.collect();
        let fields: BTreeMap<String, String> = w
            .windows(2)
            .filter(|p| matches!(p[0], "vdev" | "vq" | "n" | "key"))
            .map(|p| (p[0].to_string(), p[1].to_string()))
            .collect();
        if event == "virtio_queue_notify"
            && let (Some(vq), Some(n)) = (fields.get("vq"), fields.get("n"))
            && let Ok(n) = n.parse()
        {
            vq_index.insert(vq.clone(), n);
        }
        events.push((event.to_string(), fields));
    }
    let mut out: BTreeMap<usize, (BTreeMap<u32, QueueCounts>, u64)> = BTreeMap::new();
    let mut current: Option<usize> = None;
    for (event, f) in &events {
        match event.as_str() {
            "fw_cfg_select" => {
                let key = f
                    .get("key")
                    .and_then(|k| usize::from_str_radix(k.trim_start_matches("0x"), 16).ok());
                if let Some(k) = key.filter(|k| k & 0xFF00 == 0x3F00) {
                    let v = k & 0xFF;
                    if (MARK_BASE..MARK_BASE + 2 * PHASES.len()).contains(&v) {
                        let phase = (v - MARK_BASE) / 2;
                        let start = (v - MARK_BASE).is_multiple_of(2);
                        current = start.then_some(phase);
                        out.entry(phase).or_default();
                    }
                }
            }
            "virtio_queue_notify" => {
                if let (Some(p), Some(n)) = (current, f.get("n").and_then(|n| n.parse().ok())) {
                    out.entry(p).or_default().0.entry(n).or_default().kicks += 1;
                }
            }
            _ => {
                if let Some(p) = current {
                    let e = out.entry(p).or_default();
                    e.1 += 1;
                    if let Some(&n) = f.get("vq").and_then(|vq| vq_index.get(vq)) {
                        e.0.entry(n).or_default().irqs += 1;
                    }
                }
            }
        }
    }
    out
}

fn per(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() {
        "—".into()
    } else if b == 0.0 {
        if a == 0.0 { "—".into() } else { "∞".into() }
    } else {
        format!("{:.2}", a / b)
    }
}

/// The median over sessions of `figure` of phase `i` (NaN when no session has it).
fn median(sessions: &[Session], i: usize, figure: impl Fn(&Phase) -> Option<f64>) -> f64 {
    mid(spread(sessions, i, figure))
}

/// A spread's median, NaN for none.
fn mid(s: Option<Spread>) -> f64 {
    s.map_or(f64::NAN, |s| s.median)
}

/// Median throughput of `ours` over that of `theirs` in phase `i` (NaN without both): what
/// issue 15's network targets are judged on.
fn throughput_ratio(ours: &[Session], theirs: &[Session], i: Option<usize>) -> f64 {
    let Some(i) = i else {
        return f64::NAN;
    };
    let (o, t) = (
        median(ours, i, |ph| Some(ph.mib_s)),
        median(theirs, i, |ph| Some(ph.mib_s)),
    );
    if t > 0.0 { o / t } else { f64::NAN }
}

/// `median (min–max)` with `decimals`, or `—` for no value.
fn range(s: Option<Spread>, decimals: usize) -> String {
    s.map_or("—".into(), |s| {
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            s.median, s.min, s.max
        )
    })
}

fn spread(
    sessions: &[Session],
    i: usize,
    figure: impl Fn(&Phase) -> Option<f64>,
) -> Option<Spread> {
    let values: Vec<f64> = sessions
        .iter()
        .filter(|s| s.ok)
        .filter_map(|s| s.phases.get(i).and_then(&figure))
        .collect();
    Spread::of(&values)
}

/// `x` with `decimals`, or `—` for no value.
fn fixed(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "—".into()
    }
}

/// Kicks and interrupts per packet of one queue, from QEMU's trace: rx ones per received
/// packet, tx ones per sent packet.
type Pick = fn(&QueueCounts) -> u64;
const QUEUE_ROWS: [(&str, u32, Pick); 4] = [
    ("rx kicks per rx packet", RX, |c| c.kicks),
    ("tx kicks per tx packet", TX, |c| c.kicks),
    ("rx interrupts per rx packet", RX, |c| c.irqs),
    ("tx interrupts per tx packet", TX, |c| c.irqs),
];

/// `n` per MiB the phase moved (`None` when it moved nothing).
fn per_mib(n: u64, ph: &Phase) -> Option<f64> {
    (ph.bytes > 0).then(|| n as f64 * f64::from(1u32 << 20) / ph.bytes as f64)
}

/// One queue's kicks or interrupts in a phase, from QEMU's trace.
fn queue_count(ph: &Phase, q: u32, pick: Pick) -> u64 {
    ph.qemu.get(&q).map_or(0, pick)
}

fn queue_per_packet(ph: &Phase, q: u32, pick: Pick) -> f64 {
    let den = if q == RX {
        ph.rx_packets
    } else {
        ph.tx_packets
    };
    per(queue_count(ph, q, pick), den)
}

fn print_table(bytes: u64, ours: &[Session], packed: &[Session], theirs: &[Session]) {
    let describe = |sessions: &[Session]| {
        let failed = sessions.iter().filter(|s| !s.ok).count();
        let first = sessions.first();
        format!(
            "`{}` [{}]{}, {} runs{}",
            first.map_or("", |s| s.name),
            first.map_or(String::new(), |s| s.config.clone()),
            if first.is_some_and(|s| s.packed) {
                " with packed=on"
            } else {
                ""
            },
            sessions.len(),
            if failed > 0 {
                format!(" ({failed} FAILED, left out)")
            } else {
                String::new()
            }
        )
    };
    println!();
    println!(
        "net benchmark: {} MiB each way over TCP (smoltcp, host peer through slirp); q35, modern \
         virtio-net-pci, ioeventfd=off, TCG, 1 vCPU, release guest; repeats interleaved",
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  ours:        {}: the virtio-net crate over virtio-pci + virtio-core, split ring",
        describe(ours)
    );
    println!(
        "  ours packed: {}: the same on the packed ring (VIRTIO_F_RING_PACKED negotiated in \
         every run counted)",
        describe(packed)
    );
    println!(
        "  theirs:      {}: virtio-drivers 0.13 VirtIONet over its PciTransport, polled",
        describe(theirs)
    );
    println!(
        "  throughput: median (min–max) of the runs, guest clock; every other figure: median \
         of the runs"
    );
    println!(
        "  instructions: guest instructions between the phase's markers (TCG plugin) per \
         packet (rx + tx) and per KiB moved, median ±largest deviation of a run; they include \
         smoltcp and the test's own generation, checking and hashing of every byte; theirs \
         polls, so its count includes the spinning and grows with the time it waits"
    );
    println!(
        "  interrupts: guest = taken by our driver (split ring); QEMU = sent (virtio_notify); \
         ratios use QEMU's figures"
    );
    let kib = bytes as f64 / 1024.0;
    for (i, (p, what)) in PHASES.iter().enumerate() {
        println!();
        println!(
            "{:31} {:>12} {:>22} {:>22} {:>22} {:>11}",
            format!("{p} ({what})"),
            "ours (guest)",
            "ours",
            "ours packed",
            "theirs",
            "ours/theirs"
        );
        let mib_s = |sessions: &[Session]| spread(sessions, i, |ph| Some(ph.mib_s));
        let (o, k, t) = (mib_s(ours), mib_s(packed), mib_s(theirs));
        println!(
            "  {:29} {:>12} {:>22} {:>22} {:>22} {:>11}",
            "throughput MiB/s",
            "",
            range(o, 2),
            range(k, 2),
            range(t, 2),
            ratio(mid(o), mid(t))
        );
        let packets = |sessions: &[Session]| {
            format!(
                "{}/{}",
                fixed(median(sessions, i, |ph| Some(ph.rx_packets as f64)), 0),
                fixed(median(sessions, i, |ph| Some(ph.tx_packets as f64)), 0)
            )
        };
        println!(
            "  {:29} {:>12} {:>22} {:>22} {:>22}",
            "packets rx / tx",
            "",
            packets(ours),
            packets(packed),
            packets(theirs)
        );
        type Figure = fn(&Phase, f64) -> Option<f64>;
        // Halts get no ratio: more of them is neither better nor worse by itself.
        let counted_rows: [(&str, Figure, usize); 3] = [
            (
                "instructions per packet",
                |ph, _| ph.counted.map(|c| per(c.instructions, ph.packets())),
                0,
            ),
            (
                "instructions per KiB",
                |ph, kib| ph.counted.map(|c| c.instructions as f64 / kib),
                0,
            ),
            (
                "halts per packet",
                |ph, _| ph.counted.map(|c| per(c.halts, ph.packets())),
                3,
            ),
        ];
        for (label, figure, decimals) in counted_rows {
            let (os, ks, ts) = (
                spread(ours, i, |ph| figure(ph, kib)),
                spread(packed, i, |ph| figure(ph, kib)),
                spread(theirs, i, |ph| figure(ph, kib)),
            );
            let (o, t) = (mid(os), mid(ts));
            // Instructions: median ±largest deviation of a run from it.
            let show = |s: Option<Spread>| match s {
                None => "—".into(),
                Some(s) if decimals == 0 => s.with_deviation(),
                Some(s) => fixed(s.median, decimals),
            };
            println!(
                "  {label:29} {:>12} {:>22} {:>22} {:>22} {:>11}",
                "",
                show(os),
                show(ks),
                show(ts),
                if decimals == 0 {
                    ratio(o, t)
                } else {
                    String::new()
                }
            );
        }
        for (label, q, pick) in QUEUE_ROWS {
            let qemu = |ph: &Phase| Some(queue_per_packet(ph, q, pick));
            let guest = median(ours, i, |ph| {
                ph.guest.map(|(r, t, _)| {
                    let (c, den) = if q == RX {
                        (r, ph.rx_packets)
                    } else {
                        (t, ph.tx_packets)
                    };
                    per(pick(&c), den)
                })
            });
            let (o, k, t) = (
                median(ours, i, qemu),
                median(packed, i, qemu),
                median(theirs, i, qemu),
            );
            println!(
                "  {label:29} {:>12} {:>22} {:>22} {:>22} {:>11}",
                fixed(guest, 3),
                fixed(o, 3),
                fixed(k, 3),
                fixed(t, 3),
                ratio(o, t)
            );
        }
        let all = |ph: &Phase| Some(per(ph.qemu_irqs, ph.packets()));
        let guest_all = median(ours, i, |ph| ph.guest.map(|(_, _, n)| per(n, ph.packets())));
        let (o, k, t) = (
            median(ours, i, all),
            median(packed, i, all),
            median(theirs, i, all),
        );
        println!(
            "  {:29} {:>12} {:>22} {:>22} {:>22} {:>11}",
            "interrupts per packet (all)",
            fixed(guest_all, 3),
            fixed(o, 3),
            fixed(k, 3),
            fixed(t, 3),
            ratio(o, t)
        );
    }
    print_packed_ratios(ours, packed);
    println!();
    println!(
        "Linux 6.1 on the same device (virtio-facts.md): receive 0 rx kicks, 0.055 rx interrupts per packet, ~1 tx kick and interrupt per ACK; send 0.985 kicks and 1.97 interrupts per packet."
    );
    println!(
        "Our packed sessions had the same cross-checks as the split ones (kicks against QEMU's \
         virtio_queue_notify, interrupts from virtio_notify): QEMU traces both ring layouts \
         alike."
    );
}

/// Ours on the packed ring against ours on the split ring, per phase: medians' ratios.
fn print_packed_ratios(split: &[Session], packed: &[Session]) {
    println!();
    println!(
        "ours packed / ours split (both MSI-X, run back to back in every repeat), medians \
         (throughput: higher is better; the rest: lower is better; — where both are 0)"
    );
    println!();
    let both = |i: usize, f: &dyn Fn(&Phase) -> Option<f64>| {
        ratio(median(packed, i, f), median(split, i, f))
    };
    let mut header = format!("  {:29}", "");
    for (p, _) in PHASES {
        header += &format!(" {p:>8}");
    }
    println!("{header}");
    let row = |label: &str, f: &dyn Fn(&Phase) -> Option<f64>| {
        let mut line = format!("  {label:29}");
        for i in 0..PHASES.len() {
            line += &format!(" {:>8}", both(i, f));
        }
        println!("{line}");
    };
    row("throughput", &|ph| Some(ph.mib_s));
    row("instructions per packet", &|ph| {
        ph.counted.map(|c| per(c.instructions, ph.packets()))
    });
    for (label, q, pick) in QUEUE_ROWS {
        row(label, &|ph| Some(queue_per_packet(ph, q, pick)));
    }
    row("interrupts per packet (all)", &|ph| {
        Some(per(ph.qemu_irqs, ph.packets()))
    });
}

/// Ours on the tap with TSO against without, per phase: what the offload changes on the
/// transmit side and what it costs the guest (see docs/benchmarks.md, "tap sessions").
fn print_tap_table(bytes: u64, tso: &[Session], no_tso: &[Session]) {
    let failed = |s: &[Session]| s.iter().filter(|s| !s.ok).count();
    println!();
    println!(
        "tap sessions: {} MiB each way between our driver (`net-tap`, q35, modern, MSI-X, \
         split ring) and a Linux TCP server in a network namespace, over a tap with a vnet \
         header; {} + {} runs{}",
        bytes as f64 / (1 << 20) as f64,
        tso.len(),
        no_tso.len(),
        match failed(tso) + failed(no_tso) {
            0 => String::new(),
            n => format!(" ({n} FAILED, left out)"),
        }
    );
    println!(
        "  TSO:    CSUM + HOST_TSO4 (smoltcp builds segments up to 64 KiB, sent as GSO TCPV4 \
         frames), GUEST_CSUM + GUEST_TSO4 on receive"
    );
    println!("  no TSO: the same without HOST_TSO4/6 (transmit checksum offload only)");
    println!(
        "  segments: what the wire carries (a TSO frame counts as the MSS-sized segments the \
         host cuts it into); kicks: the guest's transmit-queue notifications"
    );
    for (i, (p, what)) in PHASES.iter().enumerate() {
        println!();
        println!(
            "{:31} {:>22} {:>22} {:>11}",
            format!("{p} ({what})"),
            "TSO",
            "no TSO",
            "TSO/no TSO"
        );
        type Figure = fn(&Phase) -> Option<f64>;
        // (label, figure, decimals, whether a ratio means something)
        let rows: [(&str, Figure, usize, bool); 9] = [
            ("throughput MiB/s", |ph| Some(ph.mib_s), 2, true),
            (
                "frames sent (guest)",
                |ph| Some(ph.tx_packets as f64),
                0,
                true,
            ),
            ("TSO frames sent", |ph| Some(ph.tso_frames as f64), 0, false),
            (
                "segments per TSO frame",
                |ph| (ph.tso_frames > 0).then(|| per(ph.tso_segments, ph.tso_frames)),
                1,
                false,
            ),
            (
                "segments sent on the wire",
                |ph| Some(ph.wire_segments as f64),
                0,
                true,
            ),
            (
                "segments received",
                |ph| Some(ph.rx_wire_segments as f64),
                0,
                true,
            ),
            (
                "segments per tx kick",
                |ph| ph.guest.map(|(_, tx, _)| per(ph.wire_segments, tx.kicks)),
                1,
                true,
            ),
            (
                "instructions per byte",
                |ph| ph.counted.map(|c| per(c.instructions, ph.bytes)),
                2,
                true,
            ),
            (
                "instructions per segment",
                |ph| {
                    ph.counted
                        .map(|c| per(c.instructions, ph.wire_segments + ph.rx_wire_segments))
                },
                0,
                true,
            ),
        ];
        for (label, figure, d, with_ratio) in rows {
            let (t, n) = (spread(tso, i, figure), spread(no_tso, i, figure));
            println!(
                "  {label:29} {:>22} {:>22} {:>11}",
                range(t, d),
                range(n, d),
                if with_ratio {
                    ratio(mid(t), mid(n))
                } else {
                    String::new()
                }
            );
        }
        let other = |s: &[Session], f: Figure| fixed(median(s, i, f), 0);
        println!(
            "  {:29} {:>22} {:>22}",
            "frames with NEEDS_CSUM",
            other(tso, |ph| Some(ph.csum_offloaded as f64)),
            other(no_tso, |ph| Some(ph.csum_offloaded as f64)),
        );
        println!(
            "  {:29} {:>22} {:>22}",
            "coalesced frames received",
            other(tso, |ph| Some(ph.rx_gso_frames as f64)),
            other(no_tso, |ph| Some(ph.rx_gso_frames as f64)),
        );
    }
    let tap = |s: &[Session]| {
        let v: Vec<f64> = s
            .iter()
            .filter(|s| s.ok)
            .filter_map(|s| s.tap_rx_frames.map(|n| n as f64))
            .collect();
        Spread::of(&v).map_or("—".into(), |s| fixed(s.median, 0))
    };
    println!();
    println!(
        "  {:29} {:>22} {:>22}",
        "tap frames from the guest",
        tap(tso),
        tap(no_tso)
    );
    println!(
        "  (the whole run, both phases, counted by the host's tap: with TSO fewer frames than \
         the upload needs at one 1460-byte segment each, {})",
        bytes / 1460
    );
}

/// Our tap sessions against virtio-drivers' over the same tap, namespace and server
/// (`net-vd-tap`): throughput, guest instructions per byte, and frames, QEMU's kicks and its
/// interrupts per MiB moved (per byte, because with offloads one frame carries up to
/// 64 KiB). Slirp's per-packet work sets our driver's pace in the slirp sessions; a tap
/// does not.
fn print_tap_against_theirs(tso: &[Session], no_tso: &[Session], theirs: &[Session]) {
    let failed = theirs.iter().filter(|s| !s.ok).count();
    println!();
    println!(
        "tap sessions against virtio-drivers: the same tap, namespace and server, \
         virtio-drivers 0.13 VirtIONet polled (`net-vd-tap`, no offloads: it negotiates \
         none); {} runs{}",
        theirs.len(),
        if failed == 0 {
            String::new()
        } else {
            format!(" ({failed} FAILED, left out)")
        }
    );
    type Figure = fn(&Phase) -> Option<f64>;
    for (i, (p, what)) in PHASES.iter().enumerate() {
        println!();
        println!(
            "{:31} {:>22} {:>22} {:>22} {:>11} {:>14}",
            format!("{p} ({what})"),
            "ours, TSO",
            "ours, no TSO",
            "theirs",
            "TSO/theirs",
            "no TSO/theirs"
        );
        // (label, figure, decimals, whether the range is shown). Per byte moved, not per
        // packet: with offloads one frame carries up to 64 KiB.
        let rows: [(&str, Figure, usize, bool); 6] = [
            ("throughput MiB/s", |ph| Some(ph.mib_s), 2, true),
            (
                "instructions per byte",
                |ph| ph.counted.map(|c| per(c.instructions, ph.bytes)),
                2,
                false,
            ),
            (
                "frames rx + tx per MiB",
                |ph| per_mib(ph.packets(), ph),
                1,
                false,
            ),
            (
                "rx kicks per MiB",
                |ph| per_mib(queue_count(ph, RX, |c| c.kicks), ph),
                1,
                false,
            ),
            (
                "tx kicks per MiB",
                |ph| per_mib(queue_count(ph, TX, |c| c.kicks), ph),
                1,
                false,
            ),
            (
                "interrupts per MiB",
                |ph| per_mib(ph.qemu_irqs, ph),
                1,
                false,
            ),
        ];
        for (label, figure, d, ranged) in rows {
            let (t, n, v) = (
                spread(tso, i, figure),
                spread(no_tso, i, figure),
                spread(theirs, i, figure),
            );
            let show = |s: Option<Spread>| {
                if ranged {
                    range(s, d)
                } else {
                    fixed(mid(s), d)
                }
            };
            println!(
                "  {label:29} {:>22} {:>22} {:>22} {:>11} {:>14}",
                show(t),
                show(n),
                show(v),
                ratio(mid(t), mid(v)),
                ratio(mid(n), mid(v))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_units() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("8M"), Some(8 << 20));
        assert_eq!(parse_bytes("1g"), Some(1 << 30));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn packed_feature_bit() {
        assert!(has_ring_packed("0x530010020"));
        assert!(!has_ring_packed("0x130010020"));
        assert!(!has_ring_packed("not hex"));
    }

    #[test]
    fn trace_split_by_markers_and_queues() {
        let t = "\
1@1.0:virtio_queue_notify vdev 0xd n 0 vq 0xa
1@1.1:virtio_notify vdev 0xd vq 0xa
1@1.2:fw_cfg_select 0xf key 0x3f50 'unknown', ret: 0
1@1.3:virtio_queue_notify vdev 0xd n 1 vq 0xb
1@1.4:virtio_notify vdev 0xd vq 0xb
1@1.5:virtio_notify vdev 0xd vq 0xa
1@1.6:virtio_notify vdev 0xd vq 0xc
1@1.7:fw_cfg_select 0xf key 0x3f51 'unknown', ret: 0
1@1.8:virtio_notify vdev 0xd vq 0xa
1@1.9:fw_cfg_select 0xf key 0x3f52 'unknown', ret: 0
2@2.0:virtio_queue_notify vdev 0xd n 1 vq 0xb
2@2.1:virtio_queue_notify vdev 0xd n 1 vq 0xb
2@2.2:fw_cfg_select 0xf key 0x3f53 'unknown', ret: 0
";
        let p = phase_trace(t);
        let (q, all) = &p[&0];
        assert_eq!(q[&0], QueueCounts { kicks: 0, irqs: 1 });
        assert_eq!(q[&1], QueueCounts { kicks: 1, irqs: 1 });
        assert_eq!(*all, 3, "the unknown vq counts in the total");
        let (q, all) = &p[&1];
        assert_eq!(q[&1].kicks, 2);
        assert_eq!(*all, 0);
    }
}
