//! virtio-console over the simulated function with `ConsoleModel` as the device side and a
//! device the fuzzer drives: `cols`/`rows` and any config bytes (with config interrupts),
//! `max_nr_ports` of any value with queues for fewer ports, SIZE / MULTIPORT / EMERG_WRITE
//! on or off, control messages (PORT_ADD/REMOVE/NAME/OPEN, CONSOLE_PORT, RESIZE, driver-only
//! and unknown events) with any id, value, payload and truncation, completed with any used
//! length (zero included), QEMU-like answers to the driver's control messages, received data
//! honest or with any used length, transmit chains completed, held back and completed
//! twice, forged used ids on every queue, floods (the device answering every notification
//! at once), NEEDS_RESET; the driver writes, reads, polls events, opens ports, takes
//! interrupts and uses the emergency path before and after `start`.
//!
//! Oracles: no transmit slot comes back twice (`tx_room` never exceeds the port's
//! capacity) and, once an honest device has completed everything, every slot is back
//! (`tx_room` equals the capacity again); one `read` copies at most the caller's buffer and
//! `rx_pending` never exceeds the posted buffers; one `poll_events` ends after a bounded
//! number of events even while the device floods; `emergency_write` reports at most the
//! bytes given; after `shutdown` and drop, guest memory is back to what it was.

use std::sync::{Arc, Mutex};

use virtio_console::{ConsoleEvent, ConsoleOptions, VirtioConsole};
use virtio_pci::Preference;
use virtio_tests::console_model::{
    self as cm, CONTROL_RX, ConsoleModel, F_EMERG_WRITE, F_MULTIPORT, F_SIZE,
};
use virtio_tests::sim::{Chain, MODES, Sim, SimBuilder, SimInterrupt, SimMode};

use crate::input::Input;
use crate::{FLOOD_LIMIT, check_flood_bound};

const MAX_STEPS: usize = 192;

/// What a flooding device does on every notification.
#[derive(Default)]
struct Flood {
    /// Answer each CONTROL_RX notification by filling every posted buffer with this message
    /// (and used length, `None`: the bytes written).
    control: Option<(Vec<u8>, Option<u32>)>,
    /// Answer each receive notification by completing every buffer with this length.
    rx: Option<u32>,
    /// Complete every transmit chain as soon as it is notified.
    tx: bool,
    /// Notifications answered during the current driver call.
    answered: usize,
}

fn ready(sim: &Sim, queue: u16) -> bool {
    sim.queue_info(queue).is_some_and(|q| q.ready)
}

fn install_flood(sim: &Sim, flood: &Arc<Mutex<Flood>>) {
    let flood = Arc::clone(flood);
    sim.on_notify(Some(Arc::new(move |sim: &Sim, queue: u16| {
        let Ok(mut f) = flood.lock() else { return };
        if f.answered >= FLOOD_LIMIT {
            return;
        }
        let is_tx = queue == 1 || (queue >= 3 && queue % 2 == 1);
        let answer = if queue == CONTROL_RX {
            f.control.is_some()
        } else if is_tx {
            f.tx
        } else {
            f.rx.is_some()
        };
        if !answer {
            return;
        }
        f.answered += 1;
        let chains = sim.pop_chains(queue);
        for c in &chains {
            if queue == CONTROL_RX {
                if let Some((msg, len)) = &f.control {
                    let n = sim.write_chain(c, msg);
                    sim.complete(queue, c.head, len.unwrap_or(n));
                }
            } else if is_tx {
                sim.complete(queue, c.head, 0);
            } else if let Some(len) = f.rx {
                sim.write_chain(c, &[0x5A; 64]);
                sim.complete(queue, c.head, len);
            }
        }
        if !chains.is_empty() {
            sim.signal_used(queue);
        }
    })));
}

/// A control message of fuzzer-chosen shape: mostly well-formed events for small ids,
/// sometimes raw bytes.
fn control_message(input: &mut Input, nports: u32) -> Vec<u8> {
    let id = match input.u8() % 4 {
        0 => input.u32(),
        1 => nports + u32::from(input.u8() % 4),
        _ => u32::from(input.u8()) % (nports + 1),
    };
    let event = match input.u8() % 10 {
        9 => input.u16(),
        e => u16::from(e),
    };
    let value = match input.u8() % 4 {
        0 => input.u16(),
        v => u16::from(v & 1),
    };
    let payload = match event {
        cm::RESIZE => input.take(4).to_vec(),
        cm::PORT_NAME => {
            let len = usize::from(input.u8());
            if input.bool() {
                input.take(len).to_vec()
            } else {
                b"org.fuzz.port".iter().copied().take(len).collect()
            }
        }
        _ => Vec::new(),
    };
    let mut bytes = cm::control_bytes(id, event, value, &payload);
    if input.u8().is_multiple_of(8) {
        // Truncated anywhere, the header included.
        bytes.truncate(usize::from(input.u8()) % (bytes.len() + 1));
    }
    bytes
}

