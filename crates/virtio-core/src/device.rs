//! [`VirtioDevice`]: the in-process bus over any [`Transport`] — the spec's initialisation
//! order, feature negotiation, queue and interrupt-vector setup with fallback, config
//! access consistent across generations, and interrupt demultiplexing.

use alloc::vec::Vec;

use crate::bus::{Bus, InterruptCause, QueueMask, QueueSpec};
use crate::error::{Error, Result};
use crate::packed::{PackedQueue, PackedRingLayout};
use crate::platform::{Dma, InterruptMode, InterruptPlatform};
use crate::queue::{QueueConfig, QueueStats, Segment, SplitQueue, Used};
use crate::ring::{MAX_QUEUE_SIZE, SplitRingLayout};
use crate::transport::{NO_VECTOR, Transport};
use crate::types::{DeviceStatus, DeviceType, Features, RingLayoutKind};
use crate::virtqueue::Virtqueue;

/// Bounded waits: status polls after reset, and config re-reads while the generation moves.
const RESET_POLLS: u32 = 1_000_000;
const CONFIG_RETRIES: u32 = 64;

/// Generic features the bus implements and accepts when offered, unless masked.
/// (See [`Features::RING_SUPPORTED`] for what is refused and why; NOTIFY_ON_EMPTY and
/// ANY_LAYOUT only when the device driver asks, since they change its behaviour.)
pub const BUS_FEATURES: Features = Features::INDIRECT_DESC
    .union(Features::EVENT_IDX)
    .union(Features::VERSION_1)
    .union(Features::ACCESS_PLATFORM)
    .union(Features::RING_PACKED);

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Reset,
    FeaturesOk,
    QueuesReady,
    DriverOk,
    Failed,
}

/// How interrupt vectors map to queues.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum VectorPlan {
    /// Vector 0: config; vector k+1: k-th queue that wants interrupts.
    PerQueue,
    /// Vector 0: config; vector 1: every queue.
    Shared,
    /// INTx or polling: the ISR says what happened.
    Isr,
}

/// The queues one MSI-X vector serves: as the bus reports them (`mask`, queues 0..128)
/// and every one by index (`indices`, for their interrupt counts).
#[derive(Clone, Default)]
struct VectorQueues {
    mask: QueueMask,
    indices: Vec<u16>,
}

struct QueueSlot {
    queue: Virtqueue,
    interrupts: bool,
    /// MSI-X vector this queue raises, or NO_VECTOR.
    vector: u16,
}

/// One virtio device driven through a transport `T`, with DMA `D` and interrupts `I`.
pub struct VirtioDevice<T: Transport, D: Dma, I: InterruptPlatform> {
    transport: T,
    dma: D,
    irq: I,
    state: State,
    offered: Features,
    negotiated: Features,
    driver_features: Features,
    /// Bits the platform forbids (e.g. a test turning EVENT_IDX off).
    mask: Features,
    /// Modern transports require VERSION_1; legacy ones cannot have it.
    queues: Vec<Option<QueueSlot>>,
    /// Statistics of queues released by a reset, per queue index: `queue_stats` adds them
    /// to the live queue's, so counters span resets (suspend/resume, restarts).
    retired_stats: Vec<QueueStats>,
    mode: InterruptMode,
    plan: VectorPlan,
    /// Interrupts seen per vector (index 0.. for MSI-X; `isr_interrupts` for INTx/poll).
    vector_interrupts: Vec<u64>,
    /// Per MSI-X vector: the queues with interrupts that raise it (built once the queues
    /// are set up), so an interrupt does not search the queue table.
    vector_queues: Vec<VectorQueues>,
    isr_interrupts: u64,
    spurious_interrupts: u64,
    /// Where the device's DMA switch ([`Transport::stop_dma`] / [`Transport::restart_dma`])
    /// stands, as far as we set it.
    dma_switch: DmaSwitch,
}

