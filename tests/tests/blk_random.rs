//! Randomised workloads against the simulated block device: random device limits (seg_max,
//! size_max, queue size, indirect, EVENT_IDX, transport mode), random scatter-gather shapes,
//! many requests in flight, completions in or out of order, injected bad sectors. A shadow
//! disk is the oracle: every read returns what the shadow says, every request completes
//! exactly once, the device never sees a request beyond its limits.

use std::collections::BTreeMap;

use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion, SectorRange};
use virtio_core::platform::Dma;
use virtio_core::{Features, Segment, VirtioDevice};
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::blk_model::{BlkModel, bits};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::prng::Rng;
use virtio_tests::sim::{SimBars, SimConfig, SimInterrupt, SimIrq, SimMode};

type Dev = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;

const SECTORS: u64 = 4096;
const REGION: u64 = 64; // sectors per disjoint region

#[derive(Debug)]
enum Op {
    Read { sector: u64, sg: Vec<Segment> },
    Write { sector: u64, len: usize },
    Zero { sector: u64, sectors: u64 },
    Flush,
}

fn run_seed(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let modes = [
        (SimMode::Modern, Preference::Auto),
        (SimMode::Transitional, Preference::Auto),
        (SimMode::Transitional, Preference::Legacy),
        (SimMode::Legacy, Preference::Auto),
    ];
    let (mode, pref) = modes[rng.below(4) as usize];
    let mut model = BlkModel::new(SECTORS);
    model.features = bits::SEG_MAX | bits::FLUSH | bits::DISCARD | bits::WRITE_ZEROES;
    model.seg_max = 1 + rng.below(8) as u32;
    if rng.coin() {
        model.features |= bits::SIZE_MAX;
        model.size_max = [1024, 4096, 65536][rng.below(3) as usize];
    }
    model.max_discard_sectors = 8 * (1 + rng.below(8) as u32);
    model.max_discard_seg = 1 + rng.below(3) as u32;
    model.max_write_zeroes_sectors = 8 * (1 + rng.below(8) as u32);
    model.max_write_zeroes_seg = 1 + rng.below(3) as u32;
    model.reverse_completion = rng.coin();
    let mut generic = bits::BAD_FEATURE;
    if rng.coin() {
        generic |= bits::INDIRECT_DESC;
    }
    if rng.coin() {
        generic |= bits::EVENT_IDX;
    }
    let queue_size = [16u16, 64, 256][rng.below(3) as usize];
    let bad_sector = if rng.coin() {
        Some(rng.below(SECTORS))
    } else {
        None
    };
    if let Some(s) = bad_sector {
        model.io_error_sectors.insert(s);
    }
    let what = format!(
        "seed {seed}: {mode:?}/{pref:?} q{queue_size} seg_max {} size_max {} generic {generic:#x} bad {bad_sector:?}",
        model.seg_max, model.size_max
    );

    let sim = model
        .sim_builder(mode, generic, queue_size, 16 << 20)
        .build();
    let mem = sim.memory();
    let t = probe(sim.config_space(), sim.bars(), pref).expect("probe");
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let mut drv: BlkDriver<Dev> = BlkDriver::new(dev, BlkOptions::default()).expect(&what);
    let mut shadow = model.disk.clone();
    let buf = mem.alloc_coherent(4 << 20, 4096).unwrap();
    let mut submitted = 0u64;

    for batch in 0..25 {
        let mut regions: Vec<u64> = (0..SECTORS / REGION).collect();
        let mut ops: BTreeMap<usize, Op> = BTreeMap::new();
        let mut buf_off = 0u64;
        for k in 0..1 + rng.below(20) as usize {
            let token = batch * 1000 + k;
            let region = regions.swap_remove(rng.below(regions.len() as u64) as usize);
            let sectors = 1 + rng.below(REGION);
            let sector = region * REGION + rng.below(REGION - sectors + 1);
            // A scatter-gather list for `sectors` sectors: pieces >= 128 bytes (whole
            // sectors when seg_max < 4, so every window of seg_max pieces holds a block).
            let total = sectors * 512;
            let unit = if model.seg_max < 4 { 512 } else { 128 };
            let mut sg = Vec::new();
            let mut left = total;
            while left > 0 {
                let max_units = (left / unit).min(24);
                let len = if max_units <= 1 {
                    left
                } else {
                    unit * (1 + rng.below(max_units))
                };
                let gap = rng.below(4) * 8;
                sg.push(Segment::new(buf.daddr + buf_off + gap, len as u32));
                buf_off += len + gap;
                left -= len;
            }
            let op = match rng.below(10) {
                0..=3 => {
                    let mut data = Vec::new();
                    for s in &sg {
                        let b = mem.bytes_at(s.addr, s.len as usize);
                        for x in b.iter_mut() {
                            *x = rng.next_u64() as u8;
                        }
                        data.extend_from_slice(b);
                    }
                    let r = drv.write(0, sector, &sg, token);
                    if r.is_ok() {
                        let off = sector as usize * 512;
                        shadow[off..off + data.len()].copy_from_slice(&data);
                    }
                    (
                        r,
                        Op::Write {
                            sector,
                            len: data.len(),
                        },
                    )
                }
                4..=7 => {
                    for s in &sg {
                        mem.bytes_at(s.addr, s.len as usize).fill(0xA5);
                    }
                    let r = drv.read(0, sector, &sg, token);
                    (r, Op::Read { sector, sg })
                }
                8 => {
                    let range = [SectorRange::new(sector, sectors)];
                    let r = if rng.coin() {
                        drv.discard(0, &range, token)
                    } else {
                        drv.write_zeroes(0, &range, rng.coin(), token)
                    };
                    if r.is_ok() {
                        let off = sector as usize * 512;
                        shadow[off..off + sectors as usize * 512].fill(0);
                    }
                    (r, Op::Zero { sector, sectors })
                }
                _ => (drv.flush(0, token), Op::Flush),
            };
            match op {
                (Ok(()), op) => {
                    submitted += 1;
                    ops.insert(token, op);
                }
                (Err(BlkError::QueueFull), _) => break,
                (Err(BlkError::TooLarge), _) => {
                    assert!(queue_size < 256, "{what}: TooLarge on a 256-entry ring");
                    continue;
                }
                (Err(e), op) => panic!("{what}: {op:?}: {e}"),
            }
        }
        drv.kick(0).unwrap();

        // Serve, deliver interrupts, poll only what interrupts name.
        let mut done: BTreeMap<usize, Result<Completion, BlkError>> = BTreeMap::new();
        for _ in 0..50 {
            let served = model.serve(&sim, 0);
            let irqs = sim.take_interrupts();
            for irq in &irqs {
                let v = match irq {
                    SimInterrupt::Msix(v) => Some(*v),
                    SimInterrupt::Intx => None,
                };
                let cause = drv.handle_interrupt(v).unwrap();
                if cause.queues.contains(0) {
                    drv.poll_completions(0, |t, r| {
                        assert!(done.insert(t, r).is_none(), "{what}: {t} twice");
                    })
                    .unwrap();
                }
            }
            if served == 0 && irqs.is_empty() {
                break;
            }
        }
        assert_eq!(
            done.keys().collect::<Vec<_>>(),
            ops.keys().collect::<Vec<_>>(),
            "{what}: batch {batch}: every request completes exactly once"
        );
        for (token, op) in &ops {
            let result = done[token];
            let touches_bad = |sector: u64, sectors: u64| {
                bad_sector.is_some_and(|b| (sector..sector + sectors).contains(&b))
            };
            match op {
                Op::Read { sector, sg } => {
                    let sectors = sg.iter().map(|s| u64::from(s.len)).sum::<u64>() / 512;
                    if touches_bad(*sector, sectors) {
                        assert_eq!(result, Err(BlkError::Io), "{what}");
                        continue;
                    }
                    assert_eq!(result, Ok(Completion::Done), "{what}: read {op:?}");
                    let got: Vec<u8> = sg
                        .iter()
                        .flat_map(|s| mem.bytes_at(s.addr, s.len as usize).to_vec())
                        .collect();
                    let off = *sector as usize * 512;
                    assert!(
                        got == shadow[off..off + got.len()],
                        "{what}: batch {batch} read at {sector} differs"
                    );
                }
                Op::Write { sector, len } => {
                    let sectors = *len as u64 / 512;
                    if touches_bad(*sector, sectors) {
                        assert_eq!(result, Err(BlkError::Io), "{what}");
                        // Parts that did not touch the bad sector were written: take the
                        // device's word for the region.
                        let off = *sector as usize * 512;
                        shadow[off..off + len].copy_from_slice(&model.disk[off..off + len]);
                    } else {
                        assert_eq!(result, Ok(Completion::Done), "{what}");
                    }
                }
                Op::Zero { sector, sectors } => {
                    if touches_bad(*sector, *sectors) {
                        assert_eq!(result, Err(BlkError::Io), "{what}");
                        let off = *sector as usize * 512;
                        let len = *sectors as usize * 512;
                        shadow[off..off + len].copy_from_slice(&model.disk[off..off + len]);
                    } else {
                        assert_eq!(result, Ok(Completion::Done), "{what}");
                    }
                }
                Op::Flush => assert_eq!(result, Ok(Completion::Done), "{what}"),
            }
        }
        assert_eq!(drv.in_flight(0).unwrap(), 0, "{what}");
        assert!(
            model.violations.is_empty(),
            "{what}: {:?}",
            model.violations
        );
    }
    assert!(
        shadow == model.disk,
        "{what}: disk diverged from the shadow"
    );
    assert!(submitted > 0, "{what}: only {submitted} requests");
    let stats = drv.queue_stats(0).unwrap();
    if !drv.features().contains(Features::INDIRECT_DESC) {
        assert_eq!(stats.indirect, 0, "{what}");
    }
}

#[test]
fn random_workloads_match_a_shadow_disk() {
    for seed in 1..=64 {
        run_seed(seed);
    }
}
