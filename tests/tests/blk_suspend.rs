//! virtio-blk sleep and wake (`BlkDriver::suspend` / `resume`) against the simulated
//! function and `blk_model`: requests in flight when the host sleeps (completed but not
//! polled, split requests partly done, requests the device never saw), every caller token
//! completing exactly once, submissions held while suspended, a fresh negotiation of the
//! same features and every queue rebuilt on resume, the held and aborted requests
//! resubmitted and the disk ending up exactly as written; hostile devices (never
//! completing, faulting while the driver waits, coming back with fewer features).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion};
use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::{Error, Segment, VirtioDevice};
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::blk_model::{BlkModel, bits};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{LifecycleStep, Sim, SimBars, SimConfig, SimIrq, SimMode};

type Dev = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;
type Outcome = Result<Completion, BlkError>;

use virtio_tests::sim::MODES;
const RING: u64 = bits::INDIRECT_DESC | bits::EVENT_IDX | bits::BAD_FEATURE;
const SECTORS: u64 = 8192;
/// A write of this size is split into four device requests (seg_max 4 x size_max 4096).
const SPLIT_BYTES: u32 = 65536;

struct Rig {
    sim: Sim,
    mem: IdentityMemory,
    model: BlkModel,
    drv: BlkDriver<Dev>,
    /// Every completion, in order: (token, outcome).
    done: Vec<(usize, Outcome)>,
    buf: DmaRegion,
}

fn model(queues: u16) -> BlkModel {
    let mut m = BlkModel::new(SECTORS);
    m.features = bits::SEG_MAX | bits::SIZE_MAX | bits::FLUSH | bits::BLK_SIZE;
    m.seg_max = 4;
    m.size_max = 4096;
    if queues > 1 {
        m.features |= bits::MQ;
        m.num_queues = queues;
    }
    m
}

fn rig(mode: SimMode, pref: Preference, model: BlkModel, generic: u64) -> Rig {
    let sim = model.sim_builder(mode, generic, 64, 32 << 20).build();
    let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let drv = BlkDriver::new(dev, BlkOptions::default()).expect("blk init");
    let mem = sim.memory();
    let buf = mem.alloc_coherent(4 << 20, 4096).unwrap();
    Rig {
        sim,
        mem,
        model,
        drv,
        done: Vec::new(),
        buf,
    }
}

/// The data of write `token` (64 KiB at sector `token * 128`).
fn pattern(token: usize) -> Vec<u8> {
    (0..SPLIT_BYTES as usize)
        .map(|i| (i as u8).wrapping_mul(13) ^ (token as u8).wrapping_mul(101) ^ (i >> 9) as u8)
        .collect()
}

impl Rig {
    /// Write `token`'s data buffer: one of the 64 64-KiB pieces of `buf` (the tests never
    /// have two tokens 64 apart in flight).
    fn segment(&self, token: usize) -> Segment {
        Segment::new(
            self.buf.daddr + (token % 64) as u64 * u64::from(SPLIT_BYTES),
            SPLIT_BYTES,
        )
    }

    /// Submits write `token` (its data placed in the buffer first) on `queue`.
    fn write(&mut self, queue: u16, token: usize) -> Result<(), BlkError> {
        let seg = self.segment(token);
        self.mem
            .bytes_at(seg.addr, seg.len as usize)
            .copy_from_slice(&pattern(token));
        self.drv.write(queue, token as u64 * 128, &[seg], token)
    }

    /// The device completes `chain` with status OK without touching the data (a write
    /// part it carried out, as far as the driver can tell).
    fn complete_ok(&self, queue: u16, chain: &virtio_tests::sim::Chain) {
        let status = chain.descs.last().expect("status descriptor");
        self.mem.bytes_at(status.addr, 1)[0] = 0;
        self.sim.complete(queue, chain.head, 1);
    }

    /// Polls every queue (as an interrupt would make the caller do).
    fn poll(&mut self) {
        let done = &mut self.done;
        for q in 0..self.drv.num_queues() {
            self.drv
                .poll_completions(q, |t, r| done.push((t, r)))
                .expect("poll");
        }
    }

