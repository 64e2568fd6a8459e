//! Conformance: our driver-side packed virtqueue (`PackedQueue`, virtio 1.2 §2.8) against
//! the device-side model in `virtio_tests::packed_device`, written from the spec
//! independently of the driver (rust-vmm's `virtio-queue` has no packed ring). Directed
//! tests, hostile-device tests equal to the split ring's, and property tests mirroring
//! `conformance_props.rs`.

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;
use virtio_core::Error;
use virtio_core::packed::{PackedQueue, PackedRingLayout};
use virtio_core::platform::Dma;
use virtio_core::queue::{QueueConfig, Segment};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::packed_device::{
    EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, F_AVAIL, F_INDIRECT, F_NEXT, F_USED, F_WRITE,
    PackedChain, PackedDevice,
};
use virtio_tests::ring_device::indirect_pool;

struct Pair {
    mem: IdentityMemory,
    drv: PackedQueue,
    dev: PackedDevice,
    size: u16,
    event_idx: bool,
}

fn pair(size: u16, event_idx: bool, max_indirect: u16) -> Pair {
    pair_with(size, event_idx, max_indirect, false)
}

fn pair_with(size: u16, event_idx: bool, max_indirect: u16, ignore_used_len: bool) -> Pair {
    let mem = IdentityMemory::new(4 << 20);
    let layout = PackedRingLayout::new(size).expect("layout");
    let ring = mem.alloc_coherent(layout.total, layout.align).unwrap();
    let drv = PackedQueue::new(
        0,
        layout,
        ring,
        indirect_pool(&mem, size, max_indirect),
        QueueConfig {
            size,
            max_indirect,
            event_idx,
            ignore_used_len,
        },
    )
    .unwrap();
    let dev = PackedDevice::new(&mem, size, drv.addresses(), event_idx);
    Pair {
        mem,
        drv,
        dev,
        size,
        event_idx,
    }
}

impl Pair {
    fn segs(&self, lens: &[u32]) -> Vec<Segment> {
        lens.iter()
            .map(|&l| Segment::new(self.mem.alloc_buffer(l as usize).daddr, l))
            .collect()
    }

    /// One-descriptor round trips until both sides are at absolute position `abs`
    /// (nothing in flight before or after).
    fn advance_to(&mut self, abs: u64, seg: &[Segment]) {
        assert!(self.dev.used_position() <= abs);
        while self.dev.used_position() < abs {
            self.drv.add(seg, &[], usize::MAX).unwrap();
            self.drv.kick_prepare();
            let c = self.dev.pop().unwrap();
            self.dev.complete(&c, 0, 0);
            assert_eq!(self.drv.pop_used().unwrap().unwrap().token, usize::MAX);
        }
        assert_eq!(self.dev.avail_position(), abs);
    }

    /// A fresh device on the same ring (the device was reset), after the driver reclaimed.
    fn reset_device(&mut self) {
        self.dev = PackedDevice::new(&self.mem, self.size, self.drv.addresses(), self.event_idx);
    }
}

fn addr_lens(s: &[Segment]) -> Vec<(u64, u32)> {
    s.iter().map(|s| (s.addr, s.len)).collect()
}

#[test]
fn chains_of_1_to_n_segments_arrive_exactly() {
    // 64: plenty of room; 7: not a power of two, so chains keep crossing the ring's end at
    // different points.
    for size in [64u16, 7] {
        let mut p = pair(size, true, 0);
        let mut token = 0;
        let max = if cfg!(miri) { 3 } else { size.min(12) as usize };
        for n in 1..=max {
            for readable in 0..=n {
                let r: Vec<u32> = (0..readable).map(|i| 10 + i as u32).collect();
                let w: Vec<u32> = (0..n - readable).map(|i| 100 + i as u32).collect();
                let (rs, ws) = (p.segs(&r), p.segs(&w));
                let at = p.dev.avail_position();
                p.drv.add(&rs, &ws, token).unwrap();
                p.drv.kick_prepare();
                let chain = p.dev.pop().expect("device sees the chain");
                assert_eq!(chain.readable, addr_lens(&rs));
                assert_eq!(chain.writable, addr_lens(&ws));
                assert_eq!((chain.first, chain.positions), (at, n as u16));
                assert!(!chain.indirect);
                assert!(p.dev.pop().is_none(), "nothing else available");
                let wl = chain.writable_len();
                p.dev.complete(&chain, wl, 0xAB);
                let used = p.drv.pop_used().unwrap().unwrap();
                assert_eq!((used.token, used.len), (token, wl));
                for s in &ws {
                    assert!(
                        p.mem
                            .bytes_at(s.addr, s.len as usize)
                            .iter()
                            .all(|&b| b == 0xAB)
                    );
                }
                assert_eq!(p.drv.pop_used(), Ok(None));
                token += 1;
            }
        }
        assert_eq!(p.drv.num_free(), size, "all positions returned");
        assert_eq!(p.drv.in_flight(), 0);
    }
}

#[test]
fn chain_crossing_the_ring_end_carries_each_laps_flags() {
    let mut p = pair(8, false, 0);
    let one = p.segs(&[1]);
    p.advance_to(6, &one);
    let r = p.segs(&[11, 12]);
    let w = p.segs(&[13, 14]);
    p.drv.add(&r, &w, 42).unwrap();
    // Positions 6, 7 in the first lap (wrap 1), 0, 1 in the second (wrap 0), §2.8.1; NEXT
    // on all but the last (§2.8.6), WRITE on the writable ones.
    assert_eq!(p.dev.flags_at(6), F_AVAIL | F_NEXT);
    assert_eq!(p.dev.flags_at(7), F_AVAIL | F_NEXT);
    assert_eq!(p.dev.flags_at(0), F_USED | F_NEXT | F_WRITE);
    assert_eq!(p.dev.flags_at(1), F_USED | F_WRITE);
    assert_eq!(p.drv.num_free(), 4);
    let c = p.dev.pop().unwrap();
    assert_eq!((c.first, c.positions), (6, 4));
    assert_eq!(c.readable, addr_lens(&r));
    assert_eq!(c.writable, addr_lens(&w));
    p.dev.complete(&c, 20, 7);
    // The used descriptor lands at position 6 (first lap): AVAIL = USED = 1.
    assert_eq!(p.dev.flags_at(6) & (F_AVAIL | F_USED), F_AVAIL | F_USED);
    let u = p.drv.pop_used().unwrap().unwrap();
    assert_eq!((u.token, u.len), (42, 20));
    assert_eq!(p.drv.num_free(), 8);
    // The driver skipped to position 10 = index 2 of the second lap: the next chain goes
    // there with the second lap's flags, and completes there.
    p.drv.add(&one, &[], 43).unwrap();
    assert_eq!(p.dev.flags_at(2), F_USED);
    let c = p.dev.pop().unwrap();
    assert_eq!(c.first, 10);
    p.dev.complete(&c, 0, 0);
    assert_eq!(p.dev.flags_at(2) & (F_AVAIL | F_USED), 0, "used in lap 2");
    assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 43);
}

