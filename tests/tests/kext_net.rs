//! VirtioNet.kext's C ABI (`virtio-net-kext`), called the way its IOEthernetController shim
//! calls it, on top of the family's C ABI over the PCI simulation with `net_model` as the
//! device. IOKit order: the family starts; the controller's `start` creates the driver;
//! `enable`; `outputPacket` → transmit (segments + offload request), with completions
//! handed back; interrupts the family delivers → received frames, link changes, output
//! restart; the kernel debugger's polled send/receive while frames are in flight;
//! `disable`; `stop` (in-flight frames handed back); `free`; the family's stop (no DMA
//! leaks). Each test runs against the rlibs and against the loaded bundles (`kext_support`).

mod kext_support;

use std::cell::RefCell;
use std::ffi::c_void;
use std::time::{Duration, Instant};

use kext_support::{Family, FamilyKext, c_abi, kext_tests};
use virtio_kext_abi::VkSegment;
use virtio_net::features as f;
use virtio_net_kext::*;
use virtio_pci::Preference;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::net_model::{self, CtrlResponder, NetModel};
use virtio_tests::sim::{Sim, SimBuilder, SimInterrupt, SimMode};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
use virtio_tests::sim::MODES;
const RING: u64 = (1 << 28) | (1 << 29);
const NET: u64 = f::CSUM | f::GUEST_CSUM | f::MAC | f::STATUS | f::MRG_RXBUF | f::HOST_TSO4;

c_abi! {
    /// VirtioNet.kext's C functions (`VirtioNetABI.h`).
    pub struct NetAbi from virtio_net_kext {
        fn vnet_create(
            *mut virtio_kext_client::VfamDevice,
            *const VnetConfig,
            *const VnetCallbacks,
            *mut *mut VnetDevice,
        ) -> i32;
        fn vnet_info(*mut VnetDevice, *mut VnetInfo) -> i32;
        fn vnet_stats(*mut VnetDevice, *mut VnetStats) -> i32;
        fn vnet_enable(*mut VnetDevice, bool) -> i32;
        fn vnet_transmit(
            *mut VnetDevice,
            *const VkSegment,
            usize,
            u32,
            u32,
            *const u8,
            usize,
            usize,
            *mut bool,
        ) -> i32;
        fn vnet_poll(*mut VnetDevice, *mut VnetEvents) -> i32;
        fn vnet_interrupt(*mut VnetDevice, i32, *mut VnetEvents);
        fn vnet_set_promiscuous(*mut VnetDevice, bool) -> i32;
        fn vnet_set_multicast(*mut VnetDevice, *const u8, usize) -> i32;
        fn vnet_set_mac_address(*mut VnetDevice, *const u8) -> i32;
        fn vnet_ack_announce(*mut VnetDevice) -> i32;
        fn vnet_suspend(*mut VnetDevice) -> i32;
        fn vnet_resume(*mut VnetDevice) -> i32;
        fn vnet_debug_send(*mut VnetDevice, *const u8, usize, u32) -> i32;
        fn vnet_debug_receive(*mut VnetDevice, *mut u8, usize, u32, *mut usize) -> i32;
        fn vnet_stop(*mut VnetDevice) -> i32;
        fn vnet_destroy(*mut VnetDevice);
        fn vnet_log_init();
    }
}

/// The family and the net kext, both from the rlibs or both loaded.
#[derive(Clone, Copy)]
struct Kexts {
    family: &'static FamilyKext,
    net: NetAbi,
}

impl Kexts {
    fn rlib() -> Kexts {
        Kexts {
            family: FamilyKext::rlib(),
            net: NetAbi::rlib(),
        }
    }

    fn loaded() -> Option<Kexts> {
        let family = FamilyKext::loaded()?;
        let bundle = family.load_device("VirtioNet", "_vnet_log_init")?;
        Some(Kexts {
            family,
            net: NetAbi::loaded(bundle),
        })
    }
}

kext_tests!(Kexts:
    start_enable_output_receive_link_stop_in_every_mode,
    backpressure_stall_and_restart,
    segment_limit_reported_is_the_one_transmit_applies,
    frames_in_flight_fit_the_shims_mapping_pool,
    kernel_debugger_send_receive_with_frames_in_flight,
    debugger_entries_from_inside_callbacks_find_the_driver_free,
    promiscuous_multicast_and_mac_through_the_control_queue,
    random_mac_from_the_shims_entropy,
    announce_request_reaches_the_shim_before_the_ack,
    bad_arguments,
    lifecycle_across_sleep_and_wake,
    receive_flood_is_polled_in_bounded_turns,
    stop_while_a_debugger_entry_holds_the_driver,
);

#[derive(Default)]
struct ShimLog {
    tx_done: Vec<usize>,
    rx: Vec<(Vec<u8>, u32)>,
    events: Vec<VnetEvents>,
    /// Set by a test to play KDP stopping the machine inside a callback (a panic in the
    /// shim's `freePacket` or `inputPacket`, or KDP's freeze catching it there): the kext
    /// and the device the debugger then enters, from the next `tx_done` or `rx_frame`.
    debugger_probe: Option<(NetAbi, *mut VnetDevice)>,
    /// What that debugger's send and receive answered, and from which callback.
    probe_results: Vec<(&'static str, i32, i32)>,
    /// A device that refills the receive ring as fast as the driver reposts buffers.
    flood: Option<Flood>,
}

/// The device side of a receive flood: every buffer the driver makes available is filled
/// at once (from `rx_frame`, i.e. while the driver is still receiving), until `left` runs
/// out. Frame `k` is [`Flood::frame`]`(k)`.
struct Flood {
    model: NetModel,
    left: usize,
    next: usize,
}

impl Flood {
    fn frame(k: usize) -> Vec<u8> {
        frame(60 + k % 200, k as u8)
    }

    fn feed(&mut self) {
        while self.left > 0 && self.model.rx_available() > 0 {
            self.model
                .write_rx(Rig::rx_hdr(), &Flood::frame(self.next))
                .unwrap();
            self.left -= 1;
            self.next += 1;
        }
    }

