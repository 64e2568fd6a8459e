//! The device side of one split ring, served by rust-vmm's `virtio-queue` (code nobody here
//! wrote) over [`IdentityMemory`]: what the conformance tests run our driver queue against.

use virtio_core::RingLayoutKind;
use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::queue::{QueueConfig, SplitQueue};
use virtio_core::ring::SplitRingLayout;
use virtio_core::transport::RingAddresses;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::mem::IdentityMemory;

/// One chain as the device saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    /// (address, length) of device-readable descriptors, in order.
    pub readable: Vec<(u64, u32)>,
    /// (address, length) of device-writable descriptors, in order.
    pub writable: Vec<(u64, u32)>,
}

impl Chain {
    pub fn writable_len(&self) -> u32 {
        self.writable.iter().map(|w| w.1).sum()
    }
}

/// rust-vmm's queue plus the memory it lives in.
pub struct DeviceQueue {
    pub queue: Queue,
    pub mem: IdentityMemory,
    avail_flags_addr: u64,
    event_idx: bool,
}

impl DeviceQueue {
    /// Configures a device-side queue from the addresses the driver programmed.
    pub fn new(mem: &IdentityMemory, size: u16, addrs: RingAddresses, event_idx: bool) -> Self {
        let mut queue = Queue::new(size).expect("queue size");
        queue.try_set_size(size).expect("size");
        queue
            .try_set_desc_table_address(GuestAddress(addrs.desc))
            .expect("desc");
        queue
            .try_set_avail_ring_address(GuestAddress(addrs.driver))
            .expect("avail");
        queue
            .try_set_used_ring_address(GuestAddress(addrs.device))
            .expect("used");
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        assert!(
            queue.is_valid(mem.guest_memory()),
            "device rejects the ring layout"
        );
        DeviceQueue {
            queue,
            mem: mem.clone(),
            avail_flags_addr: addrs.driver,
            event_idx,
        }
    }

    /// Same, for a legacy single-area ring at `base` (addresses derived by the device from
    /// the PFN, as QEMU does).
    pub fn new_legacy(
        mem: &IdentityMemory,
        layout: &SplitRingLayout,
        base: u64,
        event_idx: bool,
    ) -> Self {
        let addrs = RingAddresses {
            desc: base,
            driver: base + layout.avail as u64,
            device: base + layout.used as u64,
        };
        Self::new(mem, layout.size, addrs, event_idx)
    }

    /// Pops the next available chain, following indirect tables.
    pub fn pop(&mut self) -> Option<Chain> {
        let chain = self.queue.pop_descriptor_chain(self.mem.guest_memory())?;
        let head = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for d in chain {
            if d.is_write_only() {
                writable.push((d.addr().0, d.len()));
            } else {
                assert!(
                    writable.is_empty(),
                    "readable descriptor after a writable one"
                );
                readable.push((d.addr().0, d.len()));
            }
        }
        Some(Chain {
            head,
            readable,
            writable,
        })
    }

    /// Pops everything available.
    pub fn pop_all(&mut self) -> Vec<Chain> {
        std::iter::from_fn(|| self.pop()).collect()
    }

    /// Writes `len` bytes of `fill` into the chain's writable part and completes it.
    pub fn complete(&mut self, chain: &Chain, len: u32, fill: u8) {
        let mut left = len;
        for &(addr, cap) in &chain.writable {
            let n = left.min(cap);
            if n == 0 {
                break;
            }
            self.mem
                .guest_memory()
                .write_slice(&vec![fill; n as usize], GuestAddress(addr))
                .expect("write");
            left -= n;
        }
        self.queue
            .add_used(self.mem.guest_memory(), chain.head, len)
            .expect("add_used");
    }

