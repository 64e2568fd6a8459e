//! A hostile device: random config space and random register values. The transport must
//! never panic, never loop forever, and never access a BAR outside what the capabilities it
//! accepted describe.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use proptest::prelude::*;
use virtio_core::platform::{BarAccess, PciConfigSpace};
use virtio_core::transport::{RingAddresses, Transport};
use virtio_core::{DeviceStatus, Error};
use virtio_pci::caps::find_virtio_capabilities;
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{SimBuilder, SimMode};

/// Config space from bytes; writes are ignored (a device that ignores everything).
struct RandomConfig([u8; 256]);

impl PciConfigSpace for RandomConfig {
    fn read8(&self, o: u16) -> u8 {
        self.0.get(usize::from(o)).copied().unwrap_or(0xFF)
    }
    fn read16(&self, o: u16) -> u16 {
        u16::from_le_bytes([self.read8(o), self.read8(o + 1)])
    }
    fn read32(&self, o: u16) -> u32 {
        u32::from(self.read16(o)) | (u32::from(self.read16(o + 2)) << 16)
    }
    fn write8(&self, _: u16, _: u8) {}
    fn write16(&self, _: u16, _: u16) {}
    fn write32(&self, _: u16, _: u32) {}
}

/// BARs of random lengths whose registers return pseudo-random values; records every
/// access that leaves the BAR (the transport must never make one).
struct RandomBars {
    lens: [Option<u64>; 6],
    seed: u64,
    counter: Cell<u64>,
    out_of_range: RefCell<Vec<(u8, u64, u8)>>,
}

