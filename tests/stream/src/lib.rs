//! The deterministic test stream and the hash both ends of the end-to-end network test
//! compute: the bare-metal guest (`tests/guest`, `scenarios/net`) and the host's TCP peer
//! (`tests/src/qemu/net_peer.rs`) use this one definition.
//!
//! Byte `i` of the stream with seed `s` is byte `i % 8` (little-endian) of
//! `splitmix64(s + (i / 8) * 0x9E37_79B9_7F4A_7C15)`; the hash is FNV-1a 64 over the bytes.
#![no_std]

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `k` of the stream with seed `seed`.
fn word(seed: u64, k: u64) -> [u8; 8] {
    mix(seed.wrapping_add(k.wrapping_mul(GOLDEN))).to_le_bytes()
}

/// A position in the stream with seed `seed`.
pub struct Stream {
    seed: u64,
    pos: u64,
    cur: [u8; 8],
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream {
            seed,
            pos: 0,
            cur: word(seed, 0),
        }
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    fn next_byte(&mut self) -> u8 {
        let i = (self.pos % 8) as usize;
        let b = self.cur[i];
        self.pos += 1;
        if i == 7 {
            self.cur = word(self.seed, self.pos / 8);
        }
        b
    }

    /// Writes the next `out.len()` stream bytes into `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        // Byte by byte up to a word boundary, then whole words: the guest pays for every
        // instruction here in the network benchmark, where a byte-at-a-time loop was most
        // of the receive cost.
        let (head, rest) = out.split_at_mut(self.to_word_boundary(out.len()));
        for b in head {
            *b = self.next_byte();
        }
        let mut words = rest.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.cur);
            self.next_word();
        }
        for b in words.into_remainder() {
            *b = self.next_byte();
        }
    }

    /// Compares `data` with the next stream bytes; returns the stream offset of the first
    /// difference (and still advances past all of `data`).
    pub fn verify(&mut self, data: &[u8]) -> Option<u64> {
        let mut bad = None;
        let (head, rest) = data.split_at(self.to_word_boundary(data.len()));
        for &b in head {
            let pos = self.pos;
            if self.next_byte() != b && bad.is_none() {
                bad = Some(pos);
            }
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            if w != self.cur && bad.is_none() {
                let i = w
                    .iter()
                    .zip(self.cur)
                    .position(|(a, b)| *a != b)
                    .unwrap_or(0);
                bad = Some(self.pos + i as u64);
            }
            self.next_word();
        }
        for &b in words.remainder() {
            let pos = self.pos;
            if self.next_byte() != b && bad.is_none() {
                bad = Some(pos);
            }
        }
        bad
    }

    /// Bytes from the position to the next word boundary, at most `len`.
    fn to_word_boundary(&self, len: usize) -> usize {
        (((8 - self.pos % 8) % 8) as usize).min(len)
    }

    /// Past the current word (the position is at its start).
    fn next_word(&mut self) {
        self.pos += 8;
        self.cur = word(self.seed, self.pos / 8);
    }
}

/// FNV-1a 64.
#[derive(Copy, Clone, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

impl Fnv {
    pub const fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_64_reference_values() {
        let h = |s: &[u8]| {
            let mut f = Fnv::default();
            f.update(s);
            f.value()
        };
        assert_eq!(h(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(h(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(h(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn stream_is_chunking_independent_and_verifies() {
        let mut whole = [0u8; 1000];
        Stream::new(7).fill(&mut whole);
        let mut s = Stream::new(7);
        let mut parts = [0u8; 1000];
        for chunk in parts.chunks_mut(13) {
            s.fill(chunk);
        }
        assert_eq!(whole, parts);
        assert_eq!(&whole[..8], &mix(7).to_le_bytes());
        assert_eq!(Stream::new(7).verify(&whole), None);
        whole[517] ^= 1;
        assert_eq!(Stream::new(7).verify(&whole), Some(517));
        // In pieces that start and end inside words and span several: the first bad byte
        // is found whether it lies in a head, a whole word or a tail.
        for bad in [3usize, 8, 517, 999] {
            let mut data = parts;
            data[bad] ^= 0x80;
            let mut s = Stream::new(7);
            let mut found = None;
            for chunk in data.chunks(29) {
                found = found.or(s.verify(chunk));
            }
            assert_eq!(found, Some(bad as u64));
            assert_eq!(s.pos(), 1000);
        }
        let mut other = [0u8; 64];
        Stream::new(8).fill(&mut other);
        assert_ne!(whole[..64], other);
    }
}
