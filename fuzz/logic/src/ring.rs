//! The split ring (`virtio_core::queue::SplitQueue`) against a device whose every move the
//! fuzzer chooses: honest completions, forged used ids/lengths/indices, `used.flags`,
//! `avail_event`, interleaved with adds (direct and indirect), kicks, interrupt toggles,
//! drains and resets, in both the modern and the legacy layout, with and without EVENT_IDX.
//!
//! Oracles:
//! - every token completes at most once, and what did not complete comes back from
//!   `reclaim_after_reset` (exactly once overall);
//! - free descriptors + descriptors held by in-flight chains = ring size, after every step;
//! - a device that only completes honestly never breaks the queue;
//! - one drain returns at most as many completions as were in flight (bounded work);
//! - after teardown the guest memory's free bytes are what they were before.

use std::collections::HashMap;

use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::queue::{Segment, SplitQueue};
use virtio_core::ring::SplitRingLayout;
use virtio_core::{Error, RingLayoutKind};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::ring_device::split_queue;

use crate::input::Input;

/// Upper bound on steps per input, so one input is bounded work whatever its length.
pub(crate) const MAX_STEPS: usize = 1024;
/// Buffer bytes the fuzzer's segments point into.
pub(crate) const BUFFER_BYTES: usize = 4096;

struct InFlight {
    descriptors: u16,
    writable: u32,
}

/// The device's view of the ring: its cursors and raw access to the shared areas.
struct Device {
    mem: IdentityMemory,
    ring_base: u64,
    layout: SplitRingLayout,
    /// Next avail slot the device will consume.
    next_avail: u16,
    /// Device's `used.idx` shadow.
    used_idx: u16,
}

