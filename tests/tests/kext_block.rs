//! VirtioBlock.kext's C ABI (`virtio-block-kext`), called the way its IOBlockStorageDevice
//! shim calls it, on top of the family's C ABI over the PCI simulation with `blk_model`
//! serving the disk. IOKit order: the family starts and publishes its nub; the block
//! driver's `start` creates the device over the nub's handle and asks for its ID; I/O
//! (`doAsyncReadWrite` with IODMACommand segments, `doSynchronizeCache`, `doUnmap`,
//! `doSetWriteCacheState`) completes through the completion callback from interrupts the
//! family delivers; `stop` aborts what is in flight; `free` destroys; the family stops
//! with every DMA region returned. Each test runs against the rlibs and against the loaded
//! bundles (`kext_support`).

mod kext_support;

use std::cell::RefCell;
use std::ffi::c_void;

use kext_support::{Family, FamilyKext, c_abi, kernel, kext_tests};
use virtio_block_kext::*;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_kext_abi::VkSegment;
use virtio_pci::Preference;
use virtio_tests::blk_model::{BlkModel, bits, proto};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{Chain, Sim, SimBuilder, SimMode};

use virtio_tests::sim::MODES;
const RING: u64 = bits::INDIRECT_DESC | bits::EVENT_IDX;
const SECTORS: u64 = 8192;

c_abi! {
    /// VirtioBlock.kext's C functions (`VirtioBlockABI.h`).
    pub struct BlockAbi from virtio_block_kext {
        fn vblk_create(
            *mut virtio_kext_client::VfamDevice,
            *const VblkCallbacks,
            *mut *mut VblkDevice,
        ) -> i32;
        fn vblk_info(*mut VblkDevice, *mut VblkInfo) -> i32;
        fn vblk_stats(*mut VblkDevice, *mut VblkStats) -> i32;
        fn vblk_request_id(*mut VblkDevice, *mut c_void) -> i32;
        fn vblk_submit_rw(
            *mut VblkDevice,
            bool,
            u64,
            u64,
            *const VkSegment,
            usize,
            *mut c_void,
        ) -> i32;
        fn vblk_flush(*mut VblkDevice, *mut c_void) -> i32;
        fn vblk_unmap(*mut VblkDevice, *const VblkExtent, usize, *mut c_void) -> i32;
        fn vblk_set_write_cache(*mut VblkDevice, bool) -> i32;
        fn vblk_interrupt(*mut VblkDevice, i32);
        fn vblk_suspend(*mut VblkDevice) -> i32;
        fn vblk_resume(*mut VblkDevice) -> i32;
        fn vblk_stop(*mut VblkDevice);
        fn vblk_destroy(*mut VblkDevice);
        fn vblk_log_init();
    }
}

/// The family and the block kext, both from the rlibs or both loaded.
#[derive(Clone, Copy)]
struct Kexts {
    family: &'static FamilyKext,
    blk: BlockAbi,
}

impl Kexts {
    fn rlib() -> Kexts {
        Kexts {
            family: FamilyKext::rlib(),
            blk: BlockAbi::rlib(),
        }
    }

    fn loaded() -> Option<Kexts> {
        let family = FamilyKext::loaded()?;
        let bundle = family.load_device("VirtioBlock", "_vblk_log_init")?;
        Some(Kexts {
            family,
            blk: BlockAbi::loaded(bundle),
        })
    }
}

kext_tests!(Kexts:
    start_io_flush_unmap_stop_in_every_mode,
    backpressure_and_restart,
    errors_reach_the_completion_or_the_caller,
    read_only_write_through_device_without_discard,
    needs_reset_aborts_and_recovers,
    lifecycle_across_sleep_and_wake,
    depth_32_completes_from_one_interrupt,
    a_failed_recovery_fails_what_the_shim_holds,
    completions_fit_a_queue_that_grew_across_a_reset,
    an_unreadable_config_change_does_not_strand_completions,
    max_segments_fit_a_ring_without_indirect_descriptors,
    a_failed_wake_fails_what_the_shim_holds,
    an_interrupt_while_asleep_leaves_the_device_alone,
    a_resize_while_asleep_is_reported_in_blocks,
    a_resize_is_reported_after_a_failed_wake_and_a_recovery,
    a_long_unmap_goes_in_shares,
    a_long_unmap_waits_for_room_between_shares,
    a_long_unmap_progresses_under_sustained_io,
    the_write_cache_is_left_alone_while_the_device_is_reset,
);

/// What the shim's callbacks record.
#[derive(Default)]
struct ShimLog {
    completions: Vec<(usize, i32)>,
    restarts: u32,
    capacity: Vec<u64>,
}

unsafe extern "C" fn on_complete(ctx: *mut c_void, request: *mut c_void, status: i32) {
    // SAFETY: ctx is the test's RefCell<ShimLog>, alive while the device lives.
    let log = unsafe { &*(ctx as *const RefCell<ShimLog>) };
    log.borrow_mut()
        .completions
        .push((request as usize, status));
}
unsafe extern "C" fn on_restart(ctx: *mut c_void) {
    // SAFETY: as above.
    let log = unsafe { &*(ctx as *const RefCell<ShimLog>) };
    log.borrow_mut().restarts += 1;
}
unsafe extern "C" fn on_capacity(ctx: *mut c_void, blocks: u64) {
    // SAFETY: as above.
    let log = unsafe { &*(ctx as *const RefCell<ShimLog>) };
    log.borrow_mut().capacity.push(blocks);
}

/// The shim's side: the family (transport + nub), the disk, and the block device.
struct Rig {
    kexts: Kexts,
    sim: Sim,
    mem: IdentityMemory,
    model: BlkModel,
    fam: Option<Family>,
    log: Box<RefCell<ShimLog>>,
    dev: *mut VblkDevice,
    buffers: Vec<DmaRegion>,
}

fn full_model() -> BlkModel {
    let mut m = BlkModel::new(SECTORS);
    m.features = bits::FLUSH | bits::CONFIG_WCE | bits::DISCARD | bits::SEG_MAX;
    m.writeback = 1;
    m.seg_max = 8;
    m.max_discard_sectors = 1024;
    m.max_discard_seg = 4;
    m.discard_sector_alignment = 8;
    m
}

impl Rig {
    fn start(
        kexts: Kexts,
        model: BlkModel,
        mode: SimMode,
        pref: Preference,
        queue_size: u16,
    ) -> Rig {
        Rig::start_with(kexts, model, mode, pref, queue_size, |b| b)
    }

    /// `start` over a function the test adjusts first (no MSI-X, ...).
    fn start_with(
        kexts: Kexts,
        model: BlkModel,
        mode: SimMode,
        pref: Preference,
        queue_size: u16,
        adjust: impl FnOnce(SimBuilder) -> SimBuilder,
    ) -> Rig {
        let sim = adjust(model.sim_builder(mode, RING, queue_size, 16 << 20)).build();
        let fam = Family::start(kexts.family, &sim, pref).expect("family start");
        let log = Box::new(RefCell::new(ShimLog::default()));
        let cb = VblkCallbacks {
            ctx: (&*log as *const RefCell<ShimLog>).cast_mut().cast(),
            complete: Some(on_complete),
            restart: Some(on_restart),
            capacity_changed: Some(on_capacity),
        };
        let mut dev = std::ptr::null_mut();
        // SAFETY: the nub's live handle; the callbacks' context outlives the device.
        let s = unsafe { (kexts.blk.vblk_create)(fam.client_handle(), &cb, &mut dev) };
        assert_eq!(s, VBLK_OK, "{mode:?}/{pref:?}: vblk_create");
        assert!(!dev.is_null());
        sim.check_init_order().unwrap();
        Rig {
            kexts,
            mem: sim.memory(),
            sim,
            model,
            fam: Some(fam),
            log,
            dev,
            buffers: Vec::new(),
        }
    }

    fn fam(&self) -> &Family {
        self.fam.as_ref().unwrap()
    }

    /// The device serves the queue; the family's interrupt actions deliver what it raised.
    fn step(&mut self) -> usize {
        let served = self.model.serve(&self.sim, 0);
        self.fam().interrupts();
        served
    }

