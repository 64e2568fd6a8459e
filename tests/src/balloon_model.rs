//! A device-side virtio-balloon for the simulation ([`crate::sim`]), written from the spec
//! (virtio 1.2 §5.5) independently of the driver crate: it keeps the set of 4 KiB frames in
//! the balloon as the inflate/deflate arrays say, checks every rule a driver must follow
//! (no frame inflated twice, no deflate of a frame not in the balloon, at most one stats
//! buffer, 10-byte stats entries with a constant tag set, 4-byte command IDs, hints only
//! inside a round, reports of whole 4 KiB frames), and plays QEMU's side of the stats,
//! free-page-hint and reporting protocols. Breaches go to [`BalloonModel::violations`].
//!
//! Queues are laid out like QEMU's: inflate, deflate, stats (with STATS_VQ), then
//! free_page (FREE_PAGE_HINT), then reporting (PAGE_REPORTING), numbered sequentially over
//! the offered features. It can hold deflate acknowledgements (MUST_TELL_HOST checks), hold
//! reports, and lie about used lengths.

use std::collections::BTreeSet;

use vm_memory::{Bytes, GuestAddress};

use crate::sim::{Chain, Sim, SimBuilder, SimMode};

/// Balloon feature bits (§5.5.3) and the generic bits tests use.
pub mod bits {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    pub const PAGE_POISON: u64 = 1 << 4;
    pub const PAGE_REPORTING: u64 = 1 << 5;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const BAD_FEATURE: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Free page hint command IDs (QEMU starts at 0x8000_0000).
pub const CMD_STOP: u32 = 0;
pub const CMD_DONE: u32 = 1;

/// Which queue is which, for a feature set.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub stats: Option<u16>,
    pub free_page: Option<u16>,
    pub reporting: Option<u16>,
    pub count: u16,
}

impl Layout {
    pub fn for_features(f: u64) -> Self {
        let mut next = 2u16;
        let mut take = |bit: u64| {
            (f & bit != 0).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(bits::STATS_VQ);
        let free_page = take(bits::FREE_PAGE_HINT);
        let reporting = take(bits::PAGE_REPORTING);
        Layout {
            stats,
            free_page,
            reporting,
            count: next,
        }
    }
}

/// Device state of the free page hint protocol (QEMU's `free_page_hint_status`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HintStatus {
    Idle,
    Requested,
    Started,
    Stopped,
    Done,
}

#[derive(Clone, Debug)]
pub struct BalloonModel {
    /// Device-specific bits offered (generic bits are added by `sim_builder`).
    pub features: u64,
    /// Frames in the balloon, as the device knows them.
    pub ballooned: BTreeSet<u32>,
    /// Every inflate / deflate array received, in order.
    pub inflates: Vec<Vec<u32>>,
    pub deflates: Vec<Vec<u32>>,
    /// Hold deflate requests (do not acknowledge) until `release_deflates`.
    pub hold_deflates: bool,
    held_deflates: Vec<u16>,
    /// Hold inflate requests (read, never acknowledged; a reset forgets them).
    pub hold_inflates: bool,
    held_inflates: Vec<u16>,
    /// Statistics buffers received, as (tag, value) lists.
    pub stats: Vec<Vec<(u16, u64)>>,
    stats_held: Option<u16>,
    pub hint_status: HintStatus,
    pub cmd_id: u32,
    /// Command IDs the driver sent, in order.
    pub cmd_ids_received: Vec<u32>,
    /// Ranges hinted while a round was started, (addr, len).
    pub hints: Vec<(u64, u32)>,
    /// Hint buffers that arrived outside a started round (ignored, as QEMU does).
    pub stale_hints: usize,
    /// Report requests: the ranges of each.
    pub reports: Vec<Vec<(u64, u32)>>,
    pub hold_reports: bool,
    held_reports: Vec<u16>,
    /// Hostile: used length for every completion on this queue.
    pub len_override: Option<(u16, u32)>,
    resets_seen: usize,
    pub violations: Vec<String>,
}

impl BalloonModel {
    pub fn new(features: u64) -> Self {
        BalloonModel {
            features,
            ballooned: BTreeSet::new(),
            inflates: Vec::new(),
            deflates: Vec::new(),
            hold_deflates: false,
            held_deflates: Vec::new(),
            hold_inflates: false,
            held_inflates: Vec::new(),
            stats: Vec::new(),
            stats_held: None,
            hint_status: HintStatus::Idle,
            cmd_id: 0,
            cmd_ids_received: Vec::new(),
            hints: Vec::new(),
            stale_hints: 0,
            reports: Vec::new(),
            hold_reports: false,
            held_reports: Vec::new(),
            len_override: None,
            resets_seen: 0,
            violations: Vec::new(),
        }
    }

    pub fn layout(&self) -> Layout {
        Layout::for_features(self.features)
    }

