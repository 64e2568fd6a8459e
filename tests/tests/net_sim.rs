//! virtio-net over `VirtioDevice<PciTransport<..>>` and the simulated function, with the
//! device-side network backend of `net_model`, in modern, transitional and legacy modes.

use virtio_core::platform::DmaRegion;
use virtio_core::{Error, Segment};
use virtio_net::features as f;
use virtio_net::{
    GsoKind, GuestOffloads, NetConfig, NetError, RxCsum, RxGso, RxMode, TxOffload, VirtioNet,
};
use virtio_pci::Preference;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::net_model::{self, CTRL, CtrlResponder, NetModel, SimNetBus, TX};
use virtio_tests::sim::{SimBuilder, SimMode};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30) | (1 << 24);
const V1: u64 = 1 << 32;
/// What QEMU 7.2's virtio-net offers with a vnet-header backend (plus ANY_LAYOUT, which the
/// legacy interface shows).
const QEMU: u64 = f::CSUM
    | f::GUEST_CSUM
    | f::CTRL_GUEST_OFFLOADS
    | f::MAC
    | f::GUEST_TSO4
    | f::GUEST_TSO6
    | f::GUEST_ECN
    | f::GUEST_UFO
    | f::HOST_TSO4
    | f::HOST_TSO6
    | f::HOST_ECN
    | f::HOST_UFO
    | f::MRG_RXBUF
    | f::STATUS
    | f::CTRL_VQ
    | f::CTRL_RX
    | f::CTRL_VLAN
    | f::CTRL_RX_EXTRA
    | f::GUEST_ANNOUNCE
    | f::CTRL_MAC_ADDR
    | f::ANY_LAYOUT
    | f::GSO
    | RING
    | V1;

use virtio_tests::sim::{MODES, walk_allocation_failures};

struct Rig {
    model: NetModel,
    net: VirtioNet<SimNetBus>,
    mem: IdentityMemory,
    keep: Vec<DmaRegion>,
}

fn rig_with(
    mode: SimMode,
    pref: Preference,
    features: u64,
    config: Vec<u8>,
    queues: &[u16],
    nc: NetConfig,
) -> Rig {
    let sim = SimBuilder::new(mode, 1)
        .features(features)
        .queues(queues)
        .device_config(&config)
        .memory_len(24 << 20)
        .build();
    let net = VirtioNet::new(net_model::bus(&sim, pref), nc).expect("virtio-net init");
    Rig {
        model: NetModel::new(&sim),
        mem: sim.memory(),
        net,
        keep: Vec::new(),
    }
}

fn rig(mode: SimMode, pref: Preference, features: u64) -> Rig {
    rig_with(
        mode,
        pref,
        features,
        net_model::config_bytes(MAC, 1, 1500, 10_000, 1),
        &[256, 256, 64],
        NetConfig::default(),
    )
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    net_model::frame(MAC, len, seed)
}

impl Rig {
    /// Places `data` in DMA memory as `nseg` segments.
    fn segments(&mut self, data: &[u8], nseg: usize) -> Vec<Segment> {
        let buf = self.mem.alloc_buffer(data.len());
        self.mem.slice(&buf)[..data.len()].copy_from_slice(data);
        let step = data.len().div_ceil(nseg);
        let segs = (0..data.len())
            .step_by(step)
            .map(|o| Segment::new(buf.daddr + o as u64, step.min(data.len() - o) as u32))
            .collect();
        self.keep.push(buf);
        segs
    }

    fn send(
        &mut self,
        data: &[u8],
        nseg: usize,
        o: &TxOffload,
        token: usize,
    ) -> Result<bool, NetError> {
        let segs = self.segments(data, nseg);
        self.net.transmit(&segs, o, token).map(|s| s.stop)
    }

    fn reclaim(&mut self) -> (Vec<usize>, bool) {
        let mut toks = Vec::new();
        let r = self.net.tx_reclaim(|t| toks.push(t)).expect("reclaim");
        assert_eq!(r.frames, toks.len());
        (toks, r.restart)
    }

    /// One `rx_poll` of `budget`: the frames it delivered and its summary.
    fn poll_frames(&mut self, budget: usize) -> (Vec<Vec<u8>>, virtio_net::RxSummary) {
        let mut frames = Vec::new();
        let s = self
            .net
            .rx_poll(budget, |fr| {
                let mut v = vec![0; fr.len()];
                fr.copy_to(&mut v).unwrap();
                frames.push(v);
            })
            .unwrap();
        (frames, s)
    }

    fn receive(&mut self) -> Vec<(Vec<u8>, virtio_net::RxInfo, usize)> {
        let mut out = Vec::new();
        let s = self
            .net
            .rx_poll(1000, |fr| {
                let mut v = vec![0u8; fr.len()];
                assert_eq!(fr.copy_to(&mut v), Some(fr.len()));
                let joined: Vec<u8> = fr.fragments().flat_map(|x| x.iter().copied()).collect();
                assert_eq!(joined, v);
                out.push((v, *fr.info(), fr.num_buffers()));
            })
            .expect("rx_poll");
        assert_eq!(s.frames, out.len());
        out
    }
}

fn hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

#[test]
fn negotiation_refuses_and_closes_dependencies() {
    for (mode, pref) in MODES {
        // HOST_TSO4/HOST_ECN without CSUM must be dropped; GSO, MQ, RX_EXTRA, bit 30 never.
        let offered = (QEMU & !f::CSUM) | f::MQ;
        let r = rig(mode, pref, offered);
        let drv = r.model.sim.driver_features();
        assert_eq!(drv & (1 << 30), 0);
        assert_eq!(
            drv & (f::GSO | f::MQ | f::CTRL_RX_EXTRA | f::NOTIFY_ON_EMPTY),
            0
        );
        assert_eq!(
            drv & (f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN | f::HOST_UFO),
            0
        );
        assert_ne!(drv & (f::GUEST_TSO4 | f::MRG_RXBUF | f::CTRL_VQ), 0);
        assert_eq!(r.net.mac(), MAC);
        assert!(r.net.link_up());
        assert_eq!(r.net.rx_mode(), RxMode::Mergeable);
        assert_eq!(r.net.header_len(), 12);
        r.model.sim.check_init_order().unwrap();
        assert!(
            r.model.sim.bad_accesses().is_empty(),
            "{:?}",
            r.model.sim.bad_accesses()
        );
    }
}