    fn info(&self) -> VblkInfo {
        let mut i = VblkInfo::default();
        // SAFETY: live handle, local out-pointer.
        let status = unsafe { (self.kexts.blk.vblk_info)(self.dev, &mut i) };
        assert_eq!(status, VBLK_OK);
        i
    }

    fn take(&self) -> Vec<(usize, i32)> {
        std::mem::take(&mut self.log.borrow_mut().completions)
    }

    /// A buffer in guest memory, split into `parts` segments (as an IODMACommand might).
    fn segments(&mut self, bytes: usize, parts: usize, fill: Option<u8>) -> Vec<VkSegment> {
        let r = self.mem.alloc_buffer(bytes);
        if let Some(b) = fill {
            for (i, x) in self.mem.slice(&r).iter_mut().enumerate() {
                *x = b ^ (i as u8);
            }
        }
        let per = (bytes / parts).next_multiple_of(512).min(bytes);
        let mut segs = Vec::new();
        let mut off = 0;
        while off < bytes {
            let n = per.min(bytes - off);
            segs.push(VkSegment {
                addr: r.daddr + off as u64,
                len: n as u32,
                reserved: 0,
            });
            off += n;
        }
        self.buffers.push(r);
        segs
    }

    /// `count` segments of a buffer, none contiguous with the next (every other page), as
    /// IODMACommand makes of fragmented memory: 4 KiB each, or (`mid_page`) the first
    /// starting 256 bytes into its page and the last ending 256 bytes into its own, so that
    /// neither is whole 512-byte blocks though the list is.
    fn scattered(&mut self, count: usize, mid_page: bool, fill: u8) -> Vec<VkSegment> {
        let r = self.mem.alloc_coherent(count * 2 * 4096, 4096).unwrap();
        for (i, x) in self.mem.slice(&r).iter_mut().enumerate() {
            *x = fill ^ (i as u8) ^ (i >> 12) as u8;
        }
        let mut segs: Vec<VkSegment> = (0..count)
            .map(|i| VkSegment {
                addr: r.daddr + (i * 2 * 4096) as u64,
                len: 4096,
                reserved: 0,
            })
            .collect();
        if mid_page && count > 1 {
            segs[0].addr += 256;
            segs[0].len -= 256;
            segs[count - 1].len = 256;
        }
        self.buffers.push(r);
        segs
    }

    /// Serves and delivers interrupts until `request` completes; returns its status.
    fn finish(&mut self, request: usize) -> i32 {
        for _ in 0..10_000 {
            if let Some(&(_, status)) = self
                .log
                .borrow()
                .completions
                .iter()
                .find(|&&(t, _)| t == request)
            {
                return status;
            }
            assert!(self.step() > 0, "request {request:#x} stuck");
        }
        panic!("request {request:#x} never completed");
    }

    /// The device completes `chain` with status OK, apart from the model (a discard it
    /// carried out, as far as the driver can tell).
    fn complete_ok(&self, chain: &Chain) {
        let status = chain.descs.last().expect("status descriptor");
        self.mem.bytes_at(status.addr, 1)[0] = proto::S_OK;
        self.sim.complete(0, chain.head, 1);
    }

    /// `setPowerState(0)`.
    fn suspend(&self) -> i32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.blk.vblk_suspend)(self.dev) }
    }

    /// `setPowerState(1)`.
    fn resume(&self) -> i32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.blk.vblk_resume)(self.dev) }
    }

    /// `stop`'s half of the unload (the handle stays valid until `unload` destroys it).
    fn stop(&self) {
        // SAFETY: live handle.
        unsafe { (self.kexts.blk.vblk_stop)(self.dev) }
    }

    fn set_write_cache(&self, on: bool) -> i32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.blk.vblk_set_write_cache)(self.dev, on) }
    }

    fn flush(&self, request: usize) -> i32 {
        // SAFETY: live handle; `request` is an opaque context.
        unsafe { (self.kexts.blk.vblk_flush)(self.dev, request as *mut c_void) }
    }

    /// The interrupt entry as the family's interrupt action calls it (-1: INTx).
    fn interrupt(&self, vector: i32) {
        // SAFETY: live handle.
        unsafe { (self.kexts.blk.vblk_interrupt)(self.dev, vector) }
    }

    /// Chains made available on queue 0 so far (the split ring's avail index).
    fn published(&self) -> u16 {
        let avail = self.sim.queue_info(0).expect("queue 0").driver;
        let idx = self.mem.bytes_at(avail + 2, 2);
        u16::from_le_bytes([idx[0], idx[1]])
    }

    fn unmap(&self, extents: &[VblkExtent], request: usize) -> i32 {
        // SAFETY: live handle; `extents` holds that many entries; `request` is opaque.
        unsafe {
            (self.kexts.blk.vblk_unmap)(
                self.dev,
                extents.as_ptr(),
                extents.len(),
                request as *mut c_void,
            )
        }
    }

    fn rw(&self, write: bool, block: u64, blocks: u64, segs: &[VkSegment], req: usize) -> i32 {
        // SAFETY: live handle; segments in guest memory; `req` is an opaque context.
        unsafe {
            (self.kexts.blk.vblk_submit_rw)(
                self.dev,
                write,
                block,
                blocks,
                segs.as_ptr(),
                segs.len(),
                req as *mut c_void,
            )
        }
    }

    fn bytes(&self, segs: &[VkSegment]) -> Vec<u8> {
        segs.iter()
            .flat_map(|s| self.mem.bytes_at(s.addr, s.len as usize).to_vec())
            .collect()
    }

    /// `stop` + `free` of the block driver, then the family's stop (DMA leak check).
    fn unload(mut self) {
        // SAFETY: live handle, not used after destroy.
        unsafe {
            (self.kexts.blk.vblk_stop)(self.dev);
            (self.kexts.blk.vblk_destroy)(self.dev);
        }
        self.fam.take().unwrap().stop();
        assert!(
            self.model.violations.is_empty(),
            "{:?}",
            self.model.violations
        );
        assert!(
            self.sim.bad_accesses().is_empty(),
            "{:?}",
            self.sim.bad_accesses()
        );
        for r in self.buffers.drain(..) {
            // SAFETY: the device was reset; the buffers are the test's.
            unsafe { virtio_core::platform::Dma::free_coherent(&self.mem, r) };
        }
    }
}

