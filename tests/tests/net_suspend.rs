//! virtio-net sleep and wake (`VirtioNet::suspend` / `resume`) against the simulated
//! function and the device-side backend of `net_model`: a device reset in the middle of
//! traffic, every transmit token back exactly once, receive buffers back in the pool, a
//! fresh negotiation of the same features, the caller's filters replayed through the
//! control queue, and traffic going on; hostile devices (never completing, faulting while
//! the driver waits, coming back with fewer features).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use virtio_core::platform::DmaRegion;
use virtio_core::{Bus, Error, Segment};
use virtio_net::features as f;
use virtio_net::{GuestOffloads, NetConfig, NetError, TxOffload, VirtioNet};
use virtio_pci::Preference;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::net_model::{
    self, CTRL, CtrlCommand, CtrlResponder, NetModel, RX, SimNetBus, TX,
};
use virtio_tests::sim::{LifecycleStep, Sim, SimBuilder, SimMode};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const NEW_MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
const V1: u64 = 1 << 32;
const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);
/// QEMU 7.2's virtio-net with a vnet-header backend, the control features included.
const QEMU: u64 = f::CSUM
    | f::GUEST_CSUM
    | f::CTRL_GUEST_OFFLOADS
    | f::MAC
    | f::GUEST_TSO4
    | f::GUEST_TSO6
    | f::HOST_TSO4
    | f::HOST_TSO6
    | f::MRG_RXBUF
    | f::STATUS
    | f::CTRL_VQ
    | f::CTRL_RX
    | f::CTRL_VLAN
    | f::CTRL_MAC_ADDR
    | f::ANY_LAYOUT
    | RING
    | V1;

use virtio_tests::sim::MODES;

struct Rig {
    sim: Sim,
    model: NetModel,
    net: VirtioNet<SimNetBus>,
    mem: IdentityMemory,
    keep: Vec<DmaRegion>,
    /// Tokens handed back so far, with how often (must end at exactly once each).
    returned: BTreeMap<usize, u32>,
}

fn sim(mode: SimMode, features: u64, queues: &[u16]) -> Sim {
    SimBuilder::new(mode, 1)
        .features(features)
        .queues(queues)
        .device_config(&net_model::config_bytes(MAC, 1, 1500, 10_000, 1))
        .memory_len(24 << 20)
        .build()
}

fn rig_on(sim: Sim, pref: Preference, nc: NetConfig) -> Rig {
    let net = VirtioNet::new(net_model::bus(&sim, pref), nc).expect("virtio-net init");
    Rig {
        model: NetModel::new(&sim),
        mem: sim.memory(),
        sim,
        net,
        keep: Vec::new(),
        returned: BTreeMap::new(),
    }
}

fn rig(mode: SimMode, pref: Preference, features: u64) -> Rig {
    rig_on(
        sim(mode, features, &[256, 256, 64]),
        pref,
        NetConfig::default(),
    )
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    net_model::frame(MAC, len, seed)
}

fn segments(mem: &IdentityMemory, keep: &mut Vec<DmaRegion>, data: &[u8]) -> Vec<Segment> {
    let buf = mem.alloc_buffer(data.len());
    mem.slice(&buf)[..data.len()].copy_from_slice(data);
    let seg = Segment::new(buf.daddr, data.len() as u32);
    keep.push(buf);
    vec![seg]
}

impl Rig {
    fn send(&mut self, data: &[u8], token: usize) -> Result<(), NetError> {
        let segs = segments(&self.mem, &mut self.keep, data);
        self.net
            .transmit(&segs, &TxOffload::NONE, token)
            .map(|_| ())
    }

    fn send_deferred(&mut self, data: &[u8], token: usize) -> Result<(), NetError> {
        let segs = segments(&self.mem, &mut self.keep, data);
        self.net
            .transmit_deferred(&segs, &TxOffload::NONE, token)
            .map(|_| ())
    }

    fn note(returned: &mut BTreeMap<usize, u32>, token: usize) {
        *returned.entry(token).or_default() += 1;
    }

