//! What the VirtioFamily shim does, played over the PCI simulation: a
//! `VfamPlatform` whose operations reach the sim's config space, BARs, memory and
//! interrupt platform, and the interrupt action that calls `vfam_deliver_interrupt`.
//!
//! Every kext test runs twice (`kext_tests!` in `tests/tests/kext_support`): `rlib::*` calls the kexts' Rust halves
//! linked into this test binary; `loaded::*` calls the same C functions in the bundles
//! `cargo xtask kexts` links with `kextld` (`target/kexts/rust-half/<Kext>`), loaded into this
//! process the way the kernel loads a kext ([`kextld::load`]): slid, with the kernel's
//! functions ([`kernel`]) and, for a device kext, the family's exports bound. Tests reach
//! each kext through a table of its C functions ([`c_abi!`]), so one test body serves both.

use std::ffi::c_void;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use crate::mem::IdentityMemory;
use crate::sim::{Sim, SimBars, SimConfig, SimInterrupt, SimIrq};
pub use kextld::load::LoadedBundle;
use virtio_core::platform::{
    BarAccess, Dma, DmaDirection, DmaRegion, InterruptPlatform, PciConfigSpace,
};
use virtio_family_kext::{
    VFAM_PREFER_AUTO, VFAM_PREFER_LEGACY, VFAM_PREFER_MODERN, VfamDevice, VfamPlatform,
};
use virtio_kext_abi::{VK_VECTOR_INTX, VkDmaRegion, VkStatus};
use virtio_kext_client::FamilyFunctions;
use virtio_pci::Preference;

