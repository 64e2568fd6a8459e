//! `VirtioBalloon.kext`'s Rust half: `virtio-balloon`'s [`BalloonDriver`] over the family's
//! bus, with its [`PagePool`] over wired memory the C++ shim takes from the kernel.
//!
//! The shim (`kexts/VirtioBalloon/shim/`, an `IOService` on the family's nub) hands
//! [`vbal_create`] the nub's device handle, the kernel's page size, the balloon's bound,
//! two memory callbacks and a sysctl reader; this crate wraps the handle in a
//! [`FamilyBus`](virtio_kext_client::FamilyBus), brings the device up (the driver reads
//! `num_pages` and starts inflating at once) and registers its interrupt entry with the
//! family. From then on the driver follows the host's target on config interrupts and
//! writes `actual` itself; the shim only publishes [`vbal_info`], retries with
//! [`vbal_poll`] when the kernel ran short of memory and calls [`vbal_pressure_check`]
//! and [`vbal_report_check`] from a timer. Which figure and which pressure level to read, and what to do about them,
//! is decided here; the shim's reader is one call to `sysctlbyname`.
//!
//! - **Pages**: the shim wires memory in chunks of [`VBAL_CHUNK_PAGES`] kernel pages
//!   ([`VbalCallbacks::alloc_chunk`], public KPI: an `IOBufferMemoryDescriptor` with
//!   `kIOMemoryMapperNone`, physical addresses from `getPhysicalSegment`) and releases a
//!   chunk ([`VbalCallbacks::free_chunk`]) as soon as none of its pages is in the balloon.
//!   The pool lends the chunks' pages one at a time to the driver, which reports them in
//!   4 KiB frames whatever the kernel's page size. The chunk table is allocated at
//!   [`vbal_create`] (sized from the bound, which is never more than the guest's memory:
//!   [`VbalConfig::max_pages`]), never grown.
//! - **Statistics** (STATS_VQ): the pool reads the guest's memory figures from the kernel
//!   when the driver fills the stats buffer (at setup and each time the device asks),
//!   through [`VbalCallbacks::read_sysctl`]: the shim's `sysctlbyname`, public KPI exported
//!   by `com.apple.kpi.libkern` (xnu `config/Libkern.exports`,
//!   `_sysctlbyname:_kernel_sysctlbyname`; declared in `<libkern/sysctl.h>`). In bytes:
//!   MEMTOT = `hw.memsize`; MEMFREE = `vm.page_free_count` pages; CACHES =
//!   `vm.page_pageable_external_count` pages (file-backed, speculative read-ahead
//!   included); AVAIL = free + file-backed pages (what the kernel itself counts as
//!   available for memorystatus). SWAP_IN/OUT and MAJFLT/MINFLT (only `host_statistics64`
//!   has them, and no kext library exports it) and the HTLB tags (no hugetlb) are never
//!   sent. A figure whose sysctl fails at setup stays out of every buffer (§5.5.6.3.1: the
//!   tag set is fixed); one failing later is sent with its last value.
//! - **DEFLATE_ON_OOM**: the shim calls [`vbal_pressure_check`] every [`VBAL_PRESSURE_MS`]
//!   while it is negotiated; it reads `kern.memorystatus_vm_pressure_level` (1 normal,
//!   2 warning, 4 critical: the levels of `DISPATCH_SOURCE_TYPE_MEMORYPRESSURE`) and at
//!   warning or critical gives back [`VBAL_PRESSURE_WARN_MIB`] or
//!   [`VBAL_PRESSURE_CRITICAL_MIB`] MiB of the balloon, at most once per
//!   [`VBAL_PRESSURE_MS`], through the driver's OOM deflate (told to the host; with
//!   MUST_TELL_HOST the pages go back to the kernel when the device acknowledges). The
//!   balloon then holds until the host sets a new target. [`vbal_deflate_for_oom`] stays
//!   the direct hook.
//! - **Free page reporting** (PAGE_REPORTING, §5.5.6.7), negotiated when offered. The
//!   kernel has no public interface to its free lists, so the kext takes free pages the
//!   way it takes the balloon's: it wires chunks through [`VbalCallbacks::alloc_chunk`]
//!   (they come from the kernel's free pool), reports their pages on the reporting queue
//!   (the host discards their backing: QEMU `madvise(MADV_DONTNEED)`), and frees each chunk
//!   back to the kernel once the device has returned every report carrying its pages. The
//!   shim calls [`vbal_report_check`] every [`VBAL_REPORT_MS`]; a round starts only when
//!   no report of the last round is out, at most once per [`VBAL_REPORT_MS`], while
//!   `kern.memorystatus_vm_pressure_level` reads normal (1) and the kernel's free memory
//!   (`vm.page_free_count` pages) stays above both [`VBAL_REPORT_FLOOR_MIB`] MiB and
//!   [`VBAL_REPORT_FLOOR_PERCENT`] % of `hw.memsize` after the round's
//!   [`VBAL_REPORT_ROUND_MIB`] MiB are taken; the gate is read again before each further
//!   chunk of the round. A round is reported a request (at most the queue's chain, 32
//!   ranges; physically contiguous pages are one range) at a time; a device reset (fault,
//!   sleep, stop) gives every chunk back, except when the device would not reset and its
//!   DMA could not be stopped: a chunk in a report it still holds may still be written, so
//!   it stays wired for good (counted in [`VbalInfo::report_chunks_leaked`] and
//!   [`VbalInfo::pages_leaked`], logged). Its record is reused: only counters remember
//!   it, so leaks never use up a round's records.
//!   Which free pages are reported is the kernel's
//!   choice (whatever its allocator hands out: mostly recently freed pages), not a walk
//!   of its free lists as Linux's `page_reporting` does.
//! - **Free page hinting** (FREE_PAGE_HINT) is not negotiated: with this mechanism each
//!   hinted page would have to stay wired, out of the kernel, from the hint until the host
//!   says DONE at the end of a migration round; there is no bounded, public-KPI way to hint
//!   the kernel's free memory.
//! - **Faults**: DEVICE_NEEDS_RESET or a device breaking the protocol: the driver restarts
//!   (reset; every page back to the pool; inflate to the target again).
//! - **A device that will not reset** (stop, sleep, a restart), with its bus mastering
//!   stuck on: the pages of an inflate request it still holds may still be inflated, and
//!   the host would discard their contents under the kernel's next user
//!   ([`PagePool::leak_page`]); each chunk holding one stays wired for good, never lent
//!   again (counted in [`VbalInfo::balloon_chunks_leaked`] and [`VbalInfo::pages_leaked`],
//!   logged), and its record is reused.
//! - **Emptying before a reset** ([`vbal_drain`], before sleep and stop): the balloon
//!   gives every page back through the deflate queue and writes `actual` after each
//!   acknowledged request, so the host knows which pages the guest takes back (virtio 1.2
//!   §5.5.6.1: the driver MUST use the deflateq and MUST update `actual`; with
//!   MUST_TELL_HOST it MUST NOT use a page before the device acknowledged it). A reset
//!   alone is not enough: QEMU's `virtio_balloon_device_reset` leaves `actual` as it was,
//!   so the host would go on counting the memory as ballooned. Linux's `remove_common` and
//!   `virtballoon_freeze` deflate everything before the reset too. The shim waits with
//!   its gate open (interrupts deliver the acknowledgements) and calls again; the wait is
//!   bounded ([`VBAL_DRAIN_STALL_MS`] without an acknowledgement, [`VBAL_DRAIN_MS`] in
//!   all). A device that does not acknowledge is reset anyway (logged): the reset makes it
//!   forget the balloon, and the pages go back to the kernel then, as after any reset.
//! - **Sleep** ([`vbal_suspend`], after [`vbal_drain`]): the device is reset and every
//!   page given back to the kernel; wake ([`vbal_resume`]) re-initialises it and inflates
//!   to the target the host sets then. Why not keep the pages: the reset makes the host
//!   forget the balloon, so kept pages would be wired memory neither side counts, and
//!   wired pages go into a hibernation image.
//! - `stop` → [`vbal_drain`], then [`vbal_stop`] (reset, every page and chunk back), then
//!   [`vbal_destroy`].
//!
//! Threading: the shim calls everything under its command gate on the family's work loop,
//! where the family also delivers interrupts, so a handle is never used concurrently.
//!
//! Memory is allocated only at [`vbal_create`] (driver, DMA region, tracking arrays,
//! reporting's chunk records): the I/O paths allocate nothing but the balloon's own pages
//! and reporting's chunks, through the shim. The tables sized from the bound are
//! allocated fallibly (a refusal is [`VBAL_E_NO_MEMORY`], not a kernel panic). Nothing here
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
use alloc::vec::Vec;
use core::ffi::{CStr, c_char, c_void};

use virtio_balloon::features::{DEFLATE_ON_OOM, PAGE_REPORTING};
use virtio_balloon::{
    BalloonDriver, BalloonError, BalloonOptions, FreeRange, MemStats, Page, PagePool, RangeReturn,
    RangeUse,
};
use virtio_kext_abi::vector_from_abi;
use virtio_kext_client::{FamilyBus, VfamDevice};

