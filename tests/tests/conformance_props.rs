//! Property test: random sequences of driver and device actions on one queue, our driver
//! against rust-vmm's `virtio-queue`. Checks that every token completes exactly once with
//! the length the device wrote, that kicks happen exactly when the device asked for them,
//! and that no interrupt is lost after a race-free re-enable.
//!
//! Each generated case runs on every configuration (both ring layouts, with and without
//! EVENT_IDX, and indirect tables for the sequences), so even the handful of cases Miri runs
//! (`cfg(miri)`: the same code under the interpreter, far slower) reaches every code path.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use virtio_core::platform::Dma;
use virtio_core::queue::{QueueConfig, Segment, SplitQueue};
use virtio_core::ring::SplitRingLayout;
use virtio_core::{Error, RingLayoutKind};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::ring_device::{Chain, split_queue_pair};

#[derive(Clone, Debug)]
enum Op {
    /// Driver adds a chain of `r` readable and `w` writable segments.
    Add {
        r: u8,
        w: u8,
    },
    /// Driver decides on (and "sends") a kick.
    Kick,
    /// Device drains the avail ring like QEMU: disable notifications, pop, re-enable.
    DeviceDrain,
    /// Device completes the popped chain at this position (mod count), writing a fraction.
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

fn run(
    kind: RingLayoutKind,
    event_idx: bool,
    indirect: bool,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let size = 16u16;
    let max_indirect = if indirect { 4 } else { 0 };
    let mem = IdentityMemory::new(8 << 20);
    let (mut drv, mut dev, _) = split_queue_pair(&mem, kind, size, event_idx, max_indirect, false);
    let buf = mem.alloc_buffer(4096).daddr;

    let mut next_token = 0usize;
    // token → writable capacity, for chains the driver added and has not popped.
    let mut outstanding: HashMap<usize, u32> = HashMap::new();
    // Chains the device popped and has not completed, with their tokens.
    let mut device_held: VecDeque<(Chain, usize)> = VecDeque::new();
    // Order in which the driver added tokens not yet seen by the device.
    let mut unseen: VecDeque<usize> = VecDeque::new();
    // token → len the device reported.
    let mut completed: HashMap<usize, u32> = HashMap::new();
    let mut popped = 0usize;
    // Model of notification state, in plain integers (no wrap within one case): the avail
    // index at the device's last drain (where it re-enabled notifications), and at the last
    // kick decision.
    let mut added_total = 0usize;
    let mut drain_pos = 0usize;
    let mut last_kick_pos = 0usize;
    let mut irq_enabled = true;
    let mut expect_interrupt_on_next_completion = true;

    let driver_pop = |drv: &mut SplitQueue,
                      completed: &mut HashMap<usize, u32>,
                      outstanding: &mut HashMap<usize, u32>,
                      popped: &mut usize|
     -> Result<(), TestCaseError> {
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
    };

    for op in ops {
        match *op {
            Op::Add { r, w } => {
                let rs: Vec<_> = (0..r)
                    .map(|i| Segment::new(buf + i as u64 * 64, 64))
                    .collect();
                let ws: Vec<_> = (0..w)
                    .map(|i| Segment::new(buf + 1024 + i as u64 * 64, 64))
                    .collect();
                match drv.add(&rs, &ws, next_token) {
                    Ok(()) => {
                        outstanding.insert(next_token, 64 * w as u32);
                        unseen.push_back(next_token);
                        next_token += 1;
                        added_total += 1;
                    }
                    Err(Error::QueueFull) => {
                        let n = r + w;
                        let need = if indirect && n > 1 && n <= 4 {
                            1
                        } else {
                            n as u16
                        };
                        prop_assert!(
                            drv.num_free() < need,
                            "QueueFull with {} free",
                            drv.num_free()
                        );
                    }
                    Err(Error::BadChain) => prop_assert_eq!(r + w, 0),
                    Err(e) => return Err(TestCaseError::fail(format!("add: {e}"))),
                }
            }
            Op::Kick => {
                let kicked = drv.kick_prepare();
                // EVENT_IDX: the device asked to be told once something is added past the
                // position where it went idle (avail_event = drain_pos), unless an earlier
                // kick already covered that. Flags: an idle device wants every new batch.
                let expected = if event_idx {
                    last_kick_pos <= drain_pos && drain_pos < added_total
                } else {
                    added_total > last_kick_pos
                };
                prop_assert_eq!(kicked, expected, "kick decision (event_idx={})", event_idx);
                last_kick_pos = added_total;
            }
            Op::DeviceDrain => {
                dev.disable_notifications();
                loop {
                    while let Some(c) = dev.pop() {
                        let t = unseen
                            .pop_front()
                            .expect("device popped a chain the driver never added");
                        let cap = outstanding[&t];
                        prop_assert_eq!(c.writable_len(), cap);
                        device_held.push_back((c, t));
                    }
                    if !dev.enable_notifications() {
                        break;
                    }
                }
                prop_assert!(unseen.is_empty());
                drain_pos = added_total;
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
                    // The driver's interrupt handler pops.
                    driver_pop(&mut drv, &mut completed, &mut outstanding, &mut popped)?;
                    if irq_enabled {
                        expect_interrupt_on_next_completion = true;
                    }
                } else if irq_enabled && event_idx {
                    // With EVENT_IDX the device interrupts once per used_event crossing; the
                    // driver has not caught up, so no new interrupt is owed.
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
    }
    // Drain everything: every token completes exactly once.
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

const KINDS: [RingLayoutKind; 2] = [RingLayoutKind::Legacy, RingLayoutKind::Modern];

/// Proptest settings: `native` cases natively; under Miri `miri` cases, without a
/// regressions file (Miri isolates the test from the file system) and with the XorShift
/// generator (ChaCha costs ten times more interpreted).
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

/// Runs `case` on configuration `what`, naming it in a failure.
fn on(what: impl std::fmt::Debug, case: Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    case.map_err(|e| match e {
        TestCaseError::Fail(why) => TestCaseError::fail(format!("{what:?}: {why}")),
        reject => reject,
    })
}

/// Operations per random sequence: under Miri a single case, so never a short one.
fn sequence_len() -> std::ops::Range<usize> {
    if cfg!(miri) { 80..120 } else { 1..300 }
}

proptest! {
    // 32 cases × 8 configurations: 256 runs natively.
    #![proptest_config(config(32, 1))]

    #[test]
    fn random_sequences(ops in proptest::collection::vec(op(), sequence_len())) {
        for kind in KINDS {
            for event_idx in [false, true] {
                for indirect in [false, true] {
                    on((kind, event_idx, indirect), run(kind, event_idx, indirect, &ops))?;
                }
            }
        }
    }
}

/// A device that writes arbitrary used-ring contents: the driver must never panic, never
/// hand out a token twice or one not in flight, never report more than the writable
/// capacity, and after the reset every token is accounted for exactly once.
fn hostile(
    kind: RingLayoutKind,
    event_idx: bool,
    writes: &[(u16, u16, u32, u32)],
    chains: u8,
) -> Result<(), TestCaseError> {
    use vm_memory::{Bytes, GuestAddress};
    let size = 8u16;
    let mem = IdentityMemory::new(4 << 20);
    let layout = SplitRingLayout::new(kind, size).unwrap();
    let ring = mem.alloc_coherent(layout.total, layout.align).unwrap();
    let base = ring.daddr;
    let mut drv = SplitQueue::new(
        0,
        layout,
        ring,
        None,
        QueueConfig {
            size,
            max_indirect: 0,
            event_idx,
            ignore_used_len: false,
        },
    )
    .unwrap();
    let buf = mem.alloc_buffer(256).daddr;
    let mut capacity = HashMap::new();
    for t in 0..chains as usize {
        let w = [Segment::new(buf, 16 * (t as u32 % 4))];
        match drv.add(&[Segment::new(buf, 8)], &w[..usize::from(t % 4 != 0)], t) {
            Ok(()) => {
                capacity.insert(t, if t % 4 != 0 { 16 * (t as u32 % 4) } else { 0 });
            }
            Err(Error::QueueFull) => break,
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        }
    }
    let g = mem.guest_memory();
    let mut seen = std::collections::HashSet::new();
    for &(slot, idx, id, len) in writes {
        let at = base + layout.used_ring(slot) as u64;
        g.write_obj(id.to_le(), GuestAddress(at)).unwrap();
        g.write_obj(len.to_le(), GuestAddress(at + 4)).unwrap();
        g.write_obj(idx.to_le(), GuestAddress(base + layout.used_idx() as u64))
            .unwrap();
        for _ in 0..4 {
            match drv.pop_used() {
                Ok(Some(u)) => {
                    prop_assert!(seen.insert(u.token), "token {} completed twice", u.token);
                    let cap = capacity.get(&u.token).copied();
                    prop_assert!(cap.is_some(), "token {} never added", u.token);
                    prop_assert!(Some(u.len) <= cap);
                }
                Ok(None) => break,
                Err(_) => prop_assert!(drv.is_broken()),
            }
        }
    }
    let mut reclaimed = Vec::new();
    drv.reclaim_after_reset(|t| reclaimed.push(t));
    for t in &reclaimed {
        prop_assert!(seen.insert(*t), "token {} reclaimed after completing", t);
    }
    prop_assert_eq!(seen.len(), capacity.len(), "every token accounted for once");
    prop_assert_eq!(drv.num_free(), size);
    Ok(())
}

proptest! {
    // 128 cases × 4 configurations: 512 runs natively.
    #![proptest_config(config(128, 4))]

    #[test]
    fn hostile_used_ring_never_panics_or_double_completes(
        chains in 0u8..10,
        writes in proptest::collection::vec(
            (0u16..8, prop_oneof![0u16..12, any::<u16>()], prop_oneof![0u32..10, any::<u32>()], prop_oneof![0u32..80, any::<u32>()]),
            1..40,
        ),
    ) {
        for kind in KINDS {
            for event_idx in [false, true] {
                on((kind, event_idx), hostile(kind, event_idx, &writes, chains))?;
            }
        }
    }
}
