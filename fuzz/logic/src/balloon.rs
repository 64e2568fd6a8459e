//! virtio-balloon over the simulated function with `BalloonModel` as the device side and a
//! device the fuzzer drives: `num_pages` and `actual` of any value (and any config bytes),
//! free page hint command IDs (STOP, DONE, new rounds, any u32), statistics requests and
//! floods (the device completing the stats buffer on every notification), used lengths on
//! every queue (hint and report queues included), deflates and reports held back, forged and
//! repeated used ids, NEEDS_RESET; every combination of MUST_TELL_HOST, STATS_VQ,
//! DEFLATE_ON_OOM, FREE_PAGE_HINT, PAGE_POISON and PAGE_REPORTING (and INDIRECT_DESC,
//! EVENT_IDX, the packed ring), any ring sizes; a platform pool that may run dry or offer a malformed free
//! range again and again, with 4–32 KiB pages; the
//! driver polls, takes interrupts, deflates for OOM, releases hints, reports free pages,
//! deflates everything and restarts.
//!
//! Oracles: the page pool's books balance — a page or free range is never returned that is
//! not out (double return), and after `shutdown` and drop none is out (leak); the balloon
//! never holds more pages than its bound; one `poll`/`handle_interrupt` acknowledges at most
//! one inflate and one deflate and one report, and notifies the device a bounded number of
//! times even while it floods the stats queue; after drop, guest memory is back to what it
//! was.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use virtio_balloon::{
    BalloonDriver, BalloonEvent, BalloonOptions, FreeRange, MemStats, Page, PagePool, RangeReturn,
    RangeUse,
};
use virtio_pci::Preference;
use virtio_tests::balloon_model::{BalloonModel, bits};
use virtio_tests::sim::{MODES, Sim, SimInterrupt, SimMode};

use crate::FloodCount;
use crate::input::Input;

const MAX_STEPS: usize = 192;
const STATS_FLOOD: &str = "answered the stats flood";
/// Guest-physical base of the pool's pages and ranges (the device never touches them).
const POOL_BASE: u64 = 0x1_0000_0000;
const RANGE_BASE: u64 = 0x80_0000_0000;
/// Free ranges one driver call may ask for: far above what its bounds allow (report
/// capacity plus hint slots, each with as many refusals), far below a hang.
const RANGE_TAKE_LIMIT: usize = 4096;

#[derive(Default)]
struct PoolState {
    page_size: usize,
    total: usize,
    /// Page numbers not lent, lowest on top (a stack: O(1) per page, no tree to maintain).
    free: Vec<u32>,
    /// Per page number: lent out.
    lent: Vec<bool>,
    lent_count: usize,
    free_ranges: BTreeSet<(u64, u32)>,
    lent_ranges: BTreeSet<(u64, u32)>,
    /// Pages the pool still gives before it runs dry.
    budget: usize,
    /// `take_free_range` calls during the current driver call.
    takes: usize,
    errors: Vec<String>,
}

/// A counting platform pool: every page and range it lends is tracked.
#[derive(Clone)]
struct Pool(Rc<RefCell<PoolState>>);

impl PagePool for Pool {
    fn page_size(&self) -> usize {
        self.0.borrow().page_size
    }
    fn total_pages(&self) -> usize {
        self.0.borrow().total
    }
    fn alloc_page(&mut self) -> Option<Page> {
        let mut s = self.0.borrow_mut();
        if s.budget == 0 {
            return None;
        }
        let page = s.free.pop()?;
        s.budget -= 1;
        if let Some(l) = s.lent.get_mut(page as usize) {
            *l = true;
        }
        s.lent_count += 1;
        Some(Page {
            addr: POOL_BASE + u64::from(page) * s.page_size as u64,
        })
    }
    fn free_page(&mut self, page: Page) {
        let mut s = self.0.borrow_mut();
        let offset = page.addr.wrapping_sub(POOL_BASE);
        let number = offset / s.page_size as u64;
        let slot = offset
            .is_multiple_of(s.page_size as u64)
            .then(|| usize::try_from(number).ok())
            .flatten()
            .filter(|&n| s.lent.get(n).copied().unwrap_or(false));
        if let Some(n) = slot {
            s.lent[n] = false;
            s.lent_count -= 1;
            s.free.push(n as u32);
        } else {
            s.errors
                .push(format!("page {:#x} returned but not lent", page.addr));
        }
    }
    fn stats(&mut self) -> MemStats {
        let s = self.0.borrow();
        MemStats {
            mem_free: Some((s.free.len() * s.page_size) as u64),
            major_faults: s
                .lent_count
                .is_multiple_of(2)
                .then_some(s.lent_count as u64),
            ..MemStats::default()
        }
    }
    fn take_free_range(&mut self, _purpose: RangeUse) -> Option<FreeRange> {
        let mut s = self.0.borrow_mut();
        s.takes += 1;
        if s.takes > RANGE_TAKE_LIMIT {
            if s.takes == RANGE_TAKE_LIMIT + 1 {
                s.errors
                    .push("one driver call asks for free ranges without end".into());
            }
            return None;
        }
        let (addr, len) = s.free_ranges.pop_first()?;
        s.lent_ranges.insert((addr, len));
        Some(FreeRange { addr, len })
    }
    fn return_free_range(&mut self, r: FreeRange, _purpose: RangeUse, how: RangeReturn) {
        let mut s = self.0.borrow_mut();
        if !s.lent_ranges.remove(&(r.addr, r.len)) {
            s.errors.push(format!("range {r:?} returned but not lent"));
        } else if how != RangeReturn::Reported && how != RangeReturn::Leaked {
            // Reported ranges are marked; leaked ones the device may still write.
            s.free_ranges.insert((r.addr, r.len));
        }
    }
}