/// Statuses of the `vbal_*` functions.
pub const VBAL_OK: i32 = 0;
/// A null pointer or handle, or an unusable configuration.
pub const VBAL_E_INVALID: i32 = 1;
/// The device could not be brought up, or broke (a later call may succeed after a
/// recovery or a wake).
pub const VBAL_E_DEVICE: i32 = 2;
/// Stopped, or asleep.
pub const VBAL_E_STOPPED: i32 = 3;
/// The device did not offer DEFLATE_ON_OOM.
pub const VBAL_E_UNSUPPORTED: i32 = 4;
/// The kernel did not answer: no `read_sysctl` callback, or the sysctl failed.
pub const VBAL_E_UNAVAILABLE: i32 = 5;
/// The kernel could not give the tables [`vbal_create`] sizes from the bound (about 16
/// bytes a page at 4 KiB): a smaller `virtiodarwin_balloon_max_mib` may fit.
pub const VBAL_E_NO_MEMORY: i32 = 6;
/// [`vbal_drain`]: the device still holds pages; wait for `changed` (an interrupt) or
/// [`VBAL_DRAIN_POLL_MS`], with the gate open, and call again.
pub const VBAL_E_BUSY: i32 = 7;
/// [`vbal_drain`]: the device acknowledged no deflate for [`VBAL_DRAIN_STALL_MS`], or
/// emptying took [`VBAL_DRAIN_MS`]; what is left goes back to the kernel at the reset.
pub const VBAL_E_TIMEOUT: i32 = 8;

/// [`vbal_drain`] gives up when the device has acknowledged nothing for this long...
pub const VBAL_DRAIN_STALL_MS: u32 = 1_000;
/// ...or when emptying the balloon has taken this long in all (a few thousand requests of
/// 1 MiB for a balloon of gigabytes; bounded because sleep waits for it).
pub const VBAL_DRAIN_MS: u32 = 10_000;
/// While [`vbal_drain`] says [`VBAL_E_BUSY`] the shim waits at most this long for an
/// interrupt before it calls again (the call also polls the rings).
pub const VBAL_DRAIN_POLL_MS: u32 = 10;

/// Kernel pages per chunk the shim wires (256 KiB with 4 KiB pages): few enough
/// allocations for a balloon of gigabytes, small enough that a chunk partly in the balloon
/// keeps little memory from the guest. One bit per page in a 64-bit mask.
pub const VBAL_CHUNK_PAGES: u32 = 64;
/// The balloon's default bound (MiB): 8 bytes of tracking per page and about as much for
/// the chunk table are allocated at start for this much, so it is not the guest's whole
/// memory. A host target beyond it is clamped (logged). Also the bound when the guest's
/// memory cannot be learnt (see [`VbalConfig::max_pages`]).
pub const VBAL_DEFAULT_MAX_MIB: u32 = 4096;
/// After the kernel had no memory to give, the shim calls [`vbal_poll`] this often until
/// the balloon reaches its target.
pub const VBAL_RETRY_MS: u32 = 1_000;
/// Spare chunk records beyond the bound's: pages deflated out of the middle of chunks
/// leave them partly used.
const SPARE_CHUNKS: usize = 32;

/// The shim calls [`vbal_pressure_check`] this often while DEFLATE_ON_OOM is negotiated;
/// the balloon gives memory back for pressure at most once per this interval.
pub const VBAL_PRESSURE_MS: u32 = 1_000;
/// MiB given back per interval at the warning level.
pub const VBAL_PRESSURE_WARN_MIB: u32 = 16;
/// MiB given back per interval at the critical level.
pub const VBAL_PRESSURE_CRITICAL_MIB: u32 = 64;
/// `kern.memorystatus_vm_pressure_level`: normal (xnu `NOTE_MEMORYSTATUS_PRESSURE_NORMAL`).
pub const VBAL_PRESSURE_NORMAL: u32 = 1;
/// `kern.memorystatus_vm_pressure_level`: warning (`NOTE_MEMORYSTATUS_PRESSURE_WARN`).
pub const VBAL_PRESSURE_WARN: u32 = 2;
/// `kern.memorystatus_vm_pressure_level`: critical (`NOTE_MEMORYSTATUS_PRESSURE_CRITICAL`).
pub const VBAL_PRESSURE_CRITICAL: u32 = 4;

/// The shim calls [`vbal_report_check`] this often while PAGE_REPORTING is negotiated; a
/// reporting round starts at most once per this interval.
pub const VBAL_REPORT_MS: u32 = 1_000;
/// Most memory (MiB) one reporting round takes from the kernel and reports.
pub const VBAL_REPORT_ROUND_MIB: u32 = 4;
/// Reporting needs the kernel's free memory to stay above this many MiB after a round...
pub const VBAL_REPORT_FLOOR_MIB: u32 = 256;
/// ...and above this percentage of `hw.memsize`.
pub const VBAL_REPORT_FLOOR_PERCENT: u32 = 25;

// The shim's one memory timer serves both checks.
const _: () = assert!(VBAL_PRESSURE_MS == VBAL_REPORT_MS);

/// [`VbalReport::outcome`]: nothing decided (not returned by a check).
pub const VBAL_REPORT_NONE: u32 = 0;
/// A round started: memory was taken from the kernel and a report sent.
pub const VBAL_REPORT_SENT: u32 = 1;
/// A report of the last round is still with the device.
pub const VBAL_REPORT_BUSY: u32 = 2;
/// Less than [`VBAL_REPORT_MS`] since the last round started.
pub const VBAL_REPORT_TOO_SOON: u32 = 3;
/// The kernel's free memory is not well above the floor.
pub const VBAL_REPORT_LOW_MEMORY: u32 = 4;
/// The pressure level is not normal.
pub const VBAL_REPORT_PRESSURE: u32 = 5;
/// The kernel gave no chunk.
pub const VBAL_REPORT_NO_MEMORY: u32 = 6;
/// The free memory or the pressure level could not be read.
pub const VBAL_REPORT_UNREADABLE: u32 = 7;

/// The sysctls the kext reads (see the crate documentation for the tag each feeds).
const SYSCTL_MEMSIZE: &CStr = c"hw.memsize";
const SYSCTL_FREE: &CStr = c"vm.page_free_count";
const SYSCTL_FILE_BACKED: &CStr = c"vm.page_pageable_external_count";
const SYSCTL_PRESSURE: &CStr = c"kern.memorystatus_vm_pressure_level";
const CHUNK: usize = VBAL_CHUNK_PAGES as usize;

/// The shim's choices, read once by [`vbal_create`].
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct VbalConfig {
    /// The kernel's page size (`PAGE_SIZE`): a power of two from 4 KiB to 1 MiB.
    pub page_size: u32,
    /// Most kernel pages the balloon may hold (> 0). [`vbal_create`] lowers it to the
    /// guest's memory (`total_pages`, else `hw.memsize` through `read_sysctl`, else
    /// [`VBAL_DEFAULT_MAX_MIB`]): the balloon can hold no more, and its tables are sized
    /// from it.
    pub max_pages: u32,
    /// The guest's memory in kernel pages, when known (0: unknown).
    pub total_pages: u64,
}

/// The shim's callbacks; `ctx` is passed back unchanged (the shim's driver object).
///
/// - `alloc_chunk`: wires `count` kernel pages ([`VBAL_CHUNK_PAGES`] for the balloon;
///   reporting asks for at most that, fewer only with pages over 64 KiB), writes the
///   physical address of each (page-aligned, not necessarily contiguous) to
///   `pages[0..count]` and an opaque handle to `*cookie`; false when the kernel has no
///   memory to give.
/// - `free_chunk`: unwires and frees a chunk by its handle (none of its pages is in the
///   balloon any more; the host may have discarded their contents).
/// - `changed` (may be null): after [`vbal_create`], an interrupt, a poll or a wake,
///   target, `actual` or the pages held may have changed; `starved`: the balloon waits for
///   memory (the kernel ran short, or inflation restarted), call [`vbal_poll`] after
///   [`VBAL_RETRY_MS`]. Called once the driver is done with the device.
/// - `read_sysctl` (may be null: no memory figures, no pressure check): reads the sysctl
///   `name` (NUL-terminated) into `buf`; `*len` is the room on entry and the bytes written
///   on return. 0 on success, an errno otherwise (the shim: `sysctlbyname(name, buf, &n,
///   NULL, 0)`). Called on the work loop, from [`vbal_create`] and [`vbal_interrupt`] (the
///   stats buffer; reporting's gate before each further chunk of a round), and from
///   [`vbal_pressure_check`] and [`vbal_report_check`].
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VbalCallbacks {
    pub ctx: *mut c_void,
    pub alloc_chunk: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            pages: *mut u64,
            count: u32,
            cookie: *mut *mut c_void,
        ) -> bool,
    >,
    pub free_chunk: Option<unsafe extern "C" fn(ctx: *mut c_void, cookie: *mut c_void)>,
    pub changed: Option<unsafe extern "C" fn(ctx: *mut c_void, starved: bool)>,
    pub read_sysctl: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            name: *const c_char,
            buf: *mut c_void,
            len: *mut u32,
        ) -> i32,
    >,
}

