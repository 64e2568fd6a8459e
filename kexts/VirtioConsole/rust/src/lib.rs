//! `VirtioConsole.kext`'s Rust half: `virtio-console`'s [`VirtioConsole`] over the family's
//! bus, and the serial-port semantics IOSerialFamily expects of an `IOSerialDriverSync`.
//!
//! The C++ shim (`kexts/VirtioConsole/shim/`) is an `IOSerialDriverSync` on the family's nub
//! (`VirtioDeviceType` 3). For every port this crate asks it to publish, the shim attaches
//! an `IORS232SerialStreamSync` nub whose refCon is the port's *key*, so
//! `IOSerialBSDClient` creates `/dev/tty.<name>` and `/dev/cu.<name>`; each of the nub's
//! calls comes back here as a `vcon_port_*` function with that key.
//!
//! - Names ([`vcon_port_info`]): port 0 is `virtio` (`/dev/tty.virtio`); a named port is its
//!   PORT_NAME (`/dev/tty.org.qemu.guest_agent.0`); an unnamed one is `virtio<id>`.
//! - Publication: port 0 and named ports as soon as they are known; an unnamed port waits
//!   for its PORT_NAME or CONSOLE_PORT until [`VCON_SETTLE_MS`] after it was added
//!   ([`VconCallbacks::schedule_settle`] → [`vcon_settle`]), so a name that follows
//!   PORT_ADD (QEMU sends it after PORT_READY) does not publish a port twice.
//! - PORT_ADD / PORT_REMOVE at run time publish and withdraw nubs; a key is never reused
//!   (generation in the high bits), so a session on a withdrawn nub gets
//!   [`VCON_E_OFFLINE`] and never touches the port that replaced it.
//! - PD_E_ACTIVE (the tty's open and last close) → PORT_OPEN 1 / 0 to the host; the host's
//!   PORT_OPEN → carrier (`PD_RS232_S_CAR`), so `/dev/tty.*` opens wait for the host side
//!   and `/dev/cu.*` do not.
//! - Flow control is the ring's backpressure: [`vcon_port_enqueue_data`] takes what fits
//!   in free transmit slots (TXQ_FULL otherwise, cleared by the transmit interrupt);
//!   receive buffers go back to the device only once the tty has read them.
//! - Resize (RESIZE, or SIZE's config change for port 0) → [`VconCallbacks::resized`].
//! - Emergency write ([`vcon_emergency_write`], and the start banner written between
//!   FEATURES_OK and DRIVER_OK) when EMERG_WRITE is negotiated.
//! - Sleep and wake ([`vcon_suspend`], [`vcon_resume`]), DEVICE_NEEDS_RESET and a device
//!   fault on any queue (a data queue's, or the control queue's: without the control queue
//!   no PORT_ADD, PORT_REMOVE, PORT_OPEN or PORT_NAME would be heard again): the device is
//!   reset and brought up again; published ports and their sessions stay (their sleepers
//!   are woken when the device adds them again), and a port the device does not add again
//!   within the settle time is withdrawn. A fault found while computing a port's state word
//!   (a completion that breaks a data queue) recovers too. At most
//!   [`VCON_MAX_RECOVERIES`] recoveries in a row (each before the device stayed up for
//!   [`VCON_STABLE_SETTLES`] settle times after the last): past that the device stays down
//!   until the next wake, which brings it up from scratch, and every port is withdrawn,
//!   its sleepers woken.
//!
//! Threading: the shim calls everything under its command gate on the family's work loop,
//! where the family delivers interrupts, so a handle is never used concurrently. Callbacks
//! run at the end of the call that caused them, once this crate is done with the device,
//! so they may call back in. Memory is allocated only when a driver is brought up; nothing
//! here panics on device or caller input.
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
#[cfg(test)]
extern crate std;

mod serial;

use alloc::boxed::Box;
use core::ffi::{c_char, c_void};
use core::fmt::Write as _;

use serial::{Levels, SerialError, SerialPort, Step, pd};
use virtio_console::{
    ConsoleError, ConsoleEvent, ConsoleOptions, ConsoleStats, MAX_PORTS, PortName, VirtioConsole,
};
use virtio_core::Error;
use virtio_kext_abi::vector_from_abi;
use virtio_kext_client::{FamilyBus, VfamDevice};

/// Done.
pub const VCON_OK: i32 = 0;
/// Not done yet: sleep until the port's state changes ([`VconCallbacks::state_changed`])
/// and call again (partial transfers are counted in `*count`).
pub const VCON_WAIT: i32 = 1;
/// A null pointer or handle.
pub const VCON_E_INVALID: i32 = 2;
/// The device could not be brought up, or broke (it is being recovered).
pub const VCON_E_DEVICE: i32 = 3;
/// Stopped: no device.
pub const VCON_E_STOPPED: i32 = 4;
/// The key names no published port (withdrawn, or never published): `kIOReturnOffline`.
pub const VCON_E_OFFLINE: i32 = 5;
/// Another session holds the port: `kIOReturnExclusiveAccess`.
pub const VCON_E_BUSY: i32 = 6;
/// Not acquired, or not active for a transmit: `kIOReturnNotOpen`.
pub const VCON_E_NOT_OPEN: i32 = 7;
/// Not active for a receive or a wait (closed under the caller): `kIOReturnIOError`.
pub const VCON_E_INACTIVE: i32 = 8;
/// An event or state bit the port does not know: `kIOReturnBadArgument`.
pub const VCON_E_BAD_ARGUMENT: i32 = 9;

/// How long an unnamed port waits for its name before it is published, and how long after
/// a wake or recovery the device has to add its ports again before the missing ones are
/// withdrawn.
pub const VCON_SETTLE_MS: u32 = 250;
/// Size of [`VconPortInfo::base_name`] (a port name is at most 127 bytes, plus NUL).
pub const VCON_NAME_CAP: usize = 128;
/// Size of [`VconPortInfo::suffix`].
pub const VCON_SUFFIX_CAP: usize = 8;

/// Ports served (the driver's limit).
const PORTS: usize = MAX_PORTS as usize;
/// A key's low bits: the port id.
const KEY_ID_BITS: u32 = 8;
/// Events handled per interrupt: every port's add, name, console, open and resize plus
/// slack. More wait for the next interrupt (the device's messages stay in the ring).
const EVENT_BUDGET: usize = 5 * PORTS + 32;
/// Recoveries in a row the device gets: a recovery before the device has stayed up for
/// [`VCON_STABLE_SETTLES`] settle times ([`VCON_SETTLE_MS`] each, 5 s) since the last one
/// counts towards this; one more fault leaves the device down (reset, every port
/// withdrawn) until the next wake. A device that breaks on every bring-up would otherwise
/// be reset on every interrupt and settle, its ports flapping for ever; one that breaks
/// less often than every 5 s is reset each time.
pub const VCON_MAX_RECOVERIES: u32 = 4;
/// Settle times the device must stay up after a recovery before the recoveries before it
/// stop counting as in a row (see [`VCON_MAX_RECOVERIES`]).
pub const VCON_STABLE_SETTLES: u32 = 20;

