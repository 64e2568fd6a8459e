//! VirtioNet.kext (`virtio-net-kext`) as its IOEthernetController shim drives it
//! (`kexts/VirtioNet/shim/VirtioNetController.cpp`): `outputPacket` → `vnet_transmit`, a
//! `VNET_E_BUSY` stalls the output queue until an event says `restart`; the `events`
//! callback polls again while `rx_more` (a bounded number of rounds, the rest deferred);
//! enable/disable, filters, MAC address, sleep and wake, stop; and the kernel debugger's
//! polled entries at any moment, including from inside a callback (a KDP trap on the same
//! CPU there), which the kext makes with its lock released. The device is hostile
//! (`NetModel` frames with any header, raw receive buffers with any used length, forged
//! completions, held transmits, config bytes, NEEDS_RESET).
//!
//! Oracles: every frame `vnet_transmit` accepted reaches `tx_done` exactly once, and before
//! `vnet_stop` returns; no callback after `vnet_stop`; `rx_frame` only while enabled, its
//! fragments adding up to the frame's length and lying in guest memory; a debugger entry
//! made from inside `tx_done` or `rx_frame` finds the driver free (never `VNET_E_LOCKED`:
//! the network stack is never entered under the lock); a stalled output queue is
//! restarted once an honest device has completed everything; every DMA byte is back after
//! the family stops.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::c_void;

use virtio_core::platform::DmaRegion;
use virtio_kext_abi::VkSegment;
use virtio_net_kext::*;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::net_model::{NetModel, RX, TX};

use crate::input::Input;

const MAX_STEPS: usize = 192;
const BUFFER_BYTES: usize = 16 * 1024;
const DEBUG_SPINS: u32 = 16;

/// A frame the output queue holds after `VNET_E_BUSY`, sent again on `restart`.
#[derive(Clone)]
struct Frame {
    segments: Vec<VkSegment>,
    flags: u32,
    mss: u32,
    headers: Vec<u8>,
}

struct Shim {
    dev: *mut VnetDevice,
    mem: IdentityMemory,
    outstanding: HashSet<usize>,
    /// The frame the output queue stalled on.
    stalled: Option<(usize, Frame)>,
    /// What the shim last enabled (`vnet_enable` answered OK).
    enabled: bool,
    stopping: bool,
    stopped: bool,
    asleep: bool,
    /// An event or a poll reported NEEDS_RESET: the interface is down for good.
    device_failed: bool,
    /// Polls the event handler deferred (`rx_more` after its rounds).
    poll_deferred: bool,
    /// An event said `restart`: the output queue is serviced once the current work-loop
    /// action has returned (`service(kServiceAsync)`).
    restart_pending: bool,
    /// Callbacks try a debugger entry (a KDP trap in the middle of a callback).
    debugger_in_callbacks: bool,
    next_token: usize,
}

impl Shim {
    /// For `tx_done` and `rx_frame`, which the kext makes from inside an entry, with its
    /// lock released.
    fn callback_checks(&self, what: &str) {
        assert!(!self.stopped, "{what} after vnet_stop returned");
        if self.debugger_in_callbacks {
            let frame = [0xAAu8; 60];
            // SAFETY: the live handle; a local frame.
            let status = unsafe { vnet_debug_send(self.dev, frame.as_ptr(), frame.len(), 1) };
            assert!(
                status != VNET_E_LOCKED,
                "a debugger send from inside {what} found the driver locked"
            );
            let mut out = [0u8; 1518];
            let mut len = 0;
            // SAFETY: the live handle; local buffers.
            let status =
                unsafe { vnet_debug_receive(self.dev, out.as_mut_ptr(), 1518, 1, &mut len) };
            assert!(
                status != VNET_E_LOCKED,
                "a debugger receive from inside {what} found the driver locked"
            );
        }
    }
}

fn shim_of<'a>(ctx: *mut c_void) -> &'a RefCell<Shim> {
    // SAFETY: ctx is the target's `RefCell<Shim>`, alive until the device is destroyed.
    unsafe { &*(ctx as *const RefCell<Shim>) }
}

