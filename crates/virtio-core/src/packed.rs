//! Packed virtqueue, driver side (virtio 1.2 §2.8): one descriptor ring the driver and the
//! device both write, with wrap counters instead of indices, and event-suppression
//! structures instead of flags and `used_event`/`avail_event`.
//!
//! Same contract as [`SplitQueue`](crate::SplitQueue): chains of readable then writable
//! segments tagged with a token, indirect tables when negotiated, batching with one
//! notification decision per batch, completions validated before they are believed (an
//! invalid one breaks the queue until reset), tokens handed back after a reset, and no
//! allocation after [`PackedQueue::new`].
//!
//! Buffer ids are the driver's: one per chain in flight, from a free list of `size` ids;
//! the device returns a chain by writing a used descriptor (its id and length) at the next
//! used position, and the driver then skips as many ring positions as that chain took
//! (§2.8.7, §2.8.21).

use alloc::boxed::Box;
use alloc::vec;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::error::{Error, Result};
use crate::platform::DmaRegion;
use crate::queue::{QueueConfig, QueueStats, Segment, Used};
use crate::ring::{DescFlags, MAX_QUEUE_SIZE, need_event};
use crate::ringmem::{IndirectPool, RingMemory};
use crate::transport::RingAddresses;

/// `VIRTQ_DESC_F_AVAIL` (§2.8.1): equals the driver's wrap counter when it makes a
/// descriptor available.
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// `VIRTQ_DESC_F_USED` (§2.8.1): the inverse of the wrap counter when made available;
/// equal to AVAIL when the device has used the descriptor.
pub const DESC_F_USED: u16 = 1 << 15;
/// Event suppression `flags` (§2.8.10): notify/interrupt on every event.
pub const EVENT_FLAG_ENABLE: u16 = 0;
/// Never.
pub const EVENT_FLAG_DISABLE: u16 = 1;
/// At the descriptor named by `off_wrap` (EVENT_IDX only).
pub const EVENT_FLAG_DESC: u16 = 2;
/// What breaks the queue when the device writes flags in the wrong lap.
const WRONG_LAP: &str = "used descriptor flags in the wrong lap";
/// `off_wrap`'s wrap-counter bit.
const WRAP_BIT: u16 = 1 << 15;

/// Byte layout of one packed ring in a single allocation: the descriptor ring (16 bytes
/// per entry, 16-aligned), then the driver event suppression structure (4 bytes), then the
/// device's (4 bytes), both 4-aligned (§2.8.10, §4.1.4.3 alignment table).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PackedRingLayout {
    pub size: u16,
    /// Offset of the driver event suppression structure (driver area).
    pub driver: usize,
    /// Offset of the device event suppression structure (device area).
    pub device: usize,
    pub total: usize,
    pub align: usize,
}

impl PackedRingLayout {
    /// Layout for `size` entries (1..=32768; a packed ring need not be a power of two).
    pub fn new(size: u16) -> Option<Self> {
        if size == 0 || size > MAX_QUEUE_SIZE {
            return None;
        }
        let driver = 16 * size as usize;
        Some(PackedRingLayout {
            size,
            driver,
            device: driver + 4,
            total: driver + 8,
            align: 16,
        })
    }
}

/// Driver-private state of one buffer id: while a chain is in flight under it, that chain's
/// token, bound and ring positions; while it is free, the next free id. One array of these
/// (a power of two long, so a masked index is always inside it) with the free list threaded
/// through it: taking or returning an id is a load and a few stores, with no stack to grow.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct IdState {
    token: usize,
    /// Total device-writable bytes posted: the bound for the used length.
    writable: u32,
    /// Ring positions the chain took (1 for an indirect chain); 0: the id is free.
    descs: u16,
    /// Next id of the free list (read only while this id is free).
    next: u16,
}

/// What a descriptor's flags say at the driver's used position ([`PackedQueue::used_flags`]).
enum UsedFlags {
    /// Used by the device in this lap.
    Used,
    /// Made available by us in this lap, not used yet (or never written).
    NotYet,
    /// AVAIL of the other lap: a device writing in the wrong lap, unless nothing is in
    /// flight (then it is a position not written in this lap: zero since setup, or the
    /// last lap's).
    WrongLap,
}

/// AVAIL and USED together: a descriptor's flags masked with this tell its state in one
/// compare (§2.8.1).
const LAP_BITS: u16 = DESC_F_AVAIL | DESC_F_USED;
/// Set in the used position's `lap` while the queue is broken: no descriptor's flags masked
/// with `LAP_BITS` equal it then, so `pop_used`'s used test fails and its slow path refuses
/// the broken queue (one test fewer on the hot path).
const BROKEN_LAP: u16 = 1;

/// A ring position and the wrap counter that goes with it, kept as AVAIL and USED bits
/// (§2.8.1) that the position's use needs as they are: for the used position, those of a
/// descriptor the device has used in that lap (both set for wrap counter 1, neither for
/// 0), so that the used test is one mask and compare; for the avail position, those of a
/// descriptor made available in that lap (AVAIL for wrap counter 1, USED for 0), written
/// as they are. Either way a wrap flips both bits (one xor).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Pos {
    idx: u16,
    /// Used position: `LAP_BITS` for wrap counter 1, 0 for 0, and also `BROKEN_LAP` while
    /// the queue is broken. Avail position: `DESC_F_AVAIL` for wrap counter 1,
    /// `DESC_F_USED` for 0.
    lap: u16,
}