    /// The device serves every queue; the driver polls.
    fn run(&mut self) {
        self.drv.kick_all().unwrap();
        for q in 0..self.drv.num_queues() {
            self.model.serve(&self.sim, q);
        }
        self.poll();
    }

    fn suspend(&mut self, drain_polls: u32) -> virtio_blk::SuspendReport {
        let done = &mut self.done;
        self.drv
            .suspend(drain_polls, |t, r| done.push((t, r)))
            .expect("suspend")
    }

    /// Each token completed exactly once; returns the outcomes by token.
    fn outcomes(&self) -> BTreeMap<usize, Outcome> {
        let mut m = BTreeMap::new();
        for (t, r) in &self.done {
            assert!(m.insert(*t, *r).is_none(), "token {t} completed twice");
        }
        m
    }

    fn disk_has(&self, token: usize) -> bool {
        let off = token * 128 * 512;
        self.model.disk[off..off + SPLIT_BYTES as usize] == pattern(token)[..]
    }

    fn assert_clean(&self) {
        assert!(
            self.model.violations.is_empty(),
            "{:?}",
            self.model.violations
        );
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
    }
}

/// Suspend with requests in every state and no time to drain: completed and not polled
/// (reported with their results), split requests partly done and requests the device never
/// saw (aborted, once each); submissions held while suspended; resume rebuilds every queue
/// with the same features; the caller resubmits; the disk ends up holding every write.
#[test]
fn suspend_mid_traffic_aborts_once_and_resubmitted_work_lands() {
    for (mode, pref) in MODES {
        for queues in [1u16, 4] {
            if queues > 1 && mode == SimMode::Legacy {
                continue;
            }
            let what = format!("{mode:?}/{pref:?} {queues} queues");
            let mut r = rig(mode, pref, model(queues), RING);
            assert_eq!(r.drv.num_queues(), queues);
            let features = r.sim.driver_features();
            // Tokens 0..4 complete on the device (not polled yet), 4..8 the device never
            // sees; token 8 is split in four and the device does two parts.
            for t in 0..4 {
                r.write(t as u16 % queues, t).unwrap();
            }
            r.drv.kick_all().unwrap();
            for q in 0..queues {
                r.model.serve(&r.sim, q);
            }
            for t in 4..8 {
                r.write(t as u16 % queues, t).unwrap();
            }
            r.write(0, 8).unwrap();
            r.drv.kick(0).unwrap();
            let chains = r.sim.pop_chains(0);
            let split: Vec<_> = chains.iter().rev().take(4).rev().cloned().collect();
            assert_eq!(split.len(), 4, "{what}");
            // Two parts of token 8 done by the device; the rest of the popped chains held.
            for c in &split[..2] {
                r.complete_ok(0, c);
            }
            let resets = r.sim.resets();
            r.sim.clear_events();

            let s = r.suspend(0);
            assert_eq!((s.completed, s.aborted), (4, 5), "{what}: {s:?}");
            let out = r.outcomes();
            assert_eq!(out.len(), 9, "{what}");
            for t in 0..4 {
                assert_eq!(out[&t], Ok(Completion::Done), "{what}: token {t}");
            }
            for t in 4..9 {
                assert_eq!(out[&t], Err(BlkError::Aborted), "{what}: token {t}");
            }
            assert_eq!(r.sim.resets(), resets + 1);
            assert_eq!(r.sim.lifecycle(), vec![LifecycleStep::Reset], "{what}");
            assert_eq!(r.sim.status(), 0);
            for q in 0..queues {
                assert!(!r.sim.queue_info(q).unwrap().enabled, "{what}");
            }

            // Held while suspended.
            assert!(r.drv.is_suspended());
            assert_eq!(r.write(0, 9), Err(BlkError::QueueFull));
            assert_eq!(r.drv.flush(0, 10), Err(BlkError::QueueFull));
            assert_eq!(r.drv.kick(0), Ok(false));
            assert_eq!(r.drv.poll_completions(0, |_, _| panic!("nothing")), Ok(0));
            assert_eq!(r.drv.restart(), Err(BlkError::Virtio(Error::InvalidState)));
            assert_eq!(
                r.drv.suspend(0, |_, _| {}).unwrap_err(),
                BlkError::Virtio(Error::InvalidState)
            );

            let rep = r.drv.resume().unwrap();
            r.sim.check_init_order().unwrap();
            assert_eq!(r.sim.driver_features(), features, "{what}");
            assert_eq!(rep.features.bits(), features);
            assert_eq!(rep.queues, queues);
            assert!(!rep.capacity_changed);
            for q in 0..queues {
                assert!(r.sim.queue_info(q).unwrap().enabled, "{what}: queue {q}");
            }
            // Resubmit what was aborted and what was held.
            r.done.clear();
            for t in 4..10 {
                if t == 9 {
                    r.write(1 % queues, 9).unwrap();
                } else {
                    r.write(t as u16 % queues, t).unwrap();
                }
            }
            r.run();
            let out = r.outcomes();
            assert_eq!(out.len(), 6, "{what}");
            assert!(out.values().all(|o| *o == Ok(Completion::Done)), "{what}");
            for t in 0..10 {
                assert!(r.disk_has(t), "{what}: write {t} on the disk");
            }
            r.drv.flush(0, 11).unwrap();
            r.run();
            r.assert_clean();
        }
    }
}

