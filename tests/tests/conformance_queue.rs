//! Conformance: our driver-side split virtqueue against rust-vmm's device-side `Queue`
//! (virtio-queue 0.18) over identity-mapped `vm-memory`, both ring layouts.

use virtio_core::queue::{Segment, SplitQueue};
use virtio_core::{Error, RingLayoutKind};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::ring_device::{Chain, DeviceQueue, forge_used, split_queue_pair};

const KINDS: [RingLayoutKind; 2] = [RingLayoutKind::Legacy, RingLayoutKind::Modern];

struct Pair {
    mem: IdentityMemory,
    drv: SplitQueue,
    dev: DeviceQueue,
}

fn pair(kind: RingLayoutKind, size: u16, event_idx: bool, max_indirect: u16) -> Pair {
    pair_with(kind, size, event_idx, max_indirect, false)
}

fn pair_with(
    kind: RingLayoutKind,
    size: u16,
    event_idx: bool,
    max_indirect: u16,
    ignore_used_len: bool,
) -> Pair {
    let mem = IdentityMemory::new(16 << 20);
    let (drv, dev, _) =
        split_queue_pair(&mem, kind, size, event_idx, max_indirect, ignore_used_len);
    Pair { mem, drv, dev }
}

impl Pair {
    fn segs(&self, lens: &[u32]) -> Vec<Segment> {
        lens.iter()
            .map(|&l| Segment::new(self.mem.alloc_buffer(l as usize).daddr, l))
            .collect()
    }

    /// Writes a raw used-ring entry and bumps used.idx, as a hostile device would.
    fn forge_used(&self, slot: u16, id: u32, len: u32, new_idx: u16) {
        forge_used(&self.mem, &self.drv, slot, id, len, new_idx);
    }
}

#[test]
fn chains_of_1_to_n_segments_arrive_exactly() {
    for kind in KINDS {
        let mut p = pair(kind, 64, true, 0);
        let mut token = 0;
        // Miri (`cfg(miri)`) interprets every step: three lengths, each with every
        // readable/writable split.
        let lengths: &[usize] = if cfg!(miri) {
            &[1, 3, 6]
        } else {
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        };
        for &n in lengths {
            for readable in 0..=n {
                let r: Vec<u32> = (0..readable).map(|i| 10 + i as u32).collect();
                let w: Vec<u32> = (0..n - readable).map(|i| 100 + i as u32).collect();
                let (rs, ws) = (p.segs(&r), p.segs(&w));
                p.drv.add(&rs, &ws, token).unwrap();
                p.drv.kick_prepare();
                let chain = p.dev.pop().expect("device sees the chain");
                assert_eq!(
                    chain.readable,
                    rs.iter().map(|s| (s.addr, s.len)).collect::<Vec<_>>()
                );
                assert_eq!(
                    chain.writable,
                    ws.iter().map(|s| (s.addr, s.len)).collect::<Vec<_>>()
                );
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
                token += 1;
            }
        }
        assert_eq!(p.drv.num_free(), 64, "{kind:?}: all descriptors returned");
    }
}

#[test]
fn indirect_chain_uses_one_slot_and_device_follows_table() {
    for kind in KINDS {
        let mut p = pair(kind, 16, false, 8);
        let lens = [16, 512, 512, 512, 1];
        let rs = p.segs(&lens[..1]);
        let ws = p.segs(&lens[1..]);
        p.drv.add(&rs, &ws, 7).unwrap();
        assert_eq!(p.drv.num_free(), 15, "indirect chain takes one ring slot");
        assert_eq!(p.drv.stats().indirect, 1);
        // A single segment never goes indirect (it would save nothing).
        let one = p.segs(&[64]);
        p.drv.add(&one, &[], 8).unwrap();
        assert_eq!(p.drv.stats().indirect, 1);
        // Longer than the indirect table: falls back to direct descriptors.
        let many = p.segs(&[1; 10]);
        p.drv.add(&many, &[], 9).unwrap();
        assert_eq!(p.drv.num_free(), 16 - 1 - 1 - 10);
        let chains = p.dev.pop_all();
        assert_eq!(chains.len(), 3);
        assert_eq!(chains[0].readable.len(), 1);
        assert_eq!(chains[0].writable.len(), 4);
        assert_eq!(chains[2].readable.len(), 10);
        for c in chains.iter().rev() {
            let l = c.writable_len();
            p.dev.complete(c, l, 1);
        }
        let tokens: Vec<_> = std::iter::from_fn(|| p.drv.pop_used().unwrap())
            .map(|u| u.token)
            .collect();
        assert_eq!(tokens, [9, 8, 7]);
        assert_eq!(p.drv.num_free(), 16);
    }
}

