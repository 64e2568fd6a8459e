//! virtio-fs: QEMU's vhost-user-fs-pci backed by the real host daemon, virtiofsd, sharing
//! a temporary directory of the run. The `fs` scenario's host hook ([`start`]) fills the
//! directory, starts virtiofsd on a socket in the run directory and gives QEMU the
//! device — with the guest's memory as a shared memfd, which vhost-user needs (the daemon
//! maps guest memory to reach the buffers) — and afterwards checks every effect the
//! guest had on the directory (`host.fs.*`). While the guest runs, a thread of the hook
//! rewrites [`CHANGE_NAME`] as soon as the guest prints [`CHANGE_MARKER`] (the serial log
//! is polled, as the other host peers do): the guest's `fs.host_change` shows that it
//! sees the change once the attribute timeout the daemon granted expired.
//!
//! vhost-user-fs-pci is a modern-only virtio device (no legacy interface, no
//! `disable-legacy`/`ioeventfd` properties), so the transport of a run does not change
//! it. Its queues are served by the daemon through eventfds: QEMU's
//! `virtio_queue_notify`/`virtio_notify` trace never sees them, so the scenario records
//! no trace.
//!
//! virtiofsd is found by [`find_virtiofsd`]: `$VIRTIOFSD`, Debian's
//! `/usr/libexec/virtiofsd`, `virtiofsd` on `PATH`, then `~/.cargo/bin/virtiofsd`
//! (`cargo install virtiofsd`, what `.ci/run` does: Debian 12 has no virtiofsd package).
//! Not QEMU 7.2's own `/usr/lib/qemu/virtiofsd`: that is the deprecated C daemon, with
//! another command line (`-o source=`).

use super::{Attach, DeviceFiles, DeviceSpec, ScenarioSpec};
use crate::qemu::{Check, HostContext, HostOutcome, HostSide, Machine};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use virtio_core::DeviceType;

pub const DEVICE: DeviceSpec = DeviceSpec {
    device_type: DeviceType::Fs,
    attach,
    scenarios: &[
        ScenarioSpec {
            name: "fs",
            devices: &[],
            trace: false,
            timeout_secs: 120,
            host: Some(start),
        },
        // The benchmark: the device and virtio-blk on an image of the benchmark's size.
        // Traced for its phase markers (the block device's events come along).
        ScenarioSpec {
            name: "bench-fs",
            devices: &[],
            trace: true,
            timeout_secs: 900,
            host: Some(start_bench),
        },
    ],
};

/// The tag the device advertises (QEMU's `tag=`).
pub const TAG: &str = "hostshare";
/// Host files the guest reads (same constants in `tests/guest/src/scenarios/fs.rs`).
pub const HELLO_NAME: &str = "hello.txt";
pub const HELLO_TEXT: &str = "hello from the host\n";
pub const UTF8_NAME: &str = "name with spaces ü ✓.txt";
pub const UTF8_TEXT: &str = "grüße aus dem host ✓\n";
pub const DATA_NAME: &str = "data.bin";
pub const DATA_SEED: u64 = 0x5EED;
pub const MANY_DIR: &str = "many";
pub const MANY_COUNT: usize = 10_000;
/// What the guest creates or changes.
pub const WRITTEN_NAME: &str = "guest-written.bin";
pub const KEPT_DIR: &str = "guest-dir";
pub const TEMP_DIR: &str = "guest-temp-dir";
pub const RENAME_FROM: &str = "to-rename.txt";
pub const RENAME_TO: &str = "renamed by guest ✓.txt";
pub const RENAME_TEXT: &str = "renamed by the guest\n";
pub const UNLINK_NAME: &str = "to-unlink.txt";
pub const LINK_NAME: &str = "hello-hardlink.txt";
pub const SYMLINK_NAME: &str = "guest-symlink";
pub const ATTR_NAME: &str = "guest-attr.txt";
/// The times the guest gives `ATTR_NAME` (seconds, nanoseconds).
pub const ATTR_ATIME: (i64, i64) = (1_500_000_000, 250_000_000);
pub const ATTR_MTIME: (i64, i64) = (1_234_567_890, 123_456_789);
/// The file the host rewrites while the guest runs, after the guest's marker line.
pub const CHANGE_NAME: &str = "host-changed.txt";
pub const CHANGE_OLD: &str = "before the host's change\n";
pub const CHANGE_NEW: &str = "after the host's change: new content, longer than before\n";
pub const CHANGE_MARKER: &str = "STAT fs.phase=host-change";
pub const XATTR_FILE: &str = "guest-xattr.txt";
pub const XATTR_NAME: &str = "user.virtio-darwin";
pub const XATTR_VALUE: &str = "set by the guest ✓";
pub const XATTR_GONE: &str = "user.removed";
pub const FALLOCATE_LEN: u64 = 1 << 20;
/// Bytes of `data.bin` (read by the guest) and of the file the guest writes.
pub const READ_LEN: u64 = 64 << 20;
pub const WRITE_LEN: u64 = 64 << 20;

