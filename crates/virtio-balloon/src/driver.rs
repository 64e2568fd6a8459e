//! The balloon driver proper: setup, inflate/deflate towards the host's target, stats,
//! deflate on OOM, free page hinting and reporting, reset and shutdown.

use alloc::vec::Vec;

use virtio_core::bus::{Bus, QueueSpec};
use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::queue::{Segment, Used};
use virtio_core::{DeviceType, Error, Features};
use zerocopy::IntoBytes;

use crate::features::{
    DEFLATE_ON_OOM, DRIVER_FEATURES, FREE_PAGE_HINT, MUST_TELL_HOST, PAGE_REPORTING, QueueLayout,
};
use crate::pool::{FreeRange, MemStats, Page, PagePool, RangeReturn, RangeUse};
use crate::wire::{
    self, CMD_ID_DONE, CMD_ID_STOP, FRAME_SIZE, MAX_PFNS, STAT_ENTRY_LEN, StatEntry, cfg, tag,
};

/// An empty vector with room for `n` entries, or [`BalloonError::NoMemory`]. The setup
/// tables are sized from the caller's options (8 bytes a page of the bound for the
/// balloon's array), and a kernel must be able to refuse them: an infallible allocation
/// that fails is a panic there.
fn table<T>(n: usize) -> Result<Vec<T>, BalloonError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| BalloonError::NoMemory)?;
    Ok(v)
}

/// Layout of the one DMA region allocated at setup.
const INFLATE_PFNS: usize = 0;
const DEFLATE_PFNS: usize = MAX_PFNS * 4;
const STATS_BUF: usize = 2 * MAX_PFNS * 4;
const CMD_START: usize = STATS_BUF + 128;
const CMD_STOP: usize = CMD_START + 4;
const REGION_LEN: usize = CMD_STOP + 4;
const _: () = assert!(tag::COUNT * STAT_ENTRY_LEN <= CMD_START - STATS_BUF);

/// Free-page-queue tokens of the command-ID buffers (hint buffers use their slot index).
const TOKEN_CMD_START: usize = usize::MAX;
const TOKEN_CMD_STOP: usize = usize::MAX - 1;
/// Default size asked for the inflate, deflate and stats queues: one request is in flight
/// on each at a time.
const SMALL_QUEUE: u16 = 16;

/// Errors of the balloon driver.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BalloonError {
    /// Bus, transport or device-protocol error. A device fault on a queue leaves the
    /// driver stopped: call [`BalloonDriver::restart`] (or `shutdown`).
    Virtio(Error),
    /// The operation needs a feature that was not negotiated.
    NotNegotiated,
    /// The driver is stopped (after a fault, a failed restart, or `shutdown`).
    Stopped,
    /// The platform's page size is not a power of two between 4 KiB and 1 MiB.
    BadPageSize { size: usize },
    /// The platform could not allocate the driver's tracking (sized at setup from
    /// [`BalloonOptions::max_pages`]): a smaller bound may fit.
    NoMemory,
}

impl From<Error> for BalloonError {
    fn from(e: Error) -> Self {
        BalloonError::Virtio(e)
    }
}

impl core::fmt::Display for BalloonError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BalloonError::Virtio(e) => write!(f, "{e}"),
            BalloonError::NotNegotiated => write!(f, "feature not negotiated"),
            BalloonError::Stopped => write!(f, "balloon driver stopped"),
            BalloonError::BadPageSize { size } => write!(f, "unusable page size {size}"),
            BalloonError::NoMemory => write!(f, "no memory for the balloon's tracking"),
        }
    }
}

/// Driver choices made at setup.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Most platform pages the balloon may hold; sizes the tracking array (8 bytes per
    /// page, allocated by [`BalloonDriver::new`], which fails with
    /// [`BalloonError::NoMemory`] when the platform cannot give it). 0:
    /// [`PagePool::total_pages`]. A host target beyond it is clamped.
    pub max_pages: usize,
    /// Negotiate DEFLATE_ON_OOM when offered.
    pub deflate_on_oom: bool,
    /// Negotiate FREE_PAGE_HINT when offered.
    pub free_page_hint: bool,
    /// Negotiate PAGE_REPORTING when offered.
    pub page_reporting: bool,
    /// Free ranges per report request (Linux: 32, `PAGE_REPORTING_CAPACITY`).
    pub report_capacity: u16,
    /// Most free ranges held for hinting in one round (they stay out of the platform's
    /// allocator until the device says DONE, or `release_hints`).
    pub max_hint_ranges: u16,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions {
            max_pages: 0,
            deflate_on_oom: true,
            free_page_hint: true,
            page_reporting: true,
            report_capacity: 32,
            max_hint_ranges: 256,
        }
    }
}

/// What an interrupt or poll did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonEvent {
    /// DEVICE_NEEDS_RESET: call [`BalloonDriver::restart`].
    pub needs_reset: bool,
    /// The host's target (`num_pages`, in 4 KiB frames) changed to this value.
    pub target_changed: Option<u32>,
    /// Inflate and deflate requests the device acknowledged.
    pub acked_batches: u32,
    /// The device asked for statistics and got a fresh buffer.
    pub stats_sent: bool,
    /// The platform had no page to give: inflation pauses until the next target change or
    /// [`BalloonDriver::poll`].
    pub starved: bool,
    /// Report requests the device acknowledged.
    pub reports_acked: u32,
    /// The free page hint command ID changed to this value.
    pub hint_cmd: Option<u32>,
}

/// Result of [`BalloonDriver::deflate_for_oom`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OomDeflate {
    /// Pages already back in the pool (without MUST_TELL_HOST they return at once).
    pub released: usize,
    /// Pages that return when the device acknowledges the deflate (MUST_TELL_HOST).
    pub pending: usize,
}

