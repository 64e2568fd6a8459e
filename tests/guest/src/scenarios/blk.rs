//! `blk`: the virtio-blk driver (`virtio_blk::BlkDriver` over `virtio-pci` + `virtio-core`)
//! against QEMU's virtio-blk-pci, in the run's interrupt mode. The runner's host side
//! (`tests/src/qemu/blk_host.rs`) builds the drive and checks the image file afterwards.
//!
//! `blk_test=` picks what runs:
//! - `main` (default): GET_ID = `blk_serial`; features and queues as the runner set them
//!   (`blk_queues`, `blk_indirect=0`, `blk_event_idx=0`); the deterministic pattern
//!   ([`pattern`], seed `blk_seed`) written over the whole disk with varying request sizes,
//!   memory alignments and segment shapes (requests beyond `seg_max` are split by the
//!   driver; requests the queue can never hold come back `TooLarge` and are halved here),
//!   flushed, read back with different boundaries and verified; then DISCARD and
//!   WRITE_ZEROES of the fixed ranges, which must read back as zeros. Halfway through the
//!   pattern write, and again halfway through the verify pass, the driver is suspended
//!   and resumed ([`SuspendStep`], `blk.suspend.write` / `blk.suspend.verify`): the
//!   device is reset with requests in flight (the write gives them `blk_suspend_drain`
//!   polls, default 0, so they are aborted; the verify lets them complete), a submission
//!   while suspended is held, and after the resume the aborted and held requests are
//!   resubmitted. The runner's image check then proves nothing was lost; `blk_suspend=0`
//!   skips the steps.
//! - `ro`: a read-only drive: writes, discards and write-zeroes are refused by the driver
//!   before reaching the device; the whole disk reads back the runner's initial image.
//! - `fault`: QEMU blkdebug fails reads covering `blk_bad_read` and writes covering
//!   `blk_bad_write` sectors: exactly those requests fail with `Io`, the others (also
//!   in the same batch) succeed, and the driver keeps working.
//! - `durable`: [`DURABLE_ROUNDS`] rounds each write an area, flush, and print
//!   `STAT blk.durable.flushed=<k>`; at `blk_kill=<k>` the guest goes on writing the next
//!   area unflushed and waits for the runner to SIGKILL QEMU.
//!
//! `bench-blk` (our driver) and `bench-blk-vd` (the `virtio-drivers` crate) time 4 KiB
//! random reads at depth 1 and 32 and 64 KiB sequential reads against a null-co drive;
//! each phase is bracketed by fw_cfg-select markers ([`marker`]) so the runner can
//! attribute QEMU's trace events (kicks, interrupts) to phases. `bench-blk` then runs the
//! scatter-gather phases ([`SG_PHASES`]): sequential reads at depth 1 of 16 KiB to 1 MiB,
//! each request a list of 4 KiB segments on every other page of a buffer (so no two
//! segments are contiguous); virtio-drivers has no scatter-gather API and skips them.

mod disk;
pub mod pattern;
mod vd;

pub use vd::bench as bench_vd;

use super::Env;
use crate::check;
use crate::cmdline::IrqMode;
use crate::platform::GuestDma;
use crate::report;
use crate::report::show::{FeatureSet, Irq, Limits, Opt, yes_no};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use disk::{Counters, Disk};
use virtio_blk::{BlkError, BlkOptions, Completion, Request, ResumeReport, SectorRange};
use virtio_core::bus::Bus;
use virtio_core::platform::{Dma, DmaRegion, InterruptMode};
use virtio_core::queue::Segment;
use virtio_core::{DeviceType, Features};

const SECTOR: usize = 512;
/// Largest request the integrity passes build (1 MiB).
const MAX_JOB_SECTORS: u64 = 2048;
/// Staging buffers (requests in flight at most).
const SLOTS: usize = 8;
/// Per-slot staging size: the data plus the gaps of the scattered shapes.
const SLOT_BYTES: usize = (MAX_JOB_SECTORS as usize * SECTOR) * 9 / 8 + 16384;
pub const DURABLE_ROUNDS: u64 = 4;
const DURABLE_FIRST: u64 = 1024;
const DURABLE_AREA: u64 = 3072;

/// Sectors of durability area `k` (1-based).
pub fn durable_area(k: u64) -> (u64, u64) {
    (DURABLE_FIRST + (k - 1) * DURABLE_AREA, DURABLE_AREA)
}

pub fn run(env: &mut Env) {
    let test = env.cmdline.get("blk_test").unwrap_or("main");
    let Some(func) = env.find_virtio(virtio_core::DeviceType::Block).cloned() else {
        check!("blk.present", false, "no virtio-blk on the bus");
        return;
    };
    let mut mask = Features::empty();
    if env.cmdline.get_u64("blk_mask_indirect", 0) != 0 {
        mask |= Features::INDIRECT_DESC;
    }
    let opts = BlkOptions {
        // Let the device's seg_max be the limit that splits requests.
        max_segments: 1024,
        interrupts: env.irq != IrqMode::Poll,
        ..BlkOptions::default()
    };
    let mut disk = match disk::open(env, &func, opts, mask) {
        Ok(d) => d,
        Err(e) => {
            check!("blk.init", false, "{} {e}", func.addr);
            return;
        }
    };
    if !init_checks(env, &mut disk, test) {
        return;
    }
    let seed = env.cmdline.get_u64("blk_seed", 1);
    let suspend = (env.cmdline.get_u64("blk_suspend", 1) != 0)
        .then(|| u32::try_from(env.cmdline.get_u64("blk_suspend_drain", 0)).unwrap_or(u32::MAX));
    let mut slots = Slots::new();
    match test {
        "main" => test_main(&mut disk, &mut slots, seed, suspend),
        "ro" => test_ro(&mut disk, &mut slots),
        "fault" => test_fault(env, &mut disk, &mut slots, seed),
        "durable" => test_durable(env, &mut disk, &mut slots, seed),
        other => {
            check!("blk.test", false, "unknown blk_test={other}");
        }
    }
    let c = disk.counters();
    for q in 0..disk.drv.num_queues() {
        if let Ok(s) = disk.drv.queue_stats(q) {
            report::stat(&format!("blk.q{q}.kicks"), s.kicks);
            report::stat(&format!("blk.q{q}.completions"), s.completions);
            report::stat(&format!("blk.q{q}.indirect"), s.indirect);
            report::stat(&format!("blk.q{q}.kicks_suppressed"), s.kicks_suppressed);
        }
    }
    report::stat("blk.added", c.added);
    report::stat("blk.spurious", disk.drv.bus().spurious_interrupts());
    super::device_stats("blk", c.kicks, c.completions, disk.irq());
    drop(disk);
    slots.free();
}

