//! Wire formats (virtio 1.2 §5.1.4, §5.1.6): the net header, control-queue messages, MAC
//! filter tables and the device configuration layout. All little-endian: modern devices are
//! LE by spec; legacy devices use guest endianness, which is LE on every Darwin target.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

#[cfg(target_endian = "big")]
compile_error!("legacy virtio-net fields are guest-endian; this driver assumes little-endian");

/// `flags`: the checksum from `csum_start` to the end still has to be computed and stored
/// at `csum_start + csum_offset`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags` (receive): the checksum has been validated.
pub const HDR_F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// Header length with VERSION_1 or MRG_RXBUF.
pub const HDR_LEN_V1: usize = 12;
/// Header length of a legacy device without MRG_RXBUF.
pub const HDR_LEN_LEGACY: usize = 10;

/// `struct virtio_net_hdr` (12 bytes; the legacy 10-byte form is its first 10 bytes).
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: U16,
    pub gso_size: U16,
    pub csum_start: U16,
    pub csum_offset: U16,
    pub num_buffers: U16,
}

/// Control-queue classes and commands (§5.1.6.5).
pub mod ctrl {
    pub const CLASS_RX: u8 = 0;
    pub const RX_PROMISC: u8 = 0;
    pub const RX_ALLMULTI: u8 = 1;
    pub const CLASS_MAC: u8 = 1;
    pub const MAC_TABLE_SET: u8 = 0;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const CLASS_VLAN: u8 = 2;
    pub const VLAN_ADD: u8 = 0;
    pub const VLAN_DEL: u8 = 1;
    pub const CLASS_ANNOUNCE: u8 = 3;
    pub const ANNOUNCE_ACK: u8 = 0;
    pub const CLASS_MQ: u8 = 4;
    pub const CLASS_GUEST_OFFLOADS: u8 = 5;
    pub const GUEST_OFFLOADS_SET: u8 = 0;
    pub const ACK_OK: u8 = 0;
    pub const ACK_ERR: u8 = 1;
}

/// `struct virtio_net_ctrl_hdr`.
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct CtrlHdr {
    pub class: u8,
    pub command: u8,
}

/// Head of `struct virtio_net_ctrl_mac`: `entries` then `entries` 6-byte addresses.
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct MacTableHdr {
    pub entries: U32,
}

/// Device configuration offsets (§5.1.4).
pub mod config {
    pub const MAC: u32 = 0;
    pub const STATUS: u32 = 6;
    pub const MAX_VIRTQUEUE_PAIRS: u32 = 8;
    pub const MTU: u32 = 10;
    pub const SPEED: u32 = 12;
    pub const DUPLEX: u32 = 16;
    /// `status` bits.
    pub const S_LINK_UP: u16 = 1;
    pub const S_ANNOUNCE: u16 = 2;
}

/// Smallest MTU a device may report (§5.1.4.1: "between 68 and 65535").
pub const MIN_MTU: u16 = 68;
/// Ethernet header plus one VLAN tag.
pub const ETH_VLAN_HLEN: usize = 18;
/// Largest frame this driver handles: an IPv4/IPv6 packet of 65535 bytes, Ethernet header
/// and VLAN tag.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_VLAN_HLEN;

/// Segmentation requested for a transmitted frame, or reported for a received one.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GsoKind {
    TcpV4,
    TcpV6,
    Udp,
}

impl GsoKind {
    pub fn wire(self) -> u8 {
        match self {
            GsoKind::TcpV4 => GSO_TCPV4,
            GsoKind::TcpV6 => GSO_TCPV6,
            GsoKind::Udp => GSO_UDP,
        }
    }
}

/// A segmentation request: the device cuts the frame into `mss`-byte payloads.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    /// Payload bytes per segment (`gso_size`).
    pub mss: u16,
    /// Length of the Ethernet + IP + TCP/UDP headers (`hdr_len`).
    pub hdr_len: u16,
    /// The TCP stream uses ECN (CWR may be set): needs HOST_ECN.
    pub ecn: bool,
}

