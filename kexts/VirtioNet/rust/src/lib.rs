//! `VirtioNet.kext`'s Rust half: `virtio-net`'s [`VirtioNet`] over the family's bus.
//!
//! The C++ shim (`kexts/VirtioNet/shim/`, an `IOEthernetController` on the family's nub)
//! hands [`vnet_create`] the nub's device handle; this crate wraps it in a
//! [`FamilyBus`](virtio_kext_client::FamilyBus), brings the device up, and registers its
//! interrupt entry with the family. The shim translates:
//!
//! - `outputPacket` → [`vnet_transmit`] with the mbuf's DMA segments, the checksum/TSO
//!   request (`mbuf_get_csum_requested` / `mbuf_get_tso_requested`) and a copy of the
//!   frame's first bytes (this crate parses Ethernet/IP/TCP to build the virtio header);
//!   `VNET_E_BUSY` → `kIOReturnOutputStall`; the mbuf comes back through
//!   [`VnetCallbacks::tx_done`];
//! - interrupts → [`vnet_interrupt`]: received frames are lent to
//!   [`VnetCallbacks::rx_frame`] as fragments (the shim copies them into an mbuf from
//!   `allocatePacket` and queues it with `inputPacket`), then [`VnetCallbacks::events`]
//!   says whether to restart the output queue, flush the input queue, change the link, or
//!   announce the interface (a gratuitous ARP per IPv4 address, then [`vnet_ack_announce`]);
//!   while it reports `rx_more` the shim calls [`vnet_poll`], at most
//!   [`VNET_POLLS_PER_EVENT`] times, then defers the rest to a zero-delay timer on its work
//!   loop, so a device that never stops sending cannot keep the work loop to itself;
//! - `setPromiscuousMode` / `setMulticastMode` / `setMulticastList` /
//!   `setHardwareAddress` → the control queue ([`vnet_set_promiscuous`],
//!   [`vnet_set_multicast`], [`vnet_set_mac_address`]);
//! - the kernel debugger's polled `sendPacket` / `receivePacket` → [`vnet_debug_send`] /
//!   [`vnet_debug_receive`] (bounded waits; received frames are borrowed, so the stack still
//!   gets them when the system resumes).
//!
//! Threading: the shim calls the normal entries from the family's work loop (the
//! controller's command gate, a gated output queue, the interrupt actions), so they never
//! run concurrently with each other. The driver is behind a try-lock that every entry
//! takes. The debugger entries can run at any moment, on another CPU or on this one with a
//! normal entry stopped beneath them (KDP stops the machine wherever it is); one that finds
//! the lock held returns `VNET_E_LOCKED` (KDP drops the packet and retries).
//!
//! A normal entry holds the lock only while it works on the driver, never while it calls
//! the shim. The entries that owe callbacks ([`vnet_transmit`], [`vnet_poll`],
//! [`vnet_interrupt`], [`vnet_stop`], [`vnet_suspend`]) collect, under the lock, the tokens
//! of completed frames and the frames received (whose buffers the driver keeps lent, out of
//! the device's and the debugger's reach, until the entry's next turn under the lock gives
//! them back), and call [`VnetCallbacks::tx_done`] / [`VnetCallbacks::rx_frame`] with the
//! lock released, between turns and before they return. So the network stack
//! (`freePacket`, `allocatePacket`, `inputPacket`) is never entered under the lock: a panic
//! there, or KDP stopping the machine there, leaves the debugger a free driver. What
//! remains: KDP stopping the work loop's CPU while a normal entry is inside the driver (its
//! freeze interrupt arrives wherever interrupts are on; or a panic in the driver) leaves the
//! lock held for the whole debugging session, and every debugger entry answers
//! `VNET_E_LOCKED` until the machine resumes: that session cannot use this NIC. The window
//! is the driver's own work in one turn: a transmit, a reclaim, one receive round of at most
//! 64 frames, a control command's bounded wait, a reset.
//!
//! A normal entry finds the lock held only while a debugger entry runs on another CPU (KDP
//! runs with interrupts off, so never beneath it): [`vnet_stop`] then returns
//! `VNET_E_LOCKED` for the shim to retry, and [`vnet_poll`] / [`vnet_interrupt`] report
//! `rx_more` so receive is polled again. A callback may call the debugger entries and the
//! entries that owe no callbacks; the five above answer `VNET_E_LOCKED` from inside one.
//! [`VnetCallbacks::events`] runs after the entry has returned. Log records made with
//! interrupts off (the debugger entries) are dropped ([`vnet_log_init`]).
//!
//! Memory is allocated in [`vnet_create`] only; nothing here panics on device or caller
//! input.
#![no_std]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

extern crate alloc;

pub mod offload;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, Ordering};

use virtio_core::{Error, Features};
use virtio_kext_abi::{VkSegment, as_segments, vector_from_abi};
use virtio_kext_client::{FamilyBus, VfamDevice};
use virtio_net::features as f;
use virtio_net::{Duplex, MAC_TABLE_MAX, NetConfig, NetError, RxCsum, VirtioNet};

/// Statuses of the `vnet_*` functions.
pub const VNET_OK: i32 = 0;
/// The transmit ring is full: return `kIOReturnOutputStall` and wait for `restart`.
pub const VNET_E_BUSY: i32 = 1;
/// A null handle or pointer, or a bad length.
pub const VNET_E_INVALID: i32 = 2;
/// The frame cannot be sent (segment count, length, offload request): drop it.
pub const VNET_E_BAD_FRAME: i32 = 3;
/// The device did not negotiate what this needs (CTRL_RX, CTRL_MAC_ADDR, ...).
pub const VNET_E_UNSUPPORTED: i32 = 4;
/// The device refused a control command, or broke the protocol.
pub const VNET_E_DEVICE: i32 = 5;
/// A bounded wait ran out.
pub const VNET_E_TIMEOUT: i32 = 6;
/// Another context holds the driver (the debugger entered during a normal entry, or the
/// reverse): drop or retry.
pub const VNET_E_LOCKED: i32 = 7;
/// Stopped, or not enabled.
pub const VNET_E_STOPPED: i32 = 8;

/// Offload requests of [`vnet_transmit`] (from `mbuf_get_csum_requested` and
/// `mbuf_get_tso_requested`; IPv4 and IPv6 variants alike).
pub const VNET_TX_CSUM_TCP: u32 = 1;
pub const VNET_TX_CSUM_UDP: u32 = 2;
pub const VNET_TX_TSO4: u32 = 4;
pub const VNET_TX_TSO6: u32 = 8;

