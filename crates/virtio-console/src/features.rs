//! Console feature bits (virtio 1.2 §5.3.3): one table saying, for every bit, whether this
//! driver negotiates and implements it, or why it refuses it.
//!
//! Generic ring/transport bits (INDIRECT_DESC, EVENT_IDX, VERSION_1, ACCESS_PLATFORM) are
//! accepted by the bus (`virtio_core::device::BUS_FEATURES`). Every chain this driver posts
//! is a single descriptor, so ANY_LAYOUT changes nothing and is not asked for.

use virtio_core::Features;

pub use virtio_core::types::FeatureBit;

/// `VIRTIO_CONSOLE_F_SIZE`: `cols`/`rows` in config are valid.
pub const SIZE: Features = Features::bit(0);
/// `VIRTIO_CONSOLE_F_MULTIPORT`: `max_nr_ports` is valid, control queues exist.
pub const MULTIPORT: Features = Features::bit(1);
/// `VIRTIO_CONSOLE_F_EMERG_WRITE`: `emerg_wr` works.
pub const EMERG_WRITE: Features = Features::bit(2);

/// Every console feature bit the spec defines, with what the driver does with it.
pub const FEATURE_TABLE: [FeatureBit; 3] = [
    FeatureBit {
        bit: 0,
        name: "SIZE",
        accept: true,
        note: "console size of port 0 from config (`cols`, `rows`), re-read on config \
               change and reported as a Resize event; with MULTIPORT, per-port sizes come \
               in RESIZE control messages instead",
    },
    FeatureBit {
        bit: 1,
        name: "MULTIPORT",
        accept: true,
        note: "named ports for tools: the control queues, PORT_ADD/REMOVE, CONSOLE_PORT, \
               RESIZE, PORT_OPEN both ways and PORT_NAME; queues for up to max_nr_ports \
               ports (bounded by the driver's own limit) are set up at start",
    },
    FeatureBit {
        bit: 2,
        name: "EMERG_WRITE",
        accept: true,
        note: "emergency write through the `emerg_wr` config field: works without queues \
               and before DRIVER_OK, the kernel-log and panic path",
    },
];

/// The accepted bits of [`FEATURE_TABLE`].
pub const SUPPORTED: Features = Features::accepted(&FEATURE_TABLE);

/// Name of a console feature bit, for logs.
pub fn name(bit: u32) -> Option<&'static str> {
    FeatureBit::name_in(&FEATURE_TABLE, bit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for f in FEATURE_TABLE {
            assert!(f.bit < 24);
            assert!(!f.note.is_empty());
            assert_eq!(SUPPORTED.bits() & (1 << f.bit) != 0, f.accept, "{}", f.name);
        }
        assert_eq!(SUPPORTED, SIZE | MULTIPORT | EMERG_WRITE);
        assert!(!SUPPORTED.intersects(Features::BAD_FEATURE | Features::ANY_LAYOUT));
        assert_eq!(name(2), Some("EMERG_WRITE"));
        assert_eq!(name(3), None);
    }
}
