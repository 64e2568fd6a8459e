//! Internet checksums for the phy's checksum offloads (RFC 1071 ones' complement sums):
//! the TCP pseudo-header sum a transmitted frame carries when the device completes its
//! checksum (virtio 1.2 §5.1.6.2), the device's own completion of a partial checksum, and a
//! software check of received TCP segments nobody validated (§5.1.6.4).
//!
//! Only untagged IPv4 TCP is parsed: the test stack speaks IPv4 only (smoltcp is built
//! without `proto-ipv6`), so HOST_TSO6 / GUEST_TSO6 frames never occur. Received frames are
//! device input: every access is bounds-checked, nothing here panics.

/// Ethernet header length (no VLAN tag: smoltcp does not send or accept tagged frames).
const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
/// Offset of the checksum field in the TCP header.
pub const TCP_CSUM_OFFSET: usize = 16;

/// Where the TCP segment of an untagged, unfragmented IPv4 TCP frame lies.
#[derive(Copy, Clone, Debug)]
pub struct Ipv4Tcp {
    /// Offset of the TCP header (`csum_start`).
    pub tcp_start: usize,
    /// TCP header + payload bytes (IPv4 total length − IP header).
    pub tcp_len: usize,
    /// Ethernet + IP + TCP header bytes (`hdr_len` of a GSO request).
    pub hdr_len: usize,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Tcp {
    /// Parses `frame`; `None` for anything else (other protocols, fragments, IP options
    /// that run past the frame, a total length beyond the frame).
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let be16 = |at: usize| -> Option<u16> {
            let b = frame.get(at..at + 2)?;
            Some(u16::from_be_bytes([b[0], b[1]]))
        };
        if be16(12)? != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = frame.get(ETH_HLEN..)?;
        let vihl = *ip.first()?;
        let ihl = usize::from(vihl & 0x0F) * 4;
        if vihl >> 4 != 4 || ihl < 20 || *ip.get(9)? != IPPROTO_TCP {
            return None;
        }
        // More-fragments flag or a fragment offset: not a whole segment.
        if be16(ETH_HLEN + 6)? & 0x3FFF != 0 {
            return None;
        }
        let total = usize::from(be16(ETH_HLEN + 2)?);
        // Ethernet padding may follow the packet: the IP length bounds the segment.
        if total < ihl + 20 || ETH_HLEN + total > frame.len() {
            return None;
        }
        let tcp_start = ETH_HLEN + ihl;
        let data_off = usize::from(*frame.get(tcp_start + 12)? >> 4) * 4;
        if data_off < 20 || ihl + data_off > total {
            return None;
        }
        let mut src = [0; 4];
        let mut dst = [0; 4];
        src.copy_from_slice(ip.get(12..16)?);
        dst.copy_from_slice(ip.get(16..20)?);
        Some(Ipv4Tcp {
            tcp_start,
            tcp_len: total - ihl,
            hdr_len: tcp_start + data_off,
            src,
            dst,
        })
    }

    /// Unfolded sum of the TCP pseudo-header (RFC 793 §3.1) for `tcp_len` bytes.
    fn pseudo(&self, tcp_len: usize) -> u64 {
        let w = |a: [u8; 4]| u64::from(u32::from_be_bytes(a));
        w(self.src) + w(self.dst) + u64::from(IPPROTO_TCP) + tcp_len as u64
    }

    /// Stores the folded pseudo-header sum (not complemented) in the TCP checksum field:
    /// what the field must hold when the device completes the checksum (virtio 1.2
    /// §5.1.6.2: "the TCP checksum field in the packet is set to the sum of the TCP pseudo
    /// header, so that replacing it by the ones' complement checksum of the TCP header and
    /// body will give the correct result"). With GSO the length is the whole super-segment's,
    /// as Linux's segmentation (`tcp_gso_segment`) expects.
    pub fn set_pseudo_header(&self, frame: &mut [u8]) -> bool {
        let sum = fold(self.pseudo(self.tcp_len));
        let at = self.tcp_start + TCP_CSUM_OFFSET;
        match frame.get_mut(at..at + 2) {
            Some(f) => {
                f.copy_from_slice(&sum.to_be_bytes());
                true
            }
            None => false,
        }
    }

    /// Whether the segment's checksum is right: the pseudo-header plus the segment (with
    /// its checksum field) sum to 0xFFFF.
    pub fn verify(&self, frame: &[u8]) -> bool {
        frame
            .get(self.tcp_start..self.tcp_start + self.tcp_len)
            .is_some_and(|seg| fold(sum(seg, self.pseudo(self.tcp_len))) == 0xFFFF)
    }
}

/// What the device does with NEEDS_CSUM (§5.1.6.2, and §5.1.6.4 for a received partial
/// checksum): sums from `start` to the end of the frame and stores the complement at
/// `start + offset`. `false` (nothing changed) when that lies outside the frame.
pub fn complete(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let Some(tail) = frame.get(start..) else {
        return false;
    };
    let c = !fold(sum(tail, 0));
    match frame.get_mut(start + offset..start + offset + 2) {
        Some(f) => {
            f.copy_from_slice(&c.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Ones' complement sum of `data` as big-endian 16-bit words (an odd last byte is the high
/// byte of a word), added to `acc`, unfolded. Summing 32-bit words gives the same folded
/// result (2^16 ≡ 1 mod 0xFFFF) in half the additions.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an unfolded sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}