/// State and counters for the IORegistry.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VbalInfo {
    /// The host's target (`num_pages`, 4 KiB frames).
    pub target_frames: u32,
    /// What the driver last wrote to `actual` (4 KiB frames).
    pub actual_frames: u32,
    /// Kernel pages in the balloon (including a request in flight).
    pub pages_held: u64,
    /// Kernel pages wired in chunks (the balloon's pages, the chunks' spare ones,
    /// reporting's [`VbalInfo::report_pages`], and [`VbalInfo::pages_leaked`]).
    pub pages_wired: u64,
    /// The kernel's page size.
    pub page_size: u32,
    /// 1 when DEFLATE_ON_OOM was negotiated.
    pub deflate_on_oom: u32,
    /// The memory pressure level last read (0: none, or unreadable; see
    /// [`VBAL_PRESSURE_NORMAL`]).
    pub pressure_level: u32,
    /// Times the balloon gave memory back for memory pressure ([`vbal_pressure_check`]).
    pub pressure_deflates: u64,
    /// Sysctl reads that failed (their figures are not sent, or sent with the last value).
    pub sysctl_failures: u64,
    pub inflate_requests: u64,
    pub deflate_requests: u64,
    pub stats_buffers: u64,
    pub oom_pages: u64,
    /// Times a chunk could not be wired (the balloon waits and retries).
    pub alloc_failures: u64,
    pub chunks_allocated: u64,
    pub chunks_freed: u64,
    /// Interrupts delivered to this driver.
    pub interrupts: u64,
    /// Times the device was reset and brought up again after a fault.
    pub recoveries: u64,
    /// Sleeps.
    pub suspends: u64,
    /// 1 when PAGE_REPORTING was negotiated.
    pub page_reporting: u32,
    /// The last [`vbal_report_check`] outcome (`VBAL_REPORT_*`).
    pub report_outcome: u32,
    /// Reporting rounds started.
    pub report_rounds: u64,
    /// Report requests sent to the device.
    pub reports: u64,
    /// Bytes in reports the device returned (the host had them to discard).
    pub bytes_reported: u64,
    /// Kernel pages wired for reporting now (in a report, or waiting for the next one;
    /// leaked chunks are not counted: see [`VbalInfo::pages_leaked`]).
    pub report_pages: u64,
    /// Rounds ended early: the kernel gave no chunk, or the gate closed mid-round.
    pub report_cut_short: u64,
    /// Reporting chunks kept wired for good: a reset failed and the device's DMA could
    /// not be stopped while it held a report of them (it may still write them).
    pub report_chunks_leaked: u64,
    /// Balloon chunks kept wired for good: a reset failed and the device's DMA could not
    /// be stopped while it held an inflate of some of their pages (it may still inflate
    /// them, and the host discard them).
    pub balloon_chunks_leaked: u64,
    /// Kernel pages in the chunks kept wired for good (balloon and reporting chunks).
    pub pages_leaked: u64,
}

/// Result of [`vbal_report_check`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VbalReport {
    /// What the check did (`VBAL_REPORT_*`).
    pub outcome: u32,
    /// The pressure level read (0: not read).
    pub level: u32,
    /// The kernel's free memory read, in bytes (0: not read).
    pub free_bytes: u64,
    /// Free ranges in the report sent.
    pub ranges: u64,
}

/// Result of [`vbal_deflate_for_oom`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VbalOom {
    /// Pages already out of the balloon.
    pub released: u64,
    /// Pages that leave it when the device acknowledges (MUST_TELL_HOST).
    pub pending: u64,
}

/// Result of [`vbal_pressure_check`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VbalPressure {
    /// The level read (`kern.memorystatus_vm_pressure_level`).
    pub level: u32,
    /// Pages already out of the balloon.
    pub released: u64,
    /// Pages that leave it when the device acknowledges (MUST_TELL_HOST).
    pub pending: u64,
}

/// One wired chunk (or an unused record).
#[derive(Copy, Clone)]
struct Chunk {
    cookie: *mut c_void,
    pages: [u64; CHUNK],
    /// Bit i: `pages[i]` is lent to the driver.
    lent: u64,
    live: bool,
    /// A page of it was leaked ([`PagePool::leak_page`]): the chunk is never freed and lends
    /// nothing more; its record is forgotten once no page of it is lent.
    leaked: bool,
}

const NO_CHUNK: Chunk = Chunk {
    cookie: core::ptr::null_mut(),
    pages: [0; CHUNK],
    lent: 0,
    live: false,
    leaked: false,
};

/// A chunk wired for free page reporting (or an unused record). Its pages are handed to
/// the driver in order, as ranges of physically contiguous pages; the chunk goes back to
/// the kernel once every range handed out has come back and nothing is left to hand out
/// (or the round is over).
#[derive(Copy, Clone)]
struct ReportChunk {
    cookie: *mut c_void,
    pages: [u64; CHUNK],
    /// Pages in this chunk (`pages[..count]`).
    count: usize,
    /// Pages handed out so far (`pages[..cursor]`).
    cursor: usize,
    /// Ranges handed out and not yet returned.
    out: usize,
    live: bool,
    /// A range of it came back [`RangeReturn::Leaked`]: the device may still write it, so
    /// the chunk is never freed; its record is forgotten once no range of it is out.
    leaked: bool,
}

const NO_REPORT_CHUNK: ReportChunk = ReportChunk {
    cookie: core::ptr::null_mut(),
    pages: [0; CHUNK],
    count: 0,
    cursor: 0,
    out: 0,
    live: false,
    leaked: false,
};

/// Why the reporting gate is closed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Gate {
    Unreadable,
    Pressure,
    LowMemory,
}

impl Gate {
    fn outcome(self) -> u32 {
        match self {
            Gate::Unreadable => VBAL_REPORT_UNREADABLE,
            Gate::Pressure => VBAL_REPORT_PRESSURE,
            Gate::LowMemory => VBAL_REPORT_LOW_MEMORY,
        }
    }
}

/// Free page reporting's side of the pool: one round at a time, bounded by
/// `round_chunks` chunks of `chunk_pages` pages ([`VBAL_REPORT_ROUND_MIB`] MiB).
struct Reporting {
    chunk_pages: usize,
    /// Records, allocated at setup (one per chunk of a round).
    chunks: Vec<ReportChunk>,
    /// A round is under way: the driver may take ranges.
    active: bool,
    /// Chunks the round may still wire.
    left: usize,
    rounds: u64,
    bytes_reported: u64,
    cut_short: u64,
    bad_returns: u64,
    /// Chunks kept wired for good (their records forgotten).
    chunks_leaked: u64,
    /// The last gate reading, for the caller's result.
    last_level: u32,
    last_free: u64,
    outcome: u32,
}

impl Reporting {
    /// `None` when the kernel cannot give the records.
    fn new(page_size: usize) -> Option<Reporting> {
        let round = (VBAL_REPORT_ROUND_MIB as usize) << 20;
        let chunk_pages = (round / page_size.max(1)).clamp(1, CHUNK);
        let chunk_bytes = chunk_pages.saturating_mul(page_size).max(1);
        let records = (round / chunk_bytes).max(1);
        Some(Reporting {
            chunk_pages,
            chunks: table(records, NO_REPORT_CHUNK)?,
            active: false,
            left: 0,
            rounds: 0,
            bytes_reported: 0,
            cut_short: 0,
            bad_returns: 0,
            chunks_leaked: 0,
            last_level: 0,
            last_free: 0,
            outcome: VBAL_REPORT_NONE,
        })
    }

    /// Kernel pages wired for reporting now.
    fn pages(&self) -> usize {
        self.chunks.iter().filter(|c| c.live).map(|c| c.count).sum()
    }

    /// A round is under way, or one of its reports is still with the device (a leaked
    /// chunk is no report: it is never coming back).
    fn busy(&self) -> bool {
        self.active || self.chunks.iter().any(|c| c.live && !c.leaked)
    }

    /// Bytes one round takes at most.
    fn round_bytes(&self, page_size: usize) -> u64 {
        (self.chunks.len() * self.chunk_pages * page_size) as u64
    }
}

/// The driver's [`PagePool`]: pages of the shim's wired chunks. Every page the driver
/// returns must be one it was lent (anything else is counted and ignored: returning it
/// twice would free wired memory twice).
struct ChunkPool {
    cb: VbalCallbacks,
    page_size: usize,
    total_pages: usize,
    /// Every record, allocated at setup; `free_records` lists the unused ones.
    chunks: Vec<Chunk>,
    free_records: Vec<usize>,
    /// Unlent pages of live chunks.
    spare: usize,
    /// The chunk last lent from or returned to: the driver deflates the pages it took last
    /// first, and gives everything back in the order it took it at a reset, so the next
    /// page is nearly always in this chunk or the next one.
    hint: usize,
    chunks_allocated: u64,
    chunks_freed: u64,
    /// Balloon chunks kept wired for good (their records forgotten).
    chunks_leaked: u64,
    /// Kernel pages of every chunk kept wired for good, balloon's and reporting's.
    pages_leaked: u64,
    alloc_failures: u64,
    bad_returns: u64,
    sysctl_failures: u64,
    /// The memory pressure level last read (0: none yet, or unreadable).
    pressure_level: u32,
    reporting: Reporting,
}

/// `n` copies of `value`, or `None` when the kernel cannot give the memory. The create
/// path's tables are sized from the shim's bound: a failing infallible allocation would
/// be a kernel panic (no_std's default on allocation failure), not an error.
fn table<T: Clone>(n: usize, value: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, value);
    Some(v)
}

/// An unsigned number from the kernel through the shim's `read_sysctl` (4- or 8-byte
/// sysctls, native byte order); `None` when there is no callback, the sysctl fails or it
/// answers with another size.
fn read_sysctl_u64(cb: &VbalCallbacks, name: &CStr) -> Option<u64> {
    let read = cb.read_sysctl?;
    let mut buf = [0u8; 8];
    let mut len = buf.len() as u32;
    // SAFETY: the shim's callback with its own context; `name` is NUL-terminated, `buf`
    // has `len` bytes of room, `len` is a local.
    let err = unsafe { read(cb.ctx, name.as_ptr(), buf.as_mut_ptr().cast(), &mut len) };
    if err != 0 {
        return None;
    }
    match len {
        4 => {
            let b: [u8; 4] = buf.get(..4)?.try_into().ok()?;
            Some(u64::from(u32::from_ne_bytes(b)))
        }
        8 => Some(u64::from_ne_bytes(buf)),
        _ => None,
    }
}

