//! virtio-console over `VirtioDevice<PciTransport<..>>` and the simulated function, with the
//! device-side backend of `console_model`, in modern, transitional and legacy modes.

use virtio_console::{
    ConsoleError, ConsoleEvent, ConsoleOptions, ControlError, NameError, VirtioConsole,
};
use virtio_pci::Preference;
use virtio_tests::console_model::{
    self as cm, ConsoleModel, F_EMERG_WRITE, F_MULTIPORT, F_SIZE, SimConsoleBus,
};
use virtio_tests::sim::{SimBuilder, SimMode};

const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);
const V1: u64 = 1 << 32;
/// What QEMU 7.2's virtio-serial offers with max_ports=31 (SIZE is not offered).
const QEMU: u64 = F_MULTIPORT | F_EMERG_WRITE | RING | V1;
const PORTS: u32 = 31;

use virtio_tests::sim::MODES;

type Console = VirtioConsole<SimConsoleBus>;

fn model(mode: SimMode, features: u64, cfg: Vec<u8>, nports: u32) -> ConsoleModel {
    let sim = SimBuilder::new(mode, 3)
        .features(features)
        .queues(&cm::queue_sizes(nports, 64))
        .device_config(&cfg)
        .memory_len(16 << 20)
        .build();
    ConsoleModel::new(&sim)
}

fn console(m: &ConsoleModel, pref: Preference, opts: ConsoleOptions) -> Console {
    VirtioConsole::init(cm::bus(&m.sim, pref), opts).expect("console init")
}

fn events(c: &mut Console) -> Vec<ConsoleEvent> {
    c.poll_events().collect()
}