unsafe extern "C" fn on_tx_done(ctx: *mut c_void, token: usize) {
    let mut s = shim_of(ctx).borrow_mut();
    s.callback_checks("tx_done");
    assert!(
        s.outstanding.remove(&token),
        "tx_done({token:#x}): not a frame in flight (twice, or never accepted)"
    );
}

unsafe extern "C" fn on_rx_frame(
    ctx: *mut c_void,
    frags: *const VnetFragment,
    nfrags: usize,
    len: usize,
    _flags: u32,
) {
    let s = shim_of(ctx).borrow();
    s.callback_checks("rx_frame");
    assert!(s.enabled, "rx_frame while disabled");
    assert!(!frags.is_null() || nfrags == 0);
    // SAFETY: the kext's fragment list, valid for the call.
    let frags = unsafe { std::slice::from_raw_parts(frags, nfrags) };
    let mut total = 0usize;
    let mut copy = Vec::new();
    for frag in frags {
        assert!(
            s.mem.contains(frag.data as u64, frag.len) || frag.len <= 2,
            "a fragment of {} bytes outside guest memory",
            frag.len
        );
        // SAFETY: checked above (a 1–2 byte fragment is the kext's own patched checksum).
        copy.extend_from_slice(unsafe { std::slice::from_raw_parts(frag.data, frag.len) });
        total += frag.len;
    }
    assert_eq!(
        total, len,
        "fragments of {total} bytes for a {len}-byte frame"
    );
}

unsafe extern "C" fn on_events(ctx: *mut c_void, events: *const VnetEvents) {
    let shim = shim_of(ctx);
    // SAFETY: the kext's events, valid for the call.
    let events = unsafe { *events };
    assert!(!shim.borrow().stopped, "events after vnet_stop returned");
    handle_events(shim, events);
}

/// The shim's `handleEvents`: poll again while frames wait (a bounded number of rounds),
/// restart the output queue, note a dead device.
fn handle_events(shim: &RefCell<Shim>, mut events: VnetEvents) {
    note(shim, &events);
    announce(shim, &events);
    let mut rounds = 0;
    while events.rx_more != 0 {
        if rounds == VNET_POLLS_PER_EVENT {
            shim.borrow_mut().poll_deferred = true;
            break;
        }
        rounds += 1;
        let dev = shim.borrow().dev;
        // SAFETY: the live handle, outside the kext's lock (events run after it).
        unsafe { vnet_poll(dev, &mut events) };
        note(shim, &events);
        announce(shim, &events);
    }
}

/// An announce request: the shim's gratuitous ARPs (nothing to model here), then the ack.
fn announce(shim: &RefCell<Shim>, events: &VnetEvents) {
    if events.announce == 0 {
        return;
    }
    assert_eq!(events.needs_reset, 0, "announce with NEEDS_RESET");
    let dev = shim.borrow().dev;
    // SAFETY: the live handle, outside the kext's lock (events run after it).
    let status = unsafe { vnet_ack_announce(dev) };
    assert!(status != VNET_E_LOCKED, "vnet_ack_announce answered LOCKED");
}

fn note(shim: &RefCell<Shim>, events: &VnetEvents) {
    let mut s = shim.borrow_mut();
    if events.needs_reset != 0 {
        s.device_failed = true;
    }
    if events.restart != 0 {
        s.restart_pending = true;
    }
}

/// The output queue's service: the stalled frame is sent again.
fn service_output(shim: &RefCell<Shim>) {
    let Some((token, frame)) = shim.borrow_mut().stalled.take() else {
        return;
    };
    transmit(shim, token, frame);
}

/// `outputPacket`: hands the frame to the kext; `BUSY` stalls the queue on it.
fn transmit(shim: &RefCell<Shim>, token: usize, frame: Frame) -> i32 {
    let dev = shim.borrow().dev;
    let mut stop = false;
    // SAFETY: the live handle; the segments and the header copy are alive for the call.
    let status = unsafe {
        vnet_transmit(
            dev,
            frame.segments.as_ptr(),
            frame.segments.len(),
            frame.flags,
            frame.mss,
            frame.headers.as_ptr(),
            frame.headers.len(),
            token,
            &mut stop,
        )
    };
    let mut s = shim.borrow_mut();
    match status {
        VNET_OK => assert!(
            s.outstanding.insert(token),
            "token {token:#x} accepted twice"
        ),
        VNET_E_BUSY => s.stalled = Some((token, frame)),
        VNET_E_INVALID | VNET_E_BAD_FRAME | VNET_E_UNSUPPORTED | VNET_E_DEVICE | VNET_E_STOPPED => {
        }
        other => panic!("vnet_transmit returned {other}"),
    }
    status
}