#[test]
fn tx_frames_arrive_byte_exact_in_every_mode() {
    for (mode, pref) in MODES {
        for mrg in [true, false] {
            let feats = if mrg { QEMU } else { QEMU & !f::MRG_RXBUF };
            let mut r = rig(mode, pref, feats);
            let legacy = r.model.sim.driver_features() & V1 == 0;
            let hl = if legacy && !mrg { 10 } else { 12 };
            assert_eq!(r.net.header_len(), hl);
            let a = frame(60, 1);
            let b = frame(1514, 2);
            let c = frame(30000, 3);
            assert!(!r.send(&a, 1, &TxOffload::NONE, 100).unwrap());
            assert!(!r.send(&b, 3, &TxOffload::csum(34, 16), 101).unwrap());
            let tso = TxOffload::gso(GsoKind::TcpV4, 1448, 54, 34, 16).with_ecn();
            assert!(!r.send(&c, 5, &tso, 102).unwrap());
            let tx = r.model.take_tx();
            assert_eq!(tx.len(), 3, "{mode:?}");
            let expect = [
                (hdr(0, 0, 0, 0, 0, 0), &a, 2),
                (hdr(1, 0, 0, 0, 34, 16), &b, 4),
                (hdr(1, 0x81, 54, 1448, 34, 16), &c, 6),
            ];
            for (got, (h, data, descs)) in tx.iter().zip(expect) {
                assert_eq!(got.header, h[..hl], "{mode:?}/{pref:?} mrg {mrg}");
                assert_eq!(&got.data, data);
                assert_eq!(got.descs, descs);
                assert!(got.header_alone);
            }
            assert_eq!(r.reclaim(), (vec![100, 101, 102], false));
            assert!(r.model.sim.bad_accesses().is_empty());
        }
    }
}

#[test]
fn tx_requests_beyond_negotiation_are_refused() {
    let mut r = rig(
        SimMode::Modern,
        Preference::Auto,
        QEMU & !(f::HOST_TSO6 | f::HOST_ECN),
    );
    let d = frame(20000, 9);
    assert_eq!(
        r.send(&d, 2, &TxOffload::gso(GsoKind::TcpV6, 1400, 74, 54, 16), 1),
        Err(NetError::Offload(virtio_net::OffloadError::NotNegotiated(
            "HOST_TSO6"
        )))
    );
    assert!(matches!(
        r.send(
            &d,
            2,
            &TxOffload::gso(GsoKind::TcpV4, 1400, 54, 34, 16).with_ecn(),
            1
        ),
        Err(NetError::Offload(_))
    ));
    // A non-GSO frame beyond the MTU, a runt, too many segments.
    assert!(matches!(
        r.send(&d, 2, &TxOffload::NONE, 1),
        Err(NetError::BadFrame(_))
    ));
    assert!(matches!(
        r.send(&d[..10], 1, &TxOffload::NONE, 1),
        Err(NetError::BadFrame(_))
    ));
    assert!(matches!(
        r.send(&d[..1000], 40, &TxOffload::NONE, 1),
        Err(NetError::BadFrame(_))
    ));
    assert!(r.model.take_tx().is_empty());
}

#[test]
fn rx_small_mode_in_every_mode_with_checksum_state() {
    for (mode, pref) in MODES {
        for any_layout in [true, false] {
            let mut feats = QEMU & !(f::MRG_RXBUF | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_UFO);
            if !any_layout {
                feats &= !f::ANY_LAYOUT;
            }
            let mut r = rig(mode, pref, feats);
            assert_eq!(r.net.rx_mode(), RxMode::Small);
            let legacy = r.model.sim.driver_features() & V1 == 0;
            let lens = r.model.rx_buffer_lens();
            let hl = r.net.header_len();
            assert_eq!(lens[0] as usize, hl + 1518);
            assert!(lens[0] >= 1526);
            let a = frame(60, 1);
            let b = frame(1518, 2);
            r.model.inject_rx(hdr(2, 0, 0, 0, 0, 0), &a).unwrap();
            r.model.inject_rx(hdr(1, 0, 0, 0, 34, 16), &b).unwrap();
            let got = r.receive();
            assert_eq!(got.len(), 2, "{mode:?}/{pref:?}");
            assert_eq!(got[0].0, a);
            assert_eq!(got[0].1.csum, RxCsum::Valid);
            assert_eq!(got[1].0, b);
            assert_eq!(
                got[1].1.csum,
                RxCsum::Partial {
                    start: 34,
                    offset: 16
                }
            );
            // Buffers come back to the device.
            assert_eq!(r.model.rx_available(), 256.min(lens.len()));
            let layout = r.model.rx_chain_layouts();
            if legacy && !any_layout {
                // §5.1.6.3.2 legacy: the header in a descriptor of its own.
                assert_eq!(layout[0], vec![10, 1518], "{mode:?}/{pref:?}");
            } else {
                assert_eq!(layout[0], vec![hl as u32 + 1518]);
            }
        }
    }
}

#[test]
fn rx_mergeable_reassembles_multi_buffer_frames_and_sizes_buffers_by_ewma() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        assert_eq!(r.net.rx_mode(), RxMode::Mergeable);
        let start_len = r.net.rx_post_len();
        assert_eq!(start_len, 1536, "hdr + 1518 rounded to 64");
        let big = frame(60000, 7);
        let jumbo = frame(9000, 8);
        let n_big = r
            .model
            .inject_rx(hdr(1, 1, 54, 1448, 34, 16), &big)
            .unwrap();
        assert!(n_big > 30, "{n_big}");
        let n_jumbo = r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &jumbo).unwrap();
        assert!(n_jumbo >= 6);
        let got = r.receive();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, big);
        assert_eq!(got[0].2, n_big);
        assert_eq!(
            got[0].1.gso,
            Some(RxGso {
                kind: GsoKind::TcpV4,
                size: 1448,
                hdr_len: 54,
                ecn: false
            })
        );
        assert_eq!(got[1].0, jumbo);
        assert_eq!(got[1].2, n_jumbo);
        // Large frames push the running average up: buffers are posted longer.
        for i in 0..300 {
            r.model
                .inject_rx(hdr(0, 0, 0, 0, 0, 0), &frame(3900, i as u8))
                .unwrap();
            assert_eq!(r.receive().len(), 1);
        }
        let grown = r.net.rx_post_len();
        assert!(grown > 3500 && grown <= 4096, "{grown}");
        let lens = r.model.rx_buffer_lens();
        assert!(
            lens.iter().any(|&l| l as usize == grown),
            "{:?}",
            &lens[..8]
        );
        assert!(r.model.sim.bad_accesses().is_empty());
    }
}