/// The shim's callbacks; `ctx` is passed back unchanged (the shim's driver object). Each
/// may be null.
///
/// - `publish`: attach a serial nub for the port with this key (names from
///   [`vcon_port_info`]) and register it;
/// - `unpublish`: terminate that key's nub (its sessions get [`VCON_E_OFFLINE`]);
/// - `state_changed`: the port's state word changed: wake whoever sleeps on the port
///   (port id = `key & 0xff`);
/// - `resized`: the host's terminal size for the port;
/// - `schedule_settle`: call [`vcon_settle`] in `ms` milliseconds.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VconCallbacks {
    pub ctx: *mut c_void,
    pub publish: Option<unsafe extern "C" fn(ctx: *mut c_void, key: u32)>,
    pub unpublish: Option<unsafe extern "C" fn(ctx: *mut c_void, key: u32)>,
    pub state_changed: Option<unsafe extern "C" fn(ctx: *mut c_void, key: u32)>,
    pub resized: Option<unsafe extern "C" fn(ctx: *mut c_void, key: u32, cols: u16, rows: u16)>,
    pub schedule_settle: Option<unsafe extern "C" fn(ctx: *mut c_void, ms: u32)>,
}

/// One port as the shim publishes it.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VconPortInfo {
    pub id: u32,
    /// `IOTTYBaseName`, NUL-terminated: `virtio`, or the port's name (characters other
    /// than letters, digits, `.`, `_` and `-` replaced by `_`, as they become a /dev name).
    pub base_name: [c_char; VCON_NAME_CAP],
    /// `IOTTYSuffix`, NUL-terminated: empty, or the id of an unnamed port other than 0.
    pub suffix: [c_char; VCON_SUFFIX_CAP],
    /// The device's PORT_NAME as sent, NUL-terminated (empty: none).
    pub port_name: [c_char; VCON_NAME_CAP],
    pub console: bool,
    /// The host side is connected.
    pub host_open: bool,
    /// A tty session has the port open (PORT_OPEN 1 sent).
    pub guest_open: bool,
    pub has_size: bool,
    pub cols: u16,
    pub rows: u16,
}

/// Counters for the IORegistry (`Statistics`), over the device's whole life.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VconStats {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub rx_dropped_bytes: u64,
    pub tx_busy: u64,
    pub control_rx: u64,
    pub control_tx: u64,
    pub control_rejected: u64,
    pub emergency_bytes: u64,
    pub bad_tokens: u64,
    pub interrupts: u64,
    pub recoveries: u64,
    pub suspends: u64,
    /// Ports published now.
    pub ports: u64,
    /// Publications so far (renames and re-adds included).
    pub publications: u64,
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum Publication {
    Absent,
    /// Added, waiting for a name or the settle time.
    Pending,
    Published(u32),
}

#[derive(Copy, Clone)]
struct Slot {
    publication: Publication,
    /// The device has the port (PORT_ADD, not removed).
    present: bool,
    /// Added again since the last bring-up (wake, recovery).
    seen: bool,
    name: Option<PortName>,
    console: bool,
    carrier: bool,
    size: Option<(u16, u16)>,
    serial: SerialPort,
}

impl Slot {
    const EMPTY: Slot = Slot {
        publication: Publication::Absent,
        present: false,
        seen: false,
        name: None,
        console: false,
        carrier: false,
        size: None,
        serial: SerialPort::DEFAULT,
    };

    fn key(&self) -> Option<u32> {
        match self.publication {
            Publication::Published(k) => Some(k),
            _ => None,
        }
    }
}

/// Callback calls collected during one entry point and made at its end.
#[derive(Copy, Clone)]
struct Notes {
    unpublish: [u32; PORTS],
    publish: [u32; PORTS],
    state: [u32; PORTS],
    resized: [Option<(u32, u16, u16)>; PORTS],
    settle: bool,
    any: bool,
}

impl Notes {
    const NONE: Notes = Notes {
        unpublish: [0; PORTS],
        publish: [0; PORTS],
        state: [0; PORTS],
        resized: [None; PORTS],
        settle: false,
        any: false,
    };
}

/// One virtio console device (opaque to C).
pub struct VconDevice {
    /// `None` while asleep, stopped, or after a failed bring-up.
    drv: Option<VirtioConsole<FamilyBus>>,
    family: *mut VfamDevice,
    cb: VconCallbacks,
    opts: ConsoleOptions,
    multiport: bool,
    slots: [Slot; PORTS],
    generation: u32,
    /// After a bring-up with MULTIPORT: ports not re-added by the settle are withdrawn.
    resync: bool,
    notes: Box<Notes>,
    past: ConsoleStats,
    interrupts: u64,
    recoveries: u64,
    /// Recoveries since the device last stayed up for [`VCON_STABLE_SETTLES`] settle times.
    recent_recoveries: u32,
    /// Settles since the last recovery (each recovery schedules one, and each settle the
    /// next while `recent_recoveries` is not 0).
    settles_since_recovery: u32,
    suspends: u64,
    publications: u64,
    asleep: bool,
    stopped: bool,
}

fn dev<'a>(p: *mut VconDevice) -> Option<&'a mut VconDevice> {
    // SAFETY: a non-null handle comes from `vcon_create` and stays valid until
    // `vcon_destroy`; the shim serialises every call on its work loop.
    unsafe { p.as_mut() }
}

/// The family calls this (registered by [`vcon_create`]) from its interrupt actions.
unsafe extern "C" fn family_interrupt(ctx: *mut c_void, vector: i32) {
    // SAFETY: ctx is the VconDevice registered in vcon_create and unregistered (on the same
    // work loop) before it is freed.
    unsafe { vcon_interrupt(ctx.cast(), vector) }
}

/// The console's driver options: the crate's defaults (8 receive and 8 transmit buffers of
/// 1 KiB per port), every port up to the driver's limit.
fn options() -> ConsoleOptions {
    ConsoleOptions {
        max_ports: MAX_PORTS,
        // The tty's open is what opens a port: not at bring-up.
        auto_open_console: false,
        ..ConsoleOptions::default()
    }
}

