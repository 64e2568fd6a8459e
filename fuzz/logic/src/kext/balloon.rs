//! VirtioBalloon.kext (`virtio-balloon-kext`) as its IOService shim drives it
//! (`kexts/VirtioBalloon/shim/VirtioBalloon.cpp`): chunks wired through `alloc_chunk`
//! (the kernel may run dry, or refuse past a number of live chunks) and unwired through
//! `free_chunk`; the kernel's memory figures and pressure level from a fuzzed sysctl table
//! (absent, wrong sizes, any values); the retry timer's `vbal_poll` after `changed` said
//! starved, the memory timer's `vbal_pressure_check` and `vbal_report_check` with a fuzzed
//! clock, the OOM hook, `vbal_info`, sleep and wake (wake possibly failing: a queue the
//! device no longer offers), stop in the middle, destroy with or without stop; sleep and
//! stop empty the balloon first as the shim's `drain()` does (`vbal_drain` until it is not
//! busy, the device serving and interrupts delivered between calls), and a lone
//! `vbal_drain` may come at any time. The device
//! (`BalloonModel`) moves `num_pages`, completes every queue honestly or with any used
//! length, holds deflates and reports, forges and repeats used ids, writes raw config
//! bytes and free page hint command ids, sets NEEDS_RESET.
//!
//! Oracles: every chunk cookie `alloc_chunk` gave reaches `free_chunk` exactly once, none
//! is live after `vbal_stop`, a sleep, a failed wake or `vbal_destroy`; while the device
//! has not lied since its last reset, no chunk is freed while one of its frames is in the
//! device's balloon (MUST_TELL_HOST), in a deflate the device has not acknowledged
//! (MUST_TELL_HOST) or in a report the device holds, and the device's balloon is made of
//! frames of live chunks and never above the bound; `vbal_info`'s wired pages are the
//! shim's own count of pages in live chunks, the pages held within the bound plus two
//! request batches (pages in flight), `actual` within the bound; the driver keeps the
//! balloon protocol (`BalloonModel::violations`) over every step of a device that has not
//! lied since its last reset; the statuses are the documented ones; no callback after
//! `vbal_stop` (or `vbal_destroy`) returned; every DMA byte is back after the family stops;
//! a drain ends within the kext's bound ([`VBAL_DRAIN_MS`] on the shim's clock), and one
//! that says [`VBAL_OK`] over a device that has not lied since its last reset leaves the
//! device's balloon empty and `actual` 0 before the reset that follows.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void};

use virtio_balloon_kext::*;
use virtio_tests::balloon_model::{BalloonModel, bits};
use virtio_tests::balloon_shim::{ChunkMemory, FILE_BACKED, FREE, MEMSIZE, PRESSURE};
use virtio_tests::kext_shim::Family;
use virtio_tests::sim::Sim;

use crate::input::Input;

const MAX_STEPS: usize = 192;

/// The shim's state, reached from the kext's callbacks through `ctx`.
struct Shim {
    sim: Sim,
    /// The kernel's pages and sysctls; at most `PAGE_NUMBERS` pages in one input, far above
    /// what 192 steps of a bounded balloon need.
    chunks: ChunkMemory,
    /// `changed` said starved: the retry timer is armed.
    starved: bool,
    /// `vbal_stop` (or `vbal_destroy`) returned: no callback may come any more.
    stopped: bool,
    /// The device's side as of its last serve (valid while `resets` is the sim's count).
    view: DeviceView,
}

#[derive(Default)]
struct DeviceView {
    resets: u64,
    /// The device has lied (forged completions) since this many resets: its balloon is
    /// not what the driver believes until the next reset.
    lie_at: Option<u64>,
    /// Lies told so far: a step during which this moved was not an honest device's.
    lies: u64,
    ballooned: BTreeSet<u32>,
    held_deflates: BTreeSet<u32>,
    held_reports: BTreeSet<u32>,
}

