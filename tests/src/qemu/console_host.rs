//! Host side of the `console` scenario (guest: `tests/guest/src/scenarios/console.rs`).
//!
//! QEMU gets, next to the virtio-serial device and its port-0 virtconsole (a file chardev,
//! `console.out`, see `devices.rs`), two named `virtserialport`s whose chardevs are unix
//! sockets QEMU listens on (`server=on,wait=off`). A peer thread:
//!
//! 1. waits for the guest's `STAT console.phase=ports-ready`, connects both sockets (each
//!    connection is a PORT_OPEN 1 the guest must see);
//! 2. reads `PORT1 <nonce> <name>` / `PORT2 <nonce> <name>`;
//! 3. sends `PING <token>` on port 1 and checks `PONG <reversed token> <fnv64>`;
//! 4. reads `console_bulk` bytes of the guest's pattern on port 1 (every byte checked), then
//!    sends as many bytes of its own pattern on port 2 and checks the guest's
//!    `BULK <n> <fnv64>` against its own hash;
//! 5. closes port 2's socket (PORT_OPEN 0), waits for the guest's `STAT console.port2=closed`,
//!    connects again and reads `REOPENED <nonce>` on the new connection.
//!
//! After QEMU exits, `console.out` (port 0's chardev) must hold the emergency line (before
//! the port-0 queue line) and every `log` record the guest printed on COM1 during the
//! scenario, in order, marker line included.
//!
//! Every socket operation has a bounded timeout; all results are `host.console.*` checks.

use super::{Check, HostContext, HostOutcome, HostSide, line_read, or_none, outcome};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Names of ports 1 and 2 (the guest checks them too).
pub const PORT_NAMES: [&str; 2] = ["org.virtio-darwin.test.0", "org.virtio-darwin.test.1"];
/// The guest's marker log line (followed by the nonce).
pub const LOG_MARKER: &str = "console-log-marker";
/// Default bytes each way in the bulk step.
pub const DEFAULT_BULK: usize = 64 * 1024;
/// Bound of each step.
const STEP: Duration = Duration::from_secs(40);

