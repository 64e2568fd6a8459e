//! The deterministic disk content of the `blk` scenario, and the fixed discard /
//! write-zeroes ranges. The host recomputes both (`tests/src/qemu/blk_host.rs`) to verify
//! the image file after QEMU exits: keep the two in step.

/// 64-bit word `w` (0..64) of sector `sector` for `seed` (splitmix64 of the position).
pub fn word(seed: u64, sector: u64, w: u64) -> u64 {
    let mut z = seed
        ^ sector
            .wrapping_mul(64)
            .wrapping_add(w)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` (whole sectors) with the content of sectors `sector..`.
pub fn fill(seed: u64, sector: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let i = i as u64;
        chunk.copy_from_slice(&word(seed, sector + i / 64, i % 64).to_le_bytes());
    }
}

/// First byte offset in `buf` (whole sectors from `sector`) that differs from the pattern.
pub fn mismatch(seed: u64, sector: u64, buf: &[u8]) -> Option<usize> {
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let i64_ = i as u64;
        let want = word(seed, sector + i64_ / 64, i64_ % 64).to_le_bytes();
        if chunk != want {
            let k = chunk
                .iter()
                .zip(want)
                .position(|(a, b)| *a != b)
                .unwrap_or(0);
            return Some(i * 8 + k);
        }
    }
    None
}

/// What the runner's initial image holds (`devices::write_disk_image`): `SECTOR`, the
/// sector number (8 bytes LE), then `(n + i) mod 251`.
pub fn initial_ok(sector: u64, buf: &[u8]) -> bool {
    buf.len() == 512
        && &buf[..6] == b"SECTOR"
        && buf[6..14] == sector.to_le_bytes()
        && buf
            .iter()
            .enumerate()
            .skip(14)
            .all(|(i, &b)| b == ((sector + i as u64) % 251) as u8)
}

/// Discarded after the pattern is written (`discard=unmap` on ext4 punches holes: the
/// ranges read back as zeros). Whole 4 KiB blocks.
pub const DISCARD: &[(u64, u64)] = &[(1024, 2048), (9000, 8)];
/// Zeroed with WRITE_ZEROES: the first call without unmap (two ranges, one unaligned),
/// the second with unmap.
pub const WRITE_ZEROES: &[(u64, u64)] = &[(4096, 100), (12001, 7)];
pub const WRITE_ZEROES_UNMAP: &[(u64, u64)] = &[(15000, 1024)];

/// Whether `sector` is in one of the zeroed ranges.
pub fn zeroed(sector: u64) -> bool {
    DISCARD
        .iter()
        .chain(WRITE_ZEROES)
        .chain(WRITE_ZEROES_UNMAP)
        .any(|&(s, n)| sector >= s && sector < s + n)
}
