//! The virtio-balloon driver over `VirtioDevice<PciTransport<..>>` and the simulated PCI
//! function, with `balloon_model` playing the device (rings served by rust-vmm's
//! `virtio-queue`), in modern, transitional and legacy modes.
//!
//! The platform is a counting `PagePool`: every page and free range it lends is tracked,
//! and returning one that is not out (a double return) or ending with one still out (a
//! leak) fails the test.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use virtio_balloon::{
    BalloonDriver, BalloonError, BalloonOptions, FreeRange, MemStats, Page, PagePool, RangeReturn,
    RangeUse,
};
use virtio_core::{DeviceStatus, Error, VirtioDevice};
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::balloon_model::{BalloonModel, CMD_DONE, CMD_STOP, HintStatus, bits};
use virtio_tests::capped_alloc::CappedAllocator;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{Sim, SimBars, SimConfig, SimInterrupt, SimIrq, SimMode};

type Dev = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;

use virtio_tests::sim::{MODES, walk_allocation_failures};
const RING: u64 = bits::INDIRECT_DESC | bits::EVENT_IDX | bits::BAD_FEATURE;
/// What QEMU offers by default, plus MUST_TELL_HOST.
const QEMU: u64 = bits::MUST_TELL_HOST | bits::STATS_VQ;
const ALL: u64 = bits::MUST_TELL_HOST
    | bits::STATS_VQ
    | bits::DEFLATE_ON_OOM
    | bits::FREE_PAGE_HINT
    | bits::PAGE_POISON
    | bits::PAGE_REPORTING;
/// Where the test pool's pages live (guest-physical; the device never touches them).
const POOL_BASE: u64 = 0x1_0000_0000;

// ---- the allocator: a kernel's refusal, on the host ----

/// Allocations above `ALLOCATION_CAP` fail, as in a kernel (`virtio_tests::capped_alloc`).
#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

// ---- the counting pool ----

#[derive(Default)]
struct PoolState {
    page_size: usize,
    total: usize,
    /// Pages that may still be lent (a limit lets tests starve the driver).
    free: BTreeSet<u64>,
    lent: BTreeSet<u64>,
    /// Pages given up for good (`leak_page`): never lent again.
    leaked: BTreeSet<u64>,
    free_ranges: BTreeSet<(u64, u32)>,
    lent_ranges: BTreeSet<(u64, u32)>,
    returns: Vec<(FreeRange, RangeUse, RangeReturn)>,
    /// Every free_page call, in order (for MUST_TELL_HOST ordering checks).
    freed: Vec<u64>,
    stats: MemStats,
    errors: Vec<String>,
    /// Hand out one bad page next (misaligned).
    bad_page_next: bool,
    /// `take_free_range` calls so far; after `take_limit` of them the pool has no range
    /// left (so a driver that keeps asking ends, and a test can see how often it asked).
    takes: usize,
    take_limit: Option<usize>,
}

#[derive(Clone)]
struct TestPool(Rc<RefCell<PoolState>>);

impl TestPool {
    fn new(page_size: usize, pages: usize) -> Self {
        let free = (0..pages as u64)
            .map(|i| POOL_BASE + i * page_size as u64)
            .collect();
        TestPool(Rc::new(RefCell::new(PoolState {
            page_size,
            total: pages,
            free,
            ..PoolState::default()
        })))
    }
    fn with_ranges(self, n: u64, len: u32) -> Self {
        {
            let mut s = self.0.borrow_mut();
            let base = 0x80_0000_0000u64;
            for i in 0..n {
                s.free_ranges.insert((base + i * 0x40_0000, len));
            }
        }
        self
    }
    fn st(&self) -> std::cell::Ref<'_, PoolState> {
        self.0.borrow()
    }
    fn lent(&self) -> usize {
        self.st().lent.len()
    }
    /// Frames of the lent pages.
    fn lent_frames(&self) -> BTreeSet<u32> {
        let s = self.st();
        let fpp = (s.page_size / 4096) as u64;
        s.lent
            .iter()
            .flat_map(|&a| (0..fpp).map(move |k| ((a >> 12) + k) as u32))
            .collect()
    }
    fn check_clean(&self, what: &str) {
        let s = self.st();
        assert!(s.errors.is_empty(), "{what}: pool errors {:?}", s.errors);
        assert!(s.lent.is_empty(), "{what}: {} pages leaked", s.lent.len());
        assert!(
            s.lent_ranges.is_empty(),
            "{what}: {} ranges leaked",
            s.lent_ranges.len()
        );
    }
}

impl PagePool for TestPool {
    fn page_size(&self) -> usize {
        self.st().page_size
    }
    fn total_pages(&self) -> usize {
        self.st().total
    }
    fn alloc_page(&mut self) -> Option<Page> {
        let mut s = self.0.borrow_mut();
        if s.bad_page_next {
            s.bad_page_next = false;
            let addr = POOL_BASE + 0x800;
            s.lent.insert(addr);
            return Some(Page { addr });
        }
        let addr = s.free.pop_first()?;
        s.lent.insert(addr);
        Some(Page { addr })
    }
    fn free_page(&mut self, page: Page) {
        let mut s = self.0.borrow_mut();
        if !s.lent.remove(&page.addr) {
            s.errors
                .push(format!("page {:#x} returned but not lent", page.addr));
            return;
        }
        s.freed.push(page.addr);
        if page.addr.is_multiple_of(s.page_size as u64) {
            s.free.insert(page.addr);
        }
    }
    fn leak_page(&mut self, page: Page) {
        let mut s = self.0.borrow_mut();
        if !s.lent.remove(&page.addr) {
            s.errors
                .push(format!("page {:#x} leaked but not lent", page.addr));
            return;
        }
        s.leaked.insert(page.addr);
    }
    fn stats(&mut self) -> MemStats {
        self.st().stats
    }
    fn take_free_range(&mut self, _purpose: RangeUse) -> Option<FreeRange> {
        let mut s = self.0.borrow_mut();
        s.takes += 1;
        if s.take_limit.is_some_and(|limit| s.takes > limit) {
            return None;
        }
        let (addr, len) = s.free_ranges.pop_first()?;
        s.lent_ranges.insert((addr, len));
        Some(FreeRange { addr, len })
    }
    fn return_free_range(&mut self, r: FreeRange, purpose: RangeUse, how: RangeReturn) {
        let mut s = self.0.borrow_mut();
        if !s.lent_ranges.remove(&(r.addr, r.len)) {
            s.errors.push(format!("range {r:?} returned but not lent"));
            return;
        }
        s.returns.push((r, purpose, how));
        // Reported ranges are not offered again (the platform marks them), nor leaked ones
        // (the device may still write them).
        if how != RangeReturn::Reported && how != RangeReturn::Leaked {
            s.free_ranges.insert((r.addr, r.len));
        }
    }
}

