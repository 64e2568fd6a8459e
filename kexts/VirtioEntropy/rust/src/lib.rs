//! `VirtioEntropy.kext`'s Rust half: `virtio-rng`'s [`VirtioRng`] over the family's bus.
//!
//! The C++ shim (`kexts/VirtioEntropy/shim/`, an `IOService` on the family's nub) hands
//! [`vrng_create`] the nub's device handle; this crate wraps it in a
//! [`FamilyBus`](virtio_kext_client::FamilyBus), brings the device up with [`VirtioRng`]
//! (every buffer posted) and registers its interrupt entry with the family. The shim then
//! only moves bytes: [`vrng_read`] at start and every [`VRNG_FEED_PERIOD_MS`], at most
//! [`VRNG_FEED_BYTES`] at a time, into the kernel's random pool (see the shim's header
//! for how: the kernel's `write_random` is not public KPI).
//!
//! - Interrupts ([`vrng_interrupt`]) collect what the device returned and tell the shim
//!   through [`VrngCallbacks::ready`] that bytes are waiting.
//! - DEVICE_NEEDS_RESET or a device breaking the queue protocol: the driver is shut down
//!   (reset, buffers freed) and brought up again; bytes not read are dropped.
//! - Sleep ([`vrng_suspend`]): `VirtioRng::shutdown` resets the device and frees its
//!   buffers (nothing survives the power transition); wake ([`vrng_resume`]) brings up a
//!   new driver over the same family handle.
//! - `stop` → [`vrng_stop`], then [`vrng_destroy`].
//!
//! Threading: the shim calls everything under its command gate on the family's work loop,
//! where the family also delivers interrupts, so a handle is never used concurrently.
//!
//! Memory is allocated only when a driver is brought up ([`vrng_create`], a wake, a
//! recovery), never by [`vrng_read`] or [`vrng_interrupt`]'s normal path; nothing here
//! panics on device or caller input.
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

use alloc::boxed::Box;
use core::ffi::c_void;

use virtio_core::Error;
use virtio_kext_abi::vector_from_abi;
use virtio_kext_client::{FamilyBus, VfamDevice};
use virtio_rng::{RngOptions, RngStats, VirtioRng};

/// Statuses of the `vrng_*` functions.
pub const VRNG_OK: i32 = 0;
/// A null pointer or handle.
pub const VRNG_E_INVALID: i32 = 1;
/// The device could not be brought up, or broke (a later call may succeed after a
/// recovery or a wake).
pub const VRNG_E_DEVICE: i32 = 2;
/// Stopped, or asleep: no device to read.
pub const VRNG_E_STOPPED: i32 = 3;

/// Most bytes the shim hands the kernel's pool at once. 64 bytes (512 bits) reseed a
/// kernel PRNG fully; taking more would only drain the host's entropy source.
pub const VRNG_FEED_BYTES: u32 = 64;
/// The shim feeds the pool at start (as soon as the device delivers) and then at most once
/// per this period: a bounded rate the host never has to throttle.
pub const VRNG_FEED_PERIOD_MS: u32 = 60_000;
/// Until the first feed succeeded (early in boot `/dev` may not exist yet), the shim tries
/// again this often instead.
pub const VRNG_FEED_RETRY_MS: u32 = 1_000;

/// The shim's callback; `ctx` is passed back unchanged (the shim's driver object).
///
/// - `ready` (may be null): after an interrupt, `bytes` random bytes wait to be read with
///   [`vrng_read`]; called from [`vrng_interrupt`] on the family's work loop, once the
///   driver is done with the device, so it may call [`vrng_read`] right away.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VrngCallbacks {
    pub ctx: *mut c_void,
    pub ready: Option<unsafe extern "C" fn(ctx: *mut c_void, bytes: usize)>,
}

/// Counters for the IORegistry (`Statistics`), over the device's whole life (across wakes
/// and recoveries).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VrngStats {
    /// Buffers the device returned.
    pub completions: u64,
    /// Of those, returned empty (legal).
    pub empty_completions: u64,
    /// Bytes the device wrote.
    pub bytes_received: u64,
    /// Bytes handed to the shim (and by it to the kernel's pool).
    pub bytes_read: u64,
    /// Interrupts delivered to this driver.
    pub interrupts: u64,
    /// Times the device was reset and brought up again after a fault.
    pub recoveries: u64,
    /// Sleeps.
    pub suspends: u64,
    /// Bytes ready to be read now.
    pub available: u64,
}

/// One virtio entropy device (opaque to C).
pub struct VrngDevice {
    /// `None` while asleep, stopped, or after a failed bring-up.
    drv: Option<VirtioRng<FamilyBus>>,
    family: *mut VfamDevice,
    cb: VrngCallbacks,
    /// The counters of drivers already shut down.
    past: RngStats,
    interrupts: u64,
    recoveries: u64,
    suspends: u64,
    asleep: bool,
    stopped: bool,
}

