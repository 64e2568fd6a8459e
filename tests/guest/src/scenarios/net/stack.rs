//! The part of the `net` scenarios that does not depend on the driver: smoltcp over any
//! [`Nic`] (a `smoltcp::phy::Device` plus the few hooks the loop needs), the DHCP lease or
//! the static addresses of a tap, the TCP transfer both ways with the host peer, the
//! word-wise FNV hashes and the per-phase `STAT` lines. `net` and `net-tap` run it over our
//! driver (`phy.rs`), `net-vd` and `net-vd-tap` over the `virtio-drivers` crate
//! (`scenarios/net_vd.rs`).
//!
//! Phase markers: around the receive and send phases of a detailed transfer the guest
//! selects fw_cfg key `0x3F00 | v` (port 0x510; no such key, so nothing happens) with `v`
//! = [`MARK_RECV_START`].. [`MARK_SEND_END`], so a host tracing QEMU's `fw_cfg_select`
//! next to the virtio events can count kicks and interrupts per phase (`xtask bench net`).
//! (`cpu_out` would not do: TCG's `out` does not go through the traced path.)

use crate::check;
use crate::report;
use crate::report::show::Opt;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Cidr};
use virtio_test_stream::{Stream, WordFnv};

const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
/// Seeds of the two directions of connection `c`: host → guest and guest → host.
const SEED_DOWN: u64 = 0xD0D0_0000_0000_0000;
const SEED_UP: u64 = 0x0F0F_0000_0000_0000;
/// Request header: magic, connection, bytes down, bytes up, seed down, seed up.
const MAGIC: &[u8; 8] = b"VNETTST1";
const HEADER_LEN: usize = 48;
/// Host's answer after the upload: bytes received, their `WordFnv` hash, offset of the first
/// byte that differs from the expected stream (`u64::MAX`: none).
const TRAILER_LEN: usize = 24;
const TCP_BUFFER: usize = 256 * 1024;

/// Marker values (fw_cfg key `0x3F00 | v`) at the phase boundaries of a detailed transfer.
pub const MARK_RECV_START: u8 = 0x50;
pub const MARK_RECV_END: u8 = 0x51;
pub const MARK_SEND_START: u8 = 0x52;
pub const MARK_SEND_END: u8 = 0x53;

/// See [`crate::phase_marker`]: QEMU's trace and the instruction-counting plugin see it.
fn marker(v: u8) {
    crate::phase_marker::bench_phase_marker(v);
}

pub fn now() -> Instant {
    Instant::from_micros((crate::time::now_ns() / 1000) as i64)
}

pub fn ms_since(t0: u64) -> u64 {
    (crate::time::now_ns() - t0) / 1_000_000
}

/// Frame, kick and interrupt counters of a device at one moment.
#[derive(Copy, Clone, Default)]
pub struct Counters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Whether the driver counts kicks and interrupts (the fields below); when not, the
    /// host takes them from QEMU's trace.
    pub driver_counts: bool,
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    pub rx_irqs: u64,
    pub tx_irqs: u64,
    pub irqs: u64,
    /// Offloads (our driver on a tap; 0 elsewhere): TSO frames sent and the MSS-sized
    /// segments they become, frames sent with NEEDS_CSUM, coalesced frames received.
    pub tx_tso_frames: u64,
    pub tx_tso_segments: u64,
    pub tx_csum_offloaded: u64,
    pub rx_gso_frames: u64,
    /// Received frames, a coalesced one counted as its segments.
    pub rx_wire_segments: u64,
}

/// What the loop needs from a device besides `smoltcp::phy::Device`.
pub trait Nic: Device {
    /// Before each round: take recorded interrupts, reclaim transmit completions.
    fn service(&mut self);
    /// After each round: notify the device of what the round queued.
    fn flush(&mut self);
    /// Work is waiting that no interrupt will announce (or the device is polled): the loop
    /// must not halt.
    fn busy(&self) -> bool;
    /// Halts until an interrupt, for at most `ms`.
    fn halt(&mut self, ms: u64);
    fn counters(&mut self) -> Counters;
}

/// Called in the middle of each direction of a transfer, with the phase's name
/// (`<transfer>.recv` / `<transfer>.send`): the `net` scenario suspends and resumes the
/// device there, under a live TCP connection.
pub type Midpoint<D> = fn(&mut Stack<D>, &str);

