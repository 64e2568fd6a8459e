//! VirtioEntropy.kext (`virtio-entropy-kext`) as its shim drives it
//! (`kexts/VirtioEntropy/shim/VirtioEntropy.cpp`): `ready` brings the feed timer forward,
//! the timer reads (and, an order the shim does not make but the kext allows, `ready`
//! may read itself), sleep and wake, stop; the device fills buffers from a known stream with any used length, forges
//! and repeats used ids, sets NEEDS_RESET.
//!
//! Oracles: `*got` never above the caller's length; a read made as `ready` announces N
//! bytes gets exactly N, and never comes after `vrng_stop`; while the device
//! has been honest and never reset, the bytes read are its stream, in order; the statistics
//! never count more bytes read than received; every DMA byte is back after the family
//! stops.

use std::cell::RefCell;
use std::ffi::c_void;

use virtio_entropy_kext::*;
use virtio_rng::REQUEST_QUEUE;

use crate::input::Input;
use crate::rng::Stream;

const MAX_STEPS: usize = 192;

struct Shim {
    dev: *mut VrngDevice,
    stopped: bool,
    /// Bytes the shim has read, in order.
    read: Vec<u8>,
    /// The `ready` callback reads right away: an order the shim does not make (its
    /// `cbReady` only brings its feed timer forward), which the kext allows (`ready` runs
    /// after the kext is done, and may re-enter).
    read_when_ready: bool,
    /// `ready` brought the feed timer forward (the shim's `cbReady`).
    feed_due: bool,
    /// A recovery, sleep or any device lie happened: unread bytes may have been dropped.
    stream_broken: bool,
}

unsafe extern "C" fn on_ready(ctx: *mut c_void, bytes: usize) {
    // SAFETY: ctx is the target's `RefCell<Shim>`, alive until the device is destroyed.
    let shim = unsafe { &*(ctx as *const RefCell<Shim>) };
    let (dev, read_now) = {
        let mut s = shim.borrow_mut();
        assert!(!s.stopped, "ready after vrng_stop returned");
        assert!(bytes > 0, "ready with no bytes");
        s.feed_due = true;
        (s.dev, s.read_when_ready)
    };
    if read_now {
        // Nothing happens between the announcement and this read: unless the driver finds a
        // lie in the ring on its way (`VRNG_E_DEVICE`, and a recovery), it gets them all.
        let (status, got) = read(shim, dev, bytes);
        if status == VRNG_OK {
            assert_eq!(
                got, bytes,
                "ready announced {bytes} bytes; a read of them got {got}"
            );
        }
    }
}

/// `vrng_read` into a buffer of `len` bytes; the bytes read are appended to the shim's.
/// Returns the status and the bytes read.
fn read(shim: &RefCell<Shim>, dev: *mut VrngDevice, len: usize) -> (i32, usize) {
    let mut buf = vec![0u8; len];
    let mut got = usize::MAX;
    // SAFETY: the live handle; `buf` is writable for `len` bytes, `got` a local.
    let status = unsafe { vrng_read(dev, buf.as_mut_ptr(), len, &mut got) };
    assert!(
        matches!(status, VRNG_OK | VRNG_E_DEVICE | VRNG_E_STOPPED),
        "vrng_read returned {status}"
    );
    assert!(got <= len, "vrng_read got {got} bytes into {len}");
    if status != VRNG_OK {
        assert_eq!(got, 0, "a failed read reported {got} bytes");
    }
    shim.borrow_mut().read.extend_from_slice(&buf[..got]);
    (status, got)
}