#[test]
fn rx_big_packet_mode_without_mergeable() {
    for (mode, pref) in [MODES[0], MODES[3]] {
        let mut r = rig(mode, pref, QEMU & !f::MRG_RXBUF);
        assert_eq!(r.net.rx_mode(), RxMode::Big);
        let hl = r.net.header_len();
        let lens = r.model.rx_buffer_lens();
        assert_eq!(lens.len(), 32);
        assert_eq!(lens[0] as usize, hl + 65562);
        let f1 = frame(65000, 4);
        r.model
            .inject_rx(hdr(1, 4 | 0x80, 86, 1428, 54, 16), &f1)
            .unwrap();
        let got = r.receive();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, f1);
        assert_eq!(got[0].2, 1);
        assert_eq!(got[0].1.gso.unwrap().kind, GsoKind::TcpV6);
        assert!(got[0].1.gso.unwrap().ecn);
    }
}

#[test]
fn control_commands_exact_bytes() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        let resp = CtrlResponder::ok(&r.model.sim);
        r.net.set_promisc(true).unwrap();
        r.net.set_allmulti(false).unwrap();
        let uc = [[0x02, 1, 2, 3, 4, 5]];
        let mc = [[0x01, 0, 0x5E, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
        r.net.set_mac_filter(&uc, &mc).unwrap();
        r.net.set_mac_address([0x02, 9, 8, 7, 6, 5]).unwrap();
        r.net.vlan_add(100).unwrap();
        r.net.vlan_del(100).unwrap();
        r.net
            .set_guest_offloads(GuestOffloads {
                csum: true,
                tso4: true,
                ..Default::default()
            })
            .unwrap();
        r.net.ack_announce().unwrap();
        let log = resp.stop();
        let got: Vec<(u8, u8, Vec<Vec<u8>>)> = log
            .iter()
            .map(|c| (c.class, c.command, c.data.clone()))
            .collect();
        let mut uct = vec![1, 0, 0, 0];
        uct.extend_from_slice(&uc[0]);
        let mut mct = vec![2, 0, 0, 0];
        mct.extend_from_slice(&mc[0]);
        mct.extend_from_slice(&mc[1]);
        assert_eq!(
            got,
            vec![
                (0, 0, vec![vec![1]]),
                (0, 1, vec![vec![0]]),
                (1, 0, vec![uct, mct]),
                (1, 1, vec![vec![0x02, 9, 8, 7, 6, 5]]),
                (2, 0, vec![vec![100, 0]]),
                (2, 1, vec![vec![100, 0]]),
                (5, 0, vec![vec![0x82, 0, 0, 0, 0, 0, 0, 0]]),
                (3, 0, vec![]),
            ],
            "{mode:?}/{pref:?}"
        );
        assert!(log.iter().all(|c| c.ack_len == 1));
        assert_eq!(r.net.mac(), [0x02, 9, 8, 7, 6, 5]);
        // Disabled guest TSO6 now makes TSO6 frames invalid.
        let f1 = frame(20000, 1);
        r.model.inject_rx(hdr(1, 4, 86, 1428, 54, 16), &f1).unwrap();
        assert!(r.receive().is_empty());
        assert_eq!(r.net.stats().rx_bad_header, 1);
        assert!(r.net.vlan_add(4096).is_err());
        assert!(r.model.sim.bad_accesses().is_empty());
    }
}

#[test]
fn control_acks_validated_and_waits_bounded() {
    let mut r = rig_with(
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        net_model::config_bytes(MAC, 1, 1500, 10_000, 1),
        &[256, 256, 64],
        NetConfig {
            ctrl_spins: 1_000_000,
            ..Default::default()
        },
    );
    // Nobody answers: bounded wait, then the command's buffer stays the device's.
    assert_eq!(r.net.set_promisc(true), Err(NetError::Timeout));
    assert_eq!(r.net.set_promisc(true), Err(NetError::CtrlBusy));
    // The device finally answers the first one; the next command goes through.
    assert_eq!(r.model.serve_ctrl(|_| 0).len(), 1);
    let resp = CtrlResponder::spawn(
        &r.model.sim,
        Box::new(|c| match c.class {
            0 => 1,    // VIRTIO_NET_ERR
            2 => 0x7F, // garbage
            _ => 0,
        }),
    );
    assert_eq!(
        r.net.set_allmulti(true),
        Err(NetError::CtrlRejected {
            class: 0,
            command: 1
        })
    );
    assert!(matches!(r.net.vlan_add(5), Err(NetError::Device(_))));
    r.net.ack_announce().unwrap();
    drop(resp);
    assert_eq!(r.net.stats().ctrl_errors, 3);
    // Without CTRL_VQ the helpers say so.
    let mut r = rig(SimMode::Modern, Preference::Auto, QEMU & !f::CTRL_VQ);
    assert_eq!(
        r.model.sim.driver_features() & (f::CTRL_RX | f::CTRL_VLAN),
        0
    );
    assert_eq!(
        r.net.set_promisc(true),
        Err(NetError::NotNegotiated("CTRL_RX"))
    );
    assert_eq!(r.model.sim.queue_info(CTRL).map(|q| q.enabled), Some(false));
}

#[test]
fn link_down_up_and_announce_via_config_interrupts() {
    for (mode, pref) in MODES {
        for msix in [true, false] {
            let sim = SimBuilder::new(mode, 1)
                .features(QEMU | f::SPEED_DUPLEX)
                .queues(&[256, 256, 64])
                .device_config(&net_model::config_bytes(MAC, 1, 1500, 10_000, 1))
                .memory_len(24 << 20)
                .msix_vectors(if msix { 4 } else { 0 })
                .build();
            let mut net = VirtioNet::new(net_model::bus(&sim, pref), NetConfig::default()).unwrap();
            let model = NetModel::new(&sim);
            model.take_vectors();
            model.set_status(false, false);
            let v = model.take_vectors();
            assert_eq!(v.len(), 1);
            let i = net.handle_interrupt(v[0]);
            assert!(i.config && !i.rx && !i.needs_reset);
            let ev = net.handle_config_change().unwrap();
            assert!(ev.link_changed && !ev.link_up && !ev.announce);
            assert!(!net.link_up());
            model.set_status(true, true);
            let v = model.take_vectors();
            assert!(net.handle_interrupt(v[0]).config);
            let ev = net.handle_config_change().unwrap();
            assert!(ev.link_changed && ev.link_up && ev.announce);
            let resp = CtrlResponder::ok(&sim);
            net.ack_announce().unwrap();
            let log = resp.stop();
            assert_eq!((log[0].class, log[0].command), (3, 0));
            assert_eq!(sim.device_config()[6] & 2, 0, "device cleared ANNOUNCE");
            // An rx interrupt is routed to rx.
            model.take_vectors();
            let mut m = NetModel::new(&sim);
            m.inject_rx(hdr(0, 0, 0, 0, 0, 0), &frame(100, 1)).unwrap();
            let v = m.take_vectors();
            assert_eq!(v.len(), 1, "{mode:?} msix {msix}");
            assert!(net.handle_interrupt(v[0]).rx);
            // SPEED_DUPLEX is bit 63: beyond the legacy interface's 32 feature bits.
            let modern = sim.driver_features() & V1 != 0;
            assert_eq!(net.speed(), modern.then_some(10_000));
            assert!(sim.bad_accesses().is_empty());
        }
    }
}

