//! The platform traits of virtio-core over the operations the C++ shim hands in
//! ([`VfamPlatform`]): `IOPCIDevice` config space, BAR maps, `IOBufferMemoryDescriptor` +
//! `IODMACommand` memory, interrupt event sources.

use core::ffi::c_void;
use core::ptr::NonNull;

use virtio_core::platform::{
    BarAccess, DeviceAddr, Dma, DmaDirection, DmaRegion, InterruptPlatform, PciConfigSpace,
};
use virtio_core::{Error, Result};
use virtio_kext_abi::{VK_DMA_BIDIRECTIONAL, VK_DMA_FROM_DEVICE, VK_DMA_TO_DEVICE, VkDmaRegion};

/// What the family shim implements for one PCI function. Every pointer must be non-null;
/// `ctx` is passed back unchanged (the shim's driver object).
///
/// - `config_read`/`config_write`: `IOPCIDevice::configRead8/16/32` / `configWrite*`, `width`
///   1, 2 or 4;
/// - `bar_info`: whether BAR `bar` (0..=5) is mapped, its length and whether it is I/O space
///   (`IOPCIDevice::mapDeviceMemoryWithRegister`);
/// - `bar_read`/`bar_write`: a register access inside a mapped BAR (bounds are checked on
///   the Rust side first): volatile MMIO, or `IOPCIDevice::ioRead*`/`ioWrite*` for I/O BARs;
/// - `dma_alloc`/`dma_free`: zeroed, physically contiguous memory aligned to `align`
///   (`IOBufferMemoryDescriptor::inTaskWithPhysicalMask`) with its device address from an
///   `IODMACommand`, never a raw physical address;
/// - `dma_map`/`dma_unmap`: a streaming mapping of kernel memory (`IOMemoryDescriptor` +
///   `IODMACommand`); setup-time only;
/// - `irq_enable_msix`: `vectors` interrupt event sources on the `kIOInterruptTypePCIMessaged`
///   indexes, each calling `vfam_deliver_interrupt(dev, k)`; `irq_enable_intx`: one on the
///   INTx index calling `vfam_deliver_interrupt(dev, -1)`; `irq_disable`: removes them.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct VfamPlatform {
    pub ctx: *mut c_void,
    pub config_read: Option<unsafe extern "C" fn(ctx: *mut c_void, offset: u16, width: u8) -> u32>,
    pub config_write:
        Option<unsafe extern "C" fn(ctx: *mut c_void, offset: u16, width: u8, value: u32)>,
    pub bar_info: Option<
        unsafe extern "C" fn(ctx: *mut c_void, bar: u8, len: *mut u64, is_io: *mut bool) -> bool,
    >,
    pub bar_read:
        Option<unsafe extern "C" fn(ctx: *mut c_void, bar: u8, offset: u64, width: u8) -> u32>,
    pub bar_write:
        Option<unsafe extern "C" fn(ctx: *mut c_void, bar: u8, offset: u64, width: u8, value: u32)>,
    pub dma_alloc: Option<
        unsafe extern "C" fn(ctx: *mut c_void, len: u64, align: u64, out: *mut VkDmaRegion) -> bool,
    >,
    pub dma_free: Option<unsafe extern "C" fn(ctx: *mut c_void, region: *const VkDmaRegion)>,
    pub dma_map: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            vaddr: *mut u8,
            len: u64,
            direction: u32,
            daddr: *mut u64,
        ) -> bool,
    >,
    pub dma_unmap:
        Option<unsafe extern "C" fn(ctx: *mut c_void, daddr: u64, len: u64, direction: u32)>,
    pub irq_enable_msix: Option<unsafe extern "C" fn(ctx: *mut c_void, vectors: u16) -> bool>,
    pub irq_enable_intx: Option<unsafe extern "C" fn(ctx: *mut c_void) -> bool>,
    pub irq_disable: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
}

