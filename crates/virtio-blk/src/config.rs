//! Reading and validating the device configuration (virtio 1.2 §5.2.4).
//!
//! A field is read only when its feature was negotiated (§5.2.4: "field ... exists only if
//! ... feature ... is negotiated"); each value the device gives is checked, and a value that
//! makes no sense becomes `Error::DeviceProtocol` naming the field. Limits of 0 mean
//! "unlimited"/"not reported" (Linux treats them the same way), except the secure-erase
//! limits, which the device must set (Linux refuses 0 there too).

use virtio_core::{Error, Features, Result};

use crate::features as feat;
use crate::wire::{SECTOR_SIZE, cfg};

/// Largest logical block size accepted (QEMU allows up to 2 MiB).
pub const MAX_BLOCK_SIZE: u32 = 2 << 20;

/// Disk geometry (informational, GEOMETRY).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

/// Topology hints (TOPOLOGY), in logical blocks.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Logical blocks before the first physically aligned one.
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
}

/// Limits of one multi-range operation (discard, write zeroes, secure erase), normalised:
/// 0 from the device ("unlimited") has become the largest value the protocol can carry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RangeLimits {
    /// Most sectors in one range segment (a multiple of the logical block).
    pub max_sectors: u32,
    /// Most segments in one request, as the device reports it (`u32::MAX`: unlimited).
    pub max_segments: u32,
    /// Split ranges at multiples of this many sectors (1: no alignment preference).
    pub alignment: u32,
}

/// What the driver knows about the device after negotiation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BlkInfo {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes (512 unless BLK_SIZE).
    pub block_size: u32,
    pub read_only: bool,
    /// FLUSH negotiated: flush requests are possible.
    pub flush: bool,
    /// The write cache is in writeback mode (from `writeback` with CONFIG_WCE, else
    /// assumed when FLUSH was negotiated, §5.2.5).
    pub writeback: bool,
    /// CONFIG_WCE: `writeback` can be changed.
    pub config_wce: bool,
    pub geometry: Option<Geometry>,
    pub topology: Option<Topology>,
    /// SIZE_MAX, if reported (non-zero).
    pub size_max: Option<u32>,
    /// SEG_MAX, if negotiated.
    pub seg_max: Option<u32>,
    /// Request queues the device has (1 without MQ).
    pub num_queues: u16,
    pub discard: Option<RangeLimits>,
    pub write_zeroes: Option<RangeLimits>,
    /// The device may deallocate for write zeroes with the unmap flag.
    pub write_zeroes_may_unmap: bool,
    pub secure_erase: Option<RangeLimits>,
    /// LIFETIME negotiated: GET_LIFETIME is possible.
    pub lifetime: bool,
}

impl BlkInfo {
    /// Sectors per logical block.
    pub fn block_sectors(&self) -> u32 {
        self.block_size / SECTOR_SIZE
    }
}

fn bad(what: &'static str) -> Error {
    log::error!("virtio-blk: invalid device config: {what}");
    Error::DeviceProtocol { what }
}

