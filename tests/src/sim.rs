//! A register-level model of one virtio-pci function, laid out like QEMU 7.2's, whose rings
//! are served by rust-vmm's `virtio-queue` over identity-mapped guest memory ([`IdentityMemory`],
//! placed low so legacy PFNs fit) — or, when the builder's features offer RING_PACKED
//! ([`F_RING_PACKED`]) and the driver negotiates it, by the spec-written packed device side
//! ([`crate::packed_device`]), behind the same [`Sim::pop_chains`] / [`Sim::complete`] /
//! [`Sim::complete_raw`] / [`Sim::signal_used`] calls (a [`Chain`]'s `head` is then the
//! buffer id).
//!
//! Layout (all modes share one state, like QEMU's proxy):
//! - config space: vendor 0x1AF4, capability list `0x34 → 0x98 MSI-X → 0x84 PCI_CFG →
//!   0x70 NOTIFY → 0x60 DEVICE → 0x50 ISR → 0x40 COMMON` (the offsets `lspci` shows for
//!   QEMU's virtio-net); free room at 0xA4..0x100 for test-inserted capabilities;
//! - BAR0: legacy I/O registers (transitional and legacy modes), device config at 20, or 24
//!   while MSI-X is enabled in the capability;
//! - BAR1: MSI-X table (0x000) and PBA (0x800), when the function has MSI-X vectors;
//! - BAR4: modern region, COMMON 0x0, ISR 0x1000, DEVICE 0x2000, NOTIFY 0x3000 with
//!   `notify_off_multiplier` 4 and `queue_notify_off == queue index`.
//!
//! Bus mastering: the function starts with Bus Master Enable set (the platform's doing).
//! While it is clear the device side touches no memory, as QEMU's bus-master address space
//! is then disabled: popping chains finds none, reading and writing chains moves nothing,
//! completions are not written, MSI-X messages are not sent; each refusal is counted
//! ([`Sim::dma_refused`]). [`Sim::stick_bus_master`] makes the bit impossible to clear.
//!
//! Modes: [`SimMode::Modern`] (device ID 0x1040 + type, revision 1, no BAR0),
//! [`SimMode::Transitional`] (0x1000-range ID, subsystem ID = type, revision 0, both
//! interfaces), [`SimMode::Legacy`] (0x1000-range ID, no virtio capabilities; the MSI-X
//! capability is still there when it has vectors, as in QEMU with `disable-modern=on`;
//! build with `.msix_vectors(0)` for a function without any capability list).
//!
//! The handles ([`SimConfig`], [`SimBars`], [`SimIrq`]) implement the platform traits and
//! share state with the [`Sim`] the test keeps for the device side.
//!
//! Deviations from QEMU, on purpose: a config change sets only ISR bit 1 (QEMU sets 0x3);
//! FEATURES_OK is refused when the driver wrote bits that were not offered (QEMU masks them
//! silently), or without VERSION_1 on a modern-only function; interrupts sent while the
//! MSI-X function mask is set are dropped rather than left pending; the PCI_CFG access
//! window is present but not functional.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_core::platform::{BarAccess, InterruptMode, InterruptPlatform, PciConfigSpace};
use virtio_core::transport::NO_VECTOR;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::mem::IdentityMemory;
use crate::packed_device::PackedDevice;

/// Feature bits the sim itself looks at.
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_PACKED: offered when the builder's features include it; a queue the
/// driver enables after negotiating it is served by [`PackedDevice`] (§2.8) instead of
/// rust-vmm's split-ring `Queue`.
pub const F_RING_PACKED: u64 = 1 << 34;

const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;
const STATUS_FAILED: u8 = 128;
/// Bus Master Enable in the low byte of the PCI command register (PCI Local Bus 3.0 §6.2.2).
const COMMAND_BUS_MASTER: u8 = 1 << 2;
/// Reads of `queue_reset` during which a queue reset is still ongoing (presents 1).
const QUEUE_RESET_READS: u8 = 2;

/// Config-space and BAR layout constants of the model.
pub mod layout {
    pub const CAP_MSIX: u8 = 0x98;
    pub const CAP_PCI_CFG: u8 = 0x84;
    pub const CAP_NOTIFY: u8 = 0x70;
    pub const CAP_DEVICE: u8 = 0x60;
    pub const CAP_ISR: u8 = 0x50;
    pub const CAP_COMMON: u8 = 0x40;
    /// Slots for capabilities inserted by tests (20 bytes each).
    pub const FREE_CAP_SLOTS: [u8; 4] = [0xA4, 0xB8, 0xCC, 0xE0];

    pub const BAR_LEGACY: u8 = 0;
    pub const BAR_MSIX: u8 = 1;
    pub const BAR_MODERN: u8 = 4;
    pub const MODERN_BAR_LEN: u64 = 0x4000;
    pub const MSIX_BAR_LEN: u64 = 0x1000;
    pub const MSIX_PBA_OFFSET: u64 = 0x800;

    pub const COMMON_OFFSET: u64 = 0x0000;
    pub const ISR_OFFSET: u64 = 0x1000;
    pub const DEVICE_OFFSET: u64 = 0x2000;
    pub const NOTIFY_OFFSET: u64 = 0x3000;
    pub const REGION_LEN: u64 = 0x1000;
    pub const NOTIFY_MULTIPLIER: u32 = 4;
}
use layout::*;

/// Which interfaces the function offers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SimMode {
    Modern,
    Transitional,
    Legacy,
}

/// The four ways a driver can meet a function: modern; transitional as the probe picks it
/// (modern) and as legacy; legacy-only. Tests that cover "every mode" iterate this.
pub const MODES: [(SimMode, virtio_pci::Preference); 4] = [
    (SimMode::Modern, virtio_pci::Preference::Auto),
    (SimMode::Transitional, virtio_pci::Preference::Auto),
    (SimMode::Transitional, virtio_pci::Preference::Legacy),
    (SimMode::Legacy, virtio_pci::Preference::Auto),
];

/// Walks every error path of a driver's initialisation (issue 14: every error after
/// `setup_queues` resets and frees): for `allowed` = 0, 1, 2, ... builds a fresh function
/// with `build`, lets `allowed` DMA allocations succeed and fails every later one, and runs
/// `init` on it. Each failed attempt must leave no DMA memory allocated and the device not
/// DRIVER_OK, and `after_failure` may check more; the walk ends at the first success (the
/// driver is dropped) and returns how many allocations initialisation needed.
pub fn walk_allocation_failures<T, E>(
    what: &str,
    mut build: impl FnMut() -> Sim,
    mut init: impl FnMut(&Sim) -> Result<T, E>,
    mut after_failure: impl FnMut(&Sim, usize),
) -> usize {
    for allowed in 0..1000 {
        let sim = build();
        let mem = sim.memory();
        let before = mem.free_bytes();
        mem.fail_allocations_after(Some(allowed));
        let result = init(&sim);
        mem.fail_allocations_after(None);
        if result.is_ok() {
            assert!(
                allowed > 0,
                "{what}: initialisation allocated nothing to fail"
            );
            return allowed;
        }
        assert_eq!(
            mem.free_bytes(),
            before,
            "{what}: leak when allocation {allowed} fails"
        );
        assert_eq!(sim.status() & 4, 0, "{what}: DRIVER_OK after a failed init");
        after_failure(&sim, allowed);
    }
    panic!("{what}: initialisation never succeeded")
}

/// Builder for a [`Sim`].
#[derive(Clone)]
pub struct SimBuilder {
    mode: SimMode,
    device_type: u32,
    features: u64,
    queue_sizes: Vec<u16>,
    device_config: Vec<u8>,
    accept_features_ok: bool,
    msix_vectors: Option<u16>,
    intx_pin: bool,
    mem: Option<IdentityMemory>,
    mem_len: usize,
}

impl SimBuilder {
    /// A function of `device_type` in `mode`, offering VERSION_1 (modern/transitional) and
    /// one queue of 256 entries; 1 MiB of guest memory unless [`SimBuilder::memory`] is used.
    pub fn new(mode: SimMode, device_type: u32) -> Self {
        SimBuilder {
            mode,
            device_type,
            features: if mode == SimMode::Legacy {
                0
            } else {
                F_VERSION_1
            },
            queue_sizes: vec![256],
            device_config: Vec::new(),
            accept_features_ok: true,
            msix_vectors: None,
            intx_pin: true,
            mem: None,
            mem_len: 1 << 20,
        }
    }
    /// Offered features (64-bit; the legacy interface shows bits 0..=31 only).
    pub fn features(mut self, features: u64) -> Self {
        self.features = features;
        self
    }
    /// Number of queues and each one's maximum size (0: the queue does not exist).
    pub fn queues(mut self, sizes: &[u16]) -> Self {
        self.queue_sizes = sizes.to_vec();
        self
    }
    pub fn device_config(mut self, bytes: &[u8]) -> Self {
        self.device_config = bytes.to_vec();
        self
    }
    /// Whether the device keeps FEATURES_OK when the driver sets it (false: refuse always).
    pub fn accept_features_ok(mut self, accept: bool) -> Self {
        self.accept_features_ok = accept;
        self
    }
    /// MSI-X table size (0: no MSI-X capability, like QEMU's balloon). Default: queues + 1.
    pub fn msix_vectors(mut self, vectors: u16) -> Self {
        self.msix_vectors = Some(vectors);
        self
    }
    /// Whether the function has an INTx pin (default yes).
    pub fn intx(mut self, present: bool) -> Self {
        self.intx_pin = present;
        self
    }
    /// Serve from this memory instead of a fresh one (e.g. to share it between devices).
    pub fn memory(mut self, mem: impl Into<IdentityMemory>) -> Self {
        self.mem = Some(mem.into());
        self
    }
    /// Size of the default guest memory (1 MiB unless set).
    pub fn memory_len(mut self, len: usize) -> Self {
        self.mem_len = len;
        self
    }

