//! Scenarios that fail on purpose, so the runner's handling of each way a guest can end
//! is itself tested (`tests/tests/qemu_harness.rs`).

use super::Env;

/// `panic`: a Rust panic → panic handler → `ExitCode::Panic`.
pub fn panic(_env: &mut Env) {
    crate::check!("selftest.before_panic", true, "about to panic");
    panic!("deliberate panic from the panic scenario");
}

/// `fault`: a page fault → exception handler → `ExitCode::Exception`. 600 GiB lies beyond
/// the single PML4 entry the guest maps, so the access is not present.
pub fn fault(_env: &mut Env) {
    crate::check!("selftest.before_fault", true, "about to fault");
    let addr = 600u64 << 30;
    // SAFETY: deliberately faulting; the exception handler ends the run, so execution
    // never continues past this read.
    let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
    crate::println!("unreachable: read {v:#x}");
}

/// `hang`: never reaches DONE (the runner's timeout must end it). Halts with the timer
/// tick running, like a guest waiting for an interrupt that never comes.
pub fn hang(_env: &mut Env) {
    crate::check!("selftest.before_hang", true, "about to hang");
    loop {
        crate::time::wait_until(u64::MAX / 2_000_000, || false);
    }
}