/// The kernel pages the balloon may hold: the shim's `max_pages`, but no more than the
/// guest's memory (the shim's `total_pages`, else `hw.memsize`). The balloon cannot hold
/// more, and the tables allocated at create cost about 16 bytes a page of the bound: the
/// boot-arg, clamped only to 32 bits by the shim, could otherwise ask the kernel for tens
/// of gigabytes. When the guest's memory cannot be learnt, [`VBAL_DEFAULT_MAX_MIB`]: a
/// larger bound cannot be checked. `page_size` is valid (checked by the caller).
fn balloon_bound(cb: &VbalCallbacks, config: &VbalConfig) -> usize {
    let page_size = u64::from(config.page_size.max(1));
    let guest_pages = match config.total_pages {
        0 => read_sysctl_u64(cb, SYSCTL_MEMSIZE).map(|bytes| bytes / page_size),
        pages => Some(pages),
    };
    let cap = guest_pages.unwrap_or((u64::from(VBAL_DEFAULT_MAX_MIB) << 20) / page_size);
    let bound = u64::from(config.max_pages).min(cap);
    if bound < u64::from(config.max_pages) {
        log::warn!(
            "VirtioBalloon: bound of {} pages lowered to {bound} ({})",
            config.max_pages,
            if guest_pages.is_some() {
                "the guest's memory"
            } else {
                "the guest's memory is unknown: the default bound"
            }
        );
    }
    usize::try_from(bound).unwrap_or(usize::MAX)
}

impl ChunkPool {
    /// The pool for a balloon of at most `max_pages` pages; `None` when the kernel cannot
    /// give its tables.
    fn new(cb: VbalCallbacks, config: &VbalConfig, max_pages: usize) -> Option<ChunkPool> {
        let records = max_pages.div_ceil(CHUNK).checked_add(SPARE_CHUNKS)?;
        let mut free_records = Vec::new();
        free_records.try_reserve_exact(records).ok()?;
        free_records.extend((0..records).rev());
        Some(ChunkPool {
            cb,
            page_size: config.page_size as usize,
            total_pages: usize::try_from(config.total_pages).unwrap_or(usize::MAX),
            chunks: table(records, NO_CHUNK)?,
            free_records,
            spare: 0,
            hint: 0,
            chunks_allocated: 0,
            chunks_freed: 0,
            chunks_leaked: 0,
            pages_leaked: 0,
            alloc_failures: 0,
            bad_returns: 0,
            sysctl_failures: 0,
            pressure_level: 0,
            reporting: Reporting::new(config.page_size as usize)?,
        })
    }

    /// `kern.memorystatus_vm_pressure_level`, kept for the IORegistry (0 when unreadable);
    /// a change is logged.
    fn read_pressure(&mut self) -> Option<u32> {
        let Some(level) = self.read_sysctl(SYSCTL_PRESSURE) else {
            if self.pressure_level != 0 {
                log::warn!("VirtioBalloon: the memory pressure level cannot be read");
            }
            self.pressure_level = 0;
            return None;
        };
        let level = u32::try_from(level).unwrap_or(u32::MAX);
        if level != self.pressure_level {
            log::info!("VirtioBalloon: memory pressure level {level}");
            self.pressure_level = level;
        }
        Some(level)
    }

    /// Whether the kernel can spare a reporting round now: the pressure level reads
    /// normal and its free memory stays above the floor after a whole round is taken.
    fn report_gate(&mut self) -> Result<(), Gate> {
        self.reporting.last_level = 0;
        self.reporting.last_free = 0;
        let level = self.read_pressure().ok_or(Gate::Unreadable)?;
        self.reporting.last_level = level;
        if level != VBAL_PRESSURE_NORMAL {
            return Err(Gate::Pressure);
        }
        let memsize = self.read_sysctl(SYSCTL_MEMSIZE).ok_or(Gate::Unreadable)?;
        let free = self.read_pages(SYSCTL_FREE).ok_or(Gate::Unreadable)?;
        self.reporting.last_free = free;
        let share = u128::from(memsize) * u128::from(VBAL_REPORT_FLOOR_PERCENT) / 100;
        let floor =
            (u64::from(VBAL_REPORT_FLOOR_MIB) << 20).max(u64::try_from(share).unwrap_or(u64::MAX));
        let needed = floor.saturating_add(self.reporting.round_bytes(self.page_size));
        if free <= needed {
            return Err(Gate::LowMemory);
        }
        Ok(())
    }

    /// Opens a round: the driver may now take up to a round's chunks of ranges.
    fn start_report_round(&mut self) {
        self.reporting.active = true;
        self.reporting.left = self.reporting.chunks.len();
        self.reporting.rounds += 1;
    }

    /// Closes the round: no more ranges; every chunk with nothing out goes back to the
    /// kernel now, the others when their last range comes back.
    fn end_report_round(&mut self) {
        self.reporting.active = false;
        self.reporting.left = 0;
        for i in 0..self.reporting.chunks.len() {
            if self
                .reporting
                .chunks
                .get(i)
                .is_some_and(|c| c.live && c.out == 0)
            {
                self.release_report_chunk(i);
            }
        }
    }

    /// Ends the round because the kernel gave nothing or the gate closed.
    fn cut_report_round(&mut self, outcome: u32) {
        self.reporting.cut_short += 1;
        self.reporting.outcome = outcome;
        self.end_report_round();
    }

    /// Wires a chunk for the round; `None` when the kernel gave none (or gave pages the
    /// device cannot be told about), or no record is free.
    fn wire_report_chunk(&mut self) -> Option<usize> {
        let alloc = self.cb.alloc_chunk?;
        let page_size = self.page_size as u64;
        let i = self.reporting.chunks.iter().position(|c| !c.live)?;
        let count = self.reporting.chunk_pages;
        let c = self.reporting.chunks.get_mut(i)?;
        let mut cookie = core::ptr::null_mut();
        // SAFETY: the shim's callback with its own context; `pages` has room for
        // VBAL_CHUNK_PAGES >= `count` entries and `cookie` is a local.
        let ok = unsafe { alloc(self.cb.ctx, c.pages.as_mut_ptr(), count as u32, &mut cookie) };
        if !ok || cookie.is_null() {
            self.alloc_failures += 1;
            return None;
        }
        *c = ReportChunk {
            cookie,
            count,
            cursor: 0,
            out: 0,
            live: true,
            leaked: false,
            ..*c
        };
        self.chunks_allocated += 1;
        let usable = c.pages.get(..count).is_some_and(|pages| {
            pages
                .iter()
                .all(|&p| p % page_size == 0 && p.checked_add(page_size).is_some())
        });
        if !usable {
            log::error!("VirtioBalloon: the kernel gave a misaligned page; chunk given back");
            self.release_report_chunk(i);
            return None;
        }
        Some(i)
    }

    /// The next range of physically contiguous pages of chunk `i`.
    fn next_report_range(&mut self, i: usize) -> Option<FreeRange> {
        let page_size = self.page_size as u64;
        let c = self.reporting.chunks.get_mut(i)?;
        let pages = c.pages.get(c.cursor..c.count)?;
        let (&first, rest) = pages.split_first()?;
        let mut n = 1u64;
        for &p in rest {
            let next = first.checked_add(n.checked_mul(page_size)?)?;
            if p != next || (n + 1).checked_mul(page_size)? > u64::from(u32::MAX) {
                break;
            }
            n += 1;
        }
        let len = u32::try_from(n.checked_mul(page_size)?).ok()?;
        c.cursor += n as usize;
        c.out += 1;
        Some(FreeRange { addr: first, len })
    }

    /// Gives a reporting chunk back to the kernel, unless it is leaked.
    fn release_report_chunk(&mut self, i: usize) {
        let Some(c) = self.reporting.chunks.get_mut(i) else {
            return;
        };
        if !c.live || c.leaked {
            return;
        }
        let cookie = c.cookie;
        *c = NO_REPORT_CHUNK;
        self.chunks_freed += 1;
        if let Some(free) = self.cb.free_chunk {
            // SAFETY: the shim's callback with its own context and a cookie it gave us,
            // returned once (the record is cleared above).
            unsafe { free(self.cb.ctx, cookie) };
        }
    }

    /// Forgets the record of leaked reporting chunk `i` once no range of it is out: the
    /// chunk stays wired for good (never freed; the device may still write it) and only
    /// the counters remember it, so the record serves later rounds.
    fn retire_report_chunk(&mut self, i: usize) {
        let Some(c) = self.reporting.chunks.get_mut(i) else {
            return;
        };
        if !c.live || !c.leaked || c.out != 0 {
            return;
        }
        let count = c.count as u64;
        *c = NO_REPORT_CHUNK;
        self.reporting.chunks_leaked += 1;
        self.pages_leaked += count;
    }

    /// An unsigned number from the kernel through the shim (4- or 8-byte sysctls, native
    /// byte order); `None` (counted) when there is no callback, the sysctl fails or it
    /// answers with another size.
    fn read_sysctl(&mut self, name: &CStr) -> Option<u64> {
        let value = read_sysctl_u64(&self.cb, name);
        if value.is_none() {
            self.sysctl_failures += 1;
        }
        value
    }

