//! [`ConsoleLogger`]: a `log::Log` over the console's kernel-log path, for the platform to
//! install so the stack's diagnostics reach the host.
//!
//! - No allocation: a record is formatted straight into a 128-byte stack buffer, flushed
//!   to [`VirtioConsole::emergency_write`] as it fills.
//! - Usable with interrupts off and from a panic handler: the console sits behind a spin
//!   lock taken with a bounded number of attempts, never a sleeping lock. A record that
//!   cannot get the lock (another CPU holds it, or the console driver itself logs while
//!   the platform works on it through [`ConsoleLogger::with`]) goes to a 1 KiB stash. The
//!   stash is written out, in order, before the next record that takes the lock, and when
//!   the holder lets go of it (so a record stashed while another CPU was writing does not
//!   wait for the next log call, unless the stash stayed busy through every bounded
//!   hand-off round). A context's records reach the host in the order it
//!   logged them: one that finds older records still stashed queues behind them. A record
//!   that cannot be kept (stash full or busy) or written whole is counted in
//!   [`ConsoleLogger::dropped`].
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

/// Attempts at the lock before a record goes to the stash. Fewer under Miri, which
/// interprets each one: the bound decides which path a record takes, not which paths exist.
const LOCK_SPINS: u32 = if cfg!(miri) { 1 << 8 } else { 1 << 16 };
/// Bytes of records that could not take the lock, kept until the next holder.
const STASH_LEN: usize = 1024;
/// Formatting buffer on the stack.
const LINE_BUF: usize = 128;
/// Times a holder takes the lock back after releasing it to write records stashed
/// meanwhile: each round needs a record newly stashed during the previous one, so this only
/// bounds a holder's extra work under a storm, where others take the lock soon anyway.
const HANDOFF_ROUNDS: u32 = 4;

/// A bounded spin lock (no poisoning, no sleeping: fine with interrupts off).
///
/// Sequentially consistent, not just acquire/release: the hand-off between a holder that
/// releases it and then reads `ConsoleLogger::stash_pending`, and a stasher that sets that
/// flag and then tries the lock, needs one of the two to see the other's write (a
/// store-then-load pattern that acquire/release does not order).
struct SpinLock {
    held: AtomicBool,
}

impl SpinLock {
    const fn new() -> Self {
        SpinLock {
            held: AtomicBool::new(false),
        }
    }
    /// Strong compare-exchange: a single attempt (`spins == 1`) must not fail spuriously
    /// on a free lock, or a hand-off could leave the stash unwritten.
    fn try_lock(&self, spins: u32) -> bool {
        for _ in 0..spins.max(1) {
            if self
                .held
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
    fn unlock(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

struct Stash {
    buf: [u8; STASH_LEN],
    len: usize,
    /// Records in `buf`, all counted as dropped if writing them fails.
    records: usize,
}

/// The kernel logger over a [`VirtioConsole`].
pub struct ConsoleLogger<B: Bus> {
    lock: SpinLock,
    console: UnsafeCell<Option<VirtioConsole<B>>>,
    stash_lock: SpinLock,
    stash: UnsafeCell<Stash>,
    /// Set once a stashed record is in `stash`, cleared when the stash is written out: a
    /// holder that sees it after releasing `lock` takes the lock back to write the stash.
    stash_pending: AtomicBool,
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
                records: 0,
            }),
            stash_pending: AtomicBool::new(false),
            level: AtomicUsize::new(level as usize),
            dropped: AtomicUsize::new(0),
        }
    }

    pub fn set_level(&self, level: LevelFilter) {
        self.level.store(level_to_usize(level), Ordering::Relaxed);
    }