/// Config field access (the bus's `read_config`), so the parser can be unit-tested.
pub trait ConfigSource {
    fn read(&self, offset: u32, buf: &mut [u8]) -> Result<()>;
    fn u8(&self, offset: u32) -> Result<u8> {
        let mut b = [0; 1];
        self.read(offset, &mut b)?;
        Ok(b[0])
    }
    fn u16(&self, offset: u32) -> Result<u16> {
        let mut b = [0; 2];
        self.read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&self, offset: u32) -> Result<u32> {
        let mut b = [0; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&self, offset: u32) -> Result<u64> {
        let mut b = [0; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Reads the capacity and checks it can be expressed in bytes.
pub fn read_capacity(src: &impl ConfigSource) -> Result<u64> {
    let capacity = src.u64(cfg::CAPACITY)?;
    if capacity > u64::MAX / u64::from(SECTOR_SIZE) {
        return Err(bad("capacity overflows a byte count"));
    }
    Ok(capacity)
}

/// The `writeback` field (CONFIG_WCE, §5.2.4): 0 write-through, 1 writeback; any other
/// value breaks the rules. Read at init, after a config change and after `set_writeback`.
pub fn read_writeback(src: &impl ConfigSource) -> Result<bool> {
    match src.u8(cfg::WRITEBACK)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad("writeback is neither 0 nor 1")),
    }
}

/// Reads and validates every field the negotiated features make present.
pub fn read_info(src: &impl ConfigSource, features: Features) -> Result<BlkInfo> {
    let has = |f: Features| features.contains(f);
    let capacity = read_capacity(src)?;

    let block_size = if has(feat::BLK_SIZE) {
        let b = src.u32(cfg::BLK_SIZE)?;
        if !b.is_power_of_two() || !(SECTOR_SIZE..=MAX_BLOCK_SIZE).contains(&b) {
            return Err(bad("blk_size: not a power of two in 512..=2M"));
        }
        b
    } else {
        SECTOR_SIZE
    };
    let block_sectors = block_size / SECTOR_SIZE;

    let size_max = if has(feat::SIZE_MAX) {
        match src.u32(cfg::SIZE_MAX)? {
            0 => None,
            v => Some(v),
        }
    } else {
        None
    };
    let seg_max = if has(feat::SEG_MAX) {
        let v = src.u32(cfg::SEG_MAX)?;
        if v == 0 {
            return Err(bad("seg_max is 0"));
        }
        Some(v)
    } else {
        None
    };
    // A device whose limits cannot carry one logical block cannot be used.
    if let (Some(size), Some(segs)) = (size_max, seg_max) {
        if u64::from(size) * u64::from(segs) < u64::from(block_size) {
            return Err(bad("size_max * seg_max smaller than one block"));
        }
    }

    let geometry = if has(feat::GEOMETRY) {
        Some(Geometry {
            cylinders: src.u16(cfg::GEOMETRY)?,
            heads: src.u8(cfg::GEOMETRY + 2)?,
            sectors: src.u8(cfg::GEOMETRY + 3)?,
        })
    } else {
        None
    };

    let topology = if has(feat::TOPOLOGY) {
        let t = Topology {
            physical_block_exp: src.u8(cfg::TOPOLOGY)?,
            alignment_offset: src.u8(cfg::TOPOLOGY + 1)?,
            min_io_size: src.u16(cfg::TOPOLOGY + 2)?,
            opt_io_size: src.u32(cfg::TOPOLOGY + 4)?,
        };
        // The physical block must be expressible in bytes; the alignment offset is less
        // than one physical block.
        let phys = u64::from(block_size)
            .checked_shl(u32::from(t.physical_block_exp))
            .filter(|p| *p <= u64::from(u32::MAX));
        let Some(phys) = phys else {
            return Err(bad("topology.physical_block_exp too large"));
        };
        if u64::from(t.alignment_offset) * u64::from(block_size) >= phys && t.alignment_offset != 0
        {
            return Err(bad("topology.alignment_offset beyond a physical block"));
        }
        Some(t)
    } else {
        None
    };

    let flush = has(feat::FLUSH);
    let config_wce = has(feat::CONFIG_WCE);
    let writeback = if config_wce {
        read_writeback(src)?
    } else {
        flush
    };

    let num_queues = if has(feat::MQ) {
        let n = src.u16(cfg::NUM_QUEUES)?;
        if n == 0 {
            return Err(bad("num_queues is 0"));
        }
        n
    } else {
        1
    };

    let range = |max_sectors: u32, max_seg: u32, align: u32, what: &'static str| {
        // Round the per-segment limit down to whole logical blocks (the device checks
        // block alignment of every range, as QEMU does).
        let max = if max_sectors == 0 {
            u32::MAX
        } else {
            max_sectors
        };
        let max = max - max % block_sectors;
        if max == 0 {
            return Err(bad(what));
        }
        Ok(RangeLimits {
            max_sectors: max,
            max_segments: if max_seg == 0 { u32::MAX } else { max_seg },
            alignment: align.max(1),
        })
    };

    let discard = if has(feat::DISCARD) {
        Some(range(
            src.u32(cfg::MAX_DISCARD_SECTORS)?,
            src.u32(cfg::MAX_DISCARD_SEG)?,
            src.u32(cfg::DISCARD_SECTOR_ALIGNMENT)?,
            "max_discard_sectors smaller than one block",
        )?)
    } else {
        None
    };
    let (write_zeroes, write_zeroes_may_unmap) = if has(feat::WRITE_ZEROES) {
        let limits = range(
            src.u32(cfg::MAX_WRITE_ZEROES_SECTORS)?,
            src.u32(cfg::MAX_WRITE_ZEROES_SEG)?,
            1,
            "max_write_zeroes_sectors smaller than one block",
        )?;
        let may_unmap = match src.u8(cfg::WRITE_ZEROES_MAY_UNMAP)? {
            0 => false,
            1 => true,
            _ => return Err(bad("write_zeroes_may_unmap is neither 0 nor 1")),
        };
        (Some(limits), may_unmap)
    } else {
        (None, false)
    };
    let secure_erase = if has(feat::SECURE_ERASE) {
        let sectors = src.u32(cfg::MAX_SECURE_ERASE_SECTORS)?;
        let segs = src.u32(cfg::MAX_SECURE_ERASE_SEG)?;
        let align = src.u32(cfg::SECURE_ERASE_SECTOR_ALIGNMENT)?;
        if sectors == 0 {
            return Err(bad("max_secure_erase_sectors is 0"));
        }
        if segs == 0 {
            return Err(bad("max_secure_erase_seg is 0"));
        }
        if align == 0 {
            return Err(bad("secure_erase_sector_alignment is 0"));
        }
        Some(range(
            sectors,
            segs,
            align,
            "max_secure_erase_sectors smaller than one block",
        )?)
    } else {
        None
    };

    Ok(BlkInfo {
        capacity,
        block_size,
        read_only: has(feat::RO),
        flush,
        writeback,
        config_wce,
        geometry,
        topology,
        size_max,
        seg_max,
        num_queues,
        discard,
        write_zeroes,
        write_zeroes_may_unmap,
        secure_erase,
        lifetime: has(feat::LIFETIME),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::DRIVER_FEATURES;
    use crate::wire::BlkConfigWire;
    use core::cell::RefCell;
    use zerocopy::IntoBytes;
    use zerocopy::little_endian::{U16, U32, U64};

    extern crate std;
    use std::vec::Vec;

    /// Config bytes plus a record of which offsets were read.
    struct Bytes {
        data: [u8; 72],
        reads: RefCell<Vec<u32>>,
    }

    impl ConfigSource for Bytes {
        fn read(&self, offset: u32, buf: &mut [u8]) -> Result<()> {
            self.reads.borrow_mut().push(offset);
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
    }

    fn good() -> BlkConfigWire {
        BlkConfigWire {
            capacity: U64::new(1 << 21),
            size_max: U32::new(65536),
            seg_max: U32::new(126),
            blk_size: U32::new(4096),
            num_queues: U16::new(4),
            max_discard_sectors: U32::new(0),
            max_discard_seg: U32::new(1),
            discard_sector_alignment: U32::new(8),
            max_write_zeroes_sectors: U32::new(1000),
            max_write_zeroes_seg: U32::new(0),
            write_zeroes_may_unmap: 1,
            max_secure_erase_sectors: U32::new(64),
            max_secure_erase_seg: U32::new(2),
            secure_erase_sector_alignment: U32::new(8),
            ..Default::default()
        }
    }

    fn src(c: &BlkConfigWire) -> Bytes {
        let mut data = [0u8; 72];
        data.copy_from_slice(c.as_bytes());
        Bytes {
            data,
            reads: RefCell::new(Vec::new()),
        }
    }

    #[test]
    fn all_fields_with_normalised_limits() {
        let info = read_info(&src(&good()), DRIVER_FEATURES).unwrap();
        assert_eq!(info.capacity, 1 << 21);
        assert_eq!(info.block_size, 4096);
        assert_eq!(info.block_sectors(), 8);
        assert_eq!(info.size_max, Some(65536));
        assert_eq!(info.seg_max, Some(126));
        assert_eq!(info.num_queues, 4);
        let d = info.discard.unwrap();
        // 0 = unlimited, rounded down to whole 4 KiB blocks.
        assert_eq!(d.max_sectors, u32::MAX - u32::MAX % 8);
        assert_eq!((d.max_segments, d.alignment), (1, 8));
        let w = info.write_zeroes.unwrap();
        assert_eq!((w.max_sectors, w.max_segments), (1000, u32::MAX));
        assert!(info.write_zeroes_may_unmap);
        assert_eq!(info.secure_erase.unwrap().max_sectors, 64);
        // CONFIG_WCE negotiated and `writeback` reads 0: write-through.
        assert!(info.flush && info.config_wce && !info.writeback);
    }

    #[test]
    fn fields_read_only_when_negotiated() {
        let s = src(&good());
        let info = read_info(&s, Features::VERSION_1).unwrap();
        assert_eq!(*s.reads.borrow(), [cfg::CAPACITY]);
        assert_eq!(info.block_size, 512);
        assert_eq!(info.num_queues, 1);
        assert!(info.discard.is_none() && info.seg_max.is_none() && !info.flush);
        assert!(!info.writeback);
    }

    #[test]
    fn invalid_values_are_protocol_errors() {
        type Case = (fn(&mut BlkConfigWire), Features);
        let cases: [Case; 12] = [
            (|c| c.blk_size = U32::new(0), feat::BLK_SIZE),
            (|c| c.blk_size = U32::new(256), feat::BLK_SIZE),
            (|c| c.blk_size = U32::new(1536), feat::BLK_SIZE),
            (|c| c.blk_size = U32::new(4 << 20), feat::BLK_SIZE),
            (|c| c.seg_max = U32::new(0), feat::SEG_MAX),
            (|c| c.num_queues = U16::new(0), feat::MQ),
            (|c| c.writeback = 2, feat::CONFIG_WCE),
            (|c| c.capacity = U64::new(u64::MAX), Features::empty()),
            (|c| c.max_secure_erase_seg = U32::new(0), feat::SECURE_ERASE),
            (
                |c| c.max_discard_sectors = U32::new(4),
                feat::DISCARD.union(feat::BLK_SIZE),
            ),
            (
                |c| {
                    c.size_max = U32::new(100);
                    c.seg_max = U32::new(2);
                },
                feat::SIZE_MAX.union(feat::SEG_MAX),
            ),
            (|c| c.topology.physical_block_exp = 40, feat::TOPOLOGY),
        ];
        for (i, (mutate, features)) in cases.into_iter().enumerate() {
            let mut c = good();
            mutate(&mut c);
            assert!(
                matches!(
                    read_info(&src(&c), features),
                    Err(Error::DeviceProtocol { .. })
                ),
                "case {i}"
            );
            // The same bad value is harmless when its feature is not negotiated.
            if !features.is_empty() {
                assert!(read_info(&src(&c), Features::empty()).is_ok(), "case {i}");
            }
        }
    }

    #[test]
    fn zero_size_max_means_unlimited() {
        let mut c = good();
        c.size_max = U32::new(0);
        let info = read_info(&src(&c), feat::SIZE_MAX).unwrap();
        assert_eq!(info.size_max, None);
    }
}