#[test]
fn backpressure_stop_and_restart() {
    // 16-entry tx ring, no indirect: a 1-segment frame takes 2 descriptors, a worst-case
    // (2-segment) frame 3, and 2 stay reserved for the debugger.
    let mut r = rig_with(
        SimMode::Modern,
        Preference::Auto,
        QEMU & !(1 << 28),
        net_model::config_bytes(MAC, 1, 1500, 10_000, 1),
        &[256, 16, 64],
        NetConfig {
            max_tx_segments: 2,
            ..Default::default()
        },
    );
    let d = frame(100, 1);
    let mut stops = Vec::new();
    let mut token = 0;
    let busy = loop {
        match r.send(&d, 1, &TxOffload::NONE, token) {
            Ok(stop) => stops.push(stop),
            Err(e) => break e,
        }
        token += 1;
    };
    assert_eq!(busy, NetError::Busy);
    assert_eq!(token, 7, "16 descriptors - 2 reserved = 7 frames of 2");
    assert_eq!(stops.iter().position(|&s| s), Some(5), "{stops:?}");
    assert!(r.net.tx_stopped());
    // Nothing completed yet: reclaim reports nothing and no restart.
    assert_eq!(r.reclaim(), (vec![], false));
    // The debugger still gets its reserved slot.
    r.net.debug_send(&frame(90, 9), 10).unwrap();
    let tx = r.model.take_tx();
    assert_eq!(tx.len(), 8);
    assert_eq!(tx[7].data, frame(90, 9));
    let (toks, restart) = r.reclaim();
    assert_eq!(toks, (0..7).collect::<Vec<_>>());
    assert!(restart && !r.net.tx_stopped());
    assert!(!r.send(&d, 1, &TxOffload::NONE, 50).unwrap());
    assert_eq!(r.model.take_tx().len(), 1);
    assert_eq!(r.reclaim(), (vec![50], false));
}

/// `max_tx_frames` bounds the frames in flight below the ring size (the kext maps each
/// frame in flight with its own `IODMACommand`, from a pool of that size): the frame that
/// takes the last slot says stop, the next one is Busy, and completions restart the queue.
#[test]
fn frames_in_flight_bounded_by_max_tx_frames() {
    let with_cap = |tx_ring: u16, max_tx_frames: u16| {
        rig_with(
            SimMode::Modern,
            Preference::Auto,
            QEMU,
            net_model::config_bytes(MAC, 1, 1500, 10_000, 1),
            &[256, tx_ring, 64],
            NetConfig {
                max_tx_frames,
                ..Default::default()
            },
        )
    };
    let mut r = with_cap(256, 4);
    assert_eq!(r.net.tx_slots(), 4);
    let d = frame(100, 1);
    let stops: Vec<bool> = (0..4)
        .map(|t| r.send(&d, 1, &TxOffload::NONE, t).unwrap())
        .collect();
    assert_eq!(stops, [false, false, false, true]);
    assert_eq!(r.send(&d, 1, &TxOffload::NONE, 4), Err(NetError::Busy));
    assert_eq!(r.model.take_tx().len(), 4);
    let (toks, restart) = r.reclaim();
    assert_eq!((toks, restart), (vec![0, 1, 2, 3], true));
    assert_eq!(r.send(&d, 1, &TxOffload::NONE, 5), Ok(false));
    // More than the ring holds is not granted.
    assert_eq!(with_cap(16, 64).net.tx_slots(), 16);
}