/// With a bound to wait, a device working beside the driver completes everything: no
/// request is aborted.
#[test]
fn suspend_lets_in_flight_requests_complete_within_the_bound() {
    let mut r = rig(SimMode::Modern, Preference::Auto, model(1), RING);
    for t in 0..6 {
        r.write(0, t).unwrap();
    }
    // Not kicked: `suspend` must notify before it waits.
    let sim = r.sim.clone();
    let mut model = r.model.clone();
    let server = std::thread::spawn(move || {
        let start = Instant::now();
        let mut served = 0;
        while served < 24 && start.elapsed() < Duration::from_secs(10) {
            if sim.kicks(0) > 0 {
                served += model.serve(&sim, 0);
            }
            std::thread::yield_now();
        }
        (served, model)
    });
    let s = r.suspend(u32::MAX);
    let (served, model) = server.join().unwrap();
    r.model = model;
    assert_eq!(served, 24, "6 writes of 4 device requests");
    assert_eq!((s.completed, s.aborted), (6, 0), "{s:?}");
    assert!(s.drain_polls < u32::MAX);
    let out = r.outcomes();
    assert!(out.values().all(|o| *o == Ok(Completion::Done)));
    assert!((0..6).all(|t| r.disk_has(t)));
    r.drv.resume().unwrap();
    r.write(0, 6).unwrap();
    r.run();
    assert!(r.disk_has(6));
}

/// A device that never completes: the wait stops at the bound and everything is aborted
/// once; a device that forges a completion while the driver waits: the fault is reported,
/// the reset happens anyway, every token still completes once.
#[test]
fn hostile_devices_during_suspend() {
    let mut r = rig(SimMode::Modern, Preference::Auto, model(1), RING);
    for t in 0..3 {
        r.write(0, t).unwrap();
    }
    r.drv.kick(0).unwrap();
    let _held = r.sim.pop_chains(0);
    let start = Instant::now();
    let s = r.suspend(50_000);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(s.drain_polls, 50_000);
    assert_eq!((s.completed, s.aborted), (0, 3), "{s:?}");
    assert_eq!(r.outcomes().len(), 3);
    r.drv.resume().unwrap();

    r.done.clear();
    for t in 0..2 {
        r.write(0, t).unwrap();
    }
    r.drv.kick(0).unwrap();
    let chains = r.sim.pop_chains(0);
    r.complete_ok(0, &chains[0]);
    r.sim.complete_raw(0, 5000, 1);
    let s = r.suspend(1000);
    assert!(
        matches!(
            s.drain_error,
            Some(BlkError::Virtio(Error::UsedIdOutOfRange { .. }))
        ),
        "{s:?}"
    );
    assert_eq!(s.aborted, 2, "{s:?}");
    let out = r.outcomes();
    assert_eq!(out.len(), 2);
    assert!(out.values().all(|o| *o == Err(BlkError::Aborted)));
    r.drv.resume().unwrap();
    r.write(0, 0).unwrap();
    r.write(0, 1).unwrap();
    r.done.clear();
    r.run();
    assert_eq!(r.outcomes().len(), 2);
    assert!(r.disk_has(0) && r.disk_has(1));
    r.assert_clean();
}