/// Offloads requested for one transmitted frame.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxOffload {
    /// Partial checksum: the device sums from `start` to the end and stores the result at
    /// `start + offset` (needs CSUM).
    pub csum: Option<CsumRequest>,
    /// Segmentation (needs the HOST_TSO4/TSO6/UFO bit, and `csum`).
    pub gso: Option<Gso>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CsumRequest {
    pub start: u16,
    pub offset: u16,
}

impl TxOffload {
    pub const NONE: TxOffload = TxOffload {
        csum: None,
        gso: None,
    };
    /// Checksum only.
    pub const fn csum(start: u16, offset: u16) -> Self {
        TxOffload {
            csum: Some(CsumRequest { start, offset }),
            gso: None,
        }
    }
    /// Segmentation with its mandatory checksum request.
    pub const fn gso(
        kind: GsoKind,
        mss: u16,
        hdr_len: u16,
        csum_start: u16,
        csum_offset: u16,
    ) -> Self {
        TxOffload {
            csum: Some(CsumRequest {
                start: csum_start,
                offset: csum_offset,
            }),
            gso: Some(Gso {
                kind,
                mss,
                hdr_len,
                ecn: false,
            }),
        }
    }
    pub const fn with_ecn(mut self) -> Self {
        if let Some(g) = &mut self.gso {
            g.ecn = true;
        }
        self
    }
}

/// Why a transmit request cannot be expressed in a header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// The needed feature bit was not negotiated.
    NotNegotiated(&'static str),
    /// Inconsistent values (checksum outside the frame, GSO without checksum, mss 0, ...).
    Invalid(&'static str),
}

impl core::fmt::Display for OffloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OffloadError::NotNegotiated(w) => write!(f, "{w} not negotiated"),
            OffloadError::Invalid(w) => write!(f, "invalid request: {w}"),
        }
    }
}

/// Which transmit offloads were negotiated.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HostOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ufo: bool,
    pub ecn: bool,
}

/// Builds the transmit header for `offload` on a frame of `frame_len` bytes (§5.1.6.2).
pub fn build_tx_header(
    offload: &TxOffload,
    frame_len: usize,
    host: &HostOffloads,
) -> Result<NetHdr, OffloadError> {
    let mut h = NetHdr::default();
    if let Some(c) = offload.csum {
        if !host.csum {
            return Err(OffloadError::NotNegotiated("CSUM"));
        }
        // §5.1.6.2.1: csum_start + csum_offset + 2 must lie inside the frame.
        let end = c.start as usize + c.offset as usize + 2;
        if end > frame_len {
            return Err(OffloadError::Invalid("checksum field beyond the frame"));
        }
        h.flags = HDR_F_NEEDS_CSUM;
        h.csum_start = c.start.into();
        h.csum_offset = c.offset.into();
    }
    if let Some(g) = offload.gso {
        let (ok, name) = match g.kind {
            GsoKind::TcpV4 => (host.tso4, "HOST_TSO4"),
            GsoKind::TcpV6 => (host.tso6, "HOST_TSO6"),
            GsoKind::Udp => (host.ufo, "HOST_UFO"),
        };
        if !ok {
            return Err(OffloadError::NotNegotiated(name));
        }
        if g.ecn && !host.ecn {
            return Err(OffloadError::NotNegotiated("HOST_ECN"));
        }
        // §5.1.6.2.1: "If gso_type differs from NONE, the driver MUST also set NEEDS_CSUM
        // and MUST set gso_size to indicate the desired MSS."
        let Some(c) = offload.csum else {
            return Err(OffloadError::Invalid("GSO without a checksum request"));
        };
        if g.mss == 0 {
            return Err(OffloadError::Invalid("GSO with mss 0"));
        }
        if g.hdr_len as usize > frame_len || g.hdr_len <= c.start {
            return Err(OffloadError::Invalid(
                "hdr_len outside the frame or before csum_start",
            ));
        }
        if frame_len > MAX_GSO_FRAME {
            return Err(OffloadError::Invalid("GSO frame beyond 64 KiB"));
        }
        h.gso_type = g.kind.wire() | if g.ecn { GSO_ECN } else { 0 };
        h.gso_size = g.mss.into();
        h.hdr_len = g.hdr_len.into();
    }
    Ok(h)
}