// ---- the rig ----

struct Rig {
    sim: Sim,
    model: BalloonModel,
    pool: TestPool,
    drv: BalloonDriver<Dev, TestPool>,
    what: String,
}

fn try_rig(
    mode: SimMode,
    pref: Preference,
    model: &BalloonModel,
    pool: &TestPool,
    opts: BalloonOptions,
    msix: bool,
) -> (Sim, Result<BalloonDriver<Dev, TestPool>, BalloonError>) {
    let sim = model.sim_builder(mode, RING, msix).build();
    let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let drv = BalloonDriver::new(dev, pool.clone(), opts);
    (sim, drv)
}

fn rig_with(
    mode: SimMode,
    pref: Preference,
    features: u64,
    pool: TestPool,
    opts: BalloonOptions,
    msix: bool,
) -> Rig {
    let model = BalloonModel::new(features);
    let what = format!("{mode:?}/{pref:?} features {features:#x}");
    let (sim, drv) = try_rig(mode, pref, &model, &pool, opts, msix);
    let drv = drv.unwrap_or_else(|e| panic!("{what}: setup: {e}"));
    assert!(sim.status() & DeviceStatus::DRIVER_OK.bits() != 0);
    sim.check_init_order().unwrap();
    let mut r = Rig {
        sim,
        model,
        pool,
        drv,
        what,
    };
    r.run();
    r
}

fn rig(mode: SimMode, pref: Preference, features: u64) -> Rig {
    rig_with(
        mode,
        pref,
        features,
        TestPool::new(4096, 8192),
        BalloonOptions::default(),
        false,
    )
}

impl Rig {
    /// One round: the device serves, the driver takes the interrupts.
    fn step(&mut self) -> Result<usize, BalloonError> {
        let served = self.model.serve(&self.sim);
        let irqs = self.sim.take_interrupts();
        for irq in &irqs {
            let vector = match irq {
                SimInterrupt::Msix(v) => Some(*v),
                SimInterrupt::Intx => None,
            };
            let ev = self.drv.handle_interrupt(vector)?;
            assert!(!ev.needs_reset, "{}", self.what);
        }
        Ok(served + irqs.len())
    }

    /// Steps until nothing moves.
    fn run(&mut self) {
        for _ in 0..10_000 {
            match self.step() {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => panic!("{}: {e}", self.what),
            }
        }
        panic!("{}: no quiescence", self.what);
    }

    fn set_target(&mut self, frames: u32) {
        self.model.set_target(&self.sim, frames);
        self.run();
    }

    fn actual(&self) -> u32 {
        self.model.actual(&self.sim)
    }

    /// At rest: the device's set is exactly the frames of the pages the pool lent, and
    /// `actual` counts them.
    fn check_consistent(&self) {
        assert!(
            self.model.violations.is_empty(),
            "{}: {:?}",
            self.what,
            self.model.violations
        );
        assert!(self.pool.st().errors.is_empty(), "{}", self.what);
        assert_eq!(
            self.model.ballooned,
            self.pool.lent_frames(),
            "{}: device set vs pages lent",
            self.what
        );
        assert_eq!(
            self.actual() as usize,
            self.model.ballooned.len(),
            "{}",
            self.what
        );
        assert_eq!(self.drv.actual(), self.actual());
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{}: {:?}",
            self.what,
            self.sim.bad_accesses()
        );
    }

    /// deflate_all, drain, shutdown, drop: everything back in the pool.
    fn finish(mut self) {
        self.drv.deflate_all().unwrap();
        self.run();
        assert!(self.drv.is_empty(), "{}", self.what);
        self.check_consistent();
        assert!(self.model.ballooned.is_empty());
        self.drv.shutdown();
        let pool = self.pool.clone();
        let what = self.what.clone();
        drop(self);
        pool.check_clean(&what);
    }
}

// ---- tests ----

#[test]
fn inflate_deflate_actual_tracks_the_device_in_every_mode() {
    for (mode, pref) in MODES {
        for msix in [false, true] {
            let mut r = rig_with(
                mode,
                pref,
                QEMU,
                TestPool::new(4096, 8192),
                BalloonOptions::default(),
                msix,
            );
            assert_eq!(r.actual(), 0);
            r.set_target(1000);
            assert_eq!(r.actual(), 1000, "{}", r.what);
            assert!(r.drv.at_target());
            r.check_consistent();
            // 1000 frames in requests of at most 256.
            assert_eq!(r.model.inflates.len(), 4);
            assert!(r.model.inflates.iter().all(|a| a.len() <= 256));
            r.set_target(300);
            assert_eq!(r.actual(), 300);
            r.check_consistent();
            assert_eq!(r.model.deflates.iter().map(Vec::len).sum::<usize>(), 700);
            r.set_target(2000);
            assert_eq!(r.actual(), 2000);
            r.check_consistent();
            r.finish();
        }
    }
}

