//! Machine-readable result lines, parsed by the host runner (tests/src/qemu.rs):
//!
//! ```text
//! CHECK <name> PASS|FAIL <detail...>
//! STAT <key>=<value>
//! DEVICE <key>=<value> ...
//! DONE checks=<n> failed=<m>
//! ```
//! Names and keys contain no spaces. Anything else on the serial line is free-form log.

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

static CHECKS: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Records one check; returns `pass` so callers can chain.
pub fn check(name: &str, pass: bool, detail: fmt::Arguments<'_>) -> bool {
    debug_assert!(!name.contains(' '), "check names contain no spaces");
    CHECKS.fetch_add(1, Ordering::Relaxed);
    if !pass {
        FAILED.fetch_add(1, Ordering::Relaxed);
    }
    crate::println!(
        "CHECK {} {} {}",
        name,
        if pass { "PASS" } else { "FAIL" },
        detail
    );
    pass
}

/// `check!(name, cond, "detail {}", x)`.
#[macro_export]
macro_rules! check {
    ($name:expr, $pass:expr) => { $crate::report::check($name, $pass, format_args!("")) };
    ($name:expr, $pass:expr, $($arg:tt)*) => { $crate::report::check($name, $pass, format_args!($($arg)*)) };
}

/// One statistic (`STAT key=value`).
pub fn stat(key: &str, value: impl fmt::Display) {
    crate::println!("STAT {}={}", key, value);
}

pub fn failed() -> u32 {
    FAILED.load(Ordering::Relaxed)
}

/// Prints the closing line and exits: success only if at least one check ran and none
/// failed.
pub fn done() -> ! {
    let (n, f) = (CHECKS.load(Ordering::Relaxed), failed());
    crate::println!("DONE checks={} failed={}", n, f);
    let code = if n > 0 && f == 0 {
        crate::exit::ExitCode::Success
    } else {
        crate::exit::ExitCode::Failure
    };
    crate::exit::exit(code)
}
