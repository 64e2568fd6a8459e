//! The split virtqueue, driver side (virtio 1.2 §2.7): the hot path shared by every device.
//!
//! Shared ring memory is accessed only with volatile reads/writes and explicit fences. The
//! device may scribble over anything it can reach, so every decision is taken from
//! driver-private shadow state: the free list (`next`), each chain's length and writable
//! capacity, and the avail index. From device-written memory the driver reads only the used
//! ring (`idx`, `id`, `len`), `used.flags` and `avail_event`, and validates each value.

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::error::{Error, Result};
use crate::platform::{DeviceAddr, DmaRegion};
use crate::ring::{AVAIL_F_NO_INTERRUPT, DescFlags, SplitRingLayout, USED_F_NO_NOTIFY, need_event};
use crate::ringmem::{IndirectPool, RingMemory};
use crate::transport::RingAddresses;

/// One buffer of a chain, already mapped for the device.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: DeviceAddr,
    pub len: u32,
}

impl Segment {
    pub const fn new(addr: DeviceAddr, len: u32) -> Self {
        Segment { addr, len }
    }
}

/// A completed chain: the driver's token and the bytes the device wrote (validated).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Used {
    pub token: usize,
    pub len: u32,
}

/// Counters for one queue; cheap, and what the benchmarks compare with QEMU's trace.
/// [`crate::Bus::queue_stats`] counts over the bus's lifetime: a device reset (suspend and
/// resume, a restart after a fault) does not zero them, so they stay comparable with what
/// the device saw.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains made available.
    pub added: u64,
    /// Notifications sent to the device.
    pub kicks: u64,
    /// Kick decisions where the device had asked not to be notified.
    pub kicks_suppressed: u64,
    /// Chains completed by the device.
    pub completions: u64,
    /// Interrupts attributed to this queue by the bus.
    pub interrupts: u64,
    /// Chains that used an indirect table.
    pub indirect: u64,
}

impl core::ops::AddAssign for QueueStats {
    fn add_assign(&mut self, other: QueueStats) {
        let QueueStats {
            added,
            kicks,
            kicks_suppressed,
            completions,
            interrupts,
            indirect,
        } = other;
        self.added = self.added.wrapping_add(added);
        self.kicks = self.kicks.wrapping_add(kicks);
        self.kicks_suppressed = self.kicks_suppressed.wrapping_add(kicks_suppressed);
        self.completions = self.completions.wrapping_add(completions);
        self.interrupts = self.interrupts.wrapping_add(interrupts);
        self.indirect = self.indirect.wrapping_add(indirect);
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Slot {
    /// Not the head of a chain in flight.
    Idle,
    /// Head of a chain in flight.
    InFlight {
        token: usize,
        /// Ring descriptors the chain occupies (1 for an indirect chain).
        descs: u16,
        /// Total device-writable bytes posted: the bound for `used.len`.
        writable: u32,
    },
}

/// Per-queue parameters chosen by the device driver.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Ring entries (power of two).
    pub size: u16,
    /// Use indirect tables of up to this many entries (0: never). Only honoured when
    /// INDIRECT_DESC was negotiated.
    pub max_indirect: u16,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Report every completion's length as 0 without checking it (see
    /// `QueueSpec::ignore_used_len`).
    pub ignore_used_len: bool,
}

/// Driver side of one split virtqueue.
pub struct SplitQueue {
    index: u16,
    layout: SplitRingLayout,
    ring: RingMemory,
    /// One indirect table per possible head.
    indirect: IndirectPool,
    event_idx: bool,
    ignore_used_len: bool,

