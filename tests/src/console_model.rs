//! Device-side virtio-console (virtio-serial) backend over the [`Sim`], written from the
//! spec and QEMU 7.2's `virtio-serial-bus.c` behaviour, independently of the driver:
//!
//! - port `n`'s queues (port 0: 0/1, control: 2/3, port n: 2n+2/2n+3);
//! - the control protocol as QEMU speaks it: on DEVICE_READY 1 it sends PORT_ADD for every
//!   port it has; on PORT_READY 1 it sends CONSOLE_PORT for a console port, PORT_NAME for a
//!   named one and PORT_OPEN 1 when the host side is connected; PORT_OPEN from the guest
//!   updates the port's guest state;
//! - transmitted data is collected per port (chains completed with length 0); received
//!   data is written into the buffers the driver posted for that port;
//! - emergency writes are what the sim recorded as 32-bit writes of `emerg_wr` (offset 8);
//! - raw control messages for hostile-device tests.

use std::collections::{BTreeMap, VecDeque};

use virtio_core::VirtioDevice;
use virtio_pci::{PciTransport, Preference, probe};

use crate::mem::IdentityMemory;
use crate::sim::{Chain, Sim, SimBars, SimConfig, SimEvent, SimIrq};

pub const CONTROL_RX: u16 = 2;
pub const CONTROL_TX: u16 = 3;

pub const F_SIZE: u64 = 1 << 0;
pub const F_MULTIPORT: u64 = 1 << 1;
pub const F_EMERG_WRITE: u64 = 1 << 2;

pub const DEVICE_READY: u16 = 0;
pub const PORT_ADD: u16 = 1;
pub const PORT_REMOVE: u16 = 2;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const RESIZE: u16 = 5;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

/// The bus the console tests drive.
pub type SimConsoleBus = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;

pub fn bus(sim: &Sim, pref: Preference) -> SimConsoleBus {
    let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
    VirtioDevice::new(t, sim.memory(), sim.irq())
}

pub const fn rx_queue(port: u32) -> u16 {
    if port == 0 { 0 } else { (2 * port + 2) as u16 }
}
pub const fn tx_queue(port: u32) -> u16 {
    rx_queue(port) + 1
}