    /// Feeds `n` more frames and signals the receive queue.
    fn start(&mut self, n: usize) {
        self.left += n;
        self.feed();
        self.model.sim.signal_used(net_model::RX);
    }
}

fn shim<'a>(ctx: *mut c_void) -> &'a RefCell<ShimLog> {
    // SAFETY: ctx is the test's boxed RefCell, alive while the device lives.
    unsafe { &*(ctx as *const RefCell<ShimLog>) }
}
unsafe extern "C" fn on_tx_done(ctx: *mut c_void, token: usize) {
    let mut s = shim(ctx).borrow_mut();
    debugger_probe(&mut s, "tx_done");
    s.tx_done.push(token);
}

/// The debugger's polled send and receive, from inside callback `from`, if a test asked.
fn debugger_probe(s: &mut ShimLog, from: &'static str) {
    let Some((net, d)) = s.debugger_probe.take() else {
        return;
    };
    let frame = frame(64, 0xDB);
    let mut buf = [0u8; 1518];
    let mut len = 0;
    // SAFETY: the live handle the test set; local buffers.
    let (send, receive) = unsafe {
        (
            (net.vnet_debug_send)(d, frame.as_ptr(), frame.len(), 10),
            (net.vnet_debug_receive)(d, buf.as_mut_ptr(), buf.len(), 1, &mut len),
        )
    };
    s.probe_results.push((from, send, receive));
}
unsafe extern "C" fn on_rx(
    ctx: *mut c_void,
    frags: *const VnetFragment,
    n: usize,
    len: usize,
    flags: u32,
) {
    let mut bytes = Vec::new();
    // SAFETY: `n` fragments from the driver, valid during the call.
    for fr in unsafe { std::slice::from_raw_parts(frags, n) } {
        // SAFETY: each fragment points to `len` readable bytes.
        bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(fr.data, fr.len) });
    }
    assert_eq!(bytes.len(), len);
    let mut s = shim(ctx).borrow_mut();
    debugger_probe(&mut s, "rx_frame");
    s.rx.push((bytes, flags));
    if let Some(f) = s.flood.as_mut() {
        f.feed();
    }
}
unsafe extern "C" fn on_events(ctx: *mut c_void, ev: *const VnetEvents) {
    // SAFETY: valid during the call.
    shim(ctx).borrow_mut().events.push(unsafe { *ev });
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    net_model::frame(MAC, len, seed)
}

struct Rig {
    kexts: Kexts,
    sim: Sim,
    mem: IdentityMemory,
    model: NetModel,
    fam: Option<Family>,
    log: Box<RefCell<ShimLog>>,
    dev: *mut VnetDevice,
    responder: Option<CtrlResponder>,
}

impl Rig {
    fn start(kexts: Kexts, mode: SimMode, pref: Preference, features: u64, queues: &[u16]) -> Rig {
        Rig::start_with(kexts, mode, pref, features | RING, queues, 0x5EED)
    }

    /// [`Rig::start`] with the ring features (`RING`'s bits or fewer) in `features`, and
    /// the shim's MAC seed.
    fn start_with(
        kexts: Kexts,
        mode: SimMode,
        pref: Preference,
        features: u64,
        queues: &[u16],
        mac_seed: u64,
    ) -> Rig {
        let version = if mode == SimMode::Legacy { 0 } else { 1 << 32 };
        let sim = SimBuilder::new(mode, 1)
            .features(features | version)
            .queues(queues)
            .device_config(&net_model::config_bytes(MAC, 1, 1500, 10_000, 1))
            .memory_len(24 << 20)
            .build();
        let fam = Family::start(kexts.family, &sim, pref).expect("family start");
        let responder = Some(CtrlResponder::ok(&sim));
        let log = Box::new(RefCell::new(ShimLog::default()));
        let cb = VnetCallbacks {
            ctx: (&*log as *const RefCell<ShimLog>).cast_mut().cast(),
            tx_done: Some(on_tx_done),
            rx_frame: Some(on_rx),
            events: Some(on_events),
        };
        let config = VnetConfig { mac_seed };
        let mut dev = std::ptr::null_mut();
        // SAFETY: the nub's live handle; the callbacks' context outlives the device.
        let s = unsafe { (kexts.net.vnet_create)(fam.client_handle(), &config, &cb, &mut dev) };
        assert_eq!(s, VNET_OK, "{mode:?}/{pref:?}: vnet_create");
        sim.check_init_order().unwrap();
        Rig {
            kexts,
            mem: sim.memory(),
            model: NetModel::new(&sim),
            sim,
            fam: Some(fam),
            log,
            dev,
            responder,
        }
    }

    /// A modern device with a control queue (rings 256, 256, 64), found by the default
    /// transport preference.
    fn with_ctrl_queue(kexts: Kexts, features: u64) -> Rig {
        Rig::start(
            kexts,
            SimMode::Modern,
            Preference::Auto,
            features,
            &[256, 256, 64],
        )
    }

    fn fam(&self) -> &Family {
        self.fam.as_ref().unwrap()
    }

    fn info(&self) -> VnetInfo {
        let mut i = VnetInfo::default();
        // SAFETY: live handle, local out-pointer.
        let status = unsafe { (self.kexts.net.vnet_info)(self.dev, &mut i) };
        assert_eq!(status, VNET_OK);
        i
    }

    fn stats(&self) -> VnetStats {
        let mut s = VnetStats::default();
        // SAFETY: live handle, local out-pointer.
        let status = unsafe { (self.kexts.net.vnet_stats)(self.dev, &mut s) };
        assert_eq!(status, VNET_OK);
        s
    }

    /// `outputPacket`: the frame in `nseg` DMA segments (the mbuf cursor's), with offloads.
    fn output(
        &mut self,
        data: &[u8],
        nseg: usize,
        flags: u32,
        mss: u32,
        token: usize,
    ) -> (i32, bool) {
        let buf = self.mem.alloc_buffer(data.len());
        self.mem.slice(&buf)[..data.len()].copy_from_slice(data);
        let step = data.len().div_ceil(nseg);
        let segs: Vec<VkSegment> = (0..data.len())
            .step_by(step)
            .map(|o| VkSegment {
                addr: buf.daddr + o as u64,
                len: step.min(data.len() - o) as u32,
                reserved: 0,
            })
            .collect();
        let hdr = &data[..data.len().min(VNET_TX_HEADER_BYTES as usize)];
        let mut stop = false;
        // SAFETY: live handle; segments and headers valid for the call.
        let s = unsafe {
            (self.kexts.net.vnet_transmit)(
                self.dev,
                segs.as_ptr(),
                segs.len(),
                flags,
                mss,
                hdr.as_ptr(),
                hdr.len(),
                token,
                &mut stop,
            )
        };
        (s, stop)
    }

