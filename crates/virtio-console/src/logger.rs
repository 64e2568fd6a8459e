//! [`ConsoleLogger`]: a `log::Log` over the console's kernel-log path, for the platform to
//! install so the stack's diagnostics reach the host.
//!
//! - No allocation: a record is formatted straight into a 128-byte stack buffer, flushed
//!   to [`VirtioConsole::emergency_write`] as it fills.
//! - Usable with interrupts off and from a panic handler: the console sits behind a spin
//!   lock taken with a bounded number of attempts, never a sleeping lock. A record that
//!   cannot get the lock (another CPU holds it, or the console driver itself logs while
//!   the platform works on it through [`ConsoleLogger::with`]) goes to a 1 KiB stash that
//!   is written out, in order, by the next holder of the lock; when the stash is full the
//!   record is counted in [`ConsoleLogger::dropped`].
//! - The path is the emergency one on purpose: `emerg_wr` (when negotiated) needs no queue
//!   state, works before DRIVER_OK and keeps log and panic output strictly ordered;
//!   without it, port 0 with a bounded polled wait.
//!
//! ```ignore
//! static LOGGER: ConsoleLogger<MyBus> = ConsoleLogger::new(log::LevelFilter::Info);
//! let _ = LOGGER.install(VirtioConsole::new(bus, ConsoleOptions::default())?);
//! log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Info));
//! // later: LOGGER.with(|c| c.start());  in the panic handler: LOGGER.write_bytes(msg)
//! ```

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use log::{LevelFilter, Log, Metadata, Record};
use virtio_core::Bus;

use crate::driver::VirtioConsole;

/// Attempts at the lock before a record goes to the stash.
const LOCK_SPINS: u32 = 1 << 16;
/// Bytes of records that could not take the lock, kept until the next holder.
const STASH_LEN: usize = 1024;
/// Formatting buffer on the stack.
const LINE_BUF: usize = 128;

/// A bounded spin lock (no poisoning, no sleeping: fine with interrupts off).
struct SpinLock {
    held: AtomicBool,
}

