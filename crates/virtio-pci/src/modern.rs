//! The modern (virtio 1.x) PCI transport: common configuration, notification, ISR and
//! device-specific regions found through vendor capabilities (virtio 1.2 §4.1.4).

use virtio_core::platform::{BarAccess, PciConfigSpace};
use virtio_core::transport::{IsrStatus, NO_VECTOR, RingAddresses, Transport};
use virtio_core::{
    DeviceStatus, DeviceType, Error, Features, Result, RingLayoutKind, TransportError,
};

use crate::caps::{BarRegion, MsixCapability, NotifyRegion, VirtioCapabilities, cfg_type};
use crate::{RESET_POLL_LIMIT, check_config_access};

/// Offsets in `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3).
pub mod common_cfg {
    pub const DEVICE_FEATURE_SELECT: u32 = 0x00;
    pub const DEVICE_FEATURE: u32 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u32 = 0x08;
    pub const DRIVER_FEATURE: u32 = 0x0C;
    pub const CONFIG_MSIX_VECTOR: u32 = 0x10;
    pub const NUM_QUEUES: u32 = 0x12;
    pub const DEVICE_STATUS: u32 = 0x14;
    pub const CONFIG_GENERATION: u32 = 0x15;
    pub const QUEUE_SELECT: u32 = 0x16;
    pub const QUEUE_SIZE: u32 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u32 = 0x1A;
    pub const QUEUE_ENABLE: u32 = 0x1C;
    pub const QUEUE_NOTIFY_OFF: u32 = 0x1E;
    pub const QUEUE_DESC: u32 = 0x20;
    pub const QUEUE_DRIVER: u32 = 0x28;
    pub const QUEUE_DEVICE: u32 = 0x30;
    /// virtio 1.2 additions (present when the structure is at least 0x3C bytes long).
    pub const QUEUE_NOTIFY_DATA: u32 = 0x38;
    pub const QUEUE_RESET: u32 = 0x3A;
}

/// Queues this transport can drive (indices at or above are refused at setup).
pub const MAX_QUEUES: u16 = 1024;
/// Queues whose notification register offset is computed once, at setup. Queues at or
/// above this index must have `queue_notify_off == index` (true of QEMU, VirtualBox and
/// every device seen), so the transport stays small without allocation.
pub const CACHED_NOTIFY_OFFS: u16 = 64;
/// Marks a queue not set up in the notify-register cache.
const NOT_SET_UP: u64 = u64::MAX;

/// Which queues are set up and where they notify.
#[derive(Clone)]
struct NotifyTable {
    /// Per cached queue: the BAR offset of its 16-bit notification register (§4.1.4.4:
    /// `cap.offset + queue_notify_off * notify_off_multiplier`), validated against the
    /// region at setup, so a notification (every kick) is one load and the write.
    at: [u64; CACHED_NOTIFY_OFFS as usize],
    set_up: [u64; (MAX_QUEUES / 64) as usize],
}

impl NotifyTable {
    const fn new() -> Self {
        NotifyTable {
            at: [NOT_SET_UP; CACHED_NOTIFY_OFFS as usize],
            set_up: [0; (MAX_QUEUES / 64) as usize],
        }
    }

    fn clear(&mut self) {
        *self = Self::new();
    }

    /// Records queue `index` as set up with `notify_off`; false if the register leaves the
    /// region or the offset cannot be represented.
    fn insert(&mut self, index: u16, notify_off: u16, notify: &NotifyRegion) -> bool {
        if index >= CACHED_NOTIFY_OFFS && notify_off != index {
            return false;
        }
        let Some(at) = register_at(notify, notify_off) else {
            return false;
        };
        let Some(word) = self.set_up.get_mut(usize::from(index / 64)) else {
            return false;
        };
        *word |= 1 << (index % 64);
        if let Some(slot) = self.at.get_mut(usize::from(index)) {
            *slot = at;
        }
        true
    }

    fn remove(&mut self, index: u16) {
        if let Some(word) = self.set_up.get_mut(usize::from(index / 64)) {
            *word &= !(1 << (index % 64));
        }
        if let Some(slot) = self.at.get_mut(usize::from(index)) {
            *slot = NOT_SET_UP;
        }
    }

    /// The BAR offset of set-up queue `index`'s notification register.
    #[inline]
    fn register(&self, index: u16, notify: &NotifyRegion) -> Option<u64> {
        if let Some(&at) = self.at.get(usize::from(index)) {
            return (at != NOT_SET_UP).then_some(at);
        }
        // Above the cache, set up only with `queue_notify_off == index`.
        let word = self.set_up.get(usize::from(index / 64))?;
        if word & (1 << (index % 64)) == 0 {
            return None;
        }
        register_at(notify, index)
    }
}

