//! The device kexts' side of the bus interface: [`FamilyBus`] implements
//! `virtio_core::Bus` over the `vfam_*` C functions that `VirtioFamily.kext` exports, so the
//! device crates (virtio-net, virtio-blk) run unchanged on top of the family kext.
//!
//! The functions are resolved by the kernel linker against the family kext (a library
//! kext of every device kext); in host tests, against the `virtio-family-kext` rlib linked
//! into the same test binary. Their declarations here mirror `VirtioFamilyABI.h`; a test
//! checks that both sides have the same signatures.
#![no_std]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

extern crate alloc;

use alloc::vec::Vec;
use core::ffi::c_void;
use core::ptr::NonNull;

use virtio_core::bus::{Bus, InterruptCause, QueueMask, QueueSpec};
use virtio_core::platform::{DeviceAddr, Dma, DmaDirection, DmaRegion, InterruptMode};
use virtio_core::queue::{QueueStats, Segment, Used};
use virtio_core::{DeviceType, Error, Features, Result};
use virtio_kext_abi::{
    VK_DMA_BIDIRECTIONAL, VK_DMA_FROM_DEVICE, VK_DMA_TO_DEVICE, VK_IRQ_INTX, VK_IRQ_MSIX,
    VkDmaRegion, VkInterruptCause, VkQueueSpec, VkQueueStats, VkSegment, VkStatus, as_vk_segments,
    vector_to_abi,
};

/// The family's device handle (opaque).
#[repr(C)]
pub struct VfamDevice {
    _opaque: [u8; 0],
}

/// The family's interrupt handler type (`VfamInterruptHandler`).
pub type InterruptHandler = Option<unsafe extern "C" fn(ctx: *mut c_void, vector: i32)>;
/// `vfam_reset`'s callback for each in-flight chain (`VfamReclaim`).
pub type Reclaim = Option<unsafe extern "C" fn(ctx: *mut c_void, queue: u16, token: usize)>;
/// The family's completion handler type (`VfamUsedHandler`).
pub type UsedHandler = Option<unsafe extern "C" fn(ctx: *mut c_void, token: usize, len: u32)>;

