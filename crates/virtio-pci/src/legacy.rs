//! The legacy (virtio 0.9.5) PCI transport: fixed registers at the start of BAR0 (virtio 1.2
//! §4.1.4.10 "Legacy Interfaces: A Note on PCI Device Layout").
//!
//! Legacy device config is guest-endian (little-endian on every platform this stack
//! targets, x86_64 and arm64), so the little-endian `BarAccess` reads are correct as is.

use virtio_core::platform::{BarAccess, PciConfigSpace};
use virtio_core::transport::{IsrStatus, NO_VECTOR, RingAddresses, Transport};
use virtio_core::{DeviceStatus, DeviceType, Error, Result, RingLayoutKind, TransportError};

use crate::caps::MsixCapability;
use crate::{RESET_POLL_LIMIT, check_config_access};

/// BAR0 register offsets.
pub mod regs {
    pub const DEVICE_FEATURES: u64 = 0;
    pub const GUEST_FEATURES: u64 = 4;
    pub const QUEUE_PFN: u64 = 8;
    pub const QUEUE_SIZE: u64 = 12;
    pub const QUEUE_SELECT: u64 = 14;
    pub const QUEUE_NOTIFY: u64 = 16;
    pub const STATUS: u64 = 18;
    pub const ISR: u64 = 19;
    /// Only present while MSI-X is enabled.
    pub const CONFIG_VECTOR: u64 = 20;
    /// Only present while MSI-X is enabled.
    pub const QUEUE_VECTOR: u64 = 22;
    /// Device config offset without MSI-X.
    pub const CONFIG_NO_MSIX: u64 = 20;
    /// Device config offset with MSI-X enabled.
    pub const CONFIG_MSIX: u64 = 24;
}

/// Legacy queue PFNs are in 4096-byte units and the used ring is aligned to 4096.
pub const LEGACY_ALIGN: u64 = 4096;
/// Upper bound when probing the number of queues (virtio-serial with 31 ports has 64).
pub const MAX_PROBED_QUEUES: u16 = 1024;

/// The legacy single-area ring layout for `size` entries starting at `desc`:
/// (driver area, device area) addresses (virtio 1.2 §2.7.2 legacy interface).
pub fn legacy_ring_layout(desc: u64, size: u16) -> Option<(u64, u64)> {
    let n = u64::from(size);
    let driver = desc.checked_add(16 * n)?;
    // flags + idx + ring[N] + used_event
    let driver_end = driver.checked_add(6 + 2 * n)?;
    let device = driver_end.checked_next_multiple_of(LEGACY_ALIGN)?;
    Some((driver, device))
}

/// Total bytes of a legacy ring of `size` entries (used ring includes `avail_event`).
pub fn legacy_ring_bytes(size: u16) -> u64 {
    let n = u64::from(size);
    let used_start = (16 * n + 6 + 2 * n).next_multiple_of(LEGACY_ALIGN);
    used_start + 6 + 8 * n
}

/// Virtio 0.9.5 legacy PCI transport over BAR0 (I/O or memory).
pub struct LegacyTransport<C: PciConfigSpace, B: BarAccess> {
    config: C,
    bars: B,
    device_type: DeviceType,
    bar0_len: u64,
    msix: Option<MsixCapability>,
    msix_enabled: bool,
}

impl<C: PciConfigSpace, B: BarAccess> LegacyTransport<C, B> {
    /// Builds the transport; fails if BAR0 is not implemented or too short for the registers.
    pub fn new(
        config: C,
        bars: B,
        device_type: DeviceType,
    ) -> core::result::Result<Self, TransportError> {
        let bar0_len = bars
            .bar_len(0)
            .ok_or(TransportError::BarUnavailable { bar: 0 })?;
        if bar0_len < regs::CONFIG_NO_MSIX {
            log::warn!("virtio-pci: legacy BAR0 only {bar0_len} bytes");
            return Err(TransportError::BarUnavailable { bar: 0 });
        }
        let msix = MsixCapability::find(&config);
        Ok(LegacyTransport {
            config,
            bars,
            device_type,
            bar0_len,
            msix,
            msix_enabled: false,
        })
    }

    pub fn msix_capability(&self) -> Option<&MsixCapability> {
        self.msix.as_ref()
    }
    pub fn config_space(&self) -> &C {
        &self.config
    }
    pub fn bars(&self) -> &B {
        &self.bars
    }
    pub fn msix_enabled(&self) -> bool {
        self.msix_enabled
    }

    /// Offset of the device config in BAR0: 24 with MSI-X enabled, 20 without.
    pub fn config_offset(&self) -> u64 {
        if self.msix_enabled {
            regs::CONFIG_MSIX
        } else {
            regs::CONFIG_NO_MSIX
        }
    }

