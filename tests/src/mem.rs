//! Identity-mapped guest memory for in-process tests: one anonymous mapping registered with
//! rust-vmm's `vm-memory` at a guest address equal to its host address, so a device address
//! handed out by [`IdentityMemory`]'s [`Dma`] implementation is directly usable by
//! `virtio-queue` on the device side.
//!
//! The mapping is placed below 16 TiB so that legacy queue PFNs (`address >> 12` in a 32-bit
//! register) can express its addresses; the kernel's default placement (around 2^47 on
//! x86_64) is out of the legacy interface's reach.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_core::platform::{DeviceAddr, Dma, DmaDirection, DmaRegion};
use virtio_core::{Error, Result};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Highest address a legacy PFN can express.
const LEGACY_LIMIT: u64 = 1 << 44;

/// Next candidate address for a low mapping (256 GiB upwards).
static NEXT_LOW: AtomicU64 = AtomicU64::new(0x40_0000_0000);

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
    /// Whether we created the mapping ourselves (and unmap it on drop).
    owned_mapping: bool,
    /// Coherent allocations that may still succeed (`usize::MAX`: no limit); see
    /// [`IdentityMemory::fail_allocations_after`].
    allocations_left: std::sync::atomic::AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.owned_mapping {
            // SAFETY: created by `map_low` with exactly this address and length; the
            // `MmapRegion` built over it by `build_raw` does not own it, and no reference
            // into it outlives `self`.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        }
    }
}

