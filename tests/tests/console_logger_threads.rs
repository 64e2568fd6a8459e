//! `ConsoleLogger` under concurrency, natively and under Miri's data-race detector (one of
//! `cargo xtask miri`'s runs; the scale shrinks under `cfg(miri)`, no code path does).
//!
//! Writer threads log numbered records (some longer than the logger's 128-byte line buffer,
//! so one record is several `emergency_write` calls) through the global `log` facade, while
//! a platform thread polls the console through `with` (the driver's own diagnostic about a
//! hostile control message is then logged from inside `with`, re-entrantly) and writes raw
//! lines with `write_bytes`, and a third thread takes the console out and puts it back.
//! What the device received through `emerg_wr` must be whole lines, none twice, each
//! thread's records in the order it logged them, and every record that did not arrive
//! counted in `ConsoleLogger::dropped` — as soon as the threads are done, without a
//! further flush. Two deterministic tests (threads in lock step through a record argument
//! that blocks while it is formatted) pin the stash's hand-off and its ordering.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, MutexGuard};
use std::thread;

use log::{Level, LevelFilter, Log, Record};
use virtio_console::{ConsoleEvent, ConsoleLogger, ConsoleOptions, VirtioConsole};
use virtio_pci::Preference;
use virtio_tests::console_model::{self as cm, ConsoleModel, F_EMERG_WRITE, F_MULTIPORT};
use virtio_tests::sim::{SimBuilder, SimMode};

const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);
const V1: u64 = 1 << 32;

static LOGGER: ConsoleLogger<cm::SimConsoleBus> = ConsoleLogger::new(LevelFilter::Info);

/// How much each thread does.
struct Scale {
    writers: usize,
    records_per_writer: usize,
    /// Body length of every third record: over the 128-byte line buffer.
    long_body: usize,
    /// Platform iterations: one hostile control message, one poll, one raw write each.
    polls: usize,
    /// Times the console is taken out and put back.
    swaps: usize,
}

const SCALE: Scale = if cfg!(miri) {
    Scale {
        writers: 3,
        records_per_writer: 6,
        long_body: 140,
        polls: 4,
        swaps: 2,
    }
} else {
    Scale {
        writers: 3,
        records_per_writer: 200,
        long_body: 300,
        polls: 40,
        swaps: 8,
    }
};

/// First port id of the hostile PORT_ADD messages (beyond `max_nr_ports`, so each one is
/// rejected and logged by the driver).
const HOSTILE_PORT: u32 = 1000;

/// What a line the device received is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    /// A writer thread's record.
    Record { writer: usize, seq: usize },
    /// The driver's warning about hostile message `port` (logged inside `with`).
    Diag { port: u32 },
    /// The platform thread's `write_bytes` line.
    Raw { seq: usize },
}

/// A recognisable body: its letter and length depend on who logged it and when.
fn body(salt: usize, seq: usize) -> String {
    let letter = char::from(b'a' + ((salt * 7 + seq) % 26) as u8);
    let len = if seq % 3 == 1 {
        SCALE.long_body
    } else {
        12 + seq % 5
    };
    std::iter::repeat_n(letter, len).collect()
}

fn message(writer: usize, seq: usize) -> String {
    format!("w{writer} #{seq} {}", body(writer, seq))
}

fn target(writer: usize) -> String {
    format!("w{writer}")
}

/// The line of `item` as the device must receive it (without "\r\n").
fn line_of(item: Item) -> String {
    match item {
        Item::Record { writer, seq } => {
            format!("[INFO  {}] {}", target(writer), message(writer, seq))
        }
        Item::Diag { port } => format!(
            "[WARN  virtio_console::driver] virtio-console: rejected control message: \
             port id {port} beyond max_nr_ports"
        ),
        Item::Raw { seq } => format!("raw #{seq} {}", body(99, seq)),
    }
}

/// The item `line` is, when it is exactly one of them: a line made of parts of two
/// records, or of a record cut short, is none.
fn parse(line: &str) -> Option<Item> {
    let number = |s: &str| s.split([' ', ']']).next()?.parse::<usize>().ok();
    let item = if let Some(rest) = line.strip_prefix("[INFO  w") {
        Item::Record {
            writer: number(rest)?,
            seq: number(rest.split_once('#')?.1)?,
        }
    } else if let Some(rest) = line.strip_prefix("raw #") {
        Item::Raw { seq: number(rest)? }
    } else {
        let rest = line.split_once("port id ")?.1;
        Item::Diag {
            port: u32::try_from(number(rest)?).ok()?,
        }
    };
    (line_of(item) == line).then_some(item)
}

/// The sequence `item` is ordered in: writer `n`'s records are sequence `n`; the
/// platform's diagnostics and its raw lines are one each. A raw line is not ordered after
/// the platform's earlier diagnostics: `with` writes the stash before and after `f` but,
/// when the stash stays busy past its bound, runs `f` all the same, so a raw line can
/// precede a diagnostic still stashed. Log records never overtake stashed ones.
fn sequence(item: Item) -> usize {
    match item {
        Item::Record { writer, .. } => writer,
        Item::Diag { .. } => SCALE.writers,
        Item::Raw { .. } => SCALE.writers + 1,
    }
}

