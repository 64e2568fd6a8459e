//! Adjustments to the boot identity map: MMIO ranges become uncacheable (PCD|PWT), and
//! ranges beyond the boot map's 64 GiB get page directories on demand (up to 512 GiB, the
//! reach of the single PML4 entry).

use crate::boot::{BOOT_MAPPED_GIB, boot_pd, boot_pdpt};
use alloc::alloc::{Layout, alloc_zeroed};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const PAGE_2M: u64 = 2 << 20;
/// One PML4 entry maps 512 GiB.
pub const MAX_MAPPED: u64 = 512 << 30;

#[derive(Debug)]
pub struct OutOfReach;

/// Identity-maps `[base, base+len)` uncacheable (strong UC via PCD|PWT in the PDE).
///
/// 2 MiB granularity: RAM sharing a 2 MiB page with MMIO would become UC too; on QEMU's
/// machines MMIO windows are far from RAM, and correctness does not depend on caching.
pub fn map_mmio(base: u64, len: u64) -> Result<(), OutOfReach> {
    if len == 0 {
        return Ok(());
    }
    let end = base.checked_add(len).ok_or(OutOfReach)?;
    if end > MAX_MAPPED {
        return Err(OutOfReach);
    }
    crate::arch::without_interrupts(|| {
        let mut page = base & !(PAGE_2M - 1);
        while page < end {
            let gib = (page >> 30) as usize;
            let idx = ((page >> 21) & 511) as usize;
            let entry = (page & !(PAGE_2M - 1)) | PRESENT | WRITABLE | HUGE | PCD | PWT;
            if gib < BOOT_MAPPED_GIB {
                // SAFETY: boot_pd is the live page directory array (interrupts off, single
                // CPU: nobody else edits it); we only change cache attributes of identity
                // entries, never the frame they map.
                unsafe {
                    (&raw mut boot_pd)
                        .cast::<u64>()
                        .add(gib * 512 + idx)
                        .write(entry)
                };
            } else {
                // SAFETY: boot_pdpt is the live level-3 table; same argument as above.
                let slot = unsafe { &mut *(&raw mut boot_pdpt).cast::<u64>().add(gib) };
                if *slot & PRESENT == 0 {
                    let layout = Layout::from_size_align(4096, 4096).expect("static layout");
                    // SAFETY: non-zero size. The page is never freed: it becomes a live page
                    // directory. Zeroed = all entries not present.
                    let pd = unsafe { alloc_zeroed(layout) };
                    assert!(!pd.is_null(), "out of memory for a page directory");
                    *slot = pd as u64 | PRESENT | WRITABLE;
                }
                let pd = (*slot & 0x000f_ffff_ffff_f000) as *mut u64;
                // SAFETY: pd is a 4 KiB page directory we allocated; idx < 512.
                unsafe { pd.add(idx).write(entry) };
            }
            page += PAGE_2M;
        }
        crate::arch::flush_tlb();
    });
    Ok(())
}