pub(super) fn run(input: &mut Input) {
    let crate::net::NetSetup {
        sim,
        preference,
        rx_size,
        tx_size,
    } = crate::net::setup(input);
    let Some(super::Started {
        family,
        mem,
        buffer,
        free_at_start,
    }) = super::start_family(&sim, preference, BUFFER_BYTES)
    else {
        return;
    };
    for (i, byte) in mem.slice(&buffer).iter_mut().enumerate() {
        *byte = i as u8;
    }
    let shim = Box::new(RefCell::new(Shim {
        dev: std::ptr::null_mut(),
        mem: mem.clone(),
        outstanding: HashSet::new(),
        stalled: None,
        enabled: false,
        stopping: false,
        stopped: false,
        asleep: false,
        device_failed: false,
        poll_deferred: false,
        restart_pending: false,
        debugger_in_callbacks: input.bool(),
        next_token: 0,
    }));
    let callbacks = VnetCallbacks {
        ctx: (&*shim as *const RefCell<Shim>).cast_mut().cast(),
        tx_done: Some(on_tx_done),
        rx_frame: Some(on_rx_frame),
        events: Some(on_events),
    };
    // A fixed seed: the input's bytes keep their meaning for the corpus.
    let config = VnetConfig { mac_seed: 0x5EED };
    let mut dev = std::ptr::null_mut();
    // SAFETY: the nub's live handle; the callbacks' context outlives the device.
    let created = unsafe { vnet_create(family.client_handle(), &config, &callbacks, &mut dev) };
    if created != VNET_OK {
        assert!(dev.is_null(), "vnet_create failed but gave a handle");
        super::finish(family, &sim, &mem, buffer, free_at_start);
        return;
    }
    shim.borrow_mut().dev = dev;
    let mut model = NetModel::new(&sim);
    // Transmit chains the device holds (slow), with the reset count when it took them: an
    // honest device completes them later, unless a reset took them back.
    let mut held: Vec<(virtio_tests::sim::Chain, u64)> = Vec::new();

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 16 {
            0..=2 => {
                // A stalled output queue sends nothing.
                if shim.borrow().stalled.is_none() {
                    let token = {
                        let mut s = shim.borrow_mut();
                        s.next_token += 1;
                        0x1000 + s.next_token
                    };
                    let frame = frame(input, &mem, &buffer);
                    transmit(&shim, token, frame);
                }
            }
            3 => deferred_poll(&shim, dev),
            4 => {
                if input.bool() {
                    model.take_tx();
                } else {
                    let resets = sim.resets();
                    held.extend(model.hold_tx().into_iter().map(|(c, _)| (c, resets)));
                }
            }
            5 => {
                let queue = if input.bool() { RX } else { TX };
                if sim.queue_info(queue).is_some_and(|q| q.ready) {
                    let size = if queue == RX { rx_size } else { tx_size };
                    sim.complete_raw(queue, input.u32() % (u32::from(size) * 2 + 1), input.u32());
                    sim.signal_used(queue);
                }
            }
            6 | 7 => crate::net::inject_frame(&mut model, input),
            8 => crate::net::inject_raw(&mut model, input),
            9 | 10 => super::deliver_interrupts(input, &family),
            11 => {
                let offset = usize::from(input.u8() % 20);
                let len = usize::from(input.u8() % 8);
                sim.set_device_config(offset, input.take(len));
                sim.raise_config_interrupt();
            }
            12 => debugger(input, dev, &mem, &buffer),
            13 => sim.trigger_needs_reset(),
            14 => shim_control(input, &shim, dev),
            _ => {
                // An honest device finishes everything it was given (what it held too) and
                // interrupts; the shim's deferred polls run (its timer fires).
                model.take_tx();
                let resets = sim.resets();
                let still_held: Vec<_> = std::mem::take(&mut held)
                    .into_iter()
                    .filter(|&(_, r)| r == resets)
                    .map(|(c, _)| c)
                    .collect();
                if !still_held.is_empty() {
                    model.complete_tx(&still_held);
                }
                family.interrupts();
                for _ in 0..64 {
                    if !shim.borrow().poll_deferred {
                        break;
                    }
                    deferred_poll(&shim, dev);
                }
                if std::mem::take(&mut shim.borrow_mut().restart_pending) {
                    service_output(&shim);
                }
                check_output_not_stuck(&shim);
            }
        }
        // The output queue's asynchronous service, after the action that asked for it.
        if std::mem::take(&mut shim.borrow_mut().restart_pending) {
            service_output(&shim);
        }
    }

    if input.bool() {
        stop(&shim, dev);
    } else {
        shim.borrow_mut().stopping = true;
    }
    // SAFETY: the handle from vnet_create, not used again.
    unsafe { vnet_destroy(dev) };
    let s = shim.borrow();
    assert!(
        s.outstanding.is_empty(),
        "frames never handed back: {:?}",
        s.outstanding
    );
    drop(s);
    super::finish(family, &sim, &mem, buffer, free_at_start);
}

