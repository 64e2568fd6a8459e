//! A `Bus` over the guest's bus that services its own interrupts: `BalloonDriver` owns its
//! bus and only lends it out as `&B`, so the scenario cannot reach the interrupt platform
//! (pending bits, `intx_done`) through it. This wrapper delegates every operation and, in
//! `handle_interrupt`, does what `bus::service` does for the other scenarios: takes the
//! recorded pending bits, feeds each to the device (MSI-X entry k, or INTx with the ISR
//! read and the line re-armed) and returns the union of the causes.
//!
//! Waiting uses the global per-vector counters (`interrupts::count`) of the device's IDT
//! vectors, recorded after queue setup.

use super::super::bus::{self, GuestBus};
use crate::platform::{GuestDma, INTX_INDEX};
use alloc::vec::Vec;
use virtio_core::bus::{Bus, InterruptCause, QueueSpec};
use virtio_core::platform::InterruptMode;
use virtio_core::queue::{QueueStats, Segment, Used};
use virtio_core::{DeviceType, Features, Result};

pub struct IrqBus {
    inner: GuestBus,
    /// IDT vectors of the device (MSI-X entries, or the INTx line's).
    vectors: Vec<u8>,
    /// Interrupt count at the last `handle_interrupt`.
    serviced_at: u64,
    /// `handle_interrupt` calls that found something pending.
    pub services: u64,
}

impl IrqBus {
    pub fn new(inner: GuestBus) -> Self {
        IrqBus {
            inner,
            vectors: Vec::new(),
            serviced_at: 0,
            services: 0,
        }
    }

    fn refresh_vectors(&mut self) {
        let mode = self.inner.interrupt_mode();
        let irq = self.inner.interrupt_platform();
        self.vectors = match mode {
            InterruptMode::MsiX { vectors } => (0..vectors).filter_map(|i| irq.vector(i)).collect(),
            InterruptMode::Intx => irq.vector(INTX_INDEX).into_iter().collect(),
            InterruptMode::Polling => Vec::new(),
        };
    }

    /// Interrupts taken on the device's vectors so far.
    pub fn irq_count(&self) -> u64 {
        self.vectors
            .iter()
            .map(|&v| crate::interrupts::count(v))
            .sum()
    }

    /// Interrupts arrived since the last `handle_interrupt`.
    pub fn has_pending(&self) -> bool {
        self.irq_count() != self.serviced_at
    }

    /// Per-queue statistics as `STAT <name>.q<k>.*` plus totals (the `bus::stats` keys).
    pub fn stats(&self, name: &str, queues: impl Iterator<Item = u16>) {
        use crate::report::stat;
        use alloc::format;
        let (mut kicks, mut completions, mut added) = (0, 0, 0);
        for q in queues {
            if let Ok(s) = self.inner.queue_stats(q) {
                kicks += s.kicks;
                completions += s.completions;
                added += s.added;
                stat(&format!("{name}.q{q}.kicks"), s.kicks);
                stat(&format!("{name}.q{q}.completions"), s.completions);
                stat(&format!("{name}.q{q}.interrupts"), s.interrupts);
            }
        }
        stat(&format!("{name}.added"), added);
        stat(
            &format!("{name}.spurious"),
            self.inner.spurious_interrupts(),
        );
        stat(&format!("{name}.kicks"), kicks);
        stat(&format!("{name}.completions"), completions);
        stat(&format!("{name}.irq"), self.irq_count());
    }
}

impl Bus for IrqBus {
    type Dma = GuestDma;

    fn dma(&self) -> &GuestDma {
        self.inner.dma()
    }
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn negotiate_features(&mut self, driver: Features) -> Result<Features> {
        self.inner.negotiate_features(driver)
    }
    fn offered_features(&self) -> Features {
        self.inner.offered_features()
    }
    fn features(&self) -> Features {
        self.inner.features()
    }
    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.inner.read_config(offset, buf)
    }
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.inner.write_config(offset, data)
    }
    fn num_queues(&mut self) -> u16 {
        self.inner.num_queues()
    }
    fn max_queue_size(&mut self, index: u16) -> u16 {
        self.inner.max_queue_size(index)
    }
    fn setup_queues(&mut self, specs: &[QueueSpec]) -> Result<()> {
        let r = self.inner.setup_queues(specs);
        self.refresh_vectors();
        self.serviced_at = self.irq_count();
        r
    }
    fn driver_ok(&mut self) -> Result<()> {
        self.inner.driver_ok()
    }
    fn reset(&mut self, reclaim: &mut dyn FnMut(u16, usize)) {
        self.inner.reset(reclaim);
        self.refresh_vectors();
    }
    fn fail(&mut self) {
        self.inner.fail()
    }
    fn needs_reset(&self) -> bool {
        self.inner.needs_reset()
    }
    fn interrupt_mode(&self) -> InterruptMode {
        self.inner.interrupt_mode()
    }
    fn add(
        &mut self,
        queue: u16,
        readable: &[Segment],
        writable: &[Segment],
        token: usize,
    ) -> Result<()> {
        self.inner.add(queue, readable, writable, token)
    }
    fn kick(&mut self, queue: u16) -> Result<bool> {
        self.inner.kick(queue)
    }
    fn pop_used(&mut self, queue: u16) -> Result<Option<Used>> {
        self.inner.pop_used(queue)
    }
    fn enable_interrupts(&mut self, queue: u16) -> Result<bool> {
        self.inner.enable_interrupts(queue)
    }
    fn enable_interrupts_delayed(&mut self, queue: u16) -> Result<bool> {
        self.inner.enable_interrupts_delayed(queue)
    }
    fn disable_interrupts(&mut self, queue: u16) -> Result<()> {
        self.inner.disable_interrupts(queue)
    }
    fn free_descriptors(&self, queue: u16) -> Result<u16> {
        self.inner.free_descriptors(queue)
    }
    fn queue_size(&self, queue: u16) -> Result<u16> {
        self.inner.queue_size(queue)
    }
    fn descriptors_for(&self, queue: u16, segments: usize) -> Result<usize> {
        self.inner.descriptors_for(queue, segments)
    }
    fn max_chain(&self, queue: u16) -> Result<u16> {
        self.inner.max_chain(queue)
    }
    fn queue_stats(&self, queue: u16) -> Result<QueueStats> {
        self.inner.queue_stats(queue)
    }
    /// Ignores `vector`: services whatever the handlers recorded (see the module docs).
    /// Polling mode records nothing: use the driver's `poll`.
    fn handle_interrupt(&mut self, _vector: Option<u16>) -> InterruptCause {
        // Read the count before taking the pending bits: an interrupt after this point
        // makes `has_pending` true again (handlers count before they set the bit).
        self.serviced_at = self.irq_count();
        let cause = bus::service(&mut self.inner);
        if !cause.is_empty() {
            self.services += 1;
        }
        cause
    }
}