impl std::ops::Deref for Shim {
    type Target = ChunkMemory;
    fn deref(&self) -> &ChunkMemory {
        &self.chunks
    }
}

impl std::ops::DerefMut for Shim {
    fn deref_mut(&mut self) -> &mut ChunkMemory {
        &mut self.chunks
    }
}

impl Shim {
    /// The view is the device's own and the device has been honest since its last reset.
    fn trusted(&self) -> bool {
        self.view.resets == self.sim.resets() && self.honest_since_reset()
    }

    /// The device has not lied since its last reset (which both sides start afresh from).
    fn honest_since_reset(&self) -> bool {
        let resets = self.sim.resets();
        self.view.lie_at.is_none_or(|at| resets > at)
    }

    fn must_tell(&self) -> bool {
        self.sim.driver_features() & bits::MUST_TELL_HOST != 0
    }
}

fn shim_of<'a>(ctx: *mut c_void) -> &'a RefCell<Shim> {
    // SAFETY: ctx is the target's `RefCell<Shim>`, boxed and alive until after the device
    // is destroyed.
    unsafe { &*(ctx as *const RefCell<Shim>) }
}

unsafe extern "C" fn alloc_chunk(
    ctx: *mut c_void,
    pages: *mut u64,
    count: u32,
    cookie: *mut *mut c_void,
) -> bool {
    let mut s = shim_of(ctx).borrow_mut();
    assert!(!s.stopped, "alloc_chunk after vbal_stop returned");
    assert!(
        (1..=VBAL_CHUNK_PAGES).contains(&count),
        "alloc_chunk of {count} pages"
    );
    // SAFETY: the pool passes room for `count` addresses and a valid out-pointer.
    unsafe { s.alloc_chunk(pages, count, cookie) }.is_some()
}

unsafe extern "C" fn free_chunk(ctx: *mut c_void, cookie: *mut c_void) {
    let mut s = shim_of(ctx).borrow_mut();
    assert!(!s.stopped, "free_chunk after vbal_stop returned");
    let Some(pages) = s.unwire(cookie) else {
        panic!("free_chunk({cookie:?}): not a live chunk (freed twice, or never given)");
    };
    if s.trusted() {
        let must_tell = s.must_tell();
        for f in s.frames_of(&pages) {
            assert!(
                !(must_tell && s.view.ballooned.contains(&f)),
                "chunk {cookie:?} freed with frame {f:#x} in the device's balloon"
            );
            assert!(
                !(must_tell && s.view.held_deflates.contains(&f)),
                "chunk {cookie:?} freed with frame {f:#x} in an unacknowledged deflate"
            );
            assert!(
                !s.view.held_reports.contains(&f),
                "chunk {cookie:?} freed with frame {f:#x} in a report the device holds"
            );
        }
    }
}

unsafe extern "C" fn changed(ctx: *mut c_void, starved: bool) {
    let mut s = shim_of(ctx).borrow_mut();
    assert!(!s.stopped, "changed after vbal_stop returned");
    s.starved = starved;
}

/// The shim's `sysctlbyname(name, buf, &len, NULL, 0)` over [`Shim::sysctls`].
unsafe extern "C" fn read_sysctl(
    ctx: *mut c_void,
    name: *const c_char,
    buf: *mut c_void,
    len: *mut u32,
) -> i32 {
    let s = shim_of(ctx).borrow();
    assert!(!s.stopped, "read_sysctl after vbal_stop returned");
    // SAFETY: the kext passes a NUL-terminated name and its room in `*len`.
    unsafe { s.read_sysctl(name, buf, len) }.0
}

/// A sysctl's answer: absent, of an odd size, or 4 or 8 bytes of `value`.
fn sysctl_value(input: &mut Input, value: u64, wide: bool) -> Option<Vec<u8>> {
    match input.u8() % 8 {
        0 => None,
        1 => {
            let len = usize::from(input.u8() % 10);
            Some(input.take(len).to_vec())
        }
        _ if wide => Some(value.to_ne_bytes().to_vec()),
        _ => Some((value as u32).to_ne_bytes().to_vec()),
    }
}

