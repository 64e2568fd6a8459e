//! `VirtioFamily.kext`'s Rust half: the virtio PCI bus.
//!
//! The C++ shim (`kexts/VirtioFamily/shim/`) matches the PCI function, maps its BARs, and
//! hands this crate a [`VfamPlatform`] (config space, BARs, DMA, interrupts). From it,
//! [`vfam_device_create`] probes the function with `virtio-pci` and builds a
//! `virtio_core::VirtioDevice` — which owns the transport, feature negotiation and the
//! virtqueues. The shim publishes one nub per device carrying the opaque [`VfamDevice`]
//! handle, and every operation of `virtio_core::Bus` is exported as a `vfam_*` C function
//! taking that handle: the device kexts' Rust adapters (`virtio-kext-client`) implement
//! `Bus` over them.
//!
//! Threading: the shim calls everything for one device from its work loop (interrupt
//! actions, the clients' gated calls), so a handle is never used concurrently.
//!
//! Every function checks its pointers for null and reports errors as [`VkStatus`]; nothing
//! here panics on device or caller input.
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

mod platform;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::c_void;

use virtio_core::platform::{Dma, DmaRegion, InterruptMode};
use virtio_core::{Bus, Error, Features, QueueSpec, VirtioDevice};
use virtio_kext_abi::{
    VK_E_BAD_ARGUMENT, VK_IRQ_INTX, VK_IRQ_MSIX, VK_IRQ_POLLING, VkDmaRegion, VkInterruptCause,
    VkQueueSpec, VkQueueStats, VkSegment, VkStatus, as_segments, vector_from_abi,
};
use virtio_pci::{PciTransport, Preference, TransportKind};

pub use platform::{KextBars, KextConfig, KextDma, KextIrq, VfamPlatform};

/// Most segments one chain may carry through [`vfam_queue_add`] (its conversion buffer is
/// allocated once, at creation).
pub const VFAM_MAX_CHAIN: usize = 256;

/// `preference` of [`vfam_device_create`].
pub const VFAM_PREFER_AUTO: u32 = 0;
pub const VFAM_PREFER_MODERN: u32 = 1;
pub const VFAM_PREFER_LEGACY: u32 = 2;

/// [`vfam_transport_kind`] values.
pub const VFAM_TRANSPORT_MODERN: u32 = 1;
pub const VFAM_TRANSPORT_LEGACY: u32 = 2;

type Device = VirtioDevice<PciTransport<KextConfig, KextBars>, KextDma, KextIrq>;

/// Called by [`vfam_deliver_interrupt`] with the MSI-X vector index, or -1 for INTx.
pub type VfamInterruptHandler = Option<unsafe extern "C" fn(ctx: *mut c_void, vector: i32)>;
/// Receives each in-flight token on reset.
pub type VfamReclaim = Option<unsafe extern "C" fn(ctx: *mut c_void, queue: u16, token: usize)>;
/// Receives one completion of [`vfam_queue_drain`]: the chain's token and the bytes the
/// device wrote.
pub type VfamUsedHandler = Option<unsafe extern "C" fn(ctx: *mut c_void, token: usize, len: u32)>;

/// One virtio device on the PCI bus (opaque to C).
pub struct VfamDevice {
    bus: Device,
    handler: VfamInterruptHandler,
    handler_ctx: *mut c_void,
    kind: TransportKind,
    /// Sticky: a reset returned Err (the device ignored it and its DMA could not be
    /// stopped), so memory given to it — the rings the bus kept and the regions the
    /// clients leaked through [`vfam_dma_alloc`] — may still be read and written. Reported
    /// by [`vfam_device_destroy`] so the shim leaks, instead of freeing, every DMA buffer
    /// it still holds.
    may_dma: bool,
}

fn dev<'a>(p: *mut VfamDevice) -> Option<&'a mut VfamDevice> {
    // SAFETY: a non-null handle comes from `vfam_device_create` and stays valid until
    // `vfam_device_destroy`; the shim serialises all calls on one work loop.
    unsafe { p.as_mut() }
}

fn bad() -> VkStatus {
    VkStatus::code(VK_E_BAD_ARGUMENT)
}

/// Runs `f` on the device, or reports a null handle.
fn with(p: *mut VfamDevice, f: impl FnOnce(&mut VfamDevice) -> Result<(), Error>) -> VkStatus {
    match dev(p) {
        Some(d) => VkStatus::from_result(f(d)),
        None => bad(),
    }
}

