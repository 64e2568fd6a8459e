//! VirtioBalloon.kext's C ABI (`virtio-balloon-kext`), called the way its IOService shim
//! calls it, on top of the family's C ABI over the PCI simulation with `balloon_model`
//! playing the device. IOKit order: the family starts and publishes its nub; the balloon's
//! `start` creates the device over the nub's handle (it reads the target and inflates);
//! config interrupts, delivered by the family, move the balloon; the shim's chunks are
//! counted here (every chunk wired is freed exactly once, none survives `stop`); sleep
//! resets the device and gives every page back, wake inflates again; `stop` resets it;
//! `free` destroys; the family stops with every DMA region returned. The kernel's memory
//! figures and pressure level come from a sysctl table the test controls (the shim's
//! `sysctlbyname`). Each test runs against the rlibs and against the loaded bundles
//! (`kext_support`).

mod kext_support;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_void};

use kext_support::{Family, FamilyKext, c_abi, kext_tests};
use virtio_balloon::wire::tag;
use virtio_balloon_kext::*;
use virtio_kext_abi::VK_E_RESET_TIMEOUT;
use virtio_pci::Preference;
use virtio_tests::balloon_model::{BalloonModel, bits};
use virtio_tests::balloon_shim::{
    ChunkMemory, FILE_BACKED, FREE, MEMSIZE, PRESSURE, kernel_sysctls,
};
use virtio_tests::capped_alloc::{CappedAllocator, largest_allocation};
use virtio_tests::sim::{MODES, Sim, SimEvent, SimMode};

const RING: u64 = bits::INDIRECT_DESC | bits::EVENT_IDX;
/// QEMU's default offer plus MUST_TELL_HOST and DEFLATE_ON_OOM.
const QEMU: u64 = bits::MUST_TELL_HOST | bits::STATS_VQ | bits::DEFLATE_ON_OOM;

c_abi! {
    /// VirtioBalloon.kext's C functions (`VirtioBalloonABI.h`).
    pub struct BalloonAbi from virtio_balloon_kext {
        fn vbal_create(
            *mut virtio_kext_client::VfamDevice,
            *const VbalConfig,
            *const VbalCallbacks,
            *mut *mut VbalDevice,
        ) -> i32;
        fn vbal_interrupt(*mut VbalDevice, i32);
        fn vbal_poll(*mut VbalDevice) -> i32;
        fn vbal_deflate_for_oom(*mut VbalDevice, u64, *mut VbalOom) -> i32;
        fn vbal_pressure_check(*mut VbalDevice, u64, *mut VbalPressure) -> i32;
        fn vbal_report_check(*mut VbalDevice, u64, *mut VbalReport) -> i32;
        fn vbal_info(*mut VbalDevice, *mut VbalInfo) -> i32;
        fn vbal_drain(*mut VbalDevice, u64) -> i32;
        fn vbal_suspend(*mut VbalDevice) -> i32;
        fn vbal_resume(*mut VbalDevice) -> i32;
        fn vbal_stop(*mut VbalDevice);
        fn vbal_destroy(*mut VbalDevice);
        fn vbal_log_init();
    }
}

/// The family and the balloon kext, both from the rlibs or both loaded.
#[derive(Clone, Copy)]
struct Kexts {
    family: &'static FamilyKext,
    bal: BalloonAbi,
}

impl Kexts {
    fn rlib() -> Kexts {
        Kexts {
            family: FamilyKext::rlib(),
            bal: BalloonAbi::rlib(),
        }
    }

    fn loaded() -> Option<Kexts> {
        let family = FamilyKext::loaded()?;
        let bundle = family.load_device("VirtioBalloon", "_vbal_log_init")?;
        Some(Kexts {
            family,
            bal: BalloonAbi::loaded(bundle),
        })
    }
}

kext_tests!(Kexts:
    inflate_deflate_follow_the_target_in_every_mode,
    sixteen_kib_pages_are_four_frames,
    stats_carry_no_invented_figures,
    stats_carry_the_kernels_memory_figures,
    a_failing_sysctl_leaves_its_tag_unsent,
    pressure_warning_deflates_a_bounded_amount_and_tells_the_host,
    repeated_pressure_is_rate_limited,
    normal_or_unreadable_pressure_does_nothing,
    the_kernel_running_short_pauses_and_poll_resumes,
    oom_hook_deflates_and_holds,
    needs_reset_recovers_and_reinflates,
    lifecycle_across_sleep_and_wake,
    stop_tells_the_host_of_every_page_before_the_reset,
    sleep_tells_the_host_of_every_page_before_the_reset,
    a_device_that_does_not_acknowledge_delays_stop_and_sleep_boundedly,
    null_arguments_are_refused,
    a_reporting_round_reports_wired_frames_and_frees_them_after_the_device,
    contiguous_pages_are_reported_as_one_range,
    no_reporting_when_memory_is_low_or_under_pressure,
    pressure_mid_round_cuts_the_round_short,
    reporting_is_rate_limited_and_one_round_at_a_time,
    sleep_stop_or_reset_mid_report_frees_every_chunk,
    a_hostile_reporting_device_never_leaks_or_double_frees,
    reporting_is_off_unless_offered,
    reporting_skips_the_queue_of_declined_hinting,
    a_device_that_will_not_reset_keeps_its_report_wired,
    a_device_that_will_not_reset_keeps_an_inflate_wired,
    leaked_report_chunks_leave_their_records_to_later_rounds,
    the_bound_is_at_most_the_guests_memory,
    tables_the_kernel_cannot_give_fail_create_cleanly,
    legacy_devices_may_write_any_used_length_on_the_page_queues,
);

/// Allocations above `ALLOCATION_CAP` fail, as in a kernel (`virtio_tests::capped_alloc`).
#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

/// The shim's side of memory ([`ChunkMemory`]: every chunk tracked, so that a chunk leaked
/// or freed twice fails the test), with what the tests look at besides.
#[derive(Default)]
struct ShimMem {
    chunks: ChunkMemory,
    /// Every chunk ever wired, by cookie (cookies grow: a round's chunks are those above
    /// the last cookie before it).
    ever: BTreeMap<usize, Vec<u64>>,
    allocs: u64,
    frees: u64,
    errors: Vec<String>,
    /// Each `changed` call's `starved`.
    changed: Vec<bool>,
    /// Every sysctl name read, in order.
    sysctl_reads: Vec<String>,
}

impl std::ops::Deref for ShimMem {
    type Target = ChunkMemory;
    fn deref(&self) -> &ChunkMemory {
        &self.chunks
    }
}

impl std::ops::DerefMut for ShimMem {
    fn deref_mut(&mut self) -> &mut ChunkMemory {
        &mut self.chunks
    }
}

impl ShimMem {
    fn new(page_size: u64, sysctls: BTreeMap<String, Vec<u8>>) -> Self {
        ShimMem {
            chunks: ChunkMemory {
                sysctls,
                ..ChunkMemory::new(page_size)
            },
            ..ShimMem::default()
        }
    }
}

fn shim_mem<'a>(ctx: *mut c_void) -> &'a RefCell<ShimMem> {
    // SAFETY: ctx is the test's RefCell<ShimMem>, alive while the device lives.
    unsafe { &*(ctx as *const RefCell<ShimMem>) }
}

unsafe extern "C" fn alloc_chunk(
    ctx: *mut c_void,
    pages: *mut u64,
    count: u32,
    cookie: *mut *mut c_void,
) -> bool {
    let mut m = shim_mem(ctx).borrow_mut();
    // Balloon chunks are VBAL_CHUNK_PAGES pages; reporting chunks at most that.
    assert!((1..=VBAL_CHUNK_PAGES).contains(&count), "{count}");
    // SAFETY: the pool passes room for `count` addresses and a valid out-pointer.
    let Some(addrs) = (unsafe { m.alloc_chunk(pages, count, cookie) }) else {
        return false;
    };
    let c = m.next_cookie;
    m.ever.insert(c, addrs);
    m.allocs += 1;
    true
}

unsafe extern "C" fn free_chunk(ctx: *mut c_void, cookie: *mut c_void) {
    let mut m = shim_mem(ctx).borrow_mut();
    if m.unwire(cookie).is_none() {
        m.errors
            .push(format!("chunk {cookie:?} freed but not live"));
    }
    m.frees += 1;
}

/// The shim's `sysctlbyname(name, buf, &len, NULL, 0)` over [`ChunkMemory::sysctls`].
unsafe extern "C" fn read_sysctl(
    ctx: *mut c_void,
    name: *const c_char,
    buf: *mut c_void,
    len: *mut u32,
) -> i32 {
    let mut m = shim_mem(ctx).borrow_mut();
    // SAFETY: the kext passes a NUL-terminated name and its room in `*len`.
    let (status, name) = unsafe { m.read_sysctl(name, buf, len) };
    m.sysctl_reads.push(name);
    status
}

unsafe extern "C" fn changed(ctx: *mut c_void, starved: bool) {
    shim_mem(ctx).borrow_mut().changed.push(starved);
}

/// The shim's side: the family (transport + nub), the device model, memory, the device.
struct Rig {
    kexts: Kexts,
    sim: Sim,
    model: BalloonModel,
    fam: Option<Family>,
    mem: Box<RefCell<ShimMem>>,
    dev: *mut VbalDevice,
    what: String,
    /// The largest allocation `vbal_create` asked for.
    create_largest: usize,
    /// The shim's clock (ms) for `vbal_drain`.
    clock: u64,
}

/// What the shim's `drain()` saw.
#[derive(Debug)]
struct Drained {
    /// `vbal_drain`'s last status (not VBAL_E_BUSY).
    status: i32,
    /// Milliseconds it took on the shim's clock.
    ms: u64,
}

