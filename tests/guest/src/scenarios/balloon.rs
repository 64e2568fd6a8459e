//! `balloon`: the virtio-balloon driver (`virtio_balloon::BalloonDriver` over `virtio-pci` +
//! `virtio-core`) against QEMU's virtio-balloon-pci, with pages from the guest heap
//! (`balloon/pool.rs`) and the host driving targets through QMP
//! (`tests/src/qemu/balloon_host.rs`):
//!
//! 1. `balloon.init`: features (STATS_VQ; DEFLATE_ON_OOM / PAGE_REPORTING when the run turns
//!    them on), queue layout, the interrupt mode (QEMU 7.2's balloon has no MSI-X: `msix`
//!    lands on INTx); `STAT balloon.phase=ready` tells the host to start;
//! 2. `balloon.target<i>`: the host sets each `balloon_targets` value (MiB of guest memory
//!    left, `balloon value=`), the guest inflates or deflates until `num_pages`, the balloon
//!    and `actual` agree, and the host waits for `query-balloon` to say the same; the last
//!    target is all of `balloon_mem` (an empty balloon);
//! 3. `balloon.stats`: the host turns stats polling on (1 s) and compares `qom-get
//!    guest-stats` with the sets the pool printed (`BALLOON-STATS ...`);
//! 4. `balloon_test=oom` (QEMU `deflate-on-oom=on`): at the last target the guest calls
//!    `deflate_for_oom(balloon_oom_pages)`, gets those pages back, and the balloon stays
//!    below the target (`STAT balloon.oom=done`; the host sees `actual` rise by as much);
//! 5. `balloon_test=report` (`free-page-reporting=on`): `balloon_report_ranges` free ranges
//!    reported at bring-up and again after the first target, all acknowledged and back in
//!    the heap (zeroed: QEMU discarded them); `balloon_test=report_nohint` (QEMU also
//!    offers `free-page-hint=on`) the same with hinting declined: QEMU's reporting queue is
//!    4 whatever the driver accepts, and queue 3 stays unused;
//! 6. `balloon.deflate_all`: after the host's end signal (one more target), the balloon is
//!    emptied with `deflate_all`;
//! 7. `balloon.pool`: after `shutdown` every page lent came back exactly once.
//!
//! Parameters: `balloon_mem=` (bytes of guest RAM, required: QEMU's targets are relative to
//! it), `balloon_targets=` (MiB, comma-separated), `balloon_test=main|oom|report|report_nohint`,
//! `balloon_oom_pages=` (default 1024), `balloon_report_ranges=` (default 64, 256 KiB each).

mod pool;

use super::Env;
use super::bus::{self, GuestBus};
use crate::check;
use crate::cmdline::IrqMode;
use crate::report;
use crate::report::show::{FeatureSet, Got, Irq, Opt, yes_no};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use pool::HeapPool;
use virtio_balloon::features::{DEFLATE_ON_OOM, FREE_PAGE_HINT, PAGE_REPORTING, STATS_VQ};
use virtio_balloon::{BalloonDriver, BalloonEvent, BalloonOptions};
use virtio_core::platform::InterruptMode;
use virtio_core::{Bus, DeviceType};

type Driver = BalloonDriver<GuestBus, HeapPool>;

const MIB: u64 = 1 << 20;
const FRAME: u64 = 4096;
/// Default targets: MiB of guest memory left (for `-m 256`).
pub const DEFAULT_TARGETS: &str = "192,128,224,160";