/// Checksum state of a received frame ([`VnetCallbacks::rx_frame`] `flags`).
/// The device validated the TCP/UDP checksum.
pub const VNET_RX_CSUM_VALID: u32 = 1;

/// Bytes of the frame's start [`vnet_transmit`] parses for offloads (Ethernet + VLAN +
/// IPv6 + TCP with options fits).
pub const VNET_TX_HEADER_BYTES: u32 = 128;
/// Most frames one [`vnet_interrupt`] or [`vnet_poll`] delivers to `rx_frame`.
pub const VNET_FRAMES_PER_POLL: u32 = 256;
/// Most [`vnet_poll`] calls the shim makes for one event while `rx_more` stays set, before it
/// defers the rest to a later turn of its work loop: receive holds the work loop for at most
/// `(1 + VNET_POLLS_PER_EVENT) * VNET_FRAMES_PER_POLL` frames at a time.
pub const VNET_POLLS_PER_EVENT: u32 = 3;
/// Most DMA segments the driver ever takes in one [`vnet_transmit`] (what the shim sizes its
/// segment arrays for); the device's limit, at most this, is [`VnetInfo::tx_max_segments`].
pub const VNET_TX_SEGMENTS_MAX: u32 = 32;
/// Most frames in flight at once, whatever the transmit ring size: the shim maps each with
/// its own `IODMACommand`, from a pool of [`VnetInfo::tx_frames`] (at most this) made at
/// start. Beyond it, [`vnet_transmit`] answers `VNET_E_BUSY` as for a full ring.
pub const VNET_TX_FRAMES_MAX: u32 = 256;
/// Largest frame the debugger path moves.
pub const VNET_DEBUG_FRAME_MAX: u32 = 1518;
const _: () = assert!(VNET_DEBUG_FRAME_MAX as usize == virtio_net::DEBUG_FRAME_MAX);
/// Most multicast addresses filtered exactly (more: all-multicast).
pub const VNET_MULTICAST_MAX: u32 = 64;
const _: () = assert!(VNET_MULTICAST_MAX as usize == MAC_TABLE_MAX);

/// One piece of a received frame (one receive buffer's bytes).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct VnetFragment {
    pub data: *const u8,
    pub len: usize,
}

/// What an interrupt (or a poll) did, for the shim to act on.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VnetEvents {
    pub rx_frames: u32,
    pub tx_frames: u32,
    /// The transmit ring has room again: restart the output queue.
    pub restart: u8,
    pub link_changed: u8,
    pub link_up: u8,
    /// DEVICE_NEEDS_RESET (or a broken queue): the device stopped working.
    pub needs_reset: u8,
    /// Receive is not finished: frames are still waiting (the call delivered its
    /// [`VNET_FRAMES_PER_POLL`]), or the driver was busy (`VNET_E_LOCKED`). The driver then
    /// stays in polling mode, its receive interrupt possibly off, so only another
    /// [`vnet_poll`] resumes receive: flush the input queue and poll again, at most
    /// [`VNET_POLLS_PER_EVENT`] times in one go, then defer the rest (a device that refills
    /// the ring as fast as buffers are reposted never clears this). Never set together with
    /// `needs_reset`, nor once stopped (unless busy).
    pub rx_more: u8,
    /// The device asks the driver to announce itself (GUEST_ANNOUNCE, §5.1.6.5.4; e.g.
    /// after a live migration): send gratuitous packets for the interface's addresses,
    /// then [`vnet_ack_announce`]. Reported again by every configuration change until
    /// acknowledged.
    pub announce: u8,
    pub reserved: [u8; 2],
}

/// The shim's choices, read once by [`vnet_create`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VnetConfig {
    /// Entropy (the kernel's random generator) for the MAC address the driver makes up when
    /// the device offers none, or an unusable one (§5.1.5: the driver generates a random
    /// locally administered address): a constant would give every such guest the same one.
    pub mac_seed: u64,
}

/// The shim's callbacks; `ctx` is passed back unchanged (the controller object).
///
/// - `tx_done`: the device is done with the frame submitted with `token` (free the mbuf);
/// - `rx_frame`: a received frame of `len` bytes in `nfrags` fragments, `flags`
///   `VNET_RX_*`; copy it out before returning (only called while enabled);
/// - `events` (may be null): called after an interrupt the family delivered was handled.
///
/// All three run with the driver lock released (see the crate documentation): `tx_done`
/// and `rx_frame` from inside the entry that collected them, `events` after it.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VnetCallbacks {
    pub ctx: *mut c_void,
    pub tx_done: Option<unsafe extern "C" fn(ctx: *mut c_void, token: usize)>,
    pub rx_frame: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            frags: *const VnetFragment,
            nfrags: usize,
            len: usize,
            flags: u32,
        ),
    >,
    pub events: Option<unsafe extern "C" fn(ctx: *mut c_void, events: *const VnetEvents)>,
}

/// What the controller reports to IOKit.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VnetInfo {
    pub mac: [u8; 6],
    pub link_up: u8,
    /// 0 unknown, 1 half, 2 full.
    pub duplex: u8,
    /// Mbit/s, 0 when unknown.
    pub speed_mbps: u32,
    /// The MTU (1500 unless the device reports one).
    pub mtu: u32,
    /// `getMaxPacketSize`: MTU + Ethernet header + VLAN tag... as IOKit counts it (MTU + 18).
    pub max_packet: u32,
    /// Segments one transmitted frame may have (at most [`VNET_TX_SEGMENTS_MAX`]; fewer when
    /// the transmit ring cannot hold a frame of that many beside the debugger's reserve).
    /// A frame of more is refused with `VNET_E_BAD_FRAME`: coalesce it first. Read it
    /// again after a wake, when it may have shrunk (never grown).
    pub tx_max_segments: u32,
    pub header_len: u32,
    /// Transmit checksum offload (CSUM).
    pub tx_csum: u8,
    pub tso4: u8,
    pub tso6: u8,
    /// Received checksums validated by the device (GUEST_CSUM).
    pub rx_csum: u8,
    /// Promiscuous/multicast filtering through the control queue (CTRL_RX).
    pub ctrl_rx: u8,
    /// The MAC address can be changed.
    pub mac_settable: u8,
    pub enabled: u8,
    pub reserved: u8,
    /// Most frames in flight at once (at most [`VNET_TX_FRAMES_MAX`]; fixed for the
    /// device's life): the size of the shim's transmit mapping pool. Every `token` of
    /// [`vnet_transmit`] is back through `tx_done` before another frame beyond these is taken.
    pub tx_frames: u32,
    /// Negotiated virtio features.
    pub features: u64,
}

