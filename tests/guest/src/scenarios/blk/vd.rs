//! `bench-blk-vd`: the same benchmark phases as `bench-blk`, driven through the
//! `virtio-drivers` crate (rcore-os) — `VirtIOBlk` over its own `PciTransport`, with a
//! `Hal` for this guest's identity-mapped memory — for comparison.
//!
//! What that crate offers shapes the comparison (reported, not hidden):
//! - modern PCI transport only; no MSI-X setup, so its interrupts arrive on INTx
//!   (run it with `irq=intx`; `irq=poll` spins on the used ring instead);
//! - one queue of 16 entries: depth 32 is not possible; `read_blocks_nb` submits until
//!   the queue is full (16 with indirect descriptors) and notifies per request when the
//!   device asks (it negotiates EVENT_IDX);
//! - `read_blocks_nb` / `peek_used` / `complete_read_blocks` is its non-blocking API;
//! - no scatter-gather: `read_blocks_nb` takes one contiguous buffer, so the
//!   scatter-gather phases ([`super::SG_PHASES`]) are skipped (`bench.sg` says why, and
//!   no marker of theirs is sent).

use super::super::Env;
use super::super::vd::{self, GuestHal};
use super::{PHASES, Rng, SG_NOT_IN_VD, SG_PHASES, marker};
use crate::check;
use crate::report;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_core::platform::InterruptPlatform;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;

type Vd = VirtIOBlk<GuestHal, PciTransport>;

pub fn bench(env: &mut Env) {
    let Some(func) = env.find_virtio(virtio_core::DeviceType::Block).cloned() else {
        check!("bench.present", false, "no virtio-blk on the bus");
        return;
    };
    // Decode + bus master on, BARs mapped uncacheable.
    let mut dev = env.open(&func);
    let intx = env.irq != crate::cmdline::IrqMode::Poll && dev.irq.enable_intx();
    let transport = match vd::transport(&func) {
        Ok(t) => t,
        Err(e) => {
            check!("bench.init", false, "{e}");
            return;
        }
    };
    let mut blk: Vd = match VirtIOBlk::new(transport) {
        Ok(b) => b,
        Err(e) => {
            check!("bench.init", false, "VirtIOBlk::new: {e:?}");
            return;
        }
    };
    check!(
        "bench.init",
        true,
        "virtio-drivers VirtIOBlk: capacity {} sectors, queue size {}, {}",
        blk.capacity(),
        blk.virt_queue_size(),
        if intx { "INTx" } else { "polling" }
    );
    let ms = env.cmdline.get_u64("bench_ms", 2000);
    for (i, &(name, bytes, depth, random)) in PHASES.iter().enumerate() {
        marker(0x10 + i as u8);
        let irq0 = dev.irq.total();
        let r = phase(&mut blk, &dev.irq, intx, bytes as usize, depth, random, ms);
        let irqs = dev.irq.total() - irq0;
        marker(0x20 + i as u8);
        match r {
            Ok((reqs, ns, achieved)) => {
                report::stat(&format!("bench.{name}.reqs"), reqs);
                report::stat(&format!("bench.{name}.ns"), ns);
                report::stat(&format!("bench.{name}.depth"), achieved);
                report::stat(&format!("bench.{name}.bytes"), bytes);
                report::stat(&format!("bench.{name}.irqs"), irqs);
                check!(
                    &format!("bench.{name}"),
                    reqs > 0,
                    "{reqs} requests in {} ms: {} IOPS at depth {achieved} (asked {depth}), \
                     {:.3} interrupts taken per request",
                    ns / 1_000_000,
                    reqs * 1_000_000_000 / ns.max(1),
                    irqs as f64 / reqs.max(1) as f64
                );
            }
            Err(e) => {
                check!(&format!("bench.{name}"), false, "{e}");
            }
        }
    }
    check!(
        "bench.sg",
        true,
        "skipped {} phases: {SG_NOT_IN_VD}",
        SG_PHASES.len()
    );
    report::stat("blk.irq", dev.irq.total());
    drop(blk);
    dev.irq.disable();
}

/// Runs one phase: keeps up to `depth` reads in flight (fewer if the queue fills).
/// Returns (requests, ns, depth achieved).
fn phase(
    blk: &mut Vd,
    irq: &crate::platform::PciInterrupts,
    intx: bool,
    bytes: usize,
    depth: usize,
    random: bool,
    ms: u64,
) -> Result<(u64, u64, usize), String> {
    let per = (bytes / 512) as u64;
    let blocks = blk.capacity() / per;
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut seq = 0u64;
    let mut reqs: Vec<BlkReq> = (0..depth).map(|_| BlkReq::default()).collect();
    let mut resps: Vec<BlkResp> = (0..depth).map(|_| BlkResp::default()).collect();
    let mut bufs: Vec<u8> = vec![0u8; depth * bytes];
    // Token (descriptor head) → slot.
    let mut slot_of = [usize::MAX; 1024];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let (mut inflight, mut completed, mut achieved) = (0usize, 0u64, 0usize);
    let t0 = crate::time::now_ns();
    let deadline = t0 + ms * 1_000_000;
    loop {
        let open = crate::time::now_ns() < deadline;
        while open && let Some(&slot) = free.last() {
            let block = if random {
                rng.next() % blocks
            } else {
                seq = (seq + 1) % blocks;
                seq
            };
            let buf = &mut bufs[slot * bytes..(slot + 1) * bytes];
            // SAFETY: the slot's request, buffer and response are used by nothing else
            // until `complete_read_blocks` for its token (below).
            let r = unsafe {
                blk.read_blocks_nb(
                    (block * per) as usize,
                    &mut reqs[slot],
                    buf,
                    &mut resps[slot],
                )
            };
            match r {
                Ok(token) => {
                    slot_of[usize::from(token)] = slot;
                    free.pop();
                    inflight += 1;
                    achieved = achieved.max(inflight);
                }
                Err(virtio_drivers::Error::QueueFull) if inflight > 0 => break,
                Err(e) => return Err(format!("read_blocks_nb: {e:?}")),
            }
        }
        if inflight == 0 {
            break;
        }
        // Wait for a completion: interrupt (INTx, acknowledged through the ISR) or spin.
        // As our loop's wait (`Disk::wait_completions`): halts in slices of at most 10 ms,
        // and the clock outside them read only once a wake-up (or a spin) found nothing.
        let mut limit = crate::time::LazyDeadline::new(10_000);
        let mut waited = false;
        while blk.peek_used().is_none() {
            if waited && limit.expired() {
                return Err("no completion in 10 s".into());
            }
            waited = true;
            if intx {
                irq.wait(u64::MAX, limit.slice_ms());
                if irq.take_pending() != 0 {
                    blk.ack_interrupt();
                    irq.intx_done();
                }
            } else {
                core::hint::spin_loop();
            }
        }
        while let Some(token) = blk.peek_used() {
            let slot = slot_of[usize::from(token)];
            if slot == usize::MAX {
                return Err(format!("unknown token {token}"));
            }
            let buf = &mut bufs[slot * bytes..(slot + 1) * bytes];
            // SAFETY: the same request, buffer and response as given to `read_blocks_nb`.
            let r = unsafe { blk.complete_read_blocks(token, &reqs[slot], buf, &mut resps[slot]) };
            r.map_err(|e| format!("read: {e:?}"))?;
            slot_of[usize::from(token)] = usize::MAX;
            free.push(slot);
            inflight -= 1;
            completed += 1;
        }
    }
    Ok((completed, crate::time::now_ns() - t0, achieved))
}
