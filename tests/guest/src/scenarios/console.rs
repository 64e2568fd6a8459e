//! `console`: the virtio-console driver (`virtio_console::VirtioConsole` over `virtio-pci` +
//! `virtio-core`) against QEMU's virtio-serial with a virtconsole on port 0 (a file the
//! runner reads) and two named `virtserialport`s whose chardevs are unix sockets the host
//! side (`tests/src/qemu/console_host.rs`) connects to, reads and writes:
//!
//! 1. `console.emergency`: `VirtioConsole::new` stops at FEATURES_OK; an emergency write
//!    (`emerg_wr`, one config write per byte) goes out before DRIVER_OK; the host finds it
//!    in port 0's chardev, before everything written later;
//! 2. `console.logger`: the console is installed in a `ConsoleLogger` that gets every `log`
//!    record of the run (a tee of the guest's COM1 logger, attached before the device is
//!    even probed: earlier records are stashed), so the host finds the run's log in port 0's
//!    chardev, marker line included;
//! 3. `console.start` / `console.ports`: queues, DRIVER_OK, DEVICE_READY; PORT_ADD for port
//!    0 (CONSOLE_PORT) and the two named ports, whose names match;
//! 4. `console.host_open`: `STAT console.phase=ports-ready` asks the host to connect its
//!    sockets; each connection arrives as PORT_OPEN 1 (`HostOpened`);
//! 5. `console.write`: a line on each port (port 0: the transmit queue, not `emerg_wr`);
//! 6. `console.echo`: the host sends `PING <token>` on port 1, the guest answers
//!    `PONG <reversed token> <fnv64 of token>`; the host checks it;
//! 7. `console.bulk_out` / `console.bulk_in`: `console_bulk` bytes of a seeded pattern to
//!    the host on port 1 (through transmit backpressure), and from the host on port 2, every
//!    byte checked here; the guest answers `BULK <n> <fnv64>` and the host compares hashes;
//! 8. `console.reopen`: the host closes port 2's socket (PORT_OPEN 0, `HostClosed`), the
//!    guest prints `STAT console.port2=closed`, the host connects again (`HostOpened`) and
//!    reads `REOPENED <nonce>` on the new connection.
//!
//! Parameters: `console_nonce=` (required: the host's run nonce, in every line the host
//! checks), `console_token=` (the echo token the host will send, so the guest can tell a
//! mismatch), `console_bulk=` (bytes each way, default 65536).

use super::Env;
use super::bus::{self, GuestBus};
use crate::check;
use crate::cmdline::IrqMode;
use crate::report;
use crate::report::show::{FeatureSet, Got, Irq, Opt, Outcome, Status, yes_no};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_console::{ConsoleEvent, ConsoleLogger, ConsoleOptions, VirtioConsole};
use virtio_core::Bus;
use virtio_core::platform::InterruptMode;
use virtio_core::transport::Transport;
use virtio_core::{DeviceStatus, DeviceType};

/// The names the runner gives ports 1 and 2 (`virtserialport,name=`).
pub const PORT_NAMES: [&str; 2] = ["org.virtio-darwin.test.0", "org.virtio-darwin.test.1"];
/// The marker line the host looks for in port 0's chardev.
pub const LOG_MARKER: &str = "console-log-marker";

type Console = VirtioConsole<GuestBus>;

/// The guest's log tee for this scenario: every record goes to COM1 and to port 0 through
/// the console's emergency path.
static LOGGER: ConsoleLogger<GuestBus> = ConsoleLogger::new(log::LevelFilter::Info);

const STEP_MS: u64 = 20_000;

/// What the pump has seen so far.
#[derive(Default)]
struct Seen {
    added: [bool; 3],
    console: [bool; 3],
    names: [Option<String>; 3],
    host_open: [bool; 3],
    opened: [u32; 3],
    closed: [u32; 3],
    rejected: u32,
    rx: [Vec<u8>; 3],
    errors: Vec<String>,
}