    /// Resets the device (status 0), then polls until status reads 0, bounded.
    pub fn reset(&mut self) -> Result<()> {
        self.w8(regs::STATUS, 0);
        for _ in 0..RESET_POLL_LIMIT {
            if self.r8(regs::STATUS) == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        log::error!("virtio-pci: legacy device status did not clear after reset");
        Err(Error::ResetTimeout)
    }

    fn r8(&self, at: u64) -> u8 {
        self.bars.read8(0, at).unwrap_or(u8::MAX)
    }
    fn r16(&self, at: u64) -> u16 {
        self.bars.read16(0, at).unwrap_or(u16::MAX)
    }
    fn r32(&self, at: u64) -> u32 {
        self.bars.read32(0, at).unwrap_or(u32::MAX)
    }
    fn w8(&self, at: u64, v: u8) {
        self.bars.write8(0, at, v);
    }
    fn w16(&self, at: u64, v: u16) {
        self.bars.write16(0, at, v);
    }
    fn w32(&self, at: u64, v: u32) {
        self.bars.write32(0, at, v);
    }

    fn config_at(&self, offset: u32, width: u32) -> Result<u64> {
        check_config_access(offset, width, self.config_len())?;
        Ok(self.config_offset() + u64::from(offset))
    }

    fn queue_size_of(&self, index: u16) -> u16 {
        self.w16(regs::QUEUE_SELECT, index);
        self.r16(regs::QUEUE_SIZE)
    }
}

impl<C: PciConfigSpace, B: BarAccess> Transport for LegacyTransport<C, B> {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn ring_layout(&self) -> RingLayoutKind {
        RingLayoutKind::Legacy
    }

    fn status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.r8(regs::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.w8(regs::STATUS, status.bits());
    }

    fn device_features(&mut self) -> u64 {
        u64::from(self.r32(regs::DEVICE_FEATURES))
    }

    fn set_driver_features(&mut self, features: u64) {
        if features >> 32 != 0 {
            log::error!(
                "virtio-pci: legacy transport cannot accept feature bits {:#x}; not written",
                features & !0xFFFF_FFFF
            );
        }
        self.w32(regs::GUEST_FEATURES, features as u32);
    }

    fn config_generation(&self) -> u32 {
        0
    }

    fn config_len(&self) -> u32 {
        u32::try_from(self.bar0_len.saturating_sub(self.config_offset())).unwrap_or(u32::MAX)
    }

    fn read_config8(&self, offset: u32) -> Result<u8> {
        let at = self.config_at(offset, 1)?;
        self.bars
            .read8(0, at)
            .ok_or(Error::ConfigOutOfRange { offset, len: 1 })
    }

    fn read_config16(&self, offset: u32) -> Result<u16> {
        let at = self.config_at(offset, 2)?;
        self.bars
            .read16(0, at)
            .ok_or(Error::ConfigOutOfRange { offset, len: 2 })
    }

    fn read_config32(&self, offset: u32) -> Result<u32> {
        let at = self.config_at(offset, 4)?;
        self.bars
            .read32(0, at)
            .ok_or(Error::ConfigOutOfRange { offset, len: 4 })
    }

    fn write_config8(&mut self, offset: u32, value: u8) -> Result<()> {
        let at = self.config_at(offset, 1)?;
        self.w8(at, value);
        Ok(())
    }

    fn write_config16(&mut self, offset: u32, value: u16) -> Result<()> {
        let at = self.config_at(offset, 2)?;
        self.w16(at, value);
        Ok(())
    }

    fn write_config32(&mut self, offset: u32, value: u32) -> Result<()> {
        let at = self.config_at(offset, 4)?;
        self.w32(at, value);
        Ok(())
    }

    fn num_queues(&mut self) -> u16 {
        (0..MAX_PROBED_QUEUES)
            .find(|&i| self.queue_size_of(i) == 0)
            .unwrap_or(MAX_PROBED_QUEUES)
    }

    fn max_queue_size(&mut self, index: u16) -> u16 {
        self.queue_size_of(index)
    }