/// The default segment limit (18) on a 16-entry ring without indirect descriptors: the
/// driver shrinks the limit to what an empty ring can take beside the debugger's reserve,
/// so a stalled queue always restarts (it used to wait for room that could never exist).
#[test]
fn segment_limit_fits_a_small_ring_so_restart_happens() {
    let mut r = rig_with(
        SimMode::Modern,
        Preference::Auto,
        QEMU & !(1 << 28),
        net_model::config_bytes(MAC, 1, 1500, 10_000, 1),
        &[256, 16, 64],
        NetConfig::default(),
    );
    let d = frame(100, 1);
    let mut token = 0;
    let busy = loop {
        match r.send(&d, 1, &TxOffload::NONE, token) {
            Ok(_) => token += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(busy, NetError::Busy);
    assert!(r.net.tx_stopped());
    r.model.take_tx();
    let (toks, restart) = r.reclaim();
    assert_eq!(toks.len(), token);
    assert!(
        restart && !r.net.tx_stopped(),
        "a stalled queue must restart"
    );
    assert!(r.send(&d, 1, &TxOffload::NONE, 100).is_ok());
}

/// Linux's non-NAPI transmit policy: while the ring has room, completions raise no
/// interrupt (the next `tx_reclaim`, before a transmit, takes them); the transmit interrupt
/// is armed only when the queue stops for backpressure (delayed under EVENT_IDX: after
/// ~3/4 of the frames in flight), and goes off again on restart.
#[test]
fn tx_interrupt_only_while_stopped() {
    const EVENT_IDX: u64 = 1 << 29;
    const INDIRECT: u64 = 1 << 28;
    for (mode, pref) in MODES {
        for event_idx in [true, false] {
            for msix in [true, false] {
                let features = (QEMU & !INDIRECT) & if event_idx { !0 } else { !EVENT_IDX };
                let sim = SimBuilder::new(mode, 1)
                    .features(features)
                    .queues(&[256, 16, 64])
                    .device_config(&net_model::config_bytes(MAC, 1, 1500, 10_000, 1))
                    .memory_len(24 << 20)
                    .msix_vectors(if msix { 4 } else { 0 })
                    .build();
                let nc = NetConfig {
                    max_tx_segments: 2,
                    ..Default::default()
                };
                let mut r = Rig {
                    net: VirtioNet::new(net_model::bus(&sim, pref), nc).unwrap(),
                    model: NetModel::new(&sim),
                    mem: sim.memory(),
                    keep: Vec::new(),
                };
                let what = format!("{mode:?} {pref:?} event_idx {event_idx} msix {msix}");
                r.model.take_vectors();
                let d = frame(100, 1);

                // Running: three frames completed, no interrupt; the reclaim finds them.
                for t in 0..3 {
                    assert!(!r.send(&d, 1, &TxOffload::NONE, t).unwrap(), "{what}");
                }
                assert_eq!(r.model.take_tx().len(), 3, "{what}");
                assert_eq!(
                    r.model.take_vectors(),
                    vec![],
                    "{what}: tx interrupt while running"
                );
                assert_eq!(r.reclaim(), (vec![0, 1, 2], false), "{what}");

                // Fill the ring (7 frames of 2 descriptors, see backpressure_stop_and_restart):
                // the stop arms the interrupt.
                let mut token = 10;
                while r
                    .send(&d, 1, &TxOffload::NONE, token)
                    .is_ok_and(|stop| !stop)
                {
                    token += 1;
                }
                assert!(r.net.tx_stopped(), "{what}");
                let held = r.model.hold_tx();
                let n = held.len();
                assert_eq!(n, 6, "{what}");
                // Complete one frame at a time until the device interrupts.
                let mut completed = 0;
                let mut vectors = Vec::new();
                for (c, _) in &held {
                    r.model.complete_tx(std::slice::from_ref(c));
                    completed += 1;
                    vectors = r.model.take_vectors();
                    if !vectors.is_empty() {
                        break;
                    }
                }
                assert_eq!(vectors.len(), 1, "{what}: one interrupt while stopped");
                if event_idx {
                    // Delayed: after ~3/4 of the frames in flight, not the first.
                    assert!(
                        completed > 1 && completed <= n * 3 / 4 + 1,
                        "{what}: {completed}"
                    );
                } else {
                    assert_eq!(completed, 1, "{what}");
                }
                if msix {
                    let i = r.net.handle_interrupt(vectors[0]);
                    assert!(i.tx && !i.rx, "{what}: {i:?}");
                }
                let (toks, restart) = r.reclaim();
                assert_eq!(toks, (10..10 + completed).collect::<Vec<_>>(), "{what}");
                assert!(restart && !r.net.tx_stopped(), "{what}");

                // Restarted: interrupts off again; the rest completes silently and the
                // reclaim before the next transmit takes it.
                let rest: Vec<_> = held[completed..].iter().map(|(c, _)| c.clone()).collect();
                r.model.complete_tx(&rest);
                assert_eq!(
                    r.model.take_vectors(),
                    vec![],
                    "{what}: tx interrupt after restart"
                );
                let (toks, restart) = r.reclaim();
                assert_eq!(toks, (10 + completed..10 + n).collect::<Vec<_>>(), "{what}");
                assert!(!restart, "{what}");
                assert!(!r.send(&d, 1, &TxOffload::NONE, 99).unwrap(), "{what}");
                assert_eq!(r.model.take_tx().len(), 1, "{what}");
                assert_eq!(
                    r.model.take_vectors(),
                    vec![],
                    "{what}: tx interrupt after restart"
                );
                assert_eq!(r.reclaim(), (vec![99], false), "{what}");
                assert!(sim.bad_accesses().is_empty(), "{what}");
            }
        }
    }
}

#[test]
fn hostile_receive_values_are_dropped_and_the_driver_continues() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        let hl = 12;
        let good = frame(200, 5);
        let with = |h: [u8; 12], nb: u16, data: &[u8]| {
            let mut v = h.to_vec();
            v[10..12].copy_from_slice(&nb.to_le_bytes());
            v.extend_from_slice(data);
            let len = v.len() as u32;
            (v, len)
        };
        // num_buffers 0; num_buffers far beyond what the device holds; a runt; a header with
        // the checksum field beyond the frame; an unknown gso type.
        let bufs = vec![
            with(hdr(0, 0, 0, 0, 0, 0), 0, &good),
            with(hdr(0, 0, 0, 0, 0, 0), 5000, &good),
            with(hdr(0, 0, 0, 0, 0, 0), 1, &good[..5]),
            with(hdr(1, 0, 0, 0, 190, 16), 1, &good),
            with(hdr(0, 9, 0, 100, 0, 0), 1, &good),
            with(hdr(0, 0, 0, 0, 0, 0), 1, &good),
        ];
        r.model.inject_rx_raw(&bufs).unwrap();
        let (frames, s) = r.poll_frames(100);
        assert_eq!(frames, vec![good.clone()], "{mode:?}/{pref:?}");
        assert_eq!(s.dropped, 5);
        assert!(matches!(s.last_error, Some(NetError::Device(_))));
        let st = r.net.stats();
        assert_eq!(
            (st.rx_bad_num_buffers, st.rx_length_errors, st.rx_bad_header),
            (2, 1, 2)
        );
        // Every buffer is back with the device.
        let avail = r.model.rx_available();
        assert_eq!(avail, r.net.rx_buffers().0);
        // A frame claiming 3 buffers when only 2 arrived waits for the third.
        r.model
            .inject_rx_raw(&[with(hdr(0, 0, 0, 0, 0, 0), 3, &good[..100])])
            .unwrap();
        assert!(r.receive().is_empty());
        r.model
            .inject_rx_raw(&[(good[100..150].to_vec(), 50), (good[150..].to_vec(), 50)])
            .unwrap();
        let got = r.receive();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, good);
        assert_eq!(got[0].2, 3);
        // A used length beyond the buffer breaks the queue: an error, not a panic.
        let cap = r.model.rx_buffer_lens()[0];
        r.model
            .inject_rx_raw(&[(vec![0; hl + 60], cap + 1)])
            .unwrap();
        let e = r.net.rx_poll(10, |_| {}).unwrap_err();
        assert!(
            matches!(e, NetError::Core(Error::UsedLenTooLarge { .. })),
            "{e:?}"
        );
        assert!(r.net.rx_poll(10, |_| {}).is_err());
        // Transmit still works on its own queue.
        assert!(r.send(&good, 1, &TxOffload::NONE, 1).is_ok());
        assert_eq!(r.model.take_tx().len(), 1);
    }
}

