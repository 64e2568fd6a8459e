//! The split virtqueue, driver side (virtio 1.2 §2.7): the hot path shared by every device.
//!
//! Shared ring memory is accessed only with volatile reads/writes and explicit fences. The
//! device may scribble over anything it can reach, so every decision is taken from
//! driver-private shadow state: the free list (`next`), each chain's length and writable
//! capacity, and the avail index. From device-written memory the driver reads only the used
//! ring (`idx`, `id`, `len`), `used.flags` and `avail_event`, and validates each value.

use alloc::boxed::Box;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::error::{Error, Result};
use crate::platform::{DeviceAddr, DmaRegion};
use crate::ring::{AVAIL_F_NO_INTERRUPT, DescFlags, SplitRingLayout, USED_F_NO_NOTIFY, need_event};
use crate::ringmem::{IndirectPool, RingMemory};
use crate::transport::RingAddresses;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One buffer of a chain, already mapped for the device.
///
/// `#[repr(C)]` with its padding spelled out (`reserved`): the kexts' C ABI passes segment
/// lists as `VkSegment`, which has this layout, so a list crosses between the kexts as it
/// is, without a copy (`virtio_kext_abi::as_segments`).
#[repr(C)]
#[derive(Copy, Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Segment {
    pub addr: DeviceAddr,
    pub len: u32,
    /// Zero from [`Segment::new`]; whatever a C caller left there is ignored, by equality
    /// too.
    reserved: u32,
}

impl Segment {
    pub const fn new(addr: DeviceAddr, len: u32) -> Self {
        Segment {
            addr,
            len,
            reserved: 0,
        }
    }
}

impl PartialEq for Segment {
    fn eq(&self, other: &Self) -> bool {
        (self.addr, self.len) == (other.addr, other.len)
    }
}

impl Eq for Segment {}

impl core::fmt::Debug for Segment {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Segment")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .finish()
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

/// Driver-private state of one descriptor index: its free-list (or chain) link and, while it
/// heads a chain in flight, that chain's token and bounds. One array of these instead of
/// separate link and slot arrays: one base pointer and one masked index per access.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    token: usize,
    /// Total device-writable bytes posted: the bound for `used.len`.
    writable: u32,
    /// Ring descriptors the chain headed here occupies (1 for an indirect chain); 0: this
    /// index is not the head of a chain in flight.
    descs: u16,
    /// Last ring descriptor of the chain headed here (the head itself for one descriptor):
    /// `pop_used` splices the chain back onto the free list without walking it.
    tail: u16,
    /// Next descriptor of the free list or of the chain (never read back from shared
    /// memory).
    next: u16,
}

/// Pointers to the fields of one split ring the hot path touches, computed once at setup
/// from the layout, so an access is one load of a pointer, not base plus layout offset.
///
/// Invariant (established by [`SplitAreas::new`]): every pointer lies inside the ring
/// memory, which holds the whole layout (`RingMemory::new` checked its length), and
/// `mask + 1` is the ring size.
#[derive(Copy, Clone)]
struct SplitAreas {
    /// Descriptor table.
    desc: NonNull<u8>,
    /// `avail.ring[0]`; `avail.idx` is the u16 before it (§2.7.6), reached from this
    /// pointer rather than its own (one pointer load fewer in `add`).
    avail_ring: NonNull<u8>,
    /// `avail.flags`.
    avail_flags: NonNull<u8>,
    /// `used_event` (§2.7.10), after the available ring.
    used_event: NonNull<u8>,
    /// `used.idx`; `used.ring[0]` follows it (§2.7.8), reached from this pointer rather
    /// than its own (one pointer load fewer in `pop_used`).
    used_idx: NonNull<u8>,
    /// `used.flags`.
    used_flags: NonNull<u8>,
    /// `avail_event` (§2.7.10), after the used ring.
    avail_event: NonNull<u8>,
    /// Ring size - 1 (sizes are powers of two).
    mask: u16,
}