/// Features, queues, interrupt mode, capacity and GET_ID against what the runner set up.
fn init_checks(env: &Env, disk: &mut Disk, test: &str) -> bool {
    let info = *disk.drv.info();
    let f = disk.drv.features();
    let mode = disk.irq().mode();
    let mut problems: Vec<String> = Vec::new();
    let want_mode = matches!(
        (env.irq, mode),
        (IrqMode::MsiX, InterruptMode::MsiX { .. })
            | (IrqMode::Intx, InterruptMode::Intx)
            | (IrqMode::Poll, InterruptMode::Polling)
    );
    if !want_mode {
        problems.push(format!(
            "interrupt mode {} for irq={}",
            Irq(mode),
            env.irq.name()
        ));
    }
    let legacy = env.cmdline.get("transport") == Some("legacy");
    if f.contains(Features::VERSION_1) == legacy {
        problems.push(format!("VERSION_1 negotiated={}", !legacy));
    }
    // Ring features: negotiated exactly when the device offered them and the driver asked
    // (it always asks, except INDIRECT_DESC under blk_mask_indirect). A device that offers
    // other than what the runner set up (a property given after `--`) is noted, not failed.
    let offered = disk.drv.bus().offered_features();
    let mut notes: Vec<String> = Vec::new();
    let asked_indirect = env.cmdline.get_u64("blk_mask_indirect", 0) == 0;
    for (name, bit, asked, runner_key) in [
        (
            "INDIRECT_DESC",
            Features::INDIRECT_DESC,
            asked_indirect,
            "blk_indirect",
        ),
        ("EVENT_IDX", Features::EVENT_IDX, true, "blk_event_idx"),
    ] {
        let (was_offered, negotiated) = (offered.contains(bit), f.contains(bit));
        if negotiated != (was_offered && asked) {
            problems.push(format!(
                "{name} negotiated={negotiated}, but offered={was_offered} and asked={asked}"
            ));
        }
        if was_offered != (env.cmdline.get_u64(runner_key, 1) != 0) {
            notes.push(format!(
                "the device {} {name} (set on QEMU's command line, not by the runner)",
                if was_offered {
                    "offers"
                } else {
                    "does not offer"
                }
            ));
        }
    }
    let queues = env.cmdline.get_u64("blk_queues", 1);
    if u64::from(disk.drv.num_queues()) != queues {
        problems.push(format!(
            "{} queues, expected {queues}",
            disk.drv.num_queues()
        ));
    }
    let bytes = env.cmdline.get_u64("blk_bytes", 0);
    if bytes != 0 && info.capacity != bytes / 512 {
        problems.push(format!(
            "capacity {} sectors, expected {}",
            info.capacity,
            bytes / 512
        ));
    }
    if info.read_only != (test == "ro") {
        problems.push(format!("read_only={}", info.read_only));
    }
    report::stat("blk.capacity", info.capacity);
    report::stat("blk.seg_max", info.seg_max.unwrap_or(0));
    report::stat("blk.max_segments", disk.drv.max_segments(0).unwrap_or(0));
    report::stat("blk.queue_depth", disk.drv.queue_depth(0).unwrap_or(0));
    report::stat("blk.features", format!("{:#x}", f.bits()));
    let ok = check!(
        "blk.init",
        problems.is_empty(),
        "{} features {} queues={} capacity={} sectors, seg_max={} flush={} writeback={} \
         discard={} write_zeroes={}{}{}",
        Irq(mode),
        FeatureSet(DeviceType::Block, f.bits()),
        disk.drv.num_queues(),
        info.capacity,
        Opt(info.seg_max),
        yes_no(info.flush),
        yes_no(info.writeback),
        Opt(info.discard.map(Limits)),
        Opt(info.write_zeroes.map(Limits)),
        notes.iter().map(|n| format!("; {n}")).collect::<String>(),
        problems
            .iter()
            .map(|p| format!("; {p}"))
            .collect::<String>(),
    );
    // GET_ID, on every queue.
    let serial = env.cmdline.get("blk_serial").unwrap_or("");
    let mut ids = Vec::new();
    for q in 0..disk.drv.num_queues() {
        match disk.sync(q, Request::GetId) {
            Ok(Completion::Id(id)) => ids.push(String::from_utf8_lossy(id.as_bytes()).into_owned()),
            Ok(_) => ids.push("(not an ID completion)".into()),
            Err(e) => ids.push(format!("error: {e}")),
        }
    }
    check!(
        "blk.get_id",
        ids.iter().all(|i| i == serial),
        "\"{}\" (serial \"{serial}\")",
        ids.join("\", \"")
    );
    ok
}

// ---- staging buffers and the request pipeline ----

/// DMA staging buffers, one per request in flight.
struct Slots(Vec<DmaRegion>);

impl Slots {
    fn new() -> Self {
        Slots(
            (0..SLOTS)
                .map(|_| {
                    GuestDma
                        .alloc_coherent(SLOT_BYTES, 4096)
                        .expect("staging buffers")
                })
                .collect(),
        )
    }

    #[allow(clippy::mut_from_ref)] // DMA memory: the device writes it too
    fn bytes(&self, slot: usize, off: usize, len: usize) -> &mut [u8] {
        let p = self.0[slot].ptr_at(off, len).expect("inside the slot");
        // SAFETY: inside a region we own; the request using it is not in flight (it was
        // not submitted yet, or it completed).
        unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) }
    }

    fn daddr(&self, slot: usize, off: usize) -> u64 {
        self.0[slot].daddr + off as u64
    }

    fn free(self) {
        for r in self.0 {
            // SAFETY: the device was reset (the driver was dropped) before this.
            unsafe { GuestDma.free_coherent(r) };
        }
    }
}

/// How a request's data is laid out in memory.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// One segment.
    Whole,
    /// Cut at 4 KiB memory boundaries (contiguous).
    Pages,
    /// 512-byte segments with 64-byte gaps: many segments, beyond `seg_max`.
    Sectors,
    /// Lengths that are not multiples of 512 (700, 1348, 100, 2948, 4120 ...), 8-byte gaps.
    Irregular,
}

const SHAPES: [Shape; 4] = [Shape::Whole, Shape::Pages, Shape::Sectors, Shape::Irregular];
const SIZES: [u64; 12] = [1, 8, 3, 64, 129, 256, 17, 2048, 512, 1000, 2, 1536];
const MEM_OFFSETS: [usize; 5] = [0, 8, 512, 3000, 4088];

#[derive(Copy, Clone, Debug)]
struct Job {
    sector: u64,
    sectors: u64,
    shape: Shape,
    mem_off: usize,
    queue: u16,
}

