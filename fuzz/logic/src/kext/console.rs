//! VirtioConsole.kext (`virtio-console-kext`) as its IOSerialDriverSync shim drives it
//! (`kexts/VirtioConsole/shim/VirtioConsole.cpp`): the device (`ConsoleModel`, built by the
//! driver target's `setup`) answers like QEMU or not, sends control messages of its own
//! (PORT_ADD/REMOVE/NAME/OPEN, CONSOLE_PORT, RESIZE, bogus ids and events, truncated),
//! data with any used length, forged and repeated used ids, config changes, NEEDS_RESET;
//! the shim keeps a nub per published port (`fPorts`/`fKeys`, by `cbPublish` and
//! `cbUnpublish`), fires its settle timer when scheduled, and makes its nubs' calls
//! (acquire, release, setState, getState, watchState, executeEvent, requestEvent,
//! nextEvent, enqueueData and dequeueData, a writer or reader calling again after
//! `VCON_WAIT`) with live keys, withdrawn keys and random ones; emergency writes, sleep and
//! wake, stop in the middle, destroy with or without stop.
//!
//! Oracles: after every call the shim's nubs are exactly the published ports (each nub's
//! key is its port's current publication, and the kext counts as many ports as the shim has
//! nubs); `publish` never comes for a port that still has a nub, and its key's
//! `vcon_port_info` answers with NUL-terminated names; `unpublish` only for the key of a
//! live nub; a key that is no nub's gets the offline answer and changes no live port's
//! state word; transfer counts never exceed the buffer (and are 0 on an error); no callback
//! after `vcon_stop` (or `vcon_destroy`) returned, and none of them leaves a nub; every DMA
//! byte is back after the family stops.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;

use virtio_console_kext::*;
use virtio_tests::console_model::{self as cm, ConsoleModel};
use virtio_tests::sim::{Chain, Sim};

use crate::input::Input;

const MAX_STEPS: usize = 192;
/// The shim's `fPorts` size (`VCON_SHIM_PORTS`).
const SHIM_PORTS: u32 = 63;

/// IOSerialFamily event numbers (`IOSerialStreamSync.h`).
const EVENTS: [u32; 12] = [
    0x05, // PD_E_ACTIVE
    0x0b, // PD_E_TXQ_SIZE
    0x0f, // PD_E_RXQ_SIZE
    0x23, // PD_E_TXQ_AVAILABLE
    0x27, // PD_E_RXQ_AVAILABLE
    0x28, // PD_E_TXQ_FLUSH
    0x2f, // PD_E_RXQ_FLUSH
    0x33, // PD_E_DATA_RATE
    0x3b, // PD_E_DATA_SIZE
    0x53, // PD_E_FLOW_CONTROL
    0xe9, // PD_RS232_E_LINE_BREAK
    0xf3, // PD_RS232_E_STOP_BITS
];
const E_ACTIVE: u32 = 0x05;

/// The shim's state, reached from the kext's callbacks through `ctx`.
struct Shim {
    dev: *mut VconDevice,
    /// `fPorts`/`fKeys`: the live nub's key by port id.
    nubs: BTreeMap<u32, u32>,
    /// Keys whose nub was terminated (their sessions may still call).
    stale: Vec<u32>,
    /// `gatedStop` is running (`fStopping`).
    stopping: bool,
    /// `vcon_stop` (or `vcon_destroy`) returned: no callback may come any more.
    stopped: bool,
    /// The settle timer is armed.
    settle_due: bool,
}

fn shim_of(ctx: *mut c_void) -> &'static RefCell<Shim> {
    // SAFETY: ctx is the target's boxed `RefCell<Shim>`, alive until after vcon_destroy.
    unsafe { &*(ctx as *const RefCell<Shim>) }
}

fn nul_terminated(text: &[std::ffi::c_char]) -> bool {
    text.contains(&0)
}

