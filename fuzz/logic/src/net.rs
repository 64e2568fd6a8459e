//! virtio-net over the simulated function with a device side the fuzzer drives: frames with
//! any 12-byte header (`num_buffers`, `gso_type`/`gso_size`/`hdr_len`, DATA_VALID and
//! unknown flags; the legacy 10-byte header on a legacy device without MRG_RXBUF), raw
//! receive buffers with any used length, forged and repeated completions on both queues,
//! transmit completions held back, config bytes (status, MTU, speed), NEEDS_RESET, and
//! floods: every receive notification (the driver's refill kick) answered at once by
//! filling and completing every posted buffer with the same bytes (a bad frame or a good
//! one) and any used length, every transmit notification by completing the chains; buffers
//! rewritten by the device after it returned them, while the driver hands the frame out; the
//! driver transmits, reclaims, polls with fuzzer-chosen budgets and uses the debugger path.
//!
//! Oracles: every transmitted token comes back exactly once, from `tx_reclaim` or from
//! `shutdown`; one `rx_poll` handles at most `budget` frames (delivered + dropped) and one
//! `tx_reclaim` at most the frames in flight, and one call notifies a flooding device a
//! bounded number of times (bounded work); a delivered frame fits the receive buffers, and
//! neither its description nor its copied length changes when the device rewrites them;
//! after `shutdown` and drop, guest memory is back to what it was.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use virtio_core::Segment;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_net::{NetConfig, TxOffload, VirtioNet, features as f};
use virtio_pci::Preference;
use virtio_tests::net_model::{NetModel, RX, TX, config_bytes};
use virtio_tests::sim::{MODES, Sim, SimBuilder, SimInterrupt};

use crate::input::Input;
use crate::{FLOOD_LIMIT, check_flood_bound};

const MAX_STEPS: usize = 256;
const BUFFER_BYTES: usize = 16 * 1024;
const DEBUG_SPINS: u32 = 64;

/// What a flooding device does on every notification.
#[derive(Default)]
struct Flood {
    /// Answer each receive notification by writing these bytes (virtio-net header and
    /// frame) into every posted buffer and completing it with this used length.
    rx: Option<(Vec<u8>, u32)>,
    /// Complete every transmit chain as soon as it is notified.
    tx: bool,
    /// Notifications answered during the current driver call.
    answered: usize,
}

fn install_flood(sim: &Sim, flood: &Arc<Mutex<Flood>>) {
    let flood = Arc::clone(flood);
    sim.on_notify(Some(Arc::new(move |sim: &Sim, queue: u16| {
        let Ok(mut f) = flood.lock() else { return };
        if f.answered >= FLOOD_LIMIT || (queue == RX && f.rx.is_none()) || (queue == TX && !f.tx) {
            return;
        }
        f.answered += 1;
        let chains = sim.pop_chains(queue);
        for c in &chains {
            match &f.rx {
                Some((bytes, len)) if queue == RX => {
                    sim.write_chain(c, bytes);
                    sim.complete(queue, c.head, *len);
                }
                _ => sim.complete(queue, c.head, 0),
            }
        }
        if !chains.is_empty() {
            sim.signal_used(queue);
        }
    })));
}

/// The simulated NIC a net input describes, shared with the `kext` target.
pub(crate) struct NetSetup {
    pub(crate) sim: Sim,
    pub(crate) preference: Preference,
    pub(crate) rx_size: u16,
    pub(crate) tx_size: u16,
}

