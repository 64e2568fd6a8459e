//! `smoltcp::phy::Device` over [`VirtioNet`], allocation-free on the packet paths:
//!
//! - receive: [`VirtioNet::rx_poll`] lends each frame (in the driver's DMA buffers); it is
//!   copied into a preallocated staging ring, and an [`RxToken`] lends one staged frame to
//!   smoltcp. The ring is refilled (one `rx_poll` with a budget of its size) only when
//!   empty, so receive interrupts stay off while frames keep arriving (NAPI-style);
//! - transmit: a [`TxToken`] hands smoltcp one slot of a preallocated DMA region to build
//!   the frame in place; the slot travels as a single segment with
//!   [`VirtioNet::transmit_deferred`] and comes back through [`VirtioNet::tx_reclaim`]
//!   (its token is the slot index). [`Phy::flush`] kicks once per batch;
//! - offloads (negotiated only where the backend has a vnet header, i.e. a tap, never
//!   slirp; see [`Offloads`]): with CSUM smoltcp leaves TCP checksums to the device (the
//!   phy stores the pseudo-header sum and asks for NEEDS_CSUM); with HOST_TSO4 smoltcp's
//!   own segmentation offload builds TCP segments of up to 64 KiB and the phy sends them
//!   in large slots as one GSO frame each (gso_size = the MSS smoltcp asks for). With
//!   GUEST_CSUM the phy decides per received frame what smoltcp would have verified (see
//!   [`Phy::rx_checksum`]); with GUEST_TSO4 received frames may be up to 64 KiB;
//! - interrupts: the handlers only record; [`Nic::service`] feeds them to the driver in
//!   thread context and handles config changes (link status, logged in [`LinkLog`]);
//! - sleep and wake: [`Phy::suspend_resume`] suspends the driver (every transmit slot in
//!   flight comes back through the token callback) and resumes it; smoltcp keeps its
//!   state, and TCP retransmits what the reset lost.

use super::csum::{self, Ipv4Tcp, TCP_CSUM_OFFSET};
use super::stack::{Counters, Nic};
use crate::platform::GuestDma;
use crate::scenarios::bus::{self, GuestBus};
use alloc::vec;
use alloc::vec::Vec;
use core::num::{NonZeroU16, NonZeroUsize};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, PacketMeta, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_core::Segment;
use virtio_core::bus::Bus;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_net::{GsoKind, NetError, ResumeReport, RxCsum, SuspendReport, TxOffload, VirtioNet};

/// Largest Ethernet frame (without FCS) for a 1500-byte MTU.
pub const FRAME_MAX: usize = 1514;
/// Transmit slots (each one frame in flight): as many as QEMU's 256-entry ring holds, so
/// the driver stops the queue (and arms its transmit interrupt) before the slots run out.
pub const TX_SLOTS: usize = 256;
const TX_STRIDE: usize = 2048;
/// Large transmit slots for TSO frames (only allocated with HOST_TSO4): 8 × 64 KiB is
/// twice the data smoltcp keeps in flight with its 256 KiB send buffer.
const TX_BIG_SLOTS: usize = 8;
/// The largest TSO frame smoltcp is allowed to build: a 65535-byte IPv4 packet and its
/// Ethernet header (smoltcp's `SegmentationCapabilities` counts the Ethernet header).
const TSO_FRAME_MAX: usize = 65535 + 14;
const TX_BIG_STRIDE: usize = 66 * 1024;
/// Frames staged between the driver and smoltcp.
pub const RX_STAGE: usize = 64;
/// With GUEST_TSO4/6 frames up to the driver's largest (a 65535-byte IP packet with its
/// Ethernet header and a VLAN tag, or a big-packet buffer): fewer, larger staging slots.
const RX_STAGE_BIG: usize = 16;
const RX_BIG_FRAME: usize = 65562;

/// Checksum verifications done in software on transmitted frames (see
/// [`PhyCounters::tx_csum_selfcheck_ok`]).
const TX_SELFCHECKS: u64 = 64;