/// `cbPublish`: the port's names through `vcon_port_info`, then a nub in `fPorts[id]`.
unsafe extern "C" fn on_publish(ctx: *mut c_void, key: u32) {
    let shim = shim_of(ctx);
    let id = key & 0xff;
    let dev = {
        let s = shim.borrow();
        assert!(!s.stopped, "publish({key:#x}) after vcon_stop returned");
        assert!(!s.stopping, "publish({key:#x}) while stopping");
        assert!(
            id < SHIM_PORTS,
            "publish({key:#x}): port {id} beyond the shim's table"
        );
        if let Some(old) = s.nubs.get(&id) {
            panic!("publish({key:#x}): port {id} still has nub {old:#x}");
        }
        s.dev
    };
    // SAFETY: all-zero is a valid VconPortInfo (integers, bools, char arrays).
    let mut info: VconPortInfo = unsafe { std::mem::zeroed() };
    // SAFETY: the live handle, re-entered from its own callback as the shim does; a local
    // out-pointer.
    let status = unsafe { vcon_port_info(dev, key, &mut info) };
    assert_eq!(
        status, VCON_OK,
        "publish({key:#x}): vcon_port_info refuses the key"
    );
    assert_eq!(info.id, id, "publish({key:#x}): info for port {}", info.id);
    assert!(
        nul_terminated(&info.base_name)
            && nul_terminated(&info.suffix)
            && nul_terminated(&info.port_name),
        "publish({key:#x}): names not NUL-terminated"
    );
    assert!(info.base_name[0] != 0, "publish({key:#x}): empty base name");
    let mut s = shim.borrow_mut();
    s.nubs.insert(id, key);
}

/// `cbUnpublish`: terminates the nub, which must be the port's live one.
unsafe extern "C" fn on_unpublish(ctx: *mut c_void, key: u32) {
    let shim = shim_of(ctx);
    let id = key & 0xff;
    let mut s = shim.borrow_mut();
    assert!(!s.stopped, "unpublish({key:#x}) after vcon_stop returned");
    let live = s.nubs.get(&id).copied();
    assert_eq!(
        live,
        Some(key),
        "unpublish({key:#x}): port {id}'s nub is {live:x?}"
    );
    s.nubs.remove(&id);
    s.stale.push(key);
}

unsafe extern "C" fn on_state(ctx: *mut c_void, key: u32) {
    let s = shim_of(ctx).borrow();
    assert!(
        !s.stopped,
        "state_changed({key:#x}) after vcon_stop returned"
    );
    assert!(key != 0, "state_changed for key 0");
}

unsafe extern "C" fn on_resized(ctx: *mut c_void, key: u32, _cols: u16, _rows: u16) {
    let s = shim_of(ctx).borrow();
    assert!(!s.stopped, "resized({key:#x}) after vcon_stop returned");
}

unsafe extern "C" fn on_settle(ctx: *mut c_void, ms: u32) {
    let mut s = shim_of(ctx).borrow_mut();
    assert!(!s.stopped, "schedule_settle after vcon_stop returned");
    assert_eq!(ms, VCON_SETTLE_MS);
    if !s.stopping {
        s.settle_due = true;
    }
}

fn ready(sim: &Sim, queue: u16) -> bool {
    sim.queue_info(queue).is_some_and(|q| q.ready)
}

fn stats(dev: *mut VconDevice) -> VconStats {
    let mut st = VconStats::default();
    // SAFETY: the live handle (or stopped, not destroyed); a local out-pointer.
    assert_eq!(unsafe { vcon_stats(dev, &mut st) }, VCON_OK);
    st
}

/// `Rig::check_nubs`: a nub for each published port and for nothing else.
fn check_nubs(shim: &RefCell<Shim>, dev: *mut VconDevice) {
    let nubs = shim.borrow().nubs.clone();
    for (&id, &key) in &nubs {
        // SAFETY: all-zero is a valid VconPortInfo.
        let mut info: VconPortInfo = unsafe { std::mem::zeroed() };
        // SAFETY: the live handle; a local out-pointer.
        let status = unsafe { vcon_port_info(dev, key, &mut info) };
        assert!(
            status == VCON_OK && info.id == id,
            "port {id}'s nub {key:#x} is not a published port ({status})"
        );
    }
    let st = stats(dev);
    assert_eq!(
        st.ports,
        nubs.len() as u64,
        "a published port has no nub: nubs {nubs:x?}"
    );
}