/// BAR offset of the notification register for `queue_notify_off`, if the 16-bit register
/// lies inside the notify region.
fn register_at(notify: &NotifyRegion, queue_notify_off: u16) -> Option<u64> {
    notify
        .register_offset(queue_notify_off)
        .and_then(|r| notify.region.offset_of(r, 2))
}

#[cold]
#[inline(never)]
fn notify_not_set_up(index: u16) {
    log::warn!("virtio-pci: notify for queue {index} which is not set up");
}

/// The validated regions a modern transport needs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ModernRegions {
    pub common: BarRegion,
    pub notify: NotifyRegion,
    pub isr: BarRegion,
    /// Absent for devices without device-specific configuration.
    pub device: Option<BarRegion>,
    /// Config-space offset of the PCI_CFG access capability, if any.
    pub pci_cfg: Option<u8>,
}

impl ModernRegions {
    /// The regions from a capability walk, or the most precise reason they are unusable.
    pub fn from_capabilities(
        caps: &VirtioCapabilities,
    ) -> core::result::Result<Self, TransportError> {
        if let Some(e) = caps.modern_error() {
            return Err(e);
        }
        match (caps.common, caps.notify, caps.isr) {
            (Some(common), Some(notify), Some(isr)) => Ok(ModernRegions {
                common,
                notify,
                isr,
                device: caps.device,
                pci_cfg: caps.pci_cfg,
            }),
            _ => Err(TransportError::NoModernInterface),
        }
    }
}

/// Virtio 1.x PCI transport.
pub struct ModernTransport<C: PciConfigSpace, B: BarAccess> {
    config: C,
    bars: B,
    device_type: DeviceType,
    regions: ModernRegions,
    msix: Option<MsixCapability>,
    msix_enabled: bool,
    /// Last features written with `set_driver_features` (to know whether RING_RESET may be used).
    driver_features: u64,
    /// Where each set-up queue notifies, validated against the notify region.
    notify_offs: NotifyTable,
}

impl<C: PciConfigSpace, B: BarAccess> ModernTransport<C, B> {
    /// Builds the transport from already validated regions (see [`crate::probe`], which walks
    /// the capabilities and identifies the device).
    pub fn new(config: C, bars: B, device_type: DeviceType, regions: ModernRegions) -> Self {
        let msix = MsixCapability::find(&config);
        ModernTransport {
            config,
            bars,
            device_type,
            regions,
            msix,
            msix_enabled: false,
            driver_features: 0,
            notify_offs: NotifyTable::new(),
        }
    }

