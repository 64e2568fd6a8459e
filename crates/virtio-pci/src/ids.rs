//! The one table of PCI IDs this stack drives (virtio 1.2 §4.1.2), and the IOKit match
//! strings generated from it.
//!
//! - Vendor 0x1AF4 (Red Hat / Qumranet) for every virtio function.
//! - **Transitional** device IDs 0x1000..=0x103F: revision 0, the virtio device type is the
//!   PCI **subsystem device ID** (virtio 1.2 §4.1.2.1; Linux `virtio_pci_legacy_probe` does the
//!   same). Such a function may offer the legacy BAR0 interface, the modern capabilities, or
//!   both.
//! - **Modern** (non-transitional) device IDs 0x1040 + type, for types 1..=0x3F, revision ≥ 1.
//!
//! Drivers must match any revision ID, so the revision is never checked.

use core::fmt;
use core::ops::RangeInclusive;

use virtio_core::DeviceType;

/// PCI vendor ID of every virtio function.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1AF4;
/// Transitional device IDs; the device type is the subsystem device ID.
pub const TRANSITIONAL_DEVICE_IDS: RangeInclusive<u16> = 0x1000..=0x103F;
/// Modern device ID of virtio type 0 (reserved); type `t` has `MODERN_DEVICE_ID_BASE + t`.
pub const MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// Modern device IDs this stack accepts (types 1..=0x3F).
pub const MODERN_DEVICE_IDS: RangeInclusive<u16> = 0x1041..=0x107F;
/// Device type IDs this table covers.
pub const DEVICE_TYPE_IDS: RangeInclusive<u32> = 1..=0x3F;

/// Which kind of PCI ID a virtio function carries.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PciIdKind {
    /// 0x1000..=0x103F: may have the legacy interface (BAR0), possibly also modern caps.
    Transitional,
    /// 0x1040 + type: modern interface only.
    Modern,
}

/// What the PCI IDs say about a function.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Raw virtio device type ID (1..=0x3F); may be a type this project has no name for.
    pub type_id: u32,
    pub kind: PciIdKind,
}

impl PciIdentity {
    /// The named device type, if this project knows it.
    pub fn device_type(&self) -> Option<DeviceType> {
        DeviceType::from_id(self.type_id)
    }
}

/// Identifies a virtio function from its IDs, or `None` if it is not one we drive.
pub fn identify(vendor: u16, device: u16, subsystem_device: u16) -> Option<PciIdentity> {
    if vendor != VIRTIO_PCI_VENDOR_ID {
        return None;
    }
    let (type_id, kind) = if TRANSITIONAL_DEVICE_IDS.contains(&device) {
        (u32::from(subsystem_device), PciIdKind::Transitional)
    } else if MODERN_DEVICE_IDS.contains(&device) {
        (u32::from(device - MODERN_DEVICE_ID_BASE), PciIdKind::Modern)
    } else {
        return None;
    };
    DEVICE_TYPE_IDS
        .contains(&type_id)
        .then_some(PciIdentity { type_id, kind })
}

/// The device type of a function, if it is a virtio function of a type this project knows.
pub fn device_type(vendor: u16, device: u16, subsystem_device: u16) -> Option<DeviceType> {
    identify(vendor, device, subsystem_device)?.device_type()
}

/// The modern device ID of a type (1..=0x3F).
pub fn modern_device_id(type_id: u32) -> Option<u16> {
    if !DEVICE_TYPE_IDS.contains(&type_id) {
        return None;
    }
    u16::try_from(type_id)
        .ok()
        .map(|t| MODERN_DEVICE_ID_BASE + t)
}

/// The fixed transitional device IDs of virtio 1.2 §4.1.2.3 (type ID, PCI device ID). Other
/// types have none: a transitional function of another type may use any ID in
/// [`TRANSITIONAL_DEVICE_IDS`] with its type in the subsystem ID.
pub const TRANSITIONAL_IDS: [(u32, u16); 7] = [
    (1, 0x1000), // network card
    (2, 0x1001), // block device
    (5, 0x1002), // memory ballooning (traditional)
    (3, 0x1003), // console
    (8, 0x1004), // SCSI host
    (4, 0x1005), // entropy source
    (9, 0x1009), // 9P transport
];

/// The fixed transitional device ID of a type, for the types that have one.
pub fn transitional_device_id(type_id: u32) -> Option<u16> {
    TRANSITIONAL_IDS
        .iter()
        .find(|(t, _)| *t == type_id)
        .map(|&(_, id)| id)
}

