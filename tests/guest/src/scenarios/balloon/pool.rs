//! The guest's `PagePool`: pages and free ranges straight from the guest heap, with the
//! accounting the scenario checks at the end (every page lent came back exactly once,
//! nothing is left out, nothing foreign or twice returned).
//!
//! - Pages are 4 KiB heap allocations (4 KiB aligned). Lent pages are tracked in a bitmap
//!   over the guest's RAM frames (allocated once, up front: the pool allocates nothing per
//!   page but the page itself). Before a page goes to the balloon its first and last words
//!   get a marker; when it comes back, a page reading zero there was discarded by QEMU
//!   (`madvise(DONTNEED)` on inflate): QEMU's side of the balloon, seen from the guest.
//! - Free ranges (free page reporting) are `range_len`-byte heap allocations, marked the
//!   same way, handed out while `range_budget` lasts and freed when they come back; QEMU
//!   discards reported ranges too, so they come back zeroed.
//! - Statistics are real: total RAM, and the heap's free bytes as free and available
//!   memory. Each set the driver asks for is printed (`BALLOON-STATS ...`) so the host can
//!   match what QEMU shows through `qom-get guest-stats`.

use alloc::alloc::{Layout, alloc, dealloc};
use alloc::vec;
use alloc::vec::Vec;
use virtio_balloon::{FreeRange, MemStats, Page, PagePool, RangeReturn, RangeUse};

const PAGE: usize = 4096;
const MARK: u64 = 0xB411_00F0_0D5A_FE00;

#[derive(Default, Clone, Copy, Debug)]
pub struct Accounting {
    pub lent: u64,
    pub returned: u64,
    /// Returned pages whose markers read zero (discarded by the host).
    pub returned_zeroed: u64,
    /// `free_page` of a page that was not out (twice, or never lent).
    pub double_or_foreign: u64,
    /// Returned pages where a write did not read back.
    pub unusable: u64,
    pub alloc_failures: u64,
    pub ranges_taken: u64,
    pub ranges_returned: u64,
    pub ranges_reported: u64,
    pub ranges_zeroed: u64,
    pub range_errors: u64,
    pub stats_calls: u64,
}

pub struct HeapPool {
    total_pages: usize,
    /// Bit per 4 KiB frame of guest RAM: lent to the driver.
    out: Vec<u64>,
    outstanding: usize,
    /// Most pages lent at once (the balloon cannot take more than the heap has).
    pub limit: usize,
    pub acct: Accounting,
    pub range_budget: usize,
    pub range_len: u32,
    ranges_out: Vec<FreeRange>,
    /// Print each statistics set the driver takes.
    pub print_stats: bool,
}

fn layout(len: usize) -> Layout {
    // 4 KiB is a valid alignment and `len` is a non-zero multiple of it.
    Layout::from_size_align(len, PAGE).unwrap_or(Layout::new::<u8>())
}

/// Writes the marker to the first and last word of `[addr, addr + len)`.
fn mark(addr: u64, len: usize) {
    let p = addr as *mut u64;
    // SAFETY: the range is a live heap allocation of `len` ≥ 4 KiB bytes we own (identity
    // mapped); the device does not have it yet.
    unsafe {
        p.write_volatile(MARK ^ addr);
        p.add(len / 8 - 1).write_volatile(MARK ^ addr);
    }
}

/// Whether both marker words read zero (the host discarded the memory).
fn zeroed(addr: u64, len: usize) -> bool {
    let p = addr as *const u64;
    // SAFETY: as in `mark`; the device has given the memory back.
    unsafe { p.read_volatile() == 0 && p.add(len / 8 - 1).read_volatile() == 0 }
}

impl HeapPool {
    /// A pool for a guest with `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64) -> Self {
        let frames = (ram_bytes as usize).div_ceil(PAGE);
        HeapPool {
            total_pages: frames,
            out: vec![0; frames.div_ceil(64)],
            outstanding: 0,
            limit: frames,
            acct: Accounting::default(),
            range_budget: 0,
            range_len: 256 * 1024,
            ranges_out: Vec::with_capacity(256),
            print_stats: true,
        }
    }

    /// Pages lent and not returned.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    pub fn ranges_outstanding(&self) -> usize {
        self.ranges_out.len()
    }

    /// Bits still set in the bitmap (must equal `outstanding`).
    pub fn bitmap_count(&self) -> usize {
        self.out.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn bit(&mut self, addr: u64) -> Option<(&mut u64, u64)> {
        let f = (addr / PAGE as u64) as usize;
        self.out.get_mut(f / 64).map(|w| (w, 1u64 << (f % 64)))
    }
}