/// Counters for diagnostics and tests.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    pub inflate_requests: u64,
    pub deflate_requests: u64,
    pub pages_inflated: u64,
    pub pages_deflated: u64,
    pub oom_pages: u64,
    pub stats_buffers: u64,
    pub targets_clamped: u64,
    pub alloc_failures: u64,
    /// Pages or ranges from the platform the driver could not use (misaligned, beyond
    /// 32-bit frame numbers, malformed), given straight back.
    pub rejected_from_platform: u64,
    pub hint_rounds: u64,
    pub ranges_hinted: u64,
    pub reports: u64,
    pub ranges_reported: u64,
    /// Pages and ranges given back because the device was reset while holding them.
    pub reclaimed_at_reset: u64,
    /// Free ranges (reports, hints) leaked because a reset failed and the device's DMA
    /// could not be stopped ([`RangeReturn::Leaked`]).
    pub ranges_leaked: u64,
    /// Pages of an inflate request the device still held when a reset failed and its DMA
    /// could not be stopped, given up for good ([`PagePool::leak_page`]).
    pub pages_leaked: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum HintSlot {
    Free,
    /// Posted; the device has not used the buffer yet.
    InFlight(FreeRange),
    /// Used by the device; held until DONE.
    Held(FreeRange),
    /// Released to the platform while its buffer was still posted (allowed by §5.5.6.4.1);
    /// the slot is reusable once the device uses the buffer.
    Orphan,
}

struct HintState {
    queue: u16,
    /// Command ID of the round we last started (0: none yet).
    active: u32,
    /// Latest value of `free_page_hint_cmd_id`.
    received: u32,
    /// Start sent, stop not yet.
    hinting: bool,
    start_in_flight: bool,
    stop_pending: bool,
    slots: Vec<HintSlot>,
    free: Vec<u16>,
}

struct ReportState {
    queue: u16,
    capacity: usize,
    ranges: Vec<FreeRange>,
    segs: Vec<Segment>,
    in_flight: bool,
}

/// The virtio balloon driver over a bus `B` with pages from pool `P`. See the crate
/// documentation for the design.
pub struct BalloonDriver<B: Bus, P: PagePool> {
    bus: B,
    pool: P,
    options: BalloonOptions,
    features: Features,
    layout: QueueLayout,
    page_size: u64,
    frames_per_page: u32,
    batch_pages: usize,
    max_pages: usize,
    region: Option<DmaRegion>,

    /// Pages the device acknowledged in the balloon (capacity `max_pages`: never grows).
    ballooned: Vec<Page>,
    /// Pages of the inflate request in flight.
    inflating: Vec<Page>,
    inflate_in_flight: bool,
    /// Pages of the deflate request in flight still held (MUST_TELL_HOST).
    deflating: Vec<Page>,
    deflate_in_flight: bool,
    deflate_pages: usize,

    /// Last `num_pages` read, and the target in platform pages after rounding and clamping.
    num_pages: u32,
    target_pages: usize,
    /// Last value written to `actual`.
    actual: u32,
    oom_pending: usize,
    /// After an OOM deflate, do not re-inflate until the host sets a new target.
    oom_hold: bool,
    draining: bool,
    starved: bool,

    stats_tags: [bool; tag::COUNT],
    stats_last: [u64; tag::COUNT],
    stats_in_flight: bool,

    hint: Option<HintState>,
    report: Option<ReportState>,
    pfn_scratch: [u8; MAX_PFNS * 4],

    stopped: bool,
    /// The last reset failed (the device ignored it and its DMA could not be stopped): it
    /// may still read and write `region`, which is then never freed.
    device_holds_dma: bool,
    counters: BalloonCounters,
}

impl<B: Bus, P: PagePool> BalloonDriver<B, P> {
    /// Initialises the device (features, queues, stats buffer, DRIVER_OK), allocates
    /// everything the driver will ever need, reads the target and starts moving towards
    /// it. The only place (with `restart`) that allocates.
    pub fn new(bus: B, pool: P, options: BalloonOptions) -> Result<Self, BalloonError> {
        if bus.device_type() != DeviceType::Balloon {
            return Err(BalloonError::Virtio(Error::Unsupported));
        }
        let size = pool.page_size();
        let frames_per_page =
            wire::frames_per_page(size).ok_or(BalloonError::BadPageSize { size })?;
        let max_pages = if options.max_pages == 0 {
            pool.total_pages()
        } else {
            options.max_pages
        };
        // Target arithmetic is in u32 frames (the config field's width).
        let max_pages = max_pages.min((u32::MAX / frames_per_page) as usize);
        let batch_pages = wire::pages_per_batch(frames_per_page);
        let hint_slots = usize::from(options.max_hint_ranges.max(1));
        let report_cap = usize::from(options.report_capacity.max(1));
        // Every table before the DMA region and the device: a refusal leaves nothing to
        // undo.
        let ballooned = table(max_pages)?;
        let inflating = table(batch_pages)?;
        let deflating = table(batch_pages)?;
        let report_ranges = table(report_cap)?;
        let report_segs = table(report_cap)?;
        let mut slots = table(hint_slots)?;
        slots.resize(hint_slots, HintSlot::Free);
        let mut free_slots = table(hint_slots)?;
        free_slots.extend((0..hint_slots as u16).rev());
        let region = bus.dma().alloc_coherent(REGION_LEN, 64)?;
        let mut d = BalloonDriver {
            bus,
            pool,
            options,
            features: Features::empty(),
            layout: QueueLayout::for_features(Features::empty()),
            page_size: u64::from(frames_per_page) * FRAME_SIZE,
            frames_per_page,
            batch_pages,
            max_pages,
            region: Some(region),
            ballooned,
            inflating,
            inflate_in_flight: false,
            deflating,
            deflate_in_flight: false,
            deflate_pages: 0,
            num_pages: 0,
            target_pages: 0,
            actual: 0,
            oom_pending: 0,
            oom_hold: false,
            draining: false,
            starved: false,
            stats_tags: [false; tag::COUNT],
            stats_last: [0; tag::COUNT],
            stats_in_flight: false,
            hint: Some(HintState {
                queue: 0,
                active: 0,
                received: 0,
                hinting: false,
                start_in_flight: false,
                stop_pending: false,
                slots,
                free: free_slots,
            }),
            report: Some(ReportState {
                queue: 0,
                capacity: report_cap,
                ranges: report_ranges,
                segs: report_segs,
                in_flight: false,
            }),
            pfn_scratch: [0; MAX_PFNS * 4],
            stopped: true,
            device_holds_dma: false,
            counters: BalloonCounters::default(),
        };
        d.bring_up()?;
        Ok(d)
    }

    /// Re-initialises the device after DEVICE_NEEDS_RESET or a device fault. The reset
    /// empties the balloon from the device's point of view, so every page and range the
    /// driver held goes back to the pool first; then the driver inflates to the target again.
    pub fn restart(&mut self) -> Result<(), BalloonError> {
        self.reset_and_reclaim();
        self.bring_up()
    }

