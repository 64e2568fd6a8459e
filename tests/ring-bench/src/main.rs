//! `ring-bench <ours|packed|virtio-drivers> <event-idx|no-event-idx> <rounds>`: runs
//! `rounds` rounds of "add one 1-descriptor chain, the device completes it, pop it" on one
//! ring of [`QUEUE_SIZE`] entries: our split ring (`virtio_core::SplitQueue`), our packed
//! ring (`virtio_core::PackedQueue`) or the `virtio-drivers` crate's split `VirtQueue`,
//! with or without EVENT_IDX.
//!
//! Built in release mode and run under callgrind by `cargo xtask bench ring`, which
//! collects instructions only inside the `ring_bench_*_add` / `ring_bench_*_pop` functions
//! (`--toggle-collect`): the driver's side of the ring, not the device's. Each of those is
//! a thin, never-inlined wrapper whose body is the ring's own `add` or `pop`, so both rings
//! pay the same call overhead. Ring memory is ordinary heap memory whose address is the
//! device address (identity "DMA"), and the device side is the same minimal split-ring
//! device code for both split rings ([`RingDevice`]), and a minimal packed-ring device
//! ([`PackedDevice`]) for the packed one.

use std::alloc::{Layout, alloc_zeroed};
use std::hint::black_box;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::atomic::{Ordering, fence};

use virtio_core::packed::{
    DESC_F_AVAIL, DESC_F_USED, EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE,
    PackedRingLayout,
};
use virtio_core::platform::DmaRegion;
use virtio_core::queue::QueueConfig;
use virtio_core::ring::{DescFlags, SplitRingLayout};
use virtio_core::{PackedQueue, RingLayoutKind, Segment, SplitQueue, Used};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Ring entries for both queues (a common QEMU queue size).
const QUEUE_SIZE: u16 = 256;
/// Bytes of the one device-writable buffer of each chain.
const BUFFER_LEN: usize = 4096;
/// What the device reports having written.
const WRITTEN_LEN: u32 = 512;
const PAGE: usize = 4096;

/// Zeroed, page-aligned heap memory that is never freed (the process is short-lived).
fn zeroed_pages(bytes: usize) -> NonNull<u8> {
    let layout = Layout::from_size_align(bytes.max(1).next_multiple_of(PAGE), PAGE)
        .expect("a page-aligned layout");
    // SAFETY: the layout has a non-zero size.
    NonNull::new(unsafe { alloc_zeroed(layout) }).expect("memory for the ring")
}

/// The device side of a split ring (virtio 1.2 §2.7), just enough to complete chains in
/// order: reads the available ring, writes the used ring. Addresses are host pointers.
struct RingDevice {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    last_avail: u16,
    used_idx: u16,
}

impl RingDevice {
    /// Completes every chain made available since the last call, each with
    /// [`WRITTEN_LEN`] bytes written. Returns how many.
    fn complete_all(&mut self) -> u16 {
        let mut completed = 0;
        // SAFETY: the three pointers are the areas of a live ring of `size` entries (the
        // queue under test owns it and is not dropped while the device runs); offsets stay
        // inside them: avail ring entries at 4 + 2 * slot, descriptor `head < size` at
        // 16 * head, used ring entries at 4 + 8 * slot, slot < size.
        unsafe {
            let avail_idx = self.avail.add(2).cast::<u16>().read_volatile();
            fence(Ordering::Acquire);
            while self.last_avail != avail_idx {
                let slot = usize::from(self.last_avail % self.size);
                let head = self.avail.add(4 + 2 * slot).cast::<u16>().read_volatile();
                assert!(
                    head < self.size,
                    "the driver made descriptor {head} available"
                );
                let writable = self
                    .desc
                    .add(16 * usize::from(head) + 8)
                    .cast::<u32>()
                    .read_volatile();
                let used_slot = usize::from(self.used_idx % self.size);
                let elem = self.used.add(4 + 8 * used_slot);
                elem.cast::<u32>().write_volatile(u32::from(head));
                elem.add(4)
                    .cast::<u32>()
                    .write_volatile(WRITTEN_LEN.min(writable));
                self.used_idx = self.used_idx.wrapping_add(1);
                self.last_avail = self.last_avail.wrapping_add(1);
                completed += 1;
            }
            fence(Ordering::Release);
            self.used.add(2).cast::<u16>().write_volatile(self.used_idx);
        }
        completed
    }
}

