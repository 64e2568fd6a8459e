//! A test binary's global allocator that refuses any one allocation above
//! [`ALLOCATION_CAP`], as a kernel refuses what it cannot give: a table sized from an absurd
//! bound fails (code that allocates it infallibly aborts the test, as it would panic a
//! kernel) instead of taking the host's memory. It also records the largest allocation
//! asked for on each thread ([`largest_allocation`]; a loaded bundle's `IOMallocAligned`
//! comes here too). A test binary opts in with
//! `#[global_allocator] static ALLOCATOR: CappedAllocator = CappedAllocator;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Far above any table a sane bound needs, far below the host's memory.
pub const ALLOCATION_CAP: usize = 1 << 30;

pub struct CappedAllocator;

thread_local! {
    static LARGEST_ALLOCATION: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator, or returns null (an allocation failure, which
// the contract allows); the thread-local is a const-initialised `Cell` without a
// destructor, which never allocates.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.with(|l| l.set(l.get().max(layout.size())));
        if layout.size() > ALLOCATION_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f`; returns its result and the largest allocation it asked for on this thread
/// (meaningful only in a binary whose global allocator is [`CappedAllocator`]).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST_ALLOCATION.with(|l| l.set(0));
    let r = f();
    (r, LARGEST_ALLOCATION.with(|l| l.get()))
}
