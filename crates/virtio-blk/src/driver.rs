//! The block driver proper: setup, submission with splitting, completion, interrupts.

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use virtio_core::bus::{Bus, QueueMask, QueueSpec};
use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::queue::{QueueStats, Segment, Used};
use virtio_core::{DeviceType, Error, Features};
use zerocopy::IntoBytes;

use crate::config::{self, BlkInfo, ConfigSource, RangeLimits};
use crate::features::DRIVER_FEATURES;
use crate::split::{
    self, CannotSplit, DataCursor, DataLimits, RangeCursor, RangeSplit, SectorRange,
};
use crate::wire::{self, ID_BYTES, RangeSegment, ReqHeader, SECTOR_SIZE, cfg, req_type, status};

/// Per-slot DMA layout: header, inline answer (GET_ID / GET_LIFETIME), status byte, ranges.
const SLOT_HEADER: usize = 0;
const SLOT_INLINE: usize = 16;
const SLOT_INLINE_LEN: usize = 24;
const SLOT_STATUS: usize = 40;
const SLOT_RANGES: usize = 48;
/// What the status byte holds until the device writes it: a device that claims
/// completion without writing it is caught as a protocol error.
const STATUS_SENTINEL: u8 = 0xFF;
/// Queues this driver will drive at most (the bus's `QueueMask` holds 128).
const MAX_QUEUES: u16 = 128;

/// Errors of block requests and of the driver.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device answered VIRTIO_BLK_S_IOERR.
    Io,
    /// The device answered VIRTIO_BLK_S_UNSUPP, or the operation needs a feature the
    /// device did not offer (flush on a write-through device, discard, ...).
    Unsupported,
    /// A write-type request on a read-only device (refused before reaching it).
    ReadOnly,
    /// Malformed request: empty, a zero-length segment, not whole logical blocks, or
    /// impossible to split into device requests of whole blocks.
    InvalidRequest,
    /// Beyond the device capacity.
    OutOfRange,
    /// The request needs more device requests than the queue can ever hold at once:
    /// the caller must split it.
    TooLarge,
    /// Not enough free descriptors or request slots right now: retry after completions.
    /// Also the answer while the driver is suspended ([`BlkDriver::suspend`]): hold the
    /// request and submit it after [`BlkDriver::resume`].
    QueueFull,
    /// No such request queue.
    NoSuchQueue { queue: u16 },
    /// The request was in flight when the device was reset (`abort_all`, or `suspend`
    /// once its bounded wait ran out). The device may or may not have carried it out:
    /// resubmit it (after `restart` / `resume`) or fail it.
    Aborted,
    /// Bus, transport or device-protocol error (a device value that breaks the rules is
    /// `Error::DeviceProtocol`).
    Virtio(Error),
}

impl From<Error> for BlkError {
    fn from(e: Error) -> Self {
        BlkError::Virtio(e)
    }
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::Io => write!(f, "I/O error reported by the device"),
            BlkError::Unsupported => write!(f, "operation not supported by the device"),
            BlkError::ReadOnly => write!(f, "device is read-only"),
            BlkError::InvalidRequest => write!(f, "invalid request"),
            BlkError::OutOfRange => write!(f, "request beyond device capacity"),
            BlkError::TooLarge => write!(f, "request too large for the queue"),
            BlkError::QueueFull => write!(f, "queue full"),
            BlkError::NoSuchQueue { queue } => write!(f, "no request queue {queue}"),
            BlkError::Aborted => write!(f, "aborted by device reset"),
            BlkError::Virtio(e) => write!(f, "{e}"),
        }
    }
}

/// Driver choices made at setup.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// Request queues to use with MQ (0: as many as the device has, up to 128).
    pub max_queues: u16,
    /// Wanted queue size (0: the device maximum).
    pub queue_size: u16,
    /// Data descriptors per device request the driver will build (also bounds the
    /// indirect tables; the device's `seg_max` lowers it further).
    pub max_segments: u16,
    /// Range segments per discard / write-zeroes / secure-erase device request (the
    /// device's `max_*_seg` lowers it further); sizes the per-slot DMA area.
    pub max_ranges: u16,
    /// Whether completions interrupt (false: the caller polls).
    pub interrupts: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            max_queues: 0,
            queue_size: 0,
            max_segments: 64,
            max_ranges: 16,
            interrupts: true,
        }
    }
}

/// A request. Data buffers are device addresses (already DMA-mapped by the caller) and
/// must stay valid until the request's token completes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Read {
        sector: u64,
        buffers: &'a [Segment],
    },
    Write {
        sector: u64,
        buffers: &'a [Segment],
    },
    Flush,
    GetId,
    GetLifetime,
    Discard {
        ranges: &'a [SectorRange],
    },
    /// `unmap`: the device may deallocate the zeroed ranges.
    WriteZeroes {
        ranges: &'a [SectorRange],
        unmap: bool,
    },
    SecureErase {
        ranges: &'a [SectorRange],
    },
}

/// The 20-byte device ID string (GET_ID).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DeviceId(pub [u8; ID_BYTES]);

impl DeviceId {
    /// The ID up to its first NUL (it is NUL-terminated only when shorter than 20 bytes).
    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        self.0.get(..end).unwrap_or(&[])
    }
}

/// Device lifetime estimates (GET_LIFETIME; eMMC/UFS semantics).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// 0 undefined, 1 normal, 2 warning (80% of reserved blocks), 3 urgent (90%).
    pub pre_eol_info: u16,
    /// SLC wear in 10% steps (1..=10), 11 = exceeded.
    pub device_lifetime_est_typ_a: u16,
    /// MLC wear, same scale.
    pub device_lifetime_est_typ_b: u16,
}

/// A successful completion.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    Done,
    Id(DeviceId),
    Lifetime(Lifetime),
}

/// What [`BlkDriver::suspend`] did with the requests in flight.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SuspendReport {
    /// Caller requests the device completed before the reset (passed to the callback with
    /// their results, as `poll_completions` would).
    pub completed: usize,
    /// Caller requests still in flight at the reset: passed to the callback with
    /// [`BlkError::Aborted`]. Resubmit them after `resume`.
    pub aborted: usize,
    /// Polls spent waiting for completions (at most the caller's bound).
    pub drain_polls: u32,
    /// A device fault seen while waiting; the reset happened all the same.
    pub drain_error: Option<BlkError>,
}

/// `3 requests completed, 1 aborted, after 12 polls`, then the device fault if one ended the
/// wait.
impl core::fmt::Display for SuspendReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} requests completed, {} aborted, after {} polls",
            self.completed, self.aborted, self.drain_polls
        )?;
        if let Some(e) = &self.drain_error {
            write!(f, "; waiting stopped by a device fault: {e}")?;
        }
        Ok(())
    }
}

/// What [`BlkDriver::resume`] found.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// Negotiated again: the previous set (plus, possibly, ring bits the bus implements).
    pub features: Features,
    /// Capacity in sectors now, and whether it differs from the one the caller last heard of
    /// (before the suspend, or reported since).
    pub capacity: u64,
    pub capacity_changed: bool,
    /// Request queues rebuilt.
    pub queues: u16,
}

/// `features 0x..., capacity 2048 sectors (unchanged), 2 queues`.
impl core::fmt::Display for ResumeReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "features {:#x}, capacity {} sectors ({}), {} queues",
            self.features.bits(),
            self.capacity,
            if self.capacity_changed {
                "changed"
            } else {
                "unchanged"
            },
            self.queues
        )
    }
}

/// What an interrupt meant for the block device.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkInterrupt {
    /// Queues to poll.
    pub queues: QueueMask,
    /// The capacity changed to this many sectors.
    pub capacity_changed: Option<u64>,
    /// DEVICE_NEEDS_RESET: abort everything (`abort_all`) and `restart`.
    pub needs_reset: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    GetLifetime,
    Discard,
    WriteZeroes,
    SecureErase,
}

