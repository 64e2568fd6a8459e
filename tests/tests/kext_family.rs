//! VirtioFamily.kext's C ABI, called the way the shim and the device kexts call it, over the
//! PCI simulation: start (identify + create), the client attaching through
//! `virtio-kext-client`'s `Bus` adapter, I/O with interrupts delivered by
//! `vfam_deliver_interrupt` to the client's handler, reset, stop (every DMA region freed).
//! Each test runs against the rlib and against the loaded bundle (`kext_support`).

mod kext_support;

use std::ffi::c_void;

use kext_support::{Family, FamilyKext, kext_tests};
use virtio_blk::{BlkDriver, BlkOptions};
use virtio_core::platform::InterruptMode;
use virtio_core::transport::Transport;
use virtio_core::{Bus, DeviceStatus, Error, Features, QueueSpec, Segment};
use virtio_kext_abi::{VK_E_BAD_ARGUMENT, VK_E_RESET_TIMEOUT, VK_E_TRANSPORT, VK_VECTOR_INTX};
use virtio_kext_client::FamilyBus;
use virtio_pci::Preference;
use virtio_tests::blk_model::BlkModel;
use virtio_tests::sim::{SimBuilder, SimMode};

use virtio_tests::sim::MODES;
const OFFERED: u64 = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 16) | (1 << 5);

/// The client's interrupt handler: records vectors, as the net/block shims' actions would
/// before calling their driver.
unsafe extern "C" fn record(ctx: *mut c_void, vector: i32) {
    // SAFETY: ctx is the test's Vec, alive while the handler is registered.
    unsafe { (*(ctx as *mut Vec<i32>)).push(vector) };
}

/// A client kext attaching to the nub: its interrupt handler (recording vectors into
/// `seen`, which must outlive the registration: tests unregister before it goes), then
/// the `Bus` adapter over the family's functions.
fn attach_client(
    family: &'static FamilyKext,
    fam: &Family,
    seen: &mut Vec<i32>,
) -> FamilyBus<&'static virtio_kext_client::FamilyFunctions> {
    // SAFETY: live handle; the caller keeps `seen` alive while registered.
    unsafe {
        (family.client.vfam_set_interrupt_handler)(
            fam.client_handle(),
            Some(record),
            (seen as *mut Vec<i32>).cast(),
        )
    };
    // SAFETY: the handle stays valid until fam.stop(); `client` is its family's.
    unsafe { FamilyBus::with_api(&family.client, fam.client_handle()) }.expect("client bus")
}

kext_tests!(FamilyKext:
    client_bus_round_trip_in_every_mode,
    interrupts_without_a_client_are_acknowledged,
    bad_arguments_and_non_virtio_functions,
    client_declarations_match_the_family_exports,
    lifecycle_across_sleep_wake_and_teardown,
    a_device_that_will_not_reset_through_the_family,
    a_device_left_running_is_reset_when_the_family_starts,
);

/// Firmware left the device running (DRIVER_OK, rings of its own): the family resets it
/// as it starts, before any client comes, and bus mastering (which the shim turned off)
/// comes back on only after that reset.
fn a_device_left_running_is_reset_when_the_family_starts(family: &'static FamilyKext) {
    for (mode, pref) in MODES {
        let sim = BlkModel::new(64)
            .sim_builder(mode, 1 << 28, 16, 4 << 20)
            .build();
        let mut firmware = virtio_pci::probe(sim.config_space(), sim.bars(), pref).unwrap();
        firmware.set_status(
            DeviceStatus::ACKNOWLEDGE
                | DeviceStatus::DRIVER
                | DeviceStatus::FEATURES_OK
                | DeviceStatus::DRIVER_OK,
        );
        let fam = Family::start(family, &sim, pref).expect("start");
        assert_eq!(sim.status(), 0, "{mode:?}: reset as the family starts");
        assert!(
            sim.bus_master(),
            "{mode:?}: bus mastering on after the reset"
        );
        assert_eq!(sim.bus_master_on_unreset(), 0, "{mode:?}");
        fam.stop();
    }
}

