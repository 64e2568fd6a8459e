//! Wire formats of the balloon (virtio 1.2 §5.5): the configuration layout, page frame
//! numbers, the statistics entry, and the free page hint command IDs.
//!
//! Every multi-byte field is little-endian. Balloon config is little-endian even on the
//! legacy interface (§5.5.4 legacy note); legacy stats and command IDs are guest-endian,
//! which is little-endian on every platform this stack targets.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Config field offsets (`struct virtio_balloon_config`).
pub mod cfg {
    /// Target size of the balloon in 4 KiB frames (device-written).
    pub const NUM_PAGES: u32 = 0;
    /// Frames in the balloon (driver-written).
    pub const ACTUAL: u32 = 4;
    /// FREE_PAGE_HINT only: the device's current command ID.
    pub const FREE_PAGE_HINT_CMD_ID: u32 = 8;
    /// PAGE_POISON only (refused by this driver).
    pub const POISON_VAL: u32 = 12;
}

/// Balloon frames are 4 KiB whatever the guest page size (§5.5.6: "historical").
pub const FRAME_SHIFT: u32 = 12;
pub const FRAME_SIZE: u64 = 1 << FRAME_SHIFT;
/// Frame numbers per inflate/deflate request (Linux `VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const MAX_PFNS: usize = 256;

/// Reserved free page hint command IDs (§5.5.6.4).
pub const CMD_ID_STOP: u32 = 0;
pub const CMD_ID_DONE: u32 = 1;

/// 4 KiB frames per platform page, if `page_size` is usable: a power of two of at least
/// 4 KiB whose frames fit one request (at most 1 MiB).
pub fn frames_per_page(page_size: usize) -> Option<u32> {
    let size = u64::try_from(page_size).ok()?;
    if !size.is_power_of_two() || size < FRAME_SIZE {
        return None;
    }
    let fpp = size / FRAME_SIZE;
    if fpp > MAX_PFNS as u64 {
        return None;
    }
    u32::try_from(fpp).ok()
}

/// Platform pages whose frames fit one request.
pub fn pages_per_batch(frames_per_page: u32) -> usize {
    MAX_PFNS / (frames_per_page.max(1) as usize)
}

/// The first 4 KiB frame number of the page at `addr`, if the page is aligned to
/// `page_size` and all its frames have 32-bit numbers.
pub fn first_frame(addr: u64, page_size: u64) -> Option<u32> {
    if page_size == 0 || addr % page_size != 0 {
        return None;
    }
    let last = addr.checked_add(page_size - 1)? >> FRAME_SHIFT;
    u32::try_from(last).ok()?;
    u32::try_from(addr >> FRAME_SHIFT).ok()
}

/// Writes the frame numbers of `pages` (page addresses) into `out` as little-endian u32s,
/// `frames_per_page` consecutive frames per page (a 16 KiB page is 4 frames). Returns the
/// frames written, or `None` if a page is misaligned, unnumberable, or `out` is too short.
pub fn encode_pfns(
    pages: impl IntoIterator<Item = u64>,
    frames_per_page: u32,
    out: &mut [u8],
) -> Option<usize> {
    let page_size = u64::from(frames_per_page) * FRAME_SIZE;
    let mut chunks = out.chunks_exact_mut(4);
    let mut n = 0;
    for addr in pages {
        let first = first_frame(addr, page_size)?;
        for k in 0..frames_per_page {
            chunks
                .next()?
                .copy_from_slice(&first.checked_add(k)?.to_le_bytes());
            n += 1;
        }
    }
    Some(n)
}

/// Statistics tags (§5.5.6.3).
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    /// Number of standard tags this driver knows.
    pub const COUNT: usize = 10;
}

/// `struct virtio_balloon_stat`: packed, 10 bytes (zerocopy's little-endian integers
/// have alignment 1, so `repr(C)` has no padding).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct StatEntry {
    pub tag: U16,
    pub val: U64,
}

