//! VirtioFamily.kext's client C functions (`vfam_*`, what device kexts call through
//! `virtio-kext-client`), called in any order with any arguments a C client could pass:
//! negotiation with any feature set, queue setup with any specs (sizes, indices, counts,
//! null arrays), chains of any shape into any queue, kicks, pops, drains, interrupt
//! enable/disable (delayed too), queue info and statistics, interrupts for any vector,
//! config reads and writes at any offset and length, DMA allocation, mapping and freeing,
//! reset (with the reclaim callback), fail; over the VirtioFamily shim played on the
//! simulated function (`virtio_tests::kext_shim`), whose device completes chains honestly,
//! with any used length, with forged ids, and sets NEEDS_RESET.
//!
//! Oracles: every token `vfam_queue_add` accepted comes back exactly once, from
//! `vfam_queue_pop_used`, `vfam_queue_drain` or `vfam_reset`'s reclaim, and none that was
//! not added; `vfam_reset` reports VK_OK (the device acknowledges every reset); a failed call leaves its out-pointers as they were (`found` excepted, set
//! false); every status is one of the header's codes; one drain hands over at most what
//! was in flight; every DMA byte is back once the client freed its regions and the family
//! stopped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use virtio_family_kext::*;
use virtio_kext_abi::{
    VK_E_BUSY, VK_OK, VkDmaRegion, VkInterruptCause, VkQueueSpec, VkQueueStats, VkSegment, VkStatus,
};
use virtio_tests::kext_shim::{Family, FamilyKext};
use virtio_tests::sim::{MODES, SimBuilder};

use crate::input::Input;

const MAX_STEPS: usize = 256;
const BUFFER_BYTES: usize = 32 * 1024;
/// Queue indices the fuzzer names: the device's three and a few that do not exist.
const QUEUE_CHOICES: u16 = 6;

/// The client's books: tokens in flight per queue, and what came back.
#[derive(Default)]
struct Books {
    in_flight: HashMap<usize, u16>,
    /// Tokens handed back by the current drain (checked against `in_flight` after it).
    drained: Vec<(usize, u32)>,
    reclaimed: Vec<(u16, usize)>,
}

unsafe extern "C" fn on_used(ctx: *mut c_void, token: usize, len: u32) {
    // SAFETY: ctx is the target's `RefCell<Books>`, alive for the drain.
    let books = unsafe { &*(ctx as *const RefCell<Books>) };
    books.borrow_mut().drained.push((token, len));
}

unsafe extern "C" fn on_reclaim(ctx: *mut c_void, queue: u16, token: usize) {
    // SAFETY: ctx is the target's `RefCell<Books>`, alive for the reset.
    let books = unsafe { &*(ctx as *const RefCell<Books>) };
    books.borrow_mut().reclaimed.push((queue, token));
}

/// `vfam_reset`'s status: a header code, and VK_OK, since the simulated device here always
/// acknowledges a reset (VK_E_RESET_TIMEOUT would tell the client to leak its buffers,
/// and the final accounting of DMA bytes would not hold). The tokens come back either way.
fn reset_acknowledged(s: VkStatus) {
    check_status(s, "reset");
    assert_eq!(
        s.code, VK_OK,
        "vfam_reset of a device that resets returned {}",
        s.code
    );
}

fn check_status(s: VkStatus, what: &str) -> bool {
    assert!(
        (VK_OK..=VK_E_BUSY).contains(&s.code),
        "{what} returned status {}",
        s.code
    );
    s.code == VK_OK
}