    fn reclaim(&mut self) -> (Vec<usize>, bool) {
        let mut toks = Vec::new();
        let r = self.net.tx_reclaim(|t| toks.push(t)).expect("reclaim");
        for &t in &toks {
            Self::note(&mut self.returned, t);
        }
        (toks, r.restart)
    }

    fn suspend(&mut self, drain_polls: u32) -> virtio_net::SuspendReport {
        let returned = &mut self.returned;
        self.net
            .suspend(drain_polls, |t| Self::note(returned, t))
            .expect("suspend")
    }

    fn receive(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.net
            .rx_poll(1000, |fr| {
                let mut v = vec![0u8; fr.len()];
                assert_eq!(fr.copy_to(&mut v), Some(fr.len()));
                out.push(v);
            })
            .expect("rx_poll");
        out
    }

    /// Every token in `tokens` came back exactly once, and no other.
    fn assert_each_once(&self, tokens: impl IntoIterator<Item = usize>) {
        let want: BTreeMap<usize, u32> = tokens.into_iter().map(|t| (t, 1)).collect();
        assert_eq!(self.returned, want, "tokens back, with how often");
    }

    fn assert_clean(&self) {
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
    }
}

fn hdr() -> [u8; 12] {
    [0; 12]
}

/// The caller's settings the tests set before suspending, as the device sees them.
fn set_filters(r: &mut Rig) -> Vec<(u8, u8, Vec<Vec<u8>>)> {
    let resp = CtrlResponder::ok(&r.sim);
    r.net.set_mac_address(NEW_MAC).unwrap();
    r.net.set_promisc(false).unwrap();
    r.net.set_allmulti(true).unwrap();
    let uc = [[0x02, 1, 2, 3, 4, 5]];
    let mc = [[0x01, 0, 0x5E, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
    r.net.set_mac_filter(&uc, &mc).unwrap();
    r.net.vlan_add(5).unwrap();
    r.net.vlan_add(4000).unwrap();
    r.net.vlan_add(7).unwrap();
    r.net.vlan_del(7).unwrap();
    r.net
        .set_guest_offloads(GuestOffloads {
            csum: true,
            tso4: true,
            ..Default::default()
        })
        .unwrap();
    let log = resp.stop();
    assert_eq!(log.len(), 9);
    // What a replay must send: the same state, in Linux's order, VLAN 7 no longer there.
    let mut uct = vec![1, 0, 0, 0];
    uct.extend_from_slice(&uc[0]);
    let mut mct = vec![2, 0, 0, 0];
    mct.extend_from_slice(&mc[0]);
    mct.extend_from_slice(&mc[1]);
    vec![
        (1, 1, vec![NEW_MAC.to_vec()]),
        (0, 0, vec![vec![0]]),
        (0, 1, vec![vec![1]]),
        (1, 0, vec![uct, mct]),
        (2, 0, vec![vec![5, 0]]),
        (2, 0, vec![4000u16.to_le_bytes().to_vec()]),
        (5, 0, vec![vec![0x82, 0, 0, 0, 0, 0, 0, 0]]),
    ]
}

fn commands(log: &[CtrlCommand]) -> Vec<(u8, u8, Vec<Vec<u8>>)> {
    log.iter()
        .map(|c| (c.class, c.command, c.data.clone()))
        .collect()
}

/// Suspend in the middle of traffic — frames completed but not reclaimed, frames the
/// device holds, frames queued without a kick, received frames not yet delivered — with
/// no time to drain; resume; traffic goes on. In every transport mode.
#[test]
fn suspend_mid_traffic_resume_and_traffic_continues() {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = rig(mode, pref, QEMU);
        let expected_replay = set_filters(&mut r);
        let features_before = r.sim.driver_features();
        let (nbufs, posted) = r.net.rx_buffers();
        assert_eq!(nbufs, posted);

        // Traffic: 0..3 completed by the device (not reclaimed yet), 3..6 held by the
        // device, 6..8 queued without a kick; two received frames not delivered.
        for t in 0..3 {
            r.send(&frame(100 + t, t as u8), t).unwrap();
        }
        assert_eq!(r.model.take_tx().len(), 3);
        for t in 3..6 {
            r.send(&frame(200 + t, t as u8), t).unwrap();
        }
        let held = r.model.hold_tx();
        assert_eq!(held.len(), 3);
        for t in 6..8 {
            r.send_deferred(&frame(300 + t, t as u8), t).unwrap();
        }
        // Three frames arrive; the caller takes one (the driver has fetched all three),
        // so two stay undelivered in the driver.
        let first = frame(64, 0xA1);
        r.model.inject_rx(hdr(), &first).unwrap();
        r.model.inject_rx(hdr(), &frame(5000, 0xA2)).unwrap();
        r.model.inject_rx(hdr(), &frame(70, 0xA3)).unwrap();
        let mut got = Vec::new();
        r.net
            .rx_poll(1, |fr| {
                let mut v = vec![0u8; fr.len()];
                fr.copy_to(&mut v);
                got.push(v);
            })
            .unwrap();
        assert_eq!(got, vec![first]);
        let resets = r.sim.resets();
        r.sim.clear_events();

        let s = r.suspend(0);
        assert_eq!(s.tx_completed, 3, "{what}: {s:?}");
        assert_eq!(s.tx_reclaimed, 5, "{what}: {s:?}");
        // The 5000-byte frame spans several mergeable buffers, the 70-byte one one.
        assert!(s.rx_dropped >= 3, "{what}: {s:?}");
        assert_eq!(s.rx_reclaimed + s.rx_dropped, nbufs, "{what}: {s:?}");
        assert_eq!(s.drain_polls, 0);
        assert_eq!(s.drain_error, None);
        r.assert_each_once(0..8);
        assert!(r.net.is_suspended() && r.net.tx_stopped());
        // The device saw one reset and is idle: status 0, no queue enabled.
        assert_eq!(r.sim.lifecycle(), vec![LifecycleStep::Reset], "{what}");
        assert!(r.sim.resets() > resets);
        assert_eq!(r.sim.status(), 0);
        for q in [RX, TX, CTRL] {
            assert!(!r.sim.queue_info(q).unwrap().enabled, "{what}: queue {q}");
        }
        assert_eq!(r.net.rx_buffers(), (nbufs, 0));

        // While suspended: backpressure on transmit, nothing to receive or reclaim, no
        // control commands.
        let sent_before = r.net.stats().tx_frames;
        assert_eq!(r.send(&frame(60, 9), 100), Err(NetError::Busy));
        assert_eq!(r.net.stats().tx_frames, sent_before);
        assert_eq!(r.reclaim(), (vec![], false));
        assert!(r.receive().is_empty());
        assert_eq!(r.net.tx_kick(), Ok(false));
        assert_eq!(
            r.net.set_promisc(true),
            Err(NetError::Core(Error::InvalidState))
        );
        assert_eq!(
            r.net.suspend(0, |_| {}).unwrap_err(),
            NetError::Core(Error::InvalidState)
        );
        assert!(
            r.sim
                .events()
                .iter()
                .all(|e| !matches!(e, virtio_tests::sim::SimEvent::Notify { .. }))
        );

        // Resume: a fresh §3.1.1 initialisation with the same features, the filters
        // replayed.
        let resp = CtrlResponder::ok(&r.sim);
        let rep = r.net.resume().expect("resume");
        let log = resp.stop();
        r.sim.check_init_order().unwrap();
        assert_eq!(r.sim.driver_features(), features_before, "{what}");
        assert_eq!(rep.features.bits(), features_before);
        assert_eq!(commands(&log), expected_replay, "{what}");
        assert_eq!((rep.restored, rep.restore_failed), (7, 0), "{what}");
        assert!(rep.link_up && r.net.link_up());
        assert_eq!(rep.rx_posted, nbufs);
        assert_eq!(r.net.rx_buffers(), (nbufs, nbufs));
        assert!(!r.net.is_suspended());
        assert_eq!(r.net.mac(), NEW_MAC);
        assert_eq!(r.model.rx_available(), nbufs, "{what}: buffers reposted");

        // The caller restarts its queue on the next reclaim; traffic continues.
        assert_eq!(r.reclaim(), (vec![], true));
        assert!(!r.net.tx_stopped());
        let a = frame(1514, 0x51);
        r.send(&a, 20).unwrap();
        r.send(&frame(60, 0x52), 21).unwrap();
        let tx = r.model.take_tx();
        assert_eq!(tx.len(), 2, "{what}");
        assert_eq!(tx[0].data, a);
        assert_eq!(r.reclaim(), (vec![20, 21], false));
        let b = frame(3000, 0x53);
        r.model.inject_rx(hdr(), &b).unwrap();
        assert_eq!(r.receive(), vec![b], "{what}");
        r.assert_each_once((0..8).chain([20, 21]));
        let st = r.net.stats();
        assert_eq!((st.suspends, st.resumes), (1, 1));
        r.assert_clean();
    }
}

/// With a bound to wait, the frames in flight complete normally (a device working beside
/// the driver): nothing is reclaimed, every token comes back once, as completed.
#[test]
fn suspend_lets_in_flight_transmits_complete_within_the_bound() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU);
    for t in 0..10 {
        r.send_deferred(&frame(100, t as u8), t).unwrap();
    }
    // The device serves the transmit queue from its own thread, once notified.
    let sim = r.sim.clone();
    let server = std::thread::spawn(move || {
        let mut model = NetModel::new(&sim);
        let mut served = 0;
        let start = Instant::now();
        while served < 10 && start.elapsed() < Duration::from_secs(10) {
            if sim.kicks(TX) > 0 {
                served += model.take_tx().len();
            }
            std::thread::yield_now();
        }
        served
    });
    let s = r.suspend(u32::MAX);
    assert_eq!(server.join().unwrap(), 10);
    assert_eq!((s.tx_completed, s.tx_reclaimed), (10, 0), "{s:?}");
    assert!(s.drain_polls < u32::MAX);
    r.assert_each_once(0..10);
    r.net.resume().unwrap();
    assert_eq!(r.reclaim(), (vec![], true));
    r.send(&frame(100, 1), 50).unwrap();
    assert_eq!(r.model.take_tx().len(), 1);
    assert_eq!(r.reclaim().0, vec![50]);
    r.assert_clean();
}