impl Device {
    fn read_u16(&self, offset: usize) -> u16 {
        let b = self.mem.bytes_at(self.ring_base + offset as u64, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
    fn write(&self, offset: usize, bytes: &[u8]) {
        self.mem
            .bytes_at(self.ring_base + offset as u64, bytes.len())
            .copy_from_slice(bytes);
    }
    fn write_used(&mut self, id: u32, len: u32) {
        let entry = self.layout.used_ring(self.used_idx);
        self.write(entry, &id.to_le_bytes());
        self.write(entry + 4, &len.to_le_bytes());
        self.used_idx = self.used_idx.wrapping_add(1);
        self.publish_used_idx();
    }
    fn publish_used_idx(&self) {
        self.write(self.layout.used_idx(), &self.used_idx.to_le_bytes());
    }
    /// The next head the driver made available, if any.
    fn pop_avail(&mut self) -> Option<u16> {
        if self.read_u16(self.layout.avail_idx()) == self.next_avail {
            return None;
        }
        let head = self.read_u16(self.layout.avail_ring(self.next_avail));
        self.next_avail = self.next_avail.wrapping_add(1);
        Some(head)
    }
    fn reset(&mut self) {
        self.next_avail = 0;
        self.used_idx = 0;
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let kind = if input.bool() {
        RingLayoutKind::Legacy
    } else {
        RingLayoutKind::Modern
    };
    let size = 1u16 << (input.u8() % 7);
    let event_idx = input.bool();
    let max_indirect = match input.u8() % 3 {
        0 => 0,
        _ => (2 + u16::from(input.u8() % 7)).min(size),
    };

    let mem = crate::mem::guest_memory(1 << 20);
    let free_at_start = mem.free_bytes();
    let (mut queue, layout, ring_base) =
        split_queue(&mem, kind, size, event_idx, max_indirect, false);
    let buffers = mem.alloc_buffer(BUFFER_BYTES);
    let mut device = Device {
        mem: mem.clone(),
        ring_base,
        layout,
        next_avail: 0,
        used_idx: 0,
    };

    let mut in_flight: HashMap<usize, InFlight> = HashMap::new();
    let mut completed_tokens = std::collections::HashSet::new();
    let mut token_at_head: HashMap<u16, usize> = HashMap::new();
    let mut next_token = 0usize;
    // Cleared by a reset; set by any device move that is not an honest completion.
    let mut device_lied = false;

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 12 {
            0..=2 => {
                let readable = segments(&mut input, &buffers);
                let writable = segments(&mut input, &buffers);
                let descriptors = queue.descriptors_for(readable.len() + writable.len()) as u16;
                let token = next_token;
                next_token += 1;
                match queue.add(&readable, &writable, token) {
                    Ok(()) => {
                        // The head the driver published, read back as the device sees it.
                        let published = device.read_u16(layout.avail_idx()).wrapping_sub(1);
                        let head = device.read_u16(layout.avail_ring(published));
                        token_at_head.insert(head, token);
                        let writable = writable.iter().map(|s| s.len).sum();
                        in_flight.insert(
                            token,
                            InFlight {
                                descriptors,
                                writable,
                            },
                        );
                    }
                    Err(Error::QueueFull) => assert!(
                        descriptors > queue.num_free(),
                        "QueueFull with {} free for {descriptors}",
                        queue.num_free()
                    ),
                    Err(Error::BadChain) => assert!(
                        readable.is_empty() && writable.is_empty()
                            || usize::from(descriptors) > usize::from(size),
                        "BadChain for a chain that fits"
                    ),
                    Err(Error::QueueBroken { .. }) => assert!(queue.is_broken()),
                    Err(e) => panic!("add: unexpected {e:?}"),
                }
            }
            3 => {
                queue.kick_prepare();
            }
            4 | 5 => {
                // Honest completion of the next available chain, with a length the chain
                // can hold.
                if let Some(head) = device.pop_avail() {
                    let writable = token_at_head
                        .get(&head)
                        .and_then(|token| in_flight.get(token))
                        .map(|chain| chain.writable);
                    // After a forged completion the driver may have recycled the head: only
                    // an honest history guarantees it is still in flight.
                    assert!(
                        writable.is_some() || device_lied,
                        "the driver published head {head} that is not in flight"
                    );
                    let writable = writable.unwrap_or(0);
                    let len = input.u32() % writable.saturating_add(1);
                    device.write_used(u32::from(head), len);
                }
            }
            6 => {
                // Forged completion: any id, any length.
                let (id, len) = (input.u32() % (u32::from(size) * 2 + 1), input.u32());
                device.write_used(id, len);
                device_lied = true;
            }
            7 => {
                // used.idx jumps anywhere.
                device.used_idx = device.used_idx.wrapping_add(input.u16());
                device.publish_used_idx();
                device_lied = true;
            }
            8 => {
                // Suppression fields the device owns: used.flags and avail_event.
                let flags = input.u16();
                device.write(layout.used_flags(), &flags.to_le_bytes());
                let event = input.u16();
                device.write(layout.avail_event(), &event.to_le_bytes());
            }
            9 => match input.u8() % 3 {
                0 => queue.disable_interrupts(),
                1 => {
                    queue.enable_interrupts();
                }
                _ => {
                    queue.enable_interrupts_delayed();
                }
            },
            10 => {
                let before = in_flight.len();
                let mut popped = 0;
                loop {
                    match queue.pop_used() {
                        Ok(Some(used)) => {
                            popped += 1;
                            assert!(popped <= before, "drain returned more than was in flight");
                            let chain = in_flight
                                .remove(&used.token)
                                .unwrap_or_else(|| panic!("token {} not in flight", used.token));
                            assert!(used.len <= chain.writable, "used length beyond the chain");
                            assert!(completed_tokens.insert(used.token), "completed twice");
                        }
                        Ok(None) => break,
                        Err(e) => {
                            assert!(device_lied, "honest device broke the queue: {e:?}");
                            assert!(queue.is_broken());
                            break;
                        }
                    }
                }
            }
            _ => {
                reclaim(&mut queue, &mut in_flight);
                device.reset();
                device_lied = false;
            }
        }
        let held: u16 = in_flight.values().map(|c| c.descriptors).sum();
        assert_eq!(
            queue.num_free() + held,
            size,
            "free + in-flight descriptors != ring size"
        );
    }

    reclaim(&mut queue, &mut in_flight);
    free_queue_memory(&mem, queue.into_regions(), buffers, free_at_start);
}

/// Frees a torn-down queue's ring and indirect pool and the segment buffers, then checks
/// that guest memory is back to what it was before the queue.
pub(crate) fn free_queue_memory(
    mem: &IdentityMemory,
    (ring, indirect): (DmaRegion, Option<DmaRegion>),
    buffers: DmaRegion,
    free_at_start: usize,
) {
    // SAFETY: the queue is gone and the simulated device stopped; nothing uses these regions.
    unsafe {
        mem.free_coherent(ring);
        if let Some(pool) = indirect {
            mem.free_coherent(pool);
        }
        mem.free_coherent(buffers);
    }
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}

/// Zero to three segments inside `buffers`, of fuzzer-chosen offsets and lengths.
pub(crate) fn segments(input: &mut Input, buffers: &DmaRegion) -> Vec<Segment> {
    (0..input.u8() % 4)
        .map(|_| {
            let offset = input.u16() as usize % BUFFER_BYTES;
            let len = 1 + input.u16() as usize % (BUFFER_BYTES - offset);
            Segment::new(buffers.daddr + offset as u64, len as u32)
        })
        .collect()
}

fn reclaim(queue: &mut SplitQueue, in_flight: &mut HashMap<usize, InFlight>) {
    reclaim_exactly_once(in_flight, |hand_back| queue.reclaim_after_reset(hand_back));
    assert_eq!(queue.num_free(), queue.size());
}

/// Runs a queue's `reclaim_after_reset` through `reclaim` and checks that it hands back
/// each token still in flight exactly once, and nothing else.
pub(crate) fn reclaim_exactly_once<V>(
    in_flight: &mut HashMap<usize, V>,
    reclaim: impl FnOnce(&mut dyn FnMut(usize)),
) {
    reclaim(&mut |token| {
        assert!(
            in_flight.remove(&token).is_some(),
            "reclaim returned token {token} that is not in flight"
        );
    });
    assert!(
        in_flight.is_empty(),
        "tokens lost at reset: {:?}",
        in_flight.keys()
    );
}
