//! `virtio-kext-abi`: what the three kexts' Rust halves share across the C ABI.
//!
//! - `#[repr(C)]` types that cross between kexts ([`VkSegment`], [`VkDmaRegion`],
//!   [`VkQueueSpec`], [`VkQueueStats`], [`VkInterruptCause`]) and the status every fallible
//!   C function returns ([`VkStatus`]), with an exact codec to and from
//!   [`virtio_core::Error`];
//! - with feature `kext`, the kernel runtime of a static library: a `#[global_allocator]`
//!   over `IOMallocAligned`/`IOFreeAligned`, the `log` facade routed to `IOLog`, and a panic
//!   handler that calls the kernel's `panic` (panics are denied by clippy in the driver
//!   crates; this is the last resort).
//!
//! The C declarations of these types are generated into `kexts/include/VirtioKextABI.h` by
//! `cargo xtask kexts` (cbindgen); a test fails when the checked-in header is stale.
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

#[cfg(feature = "kext")]
pub mod kernel;

use virtio_core::queue::{QueueStats, Segment};
use virtio_core::{Error, TransportError};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One DMA segment: a device address and a length. The layout of the bus's
/// [`Segment`], so lists convert both ways without a copy ([`as_segments`],
/// [`as_vk_segments`]).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VkSegment {
    pub addr: u64,
    pub len: u32,
    pub reserved: u32,
}

/// A C caller's segment list as the bus takes it: the same memory, no copy (the two types
/// have one layout, which `transmute_ref!` checks at compile time; any bit pattern is valid
/// in both). `reserved` is ignored.
#[inline]
pub fn as_segments(segs: &[VkSegment]) -> &[Segment] {
    zerocopy::transmute_ref!(segs)
}

/// The bus's segment list as the C ABI passes it: the same memory, no copy.
#[inline]
pub fn as_vk_segments(segs: &[Segment]) -> &[VkSegment] {
    zerocopy::transmute_ref!(segs)
}

impl From<Segment> for VkSegment {
    fn from(s: Segment) -> Self {
        VkSegment {
            addr: s.addr,
            len: s.len,
            reserved: 0,
        }
    }
}

impl From<VkSegment> for Segment {
    fn from(s: VkSegment) -> Self {
        Segment::new(s.addr, s.len)
    }
}

/// Coherent DMA memory: CPU address, device address, length (`DmaRegion` in C).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VkDmaRegion {
    pub vaddr: *mut u8,
    pub daddr: u64,
    pub len: u64,
}

/// A queue a device driver wants (`virtio_core::QueueSpec`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VkQueueSpec {
    pub index: u16,
    pub size: u16,
    pub max_indirect: u16,
    /// 0: the driver polls this queue; 1: completions interrupt.
    pub interrupts: u8,
    /// 1: do not trust `used.len` on this queue (`QueueSpec::ignore_used_len`: completions
    /// report 0 and the length is not checked); 0: validate it.
    pub ignore_used_len: u8,
}

/// Counters of one virtqueue (`virtio_core::QueueStats`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VkQueueStats {
    pub added: u64,
    pub completions: u64,
    pub kicks: u64,
    pub kicks_suppressed: u64,
    pub interrupts: u64,
    pub indirect: u64,
}

impl From<QueueStats> for VkQueueStats {
    fn from(s: QueueStats) -> Self {
        VkQueueStats {
            added: s.added,
            completions: s.completions,
            kicks: s.kicks,
            kicks_suppressed: s.kicks_suppressed,
            interrupts: s.interrupts,
            indirect: s.indirect,
        }
    }
}

impl From<VkQueueStats> for QueueStats {
    fn from(s: VkQueueStats) -> Self {
        QueueStats {
            added: s.added,
            completions: s.completions,
            kicks: s.kicks,
            kicks_suppressed: s.kicks_suppressed,
            interrupts: s.interrupts,
            indirect: s.indirect,
        }
    }
}

/// What an interrupt meant (`virtio_core::InterruptCause`): queue bit set in two halves.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VkInterruptCause {
    pub queues_lo: u64,
    pub queues_hi: u64,
    pub config_changed: u8,
    pub needs_reset: u8,
    pub reserved: [u8; 6],
}

/// `vector` value of the C functions meaning "INTx (or polling): read the ISR".
pub const VK_VECTOR_INTX: i32 = -1;