impl Seen {
    fn event(&mut self, e: ConsoleEvent) {
        let slot = |id: u32| (id < 3).then_some(id as usize);
        match e {
            ConsoleEvent::PortAdded { id, name } => {
                if let Some(i) = slot(id) {
                    self.added[i] = true;
                    if let Some(n) = name {
                        self.names[i] = Some(n.as_str().into());
                    }
                }
            }
            ConsoleEvent::PortNamed { id, name } => {
                if let Some(i) = slot(id) {
                    self.names[i] = Some(name.as_str().into());
                }
            }
            ConsoleEvent::PortRemoved { id } => {
                if let Some(i) = slot(id) {
                    self.added[i] = false;
                }
            }
            ConsoleEvent::HostOpened { id } => {
                if let Some(i) = slot(id) {
                    self.host_open[i] = true;
                    self.opened[i] += 1;
                }
            }
            ConsoleEvent::HostClosed { id } => {
                if let Some(i) = slot(id) {
                    self.host_open[i] = false;
                    self.closed[i] += 1;
                }
            }
            ConsoleEvent::ConsolePort { id } => {
                if let Some(i) = slot(id) {
                    self.console[i] = true;
                }
            }
            ConsoleEvent::Resize { .. } => {}
            ConsoleEvent::Rejected { .. } => self.rejected += 1,
        }
    }

    /// Takes the first line (without `\n`) received on `port`, if a whole one is there.
    fn line(&mut self, port: usize) -> Option<String> {
        let rx = &mut self.rx[port];
        let end = rx.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = rx.drain(..=end).collect();
        Some(String::from_utf8_lossy(&line[..end]).into_owned())
    }
}

/// Services recorded interrupts (MSI-X entries, INTx), drains events and reads every
/// port's data into `seen`.
fn service(c: &mut Console, seen: &mut Seen) {
    bus::dispatch(
        c,
        |c| c.bus_mut(),
        |c, vector| {
            c.handle_interrupt(vector);
        },
    );
    while let Some(e) = c.next_event() {
        seen.event(e);
    }
    let mut buf = [0u8; 2048];
    for port in 0..3u32 {
        if !seen.added[port as usize] {
            continue;
        }
        loop {
            match c.read(port, &mut buf) {
                Ok(0) => break,
                Ok(n) => seen.rx[port as usize].extend_from_slice(&buf[..n]),
                Err(e) => {
                    seen.errors.push(format!("read port {port}: {e}"));
                    break;
                }
            }
        }
    }
}

/// Runs `f` on the console with the logger's lock held (briefly).
fn with<R>(f: impl FnOnce(&mut Console) -> R) -> Option<R> {
    LOGGER.with(f)
}

/// Services the device until `done` holds, for at most `timeout_ms`: halts until an
/// interrupt between checks (bounded slices), or spins in polling mode.
fn pump(seen: &mut Seen, timeout_ms: u64, mut done: impl FnMut(&mut Seen) -> bool) -> bool {
    let deadline = crate::time::now_ns().saturating_add(timeout_ms.saturating_mul(1_000_000));
    loop {
        let ok = with(|c| {
            service(c, seen);
            if done(seen) {
                return true;
            }
            if c.bus().interrupt_mode() != InterruptMode::Polling {
                c.bus_mut().interrupt_platform().wait(u64::MAX, 10);
            }
            false
        });
        if ok == Some(true) {
            return true;
        }
        if crate::time::now_ns() >= deadline {
            return false;
        }
        if ok.is_none() {
            // The logger's lock was busy (cannot happen with one CPU); try again.
            core::hint::spin_loop();
        }
    }
}

/// Writes all of `data` on `port`, waiting for transmit completions when the ring is full.
fn write_all(seen: &mut Seen, port: u32, data: &[u8]) -> Result<(), String> {
    let deadline = crate::time::now_ns() + STEP_MS * 1_000_000;
    let mut n = 0;
    while n < data.len() {
        match with(|c| c.write(port, &data[n..])) {
            Some(Ok(k)) => n += k,
            Some(Err(virtio_console::ConsoleError::Busy)) => {
                if crate::time::now_ns() > deadline {
                    return Err(format!("port {port}: {n} of {} bytes written", data.len()));
                }
                // Let completions (and host input) in.
                pump(seen, 10, |_| false);
            }
            Some(Err(e)) => return Err(format!("port {port}: {e} after {n} bytes")),
            None => return Err("console lock busy".into()),
        }
    }
    Ok(())
}

pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Byte `i` of the bulk pattern with `seed` (the host has the same function).
pub fn pattern(seed: u64, i: u64) -> u8 {
    let mut x = (seed ^ (i / 8)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x >> ((i % 8) * 8)) as u8
}

/// Seeds of the two bulk directions, from the nonce.
pub fn bulk_seeds(nonce: &str) -> (u64, u64) {
    let h = fnv64(nonce.as_bytes());
    (h, h.rotate_left(17) ^ 0x5555)
}

pub fn run(env: &mut Env) {
    let Some(nonce) = env.cmdline.get("console_nonce").map(String::from) else {
        check!(
            "console.nonce",
            false,
            "no console_nonce= on the command line"
        );
        return;
    };
    let token = String::from(env.cmdline.get("console_token").unwrap_or(""));
    let bulk = env.cmdline.get_u64("console_bulk", 65536) as usize;

    // From here on every record also goes to the console (stashed until it is installed).
    crate::serial::set_log_tee(Some(&LOGGER));
    log::info!("console scenario: nonce {nonce}, bulk {bulk} bytes each way");

    let Some(func) = env.find_virtio(virtio_core::DeviceType::Console) else {
        check!("console.present", false, "no virtio-console on the bus");
        crate::serial::set_log_tee(None);
        return;
    };
    let addr = func.addr;
    let dev = match bus::open(env, func) {
        Ok(d) => d,
        Err(e) => {
            check!("console.init", false, "{addr} {e}");
            crate::serial::set_log_tee(None);
            return;
        }
    };
    let mut console = match VirtioConsole::new(dev, ConsoleOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            check!("console.init", false, "{addr} VirtioConsole::new: {e}");
            crate::serial::set_log_tee(None);
            return;
        }
    };

    // ---- 1. emergency write before DRIVER_OK ----
    let status = console.bus().transport().status();
    let text = format!("EMERG-BEFORE-DRIVER-OK {nonce}\n");
    let wrote = console.emergency_write(text.as_bytes());
    check!(
        "console.emergency",
        wrote == Ok(text.len())
            && console.has_emergency_write()
            && !console.is_started()
            && status.contains(DeviceStatus::DRIVER)
            && !status.contains(DeviceStatus::DRIVER_OK)
            // Legacy devices have no FEATURES_OK step.
            && (status.contains(DeviceStatus::FEATURES_OK)
                || !console.features().contains(virtio_core::Features::VERSION_1)),
        "{addr} features {}, status {} (before DRIVER_OK), emergency write: {} of {} bytes",
        FeatureSet(DeviceType::Console, console.features().bits()),
        Status(status),
        Got(&wrote),
        text.len()
    );

    // ---- 2. the console becomes the log's second sink ----
    let installed = match LOGGER.install(console) {
        Ok(None) => true,
        Ok(Some(_)) | Err(_) => false,
    };
    check!(
        "console.logger",
        installed,
        "ConsoleLogger installed after FEATURES_OK; stashed records flushed through emerg_wr"
    );
    if !installed {
        crate::serial::set_log_tee(None);
        return;
    }
    log::info!("console: logger installed, starting the queues");

    let mut seen = Seen::default();
    let result = steps(env, &mut seen, &nonce, &token, bulk);
    if let Err(e) = &result {
        log::error!("console: {e}");
    }

    // ---- the marker, then detach ----
    log::info!("{LOG_MARKER} {nonce}");
    crate::serial::set_log_tee(None);
    report::stat("console.logger.dropped", LOGGER.dropped());
    if let Some(mut c) = LOGGER.take() {
        let st = c.stats();
        report::stat("console.tx_bytes", st.tx_bytes);
        report::stat("console.tx_chains", st.tx_chains);
        report::stat("console.tx_busy", st.tx_busy);
        report::stat("console.rx_bytes", st.rx_bytes);
        report::stat("console.rx_dropped_bytes", st.rx_dropped_bytes);
        report::stat("console.control_rx", st.control_rx);
        report::stat("console.control_tx", st.control_tx);
        report::stat("console.control_rejected", st.control_rejected);
        report::stat("console.emergency_bytes", st.emergency_bytes);
        report::stat("console.bad_tokens", st.bad_tokens);
        report::stat("console.events_lost", st.events_lost);
        report::stat("console.host_opened.port2", seen.opened[2]);
        report::stat("console.host_closed.port2", seen.closed[2]);
        check!(
            "console.clean",
            st.bad_tokens == 0
                && st.control_rejected == 0
                && st.events_lost == 0
                && seen.rejected == 0
                && seen.errors.is_empty()
                && LOGGER.dropped() == 0,
            "bad tokens {}, control rejected {}, events lost {}, log records dropped {}, errors: {}",
            st.bad_tokens,
            st.control_rejected,
            st.events_lost,
            LOGGER.dropped(),
            if seen.errors.is_empty() {
                "none".into()
            } else {
                seen.errors.join("; ")
            }
        );
        bus::stats("console", c.bus_mut());
        c.shutdown();
    } else {
        check!("console.clean", false, "could not take the console back");
    }
}