#[test]
fn sixteen_kib_pages_are_four_frames() {
    for (mode, pref) in MODES {
        let mut r = rig_with(
            mode,
            pref,
            QEMU,
            TestPool::new(16384, 1024),
            BalloonOptions::default(),
            false,
        );
        assert_eq!(r.drv.frames_per_page(), 4);
        assert_eq!(r.drv.batch_pages(), 64);
        // 10 frames round up to 3 pages = 12 frames; stable, no flapping.
        r.set_target(10);
        assert_eq!(r.actual(), 12);
        assert_eq!(r.model.inflates.len(), 1);
        for a in &r.model.inflates {
            for group in a.chunks(4) {
                assert_eq!(group[0] % 4, 0);
                assert_eq!(group, &[group[0], group[0] + 1, group[0] + 2, group[0] + 3]);
            }
        }
        r.check_consistent();
        // 1000 frames = 250 pages: requests of 64 pages (256 frames).
        r.set_target(1000);
        assert_eq!(r.actual(), 1000);
        assert!(
            r.model
                .inflates
                .iter()
                .all(|a| a.len() <= 256 && a.len() % 4 == 0)
        );
        r.set_target(7);
        assert_eq!(r.actual(), 8);
        r.check_consistent();
        r.finish();
    }
}

#[test]
fn must_tell_host_holds_pages_until_the_deflate_is_acknowledged() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        r.set_target(512);
        r.model.hold_deflates = true;
        r.set_target(0);
        // One deflate request is out; its pages are not back.
        assert_eq!(r.model.held_deflates(), 1, "{}", r.what);
        assert_eq!(
            r.pool.lent(),
            512,
            "{}: pages reused before the ack",
            r.what
        );
        assert!(r.pool.st().freed.is_empty());
        assert_eq!(r.actual(), 512, "actual moves only after the ack");
        r.model.hold_deflates = false;
        r.model.release_deflates(&r.sim);
        r.run();
        assert_eq!(r.pool.lent(), 0);
        assert_eq!(r.actual(), 0);
        r.check_consistent();
        r.finish();
    }
}

#[test]
fn without_must_tell_host_pages_return_when_the_deflate_is_queued() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, bits::STATS_VQ);
        r.set_target(256);
        r.model.hold_deflates = true;
        r.set_target(0);
        assert_eq!(r.model.held_deflates(), 1);
        assert_eq!(
            r.pool.lent(),
            0,
            "{}: courtesy deflate frees at once",
            r.what
        );
        // The device still holds the request; actual follows the ack.
        assert_eq!(r.actual(), 256);
        r.model.hold_deflates = false;
        r.model.release_deflates(&r.sim);
        r.run();
        assert_eq!(r.actual(), 0);
        assert!(r.model.ballooned.is_empty());
        r.finish();
    }
}

#[test]
fn stats_round_trip_with_a_constant_tag_set() {
    for (mode, pref) in MODES {
        let pool = TestPool::new(4096, 4096);
        pool.0.borrow_mut().stats = MemStats {
            swap_in: Some(11),
            major_faults: Some(22),
            mem_free: Some(3 << 20),
            mem_available: Some(5 << 20),
            hugetlb_failures: Some(9),
            ..MemStats::default()
        };
        let mut r = rig_with(mode, pref, QEMU, pool, BalloonOptions::default(), false);
        // The initial buffer: the platform's tags plus MEMTOT from the pool size.
        assert_eq!(r.model.stats.len(), 1, "{}", r.what);
        assert_eq!(
            r.model.stats[0],
            vec![
                (0, 11),
                (2, 22),
                (4, 3 << 20),
                (5, 4096 * 4096),
                (6, 5 << 20),
                (9, 9)
            ]
        );
        // The host asks; the driver answers with fresh values.
        {
            let mut s = r.pool.0.borrow_mut();
            s.stats.mem_free = Some(1 << 20);
            s.stats.swap_in = None; // no longer available: last value is repeated
            s.stats.caches = Some(77); // new tag: not added (the set is fixed)
        }
        assert!(r.model.request_stats(&r.sim));
        r.run();
        assert_eq!(r.model.stats.len(), 2);
        assert_eq!(
            r.model.stats[1],
            vec![
                (0, 11),
                (2, 22),
                (4, 1 << 20),
                (5, 4096 * 4096),
                (6, 5 << 20),
                (9, 9)
            ]
        );
        for _ in 0..5 {
            assert!(r.model.request_stats(&r.sim), "buffer re-added every time");
            r.run();
        }
        assert_eq!(r.model.stats.len(), 7);
        r.check_consistent();
        r.finish();
    }
}

#[test]
fn oom_deflate() {
    for (mode, pref) in MODES {
        for tell in [true, false] {
            let f =
                bits::STATS_VQ | bits::DEFLATE_ON_OOM | if tell { bits::MUST_TELL_HOST } else { 0 };
            let mut r = rig(mode, pref, f);
            r.set_target(600);
            let out = r.drv.deflate_for_oom(100).unwrap();
            if tell {
                assert_eq!((out.released, out.pending), (0, 100), "{}", r.what);
                assert_eq!(r.pool.lent(), 600);
            } else {
                assert_eq!((out.released, out.pending), (100, 0), "{}", r.what);
                assert_eq!(r.pool.lent(), 500);
            }
            r.run();
            assert_eq!(r.pool.lent(), 500);
            assert_eq!(r.actual(), 500);
            r.check_consistent();
            // No re-inflation while the target is unchanged, even on a config interrupt.
            r.sim.raise_config_interrupt();
            r.run();
            r.drv.poll().unwrap();
            r.run();
            assert_eq!(r.actual(), 500);
            // A large OOM request goes a request (256 pages) at a time.
            let out = r.drv.deflate_for_oom(400).unwrap();
            assert_eq!(out.released + out.pending, 400);
            r.run();
            assert_eq!(r.actual(), 100);
            r.check_consistent();
            // The host sets a new target: the balloon follows again.
            r.set_target(700);
            assert_eq!(r.actual(), 700);
            r.check_consistent();
            r.finish();
        }
        // Not negotiated: refused.
        let mut r = rig(mode, pref, QEMU);
        r.set_target(10);
        assert_eq!(r.drv.deflate_for_oom(5), Err(BalloonError::NotNegotiated));
        r.finish();
        // Offered but refused by the options.
        let mut r = rig_with(
            mode,
            pref,
            QEMU | bits::DEFLATE_ON_OOM,
            TestPool::new(4096, 1024),
            BalloonOptions {
                deflate_on_oom: false,
                ..BalloonOptions::default()
            },
            false,
        );
        assert_eq!(r.sim.driver_features() & bits::DEFLATE_ON_OOM, 0);
        r.set_target(10);
        assert_eq!(r.drv.deflate_for_oom(5), Err(BalloonError::NotNegotiated));
        r.finish();
    }
}

