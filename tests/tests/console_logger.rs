//! `ConsoleLogger` as the process-wide `log` sink over virtio-console and the simulated
//! function: records reach the host through `emerg_wr` from before DRIVER_OK on, the
//! driver's own diagnostics logged while the platform holds the console come out in order,
//! and without EMERG_WRITE the logger falls back to polled writes on port 0, where a record
//! that cannot be written whole counts as dropped. `console_logger_threads` has the
//! concurrent tests.

use log::{Level, LevelFilter, Log, Record};
use virtio_console::{ConsoleEvent, ConsoleLogger, ConsoleOptions, VirtioConsole};
use virtio_pci::Preference;
use virtio_tests::console_model::{
    self as cm, ConsoleModel, F_EMERG_WRITE, F_MULTIPORT, SimConsoleBus,
};
use virtio_tests::sim::{SimBuilder, SimMode};

const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);
const V1: u64 = 1 << 32;

/// The platform's logger, a plain `static` (const constructor, no allocation).
static LOGGER: ConsoleLogger<SimConsoleBus> = ConsoleLogger::new(LevelFilter::Info);

/// The two tests run one at a time: `LOGGER` is the process-wide `log` sink, so the other
/// test's driver diagnostics would take its lock concurrently, and `with` (a bounded
/// try-lock, by design) could then find it busy.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn global_logger_over_emergency_write() {
    let _serial = serial();
    let sim = SimBuilder::new(SimMode::Transitional, 3)
        .features(F_MULTIPORT | F_EMERG_WRITE | RING | V1)
        .queues(&cm::queue_sizes(4, 64))
        .device_config(&cm::config_bytes(0, 0, 4))
        .memory_len(8 << 20)
        .build();
    let mut m = ConsoleModel::new(&sim).port(0, None, true, true);
    log::set_logger(&LOGGER).expect("first logger");
    log::set_max_level(LevelFilter::Info);

    // Before any console: records wait in the stash (the driver's own setup line too).
    log::warn!("before the console");
    let c = VirtioConsole::new(cm::bus(&sim, Preference::Legacy), ConsoleOptions::default())
        .expect("negotiate");
    assert!(matches!(LOGGER.install(c), Ok(None)));
    // Installed at FEATURES_OK: the stash was written out through emerg_wr.
    let out = text(&m.emergency_bytes());
    assert!(
        out.starts_with("[WARN  console_logger] before the console\r\n"),
        "{out:?}"
    );
    assert!(
        out.contains("[INFO  virtio_console::driver] virtio-console: features"),
        "{out:?}"
    );
    assert_eq!(sim.status() & 4, 0, "no DRIVER_OK yet");

    log::info!("booting {}", 42);
    log::debug!("filtered out");
    let out = text(&m.emergency_bytes());
    assert!(
        out.ends_with("[INFO  console_logger] booting 42\r\n"),
        "{out:?}"
    );
    assert!(!out.contains("filtered out"));

    // A record longer than the formatting buffer arrives whole.
    let long = "x".repeat(1000);
    log::error!("{long}");
    assert!(text(&m.emergency_bytes()).ends_with(&format!("[ERROR console_logger] {long}\r\n")));

    // The platform brings the driver up through the logger's lock.
    LOGGER.with(|c| c.start()).expect("lock").expect("start");
    assert_ne!(sim.status() & 4, 0);
    m.process().unwrap();
    // The driver's warning about a hostile message is logged while `with` holds the lock:
    // it is stashed and written when `with` ends, after what was logged before.
    m.send(77, cm::PORT_ADD, 0, &[]).unwrap();
    let ev = LOGGER
        .with(|c| c.poll_events().collect::<Vec<_>>())
        .expect("lock");
    assert!(ev.contains(&ConsoleEvent::PortAdded { id: 0, name: None }));
    assert!(
        ev.iter()
            .any(|e| matches!(e, ConsoleEvent::Rejected { id: 77, .. }))
    );
    let out = text(&m.emergency_bytes());
    assert!(
        out.ends_with("[WARN  virtio_console::driver] virtio-console: rejected control message: port id 77 beyond max_nr_ports\r\n"),
        "{out:?}"
    );
    assert_eq!(LOGGER.dropped(), 0);

    // A panic handler's raw write.
    assert!(LOGGER.write_bytes(b"PANIC: oops\r\n"));
    assert!(text(&m.emergency_bytes()).ends_with("PANIC: oops\r\n"));
    assert!(sim.bad_accesses().is_empty(), "{:?}", sim.bad_accesses());
    // Nothing went through port 0's queue: the log path is emerg_wr only.
    assert!(m.take_tx(0).is_empty());
}