impl Job {
    /// (offset in the slot, length) of each data segment.
    fn pieces(&self) -> Vec<(usize, usize)> {
        let total = self.sectors as usize * SECTOR;
        let mut out = Vec::new();
        let (mut off, mut left) = (self.mem_off, total);
        match self.shape {
            Shape::Whole => out.push((off, total)),
            Shape::Pages => {
                while left > 0 {
                    let n = (4096 - off % 4096).min(left);
                    out.push((off, n));
                    off += n;
                    left -= n;
                }
            }
            Shape::Sectors => {
                while left > 0 {
                    out.push((off, SECTOR));
                    off += SECTOR + 64;
                    left -= SECTOR;
                }
            }
            Shape::Irregular => {
                let lens = [700, 1348, 100, 2948, 4120];
                let mut i = 0;
                while left > 0 {
                    let n = lens[i % lens.len()].min(left);
                    out.push((off, n));
                    off += n + 8;
                    left -= n;
                    i += 1;
                }
            }
        }
        out
    }

    fn halves(&self) -> Option<(Job, Job)> {
        if self.sectors < 2 {
            return None;
        }
        let a = self.sectors / 2;
        Some((
            Job {
                sectors: a,
                ..*self
            },
            Job {
                sector: self.sector + a,
                sectors: self.sectors - a,
                ..*self
            },
        ))
    }
}

/// Requests covering `[start, end)` with cycling sizes, shapes and memory offsets
/// (`rot` shifts the cycle so another pass has other boundaries), round-robin over queues.
fn schedule(start: u64, end: u64, rot: usize, queues: u16) -> VecDeque<Job> {
    let mut jobs = VecDeque::new();
    let (mut s, mut i) = (start, 0usize);
    while s < end {
        let n = SIZES[(i + rot) % SIZES.len()].min(end - s);
        jobs.push_back(Job {
            sector: s,
            sectors: n,
            shape: SHAPES[(i + i / SIZES.len() + rot) % SHAPES.len()],
            mem_off: MEM_OFFSETS[(i + rot) % MEM_OFFSETS.len()],
            queue: (i % usize::from(queues.max(1))) as u16,
        });
        s += n;
        i += 1;
    }
    jobs
}

#[derive(Copy, Clone, Debug, Default)]
struct PassStats {
    requests: u64,
    sectors: u64,
    too_large: u64,
    queue_full: u64,
    max_in_flight: usize,
    ns: u64,
}

/// Checks one sector read back: `Err` describes a mismatch.
type SectorCheck = dyn Fn(u64, &[u8]) -> Result<(), String>;

/// What a pass does with its data.
enum Data<'a> {
    /// Write the pattern of this seed.
    Write(u64),
    /// Read and check each sector with `f(sector, bytes)` (an error describes a mismatch).
    Read(&'a SectorCheck),
}

/// Runs `jobs` with up to `SLOTS` requests in flight, one kick per queue per batch.
fn pass(
    disk: &mut Disk,
    slots: &Slots,
    jobs: VecDeque<Job>,
    data: Data<'_>,
) -> Result<PassStats, String> {
    pass_with_suspend(disk, slots, jobs, data, None)
}

/// A suspend and resume in the middle of a pass, and what it did.
struct SuspendStep {
    /// Suspend once this many sectors were submitted (and requests are in flight).
    at_sectors: u64,
    /// Polls `suspend` gives the requests in flight.
    drain_polls: u32,
    done: bool,
    in_flight: usize,
    completed: usize,
    aborted: usize,
    /// A request submitted while suspended was refused with `QueueFull` (held), and
    /// completed when submitted again after the resume.
    held: bool,
    held_then: Option<Result<Completion, String>>,
    resumed: Option<ResumeReport>,
    ns: u64,
}

impl SuspendStep {
    fn new(at_sectors: u64, drain_polls: u32) -> Self {
        SuspendStep {
            at_sectors,
            drain_polls,
            done: false,
            in_flight: 0,
            completed: 0,
            aborted: 0,
            held: false,
            held_then: None,
            resumed: None,
            ns: 0,
        }
    }

    /// Suspends (the device is reset), submits a flush (GET_ID without FLUSH), which must
    /// be refused and is held, resumes, submits the held request again and waits for it,
    /// and puts every aborted request back at the front of `jobs` (its staging slot back
    /// in `free`); requests that completed go to `disk.done` as usual.
    fn run(
        &mut self,
        disk: &mut Disk,
        jobs: &mut VecDeque<Job>,
        inflight: &mut BTreeMap<usize, (Job, usize)>,
        free: &mut Vec<usize>,
    ) -> Result<(), String> {
        self.done = true;
        self.in_flight = inflight.len();
        let t0 = crate::time::now_ns();
        let mut finished: Vec<(usize, disk::Outcome)> = Vec::new();
        let s = disk
            .drv
            .suspend(self.drain_polls, |t, r| finished.push((t, r)))
            .map_err(|e| format!("suspend: {e}"))?;
        let held = if disk.drv.info().flush {
            Request::Flush
        } else {
            Request::GetId
        };
        let token = disk.token();
        self.held = disk.drv.submit(0, held, token) == Err(BlkError::QueueFull);
        let resumed = disk.drv.resume().map_err(|e| format!("resume: {e}"))?;
        self.ns = crate::time::now_ns() - t0;
        self.resumed = Some(resumed);
        self.held_then = Some(disk.sync(0, held));
        if finished.len() != self.in_flight || s.completed + s.aborted != self.in_flight {
            return Err(format!(
                "suspend handed back {} of {} requests in flight ({s:?})",
                finished.len(),
                self.in_flight
            ));
        }
        for (token, result) in finished {
            if result == Err(BlkError::Aborted) {
                let (job, slot) = inflight
                    .remove(&token)
                    .ok_or_else(|| format!("aborted unknown token {token}"))?;
                free.push(slot);
                jobs.push_front(job);
                self.aborted += 1;
            } else {
                self.completed += 1;
                disk.done.push((token, result));
            }
        }
        Ok(())
    }

    /// `blk.suspend.<phase>` and its stats.
    fn report(&self, phase: &str, features_before: u64) {
        let name = format!("blk.suspend.{phase}");
        let Some(r) = self.resumed else {
            check!(&name, false, "the pass never suspended");
            return;
        };
        let held_ok = self.held && matches!(self.held_then, Some(Ok(_)));
        check!(
            &name,
            held_ok && r.features.bits() == features_before,
            "device reset with {} requests in flight: {} completed, {} aborted and \
             resubmitted; a submission while suspended held: {}, then {}; resumed with {}, \
             {} queues, capacity {} (changed: {}); {} ms",
            self.in_flight,
            self.completed,
            self.aborted,
            yes_no(self.held),
            self.held_then
                .as_ref()
                .map_or_else(|| "not completed".into(), completed),
            if r.features.bits() == features_before {
                format!(
                    "the same features {}",
                    FeatureSet(DeviceType::Block, features_before)
                )
            } else {
                format!(
                    "features {}, not the {} it had",
                    FeatureSet(DeviceType::Block, r.features.bits()),
                    FeatureSet(DeviceType::Block, features_before)
                )
            },
            r.queues,
            r.capacity,
            yes_no(r.capacity_changed),
            self.ns / 1_000_000
        );
        report::stat(&format!("{name}.in_flight"), self.in_flight);
        report::stat(&format!("{name}.completed"), self.completed);
        report::stat(&format!("{name}.aborted"), self.aborted);
    }
}