    /// A page count from the kernel, in bytes.
    fn read_pages(&mut self, name: &CStr) -> Option<u64> {
        self.read_sysctl(name)?.checked_mul(self.page_size as u64)
    }

    fn live_chunks(&self) -> usize {
        self.chunks.len() - self.free_records.len()
    }

    /// A live chunk with an unlent page (a leaked chunk lends nothing): the hint first,
    /// then the first one found.
    fn chunk_with_spare(&self) -> Option<usize> {
        let has = |c: &Chunk| c.live && !c.leaked && c.lent != u64::MAX;
        if self.chunks.get(self.hint).is_some_and(has) {
            return Some(self.hint);
        }
        self.chunks.iter().position(has)
    }

    /// Wires a new chunk through the shim.
    fn wire_chunk(&mut self) -> Option<usize> {
        let alloc = self.cb.alloc_chunk?;
        let i = *self.free_records.last()?;
        let c = self.chunks.get_mut(i)?;
        let mut cookie = core::ptr::null_mut();
        // SAFETY: the shim's callback with its own context; `pages` holds VBAL_CHUNK_PAGES
        // entries and `cookie` is a local.
        let ok = unsafe {
            alloc(
                self.cb.ctx,
                c.pages.as_mut_ptr(),
                VBAL_CHUNK_PAGES,
                &mut cookie,
            )
        };
        if !ok || cookie.is_null() {
            self.alloc_failures += 1;
            return None;
        }
        c.cookie = cookie;
        c.lent = 0;
        c.live = true;
        c.leaked = false;
        self.free_records.pop();
        self.spare += CHUNK;
        self.chunks_allocated += 1;
        Some(i)
    }

    /// Where `addr` is lent: the hint, then outwards from it.
    fn find_lent(&self, addr: u64) -> Option<(usize, usize)> {
        let n = self.chunks.len();
        let probe = |i: usize| {
            let c = self.chunks.get(i)?;
            if !c.live {
                return None;
            }
            let slot = c.pages.iter().position(|&p| p == addr)?;
            (c.lent & 1u64.checked_shl(slot as u32)? != 0).then_some((i, slot))
        };
        for d in 0..n {
            let up = (self.hint + d) % n;
            if let Some(hit) = probe(up) {
                return Some(hit);
            }
            let down = (self.hint + n - d) % n;
            if d != 0
                && let Some(hit) = probe(down)
            {
                return Some(hit);
            }
        }
        None
    }

    /// Gives a chunk back to the kernel, unless it is leaked.
    fn release(&mut self, i: usize) {
        let Some(c) = self.chunks.get_mut(i) else {
            return;
        };
        if !c.live || c.leaked {
            return;
        }
        let cookie = c.cookie;
        let spare = CHUNK - c.lent.count_ones() as usize;
        *c = NO_CHUNK;
        self.spare -= spare;
        self.free_records.push(i);
        self.chunks_freed += 1;
        if let Some(free) = self.cb.free_chunk {
            // SAFETY: the shim's callback with its own context and a cookie it gave us,
            // returned once (the record is cleared above).
            unsafe { free(self.cb.ctx, cookie) };
        }
    }
}

impl ChunkPool {
    /// Forgets the record of leaked balloon chunk `i` once none of its pages is lent: the
    /// chunk stays wired for good (never freed) and only the counters remember it, so the
    /// record serves the balloon again.
    fn retire(&mut self, i: usize) {
        let Some(c) = self.chunks.get_mut(i) else {
            return;
        };
        if !c.live || !c.leaked || c.lent != 0 {
            return;
        }
        *c = NO_CHUNK;
        self.free_records.push(i);
        self.chunks_leaked += 1;
        self.pages_leaked += CHUNK as u64;
    }
}

impl PagePool for ChunkPool {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn total_pages(&self) -> usize {
        self.total_pages
    }

    /// The guest's memory figures, read when the driver fills the stats buffer; a figure
    /// whose sysctl fails is `None`. Without a `read_sysctl` callback nothing is read.
    fn stats(&mut self) -> MemStats {
        if self.cb.read_sysctl.is_none() {
            return MemStats::default();
        }
        let total = self.read_sysctl(SYSCTL_MEMSIZE);
        let free = self.read_pages(SYSCTL_FREE);
        let file_backed = self.read_pages(SYSCTL_FILE_BACKED);
        MemStats {
            mem_total: total,
            mem_free: free,
            caches: file_backed,
            mem_available: free.zip(file_backed).and_then(|(f, c)| f.checked_add(c)),
            ..MemStats::default()
        }
    }

    /// Free page reporting: the next range of the round's chunks, wiring another chunk
    /// (after the gate says the kernel can still spare it) while the round allows; `None`
    /// ends the round. Hinting gets nothing (not negotiated).
    fn take_free_range(&mut self, purpose: RangeUse) -> Option<FreeRange> {
        if purpose != RangeUse::Report || !self.reporting.active {
            return None;
        }
        let partial = self
            .reporting
            .chunks
            .iter()
            .position(|c| c.live && !c.leaked && c.cursor < c.count);
        let i = match partial {
            Some(i) => i,
            None if self.reporting.left == 0 => {
                self.end_report_round();
                return None;
            }
            None => {
                // The first chunk of a round was just gated by the caller.
                if self.reporting.left < self.reporting.chunks.len()
                    && let Err(g) = self.report_gate()
                {
                    self.cut_report_round(g.outcome());
                    return None;
                }
                let Some(i) = self.wire_report_chunk() else {
                    self.cut_report_round(VBAL_REPORT_NO_MEMORY);
                    return None;
                };
                self.reporting.left -= 1;
                i
            }
        };
        let range = self.next_report_range(i);
        if range.is_none() {
            // Cannot happen (the chunk has pages left); never leave the round open.
            self.end_report_round();
        }
        range
    }

    /// A range back from the driver: the device returned its report (`Reported`), or it
    /// never reached the device, or the device was reset (either ends the round). Its
    /// chunk goes back to the kernel once nothing of it is out and nothing is left to
    /// hand out.
    fn return_free_range(&mut self, range: FreeRange, purpose: RangeUse, how: RangeReturn) {
        if purpose != RangeUse::Report {
            return;
        }
        let found = self.reporting.chunks.iter().position(|c| {
            c.live
                && c.out > 0
                && c.pages
                    .get(..c.cursor)
                    .is_some_and(|p| p.contains(&range.addr))
        });
        let Some(i) = found else {
            self.reporting.bad_returns += 1;
            log::error!(
                "VirtioBalloon: free range {:#x}+{:#x} returned but not taken; ignored",
                range.addr,
                range.len
            );
            return;
        };
        if how == RangeReturn::Reported {
            self.reporting.bytes_reported += u64::from(range.len);
        } else {
            self.reporting.active = false;
            self.reporting.left = 0;
        }
        let active = self.reporting.active;
        let Some(c) = self.reporting.chunks.get_mut(i) else {
            return;
        };
        if how == RangeReturn::Leaked && !c.leaked {
            // The device would not reset and its DMA could not be stopped: it may still
            // write these pages, so they never go back to the kernel.
            c.leaked = true;
            log::error!(
                "VirtioBalloon: a reporting chunk the device may still write stays wired for good"
            );
        }
        c.out -= 1;
        if c.leaked {
            self.retire_report_chunk(i);
        } else if c.out == 0 && (c.cursor >= c.count || !active) {
            self.release_report_chunk(i);
        }
        if !active {
            self.end_report_round();
        }
    }

    fn alloc_page(&mut self) -> Option<Page> {
        let i = match self.chunk_with_spare() {
            Some(i) => i,
            None => self.wire_chunk()?,
        };
        let c = self.chunks.get_mut(i)?;
        let slot = (!c.lent).trailing_zeros();
        let addr = *c.pages.get(slot as usize)?;
        c.lent |= 1u64.checked_shl(slot)?;
        self.spare -= 1;
        self.hint = i;
        Some(Page { addr })
    }

    fn free_page(&mut self, page: Page) {
        let Some((i, slot)) = self.find_lent(page.addr) else {
            self.bad_returns += 1;
            log::error!(
                "VirtioBalloon: page {:#x} returned but not lent; ignored",
                page.addr
            );
            return;
        };
        self.hint = i;
        let Some(c) = self.chunks.get_mut(i) else {
            return;
        };
        c.lent &= !(1u64 << slot);
        if c.leaked {
            // Lends nothing more (its spare pages left `spare` when it was leaked).
            if c.lent == 0 {
                self.retire(i);
            }
            return;
        }
        self.spare += 1;
        // Deflated memory goes back to the kernel at once, a chunk at a time.
        if c.lent == 0 {
            self.release(i);
        }
    }

    /// A page of an inflate the device still holds after a failed reset: it may still be
    /// inflated (the host discarding it), so its chunk stays wired for good and lends
    /// nothing more.
    fn leak_page(&mut self, page: Page) {
        let Some((i, slot)) = self.find_lent(page.addr) else {
            self.bad_returns += 1;
            log::error!(
                "VirtioBalloon: page {:#x} leaked but not lent; ignored",
                page.addr
            );
            return;
        };
        let Some(c) = self.chunks.get_mut(i) else {
            return;
        };
        if !c.leaked {
            c.leaked = true;
            // Its unlent pages are lent no more.
            self.spare -= CHUNK - c.lent.count_ones() as usize;
            log::error!(
                "VirtioBalloon: a chunk with pages the device may still inflate stays wired for good"
            );
        }
        c.lent &= !(1u64 << slot);
        if c.lent == 0 {
            self.retire(i);
        }
    }
}

