//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC), recursive enumeration through
//! PCI-to-PCI bridges (q35's `pcie-root-port`s put devices on bus 1+), BAR decoding and
//! INTx routing.

use crate::arch::{self, inb, inl, inw, outb, outl, outw};
use alloc::vec::Vec;
use core::fmt;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_MSIX: u8 = 0x11;

#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciAddress {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PciAddress {
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        Self { bus, dev, func }
    }

    fn select(self, offset: u16) {
        let a = 0x8000_0000
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev & 31) << 11)
            | (u32::from(self.func & 7) << 8)
            | u32::from(offset & 0xFC);
        outl(CONFIG_ADDRESS, a);
    }

    // Address + data port accesses form one transaction: interrupts are disabled around
    // them so an interrupt handler touching config space cannot interleave.
    pub fn read32(self, offset: u16) -> u32 {
        arch::without_interrupts(|| {
            self.select(offset);
            inl(CONFIG_DATA)
        })
    }

    pub fn read16(self, offset: u16) -> u16 {
        arch::without_interrupts(|| {
            self.select(offset);
            inw(CONFIG_DATA + (offset & 2))
        })
    }

    pub fn read8(self, offset: u16) -> u8 {
        arch::without_interrupts(|| {
            self.select(offset);
            inb(CONFIG_DATA + (offset & 3))
        })
    }

    pub fn write32(self, offset: u16, v: u32) {
        arch::without_interrupts(|| {
            self.select(offset);
            outl(CONFIG_DATA, v)
        })
    }

    pub fn write16(self, offset: u16, v: u16) {
        arch::without_interrupts(|| {
            self.select(offset);
            outw(CONFIG_DATA + (offset & 2), v)
        })
    }

    pub fn write8(self, offset: u16, v: u8) {
        arch::without_interrupts(|| {
            self.select(offset);
            outb(CONFIG_DATA + (offset & 3), v)
        })
    }

    pub fn vendor(self) -> u16 {
        self.read16(0x00)
    }

    pub fn command(self) -> u16 {
        self.read16(0x04)
    }

    pub fn set_command(self, v: u16) {
        self.write16(0x04, v)
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// One decoded BAR, as assigned by the firmware.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Bar {
    pub kind: BarKind,
    pub base: u64,
    pub len: u64,
    pub prefetchable: bool,
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BarKind::Io => "io",
            BarKind::Mem32 => "mem32",
            BarKind::Mem64 => "mem64",
        };
        write!(
            f,
            "{kind}{}:{:#x}/{:#x}",
            if self.prefetchable { "p" } else { "" },
            self.base,
            self.len
        )
    }
}

/// Which chipset QEMU is emulating (decides INTx routing).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Chipset {
    /// `-M q35`: MCH 8086:29c0, ICH9 LPC.
    Q35,
    /// `-M pc`: i440FX 8086:1237, PIIX3.
    I440fx,
    Unknown,
}

impl Chipset {
    pub fn detect() -> Self {
        match PciAddress::new(0, 0, 0).read32(0) {
            0x29c0_8086 => Chipset::Q35,
            0x1237_8086 => Chipset::I440fx,
            _ => Chipset::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Chipset::Q35 => "q35",
            Chipset::I440fx => "pc",
            Chipset::Unknown => "unknown",
        }
    }
}

/// A function found by enumeration, with everything decoded once.
#[derive(Clone, Debug)]
pub struct PciFunction {
    pub addr: PciAddress,
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub header_type: u8,
    pub subsys_vendor: u16,
    pub subsys_id: u16,
    /// Config 0x3C as written by the firmware.
    pub irq_line: u8,
    /// Config 0x3D: 0 none, 1..=4 INTA..INTD.
    pub irq_pin: u8,
    pub bars: [Option<Bar>; 6],
    /// (capability id, config offset), in list order.
    pub caps: Vec<(u8, u8)>,
    /// Device numbers of the bridges between bus 0 and this function, outermost first
    /// (the root-bus slot is `bridge_path[0]`), for INTx swizzling.
    pub bridge_path: Vec<u8>,
}

impl PciFunction {
    pub fn is_virtio(&self) -> bool {
        self.vendor == 0x1AF4 && (0x1000..=0x107F).contains(&self.device)
    }

    /// Virtio device type: modern IDs 0x1040 + type, transitional IDs via subsystem ID.
    pub fn virtio_type(&self) -> Option<u16> {
        if !self.is_virtio() {
            return None;
        }
        match self.device {
            0x1040..=0x107F => Some(self.device - 0x1040),
            _ => Some(self.subsys_id),
        }
    }

