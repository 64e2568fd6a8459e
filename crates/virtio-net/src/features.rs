//! Virtio-net feature bits (virtio 1.2 §5.1.3): one table saying, for every bit, whether this
//! driver negotiates and implements it, or refuses it and why.

use virtio_core::Features;

pub const CSUM: u64 = 1 << 0;
pub const GUEST_CSUM: u64 = 1 << 1;
pub const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
pub const MTU: u64 = 1 << 3;
pub const MAC: u64 = 1 << 5;
pub const GSO: u64 = 1 << 6;
pub const GUEST_TSO4: u64 = 1 << 7;
pub const GUEST_TSO6: u64 = 1 << 8;
pub const GUEST_ECN: u64 = 1 << 9;
pub const GUEST_UFO: u64 = 1 << 10;
pub const HOST_TSO4: u64 = 1 << 11;
pub const HOST_TSO6: u64 = 1 << 12;
pub const HOST_ECN: u64 = 1 << 13;
pub const HOST_UFO: u64 = 1 << 14;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const STATUS: u64 = 1 << 16;
pub const CTRL_VQ: u64 = 1 << 17;
pub const CTRL_RX: u64 = 1 << 18;
pub const CTRL_VLAN: u64 = 1 << 19;
pub const CTRL_RX_EXTRA: u64 = 1 << 20;
pub const GUEST_ANNOUNCE: u64 = 1 << 21;
pub const MQ: u64 = 1 << 22;
pub const CTRL_MAC_ADDR: u64 = 1 << 23;
pub const VQ_NOTF_COAL: u64 = 1 << 52;
pub const NOTF_COAL: u64 = 1 << 53;
pub const GUEST_USO4: u64 = 1 << 54;
pub const GUEST_USO6: u64 = 1 << 55;
pub const HOST_USO: u64 = 1 << 56;
pub const HASH_REPORT: u64 = 1 << 57;
pub const GUEST_HDRLEN: u64 = 1 << 59;
pub const RSS: u64 = 1 << 60;
pub const RSC_EXT: u64 = 1 << 61;
pub const STANDBY: u64 = 1 << 62;
pub const SPEED_DUPLEX: u64 = 1 << 63;
/// Generic bit the net driver asks for itself (the bus only adds ring features).
pub const ANY_LAYOUT: u64 = 1 << 27;
pub const NOTIFY_ON_EMPTY: u64 = 1 << 24;

/// What the driver does with a bit.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Support {
    /// Negotiated when offered (and its dependencies are), and implemented.
    Accept,
    /// Never negotiated, for this reason.
    Refuse(&'static str),
}

/// One row of [`FEATURE_TABLE`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FeatureInfo {
    pub bit: u64,
    pub name: &'static str,
    pub support: Support,
    /// Bits that must also be negotiated for this one to be (§5.1.3.1). `any_of`: at least
    /// one of them (HOST_ECN needs a TSO bit), otherwise all of them.
    pub requires: u64,
    pub any_of: bool,
}

const fn accept(bit: u64, name: &'static str, requires: u64) -> FeatureInfo {
    FeatureInfo {
        bit,
        name,
        support: Support::Accept,
        requires,
        any_of: false,
    }
}
const fn accept_any(bit: u64, name: &'static str, requires: u64) -> FeatureInfo {
    FeatureInfo {
        bit,
        name,
        support: Support::Accept,
        requires,
        any_of: true,
    }
}
const fn refuse(bit: u64, name: &'static str, why: &'static str) -> FeatureInfo {
    FeatureInfo {
        bit,
        name,
        support: Support::Refuse(why),
        requires: 0,
        any_of: false,
    }
}