/// Checksum state of a received frame.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RxCsum {
    /// Nothing known: the stack verifies.
    None,
    /// DATA_VALID: the device (or its peer) validated the checksum.
    Valid,
    /// NEEDS_CSUM: the checksum from `start` to the end is partial and must be completed
    /// at `start + offset` (a frame from a local peer that offloaded it). Implies valid data.
    Partial { start: u16, offset: u16 },
}

/// A coalesced large frame (GUEST_TSO/UFO): what a segmentation would cut it into.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RxGso {
    pub kind: GsoKind,
    pub size: u16,
    pub hdr_len: u16,
    pub ecn: bool,
}

/// What the receive header says, validated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RxInfo {
    /// Frame length (without the virtio header).
    pub len: usize,
    pub csum: RxCsum,
    pub gso: Option<RxGso>,
}

/// Which receive offloads are in effect (negotiated, and enabled by CTRL_GUEST_OFFLOADS).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
    pub ufo: bool,
}

impl GuestOffloads {
    /// The CTRL_GUEST_OFFLOADS_SET bitmap (feature bit numbers).
    pub fn bits(&self) -> u64 {
        use crate::features as f;
        let mut b = 0;
        for (on, bit) in [
            (self.csum, f::GUEST_CSUM),
            (self.tso4, f::GUEST_TSO4),
            (self.tso6, f::GUEST_TSO6),
            (self.ecn, f::GUEST_ECN),
            (self.ufo, f::GUEST_UFO),
        ] {
            if on {
                b |= bit;
            }
        }
        b
    }
}

