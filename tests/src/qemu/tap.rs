//! Host side of the `net-tap` scenario: the `net` transfer over a tap device with a vnet
//! header, so the driver's checksum and segmentation offloads reach a real Linux stack
//! (slirp has no vnet header: QEMU withdraws every offload bit behind it).
//!
//! For each run ([`start`]):
//! - a network namespace of its own (`vnt<pid>-<n>`, `ip netns add`), loopback up;
//! - in it, a tap `vtap0` opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` by a thread that
//!   joined the namespace (`setns`); the descriptor goes to QEMU as `-netdev tap,fd=N`
//!   (QEMU sees IFF_VNET_HDR on it and uses the header; the tap lives in the namespace whichever process holds it, so
//!   QEMU itself runs in the host's namespace like every other run). Addresses:
//!   [`HOST_ADDR`] on the tap, [`GUEST_ADDR`] for the guest (`net_ip=`, `net_peer=`);
//! - in the same thread, the `net` scenario's TCP server (`net_peer::serve`: the same
//!   request, stream, check and word-wise FNV-1a hash), listening in the namespace only;
//! - after QEMU exits: the tap's counters (`ip -s -j link`) and the namespace's TCP counters
//!   (`/proc/net/snmp` read inside it) as `host.tap.*` stats, the transfer checks
//!   (`host.net.conn0`), and the check `host.tap` (the bytes the tap carried cover both
//!   transfers, and no TCP checksum errors);
//! - teardown: the descriptor is closed and the namespace deleted by a guard's `Drop`, so
//!   a failed or panicking run removes it too.
//!
//! [`available`] says whether this host allows all that (root, `/dev/net/tun`, `ip netns
//! add`), or why not, so tests skip with that reason. Traffic stays inside the namespace.