/// The device's DMA switch (PCI: Bus Master Enable), as [`VirtioDevice`] set it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum DmaSwitch {
    /// Not turned on by us yet, whatever the platform left it as: firmware may have left
    /// the device running on rings in memory the OS now owns, so the VirtioFamily shim turns
    /// bus mastering off before handing the function over, and it comes on only once the
    /// device has reset (§2.1.2: a reset device uses no driver memory).
    NotYetOn,
    /// Turned on after a reset the device acknowledged.
    On,
    /// Cut off ([`Transport::stop_dma`]) after the device would not reset; turned back on
    /// by the next reset it acknowledges.
    Stopped,
}

impl<T: Transport, D: Dma, I: InterruptPlatform> VirtioDevice<T, D, I> {
    pub fn new(transport: T, dma: D, irq: I) -> Self {
        VirtioDevice {
            transport,
            dma,
            irq,
            state: State::Reset,
            offered: Features::empty(),
            negotiated: Features::empty(),
            driver_features: Features::empty(),
            mask: Features::empty(),
            queues: Vec::new(),
            retired_stats: Vec::new(),
            mode: InterruptMode::Polling,
            plan: VectorPlan::Isr,
            vector_interrupts: Vec::new(),
            vector_queues: Vec::new(),
            isr_interrupts: 0,
            spurious_interrupts: 0,
            dma_switch: DmaSwitch::NotYetOn,
        }
    }

    /// Never accept these bits, even if the driver and device both support them.
    pub fn set_feature_mask(&mut self, mask: Features) {
        self.mask = mask;
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }
    pub fn interrupt_platform(&mut self) -> &mut I {
        &mut self.irq
    }
    /// The interrupt platform, shared (e.g. to read its counters).
    pub fn interrupts(&self) -> &I {
        &self.irq
    }

    /// Interrupts taken per MSI-X vector (empty without MSI-X), and through the ISR.
    pub fn interrupt_counts(&self) -> (&[u64], u64) {
        (&self.vector_interrupts, self.isr_interrupts)
    }
    /// Interrupts that found nothing to do (INTx shared line, ISR 0).
    pub fn spurious_interrupts(&self) -> u64 {
        self.spurious_interrupts
    }