/// Validates a receive header for a frame of `frame_len` bytes (§5.1.6.4).
pub fn parse_rx_header(
    h: &NetHdr,
    frame_len: usize,
    guest: &GuestOffloads,
) -> Result<RxInfo, &'static str> {
    let csum = if h.flags & HDR_F_NEEDS_CSUM != 0 {
        if !guest.csum {
            return Err("NEEDS_CSUM without GUEST_CSUM");
        }
        let start = h.csum_start.get();
        let offset = h.csum_offset.get();
        if start as usize + offset as usize + 2 > frame_len {
            return Err("checksum field beyond the frame");
        }
        RxCsum::Partial { start, offset }
    } else if h.flags & HDR_F_DATA_VALID != 0 {
        if !guest.csum {
            return Err("DATA_VALID without GUEST_CSUM");
        }
        RxCsum::Valid
    } else {
        RxCsum::None
    };
    let gso = match h.gso_type & !GSO_ECN {
        GSO_NONE if h.gso_type & GSO_ECN != 0 => return Err("ECN flag without a GSO type"),
        GSO_NONE => None,
        t => {
            let (kind, ok) = match t {
                GSO_TCPV4 => (GsoKind::TcpV4, guest.tso4),
                GSO_TCPV6 => (GsoKind::TcpV6, guest.tso6),
                GSO_UDP => (GsoKind::Udp, guest.ufo),
                _ => return Err("unknown gso_type"),
            };
            if !ok {
                return Err("GSO type not negotiated or disabled");
            }
            let ecn = h.gso_type & GSO_ECN != 0;
            if ecn && !guest.ecn {
                return Err("GSO ECN without GUEST_ECN");
            }
            if h.gso_size.get() == 0 {
                return Err("GSO with gso_size 0");
            }
            Some(RxGso {
                kind,
                size: h.gso_size.get(),
                hdr_len: h.hdr_len.get(),
                ecn,
            })
        }
    };
    Ok(RxInfo {
        len: frame_len,
        csum,
        gso,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use zerocopy::IntoBytes;

    const ALL: HostOffloads = HostOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ufo: true,
        ecn: true,
    };

    fn bytes(h: &NetHdr, len: usize) -> Vec<u8> {
        h.as_bytes()[..len].to_vec()
    }

    #[test]
    fn header_is_12_bytes_and_legacy_prefix_is_10() {
        assert_eq!(core::mem::size_of::<NetHdr>(), HDR_LEN_V1);
        let h = NetHdr {
            num_buffers: 0x0102.into(),
            ..Default::default()
        };
        assert_eq!(bytes(&h, 12), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x01]);
        // The legacy layout ends before num_buffers.
        assert_eq!(bytes(&h, HDR_LEN_LEGACY), [0; 10]);
    }

    #[test]
    fn tcpv4_tso_exact_bytes() {
        // Ethernet 14 + IPv4 20 + TCP 20: csum_start 34, csum_offset 16, hdr_len 54, mss 1448.
        let h = build_tx_header(
            &TxOffload::gso(GsoKind::TcpV4, 1448, 54, 34, 16),
            9000,
            &ALL,
        )
        .unwrap();
        assert_eq!(bytes(&h, 12), [1, 1, 54, 0, 0xA8, 0x05, 34, 0, 16, 0, 0, 0]);
        assert_eq!(bytes(&h, 10), [1, 1, 54, 0, 0xA8, 0x05, 34, 0, 16, 0]);
    }

    #[test]
    fn tcpv4_ecn_exact_bytes() {
        let h = build_tx_header(
            &TxOffload::gso(GsoKind::TcpV4, 1448, 66, 34, 16).with_ecn(),
            3000,
            &ALL,
        )
        .unwrap();
        assert_eq!(
            bytes(&h, 12),
            [1, 0x81, 66, 0, 0xA8, 0x05, 34, 0, 16, 0, 0, 0]
        );
    }

    #[test]
    fn tcpv6_with_and_without_ecn_exact_bytes() {
        // Ethernet 14 + IPv6 40 + TCP 32 (timestamps): csum_start 54, hdr_len 86, mss 1428.
        let o = TxOffload::gso(GsoKind::TcpV6, 1428, 86, 54, 16);
        let h = build_tx_header(&o, 20000, &ALL).unwrap();
        assert_eq!(bytes(&h, 12), [1, 4, 86, 0, 0x94, 0x05, 54, 0, 16, 0, 0, 0]);
        let h = build_tx_header(&o.with_ecn(), 20000, &ALL).unwrap();
        assert_eq!(
            bytes(&h, 12),
            [1, 0x84, 86, 0, 0x94, 0x05, 54, 0, 16, 0, 0, 0]
        );
    }

    #[test]
    fn udp_ufo_exact_bytes() {
        // Ethernet 14 + IPv4 20 + UDP 8: csum_start 34, csum_offset 6, hdr_len 42.
        let h =
            build_tx_header(&TxOffload::gso(GsoKind::Udp, 1472, 42, 34, 6), 8000, &ALL).unwrap();
        assert_eq!(bytes(&h, 12), [1, 3, 42, 0, 0xC0, 0x05, 34, 0, 6, 0, 0, 0]);
        assert_eq!(bytes(&h, 10), [1, 3, 42, 0, 0xC0, 0x05, 34, 0, 6, 0]);
    }

    #[test]
    fn checksum_only_and_none_exact_bytes() {
        let h = build_tx_header(&TxOffload::csum(34, 6), 100, &ALL).unwrap();
        assert_eq!(bytes(&h, 12), [1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0]);
        assert_eq!(bytes(&h, 10), [1, 0, 0, 0, 0, 0, 34, 0, 6, 0]);
        let h = build_tx_header(&TxOffload::NONE, 60, &HostOffloads::default()).unwrap();
        assert_eq!(bytes(&h, 12), [0; 12]);
        // Checksum offset 300 = 0x012C: little-endian.
        let h = build_tx_header(&TxOffload::csum(0x0102, 0x012C), 2000, &ALL).unwrap();
        assert_eq!(bytes(&h, 10), [1, 0, 0, 0, 0, 0, 0x02, 0x01, 0x2C, 0x01]);
    }

    #[test]
    fn tx_requests_checked_against_negotiation_and_frame() {
        let none = HostOffloads::default();
        assert_eq!(
            build_tx_header(&TxOffload::csum(34, 16), 100, &none),
            Err(OffloadError::NotNegotiated("CSUM"))
        );
        let csum_only = HostOffloads { csum: true, ..none };
        assert_eq!(
            build_tx_header(
                &TxOffload::gso(GsoKind::TcpV6, 1400, 74, 54, 16),
                9000,
                &csum_only
            ),
            Err(OffloadError::NotNegotiated("HOST_TSO6"))
        );
        let tso = HostOffloads {
            csum: true,
            tso4: true,
            ..none
        };
        assert_eq!(
            build_tx_header(
                &TxOffload::gso(GsoKind::TcpV4, 1400, 54, 34, 16).with_ecn(),
                9000,
                &tso
            ),
            Err(OffloadError::NotNegotiated("HOST_ECN"))
        );
        assert!(matches!(
            build_tx_header(&TxOffload::csum(90, 16), 100, &ALL),
            Err(OffloadError::Invalid(_))
        ));
        assert!(matches!(
            build_tx_header(&TxOffload::gso(GsoKind::TcpV4, 0, 54, 34, 16), 9000, &ALL),
            Err(OffloadError::Invalid(_))
        ));
        let mut no_csum = TxOffload::gso(GsoKind::TcpV4, 1400, 54, 34, 16);
        no_csum.csum = None;
        assert!(matches!(
            build_tx_header(&no_csum, 9000, &ALL),
            Err(OffloadError::Invalid(_))
        ));
    }

    #[test]
    fn rx_header_parsing() {
        let all = GuestOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        };
        let raw = [2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let h = NetHdr::read_from_bytes(&raw[..]).unwrap();
        assert_eq!(h.num_buffers.get(), 1);
        assert_eq!(parse_rx_header(&h, 60, &all).unwrap().csum, RxCsum::Valid);
        assert!(parse_rx_header(&h, 60, &GuestOffloads::default()).is_err());
        let raw = [1u8, 0x84, 86, 0, 0x94, 0x05, 54, 0, 16, 0, 3, 0];
        let h = NetHdr::read_from_bytes(&raw[..]).unwrap();
        let info = parse_rx_header(&h, 30000, &all).unwrap();
        assert_eq!(
            info.csum,
            RxCsum::Partial {
                start: 54,
                offset: 16
            }
        );
        assert_eq!(
            info.gso,
            Some(RxGso {
                kind: GsoKind::TcpV6,
                size: 1428,
                hdr_len: 86,
                ecn: true
            })
        );
        assert!(parse_rx_header(&h, 60, &all).is_err(), "csum beyond frame");
        let no_ecn = GuestOffloads { ecn: false, ..all };
        assert!(parse_rx_header(&h, 30000, &no_ecn).is_err());
        let raw = [0u8, 7, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0];
        let h = NetHdr::read_from_bytes(&raw[..]).unwrap();
        assert!(parse_rx_header(&h, 100, &all).is_err(), "unknown gso type");
        assert_eq!(
            GuestOffloads {
                csum: true,
                tso4: true,
                ..Default::default()
            }
            .bits(),
            (1 << 1) | (1 << 7)
        );
    }
}
