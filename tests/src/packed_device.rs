//! The device side of one packed virtqueue (virtio 1.2 §2.8), written from the spec text
//! alone, for the conformance tests of the driver's `PackedQueue` (rust-vmm's
//! `virtio-queue` has no packed ring). Works over [`IdentityMemory`] through `vm-memory`, as
//! [`crate::ring_device`] does.
//!
//! Positions are kept as absolute counts of ring positions since the queue was set up; a
//! position's index is `abs % size` and its wrap counter is 1 in even laps and 0 in odd ones
//! (both counters start at 1 and flip each time the last descriptor of the ring is passed,
//! §2.8.1). Keeping absolute counts lets the model decide event crossings by plain integer
//! comparison, independently of the wrap-bit arithmetic a driver has to do.
//!
//! The model is strict about the driver: anything the spec forbids a driver to write (a
//! descriptor in a list with the wrong AVAIL/USED bits, INDIRECT inside a NEXT list, flags
//! other than WRITE in an indirect table, readable after writable elements, a buffer id the
//! device still holds, RING_EVENT_FLAGS_DESC without EVENT_IDX, a reserved event flag value)
//! panics with the rule it broke.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{Ordering, fence};

use virtio_core::transport::RingAddresses;
use vm_memory::{Bytes, GuestAddress};

use crate::mem::IdentityMemory;

/// `VIRTQ_DESC_F_NEXT` (§2.8.6).
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE` (§2.8.3).
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT` (§2.8.7).
pub const F_INDIRECT: u16 = 4;
/// `VIRTQ_DESC_F_AVAIL` (§2.8.1).
pub const F_AVAIL: u16 = 1 << 7;
/// `VIRTQ_DESC_F_USED` (§2.8.1).
pub const F_USED: u16 = 1 << 15;
/// `RING_EVENT_FLAGS_ENABLE` (§2.8.10).
pub const EVENT_ENABLE: u16 = 0;
/// `RING_EVENT_FLAGS_DISABLE`.
pub const EVENT_DISABLE: u16 = 1;
/// `RING_EVENT_FLAGS_DESC` (only with VIRTIO_F_EVENT_IDX).
pub const EVENT_DESC: u16 = 2;

/// Size of one `struct pvirtq_desc` (§2.8.13).
const DESC_SIZE: u64 = 16;

/// One buffer as the device read it from the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedChain {
    /// Buffer ID (from the last descriptor of the list, §2.8.6; from the descriptor that
    /// points at the table for an indirect one).
    pub id: u16,
    /// Absolute ring position of the first descriptor.
    pub first: u64,
    /// Ring positions the buffer took (1 for an indirect one).
    pub positions: u16,
    /// Whether it came through an indirect table.
    pub indirect: bool,
    /// (address, length) of device-readable elements, in order.
    pub readable: Vec<(u64, u32)>,
    /// (address, length) of device-writable elements, in order.
    pub writable: Vec<(u64, u32)>,
}

impl PackedChain {
    /// Bytes the device may write into this buffer.
    pub fn writable_len(&self) -> u32 {
        self.writable.iter().map(|w| w.1).sum()
    }
}

/// The device's view of one packed ring.
pub struct PackedDevice {
    pub mem: IdentityMemory,
    size: u16,
    desc: u64,
    /// Driver Event Suppression (driver area; the device only reads it).
    driver_event: u64,
    /// Device Event Suppression (device area; the device only writes it).
    device_event: u64,
    event_idx: bool,
    /// Next position to read an available descriptor at (absolute).
    avail: u64,
    /// Next position to write a used descriptor at (absolute).
    used: u64,
    /// `used` when the device last decided about an interrupt.
    signalled: u64,
    /// Buffer ids the device read and has not returned, with the ring positions each took.
    held: HashMap<u16, u16>,
    /// Ids the device returned without holding them ([`PackedDevice::return_used`]): a
    /// driver that believed it may reuse such an id while the device still holds a buffer
    /// with it, so these ids (and only these) are not checked for uniqueness.
    lied: HashSet<u16>,
    /// The available-buffer notification the device last asked for, as it wrote it.
    notify: Notify,
}

/// What the Device Event Suppression structure currently says, with the absolute position
/// the device meant for DESC (the structure itself only carries it modulo two laps).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Notify {
    Enable,
    Disable,
    At(u64),
    /// Written verbatim: DESC (or a reserved value) naming this off_wrap.
    Raw(u16),
}

