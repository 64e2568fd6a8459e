//! VirtioBalloon.kext's C ABI (`virtio-balloon-kext`), called the way its IOService shim
//! calls it, on top of the family's C ABI over the PCI simulation with `balloon_model`
//! playing the device. IOKit order: the family starts and publishes its nub; the balloon's
//! `start` creates the device over the nub's handle (it reads the target and inflates);
//! config interrupts, delivered by the family, move the balloon; the shim's chunks are
//! counted here (every chunk wired is freed exactly once, none survives `stop`); sleep
//! resets the device and gives every page back, wake inflates again; `stop` resets it;
//! `free` destroys; the family stops with every DMA region returned. Each test runs
//! against the rlibs and against the loaded bundles (`kext_support`).

mod kext_support;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_void;

use kext_support::{Family, FamilyKext, c_abi, kext_tests};
use virtio_balloon::wire::tag;
use virtio_balloon_kext::*;
use virtio_pci::Preference;
use virtio_tests::balloon_model::{BalloonModel, bits};
use virtio_tests::sim::{MODES, Sim, SimMode};

const RING: u64 = bits::INDIRECT_DESC | bits::EVENT_IDX;
/// QEMU's default offer plus MUST_TELL_HOST and DEFLATE_ON_OOM.
const QEMU: u64 = bits::MUST_TELL_HOST | bits::STATS_VQ | bits::DEFLATE_ON_OOM;
/// Where the test's "physical" pages live (the device never touches them).
const BASE: u64 = 0x1_0000_0000;

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
        fn vbal_info(*mut VbalDevice, *mut VbalInfo) -> i32;
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
    the_kernel_running_short_pauses_and_poll_resumes,
    oom_hook_deflates_and_holds,
    needs_reset_recovers_and_reinflates,
    lifecycle_across_sleep_and_wake,
    null_arguments_are_refused,
);

/// The shim's side of memory: chunks "wired" from a fake physical space, every one
/// tracked, so that a chunk leaked or freed twice fails the test.
#[derive(Default)]
struct ShimMem {
    page_size: u64,
    /// Pages handed out so far (numbers them; the addresses are scattered).
    next: u64,
    next_cookie: usize,
    live: BTreeMap<usize, Vec<u64>>,
    /// Chunks the shim may have wired at once (`None`: no limit).
    limit: Option<usize>,
    allocs: u64,
    frees: u64,
    errors: Vec<String>,
    /// Each `changed` call's `starved`.
    changed: Vec<bool>,
}

impl ShimMem {
    /// The page addresses of live chunks, as 4 KiB frames.
    fn frames(&self) -> BTreeSet<u32> {
        let fpp = self.page_size / 4096;
        self.live
            .values()
            .flatten()
            .flat_map(|&a| (0..fpp).map(move |k| ((a >> 12) + k) as u32))
            .collect()
    }
}

unsafe extern "C" fn alloc_chunk(
    ctx: *mut c_void,
    pages: *mut u64,
    count: u32,
    cookie: *mut *mut c_void,
) -> bool {
    // SAFETY: ctx is the test's RefCell<ShimMem>, alive while the device lives.
    let mem = unsafe { &*(ctx as *const RefCell<ShimMem>) };
    let mut m = mem.borrow_mut();
    assert_eq!(count, VBAL_CHUNK_PAGES);
    if m.limit.is_some_and(|l| m.live.len() >= l) {
        return false;
    }
    // A chunk's pages are not contiguous: an odd multiplier scatters them (bijective
    // modulo 2^20 pages).
    let addrs: Vec<u64> = (0..u64::from(count))
        .map(|k| {
            let n = ((m.next + k).wrapping_mul(0x9E37_79B1)) & 0xF_FFFF;
            BASE + n * m.page_size
        })
        .collect();
    m.next += u64::from(count);
    // SAFETY: the pool passes room for `count` addresses.
    unsafe { std::ptr::copy_nonoverlapping(addrs.as_ptr(), pages, addrs.len()) };
    m.next_cookie += 1;
    let c = m.next_cookie;
    m.live.insert(c, addrs);
    m.allocs += 1;
    // SAFETY: a valid out-pointer from the pool.
    unsafe { *cookie = c as *mut c_void };
    true
}

unsafe extern "C" fn free_chunk(ctx: *mut c_void, cookie: *mut c_void) {
    // SAFETY: as in alloc_chunk.
    let mem = unsafe { &*(ctx as *const RefCell<ShimMem>) };
    let mut m = mem.borrow_mut();
    if m.live.remove(&(cookie as usize)).is_none() {
        m.errors
            .push(format!("chunk {cookie:?} freed but not live"));
    }
    m.frees += 1;
}

unsafe extern "C" fn changed(ctx: *mut c_void, starved: bool) {
    // SAFETY: as in alloc_chunk.
    let mem = unsafe { &*(ctx as *const RefCell<ShimMem>) };
    mem.borrow_mut().changed.push(starved);
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
        let what = format!("{mode:?}/{pref:?}/msix {msix} features {features:#x}");
        let model = BalloonModel::new(features);
        let sim = model.sim_builder(mode, RING, msix).build();
        let fam = Family::start(kexts.family, &sim, pref).expect("family start");
        let mem = Box::new(RefCell::new(ShimMem {
            page_size: u64::from(page_size),
            ..ShimMem::default()
        }));
        let mut model = model;
        model.set_target(&sim, initial_target);
        let cfg = VbalConfig {
            page_size,
            max_pages,
            total_pages: 0,
        };
        let cb = VbalCallbacks {
            ctx: (&*mem as *const RefCell<ShimMem>).cast_mut().cast(),
            alloc_chunk: Some(alloc_chunk),
            free_chunk: Some(free_chunk),
            changed: Some(changed),
        };
        let mut dev = std::ptr::null_mut();
        // SAFETY: the nub's live handle; the callbacks' context outlives the device.
        let s = unsafe { (kexts.bal.vbal_create)(fam.client_handle(), &cfg, &cb, &mut dev) };
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
        assert_eq!(
            i.pages_wired,
            m.live.len() as u64 * u64::from(VBAL_CHUNK_PAGES),
            "{what}"
        );
        // The balloon's pages are among the wired ones.
        assert!(i.pages_held <= i.pages_wired, "{what}");
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{what}: {:?}",
            self.sim.bad_accesses()
        );
    }

    /// `stop` then `free`, then the family stops: every chunk and DMA region must be back
    /// (and, for loaded kexts, every kernel allocation).
    fn unload(mut self) {
        // SAFETY: live handle, not used after destroy.
        unsafe {
            (self.kexts.bal.vbal_stop)(self.dev);
            (self.kexts.bal.vbal_destroy)(self.dev);
        }
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
        // No tag at all: the kernel gives a kext no memory figures through public KPI, and
        // the pool's size is unknown (total_pages 0), so not even MEMTOT is invented.
        assert!(
            last.iter().all(|&(t, _)| t != tag::MEMTOT),
            "{}: {last:?}",
            r.what
        );
        assert!(r.info().stats_buffers >= 2);
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

        // setPowerState(0): reset, every page back to the kernel.
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.bal.vbal_suspend)(r.dev) }, VBAL_OK);
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

fn null_arguments_are_refused(kexts: Kexts) {
    let f = kexts.bal;
    let mut dev = std::ptr::null_mut();
    let mem = RefCell::new(ShimMem::default());
    let cb = VbalCallbacks {
        ctx: (&mem as *const RefCell<ShimMem>).cast_mut().cast(),
        alloc_chunk: Some(alloc_chunk),
        free_chunk: Some(free_chunk),
        changed: None,
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
    }
    r.unload();
}