/// Text formatted into a fixed buffer (no allocation): what does not fit is cut.
struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    fn new() -> Self {
        StackText {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl<const N: usize> core::fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// A line for the host before DRIVER_OK, through EMERG_WRITE (no queues needed).
fn emergency_line(drv: &mut VirtioConsole<FamilyBus>, args: core::fmt::Arguments<'_>) {
    let mut line = StackText::<160>::new();
    let _ = line.write_fmt(args);
    let _ = line.write_str("\r\n");
    let _ = drv.emergency_write(line.as_bytes());
}

/// A driver over the family handle `family` (the device is reset and initialised from
/// scratch), with `banner` written through EMERG_WRITE before DRIVER_OK.
fn bring_up(
    family: *mut VfamDevice,
    opts: ConsoleOptions,
    banner: Option<&str>,
) -> Result<VirtioConsole<FamilyBus>, ConsoleError> {
    // SAFETY: `family` is the live handle given to vcon_create, which outlives the device
    // (vcon_create contract); the previous driver over it, if any, was shut down.
    let bus = unsafe { FamilyBus::new(family) }.ok_or(ConsoleError::Core(Error::Unsupported))?;
    let mut drv = VirtioConsole::new(bus, opts)?;
    if let Some(b) = banner
        && drv.has_emergency_write()
    {
        let (features, ports) = (drv.features().bits(), drv.max_ports());
        emergency_line(
            &mut drv,
            format_args!("{b}: features {features:#x}, {ports} port(s)"),
        );
    }
    // A failed start drops `drv`, which resets the device and frees what it allocated.
    drv.start()?;
    Ok(drv)
}

/// A driver query's answer, with only device faults ([`ConsoleError::Core`],
/// [`ConsoleError::Device`]) kept as errors: any other (the port is gone on the driver's
/// side, say) reads as 0, as the port's slot decides what it is.
fn device_fault(r: Result<usize, ConsoleError>) -> Result<usize, ConsoleError> {
    match r {
        Ok(n) => Ok(n),
        Err(e @ (ConsoleError::Core(_) | ConsoleError::Device(_))) => Err(e),
        Err(_) => Ok(0),
    }
}

fn add_stats(a: &mut ConsoleStats, b: ConsoleStats) {
    a.tx_bytes += b.tx_bytes;
    a.tx_chains += b.tx_chains;
    a.tx_busy += b.tx_busy;
    a.rx_bytes += b.rx_bytes;
    a.rx_dropped_bytes += b.rx_dropped_bytes;
    a.control_rx += b.control_rx;
    a.control_tx += b.control_tx;
    a.control_rejected += b.control_rejected;
    a.control_tx_dropped += b.control_tx_dropped;
    a.emergency_bytes += b.emergency_bytes;
    a.config_changes += b.config_changes;
    a.bad_tokens += b.bad_tokens;
    a.events_lost += b.events_lost;
}

impl VconDevice {
    fn slot(&mut self, id: u32) -> Option<&mut Slot> {
        self.slots.get_mut(id as usize)
    }

    /// The slot a key names, if that key is the port's current publication.
    fn by_key(&mut self, key: u32) -> Result<(u32, &mut Slot), i32> {
        let id = key & ((1 << KEY_ID_BITS) - 1);
        match self.slots.get_mut(id as usize) {
            Some(s) if key != 0 && s.publication == Publication::Published(key) => Ok((id, s)),
            _ => Err(VCON_E_OFFLINE),
        }
    }

    fn tx_capacity(&self) -> u32 {
        u32::from(self.opts.tx_buffers).saturating_mul(self.opts.tx_buffer_size)
    }

    fn rx_capacity(&self) -> u32 {
        u32::from(self.opts.rx_buffers).saturating_mul(self.opts.rx_buffer_size)
    }

    /// Queue levels and carrier of port `id` now (collecting completed buffers). A device
    /// fault found on the way (a completion that breaks a data queue) is returned, never
    /// read as an empty or full queue: a word saying TXQ_FULL or RXQ_EMPTY because of it
    /// would put a transfer to sleep that nothing wakes (the broken queue interrupts no
    /// more, and every later look fails the same way).
    fn levels(&mut self, id: u32) -> Result<Levels, ConsoleError> {
        let (tx_cap, rx_cap, multiport) = (self.tx_capacity(), self.rx_capacity(), self.multiport);
        let present = self.slot(id).is_some_and(|s| s.present);
        let carrier = self.slot(id).is_some_and(|s| s.carrier || !multiport);
        let (mut rx_pending, mut tx_in_flight) = (0, 0);
        if present && let Some(drv) = self.drv.as_mut() {
            rx_pending = device_fault(drv.rx_pending(id))?.min(rx_cap as usize) as u32;
            let room = device_fault(drv.tx_room(id))?.min(tx_cap as usize) as u32;
            tx_in_flight = tx_cap - room;
        }
        Ok(Levels {
            rx_pending,
            rx_capacity: rx_cap,
            tx_in_flight,
            tx_capacity: tx_cap,
            carrier,
        })
    }

    /// Recomputes port `id`'s state word; a change wakes its sleepers. A device fault is
    /// returned and the word left as it was: entry points recover ([`VconDevice::fault`]
    /// via [`VconDevice::refresh_or_recover`]).
    fn try_refresh(&mut self, id: u32) -> Result<(), ConsoleError> {
        let l = self.levels(id)?;
        let Some(s) = self.slots.get_mut(id as usize) else {
            return Ok(());
        };
        if s.serial.update(l)
            && let Some(k) = s.key()
        {
            self.note_state(id, k);
        }
        Ok(())
    }

    /// [`VconDevice::try_refresh`] inside a bring-up or an event, where recovering would
    /// recurse: a fault is left where it is (a broken queue stays broken) for the entry
    /// point that called, or the next transfer or interrupt, to find and recover from.
    fn refresh(&mut self, id: u32) {
        if let Err(e) = self.try_refresh(id) {
            log::warn!("VirtioConsole: port {id}: {e}");
        }
    }

    /// [`VconDevice::try_refresh`] from an entry point: a device fault recovers (resets
    /// the device; every port's sleepers are woken as it comes back, or as it is
    /// withdrawn) and gives [`VconDevice::fault`]'s status.
    fn refresh_or_recover(&mut self, id: u32) -> Result<(), i32> {
        match self.try_refresh(id) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fault(e)),
        }
    }

    fn note_state(&mut self, id: u32, key: u32) {
        if let Some(n) = self.notes.state.get_mut(id as usize) {
            *n = key;
            self.notes.any = true;
        }
    }

    fn publish(&mut self, id: u32) {
        self.generation = (self.generation + 1) & 0x00ff_ffff;
        if self.generation == 0 {
            self.generation = 1;
        }
        let key = (self.generation << KEY_ID_BITS) | id;
        let Some(s) = self.slots.get_mut(id as usize) else {
            return;
        };
        s.publication = Publication::Published(key);
        s.serial.reset();
        self.publications += 1;
        if let Some(n) = self.notes.publish.get_mut(id as usize) {
            *n = key;
            self.notes.any = true;
        }
        self.refresh(id);
    }

    /// Withdraws port `id`'s nub: its sessions wake and get `VCON_E_OFFLINE`.
    fn withdraw(&mut self, id: u32) {
        let Some(s) = self.slots.get_mut(id as usize) else {
            return;
        };
        let old = s.key();
        s.publication = Publication::Absent;
        let was_active = s.serial.active();
        s.serial.reset();
        // The notes say what the shim has → what it must have: per id, unpublish the nub it
        // was given and publish the current key. Several withdrawals and publications may
        // fall between two flushes (remove/add/remove, rename then remove).
        if let Some(k) = old {
            let undelivered = match self.notes.publish.get_mut(id as usize) {
                Some(p) if *p == k => {
                    *p = 0;
                    true
                }
                _ => false,
            };
            // Published since the last flush: the shim never had it (no nub, no sleepers),
            // so it hears of neither. Otherwise `k` is the nub the shim has; a later key
            // must not replace it in the note, or the shim (which checks keys) keeps it.
            if !undelivered {
                if let Some(n) = self.notes.unpublish.get_mut(id as usize)
                    && *n == 0
                {
                    *n = k;
                }
                self.note_state(id, k);
            }
            self.notes.any = true;
        }
        if was_active && let Some(drv) = self.drv.as_mut() {
            // Best effort: the port may be gone on the device side already.
            let _ = drv.open_port(id, false);
        }
    }

    fn schedule_settle(&mut self) {
        self.notes.settle = true;
        self.notes.any = true;
    }

    /// Handles what the device said on the control queue (and config changes). Returns
    /// the error that broke the control queues, if one did: the caller recovers (resets
    /// the device), as from a fault of a data queue, or no PORT_ADD, PORT_REMOVE,
    /// PORT_OPEN or PORT_NAME would be heard again, nor the driver's PORT_READY and
    /// PORT_OPEN, until the next wake.
    fn handle_events(&mut self) -> Result<(), ConsoleError> {
        for _ in 0..EVENT_BUDGET {
            let Some(ev) = self.drv.as_mut().and_then(|d| d.next_event()) else {
                break;
            };
            self.handle_event(ev);
        }
        match self.drv.as_ref().and_then(|d| d.control_error()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn handle_event(&mut self, ev: ConsoleEvent) {
        match ev {
            ConsoleEvent::PortAdded { id, name } => {
                let Some(s) = self.slot(id) else { return };
                s.present = true;
                s.seen = true;
                if name.is_some() {
                    s.name = name;
                }
                match s.publication {
                    Publication::Published(_) => {
                        // Added again after a wake or a recovery: same nub, same session;
                        // an open tty reopens the port on the host side.
                        if s.serial.active()
                            && let Some(drv) = self.drv.as_mut()
                        {
                            let _ = drv.open_port(id, true);
                        }
                        self.came_back(id);
                    }
                    _ if id == 0 || name.is_some() => self.publish(id),
                    _ => {
                        s.publication = Publication::Pending;
                        self.schedule_settle();
                    }
                }
            }
            ConsoleEvent::PortNamed { id, name } => {
                let Some(s) = self.slot(id) else { return };
                let renamed = s.name != Some(name);
                s.name = Some(name);
                match s.publication {
                    Publication::Pending => self.publish(id),
                    // A new name for a published port other than 0 (always `virtio`):
                    // republished under it unless a session has it open.
                    Publication::Published(_) if renamed && id != 0 => {
                        if s.serial.acquired() {
                            log::warn!(
                                "VirtioConsole: port {id} renamed to {name} while open; keeping its old node until it is closed and re-added"
                            );
                        } else {
                            self.withdraw(id);
                            self.publish(id);
                        }
                    }
                    _ => {}
                }
            }
            ConsoleEvent::PortRemoved { id } => {
                self.withdraw(id);
                if let Some(s) = self.slot(id) {
                    *s = Slot::EMPTY;
                }
            }
            ConsoleEvent::HostOpened { id } | ConsoleEvent::HostClosed { id } => {
                let open = matches!(ev, ConsoleEvent::HostOpened { .. });
                if let Some(s) = self.slot(id) {
                    s.carrier = open;
                }
                self.refresh(id);
            }
            ConsoleEvent::ConsolePort { id } => {
                let Some(s) = self.slot(id) else { return };
                s.console = true;
                if s.publication == Publication::Pending {
                    self.publish(id);
                }
            }
            ConsoleEvent::Resize { id, cols, rows } => {
                let Some(s) = self.slot(id) else { return };
                s.size = Some((cols, rows));
                if let (Some(k), Some(n)) = (s.key(), self.notes.resized.get_mut(id as usize)) {
                    *n = Some((k, cols, rows));
                    self.notes.any = true;
                }
            }
            ConsoleEvent::Rejected { id, error } => {
                log::warn!("VirtioConsole: control message for port {id} refused: {error}");
            }
        }
    }
}

impl VconDevice {
    /// Resets the device and frees its buffers, keeping the driver's counters.
    fn shut_down(&mut self) {
        if let Some(mut drv) = self.drv.take() {
            add_stats(&mut self.past, drv.stats());
            drv.shutdown();
        }
        for s in &mut self.slots {
            s.present = false;
            s.seen = false;
        }
    }

    /// Brings a driver up again (wake, recovery): published ports stay; with MULTIPORT the
    /// device adds its ports again after DEVICE_READY and those it does not add within the
    /// settle time are withdrawn.
    fn bring_back(&mut self) -> Result<(), ConsoleError> {
        let drv = bring_up(self.family, self.opts, None)?;
        self.multiport = drv.multiport();
        self.drv = Some(drv);
        if self.multiport {
            self.resync = true;
            self.schedule_settle();
            // Broken again at once: the error stays with the driver and the next
            // `handle_events` (an interrupt, or the settle scheduled above) recovers, so a
            // recovery never recurses.
            let _ = self.handle_events();
        } else {
            let size = self.drv.as_ref().and_then(|c| c.console_size());
            let mut published = true;
            if let Some(s0) = self.slot(0) {
                s0.present = true;
                s0.seen = true;
                s0.size = size;
                published = s0.key().is_some();
            }
            if published {
                self.came_back(0);
            } else {
                // Withdrawn when the device was left down (`give_up`): the only port of a
                // device without MULTIPORT comes back with the device, as at create.
                self.publish(0);
            }
        }
        for id in 0..PORTS as u32 {
            self.refresh(id);
        }
        Ok(())
    }

    /// A published port is usable again (added again after a wake or a recovery): its
    /// sleepers are woken even when its state word did not change. A transfer told to
    /// wait while the port was away (`data_ready` false: the word said nothing about it)
    /// would otherwise sleep until some later change.
    fn came_back(&mut self, id: u32) {
        self.refresh(id);
        if let Some(k) = self.slot(id).and_then(|s| s.key()) {
            self.note_state(id, k);
        }
    }

    /// After a device fault: reset and bring up again (data in flight is lost: the device
    /// is untrusted once it broke the protocol). Bounded: past [`VCON_MAX_RECOVERIES`] in a
    /// row (see there), or when the device does not come back, it is left down
    /// ([`VconDevice::give_up`]).
    fn recover(&mut self, why: &dyn core::fmt::Display) {
        self.shut_down();
        if self.recent_recoveries >= VCON_MAX_RECOVERIES {
            log::error!(
                "VirtioConsole: device fault ({why}) after {VCON_MAX_RECOVERIES} recoveries in a row; leaving the device down and withdrawing its ports"
            );
            self.give_up();
            return;
        }
        log::warn!("VirtioConsole: device fault ({why}); resetting it");
        self.recoveries += 1;
        self.recent_recoveries += 1;
        self.settles_since_recovery = 0;
        // Whatever MULTIPORT says: the settles measure how long the device stays up.
        self.schedule_settle();
        if let Err(e) = self.bring_back() {
            log::error!("VirtioConsole: the device did not come back: {e}; withdrawing its ports");
            self.shut_down();
            self.give_up();
        }
    }

    /// Leaves the device down (reset, no driver: interrupts and settles do nothing) and
    /// withdraws every port, as a settle would withdraw ports the device did not add again:
    /// sessions on them, asleep in a transfer or a wait, wake and get [`VCON_E_OFFLINE`].
    /// A wake ([`vcon_resume`]) brings it up from scratch.
    fn give_up(&mut self) {
        self.resync = false;
        for id in 0..PORTS as u32 {
            if self.slot(id).is_some_and(|s| s.key().is_some()) {
                self.withdraw(id);
            }
            if let Some(s) = self.slot(id) {
                *s = Slot::EMPTY;
            }
        }
    }

    /// A driver call failed: recover from a device fault, and say so.
    fn fault(&mut self, e: ConsoleError) -> i32 {
        match e {
            ConsoleError::Core(_) | ConsoleError::Device(_) => {
                self.recover(&e);
                VCON_E_DEVICE
            }
            _ => VCON_E_OFFLINE,
        }
    }

    /// Port `id`'s state word (0 for an id beyond the slots).
    fn state_of(&self, id: u32) -> u32 {
        self.slots.get(id as usize).map_or(0, |s| s.serial.state())
    }

    /// Port `id` is usable for data: present on the device, driver live.
    fn data_ready(&self, id: u32) -> bool {
        !self.asleep && self.drv.is_some() && self.slots.get(id as usize).is_some_and(|s| s.present)
    }
}

/// Makes the callback calls collected in `d.notes`, after the call that caused them is
/// done with the device (a callback may call back in; what it causes is made too, within a
/// bound).
fn flush(p: *mut VconDevice) {
    for _ in 0..4 {
        let Some(d) = dev(p) else { return };
        if !d.notes.any {
            return;
        }
        let notes = core::mem::replace(&mut *d.notes, Notes::NONE);
        let cb = d.cb;
        // `d` is not used past this point: the callbacks may re-enter through the handle.
        for &k in notes.unpublish.iter().filter(|&&k| k != 0) {
            if let Some(f) = cb.unpublish {
                // SAFETY: the shim's callback with its own context.
                unsafe { f(cb.ctx, k) };
            }
        }
        for &k in notes.publish.iter().filter(|&&k| k != 0) {
            if let Some(f) = cb.publish {
                // SAFETY: as above.
                unsafe { f(cb.ctx, k) };
            }
        }
        for &(k, cols, rows) in notes.resized.iter().flatten() {
            if let Some(f) = cb.resized {
                // SAFETY: as above.
                unsafe { f(cb.ctx, k, cols, rows) };
            }
        }
        for &k in notes.state.iter().filter(|&&k| k != 0) {
            if let Some(f) = cb.state_changed {
                // SAFETY: as above.
                unsafe { f(cb.ctx, k) };
            }
        }
        if notes.settle
            && let Some(f) = cb.schedule_settle
        {
            // SAFETY: as above.
            unsafe { f(cb.ctx, VCON_SETTLE_MS) };
        }
    }
}

/// Runs `f` on a live handle and makes the callbacks it caused.
fn with_dev(p: *mut VconDevice, f: impl FnOnce(&mut VconDevice) -> i32) -> i32 {
    let Some(d) = dev(p) else {
        return VCON_E_INVALID;
    };
    let r = f(d);
    flush(p);
    r
}

fn serial_status(e: SerialError) -> i32 {
    match e {
        SerialError::Busy => VCON_E_BUSY,
        SerialError::NotOpen => VCON_E_NOT_OPEN,
        SerialError::Inactive => VCON_E_INACTIVE,
        SerialError::BadArgument => VCON_E_BAD_ARGUMENT,
    }
}

fn step_status(r: Result<Step, SerialError>) -> i32 {
    match r {
        Ok(Step::Done) => VCON_OK,
        Ok(Step::Wait) => VCON_WAIT,
        Err(e) => serial_status(e),
    }
}

/// Brings up the console device behind the family handle `family` (the nub's
/// `virtioDevice()`): negotiates features, writes a start banner through EMERG_WRITE
/// before DRIVER_OK when offered, sets up every port's queues, and registers the interrupt
/// entry with the family. Port 0 is published at once without MULTIPORT; with it, ports
/// are published as the device adds them. Returns the handle in `*out`.
///
/// # Safety
/// `family` is a live family handle that outlives the returned device; `callbacks` points
/// to valid callbacks whose `ctx` stays valid until [`vcon_destroy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_create(
    family: *mut VfamDevice,
    callbacks: *const VconCallbacks,
    out: *mut *mut VconDevice,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(o) = (unsafe { out.as_mut() }) else {
        return VCON_E_INVALID;
    };
    *o = core::ptr::null_mut();
    // SAFETY: null or valid (C contract).
    let Some(cb) = (unsafe { callbacks.as_ref() }).copied() else {
        return VCON_E_INVALID;
    };
    if family.is_null() {
        return VCON_E_INVALID;
    }
    let opts = options();
    let drv = match bring_up(family, opts, Some("VirtioConsole: starting")) {
        Ok(d) => d,
        Err(e) => {
            log::error!("VirtioConsole: device setup failed: {e}");
            return VCON_E_DEVICE;
        }
    };
    let multiport = drv.multiport();
    let d = Box::new(VconDevice {
        drv: Some(drv),
        family,
        cb,
        opts,
        multiport,
        slots: [Slot::EMPTY; PORTS],
        generation: 0,
        resync: false,
        notes: Box::new(Notes::NONE),
        past: ConsoleStats::default(),
        interrupts: 0,
        recoveries: 0,
        recent_recoveries: 0,
        settles_since_recovery: 0,
        suspends: 0,
        publications: 0,
        asleep: false,
        stopped: false,
    });
    let raw = Box::into_raw(d);
    if let Some(d) = dev(raw) {
        if multiport {
            // DEVICE_READY went out in start; PORT_ADDs the device already sent are here.
            if let Err(e) = d.handle_events() {
                d.recover(&e);
            }
        } else {
            let size = d.drv.as_ref().and_then(|c| c.console_size());
            if let Some(s0) = d.slot(0) {
                s0.present = true;
                s0.seen = true;
                s0.size = size;
                d.publish(0);
            }
        }
    }
    // SAFETY: live family handle; the context is the boxed device, unregistered in
    // vcon_stop (which vcon_destroy runs) before it is freed.
    unsafe {
        virtio_kext_client::ffi::vfam_set_interrupt_handler(
            family,
            Some(family_interrupt),
            raw.cast(),
        )
    };
    *o = raw;
    flush(raw);
    VCON_OK
}

/// The interrupt entry (the family calls it through the handler [`vcon_create`]
/// registered; `vector` is the MSI-X index or -1 for INTx): control messages, received
/// and transmitted data, config changes, DEVICE_NEEDS_RESET.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_interrupt(d: *mut VconDevice, vector: i32) {
    with_dev(d, |d| {
        if d.stopped || d.asleep {
            return VCON_OK;
        }
        let Some(drv) = d.drv.as_mut() else {
            return VCON_OK;
        };
        d.interrupts += 1;
        let r = drv.handle_interrupt(vector_from_abi(vector));
        if r.needs_reset {
            d.recover(&"DEVICE_NEEDS_RESET");
            return VCON_OK;
        }
        if let Err(e) = d.handle_events() {
            // The control queue broke: reset the device as for a data queue's fault
            // (`fault`); the bring-up refreshes every port.
            d.recover(&e);
            return VCON_OK;
        }
        for id in r.readable.iter().chain(r.writable.iter()) {
            // A completion that broke the queue: recover (which refreshes every port and
            // wakes each as it comes back), and stop looking at the old driver's queues.
            if d.refresh_or_recover(id).is_err() {
                break;
            }
        }
        VCON_OK
    });
}