    pub fn build(self) -> Sim {
        let mem = self
            .mem
            .clone()
            .unwrap_or_else(|| IdentityMemory::new(self.mem_len));
        let msix_vectors = self
            .msix_vectors
            .unwrap_or_else(|| u16::try_from(self.queue_sizes.len() + 1).unwrap_or(u16::MAX))
            .min(2048);
        let queues = self
            .queue_sizes
            .iter()
            .map(|&max| SimQueue::new(max))
            .collect();
        let mut state = State {
            mode: self.mode,
            device_type: self.device_type,
            features: self.features,
            accept_features_ok: self.accept_features_ok,
            msix_vectors,
            intx_pin: self.intx_pin,
            cfg: [0; 256],
            next_free_cap: 0,
            queues,
            dev_config: self.device_config,
            config_generation: 0,
            generation_churn: 0,
            reset_refused: false,
            bus_master_stuck: false,
            dma_refused: 0,
            bus_master_on_unreset: 0,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            isr: 0,
            rejected_vectors: BTreeSet::new(),
            msix_table: vec![0; MSIX_BAR_LEN as usize],
            events: Vec::new(),
            resets: 0,
            interrupts: Vec::new(),
            dropped_interrupts: 0,
            irq_mode: None,
            irq_calls: Vec::new(),
            max_platform_vectors: u16::MAX,
            mem,
            notify_hook: None,
            pending_notifies: Vec::new(),
        };
        state.build_config_space();
        Sim {
            inner: Arc::new(Mutex::new(state)),
        }
    }
}

/// One queue of the device side.
struct SimQueue {
    max_size: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    /// Reads of `queue_reset` that still present 1 (the queue's reset is ongoing,
    /// §4.1.4.3.1) before it presents 0 with `queue_enable` 0: [`QUEUE_RESET_READS`] after
    /// a write of 1.
    reset_reads_left: u8,
    desc: u64,
    driver: u64,
    device: u64,
    pfn: u32,
    kicks: u64,
    queue: Option<Queue>,
    /// The device side of a packed queue (RING_PACKED negotiated).
    packed: Option<PackedQueue>,
}

/// A packed queue of the simulated function: the spec-written device side (which keeps the
/// buffers it read and has not returned, by buffer id: [`Chain::head`]).
struct PackedQueue {
    device: PackedDevice,
    event_idx: bool,
    /// Read while forging a completion, not yet handed out by [`Sim::pop_chains`].
    unclaimed: Vec<Chain>,
    /// Returns dropped because the used position had reached the read position
    /// ([`PackedDevice::return_used`]); shown by [`Sim::describe`].
    dropped: u64,
}

impl PackedQueue {
    /// Reads every available buffer, as chains for [`Sim::pop_chains`].
    fn pop_all(&mut self) -> Vec<Chain> {
        let mut out = std::mem::take(&mut self.unclaimed);
        for c in self.device.pop_all() {
            let descs = c
                .readable
                .iter()
                .map(|&(addr, len)| SimDesc {
                    addr,
                    len,
                    write_only: false,
                })
                .chain(c.writable.iter().map(|&(addr, len)| SimDesc {
                    addr,
                    len,
                    write_only: true,
                }))
                .collect();
            out.push(Chain { head: c.id, descs });
        }
        out
    }

    /// Returns buffer `id` as used with `len` bytes, whatever the device's books say (a
    /// simulated device may lie; the driver has to notice). Dropped, and counted, when the
    /// used position has reached the read position: see [`PackedDevice::return_used`].
    fn return_used(&mut self, id: u16, len: u32) {
        if !self.device.return_used(id, len) {
            self.dropped += 1;
        }
    }
}

impl SimQueue {
    fn new(max_size: u16) -> Self {
        SimQueue {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            enabled: false,
            reset_reads_left: 0,
            desc: 0,
            driver: 0,
            device: 0,
            pfn: 0,
            kicks: 0,
            queue: None,
            packed: None,
        }
    }

    fn reset(&mut self) {
        let kicks = self.kicks;
        *self = SimQueue::new(self.max_size);
        self.kicks = kicks;
    }
}

/// Everything the device model records, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// Status 0 written (device reset).
    Reset,
    /// Status written; `kept` is what the device holds afterwards (FEATURES_OK may be refused).
    Status {
        written: u8,
        kept: u8,
    },
    /// `device_feature` (or legacy features) read with this select.
    DeviceFeaturesRead {
        select: u32,
    },
    /// One 32-bit word of driver features written (legacy: select 0).
    DriverFeatures {
        select: u32,
        value: u32,
    },
    QueueSize {
        queue: u16,
        size: u16,
    },
    QueueEnabled {
        queue: u16,
    },
    QueueReset {
        queue: u16,
    },
    LegacyPfn {
        queue: u16,
        pfn: u32,
    },
    ConfigVector {
        requested: u16,
        accepted: u16,
    },
    QueueVector {
        queue: u16,
        requested: u16,
        accepted: u16,
    },
    Notify {
        queue: u16,
    },
    DeviceConfigWrite {
        offset: u32,
        value: u32,
        width: u8,
    },
    /// An access the model does not implement (wrong width, unknown register, out of range).
    BadAccess(String),
}

/// Steps of device initialisation, as the device saw them (virtio 1.2 §3.1.1).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LifecycleStep {
    Reset,
    Acknowledge,
    Driver,
    FeaturesRead,
    FeaturesWritten,
    FeaturesOk,
    QueueEnabled(u16),
    DriverOk,
    Failed,
}

/// An interrupt the device sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimInterrupt {
    /// MSI-X message for this vector.
    Msix(u16),
    /// INTx asserted (the ISR says why).
    Intx,
}

impl SimInterrupt {
    /// What a driver's `handle_interrupt` takes for it: the MSI-X vector, or `None` for
    /// INTx (the bus then reads the ISR).
    pub fn vector(self) -> Option<u16> {
        match self {
            SimInterrupt::Msix(v) => Some(v),
            SimInterrupt::Intx => None,
        }
    }
}

/// What the platform-side [`InterruptPlatform`] handle was asked to do.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IrqCall {
    EnableMsix { vectors: u16, granted: bool },
    EnableIntx { granted: bool },
    Disable,
}

/// A snapshot of one descriptor.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SimDesc {
    pub addr: u64,
    pub len: u32,
    pub write_only: bool,
}

/// A snapshot of an available descriptor chain popped by the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<SimDesc>,
}

impl Chain {
    pub fn readable_len(&self) -> u32 {
        self.descs
            .iter()
            .filter(|d| !d.write_only)
            .map(|d| d.len)
            .sum()
    }
    pub fn writable_len(&self) -> u32 {
        self.descs
            .iter()
            .filter(|d| d.write_only)
            .map(|d| d.len)
            .sum()
    }
}

/// What the driver programmed for one queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// A queue reset is ongoing: `queue_reset` still presents 1.
    pub resetting: bool,
    pub max_size: u16,
    pub size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub kicks: u64,
    /// Whether the device-side queue (`virtio_queue::Queue`, or the packed device) exists
    /// and is ready.
    pub ready: bool,
    /// Served as a packed ring (RING_PACKED negotiated): `device_side` then holds the
    /// descriptor ring and the driver and device event suppression areas.
    pub packed: bool,
    /// Whether the device-side queue uses EVENT_IDX.
    pub event_idx: bool,
    /// Addresses as the device-side `virtio_queue::Queue` holds them.
    pub device_side: Option<(u64, u64, u64)>,
}

struct State {
    mode: SimMode,
    device_type: u32,
    features: u64,
    accept_features_ok: bool,
    msix_vectors: u16,
    intx_pin: bool,
    cfg: [u8; 256],
    next_free_cap: usize,
    queues: Vec<SimQueue>,
    dev_config: Vec<u8>,
    config_generation: u8,
    generation_churn: u32,
    /// Writing status 0 changes nothing (a device that will not reset).
    reset_refused: bool,
    /// Bus Master Enable cannot be cleared (a function, or a platform, where the bit does
    /// not take): clearing it in the command register reads back set.
    bus_master_stuck: bool,
    /// Device memory accesses (ring and buffer reads and writes, MSI-X messages) refused
    /// because Bus Master Enable was clear.
    dma_refused: u64,
    /// Times Bus Master Enable was turned on while the device was not reset (status not
    /// 0): it could then use rings it was given before, in memory no longer its own.
    bus_master_on_unreset: u64,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    queue_select: u16,
    isr: u8,
    rejected_vectors: BTreeSet<u16>,
    msix_table: Vec<u8>,
    events: Vec<SimEvent>,
    /// Device resets so far.
    resets: u64,
    interrupts: Vec<SimInterrupt>,
    dropped_interrupts: u64,
    irq_mode: Option<InterruptMode>,
    irq_calls: Vec<IrqCall>,
    max_platform_vectors: u16,
    mem: IdentityMemory,
    /// Runs after each queue notification, outside the state lock (see [`Sim::on_notify`]).
    notify_hook: Option<NotifyHook>,
    /// Notifications not yet handed to `notify_hook`.
    pending_notifies: Vec<u16>,
}