/// A mergeable frame (§5.1.6.4) the driver rejects after validating its `num_buffers` (an
/// unknown `gso_type` here) takes all of its buffers along: its second buffer, whose
/// payload happens to start like a virtio header with `num_buffers` 1 over an Ethernet
/// frame, used to be parsed as a frame of its own and handed to the stack (and to the
/// debugger), garbage from the stack's point of view.
#[test]
fn a_rejected_mergeable_frame_drops_all_of_its_buffers() {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = rig(mode, pref, QEMU);
        assert_eq!(r.net.rx_mode(), RxMode::Mergeable, "{what}");
        let mut first = hdr(0, 9, 0, 100, 0, 0).to_vec(); // gso_type 9: unknown
        first[10..12].copy_from_slice(&2u16.to_le_bytes());
        first.extend_from_slice(&frame(100, 1));
        let mut second = hdr(0, 0, 0, 0, 0, 0).to_vec();
        second[10..12].copy_from_slice(&1u16.to_le_bytes());
        second.extend_from_slice(&frame(80, 2));
        let (l1, l2) = (first.len() as u32, second.len() as u32);
        r.model.inject_rx_raw(&[(first, l1), (second, l2)]).unwrap();
        let good = frame(90, 3);
        r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &good).unwrap();
        // The debugger steps over the whole rejected frame to the next real one.
        let mut buf = vec![0u8; 2048];
        assert_eq!(
            r.net.debug_receive(&mut buf, 10).unwrap(),
            Some(90),
            "{what}"
        );
        assert_eq!(buf[..90], good[..], "{what}");
        assert_eq!(r.net.debug_receive(&mut buf, 2).unwrap(), None, "{what}");
        // The stack gets only the real frame; one frame was dropped.
        let (frames, s) = r.poll_frames(100);
        assert_eq!(frames, vec![good], "{what}");
        assert_eq!(s.dropped, 1, "{what}");
        let st = r.net.stats();
        assert_eq!(
            (st.rx_errors, st.rx_bad_header, st.rx_frames),
            (1, 1, 1),
            "{what}"
        );
        // Every buffer is back with the device.
        assert_eq!(r.model.rx_available(), r.net.rx_buffers().0, "{what}");
    }
}

/// `rx_poll_lend`: a delivered frame's buffers stay out of the ring, untouched, until
/// `rx_return_lent` (so the kext can hand frames to its stack after releasing the lock
/// the debugger needs); the debugger never sees them; at most `max_lent` buffers are lent
/// (a frame of more alone), and the round then says `more`.
#[test]
fn lent_frames_stay_out_of_the_ring_until_returned() {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = rig(mode, pref, QEMU);
        let total = r.net.rx_buffers().0;
        let big = frame(5000, 1); // several mergeable buffers
        let n_big = r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &big).unwrap();
        assert!(n_big > 2, "{what}");
        let small = [frame(100, 2), frame(200, 3)];
        for f in &small {
            r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), f).unwrap();
        }
        // Lend at most 2 buffers: the big frame goes alone, the round ends there.
        let mut spans: Vec<Vec<(*const u8, usize)>> = Vec::new();
        let s = r
            .net
            .rx_poll_lend(64, 2, |fr| {
                spans.push(fr.fragments().map(|f| (f.as_ptr(), f.len())).collect());
            })
            .unwrap();
        assert_eq!((s.frames, s.more), (1, true), "{what}");
        assert_eq!(r.net.rx_lent(), n_big, "{what}");
        assert_eq!(
            r.net.rx_buffers().1,
            total - n_big - 2,
            "{what}: not reposted"
        );
        // The debugger sees the next frame, not the lent one.
        let mut buf = vec![0u8; 2048];
        assert_eq!(
            r.net.debug_receive(&mut buf, 4).unwrap(),
            Some(100),
            "{what}"
        );
        // Still readable after the call: the buffers are the caller's until returned.
        let joined: Vec<u8> = spans[0]
            .iter()
            // SAFETY: lent buffers stay valid and unwritten until `rx_return_lent`.
            .flat_map(|&(p, l)| unsafe { std::slice::from_raw_parts(p, l) }.to_vec())
            .collect();
        assert_eq!(joined, big, "{what}");
        assert_eq!(r.net.rx_return_lent().unwrap(), n_big, "{what}");
        assert_eq!(
            (r.net.rx_lent(), r.net.rx_buffers().1),
            (0, total - 2),
            "{what}"
        );
        // The small frames: both lent within the bound.
        let mut lens = Vec::new();
        let s = r.net.rx_poll_lend(64, 2, |fr| lens.push(fr.len())).unwrap();
        assert_eq!((lens, s.more), (vec![100, 200], false), "{what}");
        assert_eq!(r.net.rx_return_lent().unwrap(), 2, "{what}");
        assert_eq!(
            r.net.rx_buffers().1,
            total,
            "{what}: every buffer posted again"
        );
        assert_eq!(r.model.rx_available(), total, "{what}");
    }
}

#[test]
fn hostile_config_values() {
    // MTU 20 (below 68): renegotiated without MTU; multicast MAC: replaced by a random
    // local one (pushed with CTRL_MAC_ADDR); invalid speed and duplex: unknown.
    let sim = SimBuilder::new(SimMode::Modern, 1)
        .features(QEMU | f::MTU | f::SPEED_DUPLEX)
        .queues(&[256, 256, 64])
        .device_config(&net_model::config_bytes(
            [0x01, 0, 0x5E, 0, 0, 1],
            1,
            20,
            0x8000_0000,
            7,
        ))
        .memory_len(24 << 20)
        .build();
    let resp = CtrlResponder::ok(&sim);
    let net = VirtioNet::new(net_model::bus(&sim, Preference::Auto), NetConfig::default()).unwrap();
    let log = resp.stop();
    assert_eq!(sim.driver_features() & f::MTU, 0);
    assert_eq!(net.mtu(), None);
    let mac = net.mac();
    assert_eq!(mac[0] & 3, 2, "locally administered unicast");
    assert_eq!((log[0].class, log[0].command), (1, 1));
    assert_eq!(log[0].data, vec![mac.to_vec()]);
    assert_eq!((net.speed(), net.duplex()), (None, None));
    assert_eq!(net.stats().config_invalid, 4);

    // A valid MTU of 9000 sizes small buffers for it.
    let sim = SimBuilder::new(SimMode::Modern, 1)
        .features((QEMU | f::MTU) & !(f::MRG_RXBUF | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_UFO))
        .queues(&[256, 256, 64])
        .device_config(&net_model::config_bytes(MAC, 1, 9000, 100, 1))
        .memory_len(24 << 20)
        .build();
    let net = VirtioNet::new(net_model::bus(&sim, Preference::Auto), NetConfig::default()).unwrap();
    assert_eq!(net.mtu(), Some(9000));
    let mut m = NetModel::new(&sim);
    assert_eq!(m.rx_buffer_lens()[0], 12 + 9018);
}