/// Runs `f` on the device and writes its answer through `out`, or reports the error (then
/// `out` is left as it was).
fn answer<T>(
    p: *mut VfamDevice,
    out: *mut T,
    f: impl FnOnce(&mut VfamDevice) -> Result<T, Error>,
) -> VkStatus {
    with(p, |d| {
        put(out, f(d)?);
        Ok(())
    })
}

/// Writes through an optional out-pointer.
fn put<T>(out: *mut T, v: T) {
    // SAFETY: the caller passes null or a valid, writable pointer (C contract).
    if let Some(o) = unsafe { out.as_mut() } {
        *o = v;
    }
}

/// Slice from a C pointer/length pair (null allowed when `n` is 0).
fn slice<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if n == 0 {
        return Some(&[]);
    }
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller passes `n` valid elements at `p` (C contract).
    Some(unsafe { core::slice::from_raw_parts(p, n) })
}

/// The virtio device type (1 net, 2 block, ...) of a PCI function by its IDs, from
/// virtio-pci's ID table; 0 if it is not a virtio function this stack drives.
#[unsafe(no_mangle)]
pub extern "C" fn vfam_identify(vendor: u16, device: u16, subsystem_device: u16) -> u32 {
    virtio_pci::device_type(vendor, device, subsystem_device).map_or(0, |t| t as u32)
}

/// Whether the user asked for another driver (macOS's own, say) to take device type
/// `device_type`: `list` is the value of the `virtiodarwin_defer` boot-arg, comma- or
/// space-separated device type names (`net`, `blk`, `console`, `rng`, `balloon`, ...) or
/// numbers, or `all`. A null `list` defers nothing; unknown words are ignored.
///
/// # Safety
/// `list` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_type_deferred(
    device_type: u32,
    list: *const core::ffi::c_char,
) -> bool {
    if list.is_null() {
        return false;
    }
    // SAFETY: caller contract: a NUL-terminated string.
    let bytes = unsafe { core::ffi::CStr::from_ptr(list) }.to_bytes();
    type_in_list(device_type, bytes)
}

/// The parser behind [`vfam_type_deferred`].
fn type_in_list(device_type: u32, list: &[u8]) -> bool {
    list.split(|&b| b == b',' || b == b' ')
        .filter(|word| !word.is_empty())
        .any(|word| {
            word.eq_ignore_ascii_case(b"all")
                || core::str::from_utf8(word).is_ok_and(|w| w.parse::<u32>() == Ok(device_type))
                || virtio_core::DeviceType::from_id(device_type)
                    .is_some_and(|t| word.eq_ignore_ascii_case(t.name().as_bytes()))
        })
}

/// Probes the function behind `platform` (copied) and creates its device; `*out` receives
/// the handle. `preference`: `VFAM_PREFER_*`.
///
/// # Safety
/// `platform` must point to a valid [`VfamPlatform`] whose operations stay callable until
/// [`vfam_device_destroy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_device_create(
    platform: *const VfamPlatform,
    preference: u32,
    out: *mut *mut VfamDevice,
) -> VkStatus {
    put(out, core::ptr::null_mut());
    // SAFETY: caller contract.
    let Some(p) = (unsafe { platform.as_ref() }) else {
        return bad();
    };
    let Some((ops, bars)) = platform::Ops::new(p) else {
        return bad();
    };
    let pref = match preference {
        VFAM_PREFER_MODERN => Preference::Modern,
        VFAM_PREFER_LEGACY => Preference::Legacy,
        _ => Preference::Auto,
    };
    let t = match virtio_pci::probe(KextConfig(ops), KextBars { ops, bars }, pref) {
        Ok(t) => t,
        Err(e) => return Error::Transport(e).into(),
    };
    let kind = t.kind();
    let mut d = Box::new(VfamDevice {
        bus: VirtioDevice::new(t, KextDma(ops), KextIrq(ops)),
        handler: None,
        handler_ctx: core::ptr::null_mut(),
        kind,
        may_dma: false,
    });
    // §3.1.1 step 1, before anything else: firmware may have left the device running
    // (DRIVER_OK, its INTx line, shared with other functions, possibly asserted), and a
    // client kext may never come (not installed, not approved) to reset it. Linux resets at
    // registration too. Its DMA stays off until the device acknowledges (the shim turned
    // bus mastering off; `VirtioDevice` turns it on after the reset). Err: the device
    // ignored the reset and its DMA could not be stopped; nothing was given to it yet, but
    // the family remembers (`vfam_device_destroy`).
    d.may_dma = d.bus.reset(&mut |_, _| {}).is_err();
    put(out, Box::into_raw(d));
    VkStatus::OK
}

