//! `net`: the virtio-net driver (`virtio_net::VirtioNet` over `virtio-pci` + `virtio-core`)
//! under a real TCP/IP stack (smoltcp), against QEMU's user networking and a TCP peer the
//! host runner controls (`tests/src/qemu/net_peer.rs`):
//!
//! 1. `net.init`: the driver comes up in the run's interrupt mode, link up;
//! 2. `net.dhcp`: a DHCP lease from slirp (10.0.2.15);
//! 3. `net.recv` / `net.send`: one TCP connection to 10.0.2.2:`net_port` (the host's
//!    loopback); the guest receives `net_bytes` (default 64 MiB) of the deterministic
//!    stream (`net/stream.rs`) and checks every byte, then sends `net_bytes` back; the host
//!    answers with its hash of what it got. Hashes, throughput and kicks/interrupts per
//!    packet are printed as `STAT net.recv.*` / `net.send.*`;
//! 4. `net.link`: `STAT net.phase=link-test` asks the runner to take the link down (QMP
//!    `set_link`); the driver must see it through a config interrupt (`STAT net.link=down`
//!    tells the runner to bring it back), then see it come back up;
//! 5. `net.resume`: a second, short transfer on a new connection after link-up.
//!
//! Parameters: `net_port=` (required), `net_bytes=`, `net_link_bytes=` (default 1 MiB),
//! `net_link=0` skips steps 4–5.

mod phy;
mod stream;

use super::Env;
use super::bus;
use crate::check;
use crate::cmdline::IrqMode;
use crate::platform::INTX_INDEX;
use crate::report;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use phy::Phy;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use stream::{Fnv, Stream};
use virtio_core::bus::Bus;
use virtio_core::platform::InterruptMode;
use virtio_net::{NetConfig, VirtioNet};

const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
/// Seeds of the two directions of connection `c`: host → guest and guest → host.
const SEED_DOWN: u64 = 0xD0D0_0000_0000_0000;
const SEED_UP: u64 = 0x0F0F_0000_0000_0000;
/// Request header: magic, connection, bytes down, bytes up, seed down, seed up.
const MAGIC: &[u8; 8] = b"VNETTST1";
const HEADER_LEN: usize = 48;
/// Host's answer after the upload: bytes received, FNV-1a 64 of them, offset of the first
/// byte that differs from the expected stream (`u64::MAX`: none).
const TRAILER_LEN: usize = 24;
const TCP_BUFFER: usize = 256 * 1024;

fn now() -> Instant {
    Instant::from_micros((crate::time::now_ns() / 1000) as i64)
}

fn ms_since(t0: u64) -> u64 {
    (crate::time::now_ns() - t0) / 1_000_000
}

/// Link changes the driver reported through config interrupts.
#[derive(Default)]
struct LinkLog {
    config_events: u64,
    downs: u64,
    ups: u64,
    errors: u64,
}

/// The interface, its sockets and the device, and the loop that drives them.
struct Stack {
    phy: Phy,
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    polling: bool,
    last_isr_poll: u64,
    link: LinkLog,
}

/// Counters at one moment, to report a phase's share.
#[derive(Copy, Clone, Default)]
struct Snapshot {
    t_ns: u64,
    rx_frames: u64,
    tx_frames: u64,
    rx_kicks: u64,
    tx_kicks: u64,
    rx_irqs: u64,
    tx_irqs: u64,
    irqs: u64,
}

impl Stack {
    fn snapshot(&mut self) -> Snapshot {
        let st = self.phy.net_ref().stats();
        let bus = self.phy.net().bus_mut();
        let q = |bus: &bus::GuestBus, i| bus.queue_stats(i).unwrap_or_default();
        let (rx, tx) = (q(bus, 0), q(bus, 1));
        Snapshot {
            t_ns: crate::time::now_ns(),
            rx_frames: st.rx_frames,
            tx_frames: st.tx_frames,
            rx_kicks: rx.kicks,
            tx_kicks: tx.kicks,
            rx_irqs: rx.interrupts,
            tx_irqs: tx.interrupts,
            irqs: bus.interrupt_platform().total(),
        }
    }