/// FNV-1a 64 (the guest's hash).
pub fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Byte `i` of the seeded pattern (the guest's `pattern_byte`).
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    let x = ((i / 8) ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> ((i % 8) * 8)) as u8
}

pub fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| pattern_byte(seed, i)).collect()
}

/// What `virtiofsd`'s build links (`.ci/run` installs the same).
const VIRTIOFSD_BUILD_PACKAGES: [&str; 3] = ["libcap-ng-dev", "libseccomp-dev", "pkg-config"];

/// The virtiofsd binary; when this machine has none and `install` is set, installs it as
/// root on Debian the way `.ci/run` does (its build packages, then
/// `cargo install --locked virtiofsd`: Debian 12 packages none). Otherwise the error says
/// how to install it.
pub fn ensure_virtiofsd(install: bool) -> Result<PathBuf, String> {
    if let Some(p) = find_virtiofsd() {
        return Ok(p);
    }
    let how = format!(
        "virtiofsd not found ($VIRTIOFSD, /usr/libexec/virtiofsd, PATH, ~/.cargo/bin); install \
         it with:\n  {} && cargo install --locked virtiofsd",
        crate::qemu::toolchain::apt_command(&VIRTIOFSD_BUILD_PACKAGES)
    );
    if !install || !crate::qemu::toolchain::is_root_on_debian() {
        return Err(how);
    }
    crate::qemu::toolchain::apt_install(&VIRTIOFSD_BUILD_PACKAGES, &mut false)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("+ cargo install --locked virtiofsd (a few minutes)");
    let built = Command::new(cargo)
        .args(["install", "--locked", "--quiet", "virtiofsd"])
        .status()
        .is_ok_and(|s| s.success());
    match find_virtiofsd() {
        Some(p) if built => Ok(p),
        _ => Err(format!("installing virtiofsd failed; {how}")),
    }
}

/// The virtiofsd binary, if this machine has one (see the module docs).
pub fn find_virtiofsd() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        candidates.push(p.into());
    }
    candidates.push("/usr/libexec/virtiofsd".into());
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("virtiofsd")));
    }
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/virtiofsd"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/virtiofsd"));
    }
    // The Rust daemon's command line has `--shared-dir`; the C one's has not.
    candidates.into_iter().find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            && Command::new(p)
                .arg("--help")
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--shared-dir"))
    })
}

/// `attach` for scenarios that list the device: not used (the `fs` scenario's hook
/// attaches it with its daemon), but the registry needs one.
fn attach(_: &Attach<'_>, _: &mut DeviceFiles) -> std::io::Result<Vec<String>> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "virtio-fs needs its daemon: only the fs scenario's host hook attaches it",
    ))
}

/// Fills the share.
fn populate(share: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(share)?;
    std::fs::write(share.join(HELLO_NAME), HELLO_TEXT)?;
    std::fs::write(share.join(UTF8_NAME), UTF8_TEXT)?;
    let data = pattern(DATA_SEED, READ_LEN);
    std::fs::write(share.join(DATA_NAME), &data)?;
    std::fs::write(share.join(RENAME_FROM), RENAME_TEXT)?;
    std::fs::write(share.join(UNLINK_NAME), "to be unlinked\n")?;
    std::fs::write(share.join(CHANGE_NAME), CHANGE_OLD)?;
    let many = share.join(MANY_DIR);
    std::fs::create_dir_all(&many)?;
    for i in 0..MANY_COUNT {
        std::fs::write(many.join(format!("entry-{i:05}")), format!("{i}\n"))?;
    }
    Ok(fnv1a(FNV_OFFSET, &data))
}

