//! `bench-fs`: the virtio-fs driver against virtiofsd, and beside it the same bytes over
//! the virtio-blk driver on a raw image file of the same size, in one guest run. Each
//! phase is bracketed by [`bench_phase_marker`](crate::phase_marker::bench_phase_marker)
//! calls (`0x10 + phase` at its start, `0x20 + phase` at its end) so the host's
//! instruction-counting plugin can attribute guest instructions to it:
//!
//! 0. `fs_write`: `bench_bytes` written to a new file, one WRITE of `max_write` bytes
//!    (the driver's write chunk) per operation;
//! 1. `blk_write`: the same bytes written to the disk, one request of the same size each;
//! 2. `fs_read`, 3. `blk_read`: both read back in requests of that size;
//! 4. `fs_create`: `bench_files` new empty files, CREATE + RELEASE each;
//! 5. `fs_getattr`: GETATTR of each; 6. `fs_unlink`: UNLINK of each;
//! 7. `blk_4k_wr`: a block device has no metadata operations: for scale, one 4 KiB
//!    write and one 4 KiB read back per operation, `bench_files` times.
//!
//! Every operation waits for its reply (depth 1) on both devices. The filling of the
//! buffers, the names and the FORGETs happen outside the phases.

use super::super::Env;
use super::super::bus::{self, GuestBus};
use super::{Fs, GuestWaiter, mode_name, pattern_byte};
use crate::check;
use crate::cmdline::IrqMode;
use crate::platform::GuestDma;
use crate::report;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_blk::{BlkDriver, BlkOptions, Request};
use virtio_core::platform::Dma;
use virtio_core::queue::Segment;
use virtio_core::{Bus, DeviceType, VirtioDevice};
use virtio_fs::{FsDriver, FsOptions, InitInfo, NodeId, open_flags};
use virtio_pci::{Preference, probe};

/// The phases, in order (the host's `bench fs` has the same list).
pub const PHASES: [&str; 8] = [
    "fs_write",
    "blk_write",
    "fs_read",
    "blk_read",
    "fs_create",
    "fs_getattr",
    "fs_unlink",
    "blk_4k_wr",
];

/// The file the sequential phases write and read.
const FILE_NAME: &str = "bench-seq.bin";
const SEED: u64 = 0xBE4C;

fn marker(v: u8) {
    crate::phase_marker::bench_phase_marker(v);
}

/// Kicks and interrupts taken so far on a bus.
fn bus_counts(bus: &mut GuestBus) -> (u64, u64) {
    let queues: Vec<u16> = bus.queue_indices().collect();
    let kicks = queues
        .iter()
        .filter_map(|&q| bus.queue_stats(q).ok())
        .map(|s| s.kicks)
        .sum();
    (kicks, bus.interrupt_platform().total())
}

/// What one phase did.
struct Done {
    ops: u64,
    ns: u64,
    bytes: u64,
    /// FUSE requests or block requests the phase issued.
    requests: u64,
    kicks: u64,
    irqs: u64,
}

/// One blocking block request at a time over our driver.
struct Disk {
    drv: BlkDriver<GuestBus>,
}

impl Disk {
    fn io(&mut self, write: bool, sector: u64, seg: &[Segment]) -> Result<(), String> {
        let req = if write {
            Request::Write {
                sector,
                buffers: seg,
            }
        } else {
            Request::Read {
                sector,
                buffers: seg,
            }
        };
        self.drv
            .submit(0, req, 1)
            .map_err(|e| format!("submit: {e}"))?;
        self.drv.kick(0).map_err(|e| format!("kick: {e}"))?;
        let mut outcome = None;
        let mut error = None;
        let done = bus::wait_until(
            &mut self.drv,
            |d| d.bus_mut(),
            10_000,
            |d, v| {
                if let Err(e) = d.handle_interrupt(v) {
                    error = Some(e);
                }
            },
            |d| {
                let _ = d.poll_completions(0, |_, r| outcome = Some(r));
                outcome.is_some()
            },
        );
        if let Some(e) = error {
            return Err(format!("interrupt: {e}"));
        }
        match outcome {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(format!("{e}")),
            None if !done => Err("no completion in 10 s".into()),
            None => Err("no completion".into()),
        }
    }

    /// Block requests the device got so far.
    fn requests(&self) -> u64 {
        (0..self.drv.num_queues())
            .filter_map(|q| self.drv.queue_stats(q).ok())
            .map(|s| s.added)
            .sum()
    }
}

