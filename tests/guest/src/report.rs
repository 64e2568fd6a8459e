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

/// Words for values that `CHECK` details show, so a person reads no Rust `Debug` dumps.
pub mod show {
    use core::fmt;
    use virtio_core::platform::InterruptMode;
    use virtio_core::types::FeatureBit;
    use virtio_core::{DeviceType, Features};

    /// An interrupt mode: `MSI-X (3 vectors)`, `INTx`, `polling`.
    pub struct Irq(pub InterruptMode);

    impl fmt::Display for Irq {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                InterruptMode::MsiX { vectors } => write!(f, "MSI-X ({vectors} vectors)"),
                InterruptMode::Intx => f.write_str("INTx"),
                InterruptMode::Polling => f.write_str("polling"),
            }
        }
    }

    /// A feature set by name with the hex beside: `0x130000000 (INDIRECT_DESC EVENT_IDX
    /// VERSION_1)`. Device bits are named by the device crate's feature table, the rest by
    /// [`Features::generic_name`]; unnamed ones as `bit N`.
    pub struct FeatureSet(pub DeviceType, pub u64);

    /// The name of device-specific feature `bit` of `device`, from its crate's table.
    fn device_bit_name(device: DeviceType, bit: u32) -> Option<&'static str> {
        match device {
            DeviceType::Net => virtio_net::features::FEATURE_TABLE
                .iter()
                .find(|f| f.bit == 1 << bit)
                .map(|f| f.name),
            DeviceType::Block => FeatureBit::name_in(&virtio_blk::features::FEATURE_TABLE, bit),
            DeviceType::Console => {
                FeatureBit::name_in(&virtio_console::features::FEATURE_TABLE, bit)
            }
            DeviceType::Balloon => {
                FeatureBit::name_in(&virtio_balloon::features::FEATURE_TABLE, bit)
            }
            DeviceType::Entropy => FeatureBit::name_in(&virtio_rng::features::FEATURE_TABLE, bit),
            _ => None,
        }
    }

    impl fmt::Display for FeatureSet {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let FeatureSet(device, bits) = *self;
            write!(f, "{bits:#x} (")?;
            for (i, bit) in (0..64).filter(|b| bits & (1 << b) != 0).enumerate() {
                if i > 0 {
                    f.write_str(" ")?;
                }
                match device_bit_name(device, bit).or_else(|| Features::generic_name(bit)) {
                    Some(name) => f.write_str(name)?,
                    None => write!(f, "bit {bit}")?,
                }
            }
            f.write_str(")")
        }
    }

    /// A device status by bit names: `ACKNOWLEDGE DRIVER FEATURES_OK` (`0` when none).
    pub struct Status(pub virtio_core::DeviceStatus);

    impl fmt::Display for Status {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.0.is_empty() {
                return f.write_str("0");
            }
            for (i, (name, _)) in self.0.iter_names().enumerate() {
                if i > 0 {
                    f.write_str(" ")?;
                }
                f.write_str(name)?;
            }
            Ok(())
        }
    }

    /// A result with a value: the value, or `error: <the error>`.
    pub struct Got<'a, T, E>(pub &'a Result<T, E>);

    impl<T: fmt::Display, E: fmt::Display> fmt::Display for Got<'_, T, E> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Ok(v) => v.fmt(f),
                Err(e) => write!(f, "error: {e}"),
            }
        }
    }

    /// `yes` or `no`.
    pub fn yes_no(b: bool) -> &'static str {
        if b { "yes" } else { "no" }
    }

    /// A block device's discard / write-zeroes limits.
    pub struct Limits(pub virtio_blk::RangeLimits);

    impl fmt::Display for Limits {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let l = self.0;
            write!(f, "up to {} sectors a range, ", l.max_sectors)?;
            if l.max_segments == u32::MAX {
                f.write_str("any number of ranges a request")?;
            } else {
                write!(f, "at most {} range(s) a request", l.max_segments)?;
            }
            if l.alignment > 1 {
                write!(f, ", aligned to {} sectors", l.alignment)?;
            }
            Ok(())
        }
    }

    /// An optional value: the value, or `none`.
    pub struct Opt<T>(pub Option<T>);

    impl<T: fmt::Display> fmt::Display for Opt<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match &self.0 {
                Some(v) => v.fmt(f),
                None => f.write_str("none"),
            }
        }
    }

    /// The outcome of an operation without a value: `ok`, or `error: <the error>`.
    pub struct Outcome<'a, E>(pub &'a Result<(), E>);

    impl<E: fmt::Display> fmt::Display for Outcome<'_, E> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Ok(()) => f.write_str("ok"),
                Err(e) => write!(f, "error: {e}"),
            }
        }
    }
}