/// Counters (the driver's `NetStats`) for the IORegistry and IONetworkStats.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VnetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_busy: u64,
    pub tx_completed: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_dropped_disabled: u64,
    pub rx_debugger_dropped: u64,
    pub debug_tx_frames: u64,
    pub debug_rx_frames: u64,
    pub debugger_locked_out: u64,
    pub ctrl_commands: u64,
    pub ctrl_errors: u64,
    pub config_changes: u64,
    pub interrupts: u64,
}

struct Inner {
    drv: VirtioNet<FamilyBus>,
    /// Most receive buffers lent out at once (a quarter: the debugger, which cannot touch
    /// them, can still keep half of them posted).
    max_lent: usize,
    enabled: bool,
    stopped: bool,
    promisc: bool,
    tx_dropped: u64,
    rx_dropped_disabled: u64,
    interrupts: u64,
}

/// One virtio network device (opaque to C).
pub struct VnetDevice {
    lock: AtomicBool,
    family: *mut VfamDevice,
    /// The callbacks (immutable after creation).
    cb: VnetCallbacks,
    locked_out: core::sync::atomic::AtomicU64,
    /// Interrupts that found a debugger entry holding the driver ([`missed_bit`]): the next
    /// `vnet_poll` acknowledges them, so a link change or NEEDS_RESET they announced is
    /// not lost. SeqCst: set outside the lock, taken under it.
    missed_interrupts: core::sync::atomic::AtomicU32,
    inner: UnsafeCell<Inner>,
    /// Held by the normal entry that hands the shim its callbacks ([`normal`]); owns
    /// `outbox`. The shim serialises these entries on its work loop, so it is taken only
    /// by a callback calling back into one (refused); the debugger entries never take it.
    normal: AtomicBool,
    outbox: UnsafeCell<Outbox>,
}

/// What a normal entry owes the shim, collected under the driver lock and handed over
/// after releasing it ([`Entry::deliver`]): the tokens of completed frames, and the frames
/// received, whose buffers the driver keeps lent (`VirtioNet::rx_poll_lend`) until the
/// entry's next turn under the lock gives them back.
struct Outbox {
    cb: VnetCallbacks,
    /// Capacity: the driver's transmit slots (a token at most once per turn).
    tx_done: Vec<usize>,
    /// Capacity: a receive round's budget.
    frames: Vec<OutFrame>,
    /// One per lent receive buffer of `frames` (capacity: every receive buffer).
    parts: Vec<VnetFragment>,
    /// The fragment list of the frame being delivered: its parts, one of them split in
    /// three around a completed checksum (capacity: every receive buffer + 2).
    scratch: Vec<VnetFragment>,
    /// The driver has receive buffers lent: the next turn under the lock returns them.
    owed: bool,
}

/// A received frame waiting in the [`Outbox`].
struct OutFrame {
    /// Its parts: `parts[first..first + count]`.
    first: usize,
    count: usize,
    len: usize,
    flags: u32,
    /// A completed partial checksum: the frame offset and the two bytes that go there.
    patch: Option<(usize, [u8; 2])>,
}

impl Outbox {
    /// A completed frame's token.
    fn complete(&mut self, token: usize) {
        if self.tx_done.len() < self.tx_done.capacity() {
            self.tx_done.push(token);
        } else if let Some(f) = self.cb.tx_done {
            // Not reached: a turn reclaims each of the driver's slots at most once, and
            // the list is emptied before every turn. Handed over at once rather than
            // allocating or losing the shim's packet.
            // SAFETY: the shim's callback with its own context and token.
            unsafe { f(self.cb.ctx, token) }
        }
    }

    /// Notes a received frame (its buffers stay lent) for delivery after the lock.
    fn lend(&mut self, frame: &virtio_net::RxFrame<'_>) {
        // Only what the device validated is reported as validated; a partial checksum
        // (NEEDS_CSUM) is completed here and the stack checks it.
        let (flags, patch) = match frame.info().csum {
            RxCsum::None => (0, None),
            RxCsum::Valid => (VNET_RX_CSUM_VALID, None),
            RxCsum::Partial { start, offset } => (
                0,
                offload::complete_rx_checksum(frame.fragments(), frame.len(), start, offset),
            ),
        };
        if self.frames.len() == self.frames.capacity() {
            // Not reached: a round delivers at most its budget.
            return;
        }
        let first = self.parts.len();
        for part in frame.fragments() {
            if self.parts.len() < self.parts.capacity() {
                self.parts.push(VnetFragment {
                    data: part.as_ptr(),
                    len: part.len(),
                });
            }
        }
        self.frames.push(OutFrame {
            first,
            count: self.parts.len() - first,
            len: frame.len(),
            flags,
            patch,
        });
    }
}

/// The device's try-lock, held for the duration of one entry.
struct Guard<'a> {
    d: &'a VnetDevice,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.d.lock.store(false, Ordering::Release);
    }
}

impl VnetDevice {
    // The returned `&mut` is tied to the guard's borrow of `self` and exclusive by the lock.
    #[allow(clippy::mut_from_ref)]
    fn try_lock(&self) -> Option<(Guard<'_>, &mut Inner)> {
        if self
            .lock
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.locked_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: the lock is held: no other reference to `inner` exists until the guard
        // drops (every access goes through this function).
        let inner = unsafe { &mut *self.inner.get() };
        Some((Guard { d: self }, inner))
    }
}

fn dev<'a>(p: *mut VnetDevice) -> Option<&'a VnetDevice> {
    // SAFETY: a non-null handle comes from `vnet_create` and stays valid until
    // `vnet_destroy` (C contract); only shared references are made here, the mutable state
    // is behind the lock.
    unsafe { p.cast_const().as_ref() }
}

/// Runs `f` under the lock.
fn with(p: *mut VnetDevice, f: impl FnOnce(&mut Inner) -> i32) -> i32 {
    let Some(d) = dev(p) else {
        return VNET_E_INVALID;
    };
    match d.try_lock() {
        Some((_g, inner)) => f(inner),
        None => VNET_E_LOCKED,
    }
}