impl RandomBars {
    fn check(&self, bar: u8, off: u64, width: u8) -> bool {
        let ok = self
            .lens
            .get(usize::from(bar))
            .copied()
            .flatten()
            .is_some_and(|l| off.checked_add(u64::from(width)).is_some_and(|e| e <= l));
        if !ok {
            self.out_of_range.borrow_mut().push((bar, off, width));
        }
        ok
    }
    fn next(&self) -> u64 {
        // splitmix64
        let c = self.counter.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.counter.set(c);
        let mut z = c ^ self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl BarAccess for RandomBars {
    fn bar_len(&self, bar: u8) -> Option<u64> {
        self.lens.get(usize::from(bar)).copied().flatten()
    }
    fn bar_is_io(&self, bar: u8) -> bool {
        bar == 0
    }
    fn read8(&self, bar: u8, off: u64) -> Option<u8> {
        self.check(bar, off, 1).then(|| self.next() as u8)
    }
    fn read16(&self, bar: u8, off: u64) -> Option<u16> {
        self.check(bar, off, 2).then(|| self.next() as u16)
    }
    fn read32(&self, bar: u8, off: u64) -> Option<u32> {
        self.check(bar, off, 4).then(|| self.next() as u32)
    }
    fn write8(&self, bar: u8, off: u64, _: u8) {
        self.check(bar, off, 1);
    }
    fn write16(&self, bar: u8, off: u64, _: u16) {
        self.check(bar, off, 2);
    }
    fn write32(&self, bar: u8, off: u64, _: u32) {
        self.check(bar, off, 4);
    }
}

/// Config space of the simulated QEMU-like function in each mode (modern, transitional).
fn qemu_config_spaces() -> &'static [[u8; 256]; 2] {
    static SPACES: OnceLock<[[u8; 256]; 2]> = OnceLock::new();
    SPACES.get_or_init(|| {
        [SimMode::Modern, SimMode::Transitional].map(|mode| {
            let s = SimBuilder::new(mode, 1)
                .memory(IdentityMemory::new(4096))
                .build();
            let mut c = [0u8; 256];
            c.copy_from_slice(&s.read_config_raw(0, 256));
            c
        })
    })
}

/// Random bytes with plausible virtio capabilities planted at random places.
fn planted_config() -> impl Strategy<Value = [u8; 256]> {
    (
        prop::collection::vec(any::<u8>(), 256),
        prop_oneof![0x1000u16..=0x103F, 0x1040u16..=0x107F, any::<u16>()],
        prop_oneof![1u16..=5, 1u16..=0x40],
        prop::collection::vec(
            (0x40u8..=0xFC, 0u8..=10, 0u8..=7, any::<u32>(), any::<u32>()),
            0..12,
        ),
    )
        .prop_map(|(bytes, device, sub, caps)| {
            let mut c = [0u8; 256];
            c.copy_from_slice(&bytes);
            c[0..2].copy_from_slice(&0x1AF4u16.to_le_bytes());
            c[2..4].copy_from_slice(&device.to_le_bytes());
            c[0x2E..0x30].copy_from_slice(&sub.to_le_bytes());
            c[6] |= 0x10;
            let mut prev = 0x34usize;
            for (at, ty, bar, off, len) in caps {
                let at = usize::from(at & 0xFC);
                if at + 20 > 256 {
                    continue;
                }
                c[prev + usize::from(prev != 0x34)] = at as u8;
                c[at] = 0x09;
                c[at + 2] = 20;
                c[at + 3] = ty;
                c[at + 4] = bar;
                c[at + 8..at + 12].copy_from_slice(&(off % 0x8000).to_le_bytes());
                c[at + 12..at + 16].copy_from_slice(&(len % 0x8000).to_le_bytes());
                prev = at;
            }
            c
        })
}

/// The QEMU layout with a few random byte changes (capability pointers, types, BARs,
/// offsets, lengths, IDs).
fn mutated_config() -> impl Strategy<Value = [u8; 256]> {
    (
        0usize..2,
        prop::collection::vec((0x00u8..=0xFF, any::<u8>()), 0..6),
    )
        .prop_map(|(mode, muts)| {
            let mut c = qemu_config_spaces()[mode];
            for (at, v) in muts {
                // Keep the vendor ID: a non-virtio function is refused before anything else.
                if at >= 2 {
                    c[usize::from(at)] = v;
                }
            }
            c
        })
}

fn config_strategy() -> impl Strategy<Value = [u8; 256]> {
    prop_oneof![planted_config(), mutated_config()]
}

fn bar_strategy() -> impl Strategy<Value = [Option<u64>; 6]> {
    let qemu = [Some(32u64), Some(0x1000), None, None, Some(0x4000), None];
    prop_oneof![
        2 => Just(qemu),
        1 => prop::array::uniform6(prop_oneof![Just(None), Just(Some(0x4000u64)), (0u64..0x10000).prop_map(Some)]),
    ]
}

fn exercise(t: &mut PciTransport<RandomConfig, RandomBars>, args: &[u32]) {
    let a = |i: usize| args.get(i).copied().unwrap_or(0);
    let _ = t.device_type();
    let _ = t.status();
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    let f = t.device_features();
    t.set_driver_features(f);
    let _ = t.config_generation();
    let len = t.config_len();
    for off in [0, a(0), len.saturating_sub(1), len, a(1) % (len + 8)] {
        let _ = t.read_config8(off);
        let _ = t.read_config16(off & !1);
        let _ = t.read_config32(off & !3);
        let _ = t.write_config8(off, 1);
        let _ = t.write_config16(off & !1, 1);
        let _ = t.write_config32(off & !3, 1);
    }
    t.set_msix_enabled(a(2) & 1 != 0);
    let _ = t.set_config_vector(a(3) as u16);
    let n = t.num_queues().min(8);
    for q in (0..n).chain([a(4) as u16, u16::MAX]) {
        let size = t.max_queue_size(q);
        let base = u64::from(a(5)) << 12;
        let addrs = RingAddresses {
            desc: base,
            driver: base + 16 * u64::from(size),
            device: base + 0x10000,
        };
        let _ = t.setup_queue(q, size, addrs, a(6) as u16);
        t.notify(q);
        t.teardown_queue(q);
    }
    let _ = t.read_isr();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_devices_never_panic_or_escape_their_bars(
        cfg in config_strategy(),
        lens in bar_strategy(),
        seed in any::<u64>(),
        args in prop::collection::vec(any::<u32>(), 8),
        pref in prop_oneof![Just(Preference::Auto), Just(Preference::Modern), Just(Preference::Legacy)],
    ) {
        let config = RandomConfig(cfg);
        let bars = RandomBars { lens, seed, counter: Cell::new(0), out_of_range: RefCell::new(Vec::new()) };
        let caps = find_virtio_capabilities(&config, &bars);
        for r in [caps.common, caps.isr, caps.device].into_iter().flatten().chain(caps.notify.map(|n| n.region)) {
            let len = lens[usize::from(r.bar)].unwrap();
            prop_assert!(u64::from(r.offset) + u64::from(r.length) <= len);
        }
        if let Ok(mut t) = probe(config, bars, pref) {
            exercise(&mut t, &args);
            let escaped = t.bars().out_of_range.borrow().clone();
            prop_assert!(escaped.is_empty(), "accesses outside BARs: {:?}", escaped);
        }
    }
}

#[test]
fn reset_of_a_dead_device_times_out() {
    // Modern layout whose BAR reads all fail (surprise removal): status reads as 0xFF.
    let s = SimBuilder::new(SimMode::Modern, 2).build();
    let mut cfg = [0u8; 256];
    for (i, b) in cfg.iter_mut().enumerate() {
        *b = s.config_space().read8(i as u16);
    }
    let mut lens = [None; 6];
    lens[4] = Some(0x4000);
    let dead = RandomBars {
        lens,
        seed: 0,
        counter: Cell::new(0),
        out_of_range: RefCell::new(Vec::new()),
    };
    struct Dead(RandomBars);
    impl BarAccess for Dead {
        fn bar_len(&self, bar: u8) -> Option<u64> {
            self.0.bar_len(bar)
        }
        fn bar_is_io(&self, _: u8) -> bool {
            false
        }
        fn read8(&self, _: u8, _: u64) -> Option<u8> {
            None
        }
        fn read16(&self, _: u8, _: u64) -> Option<u16> {
            None
        }
        fn read32(&self, _: u8, _: u64) -> Option<u32> {
            None
        }
        fn write8(&self, _: u8, _: u64, _: u8) {}
        fn write16(&self, _: u8, _: u64, _: u16) {}
        fn write32(&self, _: u8, _: u64, _: u32) {}
    }
    let mut t = probe(RandomConfig(cfg), Dead(dead), Preference::Modern).unwrap();
    assert_eq!(t.reset(), Err(Error::ResetTimeout));
    assert_eq!(t.status().bits(), 0xFF);
    assert_eq!(
        t.read_config8(0),
        Err(Error::ConfigOutOfRange { offset: 0, len: 1 })
    );
    assert_eq!(t.read_isr().0, 0);
}

#[test]
fn huge_num_queues_and_notify_off_are_bounded() {
    // A device claiming 65535 queues: setup beyond the transport's table is refused cleanly.
    let s = SimBuilder::new(SimMode::Modern, 1).build();
    let mut t = probe(s.config_space(), s.bars(), Preference::Modern).unwrap();
    let addrs = RingAddresses {
        desc: 0x1000,
        driver: 0x2000,
        device: 0x3000,
    };
    assert_eq!(
        t.setup_queue(2000, 64, addrs, 0xFFFF),
        Err(Error::NoSuchQueue { queue: 2000 })
    );
}

#[test]
fn random_devices_reach_both_transports() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut modern, mut legacy, mut refused) = (0, 0, 0);
    for _ in 0..3000 {
        let cfg = config_strategy().new_tree(&mut runner).unwrap().current();
        let lens = bar_strategy().new_tree(&mut runner).unwrap().current();
        let bars = RandomBars {
            lens,
            seed: 1,
            counter: Cell::new(0),
            out_of_range: RefCell::new(Vec::new()),
        };
        match probe(RandomConfig(cfg), bars, Preference::Auto) {
            Ok(PciTransport::Modern(_)) => modern += 1,
            Ok(PciTransport::Legacy(_)) => legacy += 1,
            Err(_) => refused += 1,
        }
    }
    eprintln!("modern {modern} legacy {legacy} refused {refused}");
    assert!(modern > 0 && legacy > 0 && refused > 0);
}