/// A device that never completes: the wait ends after exactly the bound, and every frame
/// comes back through the reset.
#[test]
fn device_that_never_completes_is_bounded() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU);
    for t in 0..20 {
        r.send(&frame(100, t as u8), t).unwrap();
    }
    let _held = r.model.hold_tx();
    let start = Instant::now();
    let s = r.suspend(100_000);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(s.drain_polls, 100_000);
    assert_eq!((s.tx_completed, s.tx_reclaimed), (0, 20), "{s:?}");
    r.assert_each_once(0..20);
    r.net.resume().unwrap();
    assert_eq!(r.reclaim(), (vec![], true));
    r.send(&frame(100, 1), 99).unwrap();
    assert_eq!(r.model.take_tx().len(), 1);
    r.assert_clean();
}

/// A device that breaks the ring while the driver waits (an id that was never posted):
/// the fault is reported, the reset still happens, every token still comes back once, and
/// resume brings back a working queue (the reset clears the broken state).
#[test]
fn device_fault_while_draining_still_resets_and_returns_everything() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU);
    for t in 0..4 {
        r.send(&frame(100, t as u8), t).unwrap();
    }
    let held = r.model.hold_tx();
    r.model
        .complete_tx(&held[..1].iter().map(|x| x.0.clone()).collect::<Vec<_>>());
    r.sim.complete_raw(TX, 999, 0);
    r.sim.signal_used(TX);
    let s = r.suspend(1000);
    assert!(
        matches!(
            s.drain_error,
            Some(NetError::Core(Error::UsedIdOutOfRange { .. }))
        ),
        "{s:?}"
    );
    assert_eq!((s.tx_completed, s.tx_reclaimed), (1, 3), "{s:?}");
    r.assert_each_once(0..4);
    r.net.resume().unwrap();
    r.reclaim();
    r.send(&frame(100, 1), 10).unwrap();
    assert_eq!(r.model.take_tx().len(), 1);
    assert_eq!(r.reclaim().0, vec![10]);
}

