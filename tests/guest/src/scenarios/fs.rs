//! `fs`: the virtio-fs driver (`virtio_fs::FsDriver` over `virtio-pci` + `virtio-core`)
//! against QEMU's vhost-user-fs-pci and the real host daemon, virtiofsd, sharing a
//! temporary host directory (`tests/src/qemu/fs_host.rs` fills it, starts the daemon and
//! checks every effect on the host afterwards):
//!
//! 1. `fs.init`: the device at DRIVER_OK in the run's interrupt mode, its tag, FUSE_INIT;
//! 2. `fs.read.*`: host-created files read back — a small text file, one whose name has
//!    spaces and UTF-8, and `fs_read_len` bytes of `data.bin` checked by hash
//!    (`fs_read_hash`, FNV-1a 64 computed by the host);
//! 3. `fs.write`: `fs_write_len` bytes of a seeded pattern written to a new file (hash
//!    checked on the host), fsync, flush, release;
//! 4. metadata: mkdir/rmdir, rename, unlink, link, symlink/readlink, setattr (size and
//!    mode; `fs.setattr_times`: atime and mtime to the device's now, then to fixed
//!    values, read back with GETATTR and checked on the host), getattr, statfs, a lookup
//!    of a missing name (ENOENT);
//! 5. `fs.readdirplus`: the 10,000-entry directory `many`, every name checked, every
//!    lookup reference returned with BATCH_FORGET;
//! 6. `fs.host_change`: a host file the guest looked up (and read) is rewritten by the
//!    host while the guest runs — the host's hook does it as soon as the guest prints
//!    `STAT fs.phase=host-change` — and the guest, keeping the attributes as a cache for
//!    the `attr_valid` the daemon granted, asks again (GETATTR) only once that expired,
//!    until it sees the new size (bounded); then READ shows the new content;
//! 7. DESTROY, statistics, reset.
//!
//! `bench-fs` ([`bench`]) measures the same driver beside virtio-blk.

mod bench;
pub use bench::bench;

use super::Env;
use super::bus::{self, GuestBus};
use crate::check;
use crate::cmdline::IrqMode;
use crate::report;
use crate::report::show::FeatureSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_core::platform::InterruptMode;
use virtio_core::transport::Transport;
use virtio_core::{Bus, DeviceType, VirtioDevice};
use virtio_fs::{
    Errno, FileType, FsDriver, FsError, FsOptions, FsResult, NodeId, SetAttr, SetTime, Timespec,
    Waiter, open_flags,
};
use virtio_pci::{Preference, probe};

type Fs = FsDriver<GuestBus>;

/// What the host puts in the share (`fs_host.rs` has the same constants).
const HELLO_NAME: &str = "hello.txt";
const HELLO_TEXT: &str = "hello from the host\n";
const UTF8_NAME: &str = "name with spaces ü ✓.txt";
const UTF8_TEXT: &str = "grüße aus dem host ✓\n";
const DATA_NAME: &str = "data.bin";
const MANY_DIR: &str = "many";
const MANY_COUNT: usize = 10_000;
/// What the guest creates or changes (checked by the host).
const WRITTEN_NAME: &str = "guest-written.bin";
const KEPT_DIR: &str = "guest-dir";
const TEMP_DIR: &str = "guest-temp-dir";
const RENAME_FROM: &str = "to-rename.txt";
const RENAME_TO: &str = "renamed by guest ✓.txt";
const UNLINK_NAME: &str = "to-unlink.txt";
const LINK_NAME: &str = "hello-hardlink.txt";
const SYMLINK_NAME: &str = "guest-symlink";
const ATTR_NAME: &str = "guest-attr.txt";
const ATTR_SIZE: u64 = 100;
const ATTR_MODE: u32 = 0o640;
/// Times `ATTR_NAME` gets (the host checks them; `fs_host.rs` has the same values).
const ATTR_ATIME: Timespec = Timespec {
    secs: 1_500_000_000,
    nanos: 250_000_000,
};
const ATTR_MTIME: Timespec = Timespec {
    secs: 1_234_567_890,
    nanos: 123_456_789,
};
/// 2020-01-01T00:00:00Z: a `*_NOW` time is later than this (the host's clock).
const PLAUSIBLE_NOW: u64 = 1_577_836_800;
/// A host file the host rewrites while the guest runs (`fs_host.rs`).
const CHANGE_NAME: &str = "host-changed.txt";
const CHANGE_OLD: &str = "before the host's change\n";
const CHANGE_NEW: &str = "after the host's change: new content, longer than before\n";
/// The line after which the host changes `CHANGE_NAME`.
const CHANGE_PHASE: &str = "host-change";
/// The longest the guest waits to see the change.
const CHANGE_DEADLINE_MS: u64 = 20_000;
/// The shortest pause between two GETATTRs (if the daemon grants no cache time).
const CHANGE_MIN_POLL_MS: u64 = 50;
const XATTR_FILE: &str = "guest-xattr.txt";
const XATTR_NAME: &str = "user.virtio-darwin";
const XATTR_VALUE: &str = "set by the guest ✓";
const XATTR_GONE: &str = "user.removed";
const FALLOCATE_LEN: u64 = 1 << 20;