/// A kext's C functions as a struct of function pointers, one field per function of the
/// list: `rlib()` takes the crate's own functions (linked into this binary, so the compiler
/// checks every signature of the list against the crate), `loaded(bundle)` the functions
/// of the same names in a loaded bundle of that crate.
#[macro_export]
macro_rules! c_abi {
    (
        $(#[$meta:meta])*
        pub struct $table:ident from $krate:ident {
            $(fn $name:ident($($ty:ty),* $(,)?) $(-> $ret:ty)?;)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy)]
        pub struct $table {
            $(pub $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
        }

        impl $table {
            /// The crate's functions, linked into this test binary.
            pub fn rlib() -> Self {
                Self {
                    $($name: $krate::$name,)*
                }
            }

            /// The functions of `bundle`, a bundle linked from the same crate.
            pub fn loaded(bundle: &'static $crate::kext_shim::LoadedBundle) -> Self {
                Self {
                    $($name: {
                        let name = concat!("_", stringify!($name));
                        let address = bundle
                            .symbol(name)
                            .unwrap_or_else(|| panic!("the loaded bundle defines no {name}"));
                        // SAFETY: the bundle was linked from this crate, whose function of
                        // this name has exactly this signature (`rlib` checks the list); a
                        // `'static` bundle is never unloaded.
                        unsafe {
                            std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(
                                address,
                            )
                        }
                    },)*
                }
            }
        }
    };
}

/// The kernel functions the kexts' Rust runtime imports (`virtio-kext-abi`'s `kernel`
/// module), implemented for loaded bundles: memory with per-thread accounting (each test
/// runs on its own thread), `IOLog` captured per thread, `panic` fatal.
pub mod kernel {
    use std::alloc::Layout;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::ffi::{CStr, c_char, c_void};
    use std::io::Write;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    struct Allocation {
        layout: Layout,
        thread: ThreadId,
    }

    /// Live `IOMallocAligned` blocks by address.
    static ALLOCATIONS: Mutex<Option<HashMap<usize, Allocation>>> = Mutex::new(None);

    thread_local! {
        static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// A loaded kext broke the kernel's rules: report it where libtest cannot swallow it,
    /// and stop the process as the kernel would.
    pub fn fatal(message: &str) -> ! {
        let _ = writeln!(std::io::stderr(), "{message}");
        std::process::abort()
    }

    /// The Mach-O names a loaded bundle may import from the kernel, bound to these
    /// implementations.
    pub fn import(name: &str) -> Option<usize> {
        Some(match name {
            "_IOMallocAligned" => io_malloc_aligned as *const () as usize,
            "_IOFreeAligned" => io_free_aligned as *const () as usize,
            "_IOLog" => io_log as *const () as usize,
            "_panic" => kernel_panic as *const () as usize,
            _ => return None,
        })
    }

    extern "C" fn io_malloc_aligned(size: usize, alignment: usize) -> *mut c_void {
        let Ok(layout) = Layout::from_size_align(size.max(1), alignment.max(1)) else {
            fatal(&format!(
                "IOMallocAligned({size}, {alignment}): not a power-of-two alignment"
            ));
        };
        // SAFETY: a non-zero size.
        let block = unsafe { std::alloc::alloc(layout) };
        if !block.is_null() {
            let thread = std::thread::current().id();
            let mut live = ALLOCATIONS.lock().unwrap_or_else(|e| e.into_inner());
            live.get_or_insert_default()
                .insert(block as usize, Allocation { layout, thread });
        }
        block.cast()
    }

    extern "C" fn io_free_aligned(address: *mut c_void, size: usize) {
        if address.is_null() {
            return;
        }
        let mut live = ALLOCATIONS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(block) = live.get_or_insert_default().remove(&(address as usize)) else {
            fatal(&format!(
                "IOFreeAligned({address:p}, {size}): not a live IOMallocAligned block"
            ));
        };
        if block.layout.size() != size.max(1) {
            fatal(&format!(
                "IOFreeAligned({address:p}, {size}): allocated with size {}",
                block.layout.size()
            ));
        }
        // SAFETY: allocated by io_malloc_aligned with this layout, freed once (just removed
        // from the live set).
        unsafe { std::alloc::dealloc(address.cast(), block.layout) };
    }

    /// `IOLog` is variadic; the kexts call it only as `IOLog("%s", line)`, whose two
    /// pointer arguments arrive in the first two integer registers as for this
    /// non-variadic definition (x86_64 System V).
    unsafe extern "C" fn io_log(format: *const c_char, line: *const c_char) {
        // SAFETY: the kexts pass a NUL-terminated format.
        let format = unsafe { CStr::from_ptr(format) };
        if format != c"%s" {
            fatal(&format!(
                "IOLog with format {format:?}: the kexts log only through \"%s\""
            ));
        }
        // SAFETY: "%s" takes one NUL-terminated string.
        let line = unsafe { CStr::from_ptr(line) }
            .to_string_lossy()
            .into_owned();
        // Shown with the test's output when it fails.
        eprint!("IOLog: {line}");
        LOG.with(|log| log.borrow_mut().push(line));
    }

    /// `panic` is variadic and never returns; the kexts call it as `panic("%s", message)`.
    unsafe extern "C" fn kernel_panic(format: *const c_char, message: *const c_char) -> ! {
        // SAFETY: the kexts pass a NUL-terminated format and, for "%s", a string.
        let (format, message) = unsafe { (CStr::from_ptr(format), CStr::from_ptr(message)) };
        fatal(&format!(
            "kernel panic from a loaded kext: {} (format {format:?})",
            message.to_string_lossy().trim_end()
        ))
    }

    /// The lines this thread's loaded kexts sent to `IOLog` since the last call.
    pub fn take_log() -> Vec<String> {
        LOG.with(|log| std::mem::take(&mut *log.borrow_mut()))
    }

    /// `IOMallocAligned` blocks this thread allocated and has not freed.
    pub fn live_allocations() -> usize {
        let me = std::thread::current().id();
        let live = ALLOCATIONS.lock().unwrap_or_else(|e| e.into_inner());
        live.as_ref()
            .map_or(0, |l| l.values().filter(|a| a.thread == me).count())
    }

    /// Every kernel allocation this thread made is back.
    pub fn assert_no_leaks() {
        assert_eq!(
            live_allocations(),
            0,
            "IOMallocAligned blocks leaked by the loaded kexts"
        );
    }
}

/// Ends the process when a loaded-kext test runs longer than [`Watchdog::LIMIT`]: loaded
/// machine code stuck in a loop cannot be stopped from outside its thread, and would hang
/// the whole run instead of failing it.
pub struct Watchdog {
    /// Dropped when the test ends (returns or panics), which releases the watchdog thread.
    _running: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// Far above what any loaded test takes (well under a second), even on a loaded machine.
    pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

    pub fn arm(test: &'static str) -> Watchdog {
        let (running, ended) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(Self::LIMIT)
            {
                kernel::fatal(&format!(
                    "{test}: still running after {:?}; the loaded kext code is stuck (attach a \
                     debugger to see where)",
                    Self::LIMIT
                ));
            }
        });
        Watchdog { _running: running }
    }
}

