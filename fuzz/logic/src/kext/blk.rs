//! VirtioBlock.kext (`virtio-block-kext`) as its IOBlockStorageDevice shim drives it
//! (`kexts/VirtioBlock/shim/VirtioBlockDevice.cpp`): requests refused with `VBLK_E_BUSY`
//! are held in order and resubmitted from the `restart` callback; a request cut off by
//! sleep is held again in front; completions may submit the next request (the storage
//! stack's next I/O); `stop` completes what is in flight as aborted; the device is hostile
//! (`BlkModel` with fuzzed status bytes and used lengths, forged completions, resizes, raw
//! configuration bytes, NEEDS_RESET).
//!
//! Oracles: every request `vblk_*` accepted reaches `complete` exactly once, and before
//! `vblk_stop` returns; `complete` and `restart` never run inside the call that submitted
//! the request, nor after `vblk_stop`; held requests never wait
//! with nothing in flight while the device runs (the queue would stall for ever); the
//! statistics' `in_flight` is the shim's own count; `vblk_info` stays within its bounds;
//! after `stop` every submission fails with `VBLK_E_DEVICE`; every DMA byte is back after
//! the family stops.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;

use virtio_block_kext::*;
use virtio_core::platform::DmaRegion;
use virtio_kext_abi::VkSegment;

use crate::input::Input;

const MAX_STEPS: usize = 192;
const BUFFER_BYTES: usize = 64 * 1024;

/// One request of the shim's, as it would hand it to the kext again after a `BUSY`.
#[derive(Clone)]
enum Request {
    ReadWrite {
        write: bool,
        block: u64,
        blocks: u64,
        segments: Vec<VkSegment>,
    },
    Flush,
    Unmap(Vec<VblkExtent>),
    Id,
}

impl Request {
    /// Flush, unmap and GET_ID: the shim's caller sleeps until the answer (`gatedSync`,
    /// start's GET_ID) and sends it again itself; such a request is never held.
    fn is_sync(&self) -> bool {
        !matches!(self, Request::ReadWrite { .. })
    }
}

/// The shim's state, reached from the kext's callbacks through `ctx`.
struct Shim {
    dev: *mut VblkDevice,
    /// Requests the kext accepted and has not completed.
    outstanding: HashMap<usize, Request>,
    /// Requests refused with `VBLK_E_BUSY` (or cut off by sleep), resubmitted in order.
    held: VecDeque<(usize, Request)>,
    /// A kext call that submits is running: a completion now would break the contract.
    submitting: bool,
    /// `vblk_stop` is running: aborted requests go up, not back to the held list.
    stopping: bool,
    /// `vblk_stop` returned: no callback may come any more.
    stopped: bool,
    /// Between `vblk_suspend` and `vblk_resume`.
    asleep: bool,
    /// A `VBLK_E_BUSY` came since the last `restart`.
    busy_seen: bool,
    /// Completions that submit the next request, and what they submit (the storage stack's
    /// next I/O): a one-block read of the buffer's first block.
    chain_from_completions: u32,
    chain_segment: VkSegment,
    next_token: usize,
    completions: usize,
    capacity_changes: Vec<u64>,
}

impl Shim {
    fn token(&mut self) -> usize {
        self.next_token += 1;
        0x1000 + self.next_token
    }
}

unsafe extern "C" fn on_complete(ctx: *mut c_void, request: *mut c_void, status: i32) {
    // SAFETY: ctx is the target's `RefCell<Shim>`, alive until the device is destroyed.
    let shim = unsafe { &*(ctx as *const RefCell<Shim>) };
    let token = request as usize;
    let chain = {
        let mut s = shim.borrow_mut();
        assert!(!s.stopped, "complete({token:#x}) after vblk_stop returned");
        assert!(
            !s.submitting,
            "complete({token:#x}) from inside the call that submits"
        );
        let Some(request) = s.outstanding.remove(&token) else {
            panic!("complete({token:#x}): not a request in flight (twice, or never accepted)");
        };
        s.completions += 1;
        if status == VBLK_E_ABORTED && s.asleep && !s.stopping && !request.is_sync() {
            // Cut off by the sleep's reset: held again, in front (the shim's cbComplete).
            s.held.push_front((token, request));
            false
        } else if s.chain_from_completions > 0 && !s.asleep {
            s.chain_from_completions -= 1;
            true
        } else {
            false
        }
    };
    if chain {
        let (token, segment) = {
            let mut s = shim.borrow_mut();
            (s.token(), s.chain_segment)
        };
        let request = Request::ReadWrite {
            write: false,
            block: 0,
            blocks: 1,
            segments: vec![segment],
        };
        submit(shim, token, request, false);
    }
}