/// The file system's slot buffers: 1 MiB (the driver's largest), so READ and WRITE
/// requests are as large as the device's `max_write` / `max_pages` allow; four of them.
const FS_OPTIONS: FsOptions = FsOptions {
    data_size: 1 << 20,
    slots: 4,
    interrupts: true,
    queue_size: 0,
    max_request_queues: 1,
    max_readahead: 128 * 1024,
    uid: 0,
    gid: 0,
    pid: 1,
    max_waits: 1_000_000,
    notify_buffers: 16,
};

fn open_fs(env: &Env, timeout_ms: u64) -> Result<(Fs, GuestWaiter, InitInfo), String> {
    let func = env
        .find_virtio(DeviceType::Fs)
        .ok_or("no virtio-fs on the bus")?;
    let dev = env.open(func);
    let t = probe(dev.config, dev.bars, Preference::Auto)
        .map_err(|e| format!("probe: {}", virtio_core::Error::from(e)))?;
    let options = FsOptions {
        interrupts: env.irq != IrqMode::Poll,
        ..FS_OPTIONS
    };
    let mut fs = FsDriver::new(VirtioDevice::new(t, dev.dma, dev.irq), options)
        .map_err(|e| format!("driver setup: {e}"))?;
    let mut w = GuestWaiter {
        deadline_ns: crate::time::now_ns().saturating_add(timeout_ms.saturating_mul(1_000_000)),
    };
    match fs.init(&mut w) {
        Ok(info) => Ok((fs, w, info)),
        Err(e) => {
            fs.shutdown();
            Err(format!("FUSE_INIT: {e}"))
        }
    }
}

fn open_disk(env: &Env) -> Result<Disk, String> {
    let func = env
        .find_virtio(DeviceType::Block)
        .ok_or("no virtio-blk on the bus")?;
    let bus = bus::open(env, func)?;
    let opts = BlkOptions {
        interrupts: env.irq != IrqMode::Poll,
        ..BlkOptions::default()
    };
    let drv = BlkDriver::new(bus, opts).map_err(|e| format!("BlkDriver::new: {e}"))?;
    Ok(Disk { drv })
}

