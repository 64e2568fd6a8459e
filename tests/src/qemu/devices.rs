//! The harness's device registry: everything the QEMU runner knows about a virtio device
//! type — its QEMU `-device` string and properties, backends and files, the scenarios it
//! brings and their host-side hooks — is one [`DeviceSpec`], `pub const DEVICE` in its own
//! file `tests/src/qemu/devices/<name>.rs`. The build script (`tests/build.rs`) finds those
//! files and generates [`DEVICES`]: registering a device type is adding that file, nothing
//! here.
//!
//! Scenarios that are not about one device type (`boot`, `smoke`, the harness self-tests)
//! are in [`HARNESS_SCENARIOS`]. The guest side of a scenario is a row in the guest's
//! `tests/guest/src/scenarios/mod.rs`.

use super::{Machine, Transport};
use std::io::Write;
use std::path::Path;
use virtio_core::DeviceType;

// `pub mod <name>;` for every `devices/<name>.rs`, and `DEVICES`.
include!(concat!(env!("OUT_DIR"), "/devices.rs"));

/// One virtio device type the runner can attach (see the module docs).
pub struct DeviceSpec {
    pub device_type: DeviceType,
    /// QEMU arguments attaching one instance: its `-device` (with `ctx.props`), backends
    /// (`-netdev`, `-drive`, `-chardev`, `-object`) and the files they need.
    pub attach: fn(&Attach<'_>, &mut DeviceFiles) -> std::io::Result<Vec<String>>,
    /// Scenarios about this device type (the guest runs them by name).
    pub scenarios: &'static [ScenarioSpec],
}

/// What [`DeviceSpec::attach`] gets.
pub struct Attach<'a> {
    pub machine: Machine,
    pub transport: Transport,
    pub run_dir: &'a Path,
    /// Properties every `-device` of a virtio-pci function carries: the transport
    /// ([`transport_props`]), `ioeventfd=off` (every notify write is handled and traced
    /// exactly once: with it on, QEMU 7.2 under TCG traces one kick and sends one interrupt
    /// twice for a single write, which would distort the counts scenarios compare with
    /// QEMU's trace) and the bus (a `pcie-root-port` on q35 + modern).
    pub props: &'a str,
    /// The same without `ioeventfd=off`, for devices that lack that property (balloon).
    pub props_no_ioeventfd: &'a str,
    /// The scenario has a host-side hook (e.g. a network peer the guest may reach).
    pub host_peer: bool,
}

/// What a scenario needs from the host.
#[derive(Copy, Clone, Debug)]
pub struct ScenarioSpec {
    pub name: &'static str,
    /// Devices the runner attaches, in PCI order ([`DeviceSpec::attach`]). A scenario whose
    /// host hook attaches its device itself (with per-run properties) lists none.
    pub devices: &'static [DeviceType],
    /// Record `virtio_queue_notify` / `virtio_notify` / `virtio_notify_irqfd` /
    /// `virtio_set_status` traces (a host hook may add events with `-trace`).
    pub trace: bool,
    /// Wall-clock limit for one QEMU run (TCG).
    pub timeout_secs: u64,
    /// Host-side work next to QEMU (a peer, QMP commands, checks of files).
    pub host: Option<HostStart>,
}

/// Starts a scenario's host-side work (see [`super::HostSide`]).
pub type HostStart = fn(&super::HostContext<'_>) -> std::io::Result<super::HostSide>;

/// The devices `boot` and `smoke` attach, in PCI order.
const ALL: &[DeviceType] = &[
    DeviceType::Net,
    DeviceType::Block,
    DeviceType::Balloon,
    DeviceType::Console,
];

/// Scenarios about the harness or every device at once.
pub const HARNESS_SCENARIOS: &[ScenarioSpec] = &[
    ScenarioSpec {
        name: "boot",
        devices: ALL,
        trace: true,
        timeout_secs: 60,
        host: None,
    },
    ScenarioSpec {
        name: "smoke",
        devices: ALL,
        trace: true,
        timeout_secs: 120,
        host: None,
    },
    // Harness self-tests: each ends the guest a different wrong way.
    ScenarioSpec {
        name: "panic",
        devices: &[],
        trace: false,
        timeout_secs: 30,
        host: None,
    },
    ScenarioSpec {
        name: "fault",
        devices: &[],
        trace: false,
        timeout_secs: 30,
        host: None,
    },
    ScenarioSpec {
        name: "hang",
        devices: &[],
        trace: false,
        timeout_secs: 30,
        host: None,
    },
];

/// Every scenario: the harness's, then each device type's.
pub fn scenarios() -> impl Iterator<Item = &'static ScenarioSpec> {
    HARNESS_SCENARIOS
        .iter()
        .chain(DEVICES.iter().flat_map(|d| d.scenarios.iter()))
}