/// Decodes the device: transport, offered features, ring sizes, MTU and status fields.
pub(crate) fn setup(input: &mut Input) -> NetSetup {
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let optional = [
        f::MRG_RXBUF,
        f::CSUM,
        f::GUEST_CSUM,
        f::MTU,
        f::MAC,
        f::GUEST_TSO4,
        f::GUEST_TSO6,
        f::GUEST_ECN,
        f::GUEST_UFO,
        f::HOST_TSO4,
        f::STATUS,
        1 << 28, // INDIRECT_DESC
        1 << 29, // EVENT_IDX
    ];
    let chosen = input.u16();
    let mut offered = optional
        .iter()
        .enumerate()
        .filter(|(i, _)| chosen & (1 << i) != 0)
        .fold(0, |acc, (_, bit)| acc | bit);
    if mode != virtio_tests::sim::SimMode::Legacy {
        offered |= 1 << 32;
    }
    // The 13 bits above pick from the list; bit 13 offers the packed ring.
    offered |= crate::packed_if(chosen & (1 << 13) != 0);
    let rx_size = 1u16 << (input.u8() % 7);
    let tx_size = 1u16 << (input.u8() % 7);
    let mtu = input.u16();
    let status = input.u16();
    let sim = SimBuilder::new(mode, 1)
        .features(offered)
        .queues(&[rx_size, tx_size])
        .device_config(&config_bytes(
            [0x52, 0x54, 0, 1, 2, 3],
            status,
            mtu,
            1000,
            1,
        ))
        .memory(crate::mem::guest_memory(8 << 20))
        .build();
    NetSetup {
        sim,
        preference,
        rx_size,
        tx_size,
    }
}

/// A received frame with any header (the model fills receive buffers with it as the
/// device would).
pub(crate) fn inject_frame(model: &mut NetModel, input: &mut Input) {
    let header = pad::<12>(input.take(12));
    let len = usize::from(input.u16() % 2048);
    let payload = input.take(len).to_vec();
    let _ = model.inject_rx(header, &payload);
}