// ---- ours ----

/// Zeroed memory for a ring of `total` bytes; device address = host address.
fn ring_memory(total: usize) -> DmaRegion {
    let memory = zeroed_pages(total);
    DmaRegion {
        vaddr: memory,
        daddr: memory.as_ptr() as u64,
        len: total,
    }
}

/// Both of our rings' configuration in every round: no indirect tables.
fn config(event_idx: bool) -> QueueConfig {
    QueueConfig {
        size: QUEUE_SIZE,
        max_indirect: 0,
        event_idx,
        ignore_used_len: false,
    }
}

/// The chain popped is the one added (`token`), with the bytes the bench device wrote.
fn expect_used(used: Used, token: usize) -> Result<(), String> {
    if (used.token, used.len) != (token, WRITTEN_LEN) {
        return Err(format!(
            "pop: token {} len {}, expected {token} and {WRITTEN_LEN}",
            used.token, used.len
        ));
    }
    Ok(())
}

/// Measured: our ring's `add` of one device-writable segment.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn ring_bench_ours_add(
    queue: &mut SplitQueue,
    writable: &[Segment],
    token: usize,
) -> virtio_core::Result<()> {
    queue.add(&[], writable, token)
}

/// Measured: our ring's `pop_used`.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn ring_bench_ours_pop(queue: &mut SplitQueue) -> virtio_core::Result<Option<Used>> {
    queue.pop_used()
}

fn run_ours(event_idx: bool, rounds: u64) -> Result<(), String> {
    let layout = SplitRingLayout::new(RingLayoutKind::Modern, QUEUE_SIZE).ok_or("ring layout")?;
    let mut queue = SplitQueue::new(
        0,
        layout,
        ring_memory(layout.total),
        None,
        config(event_idx),
    )
    .map_err(|e| format!("SplitQueue: {e}"))?;
    let addresses = queue.addresses();
    let mut device = RingDevice {
        desc: addresses.desc as *const u8,
        avail: addresses.driver as *const u8,
        used: addresses.device as *mut u8,
        size: QUEUE_SIZE,
        last_avail: 0,
        used_idx: 0,
    };
    let buffer = zeroed_pages(BUFFER_LEN);
    let segment = [Segment::new(buffer.as_ptr() as u64, BUFFER_LEN as u32)];
    for round in 0..rounds {
        let token = (round % 1000) as usize;
        ring_bench_ours_add(black_box(&mut queue), black_box(&segment), token)
            .map_err(|e| format!("add: {e}"))?;
        device.complete_all();
        let used = ring_bench_ours_pop(black_box(&mut queue))
            .map_err(|e| format!("pop: {e}"))?
            .ok_or("pop: nothing used")?;
        expect_used(used, token)?;
    }
    Ok(())
}

// ---- ours, packed ----

/// A position of a packed ring and the wrap counter that goes with it (§2.8.1).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct RingPos {
    idx: u16,
    wrap: bool,
}

