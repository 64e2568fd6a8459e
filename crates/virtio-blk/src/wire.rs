//! Wire formats of the block device (virtio 1.2 §5.2): the request header, the
//! discard/write-zeroes/secure-erase segment, the lifetime record, the device
//! configuration layout, request types and status values.
//!
//! Every multi-byte field is little-endian on the wire. (The legacy interface is
//! "guest-endian"; every platform this stack targets is little-endian, so one layout
//! serves both.)

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Sectors are always 512 bytes in the protocol, whatever `blk_size` says (§5.2.6).
pub const SECTOR_SIZE: u32 = 512;

/// Request types (§5.2.6).
pub mod req_type {
    /// Read (`VIRTIO_BLK_T_IN`).
    pub const IN: u32 = 0;
    /// Write (`VIRTIO_BLK_T_OUT`).
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    /// Device ID string, 20 bytes (not necessarily NUL-terminated).
    pub const GET_ID: u32 = 8;
    pub const GET_LIFETIME: u32 = 10;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    pub const SECURE_ERASE: u32 = 14;
}

/// Status byte values (§5.2.6).
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Length of the GET_ID answer (§5.2.6: "20 bytes").
pub const ID_BYTES: usize = 20;

/// `struct virtio_blk_req` without its data and status: the device-readable header.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ReqHeader {
    pub req_type: U32,
    pub reserved: U32,
    /// Offset in 512-byte sectors (IN/OUT only; 0 otherwise).
    pub sector: U64,
}

impl ReqHeader {
    pub fn new(req_type: u32, sector: u64) -> Self {
        ReqHeader {
            req_type: U32::new(req_type),
            reserved: U32::new(0),
            sector: U64::new(sector),
        }
    }
}

/// Unmap bit of [`RangeSegment::flags`] (write zeroes only; §5.2.6).
pub const RANGE_FLAG_UNMAP: u32 = 1;

/// `struct virtio_blk_discard_write_zeroes`: one range of a discard, write-zeroes or
/// secure-erase request.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RangeSegment {
    pub sector: U64,
    pub num_sectors: U32,
    /// Bit 0: unmap; bits 1..=31 reserved (zero).
    pub flags: U32,
}

impl RangeSegment {
    pub fn new(sector: u64, num_sectors: u32, unmap: bool) -> Self {
        RangeSegment {
            sector: U64::new(sector),
            num_sectors: U32::new(num_sectors),
            flags: U32::new(if unmap { RANGE_FLAG_UNMAP } else { 0 }),
        }
    }
}

/// `struct virtio_blk_lifetime` (GET_LIFETIME answer).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct LifetimeWire {
    pub pre_eol_info: U16,
    pub device_lifetime_est_typ_a: U16,
    pub device_lifetime_est_typ_b: U16,
}

/// `struct virtio_blk_geometry`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GeometryWire {
    pub cylinders: U16,
    pub heads: u8,
    pub sectors: u8,
}

/// `struct virtio_blk_topology`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct TopologyWire {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks.
    pub min_io_size: U16,
    /// Optimal (suggested maximum) I/O size in logical blocks.
    pub opt_io_size: U32,
}

/// `struct virtio_blk_config` as of virtio 1.2 §5.2.4 (the zoned fields of 1.3 are not
/// read: ZONED is refused).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct BlkConfigWire {
    pub capacity: U64,
    pub size_max: U32,
    pub seg_max: U32,
    pub geometry: GeometryWire,
    pub blk_size: U32,
    pub topology: TopologyWire,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: U16,
    pub max_discard_sectors: U32,
    pub max_discard_seg: U32,
    pub discard_sector_alignment: U32,
    pub max_write_zeroes_sectors: U32,
    pub max_write_zeroes_seg: U32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
    pub max_secure_erase_sectors: U32,
    pub max_secure_erase_seg: U32,
    pub secure_erase_sector_alignment: U32,
}

