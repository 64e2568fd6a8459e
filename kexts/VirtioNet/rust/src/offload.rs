//! The transmit offload request of one frame, from the stack's flags and the frame's
//! headers: where the TCP/UDP checksum starts and is stored (`csum_start`/`csum_offset`),
//! and for TSO the length of the headers every segment repeats (`hdr_len`).
//!
//! macOS says only *what* to offload (`mbuf_get_csum_requested`: TCP or UDP, over IPv4 or
//! IPv6; `mbuf_get_tso_requested`: TSO over IPv4/IPv6 and the MSS); the stack has already
//! stored the pseudo-header sum in the checksum field, as virtio's partial checksum
//! expects. The offsets come from parsing the headers: Ethernet (with one optional VLAN
//! tag), IPv4 (with options) or IPv6 (no extension headers: the stack does not offload
//! those), TCP (with options) or UDP.

use virtio_net::{GsoKind, TxOffload};

use crate::{VNET_TX_CSUM_TCP, VNET_TX_CSUM_UDP, VNET_TX_TSO4, VNET_TX_TSO6};

const ETH_HLEN: usize = 14;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Offset of the checksum field in the TCP and UDP headers.
const TCP_CSUM: u16 = 16;
const UDP_CSUM: u16 = 6;
const TCP_FLAG_CWR: u8 = 0x80;

/// Why a request cannot be offloaded (the frame is dropped, as a NIC would).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OffloadParseError {
    /// The headers are cut short or malformed.
    Truncated,
    /// The request does not match the frame (TCP requested on a UDP frame, IPv6 TSO on an
    /// IPv4 frame, an unknown ethertype, ...).
    Mismatch,
}

fn be16(h: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*h.get(at)?, *h.get(at + 1)?]))
}

/// Layer 3 start, IP version (4 or 6), layer 4 start and protocol.
pub fn parse(h: &[u8]) -> Result<(usize, u8, usize, u8), OffloadParseError> {
    use OffloadParseError::*;
    let mut l3 = ETH_HLEN;
    let mut ty = be16(h, 12).ok_or(Truncated)?;
    if ty == ETHERTYPE_VLAN {
        ty = be16(h, 16).ok_or(Truncated)?;
        l3 += 4;
    }
    match ty {
        ETHERTYPE_IPV4 => {
            let vihl = *h.get(l3).ok_or(Truncated)?;
            let ihl = usize::from(vihl & 0x0F) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(Mismatch);
            }
            let proto = *h.get(l3 + 9).ok_or(Truncated)?;
            Ok((l3, 4, l3 + ihl, proto))
        }
        ETHERTYPE_IPV6 => {
            let v = *h.get(l3).ok_or(Truncated)?;
            if v >> 4 != 6 {
                return Err(Mismatch);
            }
            let next = *h.get(l3 + 6).ok_or(Truncated)?;
            Ok((l3, 6, l3 + 40, next))
        }
        _ => Err(Mismatch),
    }
}