    /// A simulated function (device type 5) with QEMU's queue sizes (128 for the first
    /// three, 1024 free page, 32 reporting) and, like QEMU's balloon, no MSI-X unless
    /// `msix` is set.
    pub fn sim_builder(&self, mode: SimMode, generic: u64, msix: bool) -> SimBuilder {
        let version = if mode == SimMode::Legacy {
            0
        } else {
            bits::VERSION_1
        };
        let l = self.layout();
        let mut sizes = vec![128u16, 128];
        if l.stats.is_some() {
            sizes.push(128);
        }
        if l.free_page.is_some() {
            sizes.push(1024);
        }
        if l.reporting.is_some() {
            sizes.push(32);
        }
        let mut b = SimBuilder::new(mode, 5)
            .features(self.features | generic | version)
            .queues(&sizes)
            .device_config(&[0u8; 16])
            .memory_len(4 << 20);
        if !msix {
            b = b.msix_vectors(0);
        }
        b
    }

    // ---- host-side actions ----

    /// Sets `num_pages` (config change interrupt).
    pub fn set_target(&mut self, sim: &Sim, frames: u32) {
        sim.set_device_config(0, &frames.to_le_bytes());
    }

    /// `actual` as the driver last wrote it.
    pub fn actual(&self, sim: &Sim) -> u32 {
        let c = sim.device_config();
        u32::from_le_bytes(c[4..8].try_into().unwrap())
    }

    /// Asks for fresh statistics: uses the retained stats buffer (QEMU's stats timer).
    /// Returns false if the driver had no buffer available.
    pub fn request_stats(&mut self, sim: &Sim) -> bool {
        let (Some(q), Some(head)) = (self.layout().stats, self.stats_held.take()) else {
            return false;
        };
        sim.complete(q, head, self.len_for(q, 0));
        sim.signal_used(q);
        true
    }

    /// Starts a hinting round with `id` (≥ 2), or sends STOP / DONE.
    pub fn set_cmd_id(&mut self, sim: &Sim, id: u32) {
        self.cmd_id = id;
        self.hint_status = match id {
            CMD_STOP => HintStatus::Stopped,
            CMD_DONE => HintStatus::Done,
            _ => HintStatus::Requested,
        };
        sim.set_device_config(8, &id.to_le_bytes());
    }

    /// Acknowledges the held deflate requests.
    pub fn release_deflates(&mut self, sim: &Sim) {
        let q = 1;
        for head in std::mem::take(&mut self.held_deflates) {
            sim.complete(q, head, self.len_for(q, 0));
        }
        sim.signal_used(q);
    }

    pub fn release_reports(&mut self, sim: &Sim) {
        let Some(q) = self.layout().reporting else {
            return;
        };
        for head in std::mem::take(&mut self.held_reports) {
            sim.complete(q, head, self.len_for(q, 0));
        }
        sim.signal_used(q);
    }

    pub fn held_deflates(&self) -> usize {
        self.held_deflates.len()
    }

    pub fn held_inflates(&self) -> usize {
        self.held_inflates.len()
    }

    /// Heads of the report chains held (not yet used), for hostile completions.
    pub fn held_report_heads(&self) -> &[u16] {
        &self.held_reports
    }

    // ---- serving ----