impl Rig {
    fn start(kexts: Kexts, mode: SimMode, pref: Preference, features: u64, msix: bool) -> Rig {
        Rig::start_with(kexts, mode, pref, features, msix, 4096, 8192, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_with(
        kexts: Kexts,
        mode: SimMode,
        pref: Preference,
        features: u64,
        msix: bool,
        page_size: u32,
        max_pages: u32,
        initial_target: u32,
    ) -> Rig {
        Rig::start_kernel(
            kexts,
            mode,
            pref,
            features,
            msix,
            page_size,
            max_pages,
            initial_target,
            BTreeMap::new(),
        )
    }

    /// As `start_with`, with the kernel's sysctls answering from `sysctls` from the start.
    #[allow(clippy::too_many_arguments)]
    fn start_kernel(
        kexts: Kexts,
        mode: SimMode,
        pref: Preference,
        features: u64,
        msix: bool,
        page_size: u32,
        max_pages: u32,
        initial_target: u32,
        sysctls: BTreeMap<String, Vec<u8>>,
    ) -> Rig {
        let cfg = VbalConfig {
            page_size,
            max_pages,
            total_pages: 0,
        };
        Rig::start_config(
            kexts,
            mode,
            pref,
            features,
            msix,
            cfg,
            initial_target,
            sysctls,
        )
    }

    /// As `start_kernel`, with the shim's whole configuration.
    #[allow(clippy::too_many_arguments)]
    fn start_config(
        kexts: Kexts,
        mode: SimMode,
        pref: Preference,
        features: u64,
        msix: bool,
        cfg: VbalConfig,
        initial_target: u32,
        sysctls: BTreeMap<String, Vec<u8>>,
    ) -> Rig {
        let page_size = cfg.page_size;
        let what = format!("{mode:?}/{pref:?}/msix {msix} features {features:#x} page {page_size}");
        let model = BalloonModel::new(features);
        let sim = model.sim_builder(mode, RING, msix).build();
        let fam = Family::start(kexts.family, &sim, pref).expect("family start");
        let mem = Box::new(RefCell::new(ShimMem::new(u64::from(page_size), sysctls)));
        let mut model = model;
        model.set_target(&sim, initial_target);
        let cb = VbalCallbacks {
            ctx: (&*mem as *const RefCell<ShimMem>).cast_mut().cast(),
            alloc_chunk: Some(alloc_chunk),
            free_chunk: Some(free_chunk),
            changed: Some(changed),
            read_sysctl: Some(read_sysctl),
        };
        let mut dev = std::ptr::null_mut();
        let (s, create_largest) = largest_allocation(|| {
            // SAFETY: the nub's live handle; the callbacks' context outlives the device.
            unsafe { (kexts.bal.vbal_create)(fam.client_handle(), &cfg, &cb, &mut dev) }
        });
        assert_eq!(s, VBAL_OK, "{what}: vbal_create");
        assert!(!dev.is_null());
        sim.check_init_order().unwrap();
        let mut r = Rig {
            kexts,
            sim,
            model,
            fam: Some(fam),
            mem,
            dev,
            what,
            create_largest,
            clock: 1_000_000,
        };
        r.run();
        r
    }

    fn fam(&self) -> &Family {
        self.fam.as_ref().unwrap()
    }

    /// The device serves and the family delivers its interrupts until nothing moves.
    fn run(&mut self) {
        for _ in 0..10_000 {
            let served = self.model.serve(&self.sim);
            let irqs = self.fam().interrupts();
            if served + irqs == 0 {
                return;
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

    fn info(&self) -> VbalInfo {
        let mut i = VbalInfo::default();
        assert_eq!(
            // SAFETY: live handle, local out-pointer.
            unsafe { (self.kexts.bal.vbal_info)(self.dev, &mut i) },
            VBAL_OK
        );
        i
    }

    /// The shim's reporting timer at `now_ms`.
    fn report(&self, now_ms: u64) -> (i32, VbalReport) {
        let mut p = VbalReport::default();
        // SAFETY: live handle, local out-pointer.
        let s = unsafe { (self.kexts.bal.vbal_report_check)(self.dev, now_ms, &mut p) };
        (s, p)
    }

    /// The shim's pressure timer at `now_ms`.
    fn pressure(&self, now_ms: u64) -> (i32, VbalPressure) {
        let mut p = VbalPressure::default();
        // SAFETY: live handle, local out-pointer.
        let s = unsafe { (self.kexts.bal.vbal_pressure_check)(self.dev, now_ms, &mut p) };
        (s, p)
    }

    fn set_sysctl(&self, name: &str, value: &[u8]) {
        self.mem
            .borrow_mut()
            .sysctls
            .insert(name.into(), value.to_vec());
    }

    /// The device asks for statistics (QEMU's stats timer) and gets the refilled buffer;
    /// returns what it read.
    fn request_stats(&mut self) -> Vec<(u16, u64)> {
        let before = self.model.stats.len();
        assert!(self.model.request_stats(&self.sim), "{}", self.what);
        self.run();
        assert_eq!(
            self.model.stats.len(),
            before + 1,
            "{}: refilled",
            self.what
        );
        self.model.stats.last().cloned().unwrap()
    }

    /// At rest: the device's balloon is made of pages of live chunks, `actual` counts it,
    /// and the published state agrees.
    fn check_consistent(&self) {
        let what = &self.what;
        assert!(
            self.model.violations.is_empty(),
            "{what}: {:?}",
            self.model.violations
        );
        let m = self.mem.borrow();
        assert!(m.errors.is_empty(), "{what}: {:?}", m.errors);
        assert!(
            self.model.ballooned.is_subset(&m.frames()),
            "{what}: ballooned frames outside the wired chunks"
        );
        let i = self.info();
        let fpp = (m.page_size / 4096) as u32;
        assert_eq!(self.actual() as usize, self.model.ballooned.len(), "{what}");
        assert_eq!(i.actual_frames, self.actual(), "{what}");
        assert_eq!(
            i.pages_held * u64::from(fpp),
            u64::from(self.actual()),
            "{what}"
        );
        assert_eq!(i.pages_wired, m.wired_pages(), "{what}");
        assert!(i.report_pages <= i.pages_wired, "{what}");
        // The balloon's pages are among the wired ones.
        assert!(i.pages_held <= i.pages_wired, "{what}");
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{what}: {:?}",
            self.sim.bad_accesses()
        );
    }

    /// The shim's `drain()` before sleep and stop: `vbal_drain` until it stops saying
    /// VBAL_E_BUSY; between two calls the gate is open (`commandSleep` for at most
    /// VBAL_DRAIN_POLL_MS): the device serves, the family delivers its interrupts, and
    /// `during` plays whatever else happens then (given the ms since the drain began).
    fn drain_with(&mut self, mut during: impl FnMut(&mut Rig, u64)) -> Drained {
        let start = self.clock;
        // The kext bounds the drain by time; the rig bounds its calls a little beyond that.
        let most = u64::from(VBAL_DRAIN_MS / VBAL_DRAIN_POLL_MS) + 10;
        for _ in 0..most {
            // SAFETY: live handle.
            let status = unsafe { (self.kexts.bal.vbal_drain)(self.dev, self.clock) };
            if status != VBAL_E_BUSY {
                return Drained {
                    status,
                    ms: self.clock - start,
                };
            }
            self.run();
            during(self, self.clock - start);
            self.clock += u64::from(VBAL_DRAIN_POLL_MS);
        }
        panic!("{}: vbal_drain still busy after {most} calls", self.what);
    }

    fn drain(&mut self) -> Drained {
        self.drain_with(|_, _| {})
    }

    /// `setPowerState(0)` as the shim has it: drain, then `vbal_suspend`.
    fn sleep(&mut self) -> Drained {
        let d = self.drain();
        // SAFETY: live handle.
        assert_eq!(unsafe { (self.kexts.bal.vbal_suspend)(self.dev) }, VBAL_OK);
        d
    }

    /// Clears the sim's event log: [`Rig::actual_at_reset`] looks at what follows.
    fn mark(&self) -> u32 {
        self.sim.clear_events();
        self.actual()
    }

    /// `actual` as the device had it at the first reset after [`Rig::mark`] (which
    /// returned what it was then): the last 32-bit write of it before that reset. The sim
    /// keeps the device configuration across a reset, as QEMU's
    /// `virtio_balloon_device_reset` keeps `actual`.
    fn actual_at_reset(&self, at_mark: u32) -> Option<u32> {
        let mut actual = at_mark;
        for e in self.sim.events() {
            match e {
                SimEvent::DeviceConfigWrite {
                    offset: 4,
                    value,
                    width: 4,
                } => actual = value,
                SimEvent::Reset => return Some(actual),
                _ => {}
            }
        }
        None
    }

    /// The shim's `gatedStop`: drain, `vbal_stop`, then `free` (`vbal_destroy`).
    fn stop(&mut self) -> Drained {
        let d = self.drain();
        // SAFETY: live handle, not used after destroy.
        unsafe {
            (self.kexts.bal.vbal_stop)(self.dev);
            (self.kexts.bal.vbal_destroy)(self.dev);
        }
        d
    }

    /// [`Rig::unload`], checking that the stop's reset is the first since `resets` and that
    /// `actual` read as it does now then (see [`Rig::actual_at_reset`]).
    fn unload_checked(mut self, resets: u64, at_mark: u32) {
        let actual = self.actual();
        self.stop();
        assert_eq!(
            self.sim.resets(),
            resets + 1,
            "{}: the stop's reset",
            self.what
        );
        assert_eq!(self.actual_at_reset(at_mark), Some(actual), "{}", self.what);
        self.finish_unload();
    }

    /// `stop` then `free`, then the family stops: every chunk and DMA region must be back
    /// (and, for loaded kexts, every kernel allocation).
    fn unload(mut self) {
        self.stop();
        self.finish_unload();
    }

    fn finish_unload(mut self) {
        assert_eq!(
            self.sim.status(),
            0,
            "{}: stop leaves the device reset",
            self.what
        );
        let m = self.mem.borrow();
        assert!(m.errors.is_empty(), "{}: {:?}", self.what, m.errors);
        assert!(
            m.live.is_empty(),
            "{}: {} chunks leaked",
            self.what,
            m.live.len()
        );
        assert_eq!(m.allocs, m.frees, "{}", self.what);
        drop(m);
        self.fam.take().unwrap().stop();
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
    }
}

fn inflate_deflate_follow_the_target_in_every_mode(kexts: Kexts) {
    for (mode, pref) in MODES {
        for msix in [false, true] {
            let mut r = Rig::start(kexts, mode, pref, QEMU, msix);
            assert_eq!(r.actual(), 0);
            r.set_target(1000);
            assert_eq!(r.actual(), 1000, "{}", r.what);
            r.check_consistent();
            assert_eq!(r.info().target_frames, 1000);
            // 1000 pages: 16 chunks of 64.
            assert_eq!(r.mem.borrow().live.len(), 16, "{}", r.what);
            r.set_target(300);
            assert_eq!(r.actual(), 300, "{}", r.what);
            r.check_consistent();
            // Deflated memory went back to the kernel, a whole chunk at a time.
            assert_eq!(r.mem.borrow().live.len(), 5, "{}", r.what);
            r.set_target(2000);
            assert_eq!(r.actual(), 2000, "{}", r.what);
            r.check_consistent();
            r.set_target(0);
            assert_eq!(r.actual(), 0, "{}", r.what);
            r.check_consistent();
            assert!(r.mem.borrow().live.is_empty(), "{}", r.what);
            r.set_target(640);
            let i = r.info();
            assert!(i.inflate_requests >= 4 && i.deflate_requests >= 3, "{i:?}");
            assert!(i.interrupts > 0);
            assert!(!r.mem.borrow().changed.is_empty(), "`changed` was called");
            r.unload();
        }
    }
}

/// A 16 KiB kernel page is four consecutive frames; the target is rounded up to whole
/// pages and clamped to the bound.
fn sixteen_kib_pages_are_four_frames(kexts: Kexts) {
    let mut r = Rig::start_with(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        false,
        16384,
        100,
        0,
    );
    r.set_target(401);
    // Clamped to 100 pages = 400 frames.
    assert_eq!(r.actual(), 400);
    r.check_consistent();
    assert_eq!(r.info().pages_held, 100);
    assert_eq!(r.info().page_size, 16384);
    r.set_target(41);
    assert_eq!(r.actual(), 44, "rounded up to whole 16 KiB pages");
    r.check_consistent();
    r.unload();
}

fn stats_carry_no_invented_figures(kexts: Kexts) {
    for (mode, pref) in MODES {
        let mut r = Rig::start(kexts, mode, pref, QEMU, true);
        r.set_target(128);
        assert!(r.model.request_stats(&r.sim), "{}", r.what);
        r.run();
        assert!(
            r.model.request_stats(&r.sim),
            "{}: buffer made available again",
            r.what
        );
        r.run();
        let last = r.model.stats.last().cloned().unwrap();
        // Every sysctl fails here (an empty table), and the pool's size is unknown
        // (total_pages 0): no tag at all, not even an invented MEMTOT.
        assert!(last.is_empty(), "{}: {last:?}", r.what);
        assert!(r.model.stats.iter().all(|b| b.is_empty()), "{}", r.what);
        assert!(r.info().stats_buffers >= 2);
        assert!(r.info().sysctl_failures >= 3, "{:?}", r.info());
        r.check_consistent();
        r.unload();
    }
}

fn the_kernel_running_short_pauses_and_poll_resumes(kexts: Kexts) {
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, QEMU, true);
    r.mem.borrow_mut().limit = Some(3);
    r.set_target(1000);
    assert_eq!(r.actual(), 192, "three chunks of 64 pages");
    assert_eq!(
        r.mem.borrow().changed.last(),
        Some(&true),
        "starved reported"
    );
    assert!(r.info().alloc_failures >= 1);
    r.check_consistent();
    r.mem.borrow_mut().limit = None;
    // The shim's retry timer.
    // SAFETY: live handle.
    assert_eq!(unsafe { (kexts.bal.vbal_poll)(r.dev) }, VBAL_OK);
    r.run();
    assert_eq!(r.actual(), 1000);
    assert_eq!(r.mem.borrow().changed.last(), Some(&false));
    r.check_consistent();
    r.unload();
}

fn oom_hook_deflates_and_holds(kexts: Kexts) {
    for features in [QEMU, QEMU & !bits::MUST_TELL_HOST] {
        let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, features, false);
        r.set_target(1024);
        assert_eq!(r.info().deflate_on_oom, 1);
        let mut o = VbalOom::default();
        assert_eq!(
            // SAFETY: live handle, local out-pointer.
            unsafe { (kexts.bal.vbal_deflate_for_oom)(r.dev, 300, &mut o) },
            VBAL_OK
        );
        assert_eq!(o.released + o.pending, 300, "{o:?}");
        if features & bits::MUST_TELL_HOST != 0 {
            assert_eq!(o.released, 0, "pages wait for the host's acknowledgement");
        }
        r.run();
        assert_eq!(r.actual(), 724, "{}", r.what);
        r.check_consistent();
        assert_eq!(r.info().oom_pages, 300);
        // The balloon holds until the host sets a new target.
        r.run();
        assert_eq!(r.actual(), 724);
        r.set_target(900);
        assert_eq!(r.actual(), 900);
        r.check_consistent();
        r.unload();
    }
    // Not offered: the hook says so.
    let r = Rig::start(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        bits::STATS_VQ,
        false,
    );
    let mut o = VbalOom::default();
    assert_eq!(
        // SAFETY: live handle, local out-pointer.
        unsafe { (kexts.bal.vbal_deflate_for_oom)(r.dev, 1, &mut o) },
        VBAL_E_UNSUPPORTED
    );
    assert_eq!(r.info().deflate_on_oom, 0);
    r.unload();
}

/// Legacy balloon devices may write the buffer's length into `used.len` on the inflate and
/// deflate queues (§5.5.6; older QEMU did): through the family too, the driver does not
/// trust it there (`QueueSpec::ignore_used_len` crosses the kext ABI) and carries on,
/// while a modern device that does it breaks the queue and the kext recovers.
fn legacy_devices_may_write_any_used_length_on_the_page_queues(kexts: Kexts) {
    for (mode, pref) in MODES {
        let legacy = mode == SimMode::Legacy || pref == Preference::Legacy;
        for queue in [0u16, 1] {
            let mut r = Rig::start(kexts, mode, pref, QEMU, false);
            r.set_target(300);
            r.model.len_override = Some((queue, 1024));
            r.set_target(if queue == 0 { 600 } else { 0 });
            let recoveries = r.info().recoveries;
            r.model.len_override = None;
            if !legacy {
                assert!(recoveries >= 1, "{} queue {queue}", r.what);
                r.unload();
                continue;
            }
            assert_eq!(recoveries, 0, "{} queue {queue}", r.what);
            assert_eq!(
                r.actual(),
                if queue == 0 { 600 } else { 0 },
                "{} queue {queue}",
                r.what
            );
            r.check_consistent();
            r.unload();
        }
    }
}

fn needs_reset_recovers_and_reinflates(kexts: Kexts) {
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, QEMU, true);
    r.set_target(500);
    let allocs = r.mem.borrow().allocs;
    let resets = r.sim.resets();
    r.sim.trigger_needs_reset();
    r.run();
    assert!(r.sim.resets() > resets, "reset after DEVICE_NEEDS_RESET");
    assert_eq!(r.info().recoveries, 1);
    // Every page went back and the balloon was inflated again.
    assert!(r.mem.borrow().allocs > allocs);
    assert_eq!(r.actual(), 500);
    r.check_consistent();
    r.unload();
}

fn lifecycle_across_sleep_and_wake(kexts: Kexts) {
    for (mode, pref) in MODES {
        let mut r = Rig::start_with(kexts, mode, pref, QEMU, true, 4096, 8192, 256);
        // `start` already inflated to the target the host had set.
        assert_eq!(r.actual(), 256, "{}", r.what);
        r.set_target(700);
        r.check_consistent();
        let resets = r.sim.resets();

        // setPowerState(0): the balloon emptied through the deflate queue, then a reset;
        // every page back to the kernel.
        assert_eq!(r.sleep().status, VBAL_OK, "{}", r.what);
        assert_eq!(r.sim.resets(), resets + 1, "{}: reset for sleep", r.what);
        assert_eq!(r.sim.status(), 0);
        assert!(
            r.mem.borrow().live.is_empty(),
            "{}: pages kept asleep",
            r.what
        );
        assert_eq!(r.info().pages_held, 0);
        // Asleep: interrupts and polls do nothing; a second sleep changes nothing.
        r.fam().interrupts();
        // SAFETY: a spurious shared-line interrupt as the family's entry delivers it.
        unsafe { (kexts.bal.vbal_interrupt)(r.dev, -1) };
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_poll)(r.dev) }, VBAL_E_STOPPED);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_suspend)(r.dev) }, VBAL_OK);
        assert_eq!(r.sim.resets(), resets + 1);
        assert!(r.mem.borrow().live.is_empty());

        // setPowerState(1): from scratch, inflating to the host's target again.
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_resume)(r.dev) }, VBAL_OK);
        r.sim.check_init_order().unwrap();
        r.run();
        assert_eq!(r.actual(), 700, "{}", r.what);
        r.check_consistent();
        assert_eq!(r.info().suspends, 1);
        r.unload();
    }
}

