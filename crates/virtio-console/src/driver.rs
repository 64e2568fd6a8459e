//! The driver: [`VirtioConsole`] over any [`Bus`].
//!
//! # Queues (§5.3.2)
//! Port 0: receive 0, transmit 1; control (MULTIPORT): receive 2, transmit 3; port `n ≥ 1`:
//! receive `2n + 2`, transmit `2n + 3` ([`queues`]). The bus sets queues up once, so
//! [`VirtioConsole::start`] sets up the queues of every port the driver will ever serve
//! (`min(max_nr_ports, ConsoleOptions::max_ports, 63)`; 63 keeps every index below 128)
//! and allocates every buffer; a port's receive buffers are posted when its PORT_ADD
//! arrives.
//!
//! # Memory (allocated in [`VirtioConsole::start`] only)
//! Per port, one DMA region of `rx_buffers × rx_buffer_size` and one of
//! `tx_buffers × tx_buffer_size`; the control queues get `control_buffers` 256-byte
//! receive buffers and 8-byte transmit slots, plus a FIFO of control messages waiting for a
//! transmit slot and a FIFO of events. Reading, writing and the control protocol never
//! allocate.
//!
//! # Lifecycle
//! [`VirtioConsole::new`] negotiates features (FEATURES_OK) and reads the configuration;
//! from then on [`VirtioConsole::emergency_write`] works when EMERG_WRITE was negotiated —
//! no queues, no DRIVER_OK. [`VirtioConsole::start`] sets up queues and buffers, sets
//! DRIVER_OK and, with MULTIPORT, sends DEVICE_READY. [`VirtioConsole::init`] does both.
//!
//! # Untrusted device
//! Used lengths and tokens are checked by the bus and again here (a token that is not a
//! buffer we posted is counted and ignored), except the used length on the control
//! receive queue, which is not read (see [`CONTROL_BUF`]); control messages are parsed by
//! [`crate::wire::parse_control`] (length, event code, direction, values, names) and then
//! checked against port state (ids below `max_nr_ports` and the driver's limit, no duplicate
//! PORT_ADD or PORT_NAME, no message for a port that does not exist). A rejected message is
//! counted, logged, reported as [`ConsoleEvent::Rejected`] and changes nothing.
//!
//! All methods take `&mut self`: the platform serialises them (see [`crate::ConsoleLogger`]
//! for a lock usable with interrupts off and from a panic handler).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::{Bus, DeviceType, Error, Features, QueueSpec, Segment};
use zerocopy::IntoBytes;

use crate::features::{self as f};
use crate::wire::{
    self, BAD_ID, CONTROL_LEN, ControlError, ControlHeader, DeviceControl, PortName, config, event,
};
use virtio_core::fifo::Fifo;

/// Queue numbering (§5.3.2).
pub mod queues {
    /// Control receive queue (MULTIPORT).
    pub const CONTROL_RX: u16 = 2;
    /// Control transmit queue (MULTIPORT).
    pub const CONTROL_TX: u16 = 3;
    /// Receive queue of `port`.
    pub const fn rx(port: u32) -> u16 {
        if port == 0 { 0 } else { (2 * port + 2) as u16 }
    }
    /// Transmit queue of `port`.
    pub const fn tx(port: u32) -> u16 {
        rx(port) + 1
    }
}

/// Most ports the driver serves: port 62 uses queues 126/127, the last the bus's
/// `QueueMask` can name.
pub const MAX_PORTS: u32 = 63;
/// Size of one control receive buffer: a header plus a name of up to
/// [`wire::MAX_NAME_LEN`] fits with room to spare, so an over-long name is seen as such
/// (the device truncates to the buffer) rather than silently cut.
///
/// The used length of the control receive queue is not trusted
/// (`QueueSpec::ignore_used_len`): QEMU's `send_control_msg` copies what fits in the
/// buffer but completes it with the message's whole length, so a PORT_NAME of 248 bytes or
/// more (8 + name + NUL) would otherwise be a used length beyond the buffer, which the bus
/// treats as a fault that breaks the queue, on every bring-up. Each buffer is zeroed before
/// it is posted instead, and a message's length is found from its content
/// ([`wire::control_message_len`]): an over-long name is refused as too long and the queue
/// carries on. Linux avoids the fault with page-sized buffers and clamps the length
/// (`buf->len = min(len, buf->size)`); every other queue keeps the bus's check.
pub const CONTROL_BUF: usize = 256;
/// Stride of one control transmit slot.
const CONTROL_TX_STRIDE: usize = 8;

/// Driver parameters chosen by the platform.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Device feature bits the platform allows (intersected with [`f::SUPPORTED`]).
    pub features: u64,
    /// Ports the driver sets up queues and buffers for (clamped to [`MAX_PORTS`] and the
    /// device's `max_nr_ports`). PORT_ADD for a higher id is answered with PORT_READY 0.
    pub max_ports: u32,
    /// Ring size of data queues (0: the device maximum; legacy devices: always theirs).
    pub queue_size: u16,
    /// Receive buffers per port, and their size.
    pub rx_buffers: u16,
    pub rx_buffer_size: u32,
    /// Transmit slots per port, and their size (one write of `n` bytes takes
    /// `ceil(n / tx_buffer_size)` slots).
    pub tx_buffers: u16,
    pub tx_buffer_size: u32,
    /// Control receive buffers and transmit slots.
    pub control_buffers: u16,
    /// Bound of the polled wait of [`VirtioConsole::emergency_write`] without EMERG_WRITE.
    pub poll_spins: u32,
    /// Answer CONSOLE_PORT with PORT_OPEN 1 (what Linux's hvc does when it opens it).
    pub auto_open_console: bool,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            features: f::SUPPORTED.bits(),
            max_ports: 31,
            queue_size: 64,
            rx_buffers: 8,
            rx_buffer_size: 1024,
            tx_buffers: 8,
            tx_buffer_size: 1024,
            control_buffers: 32,
            poll_spins: 1_000_000,
            auto_open_console: true,
        }
    }
}

/// The device configuration, validated (§5.3.4).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `(cols, rows)` with SIZE.
    pub size: Option<(u16, u16)>,
    /// With MULTIPORT.
    pub max_nr_ports: Option<u32>,
}

