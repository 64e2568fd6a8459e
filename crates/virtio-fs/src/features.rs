//! File system device feature bits (virtio 1.2 §5.11.3): one table saying, for every bit,
//! whether this driver negotiates it or why it refuses it.
//!
//! Generic ring/transport bits (INDIRECT_DESC, EVENT_IDX, VERSION_1, ACCESS_PLATFORM) are
//! accepted by the bus (`virtio_core::device::BUS_FEATURES`). virtio-fs has no legacy
//! interface (§5.11: VERSION_1 is required), so the driver refuses a device without it.

use virtio_core::Features;

pub use virtio_core::types::FeatureBit;

/// `VIRTIO_FS_F_NOTIFICATION` (§5.11.3, virtio 1.2): a notification queue for FUSE
/// notifications from the device.
pub const NOTIFICATION: Features = Features::bit(0);

/// Every file system feature bit, negotiated or refused, with the reason.
pub const FEATURE_TABLE: [FeatureBit; 1] = [FeatureBit {
    bit: 0,
    name: "NOTIFICATION",
    accept: true,
    note: "queue 1 becomes the notification queue (request queues from 2): the driver \
           posts preallocated buffers of at least notify_buf_size, validates each FUSE \
           notify message (INVAL_INODE, INVAL_ENTRY, DELETE, LOCK, POLL) and hands it \
           out typed (FsDriver::take_notification); FsOptions::notify_buffers 0 refuses it",
}];

/// The accepted bits of [`FEATURE_TABLE`].
pub const SUPPORTED: Features = Features::accepted(&FEATURE_TABLE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_notification_refuses_bad_feature() {
        assert!(SUPPORTED.contains(NOTIFICATION));
        assert!(!SUPPORTED.intersects(Features::BAD_FEATURE));
    }
}
