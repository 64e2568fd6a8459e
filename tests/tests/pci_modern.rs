//! The modern transport against the simulated function (modern-only and transitional).

use virtio_core::platform::{Dma, InterruptPlatform};
use virtio_core::transport::{NO_VECTOR, RingAddresses, Transport};
use virtio_core::{DeviceStatus, Error, Features, TransportError};
use virtio_pci::{PciTransport, Preference, TransportKind, probe};
use virtio_tests::sim::{
    LifecycleStep, Sim, SimBars, SimBuilder, SimConfig, SimEvent, SimInterrupt, SimMode, TestRing,
    layout,
};

const MAC: [u8; 8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x01, 0x00];
const OFFERED: u64 = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 5) | (1 << 0) | (1 << 40);

fn sim_with(mode: SimMode) -> Sim {
    SimBuilder::new(mode, 1)
        .features(OFFERED)
        .queues(&[256, 128, 64])
        .device_config(&MAC)
        .build()
}

fn modern(s: &Sim) -> PciTransport<SimConfig, SimBars> {
    let t = probe(s.config_space(), s.bars(), Preference::Modern).expect("modern probe");
    assert_eq!(t.kind(), TransportKind::Modern);
    t
}

/// Reset → ACK → DRIVER → features → FEATURES_OK, as the lifecycle code does.
fn negotiate(t: &mut PciTransport<SimConfig, SimBars>, features: u64) {
    t.reset().unwrap();
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = t.device_features();
    t.set_driver_features(features & offered);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert!(t.status().contains(DeviceStatus::FEATURES_OK));
}

fn driver_ok(t: &mut PciTransport<SimConfig, SimBars>) {
    let s = t.status();
    t.set_status(s | DeviceStatus::DRIVER_OK);
}

#[test]
fn features_are_64_bit() {
    for mode in [SimMode::Modern, SimMode::Transitional] {
        let s = sim_with(mode);
        let mut t = modern(&s);
        assert_eq!(t.device_features(), OFFERED);
        t.set_driver_features(OFFERED & !(1 << 28));
        assert_eq!(s.driver_features(), OFFERED & !(1 << 28));
        let words: Vec<_> = s
            .events()
            .into_iter()
            .filter_map(|e| match e {
                SimEvent::DriverFeatures { select, value } => Some((select, value)),
                _ => None,
            })
            .collect();
        assert_eq!(words, vec![(0, (1 << 29) | 0x21), (1, 0x101)]);
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    }
}

#[test]
fn status_reset_and_features_ok() {
    let s = sim_with(SimMode::Modern);
    let mut t = modern(&s);
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    assert_eq!(s.status(), 1);
    assert_eq!(t.status(), DeviceStatus::ACKNOWLEDGE);
    negotiate(&mut t, OFFERED);
    assert_eq!(s.status(), 0b1011);
    t.reset().unwrap();
    assert_eq!(s.status(), 0);
    assert_eq!(s.driver_features(), 0);

    // A device that refuses FEATURES_OK: the bit does not stick.
    let s = SimBuilder::new(SimMode::Modern, 2)
        .accept_features_ok(false)
        .build();
    let mut t = modern(&s);
    t.reset().unwrap();
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.set_driver_features(1 << 32);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert!(!t.status().contains(DeviceStatus::FEATURES_OK));

    // Features not offered are refused by the device too.
    let s = SimBuilder::new(SimMode::Modern, 2)
        .features(1 << 32)
        .build();
    let mut t = modern(&s);
    t.set_driver_features((1 << 32) | (1 << 30));
    t.set_status(DeviceStatus::FEATURES_OK);
    assert!(!t.status().contains(DeviceStatus::FEATURES_OK));

    // DEVICE_NEEDS_RESET shows in the status and comes with a config interrupt.
    let s = sim_with(SimMode::Modern);
    let mut t = modern(&s);
    let mut irq = s.irq();
    assert!(irq.enable_msix(4));
    negotiate(&mut t, OFFERED);
    t.set_config_vector(0).unwrap();
    s.trigger_needs_reset();
    assert!(t.status().contains(DeviceStatus::DEVICE_NEEDS_RESET));
    assert_eq!(s.take_interrupts(), vec![SimInterrupt::Msix(0)]);
    t.reset().unwrap();
    assert_eq!(t.status(), DeviceStatus::empty());
}

