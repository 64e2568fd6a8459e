//! `smoke`: every device the runner attached (net, blk, console, balloon) goes through the
//! real stack — `virtio_pci::probe`, `virtio_core`'s `VirtioDevice` (reset, features,
//! queues with MSI-X/INTx/polling fallback, DRIVER_OK) — and completes real I/O against
//! QEMU, checked against peers the host controls:
//!
//! - blk: GET_ID equals the runner's `serial=`; sectors read back the runner's pattern;
//!   a written sector reads back (and the runner finds it in the image file);
//! - console: text on port 0 lands in the virtconsole chardev the runner reads;
//! - net: an ARP request for the user-mode gateway 10.0.2.2 gets slirp's reply;
//! - balloon: one page inflated and deflated, `actual` written.
//!
//! Device drivers proper (virtio-net, -blk, ...) come later; this drives the bus directly
//! with the smallest correct requests. Interrupts come in the run's `irq=` mode.

use super::Env;
use super::bus::{self, GuestBus};
use crate::check;
use crate::platform::GuestDma;
use crate::report::show::{FeatureSet, Irq};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use virtio_core::DeviceType;
use virtio_core::bus::{Bus, QueueSpec};
use virtio_core::platform::{Dma, DmaDirection, DmaRegion};
use virtio_core::queue::Segment;
use virtio_core::types::Features;
use virtio_net::MacAddr;

const TIMEOUT_MS: u64 = 5000;

/// Text the runner expects in the virtconsole chardev.
pub const CONSOLE_TEXT: &[u8] = b"virtio-test-guest smoke: hello through virtio-core\n";
/// What the smoke run writes to sector 3 (rest of the sector: `(i * 7) mod 256`).
pub const BLK_WRITE_TAG: &[u8] = b"WRITTEN-BY-SMOKE";
const BLK_WRITE_SECTOR: u64 = 3;

/// A device smoke test: on success, a description and the DMA regions to free once the
/// device is reset. (On failure the regions are leaked: the device may still own them.)
type SmokeFn = fn(&Env, &mut GuestBus) -> Result<(String, Vec<DmaRegion>), String>;

pub fn run(env: &mut Env) {
    let tests: [(DeviceType, &str, SmokeFn); 4] = [
        (DeviceType::Block, "blk", smoke_blk),
        (DeviceType::Console, "console", smoke_console),
        (DeviceType::Net, "net", smoke_net),
        (DeviceType::Balloon, "balloon", smoke_balloon),
    ];
    for (ty, name, f) in tests {
        let Some(func) = env.find_virtio(ty) else {
            check!(
                &format!("smoke.{name}.present"),
                false,
                "no virtio-{name} on the bus"
            );
            continue;
        };
        let mut dev = match bus::open(env, func) {
            Ok(d) => d,
            Err(e) => {
                check!(&format!("smoke.{name}"), false, "{} {e}", func.addr);
                continue;
            }
        };
        let result = f(env, &mut dev);
        let mode = dev.interrupt_mode();
        match &result {
            Ok((detail, _)) => {
                let features = dev.features().bits();
                check!(
                    &format!("smoke.{name}"),
                    true,
                    "{} {} features {}: {detail}",
                    func.addr,
                    Irq(mode),
                    FeatureSet(ty, features)
                )
            }
            Err(e) => check!(
                &format!("smoke.{name}"),
                false,
                "{} {}: {e}",
                func.addr,
                Irq(mode)
            ),
        };
        bus::stats(name, &mut dev);
        // A device that would not reset (and whose DMA could not be stopped) may still
        // write the buffers: they are leaked then (`Bus::reset`).
        let quiet = dev.reset(&mut |_, _| {}).is_ok();
        if let Ok((_, regions)) = result
            && quiet
        {
            for r in regions {
                // SAFETY: the device was reset (or its DMA stopped) just above, so it no
                // longer accesses them.
                unsafe { GuestDma.free_coherent(r) };
            }
        }
    }
}

