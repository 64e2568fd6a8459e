//! `virtio-core`: the transport-independent heart of the virtio stack.
//!
//! - [`types`]: spec constants (device types, status, generic feature bits);
//! - [`platform`]: traits a platform implements once (DMA, PCI config space, BARs, interrupts);
//! - [`transport`]: what a transport (virtio-pci modern/legacy) offers to the core;
//! - [`ring`]: split-ring wire layouts; [`queue`]: the split virtqueue (the hot path);
//! - [`bus`]: the interface device drivers use, and [`device::VirtioDevice`], its in-process
//!   implementation over any transport (feature negotiation, lifecycle, interrupts).
#![no_std]
// The device is untrusted: no panicking construct may be reachable from device-written
// values. Enforced by clippy for all non-test code; the few indexing sites on driver-private
// state carry a local `allow` with the invariant that makes them safe.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

extern crate alloc;

pub mod error;
pub mod fifo;
pub mod platform;
pub mod transport;
pub mod types;

pub use error::{Error, Result, TransportError};
pub use types::{DeviceStatus, DeviceType, Features, RingLayoutKind};
pub mod bus;
pub mod device;
pub mod packed;
pub mod queue;
pub mod ring;
mod ringmem;
pub mod virtqueue;

pub use bus::{Bus, InterruptCause, QueueMask, QueueSpec};
pub use device::VirtioDevice;
pub use packed::PackedQueue;
pub use queue::{QueueStats, Segment, SplitQueue, Used};
pub use virtqueue::Virtqueue;
