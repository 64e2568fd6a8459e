//! `ring-bench <ours|virtio-drivers> <event-idx|no-event-idx> <rounds>`: runs `rounds`
//! rounds of "add one 1-descriptor chain, the device completes it, pop it" on one split
//! ring of [`QUEUE_SIZE`] entries, either ours (`virtio_core::SplitQueue`) or the
//! `virtio-drivers` crate's `VirtQueue`, with or without EVENT_IDX.
//!
//! Built in release mode and run under callgrind by `cargo xtask bench ring`, which
//! collects instructions only inside the `ring_bench_*_add` / `ring_bench_*_pop` functions
//! (`--toggle-collect`): the driver's side of the ring, not the device's. Each of those is
//! a thin, never-inlined wrapper whose body is the ring's own `add` or `pop`, so both rings
//! pay the same call overhead. Ring memory is ordinary heap memory whose address is the
//! device address (identity "DMA"), and the device side ([`RingDevice`]) is the same
//! minimal split-ring device code for both.

use std::alloc::{Layout, alloc_zeroed};
use std::hint::black_box;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::atomic::{Ordering, fence};

use virtio_core::platform::DmaRegion;
use virtio_core::queue::QueueConfig;
use virtio_core::ring::SplitRingLayout;
use virtio_core::{RingLayoutKind, Segment, SplitQueue, Used};
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
    let memory = zeroed_pages(layout.total);
    let ring = DmaRegion {
        vaddr: memory,
        daddr: memory.as_ptr() as u64,
        len: layout.total,
    };
    let config = QueueConfig {
        size: QUEUE_SIZE,
        max_indirect: 0,
        event_idx,
        ignore_used_len: false,
    };
    let mut queue =
        SplitQueue::new(0, layout, ring, None, config).map_err(|e| format!("SplitQueue: {e}"))?;
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
        if (used.token, used.len) != (token, WRITTEN_LEN) {
            return Err(format!(
                "pop: token {} len {}, expected {token} and {WRITTEN_LEN}",
                used.token, used.len
            ));
        }
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
    let usage = "usage: ring-bench <ours|virtio-drivers> <event-idx|no-event-idx> <rounds>";
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
