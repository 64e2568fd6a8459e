//! What a platform (an IOKit kext, the bare-metal QEMU guest, the in-process simulation)
//! implements once so that the transports and device drivers run on it.
//!
//! Every trait here documents how the two real platforms implement it:
//! - **IOKit shim** (`kexts/`): the C++ side calls into IOKit and hands results to Rust.
//! - **Bare-metal guest** (`tests/guest/`): identity-mapped memory, port I/O, its own APIC code.

use crate::error::Result;
use core::ptr::NonNull;

/// A device (DMA) address: what goes into descriptors and queue address registers.
/// With an IOMMU this is an IOVA, not a physical address.
pub type DeviceAddr = u64;

/// Direction of a streaming DMA mapping, from the device's point of view.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DmaDirection {
    /// The device reads the buffer (driver → device, e.g. a transmitted frame).
    ToDevice,
    /// The device writes the buffer (device → driver, e.g. a receive buffer).
    FromDevice,
    Bidirectional,
}

/// Coherent, zeroed, physically contiguous memory shared with the device.
#[derive(Debug)]
pub struct DmaRegion {
    /// Where the CPU sees it.
    pub vaddr: NonNull<u8>,
    /// Where the device sees it.
    pub daddr: DeviceAddr,
    /// Size in bytes (at least what was asked for).
    pub len: usize,
}

// SAFETY: a DmaRegion is a description of memory owned by whoever allocated it; moving the
// description between threads is fine. Device-written bytes are read only through
// `read_into` (volatile loads, or an asm block the compiler cannot see into).
unsafe impl Send for DmaRegion {}
// SAFETY: as above; shared references only hand out the addresses.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Pointer to byte `offset`, or `None` if `offset + len` leaves the region.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset <= self.len, so the result stays within (or one past) the region.
        Some(unsafe { self.vaddr.add(offset) })
    }

    /// The `len` bytes at `offset`, or `None` when out of range.
    ///
    /// # Safety
    /// The device must not write the range while the slice lives: the bytes are either not
    /// posted to the device, or were returned through the used ring (§2.7.14).
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let p = self.ptr_at(offset, len)?;
        // SAFETY: in range (`ptr_at`); the region outlives `&self`; the caller guarantees
        // the device does not write it meanwhile.
        Some(unsafe { core::slice::from_raw_parts(p.as_ptr(), len) })
    }

    /// Copies the bytes at `offset` into `dst` (driver memory), each byte read once by
    /// accesses the compiler can neither split, repeat nor drop; false (nothing copied) when
    /// out of range. For device-written buffers: a device that breaks the rules (§2.7.14)
    /// may still be writing them, so no reference to the DMA bytes is ever formed and
    /// validated values come from the copy.
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) -> bool {
        let Some(p) = self.ptr_at(offset, dst.len()) else {
            return false;
        };
        // SAFETY: the `dst.len()` bytes at `p` lie in the region (`ptr_at`), which stays
        // mapped while `&self` lives; `dst` is driver memory, so it does not overlap them.
        unsafe { copy_from_device(p.as_ptr(), dst) };
        true
    }

    /// Copies `data` to `offset`; false (nothing written) when out of range. For
    /// driver-owned bytes (headers, buffers not posted to the device).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> bool {
        match self.ptr_at(offset, data.len()) {
            Some(p) => {
                // SAFETY: in range (`ptr_at`); `data` cannot overlap DMA memory it borrows
                // from elsewhere than this region's owner, and copy is bytewise.
                unsafe { core::ptr::copy(data.as_ptr(), p.as_ptr(), data.len()) };
                true
            }
            None => false,
        }
    }
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
use copy_rep_movs as copy_from_device;
#[cfg(any(not(target_arch = "x86_64"), miri))]
use copy_volatile as copy_from_device;

/// Copies `dst.len()` device-written bytes at `src` into `dst` with `rep movsq` for the
/// whole words and `rep movsb` for the rest: one instruction each, whatever the length.
/// The asm block is opaque to the compiler, which therefore reads each byte exactly once,
/// as the volatile loads of the portable copy below guarantee; a concurrent device write
/// only changes what is copied. About a quarter of the portable copy's instructions for a
/// received frame as QEMU's TCG counts them (one per repetition), and fewer at every length
/// down to a 12-byte header: used for all lengths (a version that kept the loop below 64
/// bytes cost about 110 more per packet). On hardware, short `rep movs` has a start-up
/// cost that CPUs with fast short string moves (FSRM) mostly remove; not measured here.
///
/// # Safety
/// `src` is valid for reads of `dst.len()` bytes that do not overlap `dst`.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
unsafe fn copy_rep_movs(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    // SAFETY: the caller's contract bounds both ranges; `rep movs` copies forward (the
    // direction flag is clear on entry to an asm block, and it is not changed) and leaves
    // the flags alone; rcx, rdi and rsi are declared clobbered.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) len % 8,
            inout("rcx") len / 8 => _,
            inout("rdi") dst.as_mut_ptr() => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
}