unsafe extern "C" fn on_restart(ctx: *mut c_void) {
    // SAFETY: as in `on_complete`.
    let shim = unsafe { &*(ctx as *const RefCell<Shim>) };
    {
        let mut s = shim.borrow_mut();
        assert!(!s.stopped, "restart after vblk_stop returned");
        assert!(!s.submitting, "restart from inside the call that submits");
        // Not only after a `BUSY`: after a device fault too, the kext asks for what the
        // shim holds.
        s.busy_seen = false;
    }
    resubmit_held(shim);
}

unsafe extern "C" fn on_capacity(ctx: *mut c_void, blocks: u64) {
    // SAFETY: as in `on_complete`.
    let shim = unsafe { &*(ctx as *const RefCell<Shim>) };
    let mut s = shim.borrow_mut();
    assert!(!s.stopped, "capacity_changed after vblk_stop returned");
    s.capacity_changes.push(blocks);
}

/// The shim's `cbRestart`: the held requests in order, until one is refused again.
fn resubmit_held(shim: &RefCell<Shim>) {
    loop {
        let next = {
            let mut s = shim.borrow_mut();
            if s.stopped || s.asleep {
                return;
            }
            s.held.pop_front()
        };
        let Some((token, request)) = next else { return };
        if submit(shim, token, request, true) == VBLK_E_BUSY {
            return;
        }
    }
}

/// Hands `request` to the kext, as the shim does, and books the outcome: accepted (in
/// flight), refused with `BUSY` (held, at the back or, for a resubmission, in front again)
/// or failed (the shim completes it itself).
fn submit(shim: &RefCell<Shim>, token: usize, request: Request, resubmission: bool) -> i32 {
    let sync = request.is_sync();
    if !resubmission && !sync && !shim.borrow().held.is_empty() {
        // Requests already held go first: order is kept (`gatedReadWrite`).
        shim.borrow_mut().held.push_back((token, request));
        return VBLK_E_BUSY;
    }
    let dev = {
        let mut s = shim.borrow_mut();
        s.submitting = true;
        s.dev
    };
    let req = token as *mut c_void;
    let kept = request.clone();
    // SAFETY: `dev` is the live handle (or, after stop, still not destroyed); the segment
    // and extent arrays are alive for the call.
    let status = unsafe {
        match &request {
            Request::ReadWrite {
                write,
                block,
                blocks,
                segments,
            } => vblk_submit_rw(
                dev,
                *write,
                *block,
                *blocks,
                segments.as_ptr(),
                segments.len(),
                req,
            ),
            Request::Flush => vblk_flush(dev, req),
            Request::Unmap(extents) => vblk_unmap(dev, extents.as_ptr(), extents.len(), req),
            Request::Id => vblk_request_id(dev, req),
        }
    };
    let mut s = shim.borrow_mut();
    s.submitting = false;
    match status {
        VBLK_OK => {
            assert!(
                s.outstanding.insert(token, kept).is_none(),
                "request {token:#x} accepted twice"
            );
        }
        VBLK_E_BUSY => {
            s.busy_seen = true;
            if sync {
                // Its caller waits for room and sends it again: not the shim's to hold.
            } else if resubmission {
                s.held.push_front((token, request));
            } else {
                s.held.push_back((token, request));
            }
        }
        VBLK_E_IO | VBLK_E_UNSUPPORTED | VBLK_E_READ_ONLY | VBLK_E_INVALID
        | VBLK_E_OUT_OF_RANGE | VBLK_E_TOO_LARGE | VBLK_E_DEVICE => {}
        other => panic!("a submission returned {other}, not a VBLK_* status"),
    }
    if s.stopped {
        assert!(
            status != VBLK_OK && status != VBLK_E_BUSY,
            "a submission after vblk_stop answered {status}"
        );
    }
    status
}

