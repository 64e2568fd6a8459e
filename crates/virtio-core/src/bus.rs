//! The bus interface: everything a device driver (virtio-net, -blk, -balloon, -console)
//! may ask of its bus. Modelled on FreeBSD's `virtio_bus_if.m` + `virtqueue.h`.
//!
//! Device crates are generic over [`Bus`] and never see the transport. In-process (tests,
//! the QEMU guest) the implementation is [`crate::device::VirtioDevice`]; in the kexts,
//! `VirtioFamily.kext` exports these operations as C functions and each device kext
//! implements this trait over them.

use crate::error::{Error, Result};
use crate::platform::{Dma, DmaRegion, InterruptMode};
use crate::queue::{QueueStats, Segment, Used};
use crate::types::{DeviceType, Features};

/// A queue the driver wants, in `setup_queues`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue index as the device numbers it.
    pub index: u16,
    /// Wanted size; 0 = the device's maximum. Rounded down to a power of two and clamped to
    /// the device maximum (legacy devices: always their fixed size).
    pub size: u16,
    /// Whether completions on this queue should interrupt (false: the driver polls it,
    /// e.g. a transmit queue reclaimed on the next send).
    pub interrupts: bool,
    /// Longest chain the driver will post as one indirect table (0: never use indirect).
    pub max_indirect: u16,
    /// Do not trust `used.len` on this queue: completions report 0 and the length is not
    /// checked. Only for queues whose driver never reads it and whose devices are known to
    /// write garbage there (legacy balloon devices wrote the buffer length; Linux's
    /// `suppress_used_validation` is the same escape hatch).
    pub ignore_used_len: bool,
}

impl QueueSpec {
    pub const fn new(index: u16) -> Self {
        QueueSpec {
            index,
            size: 0,
            interrupts: true,
            max_indirect: 0,
            ignore_used_len: false,
        }
    }
    pub const fn size(mut self, size: u16) -> Self {
        self.size = size;
        self
    }
    pub const fn interrupts(mut self, on: bool) -> Self {
        self.interrupts = on;
        self
    }
    pub const fn indirect(mut self, max: u16) -> Self {
        self.max_indirect = max;
        self
    }
    pub const fn ignore_used_len(mut self, ignore: bool) -> Self {
        self.ignore_used_len = ignore;
        self
    }
}

/// Bit set of queue indices (0..128).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueMask(pub u128);

impl QueueMask {
    /// Queue indices it can hold (0..CAPACITY); others are left out.
    pub const CAPACITY: u16 = 128;

    pub fn insert(&mut self, q: u16) {
        if q < Self::CAPACITY {
            self.0 |= 1 << q;
        }
    }
    pub fn contains(self, q: u16) -> bool {
        q < Self::CAPACITY && self.0 & (1 << q) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The queues in the set, lowest first (visits the set bits only).
    pub fn iter(self) -> impl Iterator<Item = u16> {
        let mut bits = self.0;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            // < 128: `bits` is non-zero.
            let q = bits.trailing_zeros() as u16;
            bits &= bits - 1;
            Some(q)
        })
    }
}

/// What an interrupt meant, after the bus demultiplexed it.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct InterruptCause {
    /// Queues that may have completions.
    pub queues: QueueMask,
    /// The device configuration changed (link status, capacity, balloon target, ...).
    pub config_changed: bool,
    /// The device set DEVICE_NEEDS_RESET (comes with a config change, §2.1.2).
    pub needs_reset: bool,
}

impl InterruptCause {
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty() && !self.config_changed && !self.needs_reset
    }
}

/// The operations a device driver uses. All queue operations take the queue index.
pub trait Bus {
    type Dma: Dma;

    /// DMA allocation and mapping for the driver's own buffers.
    fn dma(&self) -> &Self::Dma;
    fn device_type(&self) -> DeviceType;

    /// Runs the spec's initialisation up to FEATURES_OK (§3.1.1 steps 1–6): reset, ACK,
    /// DRIVER, accept `offered ∩ (driver ∪ bus ring features) ∩ transport allow-list`
    /// (never bit 30), FEATURES_OK with read-back. On error the device is left FAILED.
    /// Returns the negotiated set. `driver` holds device-specific bits and any generic bits
    /// the driver additionally wants (e.g. ANY_LAYOUT).
    fn negotiate_features(&mut self, driver: Features) -> Result<Features>;
    /// Re-initialisation after a reset (resume from sleep: nothing survives a reset, so
    /// §3.1.1 runs again from step 1): negotiates `previous`, the set an earlier
    /// initialisation ended with. Everything the driver computed from `previous` (header
    /// layout, buffer sizes, which queues exist) must still hold, so a device that now
    /// offers fewer of those bits is refused: it is left FAILED and the error is
    /// [`Error::MissingFeature`] naming the lowest bit lost. The result may hold generic
    /// ring bits `previous` lacked (the bus implements them; the driver re-reads queue
    /// geometry when it rebuilds its queues anyway). Linux does the same in
    /// `virtio_device_restore`, which fails when `virtio_features_ok` does.
    fn renegotiate_features(&mut self, previous: Features) -> Result<Features> {
        let negotiated = self.negotiate_features(previous)?;
        let lost = previous.difference(negotiated);
        if lost.is_empty() {
            return Ok(negotiated);
        }
        log::error!(
            "virtio {}: device no longer offers features {:#x} it had; marking it FAILED",
            self.device_type().name(),
            lost.bits()
        );
        self.fail();
        Err(Error::MissingFeature {
            bit: lost.bits().trailing_zeros(),
        })
    }
    /// What the device offered (valid after `negotiate_features`).
    fn offered_features(&self) -> Features;
    /// The negotiated set.
    fn features(&self) -> Features;
    fn has_feature(&self, f: Features) -> bool {
        self.features().contains(f)
    }