#[test]
fn free_page_hinting_rounds() {
    for (mode, pref) in MODES {
        let pool = TestPool::new(4096, 1024).with_ranges(40, 0x40_0000);
        let mut r = rig_with(
            mode,
            pref,
            QEMU | bits::FREE_PAGE_HINT,
            pool,
            BalloonOptions::default(),
            false,
        );
        assert_eq!(r.drv.layout().free_page, Some(3));
        assert_eq!(
            r.sim.driver_features() & bits::PAGE_POISON,
            0,
            "PAGE_POISON is refused"
        );
        // Round 1: the device asks; the driver sends the ID, hints every range, STOP.
        r.model.set_cmd_id(&r.sim, 0x8000_0000);
        r.run();
        assert_eq!(
            r.model.cmd_ids_received,
            vec![0x8000_0000, CMD_STOP],
            "{}",
            r.what
        );
        assert_eq!(r.model.hints.len(), 40);
        assert_eq!(r.model.hint_status, HintStatus::Stopped);
        assert!(!r.drv.hinting());
        // The ranges stay held until DONE.
        assert_eq!(r.pool.st().lent_ranges.len(), 40);
        assert_eq!(r.drv.hinted_ranges(), 40);
        r.model.set_cmd_id(&r.sim, CMD_DONE);
        r.run();
        assert_eq!(r.pool.st().lent_ranges.len(), 0);
        assert!(
            r.pool
                .st()
                .returns
                .iter()
                .all(|(_, u, how)| *u == RangeUse::Hint && *how == RangeReturn::HintReleased)
        );
        // Round 2 with the bound on held ranges: stops at 16.
        r.model.hints.clear();
        r.model.cmd_ids_received.clear();
        r.model.set_cmd_id(&r.sim, 0x8000_0001);
        r.run();
        assert_eq!(r.model.cmd_ids_received, vec![0x8000_0001, CMD_STOP]);
        assert_eq!(r.model.hints.len(), 40);
        // The device stops the round early, then releases with a new round + DONE.
        r.model.set_cmd_id(&r.sim, CMD_STOP);
        r.run();
        assert_eq!(r.pool.st().lent_ranges.len(), 40, "STOP keeps hinted pages");
        r.model.set_cmd_id(&r.sim, CMD_DONE);
        r.run();
        assert_eq!(r.pool.st().lent_ranges.len(), 0);
        r.check_consistent();
        r.finish();
    }
}

#[test]
fn hint_round_bounded_and_released_under_pressure() {
    let pool = TestPool::new(4096, 1024).with_ranges(64, 0x1000);
    let mut r = rig_with(
        SimMode::Modern,
        Preference::Auto,
        QEMU | bits::FREE_PAGE_HINT,
        pool,
        BalloonOptions {
            max_hint_ranges: 16,
            ..BalloonOptions::default()
        },
        true,
    );
    r.model.set_cmd_id(&r.sim, 0x8000_0005);
    r.run();
    assert_eq!(r.model.hints.len(), 16);
    assert_eq!(r.model.cmd_ids_received, vec![0x8000_0005, CMD_STOP]);
    assert_eq!(r.pool.st().lent_ranges.len(), 16);
    // Memory pressure: the platform takes them back before DONE.
    assert_eq!(r.drv.release_hints().unwrap(), 16);
    assert_eq!(r.pool.st().lent_ranges.len(), 0);
    r.run();
    // A new round can hint again (slots were freed).
    r.model.set_cmd_id(&r.sim, 0x8000_0006);
    r.run();
    assert_eq!(r.model.hints.len(), 32);
    r.finish();
}

#[test]
fn page_reporting() {
    for (mode, pref) in MODES {
        for ring in [RING, bits::BAD_FEATURE] {
            let pool = TestPool::new(4096, 1024).with_ranges(70, 0x20_0000);
            let model = BalloonModel::new(QEMU | bits::PAGE_REPORTING);
            let what = format!("{mode:?}/{pref:?} ring {ring:#x}");
            let sim = model.sim_builder(mode, ring, false).build();
            let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
            let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
            let drv = BalloonDriver::new(dev, pool.clone(), BalloonOptions::default()).unwrap();
            let mut r = Rig {
                sim,
                model,
                pool,
                drv,
                what,
            };
            // No FREE_PAGE_HINT: the reporting queue is number 3.
            assert_eq!(r.drv.layout().reporting, Some(3));
            r.run();
            // Reporting starts after DRIVER_OK: 32 + 32 + 6 ranges.
            let sizes: Vec<usize> = r.model.reports.iter().map(Vec::len).collect();
            assert_eq!(sizes, vec![32, 32, 6], "{}", r.what);
            assert_eq!(r.pool.st().lent_ranges.len(), 0);
            assert_eq!(r.pool.st().returns.len(), 70);
            assert!(
                r.pool
                    .st()
                    .returns
                    .iter()
                    .all(|(_, u, how)| *u == RangeUse::Report && *how == RangeReturn::Reported)
            );
            // Held by the device: the ranges stay out until acknowledged.
            r.pool
                .0
                .borrow_mut()
                .free_ranges
                .insert((0x90_0000_0000, 0x1000));
            r.model.hold_reports = true;
            assert_eq!(r.drv.report_free_pages().unwrap(), 1);
            r.run();
            assert_eq!(r.pool.st().lent_ranges.len(), 1);
            assert_eq!(
                r.drv.report_free_pages().unwrap(),
                0,
                "one report at a time"
            );
            r.model.hold_reports = false;
            r.model.release_reports(&r.sim);
            r.run();
            assert_eq!(r.pool.st().lent_ranges.len(), 0);
            r.check_consistent();
            r.finish();
        }
    }
}