pub(super) fn run(input: &mut Input) {
    let crate::blk::BlkSetup {
        mut model,
        sim,
        preference,
        queue_size,
    } = crate::blk::setup(input);
    let Some(super::Started {
        family,
        mem,
        buffer,
        free_at_start,
    }) = super::start_family(&sim, preference, BUFFER_BYTES)
    else {
        return;
    };
    let shim = Box::new(RefCell::new(Shim {
        dev: std::ptr::null_mut(),
        outstanding: HashMap::new(),
        held: VecDeque::new(),
        submitting: false,
        stopping: false,
        stopped: false,
        asleep: false,
        busy_seen: false,
        chain_from_completions: u32::from(input.u8() % 8),
        chain_segment: VkSegment {
            addr: buffer.daddr,
            len: 512,
            reserved: 0,
        },
        next_token: 0,
        completions: 0,
        capacity_changes: Vec::new(),
    }));
    let callbacks = VblkCallbacks {
        ctx: (&*shim as *const RefCell<Shim>).cast_mut().cast(),
        complete: Some(on_complete),
        restart: input.bool().then_some(on_restart as _),
        capacity_changed: input.bool().then_some(on_capacity as _),
    };
    let mut dev = std::ptr::null_mut();
    // SAFETY: the nub's live handle; the callbacks' context outlives the device.
    let created = unsafe { vblk_create(family.client_handle(), &callbacks, &mut dev) };
    if created != VBLK_OK {
        assert!(dev.is_null(), "vblk_create failed but gave a handle");
        super::finish(family, &sim, &mem, buffer, free_at_start);
        return;
    }
    shim.borrow_mut().dev = dev;
    let restartable = callbacks.restart.is_some();

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 16 {
            0..=4 => {
                let request = request(input, &buffer);
                let token = shim.borrow_mut().token();
                submit(&shim, token, request, false);
            }
            5 | 6 => crate::blk::serve(&mut model, &sim, input),
            7 if sim.queue_info(0).is_some_and(|q| q.ready) => {
                // Forged or repeated used entries.
                let chains = sim.pop_chains(0);
                let id = match chains.first() {
                    Some(chain) if input.bool() => u32::from(chain.head),
                    _ => input.u32() % (u32::from(queue_size) * 2 + 1),
                };
                sim.complete_raw(0, id, input.u32() % 8192);
                sim.signal_used(0);
            }
            8 => crate::blk::resize(&mut model, &sim, input),
            9 => {
                let offset = usize::from(input.u8() % 64);
                let len = usize::from(input.u8() % 16);
                sim.set_device_config(offset, input.take(len));
                sim.raise_config_interrupt();
            }
            10 => sim.trigger_needs_reset(),
            11 | 12 => super::deliver_interrupts(input, &family),
            13 => {
                // The shim's `report*` methods and statistics.
                check_info(dev);
                // SAFETY: the live handle (after stop too: destroy has not run).
                let status = unsafe { vblk_set_write_cache(dev, input.bool()) };
                assert!(
                    (VBLK_OK..=VBLK_E_DEVICE).contains(&status),
                    "vblk_set_write_cache returned {status}"
                );
            }
            14 => {
                // setPowerState: sleep, or wake and resubmit what is held.
                let asleep = shim.borrow().asleep;
                if !asleep {
                    shim.borrow_mut().asleep = true;
                    // SAFETY: the live handle.
                    let status = unsafe { vblk_suspend(dev) };
                    assert!(
                        matches!(status, VBLK_OK | VBLK_E_DEVICE | VBLK_E_IO),
                        "vblk_suspend returned {status}"
                    );
                    if input.bool() {
                        sim.trigger_needs_reset();
                    }
                } else {
                    // SAFETY: the live handle.
                    let status = unsafe { vblk_resume(dev) };
                    assert!(
                        matches!(status, VBLK_OK | VBLK_E_DEVICE),
                        "vblk_resume returned {status}"
                    );
                    // Awake whatever the answer (`gatedSetPower`): what is held goes again,
                    // and fails if the device did not come back.
                    shim.borrow_mut().asleep = false;
                    resubmit_held(&shim);
                }
            }
            _ => {
                if input.u8().is_multiple_of(4) {
                    // stop (IOKit's termination) in the middle: what is in flight
                    // completes as aborted; every later call fails cleanly.
                    stop(&shim, dev);
                }
            }
        }
        check_books(&shim, dev, restartable);
    }

    if input.bool() {
        stop(&shim, dev);
    } else {
        // `free` without `stop` (start's failure path): destroy stops the device itself.
        shim.borrow_mut().stopping = true;
    }
    // SAFETY: the handle from vblk_create, not used again (destroy stops it if needed).
    unsafe { vblk_destroy(dev) };
    let s = shim.borrow();
    assert!(
        s.outstanding.is_empty(),
        "requests never completed: {:?}",
        s.outstanding.keys()
    );
    drop(s);
    super::finish(family, &sim, &mem, buffer, free_at_start);
}