/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr.
pub fn config_bytes(cols: u16, rows: u16, max_nr_ports: u32) -> Vec<u8> {
    let mut c = Vec::with_capacity(12);
    c.extend_from_slice(&cols.to_le_bytes());
    c.extend_from_slice(&rows.to_le_bytes());
    c.extend_from_slice(&max_nr_ports.to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c
}

/// Queue sizes for a device with `max_nr_ports` ports (control queues included).
pub fn queue_sizes(max_nr_ports: u32, size: u16) -> Vec<u16> {
    vec![size; 2 * max_nr_ports as usize + 2]
}

/// A control message as bytes: header, then payload.
pub fn control_bytes(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&event.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// A control message the guest sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuestControl {
    pub id: u32,
    pub event: u16,
    pub value: u16,
    /// Bytes in the chain (8 for a well-formed message).
    pub len: usize,
}

/// One port of the device.
#[derive(Clone, Debug, Default)]
pub struct ModelPort {
    pub name: Option<String>,
    pub console: bool,
    /// Host side connected (sent as PORT_OPEN 1 after PORT_READY).
    pub host_open: bool,
    /// The guest answered PORT_READY with this value.
    pub guest_ready: Option<u16>,
    /// Last PORT_OPEN from the guest.
    pub guest_open: Option<bool>,
    /// Whether PORT_ADD was sent (and no PORT_REMOVE since).
    pub added: bool,
}

/// The device side of one virtio-serial function.
pub struct ConsoleModel {
    pub sim: Sim,
    pub ports: BTreeMap<u32, ModelPort>,
    /// Answer guest messages like QEMU (PORT_ADD on DEVICE_READY, ... on PORT_READY).
    pub auto: bool,
    control_bufs: VecDeque<Chain>,
    rx_bufs: BTreeMap<u32, VecDeque<Chain>>,
    tx_data: BTreeMap<u32, Vec<u8>>,
    guest_msgs: Vec<GuestControl>,
    pub device_ready: Option<u16>,
    /// The device's resets when the held buffers were last taken: a reset drops them.
    resets: u64,
}

impl ConsoleModel {
    pub fn new(sim: &Sim) -> Self {
        ConsoleModel {
            sim: sim.clone(),
            ports: BTreeMap::new(),
            auto: true,
            control_bufs: VecDeque::new(),
            rx_bufs: BTreeMap::new(),
            tx_data: BTreeMap::new(),
            guest_msgs: Vec::new(),
            device_ready: None,
            resets: sim.resets(),
        }
    }

    /// Declares a port the device has (announced after DEVICE_READY).
    pub fn port(mut self, id: u32, name: Option<&str>, console: bool, host_open: bool) -> Self {
        self.ports.insert(
            id,
            ModelPort {
                name: name.map(str::to_string),
                console,
                host_open,
                ..Default::default()
            },
        );
        self
    }

    fn multiport(&self) -> bool {
        self.sim.driver_features() & F_MULTIPORT != 0
    }

    /// Buffers held from before a reset belong to rings that are gone (QEMU drops its
    /// in-flight elements on reset): completing one would name a buffer of the new rings.
    fn forget_after_reset(&mut self) {
        let resets = self.sim.resets();
        if resets != self.resets {
            self.resets = resets;
            self.control_bufs.clear();
            self.rx_bufs.clear();
        }
    }

    /// Control receive buffers the driver posted and the model holds.
    pub fn control_buffers(&mut self) -> usize {
        self.forget_after_reset();
        self.control_bufs.extend(self.sim.pop_chains(CONTROL_RX));
        self.control_bufs.len()
    }

    /// Sends a raw control message (any bytes) into the next control buffer, completing it
    /// with `used_len` (default: the bytes written).
    pub fn send_raw(&mut self, bytes: &[u8], used_len: Option<u32>) -> Result<(), String> {
        self.control_buffers();
        let c = self
            .control_bufs
            .pop_front()
            .ok_or("no control receive buffer")?;
        let n = self.sim.write_chain(&c, bytes);
        self.sim.complete(CONTROL_RX, c.head, used_len.unwrap_or(n));
        self.sim.signal_used(CONTROL_RX);
        Ok(())
    }

    /// Sends one control message.
    pub fn send(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) -> Result<(), String> {
        self.send_raw(&control_bytes(id, event, value, payload), None)
    }

    /// PORT_NAME as QEMU 7.2's `send_control_msg` sends it: the name and a NUL, copied as
    /// far as the buffer goes, completed with the whole length (`8 + strlen + 1`) even when
    /// that is more than the buffer holds.
    pub fn send_name(&mut self, id: u32, name: &str) -> Result<(), String> {
        let mut payload = name.as_bytes().to_vec();
        payload.push(0);
        let msg = control_bytes(id, PORT_NAME, 1, &payload);
        let len = msg.len() as u32;
        self.send_raw(&msg, Some(len))
    }

    /// PORT_ADD for `id` (QEMU hot-plug).
    pub fn add_port(&mut self, id: u32) -> Result<(), String> {
        self.ports.entry(id).or_default().added = true;
        self.send(id, PORT_ADD, 0, &[])
    }

    /// PORT_REMOVE for `id` (QEMU hot-unplug).
    pub fn remove_port(&mut self, id: u32) -> Result<(), String> {
        if let Some(p) = self.ports.get_mut(&id) {
            p.added = false;
            p.guest_ready = None;
            p.guest_open = None;
        }
        self.send(id, PORT_REMOVE, 0, &[])
    }

    /// Host side opens/closes the port (PORT_OPEN from the device).
    pub fn host_open(&mut self, id: u32, open: bool) -> Result<(), String> {
        self.ports.entry(id).or_default().host_open = open;
        self.send(id, PORT_OPEN, u16::from(open), &[])
    }

    /// RESIZE with `struct virtio_console_resize { cols, rows }`.
    pub fn resize(&mut self, id: u32, cols: u16, rows: u16) -> Result<(), String> {
        let mut p = cols.to_le_bytes().to_vec();
        p.extend_from_slice(&rows.to_le_bytes());
        self.send(id, RESIZE, 0, &p)
    }

    /// Reads the guest's control messages and answers them like QEMU (when `auto`).
    /// Returns the messages read.
    pub fn process(&mut self) -> Result<Vec<GuestControl>, String> {
        let chains = self.sim.pop_chains(CONTROL_TX);
        let mut msgs = Vec::new();
        for c in &chains {
            let b = self.sim.read_chain(c);
            self.sim.complete(CONTROL_TX, c.head, 0);
            if b.len() < 8 {
                msgs.push(GuestControl {
                    id: u32::MAX,
                    event: u16::MAX,
                    value: 0,
                    len: b.len(),
                });
                continue;
            }
            msgs.push(GuestControl {
                id: u32::from_le_bytes(b[0..4].try_into().unwrap()),
                event: u16::from_le_bytes(b[4..6].try_into().unwrap()),
                value: u16::from_le_bytes(b[6..8].try_into().unwrap()),
                len: b.len(),
            });
        }
        if !chains.is_empty() {
            self.sim.signal_used(CONTROL_TX);
        }
        for m in &msgs {
            self.guest_msgs.push(*m);
            match m.event {
                DEVICE_READY => {
                    self.device_ready = Some(m.value);
                    if self.auto && m.value == 1 {
                        let ids: Vec<u32> = self.ports.keys().copied().collect();
                        for id in ids {
                            self.add_port(id)?;
                        }
                    }
                }
                PORT_READY => {
                    let p = self.ports.entry(m.id).or_default();
                    p.guest_ready = Some(m.value);
                    let p = p.clone();
                    if self.auto && m.value == 1 {
                        if p.console {
                            self.send(m.id, CONSOLE_PORT, 1, &[])?;
                        }
                        if let Some(n) = &p.name {
                            self.send_name(m.id, n)?;
                        }
                        if p.host_open {
                            self.send(m.id, PORT_OPEN, 1, &[])?;
                        }
                    }
                }
                PORT_OPEN => {
                    self.ports.entry(m.id).or_default().guest_open = Some(m.value == 1);
                }
                _ => {}
            }
        }
        Ok(msgs)
    }

    /// Every control message the guest has sent so far.
    pub fn guest_messages(&self) -> &[GuestControl] {
        &self.guest_msgs
    }

    /// Pops and completes the port's transmitted chains; returns all bytes received on the
    /// port so far (and clears them).
    pub fn take_tx(&mut self, port: u32) -> Vec<u8> {
        let q = tx_queue(port);
        let chains = self.sim.pop_chains(q);
        for c in &chains {
            let b = self.sim.read_chain(c);
            self.tx_data.entry(port).or_default().extend_from_slice(&b);
            self.sim.complete(q, c.head, 0);
        }
        if !chains.is_empty() {
            self.sim.signal_used(q);
        }
        self.tx_data.remove(&port).unwrap_or_default()
    }

    /// Pops the port's transmitted chains without completing them (host not reading).
    pub fn hold_tx(&mut self, port: u32) -> Vec<(Chain, Vec<u8>)> {
        self.sim
            .pop_chains(tx_queue(port))
            .into_iter()
            .map(|c| {
                let b = self.sim.read_chain(&c);
                (c, b)
            })
            .collect()
    }

    /// Completes held transmit chains.
    pub fn complete_tx(&mut self, port: u32, chains: &[Chain]) {
        for c in chains {
            self.sim.complete(tx_queue(port), c.head, 0);
        }
        self.sim.signal_used(tx_queue(port));
    }

    /// Receive buffers the driver posted for `port` (held by the model).
    pub fn rx_buffers(&mut self, port: u32) -> usize {
        self.forget_after_reset();
        let chains = self.sim.pop_chains(rx_queue(port));
        let q = self.rx_bufs.entry(port).or_default();
        q.extend(chains);
        q.len()
    }

    /// Writes `data` into the port's receive buffers (as many as needed, like QEMU's
    /// `virtio_serial_write`). Returns the buffers used; fails if they do not suffice.
    pub fn inject_rx(&mut self, port: u32, data: &[u8]) -> Result<usize, String> {
        self.rx_buffers(port);
        let q = rx_queue(port);
        let bufs = self.rx_bufs.entry(port).or_default();
        let room: usize = bufs.iter().map(|c| c.writable_len() as usize).sum();
        if room < data.len() {
            return Err(format!(
                "{} bytes do not fit {room} bytes of buffers",
                data.len()
            ));
        }
        let mut rest = data;
        let mut used = 0;
        while !rest.is_empty() {
            let c = bufs.pop_front().ok_or("no receive buffer")?;
            let n = self.sim.write_chain(&c, rest);
            rest = &rest[n as usize..];
            self.sim.complete(q, c.head, n);
            used += 1;
        }
        self.sim.signal_used(q);
        Ok(used)
    }

    /// Bytes written through `emerg_wr` (32-bit writes at config offset 8), in order.
    pub fn emergency_bytes(&self) -> Vec<u8> {
        self.sim
            .events()
            .into_iter()
            .filter_map(|e| match e {
                SimEvent::DeviceConfigWrite {
                    offset: 8,
                    value,
                    width: 4,
                } => Some(value as u8),
                _ => None,
            })
            .collect()
    }

    /// Whether MULTIPORT was negotiated.
    pub fn is_multiport(&self) -> bool {
        self.multiport()
    }

    /// Sets cols/rows in config and raises a config interrupt.
    pub fn set_size(&self, cols: u16, rows: u16) {
        let mut b = cols.to_le_bytes().to_vec();
        b.extend_from_slice(&rows.to_le_bytes());
        self.sim.set_device_config(0, &b);
        self.sim.raise_config_interrupt();
    }
}