/// Every virtio-net bit and the generic bits that change the net driver's framing.
pub const FEATURE_TABLE: &[FeatureInfo] = &[
    accept(CSUM, "CSUM", 0),
    accept(GUEST_CSUM, "GUEST_CSUM", 0),
    accept(CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS", CTRL_VQ),
    // Validated after negotiation: an mtu below 68 makes the driver renegotiate without it.
    accept(MTU, "MTU", 0),
    // Absent: a random locally administered address is used (and pushed to the device).
    accept(MAC, "MAC", 0),
    refuse(
        GSO,
        "GSO",
        "legacy catch-all GSO bit, superseded by the per-protocol HOST_/GUEST_ bits",
    ),
    accept(GUEST_TSO4, "GUEST_TSO4", GUEST_CSUM),
    accept(GUEST_TSO6, "GUEST_TSO6", GUEST_CSUM),
    accept_any(GUEST_ECN, "GUEST_ECN", GUEST_TSO4 | GUEST_TSO6),
    accept(GUEST_UFO, "GUEST_UFO", GUEST_CSUM),
    accept(HOST_TSO4, "HOST_TSO4", CSUM),
    accept(HOST_TSO6, "HOST_TSO6", CSUM),
    accept_any(HOST_ECN, "HOST_ECN", HOST_TSO4 | HOST_TSO6),
    accept(HOST_UFO, "HOST_UFO", CSUM),
    accept(MRG_RXBUF, "MRG_RXBUF", 0),
    accept(STATUS, "STATUS", 0),
    accept(CTRL_VQ, "CTRL_VQ", 0),
    accept(CTRL_RX, "CTRL_RX", CTRL_VQ),
    accept(CTRL_VLAN, "CTRL_VLAN", CTRL_VQ),
    refuse(
        CTRL_RX_EXTRA,
        "CTRL_RX_EXTRA",
        "no-unicast/no-multicast/no-broadcast modes have no IOEthernetController counterpart",
    ),
    accept(GUEST_ANNOUNCE, "GUEST_ANNOUNCE", CTRL_VQ),
    refuse(
        MQ,
        "MQ",
        "one queue pair is driven for now (IOEthernetController has one output queue); \
         queues are still numbered in pairs so MQ can be added",
    ),
    accept(CTRL_MAC_ADDR, "CTRL_MAC_ADDR", CTRL_VQ),
    refuse(
        VQ_NOTF_COAL,
        "VQ_NOTF_COAL",
        "interrupt coalescing commands not implemented (EVENT_IDX suppression is used)",
    ),
    refuse(
        NOTF_COAL,
        "NOTF_COAL",
        "interrupt coalescing commands not implemented (EVENT_IDX suppression is used)",
    ),
    refuse(
        GUEST_USO4,
        "GUEST_USO4",
        "UDP segmentation offload: no Darwin stack counterpart",
    ),
    refuse(
        GUEST_USO6,
        "GUEST_USO6",
        "UDP segmentation offload: no Darwin stack counterpart",
    ),
    refuse(
        HOST_USO,
        "HOST_USO",
        "UDP segmentation offload: no Darwin stack counterpart",
    ),
    refuse(
        HASH_REPORT,
        "HASH_REPORT",
        "needs the 20-byte header; hashes are useless with one queue pair",
    ),
    refuse(
        GUEST_HDRLEN,
        "GUEST_HDRLEN",
        "hdr_len comes from the caller and cannot be promised exact",
    ),
    refuse(RSS, "RSS", "one queue pair: nothing to steer to"),
    refuse(
        RSC_EXT,
        "RSC_EXT",
        "coalescing statistics in the header not implemented",
    ),
    refuse(
        STANDBY,
        "STANDBY",
        "failover to a passthrough NIC is not a Darwin concept",
    ),
    accept(SPEED_DUPLEX, "SPEED_DUPLEX", 0),
    // Generic bits the net driver decides on (the bus handles the ring bits).
    accept(ANY_LAYOUT, "ANY_LAYOUT", 0),
    refuse(
        NOTIFY_ON_EMPTY,
        "NOTIFY_ON_EMPTY",
        "legacy; transmit completions are reclaimed on interrupt or on the next send",
    ),
];

/// Every bit the driver may negotiate.
pub const SUPPORTED: u64 = supported();

// Evaluated at compile time; `i < len` bounds every index.
#[allow(clippy::indexing_slicing)]
const fn supported() -> u64 {
    let mut bits = 0;
    let mut i = 0;
    while i < FEATURE_TABLE.len() {
        if matches!(FEATURE_TABLE[i].support, Support::Accept) {
            bits |= FEATURE_TABLE[i].bit;
        }
        i += 1;
    }
    bits
}

/// Name of a net (or net-relevant generic) bit.
pub fn name(bit: u64) -> Option<&'static str> {
    FEATURE_TABLE.iter().find(|f| f.bit == bit).map(|f| f.name)
}

/// Removes bits whose dependencies are missing, until the set is closed (§5.1.3.1: "The
/// driver MUST NOT negotiate a feature without the features it depends on").
pub fn close_dependencies(set: Features) -> Features {
    let mut bits = set.bits();
    loop {
        let before = bits;
        for f in FEATURE_TABLE {
            if bits & f.bit == 0 || f.requires == 0 {
                continue;
            }
            let ok = if f.any_of {
                bits & f.requires != 0
            } else {
                bits & f.requires == f.requires
            };
            if !ok {
                bits &= !f.bit;
            }
        }
        if bits == before {
            return Features::from_bits_retain(bits);
        }
    }
}

/// Whether `features` contains every bit of `bits`.
pub fn has(features: Features, bits: u64) -> bool {
    features.bits() & bits == bits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_unique_bits_and_covers_every_named_net_bit() {
        for (i, a) in FEATURE_TABLE.iter().enumerate() {
            assert_eq!(a.bit.count_ones(), 1, "{}", a.name);
            for b in &FEATURE_TABLE[i + 1..] {
                assert_ne!(a.bit, b.bit, "{} / {}", a.name, b.name);
            }
        }
        for bit in (0..24).chain(52..64) {
            if bit == 4 || bit == 58 {
                continue; // unassigned
            }
            assert!(name(1 << bit).is_some(), "bit {bit} missing from the table");
        }
        assert_eq!(SUPPORTED & (MQ | GSO | CTRL_RX_EXTRA), 0);
        assert_eq!(SUPPORTED & (1 << 30), 0);
    }

    #[test]
    fn dependencies_are_closed() {
        let f = close_dependencies(Features::from_bits_retain(
            HOST_TSO4 | HOST_ECN | GUEST_TSO6 | GUEST_ECN | CTRL_RX | GUEST_CSUM,
        ));
        // HOST_TSO4 lacks CSUM, so it goes, and HOST_ECN with it; GUEST side is complete;
        // CTRL_RX lacks CTRL_VQ.
        assert_eq!(f.bits(), GUEST_TSO6 | GUEST_ECN | GUEST_CSUM);
        let all = close_dependencies(Features::from_bits_retain(SUPPORTED));
        assert_eq!(all.bits(), SUPPORTED);
    }
}
