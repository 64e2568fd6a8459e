//! The guest's implementations of `virtio_core::platform`: identity-mapped DMA, config
//! space over 0xCF8/0xCFC, BAR access (volatile MMIO / port I/O) and interrupts (MSI-X
//! table programming, I/O APIC for INTx).
//!
//! For a found function `f` (`pci::PciFunction`), scenario code uses:
//! `GuestDma`, `f.config()` → [`PciConfig`], `f.bar_access()` → [`PciBars`],
//! `PciInterrupts::new(&f, chipset)` → [`PciInterrupts`].

use crate::apic::{self, Polarity, Trigger};
use crate::arch::{inb, inl, inw, outb, outl, outw};
use crate::cmdline::IrqMode;
use crate::interrupts::{self, HandlerId};
use crate::pci::{BarKind, CAP_MSIX, CMD_INTX_DISABLE, Chipset, PciAddress, PciFunction};
use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use virtio_core::platform::{
    BarAccess, DeviceAddr, Dma, DmaDirection, DmaRegion, InterruptMode, InterruptPlatform,
    PciConfigSpace,
};
use virtio_core::{Error, Result};

// ---------------------------------------------------------------------------------------
// DMA

/// Identity-mapped DMA: device address == physical == virtual address. There is no IOMMU
/// on QEMU's `pc`/`q35` without `-device intel-iommu`, and x86 DMA is cache-coherent, so
/// `map`/`unmap` only translate.
#[derive(Copy, Clone, Debug, Default)]
pub struct GuestDma;

/// Coherent regions are page-aligned: rings need at most 4096 (legacy), and page
/// alignment keeps every region's device address independent of the heap layout.
const DMA_ALIGN: usize = 4096;

impl Dma for GuestDma {
    fn alloc_coherent(&self, len: usize, align: usize) -> Result<DmaRegion> {
        if len == 0 || !align.is_power_of_two() || align > DMA_ALIGN {
            return Err(Error::DmaAlloc);
        }
        let layout = Layout::from_size_align(len, DMA_ALIGN).map_err(|_| Error::DmaAlloc)?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let vaddr = NonNull::new(ptr).ok_or(Error::DmaAlloc)?;
        Ok(DmaRegion {
            vaddr,
            daddr: ptr as u64,
            len,
        })
    }

    unsafe fn free_coherent(&self, region: DmaRegion) {
        let layout =
            Layout::from_size_align(region.len, DMA_ALIGN).expect("layout was valid at allocation");
        // SAFETY: per the trait contract the region came from alloc_coherent (same layout)
        // and neither the device nor the driver uses it any more.
        unsafe { dealloc(region.vaddr.as_ptr(), layout) };
    }

    fn map(&self, vaddr: NonNull<u8>, len: usize, _dir: DmaDirection) -> Result<DeviceAddr> {
        let addr = vaddr.as_ptr() as u64;
        // Everything the guest can point at is identity-mapped below the paging reach.
        addr.checked_add(len as u64)
            .filter(|&end| end <= crate::paging::MAX_MAPPED)
            .ok_or(Error::DmaAlloc)?;
        Ok(addr)
    }

    fn unmap(&self, _daddr: DeviceAddr, _len: usize, _dir: DmaDirection) {}
}

// ---------------------------------------------------------------------------------------
// Config space

/// Config space of one function over mechanism #1. Offsets >= 256 read as all-ones and
/// ignore writes (mechanism #1 cannot reach extended config space).
#[derive(Copy, Clone, Debug)]
pub struct PciConfig(pub PciAddress);