#[test]
fn config_reads_writes_and_bounds() {
    let s = sim_with(SimMode::Transitional);
    let mut t = modern(&s);
    assert_eq!(t.config_len(), 0x1000);
    assert_eq!(t.read_config8(0).unwrap(), 0x52);
    assert_eq!(t.read_config16(6).unwrap(), 1);
    assert_eq!(t.read_config32(0).unwrap(), 0x1200_5452);
    assert_eq!(t.read_config8(0xFFF).unwrap(), 0);
    assert_eq!(
        t.read_config8(0x1000),
        Err(Error::ConfigOutOfRange {
            offset: 0x1000,
            len: 1
        })
    );
    assert_eq!(
        t.read_config32(0xFFE),
        Err(Error::ConfigOutOfRange {
            offset: 0xFFE,
            len: 4
        })
    );
    assert_eq!(
        t.read_config16(1),
        Err(Error::ConfigOutOfRange { offset: 1, len: 2 })
    );
    assert_eq!(
        t.read_config32(u32::MAX - 3),
        Err(Error::ConfigOutOfRange {
            offset: u32::MAX - 3,
            len: 4
        })
    );
    t.write_config8(7, 9).unwrap();
    t.write_config16(0, 0xABCD).unwrap();
    assert_eq!(
        &s.device_config()[..8],
        &[0xCD, 0xAB, 0, 0x12, 0x34, 0x56, 1, 9]
    );
    assert!(t.write_config32(0x1000, 1).is_err());

    // Device-side change: generation moves, config interrupt on the config vector / ISR.
    let g = t.config_generation();
    let mut irq = s.irq();
    assert!(irq.enable_msix(4));
    t.set_msix_enabled(true);
    t.set_config_vector(3).unwrap();
    s.set_device_config(6, &[0, 0]);
    assert_eq!(t.config_generation(), g + 1);
    assert_eq!(t.read_config16(6).unwrap(), 0);
    assert_eq!(s.take_interrupts(), vec![SimInterrupt::Msix(3)]);
    let isr = t.read_isr();
    assert!(isr.config_changed() && !isr.queue());
    assert_eq!(t.read_isr().0, 0, "ISR is cleared by reading");
    assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
}

#[test]
fn queue_setup_reaches_device_side_queue() {
    let s = sim_with(SimMode::Modern);
    let mem = s.memory();
    let mut t = modern(&s);
    assert!(s.irq().enable_msix(4));
    t.set_msix_enabled(true);
    negotiate(&mut t, OFFERED & !(1 << 40));
    assert_eq!(t.num_queues(), 3);
    assert_eq!(t.max_queue_size(0), 256);
    assert_eq!(t.max_queue_size(1), 128);
    assert_eq!(t.max_queue_size(3), 0);
    assert!(t.queue_size_settable());

    let ring = TestRing::new(&mem, 64, false);
    t.setup_queue(1, 64, ring.addrs(), 2).unwrap();
    let info = s.queue_info(1).unwrap();
    assert_eq!((info.size, info.vector, info.enabled), (64, 2, true));
    assert_eq!(
        (info.desc, info.driver, info.device),
        (ring.desc, ring.driver, ring.device)
    );
    assert!(info.ready);
    assert!(info.event_idx, "EVENT_IDX was negotiated");
    assert_eq!(
        info.device_side,
        Some((ring.desc, ring.driver, ring.device))
    );
    // High address halves arrive too.
    let s2 = sim_with(SimMode::Modern);
    let mut t2 = modern(&s2);
    negotiate(&mut t2, 1 << 32);
    let far = RingAddresses {
        desc: 0x1_2345_6000,
        driver: 0x2_0000_1000,
        device: 0x3_0000_2000,
    };
    t2.setup_queue(0, 256, far, NO_VECTOR).unwrap();
    let info = s2.queue_info(0).unwrap();
    assert_eq!(
        (info.desc, info.driver, info.device),
        (far.desc, far.driver, far.device)
    );
    assert!(!info.event_idx);

    // Re-setup of an enabled queue is refused; the device has not changed.
    assert_eq!(
        t.setup_queue(1, 64, ring.addrs(), 2),
        Err(Error::InvalidState)
    );
    assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    assert!(s.check_init_order().is_err(), "no DRIVER_OK yet");
    driver_ok(&mut t);
    s.check_init_order().unwrap();
    let steps = s.lifecycle();
    assert_eq!(steps.last(), Some(&LifecycleStep::DriverOk));
    assert!(steps.contains(&LifecycleStep::QueueEnabled(1)));
}

