//! `virtio-blk`: the virtio block device driver (virtio 1.2 §5.2), generic over the
//! [`virtio_core::Bus`] and blind to the transport.
//!
//! # Design
//!
//! - **Setup** ([`BlkDriver::new`]): negotiates the bits of [`features::FEATURE_TABLE`]
//!   (every block bit is either implemented or refused there with its reason), reads and
//!   validates the configuration ([`config`]: a field only when its feature was negotiated,
//!   limits of 0 meaning "unlimited", nonsense values → `Error::DeviceProtocol`), sets up
//!   one request queue, or several with MQ, and allocates everything the I/O path will
//!   ever need. Nothing allocates after that.
//! - **Per-request state** lives in a fixed slab of slots per queue, one per ring entry
//!   (a device request takes at least one descriptor, so a queue never has more in
//!   flight). Each slot owns 64 + 16·ranges bytes of one preallocated DMA region: the
//!   16-byte request header, an inline answer area (GET_ID, GET_LIFETIME), the status byte
//!   and the range array of discard / write-zeroes / secure-erase. The bus token of a
//!   device request is its slot index.
//! - **Submission** ([`BlkDriver::submit`]) validates the request (features, read-only,
//!   logical-block alignment, capacity), then plans it: the data list is cut into
//!   descriptors of at most `size_max` and device requests of at most `seg_max` data
//!   descriptors, always at logical-block boundaries ([`split`]); ranges are cut by the
//!   per-operation sector limit, alignment and segment limit. If the planned device requests
//!   do not all fit (slots, and descriptors: `2 + data` per chain, or 1 with an indirect
//!   table) nothing is queued and the caller gets `QueueFull`. Otherwise every part is
//!   added; the caller's token lives in the first part's slot and completes once, when the
//!   last part completes, with the first error. Submissions do not notify: callers batch
//!   and then [`BlkDriver::kick`] once. A range request needing more device requests than
//!   the queue ever holds (`TooLarge`) goes in shares through
//!   [`BlkDriver::submit_ranges_from`], each a request of its own.
//! - **Completion** ([`BlkDriver::poll_completions`]) pops used entries (the bus validates
//!   ids and lengths), checks the status byte (OK, IOERR → [`BlkError::Io`], UNSUPP →
//!   [`BlkError::Unsupported`], anything else → `DeviceProtocol`) and the written length
//!   (it must cover the status byte, and for reads the data), reclaims slots and calls the
//!   caller back without allocating. Interrupts are re-enabled race-free through the bus
//!   (disable, drain, re-enable, drain again if the bus says work arrived in between).
//! - **Config changes** ([`BlkDriver::handle_interrupt`], [`BlkDriver::handle_config_change`])
//!   report a new capacity. DEVICE_NEEDS_RESET or a queue broken by the device is handled
//!   by [`BlkDriver::abort_all`] (every in-flight token completes with `Aborted`) and
//!   [`BlkDriver::restart`].
//! - **Sleep and wake** ([`BlkDriver::suspend`], [`BlkDriver::resume`]; Linux's
//!   `virtblk_freeze` / `virtblk_restore`): nothing survives a device reset, so suspend
//!   refuses new requests with `QueueFull` (the caller holds them), lets the requests in
//!   flight complete for a bounded number of polls, resets the device and completes the
//!   rest with `Aborted`; resume negotiates exactly the previous features (fewer: an
//!   error, device FAILED), re-reads the configuration and rebuilds every queue. Each
//!   caller token completes exactly once; the caller resubmits what was held or aborted.
//!   While the device is reset (suspended, or stopped by `abort_all`) the driver leaves it
//!   alone: interrupts are acknowledged but report no configuration change and no
//!   DEVICE_NEEDS_RESET, polling completes nothing, and its configuration is neither read
//!   nor written (§5.2.5.1) until `resume` / `restart`.
//!
//! Logging goes through `log`: setup facts at info, failed requests at warn, device
//! protocol violations at error.
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

pub mod config;
pub mod driver;
pub mod features;
pub mod split;
pub mod wire;

pub use config::{BlkInfo, Geometry, RangeLimits, Topology};
pub use driver::{
    BlkDriver, BlkError, BlkInterrupt, BlkOptions, Completion, DeviceId, Lifetime, Request,
    ResumeReport, SuspendReport,
};
pub use split::{RangeCursor, SectorRange};