/// The frames the device was told to deflate since `from` (an index into its deflates).
fn deflated_since(r: &Rig, from: usize) -> Vec<u32> {
    r.model.deflates[from..].iter().flatten().copied().collect()
}

/// Unload (`gatedStop`): before the reset the balloon goes back through the deflate queue,
/// every frame the device holds named once, and `actual` reads 0 when the device is reset
/// (§5.5.6.1; QEMU's reset leaves `actual` as it was).
fn stop_tells_the_host_of_every_page_before_the_reset(kexts: Kexts) {
    for (mode, pref) in MODES {
        for features in [QEMU, QEMU & !bits::MUST_TELL_HOST] {
            let mut r = Rig::start(kexts, mode, pref, features, true);
            r.set_target(300);
            assert_eq!(r.actual(), 300, "{}", r.what);
            let held = r.model.ballooned.clone();
            let deflates = r.model.deflates.len();
            let at_mark = r.mark();
            let d = r.drain();
            assert_eq!(d.status, VBAL_OK, "{}: {d:?}", r.what);
            assert!(
                r.model.ballooned.is_empty(),
                "{}: the host still holds frames",
                r.what
            );
            let told = deflated_since(&r, deflates);
            assert_eq!(told.len(), 300, "{}", r.what);
            assert_eq!(
                told.iter().copied().collect::<BTreeSet<u32>>(),
                held,
                "{}: exactly the balloon's frames",
                r.what
            );
            assert_eq!(r.actual(), 0, "{}", r.what);
            assert!(r.mem.borrow().live.is_empty(), "{}", r.what);
            r.check_consistent();
            let resets = r.sim.resets();
            r.unload_checked(resets, at_mark);
        }
    }
}

/// Sleep likewise: the balloon is emptied through the deflate queue, `actual` reads 0 at
/// the reset, and the wake inflates to the host's target again.
fn sleep_tells_the_host_of_every_page_before_the_reset(kexts: Kexts) {
    for (mode, pref) in MODES {
        let mut r = Rig::start(kexts, mode, pref, QEMU, true);
        r.set_target(300);
        let deflates = r.model.deflates.len();
        let resets = r.sim.resets();
        let at_mark = r.mark();
        let d = r.sleep();
        assert_eq!(d.status, VBAL_OK, "{}: {d:?}", r.what);
        assert_eq!(deflated_since(&r, deflates).len(), 300, "{}", r.what);
        assert_eq!(r.sim.resets(), resets + 1, "{}", r.what);
        assert_eq!(r.actual_at_reset(at_mark), Some(0), "{}", r.what);
        assert!(r.mem.borrow().live.is_empty(), "{}", r.what);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_resume)(r.dev) }, VBAL_OK);
        r.run();
        assert_eq!(r.actual(), 300, "{}: inflated again after the wake", r.what);
        r.check_consistent();
        // A second sleep and wake in a row work the same.
        assert_eq!(r.sleep().status, VBAL_OK, "{}", r.what);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_resume)(r.dev) }, VBAL_OK);
        r.run();
        assert_eq!(r.actual(), 300, "{}", r.what);
        r.unload();
    }
}

/// A device that never acknowledges the deflates: stop and sleep give up after
/// VBAL_DRAIN_STALL_MS and reset it anyway; until the reset, with MUST_TELL_HOST, no chunk
/// with a frame in the unacknowledged deflate goes back to the kernel; after it, every
/// chunk does. A device that acknowledges slowly is waited for VBAL_DRAIN_MS at most. A
/// device that breaks mid-drain ends it at once, without a recovery (which would inflate).
fn a_device_that_does_not_acknowledge_delays_stop_and_sleep_boundedly(kexts: Kexts) {
    let stall = u64::from(VBAL_DRAIN_STALL_MS);
    let poll = u64::from(VBAL_DRAIN_POLL_MS);
    for sleep in [false, true] {
        let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, QEMU, true);
        r.set_target(300);
        r.model.hold_deflates = true;
        let frees = r.mem.borrow().frees;
        let resets = r.sim.resets();
        let at_mark = r.mark();
        let d = r.drain();
        assert_eq!(d.status, VBAL_E_TIMEOUT, "sleep {sleep}: {d:?}");
        assert!((stall..=stall + poll).contains(&d.ms), "{d:?}");
        // The deflate went out; its frames are still the device's, their chunks wired.
        assert!(r.model.held_deflates() > 0);
        assert_eq!(
            r.mem.borrow().frees,
            frees,
            "a chunk freed before the host's answer"
        );
        assert_eq!(r.sim.resets(), resets, "no reset before the drain ends");
        // Asked again, the drain says the same (the shim's loop may call once more).
        // SAFETY: live handle.
        let again = unsafe { (kexts.bal.vbal_drain)(r.dev, r.clock) };
        assert_eq!(again, VBAL_E_TIMEOUT);
        if sleep {
            // SAFETY: live handle.
            assert_eq!(unsafe { (kexts.bal.vbal_suspend)(r.dev) }, VBAL_OK);
            assert!(r.mem.borrow().live.is_empty(), "chunks kept asleep");
            // The host still counted the pages at the reset (logged by the kext).
            assert_eq!(r.actual_at_reset(at_mark), Some(300));
            r.model.hold_deflates = false;
            // SAFETY: live handle.
            assert_eq!(unsafe { (kexts.bal.vbal_resume)(r.dev) }, VBAL_OK);
            r.run();
            assert_eq!(r.actual(), 300, "inflated again after the wake");
            r.check_consistent();
            r.unload();
        } else {
            r.unload_checked(resets, at_mark);
        }
    }

    // Slow but steady: one deflate acknowledged every 900 ms. Never stalled, but bounded.
    let mut r = Rig::start_with(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        true,
        4096,
        16384,
        0,
    );
    r.set_target(16000);
    r.model.hold_deflates = true;
    let d = r.drain_with(|r, ms| {
        if ms % 900 < u64::from(VBAL_DRAIN_POLL_MS) {
            r.model.release_deflates(&r.sim);
            r.run();
        }
    });
    assert_eq!(d.status, VBAL_E_TIMEOUT, "{d:?}");
    let most = u64::from(VBAL_DRAIN_MS);
    assert!((most..=most + poll).contains(&d.ms), "{d:?}");
    assert!(r.actual() < 16000, "acknowledged deflates were counted");
    r.model.hold_deflates = false;
    r.unload();

    // DEVICE_NEEDS_RESET mid-drain: over at once, no recovery, then the reset of stop.
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, QEMU, true);
    r.set_target(1000);
    r.model.hold_deflates = true;
    let d = r.drain_with(|r, ms| {
        if ms == 0 {
            r.sim.trigger_needs_reset();
            r.run();
        }
    });
    assert_eq!(d.status, VBAL_E_DEVICE, "{d:?}");
    assert!(d.ms <= poll, "{d:?}");
    assert_eq!(
        r.info().recoveries,
        0,
        "recovered (and inflated) while emptying"
    );
    // SAFETY: live handle.
    assert_eq!(unsafe { (kexts.bal.vbal_poll)(r.dev) }, VBAL_E_STOPPED);
    r.unload();
}

