//! `virtio-pci`: the virtio PCI transport (virtio 1.2 §4.1).
//!
//! - [`ids`]: the one table of supported PCI IDs and the IOKit match strings generated from it;
//! - [`caps`]: the capability walk (virtio vendor capabilities, MSI-X);
//! - [`modern`]: [`ModernTransport`], virtio 1.x over the vendor capabilities;
//! - [`legacy`]: [`LegacyTransport`], virtio 0.9.5 over BAR0;
//! - [`PciTransport`] and [`probe`]: identify a function and pick its transport.
//!
//! Everything the device provides (capabilities, offsets, lengths, vectors, sizes) is
//! validated before use; failures are [`TransportError`]s / [`Error`]s, never panics.
#![no_std]
// The device is untrusted: no panicking construct may be reachable from device-provided
// values. Enforced by clippy for all non-test code (same rule as virtio-core).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod caps;
pub mod ids;
pub mod legacy;
pub mod modern;

use virtio_core::platform::{BarAccess, PciConfigSpace};
use virtio_core::transport::{IsrStatus, RingAddresses, Transport};
use virtio_core::{DeviceStatus, DeviceType, Error, Result, RingLayoutKind, TransportError};

pub use caps::{MsixCapability, VirtioCapabilities, find_virtio_capabilities};
pub use ids::{IOPCI_PRIMARY_MATCH_ALL, PciIdKind, PciIdentity, device_type, identify};
pub use legacy::LegacyTransport;
pub use modern::{ModernRegions, ModernTransport};

/// Status reads after writing 0 before a reset is declared failed. Hypervisors complete
/// reset synchronously (the first read sees 0); this only bounds a broken device.
#[cfg(not(fuzzing))]
pub const RESET_POLL_LIMIT: u32 = 1_000_000;
/// Under `cargo fuzz` (`--cfg fuzzing`) the same bound, lower: a fuzzed device whose status
/// never reads 0 is the common case there, and a million polls per input made the `pci`
/// target run at about a hundred inputs a second. Both outcomes (cleared in time, timed
/// out) stay reachable; the replay of the corpus in `cargo test` uses the real bound.
#[cfg(fuzzing)]
pub const RESET_POLL_LIMIT: u32 = 1_000;

/// Checks a device-config access: aligned to its width and inside `[0, len)`.
pub(crate) fn check_config_access(offset: u32, width: u32, len: u32) -> Result<()> {
    let end = offset.checked_add(width);
    if offset % width != 0 || end.is_none_or(|e| e > len) {
        log::warn!(
            "virtio-pci: config access {offset:#x}+{width} outside {len:#x} bytes (or misaligned)"
        );
        return Err(Error::ConfigOutOfRange { offset, len: width });
    }
    Ok(())
}

/// Sets Bus Master Enable again after a reset the device acknowledged
/// ([`Transport::restart_dma`]). False when it does not read back set: the function cannot
/// run its queues, so the caller fails the initialisation instead of waiting for requests
/// that would never complete.
pub(crate) fn restart_bus_master(config: &impl PciConfigSpace) -> bool {
    let on = caps::set_bus_master(config, true);
    if !on {
        log::warn!("virtio-pci: Bus Master Enable did not read back set");
    }
    on
}

/// Which interface the platform wants when a function offers both.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Preference {
    /// Modern only; fail if the function has no usable modern interface.
    Modern,
    /// Legacy only; fail if the function has no legacy interface.
    Legacy,
    /// Modern if usable, else legacy.
    #[default]
    Auto,
}

/// Identity of a PCI function as read from its config header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FunctionIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem_device: u16,
}

impl FunctionIds {
    pub fn read(config: &impl PciConfigSpace) -> Self {
        use caps::header;
        FunctionIds {
            vendor: config.read16(header::VENDOR_ID),
            device: config.read16(header::DEVICE_ID),
            revision: config.read8(header::REVISION_ID),
            subsystem_vendor: config.read16(header::SUBSYSTEM_VENDOR_ID),
            subsystem_device: config.read16(header::SUBSYSTEM_ID),
        }
    }

    pub fn identify(&self) -> Option<PciIdentity> {
        ids::identify(self.vendor, self.device, self.subsystem_device)
    }
}