impl PackedDevice {
    /// A device-side queue over the areas the driver programmed (§2.8: descriptor ring at
    /// `desc`, driver event suppression at `driver`, device event suppression at `device`).
    pub fn new(mem: &IdentityMemory, size: u16, addrs: RingAddresses, event_idx: bool) -> Self {
        assert!(
            (1..=32768).contains(&size),
            "packed queue size {size} (§2.8: up to 2^15)"
        );
        assert_eq!(addrs.desc % 16, 0, "descriptor ring alignment (§2.8.10.1)");
        assert_eq!(addrs.driver % 4, 0, "driver area alignment");
        assert_eq!(addrs.device % 4, 0, "device area alignment");
        assert!(mem.contains(addrs.desc, size as usize * 16));
        assert!(mem.contains(addrs.driver, 4) && mem.contains(addrs.device, 4));
        PackedDevice {
            mem: mem.clone(),
            size,
            desc: addrs.desc,
            driver_event: addrs.driver,
            device_event: addrs.device,
            event_idx,
            avail: 0,
            used: 0,
            signalled: 0,
            held: HashMap::new(),
            lied: HashSet::new(),
            notify: Notify::Enable,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Absolute position of the next descriptor the device will read.
    pub fn avail_position(&self) -> u64 {
        self.avail
    }

    /// Absolute position of the next used descriptor the device will write.
    pub fn used_position(&self) -> u64 {
        self.used
    }

    /// Buffers read and not yet returned.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Ring index of absolute position `abs`.
    pub fn index_of(&self, abs: u64) -> u16 {
        (abs % u64::from(self.size)) as u16
    }

    /// Wrap counter in effect at absolute position `abs`: 1 in the first lap, flipped at
    /// every lap (§2.8.1).
    pub fn wrap_of(&self, abs: u64) -> bool {
        (abs / u64::from(self.size)).is_multiple_of(2)
    }

    /// `off_wrap` naming absolute position `abs` (§2.8.14: offset in bits 0..15, wrap
    /// counter in bit 15).
    pub fn off_wrap(&self, abs: u64) -> u16 {
        self.index_of(abs) | if self.wrap_of(abs) { 1 << 15 } else { 0 }
    }

    /// Flags of a used descriptor written in the lap of `abs` (§2.8.1: AVAIL and USED both
    /// equal to the device's wrap counter).
    pub fn used_flags(&self, abs: u64) -> u16 {
        if self.wrap_of(abs) {
            F_AVAIL | F_USED
        } else {
            0
        }
    }

    fn g(&self) -> &vm_memory::GuestMemoryMmap {
        self.mem.guest_memory()
    }

    fn desc_addr(&self, abs: u64) -> u64 {
        self.desc + DESC_SIZE * u64::from(self.index_of(abs))
    }

    fn load16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.g()
                .load::<u16>(GuestAddress(addr), Ordering::Acquire)
                .expect("ring read"),
        )
    }

    fn store16(&self, addr: u64, v: u16) {
        self.g()
            .store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("ring write")
    }

    /// Reads a whole descriptor (addr, len, id, flags) at guest address `at`.
    fn read_desc(&self, at: u64) -> (u64, u32, u16, u16) {
        let g = self.g();
        let addr: u64 = g.read_obj(GuestAddress(at)).expect("desc addr");
        let len: u32 = g.read_obj(GuestAddress(at + 8)).expect("desc len");
        let id: u16 = g.read_obj(GuestAddress(at + 12)).expect("desc id");
        let flags: u16 = g.read_obj(GuestAddress(at + 14)).expect("desc flags");
        (
            u64::from_le(addr),
            u32::from_le(len),
            u16::from_le(id),
            u16::from_le(flags),
        )
    }

    /// Whether `flags` mark a descriptor available in the lap whose wrap counter is `wrap`
    /// (§2.8.1: AVAIL equals the wrap counter, USED its inverse).
    fn is_avail(flags: u16, wrap: bool) -> bool {
        let a = flags & F_AVAIL != 0;
        let u = flags & F_USED != 0;
        a == wrap && u != wrap
    }