/// Resets the device, releases its queues and frees the handle.
///
/// `VK_OK`: the device can no longer touch memory, and no reset of it ever failed: the
/// shim may free every DMA buffer it still holds. `VK_E_RESET_TIMEOUT`: this reset, or an
/// earlier one ([`vfam_reset`]), was ignored by the device with its DMA not stopped: the
/// rings the bus kept and the regions the clients leaked may still be read and written,
/// so the shim must leak (never free nor unmap) every DMA buffer it still holds.
/// `VK_E_BAD_ARGUMENT` for a null handle (nothing done).
///
/// # Safety
/// `dev` comes from [`vfam_device_create`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_device_destroy(dev: *mut VfamDevice) -> VkStatus {
    if dev.is_null() {
        return bad();
    }
    // SAFETY: caller contract: the handle came from `Box::into_raw` and is dropped once.
    let mut d = unsafe { Box::from_raw(dev) };
    // On Err the bus keeps (leaks) the rings and logs it.
    if d.bus.reset(&mut |_, _| {}).is_err() {
        d.may_dma = true;
    }
    if d.may_dma {
        log::error!(
            "virtio {}: the device may still use memory; its DMA buffers must stay allocated",
            d.bus.device_type().name()
        );
        return Error::ResetTimeout.into();
    }
    VkStatus::OK
}

/// The device's virtio type (1 net, 2 block, ...), 0 for a null handle.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_device_type(dev: *mut VfamDevice) -> u32 {
    self::dev(dev).map_or(0, |d| d.bus.device_type() as u32)
}

/// `VFAM_TRANSPORT_MODERN` or `VFAM_TRANSPORT_LEGACY` (0 for a null handle).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_transport_kind(dev: *mut VfamDevice) -> u32 {
    self::dev(dev).map_or(0, |d| match d.kind {
        TransportKind::Modern => VFAM_TRANSPORT_MODERN,
        TransportKind::Legacy => VFAM_TRANSPORT_LEGACY,
    })
}

/// Sets (or clears, with a null `handler`) the client's interrupt handler.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_set_interrupt_handler(
    dev: *mut VfamDevice,
    handler: VfamInterruptHandler,
    ctx: *mut c_void,
) {
    if let Some(d) = self::dev(dev) {
        d.handler = handler;
        d.handler_ctx = ctx;
    }
}

/// Entry from the shim's interrupt actions: `vector` is the MSI-X index, -1 for INTx.
/// Calls the client's handler; without one, the interrupt is demultiplexed and dropped (for
/// INTx that reads the ISR, which de-asserts the line).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_deliver_interrupt(dev: *mut VfamDevice, vector: i32) {
    // Copy the handler out: the handler calls back into this device, so no reference to it
    // may be held across the call.
    let (handler, ctx) = match self::dev(dev) {
        Some(d) => (d.handler, d.handler_ctx),
        None => return,
    };
    match handler {
        // SAFETY: the client registered this handler with its context and clears it (under
        // the same work loop) before the context goes away.
        Some(h) => unsafe { h(ctx, vector) },
        None => {
            if let Some(d) = self::dev(dev) {
                d.bus.handle_interrupt(vector_from_abi(vector));
            }
        }
    }
}

/// Negotiates features up to FEATURES_OK (`Bus::negotiate_features`); `*negotiated`
/// receives the accepted set. On a device with queues it starts over: the device is reset
/// and every queue taken down without handing back what was in flight (call
/// [`vfam_reset`] first to reclaim it).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_negotiate_features(
    dev: *mut VfamDevice,
    driver: u64,
    negotiated: *mut u64,
) -> VkStatus {
    answer(dev, negotiated, |d| {
        Ok(d.bus
            .negotiate_features(Features::from_bits_retain(driver))?
            .bits())
    })
}

/// What the device offered (after negotiation).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_offered_features(dev: *mut VfamDevice) -> u64 {
    self::dev(dev).map_or(0, |d| d.bus.offered_features().bits())
}

/// The negotiated features.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_features(dev: *mut VfamDevice) -> u64 {
    self::dev(dev).map_or(0, |d| d.bus.features().bits())
}

