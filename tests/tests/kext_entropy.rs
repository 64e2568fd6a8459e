//! VirtioEntropy.kext's C ABI (`virtio-entropy-kext`), called the way its IOService shim
//! calls it, on top of the family's C ABI over the PCI simulation with a test entropy
//! source serving the request queue. IOKit order: the family starts and publishes its
//! nub; the entropy driver's `start` creates the device over the nub's handle (every
//! buffer posted); the device's interrupts, delivered by the family, reach `ready`; the
//! shim reads at most `VRNG_FEED_BYTES` at a time for the kernel's pool; sleep resets the
//! device and wake brings it up from scratch; `stop` resets it; `free` destroys; the
//! family stops with every DMA region returned. Each test runs against the rlibs and
//! against the loaded bundles (`kext_support`).

mod kext_support;

use std::cell::{Cell, RefCell};
use std::ffi::c_void;

use kext_support::{Family, FamilyKext, c_abi, kext_tests};
use virtio_core::DeviceType;
use virtio_entropy_kext::*;
use virtio_pci::Preference;
use virtio_rng::REQUEST_QUEUE;
use virtio_tests::sim::{MODES, Sim, SimBuilder, SimMode};

/// INDIRECT_DESC | EVENT_IDX | ... (ring bits; VERSION_1 added for non-legacy functions).
const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);
const V1: u64 = 1 << 32;

c_abi! {
    /// VirtioEntropy.kext's C functions (`VirtioEntropyABI.h`).
    pub struct EntropyAbi from virtio_entropy_kext {
        fn vrng_create(
            *mut virtio_kext_client::VfamDevice,
            *const VrngCallbacks,
            *mut *mut VrngDevice,
        ) -> i32;
        fn vrng_read(*mut VrngDevice, *mut u8, usize, *mut usize) -> i32;
        fn vrng_interrupt(*mut VrngDevice, i32);
        fn vrng_stats(*mut VrngDevice, *mut VrngStats) -> i32;
        fn vrng_suspend(*mut VrngDevice) -> i32;
        fn vrng_resume(*mut VrngDevice) -> i32;
        fn vrng_stop(*mut VrngDevice);
        fn vrng_destroy(*mut VrngDevice);
        fn vrng_log_init();
    }
}

/// The family and the entropy kext, both from the rlibs or both loaded.
#[derive(Clone, Copy)]
struct Kexts {
    family: &'static FamilyKext,
    rng: EntropyAbi,
}

impl Kexts {
    fn rlib() -> Kexts {
        Kexts {
            family: FamilyKext::rlib(),
            rng: EntropyAbi::rlib(),
        }
    }

    fn loaded() -> Option<Kexts> {
        let family = FamilyKext::loaded()?;
        let bundle = family.load_device("VirtioEntropy", "_vrng_log_init")?;
        Some(Kexts {
            family,
            rng: EntropyAbi::loaded(bundle),
        })
    }
}

kext_tests!(Kexts:
    start_read_interrupts_stop_in_every_mode,
    a_hostile_device_is_reset_and_brought_up_again,
    needs_reset_recovers,
    the_ready_callback_may_read_at_once,
    lifecycle_across_sleep_and_wake,
    null_arguments_are_refused,
);

/// What the shim's callback records.
#[derive(Default)]
struct ShimLog {
    /// The `bytes` of each `ready` call.
    ready: RefCell<Vec<usize>>,
    /// When set, `ready` reads one feed right away, from inside the interrupt entry.
    read_in_callback: Cell<Option<(EntropyAbi, *mut VrngDevice)>>,
    /// What those reads returned.
    read: RefCell<Vec<u8>>,
}

unsafe extern "C" fn on_ready(ctx: *mut c_void, bytes: usize) {
    // SAFETY: ctx is the test's ShimLog, alive while the device lives.
    let log = unsafe { &*(ctx as *const ShimLog) };
    log.ready.borrow_mut().push(bytes);
    if let Some((abi, dev)) = log.read_in_callback.get() {
        let mut buf = [0u8; VRNG_FEED_BYTES as usize];
        let mut got = 0;
        // SAFETY: the live handle whose interrupt entry is calling us; `buf` and `got` are
        // locals.
        let s = unsafe { (abi.vrng_read)(dev, buf.as_mut_ptr(), buf.len(), &mut got) };
        assert_eq!(s, VRNG_OK);
        log.read.borrow_mut().extend_from_slice(&buf[..got]);
    }
}