/// Issue 14 (found by the `pci` fuzz target): with MSI-X enabled the legacy interface has
/// its two vector registers at 20..24 (device config moves to 24), and a BAR0 of 20 to 23
/// bytes (enough for the registers without MSI-X) made the transport write and read them
/// past the end of the BAR, on real hardware another device's I/O ports. Such a BAR0 now
/// keeps MSI-X off for the transport: vectors are refused (the bus falls back to INTx).
#[test]
fn legacy_bar0_too_short_for_the_msix_registers_is_never_overrun() {
    let cfg = qemu_config_spaces()[1];
    for len in 20..24 {
        let mut lens = [None; 6];
        lens[0] = Some(len);
        lens[1] = Some(0x1000);
        lens[4] = Some(0x4000);
        let bars = RandomBars {
            lens,
            seed: len,
            counter: Cell::new(0),
            out_of_range: RefCell::new(Vec::new()),
        };
        let mut t = probe(RandomConfig(cfg), bars, Preference::Legacy).unwrap();
        t.set_msix_enabled(true);
        assert_eq!(
            t.set_config_vector(0),
            Err(Error::VectorRejected { queue: None }),
            "BAR0 of {len} bytes"
        );
        assert_eq!(t.set_config_vector(0xFFFF), Ok(()));
        t.teardown_queue(0);
        let _ = t.read_config8(0);
        let escaped = t.bars().out_of_range.borrow().clone();
        assert!(escaped.is_empty(), "BAR0 of {len} bytes: {escaped:?}");
    }
}