/// Where `cargo xtask kexts` leaves each kext's Rust half linked on its own.
pub fn bundle_path(kext: &str) -> PathBuf {
    crate::qemu::find_workspace()
        .expect("the tests run inside the workspace")
        .join("target/kexts/rust-half")
        .join(kext)
}

/// Bundles loaded so far (never unloaded: the function tables point into them).
static LOADED: Mutex<Vec<(&'static str, Option<&'static LoadedBundle>)>> = Mutex::new(Vec::new());

/// `kext`'s Rust-half bundle loaded into this process, once: imports bound by `resolve`,
/// then its static initialisers and `log_init` run (as the kernel and the kext's shim do).
/// `None` when the bundle is not built (a skip, printed once), unless
/// `VIRTIO_REQUIRE_KEXT_BUNDLES` is set; a bundle that fails to load fails the test.
pub fn load_bundle(
    kext: &'static str,
    log_init: &str,
    resolve: &mut dyn FnMut(&str) -> Option<usize>,
) -> Option<&'static LoadedBundle> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, bundle)) = loaded.iter().find(|(k, _)| *k == kext) {
        return bundle;
    }
    let path = bundle_path(kext);
    let bundle = match std::fs::read(&path) {
        Ok(bytes) => {
            let bundle = LoadedBundle::load(&bytes, resolve)
                .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
            let bundle: &'static LoadedBundle = Box::leak(Box::new(bundle));
            for &init in bundle.init_functions() {
                // SAFETY: a `__mod_init_func` entry: a loaded function taking nothing.
                let init = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn()>(init) };
                // SAFETY: run once, right after loading, as the kernel does.
                unsafe { init() };
            }
            let init = bundle
                .symbol(log_init)
                .unwrap_or_else(|| panic!("{} defines no {log_init}", path.display()));
            // SAFETY: the kext's `*_log_init(void)`, which its shim calls first.
            let init = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn()>(init) };
            // SAFETY: as the shim calls it.
            unsafe { init() };
            Some(bundle)
        }
        Err(e) if std::env::var_os("VIRTIO_REQUIRE_KEXT_BUNDLES").is_some() => panic!(
            "{}: {e}; VIRTIO_REQUIRE_KEXT_BUNDLES is set: run `cargo xtask kexts` to link the kexts' Rust halves",
            path.display()
        ),
        Err(e) => {
            // Written past libtest's capture so the skip shows in a passing run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipping the loaded-bundle tests: {}: {e} (`cargo xtask kexts` links it)",
                path.display()
            );
            None
        }
    };
    loaded.push((kext, bundle));
    bundle
}

crate::c_abi! {
    /// The family's functions its shim calls (the device kexts' share is
    /// [`FamilyFunctions`]).
    pub struct FamilyShim from virtio_family_kext {
        fn vfam_identify(u16, u16, u16) -> u32;
        fn vfam_type_deferred(u32, *const std::ffi::c_char) -> bool;
        fn vfam_device_create(*const VfamPlatform, u32, *mut *mut VfamDevice) -> VkStatus;
        fn vfam_device_destroy(*mut VfamDevice) -> VkStatus;
        fn vfam_transport_kind(*mut VfamDevice) -> u32;
        fn vfam_deliver_interrupt(*mut VfamDevice, i32);
        fn vfam_log_init();
    }
}

/// VirtioFamily.kext's C functions, in one variant.
pub struct FamilyKext {
    /// What the shim calls.
    pub shim: FamilyShim,
    /// What device kexts call (`virtio-kext-client`'s `FamilyBus` takes it).
    pub client: FamilyFunctions,
    /// The loaded bundle; `None` for the rlib.
    pub bundle: Option<&'static LoadedBundle>,
}