/// `IOPCIPrimaryMatch` value matching **every** ID of this table: all transitional IDs
/// 0x1000..=0x103F and all modern IDs 0x1040..=0x107F of vendor 0x1AF4.
///
/// IOKit compares `(device << 16 | vendor) & mask` with `value & mask`; the mask 0xFFC0FFFF
/// ignores the low 6 bits of the device ID, so `0x10001af4&0xffc0ffff` covers 0x1000..=0x103F
/// and `0x10401af4&0xffc0ffff` covers 0x1040..=0x107F. The latter includes 0x1040 (type 0,
/// reserved), which [`identify`] then refuses: the family kext's `start` fails for it and
/// IOKit moves on. This is what `VirtioFamily.kext` matches on; the per-type kexts match the
/// family's nubs by their `VirtioDeviceType` property, not by PCI IDs.
pub const IOPCI_PRIMARY_MATCH_ALL: &str = "0x10001af4&0xffc0ffff 0x10401af4&0xffc0ffff";

/// Writes an `IOPCIPrimaryMatch` value listing exact IDs for the given device types: the
/// modern ID of each type and, where the spec assigns one, its transitional ID. Types outside
/// 1..=0x3F are skipped. Entries are separated by single spaces, in the order given
/// (modern ID first for each type), duplicates removed.
///
/// Note that a transitional function's type is its subsystem ID, and `IOPCIPrimaryMatch`
/// cannot see subsystem IDs: an exact list can only name the spec's fixed transitional IDs.
/// Use [`IOPCI_PRIMARY_MATCH_ALL`] to catch every function and let [`identify`] decide.
pub fn write_iopci_primary_match(types: &[u32], out: &mut impl fmt::Write) -> fmt::Result {
    let mut first = true;
    for (i, &t) in types.iter().enumerate() {
        if types.get(..i).is_some_and(|before| before.contains(&t)) {
            continue;
        }
        for id in [modern_device_id(t), transitional_device_id(t)]
            .into_iter()
            .flatten()
        {
            if !first {
                out.write_char(' ')?;
            }
            first = false;
            write!(
                out,
                "{:#010x}",
                (u32::from(id) << 16) | u32::from(VIRTIO_PCI_VENDOR_ID)
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buf {
        bytes: [u8; 256],
        len: usize,
    }

    impl fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.len + s.len();
            self.bytes
                .get_mut(self.len..end)
                .ok_or(fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    fn matches(value: u32, mask: u32, device: u16) -> bool {
        let id = (u32::from(device) << 16) | u32::from(VIRTIO_PCI_VENDOR_ID);
        id & mask == value & mask
    }

    #[test]
    fn known_ids() {
        assert_eq!(device_type(0x1AF4, 0x1041, 0), Some(DeviceType::Net));
        assert_eq!(device_type(0x1AF4, 0x1000, 1), Some(DeviceType::Net));
        assert_eq!(device_type(0x1AF4, 0x1002, 5), Some(DeviceType::Balloon));
        assert_eq!(
            device_type(0x1AF4, 0x1043, 0x1234),
            Some(DeviceType::Console)
        );
        assert_eq!(device_type(0x8086, 0x1041, 0), None);
        assert_eq!(device_type(0x1AF4, 0x1040, 0), None);
        assert_eq!(device_type(0x1AF4, 0x1080, 0), None);
        assert_eq!(device_type(0x1AF4, 0x0FFF, 1), None);
        assert_eq!(device_type(0x1AF4, 0x1000, 0), None);
        assert_eq!(device_type(0x1AF4, 0x1000, 0x40), None);
    }

    #[test]
    fn every_table_id_is_matched_by_the_all_string() {
        let parts: [(u32, u32); 2] = [(0x1000_1af4, 0xffc0_ffff), (0x1040_1af4, 0xffc0_ffff)];
        for device in 0..=u16::MAX {
            let in_table = TRANSITIONAL_DEVICE_IDS.contains(&device)
                || (MODERN_DEVICE_ID_BASE..=0x107F).contains(&device);
            let matched = parts.iter().any(|&(v, m)| matches(v, m, device));
            assert_eq!(in_table, matched, "device {device:#x}");
        }
    }

    #[test]
    fn exact_match_string() {
        let mut b = Buf {
            bytes: [0; 256],
            len: 0,
        };
        write_iopci_primary_match(&[1, 2, 1, 0x40, 16], &mut b).unwrap();
        let s = core::str::from_utf8(&b.bytes[..b.len]).unwrap();
        assert_eq!(s, "0x10411af4 0x10001af4 0x10421af4 0x10011af4 0x10501af4");
    }
}