    /// Whether the device must interrupt now, as a conforming device decides it: EVENT_IDX
    /// through `used_event` (virtio-queue), otherwise the driver's NO_INTERRUPT flag (which
    /// virtio-queue 0.18 does not look at, so we read it here).
    pub fn needs_interrupt(&mut self) -> bool {
        let by_queue = self
            .queue
            .needs_notification(self.mem.guest_memory())
            .expect("needs_notification");
        if self.event_idx {
            by_queue
        } else {
            let flags: u16 = self
                .mem
                .guest_memory()
                .read_obj(GuestAddress(self.avail_flags_addr))
                .expect("flags");
            flags & 1 == 0
        }
    }

    /// The device goes idle: re-enables notifications, returning true if more work arrived.
    pub fn enable_notifications(&mut self) -> bool {
        self.queue
            .enable_notification(self.mem.guest_memory())
            .expect("enable_notification")
    }

    /// The device is busy: asks not to be notified.
    pub fn disable_notifications(&mut self) {
        self.queue
            .disable_notification(self.mem.guest_memory())
            .expect("disable_notification")
    }
}

/// Our driver-side [`SplitQueue`] and rust-vmm's device side over one ring allocated in
/// `mem` (with an indirect table pool when `max_indirect > 1`): what every split-ring
/// test starts from.
pub fn split_queue_pair(
    mem: &IdentityMemory,
    kind: RingLayoutKind,
    size: u16,
    event_idx: bool,
    max_indirect: u16,
    ignore_used_len: bool,
) -> (SplitQueue, DeviceQueue, SplitRingLayout) {
    let (drv, layout, base) =
        split_queue(mem, kind, size, event_idx, max_indirect, ignore_used_len);
    let dev = match kind {
        RingLayoutKind::Legacy => DeviceQueue::new_legacy(mem, &layout, base, event_idx),
        RingLayoutKind::Modern => DeviceQueue::new(mem, size, drv.addresses(), event_idx),
    };
    (drv, dev, layout)
}

/// Our driver-side [`SplitQueue`] over a ring allocated in `mem`, then its indirect table
/// pool ([`indirect_pool`]); with the ring's layout and device address.
pub fn split_queue(
    mem: &IdentityMemory,
    kind: RingLayoutKind,
    size: u16,
    event_idx: bool,
    max_indirect: u16,
    ignore_used_len: bool,
) -> (SplitQueue, SplitRingLayout, u64) {
    let layout = SplitRingLayout::new(kind, size).expect("a valid split ring size");
    let ring = mem
        .alloc_coherent(layout.total, layout.align)
        .expect("ring memory");
    let base = ring.daddr;
    let drv = SplitQueue::new(
        0,
        layout,
        ring,
        indirect_pool(mem, size, max_indirect),
        QueueConfig {
            size,
            max_indirect,
            event_idx,
            ignore_used_len,
        },
    )
    .expect("the driver queue");
    (drv, layout, base)
}

/// Indirect tables of `max_indirect` entries for each of `size` ring slots, allocated in
/// `mem`; none when `max_indirect` is below 2 (a table is only used for two or more).
pub fn indirect_pool(mem: &IdentityMemory, size: u16, max_indirect: u16) -> Option<DmaRegion> {
    (max_indirect > 1).then(|| {
        mem.alloc_coherent(usize::from(size) * usize::from(max_indirect) * 16, 16)
            .expect("indirect table memory")
    })
}

/// Writes a raw used-ring entry `(id, len)` at `slot` of `drv`'s ring and sets used.idx to
/// `new_idx`, as a hostile device would.
pub fn forge_used(
    mem: &IdentityMemory,
    drv: &SplitQueue,
    slot: u16,
    id: u32,
    len: u32,
    new_idx: u16,
) {
    let l = drv.layout();
    let base = drv.addresses().desc;
    let g = mem.guest_memory();
    let elem = base + l.used_ring(slot) as u64;
    g.write_obj(id.to_le(), GuestAddress(elem))
        .expect("used id");
    g.write_obj(len.to_le(), GuestAddress(elem + 4))
        .expect("used len");
    g.write_obj(new_idx.to_le(), GuestAddress(base + l.used_idx() as u64))
        .expect("used idx");
}