impl Drop for ChunkPool {
    fn drop(&mut self) {
        // The driver returned every page before the pool is dropped (it is a field of the
        // driver, dropped after the driver's own reset and reclaim); anything still live is
        // a chunk with spare pages only.
        for i in 0..self.chunks.len() {
            if self.chunks.get(i).is_some_and(|c| c.lent != 0 && !c.leaked) {
                log::error!("VirtioBalloon: a chunk still lent at teardown; freed");
            }
            // A leaked chunk is not freed (the driver leaked a page of it).
            self.release(i);
        }
        for i in 0..self.reporting.chunks.len() {
            if self
                .reporting
                .chunks
                .get(i)
                .is_some_and(|c| c.out != 0 && !c.leaked)
            {
                log::error!("VirtioBalloon: a reported chunk still out at teardown; freed");
            }
            // A leaked chunk is not freed: the device may still write it.
            self.release_report_chunk(i);
        }
    }
}

type Driver = BalloonDriver<FamilyBus, ChunkPool>;

/// One virtio balloon device (opaque to C).
pub struct VbalDevice {
    /// `None` once stopped.
    drv: Option<Driver>,
    cb: VbalCallbacks,
    family: *mut VfamDevice,
    interrupts: u64,
    recoveries: u64,
    suspends: u64,
    /// The kernel ran short while inflating: the driver waits for a new target or a poll,
    /// so the shim's retry timer must keep running even when later interrupts (the
    /// acknowledgements of what was inflated) report nothing new.
    starved: bool,
    asleep: bool,
    stopped: bool,
    /// When the balloon last gave memory back for pressure (the shim's clock, ms).
    last_pressure_ms: Option<u64>,
    pressure_deflates: u64,
    /// When the last reporting round started (the shim's clock, ms).
    last_report_ms: Option<u64>,
    /// Emptying the balloon before sleep or stop ([`vbal_drain`]), until the reset.
    drain: Option<Drain>,
}

/// [`vbal_drain`]'s progress, on the shim's clock (ms).
#[derive(Copy, Clone, Debug)]
struct Drain {
    started_ms: u64,
    /// When the device last acknowledged a request (or the drain started).
    progress_ms: u64,
    /// The latest clock reading (an earlier one passed later counts as this).
    now_ms: u64,
    /// Pages the device had acknowledged (inflated and deflated) at `progress_ms`.
    acked: u64,
    /// The final status once decided (not [`VBAL_E_BUSY`]): later calls repeat it.
    outcome: Option<i32>,
}

/// Pages whose inflate or deflate the device has acknowledged: grows with every
/// acknowledged request.
fn acked_pages(drv: &Driver) -> u64 {
    let c = drv.counters();
    c.pages_inflated.wrapping_add(c.pages_deflated)
}

fn dev<'a>(p: *mut VbalDevice) -> Option<&'a mut VbalDevice> {
    // SAFETY: a non-null handle comes from `vbal_create` and stays valid until
    // `vbal_destroy`; the shim serialises every call on its work loop.
    unsafe { p.as_mut() }
}

/// The family calls this (registered by [`vbal_create`]) from its interrupt actions.
unsafe extern "C" fn family_interrupt(ctx: *mut c_void, vector: i32) {
    // SAFETY: ctx is the VbalDevice registered in vbal_create and unregistered (on the same
    // work loop) before it is freed.
    unsafe { vbal_interrupt(ctx.cast(), vector) }
}

impl VbalDevice {
    /// Stopped, asleep, or emptying the balloon before one of them: only the interrupt
    /// entry, [`vbal_drain`] and [`vbal_info`] do anything.
    fn idle(&self) -> bool {
        self.stopped || self.asleep || self.drain.is_some()
    }

    /// After DEVICE_NEEDS_RESET or a device fault: reset (every page back to the pool)
    /// and inflate to the target again. A failed restart leaves the driver stopped until
    /// the next wake.
    fn recover(&mut self, why: &dyn core::fmt::Display) {
        log::warn!("VirtioBalloon: device fault ({why}); resetting it");
        self.recoveries += 1;
        if let Some(drv) = self.drv.as_mut() {
            if let Err(e) = drv.restart() {
                log::error!("VirtioBalloon: the device did not come back: {e}");
            }
            // The reset gave every reported range back; no round survives it.
            drv.pool_mut().end_report_round();
        }
        self.restarted();
    }

    /// After a restart the driver's inflation result is not reported: until the balloon
    /// is at its target, the shim polls (cheap; it retries only what is missing).
    fn restarted(&mut self) {
        self.starved = self
            .drv
            .as_ref()
            .is_some_and(|d| !d.is_stopped() && !d.at_target());
    }

    /// Takes in the outcome of one interrupt or poll.
    fn settle(&mut self, r: Result<virtio_balloon::BalloonEvent, BalloonError>) {
        if let Some(drain) = self.drain.as_mut() {
            // Emptying before a reset: a device that breaks now is not recovered (that
            // would inflate again); the drain ends and the reset follows.
            let broken = match r {
                Ok(ev) => ev.needs_reset,
                Err(_) => true,
            };
            if broken && drain.outcome.is_none() {
                log::error!("VirtioBalloon: the device broke while the balloon was emptied");
                drain.outcome = Some(VBAL_E_DEVICE);
            }
            return;
        }
        match r {
            Ok(ev) if ev.needs_reset => self.recover(&"DEVICE_NEEDS_RESET"),
            Ok(ev) => {
                // A new target makes the driver try again by itself.
                if ev.target_changed.is_some() {
                    self.starved = false;
                }
                self.starved |= ev.starved;
            }
            // Stopped by a failed restart: nothing to do until a wake.
            Err(BalloonError::Stopped) => self.starved = false,
            Err(e) => self.recover(&e),
        }
    }

    /// The driver's OOM deflate of up to `pages` kernel pages, as a `vbal_*` status.
    fn oom_deflate(&mut self, pages: u64) -> Result<VbalOom, i32> {
        let Some(drv) = self.drv.as_mut() else {
            return Err(VBAL_E_STOPPED);
        };
        let pages = usize::try_from(pages).unwrap_or(usize::MAX);
        match drv.deflate_for_oom(pages) {
            Ok(r) => Ok(VbalOom {
                released: r.released as u64,
                pending: r.pending as u64,
            }),
            Err(BalloonError::NotNegotiated) => Err(VBAL_E_UNSUPPORTED),
            Err(BalloonError::Stopped) => Err(VBAL_E_DEVICE),
            Err(e) => {
                self.recover(&e);
                Err(VBAL_E_DEVICE)
            }
        }
    }

    /// [`vbal_report_check`]'s decision and round: a status and a `VBAL_REPORT_*` outcome.
    fn report_round(&mut self, now_ms: u64, out: &mut VbalReport) -> (i32, u32) {
        let Some(drv) = self.drv.as_mut() else {
            return (VBAL_E_STOPPED, VBAL_REPORT_NONE);
        };
        if drv.pool().reporting.busy() {
            return (VBAL_OK, VBAL_REPORT_BUSY);
        }
        if self
            .last_report_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < u64::from(VBAL_REPORT_MS))
        {
            return (VBAL_OK, VBAL_REPORT_TOO_SOON);
        }
        let gate = drv.pool_mut().report_gate();
        out.level = drv.pool().reporting.last_level;
        out.free_bytes = drv.pool().reporting.last_free;
        match gate {
            Ok(()) => {}
            Err(Gate::Unreadable) => return (VBAL_E_UNAVAILABLE, VBAL_REPORT_UNREADABLE),
            Err(g) => return (VBAL_OK, g.outcome()),
        }
        self.last_report_ms = Some(now_ms);
        let pool = drv.pool_mut();
        pool.start_report_round();
        pool.reporting.outcome = VBAL_REPORT_SENT;
        match drv.report_free_pages() {
            Ok(0) => {
                // The kernel gave nothing (the pool closed the round).
                let pool = drv.pool_mut();
                pool.end_report_round();
                (VBAL_OK, VBAL_REPORT_NO_MEMORY)
            }
            Ok(n) => {
                out.ranges = n as u64;
                (VBAL_OK, VBAL_REPORT_SENT)
            }
            Err(BalloonError::Stopped) => {
                drv.pool_mut().end_report_round();
                (VBAL_E_DEVICE, VBAL_REPORT_NONE)
            }
            Err(e) => {
                // The driver gave the ranges back (not queued); reset the broken device.
                self.recover(&e);
                (VBAL_E_DEVICE, VBAL_REPORT_NONE)
            }
        }
    }

    /// Tells the shim, as the last use of `self` (the callback may re-enter).
    fn notify(&self) {
        let cb = self.cb;
        let starved = self.starved;
        if let Some(f) = cb.changed {
            // SAFETY: the shim's callback with its own context.
            unsafe { f(cb.ctx, starved) };
        }
    }
}