/// The tests run one at a time: the driver's own diagnostics of one test's console go to
/// the global `LOGGER`, which the concurrent test checks line by line.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn concurrent_records_arrive_whole_once_in_order_or_counted() {
    let _serial = serial();
    let sim = SimBuilder::new(SimMode::Transitional, 3)
        .features(F_MULTIPORT | F_EMERG_WRITE | RING | V1)
        .queues(&cm::queue_sizes(1, 8))
        .device_config(&cm::config_bytes(0, 0, 1))
        .build();
    let mut device = ConsoleModel::new(&sim);
    log::set_logger(&LOGGER).expect("the only logger of this test binary");
    log::set_max_level(LevelFilter::Info);
    let console = VirtioConsole::new(cm::bus(&sim, Preference::Legacy), ConsoleOptions::default())
        .expect("negotiate");
    assert!(matches!(LOGGER.install(console), Ok(None)));
    LOGGER.with(|c| c.start()).expect("lock").expect("start");
    device.process().expect("control messages of start");
    // The driver's setup lines are not this test's business: count from here.
    let host = ConsoleModel::new(&sim);
    let setup_bytes = host.emergency_bytes().len();
    assert_eq!(LOGGER.dropped(), 0);

    let platform_order = thread::scope(|s| {
        for writer in 0..SCALE.writers {
            s.spawn(move || {
                let target = target(writer);
                for seq in 0..SCALE.records_per_writer {
                    log::info!(target: &target, "{}", message(writer, seq));
                }
            });
        }
        s.spawn(|| {
            for _ in 0..SCALE.swaps {
                // `take`/`install` give up after a bounded wait: retry until they succeed.
                let mut console = loop {
                    if let Some(c) = LOGGER.take() {
                        break c;
                    }
                    thread::yield_now();
                };
                // Records logged while it is out go to the stash.
                loop {
                    match LOGGER.install(console) {
                        Ok(old) => {
                            assert!(old.is_none(), "a second console appeared");
                            break;
                        }
                        Err(back) => console = back,
                    }
                    thread::yield_now();
                }
                // Spread the swaps over the writers' run.
                for _ in 0..SCALE.records_per_writer {
                    thread::yield_now();
                }
            }
        });
        let platform = s.spawn(move || {
            // Program order of what this thread caused to be written.
            let mut order = Vec::new();
            for k in 0..SCALE.polls {
                // No free control buffer (the console was out for the last polls): skip.
                let _ = device.send(HOSTILE_PORT + k as u32, cm::PORT_ADD, 0, &[]);
                if let Some(events) = LOGGER.with(|c| c.poll_events().collect::<Vec<_>>()) {
                    for e in events {
                        if let ConsoleEvent::Rejected { id, .. } = e {
                            order.push(Item::Diag { port: id });
                        }
                    }
                }
                let raw = Item::Raw { seq: k };
                if LOGGER.write_bytes(format!("{}\r\n", line_of(raw)).as_bytes()) {
                    order.push(raw);
                }
            }
            order
        });
        platform.join().expect("platform thread")
    });

    let bytes = host.emergency_bytes();
    let received = String::from_utf8(bytes[setup_bytes..].to_vec()).expect("UTF-8 only");
    let mut lines: Vec<&str> = received.split("\r\n").collect();
    assert_eq!(
        lines.pop(),
        Some(""),
        "the last record arrived cut short: {received:?}"
    );
    let mut arrived = Vec::with_capacity(lines.len());
    let mut seen = BTreeSet::new();
    for line in lines {
        let item = parse(line).unwrap_or_else(|| panic!("garbled or interleaved: {line:?}"));
        assert!(seen.insert(item), "arrived twice: {line:?}");
        arrived.push(item);
    }

    // Per sequence, the arrived items are a subsequence of the order they were issued in.
    for seq in 0..SCALE.writers + 2 {
        let issued: Vec<Item> = (0..SCALE.writers)
            .flat_map(|writer| {
                (0..SCALE.records_per_writer).map(move |seq| Item::Record { writer, seq })
            })
            .chain(platform_order.iter().copied())
            .filter(|&i| sequence(i) == seq)
            .collect();
        let mut next = 0;
        for item in arrived.iter().copied().filter(|&i| sequence(i) == seq) {
            let at = issued.iter().position(|&i| i == item);
            assert!(
                at.is_some_and(|at| at >= next),
                "out of order or never issued: {item:?}"
            );
            next = at.unwrap_or(0) + 1;
        }
    }

    // Raw writes: exactly those `write_bytes` reported as written.
    let raw_written: BTreeSet<Item> = platform_order
        .iter()
        .copied()
        .filter(|i| matches!(i, Item::Raw { .. }))
        .collect();
    let raw_arrived: BTreeSet<Item> = arrived
        .iter()
        .copied()
        .filter(|i| matches!(i, Item::Raw { .. }))
        .collect();
    assert_eq!(raw_arrived, raw_written);

    // Records (the writers' and the driver's): each one arrived or was counted, with
    // nothing left waiting in the stash once every thread is done.
    let diags = platform_order
        .iter()
        .filter(|i| matches!(i, Item::Diag { .. }))
        .count();
    let logged = SCALE.writers * SCALE.records_per_writer + diags;
    let records_arrived = arrived.len() - raw_arrived.len();
    assert_eq!(
        records_arrived + LOGGER.dropped(),
        logged,
        "{records_arrived} records arrived, {} counted as dropped, {logged} logged",
        LOGGER.dropped()
    );
    assert!(sim.bad_accesses().is_empty(), "{:?}", sim.bad_accesses());
}