    pub fn regions(&self) -> &ModernRegions {
        &self.regions
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
    /// Config-space offset of the PCI_CFG access capability, if the device has one.
    pub fn pci_cfg_cap_offset(&self) -> Option<u8> {
        self.regions.pci_cfg
    }

    /// Resets the device: writes 0 to `device_status`, then polls until it reads 0
    /// (virtio 1.2 §4.1.4.3.2), bounded by [`RESET_POLL_LIMIT`] reads.
    pub fn reset(&mut self) -> Result<()> {
        self.w8(common_cfg::DEVICE_STATUS, 0);
        self.notify_offs.clear();
        self.driver_features = 0;
        for _ in 0..RESET_POLL_LIMIT {
            if self.r8(common_cfg::DEVICE_STATUS) == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        log::error!("virtio-pci: device status did not clear after reset");
        Err(Error::ResetTimeout)
    }

    // Common-config register access. Offsets are constants below COMMON_CFG_MIN_LEN (or
    // checked against the region length), so `offset_of` only fails on a transport bug;
    // a failed read returns all-ones like a PCI master abort.
    fn common_at(&self, at: u32, width: u32) -> Option<u64> {
        let off = self.regions.common.offset_of(at, width);
        if off.is_none() {
            log::error!("virtio-pci: common cfg access {at:#x}+{width} outside the region");
        }
        off
    }
    fn r8(&self, at: u32) -> u8 {
        self.common_at(at, 1)
            .and_then(|o| self.bars.read8(self.regions.common.bar, o))
            .unwrap_or(u8::MAX)
    }
    fn r16(&self, at: u32) -> u16 {
        self.common_at(at, 2)
            .and_then(|o| self.bars.read16(self.regions.common.bar, o))
            .unwrap_or(u16::MAX)
    }
    fn r32(&self, at: u32) -> u32 {
        self.common_at(at, 4)
            .and_then(|o| self.bars.read32(self.regions.common.bar, o))
            .unwrap_or(u32::MAX)
    }
    fn w8(&self, at: u32, v: u8) {
        if let Some(o) = self.common_at(at, 1) {
            self.bars.write8(self.regions.common.bar, o, v);
        }
    }
    fn w16(&self, at: u32, v: u16) {
        if let Some(o) = self.common_at(at, 2) {
            self.bars.write16(self.regions.common.bar, o, v);
        }
    }
    fn w32(&self, at: u32, v: u32) {
        if let Some(o) = self.common_at(at, 4) {
            self.bars.write32(self.regions.common.bar, o, v);
        }
    }
    /// 64-bit queue address registers are written as two 32-bit halves, low first
    /// (virtio 1.2 §4.1.3.1: the driver may access 64-bit fields as two 32-bit accesses).
    fn w64(&self, at: u32, v: u64) {
        self.w32(at, v as u32);
        self.w32(at + 4, (v >> 32) as u32);
    }

    fn has_queue_reset(&self) -> bool {
        self.regions.common.length > common_cfg::QUEUE_RESET + 1
            && self.driver_features & Features::RING_RESET.bits() != 0
    }

    fn device_at(&self, offset: u32, width: u32) -> Result<(u8, u64)> {
        let region = self.regions.device.unwrap_or(BarRegion {
            bar: 0,
            offset: 0,
            length: 0,
        });
        check_config_access(offset, width, region.length)?;
        let at = region
            .offset_of(offset, width)
            .ok_or(Error::ConfigOutOfRange { offset, len: width })?;
        Ok((region.bar, at))
    }
}

impl<C: PciConfigSpace, B: BarAccess> Transport for ModernTransport<C, B> {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn ring_layout(&self) -> RingLayoutKind {
        RingLayoutKind::Modern
    }

    fn status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.r8(common_cfg::DEVICE_STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            self.notify_offs.clear();
        }
        self.w8(common_cfg::DEVICE_STATUS, status.bits());
    }

    fn device_features(&mut self) -> u64 {
        self.w32(common_cfg::DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(common_cfg::DEVICE_FEATURE);
        self.w32(common_cfg::DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(common_cfg::DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    fn set_driver_features(&mut self, features: u64) {
        self.w32(common_cfg::DRIVER_FEATURE_SELECT, 0);
        self.w32(common_cfg::DRIVER_FEATURE, features as u32);
        self.w32(common_cfg::DRIVER_FEATURE_SELECT, 1);
        self.w32(common_cfg::DRIVER_FEATURE, (features >> 32) as u32);
        self.driver_features = features;
    }

    fn config_generation(&self) -> u32 {
        u32::from(self.r8(common_cfg::CONFIG_GENERATION))
    }

    fn config_len(&self) -> u32 {
        self.regions.device.map_or(0, |d| d.length)
    }

    fn read_config8(&self, offset: u32) -> Result<u8> {
        let (bar, at) = self.device_at(offset, 1)?;
        self.bars
            .read8(bar, at)
            .ok_or(Error::ConfigOutOfRange { offset, len: 1 })
    }

    fn read_config16(&self, offset: u32) -> Result<u16> {
        let (bar, at) = self.device_at(offset, 2)?;
        self.bars
            .read16(bar, at)
            .ok_or(Error::ConfigOutOfRange { offset, len: 2 })
    }

    fn read_config32(&self, offset: u32) -> Result<u32> {
        let (bar, at) = self.device_at(offset, 4)?;
        self.bars
            .read32(bar, at)
            .ok_or(Error::ConfigOutOfRange { offset, len: 4 })
    }

    fn write_config8(&mut self, offset: u32, value: u8) -> Result<()> {
        let (bar, at) = self.device_at(offset, 1)?;
        self.bars.write8(bar, at, value);
        Ok(())
    }

    fn write_config16(&mut self, offset: u32, value: u16) -> Result<()> {
        let (bar, at) = self.device_at(offset, 2)?;
        self.bars.write16(bar, at, value);
        Ok(())
    }

    fn write_config32(&mut self, offset: u32, value: u32) -> Result<()> {
        let (bar, at) = self.device_at(offset, 4)?;
        self.bars.write32(bar, at, value);
        Ok(())
    }

    fn num_queues(&mut self) -> u16 {
        self.r16(common_cfg::NUM_QUEUES)
    }

    fn max_queue_size(&mut self, index: u16) -> u16 {
        if index >= self.num_queues() {
            return 0;
        }
        self.w16(common_cfg::QUEUE_SELECT, index);
        self.r16(common_cfg::QUEUE_SIZE)
    }

    fn queue_size_settable(&self) -> bool {
        true
    }

    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        addrs: RingAddresses,
        vector: u16,
    ) -> Result<()> {
        if index >= self.num_queues() || index >= MAX_QUEUES {
            return Err(Error::NoSuchQueue { queue: index });
        }
        self.w16(common_cfg::QUEUE_SELECT, index);
        let max = self.r16(common_cfg::QUEUE_SIZE);
        if max == 0 {
            return Err(Error::NoSuchQueue { queue: index });
        }
        if size == 0 || size > max || !size.is_power_of_two() || size > 32768 {
            return Err(Error::BadQueueSize { queue: index, size });
        }
        if self.r16(common_cfg::QUEUE_ENABLE) != 0 {
            log::warn!("virtio-pci: queue {index} already enabled before setup");
            return Err(Error::InvalidState);
        }
        let notify_off = self.r16(common_cfg::QUEUE_NOTIFY_OFF);
        if self.regions.notify.register_offset(notify_off).is_none() {
            log::error!(
                "virtio-pci: queue {index} notify_off {notify_off} × {} leaves the notify region ({:#x} bytes)",
                self.regions.notify.multiplier,
                self.regions.notify.region.length
            );
            return Err(Error::Transport(TransportError::CapabilityOutOfBar {
                cfg_type: cfg_type::NOTIFY,
            }));
        }
        if index >= CACHED_NOTIFY_OFFS && notify_off != index {
            log::error!(
                "virtio-pci: queue {index} has notify_off {notify_off}; above queue {CACHED_NOTIFY_OFFS} only index-equal offsets are supported"
            );
            return Err(Error::Unsupported);
        }
        self.w16(common_cfg::QUEUE_SIZE, size);
        self.w16(common_cfg::QUEUE_MSIX_VECTOR, vector);
        if vector != NO_VECTOR {
            let read_back = self.r16(common_cfg::QUEUE_MSIX_VECTOR);
            if read_back != vector {
                log::warn!(
                    "virtio-pci: queue {index} vector {vector} rejected (read back {read_back:#x})"
                );
                return Err(Error::VectorRejected { queue: Some(index) });
            }
        }
        self.w64(common_cfg::QUEUE_DESC, addrs.desc);
        self.w64(common_cfg::QUEUE_DRIVER, addrs.driver);
        self.w64(common_cfg::QUEUE_DEVICE, addrs.device);
        if !self
            .notify_offs
            .insert(index, notify_off, &self.regions.notify)
        {
            // Unreachable: index < MAX_QUEUES and representability were checked above.
            return Err(Error::Unsupported);
        }
        self.w16(common_cfg::QUEUE_ENABLE, 1);
        Ok(())
    }

    fn teardown_queue(&mut self, index: u16) {
        self.notify_offs.remove(index);
        if !self.has_queue_reset() {
            // Without RING_RESET a modern queue cannot be disabled on its own (queue_enable
            // only accepts 1); it stays live until the next device reset.
            log::debug!("virtio-pci: queue {index} stays enabled until device reset");
            return;
        }
        self.w16(common_cfg::QUEUE_SELECT, index);
        self.w16(common_cfg::QUEUE_RESET, 1);
        // §4.1.4.3.2: the reset is complete only once queue_reset reads back 0; the queue
        // is then disabled (queue_enable reads 0), as Linux also waits for
        // (`vp_modern_set_queue_reset`). Bounded: a device that never completes is logged.
        for _ in 0..RESET_POLL_LIMIT {
            if self.r16(common_cfg::QUEUE_RESET) == 0 && self.r16(common_cfg::QUEUE_ENABLE) == 0 {
                return;
            }
            core::hint::spin_loop();
        }
        log::warn!("virtio-pci: queue {index} reset did not complete");
    }

    fn set_config_vector(&mut self, vector: u16) -> Result<()> {
        self.w16(common_cfg::CONFIG_MSIX_VECTOR, vector);
        if vector != NO_VECTOR {
            let read_back = self.r16(common_cfg::CONFIG_MSIX_VECTOR);
            if read_back != vector {
                log::warn!(
                    "virtio-pci: config vector {vector} rejected (read back {read_back:#x})"
                );
                return Err(Error::VectorRejected { queue: None });
            }
        }
        Ok(())
    }

    fn set_msix_enabled(&mut self, enabled: bool) {
        // The modern register layout does not depend on MSI-X; remembered for diagnostics.
        self.msix_enabled = enabled;
    }

    #[inline]
    fn notify(&self, index: u16) {
        let notify = &self.regions.notify;
        match self.notify_offs.register(index, notify) {
            Some(at) => self.bars.write16(notify.region.bar, at, index),
            None => notify_not_set_up(index),
        }
    }

    fn read_isr(&self) -> IsrStatus {
        let isr = self.regions.isr;
        IsrStatus(self.bars.read8(isr.bar, u64::from(isr.offset)).unwrap_or(0))
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