    /// Writes 0 and waits until the device reads back 0 (§2.1.2, §4.1.4.3.2). The device's
    /// DMA is turned on here when we have not turned it on yet (the first reset) or
    /// stopped it since, once the reset is acknowledged: reset, it uses no driver memory
    /// until its queues are set up again (§2.1.2, §3.1.1), and it needs bus mastering for
    /// them. Err(ResetTimeout) when the device did not reset, or when its DMA could not be
    /// turned on (then it stays off: the device is quiet, but unusable).
    fn reset_device(&mut self) -> Result<()> {
        self.transport.set_status(DeviceStatus::empty());
        for _ in 0..RESET_POLLS {
            if self.transport.status().is_empty() {
                if self.dma_switch != DmaSwitch::On {
                    if !self.transport.restart_dma() {
                        // Without bus mastering the device cannot run its queues: fail the
                        // initialisation now rather than hang on requests that never
                        // complete. DMA stays off (the device stays quiet).
                        log::error!(
                            "virtio {}: the device reset but its DMA cannot be turned on",
                            self.transport.device_type().name()
                        );
                        return Err(Error::ResetTimeout);
                    }
                    self.dma_switch = DmaSwitch::On;
                }
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::ResetTimeout)
    }

    /// Makes sure the device can no longer touch memory: a reset it acknowledges, or, when
    /// it will not reset, the transport's DMA switch (PCI: Bus Master Enable cleared and
    /// read back, [`Transport::stop_dma`]). Err(ResetTimeout) when neither worked: the
    /// device may still read and write everything it was given.
    fn quiesce(&mut self) -> Result<()> {
        let Err(e) = self.reset_device() else {
            return Ok(());
        };
        if self.transport.stop_dma() {
            if self.dma_switch != DmaSwitch::Stopped {
                log::error!(
                    "virtio {}: the device did not reset; its DMA is stopped (bus mastering off)",
                    self.transport.device_type().name()
                );
            }
            self.dma_switch = DmaSwitch::Stopped;
            return Ok(());
        }
        log::error!(
            "virtio {}: the device did not reset and its DMA cannot be stopped",
            self.transport.device_type().name()
        );
        Err(e)
    }

    /// Whether the device's DMA is stopped because it would not reset (tests, reports).
    pub fn dma_stopped(&self) -> bool {
        self.dma_switch == DmaSwitch::Stopped
    }

    fn add_status(&mut self, bits: DeviceStatus) {
        let s = self.transport.status();
        self.transport.set_status(s | bits);
    }

    fn fail(&mut self, e: Error) -> Error {
        log::error!(
            "virtio {}: {e}; marking device FAILED",
            self.transport.device_type().name()
        );
        Bus::fail(self);
        e
    }

    /// Takes every queue down: tokens in flight go to `reclaim`, statistics are kept, the
    /// rings are freed, interrupts are disabled. `device_quiet`: the device cannot use the
    /// rings any more (it was reset, its DMA is stopped, or it never reached DRIVER_OK,
    /// §2.1.2); otherwise the rings are left allocated, for ever: a device that would not
    /// reset may still write to them, and freed memory would be handed to someone else.
    fn release_queues(&mut self, reclaim: &mut dyn FnMut(u16, usize), device_quiet: bool) {
        let mut leaked = 0usize;
        for slot in self.queues.drain(..).flatten() {
            let mut q = slot.queue;
            let index = q.index();
            // A device that is not quiet may still read and write the ring: its tokens come
            // back without the ring being touched (no zeroing), and it is leaked below.
            match (&mut q, device_quiet) {
                (q, true) => q.reclaim_after_reset(|t| reclaim(index, t)),
                (Virtqueue::Split(q), false) => q.reclaim_abandoned(|t| reclaim(index, t)),
                (Virtqueue::Packed(q), false) => q.reclaim_abandoned(|t| reclaim(index, t)),
            }
            let slot = usize::from(index);
            if self.retired_stats.len() <= slot {
                self.retired_stats.resize(slot + 1, QueueStats::default());
            }
            if let Some(retired) = self.retired_stats.get_mut(slot) {
                *retired += q.stats();
            }
            let (ring, indirect) = q.into_regions();
            if !device_quiet {
                leaked += ring.len + indirect.map_or(0, |p| p.len);
                continue;
            }
            // SAFETY: `device_quiet`: the device was reset, its DMA stopped, or it never
            // started, so it no longer accesses the rings; the regions came from `self.dma`.
            unsafe {
                self.dma.free_coherent(ring);
                if let Some(p) = indirect {
                    self.dma.free_coherent(p);
                }
            }
        }
        if leaked > 0 {
            log::error!(
                "virtio {}: the device did not reset; its rings ({leaked} bytes) stay allocated",
                self.transport.device_type().name()
            );
        }
        self.irq.disable();
        self.transport.set_msix_enabled(false);
        self.mode = InterruptMode::Polling;
        self.plan = VectorPlan::Isr;
        self.vector_interrupts.clear();
        self.vector_queues.clear();
    }

    fn negotiate(&mut self, driver: Features) -> Result<Features> {
        // §3.1.1 steps 1–3.
        self.reset_device()?;
        self.add_status(DeviceStatus::ACKNOWLEDGE);
        self.add_status(DeviceStatus::DRIVER);
        // Step 4.
        let offered = Features::from_bits_retain(self.transport.device_features());
        self.offered = offered;
        let legacy = self.transport.ring_layout() == RingLayoutKind::Legacy;
        let wanted = (driver | BUS_FEATURES) & !self.mask;
        // Generic bits: only those the ring code implements; device bits: what the driver
        // asked. Bit 30 is excluded by construction (not in RING_SUPPORTED nor device range).
        let allowed =
            Features::RING_SUPPORTED | Features::from_bits_retain(Features::DEVICE_SPECIFIC);
        let mut accept = offered & wanted & allowed;
        accept.remove(Features::BAD_FEATURE);
        if legacy {
            // A legacy interface has 32 feature bits; VERSION_1 cannot be negotiated there.
            accept = Features::from_bits_retain(accept.bits() & 0xFFFF_FFFF);
        } else if !accept.contains(Features::VERSION_1) {
            // §6.1: a modern driver MUST accept VERSION_1; a device that lacks it is legacy.
            return Err(self.fail(Error::MissingFeature { bit: 32 }));
        }
        self.transport.set_driver_features(accept.bits());
        if !legacy {
            // Steps 5–6: FEATURES_OK, then re-read it (§3.1.1). Legacy devices have no
            // FEATURES_OK (§3.1.2).
            self.add_status(DeviceStatus::FEATURES_OK);
            if !self.transport.status().contains(DeviceStatus::FEATURES_OK) {
                return Err(self.fail(Error::FeaturesNotAccepted {
                    offered: offered.bits(),
                    requested: accept.bits(),
                }));
            }
        }
        self.negotiated = accept;
        self.driver_features = driver;
        self.state = State::FeaturesOk;
        log::debug!(
            "virtio {}: offered {:#x}, negotiated {:#x}",
            self.transport.device_type().name(),
            offered.bits(),
            accept.bits()
        );
        Ok(accept)
    }

    fn queue_size_for(&mut self, spec: &QueueSpec) -> Result<u16> {
        let max = self.transport.max_queue_size(spec.index);
        if max == 0 {
            return Err(Error::NoSuchQueue { queue: spec.index });
        }
        // Legacy: the size is fixed by the device (§4.1.5.1.3 legacy). Its power-of-two-ness
        // is checked by `SplitRingLayout::new`.
        if !self.transport.queue_size_settable() {
            return Ok(max);
        }
        let max = max.min(MAX_QUEUE_SIZE);
        let want = if spec.size == 0 {
            max
        } else {
            spec.size.min(max)
        };
        // Largest power of two <= want (a device max that is not a power of two is allowed
        // for modern devices; we then use less).
        Ok(1 << (15 - want.leading_zeros()))
    }

    fn build_queue(&mut self, spec: &QueueSpec) -> Result<Virtqueue> {
        let size = self.queue_size_for(spec)?;
        let packed = self.negotiated.contains(Features::RING_PACKED);
        let (total, align) = if packed {
            let l = PackedRingLayout::new(size).ok_or(Error::BadQueueSize {
                queue: spec.index,
                size,
            })?;
            (l.total, l.align)
        } else {
            let l = SplitRingLayout::new(self.transport.ring_layout(), size).ok_or(
                Error::BadQueueSize {
                    queue: spec.index,
                    size,
                },
            )?;
            (l.total, l.align)
        };
        let ring = self.dma.alloc_coherent(total, align)?;
        let max_indirect = if self.negotiated.contains(Features::INDIRECT_DESC) {
            spec.max_indirect.min(size)
        } else {
            0
        };
        let indirect = if max_indirect > 1 {
            match self
                .dma
                .alloc_coherent(size as usize * max_indirect as usize * 16, 16)
            {
                Ok(r) => Some(r),
                Err(e) => {
                    // SAFETY: just allocated, never given to the device.
                    unsafe { self.dma.free_coherent(ring) };
                    return Err(e);
                }
            }
        } else {
            None
        };
        let config = QueueConfig {
            size,
            max_indirect,
            event_idx: self.negotiated.contains(Features::EVENT_IDX),
            ignore_used_len: spec.ignore_used_len,
        };
        // The layouts were validated above; `new` checks the region against them again.
        if packed {
            let layout = PackedRingLayout::new(size).ok_or(Error::BadQueueSize {
                queue: spec.index,
                size,
            })?;
            PackedQueue::new(spec.index, layout, ring, indirect, config).map(Virtqueue::Packed)
        } else {
            let layout = SplitRingLayout::new(self.transport.ring_layout(), size).ok_or(
                Error::BadQueueSize {
                    queue: spec.index,
                    size,
                },
            )?;
            SplitQueue::new(spec.index, layout, ring, indirect, config).map(Virtqueue::Split)
        }
    }

    /// One attempt at programming all queues with a vector plan.
    fn try_setup(&mut self, specs: &[QueueSpec], plan: VectorPlan) -> Result<()> {
        let msix = plan != VectorPlan::Isr;
        if msix {
            self.transport.set_config_vector(0)?;
        }
        let mut next_vector = 1u16;
        for spec in specs {
            let queue = self.build_queue(spec)?;
            let vector = match plan {
                _ if !spec.interrupts => NO_VECTOR,
                VectorPlan::PerQueue => {
                    let v = next_vector;
                    next_vector += 1;
                    v
                }
                VectorPlan::Shared => 1,
                VectorPlan::Isr => NO_VECTOR,
            };
            let addrs = queue.addresses();
            let size = queue.size();
            let slot_index = spec.index as usize;
            if self.queues.len() <= slot_index {
                self.queues.resize_with(slot_index + 1, || None);
            }
            let Some(entry) = self.queues.get_mut(slot_index) else {
                return Err(Error::NoSuchQueue { queue: spec.index });
            };
            // Keep the queue even if programming fails, so `release_queues` frees it.
            *entry = Some(QueueSlot {
                queue,
                interrupts: spec.interrupts,
                vector,
            });
            self.transport
                .setup_queue(spec.index, size, addrs, vector)?;
        }
        Ok(())
    }
}

impl<T: Transport, D: Dma, I: InterruptPlatform> Bus for VirtioDevice<T, D, I> {
    type Dma = D;

