//! Split-ring wire layouts (virtio 1.2 §2.7): descriptor, available and used rings, with the
//! event-suppression fields, and the byte layout of a whole ring for either transport.

use bitflags::bitflags;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::types::RingLayoutKind;

/// Largest queue size the spec allows (§2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Legacy ring alignment and page-frame unit (§2.7.2 legacy interface).
pub const LEGACY_ALIGN: usize = 4096;

/// One descriptor-table entry (§2.7.5).
#[derive(Copy, Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Descriptor {
    pub addr: U64,
    pub len: U32,
    pub flags: U16,
    pub next: U16,
}

bitflags! {
    /// Descriptor flags (§2.7.5).
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    pub struct DescFlags: u16 {
        /// The chain continues at `next`.
        const NEXT = 1;
        /// Device-writable buffer (otherwise device-readable).
        const WRITE = 2;
        /// The buffer is a table of descriptors (§2.7.5.3).
        const INDIRECT = 4;
    }
}

/// One used-ring element (§2.7.8).
#[derive(Copy, Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct UsedElem {
    /// Head index of the completed chain (u32 on the wire; validated against the ring size).
    pub id: U32,
    /// Bytes the device wrote into the chain's writable part (validated against capacity).
    pub len: U32,
}

/// `avail.flags`: ask the device not to interrupt (§2.7.7; ignored with EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device asks not to be notified (§2.7.10; ignored with EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Byte offsets of one split ring's parts inside a single allocation.
///
/// Available ring: `flags u16, idx u16, ring[N] u16, used_event u16` = 6 + 2N bytes.
/// Used ring: `flags u16, idx u16, ring[N] {u32 id, u32 len}, avail_event u16` = 6 + 8N bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SplitRingLayout {
    pub size: u16,
    pub kind: RingLayoutKind,
    /// Offset of the descriptor table (always 0).
    pub desc: usize,
    /// Offset of the available ring (driver area).
    pub avail: usize,
    /// Offset of the used ring (device area).
    pub used: usize,
    /// Total bytes, exactly as Linux's `vring_size()` computes it for legacy.
    pub total: usize,
    /// Alignment the whole allocation needs.
    pub align: usize,
}

impl SplitRingLayout {
    /// Layout for `size` entries; `None` if the size is 0, above 32768 or not a power of two
    /// (split rings require a power of two, §2.7).
    pub fn new(kind: RingLayoutKind, size: u16) -> Option<Self> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return None;
        }
        let n = size as usize;
        let desc = 0;
        let avail = 16 * n;
        let avail_end = avail + 6 + 2 * n;
        let (used, align) = match kind {
            // §2.7.2 legacy: the used ring starts at the next 4096 boundary.
            RingLayoutKind::Legacy => (avail_end.next_multiple_of(LEGACY_ALIGN), LEGACY_ALIGN),
            // §2.7 table: descriptor table 16-aligned, driver area 2, device area 4.
            RingLayoutKind::Modern => (avail_end.next_multiple_of(4), 16),
        };
        let total = used + 6 + 8 * n;
        Some(SplitRingLayout {
            size,
            kind,
            desc,
            avail,
            used,
            total,
            align,
        })
    }

    /// `size - 1`: split ring sizes are powers of two (checked in `new`), so a slot's
    /// position is a mask, not a division (ring indices run free over u16, §2.7.6).
    #[inline]
    fn mask(&self) -> u16 {
        self.size.wrapping_sub(1)
    }

    #[inline]
    pub fn avail_flags(&self) -> usize {
        self.avail
    }
    #[inline]
    pub fn avail_idx(&self) -> usize {
        self.avail + 2
    }
    #[inline]
    pub fn avail_ring(&self, slot: u16) -> usize {
        self.avail + 4 + 2 * (slot & self.mask()) as usize
    }
    /// `used_event` lives after the available ring (§2.7.10).
    #[inline]
    pub fn used_event(&self) -> usize {
        self.avail + 4 + 2 * self.size as usize
    }
    #[inline]
    pub fn used_flags(&self) -> usize {
        self.used
    }
    #[inline]
    pub fn used_idx(&self) -> usize {
        self.used + 2
    }
    #[inline]
    pub fn used_ring(&self, slot: u16) -> usize {
        self.used + 4 + 8 * (slot & self.mask()) as usize
    }
    /// `avail_event` lives after the used ring (§2.7.10).
    #[inline]
    pub fn avail_event(&self) -> usize {
        self.used + 4 + 8 * self.size as usize
    }
    #[inline]
    pub fn desc_entry(&self, index: u16) -> usize {
        self.desc + 16 * (index & self.mask()) as usize
    }
}

/// `vring_need_event` (§2.7.10): true when moving an index from `old` to `new` crosses
/// `event`, i.e. `event` is in `[old, new)`, computed wrap-safely in u16 arithmetic.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux `vring_size(num, align)` for comparison.
    fn linux_vring_size(num: usize, align: usize) -> usize {
        ((16 * num + 2 * (3 + num) + align - 1) & !(align - 1)) + 2 * 3 + 8 * num
    }

    #[test]
    fn legacy_layout_matches_linux_exactly() {
        for shift in 0..=15 {
            let n = 1u16 << shift;
            let l = SplitRingLayout::new(RingLayoutKind::Legacy, n).unwrap();
            assert_eq!(l.total, linux_vring_size(n as usize, 4096), "size {n}");
            assert_eq!(l.used % 4096, 0);
            // The used ring incl. avail_event fits in the allocation (the 0.9.4 kext's
            // under-allocation bug for N >= 512).
            assert_eq!(l.avail_event() + 2, l.total);
        }
    }

    #[test]
    fn modern_layout_alignment() {
        let l = SplitRingLayout::new(RingLayoutKind::Modern, 256).unwrap();
        assert_eq!(l.avail, 4096);
        assert_eq!(l.used % 4, 0);
        assert_eq!(l.used, (4096 + 6 + 512usize).next_multiple_of(4));
    }

    #[test]
    fn bad_sizes_rejected() {
        assert!(SplitRingLayout::new(RingLayoutKind::Modern, 0).is_none());
        assert!(SplitRingLayout::new(RingLayoutKind::Modern, 3).is_none());
        assert!(SplitRingLayout::new(RingLayoutKind::Legacy, 65535).is_none());
    }

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(65535, 0, 65535));
        assert!(need_event(65534, 2, 65530));
        assert!(!need_event(3, 2, 65530));
        assert!(!need_event(5, 5, 5));
    }
}
