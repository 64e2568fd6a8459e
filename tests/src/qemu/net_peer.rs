//! Host side of the `net` scenario, started before QEMU and finished after it:
//!
//! - a TCP server on 127.0.0.1 (ephemeral port, passed as `net_port=`; slirp maps the
//!   guest's 10.0.2.2 to the host's loopback). Per connection the guest sends a 48-byte
//!   request (`VNETTST1`, connection, bytes down, bytes up, seed down, seed up); the server
//!   sends `down` bytes of [`Stream`]`(seed down)`, reads `up` bytes, checks them against
//!   `Stream(seed up)` and hashes them (`WordFnv`, FNV-1a 64 over words), then answers with a 24-byte trailer
//!   (bytes received, hash, offset of the first wrong byte or `u64::MAX`);
//! - the link toggler: when the guest prints `STAT net.phase=link-test`, QMP
//!   `query-rx-filter nic0` (the receive filter the device holds after the main transfer,
//!   during which the guest suspended and resumed the device: the filter it set must have
//!   been replayed), then `set_link nic0 up=false`; when it prints `STAT net.link=down` (or
//!   after a bound), `set_link nic0 up=true`.
//!
//! Results become `host.net.*` checks and stats in the run's report.
//!
//! Only loopback is used: the listener binds 127.0.0.1, QMP is a unix socket in the run
//! directory.

use super::qmp::Qmp;
use super::{Check, HostContext, HostOutcome, HostSide, or_none};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The NIC's QOM id (see `devices.rs`), the name `set_link` uses.
pub const NIC_ID: &str = "nic0";
/// Request header and trailer sizes (see the guest's `scenarios/net.rs`).
const MAGIC: &[u8; 8] = b"VNETTST1";
const HEADER_LEN: usize = 48;
/// A connection with no progress for this long is abandoned.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// How long the link stays down at most when the guest never reports seeing it.
const LINK_DOWN_MAX: Duration = Duration::from_secs(20);

pub use virtio_test_stream::{Stream, WordFnv};

/// What one connection did.
#[derive(Clone, Debug, Default)]
pub struct Transfer {
    pub conn: u64,
    pub down: u64,
    pub up: u64,
    pub down_sent: u64,
    pub down_hash: u64,
    pub up_received: u64,
    pub up_hash: u64,
    pub up_first_bad: Option<u64>,
    pub down_ms: u64,
    pub up_ms: u64,
    pub error: Option<String>,
}

/// What the link toggler did.
#[derive(Clone, Debug, Default)]
struct LinkLog {
    marker_seen: bool,
    qemu_version: String,
    status_before: String,
    down_at_ms: Option<u64>,
    guest_saw_down: bool,
    up_at_ms: Option<u64>,
    status_after: String,
    /// `query-rx-filter` at the link-test marker, as `host.net.rx_filter.*` stats.
    rx_filter: BTreeMap<String, String>,
    error: Option<String>,
}

/// The fields of a `query-rx-filter` answer the tests compare, flattened: booleans and
/// modes as they are, tables comma-separated in QEMU's order.
fn rx_filter_stats(v: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, value) in v.as_object().into_iter().flatten() {
        let text = match value {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.insert(key.replace('-', "_"), text);
    }
    out
}

/// Starts the server and the link toggler for one run.
pub fn start(ctx: &HostContext<'_>) -> io::Result<HostSide> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let qmp_path = ctx.run_dir.join("qmp.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let transfers: Arc<Mutex<Vec<Transfer>>> = Arc::default();
    let link: Arc<Mutex<LinkLog>> = Arc::default();

    let server = {
        let (stop, transfers) = (stop.clone(), transfers.clone());
        std::thread::Builder::new()
            .name("net-peer".into())
            .spawn(move || serve(listener, &stop, &transfers))?
    };
    let toggler = {
        let (stop, link) = (stop.clone(), link.clone());
        let serial = ctx.serial_log.to_path_buf();
        let qmp = qmp_path.clone();
        std::thread::Builder::new()
            .name("net-link".into())
            .spawn(move || toggle_link(&serial, &qmp, &stop, &link))?
    };
    let threads: Vec<JoinHandle<()>> = vec![server, toggler];
    Ok(HostSide {
        guest_args: vec![format!("net_port={port}")],
        qemu_args: vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ],
        finish: Box::new(move || {
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                let _ = t.join();
            }
            let transfers = std::mem::take(&mut *transfers.lock().unwrap());
            let link = link.lock().unwrap().clone();
            outcome(port, &transfers, &link)
        }),
    })
}

