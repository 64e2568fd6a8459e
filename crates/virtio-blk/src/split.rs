//! Splitting a caller's request into device requests that respect the device's limits.
//!
//! Pure functions over caller-owned slices and driver-preallocated output arrays: no
//! allocation, bounded loops, unit-tested on their own.
//!
//! - Data (read/write): a scatter-gather list of device addresses is cut into descriptors
//!   of at most `size_max` bytes, grouped into device requests of at most `max_descs`
//!   descriptors. Every device request must cover whole logical blocks (the next one
//!   starts at `sector + bytes / 512`), so when a group ends inside a block it is trimmed
//!   back to the last block boundary, splitting a descriptor if needed.
//! - Ranges (discard, write zeroes, secure erase): each caller range is cut into pieces of
//!   at most `max_sectors`, ending on `alignment` boundaries where possible, and pieces are
//!   grouped `max_segs` to a device request.

use virtio_core::Segment;

use crate::wire::{RangeSegment, SECTOR_SIZE};

/// A caller's range of sectors (512-byte units).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub sectors: u64,
}

impl SectorRange {
    pub const fn new(sector: u64, sectors: u64) -> Self {
        SectorRange { sector, sectors }
    }
}

/// The request cannot be cut into device requests of whole blocks (e.g. `seg_max`
/// descriptors of caller segments together hold less than one block).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CannotSplit;

/// Limits for data requests.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DataLimits {
    /// Data descriptors per device request (>= 1).
    pub max_descs: usize,
    /// Bytes per descriptor (>= 1; `u32::MAX` when unlimited).
    pub size_max: u32,
    /// Logical block size in bytes (a power of two >= 512).
    pub block: u32,
}

impl DataLimits {
    /// Most data bytes in one device request: the used length (data + status byte) must fit
    /// in 32 bits, in whole blocks.
    pub fn max_bytes(&self) -> u32 {
        let m = u32::MAX - 1;
        m - m % self.block.max(1)
    }
}

/// Position in a scatter-gather list, with the bytes before it kept as it moves (so a
/// part's sector costs nothing and splitting stays linear in the number of segments).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DataCursor {
    seg: usize,
    off: u32,
    /// Bytes of the list before this position.
    done: u64,
}

impl DataCursor {
    /// Bytes of the list before this position (how far a request has progressed).
    pub fn offset(self) -> u64 {
        self.done
    }
}

/// One device request's share of the data.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DataPart {
    /// Descriptors written to `out[..descs]`.
    pub descs: usize,
    /// Bytes they cover (a multiple of the block size).
    pub bytes: u32,
    /// Where the next part starts.
    pub next: DataCursor,
}

/// Moves `c` forward by `bytes` through `bufs`.
fn advance(bufs: &[Segment], mut c: DataCursor, mut bytes: u64) -> DataCursor {
    while let Some(seg) = bufs.get(c.seg) {
        let left = u64::from(seg.len.saturating_sub(c.off));
        if bytes < left {
            // bytes < left <= u32::MAX
            c.off += bytes as u32;
            c.done += bytes;
            return c;
        }
        bytes -= left;
        c = DataCursor {
            seg: c.seg + 1,
            off: 0,
            done: c.done + left,
        };
        if bytes == 0 {
            break;
        }
    }
    c
}

