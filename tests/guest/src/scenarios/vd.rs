//! Glue for the `virtio-drivers` crate (rcore-os), the comparison driver of the benchmarks:
//! a [`Hal`] for this guest's identity-mapped memory, config mechanism #1 for its PCI root,
//! and opening its `PciTransport` on a function found by our enumeration.

use crate::pci::{PciAddress, PciFunction};
use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

const PAGE: usize = 4096;

/// Identity-mapped DMA: device addresses are guest-physical = virtual.
pub struct GuestHal;

// SAFETY: allocations are page-aligned, zeroed and exclusively owned until freed; the
// guest identity-maps all RAM and maps BARs uncacheable before this is used (`Env::open`),
// so a buffer's address is also its device address.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE, PAGE).expect("layout");
        // SAFETY: non-zero size (virtio-drivers never asks for 0 pages).
        let p = unsafe { alloc_zeroed(layout) };
        let nn = NonNull::new(p).expect("DMA allocation");
        (p as u64, nn)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * PAGE, PAGE).expect("layout");
        // SAFETY: per the trait contract, allocated by `dma_alloc` with this page count.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("BAR address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// Config mechanism #1 for virtio-drivers' PCI root.
pub struct Cam;

impl ConfigurationAccess for Cam {
    fn read_word(&self, df: DeviceFunction, off: u8) -> u32 {
        PciAddress::new(df.bus, df.device, df.function).read32(u16::from(off))
    }
    fn write_word(&mut self, df: DeviceFunction, off: u8, data: u32) {
        PciAddress::new(df.bus, df.device, df.function).write32(u16::from(off), data)
    }
    unsafe fn unsafe_clone(&self) -> Self {
        Cam
    }
}

/// virtio-drivers' own PCI transport for `func` (call `Env::open` first: decode, bus
/// master and BAR mappings).
pub fn transport(func: &PciFunction) -> Result<PciTransport, alloc::string::String> {
    let mut root = PciRoot::new(Cam);
    let df = DeviceFunction {
        bus: func.addr.bus,
        device: func.addr.dev,
        function: func.addr.func,
    };
    PciTransport::new::<GuestHal, Cam>(&mut root, df)
        .map_err(|e| alloc::format!("PciTransport::new: {e:?}"))
}