/// Wanted-mode check: the bus landed on the mode the run asked for.
fn expect_mode(env: &Env, dev: &GuestBus) -> Result<(), String> {
    use crate::cmdline::IrqMode;
    use virtio_core::platform::InterruptMode;
    let ok = match (env.irq, dev.interrupt_mode()) {
        (IrqMode::MsiX, InterruptMode::MsiX { .. }) | (IrqMode::Intx, InterruptMode::Intx) => true,
        // balloon has no MSI-X: INTx is the right fallback.
        (IrqMode::MsiX, InterruptMode::Intx) => dev.transport().msix_capability().is_none(),
        (IrqMode::Poll, InterruptMode::Polling) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "interrupt mode {} for irq={}",
            Irq(dev.interrupt_mode()),
            env.irq.name()
        ))
    }
}

fn alloc(len: usize) -> Result<DmaRegion, String> {
    GuestDma
        .alloc_coherent(len, 16)
        .map_err(|e| format!("DMA: {e}"))
}

fn seg(region: &DmaRegion, off: usize, len: usize) -> Result<Segment, String> {
    let p = region
        .ptr_at(off, len)
        .ok_or("segment outside its region")?;
    let addr = GuestDma
        .map(p, len, DmaDirection::Bidirectional)
        .map_err(|e| format!("map: {e}"))?;
    Ok(Segment::new(addr, len as u32))
}

/// A `DmaRegion` only describes DMA memory (the device may write it too), so a mutable view
/// through a shared reference is the honest signature here.
#[allow(clippy::mut_from_ref)]
fn bytes(region: &DmaRegion, off: usize, len: usize) -> &mut [u8] {
    let p = region.ptr_at(off, len).expect("inside the region");
    // SAFETY: inside a region we own; the device has finished with it (its chain completed)
    // or not yet been given it.
    unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), len) }
}

/// Adds one chain, kicks, waits for its completion on `queue`; returns the written length.
fn transact(
    dev: &mut GuestBus,
    queue: u16,
    r: &[Segment],
    w: &[Segment],
    token: usize,
) -> Result<u32, String> {
    dev.add(queue, r, w, token)
        .map_err(|e| format!("add: {e}"))?;
    dev.kick(queue).map_err(|e| format!("kick: {e}"))?;
    let mut got = None;
    let mut err = None;
    let done = bus::wait_for(dev, TIMEOUT_MS, |d| match d.pop_used(queue) {
        Ok(Some(u)) => {
            got = Some(u);
            true
        }
        Ok(None) => false,
        Err(e) => {
            err = Some(e);
            true
        }
    });
    match (got, err) {
        (Some(u), _) if u.token == token => Ok(u.len),
        (Some(u), _) => Err(format!("completed token {} instead of {token}", u.token)),
        (None, Some(e)) => Err(format!("used ring: {e}")),
        (None, None) if !done => Err(format!("queue {queue}: no completion in {TIMEOUT_MS} ms")),
        (None, None) => Err("no completion".into()),
    }
}

fn init(
    env: &Env,
    dev: &mut GuestBus,
    features: Features,
    queues: &[QueueSpec],
) -> Result<(), String> {
    dev.negotiate_features(features)
        .map_err(|e| format!("features: {e}"))?;
    dev.setup_queues(queues)
        .map_err(|e| format!("queues: {e}"))?;
    dev.driver_ok().map_err(|e| format!("DRIVER_OK: {e}"))?;
    expect_mode(env, dev)
}

// ---- blk ----