/// A used length: mostly honest (`None`), sometimes anything.
fn used_len(input: &mut Input) -> Option<u32> {
    match input.u8() % 8 {
        0 => Some(0),
        1 => Some(input.u32()),
        2 => Some(u32::from(input.u16() % 512)),
        _ => None,
    }
}

/// Bytes a port's transmit slots hold: `min(tx_buffers, ring size)` slots of
/// `tx_buffer_size` (the sizes chosen below are within the driver's clamp).
fn tx_capacity(sim: &Sim, port: u32, opts: &ConsoleOptions) -> usize {
    let ring = sim.queue_info(cm::tx_queue(port)).map_or(0, |q| q.size);
    usize::from(opts.tx_buffers.min(ring).max(1)) * opts.tx_buffer_size as usize
}

/// The device as the fuzzer builds it (shared with the kext target, which uses the same
/// bytes and ignores `opts`): the function, its model with ports, and the driver options.
pub(crate) struct ConsoleSetup {
    pub(crate) sim: Sim,
    pub(crate) preference: Preference,
    pub(crate) model: ConsoleModel,
    pub(crate) opts: ConsoleOptions,
    /// Ports the function has queues for.
    pub(crate) queue_ports: u32,
}

pub(crate) fn setup(input: &mut Input) -> ConsoleSetup {
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let choice = input.u8();
    let mut features = 0;
    for (i, bit) in [F_SIZE, F_MULTIPORT, F_EMERG_WRITE, 1 << 28, 1 << 29]
        .into_iter()
        .enumerate()
    {
        if choice & (1 << i) != 0 {
            features |= bit;
        }
    }
    features |= crate::packed_if(choice & (1 << 5) != 0);
    if mode != SimMode::Legacy {
        features |= 1 << 32;
    }
    // Queues for 1..=3 ports; `max_nr_ports` may say anything.
    let queue_ports = 1 + u32::from(input.u8() % 3);
    let max_nr_ports = match input.u8() % 4 {
        0 => input.u32(),
        _ => u32::from(input.u8() % 5),
    };
    let cols = input.u16();
    let rows = input.u16();
    let queue_size = 1u16 << (input.u8() % 5);
    let opts = ConsoleOptions {
        max_ports: 1 + u32::from(input.u8() % 4),
        queue_size: if input.bool() { 0 } else { queue_size },
        rx_buffers: 1 + u16::from(input.u8() % 4),
        rx_buffer_size: 16 << (input.u8() % 5),
        tx_buffers: 1 + u16::from(input.u8() % 4),
        tx_buffer_size: 16 << (input.u8() % 5),
        control_buffers: 1 + u16::from(input.u8() % 8),
        poll_spins: 64,
        auto_open_console: input.bool(),
        ..ConsoleOptions::default()
    };
    let sim = SimBuilder::new(mode, 3)
        .features(features)
        .queues(&cm::queue_sizes(queue_ports, queue_size))
        .device_config(&cm::config_bytes(cols, rows, max_nr_ports))
        .memory(crate::mem::guest_memory(1 << 20))
        .build();
    let mut model = ConsoleModel::new(&sim);
    for id in 0..queue_ports + 1 {
        let name = match input.u8() % 3 {
            0 => None,
            1 => Some("org.fuzz.port"),
            _ => Some("console\u{0}"),
        };
        let flags = input.u8();
        model = model.port(id, name, flags & 1 != 0, flags & 2 != 0);
    }
    model.auto = input.bool();
    ConsoleSetup {
        sim,
        preference,
        model,
        opts,
        queue_ports,
    }
}