/// The shim's side: the family (transport + nub), the entropy source, and the device.
struct Rig {
    kexts: Kexts,
    sim: Sim,
    fam: Option<Family>,
    log: Box<ShimLog>,
    dev: *mut VrngDevice,
    /// The source's stream position: byte i of the stream is `i % 251`.
    next: u64,
    /// Every byte the device wrote, in completion order.
    fed: Vec<u8>,
}

impl Rig {
    fn start(kexts: Kexts, mode: SimMode, pref: Preference, msix: Option<u16>) -> Rig {
        let mut b = SimBuilder::new(mode, DeviceType::Entropy.id())
            .features(if mode == SimMode::Legacy {
                RING
            } else {
                RING | V1
            })
            .queues(&[64])
            .memory_len(4 << 20);
        if let Some(v) = msix {
            b = b.msix_vectors(v);
        }
        let sim = b.build();
        let fam = Family::start(kexts.family, &sim, pref).expect("family start");
        let log = Box::<ShimLog>::default();
        let cb = VrngCallbacks {
            ctx: (&*log as *const ShimLog).cast_mut().cast(),
            ready: Some(on_ready),
        };
        let mut dev = std::ptr::null_mut();
        // SAFETY: the nub's live handle; the callback's context outlives the device.
        let s = unsafe { (kexts.rng.vrng_create)(fam.client_handle(), &cb, &mut dev) };
        assert_eq!(s, VRNG_OK, "{mode:?}/{pref:?}: vrng_create");
        assert!(!dev.is_null());
        sim.check_init_order().unwrap();
        Rig {
            kexts,
            sim,
            fam: Some(fam),
            log,
            dev,
            next: 0,
            fed: Vec::new(),
        }
    }

    fn fam(&self) -> &Family {
        self.fam.as_ref().unwrap()
    }

    /// The device fills every posted buffer with `len(i, capacity)` bytes of the stream
    /// and signals once; the family's interrupt actions deliver what it raised. Returns
    /// the buffers served.
    fn serve(&mut self, mut len: impl FnMut(usize, u32) -> u32) -> usize {
        let chains = self.sim.pop_chains(REQUEST_QUEUE);
        for (i, c) in chains.iter().enumerate() {
            assert_eq!(c.readable_len(), 0, "requests are device-writable only");
            let n = len(i, c.writable_len()).min(c.writable_len());
            let data: Vec<u8> = (0..u64::from(n))
                .map(|k| ((self.next + k) % 251) as u8)
                .collect();
            self.next += u64::from(n);
            let written = self.sim.write_chain(c, &data);
            self.fed.extend_from_slice(&data);
            self.sim.complete(REQUEST_QUEUE, c.head, written);
        }
        if !chains.is_empty() {
            self.sim.signal_used(REQUEST_QUEUE);
        }
        self.fam().interrupts();
        chains.len()
    }

    /// One feed of the kernel's pool, as the shim does it.
    fn read(&self) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; VRNG_FEED_BYTES as usize];
        let mut got = usize::MAX;
        // SAFETY: live handle; `buf` holds `buf.len()` bytes; `got` is a local.
        let s =
            unsafe { (self.kexts.rng.vrng_read)(self.dev, buf.as_mut_ptr(), buf.len(), &mut got) };
        if s != VRNG_OK {
            assert_eq!(got, 0);
            return Err(s);
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Feeds until the device has nothing more.
    fn read_all(&self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = self.read().expect("vrng_read");
            if b.is_empty() {
                return out;
            }
            assert!(b.len() <= VRNG_FEED_BYTES as usize);
            out.extend_from_slice(&b);
        }
    }

    fn stats(&self) -> VrngStats {
        let mut s = VrngStats::default();
        assert_eq!(
            // SAFETY: live handle, local out-pointer.
            unsafe { (self.kexts.rng.vrng_stats)(self.dev, &mut s) },
            VRNG_OK
        );
        s
    }

    fn take_ready(&self) -> Vec<usize> {
        std::mem::take(&mut self.log.ready.borrow_mut())
    }

    /// `stop` then `free`, then the family stops: every DMA region must be back (and, for
    /// loaded kexts, every kernel allocation).
    fn unload(mut self) {
        // SAFETY: live handle, not used after destroy.
        unsafe {
            (self.kexts.rng.vrng_stop)(self.dev);
            (self.kexts.rng.vrng_destroy)(self.dev);
        }
        assert_eq!(self.sim.status(), 0, "stop leaves the device reset");
        self.fam.take().unwrap().stop();
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
    }
}