impl FamilyKext {
    /// The family's Rust half linked into this binary.
    pub fn rlib() -> &'static FamilyKext {
        static RLIB: OnceLock<FamilyKext> = OnceLock::new();
        RLIB.get_or_init(|| FamilyKext {
            shim: FamilyShim::rlib(),
            client: FamilyFunctions::linked(),
            bundle: None,
        })
    }

    /// The family's bundle loaded into this process; `None` if it is not built.
    pub fn loaded() -> Option<&'static FamilyKext> {
        static LOADED_FAMILY: OnceLock<Option<FamilyKext>> = OnceLock::new();
        LOADED_FAMILY
            .get_or_init(|| {
                let bundle = load_bundle("VirtioFamily", "_vfam_log_init", &mut kernel::import)?;
                // SAFETY: the bundle is VirtioFamily's Rust half: each exported `_vfam_*`
                // is the function of that name; it is never unloaded.
                let client = unsafe {
                    FamilyFunctions::resolve(|name| bundle.exported_symbol(&format!("_{name}")))
                }
                .unwrap_or_else(|name| panic!("the family bundle does not export _{name}"));
                Some(FamilyKext {
                    shim: FamilyShim::loaded(bundle),
                    client,
                    bundle: Some(bundle),
                })
            })
            .as_ref()
    }

    /// A device kext's bundle loaded on top of this (loaded) family: its `_vfam_*` imports
    /// bound to the family's exports, its kernel imports to [`kernel`].
    pub fn load_device(&self, kext: &'static str, log_init: &str) -> Option<&'static LoadedBundle> {
        let family = self
            .bundle
            .expect("a device bundle loads on the loaded family");
        load_bundle(kext, log_init, &mut |name| {
            kernel::import(name).or_else(|| {
                name.starts_with("_vfam_")
                    .then(|| family.exported_symbol(name))
                    .flatten()
            })
        })
    }
}

/// The shim's per-function state: what its C callbacks reach through `ctx`.
pub struct ShimState {
    pub cfg: SimConfig,
    pub bars: SimBars,
    pub mem: IdentityMemory,
    pub irq: Mutex<SimIrq>,
    /// Regions allocated through `dma_alloc` and not freed (the shim's `fDmaBuffers`).
    pub live_dma: Mutex<Vec<VkDmaRegion>>,
    /// The function, to tell whether its device may still use memory when a region is
    /// freed ([`Sim::may_dma`]).
    pub sim: Sim,
    /// Regions freed while the device could still read or write memory (not reset, bus
    /// mastering on): memory a live device may have been given, handed back for reuse.
    pub freed_while_live: Mutex<usize>,
}

fn st<'a>(ctx: *mut c_void) -> &'a ShimState {
    // SAFETY: ctx is the Box<ShimState> the Family owns for as long as the device lives.
    unsafe { &*(ctx as *const ShimState) }
}

unsafe extern "C" fn config_read(ctx: *mut c_void, off: u16, width: u8) -> u32 {
    let s = st(ctx);
    match width {
        1 => s.cfg.read8(off).into(),
        2 => s.cfg.read16(off).into(),
        _ => s.cfg.read32(off),
    }
}
unsafe extern "C" fn config_write(ctx: *mut c_void, off: u16, width: u8, v: u32) {
    let s = st(ctx);
    match width {
        1 => s.cfg.write8(off, v as u8),
        2 => s.cfg.write16(off, v as u16),
        _ => s.cfg.write32(off, v),
    }
}
unsafe extern "C" fn bar_info(ctx: *mut c_void, bar: u8, len: *mut u64, io: *mut bool) -> bool {
    let s = st(ctx);
    match s.bars.bar_len(bar) {
        Some(l) => {
            // SAFETY: out-pointers from the Rust side.
            unsafe {
                *len = l;
                *io = s.bars.bar_is_io(bar);
            }
            true
        }
        None => false,
    }
}
unsafe extern "C" fn bar_read(ctx: *mut c_void, bar: u8, off: u64, width: u8) -> u32 {
    let b = &st(ctx).bars;
    let v = match width {
        1 => b.read8(bar, off).map(u32::from),
        2 => b.read16(bar, off).map(u32::from),
        _ => b.read32(bar, off),
    };
    v.expect("the family checks BAR bounds before calling the shim")
}
unsafe extern "C" fn bar_write(ctx: *mut c_void, bar: u8, off: u64, width: u8, v: u32) {
    let b = &st(ctx).bars;
    match width {
        1 => b.write8(bar, off, v as u8),
        2 => b.write16(bar, off, v as u16),
        _ => b.write32(bar, off, v),
    }
}
unsafe extern "C" fn dma_alloc(
    ctx: *mut c_void,
    len: u64,
    align: u64,
    out: *mut VkDmaRegion,
) -> bool {
    let s = st(ctx);
    match s.mem.alloc_coherent(len as usize, align as usize) {
        Ok(r) => {
            let region = VkDmaRegion {
                vaddr: r.vaddr.as_ptr(),
                daddr: r.daddr,
                len: r.len as u64,
            };
            s.live_dma.lock().unwrap().push(region);
            // SAFETY: out-pointer from the Rust side.
            unsafe { *out = region };
            true
        }
        Err(_) => false,
    }
}
unsafe extern "C" fn dma_free(ctx: *mut c_void, r: *const VkDmaRegion) {
    let s = st(ctx);
    // SAFETY: pointer from the Rust side.
    let r = unsafe { *r };
    let mut live = s.live_dma.lock().unwrap();
    let i = live
        .iter()
        .position(|d| d.daddr == r.daddr)
        .expect("dma_free of a region the shim never allocated (or freed twice)");
    live.swap_remove(i);
    drop(live);
    release(s, r);
}