    /// Driver-private free list links (never read back from shared memory).
    next: Vec<u16>,
    slots: Vec<Slot>,
    free_head: u16,
    num_free: u16,
    /// Shadow of `avail.idx`.
    avail_idx: u16,
    /// `avail.idx` at the last kick decision (the "old" of `vring_need_event`).
    kicked_avail_idx: u16,
    /// Next used-ring slot we will consume.
    last_used: u16,
    interrupts_enabled: bool,
    broken: bool,
    stats: QueueStats,
}

impl SplitQueue {
    /// Builds a queue over zeroed ring memory `ring` laid out as `layout`, and an optional
    /// indirect pool of `size * max_indirect` descriptors. Setup time only (allocates).
    pub fn new(
        index: u16,
        layout: SplitRingLayout,
        ring: DmaRegion,
        indirect: Option<DmaRegion>,
        config: QueueConfig,
    ) -> Result<Self> {
        let size = layout.size;
        if config.size != size {
            return Err(Error::BadQueueSize { queue: index, size });
        }
        let ring = RingMemory::new(ring, layout.total)
            .map_err(|_| Error::BadQueueSize { queue: index, size })?;
        let indirect = IndirectPool::new(indirect, size, config.max_indirect)?;
        // Free list: 0 → 1 → ... → size-1 (the last link is never followed: num_free bounds it).
        let next = (0..size).map(|i| i.wrapping_add(1) % size).collect();
        let mut q = SplitQueue {
            index,
            layout,
            ring,
            indirect,
            event_idx: config.event_idx,
            ignore_used_len: config.ignore_used_len,
            next,
            slots: vec![Slot::Idle; size as usize],
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            kicked_avail_idx: 0,
            last_used: 0,
            interrupts_enabled: true,
            broken: false,
            stats: QueueStats::default(),
        };
        // Start with interrupts enabled: used_event = 0 / flags = 0 (zeroed memory).
        q.ring.write_u16(q.layout.used_event(), 0);
        q.ring.write_u16(q.layout.avail_flags(), 0);
        Ok(q)
    }

    pub fn index(&self) -> u16 {
        self.index
    }
    pub fn size(&self) -> u16 {
        self.layout.size
    }
    pub fn layout(&self) -> &SplitRingLayout {
        &self.layout
    }
    pub fn num_free(&self) -> u16 {
        self.num_free
    }
    pub fn is_broken(&self) -> bool {
        self.broken
    }
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    pub(crate) fn stats_mut(&mut self) -> &mut QueueStats {
        &mut self.stats
    }
    /// Largest chain `add` accepts in one go.
    pub fn max_chain(&self) -> u16 {
        self.indirect.max().max(self.layout.size)
    }
    /// Ring descriptors a chain of `segments` segments occupies: one when it goes through an
    /// indirect table (negotiated, more than one segment, fits the table), else one per
    /// segment. The single rule `add` applies, for drivers sizing their backpressure.
    pub fn descriptors_for(&self, segments: usize) -> usize {
        self.indirect.descriptors_for(segments)
    }

    /// Chains in flight (added, not yet popped).
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Device addresses of the three areas, for the transport.
    pub fn addresses(&self) -> RingAddresses {
        let base = self.ring.daddr();
        RingAddresses {
            desc: base + self.layout.desc as u64,
            driver: base + self.layout.avail as u64,
            device: base + self.layout.used as u64,
        }
    }

    /// Gives back the DMA memory (after the device stopped using the queue).
    pub fn into_regions(self) -> (DmaRegion, Option<DmaRegion>) {
        (self.ring.into_region(), self.indirect.into_region())
    }