fn read_all(c: &mut Console, port: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 100];
    loop {
        let n = c.read(port, &mut buf).expect("read");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// A QEMU-like device with a console on port 0 and two named ports, brought up to the point
/// where every port is added, named and acknowledged.
fn multiport_rig(mode: SimMode, pref: Preference) -> (ConsoleModel, Console) {
    let mut m = model(mode, QEMU, cm::config_bytes(0, 0, PORTS), PORTS)
        .port(0, None, true, true)
        .port(1, Some("org.test.tool"), false, true)
        .port(2, Some("log"), false, false);
    let mut c = console(&m, pref, ConsoleOptions::default());
    // DEVICE_READY → PORT_ADD ×3.
    let first = m.process().unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (first[0].id, first[0].event, first[0].value, first[0].len),
        (u32::MAX, 0, 1, 8)
    );
    let ev = events(&mut c);
    assert_eq!(
        ev,
        vec![
            ConsoleEvent::PortAdded { id: 0, name: None },
            ConsoleEvent::PortAdded { id: 1, name: None },
            ConsoleEvent::PortAdded { id: 2, name: None },
        ]
    );
    // PORT_READY acks → CONSOLE_PORT(0), PORT_OPEN(0), PORT_NAME(1), PORT_OPEN(1), PORT_NAME(2).
    let acks = m.process().unwrap();
    assert_eq!(
        acks.iter()
            .map(|g| (g.id, g.event, g.value))
            .collect::<Vec<_>>(),
        vec![
            (0, cm::PORT_READY, 1),
            (1, cm::PORT_READY, 1),
            (2, cm::PORT_READY, 1)
        ]
    );
    let ev = events(&mut c);
    let names: Vec<(u32, String)> = ev
        .iter()
        .filter_map(|e| match e {
            ConsoleEvent::PortNamed { id, name } => Some((*id, name.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec![(1, "org.test.tool".into()), (2, "log".into())]);
    assert!(ev.contains(&ConsoleEvent::ConsolePort { id: 0 }));
    assert!(ev.contains(&ConsoleEvent::HostOpened { id: 0 }));
    assert!(ev.contains(&ConsoleEvent::HostOpened { id: 1 }));
    assert!(!ev.contains(&ConsoleEvent::HostOpened { id: 2 }));
    // The console port was opened from the guest side automatically.
    let opened = m.process().unwrap();
    assert_eq!(
        opened
            .iter()
            .map(|g| (g.id, g.event, g.value))
            .collect::<Vec<_>>(),
        vec![(0, cm::PORT_OPEN, 1)]
    );
    (m, c)
}

#[test]
fn port0_without_multiport_tx_rx_and_size() {
    for (mode, pref) in MODES {
        let mut m = model(
            mode,
            F_SIZE | F_EMERG_WRITE | RING | V1,
            cm::config_bytes(80, 25, 0),
            1,
        );
        let mut c = console(&m, pref, ConsoleOptions::default());
        assert!(!c.multiport(), "{mode:?}");
        assert_eq!(c.console_size(), Some((80, 25)));
        let info = c.port_info(0).unwrap();
        assert!(info.present && info.host_open && info.guest_open);
        assert_eq!(c.write(0, b"hello, host\n"), Ok(12));
        assert_eq!(m.take_tx(0), b"hello, host\n", "{mode:?}");
        assert!(m.rx_buffers(0) >= 8);
        m.inject_rx(0, b"typed").unwrap();
        assert_eq!(read_all(&mut c, 0), b"typed");
        // Data spanning several receive buffers (1024 bytes each).
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        m.inject_rx(0, &big).unwrap();
        assert_eq!(c.rx_pending(0), Ok(3000));
        assert_eq!(c.port_info(0).unwrap().pending_rx, 3000);
        assert_eq!(read_all(&mut c, 0), big);
        // Buffers went back to the device.
        assert!(m.rx_buffers(0) >= 8);
        // SIZE: a config change reports the new size once.
        m.set_size(132, 43);
        for v in m.sim.take_interrupts() {
            let vec = match v {
                virtio_tests::sim::SimInterrupt::Msix(v) => Some(v),
                virtio_tests::sim::SimInterrupt::Intx => None,
            };
            c.handle_interrupt(vec);
        }
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::Resize {
                id: 0,
                cols: 132,
                rows: 43
            }]
        );
        assert_eq!(c.console_size(), Some((132, 43)));
        // No multiport: no control protocol.
        assert_eq!(
            c.open_port(0, true),
            Err(ConsoleError::NotNegotiated("MULTIPORT"))
        );
        assert!(
            m.sim.bad_accesses().is_empty(),
            "{:?}",
            m.sim.bad_accesses()
        );
    }
}

#[test]
fn multiport_bring_up_open_both_ways_data_and_remove() {
    for (mode, pref) in MODES {
        let (mut m, mut c) = multiport_rig(mode, pref);
        assert!(c.multiport());
        assert_eq!(c.max_ports(), PORTS);
        assert_eq!(c.find_port("org.test.tool"), Some(1));
        assert_eq!(c.find_port("log"), Some(2));
        let p0 = c.port_info(0).unwrap();
        assert!(p0.console && p0.host_open && p0.guest_open);
        let p2 = c.port_info(2).unwrap();
        assert!(p2.present && !p2.host_open && !p2.guest_open);

        // Guest opens port 1, closes it again.
        c.open_port(1, true).unwrap();
        m.process().unwrap();
        assert_eq!(m.ports[&1].guest_open, Some(true));
        assert!(c.port_info(1).unwrap().guest_open);
        c.open_port(1, false).unwrap();
        m.process().unwrap();
        assert_eq!(m.ports[&1].guest_open, Some(false));

        // Host opens and closes port 2.
        m.host_open(2, true).unwrap();
        assert_eq!(events(&mut c), vec![ConsoleEvent::HostOpened { id: 2 }]);
        m.host_open(2, false).unwrap();
        assert_eq!(events(&mut c), vec![ConsoleEvent::HostClosed { id: 2 }]);

        // Interrupts say which ports to read and that control messages arrived.
        m.sim.take_interrupts();
        m.inject_rx(1, b"ping").unwrap();
        m.host_open(2, true).unwrap();
        let mut seen = virtio_console::ConsoleInterrupt::default();
        for i in m.sim.take_interrupts() {
            let v = match i {
                virtio_tests::sim::SimInterrupt::Msix(v) => Some(v),
                virtio_tests::sim::SimInterrupt::Intx => None,
            };
            let r = c.handle_interrupt(v);
            seen.readable.0 |= r.readable.0;
            seen.control |= r.control;
        }
        assert!(
            seen.readable.contains(1) && seen.control,
            "{mode:?}: {seen:?}"
        );
        assert_eq!(read_all(&mut c, 1), b"ping");
        assert_eq!(events(&mut c), vec![ConsoleEvent::HostOpened { id: 2 }]);
        m.host_open(2, false).unwrap();
        assert_eq!(events(&mut c), vec![ConsoleEvent::HostClosed { id: 2 }]);

        // Data on each port stays on its port.
        assert_eq!(c.write(1, b"to tool"), Ok(7));
        assert_eq!(c.write(2, b"to log"), Ok(6));
        assert_eq!(c.write(0, b"console"), Ok(7));
        assert_eq!(m.take_tx(1), b"to tool");
        assert_eq!(m.take_tx(2), b"to log");
        assert_eq!(m.take_tx(0), b"console");
        m.inject_rx(1, b"from tool").unwrap();
        m.inject_rx(2, b"from host").unwrap();
        assert_eq!(read_all(&mut c, 2), b"from host");
        assert_eq!(read_all(&mut c, 1), b"from tool");
        // Ports that were never added have no buffers and refuse I/O.
        assert_eq!(m.rx_buffers(3), 0);
        assert_eq!(c.write(3, b"x"), Err(ConsoleError::NoSuchPort { id: 3 }));

        // RESIZE for the console port (spec order: cols, rows).
        m.resize(0, 100, 40).unwrap();
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::Resize {
                id: 0,
                cols: 100,
                rows: 40
            }]
        );
        assert_eq!(c.console_size(), Some((100, 40)));

        // PORT_REMOVE: unread data is dropped, the port refuses I/O, others carry on.
        m.inject_rx(2, b"never read").unwrap();
        m.remove_port(2).unwrap();
        assert_eq!(events(&mut c), vec![ConsoleEvent::PortRemoved { id: 2 }]);
        assert_eq!(c.write(2, b"x"), Err(ConsoleError::NoSuchPort { id: 2 }));
        assert_eq!(
            c.read(2, &mut [0; 4]),
            Err(ConsoleError::NoSuchPort { id: 2 })
        );
        assert_eq!(c.find_port("log"), None);
        assert_eq!(c.write(1, b"still here"), Ok(10));
        assert_eq!(m.take_tx(1), b"still here");

        // Hot-plug again (same id, new name): PORT_ADD + PORT_NAME before the driver looks
        // come out as one event with the name.
        m.ports.get_mut(&2).unwrap().name = Some("log2".into());
        m.add_port(2).unwrap();
        m.send(2, cm::PORT_NAME, 1, b"log2").unwrap();
        let ev = events(&mut c);
        assert_eq!(ev.len(), 1, "{ev:?}");
        match ev[0] {
            ConsoleEvent::PortAdded {
                id: 2,
                name: Some(n),
            } => assert_eq!(n.as_str(), "log2"),
            e => panic!("unexpected {e:?}"),
        }
        let acks = m.process().unwrap();
        assert!(
            acks.iter()
                .any(|g| (g.id, g.event, g.value) == (2, cm::PORT_READY, 1))
        );
        m.inject_rx(2, b"again").unwrap();
        assert_eq!(read_all(&mut c, 2), b"again");
        assert_eq!(c.stats().control_rejected, 0);
        assert!(
            m.sim.bad_accesses().is_empty(),
            "{:?}",
            m.sim.bad_accesses()
        );
    }
}

