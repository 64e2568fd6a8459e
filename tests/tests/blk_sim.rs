//! The virtio-blk driver over `VirtioDevice<PciTransport<..>>` and the simulated PCI
//! function, with `blk_model` serving the requests (rings served by rust-vmm's
//! `virtio-queue`), in modern, transitional and legacy modes.
//!
//! Interrupt discipline: the harness polls a queue only when an interrupt said so, so a
//! lost interrupt (a broken race-free re-enable) shows up as a stuck request.

use std::collections::BTreeMap;

use virtio_blk::wire::req_type;
use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion, Lifetime, Request, SectorRange};
use virtio_core::platform::{Dma, DmaRegion, InterruptMode};
use virtio_core::{Bus, DeviceStatus, Error, Features, Segment, VirtioDevice};
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::blk_model::{BlkModel, bits, proto};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{Sim, SimBars, SimConfig, SimInterrupt, SimIrq, SimMode};

type Dev = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;
type Outcome = Result<Completion, BlkError>;

use virtio_tests::sim::{MODES, walk_allocation_failures};
const RING: u64 = bits::INDIRECT_DESC | bits::EVENT_IDX | bits::BAD_FEATURE;
const SECTORS: u64 = 8192;

struct Rig {
    sim: Sim,
    mem: IdentityMemory,
    model: BlkModel,
    drv: BlkDriver<Dev>,
    done: BTreeMap<usize, Outcome>,
    capacity_events: Vec<u64>,
}

struct RigSpec {
    mode: SimMode,
    pref: Preference,
    generic: u64,
    queue_size: u16,
    opts: BlkOptions,
    mask: Features,
}

impl Default for RigSpec {
    fn default() -> Self {
        RigSpec {
            mode: SimMode::Modern,
            pref: Preference::Auto,
            generic: RING,
            queue_size: 128,
            opts: BlkOptions::default(),
            mask: Features::empty(),
        }
    }
}

fn try_rig(model: BlkModel, spec: RigSpec) -> (Sim, Result<BlkDriver<Dev>, BlkError>) {
    let sim = model
        .sim_builder(spec.mode, spec.generic, spec.queue_size, 32 << 20)
        .build();
    let t = probe(sim.config_space(), sim.bars(), spec.pref).expect("probe");
    let mut dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    dev.set_feature_mask(spec.mask);
    let drv = BlkDriver::new(dev, spec.opts);
    (sim, drv)
}

fn rig(model: BlkModel, spec: RigSpec) -> Rig {
    let what = format!("{:?}/{:?}", spec.mode, spec.pref);
    let (sim, drv) = try_rig(model.clone(), spec);
    let drv = drv.unwrap_or_else(|e| panic!("{what}: driver setup: {e}"));
    assert!(sim.status() & DeviceStatus::DRIVER_OK.bits() != 0);
    sim.check_init_order().unwrap();
    Rig {
        mem: sim.memory(),
        sim,
        model,
        drv,
        done: BTreeMap::new(),
        capacity_events: Vec::new(),
    }
}

impl Rig {
    /// The device serves every queue; the driver takes the interrupts and polls the queues
    /// they name. Returns requests served by the device.
    fn step(&mut self) -> usize {
        let mut served = 0;
        for q in 0..self.drv.num_queues() {
            served += self.model.serve(&self.sim, q);
        }
        for irq in self.sim.take_interrupts() {
            let vector = match irq {
                SimInterrupt::Msix(v) => Some(v),
                SimInterrupt::Intx => None,
            };
            let cause = self.drv.handle_interrupt(vector).expect("interrupt");
            if let Some(c) = cause.capacity_changed {
                self.capacity_events.push(c);
            }
            for q in cause.queues.iter() {
                let done = &mut self.done;
                self.drv
                    .poll_completions(q, |t, r| {
                        assert!(done.insert(t, r).is_none(), "token {t} completed twice");
                    })
                    .expect("poll");
            }
        }
        served
    }

    fn kick_and_run(&mut self) {
        self.drv.kick_all().unwrap();
        for _ in 0..100 {
            if self.step() == 0 && self.sim.interrupts().is_empty() {
                return;
            }
        }
        panic!("device never went idle");
    }

    fn wait(&mut self, token: usize) -> Outcome {
        self.kick_and_run();
        self.done
            .remove(&token)
            .unwrap_or_else(|| panic!("token {token} never completed (lost interrupt?)"))
    }

    fn buffer(&self, len: usize) -> DmaRegion {
        self.mem.alloc_coherent(len.max(1), 4096).unwrap()
    }

    fn bytes(&self, seg: &Segment) -> &mut [u8] {
        self.mem.bytes_at(seg.addr, seg.len as usize)
    }

    /// Scatter-gather list over `region` with the given segment lengths, each starting
    /// `gap` bytes after the previous one ends (odd alignments).
    fn sg(&self, region: &DmaRegion, lens: &[u32], gap: u64) -> Vec<Segment> {
        let mut at = region.daddr + gap;
        lens.iter()
            .map(|&l| {
                let s = Segment::new(at, l);
                at += u64::from(l) + gap;
                assert!(at <= region.daddr + region.len as u64);
                s
            })
            .collect()
    }

    fn fill(&self, sg: &[Segment], seed: u32) -> Vec<u8> {
        let mut all = Vec::new();
        for s in sg {
            let b = self.bytes(s);
            for x in b.iter_mut() {
                *x = pattern(seed, all.len());
                all.push(*x);
            }
        }
        all
    }