/// Decodes the `vector` argument of the C functions: `Some(k)` for MSI-X vector k, `None`
/// for [`VK_VECTOR_INTX`] (or any value that is not a vector: read the ISR).
pub fn vector_from_abi(vector: i32) -> Option<u16> {
    if vector == VK_VECTOR_INTX {
        None
    } else {
        u16::try_from(vector).ok()
    }
}

/// Encodes an interrupt vector for the C functions (the inverse of [`vector_from_abi`]).
pub fn vector_to_abi(vector: Option<u16>) -> i32 {
    vector.map_or(VK_VECTOR_INTX, i32::from)
}

/// Interrupt delivery modes (`virtio_core::platform::InterruptMode`).
pub const VK_IRQ_POLLING: u32 = 0;
pub const VK_IRQ_INTX: u32 = 1;
pub const VK_IRQ_MSIX: u32 = 2;

/// DMA directions (`virtio_core::platform::DmaDirection`).
pub const VK_DMA_TO_DEVICE: u32 = 0;
pub const VK_DMA_FROM_DEVICE: u32 = 1;
pub const VK_DMA_BIDIRECTIONAL: u32 = 2;

/// Result of a fallible C function: `code` 0 is success; otherwise one of the `VK_E_*`
/// codes with its fields (`queue`, `a`, `b` as documented per code). Decodes exactly to the
/// [`Error`] it was encoded from.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VkStatus {
    pub code: i32,
    pub queue: u32,
    pub a: u64,
    pub b: u64,
}

pub const VK_OK: i32 = 0;
pub const VK_E_RESET_TIMEOUT: i32 = 1;
/// `a` offered, `b` requested.
pub const VK_E_FEATURES_NOT_ACCEPTED: i32 = 2;
/// `a` bit.
pub const VK_E_MISSING_FEATURE: i32 = 3;
pub const VK_E_DEVICE_NEEDS_RESET: i32 = 4;
pub const VK_E_INVALID_STATE: i32 = 5;
pub const VK_E_CONFIG_UNSTABLE: i32 = 6;
/// `a` offset, `b` length.
pub const VK_E_CONFIG_OUT_OF_RANGE: i32 = 7;
pub const VK_E_NO_SUCH_QUEUE: i32 = 8;
pub const VK_E_QUEUE_NOT_READY: i32 = 9;
/// `a` size.
pub const VK_E_BAD_QUEUE_SIZE: i32 = 10;
pub const VK_E_QUEUE_FULL: i32 = 11;
pub const VK_E_BAD_CHAIN: i32 = 12;
/// `a` id.
pub const VK_E_USED_ID_OUT_OF_RANGE: i32 = 13;
/// `a` id.
pub const VK_E_USED_ID_NOT_IN_FLIGHT: i32 = 14;
/// `a` len, `b` max.
pub const VK_E_USED_LEN_TOO_LARGE: i32 = 15;
/// `a` used_idx, `b` last_seen.
pub const VK_E_USED_IDX_JUMP: i32 = 16;
pub const VK_E_QUEUE_BROKEN: i32 = 17;
pub const VK_E_DMA_ALLOC: i32 = 18;
/// `a` which transport error (`VK_TE_*`), `b` its field (cfg_type or bar).
pub const VK_E_TRANSPORT: i32 = 19;
/// `a` 1 when `queue` names the queue, 0 for the config vector.
pub const VK_E_VECTOR_REJECTED: i32 = 20;
/// `a` length and `b` address of the static UTF-8 name of the field (in the library kext,
/// which outlives its clients).
pub const VK_E_DEVICE_PROTOCOL: i32 = 21;
/// `a` status byte.
pub const VK_E_DEVICE_STATUS: i32 = 22;
pub const VK_E_TIMEOUT: i32 = 23;
pub const VK_E_UNSUPPORTED: i32 = 24;
/// A null handle or pointer was passed (never produced by the Rust crates themselves).
pub const VK_E_BAD_ARGUMENT: i32 = 25;
/// The driver is in use by another context (the kernel debugger): retry or drop.
pub const VK_E_BUSY: i32 = 26;

const TE_NOT_VIRTIO: u64 = 0;
const TE_BAD_CAP_LIST: u64 = 1;
const TE_MISSING_CAP: u64 = 2;
const TE_CAP_OUT_OF_BAR: u64 = 3;
const TE_BAR_UNAVAILABLE: u64 = 4;
const TE_NO_LEGACY: u64 = 5;
const TE_NO_MODERN: u64 = 6;