/// Counters of the adapter itself (the driver keeps its own in `NetStats`).
#[derive(Copy, Clone, Debug, Default)]
pub struct PhyCounters {
    pub rx_frames: u64,
    pub rx_polls: u64,
    /// Frames longer than a staging slot (dropped).
    pub rx_oversize: u64,
    pub rx_errors: u64,
    /// Received frames that were coalesced by the host (a GSO type in the header).
    pub rx_gso_frames: u64,
    /// Received frames with each coalesced one counted as its `gso_size` segments.
    pub rx_wire_segments: u64,
    /// The largest frame received.
    pub rx_max_frame: u64,
    /// TCP checksums of received frames: trusted because the device validated them
    /// (DATA_VALID, or NEEDS_CSUM on the TCP checksum), completed in place (NEEDS_CSUM
    /// elsewhere), verified here (neither flag), and found wrong here (dropped).
    pub rx_csum_valid: u64,
    pub rx_csum_partial: u64,
    pub rx_csum_completed: u64,
    pub rx_csum_verified: u64,
    pub rx_csum_bad: u64,
    pub tx_frames: u64,
    /// Frames sent with NEEDS_CSUM (the device computes the TCP checksum).
    pub tx_csum_offloaded: u64,
    /// TSO frames (GSO TCPV4) and the MSS-sized segments they become on the wire.
    pub tx_tso_frames: u64,
    pub tx_tso_segments: u64,
    pub tx_tso_bytes: u64,
    /// The first [`TX_SELFCHECKS`] offloaded frames: the device's completion of the
    /// pseudo-header sum (the spec's rule, computed here on a copy of the field) gave a
    /// checksum smoltcp's own verification accepts / rejects.
    pub tx_csum_selfcheck_ok: u64,
    pub tx_csum_selfcheck_bad: u64,
    /// Frames the driver refused (dropped; TCP retransmits).
    pub tx_errors: u64,
    pub tx_kicks_requested: u64,
    /// `transmit()` calls that found no free slot.
    pub tx_full: u64,
    pub last_error: Option<NetError>,
}

/// Link changes the driver reported through config interrupts.
#[derive(Default)]
pub struct LinkLog {
    pub config_events: u64,
    pub downs: u64,
    pub ups: u64,
    pub errors: u64,
}

/// The offloads in effect, from the negotiated features.
#[derive(Copy, Clone, Debug, Default)]
pub struct Offloads {
    /// CSUM: the device completes TCP checksums of transmitted frames.
    pub tx_csum: bool,
    /// HOST_TSO4 (with CSUM): smoltcp builds TCP segments beyond the MSS.
    pub tso4: bool,
    /// GUEST_CSUM: received frames say whether the device validated their checksum.
    pub rx_csum: bool,
    /// GUEST_TSO4/6: received frames may be up to 64 KiB.
    pub rx_big: bool,
}

struct TxSide {
    net: VirtioNet<GuestBus>,
    region: Option<DmaRegion>,
    free: Vec<u16>,
    /// The large slots (HOST_TSO4 only); their tokens are `TX_SLOTS + index`.
    big: Option<DmaRegion>,
    big_free: Vec<u16>,
    big_slots: usize,
    offloads: Offloads,
    unkicked: usize,
    counters: PhyCounters,
    /// Where a frame goes when no slot is free (never expected: tokens are handed out only
    /// with free slots); sized for the largest frame smoltcp may build.
    scratch: Vec<u8>,
}

impl TxSide {
    /// Takes back the slot of a completed (or reclaimed) transmit token.
    fn give_back(free: &mut Vec<u16>, big_free: &mut Vec<u16>, tok: usize) {
        match tok.checked_sub(TX_SLOTS) {
            None => free.push(tok as u16),
            Some(b) => big_free.push(b as u16),
        }
    }
}

struct RxStage {
    buf: Vec<u8>,
    len: Vec<u32>,
    csum: Vec<RxCsum>,
    stride: usize,
    slots: usize,
    head: usize,
    count: usize,
}