// SAFETY: the pointers describe the queue's own DMA memory, like the `DmaRegion` they come
// from (which is Send and Sync for the same reason); every access through them is volatile.
unsafe impl Send for SplitAreas {}
// SAFETY: as above. The writers take `&self` but are reached only through methods of
// `SplitQueue` that take `&mut self` (the type is private), so shared references only read.
unsafe impl Sync for SplitAreas {}

impl SplitAreas {
    fn new(ring: &RingMemory, layout: &SplitRingLayout) -> Self {
        // What the accessors below rely on to reach two fields from their neighbours.
        debug_assert_eq!(layout.avail_ring(0), layout.avail_idx() + 2);
        debug_assert_eq!(layout.used_ring(0), layout.used_idx() + 2);
        SplitAreas {
            desc: ring.ptr(layout.desc_entry(0)),
            avail_ring: ring.ptr(layout.avail_ring(0)),
            avail_flags: ring.ptr(layout.avail_flags()),
            used_event: ring.ptr(layout.used_event()),
            used_idx: ring.ptr(layout.used_idx()),
            used_flags: ring.ptr(layout.used_flags()),
            avail_event: ring.ptr(layout.avail_event()),
            mask: layout.size.wrapping_sub(1),
        }
    }

    /// Descriptor `index` (reduced modulo the size).
    #[inline]
    fn desc(&self, index: u16) -> NonNull<u8> {
        // SAFETY: `index & mask` < size, so the 16-byte entry lies inside the descriptor
        // table (struct invariant).
        unsafe { self.desc.add(16 * usize::from(index & self.mask)) }
    }

    /// `avail.ring[slot mod size] = head`.
    #[inline]
    fn write_avail_ring(&self, slot: u16, head: u16) {
        // SAFETY: `slot & mask` < size: a 2-aligned u16 inside the available ring (struct
        // invariant); volatile because the device reads it concurrently.
        unsafe {
            self.avail_ring
                .add(2 * usize::from(slot & self.mask))
                .cast::<u16>()
                .write_volatile(head.to_le())
        }
    }

    /// The used element at `slot mod size`: `(id, len)`.
    #[inline]
    fn read_used_elem(&self, slot: u16) -> (u32, u32) {
        // SAFETY: `used.ring[0]` is 2 bytes after `used.idx` (both inside the ring memory, the
        // used ring 4-aligned); `slot & mask` < size: the 8-byte element lies inside the used
        // ring (struct invariant); volatile because the device writes it concurrently.
        unsafe {
            let elem = self.used_idx.add(2 + 8 * usize::from(slot & self.mask));
            let id = elem.cast::<u32>().read_volatile();
            let len = elem.add(4).cast::<u32>().read_volatile();
            (u32::from_le(id), u32::from_le(len))
        }
    }

    #[inline]
    fn used_idx(&self) -> u16 {
        // SAFETY: a 2-aligned u16 field inside the ring memory (struct invariant); volatile
        // because the device writes it concurrently.
        u16::from_le(unsafe { self.used_idx.cast::<u16>().read_volatile() })
    }

    #[inline]
    fn used_flags(&self) -> u16 {
        // SAFETY: as in `used_idx`.
        u16::from_le(unsafe { self.used_flags.cast::<u16>().read_volatile() })
    }

    #[inline]
    fn avail_event(&self) -> u16 {
        // SAFETY: as in `used_idx`.
        u16::from_le(unsafe { self.avail_event.cast::<u16>().read_volatile() })
    }

    #[inline]
    fn set_avail_idx(&self, value: u16) {
        // SAFETY: `avail.idx` is the 2-aligned u16 just before `avail.ring[0]`, inside the
        // ring memory (struct invariant); volatile because the device reads it concurrently.
        unsafe {
            self.avail_ring
                .sub(2)
                .cast::<u16>()
                .write_volatile(value.to_le())
        }
    }

