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
//!    packet are printed as `STAT net.recv.*` / `net.send.*`. Sleep and wake: before the
//!    transfer the guest sets a receive filter (`net.filter`: promiscuous off,
//!    all-multicast on, one unicast and one multicast address, VLAN 42); halfway through
//!    each direction it suspends the driver (transmits in flight get `net_suspend_drain`
//!    polls, default 0: the reset takes them back) and resumes it (`net.suspend.recv`,
//!    `net.suspend.send`: tokens completed / reclaimed, receive buffers reclaimed,
//!    settings replayed). The TCP connection survives: smoltcp keeps its state and TCP
//!    retransmits what the reset lost. The runner checks QEMU's trace for the resets and,
//!    with QMP `query-rx-filter`, that the device holds the filter again;
//! 4. `net.link`: `STAT net.phase=link-test` asks the runner to take the link down (QMP
//!    `set_link`); the driver must see it through a config interrupt (`STAT net.link=down`
//!    tells the runner to bring it back), then see it come back up;
//! 5. `net.resume`: a second, short transfer on a new connection after link-up.
//!
//! The smoltcp loop, DHCP and the transfer are in `net/stack.rs` (shared with `net-vd`).
//!
//! Parameters: `net_port=` (required), `net_bytes=`, `net_link_bytes=` (default 1 MiB),
//! `net_link=0` skips steps 4–5, `net_suspend=0` the filter and the suspends (the default
//! follows `net_link`, so the benchmark's `net_link=0` runs the bare transfer),
//! `net_suspend_drain=` (default 0).
//!
//! `net-tap` runs the same over a tap with a vnet header in a network namespace the host
//! creates (`tests/src/qemu/tap.rs`): no DHCP there, so `net_ip=<a.b.c.d/len>` and
//! `net_peer=<a.b.c.d>` give the addresses (step 2 becomes `net.addr`), and the host
//! offers every checksum and segmentation offload. `net_offload=` chooses what the driver
//! negotiates: `all` (default: CSUM + HOST_TSO4/6 for transmit, GUEST_CSUM + GUEST_TSO4/6
//! for receive), `notso` (the same without HOST_TSO4/6/ECN/UFO: checksum offload only on
//! transmit) or `none` (no checksum or segmentation offload either way). The stack speaks
//! IPv4 only, so the TSO6 bits are negotiated but never used. `STAT net.offload.*` and
//! `net.phy.*` report what the phy did with them (see `net/phy.rs`).

mod csum;
mod phy;
pub mod stack;

use super::Env;
use super::bus;
use crate::check;
use crate::cmdline::IrqMode;
use crate::report;
use crate::report::show::{FeatureSet, Irq, Opt, Outcome};
use alloc::format;
use bus::GuestBus;
use core::sync::atomic::{AtomicU32, Ordering};
use phy::Phy;
use stack::{Midpoint, Stack, ms_since};
use virtio_core::DeviceType;
use virtio_core::bus::Bus;
use virtio_core::platform::InterruptMode;
use virtio_net::MacAddr;
use virtio_net::features as f;
use virtio_net::{NetConfig, NetError, RxMode, VirtioNet};

/// Polls `suspend` gives transmits in flight (`net_suspend_drain=`), for the midpoint hook.
static SUSPEND_DRAIN: AtomicU32 = AtomicU32::new(0);

/// The receive filter set before the transfer; the runner reads it back from QEMU.
const FILTER_UNICAST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const FILTER_MULTICAST: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
const FILTER_VLAN: u16 = 42;