#[test]
fn out_of_order_completion_skips_each_chains_positions() {
    for size in [16u16, 13] {
        let mut p = pair(size, true, 0);
        let mut tokens = 0;
        for t in 0..16usize {
            let segs = p.segs(&vec![8; 1 + t % 3]);
            if p.drv.add(&segs, &[], t).is_err() {
                break;
            }
            tokens += 1;
        }
        let chains = p.dev.pop_all();
        assert_eq!(chains.len(), tokens);
        let order = [3usize, 0, 5, 1, 4, 2];
        for &i in &order {
            p.dev.complete(&chains[i], 0, 0);
        }
        let got: Vec<_> = std::iter::from_fn(|| p.drv.pop_used().unwrap())
            .map(|u| u.token)
            .collect();
        assert_eq!(got, order);
        let rest: Vec<_> = (0..chains.len()).filter(|i| !order.contains(i)).collect();
        for &i in rest.iter().rev() {
            p.dev.complete(&chains[i], 0, 0);
        }
        let got: Vec<_> = std::iter::from_fn(|| p.drv.pop_used().unwrap())
            .map(|u| u.token)
            .collect();
        assert_eq!(got, rest.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(p.drv.num_free(), size);
        // The whole ring as one chain, crossing the end.
        let s = p.segs(&vec![1; size as usize]);
        p.drv.add(&s, &[], 1000).unwrap();
        let c = p.dev.pop().unwrap();
        assert_eq!(c.readable.len(), size as usize);
        p.dev.complete(&c, 0, 0);
        assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 1000);
    }
}

#[test]
fn batched_in_order_completion() {
    let mut p = pair(8, false, 0);
    let one = p.segs(&[4]);
    p.advance_to(5, &one);
    let w = p.segs(&[8, 8]);
    for t in 0..3 {
        p.drv.add(&[], &w, t).unwrap();
    }
    let chains = p.dev.pop_all();
    let batch: Vec<_> = chains.iter().map(|c| (c, 3)).collect();
    p.dev.complete_batch(&batch);
    let got: Vec<_> = std::iter::from_fn(|| p.drv.pop_used().unwrap())
        .map(|u| (u.token, u.len))
        .collect();
    assert_eq!(got, [(0, 3), (1, 3), (2, 3)]);
    assert_eq!(p.drv.num_free(), 8);
}

#[test]
fn indirect_chain_uses_one_position_and_device_follows_table() {
    for size in [16u16, 11] {
        let mut p = pair(size, false, 8);
        let lens = [16, 512, 512, 512, 1];
        let rs = p.segs(&lens[..1]);
        let ws = p.segs(&lens[1..]);
        p.drv.add(&rs, &ws, 7).unwrap();
        assert_eq!(
            p.drv.num_free(),
            size - 1,
            "indirect chain takes one position"
        );
        assert_eq!(p.drv.stats().indirect, 1);
        assert_eq!(p.dev.flags_at(0), F_AVAIL | F_INDIRECT);
        // A single segment never goes indirect.
        let one = p.segs(&[64]);
        p.drv.add(&one, &[], 8).unwrap();
        assert_eq!(p.drv.stats().indirect, 1);
        // Longer than the table: direct descriptors.
        let many = p.segs(&[1; 8]);
        let many = [many, p.segs(&[1])].concat();
        p.drv.add(&many, &[], 9).unwrap();
        assert_eq!(p.drv.num_free(), size - 1 - 1 - 9);
        let chains = p.dev.pop_all();
        assert_eq!(chains.len(), 3);
        assert!(chains[0].indirect);
        assert_eq!(chains[0].positions, 1);
        assert_eq!(chains[0].readable, addr_lens(&rs));
        assert_eq!(chains[0].writable, addr_lens(&ws));
        assert!(!chains[1].indirect && !chains[2].indirect);
        assert_eq!(chains[2].readable.len(), 9);
        assert_eq!(chains[2].positions, 9);
        for c in chains.iter().rev() {
            let l = c.writable_len();
            p.dev.complete(c, l, 1);
        }
        let got: Vec<_> = std::iter::from_fn(|| p.drv.pop_used().unwrap())
            .map(|u| (u.token, u.len))
            .collect();
        assert_eq!(got, [(9, 0), (8, 0), (7, 1537)]);
        assert_eq!(p.drv.num_free(), size);
        // Indirect tables are per buffer id: many in flight at once, reused after pops.
        for round in 0..3 {
            for t in 0..size as usize {
                p.drv.add(&rs, &ws, 100 * round + t).unwrap();
            }
            assert_eq!(p.drv.num_free(), 0);
            let chains = p.dev.pop_all();
            assert_eq!(chains.len(), size as usize);
            for c in &chains {
                assert!(c.indirect);
                assert_eq!(c.writable, addr_lens(&ws));
                p.dev.complete(c, 5, 2);
            }
            let n = std::iter::from_fn(|| p.drv.pop_used().unwrap()).count();
            assert_eq!(n, size as usize);
        }
    }
}

#[test]
fn full_ring_backpressure_and_recovery() {
    for size in [8u16, 5] {
        let mut p = pair(size, false, 0);
        let s = p.segs(&[8]);
        for t in 0..size as usize {
            p.drv.add(&s, &[], t).unwrap();
        }
        assert_eq!(p.drv.num_free(), 0);
        assert_eq!(p.drv.add(&s, &[], 99), Err(Error::QueueFull));
        let chains = p.dev.pop_all();
        assert_eq!(chains.len(), size as usize);
        assert!(p.dev.pop().is_none(), "a full ring is not read twice");
        p.dev.complete(&chains[3], 0, 0);
        assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 3);
        let two = p.segs(&[1, 1]);
        assert_eq!(
            p.drv.add(&two, &[], 100),
            Err(Error::QueueFull),
            "needs 2, 1 free"
        );
        p.drv.add(&s, &[], 101).unwrap();
        assert_eq!(p.dev.pop().unwrap().first, u64::from(size));
        let too_long = p.segs(&vec![1; size as usize + 1]);
        assert_eq!(p.drv.add(&too_long, &[], 102), Err(Error::BadChain));
        assert_eq!(p.drv.add(&[], &[], 103), Err(Error::BadChain));
    }
}

/// A chain whose writable bytes overflow the 32-bit used length is refused (not
/// backpressure, even on a full ring) and leaves nothing behind: no position, no id, and
/// nothing the device could take for available, through an indirect table or direct.
#[test]
fn refused_chains_leave_no_trace() {
    for max_indirect in [0u16, 4] {
        let mut p = pair(8, false, max_indirect);
        // Never read by the device: the chain is refused before it is published. The
        // overflow comes at the last segment, after the others could have been written.
        let huge = [
            Segment::new(0x1000, 1),
            Segment::new(0x2000, 1),
            Segment::new(0x3000, u32::MAX),
        ];
        assert_eq!(p.drv.add(&[], &huge, 1), Err(Error::BadChain));
        assert_eq!((p.drv.num_free(), p.drv.in_flight()), (8, 0));
        assert!(p.dev.pop().is_none(), "nothing made available");
        // The next chain takes the first position with the first id, and the device sees
        // only it.
        let ok = p.segs(&[16]);
        p.drv.add(&[], &ok, 2).unwrap();
        let chain = p.dev.pop().expect("the good chain");
        assert_eq!((chain.first, chain.id), (0, 0));
        assert!(p.dev.pop().is_none(), "one chain available");
        // A full ring: the overflow is still reported as a bad chain.
        for t in 3..10 {
            p.drv.add(&[], &ok, t).unwrap();
        }
        assert_eq!(p.drv.add(&[], &huge, 10), Err(Error::BadChain));
        assert_eq!(p.drv.add(&[], &ok, 11), Err(Error::QueueFull));
    }
}