/// The portable copy (other architectures, and Miri, which does not run asm): aligned
/// 8-byte volatile loads in the middle, single bytes at the unaligned ends; each byte read
/// exactly once.
///
/// # Safety
/// `src` is valid for reads of `dst.len()` bytes that do not overlap `dst`.
#[cfg(any(not(target_arch = "x86_64"), miri, test))]
unsafe fn copy_volatile(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let head = src.align_offset(8).min(len);
    let words = (len - head) / 8;
    // The unaligned ends, a byte at a time (`from..to` within `0..len`).
    let copy_bytes = |dst: &mut [u8], from: usize, to: usize| {
        for i in from..to {
            // SAFETY: `src + i` is one of the bytes the caller vouches for; a volatile read
            // is defined whatever the device does to the bytes concurrently.
            let b = unsafe { src.add(i).read_volatile() };
            if let Some(d) = dst.get_mut(i) {
                *d = b;
            }
        }
    };
    copy_bytes(dst, 0, head);
    let out = dst.as_mut_ptr();
    // Eight words per step: volatile loads are never merged or unrolled by the compiler,
    // and a received frame is about 190 words.
    let mut w = 0;
    while w + 8 <= words {
        let at = head + 8 * w;
        // SAFETY: `src + at` is 8-aligned (`head` reached the alignment) and the 64 bytes
        // are the caller's (`at + 64 <= head + 8 * words <= len`); volatile as above.
        // `out + at .. + 64` lies in `dst` (same bound), written unaligned.
        unsafe {
            let s = src.add(at).cast::<u64>();
            let v = [
                s.read_volatile(),
                s.add(1).read_volatile(),
                s.add(2).read_volatile(),
                s.add(3).read_volatile(),
                s.add(4).read_volatile(),
                s.add(5).read_volatile(),
                s.add(6).read_volatile(),
                s.add(7).read_volatile(),
            ];
            out.add(at).cast::<[u64; 8]>().write_unaligned(v);
        }
        w += 8;
    }
    while w < words {
        let at = head + 8 * w;
        // SAFETY: as above, for one word (`at + 8 <= len`).
        unsafe {
            let v = src.add(at).cast::<u64>().read_volatile();
            out.add(at).cast::<u64>().write_unaligned(v);
        }
        w += 1;
    }
    copy_bytes(dst, head + 8 * words, len);
}

/// DMA memory for rings and device buffers.
///
/// - IOKit: `IOBufferMemoryDescriptor::inTaskWithPhysicalMask(kernel_task,
///   kIODirectionInOut | kIOMemoryPhysicallyContiguous, len, mask)` prepared with an
///   `IODMACommand` (`withSpecification(kIODMACommandOutputHost64, 64, ...)` +
///   `gen64IOVMSegments`) for the device address; `map` uses an `IODMACommand` on the
///   caller's memory descriptor. Never a raw physical address: an IOMMU (VT-d, DART) may
///   be present.
/// - Bare-metal guest: identity mapping; `alloc_coherent` takes page-aligned zeroed memory
///   from the heap and `daddr == vaddr`; `map` returns the virtual address.
pub trait Dma {
    /// Allocates zeroed coherent memory aligned to at least `align` (a power of two <= 4096).
    /// Called only at setup time.
    fn alloc_coherent(&self, len: usize, align: usize) -> Result<DmaRegion>;

    /// Frees a region from [`Dma::alloc_coherent`].
    ///
    /// # Safety
    /// The device must no longer access it (queue reset or device reset first), and the
    /// region must not be used afterwards.
    unsafe fn free_coherent(&self, region: DmaRegion);

    /// Makes `len` bytes at `vaddr` visible to the device and returns the device address.
    /// Must not allocate on platforms where it is used on an I/O path.
    fn map(&self, vaddr: NonNull<u8>, len: usize, dir: DmaDirection) -> Result<DeviceAddr>;

    /// Ends a mapping from [`Dma::map`] (syncs caches for `FromDevice` where needed).
    fn unmap(&self, daddr: DeviceAddr, len: usize, dir: DmaDirection);
}

/// PCI configuration space of one function.
///
/// - IOKit: `IOPCIDevice::configRead8/16/32` / `configWrite8/16/32`.
/// - Bare-metal guest: mechanism #1, ports 0xCF8 (address) / 0xCFC (data).
///
/// Offsets are below 256 (the legacy config header and capability list).
pub trait PciConfigSpace {
    fn read8(&self, offset: u16) -> u8;
    fn read16(&self, offset: u16) -> u16;
    fn read32(&self, offset: u16) -> u32;
    fn write8(&self, offset: u16, value: u8);
    fn write16(&self, offset: u16, value: u16);
    fn write32(&self, offset: u16, value: u32);
}