/// Services the device until `cond` holds, for at most `timeout_ms`: halts until one of
/// the device's interrupts (bounded slices) and handles it, or polls in `irq=poll`.
fn serve(
    d: &mut Driver,
    timeout_ms: u64,
    errors: &mut Vec<String>,
    mut cond: impl FnMut(&Driver) -> bool,
) -> bool {
    let deadline = crate::time::now_ns().saturating_add(timeout_ms.saturating_mul(1_000_000));
    loop {
        if cond(d) {
            return true;
        }
        if crate::time::now_ns() >= deadline {
            return false;
        }
        let r = if d.bus().interrupt_mode() == InterruptMode::Polling {
            crate::time::delay_ns(50_000);
            d.poll()
        } else {
            if !d.bus().interrupts().wait(u64::MAX, 10) {
                continue;
            }
            let mut r = Ok(BalloonEvent::default());
            bus::dispatch(
                d,
                |d| d.bus_mut(),
                |d, vector| match d.handle_interrupt(vector) {
                    Ok(ev) => {
                        if let Ok(all) = &mut r {
                            all.needs_reset |= ev.needs_reset;
                        }
                    }
                    Err(e) => r = Err(e),
                },
            );
            r
        };
        match r {
            Ok(ev) if ev.needs_reset => {
                errors.push("device needs reset".into());
                return false;
            }
            Ok(_) => {}
            Err(e) => {
                errors.push(format!("{e}"));
                return false;
            }
        }
    }
}

fn frames_for(mem: u64, target_mib: u64) -> u32 {
    (mem.saturating_sub(target_mib * MIB) / FRAME) as u32
}

