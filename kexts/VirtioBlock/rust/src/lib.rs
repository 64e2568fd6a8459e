//! `VirtioBlock.kext`'s Rust half: `virtio-blk`'s [`BlkDriver`] over the family's bus.
//!
//! The C++ shim (`kexts/VirtioBlock/shim/`, an `IOBlockStorageDevice` on the family's nub)
//! hands [`vblk_create`] the nub's device handle; this crate wraps it in a
//! [`FamilyBus`](virtio_kext_client::FamilyBus), brings the device up with [`BlkDriver`],
//! and registers its interrupt entry with the family. The shim then only translates:
//!
//! - `doAsyncReadWrite` → [`vblk_submit_rw`] with the request's `IODMACommand` segments and
//!   the shim's request context, completed through [`VblkCallbacks::complete`] from the
//!   interrupt path ([`vblk_interrupt`]);
//! - `doSynchronizeCache` → [`vblk_flush`], `doUnmap` → [`vblk_unmap`] (discard),
//!   `doSetWriteCacheState` → [`vblk_set_write_cache`], the `report*` / `get*String`
//!   methods → [`vblk_info`] (the serial number from GET_ID, [`vblk_request_id`]);
//! - `stop` → [`vblk_stop`] (every request still in flight completes as aborted), `free` →
//!   [`vblk_destroy`].
//!
//! Threading: the shim calls everything under its command gate on the family's work loop,
//! where the family also delivers interrupts, so a handle is never used concurrently.
//! Completion callbacks run after the driver has finished its own work (they are collected
//! first, then delivered), so a callback may submit the next request right away.
//!
//! Memory is allocated in [`vblk_create`] only; nothing here panics on device or caller
//! input.
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
use alloc::vec::Vec;
use core::ffi::c_void;

use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion, RangeCursor, Request, SectorRange};
use virtio_core::{Bus, Error, Features, QueueMask};
use virtio_kext_abi::{VkSegment, as_segments, vector_from_abi};
use virtio_kext_client::{FamilyBus, VfamDevice};

/// Statuses of the `vblk_*` functions and of completions.
pub const VBLK_OK: i32 = 0;
/// The device reported an I/O error (or a device/bus fault ended the request).
pub const VBLK_E_IO: i32 = 1;
/// The device cannot do this (no FLUSH, no DISCARD, no CONFIG_WCE, UNSUPP answer).
pub const VBLK_E_UNSUPPORTED: i32 = 2;
/// A write-type request on a read-only device.
pub const VBLK_E_READ_ONLY: i32 = 3;
/// Malformed request (not whole blocks, empty, a null pointer or handle).
pub const VBLK_E_INVALID: i32 = 4;
/// Beyond the capacity.
pub const VBLK_E_OUT_OF_RANGE: i32 = 5;
/// More segments/extents than one request may carry (see [`VblkInfo`]): split it.
pub const VBLK_E_TOO_LARGE: i32 = 6;
/// No room in the ring now: hold the request and resubmit it when
/// [`VblkCallbacks::restart`] is called.
pub const VBLK_E_BUSY: i32 = 7;
/// The request was in flight when the device was reset or stopped.
pub const VBLK_E_ABORTED: i32 = 8;
/// The device is stopped or broken (every later request fails the same way).
pub const VBLK_E_DEVICE: i32 = 9;

/// Most segments one read/write may carry (the bound of [`VblkInfo::max_segments`]).
pub const VBLK_MAX_SEGMENTS: u32 = 256;
/// Most extents one [`vblk_unmap`] call may carry.
pub const VBLK_MAX_EXTENTS: u32 = 64;

/// The shim's callbacks; `ctx` is passed back unchanged (the shim's driver object).
///
/// - `complete`: request `request` (the context given at submission) finished with
///   `status` (`VBLK_OK` or a `VBLK_E_*` code); called from [`vblk_interrupt`] and
///   [`vblk_stop`], never from inside a submission;
/// - `restart` (may be null): resubmit the held requests. Called when ring space was freed
///   after a submission returned `VBLK_E_BUSY`, after a recovery from a device fault, and
///   when that recovery failed (every resubmission then fails with `VBLK_E_DEVICE`, so
///   nothing stays held for ever);
/// - `capacity_changed` (may be null): the disk was resized to `blocks` logical blocks.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VblkCallbacks {
    pub ctx: *mut c_void,
    pub complete: Option<unsafe extern "C" fn(ctx: *mut c_void, request: *mut c_void, status: i32)>,
    pub restart: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
    pub capacity_changed: Option<unsafe extern "C" fn(ctx: *mut c_void, blocks: u64)>,
}

/// One extent of an unmap, in logical blocks (`IOBlockStorageDeviceExtent`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VblkExtent {
    pub block: u64,
    pub count: u64,
}