/// The checked form of [`VfamPlatform`]: every operation present.
#[derive(Copy, Clone)]
pub(crate) struct Ops {
    ctx: *mut c_void,
    config_read: unsafe extern "C" fn(*mut c_void, u16, u8) -> u32,
    config_write: unsafe extern "C" fn(*mut c_void, u16, u8, u32),
    bar_read: unsafe extern "C" fn(*mut c_void, u8, u64, u8) -> u32,
    bar_write: unsafe extern "C" fn(*mut c_void, u8, u64, u8, u32),
    dma_alloc: unsafe extern "C" fn(*mut c_void, u64, u64, *mut VkDmaRegion) -> bool,
    dma_free: unsafe extern "C" fn(*mut c_void, *const VkDmaRegion),
    dma_map: unsafe extern "C" fn(*mut c_void, *mut u8, u64, u32, *mut u64) -> bool,
    dma_unmap: unsafe extern "C" fn(*mut c_void, u64, u64, u32),
    irq_enable_msix: unsafe extern "C" fn(*mut c_void, u16) -> bool,
    irq_enable_intx: unsafe extern "C" fn(*mut c_void) -> bool,
    irq_disable: unsafe extern "C" fn(*mut c_void),
}

impl Ops {
    /// `None` when an operation is missing. Also returns the BAR table.
    pub(crate) fn new(p: &VfamPlatform) -> Option<(Ops, BarTable)> {
        let ops = Ops {
            ctx: p.ctx,
            config_read: p.config_read?,
            config_write: p.config_write?,
            bar_read: p.bar_read?,
            bar_write: p.bar_write?,
            dma_alloc: p.dma_alloc?,
            dma_free: p.dma_free?,
            dma_map: p.dma_map?,
            dma_unmap: p.dma_unmap?,
            irq_enable_msix: p.irq_enable_msix?,
            irq_enable_intx: p.irq_enable_intx?,
            irq_disable: p.irq_disable?,
        };
        let info = p.bar_info?;
        let mut bars = [None; 6];
        for (i, slot) in bars.iter_mut().enumerate() {
            let (mut len, mut io) = (0u64, false);
            // SAFETY: the shim's contract (VfamPlatform docs); out-pointers are live locals.
            if unsafe { info(p.ctx, i as u8, &mut len, &mut io) } && len > 0 {
                *slot = Some((len, io));
            }
        }
        Some((ops, bars))
    }
}

/// Length and I/O-ness of each mapped BAR.
pub(crate) type BarTable = [Option<(u64, bool)>; 6];

/// `PciConfigSpace` over the shim's `configRead*`/`configWrite*`.
#[derive(Copy, Clone)]
pub struct KextConfig(pub(crate) Ops);

impl KextConfig {
    fn read(&self, offset: u16, width: u8) -> u32 {
        // SAFETY: the shim's contract; any offset below 256 is a valid config access.
        unsafe { (self.0.config_read)(self.0.ctx, offset, width) }
    }
    fn write(&self, offset: u16, width: u8, value: u32) {
        // SAFETY: as above.
        unsafe { (self.0.config_write)(self.0.ctx, offset, width, value) }
    }
}

impl PciConfigSpace for KextConfig {
    fn read8(&self, offset: u16) -> u8 {
        self.read(offset, 1) as u8
    }
    fn read16(&self, offset: u16) -> u16 {
        self.read(offset, 2) as u16
    }
    fn read32(&self, offset: u16) -> u32 {
        self.read(offset, 4)
    }
    fn write8(&self, offset: u16, value: u8) {
        self.write(offset, 1, value.into())
    }
    fn write16(&self, offset: u16, value: u16) {
        self.write(offset, 2, value.into())
    }
    fn write32(&self, offset: u16, value: u32) {
        self.write(offset, 4, value)
    }
}

/// `BarAccess` over the shim's BAR maps; every access is bounds-checked here before the
/// shim sees it (the second line of defence the trait asks for).
#[derive(Copy, Clone)]
pub struct KextBars {
    pub(crate) ops: Ops,
    pub(crate) bars: BarTable,
}

impl KextBars {
    fn check(&self, bar: u8, offset: u64, width: u8) -> bool {
        let Some(Some((len, _))) = self.bars.get(usize::from(bar)) else {
            return false;
        };
        offset
            .checked_add(u64::from(width))
            .is_some_and(|end| end <= *len)
    }
    fn read(&self, bar: u8, offset: u64, width: u8) -> Option<u32> {
        if !self.check(bar, offset, width) {
            return None;
        }
        // SAFETY: in range of a mapped BAR (checked above); the shim's contract.
        Some(unsafe { (self.ops.bar_read)(self.ops.ctx, bar, offset, width) })
    }
    fn write(&self, bar: u8, offset: u64, width: u8, value: u32) {
        if self.check(bar, offset, width) {
            // SAFETY: as above.
            unsafe { (self.ops.bar_write)(self.ops.ctx, bar, offset, width, value) }
        }
    }
}