    fn dma(&self) -> &D {
        &self.dma
    }

    fn device_type(&self) -> DeviceType {
        self.transport.device_type()
    }

    fn negotiate_features(&mut self, driver: Features) -> Result<Features> {
        // Rings a live device may still use are freed only after it is reset (§2.4;
        // `negotiate` would reset it, but after the rings were gone).
        let quiet = !self.queues.iter().any(Option::is_some) || self.quiesce().is_ok();
        self.release_queues(&mut |_, _| {}, quiet);
        self.negotiate(driver)
    }

    fn offered_features(&self) -> Features {
        self.offered
    }

    fn features(&self) -> Features {
        self.negotiated
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.check_config_range(offset, buf.len())?;
        // §4.1.4.3.1 / §2.5.1: re-read until config_generation is stable across the read.
        for _ in 0..CONFIG_RETRIES {
            let before = self.transport.config_generation();
            let mut off = offset;
            let mut rest = &mut buf[..];
            while !rest.is_empty() {
                // Natural-width aligned accesses (§4.1.3.1).
                let width = access_width(off, rest.len());
                let (chunk, tail) = rest.split_at_mut(width);
                match width {
                    4 => chunk.copy_from_slice(&self.transport.read_config32(off)?.to_le_bytes()),
                    2 => chunk.copy_from_slice(&self.transport.read_config16(off)?.to_le_bytes()),
                    _ => chunk.copy_from_slice(&[self.transport.read_config8(off)?]),
                }
                off += width as u32;
                rest = tail;
            }
            if self.transport.config_generation() == before {
                return Ok(());
            }
        }
        Err(Error::ConfigUnstable)
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.check_config_range(offset, data.len())?;
        let mut off = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let width = access_width(off, rest.len());
            let (chunk, tail) = rest.split_at(width);
            match *chunk {
                [a, b, c, d] => self
                    .transport
                    .write_config32(off, u32::from_le_bytes([a, b, c, d]))?,
                [a, b] => self
                    .transport
                    .write_config16(off, u16::from_le_bytes([a, b]))?,
                [a] => self.transport.write_config8(off, a)?,
                _ => {
                    return Err(Error::ConfigOutOfRange {
                        offset: off,
                        len: width as u32,
                    });
                }
            }
            off += width as u32;
            rest = tail;
        }
        Ok(())
    }