/// Everything that names the family's client-facing functions comes from the one list
/// below, so the declarations, the trait and the table cannot drift apart:
///
/// - [`ffi`]: the `extern "C"` declarations the kernel linker binds against the family
///   kext (in host tests, against the `virtio-family-kext` rlib);
/// - [`FamilyApi`]: how [`FamilyBus`] calls them, one method per function;
/// - [`LinkedFamily`]: the implementation over [`ffi`] (zero-sized, calls inlined: what the
///   kexts use);
/// - [`FamilyFunctions`]: a table of pointers to them resolved at run time (tests that run
///   a family bundle loaded into the test process).
macro_rules! family_functions {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        /// The family's client-facing C functions, as `VirtioFamilyABI.h` declares them.
        pub mod ffi {
            use super::*;
            pub use super::{InterruptHandler, Reclaim, UsedHandler};

            unsafe extern "C" {
                $(pub fn $name($($arg: $ty),*) $(-> $ret)?;)*
            }
        }

        /// The family's client-facing functions as [`FamilyBus`] calls them. Each method is
        /// the C function of the same name.
        // The methods mirror C signatures, argument for argument.
        #[allow(clippy::too_many_arguments)]
        pub trait FamilyApi: Copy {
            $(
                /// # Safety
                /// The contract of the C function of the same name (`VirtioFamilyABI.h`).
                unsafe fn $name(self, $($arg: $ty),*) $(-> $ret)?;
            )*
        }

        #[allow(clippy::too_many_arguments)]
        impl FamilyApi for LinkedFamily {
            $(
                #[inline(always)]
                unsafe fn $name(self, $($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: the caller upholds the C function's contract (trait method
                    // contract); this is that function.
                    unsafe { ffi::$name($($arg),*) }
                }
            )*
        }

        /// Pointers to the family's client-facing functions, found at run time rather than
        /// bound by the linker.
        #[derive(Clone, Copy, Debug)]
        pub struct FamilyFunctions {
            $(pub $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
        }

        impl FamilyFunctions {
            /// The functions the linker bound [`ffi`] to.
            pub fn linked() -> Self {
                Self {
                    $($name: ffi::$name,)*
                }
            }

            /// Each function's address from `lookup`, given its C name (`vfam_…`, no
            /// leading underscore). Fails with the first name `lookup` does not know.
            ///
            /// # Safety
            /// Every address `lookup` returns is the entry point of the family function of
            /// that name, with the signature declared here, and stays valid while the table
            /// is used.
            pub unsafe fn resolve(
                mut lookup: impl FnMut(&str) -> Option<usize>,
            ) -> core::result::Result<Self, &'static str> {
                Ok(Self {
                    $($name: {
                        let address = lookup(stringify!($name))
                            .filter(|&a| a != 0)
                            .ok_or(stringify!($name))?;
                        // SAFETY: a non-null entry point of this very function (caller
                        // contract).
                        unsafe {
                            core::mem::transmute::<
                                usize,
                                unsafe extern "C" fn($($ty),*) $(-> $ret)?,
                            >(address)
                        }
                    },)*
                })
            }
        }

        #[allow(clippy::too_many_arguments)]
        impl FamilyApi for &FamilyFunctions {
            $(
                unsafe fn $name(self, $($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: the pointer is the C function of this name (`linked`, or
                    // `resolve`'s contract); the caller upholds its contract.
                    unsafe { (self.$name)($($arg),*) }
                }
            )*
        }
    };
}

family_functions! {
    fn vfam_device_type(dev: *mut VfamDevice) -> u32;
    fn vfam_set_interrupt_handler(
        dev: *mut VfamDevice,
        handler: InterruptHandler,
        ctx: *mut c_void,
    );
    fn vfam_negotiate_features(dev: *mut VfamDevice, driver: u64, negotiated: *mut u64) -> VkStatus;
    fn vfam_offered_features(dev: *mut VfamDevice) -> u64;
    fn vfam_features(dev: *mut VfamDevice) -> u64;
    fn vfam_read_config(dev: *mut VfamDevice, offset: u32, buf: *mut u8, len: usize) -> VkStatus;
    fn vfam_write_config(
        dev: *mut VfamDevice,
        offset: u32,
        data: *const u8,
        len: usize,
    ) -> VkStatus;
    fn vfam_num_queues(dev: *mut VfamDevice) -> u16;
    fn vfam_max_queue_size(dev: *mut VfamDevice, index: u16) -> u16;
    fn vfam_setup_queues(dev: *mut VfamDevice, specs: *const VkQueueSpec, count: usize) -> VkStatus;
    fn vfam_driver_ok(dev: *mut VfamDevice) -> VkStatus;
    fn vfam_reset(dev: *mut VfamDevice, reclaim: Reclaim, ctx: *mut c_void) -> VkStatus;
    fn vfam_fail(dev: *mut VfamDevice);
    fn vfam_needs_reset(dev: *mut VfamDevice) -> bool;
    fn vfam_interrupt_mode(dev: *mut VfamDevice, vectors: *mut u16) -> u32;
    fn vfam_queue_add(
        dev: *mut VfamDevice,
        queue: u16,
        readable: *const VkSegment,
        nreadable: usize,
        writable: *const VkSegment,
        nwritable: usize,
        token: usize,
    ) -> VkStatus;
    fn vfam_queue_kick(dev: *mut VfamDevice, queue: u16, notified: *mut bool) -> VkStatus;
    fn vfam_queue_pop_used(
        dev: *mut VfamDevice,
        queue: u16,
        found: *mut bool,
        token: *mut usize,
        len: *mut u32,
    ) -> VkStatus;
    fn vfam_queue_has_used(dev: *mut VfamDevice, queue: u16, maybe: *mut bool) -> VkStatus;
    fn vfam_queue_drain(
        dev: *mut VfamDevice,
        queue: u16,
        interrupts: bool,
        handler: UsedHandler,
        ctx: *mut c_void,
    ) -> VkStatus;
    fn vfam_queue_enable_interrupts(
        dev: *mut VfamDevice,
        queue: u16,
        delayed: bool,
        more: *mut bool,
    ) -> VkStatus;
    fn vfam_queue_disable_interrupts(dev: *mut VfamDevice, queue: u16) -> VkStatus;
    fn vfam_queue_info(
        dev: *mut VfamDevice,
        queue: u16,
        segments: usize,
        free: *mut u16,
        size: *mut u16,
        descriptors: *mut usize,
        max_chain: *mut u16,
    ) -> VkStatus;
    fn vfam_queue_stats(dev: *mut VfamDevice, queue: u16, stats: *mut VkQueueStats) -> VkStatus;
    fn vfam_handle_interrupt(
        dev: *mut VfamDevice,
        vector: i32,
        cause: *mut VkInterruptCause,
    ) -> VkStatus;
    fn vfam_dma_alloc(
        dev: *mut VfamDevice,
        len: usize,
        align: usize,
        out: *mut VkDmaRegion,
    ) -> VkStatus;
    fn vfam_dma_free(dev: *mut VfamDevice, region: *const VkDmaRegion);
    fn vfam_dma_map(
        dev: *mut VfamDevice,
        vaddr: *mut u8,
        len: usize,
        direction: u32,
        daddr: *mut u64,
    ) -> VkStatus;
    fn vfam_dma_unmap(dev: *mut VfamDevice, daddr: u64, len: usize, direction: u32);
}

/// The family's functions as the linker binds them ([`ffi`]): what the kexts use. Zero-sized;
/// every call is a direct call.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkedFamily;

/// DMA through the family (`vfam_dma_*`).
pub struct FamilyDma<A: FamilyApi = LinkedFamily> {
    dev: *mut VfamDevice,
    api: A,
}

fn dir(d: DmaDirection) -> u32 {
    match d {
        DmaDirection::ToDevice => VK_DMA_TO_DEVICE,
        DmaDirection::FromDevice => VK_DMA_FROM_DEVICE,
        DmaDirection::Bidirectional => VK_DMA_BIDIRECTIONAL,
    }
}

impl<A: FamilyApi> Dma for FamilyDma<A> {
    fn alloc_coherent(&self, len: usize, align: usize) -> Result<DmaRegion> {
        let mut r = VkDmaRegion {
            vaddr: core::ptr::null_mut(),
            daddr: 0,
            len: 0,
        };
        // SAFETY: `dev` is a live family handle (FamilyBus::new contract); `r` is a local.
        unsafe { self.api.vfam_dma_alloc(self.dev, len, align, &mut r) }.into_result()?;
        Ok(DmaRegion {
            vaddr: NonNull::new(r.vaddr).ok_or(Error::DmaAlloc)?,
            daddr: r.daddr,
            len: r.len as usize,
        })
    }
    unsafe fn free_coherent(&self, region: DmaRegion) {
        let r = VkDmaRegion {
            vaddr: region.vaddr.as_ptr(),
            daddr: region.daddr,
            len: region.len as u64,
        };
        // SAFETY: the caller guarantees the device is done with it (trait contract).
        unsafe { self.api.vfam_dma_free(self.dev, &r) }
    }
    fn map(&self, vaddr: NonNull<u8>, len: usize, d: DmaDirection) -> Result<DeviceAddr> {
        let mut a = 0;
        // SAFETY: live handle; `a` is a local.
        unsafe {
            self.api
                .vfam_dma_map(self.dev, vaddr.as_ptr(), len, dir(d), &mut a)
        }
        .into_result()?;
        Ok(a)
    }
    fn unmap(&self, daddr: DeviceAddr, len: usize, d: DmaDirection) {
        // SAFETY: live handle.
        unsafe { self.api.vfam_dma_unmap(self.dev, daddr, len, dir(d)) }
    }
}

/// `virtio_core::Bus` over one family device handle, calling the family through `A`
/// ([`LinkedFamily`] in the kexts).
pub struct FamilyBus<A: FamilyApi = LinkedFamily> {
    dev: *mut VfamDevice,
    api: A,
    dma: FamilyDma<A>,
    device_type: DeviceType,
}

impl FamilyBus {
    /// Wraps a handle the family's nub handed out; `None` for a null handle or an unknown
    /// device type.
    ///
    /// # Safety
    /// `dev` stays valid for the life of the returned bus (the family keeps the device while
    /// its nub has a client), and the bus is used from one context at a time.
    pub unsafe fn new(dev: *mut VfamDevice) -> Option<Self> {
        // SAFETY: the caller's guarantees; LinkedFamily is the family the kext links.
        unsafe { FamilyBus::with_api(LinkedFamily, dev) }
    }
}

impl<A: FamilyApi> FamilyBus<A> {
    /// [`FamilyBus::new`] over the family functions `api` reaches.
    ///
    /// # Safety
    /// As for [`FamilyBus::new`], and `dev` is a handle of the family whose functions `api`
    /// calls.
    pub unsafe fn with_api(api: A, dev: *mut VfamDevice) -> Option<Self> {
        if dev.is_null() {
            return None;
        }
        // SAFETY: non-null live handle (caller contract).
        let t = DeviceType::from_id(unsafe { api.vfam_device_type(dev) })?;
        Some(FamilyBus {
            dev,
            api,
            dma: FamilyDma { dev, api },
            device_type: t,
        })
    }

    /// The family handle.
    pub fn handle(&self) -> *mut VfamDevice {
        self.dev
    }

    fn info(&self, queue: u16, segments: usize) -> Result<(u16, u16, usize, u16)> {
        let (mut free, mut size, mut descs, mut max) = (0, 0, 0, 0);
        // SAFETY: live handle; out-pointers are locals.
        unsafe {
            self.api.vfam_queue_info(
                self.dev, queue, segments, &mut free, &mut size, &mut descs, &mut max,
            )
        }
        .into_result()?;
        Ok((free, size, descs, max))
    }
}

unsafe extern "C" fn reclaim_trampoline(ctx: *mut c_void, queue: u16, token: usize) {
    // SAFETY: `ctx` is the `&mut &mut dyn FnMut` that `Bus::reset` below passes, alive for
    // the duration of the `vfam_reset` call that invokes this.
    let f = unsafe { &mut *ctx.cast::<&mut dyn FnMut(u16, usize)>() };
    f(queue, token);
}

/// Where [`vfam_queue_drain`](ffi::vfam_queue_drain) hands [`FamilyBus::drain_used`]'s
/// completions: the caller's closure and the count.
struct Drain<F> {
    f: F,
    n: usize,
}

/// The completion handler [`FamilyBus::drain_used`] passes to the family.
///
/// # Safety
/// `ctx` is the `Drain<F>` that call passed, alive and not otherwise borrowed.
unsafe extern "C" fn drained<F: FnMut(Used)>(ctx: *mut c_void, token: usize, len: u32) {
    // SAFETY: the caller's contract.
    let sink = unsafe { &mut *ctx.cast::<Drain<F>>() };
    (sink.f)(Used { token, len });
    sink.n += 1;
}

impl<A: FamilyApi> Bus for FamilyBus<A> {
    type Dma = FamilyDma<A>;

    fn dma(&self) -> &FamilyDma<A> {
        &self.dma
    }
    fn device_type(&self) -> DeviceType {
        self.device_type
    }
    fn negotiate_features(&mut self, driver: Features) -> Result<Features> {
        let mut got = 0;
        // SAFETY: live handle; `got` is a local.
        unsafe {
            self.api
                .vfam_negotiate_features(self.dev, driver.bits(), &mut got)
        }
        .into_result()?;
        Ok(Features::from_bits_retain(got))
    }
    fn offered_features(&self) -> Features {
        // SAFETY: live handle.
        Features::from_bits_retain(unsafe { self.api.vfam_offered_features(self.dev) })
    }
    fn features(&self) -> Features {
        // SAFETY: live handle.
        Features::from_bits_retain(unsafe { self.api.vfam_features(self.dev) })
    }
    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        // SAFETY: live handle; `buf` is valid for its length.
        unsafe {
            self.api
                .vfam_read_config(self.dev, offset, buf.as_mut_ptr(), buf.len())
        }
        .into_result()
    }
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        // SAFETY: live handle; `data` is valid for its length.
        unsafe {
            self.api
                .vfam_write_config(self.dev, offset, data.as_ptr(), data.len())
        }
        .into_result()
    }
    fn num_queues(&mut self) -> u16 {
        // SAFETY: live handle.
        unsafe { self.api.vfam_num_queues(self.dev) }
    }
    fn max_queue_size(&mut self, index: u16) -> u16 {
        // SAFETY: live handle.
        unsafe { self.api.vfam_max_queue_size(self.dev, index) }
    }
    fn setup_queues(&mut self, specs: &[QueueSpec]) -> Result<()> {
        // Bring-up, not the I/O path: allocated, since a multiport console has up to 128
        // queues (two per port plus the control pair).
        let mut c: Vec<VkQueueSpec> = Vec::new();
        c.try_reserve_exact(specs.len())
            .map_err(|_| Error::DmaAlloc)?;
        c.extend(specs.iter().map(|s| VkQueueSpec {
            index: s.index,
            size: s.size,
            max_indirect: s.max_indirect,
            interrupts: s.interrupts.into(),
            ignore_used_len: s.ignore_used_len.into(),
        }));
        // SAFETY: live handle; `c` holds `specs.len()` entries.
        unsafe { self.api.vfam_setup_queues(self.dev, c.as_ptr(), c.len()) }.into_result()
    }
    fn driver_ok(&mut self) -> Result<()> {
        // SAFETY: live handle.
        unsafe { self.api.vfam_driver_ok(self.dev) }.into_result()
    }
    /// `vfam_reset`'s status mapped back: Err(ResetTimeout) when the device may still use
    /// the driver's DMA memory (`Bus::reset`'s contract).
    fn reset(&mut self, reclaim: &mut dyn FnMut(u16, usize)) -> Result<()> {
        let mut r: &mut dyn FnMut(u16, usize) = reclaim;
        let ctx = (&mut r as *mut &mut dyn FnMut(u16, usize)).cast::<c_void>();
        // SAFETY: live handle; the trampoline's context outlives the call.
        unsafe { self.api.vfam_reset(self.dev, Some(reclaim_trampoline), ctx) }.into_result()
    }
    fn fail(&mut self) {
        // SAFETY: live handle.
        unsafe { self.api.vfam_fail(self.dev) }
    }
    fn needs_reset(&self) -> bool {
        // SAFETY: live handle.
        unsafe { self.api.vfam_needs_reset(self.dev) }
    }
    fn interrupt_mode(&self) -> InterruptMode {
        let mut n = 0;
        // SAFETY: live handle; `n` is a local.
        match unsafe { self.api.vfam_interrupt_mode(self.dev, &mut n) } {
            VK_IRQ_MSIX => InterruptMode::MsiX { vectors: n },
            VK_IRQ_INTX => InterruptMode::Intx,
            _ => InterruptMode::Polling,
        }
    }
    fn add(
        &mut self,
        queue: u16,
        readable: &[Segment],
        writable: &[Segment],
        token: usize,
    ) -> Result<()> {
        // The lists as they are: `VkSegment` has `Segment`'s layout. The family refuses a
        // chain longer than `VFAM_MAX_CHAIN` (`BadChain`).
        let (r, w) = (as_vk_segments(readable), as_vk_segments(writable));
        // SAFETY: live handle; each pointer is a live slice of the length passed with it.
        unsafe {
            self.api.vfam_queue_add(
                self.dev,
                queue,
                r.as_ptr(),
                r.len(),
                w.as_ptr(),
                w.len(),
                token,
            )
        }
        .into_result()
    }
    fn kick(&mut self, queue: u16) -> Result<bool> {
        let mut n = false;
        // SAFETY: live handle; `n` is a local.
        unsafe { self.api.vfam_queue_kick(self.dev, queue, &mut n) }.into_result()?;
        Ok(n)
    }
    fn pop_used(&mut self, queue: u16) -> Result<Option<Used>> {
        let (mut found, mut token, mut len) = (false, 0, 0);
        // SAFETY: live handle; out-pointers are locals.
        unsafe {
            self.api
                .vfam_queue_pop_used(self.dev, queue, &mut found, &mut token, &mut len)
        }
        .into_result()?;
        Ok(found.then_some(Used { token, len }))
    }
    /// One call (`vfam_queue_drain`) instead of a call each for the peek, the disable, the
    /// pops and the re-enable: each completion comes back through [`drained`].
    fn drain_used<F: FnMut(Used)>(&mut self, queue: u16, interrupts: bool, f: F) -> Result<usize> {
        let mut sink = Drain { f, n: 0 };
        let ctx: *mut Drain<F> = &mut sink;
        // SAFETY: live handle; `drained` is called back only during this call, with `ctx`,
        // a live local of the type it was instantiated for.
        unsafe {
            self.api
                .vfam_queue_drain(self.dev, queue, interrupts, Some(drained::<F>), ctx.cast())
        }
        .into_result()?;
        Ok(sink.n)
    }
    fn has_used(&self, queue: u16) -> Result<bool> {
        let mut maybe = true;
        // SAFETY: live handle; `maybe` is a local.
        unsafe { self.api.vfam_queue_has_used(self.dev, queue, &mut maybe) }.into_result()?;
        Ok(maybe)
    }
    fn enable_interrupts(&mut self, queue: u16) -> Result<bool> {
        let mut more = false;
        // SAFETY: live handle; `more` is a local.
        unsafe {
            self.api
                .vfam_queue_enable_interrupts(self.dev, queue, false, &mut more)
        }
        .into_result()?;
        Ok(more)
    }
    fn enable_interrupts_delayed(&mut self, queue: u16) -> Result<bool> {
        let mut more = false;
        // SAFETY: live handle; `more` is a local.
        unsafe {
            self.api
                .vfam_queue_enable_interrupts(self.dev, queue, true, &mut more)
        }
        .into_result()?;
        Ok(more)
    }
    fn disable_interrupts(&mut self, queue: u16) -> Result<()> {
        // SAFETY: live handle.
        unsafe { self.api.vfam_queue_disable_interrupts(self.dev, queue) }.into_result()
    }
    fn free_descriptors(&self, queue: u16) -> Result<u16> {
        Ok(self.info(queue, 1)?.0)
    }
    fn queue_size(&self, queue: u16) -> Result<u16> {
        Ok(self.info(queue, 1)?.1)
    }
    fn descriptors_for(&self, queue: u16, segments: usize) -> Result<usize> {
        Ok(self.info(queue, segments)?.2)
    }
    fn max_chain(&self, queue: u16) -> Result<u16> {
        Ok(self.info(queue, 1)?.3)
    }
    fn queue_stats(&self, queue: u16) -> Result<QueueStats> {
        let mut s = VkQueueStats::default();
        // SAFETY: live handle; `s` is a local.
        unsafe { self.api.vfam_queue_stats(self.dev, queue, &mut s) }.into_result()?;
        Ok(s.into())
    }
    fn handle_interrupt(&mut self, vector: Option<u16>) -> InterruptCause {
        let mut c = VkInterruptCause::default();
        let v = vector_to_abi(vector);
        // SAFETY: live handle; `c` is a local.
        if !unsafe { self.api.vfam_handle_interrupt(self.dev, v, &mut c) }.is_ok() {
            return InterruptCause::default();
        }
        InterruptCause {
            queues: QueueMask(u128::from(c.queues_lo) | (u128::from(c.queues_hi) << 64)),
            config_changed: c.config_changed != 0,
            needs_reset: c.needs_reset != 0,
        }
    }
}