/// What the shim reports to IOKit. Strings are NUL-terminated UTF-8 (printable ASCII).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VblkInfo {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Segments one read/write may carry (at most [`VBLK_MAX_SEGMENTS`]).
    pub max_segments: u32,
    /// Capacity in logical blocks.
    pub block_count: u64,
    /// Largest segment the device takes whole (0: no limit; larger ones are split).
    pub max_segment_bytes: u64,
    /// Largest read/write in bytes the shim should issue.
    pub max_transfer_bytes: u64,
    /// Negotiated virtio features.
    pub features: u64,
    pub read_only: u8,
    /// The write cache is on (writeback).
    pub write_cache: u8,
    /// The cache mode can be changed (CONFIG_WCE).
    pub write_cache_settable: u8,
    /// FLUSH negotiated.
    pub flush: u8,
    /// DISCARD negotiated (`doUnmap` works).
    pub unmap: u8,
    /// GET_ID answered: `serial` holds the device ID.
    pub has_id: u8,
    pub reserved: [u8; 2],
    pub vendor: [u8; 16],
    pub product: [u8; 32],
    pub revision: [u8; 8],
    /// The 20-byte GET_ID string (empty until [`vblk_request_id`] completes).
    pub serial: [u8; 24],
}

/// Counters for the IORegistry (`Statistics`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VblkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub unmaps: u64,
    pub errors: u64,
    /// Submissions refused with `VBLK_E_BUSY`.
    pub busy: u64,
    pub interrupts: u64,
    pub kicks: u64,
    pub in_flight: u64,
}

/// One virtio block device (opaque to C).
pub struct VblkDevice {
    drv: BlkDriver<FamilyBus>,
    family: *mut VfamDevice,
    cb: VblkCallbacks,
    book: Book,
    /// Sector ranges of the unmap being built.
    ranges: Vec<SectorRange>,
    /// A submission was refused for lack of room: call `restart` after completions.
    blocked: bool,
    /// `vblk_stop` ran: the interrupt entry is unregistered, nothing is in flight.
    stopped: bool,
    /// The device could not be brought back after a fault: every request fails with
    /// `VBLK_E_DEVICE` until `vblk_stop` (which still unregisters the interrupt entry).
    failed: bool,
    /// The transfer limits [`vblk_info`] last worked out from a live queue, reported while
    /// the device has none (asleep, failed, stopped): the shim sizes the requests it holds
    /// by them, and limits of a missing queue (one segment) would fail them as too large.
    limits: Limits,
    /// The capacity (sectors) the shim was last told of, at creation or through
    /// `capacity_changed`: the driver's own value may have moved on without a report (a wake
    /// that read the new configuration and then failed, a recovery from a fault), so every
    /// successful wake and recovery compares against this one.
    reported_sectors: u64,
}

/// [`VblkInfo`]'s transfer limits.
#[derive(Copy, Clone, Debug, Default)]
struct Limits {
    max_segments: u32,
    max_segment_bytes: u64,
    max_transfer_bytes: u64,
}

/// Completion bookkeeping, apart from the driver so its callbacks can fill it.
struct Book {
    /// Completions collected while the driver works, delivered afterwards.
    done: Vec<(usize, i32)>,
    /// The request whose GET_ID answer goes to `id`.
    id_request: usize,
    id: Option<[u8; 20]>,
    stats: VblkStats,
    /// The unmap going to the device in shares, while a share after the one on the ring
    /// remains.
    unmap: Option<LongUnmap>,
}

/// An unmap needing more device requests than fit in half the ring, or in the room the ring
/// has at the time ([`vblk_unmap`]), goes in shares, one after another, so that no discard
/// is too long for the ring (a whole-disk trim where the device takes one range of a few GiB
/// per request) and none waits for room other I/O may never leave. Its sector ranges stay
/// in [`VblkDevice::ranges`] until the last share is on the ring.
#[derive(Copy, Clone, Debug)]
struct LongUnmap {
    /// The shim's request: every share carries it, and it completes once, with the last
    /// share or the first that fails.
    request: usize,
    /// Where the next share begins.
    next: RangeCursor,
    /// The share on the ring completed OK: the next one is to be sent
    /// ([`VblkDevice::continue_unmap`]).
    due: bool,
}

impl Book {
    fn record(&mut self, token: usize, r: Result<Completion, BlkError>) {
        let status = match r {
            Ok(Completion::Id(id)) => {
                if token == self.id_request {
                    self.id = Some(id.0);
                }
                VBLK_OK
            }
            Ok(_) => VBLK_OK,
            Err(e) => status_of(e),
        };
        self.finish(token, status);
    }

    /// Request `token` ends with `status`: collected for delivery.
    fn finish(&mut self, token: usize, status: i32) {
        if status != VBLK_OK {
            self.stats.errors += 1;
        }
        self.stats.in_flight = self.stats.in_flight.saturating_sub(1);
        // One entry per request slot, and one for a long unmap whose next share waits for
        // room (it holds no slot then), was reserved at creation and after every rebuild of
        // the queue (`fit_queue`): no batch completes more requests than that.
        if self.done.len() < self.done.capacity() {
            self.done.push((token, status));
        } else {
            log::error!("VirtioBlock: completion list full; request {token:#x} lost");
        }
    }
}