    fn num_queues(&mut self) -> u16 {
        self.transport.num_queues()
    }

    fn max_queue_size(&mut self, index: u16) -> u16 {
        self.transport.max_queue_size(index)
    }

    fn setup_queues(&mut self, specs: &[QueueSpec]) -> Result<()> {
        if self.state != State::FeaturesOk {
            return Err(Error::InvalidState);
        }
        // One spec per queue: a second one for the same index would replace the first's
        // rings, which would then never be freed.
        let repeated = specs
            .iter()
            .enumerate()
            .any(|(i, s)| specs.iter().take(i).any(|t| t.index == s.index));
        if repeated {
            return Err(Error::InvalidState);
        }
        let wanting = specs.iter().filter(|s| s.interrupts).count() as u16;
        // Fallback order (Linux vp_find_vqs, FreeBSD vtpci_alloc_interrupts): one MSI-X
        // vector per queue + config → two vectors (config, all queues) → INTx → polling.
        let attempts = [
            (
                VectorPlan::PerQueue,
                InterruptMode::MsiX {
                    vectors: wanting + 1,
                },
            ),
            (VectorPlan::Shared, InterruptMode::MsiX { vectors: 2 }),
            (VectorPlan::Isr, InterruptMode::Intx),
            (VectorPlan::Isr, InterruptMode::Polling),
        ];
        let mut last_err = Error::Unsupported;
        for (plan, mode) in attempts {
            let enabled = match mode {
                InterruptMode::MsiX { vectors } => self.irq.enable_msix(vectors),
                InterruptMode::Intx => self.irq.enable_intx(),
                InterruptMode::Polling => true,
            };
            if !enabled {
                continue;
            }
            let msix = matches!(mode, InterruptMode::MsiX { .. });
            // The legacy config offset moves with MSI-X (§4.1.5.1.2.1 legacy: 24 vs 20).
            self.transport.set_msix_enabled(msix);
            match self.try_setup(specs, plan) {
                Ok(()) => {
                    self.mode = mode;
                    self.plan = plan;
                    if let InterruptMode::MsiX { vectors } = mode {
                        self.vector_interrupts = alloc::vec![0; vectors as usize];
                        self.vector_queues = alloc::vec![VectorQueues::default(); vectors as usize];
                        for slot in self.queues.iter().flatten().filter(|s| s.interrupts) {
                            if let Some(vq) = self.vector_queues.get_mut(usize::from(slot.vector)) {
                                vq.mask.insert(slot.queue.index());
                                vq.indices.push(slot.queue.index());
                            }
                        }
                    }
                    self.state = State::QueuesReady;
                    return Ok(());
                }
                Err(e @ Error::VectorRejected { .. }) => {
                    // Queues may already be enabled on the device: only a reset takes that
                    // back (modern §4.1.4.3.2), so reset and renegotiate, then try the next
                    // plan.
                    log::warn!(
                        "virtio {}: {e}; falling back",
                        self.transport.device_type().name()
                    );
                    last_err = e;
                    // Before DRIVER_OK the device uses no ring (§2.1.2).
                    self.release_queues(&mut |_, _| {}, true);
                    self.negotiate(self.driver_features)?;
                }
                Err(e) => {
                    // Before DRIVER_OK the device uses no ring (§2.1.2).
                    self.release_queues(&mut |_, _| {}, true);
                    return Err(self.fail(e));
                }
            }
        }
        Err(self.fail(last_err))
    }

