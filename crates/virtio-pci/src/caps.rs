//! PCI capability list walk, virtio vendor capabilities (virtio 1.2 §4.1.4) and the MSI-X
//! capability (PCI Local Bus 3.0 §6.8.2).
//!
//! Everything read here comes from the device and is validated before use: capability
//! pointers stay inside the 256-byte config space and the walk is bounded and loop-checked;
//! every region a vendor capability names must be an implemented BAR and fit inside it.

use virtio_core::TransportError;
use virtio_core::platform::{BarAccess, PciConfigSpace};
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Standard config-space header offsets used here.
pub mod header {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const REVISION_ID: u16 = 0x08;
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2C;
    pub const SUBSYSTEM_ID: u16 = 0x2E;
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    pub const INTERRUPT_LINE: u16 = 0x3C;
    pub const INTERRUPT_PIN: u16 = 0x3D;

    /// Status register: the function has a capability list.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Command register bits.
    pub const COMMAND_IO: u16 = 1 << 0;
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
}

/// Capability ID of vendor-specific capabilities (virtio's).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// First offset after the standard header: capabilities live in 0x40..0x100.
const CAP_AREA_START: u8 = 0x40;
/// At most (256 - 64) / 4 capabilities fit in config space; a longer walk is a loop.
const MAX_CAPS: usize = 48;

/// `cfg_type` values of virtio vendor capabilities (virtio 1.2 §4.1.4).
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
    pub const SHARED_MEMORY: u8 = 8;
    pub const VENDOR: u8 = 9;
}

/// Minimum length of the common configuration structure (up to and including
/// `queue_device`, virtio 1.0 layout).
pub const COMMON_CFG_MIN_LEN: u32 = 0x38;
/// Minimum ISR region length.
pub const ISR_MIN_LEN: u32 = 1;
/// Minimum notify region length (one 16-bit notification register).
pub const NOTIFY_MIN_LEN: u32 = 2;

/// `struct virtio_pci_cap` (virtio 1.2 §4.1.4), as it sits in config space.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct VirtioPciCap {
    pub cap_vndr: u8,
    pub cap_next: u8,
    pub cap_len: u8,
    pub cfg_type: u8,
    pub bar: u8,
    pub id: u8,
    pub padding: [u8; 2],
    pub offset: U32,
    pub length: U32,
}

/// `struct virtio_pci_notify_cap`: the generic cap followed by `notify_off_multiplier`.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct VirtioPciNotifyCap {
    pub cap: VirtioPciCap,
    pub notify_off_multiplier: U32,
}

/// `struct virtio_pci_cfg_cap`: the generic cap followed by the 4-byte data window.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct VirtioPciCfgCap {
    pub cap: VirtioPciCap,
    pub pci_cfg_data: [u8; 4],
}

const VIRTIO_CAP_LEN: u8 = 16;
const NOTIFY_CAP_LEN: u8 = 20;
const PCI_CFG_CAP_LEN: u8 = 20;

/// One entry of the capability list.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RawCapability {
    /// Offset of the capability in config space (0x40..=0xFC, dword aligned).
    pub offset: u8,
    /// Capability ID.
    pub id: u8,
}

/// Bounded, loop-checked walk over the standard capability list.
///
/// Iteration ends at the end of the list or at the first malformed pointer (outside
/// 0x40..0x100, or a loop); [`Capabilities::error`] then tells which.
pub struct Capabilities<'a, C: PciConfigSpace> {
    config: &'a C,
    next: u8,
    visited: [u64; 4],
    steps: usize,
    error: Option<TransportError>,
}

impl<'a, C: PciConfigSpace> Capabilities<'a, C> {
    pub fn new(config: &'a C) -> Self {
        let has_list = config.read16(header::STATUS) & header::STATUS_CAP_LIST != 0;
        // The bottom two bits of every capability pointer are reserved (PCI 3.0 §6.7).
        let next = if has_list {
            config.read8(header::CAPABILITIES_POINTER) & 0xFC
        } else {
            0
        };
        Capabilities {
            config,
            next,
            visited: [0; 4],
            steps: 0,
            error: None,
        }
    }