/// Fills `out` with the descriptors of the next device request starting at `at`.
/// `Ok(None)` when the list is exhausted.
pub fn next_data_part(
    bufs: &[Segment],
    at: DataCursor,
    lim: &DataLimits,
    out: &mut [Segment],
) -> Result<Option<DataPart>, CannotSplit> {
    let max_descs = lim.max_descs.min(out.len());
    let max_bytes = lim.max_bytes();
    let size_max = lim.size_max.max(1);
    let block = lim.block.max(1);
    let mut c = at;
    let mut n = 0usize;
    let mut total: u32 = 0;
    while n < max_descs {
        let Some(seg) = bufs.get(c.seg) else { break };
        let left = seg.len.saturating_sub(c.off);
        if left == 0 {
            c = DataCursor {
                seg: c.seg + 1,
                off: 0,
                done: c.done,
            };
            continue;
        }
        let piece = left.min(size_max).min(max_bytes - total);
        if piece == 0 {
            break;
        }
        let Some(slot) = out.get_mut(n) else { break };
        *slot = Segment::new(seg.addr.wrapping_add(u64::from(c.off)), piece);
        n += 1;
        total += piece;
        // `piece <= left`: the cursor stays in this segment or moves to the next one
        // (what `advance` would compute, without its loop).
        c = if piece == left {
            DataCursor {
                seg: c.seg + 1,
                off: 0,
                done: c.done + u64::from(piece),
            }
        } else {
            DataCursor {
                seg: c.seg,
                off: c.off + piece,
                done: c.done + u64::from(piece),
            }
        };
    }
    if n == 0 {
        return if c.seg >= bufs.len() {
            Ok(None)
        } else {
            Err(CannotSplit)
        };
    }
    let done = c.seg >= bufs.len();
    let cut = total - total % block;
    if done {
        // The caller's total was checked to be whole blocks, and every earlier part was.
        return if cut == total {
            Ok(Some(DataPart {
                descs: n,
                bytes: total,
                next: c,
            }))
        } else {
            Err(CannotSplit)
        };
    }
    if cut == 0 {
        return Err(CannotSplit);
    }
    if cut < total {
        // Trim back to the block boundary: keep pieces wholly before `cut`, shorten the one
        // that straddles it, drop the rest (they start the next part).
        let mut acc: u32 = 0;
        let mut keep = 0usize;
        for piece in out.iter_mut().take(n) {
            keep += 1;
            if acc + piece.len >= cut {
                piece.len = cut - acc;
                break;
            }
            acc += piece.len;
        }
        n = keep;
        c = advance(bufs, at, u64::from(cut));
    }
    Ok(Some(DataPart {
        descs: n,
        bytes: cut,
        next: c,
    }))
}

/// Limits for multi-range requests.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RangeSplit {
    /// Sectors per range segment (a multiple of the block, >= 1 block).
    pub max_sectors: u32,
    /// Preferred split boundary in sectors (1: none).
    pub alignment: u32,
    /// Range segments per device request (>= 1).
    pub max_segs: usize,
}

/// Position in a list of ranges.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeCursor {
    range: usize,
    done: u64,
}

/// One device request's ranges.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RangePart {
    /// Segments written to `out[..segs]`.
    pub segs: usize,
    pub next: RangeCursor,
}

/// The next piece of `ranges` at `c`: `(sector, sectors, next)`.
fn next_piece(
    ranges: &[SectorRange],
    c: RangeCursor,
    lim: &RangeSplit,
) -> Option<(u64, u32, RangeCursor)> {
    let mut c = c;
    loop {
        let r = ranges.get(c.range)?;
        let remaining = r.sectors.saturating_sub(c.done);
        if remaining == 0 {
            c = RangeCursor {
                range: c.range + 1,
                done: 0,
            };
            continue;
        }
        let start = r.sector.saturating_add(c.done);
        let max = u64::from(lim.max_sectors.max(1));
        let mut len = remaining.min(max);
        if len < remaining && lim.alignment > 1 {
            let end = start + len;
            let aligned = end - end % u64::from(lim.alignment);
            if aligned > start {
                len = aligned - start;
            }
        }
        // len <= max_sectors <= u32::MAX
        let next = if len == remaining {
            RangeCursor {
                range: c.range + 1,
                done: 0,
            }
        } else {
            RangeCursor {
                range: c.range,
                done: c.done + len,
            }
        };
        return Some((start, len as u32, next));
    }
}

/// Fills `out` with the range segments of the next device request. `Ok(None)` when done.
pub fn next_range_part(
    ranges: &[SectorRange],
    at: RangeCursor,
    lim: &RangeSplit,
    unmap: bool,
    out: &mut [RangeSegment],
) -> Option<RangePart> {
    let max = lim.max_segs.min(out.len());
    let mut c = at;
    let mut n = 0;
    while n < max {
        let Some((sector, sectors, next)) = next_piece(ranges, c, lim) else {
            break;
        };
        let Some(slot) = out.get_mut(n) else { break };
        *slot = RangeSegment::new(sector, sectors, unmap);
        n += 1;
        c = next;
    }
    (n > 0).then_some(RangePart { segs: n, next: c })
}