/// The settle time after a port was added or the device was brought up again has passed:
/// unnamed ports waiting for a name are published, and (after a wake or recovery) ports the
/// device did not add again are withdrawn.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_settle(d: *mut VconDevice) {
    with_dev(d, |d| {
        if d.stopped || d.asleep {
            return VCON_OK;
        }
        if let Err(e) = d.handle_events() {
            // The recovery schedules the next settle (and resyncs then); past the limit it
            // leaves the device down with every port withdrawn (`give_up`).
            d.recover(&e);
            return VCON_OK;
        }
        // Recoveries count as in a row until the device stays up for VCON_STABLE_SETTLES
        // settle times after the last one.
        if d.recent_recoveries > 0 {
            d.settles_since_recovery += 1;
            if d.settles_since_recovery >= VCON_STABLE_SETTLES {
                d.recent_recoveries = 0;
            } else {
                d.schedule_settle();
            }
        }
        let resync = core::mem::take(&mut d.resync);
        for id in 0..PORTS as u32 {
            let Some(s) = d.slot(id) else { continue };
            match s.publication {
                Publication::Pending => d.publish(id),
                Publication::Published(_) if resync && !s.seen => {
                    log::info!("VirtioConsole: port {id} did not come back; withdrawing it");
                    d.withdraw(id);
                    if let Some(s) = d.slot(id) {
                        *s = Slot::EMPTY;
                    }
                }
                _ => {}
            }
        }
        VCON_OK
    });
}