fn null_arguments_are_refused(kexts: Kexts) {
    let f = kexts.bal;
    let mut dev = std::ptr::null_mut();
    let mem = RefCell::new(ShimMem::default());
    let cb = VbalCallbacks {
        ctx: (&mem as *const RefCell<ShimMem>).cast_mut().cast(),
        alloc_chunk: Some(alloc_chunk),
        free_chunk: Some(free_chunk),
        changed: None,
        read_sysctl: None,
    };
    let cfg = VbalConfig {
        page_size: 4096,
        max_pages: 16,
        total_pages: 0,
    };
    let mut info = VbalInfo::default();
    let mut oom = VbalOom::default();
    // SAFETY: every pointer is null or a local; the functions must refuse nulls.
    unsafe {
        assert_eq!(
            (f.vbal_create)(std::ptr::null_mut(), &cfg, &cb, &mut dev),
            VBAL_E_INVALID
        );
        assert!(dev.is_null());
        assert_eq!(
            (f.vbal_info)(std::ptr::null_mut(), &mut info),
            VBAL_E_INVALID
        );
        assert_eq!((f.vbal_poll)(std::ptr::null_mut()), VBAL_E_INVALID);
        assert_eq!(
            (f.vbal_deflate_for_oom)(std::ptr::null_mut(), 1, &mut oom),
            VBAL_E_INVALID
        );
        let mut pressure = VbalPressure::default();
        assert_eq!(
            (f.vbal_pressure_check)(std::ptr::null_mut(), 0, &mut pressure),
            VBAL_E_INVALID
        );
        let mut report = VbalReport::default();
        assert_eq!(
            (f.vbal_report_check)(std::ptr::null_mut(), 0, &mut report),
            VBAL_E_INVALID
        );
        assert_eq!((f.vbal_suspend)(std::ptr::null_mut()), VBAL_E_INVALID);
        assert_eq!((f.vbal_resume)(std::ptr::null_mut()), VBAL_E_INVALID);
        (f.vbal_interrupt)(std::ptr::null_mut(), 0);
        (f.vbal_stop)(std::ptr::null_mut());
        (f.vbal_destroy)(std::ptr::null_mut());
    }
    // A live family with unusable arguments: no callbacks, no bound, a bad page size.
    let model = BalloonModel::new(QEMU);
    let sim = model.sim_builder(SimMode::Modern, RING, false).build();
    let fam = Family::start(kexts.family, &sim, Preference::Auto).expect("family start");
    let no_alloc = VbalCallbacks {
        alloc_chunk: None,
        ..cb
    };
    let unbounded = VbalConfig {
        max_pages: 0,
        ..cfg
    };
    let odd_pages = VbalConfig {
        page_size: 3000,
        ..cfg
    };
    // SAFETY: the nub's live handle; locals; the functions must refuse these.
    unsafe {
        let h = fam.client_handle();
        assert_eq!(
            (f.vbal_create)(h, &cfg, &no_alloc, &mut dev),
            VBAL_E_INVALID
        );
        assert_eq!(
            (f.vbal_create)(h, &unbounded, &cb, &mut dev),
            VBAL_E_INVALID
        );
        assert_eq!(
            (f.vbal_create)(h, &odd_pages, &cb, &mut dev),
            VBAL_E_INVALID
        );
        assert_eq!(
            (f.vbal_create)(h, std::ptr::null(), &cb, &mut dev),
            VBAL_E_INVALID
        );
        assert_eq!(
            (f.vbal_create)(h, &cfg, std::ptr::null(), &mut dev),
            VBAL_E_INVALID
        );
        assert!(dev.is_null());
    }
    fam.stop();
    // A live device with null out-pointers.
    let r = Rig::start(kexts, SimMode::Modern, Preference::Auto, QEMU, false);
    // SAFETY: live handle; null pointers are refused.
    unsafe {
        assert_eq!((f.vbal_info)(r.dev, std::ptr::null_mut()), VBAL_E_INVALID);
        assert_eq!(
            (f.vbal_deflate_for_oom)(r.dev, 1, std::ptr::null_mut()),
            VBAL_E_INVALID
        );
        assert_eq!(
            (f.vbal_pressure_check)(r.dev, 0, std::ptr::null_mut()),
            VBAL_E_INVALID
        );
        assert_eq!(
            (f.vbal_report_check)(r.dev, 0, std::ptr::null_mut()),
            VBAL_E_INVALID
        );
    }
    r.unload();
}

/// The tags a kernel's figures map to, in tag order (bytes).
fn expected_stats(memsize: u64, free: u32, file_backed: u32, page: u64) -> Vec<(u16, u64)> {
    let (free, file_backed) = (u64::from(free) * page, u64::from(file_backed) * page);
    vec![
        (tag::MEMFREE, free),
        (tag::MEMTOT, memsize),
        (tag::AVAIL, free + file_backed),
        (tag::CACHES, file_backed),
    ]
}

/// MEMTOT from `hw.memsize`, MEMFREE from `vm.page_free_count`, CACHES from
/// `vm.page_pageable_external_count`, AVAIL their sum, all in bytes whatever the page size;
/// read afresh each time the device asks; nothing for the tags no sysctl gives.
fn stats_carry_the_kernels_memory_figures(kexts: Kexts) {
    const GIB: u64 = 1 << 30;
    for (mode, pref) in MODES {
        for page in [4096u32, 16384] {
            let mut r = Rig::start_kernel(
                kexts,
                mode,
                pref,
                QEMU,
                true,
                page,
                8192,
                0,
                kernel_sysctls(8 * GIB, 1000, 3000, 1),
            );
            let p = u64::from(page);
            r.set_target(128);
            // The buffer made available at setup.
            assert_eq!(
                r.model.stats.first().cloned(),
                Some(expected_stats(8 * GIB, 1000, 3000, p)),
                "{}",
                r.what
            );
            // The kernel's figures move; the next request carries the new ones.
            r.set_sysctl(FREE, &250u32.to_ne_bytes());
            r.set_sysctl(FILE_BACKED, &70_000u32.to_ne_bytes());
            assert_eq!(
                r.request_stats(),
                expected_stats(8 * GIB, 250, 70_000, p),
                "{}",
                r.what
            );
            r.set_sysctl(MEMSIZE, &(12 * GIB).to_ne_bytes());
            assert_eq!(
                r.request_stats(),
                expected_stats(12 * GIB, 250, 70_000, p),
                "{}",
                r.what
            );
            // The statistics path reads the figures, not the pressure level.
            let reads = r.mem.borrow().sysctl_reads.clone();
            for name in [MEMSIZE, FREE, FILE_BACKED] {
                assert!(reads.iter().any(|n| n == name), "{}: {reads:?}", r.what);
            }
            assert!(
                !reads.iter().any(|n| n == PRESSURE),
                "{}: {reads:?}",
                r.what
            );
            let i = r.info();
            assert_eq!(i.sysctl_failures, 0, "{i:?}");
            assert!(i.stats_buffers >= 3, "{i:?}");
            r.check_consistent();
            r.unload();
        }
    }
}

/// A sysctl that fails (absent, or answering with a size that is not a 32- or 64-bit
/// number) at setup leaves its tags out of every buffer; one failing later keeps its tag
/// (§5.5.6.3.1: the same set each time) with the last value.
fn a_failing_sysctl_leaves_its_tag_unsent(kexts: Kexts) {
    const MEM: u64 = 4 << 30;
    let page = 4096u64;
    // (sysctl, its answer (None: absent), the tags sent)
    type Case = (&'static str, Option<Vec<u8>>, &'static [u16]);
    let cases: [Case; 4] = [
        // No file-backed count: no CACHES, and no AVAIL (it needs both counts).
        (FILE_BACKED, None, &[tag::MEMFREE, tag::MEMTOT]),
        // No free count: no MEMFREE and no AVAIL.
        (FREE, None, &[tag::MEMTOT, tag::CACHES]),
        // hw.memsize answering two bytes: no MEMTOT.
        (
            MEMSIZE,
            Some(vec![1, 2]),
            &[tag::MEMFREE, tag::AVAIL, tag::CACHES],
        ),
        // Too large for the kext's buffer (sysctlbyname fails with ENOMEM): no MEMTOT.
        (
            MEMSIZE,
            Some(vec![7; 16]),
            &[tag::MEMFREE, tag::AVAIL, tag::CACHES],
        ),
    ];
    for (name, value, tags) in cases {
        let mut sysctls = kernel_sysctls(MEM, 500, 600, 1);
        match &value {
            Some(v) => sysctls.insert(name.into(), v.clone()),
            None => sysctls.remove(name),
        };
        let mut r = Rig::start_kernel(
            kexts,
            SimMode::Modern,
            Preference::Auto,
            QEMU,
            true,
            4096,
            8192,
            0,
            sysctls,
        );
        r.run();
        let all = expected_stats(MEM, 500, 600, page);
        let want: Vec<(u16, u64)> = all
            .iter()
            .copied()
            .filter(|(t, _)| tags.contains(t))
            .collect();
        assert_eq!(r.model.stats.first(), Some(&want), "{name} {value:?}");
        assert_eq!(r.request_stats(), want, "{name} {value:?}");
        assert!(r.info().sysctl_failures >= 2, "{name}: {:?}", r.info());
        r.check_consistent();
        r.unload();
    }

    // Failing after setup: the tag stays, with its last value.
    let mut r = Rig::start_kernel(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        true,
        4096,
        8192,
        0,
        kernel_sysctls(MEM, 500, 600, 1),
    );
    r.run();
    assert_eq!(r.info().sysctl_failures, 0);
    r.mem.borrow_mut().sysctls.remove(FREE);
    r.set_sysctl(FILE_BACKED, &900u32.to_ne_bytes());
    let got = r.request_stats();
    assert_eq!(
        got,
        vec![
            (tag::MEMFREE, 500 * page),
            (tag::MEMTOT, MEM),
            (tag::AVAIL, 1100 * page),
            (tag::CACHES, 900 * page),
        ]
    );
    assert!(r.info().sysctl_failures >= 1);
    assert!(r.model.violations.is_empty(), "{:?}", r.model.violations);
    r.unload();
}