/// Raw receive buffers: any bytes, any used length.
pub(crate) fn inject_raw(model: &mut NetModel, input: &mut Input) {
    let raw: Vec<(Vec<u8>, u32)> = (0..1 + input.u8() % 4)
        .map(|_| {
            let len = usize::from(input.u8());
            (input.take(len).to_vec(), input.u32() % 70_000)
        })
        .collect();
    let _ = model.inject_rx_raw(&raw);
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let NetSetup {
        sim,
        preference,
        rx_size,
        tx_size,
    } = setup(&mut input);
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(bus) = crate::sim_device(&sim, preference) else {
        return;
    };
    let config = NetConfig {
        ctrl_spins: 64,
        ..NetConfig::default()
    };
    let Ok(mut driver) = VirtioNet::new(bus, config) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let mut model = NetModel::new(&sim);
    let flood = Arc::new(Mutex::new(Flood::default()));
    install_flood(&sim, &flood);
    let buffers = mem.alloc_buffer(BUFFER_BYTES);
    let mut in_flight: HashSet<usize> = HashSet::new();
    let mut next_token = 0usize;
    let complete = |in_flight: &mut HashSet<usize>, token: usize| {
        assert!(
            in_flight.remove(&token),
            "transmit token {token} completed twice or never sent"
        );
    };

    let mut copy = vec![0u8; 70_000];
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        if let Ok(mut f) = flood.lock() {
            f.answered = 0;
        }
        match input.u8() % 15 {
            0..=2 => {
                let token = next_token;
                next_token += 1;
                let frame = segments(&mut input, &buffers);
                if driver
                    .transmit(&frame, &TxOffload::default(), token)
                    .is_ok()
                {
                    in_flight.insert(token);
                }
            }
            3 => {
                let before = in_flight.len();
                if let Ok(reclaim) = driver.tx_reclaim(|token| complete(&mut in_flight, token)) {
                    assert!(reclaim.frames <= before, "reclaimed more than in flight");
                }
            }
            4 => {
                if input.bool() {
                    model.take_tx();
                } else {
                    let _held = model.hold_tx();
                }
            }
            5 => {
                let queue = if input.bool() { RX } else { TX };
                let size = if queue == RX { rx_size } else { tx_size };
                sim.complete_raw(queue, input.u32() % (u32::from(size) * 2 + 1), input.u32());
                sim.signal_used(queue);
            }
            6 | 7 => inject_frame(&mut model, &mut input),
            8 => inject_raw(&mut model, &mut input),
            9 | 10 => {
                for irq in sim.take_interrupts() {
                    let vector = match irq {
                        SimInterrupt::Msix(v) => Some(v),
                        SimInterrupt::Intx => None,
                    };
                    driver.handle_interrupt(vector);
                }
                let budget = 1 + usize::from(input.u8() % 64);
                // The device rewrites each returned buffer with this byte while the driver
                // hands the frame out (§2.7.14 forbids it; a hostile device can).
                let rewrite = input.u8().is_multiple_of(4).then(|| input.u8());
                let mut delivered = 0;
                if let Ok(summary) = driver.rx_poll(budget, |frame| {
                    delivered += 1;
                    let info = *frame.info();
                    if let Some(byte) = rewrite {
                        let spans: Vec<(u64, usize)> = frame
                            .fragments()
                            .map(|f| (f.as_ptr() as u64, f.len()))
                            .filter(|&(addr, len)| mem.contains(addr, len))
                            .collect();
                        for (addr, len) in spans {
                            mem.bytes_at(addr, len).fill(byte);
                        }
                    }
                    // What the driver validated is its own copy: a rewrite changes neither
                    // the frame's description nor how much `copy_to` takes.
                    let copied = frame.copy_to(&mut copy);
                    assert_eq!(*frame.info(), info, "frame info changed by a rewrite");
                    assert!(
                        copied.is_none_or(|n| n == info.len),
                        "copied {copied:?} bytes of a {}-byte frame",
                        info.len
                    );
                }) {
                    assert_eq!(delivered, summary.frames);
                    assert!(
                        summary.frames + summary.dropped <= budget,
                        "rx_poll went past its budget"
                    );
                }
            }
            11 => {
                let offset = usize::from(input.u8() % 20);
                let len = usize::from(input.u8() % 8);
                sim.set_device_config(offset, input.take(len));
                sim.raise_config_interrupt();
                let _ = driver.handle_config_change();
            }
            12 => {
                if input.bool() {
                    let len = 14 + usize::from(input.u8());
                    let _ = driver.debug_send(&vec![0xAB; len], DEBUG_SPINS);
                } else {
                    let mut out = vec![0u8; 2048];
                    let _ = driver.debug_receive(&mut out, DEBUG_SPINS);
                }
            }
            13 => sim.trigger_needs_reset(),
            _ => {
                let rx = input.bool().then(|| {
                    let len = usize::from(input.u16() % 2048);
                    (input.take(12 + len).to_vec(), input.u32() % 70_000)
                });
                let tx = input.bool();
                if let Ok(mut f) = flood.lock() {
                    (f.rx, f.tx) = (rx, tx);
                }
            }
        }
        check_flood_bound(flood.lock().map_or(0, |f| f.answered), "answered the flood");
    }

    driver.shutdown(|token| complete(&mut in_flight, token));
    assert!(
        in_flight.is_empty(),
        "transmit tokens lost at shutdown: {in_flight:?}"
    );
    drop(driver);
    // SAFETY: the driver is gone and the device reset; nothing uses the buffer.
    unsafe { mem.free_coherent(buffers) };
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}

pub(crate) fn pad<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out[..bytes.len()].copy_from_slice(bytes);
    out
}

/// A frame of one to three segments inside `buffers` (at least an Ethernet header in all).
fn segments(input: &mut Input, buffers: &DmaRegion) -> Vec<Segment> {
    (0..1 + input.u8() % 3)
        .map(|_| {
            let len = 14 + u32::from(input.u16()) % 2000;
            let offset = u64::from(input.u16()) % (BUFFER_BYTES as u64 - u64::from(len));
            Segment::new(buffers.daddr + offset, len)
        })
        .collect()
}
