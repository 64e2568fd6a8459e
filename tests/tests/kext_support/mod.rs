//! What the VirtioFamily shim does, played by a test over the PCI simulation: a
//! `VfamPlatform` whose operations reach the sim's config space, BARs, memory and
//! interrupt platform, and the interrupt action that calls `vfam_deliver_interrupt`.
#![allow(dead_code)]

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Mutex;

use virtio_core::platform::{
    BarAccess, Dma, DmaDirection, DmaRegion, InterruptPlatform, PciConfigSpace,
};
use virtio_family_kext::{
    VFAM_PREFER_AUTO, VFAM_PREFER_LEGACY, VfamDevice, VfamPlatform, vfam_deliver_interrupt,
    vfam_device_create, vfam_device_destroy, vfam_identify,
};
use virtio_kext_abi::{VK_VECTOR_INTX, VkDmaRegion, VkStatus};
use virtio_pci::Preference;
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{Sim, SimBars, SimConfig, SimInterrupt, SimIrq};

/// The shim's per-function state: what its C callbacks reach through `ctx`.
pub struct ShimState {
    pub cfg: SimConfig,
    pub bars: SimBars,
    pub mem: IdentityMemory,
    pub irq: Mutex<SimIrq>,
    pub live_dma: Mutex<Vec<u64>>,
}

fn st<'a>(ctx: *mut c_void) -> &'a ShimState {
    // SAFETY: ctx is the Box<ShimState> the Family owns for as long as the device lives.
    unsafe { &*(ctx as *const ShimState) }
}

unsafe extern "C" fn config_read(ctx: *mut c_void, off: u16, width: u8) -> u32 {
    let s = st(ctx);
    match width {
        1 => s.cfg.read8(off).into(),
        2 => s.cfg.read16(off).into(),
        _ => s.cfg.read32(off),
    }
}
unsafe extern "C" fn config_write(ctx: *mut c_void, off: u16, width: u8, v: u32) {
    let s = st(ctx);
    match width {
        1 => s.cfg.write8(off, v as u8),
        2 => s.cfg.write16(off, v as u16),
        _ => s.cfg.write32(off, v),
    }
}
unsafe extern "C" fn bar_info(ctx: *mut c_void, bar: u8, len: *mut u64, io: *mut bool) -> bool {
    let s = st(ctx);
    match s.bars.bar_len(bar) {
        Some(l) => {
            // SAFETY: out-pointers from the Rust side.
            unsafe {
                *len = l;
                *io = s.bars.bar_is_io(bar);
            }
            true
        }
        None => false,
    }
}
unsafe extern "C" fn bar_read(ctx: *mut c_void, bar: u8, off: u64, width: u8) -> u32 {
    let b = &st(ctx).bars;
    let v = match width {
        1 => b.read8(bar, off).map(u32::from),
        2 => b.read16(bar, off).map(u32::from),
        _ => b.read32(bar, off),
    };
    v.expect("the family checks BAR bounds before calling the shim")
}
unsafe extern "C" fn bar_write(ctx: *mut c_void, bar: u8, off: u64, width: u8, v: u32) {
    let b = &st(ctx).bars;
    match width {
        1 => b.write8(bar, off, v as u8),
        2 => b.write16(bar, off, v as u16),
        _ => b.write32(bar, off, v),
    }
}
unsafe extern "C" fn dma_alloc(
    ctx: *mut c_void,
    len: u64,
    align: u64,
    out: *mut VkDmaRegion,
) -> bool {
    let s = st(ctx);
    match s.mem.alloc_coherent(len as usize, align as usize) {
        Ok(r) => {
            s.live_dma.lock().unwrap().push(r.daddr);
            // SAFETY: out-pointer from the Rust side.
            unsafe {
                *out = VkDmaRegion {
                    vaddr: r.vaddr.as_ptr(),
                    daddr: r.daddr,
                    len: r.len as u64,
                }
            };
            true
        }
        Err(_) => false,
    }
}
unsafe extern "C" fn dma_free(ctx: *mut c_void, r: *const VkDmaRegion) {
    let s = st(ctx);
    // SAFETY: pointer from the Rust side.
    let r = unsafe { *r };
    let mut live = s.live_dma.lock().unwrap();
    let i = live
        .iter()
        .position(|&d| d == r.daddr)
        .expect("dma_free of a region the shim never allocated (or freed twice)");
    live.swap_remove(i);
    // SAFETY: the family frees regions only after the device is reset.
    unsafe {
        s.mem.free_coherent(DmaRegion {
            vaddr: NonNull::new(r.vaddr).unwrap(),
            daddr: r.daddr,
            len: r.len as usize,
        })
    };
}
unsafe extern "C" fn dma_map(
    ctx: *mut c_void,
    v: *mut u8,
    len: u64,
    dir: u32,
    out: *mut u64,
) -> bool {
    let d = match dir {
        0 => DmaDirection::ToDevice,
        1 => DmaDirection::FromDevice,
        _ => DmaDirection::Bidirectional,
    };
    match st(ctx).mem.map(NonNull::new(v).unwrap(), len as usize, d) {
        Ok(a) => {
            // SAFETY: out-pointer from the Rust side.
            unsafe { *out = a };
            true
        }
        Err(_) => false,
    }
}
unsafe extern "C" fn dma_unmap(_ctx: *mut c_void, _daddr: u64, _len: u64, _dir: u32) {}
unsafe extern "C" fn irq_msix(ctx: *mut c_void, n: u16) -> bool {
    st(ctx).irq.lock().unwrap().enable_msix(n)
}
unsafe extern "C" fn irq_intx(ctx: *mut c_void) -> bool {
    st(ctx).irq.lock().unwrap().enable_intx()
}
unsafe extern "C" fn irq_disable(ctx: *mut c_void) {
    st(ctx).irq.lock().unwrap().disable()
}