/// Warning pressure takes VBAL_PRESSURE_WARN_MIB out of the balloon (whatever the page
/// size), through the deflate queue: with MUST_TELL_HOST the pages stay wired until the
/// device acknowledges; critical takes VBAL_PRESSURE_CRITICAL_MIB. The balloon then holds
/// until the host sets a new target.
fn pressure_warning_deflates_a_bounded_amount_and_tells_the_host(kexts: Kexts) {
    let warn_frames = VBAL_PRESSURE_WARN_MIB * 256;
    for page in [4096u32, 16384] {
        for features in [QEMU, QEMU & !bits::MUST_TELL_HOST] {
            let fpp = page / 4096;
            let mut r = Rig::start_kernel(
                kexts,
                SimMode::Modern,
                Preference::Auto,
                features,
                true,
                page,
                16384,
                0,
                kernel_sysctls(4 << 30, 100, 100, VBAL_PRESSURE_WARN),
            );
            r.set_target(8000);
            assert_eq!(r.actual(), 8000, "{}", r.what);
            let deflates = r.model.deflates.len();
            let frees = r.mem.borrow().frees;
            r.model.hold_deflates = true;
            let (s, p) = r.pressure(5_000);
            assert_eq!(s, VBAL_OK, "{}", r.what);
            assert_eq!(p.level, VBAL_PRESSURE_WARN);
            assert_eq!(
                (p.released + p.pending) * u64::from(fpp),
                u64::from(warn_frames),
                "{}: {p:?}",
                r.what
            );
            if features & bits::MUST_TELL_HOST != 0 {
                assert_eq!(p.released, 0, "{}: before the host knows", r.what);
            } else {
                assert!(p.released > 0, "{}: {p:?}", r.what);
            }
            r.run();
            // The host was told (a deflate request is out)...
            assert!(r.model.deflates.len() > deflates, "{}", r.what);
            if features & bits::MUST_TELL_HOST != 0 {
                // ...and until it acknowledges, those pages are still wired chunks.
                assert_eq!(r.mem.borrow().frees, frees, "{}", r.what);
                let told: BTreeSet<u32> = r.model.deflates[deflates..]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                assert!(told.is_subset(&r.mem.borrow().frames()), "{}", r.what);
            }
            r.model.hold_deflates = false;
            r.model.release_deflates(&r.sim);
            r.run();
            assert_eq!(r.actual(), 8000 - warn_frames, "{}", r.what);
            let told: usize = r.model.deflates[deflates..].iter().map(Vec::len).sum();
            assert_eq!(told, warn_frames as usize, "{}", r.what);
            r.check_consistent();
            assert!(r.mem.borrow().frees > frees, "{}: chunks went back", r.what);
            let i = r.info();
            assert_eq!(i.oom_pages * u64::from(fpp), u64::from(warn_frames));
            assert_eq!(i.pressure_deflates, 1);
            assert_eq!(i.pressure_level, VBAL_PRESSURE_WARN);
            // The balloon holds (no re-inflation towards 8000) until a new target.
            r.run();
            assert_eq!(r.actual(), 8000 - warn_frames, "{}", r.what);
            r.set_target(6000);
            assert_eq!(r.actual(), 6000, "{}", r.what);
            r.check_consistent();
            r.unload();
        }
    }

    // Critical: four times as much, and never more than the balloon holds.
    let crit_frames = VBAL_PRESSURE_CRITICAL_MIB * 256;
    let mut r = Rig::start_kernel(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        true,
        4096,
        32768,
        0,
        kernel_sysctls(4 << 30, 100, 100, VBAL_PRESSURE_CRITICAL),
    );
    r.set_target(20_000);
    let (s, p) = r.pressure(1);
    assert_eq!((s, p.level), (VBAL_OK, VBAL_PRESSURE_CRITICAL));
    assert_eq!(p.released + p.pending, u64::from(crit_frames), "{p:?}");
    r.run();
    assert_eq!(r.actual(), 20_000 - crit_frames);
    r.check_consistent();
    let (s, p) = r.pressure(1 + u64::from(VBAL_PRESSURE_MS));
    assert_eq!(s, VBAL_OK);
    assert_eq!(
        p.released + p.pending,
        u64::from(20_000 - crit_frames),
        "what is left"
    );
    r.run();
    assert_eq!(r.actual(), 0);
    r.check_consistent();
    assert!(r.mem.borrow().live.is_empty());
    r.unload();
}

/// Under lasting pressure the balloon gives back one bounded amount per VBAL_PRESSURE_MS,
/// however often the check runs.
fn repeated_pressure_is_rate_limited(kexts: Kexts) {
    let warn_frames = VBAL_PRESSURE_WARN_MIB * 256;
    let gap = u64::from(VBAL_PRESSURE_MS);
    let mut r = Rig::start_kernel(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        true,
        4096,
        16384,
        0,
        kernel_sysctls(4 << 30, 100, 100, VBAL_PRESSURE_WARN),
    );
    r.set_target(16_000);
    let t0 = 1_000_000;
    let (s, p) = r.pressure(t0);
    assert_eq!(s, VBAL_OK);
    assert_eq!(p.released + p.pending, u64::from(warn_frames));
    r.run();
    assert_eq!(r.actual(), 16_000 - warn_frames);
    let requests = r.info().deflate_requests;
    // Checks within the interval: the level is read, nothing is deflated.
    for t in [t0, t0 + 1, t0 + gap / 2, t0 + gap - 1] {
        let (s, p) = r.pressure(t);
        assert_eq!(s, VBAL_OK);
        assert_eq!(p.level, VBAL_PRESSURE_WARN);
        assert_eq!(p.released + p.pending, 0, "at {t}: {p:?}");
        r.run();
    }
    assert_eq!(r.actual(), 16_000 - warn_frames);
    assert_eq!(r.info().deflate_requests, requests);
    // A clock going backwards does not open the gate either.
    let (_, p) = r.pressure(t0 - 5 * gap);
    assert_eq!(p.released + p.pending, 0, "{p:?}");
    // One interval on: the next bounded amount.
    let (s, p) = r.pressure(t0 + gap);
    assert_eq!(s, VBAL_OK);
    assert_eq!(p.released + p.pending, u64::from(warn_frames));
    r.run();
    assert_eq!(r.actual(), 16_000 - 2 * warn_frames);
    let i = r.info();
    assert_eq!(i.pressure_deflates, 2);
    assert_eq!(i.oom_pages, 2 * u64::from(warn_frames));
    r.check_consistent();
    r.unload();
}

/// Normal pressure, a value that is no warning or critical level, an unreadable level and a
/// device without DEFLATE_ON_OOM: the balloon stays as it is.
fn normal_or_unreadable_pressure_does_nothing(kexts: Kexts) {
    let mut r = Rig::start_kernel(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        true,
        4096,
        8192,
        0,
        kernel_sysctls(4 << 30, 100, 100, VBAL_PRESSURE_NORMAL),
    );
    r.set_target(3000);
    let before = r.info();
    let deflates = r.model.deflates.len();
    let mut t = 0;
    for level in [
        VBAL_PRESSURE_NORMAL,
        0,
        3,
        8,
        u32::MAX,
        VBAL_PRESSURE_NORMAL,
    ] {
        r.set_sysctl(PRESSURE, &level.to_ne_bytes());
        t += 10 * u64::from(VBAL_PRESSURE_MS);
        let (s, p) = r.pressure(t);
        assert_eq!(s, VBAL_OK, "level {level}");
        assert_eq!(
            p,
            VbalPressure {
                level,
                released: 0,
                pending: 0
            }
        );
        r.run();
        assert_eq!(r.info().pressure_level, level);
    }
    // Unreadable: said so, nothing done.
    r.mem.borrow_mut().sysctls.remove(PRESSURE);
    let (s, p) = r.pressure(t + 10_000);
    assert_eq!(s, VBAL_E_UNAVAILABLE);
    assert_eq!(p, VbalPressure::default());
    assert_eq!(r.info().pressure_level, 0);
    r.set_sysctl(PRESSURE, &[1, 2]);
    assert_eq!(r.pressure(t + 20_000).0, VBAL_E_UNAVAILABLE);
    r.run();
    assert_eq!(r.actual(), 3000);
    assert_eq!(r.model.deflates.len(), deflates);
    let after = r.info();
    assert_eq!(after.deflate_requests, before.deflate_requests);
    assert_eq!(after.oom_pages, 0);
    assert_eq!(after.pressure_deflates, 0);
    assert!(after.sysctl_failures >= 2);
    // Asleep: no check.
    assert_eq!(r.sleep().status, VBAL_OK);
    r.set_sysctl(PRESSURE, &VBAL_PRESSURE_CRITICAL.to_ne_bytes());
    assert_eq!(r.pressure(t + 30_000).0, VBAL_E_STOPPED);
    r.unload();

    // Without DEFLATE_ON_OOM the level is not even read.
    let mut r = Rig::start_kernel(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        bits::MUST_TELL_HOST | bits::STATS_VQ,
        true,
        4096,
        8192,
        0,
        kernel_sysctls(4 << 30, 100, 100, VBAL_PRESSURE_CRITICAL),
    );
    r.set_target(1000);
    let (s, p) = r.pressure(1);
    assert_eq!(s, VBAL_E_UNSUPPORTED);
    assert_eq!(p, VbalPressure::default());
    r.run();
    assert_eq!(r.actual(), 1000);
    assert!(!r.mem.borrow().sysctl_reads.iter().any(|n| n == PRESSURE));
    r.check_consistent();
    r.unload();
}

// ---- free page reporting ----

/// QEMU's offer with free page reporting (`-device virtio-balloon,free-page-reporting=on`).
const REPORTING: u64 = QEMU | bits::PAGE_REPORTING;
const MIB: u64 = 1 << 20;
/// One reporting round, in 4 KiB frames.
const ROUND_FRAMES: usize = (VBAL_REPORT_ROUND_MIB as usize) << 8;

/// A kernel with plenty of free memory: 8 GiB, half of it free, pressure normal.
fn roomy_kernel(page: u64) -> BTreeMap<String, Vec<u8>> {
    kernel_sysctls(
        8 << 30,
        ((4 << 30) / page) as u32,
        1000,
        VBAL_PRESSURE_NORMAL,
    )
}

fn reporting_rig(kexts: Kexts, mode: SimMode, pref: Preference, page: u32) -> Rig {
    Rig::start_kernel(
        kexts,
        mode,
        pref,
        REPORTING,
        false,
        page,
        8192,
        0,
        roomy_kernel(u64::from(page)),
    )
}

/// The 4 KiB frames of report ranges.
fn frames_of_ranges<'a>(ranges: impl IntoIterator<Item = &'a (u64, u32)>) -> Vec<u32> {
    ranges
        .into_iter()
        .flat_map(|&(a, l)| (0..u64::from(l) / 4096).map(move |k| ((a >> 12) + k) as u32))
        .collect()
}

/// The 4 KiB frames of the chunks wired after cookie `after`.
fn frames_wired_after(m: &ShimMem, after: usize) -> BTreeSet<u32> {
    m.ever
        .range(after + 1..)
        .flat_map(|(_, c)| m.frames_of(c))
        .collect()
}

impl Rig {
    fn reporting_q(&self) -> u16 {
        self.model.layout().reporting.expect("reporting queue")
    }