/// [`pass`], suspending and resuming the driver once in the middle when `suspend` says.
fn pass_with_suspend(
    disk: &mut Disk,
    slots: &Slots,
    mut jobs: VecDeque<Job>,
    data: Data<'_>,
    mut suspend: Option<&mut SuspendStep>,
) -> Result<PassStats, String> {
    let mut st = PassStats::default();
    let t0 = crate::time::now_ns();
    let mut free: Vec<usize> = (0..SLOTS).rev().collect();
    let mut inflight: BTreeMap<usize, (Job, usize)> = BTreeMap::new();
    let mut tmp = vec![0u8; MAX_JOB_SECTORS as usize * SECTOR];
    let mut first_error: Option<String> = None;
    loop {
        // Submit while there are buffers and room.
        let mut kick = [false; 128];
        while let (Some(&job), Some(&slot)) = (jobs.front(), free.last()) {
            let pieces = job.pieces();
            let bytes = job.sectors as usize * SECTOR;
            if let Data::Write(seed) = data {
                pattern::fill(seed, job.sector, &mut tmp[..bytes]);
                let mut at = 0;
                for &(off, len) in &pieces {
                    slots
                        .bytes(slot, off, len)
                        .copy_from_slice(&tmp[at..at + len]);
                    at += len;
                }
            } else {
                for &(off, len) in &pieces {
                    slots.bytes(slot, off, len).fill(0xA5);
                }
            }
            let segs: Vec<Segment> = pieces
                .iter()
                .map(|&(off, len)| Segment::new(slots.daddr(slot, off), len as u32))
                .collect();
            let req = match data {
                Data::Write(_) => Request::Write {
                    sector: job.sector,
                    buffers: &segs,
                },
                Data::Read(_) => Request::Read {
                    sector: job.sector,
                    buffers: &segs,
                },
            };
            let token = disk.token();
            match disk.drv.submit(job.queue, req, token) {
                Ok(()) => {
                    jobs.pop_front();
                    free.pop();
                    inflight.insert(token, (job, slot));
                    kick[usize::from(job.queue)] = true;
                    st.requests += 1;
                    st.sectors += job.sectors;
                    st.max_in_flight = st.max_in_flight.max(inflight.len());
                }
                Err(BlkError::QueueFull) if !inflight.is_empty() => {
                    st.queue_full += 1;
                    break;
                }
                Err(BlkError::TooLarge) => {
                    // More device requests than the queue can ever hold: the caller splits.
                    let (a, b) = job
                        .halves()
                        .ok_or_else(|| format!("one sector is TooLarge: {job:?}"))?;
                    jobs.pop_front();
                    jobs.push_front(b);
                    jobs.push_front(a);
                    st.too_large += 1;
                }
                Err(e) => return Err(format!("submit {job:?} ({} segments): {e}", segs.len())),
            }
        }
        for (q, k) in kick.iter().enumerate() {
            if *k {
                disk.drv.kick(q as u16).map_err(|e| format!("kick: {e}"))?;
            }
        }
        if let Some(step) = suspend.as_deref_mut()
            && !step.done
            && st.sectors >= step.at_sectors
            && !inflight.is_empty()
        {
            // Aborted requests are back in `jobs`: submit them again first.
            step.run(disk, &mut jobs, &mut inflight, &mut free)?;
            continue;
        }
        if inflight.is_empty() {
            if jobs.is_empty() {
                break;
            }
            return Err(format!("cannot submit {:?}", jobs.front()));
        }
        if !disk
            .wait_until(10_000, |d| !d.done.is_empty())
            .map_err(|e| format!("service: {e}"))?
        {
            return Err(format!(
                "{} requests did not complete in 10 s",
                inflight.len()
            ));
        }
        let done: Vec<_> = disk.done.drain(..).collect();
        for (token, result) in done {
            let Some((job, slot)) = inflight.remove(&token) else {
                return Err(format!("completion for unknown token {token}"));
            };
            free.push(slot);
            if let Err(e) = result {
                first_error.get_or_insert(format!("{job:?}: {e}"));
                continue;
            }
            if let Data::Read(check) = &data {
                let bytes = job.sectors as usize * SECTOR;
                let mut at = 0;
                for (off, len) in job.pieces() {
                    tmp[at..at + len].copy_from_slice(slots.bytes(slot, off, len));
                    at += len;
                }
                for i in 0..job.sectors {
                    let b = &tmp[i as usize * SECTOR..(i as usize + 1) * SECTOR];
                    if let Err(e) = check(job.sector + i, b) {
                        first_error
                            .get_or_insert(format!("{job:?}: sector {}: {e}", job.sector + i));
                        break;
                    }
                }
                let _ = bytes;
            }
        }
    }
    st.ns = crate::time::now_ns() - t0;
    match first_error {
        Some(e) => Err(e),
        None => Ok(st),
    }
}

fn describe(st: &PassStats) -> String {
    format!(
        "{} requests, {} KiB, {} TooLarge splits, {} QueueFull, max {} in flight, {} ms",
        st.requests,
        st.sectors / 2,
        st.too_large,
        st.queue_full,
        st.max_in_flight,
        st.ns / 1_000_000
    )
}

fn check_pattern(seed: u64) -> impl Fn(u64, &[u8]) -> Result<(), String> {
    move |sector, b| match pattern::mismatch(seed, sector, b) {
        None => Ok(()),
        Some(off) => Err(format!("byte {off} is {:#04x}", b[off])),
    }
}

fn flush(disk: &mut Disk, name: &str) -> bool {
    let r = disk.sync(0, Request::Flush);
    check!(name, r.is_ok(), "flush: {}", completed(&r))
}

/// A completion for a report: `done`, or what it carried.
fn completion_text(c: &Completion) -> String {
    match c {
        Completion::Done => "done".into(),
        Completion::Id(id) => format!("ID \"{}\"", String::from_utf8_lossy(id.as_bytes())),
        Completion::Lifetime(_) => "lifetime answer".into(),
    }
}

/// A synchronous request's outcome for a report: `done`, the ID, or `error: <why>`.
fn completed(r: &Result<Completion, String>) -> String {
    match r {
        Ok(c) => completion_text(c),
        Err(e) => format!("error: {e}"),
    }
}