impl Kind {
    fn req_type(self) -> u32 {
        match self {
            Kind::Read => req_type::IN,
            Kind::Write => req_type::OUT,
            Kind::Flush => req_type::FLUSH,
            Kind::GetId => req_type::GET_ID,
            Kind::GetLifetime => req_type::GET_LIFETIME,
            Kind::Discard => req_type::DISCARD,
            Kind::WriteZeroes => req_type::WRITE_ZEROES,
            Kind::SecureErase => req_type::SECURE_ERASE,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Its device request is on the ring.
    InFlight,
    /// A head slot whose own part completed while sibling parts are still in flight.
    Finished,
}

/// Per device request state; a caller request's state lives in the slot of its first
/// part (the head), which is released only when every part has completed.
#[derive(Copy, Clone, Debug)]
struct Slot {
    state: SlotState,
    kind: Kind,
    head: u16,
    /// Data bytes the device must write (reads).
    data_len: u32,
    // Head only:
    token: usize,
    pending: u16,
    error: Option<BlkError>,
}

const IDLE: Slot = Slot {
    state: SlotState::Free,
    kind: Kind::Flush,
    head: 0,
    data_len: 0,
    token: 0,
    pending: 0,
    error: None,
};

struct QueueState {
    index: u16,
    slots: Vec<Slot>,
    /// Stack of free slot indices (capacity = slots: pushes never allocate).
    free: Vec<u16>,
    region: Option<DmaRegion>,
    /// Bytes per slot in `region`.
    stride: u32,
    /// Data descriptors per device request on this queue.
    max_data_descs: usize,
}

impl QueueState {
    #[inline]
    fn slot(&self, i: u16) -> Option<&Slot> {
        self.slots.get(usize::from(i))
    }

    #[inline]
    fn slot_mut(&mut self, i: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(i))
    }

    /// Slot `i` back on the free stack. Only the state and the error are reset: every other
    /// field is written when the slot is next used (`queue_part`).
    #[inline]
    fn release(&mut self, i: u16) {
        if let Some(s) = self.slot_mut(i) {
            s.state = SlotState::Free;
            s.error = None;
            self.free.push(i);
        }
    }

    #[inline]
    fn slot_ptr(&self, i: u16, offset: usize, len: usize) -> Option<NonNull<u8>> {
        // Checked, yet free on 64-bit targets: a 16-bit index times a 32-bit stride cannot
        // overflow there, and the compiler drops the test. `ptr_at` checks the end.
        let at = usize::from(i)
            .checked_mul(self.stride as usize)?
            .checked_add(offset)?;
        self.region.as_ref()?.ptr_at(at, len)
    }

    #[inline]
    fn slot_daddr(&self, i: u16, offset: usize) -> u64 {
        let base = self.region.as_ref().map_or(0, |r| r.daddr);
        base + (usize::from(i) * self.stride as usize + offset) as u64
    }

    /// Writes into slot `i` while it is free or being prepared (the device does not access
    /// it: its chain is published only after this, with the queue's release fence).
    #[inline]
    fn write(&self, i: u16, offset: usize, bytes: &[u8]) {
        let at = usize::from(i)
            .checked_mul(self.stride as usize)
            .and_then(|b| b.checked_add(offset));
        if let (Some(r), Some(at)) = (self.region.as_ref(), at) {
            r.write_at(at, bytes);
        }
    }

    /// The request header and the status sentinel of slot `i`, before its chain is
    /// published (as [`QueueState::write`]): one bounds check for both.
    #[inline]
    fn write_request(&self, i: u16, header: &ReqHeader) {
        if let Some(p) = self.slot_ptr(i, 0, SLOT_STATUS + 1) {
            // SAFETY: `slot_ptr` checked that the slot's first SLOT_STATUS + 1 bytes lie in
            // the region; the header (16 bytes, alignment 1) and the status byte are inside
            // them; the device does not access a slot whose chain is not published.
            unsafe {
                p.as_ptr()
                    .add(SLOT_HEADER)
                    .cast::<ReqHeader>()
                    .write_unaligned(*header);
                p.as_ptr().add(SLOT_STATUS).write(STATUS_SENTINEL);
            }
        }
    }

    #[inline]
    fn read(&self, i: u16, offset: usize, buf: &mut [u8]) {
        if let Some(p) = self.slot_ptr(i, offset, buf.len()) {
            for (k, b) in buf.iter_mut().enumerate() {
                // SAFETY: in bounds (checked by `ptr_at`); volatile because the device wrote
                // this memory, and the used-ring acquire fence ordered it before us.
                *b = unsafe { p.as_ptr().add(k).read_volatile() };
            }
        }
    }
}

/// Where the next part of a request starts.
#[derive(Copy, Clone, Debug)]
enum Cursor {
    Data(DataCursor),
    Ranges(RangeCursor),
    Single(bool),
}

/// What [`BlkDriver::submit`]'s checks found a valid request to be.
#[derive(Copy, Clone, Debug)]
enum Staged {
    /// One device request as given, its data descriptors staged in `scratch[1..]`.
    One(Part),
    /// Several device requests (or one the splitter builds, as for the range commands).
    /// `groups_of`: for a read or write whose segments can go to the device in groups as
    /// they are, how many per device request ([`BlkDriver::stage_parts`]).
    Parts { groups_of: Option<usize> },
}

/// Shape of one device request, with its data in `scratch[1..]` or ranges in `ranges`.
#[derive(Copy, Clone, Debug)]
struct Part {
    sector: u64,
    /// Data descriptors (read/write), written to `scratch[1..=descs]`.
    descs: usize,
    bytes: u32,
    /// Range segments, written to `ranges[..nranges]`.
    nranges: usize,
}

impl Part {
    /// A request without data or ranges (a flush).
    const COMMAND: Part = Part {
        sector: 0,
        descs: 0,
        bytes: 0,
        nranges: 0,
    };

    fn chain_len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Read | Kind::Write => 2 + self.descs,
            Kind::Flush => 2,
            _ => 3,
        }
    }
}

struct BusConfig<'a, B>(&'a B);

impl<B: Bus> ConfigSource for BusConfig<'_, B> {
    fn read(&self, offset: u32, buf: &mut [u8]) -> virtio_core::Result<()> {
        self.0.read_config(offset, buf)
    }
}

/// The virtio block driver over a bus `B`. See the crate documentation for the design.
pub struct BlkDriver<B: Bus> {
    bus: B,
    options: BlkOptions,
    features: Features,
    info: BlkInfo,
    queues: Vec<QueueState>,
    /// `[header, data..., status]` of the chain being built.
    scratch: Vec<Segment>,
    /// Range segments of the device request being built.
    ranges: Vec<RangeSegment>,
    /// Stopped by `abort_all`, `suspend`, or a failed `restart` / `resume`.
    stopped: bool,
    /// Between `suspend` and a successful `resume`: submissions get `QueueFull` (hold).
    suspended: bool,
    /// The capacity (sectors) the caller last heard of: at probe, from a configuration
    /// change, a restart or a resume that reported it. Changes are reported against it,
    /// not against `info`, which a resume or restart that failed after reading the
    /// configuration has already updated.
    capacity_reported: u64,
    /// The last reset failed (the device ignored it and its DMA could not be stopped) while
    /// it had the slot memory: `free_regions` leaks the regions instead of freeing them.
    device_holds_dma: bool,
}

impl<B: Bus> BlkDriver<B> {
    /// Initialises the device (features, config, queues, DRIVER_OK) and allocates every
    /// piece of per-request state. The only place (with `restart`) that allocates.
    pub fn new(bus: B, options: BlkOptions) -> Result<Self, BlkError> {
        if bus.device_type() != DeviceType::Block {
            return Err(BlkError::Virtio(Error::Unsupported));
        }
        let mut d = BlkDriver {
            bus,
            options,
            features: Features::empty(),
            info: BlkInfo {
                capacity: 0,
                block_size: SECTOR_SIZE,
                read_only: false,
                flush: false,
                writeback: false,
                config_wce: false,
                geometry: None,
                topology: None,
                size_max: None,
                seg_max: None,
                num_queues: 1,
                discard: None,
                write_zeroes: None,
                write_zeroes_may_unmap: false,
                secure_erase: None,
                lifetime: false,
            },
            queues: Vec::new(),
            scratch: Vec::new(),
            ranges: Vec::new(),
            stopped: true,
            suspended: false,
            capacity_reported: 0,
            device_holds_dma: false,
        };
        d.bring_up(None)?;
        d.capacity_reported = d.info.capacity;
        Ok(d)
    }