    fn reported_frames(&self) -> Vec<u32> {
        frames_of_ranges(self.model.reports.iter().flatten())
    }

    fn cookie(&self) -> usize {
        self.mem.borrow().next_cookie
    }

    fn live_chunks(&self) -> usize {
        self.mem.borrow().live.len()
    }
}

/// A round takes VBAL_REPORT_ROUND_MIB MiB of wired chunks from the shim and reports
/// exactly their pages, in 4 KiB frames whatever the page size, never a page of the
/// balloon; each chunk stays wired while a report carrying it is with the device and is
/// freed once the device returns it.
fn a_reporting_round_reports_wired_frames_and_frees_them_after_the_device(kexts: Kexts) {
    let mut cases: Vec<(SimMode, Preference, u32)> =
        MODES.iter().map(|&(m, p)| (m, p, 4096)).collect();
    cases.push((SimMode::Modern, Preference::Auto, 16384));
    for (mode, pref, page) in cases {
        let mut r = reporting_rig(kexts, mode, pref, page);
        let what = r.what.clone();
        assert_eq!(r.info().page_reporting, 1, "{what}");
        assert_ne!(
            r.sim.driver_features() & bits::PAGE_REPORTING,
            0,
            "{what}: negotiated"
        );
        assert_eq!(
            r.sim.driver_features() & bits::FREE_PAGE_HINT,
            0,
            "{what}: no hinting"
        );
        assert!(r.model.reports.is_empty(), "{what}: nothing before a round");
        // The balloon holds some pages too: reporting never touches them.
        r.set_target(300);
        let balloon_chunks = r.live_chunks();
        let before = r.cookie();

        r.model.hold_reports = true;
        let (s, rep) = r.report(10_000);
        assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_SENT), "{what}");
        assert!(rep.ranges > 0, "{what}");
        assert_eq!(rep.level, VBAL_PRESSURE_NORMAL);
        assert_eq!(rep.free_bytes, 4 << 30);
        r.run();
        assert_eq!(r.model.reports.len(), 1, "{what}: one report in flight");
        let first = frames_of_ranges(&r.model.reports[0]);
        {
            let m = r.mem.borrow();
            let round = frames_wired_after(&m, before);
            assert!(!round.is_empty());
            assert!(
                first.iter().all(|f| round.contains(f)),
                "{what}: reported frames are the round's wired pages"
            );
            // Held by the device: the round's chunks are all still wired.
            assert!(
                m.ever
                    .range(before + 1..)
                    .all(|(c, _)| m.live.contains_key(c)),
                "{what}: freed while the device held the report"
            );
        }
        assert!(
            first.iter().all(|f| !r.model.ballooned.contains(f)),
            "{what}"
        );
        let i = r.info();
        assert!(i.report_pages > 0, "{what}");
        assert_eq!(i.reports, 1);
        assert_eq!(i.bytes_reported, 0, "{what}: nothing returned yet");
        r.check_consistent();

        // The device returns them one at a time: the rest of the round follows, one report
        // in flight at a time, and a chunk is freed as soon as the device has returned
        // every report carrying its pages (not before, not only at the round's end).
        for step in 1..=ROUND_FRAMES {
            let reports = r.model.reports.len();
            r.model.release_reports(&r.sim);
            r.run();
            if r.model.reports.len() == reports {
                break;
            }
            assert_eq!(r.model.reports.len(), reports + 1, "{what}: one at a time");
            assert_eq!(r.model.held_report_heads().len(), 1, "{what}");
            let held: BTreeSet<u32> = frames_of_ranges(r.model.reports.last().unwrap())
                .into_iter()
                .collect();
            let sent: BTreeSet<u32> = r.reported_frames().into_iter().collect();
            let m = r.mem.borrow();
            for (cookie, pages) in m.ever.range(before + 1..) {
                let frames = m.frames_of(pages);
                let in_held = frames.iter().any(|f| held.contains(f));
                let reported = frames.iter().all(|f| sent.contains(f));
                if in_held {
                    assert!(
                        m.live.contains_key(cookie),
                        "{what} step {step}: freed early"
                    );
                } else if reported {
                    assert!(
                        !m.live.contains_key(cookie),
                        "{what} step {step}: chunk {cookie} kept after its reports returned"
                    );
                }
            }
        }
        r.model.hold_reports = false;
        let all = r.reported_frames();
        let unique: BTreeSet<u32> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len(), "{what}: a frame reported twice");
        assert_eq!(all.len(), ROUND_FRAMES, "{what}: a round is bounded");
        {
            let m = r.mem.borrow();
            assert_eq!(
                unique,
                frames_wired_after(&m, before),
                "{what}: exactly the round's pages"
            );
            assert!(
                m.ever
                    .range(before + 1..)
                    .all(|(c, _)| !m.live.contains_key(c)),
                "{what}: a reporting chunk not freed"
            );
        }
        assert!(unique.iter().all(|f| !r.model.ballooned.contains(f)));
        assert_eq!(r.live_chunks(), balloon_chunks, "{what}");
        let i = r.info();
        assert_eq!(i.report_pages, 0, "{what}");
        assert_eq!(i.bytes_reported, u64::from(VBAL_REPORT_ROUND_MIB) * MIB);
        assert_eq!(i.reports, r.model.reports.len() as u64);
        assert_eq!(i.report_rounds, 1);
        assert_eq!(r.actual(), 300, "{what}: the balloon is untouched");
        r.check_consistent();
        r.unload();
    }
}

/// Physically contiguous pages of a chunk travel as one range.
fn contiguous_pages_are_reported_as_one_range(kexts: Kexts) {
    let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
    r.mem.borrow_mut().contiguous = true;
    let (s, rep) = r.report(10_000);
    assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_SENT));
    r.run();
    let chunk = u32::try_from(u64::from(VBAL_CHUNK_PAGES) * 4096).unwrap();
    let ranges: Vec<(u64, u32)> = r.model.reports.iter().flatten().copied().collect();
    assert_eq!(ranges.len(), ROUND_FRAMES / VBAL_CHUNK_PAGES as usize);
    assert!(ranges.iter().all(|&(_, l)| l == chunk), "{ranges:?}");
    assert_eq!(r.model.reports.len(), 1, "16 ranges fit one report");
    assert_eq!(r.live_chunks(), 0);
    r.check_consistent();
    r.unload();
}

/// The gate: free memory must stay above 256 MiB and 25 % of `hw.memsize` after a round,
/// the pressure level must read normal, and every figure must be readable. A closed gate
/// wires nothing and reports nothing; opening it reports.
fn no_reporting_when_memory_is_low_or_under_pressure(kexts: Kexts) {
    let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
    let round = u64::from(VBAL_REPORT_ROUND_MIB) * MIB;
    let pages = |bytes: u64| ((bytes / 4096) as u32).to_ne_bytes();
    let mut t = 10_000u64;
    let mut closed = |r: &mut Rig, outcome: u32, status: i32| {
        t += 10_000;
        let allocs = r.mem.borrow().allocs;
        let (s, rep) = r.report(t);
        r.run();
        assert_eq!((s, rep.outcome), (status, outcome), "{rep:?}");
        assert_eq!(r.mem.borrow().allocs, allocs, "wired for a closed gate");
        assert!(r.model.reports.is_empty());
        assert_eq!(r.info().report_outcome, outcome);
        t
    };
    // 8 GiB: the floor is 2 GiB (25 %); free exactly at the floor plus a round is not
    // above it.
    r.set_sysctl(FREE, &pages(2 * 1024 * MIB + round));
    closed(&mut r, VBAL_REPORT_LOW_MEMORY, VBAL_OK);
    // 1 GiB free: above 256 MiB, below 25 %.
    r.set_sysctl(FREE, &pages(1024 * MIB));
    closed(&mut r, VBAL_REPORT_LOW_MEMORY, VBAL_OK);
    // 512 MiB of memory, 200 MiB free: above 25 %, below 256 MiB.
    r.set_sysctl(MEMSIZE, &(512 * MIB).to_ne_bytes());
    r.set_sysctl(FREE, &pages(200 * MIB));
    closed(&mut r, VBAL_REPORT_LOW_MEMORY, VBAL_OK);
    // Plenty free again, but under pressure.
    r.set_sysctl(MEMSIZE, &(8u64 << 30).to_ne_bytes());
    r.set_sysctl(FREE, &pages(4 << 30));
    for level in [VBAL_PRESSURE_WARN, VBAL_PRESSURE_CRITICAL, 3, 0] {
        r.set_sysctl(PRESSURE, &level.to_ne_bytes());
        closed(&mut r, VBAL_REPORT_PRESSURE, VBAL_OK);
    }
    assert_eq!(r.info().pressure_level, 0);
    // Unreadable figures: nothing either.
    r.set_sysctl(PRESSURE, &VBAL_PRESSURE_NORMAL.to_ne_bytes());
    r.mem.borrow_mut().sysctls.remove(FREE);
    closed(&mut r, VBAL_REPORT_UNREADABLE, VBAL_E_UNAVAILABLE);
    r.set_sysctl(FREE, &pages(4 << 30));
    r.mem.borrow_mut().sysctls.remove(MEMSIZE);
    closed(&mut r, VBAL_REPORT_UNREADABLE, VBAL_E_UNAVAILABLE);
    r.set_sysctl(MEMSIZE, &(8u64 << 30).to_ne_bytes());
    r.mem.borrow_mut().sysctls.remove(PRESSURE);
    let t = closed(&mut r, VBAL_REPORT_UNREADABLE, VBAL_E_UNAVAILABLE);
    assert_eq!(r.info().report_rounds, 0);
    // Open: just above the floor.
    r.set_sysctl(PRESSURE, &VBAL_PRESSURE_NORMAL.to_ne_bytes());
    r.set_sysctl(FREE, &pages(2 * 1024 * MIB + round + 4096));
    let (s, rep) = r.report(t + 10_000);
    assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_SENT));
    r.run();
    assert_eq!(r.reported_frames().len(), ROUND_FRAMES);
    // The kernel has no chunk to give: nothing reported, nothing leaked.
    r.mem.borrow_mut().limit = Some(0);
    let reports = r.model.reports.len();
    let (s, rep) = r.report(t + 20_000);
    assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_NO_MEMORY));
    r.run();
    assert_eq!(r.model.reports.len(), reports);
    assert_eq!(r.info().report_cut_short, 1);
    r.check_consistent();
    r.unload();
}

/// The gate is read again before each further chunk of a round: pressure that rises while
/// a report is with the device ends the round after the chunks already wired.
fn pressure_mid_round_cuts_the_round_short(kexts: Kexts) {
    let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
    r.model.hold_reports = true;
    let (s, rep) = r.report(10_000);
    assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_SENT));
    r.run();
    let allocs = r.mem.borrow().allocs;
    assert_eq!(allocs, 1, "32 scattered pages: one chunk so far");
    r.set_sysctl(PRESSURE, &VBAL_PRESSURE_WARN.to_ne_bytes());
    r.model.hold_reports = false;
    r.model.release_reports(&r.sim);
    r.run();
    // The first chunk's other pages went out (already wired), then the round stopped.
    assert_eq!(r.mem.borrow().allocs, allocs, "wired under pressure");
    assert_eq!(r.reported_frames().len(), VBAL_CHUNK_PAGES as usize);
    assert_eq!(r.live_chunks(), 0);
    let i = r.info();
    assert_eq!(i.report_cut_short, 1);
    assert_eq!(i.report_outcome, VBAL_REPORT_PRESSURE);
    assert_eq!(i.report_pages, 0);
    r.check_consistent();
    r.unload();
}