    fn rx_hdr() -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = 2; // DATA_VALID
        h
    }

    fn take_rx(&self) -> Vec<(Vec<u8>, u32)> {
        std::mem::take(&mut self.log.borrow_mut().rx)
    }

    fn take_done(&self) -> Vec<usize> {
        std::mem::take(&mut self.log.borrow_mut().tx_done)
    }

    fn unload(mut self) {
        // SAFETY: live handle, not used after destroy.
        unsafe {
            assert_eq!((self.kexts.net.vnet_enable)(self.dev, false), VNET_OK);
            assert_eq!((self.kexts.net.vnet_stop)(self.dev), VNET_OK);
            (self.kexts.net.vnet_destroy)(self.dev);
        }
        if let Some(r) = self.responder.take() {
            r.stop();
        }
        self.fam.take().unwrap().stop();
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
    }
}

fn start_enable_output_receive_link_stop_in_every_mode(kexts: Kexts) {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, mode, pref, NET, &[256, 256]);
        let i = r.info();
        assert_eq!(i.mac, MAC, "{what}");
        assert_eq!((i.link_up, i.mtu, i.max_packet), (1, 1500, 1518));
        assert_eq!(
            (i.tx_csum, i.tso4, i.tso6, i.rx_csum),
            (1, 1, 0, 1),
            "{what}"
        );
        assert_eq!(i.duplex, 0, "no SPEED_DUPLEX offered");
        assert_eq!(i.enabled, 0);

        // Before enable: frames are dropped, transmit is refused.
        let (s, _) = r.output(&frame(60, 0), 1, 0, 0, 0x50);
        assert_eq!(s, VNET_E_STOPPED);
        r.model.inject_rx(Rig::rx_hdr(), &frame(70, 7)).unwrap();
        r.fam().interrupts();
        assert!(r.take_rx().is_empty());
        assert_eq!(r.stats().rx_dropped_disabled, 1);

        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.net.vnet_enable)(r.dev, true) }, VNET_OK);

        // outputPacket with a TCP checksum request over 3 segments.
        let mut tcp = frame(200, 3);
        tcp[14] = 0x45;
        tcp[23] = 6;
        tcp[34 + 12] = 5 << 4;
        tcp[34 + 13] = 0x18; // PSH ACK (no CWR: HOST_ECN is not offered)
        let (s, stop) = r.output(&tcp, 3, VNET_TX_CSUM_TCP, 0, 0x100);
        assert_eq!((s, stop), (VNET_OK, false), "{what}");
        let sent = r.model.take_tx();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].data, tcp);
        assert_eq!(sent[0].header[0] & 1, 1, "NEEDS_CSUM");
        assert_eq!(
            u16::from_le_bytes([sent[0].header[6], sent[0].header[7]]),
            34
        );
        assert_eq!(
            u16::from_le_bytes([sent[0].header[8], sent[0].header[9]]),
            16
        );
        // TSO over IPv4.
        let mut big = tcp.clone();
        big.resize(9000, 0xEE);
        let (s, _) = r.output(&big, 4, VNET_TX_TSO4 | VNET_TX_CSUM_TCP, 1448, 0x101);
        assert_eq!(s, VNET_OK);
        let sent = r.model.take_tx();
        assert_eq!(sent[0].header[1], 1, "GSO_TCPV4");
        assert_eq!(
            u16::from_le_bytes([sent[0].header[4], sent[0].header[5]]),
            1448
        );
        // A request the frame cannot satisfy is dropped.
        let (s, _) = r.output(&frame(80, 1), 1, VNET_TX_TSO6, 1400, 0x102);
        assert_eq!(s, VNET_E_BAD_FRAME);
        // Completions are reclaimed on the next transmit (no transmit interrupt).
        let (s, _) = r.output(&frame(60, 4), 1, 0, 0, 0x103);
        assert_eq!(s, VNET_OK);
        let mut done = r.take_done();
        done.sort();
        assert_eq!(done, vec![0x100, 0x101], "{what}");
        r.model.take_tx();

        // Receive: the interrupt lends the frame; the shim copies it out.
        let f1 = frame(1400, 9);
        r.model.inject_rx(Rig::rx_hdr(), &f1).unwrap();
        assert_eq!(r.fam().interrupts(), 1);
        assert_eq!(r.take_rx(), vec![(f1, VNET_RX_CSUM_VALID)], "{what}");
        let ev = r.log.borrow_mut().events.pop().unwrap();
        assert_eq!((ev.rx_frames, ev.link_up, ev.rx_more), (1, 1, 0));

        // NEEDS_CSUM (a local peer left the checksum partial): completed before the stack
        // sees it, and not reported as validated (a forwarded frame must leave correct).
        let partial = frame(301, 11);
        let mut hdr = [0u8; 12];
        hdr[0] = 1; // NEEDS_CSUM
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
        r.model.inject_rx(hdr, &partial).unwrap();
        r.fam().interrupts();
        let got = r.take_rx();
        assert_eq!(got.len(), 1, "{what}");
        let (data, flags) = &got[0];
        assert_eq!(
            *flags, 0,
            "{what}: a completed partial checksum is not 'validated'"
        );
        let mut expected = partial.clone();
        let mut sum: u32 = 0;
        for (i, b) in partial[34..].iter().enumerate() {
            sum += if i % 2 == 0 {
                u32::from(*b) << 8
            } else {
                u32::from(*b)
            };
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        expected[50..52].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        assert_eq!(
            data, &expected,
            "{what}: checksum completed at start + offset"
        );
        r.log.borrow_mut().events.clear();

        // Link down / up through config interrupts.
        r.model.set_status(false, false);
        r.fam().interrupts();
        let ev = r.log.borrow_mut().events.pop().unwrap();
        assert_eq!((ev.link_changed, ev.link_up), (1, 0), "{what}");
        assert_eq!(r.info().link_up, 0);
        r.model.set_status(true, false);
        r.fam().interrupts();
        let ev = r.log.borrow_mut().events.pop().unwrap();
        assert_eq!((ev.link_changed, ev.link_up), (1, 1));

        // stop with a frame in flight: it is handed back.
        let (s, _) = r.output(&frame(60, 5), 1, 0, 0, 0x104);
        assert_eq!(s, VNET_OK);
        r.take_done();
        let held = r.model.hold_tx();
        assert_eq!(held.len(), 1);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.net.vnet_stop)(r.dev) }, VNET_OK);
        assert_eq!(r.take_done(), vec![0x104], "{what}");
        // SAFETY: live handle.
        let status = unsafe { (kexts.net.vnet_enable)(r.dev, true) };
        assert_eq!(status, VNET_E_STOPPED);
        let st = r.stats();
        assert!(st.tx_frames >= 4 && st.rx_frames == 3 && st.tx_dropped == 1);
        r.unload();
    }
}

