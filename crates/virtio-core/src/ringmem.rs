//! What the split and the packed ring share: the ring's DMA memory as the driver touches it
//! (volatile, little-endian, inside bounds fixed at setup), and the pool of indirect tables
//! (one table per chain slot, §2.7.5.3 and §2.8.7).

use core::ptr::NonNull;

use crate::error::{Error, Result};
use crate::platform::{DeviceAddr, DmaRegion};
use crate::queue::Segment;
use crate::ring::DescFlags;

/// A ring's DMA region with the number of bytes its layout uses.
pub(crate) struct RingMemory {
    region: DmaRegion,
    /// Bytes the layout uses (`<= region.len`, checked in `new`).
    len: usize,
}

impl RingMemory {
    /// `region` holding a layout of `len` bytes; `None` when it is too small.
    pub(crate) fn new(region: DmaRegion, len: usize) -> core::result::Result<Self, DmaRegion> {
        if region.len < len {
            return Err(region);
        }
        Ok(RingMemory { region, len })
    }

    pub(crate) fn daddr(&self) -> DeviceAddr {
        self.region.daddr
    }

    pub(crate) fn into_region(self) -> DmaRegion {
        self.region
    }

    /// Pointer to `offset`. Offsets come only from the ring layouts, which keep every field
    /// inside `len`.
    #[inline]
    pub(crate) fn ptr(&self, offset: usize) -> NonNull<u8> {
        debug_assert!(offset < self.len);
        // SAFETY: offset < len <= region.len (checked in `new`).
        unsafe { self.region.vaddr.add(offset) }
    }

    #[inline]
    pub(crate) fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: in bounds (see `ptr`), 2-aligned by the layouts; volatile because the
        // device writes this memory concurrently.
        u16::from_le(unsafe { self.ptr(offset).cast::<u16>().as_ptr().read_volatile() })
    }

    #[inline]
    pub(crate) fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: in bounds, 4-aligned (used elements, descriptor lengths, the packed ring's
        // device event structure); volatile as above.
        u32::from_le(unsafe { self.ptr(offset).cast::<u32>().as_ptr().read_volatile() })
    }

    #[inline]
    pub(crate) fn write_u16(&mut self, offset: usize, value: u16) {
        // SAFETY: in bounds, 2-aligned; volatile because the device reads it concurrently.
        unsafe {
            self.ptr(offset)
                .cast::<u16>()
                .as_ptr()
                .write_volatile(value.to_le())
        }
    }

    /// Zeroes the layout's bytes (plain, non-volatile writes). Only while the device does
    /// not use the ring: before setup, or after a reset it acknowledged or with its DMA
    /// stopped — never after a reset that failed (`reclaim_abandoned` leaves the ring as
    /// it is then).
    pub(crate) fn zero(&mut self) {
        if let Some(p) = self.region.ptr_at(0, self.len) {
            // SAFETY: inside the allocation (checked by `ptr_at`); no concurrent device
            // access, so plain writes do not race: the callers' contract above.
            unsafe { core::ptr::write_bytes(p.as_ptr(), 0, self.len) };
        }
    }
}

/// A chain's indirect table as [`IndirectPool::write_table`] wrote it.
pub(crate) struct Table {
    /// Where the device finds it.
    pub(crate) daddr: DeviceAddr,
    /// Its length in bytes (16 per entry).
    pub(crate) len: u32,
    /// The chain's device-writable bytes: the bound for the used length.
    pub(crate) writable: u32,
    /// One past its last entry.
    pub(crate) end: NonNull<u8>,
}

/// Indirect tables: `size` tables of `max` 16-byte entries, table `i` for chain slot `i`
/// (a split ring's head, a packed ring's buffer id).
pub(crate) struct IndirectPool {
    region: Option<DmaRegion>,
    /// Entries per table (0: no indirect tables).
    max: u16,
}

impl IndirectPool {
    /// A pool over `region` for a ring of `size` slots with tables of `max` entries (used
    /// only when `max > 1`).
    pub(crate) fn new(region: Option<DmaRegion>, size: u16, max: u16) -> Result<Self> {
        let max = match &region {
            Some(pool) if max > 1 => {
                let needed = size as usize * max as usize * 16;
                // Descriptors are 16-aligned (§2.7.5, §2.8.1): so are the tables.
                if pool.len < needed || max > size || pool.vaddr.as_ptr().addr() % 16 != 0 {
                    return Err(Error::BadChain);
                }
                max
            }
            _ => 0,
        };
        Ok(IndirectPool { region, max })
    }

    /// Entries per table (0: none).
    pub(crate) fn max(&self) -> u16 {
        self.max
    }

    /// Ring descriptors a chain of `segments` segments takes: one when it goes through a
    /// table (tables exist, more than one segment, and it fits), else one per segment.
    #[inline]
    pub(crate) fn descriptors_for(&self, segments: usize) -> usize {
        if self.holds(segments) { 1 } else { segments }
    }

    /// Whether a chain of `segments` goes in one table: tables exist (`max` is 0 or at
    /// least 2), more than one segment, and it fits.
    #[inline]
    pub(crate) fn holds(&self, segments: usize) -> bool {
        segments > 1 && segments <= self.max as usize
    }

    /// The table of slot `slot`.
    pub(crate) fn table(&self, slot: u16) -> Option<NonNull<u8>> {
        let entry = self.max as usize * 16;
        self.region.as_ref()?.ptr_at(slot as usize * entry, entry)
    }

    /// Writes slot `slot`'s table for a chain of `readable` then `writable` segments
    /// (2..=max of them, else `BadChain`). Each entry is written by `entry`,
    /// the ring's own format, which is handed the entry (16 writable, 16-aligned bytes of
    /// the table, not yet published), its segment, its flags (WRITE for a device-writable
    /// segment) and its index + 1 (the split ring's `next` link). `BadChain` when the
    /// writable bytes overflow the 32-bit used length: the table is then unpublished
    /// scratch. Both rings' indirect path.
    #[inline(always)]
    pub(crate) fn write_table(
        &self,
        slot: u16,
        readable: &[Segment],
        writable: &[Segment],
        mut entry: impl FnMut(NonNull<u8>, &Segment, DescFlags, u16),
    ) -> Result<Table> {
        // The callers checked this already (the compiler merges the two checks); here it
        // is what keeps every entry written below inside the table (max >= the count).
        if !self.holds(readable.len() + writable.len()) {
            return Err(Error::BadChain);
        }
        let Some(start) = self.table(slot) else {
            return Err(Error::BadChain);
        };
        let mut p = start;
        let mut i: u16 = 0;
        for seg in readable {
            i += 1;
            entry(p, seg, DescFlags::empty(), i);
            // SAFETY: at most one past the last entry, inside or at the end of the table.
            p = unsafe { p.add(16) };
        }
        let mut writable_len: u32 = 0;
        for seg in writable {
            writable_len = writable_len.checked_add(seg.len).ok_or(Error::BadChain)?;
            i += 1;
            entry(p, seg, DescFlags::WRITE, i);
            // SAFETY: as above.
            p = unsafe { p.add(16) };
        }
        Ok(Table {
            daddr: self.daddr(slot),
            len: u32::from(i) * 16,
            writable: writable_len,
            end: p,
        })
    }

    /// Where the device sees the table of slot `slot`.
    pub(crate) fn daddr(&self, slot: u16) -> DeviceAddr {
        let base = self.region.as_ref().map_or(0, |p| p.daddr);
        base + (slot as u64) * (self.max as u64) * 16
    }

    pub(crate) fn into_region(self) -> Option<DmaRegion> {
        self.region
    }
}
