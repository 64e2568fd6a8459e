//! Probing and capability validation against the simulated function, in all three modes,
//! and properties of the PCI ID table.

use virtio_core::transport::Transport;
use virtio_core::{DeviceType, TransportError};
use virtio_pci::caps::{MsixCapability, cfg_type, find_virtio_capabilities};
use virtio_pci::ids;
use virtio_pci::{PciTransport, Preference, TransportKind, probe};
use virtio_tests::sim::{Sim, SimBars, SimBuilder, SimConfig, SimMode, layout};

fn sim(mode: SimMode) -> Sim {
    SimBuilder::new(mode, 1)
        .queues(&[256, 256, 64])
        .device_config(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0])
        .build()
}

fn try_probe(
    s: &Sim,
    pref: Preference,
) -> Result<PciTransport<SimConfig, SimBars>, TransportError> {
    probe(s.config_space(), s.bars(), pref)
}

fn kind(s: &Sim, pref: Preference) -> Result<TransportKind, TransportError> {
    try_probe(s, pref).map(|t| t.kind())
}

/// Sets a vendor cap's `length` field in config space.
fn set_cap_length(s: &Sim, cap: u8, length: u32) {
    s.write_config_raw(usize::from(cap) + 12, &length.to_le_bytes());
}

fn set_cap_bar(s: &Sim, cap: u8, bar: u8) {
    s.write_config_raw(usize::from(cap) + 4, &[bar]);
}

#[test]
fn modes_and_preferences() {
    let m = sim(SimMode::Modern);
    assert_eq!(kind(&m, Preference::Auto), Ok(TransportKind::Modern));
    assert_eq!(kind(&m, Preference::Modern), Ok(TransportKind::Modern));
    assert_eq!(
        kind(&m, Preference::Legacy).err(),
        Some(TransportError::NoLegacyInterface)
    );

    let t = sim(SimMode::Transitional);
    assert_eq!(kind(&t, Preference::Auto), Ok(TransportKind::Modern));
    assert_eq!(kind(&t, Preference::Modern), Ok(TransportKind::Modern));
    assert_eq!(kind(&t, Preference::Legacy), Ok(TransportKind::Legacy));

    let l = sim(SimMode::Legacy);
    assert_eq!(kind(&l, Preference::Auto), Ok(TransportKind::Legacy));
    assert_eq!(
        kind(&l, Preference::Modern).err(),
        Some(TransportError::NoModernInterface)
    );
    assert_eq!(kind(&l, Preference::Legacy), Ok(TransportKind::Legacy));

    // Legacy without any capability list at all (no MSI-X either).
    let bare = SimBuilder::new(SimMode::Legacy, 2).msix_vectors(0).build();
    assert_eq!(bare.read_config_raw(0x06, 1)[0] & 0x10, 0);
    assert_eq!(kind(&bare, Preference::Auto), Ok(TransportKind::Legacy));
    assert_eq!(
        kind(&bare, Preference::Modern).err(),
        Some(TransportError::NoModernInterface)
    );
}

#[test]
fn identifies_device_type_in_every_mode() {
    for mode in [SimMode::Modern, SimMode::Transitional, SimMode::Legacy] {
        for t in [
            DeviceType::Net,
            DeviceType::Block,
            DeviceType::Console,
            DeviceType::Balloon,
            DeviceType::Entropy,
        ] {
            let s = SimBuilder::new(mode, t.id()).build();
            let tr =
                try_probe(&s, Preference::Auto).unwrap_or_else(|e| panic!("{mode:?} {t:?}: {e:?}"));
            assert_eq!(tr.device_type(), t, "{mode:?}");
        }
    }
    // A valid virtio ID of a type this project has no name for is refused.
    let s = SimBuilder::new(SimMode::Modern, 0x3F).build();
    assert_eq!(
        kind(&s, Preference::Auto).err(),
        Some(TransportError::NotVirtio)
    );
    // Wrong vendor.
    let s = sim(SimMode::Modern);
    s.write_config_raw(0, &0x8086u16.to_le_bytes());
    assert_eq!(
        kind(&s, Preference::Auto).err(),
        Some(TransportError::NotVirtio)
    );
}

#[test]
fn qemu_layout_is_found() {
    let s = sim(SimMode::Transitional);
    let caps = find_virtio_capabilities(&s.config_space(), &s.bars());
    assert_eq!(caps.list_error, None);
    let common = caps.common.unwrap();
    assert_eq!((common.bar, common.offset, common.length), (4, 0, 0x1000));
    assert_eq!(caps.isr.unwrap().offset, 0x1000);
    assert_eq!(caps.device.unwrap().offset, 0x2000);
    let notify = caps.notify.unwrap();
    assert_eq!((notify.region.offset, notify.multiplier), (0x3000, 4));
    assert_eq!(caps.pci_cfg, Some(layout::CAP_PCI_CFG));
    assert_eq!(caps.vendor_caps_seen, 5);

    let msix = MsixCapability::find(&s.config_space()).unwrap();
    assert_eq!(msix.cap_offset, layout::CAP_MSIX);
    assert_eq!(msix.table_size, 4);
    assert_eq!((msix.table_bar, msix.table_offset), (1, 0));
    assert_eq!((msix.pba_bar, msix.pba_offset), (1, 0x800));
    assert!(!msix.enabled);
    if let PciTransport::Modern(m) = try_probe(&s, Preference::Modern).unwrap() {
        assert_eq!(m.pci_cfg_cap_offset(), Some(layout::CAP_PCI_CFG));
    } else {
        panic!("expected modern");
    }
}