/// The kernel's answers, fuzzed: `hw.memsize` around the bound, the free and file-backed
/// page counts, the pressure level.
fn fuzz_sysctls(input: &mut Input, s: &mut Shim) {
    let page = s.page_size;
    let memsize = match input.u8() % 4 {
        0 => u64::from(input.u16()) * page,
        1 => 8 << 30,
        2 => u64::from(input.u32()) << 12,
        _ => input.u32().into(),
    };
    let free = match input.u8() % 3 {
        0 => u64::from(input.u16()),
        1 => (4 << 30) / page,
        _ => input.u32().into(),
    };
    let level = match input.u8() % 5 {
        0 | 1 => u64::from(VBAL_PRESSURE_NORMAL),
        2 => VBAL_PRESSURE_WARN.into(),
        3 => VBAL_PRESSURE_CRITICAL.into(),
        _ => input.u32().into(),
    };
    let file_backed = u64::from(input.u16());
    for (name, value, wide) in [
        (MEMSIZE, memsize, true),
        (FREE, free, false),
        (FILE_BACKED, file_backed, false),
        (PRESSURE, level, false),
    ] {
        match sysctl_value(input, value, wide) {
            Some(v) => s.sysctls.insert(name.into(), v),
            None => s.sysctls.remove(name),
        };
    }
}

/// The device serves every queue; the shim's view of what the device holds follows.
/// Returns the chains served.
fn serve(model: &mut BalloonModel, sim: &Sim, shim: &RefCell<Shim>) -> usize {
    let resets = sim.resets();
    {
        let mut s = shim.borrow_mut();
        if s.view.resets != resets {
            // The device forgot everything at the reset (as the model does at this serve).
            s.view.held_deflates.clear();
            s.view.held_reports.clear();
        }
    }
    let (deflates, reports) = (model.deflates.len(), model.reports.len());
    let served = model.serve(sim);
    let mut s = shim.borrow_mut();
    if model.hold_deflates {
        let frames: Vec<u32> = model.deflates[deflates..]
            .iter()
            .flatten()
            .copied()
            .collect();
        s.view.held_deflates.extend(frames);
    }
    if model.hold_reports {
        let frames: Vec<u32> = model.reports[reports..]
            .iter()
            .flatten()
            .flat_map(|&(a, l)| (0..u64::from(l) / 4096).map(move |k| ((a >> 12) + k) as u32))
            .collect();
        s.view.held_reports.extend(frames);
    }
    s.view.ballooned = model.ballooned.clone();
    s.view.resets = resets;
    served
}

/// The model has seen every reset and `queue` is enabled: what it retains of `queue` is
/// still the device's to complete.
fn device_current(shim: &RefCell<Shim>, sim: &Sim, queue: Option<u16>) -> bool {
    shim.borrow().view.resets == sim.resets()
        && queue.is_some_and(|q| sim.queue_info(q).is_some_and(|i| i.ready))
}

/// The statuses the memory timer's checks document.
fn check_timer_status(status: i32, what: &str) {
    assert!(
        matches!(
            status,
            VBAL_OK | VBAL_E_DEVICE | VBAL_E_STOPPED | VBAL_E_UNSUPPORTED | VBAL_E_UNAVAILABLE
        ),
        "{what} returned {status}"
    );
}

/// A lie the device tells (a forged or repeated used entry, a queue completed behind the
/// model's back): the view is not the driver's until the next reset.
fn lie(shim: &RefCell<Shim>, sim: &Sim) {
    let view = &mut shim.borrow_mut().view;
    view.lie_at = Some(sim.resets());
    view.lies += 1;
}

/// Every balloon queue's buffers are the driver's to read: an honest device writes nothing
/// into them, so a used length the model is told to give that is not 0 is a lie (the
/// driver may then refuse the completion, and send the same pages again).
fn lying_len(model: &BalloonModel) -> bool {
    model.len_override.is_some_and(|(_, len)| len != 0)
}

