//! Passes the linker script and generates the 256 interrupt entry stubs.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Exceptions for which the CPU pushes an error code (Intel SDM vol. 3, table 6-1).
const HAS_ERROR_CODE: [u8; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 29];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    // Only the bare-metal build links with our script; `cargo clippy` for the host target
    // (see xtask) never links.
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!(
            "cargo:rustc-link-arg=-T{}",
            manifest.join("linker.ld").display()
        );
        println!("cargo:rustc-link-arg=--no-pie");
    }

    // One 16-byte-aligned stub per vector: push a dummy error code where the CPU does not
    // push one, so every frame has the same layout; push the vector; join the common path.
    let mut s = String::new();
    s.push_str(".section .text.isr, \"ax\"\n");
    for v in 0..256u32 {
        writeln!(s, ".balign 16\nisr_stub_{v}:").unwrap();
        if !HAS_ERROR_CODE.contains(&(v as u8)) || v > 31 {
            s.push_str("    push 0\n");
        }
        writeln!(s, "    push {v}\n    jmp isr_common").unwrap();
    }
    s.push_str(
        ".section .rodata.isr_table, \"a\"\n.balign 8\n.global isr_stub_table\nisr_stub_table:\n",
    );
    for v in 0..256u32 {
        writeln!(s, "    .quad isr_stub_{v}").unwrap();
    }
    std::fs::write(out.join("isr_stubs.s"), s).unwrap();
}
