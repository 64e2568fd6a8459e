//! The transport interface: what a transport (virtio-pci modern or legacy, later MMIO)
//! offers to the generic device lifecycle and queue code. Device drivers never see this;
//! they see [`crate::bus::Bus`].

use crate::error::Result;
use crate::platform::DeviceAddr;
use crate::types::{DeviceStatus, DeviceType, RingLayoutKind};

/// MSI-X "no vector" value (virtio 1.2 §4.1.4.3 / §4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xFFFF;

/// Device addresses of one split ring's three areas.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RingAddresses {
    pub desc: DeviceAddr,
    pub driver: DeviceAddr,
    pub device: DeviceAddr,
}

/// ISR status bits (virtio 1.2 §4.1.4.5): reading the ISR clears it and de-asserts INTx.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct IsrStatus(pub u8);

impl IsrStatus {
    pub fn queue(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn config_changed(self) -> bool {
        self.0 & 2 != 0
    }
}

/// Register-level access to one virtio device over some transport.
///
/// Methods that read device-written values return them raw; validation happens in the
/// callers (the lifecycle code and the queue), which treat them as untrusted.
pub trait Transport {
    fn device_type(&self) -> DeviceType;
    /// Ring layout this transport requires.
    fn ring_layout(&self) -> RingLayoutKind;

    fn status(&self) -> DeviceStatus;
    /// Writes the status register (all bits at once; the lifecycle code ORs bits in).
    fn set_status(&mut self, status: DeviceStatus);

    /// All 64 offered bits (legacy: bits 0..=31 only).
    fn device_features(&mut self) -> u64;
    /// Writes the accepted bits (legacy: bits 0..=31 only; higher bits must be 0).
    fn set_driver_features(&mut self, features: u64);

    /// `config_generation`; transports without one (legacy) return 0 always.
    fn config_generation(&self) -> u32;
    /// Size of the device-specific config area, if the transport knows it (modern: the
    /// DEVICE capability's length; legacy: what remains of BAR0).
    fn config_len(&self) -> u32;
    /// One aligned device-config access of natural width. Out-of-range accesses are the
    /// caller's bug and must be rejected by the transport (`Error::ConfigOutOfRange`).
    fn read_config8(&self, offset: u32) -> Result<u8>;
    fn read_config16(&self, offset: u32) -> Result<u16>;
    fn read_config32(&self, offset: u32) -> Result<u32>;
    fn write_config8(&mut self, offset: u32, value: u8) -> Result<()>;
    fn write_config16(&mut self, offset: u32, value: u16) -> Result<()>;
    fn write_config32(&mut self, offset: u32, value: u32) -> Result<()>;

    /// Number of queues the device has (modern: `num_queues`; legacy: probed by size).
    fn num_queues(&mut self) -> u16;
    /// Maximum size of queue `index` (0: the queue does not exist).
    fn max_queue_size(&mut self, index: u16) -> u16;
    /// Whether the transport lets the driver choose a smaller size (legacy: no).
    fn queue_size_settable(&self) -> bool;
    /// Programs queue `index` with `size` entries at `addrs`, routes it to MSI-X `vector`
    /// (or [`NO_VECTOR`]) and enables it. Returns `Error::VectorRejected` if the device
    /// reads back NO_VECTOR for a requested vector.
    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        addrs: RingAddresses,
        vector: u16,
    ) -> Result<()>;
    /// Disables queue `index` (modern: `queue_reset` when available, else nothing until the
    /// device reset; legacy: PFN 0).
    fn teardown_queue(&mut self, index: u16);
    /// Routes config-change interrupts to MSI-X `vector` (or [`NO_VECTOR`]), with read-back.
    fn set_config_vector(&mut self, vector: u16) -> Result<()>;
    /// Tells the transport whether MSI-X is on (legacy: shifts device config from 20 to 24).
    fn set_msix_enabled(&mut self, enabled: bool);

    /// Notifies the device that queue `index` has new buffers (a "kick").
    fn notify(&self, index: u16);
    /// Reads (and thereby clears) the ISR status.
    fn read_isr(&self) -> IsrStatus;

    /// Cuts the device off from memory without its cooperation, for a device that did not
    /// acknowledge a reset (§2.1.2: status never read back 0), so that the memory it was
    /// given can be reused. True only when the transport verified that the device can no
    /// longer read or write memory; false when it cannot tell (the default: a transport
    /// without such a switch) or the switch did not take.
    ///
    /// PCI: clears Bus Master Enable in the command register and reads it back (PCI Local
    /// Bus 3.0 §6.2.2, PCIe Base 4.0 §7.5.1.1.3: with it clear a function issues no memory
    /// requests, MSI/MSI-X writes included). Linux does the same on remove
    /// (`pci_clear_master`), and QEMU routes a virtio device's DMA through the bus-master
    /// address space, which is disabled while the bit is clear.
    fn stop_dma(&mut self) -> bool {
        false
    }
    /// Undoes [`Transport::stop_dma`] once the device has acknowledged a reset (status read
    /// back 0, so it uses no driver memory until it is set up again, §2.1.2). True when the
    /// device can use memory again (PCI: Bus Master Enable read back set); false when the
    /// switch did not take, and the device cannot run its queues. Default: true (a
    /// transport without the switch never stopped anything).
    #[must_use]
    fn restart_dma(&mut self) -> bool {
        true
    }
}