#[test]
fn bad_queue_parameters() {
    let s = sim_with(SimMode::Modern);
    let mem = s.memory();
    let mut t = modern(&s);
    negotiate(&mut t, 1 << 32);
    let ring = TestRing::new(&mem, 256, false);
    let a = ring.addrs();
    assert_eq!(
        t.setup_queue(0, 0, a, NO_VECTOR),
        Err(Error::BadQueueSize { queue: 0, size: 0 })
    );
    assert_eq!(
        t.setup_queue(0, 100, a, NO_VECTOR),
        Err(Error::BadQueueSize {
            queue: 0,
            size: 100
        })
    );
    assert_eq!(
        t.setup_queue(2, 128, a, NO_VECTOR),
        Err(Error::BadQueueSize {
            queue: 2,
            size: 128
        })
    );
    assert_eq!(
        t.setup_queue(3, 64, a, NO_VECTOR),
        Err(Error::NoSuchQueue { queue: 3 })
    );
    assert_eq!(
        t.setup_queue(u16::MAX, 64, a, NO_VECTOR),
        Err(Error::NoSuchQueue { queue: u16::MAX })
    );
    assert!(s.queue_info(0).is_some_and(|q| !q.enabled));
}

#[test]
fn notify_offset_validated_against_notify_region() {
    let s = sim_with(SimMode::Modern);
    // Shrink the notify region to 6 bytes: queues 0 (offset 0) and 1 (offset 4) fit, 2 does not.
    s.write_config_raw(usize::from(layout::CAP_NOTIFY) + 12, &6u32.to_le_bytes());
    let mem = s.memory();
    let mut t = modern(&s);
    negotiate(&mut t, 1 << 32);
    let r1 = TestRing::new(&mem, 128, false);
    let r2 = TestRing::new(&mem, 64, false);
    t.setup_queue(1, 128, r1.addrs(), NO_VECTOR).unwrap();
    assert_eq!(
        t.setup_queue(2, 64, r2.addrs(), NO_VECTOR),
        Err(Error::Transport(TransportError::CapabilityOutOfBar {
            cfg_type: 2
        }))
    );
    assert!(!s.queue_info(2).unwrap().enabled);
}

#[test]
fn notify_reaches_the_right_queue() {
    for mode in [SimMode::Modern, SimMode::Transitional] {
        let s = sim_with(mode);
        let mem = s.memory();
        let mut t = modern(&s);
        negotiate(&mut t, 1 << 32);
        let rings: Vec<_> = [256u16, 128, 64]
            .iter()
            .map(|&n| TestRing::new(&mem, n, false))
            .collect();
        for (i, r) in rings.iter().enumerate() {
            t.setup_queue(i as u16, r.size, r.addrs(), NO_VECTOR)
                .unwrap();
        }
        driver_ok(&mut t);
        t.notify(2);
        t.notify(2);
        t.notify(0);
        assert_eq!((s.kicks(0), s.kicks(1), s.kicks(2)), (1, 0, 2));
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
        // After a reset the queues are gone: notifications are dropped by the transport.
        t.reset().unwrap();
        t.notify(1);
        assert_eq!(s.kicks(1), 0);
    }
}

