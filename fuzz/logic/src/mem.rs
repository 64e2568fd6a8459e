//! Guest memory reused from one input to the next. A fresh `IdentityMemory` per input
//! (an `mmap`, a page fault for every page the driver touches, an `munmap`) was the larger
//! part of an execution of the driver targets; the allocator zeroes every region it hands
//! out, and each target checks that all memory is free again at its end, so a memory that
//! is entirely free is as good as a new one.

use std::cell::RefCell;

use virtio_tests::mem::IdentityMemory;

thread_local! {
    /// Memories whose last user has finished with them, with their length.
    static CACHE: RefCell<Vec<(usize, IdentityMemory)>> = const { RefCell::new(Vec::new()) };
}

/// `len` bytes of identity-mapped guest memory with nothing allocated: a cached one when a
/// previous input left one of that length entirely free, else a new one (kept for later).
pub fn guest_memory(len: usize) -> IdentityMemory {
    let len = len.max(4096).next_multiple_of(4096);
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        // A memory something still holds allocations in (an input that panicked half-way,
        // in the replay test) is dropped, not reused.
        cache.retain(|(l, m)| m.free_bytes() == *l);
        if let Some((_, m)) = cache.iter().find(|(l, _)| *l == len) {
            return m.clone();
        }
        let m = IdentityMemory::new(len);
        cache.push((len, m.clone()));
        m
    })
}
