//! `virtio-console`: the virtio console driver (virtio 1.2 §5.3), generic over the
//! [`virtio_core::Bus`] and blind to the transport.
//!
//! # What it is for
//! Kernel log output that reaches the host before the driver is fully up and while the
//! kernel panics ([`VirtioConsole::emergency_write`], [`ConsoleLogger`]), and named ports
//! for host tools (MULTIPORT: [`VirtioConsole::write`], [`VirtioConsole::read`],
//! [`VirtioConsole::poll_events`], [`VirtioConsole::open_port`]).
//!
//! # Design
//! - [`features`]: SIZE, MULTIPORT and EMERG_WRITE, each negotiated and implemented.
//! - [`wire`]: config offsets, the control message and its validation (length, event code,
//!   direction, values, names: UTF-8, no control characters, at most
//!   [`wire::MAX_NAME_LEN`] bytes).
//! - [`driver`]: two-stage bring-up (negotiate → emergency write works; start → queues for
//!   every port up to the limit, buffers, DRIVER_OK, DEVICE_READY), per-port preallocated
//!   receive and transmit buffers, the control protocol both ways, events.
//! - [`logger`]: a `log::Log` over the emergency path, no allocation, bounded spin lock.
//!
//! Nothing allocates after [`VirtioConsole::start`].
#![no_std]
// The device is untrusted: no panicking construct may be reachable from device values.
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
#[cfg(test)]
extern crate std;

pub mod driver;
pub mod features;
pub mod logger;
pub mod wire;

pub use driver::{
    ConsoleError, ConsoleEvent, ConsoleInterrupt, ConsoleOptions, ConsoleStats, DeviceConfig,
    Events, MAX_PORTS, PortInfo, PortMask, VirtioConsole, queues,
};
pub use logger::ConsoleLogger;
pub use wire::{ControlError, NameError, PortName};
