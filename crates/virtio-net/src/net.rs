//! The driver: [`VirtioNet`] over any [`Bus`].
//!
//! # Queues
//! Queue pairs are the unit (§5.1.2): pair `p` has receive queue `2p` and transmit queue
//! `2p + 1`; the control queue comes after the last pair. One pair is driven (MQ is refused,
//! see [`crate::features`]), so: rx 0, tx 1, control 2.
//!
//! # Memory (allocated in [`VirtioNet::new`] only)
//! - transmit: one header slot (16 bytes) per ring entry (at most `max_tx_frames`: one per
//!   frame in flight), indexed by the chain's token, so a frame is `[header slot] + the
//!   caller's already-mapped segments`; plus one reserved slot with its own frame buffer
//!   for the kernel debugger;
//! - receive: `rx_buffers` coherent buffers (at most what the ring holds and what fits
//!   [`RX_MEMORY_MAX`], so the device's ring size does not decide), each posted whole (one descriptor; two —
//!   header, data — on a legacy device without ANY_LAYOUT or MRG_RXBUF). Sizes: small mode
//!   `hdr + max(1518, mtu + 18)`, big mode (GUEST_TSO/UFO without MRG_RXBUF) `hdr + 65562`,
//!   mergeable mode 4096-byte buffers posted with a length that follows a running average
//!   of received frame lengths (Linux's EWMA, weight 1/64, clamped to [1518 + hdr, 4096]);
//! - control: one buffer for the header, the command data and the ack.
//!
//! # Receive pipeline
//! Completed rx buffers move from the used ring into a FIFO (`ready`) in device order. A
//! frame is parsed at the front of the FIFO: the header is validated, then (mergeable) its
//! `num_buffers` entries are gathered; a frame whose buffers have not all arrived yet waits.
//! The frame is lent to the caller's callback ([`RxFrame`] borrows the DMA buffers), then
//! its buffers are reposted ([`VirtioNet::rx_poll`]), or kept out of the ring until the
//! caller gives them back ([`VirtioNet::rx_poll_lend`], [`VirtioNet::rx_return_lent`]),
//! for a platform that hands frames on after releasing a lock. A frame dropped for a bad
//! value goes with all of its buffers once its `num_buffers` is validated and gathered
//! (§5.1.6.4: the others hold payload, never a header), else with its first buffer only.
//!
//! # Transmit completions (Linux's non-NAPI transmit policy)
//! Transmit interrupts stay off while the ring has room: completed frames are reclaimed by
//! the caller's next [`VirtioNet::tx_reclaim`] (call it before each transmit batch), so
//! traffic that mostly receives (one ACK now and then) costs no transmit interrupt at all.
//! Only when the queue stops for backpressure ([`TxStatus::stop`], [`NetError::Busy`]) is
//! the transmit interrupt armed, delayed (EVENT_IDX: after ~3/4 of the frames in flight),
//! so the caller learns when to restart; it goes off again on restart.
//!
//! # Kernel debugger (KDP) path
//! [`VirtioNet::debug_send`] / [`VirtioNet::debug_receive`] poll with bounded waits and
//! never disturb the normal path:
//! - transmit uses a dedicated slot and buffer; the normal path always leaves
//!   [`DEBUG_TX_RESERVE`] descriptors free for it. Completions of normal frames that the
//!   debugger pops are queued in order and reported by the next [`VirtioNet::tx_reclaim`].
//! - receive *borrows* frames: the debugger copies the next frame the normal path has not
//!   seen and leaves its buffers in the `ready` FIFO, so the normal path still receives every
//!   frame, in order, when it resumes. Should the debugger hold so many buffers that fewer
//!   than half are posted, it hands the oldest borrowed frames back to the device
//!   (dropping them, counted in [`NetStats::rx_debugger_dropped`]) so a long debugging
//!   session never starves the ring.
//!
//! Both paths take `&mut self`: the platform must serialise them (in a kext, the debugger
//! entry try-locks the driver and drops the packet when the lock is held).
//!
//! # Sleep and wake ([`VirtioNet::suspend`], [`VirtioNet::resume`])
//! Nothing survives a device reset (§2.1.2: rings, negotiated features, filters, the
//! address set by the driver), so sleep is Linux's `virtnet_freeze` / `virtnet_restore`:
//! - `suspend` stops the transmit side ([`VirtioNet::tx_stopped`]; [`VirtioNet::transmit`]
//!   answers [`NetError::Busy`], the same backpressure as a full ring), kicks what was
//!   queued and waits a bounded number of polls for the device to complete the frames in
//!   flight, then resets the device through the bus. Every transmit token comes back
//!   exactly once, to the callback: completed during the wait, or reclaimed at the reset
//!   (those frames may not have been sent: the protocols above retransmit). Receive
//!   buffers the device held return to the pool; frames received but not yet delivered
//!   are dropped (call [`VirtioNet::rx_poll`] first to deliver them). The driver keeps
//!   all of its memory.
//! - `resume` negotiates exactly the previous features again
//!   ([`virtio_core::Bus::renegotiate_features`]: a device offering fewer fails the
//!   resume, left FAILED, with everything still owned by the driver, which stays
//!   suspended and may retry), rebuilds every queue, reposts the receive buffers, sets
//!   DRIVER_OK, re-reads link status, MTU and speed, and replays through the control
//!   queue what the caller had set: the MAC address, promiscuous and all-multicast mode,
//!   the MAC filter tables, the VLAN filter and the guest offloads. The next
//!   [`VirtioNet::tx_reclaim`] reports `restart` for the caller's output queue.

use alloc::vec;
use alloc::vec::Vec;

use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::{Bus, DeviceType, Error, Features, QueueSpec, Segment};
use zerocopy::{FromBytes, IntoBytes};

use crate::features::{self as f, close_dependencies, has};
use crate::wire::{
    self, CtrlHdr, GuestOffloads, HostOffloads, MAX_GSO_FRAME, MIN_MTU, NetHdr, OffloadError,
    RxInfo, TxOffload, config, ctrl,
};
use virtio_core::fifo::Fifo;

/// Queue numbering (§5.1.2).
pub mod queues {
    /// Receive queue of pair `p`.
    pub const fn rx(pair: u16) -> u16 {
        2 * pair
    }
    /// Transmit queue of pair `p`.
    pub const fn tx(pair: u16) -> u16 {
        2 * pair + 1
    }
    /// The control queue, after `pairs` queue pairs.
    pub const fn ctrl(pairs: u16) -> u16 {
        2 * pairs
    }
}

const RX: u16 = queues::rx(0);
const TX: u16 = queues::tx(0);
const CTRL: u16 = queues::ctrl(1);

/// Token of the debugger's reserved transmit chain.
const DEBUG_TOKEN: usize = usize::MAX;
/// Descriptors the normal transmit path leaves free for one debugger frame (header and data
/// in separate descriptors on a legacy device without ANY_LAYOUT).
pub const DEBUG_TX_RESERVE: u16 = 2;
/// Largest frame the debugger path sends or receives (Ethernet + VLAN + 1500).
pub const DEBUG_FRAME_MAX: usize = 1518;
/// Most addresses in each MAC filter table sent by [`VirtioNet::set_mac_filter`]; beyond it,
/// the caller falls back to promiscuous / all-multicast, as Linux does.
pub const MAC_TABLE_MAX: usize = 64;
/// Transmit header slot stride.
const TX_HDR_STRIDE: usize = 16;
/// Good packet length: Ethernet header + VLAN tag + 1500 (Linux `GOOD_PACKET_LEN`).
const GOOD_PACKET_LEN: usize = 1518;
/// §5.1.6.3.1: with GUEST_TSO/UFO and no MRG_RXBUF, buffers of at least 65562 bytes.
const BIG_PACKET_LEN: usize = 65562;
/// Longest received frame (after the virtio header) accepted, in every mode: what a
/// big-packet buffer holds, since a device may fill one (§5.1.6.3.1), and no less than
/// the largest GSO frame.
const MAX_RX_FRAME: usize = if BIG_PACKET_LEN > MAX_GSO_FRAME {
    BIG_PACKET_LEN
} else {
    MAX_GSO_FRAME
};
/// Most memory the receive buffers take, whatever ring size the device offers (up to
/// 32768 entries, §2.7): beyond it fewer buffers are posted than the ring holds, so a
/// large or hostile device cannot make initialisation exhaust the platform's memory.
/// 8 MiB is 2048 mergeable buffers, or 127 big-packet ones.
pub const RX_MEMORY_MAX: usize = 8 << 20;
/// Capacity of one mergeable receive buffer (a page, like Linux).
const MERGE_BUF_CAP: usize = 4096;
/// Default number of big-mode buffers (each about 64 KiB).
const BIG_DEFAULT_BUFFERS: u16 = 32;
const CTRL_HDR_OFF: usize = 0;
const CTRL_ACK_OFF: usize = 8;
const CTRL_DATA_OFF: usize = 16;
const CTRL_REGION: usize = 1024;
/// Ack value written before a command: neither OK nor ERR, so an ack the device did not
/// write is detected.
const ACK_SENTINEL: u8 = 0xA5;
const ETH_HLEN: usize = 14;

/// Driver parameters chosen by the platform.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Feature bits the platform allows (its stack may lack e.g. TSO); intersected with
    /// [`crate::features::SUPPORTED`].
    pub features: u64,
    /// Ring sizes (0: the device maximum).
    pub rx_queue_size: u16,
    pub tx_queue_size: u16,
    /// Receive buffers to allocate (0: fill the ring; 32 in big-packet mode), at most
    /// what the ring holds and what fits [`RX_MEMORY_MAX`].
    pub rx_buffers: u16,
    /// Most DMA segments one transmitted frame may have.
    pub max_tx_segments: u16,
    /// Most frames in flight at once (0: one per transmit ring entry). A platform that
    /// keeps a mapping per frame in flight (the kext's `IODMACommand`s) bounds its pool
    /// with it, whatever ring size the device offers; [`VirtioNet::tx_slots`] says what
    /// was granted. Beyond it, transmit answers [`NetError::Busy`] like a full ring.
    pub max_tx_frames: u16,
    /// Bound on polls of the control queue for one command's completion.
    pub ctrl_spins: u32,
    /// Seed for the random locally administered MAC used when the device has none usable
    /// (§5.1.5). The platform passes entropy: the default is a constant (for tests), which
    /// would give every such guest the same address.
    pub mac_seed: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            features: f::SUPPORTED,
            rx_queue_size: 0,
            tx_queue_size: 0,
            rx_buffers: 0,
            max_tx_segments: 18,
            max_tx_frames: 0,
            ctrl_spins: 10_000_000,
            mac_seed: 0x5EED_0FD4_2A1E_u64,
        }
    }
}