pub(super) fn run(input: &mut Input) {
    let crate::balloon::BalloonDevice {
        mode,
        preference,
        generic,
        mut model,
        sizes,
    } = crate::balloon::device(input);
    let layout = model.layout();
    let sim = model
        .sim_builder(mode, generic, input.bool())
        .queues(&sizes)
        .memory(crate::mem::guest_memory(2 << 20))
        .build();
    let initial_target = match input.u8() % 4 {
        0 => 0,
        1 => input.u32(),
        _ => u32::from(input.u16() % 4096),
    };
    model.set_target(&sim, initial_target);
    let page_size = 4096u32 << (input.u8() % 4);
    let config = VbalConfig {
        page_size,
        max_pages: 1 + u32::from(input.u16() % 1200),
        total_pages: if input.bool() {
            0
        } else {
            u64::from(input.u16())
        },
    };
    let Some(super::Started {
        family,
        mem,
        buffer,
        free_at_start,
    }) = super::start_family(&sim, preference, 4096)
    else {
        return;
    };
    let shim = Box::new(RefCell::new(Shim {
        sim: sim.clone(),
        chunks: ChunkMemory {
            contiguous: input.bool(),
            ..ChunkMemory::new(u64::from(page_size))
        },
        starved: false,
        stopped: false,
        view: DeviceView::default(),
    }));
    fuzz_sysctls(input, &mut shim.borrow_mut());
    let callbacks = VbalCallbacks {
        ctx: (&*shim as *const RefCell<Shim>).cast_mut().cast(),
        alloc_chunk: Some(alloc_chunk),
        free_chunk: Some(free_chunk),
        changed: input.bool().then_some(changed as _),
        read_sysctl: (!input.u8().is_multiple_of(8)).then_some(read_sysctl as _),
    };
    // The bound `vbal_create` derives: `max_pages`, at most the guest's memory.
    let guest_pages = match config.total_pages {
        0 => shim
            .borrow()
            .sysctls
            .get(MEMSIZE)
            .filter(|_| callbacks.read_sysctl.is_some())
            .and_then(|v| match v.len() {
                4 => Some(u64::from(u32::from_ne_bytes(v[..4].try_into().ok()?))),
                8 => Some(u64::from_ne_bytes(v[..8].try_into().ok()?)),
                _ => None,
            })
            .map(|bytes| bytes / u64::from(page_size)),
        pages => Some(pages),
    };
    let cap = guest_pages.unwrap_or((u64::from(VBAL_DEFAULT_MAX_MIB) << 20) / u64::from(page_size));
    let bound = u64::from(config.max_pages).min(cap);
    let fpp = u64::from(page_size / 4096);
    let batch = virtio_balloon::wire::pages_per_batch(page_size / 4096) as u64;

    let mut dev = std::ptr::null_mut();
    // SAFETY: the nub's live handle; the config and callbacks are locals read during the
    // call; the callbacks' context outlives the device.
    let created = unsafe { vbal_create(family.client_handle(), &config, &callbacks, &mut dev) };
    if created != VBAL_OK {
        assert!(
            matches!(created, VBAL_E_DEVICE | VBAL_E_NO_MEMORY),
            "vbal_create returned {created}"
        );
        assert!(dev.is_null(), "vbal_create failed but gave a handle");
        assert!(
            shim.borrow().live.is_empty(),
            "vbal_create failed with chunks wired"
        );
        super::finish(family, &sim, &mem, buffer, free_at_start);
        return;
    }
    assert!(!dev.is_null());
    let mut asleep = false;
    let mut stopped = false;
    let mut now_ms = u64::from(input.u16());
    let resets_at_create = sim.resets();
    let mut violations_seen = 0;

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        // A lying used length stays set across resets: each step that may serve with it
        // lies again.
        if lying_len(&model) {
            lie(&shim, &sim);
        }
        let (lies_before, honest_before) = {
            let s = shim.borrow();
            (s.view.lies, s.honest_since_reset())
        };
        match input.u8() % 20 {
            0..=2 => {
                model.len_override = match input.u8() % 6 {
                    0 => Some((
                        u16::from(input.u8()) % layout.count,
                        match input.u8() % 3 {
                            0 => 0,
                            1 => u32::MAX,
                            _ => input.u32() % 8192,
                        },
                    )),
                    _ => None,
                };
                if lying_len(&model) {
                    lie(&shim, &sim);
                }
                serve(&mut model, &sim, &shim);
            }
            3 | 4 => super::deliver_interrupts(input, &family),
            5 => {
                let target = match input.u8() % 4 {
                    0 => input.u32(),
                    1 => (bound * fpp) as u32,
                    _ => u32::from(input.u16() % 8192),
                };
                model.set_target(&sim, target);
                sim.raise_config_interrupt();
            }
            6 => {
                // The model's retained buffers are the device's only while it has seen
                // every reset (it forgets them at its next serve) and the queues are up.
                if input.bool() {
                    if device_current(&shim, &sim, layout.stats) {
                        model.request_stats(&sim);
                    }
                } else {
                    model.set_cmd_id(&sim, input.u32());
                    sim.raise_config_interrupt();
                }
            }
            7 => {
                if input.bool() {
                    model.hold_deflates = !model.hold_deflates;
                    model.hold_reports = input.bool();
                } else {
                    if device_current(&shim, &sim, Some(1)) {
                        model.release_deflates(&sim);
                    }
                    if device_current(&shim, &sim, layout.reporting) {
                        model.release_reports(&sim);
                    }
                    let mut s = shim.borrow_mut();
                    s.view.held_deflates.clear();
                    s.view.held_reports.clear();
                }
            }
            8 => {
                // A forged or repeated used element on any queue.
                let q = u16::from(input.u8()) % layout.count;
                if sim.queue_info(q).is_some_and(|i| i.ready) {
                    let id = match input.u8() % 3 {
                        0 => input.u32(),
                        _ => u32::from(input.u8() % 8),
                    };
                    lie(&shim, &sim);
                    sim.complete_raw(q, id, input.u32() % 8192);
                    sim.signal_used(q);
                }
            }
            9 => {
                // Every chain of a queue completed behind the model's back, any length.
                let q = u16::from(input.u8()) % layout.count;
                let len = match input.u8() % 3 {
                    0 => 0,
                    1 => 1,
                    _ => input.u32(),
                };
                if sim.queue_info(q).is_some_and(|i| i.ready) {
                    lie(&shim, &sim);
                    sim.serve(q, |_| len);
                }
            }
            10 => {
                if input.bool() {
                    sim.trigger_needs_reset();
                } else {
                    let offset = usize::from(input.u8() % 16);
                    let len = usize::from(input.u8() % 8);
                    if offset < 8 && offset + len > 4 {
                        // `actual` overwritten behind the driver's back.
                        lie(&shim, &sim);
                    }
                    sim.set_device_config(offset, input.take(len));
                    sim.raise_config_interrupt();
                }
            }
            11 => {
                // The retry timer (armed by a starved `changed`), or a poll at any time.
                let due = std::mem::take(&mut shim.borrow_mut().starved);
                if due || input.bool() {
                    // SAFETY: the live handle (after stop too: destroy has not run).
                    let status = unsafe { vbal_poll(dev) };
                    assert!(
                        matches!(status, VBAL_OK | VBAL_E_DEVICE | VBAL_E_STOPPED),
                        "vbal_poll returned {status}"
                    );
                    if asleep || stopped {
                        assert_eq!(status, VBAL_E_STOPPED);
                    }
                }
            }
            12 => {
                let pages = match input.u8() % 4 {
                    0 => u64::MAX,
                    _ => u64::from(input.u16() % 2048),
                };
                let mut o = VbalOom::default();
                // SAFETY: the live handle; a local out-pointer.
                let status = unsafe { vbal_deflate_for_oom(dev, pages, &mut o) };
                assert!(
                    matches!(
                        status,
                        VBAL_OK | VBAL_E_DEVICE | VBAL_E_STOPPED | VBAL_E_UNSUPPORTED
                    ),
                    "vbal_deflate_for_oom returned {status}"
                );
                let out = o.released.saturating_add(o.pending);
                assert!(
                    out <= pages && out <= bound + 2 * batch,
                    "the OOM hook took {o:?} of {pages} pages out (bound {bound})"
                );
            }
            13 | 14 => {
                // The memory timer: pressure first, then reporting, at one `now`.
                now_ms += match input.u8() % 4 {
                    0 => 0,
                    1 => u64::from(VBAL_PRESSURE_MS),
                    _ => u64::from(input.u16()),
                };
                let mut p = VbalPressure::default();
                // SAFETY: the live handle; a local out-pointer.
                let status = unsafe { vbal_pressure_check(dev, now_ms, &mut p) };
                check_timer_status(status, "vbal_pressure_check");
                let most = (u64::from(VBAL_PRESSURE_CRITICAL_MIB) << 20) / u64::from(page_size);
                assert!(
                    p.released.saturating_add(p.pending) <= most,
                    "a pressure check took {p:?} out"
                );
                let mut r = VbalReport::default();
                // SAFETY: the live handle; a local out-pointer.
                let status = unsafe { vbal_report_check(dev, now_ms, &mut r) };
                check_timer_status(status, "vbal_report_check");
                assert!(r.outcome <= VBAL_REPORT_UNREADABLE, "{r:?}");
                if r.outcome != VBAL_REPORT_SENT {
                    assert_eq!(r.ranges, 0, "ranges without a report: {r:?}");
                }
            }
            15 => fuzz_sysctls(input, &mut shim.borrow_mut()),
            16 => {
                let mut s = shim.borrow_mut();
                match input.u8() % 4 {
                    0 => s.dry = !s.dry,
                    1 => s.limit = Some(usize::from(input.u8() % 40)),
                    2 => s.limit = None,
                    _ => s.contiguous = !s.contiguous,
                }
            }
            17 => {
                // setPowerState: sleep (after the drain), or wake (possibly failing: a
                // queue the device no longer offers).
                if !asleep {
                    let drained = drain(&mut model, &sim, &family, &shim, dev, &mut now_ms);
                    if stopped {
                        assert_eq!(drained, VBAL_E_STOPPED);
                    }
                    // SAFETY: the live handle.
                    let status = unsafe { vbal_suspend(dev) };
                    if stopped {
                        assert_eq!(status, VBAL_E_STOPPED);
                    } else {
                        assert_eq!(status, VBAL_OK, "vbal_suspend");
                        asleep = true;
                        assert!(
                            shim.borrow().live.is_empty(),
                            "chunks still wired after sleep"
                        );
                    }
                } else {
                    let broken = input.u8().is_multiple_of(4);
                    if broken {
                        sim.set_queue_max_size(0, 0);
                    }
                    // SAFETY: the live handle.
                    let status = unsafe { vbal_resume(dev) };
                    if broken {
                        sim.set_queue_max_size(0, sizes[0]);
                    }
                    match status {
                        VBAL_OK => asleep = false,
                        VBAL_E_DEVICE => assert!(
                            shim.borrow().live.is_empty(),
                            "chunks still wired after a failed wake"
                        ),
                        VBAL_E_STOPPED => assert!(stopped),
                        other => panic!("vbal_resume returned {other}"),
                    }
                }
            }
            18 => match input.u8() % 8 {
                0 => {
                    stop(&mut model, &sim, &family, &shim, dev, &mut now_ms);
                    stopped = true;
                }
                1 => {
                    // A lone drain call: the kext stays in its drain (everything but the
                    // interrupt entry, the drain and vbal_info answers STOPPED) until sleep
                    // or stop.
                    // SAFETY: the live handle.
                    let status = unsafe { vbal_drain(dev, now_ms) };
                    check_drain_status(status);
                    if asleep || stopped {
                        assert_eq!(status, VBAL_E_STOPPED);
                    }
                }
                _ => {}
            },
            _ if input.bool() => {
                if !asleep && !stopped {
                    settle(&mut model, &sim, &family, &shim, dev, fpp);
                }
            }
            _ => {
                // A spurious call of the interrupt entry itself (the family's handler is
                // unregistered after stop; a direct call must still be harmless).
                if !stopped {
                    // SAFETY: the live handle.
                    unsafe { vbal_interrupt(dev, i32::from(input.u8() as i8)) };
                }
            }
        }
        check_books(&shim, dev, bound, fpp, batch);
        // The protocol is checked over every step an honest device served from start to
        // end: one that has not lied since its last reset (a lie's consequences end there,
        // where both sides start afresh) and did not lie during the step.
        let new_violations = &model.violations[violations_seen..];
        violations_seen = model.violations.len();
        if honest_before && shim.borrow().view.lies == lies_before {
            // The stats tag set is fixed per initialisation: after a reset the kext reads
            // the sysctls again, and a figure may come or go.
            let reset = sim.resets() > resets_at_create;
            let broken: Vec<&String> = new_violations
                .iter()
                .filter(|v| !(reset && v.starts_with("stats tag set changed")))
                .collect();
            assert!(
                broken.is_empty(),
                "the driver broke the protocol with an honest device: {broken:?}"
            );
        }
    }

    if input.bool() {
        stop(&mut model, &sim, &family, &shim, dev, &mut now_ms);
    }
    // SAFETY: the handle from vbal_create, not used again (destroy stops it if needed).
    unsafe { vbal_destroy(dev) };
    {
        let mut s = shim.borrow_mut();
        assert!(
            s.live.is_empty(),
            "{} chunks live after vbal_destroy",
            s.live.len()
        );
        s.stopped = true;
    }
    super::finish(family, &sim, &mem, buffer, free_at_start);
}

