//! Scenarios: one module each, listed in [`SCENARIOS`]. A scenario gets an [`Env`] (the
//! command line, the chipset and the enumerated PCI functions), prints `CHECK`/`STAT`
//! lines through `crate::report` / `crate::check!`, and returns; `run` then prints `DONE`
//! and exits (success iff every check passed).
//!
//! Adding a scenario: write `scenarios/<name>.rs` with `pub fn run(env: &mut Env)` and add
//! `mod <name>;` and a row to `SCENARIOS`; the host side (QEMU arguments, host checks) is
//! `tests/src/qemu/devices/<name>.rs` (see `docs/adding-a-device-type.md`).

mod balloon;
mod blk;
mod boot;
pub mod bus;
mod console;
mod fs;
mod net;
mod net_vd;
mod rng;
mod selftest;
mod smoke;
mod vd;

use crate::cmdline::{Cmdline, IrqMode};
use crate::pci::{Chipset, PciFunction};
use crate::platform::{GuestDma, PciBars, PciConfig, PciInterrupts};
use crate::report;
use alloc::vec::Vec;
use virtio_core::DeviceType;
use virtio_core::platform::{InterruptMode, InterruptPlatform};

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&mut Env),
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot",
        about: "enumerate PCI, list virtio functions, self-test timer/IPI/IOAPIC/MSI-X/INTx delivery",
        run: boot::run,
    },
    Scenario {
        name: "smoke",
        about: "every device to DRIVER_OK with all queues via virtio-pci + virtio-core; one interrupt-completed round trip each",
        run: smoke::run,
    },
    Scenario {
        name: "net",
        about: "virtio-net under smoltcp: DHCP, 64 MiB each way over TCP with the host peer, link down/up via QMP",
        run: net::run,
    },
    Scenario {
        name: "net-tap",
        about: "the net transfer over a tap with a vnet header in a network namespace: static addresses, TSO and checksum offloads both ways (net_offload=all|notso|none)",
        run: net::run,
    },
    Scenario {
        name: "net-vd",
        about: "the net scenario's smoltcp stack, DHCP and TCP transfer over the virtio-drivers crate's VirtIONet (polled)",
        run: net_vd::run,
    },
    Scenario {
        name: "net-vd-tap",
        about: "net-vd over net-tap's tap with a vnet header in a network namespace: static addresses, no offloads (the crate negotiates none)",
        run: net_vd::run,
    },
    Scenario {
        name: "blk",
        about: "virtio-blk driver: pattern over the disk (split requests), flush, verify; discard/write-zeroes; GET_ID; blk_test=ro|fault|durable",
        run: blk::run,
    },
    Scenario {
        name: "bench-blk",
        about: "virtio-blk driver benchmark: 4 KiB random reads at depth 1/32, 64 KiB sequential reads, 16 KiB-1 MiB scatter-gather reads",
        run: blk::bench,
    },
    Scenario {
        name: "bench-blk-vd",
        about: "the same benchmark through the virtio-drivers crate's VirtIOBlk (no scatter-gather phases: it has no scatter-gather API)",
        run: blk::bench_vd,
    },
    Scenario {
        name: "console",
        about: "virtio-console driver: emergency write before DRIVER_OK, ConsoleLogger tee, port 0 + two named ports with a host peer (lines, echo, bulk both ways, host close/reopen)",
        run: console::run,
    },
    Scenario {
        name: "balloon",
        about: "virtio-balloon driver over a heap page pool: QMP targets up and down, stats via qom-get, balloon_test=oom (deflate_for_oom) | report (free page reporting); page accounting",
        run: balloon::run,
    },
    Scenario {
        name: "fs",
        about: "virtio-fs driver against virtiofsd (vhost-user-fs): FUSE_INIT, host files read (UTF-8 names, a file by hash), write, mkdir/rmdir, rename, unlink, link, symlink, setattr, statfs, xattrs, fallocate/lseek, readdirplus of 10,000 entries; the host checks its directory",
        run: fs::run,
    },
    Scenario {
        name: "bench-fs",
        about: "virtio-fs benchmark beside virtio-blk: sequential write/read of the same bytes in max_write-sized requests; create, getattr, unlink of small files; a 4 KiB write + read per op on blk",
        run: fs::bench,
    },
    Scenario {
        name: "rng",
        about: "virtio-rng driver: bytes from a host file through QEMU's rate limiter, read in order and printed for the host to compare",
        run: rng::run,
    },
    Scenario {
        name: "panic",
        about: "harness self-test: panics",
        run: selftest::panic,
    },
    Scenario {
        name: "fault",
        about: "harness self-test: page fault",
        run: selftest::fault,
    },
    Scenario {
        name: "hang",
        about: "harness self-test: never finishes",
        run: selftest::hang,
    },
];

