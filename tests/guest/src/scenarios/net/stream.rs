//! The deterministic test stream and the hash both ends compute (the host's copy is in
//! `tests/src/qemu/net_peer.rs`; keep the two identical).
//!
//! Byte `i` of the stream with seed `s` is byte `i % 8` (little-endian) of
//! `splitmix64(s + (i / 8) * 0x9E37_79B9_7F4A_7C15)`; the hash is FNV-1a 64 over the bytes.

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
        for b in out {
            *b = self.next_byte();
        }
    }

    /// Compares `data` with the next stream bytes; returns the stream offset of the first
    /// difference (and still advances past all of `data`).
    pub fn verify(&mut self, data: &[u8]) -> Option<u64> {
        let mut bad = None;
        for &b in data {
            let pos = self.pos;
            if self.next_byte() != b && bad.is_none() {
                bad = Some(pos);
            }
        }
        bad
    }
}

/// FNV-1a 64.
#[derive(Copy, Clone)]
pub struct Fnv(u64);

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