impl PagePool for HeapPool {
    fn page_size(&self) -> usize {
        PAGE
    }

    fn total_pages(&self) -> usize {
        self.total_pages
    }

    fn alloc_page(&mut self) -> Option<Page> {
        if self.outstanding >= self.limit {
            self.acct.alloc_failures += 1;
            return None;
        }
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout(PAGE)) };
        if p.is_null() {
            self.acct.alloc_failures += 1;
            return None;
        }
        let addr = p as u64;
        let Some((w, b)) = self.bit(addr) else {
            // Beyond guest RAM as we know it: cannot track it, do not lend it.
            // SAFETY: allocated just above with this layout.
            unsafe { dealloc(p, layout(PAGE)) };
            self.acct.alloc_failures += 1;
            return None;
        };
        *w |= b;
        mark(addr, PAGE);
        self.outstanding += 1;
        self.acct.lent += 1;
        Some(Page { addr })
    }

    fn free_page(&mut self, page: Page) {
        let addr = page.addr;
        let ok = addr.is_multiple_of(PAGE as u64)
            && match self.bit(addr) {
                Some((w, b)) if *w & b != 0 => {
                    *w &= !b;
                    true
                }
                _ => false,
            };
        if !ok {
            // Never free what we did not lend (or already got back).
            self.acct.double_or_foreign += 1;
            log::error!("balloon pool: page {addr:#x} returned but not lent");
            return;
        }
        if zeroed(addr, PAGE) {
            self.acct.returned_zeroed += 1;
        }
        // The page is usable again: what we write reads back.
        mark(addr, PAGE);
        if zeroed(addr, PAGE) {
            self.acct.unusable += 1;
        }
        // SAFETY: lent by `alloc_page` with this layout (the bitmap says so), returned once.
        unsafe { dealloc(addr as *mut u8, layout(PAGE)) };
        self.outstanding -= 1;
        self.acct.returned += 1;
    }

    fn stats(&mut self) -> MemStats {
        let (_, free) = crate::heap::usage();
        let total = self.total_pages as u64 * PAGE as u64;
        self.acct.stats_calls += 1;
        if self.print_stats {
            crate::println!(
                "BALLOON-STATS seq={} total={total} free={free} avail={free}",
                self.acct.stats_calls
            );
        }
        MemStats {
            mem_total: Some(total),
            mem_free: Some(free as u64),
            mem_available: Some(free as u64),
            ..MemStats::default()
        }
    }

    fn take_free_range(&mut self, purpose: RangeUse) -> Option<FreeRange> {
        if purpose != RangeUse::Report || self.range_budget == 0 {
            return None;
        }
        let len = self.range_len as usize;
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout(len)) };
        if p.is_null() {
            return None;
        }
        self.range_budget -= 1;
        let r = FreeRange {
            addr: p as u64,
            len: self.range_len,
        };
        mark(r.addr, len);
        self.ranges_out.push(r);
        self.acct.ranges_taken += 1;
        Some(r)
    }

    fn return_free_range(&mut self, range: FreeRange, _purpose: RangeUse, how: RangeReturn) {
        let Some(i) = self.ranges_out.iter().position(|r| *r == range) else {
            self.acct.range_errors += 1;
            log::error!("balloon pool: range {range:?} returned but not taken");
            return;
        };
        self.ranges_out.swap_remove(i);
        if how == RangeReturn::Leaked {
            // The device would not reset and may still write it: never reused, never freed.
            self.acct.range_errors += 1;
            log::error!("balloon pool: range {range:?} leaked (the device may still write it)");
            return;
        }
        if how == RangeReturn::Reported {
            self.acct.ranges_reported += 1;
        } else {
            self.acct.range_errors += 1;
        }
        if zeroed(range.addr, range.len as usize) {
            self.acct.ranges_zeroed += 1;
        }
        // SAFETY: allocated by `take_free_range` with this layout, returned once (it was in
        // `ranges_out`).
        unsafe { dealloc(range.addr as *mut u8, layout(range.len as usize)) };
        self.acct.ranges_returned += 1;
    }
}