    /// Why the walk stopped early, if it did.
    pub fn error(&self) -> Option<TransportError> {
        self.error
    }

    fn seen(&mut self, offset: u8) -> bool {
        let word = usize::from(offset / 64);
        let bit = 1u64 << (offset % 64);
        match self.visited.get_mut(word) {
            Some(w) => {
                let seen = *w & bit != 0;
                *w |= bit;
                seen
            }
            None => true,
        }
    }
}

impl<C: PciConfigSpace> Iterator for Capabilities<'_, C> {
    type Item = RawCapability;

    fn next(&mut self) -> Option<RawCapability> {
        let offset = self.next;
        if offset == 0 || self.error.is_some() {
            return None;
        }
        if offset < CAP_AREA_START {
            log::warn!("virtio-pci: capability pointer {offset:#x} inside the config header");
            self.error = Some(TransportError::BadCapabilityList);
            return None;
        }
        self.steps += 1;
        if self.steps > MAX_CAPS || self.seen(offset) {
            log::warn!("virtio-pci: capability list loops at {offset:#x}");
            self.error = Some(TransportError::BadCapabilityList);
            return None;
        }
        // offset <= 0xFC, so both bytes are inside config space.
        let id = self.config.read8(u16::from(offset));
        self.next = self.config.read8(u16::from(offset) + 1) & 0xFC;
        Some(RawCapability { offset, id })
    }
}

/// Reads `N` bytes of config space at `offset` with dword accesses (capabilities are dword
/// aligned); `None` if they would leave config space.
fn read_config_bytes<const N: usize>(config: &impl PciConfigSpace, offset: u8) -> Option<[u8; N]> {
    let start = usize::from(offset);
    if start % 4 != 0 || start + N > 256 || N % 4 != 0 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
        let at = u16::try_from(start + i * 4).ok()?;
        chunk.copy_from_slice(&config.read32(at).to_le_bytes());
    }
    Some(out)
}

/// A region of a BAR named by a capability, validated to fit inside the BAR.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

impl BarRegion {
    /// BAR offset of `at` bytes into the region, if an access of `width` bytes there stays
    /// inside the region.
    pub fn offset_of(&self, at: u32, width: u32) -> Option<u64> {
        let end = at.checked_add(width)?;
        (end <= self.length).then(|| u64::from(self.offset) + u64::from(at))
    }
}

/// The notification region plus its multiplier.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NotifyRegion {
    pub region: BarRegion,
    /// `notify_off_multiplier`; 0 means every queue notifies at the region's start.
    pub multiplier: u32,
}

impl NotifyRegion {
    /// Offset within the region of queue notification register for `queue_notify_off`,
    /// if the 16-bit register lies inside the region.
    pub fn register_offset(&self, queue_notify_off: u16) -> Option<u32> {
        let at = u32::from(queue_notify_off).checked_mul(self.multiplier)?;
        self.region.offset_of(at, 2)?;
        Some(at)
    }
}

/// The virtio vendor capabilities of a function, each the first valid one of its type.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioCapabilities {
    pub common: Option<BarRegion>,
    pub notify: Option<NotifyRegion>,
    pub isr: Option<BarRegion>,
    pub device: Option<BarRegion>,
    /// Config-space offset of the first `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pub pci_cfg: Option<u8>,
    /// Number of virtio vendor capabilities seen (valid or not).
    pub vendor_caps_seen: u8,
    /// Why the list walk stopped early, if it did.
    pub list_error: Option<TransportError>,
    /// First rejection reason per `cfg_type` 1..=4 (index = cfg_type - 1), kept so a missing
    /// capability can be reported precisely.
    pub rejected: [Option<TransportError>; 4],
}

impl VirtioCapabilities {
    /// Whether the three capabilities a modern transport cannot work without are present.
    pub fn has_required(&self) -> bool {
        self.common.is_some() && self.notify.is_some() && self.isr.is_some()
    }