/// How receive buffers are sized (§5.1.6.3.1).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RxMode {
    /// No MRG_RXBUF, no GUEST_TSO/UFO: one buffer per frame of `hdr + max(1518, mtu + 18)`.
    Small,
    /// No MRG_RXBUF with GUEST_TSO/UFO: one buffer per frame of `hdr + 65562`.
    Big,
    /// MRG_RXBUF: frames spread over `num_buffers` buffers.
    Mergeable,
}

impl core::fmt::Display for RxMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RxMode::Small => "small",
            RxMode::Big => "big-packet",
            RxMode::Mergeable => "mergeable",
        })
    }
}

/// A MAC address as people write it (`52:54:00:12:34:56`): log lines and reports.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl core::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The MTU the device gave, or that it gave none, for log lines.
struct MtuText(Option<u16>);

impl core::fmt::Display for MtuText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(m) => write!(f, "{m}"),
            None => f.write_str("not given"),
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Duplex {
    Half,
    Full,
}

/// Errors of the net driver.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NetError {
    /// From the bus / virtqueue (a broken queue, DMA failure, ...).
    Core(Error),
    /// The transmit ring cannot take this frame now: stop the output queue until
    /// [`VirtioNet::tx_reclaim`] reports `restart`.
    Busy,
    /// The caller's frame is unusable (no or too many segments, runt, too long).
    BadFrame(&'static str),
    /// The offload request cannot be expressed.
    Offload(OffloadError),
    /// The operation needs a feature that was not negotiated.
    NotNegotiated(&'static str),
    /// The device broke the protocol (a bad value it wrote); the frame or command is dropped.
    Device(&'static str),
    /// The device answered a control command with VIRTIO_NET_ERR.
    CtrlRejected { class: u8, command: u8 },
    /// A previous control command timed out and is still owned by the device.
    CtrlBusy,
    /// A bounded wait ran out.
    Timeout,
}

impl From<Error> for NetError {
    fn from(e: Error) -> Self {
        match e {
            Error::QueueFull => NetError::Busy,
            e => NetError::Core(e),
        }
    }
}

impl core::fmt::Display for NetError {
    fn fmt(&self, fm: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NetError::Core(e) => write!(fm, "{e}"),
            NetError::Busy => write!(fm, "transmit ring full"),
            NetError::BadFrame(w) => write!(fm, "bad frame: {w}"),
            NetError::Offload(o) => write!(fm, "offload: {o}"),
            NetError::NotNegotiated(w) => write!(fm, "{w} not negotiated"),
            NetError::Device(w) => write!(fm, "device protocol violation: {w}"),
            NetError::CtrlRejected { class, command } => {
                write!(fm, "device rejected control command {class}/{command}")
            }
            NetError::CtrlBusy => write!(fm, "control queue busy"),
            NetError::Timeout => write!(fm, "timed out"),
        }
    }
}

/// What [`VirtioNet::suspend`] did with the work in flight.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SuspendReport {
    /// Frames the device completed before the reset (their tokens went to the callback).
    pub tx_completed: usize,
    /// Frames still in flight at the reset, taken back (their tokens went to the callback
    /// too; the device may not have sent them).
    pub tx_reclaimed: usize,
    /// Receive buffers the device held, back in the driver's pool.
    pub rx_reclaimed: usize,
    /// Receive buffers holding data not yet delivered to the caller: dropped.
    pub rx_dropped: usize,
    /// Polls spent waiting for transmit completions (at most the caller's bound).
    pub drain_polls: u32,
    /// A device fault seen while waiting; the reset happened all the same.
    pub drain_error: Option<NetError>,
}

impl core::fmt::Display for SuspendReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} frames sent, {} taken back (maybe unsent), {} receive buffers reclaimed, {} received \
             frames dropped, after {} polls",
            self.tx_completed,
            self.tx_reclaimed,
            self.rx_reclaimed,
            self.rx_dropped,
            self.drain_polls
        )?;
        if let Some(e) = &self.drain_error {
            write!(f, "; waiting stopped by a device fault: {e}")?;
        }
        Ok(())
    }
}

/// What [`VirtioNet::resume`] found and restored.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// Negotiated again: the previous set (plus, possibly, ring bits the bus implements).
    pub features: Features,
    pub link_up: bool,
    pub mtu: Option<u16>,
    /// Receive buffers posted to the rebuilt receive queue.
    pub rx_posted: usize,
    /// Control commands (or legacy config writes) replaying the caller's settings.
    pub restored: u32,
    /// Of those, the ones the device refused or did not answer. The device runs anyway;
    /// the first failure is in `restore_error`.
    pub restore_failed: u32,
    pub restore_error: Option<NetError>,
}

impl core::fmt::Display for ResumeReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "features {:#x}, link {}, mtu {}, {} receive buffers posted, {} settings restored",
            self.features.bits(),
            if self.link_up { "up" } else { "down" },
            MtuText(self.mtu),
            self.rx_posted,
            self.restored
        )?;
        if self.restore_failed > 0 {
            write!(f, " ({} failed", self.restore_failed)?;
            if let Some(e) = &self.restore_error {
                write!(f, ", the first: {e}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Counters.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_busy: u64,
    pub tx_completed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped because of device-written values (bad num_buffers, runt, header).
    pub rx_errors: u64,
    pub rx_bad_num_buffers: u64,
    pub rx_bad_header: u64,
    pub rx_length_errors: u64,
    /// Borrowed frames the debugger had to hand back to the device unseen by the stack.
    pub rx_debugger_dropped: u64,
    /// Frames the debugger saw but could not copy (longer than its buffer).
    pub rx_debugger_oversize: u64,
    pub debug_tx_frames: u64,
    pub debug_rx_frames: u64,
    pub ctrl_commands: u64,
    pub ctrl_errors: u64,
    pub config_changes: u64,
    /// Completed suspends, and resumes that brought the device back.
    pub suspends: u64,
    pub resumes: u64,
    /// Config fields that failed validation (MTU < 68, invalid MAC, bad speed/duplex).
    pub config_invalid: u64,
}

/// What [`VirtioNet::transmit`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TxStatus {
    /// The ring can no longer take a frame of `max_tx_segments`: stop the output queue and
    /// call [`VirtioNet::tx_reclaim`] (now, and on transmit interrupts) until it says
    /// `restart`.
    pub stop: bool,
}

/// What [`VirtioNet::tx_reclaim`] did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxReclaim {
    /// Frames completed (each token was handed to the callback).
    pub frames: usize,
    /// The queue had been stopped and may now be restarted.
    pub restart: bool,
}

/// What [`VirtioNet::rx_poll`] did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RxSummary {
    pub frames: usize,
    pub dropped: usize,
    /// The last reason a frame was dropped.
    pub last_error: Option<NetError>,
    /// Budget exhausted or frames arrived while interrupts were re-enabled: poll again.
    pub more: bool,
}

/// What an interrupt meant for this device.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NetInterrupt {
    pub rx: bool,
    pub tx: bool,
    pub config: bool,
    pub needs_reset: bool,
}