/// `PackedRingLayout`'s fields are public: a layout built by hand that
/// `PackedRingLayout::new` would not make (a size the ring cannot have, offsets that do not
/// fit its size) is refused.
#[test]
fn hand_built_layout_is_refused_unless_canonical() {
    let mem = IdentityMemory::new(1 << 20);
    let canonical = |size: u16| PackedRingLayout {
        size,
        driver: 16 * usize::from(size),
        device: 16 * usize::from(size) + 4,
        total: 16 * usize::from(size) + 8,
        align: 16,
    };
    let layouts = [
        canonical(0),
        canonical(32769),
        PackedRingLayout {
            total: 8,
            ..canonical(8)
        },
        PackedRingLayout {
            device: 16 * 8 + 2,
            ..canonical(8)
        },
    ];
    let build = |layout: PackedRingLayout| {
        let size = layout.size;
        let ring = mem
            .alloc_coherent(canonical(size).total.max(16), 16)
            .unwrap();
        let config = QueueConfig {
            size,
            max_indirect: 0,
            event_idx: false,
            ignore_used_len: false,
        };
        PackedQueue::new(0, layout, ring, None, config)
    };
    for layout in layouts {
        assert!(matches!(build(layout), Err(Error::BadQueueSize { .. })));
    }
    // The canonical layout itself is accepted.
    assert!(build(canonical(8)).is_ok());
}

#[test]
fn reclaim_after_reset_returns_every_token_and_recovers() {
    for event_idx in [false, true] {
        let mut p = pair(8, event_idx, 4);
        let s = p.segs(&[8]);
        let w = p.segs(&[8, 8]);
        p.advance_to(6, &s);
        for t in 10..15 {
            p.drv.add(&s, &w, t).unwrap();
        }
        // Device read three, completed one the driver never popped.
        let c = p.dev.pop().unwrap();
        p.dev.pop().unwrap();
        p.dev.complete(&c, 1, 0);
        let mut got = Vec::new();
        p.drv.reclaim_after_reset(|t| got.push(t));
        got.sort();
        assert_eq!(got, [10, 11, 12, 13, 14]);
        assert_eq!((p.drv.num_free(), p.drv.in_flight()), (8, 0));
        assert!(!p.drv.has_used());
        p.reset_device();
        for t in 0..20 {
            p.drv.add(&s, &w, t).unwrap();
            p.drv.kick_prepare();
            let c = p.dev.pop().unwrap();
            p.dev.complete(&c, 16, 0);
            assert_eq!(p.drv.pop_used().unwrap().unwrap().token, t);
        }
    }
}

// ---- available buffer notifications (device event suppression, §2.8.10) ----

#[test]
fn kick_follows_enable_and_disable() {
    for event_idx in [false, true] {
        let mut p = pair(8, event_idx, 0);
        let s = p.segs(&[8]);
        p.drv.add(&s, &[], 1).unwrap();
        assert!(p.drv.kick_prepare(), "ENABLE (initial zero): every batch");
        assert!(!p.drv.kick_prepare(), "nothing new: no kick");
        p.dev.disable_notifications();
        p.drv.add(&s, &[], 2).unwrap();
        assert!(!p.drv.kick_prepare(), "DISABLE");
        assert_eq!(p.dev.pop_all().len(), 2);
        assert!(!p.dev.enable_notifications());
        p.drv.add(&s, &[], 3).unwrap();
        p.drv.add(&s, &[], 4).unwrap();
        assert!(p.drv.kick_prepare(), "idle device asked again");
        if event_idx {
            // DESC at the device's read position: already notified, not caught up.
            p.drv.add(&s, &[], 5).unwrap();
            assert!(!p.drv.kick_prepare());
        }
        let st = p.drv.stats();
        assert_eq!(
            (st.kicks, st.kicks_suppressed),
            (2, 1 + u64::from(event_idx))
        );
        // A reserved flags value, or DESC without EVENT_IDX: notifying is the safe answer.
        p.dev.set_device_event_raw(0, 3);
        p.drv.add(&s, &[], 6).unwrap();
        assert!(p.drv.kick_prepare());
        if !event_idx {
            p.dev.set_device_event_raw(0x8003, EVENT_DESC);
            p.drv.add(&s, &[], 7).unwrap();
            assert!(p.drv.kick_prepare());
        }
        p.dev.set_device_event_raw(0, EVENT_ENABLE);
        p.dev.set_device_event_raw(0, EVENT_DISABLE);
        p.drv.add(&s, &[], 8).unwrap();
        assert!(!p.drv.kick_prepare());
    }
}

/// Every batch length, at every start position of two laps, against every descriptor the
/// device can name from one lap behind the batch's end to one lap ahead of its start: the
/// kick decision is exactly "the named descriptor was made available in this batch".
#[test]
fn event_idx_kick_at_every_offset_across_the_wrap() {
    let sizes: &[u16] = if cfg!(miri) { &[3] } else { &[1, 2, 3, 5, 8] };
    for &size in sizes {
        let mut p = pair(size, true, 0);
        let s = p.segs(&[1]);
        let laps = 2 * u64::from(size);
        p.advance_to(laps, &s);
        for start_mod in 0..laps {
            for batch in 1..=u64::from(size) {
                for rel in 0..2 * u64::from(size) {
                    // Both sides at a start position with this index and wrap.
                    let now = p.dev.used_position();
                    let start = now + (start_mod + laps - now % laps) % laps;
                    let end = start + batch;
                    let Some(event) = (end + rel).checked_sub(u64::from(size)) else {
                        continue;
                    };
                    if event >= start + u64::from(size) {
                        continue;
                    }
                    p.advance_to(start, &s);
                    assert!(!p.drv.kick_prepare());
                    p.dev.notify_at(event);
                    for t in 0..batch {
                        p.drv.add(&s, &[], t as usize).unwrap();
                    }
                    let want = p.dev.kick_wanted(start, end);
                    let got = p.drv.kick_prepare();
                    if batch < u64::from(size) {
                        assert_eq!(
                            got, want,
                            "size {size}: batch [{start}, {end}), event at {event}"
                        );
                    } else {
                        // A whole ring in one batch: the driver notifies unconditionally.
                        assert!(got || !want, "size {size}: lost kick, event {event}");
                    }
                    for c in p.dev.pop_all() {
                        p.dev.complete(&c, 0, 0);
                    }
                    while p.drv.pop_used().unwrap().is_some() {}
                    p.dev.set_device_event_raw(0, EVENT_ENABLE);
                }
            }
        }
    }
}

// ---- used buffer notifications (driver event suppression) ----

/// A queue of `size` with `n` one-segment device-writable chains (tokens 0..n) in flight,
/// and those chains as the device popped them.
fn writable_chains_in_flight(size: u16, event_idx: bool, n: usize) -> (Pair, Vec<PackedChain>) {
    let mut p = pair(size, event_idx, 0);
    let w = p.segs(&[32]);
    for t in 0..n {
        p.drv.add(&[], &w, t).unwrap();
    }
    let chains = p.dev.pop_all();
    (p, chains)
}