use super::devices::{NET_MAC, transport_props};
use super::{Check, HostContext, HostOutcome, HostSide, Machine, Transport, net_peer};
use std::collections::BTreeMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// The namespace's end of the link and the guest's address (a /24 of their own).
pub const HOST_ADDR: &str = "10.77.0.1";
pub const GUEST_ADDR: &str = "10.77.0.2/24";
/// The tap's name inside the namespace.
pub const TAP: &str = "vtap0";

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Runs `ip` with `args`; its stdout, or an error naming the command and its stderr.
fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// `ip netns add` with a name unique to this process and call.
    pub fn create() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vnt{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Namespace { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/proc/net/snmp` as seen inside the namespace.
    fn snmp(&self) -> io::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", "/proc/net/snmp"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("tap: could not delete network namespace {}: {e}", self.name);
        }
    }
}

/// Whether this host lets a test create a namespace with a tap in it; `Err` is the reason
/// (one line) when not.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces and taps need CAP_NET_ADMIN)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    match Namespace::create() {
        Ok(_probe) => Ok(()),
        Err(e) => Err(format!("cannot create a network namespace: {e}")),
    }
}

/// Joins the calling thread to namespace `name`, creates the tap there, and binds a
/// listener there. The tap descriptor is left inheritable (no `FD_CLOEXEC`) for QEMU.
fn tap_and_listener(name: &str) -> io::Result<(OwnedFd, TcpListener)> {
    let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `ns` is an open namespace file; setns only changes this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a plain open of a path literal; the result is checked.
    let raw: RawFd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..TAP.len()].copy_from_slice(TAP.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (40
    // bytes); `req` outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let listener = TcpListener::bind("0.0.0.0:0")?;
    Ok((fd, listener))
}

/// The server thread, stopped and joined on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the namespace, tap and server for one run (see the module documentation).
pub fn start(ctx: &HostContext<'_>) -> io::Result<HostSide> {
    let ns = Namespace::create()?;
    let stop = Arc::new(AtomicBool::new(false));
    let transfers: Arc<Mutex<Vec<net_peer::Transfer>>> = Arc::default();
    let (tx, rx) = mpsc::channel();
    let server = {
        let (stop, transfers, name) = (stop.clone(), transfers.clone(), ns.name.clone());
        std::thread::Builder::new()
            .name("net-tap-peer".into())
            .spawn(move || match tap_and_listener(&name) {
                Ok((fd, listener)) => {
                    let port = listener.local_addr().map(|a| a.port());
                    let _ = listener.set_nonblocking(true);
                    let _ = tx.send(port.map(|p| (fd, p)));
                    net_peer::serve(listener, &stop, &transfers);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })?
    };
    // Stops and joins the server however this run ends (a run that never calls `finish`
    // drops it with the closure).
    let server = Server {
        stop,
        thread: Some(server),
    };
    let (fd, port) = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return Err(io::Error::other(format!(
                "tap in namespace {}: {e}",
                ns.name
            )));
        }
        Err(_) => {
            return Err(io::Error::other("the tap thread did not answer"));
        }
    };
    let configured = ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{HOST_ADDR}/24"),
        "dev",
        TAP,
    ])
    .and_then(|_| ip(&["-n", &ns.name, "link", "set", TAP, "up"]));
    configured?;

    let cfg = ctx.config;
    let mut qemu = vec![
        "-netdev".to_string(),
        // QEMU 7.2 refuses `vnet_hdr=` next to `fd=`; it finds IFF_VNET_HDR on the
        // descriptor itself (TUNGETIFF) and uses the header.
        format!("tap,id=n0,fd={}", fd.as_raw_fd()),
    ];
    let mut bus = String::new();
    if cfg.machine == Machine::Q35 && cfg.transport == Transport::Modern {
        qemu.push("-device".into());
        qemu.push("pcie-root-port,id=rpn,chassis=1,bus=pcie.0,addr=0x10".into());
        bus = ",bus=rpn".into();
    }
    qemu.push("-device".into());
    qemu.push(format!(
        "virtio-net-pci,id={},netdev=n0,mac={NET_MAC},romfile={},ioeventfd=off{bus}",
        net_peer::NIC_ID,
        transport_props(cfg.transport)
    ));
    let finish: Box<dyn FnOnce() -> HostOutcome + Send> = Box::new(move || {
        drop(server);
        let transfers = std::mem::take(&mut *transfers.lock().unwrap());
        let mut out = net_peer::transfers_outcome(port, &transfers);
        let counters = read_counters(&ns);
        out.stats
            .insert("host.tap.namespace".into(), ns.name.clone());
        out.checks.push(tap_check(&counters, &transfers));
        for (k, v) in counters {
            out.stats.insert(format!("host.tap.{k}"), v.to_string());
        }
        // The tap goes with its last descriptor (QEMU's is closed), then the namespace.
        drop(fd);
        drop(ns);
        out
    });
    Ok(HostSide {
        guest_args: vec![
            format!("net_port={port}"),
            format!("net_ip={GUEST_ADDR}"),
            format!("net_peer={HOST_ADDR}"),
            "net_link=0".into(),
            "expect_types=1".into(),
        ],
        qemu_args: qemu,
        finish,
    })
}

/// The tap's counters (`rx_*`: frames the guest sent, as the namespace received them;
/// `tx_*`: frames sent to the guest) and the namespace's TCP counters.
fn read_counters(ns: &Namespace) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    if let Ok(json) = ip(&["-n", &ns.name, "-s", "-j", "link", "show", TAP])
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&json)
    {
        let stats = &v[0]["stats64"];
        for dir in ["rx", "tx"] {
            for k in ["packets", "bytes", "errors", "dropped"] {
                if let Some(n) = stats[dir][k].as_u64() {
                    c.insert(format!("{dir}_{k}"), n);
                }
            }
        }
    }
    if let Ok(snmp) = ns.snmp() {
        // Two "Tcp:" lines: the names, then the values.
        let tcp: Vec<Vec<&str>> = snmp
            .lines()
            .filter(|l| l.starts_with("Tcp:"))
            .map(|l| l.split_whitespace().skip(1).collect())
            .collect();
        if let [names, values] = &tcp[..] {
            for (n, v) in names.iter().zip(values) {
                if matches!(
                    *n,
                    "InSegs" | "OutSegs" | "InErrs" | "InCsumErrors" | "RetransSegs"
                ) && let Ok(v) = v.parse()
                {
                    c.insert(format!("tcp_{}", n.to_ascii_lowercase()), v);
                }
            }
        }
    }
    c
}

/// `host.tap`: the tap carried at least the bytes of both directions of every transfer
/// (so the traffic went through it), and the namespace's TCP saw no checksum errors.
fn tap_check(c: &BTreeMap<String, u64>, transfers: &[net_peer::Transfer]) -> Check {
    let get = |k: &str| c.get(k).copied();
    let up: u64 = transfers.iter().map(|t| t.up_received).sum();
    let down: u64 = transfers.iter().map(|t| t.down_sent).sum();
    let (rxp, rxb, txp, txb) = (
        get("rx_packets"),
        get("rx_bytes"),
        get("tx_packets"),
        get("tx_bytes"),
    );
    let csum_errors = get("tcp_incsumerrors");
    let passed =
        rxb.is_some_and(|b| b >= up) && txb.is_some_and(|b| b >= down) && csum_errors == Some(0);
    let avg = |b: Option<u64>, p: Option<u64>| match (b, p) {
        (Some(b), Some(p)) if p > 0 => format!("{}", b / p),
        _ => "?".into(),
    };
    Check {
        name: "host.tap".into(),
        passed,
        detail: format!(
            "from the guest {} frames, {} bytes (average {} per frame) for {up} payload bytes; \
             to the guest {} frames, {} bytes (average {}) for {down}; TCP InCsumErrors {}",
            super::or_none(rxp),
            super::or_none(rxb),
            avg(rxb, rxp),
            super::or_none(txp),
            super::or_none(txb),
            avg(txb, txp),
            super::or_none(csum_errors),
        ),
    }
}