#[test]
fn queue_numbering_on_the_device() {
    for (offered, expect) in [
        (0u64, (None, None, None, 2usize)),
        (bits::STATS_VQ, (Some(2), None, None, 3)),
        (bits::FREE_PAGE_HINT, (None, Some(2), None, 3)),
        (bits::PAGE_REPORTING, (None, None, Some(2), 3)),
        (
            bits::STATS_VQ | bits::PAGE_REPORTING,
            (Some(2), None, Some(3), 4),
        ),
        (ALL, (Some(2), Some(3), Some(4), 5)),
    ] {
        let r = rig(SimMode::Modern, Preference::Auto, offered);
        let l = r.drv.layout();
        assert_eq!(
            (l.stats, l.free_page, l.reporting),
            (expect.0, expect.1, expect.2)
        );
        assert_eq!(l.count() as usize, expect.3);
        for q in 0..expect.3 as u16 {
            assert!(r.sim.queue_info(q).unwrap().enabled, "queue {q} set up");
        }
        r.finish();
    }
}

/// A device offering FREE_PAGE_HINT and PAGE_REPORTING (QEMU `free-page-hint=on,
/// free-page-reporting=on`) has its reporting queue at 4 whatever the driver accepts: with
/// hinting declined, queue 3 stays unused and the reports reach queue 4.
#[test]
fn declined_hinting_keeps_the_reporting_queue_at_four() {
    for (mode, pref) in MODES {
        let features = QEMU | bits::FREE_PAGE_HINT | bits::PAGE_REPORTING;
        let pool = TestPool::new(4096, 1024).with_ranges(40, 0x20_0000);
        let opts = BalloonOptions {
            free_page_hint: false,
            ..BalloonOptions::default()
        };
        let r = rig_with(mode, pref, features, pool, opts, false);
        let what = r.what.clone();
        assert_eq!(
            r.model.layout().reporting,
            Some(4),
            "{what}: the device's numbering"
        );
        let l = r.drv.layout();
        assert_eq!(
            (l.stats, l.free_page, l.reporting),
            (Some(2), None, Some(4)),
            "{what}"
        );
        assert_eq!(r.sim.driver_features() & bits::FREE_PAGE_HINT, 0, "{what}");
        for q in [0, 1, 2, 4] {
            assert!(
                r.sim.queue_info(q).unwrap().ready,
                "{what}: queue {q} set up"
            );
        }
        assert!(
            !r.sim.queue_info(3).unwrap().ready,
            "{what}: queue 3 set up"
        );
        // Reporting began after DRIVER_OK: 32 + 8 ranges, on the reporting queue.
        let sizes: Vec<usize> = r.model.reports.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![32, 8], "{what}");
        assert_eq!(r.model.stale_hints, 0, "{what}: reports on the hint queue");
        assert!(
            r.pool
                .st()
                .returns
                .iter()
                .all(|(_, u, how)| *u == RangeUse::Report && *how == RangeReturn::Reported),
            "{what}"
        );
        r.check_consistent();
        r.finish();
    }
}

/// A device that will not reset and whose bus mastering cannot be switched off while it
/// holds a report: the report's ranges are device-writable buffers it may still write, so
/// they come back `Leaked` (never reused), not `Reset`. The balloon's pages, which the
/// device never writes, go back as before.
#[test]
fn ranges_a_device_may_still_write_are_leaked_after_a_failed_reset() {
    let features = QEMU | bits::PAGE_REPORTING;
    let pool = TestPool::new(4096, 1024);
    let mut r = rig_with(
        SimMode::Modern,
        Preference::Auto,
        features,
        pool,
        BalloonOptions::default(),
        false,
    );
    r.set_target(100);
    r.model.hold_reports = true;
    r.pool
        .0
        .borrow_mut()
        .free_ranges
        .insert((0x90_0000_0000, 0x4000));
    assert_eq!(r.drv.report_free_pages().unwrap(), 1);
    r.run();
    assert_eq!(r.model.held_report_heads().len(), 1);
    r.sim.stick_bus_master(true);
    r.sim.refuse_reset(true);
    r.drv.shutdown();
    let st = r.pool.st();
    assert!(st.lent.is_empty(), "the balloon's pages went back");
    assert_eq!(
        st.returns
            .last()
            .map(|(range, u, how)| (range.addr, *u, *how)),
        Some((0x90_0000_0000, RangeUse::Report, RangeReturn::Leaked))
    );
    assert!(
        !st.free_ranges.contains(&(0x90_0000_0000, 0x4000)),
        "a leaked range offered again"
    );
    drop(st);
    assert_eq!(r.drv.counters().ranges_leaked, 1);
    // The reset takes effect at last: nothing more is leaked, and the driver comes back.
    r.sim.refuse_reset(false);
    r.sim.stick_bus_master(false);
    r.drv.restart().unwrap();
    assert_eq!(r.drv.counters().ranges_leaked, 1);
    r.run();
    r.finish();
}