/// A key for a nub's call: mostly a live nub's, else a withdrawn one or anything.
fn pick_key(input: &mut Input, shim: &RefCell<Shim>) -> u32 {
    let s = shim.borrow();
    match input.u8() % 8 {
        0..=4 if !s.nubs.is_empty() => {
            let i = usize::from(input.u8()) % s.nubs.len();
            *s.nubs.values().nth(i).unwrap_or(&0)
        }
        5 | 6 if !s.stale.is_empty() => {
            let i = usize::from(input.u8()) % s.stale.len();
            s.stale[i]
        }
        _ => match input.u8() % 3 {
            0 => input.u32(),
            1 => (u32::from(input.u8() % 4) << 8) | u32::from(input.u8() % 8),
            _ => u32::from(input.u8()),
        },
    }
}

fn is_live(shim: &RefCell<Shim>, key: u32) -> bool {
    shim.borrow().nubs.get(&(key & 0xff)) == Some(&key)
}

/// The live nubs' state words (getState collects what the device completed first).
fn live_states(shim: &RefCell<Shim>, dev: *mut VconDevice) -> Vec<(u32, u32)> {
    let keys: Vec<u32> = shim.borrow().nubs.values().copied().collect();
    keys.into_iter()
        // SAFETY: the live handle.
        .map(|k| (k, unsafe { vcon_port_get_state(dev, k) }))
        .collect()
}

/// A control message of fuzzer-chosen shape from the device.
fn control(input: &mut Input, model: &mut ConsoleModel, queue_ports: u32) {
    let id = match input.u8() % 8 {
        0 => input.u32(),
        1 => queue_ports + 1 + u32::from(input.u8() % 64),
        _ => u32::from(input.u8()) % (queue_ports + 2),
    };
    let _ = match input.u8() % 10 {
        0 | 1 => model.add_port(id),
        2 => model.remove_port(id),
        3 => model.host_open(id, input.bool()),
        4 => model.resize(id, input.u16(), input.u16()),
        5 => {
            let len = usize::from(input.u8() % 140);
            let name: Vec<u8> = if input.bool() {
                input.take(len).to_vec()
            } else {
                b"org.fuzz.port.name"
                    .iter()
                    .copied()
                    .cycle()
                    .take(len)
                    .collect()
            };
            model.send(id, cm::PORT_NAME, 1, &name)
        }
        6 => model.send(id, cm::CONSOLE_PORT, input.u16() % 2, &[]),
        7 => model.send(id, input.u16(), input.u16(), &[]),
        _ => {
            let event = input.u16() % 10;
            let len = usize::from(input.u8() % 16);
            let mut bytes = cm::control_bytes(id, event, input.u16() % 2, input.take(len));
            bytes.truncate(usize::from(input.u8()) % (bytes.len() + 1));
            let used = match input.u8() % 4 {
                0 => Some(input.u32() % 4096),
                _ => None,
            };
            model.send_raw(&bytes, used)
        }
    };
}

