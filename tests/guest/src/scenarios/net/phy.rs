//! `smoltcp::phy::Device` over [`VirtioNet`], allocation-free on the packet paths:
//!
//! - receive: [`VirtioNet::rx_poll`] lends each frame (in the driver's DMA buffers); it is
//!   copied into a preallocated staging ring, and an [`RxToken`] lends one staged frame to
//!   smoltcp. The ring is refilled (one `rx_poll` with a budget of its size) only when
//!   empty, so receive interrupts stay off while frames keep arriving (NAPI-style);
//! - transmit: a [`TxToken`] hands smoltcp one slot of a preallocated DMA region to build
//!   the frame in place; the slot travels as a single segment with
//!   [`VirtioNet::transmit_deferred`] and comes back through [`VirtioNet::tx_reclaim`]
//!   (its token is the slot index). [`Phy::flush`] kicks once per batch.

use crate::platform::GuestDma;
use crate::scenarios::bus::GuestBus;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_core::Segment;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_net::{NetError, TxOffload, VirtioNet};

/// Largest Ethernet frame (without FCS) for a 1500-byte MTU.
pub const FRAME_MAX: usize = 1514;
/// Transmit slots (each one frame in flight).
pub const TX_SLOTS: usize = 128;
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
}

impl Phy {
    pub fn new(net: VirtioNet<GuestBus>) -> Result<Self, NetError> {
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
        })
    }

    pub fn net(&mut self) -> &mut VirtioNet<GuestBus> {
        &mut self.tx.net
    }

    pub fn net_ref(&self) -> &VirtioNet<GuestBus> {
        &self.tx.net
    }

    pub fn counters(&self) -> PhyCounters {
        self.tx.counters
    }

    /// Work is waiting without an interrupt to announce it.
    pub fn busy(&self) -> bool {
        self.rx_more || self.rx.count > 0
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

    /// Notifies the device of the frames queued since the last flush.
    pub fn flush(&mut self) {
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