impl BarAccess for KextBars {
    fn bar_len(&self, bar: u8) -> Option<u64> {
        self.bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .map(|b| b.0)
    }
    fn bar_is_io(&self, bar: u8) -> bool {
        self.bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .is_some_and(|b| b.1)
    }
    fn read8(&self, bar: u8, offset: u64) -> Option<u8> {
        self.read(bar, offset, 1).map(|v| v as u8)
    }
    fn read16(&self, bar: u8, offset: u64) -> Option<u16> {
        self.read(bar, offset, 2).map(|v| v as u16)
    }
    fn read32(&self, bar: u8, offset: u64) -> Option<u32> {
        self.read(bar, offset, 4)
    }
    fn write8(&self, bar: u8, offset: u64, value: u8) {
        self.write(bar, offset, 1, value.into())
    }
    fn write16(&self, bar: u8, offset: u64, value: u16) {
        self.write(bar, offset, 2, value.into())
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) {
        self.write(bar, offset, 4, value)
    }
}

/// `Dma` over `IOBufferMemoryDescriptor` + `IODMACommand` in the shim.
#[derive(Copy, Clone)]
pub struct KextDma(pub(crate) Ops);

pub(crate) fn direction(dir: DmaDirection) -> u32 {
    match dir {
        DmaDirection::ToDevice => VK_DMA_TO_DEVICE,
        DmaDirection::FromDevice => VK_DMA_FROM_DEVICE,
        DmaDirection::Bidirectional => VK_DMA_BIDIRECTIONAL,
    }
}

impl Dma for KextDma {
    fn alloc_coherent(&self, len: usize, align: usize) -> Result<DmaRegion> {
        let mut out = VkDmaRegion {
            vaddr: core::ptr::null_mut(),
            daddr: 0,
            len: 0,
        };
        // SAFETY: the shim's contract; `out` is a live local.
        let ok = unsafe { (self.0.dma_alloc)(self.0.ctx, len as u64, align as u64, &mut out) };
        let vaddr = NonNull::new(out.vaddr).ok_or(Error::DmaAlloc)?;
        if !ok || (out.len as usize) < len || !(out.vaddr as usize).is_multiple_of(align.max(1)) {
            if ok {
                // SAFETY: returned by dma_alloc just now and never shared.
                unsafe { (self.0.dma_free)(self.0.ctx, &out) };
            }
            return Err(Error::DmaAlloc);
        }
        Ok(DmaRegion {
            vaddr,
            daddr: out.daddr,
            len: out.len as usize,
        })
    }

    unsafe fn free_coherent(&self, region: DmaRegion) {
        let r = VkDmaRegion {
            vaddr: region.vaddr.as_ptr(),
            daddr: region.daddr,
            len: region.len as u64,
        };
        // SAFETY: the caller guarantees the device no longer uses it (trait contract).
        unsafe { (self.0.dma_free)(self.0.ctx, &r) }
    }

    fn map(&self, vaddr: NonNull<u8>, len: usize, dir: DmaDirection) -> Result<DeviceAddr> {
        let mut daddr = 0;
        // SAFETY: the shim's contract; `daddr` is a live local.
        let ok = unsafe {
            (self.0.dma_map)(
                self.0.ctx,
                vaddr.as_ptr(),
                len as u64,
                direction(dir),
                &mut daddr,
            )
        };
        if ok { Ok(daddr) } else { Err(Error::DmaAlloc) }
    }

    fn unmap(&self, daddr: DeviceAddr, len: usize, dir: DmaDirection) {
        // SAFETY: the shim's contract.
        unsafe { (self.0.dma_unmap)(self.0.ctx, daddr, len as u64, direction(dir)) }
    }
}

/// `InterruptPlatform` over the shim's interrupt event sources.
#[derive(Copy, Clone)]
pub struct KextIrq(pub(crate) Ops);

impl InterruptPlatform for KextIrq {
    fn enable_msix(&mut self, vectors: u16) -> bool {
        // SAFETY: the shim's contract.
        unsafe { (self.0.irq_enable_msix)(self.0.ctx, vectors) }
    }
    fn enable_intx(&mut self) -> bool {
        // SAFETY: the shim's contract.
        unsafe { (self.0.irq_enable_intx)(self.0.ctx) }
    }
    fn disable(&mut self) {
        // SAFETY: the shim's contract.
        unsafe { (self.0.irq_disable)(self.0.ctx) }
    }
}
