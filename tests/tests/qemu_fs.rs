//! End to end: the `fs` scenario — the virtio-fs driver (`virtio_fs::FsDriver` over
//! `virtio-pci` + `virtio-core`) in the bare-metal guest against QEMU's vhost-user-fs-pci
//! and the real host daemon, virtiofsd, sharing a temporary directory
//! (`tests/guest/src/scenarios/fs.rs`, `tests/src/qemu/devices/fs.rs`) — on q35 and pc in
//! every interrupt mode. vhost-user-fs-pci is modern-only, so the transport axis of the
//! other matrices does not apply.
//!
//! The guest reads host files (UTF-8 names, 64 MiB by hash), writes 64 MiB, and changes
//! the directory (mkdir/rmdir, rename, unlink, link, symlink, setattr of size, mode and
//! times, xattrs, fallocate + lseek, readdirplus of 10,000 entries); the host checks every
//! effect in its directory (`host.fs.*`). The host also rewrites a file while the guest
//! runs, and the guest sees the new size and content once the attribute timeout the
//! daemon granted expired (`fs.host_change`).
//!
//! Needs virtiofsd (`.ci/run` installs it with `cargo install virtiofsd`); without it
//! each test says so and passes without running.

use virtio_tests::qemu::devices::fs::find_virtiofsd;
use virtio_tests::qemu::{IrqMode, Machine, RunConfig, Transport, run_scenario};

const CHECKS: &[&str] = &[
    "fs.init",
    "fs.read.hello",
    "fs.read.utf8_name",
    "fs.read.data",
    "fs.write",
    "fs.mkdir_rmdir",
    "fs.rename_unlink",
    "fs.link",
    "fs.symlink",
    "fs.setattr",
    "fs.setattr_times",
    "fs.statfs",
    "fs.xattr",
    "fs.readdirplus",
    "fs.host_change",
    "fs.destroy",
    "fs.clean",
    "host.fs.written",
    "host.fs.dirs",
    "host.fs.rename",
    "host.fs.unlink",
    "host.fs.link",
    "host.fs.symlink",
    "host.fs.setattr",
    "host.fs.setattr_times",
    "host.fs.host_change",
    "host.fs.xattr",
    "host.fs.untouched",
    "host.fs.daemon",
];

fn run(machine: Machine, irq: IrqMode) {
    if find_virtiofsd().is_none() {
        eprintln!(
            "SKIPPED: virtiofsd not found ($VIRTIOFSD, /usr/libexec/virtiofsd, PATH, \
             ~/.cargo/bin): `cargo install virtiofsd` (with libcap-ng-dev and \
             libseccomp-dev) or let .ci/run install it"
        );
        return;
    }
    let cfg = RunConfig::new("fs")
        .machine(machine)
        .transport(Transport::Modern)
        .irq(irq);
    let r = run_scenario(&cfg)
        .unwrap_or_else(|e| panic!("{} [{}]: {e}", cfg.scenario, cfg.config_name()));
    let s = r.summary();
    println!("{s}");
    assert!(r.passed(), "{s}");
    // How long the guest took to see the host's change is reported.
    assert!(
        r.stat_u64("fs.host_change_ms").is_some(),
        "no fs.host_change_ms\n{s}"
    );
    for c in CHECKS {
        assert!(r.check(c).is_some_and(|c| c.passed), "{c} missing\n{s}");
    }
    if irq != IrqMode::Poll {
        assert!(
            r.stat_u64("fs.irq").is_some_and(|n| n > 0),
            "no interrupts taken\n{s}"
        );
    }
}

#[test]
fn q35_msix() {
    run(Machine::Q35, IrqMode::Msix);
}

#[test]
fn q35_intx() {
    run(Machine::Q35, IrqMode::Intx);
}

#[test]
fn q35_poll() {
    run(Machine::Q35, IrqMode::Poll);
}

#[test]
fn pc_msix() {
    run(Machine::Pc, IrqMode::Msix);
}

#[test]
fn pc_intx() {
    run(Machine::Pc, IrqMode::Intx);
}

#[test]
fn pc_poll() {
    run(Machine::Pc, IrqMode::Poll);
}