impl PciConfigSpace for PciConfig {
    fn read8(&self, offset: u16) -> u8 {
        if offset >= 256 {
            0xFF
        } else {
            self.0.read8(offset)
        }
    }
    fn read16(&self, offset: u16) -> u16 {
        if offset >= 255 || offset & 1 != 0 {
            0xFFFF
        } else {
            self.0.read16(offset)
        }
    }
    fn read32(&self, offset: u16) -> u32 {
        if offset >= 253 || offset & 3 != 0 {
            0xFFFF_FFFF
        } else {
            self.0.read32(offset)
        }
    }
    fn write8(&self, offset: u16, value: u8) {
        if offset < 256 {
            self.0.write8(offset, value)
        }
    }
    fn write16(&self, offset: u16, value: u16) {
        if offset < 255 && offset & 1 == 0 {
            self.0.write16(offset, value)
        }
    }
    fn write32(&self, offset: u16, value: u32) {
        if offset < 253 && offset & 3 == 0 {
            self.0.write32(offset, value)
        }
    }
}

// ---------------------------------------------------------------------------------------
// BARs

/// Register access to a function's BARs. Every access is checked against the BAR's
/// length and natural alignment; memory BARs must have been mapped (`PciFunction::map_bars`,
/// done by `PciBars::new`).
#[derive(Clone, Debug)]
pub struct PciBars {
    bars: [Option<crate::pci::Bar>; 6],
}

impl PciBars {
    pub fn new(f: &PciFunction) -> Self {
        Self { bars: f.map_bars() }
    }

    /// The address (MMIO) or port (I/O) of `offset` in `bar`, if `width` bytes fit.
    #[inline]
    fn locate(&self, bar: u8, offset: u64, width: u64) -> Option<(BarKind, u64)> {
        let b = self.bars.get(usize::from(bar)).copied().flatten()?;
        let end = offset.checked_add(width)?;
        if end > b.len || !offset.is_multiple_of(width) {
            return None;
        }
        let addr = b.base.checked_add(offset)?;
        if b.kind == BarKind::Io && addr + width > 0x1_0000 {
            return None;
        }
        Some((b.kind, addr))
    }
}

macro_rules! bar_rw {
    ($read:ident, $write:ident, $t:ty, $inp:ident, $outp:ident) => {
        #[inline]
        fn $read(&self, bar: u8, offset: u64) -> Option<$t> {
            let (kind, addr) = self.locate(bar, offset, core::mem::size_of::<$t>() as u64)?;
            Some(if kind == BarKind::Io {
                $inp(addr as u16)
            } else {
                // SAFETY: addr lies inside an assigned memory BAR (bounds and alignment
                // checked by locate), which is identity-mapped uncacheable.
                unsafe { (addr as *const $t).read_volatile() }
            })
        }
        #[inline]
        fn $write(&self, bar: u8, offset: u64, value: $t) {
            if let Some((kind, addr)) = self.locate(bar, offset, core::mem::size_of::<$t>() as u64)
            {
                if kind == BarKind::Io {
                    $outp(addr as u16, value)
                } else {
                    // SAFETY: as for the read.
                    unsafe { (addr as *mut $t).write_volatile(value) }
                }
            }
        }
    };
}

impl BarAccess for PciBars {
    fn bar_len(&self, bar: u8) -> Option<u64> {
        self.bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .map(|b| b.len)
    }
    fn bar_is_io(&self, bar: u8) -> bool {
        self.bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .is_some_and(|b| b.kind == BarKind::Io)
    }
    bar_rw!(read8, write8, u8, inb, outb);
    bar_rw!(read16, write16, u16, inw, outw);
    bar_rw!(read32, write32, u32, inl, outl);
}

impl PciFunction {
    pub fn config(&self) -> PciConfig {
        PciConfig(self.addr)
    }

    pub fn bar_access(&self) -> PciBars {
        PciBars::new(self)
    }
}

// ---------------------------------------------------------------------------------------
// Interrupts

/// Index used for INTx in pending masks and counters (MSI-X uses 0..=62).
pub const INTX_INDEX: u16 = 63;
const MAX_MSIX: u16 = 63;

/// What interrupt handlers record for one function; shared with the handlers.
pub struct IrqState {
    /// Bit k: MSI-X entry k (or INTX_INDEX) fired since the last `take_pending`.
    pending: AtomicU64,
    counts: [AtomicU64; 64],
    /// INTx only: the I/O APIC pin was masked by the handler and awaits `intx_done`.
    intx_masked: AtomicBool,
}