fn client_bus_round_trip_in_every_mode(family: &'static FamilyKext) {
    for (mode, pref) in MODES {
        for msix in [None, Some(0)] {
            let mut b = SimBuilder::new(mode, 1)
                .features(OFFERED)
                .queues(&[64, 64])
                .device_config(&[0x52, 0x54, 0, 1, 2, 3, 1, 0]);
            if let Some(v) = msix {
                b = b.msix_vectors(v);
            }
            let sim = b.build();
            let fam = Family::start(family, &sim, pref).expect("start");
            let client = &family.client;
            // SAFETY: live handle.
            assert_eq!(unsafe { (client.vfam_device_type)(fam.client_handle()) }, 1);

            // The client kext attaches: handler, then the Bus adapter.
            let mut seen: Vec<i32> = Vec::new();
            let mut bus = attach_client(family, &fam, &mut seen);
            let f = bus
                .negotiate_features(Features::from_bits_retain((1 << 5) | (1 << 16)))
                .unwrap();
            assert!(!f.contains(Features::BAD_FEATURE));
            assert_eq!(bus.features(), f);
            bus.setup_queues(&[QueueSpec::new(0), QueueSpec::new(1).indirect(4)])
                .unwrap();
            bus.driver_ok().unwrap();
            sim.check_init_order().unwrap();
            let mut mac = [0u8; 6];
            bus.read_config(0, &mut mac).unwrap();
            assert_eq!(mac, [0x52, 0x54, 0, 1, 2, 3]);
            assert!(matches!(
                bus.read_config_u8(0x4000),
                Err(Error::ConfigOutOfRange { .. })
            ));
            match (msix, bus.interrupt_mode()) {
                (None, InterruptMode::MsiX { vectors: 3 }) | (Some(0), InterruptMode::Intx) => {}
                other => panic!("{mode:?}: interrupt mode {other:?}"),
            }

            use virtio_core::platform::Dma;
            let out = bus.dma().alloc_coherent(64, 16).unwrap();
            let inb = bus.dma().alloc_coherent(64, 16).unwrap();
            // SAFETY: freshly allocated, not shared with the device yet.
            unsafe { out.vaddr.as_ptr().copy_from(b"ping".as_ptr(), 4) };
            let r = [Segment::new(out.daddr, 2), Segment::new(out.daddr + 2, 2)];
            assert!(!bus.has_used(1).unwrap(), "nothing added yet");
            bus.add(1, &r, &[Segment::new(inb.daddr, 64)], 42).unwrap();
            assert!(bus.kick(1).unwrap());
            assert!(!bus.has_used(1).unwrap(), "added, not served");
            assert_eq!(
                sim.serve(1, |c| {
                    assert_eq!(sim.read_chain(c), b"ping");
                    sim.write_chain(c, b"pong")
                }),
                1
            );
            assert_eq!(fam.interrupts(), 1);
            assert_eq!(seen.len(), 1, "the client's handler got the interrupt");
            let v = seen[0];
            let cause = bus.handle_interrupt((v != VK_VECTOR_INTX).then_some(v as u16));
            assert!(cause.queues.contains(1));
            assert!(bus.has_used(1).unwrap(), "served");
            let u = bus.pop_used(1).unwrap().unwrap();
            assert_eq!((u.token, u.len), (42, 4));
            // SAFETY: the device completed the chain.
            assert_eq!(
                // SAFETY: the device completed the chain; the buffer is ours again.
                unsafe { std::slice::from_raw_parts(inb.vaddr.as_ptr(), 4) },
                b"pong"
            );
            assert_eq!(bus.pop_used(1).unwrap(), None);
            assert!(!bus.has_used(1).unwrap(), "popped");
            assert_eq!(bus.has_used(7), Err(Error::QueueNotReady { queue: 7 }));
            assert!(!bus.enable_interrupts(1).unwrap());
            assert_eq!(bus.queue_stats(1).unwrap().completions, 1);

            // A drain is one call across the ABI: the peek, the pops in device order (each
            // through the handler) and the race-free re-enable.
            let mut got = Vec::new();
            assert_eq!(
                bus.drain_used(1, true, |u| got.push((u.token, u.len))),
                Ok(0),
                "nothing to pop"
            );
            for token in [50, 51] {
                bus.add(1, &[], &[Segment::new(inb.daddr, 8)], token)
                    .unwrap();
            }
            bus.kick(1).unwrap();
            assert_eq!(sim.serve(1, |c| sim.write_chain(c, b"ab")), 2);
            fam.interrupts();
            assert_eq!(
                bus.drain_used(1, true, |u| got.push((u.token, u.len))),
                Ok(2)
            );
            assert_eq!(got, [(50, 2), (51, 2)]);
            assert!(!bus.has_used(1).unwrap(), "drained");
            assert_eq!(
                bus.drain_used(7, true, |_| {}),
                Err(Error::QueueNotReady { queue: 7 })
            );
            // SAFETY: live handle; no handler, so nothing is called back.
            let s = unsafe {
                (client.vfam_queue_drain)(fam.client_handle(), 1, true, None, std::ptr::null_mut())
            };
            assert_eq!(
                s.code, VK_E_BAD_ARGUMENT,
                "a drain without a handler is refused"
            );
            assert_eq!(bus.queue_stats(1).unwrap().completions, 3);
            assert!(bus.free_descriptors(1).unwrap() > 0);
            assert_eq!(bus.queue_size(1).unwrap(), 64);

            // Errors cross the ABI intact.
            assert_eq!(bus.kick(5), Err(Error::QueueNotReady { queue: 5 }));
            assert_eq!(bus.add(0, &[], &[], 1), Err(Error::BadChain));

            // An in-flight chain comes back on reset.
            bus.add(0, &[], &[Segment::new(inb.daddr, 8)], 7).unwrap();
            let mut back = Vec::new();
            bus.reset(&mut |q, t| back.push((q, t))).unwrap();
            assert_eq!(back, vec![(0, 7)]);
            // SAFETY: the device was reset.
            unsafe {
                bus.dma().free_coherent(out);
                bus.dma().free_coherent(inb);
            }
            // SAFETY: live handle.
            unsafe {
                (client.vfam_set_interrupt_handler)(fam.client_handle(), None, std::ptr::null_mut())
            };
            fam.stop();
        }
    }
}