#[test]
fn legacy_without_mac_writes_random_mac_to_config() {
    let sim = SimBuilder::new(SimMode::Legacy, 1)
        .features((QEMU & !(f::MAC | f::CTRL_VQ)) & 0xFFFF_FFFF)
        .queues(&[256, 256])
        .device_config(&net_model::config_bytes([0; 6], 1, 1500, 10, 1))
        .memory_len(24 << 20)
        .build();
    let net = VirtioNet::new(
        net_model::bus(&sim, Preference::Auto),
        NetConfig {
            mac_seed: 42,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sim.device_config()[..6], net.mac());
    assert_eq!(net.mac()[0] & 3, 2);
}

#[test]
fn kernel_debugger_path_beside_frames_in_flight() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        // Normal frames in flight (the device holds them).
        for t in 0..3 {
            r.send(&frame(100, t as u8), 1, &TxOffload::csum(34, 16), 10 + t)
                .unwrap();
        }
        // The debugger sends while they are in flight; its wait is bounded.
        let kdp = frame(300, 0xDB);
        r.net.debug_send(&kdp, 100).unwrap();
        let held = r.model.hold_tx();
        assert_eq!(held.len(), 4);
        assert_eq!(held[3].1.data, kdp);
        assert_eq!(held[3].1.header, vec![0; 12]);
        assert_eq!(held[0].1.header[0], 1, "normal frame untouched");
        // A second debugger frame waits (bounded) for the first: the device has not
        // completed it.
        assert_eq!(r.net.debug_send(&kdp, 50), Err(NetError::Timeout));
        let chains: Vec<_> = held.iter().map(|(c, _)| c.clone()).collect();
        r.model.complete_tx(&chains);
        // The debugger's poll pops the normal completions too; they are kept for reclaim.
        r.net.debug_send(&frame(64, 0xDC), 100).unwrap();
        assert_eq!(r.model.take_tx().len(), 1);
        let (toks, _) = r.reclaim();
        assert_eq!(
            toks,
            vec![10, 11, 12],
            "each normal token exactly once, in order"
        );
        assert_eq!(r.reclaim().0, Vec::<usize>::new());

        // Receive: the debugger borrows frames the stack has not seen; the stack still gets
        // all of them, in order.
        let a = frame(120, 0xA);
        let b = frame(5000, 0xB);
        let c = frame(80, 0xC);
        r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &a).unwrap();
        r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &b).unwrap();
        let mut buf = vec![0u8; 2048];
        assert_eq!(r.net.debug_receive(&mut buf, 10).unwrap(), Some(120));
        assert_eq!(buf[..120], a[..]);
        // b does not fit the debugger's buffer: skipped for it, not for the stack.
        r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &c).unwrap();
        assert_eq!(r.net.debug_receive(&mut buf, 10).unwrap(), Some(80));
        assert_eq!(buf[..80], c[..]);
        assert_eq!(r.net.debug_receive(&mut buf, 10).unwrap(), None);
        let got: Vec<Vec<u8>> = r.receive().into_iter().map(|x| x.0).collect();
        assert_eq!(got, vec![a, b, c]);
        let st = r.net.stats();
        assert_eq!(
            (
                st.debug_rx_frames,
                st.rx_debugger_oversize,
                st.rx_debugger_dropped
            ),
            (2, 1, 0)
        );
        assert!(r.model.sim.bad_accesses().is_empty());
    }
}

#[test]
fn kernel_debugger_receive_never_starves_the_ring() {
    let mut r = rig_with(
        SimMode::Modern,
        Preference::Auto,
        QEMU,
        net_model::config_bytes(MAC, 1, 1500, 10_000, 1),
        &[256, 256, 64],
        NetConfig {
            rx_buffers: 8,
            ..Default::default()
        },
    );
    assert_eq!(r.net.rx_buffers(), (8, 8));
    let mut buf = vec![0u8; 2048];
    for i in 0..40u8 {
        let fr = frame(100, i);
        r.model
            .inject_rx(hdr(0, 0, 0, 0, 0, 0), &fr)
            .unwrap_or_else(|e| panic!("frame {i}: {e}"));
        assert_eq!(r.net.debug_receive(&mut buf, 10).unwrap(), Some(100));
        assert_eq!(buf[..100], fr[..]);
    }
    let st = r.net.stats();
    assert!(st.rx_debugger_dropped >= 30, "{st:?}");
    // The stack gets the most recent frames the debugger still held, in order.
    let got = r.receive();
    assert!(!got.is_empty() && got.len() <= 8);
    assert_eq!(got.last().unwrap().0, frame(100, 39));
    let _ = TX;
}

/// Issue 14, bug 1: a device answering every receive kick with a runt kept `rx_poll`
/// looping forever (drops did not count against the budget). The flood stops after
/// `FLOOD_ROUNDS` kicks so a regression fails the assertion instead of hanging.
#[test]
fn rx_poll_bounded_while_the_device_floods_bad_frames() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const FLOOD_ROUNDS: usize = 2_000;
    const BUDGET: usize = 64;
    for (mode, pref) in MODES {
        for features in [QEMU, QEMU & !(f::MRG_RXBUF | f::GUEST_TSO4 | f::GUEST_TSO6)] {
            let r = rig(mode, pref, features & !(1 << 29));
            let mut net = r.net;
            let sim = r.model.sim.clone();
            let rounds = Arc::new(AtomicUsize::new(0));
            let seen = Arc::clone(&rounds);
            let runt = |sim: &virtio_tests::sim::Sim| {
                sim.serve(net_model::RX, |c| sim.write_chain(c, &[0u8; 5]));
            };
            sim.on_notify(Some(Arc::new(move |sim, queue| {
                if queue == net_model::RX && seen.fetch_add(1, Ordering::Relaxed) < FLOOD_ROUNDS {
                    runt(sim);
                }
            })));
            // The device floods what it holds now; each refill's kick brings more.
            runt(&sim);
            let s = net.rx_poll(BUDGET, |_| {}).unwrap();
            sim.on_notify(None);
            assert_eq!(s.frames, 0, "{mode:?}/{pref:?}");
            assert!(
                s.dropped <= BUDGET,
                "{mode:?}/{pref:?}: {} drops in one call with budget {BUDGET} ({} kicks)",
                s.dropped,
                rounds.load(Ordering::Relaxed)
            );
            assert!(s.more, "budget used up: poll again");
            assert!(rounds.load(Ordering::Relaxed) < FLOOD_ROUNDS);
            assert!(net.stats().rx_length_errors as usize >= s.dropped);
            assert!(sim.bad_accesses().is_empty());
        }
    }
}

/// Issue 14, bug 3: a normal frame completed by the device, popped by the debugger's
/// poll (queued for the next `tx_reclaim`), then `shutdown`: its token must still come
/// back. Fixed by f898ced (`reset_and_reclaim` drains the queued completions first); the
/// shutdown before it reported only tokens still in the ring.
#[test]
fn shutdown_returns_tokens_the_debugger_poll_collected() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        r.send(&frame(100, 1), 1, &TxOffload::NONE, 41).unwrap();
        r.send(&frame(100, 2), 1, &TxOffload::NONE, 42).unwrap();
        let held = r.model.hold_tx();
        let chains: Vec<_> = held.iter().map(|(c, _)| c.clone()).collect();
        r.model.complete_tx(&chains);
        // The debugger's poll pops both completions; nobody reclaims before shutdown.
        r.net.debug_send(&frame(64, 0xDB), 100).unwrap();
        r.send(&frame(100, 3), 1, &TxOffload::NONE, 43).unwrap();
        let mut back = Vec::new();
        r.net.shutdown(|t| back.push(t));
        back.sort_unstable();
        assert_eq!(
            back,
            vec![41, 42, 43],
            "{mode:?}/{pref:?}: each token exactly once"
        );
    }
}