    #[inline]
    fn set_avail_flags(&self, value: u16) {
        // SAFETY: a 2-aligned u16 field inside the ring memory (struct invariant); volatile
        // because the device reads it concurrently.
        unsafe { self.avail_flags.cast::<u16>().write_volatile(value.to_le()) }
    }

    #[inline]
    fn set_used_event(&self, value: u16) {
        // SAFETY: as in `set_avail_flags`.
        unsafe { self.used_event.cast::<u16>().write_volatile(value.to_le()) }
    }
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
    /// Pointers into `ring` for the hot path.
    areas: SplitAreas,
    /// One indirect table per possible head.
    indirect: IndirectPool,
    event_idx: bool,
    /// `used.len` is ANDed with this: all ones, or 0 with `ignore_used_len`.
    used_len_mask: u32,
    /// `event_idx && interrupts_enabled`: `pop_used` moves `used_event` (one test, not two).
    track_used_event: bool,

    /// Driver-private per-descriptor state, `size` entries (never read back from shared
    /// memory).
    entries: Box<[Entry]>,
    free_head: u16,
    /// Free descriptors, except while `broken`: 0 then, so that the one-segment `add`
    /// refuses a broken queue with the one test it makes anyway (`add_chain` then reports
    /// `QueueBroken`). The count at the break is kept in `free_when_broken`.
    num_free: u16,
    /// `num_free` when the queue broke (what [`SplitQueue::num_free`] reports then).
    free_when_broken: u16,
    /// `add`'s token on its way to `add_chain`, written just before each call and read
    /// only by it (not state). Through the queue rather than as an argument: `add_chain`
    /// then takes all its arguments in registers, so `add` needs no stack slot and no
    /// stack adjustment for the call.
    chain_token: usize,
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
        // The hot path indexes by `i & (size - 1)` and uses pointers computed from the
        // layout's offsets: accept only a layout `SplitRingLayout::new` would have made (a
        // power-of-two size, offsets inside `total`) in memory aligned as it requires.
        if config.size != size
            || SplitRingLayout::new(layout.kind, size) != Some(layout)
            || ring.vaddr.as_ptr().addr() % layout.align.max(1) != 0
        {
            return Err(Error::BadQueueSize { queue: index, size });
        }
        let ring = RingMemory::new(ring, layout.total)
            .map_err(|_| Error::BadQueueSize { queue: index, size })?;
        let indirect = IndirectPool::new(indirect, size, config.max_indirect)?;
        let areas = SplitAreas::new(&ring, &layout);
        // Free list: 0 → 1 → ... → size-1 (the last link is never followed: num_free bounds it).
        let entries = (0..size)
            .map(|i| Entry {
                next: i.wrapping_add(1) % size,
                ..Entry::default()
            })
            .collect();
        let q = SplitQueue {
            index,
            layout,
            ring,
            areas,
            indirect,
            event_idx: config.event_idx,
            used_len_mask: if config.ignore_used_len { 0 } else { u32::MAX },
            track_used_event: config.event_idx,
            entries,
            free_head: 0,
            num_free: size,
            free_when_broken: 0,
            chain_token: 0,
            avail_idx: 0,
            kicked_avail_idx: 0,
            last_used: 0,
            interrupts_enabled: true,
            broken: false,
            stats: QueueStats::default(),
        };
        // Start with interrupts enabled: used_event = 0 / flags = 0 (zeroed memory).
        q.areas.set_used_event(0);
        q.areas.set_avail_flags(0);
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
        if self.broken {
            self.free_when_broken
        } else {
            self.num_free
        }
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
    #[inline(always)]
    pub fn add(&mut self, readable: &[Segment], writable: &[Segment], token: usize) -> Result<()> {
        // Fast path: a chain of one segment takes one descriptor (a table is only ever used
        // for more than one). Anything else, and every error, goes to `add_chain`.
        let (seg, flags, capacity) = match (readable, writable) {
            ([], [seg]) => (seg, DescFlags::WRITE, seg.len),
            ([seg], []) => (seg, DescFlags::empty(), 0),
            _ => {
                self.chain_token = token;
                return self.add_chain(writable, readable);
            }
        };
        // `num_free` is 0 on a broken queue too (see the field).
        if self.num_free == 0 {
            self.chain_token = token;
            return self.add_chain(writable, readable);
        }
        // Counters and free list updated as soon as known: fewer values live at once, so
        // the hot path fits the call-clobbered registers.
        self.num_free -= 1;
        let head = self.free_head;
        let entry = self.entry_mut(head);
        entry.token = token;
        entry.writable = capacity;
        entry.descs = 1;
        entry.tail = head;
        let next = entry.next;
        self.free_head = next;
        // SAFETY: `desc` gives a 16-byte, 16-aligned entry of our descriptor table, not
        // published (the free list held it).
        unsafe { write_desc(self.areas.desc(head), seg.addr, seg.len, flags, next) };
        self.publish(head);
        Ok(())
    }