    fn gather(&self, sg: &[Segment]) -> Vec<u8> {
        sg.iter().flat_map(|s| self.bytes(s).to_vec()).collect()
    }

    fn assert_clean(&self) {
        assert!(
            self.model.violations.is_empty(),
            "driver broke device limits: {:?}",
            self.model.violations
        );
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
    }
}

fn pattern(seed: u32, i: usize) -> u8 {
    let x = (i as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(seed.wrapping_mul(40503));
    (x >> 13) as u8 ^ (i >> 9) as u8
}

fn limited_model() -> BlkModel {
    let mut m = BlkModel::new(SECTORS);
    m.features = bits::SEG_MAX
        | bits::SIZE_MAX
        | bits::FLUSH
        | bits::BLK_SIZE
        | bits::GEOMETRY
        | bits::TOPOLOGY;
    m.seg_max = 4;
    m.size_max = 4096;
    m.geometry = (16, 16, 63);
    m.topology = (3, 0, 1, 128);
    m
}

/// Write then read back with many shapes; compares with the pattern and with the disk.
fn integrity_workload(r: &mut Rig) {
    let region = r.buffer(1 << 20);
    let back = r.buffer(1 << 20);
    let shapes: [(&[u32], u64); 8] = [
        (&[512], 0),
        (&[4096], 0),
        (&[100, 412], 3),
        (&[1000, 24, 3072, 4000, 96], 1),
        (&[65536], 0),
        (&[20000, 12768], 5),
        (
            &[7, 505, 511, 1, 1024, 512, 512, 512, 512, 512, 512, 512],
            9,
        ),
        (&[4096; 40], 64),
    ];
    let mut token = 1000;
    let mut sector = 0u64;
    for (i, (lens, gap)) in shapes.iter().enumerate() {
        let sg = r.sg(&region, lens, *gap);
        let data = r.fill(&sg, i as u32);
        token += 1;
        r.drv.write(0, sector, &sg, token).unwrap();
        assert_eq!(r.wait(token), Ok(Completion::Done), "write shape {i}");
        let off = sector as usize * 512;
        assert_eq!(
            &r.model.disk[off..off + data.len()],
            &data[..],
            "disk after shape {i}"
        );

        // Read back through a different SG shape: pieces of 1536 bytes (12 KiB for large
        // transfers, so small rings without indirect still hold the request), odd gaps.
        let piece = if data.len() <= 16384 { 1536 } else { 12288 };
        let mut lens2 = vec![piece as u32; data.len() / piece];
        let rest = (data.len() % piece) as u32;
        if rest > 0 {
            lens2.push(rest);
        }
        let sg2 = r.sg(&back, &lens2, 11);
        for s in &sg2 {
            r.bytes(s).fill(0xEE);
        }
        token += 1;
        r.drv.read(0, sector, &sg2, token).unwrap();
        assert_eq!(r.wait(token), Ok(Completion::Done), "read shape {i}");
        assert_eq!(r.gather(&sg2), data, "read-back of shape {i}");
        sector += (data.len() as u64).div_ceil(512) + 7;
    }
    r.assert_clean();
}

#[test]
fn write_read_integrity_in_every_mode_with_splitting() {
    for (mode, pref) in MODES {
        let mut r = rig(
            limited_model(),
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        integrity_workload(&mut r);
        // seg_max 4 / size_max 4096: the 160 KiB write alone needs 10 device requests.
        let data_reqs = r
            .model
            .records
            .iter()
            .filter(|x| x.req_type == req_type::OUT)
            .count();
        assert!(
            data_reqs > 8 + 10,
            "{mode:?}: only {data_reqs} write requests"
        );
        assert!(r.model.records.iter().all(|x| x.data_descs <= 4));
        let info = r.drv.info();
        assert_eq!(info.geometry.unwrap().sectors, 63);
        assert_eq!(info.topology.unwrap().opt_io_size, 128);
        assert_eq!(r.drv.in_flight(0).unwrap(), 0);
    }
}

#[test]
fn integrity_with_4k_blocks_and_misaligned_requests_refused() {
    let mut m = limited_model();
    m.blk_size = 4096;
    let mut r = rig(m, RigSpec::default());
    assert_eq!(r.drv.info().block_size, 4096);
    let buf = r.buffer(1 << 16);
    let sg = r.sg(&buf, &[8192], 0);
    let data = r.fill(&sg, 7);
    r.drv.write(0, 16, &sg, 1).unwrap();
    assert_eq!(r.wait(1), Ok(Completion::Done));
    assert_eq!(&r.model.disk[16 * 512..16 * 512 + 8192], &data[..]);
    // Misaligned sector, or not whole 4 KiB blocks: refused before the device.
    let before = r.model.records.len();
    assert_eq!(r.drv.write(0, 1, &sg, 2), Err(BlkError::InvalidRequest));
    let half = r.sg(&buf, &[2048], 0);
    assert_eq!(r.drv.read(0, 8, &half, 3), Err(BlkError::InvalidRequest));
    assert_eq!(r.drv.read(0, 8, &[], 3), Err(BlkError::InvalidRequest));
    assert_eq!(
        r.drv.read(0, 8, &[Segment::new(buf.daddr, 0), sg[0]], 3),
        Err(BlkError::InvalidRequest)
    );
    assert_eq!(
        r.drv.read(0, SECTORS - 8, &sg, 4),
        Err(BlkError::OutOfRange)
    );
    assert_eq!(
        r.drv.read(0, u64::MAX - 7, &sg, 4),
        Err(BlkError::OutOfRange)
    );
    r.kick_and_run();
    assert_eq!(r.model.records.len(), before);
    r.assert_clean();
}

#[test]
fn flush_get_id_and_lifetime() {
    for (mode, pref) in MODES {
        let mut m = limited_model();
        m.features |= bits::LIFETIME | bits::CONFIG_WCE;
        m.writeback = 1;
        m.lifetime = [1, 4, 11];
        let legacy = mode == SimMode::Legacy || pref == Preference::Legacy;
        let mut r = rig(
            m,
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        assert!(r.drv.info().writeback && r.drv.info().config_wce);
        r.drv.flush(0, 1).unwrap();
        assert_eq!(r.wait(1), Ok(Completion::Done));
        r.drv.get_id(0, 2).unwrap();
        match r.wait(2) {
            Ok(Completion::Id(id)) => assert_eq!(id.as_bytes(), b"SIMDISK-0001"),
            other => panic!("{other:?}"),
        }
        // LIFETIME is bit 15: offered through the legacy interface too (bits 0..=31).
        let _ = legacy;
        r.drv.get_lifetime(0, 3).unwrap();
        assert_eq!(
            r.wait(3),
            Ok(Completion::Lifetime(Lifetime {
                pre_eol_info: 1,
                device_lifetime_est_typ_a: 4,
                device_lifetime_est_typ_b: 11
            }))
        );
        let types: Vec<u32> = r.model.records.iter().map(|x| x.req_type).collect();
        assert_eq!(
            types,
            [proto::T_FLUSH, proto::T_GET_ID, proto::T_GET_LIFETIME]
        );
        // Cache mode switch through config (CONFIG_WCE).
        r.drv.set_writeback(false).unwrap();
        assert_eq!(r.sim.device_config()[32], 0);
        assert!(!r.drv.info().writeback);
        r.assert_clean();
    }
}

#[test]
fn discard_write_zeroes_and_secure_erase_read_back_zeros() {
    for (mode, pref) in MODES {
        let mut m = BlkModel::new(SECTORS);
        m.features = bits::DISCARD | bits::WRITE_ZEROES | bits::SECURE_ERASE | bits::BLK_SIZE;
        m.blk_size = 1024;
        m.max_discard_sectors = 16;
        m.max_discard_seg = 2;
        m.discard_sector_alignment = 8;
        m.max_write_zeroes_sectors = 0; // unlimited
        m.max_write_zeroes_seg = 1;
        m.write_zeroes_may_unmap = 1;
        m.max_secure_erase_sectors = 32;
        m.max_secure_erase_seg = 3;
        m.secure_erase_sector_alignment = 2;
        let mut r = rig(
            m,
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        let zero = |r: &Rig, s: u64, n: u64| {
            r.model.disk[s as usize * 512..(s + n) as usize * 512]
                .iter()
                .all(|&b| b == 0)
        };
        let ranges = [
            SectorRange::new(2, 50),
            SectorRange::new(100, 6),
            SectorRange::new(200, 2),
        ];
        r.drv.discard(0, &ranges, 1).unwrap();
        assert_eq!(r.wait(1), Ok(Completion::Done));
        for x in &ranges {
            assert!(zero(&r, x.sector, x.sectors), "{mode:?} discard {x:?}");
        }
        assert!(!zero(&r, 0, 2) && !zero(&r, 52, 2));
        let discards: Vec<_> = r
            .model
            .records
            .iter()
            .filter(|x| x.req_type == proto::T_DISCARD)
            .collect();
        // 2..52 in pieces of <= 16 ending on 8-sector boundaries: 2-16, 16-32, 32-48, 48-52;
        // then 100+6 and 200+2: 6 segments, 2 per request.
        assert_eq!(discards.len(), 3, "{discards:?}");
        assert_eq!(discards[0].ranges, vec![(2, 14, 0), (16, 16, 0)]);

        r.drv
            .write_zeroes(
                0,
                &[SectorRange::new(1000, 3000), SectorRange::new(4000, 10)],
                true,
                2,
            )
            .unwrap();
        assert_eq!(r.wait(2), Ok(Completion::Done));
        assert!(zero(&r, 1000, 3000) && zero(&r, 4000, 10) && !zero(&r, 4010, 2));
        let wz: Vec<_> = r
            .model
            .records
            .iter()
            .filter(|x| x.req_type == proto::T_WRITE_ZEROES)
            .collect();
        assert_eq!(wz.len(), 2);
        assert_eq!(wz[0].ranges, vec![(1000, 3000, 1)], "unmap flag set");

        r.drv
            .secure_erase(0, &[SectorRange::new(6000, 100)], 3)
            .unwrap();
        assert_eq!(r.wait(3), Ok(Completion::Done));
        assert!(zero(&r, 6000, 100));
        let se: Vec<_> = r
            .model
            .records
            .iter()
            .filter(|x| x.req_type == proto::T_SECURE_ERASE)
            .collect();
        assert_eq!(
            se.len(),
            2,
            "100 sectors in <= 32-sector pieces, 3 per request"
        );

        // Ranges must be whole 1 KiB blocks and inside the disk.
        assert_eq!(
            r.drv.discard(0, &[SectorRange::new(3, 2)], 4),
            Err(BlkError::InvalidRequest)
        );
        assert_eq!(r.drv.discard(0, &[], 4), Err(BlkError::InvalidRequest));
        assert_eq!(
            r.drv.discard(0, &[SectorRange::new(SECTORS - 2, 4)], 4),
            Err(BlkError::OutOfRange)
        );
        r.assert_clean();
    }
}

#[test]
fn read_only_device_refuses_writes_before_the_device() {
    let mut m = limited_model();
    m.features |= bits::RO | bits::DISCARD | bits::WRITE_ZEROES;
    let mut r = rig(m, RigSpec::default());
    assert!(r.drv.info().read_only);
    let buf = r.buffer(8192);
    let sg = r.sg(&buf, &[4096], 0);
    assert_eq!(r.drv.write(0, 0, &sg, 1), Err(BlkError::ReadOnly));
    assert_eq!(
        r.drv.discard(0, &[SectorRange::new(0, 8)], 2),
        Err(BlkError::ReadOnly)
    );
    assert_eq!(
        r.drv.write_zeroes(0, &[SectorRange::new(0, 8)], false, 3),
        Err(BlkError::ReadOnly)
    );
    assert_eq!(
        r.drv.secure_erase(0, &[SectorRange::new(0, 8)], 4),
        Err(BlkError::Unsupported)
    );
    r.drv.read(0, 0, &sg, 5).unwrap();
    assert_eq!(r.wait(5), Ok(Completion::Done));
    r.drv.flush(0, 6).unwrap();
    assert_eq!(r.wait(6), Ok(Completion::Done));
    assert_eq!(
        r.model
            .records
            .iter()
            .map(|x| x.req_type)
            .collect::<Vec<_>>(),
        [proto::T_IN, proto::T_FLUSH]
    );
    r.assert_clean();
}

#[test]
fn injected_ioerr_fails_only_the_requests_that_touch_it() {
    for (mode, pref) in MODES {
        let mut r = rig(
            limited_model(),
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        r.model.io_error_sectors.insert(100);
        let buf = r.buffer(1 << 20);
        // 16 reads of 8 sectors from sector 40 to 168: only the one covering 100 fails.
        let mut segs = Vec::new();
        for i in 0..16u64 {
            let sg = r.sg(&buf, &[4096], 0);
            let sg = vec![Segment::new(sg[0].addr + i * 4096 * 2, 4096)];
            r.drv.read(0, 40 + i * 8, &sg, i as usize).unwrap();
            segs.push(sg);
        }
        // A split write (64 KiB, seg_max 4 x size_max 4 KiB: 4 parts) covering sector 100
        // completes once, with the error.
        let big = r.sg(&buf, &[65536], 0);
        let big = vec![Segment::new(big[0].addr + (1 << 19), 65536)];
        r.drv.write(0, 64, &big, 99).unwrap();
        r.kick_and_run();
        for i in 0..16usize {
            let want = if (40 + i * 8..48 + i * 8).contains(&100) {
                Err(BlkError::Io)
            } else {
                Ok(Completion::Done)
            };
            assert_eq!(r.done.remove(&i), Some(want), "{mode:?} read {i}");
        }
        assert_eq!(r.done.remove(&99), Some(Err(BlkError::Io)));
        assert!(r.done.is_empty());
        let parts = r
            .model
            .records
            .iter()
            .filter(|x| x.req_type == proto::T_OUT)
            .count();
        assert_eq!(parts, 4);
        // The driver carries on.
        r.model.io_error_sectors.clear();
        r.drv.read(0, 96, &segs[0], 200).unwrap();
        assert_eq!(r.wait(200), Ok(Completion::Done));
        assert_eq!(r.drv.in_flight(0).unwrap(), 0);
        r.assert_clean();
    }
}

#[test]
fn unsupp_is_its_own_error() {
    let mut r = rig(limited_model(), RigSpec::default());
    r.model.unsupported_types.insert(proto::T_GET_ID);
    r.drv.get_id(0, 1).unwrap();
    assert_eq!(r.wait(1), Err(BlkError::Unsupported));
    r.model.unsupported_types.insert(proto::T_FLUSH);
    r.drv.flush(0, 2).unwrap();
    assert_eq!(r.wait(2), Err(BlkError::Unsupported));
    // Features the device did not offer: refused without a round trip.
    let n = r.model.records.len();
    assert_eq!(r.drv.get_lifetime(0, 3), Err(BlkError::Unsupported));
    assert_eq!(
        r.drv.discard(0, &[SectorRange::new(0, 8)], 3),
        Err(BlkError::Unsupported)
    );
    assert_eq!(r.drv.set_writeback(true), Err(BlkError::Unsupported));
    assert_eq!(r.model.records.len(), n);
}

#[test]
fn capacity_change_is_reported() {
    for (mode, pref) in MODES {
        let mut r = rig(
            limited_model(),
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        let buf = r.buffer(4096);
        let sg = r.sg(&buf, &[4096], 0);
        assert_eq!(r.drv.read(0, SECTORS, &sg, 1), Err(BlkError::OutOfRange));
        r.model.resize(SECTORS * 2);
        r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
        r.step();
        assert_eq!(r.capacity_events, vec![SECTORS * 2], "{mode:?}");
        assert_eq!(r.drv.info().capacity, SECTORS * 2);
        r.drv.read(0, SECTORS, &sg, 1).unwrap();
        assert_eq!(r.wait(1), Ok(Completion::Done));
        // A config interrupt without a capacity change reports nothing.
        r.sim.raise_config_interrupt();
        r.step();
        assert_eq!(r.capacity_events.len(), 1);
        // A capacity that overflows bytes is a protocol error.
        r.sim.set_device_config(0, &u64::MAX.to_le_bytes());
        let irq = r.sim.take_interrupts();
        let v = match irq.as_slice() {
            [SimInterrupt::Msix(v)] => Some(*v),
            _ => None,
        };
        assert!(matches!(
            r.drv.handle_interrupt(v),
            Err(BlkError::Virtio(Error::DeviceProtocol { .. }))
        ));
        assert_eq!(r.drv.info().capacity, SECTORS * 2);
    }
}

#[test]
fn four_request_queues_with_mq() {
    for (mode, pref) in [MODES[0], MODES[2]] {
        let mut m = limited_model();
        m.features |= bits::MQ;
        m.num_queues = 4;
        let mut r = rig(
            m,
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        assert_eq!(r.drv.num_queues(), 4);
        assert_eq!(
            r.drv.bus().interrupt_mode(),
            InterruptMode::MsiX { vectors: 5 }
        );
        let buf = r.buffer(1 << 20);
        for q in 0..4u16 {
            for k in 0..8u64 {
                let sg = vec![Segment::new(
                    buf.daddr + (u64::from(q) * 8 + k) * 8192,
                    8192,
                )];
                let data = r.fill(&sg, u32::from(q) * 100 + k as u32);
                let _ = data;
                r.drv
                    .write(
                        q,
                        (u64::from(q) * 8 + k) * 16,
                        &sg,
                        usize::from(q) * 100 + k as usize,
                    )
                    .unwrap();
            }
        }
        r.kick_and_run();
        assert_eq!(r.done.len(), 32);
        assert!(r.done.values().all(|x| *x == Ok(Completion::Done)));
        for q in 0..4u16 {
            let recs: Vec<_> = r.model.records.iter().filter(|x| x.queue == q).collect();
            // 8 KiB with seg_max 4 x 4 KiB: one device request each.
            assert_eq!(recs.len(), 8, "queue {q}");
            assert!(recs.iter().all(|x| x.sector / 128 == u64::from(q)));
            assert_eq!(r.sim.kicks(q), 1, "one kick per batch on queue {q}");
            assert!(r.drv.queue_stats(q).unwrap().interrupts >= 1);
        }
        // The data landed where each queue put it.
        for q in 0..4u64 {
            for k in 0..8u64 {
                let sg = vec![Segment::new(buf.daddr + (q * 8 + k) * 8192, 8192)];
                let want = r.gather(&sg);
                let off = ((q * 8 + k) * 16 * 512) as usize;
                assert_eq!(&r.model.disk[off..off + 8192], &want[..]);
            }
        }
        assert!(matches!(
            r.drv.flush(4, 1),
            Err(BlkError::NoSuchQueue { queue: 4 })
        ));
        r.assert_clean();
    }
}

#[test]
fn indirect_and_event_idx_on_and_off() {
    for indirect in [false, true] {
        for event_idx in [false, true] {
            for (mode, pref) in [MODES[0], MODES[3]] {
                let mut mask = Features::empty();
                if !indirect {
                    mask |= Features::INDIRECT_DESC;
                }
                if !event_idx {
                    mask |= Features::EVENT_IDX;
                }
                let mut r = rig(
                    limited_model(),
                    RigSpec {
                        mode,
                        pref,
                        mask,
                        queue_size: 128,
                        ..Default::default()
                    },
                );
                assert_eq!(r.drv.features().contains(Features::INDIRECT_DESC), indirect);
                assert_eq!(r.sim.queue_info(0).unwrap().event_idx, event_idx);
                integrity_workload(&mut r);
                let stats = r.drv.queue_stats(0).unwrap();
                assert_eq!(stats.indirect > 0, indirect, "{stats:?}");
                // Without indirect a 4-segment request takes 6 of 128 descriptors.
                let depth = r.drv.queue_depth(0).unwrap();
                assert_eq!(depth, if indirect { 128 } else { 128 / 6 });
            }
        }
    }
}

#[test]
fn batching_one_kick_per_batch_and_queue_depth() {
    for event_idx in [false, true] {
        for indirect in [false, true] {
            let mut mask = Features::empty();
            if !event_idx {
                mask |= Features::EVENT_IDX;
            }
            if !indirect {
                mask |= Features::INDIRECT_DESC;
            }
            let mut r = rig(
                limited_model(),
                RigSpec {
                    mask,
                    queue_size: 32,
                    ..Default::default()
                },
            );
            let buf = r.buffer(1 << 20);
            // Each request: 4 KiB in one segment = 3 descriptors, or 1 with indirect.
            let per = if indirect { 1 } else { 3 };
            let depth = 32 / per;
            for batch in 0..5u64 {
                let mut n = 0;
                loop {
                    let sg = [Segment::new(buf.daddr + n * 4096, 4096)];
                    match r.drv.read(0, n * 8, &sg, (batch * 100 + n) as usize) {
                        Ok(()) => n += 1,
                        Err(BlkError::QueueFull) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                assert_eq!(n, depth, "queue depth from free descriptors");
                let kicks = r.sim.kicks(0);
                assert!(r.drv.kick(0).unwrap());
                assert!(!r.drv.kick(0).unwrap(), "nothing new: no second kick");
                assert_eq!(r.sim.kicks(0), kicks + 1, "one kick per batch");
                r.kick_and_run();
                assert_eq!(r.done.len() as u64, depth);
                r.done.clear();
            }
            // A request that needs more parts than the ring has slots is TooLarge, one that
            // does not fit now is QueueFull and queues nothing.
            let huge = [Segment::new(buf.daddr, 1 << 20)];
            assert_eq!(r.drv.read(0, 0, &huge, 1), Err(BlkError::TooLarge));
            let sg = [Segment::new(buf.daddr, 16384)];
            r.drv.read(0, 0, &sg, 1).unwrap();
            let fill = if indirect { 31 } else { 8 };
            for i in 0..fill {
                r.drv
                    .read(0, 0, &[Segment::new(buf.daddr, 4096)], 10 + i)
                    .unwrap();
            }
            let before = r.drv.queue_stats(0).unwrap().added;
            assert_eq!(r.drv.read(0, 0, &sg, 2), Err(BlkError::QueueFull));
            assert_eq!(
                r.drv.queue_stats(0).unwrap().added,
                before,
                "nothing queued"
            );
            r.kick_and_run();
            assert_eq!(r.done.len(), fill + 1);
            r.assert_clean();
        }
    }
}

#[test]
fn out_of_order_completion_of_split_requests() {
    let mut r = rig(limited_model(), RigSpec::default());
    r.model.reverse_completion = true;
    let buf = r.buffer(1 << 20);
    for k in 0..6u64 {
        let sg = [Segment::new(buf.daddr + k * 65536, 65536)];
        r.fill(&sg, k as u32);
        r.drv.write(0, k * 128, &sg, k as usize).unwrap();
    }
    r.kick_and_run();
    assert_eq!(r.done.len(), 6);
    assert!(r.done.values().all(|x| *x == Ok(Completion::Done)));
    for k in 0..6u64 {
        let sg = [Segment::new(buf.daddr + k * 65536, 65536)];
        let off = (k * 128 * 512) as usize;
        assert_eq!(&r.model.disk[off..off + 65536], &r.gather(&sg)[..]);
    }
    r.assert_clean();
}

#[test]
fn hostile_status_and_lengths_become_errors() {
    for (mode, pref) in MODES {
        let mut r = rig(
            limited_model(),
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        let buf = r.buffer(65536);
        let sg = [Segment::new(buf.daddr, 4096)];
        let protocol =
            |o: &Outcome| matches!(o, Err(BlkError::Virtio(Error::DeviceProtocol { .. })));

        r.model.status_override = Some(7);
        r.drv.write(0, 0, &sg, 1).unwrap();
        assert!(protocol(&r.wait(1)), "status 7");
        r.model.status_override = None;

        r.model.len_override = Some(0);
        r.drv.flush(0, 2).unwrap();
        assert!(protocol(&r.wait(2)), "used len 0");

        r.model.len_override = Some(100);
        r.drv.read(0, 0, &sg, 3).unwrap();
        assert!(protocol(&r.wait(3)), "short read");
        // The boundary: the data but not the status byte, then both.
        r.model.len_override = Some(4096);
        r.drv.read(0, 0, &sg, 30).unwrap();
        assert!(protocol(&r.wait(30)), "used len without the status byte");
        r.model.len_override = Some(4097);
        r.drv.read(0, 0, &sg, 31).unwrap();
        assert_eq!(r.wait(31), Ok(Completion::Done), "data and status byte");
        r.model.len_override = None;

        // Still working.
        r.drv.read(0, 0, &sg, 4).unwrap();
        assert_eq!(r.wait(4), Ok(Completion::Done));

        // A used length beyond the chain's writable bytes breaks the queue: the poll
        // reports it, abort_all fails what was in flight, restart brings it back.
        r.model.len_override = Some(1 << 20);
        r.drv.read(0, 0, &sg, 5).unwrap();
        r.drv.read(0, 8, &sg, 6).unwrap();
        r.drv.kick_all().unwrap();
        r.model.serve(&r.sim, 0);
        r.model.len_override = None;
        let mut err = None;
        for irq in r.sim.take_interrupts() {
            let v = match irq {
                SimInterrupt::Msix(v) => Some(v),
                SimInterrupt::Intx => None,
            };
            let cause = r.drv.handle_interrupt(v).unwrap();
            if cause.queues.contains(0) {
                err = r
                    .drv
                    .poll_completions(0, |_, _| panic!("nothing completes"))
                    .err();
            }
        }
        assert!(
            matches!(err, Some(BlkError::Virtio(Error::UsedLenTooLarge { .. }))),
            "{err:?}"
        );
        let mut aborted = Vec::new();
        r.drv.abort_all(|t, res| aborted.push((t, res)));
        aborted.sort_by_key(|x| x.0);
        assert_eq!(
            aborted,
            vec![(5, Err(BlkError::Aborted)), (6, Err(BlkError::Aborted))]
        );
        assert!(matches!(
            r.drv.read(0, 0, &sg, 7),
            Err(BlkError::Virtio(Error::InvalidState))
        ));
        r.drv.restart().unwrap();
        r.drv.read(0, 0, &sg, 7).unwrap();
        assert_eq!(r.wait(7), Ok(Completion::Done));
    }
}

/// The simulated function offering RING_PACKED serves the queue as a packed ring (its
/// device side is `packed_device`, which checks every descriptor the driver writes): the
/// driver negotiates it, keeps the data intact through every request shape, with and
/// without indirect tables and EVENT_IDX, and a used length beyond the chain breaks the
/// queue as on the split ring.
#[test]
fn packed_ring_in_the_simulated_function() {
    for mask in [
        Features::empty(),
        Features::INDIRECT_DESC,
        Features::EVENT_IDX,
        Features::INDIRECT_DESC | Features::EVENT_IDX,
    ] {
        let mut r = rig(
            limited_model(),
            RigSpec {
                generic: RING | virtio_tests::sim::F_RING_PACKED,
                mask,
                ..Default::default()
            },
        );
        assert!(r.drv.features().contains(Features::RING_PACKED), "{mask:?}");
        integrity_workload(&mut r);

        let buf = r.buffer(4096);
        let sg = [Segment::new(buf.daddr, 4096)];
        r.model.len_override = Some(1 << 20);
        r.drv.read(0, 0, &sg, 5).unwrap();
        r.drv.kick_all().unwrap();
        r.model.serve(&r.sim, 0);
        r.model.len_override = None;
        let err = r
            .drv
            .poll_completions(0, |_, _| panic!("nothing completes"))
            .err();
        assert!(
            matches!(err, Some(BlkError::Virtio(Error::UsedLenTooLarge { .. }))),
            "{mask:?}: {err:?}"
        );
        let mut aborted = Vec::new();
        r.drv.abort_all(|t, res| aborted.push((t, res)));
        assert_eq!(aborted, vec![(5, Err(BlkError::Aborted))]);
        r.drv.restart().unwrap();
        assert!(r.drv.features().contains(Features::RING_PACKED));
        r.drv.read(0, 0, &sg, 6).unwrap();
        assert_eq!(r.wait(6), Ok(Completion::Done), "{mask:?}: after restart");
    }
}

#[test]
fn invalid_config_fails_setup() {
    let cases: [fn(&mut BlkModel); 4] = [
        |m| m.blk_size = 1000,
        |m| m.seg_max = 0,
        |m| {
            m.features |= bits::MQ;
            m.num_queues = 0;
        },
        |m| {
            m.features |= bits::SECURE_ERASE;
            m.max_secure_erase_sectors = 0;
        },
    ];
    for (i, mutate) in cases.into_iter().enumerate() {
        let mut m = limited_model();
        mutate(&mut m);
        let (sim, drv) = try_rig(m, RigSpec::default());
        assert!(
            matches!(drv, Err(BlkError::Virtio(Error::DeviceProtocol { .. }))),
            "case {i}"
        );
        assert_eq!(sim.status() & DeviceStatus::DRIVER_OK.bits(), 0, "case {i}");
    }
}

#[test]
fn legacy_device_without_flush_or_indirect() {
    // An old device: legacy interface only, no FLUSH, no INDIRECT_DESC, no EVENT_IDX, and
    // the legacy bits BARRIER and SCSI offered (refused).
    let mut m = BlkModel::new(SECTORS);
    m.features = bits::SEG_MAX | bits::BARRIER | bits::SCSI;
    m.seg_max = 8;
    let mut r = rig(
        m,
        RigSpec {
            mode: SimMode::Legacy,
            generic: 0,
            queue_size: 64,
            ..Default::default()
        },
    );
    let f = r.sim.driver_features();
    assert_eq!(f & (bits::BARRIER | bits::SCSI | bits::FLUSH), 0);
    assert_eq!(
        r.drv.flush(0, 1),
        Err(BlkError::Unsupported),
        "write-through: nothing to flush"
    );
    assert!(!r.drv.info().writeback);
    integrity_workload(&mut r);
    assert_eq!(r.drv.queue_stats(0).unwrap().indirect, 0);
    r.assert_clean();
}

#[test]
fn refused_features_are_never_acknowledged() {
    let mut m = limited_model();
    m.features |= bits::ZONED | bits::BARRIER | bits::SCSI | bits::LIFETIME;
    let r = rig(m, RigSpec::default());
    let f = r.sim.driver_features();
    assert_eq!(
        f & (bits::ZONED | bits::BARRIER | bits::SCSI | bits::BAD_FEATURE),
        0
    );
    assert_ne!(f & bits::LIFETIME, 0);
    assert_ne!(f & bits::VERSION_1, 0);
}

#[test]
fn polling_mode_without_interrupts() {
    let mut r = rig(
        limited_model(),
        RigSpec {
            opts: BlkOptions {
                interrupts: false,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let buf = r.buffer(8192);
    let sg = [Segment::new(buf.daddr, 8192)];
    r.drv.read(0, 0, &sg, 1).unwrap();
    r.drv.kick(0).unwrap();
    r.model.serve(&r.sim, 0);
    let mut got = Vec::new();
    assert_eq!(
        r.drv.poll_completions(0, |t, x| got.push((t, x))).unwrap(),
        1
    );
    assert_eq!(got, vec![(1, Ok(Completion::Done))]);
    let _ = Request::Flush;
}

/// Issue 14 (smaller): a config change with `writeback` neither 0 nor 1 was taken as
/// write-through (no more flushes) while `read_info` refuses the same value at init. Now
/// both refuse it and the previous mode stays.
#[test]
fn invalid_writeback_after_a_config_change_is_refused() {
    const WRITEBACK: usize = 32; // §5.2.4 virtio_blk_config.writeback
    for (mode, pref) in MODES {
        let mut m = limited_model();
        m.features |= bits::CONFIG_WCE;
        m.writeback = 1;
        let mut r = rig(
            m,
            RigSpec {
                mode,
                pref,
                ..Default::default()
            },
        );
        assert!(r.drv.info().writeback);
        r.sim.set_device_config(WRITEBACK, &[2]);
        assert!(
            matches!(
                r.drv.handle_config_change(),
                Err(BlkError::Virtio(Error::DeviceProtocol { .. }))
            ),
            "{mode:?}/{pref:?}"
        );
        assert!(r.drv.info().writeback, "writeback mode kept");
        // A valid value is taken.
        r.sim.set_device_config(WRITEBACK, &[0]);
        assert_eq!(r.drv.handle_config_change(), Ok(None));
        assert!(!r.drv.info().writeback);
    }
}

/// Issue 14: every error after `setup_queues` resets and frees. Each allocation of
/// `BlkDriver::new` fails in turn: nothing stays allocated and the device is not live.
#[test]
fn new_failing_at_any_allocation_frees_everything() {
    for (mode, pref) in MODES {
        walk_allocation_failures(
            &format!("{mode:?}/{pref:?}"),
            || {
                limited_model()
                    .sim_builder(mode, RING, 128, 32 << 20)
                    .build()
            },
            |sim| {
                let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
                let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
                BlkDriver::new(dev, BlkOptions::default())
            },
            |_, _| {},
        );
    }
}

/// A discard needing more device requests than the queue holds (`submit` answers
/// `TooLarge`) goes with `submit_ranges_from` in shares, each queued all or nothing within
/// the caller's bound and the ring (descriptors too: without indirect descriptors each device
/// request takes three), each completing its token once; the device discards every sector,
/// once. Misuse is refused before anything is queued.
#[test]
fn a_range_request_too_long_for_the_ring_goes_in_shares() {
    for (generic, max_parts, per_share) in [
        (RING, usize::MAX, 16),
        (RING, 3, 3),
        (RING, 0, 1),
        (bits::EVENT_IDX, usize::MAX, 5),
    ] {
        let what = format!("features {generic:#x}, max_parts {max_parts}");
        let mut m = BlkModel::new(SECTORS);
        m.features = bits::DISCARD;
        m.max_discard_sectors = 8;
        m.max_discard_seg = 1;
        m.discard_sector_alignment = 8;
        let mut r = rig(
            m,
            RigSpec {
                generic,
                queue_size: 16,
                ..Default::default()
            },
        );
        let ranges = [SectorRange::new(64, 8 * 40)];
        assert_eq!(
            r.drv.discard(0, &ranges, 1),
            Err(BlkError::TooLarge),
            "{what}"
        );
        let req = Request::Discard { ranges: &ranges };
        let mut from = Default::default();
        let mut shares = Vec::new();
        loop {
            let before = r.model.records.len();
            let rest = r
                .drv
                .submit_ranges_from(0, req, from, max_parts, 2)
                .unwrap();
            assert_eq!(r.wait(2), Ok(Completion::Done), "{what}");
            shares.push(r.model.records.len() - before);
            match rest {
                Some(next) => from = next,
                None => break,
            }
        }
        assert!(shares.iter().all(|&n| n <= per_share), "{what}: {shares:?}");
        assert_eq!(shares.iter().sum::<usize>(), 40, "{what}");
        assert_eq!(shares.len(), 40usize.div_ceil(per_share), "{what}");
        let discarded: Vec<(u64, u32, u32)> = r
            .model
            .records
            .iter()
            .flat_map(|x| x.ranges.clone())
            .collect();
        let want: Vec<(u64, u32, u32)> = (0..40).map(|k| (64 + 8 * k, 8, 0)).collect();
        assert_eq!(discarded, want, "{what}: every sector once, in order");

        // Not a range request; a position past the end of these ranges (from a longer
        // list); a range the device cannot take. Nothing reaches the device.
        let id = r
            .drv
            .submit_ranges_from(0, Request::GetId, Default::default(), 4, 3);
        assert_eq!(id, Err(BlkError::InvalidRequest), "{what}");
        let long = [SectorRange::new(0, 8 * 40)];
        let past = r
            .drv
            .submit_ranges_from(
                0,
                Request::Discard { ranges: &long },
                Default::default(),
                39,
                3,
            )
            .unwrap()
            .expect("one share left");
        assert_eq!(r.wait(3), Ok(Completion::Done));
        let short = [SectorRange::new(0, 8)];
        let at_end = r
            .drv
            .submit_ranges_from(0, Request::Discard { ranges: &short }, past, 4, 4);
        assert_eq!(at_end, Err(BlkError::InvalidRequest), "{what}");
        let beyond = [SectorRange::new(SECTORS - 8, 16)];
        let beyond = Request::Discard { ranges: &beyond };
        assert_eq!(
            r.drv
                .submit_ranges_from(0, beyond, Default::default(), 4, 4),
            Err(BlkError::OutOfRange)
        );
        r.kick_and_run();
        assert!(r.done.is_empty(), "{what}: {:?}", r.done);
        r.assert_clean();
    }
}