    /// Makes a chain of `readable` then `writable` segments available (§2.7.13), tagged
    /// with `token`. Does not notify: call [`SplitQueue::kick_prepare`] after a batch.
    ///
    /// Uses one indirect descriptor when negotiated and the chain has more than one segment
    /// (it then costs one ring slot instead of `n`). Returns `Error::QueueFull` when not
    /// enough descriptors are free: backpressure, retry after completions.
    #[inline]
    pub fn add(&mut self, readable: &[Segment], writable: &[Segment], token: usize) -> Result<()> {
        if self.broken {
            return Err(Error::QueueBroken { queue: self.index });
        }
        let total = readable.len() + writable.len();
        if total == 0 {
            return Err(Error::BadChain);
        }
        let descs = self.descriptors_for(total);
        let use_indirect = descs == 1 && total > 1;
        if descs > self.layout.size as usize {
            return Err(Error::BadChain);
        }
        let descs = descs as u16;
        if descs > self.num_free {
            return Err(Error::QueueFull);
        }
        // Flags of the chain's last descriptor (no NEXT).
        let end = if writable.is_empty() {
            DescFlags::empty()
        } else {
            DescFlags::WRITE
        };
        // Every descriptor is written with NEXT, and the last one's flags are then rewritten
        // without it (one 16-bit store instead of a test per element). Nothing is published
        // before the avail ring update below, so a chain refused half-way (a writable length
        // over 4 GiB) leaves only unused descriptors written.
        let mut writable_len: u32 = 0;
        let head = self.free_head;
        if use_indirect {
            let Some(table) = self.indirect.table(head) else {
                return Err(Error::BadChain);
            };
            // `table` holds max_indirect >= total descriptors (`descriptors_for` chose the
            // table for this many), so entries 0..total lie inside it; the region is DMA
            // memory we own, not yet published.
            let mut p = table;
            let mut i: u16 = 0;
            for seg in readable {
                i += 1;
                // SAFETY: entry i - 1 < total is inside the table (above).
                unsafe { write_desc(p, seg.addr, seg.len, DescFlags::NEXT, i) };
                // SAFETY: at most one past the last entry, inside or at the end of the table.
                p = unsafe { p.add(16) };
            }
            for seg in writable {
                writable_len = writable_len.checked_add(seg.len).ok_or(Error::BadChain)?;
                i += 1;
                let flags = DescFlags::NEXT | DescFlags::WRITE;
                // SAFETY: as above.
                unsafe { write_desc(p, seg.addr, seg.len, flags, i) };
                // SAFETY: as above.
                p = unsafe { p.add(16) };
            }
            // SAFETY: `p` is one past entry total - 1 (total >= 1); its flags field is 4
            // bytes before, 2-aligned, inside the table.
            unsafe {
                p.sub(4)
                    .cast::<u16>()
                    .as_ptr()
                    .write_volatile(end.bits().to_le())
            };
            let table_len = (total * 16) as u32;
            let table_addr = self.indirect.daddr(head);
            self.write_desc_at(head, table_addr, table_len, DescFlags::INDIRECT, 0);
            self.free_head = self.link(head);
            self.stats.indirect += 1;
        } else {
            let mut idx = head;
            let mut last = head;
            for seg in readable {
                let next = self.link(idx);
                self.write_desc_at(idx, seg.addr, seg.len, DescFlags::NEXT, next);
                (last, idx) = (idx, next);
            }
            for seg in writable {
                writable_len = writable_len.checked_add(seg.len).ok_or(Error::BadChain)?;
                let next = self.link(idx);
                let flags = DescFlags::NEXT | DescFlags::WRITE;
                self.write_desc_at(idx, seg.addr, seg.len, flags, next);
                (last, idx) = (idx, next);
            }
            self.ring
                .write_u16(self.layout.desc_entry(last) + 12, end.bits());
            self.free_head = idx;
        }
        self.num_free -= descs;
        self.set_slot(
            head,
            Slot::InFlight {
                token,
                descs,
                writable: writable_len,
            },
        );

        // Publish: ring entry, then (after the barrier) the index (§2.7.13.1–2.7.13.3).
        let slot = self.avail_idx;
        self.ring.write_u16(self.layout.avail_ring(slot), head);
        // §2.7.13.3: "The driver performs a suitable memory barrier to ensure the device
        // sees the updated descriptor table and available ring before the next step."
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ring.write_u16(self.layout.avail_idx(), self.avail_idx);
        self.stats.added += 1;
        Ok(())
    }

    /// Decides whether the device must be notified of chains added since the last call
    /// (§2.7.13.4 with §2.7.10 suppression). Counts the decision.
    pub fn kick_prepare(&mut self) -> bool {
        let old = self.kicked_avail_idx;
        let new = self.avail_idx;
        self.kicked_avail_idx = new;
        if old == new {
            return false;
        }
        // §2.7.13.4: "The driver performs a suitable memory barrier before reading flags or
        // avail_event, to avoid missing a notification": the idx store must be visible
        // before the load of the device's suppression state (store→load: full fence).
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            need_event(self.ring.read_u16(self.layout.avail_event()), new, old)
        } else {
            self.ring.read_u16(self.layout.used_flags()) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        notify
    }