#[test]
fn emergency_write_before_driver_ok_and_after() {
    for (mode, pref) in MODES {
        let m = model(mode, QEMU, cm::config_bytes(0, 0, PORTS), PORTS);
        let mut c = VirtioConsole::new(cm::bus(&m.sim, pref), ConsoleOptions::default()).unwrap();
        assert!(c.has_emergency_write());
        assert!(!c.is_started());
        assert_eq!(c.emergency_write(b"early boot\n"), Ok(11));
        // Neither DRIVER_OK nor a single queue yet.
        assert_eq!(m.sim.status() & 4, 0, "{mode:?}");
        assert!(m.sim.queue_info(0).is_none_or(|q| !q.enabled));
        assert_eq!(m.emergency_bytes(), b"early boot\n", "{mode:?}");
        // Writes before start fail cleanly.
        assert_eq!(c.write(0, b"x"), Err(ConsoleError::NotStarted));
        c.start().unwrap();
        assert_ne!(m.sim.status() & 4, 0);
        // After start (legacy: config moved to offset 24 with MSI-X) it still lands.
        assert_eq!(c.emergency_write(b"panic!"), Ok(6));
        assert_eq!(m.emergency_bytes(), b"early boot\npanic!", "{mode:?}");
        assert!(
            m.sim.bad_accesses().is_empty(),
            "{:?}",
            m.sim.bad_accesses()
        );
    }
}