/// Writes `len` bytes for the host on the emergency path: EMERG_WRITE when negotiated (no
/// queues, works before DRIVER_OK), else port 0's transmit queue with a bounded wait.
///
/// # Safety
/// `d` is null or a live handle; `buf` is valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_emergency_write(
    d: *mut VconDevice,
    buf: *const u8,
    len: usize,
) -> i32 {
    if buf.is_null() {
        return VCON_E_INVALID;
    }
    // SAFETY: caller contract: `buf` is valid for `len` bytes.
    let bytes = unsafe { core::slice::from_raw_parts(buf, len) };
    with_dev(d, |d| {
        if d.stopped || d.asleep {
            return VCON_E_STOPPED;
        }
        match d.drv.as_mut().map(|drv| drv.emergency_write(bytes)) {
            Some(Ok(_)) => VCON_OK,
            Some(Err(_)) | None => VCON_E_DEVICE,
        }
    })
}

/// `acquirePort`: [`VCON_E_BUSY`] when another session holds the port (the shim sleeps
/// and retries when asked to).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_acquire(d: *mut VconDevice, key: u32) -> i32 {
    with_dev(d, |d| {
        if d.stopped {
            return VCON_E_STOPPED;
        }
        let id = match d.by_key(key) {
            Ok((id, s)) => match s.serial.acquire() {
                Ok(()) => id,
                Err(e) => return serial_status(e),
            },
            Err(e) => return e,
        };
        d.note_state(id, key);
        // The port is acquired whatever the device did: a fault recovers here.
        let _ = d.refresh_or_recover(id);
        VCON_OK
    })
}