    /// The most precise reason why the modern interface is unusable, or `None` if it is usable.
    pub fn modern_error(&self) -> Option<TransportError> {
        if self.has_required() {
            return None;
        }
        if self.vendor_caps_seen == 0 {
            return Some(self.list_error.unwrap_or(TransportError::NoModernInterface));
        }
        let missing = if self.common.is_none() {
            cfg_type::COMMON
        } else if self.notify.is_none() {
            cfg_type::NOTIFY
        } else {
            cfg_type::ISR
        };
        let rejected = self
            .rejected
            .get(usize::from(missing - 1))
            .copied()
            .flatten();
        Some(
            rejected
                .or(self.list_error)
                .unwrap_or(TransportError::MissingCapability { cfg_type: missing }),
        )
    }

    fn note_rejected(&mut self, ty: u8, e: TransportError) {
        if let Some(slot) = self.rejected.get_mut(usize::from(ty.wrapping_sub(1))) {
            slot.get_or_insert(e);
        }
    }
}

/// Validates that `[offset, offset + length)` lies within an implemented BAR 0..=5.
fn validate_region(
    bars: &impl BarAccess,
    ty: u8,
    bar: u8,
    offset: u32,
    length: u32,
    min_len: u32,
) -> Result<BarRegion, TransportError> {
    if bar > 5 {
        return Err(TransportError::CapabilityOutOfBar { cfg_type: ty });
    }
    let bar_len = bars
        .bar_len(bar)
        .ok_or(TransportError::BarUnavailable { bar })?;
    if length < min_len {
        return Err(TransportError::CapabilityOutOfBar { cfg_type: ty });
    }
    let end = u64::from(offset) + u64::from(length);
    if end > bar_len {
        return Err(TransportError::CapabilityOutOfBar { cfg_type: ty });
    }
    Ok(BarRegion {
        bar,
        offset,
        length,
    })
}

/// Walks the capability list and collects the first valid virtio capability of each type.
/// Invalid ones are logged and skipped, so a later capability of the same type can win.
pub fn find_virtio_capabilities(
    config: &impl PciConfigSpace,
    bars: &impl BarAccess,
) -> VirtioCapabilities {
    let mut found = VirtioCapabilities::default();
    let mut walk = Capabilities::new(config);
    for raw in walk.by_ref() {
        if raw.id != CAP_ID_VENDOR {
            continue;
        }
        found.vendor_caps_seen = found.vendor_caps_seen.saturating_add(1);
        let Some(bytes) = read_config_bytes::<20>(config, raw.offset)
            .or_else(|| read_config_bytes::<16>(config, raw.offset).map(|b| pad20(&b)))
        else {
            log::warn!(
                "virtio-pci: vendor capability at {:#x} leaves config space",
                raw.offset
            );
            continue;
        };
        let Ok(ncap) = VirtioPciNotifyCap::read_from_bytes(&bytes[..]) else {
            continue;
        };
        let cap = ncap.cap;
        let ty = cap.cfg_type;
        let cap_fits = |min: u8| {
            cap.cap_len >= min && usize::from(raw.offset) + usize::from(cap.cap_len) <= 256
        };
        let (bar, offset, length) = (cap.bar, cap.offset.get(), cap.length.get());
        let result = match ty {
            cfg_type::COMMON | cfg_type::ISR | cfg_type::DEVICE | cfg_type::NOTIFY => {
                let min_cap = if ty == cfg_type::NOTIFY {
                    NOTIFY_CAP_LEN
                } else {
                    VIRTIO_CAP_LEN
                };
                if !cap_fits(min_cap) {
                    Err(TransportError::BadCapabilityList)
                } else {
                    let min_len = match ty {
                        cfg_type::COMMON => COMMON_CFG_MIN_LEN,
                        cfg_type::ISR => ISR_MIN_LEN,
                        cfg_type::NOTIFY => NOTIFY_MIN_LEN,
                        _ => 0,
                    };
                    validate_region(bars, ty, bar, offset, length, min_len)
                }
            }
            cfg_type::PCI_CFG => {
                if cap_fits(PCI_CFG_CAP_LEN) {
                    found.pci_cfg.get_or_insert(raw.offset);
                } else {
                    log::warn!(
                        "virtio-pci: PCI_CFG capability at {:#x} too short",
                        raw.offset
                    );
                }
                continue;
            }
            other => {
                log::debug!(
                    "virtio-pci: ignoring vendor capability cfg_type {other} at {:#x}",
                    raw.offset
                );
                continue;
            }
        };
        let region = match result {
            Ok(region) => region,
            Err(e) => {
                log::warn!(
                    "virtio-pci: skipping cfg_type {ty} capability at {:#x} (bar {bar}, offset {offset:#x}, length {length:#x}): {e}",
                    raw.offset
                );
                found.note_rejected(ty, e);
                continue;
            }
        };
        match ty {
            cfg_type::COMMON => {
                found.common.get_or_insert(region);
            }
            cfg_type::ISR => {
                found.isr.get_or_insert(region);
            }
            cfg_type::DEVICE => {
                found.device.get_or_insert(region);
            }
            _ => {
                let multiplier = ncap.notify_off_multiplier.get();
                found
                    .notify
                    .get_or_insert(NotifyRegion { region, multiplier });
            }
        }
    }
    found.list_error = walk.error();
    found
}