    /// Feeds recorded interrupts to the driver; handles config changes (link status).
    fn service(&mut self) {
        let net = self.phy.net();
        let irq = net.bus_mut().interrupt_platform();
        let pending = irq.take_pending();
        let mut config = false;
        if pending & (1 << INTX_INDEX) != 0 {
            config |= net.handle_interrupt(None).config;
            net.bus_mut().interrupt_platform().intx_done();
        }
        for k in (0..INTX_INDEX).filter(|k| pending & (1 << k) != 0) {
            config |= net.handle_interrupt(Some(k)).config;
        }
        if self.polling {
            // No interrupts: read the ISR now and then for config changes.
            let t = crate::time::now_ns();
            if t - self.last_isr_poll > 2_000_000 {
                self.last_isr_poll = t;
                config |= net.handle_interrupt(None).config;
            }
        }
        if config {
            self.link.config_events += 1;
            match net.handle_config_change() {
                Ok(ev) if ev.link_changed => {
                    crate::println!("net: link {}", if ev.link_up { "up" } else { "down" });
                    if ev.link_up {
                        self.link.ups += 1;
                    } else {
                        self.link.downs += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    crate::println!("net: config change: {e}");
                    self.link.errors += 1;
                }
            }
        }
    }

    /// One round: interrupts, transmit reclaim, the stack, one kick for what it queued.
    fn poll(&mut self) -> bool {
        self.service();
        self.phy.reclaim();
        let r = self.iface.poll(now(), &mut self.phy, &mut self.sockets);
        self.phy.flush();
        r == PollResult::SocketStateChanged
    }

    /// Nothing to do: halt until an interrupt or smoltcp's next timer (at most 10 ms).
    fn idle(&mut self) {
        if self.phy.busy() || self.polling {
            return;
        }
        let ms = self
            .iface
            .poll_delay(now(), &self.sockets)
            .map_or(10, |d| d.total_millis())
            .min(10);
        if ms > 0 {
            self.phy
                .net()
                .bus_mut()
                .interrupt_platform()
                .wait(u64::MAX, ms);
        }
    }

    /// Polls until `step` returns `Some` (its result) or `timeout_ms` passes (`None`).
    /// `step` returns `Some(_)` when done; it reports progress through its `&mut bool`.
    fn run_until<T>(
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
}

pub fn run(env: &mut Env) {
    let Some(func) = env.find_virtio(1) else {
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
    let link_bytes = env.cmdline.get_u64("net_link_bytes", 1 << 20);
    let link_test = env.cmdline.get_u64("net_link", 1) != 0;

    let dev = match bus::open(env, func) {
        Ok(d) => d,
        Err(e) => {
            check!("net.init", false, "{} {e}", func.addr);
            return;
        }
    };
    // Single-segment frames only: the transmit ring stops only when one more frame (two
    // descriptors without indirect) would not fit.
    let cfg = NetConfig {
        max_tx_segments: 1,
        ..NetConfig::default()
    };
    let net = match VirtioNet::new(dev, cfg) {
        Ok(n) => n,
        Err(e) => {
            check!("net.init", false, "{} VirtioNet::new: {e}", func.addr);
            return;
        }
    };
    let mode = net.bus().interrupt_mode();
    let mode_ok = matches!(
        (env.irq, mode),
        (IrqMode::MsiX, InterruptMode::MsiX { .. })
            | (IrqMode::Intx, InterruptMode::Intx)
            | (IrqMode::Poll, InterruptMode::Polling)
    );
    let mac = net.mac();
    let status = net.features().bits() & virtio_net::features::STATUS != 0;
    check!(
        "net.init",
        mode_ok && net.link_up() && status,
        "{} {mode:?} features={:#x} mac={mac:02x?} mtu={:?} hdr={} rx={:?} rx_buffers={:?} link={} status_feature={status}",
        func.addr,
        net.features().bits(),
        net.mtu(),
        net.header_len(),
        net.rx_mode(),
        net.rx_buffers(),
        if net.link_up() { "up" } else { "down" },
    );
    report::stat("net.features", format!("{:#x}", net.features().bits()));
    let phy = match Phy::new(net) {
        Ok(p) => p,
        Err(e) => {
            check!("net.init", false, "transmit slots: {e}");
            return;
        }
    };
    let mut stack = make_stack(phy, mac, env.irq == IrqMode::Poll);

    // ---- DHCP ----
    let t0 = crate::time::now_ns();
    let lease = stack.run_until(15_000, |s, progress| {
        let event = s.sockets.get_mut::<dhcpv4::Socket>(s.dhcp).poll();
        match event {
            Some(dhcpv4::Event::Configured(c)) => {
                *progress = true;
                let addr = c.address;
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
        finish(&mut stack);
        return;
    };
    check!(
        "net.dhcp",
        true,
        "{addr} router {router:?} in {} ms",
        ms_since(t0)
    );
    report::stat("net.dhcp.address", addr.address());

    // ---- the main transfer ----
    let ok = transfer(&mut stack, "net", port, 0, bytes, bytes, true);

    // ---- link down / up, then traffic again ----
    if ok && link_test {
        link(&mut stack);
        transfer(
            &mut stack,
            "net.resume",
            port,
            1,
            link_bytes,
            link_bytes,
            false,
        );
    }
    finish(&mut stack);
}

fn make_stack(mut phy: Phy, mac: [u8; 6], polling: bool) -> Stack {
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
        polling,
        last_isr_poll: 0,
        link: LinkLog::default(),
    }
}

/// The driver's and the adapter's counters, the bus's per-queue statistics, then a reset.
fn finish(stack: &mut Stack) {
    let st = stack.phy.net_ref().stats();
    let c = stack.phy.counters();
    report::stat("net.rx_frames", st.rx_frames);
    report::stat("net.tx_frames", st.tx_frames);
    report::stat("net.rx_errors", st.rx_errors);
    report::stat("net.tx_busy", st.tx_busy);
    report::stat("net.config_changes", st.config_changes);
    report::stat("net.phy.rx_polls", c.rx_polls);
    report::stat("net.phy.rx_oversize", c.rx_oversize);
    report::stat("net.phy.tx_errors", c.tx_errors);
    report::stat("net.phy.tx_full", c.tx_full);
    if let Some(e) = c.last_error {
        report::stat("net.phy.last_error", format!("{e}").replace(' ', "_"));
    }
    bus::stats("net", stack.phy.net().bus_mut());
    stack.phy.shutdown();
}

/// Prints a phase's figures: `STAT <name>.{ms,mib_s,rx_packets,...}`.
fn phase_stats(name: &str, bytes: u64, a: &Snapshot, b: &Snapshot) {
    let ns = (b.t_ns - a.t_ns).max(1);
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
}

/// One connection: `down` bytes from the host (checked against the stream), then `up`
/// bytes to it, then the host's trailer. Checks `<name>.connect`, `<name>.recv`,
/// `<name>.send`; returns whether all passed.
fn transfer(
    stack: &mut Stack,
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
    let h = stack.sockets.add(sock);
    let result = transfer_on(stack, h, name, port, conn, down, up, detail);
    // Close gracefully (bounded), then drop the socket.
    stack.sockets.get_mut::<tcp::Socket>(h).close();
    stack.run_until(2000, |s, _| {
        let st = s.sockets.get::<tcp::Socket>(h).state();
        matches!(st, tcp::State::Closed | tcp::State::TimeWait).then_some(())
    });
    stack.sockets.get_mut::<tcp::Socket>(h).abort();
    stack.poll();
    stack.sockets.remove(h);
    result
}

#[allow(clippy::too_many_arguments)]
fn transfer_on(
    stack: &mut Stack,
    h: SocketHandle,
    name: &str,
    port: u16,
    conn: u32,
    down: u64,
    up: u64,
    detail: bool,
) -> bool {
    let seed_down = SEED_DOWN | u64::from(conn);
    let seed_up = SEED_UP | u64::from(conn);
    // ---- connect, send the request header ----
    let t0 = crate::time::now_ns();
    let local_port = 49152 + (conn as u16 % 1000);
    if let Err(e) = stack.sockets.get_mut::<tcp::Socket>(h).connect(
        stack.iface.context(),
        (IpAddress::Ipv4(GATEWAY), port),
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
    let sent = stack.run_until(10_000, |s, _| {
        let sock = s.sockets.get_mut::<tcp::Socket>(h);
        if sock.state() == tcp::State::Closed {
            return Some(false);
        }
        (sock.may_send() && sock.send_slice(&header) == Ok(HEADER_LEN)).then_some(true)
    });
    if sent != Some(true) {
        let st = stack.sockets.get::<tcp::Socket>(h).state();
        check!(
            &format!("{name}.connect"),
            false,
            "10.0.2.2:{port}: not connected after {} ms (state {st})",
            ms_since(t0)
        );
        return false;
    }
    check!(
        &format!("{name}.connect"),
        true,
        "10.0.2.2:{port} from port {local_port} in {} ms",
        ms_since(t0)
    );

    // ---- receive `down` bytes ----
    let a = stack.snapshot();
    let mut rx = Stream::new(seed_down);
    let mut rx_hash = Fnv::new();
    let mut bad: Option<u64> = None;
    let mut last_progress = crate::time::now_ns();
    let received = stack.run_until(600_000, |s, progress| {
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
    let b = stack.snapshot();
    let rx_ok = received == Some(true) && bad.is_none();
    check!(
        &format!("{name}.recv"),
        rx_ok,
        "{} of {down} bytes, fnv={:#018x}, first wrong byte {:?}, {} ms",
        rx.pos(),
        rx_hash.value(),
        bad,
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
    let a = stack.snapshot();
    let mut tx = Stream::new(seed_up);
    let mut tx_hash = Fnv::new();
    let mut trailer = [0u8; TRAILER_LEN];
    let mut got = 0usize;
    let mut last_progress = crate::time::now_ns();
    let sent = stack.run_until(600_000, |s, progress| {
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
    let b = stack.snapshot();
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

/// Asks the runner to take the link down and up again; both changes must arrive as config
/// interrupts (polled ISR reads in `irq=poll`).
fn link(stack: &mut Stack) {
    let t0 = crate::time::now_ns();
    let events0 = stack.link.config_events;
    report::stat("net.phase", "link-test");
    let down = stack
        .run_until(30_000, |s, _| (s.link.downs > 0).then_some(()))
        .is_some();
    let t_down = ms_since(t0);
    let link_down_seen = !stack.phy.net_ref().link_up();
    report::stat("net.link", "down");
    let up = down
        && stack
            .run_until(30_000, |s, _| (s.link.ups > 0).then_some(()))
            .is_some();
    let t_up = ms_since(t0);
    let link_up_now = stack.phy.net_ref().link_up();
    report::stat("net.link", if link_up_now { "up" } else { "still-down" });
    check!(
        "net.link",
        down && up && link_down_seen && link_up_now && stack.link.errors == 0,
        "down seen: {down} after {t_down} ms, up seen: {up} after {t_up} ms; {} config events, {} downs, {} ups, {} errors",
        stack.link.config_events - events0,
        stack.link.downs,
        stack.link.ups,
        stack.link.errors
    );
    report::stat("net.link.config_events", stack.link.config_events - events0);
}