fn start_io_flush_unmap_stop_in_every_mode(kexts: Kexts) {
    for (mode, pref) in MODES {
        let mut r = Rig::start(kexts, full_model(), mode, pref, 64);
        let what = format!("{mode:?}/{pref:?}");

        // start: the facts IOBlockStorageDevice reports.
        let i = r.info();
        assert_eq!(i.block_size, 512, "{what}");
        assert_eq!(i.block_count, SECTORS, "{what}");
        assert_eq!(i.read_only, 0);
        assert_eq!((i.flush, i.write_cache, i.write_cache_settable), (1, 1, 1));
        assert_eq!(i.unmap, 1);
        assert!(i.max_segments >= 8 && i.max_segments <= VBLK_MAX_SEGMENTS);
        assert!(i.max_transfer_bytes >= 4096 && i.max_transfer_bytes.is_multiple_of(512));
        assert_eq!(cstr(&i.vendor), "Virtio");
        assert_eq!(cstr(&i.product), "Virtio Block Device");
        let legacy = mode == SimMode::Legacy || pref == Preference::Legacy;
        assert_eq!(cstr(&i.revision), if legacy { "0.9.5" } else { "1.0" });
        assert_eq!((i.has_id, cstr(&i.serial)), (0, ""));

        // start: GET_ID, completed from the interrupt.
        // SAFETY: live handle.
        let s = unsafe { (kexts.blk.vblk_request_id)(r.dev, 0x1000 as *mut c_void) };
        assert_eq!(s, VBLK_OK);
        assert_eq!(r.step(), 1);
        assert_eq!(r.take(), vec![(0x1000, VBLK_OK)], "{what}");
        let i = r.info();
        assert_eq!((i.has_id, cstr(&i.serial)), (1, "SIMDISK-0001"), "{what}");

        // doAsyncReadWrite: a 20 KiB write in 5 segments, read back in 3.
        let w = r.segments(20 * 1024, 5, Some(0xA5));
        assert_eq!(r.rw(true, 100, 40, &w, 0x2000), VBLK_OK);
        let rd = r.segments(20 * 1024, 3, None);
        assert_eq!(r.rw(false, 100, 40, &rd, 0x2001), VBLK_OK);
        while r.log.borrow().completions.len() < 2 {
            assert!(r.step() > 0, "{what}: stuck");
        }
        let mut c = r.take();
        c.sort();
        assert_eq!(c, vec![(0x2000, VBLK_OK), (0x2001, VBLK_OK)], "{what}");
        let written = r.bytes(&w);
        assert_eq!(&r.model.disk[100 * 512..140 * 512], &written[..], "{what}");
        assert_eq!(r.bytes(&rd), written, "{what}");

        // A long scatter list (more than seg_max) is split by the driver, completing once.
        let big = r.segments(64 * 512, 32, Some(0x3C));
        assert_eq!(r.rw(true, 1000, 64, &big, 0x2002), VBLK_OK);
        while r.log.borrow().completions.is_empty() {
            assert!(r.step() > 0, "{what}: stuck");
        }
        assert_eq!(r.take(), vec![(0x2002, VBLK_OK)]);
        assert_eq!(&r.model.disk[1000 * 512..1064 * 512], &r.bytes(&big)[..]);

        // doSynchronizeCache.
        // SAFETY: live handle.
        let status = unsafe { (kexts.blk.vblk_flush)(r.dev, 0x3000 as *mut c_void) };
        assert_eq!(status, VBLK_OK);
        r.step();
        assert_eq!(r.take(), vec![(0x3000, VBLK_OK)]);
        assert!(r.model.records.iter().any(|x| x.req_type == proto::T_FLUSH));

        // doUnmap: two extents become one discard request.
        let ext = [
            VblkExtent {
                block: 64,
                count: 16,
            },
            VblkExtent {
                block: 512,
                count: 8,
            },
        ];
        // SAFETY: live handle; `ext` holds two entries.
        let s = unsafe {
            (kexts.blk.vblk_unmap)(r.dev, ext.as_ptr(), ext.len(), 0x4000 as *mut c_void)
        };
        assert_eq!(s, VBLK_OK);
        r.step();
        assert_eq!(r.take(), vec![(0x4000, VBLK_OK)]);
        let d = r
            .model
            .records
            .iter()
            .find(|x| x.req_type == proto::T_DISCARD)
            .expect("a discard reached the device");
        assert_eq!(d.ranges, vec![(64, 16, 0), (512, 8, 0)], "{what}");

        // doSetWriteCacheState.
        // SAFETY: live handle.
        let status = unsafe { (kexts.blk.vblk_set_write_cache)(r.dev, false) };
        assert_eq!(status, VBLK_OK);
        assert_eq!(r.info().write_cache, 0);
        assert_eq!(r.sim.device_config()[32], 0, "the device saw write-through");
        // SAFETY: live handle.
        let status = unsafe { (kexts.blk.vblk_set_write_cache)(r.dev, true) };
        assert_eq!(status, VBLK_OK);
        assert_eq!(r.info().write_cache, 1);

        // A resize: config interrupt → capacity callback → new block count.
        r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
        r.fam().interrupts();
        assert_eq!(r.log.borrow().capacity, vec![SECTORS * 2]);
        assert_eq!(r.info().block_count, SECTORS * 2);

        // Statistics for the IORegistry.
        let mut st = VblkStats::default();
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.blk.vblk_stats)(r.dev, &mut st) }, VBLK_OK);
        assert_eq!((st.reads, st.writes, st.flushes, st.unmaps), (1, 2, 1, 1));
        assert_eq!((st.errors, st.in_flight), (0, 0));
        assert!(st.kicks >= 1);

        // stop with a request in flight: it completes as aborted, exactly once.
        let late = r.segments(4096, 1, None);
        assert_eq!(r.rw(false, 0, 8, &late, 0x5000), VBLK_OK);
        // SAFETY: live handle.
        unsafe { (kexts.blk.vblk_stop)(r.dev) };
        assert_eq!(r.take(), vec![(0x5000, VBLK_E_ABORTED)], "{what}");
        assert_eq!(r.rw(false, 0, 8, &late, 0x5001), VBLK_E_DEVICE);
        // Interrupts after stop go nowhere near the device kext.
        r.sim.raise_config_interrupt();
        r.fam().interrupts();
        assert!(r.take().is_empty());
        r.unload();
    }
}

/// Ring full → `VBLK_E_BUSY`; completions free room and the shim is told to restart.
fn backpressure_and_restart(kexts: Kexts) {
    let mut r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 8);
    let mut accepted = Vec::new();
    let mut held = Vec::new();
    for k in 0..32usize {
        let s = r.segments(4096, 1, Some(k as u8));
        match r.rw(true, (k * 8) as u64, 8, &s, 0x100 + k) {
            VBLK_OK => accepted.push(0x100 + k),
            VBLK_E_BUSY => held.push((k, s)),
            other => panic!("status {other}"),
        }
    }
    assert!(!accepted.is_empty() && !held.is_empty());
    assert_eq!(r.log.borrow().restarts, 0);
    r.step();
    assert_eq!(r.log.borrow().restarts, 1, "restart after room was freed");
    let mut done: Vec<usize> = r
        .take()
        .into_iter()
        .map(|(t, s)| {
            assert_eq!(s, VBLK_OK);
            t
        })
        .collect();
    done.sort();
    assert_eq!(done, accepted);
    // The shim resubmits what it held (and holds again what does not fit).
    while !held.is_empty() {
        let mut still = Vec::new();
        for (k, s) in held {
            match r.rw(true, (k * 8) as u64, 8, &s, 0x100 + k) {
                VBLK_OK => {}
                VBLK_E_BUSY => still.push((k, s)),
                other => panic!("status {other}"),
            }
        }
        held = still;
        r.step();
    }
    while r.step() > 0 {}
    assert!(r.take().iter().all(|&(_, s)| s == VBLK_OK));
    for k in 0..32usize {
        let want: Vec<u8> = (0..4096).map(|i| (k as u8) ^ (i as u8)).collect();
        assert_eq!(
            &r.model.disk[k * 4096..(k + 1) * 4096],
            &want[..],
            "block run {k}"
        );
    }
    let mut st = VblkStats::default();
    // SAFETY: live handle.
    unsafe { (kexts.blk.vblk_stats)(r.dev, &mut st) };
    assert!(st.busy > 0);
    assert_eq!(st.in_flight, 0);
    r.unload();
}

fn errors_reach_the_completion_or_the_caller(kexts: Kexts) {
    let mut model = full_model();
    model.io_error_sectors.insert(40);
    let mut r = Rig::start(kexts, model, SimMode::Modern, Preference::Auto, 64);
    let s = r.segments(4096, 2, None);
    // Device IOERR → completion status.
    assert_eq!(r.rw(false, 40, 8, &s, 0x10), VBLK_OK);
    r.step();
    assert_eq!(r.take(), vec![(0x10, VBLK_E_IO)]);
    // Refused before reaching the device.
    assert_eq!(r.rw(false, SECTORS, 8, &s, 0x11), VBLK_E_OUT_OF_RANGE);
    assert_eq!(
        r.rw(false, 0, 7, &s, 0x12),
        VBLK_E_INVALID,
        "bytes != blocks"
    );
    assert_eq!(r.rw(false, 0, 8, &s, 0), VBLK_E_INVALID, "null request");
    assert_eq!(r.rw(false, 0, 8, &[], 0x13), VBLK_E_INVALID, "no segments");
    let many = vec![s[0]; VBLK_MAX_SEGMENTS as usize + 1];
    assert_eq!(r.rw(false, 0, 8, &many, 0x14), VBLK_E_TOO_LARGE);
    let ext = vec![VblkExtent { block: 0, count: 1 }; VBLK_MAX_EXTENTS as usize + 1];
    // SAFETY: live handle; `ext` has that many entries.
    let st = unsafe { (kexts.blk.vblk_unmap)(r.dev, ext.as_ptr(), ext.len(), 0x15 as *mut c_void) };
    assert_eq!(st, VBLK_E_TOO_LARGE);
    // Null handles.
    // SAFETY: null handles are refused.
    unsafe {
        assert_eq!(
            (kexts.blk.vblk_flush)(std::ptr::null_mut(), 0x10 as *mut c_void),
            VBLK_E_INVALID
        );
        assert_eq!(
            (kexts.blk.vblk_info)(std::ptr::null_mut(), std::ptr::null_mut()),
            VBLK_E_INVALID
        );
        (kexts.blk.vblk_interrupt)(std::ptr::null_mut(), -1);
        (kexts.blk.vblk_stop)(std::ptr::null_mut());
        (kexts.blk.vblk_destroy)(std::ptr::null_mut());
    }
    assert!(r.take().is_empty());
    r.unload();
}