pub struct Phy {
    tx: TxSide,
    rx: RxStage,
    /// The last `rx_poll` said to poll again (budget used up, or frames arrived while its
    /// interrupt was re-enabled): do not halt.
    rx_more: bool,
    mtu: usize,
    /// No interrupts (`irq=poll`): never halt; read the ISR now and then for config changes.
    polling: bool,
    last_isr_poll: u64,
    pub link: LinkLog,
}

impl Phy {
    pub fn new(net: VirtioNet<GuestBus>, polling: bool) -> Result<Self, NetError> {
        let host = net.host_offloads();
        let guest = net.guest_offloads();
        let offloads = Offloads {
            tx_csum: host.csum,
            tso4: host.csum && host.tso4,
            rx_csum: guest.csum,
            rx_big: guest.tso4 || guest.tso6 || guest.ufo,
        };
        let region = GuestDma.alloc_coherent(TX_SLOTS * TX_STRIDE, 64)?;
        let (big, big_slots) = if offloads.tso4 {
            match GuestDma.alloc_coherent(TX_BIG_SLOTS * TX_BIG_STRIDE, 64) {
                Ok(r) => (Some(r), TX_BIG_SLOTS),
                Err(e) => {
                    // SAFETY: allocated just above, never given to the device.
                    unsafe { GuestDma.free_coherent(region) };
                    return Err(e.into());
                }
            }
        } else {
            (None, 0)
        };
        let (slots, stride) = if offloads.rx_big {
            (RX_STAGE_BIG, RX_BIG_FRAME)
        } else {
            (RX_STAGE, FRAME_MAX)
        };
        let mtu = net.mtu().map_or(1500, usize::from).min(1500);
        Ok(Phy {
            tx: TxSide {
                net,
                region: Some(region),
                free: (0..TX_SLOTS as u16).rev().collect(),
                big,
                big_free: (0..big_slots as u16).rev().collect(),
                big_slots,
                offloads,
                unkicked: 0,
                counters: PhyCounters::default(),
                scratch: vec![
                    0;
                    if offloads.tso4 {
                        TSO_FRAME_MAX
                    } else {
                        FRAME_MAX
                    }
                ],
            },
            rx: RxStage {
                buf: vec![0; slots * stride],
                len: vec![0; slots],
                csum: vec![RxCsum::None; slots],
                stride,
                slots,
                head: 0,
                count: 0,
            },
            rx_more: false,
            mtu,
            polling,
            last_isr_poll: 0,
            link: LinkLog::default(),
        })
    }

    pub fn net(&mut self) -> &mut VirtioNet<GuestBus> {
        &mut self.tx.net
    }

    pub fn net_ref(&self) -> &VirtioNet<GuestBus> {
        &self.tx.net
    }

    pub fn phy_counters(&self) -> PhyCounters {
        self.tx.counters
    }

    pub fn offloads(&self) -> Offloads {
        self.tx.offloads
    }

    /// Takes back completed transmit slots.
    pub fn reclaim(&mut self) {
        let TxSide {
            net,
            free,
            big_free,
            counters,
            ..
        } = &mut self.tx;
        if let Err(e) = net.tx_reclaim(|tok| TxSide::give_back(free, big_free, tok)) {
            counters.tx_errors += 1;
            counters.last_error = Some(e);
        }
    }

