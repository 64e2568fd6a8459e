//! Test support shared by this crate's unit tests and its integration tests: compiling the
//! C and C++ fixtures in `tests/fixtures/` into Mach-O objects with Debian's clang, the
//! way a kext's sources are compiled. Not part of the linker.

use std::path::PathBuf;

use crate::link::{Input, Linked, Options, link};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where the fixtures live.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Kernel C: what `-mkernel` implies (no red zone, no floating point, static), no libc.
pub const C_FLAGS: &[&str] = &[
    "-target",
    "x86_64-apple-macos10.13",
    "-mkernel",
    "-fno-builtin",
    "-nostdinc",
    "-fno-common",
    "-O2",
];

/// Kernel C++ as darwin-facts.md gives it (`-fapple-kext`), with global destructors kept in
/// `__mod_term_func` instead of registered through `atexit`, which the kernel lacks.
pub const CXX_FLAGS: &[&str] = &[
    "-target",
    "x86_64-apple-macos10.13",
    "-fapple-kext",
    "-mkernel",
    "-nostdinc",
    "-nostdinc++",
    "-fno-builtin",
    "-fno-exceptions",
    "-fno-rtti",
    "-fno-use-cxa-atexit",
    "-fno-register-global-dtors-with-atexit",
    "-std=gnu++17",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
];

/// Compiles `tests/fixtures/<source>` with `compiler` and `flags` into an object's bytes;
/// `None` (the caller skips) when the compiler is not installed and `CI` is unset. In CI a
/// missing compiler, or any compile error, panics.
pub fn compile(compiler: &str, flags: &[&str], source: &str) -> Option<Vec<u8>> {
    static UNIQUE: AtomicUsize = AtomicUsize::new(0);
    let output = std::env::temp_dir().join(format!(
        "kextld-fixture-{}-{}.o",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    let source = PathBuf::from(FIXTURES).join(source);
    let status = Command::new(compiler)
        .args(flags)
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&output)
        .status();
    match status {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{compiler} is required in CI (compiling {})",
                source.display()
            );
            eprintln!("skipped: {compiler} is not installed");
            None
        }
        Err(error) => panic!("running {compiler}: {error}"),
        Ok(status) => {
            assert!(
                status.success(),
                "{compiler} failed on {}",
                source.display()
            );
            let object = std::fs::read(&output).expect("reading the compiled object");
            let _ = std::fs::remove_file(&output);
            Some(object)
        }
    }
}

/// Links one fixture object as a kext (root `_kmod_info`, exports `exports`, macOS 10.13);
/// panics with the linker's message on failure.
pub fn link_kext(name: &str, object: Vec<u8>, exports: &[&str]) -> Linked {
    let inputs = [Input {
        name: name.to_string(),
        data: object,
    }];
    let options = Options {
        exports: exports.iter().map(|pattern| pattern.to_string()).collect(),
        roots: vec!["_kmod_info".to_string()],
        min_macos: (10, 13, 0),
        uuid: None,
    };
    link(&inputs, &options).unwrap_or_else(|error| panic!("linking {name}: {error}"))
}