impl Book {
    /// After completions were recorded: a share of the long unmap that completed OK among
    /// them is not the end of its request. It is taken back out of `done` (and counted in
    /// flight again), and the next share is due; a failed share ends the request, whose
    /// completion stays. Once per batch, not in `record` (every completion would pay for
    /// the test: `bench kext`, 3 instructions per read at depth 32).
    fn settle_unmap(&mut self) {
        let Some(u) = self.unmap.as_mut() else {
            return;
        };
        let Some(at) = self.done.iter().position(|&(t, _)| t == u.request) else {
            return;
        };
        if self
            .done
            .get(at)
            .is_some_and(|&(_, status)| status == VBLK_OK)
        {
            // Shifts the later completions down, keeping their order; allocates nothing.
            self.done.remove(at);
            self.stats.in_flight += 1;
            u.due = true;
        } else {
            self.unmap = None;
        }
    }

    /// After a reset (stop, sleep, a device fault), which completed every share on the ring:
    /// a long unmap still here has its next share due, and ends aborted (the shim sends it
    /// again after a sleep).
    fn abandon_unmap(&mut self) {
        self.settle_unmap();
        if let Some(u) = self.unmap.take() {
            self.finish(u.request, VBLK_E_ABORTED);
        }
    }

    /// After the queue was rebuilt (restart, resume): room for one completion per slot of
    /// its new size, which the device may have made larger than at creation, and one more
    /// ([`completion_entries`]). A failed allocation is logged, not fatal (a kernel panic
    /// would be worse than a lost entry).
    fn fit_queue(&mut self, drv: &BlkDriver<FamilyBus>) {
        let entries = completion_entries(drv.bus().queue_size(0).unwrap_or(0));
        let missing = entries.saturating_sub(self.done.capacity());
        if missing > 0
            && self
                .done
                .try_reserve_exact(entries - self.done.len())
                .is_err()
        {
            log::error!("VirtioBlock: no memory for {entries} completion entries");
        }
    }
}

/// Completions one batch may hold on a queue of `slots` entries: every request in flight
/// holds at least one slot, except a long unmap whose next share waits for room
/// ([`LongUnmap::due`]), which holds none; a reset (sleep, stop, a fault) completes all of
/// them at once.
fn completion_entries(slots: u16) -> usize {
    usize::from(slots.max(1)) + 1
}

fn dev<'a>(p: *mut VblkDevice) -> Option<&'a mut VblkDevice> {
    // SAFETY: a non-null handle comes from `vblk_create` and stays valid until
    // `vblk_destroy`; the shim serialises every call on its work loop.
    unsafe { p.as_mut() }
}

fn status_of(e: BlkError) -> i32 {
    match e {
        BlkError::Io => VBLK_E_IO,
        BlkError::Unsupported => VBLK_E_UNSUPPORTED,
        BlkError::ReadOnly => VBLK_E_READ_ONLY,
        BlkError::InvalidRequest => VBLK_E_INVALID,
        BlkError::OutOfRange => VBLK_E_OUT_OF_RANGE,
        BlkError::TooLarge => VBLK_E_TOO_LARGE,
        BlkError::QueueFull => VBLK_E_BUSY,
        BlkError::NoSuchQueue { .. } => VBLK_E_INVALID,
        BlkError::Aborted => VBLK_E_ABORTED,
        BlkError::Virtio(Error::InvalidState) => VBLK_E_DEVICE,
        BlkError::Virtio(_) => VBLK_E_IO,
    }
}

fn copy_str(dst: &mut [u8], s: &[u8]) {
    let n = s.len().min(dst.len().saturating_sub(1));
    for (d, &b) in dst.iter_mut().zip(s.iter().take(n)) {
        *d = if (0x20..0x7f).contains(&b) { b } else { b'?' };
    }
    if let Some(z) = dst.get_mut(n) {
        *z = 0;
    }
}

/// The family calls this (registered by [`vblk_create`]) from its interrupt actions.
unsafe extern "C" fn family_interrupt(ctx: *mut c_void, vector: i32) {
    // SAFETY: ctx is the VblkDevice registered in vblk_create and unregistered (on the same
    // work loop) before it is freed.
    unsafe { vblk_interrupt(ctx.cast(), vector) }
}

impl VblkDevice {
    fn block_sectors(&self) -> u64 {
        u64::from(self.drv.info().block_sectors().max(1))
    }

