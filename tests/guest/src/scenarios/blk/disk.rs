//! `virtio_blk::BlkDriver` over the guest's bus, with interrupt servicing and blocking
//! helpers for the scenario.
//!
//! `BlkDriver` owns its bus and only lends it out shared (`bus()`), while the guest's
//! `PciInterrupts` needs the scenario to take pending bits and re-arm INTx: the
//! interrupt platform is therefore shared (`SharedIrq`) between the bus and the scenario.

use super::super::Env;
use super::super::bus::preference;
use crate::pci::PciFunction;
use crate::platform::{GuestDma, INTX_INDEX, PciBars, PciConfig, PciInterrupts};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion, Request};
use virtio_core::Features;
use virtio_core::device::VirtioDevice;
use virtio_core::platform::{InterruptMode, InterruptPlatform};
use virtio_pci::{PciTransport, probe};

/// The function's interrupt plumbing, shared by the bus and the scenario.
pub struct SharedIrq(pub Rc<RefCell<PciInterrupts>>);

impl InterruptPlatform for SharedIrq {
    fn enable_msix(&mut self, vectors: u16) -> bool {
        self.0.borrow_mut().enable_msix(vectors)
    }
    fn enable_intx(&mut self) -> bool {
        self.0.borrow_mut().enable_intx()
    }
    fn disable(&mut self) {
        self.0.borrow_mut().disable()
    }
}

pub type BlkBus = VirtioDevice<PciTransport<PciConfig, PciBars>, GuestDma, SharedIrq>;

pub type Outcome = Result<Completion, BlkError>;

/// Counters of one stretch of work (see [`Disk::counters`]).
#[derive(Copy, Clone, Debug, Default)]
pub struct Counters {
    pub added: u64,
    pub kicks: u64,
    pub completions: u64,
    pub irqs: u64,
}

impl core::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            added: self.added - o.added,
            kicks: self.kicks - o.kicks,
            completions: self.completions - o.completions,
            irqs: self.irqs - o.irqs,
        }
    }
}

pub struct Disk {
    pub drv: BlkDriver<BlkBus>,
    pub irq: Rc<RefCell<PciInterrupts>>,
    /// Completed caller requests not yet claimed.
    pub done: Vec<(usize, Outcome)>,
    next_token: usize,
    pub config_events: u64,
    pub needs_reset: bool,
}

/// Opens `f`, masks `mask` out of the features, and brings the driver up.
pub fn open(env: &Env, f: &PciFunction, opts: BlkOptions, mask: Features) -> Result<Disk, String> {
    let dev = env.open(f);
    let transport =
        probe(dev.config, dev.bars, preference(env)).map_err(|e| format!("probe: {e:?}"))?;
    let irq = Rc::new(RefCell::new(dev.irq));
    let mut bus = VirtioDevice::new(transport, dev.dma, SharedIrq(irq.clone()));
    bus.set_feature_mask(mask);
    let drv = BlkDriver::new(bus, opts).map_err(|e| format!("BlkDriver::new: {e}"))?;
    Ok(Disk {
        drv,
        irq,
        done: Vec::new(),
        next_token: 1,
        config_events: 0,
        needs_reset: false,
    })
}

impl Disk {
    pub fn polling(&self) -> bool {
        self.irq.borrow().mode() == InterruptMode::Polling
    }

    pub fn token(&mut self) -> usize {
        self.next_token += 1;
        self.next_token
    }

    /// Guest-side counters summed over the queues, plus interrupts taken.
    pub fn counters(&self) -> Counters {
        let mut c = Counters {
            irqs: self.irq.borrow().total(),
            ..Counters::default()
        };
        for q in 0..self.drv.num_queues() {
            if let Ok(s) = self.drv.queue_stats(q) {
                c.added += s.added;
                c.kicks += s.kicks;
                c.completions += s.completions;
            }
        }
        c
    }

    /// Feeds recorded interrupts to the driver, then collects every queue's completions
    /// into `done`. Returns how many completed.
    pub fn service(&mut self) -> Result<usize, BlkError> {
        let pending = self.irq.borrow().take_pending();
        if pending & (1 << INTX_INDEX) != 0 {
            let c = self.drv.handle_interrupt(None)?;
            self.note(c);
            self.irq.borrow().intx_done();
        }
        for k in (0..INTX_INDEX).filter(|k| pending & (1 << k) != 0) {
            let c = self.drv.handle_interrupt(Some(k))?;
            self.note(c);
        }
        let mut n = 0;
        let done = &mut self.done;
        for q in 0..self.drv.num_queues() {
            n += self.drv.poll_completions(q, |t, r| done.push((t, r)))?;
        }
        Ok(n)
    }

    fn note(&mut self, c: virtio_blk::BlkInterrupt) {
        if c.capacity_changed.is_some() {
            self.config_events += 1;
        }
        self.needs_reset |= c.needs_reset;
    }

    /// Services the device until `cond` holds or `timeout_ms` passes; halts between
    /// interrupts (spins when polling).
    pub fn wait_until(
        &mut self,
        timeout_ms: u64,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Result<bool, BlkError> {
        let deadline = crate::time::now_ns() + timeout_ms * 1_000_000;
        let polling = self.polling();
        loop {
            self.service()?;
            if cond(self) {
                return Ok(true);
            }
            let now = crate::time::now_ns();
            if now >= deadline {
                return Ok(false);
            }
            if polling {
                core::hint::spin_loop();
            } else {
                let slice = ((deadline - now) / 1_000_000).clamp(1, 10);
                self.irq.borrow().wait(u64::MAX, slice);
            }
        }
    }

    /// Removes and returns the outcome of `token`, if it completed.
    pub fn take(&mut self, token: usize) -> Option<Outcome> {
        let i = self.done.iter().position(|(t, _)| *t == token)?;
        Some(self.done.swap_remove(i).1)
    }

    /// Submits `req` on `queue` (waiting for room if the queue is full), kicks, and waits
    /// for its completion.
    pub fn sync(&mut self, queue: u16, req: Request<'_>) -> Result<Completion, String> {
        let token = self.token();
        loop {
            match self.drv.submit(queue, req, token) {
                Ok(()) => break,
                Err(BlkError::QueueFull) => {
                    let before = self.done.len();
                    if !self
                        .wait_until(5000, |d| d.done.len() > before)
                        .map_err(|e| format!("{e}"))?
                    {
                        return Err("queue full and nothing completes".into());
                    }
                }
                Err(e) => return Err(format!("submit: {e}")),
            }
        }
        self.drv.kick(queue).map_err(|e| format!("kick: {e}"))?;
        if !self
            .wait_until(10_000, |d| d.done.iter().any(|(t, _)| *t == token))
            .map_err(|e| format!("{e}"))?
        {
            return Err("no completion in 10 s".into());
        }
        self.take(token)
            .unwrap_or(Err(BlkError::Aborted))
            .map_err(|e| format!("{e}"))
    }

    /// Like [`Disk::sync`] but returns the request's own error.
    pub fn sync_result(&mut self, queue: u16, req: Request<'_>) -> Result<Outcome, String> {
        let token = self.token();
        if let Err(e) = self.drv.submit(queue, req, token) {
            return Ok(Err(e));
        }
        self.drv.kick(queue).map_err(|e| format!("kick: {e}"))?;
        if !self
            .wait_until(10_000, |d| d.done.iter().any(|(t, _)| *t == token))
            .map_err(|e| format!("{e}"))?
        {
            return Err("no completion in 10 s".into());
        }
        Ok(self.take(token).unwrap_or(Err(BlkError::Aborted)))
    }
}