impl VkStatus {
    pub const OK: VkStatus = VkStatus {
        code: VK_OK,
        queue: 0,
        a: 0,
        b: 0,
    };

    pub const fn code(code: i32) -> Self {
        VkStatus {
            code,
            queue: 0,
            a: 0,
            b: 0,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.code == VK_OK
    }

    // `#[inline]` on the two conversions every C-ABI call makes: across the crate boundary
    // they were calls, about 70 instructions per 4 KiB read (`cargo xtask bench kext`).
    #[inline]
    pub fn from_result(r: Result<(), Error>) -> Self {
        match r {
            Ok(()) => Self::OK,
            Err(e) => e.into(),
        }
    }

    /// `Ok(())` for [`VK_OK`], else the error it encodes.
    #[inline]
    pub fn into_result(self) -> Result<(), Error> {
        if self.code == VK_OK {
            Ok(())
        } else {
            Err(self.into_error())
        }
    }

    /// The error this status encodes (codes this crate does not know become `Unsupported`).
    pub fn into_error(self) -> Error {
        let q = u16::try_from(self.queue).unwrap_or(u16::MAX);
        let a32 = u32::try_from(self.a).unwrap_or(u32::MAX);
        let a16 = u16::try_from(self.a).unwrap_or(u16::MAX);
        let b16 = u16::try_from(self.b).unwrap_or(u16::MAX);
        let b8 = u8::try_from(self.b).unwrap_or(u8::MAX);
        match self.code {
            VK_E_RESET_TIMEOUT => Error::ResetTimeout,
            VK_E_FEATURES_NOT_ACCEPTED => Error::FeaturesNotAccepted {
                offered: self.a,
                requested: self.b,
            },
            VK_E_MISSING_FEATURE => Error::MissingFeature { bit: a32 },
            VK_E_DEVICE_NEEDS_RESET => Error::DeviceNeedsReset,
            VK_E_INVALID_STATE => Error::InvalidState,
            VK_E_CONFIG_UNSTABLE => Error::ConfigUnstable,
            VK_E_CONFIG_OUT_OF_RANGE => Error::ConfigOutOfRange {
                offset: a32,
                len: u32::try_from(self.b).unwrap_or(u32::MAX),
            },
            VK_E_NO_SUCH_QUEUE => Error::NoSuchQueue { queue: q },
            VK_E_QUEUE_NOT_READY => Error::QueueNotReady { queue: q },
            VK_E_BAD_QUEUE_SIZE => Error::BadQueueSize {
                queue: q,
                size: a16,
            },
            VK_E_QUEUE_FULL => Error::QueueFull,
            VK_E_BAD_CHAIN => Error::BadChain,
            VK_E_USED_ID_OUT_OF_RANGE => Error::UsedIdOutOfRange { queue: q, id: a32 },
            VK_E_USED_ID_NOT_IN_FLIGHT => Error::UsedIdNotInFlight { queue: q, id: a32 },
            VK_E_USED_LEN_TOO_LARGE => Error::UsedLenTooLarge {
                queue: q,
                len: a32,
                max: u32::try_from(self.b).unwrap_or(u32::MAX),
            },
            VK_E_USED_IDX_JUMP => Error::UsedIdxJump {
                queue: q,
                used_idx: a16,
                last_seen: b16,
            },
            VK_E_QUEUE_BROKEN => Error::QueueBroken { queue: q },
            VK_E_DMA_ALLOC => Error::DmaAlloc,
            VK_E_TRANSPORT => Error::Transport(match self.a {
                TE_NOT_VIRTIO => TransportError::NotVirtio,
                TE_BAD_CAP_LIST => TransportError::BadCapabilityList,
                TE_MISSING_CAP => TransportError::MissingCapability { cfg_type: b8 },
                TE_CAP_OUT_OF_BAR => TransportError::CapabilityOutOfBar { cfg_type: b8 },
                TE_BAR_UNAVAILABLE => TransportError::BarUnavailable { bar: b8 },
                TE_NO_LEGACY => TransportError::NoLegacyInterface,
                _ => TransportError::NoModernInterface,
            }),
            VK_E_VECTOR_REJECTED => Error::VectorRejected {
                queue: (self.a == 1).then_some(q),
            },
            VK_E_DEVICE_PROTOCOL => Error::DeviceProtocol {
                what: static_str(self.b, self.a),
            },
            VK_E_DEVICE_STATUS => Error::DeviceStatus { status: b8 },
            VK_E_TIMEOUT => Error::Timeout,
            VK_E_BUSY => Error::QueueFull,
            _ => Error::Unsupported,
        }
    }
}

/// The `&'static str` a [`VK_E_DEVICE_PROTOCOL`] status points at.
fn static_str(addr: u64, len: u64) -> &'static str {
    if addr == 0 || len > 256 {
        return "device protocol violation";
    }
    // SAFETY: statuses with this code are only built by `From<Error>` below, from a
    // `&'static str` in the family kext's (or, in tests, this process's) constant data. A
    // client kext depends on the family kext, so the family (and its strings) stays loaded
    // while any client can decode a status.
    let bytes = unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len as usize) };
    core::str::from_utf8(bytes).unwrap_or("device protocol violation")
}