/// A device reaction to a queue notification: called with the simulation and the queue.
pub type NotifyHook = Arc<dyn Fn(&Sim, u16) + Send + Sync>;

enum IrqSource {
    Queue(u16),
    Config,
}

impl State {
    fn has_legacy(&self) -> bool {
        self.mode != SimMode::Modern
    }
    fn has_modern(&self) -> bool {
        self.mode != SimMode::Legacy
    }

    fn put(&mut self, at: usize, bytes: &[u8]) {
        if let Some(dst) = self.cfg.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn vendor_cap(
        &mut self,
        at: u8,
        next: u8,
        cfg_type: u8,
        bar: u8,
        offset: u32,
        length: u32,
        extra: Option<u32>,
    ) {
        let len = if extra.is_some() { 20 } else { 16 };
        let mut b = vec![0x09, next, len, cfg_type, bar, 0, 0, 0];
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&length.to_le_bytes());
        if let Some(x) = extra {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.put(usize::from(at), &b);
    }

    fn build_config_space(&mut self) {
        let device_id: u16 = match self.mode {
            SimMode::Modern => 0x1040 + self.device_type as u16,
            _ => legacy_device_id(self.device_type),
        };
        let revision = if self.mode == SimMode::Modern { 1 } else { 0 };
        self.put(0x00, &0x1AF4u16.to_le_bytes());
        self.put(0x02, &device_id.to_le_bytes());
        // Bus Master Enable: set by the platform before a driver gets the function (IOKit's
        // `setBusMasterEnable`, what `virtio_pci::caps::enable_function` does).
        self.cfg[0x04] = COMMAND_BUS_MASTER;
        self.cfg[0x08] = revision;
        let class: [u8; 3] = match self.device_type {
            1 => [0x00, 0x00, 0x02],
            2 => [0x00, 0x00, 0x01],
            3 => [0x00, 0x80, 0x07],
            _ => [0x00, 0xFF, 0x00],
        };
        self.put(0x09, &class);
        self.put(0x2C, &0x1AF4u16.to_le_bytes());
        self.put(0x2E, &(self.device_type as u16).to_le_bytes());
        if self.has_legacy() {
            self.put(0x10, &0xC001u32.to_le_bytes());
        }
        if self.msix_vectors > 0 {
            self.put(0x14, &0xFEBF_1000u32.to_le_bytes());
        }
        if self.has_modern() {
            self.put(0x20, &0xFE00_000Cu32.to_le_bytes());
        }
        if self.intx_pin {
            self.cfg[0x3C] = 11;
            self.cfg[0x3D] = 1;
        }
        let mut head = 0u8;
        if self.has_modern() {
            self.vendor_cap(
                CAP_COMMON,
                0,
                1,
                BAR_MODERN,
                COMMON_OFFSET as u32,
                REGION_LEN as u32,
                None,
            );
            self.vendor_cap(
                CAP_ISR,
                CAP_COMMON,
                3,
                BAR_MODERN,
                ISR_OFFSET as u32,
                REGION_LEN as u32,
                None,
            );
            self.vendor_cap(
                CAP_DEVICE,
                CAP_ISR,
                4,
                BAR_MODERN,
                DEVICE_OFFSET as u32,
                REGION_LEN as u32,
                None,
            );
            self.vendor_cap(
                CAP_NOTIFY,
                CAP_DEVICE,
                2,
                BAR_MODERN,
                NOTIFY_OFFSET as u32,
                REGION_LEN as u32,
                Some(NOTIFY_MULTIPLIER),
            );
            self.vendor_cap(CAP_PCI_CFG, CAP_NOTIFY, 5, 0, 0, 0, Some(0));
            head = CAP_PCI_CFG;
        }
        if self.msix_vectors > 0 {
            let control = self.msix_vectors - 1;
            let mut b = vec![0x11, head];
            b.extend_from_slice(&control.to_le_bytes());
            b.extend_from_slice(&u32::from(BAR_MSIX).to_le_bytes());
            b.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | u32::from(BAR_MSIX)).to_le_bytes());
            self.put(usize::from(CAP_MSIX), &b);
            head = CAP_MSIX;
        }
        if head != 0 {
            self.cfg[0x34] = head;
            self.cfg[0x06] |= 0x10;
        }
    }

    fn msix_control(&self) -> u16 {
        if self.msix_vectors == 0 {
            return 0;
        }
        let at = usize::from(CAP_MSIX) + 2;
        u16::from_le_bytes([self.cfg[at], self.cfg[at + 1]])
    }

    fn msix_enabled(&self) -> bool {
        self.msix_control() & 0x8000 != 0
    }

    fn set_msix_control(&mut self, enable: bool, mask: Option<bool>) {
        if self.msix_vectors == 0 {
            return;
        }
        let mut c = self.msix_control();
        c = if enable { c | 0x8000 } else { c & !0x8000 };
        if let Some(m) = mask {
            c = if m { c | 0x4000 } else { c & !0x4000 };
        }
        self.put(usize::from(CAP_MSIX) + 2, &c.to_le_bytes());
    }

    fn bad(&mut self, what: String) {
        log::debug!("sim: bad access: {what}");
        self.events.push(SimEvent::BadAccess(what));
    }

    // ---- config space ----

    fn cfg_read(&self, offset: u16, width: usize) -> u64 {
        let at = usize::from(offset);
        let mut v = 0u64;
        for i in 0..width {
            let b = self.cfg.get(at + i).copied().unwrap_or(0xFF);
            v |= u64::from(b) << (8 * i);
        }
        v
    }

    fn cfg_write(&mut self, offset: u16, width: usize, value: u64) {
        for i in 0..width {
            let at = usize::from(offset) + i;
            let b = (value >> (8 * i)) as u8;
            let msix_ctl_hi = usize::from(CAP_MSIX) + 3;
            match at {
                // Command register (low byte and INTx disable in the high byte).
                0x04 if self.bus_master_stuck => self.cfg[at] = (b & 0x07) | COMMAND_BUS_MASTER,
                0x04 => {
                    let turned_on = b & !self.cfg[at] & COMMAND_BUS_MASTER != 0;
                    if turned_on && self.status != 0 {
                        self.bus_master_on_unreset += 1;
                    }
                    self.cfg[at] = b & 0x07;
                }
                0x05 => self.cfg[at] = b & 0x04,
                0x3C => self.cfg[at] = b,
                _ if self.msix_vectors > 0 && at == msix_ctl_hi => self.cfg[at] = b & 0xC0,
                _ => {}
            }
        }
    }

    // ---- lifecycle ----

    fn device_reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.resets += 1;
        self.events.push(SimEvent::Reset);
    }

    fn write_status(&mut self, value: u8, modern: bool) {
        if value == 0 {
            if !self.reset_refused {
                self.device_reset();
            }
            return;
        }
        let mut kept = value;
        let newly = value & !self.status;
        if modern && newly & STATUS_FEATURES_OK != 0 {
            let unoffered = self.driver_features & !self.features;
            let no_version_1 =
                self.mode == SimMode::Modern && self.driver_features & F_VERSION_1 == 0;
            if !self.accept_features_ok || unoffered != 0 || no_version_1 {
                kept &= !STATUS_FEATURES_OK;
            }
        }
        // DEVICE_NEEDS_RESET is the device's bit; the driver cannot set or clear it.
        kept = (kept & !STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET);
        self.status = kept;
        self.events.push(SimEvent::Status {
            written: value,
            kept,
        });
    }

    fn accept_vector(&self, v: u16) -> u16 {
        if v == NO_VECTOR || v >= self.msix_vectors || self.rejected_vectors.contains(&v) {
            NO_VECTOR
        } else {
            v
        }
    }

    /// The device side of queue `index` when it is a packed queue.
    fn packed_mut(&mut self, index: u16) -> Option<&mut PackedQueue> {
        self.queues
            .get_mut(usize::from(index))
            .and_then(|q| q.packed.as_mut())
    }

    fn selected(&mut self) -> Option<&mut SimQueue> {
        let sel = usize::from(self.queue_select);
        self.queues.get_mut(sel).filter(|q| q.max_size != 0)
    }

    fn event_idx(&self) -> bool {
        self.driver_features & F_EVENT_IDX != 0
    }

    /// Creates the device-side `virtio_queue::Queue` from what the driver programmed.
    /// `modern`: enabled through the modern `queue_enable` (a legacy QUEUE_PFN always sets
    /// up a split ring in the legacy layout, whatever was negotiated).
    fn activate_queue(&mut self, index: u16, modern: bool) {
        let event_idx = self.event_idx();
        if modern && self.driver_features & F_RING_PACKED != 0 {
            self.activate_packed_queue(index, event_idx);
            return;
        }
        let Some(q) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        let mut errors = Vec::new();
        match Queue::new(q.max_size) {
            Ok(mut vq) => {
                if vq.try_set_size(q.size).is_err() {
                    errors.push(format!(
                        "queue {index}: size {} refused by virtio-queue",
                        q.size
                    ));
                }
                if vq.try_set_desc_table_address(GuestAddress(q.desc)).is_err()
                    || vq
                        .try_set_avail_ring_address(GuestAddress(q.driver))
                        .is_err()
                    || vq
                        .try_set_used_ring_address(GuestAddress(q.device))
                        .is_err()
                {
                    errors.push(format!("queue {index}: misaligned ring addresses"));
                }
                vq.set_event_idx(event_idx);
                vq.set_ready(true);
                q.queue = Some(vq);
                q.enabled = true;
            }
            Err(e) => errors.push(format!(
                "queue {index}: max size {} refused: {e:?}",
                q.max_size
            )),
        }
        for e in errors {
            self.bad(e);
        }
        self.events.push(SimEvent::QueueEnabled { queue: index });
    }

    /// Creates the packed device side of queue `index` from the areas the driver
    /// programmed (§2.8: descriptor ring, driver and device event suppression).
    fn activate_packed_queue(&mut self, index: u16, event_idx: bool) {
        let mem = self.mem.clone();
        let Some(q) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        let addrs = virtio_core::transport::RingAddresses {
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        };
        q.packed = Some(PackedQueue {
            device: PackedDevice::new(&mem, q.size, addrs, event_idx),
            event_idx,
            unclaimed: Vec::new(),
            dropped: 0,
        });
        q.enabled = true;
        self.events.push(SimEvent::QueueEnabled { queue: index });
    }

    // ---- modern BAR4 ----

    fn common_read(&mut self, off: u64, width: usize) -> u64 {
        let sel = self.queue_select;
        let q = self
            .queues
            .get(usize::from(sel))
            .filter(|q| q.max_size != 0);
        let v: u64 = match (off, width) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => {
                self.events.push(SimEvent::DeviceFeaturesRead {
                    select: self.device_feature_select,
                });
                match self.device_feature_select {
                    0 => self.features & 0xFFFF_FFFF,
                    1 => self.features >> 32,
                    _ => 0,
                }
            }
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0C, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xFFFF_FFFF,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.config_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(sel),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1A, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            (0x1C, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1E, 2) => q.map_or(0, |_| u64::from(sel)),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xFFFF_FFFF),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) => q.map_or(0, |q| q.driver & 0xFFFF_FFFF),
            (0x2C, 4) => q.map_or(0, |q| q.driver >> 32),
            (0x30, 4) => q.map_or(0, |q| q.device & 0xFFFF_FFFF),
            (0x34, 4) => q.map_or(0, |q| q.device >> 32),
            (0x38, 2) => 0,
            (0x3A, 2) => match self.selected() {
                Some(q) if q.reset_reads_left > 0 => {
                    q.reset_reads_left -= 1;
                    1
                }
                _ => 0,
            },
            _ => {
                self.bad(format!("common cfg read {off:#x}/{width}"));
                0
            }
        };
        v
    }

    fn common_write(&mut self, off: u64, width: usize, value: u64) {
        let v32 = value as u32;
        let v16 = value as u16;
        let sel = self.queue_select;
        match (off, width) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0C, 4) => {
                let select = self.driver_feature_select;
                if self.status & STATUS_FEATURES_OK != 0 {
                    // QEMU ignores feature writes once FEATURES_OK is set (virtio_set_features).
                    self.bad(format!(
                        "driver_feature[{select}] written after FEATURES_OK"
                    ));
                    return;
                }
                match select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xFFFF_FFFF) | u64::from(v32)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xFFFF_FFFF) | (u64::from(v32) << 32)
                    }
                    _ => {}
                }
                self.events
                    .push(SimEvent::DriverFeatures { select, value: v32 });
            }
            (0x10, 2) => {
                let accepted = self.accept_vector(v16);
                self.config_vector = accepted;
                self.events.push(SimEvent::ConfigVector {
                    requested: v16,
                    accepted,
                });
            }
            (0x14, 1) => self.write_status(value as u8, true),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) => {
                if let Some(q) = self.selected() {
                    if q.enabled {
                        self.bad(format!("queue {sel}: size written while enabled"));
                    } else if v16 == 0 || v16 > q.max_size || !v16.is_power_of_two() {
                        self.bad(format!("queue {sel}: bad size {v16}"));
                    } else {
                        q.size = v16;
                        self.events.push(SimEvent::QueueSize {
                            queue: sel,
                            size: v16,
                        });
                    }
                }
            }
            (0x1A, 2) => {
                let accepted = self.accept_vector(v16);
                if let Some(q) = self.selected() {
                    q.vector = accepted;
                    self.events.push(SimEvent::QueueVector {
                        queue: sel,
                        requested: v16,
                        accepted,
                    });
                }
            }
            (0x1C, 2) => {
                if v16 != 1 {
                    self.bad(format!("queue {sel}: queue_enable written {v16}"));
                } else if let Some(q) = self.selected() {
                    q.reset_reads_left = 0;
                    self.activate_queue(sel, true);
                }
            }
            (0x20..=0x34, 4) => {
                let Some(q) = self.selected() else {
                    return;
                };
                if q.enabled {
                    self.bad(format!("queue {sel}: address written while enabled"));
                    return;
                }
                let field = match off {
                    0x20 | 0x24 => &mut q.desc,
                    0x28 | 0x2C => &mut q.driver,
                    _ => &mut q.device,
                };
                if off.is_multiple_of(8) {
                    *field = (*field & !0xFFFF_FFFF) | u64::from(v32);
                } else {
                    *field = (*field & 0xFFFF_FFFF) | (u64::from(v32) << 32);
                }
            }
            (0x3A, 2) => {
                if self.driver_features & (1 << 40) == 0 {
                    self.bad(format!("queue {sel}: queue_reset without RING_RESET"));
                } else if let Some(q) = self.selected() {
                    q.reset();
                    q.reset_reads_left = QUEUE_RESET_READS;
                    self.events.push(SimEvent::QueueReset { queue: sel });
                }
            }
            _ => self.bad(format!("common cfg write {off:#x}/{width} = {value:#x}")),
        }
    }

    fn device_config_read(&mut self, off: u64, width: usize) -> u64 {
        if self.generation_churn > 0 {
            self.generation_churn -= 1;
            self.config_generation = self.config_generation.wrapping_add(1);
        }
        let mut v = 0u64;
        for i in 0..width {
            let b = usize::try_from(off)
                .ok()
                .and_then(|o| self.dev_config.get(o + i))
                .copied()
                .unwrap_or(0);
            v |= u64::from(b) << (8 * i);
        }
        v
    }

    fn device_config_write(&mut self, off: u64, width: usize, value: u64) {
        for i in 0..width {
            if let Some(b) = usize::try_from(off)
                .ok()
                .and_then(|o| self.dev_config.get_mut(o + i))
            {
                *b = (value >> (8 * i)) as u8;
            }
        }
        self.events.push(SimEvent::DeviceConfigWrite {
            offset: off as u32,
            value: value as u32,
            width: width as u8,
        });
    }

    fn notify_queue(&mut self, queue: u16) {
        if let Some(q) = self.queues.get_mut(usize::from(queue)) {
            q.kicks += 1;
        } else {
            self.bad(format!("notify for nonexistent queue {queue}"));
        }
        if self.status & STATUS_DRIVER_OK == 0 {
            self.bad(format!("notify for queue {queue} before DRIVER_OK"));
        }
        self.events.push(SimEvent::Notify { queue });
        if self.notify_hook.is_some() {
            self.pending_notifies.push(queue);
        }
    }

    fn read_isr(&mut self) -> u8 {
        let v = self.isr;
        self.isr = 0;
        v
    }

    fn modern_read(&mut self, off: u64, width: usize) -> u64 {
        match off {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_OFFSET, width),
            o if o < DEVICE_OFFSET => {
                if o == ISR_OFFSET && width == 1 {
                    u64::from(self.read_isr())
                } else {
                    self.bad(format!("ISR read {o:#x}/{width}"));
                    0
                }
            }
            o if o < NOTIFY_OFFSET => self.device_config_read(o - DEVICE_OFFSET, width),
            o => {
                self.bad(format!("notify region read {o:#x}/{width}"));
                0
            }
        }
    }

    fn modern_write(&mut self, off: u64, width: usize, value: u64) {
        match off {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_OFFSET, width, value),
            o if o < DEVICE_OFFSET => self.bad(format!("ISR write {o:#x}")),
            o if o < NOTIFY_OFFSET => self.device_config_write(o - DEVICE_OFFSET, width, value),
            o => {
                let rel = o - NOTIFY_OFFSET;
                let queue = (rel / u64::from(NOTIFY_MULTIPLIER)) as u16;
                if width != 2 || !rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                    self.bad(format!("notify write {o:#x}/{width}"));
                    return;
                }
                if value != u64::from(queue) {
                    self.bad(format!("notify at queue {queue}'s address carries {value}"));
                }
                self.notify_queue(queue);
            }
        }
    }

    // ---- legacy BAR0 ----

    fn legacy_config_offset(&self) -> u64 {
        if self.msix_enabled() { 24 } else { 20 }
    }

    fn legacy_bar_len(&self) -> u64 {
        // QEMU: pow2ceil(VIRTIO_PCI_REGION_SIZE (24 with an MSI-X capability, else 20)
        // + config length).
        let regs = if self.msix_vectors > 0 { 24 } else { 20 };
        (regs + self.dev_config.len() as u64).next_power_of_two()
    }

    fn legacy_read(&mut self, off: u64, width: usize) -> u64 {
        let cfg_off = self.legacy_config_offset();
        if off >= cfg_off {
            return self.device_config_read(off - cfg_off, width);
        }
        let sel = usize::from(self.queue_select);
        let q = self.queues.get(sel);
        match (off, width) {
            (0, 4) => {
                self.events.push(SimEvent::DeviceFeaturesRead { select: 0 });
                self.features & 0xFFFF_FFFF
            }
            (4, 4) => self.driver_features & 0xFFFF_FFFF,
            (8, 4) => q.map_or(0, |q| u64::from(q.pfn)),
            (12, 2) => q.map_or(0, |q| u64::from(q.max_size)),
            (14, 2) => u64::from(self.queue_select),
            (18, 1) => u64::from(self.status),
            (19, 1) => u64::from(self.read_isr()),
            (20, 2) => u64::from(self.config_vector),
            (22, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            _ => {
                self.bad(format!("legacy read {off}/{width}"));
                0
            }
        }
    }

    fn legacy_write(&mut self, off: u64, width: usize, value: u64) {
        let cfg_off = self.legacy_config_offset();
        if off >= cfg_off {
            self.device_config_write(off - cfg_off, width, value);
            return;
        }
        let sel = self.queue_select;
        match (off, width) {
            (4, 4) => {
                self.driver_features = value & 0xFFFF_FFFF;
                self.events.push(SimEvent::DriverFeatures {
                    select: 0,
                    value: value as u32,
                });
                let event_idx = self.event_idx();
                for q in self.queues.iter_mut().filter_map(|q| q.queue.as_mut()) {
                    q.set_event_idx(event_idx);
                }
            }
            (8, 4) => {
                let pfn = value as u32;
                if self.selected().is_none() {
                    self.bad(format!("PFN written for nonexistent queue {sel}"));
                    return;
                }
                self.events.push(SimEvent::LegacyPfn { queue: sel, pfn });
                let Some(q) = self.selected() else {
                    return;
                };
                if pfn == 0 {
                    // QEMU (`virtio_ioport_write`): a zero PFN resets the whole device, not
                    // just the queue.
                    self.device_reset();
                    return;
                }
                let size = q.max_size;
                let desc = u64::from(pfn) << 12;
                let driver = desc + 16 * u64::from(size);
                let device = (driver + 6 + 2 * u64::from(size)).next_multiple_of(4096);
                q.pfn = pfn;
                q.size = size;
                q.desc = desc;
                q.driver = driver;
                q.device = device;
                self.activate_queue(sel, false);
            }
            (14, 2) => self.queue_select = value as u16,
            (16, 2) => self.notify_queue(value as u16),
            (18, 1) => self.write_status(value as u8, false),
            (20, 2) => {
                let requested = value as u16;
                let accepted = self.accept_vector(requested);
                self.config_vector = accepted;
                self.events.push(SimEvent::ConfigVector {
                    requested,
                    accepted,
                });
            }
            (22, 2) => {
                let requested = value as u16;
                let accepted = self.accept_vector(requested);
                if let Some(q) = self.selected() {
                    q.vector = accepted;
                    self.events.push(SimEvent::QueueVector {
                        queue: sel,
                        requested,
                        accepted,
                    });
                }
            }
            _ => self.bad(format!("legacy write {off}/{width} = {value:#x}")),
        }
    }

    // ---- BAR dispatch ----

    fn bar_len(&self, bar: u8) -> Option<u64> {
        match bar {
            BAR_LEGACY if self.has_legacy() => Some(self.legacy_bar_len()),
            BAR_MSIX if self.msix_vectors > 0 => Some(MSIX_BAR_LEN),
            BAR_MODERN if self.has_modern() => Some(MODERN_BAR_LEN),
            _ => None,
        }
    }

    fn in_bar(&mut self, bar: u8, off: u64, width: usize) -> bool {
        let ok = self
            .bar_len(bar)
            .is_some_and(|len| off.checked_add(width as u64).is_some_and(|e| e <= len));
        if !ok {
            self.bad(format!("BAR{bar} access {off:#x}/{width} out of range"));
        }
        ok
    }

    fn bar_read(&mut self, bar: u8, off: u64, width: usize) -> Option<u64> {
        if !self.in_bar(bar, off, width) {
            return None;
        }
        Some(match bar {
            BAR_LEGACY => self.legacy_read(off, width),
            BAR_MSIX => {
                let mut v = 0;
                for i in 0..width {
                    v |= u64::from(self.msix_table[off as usize + i]) << (8 * i);
                }
                v
            }
            _ => self.modern_read(off, width),
        })
    }

    fn bar_write(&mut self, bar: u8, off: u64, width: usize, value: u64) {
        if !self.in_bar(bar, off, width) {
            return;
        }
        match bar {
            BAR_LEGACY => self.legacy_write(off, width, value),
            BAR_MSIX => {
                if off < MSIX_PBA_OFFSET {
                    for i in 0..width {
                        self.msix_table[off as usize + i] = (value >> (8 * i)) as u8;
                    }
                }
            }
            _ => self.modern_write(off, width, value),
        }
    }

    // ---- interrupts ----

    /// Whether the device may access memory: Bus Master Enable is set (PCI Local Bus 3.0
    /// §6.2.2; QEMU's bus-master address space is disabled while it is clear). Counts a
    /// refusal.
    fn dma_allowed(&mut self) -> bool {
        let on = self.cfg[0x04] & COMMAND_BUS_MASTER != 0;
        if !on {
            self.dma_refused += 1;
        }
        on
    }

    fn raise(&mut self, source: IrqSource) {
        let (bit, vector) = match source {
            IrqSource::Queue(q) => (
                1,
                self.queues
                    .get(usize::from(q))
                    .map_or(NO_VECTOR, |q| q.vector),
            ),
            IrqSource::Config => (2, self.config_vector),
        };
        self.isr |= bit;
        if self.msix_enabled() {
            // An MSI-X message is a memory write: not sent without bus mastering.
            if vector == NO_VECTOR || !self.dma_allowed() || self.msix_control() & 0x4000 != 0 {
                self.dropped_interrupts += 1;
            } else {
                self.interrupts.push(SimInterrupt::Msix(vector));
            }
        } else if self.intx_pin {
            self.interrupts.push(SimInterrupt::Intx);
        } else {
            self.dropped_interrupts += 1;
        }
    }
}