#[test]
fn msix_vector_read_back_failure() {
    let s = sim_with(SimMode::Modern);
    let mem = s.memory();
    let mut t = modern(&s);
    assert!(s.irq().enable_msix(4));
    t.set_msix_enabled(true);
    negotiate(&mut t, 1 << 32);
    s.reject_vector(1);
    let ring = TestRing::new(&mem, 256, false);
    assert_eq!(
        t.setup_queue(0, 256, ring.addrs(), 1),
        Err(Error::VectorRejected { queue: Some(0) })
    );
    assert!(
        !s.queue_info(0).unwrap().enabled,
        "queue must not be enabled after a rejected vector"
    );
    // Beyond the MSI-X table (4 entries).
    assert_eq!(
        t.setup_queue(0, 256, ring.addrs(), 4),
        Err(Error::VectorRejected { queue: Some(0) })
    );
    t.setup_queue(0, 256, ring.addrs(), 2).unwrap();
    assert_eq!(s.queue_info(0).unwrap().vector, 2);

    assert_eq!(
        t.set_config_vector(1),
        Err(Error::VectorRejected { queue: None })
    );
    assert_eq!(
        t.set_config_vector(9),
        Err(Error::VectorRejected { queue: None })
    );
    t.set_config_vector(0).unwrap();
    assert_eq!(s.config_vector(), 0);
    t.set_config_vector(NO_VECTOR).unwrap();
    assert_eq!(s.config_vector(), NO_VECTOR);
    // NO_VECTOR for a queue is always accepted.
    let r1 = TestRing::new(&mem, 128, false);
    t.setup_queue(1, 128, r1.addrs(), NO_VECTOR).unwrap();
}

#[test]
fn ring_round_trip_with_msix_and_intx() {
    for msix in [true, false] {
        let s = sim_with(SimMode::Transitional);
        let mem = s.memory();
        let mut t = modern(&s);
        let mut irq = s.irq();
        if msix {
            assert!(irq.enable_msix(4));
        } else {
            assert!(irq.enable_intx());
        }
        t.set_msix_enabled(msix);
        negotiate(&mut t, 1 << 32); // no EVENT_IDX
        let vector = if msix { 1 } else { NO_VECTOR };
        let mut ring = TestRing::new(&mem, 128, false);
        t.setup_queue(1, 128, ring.addrs(), vector).unwrap();
        driver_ok(&mut t);

        let out = mem.alloc_coherent(16, 16).unwrap();
        let inb = mem.alloc_coherent(64, 16).unwrap();
        mem.slice(&out)[..5].copy_from_slice(b"hello");
        let head = ring.post(&[(out.daddr, 5)], &[(inb.daddr, 64)]);
        t.notify(1);
        assert_eq!(s.kicks(1), 1);

        let chains = s.pop_chains(1);
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].head, head);
        assert_eq!(
            (chains[0].readable_len(), chains[0].writable_len()),
            (5, 64)
        );
        assert_eq!(s.read_chain(&chains[0]), b"hello");
        let n = s.write_chain(&chains[0], b"world!");
        s.complete(1, head, n);
        assert!(s.signal_used(1));
        assert_eq!(ring.take_used(), vec![(u32::from(head), 6)]);
        assert_eq!(&mem.slice(&inb)[..6], b"world!");
        if msix {
            assert_eq!(s.take_interrupts(), vec![SimInterrupt::Msix(1)]);
        } else {
            assert_eq!(s.take_interrupts(), vec![SimInterrupt::Intx]);
            let isr = t.read_isr();
            assert!(isr.queue() && !isr.config_changed());
            assert_eq!(t.read_isr().0, 0);
        }

        // NO_INTERRUPT suppresses the next interrupt (no EVENT_IDX).
        ring.set_no_interrupt(true);
        let head = ring.post(&[(out.daddr, 1)], &[]);
        t.notify(1);
        assert_eq!(s.serve(1, |_| 0), 1);
        assert_eq!(ring.take_used(), vec![(u32::from(head), 0)]);
        assert!(s.take_interrupts().is_empty());
        assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
    }
}

#[test]
fn event_idx_controls_device_interrupts() {
    let s = sim_with(SimMode::Modern);
    let mem = s.memory();
    let mut t = modern(&s);
    assert!(s.irq().enable_msix(4));
    t.set_msix_enabled(true);
    negotiate(&mut t, (1 << 32) | Features::EVENT_IDX.bits());
    let mut ring = TestRing::new(&mem, 64, false);
    t.setup_queue(0, 64, ring.addrs(), 0).unwrap();
    driver_ok(&mut t);
    let buf = mem.alloc_coherent(16, 16).unwrap();
    // used_event = 1: interrupt only once the second completion is published.
    ring.set_used_event(1);
    ring.post(&[(buf.daddr, 4)], &[]);
    ring.post(&[(buf.daddr, 4)], &[]);
    let chains = s.pop_chains(0);
    assert_eq!(chains.len(), 2);
    s.complete(0, chains[0].head, 0);
    assert!(!s.signal_used(0));
    s.complete(0, chains[1].head, 0);
    assert!(s.signal_used(0));
    assert_eq!(s.take_interrupts(), vec![SimInterrupt::Msix(0)]);
    assert_eq!(ring.take_used().len(), 2);
}