/// A full transmit ring stalls the output queue; completions restart it.
fn backpressure_stall_and_restart(kexts: Kexts) {
    // The transmit ring must hold one worst-case frame (32 segments + header) whole.
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, NET, &[256, 64]);
    // SAFETY: live handle.
    unsafe { (kexts.net.vnet_enable)(r.dev, true) };
    let mut accepted = 0;
    let mut stopped = false;
    for k in 0..256usize {
        let (s, stop) = r.output(&frame(100, k as u8), 2, 0, 0, 0x1000 + k);
        match s {
            VNET_OK => accepted += 1,
            VNET_E_BUSY => {
                stopped = true;
                break;
            }
            other => panic!("status {other}"),
        }
        // `stop`: a frame of the most segments may no longer fit; smaller ones may.
        let _ = stop;
    }
    assert!(stopped && accepted > 0);
    let held = r.model.hold_tx();
    assert_eq!(held.len(), accepted);
    let chains: Vec<_> = held.into_iter().map(|(c, _)| c).collect();
    r.model.complete_tx(&chains);
    assert_eq!(r.fam().interrupts(), 1, "the delayed transmit interrupt");
    let restart = r.log.borrow().events.iter().any(|e| e.restart == 1);
    assert!(restart, "the transmit interrupt restarts the output queue");
    assert_eq!(r.take_done().len(), accepted);
    let (s, _) = r.output(&frame(100, 0xFF), 2, 0, 0, 0x2000);
    assert_eq!(s, VNET_OK);
    r.unload();
}

/// The segment limit the controller reports is the one transmit applies: on a 16-entry
/// transmit ring without indirect descriptors a frame of 32 segments (the limit reported
/// before) cannot fit beside the debugger's reserve, so the driver lowers its limit, and
/// the shim, which builds its segment lists to the reported limit, must learn it (its
/// longer frames were refused as bad and dropped).
fn segment_limit_reported_is_the_one_transmit_applies(kexts: Kexts) {
    let net = kexts.net;
    let no_indirect = RING & !(1 << 28);
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start_with(kexts, mode, pref, NET | no_indirect, &[256, 16], 1);
        // SAFETY: live handle.
        assert_eq!(unsafe { (net.vnet_enable)(r.dev, true) }, VNET_OK);
        let limit = r.info().tx_max_segments as usize;
        assert!(
            (1..VNET_TX_SEGMENTS_MAX as usize).contains(&limit),
            "{what}: {limit}"
        );
        let (s, _) = r.output(&frame(10 * limit, 1), limit, 0, 0, 0x10);
        assert_eq!(s, VNET_OK, "{what}: a frame of exactly {limit} segments");
        let sent = r.model.take_tx();
        assert_eq!(sent.len(), 1, "{what}");
        assert_eq!(sent[0].data, frame(10 * limit, 1), "{what}");
        let (s, _) = r.output(&frame(10 * (limit + 1), 2), limit + 1, 0, 0, 0x11);
        assert_eq!(s, VNET_E_BAD_FRAME, "{what}: one segment more");
        r.unload();
    }
}

/// The shim maps each frame in flight with its own `IODMACommand`, from a pool of
/// `tx_frames` made at start: a 1024-entry transmit ring still takes no more than
/// `VNET_TX_FRAMES_MAX` frames at once (the last says stop, one more is BUSY), and every
/// token is back before the queue restarts; a smaller ring reports its own size.
fn frames_in_flight_fit_the_shims_mapping_pool(kexts: Kexts) {
    let net = kexts.net;
    let small = Rig::start(kexts, SimMode::Modern, Preference::Auto, NET, &[256, 64]);
    assert_eq!(small.info().tx_frames, 64);
    small.unload();
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, NET, &[256, 1024]);
    let pool = r.info().tx_frames as usize;
    assert_eq!(pool, VNET_TX_FRAMES_MAX as usize);
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_enable)(r.dev, true) }, VNET_OK);
    for k in 0..pool {
        let (s, stop) = r.output(&frame(60, k as u8), 1, 0, 0, 0x1000 + k);
        assert_eq!((s, stop), (VNET_OK, k + 1 == pool), "frame {k}");
    }
    let (s, _) = r.output(&frame(60, 0), 1, 0, 0, 0x9999);
    assert_eq!(s, VNET_E_BUSY, "beyond the pool");
    let held = r.model.hold_tx();
    assert_eq!(held.len(), pool);
    let chains: Vec<_> = held.into_iter().map(|(c, _)| c).collect();
    r.model.complete_tx(&chains);
    r.fam().interrupts();
    assert!(r.log.borrow().events.iter().any(|e| e.restart == 1));
    assert_eq!(
        r.take_done().len(),
        pool,
        "every token back before the restart"
    );
    r.unload();
}

/// KDP: polled send and receive while normal frames are in flight.
fn kernel_debugger_send_receive_with_frames_in_flight(kexts: Kexts) {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, mode, pref, NET, &[256, 256]);
        // SAFETY: live handle.
        unsafe { (kexts.net.vnet_enable)(r.dev, true) };
        // A normal frame in flight (the device is slow).
        let (s, _) = r.output(&frame(300, 1), 2, 0, 0, 0x300);
        assert_eq!(s, VNET_OK);
        let held = r.model.hold_tx();
        // Frames arrive before the debugger looks (no interrupt taken: the machine stopped).
        let a = frame(120, 0xA1);
        let b = frame(90, 0xB2);
        r.model.write_rx(Rig::rx_hdr(), &a).unwrap();
        r.model.write_rx(Rig::rx_hdr(), &b).unwrap();

        // receivePacket: the debugger sees both, in order, without consuming them.
        let mut buf = [0u8; 1518];
        let mut len = 0usize;
        // SAFETY: live handle; `buf` and `len` are locals.
        unsafe {
            assert_eq!(
                (kexts.net.vnet_debug_receive)(r.dev, buf.as_mut_ptr(), buf.len(), 10, &mut len),
                VNET_OK
            );
            assert_eq!(&buf[..len], &a[..], "{what}");
            assert_eq!(
                (kexts.net.vnet_debug_receive)(r.dev, buf.as_mut_ptr(), buf.len(), 10, &mut len),
                VNET_OK
            );
            assert_eq!(&buf[..len], &b[..]);
            assert_eq!(
                (kexts.net.vnet_debug_receive)(r.dev, buf.as_mut_ptr(), buf.len(), 5, &mut len),
                VNET_OK
            );
            assert_eq!(len, 0, "bounded wait, nothing more");
        }
        // sendPacket: goes out beside the normal frame still held by the device.
        let kdp = frame(100, 0xD0);
        // SAFETY: live handle.
        let s = unsafe { (kexts.net.vnet_debug_send)(r.dev, kdp.as_ptr(), kdp.len(), 100) };
        assert_eq!(s, VNET_OK, "{what}");
        let sent = r.model.take_tx();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].data, kdp);
        // The normal path resumes: both frames reach the stack, the held frame completes.
        let chains: Vec<_> = held.into_iter().map(|(c, _)| c).collect();
        r.model.complete_tx(&chains);
        let c = frame(80, 0xC3);
        r.model.inject_rx(Rig::rx_hdr(), &c).unwrap();
        r.fam().interrupts();
        let got: Vec<Vec<u8>> = r.take_rx().into_iter().map(|(f, _)| f).collect();
        assert_eq!(got, vec![a, b, c], "{what}");
        let (s, _) = r.output(&frame(60, 2), 1, 0, 0, 0x301);
        assert_eq!(s, VNET_OK);
        assert_eq!(r.take_done(), vec![0x300], "{what}");
        let st = r.stats();
        assert_eq!((st.debug_tx_frames, st.debug_rx_frames), (1, 2));
        r.unload();
    }
}