pub(super) fn run(input: &mut Input) {
    let (sim, preference, queue_size) = crate::rng::setup(input);
    let Some(super::Started {
        family,
        mem,
        buffer,
        free_at_start,
    }) = super::start_family(&sim, preference, 4096)
    else {
        return;
    };
    let shim = Box::new(RefCell::new(Shim {
        dev: std::ptr::null_mut(),
        stopped: false,
        read: Vec::new(),
        read_when_ready: input.bool(),
        feed_due: false,
        stream_broken: false,
    }));
    let callbacks = VrngCallbacks {
        ctx: (&*shim as *const RefCell<Shim>).cast_mut().cast(),
        ready: Some(on_ready),
    };
    let mut dev = std::ptr::null_mut();
    // SAFETY: the nub's live handle; the callbacks' context outlives the device.
    let created = unsafe { vrng_create(family.client_handle(), &callbacks, &mut dev) };
    if created != VRNG_OK {
        assert!(dev.is_null(), "vrng_create failed but gave a handle");
        super::finish(family, &sim, &mem, buffer, free_at_start);
        return;
    }
    shim.borrow_mut().dev = dev;
    let mut stream = Stream {
        honest: true,
        ..Stream::default()
    };

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            0..=2 => {
                let len = u32::from(input.u16() % 4096);
                let overstate = input.u8().is_multiple_of(8);
                if sim.queue_info(REQUEST_QUEUE).is_some_and(|q| q.ready) {
                    stream.serve(&sim, len, overstate);
                }
            }
            3 if sim.queue_info(REQUEST_QUEUE).is_some_and(|q| q.ready) => {
                stream.honest = false;
                let id = input.u32() % (u32::from(queue_size) * 2 + 1);
                sim.complete_raw(REQUEST_QUEUE, id, input.u32());
                sim.signal_used(REQUEST_QUEUE);
            }
            4 => {
                stream.honest = false;
                sim.trigger_needs_reset();
            }
            5 | 6 => super::deliver_interrupts(input, &family),
            7 => {
                // The feed timer fires (brought forward by `ready`, or its period): one
                // feed of at most VRNG_FEED_BYTES; sometimes a read of another size.
                let due = std::mem::take(&mut shim.borrow_mut().feed_due);
                let len = if due || input.bool() {
                    VRNG_FEED_BYTES as usize
                } else {
                    usize::from(input.u16() % 300)
                };
                read(&shim, dev, len);
            }
            8 => {
                let mut stats = VrngStats::default();
                // SAFETY: the live handle; a local out-pointer.
                assert_eq!(unsafe { vrng_stats(dev, &mut stats) }, VRNG_OK);
                assert!(
                    stats.bytes_read <= stats.bytes_received,
                    "read {} bytes of {} received",
                    stats.bytes_read,
                    stats.bytes_received
                );
            }
            _ => {
                match input.u8() % 4 {
                    0 => {
                        shim.borrow_mut().stream_broken = true;
                        // SAFETY: the live handle.
                        assert!(unsafe { vrng_suspend(dev) } != VRNG_E_INVALID);
                    }
                    1 => {
                        // SAFETY: the live handle.
                        assert!(unsafe { vrng_resume(dev) } != VRNG_E_INVALID);
                    }
                    2 if input.u8().is_multiple_of(4) => {
                        // SAFETY: the live handle.
                        unsafe { vrng_stop(dev) };
                        shim.borrow_mut().stopped = true;
                    }
                    _ => {}
                }
            }
        }
        let mut stats = VrngStats::default();
        // SAFETY: the live handle; a local out-pointer.
        unsafe { vrng_stats(dev, &mut stats) };
        let s = shim.borrow();
        if stream.honest && !s.stream_broken && stats.recoveries == 0 {
            let expected: Vec<u8> = (0..s.read.len() as u64).map(|i| (i % 251) as u8).collect();
            assert!(
                s.read == expected,
                "an honest device's stream read out of order, with gaps or repeats"
            );
        }
    }

    if input.bool() {
        // SAFETY: the live handle.
        unsafe { vrng_stop(dev) };
        shim.borrow_mut().stopped = true;
    }
    // SAFETY: the handle from vrng_create, not used again.
    unsafe { vrng_destroy(dev) };
    super::finish(family, &sim, &mem, buffer, free_at_start);
}