/// One token back: it must be in flight (on `queue`, when the caller knows it).
fn returned(books: &RefCell<Books>, token: usize, queue: Option<u16>, how: &str) {
    let mut b = books.borrow_mut();
    let Some(q) = b.in_flight.remove(&token) else {
        panic!("{how} handed back token {token:#x}, not in flight");
    };
    if let Some(queue) = queue {
        assert_eq!(
            q, queue,
            "{how} handed back token {token:#x} of queue {q} on queue {queue}"
        );
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let generic = (u64::from(input.u8() & 3) << 28) | crate::packed_if(input.bool());
    let features = if mode == virtio_tests::sim::SimMode::Legacy {
        generic | 0xff
    } else {
        generic | 0xff | 1 << 32
    };
    let sizes = [
        1u16 << (input.u8() % 8),
        1u16 << (input.u8() % 8),
        1u16 << (input.u8() % 8),
    ];
    let sim = SimBuilder::new(mode, 1)
        .features(features)
        .queues(&sizes)
        .device_config(&[0x52, 0x54, 0, 1, 2, 3, 1, 0, 0xdc, 0x05])
        .memory(crate::mem::guest_memory(4 << 20))
        .build();
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Ok(family) = Family::start(FamilyKext::rlib(), &sim, preference) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let dev = family.dev;
    let buffer = mem.alloc_buffer(BUFFER_BYTES);
    let books = RefCell::new(Books::default());
    let ctx = (&books as *const RefCell<Books>)
        .cast_mut()
        .cast::<c_void>();
    let mut regions: Vec<VkDmaRegion> = Vec::new();
    let mut next_token = 0x1000usize;

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let queue = u16::from(input.u8()) % QUEUE_CHOICES;
        // SAFETY (each call below): `dev` is the family's live handle; every pointer is to
        // a local that outlives the call, or null with a zero count where allowed.
        match input.u8() % 20 {
            0 => {
                let mut negotiated = 0xdead;
                let driver = u64::from(input.u32()) | (u64::from(input.u8()) << 32);
                // SAFETY: see above.
                let s = unsafe { vfam_negotiate_features(dev, driver, &mut negotiated) };
                if !check_status(s, "vfam_negotiate_features") {
                    assert_eq!(negotiated, 0xdead, "an out-pointer written on failure");
                }
                // Negotiation starts the device over, success or not: its queues go down
                // without handing back what was in flight (a client resets first).
                books.borrow_mut().in_flight.clear();
            }
            1 => {
                let count = usize::from(input.u8() % 5);
                let specs: Vec<VkQueueSpec> = (0..count)
                    .map(|_| VkQueueSpec {
                        index: u16::from(input.u8()) % QUEUE_CHOICES,
                        size: if input.bool() { 0 } else { input.u16() % 300 },
                        max_indirect: u16::from(input.u8() % 20),
                        interrupts: input.u8() & 1,
                        ignore_used_len: 0,
                    })
                    .collect();
                let null = input.u8().is_multiple_of(8);
                let p = if null {
                    std::ptr::null()
                } else {
                    specs.as_ptr()
                };
                // SAFETY: see above (`p` null only to test the refusal).
                let s = unsafe { vfam_setup_queues(dev, p, count) };
                // Only from FEATURES_OK, where no queue (so no token) exists.
                check_status(s, "vfam_setup_queues");
            }
            2 => {
                // SAFETY: see above.
                check_status(unsafe { vfam_driver_ok(dev) }, "vfam_driver_ok");
            }
            3..=6 => {
                let segment = |input: &mut Input| {
                    let len = 1 + u32::from(input.u16()) % 4096;
                    let offset = u64::from(input.u16()) % (BUFFER_BYTES as u64 - u64::from(len));
                    VkSegment {
                        addr: buffer.daddr + offset,
                        len,
                        reserved: 0,
                    }
                };
                let readable: Vec<VkSegment> =
                    (0..input.u8() % 4).map(|_| segment(&mut input)).collect();
                let writable: Vec<VkSegment> = (0..match input.u8() {
                    255 => 70,
                    n => n % 4,
                })
                    .map(|_| segment(&mut input))
                    .collect();
                let token = next_token;
                next_token += 1;
                // SAFETY: see above.
                let s = unsafe {
                    vfam_queue_add(
                        dev,
                        queue,
                        readable.as_ptr(),
                        readable.len(),
                        writable.as_ptr(),
                        writable.len(),
                        token,
                    )
                };
                if check_status(s, "vfam_queue_add") {
                    books.borrow_mut().in_flight.insert(token, queue);
                }
            }
            7 => {
                let mut notified = false;
                // SAFETY: see above.
                check_status(
                    unsafe { vfam_queue_kick(dev, queue, &mut notified) },
                    "vfam_queue_kick",
                );
            }
            8 => {
                let (mut found, mut token, mut len) = (true, 0xdead, 0xdead);
                // SAFETY: see above.
                let s =
                    unsafe { vfam_queue_pop_used(dev, queue, &mut found, &mut token, &mut len) };
                check_status(s, "vfam_queue_pop_used");
                if found {
                    assert_eq!(s.code, VK_OK, "found with a failed status");
                    returned(&books, token, Some(queue), "vfam_queue_pop_used");
                } else {
                    assert_eq!(
                        (token, len),
                        (0xdead, 0xdead),
                        "out-pointers written, nothing found"
                    );
                }
            }
            9 | 10 => {
                let before = books.borrow().in_flight.len();
                // SAFETY: see above; `ctx` is `books`, alive for the call.
                let s = unsafe { vfam_queue_drain(dev, queue, input.bool(), Some(on_used), ctx) };
                check_status(s, "vfam_queue_drain");
                let drained = std::mem::take(&mut books.borrow_mut().drained);
                assert!(
                    drained.len() <= before,
                    "one drain handed back more than was in flight"
                );
                for (token, _) in drained {
                    returned(&books, token, Some(queue), "vfam_queue_drain");
                }
            }
            11 => {
                let mut more = false;
                // SAFETY: see above.
                unsafe {
                    check_status(vfam_queue_has_used(dev, queue, &mut more), "has_used");
                    if input.bool() {
                        check_status(
                            vfam_queue_enable_interrupts(dev, queue, input.bool(), &mut more),
                            "enable_interrupts",
                        );
                    } else {
                        check_status(
                            vfam_queue_disable_interrupts(dev, queue),
                            "disable_interrupts",
                        );
                    }
                }
            }
            12 => {
                let (mut free, mut size, mut descriptors, mut max_chain) = (0, 0, 0, 0);
                let mut stats = VkQueueStats::default();
                let mut cause = VkInterruptCause::default();
                let mut vectors = 0;
                // SAFETY: see above.
                unsafe {
                    let segments = usize::from(input.u16());
                    let s = vfam_queue_info(
                        dev,
                        queue,
                        segments,
                        &mut free,
                        &mut size,
                        &mut descriptors,
                        &mut max_chain,
                    );
                    if check_status(s, "vfam_queue_info") {
                        assert!(free <= size, "{free} free descriptors in a ring of {size}");
                    }
                    check_status(vfam_queue_stats(dev, queue, &mut stats), "vfam_queue_stats");
                    let vector = i32::from(input.u8() as i8);
                    check_status(
                        vfam_handle_interrupt(dev, vector, &mut cause),
                        "handle_interrupt",
                    );
                    vfam_interrupt_mode(dev, &mut vectors);
                    vfam_needs_reset(dev);
                }
            }
            13 => {
                let offset = u32::from(input.u8());
                let len = usize::from(input.u8() % 40);
                let mut buf = vec![0u8; len];
                // SAFETY: see above; `buf` holds `len` bytes.
                unsafe {
                    if input.bool() {
                        check_status(
                            vfam_read_config(dev, offset, buf.as_mut_ptr(), len),
                            "read_config",
                        );
                    } else {
                        check_status(
                            vfam_write_config(dev, offset, buf.as_ptr(), len),
                            "write_config",
                        );
                    }
                }
            }
            14 => {
                if input.bool() || regions.is_empty() {
                    let mut out = VkDmaRegion {
                        vaddr: std::ptr::null_mut(),
                        daddr: 0,
                        len: 0,
                    };
                    let len = usize::from(input.u16()) % (64 << 10);
                    let align = 1usize << (input.u8() % 14);
                    // SAFETY: see above.
                    if check_status(
                        unsafe { vfam_dma_alloc(dev, len, align, &mut out) },
                        "dma_alloc",
                    ) {
                        regions.push(out);
                    }
                } else {
                    let r = regions.swap_remove(usize::from(input.u8()) % regions.len());
                    // SAFETY: a region from vfam_dma_alloc, freed once.
                    unsafe { vfam_dma_free(dev, &r) };
                }
            }
            15 => {
                // The device honestly completes what it read, with a used length up to the
                // writable bytes (or any, sometimes).
                let any = input.u8().is_multiple_of(8);
                for q in 0..3 {
                    if !sim.queue_info(q).is_some_and(|i| i.ready) {
                        continue;
                    }
                    for chain in sim.pop_chains(q) {
                        let len = if any {
                            input.u32()
                        } else {
                            chain.writable_len()
                        };
                        sim.complete(q, chain.head, len);
                    }
                    sim.signal_used(q);
                }
            }
            16 if sim.queue_info(queue).is_some_and(|i| i.ready) => {
                let id = input.u32() % 300;
                sim.complete_raw(queue, id, input.u32());
                sim.signal_used(queue);
            }
            17 => sim.trigger_needs_reset(),
            18 => {
                // SAFETY: see above; `ctx` is `books`, alive for the call.
                reset_acknowledged(unsafe { vfam_reset(dev, Some(on_reclaim), ctx) });
                let reclaimed = std::mem::take(&mut books.borrow_mut().reclaimed);
                for (q, token) in reclaimed {
                    returned(&books, token, Some(q), "vfam_reset's reclaim");
                }
                let lost = books.borrow().in_flight.len();
                assert_eq!(
                    lost, 0,
                    "{lost} tokens neither completed nor reclaimed by reset"
                );
            }
            _ => {
                if input.bool() {
                    // SAFETY: see above.
                    unsafe { vfam_fail(dev) };
                } else {
                    family.interrupts();
                }
            }
        }
    }

    // The client's `stop`: reset (reclaiming what is in flight), its regions freed; then
    // the family's stop.
    // SAFETY: `dev` is live; `ctx` is `books`.
    reset_acknowledged(unsafe { vfam_reset(dev, Some(on_reclaim), ctx) });
    let reclaimed = std::mem::take(&mut books.borrow_mut().reclaimed);
    for (q, token) in reclaimed {
        returned(&books, token, Some(q), "vfam_reset's reclaim");
    }
    assert!(
        books.borrow().in_flight.is_empty(),
        "tokens lost: {:?}",
        books.borrow().in_flight
    );
    for r in regions {
        // SAFETY: regions from vfam_dma_alloc, each freed once.
        unsafe { vfam_dma_free(dev, &r) };
    }
    // SAFETY: the device is reset; nothing uses the buffer.
    unsafe { virtio_core::platform::Dma::free_coherent(&mem, buffer) };
    family.stop();
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}