    /// Asks for the balloon to be emptied (towards a target of 0, telling the host each
    /// batch like any deflate); progress comes from interrupts or `poll`. [`is_empty`]
    /// says when it is done; then `shutdown`. Before a reset that is how the host learns
    /// which pages the guest takes back (§5.5.6.1: the driver MUST use the deflateq and
    /// MUST update `actual`; QEMU's reset does not clear `actual`), as Linux's
    /// `remove_common` and `virtballoon_freeze` do. The target is ignored until the next
    /// reset (`shutdown`, `restart`), after which the driver follows it again.
    ///
    /// [`is_empty`]: BalloonDriver::is_empty
    pub fn deflate_all(&mut self) -> Result<BalloonEvent, BalloonError> {
        self.draining = true;
        self.poll()
    }

    /// Resets the device and gives every page and range still held back to the pool
    /// (after `deflate_all` there is nothing left but the stats buffer). The driver is
    /// stopped afterwards; `restart` brings it back.
    pub fn shutdown(&mut self) {
        if !self.is_empty() {
            log::warn!(
                "virtio-balloon: shutdown with {} pages still in the balloon; the device \
                 is reset, they go back to the platform",
                self.ballooned.len() + self.inflating.len() + self.deflating.len()
            );
        }
        self.reset_and_reclaim();
    }

    fn bring_up(&mut self) -> Result<(), BalloonError> {
        match self.try_bring_up() {
            Ok(()) => Ok(()),
            Err(e) => {
                log::error!("virtio-balloon: initialisation failed: {e}");
                self.reset_and_reclaim();
                self.bus.fail();
                Err(e)
            }
        }
    }

    fn try_bring_up(&mut self) -> Result<(), BalloonError> {
        let mut want = DRIVER_FEATURES;
        if !self.options.deflate_on_oom {
            want.remove(DEFLATE_ON_OOM);
        }
        if !self.options.free_page_hint {
            want.remove(FREE_PAGE_HINT);
        }
        if !self.options.page_reporting {
            want.remove(PAGE_REPORTING);
        }
        let features = self.bus.negotiate_features(want)?;
        self.features = features;
        // Numbered over what the device offers (its queues exist whatever we accept:
        // QEMU creates them from its offer), set up for what was negotiated; see
        // `QueueLayout`.
        let layout = QueueLayout::new(self.bus.offered_features(), features);
        self.layout = layout;
        let indirect = features.contains(Features::INDIRECT_DESC);
        // Legacy balloon devices may write the buffer length into used.len (virtio 1.2
        // §5.5.6 legacy interface); this driver never reads it, so do not trust it there.
        let legacy = !features.contains(Features::VERSION_1);

        let mut specs = [QueueSpec::new(0); 5];
        let mut n = 0;
        for (q, size, max_indirect) in [
            (Some(layout.inflate), SMALL_QUEUE, 0),
            (Some(layout.deflate), SMALL_QUEUE, 0),
            (layout.stats, SMALL_QUEUE, 0),
            (layout.free_page, 0, 0),
            (
                layout.reporting,
                0,
                if indirect {
                    self.options.report_capacity
                } else {
                    0
                },
            ),
        ] {
            if let (Some(q), Some(spec)) = (q, specs.get_mut(n)) {
                *spec = QueueSpec::new(q)
                    .size(size)
                    .indirect(max_indirect)
                    .ignore_used_len(legacy);
                n += 1;
            }
        }
        self.bus.setup_queues(specs.get(..n).unwrap_or(&[]))?;

        if let (Some(h), Some(q)) = (self.hint.as_mut(), layout.free_page) {
            h.queue = q;
        }
        if let Some(q) = layout.reporting {
            let max_chain = usize::from(self.bus.max_chain(q)?);
            if let Some(r) = self.report.as_mut() {
                r.queue = q;
                r.capacity = usize::from(self.options.report_capacity.max(1)).min(max_chain);
            }
        }
        log::info!(
            "virtio-balloon: features {:#x}, {} queues, page {} bytes ({} frames), at most \
             {} pages",
            features.bits(),
            layout.count(),
            self.page_size,
            self.frames_per_page,
            self.max_pages
        );

        // §5.5.5: the stats buffer is added before DRIVER_OK and notified after it.
        if let Some(q) = layout.stats {
            self.choose_stats_tags();
            let len = self.fill_stats();
            let seg = Segment::new(self.daddr(STATS_BUF), len);
            self.bus.add(q, &[seg], &[], 0)?;
            self.stats_in_flight = true;
        }
        self.bus.driver_ok()?;
        self.stopped = false;
        if let Some(q) = layout.stats {
            self.bus.kick(q)?;
        }
        self.write_actual()?;
        let mut ev = BalloonEvent::default();
        self.read_device_config(&mut ev)?;
        self.advance(&mut ev)?;
        // §5.5.5: with PAGE_REPORTING, reporting begins after DRIVER_OK.
        self.report_free_pages()?;
        Ok(())
    }