#[test]
fn interrupt_suppression_and_race_free_reenable() {
    for event_idx in [true, false] {
        for size in [32u16, 5] {
            let (mut p, chains) = writable_chains_in_flight(size, event_idx, 4);
            p.drv.disable_interrupts();
            for c in &chains[..3] {
                p.dev.complete(c, 4, 0);
                assert!(
                    !p.dev.needs_interrupt(),
                    "suppressed (event_idx={event_idx})"
                );
            }
            // Completions written between disable and enable: enable must report them.
            assert!(p.drv.enable_interrupts());
            assert_eq!(std::iter::from_fn(|| p.drv.pop_used().unwrap()).count(), 3);
            assert!(!p.drv.enable_interrupts(), "nothing pending now");
            p.dev.complete(&chains[3], 4, 0);
            assert!(
                p.dev.needs_interrupt(),
                "enabled: the next completion interrupts"
            );
            assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 3);
        }
    }
}

/// `PackedQueue::drain_used` (the bus's completion loop in one pass): interrupts stay
/// suppressed while it pops (under EVENT_IDX without a ring write: the event names a
/// position the device already passed), what completes meanwhile is popped in the same
/// call, and the re-enable at the end makes the next completion interrupt.
#[test]
fn drain_pops_what_completes_meanwhile_and_reenables() {
    for event_idx in [true, false] {
        for size in [32u16, 5] {
            let (mut p, chains) = writable_chains_in_flight(size, event_idx, 5);
            assert_eq!(p.drv.drain_used(true, |_| panic!("nothing used")), Ok(0));
            // Twice: from the event structure as set up (ENABLE: the drain must write
            // DISABLE), then from the interrupt point the first drain's re-enable named
            // (under EVENT_IDX the drain writes nothing).
            for (first, round) in [(0usize, 0usize), (2, 1)] {
                p.dev.complete(&chains[first], 4, 0);
                assert!(
                    p.dev.needs_interrupt(),
                    "enabled (event_idx={event_idx}, round {round})"
                );
                let Pair { drv, dev, .. } = &mut p;
                let mut got = Vec::new();
                let more = if round == 0 {
                    &chains[1..2]
                } else {
                    &chains[3..4]
                };
                // What the driver event structure holds while the drain pops: DISABLE
                // written over ENABLE; under EVENT_IDX, after the first drain's re-enable,
                // untouched: DESC at the position that re-enable named (chain 2's).
                let expect_event = if round == 1 && event_idx {
                    (dev.off_wrap(chains[2].first), EVENT_DESC)
                } else {
                    (dev.driver_event().0, EVENT_DISABLE)
                };
                let n = drv
                    .drain_used(true, |u| {
                        got.push((u.token, u.len));
                        assert_eq!(
                            dev.driver_event(),
                            expect_event,
                            "while draining (event_idx={event_idx}, round {round})"
                        );
                        if u.token == first {
                            for c in more {
                                dev.complete(c, 4, 0);
                                assert!(
                                    !dev.needs_interrupt(),
                                    "suppressed while draining (event_idx={event_idx}, round {round})"
                                );
                            }
                        }
                    })
                    .unwrap();
                assert_eq!((n, got), (2, vec![(first, 4), (first + 1, 4)]));
            }
            p.dev.complete(&chains[4], 4, 0);
            assert!(
                p.dev.needs_interrupt(),
                "re-enabled: the next completion interrupts (event_idx={event_idx}, size {size})"
            );
            assert_eq!(p.drv.drain_used(true, |u| assert_eq!(u.token, 4)), Ok(1));
            assert_eq!(p.drv.in_flight(), 0);
        }
    }
}

/// Forges the descriptor at the device's used position as used for buffer `id`, with the
/// flags of the position `positions_ahead` later (8, a whole ring: the other lap).
fn forge_used_position(p: &Pair, id: u16, positions_ahead: u64) {
    let at = p.dev.used_position();
    p.dev.forge(
        p.dev.index_of(at),
        id,
        0,
        p.dev.used_flags(at + positions_ahead),
    );
}

/// A drain that must stop at a device's lie: asserts `DeviceProtocol`, returns the tokens
/// it handed out first.
fn drain_refused(p: &mut Pair, interrupts: bool) -> Vec<usize> {
    let mut got = Vec::new();
    assert!(matches!(
        p.drv.drain_used(interrupts, |u| got.push(u.token)),
        Err(Error::DeviceProtocol { .. })
    ));
    got
}

/// The drain checks what `pop_used` checks: flags of the wrong lap at the used position
/// (at its peek, or where a round ends) and a used descriptor with nothing in flight
/// break the queue, with or without interrupts, and nothing is handed out for them.
/// Afterwards the caller's `disable_interrupts` still writes DISABLE (the drain may have
/// suppressed without writing).
#[test]
fn hostile_flags_stop_the_drain() {
    for interrupts in [true, false] {
        // At the peek: a used pattern of the other lap where chain 1 waits.
        let mut p = pair(8, true, 0);
        let s = p.segs(&[8]);
        p.drv.add(&s, &[], 1).unwrap();
        p.drv.add(&s, &[], 2).unwrap();
        let c = p.dev.pop().unwrap();
        forge_used_position(&p, c.id, 8);
        let got = drain_refused(&mut p, interrupts);
        assert!(got.is_empty(), "nothing handed out: {got:?}");
        assert_broken_then_recovers(&mut p, &[1, 2]);

        // Where a round ends: chain 1 completes, chain 2's position shows the other lap.
        // A first drain re-enables first, naming an interrupt point, so that under
        // EVENT_IDX this drain suppresses without writing.
        let mut p = pair(8, true, 0);
        p.drv.add(&s, &[], 0).unwrap();
        let c0 = p.dev.pop().unwrap();
        p.dev.complete(&c0, 0, 0);
        assert_eq!(p.drv.drain_used(true, |_| {}), Ok(1));
        p.drv.add(&s, &[], 1).unwrap();
        p.drv.add(&s, &[], 2).unwrap();
        let c1 = p.dev.pop().unwrap();
        let c2 = p.dev.pop().unwrap();
        p.dev.complete(&c1, 0, 0);
        forge_used_position(&p, c2.id, 8);
        let got = drain_refused(&mut p, interrupts);
        assert_eq!(got, [1], "the valid completion before the lie");
        assert!(p.drv.is_broken());
        p.drv.disable_interrupts();
        assert_eq!(
            p.dev.driver_event().1,
            EVENT_DISABLE,
            "disable after the drain"
        );

        // A used descriptor where nothing is in flight: chain 1 completes, and the
        // position after it is forged used in the current lap.
        let mut p = pair(8, true, 0);
        p.drv.add(&s, &[], 1).unwrap();
        let c1 = p.dev.pop().unwrap();
        p.dev.complete(&c1, 0, 0);
        forge_used_position(&p, c1.id, 0);
        let got = drain_refused(&mut p, interrupts);
        assert_eq!(got, [1], "the real completion, then the forged one refused");
        assert!(p.drv.is_broken());
    }
}