#[test]
fn emergency_without_emerg_write_uses_port0_with_bounded_wait() {
    for (mode, pref) in MODES {
        let mut m = model(mode, RING | V1, cm::config_bytes(0, 0, 0), 1);
        let opts = ConsoleOptions {
            tx_buffers: 2,
            tx_buffer_size: 16,
            poll_spins: 1000,
            ..Default::default()
        };
        let mut c = VirtioConsole::new(cm::bus(&m.sim, pref), opts).unwrap();
        assert!(!c.has_emergency_write());
        assert_eq!(c.emergency_write(b"x"), Err(ConsoleError::NotStarted));
        c.start().unwrap();
        assert_eq!(c.emergency_write(b"polled"), Ok(6));
        assert_eq!(m.take_tx(0), b"polled");
        // The host stops reading: the bounded wait gives up after filling both slots.
        let held = m.hold_tx(0);
        assert!(held.is_empty());
        assert_eq!(c.emergency_write(&[b'z'; 40]), Ok(32), "{mode:?}");
        assert_eq!(c.emergency_write(b"more"), Err(ConsoleError::Timeout));
        assert_eq!(m.take_tx(0), [b'z'; 32]);
        assert_eq!(c.emergency_write(b"more"), Ok(4));
        assert_eq!(m.take_tx(0), b"more");
        assert!(m.emergency_bytes().is_empty());
    }
}

#[test]
fn write_backpressure_and_order() {
    for (mode, pref) in MODES {
        let mut m = model(mode, QEMU, cm::config_bytes(0, 0, PORTS), PORTS)
            .port(0, None, true, true)
            .port(1, Some("bulk"), false, true);
        let opts = ConsoleOptions {
            tx_buffers: 4,
            tx_buffer_size: 16,
            ..Default::default()
        };
        let mut c = console(&m, pref, opts);
        m.process().unwrap();
        events(&mut c);
        let data: Vec<u8> = (0..200u8).collect();
        // Four 16-byte slots: 64 bytes fit, the rest is refused until the host reads.
        assert_eq!(c.write(1, &data), Ok(64), "{mode:?}");
        assert_eq!(c.write(1, &data[64..]), Err(ConsoleError::Busy));
        assert_eq!(c.tx_room(1), Ok(0));
        let held = m.hold_tx(1);
        assert_eq!(held.len(), 4);
        assert_eq!(c.write(1, &data[64..]), Err(ConsoleError::Busy));
        let chains: Vec<_> = held.iter().map(|(ch, _)| ch.clone()).collect();
        let mut got: Vec<u8> = held.into_iter().flat_map(|(_, b)| b).collect();
        m.complete_tx(1, &chains);
        assert_eq!(c.tx_room(1), Ok(64));
        let mut off = 64;
        while off < data.len() {
            let n = c.write(1, &data[off..]).unwrap();
            off += n;
            got.extend(m.take_tx(1));
        }
        assert_eq!(got, data, "{mode:?}");
        // Other ports were never affected.
        assert_eq!(c.write(0, b"ok"), Ok(2));
        assert_eq!(m.take_tx(0), b"ok");
        assert!(c.stats().tx_busy >= 2);
    }
}