    /// Device requests of `segments` segments each (`[header, ..., status]`) that fit in half
    /// the ring, at least one: what one request of the shim's may take, leaving the rest to
    /// others. Counted in ring descriptors, not only in request slots: without
    /// VIRTIO_F_INDIRECT_DESC every segment takes a descriptor of its own (§2.7.5).
    fn half_ring_parts(&self, segments: usize) -> usize {
        let bus = self.drv.bus();
        let size = usize::from(bus.queue_size(0).unwrap_or(0));
        let per = bus.descriptors_for(0, segments).unwrap_or(segments).max(1);
        (size / per / 2).max(1)
    }

    /// Device requests of an unmap's share: at most half the ring, and no more than fit now,
    /// at least one (with none free, `submit_ranges_from` answers `QueueFull`). A share
    /// waiting for a fixed size would wait for ever under I/O that keeps more than half the
    /// ring busy; one of what fits goes at once (the share before it just freed room).
    fn unmap_share(&self) -> usize {
        // Header, the range array, status.
        let room = self.drv.room_for(0, 3).unwrap_or(0);
        self.half_ring_parts(3).min(room).max(1)
    }

    /// Sends the next share of the long unmap whose share on the ring completed OK (after
    /// the completions of an interrupt were recorded), as large as fits now
    /// ([`VblkDevice::unmap_share`]). With no room at all (other requests hold the ring) it
    /// stays due: their completions interrupt, and the next interrupt tries again. Out of
    /// line: most interrupts have no long unmap to see to.
    #[inline(never)]
    fn continue_unmap(&mut self) {
        self.book.settle_unmap();
        let Some(job) = self.book.unmap.filter(|u| u.due) else {
            return;
        };
        let share = self.unmap_share();
        let VblkDevice {
            drv, ranges, book, ..
        } = self;
        let req = Request::Discard { ranges };
        match drv.submit_ranges_from(0, req, job.next, share, job.request) {
            Ok(rest) => {
                if drv.kick(0).unwrap_or(false) {
                    book.stats.kicks += 1;
                }
                book.unmap = rest.map(|next| LongUnmap {
                    next,
                    due: false,
                    ..job
                });
            }
            Err(BlkError::QueueFull) => {}
            Err(e) => {
                book.unmap = None;
                book.finish(job.request, status_of(e));
            }
        }
    }

    /// The transfer limits: worked out from the queue while the device has one, else the
    /// last ones that were (`limits`).
    fn limits(&mut self) -> Limits {
        if self.stopped || self.failed || self.drv.is_suspended() {
            return self.limits;
        }
        let Ok(per_part) = self.drv.max_segments(0) else {
            return self.limits;
        };
        // Data segments per device request, and how many such requests one read or write
        // may take: half the ring, in descriptors (`[header, data..., status]` each).
        let per_part = per_part.max(1);
        let parts = self.half_ring_parts(per_part + 2);
        // The driver cuts a request into device requests of whole blocks
        // (`virtio_blk::split`): a part after the first may begin with the rest of a segment
        // its predecessor was cut back from to a block boundary, leaving it one descriptor
        // fewer for segments of its own. Exact when every segment but the first and the last
        // is whole blocks (what IODMACommand makes of a buffer, with blocks no larger than a
        // page).
        let max_segments = if per_part > 1 {
            parts.saturating_mul(per_part - 1).saturating_add(1)
        } else {
            parts
        };
        let max_segments = max_segments.min(VBLK_MAX_SEGMENTS as usize) as u32;
        let i = self.drv.info();
        let block_size = u64::from(i.block_size);
        // At most 1 MiB per I/O, whole blocks, and never more parts than half the ring.
        let seg_bytes = i.size_max.map_or(0, u64::from);
        let mut max_bytes: u64 = 1 << 20;
        if seg_bytes != 0 {
            max_bytes = max_bytes.min(seg_bytes.saturating_mul(max_segments.into()));
        }
        max_bytes = (max_bytes / block_size.max(1)).max(1) * block_size;
        self.limits = Limits {
            max_segments,
            max_segment_bytes: seg_bytes,
            max_transfer_bytes: max_bytes,
        };
        self.limits
    }

    /// Tells the shim of a capacity other than the one it was last told of (after a
    /// configuration change, a wake, a recovery). Out of line: rare.
    #[inline(never)]
    fn report_capacity(p: *mut VblkDevice) {
        let Some(d) = dev(p) else { return };
        let sectors = d.drv.info().capacity;
        if sectors == d.reported_sectors {
            return;
        }
        d.reported_sectors = sectors;
        let cb = d.cb;
        let blocks = sectors / d.block_sectors();
        if let Some(f) = cb.capacity_changed {
            // SAFETY: the shim's callback with its own context.
            unsafe { f(cb.ctx, blocks) };
        }
    }

    /// Runs a submission; on success kicks the device.
    fn submit(&mut self, f: impl FnOnce(&mut Self) -> Result<(), BlkError>) -> i32 {
        if self.stopped || self.failed {
            return VBLK_E_DEVICE;
        }
        match f(self) {
            Ok(()) => {
                if self.drv.kick(0).unwrap_or(false) {
                    self.book.stats.kicks += 1;
                }
                self.book.stats.in_flight += 1;
                VBLK_OK
            }
            Err(BlkError::QueueFull) => {
                self.blocked = true;
                self.book.stats.busy += 1;
                VBLK_E_BUSY
            }
            Err(e) => status_of(e),
        }
    }

