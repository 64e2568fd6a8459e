//! The legacy (virtio 0.9.5) transport against the simulated function (legacy-only and
//! transitional functions driven through BAR0).

use virtio_core::platform::{Dma, InterruptPlatform};
use virtio_core::transport::{NO_VECTOR, RingAddresses, Transport};
use virtio_core::{DeviceStatus, Error, RingLayoutKind};
use virtio_pci::legacy::{legacy_ring_bytes, legacy_ring_layout};
use virtio_pci::{PciTransport, Preference, TransportKind, probe};
use virtio_tests::sim::{
    Sim, SimBars, SimBuilder, SimConfig, SimEvent, SimInterrupt, SimMode, TestRing,
};

const MAC: [u8; 8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x01, 0x00];
const OFFERED: u64 = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 27) | (1 << 5) | 1;

fn sim_with(mode: SimMode) -> Sim {
    SimBuilder::new(mode, 1)
        .features(OFFERED)
        .queues(&[256, 256, 64])
        .device_config(&MAC)
        .build()
}

fn legacy(s: &Sim) -> PciTransport<SimConfig, SimBars> {
    let t = probe(s.config_space(), s.bars(), Preference::Legacy).expect("legacy probe");
    assert_eq!(t.kind(), TransportKind::Legacy);
    assert_eq!(t.ring_layout(), RingLayoutKind::Legacy);
    assert!(!t.queue_size_settable());
    t
}

fn init(t: &mut PciTransport<SimConfig, SimBars>, features: u64) {
    t.reset().unwrap();
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = t.device_features();
    t.set_driver_features(features & offered);
}

const MODES: [SimMode; 2] = [SimMode::Legacy, SimMode::Transitional];

#[test]
fn only_32_feature_bits() {
    for mode in MODES {
        let s = sim_with(mode);
        let mut t = legacy(&s);
        assert_eq!(t.device_features(), OFFERED & 0xFFFF_FFFF);
        // High bits passed by mistake are not written (and never reach the device).
        t.set_driver_features((1 << 32) | (1 << 5) | 1);
        assert_eq!(s.driver_features(), (1 << 5) | 1);
        assert!(s.events().contains(&SimEvent::DriverFeatures {
            select: 0,
            value: 0x21
        }));
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    }
}