/// Steps 3 to 8; an error ends the scenario (the check saying why is already printed).
fn steps(env: &Env, seen: &mut Seen, nonce: &str, token: &str, bulk: usize) -> Result<(), String> {
    // ---- 3. queues, DRIVER_OK, ports ----
    let started = with(|c| c.start()).ok_or("console lock busy")?;
    let (mode, features, multiport) =
        with(|c| (c.bus().interrupt_mode(), c.features().bits(), c.multiport()))
            .ok_or("console lock busy")?;
    let mode_ok = matches!(
        (env.irq, mode),
        (IrqMode::MsiX, InterruptMode::MsiX { .. })
            | (IrqMode::Intx, InterruptMode::Intx)
            | (IrqMode::Poll, InterruptMode::Polling)
    );
    let nports = with(|c| c.max_ports()).unwrap_or(0);
    if !check!(
        "console.start",
        started.is_ok() && mode_ok && multiport,
        "{} features {}, multiport {}, serving {nports} ports: {}",
        Irq(mode),
        FeatureSet(DeviceType::Console, features),
        yes_no(multiport),
        Outcome(&started)
    ) {
        return Err("start".into());
    }
    let ok = pump(seen, STEP_MS, |s| {
        s.added.iter().all(|&a| a) && s.names[1].is_some() && s.names[2].is_some()
    });
    let names_ok = seen.names[1].as_deref() == Some(PORT_NAMES[0])
        && seen.names[2].as_deref() == Some(PORT_NAMES[1]);
    let found =
        with(|c| (c.find_port(PORT_NAMES[0]), c.find_port(PORT_NAMES[1]))).unwrap_or_default();
    if !check!(
        "console.ports",
        ok && names_ok && seen.console[0] && found == (Some(1), Some(2)),
        "ports added: {}, port 0 is the console: {}, names: {}, find_port: {}, {}",
        seen.added
            .iter()
            .map(|&a| yes_no(a))
            .collect::<Vec<_>>()
            .join(" "),
        yes_no(seen.console[0]),
        seen.names
            .iter()
            .map(|n| n.as_deref().unwrap_or("(none)"))
            .collect::<Vec<_>>()
            .join(" "),
        Opt(found.0),
        Opt(found.1)
    ) {
        return Err("ports".into());
    }
    // Our side of the named ports is open (port 0: opened on CONSOLE_PORT by the driver).
    for p in 1..3 {
        with(|c| c.open_port(p, true))
            .ok_or("console lock busy")?
            .map_err(|e| format!("open_port({p}): {e}"))?;
    }

    // ---- 4. the host connects ----
    report::stat("console.phase", "ports-ready");
    let ok = pump(seen, STEP_MS, |s| s.host_open[1] && s.host_open[2]);
    if !check!(
        "console.host_open",
        ok,
        "PORT_OPEN from the host: port 1 {} time(s), port 2 {} time(s)",
        seen.opened[1],
        seen.opened[2]
    ) {
        return Err("host did not open".into());
    }

    // ---- 5. a line on each port ----
    let lines = [
        format!("PORT0 {nonce} through the port-0 transmit queue\n"),
        format!("PORT1 {nonce} {}\n", PORT_NAMES[0]),
        format!("PORT2 {nonce} {}\n", PORT_NAMES[1]),
    ];
    let mut res = Ok(());
    for (p, l) in lines.iter().enumerate() {
        res = res.and(write_all(seen, p as u32, l.as_bytes()));
    }
    if !check!(
        "console.write",
        res.is_ok(),
        "a line on ports 0, 1, 2: {}",
        Outcome(&res)
    ) {
        return Err("write".into());
    }

    // ---- 6. echo ----
    let mut ping = None;
    pump(seen, STEP_MS, |s| {
        ping = s.line(1);
        ping.is_some()
    });
    let got = ping.unwrap_or_default();
    let their = got.strip_prefix("PING ").unwrap_or("");
    let rev: String = their.chars().rev().collect();
    let answer = format!("PONG {rev} {:016x}\n", fnv64(their.as_bytes()));
    let sent = write_all(seen, 1, answer.as_bytes());
    if !check!(
        "console.echo",
        !their.is_empty() && (token.is_empty() || their == token) && sent.is_ok(),
        "received \"{got}\" on port 1 (expected token \"{token}\"), answered \"{}\": {}",
        answer.trim_end(),
        Outcome(&sent)
    ) {
        return Err("echo".into());
    }

    // ---- 7. bulk both ways ----
    let (seed_out, seed_in) = bulk_seeds(nonce);
    let out: Vec<u8> = (0..bulk as u64).map(|i| pattern(seed_out, i)).collect();
    let t0 = crate::time::now_ns();
    let sent = write_all(seen, 1, &out);
    let ms_out = (crate::time::now_ns() - t0) / 1_000_000;
    check!(
        "console.bulk_out",
        sent.is_ok(),
        "{bulk} bytes to the host on port 1 in {ms_out} ms, fnv {:016x}: {}",
        fnv64(&out),
        Outcome(&sent)
    );
    drop(out);
    let t0 = crate::time::now_ns();
    let ok = pump(seen, STEP_MS * 2, |s| s.rx[2].len() >= bulk);
    let ms_in = (crate::time::now_ns() - t0) / 1_000_000;
    let data: Vec<u8> = seen.rx[2].drain(..bulk.min(seen.rx[2].len())).collect();
    let first_bad = data
        .iter()
        .enumerate()
        .position(|(i, &b)| b != pattern(seed_in, i as u64));
    let hash = fnv64(&data);
    let reply = format!("BULK {} {hash:016x}\n", data.len());
    let replied = write_all(seen, 2, reply.as_bytes());
    check!(
        "console.bulk_in",
        ok && first_bad.is_none() && data.len() == bulk && replied.is_ok(),
        "{} of {bulk} bytes from the host on port 2 in {ms_in} ms, fnv {hash:016x}, first wrong byte {}; reply: {}",
        data.len(),
        Opt(first_bad),
        Outcome(&replied)
    );
    report::stat("console.bulk_out_ms", ms_out);
    report::stat("console.bulk_in_ms", ms_in);

    // ---- 8. the host closes port 2 and opens it again ----
    let closed = pump(seen, STEP_MS, |s| !s.host_open[2]);
    report::stat(
        "console.port2",
        if closed { "closed" } else { "still-open" },
    );
    let reopened = closed && pump(seen, STEP_MS, |s| s.host_open[2]);
    let line = format!("REOPENED {nonce}\n");
    let wrote = if reopened {
        write_all(seen, 2, line.as_bytes())
    } else {
        Err("not reopened".into())
    };
    check!(
        "console.reopen",
        closed && reopened && wrote.is_ok(),
        "port 2: host closed seen {closed}, reopened seen {reopened} (opened {} times, closed {} times), wrote \"{}\": {}",
        seen.opened[2],
        seen.closed[2],
        line.trim_end(),
        Outcome(&wrote)
    );
    // Give the host a moment to read the last line before the guest exits.
    pump(seen, 200, |_| false);
    Ok(())
}
