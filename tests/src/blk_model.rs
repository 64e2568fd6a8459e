//! A device-side virtio-blk backend for the simulation ([`crate::sim`]): it serves the
//! chains that rust-vmm's `virtio-queue` pops from the driver's rings against an in-memory
//! disk, like QEMU's virtio-blk does.
//!
//! Written from the spec (virtio 1.2 §5.2), independently of the driver crate: request
//! parsing, the config layout and the limit checks use their own offsets and constants.
//! Besides serving, the model checks that the driver honoured every limit it advertised
//! (`seg_max`, `size_max`, block alignment, capacity, discard/write-zeroes/secure-erase
//! sector and segment limits, header/status framing) and records each breach in
//! [`BlkModel::violations`]. It can inject IOERR on chosen sectors, answer UNSUPP to
//! chosen request types, and play a hostile device (any status byte, any used length).

use std::collections::BTreeSet;

use vm_memory::{Bytes, GuestAddress};

use crate::mem::IdentityMemory;
use crate::sim::{Chain, Sim, SimBuilder, SimMode};

/// Block feature bits (virtio 1.2 §5.2.3).
pub mod bits {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const GEOMETRY: u64 = 1 << 4;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const CONFIG_WCE: u64 = 1 << 11;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const LIFETIME: u64 = 1 << 15;
    pub const SECURE_ERASE: u64 = 1 << 16;
    pub const ZONED: u64 = 1 << 17;
    /// Legacy bits a driver must refuse.
    pub const BARRIER: u64 = 1 << 0;
    pub const SCSI: u64 = 1 << 7;
    // Generic bits.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const BAD_FEATURE: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types and status values (§5.2.6).
pub mod proto {
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const T_GET_LIFETIME: u32 = 10;
    pub const T_DISCARD: u32 = 11;
    pub const T_WRITE_ZEROES: u32 = 13;
    pub const T_SECURE_ERASE: u32 = 14;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
}
use proto::*;

/// One request the device served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub queue: u16,
    pub req_type: u32,
    pub sector: u64,
    /// Data descriptors (between header and status).
    pub data_descs: usize,
    pub data_len: u32,
    /// (sector, num_sectors, flags) of a discard/write-zeroes/secure-erase request.
    pub ranges: Vec<(u64, u32, u32)>,
    pub status: u8,
}

/// The in-memory disk and its configuration as the device presents it.
#[derive(Clone, Debug)]
pub struct BlkModel {
    pub disk: Vec<u8>,
    /// Device-specific feature bits offered (generic bits are added by `sim_builder`).
    pub features: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry: (u16, u8, u8),
    pub blk_size: u32,
    /// (physical_block_exp, alignment_offset, min_io_size, opt_io_size)
    pub topology: (u8, u8, u16, u32),
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub max_secure_erase_sectors: u32,
    pub max_secure_erase_seg: u32,
    pub secure_erase_sector_alignment: u32,
    pub id: [u8; 20],
    pub lifetime: [u16; 3],
    /// Requests touching any of these sectors fail with IOERR.
    pub io_error_sectors: BTreeSet<u64>,
    /// Request types answered with UNSUPP.
    pub unsupported_types: BTreeSet<u32>,
    /// Hostile: this status byte instead of the real one (for every request while set).
    pub status_override: Option<u8>,
    /// Hostile: this used length instead of the real one.
    pub len_override: Option<u32>,
    /// Complete a batch in reverse order (out-of-order completion).
    pub reverse_completion: bool,
    pub records: Vec<Record>,
    pub violations: Vec<String>,
}