/// The device comes back offering fewer features: resume fails with a value naming the
/// lost bit, the device is left FAILED with no queue, the driver stays suspended (requests
/// still held), nothing leaks; once the device offers them again, resume works.
#[test]
fn resume_with_fewer_features_fails_cleanly() {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let m = model(1);
        let offered = m.features | RING | if mode == SimMode::Legacy { 0 } else { 1 << 32 };
        let mut r = rig(mode, pref, m, RING);
        r.write(0, 0).unwrap();
        r.suspend(0);
        for lost in [bits::FLUSH, bits::SEG_MAX, bits::INDIRECT_DESC] {
            r.sim.set_offered_features(offered & !lost);
            let e = r.drv.resume().unwrap_err();
            assert_eq!(
                e,
                BlkError::Virtio(Error::MissingFeature {
                    bit: lost.trailing_zeros()
                }),
                "{what}"
            );
            assert!(r.drv.is_suspended(), "{what}");
            assert_eq!(r.sim.status() & 0x84, 0x80, "{what}: FAILED, not DRIVER_OK");
            assert!(!r.sim.queue_info(0).unwrap().enabled, "{what}");
            assert_eq!(r.write(0, 1), Err(BlkError::QueueFull), "{what}");
        }
        r.sim.set_offered_features(offered);
        r.drv.resume().unwrap();
        r.done.clear();
        r.write(0, 0).unwrap();
        r.run();
        assert_eq!(r.outcomes()[&0], Ok(Completion::Done), "{what}");
        r.assert_clean();
    }
}

/// Nothing leaks: a driver dropped while suspended, or after a failed resume, gives back
/// every byte it took.
#[test]
fn drop_while_suspended_or_after_failed_resume_frees_everything() {
    for fail_resume in [false, true] {
        let m = model(4);
        let sim = m.sim_builder(SimMode::Modern, RING, 64, 32 << 20).build();
        let mem = sim.memory();
        let free0 = mem.free_bytes();
        let t = probe(sim.config_space(), sim.bars(), Preference::Auto).unwrap();
        let mut drv = BlkDriver::new(
            VirtioDevice::new(t, sim.memory(), sim.irq()),
            BlkOptions::default(),
        )
        .unwrap();
        drv.flush(2, 1).unwrap();
        let mut n = 0;
        drv.suspend(0, |_, _| n += 1).unwrap();
        assert_eq!(n, 1);
        if fail_resume {
            sim.set_offered_features(sim.offered_features() & !bits::MQ);
            assert!(drv.resume().is_err());
        }
        drop(drv);
        assert_eq!(mem.free_bytes(), free0, "fail_resume {fail_resume}");
    }
}

/// The configuration is read again: a disk resized while the host slept is reported, and
/// requests beyond the old end work.
#[test]
fn capacity_change_while_asleep_is_reported() {
    let mut r = rig(SimMode::Modern, Preference::Auto, model(1), RING);
    r.suspend(0);
    r.model.resize(SECTORS * 2);
    r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
    let rep = r.drv.resume().unwrap();
    assert!(rep.capacity_changed);
    assert_eq!(rep.capacity, SECTORS * 2);
    let beyond_old_end = (SECTORS as usize * 2) / 128 - 1;
    r.write(0, beyond_old_end).unwrap();
    r.run();
    assert_eq!(r.outcomes()[&beyond_old_end], Ok(Completion::Done));
    assert!(r.disk_has(beyond_old_end));
    // Counters span the reset: the guest's kicks keep matching the device's.
    let kicks = r.drv.queue_stats(0).unwrap().kicks;
    assert_eq!(kicks, r.sim.kicks(0));
}

