//! virtio-rng over `VirtioDevice<PciTransport<..>>` and the simulated function
//! (`virtio_tests::sim`), in modern, transitional and legacy modes.
//!
//! The device side is [`Source`] below: it serves the request queue from a known byte
//! stream (a counter, so every byte says where it came from), with whatever length per
//! buffer a test chooses, and records what it fed. The driver must hand out exactly that
//! stream, in order, with nothing lost or repeated, and turn hostile used elements into
//! errors.

use virtio_core::platform::InterruptMode;
use virtio_core::{Bus, DeviceType, Error, VirtioDevice};
use virtio_pci::{PciTransport, Preference, probe};
use virtio_rng::{REQUEST_QUEUE, RngOptions, VirtioRng};
use virtio_tests::mem::IdentityMemory;
use virtio_tests::sim::{
    LifecycleStep, Sim, SimBars, SimBuilder, SimConfig, SimInterrupt, SimIrq, SimMode,
};

type SimBus = VirtioDevice<PciTransport<SimConfig, SimBars>, IdentityMemory, SimIrq>;
type Rng = VirtioRng<SimBus>;

const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);
const V1: u64 = 1 << 32;

const MODES: [(SimMode, Preference); 4] = [
    (SimMode::Modern, Preference::Auto),
    (SimMode::Transitional, Preference::Auto),
    (SimMode::Transitional, Preference::Legacy),
    (SimMode::Legacy, Preference::Auto),
];

/// The device side: bytes 0, 1, 2, ... (mod 251, so the stream never lines up with
/// buffer sizes) written into the buffers the driver posted.
struct Source {
    sim: Sim,
    next: u64,
    fed: Vec<u8>,
}

impl Source {
    fn new(mode: SimMode, queue_size: u16) -> Self {
        let features = if mode == SimMode::Legacy {
            RING
        } else {
            RING | V1
        };
        let sim = SimBuilder::new(mode, DeviceType::Entropy.id())
            .features(features)
            .queues(&[queue_size])
            .memory_len(4 << 20)
            .build();
        Source {
            sim,
            next: 0,
            fed: Vec::new(),
        }
    }

    fn bus(&self, pref: Preference) -> SimBus {
        let t = probe(self.sim.config_space(), self.sim.bars(), pref).expect("probe");
        VirtioDevice::new(t, self.sim.memory(), self.sim.irq())
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let out: Vec<u8> = (0..n as u64)
            .map(|i| ((self.next + i) % 251) as u8)
            .collect();
        self.next += n as u64;
        out
    }

    /// Serves every posted buffer with `len(i, capacity)` bytes (capped at the capacity)
    /// and signals once. Returns the buffers served.
    fn serve(&mut self, mut len: impl FnMut(usize, u32) -> u32) -> usize {
        let chains = self.sim.pop_chains(REQUEST_QUEUE);
        for (i, c) in chains.iter().enumerate() {
            assert_eq!(c.readable_len(), 0, "requests are device-writable only");
            let n = len(i, c.writable_len()).min(c.writable_len());
            let data = self.bytes(n as usize);
            let written = self.sim.write_chain(c, &data);
            self.fed.extend_from_slice(&data);
            self.sim.complete(REQUEST_QUEUE, c.head, written);
        }
        if !chains.is_empty() {
            self.sim.signal_used(REQUEST_QUEUE);
        }
        chains.len()
    }
}

fn rig(mode: SimMode, pref: Preference, opts: RngOptions) -> (Source, Rng) {
    let src = Source::new(mode, 64);
    let rng = VirtioRng::new(src.bus(pref), opts).expect("rng init");
    (src, rng)
}