    /// Raw flags of the descriptor at ring index `idx`.
    pub fn flags_at(&self, idx: u16) -> u16 {
        assert!(idx < self.size);
        self.load16(self.desc + DESC_SIZE * u64::from(idx) + 14)
    }

    /// Whether a buffer is available at the device's read position.
    pub fn has_avail(&self) -> bool {
        let flags = self.load16(self.desc_addr(self.avail) + 14);
        Self::is_avail(flags, self.wrap_of(self.avail))
    }

    /// Reads the next available buffer (§2.8.12: in ring order), following NEXT lists and
    /// indirect tables, or `None` when the next descriptor is not available in this lap.
    pub fn pop(&mut self) -> Option<PackedChain> {
        let first = self.avail;
        if !self.has_avail() {
            return None;
        }
        // The flags were read (acquire) before the rest of the descriptor: the driver
        // wrote them last, after a barrier (§2.8.21.1).
        fence(Ordering::Acquire);
        let (addr, len, id, flags) = self.read_desc(self.desc_addr(first));
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut push = |addr: u64, len: u32, write: bool, what: &str| {
            if write {
                writable.push((addr, len));
            } else {
                assert!(
                    writable.is_empty(),
                    "{what}: device-readable element after a device-writable one (§2.8.17)"
                );
                readable.push((addr, len));
            }
        };
        let (positions, id, indirect) = if flags & F_INDIRECT != 0 {
            assert_eq!(
                flags & F_NEXT,
                0,
                "INDIRECT in a list linked by NEXT (§2.8.19)"
            );
            assert!(
                len > 0 && len % 16 == 0,
                "indirect table length {len} is not a whole number of descriptors (§2.8.7)"
            );
            let n = len / 16;
            assert!(
                n <= u32::from(self.size),
                "indirect table of {n} entries, longer than the queue (§2.8.17)"
            );
            assert!(
                self.mem.contains(addr, len as usize),
                "table outside memory"
            );
            for i in 0..u64::from(n) {
                // §2.8.7: entries are packed descriptors, in order, WRITE the only valid
                // flag; id is reserved.
                let (a, l, _id, f) = self.read_desc(addr + DESC_SIZE * i);
                assert_eq!(
                    f & !F_WRITE,
                    0,
                    "flags {f:#x} other than WRITE in an indirect entry (§2.8.19)"
                );
                push(a, l, f & F_WRITE != 0, "indirect table");
            }
            (1u16, id, true)
        } else {
            let mut pos = first;
            let mut count = 0u16;
            let (mut a, mut l, mut last_id, mut f) = (addr, len, id, flags);
            loop {
                count += 1;
                assert!(
                    count <= self.size,
                    "descriptor list longer than the queue (§2.8.17)"
                );
                assert_eq!(
                    f & F_INDIRECT,
                    0,
                    "INDIRECT in a list linked by NEXT (§2.8.19)"
                );
                push(a, l, f & F_WRITE != 0, "descriptor list");
                if f & F_NEXT == 0 {
                    break;
                }
                pos += 1;
                (a, l, last_id, f) = self.read_desc(self.desc_addr(pos));
                // §2.8.6: every descriptor of the list carries the AVAIL/USED bits of the
                // lap it was written in (the list may cross the end of the ring).
                assert!(
                    Self::is_avail(f, self.wrap_of(pos)),
                    "list element at position {} (index {}) has flags {f:#x}, not \
                     available in its lap (§2.8.6)",
                    pos,
                    self.index_of(pos)
                );
            }
            // §2.8.6: "Buffer ID is included in the last descriptor in the list."
            (count, last_id, false)
        };
        let fresh = self.held.insert(id, positions).is_none();
        assert!(
            fresh || self.lied.contains(&id),
            "buffer id {id} made available while the device still holds it"
        );
        self.avail += u64::from(positions);
        Some(PackedChain {
            id,
            first,
            positions,
            indirect,
            readable,
            writable,
        })
    }

    /// Reads everything available.
    pub fn pop_all(&mut self) -> Vec<PackedChain> {
        std::iter::from_fn(|| self.pop()).collect()
    }