/// Bytes per READ/WRITE call of the scenario (the driver splits each further).
const PIECE: usize = 256 * 1024;

/// FNV-1a 64 (also in `fs_host.rs`).
pub fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Byte `i` of the seeded pattern (also in `fs_host.rs`).
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    let x = ((i / 8) ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> ((i % 8) * 8)) as u8
}

/// `ok`'s view of the value, or `error: <why>`.
fn shown<T>(r: &FsResult<T>, ok: impl FnOnce(&T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => format!("error: {e}"),
    }
}

/// Bytes as quoted text.
fn text(b: &[u8]) -> String {
    format!("\"{}\"", String::from_utf8_lossy(b).escape_debug())
}

fn mode_name(mode: InterruptMode) -> String {
    match mode {
        InterruptMode::MsiX { vectors } => format!("MSI-X, {vectors} vectors"),
        InterruptMode::Intx => "INTx".into(),
        InterruptMode::Polling => "polling".into(),
    }
}

/// Waits for the device: halts until an interrupt (10 ms slices) and feeds it to the
/// driver, or returns at once in polling mode (the driver polls after every wait).
struct GuestWaiter {
    deadline_ns: u64,
}

impl Waiter<GuestBus> for GuestWaiter {
    fn wait(&mut self, fs: &mut Fs) -> FsResult<()> {
        if crate::time::now_ns() >= self.deadline_ns {
            return Err(FsError::Timeout);
        }
        if fs.bus().interrupt_mode() == InterruptMode::Polling {
            core::hint::spin_loop();
            return Ok(());
        }
        fs.bus_mut().interrupt_platform().wait(u64::MAX, 10);
        let mut error = None;
        bus::dispatch(
            fs,
            |f| f.bus_mut(),
            |f, vector| {
                if let Err(e) = f.handle_interrupt(vector) {
                    error = Some(e);
                }
            },
        );
        error.map_or(Ok(()), Err)
    }
}