fn smoke_blk(env: &Env, dev: &mut GuestBus) -> Result<(String, Vec<DmaRegion>), String> {
    init(env, dev, Features::empty(), &[QueueSpec::new(0)])?;
    let capacity = dev
        .read_config_u64(0)
        .map_err(|e| format!("capacity: {e}"))?;
    let expected = env.cmdline.get_u64("blk_bytes", 0) / 512;
    if expected != 0 && capacity != expected {
        return Err(format!("capacity {capacity} sectors, expected {expected}"));
    }
    // hdr @0 (16 bytes), status @16, id @32 (20 bytes), data @512 (one sector).
    let mem = alloc(1024)?;
    let request =
        |dev: &mut GuestBus, kind: u32, sector: u64, data: Option<(usize, bool)>, token| {
            let hdr = bytes(&mem, 0, 16);
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[4..8].fill(0);
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            bytes(&mem, 16, 1)[0] = 0xFF;
            let h = seg(&mem, 0, 16)?;
            let st = seg(&mem, 16, 1)?;
            let written = match data {
                Some((len, true)) => transact(dev, 0, &[h, seg(&mem, 512, len)?], &[st], token)?,
                Some((len, false)) => {
                    let d = if kind == 8 {
                        seg(&mem, 32, len)?
                    } else {
                        seg(&mem, 512, len)?
                    };
                    transact(dev, 0, &[h], &[d, st], token)?
                }
                None => transact(dev, 0, &[h], &[st], token)?,
            };
            match bytes(&mem, 16, 1)[0] {
                0 => Ok(written),
                s => Err(format!("request type {kind} sector {sector}: status {s}")),
            }
        };
    // GET_ID (type 8): 20 bytes, NUL-padded.
    request(dev, 8, 0, Some((20, false)), 1)?;
    let id_raw = bytes(&mem, 32, 20);
    let id = core::str::from_utf8(&id_raw[..id_raw.iter().position(|&b| b == 0).unwrap_or(20)])
        .unwrap_or("<not utf-8>")
        .to_string();
    if let Some(want) = env.cmdline.get("blk_serial")
        && id != want
    {
        return Err(format!("GET_ID \"{id}\", expected \"{want}\""));
    }
    // Read the first and the last sector: the runner's pattern.
    for (i, sector) in [0, capacity.saturating_sub(1)].into_iter().enumerate() {
        request(dev, 0, sector, Some((512, false)), 10 + i)?;
        let data = bytes(&mem, 512, 512);
        if &data[..6] != b"SECTOR"
            || data[6..14] != sector.to_le_bytes()
            || data[100] != ((sector + 100) % 251) as u8
        {
            return Err(format!(
                "sector {sector}: unexpected content {:02x?}",
                &data[..16]
            ));
        }
    }
    // Write a sector, read it back.
    let data = bytes(&mem, 512, 512);
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    data[..BLK_WRITE_TAG.len()].copy_from_slice(BLK_WRITE_TAG);
    request(dev, 1, BLK_WRITE_SECTOR, Some((512, true)), 20)?;
    bytes(&mem, 512, 512).fill(0);
    request(dev, 0, BLK_WRITE_SECTOR, Some((512, false)), 21)?;
    if !bytes(&mem, 512, 512).starts_with(BLK_WRITE_TAG) {
        return Err("written sector did not read back".into());
    }
    Ok((
        format!("{capacity} sectors, id \"{id}\", read 2 + wrote 1 sector"),
        vec![mem],
    ))
}

// ---- console ----

fn smoke_console(env: &Env, dev: &mut GuestBus) -> Result<(String, Vec<DmaRegion>), String> {
    // No MULTIPORT: port 0 only, queues 0 (receive) and 1 (transmit).
    init(
        env,
        dev,
        Features::empty(),
        &[QueueSpec::new(0), QueueSpec::new(1)],
    )?;
    let mem = alloc(CONSOLE_TEXT.len())?;
    bytes(&mem, 0, CONSOLE_TEXT.len()).copy_from_slice(CONSOLE_TEXT);
    transact(dev, 1, &[seg(&mem, 0, CONSOLE_TEXT.len())?], &[], 1)?;
    Ok((
        format!("sent {} bytes on port 0", CONSOLE_TEXT.len()),
        vec![mem],
    ))
}

// ---- net ----

const NET_F_MAC: u64 = 1 << 5;
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
const RX_BUFFERS: usize = 4;
const RX_LEN: usize = 2048;