impl RingPos {
    /// `n` positions further on a ring of `size` (n <= size).
    fn advance(self, n: u16, size: u16) -> RingPos {
        let idx = u32::from(self.idx) + u32::from(n);
        if idx >= u32::from(size) {
            RingPos {
                idx: (idx - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            RingPos {
                idx: idx as u16,
                wrap: self.wrap,
            }
        }
    }
}

/// The device side of a packed ring (virtio 1.2 §2.8.21, device side), just enough to
/// complete chains in order: reads the descriptors made available in its lap (AVAIL equal
/// to its wrap counter, USED not), writes one used descriptor per chain (the chain's buffer
/// id, the bytes written, AVAIL and USED both equal to its used wrap counter, flags last),
/// and decides whether it would interrupt from the driver event suppression structure
/// (§2.8.10). Addresses are host pointers.
struct PackedDevice {
    /// Descriptor ring.
    desc: *mut u8,
    /// Driver event suppression structure (`off_wrap`, `flags`), which the driver writes.
    driver_event: *const u8,
    size: u16,
    next_avail: RingPos,
    next_used: RingPos,
    /// Interrupts the device would have sent.
    interrupts: u64,
}

impl PackedDevice {
    fn new(desc: *mut u8, driver_event: *const u8, size: u16) -> Self {
        let start = RingPos { idx: 0, wrap: true };
        PackedDevice {
            desc,
            driver_event,
            size,
            next_avail: start,
            next_used: start,
            interrupts: 0,
        }
    }

    /// Completes every chain made available since the last call, each with
    /// [`WRITTEN_LEN`] bytes written (at most its writable bytes). Returns how many.
    fn complete_all(&mut self) -> u16 {
        let mut completed = 0;
        let batch_start = self.next_used;
        // SAFETY: `desc` is the descriptor ring of a live packed ring of `size` entries (the
        // queue under test owns it and is not dropped while the device runs); every
        // position read or written is < size, 16 bytes at 16 * position.
        unsafe {
            loop {
                let head = self.next_avail;
                let flags = self.read_flags(head.idx);
                let avail = flags & DESC_F_AVAIL != 0;
                let used = flags & DESC_F_USED != 0;
                if avail != head.wrap || used == head.wrap {
                    break;
                }
                // §2.8.21.1: the flags before the rest of the descriptor.
                fence(Ordering::Acquire);
                // The chain: NEXT links positions in order, its buffer id in its last
                // descriptor (§2.8.6); the writable bytes bound what the device may report.
                let mut pos = head;
                let mut descs = 0u16;
                let mut writable = 0u32;
                let id = loop {
                    assert!(descs < self.size, "a chain longer than the ring");
                    let d = self.desc.add(16 * usize::from(pos.idx));
                    let flags = d.add(14).cast::<u16>().read_volatile();
                    assert!(
                        flags & DescFlags::INDIRECT.bits() == 0,
                        "the bench posts no indirect chains"
                    );
                    if flags & DescFlags::WRITE.bits() != 0 {
                        writable += d.add(8).cast::<u32>().read_volatile();
                    }
                    descs += 1;
                    pos = pos.advance(1, self.size);
                    if flags & DescFlags::NEXT.bits() == 0 {
                        break d.add(12).cast::<u16>().read_volatile();
                    }
                };
                self.next_avail = pos;
                // §2.8.21.2: id and length, then (after a write barrier) the flags that make
                // the used descriptor visible, in the device's used lap.
                let u = self.desc.add(16 * usize::from(self.next_used.idx));
                u.add(8)
                    .cast::<u32>()
                    .write_volatile(WRITTEN_LEN.min(writable));
                u.add(12).cast::<u16>().write_volatile(id);
                fence(Ordering::Release);
                let used_flags = if self.next_used.wrap {
                    DESC_F_AVAIL | DESC_F_USED
                } else {
                    0
                };
                u.add(14).cast::<u16>().write_volatile(used_flags);
                self.next_used = self.next_used.advance(descs, self.size);
                completed += 1;
            }
        }
        if completed != 0 && self.wants_interrupt(batch_start) {
            self.interrupts += 1;
        }
        completed
    }

    /// The descriptor flags at position `idx` (< size).
    ///
    /// # Safety
    /// As in `complete_all`.
    unsafe fn read_flags(&self, idx: u16) -> u16 {
        // SAFETY: the caller's (idx < size: inside the ring).
        unsafe {
            self.desc
                .add(16 * usize::from(idx) + 14)
                .cast::<u16>()
                .read_volatile()
        }
    }

    /// Whether the driver event suppression structure asks for an interrupt after the used
    /// descriptors written from `old` to `self.next_used` (§2.8.10): ENABLE always, DISABLE
    /// never, DESC when the position it names (in the lap its wrap bit names) was written.
    fn wants_interrupt(&self, old: RingPos) -> bool {
        // §2.8.21.2: the used flags before the driver's event structure (store→load).
        fence(Ordering::SeqCst);
        // SAFETY: the 4-aligned driver event structure of the live ring (see `new`'s caller).
        let (off_wrap, flags) = unsafe {
            (
                self.driver_event.cast::<u16>().read_volatile(),
                self.driver_event.add(2).cast::<u16>().read_volatile(),
            )
        };
        match flags {
            EVENT_FLAG_ENABLE => true,
            EVENT_FLAG_DISABLE => false,
            EVENT_FLAG_DESC => {
                let size = i32::from(self.size);
                // Positions counted from `old`'s lap: the event is in that lap, the next one
                // (a smaller index in the other lap) or the previous one.
                let (event_idx, event_wrap) = (off_wrap & 0x7fff, off_wrap & 0x8000 != 0);
                let event = i32::from(event_idx)
                    + if event_wrap == old.wrap {
                        0
                    } else if event_idx < old.idx {
                        size
                    } else {
                        -size
                    };
                let new = i32::from(self.next_used.idx)
                    + if self.next_used.wrap == old.wrap {
                        0
                    } else {
                        size
                    };
                (i32::from(old.idx)..new).contains(&event)
            }
            other => panic!("driver event flags {other:#x}"),
        }
    }
}

/// Measured: our packed ring's `add` of one device-writable segment.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn ring_bench_packed_add(
    queue: &mut PackedQueue,
    writable: &[Segment],
    token: usize,
) -> virtio_core::Result<()> {
    queue.add(&[], writable, token)
}

/// Measured: our packed ring's `pop_used`.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn ring_bench_packed_pop(queue: &mut PackedQueue) -> virtio_core::Result<Option<Used>> {
    queue.pop_used()
}