/// The interface, its sockets and the device, and the loop that drives them.
pub struct Stack<D: Nic> {
    pub phy: D,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    /// Run at half of each direction of the transfers started while it is set.
    pub midpoint: Option<Midpoint<D>>,
    /// The host peer's address: slirp's 10.0.2.2, or the tap namespace's end.
    pub peer: Ipv4Address,
}

/// Counters at one moment, to report a phase's share.
#[derive(Copy, Clone, Default)]
struct Snapshot {
    t_ns: u64,
    c: Counters,
}

/// How the interface gets its address.
#[derive(Copy, Clone)]
pub enum Addressing {
    /// From slirp's DHCP server.
    Dhcp,
    /// `net_ip=` and `net_peer=`: a tap in a namespace has no DHCP server.
    Static { ip: Ipv4Cidr, peer: Ipv4Address },
}

/// The addressing `net_ip=` and `net_peer=` ask for (both or neither); `None` after a
/// failed `net.addr` check saying what is wrong with them.
pub fn addressing(cmdline: &crate::cmdline::Cmdline) -> Option<Addressing> {
    match (cmdline.get("net_ip"), cmdline.get("net_peer")) {
        (None, None) => Some(Addressing::Dhcp),
        (Some(ip), Some(peer)) => match (ip.parse::<Ipv4Cidr>(), peer.parse::<Ipv4Address>()) {
            (Ok(ip), Ok(peer)) => Some(Addressing::Static { ip, peer }),
            _ => {
                check!("net.addr", false, "net_ip={ip} net_peer={peer}: not IPv4");
                None
            }
        },
        _ => {
            check!("net.addr", false, "net_ip= and net_peer= go together");
            None
        }
    }
}