impl IrqState {
    fn new() -> Self {
        Self {
            pending: AtomicU64::new(0),
            counts: [const { AtomicU64::new(0) }; 64],
            intx_masked: AtomicBool::new(false),
        }
    }

    fn fire(&self, index: u16) {
        self.counts[usize::from(index)].fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_or(1 << index, Ordering::AcqRel);
    }
}

/// One INTx line (GSI), possibly shared by several functions: one vector for all, and the
/// sharers' states (their handlers all run on that vector; each reads its own ISR).
struct IntxLine {
    gsi: u32,
    vector: u8,
    sharers: Vec<Arc<IrqState>>,
}

static INTX_LINES: spin::Mutex<Vec<IntxLine>> = spin::Mutex::new(Vec::new());

enum Enabled {
    None,
    MsiX {
        vectors: Vec<(u8, HandlerId)>,
    },
    Intx {
        gsi: u32,
        vector: u8,
        handler: HandlerId,
    },
}

/// Interrupt plumbing of one function: implements `InterruptPlatform`, and gives the
/// scenario the per-vector pending bits, counters and waits.
///
/// Handlers only record (`pending`, counters); the bus's interrupt entry runs in thread
/// context after `wait`/`take_pending`. INTx is level-triggered and shared, so the
/// handler masks the I/O APIC pin (one-shot) until the driver has read the device's ISR
/// and calls [`PciInterrupts::intx_done`].
pub struct PciInterrupts {
    func: PciFunction,
    chipset: Chipset,
    state: Arc<IrqState>,
    enabled: Enabled,
    /// The most capable mode the run allows (`irq=`): `Intx` refuses MSI-X, `Poll` refuses
    /// both, so the bus's fallback lands on the mode under test.
    limit: IrqMode,
}

impl PciInterrupts {
    pub fn new(func: &PciFunction, chipset: Chipset) -> Self {
        Self {
            func: func.clone(),
            chipset,
            state: Arc::new(IrqState::new()),
            enabled: Enabled::None,
            limit: IrqMode::MsiX,
        }
    }

    /// Restricts which modes `enable_msix`/`enable_intx` may grant (see `limit`).
    pub fn set_limit(&mut self, limit: IrqMode) {
        self.limit = limit;
    }

    /// Whether no interrupt is enabled (`mode()` is `Polling`), without building the mode.
    pub fn polling(&self) -> bool {
        matches!(self.enabled, Enabled::None)
    }

    pub fn mode(&self) -> InterruptMode {
        match &self.enabled {
            Enabled::None => InterruptMode::Polling,
            Enabled::MsiX { vectors } => InterruptMode::MsiX {
                vectors: vectors.len() as u16,
            },
            Enabled::Intx { .. } => InterruptMode::Intx,
        }
    }

    /// IDT vector of MSI-X entry `index` (or of the INTx line for `INTX_INDEX`).
    pub fn vector(&self, index: u16) -> Option<u8> {
        match &self.enabled {
            Enabled::MsiX { vectors } => vectors.get(usize::from(index)).map(|v| v.0),
            Enabled::Intx { vector, .. } if index == INTX_INDEX => Some(*vector),
            _ => None,
        }
    }

    pub fn gsi(&self) -> Option<u32> {
        match self.enabled {
            Enabled::Intx { gsi, .. } => Some(gsi),
            _ => None,
        }
    }

    /// Pending bits without clearing them.
    pub fn pending(&self) -> u64 {
        self.state.pending.load(Ordering::Acquire)
    }

    /// Returns and clears the pending bits (bit k = MSI-X entry k, bit 63 = INTx).
    pub fn take_pending(&self) -> u64 {
        self.state.pending.swap(0, Ordering::AcqRel)
    }

