//! `VirtioDevice` (virtio-core's in-process bus) over the PCI transports and the simulated
//! function, in all three modes: initialisation order, interrupt-vector fallback, config
//! access at the right legacy offset, and a request round trip served by `virtio-queue`.

use virtio_core::platform::{Dma, InterruptMode};
use virtio_core::transport::{NO_VECTOR, Transport};
use virtio_core::{Bus, DeviceStatus, Error, Features, QueueSpec, Segment, VirtioDevice};
use virtio_pci::{PciTransport, Preference, TransportKind, probe};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{
    IrqCall, Sim, SimBars, SimBuilder, SimConfig, SimInterrupt, SimIrq, SimMode,
};

type Dev = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;

const MAC: [u8; 8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x01, 0x00];
/// MAC (5), STATUS (16) + ring/transport bits QEMU offers, including bit 30.
const OFFERED: u64 =
    (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 16) | (1 << 5) | (1 << 40);
const DRIVER: Features = Features::from_bits_retain((1 << 5) | (1 << 16));

use virtio_tests::sim::MODES;

fn sim(mode: SimMode, msix_vectors: Option<u16>) -> Sim {
    let mut b = SimBuilder::new(mode, 1)
        .features(OFFERED)
        .queues(&[256, 256, 64])
        .device_config(&MAC);
    if let Some(v) = msix_vectors {
        b = b.msix_vectors(v);
    }
    b.build()
}

fn device(s: &Sim, pref: Preference) -> Dev {
    let t = probe(s.config_space(), s.bars(), pref).expect("probe");
    VirtioDevice::new(t, s.memory(), s.irq())
}

fn specs() -> [QueueSpec; 3] {
    [
        QueueSpec::new(0).interrupts(true),
        QueueSpec::new(1).interrupts(true),
        QueueSpec::new(2).interrupts(false),
    ]
}

/// The queues an MSI-X interrupt on `vector` names.
fn queues_of(d: &mut Dev, vector: u16) -> Vec<u16> {
    d.handle_interrupt(Some(vector)).queues.iter().collect()
}

fn bring_up(d: &mut Dev) {
    let negotiated = d.negotiate_features(DRIVER).expect("features");
    assert!(!negotiated.contains(Features::BAD_FEATURE));
    d.setup_queues(&specs()).expect("queues");
    d.driver_ok().expect("driver ok");
}

#[test]
fn init_order_and_features_in_every_mode() {
    for (mode, pref) in MODES {
        let s = sim(mode, None);
        let mut d = device(&s, pref);
        let legacy = d.transport().kind() == TransportKind::Legacy;
        bring_up(&mut d);
        s.check_init_order()
            .unwrap_or_else(|e| panic!("{mode:?}/{pref:?}: {e}"));
        let f = s.driver_features();
        assert_eq!(f & (1 << 30), 0, "bit 30 must never be acknowledged");
        assert_eq!(f & ((1 << 5) | (1 << 16)), (1 << 5) | (1 << 16));
        if legacy {
            assert_eq!(f >> 32, 0);
        } else {
            assert_ne!(f & (1 << 32), 0, "VERSION_1");
            assert_eq!(
                f & (1 << 40),
                0,
                "RING_RESET is not implemented, so not acknowledged"
            );
        }
        assert!(s.status() & 4 != 0);
        assert!(
            s.bad_accesses().is_empty(),
            "{mode:?}/{pref:?}: {:?}",
            s.bad_accesses()
        );
    }
}