pub fn run(env: &mut Env) {
    let timeout_ms = env.cmdline.get_u64("fs_timeout_ms", 60_000);
    let want_tag = String::from(env.cmdline.get("fs_tag").unwrap_or("hostshare"));
    let Some(func) = env.find_virtio(DeviceType::Fs) else {
        check!("fs.present", false, "no virtio-fs on the bus");
        return;
    };
    // vhost-user-fs-pci is modern-only (virtio-fs has no legacy interface, §5.11), so the
    // run's `transport=` cannot select anything: always let the probe choose (modern).
    let dev = env.open(func);
    let bus: GuestBus = match probe(dev.config, dev.bars, Preference::Auto) {
        Ok(t) => VirtioDevice::new(t, dev.dma, dev.irq),
        Err(e) => {
            check!(
                "fs.init",
                false,
                "{} probe: {}",
                func.addr,
                virtio_core::Error::from(e)
            );
            return;
        }
    };
    let options = FsOptions {
        interrupts: env.irq != IrqMode::Poll,
        ..FsOptions::default()
    };
    let mut fs: Fs = match FsDriver::new(bus, options) {
        Ok(f) => f,
        Err(e) => {
            check!("fs.init", false, "driver setup: {e}");
            return;
        }
    };
    let mut w = GuestWaiter {
        deadline_ns: crate::time::now_ns().saturating_add(timeout_ms.saturating_mul(1_000_000)),
    };
    let mode = fs.bus().interrupt_mode();
    let mode_ok = matches!(
        (env.irq, mode),
        (IrqMode::MsiX, InterruptMode::MsiX { .. })
            | (IrqMode::Intx, InterruptMode::Intx)
            | (IrqMode::Poll, InterruptMode::Polling)
    );
    let features = fs.bus().features().bits();
    match fs.init(&mut w) {
        Ok(info) => {
            check!(
                "fs.init",
                mode_ok && fs.config().tag() == want_tag,
                "tag \"{}\" ({} request queue(s)), FUSE {}.{}, max_write {}, max_pages {}, flags {:#x}; \
                 chunks read {} write {}; features {}; interrupts: {} (irq={})",
                fs.config().tag(),
                fs.config().num_request_queues,
                info.major,
                info.minor,
                info.max_write,
                info.max_pages,
                info.flags,
                fs.read_chunk(),
                fs.write_chunk(),
                FeatureSet(DeviceType::Fs, features),
                mode_name(mode),
                env.irq.name()
            );
        }
        Err(e) => {
            check!("fs.init", false, "FUSE_INIT: {e}");
            fs.shutdown();
            return;
        }
    }
    let start = crate::time::now_ns();
    steps(env, &mut fs, &mut w);
    report::stat("fs.elapsed_us", (crate::time::now_ns() - start) / 1000);
    let destroy = fs.destroy(&mut w);
    check!(
        "fs.destroy",
        destroy.is_ok(),
        "DESTROY: {}",
        shown(&destroy, |_| "ok".into())
    );
    let s = fs.stats();
    report::stat("fs.requests", s.requests);
    report::stat("fs.replies", s.replies);
    report::stat("fs.errno_replies", s.errno_replies);
    report::stat("fs.protocol_errors", s.protocol_errors);
    report::stat("fs.forget_requests", s.forget_requests);
    report::stat("fs.forgotten_nodes", s.forgotten_nodes);
    report::stat("fs.bytes_read", s.bytes_read);
    report::stat("fs.bytes_written", s.bytes_written);
    bus::stats("fs", fs.bus_mut());
    fs.shutdown();
    let status = fs.bus().transport().status();
    check!(
        "fs.clean",
        status.is_empty() && s.protocol_errors == 0 && s.requests == s.replies,
        "device reset (status {:#x}); {} requests, {} replies, {} protocol errors",
        status.bits(),
        s.requests,
        s.replies,
        s.protocol_errors
    );
}

/// Opens `name` in the root, reads all of it (up to `cap` bytes) and closes it.
fn read_small(fs: &mut Fs, w: &mut GuestWaiter, name: &str, cap: usize) -> FsResult<Vec<u8>> {
    let e = fs.lookup(w, NodeId::ROOT, name.as_bytes())?;
    let o = fs.open(w, e.node, open_flags::O_RDONLY)?;
    let mut buf = vec![0u8; cap];
    let n = fs.read(w, e.node, o.fh, 0, &mut buf);
    fs.release(w, e.node, o.fh, 0)?;
    fs.forget(w, &[(e.node, 1)])?;
    buf.truncate(n?);
    Ok(buf)
}