/// A drain after the caller's own `disable_interrupts`, and one after a delayed re-enable:
/// every completion is popped, and the drain returns with interrupts enabled at our used
/// position, so the next completion interrupts.
#[test]
fn drain_after_disable_and_after_delayed_enable() {
    for event_idx in [true, false] {
        let (mut p, chains) = writable_chains_in_flight(16, event_idx, 8);
        p.drv.disable_interrupts();
        p.dev.complete(&chains[0], 4, 0);
        assert!(!p.dev.needs_interrupt(), "disabled (event_idx={event_idx})");
        assert_eq!(p.drv.drain_used(true, |u| assert_eq!(u.token, 0)), Ok(1));
        p.dev.complete(&chains[1], 4, 0);
        assert!(
            p.dev.needs_interrupt(),
            "enabled by the drain (event_idx={event_idx})"
        );
        assert_eq!(p.drv.drain_used(true, |u| assert_eq!(u.token, 1)), Ok(1));

        // Delayed: with six chains in flight the interrupt point lies ahead.
        assert!(!p.drv.enable_interrupts_delayed());
        for c in &chains[2..5] {
            p.dev.complete(c, 4, 0);
        }
        let _ = p.dev.needs_interrupt();
        let mut got = Vec::new();
        assert_eq!(p.drv.drain_used(true, |u| got.push(u.token)), Ok(3));
        assert_eq!(got, [2, 3, 4]);
        p.dev.complete(&chains[5], 4, 0);
        assert!(
            p.dev.needs_interrupt(),
            "the drain re-enabled at our position (event_idx={event_idx})"
        );
    }
}

/// With EVENT_IDX, over many laps and with chains of 1–3 positions completed out of order,
/// the device interrupts exactly on the first completion after the driver caught up.
#[test]
fn event_idx_interrupt_points_across_laps() {
    for size in [3u16, 5, 8] {
        let mut p = pair(size, true, 0);
        p.drv.disable_interrupts();
        assert!(!p.drv.enable_interrupts());
        let bufs: Vec<_> = (1..=3).map(|n| p.segs(&vec![4; n])).collect();
        let mut caught_up = true;
        let rounds = if cfg!(miri) { 10 } else { 400 };
        for round in 0..rounds {
            let mut t = 0;
            loop {
                let segs = &bufs[(round + t) % bufs.len().min(size as usize)];
                if p.drv.add(segs, &[], t).is_err() {
                    break;
                }
                t += 1;
            }
            let mut chains = p.dev.pop_all();
            if round % 2 == 1 {
                chains.reverse();
            }
            for (i, c) in chains.iter().enumerate() {
                p.dev.complete(c, 0, 0);
                let irq = p.dev.needs_interrupt();
                assert_eq!(irq, caught_up, "size {size}, round {round}, completion {i}");
                caught_up = false;
                if irq || (round + i) % 3 == 0 {
                    while p.drv.pop_used().unwrap().is_some() {}
                    caught_up = true;
                }
            }
            while p.drv.pop_used().unwrap().is_some() {}
            caught_up = true;
        }
    }
}

#[test]
fn delayed_interrupt_waits_for_three_quarters() {
    let mut p = pair(32, true, 0);
    let s = p.segs(&[8]);
    for t in 0..8 {
        p.drv.add(&s, &[], t).unwrap();
    }
    let chains = p.dev.pop_all();
    p.drv.disable_interrupts();
    assert!(!p.drv.enable_interrupts_delayed());
    let mut fired = Vec::new();
    for c in &chains {
        p.dev.complete(c, 0, 0);
        fired.push(p.dev.needs_interrupt());
    }
    // 8 positions in flight → the interrupt when the used position passes next_used + 6.
    assert_eq!(fired.iter().position(|&f| f), Some(6));
}

/// The delayed point can fall inside a chain the device already returned (it skips the
/// chain's other positions, writing nothing there): re-enabling must then report the
/// pending completions, or no interrupt ever comes.
#[test]
fn delayed_reenable_reports_completions_past_the_event() {
    let mut p = pair(8, true, 0);
    let one = p.segs(&[1]);
    let three = p.segs(&[1, 1, 1]);
    p.drv.add(&one, &[], 0).unwrap(); // position 0
    p.drv.add(&three, &[], 1).unwrap(); // positions 1..4
    p.drv.add(&one, &[], 2).unwrap(); // position 4
    let chains = p.dev.pop_all();
    p.drv.disable_interrupts();
    p.dev.complete(&chains[0], 0, 0);
    p.dev.complete(&chains[1], 0, 0);
    assert!(!p.dev.needs_interrupt());
    // 5 positions busy → the delayed point is next_used + 3 = position 3: inside chain 1,
    // which the device already passed.
    let more = p.drv.enable_interrupts_delayed();
    p.dev.complete(&chains[2], 0, 0);
    let irq = p.dev.needs_interrupt();
    assert!(
        more || irq,
        "completions pending, enable_interrupts_delayed said none and no interrupt comes"
    );
    let n = std::iter::from_fn(|| p.drv.pop_used().unwrap()).count();
    assert_eq!(n, 3);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "tens of thousands of round trips; the laps they reach are reached by the others"
)]
fn many_laps_with_every_chain_shape() {
    for size in [8u16, 5, 3, 1] {
        for max_indirect in [0u16, 2, 3] {
            let max_indirect = if max_indirect > size { 0 } else { max_indirect };
            let mut p = pair(size, true, max_indirect);
            let r = p.segs(&[4]);
            let w = p.segs(&[16, 16]);
            for t in 0..20_000usize {
                let (rs, ws): (&[Segment], &[Segment]) = match t % 3 {
                    0 => (&r, &[]),
                    1 if size >= 2 || max_indirect > 0 => (&[], &w[..2.min(size as usize)]),
                    _ if size >= 3 || max_indirect >= 3 => (&r, &w),
                    _ => (&[], &w[..1]),
                };
                p.drv.add(rs, ws, t).unwrap();
                p.drv.kick_prepare();
                let c = p.dev.pop().unwrap();
                let len = (t as u32 * 7) % (c.writable_len() + 1);
                p.dev.complete(&c, len, 0);
                let u = p.drv.pop_used().unwrap().unwrap();
                assert_eq!((u.token, u.len), (t, len));
            }
            assert_eq!(p.drv.num_free(), size);
            assert_eq!(p.drv.stats().completions, 20_000);
        }
    }
}

