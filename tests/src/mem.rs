//! Identity-mapped guest memory for in-process tests: one anonymous mapping registered with
//! rust-vmm's `vm-memory` at a guest address equal to its host address, so a device address
//! handed out by [`IdentityMemory`]'s [`Dma`] implementation is directly usable by
//! `virtio-queue` on the device side.
//!
//! The mapping is placed below 16 TiB so that legacy queue PFNs (`address >> 12` in a 32-bit
//! register) can express its addresses; the kernel's default placement (around 2^47 on
//! x86_64) is out of the legacy interface's reach.
//!
//! Under Miri the mapping is a plain private anonymous one (the only kind Miri interprets),
//! and every host pointer handed out is derived from the mapping's own pointer, never cast
//! from an integer, so Miri checks each access against the allocation (strict provenance).

use std::ptr::NonNull;
#[cfg(not(miri))]
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_core::platform::{DeviceAddr, Dma, DmaDirection, DmaRegion};
use virtio_core::{Error, Result};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Highest address a legacy PFN can express.
const LEGACY_LIMIT: u64 = 1 << 44;

/// Protection and flags of the guest-memory mapping (as `MmapRegion::build_raw` is told);
/// placement flags aside, the same under Miri.
const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;

/// Windows tried for low mappings, in order: 256 GiB up to the legacy limit, then
/// 1–2 GiB. AddressSanitizer reserves everything between about 2 GiB and 16 TiB for its
/// shadow memory, so under ASan (`cargo fuzz`) only the second window is free; without the
/// fallback every mapping there landed above 16 TiB, out of reach of legacy PFNs, and each
/// cost 256 failed `mmap` calls first.
#[cfg(not(miri))]
const WINDOWS: [(u64, u64); 2] = [(0x40_0000_0000, LEGACY_LIMIT), (0x4000_0000, 0x8000_0000)];

/// Next candidate address for a low mapping, inside `WINDOWS[WINDOW]`. It wraps around to
/// the start of the window: mappings are unmapped when their memory drops, so a process
/// that creates millions of them (a fuzzer) reuses the addresses; a candidate still in use
/// fails with `EEXIST` and the next one is tried.
#[cfg(not(miri))]
static NEXT_LOW: AtomicU64 = AtomicU64::new(WINDOWS[0].0);
/// The window in use (moves to the next after repeated failures, never back).
#[cfg(not(miri))]
static WINDOW: AtomicUsize = AtomicUsize::new(0);

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

impl Inner {
    /// Whether `[addr, addr+len)` lies inside this memory.
    fn contains(&self, addr: u64, len: usize) -> bool {
        addr >= self.base
            && addr
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.base + self.len as u64)
    }

    /// Host pointer to `[addr, addr+len)` (identity mapped: numerically `addr`), or `None`
    /// outside this memory. Derived from the region's pointer, so it carries the mapping's
    /// provenance.
    fn host_ptr(&self, addr: u64, len: usize) -> Option<NonNull<u8>> {
        if !self.contains(addr, len) {
            return None;
        }
        let start = self.mem.get_host_address(GuestAddress(self.base)).ok()?;
        // SAFETY: `addr - base + len <= self.len` (checked above), so the offset stays inside
        // (or one past the end of) the live mapping `start` points to.
        NonNull::new(unsafe { start.add((addr - self.base) as usize) })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.owned_mapping {
            return;
        }
        if let Some(start) = self.host_ptr(self.base, self.len) {
            // SAFETY: created by `map_guest_memory` with exactly this address and length;
            // the `MmapRegion` built over it by `build_raw` does not own it, and no
            // reference into it outlives `self`.
            unsafe { libc::munmap(start.as_ptr().cast(), self.len) };
        }
    }
}

/// Maps `len` zeroed bytes below [`LEGACY_LIMIT`] (`map_low`).
#[cfg(not(miri))]
fn map_guest_memory(len: usize) -> Option<NonNull<u8>> {
    // The mapping comes from the kernel, not from a Rust allocation: its address is all
    // the provenance there is.
    NonNull::new(std::ptr::with_exposed_provenance_mut(map_low(len)? as usize))
}