/// The device comes back offering fewer features than were negotiated: resume fails with
/// a value naming the lost bit, the device is left FAILED with no queue, the driver stays
/// suspended and owns the same memory; once the device offers them again, resume works.
#[test]
fn resume_with_fewer_features_fails_cleanly_and_can_be_retried() {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = rig(mode, pref, QEMU);
        r.send(&frame(100, 1), 1).unwrap();
        let s = r.suspend(0);
        assert_eq!(s.tx_reclaimed, 1);
        for lost in [f::MRG_RXBUF, f::CTRL_VQ | f::CTRL_RX | f::CTRL_VLAN] {
            let free_suspended = r.mem.free_bytes();
            r.sim.set_offered_features(QEMU & !lost);
            r.sim.clear_events();
            let e = r.net.resume().unwrap_err();
            assert_eq!(
                e,
                NetError::Core(Error::MissingFeature {
                    bit: lost.trailing_zeros()
                }),
                "{what}"
            );
            assert!(r.net.is_suspended(), "{what}");
            assert_eq!(r.sim.status() & 0x80, 0x80, "{what}: device left FAILED");
            assert_eq!(r.sim.status() & 0x04, 0, "{what}: no DRIVER_OK");
            for q in [RX, TX, CTRL] {
                assert!(!r.sim.queue_info(q).unwrap().enabled, "{what}: queue {q}");
            }
            assert_eq!(r.mem.free_bytes(), free_suspended, "{what}: nothing leaked");
            assert_eq!(r.net.rx_buffers().1, 0);
            assert_eq!(r.send(&frame(60, 2), 2), Err(NetError::Busy));
        }
        // Fewer ring features the bus would have used are as fatal as device features.
        r.sim.set_offered_features(QEMU & !(1 << 28));
        assert_eq!(
            r.net.resume().unwrap_err(),
            NetError::Core(Error::MissingFeature { bit: 28 }),
            "{what}"
        );
        r.sim.set_offered_features(QEMU);
        r.net.resume().unwrap();
        r.sim.check_init_order().unwrap();
        assert_eq!(r.reclaim(), (vec![], true));
        r.send(&frame(100, 3), 3).unwrap();
        assert_eq!(r.model.take_tx().len(), 1, "{what}");
        assert_eq!(r.reclaim().0, vec![3]);
        r.assert_each_once([1, 3]);
        r.assert_clean();
    }
}