/// Register access to the function's BARs, memory or I/O, little-endian registers.
///
/// - IOKit: memory BARs through `IOPCIDevice::mapDeviceMemoryWithRegister` (an `IOMemoryMap`
///   whose virtual address is accessed volatile); I/O BARs through `IOPCIDevice::ioRead*`
///   / `ioWrite*` with the BAR's `IOMemoryMap`.
/// - Bare-metal guest: identity-mapped MMIO with volatile access; `in`/`out` for I/O BARs.
///
/// Implementations must check `offset + width` against the BAR length and return `None`
/// (read) / do nothing (write) when outside: the transport validates offsets from the
/// device's capabilities before use, this is the second line of defence.
pub trait BarAccess {
    /// Length of BAR `bar` (0..=5) in bytes, or `None` if it is not implemented/assigned.
    fn bar_len(&self, bar: u8) -> Option<u64>;
    /// Whether BAR `bar` is an I/O-space BAR.
    fn bar_is_io(&self, bar: u8) -> bool;
    fn read8(&self, bar: u8, offset: u64) -> Option<u8>;
    fn read16(&self, bar: u8, offset: u64) -> Option<u16>;
    fn read32(&self, bar: u8, offset: u64) -> Option<u32>;
    fn write8(&self, bar: u8, offset: u64, value: u8);
    fn write16(&self, bar: u8, offset: u64, value: u16);
    fn write32(&self, bar: u8, offset: u64, value: u32);
}

/// How the platform delivers this function's interrupts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InterruptMode {
    /// MSI-X with `vectors` vectors enabled (MSI-X table entries 0..vectors).
    MsiX { vectors: u16 },
    /// Legacy INTx (level-triggered, shared): the bus reads the ISR to demultiplex.
    Intx,
    /// No interrupts: the driver polls.
    Polling,
}

/// Interrupt plumbing of one PCI function.
///
/// - IOKit: `IOPCIDevice::getInterruptType` to find `kIOInterruptTypePCIMessaged` sources
///   (MSI-X index k), one `IOFilterInterruptEventSource` per vector on the family's work
///   loop; INTx is the source whose type is not messaged. IOKit programs the MSI-X table.
/// - Bare-metal guest: programs the MSI-X table (address 0xFEE0_0000 | apic id, data =
///   IDT vector) and sets MSI-X Enable in the capability; INTx through the I/O APIC using
///   the interrupt line from config space.
///
/// The transport asks in the fallback order of virtio 1.2 §4.1.4.8 practice (Linux,
/// FreeBSD): one vector per queue plus config → two vectors (config + all queues) → INTx.
pub trait InterruptPlatform {
    /// Enables MSI-X with exactly `vectors` vectors, routed to handlers that call the bus's
    /// interrupt entry with the vector index. Returns false if impossible.
    fn enable_msix(&mut self, vectors: u16) -> bool;
    /// Enables INTx delivery. Returns false if the function has no interrupt pin/line.
    fn enable_intx(&mut self) -> bool;
    /// Disables whatever was enabled (MSI-X or INTx); called on reset/stop.
    fn disable(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset and length around the 8-byte alignment copies exactly the bytes asked
    /// for, and nothing out of range, through `read_into` and through the portable copy
    /// (the same one on architectures other than x86_64); guard bytes around the
    /// destination catch a copy that writes past either end.
    #[test]
    fn read_into_copies_every_offset_and_length() {
        // Lengths up to 199 bytes: up to two 64-byte steps, then single words, then bytes.
        let mut backing: alloc::vec::Vec<u64> = alloc::vec![0; 32];
        let bytes = backing.len() * 8;
        let base = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
        for i in 0..bytes {
            // SAFETY: i < bytes, inside `backing`.
            unsafe { base.as_ptr().add(i).write(i as u8 ^ 0x5a) };
        }
        let region = DmaRegion {
            vaddr: base,
            daddr: 0,
            len: bytes,
        };
        const GUARD: usize = 9;
        for offset in 0..20 {
            for len in 0..200 {
                let want: alloc::vec::Vec<u8> =
                    (offset..offset + len).map(|i| i as u8 ^ 0x5a).collect();
                let mut out = alloc::vec![0xEEu8; GUARD + len + GUARD];
                assert!(region.read_into(offset, &mut out[GUARD..GUARD + len]));
                assert_eq!(
                    &out[GUARD..GUARD + len],
                    &want[..],
                    "offset {offset}, len {len}"
                );
                // The portable copy too, wherever `read_into` uses the other one.
                let mut out2 = alloc::vec![0xEEu8; GUARD + len + GUARD];
                // SAFETY: offset + len <= 218 < bytes: inside `backing`, apart from `out2`.
                unsafe { copy_volatile(base.as_ptr().add(offset), &mut out2[GUARD..GUARD + len]) };
                assert_eq!(
                    &out2[GUARD..GUARD + len],
                    &want[..],
                    "portable, offset {offset}"
                );
                for o in [&out, &out2] {
                    let mut guards = o[..GUARD].iter().chain(&o[GUARD + len..]);
                    assert!(guards.all(|&b| b == 0xEE), "a guard byte was written");
                }
            }
        }
        let mut too_far = [0u8; 8];
        assert!(!region.read_into(bytes - 4, &mut too_far));
    }
}
