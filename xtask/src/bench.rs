//! `cargo xtask bench blk [--ms MS]`: the block benchmark.
//!
//! Three QEMU sessions (q35, modern virtio-blk-pci on a `null-co` drive, `ioeventfd=off`),
//! each running 4 KiB random reads at depth 1 and 32, then 64 KiB sequential reads, for
//! `MS` ms per phase (default 2000):
//! - our driver (`bench-blk`) with MSI-X, and with INTx;
//! - the `virtio-drivers` crate's `VirtIOBlk` (`bench-blk-vd`), which has no MSI-X
//!   support (INTx) and one 16-entry queue (so "depth 32" is depth 16 there).
//!
//! Per phase: IOPS (guest clock), kicks and interrupts per request. QEMU's trace
//! (`virtio_queue_notify`, `virtio_notify`, `virtio_blk_req_complete`) is split per phase
//! by the guest's markers and cross-checked against the guest's own counters: QEMU must
//! have completed exactly the requests the guest counted, seen exactly the kicks our
//! driver counted, and sent at least the interrupts the guest took.

use virtio_tests::qemu::{self, IrqMode, Machine, RunConfig, RunReport, Transport};

struct Phase {
    name: &'static str,
    depth: u64,
    reqs: u64,
    ns: u64,
    /// Our driver's own counters (virtio-drivers keeps none).
    guest_kicks: Option<u64>,
    guest_irqs: u64,
    qemu_kicks: u64,
    qemu_irqs: u64,
    qemu_completions: u64,
}

impl Phase {
    fn iops(&self) -> f64 {
        self.reqs as f64 * 1e9 / self.ns.max(1) as f64
    }
    fn per(&self, n: u64) -> f64 {
        n as f64 / self.reqs.max(1) as f64
    }
}

struct Session {
    driver: &'static str,
    irq: IrqMode,
    phases: Vec<Phase>,
}

fn phases(r: &RunReport) -> Result<Vec<Phase>, String> {
    let get = |k: String| {
        r.stat_u64(&k)
            .ok_or_else(|| format!("missing stat {k}\n{}", r.summary()))
    };
    qemu::blk_host::PHASES
        .iter()
        .map(|&name| {
            Ok(Phase {
                name,
                depth: get(format!("bench.{name}.depth"))?,
                reqs: get(format!("bench.{name}.reqs"))?,
                ns: get(format!("bench.{name}.ns"))?,
                guest_kicks: r.stat_u64(&format!("bench.{name}.kicks")),
                guest_irqs: get(format!("bench.{name}.irqs"))?,
                qemu_kicks: get(format!("host.bench.{name}.kicks"))?,
                qemu_irqs: get(format!("host.bench.{name}.interrupts"))?,
                qemu_completions: get(format!("host.bench.{name}.completions"))?,
            })
        })
        .collect()
}