pub fn run(env: &mut Env) {
    let mem = env.cmdline.get_u64("balloon_mem", 0);
    if mem == 0 {
        check!("balloon.mem", false, "no balloon_mem= on the command line");
        return;
    }
    let test = String::from(env.cmdline.get("balloon_test").unwrap_or("main"));
    let targets: Vec<u64> = env
        .cmdline
        .get("balloon_targets")
        .unwrap_or(DEFAULT_TARGETS)
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    let oom_pages = env.cmdline.get_u64("balloon_oom_pages", 1024) as usize;
    let report_ranges = env.cmdline.get_u64("balloon_report_ranges", 64) as usize;

    let (heap_before, _) = crate::heap::usage();
    let Some(func) = env.find_virtio(virtio_core::DeviceType::Balloon) else {
        check!("balloon.present", false, "no virtio-balloon on the bus");
        return;
    };
    let addr = func.addr;
    let has_msix = func.msix_table_size().is_some();
    let dev = match bus::open(env, func) {
        Ok(d) => d,
        Err(e) => {
            check!("balloon.init", false, "{addr} {e}");
            return;
        }
    };
    // QEMU offers free page hinting too; the driver declines it.
    let decline_hint = test == "report_nohint";
    let want_report = test == "report" || decline_hint;
    let mut pool = HeapPool::new(mem);
    if want_report {
        pool.range_budget = report_ranges;
    }
    let opts = BalloonOptions {
        // The balloon may take up to 3/4 of the guest's memory.
        max_pages: (mem / FRAME * 3 / 4) as usize,
        free_page_hint: !decline_hint,
        ..BalloonOptions::default()
    };
    let mut d = match BalloonDriver::new(dev, pool, opts) {
        Ok(d) => d,
        Err(e) => {
            check!("balloon.init", false, "{addr} BalloonDriver::new: {e}");
            return;
        }
    };

    // ---- 1. init ----
    let mode = d.bus().interrupt_mode();
    let mode_ok = match (env.irq, mode) {
        (IrqMode::MsiX, InterruptMode::MsiX { .. })
        | (IrqMode::Intx, InterruptMode::Intx)
        | (IrqMode::Poll, InterruptMode::Polling) => true,
        // QEMU 7.2's balloon has no MSI-X capability: INTx is the right fallback.
        (IrqMode::MsiX, InterruptMode::Intx) => !has_msix,
        _ => false,
    };
    let f = d.features();
    let want_oom = test == "oom";
    let layout = d.layout();
    // QEMU numbers its queues over what it offers: with hinting offered (and declined)
    // reporting is queue 4, else 3.
    let reporting_queue = if decline_hint { 4 } else { 3 };
    let features_ok = f.contains(STATS_VQ)
        && f.contains(DEFLATE_ON_OOM) == want_oom
        && f.contains(PAGE_REPORTING) == want_report
        && !f.contains(FREE_PAGE_HINT)
        && layout.free_page.is_none()
        && (!want_report || layout.reporting == Some(reporting_queue));
    check!(
        "balloon.init",
        mode_ok && features_ok && !d.is_stopped(),
        "{addr} {}{} features {}, queues: inflate {}, deflate {}, stats {}, free page hints {}, \
         reporting {}; {} frame(s) per page, at most {} pages, test {test}",
        Irq(mode),
        match (env.irq, mode, has_msix) {
            (IrqMode::MsiX, InterruptMode::Intx, false) => {
                " (asked for MSI-X: this device has no MSI-X capability, as QEMU 7.2's \
                 virtio-balloon-pci has none, so INTx is the right fallback)"
            }
            _ => "",
        },
        FeatureSet(DeviceType::Balloon, f.bits()),
        layout.inflate,
        layout.deflate,
        Opt(layout.stats),
        Opt(layout.free_page),
        Opt(layout.reporting),
        d.frames_per_page(),
        d.max_pages()
    );
    report::stat("balloon.features", format!("{:#x}", f.bits()));
    if !mode_ok || d.is_stopped() {
        return;
    }
    report::stat("balloon.phase", "ready");

    // ---- 2. targets (the last one: all memory back) ----
    let mut errors: Vec<String> = Vec::new();
    let full = mem / MIB;
    let plan: Vec<u64> = targets.iter().copied().chain([full]).collect();
    let mut reached = 0;
    for (i, &t) in plan.iter().enumerate() {
        let frames = frames_for(mem, t);
        let t0 = crate::time::now_ns();
        let ok = serve(&mut d, 60_000, &mut errors, |d| {
            d.num_pages() == frames && d.at_target() && d.actual() == frames
        });
        let ms = (crate::time::now_ns() - t0) / 1_000_000;
        check!(
            &format!("balloon.target{i}"),
            ok,
            "{t} MiB left: num_pages {} (want {frames}), balloon {} pages, actual {} frames, after {ms} ms{}",
            d.num_pages(),
            d.ballooned_pages(),
            d.actual(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join("; "))
            }
        );
        if !ok {
            break;
        }
        reached += 1;
        if i == 0 && want_report {
            report_round(&mut d, report_ranges, &mut errors);
        }
        if i + 2 == plan.len() && want_oom {
            // Let the host see this target in `query-balloon` before we move off it.
            serve(&mut d, 500, &mut errors, |_| false);
            oom(&mut d, oom_pages, &mut errors);
        }
    }

    // ---- the host's end signal (any new target), then empty the balloon ----
    if reached == plan.len() {
        let signal = serve(&mut d, 30_000, &mut errors, |d| d.num_pages() != 0);
        let n = d.num_pages();
        let drained = d.deflate_all().is_ok()
            && serve(&mut d, 30_000, &mut errors, |d| {
                d.is_empty() && d.actual() == 0
            });
        check!(
            "balloon.deflate_all",
            signal && drained,
            "end signal (a new target: {n} frames) seen: {signal}; deflate_all emptied the balloon: {drained} (actual {})",
            d.actual()
        );
    }

    // ---- what happened ----
    let c = d.counters();
    report::stat("balloon.targets_reached", reached);
    report::stat("balloon.inflate_requests", c.inflate_requests);
    report::stat("balloon.deflate_requests", c.deflate_requests);
    report::stat("balloon.pages_inflated", c.pages_inflated);
    report::stat("balloon.pages_deflated", c.pages_deflated);
    report::stat("balloon.oom_pages", c.oom_pages);
    report::stat("balloon.stats_buffers", c.stats_buffers);
    report::stat("balloon.targets_clamped", c.targets_clamped);
    report::stat("balloon.alloc_failures", c.alloc_failures);
    report::stat("balloon.reports", c.reports);
    report::stat("balloon.ranges_reported", c.ranges_reported);
    check!(
        "balloon.stats",
        c.stats_buffers >= 2 && d.pool().acct.stats_calls >= c.stats_buffers,
        "{} statistics buffers sent (the first at bring-up, then one per host request), {} pool snapshots",
        c.stats_buffers,
        d.pool().acct.stats_calls
    );
    if want_report {
        let a = d.pool().acct;
        check!(
            "balloon.report",
            c.ranges_reported == 2 * report_ranges as u64
                && a.ranges_taken == c.ranges_reported
                && a.ranges_reported == a.ranges_taken
                && a.ranges_returned == a.ranges_taken
                && d.pool().ranges_outstanding() == 0
                && a.range_errors == 0,
            "{} reports, {} ranges reported by the driver; pool: {} taken, {} back as reported, {} zeroed by QEMU, {} errors",
            c.reports,
            c.ranges_reported,
            a.ranges_taken,
            a.ranges_reported,
            a.ranges_zeroed,
            a.range_errors
        );
        report::stat("balloon.report.ranges_zeroed", a.ranges_zeroed);
    }

    // ---- 6. shutdown: every page back ----
    bus::stats("balloon", d.bus_mut());
    d.shutdown();
    let p = d.pool();
    let a = p.acct;
    report::stat("balloon.pool.lent", a.lent);
    report::stat("balloon.pool.returned", a.returned);
    report::stat("balloon.pool.returned_zeroed", a.returned_zeroed);
    check!(
        "balloon.pool",
        a.lent > 0
            && a.lent == a.returned
            && p.outstanding() == 0
            && p.bitmap_count() == 0
            && a.double_or_foreign == 0
            && a.unusable == 0
            && p.ranges_outstanding() == 0
            && errors.is_empty(),
        "{} pages lent, {} returned ({} zeroed by QEMU), {} outstanding, {} double/foreign returns, {} unusable, {} ranges outstanding; errors: {}",
        a.lent,
        a.returned,
        a.returned_zeroed,
        p.outstanding(),
        a.double_or_foreign,
        a.unusable,
        p.ranges_outstanding(),
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join("; ")
        }
    );
    drop(d);
    let (heap_after, _) = crate::heap::usage();
    report::stat("balloon.heap_delta", heap_after as i64 - heap_before as i64);
}