    fn queue_size_settable(&self) -> bool {
        false
    }

    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        addrs: RingAddresses,
        vector: u16,
    ) -> Result<()> {
        let max = self.queue_size_of(index);
        if max == 0 {
            return Err(Error::NoSuchQueue { queue: index });
        }
        if size != max {
            return Err(Error::BadQueueSize { queue: index, size });
        }
        if self.r32(regs::QUEUE_PFN) != 0 {
            log::warn!("virtio-pci: legacy queue {index} already active");
            return Err(Error::InvalidState);
        }
        // The legacy interface takes one page frame number: the three areas must be laid
        // out contiguously with the used ring 4096-aligned, starting on a 4096 boundary.
        let layout = legacy_ring_layout(addrs.desc, size);
        let pfn = u32::try_from(addrs.desc / LEGACY_ALIGN).ok();
        let ok = addrs.desc % LEGACY_ALIGN == 0
            && layout == Some((addrs.driver, addrs.device))
            && pfn.is_some_and(|p| p != 0);
        let Some(pfn) = pfn.filter(|_| ok) else {
            log::error!(
                "virtio-pci: legacy queue {index}: ring {:#x}/{:#x}/{:#x} is not the 4096-aligned legacy layout",
                addrs.desc,
                addrs.driver,
                addrs.device
            );
            return Err(Error::Unsupported);
        };
        if self.msix_enabled {
            self.w16(regs::QUEUE_VECTOR, vector);
            if vector != NO_VECTOR {
                let read_back = self.r16(regs::QUEUE_VECTOR);
                if read_back != vector {
                    log::warn!(
                        "virtio-pci: legacy queue {index} vector {vector} rejected ({read_back:#x})"
                    );
                    return Err(Error::VectorRejected { queue: Some(index) });
                }
            }
        } else if vector != NO_VECTOR {
            log::warn!("virtio-pci: legacy queue {index}: vector {vector} without MSI-X enabled");
            return Err(Error::VectorRejected { queue: Some(index) });
        }
        self.w32(regs::QUEUE_PFN, pfn);
        Ok(())
    }

    /// Writes PFN 0 (and NO_VECTOR). Note that QEMU's legacy interface treats a zero PFN as
    /// a reset of the **whole device** (`virtio_ioport_write`), as Linux relies on when it
    /// deletes queues after a reset: only call this while tearing the device down.
    fn teardown_queue(&mut self, index: u16) {
        self.w16(regs::QUEUE_SELECT, index);
        if self.msix_enabled {
            self.w16(regs::QUEUE_VECTOR, NO_VECTOR);
        }
        self.w32(regs::QUEUE_PFN, 0);
    }

    fn set_config_vector(&mut self, vector: u16) -> Result<()> {
        if !self.msix_enabled {
            return if vector == NO_VECTOR {
                Ok(())
            } else {
                log::warn!("virtio-pci: legacy config vector {vector} without MSI-X enabled");
                Err(Error::VectorRejected { queue: None })
            };
        }
        self.w16(regs::CONFIG_VECTOR, vector);
        if vector != NO_VECTOR {
            let read_back = self.r16(regs::CONFIG_VECTOR);
            if read_back != vector {
                log::warn!("virtio-pci: legacy config vector {vector} rejected ({read_back:#x})");
                return Err(Error::VectorRejected { queue: None });
            }
        }
        Ok(())
    }

    fn set_msix_enabled(&mut self, enabled: bool) {
        // §4.1.4.10 (legacy layout): with MSI-X enabled, `config_msix_vector` and
        // `queue_msix_vector` occupy BAR0 bytes 20..24 and the device config moves to 24.
        // `new` only asks for the 20 bytes of the layout without MSI-X, so a shorter BAR0
        // keeps the MSI-X layout off: vectors are refused (the bus falls back to INTx)
        // instead of being written past the end of the BAR.
        self.msix_enabled = enabled && self.bar0_len >= regs::CONFIG_MSIX;
        if enabled && !self.msix_enabled {
            log::warn!(
                "virtio-pci: legacy BAR0 of {} bytes has no room for the MSI-X vector registers",
                self.bar0_len
            );
        }
    }

    fn notify(&self, index: u16) {
        self.w16(regs::QUEUE_NOTIFY, index);
    }

    fn read_isr(&self) -> IsrStatus {
        IsrStatus(self.bars.read8(0, regs::ISR).unwrap_or(0))
    }
    /// Bus Master Enable off, read back ([`crate::caps::set_bus_master`]).
    fn stop_dma(&mut self) -> bool {
        crate::caps::set_bus_master(&self.config, false)
    }
    /// Bus Master Enable on, read back ([`crate::restart_bus_master`]).
    fn restart_dma(&mut self) -> bool {
        crate::restart_bus_master(&self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_layout_sizes() {
        // N = 256: desc 4096, avail 6 + 512 -> used at 8192, used 6 + 2048.
        assert_eq!(legacy_ring_layout(0x10000, 256), Some((0x11000, 0x12000)));
        assert_eq!(legacy_ring_bytes(256), 8192 + 6 + 2048);
        // N = 512 (the historical under-allocation case): used ring is 6 + 8·512 bytes.
        assert_eq!(legacy_ring_bytes(512), 12288 + 4102);
        assert_eq!(legacy_ring_layout(u64::MAX - 100, 4), None);
    }
}