fn interrupts_without_a_client_are_acknowledged(family: &'static FamilyKext) {
    let sim = SimBuilder::new(SimMode::Modern, 2)
        .features(1 << 32)
        .msix_vectors(0)
        .build();
    let fam = Family::start(family, &sim, Preference::Auto).unwrap();
    sim.raise_config_interrupt();
    assert_eq!(fam.interrupts(), 1);
    assert_eq!(sim.peek_isr(), 0, "the ISR read de-asserted INTx");
    fam.stop();
}

fn bad_arguments_and_non_virtio_functions(family: &'static FamilyKext) {
    let mut dev = std::ptr::null_mut();
    // SAFETY: a null platform is refused before use.
    let s = unsafe { (family.shim.vfam_device_create)(std::ptr::null(), 0, &mut dev) };
    assert_eq!(s.code, VK_E_BAD_ARGUMENT);
    assert!(dev.is_null());
    // SAFETY: a null handle is refused.
    let s = unsafe { (family.client.vfam_driver_ok)(std::ptr::null_mut()) };
    assert_eq!(s.code, VK_E_BAD_ARGUMENT);
    let identify = |vendor, device, subsystem| {
        // SAFETY: a pure function of three IDs.
        unsafe { (family.shim.vfam_identify)(vendor, device, subsystem) }
    };
    assert_eq!(identify(0x8086, 0x1041, 0), 0);
    assert_eq!(identify(0x1af4, 0x1040, 0), 0);
    assert_eq!(identify(0x1af4, 0x1001, 2), 2);
    // The `virtiodarwin_defer` boot-arg's parser (probe hands these types to other drivers).
    let deferred = |ty: u32, list: &std::ffi::CStr| {
        // SAFETY: a NUL-terminated string.
        unsafe { (family.shim.vfam_type_deferred)(ty, list.as_ptr()) }
    };
    assert!(deferred(1, c"net,blk"));
    assert!(deferred(2, c"rng blk"));
    assert!(!deferred(1, c"blk"));
    assert!(deferred(5, c"all"));
    // SAFETY: null defers nothing.
    assert!(!unsafe { (family.shim.vfam_type_deferred)(1, std::ptr::null()) });
    // A modern-only function asked for legacy: a transport error, decoded exactly.
    let sim = SimBuilder::new(SimMode::Modern, 1)
        .features(1 << 32)
        .build();
    let e = Family::start(family, &sim, Preference::Legacy)
        .err()
        .expect("no legacy interface");
    assert_eq!(e.code, VK_E_TRANSPORT);
    assert_eq!(
        e.into_error(),
        Error::Transport(virtio_core::TransportError::NoLegacyInterface)
    );
}