fn dev<'a>(p: *mut VrngDevice) -> Option<&'a mut VrngDevice> {
    // SAFETY: a non-null handle comes from `vrng_create` and stays valid until
    // `vrng_destroy`; the shim serialises every call on its work loop.
    unsafe { p.as_mut() }
}

/// The family calls this (registered by [`vrng_create`]) from its interrupt actions.
unsafe extern "C" fn family_interrupt(ctx: *mut c_void, vector: i32) {
    // SAFETY: ctx is the VrngDevice registered in vrng_create and unregistered (on the same
    // work loop) before it is freed.
    unsafe { vrng_interrupt(ctx.cast(), vector) }
}

/// A driver over the family handle `family` (the device is reset and initialised from
/// scratch).
fn bring_up(family: *mut VfamDevice) -> Result<VirtioRng<FamilyBus>, Error> {
    // SAFETY: `family` is the live handle given to vrng_create, which outlives the device
    // (vrng_create contract); the previous driver over it, if any, was shut down.
    let bus = unsafe { FamilyBus::new(family) }.ok_or(Error::Unsupported)?;
    VirtioRng::new(bus, RngOptions::default())
}

impl VrngDevice {
    /// Resets the device and frees its buffers, keeping the driver's counters.
    fn shut_down(&mut self) {
        if let Some(mut drv) = self.drv.take() {
            let s = drv.stats();
            self.past.completions += s.completions;
            self.past.empty_completions += s.empty_completions;
            self.past.bytes_received += s.bytes_received;
            self.past.bytes_read += s.bytes_read;
            drv.shutdown();
        }
    }

    /// After a device fault: reset and bring up again (bytes not read are dropped: the
    /// device is untrusted once it broke the protocol).
    fn recover(&mut self, why: &dyn core::fmt::Display) {
        log::warn!("VirtioEntropy: device fault ({why}); resetting it");
        self.shut_down();
        self.recoveries += 1;
        match bring_up(self.family) {
            Ok(d) => self.drv = Some(d),
            Err(e) => log::error!("VirtioEntropy: the device did not come back: {e}"),
        }
    }
}

/// Brings up the entropy device behind the family handle `family` (the nub's
/// `virtioDevice()`): every buffer is posted, so bytes start arriving at once. Registers
/// the interrupt entry with the family and returns the handle in `*out`.
///
/// # Safety
/// `family` is a live family handle that outlives the returned device; `callbacks` points
/// to valid callbacks whose `ctx` stays valid until [`vrng_destroy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_create(
    family: *mut VfamDevice,
    callbacks: *const VrngCallbacks,
    out: *mut *mut VrngDevice,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(o) = (unsafe { out.as_mut() }) else {
        return VRNG_E_INVALID;
    };
    *o = core::ptr::null_mut();
    // SAFETY: null or valid (C contract).
    let Some(cb) = (unsafe { callbacks.as_ref() }).copied() else {
        return VRNG_E_INVALID;
    };
    if family.is_null() {
        return VRNG_E_INVALID;
    }
    let drv = match bring_up(family) {
        Ok(d) => d,
        Err(e) => {
            log::error!("VirtioEntropy: device setup failed: {e}");
            return VRNG_E_DEVICE;
        }
    };
    let d = Box::new(VrngDevice {
        drv: Some(drv),
        family,
        cb,
        past: RngStats::default(),
        interrupts: 0,
        recoveries: 0,
        suspends: 0,
        asleep: false,
        stopped: false,
    });
    let raw = Box::into_raw(d);
    // SAFETY: live family handle; the context is the boxed device, unregistered in
    // vrng_stop (which vrng_destroy runs) before it is freed.
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(
            family,
            Some(family_interrupt),
            raw.cast(),
        )
    };
    *o = raw;
    VRNG_OK
}

/// Copies up to `len` random bytes, in the order the device produced them, into `buf`
/// and reposts the buffers it emptied; `*got` says how many (0: none arrived yet). No
/// allocation.
///
/// # Safety
/// `d` is null or a live handle; `buf` is valid for `len` bytes; `got` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_read(
    d: *mut VrngDevice,
    buf: *mut u8,
    len: usize,
    got: *mut usize,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(got)) = (dev(d), unsafe { got.as_mut() }) else {
        return VRNG_E_INVALID;
    };
    *got = 0;
    if buf.is_null() {
        return VRNG_E_INVALID;
    }
    if d.stopped || d.asleep {
        return VRNG_E_STOPPED;
    }
    let Some(drv) = d.drv.as_mut() else {
        return VRNG_E_DEVICE;
    };
    // SAFETY: caller contract: `buf` is valid for `len` bytes, and not aliased by us.
    let out = unsafe { core::slice::from_raw_parts_mut(buf, len) };
    match drv.read(out) {
        Ok(n) => {
            *got = n;
            VRNG_OK
        }
        Err(e) => {
            d.recover(&e);
            VRNG_E_DEVICE
        }
    }
}