/// The family driver's side of one PCI function: shim state + the Rust device handle.
pub struct Family {
    pub sim: Sim,
    pub state: Box<ShimState>,
    pub platform: Box<VfamPlatform>,
    pub dev: *mut VfamDevice,
}

impl Family {
    /// `start`: identify by IDs (as `probe` does), then create the device (as `start` does).
    pub fn start(sim: &Sim, pref: Preference) -> Result<Family, VkStatus> {
        let cfg = sim.config_space();
        let ty = vfam_identify(cfg.read16(0), cfg.read16(2), cfg.read16(0x2e));
        assert_ne!(ty, 0, "the sim function is a virtio function we drive");
        let state = Box::new(ShimState {
            cfg,
            bars: sim.bars(),
            mem: sim.memory(),
            irq: Mutex::new(sim.irq()),
            live_dma: Mutex::new(Vec::new()),
        });
        let platform = Box::new(VfamPlatform {
            ctx: &*state as *const ShimState as *mut c_void,
            config_read: Some(config_read),
            config_write: Some(config_write),
            bar_info: Some(bar_info),
            bar_read: Some(bar_read),
            bar_write: Some(bar_write),
            dma_alloc: Some(dma_alloc),
            dma_free: Some(dma_free),
            dma_map: Some(dma_map),
            dma_unmap: Some(dma_unmap),
            irq_enable_msix: Some(irq_msix),
            irq_enable_intx: Some(irq_intx),
            irq_disable: Some(irq_disable),
        });
        let mut dev = std::ptr::null_mut();
        let p = match pref {
            Preference::Legacy => VFAM_PREFER_LEGACY,
            Preference::Modern => virtio_family_kext::VFAM_PREFER_MODERN,
            Preference::Auto => VFAM_PREFER_AUTO,
        };
        // SAFETY: the platform and its state live in `Family` until `stop`.
        let s = unsafe { vfam_device_create(&*platform, p, &mut dev) };
        if !s.is_ok() {
            return Err(s);
        }
        assert_eq!(vfam_identify(0x1af4, 0x1041, 0), 1);
        Ok(Family {
            sim: sim.clone(),
            state,
            platform,
            dev,
        })
    }

    /// The interrupt event sources' actions: every interrupt the device sent since the last
    /// call goes to `vfam_deliver_interrupt`. Returns how many.
    pub fn interrupts(&self) -> usize {
        let irqs = self.sim.take_interrupts();
        for i in &irqs {
            let v = match i {
                SimInterrupt::Msix(v) => i32::from(*v),
                SimInterrupt::Intx => VK_VECTOR_INTX,
            };
            // SAFETY: the live handle from `start`, as the shim's interrupt action has it.
            unsafe { vfam_deliver_interrupt(self.dev, v) };
        }
        irqs.len()
    }

    /// DMA regions still allocated through the shim.
    pub fn live_dma(&self) -> usize {
        self.state.live_dma.lock().unwrap().len()
    }

    /// `stop`: destroys the device; every DMA region must be back.
    pub fn stop(self) {
        // SAFETY: the handle came from vfam_device_create and is not used again.
        unsafe { vfam_device_destroy(self.dev) };
        assert_eq!(self.live_dma(), 0, "DMA regions leaked past stop");
    }

    /// The handle as the client crates see it (the nub's `getDevice()`).
    pub fn client_handle(&self) -> *mut virtio_kext_client::VfamDevice {
        self.dev.cast()
    }
}