impl<D: Nic> Stack<D> {
    pub fn new(mut phy: D, mac: [u8; 6]) -> Self {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = crate::time::now_ns() ^ 0x5EED_1234_ABCD;
        let iface = Interface::new(config, &mut phy, now());
        let mut sockets = SocketSet::new(vec![]);
        let dhcp = sockets.add(dhcpv4::Socket::new());
        Stack {
            phy,
            iface,
            sockets,
            dhcp,
            midpoint: None,
            peer: GATEWAY,
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        Snapshot {
            t_ns: crate::time::now_ns(),
            c: self.phy.counters(),
        }
    }

    /// One round: interrupts, transmit reclaim, the stack, one kick for what it queued.
    pub fn poll(&mut self) -> bool {
        self.phy.service();
        let r = self.iface.poll(now(), &mut self.phy, &mut self.sockets);
        self.phy.flush();
        r == PollResult::SocketStateChanged
    }

    /// Nothing to do: halt until an interrupt or smoltcp's next timer (at most 10 ms).
    fn idle(&mut self) {
        if self.phy.busy() {
            return;
        }
        let ms = self
            .iface
            .poll_delay(now(), &self.sockets)
            .map_or(10, |d| d.total_millis())
            .min(10);
        if ms > 0 {
            self.phy.halt(ms);
        }
    }

    /// Polls until `step` returns `Some` (its result) or `timeout_ms` passes (`None`).
    /// `step` returns `Some(_)` when done; it reports progress through its `&mut bool`.
    pub fn run_until<T>(
        &mut self,
        timeout_ms: u64,
        mut step: impl FnMut(&mut Self, &mut bool) -> Option<T>,
    ) -> Option<T> {
        let deadline = crate::time::now_ns() + timeout_ms * 1_000_000;
        loop {
            let mut progress = self.poll();
            if let Some(t) = step(self, &mut progress) {
                return Some(t);
            }
            if crate::time::now_ns() >= deadline {
                return None;
            }
            if !progress {
                self.idle();
            }
        }
    }

    /// `net.dhcp`: a lease from slirp within 15 s; configures the address and route.
    pub fn dhcp(&mut self) -> bool {
        let t0 = crate::time::now_ns();
        let dhcp = self.dhcp;
        let lease = self.run_until(15_000, |s, progress| {
            let event = s.sockets.get_mut::<dhcpv4::Socket>(dhcp).poll();
            match event {
                Some(dhcpv4::Event::Configured(c)) => {
                    *progress = true;
                    let addr: Ipv4Cidr = c.address;
                    let router = c.router;
                    s.iface.update_ip_addrs(|a| {
                        a.clear();
                        let _ = a.push(IpCidr::Ipv4(addr));
                    });
                    if let Some(r) = router {
                        let _ = s.iface.routes_mut().add_default_ipv4_route(r);
                    }
                    Some((addr, router))
                }
                Some(dhcpv4::Event::Deconfigured) | None => None,
            }
        });
        let Some((addr, router)) = lease else {
            check!("net.dhcp", false, "no DHCP lease in 15 s");
            return false;
        };
        check!(
            "net.dhcp",
            true,
            "{addr} router {} in {} ms",
            Opt(router),
            ms_since(t0)
        );
        report::stat("net.dhcp.address", addr.address());
        true
    }

    /// Addresses the interface as the command line asks ([`addressing`]): statically on a
    /// tap, else by DHCP. Returns whether it has an address.
    pub fn address(&mut self, how: Addressing) -> bool {
        match how {
            Addressing::Static { ip, peer } => self.static_address(ip, peer),
            Addressing::Dhcp => self.dhcp(),
        }
    }

    /// `net.addr`: a static address and the peer's (no DHCP server on a tap); the peer is
    /// on the link, so no route is needed.
    pub fn static_address(&mut self, addr: Ipv4Cidr, peer: Ipv4Address) -> bool {
        self.iface.update_ip_addrs(|a| {
            a.clear();
            let _ = a.push(IpCidr::Ipv4(addr));
        });
        self.peer = peer;
        let ok = addr.contains_addr(&peer) && addr.address() != peer;
        check!("net.addr", ok, "{addr}, peer {peer} on the link");
        report::stat("net.addr.address", addr.address());
        ok
    }

    /// One connection: `down` bytes from the host (checked against the stream), then `up`
    /// bytes to it, then the host's trailer. Checks `<name>.connect`, `<name>.recv`,
    /// `<name>.send`; with `detail`, prints the phases' figures and marks them for the
    /// host's trace. Returns whether all passed.
    pub fn transfer(
        &mut self,
        name: &str,
        port: u16,
        conn: u32,
        down: u64,
        up: u64,
        detail: bool,
    ) -> bool {
        let rx_buf = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
        let tx_buf = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
        let mut sock = tcp::Socket::new(rx_buf, tx_buf);
        sock.set_nagle_enabled(false);
        sock.set_timeout(Some(Duration::from_secs(20)));
        let h = self.sockets.add(sock);
        let result = self.transfer_on(h, name, port, conn, (down, up), detail);
        // Close gracefully (bounded), then drop the socket.
        self.sockets.get_mut::<tcp::Socket>(h).close();
        self.run_until(2000, |s, _| {
            let st = s.sockets.get::<tcp::Socket>(h).state();
            matches!(st, tcp::State::Closed | tcp::State::TimeWait).then_some(())
        });
        self.sockets.get_mut::<tcp::Socket>(h).abort();
        self.poll();
        self.sockets.remove(h);
        result
    }

    fn transfer_on(
        &mut self,
        h: SocketHandle,
        name: &str,
        port: u16,
        conn: u32,
        (down, up): (u64, u64),
        detail: bool,
    ) -> bool {
        let seed_down = SEED_DOWN | u64::from(conn);
        let seed_up = SEED_UP | u64::from(conn);
        // ---- connect, send the request header ----
        let t0 = crate::time::now_ns();
        let local_port = 49152 + (conn as u16 % 1000);
        if let Err(e) = self.sockets.get_mut::<tcp::Socket>(h).connect(
            self.iface.context(),
            (IpAddress::Ipv4(self.peer), port),
            local_port,
        ) {
            check!(&format!("{name}.connect"), false, "connect: {e:?}");
            return false;
        }
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&u64::from(conn).to_le_bytes());
        header[16..24].copy_from_slice(&down.to_le_bytes());
        header[24..32].copy_from_slice(&up.to_le_bytes());
        header[32..40].copy_from_slice(&seed_down.to_le_bytes());
        header[40..48].copy_from_slice(&seed_up.to_le_bytes());
        let sent = self.run_until(10_000, |s, _| {
            let sock = s.sockets.get_mut::<tcp::Socket>(h);
            if sock.state() == tcp::State::Closed {
                return Some(false);
            }
            (sock.may_send() && sock.send_slice(&header) == Ok(HEADER_LEN)).then_some(true)
        });
        if sent != Some(true) {
            let st = self.sockets.get::<tcp::Socket>(h).state();
            check!(
                &format!("{name}.connect"),
                false,
                "{}:{port}: not connected after {} ms (state {st})",
                self.peer,
                ms_since(t0)
            );
            return false;
        }
        check!(
            &format!("{name}.connect"),
            true,
            "{}:{port} from port {local_port} in {} ms",
            self.peer,
            ms_since(t0)
        );

        // ---- receive `down` bytes ----
        if detail {
            marker(MARK_RECV_START);
        }
        let a = self.snapshot();
        let mut rx = Stream::new(seed_down);
        let mut rx_hash = WordFnv::new();
        let mut bad: Option<u64> = None;
        let mut last_progress = crate::time::now_ns();
        let mut midpoint = self.midpoint;
        let recv_name = format!("{name}.recv");
        let received = self.run_until(600_000, |s, progress| {
            if rx.pos() >= down / 2
                && let Some(hook) = midpoint.take()
            {
                hook(s, &recv_name);
                *progress = true;
                last_progress = crate::time::now_ns();
            }
            let sock = s.sockets.get_mut::<tcp::Socket>(h);
            let want = down - rx.pos();
            if want > 0 && sock.can_recv() {
                let _ = sock.recv(|buf| {
                    let n = buf.len().min(want as usize);
                    let chunk = &buf[..n];
                    rx_hash.update(chunk);
                    if let Some(off) = rx.verify(chunk) {
                        bad.get_or_insert(off);
                    }
                    (n, ())
                });
                *progress = true;
                last_progress = crate::time::now_ns();
            }
            if rx.pos() >= down {
                return Some(true);
            }
            // Stalled (no data for 20 s) or the host went away.
            let dead = !sock.is_active() || crate::time::now_ns() - last_progress > 20_000_000_000;
            dead.then_some(false)
        });
        let b = self.snapshot();
        if detail {
            marker(MARK_RECV_END);
        }
        let rx_ok = received == Some(true) && bad.is_none();
        check!(
            &format!("{name}.recv"),
            rx_ok,
            "{} of {down} bytes, fnv={:#018x}, first wrong byte {}, {} ms",
            rx.pos(),
            rx_hash.value(),
            Opt(bad),
            (b.t_ns - a.t_ns) / 1_000_000
        );
        report::stat(
            &format!("{name}.recv.hash"),
            format!("{:#018x}", rx_hash.value()),
        );
        if detail {
            phase_stats(&format!("{name}.recv"), rx.pos(), &a, &b);
        }
        if !rx_ok {
            return false;
        }

        // ---- send `up` bytes, then read the host's trailer ----
        if detail {
            marker(MARK_SEND_START);
        }
        let a = self.snapshot();
        let mut tx = Stream::new(seed_up);
        let mut tx_hash = WordFnv::new();
        let mut trailer = [0u8; TRAILER_LEN];
        let mut got = 0usize;
        let mut last_progress = crate::time::now_ns();
        let mut midpoint = self.midpoint;
        let send_name = format!("{name}.send");
        let sent = self.run_until(600_000, |s, progress| {
            if tx.pos() >= up / 2
                && let Some(hook) = midpoint.take()
            {
                hook(s, &send_name);
                *progress = true;
                last_progress = crate::time::now_ns();
            }
            let sock = s.sockets.get_mut::<tcp::Socket>(h);
            let left = up - tx.pos();
            if left > 0 && sock.can_send() {
                let _ = sock.send(|buf| {
                    let n = buf.len().min(left as usize);
                    tx.fill(&mut buf[..n]);
                    tx_hash.update(&buf[..n]);
                    (n, ())
                });
                *progress = true;
                last_progress = crate::time::now_ns();
            }
            if got < TRAILER_LEN && sock.can_recv() {
                if let Ok(n) = sock.recv_slice(&mut trailer[got..]) {
                    got += n;
                }
                *progress = true;
            }
            if got == TRAILER_LEN {
                return Some(true);
            }
            let dead = !sock.is_active() || crate::time::now_ns() - last_progress > 20_000_000_000;
            dead.then_some(false)
        });
        let b = self.snapshot();
        if detail {
            marker(MARK_SEND_END);
        }
        let word = |i: usize| u64::from_le_bytes(trailer[i * 8..i * 8 + 8].try_into().unwrap());
        let (host_bytes, host_hash, host_bad) = (word(0), word(1), word(2));
        let tx_ok = sent == Some(true)
            && tx.pos() == up
            && host_bytes == up
            && host_hash == tx_hash.value()
            && host_bad == u64::MAX;
        check!(
            &format!("{name}.send"),
            tx_ok,
            "{} of {up} bytes, fnv={:#018x}; host got {host_bytes} bytes, fnv={host_hash:#018x}, first wrong byte {}, {} ms",
            tx.pos(),
            tx_hash.value(),
            if host_bad == u64::MAX {
                String::from("none")
            } else {
                format!("{host_bad}")
            },
            (b.t_ns - a.t_ns) / 1_000_000
        );
        report::stat(
            &format!("{name}.send.hash"),
            format!("{:#018x}", tx_hash.value()),
        );
        if detail {
            phase_stats(&format!("{name}.send"), tx.pos(), &a, &b);
        }
        tx_ok
    }
}