/// The device on its own thread, reading and returning buffers while the driver adds and
/// pops: every chain the model reads is whole (each list element available in its lap, the
/// driver's exact buffers) and every completion comes back in order with its token and
/// length. A stress test only: the window in which a head written before the rest of its
/// list would be visible is a few stores wide, so it does not prove that ordering (review
/// of `add` does; see §2.8.6).
#[test]
#[cfg_attr(
    miri,
    ignore = "real concurrency over plain ring memory: Miri reports the race by design"
)]
fn concurrent_device_sees_whole_chains() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for (size, max_indirect) in [(8u16, 0u16), (7, 0), (16, 4)] {
        let p = pair(size, false, max_indirect);
        let Pair {
            mem, mut drv, dev, ..
        } = p;
        let bufs: Vec<Vec<Segment>> = (1..=4u32)
            .map(|n| {
                (0..n)
                    .map(|i| Segment::new(mem.alloc_buffer(64).daddr, 16 + i))
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<(u64, u32)>> = bufs.iter().map(|b| addr_lens(b)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let device = {
            let stop = stop.clone();
            let mut dev = dev;
            std::thread::spawn(move || {
                let mut served = 0u64;
                loop {
                    match dev.pop() {
                        Some(c) => {
                            // Shape k has k+1 segments: the last one writable.
                            let k = c.readable.len() + c.writable.len() - 1;
                            let all: Vec<_> =
                                c.readable.iter().chain(&c.writable).copied().collect();
                            assert_eq!(all, expected[k], "device saw a torn chain");
                            dev.complete(&c, c.writable_len(), 0x5A);
                            served += 1;
                        }
                        None if stop.load(Ordering::Acquire) && !dev.has_avail() => break,
                        None => std::thread::yield_now(),
                    }
                }
                served
            })
        };
        let rounds = 3_000usize;
        let mut next = 0usize;
        let mut done = 0usize;
        while done < rounds {
            if next < rounds {
                let b = &bufs[next % bufs.len()];
                let (r, w) = b.split_at(b.len() - 1);
                match drv.add(r, w, next) {
                    Ok(()) => next += 1,
                    Err(Error::QueueFull) => std::thread::yield_now(),
                    Err(e) => panic!("add: {e}"),
                }
                drv.kick_prepare();
            }
            while let Some(u) = drv.pop_used().unwrap() {
                assert_eq!(u.token, done, "completions in ring order");
                assert_eq!(u.len, 16 + (done % bufs.len()) as u32);
                done += 1;
            }
        }
        stop.store(true, Ordering::Release);
        assert_eq!(device.join().unwrap(), rounds as u64);
        assert_eq!(drv.num_free(), size);
    }
}

#[test]
fn ignored_used_len_reports_zero_and_never_breaks() {
    let mut p = pair_with(8, false, 0, true);
    let s = p.segs(&[4]);
    p.drv.add(&s, &[], 1).unwrap();
    let c = p.dev.pop().unwrap();
    p.dev.forge(0, c.id, 4096, p.dev.used_flags(0));
    assert_eq!(p.drv.pop_used().unwrap().unwrap().len, 0);
    assert!(!p.drv.is_broken());
    p.drv.add(&s, &[], 2).unwrap();
    p.dev.forge(1, 77, 0, p.dev.used_flags(1));
    assert!(matches!(
        p.drv.pop_used(),
        Err(Error::UsedIdOutOfRange { .. })
    ));
}

// ---- hostile device: each case is an error, breaks the queue until reset, and the queue
// works again after reclaim_after_reset ----

fn assert_broken_then_recovers(p: &mut Pair, in_flight: &[usize]) {
    let s = p.segs(&[1]);
    assert!(matches!(
        p.drv.add(&s, &[], 1),
        Err(Error::QueueBroken { .. })
    ));
    assert!(matches!(p.drv.pop_used(), Err(Error::QueueBroken { .. })));
    assert!(p.drv.is_broken());
    assert!(!p.drv.has_used());
    let mut got = Vec::new();
    p.drv.reclaim_after_reset(|t| got.push(t));
    got.sort();
    assert_eq!(got, in_flight, "every token in flight handed back once");
    assert!(!p.drv.is_broken());
    p.reset_device();
    for t in 0..3 * p.size as usize {
        p.drv.add(&s, &[], t).unwrap();
        let c = p.dev.pop().unwrap();
        p.dev.complete(&c, 0, 0);
        assert_eq!(p.drv.pop_used().unwrap().unwrap().token, t);
    }
}

#[test]
fn hostile_used_id_out_of_range() {
    for id in [8u16, 9, 0x7FFF, 0xFFFF] {
        let mut p = pair(8, false, 0);
        let s = p.segs(&[8]);
        p.drv.add(&s, &[], 1).unwrap();
        p.dev.pop().unwrap();
        p.dev.forge(0, id, 0, p.dev.used_flags(0));
        assert_eq!(
            p.drv.pop_used(),
            Err(Error::UsedIdOutOfRange {
                queue: 0,
                id: u32::from(id)
            })
        );
        assert_broken_then_recovers(&mut p, &[1]);
    }
}

#[test]
fn hostile_used_id_not_in_flight() {
    let mut p = pair(8, false, 0);
    let s = p.segs(&[8]);
    p.drv.add(&s, &[], 1).unwrap();
    let c = p.dev.pop().unwrap();
    let other = (c.id + 3) % 8;
    p.dev.forge(0, other, 0, p.dev.used_flags(0));
    assert_eq!(
        p.drv.pop_used(),
        Err(Error::UsedIdNotInFlight {
            queue: 0,
            id: u32::from(other)
        })
    );
    assert_broken_then_recovers(&mut p, &[1]);
}

#[test]
fn hostile_same_id_completed_twice() {
    for size in [8u16, 5] {
        let mut p = pair(size, true, 0);
        let s = p.segs(&[8]);
        p.advance_to(u64::from(size) - 1, &s);
        p.drv.add(&s, &[], 1).unwrap();
        p.drv.add(&s, &[], 2).unwrap();
        let c = p.dev.pop().unwrap();
        p.dev.complete(&c, 0, 0);
        assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 1);
        // The same id again at the next used position (index 0, second lap).
        p.dev.forge(0, c.id, 0, p.dev.used_flags(u64::from(size)));
        assert_eq!(
            p.drv.pop_used(),
            Err(Error::UsedIdNotInFlight {
                queue: 0,
                id: u32::from(c.id)
            })
        );
        assert_broken_then_recovers(&mut p, &[2]);
    }
}

#[test]
fn hostile_len_beyond_writable() {
    for max_indirect in [0u16, 4] {
        let mut p = pair(8, true, max_indirect);
        let r = p.segs(&[50]);
        let w = p.segs(&[60, 40]);
        p.drv.add(&r, &w, 3).unwrap();
        let c = p.dev.pop().unwrap();
        assert_eq!(c.indirect, max_indirect > 0);
        p.dev.forge(0, c.id, 101, p.dev.used_flags(0));
        assert_eq!(
            p.drv.pop_used(),
            Err(Error::UsedLenTooLarge {
                queue: 0,
                len: 101,
                max: 100
            })
        );
        assert_broken_then_recovers(&mut p, &[3]);
        // A read-only chain: any length is too much.
        let mut p = pair(8, true, max_indirect);
        p.drv.add(&r, &[], 4).unwrap();
        let c = p.dev.pop().unwrap();
        p.dev.forge(0, c.id, 1, p.dev.used_flags(0));
        assert!(matches!(
            p.drv.pop_used(),
            Err(Error::UsedLenTooLarge { len: 1, max: 0, .. })
        ));
        assert_broken_then_recovers(&mut p, &[4]);
    }
}

/// Flags at the driver's used position that no conforming device writes while a chain is
/// in flight there: used in the other lap (AVAIL = USED = !wrap, a device that did not
/// flip its wrap counter, or flipped it too early) or an "available" pattern of the other
/// lap (AVAIL = !wrap, USED = wrap). In either lap of the ring.
#[test]
fn hostile_used_flags_in_the_wrong_lap() {
    for lap_start in [0u64, 8, 16] {
        for bad in 0..2 {
            let mut p = pair(8, true, 0);
            let s = p.segs(&[8]);
            p.advance_to(lap_start + 2, &s);
            p.drv.add(&s, &[], 1).unwrap();
            p.drv.add(&s, &[], 2).unwrap();
            let c = p.dev.pop().unwrap();
            let at = p.dev.used_position();
            let flags = if bad == 0 {
                // Used, in the other lap.
                p.dev.used_flags(at + 8)
            } else if p.dev.wrap_of(at) {
                // Available, in the other lap (AVAIL = 0, USED = 1).
                F_USED
            } else {
                F_AVAIL
            };
            p.dev.forge(p.dev.index_of(at), c.id, 0, flags);
            let r = p.drv.pop_used();
            assert!(
                r.is_err(),
                "lap at {lap_start}, flags {flags:#x} at a position in flight: {r:?}"
            );
            assert_broken_then_recovers(&mut p, &[1, 2]);
        }
    }
}

/// The pending pattern (AVAIL = wrap, USED = !wrap) is what the driver itself wrote: not
/// used, not an error.
#[test]
fn available_pattern_at_used_position_is_just_pending() {
    let mut p = pair(8, true, 0);
    let s = p.segs(&[8]);
    p.drv.add(&s, &[], 1).unwrap();
    let c = p.dev.pop().unwrap();
    p.dev.forge(0, c.id, 0, F_AVAIL | F_WRITE);
    assert_eq!(p.drv.pop_used(), Ok(None));
    assert!(!p.drv.is_broken());
    p.dev.complete(&c, 0, 0);
    assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 1);
}