/// The console's size, or any configuration bytes, changed.
pub(crate) fn change_config(model: &mut ConsoleModel, sim: &Sim, input: &mut Input) {
    if input.bool() {
        model.set_size(input.u16(), input.u16());
    } else {
        let offset = usize::from(input.u8() % 12);
        let len = usize::from(input.u8() % 8);
        sim.set_device_config(offset, input.take(len));
        sim.raise_config_interrupt();
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let ConsoleSetup {
        sim,
        preference,
        mut model,
        opts,
        queue_ports,
    } = setup(&mut input);
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(bus) = crate::sim_device(&sim, preference) else {
        return;
    };
    let Ok(mut console) = VirtioConsole::new(bus, opts) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let nports = console.max_ports();
    // Emergency output before the queues exist, then (usually) start.
    if input.bool() {
        let len = usize::from(input.u8() % 16);
        let bytes = input.take(len).to_vec();
        if let Ok(n) = console.emergency_write(&bytes) {
            assert!(n <= bytes.len(), "emergency_write reported more than given");
        }
    }
    if !input.u8().is_multiple_of(8) && console.start().is_err() {
        assert!(!console.is_started());
    }

    let flood = Arc::new(Mutex::new(Flood::default()));
    install_flood(&sim, &flood);
    let mut held: Vec<(u32, Chain)> = Vec::new();
    // Whether the device stayed honest on the transmit side (for the final oracle).
    let mut honest_tx = true;
    let rx_limit = usize::from(opts.rx_buffers) * (opts.rx_buffer_size as usize);

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        if let Ok(mut f) = flood.lock() {
            f.answered = 0;
        }
        let port = u32::from(input.u8()) % (nports + 1);
        match input.u8() % 20 {
            0 | 1 => {
                let len = usize::from(input.u16() % 600);
                let data = vec![0xC3u8; len];
                if let Ok(n) = console.write(port, &data) {
                    assert!(n <= len, "write accepted more than given");
                }
            }
            2 | 3 => {
                let mut out = vec![0u8; 1 + usize::from(input.u16() % 600)];
                if let Ok(n) = console.read(port, &mut out) {
                    assert!(n <= out.len(), "read past the caller's buffer");
                }
                if let Ok(n) = console.rx_pending(port) {
                    assert!(n <= rx_limit, "{n} bytes pending, more than posted");
                }
            }
            4 => {
                if let Ok(room) = console.tx_room(port) {
                    assert!(
                        room <= tx_capacity(&sim, port, &opts),
                        "transmit slot returned twice: room {room}"
                    );
                }
            }
            5 | 6 => {
                // Events, bounded even while the device floods the control queue.
                let bound = 8 * (nports as usize + 8) + 64;
                let mut n = 0;
                for ev in console.poll_events() {
                    n += 1;
                    assert!(n <= bound, "poll_events does not end (device flood)");
                    if let ConsoleEvent::PortAdded { id, .. } = ev {
                        assert!(id < nports, "port {id} added beyond the driver's limit");
                    }
                }
            }
            7 => {
                let bytes = control_message(&mut input, nports);
                let len = used_len(&mut input);
                let _ = model.send_raw(&bytes, len);
            }
            8 => {
                let _ = model.process();
            }
            9 => {
                let len = usize::from(input.u16() % 1024);
                let data = input.take(len).to_vec();
                let _ = model.inject_rx(port, &data);
            }
            10 => {
                // Receive buffers completed with any used length.
                let q = cm::rx_queue(port);
                let len = input.u32() % 1024;
                for c in sim.pop_chains(q) {
                    sim.complete(q, c.head, len);
                }
                sim.signal_used(q);
            }
            11 => {
                if input.bool() {
                    let _ = model.take_tx(port);
                } else {
                    for (c, _) in model.hold_tx(port) {
                        held.push((port, c));
                    }
                }
            }
            12 => {
                // Held transmit chains completed, possibly a second time.
                let twice = input.bool();
                let chains: Vec<(u32, Chain)> = if twice {
                    held.clone()
                } else {
                    std::mem::take(&mut held)
                };
                honest_tx &= !twice || chains.is_empty();
                for (p, c) in chains {
                    model.complete_tx(p, &[c]);
                }
            }
            13 => {
                // A forged used element on any queue.
                let q = u16::from(input.u8()) % (2 * queue_ports as u16 + 2);
                if ready(&sim, q) {
                    if q == 1 || (q >= 3 && q % 2 == 1) {
                        honest_tx = false;
                    }
                    sim.complete_raw(q, input.u32() % 64, input.u32() % 2048);
                    sim.signal_used(q);
                }
            }
            14 => change_config(&mut model, &sim, &mut input),
            15 | 16 => {
                for irq in sim.take_interrupts() {
                    let vector = match irq {
                        SimInterrupt::Msix(v) => Some(v),
                        SimInterrupt::Intx => None,
                    };
                    let _ = console.handle_interrupt(vector);
                }
            }
            17 => {
                let len = usize::from(input.u8() % 64);
                let bytes = input.take(len).to_vec();
                if let Ok(n) = console.emergency_write(&bytes) {
                    assert!(n <= bytes.len(), "emergency_write reported more than given");
                }
            }
            18 => {
                let _ = console.open_port(port, input.bool());
            }
            _ => {
                if let Ok(mut f) = flood.lock() {
                    match input.u8() % 5 {
                        0 => {
                            let msg = control_message(&mut input, nports);
                            f.control = Some((msg, used_len(&mut input)));
                        }
                        1 => f.rx = Some(input.u32() % 2048),
                        2 => f.tx = !f.tx,
                        3 => *f = Flood::default(),
                        _ => {
                            drop(f);
                            sim.trigger_needs_reset();
                        }
                    }
                }
            }
        }
        if let Ok(f) = flood.lock() {
            check_flood_bound(f.answered, "notified the device");
        }
    }

    // An honest device completes everything it holds: every transmit slot comes back.
    sim.on_notify(None);
    if honest_tx && console.is_started() {
        for (p, c) in std::mem::take(&mut held) {
            model.complete_tx(p, &[c]);
        }
        for port in 0..nports {
            let _ = model.take_tx(port);
            if let Ok(room) = console.tx_room(port) {
                assert_eq!(
                    room,
                    tx_capacity(&sim, port, &opts),
                    "port {port}: transmit slots lost"
                );
            }
        }
    }
    console.shutdown();
    drop(console);
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}