/// What a config change meant ([`VirtioNet::handle_config_change`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigEvent {
    pub link_up: bool,
    pub link_changed: bool,
    /// GUEST_ANNOUNCE: the device asks for gratuitous ARP/ND; send them, then call
    /// [`VirtioNet::ack_announce`].
    pub announce: bool,
    pub needs_reset: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum TxSlot {
    Free,
    InFlight(usize),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum BufState {
    Free,
    Posted,
    Ready,
    /// Delivered by [`VirtioNet::rx_poll_lend`] and not yet given back
    /// ([`VirtioNet::rx_return_lent`]): the caller may still read it.
    Lent,
}

/// Exponentially weighted moving average of frame lengths, weight 1/64, 4 fraction bits
/// (Linux `DECLARE_EWMA(pkt_len, 0, 64)`).
#[derive(Copy, Clone, Debug, Default)]
struct Ewma {
    avg_x16: u64,
    init: bool,
}

impl Ewma {
    fn add(&mut self, v: usize) {
        let v = (v as u64) << 4;
        if self.init {
            self.avg_x16 = self.avg_x16 - self.avg_x16 / 64 + v / 64;
        } else {
            self.avg_x16 = v;
            self.init = true;
        }
    }
    fn read(&self) -> usize {
        (self.avg_x16 >> 4) as usize
    }
}

struct TxState {
    hdrs: Option<DmaRegion>,
    slots: Vec<TxSlot>,
    free_slots: Vec<u16>,
    /// Slots completed while the debugger polled, reported by the next `tx_reclaim`.
    done: Fifo<u16>,
    scratch: Vec<Segment>,
    stopped: bool,
    max_segs: u16,
    dbg: Option<DmaRegion>,
    dbg_in_flight: bool,
}

struct RxState {
    bufs: Vec<DmaRegion>,
    state: Vec<BufState>,
    /// The virtio header of each buffer, copied once (`read_into`) when the device returns
    /// it: every later parse of the frame (the debugger's, then the stack's) sees the
    /// same validated values, whatever the device writes afterwards.
    headers: Vec<[u8; wire::HDR_LEN_V1]>,
    free: Vec<u16>,
    /// Completed buffers (index, written length) in device order.
    ready: Fifo<(u16, u32)>,
    /// Buffers of frames delivered by `rx_poll_lend`, not yet returned (capacity: every
    /// buffer, reserved in `new`).
    lent: Vec<u16>,
    posted: usize,
    /// Entries at the front of `ready` the debugger has already seen.
    dbg_cursor: usize,
    cap: usize,
    split_header: bool,
    ewma: Ewma,
}

struct CtrlState {
    region: DmaRegion,
    in_flight: bool,
}

/// What the caller set on the device (through the control queue, or the legacy config
/// `mac` field), kept so [`VirtioNet::resume`] can replay it on a device whose reset
/// forgot it. Only settings the device accepted are kept.
struct FilterState {
    /// The driver gave the device its `mac` (a random address at init, or
    /// `set_mac_address`).
    mac_set: bool,
    promisc: Option<bool>,
    allmulti: Option<bool>,
    /// The last MAC_TABLE_SET, if any (capacity [`MAC_TABLE_MAX`] each, reserved in `new`).
    mac_table_set: bool,
    unicast: Vec<[u8; 6]>,
    multicast: Vec<[u8; 6]>,
    /// VLAN ids added and not deleted, one bit each.
    vlans: [u64; 64],
    guest_offloads: Option<GuestOffloads>,
}

impl FilterState {
    fn new() -> Self {
        FilterState {
            mac_set: false,
            promisc: None,
            allmulti: None,
            mac_table_set: false,
            unicast: Vec::with_capacity(MAC_TABLE_MAX),
            multicast: Vec::with_capacity(MAC_TABLE_MAX),
            vlans: [0; 64],
            guest_offloads: None,
        }
    }

    fn set_vlan(&mut self, vid: u16, on: bool) {
        if let Some(word) = self.vlans.get_mut(usize::from(vid / 64)) {
            let bit = 1u64 << (vid % 64);
            if on {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    fn has_vlan(&self, vid: u16) -> bool {
        self.vlans
            .get(usize::from(vid / 64))
            .is_some_and(|w| w & (1u64 << (vid % 64)) != 0)
    }
}

/// Buffers [`VirtioNet::reset_and_reclaim`] took back.
#[derive(Copy, Clone, Debug, Default)]
struct Reclaimed {
    /// The reset was acknowledged or the device's DMA stopped ([`Bus::reset`] was Ok): it
    /// no longer touches the driver's buffers. When false they stay where they are.
    device_quiet: bool,
    tx_completed: usize,
    tx_reclaimed: usize,
    rx_reclaimed: usize,
    rx_dropped: usize,
}

enum Parse {
    Frame {
        n: usize,
        info: RxInfo,
    },
    /// A frame to drop: `bufs` is how many buffers it takes with it. A frame's own
    /// `num_buffers` (§5.1.6.4) once it is validated and all of them have arrived (the
    /// others carry payload, not a header: parsing them as frames would hand the stack
    /// garbage, so Linux's `receive_mergeable` drains them too), otherwise 1.
    Bad {
        err: NetError,
        kind: &'static str,
        bufs: usize,
    },
    Incomplete,
}

impl Parse {
    /// A frame dropped with its first buffer only (its buffer count is not known).
    fn bad(err: &'static str, kind: &'static str) -> Parse {
        Parse::Bad {
            err: NetError::Device(err),
            kind,
            bufs: 1,
        }
    }
}

/// The virtio network driver over bus `B`.
pub struct VirtioNet<B: Bus> {
    bus: B,
    cfg: NetConfig,
    features: Features,
    mac: [u8; 6],
    mtu: Option<u16>,
    link_up: bool,
    speed: Option<u32>,
    duplex: Option<Duplex>,
    hdr_len: usize,
    any_layout: bool,
    mode: RxMode,
    host: HostOffloads,
    guest: GuestOffloads,
    /// DRIVER_OK was set and the queues exist.
    live: bool,
    /// Reset by `suspend`; `resume` brings the device back.
    suspended: bool,
    filter: FilterState,
    tx: TxState,
    rx: RxState,
    ctrl: Option<CtrlState>,
    stats: NetStats,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random locally administered unicast address (Linux `eth_random_addr`).
fn random_mac(seed: u64) -> [u8; 6] {
    let mut s = seed;
    let r = splitmix64(&mut s).to_le_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(r.get(..6).unwrap_or(&[0; 6]));
    mac[0] = (mac[0] & 0xFE) | 0x02;
    mac
}

fn valid_unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

/// The queues `new` and `resume` set up (§5.1.2): receive, transmit and, with CTRL_VQ,
/// the control queue. Returns the specs and how many of them to use.
fn queue_specs(cfg: &NetConfig, split_header: bool, ctrl_vq: bool) -> ([QueueSpec; 3], usize) {
    let specs = [
        QueueSpec::new(RX)
            .size(cfg.rx_queue_size)
            .indirect(if split_header { 2 } else { 0 }),
        QueueSpec::new(TX)
            .size(cfg.tx_queue_size)
            .indirect(cfg.max_tx_segments.clamp(1, 64) + 1),
        QueueSpec::new(CTRL).size(16).interrupts(false).indirect(4),
    ];
    (specs, if ctrl_vq { 3 } else { 2 })
}

/// The most data segments per frame (at most `max_segs`) for which a worst-case frame plus
/// the debugger's reserve fits the empty transmit ring as set up: otherwise a stalled
/// queue could never be restarted. It only shrinks without indirect descriptors, or with
/// a tiny ring; a ring that cannot take even one segment is an error.
fn fit_tx_segments<B: Bus>(bus: &B, max_segs: u16) -> Result<u16, NetError> {
    let tx_size = bus.queue_size(TX)?;
    let fits = |segs: u16| -> Result<bool, NetError> {
        let descs = bus.descriptors_for(TX, usize::from(segs) + 1)?;
        Ok(descs + usize::from(DEBUG_TX_RESERVE) <= usize::from(tx_size))
    };
    let mut segs = max_segs.max(1);
    while segs > 1 && !fits(segs)? {
        segs -= 1;
    }
    if !fits(segs)? {
        return Err(Error::BadQueueSize {
            queue: TX,
            size: tx_size,
        }
        .into());
    }
    Ok(segs)
}

/// Link status (STATUS; up when the device cannot report it, §5.1.4.2).
fn read_link_up<B: Bus>(bus: &B, feats: Features) -> Result<bool, NetError> {
    if has(feats, f::STATUS) {
        Ok(bus.read_config_u16(config::STATUS)? & config::S_LINK_UP != 0)
    } else {
        Ok(true)
    }
}

/// Negotiates `want`, then renegotiates while the result is not closed under the feature
/// dependencies (a device may offer HOST_TSO4 without CSUM).
fn negotiate<B: Bus>(bus: &mut B, want: Features) -> Result<Features, NetError> {
    let mut want = want;
    for _ in 0..4 {
        let got = bus.negotiate_features(want)?;
        let closed = close_dependencies(got);
        if closed == got {
            return Ok(got);
        }
        log::info!(
            "virtio-net: dropping features with missing dependencies: {:#x}",
            got.bits() & !closed.bits()
        );
        want = closed;
    }
    Err(NetError::Core(Error::FeaturesNotAccepted {
        offered: bus.offered_features().bits(),
        requested: want.bits(),
    }))
}

impl<B: Bus> VirtioNet<B> {
    /// Initialises the device (§3.1.1, §5.1.5): negotiation, config validation, queues,
    /// buffers, DRIVER_OK, then the receive ring is kicked and, if the device has no MAC of
    /// its own, the random one is pushed to it.
    pub fn new(mut bus: B, cfg: NetConfig) -> Result<Self, NetError> {
        if bus.device_type() != DeviceType::Net {
            return Err(NetError::Core(Error::Unsupported));
        }
        let mut stats = NetStats::default();
        let want = Features::from_bits_retain(f::SUPPORTED & cfg.features);
        let mut feats = negotiate(&mut bus, want)?;
        // §5.1.4.1: mtu must be 68..=65535; otherwise do not use it (Linux clears the bit).
        let mut mtu = None;
        if has(feats, f::MTU) {
            let m = bus.read_config_u16(config::MTU)?;
            if m < MIN_MTU {
                log::warn!("virtio-net: device MTU {m} < {MIN_MTU}; renegotiating without MTU");
                stats.config_invalid += 1;
                feats = negotiate(
                    &mut bus,
                    feats.difference(Features::from_bits_retain(f::MTU)),
                )?;
            } else {
                mtu = Some(m);
            }
        }
        if bus.max_queue_size(RX) == 0 || bus.max_queue_size(TX) == 0 {
            return Err(NetError::Core(Error::NoSuchQueue {
                queue: if bus.max_queue_size(RX) == 0 { RX } else { TX },
            }));
        }
        if has(feats, f::CTRL_VQ) && bus.max_queue_size(CTRL) == 0 {
            log::warn!("virtio-net: CTRL_VQ offered without a control queue; not using it");
            stats.config_invalid += 1;
            let without =
                close_dependencies(feats.difference(Features::from_bits_retain(f::CTRL_VQ)));
            feats = negotiate(&mut bus, without)?;
        }

        // Config fields, each only when its feature is negotiated (§5.1.4).
        let mut push_mac = false;
        let mac = if has(feats, f::MAC) {
            let mut m = [0u8; 6];
            bus.read_config(config::MAC, &mut m)?;
            if valid_unicast(&m) {
                m
            } else {
                log::warn!(
                    "virtio-net: device MAC {} is not a unicast address",
                    MacAddr(m)
                );
                stats.config_invalid += 1;
                push_mac = true;
                random_mac(cfg.mac_seed)
            }
        } else {
            push_mac = true;
            random_mac(cfg.mac_seed)
        };
        let link_up = read_link_up(&bus, feats)?;
        let (speed, duplex) = if has(feats, f::SPEED_DUPLEX) {
            read_speed_duplex(&bus, &mut stats)?
        } else {
            (None, None)
        };

        let version_1 = feats.contains(Features::VERSION_1);
        let mrg = has(feats, f::MRG_RXBUF);
        let hdr_len = if version_1 || mrg {
            wire::HDR_LEN_V1
        } else {
            wire::HDR_LEN_LEGACY
        };
        let any_layout = version_1 || has(feats, f::ANY_LAYOUT);
        let guest_gso = feats.bits() & (f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_UFO) != 0;
        let mode = if mrg {
            RxMode::Mergeable
        } else if guest_gso {
            RxMode::Big
        } else {
            RxMode::Small
        };
        let host = HostOffloads {
            csum: has(feats, f::CSUM),
            tso4: has(feats, f::HOST_TSO4),
            tso6: has(feats, f::HOST_TSO6),
            ufo: has(feats, f::HOST_UFO),
            ecn: has(feats, f::HOST_ECN),
        };
        let guest = GuestOffloads {
            csum: has(feats, f::GUEST_CSUM),
            tso4: has(feats, f::GUEST_TSO4),
            tso6: has(feats, f::GUEST_TSO6),
            ecn: has(feats, f::GUEST_ECN),
            ufo: has(feats, f::GUEST_UFO),
        };
        let split_header = !any_layout && !mrg;
        let ctrl_vq = has(feats, f::CTRL_VQ);
        let (specs, nspecs) = queue_specs(&cfg, split_header, ctrl_vq);
        bus.setup_queues(specs.get(..nspecs).unwrap_or(&[]))?;

        let indirect = feats.contains(Features::INDIRECT_DESC);
        let rx_size = bus.queue_size(RX)?;
        let tx_size = bus.queue_size(TX)?;
        // One slot (header, token) per frame in flight: a ring entry each, or fewer.
        let tx_slots = match cfg.max_tx_frames {
            0 => tx_size,
            n => n.min(tx_size),
        };
        let max_segs = fit_tx_segments(&bus, cfg.max_tx_segments.clamp(1, 64))?;
        let rx_descs_per_buf: u16 = if split_header && !(indirect && rx_size >= 2) {
            2
        } else {
            1
        };
        let ring_bufs = (rx_size / rx_descs_per_buf).max(1);
        let cap = match mode {
            RxMode::Small => {
                hdr_len + GOOD_PACKET_LEN.max(mtu.map_or(0, |m| m as usize + wire::ETH_VLAN_HLEN))
            }
            RxMode::Big => hdr_len + BIG_PACKET_LEN,
            RxMode::Mergeable => MERGE_BUF_CAP,
        };
        let memory_bufs = u16::try_from(RX_MEMORY_MAX / cap)
            .unwrap_or(u16::MAX)
            .max(1);
        let nbufs = match (cfg.rx_buffers, mode) {
            (0, RxMode::Big) => BIG_DEFAULT_BUFFERS,
            (0, _) => ring_bufs,
            (n, _) => n,
        }
        .min(ring_bufs)
        .min(memory_bufs) as usize;

        let mut net = VirtioNet {
            bus,
            cfg,
            features: feats,
            mac,
            mtu,
            link_up,
            speed,
            duplex,
            hdr_len,
            any_layout,
            mode,
            host,
            guest,
            live: false,
            suspended: false,
            filter: FilterState::new(),
            tx: TxState {
                hdrs: None,
                slots: vec![TxSlot::Free; tx_slots as usize],
                free_slots: (0..tx_slots).rev().collect(),
                done: Fifo::new(tx_slots as usize, 0),
                scratch: Vec::with_capacity(max_segs as usize + 1),
                stopped: false,
                max_segs,
                dbg: None,
                dbg_in_flight: false,
            },
            rx: RxState {
                bufs: Vec::with_capacity(nbufs),
                state: vec![BufState::Free; nbufs],
                headers: vec![[0; wire::HDR_LEN_V1]; nbufs],
                free: Vec::with_capacity(nbufs),
                ready: Fifo::new(nbufs, (0, 0)),
                lent: Vec::with_capacity(nbufs),
                posted: 0,
                dbg_cursor: 0,
                cap,
                split_header,
                ewma: Ewma::default(),
            },
            ctrl: None,
            stats,
        };
        // From here on, `Drop` resets the device and frees whatever was allocated.
        net.allocate(tx_slots as usize, nbufs)?;
        net.go_live()?;
        if push_mac {
            let mac = net.mac;
            if let Err(e) = net.set_mac_address(mac) {
                log::info!("virtio-net: could not give the device our MAC: {e}");
            }
        }
        log::info!(
            "virtio-net: features {:#x}, mac {}, mtu {}, link {}, {} receive buffers: {}",
            net.features.bits(),
            MacAddr(net.mac),
            MtuText(net.mtu),
            if net.link_up { "up" } else { "down" },
            net.mode,
            nbufs
        );
        Ok(net)
    }

    /// The end of initialisation, shared by `new` and `resume` (queues already set up):
    /// posts every free receive buffer, sets DRIVER_OK (§3.1.1 step 8), kicks the receive
    /// queue, and turns the transmit interrupt off (completions are reclaimed on the next
    /// transmit; the interrupt is armed only while the queue is stopped, see the module
    /// documentation).
    fn go_live(&mut self) -> Result<(), NetError> {
        self.refill()?;
        self.bus.driver_ok()?;
        self.live = true;
        self.bus.kick(RX)?;
        self.bus.disable_interrupts(TX)?;
        Ok(())
    }

    fn allocate(&mut self, tx_slots: usize, nbufs: usize) -> Result<(), NetError> {
        let dma = self.bus.dma();
        self.tx.hdrs = Some(dma.alloc_coherent(tx_slots.max(1) * TX_HDR_STRIDE, 16)?);
        self.tx.dbg = Some(dma.alloc_coherent(TX_HDR_STRIDE + DEBUG_FRAME_MAX, 16)?);
        if has(self.features, f::CTRL_VQ) {
            self.ctrl = Some(CtrlState {
                region: dma.alloc_coherent(CTRL_REGION, 16)?,
                in_flight: false,
            });
        }
        for i in 0..nbufs {
            let r = dma.alloc_coherent(self.rx.cap, 64)?;
            self.rx.bufs.push(r);
            self.rx.free.push(i as u16);
        }
        // Post lowest indices first.
        self.rx.free.reverse();
        Ok(())
    }

    // ---- accessors ----

    pub fn bus(&self) -> &B {
        &self.bus
    }
    /// The bus, e.g. to route interrupts; do not use the net queues through it.
    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }
    pub fn features(&self) -> Features {
        self.features
    }
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
    /// The device's MTU (MTU feature), validated.
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }
    pub fn link_up(&self) -> bool {
        self.link_up
    }
    /// Mbit/s (SPEED_DUPLEX), `None` when unknown.
    pub fn speed(&self) -> Option<u32> {
        self.speed
    }
    pub fn duplex(&self) -> Option<Duplex> {
        self.duplex
    }
    /// The virtio net header length in use (10 or 12).
    pub fn header_len(&self) -> usize {
        self.hdr_len
    }
    pub fn rx_mode(&self) -> RxMode {
        self.mode
    }
    pub fn host_offloads(&self) -> HostOffloads {
        self.host
    }
    pub fn guest_offloads(&self) -> GuestOffloads {
        self.guest
    }
    pub fn stats(&self) -> NetStats {
        self.stats
    }
    pub fn tx_stopped(&self) -> bool {
        self.tx.stopped
    }
    /// Most data segments [`VirtioNet::transmit`] takes in one frame: the configured
    /// `max_tx_segments`, lowered when a worst-case frame would not fit the transmit ring
    /// (no indirect descriptors, or a small ring). It may shrink again at
    /// [`VirtioNet::resume`] (a smaller ring), never grow.
    pub fn max_tx_segments(&self) -> u16 {
        self.tx.max_segs
    }
    /// Most frames in flight at once: one per transmit ring entry, or `max_tx_frames` if
    /// fewer. Fixed for the driver's life (across [`VirtioNet::resume`] too).
    pub fn tx_slots(&self) -> usize {
        self.tx.slots.len()
    }
    /// Receive buffers allocated, and how many the device holds now.
    pub fn rx_buffers(&self) -> (usize, usize) {
        (self.rx.bufs.len(), self.rx.posted)
    }
    /// The length a mergeable receive buffer is posted with now.
    pub fn rx_post_len(&self) -> usize {
        self.post_len()
    }

    /// Demultiplexes an interrupt (`vector`: MSI-X index, `None` for INTx).
    pub fn handle_interrupt(&mut self, vector: Option<u16>) -> NetInterrupt {
        let c = self.bus.handle_interrupt(vector);
        NetInterrupt {
            rx: c.queues.contains(RX),
            tx: c.queues.contains(TX),
            config: c.config_changed,
            needs_reset: c.needs_reset,
        }
    }

    /// Re-reads link status (STATUS) and speed/duplex after a config interrupt.
    pub fn handle_config_change(&mut self) -> Result<ConfigEvent, NetError> {
        self.stats.config_changes += 1;
        if self.bus.needs_reset() {
            return Ok(ConfigEvent {
                link_up: self.link_up,
                needs_reset: true,
                ..Default::default()
            });
        }
        let mut ev = ConfigEvent {
            link_up: self.link_up,
            ..Default::default()
        };
        if has(self.features, f::STATUS) {
            let s = self.bus.read_config_u16(config::STATUS)?;
            let up = s & config::S_LINK_UP != 0;
            ev.link_changed = up != self.link_up;
            ev.link_up = up;
            self.link_up = up;
            ev.announce = s & config::S_ANNOUNCE != 0 && has(self.features, f::GUEST_ANNOUNCE);
        }
        if has(self.features, f::SPEED_DUPLEX) {
            let (s, d) = read_speed_duplex(&self.bus, &mut self.stats)?;
            self.speed = s;
            self.duplex = d;
        }
        Ok(ev)
    }

    // ---- transmit ----

    /// Ring descriptors the largest frame takes (header + `max_segs`).
    fn max_frame_descs(&self) -> u16 {
        self.descs_for(usize::from(self.tx.max_segs))
    }

    /// Ring descriptors a frame of `segs` data segments takes (plus its header), by the
    /// bus's own rule (1 when it goes indirect).
    fn descs_for(&self, segs: usize) -> u16 {
        let n = segs + 1;
        let descs = self.bus.descriptors_for(TX, n).unwrap_or(n);
        u16::try_from(descs).unwrap_or(u16::MAX)
    }

    /// Queues one frame (its DMA segments, in order) with `offload`, and notifies the device.
    /// `token` comes back from [`VirtioNet::tx_reclaim`] once the device is done with the
    /// segments. [`NetError::Busy`] means: stop the output queue, retry after a reclaim
    /// with `restart`.
    pub fn transmit(
        &mut self,
        frame: &[Segment],
        offload: &TxOffload,
        token: usize,
    ) -> Result<TxStatus, NetError> {
        let st = self.transmit_deferred(frame, offload, token)?;
        self.bus.kick(TX)?;
        Ok(st)
    }

    /// Like [`VirtioNet::transmit`] without notifying; call [`VirtioNet::tx_kick`] after a
    /// batch.
    pub fn transmit_deferred(
        &mut self,
        frame: &[Segment],
        offload: &TxOffload,
        token: usize,
    ) -> Result<TxStatus, NetError> {
        if self.suspended {
            // Backpressure, as for a full ring: the queue restarts after `resume`.
            self.stats.tx_busy += 1;
            return Err(NetError::Busy);
        }
        if !self.live {
            return Err(NetError::Core(Error::InvalidState));
        }
        if token == DEBUG_TOKEN {
            return Err(NetError::BadFrame("token usize::MAX is reserved"));
        }
        if frame.is_empty() || frame.len() > self.tx.max_segs as usize {
            return Err(NetError::BadFrame("segment count"));
        }
        let mut len: usize = 0;
        for s in frame {
            len = len.saturating_add(s.len as usize);
        }
        if len < ETH_HLEN {
            return Err(NetError::BadFrame("shorter than an Ethernet header"));
        }
        let max = if offload.gso.is_some() {
            MAX_GSO_FRAME
        } else {
            // §5.1.6.2.1 with MTU: no frame beyond mtu + link header without GSO.
            self.mtu.map_or(1500, |m| m as usize) + wire::ETH_VLAN_HLEN
        };
        if len > max {
            return Err(NetError::BadFrame("longer than the MTU allows"));
        }
        let hdr = wire::build_tx_header(offload, len, &self.host).map_err(NetError::Offload)?;
        let descs = self.descs_for(frame.len());
        let free = self.bus.free_descriptors(TX)?;
        if free < descs + DEBUG_TX_RESERVE {
            self.stats.tx_busy += 1;
            self.stop_tx();
            return Err(NetError::Busy);
        }
        let Some(slot) = self.tx.free_slots.pop() else {
            self.stats.tx_busy += 1;
            self.stop_tx();
            return Err(NetError::Busy);
        };
        let Some(region) = &self.tx.hdrs else {
            self.tx.free_slots.push(slot);
            return Err(NetError::Core(Error::InvalidState));
        };
        let off = slot as usize * TX_HDR_STRIDE;
        let hb = hdr.as_bytes().get(..self.hdr_len).unwrap_or(&[]);
        region.write_at(off, hb);
        self.tx.scratch.clear();
        self.tx
            .scratch
            .push(Segment::new(region.daddr + off as u64, self.hdr_len as u32));
        self.tx.scratch.extend_from_slice(frame);
        if let Err(e) = self.bus.add(TX, &self.tx.scratch, &[], slot as usize) {
            self.tx.free_slots.push(slot);
            if e == Error::QueueFull {
                self.stats.tx_busy += 1;
                self.stop_tx();
            }
            return Err(e.into());
        }
        if let Some(s) = self.tx.slots.get_mut(slot as usize) {
            *s = TxSlot::InFlight(token);
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        // Linux `start_xmit`: stop when a worst-case frame would no longer fit (or no slot
        // is left for another frame).
        let stop = free - descs < self.max_frame_descs() + DEBUG_TX_RESERVE
            || self.tx.free_slots.is_empty();
        if stop {
            self.stop_tx();
        }
        Ok(TxStatus { stop })
    }

    /// Stops the queue and arms the delayed transmit interrupt, so the caller hears when
    /// to call [`VirtioNet::tx_reclaim`] for a restart. Completions that raced in while
    /// arming are found by that reclaim (callers reclaim right after a stop); a failure to
    /// arm is retried there too.
    fn stop_tx(&mut self) {
        if !self.tx.stopped {
            self.tx.stopped = true;
            if let Err(e) = self.bus.enable_interrupts_delayed(TX) {
                log::warn!("virtio-net: arming the transmit interrupt: {e}");
            }
        }
    }

    /// The ring (and the slot table) can take a worst-case frame again.
    fn tx_has_room(&self) -> Result<bool, NetError> {
        Ok(
            self.bus.free_descriptors(TX)? >= self.max_frame_descs() + DEBUG_TX_RESERVE
                && !self.tx.free_slots.is_empty(),
        )
    }

    /// Notifies the device of frames queued with [`VirtioNet::transmit_deferred`].
    /// Suspended: nothing to notify (`suspend` took every frame back).
    pub fn tx_kick(&mut self) -> Result<bool, NetError> {
        if self.suspended {
            return Ok(false);
        }
        Ok(self.bus.kick(TX)?)
    }

    fn tx_complete(&mut self, token: usize, report: &mut dyn FnMut(usize)) -> bool {
        if token == DEBUG_TOKEN {
            self.tx.dbg_in_flight = false;
            return false;
        }
        match self.tx.slots.get_mut(token) {
            Some(s @ TxSlot::InFlight(_)) => {
                if let TxSlot::InFlight(t) = *s {
                    report(t);
                }
                *s = TxSlot::Free;
                self.tx.free_slots.push(token as u16);
                self.stats.tx_completed += 1;
                true
            }
            _ => {
                // Tokens are validated by the ring, so this is a driver bug, not the device.
                log::error!("virtio-net: tx completion for idle slot {token}");
                false
            }
        }
    }

    /// Reclaims completed frames, handing each caller token to `done`; never allocates.
    /// Call it before each transmit batch, and on transmit interrupts. While the queue
    /// runs, the transmit interrupt stays off; while it is stopped, this re-arms it
    /// (delayed) until the ring has room again, then reports `restart` and turns it off.
    /// Suspended: nothing completes (`suspend` handed every token back) and the queue
    /// stays stopped; the first call after `resume` reports `restart`.
    pub fn tx_reclaim(&mut self, mut done: impl FnMut(usize)) -> Result<TxReclaim, NetError> {
        let mut r = TxReclaim::default();
        if self.suspended {
            return Ok(r);
        }
        while let Some(slot) = self.tx.done.pop() {
            if self.tx_complete(slot as usize, &mut done) {
                r.frames += 1;
            }
        }
        for _ in 0..4 {
            while let Some(u) = self.bus.pop_used(TX)? {
                if self.tx_complete(u.token, &mut done) {
                    r.frames += 1;
                }
            }
            if !self.tx.stopped {
                break;
            }
            if self.tx_has_room()? {
                self.tx.stopped = false;
                r.restart = true;
                self.bus.disable_interrupts(TX)?;
                break;
            }
            // Still stopped: wait for the interrupt, unless completions raced in.
            if !self.bus.enable_interrupts_delayed(TX)? {
                break;
            }
        }
        Ok(r)
    }

    // ---- receive ----

    fn post_len(&self) -> usize {
        match self.mode {
            RxMode::Mergeable => {
                let min = GOOD_PACKET_LEN;
                let max = MERGE_BUF_CAP - self.hdr_len;
                let len = self.hdr_len + self.rx.ewma.read().clamp(min, max);
                len.next_multiple_of(64).min(MERGE_BUF_CAP)
            }
            _ => self.rx.cap,
        }
    }

    /// Posts every free receive buffer; kicks once if the device is live.
    fn refill(&mut self) -> Result<(), NetError> {
        let len = self.post_len();
        let mut added = 0;
        while let Some(i) = self.rx.free.pop() {
            let Some(r) = self.rx.bufs.get(i as usize) else {
                continue;
            };
            let res = if self.rx.split_header {
                // Legacy without ANY_LAYOUT: the header in its own descriptor (§5.1.6.3.2).
                let segs = [
                    Segment::new(r.daddr, self.hdr_len as u32),
                    Segment::new(r.daddr + self.hdr_len as u64, (len - self.hdr_len) as u32),
                ];
                self.bus.add(RX, &[], &segs, i as usize)
            } else {
                self.bus
                    .add(RX, &[], &[Segment::new(r.daddr, len as u32)], i as usize)
            };
            match res {
                Ok(()) => {
                    if let Some(s) = self.rx.state.get_mut(i as usize) {
                        *s = BufState::Posted;
                    }
                    self.rx.posted += 1;
                    added += 1;
                }
                Err(e) => {
                    self.rx.free.push(i);
                    if e == Error::QueueFull {
                        break;
                    }
                    return Err(e.into());
                }
            }
        }
        if added > 0 && self.live {
            self.bus.kick(RX)?;
        }
        Ok(())
    }

    /// Moves completed receive buffers from the used ring to the `ready` FIFO.
    fn fetch(&mut self) -> Result<(), NetError> {
        while let Some(u) = self.bus.pop_used(RX)? {
            match self.rx.state.get_mut(u.token) {
                Some(s @ BufState::Posted) => {
                    *s = BufState::Ready;
                    self.rx.posted -= 1;
                    self.rx.ready.push((u.token as u16, u.len));
                    if let (Some(r), Some(h)) =
                        (self.rx.bufs.get(u.token), self.rx.headers.get_mut(u.token))
                    {
                        *h = [0; wire::HDR_LEN_V1];
                        if let Some(dst) = h.get_mut(..self.hdr_len) {
                            r.read_into(0, dst);
                        }
                    }
                }
                _ => log::error!(
                    "virtio-net: rx completion for buffer {} not posted",
                    u.token
                ),
            }
        }
        Ok(())
    }

    /// The header of a returned buffer, from the copy `fetch` took.
    fn read_header(&self, buf: u16) -> NetHdr {
        self.rx
            .headers
            .get(buf as usize)
            .and_then(|raw| NetHdr::read_from_bytes(&raw[..]).ok())
            .unwrap_or_default()
    }

    /// Parses the frame starting at `ready[p]`.
    fn parse_at(&self, p: usize) -> Parse {
        let Some((buf, len)) = self.rx.ready.get(p) else {
            return Parse::Incomplete;
        };
        let len = len as usize;
        if len < self.hdr_len + ETH_HLEN {
            return Parse::bad(
                "receive buffer shorter than header + Ethernet header",
                "length",
            );
        }
        let hdr = self.read_header(buf);
        let n = if self.mode == RxMode::Mergeable {
            hdr.num_buffers.get() as usize
        } else {
            1
        };
        let waiting = self.rx.ready.len() - p;
        if n == 0 {
            return Parse::bad("num_buffers is 0", "num_buffers");
        }
        if n > waiting + self.rx.posted {
            return Parse::bad(
                "num_buffers beyond the buffers the device holds",
                "num_buffers",
            );
        }
        if n > waiting {
            return Parse::Incomplete;
        }
        let mut total = len - self.hdr_len;
        for k in 1..n {
            let l = self.rx.ready.get(p + k).map_or(0, |e| e.1 as usize);
            total = total.saturating_add(l);
        }
        // From here on `n` is validated and its buffers have all arrived: a rejected frame
        // takes all of them (§5.1.6.4: buffers 2..n hold payload only).
        if total > MAX_RX_FRAME {
            return Parse::Bad {
                err: NetError::Device("frame longer than a big-packet buffer"),
                kind: "length",
                bufs: n,
            };
        }
        match wire::parse_rx_header(&hdr, total, &self.guest) {
            Ok(info) => Parse::Frame { n, info },
            Err(what) => Parse::Bad {
                err: NetError::Device(what),
                kind: "header",
                bufs: n,
            },
        }
    }

    /// Returns the first `n` ready buffers to the free list.
    fn release_front(&mut self, n: usize) {
        for _ in 0..n {
            let Some((buf, _)) = self.rx.ready.pop() else {
                break;
            };
            if let Some(s) = self.rx.state.get_mut(buf as usize) {
                *s = BufState::Free;
            }
            self.rx.free.push(buf);
        }
        self.rx.dbg_cursor = self.rx.dbg_cursor.saturating_sub(n);
    }

    fn count_bad(&mut self, kind: &'static str) {
        self.stats.rx_errors += 1;
        match kind {
            "num_buffers" => self.stats.rx_bad_num_buffers += 1,
            "header" => self.stats.rx_bad_header += 1,
            _ => self.stats.rx_length_errors += 1,
        }
    }

    /// Receives up to `budget` frames, lending each to `deliver` (copy it or consume it
    /// there; the buffers are reposted when it returns). Frames with bad device-written
    /// values are dropped and counted; a dropped frame uses up budget like a delivered one,
    /// so a device that answers every refill with bad frames cannot keep the call going.
    /// When the budget is not exhausted, the receive interrupt is re-enabled race-free;
    /// `more` says to poll again. Suspended: nothing arrives.
    pub fn rx_poll(
        &mut self,
        budget: usize,
        deliver: impl FnMut(&RxFrame<'_>),
    ) -> Result<RxSummary, NetError> {
        self.receive(budget, None, deliver)
    }

    /// Like [`VirtioNet::rx_poll`], except that a delivered frame's buffers are not
    /// reposted when `deliver` returns: they stay lent, out of the device's and the
    /// debugger's reach, until [`VirtioNet::rx_return_lent`]. So a platform may note the
    /// fragments' addresses and lengths in `deliver` and hand the frames to its network
    /// stack later, after releasing a lock the debugger needs (the kext does). At most
    /// `max_lent` buffers are lent at once (one frame of more is lent alone): the round
    /// then ends with `more` set, the receive interrupt still off.
    ///
    /// Lent buffers stay lent across [`VirtioNet::suspend`] and [`VirtioNet::resume`];
    /// [`VirtioNet::shutdown`] frees them with the rest.
    pub fn rx_poll_lend(
        &mut self,
        budget: usize,
        max_lent: usize,
        deliver: impl FnMut(&RxFrame<'_>),
    ) -> Result<RxSummary, NetError> {
        self.receive(budget, Some(max_lent), deliver)
    }

    /// Gives back the buffers of the frames [`VirtioNet::rx_poll_lend`] delivered (the
    /// caller is done reading them) and reposts them. Returns how many came back.
    pub fn rx_return_lent(&mut self) -> Result<usize, NetError> {
        let n = self.rx.lent.len();
        while let Some(buf) = self.rx.lent.pop() {
            if let Some(s) = self.rx.state.get_mut(usize::from(buf)) {
                *s = BufState::Free;
                self.rx.free.push(buf);
            }
        }
        // Suspended (or stopped) there is no queue to post to: `resume` posts them.
        if n > 0 && self.live {
            self.refill()?;
        }
        Ok(n)
    }

    /// Buffers lent by [`VirtioNet::rx_poll_lend`] and not yet returned.
    pub fn rx_lent(&self) -> usize {
        self.rx.lent.len()
    }

    /// Moves the first `n` ready buffers (a delivered frame) to the lent list.
    fn lend_front(&mut self, n: usize) {
        for _ in 0..n {
            let Some((buf, _)) = self.rx.ready.pop() else {
                break;
            };
            if let Some(s) = self.rx.state.get_mut(usize::from(buf)) {
                *s = BufState::Lent;
            }
            // Within capacity: every buffer at most once.
            self.rx.lent.push(buf);
        }
        self.rx.dbg_cursor = self.rx.dbg_cursor.saturating_sub(n);
    }

    /// `rx_poll` (`lend` None) and `rx_poll_lend` (`lend`: at most that many buffers lent).
    fn receive(
        &mut self,
        budget: usize,
        lend: Option<usize>,
        mut deliver: impl FnMut(&RxFrame<'_>),
    ) -> Result<RxSummary, NetError> {
        let mut sum = RxSummary::default();
        let mut lent_out = false;
        if self.suspended {
            return Ok(sum);
        }
        self.bus.disable_interrupts(RX)?;
        while sum.frames + sum.dropped < budget {
            self.fetch()?;
            if self.rx.ready.is_empty() {
                break;
            }
            match self.parse_at(0) {
                Parse::Frame { n, info } => {
                    if lend
                        .is_some_and(|max| !self.rx.lent.is_empty() && self.rx.lent.len() + n > max)
                    {
                        lent_out = true;
                        break;
                    }
                    let frame = RxFrame {
                        info,
                        rx: &self.rx,
                        start: 0,
                        n,
                        hdr_len: self.hdr_len,
                    };
                    deliver(&frame);
                    self.rx.ewma.add(info.len);
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += info.len as u64;
                    sum.frames += 1;
                    if lend.is_some() {
                        self.lend_front(n);
                    } else {
                        self.release_front(n);
                    }
                }
                Parse::Bad { err, kind, bufs } => {
                    log::warn!("virtio-net: dropping received frame: {err}");
                    self.count_bad(kind);
                    sum.dropped += 1;
                    sum.last_error = Some(err);
                    self.release_front(bufs);
                }
                Parse::Incomplete => break,
            }
            if self.rx.free.len() >= self.rx.bufs.len() / 2 {
                self.refill()?;
            }
        }
        self.refill()?;
        // Budget exhausted, or as much lent as allowed: stay in polling mode. Otherwise
        // re-enable; completions that arrived meanwhile mean another round.
        sum.more =
            sum.frames + sum.dropped >= budget || lent_out || self.bus.enable_interrupts(RX)?;
        Ok(sum)
    }

    // ---- control queue ----

    /// Sends one control command (§5.1.6.5) and waits, polling at most `ctrl_spins` times,
    /// for the device's ack. `data` elements each travel in their own descriptor.
    pub fn ctrl_command(&mut self, class: u8, command: u8, data: &[&[u8]]) -> Result<(), NetError> {
        if !self.live {
            return Err(NetError::Core(Error::InvalidState));
        }
        let Some(c) = &mut self.ctrl else {
            return Err(NetError::NotNegotiated("CTRL_VQ"));
        };
        if c.in_flight {
            // An earlier command timed out: its buffer is the device's until it completes.
            if self.bus.pop_used(CTRL)?.is_some() {
                c.in_flight = false;
            } else {
                return Err(NetError::CtrlBusy);
            }
        }
        if data.len() > 2 {
            return Err(NetError::BadFrame("more than two control data elements"));
        }
        let mut segs = [Segment::new(0, 0); 3];
        let hdr = CtrlHdr { class, command };
        c.region.write_at(CTRL_HDR_OFF, hdr.as_bytes());
        c.region.write_at(CTRL_ACK_OFF, &[ACK_SENTINEL]);
        if let Some(s) = segs.get_mut(0) {
            *s = Segment::new(c.region.daddr + CTRL_HDR_OFF as u64, 2);
        }
        let mut off = CTRL_DATA_OFF;
        for (i, d) in data.iter().enumerate() {
            if d.is_empty() || !c.region.write_at(off, d) {
                return Err(NetError::BadFrame("control data empty or too long"));
            }
            if let Some(s) = segs.get_mut(i + 1) {
                *s = Segment::new(c.region.daddr + off as u64, d.len() as u32);
            }
            off = (off + d.len()).next_multiple_of(8);
        }
        let ack = Segment::new(c.region.daddr + CTRL_ACK_OFF as u64, 1);
        let readable = segs.get(..1 + data.len()).unwrap_or(&[]);
        self.bus.add(CTRL, readable, &[ack], 0)?;
        c.in_flight = true;
        self.stats.ctrl_commands += 1;
        self.bus.kick(CTRL)?;
        for _ in 0..self.cfg.ctrl_spins.max(1) {
            if self.bus.pop_used(CTRL)?.is_some() {
                c.in_flight = false;
                let mut ack = [ACK_SENTINEL];
                c.region.read_into(CTRL_ACK_OFF, &mut ack);
                let [ack] = ack;
                return match ack {
                    ctrl::ACK_OK => Ok(()),
                    ctrl::ACK_ERR => {
                        self.stats.ctrl_errors += 1;
                        Err(NetError::CtrlRejected { class, command })
                    }
                    _ => {
                        self.stats.ctrl_errors += 1;
                        Err(NetError::Device("control ack neither OK nor ERR"))
                    }
                };
            }
            core::hint::spin_loop();
        }
        self.stats.ctrl_errors += 1;
        Err(NetError::Timeout)
    }

    fn need(&self, bit: u64, name: &'static str) -> Result<(), NetError> {
        if has(self.features, bit) {
            Ok(())
        } else {
            Err(NetError::NotNegotiated(name))
        }
    }

    /// Promiscuous mode (CTRL_RX). Replayed by [`VirtioNet::resume`].
    pub fn set_promisc(&mut self, on: bool) -> Result<(), NetError> {
        self.need(f::CTRL_RX, "CTRL_RX")?;
        self.ctrl_command(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[&[on as u8]])?;
        self.filter.promisc = Some(on);
        Ok(())
    }

    /// Receive all multicast (CTRL_RX). Replayed by [`VirtioNet::resume`].
    pub fn set_allmulti(&mut self, on: bool) -> Result<(), NetError> {
        self.need(f::CTRL_RX, "CTRL_RX")?;
        self.ctrl_command(ctrl::CLASS_RX, ctrl::RX_ALLMULTI, &[&[on as u8]])?;
        self.filter.allmulti = Some(on);
        Ok(())
    }

    /// Replaces the unicast and multicast filter tables (CTRL_RX, MAC_TABLE_SET). At most
    /// [`MAC_TABLE_MAX`] addresses each. Replayed by [`VirtioNet::resume`].
    pub fn set_mac_filter(
        &mut self,
        unicast: &[[u8; 6]],
        multicast: &[[u8; 6]],
    ) -> Result<(), NetError> {
        self.send_mac_filter(unicast, multicast)?;
        let fs = &mut self.filter;
        fs.mac_table_set = true;
        // `send_mac_filter` checked both against MAC_TABLE_MAX, the capacity reserved in
        // `new`: no allocation.
        fs.unicast.clear();
        fs.unicast.extend_from_slice(unicast);
        fs.multicast.clear();
        fs.multicast.extend_from_slice(multicast);
        Ok(())
    }

    /// MAC_TABLE_SET without recording it.
    fn send_mac_filter(
        &mut self,
        unicast: &[[u8; 6]],
        multicast: &[[u8; 6]],
    ) -> Result<(), NetError> {
        self.need(f::CTRL_RX, "CTRL_RX")?;
        if unicast.len() > MAC_TABLE_MAX || multicast.len() > MAC_TABLE_MAX {
            return Err(NetError::BadFrame("MAC table too long"));
        }
        const T: usize = 4 + 6 * MAC_TABLE_MAX;
        let mut uc = [0u8; T];
        let mut mc = [0u8; T];
        let ul = mac_table(&mut uc, unicast);
        let ml = mac_table(&mut mc, multicast);
        self.ctrl_command(
            ctrl::CLASS_MAC,
            ctrl::MAC_TABLE_SET,
            &[uc.get(..ul).unwrap_or(&[]), mc.get(..ml).unwrap_or(&[])],
        )
    }

    /// Sets the device's MAC address: CTRL_MAC_ADDR, or (legacy devices without it) a
    /// write to the config `mac` field. Replayed by [`VirtioNet::resume`].
    pub fn set_mac_address(&mut self, mac: [u8; 6]) -> Result<(), NetError> {
        if !valid_unicast(&mac) {
            return Err(NetError::BadFrame("not a unicast MAC address"));
        }
        if has(self.features, f::CTRL_MAC_ADDR) {
            self.ctrl_command(ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, &[&mac])?;
        } else if !self.features.contains(Features::VERSION_1) {
            // Legacy interface: the driver may write `mac` (§5.1.4 legacy).
            self.bus.write_config(config::MAC, &mac)?;
        } else {
            return Err(NetError::NotNegotiated("CTRL_MAC_ADDR"));
        }
        self.mac = mac;
        self.filter.mac_set = true;
        Ok(())
    }

    /// VLAN filter (CTRL_VLAN): receive VLAN `vid`. Replayed by [`VirtioNet::resume`].
    pub fn vlan_add(&mut self, vid: u16) -> Result<(), NetError> {
        self.vlan(ctrl::VLAN_ADD, vid)?;
        self.filter.set_vlan(vid, true);
        Ok(())
    }
    pub fn vlan_del(&mut self, vid: u16) -> Result<(), NetError> {
        self.vlan(ctrl::VLAN_DEL, vid)?;
        self.filter.set_vlan(vid, false);
        Ok(())
    }
    fn vlan(&mut self, cmd: u8, vid: u16) -> Result<(), NetError> {
        self.need(f::CTRL_VLAN, "CTRL_VLAN")?;
        if vid >= 4096 {
            return Err(NetError::BadFrame("VLAN id beyond 4095"));
        }
        self.ctrl_command(ctrl::CLASS_VLAN, cmd, &[&vid.to_le_bytes()])
    }

    /// Enables a subset of the negotiated receive offloads (CTRL_GUEST_OFFLOADS). Received
    /// frames using a disabled offload are rejected from then on. Replayed by
    /// [`VirtioNet::resume`].
    pub fn set_guest_offloads(&mut self, want: GuestOffloads) -> Result<(), NetError> {
        self.need(f::CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS")?;
        let bits = want.bits();
        if bits & !self.features.bits() != 0 {
            return Err(NetError::NotNegotiated("guest offload"));
        }
        self.ctrl_command(
            ctrl::CLASS_GUEST_OFFLOADS,
            ctrl::GUEST_OFFLOADS_SET,
            &[&bits.to_le_bytes()],
        )?;
        self.guest = want;
        self.filter.guest_offloads = Some(want);
        Ok(())
    }

    /// Acknowledges an announce request (GUEST_ANNOUNCE) after the gratuitous packets
    /// were sent; the device then clears the ANNOUNCE status bit.
    pub fn ack_announce(&mut self) -> Result<(), NetError> {
        self.need(f::GUEST_ANNOUNCE, "GUEST_ANNOUNCE")?;
        self.ctrl_command(ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK, &[])
    }

    // ---- kernel debugger path ----

    fn debug_poll_tx(&mut self) -> Result<(), NetError> {
        while let Some(u) = self.bus.pop_used(TX)? {
            if u.token == DEBUG_TOKEN {
                self.tx.dbg_in_flight = false;
            } else {
                // A normal frame: keep it, in order, for the next `tx_reclaim`.
                self.tx.done.push(u.token as u16);
            }
        }
        Ok(())
    }

    /// Sends one frame for the kernel debugger, polling (interrupts may be off). Uses the
    /// reserved transmit slot; waits at most `spins` polls for the previous debugger frame
    /// to complete ([`NetError::Timeout`] otherwise) and for this one.
    pub fn debug_send(&mut self, frame: &[u8], spins: u32) -> Result<(), NetError> {
        if !self.live {
            return Err(NetError::Core(Error::InvalidState));
        }
        if frame.len() < ETH_HLEN || frame.len() > DEBUG_FRAME_MAX {
            return Err(NetError::BadFrame("debugger frame length"));
        }
        let mut n = 0;
        while self.tx.dbg_in_flight {
            self.debug_poll_tx()?;
            n += 1;
            if n >= spins && self.tx.dbg_in_flight {
                return Err(NetError::Timeout);
            }
            core::hint::spin_loop();
        }
        let Some(r) = &self.tx.dbg else {
            return Err(NetError::Core(Error::InvalidState));
        };
        let h = self.hdr_len;
        r.write_at(0, NetHdr::default().as_bytes().get(..h).unwrap_or(&[]));
        r.write_at(h, frame);
        let res = if self.any_layout {
            self.bus.add(
                TX,
                &[Segment::new(r.daddr, (h + frame.len()) as u32)],
                &[],
                DEBUG_TOKEN,
            )
        } else {
            self.bus.add(
                TX,
                &[
                    Segment::new(r.daddr, h as u32),
                    Segment::new(r.daddr + h as u64, frame.len() as u32),
                ],
                &[],
                DEBUG_TOKEN,
            )
        };
        res?;
        self.tx.dbg_in_flight = true;
        self.stats.debug_tx_frames += 1;
        self.bus.kick(TX)?;
        for _ in 0..spins {
            self.debug_poll_tx()?;
            if !self.tx.dbg_in_flight {
                break;
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Receives one frame for the kernel debugger into `out`, polling at most `spins` times.
    /// The frame is borrowed, not taken: it stays queued for [`VirtioNet::rx_poll`] (see the
    /// module docs). Returns the frame length, or `None` when nothing arrived in time.
    pub fn debug_receive(&mut self, out: &mut [u8], spins: u32) -> Result<Option<usize>, NetError> {
        if !self.live {
            return Err(NetError::Core(Error::InvalidState));
        }
        let min_posted = (self.rx.bufs.len() / 2).max(1);
        for _ in 0..spins.max(1) {
            self.fetch()?;
            // Hand the oldest borrowed frames back if the device runs short of buffers, then
            // repost them with one notification per spin: a refill (and kick) per frame let
            // a device that answers every kick at once take spins x ring size kicks per call.
            let mut released = false;
            while self.rx.posted + self.rx.free.len() < min_posted && self.rx.dbg_cursor > 0 {
                let n = match self.parse_at(0) {
                    Parse::Frame { n, .. } | Parse::Bad { bufs: n, .. } => {
                        n.min(self.rx.dbg_cursor)
                    }
                    Parse::Incomplete => 1,
                };
                self.release_front(n);
                self.stats.rx_debugger_dropped += 1;
                released = true;
            }
            if released {
                self.refill()?;
            }
            while self.rx.dbg_cursor < self.rx.ready.len() {
                let p = self.rx.dbg_cursor;
                match self.parse_at(p) {
                    Parse::Frame { n, info } => {
                        self.rx.dbg_cursor += n;
                        let frame = RxFrame {
                            info,
                            rx: &self.rx,
                            start: p,
                            n,
                            hdr_len: self.hdr_len,
                        };
                        if let Some(len) = frame.copy_to(out) {
                            self.stats.debug_rx_frames += 1;
                            return Ok(Some(len));
                        }
                        self.stats.rx_debugger_oversize += 1;
                    }
                    // The normal path will drop it (and count it) when it gets there,
                    // with the buffers it takes along.
                    Parse::Bad { bufs, .. } => self.rx.dbg_cursor += bufs,
                    Parse::Incomplete => break,
                }
            }
            core::hint::spin_loop();
        }
        Ok(None)
    }

    // ---- sleep and wake ----

    /// Whether the driver is suspended (between [`VirtioNet::suspend`] and a successful
    /// [`VirtioNet::resume`]).
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// Prepares for sleep (see the module documentation): stops the transmit side, waits
    /// at most `drain_polls` polls for the frames in flight to complete, then resets the
    /// device through the bus. `tx_done` receives every transmit token still outstanding,
    /// exactly once, whether the device completed the frame or the reset took it back; the
    /// report says which. Receive buffers come back to the pool. Never allocates.
    ///
    /// Errors only when the driver is not running ([`Error::InvalidState`]); a device
    /// fault while waiting is reported in [`SuspendReport::drain_error`] and the reset
    /// still happens.
    pub fn suspend(
        &mut self,
        drain_polls: u32,
        mut tx_done: impl FnMut(usize),
    ) -> Result<SuspendReport, NetError> {
        if !self.live || self.suspended {
            return Err(NetError::Core(Error::InvalidState));
        }
        // The caller's output queue is stopped from here until the first `tx_reclaim`
        // after `resume` reports `restart`.
        self.tx.stopped = true;
        let mut report = SuspendReport::default();
        if let Err(e) = self.drain_tx(drain_polls, &mut tx_done, &mut report) {
            log::warn!("virtio-net: suspend: {e}; resetting with frames in flight");
            report.drain_error = Some(e);
        }
        let r = self.reset_and_reclaim(&mut tx_done);
        report.tx_completed += r.tx_completed;
        report.tx_reclaimed = r.tx_reclaimed;
        report.rx_reclaimed = r.rx_reclaimed;
        report.rx_dropped = r.rx_dropped;
        self.suspended = true;
        self.stats.suspends += 1;
        log::info!("virtio-net: suspended: {report}");
        Ok(report)
    }

    /// Kicks what was queued, then polls transmit completions until the ring is empty or
    /// `drain_polls` polls have passed.
    fn drain_tx(
        &mut self,
        drain_polls: u32,
        tx_done: &mut dyn FnMut(usize),
        report: &mut SuspendReport,
    ) -> Result<(), NetError> {
        // Frames queued with `transmit_deferred` and not yet notified.
        self.bus.kick(TX)?;
        let size = self.bus.queue_size(TX)?;
        loop {
            while let Some(u) = self.bus.pop_used(TX)? {
                if self.tx_complete(u.token, tx_done) {
                    report.tx_completed += 1;
                }
            }
            if self.bus.free_descriptors(TX)? >= size || report.drain_polls >= drain_polls {
                return Ok(());
            }
            report.drain_polls += 1;
            core::hint::spin_loop();
        }
    }

    /// Resets the device (through the bus, which releases its queues) and takes every
    /// buffer back: transmit tokens go to `tx_done` exactly once (completions the
    /// debugger's polling queued first, then what the reset reclaimed), receive buffers
    /// return to the pool, undelivered received data is dropped, and a control command or
    /// debugger frame in flight is forgotten. Shared by `suspend` and `shutdown`.
    fn reset_and_reclaim(&mut self, tx_done: &mut dyn FnMut(usize)) -> Reclaimed {
        let mut r = Reclaimed::default();
        while let Some(slot) = self.tx.done.pop() {
            if self.tx_complete(slot as usize, tx_done) {
                r.tx_completed += 1;
            }
        }
        self.live = false;
        let (tx_slots, rx_bufs) = (self.tx.slots.len(), self.rx.state.len());
        let VirtioNet {
            bus, tx, rx, ctrl, ..
        } = self;
        let mut give_back_tx = |slot: usize, r: &mut Reclaimed| {
            if let Some(s @ TxSlot::InFlight(_)) = tx.slots.get_mut(slot) {
                if let TxSlot::InFlight(token) = *s {
                    tx_done(token);
                }
                *s = TxSlot::Free;
                tx.free_slots.push(slot as u16);
                r.tx_reclaimed += 1;
            }
        };
        let mut give_back_rx = |buf: usize, r: &mut Reclaimed| {
            if let Some(s @ BufState::Posted) = rx.state.get_mut(buf) {
                *s = BufState::Free;
                rx.free.push(buf as u16);
                rx.posted = rx.posted.saturating_sub(1);
                r.rx_reclaimed += 1;
            }
        };
        // The frames' tokens go back even if the reset failed: their packets belong to
        // the OS, which cannot wait for ever (see `Bus::reset`). The driver's own buffers
        // (headers, receive buffers) are not reused before a reset succeeds (`resume`
        // negotiates, which resets first) and are leaked by `shutdown` if none does.
        let reset = bus.reset(&mut |queue, token| match queue {
            TX if token != DEBUG_TOKEN => give_back_tx(token, &mut r),
            RX => give_back_rx(token, &mut r),
            _ => {}
        });
        r.device_quiet = reset.is_ok();
        // Anything a bus failed to hand back is taken back all the same (the device no
        // longer owns it after the reset), so each token is still reported exactly once.
        for slot in 0..tx_slots {
            give_back_tx(slot, &mut r);
        }
        for buf in 0..rx_bufs {
            give_back_rx(buf, &mut r);
        }
        tx.dbg_in_flight = false;
        if let Some(c) = ctrl {
            c.in_flight = false;
        }
        // Received data not yet delivered: a frame may be missing buffers that will never
        // come now, so all of it is dropped.
        while let Some((buf, _)) = rx.ready.pop() {
            if let Some(s) = rx.state.get_mut(usize::from(buf)) {
                *s = BufState::Free;
                rx.free.push(buf);
                r.rx_dropped += 1;
            }
        }
        rx.posted = 0;
        rx.dbg_cursor = 0;
        r
    }

    /// Brings the device back after [`VirtioNet::suspend`] (see the module documentation):
    /// the same features again, every queue rebuilt, receive buffers posted, DRIVER_OK,
    /// link status / MTU / speed re-read, and the caller's settings replayed through the
    /// control queue. Allocates nothing of its own (the bus allocates the rings).
    ///
    /// On error the device is left reset and FAILED, every buffer is back with the driver,
    /// and the driver stays suspended: `resume` may be tried again, or the driver dropped.
    /// A device that now offers fewer features gives [`Error::MissingFeature`]. Settings the
    /// device refuses to take again do not fail the resume: they are counted in the report.
    pub fn resume(&mut self) -> Result<ResumeReport, NetError> {
        if !self.suspended {
            return Err(NetError::Core(Error::InvalidState));
        }
        if let Err(e) = self.restart_device() {
            log::error!("virtio-net: resume failed: {e}");
            self.reset_and_reclaim(&mut |_| {});
            self.bus.fail();
            return Err(e);
        }
        self.suspended = false;
        self.stats.resumes += 1;
        let mut report = ResumeReport {
            features: self.features,
            link_up: self.link_up,
            mtu: self.mtu,
            rx_posted: self.rx.posted,
            ..ResumeReport::default()
        };
        self.replay_settings(&mut report);
        log::info!("virtio-net: resumed: {report}");
        Ok(report)
    }

    /// `resume` up to a live device: §3.1.1 again, with the features, queue layout and
    /// buffers `new` chose.
    fn restart_device(&mut self) -> Result<(), NetError> {
        let feats = self.bus.renegotiate_features(self.features)?;
        // Config the reset may have changed (§5.1.4), each only with its feature.
        if has(feats, f::MTU) {
            let m = self.bus.read_config_u16(config::MTU)?;
            // §5.1.4.1. Small receive buffers were sized for the MTU `new` saw: a larger
            // one now would not fit them, so the smaller of the two is used.
            let fits = |m: u16| {
                self.mode != RxMode::Small
                    || usize::from(m) + wire::ETH_VLAN_HLEN + self.hdr_len <= self.rx.cap
            };
            if m < MIN_MTU || !fits(m) {
                log::warn!(
                    "virtio-net: device MTU {m} after reset unusable; keeping {}",
                    MtuText(self.mtu)
                );
                self.stats.config_invalid += 1;
            } else {
                self.mtu = Some(m);
            }
        }
        self.link_up = read_link_up(&self.bus, feats)?;
        if has(feats, f::SPEED_DUPLEX) {
            let (speed, duplex) = read_speed_duplex(&self.bus, &mut self.stats)?;
            self.speed = speed;
            self.duplex = duplex;
        }
        let (specs, nspecs) = queue_specs(&self.cfg, self.rx.split_header, has(feats, f::CTRL_VQ));
        self.bus.setup_queues(specs.get(..nspecs).unwrap_or(&[]))?;
        // Ring sizes may differ from before: the slot tables keep their size (tokens are
        // slot indices), the segment limit shrinks if the new ring needs it.
        self.tx.max_segs = fit_tx_segments(&self.bus, self.tx.max_segs)?;
        self.features = feats;
        self.go_live()
    }

    /// Replays what the caller set (kept in `FilterState`), in Linux's order: address,
    /// receive mode, filter tables, VLANs, offloads.
    fn replay_settings(&mut self, report: &mut ResumeReport) {
        let note = |res: Result<(), NetError>, report: &mut ResumeReport| {
            report.restored += 1;
            if let Err(e) = res {
                log::warn!("virtio-net: resume: replaying a setting: {e}");
                report.restore_failed += 1;
                report.restore_error.get_or_insert(e);
            }
        };
        if self.filter.mac_set {
            let mac = self.mac;
            note(self.set_mac_address(mac), report);
        }
        if let Some(on) = self.filter.promisc {
            note(self.set_promisc(on), report);
        }
        if let Some(on) = self.filter.allmulti {
            note(self.set_allmulti(on), report);
        }
        if self.filter.mac_table_set {
            // Lent out and put back: `send_mac_filter` needs `&mut self`.
            let unicast = core::mem::take(&mut self.filter.unicast);
            let multicast = core::mem::take(&mut self.filter.multicast);
            note(self.send_mac_filter(&unicast, &multicast), report);
            self.filter.unicast = unicast;
            self.filter.multicast = multicast;
        }
        for vid in 0..4096u16 {
            if self.filter.has_vlan(vid) {
                note(self.vlan(ctrl::VLAN_ADD, vid), report);
            }
        }
        if let Some(want) = self.filter.guest_offloads {
            note(self.set_guest_offloads(want), report);
        }
    }

    // ---- teardown ----

    /// Resets the device and frees all memory; `tx_done` receives the token of every frame
    /// still in flight, exactly once. The driver is unusable afterwards (dropping it does
    /// the same without reporting tokens).
    ///
    /// A device that will not reset, and whose DMA cannot be stopped, may still write the
    /// driver's buffers: they are leaked (logged), not freed.
    pub fn shutdown(&mut self, mut tx_done: impl FnMut(usize)) {
        let quiet = self.reset_and_reclaim(&mut tx_done).device_quiet;
        self.suspended = false;
        let mut regions: [Option<DmaRegion>; 3] = [
            self.tx.hdrs.take(),
            self.tx.dbg.take(),
            self.ctrl.take().map(|c| c.region),
        ];
        let regions = regions
            .iter_mut()
            .filter_map(Option::take)
            .chain(self.rx.bufs.drain(..));
        // SAFETY: each region came from this bus's `alloc_coherent` and is taken out of its
        // owner (released once); `quiet`: the reset above was acknowledged or the device's
        // DMA stopped, so it no longer accesses them (otherwise they are leaked).
        unsafe { self.bus.release_dma(regions, quiet) };
        self.rx.free.clear();
        self.rx.lent.clear();
        self.tx.free_slots.clear();
    }
}

impl<B: Bus> Drop for VirtioNet<B> {
    fn drop(&mut self) {
        self.shutdown(|_| {});
    }
}

fn read_speed_duplex<B: Bus>(
    bus: &B,
    stats: &mut NetStats,
) -> Result<(Option<u32>, Option<Duplex>), NetError> {
    let speed = bus.read_config_u32(config::SPEED)?;
    let duplex = bus.read_config_u8(config::DUPLEX)?;
    // §5.1.4.2: speed in Mbit/s, 0xFFFFFFFF unknown; Linux also rejects > INT_MAX.
    let s = match speed {
        u32::MAX => None,
        s if s <= i32::MAX as u32 => Some(s),
        s => {
            log::warn!("virtio-net: invalid speed {s:#x}");
            stats.config_invalid += 1;
            None
        }
    };
    let d = match duplex {
        0 => Some(Duplex::Half),
        1 => Some(Duplex::Full),
        0xFF => None,
        d => {
            log::warn!("virtio-net: invalid duplex {d:#x}");
            stats.config_invalid += 1;
            None
        }
    };
    Ok((s, d))
}

/// Writes `struct virtio_net_ctrl_mac` for `macs` into `out`; returns its length.
fn mac_table(out: &mut [u8], macs: &[[u8; 6]]) -> usize {
    let hdr = wire::MacTableHdr {
        entries: (macs.len() as u32).into(),
    };
    let mut len = 0;
    for chunk in core::iter::once(hdr.as_bytes()).chain(macs.iter().map(|m| &m[..])) {
        if let Some(dst) = out.get_mut(len..len + chunk.len()) {
            dst.copy_from_slice(chunk);
            len += chunk.len();
        }
    }
    len
}

/// A received frame lent to the caller: its bytes live in the driver's receive buffers
/// (one, or `num_buffers` with MRG_RXBUF) until the callback returns.
pub struct RxFrame<'a> {
    info: RxInfo,
    rx: &'a RxState,
    start: usize,
    n: usize,
    hdr_len: usize,
}

impl<'a> RxFrame<'a> {
    /// Length, checksum state and GSO information, validated.
    pub fn info(&self) -> &RxInfo {
        &self.info
    }
    /// Frame length without the virtio header.
    pub fn len(&self) -> usize {
        self.info.len
    }
    pub fn is_empty(&self) -> bool {
        self.info.len == 0
    }
    /// Buffers the frame was spread over.
    pub fn num_buffers(&self) -> usize {
        self.n
    }
    /// Each fragment's buffer, offset and length (one per receive buffer).
    fn spans(&self) -> impl Iterator<Item = (&'a DmaRegion, usize, usize)> + 'a {
        let rx = self.rx;
        let (start, hdr) = (self.start, self.hdr_len);
        (0..self.n).filter_map(move |k| {
            let (buf, len) = rx.ready.get(start + k)?;
            let r = rx.bufs.get(buf as usize)?;
            let off = if k == 0 { hdr } else { 0 };
            Some((r, off, (len as usize).saturating_sub(off)))
        })
    }

    /// The frame's bytes, fragment by fragment (one per receive buffer), in place: for a
    /// platform that hands them to a stack which copies them (the kext's mbufs). The
    /// values the driver validated come from its own copy of the header, never from these
    /// bytes; to take the frame into driver memory, use [`RxFrame::copy_to`].
    pub fn fragments(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.spans().map(|(r, off, len)| {
            // SAFETY: these buffers came back through the used ring, so the device no
            // longer owns them (§2.7.14) until they are reposted after the callback.
            unsafe { r.bytes(off, len) }.unwrap_or(&[])
        })
    }

    /// Copies the frame into `dst`, each byte read once (`DmaRegion::read_into`: a device
    /// that rewrites a returned buffer changes only what is copied, never causes undefined
    /// behaviour); `None` (nothing copied) if it does not fit.
    pub fn copy_to(&self, dst: &mut [u8]) -> Option<usize> {
        if dst.len() < self.info.len {
            return None;
        }
        let mut at = 0;
        for (r, off, len) in self.spans() {
            if !r.read_into(off, dst.get_mut(at..at + len)?) {
                return None;
            }
            at += len;
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_follows_linux() {
        let mut e = Ewma::default();
        e.add(1000);
        assert_eq!(e.read(), 1000);
        for _ in 0..1000 {
            e.add(4000);
        }
        assert!(e.read() > 3900 && e.read() <= 4000, "{}", e.read());
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for seed in 0..100 {
            let m = random_mac(seed);
            assert_eq!(m[0] & 3, 2, "{m:02x?}");
            assert!(valid_unicast(&m));
        }
        assert_ne!(random_mac(1), random_mac(2));
    }

    #[test]
    fn mac_table_layout() {
        let mut out = [0u8; 32];
        let n = mac_table(&mut out, &[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]);
        assert_eq!(n, 16);
        assert_eq!(
            &out[..16],
            &[2, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        assert_eq!(mac_table(&mut out, &[]), 4);
        assert_eq!(&out[..4], &[0, 0, 0, 0]);
    }
}