/// Settings the device refuses to take back do not fail the resume: they are counted and
/// the first error is kept. A device offering more ring features than before is fine.
#[test]
fn replay_refused_by_the_device_is_reported_not_fatal() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU & !(1 << 29));
    let _ = set_filters(&mut r);
    r.suspend(0);
    r.sim.set_offered_features(QEMU);
    // The device now answers VIRTIO_NET_ERR to receive-mode commands.
    let resp = CtrlResponder::spawn(&r.sim, Box::new(|c| u8::from(c.class == 0)));
    let rep = r.net.resume().unwrap();
    drop(resp);
    assert_eq!((rep.restored, rep.restore_failed), (7, 2), "{rep:?}");
    assert_eq!(
        rep.restore_error,
        Some(NetError::CtrlRejected {
            class: 0,
            command: 0
        })
    );
    assert!(rep.features.bits() & (1 << 29) != 0, "EVENT_IDX taken now");
    r.reclaim();
    r.send(&frame(100, 1), 1).unwrap();
    assert_eq!(r.model.take_tx().len(), 1);
}

/// Link status and MTU are read again: the link went down while the host slept; a legacy
/// device without CTRL_MAC_ADDR gets the driver's address in its config again.
#[test]
fn link_status_and_legacy_mac_after_resume() {
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU | f::MTU);
    assert_eq!(r.net.mtu(), Some(1500));
    r.suspend(0);
    r.model.set_status(false, false);
    let mut cfg = net_model::config_bytes(MAC, 0, 1400, 10_000, 1);
    cfg.truncate(12);
    r.sim.set_device_config(0, &cfg);
    let rep = r.net.resume().unwrap();
    assert!(!rep.link_up && !r.net.link_up());
    assert_eq!((rep.mtu, r.net.mtu()), (Some(1400), Some(1400)));

    // Legacy, no MAC and no control queue: the random address went to the config field.
    let sim = sim(
        SimMode::Legacy,
        (QEMU & !(f::MAC | f::CTRL_VQ | f::CTRL_RX | f::CTRL_VLAN | f::CTRL_MAC_ADDR))
            & 0xFFFF_FFFF,
        &[256, 256],
    );
    let mut r = rig_on(
        sim,
        Preference::Auto,
        NetConfig {
            mac_seed: 7,
            ..Default::default()
        },
    );
    let mac = r.net.mac();
    assert_eq!(r.sim.device_config()[..6], mac);
    r.suspend(0);
    // QEMU puts its own address back on reset.
    r.sim.set_device_config(0, &[0; 6]);
    let rep = r.net.resume().unwrap();
    assert_eq!(rep.restored, 1);
    assert_eq!(r.sim.device_config()[..6], mac);
    r.assert_clean();
}

