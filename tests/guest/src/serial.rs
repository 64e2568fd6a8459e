//! COM1 (16550 at 0x3F8): the guest's only output channel, and the `log` backend.

use crate::arch::{inb, outb, without_interrupts};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3F8;

/// Serialises whole lines. Taken with interrupts disabled so an interrupt handler that
/// prints cannot deadlock against the code it interrupted.
static LOCK: spin::Mutex<()> = spin::Mutex::new(());
/// Set once a panic or exception is being reported: from then on output bypasses the
/// lock (the lock holder may be the code that faulted).
static EMERGENCY: AtomicBool = AtomicBool::new(false);

pub fn init() {
    outb(COM1 + 1, 0x00); // no UART interrupts: we poll
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xC7); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR | RTS
}

fn put(b: u8) {
    // Bounded: a missing UART (reads 0xFF) or a wedged one must not hang the guest.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Raw writer; use through `print!`/`println!`, which hold the lock per call.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

pub fn write_fmt(args: fmt::Arguments<'_>) {
    if EMERGENCY.load(Ordering::Relaxed) {
        let _ = Serial.write_fmt(args);
        return;
    }
    without_interrupts(|| {
        let _guard = LOCK.lock();
        let _ = Serial.write_fmt(args);
    });
}

/// Switches to lock-free output for panic/exception reports.
pub fn enter_emergency() {
    EMERGENCY.store(true, Ordering::Relaxed);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

struct SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // One call per line so concurrent (interrupt) output never splits a record.
        crate::println!(
            "[{:5} {}] {}",
            record.level(),
            record.target(),
            record.args()
        );
        // Copy the tee out so it is not called with TEE held (it may log itself).
        let tee = TEE.try_lock().and_then(|t| *t);
        if let Some(tee) = tee {
            tee.log(record);
        }
    }

    fn flush(&self) {}
}

static LOGGER: SerialLogger = SerialLogger;

/// A second sink for every record after COM1 (a scenario's own logger, e.g. the virtio
/// console's `ConsoleLogger`); `None` detaches it.
static TEE: spin::Mutex<Option<&'static dyn log::Log>> = spin::Mutex::new(None);

/// Attaches (or with `None` detaches) a second `log` sink that gets every record after COM1.
#[allow(dead_code)] // API for the device scenarios
pub fn set_log_tee(tee: Option<&'static dyn log::Log>) {
    without_interrupts(|| *TEE.lock() = tee);
}

/// Routes the `log` facade (used by the virtio crates) to COM1.
pub fn init_logger(level: log::LevelFilter) {
    // Only fails if called twice; the first logger then stays, which is fine.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