    /// `add` for chains of any length, and its errors (out of line: keeps the one-segment
    /// path's register use and code small), for the token in `chain_token`. Writable
    /// segments first: the order in which a one-segment receive `add` already holds its
    /// arguments in registers.
    #[inline(never)]
    fn add_chain(&mut self, writable: &[Segment], readable: &[Segment]) -> Result<()> {
        let token = self.chain_token;
        let total = readable.len() + writable.len();
        let table = self.indirect.holds(total);
        // The common multi-segment case first: one indirect table, one ring slot.
        if table && self.num_free != 0 && !self.broken {
            return self.add_indirect(readable, writable, token);
        }
        if self.broken {
            return Err(Error::QueueBroken { queue: self.index });
        }
        if total == 0 {
            return Err(Error::BadChain);
        }
        // A chain for a table got here only because the ring is full; any other takes one
        // descriptor per segment.
        if !table && total > self.layout.size as usize {
            return Err(Error::BadChain);
        }
        if table || total > usize::from(self.num_free) {
            // A chain that could never be added is not backpressure: its writable bytes
            // must fit the 32-bit used length (summed below on the way otherwise).
            return Err(
                if writable
                    .iter()
                    .try_fold(0u32, |a, s| a.checked_add(s.len))
                    .is_none()
                {
                    Error::BadChain
                } else {
                    Error::QueueFull
                },
            );
        }
        // `total` <= num_free <= size (above).
        let descs = total as u16;
        // Every descriptor is written with NEXT, and the last one's flags are then rewritten
        // without it (one 16-bit store instead of a test per element). Nothing is published
        // before the avail ring update below, so a chain refused half-way (a writable length
        // over 4 GiB) leaves only unused descriptors written.
        let mut writable_len: u32 = 0;
        let head = self.free_head;
        let mut idx = head;
        let mut last = head;
        for seg in readable {
            let next = self.link(idx);
            // SAFETY: a 16-byte entry of our descriptor table, not published.
            unsafe {
                write_desc(
                    self.areas.desc(idx),
                    seg.addr,
                    seg.len,
                    DescFlags::NEXT,
                    next,
                )
            };
            (last, idx) = (idx, next);
        }
        for seg in writable {
            writable_len = writable_len.checked_add(seg.len).ok_or(Error::BadChain)?;
            let next = self.link(idx);
            let flags = DescFlags::NEXT | DescFlags::WRITE;
            // SAFETY: as above.
            unsafe { write_desc(self.areas.desc(idx), seg.addr, seg.len, flags, next) };
            (last, idx) = (idx, next);
        }
        // SAFETY: the flags field (offset 12, 2-aligned) of the chain's last descriptor,
        // inside our descriptor table.
        unsafe {
            self.areas
                .desc(last)
                .add(12)
                .cast::<u16>()
                .write_volatile(last_flags(writable).bits().to_le())
        };
        self.free_head = idx;
        self.num_free -= descs;
        self.commit(head, token, writable_len, descs, last);
        Ok(())
    }