/// `releasePort`: an active port is closed on the host side (PORT_OPEN 0) first; sleepers
/// wake.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_release(d: *mut VconDevice, key: u32) -> i32 {
    with_dev(d, |d| {
        let (id, was_active) = match d.by_key(key) {
            Ok((id, s)) => match s.serial.release() {
                Ok(a) => (id, a),
                Err(e) => return serial_status(e),
            },
            Err(e) => return e,
        };
        if was_active
            && d.multiport
            && d.data_ready(id)
            && let Some(drv) = d.drv.as_mut()
        {
            let _ = drv.open_port(id, false);
        }
        d.note_state(id, key);
        VCON_OK
    })
}

/// `setState(state, mask)`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_set_state(
    d: *mut VconDevice,
    key: u32,
    state: u32,
    mask: u32,
) -> i32 {
    with_dev(d, |d| match d.by_key(key) {
        Ok((id, s)) => match s.serial.set_state(state, mask) {
            Ok(()) => {
                d.note_state(id, key);
                VCON_OK
            }
            Err(e) => serial_status(e),
        },
        Err(e) => e,
    })
}

/// `getState`: the state word (0 for a key that names no published port).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_get_state(d: *mut VconDevice, key: u32) -> u32 {
    let mut out = 0;
    with_dev(d, |d| {
        if let Ok((id, _)) = d.by_key(key) {
            // A query: a fault is left for the interrupt or transfer that recovers (a
            // recovery here would change other ports' words under a caller reading them).
            d.refresh(id);
            if let Ok((_, s)) = d.by_key(key) {
                out = s.serial.state();
            }
        }
        VCON_OK
    });
    out
}

/// `watchState(&state, mask)`: [`VCON_OK`] with the current word in `*state` when one bit
/// of `mask` has its value in `*state`; [`VCON_WAIT`] to sleep and call again;
/// [`VCON_E_INACTIVE`] when the port was closed under the caller (unless it watches
/// ACTIVE itself); [`VCON_E_OFFLINE`] when the port was withdrawn.
///
/// # Safety
/// `d` is null or a live handle; `state` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_watch_state(
    d: *mut VconDevice,
    key: u32,
    state: *mut u32,
    mask: u32,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(state) = (unsafe { state.as_mut() }) else {
        return VCON_E_INVALID;
    };
    with_dev(d, |d| {
        let id = match d.by_key(key) {
            Ok((id, _)) => id,
            Err(e) => return e,
        };
        // A fault recovers; the watch then sees the word the port had and waits for the
        // port to come back (which wakes it) if it must.
        let _ = d.refresh_or_recover(id);
        match d.by_key(key) {
            Ok((_, s)) => {
                let r = step_status(s.serial.watch(*state, mask));
                if r == VCON_OK {
                    *state = s.serial.state();
                }
                r
            }
            Err(e) => e,
        }
    })
}

/// `nextEvent`: a virtio port carries plain bytes, never queued events: always
/// `PD_E_EOQ` (0), so IOSerialBSDClient reads data.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_next_event(d: *mut VconDevice, key: u32) -> u32 {
    let _ = (d, key);
    pd::E_EOQ
}