/// Brings up the balloon device behind the family handle `family` (the nub's
/// `virtioDevice()`): negotiates MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM and
/// PAGE_REPORTING when offered (never FREE_PAGE_HINT),
/// reads the target and starts inflating (pages through `callbacks`). Registers the
/// interrupt entry with the family and returns the handle in `*out`.
///
/// # Safety
/// `family` is a live family handle that outlives the returned device; `config` and
/// `callbacks` point to valid values; the callbacks' `ctx` stays valid until
/// [`vbal_destroy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_create(
    family: *mut VfamDevice,
    config: *const VbalConfig,
    callbacks: *const VbalCallbacks,
    out: *mut *mut VbalDevice,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(o) = (unsafe { out.as_mut() }) else {
        return VBAL_E_INVALID;
    };
    *o = core::ptr::null_mut();
    // SAFETY: null or valid (C contract).
    let (Some(cb), Some(config)) = (unsafe { callbacks.as_ref() }.copied(), unsafe {
        config.as_ref()
    }) else {
        return VBAL_E_INVALID;
    };
    if family.is_null()
        || cb.alloc_chunk.is_none()
        || cb.free_chunk.is_none()
        || config.max_pages == 0
        || virtio_balloon::wire::frames_per_page(config.page_size as usize).is_none()
    {
        return VBAL_E_INVALID;
    }
    let max_pages = balloon_bound(&cb, config);
    // The tables before the device: a refusal leaves nothing to undo.
    let Some(pool) = ChunkPool::new(cb, config, max_pages) else {
        log::error!(
            "VirtioBalloon: no memory for the tables of a {max_pages}-page balloon; lower \
             virtiodarwin_balloon_max_mib"
        );
        return VBAL_E_NO_MEMORY;
    };
    // SAFETY: `family` is the live handle (caller contract); no other driver uses it.
    let Some(bus) = (unsafe { FamilyBus::new(family) }) else {
        return VBAL_E_INVALID;
    };
    let options = BalloonOptions {
        max_pages,
        deflate_on_oom: true,
        // Hinting would hold free memory for a whole migration round (see the crate
        // documentation); reporting takes bounded rounds of wired chunks.
        free_page_hint: false,
        page_reporting: true,
        ..BalloonOptions::default()
    };
    let drv = match BalloonDriver::new(bus, pool, options) {
        Ok(d) => d,
        Err(BalloonError::BadPageSize { .. }) => return VBAL_E_INVALID,
        Err(BalloonError::NoMemory) => {
            log::error!(
                "VirtioBalloon: no memory to track a {max_pages}-page balloon; lower \
                 virtiodarwin_balloon_max_mib"
            );
            return VBAL_E_NO_MEMORY;
        }
        Err(e) => {
            log::error!("VirtioBalloon: device setup failed: {e}");
            return VBAL_E_DEVICE;
        }
    };
    let mut d = Box::new(VbalDevice {
        drv: Some(drv),
        cb,
        family,
        interrupts: 0,
        recoveries: 0,
        suspends: 0,
        starved: false,
        asleep: false,
        stopped: false,
        last_pressure_ms: None,
        pressure_deflates: 0,
        last_report_ms: None,
        drain: None,
    });
    d.restarted();
    d.notify();
    let raw = Box::into_raw(d);
    // SAFETY: live family handle; the context is the boxed device, unregistered in
    // vbal_stop (which vbal_destroy runs) before it is freed.
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(
            family,
            Some(family_interrupt),
            raw.cast(),
        )
    };
    *o = raw;
    VBAL_OK
}

/// The interrupt entry (the family calls it through the handler [`vbal_create`]
/// registered; `vector` is the MSI-X index or -1 for INTx): re-reads the target on a
/// config change, handles completions (writing `actual`), answers the stats queue,
/// recovers from DEVICE_NEEDS_RESET or a broken queue, then calls
/// [`VbalCallbacks::changed`].
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_interrupt(d: *mut VbalDevice, vector: i32) {
    let Some(d) = dev(d) else { return };
    if d.stopped || d.asleep {
        return;
    }
    let Some(drv) = d.drv.as_mut() else { return };
    d.interrupts += 1;
    let r = drv.handle_interrupt(vector_from_abi(vector));
    d.settle(r);
    d.notify();
}

/// What an interrupt does, without one: re-reads the target, handles completions and
/// retries inflating after the kernel ran short. Then calls [`VbalCallbacks::changed`].
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_poll(d: *mut VbalDevice) -> i32 {
    let Some(d) = dev(d) else {
        return VBAL_E_INVALID;
    };
    if d.idle() {
        return VBAL_E_STOPPED;
    }
    let Some(drv) = d.drv.as_mut() else {
        return VBAL_E_STOPPED;
    };
    // The driver retries what the kernel could not give; it reports starvation again if
    // memory is still short.
    d.starved = false;
    let r = drv.poll();
    let failed = r.is_err();
    d.settle(r);
    d.notify();
    if failed { VBAL_E_DEVICE } else { VBAL_OK }
}

/// The DEFLATE_ON_OOM hook: takes up to `pages` kernel pages out of the balloon for a
/// guest under memory pressure (one request now, the rest as the device acknowledges;
/// chunks go back to the kernel as they empty). The balloon then holds until the host
/// sets a new target.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_deflate_for_oom(
    d: *mut VbalDevice,
    pages: u64,
    out: *mut VbalOom,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VBAL_E_INVALID;
    };
    *out = VbalOom::default();
    if d.idle() {
        return VBAL_E_STOPPED;
    }
    match d.oom_deflate(pages) {
        Ok(r) => {
            *out = r;
            VBAL_OK
        }
        Err(status) => status,
    }
}

/// The shim's memory-pressure timer (every [`VBAL_PRESSURE_MS`] while DEFLATE_ON_OOM is
/// negotiated; `now_ms` is a monotonic clock in milliseconds): reads
/// `kern.memorystatus_vm_pressure_level` through [`VbalCallbacks::read_sysctl`] and, at
/// warning (2) or critical (4), takes [`VBAL_PRESSURE_WARN_MIB`] or
/// [`VBAL_PRESSURE_CRITICAL_MIB`] MiB out of the balloon as [`vbal_deflate_for_oom`]
/// does, unless it already did less than [`VBAL_PRESSURE_MS`] before. Normal (1), or any
/// other value, does nothing. `VBAL_E_UNAVAILABLE` when the level cannot be read,
/// `VBAL_E_UNSUPPORTED` without DEFLATE_ON_OOM.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_pressure_check(
    d: *mut VbalDevice,
    now_ms: u64,
    out: *mut VbalPressure,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VBAL_E_INVALID;
    };
    *out = VbalPressure::default();
    if d.idle() {
        return VBAL_E_STOPPED;
    }
    let Some(drv) = d.drv.as_mut() else {
        return VBAL_E_STOPPED;
    };
    if !drv.features().contains(DEFLATE_ON_OOM) {
        return VBAL_E_UNSUPPORTED;
    }
    let page_size = drv.pool().page_size as u64;
    let Some(level) = drv.pool_mut().read_pressure() else {
        return VBAL_E_UNAVAILABLE;
    };
    out.level = level;
    let mib = match level {
        VBAL_PRESSURE_WARN => VBAL_PRESSURE_WARN_MIB,
        VBAL_PRESSURE_CRITICAL => VBAL_PRESSURE_CRITICAL_MIB,
        _ => return VBAL_OK,
    };
    if d.last_pressure_ms
        .is_some_and(|t| now_ms.saturating_sub(t) < u64::from(VBAL_PRESSURE_MS))
    {
        return VBAL_OK;
    }
    d.last_pressure_ms = Some(now_ms);
    let pages = (u64::from(mib) << 20) / page_size.max(1);
    match d.oom_deflate(pages) {
        Ok(r) => {
            if r.released.saturating_add(r.pending) > 0 {
                d.pressure_deflates += 1;
            }
            out.released = r.released;
            out.pending = r.pending;
            VBAL_OK
        }
        Err(status) => status,
    }
}

/// The shim's reporting timer (every [`VBAL_REPORT_MS`] while PAGE_REPORTING is
/// negotiated; `now_ms` is a monotonic clock in milliseconds): starts a free page reporting
/// round (see the crate documentation) unless a report of the last one is still with the
/// device, one started less than [`VBAL_REPORT_MS`] before, the pressure level is not
/// normal, or the kernel's free memory is not well above the floor. `out.outcome` says
/// which. `VBAL_E_UNAVAILABLE` when the figures cannot be read, `VBAL_E_UNSUPPORTED`
/// without PAGE_REPORTING, `VBAL_E_STOPPED` asleep or stopped, `VBAL_E_DEVICE` when the
/// device broke (it is reset; the shim keeps calling).
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_report_check(
    d: *mut VbalDevice,
    now_ms: u64,
    out: *mut VbalReport,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VBAL_E_INVALID;
    };
    *out = VbalReport::default();
    if d.idle() {
        return VBAL_E_STOPPED;
    }
    let Some(drv) = d.drv.as_mut() else {
        return VBAL_E_STOPPED;
    };
    if !drv.features().contains(PAGE_REPORTING) {
        return VBAL_E_UNSUPPORTED;
    }
    let (status, outcome) = d.report_round(now_ms, out);
    out.outcome = outcome;
    if let Some(drv) = d.drv.as_mut() {
        drv.pool_mut().reporting.outcome = outcome;
    }
    status
}