impl Pos {
    /// The used position at setup: wrap counter 1.
    const USED_START: Pos = Pos {
        idx: 0,
        lap: LAP_BITS,
    };
    /// The avail position at setup: wrap counter 1.
    const AVAIL_START: Pos = Pos {
        idx: 0,
        lap: DESC_F_AVAIL,
    };

    /// An avail position's wrap counter.
    #[inline(always)]
    fn avail_wrap(self) -> bool {
        self.lap & DESC_F_AVAIL != 0
    }

    /// `n` positions further on a ring of `size` (n <= size).
    #[inline(always)]
    fn advance(self, n: u16, size: u16) -> Pos {
        let idx = u32::from(self.idx) + u32::from(n);
        if idx >= u32::from(size) {
            Pos {
                idx: (idx - u32::from(size)) as u16,
                lap: self.lap ^ LAP_BITS,
            }
        } else {
            Pos {
                idx: idx as u16,
                lap: self.lap,
            }
        }
    }

    /// An avail position's AVAIL and USED bits of a descriptor made available in this lap
    /// (§2.8.1): AVAIL equal to the wrap counter, USED its inverse.
    #[inline(always)]
    fn avail_bits(self) -> u16 {
        self.lap
    }

    /// `advance` in place, for the hot paths: the lap is stored only when it changes (once
    /// a lap), and that conditional store makes the wrap a branch rather than the selects
    /// the compiler makes of `advance`'s two values.
    #[inline(always)]
    fn step(&mut self, n: u16, size: u16) {
        let idx = u32::from(self.idx) + u32::from(n);
        if idx >= u32::from(size) {
            self.idx = (idx - u32::from(size)) as u16;
            self.lap ^= LAP_BITS;
        } else {
            self.idx = idx as u16;
        }
    }

    /// A used position's `off_wrap`, as the event suppression structures encode it.
    #[inline(always)]
    fn off_wrap(self) -> u16 {
        // WRAP_BIT is USED's bit, set in `lap` exactly for wrap counter 1.
        self.idx | (self.lap & WRAP_BIT)
    }
}

/// Driver side of one packed virtqueue.
pub struct PackedQueue {
    index: u16,
    layout: PackedRingLayout,
    ring: RingMemory,
    /// One indirect table per buffer id.
    indirect: IndirectPool,
    event_idx: bool,
    /// Applied to every used length: 0 with `ignore_used_len` (the length is not reported),
    /// all ones otherwise. One `and` in `pop_used` instead of a test and a select.
    used_len_mask: u32,

    /// Per-id state, `size.next_power_of_two()` entries (those from `size` on are never
    /// used); indexed through [`PackedQueue::id_mut`] only.
    ids: Box<[IdState]>,
    /// `ids.len() - 1`.
    id_mask: u16,
    /// First free id. There is one whenever a ring position is free: every chain in flight
    /// holds an id and at least one position, so `in_flight <= size - num_free`. The list
    /// ends in the value `size` (the last id's link), which is never taken.
    free_id: u16,
    /// Free ring positions, except while `broken`: 0 then, so that the one-segment `add`
    /// refuses a broken queue with the one test it makes anyway (`add_chain` then reports
    /// `QueueBroken`). The count at the break is kept in `free_when_broken`.
    num_free: u16,
    /// `num_free` when the queue broke (what [`PackedQueue::num_free`] reports then).
    free_when_broken: u16,
    /// `add`'s token on its way to `add_chain`, written just before each call and read
    /// only by it (not state). Through the queue rather than as an argument: `add_chain`
    /// then takes all its arguments in registers, so `add` needs no stack slot for the call.
    chain_token: usize,
    in_flight: u16,
    next_avail: Pos,
    next_used: Pos,
    /// Ring positions made available since the last notification decision. A u64, which
    /// 2^64 adds between two decisions would take to wrap: it need not saturate, and `add`
    /// counts with one add to memory.
    added_since_kick: u64,
    interrupts_enabled: bool,
    /// The driver event structure's flags are DESC (EVENT_IDX's interrupt point), as the
    /// last re-enable wrote them; false while they are ENABLE (after setup or a reset) or
    /// DISABLE.
    event_desc: bool,
    broken: bool,
    stats: QueueStats,
}

impl PackedQueue {
    /// Builds a queue over zeroed ring memory `ring` laid out as `layout`, and an optional
    /// indirect pool of `size * max_indirect` entries. Setup time only (allocates).
    pub fn new(
        index: u16,
        layout: PackedRingLayout,
        ring: DmaRegion,
        indirect: Option<DmaRegion>,
        config: QueueConfig,
    ) -> Result<Self> {
        let size = layout.size;
        // The layout's fields are public, and every ring access trusts its offsets (and the
        // event structures' 4-byte alignment): accept only a layout `PackedRingLayout::new`
        // would have made (1..=MAX_QUEUE_SIZE entries), in memory aligned as it requires.
        if config.size != size
            || PackedRingLayout::new(size) != Some(layout)
            || ring.vaddr.as_ptr().addr() % layout.align.max(1) != 0
        {
            return Err(Error::BadQueueSize { queue: index, size });
        }
        let ring = RingMemory::new(ring, layout.total)
            .map_err(|_| Error::BadQueueSize { queue: index, size })?;
        let indirect = IndirectPool::new(indirect, size, config.max_indirect)?;
        let id_slots = usize::from(size).next_power_of_two();
        let mut q = PackedQueue {
            index,
            layout,
            ring,
            indirect,
            event_idx: config.event_idx,
            used_len_mask: if config.ignore_used_len { 0 } else { u32::MAX },
            ids: vec![IdState::default(); id_slots].into_boxed_slice(),
            // 1 <= id_slots <= MAX_QUEUE_SIZE (checked above), so this fits.
            id_mask: (id_slots - 1) as u16,
            free_id: 0,
            num_free: size,
            free_when_broken: 0,
            chain_token: 0,
            in_flight: 0,
            next_avail: Pos::AVAIL_START,
            next_used: Pos::USED_START,
            added_since_kick: 0,
            interrupts_enabled: true,
            event_desc: false,
            broken: false,
            stats: QueueStats::default(),
        };
        q.link_free_ids();
        q.reset_memory();
        Ok(q)
    }