/// The spec's fixed transitional ID of a type (virtio 1.2 §4.1.2.3; written out here rather
/// than taken from `virtio_pci::ids` so the model does not share the driver's table). Other
/// types have no fixed ID; any ID in 0x1000..=0x103F with the subsystem ID = type is a
/// transitional device, and the model uses 0x103F.
fn legacy_device_id(device_type: u32) -> u16 {
    match device_type {
        1 => 0x1000,
        2 => 0x1001,
        5 => 0x1002,
        3 => 0x1003,
        8 => 0x1004,
        4 => 0x1005,
        9 => 0x1009,
        _ => 0x103F,
    }
}

/// The device side of a simulated virtio-pci function, plus a test API.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Mutex<State>>,
}

/// PCI config space handle ([`PciConfigSpace`]).
#[derive(Clone)]
pub struct SimConfig {
    inner: Arc<Mutex<State>>,
}

/// BAR handle ([`BarAccess`]).
#[derive(Clone)]
pub struct SimBars {
    inner: Arc<Mutex<State>>,
}

/// Interrupt platform handle ([`InterruptPlatform`]): enabling MSI-X sets MSI-X Enable in
/// the capability, as a real platform would.
#[derive(Clone)]
pub struct SimIrq {
    inner: Arc<Mutex<State>>,
}