/// The device turns honest and serves until nothing moves (at most a few rounds): then,
/// if it has not lied since its last reset and holds nothing back, the driver's books and
/// the device's agree, as at rest in the kext tests (`actual` is the device's balloon, and
/// the pages held are that many frames).
fn settle(
    model: &mut BalloonModel,
    sim: &Sim,
    family: &Family,
    shim: &RefCell<Shim>,
    dev: *mut VbalDevice,
    fpp: u64,
) {
    model.len_override = None;
    let mut quiet = false;
    for _ in 0..16 {
        if serve(model, sim, shim) + family.interrupts() == 0 {
            quiet = true;
            break;
        }
    }
    let s = shim.borrow();
    if !quiet
        || !s.trusted()
        || model.hold_deflates
        || model.hold_reports
        || model.held_deflates() > 0
        || !model.held_report_heads().is_empty()
        || sim.status() & 0x40 != 0
    {
        return;
    }
    let mut i = VbalInfo::default();
    // SAFETY: the live handle; a local out-pointer.
    assert_eq!(unsafe { vbal_info(dev, &mut i) }, VBAL_OK);
    let actual = model.actual(sim);
    assert_eq!(
        actual as usize,
        s.view.ballooned.len(),
        "at rest: actual {actual}, the device's balloon {} frames ({i:?})",
        s.view.ballooned.len()
    );
    assert_eq!(i.actual_frames, actual, "at rest: vbal_info's actual");
    assert_eq!(
        i.pages_held * fpp,
        u64::from(actual),
        "at rest: {} pages held, actual {actual} frames",
        i.pages_held
    );
}