    fn driver_ok(&mut self) -> Result<()> {
        if self.state != State::QueuesReady && self.state != State::FeaturesOk {
            return Err(Error::InvalidState);
        }
        self.add_status(DeviceStatus::DRIVER_OK);
        if self.needs_reset() {
            return Err(Error::DeviceNeedsReset);
        }
        self.state = State::DriverOk;
        Ok(())
    }

    fn reset(&mut self, reclaim: &mut dyn FnMut(u16, usize)) -> Result<()> {
        // A device that will not reset has its DMA stopped if the transport can; if not,
        // its rings stay allocated for ever.
        let quiet = self.quiesce();
        self.release_queues(reclaim, quiet.is_ok());
        self.state = State::Reset;
        self.negotiated = Features::empty();
        quiet
    }

    fn fail(&mut self) {
        self.add_status(DeviceStatus::FAILED);
        self.state = State::Failed;
    }

    fn needs_reset(&self) -> bool {
        self.transport
            .status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
    }

    fn interrupt_mode(&self) -> InterruptMode {
        self.mode
    }

    #[inline(always)]
    fn add(
        &mut self,
        queue: u16,
        readable: &[Segment],
        writable: &[Segment],
        token: usize,
    ) -> Result<()> {
        self.queue_mut(queue)?.add(readable, writable, token)
    }