    /// A chain of 2..=max_indirect segments as one indirect table in the free
    /// head's slot (§2.7.5.3): the caller checked that a descriptor is free and the queue
    /// is not broken.
    #[inline(always)]
    fn add_indirect(
        &mut self,
        readable: &[Segment],
        writable: &[Segment],
        token: usize,
    ) -> Result<()> {
        let head = self.free_head;
        // Every entry is written with NEXT and the last one's flags rewritten (as in
        // `add_chain`).
        let table =
            self.indirect
                .write_table(head, readable, writable, |p, seg, flags, next| {
                    // SAFETY: `write_table` hands over one entry of the table, not published.
                    unsafe { write_desc(p, seg.addr, seg.len, flags | DescFlags::NEXT, next) }
                })?;
        // SAFETY: `end` is one past the last entry (the table has at least two); that
        // entry's flags field is 4 bytes before it, 2-aligned, inside the table.
        unsafe {
            table
                .end
                .sub(4)
                .cast::<u16>()
                .as_ptr()
                .write_volatile(last_flags(writable).bits().to_le())
        };
        // SAFETY: a 16-byte entry of our descriptor table, not published.
        unsafe {
            write_desc(
                self.areas.desc(head),
                table.daddr,
                table.len,
                DescFlags::INDIRECT,
                0,
            )
        };
        self.free_head = self.link(head);
        self.num_free -= 1;
        self.stats.indirect += 1;
        self.commit(head, token, table.writable, 1, head);
        Ok(())
    }

    /// Records the chain at `head` (its last descriptor `tail`) as in flight and publishes it.
    #[inline(always)]
    fn commit(&mut self, head: u16, token: usize, writable: u32, descs: u16, tail: u16) {
        let entry = self.entry_mut(head);
        entry.token = token;
        entry.writable = writable;
        entry.descs = descs;
        entry.tail = tail;
        self.publish(head);
    }

    /// Makes the chain at `head` available: ring entry, then (after the barrier) the index
    /// (§2.7.13.1–2.7.13.3).
    #[inline]
    fn publish(&mut self, head: u16) {
        self.areas.write_avail_ring(self.avail_idx, head);
        // §2.7.13.3: "The driver performs a suitable memory barrier to ensure the device
        // sees the updated descriptor table and available ring before the next step."
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.areas.set_avail_idx(self.avail_idx);
        self.stats.added += 1;
    }