/// Reads `len` bytes of device config at `offset`, consistent across `config_generation`.
///
/// # Safety
/// `buf` points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_read_config(
    dev: *mut VfamDevice,
    offset: u32,
    buf: *mut u8,
    len: usize,
) -> VkStatus {
    if buf.is_null() && len > 0 {
        return bad();
    }
    with(dev, |d| {
        let b = if len == 0 {
            &mut [][..]
        } else {
            // SAFETY: caller contract.
            unsafe { core::slice::from_raw_parts_mut(buf, len) }
        };
        d.bus.read_config(offset, b)
    })
}

/// Writes `len` bytes of device config at `offset`.
///
/// # Safety
/// `data` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_write_config(
    dev: *mut VfamDevice,
    offset: u32,
    data: *const u8,
    len: usize,
) -> VkStatus {
    let Some(data) = slice(data, len) else {
        return bad();
    };
    with(dev, |d| d.bus.write_config(offset, data))
}

/// Number of queues the device has.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_num_queues(dev: *mut VfamDevice) -> u16 {
    self::dev(dev).map_or(0, |d| d.bus.num_queues())
}

/// Maximum size of queue `index` (0: absent).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_max_queue_size(dev: *mut VfamDevice, index: u16) -> u16 {
    self::dev(dev).map_or(0, |d| d.bus.max_queue_size(index))
}

/// Allocates and programs `count` queues with MSI-X → shared → INTx → polling fallback.
///
/// # Safety
/// `specs` points to `count` valid entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_setup_queues(
    dev: *mut VfamDevice,
    specs: *const VkQueueSpec,
    count: usize,
) -> VkStatus {
    let Some(specs) = slice(specs, count) else {
        return bad();
    };
    let mut converted: Vec<QueueSpec> = Vec::with_capacity(specs.len());
    converted.extend(specs.iter().map(|s| {
        QueueSpec::new(s.index)
            .size(s.size)
            .interrupts(s.interrupts != 0)
            .indirect(s.max_indirect)
            .ignore_used_len(s.ignore_used_len != 0)
    }));
    with(dev, |d| d.bus.setup_queues(&converted))
}

/// Sets DRIVER_OK.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_driver_ok(dev: *mut VfamDevice) -> VkStatus {
    with(dev, |d| d.bus.driver_ok())
}

/// Resets the device and releases its queues; `reclaim` (may be null) receives every
/// in-flight token, whatever the outcome.
///
/// `VK_OK`: the device can no longer touch memory (it acknowledged the reset, or it did
/// not and its bus mastering was switched off). `VK_E_RESET_TIMEOUT`: it ignored the
/// reset and its DMA could not be stopped: the caller must neither free nor reuse any DMA
/// memory it gave the device (it leaks it); the family keeps the rings, and from then on
/// [`vfam_device_destroy`] reports VK_E_RESET_TIMEOUT so the shim keeps every DMA buffer.
/// See `virtio_core::Bus::reset`. `VK_E_BAD_ARGUMENT` for a null handle.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_reset(
    dev: *mut VfamDevice,
    reclaim: VfamReclaim,
    ctx: *mut c_void,
) -> VkStatus {
    with(dev, |d| {
        let r = d.bus.reset(&mut |q, t| {
            if let Some(f) = reclaim {
                // SAFETY: the caller's callback with its own context.
                unsafe { f(ctx, q, t) }
            }
        });
        // The client leaks what it gave the device; the shim must not free it at stop.
        d.may_dma |= r.is_err();
        r
    })
}

/// Sets FAILED.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_fail(dev: *mut VfamDevice) {
    if let Some(d) = self::dev(dev) {
        d.bus.fail();
    }
}

/// DEVICE_NEEDS_RESET is set.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_needs_reset(dev: *mut VfamDevice) -> bool {
    self::dev(dev).is_some_and(|d| d.bus.needs_reset())
}

/// `VK_IRQ_*`; for MSI-X `*vectors` receives the vector count.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_interrupt_mode(dev: *mut VfamDevice, vectors: *mut u16) -> u32 {
    let mode = self::dev(dev).map_or(InterruptMode::Polling, |d| d.bus.interrupt_mode());
    match mode {
        InterruptMode::MsiX { vectors: n } => {
            put(vectors, n);
            VK_IRQ_MSIX
        }
        InterruptMode::Intx => {
            put(vectors, 0);
            VK_IRQ_INTX
        }
        InterruptMode::Polling => {
            put(vectors, 0);
            VK_IRQ_POLLING
        }
    }
}