/// A console logger of its own over a fresh function with EMERG_WRITE, and the device side.
fn local_logger() -> (ConsoleLogger<cm::SimConsoleBus>, ConsoleModel) {
    let sim = SimBuilder::new(SimMode::Transitional, 3)
        .features(F_EMERG_WRITE | RING | V1)
        .queues(&cm::queue_sizes(0, 8))
        .device_config(&cm::config_bytes(0, 0, 0))
        .build();
    let logger = ConsoleLogger::new(LevelFilter::Info);
    let console = VirtioConsole::new(cm::bus(&sim, Preference::Legacy), ConsoleOptions::default())
        .expect("negotiate");
    assert!(matches!(logger.install(console), Ok(None)));
    let device = ConsoleModel::new(&sim);
    assert!(device.emergency_bytes().is_empty());
    (logger, device)
}

/// Logs `message` at info level under target "t".
fn log_to(logger: &ConsoleLogger<cm::SimConsoleBus>, message: fmt::Arguments<'_>) {
    logger.log(
        &Record::builder()
            .level(Level::Info)
            .target("t")
            .args(message)
            .build(),
    );
}

/// A record argument that, while being formatted (with the logger's lock or its stash's
/// held), says so and waits for the test's go-ahead.
struct Gate {
    reached: Sender<()>,
    go: Mutex<Receiver<()>>,
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = self.reached.send(());
        let _ = self.go.lock().map(|go| go.recv());
        f.write_str("gated")
    }
}

fn gate() -> (Gate, Receiver<()>, Sender<()>) {
    let (reached, reached_rx) = channel();
    let (go_tx, go) = channel();
    (
        Gate {
            reached,
            go: Mutex::new(go),
        },
        reached_rx,
        go_tx,
    )
}

/// A record stashed while the holder writes its own (after the holder's last look at the
/// stash) is written when the holder lets go, not whenever someone next logs.
#[test]
fn a_record_stashed_during_anothers_write_is_written_when_the_lock_is_released() {
    let _serial = serial();
    let (logger, device) = local_logger();
    let (held, holder_waits, release) = gate();
    thread::scope(|s| {
        s.spawn(|| log_to(&logger, format_args!("holder {}", held)));
        holder_waits.recv().expect("holder formats its record");
        // The lock is busy past the bounded wait: this record goes to the stash.
        log_to(&logger, format_args!("stashed"));
        release.send(()).expect("holder waits");
    });
    assert_eq!(
        String::from_utf8_lossy(&device.emergency_bytes()),
        "[INFO  t] holder gated\r\n[INFO  t] stashed\r\n"
    );
    assert_eq!(logger.dropped(), 0);
}

/// A context whose older record is still in the stash (its lock was busy past the bound)
/// does not write a newer one past it: the newer one queues behind it, or here, with the
/// stash still busy, is counted as dropped. The stasher writes the stash out when done.
#[test]
fn a_record_never_overtakes_an_older_stashed_one() {
    let _serial = serial();
    let (logger, device) = local_logger();
    let (platform_gate, platform_holds, platform_go) = gate();
    let (stasher_gate, stasher_holds_stash, stasher_go) = gate();
    thread::scope(|s| {
        // The platform holds the console lock until told.
        let platform = s.spawn(|| logger.with(|_| platform_gate.to_string()));
        platform_holds.recv().expect("platform holds the lock");
        // First record: the lock is busy, so it is stashed.
        log_to(&logger, format_args!("first"));
        // Another context stashes too, and holds the stash's lock while it formats.
        s.spawn(|| log_to(&logger, format_args!("other {}", stasher_gate)));
        stasher_holds_stash
            .recv()
            .expect("stasher formats into the stash");
        platform_go.send(()).expect("platform waits");
        platform.join().expect("platform thread");
        // The lock is free now, but the stash stays busy past the bound, with "first" in it.
        log_to(&logger, format_args!("second"));
        stasher_go.send(()).expect("stasher waits");
    });
    assert_eq!(
        String::from_utf8_lossy(&device.emergency_bytes()),
        "[INFO  t] first\r\n[INFO  t] other gated\r\n"
    );
    assert_eq!(logger.dropped(), 1, "second is counted");
}