/// KDP stopping the machine inside a callback (a panic in the shim's `freePacket` from
/// `tx_done`, or in `allocatePacket` / `inputPacket` from `rx_frame`; or KDP's freeze
/// catching the work loop there) finds the driver free: the callbacks run with the
/// driver's lock released. They used to run under it, so every debugger entry answered
/// `VNET_E_LOCKED` for the whole debugging session. The frames lent to `rx_frame` stay out
/// of the debugger's sight, and the normal path goes on afterwards.
fn debugger_entries_from_inside_callbacks_find_the_driver_free(kexts: Kexts) {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, mode, pref, NET, &[256, 256]);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.net.vnet_enable)(r.dev, true) }, VNET_OK);
        let posted = r.model.rx_available();
        // tx_done: a completed frame is reclaimed by the next transmit.
        assert_eq!(r.output(&frame(60, 1), 1, 0, 0, 0x10).0, VNET_OK);
        r.model.take_tx();
        r.log.borrow_mut().debugger_probe = Some((kexts.net, r.dev));
        assert_eq!(r.output(&frame(60, 2), 1, 0, 0, 0x11).0, VNET_OK);
        assert_eq!(r.take_done(), vec![0x10], "{what}");
        let probes = std::mem::take(&mut r.log.borrow_mut().probe_results);
        assert_eq!(probes, vec![("tx_done", VNET_OK, VNET_OK)], "{what}");
        let sent: Vec<Vec<u8>> = r.model.take_tx().into_iter().map(|f| f.data).collect();
        assert!(
            sent.contains(&frame(64, 0xDB)),
            "{what}: the debugger's frame went out"
        );
        let mut ev = VnetEvents::default();
        // SAFETY: live handle, local out-pointer.
        assert_eq!(unsafe { (kexts.net.vnet_poll)(r.dev, &mut ev) }, VNET_OK);
        assert_eq!(r.take_done(), vec![0x11], "{what}");
        // rx_frame: two frames arrive; the debugger, entered from the first one's
        // delivery, sees neither (both were lent to the stack) and its send goes out.
        let (a, b) = (frame(90, 3), frame(95, 4));
        r.model.write_rx(Rig::rx_hdr(), &a).unwrap();
        r.model.inject_rx(Rig::rx_hdr(), &b).unwrap();
        r.log.borrow_mut().debugger_probe = Some((kexts.net, r.dev));
        r.fam().interrupts();
        let probes = std::mem::take(&mut r.log.borrow_mut().probe_results);
        assert_eq!(probes, vec![("rx_frame", VNET_OK, VNET_OK)], "{what}");
        let got: Vec<Vec<u8>> = r.take_rx().into_iter().map(|(f, _)| f).collect();
        assert_eq!(got, vec![a, b], "{what}");
        let sent: Vec<Vec<u8>> = r.model.take_tx().into_iter().map(|f| f.data).collect();
        assert_eq!(sent, vec![frame(64, 0xDB)], "{what}");
        let st = r.stats();
        assert_eq!(
            (
                st.debug_tx_frames,
                st.debug_rx_frames,
                st.debugger_locked_out
            ),
            (2, 0, 0),
            "{what}"
        );
        // The lent buffers went back to the device: receive goes on.
        let c = frame(100, 5);
        r.model.inject_rx(Rig::rx_hdr(), &c).unwrap();
        r.fam().interrupts();
        assert_eq!(r.take_rx(), vec![(c, VNET_RX_CSUM_VALID)], "{what}");
        assert_eq!(
            r.model.rx_available(),
            posted,
            "{what}: every receive buffer posted again"
        );
        r.unload();
    }
}