/// The shim's deferred poll (its zero-delay timer after the event handler's rounds), which
/// does nothing while asleep.
fn deferred_poll(shim: &RefCell<Shim>, dev: *mut VnetDevice) {
    if shim.borrow().asleep {
        return;
    }
    shim.borrow_mut().poll_deferred = false;
    let mut events = VnetEvents::default();
    // SAFETY: the live handle; a local out-pointer.
    let status = unsafe { vnet_poll(dev, &mut events) };
    assert!(status != VNET_E_LOCKED, "vnet_poll answered LOCKED");
    handle_events(shim, events);
}

/// The controller's own calls: enable/disable, filters, address, info, statistics, sleep
/// and wake, stop.
fn shim_control(input: &mut Input, shim: &RefCell<Shim>, dev: *mut VnetDevice) {
    match input.u8() % 8 {
        0 => {
            let on = !input.u8().is_multiple_of(4);
            // SAFETY: the live handle; local arguments alive for the call.
            if unsafe { vnet_enable(dev, on) } == VNET_OK {
                shim.borrow_mut().enabled = on;
            }
        }
        1 => {
            // SAFETY: the live handle; local arguments alive for the call.
            let status = unsafe { vnet_set_promiscuous(dev, input.bool()) };
            assert!(status != VNET_E_BUSY && status != VNET_E_LOCKED);
        }
        2 => {
            let count = usize::from(input.u8() % 72);
            let addrs: Vec<u8> = (0..count * 6).map(|_| input.u8()).collect();
            // SAFETY: the live handle; local arguments alive for the call.
            let status = unsafe { vnet_set_multicast(dev, addrs.as_ptr(), count) };
            assert!(status != VNET_E_BUSY && status != VNET_E_LOCKED);
        }
        3 => {
            let mac: Vec<u8> = (0..6).map(|_| input.u8()).collect();
            // SAFETY: the live handle; local arguments alive for the call.
            let status = unsafe { vnet_set_mac_address(dev, mac.as_ptr()) };
            assert!(status != VNET_E_BUSY && status != VNET_E_LOCKED);
        }
        4 => {
            let mut info = VnetInfo::default();
            // SAFETY: the live handle; a local out-pointer.
            assert_eq!(unsafe { vnet_info(dev, &mut info) }, VNET_OK);
            assert!(info.tx_max_segments >= 1 && info.max_packet > info.mtu);
            let mut stats = VnetStats::default();
            // SAFETY: the live handle; a local out-pointer.
            assert_eq!(unsafe { vnet_stats(dev, &mut stats) }, VNET_OK);
        }
        5 => {
            let asleep = shim.borrow().asleep;
            if !asleep {
                // The output queue is stopped first, then the device quiesced.
                shim.borrow_mut().asleep = true;
                // SAFETY: the live handle; local arguments alive for the call.
                let status = unsafe { vnet_suspend(dev) };
                assert!(status != VNET_E_LOCKED, "vnet_suspend answered LOCKED");
            } else if {
                // SAFETY: the live handle.
                unsafe { vnet_resume(dev) }
            } == VNET_OK
            {
                let mut s = shim.borrow_mut();
                s.asleep = false;
                s.device_failed = false;
                drop(s);
                service_output(shim);
            }
        }
        6 if input.u8().is_multiple_of(4) => stop(shim, dev),
        _ => {}
    }
}

