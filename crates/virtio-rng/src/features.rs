//! Entropy device feature bits (virtio 1.2 §5.4.3: "None currently defined"): the table is
//! empty, so the driver asks for no device-specific bit.
//!
//! Generic ring/transport bits (INDIRECT_DESC, EVENT_IDX, VERSION_1, ACCESS_PLATFORM) are
//! accepted by the bus (`virtio_core::device::BUS_FEATURES`). Every chain this driver posts
//! is one device-writable descriptor, so ANY_LAYOUT changes nothing and is not asked for.

use virtio_core::Features;

pub use virtio_core::types::FeatureBit;

/// Every entropy feature bit the spec defines: none (§5.4.3).
pub const FEATURE_TABLE: [FeatureBit; 0] = [];

/// The accepted bits of [`FEATURE_TABLE`]: none.
pub const SUPPORTED: Features = Features::accepted(&FEATURE_TABLE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_no_device_bit() {
        assert!(SUPPORTED.is_empty());
        assert!(!SUPPORTED.intersects(Features::BAD_FEATURE | Features::ANY_LAYOUT));
    }
}
