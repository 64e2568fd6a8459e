//! The deterministic test stream and the hash both ends of the end-to-end network test
//! compute: the bare-metal guest (`tests/guest`, `scenarios/net`) and the host's TCP peer
//! (`tests/src/qemu/net_peer.rs`) use this one definition.
//!
//! Byte `i` of the stream with seed `s` is byte `i % 8` (little-endian) of word `i / 8`,
//! where word `k` is `scramble(s + k * 0x9E37_79B9_7F4A_7C15)` (one xor-shift and one
//! multiply: distinct for every `k`, which is all a check of a TCP byte stream needs). The
//! hash ([`WordFnv`]) is FNV-1a 64 taken over 64-bit little-endian words instead of
//! bytes. Both work a word at a time: the guest pays for every instruction here in the
//! network benchmark, where this test's own per-byte work would otherwise hide the drivers'
//! differences (see `docs/benchmarks.md`).
#![no_std]

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A bijection of the 64-bit words (xor-shift, then an odd multiplier).
fn scramble(x: u64) -> u64 {
    (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// A position in the stream with seed `seed`.
pub struct Stream {
    /// `seed + k * GOLDEN` for the current word `k`.
    counter: u64,
    pos: u64,
    /// Word `k`, the one the position is in.
    cur: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream {
            counter: seed,
            pos: 0,
            cur: scramble(seed),
        }
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    fn next_byte(&mut self) -> u8 {
        let i = self.pos % 8;
        let b = (self.cur >> (8 * i)) as u8;
        if i == 7 {
            self.next_word();
        } else {
            self.pos += 1;
        }
        b
    }

    /// Writes the next `out.len()` stream bytes into `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        // Byte by byte up to a word boundary, then whole words.
        let (head, rest) = out.split_at_mut(to_word_boundary(self.pos, out.len()));
        for b in head {
            *b = self.next_byte();
        }
        let mut words = rest.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.cur.to_le_bytes());
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
        let (head, rest) = data.split_at(to_word_boundary(self.pos, data.len()));
        for &b in head {
            let pos = self.pos;
            if self.next_byte() != b && bad.is_none() {
                bad = Some(pos);
            }
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            let got = le_word(w);
            if got != self.cur && bad.is_none() {
                // The first differing byte: the lowest set bit of the difference.
                let i = (got ^ self.cur).trailing_zeros() / 8;
                bad = Some(self.pos + u64::from(i));
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

    /// To the start of the next word (from anywhere in the current one).
    fn next_word(&mut self) {
        self.pos = (self.pos | 7) + 1;
        self.counter = self.counter.wrapping_add(GOLDEN);
        self.cur = scramble(self.counter);
    }
}

/// Bytes from byte `pos` of a stream to its next word boundary, at most `len`.
fn to_word_boundary(pos: u64, len: usize) -> usize {
    (((8 - pos % 8) % 8) as usize).min(len)
}

/// An 8-byte chunk as a little-endian word.
fn le_word(w: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(w);
    u64::from_le_bytes(word)
}

/// FNV-1a 64 over 64-bit words: `h = (h ^ w) * prime` for each little-endian word of the
/// data, the words counted from the first byte hashed whatever pieces [`WordFnv::update`]
/// is given them in; a last partial word is zero-padded, and the byte count is folded in
/// last (so trailing zero bytes count). Each step is a bijection of `h`, so two inputs that
/// differ in one word always hash differently.
#[derive(Copy, Clone, Debug)]
pub struct WordFnv {
    h: u64,
    /// The bytes of an unfinished word, at their little-endian places.
    partial: u64,
    len: u64,
}

impl Default for WordFnv {
    fn default() -> Self {
        WordFnv::new()
    }
}

impl WordFnv {
    pub const fn new() -> Self {
        WordFnv {
            h: 0xcbf2_9ce4_8422_2325,
            partial: 0,
            len: 0,
        }
    }

    fn fold(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn push_byte(&mut self, b: u8) {
        self.partial |= u64::from(b) << (8 * (self.len % 8));
        self.len += 1;
        if self.len & 7 == 0 {
            self.fold(self.partial);
            self.partial = 0;
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let (head, rest) = data.split_at(to_word_boundary(self.len, data.len()));
        for &b in head {
            self.push_byte(b);
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            self.fold(le_word(w));
        }
        self.len += (rest.len() - words.remainder().len()) as u64;
        for &b in words.remainder() {
            self.push_byte(b);
        }
    }

    pub fn value(self) -> u64 {
        let mut end = self;
        if end.len & 7 != 0 {
            end.fold(end.partial);
        }
        end.fold(end.len);
        end.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_fnv_reference_values_and_chunking() {
        let h = |s: &[u8]| {
            let mut f = WordFnv::default();
            f.update(s);
            f.value()
        };
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let basis: u64 = 0xcbf2_9ce4_8422_2325;
        // Empty: only the length (0) folded in.
        assert_eq!(h(b""), basis.wrapping_mul(PRIME));
        // One whole word, then the length 8.
        let w = u64::from_le_bytes(*b"abcdefgh");
        let one = (basis ^ w).wrapping_mul(PRIME);
        assert_eq!(h(b"abcdefgh"), (one ^ 8).wrapping_mul(PRIME));
        // A partial word is zero-padded: "a" and "a\0" differ only by their lengths.
        let a = (basis ^ 0x61).wrapping_mul(PRIME);
        assert_eq!(h(b"a"), (a ^ 1).wrapping_mul(PRIME));
        assert_ne!(h(b"a"), h(b"a\0"));
        // Any split of the same bytes hashes alike.
        let mut data = [0u8; 300];
        Stream::new(3).fill(&mut data);
        let whole = h(&data);
        for step in [1usize, 3, 7, 8, 13, 64, 299] {
            let mut f = WordFnv::new();
            for chunk in data.chunks(step) {
                f.update(chunk);
            }
            assert_eq!(f.value(), whole, "pieces of {step}");
        }
        // One byte changed anywhere changes the hash.
        for at in [0usize, 7, 8, 150, 299] {
            let mut d = data;
            d[at] ^= 0x80;
            assert_ne!(h(&d), whole, "byte {at}");
        }
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
        assert_eq!(&whole[..8], &scramble(7).to_le_bytes());
        assert_eq!(
            &whole[8..16],
            &scramble(7u64.wrapping_add(GOLDEN)).to_le_bytes()
        );
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