    // The per-request calls (`add` above, those below) are inlined into the driver: each
    // is a queue lookup in front of the ring's own method. `add` and `kick` are forced
    // (`#[inline(always)]`): built as one codegen unit the compiler did not take the hint
    // for them, and `bench blk` measured forcing them (with `handle_interrupt`'s MSI-X
    // path) at 137 fewer guest instructions per 4 KiB request at depth 1.
    #[inline(always)]
    fn kick(&mut self, queue: u16) -> Result<bool> {
        let q = self.queue_mut(queue)?;
        let notify = q.kick_prepare();
        if notify {
            self.transport.notify(queue);
        }
        Ok(notify)
    }

    #[inline]
    fn pop_used(&mut self, queue: u16) -> Result<Option<Used>> {
        self.queue_mut(queue)?.pop_used()
    }

    /// One queue lookup, then the ring's own drain (`Virtqueue::drain_used`) rather than
    /// the default's five bus calls per completion.
    #[inline]
    fn drain_used<F: FnMut(Used)>(&mut self, queue: u16, interrupts: bool, f: F) -> Result<usize> {
        self.queue_mut(queue)?.drain_used(interrupts, f)
    }

    #[inline]
    fn enable_interrupts(&mut self, queue: u16) -> Result<bool> {
        Ok(self.queue_mut(queue)?.enable_interrupts())
    }

    fn enable_interrupts_delayed(&mut self, queue: u16) -> Result<bool> {
        Ok(self.queue_mut(queue)?.enable_interrupts_delayed())
    }

    #[inline]
    fn disable_interrupts(&mut self, queue: u16) -> Result<()> {
        self.queue_mut(queue)?.disable_interrupts();
        Ok(())
    }

    #[inline]
    fn has_used(&self, queue: u16) -> Result<bool> {
        let q = self.queue_ref(queue)?;
        Ok(q.is_broken() || q.has_used())
    }

    fn free_descriptors(&self, queue: u16) -> Result<u16> {
        Ok(self.queue_ref(queue)?.num_free())
    }

    fn queue_size(&self, queue: u16) -> Result<u16> {
        Ok(self.queue_ref(queue)?.size())
    }

    fn descriptors_for(&self, queue: u16, segments: usize) -> Result<usize> {
        Ok(self.queue_ref(queue)?.descriptors_for(segments))
    }

    fn max_chain(&self, queue: u16) -> Result<u16> {
        Ok(self.queue_ref(queue)?.max_chain())
    }

    fn queue_stats(&self, queue: u16) -> Result<QueueStats> {
        let mut stats = self.queue_ref(queue)?.stats();
        if let Some(retired) = self.retired_stats.get(usize::from(queue)) {
            stats += *retired;
        }
        Ok(stats)
    }

    /// The MSI-X path is small and inlined into the driver's interrupt handler; the INTx
    /// path (an ISR read, a walk over the queues) stays out of line.
    #[inline(always)]
    fn handle_interrupt(&mut self, vector: Option<u16>) -> InterruptCause {
        let mut cause = match (vector, self.plan) {
            (Some(v), VectorPlan::PerQueue | VectorPlan::Shared) => self.vector_cause(v),
            _ => self.isr_cause(),
        };
        if cause.config_changed && self.needs_reset() {
            cause.needs_reset = true;
        }
        cause
    }
}