/// One round per VBAL_REPORT_MS at most, and none while a report of the last one is with
/// the device, however long that takes.
fn reporting_is_rate_limited_and_one_round_at_a_time(kexts: Kexts) {
    let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
    let gap = u64::from(VBAL_REPORT_MS);
    let t0 = 100_000;
    assert_eq!(r.report(t0).1.outcome, VBAL_REPORT_SENT);
    r.run();
    let allocs = r.mem.borrow().allocs;
    let reports = r.model.reports.len();
    for t in [t0, t0 + 1, t0 + gap / 2, t0 + gap - 1, t0 - 5 * gap] {
        let (s, rep) = r.report(t);
        assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_TOO_SOON), "at {t}");
        r.run();
    }
    assert_eq!(r.mem.borrow().allocs, allocs);
    assert_eq!(r.model.reports.len(), reports);
    assert_eq!(r.report(t0 + gap).1.outcome, VBAL_REPORT_SENT);
    r.run();
    assert_eq!(r.reported_frames().len(), 2 * ROUND_FRAMES);
    assert_eq!(r.info().report_rounds, 2);

    // A device that keeps a report: no new round, no new chunk, for any time.
    r.model.hold_reports = true;
    assert_eq!(r.report(t0 + 3 * gap).1.outcome, VBAL_REPORT_SENT);
    r.run();
    let allocs = r.mem.borrow().allocs;
    let held = r.info().report_pages;
    assert!(held > 0 && held <= u64::from(VBAL_REPORT_ROUND_MIB) * MIB / 4096);
    for k in 4..40 {
        let (s, rep) = r.report(t0 + k * gap);
        assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_BUSY));
        r.run();
    }
    assert_eq!(r.mem.borrow().allocs, allocs);
    assert_eq!(r.info().report_pages, held);
    assert_eq!(r.info().report_rounds, 3);
    r.check_consistent();
    // Returned at last: the round finishes, and the next may start.
    r.model.hold_reports = false;
    r.model.release_reports(&r.sim);
    r.run();
    assert_eq!(r.live_chunks(), 0);
    assert_eq!(r.report(t0 + 41 * gap).1.outcome, VBAL_REPORT_SENT);
    r.run();
    r.check_consistent();
    r.unload();
}

/// Sleep, a recovery (DEVICE_NEEDS_RESET) and stop while a report is with the device:
/// every reporting chunk goes back, once; after the wake reporting works again.
fn sleep_stop_or_reset_mid_report_frees_every_chunk(kexts: Kexts) {
    for (mode, pref) in MODES {
        let mut r = reporting_rig(kexts, mode, pref, 4096);
        r.set_target(128);
        let balloon_chunks = r.live_chunks();
        r.model.hold_reports = true;
        assert_eq!(r.report(10_000).1.outcome, VBAL_REPORT_SENT, "{}", r.what);
        r.run();
        assert!(r.live_chunks() > balloon_chunks);

        // Sleep: reset, the balloon and the reporting chunks all back.
        assert_eq!(r.sleep().status, VBAL_OK, "{}", r.what);
        assert_eq!(r.live_chunks(), 0, "{}: kept asleep", r.what);
        assert!(r.mem.borrow().errors.is_empty());
        assert_eq!(r.info().report_pages, 0);
        assert_eq!(r.report(20_000).0, VBAL_E_STOPPED);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_resume)(r.dev) }, VBAL_OK);
        r.run();
        assert_eq!(r.actual(), 128, "{}", r.what);
        assert_eq!(r.live_chunks(), balloon_chunks);

        // A new round after the wake, then DEVICE_NEEDS_RESET mid-report.
        assert_eq!(r.report(20_000).1.outcome, VBAL_REPORT_SENT, "{}", r.what);
        r.run();
        assert!(r.live_chunks() > balloon_chunks);
        r.sim.trigger_needs_reset();
        r.run();
        assert_eq!(r.info().recoveries, 1);
        assert_eq!(r.live_chunks(), balloon_chunks, "{}", r.what);
        assert_eq!(r.info().report_pages, 0);
        r.check_consistent();

        // And stop with a report held: `unload` checks every chunk came back once.
        assert_eq!(r.report(30_000).1.outcome, VBAL_REPORT_SENT, "{}", r.what);
        r.run();
        assert!(r.info().report_pages > 0);
        r.unload();
    }
}

/// A device breaking the reporting queue: a used length beyond the report's buffers, an
/// id out of range, the same report completed twice. Each breaks the queue; the kext
/// resets the device, every reporting chunk goes back once, and reporting goes on.
fn a_hostile_reporting_device_never_leaks_or_double_frees(kexts: Kexts) {
    #[derive(Debug, Clone, Copy)]
    enum Hostile {
        LongLength,
        BadId,
        Twice,
    }
    for how in [Hostile::LongLength, Hostile::BadId, Hostile::Twice] {
        let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
        let q = r.reporting_q();
        r.set_target(64);
        let balloon_chunks = r.live_chunks();
        r.model.hold_reports = true;
        assert_eq!(r.report(10_000).1.outcome, VBAL_REPORT_SENT);
        r.run();
        let heads = r.model.held_report_heads().to_vec();
        assert_eq!(heads.len(), 1);
        match how {
            Hostile::LongLength => {
                r.model.len_override = Some((q, u32::MAX));
                r.model.release_reports(&r.sim);
            }
            Hostile::BadId => {
                r.sim.complete_raw(q, 0xFFFF, 0);
                r.sim.signal_used(q);
            }
            Hostile::Twice => {
                r.sim.complete_raw(q, u32::from(heads[0]), 0);
                r.sim.complete_raw(q, u32::from(heads[0]), 0);
                r.sim.signal_used(q);
            }
        }
        // The queue's interrupt may be suppressed (EVENT_IDX counts raw entries apart): the
        // driver finds the entries at its next interrupt.
        r.sim.raise_config_interrupt();
        r.run();
        r.model.len_override = None;
        let i = r.info();
        assert_eq!(
            i.recoveries, 1,
            "{how:?}: the broken queue resets the device"
        );
        assert_eq!(i.report_pages, 0, "{how:?}");
        assert_eq!(r.live_chunks(), balloon_chunks, "{how:?}");
        assert!(r.mem.borrow().errors.is_empty(), "{how:?}");
        assert_eq!(r.actual(), 64, "{how:?}: re-inflated");
        // Reporting goes on with the reset device.
        r.model.hold_reports = false;
        assert_eq!(r.report(20_000).1.outcome, VBAL_REPORT_SENT, "{how:?}");
        r.run();
        assert_eq!(r.live_chunks(), balloon_chunks, "{how:?}");
        r.check_consistent();
        r.unload();
    }
    // A used length within the report's buffers (a device-writable chain) is accepted:
    // the report counts as returned.
    let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
    let q = r.reporting_q();
    r.model.len_override = Some((q, 4096));
    assert_eq!(r.report(10_000).1.outcome, VBAL_REPORT_SENT);
    r.run();
    assert_eq!(r.info().recoveries, 0);
    assert_eq!(r.reported_frames().len(), ROUND_FRAMES);
    assert_eq!(r.live_chunks(), 0);
    r.check_consistent();
    r.unload();
}

/// Without PAGE_REPORTING offered the check says so and nothing is wired; the pressure
/// timer's other half is unaffected.
fn reporting_is_off_unless_offered(kexts: Kexts) {
    let mut r = Rig::start_kernel(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        false,
        4096,
        8192,
        0,
        roomy_kernel(4096),
    );
    assert_eq!(r.info().page_reporting, 0);
    assert_eq!(r.sim.driver_features() & bits::PAGE_REPORTING, 0);
    let (s, rep) = r.report(10_000);
    assert_eq!((s, rep.outcome), (VBAL_E_UNSUPPORTED, VBAL_REPORT_NONE));
    r.run();
    assert_eq!(r.mem.borrow().allocs, 0);
    assert_eq!(r.pressure(10_000).0, VBAL_OK);
    r.unload();
}

/// QEMU with `free-page-hint=on,free-page-reporting=on` has queues 0 to 4 (numbered over
/// what it offers); the kext declines hinting, so queue 3 (QEMU's free page queue) stays
/// unused and reports go to queue 4.
fn reporting_skips_the_queue_of_declined_hinting(kexts: Kexts) {
    for (mode, pref) in MODES {
        let mut r = Rig::start_kernel(
            kexts,
            mode,
            pref,
            REPORTING | bits::FREE_PAGE_HINT,
            false,
            4096,
            8192,
            0,
            roomy_kernel(4096),
        );
        let what = r.what.clone();
        assert_eq!(r.sim.driver_features() & bits::FREE_PAGE_HINT, 0, "{what}");
        assert_eq!(r.reporting_q(), 4, "{what}");
        assert!(
            r.sim.queue_info(3).is_none_or(|i| !i.ready),
            "{what}: the free page queue was set up"
        );
        r.set_target(64);
        let (s, rep) = r.report(10_000);
        assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_SENT), "{what}");
        r.run();
        assert_eq!(r.reported_frames().len(), ROUND_FRAMES, "{what}");
        assert_eq!(r.model.stale_hints, 0, "{what}: reports on the hint queue");
        assert!(r.model.hints.is_empty(), "{what}");
        let i = r.info();
        assert_eq!(
            i.bytes_reported,
            u64::from(VBAL_REPORT_ROUND_MIB) * MIB,
            "{what}"
        );
        assert_eq!(
            i.report_pages, 0,
            "{what}: every chunk back after the device"
        );
        assert_eq!(i.recoveries, 0, "{what}");
        r.check_consistent();
        r.unload();
    }
}

impl Rig {
    /// After stop, or sleep, whose reset the device ignored with its bus mastering stuck
    /// on: exactly the chunks `holding` (cookies) stay wired, after a stop that follows the
    /// sleep too, and the family keeps every DMA buffer of the device that may still use it.
    fn only_these_stay_wired(
        mut self,
        holding: &BTreeSet<usize>,
        sleep: bool,
    ) -> kext_support::Stopped {
        let m = self.mem.borrow();
        assert!(m.errors.is_empty(), "sleep {sleep}: {:?}", m.errors);
        let live: BTreeSet<usize> = m.live.keys().copied().collect();
        assert_eq!(
            &live, holding,
            "sleep {sleep}: only these chunks stay wired"
        );
        drop(m);
        if sleep {
            // SAFETY: live handle, not used after destroy.
            unsafe {
                (self.kexts.bal.vbal_stop)(self.dev);
                (self.kexts.bal.vbal_destroy)(self.dev);
            }
            let live: BTreeSet<usize> = self.mem.borrow().live.keys().copied().collect();
            assert_eq!(&live, holding, "still wired after stop");
        }
        let stopped = self.fam.take().unwrap().stop_keeping();
        assert_eq!(stopped.status.code, VK_E_RESET_TIMEOUT);
        assert_eq!(stopped.freed_while_live, 0);
        stopped
    }
}