fn run_packed(event_idx: bool, rounds: u64) -> Result<(), String> {
    let layout = PackedRingLayout::new(QUEUE_SIZE).ok_or("packed ring layout")?;
    let mut queue = PackedQueue::new(
        0,
        layout,
        ring_memory(layout.total),
        None,
        config(event_idx),
    )
    .map_err(|e| format!("PackedQueue: {e}"))?;
    // As a driver does once its queue is set up: interrupts on, and with EVENT_IDX the
    // driver event structure naming the next used position (DESC), which every pop then
    // moves on. Nothing is used yet.
    if queue.enable_interrupts() {
        return Err("enable_interrupts: used descriptors before any add".into());
    }
    let addresses = queue.addresses();
    let mut device = PackedDevice::new(
        addresses.desc as *mut u8,
        addresses.driver as *const u8,
        QUEUE_SIZE,
    );
    let buffer = zeroed_pages(BUFFER_LEN);
    let segment = [Segment::new(buffer.as_ptr() as u64, BUFFER_LEN as u32)];
    for round in 0..rounds {
        let token = (round % 1000) as usize;
        ring_bench_packed_add(black_box(&mut queue), black_box(&segment), token)
            .map_err(|e| format!("add: {e}"))?;
        if device.complete_all() != 1 {
            return Err(format!(
                "round {round}: the device found no chain available"
            ));
        }
        let used = ring_bench_packed_pop(black_box(&mut queue))
            .map_err(|e| format!("pop: {e}"))?
            .ok_or("pop: nothing used")?;
        expect_used(used, token)?;
    }
    // Every completion crossed the driver's interrupt point (EVENT_IDX: each pop names the
    // next used position) or found interrupts enabled.
    if device.interrupts != rounds {
        return Err(format!(
            "the device would have interrupted {} times in {rounds} rounds",
            device.interrupts
        ));
    }
    if queue.stats().completions != rounds || queue.in_flight() != 0 {
        return Err("packed queue statistics out of step".into());
    }
    Ok(())
}

// ---- virtio-drivers ----