pub(super) fn run(input: &mut Input) {
    let crate::console::ConsoleSetup {
        sim,
        preference,
        model,
        queue_ports,
        ..
    } = crate::console::setup(input);
    let mut model = model;
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
        nubs: BTreeMap::new(),
        stale: Vec::new(),
        stopping: false,
        stopped: false,
        settle_due: false,
    }));
    let callbacks = VconCallbacks {
        ctx: (&*shim as *const RefCell<Shim>).cast_mut().cast(),
        publish: Some(on_publish),
        unpublish: Some(on_unpublish),
        state_changed: Some(on_state),
        resized: Some(on_resized),
        schedule_settle: Some(on_settle),
    };
    // The shim's `fDev`, which `vcon_create` writes before its first callback (cbPublish
    // reads it): the out-pointer is the shim's own field.
    // SAFETY: a field of the boxed shim, which outlives the call; no borrow of the `RefCell`
    // is held while `vcon_create` writes it (the callbacks borrow only while they run, and
    // `*out` is written before the first of them).
    let dev_slot: *mut *mut VconDevice = unsafe { &raw mut (*shim.as_ptr()).dev };
    // SAFETY: the nub's live handle; the callbacks' context outlives the device; `dev_slot`
    // as above.
    let created = unsafe { vcon_create(family.client_handle(), &callbacks, dev_slot) };
    let dev = shim.borrow().dev;
    if created != VCON_OK {
        assert!(dev.is_null(), "vcon_create failed but gave a handle");
        assert!(
            shim.borrow().nubs.is_empty(),
            "a failed create published ports"
        );
        drop(model);
        super::finish(family, &sim, &mem, buffer, free_at_start);
        return;
    }
    assert!(!dev.is_null(), "vcon_create succeeded without a handle");
    check_nubs(&shim, dev);

    let mut held: Vec<(u32, Chain)> = Vec::new();
    let mut resets = sim.resets();
    let nports = queue_ports + 1;

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let port = u32::from(input.u8()) % (nports + 1);
        match input.u8() % 24 {
            // ---- the device ----
            0 | 1 => {
                if model.is_multiport() {
                    let _ = model.process();
                }
            }
            2 | 3 => control(input, &mut model, queue_ports),
            4 => {
                let len = usize::from(input.u16() % 2048);
                let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                if ready(&sim, cm::rx_queue(port)) {
                    let _ = model.inject_rx(port, &data);
                }
            }
            5 => {
                // Receive buffers completed with any used length.
                let q = cm::rx_queue(port);
                let len = input.u32() % 4096;
                if ready(&sim, q) {
                    for c in sim.pop_chains(q) {
                        sim.complete(q, c.head, len);
                    }
                    sim.signal_used(q);
                }
            }
            6 => {
                let take = input.bool();
                if !ready(&sim, cm::tx_queue(port)) {
                } else if take {
                    let _ = model.take_tx(port);
                } else {
                    held.extend(model.hold_tx(port).into_iter().map(|(c, _)| (port, c)));
                }
            }
            7 => {
                // Held transmit chains completed, possibly a second time.
                let chains = if input.bool() {
                    held.clone()
                } else {
                    std::mem::take(&mut held)
                };
                for (p, c) in chains {
                    if ready(&sim, cm::tx_queue(p)) {
                        model.complete_tx(p, &[c]);
                    }
                }
            }
            8 => {
                // A forged used element on any queue.
                let q = u16::from(input.u8()) % (2 * queue_ports as u16 + 2);
                let id = input.u32() % 130;
                let len = input.u32() % 4096;
                if ready(&sim, q) {
                    sim.complete_raw(q, id, len);
                    sim.signal_used(q);
                }
            }
            9 => crate::console::change_config(&mut model, &sim, input),
            10 => {
                if input.u8().is_multiple_of(4) {
                    sim.trigger_needs_reset();
                }
            }
            11 | 12 => super::deliver_interrupts(input, &family),
            // ---- the shim ----
            13 => {
                // The settle timer fires (`settleFired`).
                let due = std::mem::take(&mut shim.borrow_mut().settle_due);
                let spurious = input.u8().is_multiple_of(8);
                if due || spurious {
                    // SAFETY: the live handle.
                    unsafe { vcon_settle(dev) };
                }
            }
            14 => {
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let release = input.bool();
                stale_call(&shim, dev, key, live, |k| {
                    // SAFETY: the live handle.
                    unsafe {
                        if release {
                            vcon_port_release(dev, k)
                        } else {
                            vcon_port_acquire(dev, k)
                        }
                    }
                });
            }
            15 => {
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let event = match input.u8() % 4 {
                    0 => input.u32(),
                    1 => E_ACTIVE,
                    _ => EVENTS[usize::from(input.u8()) % EVENTS.len()],
                };
                let data = match input.u8() % 3 {
                    0 => input.u32(),
                    d => u32::from(d - 1),
                };
                stale_call(&shim, dev, key, live, |k| {
                    // SAFETY: the live handle.
                    unsafe { vcon_port_execute_event(dev, k, event, data) }
                });
            }
            16 => {
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let (state, mask) = (input.u32(), input.u32());
                stale_call(&shim, dev, key, live, |k| {
                    // SAFETY: the live handle.
                    unsafe { vcon_port_set_state(dev, k, state, mask) }
                });
            }
            17 => {
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let (want, mask) = (input.u32(), input.u32());
                stale_call(&shim, dev, key, live, |k| {
                    let mut s = want;
                    // SAFETY: the live handle; a local in/out-pointer.
                    let r = unsafe { vcon_port_watch_state(dev, k, &mut s, mask) };
                    assert!(
                        matches!(
                            r,
                            VCON_OK
                                | VCON_WAIT
                                | VCON_E_INACTIVE
                                | VCON_E_OFFLINE
                                | VCON_E_BAD_ARGUMENT
                                | VCON_E_NOT_OPEN
                        ),
                        "watch_state returned {r}"
                    );
                    r
                });
            }
            18 => {
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let event = EVENTS[usize::from(input.u8()) % EVENTS.len()];
                stale_call(&shim, dev, key, live, |k| {
                    let mut v = 0;
                    // SAFETY: the live handle; a local out-pointer.
                    let r = unsafe { vcon_port_request_event(dev, k, event, &mut v) };
                    // SAFETY: the live handle.
                    let eoq = unsafe { vcon_port_next_event(dev, k) };
                    assert_eq!(eoq, 0, "next_event is not PD_E_EOQ");
                    r
                });
                if !live {
                    // SAFETY: the live handle.
                    let st = unsafe { vcon_port_get_state(dev, key) };
                    assert_eq!(st, 0, "key {key:#x} is no nub's but has state {st:#x}");
                }
            }
            19 => {
                // enqueueData, a sleeping writer calling again after VCON_WAIT.
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let size = usize::from(input.u16() % 12_000);
                let rounds = 1 + input.u8() % 3;
                let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
                stale_call(&shim, dev, key, live, |k| {
                    let mut done = 0usize;
                    let mut r = VCON_OK;
                    for _ in 0..rounds {
                        let rest = &data[done..];
                        let mut n = u32::MAX;
                        // SAFETY: the live handle; `rest` holds its length; `n` is a local.
                        r = unsafe {
                            vcon_port_enqueue_data(dev, k, rest.as_ptr(), rest.len() as u32, &mut n)
                        };
                        check_count(r, n, rest.len(), "enqueue");
                        done += n as usize;
                        if r != VCON_WAIT {
                            break;
                        }
                        if ready(&sim, cm::tx_queue(k & 0xff)) {
                            let _ = model.take_tx(k & 0xff);
                        }
                        family.interrupts();
                    }
                    r
                });
            }
            20 => {
                // dequeueData with a minimum, calling again after VCON_WAIT.
                let key = pick_key(input, &shim);
                let live = is_live(&shim, key);
                let size = 1 + usize::from(input.u16() % 3000);
                let min = u32::from(input.u16()) % (size as u32 + 2);
                let rounds = 1 + input.u8() % 3;
                stale_call(&shim, dev, key, live, |k| {
                    let mut buf = vec![0u8; size];
                    let mut done = 0usize;
                    let mut r = VCON_OK;
                    for _ in 0..rounds {
                        let want = (min as usize).saturating_sub(done) as u32;
                        let rest = &mut buf[done..];
                        let mut n = u32::MAX;
                        // SAFETY: the live handle; `rest` holds its length; `n` is a local.
                        r = unsafe {
                            vcon_port_dequeue_data(
                                dev,
                                k,
                                rest.as_mut_ptr(),
                                rest.len() as u32,
                                &mut n,
                                want,
                            )
                        };
                        check_count(r, n, rest.len(), "dequeue");
                        done += n as usize;
                        if r != VCON_WAIT || done == size {
                            break;
                        }
                        family.interrupts();
                    }
                    r
                });
            }
            21 => {
                let len = usize::from(input.u8() % 64);
                let bytes = input.take(len).to_vec();
                host_reads_port0(&sim, &mut model, &mut held);
                // SAFETY: the live handle; `bytes` holds `len` bytes.
                let r = unsafe { vcon_emergency_write(dev, bytes.as_ptr(), bytes.len()) };
                assert!(
                    matches!(r, VCON_OK | VCON_E_DEVICE | VCON_E_STOPPED),
                    "emergency_write returned {r}"
                );
            }
            22 => {
                // setPowerState (gatedSetPower).
                if input.bool() {
                    // SAFETY: the live handle.
                    let r = unsafe { vcon_suspend(dev) };
                    assert!(
                        matches!(r, VCON_OK | VCON_E_STOPPED),
                        "suspend returned {r}"
                    );
                } else {
                    // SAFETY: the live handle.
                    let r = unsafe { vcon_resume(dev) };
                    assert!(
                        matches!(r, VCON_OK | VCON_E_DEVICE | VCON_E_STOPPED),
                        "resume returned {r}"
                    );
                }
            }
            _ => {
                if input.u8().is_multiple_of(4) {
                    host_reads_port0(&sim, &mut model, &mut held);
                    stop(&shim, dev);
                }
            }
        }
        if sim.resets() != resets {
            // The device was reset (recovery, sleep, stop): what the model held is gone.
            resets = sim.resets();
            let (ports, auto) = (model.ports.clone(), model.auto);
            model = ConsoleModel::new(&sim);
            model.ports = ports;
            model.auto = auto;
            for p in model.ports.values_mut() {
                p.added = false;
                p.guest_ready = None;
                p.guest_open = None;
            }
            held.clear();
        }
        check_nubs(&shim, dev);
    }

    if input.bool() {
        host_reads_port0(&sim, &mut model, &mut held);
        stop(&shim, dev);
    } else {
        // `free` without `stop`: destroy stops the device itself.
        shim.borrow_mut().stopping = true;
    }
    // SAFETY: the handle from vcon_create, not used again (destroy stops it if needed).
    unsafe { vcon_destroy(dev) };
    {
        let mut s = shim.borrow_mut();
        s.stopped = true;
        assert!(s.nubs.is_empty(), "destroy left nubs: {:x?}", s.nubs);
    }
    drop(model);
    super::finish(family, &sim, &mem, buffer, free_at_start);
}