fn start_read_interrupts_stop_in_every_mode(kexts: Kexts) {
    for (mode, pref) in MODES {
        for msix in [None, Some(2)] {
            let what = format!("{mode:?}/{pref:?}/msix {msix:?}");
            let mut r = Rig::start(kexts, mode, pref, msix);
            assert_eq!(r.read().unwrap(), Vec::<u8>::new(), "{what}: nothing yet");
            // Eight buffers of 64 bytes are posted; the device writes uneven amounts
            // (one of them nothing, which is legal).
            assert_eq!(r.serve(|i, cap| [cap, 10, 0, 33, 1, cap, 7, 64][i % 8]), 8);
            let ready = r.take_ready();
            assert!(!ready.is_empty(), "{what}: the interrupt reached `ready`");
            assert_eq!(*ready.last().unwrap(), r.fed.len(), "{what}");
            let got = r.read_all();
            assert_eq!(got, r.fed, "{what}: the device's bytes, in order, once");
            // Emptied buffers were reposted: the next fill arrives too.
            assert_eq!(r.serve(|_, cap| cap), 8, "{what}: every buffer reposted");
            let more = r.read_all();
            assert_eq!([got, more].concat(), r.fed, "{what}");
            let s = r.stats();
            assert_eq!(s.completions, 16, "{what}");
            assert_eq!(s.empty_completions, 1, "{what}");
            assert_eq!(s.bytes_received, r.fed.len() as u64, "{what}");
            assert_eq!(s.bytes_read, r.fed.len() as u64, "{what}");
            assert!(s.interrupts >= 2, "{what}");
            assert_eq!((s.recoveries, s.suspends, s.available), (0, 0, 0), "{what}");
            r.unload();
        }
    }
}

fn a_hostile_device_is_reset_and_brought_up_again(kexts: Kexts) {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, mode, pref, None);
        r.serve(|_, cap| cap);
        let resets = r.sim.resets();
        // A used element naming a descriptor id the driver never posted.
        // The driver finds it on the shim's next feed (its interrupt may be suppressed:
        // the driver has not asked for one past the first round).
        r.sim.complete_raw(REQUEST_QUEUE, 63, 8);
        r.sim.signal_used(REQUEST_QUEUE);
        r.fam().interrupts();
        assert_eq!(r.read(), Err(VRNG_E_DEVICE), "{what}");
        assert!(r.sim.resets() > resets, "{what}: reset after the fault");
        r.sim.check_init_order().unwrap();
        assert_eq!(r.stats().recoveries, 1, "{what}");
        // Bytes from before the fault are dropped; the new driver reads the new ones.
        let before = r.fed.len();
        r.take_ready();
        assert_eq!(r.serve(|_, _| 16), 8, "{what}: every buffer posted again");
        assert_eq!(r.read_all(), r.fed[before..], "{what}");
        r.unload();
    }
}

fn needs_reset_recovers(kexts: Kexts) {
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, Some(2));
    let resets = r.sim.resets();
    r.sim.trigger_needs_reset();
    r.fam().interrupts();
    assert!(r.sim.resets() > resets, "reset after DEVICE_NEEDS_RESET");
    r.sim.check_init_order().unwrap();
    assert_eq!(r.stats().recoveries, 1);
    assert_eq!(r.serve(|_, cap| cap), 8);
    assert_eq!(r.read_all(), r.fed);
    r.unload();
}

/// A shim may feed straight from `ready`, inside the interrupt entry: the driver has
/// finished with the device when it calls back, and the read reposts what it emptied.
fn the_ready_callback_may_read_at_once(kexts: Kexts) {
    for msix in [None, Some(2)] {
        let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, msix);
        r.log.read_in_callback.set(Some((kexts.rng, r.dev)));
        assert_eq!(r.serve(|_, _| 40), 8);
        let first = r.log.read.borrow().clone();
        assert_eq!(first, r.fed[..VRNG_FEED_BYTES as usize], "msix {msix:?}");
        // 64 of 40-byte buffers: the first was emptied and reposted by the read inside the
        // callback, the second is partly read and stays out.
        r.log.read_in_callback.set(None);
        assert_eq!(r.serve(|_, cap| cap), 1, "msix {msix:?}");
        let rest = r.read_all();
        assert_eq!([first, rest].concat(), r.fed, "msix {msix:?}");
        r.unload();
    }
}