pub fn scenario(name: &str) -> Option<&'static ScenarioSpec> {
    scenarios().find(|s| s.name == name)
}

/// The registered device type `ty`.
pub fn device(ty: DeviceType) -> Option<&'static DeviceSpec> {
    DEVICES.iter().copied().find(|d| d.device_type == ty)
}

/// Files a run creates for its devices.
#[derive(Default)]
pub struct DeviceFiles {
    pub disk: Option<std::path::PathBuf>,
    pub console: Option<std::path::PathBuf>,
}

/// The serial number virtio-blk reports for GET_ID.
pub const BLK_SERIAL: &str = "VIRTIO-TEST-0001";
/// Disk image size: small, but enough for multi-segment and random I/O.
pub const DISK_BYTES: u64 = 8 << 20;
/// MAC address of the test NIC.
pub const NET_MAC: &str = "52:54:00:12:34:56";

/// Writes the disk image: sector n starts with the ASCII tag `SECTOR` + n as 8 bytes LE,
/// followed by bytes `(n + i) mod 251`, so a guest can verify any sector it reads.
pub fn write_disk_image(path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut sector = [0u8; 512];
    for n in 0..DISK_BYTES / 512 {
        sector[..6].copy_from_slice(b"SECTOR");
        sector[6..14].copy_from_slice(&n.to_le_bytes());
        for (i, b) in sector.iter_mut().enumerate().skip(14) {
            *b = ((n + i as u64) % 251) as u8;
        }
        f.write_all(&sector)?;
    }
    f.flush()
}

/// Device properties selecting the transport (QEMU's `virtio-pci` properties).
pub fn transport_props(t: Transport) -> &'static str {
    match t {
        Transport::Modern => ",disable-legacy=on,disable-modern=off",
        Transport::Transitional => "",
        Transport::Legacy => ",disable-modern=on,disable-legacy=off",
    }
}

/// QEMU arguments for `devices`. On q35 with the modern transport every device sits
/// behind its own `pcie-root-port` (the usual PCIe topology; exercises bridge enumeration
/// and INTx swizzling); otherwise devices sit on the root bus (legacy I/O BARs need no
/// bridge I/O window there).
pub fn qemu_args(
    devices: &[DeviceType],
    machine: Machine,
    transport: Transport,
    run_dir: &Path,
    host_peer: bool,
) -> std::io::Result<(Vec<String>, DeviceFiles)> {
    let mut args: Vec<String> = Vec::new();
    let mut files = DeviceFiles::default();
    let behind_ports = machine == Machine::Q35 && transport == Transport::Modern;
    for (i, &ty) in devices.iter().enumerate() {
        let spec = device(ty).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no devices/<name>.rs registers virtio-{}", ty.name()),
            )
        })?;
        let bus = if behind_ports {
            args.push("-device".into());
            args.push(format!(
                "pcie-root-port,id=rp{i},chassis={},bus=pcie.0,addr={:#x}",
                i + 1,
                0x10 + i
            ));
            format!(",bus=rp{i}")
        } else {
            String::new()
        };
        let base = transport_props(transport);
        let ctx = Attach {
            machine,
            transport,
            run_dir,
            props: &format!("{base},ioeventfd=off{bus}"),
            props_no_ioeventfd: &format!("{base}{bus}"),
            host_peer,
        };
        args.extend((spec.attach)(&ctx, &mut files)?);
    }
    Ok((args, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_consistent() {
        let mut names: Vec<&str> = scenarios().map(|s| s.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            count,
            "scenario names must be unique: {names:?}"
        );
        for d in DEVICES {
            let entries = DEVICES.iter().filter(|e| e.device_type == d.device_type);
            assert_eq!(entries.count(), 1, "virtio-{}", d.device_type.name());
        }
        for s in scenarios() {
            for t in s.devices {
                assert!(
                    device(*t).is_some(),
                    "{}: virtio-{} unregistered",
                    s.name,
                    t.name()
                );
            }
        }
        for name in ["net", "blk", "console", "balloon", "rng", "boot", "smoke"] {
            assert!(scenario(name).is_some(), "{name}");
        }
    }
}