/// Without EMERG_WRITE an emergency write goes through port 0's transmit queue and, while
/// that is full, spins (`poll_spins`, a million rounds): the host reads port 0 first (what
/// it holds included), so an input does not spend seconds in that bounded wait.
fn host_reads_port0(sim: &Sim, model: &mut ConsoleModel, held: &mut Vec<(u32, Chain)>) {
    if sim.driver_features() & cm::F_EMERG_WRITE != 0 || !ready(sim, cm::tx_queue(0)) {
        return;
    }
    let (port0, rest): (Vec<_>, Vec<_>) =
        std::mem::take(held).into_iter().partition(|(p, _)| *p == 0);
    *held = rest;
    let chains: Vec<Chain> = port0.into_iter().map(|(_, c)| c).collect();
    if !chains.is_empty() {
        model.complete_tx(0, &chains);
    }
    let _ = model.take_tx(0);
}

/// `gatedStop`: the goodbye line, then `vcon_stop`, which withdraws every port.
fn stop(shim: &RefCell<Shim>, dev: *mut VconDevice) {
    shim.borrow_mut().stopping = true;
    let bye = b"VirtioConsole: stopping\r\n";
    // SAFETY: the live handle; `bye` holds its length.
    unsafe { vcon_emergency_write(dev, bye.as_ptr(), bye.len()) };
    // SAFETY: the live handle.
    unsafe { vcon_stop(dev) };
    let mut s = shim.borrow_mut();
    s.stopped = true;
    assert!(s.nubs.is_empty(), "vcon_stop left nubs: {:x?}", s.nubs);
}