fn read_only_write_through_device_without_discard(kexts: Kexts) {
    let mut model = BlkModel::new(SECTORS);
    model.features = bits::RO;
    let mut r = Rig::start(kexts, model, SimMode::Transitional, Preference::Auto, 32);
    let i = r.info();
    assert_eq!((i.read_only, i.flush, i.write_cache, i.unmap), (1, 0, 0, 0));
    let s = r.segments(512, 1, Some(1));
    assert_eq!(r.rw(true, 0, 1, &s, 0x20), VBLK_E_READ_ONLY);
    // SAFETY: live handle.
    unsafe {
        assert_eq!(
            (kexts.blk.vblk_flush)(r.dev, 0x21 as *mut c_void),
            VBLK_E_UNSUPPORTED
        );
        assert_eq!(
            (kexts.blk.vblk_set_write_cache)(r.dev, true),
            VBLK_E_UNSUPPORTED
        );
        let e = VblkExtent { block: 0, count: 1 };
        assert_eq!(
            (kexts.blk.vblk_unmap)(r.dev, &e, 1, 0x22 as *mut c_void),
            VBLK_E_UNSUPPORTED
        );
    }
    assert_eq!(r.rw(false, 0, 1, &s, 0x23), VBLK_OK);
    r.step();
    assert_eq!(r.take(), vec![(0x23, VBLK_OK)]);
    assert_eq!(r.bytes(&s), r.model.disk[..512].to_vec());
    r.unload();
}

/// DEVICE_NEEDS_RESET while requests are in flight: they complete as aborted, the device
/// is brought up again, and I/O works afterwards.
fn needs_reset_aborts_and_recovers(kexts: Kexts) {
    let mut r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 64);
    let s = r.segments(4096, 1, Some(7));
    assert_eq!(r.rw(true, 0, 8, &s, 0x30), VBLK_OK);
    assert_eq!(r.rw(true, 8, 8, &s, 0x31), VBLK_OK);
    r.sim.trigger_needs_reset();
    r.fam().interrupts();
    if kexts.family.bundle.is_some() {
        // A loaded kext logs through the kernel's IOLog("%s", line) (the rlibs have no
        // kernel logger).
        let log = kernel::take_log();
        let fault = |l: &String| l.starts_with("VirtioBlock: WARN: ") && l.contains("device fault");
        assert!(log.iter().any(fault), "IOLog lines: {log:?}");
    }
    let mut c = r.take();
    c.sort();
    assert_eq!(c, vec![(0x30, VBLK_E_ABORTED), (0x31, VBLK_E_ABORTED)]);
    assert_eq!(
        r.log.borrow().restarts,
        1,
        "the shim resubmits after recovery"
    );
    assert_eq!(r.rw(true, 0, 8, &s, 0x32), VBLK_OK);
    r.step();
    assert_eq!(r.take(), vec![(0x32, VBLK_OK)]);
    assert_eq!(&r.model.disk[..4096], &r.bytes(&s)[..]);
    r.unload();
}

fn cstr(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).unwrap()
}

/// The block device's life in IOKit order across a system sleep, in every transport mode:
/// start (GET_ID completed by an interrupt), writes, sleep (`setPowerState(0)`) with
/// requests in flight that the device never completes (they come back aborted, once each,
/// for the shim to hold) and an interrupt arriving while asleep, new requests refused while
/// asleep, wake (`setPowerState(1)`), the held and aborted requests resubmitted and
/// completed, stop with a request in flight, unload. Every request completes exactly once
/// with a final status, the disk holds every write, and nothing leaks.
fn lifecycle_across_sleep_and_wake(kexts: Kexts) {
    for (mode, pref) in MODES {
        let what = format!("{mode:?}/{pref:?}");
        let mut r = Rig::start(kexts, full_model(), mode, pref, 64);
        // SAFETY: live handle.
        let s = unsafe { (kexts.blk.vblk_request_id)(r.dev, 0x10 as *mut c_void) };
        assert_eq!(s, VBLK_OK);
        assert_eq!(r.step(), 1, "{what}: an interrupt during start");
        assert_eq!(r.take(), vec![(0x10, VBLK_OK)]);
        let mut segs = Vec::new();
        for k in 0..8usize {
            segs.push(r.segments(4096, 2, Some(0x40 + k as u8)));
        }
        for (k, s) in segs.iter().enumerate().take(4) {
            assert_eq!(r.rw(true, (k * 8) as u64, 8, s, 0x100 + k), VBLK_OK);
        }
        while r.step() > 0 {}
        assert_eq!(r.take().len(), 4);
        // In flight when the sleep comes, never served by the device.
        for (k, s) in segs.iter().enumerate().skip(4) {
            assert_eq!(r.rw(true, (k * 8) as u64, 8, s, 0x100 + k), VBLK_OK);
        }
        let resets = r.sim.resets();

        // setPowerState(0).
        assert_eq!(
            // SAFETY: live handle.
            unsafe { (kexts.blk.vblk_suspend)(r.dev) },
            VBLK_OK,
            "{what}"
        );
        assert_eq!(r.sim.resets(), resets + 1, "{what}: reset for sleep");
        let mut aborted = r.take();
        aborted.sort();
        let want: Vec<(usize, i32)> = (4..8).map(|k| (0x100 + k, VBLK_E_ABORTED)).collect();
        assert_eq!(
            aborted, want,
            "{what}: in-flight requests come back once, aborted"
        );
        // Asleep: new requests are held by the shim (BUSY), interrupts find nothing.
        assert_eq!(r.rw(false, 0, 8, &segs[0], 0x300), VBLK_E_BUSY, "{what}");
        r.fam().interrupts();
        // SAFETY: a spurious shared-line interrupt as the family's entry delivers it.
        unsafe { (kexts.blk.vblk_interrupt)(r.dev, -1) };
        assert!(r.take().is_empty(), "{what}");

        // setPowerState(1): the shim resubmits what came back aborted.
        // SAFETY: live handle.
        assert_eq!(unsafe { (kexts.blk.vblk_resume)(r.dev) }, VBLK_OK, "{what}");
        r.sim.check_init_order().unwrap();
        assert_eq!(r.info().block_count, SECTORS);
        for (k, s) in segs.iter().enumerate().skip(4) {
            assert_eq!(r.rw(true, (k * 8) as u64, 8, s, 0x100 + k), VBLK_OK);
        }
        let read = r.segments(4096, 1, None);
        assert_eq!(r.rw(false, 5 * 8, 8, &read, 0x300), VBLK_OK);
        while r.step() > 0 {}
        let mut done = r.take();
        done.sort();
        let mut want: Vec<(usize, i32)> = (4..8).map(|k| (0x100 + k, VBLK_OK)).collect();
        want.push((0x300, VBLK_OK));
        assert_eq!(done, want, "{what}");
        for k in 0..8usize {
            let expect: Vec<u8> = (0..4096).map(|i| (0x40 + k as u8) ^ (i as u8)).collect();
            assert_eq!(
                &r.model.disk[k * 4096..(k + 1) * 4096],
                &expect[..],
                "{what}: block run {k}"
            );
        }
        let expect: Vec<u8> = (0..4096).map(|i| 0x45u8 ^ (i as u8)).collect();
        assert_eq!(r.bytes(&read), expect, "{what}: read back after wake");

        // Stop with a request in flight: aborted once, then unload without leaks.
        assert_eq!(r.rw(true, 0, 8, &segs[0], 0x400), VBLK_OK);
        // SAFETY: live handle.
        unsafe { (kexts.blk.vblk_stop)(r.dev) };
        assert_eq!(r.take(), vec![(0x400, VBLK_E_ABORTED)], "{what}");
        r.unload();
    }
}

