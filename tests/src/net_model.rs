//! Device-side network backend over the [`Sim`]: what QEMU's virtio-net does with the rings,
//! written independently of the driver so the two can be checked against each other.
//!
//! - transmit: pops chains of queue 1, splits the virtio header (10 or 12 bytes, from the
//!   negotiated features) from the frame, completes them with length 0;
//! - receive: keeps the buffers the driver made available, writes injected frames with
//!   their header, spreading a frame over several buffers with `num_buffers` when
//!   MRG_RXBUF is negotiated (QEMU `virtio_net_receive_rcu`);
//! - control: parses `class`/`command` and data, writes the ack (QEMU
//!   `virtio_net_handle_ctrl`); [`CtrlResponder`] does this on a thread, since the driver
//!   waits for the ack synchronously;
//! - link status and announce through config changes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_core::VirtioDevice;
use virtio_pci::{PciTransport, Preference, probe};

use crate::mem::IdentityMemory;
use crate::sim::{Chain, Sim, SimBars, SimConfig, SimInterrupt, SimIrq};

pub const RX: u16 = 0;
pub const TX: u16 = 1;
pub const CTRL: u16 = 2;

const F_VERSION_1: u64 = 1 << 32;
const F_MRG_RXBUF: u64 = 1 << 15;

/// The bus the net tests drive: virtio-core's device over the PCI transport and the sim.
pub type SimNetBus = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;

/// Probes the sim's function and wraps it in a [`SimNetBus`].
pub fn bus(sim: &Sim, pref: Preference) -> SimNetBus {
    let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
    VirtioDevice::new(t, sim.memory(), sim.irq())
}

/// Device config bytes (§5.1.4): mac, status, max_virtqueue_pairs, mtu, speed, duplex.
/// A test Ethernet frame of `len` bytes to `dst`: a source MAC and payload derived from
/// `seed`, ethertype IPv4.
pub fn frame(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    v[..6].copy_from_slice(&dst);
    v[6..12].copy_from_slice(&[0x52, 0x54, 0, 0xAA, 0xBB, seed]);
    v[12..14].copy_from_slice(&[0x08, 0x00]);
    v
}

pub fn config_bytes(mac: [u8; 6], status: u16, mtu: u16, speed: u32, duplex: u8) -> Vec<u8> {
    let mut c = Vec::with_capacity(20);
    c.extend_from_slice(&mac);
    c.extend_from_slice(&status.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&mtu.to_le_bytes());
    c.extend_from_slice(&speed.to_le_bytes());
    c.push(duplex);
    c.extend_from_slice(&[0, 0, 0]);
    c
}

/// A received-by-the-device (transmitted) frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxFrame {
    /// The virtio header as sent (10 or 12 bytes).
    pub header: Vec<u8>,
    /// The Ethernet frame.
    pub data: Vec<u8>,
    /// Descriptors in the chain (after indirect expansion).
    pub descs: usize,
    /// Whether the header travelled in a descriptor of its own.
    pub header_alone: bool,
}

/// One control command as the device saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrlCommand {
    pub class: u8,
    pub command: u8,
    /// The bytes after the 2-byte header, per descriptor.
    pub data: Vec<Vec<u8>>,
    /// Device-writable bytes offered for the ack.
    pub ack_len: u32,
}

/// The device side of one virtio-net function.
pub struct NetModel {
    pub sim: Sim,
    rx_avail: VecDeque<Chain>,
    /// `Sim::resets` when `rx_avail` was filled: a device reset forgets the buffers it
    /// held (QEMU's `virtio_reset`), and so does the model.
    resets_seen: u64,
}

impl NetModel {
    pub fn new(sim: &Sim) -> Self {
        NetModel {
            sim: sim.clone(),
            rx_avail: VecDeque::new(),
            resets_seen: sim.resets(),
        }
    }