    /// Feeds recorded interrupts to the driver; handles config changes (link status).
    fn take_interrupts(&mut self) {
        let net = &mut self.tx.net;
        let mut config = false;
        bus::dispatch(
            net,
            |n| n.bus_mut(),
            |n, vector| {
                config |= n.handle_interrupt(vector).config;
            },
        );
        if self.polling {
            // No interrupts: read the ISR now and then for config changes.
            let t = crate::time::now_ns();
            if t - self.last_isr_poll > 2_000_000 {
                self.last_isr_poll = t;
                config |= net.handle_interrupt(None).config;
            }
        }
        if config {
            self.link.config_events += 1;
            match net.handle_config_change() {
                Ok(ev) if ev.link_changed => {
                    crate::println!("net: link {}", if ev.link_up { "up" } else { "down" });
                    if ev.link_up {
                        self.link.ups += 1;
                    } else {
                        self.link.downs += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    crate::println!("net: config change: {e}");
                    self.link.errors += 1;
                }
            }
        }
    }

    /// A slot of each size smoltcp may ask for is free (a token does not know the frame's
    /// size until it is consumed).
    fn slots_free(&self) -> bool {
        !self.tx.free.is_empty() && (self.tx.big_slots == 0 || !self.tx.big_free.is_empty())
    }

    fn tx_ready(&mut self) -> bool {
        if !self.slots_free() || self.tx.net.tx_stopped() {
            self.reclaim();
        }
        let ok = self.slots_free() && !self.tx.net.tx_stopped();
        if !ok {
            self.tx.counters.tx_full += 1;
        }
        ok
    }

    /// Refills the (empty) staging ring from the driver.
    fn fill_rx(&mut self) {
        let rx = &mut self.rx;
        let counters = &mut self.tx.counters;
        counters.rx_polls += 1;
        let res = self.tx.net.rx_poll(rx.slots - rx.count, |frame| {
            let slot = (rx.head + rx.count) % rx.slots;
            let Some(dst) = rx.buf.get_mut(slot * rx.stride..(slot + 1) * rx.stride) else {
                return;
            };
            match frame.copy_to(dst) {
                Some(n) => {
                    rx.len[slot] = n as u32;
                    rx.csum[slot] = frame.info().csum;
                    rx.count += 1;
                    counters.rx_frames += 1;
                    counters.rx_max_frame = counters.rx_max_frame.max(n as u64);
                    // A coalesced frame stands for the segments the sender's TSO (or the
                    // host's receive coalescing) joined: its TCP payload in `gso_size` pieces.
                    counters.rx_wire_segments += match frame.info().gso {
                        Some(g) => {
                            counters.rx_gso_frames += 1;
                            dst.get(..n).and_then(Ipv4Tcp::parse).map_or(1, |t| {
                                let payload = t.tcp_start + t.tcp_len - t.hdr_len;
                                payload.div_ceil(usize::from(g.size).max(1)).max(1) as u64
                            })
                        }
                        None => 1,
                    };
                }
                None => counters.rx_oversize += 1,
            }
        });
        match res {
            Ok(s) => {
                self.rx_more = s.more;
                if let Some(e) = s.last_error {
                    counters.rx_errors += s.dropped as u64;
                    counters.last_error = Some(e);
                }
            }
            Err(e) => {
                // Keep polling: a broken queue shows up as a stalled transfer.
                self.rx_more = true;
                counters.rx_errors += 1;
                counters.last_error = Some(e);
            }
        }
    }

    /// With GUEST_CSUM negotiated smoltcp does not verify TCP checksums (its capabilities
    /// are global, the device's word is per frame), so the phy decides for each frame
    /// before smoltcp sees it; `false`: drop it. virtio 1.2 §5.1.6.4: with DATA_VALID the
    /// device validated the checksum; with NEEDS_CSUM it validated it too and left the
    /// pseudo-header sum in the field, and completing the sum from `csum_start` to the end
    /// at `csum_offset` gives a fully checksummed packet; with neither, "the driver MUST
    /// NOT rely on the packet checksum being correct". So:
    /// - DATA_VALID, or NEEDS_CSUM at the TCP checksum field of an IPv4 TCP frame: trusted
    ///   as it is (smoltcp ignores the TCP field; it still checks the IPv4 header's);
    /// - NEEDS_CSUM anywhere else: completed in place, so smoltcp's own checks (UDP,
    ///   ICMP) see a whole checksum;
    /// - neither on an IPv4 TCP frame: verified here, dropped when wrong. Other frames are
    ///   left to smoltcp, which still verifies everything but TCP.
    fn rx_checksum(frame: &mut [u8], csum: RxCsum, c: &mut PhyCounters) -> bool {
        match csum {
            RxCsum::Valid => {
                c.rx_csum_valid += 1;
                true
            }
            RxCsum::Partial { start, offset } => {
                let (start, offset) = (usize::from(start), usize::from(offset));
                let at_tcp = Ipv4Tcp::parse(frame)
                    .is_some_and(|t| t.tcp_start == start && offset == TCP_CSUM_OFFSET);
                if at_tcp {
                    c.rx_csum_partial += 1;
                    true
                } else if csum::complete(frame, start, offset) {
                    c.rx_csum_completed += 1;
                    true
                } else {
                    // Bounds were validated by the driver; a frame this short is dropped.
                    c.rx_csum_bad += 1;
                    false
                }
            }
            RxCsum::None => match Ipv4Tcp::parse(frame) {
                Some(t) if t.verify(frame) => {
                    c.rx_csum_verified += 1;
                    true
                }
                Some(_) => {
                    c.rx_csum_bad += 1;
                    false
                }
                None => true,
            },
        }
    }

    /// Suspends the driver, waiting at most `drain_polls` polls for transmits in flight,
    /// and resumes it. The slots of every frame in flight come back (completed or
    /// reclaimed); frames queued but not yet notified are among them.
    pub fn suspend_resume(
        &mut self,
        drain_polls: u32,
    ) -> Result<(SuspendReport, ResumeReport), NetError> {
        let TxSide {
            net,
            free,
            big_free,
            unkicked,
            ..
        } = &mut self.tx;
        let suspended = net.suspend(drain_polls, |tok| TxSide::give_back(free, big_free, tok))?;
        *unkicked = 0;
        let resumed = net.resume()?;
        // Poll the fresh receive ring at once rather than wait for an interrupt.
        self.rx_more = true;
        Ok((suspended, resumed))
    }

    /// Transmit slots not in flight (all of them when the device holds none).
    pub fn free_tx_slots(&self) -> usize {
        self.tx.free.len() + self.tx.big_free.len()
    }

    /// Transmit slots of both sizes.
    pub fn tx_slots(&self) -> usize {
        TX_SLOTS + self.tx.big_slots
    }

    /// Resets the device and frees the transmit slots.
    pub fn shutdown(&mut self) {
        self.tx.net.shutdown(|_| {});
        for r in [self.tx.region.take(), self.tx.big.take()]
            .into_iter()
            .flatten()
        {
            // SAFETY: the device was reset just above, so it no longer reads the slots;
            // the region came from `alloc_coherent` and is taken out, so freed once.
            unsafe { GuestDma.free_coherent(r) };
        }
    }
}

impl Nic for Phy {
    fn service(&mut self) {
        self.take_interrupts();
        self.reclaim();
    }