pub fn bench(env: &mut Env) {
    let bytes = env.cmdline.get_u64("bench_bytes", 32 << 20);
    let files = env.cmdline.get_u64("bench_files", 1000);
    let timeout_ms = env.cmdline.get_u64("fs_timeout_ms", 900_000);
    let (mut fs, mut w, info) = match open_fs(env, timeout_ms) {
        Ok(x) => x,
        Err(e) => {
            check!("bench.init", false, "virtio-fs: {e}");
            return;
        }
    };
    let mut disk = match open_disk(env) {
        Ok(d) => d,
        Err(e) => {
            check!("bench.init", false, "virtio-blk: {e}");
            fs.shutdown();
            return;
        }
    };
    let chunk = fs.write_chunk() as usize;
    let capacity = disk.drv.info().capacity * 512;
    let fs_mode = mode_name(fs.bus().interrupt_mode());
    let blk_mode = mode_name(disk.drv.bus().interrupt_mode());
    let fits = bytes > 0 && capacity >= bytes && chunk >= 4096;
    check!(
        "bench.init",
        fits,
        "virtio-fs: tag \"{}\", FUSE {}.{}, max_write {}, max_pages {}: {chunk}-byte READ/WRITE \
         requests ({fs_mode}); virtio-blk: {capacity}-byte disk ({blk_mode}); {bytes} bytes \
         each way in requests of {chunk} bytes, {files} files",
        fs.config().tag(),
        info.major,
        info.minor,
        info.max_write,
        info.max_pages
    );
    if !fits {
        fs.shutdown();
        return;
    }
    report::stat("bench.chunk", chunk);
    report::stat("bench.max_write", info.max_write);
    // One chunk of the pattern, in ordinary memory (fs) and in DMA memory (blk), and a
    // second DMA chunk for reads.
    let data: Vec<u8> = (0..chunk as u64).map(|i| pattern_byte(SEED, i)).collect();
    let dma = GuestDma
        .alloc_coherent(2 * chunk, 4096)
        .expect("bench buffers");
    // SAFETY: the region is ours, `2 * chunk` bytes, identity-mapped, and no request uses
    // it yet.
    let dma_bytes = unsafe { core::slice::from_raw_parts_mut(dma.vaddr.as_ptr(), 2 * chunk) };
    dma_bytes[..chunk].copy_from_slice(&data);
    dma_bytes[chunk..].fill(0);
    let mut read_buf = vec![0u8; chunk];
    // Bytes of the last request of a sequential phase.
    let last = (bytes as usize - 1) % chunk + 1;
    let names: Vec<String> = (0..files).map(|i| format!("bench-{i:05}")).collect();
    let mut nodes: Vec<NodeId> = Vec::with_capacity(names.len());

    for (i, name) in PHASES.iter().enumerate() {
        let fs_before = (fs.stats().requests, bus_counts(fs.bus_mut()));
        let blk_before = (disk.requests(), bus_counts(disk.drv.bus_mut()));
        // Set-up outside the markers.
        let mut handle = None;
        if *name == "fs_write" || *name == "fs_read" {
            let opened = if *name == "fs_write" {
                fs.create(
                    &mut w,
                    NodeId::ROOT,
                    FILE_NAME.as_bytes(),
                    open_flags::O_WRONLY | open_flags::O_TRUNC,
                    0o644,
                )
            } else {
                fs.lookup(&mut w, NodeId::ROOT, FILE_NAME.as_bytes())
                    .and_then(|e| Ok((e, fs.open(&mut w, e.node, open_flags::O_RDONLY)?)))
            };
            match opened {
                Ok((e, o)) => handle = Some((e.node, o.fh)),
                Err(e) => {
                    check!(&format!("bench.{name}"), false, "open {FILE_NAME}: {e}");
                    break;
                }
            }
        }
        let fs_before = if handle.is_some() {
            (fs.stats().requests, bus_counts(fs.bus_mut()))
        } else {
            fs_before
        };
        let t0 = crate::time::now_ns();
        marker(0x10 + i as u8);
        let result: Result<(u64, u64), String> = match *name {
            "fs_write" | "fs_read" => {
                let (node, fh) = handle.expect("opened above");
                let mut at = 0u64;
                let mut ops = 0u64;
                let mut r = Ok(());
                while at < bytes {
                    let n = (bytes - at).min(chunk as u64) as usize;
                    let got = if *name == "fs_write" {
                        fs.write(&mut w, node, fh, at, &data[..n])
                    } else {
                        fs.read(&mut w, node, fh, at, &mut read_buf[..n])
                    };
                    match got {
                        Ok(done) if done == n => {}
                        Ok(done) => {
                            r = Err(format!("{done} of {n} bytes at offset {at}"));
                            break;
                        }
                        Err(e) => {
                            r = Err(format!("at offset {at}: {e}"));
                            break;
                        }
                    }
                    at += n as u64;
                    ops += 1;
                }
                r.map(|()| (ops, at))
            }
            "blk_write" | "blk_read" => {
                let write = *name == "blk_write";
                let mut at = 0u64;
                let mut ops = 0u64;
                let mut r = Ok(());
                while at < bytes {
                    let n = (bytes - at).min(chunk as u64);
                    let buf = if write {
                        dma.daddr
                    } else {
                        dma.daddr + chunk as u64
                    };
                    if let Err(e) = disk.io(write, at / 512, &[Segment::new(buf, n as u32)]) {
                        r = Err(format!("at byte {at}: {e}"));
                        break;
                    }
                    at += n;
                    ops += 1;
                }
                r.map(|()| (ops, at))
            }
            "fs_create" => {
                let mut r = Ok(());
                for n in &names {
                    match fs.create(
                        &mut w,
                        NodeId::ROOT,
                        n.as_bytes(),
                        open_flags::O_WRONLY,
                        0o644,
                    ) {
                        Ok((e, o)) => {
                            nodes.push(e.node);
                            if let Err(err) = fs.release(&mut w, e.node, o.fh, 0) {
                                r = Err(format!("release {n}: {err}"));
                                break;
                            }
                        }
                        Err(err) => {
                            r = Err(format!("create {n}: {err}"));
                            break;
                        }
                    }
                }
                r.map(|()| (nodes.len() as u64, 0))
            }
            "fs_getattr" => {
                let mut r = Ok(());
                for &node in &nodes {
                    match fs.getattr(&mut w, node, None) {
                        Ok(a) if a.attr.size == 0 => {}
                        Ok(a) => {
                            r = Err(format!("a new file of {} bytes", a.attr.size));
                            break;
                        }
                        Err(e) => {
                            r = Err(format!("getattr: {e}"));
                            break;
                        }
                    }
                }
                r.map(|()| (nodes.len() as u64, 0))
            }
            "fs_unlink" => {
                let mut r = Ok(());
                for n in names.iter().take(nodes.len()) {
                    if let Err(e) = fs.unlink(&mut w, NodeId::ROOT, n.as_bytes()) {
                        r = Err(format!("unlink {n}: {e}"));
                        break;
                    }
                }
                r.map(|()| (nodes.len() as u64, 0))
            }
            _ => {
                // blk_4k_wr: 4 KiB written, then read back, per operation.
                let sectors = capacity / 512;
                let mut r = Ok(());
                for i in 0..files {
                    let sector = (i * 8) % (sectors - 7);
                    let write = [Segment::new(dma.daddr, 4096)];
                    let read = [Segment::new(dma.daddr + chunk as u64, 4096)];
                    if let Err(e) = disk
                        .io(true, sector, &write)
                        .and_then(|()| disk.io(false, sector, &read))
                    {
                        r = Err(format!("at sector {sector}: {e}"));
                        break;
                    }
                }
                r.map(|()| (files, files * 8192))
            }
        };
        marker(0x20 + i as u8);
        let ns = crate::time::now_ns() - t0;
        let (reqs, (kicks, irqs)) = if name.starts_with("fs_") {
            let (r, (k, q)) = (fs.stats().requests, bus_counts(fs.bus_mut()));
            (r - fs_before.0, (k - fs_before.1.0, q - fs_before.1.1))
        } else {
            let (r, (k, q)) = (disk.requests(), bus_counts(disk.drv.bus_mut()));
            (r - blk_before.0, (k - blk_before.1.0, q - blk_before.1.1))
        };
        // Clean-up outside the markers.
        let mut after = Ok(());
        if let Some((node, fh)) = handle {
            if *name == "fs_write" {
                after = fs.fsync(&mut w, node, fh, false);
            }
            after = after
                .and_then(|()| fs.release(&mut w, node, fh, 0))
                .and_then(|()| fs.forget(&mut w, &[(node, 1)]));
        }
        if *name == "fs_unlink" {
            let refs: Vec<(NodeId, u64)> = nodes.iter().map(|&n| (n, 1)).collect();
            after = fs.forget(&mut w, &refs);
        }
        // The last chunk read must be the pattern written.
        let same = match *name {
            "fs_read" => read_buf[..last] == data[..last],
            "blk_read" => dma_bytes[chunk..chunk + last] == data[..last],
            _ => true,
        };
        let (ops, moved) = match result {
            Ok(x) => x,
            Err(e) => {
                check!(&format!("bench.{name}"), false, "{e}");
                break;
            }
        };
        let done = Done {
            ops,
            ns,
            bytes: moved,
            requests: reqs,
            kicks,
            irqs,
        };
        report::stat(&format!("bench.{name}.ops"), done.ops);
        report::stat(&format!("bench.{name}.ns"), done.ns);
        report::stat(&format!("bench.{name}.bytes"), done.bytes);
        report::stat(&format!("bench.{name}.requests"), done.requests);
        report::stat(&format!("bench.{name}.kicks"), done.kicks);
        report::stat(&format!("bench.{name}.irqs"), done.irqs);
        let rate = if done.bytes > 0 && !name.ends_with("4k_wr") {
            format!(
                "{:.1} MiB/s",
                done.bytes as f64 / 1048576.0 / (done.ns.max(1) as f64 / 1e9)
            )
        } else {
            format!(
                "{:.0} ops/s",
                done.ops as f64 / (done.ns.max(1) as f64 / 1e9)
            )
        };
        check!(
            &format!("bench.{name}"),
            done.ops > 0 && same && after.is_ok(),
            "{} operations ({} requests) in {} ms: {rate}{}{}",
            done.ops,
            done.requests,
            done.ns / 1_000_000,
            if same {
                ""
            } else {
                "; the data read back differs"
            },
            match &after {
                Ok(()) => String::new(),
                Err(e) => format!("; afterwards: {e}"),
            }
        );
    }
    // Leave the share as it was, apart from the written file (the host checks it).
    let destroy = fs.destroy(&mut w);
    let s = fs.stats();
    fs.shutdown();
    drop(disk);
    // SAFETY: the block driver (and with it the device) was reset by the drop above.
    unsafe { GuestDma.free_coherent(dma) };
    check!(
        "bench.clean",
        destroy.is_ok() && s.protocol_errors == 0 && s.requests == s.replies,
        "DESTROY: {}; {} FUSE requests, {} replies, {} protocol errors; both devices reset",
        match &destroy {
            Ok(()) => String::from("ok"),
            Err(e) => format!("error: {e}"),
        },
        s.requests,
        s.replies,
        s.protocol_errors
    );
}
