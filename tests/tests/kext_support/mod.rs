//! The kext tests' harness: the VirtioFamily shim played over the PCI simulation lives in
//! `virtio_tests::kext_shim` (the `kext` fuzz target uses it too); this adds
//! [`kext_tests!`], which runs each test body against the rlibs and the loaded bundles.
#![allow(dead_code)]

pub use virtio_tests::kext_shim::*;
// Not every test file defines a table of its own.
#[allow(unused_imports)]
pub(crate) use virtio_tests::c_abi;

/// Each test body, a function of the kexts' tables, becomes two tests: `rlib::<name>` with
/// `$kexts::rlib()` and `loaded::<name>` with `$kexts::loaded()` (`None`: the bundles are
/// not built, and the variant is skipped). A loaded test must leave no kernel allocation
/// behind.
macro_rules! kext_tests {
    ($kexts:ty: $($test:ident),* $(,)?) => {
        mod rlib {
            use super::*;
            $(
                #[test]
                fn $test() {
                    super::$test(<$kexts>::rlib());
                }
            )*
        }
        mod loaded {
            use super::*;
            $(
                #[test]
                fn $test() {
                    let _watchdog =
                        $crate::kext_support::Watchdog::arm(concat!("loaded::", stringify!($test)));
                    if let Some(kexts) = <$kexts>::loaded() {
                        super::$test(kexts);
                        $crate::kext_support::kernel::assert_no_leaks();
                    }
                }
            )*
        }
    };
}
pub(crate) use kext_tests;