impl BlkModel {
    /// A disk of `sectors` 512-byte sectors filled with a recognisable pattern, offering
    /// no device-specific features.
    pub fn new(sectors: u64) -> Self {
        let disk = (0..sectors as usize * 512)
            .map(|i| (i as u8) ^ 0x5A ^ (i >> 9) as u8)
            .collect();
        let mut id = [0u8; 20];
        id[..12].copy_from_slice(b"SIMDISK-0001");
        BlkModel {
            disk,
            features: 0,
            size_max: 0,
            seg_max: 0,
            geometry: (0, 0, 0),
            blk_size: 512,
            topology: (0, 0, 0, 0),
            writeback: 0,
            num_queues: 1,
            max_discard_sectors: 0,
            max_discard_seg: 0,
            discard_sector_alignment: 0,
            max_write_zeroes_sectors: 0,
            max_write_zeroes_seg: 0,
            write_zeroes_may_unmap: 0,
            max_secure_erase_sectors: 0,
            max_secure_erase_seg: 0,
            secure_erase_sector_alignment: 0,
            id,
            lifetime: [1, 2, 3],
            io_error_sectors: BTreeSet::new(),
            unsupported_types: BTreeSet::new(),
            status_override: None,
            len_override: None,
            reverse_completion: false,
            records: Vec::new(),
            violations: Vec::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        (self.disk.len() / 512) as u64
    }

    /// Grows or shrinks the disk (new sectors are zero). The caller tells the driver with
    /// `Sim::set_device_config(0, &capacity.to_le_bytes())`.
    pub fn resize(&mut self, sectors: u64) {
        self.disk.resize(sectors as usize * 512, 0);
    }

    /// `struct virtio_blk_config` (virtio 1.2 §5.2.4), 72 bytes, little-endian.
    pub fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; 72];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(0, &self.capacity().to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        put(16, &self.geometry.0.to_le_bytes());
        put(18, &[self.geometry.1, self.geometry.2]);
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.topology.0, self.topology.1]);
        put(26, &self.topology.2.to_le_bytes());
        put(28, &self.topology.3.to_le_bytes());
        put(32, &[self.writeback]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[self.write_zeroes_may_unmap]);
        put(60, &self.max_secure_erase_sectors.to_le_bytes());
        put(64, &self.max_secure_erase_seg.to_le_bytes());
        put(68, &self.secure_erase_sector_alignment.to_le_bytes());
        c
    }

    /// A simulated function for this disk: `generic` ring bits (VERSION_1 is added for
    /// modern/transitional functions), one queue per `num_queues` (with MQ) of
    /// `queue_size` entries, and `memory_len` bytes of guest memory.
    pub fn sim_builder(
        &self,
        mode: SimMode,
        generic: u64,
        queue_size: u16,
        memory_len: usize,
    ) -> SimBuilder {
        let version = if mode == SimMode::Legacy {
            0
        } else {
            bits::VERSION_1
        };
        let queues = if self.features & bits::MQ != 0 {
            usize::from(self.num_queues.max(1))
        } else {
            1
        };
        SimBuilder::new(mode, 2)
            .features(self.features | generic | version)
            .queues(&vec![queue_size; queues])
            .device_config(&self.config_bytes())
            .memory_len(memory_len)
    }

    fn negotiated(sim: &Sim, bit: u64) -> bool {
        sim.driver_features() & bit != 0
    }

    /// Serves every available chain of `queue`, completes them (in order, or reversed),
    /// then signals once. With EVENT_IDX it re-arms notifications like QEMU does
    /// (`avail_event` = the avail index it consumed up to), so the driver's next batch
    /// kicks exactly once. Returns the number served.
    pub fn serve(&mut self, sim: &Sim, queue: u16) -> usize {
        let chains = sim.pop_chains(queue);
        let mut done: Vec<(u16, u32)> = chains
            .iter()
            .map(|c| (c.head, self.handle(sim, queue, c)))
            .collect();
        if self.reverse_completion {
            done.reverse();
        }
        for &(head, len) in &done {
            sim.complete(queue, head, len);
        }
        self.rearm(sim, queue);
        if !done.is_empty() {
            sim.signal_used(queue);
        }
        done.len()
    }

    fn rearm(&self, sim: &Sim, queue: u16) {
        // `avail_event` is written to memory: not without bus mastering.
        if !sim.bus_master() {
            return;
        }
        let Some(info) = sim.queue_info(queue) else {
            return;
        };
        // EVENT_IDX's avail_event lives in the split ring's used area; a packed queue's
        // device event suppression stays at ENABLE (every buffer notified).
        if !info.event_idx || info.packed {
            return;
        }
        let Some((_, avail, used)) = info.device_side else {
            return;
        };
        let mem = sim.memory();
        let gm = mem.guest_memory();
        let Ok(avail_idx) = gm.read_obj::<u16>(GuestAddress(avail + 2)) else {
            return;
        };
        let at = used + 4 + 8 * u64::from(info.size);
        let _ = gm.write_obj(avail_idx, GuestAddress(at));
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Serves one chain; returns the used length.
    fn handle(&mut self, sim: &Sim, queue: u16, chain: &Chain) -> u32 {
        let mem = sim.memory();
        let descs = &chain.descs;
        let Some(first) = descs.first() else {
            self.violation("empty chain".into());
            return 0;
        };
        let Some(last) = descs.last().filter(|_| descs.len() >= 2) else {
            self.violation(format!("chain of {} descriptors", descs.len()));
            return 0;
        };
        if first.write_only || first.len != 16 {
            self.violation(format!("header descriptor {first:?}"));
            return 0;
        }
        if !last.write_only || last.len != 1 {
            self.violation(format!("status descriptor {last:?}"));
            return 0;
        }
        let hdr = read(&mem, first.addr, 16);
        let req_type = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let reserved = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        if reserved != 0 {
            self.violation(format!("reserved header field {reserved}"));
        }
        let data = &descs[1..descs.len() - 1];
        let data_len: u32 = data.iter().map(|d| d.len).sum();
        let mut rec = Record {
            queue,
            req_type,
            sector,
            data_descs: data.len(),
            data_len,
            ranges: Vec::new(),
            status: S_OK,
        };
        let mut written = 0u32;
        let status = if self.unsupported_types.contains(&req_type) {
            S_UNSUPP
        } else {
            match req_type {
                T_IN | T_OUT => {
                    let writing = req_type == T_OUT;
                    if data.iter().any(|d| d.write_only == writing) {
                        self.violation(format!("data direction wrong for type {req_type}"));
                    }
                    self.check_data_limits(sim, data.iter().map(|d| d.len).collect(), sector);
                    if writing && Self::negotiated(sim, bits::RO) {
                        self.violation("write on a read-only device".into());
                        S_IOERR
                    } else if let Some(status) =
                        self.range_status(sector, u64::from(data_len) / 512)
                    {
                        status
                    } else {
                        let mut off = sector as usize * 512;
                        for d in data {
                            let n = d.len as usize;
                            if writing {
                                let src = read(&mem, d.addr, n);
                                self.disk[off..off + n].copy_from_slice(&src);
                            } else {
                                write(&mem, d.addr, &self.disk[off..off + n]);
                            }
                            off += n;
                        }
                        if !writing {
                            written = data_len;
                        }
                        S_OK
                    }
                }
                T_FLUSH => {
                    if !data.is_empty() || sector != 0 {
                        self.violation("flush with data or sector".into());
                    }
                    if Self::negotiated(sim, bits::FLUSH) {
                        S_OK
                    } else {
                        S_UNSUPP
                    }
                }
                T_GET_ID | T_GET_LIFETIME => {
                    let answer: Vec<u8> = if req_type == T_GET_ID {
                        self.id.to_vec()
                    } else {
                        self.lifetime.iter().flat_map(|v| v.to_le_bytes()).collect()
                    };
                    if req_type == T_GET_LIFETIME && !Self::negotiated(sim, bits::LIFETIME) {
                        S_UNSUPP
                    } else {
                        let mut rest = &answer[..];
                        for d in data.iter().filter(|d| d.write_only) {
                            let n = rest.len().min(d.len as usize);
                            write(&mem, d.addr, &rest[..n]);
                            rest = &rest[n..];
                            written += n as u32;
                        }
                        S_OK
                    }
                }
                T_DISCARD | T_WRITE_ZEROES | T_SECURE_ERASE => {
                    self.ranges_op(sim, req_type, data, &mem, &mut rec)
                }
                _ => S_UNSUPP,
            }
        };
        rec.status = status;
        let status = self.status_override.unwrap_or(status);
        write(&mem, last.addr, &[status]);
        self.records.push(rec);
        self.len_override.unwrap_or(written + 1)
    }

    /// IOERR for a range beyond the disk or touching an injected bad sector.
    fn range_status(&self, sector: u64, sectors: u64) -> Option<u8> {
        let end = sector.checked_add(sectors)?;
        if end > self.capacity() || self.io_error_sectors.range(sector..end).next().is_some() {
            Some(S_IOERR)
        } else {
            None
        }
    }

    fn check_data_limits(&mut self, sim: &Sim, lens: Vec<u32>, sector: u64) {
        let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        if lens.is_empty() || total == 0 {
            self.violation("read/write without data".into());
        }
        if Self::negotiated(sim, bits::SEG_MAX) && lens.len() as u64 > u64::from(self.seg_max) {
            self.violation(format!(
                "{} data segments > seg_max {}",
                lens.len(),
                self.seg_max
            ));
        }
        let size_max = self.size_max;
        let too_big = lens.iter().find(|&&l| l > size_max);
        if let (true, Some(l)) = (
            Self::negotiated(sim, bits::SIZE_MAX) && size_max != 0,
            too_big,
        ) {
            self.violation(format!("segment of {l} bytes > size_max {size_max}"));
        }
        let block = if Self::negotiated(sim, bits::BLK_SIZE) {
            u64::from(self.blk_size)
        } else {
            512
        };
        if !total.is_multiple_of(block) || !(sector * 512).is_multiple_of(block) {
            self.violation(format!(
                "request at sector {sector} of {total} bytes not in whole {block}-byte blocks"
            ));
        }
    }

    fn ranges_op(
        &mut self,
        sim: &Sim,
        req_type: u32,
        data: &[crate::sim::SimDesc],
        mem: &IdentityMemory,
        rec: &mut Record,
    ) -> u8 {
        let (feature, max_sectors, max_seg) = match req_type {
            T_DISCARD => (
                bits::DISCARD,
                self.max_discard_sectors,
                self.max_discard_seg,
            ),
            T_WRITE_ZEROES => (
                bits::WRITE_ZEROES,
                self.max_write_zeroes_sectors,
                self.max_write_zeroes_seg,
            ),
            _ => (
                bits::SECURE_ERASE,
                self.max_secure_erase_sectors,
                self.max_secure_erase_seg,
            ),
        };
        if !Self::negotiated(sim, feature) {
            return S_UNSUPP;
        }
        if Self::negotiated(sim, bits::RO) {
            self.violation(format!("type {req_type} on a read-only device"));
            return S_IOERR;
        }
        if data.iter().any(|d| d.write_only) {
            self.violation("range segments must be device-readable".into());
        }
        let mut bytes = Vec::new();
        for d in data {
            bytes.extend(read(mem, d.addr, d.len as usize));
        }
        if bytes.len() % 16 != 0 || bytes.is_empty() {
            self.violation(format!("range payload of {} bytes", bytes.len()));
            return S_UNSUPP;
        }
        let segs: Vec<(u64, u32, u32)> = bytes
            .chunks(16)
            .map(|c| {
                (
                    u64::from_le_bytes(c[0..8].try_into().unwrap()),
                    u32::from_le_bytes(c[8..12].try_into().unwrap()),
                    u32::from_le_bytes(c[12..16].try_into().unwrap()),
                )
            })
            .collect();
        rec.ranges = segs.clone();
        if max_seg != 0 && segs.len() as u64 > u64::from(max_seg) {
            self.violation(format!("{} range segments > max {max_seg}", segs.len()));
            return S_UNSUPP;
        }
        let block_sectors = if Self::negotiated(sim, bits::BLK_SIZE) {
            u64::from(self.blk_size / 512)
        } else {
            1
        };
        for &(sector, n, flags) in &segs {
            if max_sectors != 0 && n > max_sectors {
                self.violation(format!("range of {n} sectors > max {max_sectors}"));
                return S_IOERR;
            }
            if n == 0 || sector % block_sectors != 0 || u64::from(n) % block_sectors != 0 {
                self.violation(format!("range {sector}+{n} not in whole blocks"));
            }
            // §5.2.6.2: the unmap bit is for write zeroes only; reserved bits are zero.
            if flags & !1 != 0 || (flags & 1 != 0 && req_type != T_WRITE_ZEROES) {
                self.violation(format!("range flags {flags:#x} on type {req_type}"));
                return S_UNSUPP;
            }
            if let Some(s) = self.range_status(sector, u64::from(n)) {
                return s;
            }
        }
        for &(sector, n, _) in &segs {
            let off = sector as usize * 512;
            self.disk[off..off + n as usize * 512].fill(0);
        }
        S_OK
    }
}

fn read(mem: &IdentityMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.guest_memory()
        .read_slice(&mut buf, GuestAddress(addr))
        .expect("device-readable buffer outside guest memory");
    buf
}

fn write(mem: &IdentityMemory, addr: u64, data: &[u8]) {
    mem.guest_memory()
        .write_slice(data, GuestAddress(addr))
        .expect("device-writable buffer outside guest memory");
}
