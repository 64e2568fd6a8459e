//! `virtio-rng`: the virtio entropy device driver (virtio 1.2 §5.4), generic over the
//! [`virtio_core::Bus`] and blind to the transport.
//!
//! # Design
//!
//! - **One queue** (`requestq`, index 0, §5.4.2) of device-writable buffers. At setup the
//!   driver allocates one DMA region of `buffers × buffer_size` bytes (never grown) and
//!   posts every buffer; the device fills a buffer with as many random bytes as it likes
//!   (at most the buffer's size) and returns it with the count in `used.len` (§5.4.6).
//! - **Bytes in order, exactly once.** Completed buffers join a FIFO in the order the
//!   device returned them; [`VirtioRng::read`] copies from the front of that FIFO, zeroes
//!   what it handed out and reposts a buffer only once all of its bytes were taken. So the
//!   caller sees the device's bytes in completion order, none lost, none twice — even from
//!   a device that claims to have written a buffer it did not touch (it reads zeroes then,
//!   never earlier bytes). Bytes are copied out of DMA memory once
//!   (`DmaRegion::read_into`), never borrowed.
//! - **Hostile device.** The bus validates every used element (an id out of range or not
//!   in flight, a length beyond the buffer, a used index that jumps): the error is returned
//!   and the queue stays broken until [`VirtioRng::shutdown`]. A completion with length 0
//!   is legal: the buffer is posted again by the next `poll` or `read`, since no `read`
//!   would ever empty it (not by `handle_interrupt`: buffers go back at the consumer's
//!   pace, so a device answering every buffer empty at once cannot keep the interrupt path
//!   kicking it). Every loop fed by the device is bounded by the number of buffers.
//! - **No allocation on the I/O path**: `read`, `poll` and `handle_interrupt` use only
//!   what `new` set up.
//! - **Interrupts** start enabled. The platform calls [`VirtioRng::handle_interrupt`]
//!   (MSI-X vector, or `None` for INTx, which reads the ISR); a caller about to sleep for
//!   more bytes calls `read` or `poll` last (they post every free buffer again;
//!   `handle_interrupt` posts none), then [`VirtioRng::enable_interrupts`], and polls
//!   again if it says work arrived meanwhile (the race-free re-enable of
//!   `virtio_core::Bus`).
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

pub use driver::{REQUEST_QUEUE, RngInterrupt, RngOptions, RngStats, VirtioRng};
