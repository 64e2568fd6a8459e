//! Spec constants: device types, status bits, generic feature bits (virtio 1.2 §2.1, §2.2, §6).

use bitflags::bitflags;

/// Virtio device type IDs (virtio 1.2 §5).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DeviceType {
    Net = 1,
    Block = 2,
    Console = 3,
    Entropy = 4,
    Balloon = 5,
    Scsi = 8,
    NineP = 9,
    Gpu = 16,
    Input = 18,
    Socket = 19,
    Fs = 26,
}

impl DeviceType {
    /// Every device type this project knows by name, in ID order.
    pub const ALL: [DeviceType; 11] = [
        Self::Net,
        Self::Block,
        Self::Console,
        Self::Entropy,
        Self::Balloon,
        Self::Scsi,
        Self::NineP,
        Self::Gpu,
        Self::Input,
        Self::Socket,
        Self::Fs,
    ];

    /// Maps a raw device type ID; unknown IDs are `None` (never a panic).
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == id)
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Net => "net",
            Self::Block => "blk",
            Self::Console => "console",
            Self::Entropy => "rng",
            Self::Balloon => "balloon",
            Self::Scsi => "scsi",
            Self::NineP => "9p",
            Self::Gpu => "gpu",
            Self::Input => "input",
            Self::Socket => "vsock",
            Self::Fs => "fs",
        }
    }
}

bitflags! {
    /// Device status field (virtio 1.2 §2.1).
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
    pub struct DeviceStatus: u8 {
        const ACKNOWLEDGE = 1;
        const DRIVER = 2;
        const DRIVER_OK = 4;
        const FEATURES_OK = 8;
        const DEVICE_NEEDS_RESET = 64;
        const FAILED = 128;
    }
}

bitflags! {
    /// Feature bits. Bits 0..=23 are device-specific (each device crate names its own with
    /// `Features::from_bits_retain`); the named ones here are the transport/ring bits (§6).
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Default, Hash)]
    pub struct Features: u64 {
        /// Legacy: interrupt even when notifications are suppressed, once the ring is empty.
        const NOTIFY_ON_EMPTY = 1 << 24;
        /// Legacy: no framing assumptions about descriptor layout.
        const ANY_LAYOUT = 1 << 27;
        const INDIRECT_DESC = 1 << 28;
        const EVENT_IDX = 1 << 29;
        /// QEMU's "bad feature" canary: a driver that acknowledges it is broken (never ack).
        const BAD_FEATURE = 1 << 30;
        const VERSION_1 = 1 << 32;
        const ACCESS_PLATFORM = 1 << 33;
        const RING_PACKED = 1 << 34;
        const IN_ORDER = 1 << 35;
        const ORDER_PLATFORM = 1 << 36;
        const SR_IOV = 1 << 37;
        const NOTIFICATION_DATA = 1 << 38;
        const NOTIF_CONFIG_DATA = 1 << 39;
        const RING_RESET = 1 << 40;
        const _ = !0;
    }
}

impl Features {
    /// Mask of the device-specific bit ranges (0..=23 and 50..=127 per §6; here 0..=23 and 50..=63).
    pub const DEVICE_SPECIFIC: u64 = ((1 << 24) - 1) | !((1u64 << 50) - 1);

    /// The ring/transport features this crate's virtqueue implements, and may be acknowledged
    /// when offered: `RING_PACKED` among them (modern transports only: a legacy device cannot
    /// offer bit 34), and the queues are then packed rings (`packed.rs`). Everything else
    /// generic is refused on purpose:
    /// - `IN_ORDER`: we pop used entries in device order anyway; nothing to gain yet.
    /// - `ORDER_PLATFORM`: our barriers are `core::sync::atomic` fences, right for hypervisor
    ///   devices (another CPU); a hardware device needing DMA barriers is not supported.
    /// - `ACCESS_PLATFORM`: accepted, because every platform here already maps all device
    ///   addresses through its `Dma` implementation (IODMACommand in a kext).
    /// - `NOTIFICATION_DATA`, `NOTIF_CONFIG_DATA`, `SR_IOV`, `RING_RESET`: not implemented.
    /// - `BAD_FEATURE` (bit 30): never.
    pub const RING_SUPPORTED: Features = Features::NOTIFY_ON_EMPTY
        .union(Features::ANY_LAYOUT)
        .union(Features::INDIRECT_DESC)
        .union(Features::EVENT_IDX)
        .union(Features::VERSION_1)
        .union(Features::ACCESS_PLATFORM)
        .union(Features::RING_PACKED);

    /// Human-readable name of a generic bit, for logs and reports.
    pub fn generic_name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            24 => "NOTIFY_ON_EMPTY",
            27 => "ANY_LAYOUT",
            28 => "INDIRECT_DESC",
            29 => "EVENT_IDX",
            30 => "BAD_FEATURE",
            32 => "VERSION_1",
            33 => "ACCESS_PLATFORM",
            34 => "RING_PACKED",
            35 => "IN_ORDER",
            36 => "ORDER_PLATFORM",
            37 => "SR_IOV",
            38 => "NOTIFICATION_DATA",
            39 => "NOTIF_CONFIG_DATA",
            40 => "RING_RESET",
            _ => return None,
        })
    }
}

impl Features {
    /// The single bit `bit` (device crates name their bits with it).
    pub const fn bit(bit: u32) -> Features {
        Features::from_bits_retain(1 << bit)
    }

    /// The bits a feature table accepts.
    pub const fn accepted(table: &[FeatureBit]) -> Features {
        let mut bits = 0u64;
        let mut rest = table;
        while let [first, tail @ ..] = rest {
            if first.accept {
                bits |= 1 << first.bit;
            }
            rest = tail;
        }
        Features::from_bits_retain(bits)
    }
}

/// One row of a device crate's feature table: a device-specific bit and what the driver
/// does with it. Every bit is either negotiated and implemented, or refused with a reason.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub bit: u32,
    pub name: &'static str,
    /// Negotiated when offered (and implemented); otherwise refused.
    pub accept: bool,
    /// What it does for us, or why it is refused.
    pub note: &'static str,
}

impl FeatureBit {
    /// Name of `bit` in `table`, for logs and reports.
    pub fn name_in(table: &[FeatureBit], bit: u32) -> Option<&'static str> {
        table.iter().find(|f| f.bit == bit).map(|f| f.name)
    }
}

/// Which memory layout the transport expects for a split ring.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RingLayoutKind {
    /// Virtio 0.9.5 legacy: one contiguous area, used ring aligned to 4096, address given as
    /// a page frame number (§4.1.5.1.3 legacy interface, §2.7.2 legacy).
    Legacy,
    /// Virtio 1.x: descriptor table, driver area and device area each at its own address.
    Modern,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_type_roundtrip_and_unknown() {
        for t in DeviceType::ALL {
            assert_eq!(DeviceType::from_id(t.id()), Some(t));
        }
        assert_eq!(DeviceType::from_id(0), None);
        assert_eq!(DeviceType::from_id(0xFFFF_FFFF), None);
    }

    #[test]
    fn ring_supported_never_contains_bad_feature() {
        assert!(!Features::RING_SUPPORTED.contains(Features::BAD_FEATURE));
        assert_eq!(
            Features::RING_SUPPORTED.bits() & Features::DEVICE_SPECIFIC,
            0
        );
    }
}
