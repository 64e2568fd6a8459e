//! virtio-net's control queue (CTRL_VQ offered, with CTRL_RX, CTRL_VLAN, CTRL_MAC_ADDR,
//! CTRL_GUEST_OFFLOADS and GUEST_ANNOUNCE as the fuzzer picks them) over the simulated
//! function. The driver waits for each ack synchronously, so the device answers from the
//! notification itself, as the fuzzer scripts it per command: an ack byte of any value
//! (OK, ERR, anything else) with an honest or any used length, no answer at all (the
//! command times out and stays the device's), a late answer on a later step, the same
//! chain completed twice, forged used ids on the control queue; plus the announce bit in
//! `status` with config interrupts, NEEDS_RESET, transmits completed or held, and
//! suspend/resume, which replays every setting through the control queue. The driver sets
//! promiscuous/all-multicast mode, MAC filter tables (over-long ones too), the MAC address,
//! VLANs, guest offloads, acks announcements and sends raw commands of any shape.
//!
//! Oracles: every command returns (the wait is bounded by `ctrl_spins`: a hang is a
//! libFuzzer timeout) after at most one command was sent (a resume at most one per
//! setting); one call notifies the device a bounded number of times; every transmit token
//! comes back exactly once (`tx_reclaim`, `suspend`, `shutdown`); after `shutdown` and drop,
//! guest memory is back to what it was.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use virtio_core::Segment;
use virtio_core::platform::Dma;
use virtio_net::{GuestOffloads, NetConfig, TxOffload, VirtioNet, features as f};
use virtio_tests::net_model::{CTRL, NetModel, config_bytes};
use virtio_tests::sim::{Chain, MODES, Sim, SimBuilder, SimInterrupt, SimMode};

use crate::FloodCount;
use crate::input::Input;

const MAX_STEPS: usize = 160;
const CTRL_SPINS: u32 = 16;

/// How the device answers one control command.
#[derive(Copy, Clone, Debug)]
enum Answer {
    /// Writes `ack` and completes with `len` (`None`: the bytes written).
    Ack { ack: u8, len: Option<u32> },
    /// Keeps the chain (a late answer may follow).
    Hold,
    /// Writes `ack` and completes the chain twice.
    Twice { ack: u8 },
}

#[derive(Default)]
struct Device {
    script: VecDeque<Answer>,
    /// Answer when the script is empty (`None`: OK).
    default: Option<Answer>,
    held: Vec<Chain>,
}

fn answer(input: &mut Input) -> Answer {
    let ack = match input.u8() % 4 {
        0 => 1,
        1 => input.u8(),
        _ => 0,
    };
    match input.u8() % 8 {
        0 => Answer::Hold,
        1 => Answer::Twice { ack },
        2 => Answer::Ack {
            ack,
            len: Some(input.u32() % 4),
        },
        3 => Answer::Ack {
            ack,
            len: Some(input.u32()),
        },
        _ => Answer::Ack { ack, len: None },
    }
}

fn serve(sim: &Sim, dev: &mut Device) {
    for c in sim.pop_chains(CTRL) {
        let a = dev
            .script
            .pop_front()
            .or(dev.default)
            .unwrap_or(Answer::Ack { ack: 0, len: None });
        match a {
            Answer::Hold => dev.held.push(c),
            Answer::Ack { ack, len } => {
                let n = sim.write_chain(&c, &[ack]);
                sim.complete(CTRL, c.head, len.unwrap_or(n));
            }
            Answer::Twice { ack } => {
                let n = sim.write_chain(&c, &[ack]);
                sim.complete(CTRL, c.head, n);
                sim.complete(CTRL, c.head, n);
            }
        }
    }
    sim.signal_used(CTRL);
}

