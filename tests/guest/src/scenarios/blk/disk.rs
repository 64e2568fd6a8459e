//! `virtio_blk::BlkDriver` over the guest's bus, with interrupt servicing and blocking
//! helpers for the scenario.

use super::super::Env;
use super::super::bus::{self, GuestBus};
use crate::pci::PciFunction;
use crate::platform::PciInterrupts;
use crate::time::LazyDeadline;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion, Request};
use virtio_core::Features;
use virtio_core::bus::Bus;

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
    pub drv: BlkDriver<GuestBus>,
    /// Completed caller requests not yet claimed.
    pub done: Vec<(usize, Outcome)>,
    next_token: usize,
    pub config_events: u64,
    pub needs_reset: bool,
}

/// Opens `f`, masks `mask` out of the features, and brings the driver up.
pub fn open(env: &Env, f: &PciFunction, opts: BlkOptions, mask: Features) -> Result<Disk, String> {
    let mut bus = bus::open(env, f)?;
    bus.set_feature_mask(mask);
    let drv = BlkDriver::new(bus, opts).map_err(|e| format!("BlkDriver::new: {e}"))?;
    Ok(Disk {
        drv,
        done: Vec::new(),
        next_token: 1,
        config_events: 0,
        needs_reset: false,
    })
}

impl Disk {
    pub fn polling(&self) -> bool {
        self.irq().polling()
    }

    /// The function's interrupt plumbing (counters, mode).
    pub fn irq(&self) -> &PciInterrupts {
        self.drv.bus().interrupts()
    }

    pub fn token(&mut self) -> usize {
        self.next_token += 1;
        self.next_token
    }

    /// Guest-side counters summed over the queues, plus interrupts taken.
    pub fn counters(&self) -> Counters {
        let mut c = Counters {
            irqs: self.irq().total(),
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

    /// Feeds the recorded interrupts to the driver (config changes and DEVICE_NEEDS_RESET
    /// noted); the queues' completions are left for `poll_completions`.
    fn handle_interrupts(&mut self) -> Result<(), BlkError> {
        let mut result = Ok(());
        bus::dispatch(
            self,
            |d| d.drv.bus_mut(),
            |d, vector| match d.drv.handle_interrupt(vector) {
                Ok(c) => d.note(c),
                Err(e) => result = Err(e),
            },
        );
        result
    }

    /// Feeds recorded interrupts to the driver, then collects every queue's completions
    /// into `done`. Returns how many completed.
    pub fn service(&mut self) -> Result<usize, BlkError> {
        self.handle_interrupts()?;
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

    /// Whether any queue has used entries not yet popped (a broken queue answers true, so
    /// that servicing reports it).
    fn has_used(&self) -> bool {
        let bus = self.drv.bus();
        (0..self.drv.num_queues()).any(|q| bus.has_used(q).unwrap_or(true))
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
            // Interrupt-driven, as a kext's completion path is: with interrupts on, service
            // only when one was recorded or a queue has used entries (the same cheap peek
            // virtio-drivers' bench loop makes). Every poll re-enables the queue's
            // interrupts, so a completion after this check raises one and ends the halt.
            if polling || self.irq().pending() != 0 || self.has_used() {
                self.service()?;
            }
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
                self.irq().wait(u64::MAX, slice);
            }
        }
    }

    /// Waits for completions on queue 0 and hands each straight to `f`, the way a kext's
    /// interrupt path takes them: the benches' wait. Unlike [`Disk::wait_until`] it keeps
    /// no `done` list and tests no condition, and until a wake-up finds nothing it reads the
    /// clock only inside the halt ([`LazyDeadline`]), so what the benches count per request
    /// is the driver's work and about as little of this guest's as virtio-drivers' bench
    /// loop (`blk/vd.rs`) spends. Returns how many completed; 0 after `timeout_ms` (and at
    /// most one 10 ms slice) without any.
    pub fn wait_completions(
        &mut self,
        timeout_ms: u64,
        mut f: impl FnMut(usize, Outcome),
    ) -> Result<usize, BlkError> {
        let polling = self.polling();
        // Started the first time servicing or a halt finds nothing: bounds a device that
        // keeps interrupting without completing anything, and the spinning when polling.
        let mut limit = LazyDeadline::new(timeout_ms);
        loop {
            // As in `wait_until`: service only when an interrupt was recorded or the queue
            // has used entries; servicing re-enables the queue's interrupts, so a
            // completion after this check raises one and ends the halt below.
            if polling || self.irq().pending() != 0 || self.drv.bus().has_used(0).unwrap_or(true) {
                self.handle_interrupts()?;
                let n = self.drv.poll_completions(0, &mut f)?;
                if n > 0 {
                    return Ok(n);
                }
                if limit.expired() {
                    return Ok(0);
                }
            }
            if polling {
                core::hint::spin_loop();
            } else if !self.irq().wait(u64::MAX, limit.slice_ms()) && limit.expired() {
                return Ok(0);
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
