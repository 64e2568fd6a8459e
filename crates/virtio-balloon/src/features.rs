//! Balloon feature bits (virtio 1.2 §5.5.3): one table saying, for every bit, whether this
//! driver negotiates and implements it, or why it refuses it; and the queue numbering that
//! follows from the offered and the negotiated sets.
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

/// Queue indices: numbered over the features the device *offers*, present for the
/// features *negotiated*.
///
/// The spec lists inflateq 0, deflateq 1, statsq 2, free_page_vq 3, reporting_vq 4, each
/// optional one existing only with its feature (virtio 1.2 §5.5.2). QEMU creates its
/// queues from what it offers (`virtio_balloon_device_realize`: inflate, deflate, stats,
/// then free_page with FREE_PAGE_HINT offered, then reporting with PAGE_REPORTING offered)
/// and numbers them sequentially; Linux skips the absent ones when it assigns indices, and
/// accepts every one of these features it is offered, so for Linux offered and negotiated
/// coincide. A driver that declines an offered feature must still skip that feature's
/// index: with FREE_PAGE_HINT and PAGE_REPORTING offered and only reporting accepted,
/// reporting_vq is queue 4 (as the spec's table has it), not 3, which is QEMU's free page
/// queue. With PAGE_REPORTING but not FREE_PAGE_HINT offered, reporting_vq is queue 3.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub inflate: u16,
    pub deflate: u16,
    pub stats: Option<u16>,
    pub free_page: Option<u16>,
    pub reporting: Option<u16>,
}

impl QueueLayout {
    /// The layout when the driver negotiates everything the device offers.
    pub fn for_features(features: Features) -> Self {
        Self::new(features, features)
    }

    /// The layout of a device that offered `offered` with `negotiated` accepted: a queue
    /// takes its index among the offered features' queues and is present only when its
    /// feature was negotiated. (A negotiated bit is always offered; one that was not is
    /// numbered as if it were, so a present queue always has an index.)
    pub fn new(offered: Features, negotiated: Features) -> Self {
        let numbered = offered | negotiated;
        let mut next = 2u16;
        let mut take = |feature: Features| {
            if !numbered.contains(feature) {
                return None;
            }
            let q = next;
            next += 1;
            negotiated.contains(feature).then_some(q)
        };
        let stats = take(STATS_VQ);
        let free_page = take(FREE_PAGE_HINT);
        let reporting = take(PAGE_REPORTING);
        QueueLayout {
            inflate: 0,
            deflate: 1,
            stats,
            free_page,
            reporting,
        }
    }

    /// Number of queues in use (present).
    pub fn count(&self) -> u16 {
        2 + u16::from(self.stats.is_some())
            + u16::from(self.free_page.is_some())
            + u16::from(self.reporting.is_some())
    }

    /// Every index of a queue in use, in order.
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

    #[test]
    fn a_declined_offer_keeps_its_index() {
        // QEMU `free-page-hint=on,free-page-reporting=on`: queues 0..=4 exist on the device
        // whatever the driver accepts; declining hinting leaves queue 3 unused.
        let offered = STATS_VQ | FREE_PAGE_HINT | PAGE_REPORTING;
        let l = QueueLayout::new(offered, STATS_VQ | PAGE_REPORTING);
        assert_eq!(
            (l.stats, l.free_page, l.reporting),
            (Some(2), None, Some(4))
        );
        assert_eq!(l.count(), 4);
        assert_eq!(l.indices().collect::<Vec<_>>(), [0, 1, 2, 4]);
        // Declining statistics moves nothing either.
        let l = QueueLayout::new(offered, PAGE_REPORTING);
        assert_eq!((l.stats, l.free_page, l.reporting), (None, None, Some(4)));
        // Every offered set and every accepted subset of it: an index is the one the
        // fully negotiated layout gives, present exactly when negotiated.
        for bits in 0u64..64 {
            let offered = Features::from_bits_retain(bits);
            let full = QueueLayout::for_features(offered);
            for accepted in 0u64..64 {
                let negotiated = Features::from_bits_retain(bits & accepted);
                let l = QueueLayout::new(offered, negotiated);
                let keep = |f: Features, q: Option<u16>| q.filter(|_| negotiated.contains(f));
                assert_eq!(
                    l.stats,
                    keep(STATS_VQ, full.stats),
                    "{bits:#x}/{accepted:#x}"
                );
                assert_eq!(l.free_page, keep(FREE_PAGE_HINT, full.free_page));
                assert_eq!(l.reporting, keep(PAGE_REPORTING, full.reporting));
            }
        }
    }
}