/// `executeEvent(event, data)` (and `enqueueEvent`, which has no queue to wait for here):
/// `PD_E_ACTIVE` opens (PORT_OPEN 1) or closes (PORT_OPEN 0) the port on the host side;
/// `PD_E_RXQ_FLUSH` drops what was received; `PD_E_TXQ_FLUSH` is accepted (bytes handed to
/// the ring cannot be taken back); line settings are stored for `requestEvent`.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_execute_event(
    d: *mut VconDevice,
    key: u32,
    event: u32,
    data: u32,
) -> i32 {
    with_dev(d, |d| {
        let (id, acquired) = match d.by_key(key) {
            Ok((id, s)) => (id, s.serial.acquired()),
            Err(e) => return e,
        };
        if !acquired {
            return VCON_E_NOT_OPEN;
        }
        let r = match event & pd::E_MASK {
            e if e == pd::E_ACTIVE & pd::E_MASK => {
                let on = data != 0;
                let changed = d
                    .by_key(key)
                    .map(|(_, s)| s.serial.set_active(on) == Ok(true))
                    .unwrap_or(false);
                if changed
                    && d.multiport
                    && d.data_ready(id)
                    && let Some(drv) = d.drv.as_mut()
                    && let Err(e) = drv.open_port(id, on)
                {
                    log::warn!(
                        "VirtioConsole: PORT_OPEN {} for port {id}: {e}",
                        u8::from(on)
                    );
                }
                VCON_OK
            }
            e if e == pd::E_RXQ_FLUSH & pd::E_MASK => {
                flush_rx(d, id);
                VCON_OK
            }
            e if e == pd::E_TXQ_FLUSH & pd::E_MASK => VCON_OK,
            _ => match d.by_key(key) {
                Ok((_, s)) => match s.serial.execute_stored(event, data) {
                    Ok(()) => VCON_OK,
                    Err(e) => serial_status(e),
                },
                Err(e) => e,
            },
        };
        d.note_state(id, key);
        // The event is done whatever the device did: a fault recovers here.
        let _ = d.refresh_or_recover(id);
        r
    })
}

/// Drops what port `id` received and the tty has not read (bounded: at most the port's
/// receive buffers' worth).
fn flush_rx(d: &mut VconDevice, id: u32) {
    if !d.data_ready(id) {
        return;
    }
    let Some(drv) = d.drv.as_mut() else { return };
    let mut scratch = [0u8; 256];
    let rounds =
        d.opts.rx_buffer_size as usize * usize::from(d.opts.rx_buffers) / scratch.len() + 2;
    for _ in 0..rounds {
        match drv.read(id, &mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// `requestEvent(event, &data)`: queue sizes and fill levels from the ring, settings as
/// stored.
///
/// # Safety
/// `d` is null or a live handle; `data` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_request_event(
    d: *mut VconDevice,
    key: u32,
    event: u32,
    data: *mut u32,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(data) = (unsafe { data.as_mut() }) else {
        return VCON_E_INVALID;
    };
    with_dev(d, |d| {
        let id = match d.by_key(key) {
            Ok((id, _)) => id,
            Err(e) => return e,
        };
        let l = match d.levels(id) {
            Ok(l) => l,
            Err(e) => return d.fault(e),
        };
        match d.by_key(key) {
            Ok((_, s)) => match s.serial.request(event, l) {
                Ok(v) => {
                    *data = v;
                    VCON_OK
                }
                Err(e) => serial_status(e),
            },
            Err(e) => e,
        }
    })
}

/// `enqueueData(buffer, size, &count, sleep)`: copies what the port's free transmit slots
/// take and kicks; `*count` says how much. [`VCON_WAIT`] when not everything fit and the
/// state word says TXQ_FULL (or the port is away: asleep, or not added again yet): a
/// sleeping caller waits for the transmit interrupt (or the port's return), which changes
/// the word and wakes it, and calls again with the rest. Slots the device freed meanwhile
/// are filled in the same call.
///
/// # Safety
/// `d` is null or a live handle; `buf` is valid for `size` bytes; `count` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_enqueue_data(
    d: *mut VconDevice,
    key: u32,
    buf: *const u8,
    size: u32,
    count: *mut u32,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(count) = (unsafe { count.as_mut() }) else {
        return VCON_E_INVALID;
    };
    *count = 0;
    if buf.is_null() {
        return VCON_E_INVALID;
    }
    // SAFETY: caller contract: `buf` is valid for `size` bytes.
    let data = unsafe { core::slice::from_raw_parts(buf, size as usize) };
    with_dev(d, |d| {
        let (id, active) = match d.by_key(key) {
            Ok((id, s)) => (id, s.serial.active()),
            Err(e) => return e,
        };
        if !active {
            return VCON_E_NOT_OPEN;
        }
        if data.is_empty() {
            return VCON_OK;
        }
        if !d.data_ready(id) {
            // Asleep, or the port is between a wake and its PORT_ADD.
            return VCON_WAIT;
        }
        // `refresh` collects completions and may change the state word, waking nobody (the
        // caller is not asleep yet): after it, a completion the device made meanwhile would
        // change nothing. So the caller is told to wait only while the word still says
        // TXQ_FULL (the transmit interrupt that frees a slot then changes it and wakes the
        // caller); while there is room, more is written now. Bounded: room means a free
        // slot and descriptor, so every round after the first writes a whole slot or the
        // rest, at most `len / slot + 2` rounds.
        let slot = (d.opts.tx_buffer_size as usize).max(1);
        let mut n = 0;
        for _ in 0..data.len() / slot + 2 {
            let Some(drv) = d.drv.as_mut() else { break };
            match drv.write(id, data.get(n..).unwrap_or(&[])) {
                Ok(k) => n += k,
                Err(ConsoleError::Busy) => {}
                // A device fault: the device is reset, what was in flight is lost, and the
                // count stays 0 (as for any error).
                Err(e) => return d.fault(e),
            }
            // As for the write: a fault found while collecting completions recovers (the
            // word must not say TXQ_FULL for a queue that broke: nothing would wake us).
            if let Err(status) = d.refresh_or_recover(id) {
                return status;
            }
            if n >= data.len() {
                *count = n as u32;
                return VCON_OK;
            }
            if d.state_of(id) & pd::S_TXQ_FULL != 0 {
                break;
            }
        }
        *count = n as u32;
        VCON_WAIT
    })
}

/// `dequeueData(buffer, size, &count, min)`: copies up to `size` received bytes; their
/// buffers go back to the device. [`VCON_WAIT`] while fewer than `min` were copied and the
/// state word says RXQ_EMPTY (or the port is away): the caller sleeps until data arrives
/// and calls again for the rest; data that arrived meanwhile is copied in the same call.
/// [`VCON_E_INACTIVE`] when the port is not open.
///
/// # Safety
/// `d` is null or a live handle; `buf` is valid for `size` bytes; `count` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_dequeue_data(
    d: *mut VconDevice,
    key: u32,
    buf: *mut u8,
    size: u32,
    count: *mut u32,
    min: u32,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(count) = (unsafe { count.as_mut() }) else {
        return VCON_E_INVALID;
    };
    *count = 0;
    if buf.is_null() {
        return VCON_E_INVALID;
    }
    // SAFETY: caller contract: `buf` is valid for `size` bytes, and not aliased by us.
    let out = unsafe { core::slice::from_raw_parts_mut(buf, size as usize) };
    with_dev(d, |d| {
        let (id, active) = match d.by_key(key) {
            Ok((id, s)) => (id, s.serial.active()),
            Err(e) => return e,
        };
        if !active {
            return VCON_E_INACTIVE;
        }
        // As in `vcon_port_enqueue_data`: `refresh` may collect data that arrived after the
        // read, changing the state word while nobody sleeps; the caller is told to wait only
        // while the word still says RXQ_EMPTY (the receive interrupt then changes it), and
        // while data is there it is read now. Bounded: every round after the first reads at
        // least a byte, at most `want + 2` rounds.
        let want = min.min(size) as usize;
        let mut n = 0;
        for _ in 0..want.saturating_add(2) {
            if d.data_ready(id)
                && let Some(drv) = d.drv.as_mut()
            {
                match drv.read(id, out.get_mut(n..).unwrap_or(&mut [])) {
                    Ok(k) => n += k,
                    // As in `vcon_port_enqueue_data`: the count stays 0.
                    Err(e) => return d.fault(e),
                }
            }
            // As in `vcon_port_enqueue_data` (RXQ_EMPTY for a broken queue).
            if let Err(status) = d.refresh_or_recover(id) {
                return status;
            }
            if n >= want {
                *count = n as u32;
                return VCON_OK;
            }
            if !d.data_ready(id) || d.state_of(id) & pd::S_RXQ_EMPTY != 0 {
                break;
            }
        }
        *count = n as u32;
        VCON_WAIT
    })
}