impl SpinLock {
    const fn new() -> Self {
        SpinLock {
            held: AtomicBool::new(false),
        }
    }
    fn try_lock(&self, spins: u32) -> bool {
        for _ in 0..spins.max(1) {
            if self
                .held
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
    fn unlock(&self) {
        self.held.store(false, Ordering::Release);
    }
}

struct Stash {
    buf: [u8; STASH_LEN],
    len: usize,
}

/// The kernel logger over a [`VirtioConsole`].
pub struct ConsoleLogger<B: Bus> {
    lock: SpinLock,
    console: UnsafeCell<Option<VirtioConsole<B>>>,
    stash_lock: SpinLock,
    stash: UnsafeCell<Stash>,
    level: AtomicUsize,
    dropped: AtomicUsize,
}

// SAFETY: `console` is only touched while `lock` is held and `stash` only while
// `stash_lock` is held (acquire/release pairs), so at most one context accesses each at a
// time; moving the console between contexts needs `B: Send`.
unsafe impl<B: Bus + Send> Sync for ConsoleLogger<B> {}

fn level_to_usize(l: LevelFilter) -> usize {
    l as usize
}

fn level_from_usize(v: usize) -> LevelFilter {
    match v {
        0 => LevelFilter::Off,
        1 => LevelFilter::Error,
        2 => LevelFilter::Warn,
        3 => LevelFilter::Info,
        4 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

impl<B: Bus> ConsoleLogger<B> {
    /// An empty logger (records are stashed until a console is installed).
    pub const fn new(level: LevelFilter) -> Self {
        ConsoleLogger {
            lock: SpinLock::new(),
            console: UnsafeCell::new(None),
            stash_lock: SpinLock::new(),
            stash: UnsafeCell::new(Stash {
                buf: [0; STASH_LEN],
                len: 0,
            }),
            level: AtomicUsize::new(level as usize),
            dropped: AtomicUsize::new(0),
        }
    }

    pub fn set_level(&self, level: LevelFilter) {
        self.level.store(level_to_usize(level), Ordering::Relaxed);
    }

    /// Records (or parts of records) lost: the stash was full, or nothing could be written.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Runs `f` on the console with the lock held (bounded attempts; `None` if the lock or
    /// a console was not available). Records stashed meanwhile are written before it
    /// returns.
    pub fn with<R>(&self, f: impl FnOnce(&mut VirtioConsole<B>) -> R) -> Option<R> {
        if !self.lock.try_lock(LOCK_SPINS) {
            return None;
        }
        // SAFETY: `lock` is held: we are the only context accessing `console`.
        let slot = unsafe { &mut *self.console.get() };
        let r = slot.as_mut().map(|c| {
            self.flush_stash(c);
            let r = f(c);
            self.flush_stash(c);
            r
        });
        self.lock.unlock();
        r
    }

    /// Installs the console (from the moment it is negotiated: with EMERG_WRITE the log
    /// reaches the host before queues exist) and writes out what was stashed before.
    /// Returns the previous one, or hands `console` back when the lock was not available.
    // The Err variant is the caller's console handed back whole (setup time, once): moving
    // it is the point, boxing it would need an allocation the platform may not have.
    #[allow(clippy::result_large_err)]
    pub fn install(
        &self,
        console: VirtioConsole<B>,
    ) -> Result<Option<VirtioConsole<B>>, VirtioConsole<B>> {
        if !self.lock.try_lock(LOCK_SPINS) {
            // Hand it back untouched rather than block.
            return Err(console);
        }
        // SAFETY: `lock` is held.
        let slot = unsafe { &mut *self.console.get() };
        let old = slot.replace(console);
        if let Some(c) = slot.as_mut() {
            self.flush_stash(c);
        }
        self.lock.unlock();
        Ok(old)
    }

    /// Takes the console back out (e.g. before unloading).
    pub fn take(&self) -> Option<VirtioConsole<B>> {
        if !self.lock.try_lock(LOCK_SPINS) {
            return None;
        }
        // SAFETY: `lock` is held.
        let old = unsafe { &mut *self.console.get() }.take();
        self.lock.unlock();
        old
    }

    /// Writes raw bytes (a panic message) through the emergency path. False when the lock
    /// could not be had or nothing was written.
    pub fn write_bytes(&self, bytes: &[u8]) -> bool {
        self.with(|c| c.emergency_write(bytes).is_ok())
            .unwrap_or(false)
    }

    /// For a panic handler that knows the lock holder will never run again (it is the
    /// panicking context itself, or a CPU that was stopped): releases the lock.
    ///
    /// # Safety
    /// No other context may be using the console, now or later, through the lock it held.
    pub unsafe fn force_unlock(&self) {
        self.lock.unlock();
    }

    fn flush_stash(&self, c: &mut VirtioConsole<B>) {
        if !self.stash_lock.try_lock(LOCK_SPINS) {
            return;
        }
        // SAFETY: `stash_lock` is held.
        let stash = unsafe { &mut *self.stash.get() };
        if stash.len > 0 {
            let bytes = stash.buf.get(..stash.len).unwrap_or(&[]);
            if c.emergency_write(bytes).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            stash.len = 0;
        }
        self.stash_lock.unlock();
    }

    fn stash_record(&self, record: &Record<'_>) {
        if !self.stash_lock.try_lock(LOCK_SPINS) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // SAFETY: `stash_lock` is held.
        let stash = unsafe { &mut *self.stash.get() };
        let start = stash.len;
        let mut w = StashWriter { stash, full: false };
        let _ = write_record(&mut w, record);
        if w.full {
            // Keep whole records only.
            w.stash.len = start;
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.stash_lock.unlock();
    }
}

fn write_record(w: &mut impl fmt::Write, record: &Record<'_>) -> fmt::Result {
    write!(
        w,
        "[{:<5} {}] {}\r\n",
        record.level(),
        record.target(),
        record.args()
    )
}

struct StashWriter<'a> {
    stash: &'a mut Stash,
    full: bool,
}

impl fmt::Write for StashWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let at = self.stash.len;
        match self.stash.buf.get_mut(at..at + s.len()) {
            Some(dst) => {
                dst.copy_from_slice(s.as_bytes());
                self.stash.len += s.len();
                Ok(())
            }
            None => {
                self.full = true;
                Err(fmt::Error)
            }
        }
    }
}

/// Formats into a stack buffer and writes it to the console as it fills.
struct LineWriter<'a, B: Bus> {
    console: &'a mut VirtioConsole<B>,
    buf: [u8; LINE_BUF],
    len: usize,
    failed: bool,
}

impl<B: Bus> LineWriter<'_, B> {
    fn flush(&mut self) {
        if self.len > 0 {
            let bytes = self.buf.get(..self.len).unwrap_or(&[]);
            if self.console.emergency_write(bytes).is_err() {
                self.failed = true;
            }
            self.len = 0;
        }
    }
}

impl<B: Bus> fmt::Write for LineWriter<'_, B> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(LINE_BUF) {
            if self.len + chunk.len() > LINE_BUF {
                self.flush();
            }
            if let Some(dst) = self.buf.get_mut(self.len..self.len + chunk.len()) {
                dst.copy_from_slice(chunk);
                self.len += chunk.len();
            }
        }
        Ok(())
    }
}

impl<B: Bus + Send> Log for ConsoleLogger<B> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= level_from_usize(self.level.load(Ordering::Relaxed))
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if !self.lock.try_lock(LOCK_SPINS) {
            self.stash_record(record);
            return;
        }
        // SAFETY: `lock` is held.
        let slot = unsafe { &mut *self.console.get() };
        match slot.as_mut() {
            Some(c) => {
                self.flush_stash(c);
                let mut w = LineWriter {
                    console: c,
                    buf: [0; LINE_BUF],
                    len: 0,
                    failed: false,
                };
                let _ = write_record(&mut w, record);
                w.flush();
                if w.failed {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.lock.unlock();
            }
            None => {
                self.lock.unlock();
                self.stash_record(record);
            }
        }
    }

    fn flush(&self) {
        self.with(|_| ());
    }
}