#[test]
fn hostile_control_messages_are_rejected_without_disturbing_ports() {
    for (mode, pref) in MODES {
        let (mut m, mut c) = multiport_rig(mode, pref);
        let reject = |c: &mut Console| -> Vec<ControlError> {
            events(c)
                .into_iter()
                .map(|e| match e {
                    ConsoleEvent::Rejected { error, .. } => error,
                    e => panic!("expected a rejection, got {e:?}"),
                })
                .collect()
        };
        // id 999 (beyond max_nr_ports 31).
        m.send(999, cm::PORT_ADD, 0, &[]).unwrap();
        m.send(999, cm::PORT_OPEN, 1, &[]).unwrap();
        assert_eq!(
            reject(&mut c),
            vec![
                ControlError::IdOutOfRange { id: 999 },
                ControlError::IdOutOfRange { id: 999 }
            ]
        );
        // A name of 300 bytes (the device truncates it to the 256-byte buffer).
        m.add_port(5).unwrap();
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::PortAdded { id: 5, name: None }]
        );
        m.send(5, cm::PORT_NAME, 1, &[b'n'; 300]).unwrap();
        assert_eq!(
            reject(&mut c),
            vec![ControlError::BadName(NameError::TooLong { len: 248 })]
        );
        // Invalid UTF-8, a control character.
        m.send(5, cm::PORT_NAME, 1, &[b'a', 0xFF, 0xFE]).unwrap();
        m.send(5, cm::PORT_NAME, 1, b"evil\x1b[2J").unwrap();
        assert_eq!(
            reject(&mut c),
            vec![
                ControlError::BadName(NameError::NotUtf8),
                ControlError::BadName(NameError::ControlCharacter)
            ]
        );
        // Messages cut short: the control queue's used length is not read (QEMU reports
        // more than fits), so what the device did not write reads as the zeros the buffer
        // was posted with, and is validated like the rest: an event 42, a PORT_OPEN 7, a
        // 3-byte header (event 0, DEVICE_READY), nothing at all with a used length of 300.
        m.send_raw(&[1, 0, 0, 0, 42], None).unwrap();
        m.send_raw(&[1, 0, 0, 0, 6, 0, 7], None).unwrap();
        m.send_raw(&[1, 0, 0], None).unwrap();
        m.send_raw(&[], Some(300)).unwrap();
        assert_eq!(
            reject(&mut c),
            vec![
                ControlError::UnknownEvent { event: 42 },
                ControlError::BadOpenValue { value: 7 },
                ControlError::WrongDirection { event: 0 },
                ControlError::WrongDirection { event: 0 },
            ]
        );
        // Unknown event, wrong direction, bad open value.
        m.send(1, 42, 0, &[]).unwrap();
        m.send(1, cm::DEVICE_READY, 1, &[]).unwrap();
        m.send(1, cm::PORT_READY, 1, &[]).unwrap();
        m.send(1, cm::PORT_OPEN, 7, &[]).unwrap();
        assert_eq!(
            reject(&mut c),
            vec![
                ControlError::UnknownEvent { event: 42 },
                ControlError::WrongDirection { event: 0 },
                ControlError::WrongDirection { event: 3 },
                ControlError::BadOpenValue { value: 7 },
            ]
        );
        // Duplicate PORT_ADD, duplicate name, messages for ports never added.
        m.send(1, cm::PORT_ADD, 0, &[]).unwrap();
        m.send(1, cm::PORT_NAME, 1, b"hijack").unwrap();
        m.send(7, cm::PORT_OPEN, 1, &[]).unwrap();
        m.send(7, cm::PORT_REMOVE, 0, &[]).unwrap();
        assert_eq!(
            reject(&mut c),
            vec![
                ControlError::DuplicateAdd { id: 1 },
                ControlError::DuplicateName { id: 1 },
                ControlError::NoSuchPort {
                    id: 7,
                    event: cm::PORT_OPEN
                },
                ControlError::NoSuchPort {
                    id: 7,
                    event: cm::PORT_REMOVE
                },
            ]
        );
        assert_eq!(c.stats().control_rejected, 17);
        // The driver answered none of them (only port 5's PORT_READY went out).
        let sent = m.process().unwrap();
        assert_eq!(
            sent.iter()
                .map(|g| (g.id, g.event, g.value))
                .collect::<Vec<_>>(),
            vec![(5, cm::PORT_READY, 1)]
        );
        // Nothing else changed: names, open state, data flow.
        assert_eq!(c.find_port("org.test.tool"), Some(1));
        assert_eq!(c.port_info(5).unwrap().name, None);
        assert!(c.port_info(1).unwrap().host_open);
        assert!(!c.port_info(7).unwrap().present);
        assert_eq!(c.write(1, b"fine"), Ok(4));
        assert_eq!(m.take_tx(1), b"fine");
        m.inject_rx(1, b"also fine").unwrap();
        assert_eq!(read_all(&mut c, 1), b"also fine");
        // The control queue keeps working: a good name for port 5 is still accepted.
        m.send(5, cm::PORT_NAME, 1, b"late").unwrap();
        let ev = events(&mut c);
        assert!(
            matches!(ev.as_slice(), [ConsoleEvent::PortNamed { id: 5, name }] if name.as_str() == "late")
        );
        assert!(
            m.sim.bad_accesses().is_empty(),
            "{:?}",
            m.sim.bad_accesses()
        );
    }
}