    /// Re-initialises the device after `abort_all` (e.g. on DEVICE_NEEDS_RESET or a queue
    /// broken by a device fault). Config is re-read; queue sizes may change. Returns the
    /// capacity (sectors) when it differs from the one the caller last heard of. A
    /// suspended driver comes back through [`BlkDriver::resume`] instead.
    pub fn restart(&mut self) -> Result<Option<u64>, BlkError> {
        if !self.stopped || self.suspended {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        self.bring_up(None)?;
        Ok(self.capacity_news())
    }

    /// The capacity now when it differs from the one the caller last heard of, which it
    /// becomes (each change is reported once, by whichever call found it).
    fn capacity_news(&mut self) -> Option<u64> {
        let now = self.info.capacity;
        (core::mem::replace(&mut self.capacity_reported, now) != now).then_some(now)
    }

    /// Initialisation (§3.1.1), for `new` and `restart` (`previous`: `None`, negotiate
    /// from [`DRIVER_FEATURES`]) and `resume` (exactly the features of before, see
    /// [`Bus::renegotiate_features`]).
    fn bring_up(&mut self, previous: Option<Features>) -> Result<(), BlkError> {
        self.free_regions();
        match self.try_bring_up(previous) {
            Ok(()) => {
                self.stopped = false;
                Ok(())
            }
            Err(e) => {
                log::error!("virtio-blk: initialisation failed: {e}");
                // Stop the device before giving back memory it might know about, then tell
                // it we gave up (§3.1.1: FAILED). A device that would not stop keeps it.
                let reset = self.bus.reset(&mut |_, _| {});
                self.note_reset(reset);
                self.bus.fail();
                self.free_regions();
                self.stopped = true;
                Err(e)
            }
        }
    }

    fn try_bring_up(&mut self, previous: Option<Features>) -> Result<(), BlkError> {
        let features = match previous {
            Some(p) => self.bus.renegotiate_features(p)?,
            None => self.bus.negotiate_features(DRIVER_FEATURES)?,
        };
        self.features = features;
        let info = config::read_info(&BusConfig(&self.bus), features)?;
        self.info = info;
        log::info!(
            "virtio-blk: {} sectors, block {} bytes{}{}, features {:#x}",
            info.capacity,
            info.block_size,
            if info.read_only { ", read-only" } else { "" },
            if info.writeback {
                ", writeback cache"
            } else {
                ""
            },
            features.bits()
        );

        let mut nq = info.num_queues.min(MAX_QUEUES);
        if self.options.max_queues != 0 {
            nq = nq.min(self.options.max_queues);
        }
        let bus_queues = self.bus.num_queues();
        if bus_queues != 0 {
            nq = nq.min(bus_queues);
        }
        let nq = nq.max(1);

        // Data descriptors per request: our own cap, the device's seg_max.
        let mut cap = usize::from(self.options.max_segments.max(1));
        if let Some(s) = info.seg_max {
            cap = cap.min(usize::try_from(s).unwrap_or(usize::MAX));
        }
        let indirect = features.contains(Features::INDIRECT_DESC);
        let want_indirect = u16::try_from(cap + 2).unwrap_or(u16::MAX);
        let specs: Vec<QueueSpec> = (0..nq)
            .map(|i| {
                QueueSpec::new(i)
                    .size(self.options.queue_size)
                    .interrupts(self.options.interrupts)
                    .indirect(if indirect { want_indirect } else { 0 })
            })
            .collect();
        self.bus.setup_queues(&specs)?;

        // Range segments per request: the most any negotiated range operation may use.
        let max_ranges = usize::from(self.options.max_ranges.max(1));
        let range_cap = [info.discard, info.write_zeroes, info.secure_erase]
            .iter()
            .flatten()
            .map(|l| {
                usize::try_from(l.max_segments)
                    .unwrap_or(usize::MAX)
                    .min(max_ranges)
            })
            .max()
            .unwrap_or(0);
        // At most about 1 MiB (`max_ranges` is 16-bit): fits the slot's 32-bit stride.
        let stride = (SLOT_RANGES + 16 * range_cap).next_multiple_of(64);
        let stride32 = u32::try_from(stride).map_err(|_| BlkError::TooLarge)?;

        let mut max_descs_all = 0usize;
        for i in 0..nq {
            let size = self.bus.queue_size(i)?;
            let max_chain = usize::from(self.bus.max_chain(i)?);
            if max_chain < 3 {
                return Err(BlkError::Virtio(Error::BadQueueSize { queue: i, size }));
            }
            let max_data_descs = cap.min(max_chain - 2);
            // Checked: the slots' device addresses (`slot_daddr`) are then in range on any
            // target.
            let bytes = usize::from(size)
                .checked_mul(stride)
                .ok_or(BlkError::TooLarge)?;
            let region = self.bus.dma().alloc_coherent(bytes, 64)?;
            let mut free: Vec<u16> = Vec::with_capacity(usize::from(size));
            free.extend((0..size).rev());
            self.queues.push(QueueState {
                index: i,
                slots: vec![IDLE; usize::from(size)],
                free,
                region: Some(region),
                stride: stride32,
                max_data_descs,
            });
            max_descs_all = max_descs_all.max(max_data_descs);
            log::debug!(
                "virtio-blk: queue {i}: {size} entries, {max_data_descs} data segments per \
                 request"
            );
        }
        self.scratch = vec![Segment::new(0, 0); max_descs_all + 2];
        self.ranges = vec![RangeSegment::default(); range_cap];
        self.bus.driver_ok()?;
        Ok(())
    }

    fn free_regions(&mut self) {
        let regions: Vec<DmaRegion> = self
            .queues
            .drain(..)
            .filter_map(|mut q| q.region.take())
            .collect();
        // SAFETY: called only after a reset, or before the device was given the queues
        // (before bring-up, after a failed one, on abort, on drop); the regions came from
        // this bus's DMA allocator and were taken out of the queues. When a reset failed
        // (`device_holds_dma`), the device may still use them and `release_dma` leaks them.
        unsafe { self.bus.release_dma(regions, !self.device_holds_dma) };
        self.device_holds_dma = false;
    }

    /// Records the outcome of a [`Bus::reset`]: after an Err the device may still use the
    /// slot memory, which [`BlkDriver::free_regions`] then leaks instead of freeing; after
    /// an Ok it cannot, whatever an earlier reset did.
    fn note_reset(&mut self, reset: virtio_core::Result<()>) {
        self.device_holds_dma = reset.is_err();
    }

    /// Device facts (capacity, block size, limits, cache mode).
    pub fn info(&self) -> &BlkInfo {
        &self.info
    }
    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }
    /// The bus (diagnostics: queue stats, interrupt mode). Do not use its queues directly.
    pub fn bus(&self) -> &B {
        &self.bus
    }
    /// The bus, e.g. for the platform to route interrupts (its interrupt plumbing lives
    /// there); do not use the driver's queues through it.
    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }
    /// Request queues in use.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }
    pub fn queue_stats(&self, queue: u16) -> Result<QueueStats, BlkError> {
        self.queue(queue)?;
        Ok(self.bus.queue_stats(queue)?)
    }
    /// Data segments one device request carries on `queue` (larger requests are split).
    pub fn max_segments(&self, queue: u16) -> Result<usize, BlkError> {
        Ok(self.queue(queue)?.max_data_descs)
    }
    /// Device requests of the largest data shape that fit now (queue depth from free
    /// descriptors and slots).
    pub fn queue_depth(&self, queue: u16) -> Result<u16, BlkError> {
        let q = self.queue(queue)?;
        let free = usize::from(self.bus.free_descriptors(queue)?);
        let per = self
            .bus
            .descriptors_for(queue, q.max_data_descs + 2)?
            .max(1);
        Ok((free / per).min(q.free.len()) as u16)
    }
    /// Device requests of `descriptors` descriptors each (`[header, ..., status]`) that fit
    /// on `queue` now: free request slots, and free ring descriptors (without
    /// VIRTIO_F_INDIRECT_DESC each descriptor of a chain takes one of the ring, §2.7.5).
    /// For sizing a share of [`BlkDriver::submit_ranges_from`] to what fits rather than
    /// waiting for a fixed share's room, which other I/O may never leave.
    pub fn room_for(&self, queue: u16, descriptors: usize) -> Result<usize, BlkError> {
        let q = self.queue(queue)?;
        let free = usize::from(self.bus.free_descriptors(queue)?);
        let per = self.bus.descriptors_for(queue, descriptors)?.max(1);
        Ok((free / per).min(q.free.len()))
    }
    /// Requests (caller tokens) not yet completed on `queue`.
    pub fn in_flight(&self, queue: u16) -> Result<usize, BlkError> {
        let q = self.queue(queue)?;
        Ok(q.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.state != SlotState::Free && usize::from(s.head) == *i)
            .count())
    }

    fn queue(&self, queue: u16) -> Result<&QueueState, BlkError> {
        self.queues
            .get(usize::from(queue))
            .ok_or(BlkError::NoSuchQueue { queue })
    }

    /// Convenience wrappers around [`BlkDriver::submit`].
    pub fn read(
        &mut self,
        queue: u16,
        sector: u64,
        buffers: &[Segment],
        token: usize,
    ) -> Result<(), BlkError> {
        self.submit(queue, Request::Read { sector, buffers }, token)
    }
    pub fn write(
        &mut self,
        queue: u16,
        sector: u64,
        buffers: &[Segment],
        token: usize,
    ) -> Result<(), BlkError> {
        self.submit(queue, Request::Write { sector, buffers }, token)
    }
    pub fn flush(&mut self, queue: u16, token: usize) -> Result<(), BlkError> {
        self.submit(queue, Request::Flush, token)
    }
    pub fn get_id(&mut self, queue: u16, token: usize) -> Result<(), BlkError> {
        self.submit(queue, Request::GetId, token)
    }
    pub fn get_lifetime(&mut self, queue: u16, token: usize) -> Result<(), BlkError> {
        self.submit(queue, Request::GetLifetime, token)
    }
    pub fn discard(
        &mut self,
        queue: u16,
        ranges: &[SectorRange],
        token: usize,
    ) -> Result<(), BlkError> {
        self.submit(queue, Request::Discard { ranges }, token)
    }
    pub fn write_zeroes(
        &mut self,
        queue: u16,
        ranges: &[SectorRange],
        unmap: bool,
        token: usize,
    ) -> Result<(), BlkError> {
        self.submit(queue, Request::WriteZeroes { ranges, unmap }, token)
    }
    pub fn secure_erase(
        &mut self,
        queue: u16,
        ranges: &[SectorRange],
        token: usize,
    ) -> Result<(), BlkError> {
        self.submit(queue, Request::SecureErase { ranges }, token)
    }

    /// Queues `req` on `queue` tagged with `token`, split into as many device requests as
    /// the device's limits need; the token completes once, through
    /// [`BlkDriver::poll_completions`], when every part has, with the first error.
    ///
    /// All or nothing: either every part is queued or none is (`QueueFull`: retry after
    /// completions, or, while suspended, after `resume`). Does not notify the device: call
    /// [`BlkDriver::kick`] after a batch. Never allocates.
    ///
    /// Always inlined: each caller (`read`, `write`, ...) names one kind, and with it
    /// constant the other kinds' checks and branches fold away (`bench blk`: about 65
    /// fewer instructions per 4 KiB read, at depth 1 and at depth 32).
    #[inline(always)]
    pub fn submit(&mut self, queue: u16, req: Request<'_>, token: usize) -> Result<(), BlkError> {
        if self.suspended {
            return Err(BlkError::QueueFull);
        }
        if self.stopped {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        let qi = usize::from(queue);
        // Reads and writes are checked, and staged when they go as one device request, in
        // one pass over their segments (`stage_data`); other requests by `validate`.
        let (kind, staged) = match req {
            Request::Read { sector, buffers } => {
                (Kind::Read, self.stage_data(qi, sector, buffers)?)
            }
            Request::Write { sector, buffers } => {
                if self.info.read_only {
                    return Err(BlkError::ReadOnly);
                }
                (Kind::Write, self.stage_data(qi, sector, buffers)?)
            }
            Request::Flush => (self.validate(&req)?, Staged::One(Part::COMMAND)),
            _ => (self.validate(&req)?, Staged::Parts { groups_of: None }),
        };
        if qi >= self.queues.len() {
            return Err(BlkError::NoSuchQueue { queue });
        }

        // Fast path: a read, write or flush that goes to the device as given (one device
        // request; the common case) is queued without the splitter and without asking the
        // ring first: `add` is all or nothing for one chain. `queue_part` is inlined here,
        // and this function into each caller, so the kind is a constant in it.
        match staged {
            Staged::One(part) => self.queue_part(qi, queue, kind, part, &mut None, token),
            Staged::Parts { groups_of } => {
                self.submit_parts(qi, queue, req, kind, groups_of, token)
            }
        }
    }

    /// [`BlkDriver::submit`] of a request that goes as several device requests, or as one
    /// the fast path does not stage (the range commands): out of line, so that inlining
    /// `submit` copies only its checks and fast path into each caller.
    #[inline(never)]
    fn submit_parts(
        &mut self,
        qi: usize,
        queue: u16,
        req: Request<'_>,
        kind: Kind,
        groups_of: Option<usize>,
        token: usize,
    ) -> Result<(), BlkError> {
        // Several parts: count device requests and ring descriptors first, all or nothing.
        // Segments that are each whole blocks within `size_max` go in groups as they are
        // (counted without cutting, queued in one pass); any other list is cut by the
        // splitter, once to count and once to queue.
        let groups = match (groups_of, req) {
            (Some(per), Request::Read { buffers, .. } | Request::Write { buffers, .. }) => {
                Some((buffers, per))
            }
            _ => None,
        };
        let (parts, descs) = match groups {
            Some((buffers, per)) => self.plan_groups(qi, buffers.len(), per)?,
            None => {
                let first = Self::first_cursor(kind);
                let slots = self.queues.get(qi).map_or(0, |q| q.slots.len());
                match self.plan(qi, &req, kind, first, slots, usize::MAX)? {
                    (parts, descs, None) => (parts, descs),
                    // More device requests than the queue has slots.
                    (_, _, Some(_)) => return Err(BlkError::TooLarge),
                }
            }
        };
        self.check_room(qi, queue, parts, descs)?;
        match groups {
            Some((buffers, per)) => self.execute_groups(qi, queue, &req, kind, buffers, per, token),
            None => {
                let first = Self::first_cursor(kind);
                self.execute(qi, queue, &req, kind, first, parts, token)
            }
        }
    }

    /// Whether `parts` device requests taking `descs` ring descriptors fit on the queue:
    /// `TooLarge` when they never can (more than its slots, or than its ring), `QueueFull`
    /// when not now.
    fn check_room(
        &self,
        qi: usize,
        queue: u16,
        parts: usize,
        descs: usize,
    ) -> Result<(), BlkError> {
        let (free_slots, total_slots) = self
            .queues
            .get(qi)
            .map_or((0, 0), |q| (q.free.len(), q.slots.len()));
        if parts > total_slots {
            return Err(BlkError::TooLarge);
        }
        let free_descs = usize::from(self.bus.free_descriptors(queue)?);
        let size = usize::from(self.bus.queue_size(queue)?);
        if descs > size {
            return Err(BlkError::TooLarge);
        }
        if parts > free_slots || descs > free_descs {
            return Err(BlkError::QueueFull);
        }
        Ok(())
    }

    /// Queues the next share of a discard, write-zeroes or secure-erase request that may
    /// need more device requests than the queue holds at once (where [`BlkDriver::submit`]
    /// answers `TooLarge`, e.g. a whole-disk discard cut by a small `max_discard_sectors`):
    /// the device requests from `from` on (`RangeCursor::default()` for the first share),
    /// at most `max_parts` of them and never more than the queue holds at once. Like
    /// `submit`, the share is checked in full, queued all or nothing (`QueueFull`: retry
    /// after completions, or after `resume`), not notified (call [`BlkDriver::kick`]), and
    /// `token` completes once, when every device request of the share has.
    ///
    /// Returns where the next share begins, or `None` when this one ends the request. Each
    /// share is a request of its own: a caller that stops at a failed share leaves the
    /// ranges after it untouched. `req` must carry the same ranges for every share.
    /// Never allocates.
    pub fn submit_ranges_from(
        &mut self,
        queue: u16,
        req: Request<'_>,
        from: RangeCursor,
        max_parts: usize,
        token: usize,
    ) -> Result<Option<RangeCursor>, BlkError> {
        if self.suspended {
            return Err(BlkError::QueueFull);
        }
        if self.stopped {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        let kind = self.validate(&req)?;
        if !matches!(kind, Kind::Discard | Kind::WriteZeroes | Kind::SecureErase) {
            return Err(BlkError::InvalidRequest);
        }
        let qi = usize::from(queue);
        let slots = self.queue(queue)?.slots.len();
        let size = usize::from(self.bus.queue_size(queue)?);
        let from = Cursor::Ranges(from);
        let (parts, descs, rest) = self.plan(qi, &req, kind, from, max_parts.min(slots), size)?;
        if parts == 0 {
            // `from` is at (or past) the end of the ranges: nothing would ever complete.
            return Err(BlkError::InvalidRequest);
        }
        self.check_room(qi, queue, parts, descs)?;
        self.execute(qi, queue, &req, kind, from, parts, token)?;
        Ok(match rest {
            Some(Cursor::Ranges(c)) => Some(c),
            _ => None,
        })
    }

    /// Device requests and ring descriptors of `segments` in groups of `per`.
    fn plan_groups(
        &self,
        qi: usize,
        segments: usize,
        per: usize,
    ) -> Result<(usize, usize), BlkError> {
        let index = self.queues.get(qi).map_or(0, |q| q.index);
        let parts = segments.div_ceil(per);
        let last = segments - (parts - 1) * per;
        // [header, data..., status] per device request.
        let full = self.bus.descriptors_for(index, per + 2)?;
        let tail = self.bus.descriptors_for(index, last + 2)?;
        Ok((parts, (parts - 1).saturating_mul(full).saturating_add(tail)))
    }

    /// Queues the groups [`BlkDriver::stage_parts`] allows, one device request each, in
    /// one pass over the segments.
    #[allow(clippy::too_many_arguments)]
    fn execute_groups(
        &mut self,
        qi: usize,
        queue: u16,
        req: &Request<'_>,
        kind: Kind,
        buffers: &[Segment],
        per: usize,
        token: usize,
    ) -> Result<(), BlkError> {
        let (Request::Read { mut sector, .. } | Request::Write { mut sector, .. }) = *req else {
            return Err(BlkError::InvalidRequest);
        };
        let mut head: Option<u16> = None;
        for group in buffers.chunks(per) {
            let Some(out) = self.scratch.get_mut(1..=group.len()) else {
                return Err(BlkError::InvalidRequest);
            };
            out.copy_from_slice(group);
            // Whole blocks each, and `stage_parts` bounded each segment so that the sum fits
            // `DataLimits::max_bytes`: no overflow.
            let bytes = group.iter().fold(0u32, |sum, s| sum.wrapping_add(s.len));
            let part = Part {
                sector,
                descs: group.len(),
                bytes,
                nranges: 0,
            };
            self.queue_part(qi, queue, kind, part, &mut head, token)?;
            sector += u64::from(bytes / SECTOR_SIZE);
        }
        Ok(())
    }

    /// Checks a read's or write's segments and extent (§5.2.6: whole logical blocks, inside
    /// the capacity; no empty or address-wrapping segment) and, when the request goes to
    /// the device as given (its segments each fit `size_max`, no more of them than the
    /// queue's data descriptors per request, and a used length that can cover its data
    /// and status byte), stages them as the data descriptors in `scratch[1..]`: one pass.
    /// A request with more segments than that is checked in one pass too, which also
    /// finds whether its segments can go in groups as they are ([`Staged::Parts`]).
    #[inline(always)]
    fn stage_data(
        &mut self,
        qi: usize,
        sector: u64,
        buffers: &[Segment],
    ) -> Result<Staged, BlkError> {
        let max_descs = self.queues.get(qi).map_or(0, |q| q.max_data_descs);
        let size_max = self.info.size_max.unwrap_or(u32::MAX);
        if let Some(out) = self.scratch.get_mut(1..=buffers.len())
            && buffers.len() <= max_descs
        {
            let (mut total, mut fits) = (0u64, true);
            for (o, s) in out.iter_mut().zip(buffers) {
                check_segment(s)?;
                total += u64::from(s.len);
                fits &= s.len <= size_max;
                *o = *s;
            }
            self.check_extent_bytes(sector, total)?;
            // Below `u32::MAX`: room for the status byte in the 32-bit used length.
            if fits && total < u64::from(u32::MAX) {
                return Ok(Staged::One(Part {
                    sector,
                    descs: buffers.len(),
                    bytes: total as u32,
                    nranges: 0,
                }));
            }
            // Rare (a segment above `size_max`, or 4 GiB in one request): the splitter's
            // pass below checks the same again.
        }
        self.stage_parts(qi, sector, buffers)
    }

    /// [`BlkDriver::stage_data`] of a read or write that goes as several device requests:
    /// checks its segments and extent in one pass, which also finds whether the segments
    /// can go in groups as they are, each whole logical blocks within `size_max` and short
    /// enough that a group's bytes fit what a 32-bit used length can report. Any group of
    /// such segments is whole blocks, so the request needs no cutting: device request k
    /// takes segments `k * per ..` ([`Staged::Parts`]).
    ///
    /// Its one call site is `stage_data`'s fall-through, and it is inlined there: out of
    /// line, `bench kext` measured a 4 KiB read 26 instructions dearer through the crate
    /// and 13 through the bundles, though a one-segment read never gets here.
    #[inline(always)]
    fn stage_parts(&self, qi: usize, sector: u64, buffers: &[Segment]) -> Result<Staged, BlkError> {
        let lim = self.data_limits(qi);
        let per = lim.max_descs.min(self.scratch.len().saturating_sub(2));
        let seg_limit = lim.size_max.min(group_segment_limit(per, lim.max_bytes()));
        // A power of two (`read_info`): a mask tests whole blocks.
        let block_mask = lim.block.max(1) - 1;
        let (mut total, mut whole) = (0u64, true);
        for s in buffers {
            check_segment(s)?;
            total += u64::from(s.len);
            whole &= s.len <= seg_limit && s.len & block_mask == 0;
        }
        self.check_extent_bytes(sector, total)?;
        Ok(Staged::Parts {
            groups_of: whole.then_some(per),
        })
    }

    /// `bytes` from `sector` as whole logical blocks inside the capacity. Multiples of the
    /// block are tested with masks: `read_info` takes only a power of two from 512 up as
    /// the block size (512 without BLK_SIZE), so no divide per request.
    #[inline(always)]
    fn check_extent_bytes(&self, sector: u64, bytes: u64) -> Result<(), BlkError> {
        let block_mask = u64::from(self.info.block_size.max(SECTOR_SIZE)) - 1;
        if bytes == 0 || bytes & block_mask != 0 {
            return Err(BlkError::InvalidRequest);
        }
        self.check_extent(sector, bytes / u64::from(SECTOR_SIZE))
    }

    /// `sectors` from `sector`, whole logical blocks inside the capacity.
    #[inline(always)]
    fn check_extent(&self, sector: u64, sectors: u64) -> Result<(), BlkError> {
        let sector_mask =
            u64::from(self.info.block_size.max(SECTOR_SIZE)) / u64::from(SECTOR_SIZE) - 1;
        if (sector | sectors) & sector_mask != 0 || sectors == 0 {
            return Err(BlkError::InvalidRequest);
        }
        match sector.checked_add(sectors) {
            Some(end) if end <= self.info.capacity => Ok(()),
            _ => Err(BlkError::OutOfRange),
        }
    }

    /// Checks a request other than a read or write (`stage_data` checks those) and gives
    /// its kind.
    fn validate(&self, req: &Request<'_>) -> Result<Kind, BlkError> {
        let info = &self.info;
        let ranges = |rs: &[SectorRange], limits: Option<RangeLimits>| -> Result<(), BlkError> {
            if limits.is_none() {
                return Err(BlkError::Unsupported);
            }
            if info.read_only {
                return Err(BlkError::ReadOnly);
            }
            if rs.is_empty() {
                return Err(BlkError::InvalidRequest);
            }
            rs.iter()
                .try_for_each(|r| self.check_extent(r.sector, r.sectors))
        };
        Ok(match *req {
            Request::Read { .. } => Kind::Read,
            Request::Write { .. } => Kind::Write,
            Request::Flush => {
                if !info.flush {
                    // Without FLUSH the device is write-through (§5.2.5): nothing to do,
                    // and the device would not understand the request.
                    return Err(BlkError::Unsupported);
                }
                Kind::Flush
            }
            Request::GetId => Kind::GetId,
            Request::GetLifetime => {
                if !info.lifetime {
                    return Err(BlkError::Unsupported);
                }
                Kind::GetLifetime
            }
            Request::Discard { ranges: rs } => {
                ranges(rs, info.discard)?;
                Kind::Discard
            }
            Request::WriteZeroes { ranges: rs, .. } => {
                ranges(rs, info.write_zeroes)?;
                Kind::WriteZeroes
            }
            Request::SecureErase { ranges: rs } => {
                ranges(rs, info.secure_erase)?;
                Kind::SecureErase
            }
        })
    }

    fn range_split(&self, kind: Kind) -> RangeSplit {
        let limits = match kind {
            Kind::Discard => self.info.discard,
            Kind::WriteZeroes => self.info.write_zeroes,
            Kind::SecureErase => self.info.secure_erase,
            _ => None,
        };
        let bs = self.info.block_sectors().max(1);
        let Some(l) = limits else {
            return RangeSplit {
                max_sectors: bs,
                alignment: 1,
                max_segs: 1,
            };
        };
        // Split at the device's alignment only where that keeps pieces whole blocks.
        let alignment = if l.alignment > 1 && l.alignment % bs == 0 && l.alignment <= l.max_sectors
        {
            l.alignment
        } else {
            1
        };
        RangeSplit {
            max_sectors: l.max_sectors,
            alignment,
            max_segs: usize::try_from(l.max_segments)
                .unwrap_or(usize::MAX)
                .min(self.ranges.len())
                .max(1),
        }
    }

    fn data_limits(&self, qi: usize) -> DataLimits {
        DataLimits {
            max_descs: self.queues.get(qi).map_or(1, |q| q.max_data_descs),
            size_max: self.info.size_max.unwrap_or(u32::MAX),
            block: self.info.block_size,
        }
    }

    /// The next part at `cursor`: data descriptors go to `scratch[1..]`, ranges to
    /// `ranges`. `None` when the request is exhausted.
    fn next_part(
        &mut self,
        qi: usize,
        req: &Request<'_>,
        kind: Kind,
        cursor: &mut Cursor,
    ) -> Result<Option<Part>, BlkError> {
        let none = Part {
            sector: 0,
            descs: 0,
            bytes: 0,
            nranges: 0,
        };
        match (*req, *cursor) {
            (
                Request::Read { sector, buffers } | Request::Write { sector, buffers },
                Cursor::Data(c),
            ) => {
                let lim = self.data_limits(qi);
                // The sector of this part: the caller's plus what earlier parts covered.
                let done = c.offset();
                let out = self.scratch.get_mut(1..).unwrap_or(&mut []);
                let part = split::next_data_part(buffers, c, &lim, out)
                    .map_err(|CannotSplit| BlkError::InvalidRequest)?;
                Ok(part.map(|p| {
                    *cursor = Cursor::Data(p.next);
                    Part {
                        sector: sector + done / u64::from(SECTOR_SIZE),
                        descs: p.descs,
                        bytes: p.bytes,
                        nranges: 0,
                    }
                }))
            }
            (
                Request::Discard { ranges }
                | Request::WriteZeroes { ranges, .. }
                | Request::SecureErase { ranges },
                Cursor::Ranges(c),
            ) => {
                let lim = self.range_split(kind);
                let unmap = matches!(*req, Request::WriteZeroes { unmap: true, .. });
                Ok(
                    split::next_range_part(ranges, c, &lim, unmap, &mut self.ranges).map(|p| {
                        *cursor = Cursor::Ranges(p.next);
                        Part {
                            nranges: p.segs,
                            ..none
                        }
                    }),
                )
            }
            (_, Cursor::Single(done)) => {
                if done {
                    return Ok(None);
                }
                *cursor = Cursor::Single(true);
                Ok(Some(none))
            }
            _ => Err(BlkError::InvalidRequest),
        }
    }

    fn first_cursor(kind: Kind) -> Cursor {
        match kind {
            Kind::Read | Kind::Write => Cursor::Data(DataCursor::default()),
            Kind::Discard | Kind::WriteZeroes | Kind::SecureErase => {
                Cursor::Ranges(RangeCursor::default())
            }
            _ => Cursor::Single(false),
        }
    }

    /// Counts the device requests of `req` from `cursor` on and the ring descriptors they
    /// take, up to `max_parts` of them and `max_descs` descriptors (at least one part); also
    /// gives where the parts after those begin (`None`: the request ends within them).
    fn plan(
        &mut self,
        qi: usize,
        req: &Request<'_>,
        kind: Kind,
        mut cursor: Cursor,
        max_parts: usize,
        max_descs: usize,
    ) -> Result<(usize, usize, Option<Cursor>), BlkError> {
        let index = self.queues.get(qi).map_or(0, |q| q.index);
        let (mut parts, mut descs) = (0usize, 0usize);
        loop {
            let at = cursor;
            let Some(p) = self.next_part(qi, req, kind, &mut cursor)? else {
                return Ok((parts, descs, None));
            };
            let more = self
                .bus
                .descriptors_for(index, p.chain_len(kind))
                .unwrap_or(usize::MAX / 2);
            if parts > 0 && (parts >= max_parts || descs.saturating_add(more) > max_descs) {
                return Ok((parts, descs, Some(at)));
            }
            parts += 1;
            descs = descs.saturating_add(more);
        }
    }

    /// Queues `parts` device requests of `req` from `cursor` on (as `plan` counted them).
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        qi: usize,
        queue: u16,
        req: &Request<'_>,
        kind: Kind,
        mut cursor: Cursor,
        parts: usize,
        token: usize,
    ) -> Result<(), BlkError> {
        let mut head: Option<u16> = None;
        for _ in 0..parts {
            let Some(part) = self.next_part(qi, req, kind, &mut cursor)? else {
                break;
            };
            self.queue_part(qi, queue, kind, part, &mut head, token)?;
        }
        Ok(())
    }

    /// Queues one device request whose data descriptors (or ranges) `next_part` left in
    /// `scratch[1..]` (or `ranges`); `head` is the caller request's first part (set by the
    /// first call). Writes only what the device reads: the header, the status sentinel,
    /// and the answer area or ranges when the request has them.
    #[inline(always)]
    fn queue_part(
        &mut self,
        qi: usize,
        queue: u16,
        kind: Kind,
        part: Part,
        head: &mut Option<u16>,
        token: usize,
    ) -> Result<(), BlkError> {
        let Self {
            bus,
            queues,
            scratch,
            ranges,
            ..
        } = self;
        let Some(q) = queues.get_mut(qi) else {
            return Err(BlkError::NoSuchQueue { queue });
        };
        let Some(slot) = q.free.pop() else {
            // Cannot happen after planning; stop with what is queued.
            return Self::partial(q, *head, BlkError::QueueFull);
        };
        let first = head.is_none();
        let h = head.unwrap_or(slot);

        // Device-readable header and range segments, status sentinel, zeroed answer.
        let sector = if matches!(kind, Kind::Read | Kind::Write) {
            part.sector
        } else {
            0
        };
        q.write_request(slot, &ReqHeader::new(kind.req_type(), sector));
        if matches!(kind, Kind::GetId | Kind::GetLifetime) {
            q.write(slot, SLOT_INLINE, &[0; SLOT_INLINE_LEN]);
        }
        if part.nranges > 0 {
            let ranges = ranges.get(..part.nranges).unwrap_or(&[]);
            q.write(slot, SLOT_RANGES, ranges.as_bytes());
        }

        // The chain: [header, data | answer | ranges, status]; `next_part` or
        // `stage_data` left the data descriptors in `scratch[1..=descs]`.
        let base = q.slot_daddr(slot, 0);
        let (n, readable) = match kind {
            Kind::Read => (part.descs, 1),
            Kind::Write => (part.descs, 1 + part.descs),
            Kind::Flush => (0, 1),
            Kind::GetId
            | Kind::GetLifetime
            | Kind::Discard
            | Kind::WriteZeroes
            | Kind::SecureErase => {
                let (at, len, readable) = match kind {
                    Kind::GetId => (SLOT_INLINE, ID_BYTES, 1),
                    Kind::GetLifetime => {
                        (SLOT_INLINE, core::mem::size_of::<wire::LifetimeWire>(), 1)
                    }
                    _ => (
                        SLOT_RANGES,
                        part.nranges * core::mem::size_of::<RangeSegment>(),
                        2,
                    ),
                };
                if let Some(s) = scratch.get_mut(1) {
                    *s = Segment::new(base + at as u64, len as u32);
                }
                (1, readable)
            }
        };
        let Some(chain) = scratch.get_mut(..n + 2) else {
            q.release(slot);
            return Self::partial(q, *head, BlkError::InvalidRequest);
        };
        if let Some((first_seg, rest)) = chain.split_first_mut()
            && let Some(last_seg) = rest.last_mut()
        {
            *first_seg = Segment::new(base + SLOT_HEADER as u64, 16);
            *last_seg = Segment::new(base + SLOT_STATUS as u64, 1);
        }
        let (r, w) = chain.split_at(readable.min(n + 2));

        if let Some(s) = q.slot_mut(slot) {
            *s = Slot {
                state: SlotState::InFlight,
                kind,
                head: h,
                data_len: if kind == Kind::Read { part.bytes } else { 0 },
                // The caller request's state lives in its first part's slot.
                token: if first { token } else { 0 },
                pending: u16::from(first),
                error: None,
            };
        }
        if let Err(e) = bus.add(queue, r, w, usize::from(slot)) {
            let chain = r.len() + w.len();
            let e = match e {
                // Backpressure: the caller retries after completions.
                Error::QueueFull => BlkError::QueueFull,
                // A chain longer than the ring can ever hold (no indirect table for it).
                Error::BadChain
                    if bus.descriptors_for(queue, chain).unwrap_or(usize::MAX)
                        > usize::from(bus.queue_size(queue).unwrap_or(0)) =>
                {
                    BlkError::TooLarge
                }
                e => {
                    log::warn!("virtio-blk: queue {queue}: add failed: {e}");
                    BlkError::Virtio(e)
                }
            };
            q.release(slot);
            return Self::partial(q, *head, e);
        }
        if first {
            *head = Some(slot);
        } else if let Some(s) = q.slot_mut(h) {
            s.pending += 1;
        }
        Ok(())
    }

    /// A submission stopped after some parts were queued: the token will complete with
    /// `e` once those parts complete. With nothing queued, the caller gets `e` now.
    fn partial(q: &mut QueueState, head: Option<u16>, e: BlkError) -> Result<(), BlkError> {
        match head.and_then(|h| q.slot_mut(h)) {
            Some(s) => {
                s.error.get_or_insert(e);
                Ok(())
            }
            None => Err(e),
        }
    }

    /// Notifies the device of the requests submitted on `queue` since the last kick, if it
    /// asked to be notified. One kick per batch. Returns whether it notified.
    pub fn kick(&mut self, queue: u16) -> Result<bool, BlkError> {
        self.queue(queue)?;
        if self.suspended {
            // `suspend` took every request back: nothing to notify.
            return Ok(false);
        }
        Ok(self.bus.kick(queue)?)
    }

    /// [`BlkDriver::kick`] on every queue.
    pub fn kick_all(&mut self) -> Result<(), BlkError> {
        for q in 0..self.num_queues() {
            self.kick(q)?;
        }
        Ok(())
    }

    /// Demultiplexes an interrupt (MSI-X vector, or `None` for INTx/polling) and handles a
    /// config change (capacity). Then call [`BlkDriver::poll_completions`] on the queues.
    ///
    /// Stopped (suspended, or aborted and not restarted), the device is reset: the bus
    /// still takes the interrupt (on INTx its ISR read is what lowers the line, §4.1.4.5),
    /// but a configuration change or DEVICE_NEEDS_RESET means nothing to the driver. The
    /// configuration is not read (the writeback field may not be read before FEATURES_OK,
    /// §5.2.5.1), nor is DEVICE_NEEDS_RESET reported: nothing is on the queues, and
    /// `resume` / `restart` start the device afresh. (Polling the queues then completes
    /// nothing.)
    #[inline(always)]
    pub fn handle_interrupt(&mut self, vector: Option<u16>) -> Result<BlkInterrupt, BlkError> {
        let cause = self.bus.handle_interrupt(vector);
        let mut out = BlkInterrupt {
            queues: cause.queues,
            capacity_changed: None,
            needs_reset: cause.needs_reset,
        };
        // The reset device's case is tested only here, off the path of a completion
        // interrupt (`bench kext`: an early return for it cost every interrupt 9
        // instructions).
        if cause.config_changed || cause.needs_reset {
            if self.stopped {
                out.needs_reset = false;
            } else if !cause.needs_reset {
                out.capacity_changed = self.handle_config_change()?;
            }
        }
        Ok(out)
    }

    /// Re-reads the configuration after a config-change notification; returns the new
    /// capacity (sectors) if it differs from the one the caller last heard of. Values
    /// `read_info` would refuse at init are refused here too (`Error::DeviceProtocol`), and
    /// the previous ones kept. Stopped, the device is reset and nothing is read (§5.2.5.1):
    /// `Virtio(InvalidState)`.
    pub fn handle_config_change(&mut self) -> Result<Option<u64>, BlkError> {
        if self.stopped {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        let capacity = config::read_capacity(&BusConfig(&self.bus))?;
        if self.info.config_wce {
            self.info.writeback = config::read_writeback(&BusConfig(&self.bus))?;
        }
        self.info.capacity = capacity;
        let before = self.capacity_reported;
        let news = self.capacity_news();
        if news.is_some() {
            log::info!("virtio-blk: capacity changed from {before} to {capacity} sectors");
        }
        Ok(news)
    }

    /// Switches the cache between writeback (true) and write-through (CONFIG_WCE).
    ///
    /// Like a submission, refused while the device is reset (its configuration may not be
    /// touched before FEATURES_OK, §5.2.5.1): suspended, `QueueFull` (ask again after
    /// `resume`); otherwise stopped, `Virtio(InvalidState)`.
    pub fn set_writeback(&mut self, writeback: bool) -> Result<(), BlkError> {
        if self.suspended {
            return Err(BlkError::QueueFull);
        }
        if self.stopped {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        if !self.info.config_wce {
            return Err(BlkError::Unsupported);
        }
        self.bus
            .write_config(cfg::WRITEBACK, &[u8::from(writeback)])?;
        self.info.writeback = config::read_writeback(&BusConfig(&self.bus))?;
        if self.info.writeback != writeback {
            return Err(BlkError::Unsupported);
        }
        Ok(())
    }

    /// Pops every completion of `queue`, reclaims slots and calls `f(token, result)` once
    /// per finished caller request. Interrupts are re-enabled race-free (disable, drain,
    /// re-enable, drain again if more arrived meanwhile). Never allocates. Returns the
    /// number of caller requests completed.
    ///
    /// An `Err` means the device broke the queue's rules (the queue is now unusable):
    /// call [`BlkDriver::abort_all`] and [`BlkDriver::restart`]. Stopped (suspended, or
    /// aborted and not restarted): nothing completes (`suspend` or `abort_all` handed every
    /// request back, and the reset device's queue is not to be read).
    pub fn poll_completions(
        &mut self,
        queue: u16,
        f: impl FnMut(usize, Result<Completion, BlkError>),
    ) -> Result<usize, BlkError> {
        if usize::from(queue) >= self.queues.len() {
            return Err(BlkError::NoSuchQueue { queue });
        }
        if self.stopped {
            return Ok(0);
        }
        self.pop_completions(queue, self.options.interrupts, f)
    }

    /// Pops every completion of `queue` (`Bus::drain_used`; with `interrupts`, race-free
    /// against the re-enable) and reports each finished caller request to `f`; returns how
    /// many finished. The one completion path (`poll_completions`, `suspend`).
    fn pop_completions(
        &mut self,
        queue: u16,
        interrupts: bool,
        mut f: impl FnMut(usize, Result<Completion, BlkError>),
    ) -> Result<usize, BlkError> {
        let Self { bus, queues, .. } = self;
        let Some(q) = queues.get_mut(usize::from(queue)) else {
            return Err(BlkError::NoSuchQueue { queue });
        };
        let mut done = 0;
        // Inlined into the ring's drain loop: one function per completion, not three.
        bus.drain_used(
            queue,
            interrupts,
            #[inline(always)]
            |used| {
                if let Some((token, result)) = complete_part(q, used) {
                    done += 1;
                    f(token, result);
                }
            },
        )?;
        Ok(done)
    }

    /// Resets the device and completes every caller request still in flight with
    /// `BlkError::Aborted`. The driver refuses requests until [`BlkDriver::restart`].
    pub fn abort_all(&mut self, mut f: impl FnMut(usize, Result<Completion, BlkError>)) {
        self.reset_and_abort(&mut f);
        self.stopped = true;
    }

    /// Resets the device through the bus and completes every caller request still in
    /// flight with `BlkError::Aborted`, exactly once: the parts the bus hands back, then
    /// (a bus that lost a token) any part still marked in flight, then any caller request
    /// whose parts are all accounted for but was never reported. Returns how many caller
    /// requests were aborted. Shared by `abort_all` and `suspend`.
    fn reset_and_abort(&mut self, f: &mut dyn FnMut(usize, Result<Completion, BlkError>)) -> usize {
        let mut aborted = 0;
        let Self {
            bus,
            queues,
            device_holds_dma,
            ..
        } = self;
        // The callers' requests are completed even if the reset failed: their buffers
        // belong to the OS, which cannot wait for ever (see `Bus::reset`); the slot memory
        // is ours and is leaked on the next `free_regions`.
        let reset = bus.reset(&mut |queue, token| {
            if let (Some(q), Ok(i)) = (queues.get_mut(usize::from(queue)), u16::try_from(token)) {
                aborted += abort_part(q, i, f);
            }
        });
        *device_holds_dma = reset.is_err();
        for q in queues.iter_mut() {
            let n = u16::try_from(q.slots.len()).unwrap_or(u16::MAX);
            for i in 0..n {
                aborted += abort_part(q, i, f);
            }
            for i in 0..n {
                if let Some(s) = q.slot(i).copied()
                    && s.state == SlotState::Finished
                    && s.head == i
                {
                    aborted += 1;
                    f(s.token, Err(s.error.unwrap_or(BlkError::Aborted)));
                }
            }
            for s in q.slots.iter_mut() {
                *s = IDLE;
            }
            q.free.clear();
            q.free.extend((0..n).rev());
        }
        aborted
    }

    /// Whether the driver is suspended (between [`BlkDriver::suspend`] and a successful
    /// [`BlkDriver::resume`]).
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// Prepares for sleep (Linux `virtblk_freeze`). From now on submissions are refused
    /// with [`BlkError::QueueFull`]: the caller holds them and submits them after
    /// [`BlkDriver::resume`]. Every queue is kicked, then the device gets at most
    /// `drain_polls` polls to complete what is in flight; those completions reach `f` with
    /// their results. Then the device is reset through the bus, and whatever was still in
    /// flight completes with [`BlkError::Aborted`] (the device may or may not have carried
    /// it out; resubmitting a read or write after `resume` is safe). Every caller token
    /// reaches `f` exactly once. Never allocates.
    ///
    /// Errors only when the driver is not running ([`Error::InvalidState`]); a device
    /// fault while waiting is reported in [`SuspendReport::drain_error`] and the reset
    /// still happens.
    pub fn suspend(
        &mut self,
        drain_polls: u32,
        mut f: impl FnMut(usize, Result<Completion, BlkError>),
    ) -> Result<SuspendReport, BlkError> {
        if self.stopped || self.suspended {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        self.suspended = true;
        self.stopped = true;
        let mut report = SuspendReport::default();
        if let Err(e) = self.drain(drain_polls, &mut f, &mut report) {
            log::warn!("virtio-blk: suspend: {e}; resetting with requests in flight");
            report.drain_error = Some(e);
        }
        report.aborted = self.reset_and_abort(&mut f);
        log::info!("virtio-blk: suspended: {report}");
        Ok(report)
    }

    /// Kicks every queue, then polls completions until nothing is in flight or
    /// `drain_polls` polls have passed.
    fn drain(
        &mut self,
        drain_polls: u32,
        f: &mut dyn FnMut(usize, Result<Completion, BlkError>),
        report: &mut SuspendReport,
    ) -> Result<(), BlkError> {
        let queues = self.num_queues();
        for q in 0..queues {
            self.bus.kick(q)?;
        }
        loop {
            for q in 0..queues {
                report.completed += self.pop_completions(q, false, &mut *f)?;
            }
            let in_flight = self.queues.iter().any(|q| q.free.len() < q.slots.len());
            if !in_flight || report.drain_polls >= drain_polls {
                return Ok(());
            }
            report.drain_polls += 1;
            core::hint::spin_loop();
        }
    }

    /// Brings the device back after [`BlkDriver::suspend`] (Linux `virtblk_restore`):
    /// exactly the features of before ([`Bus::renegotiate_features`]; a device offering
    /// fewer gives [`Error::MissingFeature`]), the configuration re-read (capacity, limits,
    /// cache mode; the report says whether the capacity changed), and every request queue
    /// rebuilt, as many as the device has now. Then submit what was held.
    ///
    /// On error the device is left reset and FAILED with nothing of the driver's in its
    /// hands, and the driver stays suspended: `resume` may be tried again.
    pub fn resume(&mut self) -> Result<ResumeReport, BlkError> {
        if !self.suspended {
            return Err(BlkError::Virtio(Error::InvalidState));
        }
        self.bring_up(Some(self.features))?;
        self.suspended = false;
        let report = ResumeReport {
            features: self.features,
            capacity: self.info.capacity,
            capacity_changed: self.capacity_news().is_some(),
            queues: self.num_queues(),
        };
        log::info!("virtio-blk: resumed: {report}");
        Ok(report)
    }
}

impl<B: Bus> Drop for BlkDriver<B> {
    fn drop(&mut self) {
        // The device must stop touching slot memory before it is freed; one that will not
        // stop keeps it (`free_regions` leaks it).
        let reset = self.bus.reset(&mut |_, _| {});
        self.note_reset(reset);
        self.free_regions();
    }
}

/// A data segment a device can be given: not empty, and not wrapping the address space.
#[inline(always)]
fn check_segment(s: &Segment) -> Result<(), BlkError> {
    if s.len == 0 || s.addr.checked_add(u64::from(s.len)).is_none() {
        return Err(BlkError::InvalidRequest);
    }
    Ok(())
}

/// Validates one completed device request and folds it into its caller request. Inlined
/// into its one caller (`pop_completions`): its result is 40 bytes that would otherwise
/// travel through memory once more per completion.
#[inline(always)]
fn complete_part(q: &mut QueueState, used: Used) -> Option<(usize, Result<Completion, BlkError>)> {
    let Some(i) = u16::try_from(used.token)
        .ok()
        .filter(|&i| q.slot(i).is_some_and(|s| s.state == SlotState::InFlight))
    else {
        log::error!(
            "virtio-blk: queue {}: completion for unknown request {}",
            q.index,
            used.token
        );
        return None;
    };
    let mut st = [0u8; 1];
    q.read(i, SLOT_STATUS, &mut st);
    // The fields this needs, not a copy of the whole slot (its error is 24 bytes).
    let s = q.slot(i)?;
    let (kind, data_len, token) = (s.kind, s.data_len, s.token);
    // The caller request's only part in flight, with no error recorded (the common case):
    // it completes now. Otherwise `finish_part` folds this part into its request.
    let alone = s.head == i && s.pending == 1 && s.error.is_none();
    // The commonest completion of all, built in place rather than through the `Result`
    // below: a lone read, write or flush that the device answered OK with a length
    // covering its data and status byte (what `check_status` accepts for them).
    if alone
        && st[0] == status::OK
        && matches!(kind, Kind::Read | Kind::Write | Kind::Flush)
        && u64::from(used.len) > u64::from(data_len)
    {
        q.release(i);
        return Some((token, Ok(Completion::Done)));
    }
    let result = check_status(kind, used.len, st[0], data_len).map(|()| match kind {
        Kind::GetId | Kind::GetLifetime => read_answer(q, i, kind),
        _ => Completion::Done,
    });
    if let Err(e) = result {
        log::warn!(
            "virtio-blk: queue {}: request type {} failed: {e}",
            q.index,
            kind.req_type()
        );
    }
    if alone {
        q.release(i);
        return Some((token, result));
    }
    finish_part(q, i, result)
}

/// The answer of a completed GET_ID or GET_LIFETIME request in slot `i` (§5.2.6). Out of
/// line: building the 20-byte identifier inside `complete_part` made every data
/// completion pay for copying it.
#[inline(never)]
fn read_answer(q: &QueueState, i: u16, kind: Kind) -> Completion {
    if kind == Kind::GetId {
        let mut id = [0u8; ID_BYTES];
        q.read(i, SLOT_INLINE, &mut id);
        return Completion::Id(DeviceId(id));
    }
    let mut b = [0u8; 6];
    q.read(i, SLOT_INLINE, &mut b);
    let [a0, a1, b0, b1, c0, c1] = b;
    Completion::Lifetime(Lifetime {
        pre_eol_info: u16::from_le_bytes([a0, a1]),
        device_lifetime_est_typ_a: u16::from_le_bytes([b0, b1]),
        device_lifetime_est_typ_b: u16::from_le_bytes([c0, c1]),
    })
}

/// Part `i`, if in flight, ends with `Aborted`; a caller request that completes with it is
/// reported to `f`. Returns the caller requests completed (0 or 1).
fn abort_part(
    q: &mut QueueState,
    i: u16,
    f: &mut dyn FnMut(usize, Result<Completion, BlkError>),
) -> usize {
    match finish_part(q, i, Err(BlkError::Aborted)) {
        Some((token, result)) => {
            f(token, result);
            1
        }
        None => 0,
    }
}

/// Marks part `i` done with `result`; returns the caller completion when it was the last.
fn finish_part(
    q: &mut QueueState,
    i: u16,
    result: Result<Completion, BlkError>,
) -> Option<(usize, Result<Completion, BlkError>)> {
    let slot = q.slot(i).copied()?;
    if slot.state != SlotState::InFlight {
        return None;
    }
    let h = slot.head;
    if i == h {
        if let Some(s) = q.slot_mut(i) {
            s.state = SlotState::Finished;
        }
    } else {
        q.release(i);
    }
    let head = q.slot_mut(h)?;
    head.pending = head.pending.saturating_sub(1);
    let value = match result {
        Err(e) => {
            head.error.get_or_insert(e);
            Completion::Done
        }
        Ok(v) => v,
    };
    if head.pending > 0 || head.state != SlotState::Finished {
        return None;
    }
    let token = head.token;
    let outcome = match head.error {
        Some(e) => Err(e),
        // Multi-part requests are data/range operations (Done); single-part ones carry
        // their own answer in `value`.
        None => Ok(value),
    };
    q.release(h);
    Some((token, outcome))
}

/// Status byte and written length of one device request (§5.2.6): OK / IOERR / UNSUPP are
/// distinct; anything else, or a length that does not cover the status byte (or, for a
/// read, the data), is the device breaking the protocol.
fn check_status(kind: Kind, len: u32, status: u8, data_len: u32) -> Result<(), BlkError> {
    if len == 0 {
        return Err(BlkError::Virtio(Error::DeviceProtocol {
            what: "blk: used length does not cover the status byte",
        }));
    }
    match status {
        status::OK => {}
        status::IOERR => return Err(BlkError::Io),
        status::UNSUPP => return Err(BlkError::Unsupported),
        _ => {
            return Err(BlkError::Virtio(Error::DeviceProtocol {
                what: "blk: status byte out of range",
            }));
        }
    }
    if kind == Kind::Read && u64::from(len) < u64::from(data_len) + 1 {
        return Err(BlkError::Virtio(Error::DeviceProtocol {
            what: "blk: used length shorter than the data read",
        }));
    }
    Ok(())
}

/// The longest segment of which `per` fit in `max_bytes`: `len * per <= max_bytes` exactly
/// when `len <= max_bytes / per` (whole numbers), so a per-segment compare replaces a
/// running maximum. 0 when `per` is 0 (no group at all).
fn group_segment_limit(per: usize, max_bytes: u32) -> u32 {
    match u32::try_from(per) {
        Ok(per) => max_bytes.checked_div(per).unwrap_or(0),
        // More than 2^32 per group: even 1-byte segments would exceed a u32 of bytes.
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_segment_limit_is_the_product_bound() {
        let maxes = [0, 1, 511, 512, 4096, 1 << 20, u32::MAX - 1, u32::MAX - 512];
        let pers = [0usize, 1, 2, 3, 7, 64, 254, 1 << 16];
        for &max_bytes in &maxes {
            for &per in &pers {
                let limit = group_segment_limit(per, max_bytes);
                let fits = |len: u32| u64::from(len) * per as u64 <= u64::from(max_bytes);
                if per == 0 {
                    assert_eq!(limit, 0);
                    continue;
                }
                assert!(fits(limit), "per {per}, max {max_bytes}: {limit} too long");
                if limit < u32::MAX {
                    assert!(
                        !fits(limit + 1),
                        "per {per}, max {max_bytes}: {limit} short"
                    );
                }
            }
        }
        #[cfg(target_pointer_width = "64")]
        assert_eq!(group_segment_limit(usize::MAX, u32::MAX), 0);
    }

    #[test]
    fn status_handling() {
        assert_eq!(check_status(Kind::Write, 1, 0, 0), Ok(()));
        assert_eq!(check_status(Kind::Write, 1, 1, 0), Err(BlkError::Io));
        assert_eq!(
            check_status(Kind::Flush, 1, 2, 0),
            Err(BlkError::Unsupported)
        );
        for bad in [3u8, 7, 0xFF] {
            assert!(matches!(
                check_status(Kind::Write, 1, bad, 0),
                Err(BlkError::Virtio(Error::DeviceProtocol { .. }))
            ));
        }
        assert!(matches!(
            check_status(Kind::Write, 0, 0, 0),
            Err(BlkError::Virtio(Error::DeviceProtocol { .. }))
        ));
        assert_eq!(check_status(Kind::Read, 4097, 0, 4096), Ok(()));
        assert!(matches!(
            check_status(Kind::Read, 4096, 0, 4096),
            Err(BlkError::Virtio(Error::DeviceProtocol { .. }))
        ));
        // An error status needs no data.
        assert_eq!(check_status(Kind::Read, 1, 1, 4096), Err(BlkError::Io));
    }

    #[test]
    fn device_id_trims_at_nul() {
        let mut raw = [0u8; 20];
        raw[..5].copy_from_slice(b"disk0");
        assert_eq!(DeviceId(raw).as_bytes(), b"disk0");
        assert_eq!(DeviceId([b'x'; 20]).as_bytes().len(), 20);
    }
}