#[test]
fn bar_overflowing_cap_is_skipped_and_reported() {
    // The only COMMON cap overflows BAR4 (0x4000 bytes): modern is refused precisely...
    let s = sim(SimMode::Modern);
    set_cap_length(&s, layout::CAP_COMMON, 0x4001);
    let caps = find_virtio_capabilities(&s.config_space(), &s.bars());
    assert_eq!(caps.common, None);
    assert_eq!(
        kind(&s, Preference::Auto).err(),
        Some(TransportError::CapabilityOutOfBar { cfg_type: 1 })
    );

    // ...and on a transitional function Auto falls back to legacy.
    let t = sim(SimMode::Transitional);
    set_cap_length(&t, layout::CAP_NOTIFY, 0xFFFF_FFFF);
    assert_eq!(
        kind(&t, Preference::Modern).err(),
        Some(TransportError::CapabilityOutOfBar { cfg_type: 2 })
    );
    assert_eq!(kind(&t, Preference::Auto), Ok(TransportKind::Legacy));

    // A cap naming an unimplemented BAR.
    let s = sim(SimMode::Modern);
    set_cap_bar(&s, layout::CAP_ISR, 2);
    assert_eq!(
        kind(&s, Preference::Modern).err(),
        Some(TransportError::BarUnavailable { bar: 2 })
    );
    // A BAR index above 5.
    let s = sim(SimMode::Modern);
    set_cap_bar(&s, layout::CAP_ISR, 7);
    assert_eq!(
        kind(&s, Preference::Modern).err(),
        Some(TransportError::CapabilityOutOfBar { cfg_type: 3 })
    );
    // Common cfg shorter than 0x38.
    let s = sim(SimMode::Modern);
    set_cap_length(&s, layout::CAP_COMMON, 0x37);
    assert_eq!(
        kind(&s, Preference::Modern).err(),
        Some(TransportError::CapabilityOutOfBar { cfg_type: 1 })
    );
    // Notify region shorter than one register.
    let s = sim(SimMode::Modern);
    set_cap_length(&s, layout::CAP_NOTIFY, 1);
    assert_eq!(
        kind(&s, Preference::Modern).err(),
        Some(TransportError::CapabilityOutOfBar { cfg_type: 2 })
    );
    // A missing DEVICE cap is fine (config_len 0).
    let s = sim(SimMode::Modern);
    s.write_config_raw(usize::from(layout::CAP_DEVICE) + 3, &[0x77]);
    let t = try_probe(&s, Preference::Modern).unwrap();
    assert_eq!(t.config_len(), 0);
    assert!(t.read_config8(0).is_err());
}

#[test]
fn missing_capability_is_named() {
    for (cap, ty) in [
        (layout::CAP_COMMON, 1u8),
        (layout::CAP_NOTIFY, 2),
        (layout::CAP_ISR, 3),
    ] {
        let s = sim(SimMode::Modern);
        // Turn it into an unknown cfg_type (ignored, like SHARED_MEMORY).
        s.write_config_raw(usize::from(cap) + 3, &[cfg_type::SHARED_MEMORY]);
        assert_eq!(
            kind(&s, Preference::Modern).err(),
            Some(TransportError::MissingCapability { cfg_type: ty })
        );
    }
}

#[test]
fn duplicate_caps_first_valid_wins() {
    let s = sim(SimMode::Modern);
    // A second DEVICE cap at the list head (first in walk order) pointing at the notify area.
    let at = s.insert_vendor_cap(cfg_type::DEVICE, 4, 0x3000, 0x100, 0);
    assert_eq!(s.read_config_raw(0x34, 1)[0], at);
    let caps = find_virtio_capabilities(&s.config_space(), &s.bars());
    assert_eq!(caps.device.unwrap().offset, 0x3000);
    assert_eq!(caps.device.unwrap().length, 0x100);

    // An invalid earlier cap is skipped and the later valid one wins.
    let s = sim(SimMode::Modern);
    s.insert_vendor_cap(cfg_type::COMMON, 4, 0x3F00, 0x1000, 0); // overflows BAR4
    let caps = find_virtio_capabilities(&s.config_space(), &s.bars());
    assert_eq!(caps.common.unwrap().offset, 0);
    assert_eq!(kind(&s, Preference::Modern), Ok(TransportKind::Modern));

    // A notify cap with multiplier 0 placed first: every queue notifies at its start.
    let s = sim(SimMode::Modern);
    s.insert_vendor_cap(cfg_type::NOTIFY, 4, 0x3000, 2, 0);
    let caps = find_virtio_capabilities(&s.config_space(), &s.bars());
    assert_eq!(caps.notify.unwrap().multiplier, 0);
    assert_eq!(caps.notify.unwrap().region.length, 2);
}