fn promiscuous_multicast_and_mac_through_the_control_queue(kexts: Kexts) {
    let feats = NET | f::CTRL_VQ | f::CTRL_RX | f::CTRL_MAC_ADDR;
    let r = Rig::with_ctrl_queue(kexts, feats);
    let i = r.info();
    assert_eq!((i.ctrl_rx, i.mac_settable), (1, 1));
    let mc = [[0x01, 0x00, 0x5E, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
    let many = vec![[0x01, 0x00, 0x5E, 0, 0, 9]; VNET_MULTICAST_MAX as usize + 1];
    let new_mac = [0x02, 0, 0, 0, 0, 7];
    // SAFETY: live handle; pointers to locals.
    unsafe {
        assert_eq!((kexts.net.vnet_set_promiscuous)(r.dev, true), VNET_OK);
        assert_eq!(
            (kexts.net.vnet_set_multicast)(r.dev, mc.as_ptr().cast(), mc.len()),
            VNET_OK
        );
        assert_eq!(
            (kexts.net.vnet_set_multicast)(r.dev, many.as_ptr().cast(), many.len()),
            VNET_OK
        );
        assert_eq!(
            (kexts.net.vnet_set_mac_address)(r.dev, new_mac.as_ptr()),
            VNET_OK
        );
        assert_eq!(
            (kexts.net.vnet_set_multicast)(r.dev, std::ptr::null(), 2),
            VNET_E_INVALID
        );
    }
    assert_eq!(r.info().mac, new_mac);
    let cmds = r.responder.as_ref().unwrap().commands();
    let kinds: Vec<(u8, u8)> = cmds.iter().map(|c| (c.class, c.command)).collect();
    assert!(kinds.contains(&(0, 0)), "RX_PROMISC: {kinds:?}");
    assert!(kinds.contains(&(0, 1)), "RX_ALLMULTI");
    assert!(kinds.contains(&(1, 0)), "MAC_TABLE_SET");
    assert!(kinds.contains(&(1, 1)), "MAC_ADDR_SET");
    let promisc = cmds
        .iter()
        .find(|c| (c.class, c.command) == (0, 0))
        .unwrap();
    assert_eq!(promisc.data, vec![vec![1]]);
    let table = cmds
        .iter()
        .find(|c| (c.class, c.command) == (1, 0))
        .unwrap();
    assert_eq!(
        table.data[1][..4],
        2u32.to_le_bytes(),
        "two multicast entries"
    );
    r.unload();
}

/// §5.1.5: a device without a usable MAC address (none offered here) gets a random locally
/// administered one. It comes from the shim's entropy: it used to come from a constant
/// seed, so every such guest had the same address.
fn random_mac_from_the_shims_entropy(kexts: Kexts) {
    let no_mac = NET & !f::MAC;
    let mac_of = |seed: u64| {
        let r = Rig::start_with(
            kexts,
            SimMode::Modern,
            Preference::Auto,
            no_mac | RING,
            &[256, 256],
            seed,
        );
        let mac = r.info().mac;
        r.unload();
        mac
    };
    let (a, b) = (mac_of(0x0123_4567_89AB_CDEF), mac_of(0xFEDC_BA98_7654_3210));
    assert_ne!(a, b, "two guests, two addresses");
    for mac in [a, b] {
        assert_eq!(mac[0] & 3, 2, "{mac:02x?}: locally administered unicast");
        assert_ne!(mac, MAC);
    }
    assert_eq!(mac_of(0x0123_4567_89AB_CDEF), a, "the seed decides");
}

/// GUEST_ANNOUNCE (§5.1.6.5.4): the device's ANNOUNCE request reaches the shim as an event
/// (it sends the gratuitous packets), and the acknowledgement waits for its
/// `vnet_ack_announce`. The request used to be acknowledged at once with nothing sent.
fn announce_request_reaches_the_shim_before_the_ack(kexts: Kexts) {
    let feats = NET | f::CTRL_VQ | f::GUEST_ANNOUNCE;
    let ack = (3u8, 0u8); // VIRTIO_NET_CTRL_ANNOUNCE, _ACK
    let acks = |r: &Rig| {
        let cmds = r.responder.as_ref().unwrap().commands();
        cmds.iter().filter(|c| (c.class, c.command) == ack).count()
    };
    let r = Rig::with_ctrl_queue(kexts, feats);
    // SAFETY: live handle.
    assert_eq!(unsafe { (kexts.net.vnet_enable)(r.dev, true) }, VNET_OK);
    r.model.set_status(true, true);
    r.fam().interrupts();
    let ev = r.log.borrow_mut().events.pop().unwrap();
    assert_eq!((ev.announce, ev.link_changed), (1, 0), "{ev:?}");
    assert_eq!(acks(&r), 0, "no ack before the shim announced");
    // SAFETY: live handle.
    assert_eq!(unsafe { (kexts.net.vnet_ack_announce)(r.dev) }, VNET_OK);
    assert_eq!(acks(&r), 1);
    // The device clears ANNOUNCE after the ack (its own configuration change, which
    // announces nothing again).
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.sim.device_config()[6] & 2 != 0 {
        assert!(Instant::now() < deadline, "ANNOUNCE never cleared");
        std::thread::yield_now();
    }
    r.log.borrow_mut().events.clear();
    r.fam().interrupts();
    assert!(r.log.borrow().events.iter().all(|e| e.announce == 0));
    // A configuration change without the request announces nothing.
    r.model.set_status(false, false);
    r.fam().interrupts();
    let ev = r.log.borrow_mut().events.pop().unwrap();
    assert_eq!((ev.announce, ev.link_changed), (0, 1), "{ev:?}");
    r.unload();
    // Without GUEST_ANNOUNCE there is nothing to acknowledge.
    let r = Rig::with_ctrl_queue(kexts, NET | f::CTRL_VQ);
    // SAFETY: live handle.
    let s = unsafe { (kexts.net.vnet_ack_announce)(r.dev) };
    assert_eq!(s, VNET_E_UNSUPPORTED);
    r.unload();
}

fn bad_arguments(kexts: Kexts) {
    let cb = VnetCallbacks {
        ctx: std::ptr::null_mut(),
        tx_done: None,
        rx_frame: None,
        events: None,
    };
    let mut d = std::ptr::null_mut();
    // SAFETY: refused before any use.
    unsafe {
        assert_eq!(
            (kexts.net.vnet_create)(std::ptr::null_mut(), &VnetConfig::default(), &cb, &mut d),
            VNET_E_INVALID
        );
        assert_eq!(
            (kexts.net.vnet_enable)(std::ptr::null_mut(), true),
            VNET_E_INVALID
        );
        assert_eq!(
            (kexts.net.vnet_info)(std::ptr::null_mut(), std::ptr::null_mut()),
            VNET_E_INVALID
        );
        (kexts.net.vnet_interrupt)(std::ptr::null_mut(), -1, std::ptr::null_mut());
        assert_eq!((kexts.net.vnet_stop)(std::ptr::null_mut()), VNET_E_INVALID);
        (kexts.net.vnet_destroy)(std::ptr::null_mut());
    }
    assert!(d.is_null());
}

/// The controller's life in IOKit order across a system sleep, in every transport mode:
/// start (an interrupt arrives before `enable`), traffic, sleep (`setPowerState(0)`) with
/// frames held by the device and an interrupt arriving while asleep, wake
/// (`setPowerState(1)`: promiscuous mode and the MAC address replayed through the control
/// queue), traffic both ways, stop with frames in flight, unload. Every transmit token
/// comes back exactly once, the device saw a reset and a fresh initialisation, and no DMA
/// region or kernel allocation is left.
fn lifecycle_across_sleep_and_wake(kexts: Kexts) {
    let feats = NET | f::CTRL_VQ | f::CTRL_RX | f::CTRL_MAC_ADDR;
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, mode, pref, feats, &[256, 256, 64]);
        // An interrupt during start (before enable): harmless, nothing delivered up.
        r.model.inject_rx(Rig::rx_hdr(), &frame(90, 1)).unwrap();
        r.fam().interrupts();
        assert!(r.take_rx().is_empty(), "{what}: frames before enable");
        let new_mac = [0x02, 0, 0, 0, 0, 9];
        // SAFETY: live handle; a local MAC.
        unsafe {
            assert_eq!((kexts.net.vnet_enable)(r.dev, true), VNET_OK);
            assert_eq!((kexts.net.vnet_set_promiscuous)(r.dev, true), VNET_OK);
            assert_eq!(
                (kexts.net.vnet_set_mac_address)(r.dev, new_mac.as_ptr()),
                VNET_OK
            );
        }
        let before = r.responder.as_ref().unwrap().commands().len();
        for k in 0..3 {
            assert_eq!(
                r.output(&frame(200, k), 1, 0, 0, 0x100 + k as usize).0,
                VNET_OK
            );
        }
        assert_eq!(r.model.take_tx().len(), 3);
        // Frames the device holds when the sleep comes.
        for k in 0..4 {
            assert_eq!(
                r.output(&frame(300, k), 2, 0, 0, 0x200 + k as usize).0,
                VNET_OK
            );
        }
        let held = r.model.hold_tx();
        assert_eq!(held.len(), 4, "{what}");
        let resets = r.sim.resets();

        // setPowerState(0).
        assert_eq!(
            // SAFETY: live handle.
            unsafe { (kexts.net.vnet_suspend)(r.dev) },
            VNET_OK,
            "{what}"
        );
        assert_eq!(
            r.sim.resets(),
            resets + 1,
            "{what}: the device is reset for sleep"
        );
        let mut done = r.take_done();
        done.sort();
        assert_eq!(
            done,
            vec![0x100, 0x101, 0x102, 0x200, 0x201, 0x202, 0x203],
            "{what}"
        );
        // While asleep: sends are refused (the shim's queue is stopped anyway), and an
        // interrupt (a shared INTx line) finds nothing to do.
        assert_eq!(
            r.output(&frame(100, 7), 1, 0, 0, 0x300).0,
            VNET_E_BUSY,
            "{what}"
        );
        r.fam().interrupts();
        let mut ev = VnetEvents::default();
        // SAFETY: the family's interrupt entry as a spurious shared-line interrupt calls it.
        unsafe { (kexts.net.vnet_interrupt)(r.dev, -1, &mut ev) };
        assert!(r.take_rx().is_empty() && r.take_done().is_empty(), "{what}");
        // A second sleep request is refused cleanly rather than resetting twice.
        // SAFETY: live handle.
        let again = unsafe { (kexts.net.vnet_suspend)(r.dev) };
        assert_ne!(again, VNET_OK, "{what}: already asleep");

        // setPowerState(1).
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.net.vnet_resume)(r.dev) }, VNET_OK, "{what}");
        r.sim.check_init_order().unwrap();
        // A wake for a driver that never went to sleep (the shim's sleep found it held by
        // a debugger entry for good) has nothing to do, and says so with VNET_OK so that
        // the shim restarts its output queue.
        let resets = r.sim.resets();
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.net.vnet_resume)(r.dev) }, VNET_OK, "{what}");
        assert_eq!(r.sim.resets(), resets, "{what}: nothing reset");
        let replayed: Vec<(u8, u8)> = r.responder.as_ref().unwrap().commands()[before..]
            .iter()
            .map(|c| (c.class, c.command))
            .collect();
        assert!(
            replayed.contains(&(0, 0)),
            "{what}: promiscuous replayed after wake: {replayed:?}"
        );
        assert!(
            replayed.contains(&(1, 1)),
            "{what}: MAC address replayed after wake: {replayed:?}"
        );
        assert_eq!(r.info().link_up, 1, "{what}");
        // Traffic both ways again.
        assert_eq!(
            r.output(&frame(150, 9), 1, 0, 0, 0x400).0,
            VNET_OK,
            "{what}"
        );
        assert_eq!(r.model.take_tx().len(), 1, "{what}");
        let f2 = frame(700, 3);
        r.model.inject_rx(Rig::rx_hdr(), &f2).unwrap();
        r.fam().interrupts();
        assert_eq!(r.take_rx(), vec![(f2, VNET_RX_CSUM_VALID)], "{what}");

        // Stop with a frame in flight: it comes back once; then unload (no leaks).
        assert_eq!(r.output(&frame(120, 4), 1, 0, 0, 0x500).0, VNET_OK);
        assert_eq!(r.model.hold_tx().len(), 1);
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.net.vnet_stop)(r.dev) }, VNET_OK, "{what}");
        r.fam().interrupts();
        let mut done = r.take_done();
        done.sort();
        assert_eq!(done, vec![0x400, 0x500], "{what}: every token exactly once");
        r.unload();
    }
}