/// A normal entry that owes the shim callbacks (transmit, poll, interrupt, stop, suspend).
/// It takes the driver lock only for its turns with the driver ([`Entry::locked`]) and
/// calls `tx_done` / `rx_frame` between them and at its end, with the lock released: a
/// call into the network stack (freePacket, allocatePacket, inputPacket) never holds the
/// lock the debugger's entries need. `VNET_E_LOCKED` when a callback calls back in.
fn normal(p: *mut VnetDevice, f: impl FnOnce(&mut Entry<'_>) -> i32) -> i32 {
    let Some(d) = dev(p) else {
        return VNET_E_INVALID;
    };
    if d.normal
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return VNET_E_LOCKED;
    }
    // SAFETY: `normal` is held: no other reference to the outbox exists until it is
    // released below (only this function makes one).
    let out = unsafe { &mut *d.outbox.get() };
    let mut e = Entry { d, out };
    let status = f(&mut e);
    e.deliver();
    if e.out.owed {
        // Give the driver its buffers back now rather than at the next entry; a debugger
        // entry holding the lock leaves that to the next entry.
        e.locked(|_, _| ());
    }
    d.normal.store(false, Ordering::Release);
    status
}

/// A normal entry under way (see [`normal`]).
struct Entry<'a> {
    d: &'a VnetDevice,
    out: &'a mut Outbox,
}

impl Entry<'_> {
    /// One turn with the driver: delivers what is owed first (so nothing waits undelivered
    /// under the lock), takes the lock (`None`: a debugger entry holds it), gives the driver
    /// back the buffers of frames delivered before, then runs `f`.
    fn locked<R>(&mut self, f: impl FnOnce(&mut Inner, &mut Outbox) -> R) -> Option<R> {
        self.deliver();
        let (_g, inner) = self.d.try_lock()?;
        if self.out.owed {
            // The shim has copied them out (the frames were delivered).
            if let Err(e) = inner.drv.rx_return_lent() {
                log::error!("VirtioNet: reposting receive buffers: {e}");
            }
        }
        let r = f(inner, self.out);
        self.out.owed = inner.drv.rx_lent() > 0;
        Some(r)
    }

    /// Hands the shim what the turns collected, the lock released.
    fn deliver(&mut self) {
        let Outbox {
            cb,
            tx_done,
            frames,
            parts,
            scratch,
            ..
        } = &mut *self.out;
        for &token in tx_done.iter() {
            if let Some(f) = cb.tx_done {
                // SAFETY: the shim's callback with its own context and token.
                unsafe { f(cb.ctx, token) }
            }
        }
        tx_done.clear();
        for fr in frames.iter() {
            let mine = parts.get(fr.first..fr.first + fr.count).unwrap_or(&[]);
            let bytes = mine.iter().map(|p| {
                // SAFETY: each part is a lent receive buffer's bytes (`rx_poll_lend`): out
                // of the device's ring and the debugger's reach, unchanged and alive until
                // the driver gets it back, at this entry's next turn under the lock.
                unsafe { core::slice::from_raw_parts(p.data, p.len) }
            });
            scratch.clear();
            let mut push = |part: &[u8]| {
                if scratch.len() < scratch.capacity() {
                    scratch.push(VnetFragment {
                        data: part.as_ptr(),
                        len: part.len(),
                    });
                }
            };
            match &fr.patch {
                Some((at, completed)) => offload::patched_fragments(bytes, *at, completed, push),
                None => bytes.for_each(&mut push),
            }
            if let Some(f) = cb.rx_frame {
                // SAFETY: the shim's callback; the fragments point into lent receive
                // buffers and `fr.patch`, both unchanged until it returns.
                unsafe { f(cb.ctx, scratch.as_ptr(), scratch.len(), fr.len, fr.flags) };
            }
        }
        frames.clear();
        parts.clear();
    }

    /// Receive rounds after the first, while frames are waiting (at most
    /// [`VNET_FRAMES_PER_POLL`] in all), each delivered before the next.
    fn more_rounds(&mut self, ev: &mut VnetEvents) {
        for _ in 1..RX_ROUNDS {
            if ev.rx_more == 0 || ev.needs_reset != 0 {
                return;
            }
            if self.locked(|i, out| i.receive_round(out, ev)).is_none() {
                // A debugger entry holds the driver: poll again later.
                ev.rx_more = 1;
                return;
            }
        }
    }
}

fn status_of(e: NetError) -> i32 {
    match e {
        NetError::Busy => VNET_E_BUSY,
        NetError::BadFrame(_) | NetError::Offload(_) => VNET_E_BAD_FRAME,
        NetError::NotNegotiated(_) => VNET_E_UNSUPPORTED,
        NetError::Timeout | NetError::CtrlBusy => VNET_E_TIMEOUT,
        NetError::Core(Error::InvalidState) => VNET_E_STOPPED,
        NetError::Core(_) | NetError::Device(_) | NetError::CtrlRejected { .. } => VNET_E_DEVICE,
    }
}

/// Receive budget per poll round, and rounds per interrupt or poll before yielding to the
/// shim.
const RX_BUDGET: usize = 64;
const RX_ROUNDS: usize = VNET_FRAMES_PER_POLL as usize / RX_BUDGET;
const _: () = assert!(RX_ROUNDS * RX_BUDGET == VNET_FRAMES_PER_POLL as usize);

impl Inner {
    /// Reclaims completed frames; their tokens go to the outbox.
    fn reclaim(&mut self, out: &mut Outbox, ev: &mut VnetEvents) -> Result<(), NetError> {
        let r = self.drv.tx_reclaim(|token| out.complete(token))?;
        ev.tx_frames += r.frames as u32;
        if r.restart {
            ev.restart = 1;
        }
        Ok(())
    }

    /// One receive round of [`RX_BUDGET`] frames, lent to the outbox (dropped, and
    /// counted, while disabled); a device fault is reported as `needs_reset`.
    fn receive_round(&mut self, out: &mut Outbox, ev: &mut VnetEvents) {
        if self.stopped {
            ev.rx_more = 0;
            return;
        }
        let Inner {
            drv,
            max_lent,
            enabled,
            rx_dropped_disabled,
            ..
        } = self;
        let r = drv.rx_poll_lend(RX_BUDGET, *max_lent, |frame| {
            if *enabled {
                out.lend(frame);
            } else {
                *rx_dropped_disabled += 1;
            }
        });
        match r {
            Ok(s) => {
                ev.rx_frames += s.frames as u32;
                ev.rx_more = s.more.into();
            }
            Err(e) => self.fault(e, ev),
        }
    }

    /// A broken queue: reported as `needs_reset`, and not polled again.
    fn fault(&mut self, e: NetError, ev: &mut VnetEvents) {
        log::error!("VirtioNet: queue fault: {e}");
        ev.needs_reset = 1;
        // A broken queue stays broken: polling it again would only repeat the fault.
        ev.rx_more = 0;
    }

    /// Reclaim + the first receive round; the rest follow in [`Entry::more_rounds`].
    fn poll(&mut self, out: &mut Outbox, ev: &mut VnetEvents) {
        if self.stopped {
            return;
        }
        match self.reclaim(out, ev) {
            Ok(()) => self.receive_round(out, ev),
            Err(e) => self.fault(e, ev),
        }
    }