#[test]
fn teardown_uses_queue_reset_only_when_negotiated() {
    let s = sim_with(SimMode::Modern);
    let mem = s.memory();
    let mut t = modern(&s);
    negotiate(&mut t, 1 << 32);
    let ring = TestRing::new(&mem, 256, false);
    t.setup_queue(0, 256, ring.addrs(), NO_VECTOR).unwrap();
    t.teardown_queue(0);
    assert!(
        s.queue_info(0).unwrap().enabled,
        "without RING_RESET the queue lives until reset"
    );
    assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());

    let s = sim_with(SimMode::Modern);
    let mut t = modern(&s);
    negotiate(&mut t, (1 << 32) | (1 << 40));
    let ring = TestRing::new(&s.memory(), 256, false);
    t.setup_queue(0, 256, ring.addrs(), NO_VECTOR).unwrap();
    t.teardown_queue(0);
    assert!(!s.queue_info(0).unwrap().enabled);
    assert!(
        !s.queue_info(0).unwrap().resetting,
        "teardown returned while the queue reset was ongoing (§4.1.4.3.2: complete once \
         queue_reset reads 0)"
    );
    assert!(s.events().contains(&SimEvent::QueueReset { queue: 0 }));
    // And it can be set up again.
    t.setup_queue(0, 128, ring.addrs(), NO_VECTOR).unwrap();
    assert_eq!(s.queue_info(0).unwrap().size, 128);
}

#[test]
fn no_accesses_outside_the_model() {
    // A whole init through the enum, including reads of every register the trait exposes.
    let s = sim_with(SimMode::Transitional);
    let mut t = modern(&s);
    negotiate(&mut t, OFFERED);
    let _ = t.config_generation();
    let _ = t.read_isr();
    for q in 0..t.num_queues() {
        let _ = t.max_queue_size(q);
    }
    assert!(
        s.bad_accesses().is_empty(),
        "{:?}\n{}",
        s.bad_accesses(),
        s.describe()
    );
}

#[test]
fn many_queues_notify_beyond_the_cached_table() {
    // 70 queues (virtio-serial with 31 ports has 64): queues above the 64 cached notify
    // offsets work when notify_off == index, as on QEMU.
    let sizes = vec![16u16; 70];
    let s = SimBuilder::new(SimMode::Modern, 3).queues(&sizes).build();
    let mem = s.memory();
    let mut t = modern(&s);
    negotiate(&mut t, 1 << 32);
    assert_eq!(t.num_queues(), 70);
    let rings: Vec<_> = (0..70u16).map(|_| TestRing::new(&mem, 16, false)).collect();
    for (q, r) in rings.iter().enumerate() {
        t.setup_queue(q as u16, 16, r.addrs(), NO_VECTOR).unwrap();
    }
    driver_ok(&mut t);
    for q in [0u16, 63, 64, 69] {
        t.notify(q);
    }
    t.notify(70); // does not exist: dropped by the transport
    assert_eq!(
        (
            s.kicks(0),
            s.kicks(63),
            s.kicks(64),
            s.kicks(69),
            s.kicks(1)
        ),
        (1, 1, 1, 1, 0)
    );
    // A queue torn down, then every queue after a reset: their cached notification
    // registers are forgotten, so nothing reaches the device.
    t.teardown_queue(0);
    t.notify(0);
    assert_eq!(s.kicks(0), 1);
    t.set_status(DeviceStatus::empty());
    for q in [63u16, 64, 69] {
        t.notify(q);
    }
    assert_eq!((s.kicks(63), s.kicks(64), s.kicks(69)), (1, 1, 1));
    assert!(s.bad_accesses().is_empty(), "{:?}", s.bad_accesses());
}