    /// Reads device-specific config consistently across `config_generation` (§4.1.4.3.1),
    /// with accesses of natural width. Config access (read and write) is valid from
    /// `negotiate_features` on, before any queue exists (§3.1.1 step 7): e.g. the console's
    /// emergency write works at FEATURES_OK, long before DRIVER_OK.
    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<()>;
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()>;
    fn read_config_u8(&self, offset: u32) -> Result<u8> {
        let mut b = [0; 1];
        self.read_config(offset, &mut b)?;
        Ok(b[0])
    }
    fn read_config_u16(&self, offset: u32) -> Result<u16> {
        let mut b = [0; 2];
        self.read_config(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn read_config_u32(&self, offset: u32) -> Result<u32> {
        let mut b = [0; 4];
        self.read_config(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_config_u64(&self, offset: u32) -> Result<u64> {
        let mut b = [0; 8];
        self.read_config(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Number of queues the device has.
    fn num_queues(&mut self) -> u16;
    /// Maximum size of queue `index` (0: absent).
    fn max_queue_size(&mut self, index: u16) -> u16;
    /// Allocates and programs the queues and their interrupt vectors (MSI-X per queue →
    /// MSI-X shared → INTx → polling). Call after `negotiate_features`, before `driver_ok`;
    /// each queue index at most once (`InvalidState` otherwise).
    fn setup_queues(&mut self, specs: &[QueueSpec]) -> Result<()>;
    /// Sets DRIVER_OK (§3.1.1 step 8): the device is live.
    fn driver_ok(&mut self) -> Result<()>;
    /// Resets the device and releases its queues; `reclaim` receives every in-flight token.
    /// Negotiation must be redone afterwards.
    ///
    /// Ok: the device can no longer touch memory: it acknowledged the reset (status read
    /// back 0, §2.1.2), or it did not and the transport stopped its DMA (PCI: Bus Master
    /// Enable cleared, [`crate::transport::Transport::stop_dma`]). The driver may free its
    /// DMA regions (request slots, headers, receive buffers).
    ///
    /// Err([`Error::ResetTimeout`]): the device ignored the reset and may still read and
    /// write everything it was given. The caller must then neither free nor reuse any DMA
    /// memory it gave the device: it leaks it (see [`Bus::release_dma`], which logs how
    /// many bytes), as the bus does with the rings. The device stays unusable until a later
    /// reset succeeds (`negotiate_features` resets first).
    ///
    /// The in-flight tokens go to `reclaim` either way, so the driver can complete its
    /// callers' requests: an OS-owned buffer (a block I/O's pages, a network packet)
    /// cannot be held for ever without hanging the OS's teardown, which waits for them.
    /// After an Err such a buffer can still be written by the device: the bus cannot
    /// prevent that, and the error (and its log line) is all there is to say so.
    #[must_use = "on Err the device may still use the driver's DMA memory"]
    fn reset(&mut self, reclaim: &mut dyn FnMut(u16, usize)) -> Result<()>;
    /// Frees `regions`, DMA memory the driver gave the device, when the device cannot touch
    /// them any more (`device_quiet`: `reset` was Ok since they were given, or they never
    /// were); otherwise leaks them, for good, and logs how many bytes (a device that ignored
    /// the reset may still read and write them). Returns the bytes leaked.
    ///
    /// # Safety
    /// The regions came from this bus's `dma().alloc_coherent` and are not used afterwards;
    /// when `device_quiet`, the device really no longer accesses them.
    unsafe fn release_dma(
        &self,
        regions: impl IntoIterator<Item = DmaRegion>,
        device_quiet: bool,
    ) -> usize
    where
        Self: Sized,
    {
        // SAFETY: the caller's contract.
        unsafe { free_or_leak(self.dma(), regions, device_quiet, self.device_type()) }
    }
    /// Sets FAILED (§3.1.1: the driver gave up on the device, e.g. its config is invalid).
    /// The device stays unusable until `reset`.
    fn fail(&mut self);
    /// DEVICE_NEEDS_RESET is set.
    fn needs_reset(&self) -> bool;
    /// How interrupts are delivered after `setup_queues`.
    fn interrupt_mode(&self) -> InterruptMode;

    /// Adds a chain (readable segments first, then writable) tagged with `token`.
    fn add(
        &mut self,
        queue: u16,
        readable: &[Segment],
        writable: &[Segment],
        token: usize,
    ) -> Result<()>;
    /// Notifies the device if it asked to be (EVENT_IDX or flags). Returns whether it did.
    fn kick(&mut self, queue: u16) -> Result<bool>;
    /// Next completion, in device order; hostile values become errors.
    fn pop_used(&mut self, queue: u16) -> Result<Option<Used>>;
    /// Re-enables interrupts; true if completions arrived meanwhile (process them now).
    fn enable_interrupts(&mut self, queue: u16) -> Result<bool>;
    /// Re-enables interrupts after ~3/4 of the in-flight chains completed (EVENT_IDX).
    fn enable_interrupts_delayed(&mut self, queue: u16) -> Result<bool>;
    fn disable_interrupts(&mut self, queue: u16) -> Result<()>;
    /// Whether `queue` may have completions to pop: a peek at the used index (no barrier),
    /// so a driver can skip the disable/drain/re-enable sequence when there is nothing to
    /// do. A broken queue answers true (popping reports why). Default: true (drain as
    /// before).
    fn has_used(&self, queue: u16) -> Result<bool> {
        let _ = queue;
        Ok(true)
    }
    /// Pops every completion of `queue`, handing each to `f` in device order; returns how
    /// many. With `interrupts`, the queue's interrupts stay suppressed while it drains and
    /// are re-enabled at the end without a race: what completes before the re-enable is
    /// drained too (§2.7.10, Linux's disable_cb / get_buf / enable_cb loop); with nothing
    /// to pop it writes nothing (the packed ring still checks that position for flags of
    /// the wrong lap, as a pop does). An error (a broken queue, a hostile completion) stops
    /// it after `f` got the completions before it. `f` must not call into the bus.
    /// Bounded: every completion pops an in-flight chain.
    ///
    /// `VirtioDevice` looks the queue up once and runs the ring's own drain
    /// (`SplitQueue::drain_used`, `PackedQueue::drain_used`); a bus behind a call boundary
    /// (the kexts' `FamilyBus`) makes it one call.
    fn drain_used<F: FnMut(Used)>(&mut self, queue: u16, interrupts: bool, f: F) -> Result<usize>;
    /// Free descriptors (a chain of n segments needs n, or 1 with indirect).
    fn free_descriptors(&self, queue: u16) -> Result<u16>;
    /// The size the queue was set up with.
    fn queue_size(&self, queue: u16) -> Result<u16>;
    /// Ring descriptors a chain of `segments` segments will occupy on this queue (1 when it
    /// goes indirect): what a driver compares with `free_descriptors` for backpressure.
    fn descriptors_for(&self, queue: u16, segments: usize) -> Result<usize>;
    /// Longest chain `add` accepts on this queue.
    fn max_chain(&self, queue: u16) -> Result<u16>;
    /// Counters of queue `queue` over the bus's lifetime (a reset does not zero them).
    fn queue_stats(&self, queue: u16) -> Result<QueueStats>;

    /// Entry point from the platform's interrupt handler: `vector` is the MSI-X vector index,
    /// or `None` for INTx (and for polling), where the ISR is read (and cleared).
    fn handle_interrupt(&mut self, vector: Option<u16>) -> InterruptCause;
}

/// [`Bus::release_dma`]: frees `regions` (DMA memory a driver gave the device) when the
/// device cannot touch them any more (`device_quiet`: [`Bus::reset`] was Ok since they were
/// given, or they never were), or leaks them when it can (a reset that failed: the device
/// may still read and write them, so they must never reach another owner). Logs how many
/// bytes were leaked; returns it.
///
/// # Safety
/// The regions came from `dma`'s `alloc_coherent` and are not used afterwards; when
/// `device_quiet`, the device really no longer accesses them.
unsafe fn free_or_leak<D: Dma>(
    dma: &D,
    regions: impl IntoIterator<Item = DmaRegion>,
    device_quiet: bool,
    device: DeviceType,
) -> usize {
    let mut leaked = 0usize;
    for region in regions {
        if !device_quiet {
            leaked = leaked.saturating_add(region.len);
            continue;
        }
        // SAFETY: the caller's contract: the region came from `dma`, is not used again,
        // and the device no longer accesses it (`device_quiet`).
        unsafe { dma.free_coherent(region) };
    }
    if leaked > 0 {
        log::error!(
            "virtio {}: the device did not reset and its DMA could not be stopped; \
             {leaked} bytes of driver buffers stay allocated",
            device.name()
        );
    }
    leaked
}

#[cfg(test)]
mod tests {
    use super::QueueMask;
    use alloc::vec::Vec;

    #[test]
    fn queue_mask_iterates_its_set_bits_in_order() {
        let mut m = QueueMask::default();
        assert_eq!(m.iter().count(), 0);
        for q in [127, 0, 64, 63, 5, 128, 500] {
            m.insert(q);
        }
        assert_eq!(m.iter().collect::<Vec<_>>(), [0, 5, 63, 64, 127]);
        assert!(m.contains(64) && !m.contains(65) && !m.contains(128));
    }
}