/// Each resize is reported once, against the capacity the caller last heard of: a resume
/// that failed after reading the configuration (no memory for the rings) reports nothing
/// and the one that works reports it; a restart reports what it found, and a resize back
/// to the earlier size after it is reported too.
#[test]
fn each_resize_is_reported_once_by_whichever_call_finds_it() {
    let mut r = rig(SimMode::Modern, Preference::Auto, model(1), RING);
    r.suspend(0);
    r.model.resize(SECTORS * 2);
    r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
    let mem = r.sim.memory();
    mem.fail_allocations_after(Some(0));
    assert_eq!(r.drv.resume(), Err(BlkError::Virtio(Error::DmaAlloc)));
    mem.fail_allocations_after(None);
    assert_eq!(
        r.drv.info().capacity,
        SECTORS * 2,
        "the failed resume read it"
    );
    let rep = r.drv.resume().unwrap();
    assert_eq!((rep.capacity, rep.capacity_changed), (SECTORS * 2, true));

    // A restart that finds the disk resized reports it; a resize back to the size before
    // is then a change too.
    r.drv.abort_all(|_, _| {});
    r.model.resize(SECTORS * 3);
    r.sim.set_device_config(0, &(SECTORS * 3).to_le_bytes());
    assert_eq!(r.drv.restart(), Ok(Some(SECTORS * 3)));
    assert_eq!(r.drv.handle_config_change(), Ok(None), "reported once");
    r.model.resize(SECTORS * 2);
    r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
    r.sim.raise_config_interrupt();
    let irq = r.drv.handle_interrupt(None).unwrap();
    assert_eq!(irq.capacity_changed, Some(SECTORS * 2));
    r.drv.abort_all(|_, _| {});
    assert_eq!(r.drv.restart(), Ok(None), "nothing new");
}

/// While the driver has the device reset (suspended, or aborted and not restarted) it leaves
/// it alone: an interrupt announcing DEVICE_NEEDS_RESET or a configuration change is taken
/// (the ISR read) but reports nothing to do, the configuration is not read (writeback may
/// not be read before FEATURES_OK, §5.2.5.1) and the write cache not set; `resume` and
/// `restart` then bring the device back and report what changed.
#[test]
fn a_reset_device_is_left_alone_until_it_is_brought_back() {
    let mut m = model(1);
    m.features |= bits::CONFIG_WCE;
    m.writeback = 1;
    let mut r = rig(SimMode::Modern, Preference::Auto, m, RING);
    let nothing = virtio_blk::BlkInterrupt::default();
    r.suspend(0);
    r.sim.trigger_needs_reset();
    assert_eq!(
        r.drv.handle_interrupt(None),
        Ok(nothing),
        "DEVICE_NEEDS_RESET"
    );
    r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
    r.sim.raise_config_interrupt();
    assert_eq!(r.drv.handle_interrupt(None), Ok(nothing), "config change");
    assert_eq!(r.sim.peek_isr(), 0, "both acknowledged");
    assert_eq!(r.drv.poll_completions(0, |_, _| {}), Ok(0));
    assert_eq!(
        r.drv.handle_config_change(),
        Err(BlkError::Virtio(Error::InvalidState))
    );
    assert_eq!(r.drv.set_writeback(false), Err(BlkError::QueueFull));
    assert_eq!(r.sim.device_config()[32], 1, "writeback untouched");
    let rep = r.drv.resume().unwrap();
    assert_eq!((rep.capacity, rep.capacity_changed), (SECTORS * 2, true));
    r.drv.set_writeback(false).unwrap();
    assert_eq!(r.sim.device_config()[32], 0);

    // Aborted (stopped, not suspended), until `restart`.
    r.drv.abort_all(|_, _| {});
    r.sim.trigger_needs_reset();
    assert_eq!(r.drv.handle_interrupt(None), Ok(nothing));
    assert_eq!(r.drv.poll_completions(0, |_, _| {}), Ok(0));
    assert_eq!(
        r.drv.set_writeback(true),
        Err(BlkError::Virtio(Error::InvalidState))
    );
    assert_eq!(r.sim.device_config()[32], 0, "writeback untouched");
    r.drv.restart().unwrap();
    r.drv.set_writeback(true).unwrap();
    r.write(0, 0).unwrap();
    r.run();
    assert_eq!(r.outcomes()[&0], Ok(Completion::Done));
    r.assert_clean();
}