fn lock(inner: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the state from the others.
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sim {
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    pub fn config_space(&self) -> SimConfig {
        SimConfig {
            inner: self.inner.clone(),
        }
    }
    pub fn bars(&self) -> SimBars {
        SimBars {
            inner: self.inner.clone(),
        }
    }
    pub fn irq(&self) -> SimIrq {
        SimIrq {
            inner: self.inner.clone(),
        }
    }
    /// The guest memory the device side reads rings and buffers from.
    pub fn memory(&self) -> IdentityMemory {
        self.st().mem.clone()
    }

    // ---- inspection ----

    pub fn status(&self) -> u8 {
        self.st().status
    }
    pub fn driver_features(&self) -> u64 {
        self.st().driver_features
    }
    pub fn offered_features(&self) -> u64 {
        self.st().features
    }
    pub fn config_generation(&self) -> u8 {
        self.st().config_generation
    }
    pub fn config_vector(&self) -> u16 {
        self.st().config_vector
    }
    /// ISR value without reading (clearing) it.
    pub fn peek_isr(&self) -> u8 {
        self.st().isr
    }
    pub fn msix_enabled(&self) -> bool {
        self.st().msix_enabled()
    }
    pub fn events(&self) -> Vec<SimEvent> {
        self.st().events.clone()
    }
    pub fn clear_events(&self) {
        self.st().events.clear();
    }
    /// Accesses the model did not expect (wrong width, unknown registers, notify before
    /// DRIVER_OK, ...). A correct driver produces none.
    pub fn bad_accesses(&self) -> Vec<String> {
        self.st()
            .events
            .iter()
            .filter_map(|e| match e {
                SimEvent::BadAccess(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
    pub fn kicks(&self, queue: u16) -> u64 {
        self.st()
            .queues
            .get(usize::from(queue))
            .map_or(0, |q| q.kicks)
    }
    pub fn queue_info(&self, queue: u16) -> Option<QueueInfo> {
        let st = self.st();
        let q = st.queues.get(usize::from(queue))?;
        Some(QueueInfo {
            resetting: q.reset_reads_left > 0,
            max_size: q.max_size,
            size: q.size,
            vector: q.vector,
            enabled: q.enabled,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
            kicks: q.kicks,
            ready: q.packed.is_some() || q.queue.as_ref().is_some_and(|vq| vq.ready()),
            packed: q.packed.is_some(),
            event_idx: q.packed.as_ref().map_or_else(
                || q.queue.as_ref().is_some_and(|vq| vq.event_idx_enabled()),
                |p| p.event_idx,
            ),
            device_side: match &q.packed {
                Some(_) => Some((q.desc, q.driver, q.device)),
                None => q
                    .queue
                    .as_ref()
                    .map(|vq| (vq.desc_table(), vq.avail_ring(), vq.used_ring())),
            },
        })
    }
    /// The interrupt mode the platform handle enabled, if any.
    pub fn interrupt_mode(&self) -> Option<InterruptMode> {
        self.st().irq_mode
    }
    pub fn irq_calls(&self) -> Vec<IrqCall> {
        self.st().irq_calls.clone()
    }

    /// Initialisation steps derived from the recorded events.
    pub fn lifecycle(&self) -> Vec<LifecycleStep> {
        let st = self.st();
        let mut steps: Vec<LifecycleStep> = Vec::new();
        let mut status = 0u8;
        for e in &st.events {
            let mut push = |s: LifecycleStep, dedup: bool| {
                if !(dedup && steps.last() == Some(&s)) {
                    steps.push(s);
                }
            };
            match e {
                SimEvent::Reset => {
                    status = 0;
                    push(LifecycleStep::Reset, false);
                }
                SimEvent::Status { kept, written } => {
                    let new = written & !status;
                    for (bit, step) in [
                        (STATUS_ACK, LifecycleStep::Acknowledge),
                        (STATUS_DRIVER, LifecycleStep::Driver),
                        (STATUS_FEATURES_OK, LifecycleStep::FeaturesOk),
                        (STATUS_DRIVER_OK, LifecycleStep::DriverOk),
                        (STATUS_FAILED, LifecycleStep::Failed),
                    ] {
                        if new & bit != 0 && (bit != STATUS_FEATURES_OK || kept & bit != 0) {
                            push(step, false);
                        }
                    }
                    status = *kept;
                }
                SimEvent::DeviceFeaturesRead { .. } => push(LifecycleStep::FeaturesRead, true),
                SimEvent::DriverFeatures { .. } => push(LifecycleStep::FeaturesWritten, true),
                SimEvent::QueueEnabled { queue } => {
                    push(LifecycleStep::QueueEnabled(*queue), false)
                }
                _ => {}
            }
        }
        steps
    }

    /// Checks the last initialisation against virtio 1.2 §3.1.1: reset → ACKNOWLEDGE →
    /// DRIVER → features read → features written → FEATURES_OK (modern) → queues → DRIVER_OK.
    pub fn check_init_order(&self) -> Result<(), String> {
        let steps = self.lifecycle();
        let start = steps
            .iter()
            .rposition(|s| *s == LifecycleStep::Reset)
            .ok_or_else(|| format!("no reset in {steps:?}"))?;
        let steps = &steps[start..];
        let modern = self.driver_features() & F_VERSION_1 != 0;
        let rank = |s: &LifecycleStep| match s {
            LifecycleStep::Reset => 0,
            LifecycleStep::Acknowledge => 1,
            LifecycleStep::Driver => 2,
            LifecycleStep::FeaturesRead => 3,
            LifecycleStep::FeaturesWritten => 4,
            LifecycleStep::FeaturesOk => 5,
            LifecycleStep::QueueEnabled(_) => 6,
            LifecycleStep::DriverOk => 7,
            LifecycleStep::Failed => 8,
        };
        let mut last = 0;
        for s in steps {
            let r = rank(s);
            if r < last {
                return Err(format!("{s:?} out of order in {steps:?}"));
            }
            last = r;
        }
        let mut required = vec![
            LifecycleStep::Acknowledge,
            LifecycleStep::Driver,
            LifecycleStep::FeaturesRead,
            LifecycleStep::FeaturesWritten,
            LifecycleStep::DriverOk,
        ];
        if modern {
            required.push(LifecycleStep::FeaturesOk);
        }
        for r in required {
            if !steps.contains(&r) {
                return Err(format!("{r:?} missing in {steps:?}"));
            }
        }
        Ok(())
    }

    // ---- interrupts ----

    /// Interrupts sent since the last call, in order.
    pub fn take_interrupts(&self) -> Vec<SimInterrupt> {
        std::mem::take(&mut self.st().interrupts)
    }
    /// Interrupts sent and not yet taken.
    pub fn interrupts(&self) -> Vec<SimInterrupt> {
        self.st().interrupts.clone()
    }
    /// Interrupts that could not be delivered (MSI-X on with NO_VECTOR, masked, or no pin).
    pub fn dropped_interrupts(&self) -> u64 {
        self.st().dropped_interrupts
    }
    /// Makes the device refuse this MSI-X vector (reads back NO_VECTOR).
    pub fn reject_vector(&self, vector: u16) {
        self.st().rejected_vectors.insert(vector);
    }
    /// Makes the platform handle refuse `enable_msix` with more than `max` vectors.
    pub fn limit_platform_vectors(&self, max: u16) {
        self.st().max_platform_vectors = max;
    }

    // ---- device-side changes ----

    /// Changes device config bytes, bumps `config_generation` and sends a config interrupt.
    pub fn set_device_config(&self, offset: usize, bytes: &[u8]) {
        let mut st = self.st();
        let end = offset + bytes.len();
        if st.dev_config.len() < end {
            st.dev_config.resize(end, 0);
        }
        st.dev_config[offset..end].copy_from_slice(bytes);
        st.config_generation = st.config_generation.wrapping_add(1);
        st.raise(IrqSource::Config);
    }
    pub fn device_config(&self) -> Vec<u8> {
        self.st().dev_config.clone()
    }
    /// The next `reads` device-config reads each bump `config_generation` (a device whose
    /// config keeps changing under the driver).
    pub fn set_generation_churn(&self, reads: u32) {
        self.st().generation_churn = reads;
    }
    /// Changes the largest size the device offers for `queue` (`queue_size` in the common
    /// configuration, §4.1.4.3): the driver sees it when it next sets the queue up (a
    /// device that comes back from a reset with larger rings).
    pub fn set_queue_max_size(&self, queue: u16, max_size: u16) {
        if let Some(q) = self.st().queues.get_mut(usize::from(queue)) {
            q.max_size = max_size;
        }
    }
    /// While `refused`, writing 0 to the device status resets nothing: status keeps reading
    /// what it was (a broken device the driver cannot stop).
    pub fn refuse_reset(&self, refused: bool) {
        self.st().reset_refused = refused;
    }
    /// While `stuck`, Bus Master Enable cannot be cleared (it reads back set), so a driver
    /// cannot stop the device's DMA.
    pub fn stick_bus_master(&self, stuck: bool) {
        let mut st = self.st();
        st.bus_master_stuck = stuck;
        if stuck {
            st.cfg[0x04] |= COMMAND_BUS_MASTER;
        }
    }
    /// Bus Master Enable is set: the device may read and write memory.
    pub fn bus_master(&self) -> bool {
        self.st().cfg[0x04] & COMMAND_BUS_MASTER != 0
    }
    /// Whether the device can touch memory the driver gave it: not when it is reset
    /// (status 0: it uses no driver memory, §2.1.2), nor when bus mastering is off.
    pub fn may_dma(&self) -> bool {
        let st = self.st();
        st.status != 0 && st.cfg[0x04] & COMMAND_BUS_MASTER != 0
    }
    /// Times bus mastering was turned on while the device was not reset (its status not
    /// 0): a driver must reset a device before letting it at memory.
    pub fn bus_master_on_unreset(&self) -> u64 {
        self.st().bus_master_on_unreset
    }
    /// Device memory accesses refused so far because bus mastering was off.
    pub fn dma_refused(&self) -> u64 {
        self.st().dma_refused
    }
    /// Sets DEVICE_NEEDS_RESET and sends a config interrupt (virtio 1.2 §2.1.2).
    pub fn trigger_needs_reset(&self) {
        let mut st = self.st();
        st.status |= STATUS_NEEDS_RESET;
        st.raise(IrqSource::Config);
    }
    /// Changes the features the device offers from now on (a device that comes back
    /// from a reset, e.g. after the host's sleep, offering a different set).
    pub fn set_offered_features(&self, features: u64) {
        self.st().features = features;
    }
    /// Number of device resets (status 0 written, or a legacy zero PFN) since the
    /// function was built (not cleared by [`Sim::clear_events`]).
    pub fn resets(&self) -> u64 {
        self.st().resets
    }
    /// Sends a config-change interrupt without changing anything.
    pub fn raise_config_interrupt(&self) {
        self.st().raise(IrqSource::Config);
    }

    // ---- raw config space (capability tests) ----

    pub fn read_config_raw(&self, offset: usize, len: usize) -> Vec<u8> {
        self.st().cfg[offset..offset + len].to_vec()
    }
    /// Writes config-space bytes directly (bypassing register semantics).
    pub fn write_config_raw(&self, offset: usize, bytes: &[u8]) {
        self.st().put(offset, bytes);
    }
    /// Inserts a 20-byte virtio vendor capability at the head of the capability list, in
    /// the next free slot, and returns its offset. `multiplier` is written as the trailing
    /// dword (NOTIFY's `notify_off_multiplier`).
    pub fn insert_vendor_cap(
        &self,
        cfg_type: u8,
        bar: u8,
        offset: u32,
        length: u32,
        multiplier: u32,
    ) -> u8 {
        let mut st = self.st();
        let slot = *FREE_CAP_SLOTS
            .get(st.next_free_cap)
            .expect("no free capability slot left");
        st.next_free_cap += 1;
        let head = st.cfg[0x34];
        st.vendor_cap(slot, head, cfg_type, bar, offset, length, Some(multiplier));
        st.cfg[0x34] = slot;
        st.cfg[0x06] |= 0x10;
        slot
    }

    // ---- serving queues ----

    /// Pops every available chain of `queue` (device side).
    pub fn pop_chains(&self, queue: u16) -> Vec<Chain> {
        let mut st = self.st();
        if !st.dma_allowed() {
            return Vec::new();
        }
        let mem = st.mem.clone();
        if let Some(p) = st.packed_mut(queue) {
            return p.pop_all();
        }
        let Some(vq) = st
            .queues
            .get_mut(usize::from(queue))
            .and_then(|q| q.queue.as_mut())
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(chain) = vq.pop_descriptor_chain(mem.guest_memory()) {
            let head = chain.head_index();
            let descs = chain
                .map(|d: Descriptor| SimDesc {
                    addr: d.addr().0,
                    len: d.len(),
                    write_only: d.is_write_only(),
                })
                .collect();
            out.push(Chain { head, descs });
        }
        out
    }

    /// The bytes of a chain's device-readable descriptors, concatenated.
    pub fn read_chain(&self, chain: &Chain) -> Vec<u8> {
        if !self.st().dma_allowed() {
            return Vec::new();
        }
        let mem = self.memory();
        let mut out = Vec::new();
        for d in chain.descs.iter().filter(|d| !d.write_only) {
            let mut buf = vec![0u8; d.len as usize];
            mem.guest_memory()
                .read_slice(&mut buf, GuestAddress(d.addr))
                .expect("readable descriptor outside guest memory");
            out.extend_from_slice(&buf);
        }
        out
    }

    /// Writes `data` across a chain's device-writable descriptors; returns bytes written.
    pub fn write_chain(&self, chain: &Chain, data: &[u8]) -> u32 {
        if !self.st().dma_allowed() {
            return 0;
        }
        let mem = self.memory();
        let mut rest = data;
        let mut written = 0u32;
        for d in chain.descs.iter().filter(|d| d.write_only) {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(d.len as usize);
            mem.guest_memory()
                .write_slice(&rest[..n], GuestAddress(d.addr))
                .expect("writable descriptor outside guest memory");
            rest = &rest[n..];
            written += n as u32;
        }
        written
    }

    /// Puts `head` on the used ring with `written_len` bytes.
    pub fn complete(&self, queue: u16, head: u16, written_len: u32) {
        let mut st = self.st();
        if !st.dma_allowed() {
            return;
        }
        let mem = st.mem.clone();
        if let Some(p) = st.packed_mut(queue) {
            p.return_used(head, written_len);
            return;
        }
        let vq = st
            .queues
            .get_mut(usize::from(queue))
            .and_then(|q| q.queue.as_mut())
            .expect("complete on a queue that is not enabled");
        vq.add_used(mem.guest_memory(), head, written_len)
            .expect("add_used");
    }

    /// Writes a raw used-ring entry (any id/len, for hostile-device tests) and advances
    /// the used index by one.
    pub fn complete_raw(&self, queue: u16, id: u32, len: u32) {
        let mut st = self.st();
        if !st.dma_allowed() {
            return;
        }
        let mem = st.mem.clone();
        if let Some(p) = st.packed_mut(queue) {
            // Everything available is read first, so a forged id is either one the device
            // holds (an out-of-order completion with any length) or one it does not (a lie
            // the driver must refuse, or cannot tell from a later buffer's completion),
            // never a buffer still waiting in the ring. A used descriptor carries 16 bits
            // of id (a larger one is truncated). Dropped when the used position has
            // reached the read position (`PackedDevice::return_used`).
            let read = p.pop_all();
            p.unclaimed = read;
            p.return_used(id as u16, len);
            return;
        }
        let vq = st
            .queues
            .get_mut(usize::from(queue))
            .and_then(|q| q.queue.as_mut())
            .expect("complete_raw on a queue that is not enabled");
        let next = vq.next_used();
        let slot = u64::from(next % vq.size());
        let used = vq.used_ring();
        let gm = mem.guest_memory();
        gm.write_obj(id, GuestAddress(used + 4 + slot * 8))
            .expect("used ring");
        gm.write_obj(len, GuestAddress(used + 8 + slot * 8))
            .expect("used ring");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        gm.write_obj(next.wrapping_add(1), GuestAddress(used + 2))
            .expect("used ring");
        vq.set_next_used(next.wrapping_add(1));
    }

    /// Sends the queue's interrupt if the driver wants one (EVENT_IDX `used_event`, else the
    /// avail ring's NO_INTERRUPT flag). Returns whether it was sent.
    pub fn signal_used(&self, queue: u16) -> bool {
        let mut st = self.st();
        // The split ring's flags or used_event are read from memory.
        if !st.dma_allowed() {
            return false;
        }
        let mem = st.mem.clone();
        if let Some(p) = st.packed_mut(queue) {
            let needed = p.device.needs_interrupt();
            if needed {
                st.raise(IrqSource::Queue(queue));
            }
            return needed;
        }
        let Some(vq) = st
            .queues
            .get_mut(usize::from(queue))
            .and_then(|q| q.queue.as_mut())
        else {
            return false;
        };
        let gm = mem.guest_memory();
        let needed = vq.needs_notification(gm).unwrap_or(true);
        let suppressed = !vq.event_idx_enabled()
            && gm
                .read_obj::<u16>(GuestAddress(vq.avail_ring()))
                .is_ok_and(|flags| flags & 1 != 0);
        if needed && !suppressed {
            st.raise(IrqSource::Queue(queue));
            true
        } else {
            false
        }
    }

    /// Serves every available chain of `queue` with `f` (which returns the bytes written),
    /// then signals once. Returns the number of chains served.
    pub fn serve(&self, queue: u16, mut f: impl FnMut(&Chain) -> u32) -> usize {
        let chains = self.pop_chains(queue);
        for c in &chains {
            let len = f(c);
            self.complete(queue, c.head, len);
        }
        if !chains.is_empty() {
            self.signal_used(queue);
        }
        chains.len()
    }

    /// Makes the device react to every queue notification with `hook` (called after the
    /// notifying register write, with the queue index), e.g. a device that answers each
    /// kick at once. `None` removes it.
    pub fn on_notify(&self, hook: Option<NotifyHook>) {
        let mut st = self.st();
        st.notify_hook = hook;
        st.pending_notifies.clear();
    }

    /// A short human-readable dump of the device state (for failing tests).
    pub fn describe(&self) -> String {
        let st = self.st();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "mode {:?} type {} status {:#x} features {:#x}/{:#x} msix {} isr {:#x}",
            st.mode,
            st.device_type,
            st.status,
            st.driver_features,
            st.features,
            st.msix_enabled(),
            st.isr
        );
        for (i, q) in st.queues.iter().enumerate() {
            let _ = writeln!(
                s,
                "  q{i}: size {}/{} vec {:#x} en {} desc {:#x} kicks {}",
                q.size, q.max_size, q.vector, q.enabled, q.desc, q.kicks
            );
            if let Some(p) = &q.packed {
                let _ = writeln!(
                    s,
                    "      packed: {} held, {} returns dropped",
                    p.device.held(),
                    p.dropped
                );
            }
        }
        s
    }
}

impl PciConfigSpace for SimConfig {
    fn read8(&self, offset: u16) -> u8 {
        lock(&self.inner).cfg_read(offset, 1) as u8
    }
    fn read16(&self, offset: u16) -> u16 {
        lock(&self.inner).cfg_read(offset, 2) as u16
    }
    fn read32(&self, offset: u16) -> u32 {
        lock(&self.inner).cfg_read(offset, 4) as u32
    }
    fn write8(&self, offset: u16, value: u8) {
        lock(&self.inner).cfg_write(offset, 1, value.into());
    }
    fn write16(&self, offset: u16, value: u16) {
        lock(&self.inner).cfg_write(offset, 2, value.into());
    }
    fn write32(&self, offset: u16, value: u32) {
        lock(&self.inner).cfg_write(offset, 4, value.into());
    }
}

impl BarAccess for SimBars {
    fn bar_len(&self, bar: u8) -> Option<u64> {
        lock(&self.inner).bar_len(bar)
    }
    fn bar_is_io(&self, bar: u8) -> bool {
        bar == BAR_LEGACY && lock(&self.inner).has_legacy()
    }
    fn read8(&self, bar: u8, offset: u64) -> Option<u8> {
        lock(&self.inner).bar_read(bar, offset, 1).map(|v| v as u8)
    }
    fn read16(&self, bar: u8, offset: u64) -> Option<u16> {
        lock(&self.inner).bar_read(bar, offset, 2).map(|v| v as u16)
    }
    fn read32(&self, bar: u8, offset: u64) -> Option<u32> {
        lock(&self.inner).bar_read(bar, offset, 4).map(|v| v as u32)
    }
    fn write8(&self, bar: u8, offset: u64, value: u8) {
        self.write_and_react(bar, offset, 1, value.into());
    }
    fn write16(&self, bar: u8, offset: u64, value: u16) {
        self.write_and_react(bar, offset, 2, value.into());
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) {
        self.write_and_react(bar, offset, 4, value.into());
    }
}

impl SimBars {
    /// A BAR write, then the notify hook for each queue it notified (outside the lock, so
    /// the hook may serve queues like a device thread would).
    fn write_and_react(&self, bar: u8, offset: u64, width: usize, value: u64) {
        let (hook, queues) = {
            let mut st = lock(&self.inner);
            st.bar_write(bar, offset, width, value);
            (
                st.notify_hook.clone(),
                std::mem::take(&mut st.pending_notifies),
            )
        };
        if let Some(hook) = hook {
            let sim = Sim {
                inner: Arc::clone(&self.inner),
            };
            for queue in queues {
                hook(&sim, queue);
            }
        }
    }
}

impl InterruptPlatform for SimIrq {
    fn enable_msix(&mut self, vectors: u16) -> bool {
        let mut st = lock(&self.inner);
        let granted =
            vectors > 0 && vectors <= st.msix_vectors && vectors <= st.max_platform_vectors;
        if granted {
            st.set_msix_control(true, Some(false));
            st.irq_mode = Some(InterruptMode::MsiX { vectors });
        }
        st.irq_calls.push(IrqCall::EnableMsix { vectors, granted });
        granted
    }
    fn enable_intx(&mut self) -> bool {
        let mut st = lock(&self.inner);
        let granted = st.intx_pin;
        if granted {
            st.set_msix_control(false, None);
            st.irq_mode = Some(InterruptMode::Intx);
        }
        st.irq_calls.push(IrqCall::EnableIntx { granted });
        granted
    }
    fn disable(&mut self) {
        let mut st = lock(&self.inner);
        st.set_msix_control(false, None);
        st.irq_mode = None;
        st.irq_calls.push(IrqCall::Disable);
    }
}

/// A minimal driver-side split ring written with plain memory accesses, so transport tests
/// can exercise the device side without the real virtqueue (which `virtio-core` tests).
pub struct TestRing {
    mem: IdentityMemory,
    pub size: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl TestRing {
    /// A ring of `size` entries; `legacy` lays it out as one 4096-aligned area (virtio 1.2
    /// §2.7.2 legacy), otherwise as three separately allocated areas.
    pub fn new(mem: &IdentityMemory, size: u16, legacy: bool) -> Self {
        use virtio_core::platform::Dma;
        let n = u64::from(size);
        let (desc, driver, device) = if legacy {
            let used_off = (16 * n + 6 + 2 * n).next_multiple_of(4096);
            let total = used_off + 6 + 8 * n;
            let r = mem
                .alloc_coherent(total as usize, 4096)
                .expect("ring memory");
            (r.daddr, r.daddr + 16 * n, r.daddr + used_off)
        } else {
            let d = mem
                .alloc_coherent(16 * size as usize, 16)
                .expect("ring memory");
            let a = mem
                .alloc_coherent(6 + 2 * size as usize, 2)
                .expect("ring memory");
            let u = mem
                .alloc_coherent(6 + 8 * size as usize, 4)
                .expect("ring memory");
            (d.daddr, a.daddr, u.daddr)
        };
        TestRing {
            mem: mem.clone(),
            size,
            desc,
            driver,
            device,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn addrs(&self) -> virtio_core::transport::RingAddresses {
        virtio_core::transport::RingAddresses {
            desc: self.desc,
            driver: self.driver,
            device: self.device,
        }
    }

    /// Posts one chain (device-readable segments, then device-writable) and publishes it.
    /// Returns the head index.
    pub fn post(&mut self, readable: &[(u64, u32)], writable: &[(u64, u32)]) -> u16 {
        let gm = self.mem.guest_memory();
        let head = self.next_desc;
        let segs: Vec<(u64, u32, bool)> = readable
            .iter()
            .map(|&(a, l)| (a, l, false))
            .chain(writable.iter().map(|&(a, l)| (a, l, true)))
            .collect();
        for (i, &(addr, len, w)) in segs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let more = i + 1 < segs.len();
            let flags: u16 = u16::from(more) | if w { 2 } else { 0 };
            let at = GuestAddress(self.desc + 16 * u64::from(idx));
            gm.write_obj(addr, at).expect("desc");
            gm.write_obj(len, GuestAddress(at.0 + 8)).expect("desc");
            gm.write_obj(flags, GuestAddress(at.0 + 12)).expect("desc");
            gm.write_obj(if more { next } else { 0 }, GuestAddress(at.0 + 14))
                .expect("desc");
            self.next_desc = next;
        }
        let slot = u64::from(self.avail_idx % self.size);
        gm.write_obj(head, GuestAddress(self.driver + 4 + 2 * slot))
            .expect("avail");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        gm.write_obj(self.avail_idx, GuestAddress(self.driver + 2))
            .expect("avail");
        head
    }

    /// Sets or clears VRING_AVAIL_F_NO_INTERRUPT.
    pub fn set_no_interrupt(&self, on: bool) {
        self.mem
            .guest_memory()
            .write_obj(u16::from(on), GuestAddress(self.driver))
            .expect("avail flags");
    }

    /// Writes `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        let at = self.driver + 4 + 2 * u64::from(self.size);
        self.mem
            .guest_memory()
            .write_obj(value, GuestAddress(at))
            .expect("used_event");
    }

    /// New used entries since the last call, as (id, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let gm = self.mem.guest_memory();
        let idx: u16 = gm
            .read_obj(GuestAddress(self.device + 2))
            .expect("used idx");
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let id: u32 = gm
                .read_obj(GuestAddress(self.device + 4 + 8 * slot))
                .expect("used");
            let len: u32 = gm
                .read_obj(GuestAddress(self.device + 8 + 8 * slot))
                .expect("used");
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}

/// DMA memory over the function's [`IdentityMemory`] that checks, whenever a region is
/// freed, that the device can no longer use it: it is reset (status 0, §2.1.2) or its bus
/// mastering is off ([`Sim::may_dma`]). A live device may still write to a ring or buffer
/// it was given (§2.4), and freed memory goes to someone else. Panics otherwise.
#[derive(Clone)]
pub struct FreedOnlyWhenQuiet {
    pub mem: IdentityMemory,
    pub sim: Sim,
}

impl FreedOnlyWhenQuiet {
    pub fn new(sim: &Sim) -> Self {
        FreedOnlyWhenQuiet {
            mem: sim.memory(),
            sim: sim.clone(),
        }
    }
}

impl virtio_core::platform::Dma for FreedOnlyWhenQuiet {
    fn alloc_coherent(
        &self,
        len: usize,
        align: usize,
    ) -> virtio_core::Result<virtio_core::platform::DmaRegion> {
        self.mem.alloc_coherent(len, align)
    }
    unsafe fn free_coherent(&self, region: virtio_core::platform::DmaRegion) {
        assert!(
            !self.sim.may_dma(),
            "a DMA region freed while the device may use it (status {:#x}, bus master {})",
            self.sim.status(),
            self.sim.bus_master()
        );
        // SAFETY: the caller's contract, passed on.
        unsafe { self.mem.free_coherent(region) }
    }
    fn map(
        &self,
        vaddr: std::ptr::NonNull<u8>,
        len: usize,
        dir: virtio_core::platform::DmaDirection,
    ) -> virtio_core::Result<virtio_core::platform::DeviceAddr> {
        self.mem.map(vaddr, len, dir)
    }
    fn unmap(
        &self,
        daddr: virtio_core::platform::DeviceAddr,
        len: usize,
        dir: virtio_core::platform::DmaDirection,
    ) {
        self.mem.unmap(daddr, len, dir)
    }
}