    pub fn index(&self) -> u16 {
        self.index
    }
    pub fn size(&self) -> u16 {
        self.layout.size
    }
    pub fn layout(&self) -> &PackedRingLayout {
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
    /// Ring positions a chain of `segments` segments takes (the split ring's rule).
    pub fn descriptors_for(&self, segments: usize) -> usize {
        self.indirect.descriptors_for(segments)
    }
    /// Chains in flight (added, not yet popped).
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Device addresses of the descriptor ring and the two event suppression structures.
    pub fn addresses(&self) -> RingAddresses {
        let base = self.ring.daddr();
        RingAddresses {
            desc: base,
            driver: base + self.layout.driver as u64,
            device: base + self.layout.device as u64,
        }
    }

    /// Gives back the DMA memory (after the device stopped using the queue).
    pub fn into_regions(self) -> (DmaRegion, Option<DmaRegion>) {
        (self.ring.into_region(), self.indirect.into_region())
    }

    /// Makes a chain of `readable` then `writable` segments available (§2.8.13), tagged
    /// with `token`. Does not notify: call [`PackedQueue::kick_prepare`] after a batch.
    ///
    /// Uses one indirect descriptor when negotiated and the chain has more than one segment
    /// (it then takes one ring position instead of `n`). Returns `Error::QueueFull` when not
    /// enough positions are free: backpressure, retry after completions.
    #[inline(always)]
    pub fn add(&mut self, readable: &[Segment], writable: &[Segment], token: usize) -> Result<()> {
        // Fast path, as the split ring's: a chain of one segment takes one descriptor.
        // Anything else, and every error, goes to `add_chain`.
        let (seg, flags, capacity) = match (readable, writable) {
            ([], [seg]) => (seg, DescFlags::WRITE.bits(), seg.len),
            ([seg], []) => (seg, 0, 0),
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
        let id = self.take_id(token, capacity, 1);
        let head = self.next_avail;
        let desc = self.desc_ptr(head.idx);
        // SAFETY: head.idx < size: an entry of the descriptor ring, not available to the
        // device until `publish` writes its flags.
        unsafe { write_packed(desc, seg.addr, seg.len, Some(id), None) };
        self.publish(head, desc, 1, flags | head.avail_bits());
        Ok(())
    }

    /// `add` for chains of more than one segment, and its errors (out of line: keeps the
    /// one-segment path small), for the token in `chain_token`. Writable segments first:
    /// the order in which a one-segment receive `add` already holds its arguments in
    /// registers.
    #[inline(never)]
    fn add_chain(&mut self, writable: &[Segment], readable: &[Segment]) -> Result<()> {
        let token = self.chain_token;
        if self.broken {
            return Err(Error::QueueBroken { queue: self.index });
        }
        let total = readable.len() + writable.len();
        if total == 0 {
            return Err(Error::BadChain);
        }
        let table = self.indirect.holds(total);
        // The common multi-segment case first: one indirect table, one ring position.
        if table && self.num_free != 0 {
            return self.add_indirect(readable, writable, token);
        }
        // Summed before any descriptor is written: a chain refused half-way must not leave
        // flags behind in the ring, where a later chain's position would look available
        // before its head is written.
        let Some(writable_len) = writable.iter().try_fold(0u32, |a, s| a.checked_add(s.len)) else {
            return Err(Error::BadChain);
        };
        // A chain for a table got here only because the ring is full; any other takes one
        // position per segment.
        if !table && total > usize::from(self.layout.size) {
            return Err(Error::BadChain);
        }
        if table || total > usize::from(self.num_free) {
            return Err(Error::QueueFull);
        }
        // `total` <= num_free <= size (above).
        let descs = total as u16;
        let size = self.layout.size;
        let head = self.next_avail;
        let id = self.free_id;
        let mut pos = head;
        let mut head_flags = 0;
        let segments = readable
            .iter()
            .map(|s| (s, 0))
            .chain(writable.iter().map(|s| (s, DescFlags::WRITE.bits())));
        for (i, (seg, write)) in segments.enumerate() {
            let mut flags = write | pos.avail_bits();
            if i + 1 < total {
                flags |= DescFlags::NEXT.bits();
            }
            let p = self.desc_ptr(pos.idx);
            if i == 0 {
                head_flags = flags;
                // SAFETY: pos.idx < size. The head's flags are written last (`publish`).
                unsafe { write_packed(p, seg.addr, seg.len, Some(id), None) };
            } else {
                // SAFETY: as above; the device does not look past the head until its flags
                // say it is available.
                unsafe { write_packed(p, seg.addr, seg.len, Some(id), Some(flags)) };
            }
            pos = pos.advance(1, size);
        }
        self.take_id(token, writable_len, descs);
        self.publish(head, self.desc_ptr(head.idx), descs, head_flags);
        Ok(())
    }

    /// A chain of 2..=max_indirect segments as one indirect table (§2.8.7), the one of the
    /// first free id: the caller checked that a position is free and the queue is not
    /// broken.
    #[inline(always)]
    fn add_indirect(
        &mut self,
        readable: &[Segment],
        writable: &[Segment],
        token: usize,
    ) -> Result<()> {
        // The id is taken only once the table is written: a refused chain keeps it free.
        // §2.8.7: NEXT is not used in a table (it is read in order), and the entries' buffer
        // id is not written: "Buffer ID is also reserved and is ignored by the device".
        let id = self.free_id;
        let table = self
            .indirect
            .write_table(id, readable, writable, |p, seg, flags, _| {
                // SAFETY: `write_table` hands over one entry of the table, not published.
                unsafe { write_packed(p, seg.addr, seg.len, None, Some(flags.bits())) }
            })?;
        let head = self.next_avail;
        let desc = self.desc_ptr(head.idx);
        // SAFETY: head.idx < size: an entry of the descriptor ring. Flags in `publish`.
        unsafe { write_packed(desc, table.daddr, table.len, Some(id), None) };
        self.take_id(token, table.writable, 1);
        self.stats.indirect += 1;
        self.publish(
            head,
            desc,
            1,
            DescFlags::INDIRECT.bits() | head.avail_bits(),
        );
        Ok(())
    }

    /// Takes the first free id for a chain of `descs` positions (the caller checked that a
    /// position is free, so an id is too: see `free_id`).
    #[inline(always)]
    fn take_id(&mut self, token: usize, writable: u32, descs: u16) -> u16 {
        let id = self.free_id;
        debug_assert!(id < self.layout.size, "an id is taken with none free");
        let state = self.id_mut(id);
        let next = state.next;
        *state = IdState {
            token,
            writable,
            descs,
            next,
        };
        self.free_id = next;
        id
    }

    /// Makes the chain written at `head` available: its head's flags, after the barrier
    /// (§2.8.21.3: "The driver ... performs a suitable memory barrier to ensure the device
    /// sees the updated descriptor table" before the flags that make it available).
    #[inline(always)]
    fn publish(&mut self, head: Pos, desc: NonNull<u8>, descs: u16, head_flags: u16) {
        debug_assert_eq!(desc, self.desc_ptr(head.idx));
        self.next_avail.step(descs, self.layout.size);
        self.num_free -= descs;
        self.in_flight += 1;
        self.added_since_kick = self.added_since_kick.wrapping_add(u64::from(descs));
        fence(Ordering::Release);
        // SAFETY: `desc` is the head's descriptor (`desc_ptr(head.idx)`, head.idx < size: 16
        // bytes inside the ring memory, 16-aligned), taken before the fence so that the
        // ring pointer is not loaded again; its flags are the 2-aligned u16 at 14. Volatile
        // because the device reads it concurrently.
        unsafe {
            desc.add(14)
                .cast::<u16>()
                .write_volatile(head_flags.to_le())
        };
        self.stats.added += 1;
    }

    /// Decides whether the device must be notified of chains added since the last call
    /// (§2.8.22, with the device's event suppression structure, §2.8.10). Counts the
    /// decision.
    pub fn kick_prepare(&mut self) -> bool {
        let added = core::mem::take(&mut self.added_since_kick);
        if added == 0 {
            return false;
        }
        // §2.8.22: the flags write that made the chain available must be visible before the
        // device's suppression structure is read (store→load: full fence).
        fence(Ordering::SeqCst);
        // The whole structure in one read (4-aligned): `off_wrap`, then `flags`.
        let event = self.ring.read_u32(self.layout.device);
        let (off_wrap, flags) = (event as u16, (event >> 16) as u16);
        let notify = match flags {
            EVENT_FLAG_DISABLE => false,
            EVENT_FLAG_DESC if self.event_idx => {
                let size = self.layout.size;
                if added >= u64::from(size) {
                    // The whole ring went by: whatever position it named was crossed.
                    true
                } else {
                    // Linux `virtqueue_kick_prepare_packed`: positions as u16, the event
                    // pulled back by one ring when it names the other lap.
                    let new = self.next_avail.idx;
                    let old = new.wrapping_sub(added as u16);
                    let mut event = off_wrap & !WRAP_BIT;
                    if (off_wrap & WRAP_BIT != 0) != self.next_avail.avail_wrap() {
                        event = event.wrapping_sub(size);
                    }
                    need_event(event, new, old)
                }
            }
            // ENABLE, and anything a device should not write (DESC without EVENT_IDX,
            // reserved values): notifying is always safe.
            _ => true,
        };
        if notify {
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        notify
    }

    /// What the flags at our used position say, from one read (§2.8.1, §2.8.15): with a
    /// chain in flight, that descriptor was written by us in this lap (AVAIL = wrap,
    /// USED = !wrap), and the device may only mark it used in this lap (both = wrap).
    /// AVAIL != wrap there is a device writing in the wrong lap (a wrap counter out of
    /// step), not "nothing yet". Never `Used` on a broken queue (`BROKEN_LAP`): callers
    /// that may run on one test `broken` first, or use `is_used`.
    #[inline(always)]
    fn used_flags(&self) -> UsedFlags {
        let pos = self.next_used;
        let flags = self.ring.read_u16(flags_offset(pos.idx));
        if flags & LAP_BITS == pos.lap {
            // AVAIL and USED both equal to the wrap counter.
            UsedFlags::Used
        } else if (flags ^ pos.lap) & DESC_F_AVAIL != 0 {
            // AVAIL not equal to it.
            UsedFlags::WrongLap
        } else {
            UsedFlags::NotYet
        }
    }

    /// Whether the device has used the descriptor at our used position (no lap check),
    /// broken queue or not.
    #[inline]
    fn is_used(&self) -> bool {
        let pos = self.next_used;
        let flags = self.ring.read_u16(flags_offset(pos.idx));
        flags & LAP_BITS == pos.lap & LAP_BITS
    }

    /// Whether the device has completed chains we have not popped yet.
    #[inline]
    pub fn has_used(&self) -> bool {
        !self.broken && self.is_used()
    }

    /// Pops the next used descriptor, in the order the device wrote them (§2.8.21.2),
    /// after validating it. Any invalid value breaks the queue until reset.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        // `next_is_used` spelled out: the refusals then return this function's own result,
        // built out of line, not a `Result<bool>` unpacked on the way back. A broken queue
        // never reads `Used` (`BROKEN_LAP`), so it is refused after the used test, not
        // before it.
        match self.used_flags() {
            UsedFlags::Used => self.take_used(),
            _ if self.broken => self.pop_refused(),
            UsedFlags::WrongLap if self.in_flight > 0 => {
                self.pop_failed(|_| Error::DeviceProtocol { what: WRONG_LAP })
            }
            _ => Ok(None),
        }
    }

    /// Whether the device has used the descriptor at our used position; if not, that is
    /// fine unless it wrote it in the wrong lap with a chain in flight (`used_flags`).
    #[inline(always)]
    fn next_is_used(&mut self) -> Result<bool> {
        match self.used_flags() {
            UsedFlags::Used => Ok(true),
            UsedFlags::WrongLap if self.in_flight > 0 => {
                Err(self.fail(Error::DeviceProtocol { what: WRONG_LAP }))
            }
            _ => Ok(false),
        }
    }

    /// Validates and takes the used descriptor at our used position, which
    /// `used_flags` found used: `Some` unless it returns an error.
    #[inline(always)]
    fn take_used(&mut self) -> Result<Option<Used>> {
        let pos = self.next_used;
        let size = self.layout.size;
        // Taken before the fence: read through `self` after it, the ring pointer would be
        // loaded again.
        let desc = self.desc_ptr(pos.idx);
        // §2.8.21.2: read the flags before the id and length they cover (acquire pairs with
        // the device's write barrier before its flags write).
        fence(Ordering::Acquire);
        // SAFETY: `desc` is descriptor `pos.idx` (< size) of the ring: 16 bytes inside the
        // ring memory, 16-aligned, so the length at 8 and the id at 12 are aligned;
        // volatile because the device writes them concurrently.
        let (len, id) = unsafe {
            (
                u32::from_le(desc.add(8).cast::<u32>().read_volatile()),
                u16::from_le(desc.add(12).cast::<u16>().read_volatile()),
            )
        };
        // A used descriptor with nothing in flight (one we never made available) is caught
        // by the two tests below, which every id fails then (no id is in flight, each
        // holding its chain's positions: `descs == 0` for all), and named as such on the
        // cold path: one test fewer on the hot one.
        if id >= size {
            return self.pop_failed(move |q| {
                q.not_in_flight().unwrap_or(Error::UsedIdOutOfRange {
                    queue: q.index,
                    id: u32::from(id),
                })
            });
        }
        debug_assert!(usize::from(id) < self.ids.len());
        // SAFETY: id < size <= ids.len() (checked just above; see `id_mut`): an index
        // already in range is not masked again.
        let state = unsafe { self.ids.get_unchecked_mut(usize::from(id)) };
        let IdState {
            token,
            writable,
            descs,
            ..
        } = *state;
        if descs == 0 {
            return self.pop_failed(move |q| {
                q.not_in_flight().unwrap_or(Error::UsedIdNotInFlight {
                    queue: q.index,
                    id: u32::from(id),
                })
            });
        }
        debug_assert!(self.in_flight > 0, "an id in flight with nothing in flight");
        // The length is used whatever the used descriptor's WRITE flag says, although
        // §2.8.4 reserves it where WRITE is clear: QEMU (`virtqueue_packed_fill_desc`)
        // never sets WRITE on a used descriptor and puts the bytes written there, and
        // Linux's `virtqueue_get_buf_ctx_packed` reads it the same way.
        let len = len & self.used_len_mask;
        if len > writable {
            return self.pop_failed(move |q| Error::UsedLenTooLarge {
                queue: q.index,
                len,
                max: writable,
            });
        }
        // The device skips as many positions as the chain took (§2.8.21.2).
        self.next_used.step(descs, size);
        let next = self.next_used;
        state.descs = 0;
        state.next = self.free_id;
        self.free_id = id;
        self.num_free += descs;
        self.in_flight -= 1;
        self.stats.completions += 1;
        if self.event_idx && self.interrupts_enabled {
            // EVENT_IDX with interrupts enabled. Linux `virtqueue_get_buf_ctx_packed`: keep
            // the interrupt point at our consumer position, visible before the next flags
            // read (store→load).
            self.ring.write_u16(self.layout.driver, next.off_wrap());
            fence(Ordering::SeqCst);
        }
        Ok(Some(Used { token, len }))
    }

    /// The error for a used descriptor written with no chain in flight, if that is the
    /// case (`take_used`'s cold paths).
    fn not_in_flight(&self) -> Option<Error> {
        (self.in_flight == 0).then_some(Error::DeviceProtocol {
            what: "used descriptor with no chain in flight",
        })
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
    fn pop_failed(&mut self, error: impl FnOnce(&Self) -> Error) -> Result<Option<Used>> {
        let e = error(self);
        Err(self.fail(e))
    }

    /// Pops every completion into `f`, in device order; returns how many
    /// (`Bus::drain_used`, whose contract this keeps): a peek at our used position, then
    /// with `interrupts` the pops with interrupts suppressed and the race-free re-enable
    /// (§2.8.10), again while completions raced in; it returns with interrupts enabled.
    /// Each position that ends a round, the peek's included, gets `pop_used`'s wrong-lap
    /// check, so a device writing in the wrong lap breaks the queue here too.
    ///
    /// Under EVENT_IDX suppressing writes nothing, as in `SplitQueue::drain_used`: after a
    /// plain re-enable the driver event structure names our used position, which the device
    /// has already passed (that is why there is something to pop), so it raises no
    /// interrupt until the re-enable at the end names the next one. After a delayed
    /// re-enable the position lies ahead and the device may interrupt once while we pop:
    /// suppression is only a hint, and that interrupt finds the queue drained. Without
    /// EVENT_IDX, or while the flags are still ENABLE (no re-enable since setup), the
    /// DISABLE flag is written, as `disable_interrupts` does.
    ///
    /// Bounded: every round pops at least one chain in flight or breaks the queue, and no
    /// chain is added meanwhile, so there are at most `size + 1` rounds.
    #[inline]
    pub fn drain_used(&mut self, interrupts: bool, mut f: impl FnMut(Used)) -> Result<usize> {
        if self.broken {
            return Err(Error::QueueBroken { queue: self.index });
        }
        // The peek: nothing used, nothing to do (after the same wrong-lap check as a pop).
        if !self.next_is_used()? {
            return Ok(0);
        }
        let mut n = 0;
        for _ in 0..=self.layout.size {
            if interrupts {
                self.suppress_interrupts();
            }
            // `pop_used` without its per-call broken check: the round ends at the first
            // position the device has not used, after the same wrong-lap check. Each round
            // starts at a position found used (the peek, or the re-enable's re-test).
            loop {
                if let Some(used) = self.take_used()? {
                    f(used);
                    n += 1;
                }
                if !self.next_is_used()? {
                    break;
                }
            }
            if !interrupts || !self.enable_interrupts() {
                return Ok(n);
            }
        }
        self.enable_interrupts();
        Ok(n)
    }

    /// `drain_used`'s suppression while it pops (see there): no ring write while the
    /// driver event structure names an interrupt point (EVENT_IDX, after a re-enable);
    /// otherwise (no EVENT_IDX, or ENABLE since setup) the DISABLE flag.
    #[inline]
    fn suppress_interrupts(&mut self) {
        if self.interrupts_enabled {
            if self.event_desc {
                self.interrupts_enabled = false;
            } else {
                self.disable_interrupts();
            }
        }
    }

    /// Asks the device not to interrupt for this queue (a hint: it may still do so).
    pub fn disable_interrupts(&mut self) {
        // Already DISABLE, unless `drain_used` suppressed without writing (flags still DESC).
        if !self.interrupts_enabled && !self.event_desc {
            return;
        }
        self.interrupts_enabled = false;
        self.event_desc = false;
        self.ring
            .write_u16(self.layout.driver + 2, EVENT_FLAG_DISABLE);
    }

    /// Re-enables interrupts race-free: returns true if completions arrived that the caller
    /// must process now.
    #[inline]
    pub fn enable_interrupts(&mut self) -> bool {
        self.enable_interrupts_at(self.next_used)
    }

    /// Like [`PackedQueue::enable_interrupts`], but with EVENT_IDX asks for the interrupt
    /// only after about 3/4 of the ring positions in flight were used (Linux
    /// `enable_cb_delayed_packed`).
    pub fn enable_interrupts_delayed(&mut self) -> bool {
        if !self.event_idx {
            // The interrupt point is EVENT_IDX's only: no delay to work out.
            return self.enable_interrupts();
        }
        // `num_free()`, not the field: 0 on a broken queue.
        let busy = self.layout.size - self.num_free();
        let delay = (u32::from(busy) * 3 / 4) as u16;
        // delay < size: `busy` <= size.
        self.enable_interrupts_at(self.next_used.advance(delay, self.layout.size))
    }

    /// Re-enables interrupts with EVENT_IDX's interrupt point at `at`, then re-tests our
    /// used position.
    #[inline]
    fn enable_interrupts_at(&mut self, at: Pos) -> bool {
        self.interrupts_enabled = true;
        if self.event_idx {
            self.ring.write_u16(self.layout.driver, at.off_wrap());
            // The position before the flags that make the device read it.
            fence(Ordering::Release);
            self.ring.write_u16(self.layout.driver + 2, EVENT_FLAG_DESC);
            self.event_desc = true;
        } else {
            self.ring
                .write_u16(self.layout.driver + 2, EVENT_FLAG_ENABLE);
        }
        // §2.8.10: the re-enable must be visible before the used flags are read again, or a
        // completion written in between would be missed with no interrupt (full fence).
        fence(Ordering::SeqCst);
        // Re-test at our used position, not at `at` (§2.8.22's re-test after re-enabling):
        // with a delay, `at` can fall inside a chain the device already returned, where it
        // wrote nothing (it skips the chain's other positions, §2.8.6), so the device passed
        // the event before reading it and no interrupt would ever come.
        self.is_used()
    }

    /// After a device or queue reset: hands every in-flight token to `f` and returns the
    /// queue to its initial state (its ring zeroed). Only once the device no longer uses the
    /// ring (reset acknowledged, or its DMA stopped); otherwise
    /// [`PackedQueue::reclaim_abandoned`]. Not an I/O path.
    pub fn reclaim_after_reset(&mut self, mut f: impl FnMut(usize)) {
        let size = self.layout.size;
        for state in self.ids.iter().take(usize::from(size)) {
            if state.descs != 0 {
                f(state.token);
            }
        }
        self.link_free_ids();
        self.num_free = size;
        self.free_when_broken = 0;
        self.in_flight = 0;
        self.next_avail = Pos::AVAIL_START;
        self.next_used = Pos::USED_START;
        self.added_since_kick = 0;
        self.interrupts_enabled = true;
        self.event_desc = false;
        self.broken = false;
        self.reset_memory();
    }

    /// After a reset the device did not acknowledge and whose DMA could not be stopped:
    /// hands every in-flight token to `f` (each once) without touching the ring, which the
    /// device may still read and write. The queue is broken afterwards (it refuses every
    /// chain and pops nothing) and its memory must be leaked, never reused (see
    /// `Bus::reset`). Not an I/O path.
    pub fn reclaim_abandoned(&mut self, mut f: impl FnMut(usize)) {
        let size = usize::from(self.layout.size);
        for state in self.ids.iter_mut().take(size) {
            if state.descs != 0 {
                f(state.token);
                state.descs = 0;
            }
        }
        self.in_flight = 0;
        self.free_when_broken = 0;
        self.num_free = 0;
        self.next_used.lap |= BROKEN_LAP;
        self.broken = true;
    }

    /// Zeroes the ring: no descriptor available or used in either lap (flags 0 are neither,
    /// with both wrap counters starting at 1), both event structures ENABLE.
    fn reset_memory(&mut self) {
        // The device does not use the ring here (before setup, or after a reset it
        // acknowledged or with its DMA stopped: `reclaim_after_reset`'s contract).
        self.ring.zero();
    }

    /// Every id free, linked in order (0 first, as `add` takes them).
    fn link_free_ids(&mut self) {
        for (i, state) in self.ids.iter_mut().enumerate() {
            *state = IdState {
                next: (i as u16).wrapping_add(1),
                ..IdState::default()
            };
        }
        self.free_id = 0;
    }

    // Indexing without a bounds check: `ids` has `id_mask + 1` entries (built in `new`,
    // never resized), so a masked index is always inside it. Every id passed here is one
    // `take_id` takes (< size: the list's end, `size`, is never taken while a position is
    // free); the mask makes the access sound whatever it is. The only other such site is
    // `take_used`, which indexes by a device's id it has just checked against the size
    // (<= ids.len()) without masking it again.
    #[inline(always)]
    fn id_mut(&mut self, id: u16) -> &mut IdState {
        let i = usize::from(id & self.id_mask);
        debug_assert!(i < self.ids.len());
        // SAFETY: i <= id_mask = ids.len() - 1 (above).
        unsafe { self.ids.get_unchecked_mut(i) }
    }

    /// Breaks the queue (the device lied). Out of line: the pop paths keep no room for it.
    #[cold]
    #[inline(never)]
    fn fail(&mut self, e: Error) -> Error {
        log::error!("virtqueue {}: {e}; queue disabled until reset", self.index);
        if !self.broken {
            // No chain is added or popped while broken: the count stays as it was.
            self.free_when_broken = self.num_free;
            self.num_free = 0;
            // And `pop_used`'s used test fails (cleared by the reset's `Pos::USED_START`).
            self.next_used.lap |= BROKEN_LAP;
        }
        self.broken = true;
        e
    }

    #[inline]
    fn desc_ptr(&self, idx: u16) -> NonNull<u8> {
        self.ring.ptr(16 * idx as usize)
    }
}

/// Offset of descriptor `idx`'s flags in the ring.
#[inline(always)]
fn flags_offset(idx: u16) -> usize {
    16 * usize::from(idx) + 14
}

/// Writes one packed descriptor with volatile stores: `addr`, `len`, the buffer `id` when
/// given (an indirect table's entries leave it alone: "Buffer ID is also reserved and is
/// ignored by the device", §2.8.7) and `flags` when given (a ring head's flags wait for
/// `publish`).
///
/// # Safety
/// `p` must point to 16 writable, 16-aligned bytes of DMA memory owned by the queue.
#[inline(always)]
unsafe fn write_packed(p: NonNull<u8>, addr: u64, len: u32, id: Option<u16>, flags: Option<u16>) {
    let base = p.as_ptr();
    // SAFETY: the caller guarantees 16 valid aligned bytes; fields at 0/8/12/14 are aligned.
    unsafe {
        base.cast::<u64>().write_volatile(addr.to_le());
        base.add(8).cast::<u32>().write_volatile(len.to_le());
        if let Some(id) = id {
            base.add(12).cast::<u16>().write_volatile(id.to_le());
        }
        if let Some(f) = flags {
            base.add(14).cast::<u16>().write_volatile(f.to_le());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The checks the hot paths fold into other tests (a broken queue in `num_free` and in
    //! the used position's lap, "nothing in flight" on the id tests' cold paths), seen from
    //! the public API. The wider conformance suite is `tests/tests/conformance_packed.rs`.
    use super::*;
    use alloc::vec::Vec;

    const SIZE: u16 = 8;

    /// A queue of `SIZE` entries over leaked, zeroed, 16-aligned heap memory.
    /// A queue over zeroed heap memory it owns. Fields drop in order: the queue, then its
    /// memory (Miri checks that nothing leaks).
    struct TestQueue {
        q: PackedQueue,
        _memory: alloc::vec::Vec<u128>,
    }

    impl core::ops::Deref for TestQueue {
        type Target = PackedQueue;
        fn deref(&self) -> &PackedQueue {
            &self.q
        }
    }

    impl core::ops::DerefMut for TestQueue {
        fn deref_mut(&mut self) -> &mut PackedQueue {
            &mut self.q
        }
    }

    fn queue(event_idx: bool) -> TestQueue {
        let layout = PackedRingLayout::new(SIZE).unwrap();
        let mut memory = alloc::vec![0u128; layout.total.div_ceil(16)];
        let vaddr = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
        let ring = DmaRegion {
            vaddr,
            daddr: vaddr.as_ptr() as u64,
            len: layout.total,
        };
        let config = QueueConfig {
            size: SIZE,
            max_indirect: 0,
            event_idx,
            ignore_used_len: false,
        };
        TestQueue {
            q: PackedQueue::new(0, layout, ring, None, config).unwrap(),
            _memory: memory,
        }
    }

    /// What a device writes to return chain `id` at position `idx` in lap `wrap`.
    fn device_uses(q: &mut PackedQueue, idx: u16, wrap: bool, id: u16, len: u32) {
        let off = 16 * usize::from(idx);
        // SAFETY: descriptor `idx` < SIZE: its length at 8 and id at 12 are inside the ring
        // memory, aligned (as in `write_packed`); no device runs in these tests.
        unsafe {
            let p = q.ring.ptr(off).as_ptr();
            p.add(8).cast::<u32>().write_volatile(len);
            p.add(12).cast::<u16>().write_volatile(id);
        }
        q.ring
            .write_u16(off + 14, if wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 });
    }

    #[test]
    fn a_broken_queue_refuses_add_and_pop_but_reports_its_state() {
        for event_idx in [false, true] {
            let mut q = queue(event_idx);
            let seg = [Segment::new(0x1000, 64)];
            for t in 0..3 {
                q.add(&[], &seg, t).unwrap();
            }
            // Chain 0 returned with too long a length: the queue breaks.
            device_uses(&mut q, 0, true, 0, 65);
            assert!(matches!(
                q.pop_used(),
                Err(Error::UsedLenTooLarge { len: 65, .. })
            ));
            assert!(q.is_broken());
            // The counts as they were at the break, not the hot path's folded ones.
            assert_eq!((q.num_free(), q.in_flight()), (SIZE - 3, 3));
            assert!(matches!(
                q.add(&[], &seg, 9),
                Err(Error::QueueBroken { .. })
            ));
            // A used descriptor at the used position does not get past a broken queue...
            assert!(matches!(q.pop_used(), Err(Error::QueueBroken { .. })));
            assert!(matches!(
                q.drain_used(true, |_| ()),
                Err(Error::QueueBroken { .. })
            ));
            assert!(!q.has_used());
            // ...and a re-enable still sees it there.
            assert!(q.enable_interrupts());
            let mut tokens = Vec::new();
            q.reclaim_after_reset(|t| tokens.push(t));
            tokens.sort();
            assert_eq!(tokens, [0, 1, 2]);
            assert!(!q.is_broken());
            assert_eq!((q.num_free(), q.in_flight()), (SIZE, 0));
            for t in 0..2 * usize::from(SIZE) {
                q.add(&[], &seg, t).unwrap();
                let pos = q.next_used;
                device_uses(&mut q, pos.idx, pos.lap != 0, 0, 64);
                let used = q.pop_used().unwrap().unwrap();
                assert_eq!((used.token, used.len), (t, 64));
            }
        }
    }

    #[test]
    fn a_used_descriptor_with_nothing_in_flight_is_named_so_for_any_id() {
        for id in [0, 1, SIZE - 1, SIZE, 0xFFFF] {
            let mut q = queue(false);
            device_uses(&mut q, 0, true, id, 0);
            assert!(
                matches!(
                    q.pop_used(),
                    Err(Error::DeviceProtocol {
                        what: "used descriptor with no chain in flight"
                    })
                ),
                "id {id}"
            );
            assert!(q.is_broken());
        }
        // With a chain in flight, the id errors themselves.
        let mut q = queue(false);
        q.add(&[], &[Segment::new(0x1000, 64)], 7).unwrap();
        device_uses(&mut q, 0, true, SIZE, 0);
        assert!(matches!(
            q.pop_used(),
            Err(Error::UsedIdOutOfRange { id: 8, .. })
        ));
        let mut q = queue(false);
        q.add(&[], &[Segment::new(0x1000, 64)], 7).unwrap();
        device_uses(&mut q, 0, true, 1, 0);
        assert!(matches!(
            q.pop_used(),
            Err(Error::UsedIdNotInFlight { id: 1, .. })
        ));
    }
}