/// Gives a region back to memory, as releasing its `IOBufferMemoryDescriptor` does; one
/// freed while the device could still use memory is counted (`freed_while_live`).
fn release(s: &ShimState, r: VkDmaRegion) {
    if s.sim.may_dma() {
        *s.freed_while_live.lock().unwrap() += 1;
    }
    // SAFETY: a region of `s.mem` the shim allocated and no longer lists; whether the
    // device was done with it is what `freed_while_live` records.
    unsafe {
        s.mem.free_coherent(DmaRegion {
            vaddr: NonNull::new(r.vaddr).unwrap(),
            daddr: r.daddr,
            len: r.len as usize,
        })
    };
}
unsafe extern "C" fn dma_map(
    ctx: *mut c_void,
    v: *mut u8,
    len: u64,
    dir: u32,
    out: *mut u64,
) -> bool {
    let d = match dir {
        0 => DmaDirection::ToDevice,
        1 => DmaDirection::FromDevice,
        _ => DmaDirection::Bidirectional,
    };
    match st(ctx).mem.map(NonNull::new(v).unwrap(), len as usize, d) {
        Ok(a) => {
            // SAFETY: out-pointer from the Rust side.
            unsafe { *out = a };
            true
        }
        Err(_) => false,
    }
}
unsafe extern "C" fn dma_unmap(_ctx: *mut c_void, _daddr: u64, _len: u64, _dir: u32) {}
unsafe extern "C" fn irq_msix(ctx: *mut c_void, n: u16) -> bool {
    st(ctx).irq.lock().unwrap().enable_msix(n)
}
unsafe extern "C" fn irq_intx(ctx: *mut c_void) -> bool {
    st(ctx).irq.lock().unwrap().enable_intx()
}
unsafe extern "C" fn irq_disable(ctx: *mut c_void) {
    st(ctx).irq.lock().unwrap().disable()
}

/// What the shim's `stop` (`releaseResources`) did: `vfam_device_destroy`'s status, and
/// what became of the DMA buffers still allocated after it (regions neither the family nor
/// its clients freed).
#[derive(Debug, PartialEq, Eq)]
pub struct Stopped {
    pub status: VkStatus,
    /// Released by the shim (the status was VK_OK: the device is quiet).
    pub released: usize,
    /// Deliberately leaked by the shim (any other status: the device may still use them).
    pub kept: usize,
    /// [`Family::freed_while_live`] once stopped: the shim's releases included.
    pub freed_while_live: usize,
}

/// The family driver's side of one PCI function: shim state + the Rust device handle.
pub struct Family {
    /// The family kext's functions (rlib or loaded).
    pub kext: &'static FamilyKext,
    pub sim: Sim,
    pub state: Box<ShimState>,
    pub platform: Box<VfamPlatform>,
    pub dev: *mut VfamDevice,
}