    /// Interrupts taken for `index` since enable.
    pub fn count(&self, index: u16) -> u64 {
        self.state
            .counts
            .get(usize::from(index))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Sum over all indices.
    pub fn total(&self) -> u64 {
        self.state
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits (halting, or spinning in `irq=poll`) until any of `mask`'s bits is pending.
    #[inline]
    pub fn wait(&self, mask: u64, timeout_ms: u64) -> bool {
        crate::time::wait_until(timeout_ms, || self.pending() & mask != 0)
    }

    /// INTx: this device's interrupt condition was cleared (its ISR read): clear its
    /// pending bit and re-arm the line.
    ///
    /// Unmasking does not wait for the line's other sharers: one of them still asserting
    /// simply re-fires (its handler marks it pending again), whereas waiting for a sharer
    /// nobody services would leave the line masked forever.
    pub fn intx_done(&self) {
        let Enabled::Intx { gsi, .. } = self.enabled else {
            return;
        };
        self.state
            .pending
            .fetch_and(!(1 << INTX_INDEX), Ordering::AcqRel);
        crate::arch::without_interrupts(|| {
            let lines = INTX_LINES.lock();
            if let Some(line) = lines.iter().find(|l| l.gsi == gsi) {
                for s in &line.sharers {
                    s.intx_masked.store(false, Ordering::Relaxed);
                }
                apic::ioapic_set_masked(gsi, false);
            }
        });
    }

    /// The MSI-X table entry `index` as (address, data, vector control), read back from
    /// the device (for self-tests).
    pub fn msix_entry(&self, index: u16) -> Option<(u64, u32, u32)> {
        let (bar, off) = self.msix_table()?;
        let bars = self.func.bar_access();
        let e = off + 16 * u64::from(index);
        let lo = bars.read32(bar, e)?;
        let hi = bars.read32(bar, e + 4)?;
        Some((
            (u64::from(hi) << 32) | u64::from(lo),
            bars.read32(bar, e + 8)?,
            bars.read32(bar, e + 12)?,
        ))
    }

    fn msix_table(&self) -> Option<(u8, u64)> {
        let cap = u16::from(self.func.find_cap(CAP_MSIX)?);
        let table = self.func.addr.read32(cap + 4);
        Some(((table & 7) as u8, u64::from(table & !7)))
    }

    fn msix_control(&self) -> Option<(u16, u16)> {
        let cap = u16::from(self.func.find_cap(CAP_MSIX)?);
        Some((cap + 2, self.func.addr.read16(cap + 2)))
    }
}

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

impl InterruptPlatform for PciInterrupts {
    fn enable_msix(&mut self, vectors: u16) -> bool {
        self.disable();
        if self.limit != IrqMode::MsiX {
            return false;
        }
        let (Some((bar, table)), Some(size)) = (self.msix_table(), self.func.msix_table_size())
        else {
            return false;
        };
        if vectors == 0 || vectors > size || vectors > MAX_MSIX {
            return false;
        }
        let bars = self.func.bar_access();
        if bars
            .bar_len(bar)
            .is_none_or(|len| table + 16 * u64::from(vectors) > len)
        {
            return false;
        }
        let mut allocated = Vec::new();
        for index in 0..vectors {
            let Some(v) = interrupts::alloc_vector() else {
                for (v, id) in allocated {
                    interrupts::unregister(v, id);
                    interrupts::free_vector(v);
                }
                return false;
            };
            let state = self.state.clone();
            let id = interrupts::register(v, alloc::boxed::Box::new(move |_| state.fire(index)));
            allocated.push((v, id));
        }
        let Some((ctrl_off, ctrl)) = self.msix_control() else {
            return false;
        };
        // Program the table with the whole function masked (PCI 3.0 §6.8.2.9: entries may
        // change only while masked), then unmask.
        self.func
            .addr
            .write16(ctrl_off, ctrl | MSIX_ENABLE | MSIX_FUNCTION_MASK);
        for (index, &(v, _)) in allocated.iter().enumerate() {
            let (addr, data) = apic::msi_message(v);
            let e = table + 16 * index as u64;
            bars.write32(bar, e, addr as u32);
            bars.write32(bar, e + 4, (addr >> 32) as u32);
            bars.write32(bar, e + 8, data);
            bars.write32(bar, e + 12, 0); // vector control: unmasked
        }
        let cmd = self.func.addr.command();
        self.func.addr.set_command(cmd | CMD_INTX_DISABLE);
        self.func
            .addr
            .write16(ctrl_off, (ctrl | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
        self.enabled = Enabled::MsiX { vectors: allocated };
        true
    }

    fn enable_intx(&mut self) -> bool {
        self.disable();
        if self.limit == IrqMode::Poll {
            return false;
        }
        let Some(gsi) = self.func.intx_gsi(self.chipset) else {
            return false;
        };
        let state = self.state.clone();
        let vector = crate::arch::without_interrupts(|| {
            let mut lines = INTX_LINES.lock();
            if let Some(line) = lines.iter_mut().find(|l| l.gsi == gsi) {
                line.sharers.push(state.clone());
                return Some(line.vector);
            }
            let vector = interrupts::alloc_vector()?;
            lines.push(IntxLine {
                gsi,
                vector,
                sharers: alloc::vec![state.clone()],
            });
            Some(vector)
        });
        let Some(vector) = vector else { return false };
        let handler_state = self.state.clone();
        let handler = interrupts::register(
            vector,
            alloc::boxed::Box::new(move |_| {
                // Level-triggered and still asserted until the driver reads the ISR in
                // thread context: mask the pin so the EOI does not re-deliver at once.
                if !handler_state.intx_masked.swap(true, Ordering::AcqRel) {
                    apic::ioapic_set_masked(gsi, true);
                }
                handler_state.fire(INTX_INDEX);
            }),
        );
        // PCI INTx is level-triggered. GSIs >= 16 (q35's direct PIRQ pins, PCI-only) are
        // active-low as PCI specifies; ISA-numbered pins fed by the PIIX/ICH9 PIRQ router
        // are active-high (what QEMU's ACPI LNKx/GSIx objects declare).
        let polarity = if gsi >= 16 {
            Polarity::Low
        } else {
            Polarity::High
        };
        let cmd = self.func.addr.command();
        self.func.addr.set_command(cmd & !CMD_INTX_DISABLE);
        if !apic::ioapic_route(gsi, vector, Trigger::Level, polarity, false) {
            interrupts::unregister(vector, handler);
            return false;
        }
        self.enabled = Enabled::Intx {
            gsi,
            vector,
            handler,
        };
        true
    }

    fn disable(&mut self) {
        match core::mem::replace(&mut self.enabled, Enabled::None) {
            Enabled::None => {}
            Enabled::MsiX { vectors } => {
                if let Some((ctrl_off, ctrl)) = self.msix_control() {
                    self.func.addr.write16(ctrl_off, ctrl & !MSIX_ENABLE);
                }
                for (v, id) in vectors {
                    interrupts::unregister(v, id);
                    interrupts::free_vector(v);
                }
            }
            Enabled::Intx {
                gsi,
                vector,
                handler,
            } => {
                let cmd = self.func.addr.command();
                self.func.addr.set_command(cmd | CMD_INTX_DISABLE);
                interrupts::unregister(vector, handler);
                let state = self.state.clone();
                crate::arch::without_interrupts(|| {
                    let mut lines = INTX_LINES.lock();
                    if let Some(pos) = lines.iter().position(|l| l.gsi == gsi) {
                        lines[pos].sharers.retain(|s| !Arc::ptr_eq(s, &state));
                        if lines[pos].sharers.is_empty() {
                            apic::ioapic_set_masked(gsi, true);
                            interrupts::free_vector(lines[pos].vector);
                            lines.remove(pos);
                        }
                    }
                });
            }
        }
        self.state.pending.store(0, Ordering::Release);
        self.state.intx_masked.store(false, Ordering::Release);
    }
}

impl Drop for PciInterrupts {
    fn drop(&mut self) {
        self.disable();
    }
}