    /// Notifies the device of the frames queued since the last flush.
    fn flush(&mut self) {
        let t = &mut self.tx;
        if t.unkicked > 0 {
            t.unkicked = 0;
            t.counters.tx_kicks_requested += 1;
            if let Err(e) = t.net.tx_kick() {
                t.counters.tx_errors += 1;
                t.counters.last_error = Some(e);
            }
        }
    }

    /// Frames are staged or the last `rx_poll` asked for more; or the slots of one size
    /// are all in flight while the driver's queue runs (no transmit interrupt is armed:
    /// reclaim by polling).
    fn busy(&self) -> bool {
        self.polling
            || self.rx_more
            || self.rx.count > 0
            || (!self.slots_free() && !self.tx.net.tx_stopped())
    }

    fn halt(&mut self, ms: u64) {
        if !self.polling {
            self.tx
                .net
                .bus_mut()
                .interrupt_platform()
                .wait(u64::MAX, ms);
        }
    }

    fn counters(&mut self) -> Counters {
        let st = self.tx.net.stats();
        let c = self.tx.counters;
        let bus = self.tx.net.bus_mut();
        let q = |bus: &bus::GuestBus, i| bus.queue_stats(i).unwrap_or_default();
        let (rx, tx) = (q(bus, 0), q(bus, 1));
        Counters {
            rx_frames: st.rx_frames,
            tx_frames: st.tx_frames,
            driver_counts: true,
            rx_kicks: rx.kicks,
            tx_kicks: tx.kicks,
            rx_irqs: rx.interrupts,
            tx_irqs: tx.interrupts,
            irqs: bus.interrupt_platform().total(),
            tx_tso_frames: c.tx_tso_frames,
            tx_tso_segments: c.tx_tso_segments,
            tx_csum_offloaded: c.tx_csum_offloaded,
            rx_gso_frames: c.rx_gso_frames,
            rx_wire_segments: c.rx_wire_segments,
        }
    }
}

impl Drop for Phy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub struct PhyRx<'a> {
    frame: &'a [u8],
}