/// The kernel debugger's polled entries, from the top level (the lock is free).
fn debugger(input: &mut Input, dev: *mut VnetDevice, mem: &IdentityMemory, buffer: &DmaRegion) {
    if input.bool() {
        let len = usize::from(input.u16()) % 1600;
        let offset = usize::from(input.u16()) % (BUFFER_BYTES - len);
        let frame = &mem.slice(buffer)[offset..offset + len];
        // SAFETY: the live handle; `frame` is `len` readable bytes.
        let status = unsafe { vnet_debug_send(dev, frame.as_ptr(), len, DEBUG_SPINS) };
        assert!(
            status != VNET_E_LOCKED,
            "a debugger send with the lock free answered LOCKED"
        );
    } else {
        let mut out = vec![0u8; usize::from(input.u16() % 2048)];
        let mut len = usize::MAX;
        // SAFETY: the live handle; `out` is writable for its length, `len` a local.
        let status =
            unsafe { vnet_debug_receive(dev, out.as_mut_ptr(), out.len(), DEBUG_SPINS, &mut len) };
        assert!(
            status != VNET_E_LOCKED,
            "a debugger receive with the lock free answered LOCKED"
        );
        if status == VNET_OK {
            assert!(len <= out.len(), "received {len} bytes into {}", out.len());
        }
    }
}

/// The output queue never stays stalled once the device completed everything it had,
/// unless the device failed or the controller is stopped, disabled or asleep.
fn check_output_not_stuck(shim: &RefCell<Shim>) {
    let s = shim.borrow();
    if s.stalled.is_some()
        && s.outstanding.is_empty()
        && !s.device_failed
        && !s.stopped
        && !s.asleep
    {
        panic!("the output queue stalled with nothing in flight: no restart will come");
    }
}

fn stop(shim: &RefCell<Shim>, dev: *mut VnetDevice) {
    shim.borrow_mut().stopping = true;
    // SAFETY: the live handle.
    let status = unsafe { vnet_stop(dev) };
    assert_eq!(status, VNET_OK, "vnet_stop with the lock free");
    let mut s = shim.borrow_mut();
    assert!(
        s.outstanding.is_empty(),
        "vnet_stop returned with frames never handed back: {:?}",
        s.outstanding
    );
    s.stopped = true;
}

/// A frame of one to four segments in the buffer, with offload flags and a copy of its
/// first bytes (a valid Ethernet/IP/TCP header or not).
fn frame(input: &mut Input, mem: &IdentityMemory, buffer: &DmaRegion) -> Frame {
    let segments: Vec<VkSegment> = (0..1 + input.u8() % 4)
        .map(|_| {
            let len = 14 + u32::from(input.u16()) % 2000;
            let offset = u64::from(input.u16()) % (BUFFER_BYTES as u64 - u64::from(len));
            VkSegment {
                addr: buffer.daddr + offset,
                len,
                reserved: 0,
            }
        })
        .collect();
    let first = segments[0];
    let take = (first.len as usize).min(VNET_TX_HEADER_BYTES as usize);
    let mut headers = mem.bytes_at(first.addr, take).to_vec();
    // Fuzzed header bytes over the frame's own (offsets in the IP/TCP headers).
    for _ in 0..input.u8() % 4 {
        let at = usize::from(input.u8()) % headers.len();
        headers[at] = input.u8();
    }
    Frame {
        segments,
        flags: u32::from(input.u8() % 16),
        mss: u32::from(input.u16()),
        headers,
    }
}