/// Starts virtiofsd and hands QEMU the device.
pub fn start(ctx: &HostContext<'_>) -> std::io::Result<HostSide> {
    let cfg = ctx.config;
    let share = ctx.run_dir.join("share");
    let data_hash = populate(&share)?;
    let (child, log_path, version, qemu) = daemon(ctx, &share)?;
    let seed = 0x1234_5678 ^ cfg.config_name().len() as u64;
    let guest_args = vec![
        "expect_types=26".to_string(),
        format!("fs_tag={TAG}"),
        format!("fs_read_len={READ_LEN}"),
        format!("fs_read_hash={data_hash}"),
        format!("fs_write_len={WRITE_LEN}"),
        format!("fs_write_seed={seed}"),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let changer = {
        let (stop, serial, file) = (
            stop.clone(),
            ctx.serial_log.to_path_buf(),
            share.join(CHANGE_NAME),
        );
        std::thread::Builder::new()
            .name("fs-host-change".into())
            .spawn(move || change_on_marker(&serial, &file, &stop))?
    };
    let finish = move || {
        stop.store(true, Ordering::Relaxed);
        let change = changer
            .join()
            .unwrap_or_else(|_| Err("the thread panicked".into()));
        finish(child, &share, &log_path, data_hash, seed, version, change)
    };
    Ok(HostSide {
        guest_args,
        qemu_args: qemu,
        finish: Box::new(finish),
    })
}

/// What the host-change thread did: `None` if the marker never came.
type ChangeLog = Result<Option<ChangeDone>, String>;

struct ChangeDone {
    /// From the thread's start (before QEMU) to the marker it saw.
    marker_ms: u128,
    /// From the marker seen to the file rewritten.
    write_us: u128,
}

/// Polls the guest's serial log (every 20 ms) for [`CHANGE_MARKER`] until `stop`, then
/// rewrites `file` in place (same inode: the guest's node stays valid) with
/// [`CHANGE_NEW`].
fn change_on_marker(serial: &Path, file: &Path, stop: &AtomicBool) -> ChangeLog {
    let t0 = Instant::now();
    loop {
        let seen = std::fs::read(serial).is_ok_and(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .any(|l| l.trim_end() == CHANGE_MARKER)
        });
        if seen {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let marker_ms = t0.elapsed().as_millis();
    let t1 = Instant::now();
    std::fs::write(file, CHANGE_NEW).map_err(|e| format!("rewriting {}: {e}", file.display()))?;
    Ok(Some(ChangeDone {
        marker_ms,
        write_us: t1.elapsed().as_micros(),
    }))
}

/// Starts virtiofsd on `share` (the daemon, its log, its version) and returns QEMU's
/// arguments for the device with its shared memory.
fn daemon(
    ctx: &HostContext<'_>,
    share: &Path,
) -> std::io::Result<(Child, PathBuf, String, Vec<String>)> {
    let cfg = ctx.config;
    let Some(daemon) = find_virtiofsd() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "virtiofsd not found ($VIRTIOFSD, /usr/libexec/virtiofsd, PATH, ~/.cargo/bin); \
             install it with `cargo install virtiofsd` (needs libcap-ng-dev, libseccomp-dev)",
        ));
    };
    let socket = ctx.run_dir.join("vfs.sock");
    let _ = std::fs::remove_file(&socket);
    let log_path = ctx.run_dir.join("virtiofsd.log");
    let log = std::fs::File::create(&log_path)?;
    // --sandbox=none: no namespaces or chroot (they need privileges a CI container may
    // not grant); --seccomp=none: the filter is the daemon's own hardening and changes
    // nothing the guest sees. --cache=auto (the default, explicit): entries and attributes
    // valid for 1 s, which `fs.host_change` waits out (virtiofsd has no other timeout).
    let mut child = Command::new(&daemon)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args([
            "--sandbox=none",
            "--seccomp=none",
            "--xattr",
            "--cache=auto",
            "--log-level=warn",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(std::io::Error::other(format!(
                "{} exited ({status}) before listening: {}",
                daemon.display(),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("virtiofsd did not create its socket"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let version = Command::new(&daemon)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut qemu = vec![
        "-object".into(),
        format!(
            "memory-backend-memfd,id=fsmem,size={}M,share=on",
            cfg.memory_mib
        ),
        "-machine".into(),
        "memory-backend=fsmem".into(),
        "-chardev".into(),
        format!("socket,id=vfs,path={}", socket.display()),
    ];
    let bus = if cfg.machine == Machine::Q35 {
        qemu.push("-device".into());
        qemu.push("pcie-root-port,id=rpfs,chassis=1,bus=pcie.0,addr=0x10".into());
        ",bus=rpfs"
    } else {
        ""
    };
    qemu.push("-device".into());
    qemu.push(format!("vhost-user-fs-pci,chardev=vfs,tag={TAG}{bus}"));
    Ok((child, log_path, version, qemu))
}

/// The benchmark's bytes per sequential phase (`bench_bytes=` among the run's guest
/// words, as `cargo xtask bench fs` passes it), default 32 MiB.
fn bench_bytes(cfg: &crate::qemu::RunConfig) -> u64 {
    cfg.extra_guest_args
        .iter()
        .rev()
        .find_map(|a| a.strip_prefix("bench_bytes=")?.parse().ok())
        .unwrap_or(BENCH_BYTES)
}

/// Default bytes of the benchmark's sequential phases (and of its disk image).
pub const BENCH_BYTES: u64 = 32 << 20;
/// The file the benchmark writes and reads (the guest's `FILE_NAME`).
pub const BENCH_FILE: &str = "bench-seq.bin";

/// `bench-fs`: an empty share served by virtiofsd, and virtio-blk on a raw image file of
/// the benchmark's size (`ioeventfd=off`, behind its own root port on q35, like `bench
/// blk`'s device), both modern.
pub fn start_bench(ctx: &HostContext<'_>) -> std::io::Result<HostSide> {
    let cfg = ctx.config;
    let bytes = bench_bytes(cfg);
    let share = ctx.run_dir.join("share");
    std::fs::create_dir_all(&share)?;
    let image = ctx.run_dir.join("bench-disk.img");
    std::fs::File::create(&image)?.set_len(bytes.div_ceil(512) * 512)?;
    let (child, log_path, version, mut qemu) = daemon(ctx, &share)?;
    let bus = if cfg.machine == Machine::Q35 {
        qemu.push("-device".into());
        qemu.push("pcie-root-port,id=rpblk,chassis=2,bus=pcie.0,addr=0x11".into());
        ",bus=rpblk"
    } else {
        ""
    };
    qemu.extend([
        "-drive".into(),
        format!("if=none,id=bench0,format=raw,file={}", image.display()),
        "-device".into(),
        format!(
            "virtio-blk-pci,drive=bench0,disable-legacy=on,disable-modern=off,\
             ioeventfd=off{bus}"
        ),
    ]);
    let guest_args = vec!["expect_types=2,26".to_string(), format!("fs_tag={TAG}")];
    let finish = move || finish_bench(child, &share, &log_path, bytes, version);
    Ok(HostSide {
        guest_args,
        qemu_args: qemu,
        finish: Box::new(finish),
    })
}

/// Waits for the daemon to exit by itself after QEMU (kills it after 5 s).
fn stop(mut child: Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The benchmark's share afterwards: its file of `bytes` bytes, none of the small files.
fn finish_bench(
    child: Child,
    share: &Path,
    log_path: &Path,
    bytes: u64,
    version: String,
) -> HostOutcome {
    let exited = stop(child);
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let size = std::fs::metadata(share.join(BENCH_FILE)).map(|m| m.len());
    let others = std::fs::read_dir(share).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name() != BENCH_FILE)
            .count()
    });
    let errors = log.lines().filter(|l| l.contains("ERROR")).count();
    let checks = vec![
        check(
            "bench_share",
            size.as_ref().is_ok_and(|&n| n == bytes) && others == 0,
            format!(
                "{BENCH_FILE}: {}; other entries left in the share: {others} (the small \
                 files were unlinked)",
                match &size {
                    Ok(n) => format!("{n} bytes of {bytes}"),
                    Err(e) => format!("error: {e}"),
                }
            ),
        ),
        check(
            "daemon",
            errors == 0,
            format!(
                "{version}: {}; {errors} error line(s) in its log",
                exited.map_or_else(
                    || "did not exit within 5 s of QEMU, killed".to_string(),
                    |s| format!("exited by itself ({s})")
                )
            ),
        ),
    ];
    let mut stats = BTreeMap::new();
    stats.insert("host.fs.virtiofsd".to_string(), version.replace(' ', "-"));
    HostOutcome { checks, stats }
}

fn check(name: &str, passed: bool, detail: String) -> Check {
    Check {
        name: format!("host.fs.{name}"),
        passed,
        detail,
    }
}

/// The value of extended attribute `name` of `path`, or the errno.
fn get_xattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    let n = std::ffi::CString::new(name).map_err(|_| libc::EINVAL)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: `c` and `n` are NUL-terminated; `buf` is writable for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn file_hash(path: &Path) -> Result<(u64, u64), String> {
    std::fs::read(path)
        .map(|b| (b.len() as u64, fnv1a(FNV_OFFSET, &b)))
        .map_err(|e| e.to_string())
}

/// Stops the daemon (it exits by itself when QEMU disconnects) and checks the share.
fn finish(
    mut child: Child,
    share: &Path,
    log_path: &Path,
    data_hash: u64,
    seed: u64,
    version: String,
    change: ChangeLog,
) -> HostOutcome {
    let deadline = Instant::now() + Duration::from_secs(5);
    let exited = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let mut checks = Vec::new();
    let p = |n: &str| share.join(n);

    let want = (WRITE_LEN, fnv1a(FNV_OFFSET, &pattern(seed, WRITE_LEN)));
    let got = file_hash(&p(WRITTEN_NAME));
    checks.push(check(
        "written",
        got == Ok(want),
        format!(
            "{WRITTEN_NAME}: {}; expected {} bytes, hash {:#x}",
            match &got {
                Ok((n, h)) => format!("{n} bytes, hash {h:#x}"),
                Err(e) => format!("error: {e}"),
            },
            want.0,
            want.1
        ),
    ));
    let kept = p(KEPT_DIR).is_dir();
    let temp = p(TEMP_DIR).exists();
    checks.push(check(
        "dirs",
        kept && !temp,
        format!("{KEPT_DIR} is a directory: {kept}; {TEMP_DIR} exists: {temp}"),
    ));
    let from = p(RENAME_FROM).exists();
    let to = std::fs::read_to_string(p(RENAME_TO)).map_err(|e| e.to_string());
    checks.push(check(
        "rename",
        !from && to.as_deref() == Ok(RENAME_TEXT),
        format!(
            "{RENAME_FROM} still there: {from}; \"{RENAME_TO}\" holds its content: {}",
            to.as_deref() == Ok(RENAME_TEXT)
        ),
    ));
    let unlinked = !p(UNLINK_NAME).exists();
    checks.push(check(
        "unlink",
        unlinked,
        format!("{UNLINK_NAME} gone: {unlinked}"),
    ));
    let ino = |n: &str| std::fs::metadata(p(n)).map(|m| (m.ino(), m.nlink())).ok();
    let (a, b) = (ino(HELLO_NAME), ino(LINK_NAME));
    checks.push(check(
        "link",
        a.is_some() && a == b && a.is_some_and(|(_, n)| n == 2),
        format!(
            "{HELLO_NAME}: {}; {LINK_NAME}: {}",
            a.map_or("missing".into(), |(i, n)| format!("inode {i}, {n} links")),
            b.map_or("missing".into(), |(i, n)| format!("inode {i}, {n} links"))
        ),
    ));
    let target = std::fs::read_link(p(SYMLINK_NAME));
    checks.push(check(
        "symlink",
        target.as_ref().is_ok_and(|t| t == Path::new(HELLO_NAME)),
        format!(
            "{SYMLINK_NAME} -> {}",
            match &target {
                Ok(t) => t.display().to_string(),
                Err(e) => format!("error: {e}"),
            }
        ),
    ));
    // Metadata before the content is read (a read may move the atime).
    let meta = std::fs::metadata(p(ATTR_NAME));
    let attr = meta
        .as_ref()
        .map(|m| (m.len(), m.permissions().mode() & 0o7777))
        .map_err(|e| e.to_string());
    let times = meta
        .as_ref()
        .map(|m| ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec())))
        .map_err(|e| e.to_string());
    let content = std::fs::read(p(ATTR_NAME)).unwrap_or_default();
    checks.push(check(
        "setattr",
        attr.as_ref()
            .is_ok_and(|&(len, mode)| len == 100 && mode == 0o640)
            && content.iter().all(|&c| c == b'a'),
        format!(
            "{ATTR_NAME}: {}, content all 'a': {}",
            match &attr {
                Ok((l, m)) => format!("size {l}, mode {m:o}"),
                Err(e) => format!("error: {e}"),
            },
            content.iter().all(|&c| c == b'a')
        ),
    ));
    let ns = |(s, n): (i64, i64)| format!("{s}.{n:09}");
    checks.push(check(
        "setattr_times",
        times == Ok((ATTR_ATIME, ATTR_MTIME)),
        format!(
            "{ATTR_NAME}: {}; the guest set atime {}, mtime {}",
            match &times {
                Ok((a, m)) => format!("atime {}, mtime {}", ns(*a), ns(*m)),
                Err(e) => format!("error: {e}"),
            },
            ns(ATTR_ATIME),
            ns(ATTR_MTIME)
        ),
    ));
    let now = std::fs::read_to_string(p(CHANGE_NAME)).map_err(|e| e.to_string());
    checks.push(check(
        "host_change",
        matches!(change, Ok(Some(_))) && now.as_deref() == Ok(CHANGE_NEW),
        format!(
            "{}; {CHANGE_NAME} holds the new content afterwards: {}",
            match &change {
                Ok(Some(c)) => format!(
                    "\"{CHANGE_MARKER}\" seen {} ms after the hook started, {CHANGE_NAME} \
                     rewritten in place ({} -> {} bytes) {} us later",
                    c.marker_ms,
                    CHANGE_OLD.len(),
                    CHANGE_NEW.len(),
                    c.write_us
                ),
                Ok(None) => format!("the guest never printed \"{CHANGE_MARKER}\""),
                Err(e) => format!("error: {e}"),
            },
            now.as_deref() == Ok(CHANGE_NEW)
        ),
    ));
    let value = get_xattr(&p(XATTR_FILE), XATTR_NAME);
    let gone = get_xattr(&p(XATTR_FILE), XATTR_GONE);
    let size = std::fs::metadata(p(XATTR_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    checks.push(check(
        "xattr",
        value.as_deref() == Ok(XATTR_VALUE.as_bytes())
            && gone.as_ref().is_err_and(|e| *e == libc::ENODATA)
            && size == FALLOCATE_LEN,
        format!(
            "{XATTR_FILE}: {XATTR_NAME} = {}; {XATTR_GONE}: {}; size {size} (FALLOCATE {FALLOCATE_LEN})",
            match &value {
                Ok(v) => format!("\"{}\"", String::from_utf8_lossy(v)),
                Err(e) => format!("errno {e}"),
            },
            match &gone {
                Ok(_) => "still there".to_string(),
                Err(e) if *e == libc::ENODATA => "absent".to_string(),
                Err(e) => format!("errno {e}"),
            }
        ),
    ));
    let hello = std::fs::read_to_string(p(HELLO_NAME)).map_err(|e| e.to_string());
    let utf8 = std::fs::read_to_string(p(UTF8_NAME)).map_err(|e| e.to_string());
    let data = file_hash(&p(DATA_NAME));
    let many = std::fs::read_dir(p(MANY_DIR)).map(|d| d.count());
    checks.push(check(
        "untouched",
        hello.as_deref() == Ok(HELLO_TEXT)
            && utf8.as_deref() == Ok(UTF8_TEXT)
            && data == Ok((READ_LEN, data_hash))
            && many.as_ref().is_ok_and(|&n| n == MANY_COUNT),
        format!(
            "host files unchanged: {HELLO_NAME} {}, \"{UTF8_NAME}\" {}, {DATA_NAME} {}; \
             {MANY_DIR}/ holds {} entries",
            hello.as_deref() == Ok(HELLO_TEXT),
            utf8.as_deref() == Ok(UTF8_TEXT),
            data == Ok((READ_LEN, data_hash)),
            many.as_ref().map_or(0, |n| *n)
        ),
    ));
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    checks.push(check(
        "daemon",
        errors.is_empty(),
        format!(
            "{version}: {}; {} error line(s) in its log{}",
            exited.map_or_else(
                || "did not exit within 5 s of QEMU, killed".to_string(),
                |s| format!("exited by itself ({s})")
            ),
            errors.len(),
            errors
                .first()
                .map(|l| format!(", first: {l}"))
                .unwrap_or_default()
        ),
    ));
    let mut stats = BTreeMap::new();
    stats.insert("host.fs.virtiofsd".to_string(), version.replace(' ', "-"));
    HostOutcome { checks, stats }
}