/// A device that will not reset and whose bus mastering cannot be switched off, holding a
/// report: the reset of stop fails, and the chunk of the report stays wired (the device may
/// still write it), while the balloon's chunks and the other reporting chunks go back.
/// Sleep likewise, with the chunk counted in `report_chunks_leaked`.
fn a_device_that_will_not_reset_keeps_its_report_wired(kexts: Kexts) {
    for sleep in [false, true] {
        let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
        r.set_target(64);
        r.model.hold_reports = true;
        let before = r.cookie();
        assert_eq!(r.report(10_000).1.outcome, VBAL_REPORT_SENT);
        r.run();
        let held: BTreeSet<u32> = r.reported_frames().into_iter().collect();
        assert!(!held.is_empty());
        // The chunks holding the report's frames (the round's are all after `before`).
        let holding: BTreeSet<usize> = {
            let m = r.mem.borrow();
            m.ever
                .range(before + 1..)
                .filter(|(_, pages)| m.frames_of(pages).iter().any(|f| held.contains(f)))
                .map(|(c, _)| *c)
                .collect()
        };
        assert!(!holding.is_empty());
        r.sim.stick_bus_master(true);
        r.sim.refuse_reset(true);
        if sleep {
            assert_eq!(r.sleep().status, VBAL_OK);
            assert_eq!(r.info().report_chunks_leaked, holding.len() as u64);
        } else {
            r.stop();
        }
        let stopped = r.only_these_stay_wired(&holding, sleep);
        assert!(stopped.kept > 0);
    }
}

/// A device that will not reset and whose bus mastering cannot be switched off, holding an
/// inflate (the drain before stop or sleep times out waiting for it): the device may still
/// inflate those pages, and the host discard their contents, so the chunks holding them
/// stay wired for good, never lent again, while the balloon's other chunks go back.
fn a_device_that_will_not_reset_keeps_an_inflate_wired(kexts: Kexts) {
    const CHUNK: u64 = VBAL_CHUNK_PAGES as u64;
    for sleep in [false, true] {
        let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, QEMU, false);
        r.set_target(64);
        r.model.hold_inflates = true;
        r.set_target(64 + 200);
        assert_eq!(r.model.held_inflates(), 1, "sleep {sleep}");
        let held: BTreeSet<u32> = r.model.inflates.last().unwrap().iter().copied().collect();
        assert_eq!(held.len(), 200);
        let holding: BTreeSet<usize> = {
            let m = r.mem.borrow();
            m.live
                .iter()
                .filter(|(_, pages)| m.frames_of(pages).iter().any(|f| held.contains(f)))
                .map(|(c, _)| *c)
                .collect()
        };
        assert!(!holding.is_empty() && holding.len() < r.live_chunks());
        r.sim.stick_bus_master(true);
        r.sim.refuse_reset(true);
        let d = if sleep { r.sleep() } else { r.stop() };
        assert_eq!(d.status, VBAL_E_TIMEOUT, "sleep {sleep}: {d:?}");
        if sleep {
            let i = r.info();
            assert_eq!(i.balloon_chunks_leaked, holding.len() as u64);
            assert_eq!(i.pages_leaked, holding.len() as u64 * CHUNK);
            assert_eq!(i.pages_held, 0);
            assert_eq!(i.pages_wired, r.mem.borrow().wired_pages());
        }
        r.only_these_stay_wired(&holding, sleep);
    }
}

/// Reporting chunks leaked (a device that would not reset held their report at each
/// sleep) keep no record: rounds after a reset that succeeds take all of theirs, and the
/// leaked chunks, wired for good, count as leaked, not as out for reporting.
fn leaked_report_chunks_leave_their_records_to_later_rounds(kexts: Kexts) {
    const CHUNK: u64 = VBAL_CHUNK_PAGES as u64;
    let mut r = reporting_rig(kexts, SimMode::Modern, Preference::Auto, 4096);
    r.set_target(64);
    let mut now = 10_000;
    let mut leaked = BTreeSet::new();
    for cycle in 0..16 {
        r.model.hold_reports = true;
        let before = r.cookie();
        let (s, rep) = r.report(now);
        assert_eq!(
            (s, rep.outcome),
            (VBAL_OK, VBAL_REPORT_SENT),
            "cycle {cycle}"
        );
        r.run();
        // Every chunk of this round holds a report the device keeps.
        leaked.extend(r.mem.borrow().live.range(before + 1..).map(|(c, _)| *c));
        r.sim.stick_bus_master(true);
        r.sim.refuse_reset(true);
        assert_eq!(r.sleep().status, VBAL_OK, "cycle {cycle}");
        r.sim.refuse_reset(false);
        r.sim.stick_bus_master(false);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_resume)(r.dev) }, VBAL_OK);
        r.run();
        now += u64::from(VBAL_REPORT_MS);
    }
    assert!(leaked.len() >= 16, "a chunk leaked each cycle");
    // A round against a device that resets and returns its reports.
    r.model.hold_reports = false;
    let before = r.cookie();
    let (s, rep) = r.report(now);
    assert_eq!((s, rep.outcome), (VBAL_OK, VBAL_REPORT_SENT));
    r.run();
    assert!(r.cookie() > before);
    let i = r.info();
    assert_eq!(i.report_chunks_leaked, leaked.len() as u64);
    assert_eq!(i.pages_leaked, i.report_chunks_leaked * CHUNK);
    assert_eq!(
        i.report_pages, 0,
        "the round's chunks back after the device; leaked ones are not out for reporting"
    );
    assert_eq!(
        i.bytes_reported,
        u64::from(VBAL_REPORT_ROUND_MIB) * (1 << 20),
        "a whole round"
    );
    r.check_consistent();
    let balloon_and_leaked = r.mem.borrow().live.len();
    r.stop();
    let m = r.mem.borrow();
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let live: BTreeSet<usize> = m.live.keys().copied().collect();
    assert_eq!(live, leaked, "only the leaked chunks stay wired");
    assert!(balloon_and_leaked > leaked.len());
    drop(m);
    // A reset of the device once failed: the family keeps every DMA buffer it still holds.
    let stopped = r.fam.take().unwrap().stop_keeping();
    assert_eq!(stopped.status.code, VK_E_RESET_TIMEOUT);
    assert_eq!(stopped.freed_while_live, 0);
}

/// The bound (the shim's `max_pages`: `virtiodarwin_balloon_max_mib`, clamped to 32 bits)
/// is never more than the guest's memory: `hw.memsize`, or the shim's `total_pages` when it
/// gives one; with neither known, [`VBAL_DEFAULT_MAX_MIB`]. The tables allocated at create
/// are sized from the bound actually used, whatever the boot-arg asked.
fn the_bound_is_at_most_the_guests_memory(kexts: Kexts) {
    const GUEST: u64 = 64 << 20;
    const MIB: usize = 1 << 20;
    for page in [4096u32, 16384] {
        // 4 GiB (tables of ~17 MiB), and the largest the shim can pass.
        for max_pages in [((4u64 << 30) / u64::from(page)) as u32, u32::MAX] {
            let cfg = VbalConfig {
                page_size: page,
                max_pages,
                total_pages: 0,
            };
            let mut r = Rig::start_config(
                kexts,
                SimMode::Modern,
                Preference::Auto,
                QEMU,
                false,
                cfg,
                0,
                kernel_sysctls(GUEST, 1000, 1000, VBAL_PRESSURE_NORMAL),
            );
            let what = format!("{} max_pages {max_pages}", r.what);
            // Tables for 64 MiB: about 16 bytes a page, far below a MiB.
            let largest = r.create_largest;
            assert!(largest < MIB, "{what}: {largest} bytes in one allocation");
            // The host asks for more than the guest has: the balloon stops at all of it.
            r.set_target(u32::MAX);
            assert_eq!(u64::from(r.actual()), GUEST >> 12, "{what}");
            assert_eq!(r.info().pages_held, GUEST / u64::from(page), "{what}");
            r.check_consistent();
            r.unload();
        }
    }

    // The shim knows the guest's size: that bounds it (no sysctl is needed).
    let cfg = VbalConfig {
        page_size: 4096,
        max_pages: u32::MAX,
        total_pages: 2000,
    };
    let mut r = Rig::start_config(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        false,
        cfg,
        0,
        BTreeMap::new(),
    );
    r.set_target(u32::MAX);
    assert_eq!(r.actual(), 2000);
    r.check_consistent();
    r.unload();

    // Nothing known about the guest: the default bound, and its tables only (8 bytes a page
    // for the driver's array, as much again for the chunk records: ~8.4 MiB at 4 KiB).
    let cfg = VbalConfig {
        total_pages: 0,
        ..cfg
    };
    let r = Rig::start_config(
        kexts,
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        false,
        cfg,
        0,
        BTreeMap::new(),
    );
    let largest = r.create_largest;
    let default_pages = (VBAL_DEFAULT_MAX_MIB as usize) << 20 >> 12;
    assert!(
        (default_pages * 8..16 * MIB).contains(&largest),
        "{largest} bytes in one allocation"
    );
    r.check_consistent();
    r.unload();
}

/// Tables the kernel cannot give (a bound of `u32::MAX` pages on a guest claiming a
/// petabyte: ~36 GiB of chunk records, which the test's allocator refuses as a kernel
/// would) fail `vbal_create` with `VBAL_E_NO_MEMORY`: no panic, no handle, no chunk wired,
/// no DMA region left, the device not live, and the nub usable by a later create.
fn tables_the_kernel_cannot_give_fail_create_cleanly(kexts: Kexts) {
    let f = kexts.bal;
    let model = BalloonModel::new(QEMU);
    let sim = model.sim_builder(SimMode::Modern, RING, false).build();
    let fam = Family::start(kexts.family, &sim, Preference::Auto).expect("family start");
    let dma_before = fam.live_dma();
    let mem = RefCell::new(ShimMem::new(
        4096,
        kernel_sysctls(1 << 50, 1000, 1000, VBAL_PRESSURE_NORMAL),
    ));
    let cb = VbalCallbacks {
        ctx: (&mem as *const RefCell<ShimMem>).cast_mut().cast(),
        alloc_chunk: Some(alloc_chunk),
        free_chunk: Some(free_chunk),
        changed: Some(changed),
        read_sysctl: Some(read_sysctl),
    };
    let absurd = VbalConfig {
        page_size: 4096,
        max_pages: u32::MAX,
        total_pages: 0,
    };
    let mut dev = std::ptr::null_mut();
    // SAFETY: the nub's live handle; the callbacks' context outlives the call.
    let s = unsafe { (f.vbal_create)(fam.client_handle(), &absurd, &cb, &mut dev) };
    assert_eq!(s, VBAL_E_NO_MEMORY);
    assert!(dev.is_null());
    {
        let m = mem.borrow();
        assert_eq!((m.allocs, m.frees), (0, 0));
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert!(m.changed.is_empty(), "`changed` after a failed create");
    }
    assert_eq!(
        fam.live_dma(),
        dma_before,
        "DMA regions left by a failed create"
    );
    assert_eq!(sim.status() & 4, 0, "DRIVER_OK after a failed create");

    // The nub is as it was: a create with a bound the kernel can give drives the device.
    let sane = VbalConfig {
        max_pages: 1024,
        ..absurd
    };
    let mut model = model;
    model.set_target(&sim, 100);
    // SAFETY: as above.
    let s = unsafe { (f.vbal_create)(fam.client_handle(), &sane, &cb, &mut dev) };
    assert_eq!(s, VBAL_OK);
    assert!(!dev.is_null());
    for _ in 0..10_000 {
        if model.serve(&sim) + fam.interrupts() == 0 {
            break;
        }
    }
    assert_eq!(model.actual(&sim), 100);
    assert!(model.violations.is_empty(), "{:?}", model.violations);
    // SAFETY: live handle, not used after destroy.
    unsafe {
        (f.vbal_stop)(dev);
        (f.vbal_destroy)(dev);
    }
    let m = mem.borrow();
    assert!(m.live.is_empty() && m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(m.allocs, m.frees);
    drop(m);
    fam.stop();
    assert!(sim.bad_accesses().is_empty(), "{:?}", sim.bad_accesses());
}