#[test]
fn per_queue_vectors_then_shared_then_intx() {
    for (mode, pref) in MODES {
        // Per-queue: config 0, queues 1 and 2, queue 2 without interrupts.
        let s = sim(mode, None);
        let mut d = device(&s, pref);
        bring_up(&mut d);
        assert_eq!(d.interrupt_mode(), InterruptMode::MsiX { vectors: 3 });
        assert_eq!(s.interrupt_mode(), Some(InterruptMode::MsiX { vectors: 3 }));
        assert_eq!(s.config_vector(), 0);
        let vectors: Vec<_> = (0..3).map(|q| s.queue_info(q).unwrap().vector).collect();
        assert_eq!(vectors, vec![1, 2, NO_VECTOR]);
        // Each vector names its own queue (the per-vector masks built at setup); the queue
        // without interrupts never appears, and vector 0 is the configuration's.
        assert_eq!(queues_of(&mut d, 1), [0]);
        assert_eq!(queues_of(&mut d, 2), [1]);
        assert_eq!(queues_of(&mut d, 0), [0u16; 0]);
        assert_eq!(queues_of(&mut d, 3), [0u16; 0], "no such vector");
        let interrupts = |d: &Dev, q| d.queue_stats(q).unwrap().interrupts;
        assert_eq!(
            (interrupts(&d, 0), interrupts(&d, 1), interrupts(&d, 2)),
            (1, 1, 0)
        );

        // The platform grants only 2 vectors: shared plan.
        let s = sim(mode, None);
        s.limit_platform_vectors(2);
        let mut d = device(&s, pref);
        bring_up(&mut d);
        assert_eq!(d.interrupt_mode(), InterruptMode::MsiX { vectors: 2 });
        let vectors: Vec<_> = (0..3).map(|q| s.queue_info(q).unwrap().vector).collect();
        assert_eq!(vectors, vec![1, 1, NO_VECTOR]);
        assert_eq!(queues_of(&mut d, 1), [0, 1]);
        // After a reset and a new setup the masks are built again.
        d.reset(&mut |_, _| {});
        bring_up(&mut d);
        assert_eq!(queues_of(&mut d, 1), [0, 1]);

        // The device rejects vector 2 (read back NO_VECTOR): fall back to shared after a reset.
        let s = sim(mode, None);
        s.reject_vector(2);
        let mut d = device(&s, pref);
        bring_up(&mut d);
        assert_eq!(d.interrupt_mode(), InterruptMode::MsiX { vectors: 2 });
        assert_eq!(
            queues_of(&mut d, 1),
            [0, 1],
            "the shared plan after the fallback"
        );
        assert!(s.irq_calls().contains(&IrqCall::Disable));
        s.check_init_order().unwrap();

        // No MSI-X capability at all (like QEMU's balloon): INTx.
        let s = sim(mode, Some(0));
        let mut d = device(&s, pref);
        bring_up(&mut d);
        assert_eq!(d.interrupt_mode(), InterruptMode::Intx);
        assert_eq!(s.queue_info(0).unwrap().vector, NO_VECTOR);
        assert!(
            s.bad_accesses().is_empty(),
            "{mode:?}: {:?}",
            s.bad_accesses()
        );
    }
}

#[test]
fn config_reads_follow_the_msix_state() {
    for (mode, pref) in MODES {
        for msix in [None, Some(0)] {
            let s = sim(mode, msix);
            let mut d = device(&s, pref);
            bring_up(&mut d);
            let mut mac = [0u8; 6];
            d.read_config(0, &mut mac).unwrap();
            assert_eq!(mac, MAC[..6], "{mode:?}/{pref:?} msix {msix:?}");
            assert_eq!(d.read_config_u16(6).unwrap(), 1, "link up");
            assert!(matches!(
                d.read_config_u8(0x2000),
                Err(Error::ConfigOutOfRange { .. })
            ));
        }
    }
}

#[test]
fn request_round_trip_and_interrupts() {
    for (mode, pref) in MODES {
        for msix in [None, Some(0)] {
            let s = sim(mode, msix);
            let mem = s.memory();
            let mut d = device(&s, pref);
            bring_up(&mut d);
            let out = mem.alloc_buffer(8);
            let inb = mem.alloc_buffer(32);
            mem.slice(&out)[..4].copy_from_slice(b"ping");
            d.add(
                1,
                &[Segment::new(out.daddr, 4)],
                &[Segment::new(inb.daddr, 32)],
                77,
            )
            .unwrap();
            assert!(d.kick(1).unwrap());
            assert_eq!(s.kicks(1), 1);

            let served = s.serve(1, |c| {
                assert_eq!(s.read_chain(c), b"ping");
                s.write_chain(c, b"pong!")
            });
            assert_eq!(served, 1);
            let irqs = s.take_interrupts();
            let vector = match (d.interrupt_mode(), irqs.as_slice()) {
                (InterruptMode::MsiX { .. }, [SimInterrupt::Msix(v)]) => Some(*v),
                (InterruptMode::Intx, [SimInterrupt::Intx]) => None,
                other => panic!("{mode:?}: unexpected interrupts {other:?}"),
            };
            let cause = d.handle_interrupt(vector);
            assert!(cause.queues.contains(1) && !cause.config_changed);
            let used = d.pop_used(1).unwrap().expect("completion");
            assert_eq!((used.token, used.len), (77, 5));
            assert_eq!(&mem.slice(&inb)[..5], b"pong!");
            assert_eq!(d.pop_used(1).unwrap(), None);

            // Config change: link goes down.
            s.set_device_config(6, &[0, 0]);
            let irqs = s.take_interrupts();
            let vector = match irqs.as_slice() {
                [SimInterrupt::Msix(v)] => Some(*v),
                [SimInterrupt::Intx] => None,
                other => panic!("unexpected {other:?}"),
            };
            let cause = d.handle_interrupt(vector);
            assert!(cause.config_changed && !cause.needs_reset);
            assert_eq!(d.read_config_u16(6).unwrap(), 0);

            // DEVICE_NEEDS_RESET.
            s.trigger_needs_reset();
            let vector = match s.take_interrupts().as_slice() {
                [SimInterrupt::Msix(v)] => Some(*v),
                _ => None,
            };
            assert!(d.handle_interrupt(vector).needs_reset);
            let mut reclaimed = Vec::new();
            d.reset(&mut |q, t| reclaimed.push((q, t)));
            assert_eq!(s.status(), 0);
            assert!(d.transport().status().is_empty());
            assert!(
                s.bad_accesses().is_empty(),
                "{mode:?}: {:?}",
                s.bad_accesses()
            );
            // SAFETY: the device was reset; the buffers are no longer in use.
            unsafe {
                mem.free_coherent(out);
                mem.free_coherent(inb);
            }
        }
    }
}

