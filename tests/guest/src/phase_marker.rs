//! Benchmark phase markers, seen by the host two ways:
//! - QEMU's `fw_cfg_select` trace: the marker selects the (nonexistent, harmless) fw_cfg
//!   item `0x3F00 | value` through port 0x510, which QEMU traces as
//!   `fw_cfg_select ... key 0x3fNN` (port I/O under TCG bypasses the `cpu_out` trace), so
//!   the runner can split kicks and interrupts per phase;
//! - the project's instruction-counting TCG plugin (`tests/insn-plugin`): `cargo xtask
//!   bench` looks up [`bench_phase_marker`] in this ELF's symbol table and has the plugin
//!   snapshot its instruction and halt counters each time the guest enters it. That needs
//!   one real function at one address, hence `no_mangle` and `inline(never)`, and nothing
//!   but the markers may call it.

/// Marks a phase boundary with `value` (the scenario's own numbering, e.g. `0x10 + phase`
/// at the start of blk phase `phase`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn bench_phase_marker(value: u8) {
    crate::arch::outw(0x510, 0x3F00 | u16::from(value));
}
