//! The driver: buffers, their states, and the in-order hand-out (see the crate docs).

use alloc::vec::Vec;
use virtio_core::fifo::Fifo;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::{Bus, DeviceType, Error, QueueSpec, Result, Segment};

use crate::features;

/// The only queue of the device, `requestq` (virtio 1.2 §5.4.2).
pub const REQUEST_QUEUE: u16 = 0;

/// Largest buffer the driver posts: one request never asks for more than this.
const MAX_BUFFER_SIZE: u32 = 1 << 16;
/// Zeroes for wiping handed-out bytes without a buffer of `buffer_size`.
const ZEROES: [u8; 64] = [0; 64];

/// How many buffers to keep posted, and how big each is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RngOptions {
    /// Buffers posted at once (the queue size asked for; the device may offer fewer).
    pub buffers: u16,
    /// Bytes per buffer (clamped to 1..=64 KiB).
    pub buffer_size: u32,
}

impl Default for RngOptions {
    /// Eight 64-byte buffers: 512 bytes in flight, what a kernel entropy pool draws at once.
    fn default() -> Self {
        RngOptions {
            buffers: 8,
            buffer_size: 64,
        }
    }
}

/// Counters over the driver's lifetime.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Buffers the device returned.
    pub completions: u64,
    /// Of those, returned with no bytes (legal; reposted).
    pub empty_completions: u64,
    /// Bytes the device wrote (sum of validated used lengths).
    pub bytes_received: u64,
    /// Bytes handed to callers of [`VirtioRng::read`].
    pub bytes_read: u64,
}

/// What an interrupt meant for the driver.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RngInterrupt {
    /// Bytes ready for [`VirtioRng::read`] after handling it.
    pub bytes_ready: usize,
    /// The device set DEVICE_NEEDS_RESET (§2.1.2): shut the driver down.
    pub needs_reset: bool,
}

/// Where one buffer is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Slot {
    /// Driver-owned, empty: to be posted.
    Free,
    /// On the queue: the device may write it.
    Posted,
    /// Returned with `len` bytes, of which `taken` were handed out; in the ready FIFO.
    Filled { len: u32, taken: u32 },
}

/// The virtio entropy driver over bus `B`.
pub struct VirtioRng<B: Bus> {
    bus: B,
    region: Option<DmaRegion>,
    buffer_size: u32,
    slots: Vec<Slot>,
    /// Filled slots in completion order: the order their bytes are handed out.
    ready: Fifo<u16>,
    ready_bytes: usize,
    stats: RngStats,
}

impl<B: Bus> VirtioRng<B> {
    /// Initialises the device (virtio 1.2 §3.1.1; no device-specific feature exists,
    /// §5.4.3, and there is no device configuration, §5.4.4), sets up `requestq`, sets
    /// DRIVER_OK and posts every buffer (§5.4.6: the driver fills the queue with buffers).
    pub fn new(mut bus: B, opts: RngOptions) -> Result<Self> {
        if bus.device_type() != DeviceType::Entropy {
            return Err(Error::Unsupported);
        }
        bus.negotiate_features(features::SUPPORTED)?;
        if bus.max_queue_size(REQUEST_QUEUE) == 0 {
            bus.fail();
            return Err(Error::NoSuchQueue {
                queue: REQUEST_QUEUE,
            });
        }
        bus.setup_queues(&[QueueSpec::new(REQUEST_QUEUE)
            .size(opts.buffers.max(1))
            .interrupts(true)])?;
        let buffers = bus.queue_size(REQUEST_QUEUE)?.min(opts.buffers.max(1));
        let buffer_size = opts.buffer_size.clamp(1, MAX_BUFFER_SIZE);
        let len = usize::from(buffers) * buffer_size as usize;
        let region = match bus.dma().alloc_coherent(len, 64) {
            Ok(r) => r,
            Err(e) => {
                bus.fail();
                return Err(e);
            }
        };
        let mut slots = Vec::with_capacity(usize::from(buffers));
        slots.resize(usize::from(buffers), Slot::Free);
        let mut rng = VirtioRng {
            bus,
            region: Some(region),
            buffer_size,
            slots,
            ready: Fifo::new(usize::from(buffers), 0),
            ready_bytes: 0,
            stats: RngStats::default(),
        };
        rng.bus.driver_ok()?;
        rng.refill()?;
        log::info!(
            "virtio-rng: {buffers} buffers of {buffer_size} bytes, features {:#x}",
            rng.bus.features().bits()
        );
        Ok(rng)
    }

