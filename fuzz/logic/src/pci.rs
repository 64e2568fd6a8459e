//! The PCI side over fuzzed config space and BARs: the capability walk, `probe` (modern,
//! legacy, transitional) and the transport operations a driver performs, with every BAR
//! register read returning fuzzer bytes.
//!
//! Oracles: no panic; capabilities found lie inside their BARs; no access outside a BAR;
//! a bounded number of register accesses (no unbounded polling of a hostile register).

use std::cell::{Cell, RefCell};

use virtio_core::DeviceStatus;
use virtio_core::platform::{BarAccess, PciConfigSpace};
use virtio_core::transport::{RingAddresses, Transport};
use virtio_pci::caps::find_virtio_capabilities;
use virtio_pci::{PciTransport, Preference, probe};

use crate::input::Input;

/// Register accesses one input may cause: far above what the operations below need, far
/// below a hang.
const MAX_BAR_ACCESSES: u64 = 1 << 22;

/// 256 bytes of config space; writes are ignored (a device that ignores everything).
struct FuzzConfig([u8; 256]);

impl PciConfigSpace for FuzzConfig {
    fn read8(&self, offset: u16) -> u8 {
        self.0.get(usize::from(offset)).copied().unwrap_or(0xFF)
    }
    fn read16(&self, offset: u16) -> u16 {
        u16::from_le_bytes([self.read8(offset), self.read8(offset.wrapping_add(1))])
    }
    fn read32(&self, offset: u16) -> u32 {
        u32::from(self.read16(offset)) | (u32::from(self.read16(offset.wrapping_add(2))) << 16)
    }
    fn write8(&self, _: u16, _: u8) {}
    fn write16(&self, _: u16, _: u16) {}
    fn write32(&self, _: u16, _: u32) {}
}

/// BARs of fuzzer-chosen lengths whose registers return the fuzzer's remaining bytes in
/// turn (cycled); records every access outside a BAR.
struct FuzzBars {
    lens: [Option<u64>; 6],
    io_bar: u8,
    register_bytes: Vec<u8>,
    cursor: Cell<usize>,
    accesses: Cell<u64>,
    out_of_range: RefCell<Vec<(u8, u64, u8)>>,
}

impl FuzzBars {
    fn check(&self, bar: u8, offset: u64, width: u8) -> bool {
        let accesses = self.accesses.get() + 1;
        self.accesses.set(accesses);
        assert!(accesses <= MAX_BAR_ACCESSES, "unbounded register polling");
        let inside = self
            .lens
            .get(usize::from(bar))
            .copied()
            .flatten()
            .is_some_and(|len| {
                offset
                    .checked_add(u64::from(width))
                    .is_some_and(|end| end <= len)
            });
        if !inside {
            self.out_of_range.borrow_mut().push((bar, offset, width));
        }
        inside
    }
    fn next(&self) -> u32 {
        if self.register_bytes.is_empty() {
            return 0;
        }
        let mut value = 0u32;
        for shift in 0..4 {
            let at = self.cursor.get();
            self.cursor.set((at + 1) % self.register_bytes.len());
            value |= u32::from(self.register_bytes[at]) << (8 * shift);
        }
        value
    }
}