    /// An interrupt: its cause, then [`Inner::poll`]; false when there is nothing more to
    /// poll.
    fn interrupt(&mut self, vector: i32, out: &mut Outbox, ev: &mut VnetEvents) -> bool {
        if !self.acknowledge(vector, ev) {
            return false;
        }
        self.poll(out, ev);
        true
    }

    /// An interrupt's cause (the ISR on INTx), link and configuration changes; false when
    /// there is nothing to poll (stopped, or the device needs a reset).
    fn acknowledge(&mut self, vector: i32, ev: &mut VnetEvents) -> bool {
        if self.stopped {
            return false;
        }
        self.interrupts += 1;
        let i = self.drv.handle_interrupt(vector_from_abi(vector));
        ev.link_up = self.drv.link_up().into();
        if i.config || i.needs_reset {
            match self.drv.handle_config_change() {
                Ok(c) => {
                    // ORed: one poll may acknowledge several missed interrupts.
                    ev.link_changed |= u8::from(c.link_changed);
                    ev.link_up = c.link_up.into();
                    if c.needs_reset {
                        ev.needs_reset = 1;
                    }
                    // §5.1.6.5.4: the driver SHOULD send gratuitous packets, then ack. The
                    // shim sends them (only the stack knows the addresses) and acks with
                    // vnet_ack_announce; a link that stayed up gives the stack no reason to
                    // announce by itself.
                    if c.announce && !c.needs_reset {
                        ev.announce = 1;
                    }
                }
                Err(e) => log::warn!("VirtioNet: config change: {e}"),
            }
        }
        if ev.needs_reset != 0 {
            log::error!("VirtioNet: the device needs a reset; the interface is down");
            return false;
        }
        true
    }
}

/// The bit of `vector` in [`VnetDevice::missed_interrupts`]: MSI-X vectors 0–30 their own,
/// INTx and any other the last.
fn missed_bit(vector: i32) -> u32 {
    match u32::try_from(vector) {
        Ok(v) if v < 31 => 1 << v,
        _ => 1 << 31,
    }
}

/// The vector a bit of [`VnetDevice::missed_interrupts`] stands for.
fn missed_vector(bit: u32) -> i32 {
    if bit < 31 {
        bit as i32
    } else {
        virtio_kext_abi::VK_VECTOR_INTX
    }
}

/// The family calls this (registered by [`vnet_create`]) from its interrupt actions.
unsafe extern "C" fn family_interrupt(ctx: *mut c_void, vector: i32) {
    let p: *mut VnetDevice = ctx.cast();
    let mut ev = VnetEvents::default();
    // SAFETY: ctx is the device registered in vnet_create, unregistered before it is freed.
    unsafe { vnet_interrupt(p, vector, &mut ev) };
    let Some(d) = dev(p) else { return };
    let cb = d.cb;
    if let Some(f) = cb.events {
        // SAFETY: the shim's callback with its own context; the lock is released.
        unsafe { f(cb.ctx, &ev) };
    }
}

/// Brings up the network device behind the family handle `family` (the nub's
/// `virtioDevice()`), registers the interrupt entry with the family, and returns the handle
/// in `*out`. Receive frames are dropped until [`vnet_enable`]. A device without a usable
/// MAC address (none offered, or multicast or all-zero) gets a random locally administered
/// one from [`VnetConfig::mac_seed`].
///
/// # Safety
/// `family` is a live family handle that outlives the returned device; `config` and
/// `callbacks` point to valid values; the callbacks' `ctx` stays valid until
/// [`vnet_destroy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_create(
    family: *mut VfamDevice,
    config: *const VnetConfig,
    callbacks: *const VnetCallbacks,
    out: *mut *mut VnetDevice,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(out) = (unsafe { out.as_mut() }) else {
        return VNET_E_INVALID;
    };
    *out = core::ptr::null_mut();
    // SAFETY: null or valid (C contract).
    let (Some(cb), Some(config)) = (
        unsafe { callbacks.as_ref() }.copied(),
        unsafe { config.as_ref() }.copied(),
    ) else {
        return VNET_E_INVALID;
    };
    if cb.tx_done.is_none() || cb.rx_frame.is_none() {
        return VNET_E_INVALID;
    }
    // SAFETY: caller contract: a live handle that outlives the bus.
    let Some(bus) = (unsafe { FamilyBus::new(family) }) else {
        return VNET_E_INVALID;
    };
    // The network stack takes no coalesced (GUEST_TSO/UFO) frames, and never asks for UFO.
    let refused = f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_ECN | f::GUEST_UFO | f::HOST_UFO;
    let cfg = NetConfig {
        features: f::SUPPORTED & !refused,
        max_tx_segments: VNET_TX_SEGMENTS_MAX as u16,
        max_tx_frames: VNET_TX_FRAMES_MAX as u16,
        mac_seed: config.mac_seed,
        ..NetConfig::default()
    };
    let drv = match VirtioNet::new(bus, cfg) {
        Ok(d) => d,
        Err(e) => {
            log::error!("VirtioNet: device setup failed: {e}");
            return status_of(e);
        }
    };
    let nbufs = drv.rx_buffers().0.max(1);
    let outbox = Outbox {
        cb,
        tx_done: Vec::with_capacity(drv.tx_slots()),
        frames: Vec::with_capacity(RX_BUDGET),
        parts: Vec::with_capacity(nbufs),
        // + 2: completing a partial checksum splits a fragment around the field.
        scratch: Vec::with_capacity(nbufs + 2),
        owed: false,
    };
    let d = Box::new(VnetDevice {
        lock: AtomicBool::new(false),
        family,
        cb,
        locked_out: core::sync::atomic::AtomicU64::new(0),
        missed_interrupts: core::sync::atomic::AtomicU32::new(0),
        normal: AtomicBool::new(false),
        outbox: UnsafeCell::new(outbox),
        inner: UnsafeCell::new(Inner {
            drv,
            max_lent: (nbufs / 4).max(1),
            enabled: false,
            stopped: false,
            promisc: false,
            tx_dropped: 0,
            rx_dropped_disabled: 0,
            interrupts: 0,
        }),
    });
    let raw = Box::into_raw(d);
    // SAFETY: live family handle; the context is the boxed device, unregistered in
    // vnet_stop before it is freed.
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(
            family,
            Some(family_interrupt),
            raw.cast(),
        )
    };
    *out = raw;
    VNET_OK
}