/// What the device answered to one request: `done`, or `error: <the device's status>`.
fn outcome_text(o: &disk::Outcome) -> String {
    match o {
        Ok(c) => completion_text(c),
        Err(e) => format!("error: {e}"),
    }
}

/// A request submitted and waited for: the device's answer, or why there was none.
fn sync_text(r: &Result<disk::Outcome, String>) -> String {
    r.as_ref()
        .map_or_else(|e| format!("not completed: {e}"), outcome_text)
}

/// A sector list for a report: `77, 4000`.
fn sector_list(sectors: &[u64]) -> String {
    let list: Vec<String> = sectors.iter().map(|s| format!("{s}")).collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// A refused-or-done request without a value: `done`, or `error: <why>`.
fn refused_text(r: &Result<(), BlkError>) -> String {
    match r {
        Ok(()) => "done".into(),
        Err(e) => format!("error: {e}"),
    }
}

/// Sector ranges for a report: `1024+2048, 9000+8`.
fn sector_ranges(ranges: &[(u64, u64)]) -> String {
    ranges
        .iter()
        .map(|(s, n)| format!("{s}+{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- main ----

fn ranges(list: &[(u64, u64)]) -> Vec<SectorRange> {
    list.iter().map(|&(s, n)| SectorRange::new(s, n)).collect()
}

fn test_main(disk: &mut Disk, slots: &mut Slots, seed: u64, suspend: Option<u32>) {
    let capacity = disk.drv.info().capacity;
    let nq = disk.drv.num_queues();
    let features = disk.drv.features().bits();
    let mut suspends = 0;
    let c0 = disk.counters();
    let mut step = suspend.map(|drain| SuspendStep::new(capacity / 2, drain));
    let r = pass_with_suspend(
        disk,
        slots,
        schedule(0, capacity, 0, nq),
        Data::Write(seed),
        step.as_mut(),
    );
    if let Some(step) = &step {
        step.report("write", features);
        suspends += u64::from(step.done);
    }
    let c1 = disk.counters() - c0;
    match &r {
        Ok(st) => {
            report::stat("blk.write.too_large_splits", st.too_large);
            report::stat("blk.write.device_requests", c1.added);
            report::stat("blk.write.requests", st.requests);
            check!(
                "blk.write",
                true,
                "{}; {} device requests, {} kicks",
                describe(st),
                c1.added,
                c1.kicks
            )
        }
        Err(e) => check!("blk.write", false, "{e}"),
    };
    flush(disk, "blk.flush");
    // The verify pass gives the requests in flight time to complete (bounded).
    let mut step = suspend.map(|_| SuspendStep::new(capacity / 2, 100_000_000));
    let r = pass_with_suspend(
        disk,
        slots,
        schedule(0, capacity, 5, nq),
        Data::Read(&check_pattern(seed)),
        step.as_mut(),
    );
    if let Some(step) = &step {
        step.report("verify", features);
        suspends += u64::from(step.done);
    }
    report::stat("blk.suspends", suspends);
    match &r {
        Ok(st) => check!("blk.verify", true, "{}", describe(st)),
        Err(e) => check!("blk.verify", false, "{e}"),
    };

    // Discard and write zeroes, then read the ranges (and their neighbours) back.
    let info = *disk.drv.info();
    let d = disk.sync(
        0,
        Request::Discard {
            ranges: &ranges(pattern::DISCARD),
        },
    );
    check!(
        "blk.discard",
        d.is_ok(),
        "sectors {} (limits: {}): {}",
        sector_ranges(pattern::DISCARD),
        Opt(info.discard.map(Limits)),
        completed(&d)
    );
    let w1 = disk.sync(
        nq - 1,
        Request::WriteZeroes {
            ranges: &ranges(pattern::WRITE_ZEROES),
            unmap: false,
        },
    );
    let w2 = disk.sync(
        0,
        Request::WriteZeroes {
            ranges: &ranges(pattern::WRITE_ZEROES_UNMAP),
            unmap: true,
        },
    );
    check!(
        "blk.write_zeroes",
        w1.is_ok() && w2.is_ok(),
        "limits: {}, may unmap {}: {}, with unmap {}",
        Opt(info.write_zeroes.map(Limits)),
        yes_no(info.write_zeroes_may_unmap),
        completed(&w1),
        completed(&w2)
    );
    flush(disk, "blk.flush2");
    let mut jobs = VecDeque::new();
    for &(s, n) in pattern::DISCARD
        .iter()
        .chain(pattern::WRITE_ZEROES)
        .chain(pattern::WRITE_ZEROES_UNMAP)
    {
        let start = s.saturating_sub(8);
        let end = (s + n + 8).min(capacity);
        jobs.extend(schedule(start, end, 3, nq));
    }
    let check = move |sector: u64, b: &[u8]| {
        if pattern::zeroed(sector) {
            match b.iter().position(|&x| x != 0) {
                None => Ok(()),
                Some(i) => Err(format!("not zeroed: byte {i} is {:#04x}", b[i])),
            }
        } else {
            check_pattern(seed)(sector, b)
        }
    };
    let r = pass(disk, slots, jobs, Data::Read(&check));
    match &r {
        Ok(st) => check!(
            "blk.zeroes",
            true,
            "ranges read back as zeros, neighbours intact; {}",
            describe(st)
        ),
        Err(e) => check!("blk.zeroes", false, "{e}"),
    };
}

// ---- read-only ----

fn test_ro(disk: &mut Disk, slots: &mut Slots) {
    let capacity = disk.drv.info().capacity;
    let nq = disk.drv.num_queues();
    let seg = [Segment::new(slots.daddr(0, 0), 4096)];
    let before = disk.counters();
    let w = disk.drv.submit(
        0,
        Request::Write {
            sector: 8,
            buffers: &seg,
        },
        1,
    );
    let d = disk.drv.submit(
        0,
        Request::Discard {
            ranges: &[SectorRange::new(0, 8)],
        },
        2,
    );
    let z = disk.drv.submit(
        0,
        Request::WriteZeroes {
            ranges: &[SectorRange::new(0, 8)],
            unmap: false,
        },
        3,
    );
    let after = disk.counters();
    let refused = |r: &Result<(), BlkError>| {
        matches!(r, Err(BlkError::ReadOnly) | Err(BlkError::Unsupported))
    };
    check!(
        "blk.ro.refused",
        w == Err(BlkError::ReadOnly) && refused(&d) && refused(&z) && after.added == before.added,
        "write {}, discard {}, write_zeroes {}; chains added {}",
        refused_text(&w),
        refused_text(&d),
        refused_text(&z),
        after.added - before.added
    );
    let initial = |sector: u64, b: &[u8]| {
        if pattern::initial_ok(sector, b) {
            Ok(())
        } else {
            Err(format!("unexpected {:02x?}", &b[..16]))
        }
    };
    let r = pass(
        disk,
        slots,
        schedule(0, capacity, 1, nq),
        Data::Read(&initial),
    );
    match &r {
        Ok(st) => check!(
            "blk.ro.read",
            true,
            "whole disk matches the image; {}",
            describe(st)
        ),
        Err(e) => check!("blk.ro.read", false, "{e}"),
    };
}

// ---- faults ----

fn list(env: &Env, key: &str) -> Vec<u64> {
    env.cmdline
        .get(key)
        .unwrap_or("")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn test_fault(env: &Env, disk: &mut Disk, slots: &mut Slots, seed: u64) {
    let bad_r = list(env, "blk_bad_read");
    let bad_w = list(env, "blk_bad_write");
    let nq = disk.drv.num_queues();
    let covers = |bad: &[u64], s: u64, n: u64| bad.iter().any(|&b| b >= s && b < s + n);
    let initial = |sector: u64, b: &[u8]| {
        if pattern::initial_ok(sector, b) {
            Ok(())
        } else {
            Err(format!("unexpected {:02x?}", &b[..16]))
        }
    };
    // One at a time: reads around each bad sector.
    let mut log = Vec::new();
    let mut ok = true;
    for &b in &bad_r {
        for (s, n) in [
            (b.saturating_sub(4), 8),
            (b + 8, 8),
            (b, 1),
            (b.saturating_sub(1), 1),
        ] {
            let seg = [Segment::new(slots.daddr(0, 0), (n * 512) as u32)];
            let r = disk.sync_result(
                0,
                Request::Read {
                    sector: s,
                    buffers: &seg,
                },
            );
            let want_fail = covers(&bad_r, s, n);
            let good = match &r {
                Ok(Err(BlkError::Io)) => want_fail,
                Ok(Ok(_)) => {
                    !want_fail
                        && (0..n)
                            .all(|i| initial(s + i, slots.bytes(0, i as usize * 512, 512)).is_ok())
                }
                _ => false,
            };
            ok &= good;
            log.push(format!("read {s}+{n}: {}", sync_text(&r)));
        }
    }
    check!(
        "blk.fault.read",
        ok,
        "bad sectors {}: {}",
        sector_list(&bad_r),
        log.join(", ")
    );

    let mut log = Vec::new();
    let mut ok = true;
    for &b in &bad_w {
        for (s, n) in [(b, 8), (b + 16, 8)] {
            pattern::fill(seed, s, slots.bytes(0, 0, n as usize * 512));
            let seg = [Segment::new(slots.daddr(0, 0), (n * 512) as u32)];
            let r = disk.sync_result(
                0,
                Request::Write {
                    sector: s,
                    buffers: &seg,
                },
            );
            let want_fail = covers(&bad_w, s, n);
            ok &= matches!(
                (&r, want_fail),
                (Ok(Err(BlkError::Io)), true) | (Ok(Ok(_)), false)
            );
            log.push(format!("write {s}+{n}: {}", sync_text(&r)));
        }
    }
    check!(
        "blk.fault.write",
        ok,
        "bad sectors {}: {}",
        sector_list(&bad_w),
        log.join(", ")
    );

    // One batch, one kick: non-adjacent reads (QEMU merges adjacent ones), a multi-part
    // request (512-byte segments beyond seg_max) covering a bad sector among them.
    let mut batch: Vec<(usize, u64, u64, bool)> = Vec::new();
    let mut s = 64;
    let mut i = 0;
    while batch.len() < SLOTS - 1 && s + 16 < disk.drv.info().capacity {
        let n = 8;
        let want_fail = covers(&bad_r, s, n);
        let seg = [Segment::new(slots.daddr(i, 0), 4096)];
        let t = disk.token();
        match disk.drv.submit(
            0,
            Request::Read {
                sector: s,
                buffers: &seg,
            },
            t,
        ) {
            Ok(()) => batch.push((t, s, n, want_fail)),
            Err(e) => {
                check!("blk.fault.batch", false, "submit: {e}");
                return;
            }
        }
        // Next: jump to just before the next bad sector if any is ahead, else stride.
        s = bad_r
            .iter()
            .copied()
            .filter(|&b| b > s + 16)
            .map(|b| b - 3)
            .min()
            .unwrap_or(s + 64)
            .max(s + 24);
        i += 1;
    }
    let big_at = bad_r.first().copied().unwrap_or(100).saturating_sub(700);
    let big = Job {
        sector: big_at,
        sectors: 1024,
        shape: Shape::Sectors,
        mem_off: 0,
        queue: 0,
    };
    let segs: Vec<Segment> = big
        .pieces()
        .iter()
        .map(|&(off, len)| Segment::new(slots.daddr(SLOTS - 1, off), len as u32))
        .collect();
    let tb = disk.token();
    let big_r = disk.drv.submit(
        0,
        Request::Read {
            sector: big_at,
            buffers: &segs,
        },
        tb,
    );
    let _ = disk.drv.kick(0);
    let tokens: Vec<usize> = batch.iter().map(|b| b.0).chain(Some(tb)).collect();
    let all = disk.wait_until(10_000, |d| {
        tokens.iter().all(|t| d.done.iter().any(|(x, _)| x == t))
    });
    let mut ok = big_r.is_ok() && matches!(all, Ok(true));
    let mut log = Vec::new();
    for &(t, s, n, want_fail) in &batch {
        let r = disk.take(t);
        let good = match &r {
            Some(Err(BlkError::Io)) => want_fail,
            Some(Ok(_)) => !want_fail,
            _ => false,
        };
        ok &= good;
        if want_fail || !good {
            log.push(format!(
                "{s}+{n}: {}",
                r.as_ref()
                    .map_or_else(|| "no completion".into(), outcome_text)
            ));
        }
    }
    let rb = disk.take(tb);
    let big_fail = covers(&bad_r, big_at, 1024);
    ok &= matches!(
        (&rb, big_fail),
        (Some(Err(BlkError::Io)), true) | (Some(Ok(_)), false)
    );
    let leaked = disk.drv.in_flight(0).unwrap_or(99);
    ok &= leaked == 0;
    check!(
        "blk.fault.batch",
        ok,
        "{} reads in one batch, failed as expected: [{}]; {}-part read {big_at}+1024: {}; \
         in flight after: {leaked}",
        batch.len(),
        log.join(", "),
        segs.len()
            .div_ceil(disk.drv.max_segments(0).unwrap_or(1).max(1)),
        rb.as_ref()
            .map_or_else(|| "no completion".into(), outcome_text)
    );

    // The driver still works: a pass over a stretch without bad sectors, written and read.
    let mut area = (3000u64, 1024u64);
    while covers(&bad_r, area.0, area.1) || covers(&bad_w, area.0, area.1) {
        area.0 += 1024;
    }
    let w = pass(
        disk,
        slots,
        schedule(area.0, area.0 + area.1, 2, nq),
        Data::Write(seed),
    );
    let f = disk.sync(0, Request::Flush);
    let r = pass(
        disk,
        slots,
        schedule(area.0, area.0 + area.1, 7, nq),
        Data::Read(&check_pattern(seed)),
    );
    report::stat("blk.fault.area", area.0);
    check!(
        "blk.fault.after",
        w.is_ok() && f.is_ok() && r.is_ok(),
        "sectors {}+{}: write {}, flush {}, read {}",
        area.0,
        area.1,
        w.as_ref().map_or_else(|e| format!("error: {e}"), describe),
        completed(&f),
        r.as_ref().map_or_else(|e| format!("error: {e}"), describe)
    );
}

// ---- durability ----

fn test_durable(env: &Env, disk: &mut Disk, slots: &mut Slots, seed: u64) {
    let kill = env.cmdline.get_u64("blk_kill", 0);
    let nq = disk.drv.num_queues();
    for k in 1..=DURABLE_ROUNDS {
        let (s, n) = durable_area(k);
        let w = pass(
            disk,
            slots,
            schedule(s, s + n, k as usize, nq),
            Data::Write(seed + k),
        );
        if let Err(e) = &w {
            check!("blk.durable.write", false, "round {k}: {e}");
            return;
        }
        if !flush(disk, &format!("blk.durable.flush{k}")) {
            return;
        }
        report::stat("blk.durable.flushed", k);
        if k == kill {
            // Keep the device busy with unflushed writes to the next area until killed.
            let (s2, n2) = if k < DURABLE_ROUNDS {
                durable_area(k + 1)
            } else {
                (DURABLE_FIRST + DURABLE_ROUNDS * DURABLE_AREA, DURABLE_AREA)
            };
            let t0 = crate::time::now_ns();
            while crate::time::now_ns() - t0 < 30_000_000_000 {
                let _ = pass(
                    disk,
                    slots,
                    schedule(s2, s2 + n2, 0, nq),
                    Data::Write(seed + k + 1),
                );
            }
            check!(
                "blk.durable.killed",
                false,
                "not killed 30 s after flush {k}"
            );
            return;
        }
    }
    check!(
        "blk.durable",
        true,
        "{DURABLE_ROUNDS} rounds written and flushed"
    );
}

// ---- benchmark (our driver) ----

/// Marks phase boundaries for QEMU's trace and the instruction-counting plugin
/// ([`crate::phase_marker`]): `0x10 + phase` starts a phase, `0x20 + phase` ends it.
pub fn marker(v: u8) {
    crate::phase_marker::bench_phase_marker(v);
}

/// The benchmark phases: (name, bytes per request, queue depth, random).
pub const PHASES: [(&str, u64, usize, bool); 3] = [
    ("rand4k_qd1", 4096, 1, true),
    ("rand4k_qd32", 4096, 32, true),
    ("seq64k_qd1", 65536, 1, false),
];

/// The scatter-gather phases, our driver only: (name, bytes per request). Sequential
/// reads at depth 1, each request [`SG_SEGMENT`]-byte segments on every other page of one
/// buffer. Their markers follow those of [`PHASES`]: phase `PHASES.len() + i` (0x13..0x16 start,
/// 0x23..0x26 end), so the first three phases keep their numbers.
pub const SG_PHASES: [(&str, u64); 4] = [
    ("sg16k_qd1", 16 << 10),
    ("sg64k_qd1", 64 << 10),
    ("sg256k_qd1", 256 << 10),
    ("sg1m_qd1", 1 << 20),
];
/// Bytes per scatter-gather segment.
pub const SG_SEGMENT: u64 = 4096;
/// Why `bench-blk-vd` skips the scatter-gather phases.
pub const SG_NOT_IN_VD: &str = "virtio-drivers 0.13 has no scatter-gather API: \
     VirtIOBlk::read_blocks_nb takes one contiguous buffer per request";

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

pub fn bench(env: &mut Env) {
    let Some(func) = env.find_virtio(virtio_core::DeviceType::Block).cloned() else {
        check!("bench.present", false, "no virtio-blk on the bus");
        return;
    };
    let opts = BlkOptions {
        interrupts: env.irq != IrqMode::Poll,
        ..BlkOptions::default()
    };
    let mut disk = match disk::open(env, &func, opts, Features::empty()) {
        Ok(d) => d,
        Err(e) => {
            check!("bench.init", false, "{e}");
            return;
        }
    };
    let ms = env.cmdline.get_u64("bench_ms", 2000);
    let info = *disk.drv.info();
    check!(
        "bench.init",
        true,
        "{} features {} capacity={} depth={}",
        Irq(disk.irq().mode()),
        FeatureSet(DeviceType::Block, disk.drv.features().bits()),
        info.capacity,
        disk.drv.queue_depth(0).unwrap_or(0)
    );
    let bufs = GuestDma
        .alloc_coherent(32 * 65536, 4096)
        .expect("bench buffers");
    for (i, &(name, bytes, depth, random)) in PHASES.iter().enumerate() {
        marker(0x10 + i as u8);
        let r = bench_phase(&mut disk, &bufs, bytes, depth, random, ms);
        marker(0x20 + i as u8);
        match r {
            Ok((reqs, ns, c)) => {
                report::stat(&format!("bench.{name}.reqs"), reqs);
                report::stat(&format!("bench.{name}.ns"), ns);
                report::stat(&format!("bench.{name}.depth"), depth);
                report::stat(&format!("bench.{name}.bytes"), bytes);
                report::stat(&format!("bench.{name}.kicks"), c.kicks);
                report::stat(&format!("bench.{name}.irqs"), c.irqs);
                report::stat(&format!("bench.{name}.device_requests"), c.added);
                check!(
                    &format!("bench.{name}"),
                    reqs > 0 && c.completions == reqs,
                    "{reqs} requests in {} ms: {} IOPS, {:.3} kicks and {:.3} interrupts per request",
                    ns / 1_000_000,
                    reqs * 1_000_000_000 / ns.max(1),
                    c.kicks as f64 / reqs.max(1) as f64,
                    c.irqs as f64 / reqs.max(1) as f64
                );
            }
            Err(e) => {
                check!(&format!("bench.{name}"), false, "{e}");
            }
        }
    }
    bench_sg(&mut disk, ms);
    let c = disk.counters();
    super::device_stats("blk", c.kicks, c.completions, disk.irq());
    drop(disk);
    // SAFETY: the driver (and with it the device) was reset by the drop above.
    unsafe { GuestDma.free_coherent(bufs) };
}

/// The scatter-gather phases ([`SG_PHASES`]). Per phase, besides the stats of the other
/// phases: `segments` (per caller request), `device_requests` (chains the driver added:
/// more than `reqs` when it split requests) and `completions` (chains completed).
fn bench_sg(disk: &mut Disk, ms: u64) {
    let max_segs = disk.drv.max_segments(0).unwrap_or(0);
    report::stat("bench.sg.max_segments", max_segs);
    let largest = SG_PHASES.iter().map(|p| p.1).max().unwrap_or(0);
    // Every other page: twice the largest request.
    let Ok(buf) = GuestDma.alloc_coherent(2 * largest as usize, 4096) else {
        check!("bench.sg", false, "no {} KiB buffer", (2 * largest) >> 10);
        return;
    };
    for (j, &(name, bytes)) in SG_PHASES.iter().enumerate() {
        let i = (PHASES.len() + j) as u8;
        let segs: Vec<Segment> = (0..bytes / SG_SEGMENT)
            .map(|k| Segment::new(buf.daddr + 2 * k * SG_SEGMENT, SG_SEGMENT as u32))
            .collect();
        marker(0x10 + i);
        let r = bench_sg_phase(disk, &segs, ms);
        marker(0x20 + i);
        match r {
            Ok((reqs, ns, c)) => {
                report::stat(&format!("bench.{name}.reqs"), reqs);
                report::stat(&format!("bench.{name}.ns"), ns);
                report::stat(&format!("bench.{name}.depth"), 1);
                report::stat(&format!("bench.{name}.bytes"), bytes);
                report::stat(&format!("bench.{name}.segments"), segs.len());
                report::stat(&format!("bench.{name}.kicks"), c.kicks);
                report::stat(&format!("bench.{name}.irqs"), c.irqs);
                report::stat(&format!("bench.{name}.device_requests"), c.added);
                report::stat(&format!("bench.{name}.completions"), c.completions);
                // Every chain added completed OK: the driver checked each one's status
                // byte and that its used length covers its data.
                check!(
                    &format!("bench.{name}"),
                    reqs > 0 && c.completions == c.added && c.added >= reqs,
                    "{reqs} reads of {} KiB in {} segments of 4 KiB (none contiguous) in {} ms: \
                     {} IOPS, {:.2} device requests per read (at most {max_segs} segments \
                     each), {} chains added, {} completed",
                    bytes >> 10,
                    segs.len(),
                    ns / 1_000_000,
                    reqs * 1_000_000_000 / ns.max(1),
                    c.added as f64 / reqs.max(1) as f64,
                    c.added,
                    c.completions
                );
            }
            Err(e) => {
                check!(&format!("bench.{name}"), false, "{e}");
            }
        }
    }
    // A failed phase can leave a read in flight: then the buffer stays allocated rather
    // than be freed under the device.
    if disk
        .drv
        .queue_stats(0)
        .is_ok_and(|s| s.added == s.completions)
    {
        // SAFETY: every chain ever added to the queue has completed, so the device no
        // longer writes to the buffer, and no segment list refers to it any more.
        unsafe { GuestDma.free_coherent(buf) };
    }
}

/// One scatter-gather phase: sequential reads of `segs` at depth 1 for `ms` ms. Returns
/// (caller requests, ns, the driver's counters over the phase).
fn bench_sg_phase(
    disk: &mut Disk,
    segs: &[Segment],
    ms: u64,
) -> Result<(u64, u64, Counters), String> {
    let bytes: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let per = bytes / 512;
    let blocks = disk.drv.info().capacity / per;
    let mut seq = 0u64;
    let c0 = disk.counters();
    let t0 = crate::time::now_ns();
    let deadline = t0 + ms * 1_000_000;
    let mut completed = 0u64;
    while crate::time::now_ns() < deadline {
        seq = (seq + 1) % blocks;
        disk.drv
            .submit(
                0,
                Request::Read {
                    sector: seq * per,
                    buffers: segs,
                },
                0,
            )
            .map_err(|e| format!("submit: {e}"))?;
        disk.drv.kick(0).map_err(|e| format!("kick: {e}"))?;
        completed += wait_reads(disk, |_| {})? as u64;
    }
    let ns = crate::time::now_ns() - t0;
    Ok((completed, ns, disk.counters() - c0))
}

/// The benches' wait ([`Disk::wait_completions`]): how many reads completed, at least
/// one, each one's token given to `freed`. A failed read, a driver error or 10 s without a
/// completion ends the phase.
fn wait_reads(disk: &mut Disk, mut freed: impl FnMut(usize)) -> Result<usize, String> {
    let mut failed = None;
    let n = disk
        .wait_completions(10_000, |token, r| {
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
            freed(token);
        })
        .map_err(|e| format!("{e}"))?;
    if let Some(e) = failed {
        return Err(format!("read: {e}"));
    }
    if n == 0 {
        return Err("no completion in 10 s".into());
    }
    Ok(n)
}

fn bench_phase(
    disk: &mut Disk,
    bufs: &DmaRegion,
    bytes: u64,
    depth: usize,
    random: bool,
    ms: u64,
) -> Result<(u64, u64, Counters), String> {
    let per = bytes / 512;
    let blocks = disk.drv.info().capacity / per;
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut seq = 0u64;
    let c0 = disk.counters();
    let t0 = crate::time::now_ns();
    let deadline = t0 + ms * 1_000_000;
    let mut free: Vec<usize> = (0..depth).collect();
    let (mut inflight, mut completed) = (0usize, 0u64);
    loop {
        let open = crate::time::now_ns() < deadline;
        let mut added = false;
        while open && let Some(slot) = free.pop() {
            let block = if random {
                rng.next() % blocks
            } else {
                seq = (seq + 1) % blocks;
                seq
            };
            let seg = [Segment::new(bufs.daddr + slot as u64 * bytes, bytes as u32)];
            disk.drv
                .submit(
                    0,
                    Request::Read {
                        sector: block * per,
                        buffers: &seg,
                    },
                    slot,
                )
                .map_err(|e| format!("submit: {e}"))?;
            inflight += 1;
            added = true;
        }
        if added {
            disk.drv.kick(0).map_err(|e| format!("kick: {e}"))?;
        }
        if inflight == 0 {
            break;
        }
        let n = wait_reads(disk, |slot| free.push(slot))?;
        // Saturating: a read a failed earlier phase left in flight may complete here.
        inflight = inflight.saturating_sub(n);
        completed += n as u64;
    }
    let ns = crate::time::now_ns() - t0;
    Ok((completed, ns, disk.counters() - c0))
}