impl BarAccess for FuzzBars {
    fn bar_len(&self, bar: u8) -> Option<u64> {
        self.lens.get(usize::from(bar)).copied().flatten()
    }
    fn bar_is_io(&self, bar: u8) -> bool {
        bar == self.io_bar
    }
    fn read8(&self, bar: u8, offset: u64) -> Option<u8> {
        self.check(bar, offset, 1).then(|| self.next() as u8)
    }
    fn read16(&self, bar: u8, offset: u64) -> Option<u16> {
        self.check(bar, offset, 2).then(|| self.next() as u16)
    }
    fn read32(&self, bar: u8, offset: u64) -> Option<u32> {
        self.check(bar, offset, 4).then(|| self.next())
    }
    fn write8(&self, bar: u8, offset: u64, _: u8) {
        self.check(bar, offset, 1);
    }
    fn write16(&self, bar: u8, offset: u64, _: u16) {
        self.check(bar, offset, 2);
    }
    fn write32(&self, bar: u8, offset: u64, _: u32) {
        self.check(bar, offset, 4);
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let preference = match input.u8() % 3 {
        0 => Preference::Auto,
        1 => Preference::Modern,
        _ => Preference::Legacy,
    };
    let mut config = [0u8; 256];
    let config_bytes = input.take(256);
    config[..config_bytes.len()].copy_from_slice(config_bytes);
    if input.bool() {
        // Keep the vendor ID most of the time: other functions are refused at once.
        config[0..2].copy_from_slice(&0x1AF4u16.to_le_bytes());
    }
    let mut lens = [None; 6];
    for len in &mut lens {
        *len = match input.u8() % 4 {
            0 => None,
            1 => Some(0x4000),
            _ => Some(u64::from(input.u16())),
        };
    }
    let io_bar = input.u8() % 7;
    let args: Vec<u32> = (0..8).map(|_| input.u32()).collect();
    let bars = FuzzBars {
        lens,
        io_bar,
        register_bytes: input.take(usize::MAX).to_vec(),
        cursor: Cell::new(0),
        accesses: Cell::new(0),
        out_of_range: RefCell::new(Vec::new()),
    };
    let config = FuzzConfig(config);

    let caps = find_virtio_capabilities(&config, &bars);
    for region in [caps.common, caps.isr, caps.device]
        .into_iter()
        .flatten()
        .chain(caps.notify.map(|n| n.region))
    {
        let len = lens[usize::from(region.bar)].expect("capability in a missing BAR");
        assert!(
            u64::from(region.offset) + u64::from(region.length) <= len,
            "capability beyond its BAR"
        );
    }
    if let Ok(mut transport) = probe(config, bars, preference) {
        exercise(&mut transport, &args);
        let escaped = transport.bars().out_of_range.borrow().clone();
        assert!(escaped.is_empty(), "accesses outside BARs: {escaped:?}");
    }
}

/// What a driver does with a transport, with fuzzer-chosen offsets, vectors and queues.
fn exercise(transport: &mut PciTransport<FuzzConfig, FuzzBars>, args: &[u32]) {
    let arg = |i: usize| args.get(i).copied().unwrap_or(0);
    let _ = transport.device_type();
    let _ = transport.ring_layout();
    let _ = transport.status();
    let _ = transport.reset();
    transport.set_status(DeviceStatus::ACKNOWLEDGE);
    let features = transport.device_features();
    transport.set_driver_features(features & u64::from(arg(7)));
    let _ = transport.config_generation();
    let len = transport.config_len();
    for offset in [0, arg(0), len.saturating_sub(1), len, arg(1) % (len + 8)] {
        let _ = transport.read_config8(offset);
        let _ = transport.read_config16(offset & !1);
        let _ = transport.read_config32(offset & !3);
        let _ = transport.write_config8(offset, 1);
        let _ = transport.write_config16(offset & !1, 1);
        let _ = transport.write_config32(offset & !3, 1);
    }
    transport.set_msix_enabled(arg(2) & 1 != 0);
    let _ = transport.set_config_vector(arg(3) as u16);
    let queues = transport.num_queues().min(8);
    let _ = transport.queue_size_settable();
    for queue in (0..queues).chain([arg(4) as u16, u16::MAX]) {
        let size = transport.max_queue_size(queue);
        let base = u64::from(arg(5)) << 12;
        let addrs = RingAddresses {
            desc: base,
            driver: base + 16 * u64::from(size),
            device: base + 0x10000,
        };
        let _ = transport.setup_queue(queue, size, addrs, arg(6) as u16);
        transport.notify(queue);
        transport.teardown_queue(queue);
    }
    let _ = transport.read_isr();
}
