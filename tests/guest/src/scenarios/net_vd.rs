//! `net-vd`: the `net` scenario's smoltcp stack, DHCP lease and TCP transfer both ways
//! (`net/stack.rs`, the same code) over the `virtio-drivers` crate (rcore-os) instead of our
//! driver: `VirtIONet` over its own `transport::pci::PciTransport`, with a [`Hal`] for this
//! guest's identity-mapped memory. For `cargo xtask bench net`.
//!
//! How it is driven, and why:
//! - virtio-drivers has no interrupt handling (no MSI-X setup, no handler API beyond
//!   `ack_interrupt`), so it is polled, as its users and its own smoltcp example do: the
//!   loop never halts, `receive` pops the used ring, `send` queues one frame, notifies and
//!   spins until the device has used it. Nothing in the guest takes an interrupt; QEMU still
//!   *sends* them (with EVENT_IDX the crate moves `used_event` on every pop, and
//!   `disable_interrupts` is a no-op under EVENT_IDX), which its trace shows;
//! - it keeps no counters, so the guest reports throughput and packets (counted in this
//!   adapter) and the host takes kicks and interrupts per phase from QEMU's trace (the
//!   phases are marked in the trace, see `net/stack.rs`);
//! - it negotiates MAC, STATUS, EVENT_IDX, INDIRECT_DESC and VERSION_1 only (no MRG_RXBUF,
//!   no offloads), modern PCI only;
//! - queues of [`QUEUE_SIZE`] = 256 entries, QEMU's default and what our driver uses, and
//!   2048-byte receive buffers (the crate's example), all posted at start.
//!
//! Parameters: `net_port=` (required), `net_bytes=` (default 64 MiB), and as in `net-tap`,
//! `net_ip=` with `net_peer=` for a static address instead of DHCP: `net-vd-tap` runs it
//! over the same tap in a network namespace as our driver's `net-tap` (no offloads: the
//! crate negotiates none). No link test.

use super::Env;
use super::net::stack::{self, Counters, Nic, Stack};
use super::vd::{self, GuestHal};
use crate::check;
use crate::report;
use core::cell::{Cell, RefCell};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::pci::PciTransport;
use virtio_net::MacAddr;

/// Ring entries per queue.
pub const QUEUE_SIZE: usize = 256;
/// Receive buffer length (header + frame), as in the crate's smoltcp example.
const BUF_LEN: usize = 2048;

type Vd = VirtIONet<GuestHal, PciTransport, QUEUE_SIZE>;

/// `smoltcp::phy::Device` over [`Vd`], as the crate's smoltcp example builds it: an
/// [`RxBuffer`] is lent to smoltcp and recycled after; a transmit builds a `TxBuffer` and
/// sends it (blocking until the device used it). The tokens share the driver through a
/// `RefCell` (smoltcp consumes the transmit token inside the receive token's closure).
pub struct VdPhy {
    net: RefCell<Vd>,
    rx_frames: Cell<u64>,
    tx_frames: Cell<u64>,
    errors: Cell<u64>,
}

pub struct VdRx<'a> {
    buf: RxBuffer,
    phy: &'a VdPhy,
}

impl RxToken for VdRx<'_> {
    fn consume<R, F>(mut self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(self.buf.packet_mut());
        if self
            .phy
            .net
            .borrow_mut()
            .recycle_rx_buffer(self.buf)
            .is_err()
        {
            self.phy.errors.set(self.phy.errors.get() + 1);
        }
        r
    }
}

pub struct VdTx<'a> {
    phy: &'a VdPhy,
}

impl TxToken for VdTx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.phy.net.borrow().new_tx_buffer(len);
        let r = f(buf.packet_mut());
        match self.phy.net.borrow_mut().send(buf) {
            Ok(()) => self.phy.tx_frames.set(self.phy.tx_frames.get() + 1),
            Err(_) => self.phy.errors.set(self.phy.errors.get() + 1),
        }
        r
    }
}

impl Device for VdPhy {
    type RxToken<'a> = VdRx<'a>;
    type TxToken<'a> = VdTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(VdRx<'_>, VdTx<'_>)> {
        let buf = {
            let mut net = self.net.borrow_mut();
            if !net.can_recv() {
                return None;
            }
            match net.receive() {
                Ok(b) => b,
                Err(_) => {
                    self.errors.set(self.errors.get() + 1);
                    return None;
                }
            }
        };
        self.rx_frames.set(self.rx_frames.get() + 1);
        let phy = &*self;
        Some((VdRx { buf, phy }, VdTx { phy }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<VdTx<'_>> {
        self.net.borrow().can_send().then_some(VdTx { phy: &*self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = None;
        caps
    }
}

impl Nic for VdPhy {
    /// Nothing to take: no interrupts, and `send` already waited for its completion.
    fn service(&mut self) {}
    /// `send` notified already.
    fn flush(&mut self) {}
    /// Polled: never halt.
    fn busy(&self) -> bool {
        true
    }
    fn halt(&mut self, _ms: u64) {}
    fn counters(&mut self) -> Counters {
        Counters {
            rx_frames: self.rx_frames.get(),
            tx_frames: self.tx_frames.get(),
            ..Counters::default()
        }
    }
}

pub fn run(env: &mut Env) {
    let Some(func) = env.find_virtio(virtio_core::DeviceType::Net).cloned() else {
        check!("net.present", false, "no virtio-net on the bus");
        return;
    };
    let Some(port) = env
        .cmdline
        .get("net_port")
        .and_then(|p| p.parse::<u16>().ok())
    else {
        check!("net.port", false, "no net_port= on the command line");
        return;
    };
    let bytes = env.cmdline.get_u64("net_bytes", 64 << 20);
    let Some(addressing) = stack::addressing(&env.cmdline) else {
        return;
    };

    // Decode + bus master on, BARs mapped uncacheable; interrupts stay off.
    let _dev = env.open(&func);
    let transport = match vd::transport(&func) {
        Ok(t) => t,
        Err(e) => {
            check!("net.init", false, "{} {e}", func.addr);
            return;
        }
    };
    let net: Vd = match VirtIONet::new(transport, BUF_LEN) {
        Ok(n) => n,
        Err(e) => {
            check!("net.init", false, "{} VirtIONet::new: {e:?}", func.addr);
            return;
        }
    };
    let mac = net.mac_address();
    check!(
        "net.init",
        true,
        "{} virtio-drivers VirtIONet, polled, queues of {QUEUE_SIZE}, {BUF_LEN}-byte rx buffers, mac={}",
        func.addr,
        MacAddr(mac)
    );
    let phy = VdPhy {
        net: RefCell::new(net),
        rx_frames: Cell::new(0),
        tx_frames: Cell::new(0),
        errors: Cell::new(0),
    };
    let mut stack = Stack::new(phy, mac);
    if stack.address(addressing) {
        stack.transfer("net", port, 0, bytes, bytes, true);
    }
    let p = &stack.phy;
    report::stat("net.rx_frames", p.rx_frames.get());
    report::stat("net.tx_frames", p.tx_frames.get());
    report::stat("net.vd.errors", p.errors.get());
}
