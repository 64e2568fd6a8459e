//! The kernel heap: the largest usable RAM range above the image, below the identity map's
//! end, handed to `linked_list_allocator`. DMA memory (rings, buffers) comes from here too.

use crate::boot::{__image_end, BOOT_MAPPED_GIB};
use crate::pvh::{MEMMAP_RAM, MemmapEntry};
use linked_list_allocator::LockedHeap;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Returns (start, size) of the heap.
pub fn init(memmap: &[MemmapEntry]) -> Option<(u64, u64)> {
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let limit = (BOOT_MAPPED_GIB as u64) << 30;
    let mut best: Option<(u64, u64)> = None;
    for e in memmap.iter().filter(|e| e.kind == MEMMAP_RAM) {
        let start = e.addr.max(image_end).next_multiple_of(4096);
        let end = e.addr.saturating_add(e.size).min(limit) & !4095;
        if end > start && best.is_none_or(|(_, size)| end - start > size) {
            best = Some((start, end - start));
        }
    }
    let (start, size) = best?;
    // SAFETY: [start, start+size) is RAM per the firmware's map, above our image (so it
    // holds no code, data, stack or page tables) and identity-mapped; nothing else uses it.
    // The start info was copied out before this call.
    unsafe { ALLOCATOR.lock().init(start as *mut u8, size as usize) };
    Some((start, size))
}

/// (used, free) bytes.
pub fn usage() -> (usize, usize) {
    let h = ALLOCATOR.lock();
    (h.used(), h.free())
}