#[test]
fn hostile_used_descriptor_with_nothing_in_flight() {
    for lap_start in [0u64, 8, 16] {
        let mut p = pair(8, false, 0);
        let s = p.segs(&[8]);
        p.advance_to(lap_start + 3, &s);
        let at = p.dev.used_position();
        p.dev.forge(p.dev.index_of(at), 0, 0, p.dev.used_flags(at));
        assert!(p.drv.has_used());
        assert!(matches!(
            p.drv.pop_used(),
            Err(Error::DeviceProtocol { .. })
        ));
        assert_broken_then_recovers(&mut p, &[]);
    }
}

// ---- property tests ----

#[derive(Clone, Debug)]
enum Op {
    /// Driver adds a chain of `r` readable and `w` writable segments.
    Add {
        r: u8,
        w: u8,
    },
    /// Driver decides on (and "sends") a kick.
    Kick,
    /// Device drains the ring like QEMU: disable notifications, pop, re-enable.
    DeviceDrain,
    /// Device completes the read buffer at this position (mod count), writing a fraction.
    Complete {
        pick: u8,
        frac: u8,
    },
    /// Driver pops everything used.
    DriverPop,
    DisableIrq,
    /// Race-free re-enable; if it reports work, the driver pops.
    EnableIrq,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..4).prop_map(|(r, w)| Op::Add { r, w }),
        2 => Just(Op::Kick),
        2 => Just(Op::DeviceDrain),
        4 => (any::<u8>(), any::<u8>()).prop_map(|(pick, frac)| Op::Complete { pick, frac }),
        2 => Just(Op::DriverPop),
        1 => Just(Op::DisableIrq),
        1 => Just(Op::EnableIrq),
    ]
}

/// Chains the driver added and has not popped: token → (writable capacity, positions).
type Outstanding = HashMap<usize, (u32, u16)>;

fn driver_pop(
    drv: &mut PackedQueue,
    completed: &mut HashMap<usize, u32>,
    outstanding: &mut Outstanding,
    popped: &mut usize,
) -> Result<(), TestCaseError> {
    while let Some(u) = drv
        .pop_used()
        .map_err(|e| TestCaseError::fail(format!("{e}")))?
    {
        let want = completed.remove(&u.token);
        prop_assert_eq!(
            want,
            Some(u.len),
            "token {} popped with wrong length or twice",
            u.token
        );
        prop_assert!(outstanding.remove(&u.token).is_some());
        *popped += 1;
    }
    Ok(())
}