    /// Resets the device and gives everything back to the pool. Leaves the driver stopped.
    ///
    /// After a failed reset (the device ignored it and its DMA could not be stopped, see
    /// `Bus::reset`) the device may still process what it has not used, and `region` is
    /// kept until a reset succeeds (`device_holds_dma`). Then:
    /// - the pages of an inflate request in flight are leaked ([`PagePool::leak_page`]):
    ///   the device reads their frame numbers from `region`, and inflating them makes the
    ///   host discard their backing (§5.5.6.1; QEMU's `ram_block_discard_range`), which
    ///   would wipe them under the platform's next user;
    /// - the free ranges of reports and hints still posted are device-writable buffers
    ///   (§5.5.6.4, §5.5.6.6), leaked likewise ([`RangeReturn::Leaked`]);
    /// - the balloon's acknowledged pages and those of a deflate in flight go back: they
    ///   are the platform's, which cannot do without them for ever. Nothing the device
    ///   can still do harms them: it has done with the acknowledged inflates, and a late
    ///   deflate only gives the host's backing back (§5.5.6.1: deflating tells the device
    ///   the guest uses the pages again; QEMU discards nothing). MUST_TELL_HOST's rule
    ///   (no use before the acknowledgement) is for hosts that back the pages only then;
    ///   a device that ignores the reset has not forgotten the acknowledged pages either,
    ///   which go back all the same, so holding the deflate's would protect nothing.
    fn reset_and_reclaim(&mut self) {
        self.device_holds_dma = self.bus.reset(&mut |_, _| {}).is_err();
        // The drain (if any) ends with the reset: the device forgot the balloon, and after
        // a restart the driver follows the target again.
        self.draining = false;
        let how = if self.device_holds_dma {
            RangeReturn::Leaked
        } else {
            RangeReturn::Reset
        };
        let mut back = 0u64;
        for p in self.ballooned.drain(..).chain(self.deflating.drain(..)) {
            self.pool.free_page(p);
            back += 1;
        }
        // `inflating` holds pages only while their request is posted (`post_inflate`
        // gives them back when it cannot post it; `inflate_done` moves them on).
        if self.device_holds_dma && self.inflate_in_flight && !self.inflating.is_empty() {
            let n = self.inflating.len() as u64;
            for p in self.inflating.drain(..) {
                self.pool.leak_page(p);
            }
            self.counters.pages_leaked += n;
            log::error!(
                "virtio-balloon: the device did not reset and its DMA could not be \
                 stopped: the {n} pages of the inflate it holds are leaked"
            );
        }
        for p in self.inflating.drain(..) {
            self.pool.free_page(p);
            back += 1;
        }
        // Ranges still posted (the device has not used their buffers).
        let mut posted = 0u64;
        if let Some(h) = self.hint.as_mut() {
            for (i, s) in h.slots.iter_mut().enumerate() {
                match *s {
                    HintSlot::InFlight(r) => {
                        self.pool.return_free_range(r, RangeUse::Hint, how);
                        posted += 1;
                    }
                    // Used: the device is done with the buffer (§2.7.14), whatever else
                    // it ignores.
                    HintSlot::Held(r) => {
                        self.pool
                            .return_free_range(r, RangeUse::Hint, RangeReturn::Reset);
                        back += 1;
                    }
                    HintSlot::Free | HintSlot::Orphan => {}
                }
                if *s != HintSlot::Free {
                    *s = HintSlot::Free;
                    h.free.push(i as u16);
                }
            }
            h.active = 0;
            h.received = 0;
            h.hinting = false;
            h.start_in_flight = false;
            h.stop_pending = false;
        }
        if let Some(r) = self.report.as_mut() {
            // Held only while their report is posted.
            for range in r.ranges.drain(..) {
                self.pool.return_free_range(range, RangeUse::Report, how);
                posted += 1;
            }
            r.in_flight = false;
        }
        if !self.device_holds_dma {
            back += posted;
        } else if posted > 0 {
            self.counters.ranges_leaked += posted;
            log::error!(
                "virtio-balloon: the device did not reset and its DMA could not be \
                 stopped: {posted} free ranges it may still write are leaked"
            );
        }
        self.counters.reclaimed_at_reset += back;
        self.inflate_in_flight = false;
        self.deflate_in_flight = false;
        self.deflate_pages = 0;
        self.stats_in_flight = false;
        self.oom_pending = 0;
        self.actual = 0;
        self.stopped = true;
    }

