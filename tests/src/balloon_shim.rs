//! What VirtioBalloon.kext's IOService shim gives the kext's Rust half
//! (`kexts/VirtioBalloon/shim/VirtioBalloon.cpp`): chunks of kernel pages wired and
//! unwired through `alloc_chunk` / `free_chunk`, and `sysctlbyname` answers. One model for
//! the kext tests (`tests/tests/kext_balloon.rs`) and the `kext` fuzz target's balloon
//! part, each of which adds its own oracles around it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, c_char, c_void};

/// Where the shim's "physical" pages live (the device never touches them).
pub const BASE: u64 = 0x1_0000_0000;
/// Page numbers a memory hands out at most: they stay unique (the scatter below is a
/// bijection modulo 2^20, and contiguous chunks are numbered from 2^20 up, so switching
/// between the two never hands out a page twice).
pub const PAGE_NUMBERS: u64 = 1 << 20;

pub const ENOENT: i32 = 2;
pub const ENOMEM: i32 = 12;

pub const MEMSIZE: &str = "hw.memsize";
pub const FREE: &str = "vm.page_free_count";
pub const FILE_BACKED: &str = "vm.page_pageable_external_count";
pub const PRESSURE: &str = "kern.memorystatus_vm_pressure_level";

/// The kernel's pages as the shim wires them, every chunk tracked by its cookie, and the
/// kernel's sysctl answers.
#[derive(Default)]
pub struct ChunkMemory {
    pub page_size: u64,
    /// Pages numbered so far (the addresses are scattered unless `contiguous`).
    pub next: u64,
    /// The last cookie given (cookies grow: a round's chunks are those above the last
    /// cookie before it).
    pub next_cookie: usize,
    /// Live chunks by cookie: their page addresses.
    pub live: BTreeMap<usize, Vec<u64>>,
    /// Hand out physically contiguous chunks (the default scatters every page).
    pub contiguous: bool,
    /// The kernel has no memory to give.
    pub dry: bool,
    /// Most chunks wired at once (`None`: no limit).
    pub limit: Option<usize>,
    /// What `sysctlbyname` answers: name -> value bytes (absent: ENOENT).
    pub sysctls: BTreeMap<String, Vec<u8>>,
}

impl ChunkMemory {
    pub fn new(page_size: u64) -> Self {
        ChunkMemory {
            page_size,
            ..ChunkMemory::default()
        }
    }

    /// Wires a chunk of `count` pages: its cookie and page addresses, or `None` where the
    /// kernel refuses (dry, at the limit, out of page numbers).
    pub fn wire(&mut self, count: u32) -> Option<(usize, Vec<u64>)> {
        if self.dry
            || self.limit.is_some_and(|l| self.live.len() >= l)
            || self.next + u64::from(count) > PAGE_NUMBERS
        {
            return None;
        }
        // A chunk's pages are not contiguous unless asked: an odd multiplier scatters them.
        let addrs: Vec<u64> = (0..u64::from(count))
            .map(|k| {
                let n = if self.contiguous {
                    PAGE_NUMBERS + self.next + k
                } else {
                    ((self.next + k).wrapping_mul(0x9E37_79B1)) & (PAGE_NUMBERS - 1)
                };
                BASE + n * self.page_size
            })
            .collect();
        self.next += u64::from(count);
        self.next_cookie += 1;
        self.live.insert(self.next_cookie, addrs.clone());
        Some((self.next_cookie, addrs))
    }

    /// [`ChunkMemory::wire`] through `alloc_chunk`'s out-pointers.
    ///
    /// # Safety
    /// `pages` has room for `count` addresses and `cookie` is writable, as the kext
    /// passes them.
    pub unsafe fn alloc_chunk(
        &mut self,
        pages: *mut u64,
        count: u32,
        cookie: *mut *mut c_void,
    ) -> Option<Vec<u64>> {
        let (c, addrs) = self.wire(count)?;
        // SAFETY: the caller's contract: room for `count` addresses, a writable cookie.
        unsafe {
            std::ptr::copy_nonoverlapping(addrs.as_ptr(), pages, addrs.len());
            *cookie = c as *mut c_void;
        }
        Some(addrs)
    }

    /// Unwires a chunk: its pages, or `None` if `cookie` is not live (freed twice or
    /// never given).
    pub fn unwire(&mut self, cookie: *mut c_void) -> Option<Vec<u64>> {
        self.live.remove(&(cookie as usize))
    }

    /// The 4 KiB frames of `pages` (a page of 16 KiB is four).
    pub fn frames_of(&self, pages: &[u64]) -> Vec<u32> {
        let fpp = self.page_size / 4096;
        pages
            .iter()
            .flat_map(|&a| (0..fpp).map(move |k| ((a >> 12) + k) as u32))
            .collect()
    }

    /// The 4 KiB frames of every live chunk.
    pub fn frames(&self) -> BTreeSet<u32> {
        self.live.values().flat_map(|c| self.frames_of(c)).collect()
    }

    /// Pages in live chunks.
    pub fn wired_pages(&self) -> u64 {
        self.live.values().map(|c| c.len() as u64).sum()
    }

    /// The shim's `sysctlbyname(name, buf, &len, NULL, 0)` over [`ChunkMemory::sysctls`]:
    /// 0, ENOENT or ENOMEM (no room), and the name read.
    ///
    /// # Safety
    /// `name` is NUL-terminated, `buf` has `*len` writable bytes and `len` is valid, as
    /// the kext passes them.
    pub unsafe fn read_sysctl(
        &self,
        name: *const c_char,
        buf: *mut c_void,
        len: *mut u32,
    ) -> (i32, String) {
        assert!(!name.is_null() && !buf.is_null() && !len.is_null());
        // SAFETY: the caller's contract: a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let Some(value) = self.sysctls.get(&name) else {
            return (ENOENT, name);
        };
        // SAFETY: the caller's contract: the room in `*len`.
        let room = unsafe { *len } as usize;
        if value.len() > room {
            return (ENOMEM, name);
        }
        // SAFETY: `buf` has `room` bytes; `len` is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(value.as_ptr(), buf.cast::<u8>(), value.len());
            *len = value.len() as u32;
        }
        (0, name)
    }
}

/// A kernel's answers, as xnu gives them: `hw.memsize` a 64-bit quad, the page counts and
/// the pressure level 32-bit integers.
pub fn kernel_sysctls(
    memsize: u64,
    free: u32,
    file_backed: u32,
    pressure: u32,
) -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([
        (MEMSIZE.into(), memsize.to_ne_bytes().to_vec()),
        (FREE.into(), free.to_ne_bytes().to_vec()),
        (FILE_BACKED.into(), file_backed.to_ne_bytes().to_vec()),
        (PRESSURE.into(), pressure.to_ne_bytes().to_vec()),
    ])
}