impl RxToken for PhyRx<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

pub struct PhyTx<'a> {
    tx: &'a mut TxSide,
    /// smoltcp's segmentation request for this frame (its `PacketMeta`): the MSS.
    mss: Option<NonZeroU16>,
}

/// The transmit offload for a frame smoltcp built without a TCP checksum (CSUM
/// negotiated): the pseudo-header sum in the field and NEEDS_CSUM at the TCP checksum
/// (virtio 1.2 §5.1.6.2); with an MSS (smoltcp's segmentation offload) and a payload
/// beyond it, GSO TCPV4 with `gso_size` = the MSS and `hdr_len` = Ethernet + IP + TCP
/// headers, which the device replicates on every segment (§5.1.6.2: "the driver MUST also
/// set NEEDS_CSUM and MUST set gso_size"). Other frames carry smoltcp's own checksums.
fn tcp_offload(frame: &mut [u8], mss: Option<NonZeroU16>, c: &mut PhyCounters) -> TxOffload {
    let Some(t) = Ipv4Tcp::parse(frame) else {
        return TxOffload::NONE;
    };
    if !t.set_pseudo_header(frame) {
        return TxOffload::NONE;
    }
    let (start, offset) = (t.tcp_start as u16, TCP_CSUM_OFFSET as u16);
    c.tx_csum_offloaded += 1;
    if c.tx_csum_selfcheck_ok + c.tx_csum_selfcheck_bad < TX_SELFCHECKS {
        selfcheck(frame, &t, c);
    }
    let payload = frame.len() - t.hdr_len;
    match mss {
        Some(mss) if payload > usize::from(mss.get()) => {
            let m = usize::from(mss.get());
            c.tx_tso_frames += 1;
            c.tx_tso_segments += payload.div_ceil(m) as u64;
            c.tx_tso_bytes += payload as u64;
            TxOffload::gso(GsoKind::TcpV4, mss.get(), t.hdr_len as u16, start, offset)
        }
        _ => TxOffload::csum(start, offset),
    }
}

/// Does what the device will do with NEEDS_CSUM (complete the sum from `csum_start`) and
/// asks smoltcp's independent checksum code whether the result is a valid TCP checksum;
/// then puts the pseudo-header sum back. Proves the pseudo-header sum the device gets.
fn selfcheck(frame: &mut [u8], t: &Ipv4Tcp, c: &mut PhyCounters) {
    use smoltcp::wire::{IpAddress, Ipv4Address, TcpPacket};
    let at = t.tcp_start + TCP_CSUM_OFFSET;
    let Some(saved) = frame.get(at..at + 2).map(|b| [b[0], b[1]]) else {
        return;
    };
    let ok = csum::complete(frame, t.tcp_start, TCP_CSUM_OFFSET)
        && frame
            .get(t.tcp_start..t.tcp_start + t.tcp_len)
            .is_some_and(|seg| {
                let src = IpAddress::Ipv4(Ipv4Address::from(t.src));
                let dst = IpAddress::Ipv4(Ipv4Address::from(t.dst));
                TcpPacket::new_unchecked(seg).verify_checksum(&src, &dst)
            });
    if let Some(f) = frame.get_mut(at..at + 2) {
        f.copy_from_slice(&saved);
    }
    if ok {
        c.tx_csum_selfcheck_ok += 1;
    } else {
        c.tx_csum_selfcheck_bad += 1;
    }
}