/// The interrupt entry (the family calls it through the handler [`vrng_create`]
/// registered; `vector` is the MSI-X index or -1 for INTx): collects what the device
/// returned, recovers from DEVICE_NEEDS_RESET or a broken queue, and calls
/// [`VrngCallbacks::ready`] when bytes wait.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_interrupt(d: *mut VrngDevice, vector: i32) {
    let Some(d) = dev(d) else { return };
    if d.stopped || d.asleep {
        return;
    }
    let Some(drv) = d.drv.as_mut() else { return };
    d.interrupts += 1;
    let ready = match drv.handle_interrupt(vector_from_abi(vector)) {
        Ok(r) if r.needs_reset => {
            d.recover(&"DEVICE_NEEDS_RESET");
            0
        }
        Ok(r) => r.bytes_ready,
        Err(e) => {
            d.recover(&e);
            0
        }
    };
    // Last use of `d`: the callback may re-enter through the handle.
    let cb = d.cb;
    if ready > 0
        && let Some(f) = cb.ready
    {
        // SAFETY: the shim's callback with its own context.
        unsafe { f(cb.ctx, ready) };
    }
}

/// Counters for the IORegistry.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_stats(d: *mut VrngDevice, out: *mut VrngStats) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VRNG_E_INVALID;
    };
    let (now, available) = d
        .drv
        .as_ref()
        .map_or((RngStats::default(), 0), |r| (r.stats(), r.available()));
    *out = VrngStats {
        completions: d.past.completions + now.completions,
        empty_completions: d.past.empty_completions + now.empty_completions,
        bytes_received: d.past.bytes_received + now.bytes_received,
        bytes_read: d.past.bytes_read + now.bytes_read,
        interrupts: d.interrupts,
        recoveries: d.recoveries,
        suspends: d.suspends,
        available: available as u64,
    };
    VRNG_OK
}

/// System sleep (power state 0): the device is reset and its buffers freed (a virtio
/// device keeps nothing across the power transition); bytes not read are dropped.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_suspend(d: *mut VrngDevice) -> i32 {
    let Some(d) = dev(d) else {
        return VRNG_E_INVALID;
    };
    if d.stopped {
        return VRNG_E_STOPPED;
    }
    if !d.asleep {
        d.asleep = true;
        d.suspends += 1;
        d.shut_down();
    }
    VRNG_OK
}

/// Wake (power state 1): the device is initialised from scratch and every buffer posted.
/// An error leaves it asleep (resume may be retried).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_resume(d: *mut VrngDevice) -> i32 {
    let Some(d) = dev(d) else {
        return VRNG_E_INVALID;
    };
    if d.stopped {
        return VRNG_E_STOPPED;
    }
    if !d.asleep {
        return VRNG_OK;
    }
    match bring_up(d.family) {
        Ok(drv) => {
            d.drv = Some(drv);
            d.asleep = false;
            VRNG_OK
        }
        Err(e) => {
            log::error!("VirtioEntropy: cannot wake the device: {e}");
            VRNG_E_DEVICE
        }
    }
}

/// Stops the device: unregisters the interrupt entry, resets the device and frees its
/// buffers. Later reads fail with `VRNG_E_STOPPED`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_stop(d: *mut VrngDevice) {
    let Some(d) = dev(d) else { return };
    if d.stopped {
        return;
    }
    // SAFETY: the family handle outlives this device (vrng_create contract).
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(d.family, None, core::ptr::null_mut())
    };
    d.stopped = true;
    d.shut_down();
}

/// Frees the device (stopping it first if [`vrng_stop`] was not called).
///
/// # Safety
/// `d` is null or a handle from [`vrng_create`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vrng_destroy(d: *mut VrngDevice) {
    if d.is_null() {
        return;
    }
    // SAFETY: live handle (caller contract).
    unsafe { vrng_stop(d) };
    // SAFETY: from Box::into_raw in vrng_create, dropped once (caller contract).
    drop(unsafe { Box::from_raw(d) });
}

/// Routes `log` to `IOLog` (call once from the kext's start; a no-op in host builds).
#[unsafe(no_mangle)]
pub extern "C" fn vrng_log_init() {
    #[cfg(feature = "kext")]
    {
        static LOGGER: virtio_kext_abi::kernel::IoLogger = virtio_kext_abi::kernel::IoLogger {
            name: "VirtioEntropy",
            level: log::LevelFilter::Info,
        };
        virtio_kext_abi::kernel::init_logging(&LOGGER);
    }
}