#[test]
fn refused_features_ok_fails_the_device() {
    let s = SimBuilder::new(SimMode::Modern, 1)
        .features(OFFERED)
        .accept_features_ok(false)
        .build();
    let mut d = device(&s, Preference::Auto);
    assert!(matches!(
        d.negotiate_features(DRIVER),
        Err(Error::FeaturesNotAccepted { .. })
    ));
    assert_ne!(s.status() & DeviceStatus::FAILED.bits(), 0);
}

/// DMA memory that checks, whenever a region is freed, that the device is reset (status 0):
/// a live device may still write to a ring (§2.4).
#[derive(Clone)]
struct FreedOnlyWhenReset {
    mem: IdentityMemory,
    sim: Sim,
}

impl Dma for FreedOnlyWhenReset {
    fn alloc_coherent(
        &self,
        len: usize,
        align: usize,
    ) -> virtio_core::Result<virtio_core::platform::DmaRegion> {
        self.mem.alloc_coherent(len, align)
    }
    unsafe fn free_coherent(&self, region: virtio_core::platform::DmaRegion) {
        assert_eq!(
            self.sim.status(),
            0,
            "a DMA region freed while the device is live (status {:#x})",
            self.sim.status()
        );
        // SAFETY: the caller's contract, passed on.
        unsafe { self.mem.free_coherent(region) }
    }
    fn map(
        &self,
        vaddr: std::ptr::NonNull<u8>,
        len: usize,
        dir: virtio_core::platform::DmaDirection,
    ) -> virtio_core::Result<virtio_core::platform::DeviceAddr> {
        self.mem.map(vaddr, len, dir)
    }
    fn unmap(
        &self,
        daddr: virtio_core::platform::DeviceAddr,
        len: usize,
        dir: virtio_core::platform::DmaDirection,
    ) {
        self.mem.unmap(daddr, len, dir)
    }
}

/// Negotiating again on a live device (DRIVER_OK, queues set up) resets it before its rings
/// are freed; so do `reset` and dropping the device.
#[test]
fn rings_are_freed_only_after_a_reset() {
    for (mode, pref) in MODES {
        let s = sim(mode, None);
        let t = probe(s.config_space(), s.bars(), pref).unwrap();
        let dma = FreedOnlyWhenReset {
            mem: s.memory(),
            sim: s.clone(),
        };
        let mut d = VirtioDevice::new(t, dma, s.irq());
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        d.reset(&mut |_, _| {});
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        drop(d);
    }
}

/// A device that will not reset keeps its rings: `reset` leaves them allocated (the device
/// may still write to them) instead of freeing memory that would be handed to others.
#[test]
fn a_device_that_will_not_reset_keeps_its_rings() {
    for (mode, pref) in MODES {
        let s = sim(mode, None);
        let mem = s.memory();
        let before = mem.free_bytes();
        let t = probe(s.config_space(), s.bars(), pref).unwrap();
        let dma = FreedOnlyWhenReset {
            mem: mem.clone(),
            sim: s.clone(),
        };
        let mut d = VirtioDevice::new(t, dma, s.irq());
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        let with_rings = mem.free_bytes();
        assert!(with_rings < before);
        s.refuse_reset(true);
        d.reset(&mut |_, _| {});
        assert_eq!(
            mem.free_bytes(),
            with_rings,
            "{mode:?}: the rings stay allocated"
        );
        assert_eq!(d.negotiate_features(DRIVER), Err(Error::ResetTimeout));
        drop(d);
        assert_eq!(mem.free_bytes(), with_rings);
    }
}

/// Two specs for one queue index are refused before anything is allocated (the second
/// would replace the first's rings, which would never be freed).
#[test]
fn a_queue_named_twice_is_refused() {
    let s = sim(SimMode::Modern, None);
    let mem = s.memory();
    let mut d = device(&s, Preference::Auto);
    d.negotiate_features(DRIVER).unwrap();
    let before = mem.free_bytes();
    let specs = [QueueSpec::new(0), QueueSpec::new(1), QueueSpec::new(0)];
    assert_eq!(d.setup_queues(&specs), Err(Error::InvalidState));
    assert_eq!(mem.free_bytes(), before, "nothing allocated");
    drop(d);
    assert_eq!(mem.free_bytes(), before);
}