    /// Writes `len` bytes of `fill` into the buffer's writable elements and returns it: one
    /// used descriptor at the device's used position with the buffer id and `len`, flags
    /// written last; the used position then skips as many positions as the buffer took
    /// (§2.8.6, §2.8.7).
    pub fn complete(&mut self, chain: &PackedChain, len: u32, fill: u8) {
        assert!(
            len <= chain.writable_len(),
            "model misuse: len beyond buffer"
        );
        assert!(
            self.held.remove(&chain.id).is_some(),
            "model misuse: buffer {} not held",
            chain.id
        );
        let mut left = len;
        for &(addr, cap) in &chain.writable {
            let n = left.min(cap);
            if n == 0 {
                break;
            }
            self.g()
                .write_slice(&vec![fill; n as usize], GuestAddress(addr))
                .expect("write");
            left -= n;
        }
        assert!(
            self.used + u64::from(chain.positions) <= self.avail,
            "used position passing the available one"
        );
        let at = self.used;
        // §2.8.4: in a used descriptor, len is the bytes written; WRITE says whether any.
        let flags = self.used_flags(at) | if len > 0 { F_WRITE } else { 0 };
        self.write_used(at, chain.id, len, flags);
        self.used += u64::from(chain.positions);
    }

    /// Returns several buffers in one go like a device that batches (QEMU's flush): every
    /// used descriptor but the first is written, then the first, so that a driver never
    /// sees a partial batch.
    pub fn complete_batch(&mut self, batch: &[(&PackedChain, u32)]) {
        let start = self.used;
        let mut at = start;
        let mut slots = Vec::new();
        for &(c, len) in batch {
            assert!(len <= c.writable_len());
            assert!(
                self.held.remove(&c.id).is_some(),
                "model misuse: buffer not held"
            );
            slots.push((at, c.id, len));
            at += u64::from(c.positions);
        }
        assert!(at <= self.avail, "used position passing the available one");
        for &(pos, id, len) in slots.iter().skip(1) {
            self.write_used(pos, id, len, self.used_flags(pos));
        }
        if let Some(&(pos, id, len)) = slots.first() {
            self.write_used(pos, id, len, self.used_flags(pos));
        }
        self.used = at;
    }

    /// Returns buffer `id` as used at the device's used position whatever its books say,
    /// for a simulated device that may lie (`crate::sim`): `len` bytes (none written here),
    /// the used flags of that position's lap with WRITE when `len` is not 0, and the used
    /// position moved on by the positions the buffer took (1 for an id it does not hold),
    /// at most to the read position. Nothing about the
    /// buffer is checked: the driver has to notice. A used descriptor only ever goes over
    /// one the device has read (§2.8.6), so once the used position has reached the read
    /// position the return is dropped (false): past it, it would overwrite a descriptor the
    /// driver may be making available, which corrupts the ring for the device itself rather
    /// than lying to the driver. That happens when the device holds nothing, and also after
    /// lies, which move the used position over positions of buffers it still holds.
    pub fn return_used(&mut self, id: u16, len: u32) -> bool {
        let held = self.held.remove(&id);
        if self.used >= self.avail {
            return false;
        }
        if held.is_none() {
            // A driver that cannot tell this lie from a true completion of a buffer it
            // makes available later with the same id will reuse the id early.
            self.lied.insert(id);
        }
        let at = self.used;
        let flags = self.used_flags(at) | if len > 0 { F_WRITE } else { 0 };
        self.write_used(at, id, len, flags);
        let positions = held.unwrap_or(1).max(1);
        self.used = (self.used + u64::from(positions)).min(self.avail);
        true
    }

    /// id and len, then (release) flags.
    fn write_used(&self, abs: u64, id: u16, len: u32, flags: u16) {
        let d = self.desc_addr(abs);
        let g = self.g();
        g.write_obj(len.to_le(), GuestAddress(d + 8)).expect("len");
        g.write_obj(id.to_le(), GuestAddress(d + 12)).expect("id");
        fence(Ordering::Release);
        self.store16(d + 14, flags);
    }

    /// Writes a raw descriptor at ring index `idx` (a hostile device), flags last.
    pub fn forge(&self, idx: u16, id: u16, len: u32, flags: u16) {
        assert!(idx < self.size);
        let d = self.desc + DESC_SIZE * u64::from(idx);
        let g = self.g();
        g.write_obj(len.to_le(), GuestAddress(d + 8)).expect("len");
        g.write_obj(id.to_le(), GuestAddress(d + 12)).expect("id");
        fence(Ordering::Release);
        self.store16(d + 14, flags);
    }