fn run(size: u16, event_idx: bool, indirect: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let max_indirect = if indirect { 4.min(size) } else { 0 };
    let mem = IdentityMemory::new(1 << 20);
    let layout = PackedRingLayout::new(size).unwrap();
    let ring = mem.alloc_coherent(layout.total, layout.align).unwrap();
    let pool = (max_indirect > 1).then(|| mem.alloc_coherent(size as usize * 4 * 16, 16).unwrap());
    let mut drv = PackedQueue::new(
        0,
        layout,
        ring,
        pool,
        QueueConfig {
            size,
            max_indirect,
            event_idx,
            ignore_used_len: false,
        },
    )
    .unwrap();
    let mut dev = PackedDevice::new(&mem, size, drv.addresses(), event_idx);
    let buf = mem.alloc_buffer(4096).daddr;

    let mut next_token = 0usize;
    let mut outstanding: Outstanding = HashMap::new();
    let mut device_held: VecDeque<(PackedChain, usize)> = VecDeque::new();
    let mut unseen: VecDeque<usize> = VecDeque::new();
    let mut completed: HashMap<usize, u32> = HashMap::new();
    let mut popped = 0usize;
    // Absolute ring positions the driver made available, in total and at its last kick
    // decision.
    let mut avail_pos = 0u64;
    let mut last_kick_pos = 0u64;
    let mut irq_enabled = true;
    let mut expect_interrupt_on_next_completion = true;

    for op in ops {
        match *op {
            Op::Add { r, w } => {
                let rs: Vec<_> = (0..r)
                    .map(|i| Segment::new(buf + i as u64 * 64, 64))
                    .collect();
                let ws: Vec<_> = (0..w)
                    .map(|i| Segment::new(buf + 1024 + i as u64 * 64, 64))
                    .collect();
                let n = (r + w) as u16;
                let need = if max_indirect > 1 && n > 1 && n <= max_indirect {
                    1
                } else {
                    n
                };
                let free = drv.num_free();
                match drv.add(&rs, &ws, next_token) {
                    Ok(()) => {
                        prop_assert_eq!(free - drv.num_free(), need);
                        outstanding.insert(next_token, (64 * w as u32, need));
                        unseen.push_back(next_token);
                        next_token += 1;
                        avail_pos += u64::from(need);
                    }
                    Err(Error::QueueFull) => {
                        prop_assert!(free < need, "QueueFull with {} free", free);
                    }
                    Err(Error::BadChain) => prop_assert!(n == 0 || n > size),
                    Err(e) => return Err(TestCaseError::fail(format!("add: {e}"))),
                }
            }
            Op::Kick => {
                let kicked = drv.kick_prepare();
                let wanted = dev.kick_wanted(last_kick_pos, avail_pos);
                if avail_pos - last_kick_pos < u64::from(size) {
                    prop_assert_eq!(kicked, wanted, "kick decision (event_idx={})", event_idx);
                } else {
                    // A whole ring since the last decision: the driver kicks regardless.
                    prop_assert!(kicked || !wanted, "kick lost");
                }
                last_kick_pos = avail_pos;
            }
            Op::DeviceDrain => {
                dev.disable_notifications();
                loop {
                    while let Some(c) = dev.pop() {
                        let t = unseen
                            .pop_front()
                            .expect("device read a buffer the driver never added");
                        let (cap, positions) = outstanding[&t];
                        prop_assert_eq!(c.writable_len(), cap);
                        prop_assert_eq!(c.positions, positions);
                        device_held.push_back((c, t));
                    }
                    if !dev.enable_notifications() {
                        break;
                    }
                }
                prop_assert!(unseen.is_empty());
            }
            Op::Complete { pick, frac } => {
                if device_held.is_empty() {
                    continue;
                }
                let i = pick as usize % device_held.len();
                let (c, t) = device_held.remove(i).unwrap();
                let len = (c.writable_len() as u64 * frac as u64 / 255) as u32;
                dev.complete(&c, len, frac);
                completed.insert(t, len);
                let irq = dev.needs_interrupt();
                if expect_interrupt_on_next_completion {
                    prop_assert!(irq, "interrupt lost after re-enable");
                }
                if !irq_enabled {
                    prop_assert!(!irq, "interrupt while disabled");
                }
                if irq {
                    expect_interrupt_on_next_completion = false;
                    driver_pop(&mut drv, &mut completed, &mut outstanding, &mut popped)?;
                    if irq_enabled {
                        expect_interrupt_on_next_completion = true;
                    }
                } else if irq_enabled && event_idx {
                    expect_interrupt_on_next_completion = false;
                }
            }
            Op::DriverPop => {
                driver_pop(&mut drv, &mut completed, &mut outstanding, &mut popped)?;
                if irq_enabled {
                    expect_interrupt_on_next_completion = true;
                }
            }
            Op::DisableIrq => {
                drv.disable_interrupts();
                irq_enabled = false;
                expect_interrupt_on_next_completion = false;
            }
            Op::EnableIrq => {
                irq_enabled = true;
                let more = drv.enable_interrupts();
                prop_assert_eq!(
                    more,
                    !completed.is_empty(),
                    "re-enable must report pending work"
                );
                if more {
                    driver_pop(&mut drv, &mut completed, &mut outstanding, &mut popped)?;
                }
                expect_interrupt_on_next_completion = true;
            }
        }
        // Free + in flight = ring size, and the device never holds more than was added.
        let busy: u16 = outstanding.values().map(|&(_, n)| n).sum();
        prop_assert_eq!(drv.num_free() + busy, size);
        prop_assert_eq!(drv.in_flight() as usize, outstanding.len());
        prop_assert_eq!(dev.held(), device_held.len());
    }
    dev.disable_notifications();
    while let Some(c) = dev.pop() {
        let t = unseen.pop_front().unwrap();
        device_held.push_back((c, t));
    }
    while let Some((c, t)) = device_held.pop_front() {
        dev.complete(&c, 0, 0);
        completed.insert(t, 0);
    }
    driver_pop(&mut drv, &mut completed, &mut outstanding, &mut popped)?;
    prop_assert!(
        outstanding.is_empty(),
        "tokens never completed: {:?}",
        outstanding.keys()
    );
    prop_assert_eq!(popped, next_token);
    prop_assert_eq!(drv.num_free(), size);
    Ok(())
}

fn config(native: u32, miri: u32) -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig {
            cases: miri,
            failure_persistence: None,
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            ..ProptestConfig::default()
        }
    } else {
        ProptestConfig::with_cases(native)
    }
}

fn on(what: impl std::fmt::Debug, case: Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    case.map_err(|e| match e {
        TestCaseError::Fail(why) => TestCaseError::fail(format!("{what:?}: {why}")),
        reject => reject,
    })
}

fn sequence_len() -> std::ops::Range<usize> {
    if cfg!(miri) { 100..150 } else { 1..300 }
}

/// Sizes: a power of two, and two that are not (a packed ring need not be, §2.8.10.1).
const SIZES: [u16; 3] = [16, 5, 3];

proptest! {
    // 32 cases × 12 configurations natively.
    #![proptest_config(config(32, 1))]

    #[test]
    fn random_sequences(ops in proptest::collection::vec(op(), sequence_len())) {
        for size in SIZES {
            for event_idx in [false, true] {
                for indirect in [false, true] {
                    on((size, event_idx, indirect), run(size, event_idx, indirect, &ops))?;
                }
            }
        }
    }
}

/// A device that writes arbitrary used descriptors (position, id, len, flags): the driver
/// never panics, never hands out a token twice or one not in flight, never reports more
/// than the writable capacity, and after the reset every token is accounted for once.
fn hostile(
    event_idx: bool,
    writes: &[(u16, u16, u32, u16)],
    chains: u8,
) -> Result<(), TestCaseError> {
    let size = 8u16;
    let mut p = pair(size, event_idx, 0);
    let buf = p.mem.alloc_buffer(256).daddr;
    let mut capacity = HashMap::new();
    for t in 0..chains as usize {
        let w = [Segment::new(buf, 16 * (t as u32 % 4))];
        let r = vec![Segment::new(buf, 8); 1 + t % 2];
        match p.drv.add(&r, &w[..usize::from(t % 4 != 0)], t) {
            Ok(()) => {
                capacity.insert(t, if t % 4 != 0 { 16 * (t as u32 % 4) } else { 0 });
            }
            Err(Error::QueueFull) => break,
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        }
    }
    let mut seen = HashSet::new();
    for &(idx, id, len, flags) in writes {
        p.dev.forge(idx % size, id, len, flags);
        for _ in 0..4 {
            match p.drv.pop_used() {
                Ok(Some(u)) => {
                    prop_assert!(seen.insert(u.token), "token {} completed twice", u.token);
                    let cap = capacity.get(&u.token).copied();
                    prop_assert!(cap.is_some(), "token {} never added", u.token);
                    prop_assert!(Some(u.len) <= cap);
                }
                Ok(None) => break,
                Err(_) => prop_assert!(p.drv.is_broken()),
            }
        }
    }
    let mut reclaimed = Vec::new();
    p.drv.reclaim_after_reset(|t| reclaimed.push(t));
    for t in &reclaimed {
        prop_assert!(seen.insert(*t), "token {} reclaimed after completing", t);
    }
    prop_assert_eq!(seen.len(), capacity.len(), "every token accounted for once");
    prop_assert_eq!(p.drv.num_free(), size);
    Ok(())
}

fn flags_strategy() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(0u16),
        Just(F_AVAIL),
        Just(F_USED),
        Just(F_AVAIL | F_USED),
        Just(F_AVAIL | F_USED | F_WRITE),
        any::<u16>(),
    ]
}

proptest! {
    // 128 cases × 2 configurations natively.
    #![proptest_config(config(128, 4))]

    #[test]
    fn hostile_used_descriptors_never_panic_or_double_complete(
        chains in 0u8..10,
        writes in proptest::collection::vec(
            (
                0u16..8,
                prop_oneof![0u16..10, any::<u16>()],
                prop_oneof![0u32..80, any::<u32>()],
                flags_strategy(),
            ),
            1..40,
        ),
    ) {
        for event_idx in [false, true] {
            on(event_idx, hostile(event_idx, &writes, chains))?;
        }
    }
}