    pub fn find_cap(&self, id: u8) -> Option<u8> {
        self.caps
            .iter()
            .find(|(c, _)| *c == id)
            .map(|&(_, off)| off)
    }

    /// MSI-X table size, if the function has MSI-X.
    pub fn msix_table_size(&self) -> Option<u16> {
        let cap = self.find_cap(CAP_MSIX)?;
        Some((self.addr.read16(u16::from(cap) + 2) & 0x7FF) + 1)
    }

    /// Turns on decoding of the BAR types it has, and bus mastering (needed for DMA and for
    /// MSI-X writes).
    pub fn enable(&self) {
        let mut cmd = self.addr.command() | CMD_BUS_MASTER;
        for bar in self.bars.iter().flatten() {
            cmd |= if bar.kind == BarKind::Io {
                CMD_IO
            } else {
                CMD_MEMORY
            };
        }
        self.addr.set_command(cmd);
    }

    /// Marks every memory BAR uncacheable in the identity map (mapping BARs beyond the
    /// boot map's 64 GiB) and returns the BARs that are reachable: one beyond the page
    /// tables' reach (512 GiB) is reported and left out, so accesses to it fail cleanly.
    pub fn map_bars(&self) -> [Option<Bar>; 6] {
        let mut bars = self.bars;
        for (i, slot) in bars.iter_mut().enumerate() {
            let Some(bar) = slot.filter(|b| b.kind != BarKind::Io) else {
                continue;
            };
            if crate::paging::map_mmio(bar.base, bar.len).is_err() {
                log::warn!(
                    "{} BAR{i} at {:#x}+{:#x} is beyond the identity map: unusable",
                    self.addr,
                    bar.base,
                    bar.len
                );
                *slot = None;
            }
        }
        bars
    }

    /// The I/O APIC input (GSI) this function's INTx pin arrives on, if it has one.
    ///
    /// - i440FX (`pc`): PIIX3 routes PIRQA–D to ISA IRQs, programmed by SeaBIOS, which
    ///   also writes that IRQ to config 0x3C; on QEMU the ISA IRQ n drives I/O APIC pin n.
    /// - q35: ICH9 routes PIRQA–H both to ISA IRQs (what SeaBIOS writes to 0x3C, for the
    ///   8259) and directly to I/O APIC pins 16–23 (what ACPI `_PRT` gives an APIC-mode
    ///   OS). The direct route is the APIC-mode one: after swizzling the pin through each
    ///   bridge ((pin + slot) mod 4), root-bus slot s pin p uses PIRQ[(s + p) mod 4 + 4]
    ///   (QEMU's ICH9 default D<s>IR routing), i.e. GSI 20 + (s + p) mod 4.
    pub fn intx_gsi(&self, chipset: Chipset) -> Option<u32> {
        if self.irq_pin == 0 || self.irq_pin > 4 {
            return None;
        }
        match chipset {
            Chipset::Q35 => {
                let mut pin = u32::from(self.irq_pin - 1);
                let mut slot = u32::from(self.addr.dev);
                // Swizzle upwards: at each bridge, the child's (slot, pin) maps to the
                // bridge's pin; then continue with the bridge's own slot.
                for &bridge_dev in self.bridge_path.iter().rev() {
                    pin = (pin + slot) % 4;
                    slot = u32::from(bridge_dev);
                }
                Some(16 + 4 + (slot + pin) % 4)
            }
            Chipset::I440fx | Chipset::Unknown => match self.irq_line {
                1..=15 => Some(u32::from(self.irq_line)),
                _ => None,
            },
        }
    }
}