impl DeviceConfig {
    /// Checks the raw fields against the negotiated features: a field is taken only when its
    /// feature was negotiated; `max_nr_ports` must be at least 1 (port 0 always exists).
    pub fn from_fields(
        features: Features,
        cols: u16,
        rows: u16,
        max_nr_ports: u32,
    ) -> Result<Self, &'static str> {
        let size = features.contains(f::SIZE).then_some((cols, rows));
        let max_nr_ports = if features.contains(f::MULTIPORT) {
            if max_nr_ports == 0 {
                return Err("max_nr_ports is 0");
            }
            Some(max_nr_ports)
        } else {
            None
        };
        Ok(DeviceConfig { size, max_nr_ports })
    }

    /// Reads the fields whose feature was negotiated (never `emerg_wr`, which is
    /// write-only), then validates them.
    pub fn read<B: Bus>(bus: &B, features: Features) -> Result<Self, ConsoleError> {
        let (mut cols, mut rows, mut max) = (0, 0, 0);
        if features.contains(f::SIZE) {
            cols = bus.read_config_u16(config::COLS)?;
            rows = bus.read_config_u16(config::ROWS)?;
        }
        if features.contains(f::MULTIPORT) {
            max = bus.read_config_u32(config::MAX_NR_PORTS)?;
        }
        DeviceConfig::from_fields(features, cols, rows, max).map_err(ConsoleError::Device)
    }
}

/// `size 80x25, max_nr_ports 31`, or `not given` for a field whose feature was not
/// negotiated.
impl fmt::Display for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.size {
            Some((cols, rows)) => write!(f, "size {cols}x{rows}")?,
            None => write!(f, "size not given")?,
        }
        match self.max_nr_ports {
            Some(n) => write!(f, ", max_nr_ports {n}"),
            None => write!(f, ", max_nr_ports not given"),
        }
    }
}

/// What happened on the device side, in order.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// PORT_ADD: the port is usable (its buffers are posted, PORT_READY was sent). `name`
    /// is set when PORT_NAME arrived before the event was delivered; otherwise a
    /// [`ConsoleEvent::PortNamed`] follows if the device names the port.
    PortAdded {
        id: u32,
        name: Option<PortName>,
    },
    /// PORT_NAME after the PortAdded event was delivered.
    PortNamed {
        id: u32,
        name: PortName,
    },
    PortRemoved {
        id: u32,
    },
    /// PORT_OPEN 1 from the device: a host program opened the port.
    HostOpened {
        id: u32,
    },
    /// PORT_OPEN 0 from the device.
    HostClosed {
        id: u32,
    },
    /// CONSOLE_PORT: the port is a console.
    ConsolePort {
        id: u32,
    },
    /// RESIZE (MULTIPORT), or a config change of `cols`/`rows` (SIZE, port 0).
    Resize {
        id: u32,
        cols: u16,
        rows: u16,
    },
    /// A control message from the device was refused; nothing changed.
    Rejected {
        id: u32,
        error: ControlError,
    },
}

/// Errors of the console driver.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConsoleError {
    /// From the bus / virtqueue.
    Core(Error),
    /// The port's transmit slots or ring are full: retry after the device consumed data
    /// (a transmit interrupt, or later).
    Busy,
    /// No such port (never added, removed, or beyond the driver's limit).
    NoSuchPort { id: u32 },
    /// The operation needs a feature that was not negotiated.
    NotNegotiated(&'static str),
    /// Queues are not set up yet ([`VirtioConsole::start`]).
    NotStarted,
    /// A bounded wait ran out.
    Timeout,
    /// The device broke the protocol (a bad config value).
    Device(&'static str),
}

impl From<Error> for ConsoleError {
    fn from(e: Error) -> Self {
        match e {
            Error::QueueFull => ConsoleError::Busy,
            e => ConsoleError::Core(e),
        }
    }
}

impl fmt::Display for ConsoleError {
    fn fmt(&self, fm: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleError::Core(e) => write!(fm, "{e}"),
            ConsoleError::Busy => write!(fm, "transmit ring full"),
            ConsoleError::NoSuchPort { id } => write!(fm, "no port {id}"),
            ConsoleError::NotNegotiated(w) => write!(fm, "{w} not negotiated"),
            ConsoleError::NotStarted => write!(fm, "console queues not started"),
            ConsoleError::Timeout => write!(fm, "timed out"),
            ConsoleError::Device(w) => write!(fm, "device protocol violation: {w}"),
        }
    }
}

pub type Result<T, E = ConsoleError> = core::result::Result<T, E>;

/// Counters.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    pub tx_bytes: u64,
    pub tx_chains: u64,
    /// Writes that found no room at all.
    pub tx_busy: u64,
    pub rx_bytes: u64,
    /// Bytes that arrived for a port that does not exist (dropped).
    pub rx_dropped_bytes: u64,
    pub control_rx: u64,
    pub control_tx: u64,
    /// Device control messages refused.
    pub control_rejected: u64,
    /// Driver control messages lost because the pending FIFO was full.
    pub control_tx_dropped: u64,
    pub emergency_bytes: u64,
    pub config_changes: u64,
    /// Completions whose token was not a buffer in flight (the bus should already catch
    /// these; counted, never trusted).
    pub bad_tokens: u64,
    /// Events lost because the event FIFO was full (only `Rejected` can be lost: other
    /// messages wait in the ring until there is room).
    pub events_lost: u64,
}

/// Ports as a bit set (ids 0..64).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortMask(pub u64);

impl PortMask {
    pub fn insert(&mut self, id: u32) {
        if id < 64 {
            self.0 |= 1 << id;
        }
    }
    pub fn contains(self, id: u32) -> bool {
        id < 64 && self.0 & (1 << id) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = u32> {
        (0..64u32).filter(move |&p| self.contains(p))
    }
}

/// What an interrupt meant for this device.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleInterrupt {
    /// Control messages may have arrived: drain [`VirtioConsole::poll_events`].
    pub control: bool,
    /// Ports whose receive queue has data: [`VirtioConsole::read`].
    pub readable: PortMask,
    /// Ports whose transmit queue completed chains: writes may fit again.
    pub writable: PortMask,
    pub config: bool,
    pub needs_reset: bool,
}

/// A port's state as the driver knows it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub id: u32,
    /// Added (PORT_ADD, or port 0 without MULTIPORT) and not removed.
    pub present: bool,
    pub console: bool,
    /// The host side has the port open (PORT_OPEN from the device; always true without
    /// MULTIPORT).
    pub host_open: bool,
    /// We told the device we opened it (PORT_OPEN from the driver).
    pub guest_open: bool,
    pub name: Option<PortName>,
    /// Last RESIZE (or config size for port 0 with SIZE).
    pub size: Option<(u16, u16)>,
    /// Bytes received and not read yet.
    pub pending_rx: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Buf {
    /// Driver-owned, empty.
    Free,
    /// Owned by the device.
    Posted,
    /// Returned with data, waiting to be read.
    Ready,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    /// Features negotiated, no queues.
    Early,
    /// Queues set up, DRIVER_OK.
    Live,
}