/// Adds a chain (`readable` then `writable` segments) tagged `token` to `queue`.
///
/// # Safety
/// `readable`/`writable` point to `nreadable`/`nwritable` valid segments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_add(
    dev: *mut VfamDevice,
    queue: u16,
    readable: *const VkSegment,
    nreadable: usize,
    writable: *const VkSegment,
    nwritable: usize,
    token: usize,
) -> VkStatus {
    let (Some(r), Some(w)) = (slice(readable, nreadable), slice(writable, nwritable)) else {
        return bad();
    };
    if r.len() + w.len() > VFAM_MAX_CHAIN {
        return Error::BadChain.into();
    }
    // The lists as they are: `VkSegment` has `Segment`'s layout.
    with(dev, |d| {
        d.bus.add(queue, as_segments(r), as_segments(w), token)
    })
}

/// Notifies the device if it asked to be; `*notified` says whether it did.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_kick(
    dev: *mut VfamDevice,
    queue: u16,
    notified: *mut bool,
) -> VkStatus {
    answer(dev, notified, |d| d.bus.kick(queue))
}

/// Next completion: `*found` false when none; else `*token` and `*len`.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_pop_used(
    dev: *mut VfamDevice,
    queue: u16,
    found: *mut bool,
    token: *mut usize,
    len: *mut u32,
) -> VkStatus {
    put(found, false);
    with(dev, |d| {
        if let Some(u) = d.bus.pop_used(queue)? {
            put(token, u.token);
            put(len, u.len);
            put(found, true);
        }
        Ok(())
    })
}

/// Pops every completion of `queue` and hands each to `handler` in device order, in one
/// call (`Bus::drain_used`): with `interrupts`, a peek first (nothing to pop: nothing
/// else), then the queue's interrupts suppressed while it drains and re-enabled race-free
/// at the end. The handler must not call into the family. An error status means the
/// device broke the queue's rules; the completions before it reached the handler.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; `handler` (if any) may be
/// called with `ctx` until this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_drain(
    dev: *mut VfamDevice,
    queue: u16,
    interrupts: bool,
    handler: VfamUsedHandler,
    ctx: *mut c_void,
) -> VkStatus {
    let Some(h) = handler else {
        return bad();
    };
    with(dev, |d| {
        d.bus
            .drain_used(queue, interrupts, |u| {
                // SAFETY: the client's handler with its own context (caller contract).
                unsafe { h(ctx, u.token, u.len) }
            })
            .map(drop)
    })
}

/// Whether `queue` may have completions to pop: `*maybe` from a peek at the used ring (no
/// barrier, nothing written), true for a broken queue (popping reports why). Lets a client
/// skip the disable / drain / re-enable calls, and the re-enable's fence, when a poll finds
/// nothing: on a shared INTx line every queue is polled on every interrupt.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_has_used(
    dev: *mut VfamDevice,
    queue: u16,
    maybe: *mut bool,
) -> VkStatus {
    answer(dev, maybe, |d| d.bus.has_used(queue))
}

/// Re-enables interrupts (`delayed`: after ~3/4 of the in-flight chains); `*more` true
/// when completions arrived meanwhile.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_enable_interrupts(
    dev: *mut VfamDevice,
    queue: u16,
    delayed: bool,
    more: *mut bool,
) -> VkStatus {
    answer(dev, more, |d| {
        if delayed {
            d.bus.enable_interrupts_delayed(queue)
        } else {
            d.bus.enable_interrupts(queue)
        }
    })
}

/// Suppresses interrupts of `queue`.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_disable_interrupts(
    dev: *mut VfamDevice,
    queue: u16,
) -> VkStatus {
    with(dev, |d| d.bus.disable_interrupts(queue))
}

/// Free descriptors, queue size, descriptors a chain of `segments` takes, longest chain.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_info(
    dev: *mut VfamDevice,
    queue: u16,
    segments: usize,
    free: *mut u16,
    size: *mut u16,
    descriptors: *mut usize,
    max_chain: *mut u16,
) -> VkStatus {
    with(dev, |d| {
        put(free, d.bus.free_descriptors(queue)?);
        put(size, d.bus.queue_size(queue)?);
        put(descriptors, d.bus.descriptors_for(queue, segments)?);
        put(max_chain, d.bus.max_chain(queue)?);
        Ok(())
    })
}

/// Counters of `queue`.
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_queue_stats(
    dev: *mut VfamDevice,
    queue: u16,
    stats: *mut VkQueueStats,
) -> VkStatus {
    answer(dev, stats, |d| Ok(d.bus.queue_stats(queue)?.into()))
}

