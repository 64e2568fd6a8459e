//! Balloon feature bits (virtio 1.2 §5.5.3): one table saying, for every bit, whether this
//! driver negotiates and implements it, or why it refuses it; and the queue numbering that
//! follows from the negotiated set.
//!
//! Generic ring/transport bits (INDIRECT_DESC, EVENT_IDX, VERSION_1, ACCESS_PLATFORM) are
//! accepted by the bus (`virtio_core::device::BUS_FEATURES`).

use virtio_core::Features;

pub use virtio_core::types::FeatureBit;

pub const MUST_TELL_HOST: Features = Features::bit(0);
pub const STATS_VQ: Features = Features::bit(1);
pub const DEFLATE_ON_OOM: Features = Features::bit(2);
pub const FREE_PAGE_HINT: Features = Features::bit(3);
pub const PAGE_POISON: Features = Features::bit(4);
pub const PAGE_REPORTING: Features = Features::bit(5);

/// Every balloon feature bit, negotiated or refused, with the reason.
pub const FEATURE_TABLE: [FeatureBit; 6] = [
    FeatureBit {
        bit: 0,
        name: "MUST_TELL_HOST",
        accept: true,
        note: "deflated pages go back to the platform only after the device used the \
               deflate buffer (the spec says SHOULD accept; a device may refuse FEATURES_OK \
               without it)",
    },
    FeatureBit {
        bit: 1,
        name: "STATS_VQ",
        accept: true,
        note: "memory statistics from `PagePool::stats`, refreshed whenever the device \
               returns the stats buffer",
    },
    FeatureBit {
        bit: 2,
        name: "DEFLATE_ON_OOM",
        accept: true,
        note: "`deflate_for_oom` takes pages back under memory pressure even when the \
               target says otherwise (refusable through `BalloonOptions::deflate_on_oom`)",
    },
    FeatureBit {
        bit: 3,
        name: "FREE_PAGE_HINT",
        accept: true,
        note: "cmd-id protocol: free ranges isolated by the platform are hinted and held \
               until the device says DONE (refusable through `BalloonOptions`)",
    },
    FeatureBit {
        bit: 4,
        name: "PAGE_POISON",
        accept: false,
        note: "Darwin does not fill freed pages with a poison value; §5.5.3.1: the driver \
               SHOULD clear it when it will not write poison_val to deflated pages",
    },
    FeatureBit {
        bit: 5,
        name: "PAGE_REPORTING",
        accept: true,
        note: "free ranges isolated by the platform are reported on reporting_vq and given \
               back once the device used the buffer; the driver expects no retained \
               contents, so PAGE_POISON is not needed (§5.5.3.1) (refusable through \
               `BalloonOptions`)",
    },
];

/// Everything the driver can ask for: the accepted bits of [`FEATURE_TABLE`].
pub const DRIVER_FEATURES: Features = Features::accepted(&FEATURE_TABLE);

/// Name of a balloon feature bit, for logs.
pub fn name(bit: u32) -> Option<&'static str> {
    FeatureBit::name_in(&FEATURE_TABLE, bit)
}

/// Queue indices for a negotiated feature set.
///
/// The spec lists inflateq 0, deflateq 1, statsq 2, free_page_vq 3, reporting_vq 4, each
/// optional one existing only with its feature. Linux and QEMU number the queues that exist
/// sequentially (QEMU creates inflate, deflate, stats, then free_page, then reporting; Linux
/// skips the absent ones when it assigns indices), so that is what this does: with
/// PAGE_REPORTING but not FREE_PAGE_HINT, reporting_vq is queue 3.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub inflate: u16,
    pub deflate: u16,
    pub stats: Option<u16>,
    pub free_page: Option<u16>,
    pub reporting: Option<u16>,
}

impl QueueLayout {
    pub fn for_features(features: Features) -> Self {
        let mut next = 2u16;
        let mut take = |present: bool| {
            present.then(|| {
                let q = next;
                next += 1;
                q
            })
        };
        let stats = take(features.contains(STATS_VQ));
        let free_page = take(features.contains(FREE_PAGE_HINT));
        let reporting = take(features.contains(PAGE_REPORTING));
        QueueLayout {
            inflate: 0,
            deflate: 1,
            stats,
            free_page,
            reporting,
        }
    }

    /// Number of queues.
    pub fn count(&self) -> u16 {
        2 + u16::from(self.stats.is_some())
            + u16::from(self.free_page.is_some())
            + u16::from(self.reporting.is_some())
    }

    /// Every queue index, in order.
    pub fn indices(&self) -> impl Iterator<Item = u16> + use<> {
        let all = [
            Some(self.inflate),
            Some(self.deflate),
            self.stats,
            self.free_page,
            self.reporting,
        ];
        all.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn table_is_consistent() {
        for f in FEATURE_TABLE {
            assert!(f.bit < 24);
            assert!(!f.note.is_empty());
            assert_eq!(
                DRIVER_FEATURES.bits() & (1 << f.bit) != 0,
                f.accept,
                "{}",
                f.name
            );
        }
        for accepted in [
            MUST_TELL_HOST,
            STATS_VQ,
            DEFLATE_ON_OOM,
            FREE_PAGE_HINT,
            PAGE_REPORTING,
        ] {
            assert!(DRIVER_FEATURES.contains(accepted));
        }
        assert!(!DRIVER_FEATURES.intersects(PAGE_POISON | Features::BAD_FEATURE));
        assert_eq!(name(5), Some("PAGE_REPORTING"));
        assert_eq!(name(6), None);
    }

    #[test]
    fn queue_numbering_for_every_feature_combination() {
        for bits in 0u64..64 {
            let f = Features::from_bits_retain(bits);
            let l = QueueLayout::for_features(f);
            let stats = bits & 2 != 0;
            let hint = bits & 8 != 0;
            let report = bits & 32 != 0;
            assert_eq!((l.inflate, l.deflate), (0, 1));
            let mut next = 2;
            let mut expect = |present: bool| {
                present.then(|| {
                    next += 1;
                    next - 1
                })
            };
            assert_eq!(l.stats, expect(stats), "{bits:#x}");
            assert_eq!(l.free_page, expect(hint), "{bits:#x}");
            assert_eq!(l.reporting, expect(report), "{bits:#x}");
            assert_eq!(l.count(), next, "{bits:#x}");
            let idx: Vec<u16> = l.indices().collect();
            assert_eq!(idx, (0..next).collect::<Vec<_>>(), "sequential, no holes");
        }
        // The QEMU defaults: stats always; the two optional queues follow.
        let l = QueueLayout::for_features(STATS_VQ | PAGE_REPORTING);
        assert_eq!(
            (l.stats, l.free_page, l.reporting),
            (Some(2), None, Some(3))
        );
        let l = QueueLayout::for_features(PAGE_REPORTING);
        assert_eq!((l.stats, l.reporting), (None, Some(2)));
    }
}
