//! Errors are values: every failure a device or platform can cause is one of these.

use core::fmt;

/// Everything that can go wrong in the core, the transports and the bus.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The device did not clear its status after a reset within the bounded wait.
    ResetTimeout,
    /// The device cleared FEATURES_OK after we set it: it rejected our feature subset.
    FeaturesNotAccepted { offered: u64, requested: u64 },
    /// A feature the driver or transport cannot work without is not offered.
    MissingFeature { bit: u32 },
    /// The device set DEVICE_NEEDS_RESET; the driver must reset and reinitialise it.
    DeviceNeedsReset,
    /// An operation was called in the wrong lifecycle state (e.g. queues before FEATURES_OK).
    InvalidState,
    /// `config_generation` kept changing while we read (bounded retries exhausted).
    ConfigUnstable,
    /// A config access outside the device-specific config area.
    ConfigOutOfRange { offset: u32, len: u32 },
    /// The queue index does not exist on this device (queue size 0 or beyond `num_queues`).
    NoSuchQueue { queue: u16 },
    /// The queue has not been set up, or was torn down.
    QueueNotReady { queue: u16 },
    /// Requested or device-reported queue size is unusable (0, not a power of two where
    /// required, or above the 32768 maximum).
    BadQueueSize { queue: u16, size: u16 },
    /// Not enough free descriptors for this chain right now (backpressure, not a fault).
    QueueFull,
    /// A chain with no segments, or with more segments than the queue can ever hold.
    BadChain,
    /// The device wrote a used entry whose id is beyond the ring.
    UsedIdOutOfRange { queue: u16, id: u32 },
    /// The device completed a descriptor that is not the head of a chain in flight
    /// (double completion, or a forged id).
    UsedIdNotInFlight { queue: u16, id: u32 },
    /// The device claims to have written more than the chain's writable capacity.
    UsedLenTooLarge { queue: u16, len: u32, max: u32 },
    /// The used index advanced by more than the ring size since we last looked.
    UsedIdxJump {
        queue: u16,
        used_idx: u16,
        last_seen: u16,
    },
    /// An earlier device fault broke this queue; it refuses use until the device is reset.
    QueueBroken { queue: u16 },
    /// The platform could not allocate or map DMA memory.
    DmaAlloc,
    /// The transport's capabilities or BARs are malformed or missing.
    Transport(TransportError),
    /// MSI-X vector programming was refused by the device (read back NO_VECTOR).
    VectorRejected { queue: Option<u16> },
    /// A device-specific protocol rule was broken by the device (bad value in config or in
    /// a device-written buffer). `what` names the field.
    DeviceProtocol { what: &'static str },
    /// The device answered a request with an error status.
    DeviceStatus { status: u8 },
    /// A bounded wait ran out.
    Timeout,
    /// The device (or this platform) does not support the operation.
    Unsupported,
}

/// Why a PCI function could not be driven by a transport.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// Not a virtio vendor/device ID we support.
    NotVirtio,
    /// A capability pointer or length leaves config space, or loops.
    BadCapabilityList,
    /// A required vendor capability (common, notify, ISR, device) is missing.
    MissingCapability { cfg_type: u8 },
    /// A capability's `bar`, `offset` or `length` does not fit within its BAR.
    CapabilityOutOfBar { cfg_type: u8 },
    /// A BAR the transport needs is not implemented / not assigned.
    BarUnavailable { bar: u8 },
    /// Legacy transport requested but the function has no legacy interface.
    NoLegacyInterface,
    /// Modern transport requested but the function has no modern interface.
    NoModernInterface,
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        Error::Transport(e)
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::NotVirtio => write!(f, "not a supported virtio device"),
            TransportError::BadCapabilityList => write!(f, "malformed PCI capability list"),
            TransportError::MissingCapability { cfg_type } => {
                write!(f, "missing virtio capability (cfg_type {cfg_type})")
            }
            TransportError::CapabilityOutOfBar { cfg_type } => {
                write!(f, "capability cfg_type {cfg_type} lies outside its BAR")
            }
            TransportError::BarUnavailable { bar } => {
                write!(f, "BAR {bar} not implemented or not assigned")
            }
            TransportError::NoLegacyInterface => write!(f, "no legacy interface"),
            TransportError::NoModernInterface => write!(f, "no modern interface"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ResetTimeout => write!(f, "device did not complete reset"),
            Error::FeaturesNotAccepted { offered, requested } => write!(
                f,
                "device rejected features {requested:#x} (offered {offered:#x})"
            ),
            Error::MissingFeature { bit } => write!(f, "required feature bit {bit} not offered"),
            Error::DeviceNeedsReset => write!(f, "device needs reset"),
            Error::InvalidState => write!(f, "operation invalid in current device state"),
            Error::ConfigUnstable => write!(f, "config generation kept changing"),
            Error::ConfigOutOfRange { offset, len } => {
                write!(f, "config access {offset:#x}+{len} out of range")
            }
            Error::NoSuchQueue { queue } => write!(f, "queue {queue} does not exist"),
            Error::QueueNotReady { queue } => write!(f, "queue {queue} not set up"),
            Error::BadQueueSize { queue, size } => write!(f, "queue {queue}: bad size {size}"),
            Error::QueueFull => write!(f, "queue full"),
            Error::BadChain => write!(f, "invalid descriptor chain"),
            Error::UsedIdOutOfRange { queue, id } => {
                write!(f, "queue {queue}: device returned out-of-range id {id}")
            }
            Error::UsedIdNotInFlight { queue, id } => {
                write!(f, "queue {queue}: device returned id {id} not in flight")
            }
            Error::UsedLenTooLarge { queue, len, max } => {
                write!(f, "queue {queue}: device wrote {len} bytes, capacity {max}")
            }
            Error::UsedIdxJump {
                queue,
                used_idx,
                last_seen,
            } => write!(
                f,
                "queue {queue}: used idx jumped from {last_seen} to {used_idx}"
            ),
            Error::QueueBroken { queue } => write!(f, "queue {queue} broken by device fault"),
            Error::DmaAlloc => write!(f, "DMA allocation failed"),
            Error::Transport(t) => write!(f, "transport: {t}"),
            Error::VectorRejected { queue: Some(q) } => {
                write!(f, "MSI-X vector rejected for queue {q}")
            }
            Error::VectorRejected { queue: None } => write!(f, "MSI-X config vector rejected"),
            Error::DeviceProtocol { what } => write!(f, "device protocol violation: {what}"),
            Error::DeviceStatus { status } => write!(f, "device returned status {status}"),
            Error::Timeout => write!(f, "timed out"),
            Error::Unsupported => write!(f, "unsupported"),
        }
    }
}

pub type Result<T, E = Error> = core::result::Result<T, E>;