    /// Whether the device must send a used buffer notification now, as the driver's event
    /// suppression structure asks (§2.8.10): never with DISABLE, for any new used buffer
    /// with ENABLE, and with DESC when the used position crossed the named descriptor (in
    /// the named lap) since the last decision. Records the decision point.
    pub fn needs_interrupt(&mut self) -> bool {
        let off_wrap = self.load16(self.driver_event);
        let flags = self.load16(self.driver_event + 2);
        let (old, new) = (self.signalled, self.used);
        self.signalled = new;
        match flags {
            EVENT_DISABLE => false,
            EVENT_ENABLE => new > old,
            EVENT_DESC => {
                assert!(
                    self.event_idx,
                    "driver wrote RING_EVENT_FLAGS_DESC without VIRTIO_F_EVENT_IDX (§2.8.10)"
                );
                self.crossed(off_wrap, old, new)
            }
            other => panic!("driver wrote reserved event flags {other:#x} (§2.8.14)"),
        }
    }

    /// The driver's event suppression structure: (off_wrap, flags).
    pub fn driver_event(&self) -> (u16, u16) {
        (
            self.load16(self.driver_event),
            self.load16(self.driver_event + 2),
        )
    }

    /// Whether a move from absolute position `old` to `new` passes the descriptor that
    /// `off_wrap` names: some position in `[old, new)` with that index and wrap counter.
    pub fn crossed(&self, off_wrap: u16, old: u64, new: u64) -> bool {
        let off = u64::from(off_wrap & 0x7FFF);
        let wrap = off_wrap & 0x8000 != 0;
        let size = u64::from(self.size);
        assert!(
            off < size,
            "event offset {off} beyond the ring of {size} (§2.8.14)"
        );
        // First position at or after `old` with index `off`, then the next one in the
        // named lap (every other lap).
        let mut at = old + (off + size - old % size) % size;
        if self.wrap_of(at) != wrap {
            at += size;
        }
        at < new
    }

    /// The device is busy: asks not to be notified (§2.8.10).
    pub fn disable_notifications(&mut self) {
        self.store16(self.device_event + 2, EVENT_DISABLE);
        self.notify = Notify::Disable;
    }

    /// The device goes idle: asks to be notified of the next buffer (with EVENT_IDX, when
    /// the descriptor at its read position is made available), then re-checks the ring so
    /// a buffer made available meanwhile is not missed; true if there is one.
    pub fn enable_notifications(&mut self) -> bool {
        if self.event_idx {
            self.notify_at(self.avail);
        } else {
            self.store16(self.device_event + 2, EVENT_ENABLE);
            self.notify = Notify::Enable;
        }
        fence(Ordering::SeqCst);
        self.has_avail()
    }

    /// Asks (EVENT_IDX) to be notified when the descriptor at absolute position `abs` is
    /// made available: off_wrap first, then the flags that make the driver read it.
    pub fn notify_at(&mut self, abs: u64) {
        assert!(self.event_idx, "DESC needs EVENT_IDX");
        self.store16(self.device_event, self.off_wrap(abs));
        fence(Ordering::Release);
        self.store16(self.device_event + 2, EVENT_DESC);
        self.notify = Notify::At(abs);
    }

    /// Writes the device event suppression structure verbatim (for hostile or odd values).
    pub fn set_device_event_raw(&mut self, off_wrap: u16, flags: u16) {
        self.store16(self.device_event, off_wrap);
        self.store16(self.device_event + 2, flags);
        self.notify = match flags {
            EVENT_DISABLE => Notify::Disable,
            EVENT_ENABLE => Notify::Enable,
            _ => Notify::Raw(off_wrap),
        };
    }

    /// What the device last asked for.
    pub fn notify_state(&self) -> Notify {
        self.notify
    }

    /// Whether a driver that moved its available position from absolute `old` to `new`
    /// since its last notification decision must notify, by what the device asked for.
    pub fn kick_wanted(&self, old: u64, new: u64) -> bool {
        match self.notify {
            Notify::Disable => false,
            Notify::Enable => new > old,
            Notify::At(abs) => old <= abs && abs < new,
            Notify::Raw(off_wrap) => self.crossed(off_wrap, old, new),
        }
    }
}