/// FNV-1a 64 (as the guest computes it).
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Byte `i` of the bulk pattern (identical to the guest's).
pub fn pattern(seed: u64, i: u64) -> u8 {
    let mut x = (seed ^ (i / 8)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x >> ((i % 8) * 8)) as u8
}

/// Seeds of the guest → host and host → guest bulk streams.
pub fn bulk_seeds(nonce: &str) -> (u64, u64) {
    let h = fnv64(nonce.as_bytes());
    (h, h.rotate_left(17) ^ 0x5555)
}

/// What the guest answers to `PING <token>`.
pub fn pong(token: &str) -> String {
    let rev: String = token.chars().rev().collect();
    format!("PONG {rev} {:016x}", fnv64(token.as_bytes()))
}

/// A fresh hex string (not cryptographic: tells runs apart).
fn unique_hex(salt: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Unix socket paths are limited to 107 bytes: use the run directory when it is short
/// enough, else a private directory under the system's temp dir.
fn socket_dir(run_dir: &Path) -> io::Result<PathBuf> {
    if run_dir.join("port1.sock").as_os_str().len() < 100 {
        return Ok(run_dir.to_path_buf());
    }
    let d = std::env::temp_dir().join(format!("vcon-{}", unique_hex(1)));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn guest_word<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
    args.iter()
        .rev()
        .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

pub fn start(ctx: &HostContext<'_>) -> io::Result<HostSide> {
    let cfg = ctx.config;
    let nonce = unique_hex(2);
    let token = unique_hex(3)[..12].to_string();
    let mut guest_args = vec![
        format!("console_nonce={nonce}"),
        format!("console_token={token}"),
    ];
    let bulk = match guest_word(&cfg.extra_guest_args, "console_bulk") {
        Some(b) => b
            .parse()
            .map_err(|_| io::Error::other(format!("console_bulk={b}: not a number")))?,
        None => {
            guest_args.push(format!("console_bulk={DEFAULT_BULK}"));
            DEFAULT_BULK
        }
    };
    let dir = socket_dir(ctx.run_dir)?;
    let socks = [dir.join("port1.sock"), dir.join("port2.sock")];
    let mut qemu_args = Vec::new();
    for (i, (path, name)) in socks.iter().zip(PORT_NAMES).enumerate() {
        let nr = i + 1;
        let _ = std::fs::remove_file(path);
        qemu_args.push("-chardev".to_string());
        qemu_args.push(format!(
            "socket,id=cport{nr},path={},server=on,wait=off",
            path.display()
        ));
        qemu_args.push("-device".to_string());
        qemu_args.push(format!(
            "virtserialport,bus=vser0.0,nr={nr},chardev=cport{nr},name={name}"
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let checks: Arc<Mutex<Vec<Check>>> = Arc::default();
    let peer = {
        let (stop, checks) = (stop.clone(), checks.clone());
        let serial = ctx.serial_log.to_path_buf();
        let (nonce, token) = (nonce.clone(), token.clone());
        let socks = socks.clone();
        std::thread::Builder::new()
            .name("console-peer".into())
            .spawn(move || {
                let mut p = Peer {
                    serial,
                    stop: &stop,
                    checks: Vec::new(),
                };
                if let Err(e) = p.run(&socks, &nonce, &token, bulk) {
                    p.check("host.console.peer", false, e.to_string());
                }
                *checks.lock().unwrap() = p.checks;
            })?
    };
    let console_out = ctx.run_dir.join("console.out");
    let serial = ctx.serial_log.to_path_buf();
    Ok(HostSide {
        guest_args,
        qemu_args,
        finish: Box::new(move || {
            stop.store(true, Ordering::Relaxed);
            let _ = peer.join();
            let mut out = HostOutcome {
                checks: std::mem::take(&mut *checks.lock().unwrap()),
                ..HostOutcome::default()
            };
            let console = std::fs::read(&console_out).unwrap_or_default();
            let serial =
                String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
            out.checks.extend(check_console_file(
                &String::from_utf8_lossy(&console),
                &serial,
                &nonce,
            ));
            out.stats
                .insert("host.console.out_bytes".into(), console.len().to_string());
            out.stats.insert("host.console.nonce".into(), nonce);
            out
        }),
    })
}

/// The checks on port 0's chardev after the run: the emergency line, then the port-0 queue
/// line; every log record of the scenario (COM1, from `SCENARIO` to the detach), in order.
pub fn check_console_file(console: &str, serial: &str, nonce: &str) -> Vec<Check> {
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let find = |want: &str| lines.iter().position(|l| *l == want);
    let emerg = find(&format!("EMERG-BEFORE-DRIVER-OK {nonce}"));
    let port0 = find(&format!("PORT0 {nonce} through the port-0 transmit queue"));
    let mut checks = vec![
        Check {
            name: "host.console.emergency".into(),
            passed: emerg.is_some() && (port0.is_none() || emerg < port0),
            detail: format!(
                "emergency line at line {} of port 0's chardev (port-0 queue line at {})",
                or_none(emerg),
                or_none(port0)
            ),
        },
        Check {
            name: "host.console.port0".into(),
            passed: port0.is_some(),
            detail: format!("port-0 queue line at line {}", or_none(port0)),
        },
    ];
    // The records the guest printed on COM1 while the tee was attached.
    let records: Vec<&str> = serial
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .skip_while(|l| !l.starts_with("SCENARIO console"))
        .take_while(|l| !l.starts_with("STAT console.logger.dropped="))
        .filter(|l| l.starts_with('['))
        .collect();
    let mut at = 0;
    let mut missing = Vec::new();
    for r in &records {
        match lines[at..].iter().position(|l| l == r) {
            Some(k) => at += k + 1,
            None => missing.push(*r),
        }
    }
    let marker = format!("{LOG_MARKER} {nonce}");
    let marker_seen = lines
        .iter()
        .any(|l| l.starts_with("[INFO ") && l.ends_with(&marker));
    checks.push(Check {
        name: "host.console.log".into(),
        passed: marker_seen && missing.is_empty() && records.len() >= 3,
        detail: format!(
            "{} of {} log records of the run found in order on port 0, marker {}; missing: {}",
            records.len() - missing.len(),
            records.len(),
            if marker_seen { "seen" } else { "NOT seen" },
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing
                    .iter()
                    .take(3)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" | ")
            }
        ),
    });
    checks
}

struct Peer<'a> {
    serial: PathBuf,
    stop: &'a AtomicBool,
    checks: Vec<Check>,
}

/// One connected port with a read buffer.
struct Port {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Peer<'_> {
    fn check(&mut self, name: &str, passed: bool, detail: String) -> bool {
        self.checks.push(Check {
            name: name.into(),
            passed,
            detail,
        });
        passed
    }

    fn stopped(&self) -> io::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            Err(io::Error::other("QEMU exited"))
        } else {
            Ok(())
        }
    }

    /// Waits until the guest's serial output has the line `want`.
    fn wait_serial(&self, want: &str) -> io::Result<()> {
        let t0 = Instant::now();
        loop {
            let text = std::fs::read(&self.serial).unwrap_or_default();
            if String::from_utf8_lossy(&text)
                .lines()
                .any(|l| l.trim_end() == want)
            {
                return Ok(());
            }
            if t0.elapsed() > STEP {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("guest never printed {want:?}"),
                ));
            }
            self.stopped()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self, path: &Path) -> io::Result<Port> {
        let t0 = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(100)))?;
                    s.set_write_timeout(Some(Duration::from_millis(100)))?;
                    return Ok(Port { s, buf: Vec::new() });
                }
                Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connect {}: {e}", path.display()),
                    ));
                }
                Err(_) => {
                    self.stopped()?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Reads until `p.buf` holds `n` bytes (or the step's bound / QEMU's exit).
    fn fill(&self, p: &mut Port, n: usize) -> io::Result<()> {
        let mut chunk = [0u8; 16384];
        let mut last = Instant::now();
        while p.buf.len() < n {
            match p.s.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => {
                    p.buf.extend_from_slice(&chunk[..k]);
                    last = Instant::now();
                }
                Err(e) if is_timeout(&e) => {
                    if last.elapsed() > STEP {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{} of {n} bytes", p.buf.len()),
                        ));
                    }
                    // QEMU may have exited with the data still in the socket: keep reading
                    // until EOF rather than stopping at once.
                    if self.stop.load(Ordering::Relaxed) && last.elapsed() > Duration::from_secs(2)
                    {
                        return Err(io::Error::other("QEMU exited"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_line(&self, p: &mut Port) -> io::Result<String> {
        let mut chunk = [0u8; 4096];
        let t0 = Instant::now();
        loop {
            if let Some(end) = p.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = p.buf.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            match p.s.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => p.buf.extend_from_slice(&chunk[..k]),
                Err(e) if is_timeout(&e) => {
                    if t0.elapsed() > STEP {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no line"));
                    }
                    self.stopped()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_all(&self, p: &mut Port, data: &[u8]) -> io::Result<()> {
        let mut at = 0;
        let mut last = Instant::now();
        while at < data.len() {
            match p.s.write(&data[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    at += k;
                    last = Instant::now();
                }
                Err(e) if is_timeout(&e) => {
                    if last.elapsed() > STEP {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{at} of {} bytes written", data.len()),
                        ));
                    }
                    self.stopped()?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        socks: &[PathBuf; 2],
        nonce: &str,
        token: &str,
        bulk: usize,
    ) -> io::Result<()> {
        self.wait_serial("STAT console.phase=ports-ready")?;
        let mut p1 = self.connect(&socks[0])?;
        let mut p2 = self.connect(&socks[1])?;

        // Greeting lines.
        for (i, p) in [&mut p1, &mut p2].into_iter().enumerate() {
            let want = format!("PORT{} {nonce} {}", i + 1, PORT_NAMES[i]);
            let got = self.read_line(p);
            let ok = matches!(&got, Ok(l) if *l == want);
            self.check(
                &format!("host.console.port{}", i + 1),
                ok,
                format!(
                    "read {} on {} (expected \"{want}\")",
                    line_read(&got),
                    PORT_NAMES[i]
                ),
            );
        }

        // Echo.
        self.write_all(&mut p1, format!("PING {token}\n").as_bytes())?;
        let got = self.read_line(&mut p1);
        let want = pong(token);
        let ok = matches!(&got, Ok(l) if *l == want);
        self.check(
            "host.console.echo",
            ok,
            format!(
                "sent PING {token}, got {} (expected \"{want}\")",
                line_read(&got)
            ),
        );

        // Guest → host bulk on port 1.
        let (seed_out, seed_in) = bulk_seeds(nonce);
        let t0 = Instant::now();
        let got = self.fill(&mut p1, bulk);
        let data: Vec<u8> = p1.buf.drain(..bulk.min(p1.buf.len())).collect();
        let first_bad = data
            .iter()
            .enumerate()
            .position(|(i, &b)| b != pattern(seed_out, i as u64));
        self.check(
            "host.console.bulk_out",
            got.is_ok() && first_bad.is_none() && data.len() == bulk,
            format!(
                "received {} of {bulk} bytes on port 1 in {} ms, fnv {:016x}, first wrong byte {}{}",
                data.len(),
                t0.elapsed().as_millis(),
                fnv64(&data),
                or_none(first_bad),
                got.err().map(|e| format!(": {e}")).unwrap_or_default()
            ),
        );

        // Host → guest bulk on port 2, answered with the guest's hash.
        let out: Vec<u8> = (0..bulk as u64).map(|i| pattern(seed_in, i)).collect();
        let t0 = Instant::now();
        let sent = self.write_all(&mut p2, &out);
        let got = self.read_line(&mut p2);
        let want = format!("BULK {bulk} {:016x}", fnv64(&out));
        let ok = sent.is_ok() && matches!(&got, Ok(l) if *l == want);
        self.check(
            "host.console.bulk_in",
            ok,
            format!(
                "sent {bulk} bytes on port 2 ({}), guest answered {} in {} ms (expected \"{want}\")",
                outcome(&sent),
                line_read(&got),
                t0.elapsed().as_millis()
            ),
        );

        // Close port 2, wait for the guest to see it, open it again.
        drop(p2);
        self.wait_serial("STAT console.port2=closed")?;
        let mut p2 = self.connect(&socks[1])?;
        let got = self.read_line(&mut p2);
        let want = format!("REOPENED {nonce}");
        let ok = matches!(&got, Ok(l) if *l == want);
        self.check(
            "host.console.reopen",
            ok,
            format!(
                "closed port 2, guest saw it, reconnected: read {} (expected \"{want}\")",
                line_read(&got)
            ),
        );
        drop(p1);
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_file_checks() {
        let nonce = "abc";
        let serial = "boot\nSCENARIO console machine=q35 irq=msix\n[INFO  x] one\nCHECK a PASS\n\
                      [WARN  y] two\n[INFO  z] console-log-marker abc\nSTAT console.logger.dropped=0\n\
                      [INFO  w] after\n";
        let console = "[INFO  x] one\r\nEMERG-BEFORE-DRIVER-OK abc\n[WARN  y] two\r\n\
                       PORT0 abc through the port-0 transmit queue\n[INFO  z] console-log-marker abc\r\n";
        let c = check_console_file(console, serial, nonce);
        assert!(c.iter().all(|c| c.passed), "{c:?}");
        // Out of order: the port-0 line before the emergency line.
        let bad = "PORT0 abc through the port-0 transmit queue\nEMERG-BEFORE-DRIVER-OK abc\n";
        let c = check_console_file(bad, serial, nonce);
        assert!(!c[0].passed && c[1].passed && !c[2].passed);
    }

    #[test]
    fn pong_and_pattern() {
        assert_eq!(pong("ab"), format!("PONG ba {:016x}", fnv64(b"ab")));
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        let (a, b) = bulk_seeds("n");
        assert_ne!(a, b);
        let distinct: std::collections::HashSet<u8> = (0..256).map(|i| pattern(a, i)).collect();
        assert!(distinct.len() > 64, "{}", distinct.len());
    }
}