fn steps(env: &Env, fs: &mut Fs, w: &mut GuestWaiter) {
    let root = NodeId::ROOT;
    let ok = |_: &()| String::from("ok");
    // Host files: plain, UTF-8 name, a large one by hash.
    let hello = read_small(fs, w, HELLO_NAME, 4096);
    check!(
        "fs.read.hello",
        hello.as_deref() == Ok(HELLO_TEXT.as_bytes()),
        "{HELLO_NAME}: {}",
        shown(&hello, |b| text(b))
    );
    let utf8 = read_small(fs, w, UTF8_NAME, 4096);
    check!(
        "fs.read.utf8_name",
        utf8.as_deref() == Ok(UTF8_TEXT.as_bytes()),
        "\"{UTF8_NAME}\": {}",
        shown(&utf8, |b| text(b))
    );
    let want_len = env.cmdline.get_u64("fs_read_len", 0);
    let want_hash = env.cmdline.get_u64("fs_read_hash", 0);
    let t0 = crate::time::now_ns();
    let data = read_hashed(fs, w, DATA_NAME);
    let us = (crate::time::now_ns() - t0) / 1000;
    check!(
        "fs.read.data",
        data == Ok((want_len, want_hash)),
        "{DATA_NAME}: {} in {us} us (the host's file: {want_len} bytes, hash {want_hash:#x})",
        shown(&data, |(n, h)| format!("{n} bytes, FNV-1a {h:#x}"))
    );
    report::stat("fs.read_us", us);

    // Write a new file (hash checked by the host).
    let len = env.cmdline.get_u64("fs_write_len", 1 << 20);
    let seed = env.cmdline.get_u64("fs_write_seed", 1);
    let t0 = crate::time::now_ns();
    let written = write_pattern(fs, w, WRITTEN_NAME, len, seed);
    let us = (crate::time::now_ns() - t0) / 1000;
    check!(
        "fs.write",
        written == Ok(len),
        "{WRITTEN_NAME}: {} of {len} bytes written in {us} us, then fsync, flush, release",
        shown(&written, |n| format!("{n}"))
    );
    report::stat("fs.write_us", us);

    // Directories.
    let kept = fs.mkdir(w, root, KEPT_DIR.as_bytes(), 0o755);
    let temp = fs.mkdir(w, root, TEMP_DIR.as_bytes(), 0o700);
    let again = fs.mkdir(w, root, KEPT_DIR.as_bytes(), 0o755);
    let rm = fs.rmdir(w, root, TEMP_DIR.as_bytes());
    check!(
        "fs.mkdir_rmdir",
        kept.is_ok_and(|e| e.attr.kind == FileType::Directory)
            && temp.is_ok()
            && again == Err(FsError::Errno(Errno::EEXIST))
            && rm.is_ok(),
        "mkdir {KEPT_DIR}: {}; mkdir + rmdir {TEMP_DIR}: {}, {}; mkdir {KEPT_DIR} again: {} \
         (EEXIST expected)",
        shown(&kept, |e| format!(
            "a directory of mode {:o}",
            e.attr.perm()
        )),
        shown(&temp, |_| "ok".into()),
        shown(&rm, ok),
        shown(&again, |_| "ok".into())
    );
    // Rename, unlink, link, symlink.
    let rename = fs.rename(
        w,
        root,
        RENAME_FROM.as_bytes(),
        root,
        RENAME_TO.as_bytes(),
        0,
    );
    let unlink = fs.unlink(w, root, UNLINK_NAME.as_bytes());
    let gone = fs.lookup(w, root, UNLINK_NAME.as_bytes());
    check!(
        "fs.rename_unlink",
        rename.is_ok() && unlink.is_ok() && gone == Err(FsError::Errno(Errno::ENOENT)),
        "rename {RENAME_FROM} to \"{RENAME_TO}\": {}; unlink {UNLINK_NAME}: {}; lookup after \
         the unlink: {} (ENOENT expected)",
        shown(&rename, ok),
        shown(&unlink, ok),
        shown(&gone, |e| format!("found, node {}", e.node.0))
    );
    let link = fs
        .lookup(w, root, HELLO_NAME.as_bytes())
        .and_then(|e| fs.link(w, e.node, root, LINK_NAME.as_bytes()));
    check!(
        "fs.link",
        link.is_ok_and(|e| e.attr.nlink == 2),
        "{LINK_NAME} linked to {HELLO_NAME}: {}",
        shown(&link, |e| format!("{} links", e.attr.nlink))
    );
    let mut target = [0u8; 256];
    let sym = fs
        .symlink(w, root, SYMLINK_NAME.as_bytes(), HELLO_NAME.as_bytes())
        .and_then(|e| fs.readlink(w, e.node, &mut target));
    check!(
        "fs.symlink",
        sym.is_ok_and(|n| target.get(..n) == Some(HELLO_NAME.as_bytes())),
        "{SYMLINK_NAME} -> {} (READLINK)",
        shown(&sym, |&n| text(target.get(..n).unwrap_or(&[])))
    );
    // SETATTR: size and mode; GETATTR agrees.
    let attr = set_attributes(fs, w);
    check!(
        "fs.setattr",
        attr.is_ok_and(|(size, perm)| size == ATTR_SIZE && perm == ATTR_MODE),
        "{ATTR_NAME} after SETATTR size {ATTR_SIZE}, mode {ATTR_MODE:o}: {} (GETATTR)",
        shown(&attr, |(s, m)| format!("size {s}, mode {m:o}"))
    );
    // SETATTR of times: the device's now, then fixed values; GETATTR agrees.
    let times = set_times(fs, w);
    check!(
        "fs.setattr_times",
        times.as_ref().is_ok_and(|t| t.now_ok() && t.fixed_ok()),
        "{ATTR_NAME}: {}",
        shown(&times, |t| format!(
            "ATIME_NOW|MTIME_NOW: atime {}, mtime {} (mtime before {}, later than 2020: {}); \
             then atime {}, mtime {}: GETATTR atime {}, mtime {} (the SETATTR reply's \
             attributes {} GETATTR's)",
            ts(t.now_atime),
            ts(t.now_mtime),
            ts(t.before_mtime),
            t.now_ok(),
            ts(ATTR_ATIME),
            ts(ATTR_MTIME),
            ts(t.atime),
            ts(t.mtime),
            if t.reply_agrees {
                "equal"
            } else {
                "DIFFER from"
            }
        ))
    );
    // STATFS, GETATTR of the root.
    let st = fs.statfs(w, root);
    let ra = fs.getattr(w, root, None);
    check!(
        "fs.statfs",
        st.is_ok_and(|s| s.blocks > 0 && s.bsize > 0 && s.namelen >= 255)
            && ra.is_ok_and(|a| a.attr.kind == FileType::Directory),
        "STATFS: {}; GETATTR of the root: {}",
        shown(&st, |s| format!(
            "{} blocks of {} bytes ({} free), {} files ({} free), names up to {} bytes",
            s.blocks, s.bsize, s.bfree, s.files, s.ffree, s.namelen
        )),
        shown(&ra, |a| String::from(
            if a.attr.kind == FileType::Directory {
                "a directory"
            } else {
                "not a directory"
            }
        ))
    );
    // Extended attributes, FALLOCATE, LSEEK.
    let x = xattrs(fs, w);
    check!(
        "fs.xattr",
        x.is_ok_and(|(value_ok, listed, gone, end)| value_ok
            && listed
            && gone
            && end == FALLOCATE_LEN),
        "{XATTR_FILE}: {}",
        shown(&x, |(value_ok, listed, gone, end)| format!(
            "{XATTR_NAME} read back: {value_ok}, listed: {listed}; {XATTR_GONE} removed \
             (ENODATA after): {gone}; FALLOCATE {FALLOCATE_LEN} then LSEEK SEEK_END: {end}"
        ))
    );
    // READDIRPLUS of 10,000 entries.
    let t0 = crate::time::now_ns();
    let dir = read_many(fs, w);
    let us = (crate::time::now_ns() - t0) / 1000;
    check!(
        "fs.readdirplus",
        dir == Ok((MANY_COUNT, MANY_COUNT)),
        "{MANY_DIR}/: {} in {us} us",
        shown(&dir, |(found, forgotten)| format!(
            "{found} of {MANY_COUNT} entry-NNNNN names found once each, {forgotten} lookup \
             references returned with BATCH_FORGET"
        ))
    );
    report::stat("fs.readdirplus_us", us);

    // A change the host makes while the guest runs, seen after the attribute timeout.
    let change = host_change(fs, w);
    check!(
        "fs.host_change",
        change.as_ref().is_ok_and(|c| c.old_ok && c.new_ok),
        "{CHANGE_NAME}: {}",
        shown(&change, |c| format!(
            "LOOKUP granted entry_valid {}, attr_valid {}; read {} before the change; \
             the cached attributes (size {}) kept {} ms after the marker line, then GETATTR \
             #{} {} ms after it saw size {} ({} expected); READ: {}",
            ts(c.entry_valid),
            ts(c.attr_valid),
            if c.old_ok {
                "the old content"
            } else {
                "WRONG content"
            },
            c.old_size,
            c.cached_ms,
            c.polls,
            c.seen_ms,
            c.new_size,
            CHANGE_NEW.len(),
            text(&c.new_content)
        ))
    );
    if let Ok(c) = &change {
        report::stat("fs.host_change_ms", c.seen_ms);
    }
}