/// Bytes in `sectors` sectors.
pub const fn sectors_to_bytes(sectors: u64) -> u64 {
    sectors * SECTOR_SIZE as u64
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn parts(bufs: &[Segment], lim: DataLimits) -> Result<Vec<Vec<Segment>>, CannotSplit> {
        let mut out = vec![Segment::new(0, 0); lim.max_descs];
        let mut c = DataCursor::default();
        let mut all = Vec::new();
        while let Some(p) = next_data_part(bufs, c, &lim, &mut out)? {
            all.push(out[..p.descs].to_vec());
            assert_eq!(out[..p.descs].iter().map(|s| s.len).sum::<u32>(), p.bytes);
            c = p.next;
            assert!(all.len() < 10_000);
        }
        Ok(all)
    }

    /// Concatenation of the parts reproduces the caller's byte stream exactly.
    fn flatten(parts: &[Vec<Segment>]) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = Vec::new();
        for s in parts.iter().flatten() {
            match v.last_mut() {
                Some(last) if last.0 + u64::from(last.1) == s.addr => last.1 += s.len,
                _ => v.push((s.addr, s.len)),
            }
        }
        v
    }

    #[test]
    fn unsplit_request_is_one_part() {
        let bufs = [Segment::new(0x1000, 4096), Segment::new(0x9000, 512)];
        let p = parts(
            &bufs,
            DataLimits {
                max_descs: 8,
                size_max: u32::MAX,
                block: 512,
            },
        )
        .unwrap();
        assert_eq!(p, vec![bufs.to_vec()]);
    }

    #[test]
    fn size_max_splits_descriptors() {
        let bufs = [Segment::new(0x10000, 10 * 1024)];
        let p = parts(
            &bufs,
            DataLimits {
                max_descs: 4,
                size_max: 4096,
                block: 512,
            },
        )
        .unwrap();
        assert_eq!(
            p,
            vec![vec![
                Segment::new(0x10000, 4096),
                Segment::new(0x11000, 4096),
                Segment::new(0x12000, 2048)
            ]]
        );
        // size_max 4096 and seg_max 2: 8 KiB then 2 KiB.
        let p = parts(
            &bufs,
            DataLimits {
                max_descs: 2,
                size_max: 4096,
                block: 512,
            },
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], vec![Segment::new(0x12000, 2048)]);
    }

    #[test]
    fn seg_max_cut_is_trimmed_back_to_a_block_boundary() {
        // 100 + 300 + 700 + 948: with max_descs 3 the first window holds 1100 bytes, so the
        // part is cut back to 1024 (100 + 300 + 624) and the 700 is split.
        let bufs = [
            Segment::new(0x1000, 100),
            Segment::new(0x2000, 300),
            Segment::new(0x3000, 700),
            Segment::new(0x4000, 948),
        ];
        let p = parts(
            &bufs,
            DataLimits {
                max_descs: 3,
                size_max: u32::MAX,
                block: 512,
            },
        )
        .unwrap();
        assert_eq!(
            p[0],
            vec![
                Segment::new(0x1000, 100),
                Segment::new(0x2000, 300),
                Segment::new(0x3000, 624)
            ]
        );
        assert_eq!(
            p[1],
            vec![Segment::new(0x3000 + 624, 76), Segment::new(0x4000, 948)]
        );
        assert_eq!(
            flatten(&p),
            bufs.iter().map(|s| (s.addr, s.len)).collect::<Vec<_>>()
        );
        for part in &p {
            assert_eq!(part.iter().map(|s| s.len).sum::<u32>() % 512, 0);
        }
    }

    #[test]
    fn trimming_can_drop_whole_descriptors() {
        // block 4096, max 3 descs of 1024+1024+1024 and 4096 more: the first part must be
        // cut back to 0 bytes? No: 3072 < 4096 means it cannot be cut at all.
        let bufs = [
            Segment::new(0x1000, 1024),
            Segment::new(0x2000, 1024),
            Segment::new(0x3000, 1024),
            Segment::new(0x4000, 1024),
        ];
        let lim = DataLimits {
            max_descs: 3,
            size_max: u32::MAX,
            block: 4096,
        };
        assert_eq!(parts(&bufs, lim), Err(CannotSplit));
        // With 4 descs it fits in one.
        assert_eq!(
            parts(
                &bufs,
                DataLimits {
                    max_descs: 4,
                    ..lim
                }
            )
            .unwrap()
            .len(),
            1
        );
        // 5 KiB + 3 KiB with max 2 descs of size_max 3 KiB: 3K + 2K -> cut at 4K, dropping
        // nothing but shortening the second; then 1K + 3K.
        let bufs = [Segment::new(0x10000, 5120), Segment::new(0x20000, 3072)];
        let p = parts(
            &bufs,
            DataLimits {
                max_descs: 2,
                size_max: 3072,
                block: 4096,
            },
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                vec![Segment::new(0x10000, 3072), Segment::new(0x10C00, 1024)],
                vec![Segment::new(0x11000, 1024), Segment::new(0x20000, 3072)],
            ]
        );
    }

    #[test]
    fn exhaustive_small_lists_preserve_bytes_and_limits() {
        // Many shapes: every part within limits, whole blocks, and the concatenation is
        // exactly the caller's list.
        let lens = [1u32, 7, 100, 412, 511, 512, 513, 1024, 3000, 4096];
        for max_descs in 1..=5 {
            for size_max in [512u32, 1000, 4096, u32::MAX] {
                for a in lens {
                    for b in lens {
                        for c in lens {
                            let total = a + b + c;
                            let pad = (512 - total % 512) % 512;
                            let mut bufs = vec![
                                Segment::new(0x10_0000, a),
                                Segment::new(0x20_0000, b),
                                Segment::new(0x30_0000, c),
                            ];
                            if pad > 0 {
                                bufs.push(Segment::new(0x40_0000, pad));
                            }
                            let lim = DataLimits {
                                max_descs,
                                size_max,
                                block: 512,
                            };
                            let Ok(p) = parts(&bufs, lim) else {
                                // Only legitimately impossible when a window of
                                // max_descs pieces holds less than a block; with enough
                                // descriptors the same list always splits.
                                assert!(max_descs < 4 || size_max < 512);
                                assert!(
                                    parts(
                                        &bufs,
                                        DataLimits {
                                            max_descs: 64,
                                            ..lim
                                        }
                                    )
                                    .is_ok()
                                );
                                continue;
                            };
                            for part in &p {
                                assert!(!part.is_empty() && part.len() <= max_descs);
                                assert!(part.iter().all(|s| s.len > 0 && s.len <= size_max));
                                assert_eq!(part.iter().map(|s| s.len).sum::<u32>() % 512, 0);
                            }
                            let want: Vec<(u64, u32)> =
                                bufs.iter().map(|s| (s.addr, s.len)).collect();
                            assert_eq!(flatten(&p), want);
                        }
                    }
                }
            }
        }
    }

    fn range_parts(ranges: &[SectorRange], lim: RangeSplit) -> Vec<Vec<(u64, u32)>> {
        let mut out = vec![RangeSegment::default(); lim.max_segs];
        let mut c = RangeCursor::default();
        let mut all = Vec::new();
        while let Some(p) = next_range_part(ranges, c, &lim, false, &mut out) {
            all.push(
                out[..p.segs]
                    .iter()
                    .map(|s| (s.sector.get(), s.num_sectors.get()))
                    .collect(),
            );
            c = p.next;
        }
        all
    }

    #[test]
    fn ranges_split_by_sectors_segments_and_alignment() {
        let r = [SectorRange::new(0, 100), SectorRange::new(1000, 8)];
        let p = range_parts(
            &r,
            RangeSplit {
                max_sectors: 32,
                alignment: 1,
                max_segs: 2,
            },
        );
        assert_eq!(
            p,
            vec![
                vec![(0, 32), (32, 32)],
                vec![(64, 32), (96, 4)],
                vec![(1000, 8)]
            ]
        );
        // Alignment 16: a range starting at 10 is cut at 16, 48, ... (max 32).
        let p = range_parts(
            &[SectorRange::new(10, 70)],
            RangeSplit {
                max_sectors: 32,
                alignment: 16,
                max_segs: 8,
            },
        );
        assert_eq!(p, vec![vec![(10, 22), (32, 32), (64, 16)]]);
        // Unlimited segments but the driver's array holds 3.
        let r: Vec<SectorRange> = (0..7).map(|i| SectorRange::new(i * 100, 1)).collect();
        let p = range_parts(
            &r,
            RangeSplit {
                max_sectors: u32::MAX,
                alignment: 1,
                max_segs: 3,
            },
        );
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        // A range longer than 32 bits of sectors.
        let p = range_parts(
            &[SectorRange::new(0, (1 << 33) + 5)],
            RangeSplit {
                max_sectors: u32::MAX - 7,
                alignment: 8,
                max_segs: 16,
            },
        );
        let total: u64 = p.iter().flatten().map(|&(_, n)| u64::from(n)).sum();
        assert_eq!(total, (1 << 33) + 5);
        assert!(p.iter().flatten().all(|&(s, n)| n > 0 && (s % 8 == 0)));
    }
}
