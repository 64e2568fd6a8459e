//! virtio-net: QEMU's user network (slirp) behind `virtio-net-pci`; the `net` scenarios
//! talk to a TCP peer on the host's loopback (`net_peer`). `net-tap` and `net-vd-tap` use a
//! tap in a network namespace instead (`tap`).

use super::{Attach, DeviceFiles, DeviceSpec, NET_MAC, ScenarioSpec};
use crate::qemu::{net_peer, tap};
use virtio_core::DeviceType;

pub const DEVICE: DeviceSpec = DeviceSpec {
    device_type: DeviceType::Net,
    attach,
    scenarios: &[
        ScenarioSpec {
            name: "net",
            devices: &[DeviceType::Net],
            trace: true,
            timeout_secs: 180,
            host: Some(net_peer::start),
        },
        // `net`'s transfer over a tap with a vnet header in a network namespace, with the
        // offloads slirp cannot carry; the host hook creates the namespace, the tap and
        // the device (`tap.rs`).
        ScenarioSpec {
            name: "net-tap",
            devices: &[],
            trace: true,
            timeout_secs: 180,
            host: Some(tap::start),
        },
        // `net`'s transfer over the virtio-drivers crate (`cargo xtask bench net`).
        ScenarioSpec {
            name: "net-vd",
            devices: &[DeviceType::Net],
            trace: true,
            timeout_secs: 300,
            host: Some(net_peer::start),
        },
        // The same over `net-tap`'s tap, for comparing the two drivers through a backend
        // that sets neither's pace (slirp sets ours; `cargo xtask bench net`).
        ScenarioSpec {
            name: "net-vd-tap",
            devices: &[],
            trace: true,
            timeout_secs: 300,
            host: Some(tap::start),
        },
    ],
};

fn attach(ctx: &Attach<'_>, _: &mut DeviceFiles) -> std::io::Result<Vec<String>> {
    // restrict=on isolates the guest (slirp drops its TCP connections). A scenario with a
    // host peer needs the one route slirp gives to the host: 10.0.2.2 (any address of the
    // guest's 10.0.2.0/24 but the DNS one) is the host's loopback, where the peer listens.
    // Those guests address nothing else (no DNS, no outside addresses).
    let restrict = if ctx.host_peer { "off" } else { "on" };
    Ok(vec![
        "-netdev".into(),
        format!("user,id=n0,restrict={restrict}"),
        "-device".into(),
        format!(
            "virtio-net-pci,id={},netdev=n0,mac={NET_MAC},romfile={}",
            net_peer::NIC_ID,
            ctx.props
        ),
    ])
}