/// Fills `*out` with what the controller reports.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_info(d: *mut VnetDevice, out: *mut VnetInfo) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(out) = (unsafe { out.as_mut() }) else {
        return VNET_E_INVALID;
    };
    with(d, |i| {
        let drv = &i.drv;
        let feats = drv.features();
        let host = drv.host_offloads();
        let mtu = u32::from(drv.mtu().unwrap_or(1500));
        *out = VnetInfo {
            mac: drv.mac(),
            link_up: drv.link_up().into(),
            duplex: match drv.duplex() {
                None => 0,
                Some(Duplex::Half) => 1,
                Some(Duplex::Full) => 2,
            },
            speed_mbps: drv.speed().unwrap_or(0),
            mtu,
            max_packet: mtu + 18,
            tx_max_segments: drv.max_tx_segments().into(),
            header_len: drv.header_len() as u32,
            tx_csum: host.csum.into(),
            tso4: host.tso4.into(),
            tso6: host.tso6.into(),
            rx_csum: drv.guest_offloads().csum.into(),
            ctrl_rx: (feats.bits() & f::CTRL_RX != 0).into(),
            mac_settable: (feats.bits() & f::CTRL_MAC_ADDR != 0
                || !feats.contains(Features::VERSION_1))
            .into(),
            enabled: i.enabled.into(),
            reserved: 0,
            tx_frames: u32::try_from(drv.tx_slots()).unwrap_or(VNET_TX_FRAMES_MAX),
            features: feats.bits(),
        };
        VNET_OK
    })
}

/// Counters.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_stats(d: *mut VnetDevice, out: *mut VnetStats) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(out) = (unsafe { out.as_mut() }) else {
        return VNET_E_INVALID;
    };
    let locked_out = dev(d).map_or(0, |d| d.locked_out.load(Ordering::Relaxed));
    with(d, |i| {
        let s = i.drv.stats();
        *out = VnetStats {
            tx_frames: s.tx_frames,
            tx_bytes: s.tx_bytes,
            tx_busy: s.tx_busy,
            tx_completed: s.tx_completed,
            tx_dropped: i.tx_dropped,
            rx_frames: s.rx_frames,
            rx_bytes: s.rx_bytes,
            rx_errors: s.rx_errors,
            rx_dropped_disabled: i.rx_dropped_disabled,
            rx_debugger_dropped: s.rx_debugger_dropped,
            debug_tx_frames: s.debug_tx_frames,
            debug_rx_frames: s.debug_rx_frames,
            debugger_locked_out: locked_out,
            ctrl_commands: s.ctrl_commands,
            ctrl_errors: s.ctrl_errors,
            config_changes: s.config_changes,
            interrupts: i.interrupts,
        };
        VNET_OK
    })
}

/// `enable` / `disable`: received frames reach `rx_frame` only while enabled; transmit is
/// refused while disabled.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_enable(d: *mut VnetDevice, enable: bool) -> i32 {
    with(d, |i| {
        if i.stopped && enable {
            return VNET_E_STOPPED;
        }
        i.enabled = enable;
        VNET_OK
    })
}

/// Sends one frame: `nsegs` DMA segments of `len` bytes in total (the mbuf's, mapped by
/// the shim), with offloads `flags` (`VNET_TX_*`; `mss` for TSO) computed from the first
/// `headers_len` bytes of the frame at `headers` (a copy of up to
/// [`VNET_TX_HEADER_BYTES`]). Completed frames are reclaimed first (their tokens go to
/// `tx_done`). `token` comes back through `tx_done` when the device is done with the
/// segments.
///
/// `VNET_OK` (`*stop` set: the ring is now nearly full, stop the queue after this frame),
/// `VNET_E_BUSY` (not taken: stall the output queue until `restart`), or an error (drop the
/// frame).
///
/// # Safety
/// `d` is null or a live handle; `segs` points to `nsegs` entries; `headers` to
/// `headers_len` bytes; `stop` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_transmit(
    d: *mut VnetDevice,
    segs: *const VkSegment,
    nsegs: usize,
    flags: u32,
    mss: u32,
    headers: *const u8,
    headers_len: usize,
    token: usize,
    stop: *mut bool,
) -> i32 {
    if segs.is_null()
        || nsegs == 0
        || nsegs > VNET_TX_SEGMENTS_MAX as usize
        || (headers.is_null() && headers_len > 0)
    {
        return VNET_E_INVALID;
    }
    // SAFETY: caller contract.
    let src = unsafe { core::slice::from_raw_parts(segs, nsegs) };
    let hdrs = if headers_len == 0 {
        &[][..]
    } else {
        // SAFETY: caller contract.
        unsafe { core::slice::from_raw_parts(headers, headers_len) }
    };
    let turn = |i: &mut Inner, out: &mut Outbox| {
        if i.stopped || !i.enabled {
            return VNET_E_STOPPED;
        }
        let mut ev = VnetEvents::default();
        if let Err(e) = i.reclaim(out, &mut ev) {
            return status_of(e);
        }
        let off = match offload::tx_offload(hdrs, flags, mss) {
            Ok(o) => o,
            Err(_) => {
                i.tx_dropped += 1;
                return VNET_E_BAD_FRAME;
            }
        };
        // The shim's list as it is: `VkSegment` has `Segment`'s layout.
        let frame = as_segments(src);
        match i.drv.transmit(frame, &off, token) {
            Ok(st) => {
                if let Some(s) = {
                    // SAFETY: null or valid (C contract).
                    unsafe { stop.as_mut() }
                } {
                    *s = st.stop;
                }
                VNET_OK
            }
            Err(e) => {
                if e != NetError::Busy {
                    i.tx_dropped += 1;
                }
                status_of(e)
            }
        }
    };
    normal(d, |e| e.locked(turn).unwrap_or(VNET_E_LOCKED))
}