    /// Records lost or cut short: the stash was full or stayed busy, or the console did not
    /// take a record whole. A stash that could not be written whole counts every record it
    /// held, those before the cut included.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Runs `f` on the console with the lock held (bounded attempts; `None` if the lock or
    /// a console was not available). The stash is written out before `f`, and records
    /// stashed meanwhile (the driver's own, logged from `f`) before `with` returns, unless
    /// another context takes the lock first and writes them. If the stash stays busy past
    /// its bound, `f` runs all the same: what it writes may then precede stashed records.
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
        self.release_lock();
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
        self.release_lock();
        Ok(old)
    }

    /// Takes the console back out (e.g. before unloading).
    pub fn take(&self) -> Option<VirtioConsole<B>> {
        if !self.lock.try_lock(LOCK_SPINS) {
            return None;
        }
        // SAFETY: `lock` is held.
        let old = unsafe { &mut *self.console.get() }.take();
        self.release_lock();
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

    /// Releases `lock`. A record stashed after the holder's last flush would otherwise wait
    /// for whoever takes the lock next, maybe never: so the holder looks at `stash_pending`
    /// once it has let go, and takes the lock back to write the stash unless another
    /// context has it (which then does the same when it lets go). A stasher sets the flag
    /// before trying the lock itself, so of the two, one sees the other.
    ///
    /// Every round ends the same way (let go, then look at the flag), so a stasher that
    /// failed its one attempt while this context held the lock is always seen. After
    /// [`HANDOFF_ROUNDS`] rounds in which the stash stayed busy or refilled, the holder
    /// stops: what is stashed then waits for the next context that logs or calls `with`.
    fn release_lock(&self) {
        for _ in 0..HANDOFF_ROUNDS {
            self.lock.unlock();
            if !self.stash_pending.load(Ordering::SeqCst) || !self.lock.try_lock(1) {
                return;
            }
            // SAFETY: `lock` is held.
            match unsafe { &mut *self.console.get() } {
                // Written out, or the stash lock stayed busy: either way the next round
                // lets go and looks at the flag again.
                Some(c) => {
                    self.flush_stash(c);
                }
                None => {
                    // No console: `install` writes the stash out.
                    self.lock.unlock();
                    return;
                }
            }
        }
        self.lock.unlock();
    }

    /// Writes the stash out (with `lock` held). False when the stash lock stayed busy, so
    /// older records may still wait there.
    fn flush_stash(&self, c: &mut VirtioConsole<B>) -> bool {
        if !self.stash_lock.try_lock(LOCK_SPINS) {
            return false;
        }
        // SAFETY: `stash_lock` is held.
        let stash = unsafe { &mut *self.stash.get() };
        if stash.len > 0 {
            let bytes = stash.buf.get(..stash.len).unwrap_or(&[]);
            if !wrote_all(c.emergency_write(bytes), bytes.len()) {
                self.dropped.fetch_add(stash.records, Ordering::Relaxed);
            }
            stash.len = 0;
            stash.records = 0;
        }
        self.stash_pending.store(false, Ordering::SeqCst);
        self.stash_lock.unlock();
        true
    }

    fn stash_record(&self, record: &Record<'_>, spins: u32) {
        if !self.stash_lock.try_lock(spins) {
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
        } else {
            w.stash.records += 1;
        }
        self.stash_lock.unlock();
        // Set after the stash lock is released, so that a holder that sees the flag can
        // take it (see `release_lock`); then the other half of the hand-off, as the holder
        // may have let go before the flag was set.
        self.stash_pending.store(true, Ordering::SeqCst);
        if self.lock.try_lock(1) {
            // SAFETY: `lock` is held.
            if let Some(c) = unsafe { &mut *self.console.get() } {
                self.flush_stash(c);
            }
            self.release_lock();
        }
    }
}

/// Whether a write of `len` bytes took them all (a short write cuts a record).
fn wrote_all(written: crate::driver::Result<usize>, len: usize) -> bool {
    matches!(written, Ok(n) if n == len)
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
            if !wrote_all(self.console.emergency_write(bytes), bytes.len()) {
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
            self.stash_record(record, LOCK_SPINS);
            return;
        }
        // SAFETY: `lock` is held.
        let slot = unsafe { &mut *self.console.get() };
        let Some(c) = slot.as_mut() else {
            self.release_lock();
            self.stash_record(record, LOCK_SPINS);
            return;
        };
        if self.flush_stash(c) {
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
        } else {
            // Older records, maybe this context's own, are still stashed: queue behind
            // them rather than overtake them (`release_lock` writes them all out). One
            // attempt at the stash lock: `flush_stash` just spent the whole bound on it,
            // with `lock` held.
            self.stash_record(record, 1);
        }
        self.release_lock();
    }

    fn flush(&self) {
        self.with(|_| ());
    }
}