/// Repeated cycles under a steady stream: the bus's queue counters span the resets (they
/// keep matching the notifications the device saw), and nothing leaks across cycles.
#[test]
fn repeated_cycles_keep_counters_and_memory() {
    let mut r = rig(SimMode::Transitional, Preference::Auto, QEMU);
    // One buffer for every frame, so the test itself allocates nothing in the loop.
    let data = frame(120, 0x77);
    let seg = segments(&r.mem, &mut r.keep, &data);
    let mut free_after_resume = None;
    let mut token = 0;
    for cycle in 0..6u32 {
        for _ in 0..7 {
            r.net.transmit(&seg, &TxOffload::NONE, token).unwrap();
            token += 1;
        }
        r.model.take_tx();
        r.model.inject_rx(hdr(), &frame(90, cycle as u8)).unwrap();
        assert_eq!(r.receive().len(), 1);
        r.net.transmit(&seg, &TxOffload::NONE, token).unwrap();
        token += 1;
        let s = r.suspend(if cycle % 2 == 0 { 0 } else { 1000 });
        assert_eq!(s.tx_completed + s.tx_reclaimed, 8, "{s:?}");
        r.net.resume().unwrap();
        let free = r.mem.free_bytes();
        assert_eq!(
            *free_after_resume.get_or_insert(free),
            free,
            "cycle {cycle}"
        );
        assert_eq!(r.reclaim(), (vec![], true));
    }
    r.assert_each_once(0..token);
    for q in [RX, TX] {
        let kicks = r.net.bus().queue_stats(q).unwrap().kicks;
        assert_eq!(kicks, r.sim.kicks(q), "queue {q}: guest kicks vs device");
    }
    assert!(r.net.bus().queue_stats(TX).unwrap().added >= token as u64);
    assert_eq!(r.net.stats().suspends, 6);
    r.assert_clean();
}

/// Dropping the driver while suspended, or after a failed resume, gives back every byte.
#[test]
fn drop_while_suspended_frees_everything() {
    let sim = sim(SimMode::Modern, QEMU, &[256, 256, 64]);
    let mem = sim.memory();
    let free0 = mem.free_bytes();
    let mut r = rig_on(sim, Preference::Auto, NetConfig::default());
    let seg = segments(&r.mem, &mut r.keep, &frame(100, 1));
    r.net.transmit(&seg, &TxOffload::NONE, 1).unwrap();
    r.suspend(0);
    r.sim.set_offered_features(QEMU & !f::STATUS);
    assert!(r.net.resume().is_err());
    let Rig {
        net,
        keep,
        returned,
        ..
    } = r;
    drop(net);
    assert_eq!(returned.get(&1), Some(&1));
    for b in keep {
        // SAFETY: a test buffer the device no longer sees (the device was reset).
        unsafe { virtio_core::platform::Dma::free_coherent(&mem, b) };
    }
    assert_eq!(mem.free_bytes(), free0, "driver memory leaked");
}
