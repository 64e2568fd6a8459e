//! The kexts' C ABI layers, called the way their IOKit shims call them, over
//! VirtioFamily.kext's Rust half, which the VirtioFamily shim (`virtio_tests::kext_shim`)
//! runs over the simulated PCI function. The fuzzer plays a hostile device under the
//! driver crates (as the driver targets do) and also chooses the shim's call order among
//! the orders IOKit allows: submissions from inside completion callbacks (an upper layer
//! issuing its next I/O), the held requests resubmitted from the restart callback, sleep
//! and wake with requests in flight and held, stop with requests in flight, interrupts for
//! any vector, calls after stop, destroy with or without stop.
//!
//! What the driver targets cannot see and this one checks: the C functions' bookkeeping
//! between the driver crate and the shim (every request the shim handed over comes back
//! through its callback exactly once, never from inside the call that submitted it; the
//! statistics agree with the shim's own count; a held request is never left without a
//! restart), their argument checks, the family's interrupt routing to the device kext, and
//! that every DMA region is back once the family stops. Input byte 0 picks the kext:
//! VirtioBlock, VirtioNet, VirtioEntropy, VirtioConsole, VirtioBalloon (`% 5`).

mod balloon;
mod blk;
mod console;
mod net;
mod rng;

use virtio_core::platform::{Dma, DmaRegion};
use virtio_pci::Preference;
use virtio_tests::kext_shim::{Family, FamilyKext};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::Sim;

use crate::input::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 5 {
        0 => blk::run(&mut input),
        1 => net::run(&mut input),
        2 => rng::run(&mut input),
        3 => console::run(&mut input),
        _ => balloon::run(&mut input),
    }
}

/// What a kext part starts from: the family started, a buffer for the shim's own I/O, and
/// guest memory's free bytes before either (what [`finish`] checks is back).
struct Started {
    family: Family,
    mem: IdentityMemory,
    buffer: DmaRegion,
    free_at_start: usize,
}

/// The family's `start` over `sim` (the IOKit order: the family's start, then the device
/// kext's), and a shim buffer of `buffer_bytes`. `None` when the family refused the
/// function, after checking that its failed start gave back every DMA byte.
fn start_family(sim: &Sim, preference: Preference, buffer_bytes: usize) -> Option<Started> {
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    match Family::start(FamilyKext::rlib(), sim, preference) {
        Ok(family) => {
            let buffer = mem.alloc_buffer(buffer_bytes);
            Some(Started {
                family,
                mem,
                buffer,
                free_at_start,
            })
        }
        Err(_) => {
            crate::assert_setup_freed(&mem, free_at_start);
            None
        }
    }
}

/// After the device kext's `free`: the shim's own `buffer` goes back, and the family stops
/// (every DMA region back: asserted by `Family::stop`); then the whole of guest memory is
/// back to `free_at_start`.
fn finish(
    family: Family,
    sim: &Sim,
    mem: &IdentityMemory,
    buffer: DmaRegion,
    free_at_start: usize,
) {
    // SAFETY: the device kext is gone and the device reset; nothing uses the buffer.
    unsafe { mem.free_coherent(buffer) };
    // An interrupt between the device kext's `free` and the family's `stop` (a shared line,
    // a late MSI-X message) must not reach the freed device kext (AddressSanitizer
    // watches).
    sim.raise_config_interrupt();
    family.interrupts();
    // SAFETY: the family's live handle, as its interrupt action has it.
    unsafe { (family.kext.shim.vfam_deliver_interrupt)(family.dev, 0) };
    family.stop();
    let bad = sim.bad_accesses();
    assert!(bad.is_empty(), "accesses outside the device: {bad:?}");
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}

/// Interrupts as the hardware and the shim deliver them: what the device raised, through
/// the family's interrupt action (`vfam_deliver_interrupt`), sometimes with a spurious
/// vector of any value as well (a shared INTx line, a stale MSI-X message).
fn deliver_interrupts(input: &mut Input, family: &Family) {
    family.interrupts();
    if input.bool() {
        let vector = i32::from(input.u8() as i8);
        // SAFETY: the family's live handle, as its interrupt action has it.
        unsafe { (family.kext.shim.vfam_deliver_interrupt)(family.dev, vector) };
    }
}