impl Family {
    /// `start`: identify by IDs (as `probe` does), then create the device (as `start` does).
    pub fn start(
        kext: &'static FamilyKext,
        sim: &Sim,
        pref: Preference,
    ) -> Result<Family, VkStatus> {
        let f = &kext.shim;
        let cfg = sim.config_space();
        // The shim turns bus mastering off before it hands the function to the family
        // (`VirtioPCITransport::start`), without looking at what it reads back (a stuck
        // bit stays set): the family turns it on after the first reset.
        virtio_pci::caps::set_bus_master(&cfg, false);
        // SAFETY: a pure function of three IDs.
        let ty = unsafe { (f.vfam_identify)(cfg.read16(0), cfg.read16(2), cfg.read16(0x2e)) };
        assert_ne!(ty, 0, "the sim function is a virtio function we drive");
        let state = Box::new(ShimState {
            cfg,
            bars: sim.bars(),
            mem: sim.memory(),
            irq: Mutex::new(sim.irq()),
            live_dma: Mutex::new(Vec::new()),
            sim: sim.clone(),
            freed_while_live: Mutex::new(0),
        });
        let platform = Box::new(VfamPlatform {
            ctx: &*state as *const ShimState as *mut c_void,
            config_read: Some(config_read),
            config_write: Some(config_write),
            bar_info: Some(bar_info),
            bar_read: Some(bar_read),
            bar_write: Some(bar_write),
            dma_alloc: Some(dma_alloc),
            dma_free: Some(dma_free),
            dma_map: Some(dma_map),
            dma_unmap: Some(dma_unmap),
            irq_enable_msix: Some(irq_msix),
            irq_enable_intx: Some(irq_intx),
            irq_disable: Some(irq_disable),
        });
        let mut dev = std::ptr::null_mut();
        let p = match pref {
            Preference::Legacy => VFAM_PREFER_LEGACY,
            Preference::Modern => VFAM_PREFER_MODERN,
            Preference::Auto => VFAM_PREFER_AUTO,
        };
        // SAFETY: the platform and its state live in `Family` until `stop`.
        let s = unsafe { (f.vfam_device_create)(&*platform, p, &mut dev) };
        if !s.is_ok() {
            return Err(s);
        }
        // SAFETY: a pure function of three IDs.
        assert_eq!(unsafe { (f.vfam_identify)(0x1af4, 0x1041, 0) }, 1);
        Ok(Family {
            kext,
            sim: sim.clone(),
            state,
            platform,
            dev,
        })
    }

    /// The interrupt event sources' actions: every interrupt the device sent since the last
    /// call goes to `vfam_deliver_interrupt`. Returns how many.
    pub fn interrupts(&self) -> usize {
        let irqs = self.sim.take_interrupts();
        for i in &irqs {
            let v = match i {
                SimInterrupt::Msix(v) => i32::from(*v),
                SimInterrupt::Intx => VK_VECTOR_INTX,
            };
            // SAFETY: the live handle from `start`, as the shim's interrupt action has it.
            unsafe { (self.kext.shim.vfam_deliver_interrupt)(self.dev, v) };
        }
        irqs.len()
    }

    /// DMA regions still allocated through the shim.
    pub fn live_dma(&self) -> usize {
        self.state.live_dma.lock().unwrap().len()
    }

    /// DMA regions freed while the device could still use memory (see
    /// [`ShimState::freed_while_live`]); a region the device was never given counts too,
    /// so tests read it around frees of regions the device had.
    pub fn freed_while_live(&self) -> usize {
        *self.state.freed_while_live.lock().unwrap()
    }

    /// The shim's `stop` (`releaseResources` with `destroyGated`): destroys the device,
    /// then, if `vfam_device_destroy` reported VK_OK, releases every DMA buffer still in its
    /// list (`fDmaBuffers`); on any other status it deliberately leaks them all (the device
    /// may still read and write them). No leak checks (see [`Family::stop`]).
    pub fn stop_keeping(self) -> Stopped {
        // SAFETY: the handle came from vfam_device_create and is not used again.
        let status = unsafe { (self.kext.shim.vfam_device_destroy)(self.dev) };
        let left = std::mem::take(&mut *self.state.live_dma.lock().unwrap());
        let (released, kept) = if status.is_ok() {
            for r in &left {
                release(&self.state, *r);
            }
            (left.len(), 0)
        } else {
            // Deliberately leaked, as the shim's `leakDmaMemory` does.
            (0, left.len())
        };
        Stopped {
            status,
            released,
            kept,
            freed_while_live: self.freed_while_live(),
        }
    }

    /// `stop` of a device that reset: the family and its clients gave every DMA region back
    /// themselves (nothing left for the shim to release), and (loaded kexts) every kernel
    /// allocation is back: the family stops after its clients.
    pub fn stop(self) {
        let bundle = self.kext.bundle.is_some();
        let s = self.stop_keeping();
        assert_eq!(
            (s.status, s.released, s.kept),
            (VkStatus::OK, 0, 0),
            "DMA regions leaked past stop"
        );
        if bundle {
            kernel::assert_no_leaks();
        }
    }

    /// The handle as the client crates see it (the nub's `getDevice()`).
    pub fn client_handle(&self) -> *mut virtio_kext_client::VfamDevice {
        self.dev.cast()
    }
}
