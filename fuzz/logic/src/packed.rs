//! The packed ring (`virtio_core::packed::PackedQueue`, virtio 1.2 §2.8), which every driver
//! negotiates whenever a device offers VIRTIO_F_RING_PACKED, against a device whose every
//! move the fuzzer chooses. While it is honest, the device is `virtio_tests::packed_device`
//! (written from the spec, strict about what the driver writes): it reads chains in ring
//! order, returns them in any order and in batches, and writes its event suppression
//! structure (ENABLE, DISABLE, DESC at any position). Any time, it can lie: used descriptors
//! at any ring index with any id, length and flags (AVAIL/USED in the right lap, the other
//! lap, one bit only, anything), a chain it holds returned with any length, and event
//! suppression values of any kind. Interleaved with adds (direct and indirect), kicks,
//! interrupt toggles, drains and resets; ring sizes 1–64 (not only powers of two), with and
//! without EVENT_IDX and with used lengths ignored.
//!
//! Oracles:
//! - every token completes at most once, and what did not complete comes back from
//!   `reclaim_after_reset` (exactly once overall);
//! - free ring positions + positions held by in-flight chains = ring size, after every step;
//! - the device model's checks of every descriptor and event structure the driver writes
//!   (§2.8.6–§2.8.19: flags of each lap, NEXT lists, indirect tables, buffer ids, reserved
//!   event values) and each chain read exactly as it was added;
//! - while the device has been honest since the last reset: no completion is refused, each
//!   comes back with the length the device wrote, the kick decision is exactly what the
//!   device's event structure asks for (§2.8.22), and no interrupt is asked for while the
//!   driver has them disabled;
//! - one drain returns at most as many completions as were in flight (bounded work);
//! - after teardown the guest memory's free bytes are what they were before.

use std::collections::{HashMap, VecDeque};

use virtio_core::Error;
use virtio_core::packed::{PackedQueue, PackedRingLayout};
use virtio_core::platform::Dma;
use virtio_core::queue::{QueueConfig, Segment};
use virtio_tests::packed_device::{
    EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, F_AVAIL, F_USED, F_WRITE, Notify, PackedChain,
    PackedDevice,
};
use virtio_tests::ring_device::indirect_pool;

use crate::input::Input;
use crate::ring::{BUFFER_BYTES, MAX_STEPS, free_queue_memory, reclaim_exactly_once, segments};

struct InFlight {
    /// Ring positions the chain took.
    positions: u16,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
}

impl InFlight {
    fn writable_len(&self) -> u32 {
        self.writable.iter().map(|w| w.1).sum()
    }
}

/// Everything the harness knows since the last reset.
#[derive(Default)]
struct Books {
    in_flight: HashMap<usize, InFlight>,
    /// Tokens added and not yet read by the device, in ring order.
    unseen: VecDeque<usize>,
    /// Chains the device read and holds, with their tokens.
    held: Vec<(PackedChain, usize)>,
    /// Lengths the honest device completed tokens with.
    completed_len: HashMap<usize, u32>,
    /// Absolute ring positions made available in all, and at the last kick decision.
    avail_pos: u64,
    last_kick_pos: u64,
    /// Set by any device move that is not honest; cleared by a reset.
    device_lied: bool,
    /// Whether the driver last enabled (or never disabled) its interrupts.
    interrupts_enabled: bool,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1 + u16::from(input.u8() % 64);
    let event_idx = input.bool();
    let ignore_used_len = input.u8().is_multiple_of(8);
    let max_indirect = match input.u8() % 3 {
        0 => 0,
        _ => (2 + u16::from(input.u8() % 7)).min(size),
    };