/// The checks after every driver call that returned an event.
fn check_event(ev: &BalloonEvent) {
    assert!(
        ev.acked_batches <= 2,
        "one call acknowledged {} inflate/deflate requests (one of each is in flight)",
        ev.acked_batches
    );
    assert!(
        ev.reports_acked <= 1,
        "one call acknowledged several reports"
    );
}

/// The balloon device a balloon input describes (shared with the `kext` target, which
/// builds its simulated function from it as this target does).
pub(crate) struct BalloonDevice {
    pub(crate) mode: SimMode,
    pub(crate) preference: Preference,
    /// Ring features offered besides the balloon's own.
    pub(crate) generic: u64,
    pub(crate) model: BalloonModel,
    /// Each queue's size.
    pub(crate) sizes: Vec<u16>,
}

/// Decodes the device: transport, balloon features, ring features, queue sizes.
pub(crate) fn device(input: &mut Input) -> BalloonDevice {
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let choice = input.u8();
    let features = [
        bits::MUST_TELL_HOST,
        bits::STATS_VQ,
        bits::DEFLATE_ON_OOM,
        bits::FREE_PAGE_HINT,
        bits::PAGE_POISON,
        bits::PAGE_REPORTING,
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| choice & (1 << i) != 0)
    .fold(0, |acc, (_, bit)| acc | bit);
    let generic_choice = input.u8();
    let generic = [bits::INDIRECT_DESC, bits::EVENT_IDX]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| generic_choice & (1 << i) != 0)
        .fold(0, |acc, (_, bit)| acc | bit)
        | crate::packed_if(generic_choice & 4 != 0);
    let model = BalloonModel::new(features);
    let sizes = (0..model.layout().count)
        .map(|_| 1u16 << (input.u8() % 7))
        .collect();
    BalloonDevice {
        mode,
        preference,
        generic,
        model,
        sizes,
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let BalloonDevice {
        mode,
        preference,
        generic,
        mut model,
        sizes,
    } = device(&mut input);
    let layout = model.layout();
    let opts = BalloonOptions {
        max_pages: usize::from(input.u16() % 600),
        deflate_on_oom: input.bool(),
        free_page_hint: input.bool(),
        page_reporting: input.bool(),
        report_capacity: 1 + u16::from(input.u8() % 8),
        max_hint_ranges: 1 + u16::from(input.u8() % 8),
    };
    let page_size = 4096usize << (input.u8() % 4);
    let pages = usize::from(input.u16() % 1024);
    let ranges = u64::from(input.u8() % 24);
    let pool = Pool(Rc::new(RefCell::new(PoolState {
        page_size,
        total: pages,
        free: (0..pages as u32).rev().collect(),
        lent: vec![false; pages],
        free_ranges: (0..ranges)
            .map(|i| (RANGE_BASE + i * 0x10_0000, 4096 << (i % 4)))
            .collect(),
        budget: if input.bool() {
            usize::MAX
        } else {
            usize::from(input.u16() % 512)
        },
        ..PoolState::default()
    })));
    let sim = model
        .sim_builder(mode, generic, input.bool())
        .queues(&sizes)
        .memory(crate::mem::guest_memory(1 << 20))
        .build();
    sim.set_device_config(0, &input.u32().to_le_bytes());
    sim.set_device_config(8, &input.u32().to_le_bytes());
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(device) = crate::sim_device(&sim, preference) else {
        return;
    };

    // A device that answers the stats queue on every notification (when flooding).
    let flood_stats = Arc::new(Mutex::new(false));
    let answered = FloodCount::default();
    if let Some(q) = layout.stats {
        let (flood, answered) = (Arc::clone(&flood_stats), answered.clone());
        sim.on_notify(Some(Arc::new(move |sim: &Sim, queue: u16| {
            if queue == q && flood.lock().is_ok_and(|f| *f) && answered.answer() {
                sim.serve(q, |_| 0);
            }
        })));
    }

    let driver = BalloonDriver::new(device, pool.clone(), opts);
    let Ok(mut driver) = driver else {
        crate::assert_setup_freed(&mem, free_at_start);
        check_pool(&pool);
        return;
    };
    let bound = driver.max_pages();

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        answered.start();
        pool.0.borrow_mut().takes = 0;
        match input.u8() % 18 {
            0..=2 => {
                model.len_override = match input.u8() % 6 {
                    0 => {
                        let q = u16::from(input.u8()) % layout.count;
                        Some((q, input.u32() % 8192))
                    }
                    _ => None,
                };
                model.serve(&sim);
            }
            3 | 4 => {
                for irq in sim.take_interrupts() {
                    // Interrupts queued over many steps are one `handle_interrupt` call
                    // each, and the flood bound holds per call: hundreds of queued
                    // interrupts, each answered once by a flooding device, are no hang.
                    let vector = match irq {
                        SimInterrupt::Msix(v) => Some(v),
                        SimInterrupt::Intx => None,
                    };
                    if let Ok(ev) =
                        answered.per_call(STATS_FLOOD, || driver.handle_interrupt(vector))
                    {
                        check_event(&ev);
                    }
                }
            }
            5 => {
                if let Ok(ev) = driver.poll() {
                    check_event(&ev);
                }
            }
            6 => {
                let target = match input.u8() % 4 {
                    0 => input.u32(),
                    _ => u32::from(input.u16() % 2048),
                };
                model.set_target(&sim, target);
                sim.raise_config_interrupt();
            }
            7 => {
                let id = match input.u8() % 4 {
                    0 => 0,
                    1 => 1,
                    2 => 0x8000_0000 + u32::from(input.u8() % 4),
                    _ => input.u32(),
                };
                model.set_cmd_id(&sim, id);
                sim.raise_config_interrupt();
            }
            8 => {
                if input.bool() {
                    model.request_stats(&sim);
                } else if let Ok(mut f) = flood_stats.lock() {
                    *f = !*f;
                }
            }
            9 => {
                if input.bool() {
                    model.hold_deflates = !model.hold_deflates;
                    model.hold_reports = input.bool();
                } else {
                    model.release_deflates(&sim);
                    model.release_reports(&sim);
                }
            }
            10 => {
                // A forged or repeated used element on any queue.
                let q = u16::from(input.u8()) % layout.count;
                if sim.queue_info(q).is_some_and(|i| i.ready) {
                    let id = match input.u8() % 3 {
                        0 => input.u32(),
                        _ => u32::from(input.u8() % 8),
                    };
                    sim.complete_raw(q, id, input.u32() % 8192);
                    sim.signal_used(q);
                }
            }
            11 => {
                // Every chain of a queue completed with one used length (hint and report
                // queues: device-writable buffers of any size).
                let q = u16::from(input.u8()) % layout.count;
                let len = match input.u8() % 3 {
                    0 => 0,
                    1 => 1,
                    _ => input.u32(),
                };
                if sim.serve(q, |_| len) > 0 {
                    let _ = driver.poll();
                }
            }
            12 => {
                if let Ok(d) = driver.deflate_for_oom(usize::from(input.u16() % 600)) {
                    assert!(d.released <= bound && d.pending <= bound);
                }
            }
            13 => {
                let _ = driver.release_hints();
                let _ = driver.report_free_pages();
            }
            14 => {
                if let Ok(ev) = driver.deflate_all() {
                    check_event(&ev);
                }
            }
            15 => {
                if input.bool() {
                    sim.trigger_needs_reset();
                } else {
                    let offset = usize::from(input.u8() % 16);
                    let len = usize::from(input.u8() % 8);
                    sim.set_device_config(offset, input.take(len));
                    sim.raise_config_interrupt();
                }
            }
            16 => {
                let mut s = pool.0.borrow_mut();
                match input.u8() % 3 {
                    0 => s.budget = 0,
                    1 => s.budget = usize::from(input.u16()),
                    _ => {
                        // A malformed range (misaligned) first in the free list: refused,
                        // returned `Unused`, offered again.
                        s.free_ranges.insert((0x800, 4096));
                    }
                }
            }
            _ => {
                if driver.is_stopped() || input.bool() {
                    let _ = driver.restart();
                }
            }
        }
        answered.check(STATS_FLOOD);
        assert!(
            driver.ballooned_pages() <= bound,
            "{} pages in the balloon, bound {bound}",
            driver.ballooned_pages()
        );
        let lent = pool.0.borrow().lent_count;
        assert!(
            lent <= bound + 2 * driver.batch_pages(),
            "{lent} pages out of the pool, bound {bound}"
        );
        assert!(
            pool.0.borrow().errors.is_empty(),
            "{:?}",
            pool.0.borrow().errors
        );
    }

    sim.on_notify(None);
    driver.shutdown();
    drop(driver);
    check_pool(&pool);
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}

fn check_pool(pool: &Pool) {
    let s = pool.0.borrow();
    assert!(s.errors.is_empty(), "pool: {:?}", s.errors);
    assert!(s.lent_count == 0, "{} pages never returned", s.lent_count);
    assert!(
        s.lent_ranges.is_empty(),
        "{} free ranges never returned",
        s.lent_ranges.len()
    );
}