#[test]
fn looping_cap_list_terminates() {
    // NOTIFY (0x70) -> COMMON (0x40) -> back to MSI-X (0x98): a loop through the list head.
    let s = sim(SimMode::Modern);
    s.write_config_raw(usize::from(layout::CAP_COMMON) + 1, &[layout::CAP_MSIX]);
    let caps = find_virtio_capabilities(&s.config_space(), &s.bars());
    assert_eq!(caps.list_error, Some(TransportError::BadCapabilityList));
    // All caps were seen before the loop was detected, so the transport is still usable.
    assert!(caps.has_required());
    assert_eq!(kind(&s, Preference::Modern), Ok(TransportKind::Modern));

    // Loop before COMMON was reached: reported as a broken list.
    let s = sim(SimMode::Modern);
    s.write_config_raw(usize::from(layout::CAP_ISR) + 1, &[layout::CAP_ISR]);
    assert_eq!(
        kind(&s, Preference::Modern).err(),
        Some(TransportError::BadCapabilityList)
    );
    // Transitional: Auto falls back to legacy.
    let t = sim(SimMode::Transitional);
    t.write_config_raw(usize::from(layout::CAP_ISR) + 1, &[layout::CAP_ISR]);
    assert_eq!(kind(&t, Preference::Auto), Ok(TransportKind::Legacy));

    // Pointer into the standard header / beyond config space: terminates.
    let s = sim(SimMode::Modern);
    s.write_config_raw(0x34, &[0x20]);
    assert_eq!(
        kind(&s, Preference::Modern).err(),
        Some(TransportError::BadCapabilityList)
    );
    let s = sim(SimMode::Modern);
    s.write_config_raw(0x34, &[0xFF]); // masked to 0xFC: a garbage cap at the very end
    assert!(try_probe(&s, Preference::Modern).is_err());
}

#[test]
fn msix_enable_helper_drives_legacy_config_offset() {
    let s = sim(SimMode::Transitional);
    let msix = MsixCapability::find(&s.config_space()).unwrap();
    msix.set_enabled(&s.config_space(), true);
    assert!(s.msix_enabled());
    assert!(msix.is_enabled(&s.config_space()));
    msix.set_function_mask(&s.config_space(), true);
    assert_eq!(
        s.read_config_raw(usize::from(layout::CAP_MSIX) + 3, 1)[0] & 0xC0,
        0xC0
    );
    msix.set_enabled(&s.config_space(), false);
    assert!(!s.msix_enabled());
    // Program a table entry through the BAR.
    assert!(msix.program_entry(&s.bars(), 2, 0xFEE0_0000, 0x41));
    assert!(!msix.program_entry(&s.bars(), 4, 0xFEE0_0000, 0x41));
}

#[test]
fn pci_id_table_properties() {
    for device in 0..=u16::MAX {
        for sub in [0u16, 1, 2, 5, 0x3F, 0x40, 0xFFFF] {
            let id = ids::identify(0x1AF4, device, sub);
            let transitional = (0x1000..=0x103F).contains(&device);
            let modern = (0x1041..=0x107F).contains(&device);
            match id {
                Some(i) if transitional => {
                    assert_eq!(i.kind, ids::PciIdKind::Transitional);
                    assert_eq!(i.type_id, u32::from(sub));
                    assert!((1..=0x3F).contains(&sub));
                }
                Some(i) => {
                    assert!(modern, "{device:#x}");
                    assert_eq!(i.kind, ids::PciIdKind::Modern);
                    assert_eq!(i.type_id, u32::from(device - 0x1040));
                }
                None => assert!(
                    !(modern || (transitional && (1..=0x3F).contains(&sub))),
                    "{device:#x}/{sub:#x}"
                ),
            }
            assert_eq!(ids::identify(0x1AF5, device, sub), None);
        }
    }
    for t in 1..=0x3Fu32 {
        let modern = ids::modern_device_id(t).unwrap();
        assert_eq!(ids::identify(0x1AF4, modern, 0).map(|i| i.type_id), Some(t));
        if let Some(tid) = ids::transitional_device_id(t) {
            assert_eq!(
                ids::identify(0x1AF4, tid, t as u16).map(|i| i.type_id),
                Some(t)
            );
        }
    }
    for t in DeviceType::ALL {
        assert_eq!(
            ids::device_type(0x1AF4, ids::modern_device_id(t.id()).unwrap(), 0),
            Some(t)
        );
    }
    assert_eq!(ids::modern_device_id(0), None);
    assert_eq!(ids::modern_device_id(0x40), None);
    assert_eq!(
        ids::IOPCI_PRIMARY_MATCH_ALL,
        "0x10001af4&0xffc0ffff 0x10401af4&0xffc0ffff"
    );
    let mut s = String::new();
    ids::write_iopci_primary_match(&[1, 2, 5, 3], &mut s).unwrap();
    assert_eq!(
        s,
        "0x10411af4 0x10001af4 0x10421af4 0x10011af4 0x10451af4 0x10021af4 0x10431af4 0x10031af4"
    );
}
