//! Ending the run through QEMU's `isa-debug-exit` device (iobase 0xf4, iosize 4): a write
//! of v makes QEMU exit with status (v << 1) | 1. The host runner maps these statuses back
//! (tests/src/qemu.rs `GuestExit`); keep the two in sync.

use crate::arch::{halt_forever, outl};

const DEBUG_EXIT_PORT: u16 = 0xf4;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// All checks passed (QEMU status 33).
    Success = 0x10,
    /// The scenario ran to DONE but a check failed (status 35).
    Failure = 0x11,
    /// Rust panic (status 37).
    Panic = 0x12,
    /// Unexpected CPU exception (status 39).
    Exception = 0x13,
    /// Bad command line / unknown scenario (status 41).
    Usage = 0x14,
}

pub fn exit(code: ExitCode) -> ! {
    outl(DEBUG_EXIT_PORT, code as u32);
    // Only reached without the isa-debug-exit device; the runner's timeout catches it.
    crate::println!(
        "EXIT-FAILED: no isa-debug-exit device (code {:#x})",
        code as u32
    );
    halt_forever()
}