/// A virtio PCI transport, modern or legacy.
///
/// The modern variant is a few hundred bytes (its notify-offset table); boxing it would need
/// `alloc`, and a transport is built once per device and lives inside it, so the size
/// difference is accepted.
#[allow(clippy::large_enum_variant)]
pub enum PciTransport<C: PciConfigSpace, B: BarAccess> {
    Modern(ModernTransport<C, B>),
    Legacy(LegacyTransport<C, B>),
}

/// Identifies the function and builds the transport the platform prefers.
///
/// Errors: [`TransportError::NotVirtio`] for a function that is not a virtio device of a type
/// this project knows; for [`Preference::Modern`] the precise reason the modern interface is
/// unusable ([`TransportError::NoModernInterface`] without vendor capabilities,
/// `BadCapabilityList`, `MissingCapability`, `CapabilityOutOfBar`, `BarUnavailable`); for
/// [`Preference::Legacy`] `NoLegacyInterface` (modern-only ID) or `BarUnavailable { bar: 0 }`.
/// With [`Preference::Auto`] a failing modern interface falls back to legacy; if both fail, the
/// modern error is returned unless the function simply has no modern interface.
pub fn probe<C: PciConfigSpace, B: BarAccess>(
    config: C,
    bars: B,
    preference: Preference,
) -> core::result::Result<PciTransport<C, B>, TransportError> {
    let ids = FunctionIds::read(&config);
    let Some(identity) = ids.identify() else {
        log::debug!(
            "virtio-pci: {:04x}:{:04x} is not a virtio function",
            ids.vendor,
            ids.device
        );
        return Err(TransportError::NotVirtio);
    };
    let Some(device_type) = identity.device_type() else {
        log::warn!(
            "virtio-pci: device {:04x} has unknown virtio type {}",
            ids.device,
            identity.type_id
        );
        return Err(TransportError::NotVirtio);
    };
    let legacy_possible = identity.kind == PciIdKind::Transitional;

    let modern = |config: C, bars: B| {
        let caps = find_virtio_capabilities(&config, &bars);
        match ModernRegions::from_capabilities(&caps) {
            Ok(regions) => Ok(ModernTransport::new(config, bars, device_type, regions)),
            Err(e) => Err((e, config, bars)),
        }
    };
    let legacy = |config: C, bars: B| {
        if !legacy_possible {
            return Err(TransportError::NoLegacyInterface);
        }
        LegacyTransport::new(config, bars, device_type)
    };

    let result = match preference {
        Preference::Modern => modern(config, bars)
            .map(PciTransport::Modern)
            .map_err(|(e, _, _)| e),
        Preference::Legacy => legacy(config, bars).map(PciTransport::Legacy),
        Preference::Auto => match modern(config, bars) {
            Ok(t) => Ok(PciTransport::Modern(t)),
            Err((modern_err, config, bars)) => match legacy(config, bars) {
                Ok(t) => {
                    if modern_err != TransportError::NoModernInterface {
                        log::warn!(
                            "virtio-pci: modern interface unusable ({modern_err}); using legacy"
                        );
                    }
                    Ok(PciTransport::Legacy(t))
                }
                Err(legacy_err) => Err(if modern_err == TransportError::NoModernInterface {
                    legacy_err
                } else {
                    modern_err
                }),
            },
        },
    };
    if let Ok(t) = &result {
        log::info!(
            "virtio-pci: {:04x}:{:04x} rev {} = virtio {} ({} transport)",
            ids.vendor,
            ids.device,
            ids.revision,
            device_type.name(),
            t.kind()
        );
    }
    result
}

/// Which transport a [`PciTransport`] is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Modern,
    Legacy,
}

impl core::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TransportKind::Modern => "modern",
            TransportKind::Legacy => "legacy",
        })
    }
}

impl<C: PciConfigSpace, B: BarAccess> PciTransport<C, B> {
    pub fn kind(&self) -> TransportKind {
        match self {
            Self::Modern(_) => TransportKind::Modern,
            Self::Legacy(_) => TransportKind::Legacy,
        }
    }

    /// Resets the device and waits (bounded) for the reset to complete.
    pub fn reset(&mut self) -> Result<()> {
        match self {
            Self::Modern(t) => t.reset(),
            Self::Legacy(t) => t.reset(),
        }
    }

