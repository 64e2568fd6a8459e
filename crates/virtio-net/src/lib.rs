//! `virtio-net`: the virtio network device driver (virtio 1.2 §5.1), `no_std`, generic over
//! [`virtio_core::Bus`] so it never sees the transport.
//!
//! - [`features`]: every feature bit, negotiated and implemented or refused with a reason;
//! - [`wire`]: the net header, control messages, config layout, header build/validate;
//! - [`VirtioNet`]: setup (negotiation with dependency closure, config validation, queue
//!   pair + control queue), transmit with per-slot headers and backpressure, receive with
//!   small / big / mergeable buffers, the control queue, link status, and a polled
//!   single-frame path for kernel debuggers (KDP), and sleep/wake
//!   ([`VirtioNet::suspend`] / [`VirtioNet::resume`]: reset, every token back once, full
//!   re-initialisation with the caller's filters replayed).
//!
//! Memory is allocated in [`VirtioNet::new`] only; the I/O paths never allocate.
#![no_std]
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

pub mod features;
mod net;
pub mod wire;

pub use net::{
    ConfigEvent, DEBUG_FRAME_MAX, Duplex, MAC_TABLE_MAX, MacAddr, NetConfig, NetError,
    NetInterrupt, NetStats, RX_MEMORY_MAX, ResumeReport, RxFrame, RxMode, RxSummary, SuspendReport,
    TxReclaim, TxStatus, VirtioNet, queues,
};
pub use wire::{
    CsumRequest, Gso, GsoKind, GuestOffloads, HostOffloads, NetHdr, OffloadError, RxCsum, RxGso,
    RxInfo, TxOffload,
};