struct Port {
    present: bool,
    console: bool,
    host_open: bool,
    guest_open: bool,
    name: Option<PortName>,
    size: Option<(u16, u16)>,
    rx: Option<DmaRegion>,
    rx_state: Vec<Buf>,
    /// Completed buffers (index, length) in device order.
    rx_ready: Fifo<(u16, u32)>,
    /// Bytes of the front ready buffer already read.
    rx_off: usize,
    tx: Option<DmaRegion>,
    tx_busy: Vec<bool>,
    tx_free: Vec<u16>,
}

impl Port {
    fn empty() -> Self {
        Port {
            present: false,
            console: false,
            host_open: false,
            guest_open: false,
            name: None,
            size: None,
            rx: None,
            rx_state: Vec::new(),
            rx_ready: Fifo::new(0, (0, 0)),
            rx_off: 0,
            tx: None,
            tx_busy: Vec::new(),
            tx_free: Vec::new(),
        }
    }

    fn forget_session(&mut self) {
        self.console = false;
        self.host_open = false;
        self.guest_open = false;
        self.name = None;
        self.size = None;
    }

    fn pending_rx(&self) -> usize {
        (0..self.rx_ready.len())
            .filter_map(|i| self.rx_ready.get(i))
            .map(|(_, len)| len as usize)
            .sum::<usize>()
            .saturating_sub(self.rx_off)
    }
}

struct Control {
    rx: DmaRegion,
    rx_posted: Vec<bool>,
    tx: DmaRegion,
    tx_busy: Vec<bool>,
    tx_free: Vec<u16>,
    /// Messages waiting for a transmit slot.
    pending: Fifo<ControlHeader>,
}

/// The virtio console driver over bus `B`.
pub struct VirtioConsole<B: Bus> {
    bus: B,
    opts: ConsoleOptions,
    features: Features,
    config: DeviceConfig,
    /// Ports served (queues set up for ids below this).
    nports: u32,
    state: State,
    rx_size: usize,
    tx_size: usize,
    ports: Vec<Port>,
    ctrl: Option<Control>,
    events: Fifo<ConsoleEvent>,
    stats: ConsoleStats,
    /// The error that broke the control queues (see [`VirtioConsole::control_error`]).
    control_error: Option<ConsoleError>,
}