/// The statuses `vbal_drain` documents.
fn check_drain_status(status: i32) {
    assert!(
        matches!(
            status,
            VBAL_OK | VBAL_E_BUSY | VBAL_E_TIMEOUT | VBAL_E_DEVICE | VBAL_E_STOPPED
        ),
        "vbal_drain returned {status}"
    );
}

/// The shim's `drain()` before the reset of sleep and stop: `vbal_drain` until it is not
/// busy; between calls the gate is open (the device serves as it is set to, the family
/// delivers its interrupts) and the shim's clock moves on by [`VBAL_DRAIN_POLL_MS`]. The
/// kext must end it within [`VBAL_DRAIN_MS`]. Returns the last status.
fn drain(
    model: &mut BalloonModel,
    sim: &Sim,
    family: &Family,
    shim: &RefCell<Shim>,
    dev: *mut VbalDevice,
    now_ms: &mut u64,
) -> i32 {
    let start = *now_ms;
    loop {
        // SAFETY: the live handle.
        let status = unsafe { vbal_drain(dev, *now_ms) };
        check_drain_status(status);
        if status != VBAL_E_BUSY {
            if status == VBAL_OK && shim.borrow().trusted() && !lying_len(model) {
                // Told of every page: the device holds none and `actual` says so, before
                // the reset that follows (QEMU's reset keeps `actual`).
                assert!(
                    model.ballooned.is_empty(),
                    "drained, the device still holds {} frames",
                    model.ballooned.len()
                );
                assert_eq!(model.actual(sim), 0, "drained, actual not 0");
            }
            return status;
        }
        assert!(
            *now_ms - start <= u64::from(VBAL_DRAIN_MS),
            "vbal_drain still busy after {} ms",
            *now_ms - start
        );
        serve(model, sim, shim);
        family.interrupts();
        *now_ms += u64::from(VBAL_DRAIN_POLL_MS);
    }
}

