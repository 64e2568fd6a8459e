//! A virtqueue of either format: [`SplitQueue`] (§2.7) or [`PackedQueue`] (§2.8), chosen at
//! setup by whether VIRTIO_F_RING_PACKED was negotiated. The bus drives both through this
//! one type, so no device crate knows which ring it runs on.

use crate::error::Result;
use crate::packed::PackedQueue;
use crate::platform::DmaRegion;
use crate::queue::{QueueStats, Segment, SplitQueue, Used};
use crate::transport::RingAddresses;

/// The driver side of one virtqueue.
pub enum Virtqueue {
    Split(SplitQueue),
    Packed(PackedQueue),
}

/// Runs `$body` with `$q` bound to whichever ring `$self` holds.
macro_rules! either {
    ($self:expr, $q:ident => $body:expr) => {
        match $self {
            Virtqueue::Split($q) => $body,
            Virtqueue::Packed($q) => $body,
        }
    };
}

impl Virtqueue {
    pub fn is_packed(&self) -> bool {
        matches!(self, Virtqueue::Packed(_))
    }
    pub fn index(&self) -> u16 {
        either!(self, q => q.index())
    }
    pub fn size(&self) -> u16 {
        either!(self, q => q.size())
    }
    pub fn num_free(&self) -> u16 {
        either!(self, q => q.num_free())
    }
    pub fn is_broken(&self) -> bool {
        either!(self, q => q.is_broken())
    }
    pub fn stats(&self) -> QueueStats {
        either!(self, q => q.stats())
    }
    pub(crate) fn stats_mut(&mut self) -> &mut QueueStats {
        either!(self, q => q.stats_mut())
    }
    pub fn max_chain(&self) -> u16 {
        either!(self, q => q.max_chain())
    }
    pub fn descriptors_for(&self, segments: usize) -> usize {
        either!(self, q => q.descriptors_for(segments))
    }
    pub fn in_flight(&self) -> u16 {
        either!(self, q => q.in_flight())
    }
    pub fn addresses(&self) -> RingAddresses {
        either!(self, q => q.addresses())
    }
    pub fn into_regions(self) -> (DmaRegion, Option<DmaRegion>) {
        either!(self, q => q.into_regions())
    }
    #[inline(always)]
    pub fn add(&mut self, readable: &[Segment], writable: &[Segment], token: usize) -> Result<()> {
        either!(self, q => q.add(readable, writable, token))
    }
    #[inline(always)]
    pub fn kick_prepare(&mut self) -> bool {
        either!(self, q => q.kick_prepare())
    }
    #[inline]
    pub fn has_used(&self) -> bool {
        either!(self, q => q.has_used())
    }
    /// Pops the next used chain (see the ring's own `pop_used`). A split ring with nothing
    /// new answers `None` inline, without a call: the last pop of a driver's own pop loop
    /// (`drain_used` does not pop past the index it read). The rest is a call, handed the
    /// used index read here (read once). The packed ring always takes the call: even with
    /// nothing used it checks the device's lap (`PackedQueue::pop_used`).
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        match self {
            Virtqueue::Split(q) => match q.used_idx_if_new()? {
                None => Ok(None),
                Some(used_idx) => Self::pop_split_from(q, used_idx),
            },
            Virtqueue::Packed(q) => Self::pop_packed(q),
        }
    }
    #[inline(never)]
    fn pop_split_from(q: &mut SplitQueue, used_idx: u16) -> Result<Option<Used>> {
        q.pop_used_from(used_idx)
    }
    #[inline(never)]
    fn pop_packed(q: &mut PackedQueue) -> Result<Option<Used>> {
        q.pop_used()
    }
    /// Pops every completion into `f` (`Bus::drain_used`), each ring its own way.
    #[inline]
    pub fn drain_used(&mut self, interrupts: bool, f: impl FnMut(Used)) -> Result<usize> {
        either!(self, q => q.drain_used(interrupts, f))
    }
    pub fn disable_interrupts(&mut self) {
        either!(self, q => q.disable_interrupts())
    }
    pub fn enable_interrupts(&mut self) -> bool {
        either!(self, q => q.enable_interrupts())
    }
    pub fn enable_interrupts_delayed(&mut self) -> bool {
        either!(self, q => q.enable_interrupts_delayed())
    }
    pub fn reclaim_after_reset(&mut self, f: impl FnMut(usize)) {
        either!(self, q => q.reclaim_after_reset(f))
    }
}