#[test]
fn logger_without_emergency_write_uses_port0() {
    let _serial = serial();
    let sim = SimBuilder::new(SimMode::Modern, 3)
        .features(RING | V1)
        .queues(&cm::queue_sizes(0, 64))
        .device_config(&cm::config_bytes(0, 0, 0))
        .build();
    let mut m = ConsoleModel::new(&sim);
    // A second, local logger (not the global one), driven through the `Log` trait.
    let logger: ConsoleLogger<SimConsoleBus> = ConsoleLogger::new(LevelFilter::Trace);
    let c = VirtioConsole::new(cm::bus(&sim, Preference::Auto), ConsoleOptions::default())
        .expect("negotiate");
    assert!(matches!(logger.install(c), Ok(None)));
    let rec = |msg: &str| {
        logger.log(
            &Record::builder()
                .level(Level::Info)
                .target("kern")
                .args(format_args!("{msg}"))
                .build(),
        )
    };
    // Not started and no EMERG_WRITE: nothing can be written; the record is counted.
    rec("lost");
    assert_eq!(logger.dropped(), 1);
    logger.with(|c| c.start()).unwrap().unwrap();
    rec("hello");
    assert_eq!(text(&m.take_tx(0)), "[INFO  kern] hello\r\n");
    assert!(m.emergency_bytes().is_empty());
    // Taking the console back out resets nothing until it is dropped.
    let c = logger.take().expect("console");
    assert!(c.is_started());
    drop(c);
    assert_eq!(sim.status(), 0, "dropping the driver resets the device");
}

/// Records stashed before any console, then a console that cannot write them (no
/// EMERG_WRITE, not started): each one is counted, not the failed write.
#[test]
fn stashed_records_that_cannot_be_written_are_each_counted() {
    let _serial = serial();
    let sim = SimBuilder::new(SimMode::Modern, 3)
        .features(RING | V1)
        .queues(&cm::queue_sizes(0, 64))
        .device_config(&cm::config_bytes(0, 0, 0))
        .build();
    let logger: ConsoleLogger<SimConsoleBus> = ConsoleLogger::new(LevelFilter::Info);
    for n in 0..3 {
        logger.log(
            &Record::builder()
                .level(Level::Info)
                .target("kern")
                .args(format_args!("early {n}"))
                .build(),
        );
    }
    assert_eq!(logger.dropped(), 0, "kept in the stash");
    let c = VirtioConsole::new(cm::bus(&sim, Preference::Auto), ConsoleOptions::default())
        .expect("negotiate");
    assert!(matches!(logger.install(c), Ok(None)));
    assert_eq!(logger.dropped(), 3);
}

/// Without EMERG_WRITE, a record the transmit queue takes only in part (the host stopped
/// reading) arrives cut short: counted like one not written at all.
#[test]
fn record_cut_short_on_port0_is_counted_as_dropped() {
    let _serial = serial();
    let sim = SimBuilder::new(SimMode::Modern, 3)
        .features(RING | V1)
        .queues(&cm::queue_sizes(0, 64))
        .device_config(&cm::config_bytes(0, 0, 0))
        .build();
    let mut m = ConsoleModel::new(&sim);
    let logger: ConsoleLogger<SimConsoleBus> = ConsoleLogger::new(LevelFilter::Info);
    // Two 16-byte transmit slots, and a host that stops reading: a longer record is
    // taken only in part, after a short polled wait.
    let opts = ConsoleOptions {
        tx_buffers: 2,
        tx_buffer_size: 16,
        poll_spins: 8,
        ..ConsoleOptions::default()
    };
    let c = VirtioConsole::new(cm::bus(&sim, Preference::Auto), opts).expect("negotiate");
    assert!(matches!(logger.install(c), Ok(None)));
    logger.with(|c| c.start()).unwrap().unwrap();
    logger.log(
        &Record::builder()
            .level(Level::Info)
            .target("kern")
            .args(format_args!("more than two slots of text"))
            .build(),
    );
    let sent: Vec<u8> = m.hold_tx(0).into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(text(&sent), "[INFO  kern] more than two slots");
    assert_eq!(logger.dropped(), 1, "the record arrived cut short");
}