/// `secs.nanos` s.
fn ts(t: Timespec) -> String {
    format!("{}.{:09} s", t.secs, t.nanos)
}

fn ns(t: Timespec) -> u64 {
    t.secs
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(t.nanos))
}

/// What [`set_times`] saw.
struct Times {
    before_mtime: Timespec,
    now_atime: Timespec,
    now_mtime: Timespec,
    atime: Timespec,
    mtime: Timespec,
    reply_agrees: bool,
}

impl Times {
    /// The device's now: not before the file's previous mtime, and a plausible clock.
    fn now_ok(&self) -> bool {
        self.now_mtime >= self.before_mtime
            && self.now_mtime.secs > PLAUSIBLE_NOW
            && self.now_atime.secs > PLAUSIBLE_NOW
    }

    fn fixed_ok(&self) -> bool {
        self.atime == ATTR_ATIME && self.mtime == ATTR_MTIME && self.reply_agrees
    }
}

/// SETATTR of `ATTR_NAME`'s times: ATIME_NOW|MTIME_NOW, then the fixed `ATTR_ATIME` and
/// `ATTR_MTIME` (what the host checks), each read back with GETATTR.
fn set_times(fs: &mut Fs, w: &mut GuestWaiter) -> FsResult<Times> {
    let e = fs.lookup(w, NodeId::ROOT, ATTR_NAME.as_bytes())?;
    let now = SetAttr {
        atime: Some(SetTime::Now),
        mtime: Some(SetTime::Now),
        ..SetAttr::default()
    };
    fs.setattr(w, e.node, now)?;
    let n = fs.getattr(w, e.node, None)?;
    let fixed = SetAttr {
        atime: Some(SetTime::At(ATTR_ATIME)),
        mtime: Some(SetTime::At(ATTR_MTIME)),
        ..SetAttr::default()
    };
    let a = fs.setattr(w, e.node, fixed)?;
    let g = fs.getattr(w, e.node, None)?;
    fs.forget(w, &[(e.node, 1)])?;
    Ok(Times {
        before_mtime: e.attr.mtime,
        now_atime: n.attr.atime,
        now_mtime: n.attr.mtime,
        atime: g.attr.atime,
        mtime: g.attr.mtime,
        reply_agrees: a.attr == g.attr,
    })
}

