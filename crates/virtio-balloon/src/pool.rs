//! What the platform supplies: pages for the balloon, free ranges for hinting and
//! reporting, and memory statistics.
//!
//! - **IOKit kext**: pages from the VM system (e.g. wired physical pages the kext allocates
//!   and frees), free ranges isolated from the free list for the duration of a report, the
//!   kernel's memory figures (VirtioBalloon.kext reads them with `sysctlbyname`).
//! - **Bare-metal guest / simulation**: a page allocator over a memory arena.

use crate::wire::tag;

/// One platform page, named by its guest-physical address (what the device sees; aligned to
/// [`PagePool::page_size`]). Eight bytes: the driver keeps one per ballooned page in an array
/// allocated at setup.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Page {
    pub addr: u64,
}

/// A run of free guest-physical memory the platform has isolated from its allocator (so
/// nothing else uses it while the device looks at it). `addr` and `len` are multiples of
/// 4 KiB; `len` is at least 4 KiB.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FreeRange {
    pub addr: u64,
    pub len: u32,
}

/// Why a free range is taken.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RangeUse {
    /// Free page reporting (§5.5.6.6): the platform should offer ranges not reported since
    /// they were last allocated.
    Report,
    /// Free page hinting (§5.5.6.4), during a migration round.
    Hint,
}

/// How a range comes back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RangeReturn {
    /// The device acknowledged the report (the platform may mark it "reported").
    Reported,
    /// Hinting is over (the device said DONE, or the driver stopped): its contents were
    /// possibly discarded; the platform must treat them as uninitialized (§5.5.6.4.1).
    HintReleased,
    /// Never reached the device (invalid, or the driver could not post it).
    Unused,
    /// The device was reset while it held the range.
    Reset,
    /// The device held the range and would not reset, and its DMA could not be stopped
    /// (`virtio_core::Bus::reset` failed): it may still write the range. The platform must
    /// never use it again (leak it).
    Leaked,
}

/// Memory statistics the platform can supply (§5.5.6.3); `None` = not available here.
/// Sizes are in bytes.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub mem_free: Option<u64>,
    pub mem_total: Option<u64>,
    pub mem_available: Option<u64>,
    pub caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
}

impl MemStats {
    /// The values indexed by tag (0..=9).
    pub fn by_tag(&self) -> [Option<u64>; tag::COUNT] {
        [
            self.swap_in,
            self.swap_out,
            self.major_faults,
            self.minor_faults,
            self.mem_free,
            self.mem_total,
            self.mem_available,
            self.caches,
            self.hugetlb_allocations,
            self.hugetlb_failures,
        ]
    }
}

/// The platform's memory, as the balloon uses it.
///
/// The driver never leaks or double-returns: every page from `alloc_page` comes back
/// through `free_page` exactly once (at the latest at `shutdown` or drop), or through
/// `leak_page` when the platform must never use it again, every range from
/// `take_free_range` through `return_free_range` exactly once (as
/// [`RangeReturn::Leaked`] when the platform must never use it again).
pub trait PagePool {
    /// Size of a platform page in bytes: a power of two from 4 KiB to 1 MiB (Darwin: 4 KiB
    /// on x86_64, 16 KiB on arm64). A page is `page_size / 4096` consecutive balloon frames.
    fn page_size(&self) -> usize;

    /// Platform pages of guest memory: the bound on the balloon when the caller gives none.
    fn total_pages(&self) -> usize;

    /// Takes one page out of circulation for the balloon; `None` when memory is short (the
    /// driver stops inflating until the next config change or [`crate::BalloonDriver::poll`]).
    fn alloc_page(&mut self) -> Option<Page>;

    /// Gives back a page from `alloc_page`. Its contents are undefined: the host may have
    /// discarded them while it was in the balloon.
    fn free_page(&mut self, page: Page);

    /// Gives up a page from `alloc_page` for good: it was in an inflate request the device
    /// had not used when a reset failed and the device's DMA could not be stopped
    /// (`virtio_core::Bus::reset`). Such a device may still process the request, and
    /// inflating makes the host discard the pages' backing (§5.5.6.1; QEMU:
    /// `ram_block_discard_range`), which would wipe the page under its next user. The
    /// platform must never use it again (leak it, as [`RangeReturn::Leaked`] ranges). The
    /// default forgets it.
    fn leak_page(&mut self, _page: Page) {}

    /// Current statistics. The driver fixes the set of tags at setup from the first call
    /// (§5.5.6.3.1: the same subset in every buffer); a tag missing later is sent with its
    /// last value.
    fn stats(&mut self) -> MemStats {
        MemStats::default()
    }

    /// Isolates a free range for reporting or hinting; `None` when there is none (left).
    fn take_free_range(&mut self, _purpose: RangeUse) -> Option<FreeRange> {
        None
    }

    /// Gives back a range from `take_free_range`.
    fn return_free_range(&mut self, _range: FreeRange, _purpose: RangeUse, _how: RangeReturn) {}
}
