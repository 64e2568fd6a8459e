//! The kernel runtime of a kext's Rust static library (feature `kext`): memory from
//! `IOMallocAligned`, `log` records to `IOLog`, panics to the kernel's `panic`.
//!
//! The kernel symbols used here are public KPI (`com.apple.kpi.iokit`, `com.apple.kpi.mach`)
//! and resolved when the kext loads.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_char, c_void};
use core::fmt::{self, Write};

unsafe extern "C" {
    fn IOMallocAligned(size: usize, alignment: usize) -> *mut c_void;
    fn IOFreeAligned(address: *mut c_void, size: usize);
    fn IOLog(format: *const c_char, ...);
    fn panic(format: *const c_char, ...) -> !;
}

/// `#[global_allocator]` over kernel memory. Used at setup time only: the drivers never
/// allocate on their I/O paths.
pub struct KernelAllocator;

// SAFETY: IOMallocAligned returns memory aligned to `alignment` (a power of two, which
// `Layout` guarantees) or null; IOFreeAligned takes it back with the same size.
unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain kernel allocation; a zero size is rounded up to one byte.
        unsafe { IOMallocAligned(layout.size().max(1), layout.align().max(8)).cast() }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc contract).
        unsafe { IOFreeAligned(ptr.cast(), layout.size().max(1)) }
    }
}

#[global_allocator]
static ALLOCATOR: KernelAllocator = KernelAllocator;

/// A fixed line buffer: log records are formatted without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            // Leave room for "\n\0"; drop what does not fit; NULs would cut the line.
            if self.len + 2 >= self.buf.len() {
                break;
            }
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = if b == 0 { b'?' } else { b };
                self.len += 1;
            }
        }
        Ok(())
    }
}

impl Line {
    fn c_str(&mut self) -> *const c_char {
        let end = self.len.min(self.buf.len() - 2);
        if let Some(tail) = self.buf.get_mut(end..end + 2) {
            tail.copy_from_slice(b"\n\0");
        }
        self.buf.as_ptr().cast()
    }
}

/// `log` → `IOLog("%s", line)`, with the kext's name in front.
///
/// Records made while interrupts are off on this CPU ([`interrupts_enabled`]) are dropped:
/// IOLib.h says IOLog "should not be called from interrupt context", and inside the kernel
/// debugger (KDP's polled entries, the other CPUs halted wherever they were) IOLog's
/// console path can spin on a console-ring lock a halted CPU holds (xnu's `console_write`
/// takes it unless the console is suspended, as for a panic). The queues live in the
/// family kext, so its logger too must be safe there.
pub struct IoLogger {
    pub name: &'static str,
    pub level: log::LevelFilter,
}

impl log::Log for IoLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level && interrupts_enabled()
    }
    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = Line {
            buf: [0; 256],
            len: 0,
        };
        let _ = write!(line, "{}: {}: {}", self.name, record.level(), record.args());
        // SAFETY: a constant format and a NUL-terminated buffer that lives across the call.
        unsafe { IOLog(c"%s".as_ptr(), line.c_str()) };
    }
    fn flush(&self) {}
}

/// Installs `logger` as the `log` backend (once per kext; later calls keep the first).
pub fn init_logging(logger: &'static IoLogger) {
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}

/// Whether this CPU takes interrupts now (RFLAGS.IF). The kernel debugger runs with them
/// off, KDP's polled `sendPacket` / `receivePacket` included, as does primary interrupt
/// context; work loops, command gates and thread calls run with them on. `true` on other
/// architectures (the kexts are x86_64).
pub fn interrupts_enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let flags: u64;
        // SAFETY: reads RFLAGS through a balanced push/pop on the stack (no `nostack`, so
        // the compiler leaves room for it); changes no flag, touches no Rust memory, and
        // `pushfq` is allowed at every privilege level (the loaded-bundle tests run it in
        // user mode, where IF reads 1).
        unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(preserves_flags)) };
        flags & (1 << 9) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

#[panic_handler]
fn on_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let _ = write!(line, "virtio kext (Rust): {}", info.message());
    // SAFETY: a constant format and a NUL-terminated buffer; `panic` does not return.
    unsafe { panic(c"%s".as_ptr(), line.c_str()) }
}

unsafe extern "C" {
    fn memset(s: *mut c_void, c: i32, n: usize) -> *mut c_void;
}

/// LLVM lowers zeroing on Darwin targets to `__bzero`, which the kernel's KPIs do not
/// promise; define it over `memset` (compiler-builtins' with `compiler-builtins-mem`).
///
/// The call goes through a pointer the optimiser cannot see through: a direct
/// `memset(s, 0, n)` is itself lowered to `__bzero` on Darwin, which made this function
/// jump to itself forever (found by running the linked bundle, `tests/tests/kext_*.rs`).
///
/// # Safety
/// `s` is valid for `n` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __bzero(s: *mut c_void, n: usize) {
    let memset_fn: unsafe extern "C" fn(*mut c_void, i32, usize) -> *mut c_void =
        core::hint::black_box(memset);
    // SAFETY: caller contract.
    unsafe { memset_fn(s, 0, n) };
}