    // ---- accessors ----

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }
    /// Queue numbering in use.
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }
    /// The bus (diagnostics). Do not use the balloon's queues directly.
    pub fn bus(&self) -> &B {
        &self.bus
    }
    /// The bus, e.g. for the platform to route interrupts (its interrupt plumbing lives
    /// there); do not use the driver's queues through it.
    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }
    pub fn pool(&self) -> &P {
        &self.pool
    }
    /// The pool, e.g. to change what it can give. Pages the driver holds stay its own.
    pub fn pool_mut(&mut self) -> &mut P {
        &mut self.pool
    }
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }
    /// 4 KiB frames per platform page.
    pub fn frames_per_page(&self) -> u32 {
        self.frames_per_page
    }
    /// Platform pages one inflate/deflate request carries at most.
    pub fn batch_pages(&self) -> usize {
        self.batch_pages
    }
    /// Bound on the balloon, in platform pages.
    pub fn max_pages(&self) -> usize {
        self.max_pages
    }
    /// The host's last target, in frames, as read from `num_pages`.
    pub fn num_pages(&self) -> u32 {
        self.num_pages
    }
    /// The target in platform pages: `num_pages` rounded up to whole pages, clamped to
    /// `max_pages`.
    pub fn target_pages(&self) -> usize {
        self.target_pages
    }
    /// Pages the device acknowledged in the balloon.
    pub fn ballooned_pages(&self) -> usize {
        self.ballooned.len()
    }
    /// The value last written to `actual` (frames).
    pub fn actual(&self) -> u32 {
        self.actual
    }
    /// Nothing in the balloon and no inflate/deflate in flight.
    pub fn is_empty(&self) -> bool {
        self.ballooned.is_empty()
            && self.inflating.is_empty()
            && self.deflating.is_empty()
            && !self.inflate_in_flight
            && !self.deflate_in_flight
    }
    /// The balloon holds its (clamped) target and nothing is in flight.
    pub fn at_target(&self) -> bool {
        let goal = if self.draining { 0 } else { self.target_pages };
        !self.inflate_in_flight && !self.deflate_in_flight && self.ballooned.len() == goal
    }
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
    /// Free ranges currently held for hinting (posted or used, not yet released).
    pub fn hinted_ranges(&self) -> usize {
        self.hint.as_ref().map_or(0, |h| {
            h.slots
                .iter()
                .filter(|s| matches!(s, HintSlot::InFlight(_) | HintSlot::Held(_)))
                .count()
        })
    }
    /// Whether a hinting round is under way (start sent, stop not yet).
    pub fn hinting(&self) -> bool {
        self.hint.as_ref().is_some_and(|h| h.hinting)
    }

    // ---- events ----

    /// Demultiplexes an interrupt (MSI-X vector, or `None` for INTx and polling), re-reads
    /// the target on a config change, handles every completion and makes the next move.
    pub fn handle_interrupt(&mut self, vector: Option<u16>) -> Result<BalloonEvent, BalloonError> {
        let cause = self.bus.handle_interrupt(vector);
        let mut ev = BalloonEvent::default();
        if cause.needs_reset {
            log::warn!("virtio-balloon: device needs reset");
            ev.needs_reset = true;
            return Ok(ev);
        }
        if self.stopped {
            return Err(BalloonError::Stopped);
        }
        if cause.config_changed {
            self.read_device_config(&mut ev)?;
        }
        if cause.config_changed || !cause.queues.is_empty() {
            self.service(&mut ev)?;
        }
        Ok(ev)
    }

    /// Everything `handle_interrupt` does, without an interrupt: re-reads the config,
    /// handles completions, and retries inflation after the platform ran short of pages.
    pub fn poll(&mut self) -> Result<BalloonEvent, BalloonError> {
        if self.stopped {
            return Err(BalloonError::Stopped);
        }
        if self.bus.needs_reset() {
            return Ok(BalloonEvent {
                needs_reset: true,
                ..BalloonEvent::default()
            });
        }
        let mut ev = BalloonEvent::default();
        self.starved = false;
        self.read_device_config(&mut ev)?;
        self.service(&mut ev)?;
        Ok(ev)
    }

    /// Takes up to `pages` pages out of the balloon for a guest under memory pressure
    /// (DEFLATE_ON_OOM, §5.5.6.1: "if this is required for system stability"). One request
    /// goes out now (Linux's OOM notifier also frees 256 frames at a time), the rest
    /// follows as the device acknowledges. Without MUST_TELL_HOST the pages of the request
    /// are back in the pool on return. The balloon does not re-inflate until the host sets
    /// a new target.
    pub fn deflate_for_oom(&mut self, pages: usize) -> Result<OomDeflate, BalloonError> {
        if self.stopped {
            return Err(BalloonError::Stopped);
        }
        if !self.features.contains(DEFLATE_ON_OOM) {
            return Err(BalloonError::NotNegotiated);
        }
        let available = self.ballooned.len().saturating_sub(self.oom_pending);
        let n = pages.min(available);
        if n == 0 {
            return Ok(OomDeflate::default());
        }
        self.oom_hold = true;
        self.oom_pending += n;
        self.counters.oom_pages += n as u64;
        let mut released = 0;
        if !self.deflate_in_flight {
            let k = self.oom_pending.min(self.batch_pages);
            released = self.post_deflate(k, true)?;
        }
        Ok(OomDeflate {
            released,
            pending: n - released,
        })
    }

    /// Gives every range held for free page hinting back to the platform now (memory
    /// pressure). Allowed by §5.5.6.4.1 before DONE; their contents are undefined. Stops
    /// the current round. Returns the ranges released.
    pub fn release_hints(&mut self) -> Result<usize, BalloonError> {
        if self.stopped {
            return Err(BalloonError::Stopped);
        }
        let mut ev = BalloonEvent::default();
        if self.hint.as_ref().is_some_and(|h| h.hinting) {
            self.post_hint_stop()?;
        }
        let n = self.release_hint_ranges();
        self.advance(&mut ev)?;
        Ok(n)
    }

    /// Reports up to `report_capacity` free ranges from the platform on the reporting
    /// queue (PAGE_REPORTING), unless a report is in flight. The ranges come back through
    /// `PagePool::return_free_range` once the device used the buffer; a full report is
    /// followed by another automatically. Returns the ranges posted.
    pub fn report_free_pages(&mut self) -> Result<usize, BalloonError> {
        if self.stopped {
            return Err(BalloonError::Stopped);
        }
        let Some(r) = self.report.as_mut() else {
            return Ok(0);
        };
        if !self.features.contains(PAGE_REPORTING) || r.in_flight {
            return Ok(0);
        }
        r.ranges.clear();
        r.segs.clear();
        // A refused range goes back `Unused` and the platform may offer it again at once:
        // at most `capacity` refusals per report, or this loop never ends (§5.5.6.6 puts
        // no bound on the driver's side; the driver bounds its own work).
        let mut refused = 0;
        while r.ranges.len() < r.capacity && refused < r.capacity {
            let Some(range) = self.pool.take_free_range(RangeUse::Report) else {
                break;
            };
            if !range_ok(range) {
                log::error!(
                    "virtio-balloon: platform gave a malformed free range: address {:#x}, length {} bytes",
                    range.addr,
                    range.len
                );
                self.counters.rejected_from_platform += 1;
                self.pool
                    .return_free_range(range, RangeUse::Report, RangeReturn::Unused);
                refused += 1;
                continue;
            }
            r.ranges.push(range);
            r.segs.push(Segment::new(range.addr, range.len));
        }
        let n = r.ranges.len();
        if n == 0 {
            return Ok(0);
        }
        // The ranges are device-writable buffers, as Linux posts them and QEMU reads them.
        if let Err(e) = self.bus.add(r.queue, &[], &r.segs, 0) {
            log::warn!("virtio-balloon: report not queued: {e}");
            for range in r.ranges.drain(..) {
                self.pool
                    .return_free_range(range, RangeUse::Report, RangeReturn::Unused);
            }
            return Err(e.into());
        }
        r.in_flight = true;
        let q = r.queue;
        self.counters.reports += 1;
        self.counters.ranges_reported += n as u64;
        self.bus.kick(q)?;
        Ok(n)
    }

    // ---- internals ----

    fn service(&mut self, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        self.process_used(ev)?;
        self.advance(ev)
    }

    fn read_device_config(&mut self, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        // Any u32 is a legal target; what the platform cannot give is clamped below.
        let num = self.bus.read_config_u32(cfg::NUM_PAGES)?;
        let changed = num != self.num_pages;
        if changed {
            ev.target_changed = Some(num);
            // A new target from the host ends the OOM hold and retries allocation.
            self.oom_hold = false;
            self.starved = false;
        }
        self.num_pages = num;
        // Whole platform pages, rounded up: a stable goal (no flapping around a target
        // that is not a multiple of the page).
        let wanted = num.div_ceil(self.frames_per_page) as usize;
        self.target_pages = if wanted > self.max_pages {
            if changed {
                log::warn!(
                    "virtio-balloon: host asks for {num} frames; the platform can give at \
                     most {} ({} pages): clamped",
                    self.max_pages as u64 * u64::from(self.frames_per_page),
                    self.max_pages
                );
                self.counters.targets_clamped += 1;
            }
            self.max_pages
        } else {
            wanted
        };
        if self.features.contains(FREE_PAGE_HINT) {
            let id = self.bus.read_config_u32(cfg::FREE_PAGE_HINT_CMD_ID)?;
            if let Some(h) = self.hint.as_mut() {
                if id != h.received {
                    ev.hint_cmd = Some(id);
                    h.received = id;
                }
            }
        }
        Ok(())
    }

    fn process_used(&mut self, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        while let Some(u) = self.pop(self.layout.inflate)? {
            self.inflate_done(u, ev)?;
        }
        while let Some(u) = self.pop(self.layout.deflate)? {
            self.deflate_done(u, ev)?;
        }
        if let Some(q) = self.layout.stats {
            // At most one statistics request per call: answering it re-adds the buffer and
            // kicks, and a device that completes it on every notification would otherwise
            // keep this loop (and so `poll`/`handle_interrupt`) going forever. A request
            // that arrives meanwhile raises its own interrupt (§5.5.6.3).
            if let Some(u) = self.pop(q)? {
                self.stats_requested(q, u, ev)?;
            }
        }
        if let Some(q) = self.layout.free_page {
            while let Some(u) = self.pop(q)? {
                self.hint_used(u);
            }
        }
        if let Some(q) = self.layout.reporting {
            let mut acked = false;
            while let Some(u) = self.pop(q)? {
                acked |= self.report_used(u, ev);
            }
            if acked {
                self.report_free_pages()?;
            }
        }
        Ok(())
    }

    /// `pop_used` with device faults turned into a stopped driver.
    fn pop(&mut self, q: u16) -> Result<Option<Used>, BalloonError> {
        match self.bus.pop_used(q) {
            Ok(u) => Ok(u),
            Err(e) => Err(self.fault(e)),
        }
    }

    fn fault(&mut self, e: Error) -> BalloonError {
        log::error!("virtio-balloon: device fault: {e}; stopped until restart");
        self.stopped = true;
        BalloonError::Virtio(e)
    }

    fn protocol(&mut self, what: &'static str) -> BalloonError {
        self.fault(Error::DeviceProtocol { what })
    }

    fn inflate_done(&mut self, u: Used, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        if !self.inflate_in_flight || u.token != 0 {
            return Err(self.protocol("balloon: inflate completion without a request"));
        }
        // The used length of an inflate buffer is 0 (it has no writable part: the bus
        // refuses anything longer); legacy devices that report the total length are a
        // known bus limitation, see the crate docs.
        self.inflate_in_flight = false;
        let n = self.inflating.len();
        for p in self.inflating.drain(..) {
            if self.ballooned.len() < self.ballooned.capacity() {
                self.ballooned.push(p);
            } else {
                // Cannot happen (targets are clamped to the capacity); never allocate.
                self.pool.free_page(p);
            }
        }
        self.counters.pages_inflated += n as u64;
        ev.acked_batches += 1;
        self.write_actual()
    }

    fn deflate_done(&mut self, u: Used, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        if !self.deflate_in_flight || u.token != 0 {
            return Err(self.protocol("balloon: deflate completion without a request"));
        }
        self.deflate_in_flight = false;
        // MUST_TELL_HOST: the pages are usable only now that the device acknowledged.
        for p in self.deflating.drain(..) {
            self.pool.free_page(p);
        }
        self.counters.pages_deflated += self.deflate_pages as u64;
        self.deflate_pages = 0;
        ev.acked_batches += 1;
        self.write_actual()
    }

    fn stats_requested(
        &mut self,
        q: u16,
        u: Used,
        ev: &mut BalloonEvent,
    ) -> Result<(), BalloonError> {
        if !self.stats_in_flight || u.token != 0 {
            return Err(self.protocol("balloon: stats completion without a buffer"));
        }
        // §5.5.6.3: the device used the buffer to ask for fresh statistics; refill it and
        // make it available again (the only one in the queue).
        self.stats_in_flight = false;
        let len = self.fill_stats();
        let seg = Segment::new(self.daddr(STATS_BUF), len);
        self.bus.add(q, &[seg], &[], 0)?;
        self.stats_in_flight = true;
        self.bus.kick(q)?;
        ev.stats_sent = true;
        Ok(())
    }

    fn choose_stats_tags(&mut self) {
        let raw = self.pool.stats();
        let s = self.with_fallbacks(raw);
        for (t, v) in s.by_tag().into_iter().enumerate() {
            if let (Some(slot), Some(last)) =
                (self.stats_tags.get_mut(t), self.stats_last.get_mut(t))
            {
                *slot = v.is_some();
                *last = v.unwrap_or(0);
            }
        }
    }

    /// What the driver knows itself when the platform does not say. A pool that does not
    /// know the guest's size either (`total_pages` 0, as in VirtioBalloon.kext, whose
    /// MEMTOT comes from the kernel's `hw.memsize` or not at all) leaves MEMTOT unset
    /// rather than reporting zero memory.
    fn with_fallbacks(&self, mut s: MemStats) -> MemStats {
        if s.mem_total.is_none() && self.pool.total_pages() > 0 {
            s.mem_total = Some(self.pool.total_pages() as u64 * self.page_size);
        }
        s
    }

    /// Writes the stats buffer (the fixed tag set, in tag order); returns its length.
    fn fill_stats(&mut self) -> u32 {
        let raw = self.pool.stats();
        let s = self.with_fallbacks(raw).by_tag();
        let mut entries = [StatEntry::default(); tag::COUNT];
        let mut n = 0;
        for t in 0..tag::COUNT {
            let (Some(&on), Some(last)) = (self.stats_tags.get(t), self.stats_last.get_mut(t))
            else {
                continue;
            };
            if !on {
                continue;
            }
            if let Some(v) = s.get(t).copied().flatten() {
                *last = v;
            }
            if let Some(e) = entries.get_mut(n) {
                *e = StatEntry::new(t as u16, *last);
                n += 1;
            }
        }
        let bytes = entries.get(..n).unwrap_or(&[]).as_bytes();
        self.write_region(STATS_BUF, bytes);
        self.counters.stats_buffers += 1;
        bytes.len() as u32
    }

    fn write_actual(&mut self) -> Result<(), BalloonError> {
        let frames = u32::try_from(self.ballooned.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(self.frames_per_page);
        // One naturally aligned 32-bit write (§5.5.6 legacy: all 4 bytes, atomically).
        self.bus.write_config(cfg::ACTUAL, &frames.to_le_bytes())?;
        self.actual = frames;
        Ok(())
    }

    /// Makes the next move: OOM deflate first, then towards the target, one request per
    /// direction at a time (so a frame never sits in an inflate and a deflate request at
    /// once); then hinting.
    fn advance(&mut self, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        if self.stopped {
            return Ok(());
        }
        if !self.deflate_in_flight && self.oom_pending > 0 {
            let k = self.oom_pending.min(self.batch_pages);
            self.post_deflate(k, true)?;
        }
        if !self.inflate_in_flight && !self.deflate_in_flight {
            let goal = if self.draining { 0 } else { self.target_pages };
            let cur = self.ballooned.len();
            if cur < goal && !self.oom_hold && !self.starved {
                self.post_inflate((goal - cur).min(self.batch_pages), ev)?;
            } else if cur > goal {
                self.post_deflate((cur - goal).min(self.batch_pages), false)?;
            }
        }
        self.hint_progress()
    }

    fn post_inflate(&mut self, n: usize, ev: &mut BalloonEvent) -> Result<(), BalloonError> {
        self.inflating.clear();
        while self.inflating.len() < n {
            let Some(p) = self.pool.alloc_page() else {
                self.counters.alloc_failures += 1;
                self.starved = true;
                break;
            };
            if wire::first_frame(p.addr, self.page_size).is_none() {
                log::error!(
                    "virtio-balloon: platform page {:#x} is misaligned or beyond 32-bit \
                     frame numbers; given back",
                    p.addr
                );
                self.counters.rejected_from_platform += 1;
                self.pool.free_page(p);
                self.starved = true;
                break;
            }
            self.inflating.push(p);
        }
        if self.starved {
            ev.starved = true;
        }
        if self.inflating.is_empty() {
            return Ok(());
        }
        let q = self.layout.inflate;
        match self.post_pfns(q, INFLATE_PFNS, true) {
            Ok(()) => {
                self.inflate_in_flight = true;
                self.counters.inflate_requests += 1;
                self.bus.kick(q)?;
                Ok(())
            }
            Err(e) => {
                for p in self.inflating.drain(..) {
                    self.pool.free_page(p);
                }
                Err(e)
            }
        }
    }

    /// Posts a deflate request of up to `n` acknowledged pages; returns the pages already
    /// back in the pool (without MUST_TELL_HOST).
    fn post_deflate(&mut self, n: usize, oom: bool) -> Result<usize, BalloonError> {
        self.deflating.clear();
        let n = n.min(self.batch_pages);
        while self.deflating.len() < n {
            let Some(p) = self.ballooned.pop() else { break };
            self.deflating.push(p);
        }
        let k = self.deflating.len();
        if k == 0 {
            self.oom_pending = 0;
            return Ok(0);
        }
        let q = self.layout.deflate;
        if let Err(e) = self.post_pfns(q, DEFLATE_PFNS, false) {
            // Still in the balloon: nothing was told to the device.
            for p in self.deflating.drain(..).rev() {
                self.ballooned.push(p);
            }
            return Err(e);
        }
        self.deflate_in_flight = true;
        self.deflate_pages = k;
        self.counters.deflate_requests += 1;
        if oom {
            self.oom_pending = self.oom_pending.saturating_sub(k);
        }
        let mut released = 0;
        if !self.features.contains(MUST_TELL_HOST) {
            // §5.5.6.1: without MUST_TELL_HOST the pages may be reused before the device
            // acknowledges; the request is a courtesy.
            for p in self.deflating.drain(..) {
                self.pool.free_page(p);
            }
            released = k;
        }
        self.bus.kick(q)?;
        Ok(released)
    }

    /// Encodes the frames of `inflating` or `deflating` at `offset` and adds the buffer.
    fn post_pfns(&mut self, q: u16, offset: usize, inflate: bool) -> Result<(), BalloonError> {
        let pages = if inflate {
            &self.inflating
        } else {
            &self.deflating
        };
        let Some(frames) = wire::encode_pfns(
            pages.iter().map(|p| p.addr),
            self.frames_per_page,
            &mut self.pfn_scratch,
        ) else {
            return Err(BalloonError::Virtio(Error::BadChain));
        };
        let len = frames * 4;
        let bytes = self.pfn_scratch.get(..len).unwrap_or(&[]);
        write_to(self.region.as_ref(), offset, bytes);
        let seg = Segment::new(self.daddr(offset), len as u32);
        self.bus.add(q, &[seg], &[], 0)?;
        Ok(())
    }

    // ---- free page hinting (§5.5.6.4) ----

    fn hint_progress(&mut self) -> Result<(), BalloonError> {
        let Some(h) = self.hint.as_ref() else {
            return Ok(());
        };
        if !self.features.contains(FREE_PAGE_HINT) {
            return Ok(());
        }
        let received = h.received;
        // The device moved on (STOP, DONE or a new ID): end our round.
        if (h.hinting && received != h.active) || h.stop_pending {
            self.post_hint_stop()?;
        }
        if received == CMD_ID_DONE {
            self.release_hint_ranges();
        }
        let Some(h) = self.hint.as_ref() else {
            return Ok(());
        };
        if !h.hinting
            && !h.stop_pending
            && !h.start_in_flight
            && received > CMD_ID_DONE
            && received != h.active
        {
            self.post_hint_start(received)?;
        }
        if self.hint.as_ref().is_some_and(|h| h.hinting) {
            self.post_hints()?;
        }
        Ok(())
    }

    fn post_hint_start(&mut self, id: u32) -> Result<(), BalloonError> {
        write_to(self.region.as_ref(), CMD_START, &id.to_le_bytes());
        let seg = Segment::new(self.daddr(CMD_START), 4);
        let Some(h) = self.hint.as_mut() else {
            return Ok(());
        };
        let q = h.queue;
        self.bus.add(q, &[seg], &[], TOKEN_CMD_START)?;
        h.start_in_flight = true;
        h.active = id;
        h.hinting = true;
        self.counters.hint_rounds += 1;
        self.bus.kick(q)?;
        Ok(())
    }

    /// Ends the round with an output buffer holding STOP (its bytes never change, so the
    /// buffer may be posted again while an earlier copy is still in flight).
    fn post_hint_stop(&mut self) -> Result<(), BalloonError> {
        write_to(self.region.as_ref(), CMD_STOP, &CMD_ID_STOP.to_le_bytes());
        let seg = Segment::new(self.daddr(CMD_STOP), 4);
        let Some(h) = self.hint.as_mut() else {
            return Ok(());
        };
        let q = h.queue;
        h.hinting = false;
        match self.bus.add(q, &[seg], &[], TOKEN_CMD_STOP) {
            Ok(()) => {
                h.stop_pending = false;
                self.bus.kick(q)?;
                Ok(())
            }
            Err(Error::QueueFull) => {
                // Retried when hint buffers come back.
                h.stop_pending = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn post_hints(&mut self) -> Result<(), BalloonError> {
        let Some(h) = self.hint.as_mut() else {
            return Ok(());
        };
        let q = h.queue;
        let mut posted = false;
        let mut finished = false;
        // Refused ranges go back `Unused` and may be offered again at once: at most one
        // refusal per hint slot, then the round ends as if the platform had run out
        // (§5.5.6.4.1: the driver sends STOP when it cannot supply more).
        let mut refused = 0;
        loop {
            // Keep one descriptor for the STOP buffer.
            if self.bus.free_descriptors(q)? < 2 {
                break;
            }
            let Some(&slot) = h.free.last() else {
                finished = true;
                break;
            };
            let Some(range) = self.pool.take_free_range(RangeUse::Hint) else {
                finished = true;
                break;
            };
            if !range_ok(range) {
                log::error!(
                    "virtio-balloon: platform gave a malformed free range: address {:#x}, length {} bytes",
                    range.addr,
                    range.len
                );
                self.counters.rejected_from_platform += 1;
                self.pool
                    .return_free_range(range, RangeUse::Hint, RangeReturn::Unused);
                refused += 1;
                if refused >= h.slots.len() {
                    finished = true;
                    break;
                }
                continue;
            }
            let seg = Segment::new(range.addr, range.len);
            if let Err(e) = self.bus.add(q, &[], &[seg], usize::from(slot)) {
                self.pool
                    .return_free_range(range, RangeUse::Hint, RangeReturn::Unused);
                if e == Error::QueueFull {
                    break;
                }
                return Err(e.into());
            }
            h.free.pop();
            if let Some(s) = h.slots.get_mut(usize::from(slot)) {
                *s = HintSlot::InFlight(range);
            }
            self.counters.ranges_hinted += 1;
            posted = true;
        }
        if posted {
            self.bus.kick(q)?;
        }
        if finished {
            // §5.5.6.4.1: unable to supply more pages (none left, or our bound reached).
            self.post_hint_stop()?;
        }
        Ok(())
    }

    fn hint_used(&mut self, u: Used) {
        let Some(h) = self.hint.as_mut() else {
            return;
        };
        match u.token {
            TOKEN_CMD_START => h.start_in_flight = false,
            TOKEN_CMD_STOP => {}
            t => {
                // Hint buffers are device-writable; whatever length the device reports
                // (QEMU: 1) is within the posted range (checked by the bus) and ignored.
                let Ok(i) = u16::try_from(t) else { return };
                match h.slots.get_mut(usize::from(i)) {
                    Some(s @ HintSlot::InFlight(_)) => {
                        if let HintSlot::InFlight(r) = *s {
                            *s = HintSlot::Held(r);
                        }
                    }
                    Some(s @ HintSlot::Orphan) => {
                        *s = HintSlot::Free;
                        h.free.push(i);
                    }
                    _ => log::error!("virtio-balloon: hint completion for idle slot {i}"),
                }
            }
        }
    }

    /// Returns every held hint range to the platform.
    fn release_hint_ranges(&mut self) -> usize {
        let Some(h) = self.hint.as_mut() else {
            return 0;
        };
        let mut n = 0;
        for (i, s) in h.slots.iter_mut().enumerate() {
            match *s {
                HintSlot::Held(r) => {
                    self.pool
                        .return_free_range(r, RangeUse::Hint, RangeReturn::HintReleased);
                    *s = HintSlot::Free;
                    h.free.push(i as u16);
                    n += 1;
                }
                HintSlot::InFlight(r) => {
                    self.pool
                        .return_free_range(r, RangeUse::Hint, RangeReturn::HintReleased);
                    *s = HintSlot::Orphan;
                    n += 1;
                }
                HintSlot::Free | HintSlot::Orphan => {}
            }
        }
        n
    }

    // ---- free page reporting (§5.5.6.6) ----

    /// Returns the ranges of the acknowledged report; true if another may follow.
    fn report_used(&mut self, u: Used, ev: &mut BalloonEvent) -> bool {
        let Some(r) = self.report.as_mut() else {
            return false;
        };
        if !r.in_flight || u.token != 0 {
            log::error!("virtio-balloon: report completion without a report");
            return false;
        }
        r.in_flight = false;
        let full = r.ranges.len() == r.capacity;
        for range in r.ranges.drain(..) {
            self.pool
                .return_free_range(range, RangeUse::Report, RangeReturn::Reported);
        }
        ev.reports_acked += 1;
        full
    }

    // ---- DMA region ----

    fn daddr(&self, offset: usize) -> u64 {
        self.region.as_ref().map_or(0, |r| r.daddr) + offset as u64
    }

    fn write_region(&self, offset: usize, bytes: &[u8]) {
        write_to(self.region.as_ref(), offset, bytes);
    }
}

/// Each area is written only while the device does not own it (its one buffer is not
/// posted); publication to the device follows through the queue's release fence.
fn write_to(region: Option<&DmaRegion>, offset: usize, bytes: &[u8]) {
    if let Some(r) = region {
        r.write_at(offset, bytes);
    }
}

fn range_ok(r: FreeRange) -> bool {
    r.len != 0
        && u64::from(r.len) % FRAME_SIZE == 0
        && r.addr % FRAME_SIZE == 0
        && r.addr.checked_add(u64::from(r.len)).is_some()
}

impl<B: Bus, P: PagePool> Drop for BalloonDriver<B, P> {
    fn drop(&mut self) {
        // The device must forget the balloon before its pages and our buffers go back.
        // Idempotent: after an earlier reclaim there is nothing left to return.
        self.reset_and_reclaim();
        let quiet = !self.device_holds_dma;
        // SAFETY: the region came from this bus's DMA allocator and is taken (released
        // once); `quiet`: the reset just above was acknowledged or the device's DMA stopped,
        // so it no longer accesses the region (otherwise it is leaked).
        unsafe { self.bus.release_dma(self.region.take(), quiet) };
    }
}