/// What [`host_change`] saw.
struct Change {
    entry_valid: Timespec,
    attr_valid: Timespec,
    old_ok: bool,
    old_size: u64,
    /// How long after the marker the cached (old) attributes were still used.
    cached_ms: u64,
    /// GETATTRs sent after the marker, up to the one that saw the change.
    polls: u32,
    seen_ms: u64,
    new_size: u64,
    new_ok: bool,
    new_content: Vec<u8>,
}

/// Reads all of an open file (up to 4 KiB).
fn read_open(fs: &mut Fs, w: &mut GuestWaiter, node: NodeId) -> FsResult<Vec<u8>> {
    let o = fs.open(w, node, open_flags::O_RDONLY)?;
    let mut buf = vec![0u8; 4096];
    let n = fs.read(w, node, o.fh, 0, &mut buf);
    fs.release(w, node, o.fh, 0)?;
    buf.truncate(n?);
    Ok(buf)
}

/// `CHANGE_NAME`: LOOKUP and READ (the old content), the marker line (the host then
/// rewrites the file with `CHANGE_NEW`), then the attributes are kept as a cache for the
/// `attr_valid` the daemon granted and fetched again (GETATTR) each time it expires, until
/// they show the new size or `CHANGE_DEADLINE_MS` passes; READ then returns the new content.
fn host_change(fs: &mut Fs, w: &mut GuestWaiter) -> FsResult<Change> {
    let e = fs.lookup(w, NodeId::ROOT, CHANGE_NAME.as_bytes())?;
    let mut fetched = crate::time::now_ns();
    let old = read_open(fs, w, e.node)?;
    report::stat("fs.phase", CHANGE_PHASE);
    let t0 = crate::time::now_ns();
    let deadline = t0.saturating_add(CHANGE_DEADLINE_MS * 1_000_000);
    let (mut valid, mut polls) = (e.attr_valid, 0u32);
    let mut cached_ms = 0;
    let want = CHANGE_NEW.len() as u64;
    let (seen, new_size) = loop {
        let expires = fetched.saturating_add(ns(valid).max(CHANGE_MIN_POLL_MS * 1_000_000));
        let now = crate::time::now_ns();
        if now < expires {
            crate::time::wait_until((expires - now).div_ceil(1_000_000), || false);
            continue;
        }
        if now >= deadline {
            fs.forget(w, &[(e.node, 1)])?;
            return Err(FsError::Timeout);
        }
        if polls == 0 {
            cached_ms = (now - t0) / 1_000_000;
        }
        let g = fs.getattr(w, e.node, None)?;
        fetched = crate::time::now_ns();
        valid = g.attr_valid;
        polls += 1;
        if g.attr.size == want {
            break ((fetched - t0) / 1_000_000, g.attr.size);
        }
    };
    let new = read_open(fs, w, e.node);
    fs.forget(w, &[(e.node, 1)])?;
    let new = new?;
    Ok(Change {
        entry_valid: e.entry_valid,
        attr_valid: e.attr_valid,
        old_ok: old == CHANGE_OLD.as_bytes() && e.attr.size == CHANGE_OLD.len() as u64,
        old_size: e.attr.size,
        cached_ms,
        polls,
        seen_ms: seen,
        new_size,
        new_ok: new == CHANGE_NEW.as_bytes(),
        new_content: new,
    })
}