fn copy_c(dst: &mut [c_char], src: &[u8]) {
    let n = src.len().min(dst.len().saturating_sub(1));
    for (d, &s) in dst.iter_mut().zip(src.iter().take(n)) {
        *d = s as c_char;
    }
    if let Some(z) = dst.get_mut(n) {
        *z = 0;
    }
}

/// The published port's names (for `IOTTYBaseName`/`IOTTYSuffix`) and what the host said
/// about it.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_port_info(
    d: *mut VconDevice,
    key: u32,
    out: *mut VconPortInfo,
) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(out) = (unsafe { out.as_mut() }) else {
        return VCON_E_INVALID;
    };
    with_dev(d, |d| {
        let (id, s) = match d.by_key(key) {
            Ok(x) => x,
            Err(e) => return e,
        };
        let s = *s;
        let mut info = VconPortInfo {
            id,
            base_name: [0; VCON_NAME_CAP],
            suffix: [0; VCON_SUFFIX_CAP],
            port_name: [0; VCON_NAME_CAP],
            console: s.console,
            host_open: s.carrier || !d.multiport,
            guest_open: s.serial.active(),
            has_size: s.size.is_some(),
            cols: s.size.map_or(0, |z| z.0),
            rows: s.size.map_or(0, |z| z.1),
        };
        let name = s.name.as_ref().map(PortName::as_str);
        if let Some(n) = name {
            copy_c(&mut info.port_name, n.as_bytes());
        }
        match name {
            Some(n) if id != 0 => {
                let mut base = [0u8; VCON_NAME_CAP - 1];
                for (b, c) in base.iter_mut().zip(n.bytes()) {
                    *b = if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-') {
                        c
                    } else {
                        b'_'
                    };
                }
                let len = n.len().min(base.len());
                copy_c(&mut info.base_name, base.get(..len).unwrap_or(&[]));
            }
            _ => {
                copy_c(&mut info.base_name, b"virtio");
                if id != 0 {
                    let mut digits = StackText::<4>::new();
                    let _ = write!(digits, "{id}");
                    copy_c(&mut info.suffix, digits.as_bytes());
                }
            }
        }
        *out = info;
        VCON_OK
    })
}

/// Counters for the IORegistry.
///
/// # Safety
/// `d` is null or a live handle; `out` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_stats(d: *mut VconDevice, out: *mut VconStats) -> i32 {
    // SAFETY: null or valid (C contract).
    let Some(out) = (unsafe { out.as_mut() }) else {
        return VCON_E_INVALID;
    };
    with_dev(d, |d| {
        let mut s = d.past;
        if let Some(drv) = d.drv.as_ref() {
            add_stats(&mut s, drv.stats());
        }
        *out = VconStats {
            tx_bytes: s.tx_bytes,
            rx_bytes: s.rx_bytes,
            rx_dropped_bytes: s.rx_dropped_bytes,
            tx_busy: s.tx_busy,
            control_rx: s.control_rx,
            control_tx: s.control_tx,
            control_rejected: s.control_rejected,
            emergency_bytes: s.emergency_bytes,
            bad_tokens: s.bad_tokens,
            interrupts: d.interrupts,
            recoveries: d.recoveries,
            suspends: d.suspends,
            ports: d.slots.iter().filter(|s| s.key().is_some()).count() as u64,
            publications: d.publications,
        };
        VCON_OK
    })
}

/// System sleep (power state 0): the device is reset and its buffers freed; published
/// ports and their sessions stay (data calls wait until the wake).
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_suspend(d: *mut VconDevice) -> i32 {
    with_dev(d, |d| {
        if d.stopped {
            return VCON_E_STOPPED;
        }
        if !d.asleep {
            d.asleep = true;
            d.suspends += 1;
            d.shut_down();
        }
        VCON_OK
    })
}

/// Wake (power state 1): the device is brought up from scratch; ports it adds again keep
/// their nubs and open sessions (reopened on the host side). An error leaves it asleep.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_resume(d: *mut VconDevice) -> i32 {
    with_dev(d, |d| {
        if d.stopped {
            return VCON_E_STOPPED;
        }
        if !d.asleep {
            return VCON_OK;
        }
        d.asleep = false;
        // A fresh start: recoveries before the sleep do not count against this bring-up.
        d.recent_recoveries = 0;
        d.settles_since_recovery = 0;
        match d.bring_back() {
            Ok(()) => VCON_OK,
            Err(e) => {
                log::error!("VirtioConsole: cannot wake the device: {e}");
                d.asleep = true;
                VCON_E_DEVICE
            }
        }
    })
}

/// Stops the device: unregisters the interrupt entry, withdraws every port (sleepers wake
/// and get [`VCON_E_OFFLINE`]), resets the device and frees its buffers.
///
/// # Safety
/// `d` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_stop(d: *mut VconDevice) {
    with_dev(d, |d| {
        if d.stopped {
            return VCON_OK;
        }
        // SAFETY: the family handle outlives this device (vcon_create contract).
        unsafe {
            virtio_kext_client::ffi::vfam_set_interrupt_handler(
                d.family,
                None,
                core::ptr::null_mut(),
            )
        };
        d.stopped = true;
        for id in 0..PORTS as u32 {
            if d.slot(id).is_some_and(|s| s.key().is_some()) {
                d.withdraw(id);
            }
        }
        d.shut_down();
        VCON_OK
    });
}

/// Frees the device (stopping it first if [`vcon_stop`] was not called).
///
/// # Safety
/// `d` is null or a handle from [`vcon_create`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vcon_destroy(d: *mut VconDevice) {
    if d.is_null() {
        return;
    }
    // SAFETY: live handle (caller contract).
    unsafe { vcon_stop(d) };
    // SAFETY: from Box::into_raw in vcon_create, dropped once (caller contract).
    drop(unsafe { Box::from_raw(d) });
}

/// Routes `log` to `IOLog` (call once from the kext's start; a no-op in host builds).
#[unsafe(no_mangle)]
pub extern "C" fn vcon_log_init() {
    #[cfg(feature = "kext")]
    {
        static LOGGER: virtio_kext_abi::kernel::IoLogger = virtio_kext_abi::kernel::IoLogger {
            name: "VirtioConsole",
            level: log::LevelFilter::Info,
        };
        virtio_kext_abi::kernel::init_logging(&LOGGER);
    }
}