fn macs(input: &mut Input) -> Vec<[u8; 6]> {
    let n = match input.u8() % 8 {
        0 => 60 + usize::from(input.u8() % 8),
        k => usize::from(k),
    };
    (0..n).map(|i| [0x01, 0, 0x5E, 0, 0, i as u8]).collect()
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let optional = [
        f::CTRL_RX,
        f::CTRL_VLAN,
        f::CTRL_MAC_ADDR,
        f::CTRL_GUEST_OFFLOADS,
        f::GUEST_ANNOUNCE,
        f::GUEST_CSUM,
        f::GUEST_TSO4,
        f::MRG_RXBUF,
        f::STATUS,
        f::MAC,
        1 << 28, // INDIRECT_DESC
        1 << 29, // EVENT_IDX
    ];
    let chosen = input.u16();
    let mut offered = optional
        .iter()
        .enumerate()
        .filter(|(i, _)| chosen & (1 << i) != 0)
        .fold(f::CTRL_VQ, |acc, (_, bit)| acc | bit);
    if mode != SimMode::Legacy {
        offered |= 1 << 32;
    }
    // The 12 bits above pick from the list; bit 12 offers the packed ring.
    offered |= crate::packed_if(chosen & (1 << 12) != 0);
    let ctrl_size = 1u16 << (input.u8() % 4);
    let sim = SimBuilder::new(mode, 1)
        .features(offered)
        .queues(&[4, 4, ctrl_size])
        .device_config(&config_bytes([0x52, 0x54, 0, 1, 2, 3], 1, 1500, 1000, 1))
        .memory(crate::mem::guest_memory(1 << 20))
        .build();
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(bus) = crate::sim_device(&sim, preference) else {
        return;
    };
    let config = NetConfig {
        ctrl_spins: CTRL_SPINS,
        rx_buffers: 1 + u16::from(input.u8() % 4),
        ..NetConfig::default()
    };

    let device = Arc::new(Mutex::new(Device::default()));
    let answered = FloodCount::default();
    {
        let (device, answered) = (Arc::clone(&device), answered.clone());
        sim.on_notify(Some(Arc::new(move |sim: &Sim, queue: u16| {
            if queue == CTRL
                && answered.answer()
                && let Ok(mut d) = device.lock()
            {
                serve(sim, &mut d);
            }
        })));
    }
    let Ok(mut driver) = VirtioNet::new(bus, config) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let mut model = NetModel::new(&sim);
    let buffers = mem.alloc_buffer(4096);
    let mut in_flight: HashSet<usize> = HashSet::new();
    let mut next_token = 0usize;
    let complete = |in_flight: &mut HashSet<usize>, token: usize| {
        assert!(
            in_flight.remove(&token),
            "transmit token {token} completed twice or never sent"
        );
    };

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        answered.start();
        let commands = driver.stats().ctrl_commands;
        let mut one_command = true;
        match input.u8() % 20 {
            0..=2 => {
                if let Ok(mut d) = device.lock() {
                    for _ in 0..1 + input.u8() % 3 {
                        let a = answer(&mut input);
                        d.script.push_back(a);
                    }
                }
            }
            3 => {
                if let Ok(mut d) = device.lock() {
                    d.default = input.bool().then(|| answer(&mut input));
                }
            }
            4 => {
                // Late answers to the chains held so far.
                // (After a reset they complete heads of the rebuilt ring: forged ids.)
                let ready = sim.queue_info(CTRL).is_some_and(|q| q.ready);
                if let Ok(mut d) = device.lock()
                    && ready
                {
                    let ack = input.u8();
                    let len = input.u32() % 3;
                    for c in std::mem::take(&mut d.held) {
                        sim.write_chain(&c, &[ack]);
                        sim.complete(CTRL, c.head, len);
                    }
                    sim.signal_used(CTRL);
                }
            }
            5 => {
                if sim.queue_info(CTRL).is_some_and(|q| q.ready) {
                    sim.complete_raw(CTRL, input.u32() % 8, input.u32() % 4);
                    sim.signal_used(CTRL);
                }
            }
            6 => {
                let _ = driver.set_promisc(input.bool());
            }
            7 => {
                let _ = driver.set_allmulti(input.bool());
            }
            8 => {
                let unicast = macs(&mut input);
                let multicast = macs(&mut input);
                let _ = driver.set_mac_filter(&unicast, &multicast);
            }
            9 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&crate::net::pad::<6>(input.take(6)));
                let _ = driver.set_mac_address(mac);
            }
            10 => {
                let vid = input.u16() % 4200;
                let _ = if input.bool() {
                    driver.vlan_add(vid)
                } else {
                    driver.vlan_del(vid)
                };
            }
            11 => {
                let b = input.u8();
                let want = GuestOffloads {
                    csum: b & 1 != 0,
                    tso4: b & 2 != 0,
                    tso6: b & 4 != 0,
                    ecn: b & 8 != 0,
                    ufo: b & 16 != 0,
                };
                let _ = driver.set_guest_offloads(want);
            }
            12 => {
                let _ = driver.ack_announce();
            }
            13 => {
                let class = input.u8();
                let command = input.u8();
                let parts: Vec<Vec<u8>> = (0..input.u8() % 4)
                    .map(|_| {
                        let len = match input.u8() % 4 {
                            0 => 0,
                            1 => 1000 + usize::from(input.u8()),
                            _ => usize::from(input.u8() % 16),
                        };
                        vec![0x42; len]
                    })
                    .collect();
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                let _ = driver.ctrl_command(class, command, &refs);
            }
            14 => {
                let token = next_token;
                next_token += 1;
                let len = 14 + u32::from(input.u16() % 1500);
                let frame = [Segment::new(buffers.daddr, len.min(4096))];
                if driver
                    .transmit(&frame, &TxOffload::default(), token)
                    .is_ok()
                {
                    in_flight.insert(token);
                }
                if input.bool() {
                    model.take_tx();
                }
                if let Ok(r) = driver.tx_reclaim(|t| complete(&mut in_flight, t)) {
                    assert!(r.frames <= next_token);
                }
            }
            15 => {
                model.set_status(input.bool(), input.bool());
                sim.raise_config_interrupt();
                for irq in sim.take_interrupts() {
                    let vector = match irq {
                        SimInterrupt::Msix(v) => Some(v),
                        SimInterrupt::Intx => None,
                    };
                    driver.handle_interrupt(vector);
                }
                if let Ok(ev) = driver.handle_config_change()
                    && ev.announce
                {
                    let _ = driver.ack_announce();
                }
            }
            16 => {
                if driver.is_suspended() {
                    one_command = false;
                    if let Ok(r) = driver.resume() {
                        // One command per setting at most: address, two modes, the filter
                        // table, each VLAN, offloads.
                        assert!(r.restored <= 4 + 4096 + 1);
                        assert!(driver.stats().ctrl_commands - commands <= u64::from(r.restored));
                    }
                } else {
                    let polls = u32::from(input.u8() % 8);
                    if let Ok(r) = driver.suspend(polls, |t| complete(&mut in_flight, t)) {
                        assert!(r.drain_polls <= polls);
                    }
                }
            }
            17 => sim.trigger_needs_reset(),
            _ => {
                let budget = 1 + usize::from(input.u8() % 8);
                let mut n = 0;
                if let Ok(s) = driver.rx_poll(budget, |_| n += 1) {
                    assert!(s.frames + s.dropped <= budget);
                }
            }
        }
        if one_command {
            assert!(
                driver.stats().ctrl_commands - commands <= 1,
                "one call sent several control commands"
            );
        }
        answered.check("notified the control queue");
    }

    sim.on_notify(None);
    driver.shutdown(|token| complete(&mut in_flight, token));
    assert!(
        in_flight.is_empty(),
        "transmit tokens lost at shutdown: {in_flight:?}"
    );
    drop(driver);
    // SAFETY: the driver is gone and the device reset; nothing uses the buffer.
    unsafe { mem.free_coherent(buffers) };
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}