/// Reads all of `name` in pieces, hashing it: (length, FNV-1a).
fn read_hashed(fs: &mut Fs, w: &mut GuestWaiter, name: &str) -> FsResult<(u64, u64)> {
    let e = fs.lookup(w, NodeId::ROOT, name.as_bytes())?;
    let o = fs.open(w, e.node, open_flags::O_RDONLY)?;
    let mut buf = vec![0u8; PIECE];
    let (mut total, mut hash) = (0u64, FNV_OFFSET);
    let result = loop {
        match fs.read(w, e.node, o.fh, total, &mut buf) {
            Ok(0) => break Ok((total, hash)),
            Ok(n) => {
                hash = fnv1a(hash, buf.get(..n).unwrap_or(&[]));
                total += n as u64;
            }
            Err(e) => break Err(e),
        }
    };
    fs.release(w, e.node, o.fh, 0)?;
    fs.forget(w, &[(e.node, 1)])?;
    result
}

/// Creates `name` and writes `len` pattern bytes in pieces, then fsync, flush, release.
fn write_pattern(
    fs: &mut Fs,
    w: &mut GuestWaiter,
    name: &str,
    len: u64,
    seed: u64,
) -> FsResult<u64> {
    let (e, o) = fs.create(
        w,
        NodeId::ROOT,
        name.as_bytes(),
        open_flags::O_WRONLY | open_flags::O_TRUNC,
        0o644,
    )?;
    let mut buf = vec![0u8; PIECE];
    let mut at = 0u64;
    let result = loop {
        if at >= len {
            break Ok(at);
        }
        let n = (len - at).min(PIECE as u64) as usize;
        let piece = buf.get_mut(..n).unwrap_or(&mut []);
        for (i, b) in piece.iter_mut().enumerate() {
            *b = pattern_byte(seed, at + i as u64);
        }
        match fs.write(w, e.node, o.fh, at, piece) {
            Ok(done) if done == n => at += n as u64,
            Ok(done) => break Ok(at + done as u64),
            Err(err) => break Err(err),
        }
    };
    fs.fsync(w, e.node, o.fh, false)?;
    fs.flush(w, e.node, o.fh, 0)?;
    fs.release(w, e.node, o.fh, 0)?;
    fs.forget(w, &[(e.node, 1)])?;
    result
}