/// An inflate the device has not used when a reset fails with bus mastering stuck on
/// (stop, sleep, or a restart): the device may still process it and make the host discard
/// the pages' backing, so they are leaked, never given back to the platform. The balloon's
/// acknowledged pages go back.
#[test]
fn an_inflate_a_device_may_still_process_is_leaked_after_a_failed_reset() {
    for restart in [false, true] {
        let pool = TestPool::new(4096, 1024);
        let mut r = rig_with(
            SimMode::Modern,
            Preference::Auto,
            QEMU,
            pool,
            BalloonOptions::default(),
            false,
        );
        r.set_target(100);
        // The device sees the new target and the driver posts an inflate: left unserved.
        r.model.set_target(&r.sim, 150);
        for irq in r.sim.take_interrupts() {
            let vector = match irq {
                SimInterrupt::Msix(v) => Some(v),
                SimInterrupt::Intx => None,
            };
            r.drv.handle_interrupt(vector).unwrap();
        }
        assert!(!r.drv.at_target());
        let ballooned: BTreeSet<u64> = r
            .pool
            .st()
            .lent
            .iter()
            .copied()
            .filter(|&a| r.model.ballooned.contains(&((a >> 12) as u32)))
            .collect();
        let inflating: BTreeSet<u64> = r.pool.st().lent.difference(&ballooned).copied().collect();
        assert_eq!((ballooned.len(), inflating.len()), (100, 50));
        r.sim.stick_bus_master(true);
        r.sim.refuse_reset(true);
        if restart {
            assert!(r.drv.restart().is_err());
        } else {
            r.drv.shutdown();
        }
        {
            let st = r.pool.st();
            assert!(st.errors.is_empty(), "{:?}", st.errors);
            assert!(st.lent.is_empty(), "restart {restart}: nothing left lent");
            assert_eq!(
                st.leaked, inflating,
                "restart {restart}: the inflate leaked"
            );
            assert!(
                st.free.is_disjoint(&inflating),
                "a leaked page offered again"
            );
            assert!(
                ballooned.is_subset(&st.free),
                "the balloon's pages went back"
            );
        }
        assert_eq!(r.drv.counters().pages_leaked, 50);
        // The reset takes effect at last: nothing more is leaked, and the driver comes back
        // (never lending a leaked page again).
        r.sim.refuse_reset(false);
        r.sim.stick_bus_master(false);
        r.drv.restart().unwrap();
        r.run();
        assert_eq!(r.actual(), 150);
        assert_eq!(r.drv.counters().pages_leaked, 50);
        assert!(r.pool.st().lent.is_disjoint(&inflating));
        r.check_consistent();
        r.finish();
    }
}

/// `deflate_all` empties the balloon until the next reset only: after `shutdown` and
/// `restart` (sleep and wake) the driver follows the host's target again.
#[test]
fn a_restart_after_deflate_all_follows_the_target_again() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU);
    r.set_target(500);
    r.drv.deflate_all().unwrap();
    r.run();
    assert!(r.drv.is_empty());
    assert_eq!(r.actual(), 0);
    r.drv.shutdown();
    r.drv.restart().unwrap();
    r.run();
    assert_eq!(r.actual(), 500, "inflated to the target again");
    r.check_consistent();
    // After a fault's restart too.
    r.drv.deflate_all().unwrap();
    r.run();
    r.drv.restart().unwrap();
    r.run();
    assert_eq!(r.actual(), 500);
    r.finish();
}

#[test]
fn many_random_targets_keep_the_books() {
    for (mode, pref) in MODES {
        for page_size in [4096usize, 16384] {
            let mut seed = 0x2545_F491_4F6C_DD1Du64 ^ page_size as u64;
            let mut rnd = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let pool = TestPool::new(page_size, 3000).with_ranges(50, 0x10_0000);
            let mut r = rig_with(
                mode,
                pref,
                ALL,
                pool,
                BalloonOptions {
                    max_pages: 2000,
                    ..BalloonOptions::default()
                },
                rnd(2) == 0,
            );
            let fpp = (page_size / 4096) as u32;
            for round in 0..120 {
                match rnd(10) {
                    0..=5 => {
                        let t = rnd(12_000) as u32;
                        r.set_target(t);
                        let want = (t.div_ceil(fpp) as usize).min(2000) as u32 * fpp;
                        assert_eq!(r.actual(), want, "{} round {round}: target {t}", r.what);
                    }
                    6 => {
                        let n = rnd(600) as usize;
                        r.drv.deflate_for_oom(n).unwrap();
                        r.run();
                    }
                    7 => {
                        r.model.set_cmd_id(&r.sim, 0x8000_0000 + round);
                        r.run();
                        if rnd(2) == 0 {
                            r.model.set_cmd_id(&r.sim, CMD_DONE);
                            r.run();
                        }
                    }
                    8 => {
                        r.drv.report_free_pages().unwrap();
                        r.run();
                        assert!(r.model.request_stats(&r.sim));
                        r.run();
                    }
                    _ => {
                        // The platform runs short, then recovers.
                        let keep = rnd(500) as usize;
                        let taken: Vec<u64> = {
                            let mut s = r.pool.0.borrow_mut();
                            let n = s.free.len().saturating_sub(keep);
                            (0..n).filter_map(|_| s.free.pop_last()).collect()
                        };
                        r.set_target(rnd(12_000) as u32);
                        r.check_consistent();
                        r.pool.0.borrow_mut().free.extend(taken);
                        r.drv.poll().unwrap();
                        r.run();
                    }
                }
                r.check_consistent();
                // Held hint ranges + ranges in reports are the only ranges out.
                assert!(r.pool.st().lent_ranges.len() <= 50);
            }
            r.model.set_cmd_id(&r.sim, CMD_DONE);
            r.run();
            r.finish();
        }
    }
}

#[test]
fn absurd_targets_are_clamped() {
    for (mode, pref) in MODES {
        let mut r = rig_with(
            mode,
            pref,
            QEMU,
            TestPool::new(4096, 4096),
            BalloonOptions {
                max_pages: 1500,
                ..BalloonOptions::default()
            },
            false,
        );
        r.set_target(u32::MAX);
        assert_eq!(r.actual(), 1500, "{}", r.what);
        assert_eq!(r.drv.target_pages(), 1500);
        assert_eq!(r.drv.counters().targets_clamped, 1);
        r.check_consistent();
        // The pool runs dry below the bound: the driver stops, no spinning.
        let mut r2 = rig_with(
            mode,
            pref,
            QEMU,
            TestPool::new(4096, 700),
            BalloonOptions {
                max_pages: 4000,
                ..BalloonOptions::default()
            },
            false,
        );
        r2.set_target(0xFFFF_0000);
        assert_eq!(r2.actual(), 700);
        assert!(r2.drv.counters().alloc_failures >= 1);
        r2.check_consistent();
        // A bad page from the platform (misaligned) is given straight back.
        r2.set_target(0);
        r2.pool.0.borrow_mut().bad_page_next = true;
        r2.set_target(10);
        assert_eq!(r2.drv.counters().rejected_from_platform, 1);
        r2.drv.poll().unwrap();
        r2.run();
        assert_eq!(r2.actual(), 10);
        r2.check_consistent();
        r.finish();
        r2.finish();
    }
}