impl From<Error> for VkStatus {
    fn from(e: Error) -> Self {
        let mut s = VkStatus::OK;
        s.code = match e {
            Error::ResetTimeout => VK_E_RESET_TIMEOUT,
            Error::FeaturesNotAccepted { offered, requested } => {
                s.a = offered;
                s.b = requested;
                VK_E_FEATURES_NOT_ACCEPTED
            }
            Error::MissingFeature { bit } => {
                s.a = bit.into();
                VK_E_MISSING_FEATURE
            }
            Error::DeviceNeedsReset => VK_E_DEVICE_NEEDS_RESET,
            Error::InvalidState => VK_E_INVALID_STATE,
            Error::ConfigUnstable => VK_E_CONFIG_UNSTABLE,
            Error::ConfigOutOfRange { offset, len } => {
                s.a = offset.into();
                s.b = len.into();
                VK_E_CONFIG_OUT_OF_RANGE
            }
            Error::NoSuchQueue { queue } => {
                s.queue = queue.into();
                VK_E_NO_SUCH_QUEUE
            }
            Error::QueueNotReady { queue } => {
                s.queue = queue.into();
                VK_E_QUEUE_NOT_READY
            }
            Error::BadQueueSize { queue, size } => {
                s.queue = queue.into();
                s.a = size.into();
                VK_E_BAD_QUEUE_SIZE
            }
            Error::QueueFull => VK_E_QUEUE_FULL,
            Error::BadChain => VK_E_BAD_CHAIN,
            Error::UsedIdOutOfRange { queue, id } => {
                s.queue = queue.into();
                s.a = id.into();
                VK_E_USED_ID_OUT_OF_RANGE
            }
            Error::UsedIdNotInFlight { queue, id } => {
                s.queue = queue.into();
                s.a = id.into();
                VK_E_USED_ID_NOT_IN_FLIGHT
            }
            Error::UsedLenTooLarge { queue, len, max } => {
                s.queue = queue.into();
                s.a = len.into();
                s.b = max.into();
                VK_E_USED_LEN_TOO_LARGE
            }
            Error::UsedIdxJump {
                queue,
                used_idx,
                last_seen,
            } => {
                s.queue = queue.into();
                s.a = used_idx.into();
                s.b = last_seen.into();
                VK_E_USED_IDX_JUMP
            }
            Error::QueueBroken { queue } => {
                s.queue = queue.into();
                VK_E_QUEUE_BROKEN
            }
            Error::DmaAlloc => VK_E_DMA_ALLOC,
            Error::Transport(t) => {
                let (which, field) = match t {
                    TransportError::NotVirtio => (TE_NOT_VIRTIO, 0),
                    TransportError::BadCapabilityList => (TE_BAD_CAP_LIST, 0),
                    TransportError::MissingCapability { cfg_type } => (TE_MISSING_CAP, cfg_type),
                    TransportError::CapabilityOutOfBar { cfg_type } => {
                        (TE_CAP_OUT_OF_BAR, cfg_type)
                    }
                    TransportError::BarUnavailable { bar } => (TE_BAR_UNAVAILABLE, bar),
                    TransportError::NoLegacyInterface => (TE_NO_LEGACY, 0),
                    TransportError::NoModernInterface => (TE_NO_MODERN, 0),
                };
                s.a = which;
                s.b = field.into();
                VK_E_TRANSPORT
            }
            Error::VectorRejected { queue } => {
                if let Some(q) = queue {
                    s.queue = q.into();
                    s.a = 1;
                }
                VK_E_VECTOR_REJECTED
            }
            Error::DeviceProtocol { what } => {
                s.a = what.len() as u64;
                s.b = what.as_ptr() as usize as u64;
                VK_E_DEVICE_PROTOCOL
            }
            Error::DeviceStatus { status } => {
                s.a = status.into();
                s.b = status.into();
                VK_E_DEVICE_STATUS
            }
            Error::Timeout => VK_E_TIMEOUT,
            Error::Unsupported => VK_E_UNSUPPORTED,
        };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_lists_cross_as_they_are() {
        let vk = [
            VkSegment {
                addr: 0x1000,
                len: 512,
                reserved: 7,
            },
            VkSegment {
                addr: u64::MAX - 4095,
                len: 4096,
                reserved: 0,
            },
        ];
        let segs = as_segments(&vk);
        // The same memory, not a copy; `reserved` is not part of a segment's value.
        assert_eq!(segs.as_ptr().cast::<u8>(), vk.as_ptr().cast::<u8>());
        assert_eq!(
            segs,
            [
                Segment::new(0x1000, 512),
                Segment::new(u64::MAX - 4095, 4096)
            ]
        );
        let back = as_vk_segments(segs);
        assert_eq!(back.as_ptr(), vk.as_ptr());
        assert_eq!(back, vk);
        let new = [Segment::new(0x2000, 16)];
        assert_eq!(
            as_vk_segments(&new),
            [VkSegment {
                addr: 0x2000,
                len: 16,
                reserved: 0
            }]
        );
    }

    #[test]
    fn every_error_round_trips() {
        let all = [
            Error::ResetTimeout,
            Error::FeaturesNotAccepted {
                offered: 1 << 40,
                requested: 3,
            },
            Error::MissingFeature { bit: 32 },
            Error::DeviceNeedsReset,
            Error::InvalidState,
            Error::ConfigUnstable,
            Error::ConfigOutOfRange { offset: 9, len: 4 },
            Error::NoSuchQueue { queue: 7 },
            Error::QueueNotReady { queue: 3 },
            Error::BadQueueSize {
                queue: 1,
                size: 300,
            },
            Error::QueueFull,
            Error::BadChain,
            Error::UsedIdOutOfRange { queue: 2, id: 999 },
            Error::UsedIdNotInFlight { queue: 2, id: 5 },
            Error::UsedLenTooLarge {
                queue: 1,
                len: 70000,
                max: 4096,
            },
            Error::UsedIdxJump {
                queue: 0,
                used_idx: 65535,
                last_seen: 2,
            },
            Error::QueueBroken { queue: 4 },
            Error::DmaAlloc,
            Error::Transport(TransportError::NotVirtio),
            Error::Transport(TransportError::BadCapabilityList),
            Error::Transport(TransportError::MissingCapability { cfg_type: 2 }),
            Error::Transport(TransportError::CapabilityOutOfBar { cfg_type: 4 }),
            Error::Transport(TransportError::BarUnavailable { bar: 5 }),
            Error::Transport(TransportError::NoLegacyInterface),
            Error::Transport(TransportError::NoModernInterface),
            Error::VectorRejected { queue: Some(2) },
            Error::VectorRejected { queue: None },
            Error::DeviceProtocol {
                what: "num_buffers",
            },
            Error::DeviceStatus { status: 7 },
            Error::Timeout,
            Error::Unsupported,
        ];
        for e in all {
            let s = VkStatus::from(e);
            assert_ne!(s.code, VK_OK);
            assert_eq!(s.into_error(), e, "{s:?}");
        }
        assert_eq!(VkStatus::from_result(Ok(())), VkStatus::OK);
        assert_eq!(VkStatus::code(999).into_error(), Error::Unsupported);
    }

    #[test]
    fn segments_and_stats_convert() {
        let s = Segment::new(0x1234_5678_9000, 1500);
        assert_eq!(Segment::from(VkSegment::from(s)), s);
        let q = QueueStats {
            added: 1,
            completions: 2,
            kicks: 3,
            kicks_suppressed: 4,
            interrupts: 5,
            indirect: 6,
        };
        assert_eq!(QueueStats::from(VkQueueStats::from(q)), q);
    }
}