/// Creates `ATTR_NAME` with 1000 bytes, truncates it and changes its mode through
/// SETATTR; returns (size, permissions) as GETATTR reports them.
fn set_attributes(fs: &mut Fs, w: &mut GuestWaiter) -> FsResult<(u64, u32)> {
    let (e, o) = fs.create(
        w,
        NodeId::ROOT,
        ATTR_NAME.as_bytes(),
        open_flags::O_RDWR,
        0o644,
    )?;
    fs.write(w, e.node, o.fh, 0, &[b'a'; 1000])?;
    fs.release(w, e.node, o.fh, 0)?;
    let set = SetAttr {
        size: Some(ATTR_SIZE),
        mode: Some(ATTR_MODE),
        ..SetAttr::default()
    };
    let a = fs.setattr(w, e.node, set)?;
    let g = fs.getattr(w, e.node, None)?;
    fs.forget(w, &[(e.node, 1)])?;
    if g.attr != a.attr {
        return Err(FsError::Protocol {
            what: "GETATTR after SETATTR differs",
        });
    }
    Ok((g.attr.size, g.attr.perm()))
}

/// SETXATTR (two names), REMOVEXATTR (one), GETXATTR, LISTXATTR; FALLOCATE and LSEEK.
fn xattrs(fs: &mut Fs, w: &mut GuestWaiter) -> FsResult<(bool, bool, bool, u64)> {
    let (e, o) = fs.create(
        w,
        NodeId::ROOT,
        XATTR_FILE.as_bytes(),
        open_flags::O_RDWR,
        0o644,
    )?;
    fs.setxattr(w, e.node, XATTR_NAME.as_bytes(), XATTR_VALUE.as_bytes(), 0)?;
    fs.setxattr(w, e.node, XATTR_GONE.as_bytes(), b"x", 0)?;
    fs.removexattr(w, e.node, XATTR_GONE.as_bytes())?;
    let mut buf = [0u8; 256];
    let n = fs.getxattr(w, e.node, XATTR_NAME.as_bytes(), &mut buf)?;
    let value_ok = buf.get(..n) == Some(XATTR_VALUE.as_bytes());
    let gone = fs.getxattr(w, e.node, XATTR_GONE.as_bytes(), &mut buf)
        == Err(FsError::Errno(Errno::ENODATA));
    let n = fs.listxattr(w, e.node, &mut buf)?;
    let listed = virtio_fs::xattr_names(buf.get(..n).unwrap_or(&[]))?
        .any(|name| name == XATTR_NAME.as_bytes());
    fs.fallocate(w, e.node, o.fh, 0, FALLOCATE_LEN, 0)?;
    let end = fs.lseek(w, e.node, o.fh, 0, 2)?;
    fs.release(w, e.node, o.fh, 0)?;
    fs.forget(w, &[(e.node, 1)])?;
    Ok((value_ok, listed, gone, end))
}

/// READDIRPLUS of `many`: (names matching `entry-NNNN`, lookups returned).
fn read_many(fs: &mut Fs, w: &mut GuestWaiter) -> FsResult<(usize, usize)> {
    let dir = fs.lookup(w, NodeId::ROOT, MANY_DIR.as_bytes())?;
    let h = fs.opendir(w, dir.node)?;
    let mut seen = vec![false; MANY_COUNT];
    let mut refs: Vec<(NodeId, u64)> = Vec::with_capacity(MANY_COUNT + 2);
    let mut odd = 0usize;
    let mut buf = vec![0u8; 32 * 1024];
    let listed = fs.read_dir(w, dir.node, h.fh, true, &mut buf, |e| {
        if let Some(entry) = e.entry {
            refs.push((entry.node, 1));
        }
        if e.name == b"." || e.name == b".." {
            return;
        }
        let index = e
            .name
            .strip_prefix(b"entry-")
            .and_then(|n| core::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok());
        match index.and_then(|i| seen.get_mut(i)) {
            Some(s) if !*s && e.kind == Some(FileType::Regular) => *s = true,
            _ => odd += 1,
        }
    });
    fs.releasedir(w, dir.node, h.fh)?;
    let forgotten = refs.len();
    fs.forget(w, &refs)?;
    fs.forget(w, &[(dir.node, 1)])?;
    let listed = listed?;
    report::stat("fs.readdirplus_records", listed);
    if odd != 0 {
        return Err(FsError::Protocol {
            what: "unexpected or repeated names in the directory",
        });
    }
    Ok((seen.iter().filter(|s| **s).count(), forgotten))
}