#[test]
fn hostile_used_lengths_stop_modern_drivers_and_are_ignored_on_legacy() {
    for (mode, pref) in MODES {
        for queue in [0u16, 1, 2] {
            let mut r = rig(mode, pref, QEMU);
            r.set_target(300);
            if queue == 1 {
                r.model.len_override = Some((1, 4));
                r.model.set_target(&r.sim, 0);
            } else if queue == 0 {
                r.model.len_override = Some((0, 1024));
                r.model.set_target(&r.sim, 600);
            } else {
                r.model.len_override = Some((2, 10));
                r.model.request_stats(&r.sim);
            }
            let mut err = None;
            for _ in 0..100 {
                match r.step() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let legacy = mode == SimMode::Legacy || pref == Preference::Legacy;
            if legacy {
                // Legacy balloon devices may write the buffer length into used.len
                // (§5.5.6): the driver does not trust it there and carries on.
                assert!(err.is_none(), "{} queue {queue}: {err:?}", r.what);
                assert!(!r.drv.is_stopped());
                r.model.len_override = None;
                r.run();
            } else {
                assert!(
                    matches!(
                        err,
                        Some(BalloonError::Virtio(Error::UsedLenTooLarge { .. }))
                    ),
                    "{} queue {queue}: {err:?}",
                    r.what
                );
                assert!(r.drv.is_stopped());
                assert_eq!(r.drv.poll(), Err(BalloonError::Stopped));
                // Restart: the device forgets the balloon, the pool gets everything back,
                // and the driver inflates to the target again.
                r.model.len_override = None;
                r.drv.restart().unwrap();
                r.run();
            }
            let want = if queue == 1 {
                0
            } else if queue == 0 {
                600
            } else {
                300
            };
            assert_eq!(r.actual(), want, "{} queue {queue}", r.what);
            r.check_consistent();
            r.finish();
        }
    }
}

#[test]
fn forged_completions_are_faults() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU);
    r.set_target(100);
    // A used entry for a descriptor that is not in flight on the deflate queue.
    r.sim.complete_raw(1, 5, 0);
    r.sim.signal_used(1);
    let err = r.step().and_then(|_| r.drv.poll().map(|_| 0));
    assert!(
        matches!(err, Err(BalloonError::Virtio(Error::UsedIdxJump { .. }))),
        "{err:?}"
    );
    r.drv.restart().unwrap();
    r.run();
    assert_eq!(r.actual(), 100);
    r.check_consistent();
    r.finish();
}

#[test]
fn needs_reset_then_restart() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, ALL);
        r.set_target(400);
        r.sim.trigger_needs_reset();
        let irqs = r.sim.take_interrupts();
        let mut saw = false;
        for irq in irqs {
            let v = match irq {
                SimInterrupt::Msix(v) => Some(v),
                SimInterrupt::Intx => None,
            };
            saw |= r.drv.handle_interrupt(v).unwrap().needs_reset;
        }
        assert!(saw, "{}", r.what);
        r.drv.restart().unwrap();
        r.run();
        assert_eq!(r.actual(), 400);
        r.check_consistent();
        r.finish();
    }
}

#[test]
fn drop_without_shutdown_returns_everything() {
    let pool = TestPool::new(4096, 2048).with_ranges(8, 0x1000);
    let mut r = rig_with(
        SimMode::Transitional,
        Preference::Auto,
        ALL,
        pool,
        BalloonOptions::default(),
        false,
    );
    r.set_target(900);
    r.model.set_cmd_id(&r.sim, 0x8000_0000);
    r.run();
    assert!(r.pool.lent() > 0);
    let pool = r.pool.clone();
    drop(r);
    pool.check_clean("drop");
}

#[test]
fn wrong_device_type_and_page_size_are_refused() {
    let model = BalloonModel::new(QEMU);
    let sim = model.sim_builder(SimMode::Modern, RING, false).build();
    let t = probe(sim.config_space(), sim.bars(), Preference::Auto).unwrap();
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let r = BalloonDriver::new(dev, TestPool::new(2048, 16), BalloonOptions::default());
    assert!(matches!(r, Err(BalloonError::BadPageSize { size: 2048 })));

    let sim = virtio_tests::sim::SimBuilder::new(SimMode::Modern, 2).build();
    let t = probe(sim.config_space(), sim.bars(), Preference::Auto).unwrap();
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let r = BalloonDriver::new(dev, TestPool::new(4096, 16), BalloonOptions::default());
    assert!(matches!(r, Err(BalloonError::Virtio(Error::Unsupported))));
}

#[test]
fn drop_after_a_fault_returns_reported_ranges() {
    let pool = TestPool::new(4096, 256).with_ranges(4, 0x1000);
    let model = BalloonModel::new(QEMU | bits::PAGE_REPORTING);
    let sim = model.sim_builder(SimMode::Modern, RING, true).build();
    let t = probe(sim.config_space(), sim.bars(), Preference::Auto).unwrap();
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let drv = BalloonDriver::new(dev, pool.clone(), BalloonOptions::default()).unwrap();
    let mut r = Rig {
        sim,
        model,
        pool,
        drv,
        what: "fault with a report out".into(),
    };
    // The device holds the report and then lies on the reporting queue.
    r.model.hold_reports = true;
    r.run();
    assert_eq!(r.pool.st().lent_ranges.len(), 4);
    r.sim.complete_raw(3, 7, 0);
    r.sim.signal_used(3);
    assert!(r.step().and_then(|_| r.drv.poll().map(|_| 0)).is_err());
    assert!(r.drv.is_stopped() && r.drv.is_empty());
    let pool = r.pool.clone();
    drop(r);
    pool.check_clean("drop after fault");
}

