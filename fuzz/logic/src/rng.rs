//! virtio-rng over the simulated function with a device side the fuzzer drives: buffers
//! filled from a known byte stream with any used length (zero, short, exactly the buffer,
//! larger than the buffer), forged and repeated used ids, floods (every buffer completed as
//! soon as it is notified), NEEDS_RESET; any ring size, buffer count and buffer size,
//! INDIRECT_DESC and EVENT_IDX on or off, the split or the packed ring; the driver reads into buffers of any size, polls,
//! takes interrupts and re-enables them.
//!
//! Oracles: `read` copies at most the caller's buffer; the bytes ready never exceed the
//! buffers the driver posted, and no completion counts more bytes than its buffer holds;
//! while the device is honest the bytes read are exactly the device's stream, in order,
//! nothing lost or repeated; one call notifies the device a bounded number of times even
//! while it floods; after `shutdown` and drop, guest memory is back to what it was.

use std::sync::{Arc, Mutex};

use virtio_core::DeviceType;
use virtio_pci::Preference;
use virtio_rng::{REQUEST_QUEUE, RngOptions, VirtioRng};
use virtio_tests::sim::{MODES, Sim, SimBuilder, SimInterrupt, SimMode};

use crate::FloodCount;
use crate::input::Input;

/// What the flood bound's failure says the driver did too often.
const FLOOD: &str = "answered the flood";

const MAX_STEPS: usize = 256;

/// The device's byte stream: byte `i` is `i mod 251`.
#[derive(Default)]
pub(crate) struct Stream {
    /// Bytes produced so far.
    pub(crate) next: u64,
    /// Whether the device only ever completed buffers it filled, with their true length.
    pub(crate) honest: bool,
    /// Flooding: complete every notified buffer with this length (capped, or not).
    pub(crate) flood: Option<(u32, bool)>,
}

impl Stream {
    /// Fills `chain` with up to `want` bytes of the stream; returns the bytes written.
    pub(crate) fn fill(&mut self, sim: &Sim, chain: &virtio_tests::sim::Chain, want: u32) -> u32 {
        let n = want.min(chain.writable_len());
        let bytes: Vec<u8> = (0..u64::from(n))
            .map(|i| ((self.next + i) % 251) as u8)
            .collect();
        let written = sim.write_chain(chain, &bytes);
        self.next += u64::from(written);
        written
    }

    /// Serves every posted buffer: `len` bytes each; `overstate` completes with `len` even
    /// when the buffer is smaller (a used length larger than the buffer).
    pub(crate) fn serve(&mut self, sim: &Sim, len: u32, overstate: bool) -> usize {
        let chains = sim.pop_chains(REQUEST_QUEUE);
        for c in &chains {
            let written = self.fill(sim, c, len);
            let used = if overstate { len } else { written };
            if used != written {
                self.honest = false;
            }
            sim.complete(REQUEST_QUEUE, c.head, used);
        }
        if !chains.is_empty() {
            sim.signal_used(REQUEST_QUEUE);
        }
        chains.len()
    }
}