fn lifecycle_across_sleep_and_wake(kexts: Kexts) {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, mode, pref, Some(2));
        r.serve(|_, cap| cap);
        // The shim took one feed; the rest is still in the driver when sleep comes.
        assert_eq!(
            r.read().unwrap(),
            r.fed[..VRNG_FEED_BYTES as usize],
            "{what}"
        );
        let resets = r.sim.resets();
        let live = r.fam().live_dma();

        // setPowerState(0): reset, buffers freed.
        assert_eq!(
            // SAFETY: live handle.
            unsafe { (kexts.rng.vrng_suspend)(r.dev) },
            VRNG_OK,
            "{what}"
        );
        assert_eq!(r.sim.resets(), resets + 1, "{what}: reset for sleep");
        assert_eq!(r.sim.status(), 0, "{what}");
        assert!(r.fam().live_dma() < live, "{what}: the buffers were freed");
        // Asleep: no reads; interrupts find nothing.
        assert_eq!(r.read(), Err(VRNG_E_STOPPED), "{what}");
        r.take_ready();
        r.fam().interrupts();
        // SAFETY: a spurious shared-line interrupt as the family's entry delivers it.
        unsafe { (kexts.rng.vrng_interrupt)(r.dev, -1) };
        assert!(r.take_ready().is_empty(), "{what}");
        // A second sleep notification changes nothing.
        assert_eq!(
            // SAFETY: live handle.
            unsafe { (kexts.rng.vrng_suspend)(r.dev) },
            VRNG_OK,
            "{what}"
        );
        assert_eq!(r.sim.resets(), resets + 1, "{what}");

        // setPowerState(1): brought up from scratch, every buffer posted again.
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.rng.vrng_resume)(r.dev) }, VRNG_OK, "{what}");
        r.sim.check_init_order().unwrap();
        let before = r.fed.len();
        assert_eq!(r.serve(|_, _| 20), 8, "{what}");
        assert!(!r.take_ready().is_empty(), "{what}");
        assert_eq!(
            r.read_all(),
            r.fed[before..],
            "{what}: only bytes written after wake"
        );
        let s = r.stats();
        assert_eq!(s.suspends, 1, "{what}");
        assert_eq!(s.completions, 16, "{what}: counted across the wake");
        r.unload();
    }
}

fn null_arguments_are_refused(kexts: Kexts) {
    let f = kexts.rng;
    let mut dev = std::ptr::null_mut();
    let cb = VrngCallbacks {
        ctx: std::ptr::null_mut(),
        ready: None,
    };
    let mut got = 0usize;
    let mut buf = [0u8; 4];
    // SAFETY: every pointer is null or a local; the functions must refuse nulls.
    unsafe {
        assert_eq!(
            (f.vrng_create)(std::ptr::null_mut(), &cb, &mut dev),
            VRNG_E_INVALID
        );
        assert!(dev.is_null());
        assert_eq!(
            (f.vrng_read)(std::ptr::null_mut(), buf.as_mut_ptr(), 4, &mut got),
            VRNG_E_INVALID
        );
        assert_eq!((f.vrng_suspend)(std::ptr::null_mut()), VRNG_E_INVALID);
        assert_eq!((f.vrng_resume)(std::ptr::null_mut()), VRNG_E_INVALID);
        (f.vrng_interrupt)(std::ptr::null_mut(), 0);
        (f.vrng_stop)(std::ptr::null_mut());
        (f.vrng_destroy)(std::ptr::null_mut());
    }
    // A live device with a null buffer or count pointer.
    let r = Rig::start(kexts, SimMode::Modern, Preference::Auto, None);
    // SAFETY: live handle; null pointers are refused.
    unsafe {
        assert_eq!(
            (f.vrng_read)(r.dev, std::ptr::null_mut(), 4, &mut got),
            VRNG_E_INVALID
        );
        assert_eq!(
            (f.vrng_read)(r.dev, buf.as_mut_ptr(), 4, std::ptr::null_mut()),
            VRNG_E_INVALID
        );
        assert_eq!((f.vrng_stats)(r.dev, std::ptr::null_mut()), VRNG_E_INVALID);
    }
    r.unload();
}