/// Reclaims transmitted frames and receives waiting ones, at most
/// [`VNET_FRAMES_PER_POLL`] (after `rx_more`); `*events` says what happened.
/// `VNET_E_LOCKED` (a debugger entry holds the driver) did nothing and sets `rx_more`: the
/// poll must be retried, since receive may be waiting on it.
///
/// # Safety
/// `d` is null or a live handle; `events` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_poll(d: *mut VnetDevice, events: *mut VnetEvents) -> i32 {
    let mut ev = VnetEvents::default();
    let missed = dev(d).map(|dv| &dv.missed_interrupts);
    let r = normal(d, |e| {
        let first = e.locked(|i, out| {
            // A plain load first: the locked swap only when an interrupt was missed (rarely;
            // this runs on every poll). SeqCst both: a load that reads 0 orders the same as
            // a swap that returned 0, and the interrupt that sets a bit later also sets
            // `rx_more`.
            let missed = missed
                .filter(|m| m.load(Ordering::SeqCst) != 0)
                .map_or(0, |m| m.swap(0, Ordering::SeqCst));
            let mut poll = true;
            for bit in (0..32).filter(|b| missed & (1 << b) != 0) {
                poll &= i.acknowledge(missed_vector(bit), &mut ev);
            }
            if poll {
                i.poll(out, &mut ev);
            }
            ev.link_up = i.drv.link_up().into();
            poll
        });
        match first {
            None => VNET_E_LOCKED,
            Some(poll) => {
                if poll {
                    e.more_rounds(&mut ev);
                }
                VNET_OK
            }
        }
    });
    if r == VNET_E_LOCKED {
        ev.rx_more = 1;
    }
    // SAFETY: null or valid (C contract).
    if let Some(o) = unsafe { events.as_mut() } {
        *o = ev;
    }
    r
}

/// The interrupt entry (the family calls it through the handler [`vnet_create`]
/// registered, which then passes `*events` to [`VnetCallbacks::events`]; `vector` is the
/// MSI-X index or -1 for INTx): link changes, transmit completions, received frames (at
/// most [`VNET_FRAMES_PER_POLL`]). Finding the driver held by a debugger entry, it notes
/// the interrupt and sets `rx_more`: the next [`vnet_poll`] acknowledges it (link and
/// configuration changes, NEEDS_RESET) and does the work it announced.
///
/// # Safety
/// `d` is null or a live handle; `events` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_interrupt(d: *mut VnetDevice, vector: i32, events: *mut VnetEvents) {
    let mut ev = VnetEvents::default();
    let r = normal(d, |e| {
        match e.locked(|i, out| i.interrupt(vector, out, &mut ev)) {
            None => VNET_E_LOCKED,
            Some(poll) => {
                if poll {
                    e.more_rounds(&mut ev);
                }
                VNET_OK
            }
        }
    });
    if r == VNET_E_LOCKED {
        if let Some(dv) = dev(d) {
            dv.missed_interrupts
                .fetch_or(missed_bit(vector), Ordering::SeqCst);
        }
        ev.rx_more = 1;
    }
    // SAFETY: null or valid (C contract).
    if let Some(o) = unsafe { events.as_mut() } {
        *o = ev;
    }
}

/// Promiscuous mode (CTRL_RX; without it the device filters nothing, so this succeeds).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_set_promiscuous(d: *mut VnetDevice, on: bool) -> i32 {
    with(d, |i| {
        if i.drv.features().bits() & f::CTRL_RX == 0 {
            return VNET_OK;
        }
        match i.drv.set_promisc(on) {
            Ok(()) => {
                i.promisc = on;
                VNET_OK
            }
            Err(e) => status_of(e),
        }
    })
}

/// The multicast filter: `count` 6-byte addresses at `addrs` (0: none). More than
/// [`VNET_MULTICAST_MAX`] switches to all-multicast. Without CTRL_RX the device filters
/// nothing, so this succeeds.
///
/// # Safety
/// `d` is null or a live handle; `addrs` points to `6 * count` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_set_multicast(
    d: *mut VnetDevice,
    addrs: *const u8,
    count: usize,
) -> i32 {
    if addrs.is_null() && count > 0 {
        return VNET_E_INVALID;
    }
    let raw = if count == 0 {
        &[][..]
    } else {
        let Some(n) = count.checked_mul(6) else {
            return VNET_E_INVALID;
        };
        // SAFETY: caller contract.
        unsafe { core::slice::from_raw_parts(addrs, n) }
    };
    with(d, |i| {
        if i.drv.features().bits() & f::CTRL_RX == 0 {
            return VNET_OK;
        }
        let all = count > MAC_TABLE_MAX;
        let mut table = [[0u8; 6]; MAC_TABLE_MAX];
        let mut n = 0;
        if !all {
            for (t, m) in table.iter_mut().zip(raw.chunks_exact(6)) {
                t.copy_from_slice(m);
                n += 1;
            }
        }
        let r = i
            .drv
            .set_allmulti(all)
            .and_then(|()| i.drv.set_mac_filter(&[], table.get(..n).unwrap_or(&[])));
        match r {
            Ok(()) => VNET_OK,
            Err(e) => status_of(e),
        }
    })
}

/// Sets the station address (CTRL_MAC_ADDR, or the config field on a legacy device).
///
/// # Safety
/// `d` is null or a live handle; `mac` points to 6 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_set_mac_address(d: *mut VnetDevice, mac: *const u8) -> i32 {
    if mac.is_null() {
        return VNET_E_INVALID;
    }
    let mut m = [0u8; 6];
    // SAFETY: caller contract: 6 readable bytes.
    m.copy_from_slice(unsafe { core::slice::from_raw_parts(mac, 6) });
    with(d, |i| match i.drv.set_mac_address(m) {
        Ok(()) => VNET_OK,
        Err(e) => status_of(e),
    })
}

/// Acknowledges an announce request ([`VnetEvents::announce`]) once the gratuitous
/// packets are sent (ANNOUNCE_ACK on the control queue, §5.1.6.5.4): the device then
/// clears its ANNOUNCE status bit. `VNET_E_UNSUPPORTED` without GUEST_ANNOUNCE.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_ack_announce(d: *mut VnetDevice) -> i32 {
    with(d, |i| {
        if i.stopped {
            return VNET_E_STOPPED;
        }
        match i.drv.ack_announce() {
            Ok(()) => VNET_OK,
            Err(e) => status_of(e),
        }
    })
}

/// The kernel debugger's polled send (`IOKernelDebugger` `sendPacket`): waits at most
/// `spins` polls for the debugger's transmit slot. `VNET_E_LOCKED` when the debugger
/// entered during a normal entry (drop the packet; KDP retries).
///
/// # Safety
/// `d` is null or a live handle; `frame` points to `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_debug_send(
    d: *mut VnetDevice,
    frame: *const u8,
    len: usize,
    spins: u32,
) -> i32 {
    if frame.is_null() || len == 0 {
        return VNET_E_INVALID;
    }
    // SAFETY: caller contract.
    let bytes = unsafe { core::slice::from_raw_parts(frame, len) };
    with(d, |i| {
        if i.stopped {
            return VNET_E_STOPPED;
        }
        match i.drv.debug_send(bytes, spins) {
            Ok(()) => VNET_OK,
            Err(e) => status_of(e),
        }
    })
}