/// Decodes the device (transport, ring features, queue size) and builds it; shared with
/// the `kext` target. Returns the function, the transport preference and the queue size.
pub(crate) fn setup(input: &mut Input) -> (Sim, Preference, u16) {
    let (mode, preference) = MODES[usize::from(input.u8() % 4)];
    let choice = input.u8();
    let generic = (u64::from(choice & 3) << 28) | crate::packed_if(choice & 4 != 0);
    let features = if mode == SimMode::Legacy {
        generic
    } else {
        generic | 1 << 32
    };
    let queue_size = 1u16 << (input.u8() % 7);
    let sim = SimBuilder::new(mode, DeviceType::Entropy.id())
        .features(features)
        .queues(&[queue_size])
        .memory(crate::mem::guest_memory(2 << 20))
        .build();
    (sim, preference, queue_size)
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (sim, preference, _) = setup(&mut input);
    let opts = RngOptions {
        buffers: 1 + u16::from(input.u8() % 16),
        buffer_size: match input.u8() % 4 {
            0 => 1 + u32::from(input.u8()),
            1 => 1 << (input.u8() % 17),
            _ => 64,
        },
    };
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(device) = crate::sim_device(&sim, preference) else {
        return;
    };
    let Ok(mut rng) = VirtioRng::new(device, opts) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let buffer_size = opts.buffer_size.clamp(1, 1 << 16);
    let posted_bytes = rng.buffers() * buffer_size as usize;

    let stream = Arc::new(Mutex::new(Stream {
        honest: true,
        ..Stream::default()
    }));
    let answered = FloodCount::default();
    {
        let (stream, answered) = (Arc::clone(&stream), answered.clone());
        sim.on_notify(Some(Arc::new(move |sim: &Sim, queue: u16| {
            let Ok(mut s) = stream.lock() else { return };
            if let Some((len, overstate)) = s.flood
                && queue == REQUEST_QUEUE
                && answered.answer()
            {
                s.serve(sim, len, overstate);
            }
        })));
    }
    // Bytes read so far (to check them against the stream while the device is honest).
    let mut read_total = 0u64;

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        answered.start();
        let before = rng.stats();
        match input.u8() % 12 {
            0..=2 => {
                let len = match input.u8() % 4 {
                    0 => 0,
                    1 => input.u32(),
                    _ => u32::from(input.u16() % 512),
                };
                let overstate = input.u8().is_multiple_of(4);
                if let Ok(mut s) = stream.lock() {
                    s.serve(&sim, len, overstate);
                }
            }
            3..=5 => {
                let mut out = vec![0u8; usize::from(input.u16() % 2048)];
                if let Ok(n) = rng.read(&mut out) {
                    assert!(n <= out.len(), "read past the caller's buffer");
                    if let Ok(s) = stream.lock()
                        && s.honest
                    {
                        for (i, &b) in out[..n].iter().enumerate() {
                            assert_eq!(
                                u64::from(b),
                                (read_total + i as u64) % 251,
                                "byte {} of the stream lost, repeated or reordered",
                                read_total + i as u64
                            );
                        }
                    }
                    read_total += n as u64;
                }
            }
            6 => {
                if let Ok(n) = rng.poll() {
                    assert!(n <= posted_bytes, "{n} bytes ready, {posted_bytes} posted");
                }
            }
            7 => {
                for irq in sim.take_interrupts() {
                    // One `handle_interrupt` call per queued interrupt (it collects, and
                    // posts and notifies nothing): the flood bound holds per call, as in
                    // `balloon`.
                    let vector = match irq {
                        SimInterrupt::Msix(v) => Some(v),
                        SimInterrupt::Intx => None,
                    };
                    if let Ok(i) = answered.per_call(FLOOD, || rng.handle_interrupt(vector)) {
                        assert!(i.bytes_ready <= posted_bytes);
                    }
                }
                let _ = rng.enable_interrupts();
            }
            8 => {
                // A forged or repeated used element.
                if let Ok(mut s) = stream.lock() {
                    s.honest = false;
                }
                let id = match input.u8() % 3 {
                    0 => input.u32(),
                    _ => u32::from(input.u8() % 32),
                };
                if sim.queue_info(REQUEST_QUEUE).is_some_and(|q| q.ready) {
                    sim.complete_raw(REQUEST_QUEUE, id, input.u32() % (2 * buffer_size + 2));
                    sim.signal_used(REQUEST_QUEUE);
                }
            }
            9 => {
                if let Ok(mut s) = stream.lock() {
                    s.flood = match input.u8() % 3 {
                        0 => None,
                        _ => Some((
                            input.u32() % (buffer_size + 2),
                            input.u8().is_multiple_of(4),
                        )),
                    };
                }
            }
            10 => sim.trigger_needs_reset(),
            _ => {
                // Buffers completed without a byte written but with a used length.
                if let Ok(mut s) = stream.lock() {
                    s.honest = false;
                }
                let len = input.u32() % (buffer_size + 1);
                for c in sim.pop_chains(REQUEST_QUEUE) {
                    sim.complete(REQUEST_QUEUE, c.head, len);
                }
                sim.signal_used(REQUEST_QUEUE);
            }
        }
        let after = rng.stats();
        assert!(
            after.bytes_received - before.bytes_received
                <= (after.completions - before.completions) * u64::from(buffer_size),
            "a completion counted more bytes than its buffer holds"
        );
        assert!(rng.available() <= posted_bytes);
        answered.check(FLOOD);
    }

    sim.on_notify(None);
    rng.shutdown();
    drop(rng);
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}