/// Probes the size of BAR `i` (0..6), returning it and whether it consumed two slots.
fn decode_bar(addr: PciAddress, i: usize) -> (Option<Bar>, bool) {
    let off = 0x10 + 4 * i as u16;
    let orig = addr.read32(off);
    // Sizing: decoding is switched off so the all-ones address never decodes anything.
    let cmd = addr.command();
    addr.set_command(cmd & !(CMD_IO | CMD_MEMORY));
    addr.write32(off, 0xFFFF_FFFF);
    let mask = addr.read32(off);
    addr.write32(off, orig);
    let result = if orig & 1 == 1 {
        let size_mask = mask & 0xFFFF_FFFC;
        let len = u64::from((!size_mask).wrapping_add(1) & 0xFFFF);
        let base = u64::from(orig & 0xFFFF_FFFC);
        (
            Some(Bar {
                kind: BarKind::Io,
                base,
                len,
                prefetchable: false,
            })
            .filter(|_| size_mask != 0),
            false,
        )
    } else {
        let prefetchable = orig & 0x8 != 0;
        match (orig >> 1) & 3 {
            2 if i < 5 => {
                let hi_off = off + 4;
                let orig_hi = addr.read32(hi_off);
                addr.write32(hi_off, 0xFFFF_FFFF);
                let mask_hi = addr.read32(hi_off);
                addr.write32(hi_off, orig_hi);
                let mask64 = (u64::from(mask_hi) << 32) | u64::from(mask & 0xFFFF_FFF0);
                let len = (!mask64).wrapping_add(1);
                let base = (u64::from(orig_hi) << 32) | u64::from(orig & 0xFFFF_FFF0);
                (
                    Some(Bar {
                        kind: BarKind::Mem64,
                        base,
                        len,
                        prefetchable,
                    })
                    .filter(|_| mask64 != 0),
                    true,
                )
            }
            _ => {
                let size_mask = mask & 0xFFFF_FFF0;
                let len = u64::from((!size_mask).wrapping_add(1));
                let base = u64::from(orig & 0xFFFF_FFF0);
                (
                    Some(Bar {
                        kind: BarKind::Mem32,
                        base,
                        len,
                        prefetchable,
                    })
                    .filter(|_| size_mask != 0),
                    false,
                )
            }
        }
    };
    addr.set_command(cmd);
    // A BAR the firmware left at 0 is not assigned: unusable.
    (result.0.filter(|b| b.base != 0), result.1)
}

fn read_caps(addr: PciAddress) -> Vec<(u8, u8)> {
    let mut caps = Vec::new();
    if addr.read16(0x06) & (1 << 4) == 0 {
        return caps;
    }
    let mut ptr = addr.read8(0x34) & 0xFC;
    // At most 48 capabilities fit in 192 bytes: bounds a malicious/looping list.
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let id = addr.read8(u16::from(ptr));
        caps.push((id, ptr));
        ptr = addr.read8(u16::from(ptr) + 1) & 0xFC;
    }
    caps
}

fn probe(addr: PciAddress, bridge_path: &[u8]) -> PciFunction {
    let class_rev = addr.read32(0x08);
    let header_type = addr.read8(0x0E) & 0x7F;
    let mut bars = [None; 6];
    let nbars = match header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let mut i = 0;
    while i < nbars {
        let (bar, wide) = decode_bar(addr, i);
        bars[i] = bar;
        i += if wide { 2 } else { 1 };
    }
    let (subsys_vendor, subsys_id) = if header_type == 0 {
        (addr.read16(0x2C), addr.read16(0x2E))
    } else {
        (0, 0)
    };
    PciFunction {
        addr,
        vendor: addr.vendor(),
        device: addr.read16(0x02),
        revision: class_rev as u8,
        class: (class_rev >> 24) as u8,
        subclass: (class_rev >> 16) as u8,
        prog_if: (class_rev >> 8) as u8,
        header_type,
        subsys_vendor,
        subsys_id,
        irq_line: addr.read8(0x3C),
        irq_pin: addr.read8(0x3D),
        bars,
        caps: read_caps(addr),
        bridge_path: bridge_path.to_vec(),
    }
}

fn scan_bus(
    bus: u8,
    bridge_path: &mut Vec<u8>,
    out: &mut Vec<PciFunction>,
    visited: &mut [bool; 256],
) {
    if visited[bus as usize] {
        return; // a misprogrammed bridge pointing back: do not loop
    }
    visited[bus as usize] = true;
    for dev in 0..32 {
        let f0 = PciAddress::new(bus, dev, 0);
        if f0.vendor() == 0xFFFF {
            continue;
        }
        let nfuncs = if f0.read8(0x0E) & 0x80 != 0 { 8 } else { 1 };
        for func in 0..nfuncs {
            let addr = PciAddress::new(bus, dev, func);
            if addr.vendor() == 0xFFFF {
                continue;
            }
            let f = probe(addr, bridge_path);
            let is_bridge = f.header_type == 1 && f.class == 0x06 && f.subclass == 0x04;
            out.push(f);
            if is_bridge {
                let secondary = addr.read8(0x19);
                if secondary != 0 && secondary > bus {
                    bridge_path.push(dev);
                    scan_bus(secondary, bridge_path, out, visited);
                    bridge_path.pop();
                }
            }
        }
    }
}

/// Enumerates every function reachable from bus 0 through bridges, as SeaBIOS left them.
pub fn enumerate() -> Vec<PciFunction> {
    let mut out = Vec::new();
    let mut visited = [false; 256];
    scan_bus(0, &mut Vec::new(), &mut out, &mut visited);
    out
}