/// 32 reads submitted one by one (each `vblk_submit_rw` kicks if the device asks), served
/// together, then completed from one interrupt: one `vfam_queue_drain` hands all 32 back,
/// each once, OK, with its token (the `bench kext` rounds, checked in every test run).
fn depth_32_completes_from_one_interrupt(kexts: Kexts) {
    bench::through_kexts(kexts, 3, 32);
}

/// The instruction cost of the installed kexts' I/O path, for `cargo xtask bench kext`:
/// rounds of 4 KiB reads at a queue depth, through VirtioBlock.kext's C ABI
/// (`vblk_submit_rw` per read, then the family's interrupt entry `vfam_deliver_interrupt`,
/// which reaches `vblk_interrupt` and the completion callback) and through the same driver
/// crate called directly (`BlkDriver` on an in-process `VirtioDevice`), over the same
/// simulated device with the same features. Each path's submissions and its completion run
/// inside never-inlined functions named `kext_bench_<path>_submit` (one read) and
/// `_complete` (one interrupt), so
/// callgrind can collect there and nowhere else; the device model serving the queue in
/// between runs outside them. Every round checks each read completed OK with its token.
///
/// `KEXT_BENCH_PATH`: `kext` (the kexts' Rust halves linked into this binary), `loaded`
/// (the bundles `cargo xtask kexts` links, loaded as the kernel loads them) or `direct`;
/// `KEXT_BENCH_DEPTH` reads per round (default 1: submitted one by one, as IOKit does,
/// then served together, then one interrupt); `KEXT_BENCH_ROUNDS` rounds (default 100).
#[test]
#[ignore = "a benchmark: `cargo xtask bench kext` runs it under callgrind"]
fn bench_read_4k() {
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, depth) = (var("KEXT_BENCH_ROUNDS", 100), var("KEXT_BENCH_DEPTH", 1));
    let depth = usize::try_from(depth).unwrap().clamp(1, 32);
    match std::env::var("KEXT_BENCH_PATH").as_deref() {
        Ok("direct") => bench::direct(rounds, depth),
        Ok("loaded") => bench::through_kexts(
            Kexts::loaded().expect("the linked bundles: run `cargo xtask kexts` first"),
            rounds,
            depth,
        ),
        _ => bench::through_kexts(Kexts::rlib(), rounds, depth),
    }
}

mod bench {
    use super::*;
    use virtio_blk::{BlkDriver, BlkError, BlkOptions, Completion};
    use virtio_core::{Segment, VirtioDevice};
    use virtio_pci::{PciTransport, probe};
    use virtio_tests::sim::{SimBars, SimConfig, SimInterrupt, SimIrq};

    type Direct = BlkDriver<VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>>;
    type Done = Vec<(usize, Result<Completion, BlkError>)>;

    /// Bytes per read, and the same in 512-byte blocks.
    const BYTES: u32 = 4096;
    const BLOCKS: u64 = BYTES as u64 / 512;
    /// Queue size the device offers (as the other tests of this file).
    const QUEUE_SIZE: u16 = 64;

    /// Block of read `i`: spread over the disk, 4 KiB aligned.
    fn block(i: u64) -> u64 {
        (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % (SECTORS / BLOCKS) * BLOCKS
    }

    /// The tokens of round `i` at `depth`: read k of the round is token 0x1000 + i * depth + k.
    fn tokens(i: u64, depth: usize) -> impl Iterator<Item = usize> {
        let first = 0x1000 + i as usize * depth;
        first..first + depth
    }

    fn vectors(irqs: &[SimInterrupt]) -> impl Iterator<Item = i32> + '_ {
        irqs.iter().map(|i| match i {
            SimInterrupt::Msix(v) => i32::from(*v),
            SimInterrupt::Intx => virtio_kext_abi::VK_VECTOR_INTX,
        })
    }

    pub fn through_kexts(kexts: Kexts, rounds: u64, depth: usize) {
        let mut r = Rig::start(
            kexts,
            full_model(),
            SimMode::Modern,
            Preference::Auto,
            QUEUE_SIZE,
        );
        // The ID request `start` sends is not part of the measured path.
        r.step();
        r.take();
        let segs: Vec<Vec<VkSegment>> = (0..depth)
            .map(|_| r.segments(BYTES as usize, 1, None))
            .collect();
        for i in 0..rounds {
            for (k, (seg, token)) in segs.iter().zip(tokens(i, depth)).enumerate() {
                let b = block(i * depth as u64 + k as u64);
                assert_eq!(kext_bench_kext_submit(&r, b, seg, token), VBLK_OK);
            }
            assert_eq!(r.model.serve(&r.sim, 0), depth);
            let irqs = r.sim.take_interrupts();
            assert_eq!(
                irqs.len(),
                1,
                "round {i}: one interrupt for the round's reads"
            );
            kext_bench_kext_complete(r.fam(), &irqs);
            // Cleared in place: the callback's push then never allocates in the count.
            let mut log = r.log.borrow_mut();
            log.completions.sort_unstable();
            let want: Vec<(usize, i32)> = tokens(i, segs.len()).map(|t| (t, VBLK_OK)).collect();
            assert_eq!(log.completions, want, "round {i}");
            log.completions.clear();
        }
        r.unload();
    }

    /// One read: `vblk_submit_rw`, which kicks when the device asks.
    #[unsafe(no_mangle)]
    #[inline(never)]
    fn kext_bench_kext_submit(r: &Rig, block: u64, seg: &[VkSegment], token: usize) -> i32 {
        r.rw(false, block, BLOCKS, seg, token)
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    fn kext_bench_kext_complete(fam: &Family, irqs: &[SimInterrupt]) {
        for v in vectors(irqs) {
            // SAFETY: the family's live handle, as the shim's interrupt action has it.
            unsafe { (fam.kext.shim.vfam_deliver_interrupt)(fam.dev, v) };
        }
    }

    pub fn direct(rounds: u64, depth: usize) {
        let mut model = full_model();
        let sim = model
            .sim_builder(SimMode::Modern, RING, QUEUE_SIZE, 16 << 20)
            .build();
        let t = probe(sim.config_space(), sim.bars(), Preference::Auto).expect("probe");
        let mut drv: Direct = BlkDriver::new(
            VirtioDevice::new(t, sim.memory(), sim.irq()),
            BlkOptions::default(),
        )
        .expect("driver");
        let segs: Vec<[Segment; 1]> = (0..depth)
            .map(|_| {
                [Segment::new(
                    sim.memory().alloc_buffer(BYTES as usize).daddr,
                    BYTES,
                )]
            })
            .collect();
        let mut done: Done = Vec::with_capacity(depth);
        for i in 0..rounds {
            for (k, (seg, token)) in segs.iter().zip(tokens(i, depth)).enumerate() {
                let b = block(i * depth as u64 + k as u64);
                kext_bench_direct_submit(&mut drv, b, seg, token).expect("submit");
            }
            assert_eq!(model.serve(&sim, 0), depth);
            let irqs = sim.take_interrupts();
            assert_eq!(
                irqs.len(),
                1,
                "round {i}: one interrupt for the round's reads"
            );
            kext_bench_direct_complete(&mut drv, &irqs, &mut done);
            done.sort_unstable_by_key(|(t, _)| *t);
            assert!(
                done.iter().map(|(t, _)| *t).eq(tokens(i, depth))
                    && done.iter().all(|(_, r)| matches!(r, Ok(Completion::Done))),
                "round {i}: {done:?}"
            );
            done.clear();
        }
        assert!(model.violations.is_empty(), "{:?}", model.violations);
    }

    /// What `vblk_submit_rw` does with the driver for one read, minus the C ABI.
    #[unsafe(no_mangle)]
    #[inline(never)]
    fn kext_bench_direct_submit(
        drv: &mut Direct,
        block: u64,
        seg: &[Segment],
        token: usize,
    ) -> Result<(), BlkError> {
        drv.read(0, block, seg, token)?;
        drv.kick(0).map(drop)
    }

    /// What `vblk_interrupt` does with the driver, minus the C ABI.
    #[unsafe(no_mangle)]
    #[inline(never)]
    fn kext_bench_direct_complete(drv: &mut Direct, irqs: &[SimInterrupt], done: &mut Done) {
        for v in vectors(irqs) {
            let vector = u16::try_from(v).ok();
            if let Ok(cause) = drv.handle_interrupt(vector) {
                for q in cause.queues.iter() {
                    let _ = drv.poll_completions(q, |t, r| done.push((t, r)));
                }
            }
        }
    }
}

/// The device faults and cannot be brought back (after its reset it no longer offers
/// VERSION_1) while the shim holds a request the full ring refused: what was in flight
/// completes as aborted, and `restart` still comes, so the shim resubmits what it holds,
/// which then fails with `VBLK_E_DEVICE` and goes up instead of waiting for ever. A wake
/// tries the device again (here fixed by then); `stop` unregisters the interrupt entry and
/// everything is returned.
fn a_failed_recovery_fails_what_the_shim_holds(kexts: Kexts) {
    let mut r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 4);
    let s = r.segments(4096, 1, Some(3));
    let mut accepted = Vec::new();
    let mut held = None;
    for k in 0..8usize {
        match r.rw(true, (k * 8) as u64, 8, &s, 0x100 + k) {
            VBLK_OK => accepted.push((0x100 + k, VBLK_E_ABORTED)),
            VBLK_E_BUSY => {
                held = Some(0x100 + k);
                break;
            }
            other => panic!("status {other}"),
        }
    }
    let held = held.expect("a ring of 4 refuses a request");
    let offered = r.sim.offered_features();
    r.sim.set_offered_features(0);
    r.sim.trigger_needs_reset();
    r.fam().interrupts();
    let mut c = r.take();
    c.sort();
    assert_eq!(c, accepted, "what was in flight completes as aborted");
    assert_eq!(
        r.log.borrow().restarts,
        1,
        "the shim is told to resubmit what it holds although the device did not come back"
    );
    assert_eq!(r.rw(true, 0, 8, &s, held), VBLK_E_DEVICE);
    let mut i = VblkStats::default();
    // SAFETY: live handle; local out-pointer.
    assert_eq!(unsafe { (kexts.blk.vblk_stats)(r.dev, &mut i) }, VBLK_OK);
    assert_eq!(i.in_flight, 0);
    // Sleep and wake: a wake tries the device again, and the host fixed it meanwhile.
    // SAFETY: live handle.
    assert_eq!(unsafe { (kexts.blk.vblk_suspend)(r.dev) }, VBLK_OK);
    r.sim.set_offered_features(offered);
    // SAFETY: live handle.
    assert_eq!(unsafe { (kexts.blk.vblk_resume)(r.dev) }, VBLK_OK);
    assert_eq!(r.rw(true, 0, 8, &s, held), VBLK_OK, "the device is back");
    r.step();
    assert_eq!(r.take(), vec![(held, VBLK_OK)]);
    r.unload();
}