    /// Decides whether the device must be notified of chains added since the last call
    /// (§2.7.13.4 with §2.7.10 suppression). Counts the decision.
    #[inline(always)]
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
            need_event(self.areas.avail_event(), new, old)
        } else {
            self.areas.used_flags() & USED_F_NO_NOTIFY == 0
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
        !self.broken && self.areas.used_idx() != self.last_used
    }

    /// Pops the next used entry in the order the device completed them (§2.7.14), after
    /// validating it. Any invalid value breaks the queue (it then refuses use until reset):
    /// a device that lies once cannot be trusted with the rest of the ring.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        // `used_idx_if_new` spelled out: the refusal then returns this function's own
        // result, not an `Option<u16>` unpacked on the way back.
        if self.broken {
            return self.pop_refused();
        }
        let used_idx = self.areas.used_idx();
        if used_idx == self.last_used {
            return Ok(None);
        }
        self.pop_used_from(used_idx)
    }

    /// The first half of [`SplitQueue::pop_used`]: the device's used index, read once, when
    /// it moved past ours; `None` when nothing is new. Split from the rest so that
    /// `Virtqueue::pop_used` can answer "nothing new" inline and call the rest.
    #[inline]
    pub(crate) fn used_idx_if_new(&self) -> Result<Option<u16>> {
        if self.broken {
            return self.pop_refused();
        }
        let used_idx = self.areas.used_idx();
        Ok((used_idx != self.last_used).then_some(used_idx))
    }

    /// The rest of [`SplitQueue::pop_used`], for the `used_idx` that
    /// [`SplitQueue::used_idx_if_new`] read: validates and pops the next entry. Only for
    /// an index that moved past ours (`used_idx_if_new` answered `Some`): with nothing new
    /// it would read the entry at our position, which the device has not written.
    #[inline(always)]
    pub(crate) fn pop_used_from(&mut self, used_idx: u16) -> Result<Option<Used>> {
        // A copy: read through `self` after the fence, the pointers would be loaded again.
        let areas = self.areas;
        let last_used = self.last_used;
        let pending = used_idx.wrapping_sub(last_used);
        debug_assert!(pending != 0, "pop_used_from with nothing new");
        if pending > self.avail_idx.wrapping_sub(last_used) {
            // More completions than chains in flight: the index jumped (at most `size`
            // chains can be in flight, so this also catches jumps beyond the ring size).
            return self.pop_failed(move |queue| Error::UsedIdxJump {
                queue,
                used_idx,
                last_seen: last_used,
            });
        }
        // §2.7.14: read the used index before the ring entry it covers (acquire pairs with
        // the device's write barrier before its idx update).
        fence(Ordering::Acquire);
        let (id, len) = areas.read_used_elem(last_used);
        if id > u32::from(areas.mask) {
            return self.pop_failed(move |queue| Error::UsedIdOutOfRange { queue, id });
        }
        // `id` < size here.
        let head = id as u16;
        debug_assert!((id as usize) < self.entries.len());
        // SAFETY: id <= mask = size - 1 < size = entries.len() (checked just above; see
        // `entry_mut`): an index already in range is not masked again.
        let entry = unsafe { self.entries.get_unchecked_mut(id as usize) };
        let Entry {
            token,
            writable,
            descs,
            tail,
            ..
        } = *entry;
        if descs == 0 {
            return self.pop_failed(move |queue| Error::UsedIdNotInFlight { queue, id });
        }
        let len = len & self.used_len_mask;
        if len > writable {
            return self.pop_failed(move |queue| Error::UsedLenTooLarge {
                queue,
                len,
                max: writable,
            });
        }
        // Return the chain to the free list by splicing its shadow links (head to tail):
        // they are intact because nobody but us writes them.
        let free_head = self.free_head;
        entry.descs = 0;
        let mask = areas.mask;
        let tail = usize::from(tail & mask);
        debug_assert!(tail < self.entries.len());
        // SAFETY: tail & mask <= mask = size - 1 < entries.len() (see `entry_mut`).
        unsafe { self.entries.get_unchecked_mut(tail) }.next = free_head;
        self.free_head = head;
        self.num_free += descs;
        let last_used = last_used.wrapping_add(1);
        self.last_used = last_used;
        self.stats.completions += 1;
        if self.track_used_event {
            // EVENT_IDX with interrupts enabled. Linux `virtqueue_get_buf_ctx_split`: keep
            // used_event at our consumer position so the next completion interrupts
            // (§2.7.10), and make it visible before the next used.idx read (store→load).
            self.areas.set_used_event(last_used);
            fence(Ordering::SeqCst);
        }
        Ok(Some(Used { token, len }))
    }

    /// Pops every completion into `f`, in device order; returns how many (`Bus::drain_used`,
    /// whose contract this keeps). One pass over the ring state instead of the peek,
    /// disable, pops and re-enable as separate calls: the used index is read once per
    /// round, and each pop is checked against that read.
    ///
    /// With `interrupts`, interrupts stay suppressed while it pops and are re-enabled at
    /// the end without a race (§2.7.10); it returns with them enabled when it popped
    /// anything (with nothing to pop it changes nothing, as `Bus::drain_used`). Under
    /// EVENT_IDX suppressing writes nothing: after a plain re-enable `used_event` holds our
    /// position, which the device's used index has already passed (that is why there is
    /// something to pop), so it raises no interrupt until the re-enable at the end moves
    /// `used_event` on
    /// (what Linux's `virtqueue_disable_cb_split` does once an event has triggered). After
    /// a delayed re-enable `used_event` lies ahead and the device may interrupt once while
    /// we pop: suppression is only a hint, and that interrupt finds the queue drained.
    ///
    /// Bounded: every round pops at least one chain in flight or breaks the queue, and no
    /// chain is added meanwhile, so there are at most `size + 1` rounds.
    #[inline]
    pub fn drain_used(&mut self, interrupts: bool, mut f: impl FnMut(Used)) -> Result<usize> {
        if self.broken {
            return self.pop_refused();
        }
        let mut used_idx = self.areas.used_idx();
        if used_idx == self.last_used {
            return Ok(0);
        }
        if interrupts {
            self.suppress_interrupts();
        }
        let mut n = 0;
        for _ in 0..=self.layout.size {
            while self.last_used != used_idx {
                // `pop_used_from` pops whenever the index moved; `None` ends the round.
                let Some(used) = self.pop_used_from(used_idx)? else {
                    break;
                };
                f(used);
                n += 1;
            }
            // Re-enable, then look again (store→load: the full fence in
            // `enable_interrupts`); with nothing new, interrupts stay on.
            if interrupts && !self.enable_interrupts() {
                return Ok(n);
            }
            used_idx = self.areas.used_idx();
            if used_idx == self.last_used {
                return Ok(n);
            }
            if interrupts {
                self.suppress_interrupts();
            }
        }
        if interrupts {
            self.enable_interrupts();
        }
        Ok(n)
    }

    /// `drain_used`'s suppression while it pops (see there): no ring write under EVENT_IDX.
    #[inline]
    fn suppress_interrupts(&mut self) {
        self.interrupts_enabled = false;
        self.track_used_event = false;
        if !self.event_idx {
            self.areas.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        }
    }

    /// `pop_used` on a broken queue.
    #[cold]
    #[inline(never)]
    fn pop_refused<T>(&self) -> Result<T> {
        Err(Error::QueueBroken { queue: self.index })
    }

    /// `pop_used` found the device lying: breaks the queue. The error is built here, from
    /// the few values the closure captures, so the hot path keeps no room for it.
    #[cold]
    #[inline(never)]
    fn pop_failed(&mut self, error: impl FnOnce(u16) -> Error) -> Result<Option<Used>> {
        Err(self.fail(error(self.index)))
    }

    /// Asks the device not to interrupt for this queue (a hint: it may still do so).
    pub fn disable_interrupts(&mut self) {
        if !self.interrupts_enabled {
            return;
        }
        self.interrupts_enabled = false;
        self.track_used_event = false;
        if self.event_idx {
            // §2.7.10: with EVENT_IDX the flags are ignored; put used_event just behind our
            // position so the device's [old, new) window never contains it.
            self.areas.set_used_event(self.last_used.wrapping_sub(1));
        } else {
            self.areas.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Re-enables interrupts race-free (Linux `virtqueue_enable_cb_prepare` + `poll`):
    /// returns true if completions arrived that the caller must process now, because the
    /// device may have written them before it saw the re-enable.
    #[inline(always)]
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

    #[inline(always)]
    fn enable_interrupts_at(&mut self, delay: u16) -> bool {
        self.interrupts_enabled = true;
        self.track_used_event = self.event_idx;
        if self.event_idx {
            self.areas
                .set_used_event(self.last_used.wrapping_add(delay));
        } else {
            self.areas.set_avail_flags(0);
        }
        // §2.7.10: the re-enable must be visible before we re-read used.idx, or a completion
        // written in between would be missed with no interrupt (store→load: full fence).
        fence(Ordering::SeqCst);
        let pending = self.areas.used_idx().wrapping_sub(self.last_used);
        pending > delay
    }

    /// After a device or queue reset: hands every in-flight token to `f` so the caller can
    /// release its buffers, and returns the queue to its initial state (its ring zeroed).
    /// Only once the device no longer uses the ring (reset acknowledged, or its DMA
    /// stopped); otherwise [`SplitQueue::reclaim_abandoned`]. Not an I/O path.
    pub fn reclaim_after_reset(&mut self, mut f: impl FnMut(usize)) {
        let size = self.layout.size;
        for (i, entry) in self.entries.iter_mut().enumerate() {
            if entry.descs != 0 {
                f(entry.token);
            }
            *entry = Entry {
                next: (i as u16).wrapping_add(1) % size,
                ..Entry::default()
            };
        }
        self.free_head = 0;
        self.num_free = size;
        self.free_when_broken = 0;
        self.avail_idx = 0;
        self.kicked_avail_idx = 0;
        self.last_used = 0;
        self.interrupts_enabled = true;
        self.track_used_event = self.event_idx;
        self.broken = false;
        // SAFETY of the zeroing (callers' contract above): the device was reset (or its DMA
        // stopped), so it no longer reads or writes the ring: zeroed, it is as new.
        self.ring.zero();
    }

    /// After a reset the device did not acknowledge and whose DMA could not be stopped:
    /// hands every in-flight token to `f` (each once) without touching the ring, which the
    /// device may still read and write. The queue is broken afterwards (it refuses every
    /// chain) and its memory must be leaked, never reused (see `Bus::reset`). Not an I/O
    /// path.
    pub fn reclaim_abandoned(&mut self, mut f: impl FnMut(usize)) {
        for entry in self.entries.iter_mut() {
            if entry.descs != 0 {
                f(entry.token);
                entry.descs = 0;
            }
        }
        self.free_when_broken = 0;
        self.num_free = 0;
        self.broken = true;
    }

    // Driver-private per-descriptor state. `entries` has exactly `size` elements (built in
    // `new`, never resized) and `mask` is `size - 1`, so a masked index is always in range:
    // these and `pop_used_from` (which indexes by a device id it has just checked against
    // the size, and masks the chain's tail) are the only indexing sites in the crate without
    // a bounds check. Every index passed here is a free-list or chain link (all < size by
    // construction in `new`, preserved by splicing); the mask makes the access sound
    // whatever it is.
    #[inline]
    fn entry_mut(&mut self, i: u16) -> &mut Entry {
        let i = usize::from(i & self.areas.mask);
        debug_assert!(i < self.entries.len());
        // SAFETY: i <= mask = size - 1 < size = entries.len() (above).
        unsafe { self.entries.get_unchecked_mut(i) }
    }
    #[inline]
    fn link(&self, i: u16) -> u16 {
        let i = usize::from(i & self.areas.mask);
        debug_assert!(i < self.entries.len());
        // SAFETY: as in `entry_mut`.
        unsafe { self.entries.get_unchecked(i) }.next
    }

    #[cold]
    #[inline(never)]
    fn fail(&mut self, e: Error) -> Error {
        log::error!("virtqueue {}: {e}; queue disabled until reset", self.index);
        if !self.broken {
            // No chain is added or popped while broken: the count stays as it was.
            self.free_when_broken = self.num_free;
            self.num_free = 0;
        }
        self.broken = true;
        e
    }
}

/// Flags of a chain's last descriptor: no NEXT; WRITE if the chain ends device-writable.
#[inline(always)]
fn last_flags(writable: &[Segment]) -> DescFlags {
    if writable.is_empty() {
        DescFlags::empty()
    } else {
        DescFlags::WRITE
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
