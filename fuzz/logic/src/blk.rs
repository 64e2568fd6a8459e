//! virtio-blk over the simulated function with a device side the fuzzer drives: honest
//! service by `BlkModel` with fuzzer-chosen status bytes (OK/IOERR/UNSUPP and others) and
//! used lengths, forged and repeated completions, capacity changes (shrinking with requests
//! in flight), raw config bytes (writeback and others), NEEDS_RESET; the driver submits
//! reads, writes, flushes, GET_ID, lifetime, discard and write-zeroes of fuzzer-chosen
//! shapes, and is suspended and resumed (sleep and wake) with requests in flight.
//!
//! Oracles: every accepted token completes exactly once, by a poll, by `abort_all` or by
//! `suspend`; nothing is accepted while suspended; one poll reports at most the requests in
//! flight (bounded work); after the driver drops, guest memory is back to what it was
//! before it was created.

use std::collections::HashSet;

use virtio_blk::{BlkDriver, BlkOptions, SectorRange};
use virtio_core::Segment;
use virtio_core::platform::Dma;
use virtio_pci::Preference;
use virtio_tests::blk_model::{BlkModel, bits};
use virtio_tests::sim::{MODES, Sim, SimInterrupt};

use crate::input::Input;

const MAX_STEPS: usize = 256;
pub(crate) const SECTORS: u64 = 128;
const BUFFER_BYTES: usize = 64 * 1024;

/// The simulated disk a blk input describes, shared with the `kext` target.
pub(crate) struct BlkSetup {
    pub(crate) model: BlkModel,
    pub(crate) sim: Sim,
    pub(crate) preference: Preference,
    pub(crate) queue_size: u16,
}

/// Decodes the device: transport, optional features, limits, ring features, queue size.
pub(crate) fn setup(input: &mut Input) -> BlkSetup {
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let mut model = BlkModel::new(SECTORS);
    let optional = [
        bits::SIZE_MAX,
        bits::SEG_MAX,
        bits::FLUSH,
        bits::CONFIG_WCE,
        bits::DISCARD,
        bits::WRITE_ZEROES,
        bits::LIFETIME,
        bits::BLK_SIZE,
        bits::TOPOLOGY,
        bits::RO,
    ];
    let chosen = input.u16();
    model.features = optional
        .iter()
        .enumerate()
        .filter(|(i, _)| chosen & (1 << i) != 0)
        .fold(0, |acc, (_, bit)| acc | bit);
    model.seg_max = 1 + u32::from(input.u8() % 8);
    model.size_max = 512 << (input.u8() % 8);
    let generic_choice = input.u8();
    let generic = [bits::INDIRECT_DESC, bits::EVENT_IDX]
        .iter()
        .enumerate()
        .filter(|(i, _)| generic_choice & (1 << i) != 0)
        .fold(0, |acc, (_, bit)| acc | bit)
        | crate::packed_if(generic_choice & 4 != 0);
    let queue_size = 1u16 << (input.u8() % 7);
    let sim = model
        .sim_builder(mode, generic, queue_size, 4 << 20)
        .memory(crate::mem::guest_memory(4 << 20))
        .build();
    BlkSetup {
        model,
        sim,
        preference,
        queue_size,
    }
}

/// Honest service, with a status byte and used length the fuzzer may override.
pub(crate) fn serve(model: &mut BlkModel, sim: &Sim, input: &mut Input) {
    model.status_override = input.bool().then(|| input.u8());
    model.len_override = input.bool().then(|| input.u32() % 8192);
    model.serve(sim, 0);
}