#[test]
fn ports_beyond_the_driver_limit_are_refused_with_port_ready_0() {
    for (mode, pref) in MODES {
        let mut m =
            model(mode, QEMU, cm::config_bytes(0, 0, PORTS), PORTS).port(0, None, true, true);
        let opts = ConsoleOptions {
            max_ports: 4,
            ..Default::default()
        };
        let mut c = console(&m, pref, opts);
        assert_eq!(c.max_ports(), 4);
        m.process().unwrap();
        events(&mut c);
        m.process().unwrap();
        events(&mut c);
        m.add_port(9).unwrap();
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::Rejected {
                id: 9,
                error: ControlError::IdBeyondDriverLimit { id: 9 }
            }]
        );
        let sent = m.process().unwrap();
        assert!(
            sent.iter()
                .any(|g| (g.id, g.event, g.value) == (9, cm::PORT_READY, 0)),
            "{sent:?}"
        );
        // Queues beyond the limit were never set up.
        assert!(m.sim.queue_info(cm::rx_queue(4)).is_none_or(|q| !q.enabled));
        assert!(m.sim.queue_info(cm::tx_queue(3)).is_some_and(|q| q.enabled));
    }
}

#[test]
fn hostile_used_lengths_and_tokens() {
    for (mode, pref) in MODES {
        let (mut m, mut c) = multiport_rig(mode, pref);
        // A receive completion longer than the buffer breaks that port's queue only.
        m.rx_buffers(1);
        let q = cm::rx_queue(1);
        m.sim.complete_raw(q, 0, 5000);
        let mut buf = [0u8; 8];
        assert!(matches!(c.read(1, &mut buf), Err(ConsoleError::Core(_))));
        // Port 0 and the control queue are unaffected.
        assert_eq!(c.write(0, b"ok"), Ok(2));
        assert_eq!(m.take_tx(0), b"ok");
        m.resize(0, 1, 2).unwrap();
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::Resize {
                id: 0,
                cols: 1,
                rows: 2
            }]
        );
    }
}