    /// Delivers collected completions with no borrow of the driver held (a callback may
    /// re-enter with a new submission).
    fn deliver(p: *mut VblkDevice) {
        let Some(d) = dev(p) else { return };
        let mut done = core::mem::take(&mut d.book.done);
        let cb = d.cb;
        // After a failed recovery too: the shim then resubmits what it holds, each request
        // fails with `VBLK_E_DEVICE` and goes up, instead of waiting for ever.
        let restart = d.blocked && !d.stopped && (d.failed || !done.is_empty());
        if restart {
            d.blocked = false;
        }
        for &(token, status) in &done {
            if let Some(f) = cb.complete {
                // SAFETY: the shim's callback with its own context; `token` is the request
                // context it submitted.
                unsafe { f(cb.ctx, token as *mut c_void, status) };
            }
        }
        done.clear();
        if let Some(d) = dev(p) {
            // Keep the larger buffer (the one reserved at creation).
            if done.capacity() >= d.book.done.capacity() {
                d.book.done = done;
            }
        }
        if restart && let Some(f) = cb.restart {
            // SAFETY: the shim's callback with its own context.
            unsafe { f(cb.ctx) };
        }
    }
}

/// Brings up the block device behind the family handle `family` (the nub's
/// `virtioDevice()`), registers the interrupt entry with the family, and returns the
/// handle in `*out`.
///
/// # Safety
/// `family` is a live family handle that outlives the returned device; `callbacks` points to
/// valid callbacks whose `ctx` stays valid until [`vblk_destroy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_create(
    family: *mut VfamDevice,
    callbacks: *const VblkCallbacks,
    out: *mut *mut VblkDevice,
) -> i32 {
    // SAFETY: null or valid (C contract).
    if let Some(o) = unsafe { out.as_mut() } {
        *o = core::ptr::null_mut();
    } else {
        return VBLK_E_INVALID;
    }
    // SAFETY: null or valid (C contract).
    let Some(cb) = (unsafe { callbacks.as_ref() }).copied() else {
        return VBLK_E_INVALID;
    };
    if cb.complete.is_none() {
        return VBLK_E_INVALID;
    }
    // SAFETY: caller contract: a live handle that outlives the bus.
    let Some(bus) = (unsafe { FamilyBus::new(family) }) else {
        return VBLK_E_INVALID;
    };
    let opts = BlkOptions {
        max_queues: 1,
        ..BlkOptions::default()
    };
    let drv = match BlkDriver::new(bus, opts) {
        Ok(d) => d,
        Err(e) => {
            log::error!("VirtioBlock: device setup failed: {e}");
            return status_of(e);
        }
    };
    let slots = drv.bus().queue_size(0).unwrap_or(0);
    let reported_sectors = drv.info().capacity;
    let mut d = Box::new(VblkDevice {
        drv,
        family,
        cb,
        book: Book {
            done: Vec::with_capacity(completion_entries(slots)),
            id_request: 0,
            id: None,
            stats: VblkStats::default(),
            unmap: None,
        },
        ranges: Vec::with_capacity(VBLK_MAX_EXTENTS as usize),
        blocked: false,
        stopped: false,
        failed: false,
        limits: Limits::default(),
        reported_sectors,
    });
    d.limits();
    let raw: *mut VblkDevice = &mut *d;
    // SAFETY: live family handle; the context is the boxed device, unregistered in
    // vblk_stop / vblk_destroy before it is freed.
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(
            family,
            Some(family_interrupt),
            raw.cast(),
        )
    };
    // SAFETY: checked non-null above.
    unsafe { *out = Box::into_raw(d) };
    VBLK_OK
}

/// Fills `*out` with what the shim reports to IOKit.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_info(d: *mut VblkDevice, out: *mut VblkInfo) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VBLK_E_INVALID;
    };
    let i = *d.drv.info();
    let bs = d.block_sectors();
    let limits = d.limits();
    let mut info = VblkInfo {
        block_size: i.block_size,
        max_segments: limits.max_segments,
        // What the shim was told of: the driver's value may be one a failed wake read.
        block_count: d.reported_sectors / bs,
        max_segment_bytes: limits.max_segment_bytes,
        max_transfer_bytes: limits.max_transfer_bytes,
        features: d.drv.features().bits(),
        read_only: i.read_only.into(),
        write_cache: i.writeback.into(),
        write_cache_settable: i.config_wce.into(),
        flush: i.flush.into(),
        unmap: i.discard.is_some().into(),
        has_id: d.book.id.is_some().into(),
        ..VblkInfo::default()
    };
    copy_str(&mut info.vendor, b"Virtio");
    copy_str(&mut info.product, b"Virtio Block Device");
    let rev: &[u8] = if d.drv.features().contains(Features::VERSION_1) {
        b"1.0"
    } else {
        b"0.9.5"
    };
    copy_str(&mut info.revision, rev);
    if let Some(id) = &d.book.id {
        let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
        copy_str(&mut info.serial, id.get(..end).unwrap_or(&[]));
    }
    *out = info;
    VBLK_OK
}