/// A second round of free page reporting, on demand.
fn report_round(d: &mut Driver, ranges: usize, errors: &mut Vec<String>) {
    let taken0 = d.pool().acct.ranges_taken;
    d.pool_mut().range_budget += ranges;
    let posted = d.report_free_pages();
    let ok = serve(d, 20_000, errors, |d| {
        d.pool().acct.ranges_taken == taken0 + ranges as u64 && d.pool().ranges_outstanding() == 0
    });
    check!(
        "balloon.report_round",
        matches!(posted, Ok(n) if n > 0) && ok,
        "asked for another report of {ranges} ranges: first request {}, all acknowledged: {}",
        Got(&posted),
        yes_no(ok)
    );
}

/// Memory pressure: take `n` pages back from the balloon against the host's target.
fn oom(d: &mut Driver, n: usize, errors: &mut Vec<String>) {
    let b0 = d.ballooned_pages();
    let returned0 = d.pool().acct.returned;
    let deflated0 = d.counters().pages_deflated;
    let r = d.deflate_for_oom(n);
    let got = serve(d, 20_000, errors, |d| {
        d.counters().pages_deflated >= deflated0 + n as u64 && d.ballooned_pages() + n == b0
    });
    // The balloon must not re-inflate towards the unchanged target.
    serve(d, 1_000, errors, |_| false);
    let held = d.ballooned_pages() + n == b0;
    let back = d.pool().acct.returned - returned0;
    let actual_ok = d.actual() as usize == (b0 - n) * d.frames_per_page() as usize;
    check!(
        "balloon.oom",
        matches!(r, Ok(o) if o.released + o.pending == n)
            && got
            && held
            && back == n as u64
            && actual_ok,
        "deflate_for_oom({n}) with {b0} pages in the balloon: {}; {back} pages back in the heap, balloon {} pages 1 s later (target {} pages), actual {} frames",
        match &r {
            Ok(o) => format!("{} pages released, {} pending", o.released, o.pending),
            Err(e) => format!("error: {e}"),
        },
        d.ballooned_pages(),
        d.target_pages(),
        d.actual()
    );
    report::stat("balloon.oom.pages", n);
    report::stat("balloon.oom.actual", d.actual());
    report::stat("balloon.oom", "done");
}