/// A capacity change, possibly shrinking under requests in flight.
pub(crate) fn resize(model: &mut BlkModel, sim: &Sim, input: &mut Input) {
    model.resize(u64::from(input.u16() % 512));
    sim.set_device_config(0, &model.config_bytes());
    sim.raise_config_interrupt();
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let BlkSetup {
        mut model,
        sim,
        preference,
        queue_size,
    } = setup(&mut input);
    let interrupts = input.bool();
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(device) = crate::sim_device(&sim, preference) else {
        return;
    };
    let options = BlkOptions {
        interrupts,
        ..BlkOptions::default()
    };
    let Ok(mut driver) = BlkDriver::new(device, options) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let buffers = mem.alloc_buffer(BUFFER_BYTES);
    let mut in_flight: HashSet<usize> = HashSet::new();
    let mut next_token = 0usize;
    let mut seen_heads: Vec<u16> = Vec::new();

    let complete = |in_flight: &mut HashSet<usize>, token: usize| {
        assert!(
            in_flight.remove(&token),
            "token {token} completed twice or never submitted"
        );
    };

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 14 {
            0..=3 => {
                let token = next_token;
                next_token += 1;
                let sector = u64::from(input.u16()) % (SECTORS + 8);
                let result = match input.u8() % 7 {
                    0 | 1 => driver.read(0, sector, &segments(&mut input, &buffers), token),
                    2 | 3 => driver.write(0, sector, &segments(&mut input, &buffers), token),
                    4 => driver.flush(0, token),
                    5 => match input.u8() % 2 {
                        0 => driver.get_id(0, token),
                        _ => driver.get_lifetime(0, token),
                    },
                    _ => {
                        let ranges: Vec<SectorRange> = (0..1 + input.u8() % 3)
                            .map(|_| {
                                SectorRange::new(
                                    u64::from(input.u16()) % (SECTORS + 8),
                                    u64::from(input.u8()),
                                )
                            })
                            .collect();
                        if input.bool() {
                            driver.discard(0, &ranges, token)
                        } else {
                            driver.write_zeroes(0, &ranges, input.bool(), token)
                        }
                    }
                };
                if result.is_ok() {
                    in_flight.insert(token);
                }
            }
            4 => {
                let _ = driver.kick(0);
            }
            5 | 6 => serve(&mut model, &sim, &mut input),
            7 => {
                // Take the chains and complete them with forged ids and lengths, or
                // complete a head seen before a second time.
                for chain in sim.pop_chains(0) {
                    seen_heads.push(chain.head);
                }
                let id = match (input.bool(), seen_heads.is_empty()) {
                    (true, false) => {
                        u32::from(seen_heads[usize::from(input.u8()) % seen_heads.len()])
                    }
                    _ => input.u32() % (u32::from(queue_size) * 2 + 1),
                };
                sim.complete_raw(0, id, input.u32() % 8192);
                sim.signal_used(0);
            }
            8 => resize(&mut model, &sim, &mut input),
            9 => {
                // Arbitrary config bytes (writeback, limits, geometry ...).
                let offset = usize::from(input.u8() % 64);
                let len = usize::from(input.u8() % 16);
                let bytes = input.take(len);
                sim.set_device_config(offset, bytes);
                let _ = driver.handle_config_change();
            }
            10 => sim.trigger_needs_reset(),
            11 | 12 => {
                for irq in sim.take_interrupts() {
                    let vector = match irq {
                        SimInterrupt::Msix(v) => Some(v),
                        SimInterrupt::Intx => None,
                    };
                    let _ = driver.handle_interrupt(vector);
                }
                let before = in_flight.len();
                let mut reported = 0;
                let polled = driver.poll_completions(0, |token, _| {
                    reported += 1;
                    complete(&mut in_flight, token);
                });
                assert!(
                    reported <= before,
                    "one poll reported more than was in flight"
                );
                if polled.is_err() {
                    driver.abort_all(|token, _| complete(&mut in_flight, token));
                    assert!(in_flight.is_empty(), "abort_all lost {in_flight:?}");
                    if driver.restart().is_err() {
                        break;
                    }
                }
            }
            _ if input.bool() => {
                // Sleep and wake (Linux `virtblk_freeze` / `virtblk_restore`): every token
                // in flight comes back exactly once, from the drain or aborted by the reset,
                // and submissions are refused until the device is back.
                let drain_polls = u32::from(input.u8() % 8);
                if driver
                    .suspend(drain_polls, |token, _| complete(&mut in_flight, token))
                    .is_ok()
                {
                    assert!(in_flight.is_empty(), "suspend lost {in_flight:?}");
                    let held = driver.read(0, 0, &segments(&mut input, &buffers), usize::MAX);
                    assert!(held.is_err(), "a submission was accepted while suspended");
                    if input.bool() {
                        sim.trigger_needs_reset();
                    }
                    // A failed resume leaves the driver suspended; it may be tried again.
                    if driver.resume().is_err() && driver.resume().is_err() {
                        break;
                    }
                }
            }
            _ => {
                driver.abort_all(|token, _| complete(&mut in_flight, token));
                assert!(in_flight.is_empty(), "abort_all lost {in_flight:?}");
                if driver.restart().is_err() {
                    break;
                }
            }
        }
    }

    driver.abort_all(|token, _| complete(&mut in_flight, token));
    assert!(
        in_flight.is_empty(),
        "tokens lost at shutdown: {in_flight:?}"
    );
    drop(driver);
    // SAFETY: the driver is gone and the device reset; nothing uses the buffer.
    unsafe { mem.free_coherent(buffers) };
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}

/// One to four segments inside `buffers`: sector multiples mostly, odd sizes sometimes.
fn segments(input: &mut Input, buffers: &virtio_core::platform::DmaRegion) -> Vec<Segment> {
    (0..1 + input.u8() % 4)
        .map(|_| {
            let len = if input.bool() {
                512 * (1 + u32::from(input.u8() % 16))
            } else {
                1 + u32::from(input.u16()) % 8192
            };
            let offset = u64::from(input.u16()) % (BUFFER_BYTES as u64 - u64::from(len));
            Segment::new(buffers.daddr + offset, len)
        })
        .collect()
}