impl StatEntry {
    pub fn new(tag: u16, val: u64) -> Self {
        StatEntry {
            tag: U16::new(tag),
            val: U64::new(val),
        }
    }
}

/// Size of one stats entry on the wire.
pub const STAT_ENTRY_LEN: usize = core::mem::size_of::<StatEntry>();

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn decode(b: &[u8]) -> Vec<u32> {
        b.chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn page_sizes() {
        assert_eq!(frames_per_page(4096), Some(1));
        assert_eq!(frames_per_page(16384), Some(4));
        assert_eq!(frames_per_page(65536), Some(16));
        assert_eq!(frames_per_page(1 << 20), Some(256));
        for bad in [0, 512, 2048, 6144, 12288, 2 << 20] {
            assert_eq!(frames_per_page(bad), None, "{bad}");
        }
        assert_eq!(pages_per_batch(1), 256);
        assert_eq!(pages_per_batch(4), 64);
        assert_eq!(pages_per_batch(16), 16);
    }

    #[test]
    fn pfn_batching_4k_pages() {
        let mut out = [0u8; MAX_PFNS * 4];
        let pages = [0x1000u64, 0x5000, 0xFFFF_F000];
        let n = encode_pfns(pages, 1, &mut out).unwrap();
        assert_eq!(n, 3);
        assert_eq!(decode(&out[..12]), [1, 5, 0xFFFFF]);
        // Exact bytes: little-endian u32s.
        assert_eq!(&out[..8], &[1, 0, 0, 0, 5, 0, 0, 0]);
        // A full batch of 256 pages fits; 257 do not.
        let many: Vec<u64> = (0..256u64).map(|i| i << 12).collect();
        assert_eq!(encode_pfns(many.iter().copied(), 1, &mut out), Some(256));
        let too_many: Vec<u64> = (0..257u64).map(|i| i << 12).collect();
        assert_eq!(encode_pfns(too_many, 1, &mut out), None);
    }

    #[test]
    fn pfn_batching_16k_pages() {
        let mut out = [0u8; MAX_PFNS * 4];
        // A 16 KiB page at 0x10000 is frames 16, 17, 18, 19.
        let n = encode_pfns([0x10000u64, 0x4000], 4, &mut out).unwrap();
        assert_eq!(n, 8);
        assert_eq!(decode(&out[..32]), [16, 17, 18, 19, 4, 5, 6, 7]);
        // 64 pages of 16 KiB fill the 256-frame array exactly.
        let pages: Vec<u64> = (0..64u64).map(|i| i * 0x4000).collect();
        assert_eq!(encode_pfns(pages.iter().copied(), 4, &mut out), Some(256));
        assert_eq!(decode(&out)[255], 255);
        let pages: Vec<u64> = (0..65u64).map(|i| i * 0x4000).collect();
        assert_eq!(encode_pfns(pages, 4, &mut out), None);
        // Misaligned for 16 KiB.
        assert_eq!(encode_pfns([0x1000u64], 4, &mut out), None);
    }

    #[test]
    fn frame_numbers_must_fit_32_bits() {
        assert_eq!(first_frame(0xFFF_FFFF_F000, 4096), Some(0xFFFF_FFFF));
        assert_eq!(first_frame(1 << 44, 4096), None);
        // The last frame of a 16 KiB page must fit too.
        assert_eq!(first_frame(0xFFF_FFFF_C000, 16384), Some(0xFFFF_FFFC));
        assert_eq!(first_frame(1 << 44, 16384), None);
        assert_eq!(first_frame(0x2000, 0), None);
    }

    #[test]
    fn stats_entry_bytes_per_spec() {
        assert_eq!(STAT_ENTRY_LEN, 10);
        let e = StatEntry::new(tag::MEMFREE, 0x0102_0304_0506_0708);
        assert_eq!(
            e.as_bytes(),
            &[4, 0, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]
        );
        let two = [
            StatEntry::new(tag::SWAP_IN, 1),
            StatEntry::new(tag::HTLB_PGFAIL, 2),
        ];
        assert_eq!(
            two.as_bytes(),
            &[0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