    let mem = crate::mem::guest_memory(1 << 20);
    let free_at_start = mem.free_bytes();
    let layout = PackedRingLayout::new(size).expect("sizes 1..=64 are valid");
    let ring = mem
        .alloc_coherent(layout.total, layout.align)
        .expect("ring memory");
    let config = QueueConfig {
        size,
        max_indirect,
        event_idx,
        ignore_used_len,
    };
    let mut queue = PackedQueue::new(
        0,
        layout,
        ring,
        indirect_pool(&mem, size, max_indirect),
        config,
    )
    .expect("a valid packed queue");
    let mut device = PackedDevice::new(&mem, size, queue.addresses(), event_idx);
    let buffers = mem.alloc_buffer(BUFFER_BYTES);
    let mut books = Books {
        interrupts_enabled: true,
        ..Books::default()
    };
    let mut completed_tokens = std::collections::HashSet::new();
    let mut next_token = 0usize;

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 14 {
            0..=2 => {
                let readable = segments(&mut input, &buffers);
                let writable = segments(&mut input, &buffers);
                let total = readable.len() + writable.len();
                let positions = queue.descriptors_for(total) as u16;
                let token = next_token;
                next_token += 1;
                match queue.add(&readable, &writable, token) {
                    Ok(()) => {
                        let pairs = |s: &[Segment]| s.iter().map(|s| (s.addr, s.len)).collect();
                        books.in_flight.insert(
                            token,
                            InFlight {
                                positions,
                                readable: pairs(&readable),
                                writable: pairs(&writable),
                            },
                        );
                        books.unseen.push_back(token);
                        books.avail_pos += u64::from(positions);
                    }
                    Err(Error::QueueFull) => assert!(
                        positions > queue.num_free(),
                        "QueueFull with {} free for {positions}",
                        queue.num_free()
                    ),
                    Err(Error::BadChain) => assert!(
                        total == 0 || usize::from(positions) > usize::from(size),
                        "BadChain for a chain that fits"
                    ),
                    Err(Error::QueueBroken { .. }) => assert!(queue.is_broken()),
                    Err(e) => panic!("add: unexpected {e:?}"),
                }
            }
            3 => {
                let kicked = queue.kick_prepare();
                let (old, new) = (books.last_kick_pos, books.avail_pos);
                books.last_kick_pos = new;
                // A DESC position more than a lap from the batch names a descriptor the
                // driver can only see modulo two laps; raw values are judged by nothing.
                let judged = match device.notify_state() {
                    Notify::At(abs) => abs + u64::from(size) >= new && abs < old + u64::from(size),
                    Notify::Raw(_) => false,
                    Notify::Enable | Notify::Disable => true,
                };
                if judged {
                    let wanted = device.kick_wanted(old, new);
                    if new - old < u64::from(size) {
                        assert_eq!(kicked, wanted, "kick decision for positions [{old}, {new})");
                    } else {
                        // A whole ring since the last decision: the driver kicks regardless.
                        assert!(kicked || !wanted, "kick lost for positions [{old}, {new})");
                    }
                }
            }
            4 if !books.device_lied => {
                // The device reads what is available, in ring order.
                while let Some(chain) = device.pop() {
                    let token = books
                        .unseen
                        .pop_front()
                        .expect("the device read a chain the driver never added");
                    let added = &books.in_flight[&token];
                    assert_eq!(
                        chain.positions, added.positions,
                        "ring positions of a chain"
                    );
                    assert_eq!(chain.readable, added.readable, "readable segments");
                    assert_eq!(chain.writable, added.writable, "writable segments");
                    books.held.push((chain, token));
                }
            }
            5 | 6 if !books.device_lied && !books.held.is_empty() => {
                // Honest completion of any chain the device holds (packed rings complete
                // out of order, §2.8.20), with a length it can hold.
                let i = usize::from(input.u8()) % books.held.len();
                let (chain, token) = books.held.swap_remove(i);
                let len = input.u32() % chain.writable_len().saturating_add(1);
                device.complete(&chain, len, input.u8());
                books.completed_len.insert(token, len);
                check_interrupt(&mut device, &books);
            }
            7 if !books.device_lied && !books.held.is_empty() => {
                // A batch returned at once, its first used descriptor written last.
                let n = 1 + usize::from(input.u8()) % books.held.len();
                let batch: Vec<(PackedChain, usize)> = books.held.drain(..n).collect();
                let mut lens = Vec::with_capacity(n);
                for (chain, token) in &batch {
                    let len = input.u32() % chain.writable_len().saturating_add(1);
                    books.completed_len.insert(*token, len);
                    lens.push((chain, len));
                }
                device.complete_batch(&lens);
                check_interrupt(&mut device, &books);
            }
            8 => {
                // A forged used descriptor: at the device's used position or anywhere, any
                // id (often one in flight), any length, flags of either lap or anything.
                let used = device.used_position();
                let idx = if input.bool() {
                    device.index_of(used)
                } else {
                    input.u16() % size
                };
                let id = match input.u8() % 3 {
                    0 if !books.held.is_empty() => {
                        books.held[usize::from(input.u8()) % books.held.len()].0.id
                    }
                    1 => input.u16(),
                    _ => input.u16() % (2 * size + 1),
                };
                let len = input.u32();
                let right_lap = device.used_flags(used);
                let flags = match input.u8() % 6 {
                    0 => right_lap,
                    1 => right_lap | F_WRITE,
                    2 => right_lap ^ (F_AVAIL | F_USED),
                    3 => F_AVAIL,
                    4 => F_USED,
                    _ => input.u16(),
                };
                device.forge(idx, id, len, flags);
                books.device_lied = true;
            }
            9 => match input.u8() % 4 {
                0 => device.disable_notifications(),
                1 => {
                    // Idle: what a device does after draining (reads the ring again).
                    device.enable_notifications();
                }
                2 if event_idx => {
                    let ahead = u64::from(input.u8()) % (2 * u64::from(size));
                    device.notify_at(device.avail_position() + ahead);
                }
                _ => {
                    let flags = match input.u8() % 4 {
                        0 => EVENT_ENABLE,
                        1 => EVENT_DISABLE,
                        2 => EVENT_DESC,
                        _ => input.u16(),
                    };
                    device.set_device_event_raw(input.u16(), flags);
                }
            },
            10 => {
                books.interrupts_enabled = match input.u8() % 3 {
                    0 => {
                        queue.disable_interrupts();
                        false
                    }
                    1 => {
                        queue.enable_interrupts();
                        true
                    }
                    _ => {
                        queue.enable_interrupts_delayed();
                        true
                    }
                };
            }
            11 => {
                let before = books.in_flight.len();
                let mut popped = 0;
                loop {
                    match queue.pop_used() {
                        Ok(Some(used)) => {
                            popped += 1;
                            assert!(popped <= before, "drain returned more than was in flight");
                            let chain = books
                                .in_flight
                                .remove(&used.token)
                                .unwrap_or_else(|| panic!("token {} not in flight", used.token));
                            assert!(
                                used.len <= chain.writable_len(),
                                "used length beyond the chain"
                            );
                            assert!(completed_tokens.insert(used.token), "completed twice");
                            if !books.device_lied {
                                let wrote = books
                                    .completed_len
                                    .remove(&used.token)
                                    .expect("an honest device completed this token");
                                let expected = if ignore_used_len { 0 } else { wrote };
                                assert_eq!(used.len, expected, "used length");
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            assert!(books.device_lied, "honest device broke the queue: {e:?}");
                            assert!(queue.is_broken());
                            break;
                        }
                    }
                }
            }
            12 => {
                check_interrupt(&mut device, &books);
            }
            13 => {
                reclaim(&mut queue, &mut books.in_flight);
                device = PackedDevice::new(&mem, size, queue.addresses(), event_idx);
                books = Books {
                    interrupts_enabled: true,
                    ..Books::default()
                };
            }
            // A move the device cannot make now (it lied, or holds nothing).
            _ => {}
        }
        let held: u16 = books.in_flight.values().map(|c| c.positions).sum();
        assert_eq!(
            queue.num_free() + held,
            size,
            "free + in-flight ring positions != ring size"
        );
    }

    reclaim(&mut queue, &mut books.in_flight);
    free_queue_memory(&mem, queue.into_regions(), buffers, free_at_start);
}

/// The device's interrupt decision, which checks the driver's event suppression structure
/// (no reserved flags, DESC only with EVENT_IDX, an offset inside the ring); none while the
/// driver has interrupts disabled.
fn check_interrupt(device: &mut PackedDevice, books: &Books) {
    let interrupt = device.needs_interrupt();
    assert!(
        books.interrupts_enabled || !interrupt,
        "interrupt asked for while the driver disabled them"
    );
}

fn reclaim(queue: &mut PackedQueue, in_flight: &mut HashMap<usize, InFlight>) {
    reclaim_exactly_once(in_flight, |hand_back| queue.reclaim_after_reset(hand_back));
    assert_eq!(queue.num_free(), queue.size());
}