/// A device that refills the receive ring as fast as buffers are reposted (what made the
/// shim's `handleEvents` loop for good): each interrupt or poll delivers at most
/// `VNET_FRAMES_PER_POLL` frames and reports `rx_more`, so the shim, played here (at most
/// `VNET_POLLS_PER_EVENT` polls per event, then a deferred poll, with other gated work in
/// between), holds the work loop only in bounded turns. No frame is lost or reordered;
/// once the flood ends receive is back on interrupts; a deferred poll that runs after
/// `stop` ends the chain.
fn receive_flood_is_polled_in_bounded_turns(kexts: Kexts) {
    const FLOOD: usize = 3000;
    let net = kexts.net;
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, NET, &[256, 256]);
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_enable)(r.dev, true) }, VNET_OK);
    let poll = |r: &Rig| {
        let mut ev = VnetEvents::default();
        // SAFETY: live handle, local out-pointer.
        assert_eq!(unsafe { (net.vnet_poll)(r.dev, &mut ev) }, VNET_OK);
        assert!(ev.rx_frames <= VNET_FRAMES_PER_POLL, "{ev:?}");
        ev
    };
    r.log.borrow_mut().flood = Some(Flood {
        model: NetModel::new(&r.sim),
        left: 0,
        next: 0,
    });
    r.log.borrow_mut().flood.as_mut().unwrap().start(FLOOD);
    assert_eq!(r.fam().interrupts(), 1);
    let mut ev = r.log.borrow_mut().events.pop().unwrap();
    assert!(
        ev.rx_frames <= VNET_FRAMES_PER_POLL && ev.rx_more == 1,
        "{ev:?}"
    );
    let mut delivered = ev.rx_frames as usize;
    let mut turns = 1;
    loop {
        // handleEvents: a bounded number of polls for this event.
        let mut polls = 0;
        while ev.rx_more == 1 && polls < VNET_POLLS_PER_EVENT {
            ev = poll(&r);
            delivered += ev.rx_frames as usize;
            polls += 1;
        }
        if ev.rx_more == 0 {
            break;
        }
        // Deferred: the work loop serves others (a transmit here), then the timer's action
        // polls.
        turns += 1;
        assert!(turns < 100, "the flood never ends");
        let (s, _) = r.output(&frame(60, turns as u8), 1, 0, 0, 0x800 + turns);
        assert_eq!(s, VNET_OK, "transmit between turns");
        ev = poll(&r);
        delivered += ev.rx_frames as usize;
    }
    let per_turn = (1 + VNET_POLLS_PER_EVENT as usize) * VNET_FRAMES_PER_POLL as usize;
    assert_eq!(delivered, FLOOD);
    assert!(turns >= FLOOD.div_ceil(per_turn), "{turns} turns");
    let got = r.take_rx();
    assert_eq!(got.len(), FLOOD);
    for (k, (data, flags)) in got.iter().enumerate() {
        assert_eq!(
            (data, *flags),
            (&Flood::frame(k), VNET_RX_CSUM_VALID),
            "frame {k}"
        );
    }
    // Polling mode ended with the flood: the next frame interrupts again.
    r.log.borrow_mut().flood.as_mut().unwrap().start(1);
    assert_eq!(r.fam().interrupts(), 1, "receive back on interrupts");
    assert_eq!(r.take_rx(), vec![(Flood::frame(FLOOD), VNET_RX_CSUM_VALID)]);

    // A second flood, stopped between turns (stop runs gated, between the shim's turns): a
    // deferred poll that still runs finds nothing more to do, so the chain ends.
    r.log.borrow_mut().flood.as_mut().unwrap().start(FLOOD);
    r.log.borrow_mut().events.clear();
    assert_eq!(r.fam().interrupts(), 1);
    assert_eq!(r.log.borrow().events.last().map(|e| e.rx_more), Some(1));
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_stop)(r.dev) }, VNET_OK);
    let ev = poll(&r);
    assert_eq!((ev.rx_frames, ev.rx_more), (0, 0), "{ev:?}");
    r.log.borrow_mut().flood = None;
    r.unload();
}

