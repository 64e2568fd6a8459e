//! Block device feature bits (virtio 1.2 §5.2.3 and its legacy notes): one table saying,
//! for every bit, whether this driver negotiates and implements it, or why it refuses it.
//!
//! Generic ring/transport bits (INDIRECT_DESC, EVENT_IDX, VERSION_1, ACCESS_PLATFORM) are
//! accepted by the bus (`virtio_core::device::BUS_FEATURES`); the driver adds ANY_LAYOUT.

use virtio_core::Features;

pub use virtio_core::types::FeatureBit;

/// Named bits.
pub const BARRIER: Features = Features::bit(0);
pub const SIZE_MAX: Features = Features::bit(1);
pub const SEG_MAX: Features = Features::bit(2);
pub const GEOMETRY: Features = Features::bit(4);
pub const RO: Features = Features::bit(5);
pub const BLK_SIZE: Features = Features::bit(6);
pub const SCSI: Features = Features::bit(7);
/// Legacy name: `VIRTIO_BLK_F_WCE`.
pub const FLUSH: Features = Features::bit(9);
pub const TOPOLOGY: Features = Features::bit(10);
pub const CONFIG_WCE: Features = Features::bit(11);
pub const MQ: Features = Features::bit(12);
pub const DISCARD: Features = Features::bit(13);
pub const WRITE_ZEROES: Features = Features::bit(14);
pub const LIFETIME: Features = Features::bit(15);
pub const SECURE_ERASE: Features = Features::bit(16);
pub const ZONED: Features = Features::bit(17);

/// Every block feature bit, negotiated or refused, with the reason.
pub const FEATURE_TABLE: [FeatureBit; 16] = [
    FeatureBit {
        bit: 0,
        name: "BARRIER",
        accept: false,
        note: "legacy ordered-request barriers; obsolete (Linux dropped them), ordering is \
               the caller's business through FLUSH",
    },
    FeatureBit {
        bit: 1,
        name: "SIZE_MAX",
        accept: true,
        note: "largest data segment: descriptors are split to stay within it",
    },
    FeatureBit {
        bit: 2,
        name: "SEG_MAX",
        accept: true,
        note: "data segments per request: requests are split to stay within it",
    },
    FeatureBit {
        bit: 4,
        name: "GEOMETRY",
        accept: true,
        note: "reported to the caller (informational)",
    },
    FeatureBit {
        bit: 5,
        name: "RO",
        accept: true,
        note: "writes, discards, write-zeroes and secure erase are refused before the device",
    },
    FeatureBit {
        bit: 6,
        name: "BLK_SIZE",
        accept: true,
        note: "logical block size: requests must be aligned to it, splits honour it",
    },
    FeatureBit {
        bit: 7,
        name: "SCSI",
        accept: false,
        note: "legacy SCSI command passthrough; not needed for a disk, not implemented",
    },
    FeatureBit {
        bit: 9,
        name: "FLUSH",
        accept: true,
        note: "flush requests; without it the device is write-through and flush is refused \
               as Unsupported (nothing to flush)",
    },
    FeatureBit {
        bit: 10,
        name: "TOPOLOGY",
        accept: true,
        note: "physical block / alignment / I/O size hints, reported to the caller",
    },
    FeatureBit {
        bit: 11,
        name: "CONFIG_WCE",
        accept: true,
        note: "writeback cache mode readable and settable (`set_writeback`)",
    },
    FeatureBit {
        bit: 12,
        name: "MQ",
        accept: true,
        note: "several request queues (num_queues)",
    },
    FeatureBit {
        bit: 13,
        name: "DISCARD",
        accept: true,
        note: "multi-range discard, split by max_discard_sectors/seg and alignment",
    },
    FeatureBit {
        bit: 14,
        name: "WRITE_ZEROES",
        accept: true,
        note: "multi-range write zeroes with the unmap flag",
    },
    FeatureBit {
        bit: 15,
        name: "LIFETIME",
        accept: true,
        note: "GET_LIFETIME (eMMC/UFS style wear report)",
    },
    FeatureBit {
        bit: 16,
        name: "SECURE_ERASE",
        accept: true,
        note: "multi-range secure erase, split by its sector/segment limits",
    },
    FeatureBit {
        bit: 17,
        name: "ZONED",
        accept: false,
        note: "zoned devices need zone management (report/open/close/append) that the \
               Darwin block storage model has no use for; a host-managed device is expected \
               to fail FEATURES_OK without it, as the spec intends",
    },
];

/// Everything the driver asks for: the accepted bits of [`FEATURE_TABLE`], plus
/// ANY_LAYOUT (transitional drivers accept it; our layout is always header, data, status in
/// separate descriptors, which is valid with or without it).
pub const DRIVER_FEATURES: Features =
    Features::accepted(&FEATURE_TABLE).union(Features::ANY_LAYOUT);

/// Name of a block feature bit, for logs.
pub fn name(bit: u32) -> Option<&'static str> {
    FeatureBit::name_in(&FEATURE_TABLE, bit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for f in FEATURE_TABLE {
            assert!(f.bit < 24, "device-specific bits are 0..=23");
            assert!(!f.note.is_empty());
            assert_eq!(
                DRIVER_FEATURES.bits() & (1 << f.bit) != 0,
                f.accept,
                "{}",
                f.name
            );
        }
        for accepted in [
            SIZE_MAX,
            SEG_MAX,
            GEOMETRY,
            RO,
            BLK_SIZE,
            FLUSH,
            TOPOLOGY,
            CONFIG_WCE,
            MQ,
            DISCARD,
            WRITE_ZEROES,
            LIFETIME,
            SECURE_ERASE,
        ] {
            assert!(DRIVER_FEATURES.contains(accepted));
        }
        for refused in [BARRIER, SCSI, ZONED, Features::BAD_FEATURE] {
            assert!(!DRIVER_FEATURES.intersects(refused));
        }
        assert_eq!(name(12), Some("MQ"));
        assert_eq!(name(3), None);
    }
}