    pub fn bus(&self) -> &B {
        &self.bus
    }

    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }

    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Bytes ready to be read without waiting.
    pub fn available(&self) -> usize {
        self.ready_bytes
    }

    /// Buffers the driver keeps posted.
    pub fn buffers(&self) -> usize {
        self.slots.len()
    }

    /// Collects completed buffers (no interrupt needed) and posts again those returned
    /// empty: returns the bytes now ready. A caller that sleeps until the next interrupt
    /// calls this (or `read`) first, or buffers returned empty would stay unposted.
    pub fn poll(&mut self) -> Result<usize> {
        self.collect()?;
        self.refill()?;
        Ok(self.ready_bytes)
    }

    /// Copies up to `out.len()` random bytes, in the order the device produced them, and
    /// reposts the buffers it emptied (one kick). Returns how many were copied: 0 when the
    /// device has not delivered any yet (wait for an interrupt, or poll, and read again).
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        self.collect()?;
        let mut copied = 0usize;
        // Each turn retires a slot or fills `out`: at most one turn per slot, plus one.
        for _ in 0..=self.slots.len() {
            if copied == out.len() {
                break;
            }
            let Some(index) = self.ready.front() else {
                break;
            };
            let at = usize::from(index);
            // Only `collect` queues slots, and only filled ones.
            let Some(&Slot::Filled { len, taken }) = self.slots.get(at) else {
                return Err(Error::InvalidState);
            };
            let n = len
                .saturating_sub(taken)
                .min(u32::try_from(out.len() - copied).unwrap_or(u32::MAX));
            let offset = at * self.buffer_size as usize + taken as usize;
            let region = self.region.as_ref().ok_or(Error::InvalidState)?;
            let dst = out
                .get_mut(copied..copied + n as usize)
                .ok_or(Error::InvalidState)?;
            // The device returned this buffer through the used ring (the bus read used.idx
            // with acquire ordering before the element, §2.7.14) and it is not posted again
            // until every byte was handed out. A device breaking that rule could still
            // write it, so the bytes are copied once (`read_into`), never borrowed.
            if !region.read_into(offset, dst) {
                return Err(Error::InvalidState);
            }
            wipe(region, offset, n as usize);
            copied += n as usize;
            self.ready_bytes -= n as usize;
            let taken = taken + n;
            let slot = self.slots.get_mut(at).ok_or(Error::InvalidState)?;
            if taken >= len {
                *slot = Slot::Free;
                self.ready.pop();
            } else {
                *slot = Slot::Filled { len, taken };
            }
        }
        self.stats.bytes_read += copied as u64;
        self.refill()?;
        Ok(copied)
    }

    /// Demultiplexes an interrupt (`vector`: MSI-X index; `None` for INTx, which reads and
    /// clears the ISR) and collects what the device returned. Posts nothing: buffers go
    /// back at the consumer's pace ([`VirtioRng::poll`], [`VirtioRng::read`]), as Linux's
    /// `virtio_read` requests them, so a device answering every buffer empty at once
    /// cannot keep the interrupt path kicking it.
    pub fn handle_interrupt(&mut self, vector: Option<u16>) -> Result<RngInterrupt> {
        let cause = self.bus.handle_interrupt(vector);
        if cause.queues.contains(REQUEST_QUEUE) {
            self.collect()?;
        }
        Ok(RngInterrupt {
            bytes_ready: self.ready_bytes,
            needs_reset: cause.needs_reset,
        })
    }

    /// Re-enables the queue's interrupt before the caller sleeps (after a `read` or `poll`,
    /// which post the free buffers again); true when buffers came back meanwhile (poll
    /// again instead of sleeping).
    pub fn enable_interrupts(&mut self) -> Result<bool> {
        self.bus.enable_interrupts(REQUEST_QUEUE)
    }

    /// Resets the device and frees the buffers. The driver is unusable afterwards (every
    /// call returns an error); bytes not read are discarded.
    ///
    /// A device that will not reset, and whose DMA cannot be stopped, may still write the
    /// buffers: they are leaked (logged), not freed.
    pub fn shutdown(&mut self) {
        let quiet = self.bus.reset(&mut |_, _| {}).is_ok();
        // SAFETY: the region came from this bus's `alloc_coherent` and is taken out of
        // `self.region` (released once); `quiet`: the reset above was acknowledged or the
        // device's DMA stopped, so it no longer accesses it (otherwise it is leaked).
        unsafe { self.bus.release_dma(self.region.take(), quiet) };
        self.slots.iter_mut().for_each(|s| *s = Slot::Free);
        self.ready.clear();
        self.ready_bytes = 0;
    }

    /// Moves every buffer the device returned into the ready FIFO (one returned empty is
    /// free at once). Bounded: the bus hands back only chains in flight, at most one per
    /// slot.
    fn collect(&mut self) -> Result<()> {
        if self.region.is_none() {
            return Err(Error::InvalidState);
        }
        for _ in 0..=self.slots.len() {
            let Some(used) = self.bus.pop_used(REQUEST_QUEUE)? else {
                return Ok(());
            };
            let slot = u16::try_from(used.token)
                .ok()
                .and_then(|i| self.slots.get_mut(usize::from(i)).map(|s| (i, s)));
            let Some((index, slot @ Slot::Posted)) = slot else {
                return Err(Error::DeviceProtocol {
                    what: "completed a buffer the driver did not post",
                });
            };
            self.stats.completions += 1;
            // The bus checked `used.len` against the buffer's writable size (§2.7.8.2).
            if used.len == 0 {
                self.stats.empty_completions += 1;
                *slot = Slot::Free;
                continue;
            }
            *slot = Slot::Filled {
                len: used.len,
                taken: 0,
            };
            if !self.ready.push(index) {
                return Err(Error::DeviceProtocol {
                    what: "more buffers completed than posted",
                });
            }
            self.stats.bytes_received += u64::from(used.len);
            self.ready_bytes += used.len as usize;
        }
        Ok(())
    }

    /// Posts every free buffer and kicks once if any was posted.
    fn refill(&mut self) -> Result<()> {
        let region = self.region.as_ref().ok_or(Error::InvalidState)?;
        let mut posted = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if *slot != Slot::Free {
                continue;
            }
            let seg = Segment::new(
                region.daddr + (i * self.buffer_size as usize) as u64,
                self.buffer_size,
            );
            match self.bus.add(REQUEST_QUEUE, &[], &[seg], i) {
                Ok(()) => {
                    *slot = Slot::Posted;
                    posted = true;
                }
                Err(Error::QueueFull) => break,
                Err(e) => return Err(e),
            }
        }
        if posted {
            self.bus.kick(REQUEST_QUEUE)?;
        }
        Ok(())
    }
}

/// Zeroes `len` bytes at `offset` (bytes already handed out), so a device that claims to
/// fill a buffer without writing it yields zeroes, never bytes a caller already had.
fn wipe(region: &DmaRegion, offset: usize, len: usize) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len());
        region.write_at(offset + done, ZEROES.get(..n).unwrap_or(&[]));
        done += n;
    }
}

impl<B: Bus> Drop for VirtioRng<B> {
    fn drop(&mut self) {
        if self.region.is_some() {
            self.shutdown();
        }
    }
}