/// A control receive completion the bus refuses (a used id out of range) breaks the control
/// queue: the error is kept (`control_error`), the iterators yield what was already queued
/// and then nothing, and nothing is processed again (no log per call) until a new driver.
#[test]
fn a_broken_control_queue_is_reported_not_swallowed() {
    for (mode, pref) in MODES {
        let (mut m, mut c) = multiport_rig(mode, pref);
        assert_eq!(c.control_error(), None);
        m.resize(0, 3, 4).unwrap();
        m.sim.complete_raw(cm::CONTROL_RX, 0xffff, 8);
        m.sim.signal_used(cm::CONTROL_RX);
        // The resize queued before the broken completion still comes out.
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::Resize {
                id: 0,
                cols: 3,
                rows: 4
            }]
        );
        assert!(
            matches!(c.control_error(), Some(ConsoleError::Core(_))),
            "{mode:?}: {:?}",
            c.control_error()
        );
        // Later messages go unheard, by both iterators; the error stays.
        m.add_port(3).unwrap();
        assert_eq!(events(&mut c), vec![]);
        assert_eq!(c.next_event(), None);
        assert!(c.control_error().is_some());
        // The data queues still work.
        assert_eq!(c.write(0, b"ok"), Ok(2));
        assert_eq!(m.take_tx(0), b"ok");
    }
}

/// QEMU completes a control buffer with the whole message's length however much of it fit
/// (`send_control_msg`): a PORT_NAME of 300 characters arrives with used length 309 in a
/// 256-byte buffer. The name is refused as too long; the control queue is not broken.
#[test]
fn a_control_message_longer_than_its_buffer_is_refused_not_a_fault() {
    for (mode, pref) in MODES {
        let (mut m, mut c) = multiport_rig(mode, pref);
        m.add_port(5).unwrap();
        assert_eq!(
            events(&mut c),
            vec![ConsoleEvent::PortAdded { id: 5, name: None }]
        );
        m.send_name(5, &"n".repeat(300)).unwrap();
        m.send_name(5, "org.qemu.guest_agent.0").unwrap();
        let evs = events(&mut c);
        assert_eq!(c.control_error(), None, "{mode:?}");
        assert!(
            matches!(
                evs.as_slice(),
                [
                    ConsoleEvent::Rejected {
                        id: 5,
                        error: ControlError::BadName(NameError::TooLong { len: 248 })
                    },
                    ConsoleEvent::PortNamed { id: 5, name }
                ] if name.as_str() == "org.qemu.guest_agent.0"
            ),
            "{mode:?}: {evs:?}"
        );
        assert_eq!(c.find_port("org.qemu.guest_agent.0"), Some(5));
    }
}

#[test]
fn hostile_config_values_degrade_gracefully() {
    for (mode, pref) in MODES {
        // MULTIPORT with max_nr_ports 0: renegotiated without MULTIPORT, port 0 works.
        let mut m = model(mode, QEMU, cm::config_bytes(0, 0, 0), PORTS);
        let mut c = console(&m, pref, ConsoleOptions::default());
        assert!(!c.multiport(), "{mode:?}");
        assert!(c.has_emergency_write());
        assert_eq!(m.sim.driver_features() & F_MULTIPORT, 0);
        assert_eq!(c.write(0, b"single"), Ok(6));
        assert_eq!(m.take_tx(0), b"single");
        drop(c);

        // MULTIPORT without control queues (2 queues only): same.
        let mut m = model(mode, QEMU, cm::config_bytes(0, 0, 31), 0);
        let mut c = console(&m, pref, ConsoleOptions::default());
        assert!(!c.multiport(), "{mode:?}");
        assert_eq!(c.write(0, b"x"), Ok(1));
        assert_eq!(m.take_tx(0), b"x");
        drop(c);

        // max_nr_ports 31 but queues for 3 ports only: the driver serves 3.
        let m = model(mode, QEMU, cm::config_bytes(0, 0, 31), 3);
        let c = console(&m, pref, ConsoleOptions::default());
        assert!(c.multiport());
        assert_eq!(c.max_ports(), 3, "{mode:?}");
        assert_eq!(c.device_config().max_nr_ports, Some(31));
    }
}