/// `gatedStop`: the drain, then `vbal_stop`, after which every chunk is back and no
/// callback comes.
fn stop(
    model: &mut BalloonModel,
    sim: &Sim,
    family: &Family,
    shim: &RefCell<Shim>,
    dev: *mut VbalDevice,
    now_ms: &mut u64,
) {
    drain(model, sim, family, shim, dev, now_ms);
    // SAFETY: the live handle.
    unsafe { vbal_stop(dev) };
    let mut s = shim.borrow_mut();
    assert!(
        s.live.is_empty(),
        "{} chunks live after vbal_stop",
        s.live.len()
    );
    s.stopped = true;
}

/// After each of the shim's calls: `vbal_info` agrees with the shim's count of wired
/// pages, and the balloon is within its bound, as the driver and as the device see it.
fn check_books(shim: &RefCell<Shim>, dev: *mut VbalDevice, bound: u64, fpp: u64, batch: u64) {
    let mut i = VbalInfo::default();
    // SAFETY: the live handle (after stop too: destroy has not run); a local out-pointer.
    assert_eq!(unsafe { vbal_info(dev, &mut i) }, VBAL_OK);
    let s = shim.borrow();
    let wired = s.wired_pages();
    assert_eq!(
        i.pages_wired, wired,
        "the kext counts {} pages wired, the shim {wired}",
        i.pages_wired
    );
    // Pages out of the pool, in flight included: the slack of two request batches is the
    // driver-level target's (`fuzz/logic/src/balloon.rs`); the balloon itself is bounded
    // exactly below (`actual`).
    assert!(
        i.pages_held <= bound + 2 * batch,
        "{} pages held, bound {bound}",
        i.pages_held
    );
    assert!(
        u64::from(i.actual_frames) <= bound * fpp,
        "actual {} frames, bound {bound} pages of {fpp} frames",
        i.actual_frames
    );
    assert!(i.chunks_freed <= i.chunks_allocated, "{i:?}");
    if s.trusted() {
        assert!(
            s.view.ballooned.len() as u64 <= bound * fpp,
            "{} frames in the device's balloon, bound {bound} pages",
            s.view.ballooned.len()
        );
        if s.must_tell() {
            assert!(
                s.view.ballooned.is_subset(&s.frames()),
                "frames in the device's balloon outside the wired chunks"
            );
        }
    }
}