#[test]
fn status_and_reset() {
    for mode in MODES {
        let s = sim_with(mode);
        let mut t = legacy(&s);
        init(&mut t, OFFERED);
        assert_eq!(t.status(), DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let st = t.status();
        t.set_status(st | DeviceStatus::DRIVER_OK);
        assert_eq!(s.status(), 0b111);
        assert_eq!(t.config_generation(), 0);
        t.reset().unwrap();
        assert_eq!(s.status(), 0);
        s.check_init_order().unwrap_err(); // reset was the last thing
    }
}

#[test]
fn device_config_at_20_without_msix_and_24_with() {
    for mode in MODES {
        let s = sim_with(mode);
        let mut t = legacy(&s);
        // BAR0 is 32 bytes (24 + 8 rounded up): 12 config bytes visible at 20, 8 at 24.
        assert_eq!(t.config_len(), 12);
        assert_eq!(t.read_config8(0).unwrap(), 0x52);
        assert_eq!(t.read_config32(0).unwrap(), 0x1200_5452);
        assert_eq!(t.read_config16(6).unwrap(), 1, "link status up");

        // MSI-X enabled by the platform: the device moves its config to 24.
        let mut irq = s.irq();
        assert!(irq.enable_msix(4));
        t.set_msix_enabled(true);
        assert_eq!(t.config_len(), 8);
        assert_eq!(t.read_config8(0).unwrap(), 0x52);
        assert_eq!(t.read_config16(6).unwrap(), 1, "link status up");
        assert_eq!(
            t.read_config16(8),
            Err(Error::ConfigOutOfRange { offset: 8, len: 2 })
        );

        // The historical bug: MSI-X on in the device but the driver reading at 20 sees the
        // vector registers, i.e. garbage "status" (the "cable unplugged" symptom).
        t.set_msix_enabled(false);
        assert_eq!(
            t.read_config16(0).unwrap(),
            0xFFFF,
            "config vector (NO_VECTOR), not the MAC"
        );
        assert_eq!(
            t.read_config16(6).unwrap(),
            0x1200,
            "\"status\" is MAC bytes 2..4: LINK_UP clear"
        );
        t.set_msix_enabled(true);

        // MSI-X off again: back at 20.
        irq.disable();
        t.set_msix_enabled(false);
        assert_eq!(t.read_config8(0).unwrap(), 0x52);
        assert_eq!(t.read_config16(6).unwrap(), 1);

        // Writes land in device config, at the right offset.
        t.write_config8(5, 0x99).unwrap();
        assert_eq!(s.device_config()[5], 0x99);
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    }
}

#[test]
fn queue_setup_uses_pfn_and_legacy_layout() {
    for mode in MODES {
        let s = sim_with(mode);
        let mem = s.memory();
        let mut t = legacy(&s);
        init(&mut t, OFFERED);
        assert_eq!(t.num_queues(), 3);
        assert_eq!(t.max_queue_size(0), 256);
        assert_eq!(t.max_queue_size(2), 64);
        assert_eq!(t.max_queue_size(3), 0);

        let ring = TestRing::new(&mem, 256, true);
        assert_eq!(
            legacy_ring_layout(ring.desc, 256),
            Some((ring.driver, ring.device))
        );
        // Size must be the device's.
        assert_eq!(
            t.setup_queue(0, 128, ring.addrs(), NO_VECTOR),
            Err(Error::BadQueueSize {
                queue: 0,
                size: 128
            })
        );
        // Not 4096-aligned / not the single-area layout.
        let mut bad = ring.addrs();
        bad.desc += 16;
        bad.driver += 16;
        bad.device += 16;
        assert_eq!(
            t.setup_queue(0, 256, bad, NO_VECTOR),
            Err(Error::Unsupported)
        );
        let split = RingAddresses {
            desc: ring.desc,
            driver: ring.driver + 4096,
            device: ring.device + 4096,
        };
        assert_eq!(
            t.setup_queue(0, 256, split, NO_VECTOR),
            Err(Error::Unsupported)
        );
        assert_eq!(
            t.setup_queue(5, 256, ring.addrs(), NO_VECTOR),
            Err(Error::NoSuchQueue { queue: 5 })
        );

        t.setup_queue(0, 256, ring.addrs(), NO_VECTOR).unwrap();
        assert!(s.events().contains(&SimEvent::LegacyPfn {
            queue: 0,
            pfn: (ring.desc >> 12) as u32
        }));
        let info = s.queue_info(0).unwrap();
        assert!(info.enabled && info.ready);
        assert!(info.event_idx, "EVENT_IDX (bit 29) negotiated");
        assert_eq!(
            info.device_side,
            Some((ring.desc, ring.driver, ring.device))
        );
        // Already active.
        assert_eq!(
            t.setup_queue(0, 256, ring.addrs(), NO_VECTOR),
            Err(Error::InvalidState)
        );

        // Teardown writes PFN 0 (which QEMU, and so the model, takes as a device reset) and
        // the queue can be set up again.
        t.teardown_queue(0);
        let ev = s.events();
        assert_eq!(
            ev[ev.len() - 2..],
            [SimEvent::LegacyPfn { queue: 0, pfn: 0 }, SimEvent::Reset]
        );
        assert!(!s.queue_info(0).unwrap().enabled);
        assert_eq!(s.status(), 0);
        init(&mut t, OFFERED);
        t.setup_queue(0, 256, ring.addrs(), NO_VECTOR).unwrap();
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    }
}

#[test]
fn legacy_ring_sizes_are_exact() {
    // Used ring = 6 + 8·N after the 4096-aligned avail ring (the N ≥ 512 under-allocation bug).
    for n in [1u16, 64, 128, 256, 512, 1024, 4096, 32768] {
        let (driver, device) = legacy_ring_layout(0, n).unwrap();
        assert_eq!(driver, 16 * u64::from(n));
        assert_eq!(device % 4096, 0);
        assert!(device >= driver + 6 + 2 * u64::from(n));
        assert_eq!(legacy_ring_bytes(n), device + 6 + 8 * u64::from(n));
    }
}

#[test]
fn vectors_need_msix() {
    for mode in MODES {
        let s = sim_with(mode);
        let mem = s.memory();
        let mut t = legacy(&s);
        init(&mut t, 0);
        let ring = TestRing::new(&mem, 256, true);
        // MSI-X off: no vector registers exist.
        assert_eq!(
            t.setup_queue(0, 256, ring.addrs(), 0),
            Err(Error::VectorRejected { queue: Some(0) })
        );
        assert_eq!(
            t.set_config_vector(0),
            Err(Error::VectorRejected { queue: None })
        );
        t.set_config_vector(NO_VECTOR).unwrap();

        assert!(s.irq().enable_msix(4));
        t.set_msix_enabled(true);
        s.reject_vector(2);
        assert_eq!(
            t.setup_queue(0, 256, ring.addrs(), 2),
            Err(Error::VectorRejected { queue: Some(0) })
        );
        assert!(!s.queue_info(0).unwrap().enabled);
        t.setup_queue(0, 256, ring.addrs(), 1).unwrap();
        assert_eq!(s.queue_info(0).unwrap().vector, 1);
        assert_eq!(
            t.set_config_vector(2),
            Err(Error::VectorRejected { queue: None })
        );
        t.set_config_vector(0).unwrap();
        assert_eq!(s.config_vector(), 0);
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    }
}

#[test]
fn notify_isr_and_interrupts() {
    for mode in MODES {
        for msix in [false, true] {
            let s = sim_with(mode);
            let mem = s.memory();
            let mut t = legacy(&s);
            let mut irq = s.irq();
            if msix {
                assert!(irq.enable_msix(4));
            } else {
                assert!(irq.enable_intx());
            }
            t.set_msix_enabled(msix);
            init(&mut t, 0); // no EVENT_IDX
            let vector = if msix { 2 } else { NO_VECTOR };
            if msix {
                t.set_config_vector(0).unwrap();
            }
            let mut rings = Vec::new();
            for q in 0..3u16 {
                let n = t.max_queue_size(q);
                let r = TestRing::new(&mem, n, true);
                t.setup_queue(q, n, r.addrs(), vector).unwrap();
                rings.push(r);
            }
            let st = t.status();
            t.set_status(st | DeviceStatus::DRIVER_OK);

            let buf = mem.alloc_coherent(32, 16).unwrap();
            let head = rings[1].post(&[], &[(buf.daddr, 32)]);
            t.notify(1);
            assert_eq!((s.kicks(0), s.kicks(1), s.kicks(2)), (0, 1, 0));
            let served = s.serve(1, |c| s.write_chain(c, &[7; 10]));
            assert_eq!(served, 1);
            assert_eq!(rings[1].take_used(), vec![(u32::from(head), 10)]);
            assert_eq!(mem.slice(&buf)[..10], [7; 10]);

            s.set_device_config(6, &[0, 0]);
            if msix {
                assert_eq!(
                    s.take_interrupts(),
                    vec![SimInterrupt::Msix(2), SimInterrupt::Msix(0)]
                );
            } else {
                assert_eq!(
                    s.take_interrupts(),
                    vec![SimInterrupt::Intx, SimInterrupt::Intx]
                );
            }
            let isr = t.read_isr();
            assert!(isr.queue() && isr.config_changed());
            assert_eq!(t.read_isr().0, 0, "ISR cleared by the read");
            assert_eq!(
                t.read_config16(6).unwrap(),
                0,
                "link down after the config change"
            );
            s.check_init_order().unwrap();
            assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
        }
    }
}