/// The device comes back from a reset with a larger ring (4 → 64 slots): a batch of
/// completions larger than the ring at creation all reach the shim (the completion list
/// grows with the queue).
fn completions_fit_a_queue_that_grew_across_a_reset(kexts: Kexts) {
    let mut r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 4);
    r.sim.set_queue_max_size(0, 64);
    r.sim.trigger_needs_reset();
    r.fam().interrupts();
    let s = r.segments(4096, 1, Some(9));
    let requests: Vec<usize> = (0..40).map(|k| 0x200 + k).collect();
    for (k, &request) in requests.iter().enumerate() {
        assert_eq!(
            r.rw(false, (k * 8) as u64, 8, &s, request),
            VBLK_OK,
            "request {k}"
        );
    }
    // One interrupt for all 40.
    r.model.serve(&r.sim, 0);
    r.fam().interrupts();
    let mut c: Vec<usize> = r.take().into_iter().map(|(t, _)| t).collect();
    c.sort();
    assert_eq!(
        c, requests,
        "every completion of the batch reaches the shim"
    );
    r.unload();
}

/// INTx: one interrupt announces a completion and a configuration change whose re-read
/// fails (the generation counter never settles). The ISR read that acknowledged both is
/// gone, so the completion must be collected by this interrupt, not the next one.
fn an_unreadable_config_change_does_not_strand_completions(kexts: Kexts) {
    let mut r = Rig::start_with(
        kexts,
        full_model(),
        SimMode::Transitional,
        Preference::Auto,
        16,
        |b| b.msix_vectors(0),
    );
    let s = r.segments(4096, 1, None);
    assert_eq!(r.rw(false, 0, 8, &s, 0x300), VBLK_OK);
    r.model.serve(&r.sim, 0);
    r.sim.raise_config_interrupt();
    r.sim.set_generation_churn(u32::MAX);
    r.fam().interrupts();
    r.sim.set_generation_churn(0);
    assert_eq!(r.take(), vec![(0x300, VBLK_OK)]);
    r.unload();
}

/// Without VIRTIO_F_INDIRECT_DESC every segment takes a ring descriptor of its own: a read
/// or write of `max_segments` 4 KiB segments, none contiguous with the next, must still fit
/// the ring (and not come back `VBLK_E_TOO_LARGE` for a request IOKit was told is legal),
/// also when its first and last segments are not whole blocks (the driver then cuts its
/// device requests back to block boundaries), taking no more than half the ring. Rings of
/// 256 and 64 entries, devices taking 254 and 8 segments per request; what is written lands
/// and reads back.
fn max_segments_fit_a_ring_without_indirect_descriptors(kexts: Kexts) {
    for queue_size in [256u16, 64] {
        for seg_max in [254u32, 8] {
            let mut model = full_model();
            model.seg_max = seg_max;
            let offered = model.features | bits::EVENT_IDX | bits::VERSION_1;
            let mut r = Rig::start_with(
                kexts,
                model,
                SimMode::Modern,
                Preference::Auto,
                queue_size,
                |b| b.features(offered),
            );
            let n = r.info().max_segments as usize;
            for (k, mid_page) in [false, true].into_iter().enumerate() {
                let what = format!("ring {queue_size}, seg_max {seg_max}, mid_page {mid_page}");
                let w = r.scattered(n, mid_page, 0x21 + k as u8);
                let bytes: u64 = w.iter().map(|s| u64::from(s.len)).sum();
                let (block, blocks) = (k as u64 * 2048, bytes / 512);
                let before = r.model.records.len();
                assert_eq!(r.rw(true, block, blocks, &w, 0x100 + k), VBLK_OK, "{what}");
                assert_eq!(r.finish(0x100 + k), VBLK_OK, "{what}");
                // Ring descriptors its device requests took ([header, data..., status]
                // each): at most half the ring, or one device request if that is more.
                let descs: Vec<usize> = r.model.records[before..]
                    .iter()
                    .map(|x| x.data_descs + 2)
                    .collect();
                let most = usize::from(queue_size / 2).max(descs.iter().copied().max().unwrap());
                assert!(descs.iter().sum::<usize>() <= most, "{what}: {descs:?}");
                let written = r.bytes(&w);
                let at = block as usize * 512;
                assert_eq!(
                    &r.model.disk[at..at + written.len()],
                    &written[..],
                    "{what}"
                );
                let rd = r.scattered(n, mid_page, 0);
                assert_eq!(
                    r.rw(false, block, blocks, &rd, 0x200 + k),
                    VBLK_OK,
                    "{what}"
                );
                assert_eq!(r.finish(0x200 + k), VBLK_OK, "{what}");
                assert_eq!(r.bytes(&rd), written, "{what}: read back");
            }
            assert!(r.take().iter().all(|&(_, s)| s == VBLK_OK));
            r.unload();
        }
    }
}