/// `virtio-drivers`' platform hooks for host memory: device address = host address.
pub struct HostHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory that stays valid (it is never
// freed: `dma_dealloc` leaks it), and the "physical" address is the pointer itself, which
// is what the ring device here dereferences; `share` hands out the buffer's own address.
unsafe impl Hal for HostHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let memory = zeroed_pages(pages * PAGE);
        (memory.as_ptr() as u64, memory)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the bench's transport has no MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The least `Transport` `VirtQueue::new` needs: it records where the queue was placed.
#[derive(Default)]
struct RecordingTransport {
    /// Descriptor table, driver area, device area.
    areas: Option<(PhysAddr, PhysAddr, PhysAddr)>,
}

impl Transport for RecordingTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }
    fn read_device_features(&mut self) -> u64 {
        0
    }
    fn write_driver_features(&mut self, _driver_features: u64) {}
    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        u32::from(QUEUE_SIZE)
    }
    fn notify(&mut self, _queue: u16) {}
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::empty()
    }
    fn set_status(&mut self, _status: DeviceStatus) {}
    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(
        &mut self,
        _queue: u16,
        _size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.areas = Some((descriptors, driver_area, device_area));
    }
    fn queue_unset(&mut self, _queue: u16) {
        self.areas = None;
    }
    fn queue_used(&mut self, _queue: u16) -> bool {
        self.areas.is_some()
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        0
    }
    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        _offset: usize,
    ) -> virtio_drivers::Result<T> {
        Err(virtio_drivers::Error::ConfigSpaceMissing)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::ConfigSpaceMissing)
    }
}

type TheirQueue = VirtQueue<HostHal, { QUEUE_SIZE as usize }>;

/// Measured: `VirtQueue::add` of one device-writable buffer.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn ring_bench_vd_add(queue: &mut TheirQueue, buffer: &mut [u8]) -> virtio_drivers::Result<u16> {
    // SAFETY: the buffer is not touched until `ring_bench_vd_pop` returns it (the bench's
    // device never writes it either).
    unsafe { queue.add(&[], &mut [buffer]) }
}

/// Measured: `VirtQueue::pop_used` of the chain `token`.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn ring_bench_vd_pop(
    queue: &mut TheirQueue,
    token: u16,
    buffer: &mut [u8],
) -> virtio_drivers::Result<u32> {
    // SAFETY: the same buffer as given to `add` for `token`.
    unsafe { queue.pop_used(token, &[], &mut [buffer]) }
}

fn run_virtio_drivers(event_idx: bool, rounds: u64) -> Result<(), String> {
    let mut transport = RecordingTransport::default();
    let mut queue = TheirQueue::new(&mut transport, 0, false, event_idx)
        .map_err(|e| format!("VirtQueue::new: {e}"))?;
    let (desc, driver, device) = transport.areas.ok_or("VirtQueue::new set no queue")?;
    let mut device = RingDevice {
        desc: desc as *const u8,
        avail: driver as *const u8,
        used: device as *mut u8,
        size: QUEUE_SIZE,
        last_avail: 0,
        used_idx: 0,
    };
    let mut buffer = vec![0u8; BUFFER_LEN];
    for _ in 0..rounds {
        let token = ring_bench_vd_add(black_box(&mut queue), black_box(&mut buffer))
            .map_err(|e| format!("add: {e}"))?;
        device.complete_all();
        let len = ring_bench_vd_pop(black_box(&mut queue), token, black_box(&mut buffer))
            .map_err(|e| format!("pop: {e}"))?;
        if len != WRITTEN_LEN {
            return Err(format!("pop: len {len}, expected {WRITTEN_LEN}"));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: ring-bench <ours|packed|virtio-drivers> <event-idx|no-event-idx> <rounds>";
    let (Some(ring), Some(events), Some(rounds)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let event_idx = match events.as_str() {
        "event-idx" => true,
        "no-event-idx" => false,
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let Ok(rounds) = rounds.parse::<u64>() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let result = match ring.as_str() {
        "ours" => run_ours(event_idx, rounds),
        "packed" => run_packed(event_idx, rounds),
        "virtio-drivers" => run_virtio_drivers(event_idx, rounds),
        _ => Err(usage.to_string()),
    };
    match result {
        Ok(()) => {
            println!("ring-bench: {ring}, {events}: {rounds} rounds of add + complete + pop");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ring-bench: {ring}, {events}: {e}");
            ExitCode::FAILURE
        }
    }
}