/// `stop` (gatedStop) while KDP's `sendPacket` runs on another CPU, waiting for the device
/// with the driver held: `vnet_stop` refuses with `VNET_E_LOCKED` and does nothing (it
/// used to return as if done, and `vnet_destroy` freed the device under the debugger, its
/// interrupt entry still registered); polls and interrupts meanwhile ask to be retried;
/// once the entry returns, the shim's retry stops the device.
fn stop_while_a_debugger_entry_holds_the_driver(kexts: Kexts) {
    /// The device handle, moved to the debugger's thread.
    struct OtherCpu(*mut VnetDevice);
    // SAFETY: the driver is built for this: its debugger entry runs on one CPU while the
    // work loop runs on another, serialised by the driver's try-lock.
    unsafe impl Send for OtherCpu {}

    let net = kexts.net;
    let mut r = Rig::start(kexts, SimMode::Modern, Preference::Auto, NET, &[256, 256]);
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_enable)(r.dev, true) }, VNET_OK);
    let (s, _) = r.output(&frame(60, 1), 1, 0, 0, 0x700);
    assert_eq!(s, VNET_OK);
    assert_eq!(r.model.hold_tx().len(), 1, "a frame in flight");
    let kdp = frame(100, 0xD1);
    let (cpu, sent) = (OtherCpu(r.dev), kdp.clone());
    let debugger = std::thread::spawn(move || {
        let cpu = cpu;
        // The work loop's probe below (`vnet_stats`) holds the driver for a moment, and an
        // entry that meets it is refused: try again, as KDP retransmits.
        loop {
            // SAFETY: the handle lives until this thread is joined; a local frame. The spin
            // bound is never reached: the test completes the frame.
            let status =
                unsafe { (net.vnet_debug_send)(cpu.0, sent.as_ptr(), sent.len(), 1 << 30) };
            if status != VNET_E_LOCKED {
                break status;
            }
            std::thread::yield_now();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut st = VnetStats::default();
        // SAFETY: live handle, local out-pointer.
        if unsafe { (net.vnet_stats)(r.dev, &mut st) } == VNET_E_LOCKED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the debugger entry never took the driver"
        );
        std::thread::yield_now();
    }
    // The work loop meanwhile: refused, with nothing done.
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_stop)(r.dev) }, VNET_E_LOCKED);
    assert!(
        r.take_done().is_empty(),
        "the frame in flight is still the driver's"
    );
    let mut ev = VnetEvents::default();
    // SAFETY: live handle, local out-pointer.
    assert_eq!(unsafe { (net.vnet_poll)(r.dev, &mut ev) }, VNET_E_LOCKED);
    assert_eq!(ev.rx_more, 1, "a refused poll asks to be retried");
    let mut ev = VnetEvents::default();
    // SAFETY: as the family's interrupt action calls it.
    unsafe { (net.vnet_interrupt)(r.dev, -1, &mut ev) };
    assert_eq!(ev.rx_more, 1, "a refused interrupt asks for a poll");
    // The link goes down meanwhile: the config interrupt finds the driver held too.
    r.model.set_status(false, false);
    for irq in r.sim.take_interrupts() {
        let vector = match irq {
            SimInterrupt::Msix(v) => i32::from(v),
            SimInterrupt::Intx => -1,
        };
        // SAFETY: as the family's interrupt action calls it.
        unsafe { (net.vnet_interrupt)(r.dev, vector, &mut ev) };
        assert_eq!(ev.rx_more, 1);
    }
    // The device completes the debugger's frame: its entry returns.
    let sent = loop {
        let t = r.model.take_tx();
        if !t.is_empty() {
            break t;
        }
        assert!(Instant::now() < deadline, "the debugger's frame never came");
        std::thread::yield_now();
    };
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].data, kdp);
    assert_eq!(debugger.join().unwrap(), VNET_OK);
    // The poll the refused calls asked for acknowledges the interrupts they noted: the
    // link change is not lost.
    let mut ev = VnetEvents::default();
    // SAFETY: live handle, local out-pointer.
    assert_eq!(unsafe { (net.vnet_poll)(r.dev, &mut ev) }, VNET_OK);
    assert_eq!(
        (ev.link_changed, ev.link_up),
        (1, 0),
        "the link change announced while the debugger held the driver"
    );
    // gatedStop's retry: the device stops, the frame in flight comes back once.
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_stop)(r.dev) }, VNET_OK);
    assert_eq!(r.take_done(), vec![0x700]);
    // SAFETY: live handle.
    assert_eq!(unsafe { (net.vnet_enable)(r.dev, true) }, VNET_E_STOPPED);
    r.unload();
}