impl<T: Transport, D: Dma, I: InterruptPlatform> VirtioDevice<T, D, I> {
    /// What MSI-X vector `v` signals: vector 0 the configuration, any other the queues
    /// it serves (§4.1.5.1.2).
    #[inline(always)]
    fn vector_cause(&mut self, v: u16) -> InterruptCause {
        let mut cause = InterruptCause::default();
        if let Some(c) = self.vector_interrupts.get_mut(usize::from(v)) {
            *c += 1;
        }
        if v == 0 {
            cause.config_changed = true;
        } else if let Some(vq) = self.vector_queues.get(usize::from(v)) {
            cause.queues = vq.mask;
            for &q in &vq.indices {
                if let Some(Some(slot)) = self.queues.get_mut(usize::from(q)) {
                    slot.queue.stats_mut().interrupts += 1;
                }
            }
        }
        cause
    }

    /// INTx / polling: reading the ISR tells (and de-asserts the line, §4.1.4.5).
    #[inline(never)]
    fn isr_cause(&mut self) -> InterruptCause {
        let mut cause = InterruptCause::default();
        let isr = self.transport.read_isr();
        if isr.0 == 0 {
            self.spurious_interrupts += 1;
            return cause;
        }
        self.isr_interrupts += 1;
        cause.config_changed = isr.config_changed();
        if isr.queue() {
            for slot in self.queues.iter_mut().flatten() {
                if slot.interrupts {
                    cause.queues.insert(slot.queue.index());
                    slot.queue.stats_mut().interrupts += 1;
                }
            }
        }
        cause
    }
}

impl<T: Transport, D: Dma, I: InterruptPlatform> VirtioDevice<T, D, I> {
    /// `[offset, offset + len)` must lie inside the device-specific config area.
    fn check_config_range(&self, offset: u32, len: usize) -> Result<()> {
        let out = Error::ConfigOutOfRange {
            offset,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        };
        let end = u32::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .ok_or(out)?;
        if end > self.transport.config_len() {
            return Err(out);
        }
        Ok(())
    }

    fn queue_ref(&self, index: u16) -> Result<&Virtqueue> {
        match self.queues.get(index as usize) {
            Some(Some(slot)) => Ok(&slot.queue),
            _ => Err(Error::QueueNotReady { queue: index }),
        }
    }

    fn queue_mut(&mut self, index: u16) -> Result<&mut Virtqueue> {
        match self.queues.get_mut(index as usize) {
            Some(Some(slot)) => Ok(&mut slot.queue),
            _ => Err(Error::QueueNotReady { queue: index }),
        }
    }

    /// Direct access to a queue (tests, benchmarks).
    pub fn queue(&self, index: u16) -> Option<&Virtqueue> {
        self.queue_ref(index).ok()
    }

    /// Queues that exist, with their masks of interrupt use (for reports).
    pub fn queue_indices(&self) -> impl Iterator<Item = u16> + '_ {
        self.queues.iter().flatten().map(|s| s.queue.index())
    }
}

/// A device dropped with queues set up (a driver's initialisation failed after
/// `setup_queues`, or its owner never called `reset`) is reset before its rings are freed:
/// the device must not write memory that goes back to the allocator (§2.1.2: after a reset
/// the device uses no driver memory). One that had FAILED is marked so again after the
/// reset (§3.1.1 step 8: the driver gave up on it, as Linux does after a failed probe).
/// Without queues nothing is touched: a device that was never set up, or was reset, stays
/// as it is.
impl<T: Transport, D: Dma, I: InterruptPlatform> Drop for VirtioDevice<T, D, I> {
    fn drop(&mut self) {
        if self.queues.iter().all(Option::is_none) {
            return;
        }
        let failed = self.state == State::Failed;
        // On Err the rings were left allocated (`release_queues`) and logged; the owner
        // is going away, so there is nobody else to tell.
        let _ = Bus::reset(self, &mut |_, _| {});
        if failed {
            Bus::fail(self);
        }
    }
}

/// Widest natural access (4, 2 or 1 bytes) that is aligned at `offset` and fits in `left`.
fn access_width(offset: u32, left: usize) -> usize {
    if offset % 4 == 0 && left >= 4 {
        4
    } else if offset % 2 == 0 && left >= 2 {
        2
    } else {
        1
    }
}