/// Posts every free receive buffer of `port` on queue `q`. Returns whether any was posted.
fn post_rx<B: Bus>(bus: &mut B, port: &mut Port, q: u16, size: usize) -> Result<bool> {
    let Some(region) = port.rx.as_ref() else {
        return Ok(false);
    };
    let mut any = false;
    for (i, st) in port.rx_state.iter_mut().enumerate() {
        if *st != Buf::Free {
            continue;
        }
        let seg = Segment::new(region.daddr + (i * size) as u64, size as u32);
        match bus.add(q, &[], &[seg], i) {
            Ok(()) => {
                *st = Buf::Posted;
                any = true;
            }
            Err(Error::QueueFull) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(any)
}

fn alloc_region<B: Bus>(bus: &B, len: usize) -> Result<DmaRegion> {
    Ok(bus.dma().alloc_coherent(len.max(1), 64)?)
}

/// A receive and a transmit region, both or neither: the first is freed when the second
/// cannot be allocated.
fn alloc_pair<B: Bus>(bus: &B, rx_len: usize, tx_len: usize) -> Result<(DmaRegion, DmaRegion)> {
    let rx = alloc_region(bus, rx_len)?;
    match alloc_region(bus, tx_len) {
        Ok(tx) => Ok((rx, tx)),
        Err(e) => {
            // SAFETY: `rx` was just allocated from this bus's DMA and never shown to the
            // device; it is freed once.
            unsafe { bus.dma().free_coherent(rx) };
            Err(e)
        }
    }
}

/// Frees a pair from [`alloc_pair`] that was never shown to the device.
fn free_pair<B: Bus>(bus: &B, rx: DmaRegion, tx: DmaRegion) {
    // SAFETY: both regions came from this bus's DMA, were never posted to the device, and
    // are freed once (moved in).
    unsafe {
        bus.dma().free_coherent(rx);
        bus.dma().free_coherent(tx);
    }
}

impl<B: Bus> VirtioConsole<B> {
    /// Negotiates features and reads the configuration (§3.1.1 steps 1–6, §5.3.5): the
    /// device is at FEATURES_OK, without queues. [`VirtioConsole::emergency_write`] works
    /// from here on when EMERG_WRITE was negotiated.
    pub fn new(mut bus: B, opts: ConsoleOptions) -> Result<Self> {
        if bus.device_type() != DeviceType::Console {
            return Err(ConsoleError::Core(Error::Unsupported));
        }
        let want = Features::from_bits_retain(f::SUPPORTED.bits() & opts.features);
        let mut feats = bus.negotiate_features(want)?;
        let mut cfg = match DeviceConfig::read(&bus, feats) {
            Ok(c) => c,
            Err(ConsoleError::Device(why)) if feats.contains(f::MULTIPORT) => {
                log::warn!("virtio-console: {why}; renegotiating without MULTIPORT");
                feats = bus.negotiate_features(want.difference(f::MULTIPORT))?;
                DeviceConfig::read(&bus, feats)?
            }
            Err(e) => return Err(e),
        };
        if bus.max_queue_size(queues::rx(0)) == 0 || bus.max_queue_size(queues::tx(0)) == 0 {
            bus.fail();
            return Err(ConsoleError::Core(Error::NoSuchQueue { queue: 0 }));
        }
        if feats.contains(f::MULTIPORT)
            && (bus.max_queue_size(queues::CONTROL_RX) == 0
                || bus.max_queue_size(queues::CONTROL_TX) == 0)
        {
            log::warn!("virtio-console: MULTIPORT without control queues; not using it");
            feats = bus.negotiate_features(want.difference(f::MULTIPORT))?;
            cfg = DeviceConfig::read(&bus, feats)?;
        }
        let mut nports = match cfg.max_nr_ports {
            Some(m) => m.min(opts.max_ports.max(1)).min(MAX_PORTS),
            None => 1,
        };
        for p in 1..nports {
            if bus.max_queue_size(queues::rx(p)) == 0 || bus.max_queue_size(queues::tx(p)) == 0 {
                // `nports` is above 1 only with MULTIPORT, so `max_nr_ports` is given here.
                log::warn!(
                    "virtio-console: max_nr_ports {} but no queues for port {p}; serving {p} ports",
                    cfg.max_nr_ports.unwrap_or(1)
                );
                nports = p;
                break;
            }
        }
        let mut ports = Vec::with_capacity(nports as usize);
        ports.resize_with(nports as usize, Port::empty);
        if let (Some(size), Some(p0)) = (cfg.size, ports.first_mut()) {
            p0.size = Some(size);
        }
        log::info!(
            "virtio-console: features {:#x}, {cfg}, serving {nports}",
            feats.bits()
        );
        Ok(VirtioConsole {
            bus,
            opts,
            features: feats,
            config: cfg,
            nports,
            state: State::Early,
            rx_size: opts.rx_buffer_size.clamp(16, 1 << 20) as usize,
            tx_size: opts.tx_buffer_size.clamp(16, 1 << 20) as usize,
            ports,
            ctrl: None,
            events: Fifo::new(
                4 * nports as usize + 32,
                ConsoleEvent::PortRemoved { id: 0 },
            ),
            stats: ConsoleStats::default(),
            control_error: None,
        })
    }

    /// [`VirtioConsole::new`] then [`VirtioConsole::start`].
    pub fn init(bus: B, opts: ConsoleOptions) -> Result<Self> {
        let mut c = Self::new(bus, opts)?;
        c.start()?;
        Ok(c)
    }

    /// Sets up every queue and buffer, sets DRIVER_OK, posts the receive buffers of the
    /// control queue (and of port 0 without MULTIPORT) and, with MULTIPORT, sends
    /// DEVICE_READY (§5.3.6.2 step 1).
    pub fn start(&mut self) -> Result<()> {
        if self.state == State::Live {
            return Ok(());
        }
        let multiport = self.multiport();
        let mut specs = Vec::with_capacity(2 * self.nports as usize + 2);
        for p in 0..self.nports {
            specs.push(QueueSpec::new(queues::rx(p)).size(self.opts.queue_size));
            specs.push(QueueSpec::new(queues::tx(p)).size(self.opts.queue_size));
            if p == 0 && multiport {
                specs.push(
                    QueueSpec::new(queues::CONTROL_RX)
                        .size(self.opts.control_buffers)
                        // See `CONTROL_BUF`: QEMU reports lengths beyond the buffer.
                        .ignore_used_len(true),
                );
                specs.push(
                    QueueSpec::new(queues::CONTROL_TX)
                        .size(self.opts.control_buffers)
                        .interrupts(false),
                );
            }
        }
        self.bus.setup_queues(&specs)?;
        // From here on the device has queues: any failure resets it and frees every region
        // allocated so far (§3.1.1: the driver gives up on the device), leaving nothing live.
        if let Err(e) = self.start_queues(multiport) {
            self.shutdown();
            return Err(e);
        }
        Ok(())
    }

    /// `start` after `setup_queues`: buffers, DRIVER_OK, the first kick. Every region is
    /// owned by `self` as soon as it is allocated, so `shutdown` frees it on failure.
    fn start_queues(&mut self, multiport: bool) -> Result<()> {
        for p in 0..self.nports {
            let rx_n = self
                .opts
                .rx_buffers
                .clamp(1, self.bus.queue_size(queues::rx(p))?);
            let tx_n = self
                .opts
                .tx_buffers
                .clamp(1, self.bus.queue_size(queues::tx(p))?);
            let (rx, tx) = alloc_pair(
                &self.bus,
                rx_n as usize * self.rx_size,
                tx_n as usize * self.tx_size,
            )?;
            let Some(port) = self.ports.get_mut(p as usize) else {
                free_pair(&self.bus, rx, tx);
                return Err(ConsoleError::Core(Error::InvalidState));
            };
            port.rx = Some(rx);
            port.rx_state = vec![Buf::Free; rx_n as usize];
            port.rx_ready = Fifo::new(rx_n as usize, (0, 0));
            port.tx = Some(tx);
            port.tx_busy = vec![false; tx_n as usize];
            port.tx_free = (0..tx_n).rev().collect();
        }
        if multiport {
            let n = self
                .opts
                .control_buffers
                .clamp(1, self.bus.queue_size(queues::CONTROL_RX)?);
            let m = self
                .opts
                .control_buffers
                .clamp(1, self.bus.queue_size(queues::CONTROL_TX)?);
            let (rx, tx) = alloc_pair(
                &self.bus,
                n as usize * CONTROL_BUF,
                m as usize * CONTROL_TX_STRIDE,
            )?;
            self.ctrl = Some(Control {
                rx,
                rx_posted: vec![false; n as usize],
                tx,
                tx_busy: vec![false; m as usize],
                tx_free: (0..m).rev().collect(),
                pending: Fifo::new(2 * self.nports as usize + 16, ControlHeader::new(0, 0, 0)),
            });
            self.post_control_rx()?;
        } else if let Some(p0) = self.ports.first_mut() {
            // Without MULTIPORT port 0 simply exists and is open (§5.3.6).
            p0.present = true;
            p0.host_open = true;
            p0.guest_open = true;
            post_rx(&mut self.bus, p0, queues::rx(0), self.rx_size)?;
        }
        self.bus.driver_ok()?;
        self.state = State::Live;
        if multiport {
            self.bus.kick(queues::CONTROL_RX)?;
            self.send_control(BAD_ID, event::DEVICE_READY, 1)?;
        } else {
            self.bus.kick(queues::rx(0))?;
        }
        Ok(())
    }

    // ---- accessors ----

    pub fn bus(&self) -> &B {
        &self.bus
    }
    /// The bus, e.g. for interrupt routing; do not use the console's queues through it.
    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }
    pub fn features(&self) -> Features {
        self.features
    }
    pub fn multiport(&self) -> bool {
        self.features.contains(f::MULTIPORT)
    }
    /// EMERG_WRITE was negotiated: [`VirtioConsole::emergency_write`] needs no queues.
    pub fn has_emergency_write(&self) -> bool {
        self.features.contains(f::EMERG_WRITE)
    }
    pub fn device_config(&self) -> DeviceConfig {
        self.config
    }
    /// Ports the driver serves (ids `0..max_ports()`).
    pub fn max_ports(&self) -> u32 {
        self.nports
    }
    pub fn is_started(&self) -> bool {
        self.state == State::Live
    }
    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }
    /// The console size of port 0 (SIZE, or RESIZE for port 0).
    pub fn console_size(&self) -> Option<(u16, u16)> {
        self.ports.first().and_then(|p| p.size)
    }
    pub fn port_info(&self, id: u32) -> Option<PortInfo> {
        let p = self.ports.get(id as usize)?;
        Some(PortInfo {
            id,
            present: p.present,
            console: p.console,
            host_open: p.host_open,
            guest_open: p.guest_open,
            name: p.name,
            size: p.size,
            pending_rx: p.pending_rx(),
        })
    }
    /// The id of the port with this name.
    pub fn find_port(&self, name: &str) -> Option<u32> {
        self.ports
            .iter()
            .position(|p| p.present && p.name.is_some_and(|n| n.as_str() == name))
            .map(|i| i as u32)
    }

    // ---- emergency / kernel log path ----

    /// Writes `bytes` for the kernel log, whatever state the driver is in:
    /// - with EMERG_WRITE, one `emerg_wr` config write per byte (§5.3.4): no queues, works
    ///   before DRIVER_OK, usable from a panic handler;
    /// - otherwise, once started, a write on port 0's transmit queue that polls for room for
    ///   at most `poll_spins` iterations (it does not need PORT_ADD for port 0).
    ///
    /// Returns the bytes written (fewer than asked only when the bounded wait ran out).
    pub fn emergency_write(&mut self, bytes: &[u8]) -> Result<usize> {
        if self.has_emergency_write() {
            for &b in bytes {
                self.bus
                    .write_config(config::EMERG_WR, &u32::from(b).to_le_bytes())?;
            }
            self.stats.emergency_bytes += bytes.len() as u64;
            return Ok(bytes.len());
        }
        if self.state != State::Live {
            return Err(ConsoleError::NotStarted);
        }
        let mut n = 0;
        let mut spins = self.opts.poll_spins;
        while n < bytes.len() {
            match self.write_inner(0, bytes.get(n..).unwrap_or(&[])) {
                Ok(k) => n += k,
                Err(ConsoleError::Busy) if spins > 0 => {
                    spins -= 1;
                    core::hint::spin_loop();
                }
                Err(ConsoleError::Busy) => break,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        self.stats.emergency_bytes += n as u64;
        if n == 0 && !bytes.is_empty() {
            return Err(ConsoleError::Timeout);
        }
        Ok(n)
    }

    // ---- data path ----

    fn port_mut(&mut self, id: u32) -> Result<&mut Port> {
        match self.ports.get_mut(id as usize) {
            Some(p) if p.present => Ok(p),
            _ => Err(ConsoleError::NoSuchPort { id }),
        }
    }

    /// Queues `data` on `port` without blocking: copies as much as the free transmit slots
    /// take (one chain per slot), kicks once, and returns the bytes accepted. `Busy` when
    /// nothing fit (retry after the device consumed data).
    pub fn write(&mut self, port: u32, data: &[u8]) -> Result<usize> {
        if self.state != State::Live {
            return Err(ConsoleError::NotStarted);
        }
        self.port_mut(port)?;
        let r = self.write_inner(port, data);
        if r == Err(ConsoleError::Busy) {
            self.stats.tx_busy += 1;
        }
        r
    }

    fn write_inner(&mut self, id: u32, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.reclaim_tx(id)?;
        let q = queues::tx(id);
        let size = self.tx_size;
        let Some(port) = self.ports.get_mut(id as usize) else {
            return Err(ConsoleError::NoSuchPort { id });
        };
        let Some(region) = port.tx.as_ref() else {
            return Err(ConsoleError::NotStarted);
        };
        let mut n = 0;
        while n < data.len() {
            let Some(&slot) = port.tx_free.last() else {
                break;
            };
            let chunk = data.get(n..).unwrap_or(&[]);
            let chunk = chunk.get(..size.min(chunk.len())).unwrap_or(&[]);
            let off = slot as usize * size;
            if !region.write_at(off, chunk) {
                break;
            }
            let seg = Segment::new(region.daddr + off as u64, chunk.len() as u32);
            match self.bus.add(q, &[seg], &[], slot as usize) {
                Ok(()) => {}
                Err(Error::QueueFull) => break,
                Err(e) => return Err(e.into()),
            }
            port.tx_free.pop();
            if let Some(b) = port.tx_busy.get_mut(slot as usize) {
                *b = true;
            }
            n += chunk.len();
            self.stats.tx_chains += 1;
        }
        if n == 0 {
            return Err(ConsoleError::Busy);
        }
        self.bus.kick(q)?;
        self.stats.tx_bytes += n as u64;
        Ok(n)
    }

    /// Takes back transmit slots the device has consumed on `port`.
    fn reclaim_tx(&mut self, id: u32) -> Result<usize> {
        let q = queues::tx(id);
        let mut n = 0;
        while let Some(u) = self.bus.pop_used(q)? {
            let Some(port) = self.ports.get_mut(id as usize) else {
                break;
            };
            match port.tx_busy.get_mut(u.token) {
                Some(b) if *b => {
                    *b = false;
                    port.tx_free.push(u.token as u16);
                    n += 1;
                }
                _ => self.stats.bad_tokens += 1,
            }
        }
        Ok(n)
    }

    /// Free transmit slots on `port` (after reclaiming completed ones).
    pub fn tx_room(&mut self, port: u32) -> Result<usize> {
        if self.state != State::Live {
            return Err(ConsoleError::NotStarted);
        }
        self.port_mut(port)?;
        self.reclaim_tx(port)?;
        let free = self.bus.free_descriptors(queues::tx(port))? as usize;
        let slots = self.ports.get(port as usize).map_or(0, |p| p.tx_free.len());
        Ok(slots.min(free) * self.tx_size)
    }

    /// Moves completed receive buffers of `port` to its ready FIFO; data for a port that
    /// does not exist is dropped and the buffer reposted.
    fn pump_rx(&mut self, id: u32) -> Result<()> {
        let q = queues::rx(id);
        let mut repost = false;
        while let Some(u) = self.bus.pop_used(q)? {
            let Some(port) = self.ports.get_mut(id as usize) else {
                break;
            };
            let present = port.present;
            let Some(st) = port
                .rx_state
                .get_mut(u.token)
                .filter(|s| **s == Buf::Posted)
            else {
                self.stats.bad_tokens += 1;
                continue;
            };
            if !present || u.len == 0 {
                *st = Buf::Free;
                self.stats.rx_dropped_bytes += u64::from(u.len);
                repost = true;
                continue;
            }
            *st = Buf::Ready;
            // Cannot overflow: the FIFO holds every buffer of the port.
            port.rx_ready.push((u.token as u16, u.len));
        }
        if repost {
            self.repost_rx(id)?;
        }
        Ok(())
    }

    fn repost_rx(&mut self, id: u32) -> Result<()> {
        let q = queues::rx(id);
        let Some(port) = self.ports.get_mut(id as usize) else {
            return Ok(());
        };
        if post_rx(&mut self.bus, port, q, self.rx_size)? {
            self.bus.kick(q)?;
        }
        Ok(())
    }

    /// Bytes received on `port` and not read yet (collects completed buffers first).
    pub fn rx_pending(&mut self, port: u32) -> Result<usize> {
        if self.state != State::Live {
            return Err(ConsoleError::NotStarted);
        }
        self.port_mut(port)?;
        self.pump_rx(port)?;
        Ok(self.ports.get(port as usize).map_or(0, Port::pending_rx))
    }

    /// Copies received bytes of `port` into `out` (0 when nothing is there); consumed
    /// buffers go straight back to the device.
    pub fn read(&mut self, port: u32, out: &mut [u8]) -> Result<usize> {
        if self.state != State::Live {
            return Err(ConsoleError::NotStarted);
        }
        self.port_mut(port)?;
        self.pump_rx(port)?;
        let size = self.rx_size;
        let Some(p) = self.ports.get_mut(port as usize) else {
            return Err(ConsoleError::NoSuchPort { id: port });
        };
        let Some(region) = p.rx.as_ref() else {
            return Err(ConsoleError::NotStarted);
        };
        let mut n = 0;
        let mut freed = false;
        while n < out.len() {
            let Some((i, len)) = p.rx_ready.front() else {
                break;
            };
            let len = len as usize;
            let take = (len - p.rx_off.min(len)).min(out.len() - n);
            // Once, into the caller's memory (`DmaRegion::read_into`); `take`
            // fits `out`, and the bus bounds `len` by the buffer (zeros if it ever did not).
            if let Some(dst) = out.get_mut(n..n + take) {
                if !region.read_into(i as usize * size + p.rx_off, dst) {
                    dst.fill(0);
                }
            }
            n += take;
            p.rx_off += take;
            if p.rx_off >= len {
                p.rx_ready.pop();
                p.rx_off = 0;
                if let Some(s) = p.rx_state.get_mut(i as usize) {
                    *s = Buf::Free;
                }
                freed = true;
            }
        }
        self.stats.rx_bytes += n as u64;
        if freed {
            self.repost_rx(port)?;
        }
        Ok(n)
    }

    // ---- control protocol ----

    /// Tells the device that the guest side of `port` is open (true) or closed (false):
    /// PORT_OPEN from the driver (§5.3.6.2).
    pub fn open_port(&mut self, port: u32, open: bool) -> Result<()> {
        if !self.multiport() {
            return Err(ConsoleError::NotNegotiated("MULTIPORT"));
        }
        if self.state != State::Live {
            return Err(ConsoleError::NotStarted);
        }
        self.port_mut(port)?;
        self.send_control(port, event::PORT_OPEN, u16::from(open))?;
        if let Ok(p) = self.port_mut(port) {
            p.guest_open = open;
        }
        Ok(())
    }

    fn post_control_rx(&mut self) -> Result<bool> {
        let Some(c) = self.ctrl.as_mut() else {
            return Ok(false);
        };
        let mut any = false;
        for (i, posted) in c.rx_posted.iter_mut().enumerate() {
            if *posted {
                continue;
            }
            // Zeroed before the device sees it: the message's length is found from its
            // content (`CONTROL_BUF`), so no byte of an earlier message may remain.
            if !c.rx.write_at(i * CONTROL_BUF, &[0u8; CONTROL_BUF]) {
                continue;
            }
            let seg = Segment::new(c.rx.daddr + (i * CONTROL_BUF) as u64, CONTROL_BUF as u32);
            match self.bus.add(queues::CONTROL_RX, &[], &[seg], i) {
                Ok(()) => {
                    *posted = true;
                    any = true;
                }
                Err(Error::QueueFull) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(any)
    }

    /// Queues a driver→device control message; it goes out now if a slot is free, else
    /// with the next control activity.
    fn send_control(&mut self, id: u32, ev: u16, value: u16) -> Result<()> {
        let Some(c) = self.ctrl.as_mut() else {
            return Err(ConsoleError::NotNegotiated("MULTIPORT"));
        };
        if !c.pending.push(ControlHeader::new(id, ev, value)) {
            self.stats.control_tx_dropped += 1;
            log::warn!("virtio-console: control transmit backlog full; dropping event {ev}");
            return Err(ConsoleError::Busy);
        }
        self.flush_control()
    }

    fn flush_control(&mut self) -> Result<()> {
        let Some(c) = self.ctrl.as_mut() else {
            return Ok(());
        };
        while let Some(u) = self.bus.pop_used(queues::CONTROL_TX)? {
            match c.tx_busy.get_mut(u.token) {
                Some(b) if *b => {
                    *b = false;
                    c.tx_free.push(u.token as u16);
                }
                _ => self.stats.bad_tokens += 1,
            }
        }
        let mut added = false;
        while let (Some(&slot), Some(msg)) = (c.tx_free.last(), c.pending.front()) {
            let off = slot as usize * CONTROL_TX_STRIDE;
            if !c.tx.write_at(off, msg.as_bytes()) {
                break;
            }
            let seg = Segment::new(c.tx.daddr + off as u64, CONTROL_LEN as u32);
            match self.bus.add(queues::CONTROL_TX, &[seg], &[], slot as usize) {
                Ok(()) => {}
                Err(Error::QueueFull) => break,
                Err(e) => return Err(e.into()),
            }
            c.tx_free.pop();
            c.pending.pop();
            if let Some(b) = c.tx_busy.get_mut(slot as usize) {
                *b = true;
            }
            self.stats.control_tx += 1;
            added = true;
        }
        if added {
            self.bus.kick(queues::CONTROL_TX)?;
        }
        Ok(())
    }

    /// Processes the control messages the device sent (and sends what is pending). Returns
    /// the number of messages handled. Stops early while the event FIFO is nearly full:
    /// the rest wait in the ring until [`VirtioConsole::poll_events`] drains it.
    pub fn process_control(&mut self) -> Result<usize> {
        self.process_control_at_most(usize::MAX)
    }

    /// [`VirtioConsole::process_control`], handling at most `max` messages. An error is
    /// kept as [`VirtioConsole::control_error`].
    fn process_control_at_most(&mut self, max: usize) -> Result<usize> {
        let r = self.process_control_inner(max);
        if let Err(e) = r
            && self.control_error.is_none()
        {
            log::error!(
                "virtio-console: control queue: {e}; no control message is handled until the device is reset"
            );
            self.control_error = Some(e);
        }
        r
    }

    fn process_control_inner(&mut self, max: usize) -> Result<usize> {
        if self.state != State::Live || self.ctrl.is_none() {
            return Ok(0);
        }
        self.flush_control()?;
        let mut handled = 0;
        let mut buf = [0u8; CONTROL_BUF];
        while self.events.free() >= 2 && handled < max {
            let Some(u) = self.bus.pop_used(queues::CONTROL_RX)? else {
                break;
            };
            let Some(c) = self.ctrl.as_mut() else {
                break;
            };
            let Some(posted) = c.rx_posted.get_mut(u.token).filter(|p| **p) else {
                self.stats.bad_tokens += 1;
                continue;
            };
            *posted = false;
            // The used length is not reported on this queue (`CONTROL_BUF`): the whole
            // buffer is copied once, into driver memory (`read_into`), and the message's
            // length is found in the copy (the buffer was zeroed before it was posted).
            let n = if c.rx.read_into(u.token * CONTROL_BUF, &mut buf) {
                wire::control_message_len(&buf)
            } else {
                0
            };
            self.stats.control_rx += 1;
            handled += 1;
            self.handle_control(buf.get(..n).unwrap_or(&[]));
        }
        if self.post_control_rx()? {
            self.bus.kick(queues::CONTROL_RX)?;
        }
        Ok(handled)
    }

    fn handle_control(&mut self, bytes: &[u8]) {
        let result = match wire::parse_control(bytes) {
            Ok((id, msg)) => self.apply_control(id, msg).map_err(|e| (id, e)),
            Err(e) => Err(e),
        };
        if let Err((id, error)) = result {
            self.stats.control_rejected += 1;
            log::warn!("virtio-console: rejected control message: {error}");
            self.push_event(ConsoleEvent::Rejected { id, error });
        }
    }

    fn push_event(&mut self, ev: ConsoleEvent) {
        if !self.events.push(ev) {
            self.stats.events_lost += 1;
        }
    }

    fn apply_control(&mut self, id: u32, msg: DeviceControl) -> Result<(), ControlError> {
        let device_max = self.config.max_nr_ports.unwrap_or(1);
        if id >= device_max {
            return Err(ControlError::IdOutOfRange { id });
        }
        if id >= self.nports {
            if msg == DeviceControl::PortAdd {
                // A port the device has but we set up no queues for: tell it (§5.3.6.2).
                let _ = self.send_control(id, event::PORT_READY, 0);
            }
            return Err(ControlError::IdBeyondDriverLimit { id });
        }
        let auto_open = self.opts.auto_open_console;
        if msg == DeviceControl::PortRemove
            && self.ports.get(id as usize).is_some_and(|p| p.present)
            && let Err(e) = self.pump_rx(id)
        {
            // Data the device completed before the removal must not surface if the id is
            // added again; a broken queue is reported on the next read.
            log::warn!("virtio-console: port {id}: draining before removal: {e}");
        }
        let Some(port) = self.ports.get_mut(id as usize) else {
            return Err(ControlError::IdBeyondDriverLimit { id });
        };
        let ev_code = match msg {
            DeviceControl::PortAdd => event::PORT_ADD,
            DeviceControl::PortRemove => event::PORT_REMOVE,
            DeviceControl::ConsolePort => event::CONSOLE_PORT,
            DeviceControl::Resize { .. } => event::RESIZE,
            DeviceControl::PortOpen(_) => event::PORT_OPEN,
            DeviceControl::PortName(_) => event::PORT_NAME,
        };
        if msg == DeviceControl::PortAdd {
            if port.present {
                return Err(ControlError::DuplicateAdd { id });
            }
            port.forget_session();
            port.present = true;
            // Buffers of an earlier incarnation of this id may still be posted: only free
            // ones are posted now.
            if let Err(e) = self.repost_rx(id) {
                log::error!("virtio-console: port {id}: cannot post receive buffers: {e}");
                let _ = self.send_control(id, event::PORT_READY, 0);
                if let Some(p) = self.ports.get_mut(id as usize) {
                    p.present = false;
                }
                return Ok(());
            }
            let _ = self.send_control(id, event::PORT_READY, 1);
            self.push_event(ConsoleEvent::PortAdded { id, name: None });
            return Ok(());
        }
        if !port.present {
            return Err(ControlError::NoSuchPort { id, event: ev_code });
        }
        match msg {
            DeviceControl::PortAdd => {}
            DeviceControl::PortRemove => {
                port.present = false;
                port.forget_session();
                // Unread data is dropped; its buffers go back to the device so the id can
                // be added again. (Buffers stay posted: the bus has no way to take back a
                // buffer the device holds, and the device ignores a removed port's queues.)
                while let Some((i, len)) = port.rx_ready.pop() {
                    if let Some(s) = port.rx_state.get_mut(i as usize) {
                        *s = Buf::Free;
                    }
                    self.stats.rx_dropped_bytes += u64::from(len);
                }
                port.rx_off = 0;
                if let Err(e) = self.repost_rx(id) {
                    log::error!("virtio-console: port {id}: cannot repost buffers: {e}");
                }
                self.push_event(ConsoleEvent::PortRemoved { id });
            }
            DeviceControl::ConsolePort => {
                port.console = true;
                let open = auto_open && !port.guest_open;
                self.push_event(ConsoleEvent::ConsolePort { id });
                if open
                    && self.send_control(id, event::PORT_OPEN, 1).is_ok()
                    && let Some(p) = self.ports.get_mut(id as usize)
                {
                    p.guest_open = true;
                }
            }
            DeviceControl::Resize { cols, rows } => {
                port.size = Some((cols, rows));
                self.push_event(ConsoleEvent::Resize { id, cols, rows });
            }
            DeviceControl::PortOpen(open) => {
                port.host_open = open;
                self.push_event(if open {
                    ConsoleEvent::HostOpened { id }
                } else {
                    ConsoleEvent::HostClosed { id }
                });
            }
            DeviceControl::PortName(name) => {
                if port.name.is_some() {
                    return Err(ControlError::DuplicateName { id });
                }
                port.name = Some(name);
                // Fold the name into the PortAdded event if it is still undelivered.
                for i in 0..self.events.len() {
                    if let Some(ConsoleEvent::PortAdded {
                        id: a,
                        name: n @ None,
                    }) = self.events.get_mut(i)
                        && *a == id
                    {
                        *n = Some(name);
                        return Ok(());
                    }
                }
                self.push_event(ConsoleEvent::PortNamed { id, name });
            }
        }
        Ok(())
    }

    /// The next event, processing control messages when none is queued. An error of the
    /// control queues (a device fault breaks them) ends the iteration and is kept: see
    /// [`VirtioConsole::control_error`].
    pub fn next_event(&mut self) -> Option<ConsoleEvent> {
        if self.events.is_empty() && self.control_error.is_none() {
            // Kept in `control_error` (and logged) when it fails.
            let _ = self.process_control();
        }
        self.events.pop()
    }

    /// The error that broke the control queues, if one did (a device fault: an id not in
    /// flight, a used index that jumps; the bus has marked the queue broken).
    /// From then on [`VirtioConsole::next_event`] and [`VirtioConsole::poll_events`] yield
    /// only the events already queued, and the device's PORT_ADD, PORT_REMOVE, PORT_OPEN
    /// and PORT_NAME go unheard, as do the driver's PORT_READY and PORT_OPEN: the platform
    /// should reset the device and start a new driver, as after any device fault.
    pub fn control_error(&self) -> Option<ConsoleError> {
        self.control_error
    }

    /// Iterates over pending events: the queued ones, then those of the control messages
    /// in the ring (none once the control queues broke: [`VirtioConsole::control_error`]). Bounded: one iteration handles at most as many control messages as the
    /// control queue has receive buffers (every message pending when it started, whatever
    /// a device that answers each repost at once adds meanwhile waits for the next call),
    /// so it ends even while the device floods the control queue (§5.3.6.2 sets no limit
    /// on how many messages a device sends; the driver must bound its own work).
    pub fn poll_events(&mut self) -> Events<'_, B> {
        let budget = match self.control_error {
            Some(_) => 0,
            None => self.ctrl.as_ref().map_or(0, |c| c.rx_posted.len()),
        };
        Events {
            console: self,
            budget,
        }
    }

    // ---- interrupts and config ----

    /// Demultiplexes an interrupt (`vector`: MSI-X index, `None` for INTx), handles a
    /// config change, and says what to poll.
    pub fn handle_interrupt(&mut self, vector: Option<u16>) -> ConsoleInterrupt {
        let c = self.bus.handle_interrupt(vector);
        let mut out = ConsoleInterrupt {
            control: c.queues.contains(queues::CONTROL_RX) && self.multiport(),
            config: c.config_changed,
            needs_reset: c.needs_reset,
            ..Default::default()
        };
        for p in 0..self.nports {
            if c.queues.contains(queues::rx(p)) {
                out.readable.insert(p);
            }
            if c.queues.contains(queues::tx(p)) {
                out.writable.insert(p);
            }
        }
        if c.config_changed && !c.needs_reset {
            if let Err(e) = self.handle_config_change() {
                log::warn!("virtio-console: config change: {e}");
            }
        }
        out
    }

    /// Re-reads the console size (SIZE without MULTIPORT, where it describes port 0, §5.3.6)
    /// and queues a Resize event when it changed.
    pub fn handle_config_change(&mut self) -> Result<()> {
        self.stats.config_changes += 1;
        if !self.features.contains(f::SIZE) || self.multiport() {
            return Ok(());
        }
        let cols = self.bus.read_config_u16(config::COLS)?;
        let rows = self.bus.read_config_u16(config::ROWS)?;
        let changed = self.ports.first_mut().is_some_and(|p0| {
            let changed = p0.size != Some((cols, rows));
            p0.size = Some((cols, rows));
            changed
        });
        self.config.size = Some((cols, rows));
        if changed {
            self.push_event(ConsoleEvent::Resize { id: 0, cols, rows });
        }
        Ok(())
    }

    /// Resets the device and frees every buffer (or, when the device will not reset and
    /// its DMA cannot be stopped, leaks them: it may still write them). The driver is
    /// unusable afterwards.
    pub fn shutdown(&mut self) {
        let quiet = self.bus.reset(&mut |_, _| {}).is_ok();
        self.state = State::Early;
        let ctrl = self.ctrl.take();
        let regions = self
            .ports
            .iter_mut()
            .flat_map(|p| [p.rx.take(), p.tx.take()])
            .chain(ctrl.into_iter().flat_map(|c| [Some(c.rx), Some(c.tx)]))
            .flatten();
        // SAFETY: each region came from this bus's `alloc_coherent` and is taken out of its
        // owner (released once); `quiet`: the reset above was acknowledged or the device's
        // DMA stopped, so it no longer accesses them (otherwise they are leaked).
        unsafe { self.bus.release_dma(regions, quiet) };
        for p in &mut self.ports {
            p.present = false;
        }
    }
}

impl<B: Bus> Drop for VirtioConsole<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Iterator of [`VirtioConsole::poll_events`].
pub struct Events<'a, B: Bus> {
    console: &'a mut VirtioConsole<B>,
    /// Control messages this iteration may still handle.
    budget: usize,
}

impl<B: Bus> Iterator for Events<'_, B> {
    type Item = ConsoleEvent;
    fn next(&mut self) -> Option<ConsoleEvent> {
        // Each turn handles at least one message (else it ends the iteration): at most
        // `budget` turns.
        while self.console.events.is_empty() && self.budget > 0 {
            match self.console.process_control_at_most(self.budget) {
                Ok(0) => self.budget = 0,
                Ok(n) => self.budget = self.budget.saturating_sub(n),
                // Kept in `control_error` (and logged).
                Err(_) => self.budget = 0,
            }
        }
        self.console.events.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn queue_numbering() {
        assert_eq!((queues::rx(0), queues::tx(0)), (0, 1));
        assert_eq!((queues::CONTROL_RX, queues::CONTROL_TX), (2, 3));
        assert_eq!((queues::rx(1), queues::tx(1)), (4, 5));
        assert_eq!((queues::rx(30), queues::tx(30)), (62, 63));
        assert_eq!(queues::tx(MAX_PORTS - 1), 127);
    }

    #[test]
    fn config_parsing() {
        let all = f::SIZE | f::MULTIPORT | f::EMERG_WRITE;
        assert_eq!(
            DeviceConfig::from_fields(all, 80, 25, 31),
            Ok(DeviceConfig {
                size: Some((80, 25)),
                max_nr_ports: Some(31)
            })
        );
        // Fields of features not negotiated are ignored, whatever they hold.
        assert_eq!(
            DeviceConfig::from_fields(f::EMERG_WRITE, 80, 25, 0),
            Ok(DeviceConfig {
                size: None,
                max_nr_ports: None
            })
        );
        assert_eq!(
            DeviceConfig::from_fields(f::MULTIPORT, 0, 0, 0),
            Err("max_nr_ports is 0")
        );
        assert_eq!(
            DeviceConfig::from_fields(f::MULTIPORT, 0, 0, u32::MAX),
            Ok(DeviceConfig {
                size: None,
                max_nr_ports: Some(u32::MAX)
            })
        );
    }

    #[test]
    fn port_mask() {
        let mut m = PortMask::default();
        m.insert(0);
        m.insert(63);
        m.insert(64);
        assert!(m.contains(0) && m.contains(63) && !m.contains(64) && !m.contains(1));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 63]);
    }
}