/// The client's `extern "C"` declarations have exactly the family's signatures, and each
/// resolves to the family's export: the rlib's function, or the loaded bundle's exported
/// symbol (inside the loaded image, not this binary).
fn client_declarations_match_the_family_exports(family: &'static FamilyKext) {
    use virtio_family_kext as fam;
    use virtio_kext_client::ffi as cli;
    type D = virtio_kext_client::VfamDevice;
    macro_rules! same {
        ($($name:ident),* $(,)?) => {$(
            // What the client calls: its declaration, or the table resolved from the bundle.
            let declared = family.client.$name as *const () as usize;
            let exported = match family.bundle {
                // The handle types differ only by name: compare addresses.
                None => fam::$name as *const () as usize,
                Some(bundle) => {
                    let at = bundle
                        .exported_symbol(concat!("_", stringify!($name)))
                        .expect(concat!("the family bundle exports _", stringify!($name)));
                    assert!(
                        (bundle.base()..bundle.base() + bundle.image_len()).contains(&at),
                        concat!(stringify!($name), " lies in the loaded image")
                    );
                    at
                }
            };
            assert_eq!(
                declared,
                exported,
                concat!(stringify!($name), " resolves to the family's export")
            );
            if family.bundle.is_none() {
                assert_eq!(declared, cli::$name as *const () as usize, "the rlib table is the declarations");
            }
        )*};
    }
    same!(
        vfam_device_type,
        vfam_set_interrupt_handler,
        vfam_negotiate_features,
        vfam_offered_features,
        vfam_features,
        vfam_read_config,
        vfam_write_config,
        vfam_num_queues,
        vfam_max_queue_size,
        vfam_setup_queues,
        vfam_driver_ok,
        vfam_reset,
        vfam_fail,
        vfam_needs_reset,
        vfam_interrupt_mode,
        vfam_queue_add,
        vfam_queue_kick,
        vfam_queue_pop_used,
        vfam_queue_has_used,
        vfam_queue_drain,
        vfam_queue_enable_interrupts,
        vfam_queue_disable_interrupts,
        vfam_queue_info,
        vfam_queue_stats,
        vfam_handle_interrupt,
        vfam_dma_alloc,
        vfam_dma_free,
        vfam_dma_map,
        vfam_dma_unmap,
    );
    let _: unsafe extern "C" fn(*mut D, u16, *mut bool) -> virtio_kext_abi::VkStatus =
        cli::vfam_queue_kick;
}

/// The family's side of a device's life in IOKit order, in every mode: the client attaches
/// and moves a request; sleep (the client's suspend resets the device through the bus, the
/// in-flight chain comes back once) with an interrupt arriving while asleep; wake (the same
/// features renegotiated, queues rebuilt) and a request again; teardown with an interrupt
/// pending when the client unregisters (it must not reach the old handler), then stop with
/// every DMA region back.
fn lifecycle_across_sleep_wake_and_teardown(family: &'static FamilyKext) {
    use virtio_core::platform::Dma;
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let sim = SimBuilder::new(mode, 1)
            .features(OFFERED)
            .queues(&[64, 64])
            .device_config(&[0x52, 0x54, 0, 1, 2, 3, 1, 0])
            .build();
        let fam = Family::start(family, &sim, pref).expect("start");
        let client = &family.client;
        let mut seen: Vec<i32> = Vec::new();
        let mut bus = attach_client(family, &fam, &mut seen);
        let wanted = Features::from_bits_retain((1 << 5) | (1 << 16));
        let features = bus.negotiate_features(wanted).unwrap();
        let queues = [QueueSpec::new(0), QueueSpec::new(1)];
        bus.setup_queues(&queues).unwrap();
        bus.driver_ok().unwrap();
        let buf = bus.dma().alloc_coherent(64, 16).unwrap();
        let round_trip = |bus: &mut FamilyBus<_>, token: usize| {
            bus.add(1, &[], &[Segment::new(buf.daddr, 8)], token)
                .unwrap();
            bus.kick(1).unwrap();
            assert_eq!(sim.serve(1, |c| sim.write_chain(c, b"ok")), 1);
            fam.interrupts();
            bus.handle_interrupt(None);
            let u = bus.pop_used(1).unwrap().expect("completion");
            assert_eq!((u.token, u.len), (token, 2));
        };
        round_trip(&mut bus, 1);

        // Sleep: the device is reset with a chain in flight; it comes back exactly once.
        bus.add(1, &[], &[Segment::new(buf.daddr, 8)], 2).unwrap();
        let resets = sim.resets();
        let mut back = Vec::new();
        bus.reset(&mut |q, t| back.push((q, t))).unwrap();
        assert_eq!(back, vec![(1, 2)], "{what}");
        assert_eq!(sim.resets(), resets + 1, "{what}");
        // An interrupt while asleep (a shared line): acknowledged, nothing to pop.
        sim.raise_config_interrupt();
        fam.interrupts();
        bus.handle_interrupt(None);
        assert!(matches!(bus.pop_used(1), Ok(None) | Err(_)), "{what}");

        // Wake: from scratch, the same features.
        assert_eq!(
            bus.renegotiate_features(features).unwrap(),
            features,
            "{what}"
        );
        bus.setup_queues(&queues).unwrap();
        bus.driver_ok().unwrap();
        round_trip(&mut bus, 3);

        // Teardown: an interrupt is pending when the client unregisters.
        bus.add(1, &[], &[Segment::new(buf.daddr, 8)], 4).unwrap();
        bus.kick(1).unwrap();
        sim.serve(1, |c| sim.write_chain(c, b"late"));
        seen.clear();
        // SAFETY: live handle; the client stops.
        unsafe {
            (client.vfam_set_interrupt_handler)(fam.client_handle(), None, std::ptr::null_mut())
        };
        fam.interrupts();
        assert!(
            seen.is_empty(),
            "{what}: an interrupt reached an unregistered client"
        );
        // The completion nobody popped: its token still comes back, once.
        let mut back = Vec::new();
        bus.reset(&mut |q, t| back.push((q, t))).unwrap();
        assert_eq!(back, vec![(1, 4)], "{what}");
        // SAFETY: the device was reset; the buffer is ours.
        unsafe { bus.dma().free_coherent(buf) };
        fam.stop();
    }
}