/// Demultiplexes an interrupt (`vector`: MSI-X index, -1 for INTx/polling).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_handle_interrupt(
    dev: *mut VfamDevice,
    vector: i32,
    cause: *mut VkInterruptCause,
) -> VkStatus {
    with(dev, |d| {
        let c = d.bus.handle_interrupt(vector_from_abi(vector));
        put(
            cause,
            VkInterruptCause {
                queues_lo: c.queues.0 as u64,
                queues_hi: (c.queues.0 >> 64) as u64,
                config_changed: c.config_changed.into(),
                needs_reset: c.needs_reset.into(),
                reserved: [0; 6],
            },
        );
        Ok(())
    })
}

/// Coherent DMA memory for a client driver's own buffers (setup time only).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_dma_alloc(
    dev: *mut VfamDevice,
    len: usize,
    align: usize,
    out: *mut VkDmaRegion,
) -> VkStatus {
    with(dev, |d| {
        let r = d.bus.dma().alloc_coherent(len, align)?;
        put(
            out,
            VkDmaRegion {
                vaddr: r.vaddr.as_ptr(),
                daddr: r.daddr,
                len: r.len as u64,
            },
        );
        Ok(())
    })
}

/// Frees a region from [`vfam_dma_alloc`].
///
/// # Safety
/// The device no longer accesses the region and it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_dma_free(dev: *mut VfamDevice, region: *const VkDmaRegion) {
    // SAFETY: caller contract.
    let (Some(d), Some(r)) = (self::dev(dev), unsafe { region.as_ref() }) else {
        return;
    };
    let Some(vaddr) = core::ptr::NonNull::new(r.vaddr) else {
        return;
    };
    let region = DmaRegion {
        vaddr,
        daddr: r.daddr,
        len: r.len as usize,
    };
    // SAFETY: caller contract (the device is done with it).
    unsafe { d.bus.dma().free_coherent(region) }
}

/// Maps `len` bytes of kernel memory at `vaddr` for the device (`direction`: `VK_DMA_*`).
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_dma_map(
    dev: *mut VfamDevice,
    vaddr: *mut u8,
    len: usize,
    direction: u32,
    daddr: *mut u64,
) -> VkStatus {
    let Some(v) = core::ptr::NonNull::new(vaddr) else {
        return bad();
    };
    answer(dev, daddr, |d| {
        d.bus.dma().map(v, len, dma_direction(direction))
    })
}

/// Ends a mapping from [`vfam_dma_map`].
///
/// # Safety
/// `dev` is null or a live handle from [`vfam_device_create`]; pointer arguments are
/// null or valid for what they describe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfam_dma_unmap(
    dev: *mut VfamDevice,
    daddr: u64,
    len: usize,
    direction: u32,
) {
    if let Some(d) = self::dev(dev) {
        d.bus.dma().unmap(daddr, len, dma_direction(direction));
    }
}

fn dma_direction(d: u32) -> virtio_core::platform::DmaDirection {
    use virtio_core::platform::DmaDirection as D;
    match d {
        virtio_kext_abi::VK_DMA_TO_DEVICE => D::ToDevice,
        virtio_kext_abi::VK_DMA_FROM_DEVICE => D::FromDevice,
        _ => D::Bidirectional,
    }
}

/// Routes `log` to `IOLog` (call once from the kext's start; a no-op in host builds).
#[unsafe(no_mangle)]
pub extern "C" fn vfam_log_init() {
    #[cfg(feature = "kext")]
    {
        static LOGGER: virtio_kext_abi::kernel::IoLogger = virtio_kext_abi::kernel::IoLogger {
            name: "VirtioFamily",
            level: log::LevelFilter::Info,
        };
        virtio_kext_abi::kernel::init_logging(&LOGGER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_types_by_name_number_or_all() {
        assert!(type_in_list(1, b"net"));
        assert!(type_in_list(2, b"net,blk"));
        assert!(type_in_list(2, b"NET BLK"));
        assert!(type_in_list(4, b"4"));
        assert!(type_in_list(5, b"all"));
        assert!(!type_in_list(1, b"blk"));
        assert!(!type_in_list(1, b""));
        assert!(!type_in_list(1, b"network,,"));
        assert!(!type_in_list(99, b"net"));
        // SAFETY: a NUL-terminated literal, and null.
        unsafe {
            assert!(vfam_type_deferred(2, c"blk".as_ptr()));
            assert!(!vfam_type_deferred(2, core::ptr::null()));
        }
    }
}