/// The virtio offload for `flags` (`VNET_TX_*`) on the frame whose first bytes are `h`.
pub fn tx_offload(h: &[u8], flags: u32, mss: u32) -> Result<TxOffload, OffloadParseError> {
    use OffloadParseError::*;
    if flags == 0 {
        return Ok(TxOffload::NONE);
    }
    let (_, ver, l4, proto) = parse(h)?;
    let start = u16::try_from(l4).map_err(|_| Mismatch)?;
    let tso = flags & (VNET_TX_TSO4 | VNET_TX_TSO6);
    if tso != 0 {
        let want_ver = if tso == VNET_TX_TSO4 {
            4
        } else if tso == VNET_TX_TSO6 {
            6
        } else {
            return Err(Mismatch);
        };
        if ver != want_ver || proto != PROTO_TCP {
            return Err(Mismatch);
        }
        let doff = usize::from(*h.get(l4 + 12).ok_or(Truncated)? >> 4) * 4;
        if doff < 20 {
            return Err(Mismatch);
        }
        let tcp_flags = *h.get(l4 + 13).ok_or(Truncated)?;
        let hdr_len = u16::try_from(l4 + doff).map_err(|_| Mismatch)?;
        let mss = u16::try_from(mss).map_err(|_| Mismatch)?;
        if mss == 0 {
            return Err(Mismatch);
        }
        let kind = if ver == 4 {
            GsoKind::TcpV4
        } else {
            GsoKind::TcpV6
        };
        let o = TxOffload::gso(kind, mss, hdr_len, start, TCP_CSUM);
        return Ok(if tcp_flags & TCP_FLAG_CWR != 0 {
            o.with_ecn()
        } else {
            o
        });
    }
    let offset = match (flags & (VNET_TX_CSUM_TCP | VNET_TX_CSUM_UDP), proto) {
        (VNET_TX_CSUM_TCP, PROTO_TCP) => TCP_CSUM,
        (VNET_TX_CSUM_UDP, PROTO_UDP) => UDP_CSUM,
        _ => return Err(Mismatch),
    };
    Ok(TxOffload::csum(start, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use virtio_net::{CsumRequest, Gso};

    fn frame(vlan: bool, v6: bool, proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        }
        if v6 {
            f.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0, 0, 0, proto, 64]);
            f.extend_from_slice(&[0u8; 32]);
        } else {
            f.extend_from_slice(&[0x08, 0x00, 0x46, 0, 0, 0, 0, 0, 0, 0, 64, proto]);
            f.extend_from_slice(&[0u8; 12]); // rest of 24-byte header (with options)
        }
        // TCP: data offset 8 words (32 bytes), CWR set
        let mut l4 = vec![0u8; 32];
        l4[12] = 8 << 4;
        l4[13] = TCP_FLAG_CWR | 0x10;
        f.extend_from_slice(&l4);
        f
    }

    #[test]
    fn checksum_offsets() {
        let f = frame(false, false, PROTO_TCP);
        assert_eq!(
            tx_offload(&f, VNET_TX_CSUM_TCP, 0).unwrap().csum,
            Some(CsumRequest {
                start: 14 + 24,
                offset: 16
            })
        );
        let f = frame(true, true, PROTO_UDP);
        assert_eq!(
            tx_offload(&f, VNET_TX_CSUM_UDP, 0).unwrap().csum,
            Some(CsumRequest {
                start: 18 + 40,
                offset: 6
            })
        );
        assert_eq!(tx_offload(&f, 0, 0).unwrap(), TxOffload::NONE);
        assert_eq!(
            tx_offload(&f, VNET_TX_CSUM_TCP, 0),
            Err(OffloadParseError::Mismatch)
        );
    }

    #[test]
    fn tso_header_length_and_ecn() {
        let f = frame(false, true, PROTO_TCP);
        let o = tx_offload(&f, VNET_TX_TSO6 | VNET_TX_CSUM_TCP, 1440).unwrap();
        assert_eq!(
            o.gso,
            Some(Gso {
                kind: GsoKind::TcpV6,
                mss: 1440,
                hdr_len: 14 + 40 + 32,
                ecn: true
            })
        );
        assert_eq!(o.csum.unwrap().start, 54);
        assert_eq!(
            tx_offload(&f, VNET_TX_TSO4, 1440),
            Err(OffloadParseError::Mismatch)
        );
        assert_eq!(
            tx_offload(&f, VNET_TX_TSO6, 0),
            Err(OffloadParseError::Mismatch)
        );
        assert_eq!(
            tx_offload(&f[..60], VNET_TX_TSO6, 1440),
            Err(OffloadParseError::Truncated)
        );
        assert_eq!(
            tx_offload(&[0u8; 10], VNET_TX_CSUM_TCP, 0),
            Err(OffloadParseError::Truncated)
        );
    }
}