/// A bound the platform cannot track (`max_pages` beyond what it can allocate 8 bytes a
/// page for: at most `u32::MAX` frames' worth, ~32 GiB at 4 KiB, which the test's allocator
/// refuses as a kernel would): `new` fails with `NoMemory` before touching the device, with
/// nothing allocated or lent; the same device then comes up under a sane bound.
#[test]
fn a_bound_the_platform_cannot_track_fails_setup_cleanly() {
    for (mode, pref) in MODES {
        for page_size in [4096usize, 16384] {
            let what = format!("{mode:?}/{pref:?} page {page_size}");
            let model = BalloonModel::new(ALL);
            let pool = TestPool::new(page_size, 64).with_ranges(4, 0x1000);
            let sim = model.sim_builder(mode, RING, false).build();
            let free_before = sim.memory().free_bytes();
            let absurd = BalloonOptions {
                max_pages: usize::MAX,
                ..BalloonOptions::default()
            };
            let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
            let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
            let r = BalloonDriver::new(dev, pool.clone(), absurd);
            assert!(matches!(r, Err(BalloonError::NoMemory)), "{what}");
            drop(r);
            assert_eq!(sim.memory().free_bytes(), free_before, "{what}: DMA leaked");
            assert_eq!(sim.status() & DeviceStatus::DRIVER_OK.bits(), 0, "{what}");
            assert_eq!(sim.driver_features(), 0, "{what}: the device was touched");
            pool.check_clean(&what);

            let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
            let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
            let drv = BalloonDriver::new(dev, pool.clone(), BalloonOptions::default())
                .unwrap_or_else(|e| panic!("{what}: setup after the failure: {e}"));
            assert_eq!(drv.max_pages(), 64, "{what}");
            let mut r = Rig {
                sim,
                model,
                pool,
                drv,
                what,
            };
            r.set_target(1000);
            assert_eq!(r.actual() as usize, 64 * page_size / 4096, "{}", r.what);
            r.check_consistent();
            r.finish();
        }
    }
}

/// Issue 14, bug 2: a device that completes the statistics buffer on every notification
/// kept `poll` (and `handle_interrupt`) answering it forever. Now one request is answered
/// per call. The flood stops after `FLOOD_ROUNDS` so a regression fails instead of hanging.
#[test]
fn stats_flood_is_answered_once_per_call() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const FLOOD_ROUNDS: usize = 1_000;
    for (mode, pref) in MODES {
        // Without EVENT_IDX every re-add is kicked (the model does not move avail_event).
        let model = BalloonModel::new(QEMU);
        let pool = TestPool::new(4096, 8192);
        let sim = model
            .sim_builder(mode, RING & !bits::EVENT_IDX, false)
            .build();
        let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
        let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
        let drv = BalloonDriver::new(dev, pool.clone(), BalloonOptions::default()).unwrap();
        let mut r = Rig {
            sim,
            model,
            pool,
            drv,
            what: format!("{mode:?}/{pref:?}"),
        };
        r.run();
        let q = r.model.layout().stats.expect("STATS_VQ");
        let rounds = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&rounds);
        r.sim.on_notify(Some(Arc::new(move |sim, queue| {
            if queue == q && seen.fetch_add(1, Ordering::Relaxed) < FLOOD_ROUNDS {
                sim.serve(q, |_| 0);
            }
        })));
        let sent = r.drv.counters().stats_buffers;
        assert!(r.model.request_stats(&r.sim));
        for call in 1..=3u64 {
            r.drv.poll().unwrap();
            assert_eq!(
                r.drv.counters().stats_buffers - sent,
                call,
                "{}: one statistics answer per call",
                r.what
            );
        }
        r.sim.on_notify(None);
        assert!(rounds.load(Ordering::Relaxed) <= 3, "{}", r.what);
        assert!(r.sim.bad_accesses().is_empty());
    }
}

/// Issue 14: every error after `setup_queues` resets and frees. Each allocation of
/// `BalloonDriver::new` fails in turn: nothing stays allocated, no page stays lent, and the
/// device is not live.
#[test]
fn new_failing_at_any_allocation_frees_everything() {
    for (mode, pref) in MODES {
        let model = BalloonModel::new(ALL);
        let pool = TestPool::new(4096, 8192);
        let what = format!("{mode:?}/{pref:?}");
        walk_allocation_failures(
            &what,
            || model.sim_builder(mode, RING, false).build(),
            |sim| {
                let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
                let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
                BalloonDriver::new(dev, pool.clone(), BalloonOptions::default())
            },
            |_, allowed| pool.check_clean(&format!("{what} allocation {allowed}")),
        );
    }
}

/// Issue 14 (found reviewing the `balloon` fuzz target's pool): a free range the driver
/// refuses goes back to the platform as `Unused`, and a platform that offers it again
/// (first in its free list) kept `report_free_pages` and the hinting loop asking forever.
/// Now each stops after as many refusals as it has room for ranges. The pool stops giving
/// ranges after `LIMIT` requests so a regression fails instead of hanging.
#[test]
fn a_refused_free_range_offered_again_does_not_hang_reporting_or_hinting() {
    const LIMIT: usize = 10_000;
    for (mode, pref) in MODES {
        let pool = TestPool::new(4096, 64).with_ranges(4, 0x20_0000);
        {
            let mut s = pool.0.borrow_mut();
            // Misaligned, and first in the free list: offered again after each refusal.
            s.free_ranges.insert((0x800, 0x1000));
            s.take_limit = Some(LIMIT);
        }
        let features = QEMU | bits::PAGE_REPORTING | bits::FREE_PAGE_HINT;
        let model = BalloonModel::new(features);
        let what = format!("{mode:?}/{pref:?}");
        // Reporting starts in `new` (after DRIVER_OK).
        let (sim, drv) = try_rig(mode, pref, &model, &pool, BalloonOptions::default(), false);
        let drv = drv.unwrap_or_else(|e| panic!("{what}: setup: {e}"));
        let takes = pool.st().takes;
        assert!(takes < 100, "{what}: {takes} ranges asked for one report");
        let mut r = Rig {
            sim,
            model,
            pool,
            drv,
            what,
        };
        r.run();
        // A hinting round asks for ranges too.
        let before = r.pool.st().takes;
        r.model.set_cmd_id(&r.sim, 0x8000_0001);
        r.sim.raise_config_interrupt();
        r.run();
        let takes = r.pool.st().takes - before;
        assert!(
            takes < 1000,
            "{}: {takes} ranges asked for one hint round",
            r.what
        );
        assert!(r.drv.counters().rejected_from_platform > 0, "{}", r.what);
        r.finish();
    }
}