#[test]
fn event_idx_kick_suppression() {
    for kind in KINDS {
        let mut p = pair(kind, 32, true, 0);
        assert!(
            !p.dev.enable_notifications(),
            "idle device, nothing pending"
        );
        let s = p.segs(&[8]);
        p.drv.add(&s, &[], 1).unwrap();
        assert!(p.drv.kick_prepare(), "idle device must be kicked");
        p.drv.add(&s, &[], 2).unwrap();
        assert!(
            !p.drv.kick_prepare(),
            "device already notified and has not caught up"
        );
        assert!(!p.drv.kick_prepare(), "nothing new: no kick");
        // Device processes: disable, drain, re-enable (QEMU's loop).
        p.dev.disable_notifications();
        assert_eq!(p.dev.pop_all().len(), 2);
        assert!(!p.dev.enable_notifications());
        p.drv.add(&s, &[], 3).unwrap();
        assert!(p.drv.kick_prepare(), "device idle again");
        let st = p.drv.stats();
        assert_eq!((st.kicks, st.kicks_suppressed), (2, 1));
    }
}

#[test]
fn flag_kick_suppression() {
    let mut p = pair(RingLayoutKind::Modern, 32, false, 0);
    let s = p.segs(&[8]);
    p.drv.add(&s, &[], 1).unwrap();
    assert!(p.drv.kick_prepare());
    p.dev.disable_notifications();
    p.drv.add(&s, &[], 2).unwrap();
    assert!(!p.drv.kick_prepare(), "device set NO_NOTIFY");
    p.dev.pop_all();
    assert!(!p.dev.enable_notifications());
    p.drv.add(&s, &[], 3).unwrap();
    assert!(p.drv.kick_prepare());
}

/// A 32-entry ring with four 32-byte device-writable chains (tokens 0..4) added and taken
/// by the device.
fn four_in_flight(kind: RingLayoutKind, event_idx: bool) -> (Pair, Vec<Chain>) {
    let mut p = pair(kind, 32, event_idx, 0);
    let w = p.segs(&[32]);
    for t in 0..4 {
        p.drv.add(&[], &w, t).unwrap();
    }
    let chains = p.dev.pop_all();
    (p, chains)
}