fn read_all(rng: &mut Rng, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = rng.read(&mut buf).expect("read");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn init_follows_the_spec_and_posts_every_buffer() {
    for (mode, pref) in MODES {
        let (src, rng) = rig(mode, pref, RngOptions::default());
        src.sim.check_init_order().expect("init order");
        let life = src.sim.lifecycle();
        assert_eq!(life.last(), Some(&LifecycleStep::DriverOk), "{mode:?}");
        assert_eq!(rng.buffers(), 8);
        // No device-specific feature exists (§5.4.3): only ring/transport bits.
        assert_eq!(src.sim.driver_features() & 0xFF_FFFF, 0, "{mode:?}");
        let chains = src.sim.pop_chains(REQUEST_QUEUE);
        assert_eq!(chains.len(), 8, "{mode:?}");
        assert!(
            chains
                .iter()
                .all(|c| c.writable_len() == 64 && c.readable_len() == 0)
        );
        assert_eq!(
            src.sim.kicks(REQUEST_QUEUE),
            1,
            "one kick for the batch ({mode:?})"
        );
    }
}

#[test]
fn refuses_another_device_type() {
    let sim = SimBuilder::new(SimMode::Modern, DeviceType::Console.id()).build();
    let t = probe(sim.config_space(), sim.bars(), Preference::Auto).expect("probe");
    let r = VirtioRng::new(
        VirtioDevice::new(t, sim.memory(), sim.irq()),
        RngOptions::default(),
    );
    assert_eq!(r.err(), Some(Error::Unsupported));
}

#[test]
fn bytes_come_out_in_order_exactly_once() {
    for (mode, pref) in MODES {
        let (mut src, mut rng) = rig(mode, pref, RngOptions::default());
        let mut got = Vec::new();
        // Partial buffers, empty completions and odd read sizes, over many refills.
        for round in 0..200u32 {
            src.serve(|i, cap| match (round as usize + i) % 5 {
                0 => 0,
                1 => 1,
                2 => cap,
                3 => cap / 2 + 3,
                _ => 17,
            });
            got.extend(read_all(&mut rng, 1 + (round as usize % 23)));
        }
        assert_eq!(got.len(), src.fed.len(), "{mode:?}");
        assert!(got == src.fed, "stream differs ({mode:?})");
        let s = rng.stats();
        assert_eq!(s.bytes_received, src.fed.len() as u64);
        assert_eq!(s.bytes_read, src.fed.len() as u64);
        assert!(s.empty_completions > 0);
        assert_eq!(rng.available(), 0);
    }
}

#[test]
fn a_partly_read_buffer_is_not_reposted() {
    let (mut src, mut rng) = rig(SimMode::Modern, Preference::Auto, RngOptions::default());
    assert_eq!(src.serve(|_, cap| cap), 8);
    let mut buf = [0u8; 100];
    assert_eq!(rng.read(&mut buf).unwrap(), 100);
    // 100 bytes = one whole buffer and part of the next: only the whole one is back.
    assert_eq!(src.sim.pop_chains(REQUEST_QUEUE).len(), 1);
    assert_eq!(rng.available(), 8 * 64 - 100);
    let rest = read_all(&mut rng, 7);
    assert_eq!([&buf[..], &rest].concat(), src.fed);
}

#[test]
fn a_device_that_does_not_write_never_repeats_bytes() {
    let (mut src, mut rng) = rig(SimMode::Modern, Preference::Auto, RngOptions::default());
    src.serve(|_, cap| cap);
    let first = read_all(&mut rng, 64);
    assert_eq!(first, src.fed);
    // The device now claims full buffers without writing them: the driver hands out what
    // the memory holds, which must not be the bytes it already gave away.
    for c in src.sim.pop_chains(REQUEST_QUEUE) {
        src.sim.complete(REQUEST_QUEUE, c.head, c.writable_len());
    }
    let second = read_all(&mut rng, 64);
    assert_eq!(second.len(), 8 * 64);
    assert!(
        second.iter().all(|&b| b == 0),
        "stale bytes handed out again"
    );
}

#[test]
fn hostile_used_elements_are_errors() {
    // (what is wrong, what the device writes in the used ring)
    type Hostile = fn(&Sim, u16);
    let cases: [(&str, Hostile); 3] = [
        ("length beyond the buffer", |sim, head| {
            sim.complete_raw(REQUEST_QUEUE, u32::from(head), 65)
        }),
        ("id beyond the ring", |sim, _| {
            sim.complete_raw(REQUEST_QUEUE, 1000, 4)
        }),
        ("id not in flight", |sim, head| {
            sim.complete_raw(REQUEST_QUEUE, u32::from(head), 4);
            sim.complete_raw(REQUEST_QUEUE, u32::from(head), 4);
        }),
    ];
    for (what, hostile) in cases {
        for (mode, pref) in MODES {
            let (src, mut rng) = rig(mode, pref, RngOptions::default());
            let chains = src.sim.pop_chains(REQUEST_QUEUE);
            hostile(&src.sim, chains[0].head);
            let mut buf = [0u8; 16];
            let first = rng.read(&mut buf);
            assert!(
                matches!(
                    first,
                    Err(Error::UsedLenTooLarge { .. }
                        | Error::UsedIdOutOfRange { .. }
                        | Error::UsedIdNotInFlight { .. })
                ),
                "{what} ({mode:?}): {first:?}"
            );
            // The queue is broken from here on: errors, no bytes.
            let again = rng.read(&mut buf);
            assert!(again.is_err(), "{what} ({mode:?}): {again:?}");
            let r = rng.poll();
            assert!(r.is_err(), "{what} ({mode:?})");
        }
    }
}

#[test]
fn interrupts_deliver_bytes_in_every_mode() {
    for (mode, pref) in MODES {
        for vectors in [None, Some(0u16)] {
            let mut b = SimBuilder::new(mode, DeviceType::Entropy.id())
                .features(if mode == SimMode::Legacy {
                    RING
                } else {
                    RING | V1
                })
                .queues(&[64])
                .memory_len(4 << 20);
            if let Some(v) = vectors {
                b = b.msix_vectors(v);
            }
            let sim = b.build();
            let mut src = Source {
                sim,
                next: 0,
                fed: Vec::new(),
            };
            let mut rng = VirtioRng::new(src.bus(pref), RngOptions::default()).unwrap();
            let mode_now = rng.bus().interrupt_mode();
            src.sim.take_interrupts();
            assert!(!rng.enable_interrupts().unwrap(), "nothing arrived yet");
            src.serve(|_, _| 10);
            let irqs = src.sim.take_interrupts();
            assert!(!irqs.is_empty(), "{mode:?} {mode_now:?}: no interrupt");
            let mut ready = 0;
            for i in irqs {
                let v = match (i, mode_now) {
                    (SimInterrupt::Msix(v), _) => Some(v),
                    (SimInterrupt::Intx, _) => None,
                };
                let r = rng.handle_interrupt(v).unwrap();
                assert!(!r.needs_reset);
                ready = r.bytes_ready;
            }
            assert_eq!(ready, 80, "{mode:?} {mode_now:?}");
            assert_ne!(mode_now, InterruptMode::Polling);
            assert_eq!(read_all(&mut rng, 33), src.fed);
        }
    }
}

/// A buffer returned empty has no bytes for `read` to take, so `read` emptying it never
/// posts it again: `poll` does (as `read` does), or a device that returns every buffer
/// empty is left with none and a caller sleeping for an interrupt never wakes. The
/// interrupt path posts nothing: a device answering at once cannot keep it kicking.
#[test]
fn empty_buffers_are_reposted_at_the_consumers_pace() {
    for (mode, pref) in MODES {
        let (mut src, mut rng) = rig(mode, pref, RngOptions::default());
        let mode_now = rng.bus().interrupt_mode();
        for round in 0..3 {
            src.sim.take_interrupts();
            assert_eq!(
                src.serve(|_, _| 0),
                8,
                "{mode:?} round {round}: buffers posted"
            );
            // The documented consumer: handle the interrupt (or poll, in polling mode),
            // then poll, re-enable interrupts and sleep if nothing is pending. The interrupt
            // path posts nothing (the consumer's pace, not the device's).
            let kicks = src.sim.kicks(REQUEST_QUEUE);
            for irq in src.sim.take_interrupts() {
                assert_eq!(rng.handle_interrupt(irq.vector()).unwrap().bytes_ready, 0);
            }
            assert_eq!(src.sim.kicks(REQUEST_QUEUE), kicks, "{mode:?}: kicked");
            assert_eq!(rng.poll().unwrap(), 0);
            assert!(!rng.enable_interrupts().unwrap(), "{mode:?} {mode_now:?}");
            // Every buffer is posted again without a `read` (the next round serves them).
        }
        assert_eq!(src.sim.pop_chains(REQUEST_QUEUE).len(), 8, "{mode:?}");
        let s = rng.stats();
        assert_eq!(s.empty_completions, 24, "{mode:?}");
    }
}

#[test]
fn shutdown_resets_and_stops() {
    let (mut src, mut rng) = rig(
        SimMode::Transitional,
        Preference::Auto,
        RngOptions::default(),
    );
    src.serve(|_, cap| cap);
    let resets = src.sim.resets();
    rng.shutdown();
    assert!(src.sim.resets() > resets);
    assert_eq!(src.sim.status(), 0);
    let mut buf = [0u8; 8];
    assert_eq!(rng.read(&mut buf), Err(Error::InvalidState));
    assert_eq!(rng.available(), 0);
}

#[test]
fn buffer_options_are_bounded_by_the_queue() {
    let src = Source::new(SimMode::Modern, 4);
    let rng = VirtioRng::new(
        src.bus(Preference::Auto),
        RngOptions {
            buffers: 32,
            buffer_size: 1 << 20,
        },
    )
    .unwrap();
    assert_eq!(rng.buffers(), 4);
    let chains = src.sim.pop_chains(REQUEST_QUEUE);
    assert_eq!(chains.len(), 4);
    assert!(chains.iter().all(|c| c.writable_len() == 1 << 16));
}