    /// Header length for the negotiated features (§5.1.6).
    pub fn hdr_len(&self) -> usize {
        if self.sim.driver_features() & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    pub fn mergeable(&self) -> bool {
        self.sim.driver_features() & F_MRG_RXBUF != 0
    }

    fn split_tx(&self, c: &Chain) -> TxFrame {
        let bytes = self.sim.read_chain(c);
        let h = self.hdr_len().min(bytes.len());
        TxFrame {
            header: bytes[..h].to_vec(),
            data: bytes[h..].to_vec(),
            descs: c.descs.len(),
            header_alone: c
                .descs
                .first()
                .is_some_and(|d| d.len as usize == self.hdr_len()),
        }
    }

    /// Pops, reads and completes every transmitted chain, then signals the tx queue.
    pub fn take_tx(&mut self) -> Vec<TxFrame> {
        let chains = self.sim.pop_chains(TX);
        let out = chains.iter().map(|c| self.split_tx(c)).collect();
        for c in &chains {
            self.sim.complete(TX, c.head, 0);
        }
        if !chains.is_empty() {
            self.sim.signal_used(TX);
        }
        out
    }

    /// Pops transmitted chains without completing them (the device is slow).
    pub fn hold_tx(&mut self) -> Vec<(Chain, TxFrame)> {
        self.sim
            .pop_chains(TX)
            .into_iter()
            .map(|c| {
                let f = self.split_tx(&c);
                (c, f)
            })
            .collect()
    }

    /// Completes chains from [`NetModel::hold_tx`] and signals.
    pub fn complete_tx(&mut self, chains: &[Chain]) {
        for c in chains {
            self.sim.complete(TX, c.head, 0);
        }
        self.sim.signal_used(TX);
    }

    /// Receive buffers the driver has made available (and the model holds).
    pub fn rx_available(&mut self) -> usize {
        let resets = self.sim.resets();
        if resets != self.resets_seen {
            self.resets_seen = resets;
            self.rx_avail.clear();
        }
        self.rx_avail.extend(self.sim.pop_chains(RX));
        self.rx_avail.len()
    }

    /// Writable lengths of the receive buffers the model holds, in order.
    pub fn rx_buffer_lens(&mut self) -> Vec<u32> {
        self.rx_available();
        self.rx_avail.iter().map(Chain::writable_len).collect()
    }

    /// Descriptor lengths of each receive buffer the model holds, in order.
    pub fn rx_chain_layouts(&mut self) -> Vec<Vec<u32>> {
        self.rx_available();
        self.rx_avail
            .iter()
            .map(|c| c.descs.iter().map(|d| d.len).collect())
            .collect()
    }

    /// Delivers `payload` with virtio header `hdr` (12 bytes; the first 10 are used on a
    /// legacy device without MRG_RXBUF). With MRG_RXBUF the frame is spread over as many
    /// buffers as needed and `num_buffers` is set. Returns the buffers used.
    pub fn inject_rx(&mut self, hdr: [u8; 12], payload: &[u8]) -> Result<usize, String> {
        let n = self.write_rx(hdr, payload)?;
        self.sim.signal_used(RX);
        Ok(n)
    }

    /// Like [`NetModel::inject_rx`] without signalling the interrupt.
    pub fn write_rx(&mut self, hdr: [u8; 12], payload: &[u8]) -> Result<usize, String> {
        self.rx_available();
        let hl = self.hdr_len();
        let mut bytes = hdr[..hl].to_vec();
        bytes.extend_from_slice(payload);
        if !self.mergeable() {
            let c = self.rx_avail.front().ok_or("no receive buffer")?;
            if (c.writable_len() as usize) < bytes.len() {
                return Err(format!(
                    "frame of {} bytes does not fit a {}-byte buffer",
                    bytes.len(),
                    c.writable_len()
                ));
            }
            let c = self.rx_avail.pop_front().ok_or("no receive buffer")?;
            let n = self.sim.write_chain(&c, &bytes);
            self.sim.complete(RX, c.head, n);
            return Ok(1);
        }
        // Mergeable: count the buffers first (QEMU fails the frame if they do not suffice).
        let mut need = 0;
        let mut room = 0usize;
        for c in &self.rx_avail {
            if room >= bytes.len() {
                break;
            }
            room += c.writable_len() as usize;
            need += 1;
        }
        if room < bytes.len() {
            return Err(format!(
                "{} bytes do not fit the available buffers",
                bytes.len()
            ));
        }
        bytes[10..12].copy_from_slice(&(need as u16).to_le_bytes());
        let mut rest = &bytes[..];
        for _ in 0..need {
            let c = self.rx_avail.pop_front().ok_or("no receive buffer")?;
            let n = self.sim.write_chain(&c, rest);
            rest = &rest[n as usize..];
            self.sim.complete(RX, c.head, n);
        }
        Ok(need)
    }

    /// Hostile delivery: writes each `(bytes, used_len)` into the next buffer and completes
    /// it with `used_len`, whatever the bytes say.
    pub fn inject_rx_raw(&mut self, buffers: &[(Vec<u8>, u32)]) -> Result<(), String> {
        self.rx_available();
        for (bytes, len) in buffers {
            let c = self.rx_avail.pop_front().ok_or("no receive buffer")?;
            self.sim.write_chain(&c, bytes);
            self.sim.complete(RX, c.head, *len);
        }
        self.sim.signal_used(RX);
        Ok(())
    }

    /// Serves every pending control command with `ack`'s answer.
    pub fn serve_ctrl(&mut self, mut ack: impl FnMut(&CtrlCommand) -> u8) -> Vec<CtrlCommand> {
        serve_ctrl(&self.sim, &mut ack)
    }

    /// Sets the link status field (and ANNOUNCE) and raises a config interrupt.
    pub fn set_status(&self, link_up: bool, announce: bool) {
        let s = u16::from(link_up) | (u16::from(announce) << 1);
        self.sim.set_device_config(6, &s.to_le_bytes());
    }

    /// The interrupt vector to hand the driver for the last interrupt raised (MSI-X index,
    /// or `None` for INTx), if any was raised.
    pub fn take_vectors(&self) -> Vec<Option<u16>> {
        self.sim
            .take_interrupts()
            .into_iter()
            .map(|i| match i {
                SimInterrupt::Msix(v) => Some(v),
                SimInterrupt::Intx => None,
            })
            .collect()
    }
}

/// Serves pending control commands on `sim` (shared by the model and the responder).
pub fn serve_ctrl(sim: &Sim, ack: &mut dyn FnMut(&CtrlCommand) -> u8) -> Vec<CtrlCommand> {
    let chains = sim.pop_chains(CTRL);
    let mut out = Vec::new();
    for c in &chains {
        let mem = sim.memory();
        let mut readable = Vec::new();
        for d in c.descs.iter().filter(|d| !d.write_only) {
            readable.push(mem.bytes_at(d.addr, d.len as usize).to_vec());
        }
        let all: Vec<u8> = readable.concat();
        let mut data: Vec<Vec<u8>> = readable.iter().skip(1).cloned().collect();
        if readable.first().is_some_and(|h| h.len() > 2) {
            // ANY_LAYOUT driver merging header and data: split by bytes.
            data = vec![all[2..].to_vec()];
        }
        let cmd = CtrlCommand {
            class: all.first().copied().unwrap_or(0xFF),
            command: all.get(1).copied().unwrap_or(0xFF),
            data,
            ack_len: c.writable_len(),
        };
        let a = ack(&cmd);
        let n = sim.write_chain(c, &[a]);
        sim.complete(CTRL, c.head, n);
        if cmd.class == 3 && cmd.command == 0 && a == 0 {
            // QEMU: an announce ack clears VIRTIO_NET_S_ANNOUNCE (the sim raises a config
            // interrupt for it; QEMU does not).
            let cfg = sim.device_config();
            if cfg.len() >= 8 {
                let s = u16::from_le_bytes([cfg[6], cfg[7]]) & !2;
                sim.set_device_config(6, &s.to_le_bytes());
            }
        }
        out.push(cmd);
    }
    out
}

type AckFn = Box<dyn FnMut(&CtrlCommand) -> u8 + Send>;

/// Serves the control queue on a thread, like a device running beside the driver's
/// synchronous wait.
pub struct CtrlResponder {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<CtrlCommand>>>,
    handle: Option<JoinHandle<()>>,
}

impl CtrlResponder {
    /// Acks every command with `ack`'s answer.
    pub fn spawn(sim: &Sim, mut ack: AckFn) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l, sim) = (stop.clone(), log.clone(), sim.clone());
        let handle = std::thread::spawn(move || {
            // Each command is logged as it is answered, before its completion is published:
            // a driver call that returns on that completion finds it in the log.
            let mut log_and_ack = |c: &CtrlCommand| {
                l.lock().expect("log").push(c.clone());
                ack(c)
            };
            while !s.load(Ordering::Relaxed) {
                if serve_ctrl(&sim, &mut log_and_ack).is_empty() {
                    std::thread::yield_now();
                }
            }
        });
        CtrlResponder {
            stop,
            log,
            handle: Some(handle),
        }
    }

    /// Acks everything with OK.
    pub fn ok(sim: &Sim) -> Self {
        Self::spawn(sim, Box::new(|_| 0))
    }

    /// Commands served so far.
    pub fn commands(&self) -> Vec<CtrlCommand> {
        self.log.lock().expect("log").clone()
    }

    /// Stops the thread and returns every command served.
    pub fn stop(mut self) -> Vec<CtrlCommand> {
        self.halt();
        self.commands()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("responder thread");
        }
    }
}

impl Drop for CtrlResponder {
    fn drop(&mut self) {
        self.halt();
    }
}