fn pad20(b: &[u8; 16]) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..16].copy_from_slice(b);
    out
}

/// Finds the first capability with ID `id`; its config-space offset.
pub fn find_capability(config: &impl PciConfigSpace, id: u8) -> Option<u8> {
    Capabilities::new(config)
        .find(|c| c.id == id)
        .map(|c| c.offset)
}

/// The MSI-X capability, for platforms that program MSI-X themselves (the bare-metal guest;
/// IOKit does it for the kexts).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Config-space offset of the capability.
    pub cap_offset: u8,
    /// Number of table entries (1..=2048).
    pub table_size: u16,
    /// BAR holding the table (0..=5).
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    pub pba_offset: u32,
    /// MSI-X Enable as read at parse time.
    pub enabled: bool,
    /// Function Mask as read at parse time.
    pub function_masked: bool,
}

/// Message Control bits.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_CONTROL_TABLE_SIZE: u16 = 0x7FF;
/// Size of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u32 = 16;

impl MsixCapability {
    /// Parses the first MSI-X capability. `None` if absent or malformed (BIR 6/7).
    pub fn find(config: &impl PciConfigSpace) -> Option<Self> {
        let off = find_capability(config, CAP_ID_MSIX)?;
        if usize::from(off) + 12 > 256 {
            return None;
        }
        let base = u16::from(off);
        let control = config.read16(base + 2);
        let table = config.read32(base + 4);
        let pba = config.read32(base + 8);
        let table_bar = (table & 7) as u8;
        let pba_bar = (pba & 7) as u8;
        if table_bar > 5 || pba_bar > 5 {
            log::warn!("virtio-pci: MSI-X capability names BIR {table_bar}/{pba_bar}");
            return None;
        }
        Some(MsixCapability {
            cap_offset: off,
            table_size: (control & MSIX_CONTROL_TABLE_SIZE) + 1,
            table_bar,
            table_offset: table & !7,
            pba_bar,
            pba_offset: pba & !7,
            enabled: control & MSIX_CONTROL_ENABLE != 0,
            function_masked: control & MSIX_CONTROL_FUNCTION_MASK != 0,
        })
    }

    fn update_control(&self, config: &impl PciConfigSpace, bit: u16, set: bool) {
        let at = u16::from(self.cap_offset) + 2;
        let control = config.read16(at);
        let new = if set { control | bit } else { control & !bit };
        config.write16(at, new);
    }

    /// Sets or clears MSI-X Enable.
    pub fn set_enabled(&self, config: &impl PciConfigSpace, enabled: bool) {
        self.update_control(config, MSIX_CONTROL_ENABLE, enabled);
    }