#[test]
fn interrupt_suppression_and_race_free_reenable() {
    for event_idx in [true, false] {
        for kind in KINDS {
            let (mut p, chains) = four_in_flight(kind, event_idx);
            p.drv.disable_interrupts();
            for c in &chains[..3] {
                p.dev.complete(c, 4, 0);
                assert!(
                    !p.dev.needs_interrupt(),
                    "suppressed (event_idx={event_idx})"
                );
            }
            // Work arrived while disabled: re-enable must report it.
            assert!(p.drv.enable_interrupts());
            while p.drv.pop_used().unwrap().is_some() {}
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

/// `SplitQueue::drain_used` (the bus's completion loop in one pass): interrupts stay
/// suppressed while it pops, what completes meanwhile is popped in the same call, and the
/// re-enable at the end makes the next completion interrupt.
#[test]
fn drain_pops_what_completes_meanwhile_and_reenables() {
    for event_idx in [true, false] {
        for kind in KINDS {
            let (mut p, chains) = four_in_flight(kind, event_idx);
            assert_eq!(p.drv.drain_used(true, |_| panic!("nothing used")), Ok(0));
            p.dev.complete(&chains[0], 4, 0);
            assert!(p.dev.needs_interrupt(), "enabled (event_idx={event_idx})");
            let Pair { drv, dev, .. } = &mut p;
            let mut got = Vec::new();
            let n = drv
                .drain_used(true, |u| {
                    got.push((u.token, u.len));
                    if u.token == 0 {
                        for c in &chains[1..3] {
                            dev.complete(c, 4, 0);
                            assert!(!dev.needs_interrupt(), "suppressed while draining");
                        }
                    }
                })
                .unwrap();
            assert_eq!((n, got), (3, vec![(0, 4), (1, 4), (2, 4)]));
            p.dev.complete(&chains[3], 4, 0);
            assert!(
                p.dev.needs_interrupt(),
                "re-enabled: the next completion interrupts"
            );
            assert_eq!(p.drv.drain_used(true, |u| assert_eq!(u.token, 3)), Ok(1));
            assert_eq!(p.drv.in_flight(), 0);
        }
    }
}

/// A lying used index stops the drain with its error and breaks the queue: no entry is
/// handed out on the strength of the lie.
#[test]
fn hostile_used_idx_jump_stops_the_drain() {
    let mut p = pair(RingLayoutKind::Modern, 8, true, 0);
    let s = p.segs(&[8]);
    p.drv.add(&s, &[], 1).unwrap();
    p.drv.add(&s, &[], 2).unwrap();
    let c = p.dev.pop().unwrap();
    p.forge_used(0, c.head as u32, 0, 1);
    // A second entry, then the index jumps past both chains in flight.
    p.forge_used(1, c.head as u32 + 1, 0, 9);
    let mut got = Vec::new();
    assert!(matches!(
        p.drv.drain_used(true, |u| got.push(u.token)),
        Err(Error::UsedIdxJump { used_idx: 9, .. })
    ));
    assert!(got.is_empty(), "the jump is seen before any entry: {got:?}");
    assert!(matches!(
        p.drv.drain_used(true, |_| {}),
        Err(Error::QueueBroken { .. })
    ));
    assert_broken(&mut p);
}

#[test]
fn delayed_interrupt_waits_for_three_quarters() {
    let mut p = pair(RingLayoutKind::Modern, 32, true, 0);
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
    // 8 in flight → interrupt after 6 completions (used_event = last_used + 6).
    assert_eq!(fired.iter().position(|&f| f), Some(6));
}

#[test]
#[cfg_attr(
    miri,
    ignore = "70,000 round trips; the wrap is u16 arithmetic, the ring slots it reaches are \
              the ones every other test reaches"
)]
fn index_wraps_past_65536() {
    for kind in KINDS {
        let mut p = pair(kind, 8, true, 4);
        let r = p.segs(&[4]);
        let w = p.segs(&[16, 16]);
        for t in 0..70_000usize {
            p.drv.add(&r, &w, t).unwrap();
            p.drv.kick_prepare();
            let c = p.dev.pop().unwrap();
            p.dev.complete(&c, (t % 33) as u32, 0);
            let u = p.drv.pop_used().unwrap().unwrap();
            assert_eq!((u.token, u.len), (t, (t % 33) as u32));
        }
        assert_eq!(p.drv.num_free(), 8);
        assert_eq!(p.drv.stats().completions, 70_000);
    }
}

#[test]
fn full_ring_backpressure_and_recovery() {
    let mut p = pair(RingLayoutKind::Modern, 8, false, 0);
    let s = p.segs(&[8]);
    for t in 0..8 {
        p.drv.add(&s, &[], t).unwrap();
    }
    assert_eq!(p.drv.add(&s, &[], 99), Err(Error::QueueFull));
    let chains = p.dev.pop_all();
    p.dev.complete(&chains[5], 0, 0);
    p.drv.pop_used().unwrap().unwrap();
    let two = p.segs(&[1, 1]);
    assert_eq!(
        p.drv.add(&two, &[], 100),
        Err(Error::QueueFull),
        "needs 2, 1 free"
    );
    p.drv.add(&s, &[], 101).unwrap();
    // A chain longer than the ring can never fit.
    let nine = p.segs(&[1; 9]);
    assert_eq!(p.drv.add(&nine, &[], 102), Err(Error::BadChain));
    assert_eq!(p.drv.add(&[], &[], 103), Err(Error::BadChain));
}

#[test]
fn out_of_order_completion() {
    for kind in KINDS {
        let mut p = pair(kind, 16, true, 0);
        for t in 0..16usize {
            let segs = p.segs(&vec![8; 1 + t % 3]);
            if p.drv.add(&segs, &[], t).is_err() {
                break;
            }
        }
        let chains = p.dev.pop_all();
        let order = [3usize, 0, 5, 1, 4, 2];
        for &i in &order {
            p.dev.complete(&chains[i], 0, 0);
        }
        let tokens: Vec<_> = std::iter::from_fn(|| p.drv.pop_used().unwrap())
            .map(|u| u.token)
            .collect();
        assert_eq!(tokens, order);
        // Free list stays consistent: the whole ring is usable again after all complete.
        let rest: Vec<_> = (0..chains.len()).filter(|i| !order.contains(i)).collect();
        for &i in &rest {
            p.dev.complete(&chains[i], 0, 0);
        }
        while p.drv.pop_used().unwrap().is_some() {}
        assert_eq!(p.drv.num_free(), 16);
        let s = p.segs(&[1; 16]);
        p.drv.add(&s, &[], 1000).unwrap();
        assert_eq!(p.dev.pop().unwrap().readable.len(), 16);
    }
}

// ---- hostile device: each case yields its documented error and breaks the queue ----

fn assert_broken(p: &mut Pair) {
    let s = p.segs(&[1]);
    assert!(matches!(
        p.drv.add(&s, &[], 1),
        Err(Error::QueueBroken { .. })
    ));
    assert!(matches!(p.drv.pop_used(), Err(Error::QueueBroken { .. })));
    assert!(p.drv.is_broken());
}

#[test]
fn hostile_used_id_out_of_range() {
    for kind in KINDS {
        let mut p = pair(kind, 8, false, 0);
        let s = p.segs(&[8]);
        p.drv.add(&s, &[], 1).unwrap();
        p.forge_used(0, 8, 0, 1);
        assert_eq!(
            p.drv.pop_used(),
            Err(Error::UsedIdOutOfRange { queue: 0, id: 8 })
        );
        assert_broken(&mut p);
        let mut p = pair(kind, 8, false, 0);
        p.drv.add(&s, &[], 1).unwrap();
        p.forge_used(0, u32::MAX, 0, 1);
        assert!(matches!(
            p.drv.pop_used(),
            Err(Error::UsedIdOutOfRange { .. })
        ));
    }
}

#[test]
fn hostile_double_completion_and_forged_id() {
    let mut p = pair(RingLayoutKind::Modern, 8, false, 0);
    let s = p.segs(&[8]);
    p.drv.add(&s, &[], 1).unwrap();
    p.drv.add(&s, &[], 2).unwrap();
    let c = p.dev.pop().unwrap();
    p.dev.complete(&c, 0, 0);
    assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 1);
    // Same id again: a double completion.
    p.forge_used(1, c.head as u32, 0, 2);
    assert_eq!(
        p.drv.pop_used(),
        Err(Error::UsedIdNotInFlight {
            queue: 0,
            id: c.head as u32
        })
    );
    assert_broken(&mut p);
    // An id that is a non-head descriptor of a chain in flight.
    let mut p = pair(RingLayoutKind::Modern, 8, false, 0);
    let three = p.segs(&[1, 1, 1]);
    p.drv.add(&three, &[], 5).unwrap();
    p.forge_used(0, 1, 0, 1);
    assert_eq!(
        p.drv.pop_used(),
        Err(Error::UsedIdNotInFlight { queue: 0, id: 1 })
    );
}