/// Byte offsets of the config fields (what the driver reads, one field at a time, only
/// when the field's feature was negotiated).
pub mod cfg {
    pub const CAPACITY: u32 = 0;
    pub const SIZE_MAX: u32 = 8;
    pub const SEG_MAX: u32 = 12;
    pub const GEOMETRY: u32 = 16;
    pub const BLK_SIZE: u32 = 20;
    pub const TOPOLOGY: u32 = 24;
    pub const WRITEBACK: u32 = 32;
    pub const NUM_QUEUES: u32 = 34;
    pub const MAX_DISCARD_SECTORS: u32 = 36;
    pub const MAX_DISCARD_SEG: u32 = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: u32 = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: u32 = 48;
    pub const MAX_WRITE_ZEROES_SEG: u32 = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: u32 = 56;
    pub const MAX_SECURE_ERASE_SECTORS: u32 = 60;
    pub const MAX_SECURE_ERASE_SEG: u32 = 64;
    pub const SECURE_ERASE_SECTOR_ALIGNMENT: u32 = 68;
    /// Size of the 1.2 layout.
    pub const LEN: u32 = 72;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn header_bytes_as_the_spec_lays_them_out() {
        let h = ReqHeader::new(req_type::OUT, 0x0102_0304_0506_0708);
        assert_eq!(
            h.as_bytes(),
            &[1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(size_of::<ReqHeader>(), 16);
        let g = ReqHeader::new(req_type::GET_ID, 0);
        assert_eq!(g.as_bytes()[..4], [8, 0, 0, 0]);
    }

    #[test]
    fn range_segment_bytes() {
        let s = RangeSegment::new(0x11_2233_4455, 0x0A0B_0C0D, true);
        assert_eq!(
            s.as_bytes(),
            &[
                0x55, 0x44, 0x33, 0x22, 0x11, 0, 0, 0, 0x0D, 0x0C, 0x0B, 0x0A, 1, 0, 0, 0
            ]
        );
        assert_eq!(RangeSegment::new(1, 2, false).flags.get(), 0);
        assert_eq!(size_of::<RangeSegment>(), 16);
        assert_eq!(size_of::<LifetimeWire>(), 6);
    }

    #[test]
    fn config_layout_matches_the_spec() {
        assert_eq!(offset_of!(BlkConfigWire, capacity) as u32, cfg::CAPACITY);
        assert_eq!(offset_of!(BlkConfigWire, size_max) as u32, cfg::SIZE_MAX);
        assert_eq!(offset_of!(BlkConfigWire, seg_max) as u32, cfg::SEG_MAX);
        assert_eq!(offset_of!(BlkConfigWire, geometry) as u32, cfg::GEOMETRY);
        assert_eq!(offset_of!(BlkConfigWire, blk_size) as u32, cfg::BLK_SIZE);
        assert_eq!(offset_of!(BlkConfigWire, topology) as u32, cfg::TOPOLOGY);
        assert_eq!(offset_of!(BlkConfigWire, writeback) as u32, cfg::WRITEBACK);
        assert_eq!(
            offset_of!(BlkConfigWire, num_queues) as u32,
            cfg::NUM_QUEUES
        );
        assert_eq!(
            offset_of!(BlkConfigWire, max_discard_sectors) as u32,
            cfg::MAX_DISCARD_SECTORS
        );
        assert_eq!(
            offset_of!(BlkConfigWire, max_discard_seg) as u32,
            cfg::MAX_DISCARD_SEG
        );
        assert_eq!(
            offset_of!(BlkConfigWire, discard_sector_alignment) as u32,
            cfg::DISCARD_SECTOR_ALIGNMENT
        );
        assert_eq!(
            offset_of!(BlkConfigWire, max_write_zeroes_sectors) as u32,
            cfg::MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            offset_of!(BlkConfigWire, max_write_zeroes_seg) as u32,
            cfg::MAX_WRITE_ZEROES_SEG
        );
        assert_eq!(
            offset_of!(BlkConfigWire, write_zeroes_may_unmap) as u32,
            cfg::WRITE_ZEROES_MAY_UNMAP
        );
        assert_eq!(
            offset_of!(BlkConfigWire, max_secure_erase_sectors) as u32,
            cfg::MAX_SECURE_ERASE_SECTORS
        );
        assert_eq!(
            offset_of!(BlkConfigWire, max_secure_erase_seg) as u32,
            cfg::MAX_SECURE_ERASE_SEG
        );
        assert_eq!(
            offset_of!(BlkConfigWire, secure_erase_sector_alignment) as u32,
            cfg::SECURE_ERASE_SECTOR_ALIGNMENT
        );
        assert_eq!(size_of::<BlkConfigWire>() as u32, cfg::LEN);
        assert_eq!(size_of::<GeometryWire>(), 4);
        assert_eq!(size_of::<TopologyWire>(), 8);
    }
}
