//! The per-scenario device table and how each device becomes QEMU arguments.
//!
//! Adding a scenario: add a row to [`SCENARIOS`] (and the guest module, see
//! `tests/guest/src/scenarios/mod.rs`).

use super::{Machine, Transport};
use std::io::Write;
use std::path::Path;

/// A virtio device the runner can attach.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Net,
    Blk,
    Balloon,
    Console,
}

impl DeviceKind {
    /// The virtio device type number (what the guest reports as `type=`).
    pub fn virtio_type(self) -> u16 {
        match self {
            DeviceKind::Net => 1,
            DeviceKind::Blk => 2,
            DeviceKind::Console => 3,
            DeviceKind::Balloon => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Net => "net",
            DeviceKind::Blk => "blk",
            DeviceKind::Console => "console",
            DeviceKind::Balloon => "balloon",
        }
    }
}

/// What a scenario needs from the host.
#[derive(Copy, Clone, Debug)]
pub struct ScenarioSpec {
    pub name: &'static str,
    pub devices: &'static [DeviceKind],
    /// Record `virtio_queue_notify` / `virtio_notify` / `virtio_notify_irqfd` /
    /// `virtio_set_status` traces.
    pub trace: bool,
    /// Wall-clock limit for one QEMU run (TCG).
    pub timeout_secs: u64,
}

use DeviceKind::{Balloon, Blk, Console, Net};

const ALL: &[DeviceKind] = &[Net, Blk, Balloon, Console];

/// One row per scenario. The guest side of every scenario but `boot` is written with the
/// device crates; until then the guest answers an unknown scenario with a usage exit.
pub const SCENARIOS: &[ScenarioSpec] = &[
    ScenarioSpec {
        name: "boot",
        devices: ALL,
        trace: true,
        timeout_secs: 60,
    },
    ScenarioSpec {
        name: "smoke",
        devices: ALL,
        trace: true,
        timeout_secs: 120,
    },
    ScenarioSpec {
        name: "net",
        devices: &[Net],
        trace: true,
        timeout_secs: 180,
    },
    // `net`'s transfer over the virtio-drivers crate (`cargo xtask bench net`).
    ScenarioSpec {
        name: "net-vd",
        devices: &[Net],
        trace: true,
        timeout_secs: 300,
    },
    // blk scenarios: the host side (`blk_host`) attaches the drive and device itself,
    // configured by the run's `blk_*` guest words.
    ScenarioSpec {
        name: "blk",
        devices: &[],
        trace: true,
        timeout_secs: 180,
    },
    ScenarioSpec {
        name: "bench-blk",
        devices: &[],
        trace: true,
        timeout_secs: 180,
    },
    ScenarioSpec {
        name: "bench-blk-vd",
        devices: &[],
        trace: true,
        timeout_secs: 180,
    },
    ScenarioSpec {
        name: "console",
        devices: &[Console],
        trace: true,
        timeout_secs: 120,
    },
    // The host side (`balloon_host`) attaches the balloon with the run's properties.
    ScenarioSpec {
        name: "balloon",
        devices: &[],
        trace: true,
        timeout_secs: 120,
    },
    // Harness self-tests: each ends the guest a different wrong way.
    ScenarioSpec {
        name: "panic",
        devices: &[],
        trace: false,
        timeout_secs: 30,
    },
    ScenarioSpec {
        name: "fault",
        devices: &[],
        trace: false,
        timeout_secs: 30,
    },
    ScenarioSpec {
        name: "hang",
        devices: &[],
        trace: false,
        timeout_secs: 30,
    },
];

pub fn scenario(name: &str) -> Option<&'static ScenarioSpec> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Starts a scenario's host-side work (see [`super::HostSide`]).
pub type HostStart = fn(&super::HostContext<'_>) -> std::io::Result<super::HostSide>;

/// The host-side hook of a scenario, if it has one: `net` talks to a TCP peer on the
/// host's loopback and has its link toggled through QMP.
pub fn host_side(scenario: &str) -> Option<HostStart> {
    match scenario {
        "net" | "net-vd" => Some(super::net_peer::start),
        "blk" | "bench-blk" | "bench-blk-vd" => Some(super::blk_host::start),
        "console" => Some(super::console_host::start),
        "balloon" => Some(super::balloon_host::start),
        _ => None,
    }
}

/// The serial number virtio-blk reports for GET_ID.
pub const BLK_SERIAL: &str = "VIRTIO-TEST-0001";
/// Disk image size: small, but enough for multi-segment and random I/O.
pub const DISK_BYTES: u64 = 8 << 20;
/// MAC address of the test NIC.
pub const NET_MAC: &str = "52:54:00:12:34:56";

/// Files a run creates for its devices.
pub struct DeviceFiles {
    pub disk: Option<std::path::PathBuf>,
    pub console: Option<std::path::PathBuf>,
}

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
    devices: &[DeviceKind],
    machine: Machine,
    transport: Transport,
    run_dir: &Path,
    host_peer: bool,
) -> std::io::Result<(Vec<String>, DeviceFiles)> {
    let mut args: Vec<String> = Vec::new();
    let mut files = DeviceFiles {
        disk: None,
        console: None,
    };
    // ioeventfd=off: every notify write is handled (and traced) exactly once. With it on,
    // QEMU 7.2 under TCG traces a kick and sends an interrupt twice for one write, which
    // would distort the kick/interrupt counts the scenarios report. (virtio-balloon has no
    // ioeventfd property.)
    let base_props = transport_props(transport);
    let props = format!("{base_props},ioeventfd=off");
    let behind_ports = machine == Machine::Q35 && transport == Transport::Modern;
    for (i, &dev) in devices.iter().enumerate() {
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
        let mut push = |a: String| args.push(a);
        match dev {
            Net => {
                // restrict=on isolates the guest (slirp drops its TCP connections). A
                // scenario with a host peer needs the one route slirp gives to the host:
                // 10.0.2.2 (any address of the guest's 10.0.2.0/24 but the DNS one) is the
                // host's loopback, where the peer listens. Those guests address nothing
                // else (no DNS, no outside addresses).
                let restrict = if host_peer { "off" } else { "on" };
                push("-netdev".into());
                push(format!("user,id=n0,restrict={restrict}"));
                push("-device".into());
                push(format!(
                    "virtio-net-pci,id={},netdev=n0,mac={NET_MAC},romfile={props}{bus}",
                    super::net_peer::NIC_ID
                ));
            }
            Blk => {
                let disk = run_dir.join("disk.img");
                write_disk_image(&disk)?;
                push("-drive".into());
                push(format!("if=none,id=d0,format=raw,file={}", disk.display()));
                push("-device".into());
                push(format!(
                    "virtio-blk-pci,drive=d0,serial={BLK_SERIAL}{props}{bus}"
                ));
                files.disk = Some(disk);
            }
            Balloon => {
                push("-device".into());
                push(format!("virtio-balloon-pci,id=balloon0{base_props}{bus}"));
            }
            Console => {
                let out = run_dir.join("console.out");
                push("-chardev".into());
                push(format!("file,id=c0,path={}", out.display()));
                push("-device".into());
                push(format!(
                    "virtio-serial-pci,id=vser0,max_ports=31{props}{bus}"
                ));
                push("-device".into());
                push("virtconsole,chardev=c0,bus=vser0.0,nr=0".into());
                files.console = Some(out);
            }
        }
    }
    Ok((args, files))
}