/// A received frame whose transport checksum the peer left partial (NEEDS_CSUM, virtio
/// 1.2 §5.1.6.4): the driver completes it before the stack sees the frame, as Linux's
/// `skb_checksum_help` does: the ones'-complement sum of the bytes from `start` to the end
/// (the checksum field already holds the pseudo-header sum), complemented, stored at
/// `start + offset`. Reporting such a frame as "validated" instead would let a forwarded
/// or bridged frame leave with a bad checksum.
///
/// Returns the frame offset of the 16-bit field and its completed bytes, or `None` when
/// the device's offsets do not fit the frame (the frame then goes up as it is and the stack
/// verifies, and drops, it).
pub fn complete_rx_checksum<'a>(
    fragments: impl Iterator<Item = &'a [u8]>,
    len: usize,
    start: u16,
    offset: u16,
) -> Option<(usize, [u8; 2])> {
    let start = usize::from(start);
    let field = start.checked_add(usize::from(offset))?;
    if field.checked_add(2)? > len || start >= len {
        return None;
    }
    let mut sum: u32 = 0;
    let mut pos = 0usize; // frame offset of the fragment's first byte
    for part in fragments {
        let from = start.saturating_sub(pos).min(part.len());
        for (i, &b) in part.iter().enumerate().skip(from) {
            // Bytes at even distance from `start` are the high half of a 16-bit word.
            let word_byte = if (pos + i - start).is_multiple_of(2) {
                u32::from(b) << 8
            } else {
                u32::from(b)
            };
            sum += word_byte;
            // Fold as we go: no overflow however long the frame.
            sum = (sum & 0xffff) + (sum >> 16);
        }
        pos += part.len();
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut csum = !(sum as u16);
    // RFC 768: a computed zero is sent as all ones (0 means "no checksum" for UDP; for TCP
    // both are zero in ones'-complement arithmetic).
    if csum == 0 {
        csum = 0xffff;
    }
    Some((field, csum.to_be_bytes()))
}

/// The frame's fragments with the two bytes at frame offset `at` replaced by `patch`
/// (which may straddle two fragments), for the shim to copy out in order.
pub fn patched_fragments<'a>(
    fragments: impl Iterator<Item = &'a [u8]>,
    at: usize,
    patch: &'a [u8; 2],
    mut out: impl FnMut(&'a [u8]),
) {
    let mut pos = 0usize;
    let end = at + patch.len();
    let mut patched = false;
    for part in fragments {
        let (lo, hi) = (pos, pos + part.len());
        pos = hi;
        if hi <= at || lo >= end {
            out(part);
            continue;
        }
        // Before the field, the patch (once), after the field.
        if let Some(before) = part.get(..at.saturating_sub(lo))
            && !before.is_empty()
        {
            out(before);
        }
        if !patched {
            out(patch);
            patched = true;
        }
        if let Some(after) = part.get(end.saturating_sub(lo).min(part.len())..)
            && !after.is_empty()
            && hi > end
        {
            out(after);
        }
    }
}

#[cfg(test)]
mod rx_checksum_tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// Ones'-complement sum of 16-bit big-endian words (odd tail padded).
    fn sum16(data: &[u8]) -> u32 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
            s += w;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    /// An Ethernet + IPv4 + TCP frame whose checksum field holds the pseudo-header sum,
    /// as a peer offloading its checksum sends it.
    fn partial_tcp_frame(payload_len: usize) -> (Vec<u8>, u16, u16) {
        let tcp_len = 20 + payload_len;
        let mut f = vec![0u8; 14 + 20 + tcp_len];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 2, 15]);
        ip[16..20].copy_from_slice(&[10, 0, 2, 2]);
        let tcp = 34;
        f[tcp..tcp + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[tcp + 12] = 5 << 4;
        for (i, b) in f[tcp + 20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2, 0, 6]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        let partial = sum16(&pseudo) as u16;
        f[tcp + 16..tcp + 18].copy_from_slice(&partial.to_be_bytes());
        (f, tcp as u16, 16)
    }

    #[test]
    fn completes_a_partial_checksum_across_odd_fragments() {
        for payload in [0usize, 1, 2, 3, 100, 1459] {
            let (frame, start, offset) = partial_tcp_frame(payload);
            for cut in [1usize, 7, 35, 51, 52, 53, frame.len() - 1] {
                let cut = cut.min(frame.len());
                let parts = [&frame[..cut], &frame[cut..]];
                let (at, bytes) =
                    complete_rx_checksum(parts.iter().copied(), frame.len(), start, offset)
                        .unwrap();
                assert_eq!(at, 34 + 16);
                let mut fixed = Vec::new();
                patched_fragments(parts.iter().copied(), at, &bytes, |p| {
                    fixed.extend_from_slice(p)
                });
                assert_eq!(fixed.len(), frame.len(), "cut {cut}");
                assert_eq!(fixed[..at], frame[..at]);
                assert_eq!(fixed[at + 2..], frame[at + 2..]);
                // The receiver's verification: pseudo-header + segment sums to all ones.
                let tcp_len = frame.len() - 34;
                let mut check = vec![10, 0, 2, 15, 10, 0, 2, 2, 0, 6];
                check.extend_from_slice(&(tcp_len as u16).to_be_bytes());
                check.extend_from_slice(&fixed[34..]);
                if check.len() % 2 == 1 {
                    check.push(0);
                }
                assert_eq!(sum16(&check), 0xffff, "payload {payload} cut {cut}");
            }
        }
    }

    #[test]
    fn offsets_outside_the_frame_are_refused() {
        let (frame, _, _) = partial_tcp_frame(10);
        let one = [&frame[..]];
        let n = frame.len();
        assert!(complete_rx_checksum(one.iter().copied(), n, n as u16, 0).is_none());
        assert!(complete_rx_checksum(one.iter().copied(), n, (n - 1) as u16, 0).is_none());
        assert!(complete_rx_checksum(one.iter().copied(), n, 34, u16::MAX).is_none());
        assert!(complete_rx_checksum(one.iter().copied(), n, u16::MAX, u16::MAX).is_none());
    }
}
