//! `VirtioDevice` (virtio-core's in-process bus) over the PCI transports and the simulated
//! function, in all three modes: initialisation order, interrupt-vector fallback, config
//! access at the right legacy offset, and a request round trip served by `virtio-queue`.

use std::cell::Cell;
use std::rc::Rc;

use virtio_blk::{BlkDriver, BlkOptions};
use virtio_core::platform::{Dma, InterruptMode, PciConfigSpace};
use virtio_core::transport::{NO_VECTOR, Transport};
use virtio_core::{Bus, DeviceStatus, Error, Features, QueueSpec, Segment, VirtioDevice};
use virtio_fs::{FsDriver, FsOptions};
use virtio_pci::{PciTransport, Preference, TransportKind, probe};
use virtio_tests::blk_model::BlkModel;
use virtio_tests::fs_model::FsModel;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{
    FreedOnlyWhenQuiet, IrqCall, Sim, SimBars, SimBuilder, SimConfig, SimInterrupt, SimIrq, SimMode,
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
        d.reset(&mut |_, _| {}).unwrap();
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
            d.reset(&mut |q, t| reclaimed.push((q, t))).unwrap();
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

/// Negotiating again on a live device (DRIVER_OK, queues set up) resets it before its rings
/// are freed; so do `reset` and dropping the device.
#[test]
fn rings_are_freed_only_after_a_reset() {
    for (mode, pref) in MODES {
        let s = sim(mode, None);
        let t = probe(s.config_space(), s.bars(), pref).unwrap();
        let mut d = VirtioDevice::new(t, FreedOnlyWhenQuiet::new(&s), s.irq());
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        d.reset(&mut |_, _| {}).unwrap();
        d.negotiate_features(DRIVER).unwrap();
        d.setup_queues(&specs()).unwrap();
        d.driver_ok().unwrap();
        drop(d);
    }
}

/// A device that will not reset, on a function where bus mastering cannot be switched off,
/// keeps its rings: `reset` is Err(ResetTimeout) and leaves them allocated (the device may
/// still write to them) instead of freeing memory that would be handed to others. Nor are
/// they written: the tokens in flight come back, but the ring stays as the device last saw
/// it (no zeroing under a live device), split and packed: the device still finds the chain.
#[test]
fn a_device_that_will_not_reset_keeps_its_rings() {
    let mut packed_runs = 0;
    for packed in [false, true] {
        for (mode, pref) in MODES {
            let offered = if packed {
                OFFERED | virtio_tests::sim::F_RING_PACKED
            } else {
                OFFERED
            };
            let s = SimBuilder::new(mode, 1)
                .features(offered)
                .queues(&[256, 256, 64])
                .device_config(&MAC)
                .build();
            let what = format!("{mode:?}, packed {packed}");
            let mem = s.memory();
            let buf = mem.alloc_coherent(64, 8).unwrap();
            let before = mem.free_bytes();
            let t = probe(s.config_space(), s.bars(), pref).unwrap();
            let mut d = VirtioDevice::new(t, FreedOnlyWhenQuiet::new(&s), s.irq());
            bring_up_any(&mut d);
            // A legacy interface cannot negotiate RING_PACKED (bit 34).
            let packed_ring = d.features().contains(Features::RING_PACKED);
            assert_eq!(
                packed_ring,
                packed && d.transport().kind() == TransportKind::Modern,
                "{what}"
            );
            packed_runs += usize::from(packed_ring);
            let with_rings = mem.free_bytes();
            assert!(with_rings < before);
            d.add(0, &[], &[Segment::new(buf.daddr, 64)], 7).unwrap();
            d.kick(0).unwrap();
            s.refuse_reset(true);
            s.stick_bus_master(true);
            let mut back = Vec::new();
            assert_eq!(
                d.reset(&mut |q, t| back.push((q, t))),
                Err(Error::ResetTimeout)
            );
            assert_eq!(back, [(0, 7)], "{what}: the token comes back");
            assert!(!d.dma_stopped());
            assert_eq!(
                mem.free_bytes(),
                with_rings,
                "{what}: the rings stay allocated"
            );
            assert_eq!(
                s.pop_chains(0).len(),
                1,
                "{what}: the ring was left as the device had it"
            );
            assert_eq!(d.negotiate_features(DRIVER), Err(Error::ResetTimeout));
            drop(d);
            assert_eq!(mem.free_bytes(), with_rings);
        }
    }
    assert!(packed_runs > 0, "the packed ring was tested");
}

fn bring_up_any<T: Transport, D: Dma, I: virtio_core::platform::InterruptPlatform>(
    d: &mut VirtioDevice<T, D, I>,
) {
    d.negotiate_features(DRIVER).unwrap();
    d.setup_queues(&specs()).unwrap();
    d.driver_ok().unwrap();
}

/// Bus mastering comes on only once the device has reset. The VirtioFamily shim hands
/// the function over with Bus Master Enable off (firmware may have left the device running
/// on rings in memory the OS now owns, `VirtioPCITransport::start`): the initialisation
/// resets the device first and then turns bus mastering on, so the device can run the new
/// queues and never the old ones.
#[test]
fn bus_mastering_comes_on_only_after_the_first_reset() {
    for (mode, pref) in MODES {
        let s = sim(mode, Some(4));
        // Firmware's driver left the device running...
        let mut fw = probe(s.config_space(), s.bars(), pref).unwrap();
        fw.set_status(
            DeviceStatus::ACKNOWLEDGE
                | DeviceStatus::DRIVER
                | DeviceStatus::FEATURES_OK
                | DeviceStatus::DRIVER_OK,
        );
        // ...and the shim switched its bus mastering off.
        assert!(virtio_pci::caps::set_bus_master(&s.config_space(), false));
        let mem = s.memory();
        let mut d = device(&s, pref);
        bring_up_any(&mut d);
        assert!(s.bus_master(), "{mode:?}: bus mastering on after the reset");
        assert_eq!(
            s.bus_master_on_unreset(),
            0,
            "{mode:?}: bus mastering came on before the device reset"
        );
        let buf = mem.alloc_coherent(64, 8).unwrap();
        d.add(0, &[], &[Segment::new(buf.daddr, 64)], 5).unwrap();
        d.kick(0).unwrap();
        assert_eq!(s.serve(0, |c| s.write_chain(c, b"on")), 1, "{mode:?}");
        assert_eq!(
            d.pop_used(0).unwrap().map(|u| (u.token, u.len)),
            Some((5, 2)),
            "{mode:?}"
        );
        assert_eq!(s.dma_refused(), 0, "{mode:?}");
        assert_eq!(d.reset(&mut |_, _| {}), Ok(()));
    }
}

/// A device that will not reset has its bus mastering switched off (PCI command register,
/// read back): `reset` is Ok, the device can no longer touch memory (its chains are not
/// read, MSI-X not sent), so its rings are freed. Once it resets again the next
/// initialisation turns bus mastering back on and the device works.
#[test]
fn a_device_that_will_not_reset_has_its_dma_stopped() {
    for (mode, pref) in MODES {
        let s = sim(mode, Some(4));
        let mem = s.memory();
        let before = mem.free_bytes();
        let t = probe(s.config_space(), s.bars(), pref).unwrap();
        let mut d = VirtioDevice::new(t, FreedOnlyWhenQuiet::new(&s), s.irq());
        bring_up_any(&mut d);
        assert!(s.bus_master(), "the platform enabled bus mastering");
        let buf = mem.alloc_coherent(64, 8).unwrap();
        d.add(0, &[], &[Segment::new(buf.daddr, 64)], 9).unwrap();
        s.refuse_reset(true);
        let mut back = Vec::new();
        assert_eq!(d.reset(&mut |q, t| back.push((q, t))), Ok(()), "{mode:?}");
        assert_eq!(back, [(0, 9)], "{mode:?}: the token comes back");
        assert!(!s.bus_master(), "{mode:?}: bus mastering is off");
        assert!(d.dma_stopped());
        assert_ne!(s.status(), 0, "{mode:?}: the device did not reset");
        assert_eq!(mem.free_bytes() + buf.len, before, "{mode:?}: rings freed");
        // Nothing the device does reaches memory now.
        assert!(s.pop_chains(0).is_empty());
        assert!(s.dma_refused() > 0);
        // Still refusing: no initialisation, bus mastering stays off.
        assert_eq!(d.negotiate_features(DRIVER), Err(Error::ResetTimeout));
        assert!(!s.bus_master());
        // It resets again: bus mastering comes back with the reset, and a chain goes
        // through.
        s.refuse_reset(false);
        bring_up_any(&mut d);
        assert!(s.bus_master(), "{mode:?}: bus mastering back on");
        assert!(!d.dma_stopped());
        d.add(0, &[], &[Segment::new(buf.daddr, 64)], 10).unwrap();
        d.kick(0).unwrap();
        assert_eq!(s.serve(0, |c| s.write_chain(c, b"back")), 1, "{mode:?}");
        assert_eq!(
            d.pop_used(0).unwrap().map(|u| (u.token, u.len)),
            Some((10, 4))
        );
        assert_eq!(d.reset(&mut |_, _| {}), Ok(()));
        // SAFETY: the device was reset; the buffer is ours.
        unsafe { mem.free_coherent(buf) };
        drop(d);
        assert_eq!(mem.free_bytes(), before, "{mode:?}");
        assert!(
            s.bad_accesses().is_empty(),
            "{mode:?}: {:?}",
            s.bad_accesses()
        );
    }
}

/// The function's config space, where Bus Master Enable (command register bit 2) can be
/// cleared but, while `refuse_set`, not set again: writes setting it are dropped.
struct BusMasterRefused {
    cfg: SimConfig,
    refuse_set: Rc<Cell<bool>>,
}

impl BusMasterRefused {
    fn filter(&self, offset: u16, value: u32) -> u32 {
        if self.refuse_set.get() && offset == 0x04 {
            value & !0x04
        } else {
            value
        }
    }
}

impl PciConfigSpace for BusMasterRefused {
    fn read8(&self, offset: u16) -> u8 {
        self.cfg.read8(offset)
    }
    fn read16(&self, offset: u16) -> u16 {
        self.cfg.read16(offset)
    }
    fn read32(&self, offset: u16) -> u32 {
        self.cfg.read32(offset)
    }
    fn write8(&self, offset: u16, value: u8) {
        self.cfg
            .write8(offset, self.filter(offset, value.into()) as u8)
    }
    fn write16(&self, offset: u16, value: u16) {
        self.cfg
            .write16(offset, self.filter(offset, value.into()) as u16)
    }
    fn write32(&self, offset: u16, value: u32) {
        self.cfg.write32(offset, self.filter(offset, value))
    }
}

/// A device whose DMA was stopped (it would not reset) and whose bus mastering then cannot
/// be turned back on: its next reset is acknowledged, but the initialisation fails
/// (Err(ResetTimeout)) with DMA still stopped, instead of running queues the device cannot
/// reach. `reset` stays Ok (the device is quiet). Once bus mastering sticks, it works.
#[test]
fn bus_mastering_that_will_not_come_back_fails_the_initialisation() {
    for (mode, pref) in MODES {
        let s = sim(mode, Some(4));
        let refuse_set = Rc::new(Cell::new(false));
        let cfg = BusMasterRefused {
            cfg: s.config_space(),
            refuse_set: refuse_set.clone(),
        };
        let t = probe(cfg, s.bars(), pref).unwrap();
        let mut d = VirtioDevice::new(t, FreedOnlyWhenQuiet::new(&s), s.irq());
        bring_up_any(&mut d);
        s.refuse_reset(true);
        assert_eq!(d.reset(&mut |_, _| {}), Ok(()), "{mode:?}");
        assert!(d.dma_stopped());
        assert!(!s.bus_master());
        s.refuse_reset(false);
        refuse_set.set(true);
        assert_eq!(
            d.negotiate_features(DRIVER),
            Err(Error::ResetTimeout),
            "{mode:?}: bus mastering did not come back"
        );
        assert!(d.dma_stopped(), "{mode:?}: DMA stays stopped");
        assert!(!s.bus_master());
        assert_eq!(d.reset(&mut |_, _| {}), Ok(()), "{mode:?}: quiet");
        assert!(d.dma_stopped());
        refuse_set.set(false);
        bring_up_any(&mut d);
        assert!(s.bus_master(), "{mode:?}: bus mastering back on");
        assert!(!d.dma_stopped());
        assert_eq!(d.reset(&mut |_, _| {}), Ok(()));
    }
}

type QuietDev = VirtioDevice<PciTransport<SimConfig, SimBars>, FreedOnlyWhenQuiet, SimIrq>;

/// A block device (and the free bytes of its memory before the driver came).
fn blk_device(stuck: bool) -> (Sim, BlkDriver<QuietDev>, usize) {
    let s = BlkModel::new(64)
        .sim_builder(SimMode::Modern, 1 << 28, 16, 4 << 20)
        .build();
    s.stick_bus_master(stuck);
    let before = s.memory().free_bytes();
    let t = probe(s.config_space(), s.bars(), Preference::Auto).unwrap();
    let d = VirtioDevice::new(t, FreedOnlyWhenQuiet::new(&s), s.irq());
    let drv = BlkDriver::new(d, BlkOptions::default()).expect("blk");
    (s, drv, before)
}

/// virtio-blk over a device that will not reset: with bus mastering switched off the
/// driver frees its request slots safely (the DMA wrapper checks every free) and comes
/// back once the device resets again; with bus mastering stuck on, the driver's slots and
/// the rings stay allocated when it is dropped.
#[test]
fn blk_driver_of_a_device_that_will_not_reset() {
    let mut model = BlkModel::new(64);
    let (s, mut drv, before) = blk_device(false);
    let mem = s.memory();
    s.refuse_reset(true);
    drv.get_id(0, 1).unwrap();
    let mut aborted = Vec::new();
    drv.abort_all(|t, r| aborted.push((t, r.is_err())));
    assert_eq!(aborted, [(1, true)]);
    assert!(!s.bus_master());
    assert!(drv.restart().is_err(), "the device still does not reset");
    s.refuse_reset(false);
    drv.restart().expect("restart after an honest reset");
    assert!(s.bus_master());
    drv.get_id(0, 2).unwrap();
    drv.kick_all().unwrap();
    assert_eq!(model.serve(&s, 0), 1);
    let mut done = Vec::new();
    drv.poll_completions(0, |t, r| done.push((t, r.is_ok())))
        .unwrap();
    assert_eq!(done, [(2, true)]);
    s.refuse_reset(true);
    drop(drv);
    assert!(!s.bus_master());
    assert_eq!(mem.free_bytes(), before, "everything freed");

    let (s, drv, _) = blk_device(true);
    let mem = s.memory();
    let with_driver = mem.free_bytes();
    s.refuse_reset(true);
    drop(drv);
    assert!(s.bus_master());
    assert_eq!(
        mem.free_bytes(),
        with_driver,
        "slots and rings stay with the device"
    );
}

/// virtio-fs over a device that will not reset: with bus mastering switched off its
/// request, high-priority and notification buffers are freed safely; stuck on, none is.
#[test]
fn fs_driver_of_a_device_that_will_not_reset() {
    for stuck in [false, true] {
        let dir = std::env::temp_dir().join(format!("virtio-fs-reset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = FsModel::new(&dir, "share");
        let s = model
            .sim_builder((1 << 28) | (1 << 29), 16, 8 << 20)
            .build();
        s.stick_bus_master(stuck);
        let mem = s.memory();
        let before = mem.free_bytes();
        let t = probe(s.config_space(), s.bars(), Preference::Auto).unwrap();
        let d = VirtioDevice::new(t, FreedOnlyWhenQuiet::new(&s), s.irq());
        let fs = FsDriver::new(d, FsOptions::default()).expect("fs");
        let with_driver = mem.free_bytes();
        s.refuse_reset(true);
        drop(fs);
        if stuck {
            assert_eq!(mem.free_bytes(), with_driver, "nothing freed");
        } else {
            assert!(!s.bus_master());
            assert_eq!(mem.free_bytes(), before, "everything freed");
        }
        let _ = std::fs::remove_dir_all(&dir);
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