/// Counters for the IORegistry.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_stats(d: *mut VblkDevice, out: *mut VblkStats) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VBLK_E_INVALID;
    };
    let mut s = d.book.stats;
    if let Ok(q) = d.drv.queue_stats(0) {
        s.interrupts = q.interrupts;
        s.kicks = q.kicks;
    }
    *out = s;
    VBLK_OK
}

/// Asks the device for its ID (GET_ID); `request` completes through
/// [`VblkCallbacks::complete`], after which [`vblk_info`] reports it as `serial`.
///
/// # Safety
/// `d` is null or a live handle; `request` is a non-null context of the shim's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_request_id(d: *mut VblkDevice, request: *mut c_void) -> i32 {
    let Some(d) = dev(d) else {
        return VBLK_E_INVALID;
    };
    if request.is_null() {
        return VBLK_E_INVALID;
    }
    let token = request as usize;
    d.book.id_request = token;
    d.submit(|d| d.drv.get_id(0, token))
}

/// Queues a read (`write` false) or write of `blocks` logical blocks at `block`, moving
/// data through the `nsegs` device-address segments at `segs` (the shim's `IODMACommand`
/// segments; they stay mapped until `request` completes). Kicks the device.
///
/// Returns `VBLK_OK` (the request completes later through the callback), `VBLK_E_BUSY`
/// (hold it and resubmit on `restart`), or an error (the request is not queued).
///
/// # Safety
/// `d` is null or a live handle; `segs` points to `nsegs` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_submit_rw(
    d: *mut VblkDevice,
    write: bool,
    block: u64,
    blocks: u64,
    segs: *const VkSegment,
    nsegs: usize,
    request: *mut c_void,
) -> i32 {
    let Some(d) = dev(d) else {
        return VBLK_E_INVALID;
    };
    if request.is_null() || segs.is_null() || nsegs == 0 || blocks == 0 {
        return VBLK_E_INVALID;
    }
    if nsegs > VBLK_MAX_SEGMENTS as usize {
        return VBLK_E_TOO_LARGE;
    }
    // SAFETY: caller contract: `nsegs` valid entries.
    let src = unsafe { core::slice::from_raw_parts(segs, nsegs) };
    let bs = d.block_sectors();
    let bytes: u64 = src.iter().map(|s| u64::from(s.len)).sum();
    let block_bytes = u64::from(d.drv.info().block_size);
    if blocks.checked_mul(block_bytes) != Some(bytes) {
        return VBLK_E_INVALID;
    }
    let Some(sector) = block.checked_mul(bs) else {
        return VBLK_E_OUT_OF_RANGE;
    };
    // The shim's list as it is: `VkSegment` has `Segment`'s layout.
    let segs = as_segments(src);
    let token = request as usize;
    let r = d.submit(|d| {
        if write {
            d.drv.write(0, sector, segs, token)
        } else {
            d.drv.read(0, sector, segs, token)
        }
    });
    if r == VBLK_OK {
        if write {
            d.book.stats.writes += 1;
        } else {
            d.book.stats.reads += 1;
        }
    }
    r
}

/// Queues a cache flush. `VBLK_E_UNSUPPORTED` when the device has no write cache to flush
/// (FLUSH not negotiated: writes are durable on completion).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_flush(d: *mut VblkDevice, request: *mut c_void) -> i32 {
    let Some(d) = dev(d) else {
        return VBLK_E_INVALID;
    };
    if request.is_null() {
        return VBLK_E_INVALID;
    }
    if !d.drv.info().flush {
        return VBLK_E_UNSUPPORTED;
    }
    let token = request as usize;
    let r = d.submit(|d| d.drv.flush(0, token));
    if r == VBLK_OK {
        d.book.stats.flushes += 1;
    }
    r
}

