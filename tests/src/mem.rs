//! Identity-mapped guest memory for in-process tests: one anonymous mapping registered with
//! rust-vmm's `vm-memory` at a guest address equal to its host address, so a device address
//! handed out by [`IdentityMemory`]'s [`Dma`] implementation is directly usable by
//! `virtio-queue` on the device side.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use virtio_core::platform::{DeviceAddr, Dma, DmaDirection, DmaRegion};
use virtio_core::{Error, Result};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory plus a first-fit allocator over it (setup-time only, like a real platform).
#[derive(Clone)]
pub struct IdentityMemory {
    inner: Arc<Inner>,
}

struct Inner {
    mem: GuestMemoryMmap,
    base: u64,
    len: usize,
    /// Free blocks as (offset, len), sorted by offset.
    free: Mutex<Vec<(usize, usize)>>,
}

impl IdentityMemory {
    /// Maps `len` bytes (rounded up to 4 KiB).
    pub fn new(len: usize) -> Self {
        let len = len.next_multiple_of(4096);
        let region = MmapRegion::new(len).expect("mmap for test guest memory");
        let base = region.as_ptr() as u64;
        let region = GuestRegionMmap::new(region, GuestAddress(base)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        IdentityMemory {
            inner: Arc::new(Inner {
                mem,
                base,
                len,
                free: Mutex::new(vec![(0, len)]),
            }),
        }
    }

    /// The `vm-memory` view the device side uses.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.inner.mem
    }

    /// Whether `[addr, addr+len)` lies inside this memory.
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        addr >= self.inner.base
            && addr
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.inner.base + self.inner.len as u64)
    }

    /// A zeroed buffer inside guest memory, for tests that hand buffers to the device.
    pub fn alloc_buffer(&self, len: usize) -> DmaRegion {
        self.alloc_coherent(len.max(1), 16)
            .expect("test guest memory exhausted")
    }

    /// Bytes of a region (test helper).
    pub fn slice(&self, region: &DmaRegion) -> &mut [u8] {
        // SAFETY: the region was allocated from this memory and stays mapped while `self`
        // lives; tests only call this while the device is not writing the buffer.
        unsafe { std::slice::from_raw_parts_mut(region.vaddr.as_ptr(), region.len) }
    }

    /// Bytes at a device address (test helper; panics outside guest memory).
    pub fn bytes_at(&self, addr: u64, len: usize) -> &mut [u8] {
        assert!(
            self.contains(addr, len),
            "address {addr:#x}+{len} outside guest memory"
        );
        // SAFETY: checked to be inside the live mapping above.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
    }
}

impl Dma for IdentityMemory {
    fn alloc_coherent(&self, len: usize, align: usize) -> Result<DmaRegion> {
        let align = align.max(16);
        let len = len.max(1).next_multiple_of(16);
        let mut free = self.inner.free.lock().map_err(|_| Error::DmaAlloc)?;
        for i in 0..free.len() {
            let (off, flen) = free[i];
            let start = ((self.inner.base as usize + off).next_multiple_of(align))
                - self.inner.base as usize;
            let pad = start - off;
            if pad + len > flen {
                continue;
            }
            free.remove(i);
            if pad > 0 {
                free.insert(i, (off, pad));
            }
            let rest = flen - pad - len;
            if rest > 0 {
                let at = if pad > 0 { i + 1 } else { i };
                free.insert(at, (start + len, rest));
            }
            let addr = self.inner.base + start as u64;
            // SAFETY: [addr, addr+len) is inside the mapping and was free, so nothing else
            // references it; zero it as `alloc_coherent` promises.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
            return Ok(DmaRegion {
                vaddr: NonNull::new(addr as *mut u8).ok_or(Error::DmaAlloc)?,
                daddr: addr,
                len,
            });
        }
        Err(Error::DmaAlloc)
    }

    unsafe fn free_coherent(&self, region: DmaRegion) {
        let off = (region.daddr - self.inner.base) as usize;
        let Ok(mut free) = self.inner.free.lock() else {
            return;
        };
        let pos = free.partition_point(|&(o, _)| o < off);
        free.insert(pos, (off, region.len));
        // Coalesce neighbours so long tests do not fragment the arena.
        let mut i = pos.saturating_sub(1);
        while i + 1 < free.len() {
            if free[i].0 + free[i].1 == free[i + 1].0 {
                free[i].1 += free[i + 1].1;
                free.remove(i + 1);
            } else if i > pos {
                break;
            } else {
                i += 1;
            }
        }
    }

    fn map(&self, vaddr: NonNull<u8>, len: usize, _dir: DmaDirection) -> Result<DeviceAddr> {
        let addr = vaddr.as_ptr() as u64;
        if self.contains(addr, len) {
            Ok(addr)
        } else {
            Err(Error::DmaAlloc)
        }
    }

    fn unmap(&self, _daddr: DeviceAddr, _len: usize, _dir: DmaDirection) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_reuse_and_alignment() {
        let m = IdentityMemory::new(1 << 20);
        let a = m.alloc_coherent(100, 4096).unwrap();
        assert_eq!(a.daddr % 4096, 0);
        assert!(m.slice(&a).iter().all(|&b| b == 0));
        let b = m.alloc_coherent(1 << 19, 16).unwrap();
        let (ad, bd) = (a.daddr, b.daddr);
        assert_ne!(ad, bd);
        unsafe { m.free_coherent(a) };
        unsafe { m.free_coherent(b) };
        // Everything coalesced: the whole arena is allocatable again.
        let all = m.alloc_coherent(1 << 20, 4096).unwrap();
        assert_eq!(all.len, 1 << 20);
    }
}