#[test]
fn hostile_len_beyond_writable() {
    for kind in KINDS {
        let mut p = pair(kind, 8, true, 4);
        let r = p.segs(&[50]);
        let w = p.segs(&[60, 40]);
        p.drv.add(&r, &w, 3).unwrap();
        let c = p.dev.pop().unwrap();
        p.forge_used(0, c.head as u32, 101, 1);
        assert_eq!(
            p.drv.pop_used(),
            Err(Error::UsedLenTooLarge {
                queue: 0,
                len: 101,
                max: 100
            })
        );
        assert_broken(&mut p);
    }
}

#[test]
fn hostile_used_idx_jump() {
    for jump in [2u16, 9, 0x8000, 0xFFFF] {
        let mut p = pair(RingLayoutKind::Modern, 8, false, 0);
        let s = p.segs(&[8]);
        p.drv.add(&s, &[], 1).unwrap();
        let c = p.dev.pop().unwrap();
        p.forge_used(0, c.head as u32, 0, jump);
        assert!(
            matches!(p.drv.pop_used(), Err(Error::UsedIdxJump { used_idx, .. }) if used_idx == jump),
            "jump to {jump}"
        );
        assert_broken(&mut p);
    }
}

#[test]
fn reset_reclaims_in_flight_tokens_and_recovers() {
    let mut p = pair(RingLayoutKind::Modern, 8, true, 0);
    let s = p.segs(&[8]);
    for t in 10..14 {
        p.drv.add(&s, &[], t).unwrap();
    }
    p.forge_used(0, 99, 0, 1);
    assert!(p.drv.pop_used().is_err());
    let mut got = Vec::new();
    p.drv.reclaim_after_reset(|t| got.push(t));
    got.sort();
    assert_eq!(got, [10, 11, 12, 13]);
    // A fresh device-side queue on the same ring works again from index 0.
    let mut dev = DeviceQueue::new(&p.mem, 8, p.drv.addresses(), true);
    p.drv.add(&s, &[], 20).unwrap();
    let c = dev.pop().unwrap();
    dev.complete(&c, 0, 0);
    assert_eq!(p.drv.pop_used().unwrap().unwrap().token, 20);
}

#[test]
fn ignored_used_len_reports_zero_and_never_breaks() {
    // Legacy balloon devices wrote the buffer length into used.len; on such a queue the
    // length is neither trusted nor checked.
    let mut p = pair_with(RingLayoutKind::Legacy, 8, false, 0, true);
    let s = p.segs(&[4]);
    p.drv.add(&s, &[], 1).unwrap();
    let c = p.dev.pop().unwrap();
    p.forge_used(0, c.head as u32, 4096, 1);
    assert_eq!(p.drv.pop_used().unwrap().unwrap().len, 0);
    assert!(!p.drv.is_broken());
    // Every other check still holds.
    p.drv.add(&s, &[], 2).unwrap();
    p.forge_used(1, 77, 0, 2);
    assert!(matches!(
        p.drv.pop_used(),
        Err(Error::UsedIdOutOfRange { .. })
    ));
}