    /// The function's MSI-X capability, if any.
    pub fn msix_capability(&self) -> Option<&MsixCapability> {
        match self {
            Self::Modern(t) => t.msix_capability(),
            Self::Legacy(t) => t.msix_capability(),
        }
    }

    pub fn config_space(&self) -> &C {
        match self {
            Self::Modern(t) => t.config_space(),
            Self::Legacy(t) => t.config_space(),
        }
    }

    pub fn bars(&self) -> &B {
        match self {
            Self::Modern(t) => t.bars(),
            Self::Legacy(t) => t.bars(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            PciTransport::Modern($t) => $e,
            PciTransport::Legacy($t) => $e,
        }
    };
}

impl<C: PciConfigSpace, B: BarAccess> Transport for PciTransport<C, B> {
    fn device_type(&self) -> DeviceType {
        delegate!(self, t => t.device_type())
    }
    fn ring_layout(&self) -> RingLayoutKind {
        delegate!(self, t => t.ring_layout())
    }
    fn status(&self) -> DeviceStatus {
        delegate!(self, t => t.status())
    }
    fn set_status(&mut self, status: DeviceStatus) {
        delegate!(self, t => t.set_status(status))
    }
    fn device_features(&mut self) -> u64 {
        delegate!(self, t => t.device_features())
    }
    fn set_driver_features(&mut self, features: u64) {
        delegate!(self, t => t.set_driver_features(features))
    }
    fn config_generation(&self) -> u32 {
        delegate!(self, t => t.config_generation())
    }
    fn config_len(&self) -> u32 {
        delegate!(self, t => t.config_len())
    }
    fn read_config8(&self, offset: u32) -> Result<u8> {
        delegate!(self, t => t.read_config8(offset))
    }
    fn read_config16(&self, offset: u32) -> Result<u16> {
        delegate!(self, t => t.read_config16(offset))
    }
    fn read_config32(&self, offset: u32) -> Result<u32> {
        delegate!(self, t => t.read_config32(offset))
    }
    fn write_config8(&mut self, offset: u32, value: u8) -> Result<()> {
        delegate!(self, t => t.write_config8(offset, value))
    }
    fn write_config16(&mut self, offset: u32, value: u16) -> Result<()> {
        delegate!(self, t => t.write_config16(offset, value))
    }
    fn write_config32(&mut self, offset: u32, value: u32) -> Result<()> {
        delegate!(self, t => t.write_config32(offset, value))
    }
    fn num_queues(&mut self) -> u16 {
        delegate!(self, t => t.num_queues())
    }
    fn max_queue_size(&mut self, index: u16) -> u16 {
        delegate!(self, t => t.max_queue_size(index))
    }
    fn queue_size_settable(&self) -> bool {
        delegate!(self, t => t.queue_size_settable())
    }
    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        addrs: RingAddresses,
        vector: u16,
    ) -> Result<()> {
        delegate!(self, t => t.setup_queue(index, size, addrs, vector))
    }
    fn teardown_queue(&mut self, index: u16) {
        delegate!(self, t => t.teardown_queue(index))
    }
    fn set_config_vector(&mut self, vector: u16) -> Result<()> {
        delegate!(self, t => t.set_config_vector(vector))
    }
    fn set_msix_enabled(&mut self, enabled: bool) {
        delegate!(self, t => t.set_msix_enabled(enabled))
    }
    #[inline]
    fn notify(&self, index: u16) {
        delegate!(self, t => t.notify(index))
    }
    fn read_isr(&self) -> IsrStatus {
        delegate!(self, t => t.read_isr())
    }
    fn stop_dma(&mut self) -> bool {
        delegate!(self, t => t.stop_dma())
    }
    fn restart_dma(&mut self) -> bool {
        delegate!(self, t => t.restart_dma())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_access_checks() {
        assert!(check_config_access(0, 4, 4).is_ok());
        assert!(check_config_access(4, 4, 4).is_err());
        assert!(check_config_access(2, 4, 8).is_err());
        assert!(check_config_access(u32::MAX, 1, u32::MAX).is_err());
        assert!(check_config_access(6, 2, 8).is_ok());
    }
}