/// Queues a discard of `count` extents (logical blocks), at most [`VBLK_MAX_EXTENTS`], of
/// any length. One needing more device requests than fit in half the ring, or than fit in
/// the ring now (the device's `max_discard_sectors` and `max_discard_seg` cut it), goes in
/// shares of at most half the ring and no more than fit at the time, each sent when the one
/// before completed OK; `request` completes once, after the last share or the first that
/// failed. Such an unmap keeps its extents until its last share is on the ring: another
/// unmap meanwhile answers `VBLK_E_BUSY` (resubmit it on `restart`).
///
/// # Safety
/// `d` is null or a live handle; `extents` points to `count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_unmap(
    d: *mut VblkDevice,
    extents: *const VblkExtent,
    count: usize,
    request: *mut c_void,
) -> i32 {
    let Some(d) = dev(d) else {
        return VBLK_E_INVALID;
    };
    if request.is_null() || extents.is_null() || count == 0 {
        return VBLK_E_INVALID;
    }
    if d.drv.info().discard.is_none() {
        return VBLK_E_UNSUPPORTED;
    }
    if count > VBLK_MAX_EXTENTS as usize {
        return VBLK_E_TOO_LARGE;
    }
    if d.book.unmap.is_some() {
        // `ranges` holds the long unmap's extents; `restart` comes once it no longer does.
        return d.submit(|_| Err(BlkError::QueueFull));
    }
    // SAFETY: caller contract: `count` valid entries.
    let src = unsafe { core::slice::from_raw_parts(extents, count) };
    let bs = d.block_sectors();
    d.ranges.clear();
    for e in src {
        match (e.block.checked_mul(bs), e.count.checked_mul(bs)) {
            (Some(s), Some(n)) => d.ranges.push(SectorRange::new(s, n)),
            _ => return VBLK_E_OUT_OF_RANGE,
        }
    }
    let token = request as usize;
    let share = d.unmap_share();
    let mut rest = None;
    let r = d.submit(|d| {
        let VblkDevice { drv, ranges, .. } = d;
        let req = Request::Discard { ranges };
        rest = drv.submit_ranges_from(0, req, RangeCursor::default(), share, token)?;
        Ok(())
    });
    if r == VBLK_OK {
        d.book.stats.unmaps += 1;
        d.book.unmap = rest.map(|next| LongUnmap {
            request: token,
            next,
            due: false,
        });
    }
    r
}

/// Turns the device's write cache on (writeback) or off (write-through); needs
/// CONFIG_WCE. The device's configuration is not touched while it is reset (§5.2.5.1):
/// asleep, `VBLK_E_BUSY` (ask again after [`vblk_resume`]); stopped or failed,
/// `VBLK_E_DEVICE`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_set_write_cache(d: *mut VblkDevice, enable: bool) -> i32 {
    let Some(d) = dev(d) else {
        return VBLK_E_INVALID;
    };
    // Failed after a failed wake, the driver is still suspended and would answer
    // `QueueFull`: the shim would wait for a wake that has already come.
    if d.stopped || d.failed {
        return VBLK_E_DEVICE;
    }
    // Asleep, the driver refuses with `QueueFull` (→ `VBLK_E_BUSY`).
    match d.drv.set_writeback(enable) {
        Ok(()) => VBLK_OK,
        Err(e) => status_of(e),
    }
}

/// The interrupt entry (the family calls it through the handler [`vblk_create`]
/// registered; `vector` is the MSI-X index or -1 for INTx): demultiplexes, completes
/// finished requests through the callback, reports a capacity change, sends the next share
/// of a long unmap, and recovers from DEVICE_NEEDS_RESET or a broken queue (in-flight
/// requests complete as aborted). Asleep, the device is reset and an interrupt means
/// nothing to it (the driver only acknowledges it).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_interrupt(d: *mut VblkDevice, vector: i32) {
    let p = d;
    let Some(d) = dev(p) else { return };
    if d.stopped || d.failed {
        return;
    }
    let (mut capacity, mut broken, queues) = match d.drv.handle_interrupt(vector_from_abi(vector)) {
        Ok(cause) => (
            cause.capacity_changed.is_some(),
            cause.needs_reset,
            cause.queues,
        ),
        Err(e) => {
            // The configuration could not be re-read; the interrupt (read, and so
            // acknowledged, from the ISR on INTx) may also have announced completions:
            // poll the queue anyway, or they would wait for an unrelated interrupt.
            log::warn!("VirtioBlock: interrupt: {e}");
            let mut queue = QueueMask::default();
            queue.insert(0);
            (false, false, queue)
        }
    };
    if !broken {
        let VblkDevice { drv, book, .. } = &mut *d;
        for q in queues.iter() {
            if drv.poll_completions(q, |t, r| book.record(t, r)).is_err() {
                broken = true;
            }
        }
    }
    if broken {
        log::warn!("VirtioBlock: device fault; aborting in-flight requests and restarting");
        let VblkDevice { drv, book, .. } = &mut *d;
        drv.abort_all(|t, r| book.record(t, r));
        book.abandon_unmap();
        match drv.restart() {
            // The shim resubmits what it holds.
            Ok(_) => {
                d.blocked = true;
                d.book.fit_queue(&d.drv);
                // The configuration was read afresh: a resize meanwhile is reported.
                capacity = true;
            }
            Err(e) => {
                log::error!("VirtioBlock: restart failed: {e}");
                d.failed = true;
            }
        }
    } else if d.book.unmap.is_some() {
        d.continue_unmap();
    }
    VblkDevice::deliver(p);
    if capacity {
        VblkDevice::report_capacity(p);
    }
}