    /// Sets or clears Function Mask (masks all vectors while set).
    pub fn set_function_mask(&self, config: &impl PciConfigSpace, masked: bool) {
        self.update_control(config, MSIX_CONTROL_FUNCTION_MASK, masked);
    }

    /// Reads the live MSI-X Enable bit.
    pub fn is_enabled(&self, config: &impl PciConfigSpace) -> bool {
        config.read16(u16::from(self.cap_offset) + 2) & MSIX_CONTROL_ENABLE != 0
    }

    /// BAR offset of table entry `index`, if it exists and fits inside the table BAR.
    pub fn entry_offset(&self, bars: &impl BarAccess, index: u16) -> Option<u64> {
        if index >= self.table_size {
            return None;
        }
        let at = u64::from(self.table_offset) + u64::from(index) * u64::from(MSIX_ENTRY_SIZE);
        let bar_len = bars.bar_len(self.table_bar)?;
        (at + u64::from(MSIX_ENTRY_SIZE) <= bar_len).then_some(at)
    }

    /// Programs table entry `index` (address, data, unmasked). Returns false if the entry
    /// does not exist.
    pub fn program_entry(
        &self,
        bars: &impl BarAccess,
        index: u16,
        address: u64,
        data: u32,
    ) -> bool {
        let Some(at) = self.entry_offset(bars, index) else {
            return false;
        };
        let bar = self.table_bar;
        bars.write32(bar, at + 12, 1); // mask while updating
        bars.write32(bar, at, address as u32);
        bars.write32(bar, at + 4, (address >> 32) as u32);
        bars.write32(bar, at + 8, data);
        bars.write32(bar, at + 12, 0);
        true
    }
}

/// Enables I/O and memory decoding and bus mastering in the command register (what a
/// platform does before using the function; IOKit has `setMemoryEnable` etc. for it).
pub fn enable_function(config: &impl PciConfigSpace, io: bool, memory: bool) {
    let mut cmd = config.read16(header::COMMAND) | header::COMMAND_BUS_MASTER;
    if io {
        cmd |= header::COMMAND_IO;
    }
    if memory {
        cmd |= header::COMMAND_MEMORY;
    }
    config.write16(header::COMMAND, cmd);
}