fn smoke_net(env: &Env, dev: &mut GuestBus) -> Result<(String, Vec<DmaRegion>), String> {
    init(
        env,
        dev,
        Features::from_bits_retain(NET_F_MAC),
        &[QueueSpec::new(0), QueueSpec::new(1)],
    )?;
    // virtio 1.2 §5.1.6: 12-byte header with VERSION_1 (or MRG_RXBUF), else 10.
    let hdr = if dev.features().contains(Features::VERSION_1) {
        12
    } else {
        10
    };
    let mut mac = [0u8; 6];
    if dev.features().bits() & NET_F_MAC != 0 {
        dev.read_config(0, &mut mac)
            .map_err(|e| format!("mac: {e}"))?;
    }
    let rx = alloc(RX_BUFFERS * RX_LEN)?;
    for i in 0..RX_BUFFERS {
        dev.add(0, &[], &[seg(&rx, i * RX_LEN, RX_LEN)?], 100 + i)
            .map_err(|e| format!("rx add: {e}"))?;
    }
    dev.kick(0).map_err(|e| format!("rx kick: {e}"))?;

    // ARP request: who has 10.0.2.2? tell 10.0.2.15 (padded to the 60-byte minimum).
    let tx = alloc(hdr + 60)?;
    let f = bytes(&tx, 0, hdr + 60);
    f.fill(0);
    let frame = &mut f[hdr..];
    frame[..6].fill(0xFF);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    frame[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&GUEST_IP);
    frame[38..42].copy_from_slice(&GATEWAY_IP);
    transact(dev, 1, &[seg(&tx, 0, hdr + 60)?], &[], 1)?;

    // Receive until the ARP reply from the gateway (slirp may send nothing else, but
    // tolerate other frames).
    let mut reply = None;
    let mut seen = 0;
    for _ in 0..RX_BUFFERS {
        let mut got = None;
        let mut err = None;
        bus::wait_for(dev, TIMEOUT_MS, |d| match d.pop_used(0) {
            Ok(Some(u)) => {
                got = Some(u);
                true
            }
            Ok(None) => false,
            Err(e) => {
                err = Some(e);
                true
            }
        });
        if let Some(e) = err {
            return Err(format!("rx used ring: {e}"));
        }
        let Some(u) = got else { break };
        seen += 1;
        let i = u
            .token
            .checked_sub(100)
            .filter(|&i| i < RX_BUFFERS)
            .ok_or("rx: unknown token")?;
        let len = (u.len as usize).min(RX_LEN);
        let buf = bytes(&rx, i * RX_LEN, RX_LEN);
        let frame = &buf[hdr.min(len)..len];
        if frame.len() >= 42
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 2]
            && frame[28..32] == GATEWAY_IP
        {
            let mut gw = [0u8; 6];
            gw.copy_from_slice(&frame[22..28]);
            reply = Some(gw);
            break;
        }
    }
    let gw = reply.ok_or_else(|| format!("no ARP reply from 10.0.2.2 ({seen} frames received)"))?;
    Ok((
        format!(
            "mac {}, header {hdr} bytes, ARP reply: 10.0.2.2 is at {}",
            MacAddr(mac),
            MacAddr(gw)
        ),
        vec![rx, tx],
    ))
}

// ---- balloon ----

fn smoke_balloon(env: &Env, dev: &mut GuestBus) -> Result<(String, Vec<DmaRegion>), String> {
    // No STATS_VQ / free-page features: queues 0 (inflate) and 1 (deflate).
    init(
        env,
        dev,
        Features::empty(),
        &[QueueSpec::new(0), QueueSpec::new(1)],
    )?;
    let target = dev
        .read_config_u32(0)
        .map_err(|e| format!("num_pages: {e}"))?;
    // One 4 KiB page given to the host and taken back; its contents are lost meanwhile.
    let page = GuestDma
        .alloc_coherent(4096, 4096)
        .map_err(|e| format!("DMA: {e}"))?;
    let pfns = alloc(4)?;
    // Balloon page numbers are 4 KiB frames, little-endian (§5.5.6).
    bytes(&pfns, 0, 4).copy_from_slice(&((page.daddr >> 12) as u32).to_le_bytes());
    transact(dev, 0, &[seg(&pfns, 0, 4)?], &[], 1)?;
    dev.write_config(4, &1u32.to_le_bytes())
        .map_err(|e| format!("actual: {e}"))?;
    transact(dev, 1, &[seg(&pfns, 0, 4)?], &[], 2)?;
    dev.write_config(4, &0u32.to_le_bytes())
        .map_err(|e| format!("actual: {e}"))?;
    let pfn = page.daddr >> 12;
    // The page was deflated: ours again, freed with the rest after the reset.
    Ok((
        format!("target {target} pages; inflated and deflated pfn {pfn:#x}"),
        vec![page, pfns],
    ))
}
