//! Bare-metal x86_64 test guest for the virtio stack.
//!
//! Booted by `qemu-system-x86_64 -kernel guest.elf` through PVH (see `boot.rs`). Reads
//! `scenario=<name> irq=msix|intx|poll ...` from the command line, runs the scenario
//! against the real QEMU devices, prints `CHECK`/`STAT`/`DONE` lines on COM1 (see
//! `report.rs`) and exits through `isa-debug-exit` (see `exit.rs`).
#![no_std]
#![no_main]

extern crate alloc;

mod apic;
mod arch;
mod boot;
mod cmdline;
mod exit;
mod heap;
mod interrupts;
mod paging;
mod pci;
mod phase_marker;
mod platform;
mod pvh;
mod report;
mod scenarios;
mod serial;
mod time;

use cmdline::{Cmdline, IrqMode};
use exit::{ExitCode, exit};

/// Called by the entry code in long mode, on the boot stack, interrupts disabled.
extern "C" fn rust_entry(start_info: u32) -> ! {
    serial::init();
    println!(
        "virtio-test-guest {}: PVH entry, start_info at {:#x}",
        env!("CARGO_PKG_VERSION"),
        start_info
    );
    // SAFETY: start_info is %ebx from the PVH entry; nothing has been allocated yet.
    let boot = match unsafe { pvh::read(u64::from(start_info)) } {
        Ok(b) => b,
        Err(e) => {
            println!("FATAL: bad PVH start info: {e:?}");
            exit(ExitCode::Usage)
        }
    };
    let Some((heap_start, heap_size)) = heap::init(boot.memmap()) else {
        println!("FATAL: no usable RAM for the heap in the memory map");
        exit(ExitCode::Usage)
    };
    interrupts::init();
    let cmdline = match Cmdline::parse(boot.cmdline()) {
        Ok(c) => c,
        Err(e) => {
            println!("FATAL: command line {:?}: {e}", boot.cmdline());
            exit(ExitCode::Usage)
        }
    };
    let level = match cmdline.get("log").unwrap_or("info") {
        "trace" => log::LevelFilter::Trace,
        "debug" => log::LevelFilter::Debug,
        "warn" => log::LevelFilter::Warn,
        "error" => log::LevelFilter::Error,
        "off" => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    serial::init_logger(level);
    println!("cmdline: {}", boot.cmdline());
    for e in boot.memmap() {
        log::debug!("memmap {:#012x}+{:#012x} type {}", e.addr, e.size, e.kind);
    }
    println!(
        "heap: {:#x}+{:#x} ({} MiB)",
        heap_start,
        heap_size,
        heap_size >> 20
    );

    let tsc_hz = time::calibrate(20);
    apic::init();
    arch::enable_interrupts();
    if cmdline.irq == IrqMode::Poll {
        time::set_polling(true);
    } else {
        time::start_tick();
    }
    println!(
        "tsc: {} MHz, lapic id {} version {:#x}, irq mode {}",
        tsc_hz / 1_000_000,
        apic::id(),
        apic::version(),
        cmdline.irq.name()
    );
    scenarios::run(cmdline)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    arch::disable_interrupts();
    serial::enter_emergency();
    // One line, so the runner's `PANIC` capture holds the message and the location.
    match info.location() {
        Some(l) => println!(
            "PANIC: {} at {}:{}:{}",
            info.message(),
            l.file(),
            l.line(),
            l.column()
        ),
        None => println!("PANIC: {}", info.message()),
    }
    exit(ExitCode::Panic)
}