/// A transfer's count: within the buffer, and nothing on an error.
fn check_count(status: i32, n: u32, len: usize, what: &str) {
    assert!(n as usize <= len, "{what}: count {n} for a buffer of {len}");
    if !matches!(status, VCON_OK | VCON_WAIT) {
        assert_eq!(n, 0, "{what}: count {n} with status {status}");
    }
}

/// A nub's call with `key`: when the key is no live nub's, the answer is offline (stopped
/// for an acquire after stop) and no live port's state word changes.
fn stale_call(
    shim: &RefCell<Shim>,
    dev: *mut VconDevice,
    key: u32,
    live: bool,
    call: impl FnOnce(u32) -> i32,
) {
    if live {
        let r = call(key);
        assert!(
            // Stop withdraws every port: a live key never meets a stopped device.
            (VCON_OK..=VCON_E_BAD_ARGUMENT).contains(&r)
                && r != VCON_E_INVALID
                && r != VCON_E_STOPPED,
            "a call with live key {key:#x} returned {r}"
        );
        return;
    }
    let before = live_states(shim, dev);
    let r = call(key);
    let stopped = shim.borrow().stopped;
    assert!(
        r == VCON_E_OFFLINE || (stopped && r == VCON_E_STOPPED),
        "key {key:#x} names no nub, yet the call answered {r}"
    );
    let after = live_states(shim, dev);
    assert_eq!(
        before, after,
        "a call with key {key:#x}, no nub's, changed a live port"
    );
}