    fn len_for(&self, queue: u16, normal: u32) -> u32 {
        match self.len_override {
            Some((q, len)) if q == queue => len,
            _ => normal,
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// A device reset (status 0 written) forgets the balloon and the retained buffers.
    fn observe_resets(&mut self, sim: &Sim) {
        // The reset counter, not a scan of the event log (a copy of it per call, which made
        // serving quadratic in the length of a test).
        let resets = usize::try_from(sim.resets()).unwrap_or(usize::MAX);
        if resets != self.resets_seen {
            self.resets_seen = resets;
            self.ballooned.clear();
            self.stats_held = None;
            self.held_deflates.clear();
            self.held_inflates.clear();
            self.held_reports.clear();
            if self.hint_status == HintStatus::Started {
                self.hint_status = HintStatus::Stopped;
            }
        }
    }

    /// Serves every queue; returns the chains consumed.
    pub fn serve(&mut self, sim: &Sim) -> usize {
        self.observe_resets(sim);
        let l = self.layout();
        let mut n = 0;
        for q in 0..l.count {
            let chains = sim.pop_chains(q);
            if chains.is_empty() {
                continue;
            }
            n += chains.len();
            let mut completed = false;
            for c in &chains {
                let done = if q == 0 || q == 1 {
                    self.inflate_deflate(sim, q, c)
                } else if Some(q) == l.stats {
                    self.stats_buffer(sim, c)
                } else if Some(q) == l.free_page {
                    self.free_page(sim, c)
                } else {
                    self.report(sim, q, c)
                };
                if let Some(len) = done {
                    sim.complete(q, c.head, self.len_for(q, len));
                    completed = true;
                }
            }
            if completed {
                sim.signal_used(q);
            }
        }
        n
    }

    fn readable(&mut self, sim: &Sim, c: &Chain, what: &str) -> Vec<u8> {
        if c.descs.iter().any(|d| d.write_only) {
            self.violation(format!("{what}: device-writable descriptor"));
        }
        sim.read_chain(c)
    }

    fn inflate_deflate(&mut self, sim: &Sim, q: u16, c: &Chain) -> Option<u32> {
        let what = if q == 0 { "inflate" } else { "deflate" };
        let bytes = self.readable(sim, c, what);
        if bytes.is_empty() || !bytes.len().is_multiple_of(4) || bytes.len() > 256 * 4 {
            self.violation(format!("{what}: array of {} bytes", bytes.len()));
        }
        let pfns: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for &p in &pfns {
            if q == 0 {
                if !self.ballooned.insert(p) {
                    self.violation(format!("frame {p:#x} inflated twice"));
                }
            } else if !self.ballooned.remove(&p) {
                self.violation(format!("frame {p:#x} deflated but not in the balloon"));
            }
        }
        if q == 0 {
            self.inflates.push(pfns);
            if self.hold_inflates {
                self.held_inflates.push(c.head);
                return None;
            }
        } else {
            self.deflates.push(pfns);
            if self.hold_deflates {
                self.held_deflates.push(c.head);
                return None;
            }
        }
        Some(0)
    }

    fn stats_buffer(&mut self, sim: &Sim, c: &Chain) -> Option<u32> {
        let bytes = self.readable(sim, c, "stats");
        if !bytes.len().is_multiple_of(10) {
            self.violation(format!("stats buffer of {} bytes", bytes.len()));
        }
        let entries: Vec<(u16, u64)> = bytes
            .chunks_exact(10)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u64::from_le_bytes(e[2..10].try_into().unwrap()),
                )
            })
            .collect();
        if let Some(prev) = self.stats.last() {
            let tags = |v: &Vec<(u16, u64)>| v.iter().map(|e| e.0).collect::<Vec<_>>();
            if tags(prev) != tags(&entries) {
                self.violation(format!(
                    "stats tag set changed from {:?} to {:?}",
                    tags(prev),
                    tags(&entries)
                ));
            }
        }
        self.stats.push(entries);
        if self.stats_held.replace(c.head).is_some() {
            self.violation("more than one stats buffer available".into());
        }
        None
    }

    fn free_page(&mut self, sim: &Sim, c: &Chain) -> Option<u32> {
        let out = c.readable_len();
        let inn = c.writable_len();
        if out > 0 && inn > 0 {
            self.violation("free page chain mixes a command ID and a hint".into());
        }
        if out > 0 {
            let bytes = sim.read_chain(c);
            if bytes.len() != 4 {
                self.violation(format!("command ID buffer of {} bytes", bytes.len()));
                return Some(0);
            }
            let id = u32::from_le_bytes(bytes[..4].try_into().unwrap());
            self.cmd_ids_received.push(id);
            // QEMU `get_free_page_hints`.
            if self.hint_status == HintStatus::Requested && id == self.cmd_id {
                self.hint_status = HintStatus::Started;
            } else if id == CMD_STOP && self.hint_status == HintStatus::Started {
                self.hint_status = HintStatus::Stopped;
            }
            // Any other ID is stale (the device moved on while it was queued): ignored,
            // as QEMU does.
            return Some(0);
        }
        for d in &c.descs {
            if d.addr % 4096 != 0 || d.len == 0 || d.len % 4096 != 0 {
                self.violation(format!("hint of {:#x}+{:#x}", d.addr, d.len));
            }
        }
        if self.hint_status == HintStatus::Started {
            self.hints.extend(c.descs.iter().map(|d| (d.addr, d.len)));
        } else {
            self.stale_hints += 1;
        }
        // QEMU uses hint buffers with length 1.
        Some(1)
    }

    fn report(&mut self, _sim: &Sim, q: u16, c: &Chain) -> Option<u32> {
        if c.descs.iter().any(|d| !d.write_only) {
            self.violation("report with a device-readable descriptor".into());
        }
        let ranges: Vec<(u64, u32)> = c.descs.iter().map(|d| (d.addr, d.len)).collect();
        for &(a, l) in &ranges {
            if a % 4096 != 0 || l == 0 || l % 4096 != 0 {
                self.violation(format!("report of {a:#x}+{l:#x}"));
            }
        }
        self.reports.push(ranges);
        let _ = q;
        if self.hold_reports {
            self.held_reports.push(c.head);
            return None;
        }
        Some(0)
    }
}

/// Reads guest memory (helper for tests).
pub fn read_mem(sim: &Sim, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    sim.memory()
        .guest_memory()
        .read_slice(&mut b, GuestAddress(addr))
        .expect("guest memory");
    b
}
