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
//! - interrupts: the handlers only record; [`Nic::service`] feeds them to the driver in
//!   thread context and handles config changes (link status, logged in [`LinkLog`]);
//! - sleep and wake: [`Phy::suspend_resume`] suspends the driver (every transmit slot in
//!   flight comes back through the token callback) and resumes it; smoltcp keeps its
//!   state, and TCP retransmits what the reset lost.

use super::stack::{Counters, Nic};
use crate::platform::GuestDma;
use crate::scenarios::bus::{self, GuestBus};
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_core::Segment;
use virtio_core::bus::Bus;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_net::{NetError, ResumeReport, SuspendReport, TxOffload, VirtioNet};

/// Largest Ethernet frame (without FCS) for a 1500-byte MTU.
pub const FRAME_MAX: usize = 1514;
/// Transmit slots (each one frame in flight): as many as QEMU's 256-entry ring holds, so
/// the driver stops the queue (and arms its transmit interrupt) before the slots run out.
pub const TX_SLOTS: usize = 256;
const TX_STRIDE: usize = 2048;
/// Frames staged between the driver and smoltcp.
pub const RX_STAGE: usize = 64;

/// Counters of the adapter itself (the driver keeps its own in `NetStats`).
#[derive(Copy, Clone, Debug, Default)]
pub struct PhyCounters {
    pub rx_frames: u64,
    pub rx_polls: u64,
    /// Frames longer than [`FRAME_MAX`] (dropped).
    pub rx_oversize: u64,
    pub rx_errors: u64,
    pub tx_frames: u64,
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

struct TxSide {
    net: VirtioNet<GuestBus>,
    region: Option<DmaRegion>,
    free: Vec<u16>,
    unkicked: usize,
    counters: PhyCounters,
}

struct RxStage {
    buf: Vec<u8>,
    len: Vec<u16>,
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
        let region = GuestDma.alloc_coherent(TX_SLOTS * TX_STRIDE, 64)?;
        let mtu = net.mtu().map_or(1500, usize::from).min(1500);
        Ok(Phy {
            tx: TxSide {
                net,
                region: Some(region),
                free: (0..TX_SLOTS as u16).rev().collect(),
                unkicked: 0,
                counters: PhyCounters::default(),
            },
            rx: RxStage {
                buf: vec![0; RX_STAGE * FRAME_MAX],
                len: vec![0; RX_STAGE],
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

    /// Takes back completed transmit slots.
    pub fn reclaim(&mut self) {
        let TxSide {
            net,
            free,
            counters,
            ..
        } = &mut self.tx;
        if let Err(e) = net.tx_reclaim(|tok| free.push(tok as u16)) {
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

    fn tx_ready(&mut self) -> bool {
        if self.tx.free.is_empty() || self.tx.net.tx_stopped() {
            self.reclaim();
        }
        let ok = !self.tx.free.is_empty() && !self.tx.net.tx_stopped();
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
        let res = self.tx.net.rx_poll(RX_STAGE - rx.count, |frame| {
            let slot = (rx.head + rx.count) % RX_STAGE;
            let dst = &mut rx.buf[slot * FRAME_MAX..(slot + 1) * FRAME_MAX];
            match frame.copy_to(dst) {
                Some(n) => {
                    rx.len[slot] = n as u16;
                    rx.count += 1;
                    counters.rx_frames += 1;
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
            unkicked,
            ..
        } = &mut self.tx;
        let suspended = net.suspend(drain_polls, |tok| free.push(tok as u16))?;
        *unkicked = 0;
        let resumed = net.resume()?;
        // Poll the fresh receive ring at once rather than wait for an interrupt.
        self.rx_more = true;
        Ok((suspended, resumed))
    }

    /// Transmit slots not in flight (all of them when the device holds none).
    pub fn free_tx_slots(&self) -> usize {
        self.tx.free.len()
    }

    /// Resets the device and frees the transmit slots.
    pub fn shutdown(&mut self) {
        self.tx.net.shutdown(|_| {});
        if let Some(r) = self.tx.region.take() {
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

    /// Frames are staged or the last `rx_poll` asked for more; or every slot is in flight
    /// while the driver's queue runs (no transmit interrupt is armed: reclaim by polling).
    fn busy(&self) -> bool {
        self.polling
            || self.rx_more
            || self.rx.count > 0
            || (self.tx.free.is_empty() && !self.tx.net.tx_stopped())
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
}

impl TxToken for PhyTx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let t = self.tx;
        // A token is only handed out with a free slot (`tx_ready`).
        let (Some(slot), Some(region)) = (t.free.pop(), t.region.as_ref()) else {
            t.counters.tx_errors += 1;
            let mut scratch = [0u8; FRAME_MAX];
            return f(&mut scratch[..len.min(FRAME_MAX)]);
        };
        let len = len.min(FRAME_MAX);
        let off = slot as usize * TX_STRIDE;
        let p = region.ptr_at(off, len).expect("slot inside the region");
        // SAFETY: the slot is inside the region (checked by `ptr_at`) and free: the device
        // returned it through `tx_reclaim` (or never had it), so nothing else accesses it.
        let buf = unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) };
        let r = f(buf);
        let seg = Segment::new(region.daddr + off as u64, len as u32);
        match t
            .net
            .transmit_deferred(&[seg], &TxOffload::NONE, slot as usize)
        {
            Ok(_) => {
                t.unkicked += 1;
                t.counters.tx_frames += 1;
            }
            Err(e) => {
                t.free.push(slot);
                t.counters.tx_errors += 1;
                t.counters.last_error = Some(e);
            }
        }
        r
    }
}

impl Device for Phy {
    type RxToken<'a> = PhyRx<'a>;
    type TxToken<'a> = PhyTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(PhyRx<'_>, PhyTx<'_>)> {
        if self.rx.count == 0 {
            self.fill_rx();
        }
        // Frames stay staged until a reply (an ACK) could be sent.
        if self.rx.count == 0 || !self.tx_ready() {
            return None;
        }
        let i = self.rx.head;
        self.rx.head = (i + 1) % RX_STAGE;
        self.rx.count -= 1;
        let len = self.rx.len[i] as usize;
        let frame = &self.rx.buf[i * FRAME_MAX..i * FRAME_MAX + len];
        Some((PhyRx { frame }, PhyTx { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<PhyTx<'_>> {
        if !self.tx_ready() {
            return None;
        }
        Some(PhyTx { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = None;
        caps
    }
}