/// State and counters for the IORegistry.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_info(d: *mut VbalDevice, out: *mut VbalInfo) -> i32 {
    // SAFETY: null or valid (C contract).
    let (Some(d), Some(out)) = (dev(d), unsafe { out.as_mut() }) else {
        return VBAL_E_INVALID;
    };
    let mut i = VbalInfo {
        interrupts: d.interrupts,
        recoveries: d.recoveries,
        suspends: d.suspends,
        pressure_deflates: d.pressure_deflates,
        ..VbalInfo::default()
    };
    if let Some(drv) = d.drv.as_ref() {
        let c = drv.counters();
        let p = drv.pool();
        i.target_frames = drv.num_pages();
        i.actual_frames = drv.actual();
        let report_pages = p.reporting.pages();
        i.pages_held = (p.live_chunks() * CHUNK - p.spare) as u64;
        i.pages_wired =
            ((p.live_chunks() * CHUNK + report_pages) as u64).saturating_add(p.pages_leaked);
        i.page_size = p.page_size as u32;
        i.deflate_on_oom = u32::from(drv.features().contains(DEFLATE_ON_OOM));
        i.pressure_level = p.pressure_level;
        i.page_reporting = u32::from(drv.features().contains(PAGE_REPORTING));
        i.report_outcome = p.reporting.outcome;
        i.report_rounds = p.reporting.rounds;
        i.reports = c.reports;
        i.bytes_reported = p.reporting.bytes_reported;
        i.report_pages = report_pages as u64;
        i.report_cut_short = p.reporting.cut_short;
        i.report_chunks_leaked = p.reporting.chunks_leaked;
        i.balloon_chunks_leaked = p.chunks_leaked;
        i.pages_leaked = p.pages_leaked;
        i.inflate_requests = c.inflate_requests;
        i.deflate_requests = c.deflate_requests;
        i.stats_buffers = c.stats_buffers;
        i.oom_pages = c.oom_pages;
        i.alloc_failures = p.alloc_failures;
        i.chunks_allocated = p.chunks_allocated;
        i.chunks_freed = p.chunks_freed;
        i.sysctl_failures = p.sysctl_failures;
    }
    *out = i;
    VBAL_OK
}

/// Empties the balloon before sleep or stop, telling the host of every page it gives back
/// (see the crate documentation). The first call closes reporting, stops following the
/// target and posts the first deflate; each call handles what the device has acknowledged
/// (writing `actual`) and posts the next request. `now_ms` is a monotonic clock in
/// milliseconds.
///
/// Returns [`VBAL_OK`] once the device has acknowledged every page; [`VBAL_E_BUSY`] while
/// it holds some: wait, with the gate open so that interrupts are delivered, for `changed`
/// or [`VBAL_DRAIN_POLL_MS`], then call again; [`VBAL_E_TIMEOUT`] when the device
/// acknowledged nothing for [`VBAL_DRAIN_STALL_MS`] or emptying took [`VBAL_DRAIN_MS`];
/// [`VBAL_E_DEVICE`] when the device broke (DEVICE_NEEDS_RESET or a fault: it is not
/// recovered); [`VBAL_E_STOPPED`] stopped or asleep. Once it has returned anything but
/// [`VBAL_E_BUSY`] it returns the same again. Either way [`vbal_suspend`] or [`vbal_stop`]
/// follows and resets the device; until then every call but [`vbal_interrupt`],
/// [`vbal_drain`] and [`vbal_info`] answers [`VBAL_E_STOPPED`].
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_drain(d: *mut VbalDevice, now_ms: u64) -> i32 {
    let Some(d) = dev(d) else {
        return VBAL_E_INVALID;
    };
    if d.stopped || d.asleep {
        return VBAL_E_STOPPED;
    }
    let Some(drv) = d.drv.as_mut() else {
        return VBAL_E_STOPPED;
    };
    let result = match d.drain.as_mut() {
        None => {
            d.drain = Some(Drain {
                started_ms: now_ms,
                progress_ms: now_ms,
                now_ms,
                acked: acked_pages(drv),
                outcome: None,
            });
            d.starved = false;
            // No new report while emptying: one the device holds comes back or is
            // returned at the reset.
            drv.pool_mut().end_report_round();
            log::info!(
                "VirtioBalloon: giving {} pages back to the host before the reset",
                drv.ballooned_pages()
            );
            drv.deflate_all()
        }
        Some(Drain {
            outcome: Some(status),
            ..
        }) => return *status,
        Some(_) => drv.poll(),
    };
    let status = match result {
        Ok(ev) if ev.needs_reset => {
            log::error!("VirtioBalloon: the device needs a reset while the balloon is emptied");
            VBAL_E_DEVICE
        }
        Ok(_) if drv.is_empty() => {
            log::info!(
                "VirtioBalloon: balloon empty, actual {} frames",
                drv.actual()
            );
            VBAL_OK
        }
        Ok(_) => {
            let acked = acked_pages(drv);
            let Some(drain) = d.drain.as_mut() else {
                return VBAL_E_STOPPED;
            };
            let now = now_ms.max(drain.now_ms);
            drain.now_ms = now;
            if acked != drain.acked {
                drain.acked = acked;
                drain.progress_ms = now;
            }
            let stalled = now - drain.progress_ms >= u64::from(VBAL_DRAIN_STALL_MS);
            let late = now - drain.started_ms >= u64::from(VBAL_DRAIN_MS);
            if stalled || late {
                log::error!(
                    "VirtioBalloon: {}; {} pages left in the balloon go back to the kernel at \
                     the reset (the host may still count them: actual {} frames)",
                    if stalled {
                        "the device stopped acknowledging deflates"
                    } else {
                        "emptying the balloon takes too long"
                    },
                    drv.ballooned_pages(),
                    drv.actual()
                );
                VBAL_E_TIMEOUT
            } else {
                VBAL_E_BUSY
            }
        }
        Err(e) => {
            log::error!("VirtioBalloon: the device broke while the balloon was emptied: {e}");
            VBAL_E_DEVICE
        }
    };
    if status != VBAL_E_BUSY
        && let Some(drain) = d.drain.as_mut()
    {
        drain.outcome = Some(status);
    }
    status
}

/// System sleep (power state 0), after [`vbal_drain`]: the device is reset and every page
/// goes back to the kernel (see the crate documentation for why).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_suspend(d: *mut VbalDevice) -> i32 {
    let Some(d) = dev(d) else {
        return VBAL_E_INVALID;
    };
    if d.stopped {
        return VBAL_E_STOPPED;
    }
    if !d.asleep {
        d.asleep = true;
        d.suspends += 1;
        d.starved = false;
        // The reset ends the drain: after the wake the balloon follows the target again.
        d.drain = None;
        if let Some(drv) = d.drv.as_mut() {
            drv.shutdown();
            // The reset gave every reported range back; no round survives sleep.
            drv.pool_mut().end_report_round();
        }
    }
    VBAL_OK
}

/// Wake (power state 1): the device is initialised from scratch and inflation towards the
/// host's target starts again. An error leaves it asleep (resume may be retried).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_resume(d: *mut VbalDevice) -> i32 {
    let Some(d) = dev(d) else {
        return VBAL_E_INVALID;
    };
    if d.stopped {
        return VBAL_E_STOPPED;
    }
    if !d.asleep {
        return VBAL_OK;
    }
    let Some(drv) = d.drv.as_mut() else {
        return VBAL_E_STOPPED;
    };
    if let Err(e) = drv.restart() {
        log::error!("VirtioBalloon: cannot wake the device: {e}");
        drv.shutdown();
        drv.pool_mut().end_report_round();
        return VBAL_E_DEVICE;
    }
    d.asleep = false;
    d.restarted();
    d.notify();
    VBAL_OK
}

/// Stops the device, after [`vbal_drain`]: unregisters the interrupt entry, resets the
/// device, gives every page and chunk back to the kernel and frees the driver. Later calls
/// fail with `VBAL_E_STOPPED`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_stop(d: *mut VbalDevice) {
    let Some(d) = dev(d) else { return };
    if d.stopped {
        return;
    }
    // SAFETY: the family handle outlives this device (vbal_create contract).
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(d.family, None, core::ptr::null_mut())
    };
    d.stopped = true;
    // Dropping the driver resets the device, returns every page to the pool and frees the
    // DMA region; dropping the pool frees the chunks.
    drop(d.drv.take());
}

/// Frees the device (stopping it first if [`vbal_stop`] was not called).
///
/// # Safety
/// `d` is null or a handle from [`vbal_create`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vbal_destroy(d: *mut VbalDevice) {
    if d.is_null() {
        return;
    }
    // SAFETY: live handle (caller contract).
    unsafe { vbal_stop(d) };
    // SAFETY: from Box::into_raw in vbal_create, dropped once (caller contract).
    drop(unsafe { Box::from_raw(d) });
}

/// Routes `log` to `IOLog` (call once from the kext's start; a no-op in host builds).
#[unsafe(no_mangle)]
pub extern "C" fn vbal_log_init() {
    #[cfg(feature = "kext")]
    {
        static LOGGER: virtio_kext_abi::kernel::IoLogger = virtio_kext_abi::kernel::IoLogger {
            name: "VirtioBalloon",
            level: log::LevelFilter::Info,
        };
        virtio_kext_abi::kernel::init_logging(&LOGGER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_records_cover_the_bound() {
        let cb = VbalCallbacks {
            ctx: core::ptr::null_mut(),
            alloc_chunk: None,
            free_chunk: None,
            changed: None,
            read_sysctl: None,
        };
        let cfg = VbalConfig {
            page_size: 4096,
            max_pages: 65,
            total_pages: 0,
        };
        let p = ChunkPool::new(cb, &cfg, 65).unwrap();
        assert_eq!(p.chunks.len(), 2 + SPARE_CHUNKS);
        assert_eq!(p.live_chunks(), 0);
    }
}