/// Prints a phase's figures: `STAT <name>.{ms,mib_s,rx_packets,...}`; kicks and interrupts
/// only when the driver counts them.
fn phase_stats(name: &str, bytes: u64, a: &Snapshot, b: &Snapshot) {
    let ns = (b.t_ns - a.t_ns).max(1);
    let (a, b) = (&a.c, &b.c);
    let rx = b.rx_frames - a.rx_frames;
    let tx = b.tx_frames - a.tx_frames;
    let per = |n: u64, d: u64| format!("{:.3}", n as f64 / d.max(1) as f64);
    let s = |k: &str, v: &dyn core::fmt::Display| report::stat(&format!("{name}.{k}"), v);
    s("bytes", &bytes);
    s("ms", &(ns / 1_000_000));
    s(
        "mib_s",
        &format!("{:.2}", bytes as f64 / (1 << 20) as f64 / (ns as f64 / 1e9)),
    );
    s("rx_packets", &rx);
    s("tx_packets", &tx);
    if !b.driver_counts {
        return;
    }
    s("rx_kicks", &(b.rx_kicks - a.rx_kicks));
    s("tx_kicks", &(b.tx_kicks - a.tx_kicks));
    s("rx_irqs", &(b.rx_irqs - a.rx_irqs));
    s("tx_irqs", &(b.tx_irqs - a.tx_irqs));
    s("irqs", &(b.irqs - a.irqs));
    s("rx_kicks_per_rx_packet", &per(b.rx_kicks - a.rx_kicks, rx));
    s("rx_irqs_per_rx_packet", &per(b.rx_irqs - a.rx_irqs, rx));
    s("tx_kicks_per_tx_packet", &per(b.tx_kicks - a.tx_kicks, tx));
    s("tx_irqs_per_tx_packet", &per(b.tx_irqs - a.tx_irqs, tx));
    s("irqs_per_packet", &per(b.irqs - a.irqs, rx + tx));
    // Offloads: what the wire carries is every frame sent, with each TSO frame counted as
    // the segments the device cuts it into.
    let tso = b.tx_tso_frames - a.tx_tso_frames;
    let tso_segs = b.tx_tso_segments - a.tx_tso_segments;
    let wire = tx - tso + tso_segs;
    let tx_kicks = b.tx_kicks - a.tx_kicks;
    s("tso_frames", &tso);
    s("tso_segments", &tso_segs);
    s("wire_segments", &wire);
    s("segments_per_tso_frame", &per(tso_segs, tso));
    s("wire_segments_per_tx_kick", &per(wire, tx_kicks));
    s(
        "csum_offloaded",
        &(b.tx_csum_offloaded - a.tx_csum_offloaded),
    );
    s("rx_gso_frames", &(b.rx_gso_frames - a.rx_gso_frames));
    s(
        "rx_wire_segments",
        &(b.rx_wire_segments - a.rx_wire_segments),
    );
}