/// The kernel debugger's polled receive (`receivePacket`): copies the next frame the stack
/// has not seen into `buf` (`cap` bytes), polling at most `spins` times. `VNET_OK` with
/// `*len` 0 when nothing arrived. The frame stays queued for the stack.
///
/// # Safety
/// `d` is null or a live handle; `buf` points to `cap` writable bytes; `len` is valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_debug_receive(
    d: *mut VnetDevice,
    buf: *mut u8,
    cap: usize,
    spins: u32,
    len: *mut usize,
) -> i32 {
    if buf.is_null() || len.is_null() {
        return VNET_E_INVALID;
    }
    // SAFETY: caller contract.
    unsafe { *len = 0 };
    // SAFETY: caller contract.
    let out = unsafe { core::slice::from_raw_parts_mut(buf, cap) };
    with(d, |i| {
        if i.stopped {
            return VNET_E_STOPPED;
        }
        match i.drv.debug_receive(out, spins) {
            Ok(n) => {
                // SAFETY: checked non-null above.
                unsafe { *len = n.unwrap_or(0) };
                VNET_OK
            }
            Err(e) => status_of(e),
        }
    })
}

/// Stops the device: unregisters the interrupt entry, resets the device and hands every
/// frame still in flight to `tx_done`. `VNET_OK` (also when already stopped),
/// `VNET_E_INVALID` for a null handle, or `VNET_E_LOCKED`: a debugger entry holds the
/// driver and nothing was done; retry after a
/// short delay. The caller runs on the work loop and KDP runs its entries with interrupts
/// off, so that entry is on another CPU, never beneath the caller: it ends by itself, and
/// waiting (bounded) for it cannot deadlock.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_stop(d: *mut VnetDevice) -> i32 {
    let Some(dv) = dev(d) else {
        return VNET_E_INVALID;
    };
    let family = dv.family;
    let turn = |i: &mut Inner, out: &mut Outbox| {
        if i.stopped {
            return;
        }
        // SAFETY: the family handle outlives this device (vnet_create contract).
        unsafe {
            virtio_kext_client::ffi::vfam_set_interrupt_handler(family, None, core::ptr::null_mut())
        };
        i.stopped = true;
        i.enabled = false;
        i.drv.shutdown(|token| out.complete(token));
    };
    normal(d, |e| e.locked(turn).map_or(VNET_E_LOCKED, |()| VNET_OK))
}

/// Polls of the transmit queue [`vnet_suspend`] spends waiting for frames in flight before
/// it resets the device (the kext has no clock to give the crate; QEMU finishes in one).
pub const VNET_SUSPEND_DRAIN_POLLS: u32 = 10_000;

/// System sleep (the controller's power state 0): transmit stops (sends answer
/// `VNET_E_BUSY`), frames in flight complete or are handed back to `tx_done` once each,
/// receive frames not yet delivered are dropped, and the device is reset: nothing of it
/// survives until [`vnet_resume`]. The shim stops its output queue first.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_suspend(d: *mut VnetDevice) -> i32 {
    let turn = |i: &mut Inner, out: &mut Outbox| {
        if i.stopped {
            return VNET_E_STOPPED;
        }
        match i
            .drv
            .suspend(VNET_SUSPEND_DRAIN_POLLS, |token| out.complete(token))
        {
            Ok(r) => {
                log::info!(
                    "VirtioNet: asleep ({} frames completed, {} handed back, {} receive frames dropped)",
                    r.tx_completed,
                    r.tx_reclaimed,
                    r.rx_dropped
                );
                VNET_OK
            }
            Err(e) => status_of(e),
        }
    };
    normal(d, |e| e.locked(turn).unwrap_or(VNET_E_LOCKED))
}

/// Wake (power state 1): the device is initialised from scratch (virtio keeps nothing
/// across a reset): the same features renegotiated, every queue rebuilt, receive buffers
/// posted, the MAC address, promiscuous/multicast filters and offloads replayed. `VNET_OK`
/// then the shim re-reads [`vnet_info`] (link, MTU) and restarts its output queue; an error
/// (the device no longer offers what it had: `VNET_E_DEVICE`) leaves it asleep and FAILED,
/// and resume may be retried. `VNET_OK` too, doing nothing, for a driver that is not
/// suspended (the shim's sleep found it held by a debugger entry and left it running).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_resume(d: *mut VnetDevice) -> i32 {
    with(d, |i| {
        if i.stopped {
            return VNET_E_STOPPED;
        }
        if !i.drv.is_suspended() {
            // Never suspended (the shim's sleep found the driver held by a debugger entry
            // for good): the device ran through the sleep and needs nothing.
            return VNET_OK;
        }
        match i.drv.resume() {
            Ok(r) => {
                if r.restore_failed > 0 {
                    log::warn!(
                        "VirtioNet: awake; {} settings the device refused to restore",
                        r.restore_failed
                    );
                }
                VNET_OK
            }
            Err(e) => {
                log::error!("VirtioNet: cannot wake the device: {e}");
                status_of(e)
            }
        }
    })
}

/// Frees the device (stopping it first if needed). A device [`vnet_stop`] still finds held
/// by a debugger entry is leaked instead, with its interrupt entry unregistered: freeing
/// it would pull the memory from under that entry.
///
/// # Safety
/// `d` is null or a handle from [`vnet_create`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vnet_destroy(d: *mut VnetDevice) {
    let Some(dv) = dev(d) else { return };
    // SAFETY: live handle (caller contract).
    if unsafe { vnet_stop(d) } == VNET_E_LOCKED {
        // SAFETY: the family handle outlives this device (vnet_create contract); the handler
        // slot is the family's, written and read on the work loop the caller runs on, so
        // no interrupt is delivered through it meanwhile; the debugger entry never reads it.
        unsafe {
            virtio_kext_client::ffi::vfam_set_interrupt_handler(
                dv.family,
                None,
                core::ptr::null_mut(),
            )
        };
        log::error!("VirtioNet: still held by a debugger entry; leaked rather than freed");
        return;
    }
    // SAFETY: from Box::into_raw in vnet_create, dropped once (caller contract).
    drop(unsafe { Box::from_raw(d) });
}

/// Routes `log` to `IOLog` (call once from the kext's start; a no-op in host builds),
/// except with interrupts off: the debugger entries must not call IOLog with the machine
/// stopped.
#[unsafe(no_mangle)]
pub extern "C" fn vnet_log_init() {
    #[cfg(feature = "kext")]
    {
        static LOGGER: virtio_kext_abi::kernel::IoLogger = virtio_kext_abi::kernel::IoLogger {
            name: "VirtioNet",
            level: log::LevelFilter::Info,
        };
        virtio_kext_abi::kernel::init_logging(&LOGGER);
    }
}