    /// Whether the device has completed chains we have not popped yet.
    #[inline]
    pub fn has_used(&self) -> bool {
        !self.broken && self.ring.read_u16(self.layout.used_idx()) != self.last_used
    }

    /// Pops the next used entry in the order the device completed them (§2.7.14), after
    /// validating it. Any invalid value breaks the queue (it then refuses use until reset):
    /// a device that lies once cannot be trusted with the rest of the ring.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        if self.broken {
            return Err(Error::QueueBroken { queue: self.index });
        }
        let used_idx = self.ring.read_u16(self.layout.used_idx());
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.in_flight() {
            // More completions than chains in flight: the index jumped (at most `size`
            // chains can be in flight, so this also catches jumps beyond the ring size).
            return Err(self.fail(Error::UsedIdxJump {
                queue: self.index,
                used_idx,
                last_seen: self.last_used,
            }));
        }
        // §2.7.14: read the used index before the ring entry it covers (acquire pairs with
        // the device's write barrier before its idx update).
        fence(Ordering::Acquire);
        let elem = self.layout.used_ring(self.last_used);
        let id = self.ring.read_u32(elem);
        let len = self.ring.read_u32(elem + 4);
        let slot = match usize::try_from(id).ok().and_then(|i| self.slots.get(i)) {
            Some(slot) => *slot,
            None => {
                return Err(self.fail(Error::UsedIdOutOfRange {
                    queue: self.index,
                    id,
                }));
            }
        };
        let Slot::InFlight {
            token,
            descs,
            writable,
        } = slot
        else {
            return Err(self.fail(Error::UsedIdNotInFlight {
                queue: self.index,
                id,
            }));
        };
        let len = if self.ignore_used_len { 0 } else { len };
        if len > writable {
            return Err(self.fail(Error::UsedLenTooLarge {
                queue: self.index,
                len,
                max: writable,
            }));
        }
        // `id` < size here. Return the chain to the free list by splicing its shadow links:
        // they are intact because nobody but us writes `next`.
        let head = id as u16;
        let mut last = head;
        for _ in 1..descs {
            last = self.link(last);
        }
        self.set_link(last, self.free_head);
        self.free_head = head;
        self.num_free += descs;
        self.set_slot(head, Slot::Idle);
        self.last_used = self.last_used.wrapping_add(1);
        self.stats.completions += 1;
        if self.event_idx && self.interrupts_enabled {
            // Linux `virtqueue_get_buf_ctx_split`: keep used_event at our consumer position
            // so the next completion interrupts (§2.7.10), and make it visible before the
            // next used.idx read (store→load).
            self.ring
                .write_u16(self.layout.used_event(), self.last_used);
            fence(Ordering::SeqCst);
        }
        Ok(Some(Used { token, len }))
    }

    /// Asks the device not to interrupt for this queue (a hint: it may still do so).
    pub fn disable_interrupts(&mut self) {
        if !self.interrupts_enabled {
            return;
        }
        self.interrupts_enabled = false;
        if self.event_idx {
            // §2.7.10: with EVENT_IDX the flags are ignored; put used_event just behind our
            // position so the device's [old, new) window never contains it.
            self.ring
                .write_u16(self.layout.used_event(), self.last_used.wrapping_sub(1));
        } else {
            self.ring
                .write_u16(self.layout.avail_flags(), AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Re-enables interrupts race-free (Linux `virtqueue_enable_cb_prepare` + `poll`):
    /// returns true if completions arrived that the caller must process now, because the
    /// device may have written them before it saw the re-enable.
    pub fn enable_interrupts(&mut self) -> bool {
        self.enable_interrupts_at(0)
    }

    /// Like [`SplitQueue::enable_interrupts`], but with EVENT_IDX asks for the interrupt only
    /// after about 3/4 of the chains in flight completed (Linux `enable_cb_delayed`): for
    /// transmit completion reclaim, where one interrupt per packet is waste.
    pub fn enable_interrupts_delayed(&mut self) -> bool {
        let bufs = (self.in_flight() as u32 * 3 / 4) as u16;
        self.enable_interrupts_at(bufs)
    }

    fn enable_interrupts_at(&mut self, delay: u16) -> bool {
        self.interrupts_enabled = true;
        if self.event_idx {
            self.ring
                .write_u16(self.layout.used_event(), self.last_used.wrapping_add(delay));
        } else {
            self.ring.write_u16(self.layout.avail_flags(), 0);
        }
        // §2.7.10: the re-enable must be visible before we re-read used.idx, or a completion
        // written in between would be missed with no interrupt (store→load: full fence).
        fence(Ordering::SeqCst);
        let pending = self
            .ring
            .read_u16(self.layout.used_idx())
            .wrapping_sub(self.last_used);
        pending > delay
    }

    /// After a device or queue reset: hands every in-flight token to `f` so the caller can
    /// release its buffers, and returns the queue to its initial state. Not an I/O path.
    pub fn reclaim_after_reset(&mut self, mut f: impl FnMut(usize)) {
        for slot in &mut self.slots {
            if let Slot::InFlight { token, .. } = *slot {
                f(token);
            }
            *slot = Slot::Idle;
        }
        let size = self.layout.size;
        for (i, n) in self.next.iter_mut().enumerate() {
            *n = (i as u16).wrapping_add(1) % size;
        }
        self.free_head = 0;
        self.num_free = size;
        self.avail_idx = 0;
        self.kicked_avail_idx = 0;
        self.last_used = 0;
        self.interrupts_enabled = true;
        self.broken = false;
        // The device no longer uses the ring after a reset: zeroed, it is as new.
        self.ring.zero();
    }

    // Driver-private free-list and slot state. Every index passed here is either produced by
    // the driver itself (free list links, all < size by construction in `new` and preserved
    // by splicing) or a device id already validated against `slots.len()` in `pop_used`.
    // These are the only indexing sites in the crate.
    #[allow(clippy::indexing_slicing)]
    #[inline]
    fn link(&self, i: u16) -> u16 {
        self.next[i as usize]
    }
    #[allow(clippy::indexing_slicing)]
    #[inline]
    fn set_link(&mut self, i: u16, to: u16) {
        self.next[i as usize] = to;
    }
    #[allow(clippy::indexing_slicing)]
    #[inline]
    fn set_slot(&mut self, i: u16, slot: Slot) {
        self.slots[i as usize] = slot;
    }

    #[cold]
    #[inline(never)]
    fn fail(&mut self, e: Error) -> Error {
        log::error!("virtqueue {}: {e}; queue disabled until reset", self.index);
        self.broken = true;
        e
    }

    fn write_desc_at(
        &mut self,
        index: u16,
        addr: DeviceAddr,
        len: u32,
        flags: DescFlags,
        next: u16,
    ) {
        let p = self.ring.ptr(self.layout.desc_entry(index));
        // SAFETY: `desc_entry` reduces the index modulo the size, so the 16-byte entry lies
        // inside the descriptor table of our ring allocation (`ptr` checks in debug builds).
        unsafe { write_desc(p, addr, len, flags, next) };
    }
}

/// Writes one descriptor with volatile stores.
///
/// # Safety
/// `p` must point to 16 writable, 16-aligned bytes of DMA memory owned by the queue.
#[inline]
unsafe fn write_desc(p: NonNull<u8>, addr: u64, len: u32, flags: DescFlags, next: u16) {
    let base = p.as_ptr();
    // SAFETY: the caller guarantees 16 valid aligned bytes; fields at 0/8/12/14 are aligned.
    unsafe {
        base.cast::<u64>().write_volatile(addr.to_le());
        base.add(8).cast::<u32>().write_volatile(len.to_le());
        base.add(12)
            .cast::<u16>()
            .write_volatile(flags.bits().to_le());
        base.add(14).cast::<u16>().write_volatile(next.to_le());
    }
}
