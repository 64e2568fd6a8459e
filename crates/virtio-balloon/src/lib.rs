//! `virtio-balloon`: the traditional virtio memory balloon driver (virtio 1.2 §5.5),
//! generic over the [`virtio_core::Bus`] and blind to the transport.
//!
//! # Design
//!
//! - **Pages** come from the platform through [`PagePool`] (`alloc_page`, `free_page`, the
//!   page size, statistics, free-range isolation). The balloon speaks 4 KiB frames whatever
//!   the platform's page size: a 16 KiB page is four consecutive frame numbers
//!   ([`wire::encode_pfns`]). Every page the driver takes is either in the balloon (an
//!   array sized at setup for [`BalloonOptions::max_pages`], never grown), in the one
//!   inflate or deflate request in flight, or back in the pool: nothing leaks, nothing is
//!   returned twice, and [`BalloonDriver::shutdown`] (or drop) gives everything back (but
//!   an inflate a device that would not reset still holds: see **Faults**).
//! - **Setup** ([`BalloonDriver::new`]): negotiates [`features::FEATURE_TABLE`], numbers the
//!   queues sequentially over the features the device offers and sets up those of the
//!   negotiated ones ([`QueueLayout`]), allocates one DMA
//!   region (two 256-frame PFN arrays, the stats buffer, the hint command IDs), primes the
//!   stats queue, sets DRIVER_OK, reads the target and starts moving towards it.
//! - **Inflate/deflate** follow `num_pages` (read on config-change interrupts and `poll`),
//!   rounded up to whole platform pages and clamped (with a log line) to what the platform
//!   can hold. One request of at most 256 frames is in flight at a time, in one direction
//!   at a time; `actual` is written (one 32-bit access) after each acknowledged request.
//!   Deflates only take pages whose inflate the device acknowledged. With MUST_TELL_HOST
//!   deflated pages return to the pool only when the device used the deflate buffer;
//!   without it they return as soon as the request is queued (§5.5.6.1).
//! - **Stats** (STATS_VQ): the tag set is fixed at setup from [`PagePool::stats`] (MEMTOT
//!   falls back to the pool's size when the pool knows it); each time the device uses the buffer the driver refills
//!   it and makes it available again.
//! - **Memory pressure**: [`BalloonDriver::deflate_for_oom`] (DEFLATE_ON_OOM) takes pages
//!   back a request at a time and holds the balloon until the host sets a new target;
//!   [`BalloonDriver::release_hints`] gives back ranges held for hinting.
//! - **Free page hinting** (FREE_PAGE_HINT): on a new `free_page_hint_cmd_id` (≥ 2) the
//!   driver sends the ID, hints platform-isolated free ranges as device-writable buffers
//!   (bounded by [`BalloonOptions::max_hint_ranges`], one descriptor kept for STOP), ends
//!   with STOP when it runs out or the device moves on, and gives the ranges back on DONE.
//! - **Free page reporting** (PAGE_REPORTING): up to `report_capacity` ranges per request,
//!   returned to the platform once the device used the buffer; a full report is followed
//!   by another.
//! - **Emptying before a reset** ([`BalloonDriver::deflate_all`]): every page goes back
//!   through the deflate queue, `actual` follows, and [`BalloonDriver::is_empty`] says when
//!   the device has acknowledged the last one; then `shutdown` (§5.5.6.1; Linux does the
//!   same at remove and freeze).
//! - **Faults**: the bus validates used ids and lengths; a device fault, or
//!   DEVICE_NEEDS_RESET, stops the driver until [`BalloonDriver::restart`], which resets the
//!   device (the device forgets the balloon), returns everything to the pool and inflates to
//!   the target again. When the reset fails and the device's DMA cannot be stopped, the
//!   free ranges of reports and hints still posted are leaked ([`RangeReturn::Leaked`]):
//!   the device may still write them; so are the pages of an inflate request in flight
//!   ([`PagePool::leak_page`]): the device may still inflate them, and the host then
//!   discards their contents. The balloon's other pages go back.
//!
//! Known limitation: §5.5.6 legacy says drivers SHOULD ignore used lengths on the balloon
//! queues (old devices wrote the buffer length there). The bus treats a length beyond a
//! chain's writable capacity as a fault, so such a device stops this driver; QEMU writes 0.
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

pub mod driver;
pub mod features;
pub mod pool;
pub mod wire;

pub use driver::{
    BalloonCounters, BalloonDriver, BalloonError, BalloonEvent, BalloonOptions, OomDeflate,
};
pub use features::QueueLayout;
pub use pool::{FreeRange, MemStats, Page, PagePool, RangeReturn, RangeUse};