pub fn run(env: &mut Env) {
    let Some(func) = env.find_virtio(virtio_core::DeviceType::Net) else {
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
    let suspend_test = env.cmdline.get_u64("net_suspend", u64::from(link_test)) != 0;
    let drain = env.cmdline.get_u64("net_suspend_drain", 0);
    SUSPEND_DRAIN.store(u32::try_from(drain).unwrap_or(u32::MAX), Ordering::Relaxed);

    let dev = match bus::open(env, func) {
        Ok(d) => d,
        Err(e) => {
            check!("net.init", false, "{} {e}", func.addr);
            return;
        }
    };
    let offload = env.cmdline.get("net_offload").unwrap_or("all");
    let Some(mask) = offload_mask(offload) else {
        check!(
            "net.offload",
            false,
            "net_offload={offload}: expected all, notso or none"
        );
        return;
    };
    // Static addressing (the tap configuration) instead of DHCP.
    let Some(addressing) = stack::addressing(&env.cmdline) else {
        return;
    };
    // Single-segment frames only: the transmit ring stops only when one more frame (two
    // descriptors without indirect) would not fit.
    let cfg = NetConfig {
        max_tx_segments: 1,
        features: NetConfig::default().features & !mask,
        ..NetConfig::default()
    };
    let mut net = match VirtioNet::new(dev, cfg) {
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
        "{} {} features {} mac={} mtu={} header {} bytes, receive buffers {}: {} ({} posted), link {}, STATUS feature {}",
        func.addr,
        Irq(mode),
        FeatureSet(DeviceType::Net, net.features().bits()),
        MacAddr(mac),
        Opt(net.mtu()),
        net.header_len(),
        match net.rx_mode() {
            RxMode::Small => "small",
            RxMode::Big => "big",
            RxMode::Mergeable => "mergeable",
        },
        net.rx_buffers().0,
        net.rx_buffers().1,
        if net.link_up() { "up" } else { "down" },
        if status { "on" } else { "off" },
    );
    report::stat("net.features", format!("{:#x}", net.features().bits()));
    if suspend_test {
        set_filter(&mut net);
    }
    let phy = match Phy::new(net, env.irq == IrqMode::Poll) {
        Ok(p) => p,
        Err(e) => {
            check!("net.init", false, "transmit slots: {e}");
            return;
        }
    };
    let o = phy.offloads();
    report::stat("net.offload", offload);
    report::stat("net.offload.tx_csum", o.tx_csum);
    report::stat("net.offload.tso4", o.tso4);
    report::stat("net.offload.rx_csum", o.rx_csum);
    report::stat("net.offload.rx_big", o.rx_big);
    let mut stack = Stack::new(phy, mac);

    if !stack.address(addressing) {
        finish(&mut stack);
        return;
    }

    // ---- the main transfer, with a suspend and resume halfway through each direction ----
    if suspend_test {
        stack.midpoint = Some(suspend_resume as Midpoint<Phy>);
    }
    let ok = stack.transfer("net", port, 0, bytes, bytes, true);
    stack.midpoint = None;

    // ---- link down / up, then traffic again ----
    if ok && link_test {
        link(&mut stack);
        stack.transfer("net.resume", port, 1, link_bytes, link_bytes, false);
    }
    finish(&mut stack);
}

/// Feature bits `net_offload=` keeps the driver from negotiating (dependent bits follow:
/// the driver closes the set under §5.1.3.1's dependencies).
fn offload_mask(what: &str) -> Option<u64> {
    let host_gso = f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN | f::HOST_UFO;
    let guest = f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_ECN | f::GUEST_UFO;
    match what {
        "all" => Some(0),
        "notso" => Some(host_gso),
        "none" => Some(f::CSUM | host_gso | guest | f::CTRL_GUEST_OFFLOADS),
        _ => None,
    }
}

/// The driver's and the adapter's counters, the bus's per-queue statistics, then a reset.
fn finish(stack: &mut Stack<Phy>) {
    let st = stack.phy.net_ref().stats();
    let c = stack.phy.phy_counters();
    report::stat("net.rx_frames", st.rx_frames);
    report::stat("net.tx_frames", st.tx_frames);
    report::stat("net.rx_errors", st.rx_errors);
    report::stat("net.tx_busy", st.tx_busy);
    report::stat("net.config_changes", st.config_changes);
    report::stat("net.suspends", st.suspends);
    report::stat("net.resumes", st.resumes);
    report::stat("net.phy.rx_polls", c.rx_polls);
    report::stat("net.phy.tx_errors", c.tx_errors);
    report::stat("net.phy.tx_full", c.tx_full);
    for (k, v) in [
        ("rx_gso_frames", c.rx_gso_frames),
        ("rx_max_frame", c.rx_max_frame),
        ("rx_oversize", c.rx_oversize),
        ("rx_csum_valid", c.rx_csum_valid),
        ("rx_csum_partial", c.rx_csum_partial),
        ("rx_csum_completed", c.rx_csum_completed),
        ("rx_csum_verified", c.rx_csum_verified),
        ("rx_csum_bad", c.rx_csum_bad),
        ("tx_frames", c.tx_frames),
        ("tx_csum_offloaded", c.tx_csum_offloaded),
        ("tx_tso_frames", c.tx_tso_frames),
        ("tx_tso_segments", c.tx_tso_segments),
        ("tx_tso_bytes", c.tx_tso_bytes),
        ("tx_csum_selfcheck_ok", c.tx_csum_selfcheck_ok),
        ("tx_csum_selfcheck_bad", c.tx_csum_selfcheck_bad),
    ] {
        report::stat(&format!("net.phy.{k}"), v);
    }
    if let Some(e) = c.last_error {
        report::stat("net.phy.last_error", format!("{e}").replace(' ', "_"));
    }
    bus::stats("net", stack.phy.net().bus_mut());
    stack.phy.shutdown();
}

/// Sets the receive filter `resume` must replay: promiscuous off, all-multicast on, a
/// unicast and a multicast address in the tables, VLAN [`FILTER_VLAN`]. Slirp's frames
/// (to our address, or broadcast) still pass.
fn set_filter(net: &mut VirtioNet<GuestBus>) {
    let result = (|| -> Result<(), NetError> {
        net.set_promisc(false)?;
        net.set_allmulti(true)?;
        net.set_mac_filter(&[FILTER_UNICAST], &[FILTER_MULTICAST])?;
        net.vlan_add(FILTER_VLAN)
    })();
    check!(
        "net.filter",
        result.is_ok(),
        "promiscuous off, all-multicast on, unicast {}, multicast {}, VLAN {FILTER_VLAN}: {}",
        MacAddr(FILTER_UNICAST),
        MacAddr(FILTER_MULTICAST),
        Outcome(&result)
    );
    report::stat("net.filter.promiscuous", "false");
    report::stat("net.filter.multicast", "all");
    report::stat("net.filter.unicast_table", MacAddr(FILTER_UNICAST));
    report::stat("net.filter.multicast_table", MacAddr(FILTER_MULTICAST));
    report::stat("net.filter.vlan_table", FILTER_VLAN);
}

/// The transfer's midpoint hook: suspends the driver under the live connection (the
/// device is reset) and resumes it. `phase` is `net.recv` or `net.send`; the check is
/// `net.suspend.recv` / `net.suspend.send`.
fn suspend_resume(stack: &mut Stack<Phy>, phase: &str) {
    let name = format!("net.suspend.{}", phase.trim_start_matches("net."));
    let slots = stack.phy.tx_slots();
    let in_flight = slots - stack.phy.free_tx_slots();
    let drain = SUSPEND_DRAIN.load(Ordering::Relaxed);
    let t0 = crate::time::now_ns();
    match stack.phy.suspend_resume(drain) {
        Ok((s, r)) => {
            let ms = ms_since(t0);
            let back = s.tx_completed + s.tx_reclaimed;
            let slots_home = stack.phy.free_tx_slots() == slots;
            check!(
                &name,
                back == in_flight
                    && slots_home
                    && s.drain_error.is_none()
                    && r.restore_failed == 0
                    && r.link_up,
                "device reset and re-initialised: {back} of {in_flight} transmit tokens back \
                 ({} completed, {} reclaimed at the reset), {} receive buffers reclaimed, {} \
                 undelivered dropped, {} drain polls; resumed with features {}, {} receive \
                 buffers posted, {} settings replayed ({} failed{}), link {}; {ms} ms",
                s.tx_completed,
                s.tx_reclaimed,
                s.rx_reclaimed,
                s.rx_dropped,
                s.drain_polls,
                FeatureSet(DeviceType::Net, r.features.bits()),
                r.rx_posted,
                r.restored,
                r.restore_failed,
                r.restore_error
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
                if r.link_up { "up" } else { "down" },
            );
            for (k, v) in [
                ("tx_in_flight", in_flight),
                ("tx_completed", s.tx_completed),
                ("tx_reclaimed", s.tx_reclaimed),
                ("rx_reclaimed", s.rx_reclaimed),
                ("rx_dropped", s.rx_dropped),
                ("restored", r.restored as usize),
            ] {
                report::stat(&format!("{name}.{k}"), v);
            }
            report::stat(&format!("{name}.ms"), ms);
        }
        Err(e) => {
            check!(&name, false, "{e}");
        }
    }
}

/// Asks the runner to take the link down and up again; both changes must arrive as config
/// interrupts (polled ISR reads in `irq=poll`).
fn link(stack: &mut Stack<Phy>) {
    let t0 = crate::time::now_ns();
    let events0 = stack.phy.link.config_events;
    report::stat("net.phase", "link-test");
    let down = stack
        .run_until(30_000, |s, _| (s.phy.link.downs > 0).then_some(()))
        .is_some();
    let t_down = ms_since(t0);
    let link_down_seen = !stack.phy.net_ref().link_up();
    report::stat("net.link", "down");
    let up = down
        && stack
            .run_until(30_000, |s, _| (s.phy.link.ups > 0).then_some(()))
            .is_some();
    let t_up = ms_since(t0);
    let link_up_now = stack.phy.net_ref().link_up();
    report::stat("net.link", if link_up_now { "up" } else { "still-down" });
    check!(
        "net.link",
        down && up && link_down_seen && link_up_now && stack.phy.link.errors == 0,
        "down seen: {down} after {t_down} ms, up seen: {up} after {t_up} ms; {} config events, {} downs, {} ups, {} errors",
        stack.phy.link.config_events - events0,
        stack.phy.link.downs,
        stack.phy.link.ups,
        stack.phy.link.errors
    );
    report::stat(
        "net.link.config_events",
        stack.phy.link.config_events - events0,
    );
}
