//! Test support for the virtio stack.
//!
//! - `sim`: an in-process virtio-pci function (register model) whose rings are served by
//!   rust-vmm's `virtio-queue` over identity-mapped `vm-memory`;
//! - `qemu`: the host-side runner that builds the bare-metal guest and drives QEMU;
//! - `kext_shim`: the VirtioFamily shim's side of the kexts' C ABI, played over `sim`.

pub mod balloon_model;
pub mod balloon_shim;
pub mod blk_model;
pub mod capped_alloc;
pub mod console_model;
pub mod fs_model;
pub mod kext_shim;
pub mod mem;
pub mod net_model;
pub mod packed_device;
pub mod prng;
pub mod qemu;
pub mod ring_device;
pub mod sim;