/// Everything a scenario starts from.
pub struct Env {
    pub cmdline: Cmdline,
    pub irq: IrqMode,
    pub chipset: Chipset,
    pub pci: Vec<PciFunction>,
}

/// Platform handles for one PCI function, ready for `virtio-pci`.
#[allow(dead_code)] // `func`/`dma` are for the device scenarios
pub struct Device {
    pub func: PciFunction,
    pub config: PciConfig,
    pub bars: PciBars,
    pub irq: PciInterrupts,
    pub dma: GuestDma,
}

impl Env {
    pub fn virtio_functions(&self) -> impl Iterator<Item = &PciFunction> {
        self.pci.iter().filter(|f| f.is_virtio())
    }

    /// First virtio function of device type `ty`.
    pub fn find_virtio(&self, ty: DeviceType) -> Option<&PciFunction> {
        self.virtio_functions()
            .find(|f| f.virtio_type().map(u32::from) == Some(ty.id()))
    }

    /// Enables decoding and bus mastering, maps the BARs, and returns the platform
    /// handles. Interrupts stay off until [`Env::enable_irq`] (or the transport) asks.
    ///
    /// The interrupt platform is limited to the run's `irq=` mode, so a transport's
    /// MSI-X → INTx → polling fallback lands on the mode under test.
    pub fn open(&self, func: &PciFunction) -> Device {
        func.enable();
        let mut irq = PciInterrupts::new(func, self.chipset);
        irq.set_limit(self.irq);
        Device {
            func: func.clone(),
            config: func.config(),
            bars: func.bar_access(),
            irq,
            dma: GuestDma,
        }
    }

    #[allow(dead_code)] // API for the device scenarios
    /// Enables interrupts per the command line's `irq=` mode: MSI-X with `vectors`
    /// vectors (falling back to INTx if the function has none), INTx, or none for `poll`.
    pub fn enable_irq(&self, irq: &mut PciInterrupts, vectors: u16) -> InterruptMode {
        match self.irq {
            IrqMode::MsiX if irq.enable_msix(vectors) => {}
            IrqMode::MsiX | IrqMode::Intx => {
                irq.enable_intx();
            }
            IrqMode::Poll => {}
        }
        irq.mode()
    }
}

/// Prints the per-function interrupt counters as `STAT <name>.irq[.<index>]=<n>`.
pub fn irq_stats(name: &str, irq: &PciInterrupts) {
    match irq.mode() {
        InterruptMode::MsiX { vectors } => {
            for i in 0..vectors {
                report::stat(&alloc::format!("{name}.irq.msix{i}"), irq.count(i));
            }
        }
        InterruptMode::Intx => report::stat(
            &alloc::format!("{name}.irq.intx"),
            irq.count(crate::platform::INTX_INDEX),
        ),
        InterruptMode::Polling => {}
    }
    report::stat(&alloc::format!("{name}.irq"), irq.total());
}

/// The per-device counters every device scenario prints, in one place so the runner
/// finds the same keys everywhere: `STAT <name>.kicks`, `.completions` (from the bus
/// statistics) and `.irq` (from the interrupt handlers' counters).
#[allow(dead_code)] // API for the device scenarios
pub fn device_stats(name: &str, kicks: u64, completions: u64, irq: &PciInterrupts) {
    report::stat(&alloc::format!("{name}.kicks"), kicks);
    report::stat(&alloc::format!("{name}.completions"), completions);
    irq_stats(name, irq);
}

pub fn run(cmdline: Cmdline) -> ! {
    let chipset = Chipset::detect();
    let pci = crate::pci::enumerate();
    let irq = cmdline.irq;
    let Some(scenario) = SCENARIOS.iter().find(|s| s.name == cmdline.scenario) else {
        crate::println!("FATAL: unknown scenario {:?}; known:", cmdline.scenario);
        for s in SCENARIOS {
            crate::println!("  {:10} {}", s.name, s.about);
        }
        crate::exit::exit(crate::exit::ExitCode::Usage)
    };
    crate::println!(
        "SCENARIO {} machine={} irq={}",
        scenario.name,
        chipset.name(),
        irq.name()
    );
    let mut env = Env {
        cmdline,
        irq,
        chipset,
        pci,
    };
    (scenario.run)(&mut env);
    let (used, free) = crate::heap::usage();
    report::stat("heap.used", used);
    report::stat("heap.free", free);
    for (v, n) in crate::interrupts::nonzero_counts() {
        report::stat(&alloc::format!("vector.{v:#04x}"), n);
    }
    report::done()
}