/// The device does not come back after a wake (it no longer offers VERSION_1): the wake
/// answers `VBLK_E_DEVICE` and the driver fails, so what the shim held while asleep fails
/// with `VBLK_E_DEVICE` when the shim resubmits it, as does every later request, instead of
/// being refused as busy for ever. The next sleep and wake, the device fixed meanwhile, brings
/// it back (with the features it had). Asleep and failed, the device has no queue; the
/// transfer limits reported stay those of before the sleep (the shim sizes what it holds by
/// them: one segment would fail a held multi-segment read as too large instead of holding
/// it, or, failed, as a bad argument instead of `kIOReturnNotAttached`).
fn a_failed_wake_fails_what_the_shim_holds(kexts: Kexts) {
    let mut r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 64);
    let s = r.segments(4096, 1, Some(5));
    let limits = |i: VblkInfo| (i.max_segments, i.max_segment_bytes, i.max_transfer_bytes);
    let awake = limits(r.info());
    assert!(awake.0 > 1, "{awake:?}");
    assert_eq!(r.suspend(), VBLK_OK);
    assert_eq!(limits(r.info()), awake, "asleep");
    assert_eq!(
        r.rw(false, 0, 8, &s, 0x500),
        VBLK_E_BUSY,
        "held while asleep"
    );
    let offered = r.sim.offered_features();
    r.sim.set_offered_features(0);
    assert_eq!(r.resume(), VBLK_E_DEVICE);
    assert_eq!(limits(r.info()), awake, "failed at the wake");
    assert_eq!(r.rw(false, 0, 8, &s, 0x500), VBLK_E_DEVICE, "the held read");
    assert_eq!(r.rw(true, 8, 8, &s, 0x501), VBLK_E_DEVICE);
    assert_eq!(r.flush(0x502), VBLK_E_DEVICE);
    assert_eq!(
        r.unmap(&[VblkExtent { block: 0, count: 8 }], 0x503),
        VBLK_E_DEVICE
    );
    assert!(r.take().is_empty());
    // The next sleep and wake: the host fixed the device.
    assert_eq!(r.suspend(), VBLK_OK);
    r.sim.set_offered_features(offered);
    assert_eq!(r.resume(), VBLK_OK);
    r.sim.check_init_order().unwrap();
    assert_eq!(r.rw(false, 0, 8, &s, 0x500), VBLK_OK, "the device is back");
    assert_eq!(r.finish(0x500), VBLK_OK);
    r.unload();
}

/// While asleep the device is reset; on INTx (the family's entry stays registered) an
/// interrupt still reaches the driver. One announcing DEVICE_NEEDS_RESET, or a configuration
/// change, is only acknowledged: no reset, no recovery that would fail the driver (it is
/// suspended), no capacity read from a device short of FEATURES_OK. The wake then reports the
/// new capacity, once, and I/O works.
fn an_interrupt_while_asleep_leaves_the_device_alone(kexts: Kexts) {
    let mut r = Rig::start_with(
        kexts,
        full_model(),
        SimMode::Modern,
        Preference::Auto,
        64,
        |b| b.msix_vectors(0),
    );
    assert_eq!(r.suspend(), VBLK_OK);
    let resets = r.sim.resets();
    r.sim.trigger_needs_reset();
    r.interrupt(-1);
    r.model.resize(SECTORS * 2);
    r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
    r.sim.raise_config_interrupt();
    r.interrupt(-1);
    assert_eq!(r.sim.resets(), resets, "reset by an interrupt while asleep");
    assert_eq!(r.sim.peek_isr(), 0, "the interrupts were acknowledged");
    assert!(
        r.log.borrow().capacity.is_empty(),
        "capacity read while asleep"
    );
    assert!(r.take().is_empty());
    assert_eq!(r.log.borrow().restarts, 0);

    assert_eq!(r.resume(), VBLK_OK);
    assert_eq!(r.log.borrow().capacity, vec![SECTORS * 2]);
    let s = r.segments(4096, 1, None);
    assert_eq!(
        r.rw(false, SECTORS, 8, &s, 0x600),
        VBLK_OK,
        "beyond the old end"
    );
    assert_eq!(r.finish(0x600), VBLK_OK);
    r.unload();
}

/// `capacity_changed` is in logical blocks: a disk of 4096-byte blocks resized while asleep
/// is reported at the wake as its new block count, not in 512-byte sectors (as the
/// interrupt path reports it).
fn a_resize_while_asleep_is_reported_in_blocks(kexts: Kexts) {
    let mut model = full_model();
    model.features |= bits::BLK_SIZE;
    model.blk_size = 4096;
    let mut r = Rig::start(kexts, model, SimMode::Modern, Preference::Auto, 64);
    assert_eq!(
        (r.info().block_size, r.info().block_count),
        (4096, SECTORS / 8)
    );
    assert_eq!(r.suspend(), VBLK_OK);
    r.model.resize(SECTORS * 2);
    r.sim.set_device_config(0, &(SECTORS * 2).to_le_bytes());
    assert_eq!(r.resume(), VBLK_OK);
    assert_eq!(r.log.borrow().capacity, vec![SECTORS * 2 / 8]);
    assert_eq!(r.info().block_count, SECTORS * 2 / 8);
    r.unload();
}

/// A resize is reported once the shim can be told of it, whatever came between: a wake
/// that read the new capacity and then failed (no ring), after which the next wake finds
/// the capacity it read unchanged; and a recovery from a fault, which reads the
/// configuration afresh with no configuration-change interrupt.
fn a_resize_is_reported_after_a_failed_wake_and_a_recovery(kexts: Kexts) {
    let mut r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 64);
    let resize = |r: &mut Rig, sectors: u64| {
        r.model.resize(sectors);
        r.sim.set_device_config(0, &sectors.to_le_bytes());
    };
    assert_eq!(r.suspend(), VBLK_OK);
    resize(&mut r, SECTORS * 2);
    r.sim.set_queue_max_size(0, 0);
    assert_eq!(r.resume(), VBLK_E_DEVICE, "no ring");
    assert!(r.log.borrow().capacity.is_empty());
    assert_eq!(r.info().block_count, SECTORS, "as the shim was told");
    r.sim.set_queue_max_size(0, 64);
    assert_eq!(r.suspend(), VBLK_OK);
    assert_eq!(r.resume(), VBLK_OK);
    assert_eq!(r.log.borrow().capacity, vec![SECTORS * 2]);
    assert_eq!(r.info().block_count, SECTORS * 2);
    // A fault: the recovery reads the configuration, resized meanwhile.
    resize(&mut r, SECTORS * 3);
    r.sim.trigger_needs_reset();
    r.fam().interrupts();
    assert_eq!(r.log.borrow().capacity, vec![SECTORS * 2, SECTORS * 3]);
    assert_eq!(r.info().block_count, SECTORS * 3);
    let s = r.segments(4096, 1, None);
    assert_eq!(r.rw(false, SECTORS * 2, 8, &s, 0xb00), VBLK_OK);
    assert_eq!(r.finish(0xb00), VBLK_OK);
    r.unload();
}

/// A ring of 64 entries and a device that takes one range of 8 sectors per discard request
/// (QEMU's `max_discard_seg` 1, at a smaller scale), with an extent of 65 × 8 blocks: more
/// device requests than the ring holds.
fn long_unmap_rig(kexts: Kexts) -> (Rig, [VblkExtent; 1]) {
    let mut model = full_model();
    model.max_discard_sectors = 8;
    model.max_discard_seg = 1;
    let r = Rig::start(kexts, model, SimMode::Modern, Preference::Auto, 64);
    let long = VblkExtent {
        block: 64,
        count: 65 * 8,
    };
    (r, [long])
}

impl Rig {
    /// [`long_unmap_rig`]'s unmap as `request`: its first share (32 device requests, half the
    /// ring) goes, and half of it completes. Returns the share's chains.
    fn start_long_unmap(&mut self, long: &[VblkExtent], request: usize) -> Vec<Chain> {
        assert_eq!(self.unmap(long, request), VBLK_OK);
        let share = self.sim.pop_chains(0);
        assert_eq!(share.len(), 32);
        for c in &share[..16] {
            self.complete_ok(c);
        }
        self.sim.signal_used(0);
        self.fam().interrupts();
        share
    }
}