impl TxToken for PhyTx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let t = self.tx;
        // Anything beyond a standard frame is a TSO frame (smoltcp's segment of more than
        // one MSS, often only a little more: 1,858 bytes happen) and takes a large slot; a
        // small slot's frame is cut at FRAME_MAX below, which smoltcp's `emit` would overrun.
        let big = len > FRAME_MAX;
        // A token is only handed out with a free slot of each size (`tx_ready`).
        let slot = if big {
            t.big_free
                .pop()
                .map(|b| (TX_SLOTS + b as usize, b as usize * TX_BIG_STRIDE))
        } else {
            t.free.pop().map(|s| (s as usize, s as usize * TX_STRIDE))
        };
        let region = if big {
            t.big.as_ref()
        } else {
            t.region.as_ref()
        };
        let (Some((token, off)), Some(region)) = (slot, region) else {
            t.counters.tx_errors += 1;
            if let Some((tok, _)) = slot {
                TxSide::give_back(&mut t.free, &mut t.big_free, tok);
            }
            let n = len.min(t.scratch.len());
            return f(&mut t.scratch[..n]);
        };
        let len = len.min(if big { TSO_FRAME_MAX } else { FRAME_MAX });
        let p = region.ptr_at(off, len).expect("slot inside the region");
        // SAFETY: the slot is inside the region (checked by `ptr_at`) and free: the device
        // returned it through `tx_reclaim` (or never had it), so nothing else accesses it.
        let buf = unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) };
        let r = f(buf);
        let offload = if t.offloads.tx_csum {
            tcp_offload(buf, self.mss.filter(|_| t.offloads.tso4), &mut t.counters)
        } else {
            TxOffload::NONE
        };
        let seg = Segment::new(region.daddr + off as u64, len as u32);
        match t.net.transmit_deferred(&[seg], &offload, token) {
            Ok(_) => {
                t.unkicked += 1;
                t.counters.tx_frames += 1;
            }
            Err(e) => {
                TxSide::give_back(&mut t.free, &mut t.big_free, token);
                t.counters.tx_errors += 1;
                t.counters.last_error = Some(e);
            }
        }
        r
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.mss = meta.segmentation_offload_size;
    }
}

impl Device for Phy {
    type RxToken<'a> = PhyRx<'a>;
    type TxToken<'a> = PhyTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(PhyRx<'_>, PhyTx<'_>)> {
        // A dropped frame ends the call when nothing else is staged: a device sending only
        // bad frames cannot keep it going (`rx_more` brings the loop back).
        let mut dropped = false;
        loop {
            if self.rx.count == 0 {
                if dropped {
                    return None;
                }
                self.fill_rx();
            }
            // Frames stay staged until a reply (an ACK) could be sent.
            if self.rx.count == 0 || !self.tx_ready() {
                return None;
            }
            let i = self.rx.head;
            self.rx.head = (i + 1) % self.rx.slots;
            self.rx.count -= 1;
            let len = self.rx.len[i] as usize;
            let at = i * self.rx.stride;
            let ok = match self.rx.buf.get_mut(at..at + len) {
                None => false,
                Some(_) if !self.tx.offloads.rx_csum => true,
                Some(frame) => Self::rx_checksum(frame, self.rx.csum[i], &mut self.tx.counters),
            };
            if !ok {
                dropped = true;
                continue;
            }
            let frame = self.rx.buf.get(at..at + len).unwrap_or(&[]);
            return Some((
                PhyRx { frame },
                PhyTx {
                    tx: &mut self.tx,
                    mss: None,
                },
            ));
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<PhyTx<'_>> {
        if !self.tx_ready() {
            return None;
        }
        Some(PhyTx {
            tx: &mut self.tx,
            mss: None,
        })
    }

    /// MTU 1500 (or the device's smaller one). Checksums: smoltcp computes and verifies
    /// all but TCP's; TCP's are computed only without CSUM and verified only without
    /// GUEST_CSUM (then the phy does it per frame, see [`Phy::rx_checksum`]).
    /// Segmentation: with HOST_TSO4, TCP segments up to a 65535-byte IPv4 packet.
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = None;
        let o = self.tx.offloads;
        caps.checksum.tcp = match (o.tx_csum, o.rx_csum) {
            (false, false) => Checksum::Both,
            (true, false) => Checksum::Rx,
            (false, true) => Checksum::Tx,
            (true, true) => Checksum::None,
        };
        if o.tso4 {
            caps.segmentation.tcpv4 = NonZeroUsize::new(TSO_FRAME_MAX);
        }
        caps
    }
}