/// A device that will not reset, through the family's C ABI: `vfam_reset` switches bus
/// mastering off and reports VK_OK (`FamilyBus::reset` is Ok), so a block driver over the
/// family frees its slots (none while the device could use them) and the family its rings;
/// on a function where bus mastering stays on it reports VK_E_RESET_TIMEOUT
/// (Err(ResetTimeout)) and neither the driver nor the family frees anything the device had.
/// Nor does the shim at stop: `vfam_device_destroy` reports VK_E_RESET_TIMEOUT — sticky,
/// even when the device resets at last then — and the shim keeps every DMA buffer.
fn a_device_that_will_not_reset_through_the_family(family: &'static FamilyKext) {
    for (stuck, resets_at_stop) in [(false, false), (true, false), (true, true)] {
        let what = format!("stuck {stuck}, resets at stop {resets_at_stop}");
        let sim = BlkModel::new(64)
            .sim_builder(SimMode::Modern, 1 << 28, 16, 4 << 20)
            .build();
        sim.stick_bus_master(stuck);
        let fam = Family::start(family, &sim, Preference::Auto).expect("start");
        let mut seen = Vec::new();
        let mut bus = attach_client(family, &fam, &mut seen);
        bus.negotiate_features(Features::empty()).unwrap();
        bus.setup_queues(&[QueueSpec::new(0)]).unwrap();
        bus.driver_ok().unwrap();
        sim.refuse_reset(true);
        let expected = if stuck {
            Err(Error::ResetTimeout)
        } else {
            Ok(())
        };
        assert_eq!(bus.reset(&mut |_, _| {}), expected, "{what}");
        assert_eq!(sim.bus_master(), stuck);
        sim.refuse_reset(false);

        let drv = BlkDriver::new(bus, BlkOptions::default()).expect("blk over the family");
        assert!(sim.bus_master(), "back on after an acknowledged reset");
        let regions = fam.live_dma();
        sim.refuse_reset(true);
        drop(drv);
        assert_eq!(
            fam.freed_while_live(),
            0,
            "{what}: a region freed while the device could use it"
        );
        // SAFETY: live handle; the client stops.
        unsafe {
            (family.client.vfam_set_interrupt_handler)(
                fam.client_handle(),
                None,
                std::ptr::null_mut(),
            )
        };
        if !stuck {
            assert!(!sim.bus_master());
            fam.stop();
            continue;
        }
        assert!(sim.bus_master());
        assert_eq!(fam.live_dma(), regions, "slots and rings stay allocated");
        if resets_at_stop {
            // Quiet now, but the client leaked what it gave the device when its reset
            // failed: the family still says the device may use memory.
            sim.refuse_reset(false);
        }
        let stopped = fam.stop_keeping();
        assert_eq!(
            (stopped.status.code, stopped.released, stopped.kept),
            (VK_E_RESET_TIMEOUT, 0, regions),
            "{what}: the shim keeps every DMA buffer of a device that may still use them"
        );
        assert_eq!(stopped.freed_while_live, 0, "{what}");
    }
}