/// Issue 14, bug 4: `VirtioNet::new` failing after `setup_queues` (a transmit queue of one
/// or two entries cannot hold a frame beside the debugger's reserve) left the device with
/// its queues enabled and the rings allocated. Dropping the bus now resets the device and
/// frees them; failures at every later allocation are covered the same way.
#[test]
fn new_failing_after_queue_setup_resets_and_frees() {
    for (mode, pref) in MODES {
        for tx_max in [1u16, 2] {
            let sim = SimBuilder::new(mode, 1)
                .features(QEMU)
                .queues(&[256, tx_max, 64])
                .device_config(&net_model::config_bytes(MAC, 1, 1500, 10_000, 1))
                .memory_len(24 << 20)
                .build();
            let mem = sim.memory();
            let before = mem.free_bytes();
            let resets = sim.resets();
            let e = VirtioNet::new(net_model::bus(&sim, pref), NetConfig::default())
                .err()
                .expect("a 1-2 entry transmit queue is refused");
            assert!(
                matches!(e, NetError::Core(Error::BadQueueSize { .. })),
                "{e:?}"
            );
            assert_eq!(mem.free_bytes(), before, "{mode:?}/{pref:?}: rings freed");
            assert!(
                sim.resets() > resets,
                "device reset before its rings were freed"
            );
            assert_eq!(sim.status() & 4, 0, "not DRIVER_OK");
            assert!(sim.bad_accesses().is_empty());
        }
        // Every allocation failing in turn, until initialisation succeeds.
        walk_allocation_failures(
            &format!("{mode:?}/{pref:?}"),
            || {
                SimBuilder::new(mode, 1)
                    .features(QEMU)
                    .queues(&[256, 256, 64])
                    .device_config(&net_model::config_bytes(MAC, 1, 1500, 10_000, 1))
                    .memory_len(24 << 20)
                    .build()
            },
            |sim| VirtioNet::new(net_model::bus(sim, pref), NetConfig::default()),
            |_, _| {},
        );
    }
}

/// Issue 14 (smaller): receive memory followed the device's ring size (32768 entries:
/// 128 MiB of mergeable buffers, about 2 GiB of small ones with a 65535 MTU). Now it is
/// capped by `RX_MEMORY_MAX` whatever the device offers.
#[test]
fn receive_memory_is_capped_by_the_driver_not_the_ring_size() {
    const NO_BIG: u64 = f::MRG_RXBUF | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_UFO;
    for (features, mtu) in [(QEMU, 1500), ((QEMU | f::MTU) & !NO_BIG, 65535)] {
        let sim = SimBuilder::new(SimMode::Modern, 1)
            .features(features)
            .queues(&[32768, 256, 64])
            .device_config(&net_model::config_bytes(MAC, 1, mtu, 10_000, 1))
            .memory_len(48 << 20)
            .build();
        let mem = sim.memory();
        let before = mem.free_bytes();
        let net = VirtioNet::new(net_model::bus(&sim, Preference::Auto), NetConfig::default())
            .unwrap_or_else(|e| panic!("features {features:#x}: {e}"));
        let mut model = NetModel::new(&sim);
        let lens = model.rx_buffer_lens();
        let (nbufs, posted) = net.rx_buffers();
        assert_eq!(lens.len(), posted);
        let rx_bytes = nbufs * lens[0] as usize;
        assert!(
            rx_bytes <= virtio_net::RX_MEMORY_MAX && nbufs < 32768,
            "{nbufs} buffers of {} bytes",
            lens[0]
        );
        // Everything the driver took at init (rings included) stays well inside the cap
        // plus the rings' own size.
        assert!(before - mem.free_bytes() < virtio_net::RX_MEMORY_MAX + (4 << 20));
    }
}

/// Issue 14 (smaller): big-packet buffers hold 65562 bytes (§5.1.6.3.1) but frames over
/// 65553 were dropped; a frame that fills the buffer is now received.
#[test]
fn big_packet_mode_receives_a_frame_that_fills_the_buffer() {
    for (mode, pref) in [MODES[0], MODES[3]] {
        let mut r = rig(mode, pref, QEMU & !f::MRG_RXBUF);
        assert_eq!(r.net.rx_mode(), RxMode::Big);
        let hl = r.net.header_len();
        assert_eq!(r.model.rx_buffer_lens()[0] as usize, hl + 65562);
        let full = frame(65562, 7);
        r.model.inject_rx(hdr(0, 0, 0, 0, 0, 0), &full).unwrap();
        let got = r.receive();
        assert_eq!(got.len(), 1, "{mode:?}/{pref:?}");
        assert_eq!(got[0].0, full);
        assert_eq!(r.net.stats().rx_length_errors, 0);
    }
}

/// Issue 14 (smaller): device-written buffers were read through `&[u8]` over DMA memory,
/// and the header once per parse, so a device that rewrote a returned buffer between the
/// debugger's look and the stack's changed what the driver had validated. The header is
/// now copied once (volatile) when the buffer comes back and every parse uses the copy.
#[test]
fn a_header_rewritten_after_return_does_not_change_the_frame() {
    for (mode, pref) in MODES {
        let mut r = rig(mode, pref, QEMU);
        let sim = r.model.sim.clone();
        let chains = sim.pop_chains(net_model::RX);
        let fr = frame(300, 0x5A);
        let mut first = hdr(0, 0, 0, 0, 0, 0).to_vec();
        first[10..12].copy_from_slice(&1u16.to_le_bytes());
        first.extend_from_slice(&fr);
        let n = sim.write_chain(&chains[0], &first);
        sim.complete(net_model::RX, chains[0].head, n);
        sim.signal_used(net_model::RX);
        let mut buf = vec![0u8; 2048];
        assert_eq!(r.net.debug_receive(&mut buf, 10).unwrap(), Some(300));
        // The device rewrites the header it returned: num_buffers 0, a bogus GSO type.
        let mut bad = hdr(0, 9, 0, 100, 0, 0).to_vec();
        bad[10..12].copy_from_slice(&0u16.to_le_bytes());
        sim.write_chain(&chains[0], &bad);
        let got = r.receive();
        assert_eq!(got.len(), 1, "{mode:?}/{pref:?}");
        assert_eq!(got[0].0, fr);
        assert_eq!(r.net.stats().rx_errors, 0);
    }
}