/// Maps `len` bytes at a free address below [`LEGACY_LIMIT`].
fn map_low(len: usize) -> Option<u64> {
    let stride = (len as u64).next_multiple_of(1 << 21) + (1 << 21);
    for _ in 0..256 {
        let want = NEXT_LOW.fetch_add(stride, Ordering::Relaxed);
        if want + len as u64 > LEGACY_LIMIT {
            return None;
        }
        // SAFETY: an anonymous private mapping; MAP_FIXED_NOREPLACE never replaces an
        // existing mapping (a kernel that does not know it treats the address as a hint,
        // checked below).
        let got = unsafe {
            libc::mmap(
                want as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if got == libc::MAP_FAILED {
            continue;
        }
        if got as u64 != want {
            // SAFETY: `got` is the mapping just created, of `len` bytes, unused.
            unsafe { libc::munmap(got, len) };
            continue;
        }
        return Some(want);
    }
    None
}

impl IdentityMemory {
    /// Maps `len` bytes (rounded up to 4 KiB), below 16 TiB when possible.
    pub fn new(len: usize) -> Self {
        let len = len.max(4096).next_multiple_of(4096);
        if let Some(base) = map_low(len) {
            // SAFETY: [base, base + len) is the live mapping created by `map_low`; it is
            // unmapped only when `Inner` drops, after this region.
            let region = unsafe {
                MmapRegion::build_raw(
                    base as *mut u8,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("vm-memory region over the low mapping");
            return Self::with_region(region, base, len, true);
        }
        let region = MmapRegion::new(len).expect("mmap for test guest memory");
        let base = region.as_ptr() as u64;
        Self::with_region(region, base, len, false)
    }

    fn with_region(region: MmapRegion, base: u64, len: usize, owned_mapping: bool) -> Self {
        let region = GuestRegionMmap::new(region, GuestAddress(base)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        IdentityMemory {
            inner: Arc::new(Inner {
                mem,
                base,
                len,
                free: Mutex::new(vec![(0, len)]),
                owned_mapping,
                allocations_left: std::sync::atomic::AtomicUsize::new(usize::MAX),
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

    /// Bytes not allocated: equal before a driver is created and after it is dropped (or
    /// at two points where it should own the same memory) when nothing leaked.
    pub fn free_bytes(&self) -> usize {
        self.inner
            .free
            .lock()
            .map(|f| f.iter().map(|&(_, len)| len).sum())
            .unwrap_or(0)
    }

    /// Lets the next `n` coherent allocations succeed and fails every one after them with
    /// `DmaAlloc` (`None`: no limit), to walk a driver's error paths one allocation at a
    /// time.
    pub fn fail_allocations_after(&self, n: Option<usize>) {
        self.inner
            .allocations_left
            .store(n.unwrap_or(usize::MAX), std::sync::atomic::Ordering::SeqCst);
    }

    /// A zeroed buffer inside guest memory, for tests that hand buffers to the device.
    pub fn alloc_buffer(&self, len: usize) -> DmaRegion {
        self.alloc_coherent(len.max(1), 16)
            .expect("test guest memory exhausted")
    }

    /// Bytes of a region allocated from this memory (test helper; like a device, tests may
    /// alias buffers, so this hands out a mutable view through a shared reference).
    #[allow(clippy::mut_from_ref)]
    pub fn slice(&self, region: &DmaRegion) -> &mut [u8] {
        self.bytes_at(region.daddr, region.len)
    }

    /// Bytes at a device address (test helper; panics outside guest memory).
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_at(&self, addr: u64, len: usize) -> &mut [u8] {
        assert!(
            self.contains(addr, len),
            "address {addr:#x}+{len} outside guest memory"
        );
        // SAFETY: checked to be inside the live mapping above; identity mapped.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
    }
}

impl Dma for IdentityMemory {
    fn alloc_coherent(&self, len: usize, align: usize) -> Result<DmaRegion> {
        use std::sync::atomic::Ordering;
        let limited =
            self.inner
                .allocations_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                    usize::MAX => Some(left),
                    0 => None,
                    n => Some(n - 1),
                });
        if limited.is_err() {
            return Err(Error::DmaAlloc);
        }
        let align = align.max(16);
        let len = len.max(1).next_multiple_of(16);
        let base = self.inner.base as usize;
        let mut free = self.inner.free.lock().map_err(|_| Error::DmaAlloc)?;
        let pick = free.iter().enumerate().find_map(|(i, &(off, flen))| {
            let start = (base + off).next_multiple_of(align) - base;
            (start - off + len <= flen).then_some((i, off, flen, start))
        });
        let Some((i, off, flen, start)) = pick else {
            return Err(Error::DmaAlloc);
        };
        free.remove(i);
        let tail = off + flen - (start + len);
        if tail > 0 {
            free.insert(i, (start + len, tail));
        }
        if start > off {
            free.insert(i, (off, start - off));
        }
        let addr = self.inner.base + start as u64;
        // SAFETY: [addr, addr+len) is inside the mapping and was free, so nothing else
        // references it; zero it as `alloc_coherent` promises.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
        Ok(DmaRegion {
            vaddr: NonNull::new(addr as *mut u8).ok_or(Error::DmaAlloc)?,
            daddr: addr,
            len,
        })
    }

    unsafe fn free_coherent(&self, region: DmaRegion) {
        let Ok(mut free) = self.inner.free.lock() else {
            return;
        };
        let off = (region.daddr - self.inner.base) as usize;
        let pos = free.partition_point(|&(o, _)| o < off);
        free.insert(pos, (off, region.len));
        // Coalesce neighbours so long tests do not fragment the arena.
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(free.len());
        for &(o, l) in free.iter() {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => merged.push((o, l)),
            }
        }
        *free = merged;
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
    fn alloc_free_reuse_alignment_and_low_placement() {
        let m = IdentityMemory::new(1 << 20);
        let a = m.alloc_coherent(100, 4096).unwrap();
        assert_eq!(a.daddr % 4096, 0);
        assert!(a.daddr < LEGACY_LIMIT, "legacy PFNs must reach test memory");
        assert!(m.slice(&a).iter().all(|&b| b == 0));
        let b = m.alloc_coherent(1 << 19, 16).unwrap();
        assert_ne!(a.daddr, b.daddr);
        // SAFETY: no device uses these regions.
        unsafe {
            m.free_coherent(a);
            m.free_coherent(b);
        }
        // Everything coalesced: the whole arena is allocatable again.
        let all = m.alloc_coherent(1 << 20, 4096).unwrap();
        assert_eq!(all.len, 1 << 20);
    }
}