pub fn bench_blk(ms: u64) -> Result<bool, String> {
    let runs = [
        ("virtio-blk (ours)", "bench-blk", IrqMode::Msix),
        ("virtio-blk (ours)", "bench-blk", IrqMode::Intx),
        ("virtio-drivers 0.13", "bench-blk-vd", IrqMode::Intx),
    ];
    let mut sessions = Vec::new();
    let mut ok = true;
    for (driver, scenario, irq) in runs {
        let mut cfg = RunConfig::new(scenario)
            .machine(Machine::Q35)
            .transport(Transport::Modern)
            .irq(irq)
            .guest_arg(format!("bench_ms={ms}"));
        cfg.install_missing = true;
        cfg.timeout = Some(std::time::Duration::from_secs(60 + 3 * ms / 1000 * 4));
        eprintln!("xtask: {driver}, {irq}: {scenario} ({ms} ms per phase)...");
        let report = qemu::run_scenario(&cfg).map_err(|e| e.to_string())?;
        if !report.passed() {
            print!("{}", report.summary());
            ok = false;
            continue;
        }
        sessions.push(Session {
            driver,
            irq,
            phases: phases(&report)?,
        });
    }

    println!(
        "\nvirtio-blk on QEMU 7.2 (TCG, q35, modern, null-co 1 GiB, ioeventfd=off), {ms} ms per phase"
    );
    println!(
        "kicks = QEMU virtio_queue_notify, irq sent = QEMU virtio_notify, irq taken = guest \
         handler runs; all per request\n"
    );
    println!(
        "| driver              | irq  | phase       | depth |    IOPS | kicks/req | irq sent/req | irq taken/req | cross-check |"
    );
    println!(
        "|---------------------|------|-------------|------:|--------:|----------:|-------------:|--------------:|-------------|"
    );
    for s in &sessions {
        for p in &s.phases {
            let mut notes = Vec::new();
            if p.qemu_completions != p.reqs {
                notes.push(format!(
                    "QEMU completed {} != {}",
                    p.qemu_completions, p.reqs
                ));
            }
            if let Some(k) = p.guest_kicks
                && k != p.qemu_kicks
            {
                notes.push(format!("guest kicks {k} != QEMU {}", p.qemu_kicks));
            }
            if p.guest_irqs > p.qemu_irqs {
                notes.push(format!("taken {} > sent {}", p.guest_irqs, p.qemu_irqs));
            }
            ok &= notes.is_empty();
            println!(
                "| {:19} | {:4} | {:11} | {:5} | {:7.0} | {:9.3} | {:12.3} | {:13.3} | {} |",
                s.driver,
                s.irq.name(),
                p.name,
                p.depth,
                p.iops(),
                p.per(p.qemu_kicks),
                p.per(p.qemu_irqs),
                p.per(p.guest_irqs),
                if notes.is_empty() {
                    "ok".to_string()
                } else {
                    notes.join("; ")
                }
            );
        }
    }

    if let Some(vd) = sessions
        .iter()
        .find(|s| s.driver.starts_with("virtio-drivers"))
    {
        println!(
            "\nratios ours / virtio-drivers (IOPS: higher is better; kicks, irqs: lower is better)\n"
        );
        println!("| ours irq | phase       | IOPS  | kicks/req | irq sent/req |");
        println!("|----------|-------------|------:|----------:|-------------:|");
        for s in sessions.iter().filter(|s| s.driver.contains("ours")) {
            for (p, v) in s.phases.iter().zip(&vd.phases) {
                let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
                println!(
                    "| {:8} | {:11} | {:5.2} | {:9.3} | {:12.3} |",
                    s.irq.name(),
                    p.name,
                    ratio(p.iops(), v.iops()),
                    ratio(p.per(p.qemu_kicks), v.per(v.qemu_kicks)),
                    ratio(p.per(p.qemu_irqs), v.per(v.qemu_irqs)),
                );
            }
        }
        println!(
            "\nvirtio-drivers: one 16-entry queue, so its \"depth 32\" phase runs at depth {}; \
             it notifies per request (read_blocks_nb) when the device asks, and takes INTx only.",
            vd.phases.get(1).map_or(0, |p| p.depth)
        );
    }
    // At depth 32 our driver batches: one kick per batch and EVENT_IDX interrupts.
    for s in sessions.iter().filter(|s| s.driver.contains("ours")) {
        if let Some(p) = s.phases.iter().find(|p| p.depth == 32) {
            let per = p.per(p.qemu_kicks) + p.per(p.qemu_irqs);
            if per >= 0.5 {
                println!(
                    "FAIL: {} {}: {per:.3} kicks+interrupts per request at depth 32",
                    s.driver, s.irq
                );
                ok = false;
            }
        }
    }
    println!(
        "bench blk: {} ({} of 3 runs measured; each run's checks and the batching bound at \
         depth 32)",
        if ok { "PASS" } else { "FAIL" },
        sessions.len()
    );
    Ok(ok)
}