/// The transfer checks and stats alone (`host.net.*`), for a peer without the link
/// toggler (`tap.rs`).
pub(super) fn transfers_outcome(port: u16, transfers: &[Transfer]) -> HostOutcome {
    outcome(port, transfers, &LinkLog::default())
}

fn outcome(port: u16, transfers: &[Transfer], link: &LinkLog) -> HostOutcome {
    let mut checks = Vec::new();
    let mut stats = BTreeMap::new();
    let mut stat = |k: String, v: String| {
        stats.insert(k, v);
    };
    stat("host.net.port".into(), port.to_string());
    for (k, v) in &link.rx_filter {
        stat(format!("host.net.rx_filter.{k}"), v.clone());
    }
    stat("host.net.connections".into(), transfers.len().to_string());
    for t in transfers {
        let p = format!("host.net.conn{}", t.conn);
        stat(format!("{p}.down_bytes"), t.down_sent.to_string());
        stat(format!("{p}.down_hash"), format!("{:#018x}", t.down_hash));
        stat(format!("{p}.up_bytes"), t.up_received.to_string());
        stat(format!("{p}.up_hash"), format!("{:#018x}", t.up_hash));
        stat(format!("{p}.down_ms"), t.down_ms.to_string());
        stat(format!("{p}.up_ms"), t.up_ms.to_string());
        let passed = t.error.is_none()
            && t.down_sent == t.down
            && t.up_received == t.up
            && t.up_first_bad.is_none();
        checks.push(Check {
            name: p,
            passed,
            detail: format!(
                "sent {} of {} bytes (fnv {:#018x}), received {} of {} (fnv {:#018x}, first wrong byte {}){}",
                t.down_sent,
                t.down,
                t.down_hash,
                t.up_received,
                t.up,
                t.up_hash,
                or_none(t.up_first_bad),
                t.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        });
    }
    if link.marker_seen {
        let passed = link.error.is_none()
            && link.down_at_ms.is_some()
            && link.up_at_ms.is_some()
            && link.status_before == "running";
        checks.push(Check {
            name: "host.net.link".into(),
            passed,
            detail: format!(
                "QEMU {}, status {}: set_link {NIC_ID} down at {} ms, guest saw it: {}, up at {} ms, status after {}{}",
                link.qemu_version,
                link.status_before,
                or_none(link.down_at_ms),
                if link.guest_saw_down { "yes" } else { "no" },
                or_none(link.up_at_ms),
                link.status_after,
                link.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        });
    }
    HostOutcome { checks, stats }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Accepts connections on `listener` (non-blocking) and runs the protocol on each, one
/// at a time, until `stop`; also the tap peer's server (`tap.rs`).
pub(super) fn serve(listener: TcpListener, stop: &AtomicBool, transfers: &Mutex<Vec<Transfer>>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let mut t = Transfer::default();
                if let Err(e) = handle(s, stop, &mut t) {
                    t.error = Some(e.to_string());
                }
                transfers.lock().unwrap().push(t);
            }
            Err(e) if timed_out(&e) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `read_exact` / `write_all` that give up when `stop` is set or nothing moves for
/// [`IDLE_LIMIT`].
struct Conn<'a> {
    s: TcpStream,
    stop: &'a AtomicBool,
}

impl Conn<'_> {
    fn check(&self, last: Instant) -> io::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped (QEMU exited)"));
        }
        if last.elapsed() > IDLE_LIMIT {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no progress"));
        }
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let last = Instant::now();
        loop {
            match self.s.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => return Ok(n),
                Err(e) if timed_out(&e) => self.check(last)?,
                Err(e) => return Err(e),
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            at += self.read_some(&mut buf[at..])?;
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        let mut last = Instant::now();
        while at < buf.len() {
            match self.s.write(&buf[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    at += n;
                    last = Instant::now();
                }
                Err(e) if timed_out(&e) => self.check(last)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn handle(s: TcpStream, stop: &AtomicBool, t: &mut Transfer) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.set_write_timeout(Some(Duration::from_millis(200)))?;
    s.set_nodelay(true)?;
    let mut c = Conn { s, stop };
    let mut hdr = [0u8; HEADER_LEN];
    c.read_exact(&mut hdr)?;
    if &hdr[..8] != MAGIC {
        return Err(io::Error::other(format!("bad request {:02x?}", &hdr[..8])));
    }
    let word = |i: usize| u64::from_le_bytes(hdr[8 * i..8 * i + 8].try_into().unwrap());
    t.conn = word(1);
    t.down = word(2);
    t.up = word(3);
    let (seed_down, seed_up) = (word(4), word(5));

    let t0 = Instant::now();
    let mut out = Stream::new(seed_down);
    let mut hash = WordFnv::default();
    let mut buf = vec![0u8; 64 * 1024];
    while out.pos() < t.down {
        let n = ((t.down - out.pos()) as usize).min(buf.len());
        out.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        c.write_all(&buf[..n])?;
        t.down_sent = out.pos();
        t.down_hash = hash.value();
    }
    t.down_hash = hash.value();
    t.down_ms = t0.elapsed().as_millis() as u64;

    let t1 = Instant::now();
    let mut expect = Stream::new(seed_up);
    let mut hash = WordFnv::default();
    while t.up_received < t.up {
        let want = ((t.up - t.up_received) as usize).min(buf.len());
        let n = c.read_some(&mut buf[..want])?;
        hash.update(&buf[..n]);
        if let Some(off) = expect.verify(&buf[..n]) {
            t.up_first_bad.get_or_insert(off);
        }
        t.up_received += n as u64;
        t.up_hash = hash.value();
    }
    t.up_hash = hash.value();
    t.up_ms = t1.elapsed().as_millis() as u64;

    let mut trailer = [0u8; 24];
    trailer[..8].copy_from_slice(&t.up_received.to_le_bytes());
    trailer[8..16].copy_from_slice(&t.up_hash.to_le_bytes());
    trailer[16..].copy_from_slice(&t.up_first_bad.unwrap_or(u64::MAX).to_le_bytes());
    c.write_all(&trailer)?;
    // Wait (bounded) for the guest to close first, so the trailer is not cut off by a reset.
    let mut sink = [0u8; 64];
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        match c.s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// Whether the serial log contains `marker` (read whole; it is small).
fn serial_has(serial: &Path, marker: &str) -> bool {
    std::fs::read(serial)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .any(|l| l.trim_end() == marker)
        })
        .unwrap_or(false)
}

/// Polls the serial log for `marker` until `stop` or `limit`.
fn wait_marker(serial: &Path, marker: &str, stop: &AtomicBool, limit: Option<Duration>) -> bool {
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| start.elapsed() < l) {
        if serial_has(serial, marker) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn toggle_link(serial: &Path, qmp: &Path, stop: &AtomicBool, log: &Mutex<LinkLog>) {
    if !wait_marker(serial, "STAT net.phase=link-test", stop, None) {
        return;
    }
    let t0 = Instant::now();
    log.lock().unwrap().marker_seen = true;
    let run = || -> io::Result<()> {
        let mut q = Qmp::connect(qmp, Duration::from_secs(10))?;
        let status = q.query_status()?;
        let filter = rx_filter_stats(&q.query_rx_filter(NIC_ID)?);
        {
            let mut l = log.lock().unwrap();
            l.qemu_version = q.version.clone();
            l.status_before = status;
            l.rx_filter = filter;
        }
        q.set_link(NIC_ID, false)?;
        log.lock().unwrap().down_at_ms = Some(t0.elapsed().as_millis() as u64);
        let saw = wait_marker(serial, "STAT net.link=down", stop, Some(LINK_DOWN_MAX));
        log.lock().unwrap().guest_saw_down = saw;
        // Keep the link down a little longer than the guest needed to notice.
        std::thread::sleep(Duration::from_millis(200));
        q.set_link(NIC_ID, true)?;
        log.lock().unwrap().up_at_ms = Some(t0.elapsed().as_millis() as u64);
        let status = q.query_status()?;
        log.lock().unwrap().status_after = status;
        Ok(())
    };
    if let Err(e) = run() {
        log.lock().unwrap().error = Some(e.to_string());
    }
}