/// Sets or clears Bus Master Enable in the command register, leaving its other bits, and
/// reads it back: true when the bit now reads as asked. With it clear the function may not
/// issue memory requests (PCI Local Bus 3.0 §6.2.2; PCIe Base 4.0 §7.5.1.1.3), so a device
/// that ignores a virtio reset stops reading and writing memory (and sending MSI/MSI-X,
/// which are memory writes too). The read-back is a non-posted config read: the write has
/// reached the function when it returns.
pub fn set_bus_master(config: &impl PciConfigSpace, enabled: bool) -> bool {
    let cmd = config.read16(header::COMMAND);
    let cmd = if enabled {
        cmd | header::COMMAND_BUS_MASTER
    } else {
        cmd & !header::COMMAND_BUS_MASTER
    };
    config.write16(header::COMMAND, cmd);
    (config.read16(header::COMMAND) & header::COMMAND_BUS_MASTER != 0) == enabled
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;

    struct Cfg(RefCell<[u8; 256]>);

    impl Cfg {
        fn new() -> Self {
            let c = Cfg(RefCell::new([0; 256]));
            c.write16(header::STATUS, header::STATUS_CAP_LIST);
            c
        }
        fn put(&self, at: usize, bytes: &[u8]) {
            self.0.borrow_mut()[at..at + bytes.len()].copy_from_slice(bytes);
        }
        #[allow(clippy::too_many_arguments)]
        fn vcap(&self, at: u8, next: u8, ty: u8, bar: u8, off: u32, len: u32, mult: u32) {
            let cap = VirtioPciNotifyCap {
                cap: VirtioPciCap {
                    cap_vndr: CAP_ID_VENDOR,
                    cap_next: next,
                    cap_len: 20,
                    cfg_type: ty,
                    bar,
                    id: 0,
                    padding: [0; 2],
                    offset: U32::new(off),
                    length: U32::new(len),
                },
                notify_off_multiplier: U32::new(mult),
            };
            self.put(usize::from(at), cap.as_bytes());
        }
    }

    impl PciConfigSpace for Cfg {
        fn read8(&self, o: u16) -> u8 {
            self.0.borrow()[usize::from(o)]
        }
        fn read16(&self, o: u16) -> u16 {
            let b = self.0.borrow();
            u16::from_le_bytes([b[usize::from(o)], b[usize::from(o) + 1]])
        }
        fn read32(&self, o: u16) -> u32 {
            u32::from(self.read16(o)) | u32::from(self.read16(o + 2)) << 16
        }
        fn write8(&self, o: u16, v: u8) {
            self.put(usize::from(o), &[v]);
        }
        fn write16(&self, o: u16, v: u16) {
            self.put(usize::from(o), &v.to_le_bytes());
        }
        fn write32(&self, o: u16, v: u32) {
            self.put(usize::from(o), &v.to_le_bytes());
        }
    }

    struct Bars;
    impl BarAccess for Bars {
        fn bar_len(&self, bar: u8) -> Option<u64> {
            (bar == 4).then_some(0x4000)
        }
        fn bar_is_io(&self, _: u8) -> bool {
            false
        }
        fn read8(&self, _: u8, _: u64) -> Option<u8> {
            None
        }
        fn read16(&self, _: u8, _: u64) -> Option<u16> {
            None
        }
        fn read32(&self, _: u8, _: u64) -> Option<u32> {
            None
        }
        fn write8(&self, _: u8, _: u64, _: u8) {}
        fn write16(&self, _: u8, _: u64, _: u16) {}
        fn write32(&self, _: u8, _: u64, _: u32) {}
    }

    #[test]
    fn bus_master_is_switched_and_read_back() {
        let c = Cfg::new();
        enable_function(&c, false, true);
        assert!(set_bus_master(&c, false));
        assert_eq!(
            c.read16(header::COMMAND),
            header::COMMAND_MEMORY,
            "other bits kept"
        );
        assert!(set_bus_master(&c, true));
        assert_eq!(
            c.read16(header::COMMAND),
            header::COMMAND_MEMORY | header::COMMAND_BUS_MASTER
        );
    }

    #[test]
    fn qemu_like_layout() {
        let c = Cfg::new();
        c.write8(header::CAPABILITIES_POINTER, 0x40);
        c.vcap(0x40, 0x54, cfg_type::COMMON, 4, 0, 0x1000, 0);
        c.vcap(0x54, 0x68, cfg_type::ISR, 4, 0x1000, 0x1000, 0);
        c.vcap(0x68, 0x7C, cfg_type::DEVICE, 4, 0x2000, 0x1000, 0);
        c.vcap(0x7C, 0x90, cfg_type::NOTIFY, 4, 0x3000, 0x1000, 4);
        c.vcap(0x90, 0, cfg_type::PCI_CFG, 0, 0, 0, 0);
        let caps = find_virtio_capabilities(&c, &Bars);
        assert_eq!(
            caps.common,
            Some(BarRegion {
                bar: 4,
                offset: 0,
                length: 0x1000
            })
        );
        assert_eq!(caps.notify.unwrap().multiplier, 4);
        assert_eq!(caps.notify.unwrap().register_offset(3), Some(12));
        assert_eq!(caps.notify.unwrap().register_offset(1023), Some(4092));
        assert_eq!(caps.notify.unwrap().register_offset(1024), None);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert_eq!(caps.pci_cfg, Some(0x90));
        assert!(caps.has_required());
        assert_eq!(caps.list_error, None);
        assert_eq!(caps.modern_error(), None);
    }

    #[test]
    fn invalid_caps_skipped_later_one_wins() {
        let c = Cfg::new();
        c.write8(header::CAPABILITIES_POINTER, 0x40);
        c.vcap(0x40, 0x54, cfg_type::COMMON, 4, 0x3FF0, 0x38, 0); // overflows the BAR
        c.vcap(0x54, 0x68, cfg_type::COMMON, 2, 0, 0x38, 0); // BAR not implemented
        c.vcap(0x68, 0x7C, cfg_type::COMMON, 4, 0, 0x10, 0); // too short
        c.vcap(0x7C, 0x90, cfg_type::COMMON, 4, 0x100, 0x100, 0); // valid
        c.vcap(0x90, 0xA4, cfg_type::COMMON, 4, 0x200, 0x100, 0); // valid but later
        c.vcap(0xA4, 0, cfg_type::ISR, 9, 0, 1, 0); // bar > 5
        let caps = find_virtio_capabilities(&c, &Bars);
        assert_eq!(
            caps.common,
            Some(BarRegion {
                bar: 4,
                offset: 0x100,
                length: 0x100
            })
        );
        assert_eq!(caps.isr, None);
        assert_eq!(
            caps.modern_error(),
            Some(TransportError::MissingCapability { cfg_type: 2 })
        );
        assert_eq!(
            caps.rejected[0],
            Some(TransportError::CapabilityOutOfBar { cfg_type: 1 })
        );
    }

    #[test]
    fn loops_and_bad_pointers_terminate() {
        let c = Cfg::new();
        c.write8(header::CAPABILITIES_POINTER, 0x40);
        c.vcap(0x40, 0x54, cfg_type::COMMON, 4, 0, 0x100, 0);
        c.vcap(0x54, 0x40, cfg_type::ISR, 4, 0x1000, 1, 0);
        let caps = find_virtio_capabilities(&c, &Bars);
        assert_eq!(caps.list_error, Some(TransportError::BadCapabilityList));
        assert_eq!(caps.modern_error(), Some(TransportError::BadCapabilityList));
        // Self-loop.
        c.vcap(0x40, 0x40, cfg_type::COMMON, 4, 0, 0x100, 0);
        assert_eq!(Capabilities::new(&c).count(), 1);
        // Pointer into the header.
        c.write8(header::CAPABILITIES_POINTER, 0x10);
        let mut w = Capabilities::new(&c);
        assert_eq!(w.next(), None);
        assert_eq!(w.error(), Some(TransportError::BadCapabilityList));
        // No capability list bit: no caps, no error.
        c.write16(header::STATUS, 0);
        let caps = find_virtio_capabilities(&c, &Bars);
        assert_eq!(caps.modern_error(), Some(TransportError::NoModernInterface));
    }

    #[test]
    fn cap_at_end_of_config_space() {
        let c = Cfg::new();
        c.write8(header::CAPABILITIES_POINTER, 0xFC);
        c.put(0xFC, &[CAP_ID_VENDOR, 0, 16, cfg_type::COMMON]);
        let caps = find_virtio_capabilities(&c, &Bars);
        assert_eq!(caps.vendor_caps_seen, 1);
        assert_eq!(caps.common, None);
    }

    #[test]
    fn msix_parse_and_enable() {
        let c = Cfg::new();
        c.write8(header::CAPABILITIES_POINTER, 0x98);
        c.put(0x98, &[CAP_ID_MSIX, 0, 0x02, 0x00]); // 3 entries
        c.write32(0x98 + 4, 0x0000_0001); // table BAR1 + 0
        c.write32(0x98 + 8, 0x0000_0801); // PBA BAR1 + 0x800
        let m = MsixCapability::find(&c).unwrap();
        assert_eq!(
            (m.table_size, m.table_bar, m.table_offset, m.pba_offset),
            (3, 1, 0, 0x800)
        );
        assert!(!m.enabled);
        m.set_enabled(&c, true);
        m.set_function_mask(&c, true);
        assert!(m.is_enabled(&c));
        assert_eq!(c.read16(0x9A), 0xC002);
        m.set_function_mask(&c, false);
        assert_eq!(c.read16(0x9A), 0x8002);
    }
}