/// Stops the device: unregisters the interrupt entry, resets the device and completes
/// every request still in flight with `VBLK_E_ABORTED`. Later submissions fail with
/// `VBLK_E_DEVICE`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_stop(d: *mut VblkDevice) {
    let p = d;
    let Some(d) = dev(p) else { return };
    if d.stopped {
        return;
    }
    // SAFETY: the family handle outlives this device (vblk_create contract).
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(d.family, None, core::ptr::null_mut())
    };
    d.stopped = true;
    let VblkDevice { drv, book, .. } = &mut *d;
    drv.abort_all(|t, r| book.record(t, r));
    book.abandon_unmap();
    VblkDevice::deliver(p);
}

/// Polls of every queue [`vblk_suspend`] spends waiting for requests in flight before it
/// resets the device (the kext has no clock to give the crate).
pub const VBLK_SUSPEND_DRAIN_POLLS: u32 = 10_000;

/// System sleep (the device's power state 0): new requests answer `VBLK_E_BUSY` (the shim
/// holds them, in order, as it does when the ring is full), requests in flight complete
/// through `complete` — with their result, or `VBLK_E_ABORTED` for those the reset cut off,
/// which the shim resubmits after [`vblk_resume`] — and the device is reset. A device that
/// failed for good (a failed recovery) has nothing to quiesce: `VBLK_OK`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_suspend(d: *mut VblkDevice) -> i32 {
    let p = d;
    let Some(d) = dev(p) else {
        return VBLK_E_INVALID;
    };
    if d.stopped {
        return VBLK_E_DEVICE;
    }
    if d.failed {
        // Already reset, nothing in flight: nothing to quiesce.
        return VBLK_OK;
    }
    let VblkDevice { drv, book, .. } = &mut *d;
    let status = match drv.suspend(VBLK_SUSPEND_DRAIN_POLLS, |t, r| book.record(t, r)) {
        Ok(r) => {
            log::info!(
                "VirtioBlock: asleep ({} requests completed, {} cut off by the reset)",
                r.completed,
                r.aborted
            );
            VBLK_OK
        }
        Err(e) => status_of(e),
    };
    book.abandon_unmap();
    VblkDevice::deliver(p);
    status
}

/// Wake (power state 1): the device is initialised from scratch (same features, all
/// queues rebuilt, configuration re-read: a capacity change while asleep is reported
/// through `capacity_changed`); then the shim resubmits what it held. A device that failed
/// for good (a failed recovery, or an earlier failed wake) is tried again the same way.
///
/// `VBLK_E_DEVICE` when the device did not come back (it offers fewer features, refuses
/// FEATURES_OK, reports a bad configuration, or memory ran out): it is left reset and
/// FAILED, and the driver failed: the shim is awake all the same and resubmits what it
/// holds, which then fails with `VBLK_E_DEVICE` rather than staying held for ever; the next
/// wake tries the device again. `VBLK_OK` on a device that is awake already.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_resume(d: *mut VblkDevice) -> i32 {
    let Some(dv) = dev(d) else {
        return VBLK_E_INVALID;
    };
    if dv.stopped {
        return VBLK_E_DEVICE;
    }
    // Still suspended (asleep, or a failed wake): the features of before, as the shim has
    // reported the disk with them. Failed while awake (a failed recovery): from scratch.
    let woken = if dv.drv.is_suspended() {
        dv.drv.resume().map(drop)
    } else if dv.failed {
        dv.drv.restart().map(drop)
    } else {
        return VBLK_OK;
    };
    if let Err(e) = woken {
        log::error!("VirtioBlock: the device did not come back after wake: {e}");
        dv.failed = true;
        return VBLK_E_DEVICE;
    }
    dv.failed = false;
    dv.book.fit_queue(&dv.drv);
    // Against what the shim was told, not the driver's value before this wake: a failed wake
    // before this one may have read the new capacity already.
    VblkDevice::report_capacity(d);
    VBLK_OK
}

/// Frees the device (stopping it first if [`vblk_stop`] was not called; the device is
/// reset and its memory returned to the family).
///
/// # Safety
/// `d` is null or a handle from [`vblk_create`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vblk_destroy(d: *mut VblkDevice) {
    if d.is_null() {
        return;
    }
    // SAFETY: live handle (caller contract).
    unsafe { vblk_stop(d) };
    // SAFETY: from Box::into_raw in vblk_create, dropped once (caller contract).
    drop(unsafe { Box::from_raw(d) });
}

/// Routes `log` to `IOLog` (call once from the kext's start; a no-op in host builds).
#[unsafe(no_mangle)]
pub extern "C" fn vblk_log_init() {
    #[cfg(feature = "kext")]
    {
        static LOGGER: virtio_kext_abi::kernel::IoLogger = virtio_kext_abi::kernel::IoLogger {
            name: "VirtioBlock",
            level: log::LevelFilter::Info,
        };
        virtio_kext_abi::kernel::init_logging(&LOGGER);
    }
}