/// Maps `len` zeroed bytes wherever Miri puts them: Miri interprets only plain
/// `MAP_PRIVATE | MAP_ANONYMOUS` mappings (no address hint, `MAP_FIXED_NOREPLACE` or
/// `MAP_NORESERVE`), page-aligned like the kernel's. Its addresses are low, so
/// [`LEGACY_LIMIT`] holds; checked all the same.
#[cfg(miri)]
fn map_guest_memory(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address of Miri's choosing.
    let got = unsafe { libc::mmap(std::ptr::null_mut(), len, PROT, FLAGS, -1, 0) };
    if got == libc::MAP_FAILED {
        return None;
    }
    if got.addr() as u64 + len as u64 > LEGACY_LIMIT {
        // SAFETY: `got` is the mapping just created, of `len` bytes, unused.
        unsafe { libc::munmap(got, len) };
        return None;
    }
    NonNull::new(got.cast())
}

/// Maps `len` bytes at a free address below [`LEGACY_LIMIT`].
#[cfg(not(miri))]
fn map_low(len: usize) -> Option<u64> {
    let stride = (len as u64).next_multiple_of(1 << 21) + (1 << 21);
    let mut failures = 0;
    for _ in 0..256 {
        let window = WINDOW.load(Ordering::Relaxed);
        let (lo, hi) = *WINDOWS.get(window)?;
        let mut want = NEXT_LOW.fetch_add(stride, Ordering::Relaxed);
        if want < lo || want + len as u64 > hi {
            // Wrap (or enter a new window); a racing thread may wrap too, which only
            // makes a candidate collide and be skipped.
            if stride + len as u64 > hi - lo {
                return None;
            }
            NEXT_LOW.store(lo + stride, Ordering::Relaxed);
            want = lo;
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
        if got != libc::MAP_FAILED && got as u64 == want {
            return Some(want);
        }
        if got != libc::MAP_FAILED {
            // SAFETY: `got` is the mapping just created, of `len` bytes, unused.
            unsafe { libc::munmap(got, len) };
        }
        failures += 1;
        if failures >= 8 && window + 1 < WINDOWS.len() {
            // This window is taken (ASan's shadow): move to the next one for good.
            let _ =
                WINDOW.compare_exchange(window, window + 1, Ordering::Relaxed, Ordering::Relaxed);
            failures = 0;
        }
    }
    None
}

impl IdentityMemory {
    /// Maps `len` bytes (rounded up to 4 KiB), below 16 TiB when possible.
    pub fn new(len: usize) -> Self {
        let len = len.max(4096).next_multiple_of(4096);
        if let Some(start) = map_guest_memory(len) {
            // SAFETY: [start, start + len) is the live mapping `map_guest_memory` created, with
            // these protections and flags; it is unmapped only when `Inner` drops, after
            // this region.
            let region = unsafe { MmapRegion::build_raw(start.as_ptr(), len, PROT, FLAGS) }
                .expect("vm-memory region over the low mapping");
            return Self::with_region(region, start.addr().get() as u64, len, true);
        }
        let region = MmapRegion::new(len).expect("mmap for test guest memory");
        let base = region.as_ptr().addr() as u64;
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
        self.inner.contains(addr, len)
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
        let Some(p) = self.inner.host_ptr(addr, len) else {
            panic!("address {addr:#x}+{len} outside guest memory");
        };
        // SAFETY: `len` bytes inside the live mapping (`host_ptr` checked), which lives as
        // long as `self`.
        unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), len) }
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
        let vaddr = self.inner.host_ptr(addr, len).ok_or(Error::DmaAlloc)?;
        // SAFETY: [addr, addr+len) is inside the mapping (`host_ptr` checked) and was free,
        // so nothing else references it; zero it as `alloc_coherent` promises.
        unsafe { std::ptr::write_bytes(vaddr.as_ptr(), 0, len) };
        Ok(DmaRegion {
            vaddr,
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
        let addr = vaddr.addr().get() as u64;
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

    /// Mappings are unmapped on drop and their addresses reused: a process that creates
    /// more of them than the window holds (a fuzzer: millions) still gets low ones. 1 TiB
    /// each (reserved, never touched), so 40 of them go round the 16 TiB window.
    #[test]
    #[cfg_attr(miri, ignore = "Miri places mappings itself, and cannot hold 1 TiB")]
    fn low_placement_wraps_around() {
        for _ in 0..40 {
            let m = IdentityMemory::new(1 << 40);
            assert!(
                m.inner.owned_mapping && m.inner.base + m.inner.len as u64 <= LEGACY_LIMIT,
                "mapping at {:#x} is out of reach of legacy PFNs",
                m.inner.base
            );
        }
    }

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