/// Issue 14, bug 5: `start` failing after `setup_queues` (here: each allocation in turn
/// fails) leaked the receive region allocated before the failing one (and the control
/// queue's), and left the device live with its rings. Now every failure resets the device
/// and frees everything `start` allocated.
#[test]
fn start_failing_at_any_allocation_frees_everything_and_resets() {
    for features in [QEMU, RING | V1] {
        for (mode, pref) in MODES {
            let mut succeeded = false;
            for allowed in 0..64 {
                let m = model(mode, features, cm::config_bytes(0, 0, 2), 2);
                let mem = m.sim.memory();
                let mut c = VirtioConsole::new(cm::bus(&m.sim, pref), ConsoleOptions::default())
                    .expect("console new");
                let before = mem.free_bytes();
                mem.fail_allocations_after(Some(allowed));
                let res = c.start();
                mem.fail_allocations_after(None);
                if res.is_ok() {
                    succeeded = true;
                    break;
                }
                assert_eq!(
                    mem.free_bytes(),
                    before,
                    "{mode:?}/{pref:?} features {features:#x}: leak when allocation {allowed} fails"
                );
                assert_eq!(m.sim.status() & 4, 0, "not DRIVER_OK");
                assert!(!c.is_started());
                drop(c);
                assert_eq!(mem.free_bytes(), before);
            }
            assert!(succeeded);
        }
    }
}

/// Issue 14 (found by the `console` fuzz target): a device that answers every repost of
/// the control receive buffers at once with another message kept `poll_events` yielding
/// forever (each event drained made it process the control queue again, whose repost the
/// device answered at once). Now one iteration handles at most one control message per
/// receive buffer. The flood stops after `FLOOD_ROUNDS` notifications so a regression
/// fails instead of hanging.
#[test]
fn control_flood_does_not_keep_poll_events_going() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const FLOOD_ROUNDS: usize = 10_000;
    for (mode, pref) in MODES {
        // Without EVENT_IDX every repost is kicked (the model does not move avail_event).
        let mut m = model(mode, QEMU & !(1 << 29), cm::config_bytes(0, 0, 1), 1);
        let mut c = console(&m, pref, ConsoleOptions::default());
        m.process().unwrap();
        let rounds = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&rounds);
        // A RESIZE for port 0 in every buffer, as soon as the driver posts it.
        let msg = cm::control_bytes(0, cm::RESIZE, 0, &[80, 0, 25, 0]);
        m.sim.on_notify(Some(Arc::new(move |sim, queue| {
            if queue == cm::CONTROL_RX && seen.fetch_add(1, Ordering::Relaxed) < FLOOD_ROUNDS {
                sim.serve(queue, |chain| sim.write_chain(chain, &msg));
            }
        })));
        // Start the flood: fill every buffer posted now.
        while m.resize(0, 80, 25).is_ok() {}
        let buffers = usize::from(ConsoleOptions::default().control_buffers);
        for _ in 0..3 {
            let n = c.poll_events().count();
            assert!(
                n > 0 && n <= 2 * buffers,
                "{mode:?}/{pref:?}: {n} events from one poll_events"
            );
        }
        m.sim.on_notify(None);
        assert!(rounds.load(Ordering::Relaxed) <= 3, "{mode:?}/{pref:?}");
        assert!(m.sim.bad_accesses().is_empty());
    }
}