/// `gatedStop`: `vblk_stop`, after which every request the kext had is back.
fn stop(shim: &RefCell<Shim>, dev: *mut VblkDevice) {
    shim.borrow_mut().stopping = true;
    // SAFETY: the live handle.
    unsafe { vblk_stop(dev) };
    let mut s = shim.borrow_mut();
    assert!(
        s.outstanding.is_empty(),
        "vblk_stop returned with requests never completed: {:?}",
        s.outstanding.keys()
    );
    s.stopped = true;
}

/// After each of the shim's calls: the kext's count of requests in flight is the shim's,
/// and held requests have something in flight whose completion will restart them.
fn check_books(shim: &RefCell<Shim>, dev: *mut VblkDevice, restartable: bool) {
    let mut stats = VblkStats::default();
    // SAFETY: the live handle; a local out-pointer.
    assert_eq!(unsafe { vblk_stats(dev, &mut stats) }, VBLK_OK);
    let s = shim.borrow();
    assert_eq!(
        stats.in_flight,
        s.outstanding.len() as u64,
        "the kext counts {} requests in flight, the shim {}",
        stats.in_flight,
        s.outstanding.len()
    );
    if restartable && !s.stopped && !s.asleep && !s.held.is_empty() {
        assert!(
            !s.outstanding.is_empty() || !s.busy_seen,
            "{} requests held with nothing in flight: no restart will ever come",
            s.held.len()
        );
    }
}

/// `vblk_info` within the bounds its header states.
fn check_info(dev: *mut VblkDevice) {
    let mut info = VblkInfo::default();
    // SAFETY: the live handle; a local out-pointer.
    assert_eq!(unsafe { vblk_info(dev, &mut info) }, VBLK_OK);
    assert!(
        info.block_size >= 512 && info.block_size.is_power_of_two(),
        "block size {}",
        info.block_size
    );
    assert!((1..=VBLK_MAX_SEGMENTS).contains(&info.max_segments));
    assert!(
        info.max_transfer_bytes >= u64::from(info.block_size)
            && info.max_transfer_bytes % u64::from(info.block_size) == 0,
        "largest transfer {} with blocks of {}",
        info.max_transfer_bytes,
        info.block_size
    );
    for text in [
        &info.vendor[..],
        &info.product[..],
        &info.revision[..],
        &info.serial[..],
    ] {
        let end = text.iter().position(|&b| b == 0).expect("NUL-terminated");
        assert!(text[..end].iter().all(|b| (0x20..0x7f).contains(b)));
    }
}

/// A request of fuzzer-chosen shape, valid or not (blocks that do not match the bytes, no
/// segments, too many, beyond the disk).
fn request(input: &mut Input, buffer: &DmaRegion) -> Request {
    match input.u8() % 8 {
        0..=4 => {
            let count = match input.u8() {
                255 => VBLK_MAX_SEGMENTS as usize + 1,
                254 => 0,
                n => 1 + usize::from(n % 6),
            };
            let segments: Vec<VkSegment> = (0..count)
                .map(|_| {
                    let len = if !input.u8().is_multiple_of(8) {
                        512 * (1 + u32::from(input.u8() % 8))
                    } else {
                        1 + u32::from(input.u16()) % 4096
                    };
                    let offset = u64::from(input.u16()) % (BUFFER_BYTES as u64 - u64::from(len));
                    VkSegment {
                        addr: buffer.daddr + offset,
                        len,
                        reserved: 0,
                    }
                })
                .collect();
            let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
            let blocks = if input.u8().is_multiple_of(8) {
                u64::from(input.u8())
            } else {
                // Whole 512-byte blocks; the kext refuses them if its blocks are larger.
                bytes / 512
            };
            Request::ReadWrite {
                write: input.bool(),
                block: u64::from(input.u16()) % (crate::blk::SECTORS + 8),
                blocks,
                segments,
            }
        }
        5 => Request::Flush,
        6 => Request::Id,
        _ => Request::Unmap(
            (0..input.u8() % 4)
                .map(|_| VblkExtent {
                    block: u64::from(input.u16()) % (crate::blk::SECTORS + 8),
                    count: u64::from(input.u8()),
                })
                .collect(),
        ),
    }
}