/// An unmap needing more device requests than the ring holds (the device takes one range
/// of 8 sectors per request, the ring 64 requests; APFS trimming a large disk on QEMU, at a
/// smaller scale) goes in shares, one after another: it completes once, OK, and the device
/// was asked to discard every sector of it, each once. Meanwhile reads work, and a second
/// unmap waits (`VBLK_E_BUSY`, then `restart`). A long unmap cut off by sleep or stop
/// completes once, aborted.
fn a_long_unmap_goes_in_shares(kexts: Kexts) {
    let (mut r, long) = long_unmap_rig(kexts);
    assert_eq!(r.unmap(&long, 0x700), VBLK_OK);
    let s = r.segments(4096, 1, None);
    assert_eq!(r.rw(false, 0, 8, &s, 0x701), VBLK_OK);
    let short = [VblkExtent { block: 0, count: 8 }];
    assert_eq!(
        r.unmap(&short, 0x702),
        VBLK_E_BUSY,
        "one long unmap at a time"
    );
    assert_eq!(r.step(), 33, "the first share (half the ring) and the read");
    assert_eq!(r.finish(0x700), VBLK_OK);
    assert_eq!(r.log.borrow().restarts, 1, "the second unmap may go now");
    let mut c = r.take();
    c.sort();
    assert_eq!(c, vec![(0x700, VBLK_OK), (0x701, VBLK_OK)]);
    let mut discarded: Vec<(u64, u32)> = r
        .model
        .records
        .iter()
        .filter(|x| x.req_type == proto::T_DISCARD)
        .flat_map(|x| x.ranges.iter().map(|&(s, n, _)| (s, n)))
        .collect();
    discarded.sort();
    let want: Vec<(u64, u32)> = (0..65).map(|k| (64 + 8 * k, 8)).collect();
    assert_eq!(discarded, want, "every sector of the extent, once");
    assert_eq!(r.unmap(&short, 0x702), VBLK_OK);
    assert_eq!(r.finish(0x702), VBLK_OK);

    // Cut off by sleep (the shim sends it again after the wake), then by stop.
    assert_eq!(r.unmap(&long, 0x710), VBLK_OK);
    r.step();
    assert_eq!(r.suspend(), VBLK_OK);
    assert_eq!(r.resume(), VBLK_OK);
    assert_eq!(r.unmap(&long, 0x711), VBLK_OK);
    r.step();
    r.stop();
    let c: Vec<(usize, i32)> = r.take().into_iter().filter(|&(t, _)| t >= 0x710).collect();
    assert_eq!(c, vec![(0x710, VBLK_E_ABORTED), (0x711, VBLK_E_ABORTED)]);
    let mut st = VblkStats::default();
    // SAFETY: the live handle (stopped, not destroyed); a local out-pointer.
    assert_eq!(unsafe { (kexts.blk.vblk_stats)(r.dev, &mut st) }, VBLK_OK);
    assert_eq!((st.unmaps, st.in_flight), (4, 0));
    r.unload();
}

/// The write cache is set through the device's configuration, which is not touched while
/// the device is reset (§5.2.5.1): asleep, `VBLK_E_BUSY` (the shim asks again after the
/// wake, when it works); failed for good (after a failed wake too, when the shim, awake,
/// would wait for ever on a `VBLK_E_BUSY`) or stopped, `VBLK_E_DEVICE`. The device's
/// writeback field stays as it was meanwhile.
fn the_write_cache_is_left_alone_while_the_device_is_reset(kexts: Kexts) {
    let r = Rig::start(kexts, full_model(), SimMode::Modern, Preference::Auto, 64);
    let writeback = || r.sim.device_config()[32];
    assert_eq!(writeback(), 1);
    let set = |on| r.set_write_cache(on);
    assert_eq!(r.suspend(), VBLK_OK);
    assert_eq!(set(false), VBLK_E_BUSY, "asleep");
    assert_eq!(writeback(), 1);
    assert_eq!(r.resume(), VBLK_OK);
    assert_eq!(set(false), VBLK_OK, "awake");
    assert_eq!(writeback(), 0);
    // A wake the device does not come back from.
    let offered = r.sim.offered_features();
    assert_eq!(r.suspend(), VBLK_OK);
    r.sim.set_offered_features(0);
    assert_eq!(r.resume(), VBLK_E_DEVICE);
    assert_eq!(set(true), VBLK_E_DEVICE, "failed at the wake");
    assert_eq!(writeback(), 0);
    // Back at the next wake; then a fault the device cannot be brought back from.
    assert_eq!(r.suspend(), VBLK_OK);
    r.sim.set_offered_features(offered);
    assert_eq!(r.resume(), VBLK_OK);
    r.sim.set_offered_features(0);
    r.sim.trigger_needs_reset();
    r.fam().interrupts();
    assert_eq!(set(true), VBLK_E_DEVICE, "failed");
    assert_eq!(writeback(), 0);
    r.stop();
    assert_eq!(set(true), VBLK_E_DEVICE, "stopped");
    assert_eq!(writeback(), 0);
    r.unload();
}

/// A share of a long unmap completes while reads hold more than half the ring: the next
/// share goes at once with the room there is, not waiting for a share of half the ring
/// (which other I/O may never leave), and the unmap ends OK with nothing lost. Cut off by
/// sleep with the ring full of reads and its share, it completes once, aborted, with every
/// read (the shim sends them again after the wake).
fn a_long_unmap_waits_for_room_between_shares(kexts: Kexts) {
    let (mut r, long) = long_unmap_rig(kexts);
    let s = r.segments(4096, 1, None);
    for (round, unmap) in [0x800usize, 0x900].into_iter().enumerate() {
        let share = r.start_long_unmap(&long, unmap);
        // Reads take 33 of the 48 free entries; then the rest of the share completes,
        // leaving 31 free: the next share takes them.
        for k in 0..33 {
            assert_eq!(r.rw(false, 0, 8, &s, unmap + 1 + k), VBLK_OK, "read {k}");
        }
        let published = r.published();
        for c in &share[16..] {
            r.complete_ok(c);
        }
        r.sim.signal_used(0);
        r.fam().interrupts();
        assert_eq!(
            r.published(),
            published.wrapping_add(31),
            "the next share, in the room there is"
        );
        assert!(r.take().is_empty());
        assert_eq!(
            r.rw(false, 0, 8, &s, unmap + 34),
            VBLK_E_BUSY,
            "the ring is full"
        );
        if round == 0 {
            // The reads complete, and the unmap ends.
            assert_eq!(r.finish(unmap), VBLK_OK);
            let mut c = r.take();
            while c.len() < 34 {
                assert!(r.step() > 0);
                c.extend(r.take());
            }
            assert_eq!(c.len(), 34);
            assert!(c.iter().all(|&(_, st)| st == VBLK_OK), "{c:?}");
        } else {
            assert_eq!(r.suspend(), VBLK_OK);
            let mut c = r.take();
            c.sort();
            let want: Vec<(usize, i32)> = (0..34).map(|k| (unmap + k, VBLK_E_ABORTED)).collect();
            assert_eq!(c, want);
            assert_eq!(r.resume(), VBLK_OK);
        }
    }
    r.unload();
}

/// Reads keep 40 of the 64 entries busy, one completing and another taking its place at
/// every interrupt, when a long unmap's share completes: the unmap still progresses (its
/// shares take the room there is, at least one device request), and ends OK within a few
/// interrupts instead of waiting for half the ring to be free at once, which never comes.
fn a_long_unmap_progresses_under_sustained_io(kexts: Kexts) {
    let (mut r, long) = long_unmap_rig(kexts);
    let s = r.segments(4096, 1, None);
    let unmap = 0xa00usize;
    let share = r.start_long_unmap(&long, unmap);
    let mut next_read = unmap + 1;
    for _ in 0..40 {
        assert_eq!(r.rw(false, 0, 8, &s, next_read), VBLK_OK);
        next_read += 1;
    }
    let mut reads: std::collections::VecDeque<Chain> = r.sim.pop_chains(0).into();
    assert_eq!(reads.len(), 40);
    for c in &share[16..] {
        r.complete_ok(c);
    }
    r.sim.signal_used(0);
    r.fam().interrupts();
    let done = |r: &Rig| {
        r.log
            .borrow()
            .completions
            .iter()
            .find(|&&(t, _)| t == unmap)
            .map(|&(_, st)| st)
    };
    let mut interrupts = 0;
    while done(&r).is_none() {
        interrupts += 1;
        assert!(
            interrupts <= 8,
            "the unmap starves behind 40 reads in flight"
        );
        // The device: every discard it was given, and the oldest read.
        for c in r.sim.pop_chains(0) {
            let header = r.mem.bytes_at(c.descs[0].addr, 4);
            if u32::from_le_bytes(header.try_into().unwrap()) == proto::T_DISCARD {
                r.complete_ok(&c);
            } else {
                reads.push_back(c);
            }
        }
        let oldest = reads.pop_front().unwrap();
        r.complete_ok(&oldest);
        r.sim.signal_used(0);
        r.fam().interrupts();
        assert_eq!(r.rw(false, 0, 8, &s, next_read), VBLK_OK, "a new read");
        next_read += 1;
    }
    assert_eq!(done(&r), Some(VBLK_OK));
    r.unload();
}
