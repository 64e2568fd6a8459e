//! The virtio-fs driver over `VirtioDevice<PciTransport<..>>` and the simulated PCI
//! function, with `fs_model` — a FUSE server over a real temporary directory — serving
//! the requests (rings served by rust-vmm's `virtio-queue`). Every effect is checked on
//! the host directory with std::fs, and hostile replies of every kind the driver parses
//! are errors, never panics.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use virtio_core::platform::InterruptMode;
use virtio_core::{Bus, DeviceStatus, Error, VirtioDevice};
use virtio_fs::wire::opcode;
use virtio_fs::{
    Errno, FileType, FsDriver, FsError, FsOptions, FsResult, NodeId, Notification, Reply, Request,
    SetAttr, SetTime, Timespec, Waiter, open_flags, rename_flags,
};
use virtio_pci::{PciTransport, Preference, probe};
use virtio_tests::fs_model::{
    FsModel, Tamper, notify_code, notify_delete, notify_inval_entry, notify_inval_inode,
    notify_lock, notify_message, op,
};
use virtio_tests::sim::{Sim, SimBars, SimConfig, SimIrq, walk_allocation_failures};

type Dev =
    VirtioDevice<PciTransport<SimConfig, SimBars>, virtio_tests::mem::IdentityMemory, SimIrq>;
type Fs = FsDriver<Dev>;

const RING: u64 = (1 << 28) | (1 << 29) | (1 << 30);

/// Counts heap allocations made by the current thread while counting is on: the I/O path
/// (`submit`, `kick`, `poll`, `take`) must make none.
struct CountingAllocator;

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the counters are
// thread-local `Cell`s with const initialisers, which never allocate.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result with the allocations it made on this thread.
fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCATIONS.with(|a| a.get()))
}

/// Serves the model whenever the driver waits, then feeds the interrupts the simulated
/// function raised to the driver (so the interrupt path is what completes requests).
struct SimWaiter<'a> {
    sim: &'a Sim,
    model: &'a mut FsModel,
    idle: u32,
}

impl Waiter<Dev> for SimWaiter<'_> {
    fn wait(&mut self, fs: &mut Fs) -> FsResult<()> {
        // The device side allocates freely: not counted as the driver's.
        let counting = COUNTING.with(|c| c.replace(false));
        let result = self.serve_and_interrupt(fs);
        COUNTING.with(|c| c.set(counting));
        result
    }
}

impl SimWaiter<'_> {
    fn serve_and_interrupt(&mut self, fs: &mut Fs) -> FsResult<()> {
        let mut served = 0;
        for q in 0..self.model.queue_count() {
            served += self.model.serve(self.sim, q);
        }
        let irqs = self.sim.take_interrupts();
        for irq in &irqs {
            fs.handle_interrupt(irq.vector())?;
        }
        if served == 0 && irqs.is_empty() {
            self.idle += 1;
            if self.idle > 100 {
                return Err(FsError::Timeout);
            }
        } else {
            self.idle = 0;
        }
        Ok(())
    }
}

struct Rig {
    _dir: TempDir,
    root: PathBuf,
    sim: Sim,
    model: FsModel,
    fs: Fs,
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "virtio-fs-sim-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn try_rig(
    name: &str,
    opts: FsOptions,
    tweak: impl FnOnce(&mut FsModel),
) -> (TempDir, Sim, FsModel, FsResult<Fs>) {
    let dir = TempDir::new(name);
    let mut model = FsModel::new(&dir.0, "hostshare");
    tweak(&mut model);
    let sim = model.sim_builder(RING, 64, 64 << 20).build();
    let t = probe(sim.config_space(), sim.bars(), Preference::Auto).expect("probe");
    let dev = VirtioDevice::new(t, sim.memory(), sim.irq());
    let fs = FsDriver::new(dev, opts);
    (dir, sim, model, fs)
}

fn rig_with(name: &str, opts: FsOptions, tweak: impl FnOnce(&mut FsModel)) -> Rig {
    let (dir, sim, model, fs) = try_rig(name, opts, tweak);
    let fs = fs.unwrap_or_else(|e| panic!("setup: {e}"));
    sim.check_init_order().unwrap();
    let mut rig = Rig {
        root: dir.0.clone(),
        _dir: dir,
        sim,
        model,
        fs,
    };
    rig.run(|fs, w| fs.init(w)).expect("FUSE_INIT");
    rig
}

fn rig(name: &str) -> Rig {
    rig_with(name, FsOptions::default(), |_| {})
}

impl Rig {
    fn run<R>(&mut self, f: impl FnOnce(&mut Fs, &mut SimWaiter<'_>) -> R) -> R {
        let mut w = SimWaiter {
            sim: &self.sim,
            model: &mut self.model,
            idle: 0,
        };
        f(&mut self.fs, &mut w)
    }

    fn no_violations(&self) {
        assert!(
            self.model.violations.is_empty(),
            "driver broke the protocol: {:?}",
            self.model.violations
        );
    }

    /// Runs one request and returns its result, with the model's replies as they are.
    fn call(&mut self, req: &Request<'_>, out: &mut [u8]) -> FsResult<Reply> {
        self.run(|fs, w| fs.call(w, req, out))
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

#[test]
fn init_reads_config_and_negotiates() {
    let mut r = rig("init");
    assert_eq!(r.fs.config().tag(), "hostshare");
    assert_eq!(r.fs.config().num_request_queues, 1);
    let info = r.fs.init_info().unwrap();
    assert_eq!((info.major, info.minor), (7, 31));
    assert_eq!(info.max_write, 128 * 1024);
    assert_eq!(info.max_pages, 64);
    assert_eq!(info.flags, virtio_fs::driver::OFFERED_INIT_FLAGS);
    // 64 KiB slot buffers: both chunks are the buffer.
    assert_eq!((r.fs.read_chunk(), r.fs.write_chunk()), (65536, 65536));
    assert!(matches!(
        r.fs.bus().interrupt_mode(),
        InterruptMode::MsiX { .. }
    ));
    assert!(r.sim.status() & DeviceStatus::DRIVER_OK.bits() != 0);
    // An older daemon (minor 27) is fine; INIT is repeatable after DESTROY.
    r.run(|fs, w| fs.destroy(w)).unwrap();
    r.model.minor = 27;
    let again = r.run(|fs, w| fs.init(w)).unwrap();
    assert_eq!(again.minor, 27);
    r.no_violations();
}

#[test]
fn requests_before_init_are_refused() {
    let (_d, _sim, _m, fs) = try_rig("noinit", FsOptions::default(), |_| {});
    let mut fs = fs.unwrap();
    assert_eq!(
        fs.submit(&Request::Statfs { node: NodeId::ROOT })
            .unwrap_err(),
        FsError::NotInitialized
    );
}

#[test]
fn file_lifecycle_against_a_real_directory() {
    let mut r = rig("files");
    let root = NodeId::ROOT;
    let name = "hello wörld ✓.bin".as_bytes();
    // CREATE + WRITE of 300 KiB: five 64 KiB WRITEs, several in flight.
    let data = pattern(300 * 1024 + 17, 3);
    let (entry, opened) = r
        .run(|fs, w| fs.create(w, root, name, open_flags::O_RDWR, 0o644))
        .unwrap();
    assert_eq!(entry.attr.kind, FileType::Regular);
    let n = r
        .run(|fs, w| fs.write(w, entry.node, opened.fh, 0, &data))
        .unwrap();
    assert_eq!(n, data.len());
    r.run(|fs, w| fs.fsync(w, entry.node, opened.fh, false))
        .unwrap();
    r.run(|fs, w| fs.flush(w, entry.node, opened.fh, 0))
        .unwrap();
    let host = r.root.join("hello wörld ✓.bin");
    assert_eq!(std::fs::read(&host).unwrap(), data, "host sees the bytes");
    let writes: Vec<_> = r
        .model
        .records
        .iter()
        .filter(|x| x.opcode == op::WRITE)
        .collect();
    assert_eq!(writes.len(), 5);
    assert!(
        writes.iter().any(|x| x.batch_len > 1),
        "WRITEs were in flight together"
    );
    // READ back past the end: a short result at the end of the file.
    let mut back = vec![0u8; data.len() + 5000];
    let got = r
        .run(|fs, w| fs.read(w, entry.node, opened.fh, 0, &mut back))
        .unwrap();
    assert_eq!(got, data.len());
    assert_eq!(&back[..got], &data[..]);
    // An unaligned read in the middle.
    let mut mid = vec![0u8; 70_000];
    let got = r
        .run(|fs, w| fs.read(w, entry.node, opened.fh, 12_345, &mut mid))
        .unwrap();
    assert_eq!(got, mid.len());
    assert_eq!(&mid[..], &data[12_345..12_345 + 70_000]);
    r.run(|fs, w| fs.release(w, entry.node, opened.fh, 0))
        .unwrap();

    // SETATTR: size and mode, checked on the host; times.
    let set = SetAttr {
        size: Some(1000),
        mode: Some(0o600),
        mtime: Some(SetTime::At(Timespec {
            secs: 1_000_000_000,
            nanos: 5,
        })),
        ..SetAttr::default()
    };
    let a = r.run(|fs, w| fs.setattr(w, entry.node, set)).unwrap();
    assert_eq!((a.attr.size, a.attr.perm()), (1000, 0o600));
    let m = std::fs::metadata(&host).unwrap();
    assert_eq!((m.len(), m.permissions().mode() & 0o7777), (1000, 0o600));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 5));
    let g = r.run(|fs, w| fs.getattr(w, entry.node, None)).unwrap();
    assert_eq!(g.attr, a.attr);

    // LOOKUP of the same name finds the same node.
    let again = r.run(|fs, w| fs.lookup(w, root, name)).unwrap();
    assert_eq!(again.node, entry.node);
    assert_eq!(again.attr.ino, m.ino());

    // RENAME2 (plain and NOREPLACE), LINK, SYMLINK/READLINK, UNLINK.
    r.run(|fs, w| fs.rename(w, root, name, root, b"renamed", 0))
        .unwrap();
    assert!(!host.exists() && r.root.join("renamed").exists());
    std::fs::write(r.root.join("other"), b"x").unwrap();
    assert_eq!(
        r.run(|fs, w| fs.rename(w, root, b"renamed", root, b"other", rename_flags::NOREPLACE)),
        Err(FsError::Errno(Errno::EEXIST))
    );
    let linked = r
        .run(|fs, w| fs.link(w, entry.node, root, b"hard link"))
        .unwrap();
    assert_eq!(linked.attr.nlink, 2);
    assert_eq!(
        std::fs::metadata(r.root.join("hard link")).unwrap().ino(),
        m.ino()
    );
    let sl = r
        .run(|fs, w| fs.symlink(w, root, b"sym", b"renamed"))
        .unwrap();
    assert_eq!(sl.attr.kind, FileType::Symlink);
    assert_eq!(
        std::fs::read_link(r.root.join("sym")).unwrap(),
        PathBuf::from("renamed")
    );
    let mut target = [0u8; 64];
    let n = r.run(|fs, w| fs.readlink(w, sl.node, &mut target)).unwrap();
    assert_eq!(&target[..n], b"renamed");
    r.run(|fs, w| fs.unlink(w, root, b"hard link")).unwrap();
    assert!(!r.root.join("hard link").exists());

    // MKDIR / RMDIR, errors as typed values.
    let d = r.run(|fs, w| fs.mkdir(w, root, b"dir", 0o755)).unwrap();
    assert_eq!(d.attr.kind, FileType::Directory);
    assert!(r.root.join("dir").is_dir());
    assert_eq!(
        r.run(|fs, w| fs.mkdir(w, root, b"dir", 0o755)),
        Err(FsError::Errno(Errno::EEXIST))
    );
    std::fs::write(r.root.join("dir/f"), b"").unwrap();
    assert_eq!(
        r.run(|fs, w| fs.rmdir(w, root, b"dir")),
        Err(FsError::Errno(Errno::ENOTEMPTY))
    );
    std::fs::remove_file(r.root.join("dir/f")).unwrap();
    r.run(|fs, w| fs.rmdir(w, root, b"dir")).unwrap();
    assert!(!r.root.join("dir").exists());
    assert_eq!(
        r.run(|fs, w| fs.lookup(w, root, b"missing")),
        Err(FsError::Errno(Errno::ENOENT))
    );
    // Names the driver refuses to send.
    for bad in [&b""[..], b"a/b", b"a\0b", &[b'x'; 256][..]] {
        assert_eq!(
            r.run(|fs, w| fs.lookup(w, root, bad)),
            Err(FsError::InvalidName)
        );
    }

    // STATFS.
    let s = r.run(|fs, w| fs.statfs(w, root)).unwrap();
    assert!(s.blocks > 0 && s.bsize > 0 && s.namelen >= 255);

    // FORGET every lookup reference the driver was given; the server drops the nodes.
    let nodes = [(entry.node, 3), (sl.node, 1), (d.node, 1)];
    r.run(|fs, w| fs.forget(w, &nodes)).unwrap();
    r.run(|fs, w| fs.forget(w, &[])).unwrap();
    r.model.serve(&r.sim, 0);
    assert_eq!(r.model.forgets.len(), 3);
    assert_eq!(r.model.live_nodes(), 0, "every node forgotten");
    let st = r.fs.stats();
    assert_eq!(st.forget_requests, 1);
    assert_eq!(st.bytes_written, data.len() as u64);
    assert_eq!(st.protocol_errors, 0);
    r.no_violations();
}

#[test]
fn readdirplus_of_a_thousand_entries() {
    let mut r = rig("dir");
    let big = r.root.join("big dir");
    std::fs::create_dir(&big).unwrap();
    let mut want: Vec<String> = (0..1000).map(|i| format!("entry ✓ {i:04}")).collect();
    for n in &want {
        std::fs::write(big.join(n), n.as_bytes()).unwrap();
    }
    want.sort();
    let dir = r
        .run(|fs, w| fs.lookup(w, NodeId::ROOT, b"big dir"))
        .unwrap();
    for plus in [false, true] {
        let h = r.run(|fs, w| fs.opendir(w, dir.node)).unwrap();
        let mut buf = vec![0u8; 8192];
        let mut names = Vec::new();
        let mut refs = Vec::new();
        let count = r
            .run(|fs, w| {
                fs.read_dir(w, dir.node, h.fh, plus, &mut buf, |e| {
                    names.push(String::from_utf8(e.name.to_vec()).unwrap());
                    if let Some(entry) = e.entry {
                        assert_eq!(entry.attr.size as usize, e.name.len());
                        refs.push((entry.node, 1));
                    }
                })
            })
            .unwrap();
        assert_eq!(count, 1002);
        names.retain(|n| n != "." && n != "..");
        names.sort();
        assert_eq!(names, want);
        assert_eq!(refs.len(), if plus { 1000 } else { 0 });
        r.run(|fs, w| fs.forget(w, &refs)).unwrap();
        r.run(|fs, w| fs.releasedir(w, dir.node, h.fh)).unwrap();
        r.run(|fs, w| fs.fsyncdir(w, dir.node, h.fh, false)).ok();
    }
    r.model.serve(&r.sim, 0);
    // Only the directory's own lookup is left.
    assert_eq!(r.model.live_nodes(), 1);
    assert!(r.fs.stats().forget_requests >= 1000 / virtio_fs::driver::FORGET_BATCH_MAX as u64);
}

#[test]
fn several_requests_in_flight_complete_out_of_order_by_unique() {
    let mut r = rig("inflight");
    for i in 0..10 {
        std::fs::write(r.root.join(format!("f{i}")), vec![b'x'; i * 100]).unwrap();
    }
    let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    let tickets: Vec<_> = names
        .iter()
        .map(|n| {
            r.fs.submit(&Request::Lookup {
                parent: NodeId::ROOT,
                name: n.as_bytes(),
            })
            .unwrap()
        })
        .collect();
    r.fs.kick().unwrap();
    r.model.reverse_completion = true;
    assert_eq!(
        r.model.serve(&r.sim, 1),
        10,
        "all ten were in flight at once"
    );
    r.fs.poll().unwrap();
    // Taken in submission order although completed in reverse.
    for (i, t) in tickets.iter().enumerate() {
        assert!(r.fs.is_done(*t));
        let Reply::Entry(e) = r.fs.take(*t, &mut []).unwrap() else {
            panic!("not an entry")
        };
        assert_eq!(e.attr.size, i as u64 * 100);
        assert_eq!(r.fs.take(*t, &mut []), Err(FsError::UnknownTicket), "once");
    }
    // The slots are free again: another full batch fits.
    let t =
        r.fs.submit(&Request::Statfs { node: NodeId::ROOT })
            .unwrap();
    r.fs.kick().unwrap();
    r.run(|fs, w| fs.wait_for(w, t)).unwrap();
    assert!(matches!(r.fs.take(t, &mut []), Ok(Reply::Statfs(_))));
    r.no_violations();
}

#[test]
fn io_is_split_by_max_write_and_max_pages() {
    let mut r = rig_with(
        "split",
        FsOptions {
            data_size: 32 * 1024,
            slots: 4,
            ..FsOptions::default()
        },
        |m| {
            m.max_write = 8192;
            m.max_pages = 4;
        },
    );
    assert_eq!((r.fs.read_chunk(), r.fs.write_chunk()), (16384, 8192));
    let data = pattern(100_000, 9);
    let (e, o) = r
        .run(|fs, w| fs.create(w, NodeId::ROOT, b"split", open_flags::O_RDWR, 0o600))
        .unwrap();
    assert_eq!(
        r.run(|fs, w| fs.write(w, e.node, o.fh, 0, &data)),
        Ok(100_000)
    );
    let mut back = vec![0u8; 100_000];
    assert_eq!(
        r.run(|fs, w| fs.read(w, e.node, o.fh, 0, &mut back)),
        Ok(100_000)
    );
    assert_eq!(back, data);
    let sizes = |opc| -> Vec<u32> {
        r.model
            .records
            .iter()
            .filter(|x| x.opcode == opc)
            .map(|x| x.size)
            .collect()
    };
    let writes = sizes(op::WRITE);
    let reads = sizes(op::READ);
    assert_eq!(writes.len(), 13);
    assert!(writes.iter().all(|&s| s <= 8192));
    assert_eq!(reads.len(), 7);
    assert!(reads.iter().all(|&s| s <= 16384));
    // At most four in flight (the slot count).
    assert!(r.model.records.iter().all(|x| x.batch_len <= 4));
    assert!(r.model.records.iter().any(|x| x.batch_len == 4));
    // Too large for one request: refused before reaching the device.
    assert_eq!(
        r.fs.submit(&Request::Read {
            node: e.node,
            fh: o.fh,
            offset: 0,
            size: 16385
        }),
        Err(FsError::InvalidArgument)
    );
    r.no_violations();
}

// ---- hostile devices ----

/// Runs GETATTR of the root with `tamper` applied to its reply.
fn hostile_reply(
    name: &str,
    opc: u32,
    req: impl Fn(NodeId) -> Request<'static>,
    tamper: impl FnMut(&mut Vec<u8>) + Send + 'static,
) -> (Rig, FsResult<Reply>) {
    let mut r = rig(name);
    let mut tamper = tamper;
    r.model.tamper = Some(Box::new(move |o, reply| {
        if o == opc {
            tamper(reply)
        }
    }));
    let mut out = vec![0u8; 65536];
    let result = r.call(&req(NodeId::ROOT), &mut out);
    r.model.tamper = None;
    (r, result)
}

fn getattr(node: NodeId) -> Request<'static> {
    Request::Getattr { node, fh: None }
}

fn protocol(result: &FsResult<Reply>) -> &'static str {
    match result {
        Err(FsError::Protocol { what }) => what,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn hostile_reply_headers_are_errors() {
    // `unique` not the request's.
    let (mut r, res) = hostile_reply("h-unique", op::GETATTR, getattr, |b| b[8] ^= 0x55);
    assert!(protocol(&res).contains("unique"));
    // The driver goes on: the next request is fine.
    assert!(r.call(&getattr(NodeId::ROOT), &mut []).is_ok());
    assert_eq!(r.fs.stats().protocol_errors, 1);

    // Header length disagreeing with the bytes written.
    let (_, res) = hostile_reply("h-len", op::GETATTR, getattr, |b| {
        let l = u32::from_le_bytes(b[0..4].try_into().unwrap());
        set_u32(b, 0, l + 8)
    });
    assert!(protocol(&res).contains("length"));
    // A reply shorter than the structure (consistent header).
    let (_, res) = hostile_reply("h-short", op::GETATTR, getattr, |b| {
        b.truncate(16 + 50);
        set_u32(b, 0, 66)
    });
    assert!(protocol(&res).contains("differs"));
    // A reply shorter than a header.
    let (_, res) = hostile_reply("h-tiny", op::GETATTR, getattr, |b| b.truncate(10));
    assert!(protocol(&res).contains("header"));
    // A positive error, an error beyond MAX_ERRNO, an error with a payload.
    let (_, res) = hostile_reply("h-pos", op::GETATTR, getattr, |b| {
        b.truncate(16);
        set_u32(b, 0, 16);
        set_u32(b, 4, 5)
    });
    assert!(protocol(&res).contains("errno"));
    let (_, res) = hostile_reply("h-big", op::GETATTR, getattr, |b| {
        b.truncate(16);
        set_u32(b, 0, 16);
        set_u32(b, 4, (-5000i32) as u32)
    });
    assert!(protocol(&res).contains("errno"));
    let (_, res) = hostile_reply("h-payload", op::GETATTR, getattr, |b| {
        set_u32(b, 4, (-2i32) as u32)
    });
    assert!(protocol(&res).contains("payload"));
    // A proper errno.
    let (_, res) = hostile_reply("h-errno", op::GETATTR, getattr, |b| {
        b.truncate(16);
        set_u32(b, 0, 16);
        set_u32(b, 4, (-13i32) as u32)
    });
    assert_eq!(res, Err(FsError::Errno(Errno::EACCES)));
    // Payload on a reply that has none: the writable part holds only the header, so the
    // header's length cannot match what the device could write.
    let (_, res) = hostile_reply(
        "h-empty",
        op::FSYNCDIR,
        |n| Request::Fsyncdir {
            node: n,
            fh: virtio_fs::FileHandle(0),
            datasync: false,
        },
        |b| {
            b.extend_from_slice(&[0; 8]);
            set_u32(b, 0, 24)
        },
    );
    assert!(protocol(&res).contains("length"));
}

#[test]
fn hostile_used_lengths_are_errors() {
    // A used length beyond the chain's writable capacity: the bus refuses it.
    let mut r = rig("used-len");
    r.model.used_len = Some(Box::new(|_, _| 1 << 20));
    let res = r.call(&getattr(NodeId::ROOT), &mut []);
    assert!(
        matches!(res, Err(FsError::Virtio(Error::UsedLenTooLarge { .. }))),
        "{res:?}"
    );
    // DESTROY may complete without a reply (virtiofsd writes none); other requests may
    // not.
    let mut r = rig("no-reply");
    r.model.used_len = Some(Box::new(|o, w| {
        if o == op::DESTROY || o == op::FSYNCDIR {
            0
        } else {
            w
        }
    }));
    r.run(|fs, w| fs.destroy(w)).unwrap();
    assert!(r.fs.init_info().is_none());
    r.run(|fs, w| fs.init(w)).unwrap();
    let res = r.call(
        &Request::Fsyncdir {
            node: NodeId::ROOT,
            fh: virtio_fs::FileHandle(0),
            datasync: true,
        },
        &mut [],
    );
    assert!(protocol(&res).contains("shorter"));
    // A used length below what the header says (the header claims more).
    let mut r = rig("used-short");
    r.model.used_len = Some(Box::new(|_, w| w - 8));
    let res = r.call(&getattr(NodeId::ROOT), &mut []);
    assert!(protocol(&res).contains("length"));
}

#[test]
fn hostile_attributes_entries_and_statfs_are_errors() {
    // Attributes: no file type; size beyond i64; nanoseconds >= 1e9.
    let mode_at = 16 + 16 + 60;
    let (_, res) = hostile_reply("a-mode", op::GETATTR, getattr, move |b| {
        set_u32(b, mode_at, 0o644)
    });
    assert!(protocol(&res).contains("file type"));
    let (_, res) = hostile_reply("a-size", op::GETATTR, getattr, |b| {
        b[16 + 16 + 8..16 + 16 + 16].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    assert!(protocol(&res).contains("size"));
    let (_, res) = hostile_reply("a-ns", op::GETATTR, getattr, |b| {
        set_u32(b, 16 + 16 + 48, 1_000_000_000)
    });
    assert!(protocol(&res).contains("nanoseconds"));
    let (_, res) = hostile_reply("a-valid-ns", op::GETATTR, getattr, |b| {
        set_u32(b, 16 + 8, 2_000_000_000)
    });
    assert!(protocol(&res).contains("nanoseconds"));
    // A MKDIR entry with node id 0; a LOOKUP with node id 0 is a negative entry (ENOENT).
    let (_, res) = hostile_reply(
        "e-zero",
        op::MKDIR,
        |n| Request::Mkdir {
            parent: n,
            name: b"d",
            mode: 0o755,
            umask: 0,
        },
        |b| b[16..24].copy_from_slice(&0u64.to_le_bytes()),
    );
    assert!(protocol(&res).contains("node id 0"));
    let (mut r, _) = hostile_reply("e-neg", op::STATFS, |n| Request::Statfs { node: n }, |_| {});
    std::fs::write(r.root.join("x"), b"").unwrap();
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::LOOKUP {
            b[16..24].copy_from_slice(&0u64.to_le_bytes())
        }
    }));
    let res = r.call(
        &Request::Lookup {
            parent: NodeId::ROOT,
            name: b"x",
        },
        &mut [],
    );
    assert_eq!(res, Err(FsError::Errno(Errno::ENOENT)));
    // CREATE's entry with a bad attribute.
    let (_, res) = hostile_reply(
        "c-attr",
        op::CREATE,
        |n| Request::Create {
            parent: n,
            name: b"c",
            flags: open_flags::O_RDWR,
            mode: 0o644,
            umask: 0,
        },
        move |b| set_u32(b, 16 + 40 + 60, 0),
    );
    assert!(protocol(&res).contains("file type"));
    // Statfs free counts above the totals.
    let (_, res) = hostile_reply(
        "s-free",
        op::STATFS,
        |n| Request::Statfs { node: n },
        |b| b[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes()),
    );
    assert!(protocol(&res).contains("statfs"));
    // WRITE claiming more bytes than were sent.
    let mut r = rig("w-more");
    let (e, o) = r
        .run(|fs, w| fs.create(w, NodeId::ROOT, b"w", open_flags::O_RDWR, 0o600))
        .unwrap();
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::WRITE {
            set_u32(b, 16, 5000)
        }
    }));
    let res = r.run(|fs, w| fs.write(w, e.node, o.fh, 0, &[1u8; 100]));
    assert!(matches!(res, Err(FsError::Protocol { .. })), "{res:?}");
    // Also taken raw (refused in `poll`, not only by `write`), and not counted written.
    let res = r.call(
        &Request::Write {
            node: e.node,
            fh: o.fh,
            offset: 0,
            data: &[1u8; 100],
        },
        &mut [],
    );
    assert!(protocol(&res).contains("more bytes than were sent"));
    assert_eq!(r.fs.stats().bytes_written, 0);
}

#[test]
fn hostile_init_replies_are_errors() {
    let (_d, sim, mut model, fs) = try_rig("init-major", FsOptions::default(), |m| m.major = 8);
    let mut fs = fs.unwrap();
    let mut w = SimWaiter {
        sim: &sim,
        model: &mut model,
        idle: 0,
    };
    assert_eq!(
        fs.init(&mut w),
        Err(FsError::UnsupportedVersion {
            major: 8,
            minor: 31
        })
    );
    assert!(fs.init_info().is_none());
    let (_d, sim, mut model, fs) = try_rig("init-minor", FsOptions::default(), |m| m.minor = 20);
    let mut fs = fs.unwrap();
    let mut w = SimWaiter {
        sim: &sim,
        model: &mut model,
        idle: 0,
    };
    assert!(matches!(
        fs.init(&mut w),
        Err(FsError::UnsupportedVersion { .. })
    ));
    let (_d, sim, mut model, fs) = try_rig("init-len", FsOptions::default(), |_| {});
    model.tamper = Some(Box::new(|_, b| {
        b.truncate(16 + 20);
        set_u32(b, 0, 36)
    }));
    let mut fs = fs.unwrap();
    let mut w = SimWaiter {
        sim: &sim,
        model: &mut model,
        idle: 0,
    };
    assert!(matches!(fs.init(&mut w), Err(FsError::Protocol { .. })));
}

#[test]
fn hostile_directory_records_are_errors() {
    // Each case edits the first record of a READDIRPLUS reply (".", with a zero entry).
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, Edit); 6] = [
        ("namelen 0", |b| set_u32(b, 16 + 128 + 16, 0)),
        ("namelen huge", |b| set_u32(b, 16 + 128 + 16, 5000)),
        ("namelen past the reply", |b| {
            let n = b.len() - 16 - 128 - 24 + 1;
            set_u32(b, 16 + 128 + 16, n as u32)
        }),
        ("offset 0", |b| {
            b[16 + 128 + 8..16 + 128 + 16].copy_from_slice(&0u64.to_le_bytes())
        }),
        ("slash in name", |b| b[16 + 128 + 24] = b'/'),
        ("padding not zero", |b| b[16 + 128 + 24 + 1] = 7),
    ];
    for (what, edit) in cases {
        let mut r = rig("dirent");
        let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
        r.model.tamper = Some(Box::new(move |o, b| {
            if o == op::READDIRPLUS {
                edit(b)
            }
        }));
        let mut buf = vec![0u8; 4096];
        let res = r.run(|fs, w| fs.read_dir(w, NodeId::ROOT, h.fh, true, &mut buf, |_| {}));
        assert!(
            matches!(res, Err(FsError::Protocol { .. })),
            "{what}: {res:?}"
        );
    }
    // A record cut short (reply ends inside the header), consistently framed.
    let mut r = rig("dirent-cut");
    let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::READDIR {
            b.truncate(16 + 12);
            set_u32(b, 0, 28)
        }
    }));
    let mut buf = vec![0u8; 4096];
    let res = r.run(|fs, w| fs.read_dir(w, NodeId::ROOT, h.fh, false, &mut buf, |_| {}));
    assert!(matches!(res, Err(FsError::Protocol { .. })), "{res:?}");
    // A reply claiming more directory data than the request allows: refused.
    let mut r = rig("dirent-long");
    let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
    r.model.used_len = Some(Box::new(|o, w| if o == op::READDIR { w + 8192 } else { w }));
    let res = r.run(|fs, w| fs.read_dir(w, NodeId::ROOT, h.fh, false, &mut buf, |_| {}));
    assert!(matches!(res, Err(FsError::Virtio(_))), "{res:?}");
}

#[test]
fn hostile_used_ring_and_config_are_errors() {
    // A forged used id on a request queue.
    let mut r = rig("forged");
    r.sim.complete_raw(1, 7, 16);
    let res = r.fs.poll();
    assert!(matches!(res, Err(FsError::Virtio(_))), "{res:?}");
    // Empty tag, non-UTF-8 tag, no request queues: FAILED, not a panic.
    for (what, tweak) in [
        (
            "empty tag",
            Box::new(|m: &mut FsModel| m.tag.clear()) as Box<dyn FnOnce(&mut FsModel)>,
        ),
        (
            "bad utf-8",
            Box::new(|m: &mut FsModel| m.tag = vec![0xff, 0xfe]),
        ),
        (
            "no queues",
            Box::new(|m: &mut FsModel| m.num_request_queues = 0),
        ),
    ] {
        let (_d, sim, _m, fs) = try_rig("cfg", FsOptions::default(), tweak);
        assert!(fs.is_err(), "{what}");
        assert!(sim.status() & DeviceStatus::FAILED.bits() != 0, "{what}");
    }
}

#[test]
fn requests_carry_what_the_server_checks() {
    // Every opcode the driver sends is framed right (the model checks lengths, uniques,
    // names) and the opcodes are the protocol's.
    let mut r = rig("framing");
    let (e, o) = r
        .run(|fs, w| fs.create(w, NodeId::ROOT, b"f", open_flags::O_RDWR, 0o644))
        .unwrap();
    r.run(|fs, w| fs.write(w, e.node, o.fh, 0, b"abc")).unwrap();
    r.run(|fs, w| fs.release(w, e.node, o.fh, 0)).unwrap();
    let o2 = r
        .run(|fs, w| fs.open(w, e.node, open_flags::O_RDONLY))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(r.run(|fs, w| fs.read(w, e.node, o2.fh, 0, &mut b)), Ok(3));
    r.run(|fs, w| fs.release(w, e.node, o2.fh, 0)).unwrap();
    let ops: Vec<u32> = r.model.records.iter().map(|x| x.opcode).collect();
    assert_eq!(
        ops,
        [
            opcode::INIT,
            opcode::CREATE,
            opcode::WRITE,
            opcode::RELEASE,
            opcode::OPEN,
            opcode::READ,
            opcode::RELEASE
        ]
    );
    let uniques: std::collections::BTreeSet<u64> =
        r.model.records.iter().map(|x| x.unique).collect();
    assert_eq!(uniques.len(), ops.len(), "uniques never repeat");
    r.no_violations();
}

#[test]
fn every_allocation_failure_in_setup_resets_and_frees() {
    let dir = TempDir::new("alloc");
    let model = FsModel::new(&dir.0, "hostshare");
    let needed = walk_allocation_failures(
        "virtio-fs",
        || model.sim_builder(RING, 64, 64 << 20).build(),
        |sim| {
            let t = probe(sim.config_space(), sim.bars(), Preference::Auto).expect("probe");
            FsDriver::new(
                VirtioDevice::new(t, sim.memory(), sim.irq()),
                FsOptions::default(),
            )
        },
        |sim, allowed| {
            // Past queue setup, a failure resets the device (status 0).
            if allowed > 2 {
                assert_eq!(sim.status(), 0, "not reset when allocation {allowed} fails");
            }
        },
    );
    // Rings of two queues, the hiprio slots and one request queue's slots.
    assert!(needed >= 3, "{needed}");
}

#[test]
fn every_allocation_failure_in_setup_with_notification_resets_and_frees() {
    let dir = TempDir::new("nalloc");
    let mut model = FsModel::new(&dir.0, "hostshare");
    model.notify_buf_size = Some(256);
    let needed = walk_allocation_failures(
        "virtio-fs notification",
        || model.sim_builder(RING, 64, 64 << 20).build(),
        |sim| {
            let t = probe(sim.config_space(), sim.bars(), Preference::Auto).expect("probe");
            FsDriver::new(
                VirtioDevice::new(t, sim.memory(), sim.irq()),
                FsOptions::default(),
            )
        },
        |sim, allowed| {
            if allowed > 3 {
                assert_eq!(sim.status(), 0, "not reset when allocation {allowed} fails");
            }
        },
    );
    // Rings of three queues, the hiprio slots, the notification buffers and one request
    // queue's slots.
    assert!(needed >= 5, "{needed}");
}

#[test]
fn requests_spread_over_several_request_queues() {
    let mut r = rig_with(
        "mq",
        FsOptions {
            max_request_queues: 4,
            slots: 4,
            ..FsOptions::default()
        },
        |m| m.num_request_queues = 2,
    );
    assert_eq!(r.fs.request_queues(), 2);
    std::fs::write(r.root.join("f"), b"0123456789").unwrap();
    let tickets: Vec<_> = (0..8)
        .map(|_| {
            r.fs.submit(&Request::Lookup {
                parent: NodeId::ROOT,
                name: b"f",
            })
            .unwrap()
        })
        .collect();
    // Eight slots in all: the ninth waits for a completion.
    assert_eq!(
        r.fs.submit(&Request::Statfs { node: NodeId::ROOT }),
        Err(FsError::QueueFull)
    );
    r.fs.kick().unwrap();
    assert_eq!(r.model.serve(&r.sim, 1) + r.model.serve(&r.sim, 2), 8);
    r.fs.poll().unwrap();
    for t in tickets {
        assert!(matches!(r.fs.take(t, &mut []), Ok(Reply::Entry(e)) if e.attr.size == 10));
    }
    let per_queue = |q| r.model.records.iter().filter(|x| x.queue == q).count();
    assert_eq!(
        (per_queue(1), per_queue(2)),
        (4 + 1, 4),
        "INIT on queue 1, then balanced"
    );
    r.no_violations();
}

#[test]
fn every_fixed_reply_kind_refuses_a_wrong_length() {
    // For each request kind with a fixed reply structure: a consistently framed reply
    // 8 bytes short is a protocol error, and the driver goes on working.
    let mut r = rig("lengths");
    std::fs::write(r.root.join("file"), b"data").unwrap();
    std::os::unix::fs::symlink("file", r.root.join("link")).unwrap();
    let file = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"file")).unwrap();
    let fh = r
        .run(|fs, w| fs.open(w, file.node, open_flags::O_RDWR))
        .unwrap()
        .fh;
    let cases: Vec<(u32, Request<'static>)> = vec![
        (
            op::LOOKUP,
            Request::Lookup {
                parent: NodeId::ROOT,
                name: b"file",
            },
        ),
        (
            op::GETATTR,
            Request::Getattr {
                node: file.node,
                fh: None,
            },
        ),
        (
            op::SETATTR,
            Request::Setattr {
                node: file.node,
                set: SetAttr {
                    mode: Some(0o644),
                    ..SetAttr::default()
                },
            },
        ),
        (
            op::OPEN,
            Request::Open {
                node: file.node,
                flags: open_flags::O_RDONLY,
            },
        ),
        (
            op::OPENDIR,
            Request::Opendir {
                node: NodeId::ROOT,
                flags: 0,
            },
        ),
        (
            op::CREATE,
            Request::Create {
                parent: NodeId::ROOT,
                name: b"new",
                flags: open_flags::O_RDWR,
                mode: 0o600,
                umask: 0,
            },
        ),
        (
            op::MKDIR,
            Request::Mkdir {
                parent: NodeId::ROOT,
                name: b"d",
                mode: 0o700,
                umask: 0,
            },
        ),
        (
            op::LINK,
            Request::Link {
                node: file.node,
                new_parent: NodeId::ROOT,
                new_name: b"hard",
            },
        ),
        (
            op::SYMLINK,
            Request::Symlink {
                parent: NodeId::ROOT,
                name: b"sym",
                target: b"file",
            },
        ),
        (
            op::WRITE,
            Request::Write {
                node: file.node,
                fh,
                offset: 0,
                data: b"xy",
            },
        ),
        (op::STATFS, Request::Statfs { node: NodeId::ROOT }),
    ];
    for (opc, req) in cases {
        r.model.tamper = Some(Box::new(move |o, b| {
            if o == opc && b.len() >= 24 {
                b.truncate(b.len() - 8);
                let l = b.len() as u32;
                set_u32(b, 0, l);
            }
        }));
        let res = r.call(&req, &mut []);
        assert!(
            matches!(res, Err(FsError::Protocol { .. })),
            "opcode {opc}: {res:?}"
        );
    }
    r.model.tamper = None;
    assert!(r.call(&getattr(NodeId::ROOT), &mut []).is_ok());
    // READLINK: data within the request's buffer only (the bus refuses more).
    let link = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"link")).unwrap();
    let mut small = [0u8; 2];
    assert_eq!(
        r.run(|fs, w| fs.readlink(w, link.node, &mut small)),
        Err(FsError::InvalidArgument),
        "a target longer than the caller's buffer"
    );
    let mut buf = [0u8; 16];
    assert_eq!(r.run(|fs, w| fs.readlink(w, link.node, &mut buf)), Ok(4));
}

#[test]
fn the_request_path_does_not_allocate() {
    let mut r = rig("noalloc");
    std::fs::write(r.root.join("f"), pattern(200_000, 1)).unwrap();
    let e = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    let o = r
        .run(|fs, w| fs.open(w, e.node, open_flags::O_RDWR))
        .unwrap();
    let data = pattern(4096, 2);
    let (tickets, n) = allocations(|| {
        let reqs = [
            Request::Read {
                node: e.node,
                fh: o.fh,
                offset: 0,
                size: 65536,
            },
            Request::Write {
                node: e.node,
                fh: o.fh,
                offset: 300_000,
                data: &data,
            },
            Request::Lookup {
                parent: NodeId::ROOT,
                name: b"f",
            },
            Request::Getattr {
                node: e.node,
                fh: Some(o.fh),
            },
            Request::Statfs { node: NodeId::ROOT },
            Request::Fsync {
                node: e.node,
                fh: o.fh,
                datasync: true,
            },
        ];
        let mut out = [None; 6];
        for (slot, req) in out.iter_mut().zip(reqs.iter()) {
            *slot = Some(r.fs.submit(req).unwrap());
        }
        r.fs.kick().unwrap();
        out
    });
    assert_eq!(n, 0, "submit/kick allocated");
    assert_eq!(r.model.serve(&r.sim, 1), 6);
    let mut buf = vec![0u8; 65536];
    let (results, n) = allocations(|| {
        r.fs.poll().unwrap();
        let mut ok = 0;
        for t in tickets.iter().flatten() {
            if r.fs.take(*t, &mut buf).is_ok() {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(n, 0, "poll/take allocated");
    assert_eq!(results, 6);
    // The blocking operations allocate nothing either (the waiter serving the model does,
    // and is not counted).
    let mut back = vec![0u8; 200_000];
    let mut dirbuf = vec![0u8; 4096];
    let (got, n) = allocations(|| {
        let got = r.run(|fs, w| fs.read(w, e.node, o.fh, 0, &mut back));
        let wrote = r.run(|fs, w| fs.write(w, e.node, o.fh, 0, &back));
        let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
        let listed = r.run(|fs, w| fs.read_dir(w, NodeId::ROOT, h.fh, false, &mut dirbuf, |_| {}));
        (got, wrote, listed)
    });
    assert_eq!(got, (Ok(200_000), Ok(200_000), Ok(3)));
    assert_eq!(n, 0, "blocking read/write/read_dir allocated");
    // The counter works.
    assert_eq!(allocations(|| Box::new(7)).1, 1);
}

#[test]
fn xattrs_lseek_and_fallocate() {
    let mut r = rig("xattr");
    let (e, o) = r
        .run(|fs, w| fs.create(w, NodeId::ROOT, b"x", open_flags::O_RDWR, 0o644))
        .unwrap();
    let value = "wert ✓".as_bytes();
    r.run(|fs, w| fs.setxattr(w, e.node, b"user.virtio", value, 0))
        .unwrap();
    r.run(|fs, w| fs.setxattr(w, e.node, b"user.second", b"", 0))
        .unwrap();
    // XATTR_CREATE on an existing name: EEXIST.
    assert_eq!(
        r.run(|fs, w| fs.setxattr(w, e.node, b"user.virtio", b"x", 1)),
        Err(FsError::Errno(Errno::EEXIST))
    );
    assert_eq!(
        r.run(|fs, w| fs.getxattr(w, e.node, b"user.virtio", &mut [])),
        Ok(value.len())
    );
    let mut buf = [0u8; 64];
    let n = r
        .run(|fs, w| fs.getxattr(w, e.node, b"user.virtio", &mut buf))
        .unwrap();
    assert_eq!(&buf[..n], value);
    assert_eq!(
        r.run(|fs, w| fs.getxattr(w, e.node, b"user.virtio", &mut buf[..2])),
        Err(FsError::Errno(Errno::ERANGE))
    );
    let n = r.run(|fs, w| fs.listxattr(w, e.node, &mut buf)).unwrap();
    let mut names: Vec<&[u8]> = virtio_fs::xattr_names(&buf[..n]).unwrap().collect();
    names.sort();
    assert_eq!(names, [&b"user.second"[..], b"user.virtio"]);
    r.run(|fs, w| fs.removexattr(w, e.node, b"user.second"))
        .unwrap();
    assert_eq!(
        r.run(|fs, w| fs.getxattr(w, e.node, b"user.second", &mut buf)),
        Err(FsError::Errno(Errno::ENODATA))
    );
    // FALLOCATE extends; LSEEK finds the end.
    r.run(|fs, w| fs.fallocate(w, e.node, o.fh, 0, 12_345, 0))
        .unwrap();
    assert_eq!(std::fs::metadata(r.root.join("x")).unwrap().len(), 12_345);
    assert_eq!(r.run(|fs, w| fs.lseek(w, e.node, o.fh, 0, 2)), Ok(12_345));
    // Hostile: a list that is not NUL-terminated names; an LSEEK offset beyond i64.
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::LISTXATTR && b.len() > 16 {
            let last = b.len() - 1;
            b[last] = b'z';
        }
        if o == op::LSEEK {
            b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        }
    }));
    let res = r.run(|fs, w| fs.listxattr(w, e.node, &mut buf));
    assert!(matches!(res, Err(FsError::Protocol { .. })), "{res:?}");
    let res = r.run(|fs, w| fs.lseek(w, e.node, o.fh, 0, 2));
    assert!(matches!(res, Err(FsError::Protocol { .. })), "{res:?}");
    r.model.tamper = None;
    r.no_violations();
}

#[test]
fn works_with_intx_and_with_polling() {
    // INTx (no MSI-X), and no interrupt at all (no MSI-X, no INTx pin): the driver polls.
    for interrupts in [true, false] {
        let dir = TempDir::new(&format!("irq-{interrupts}"));
        let mut model = FsModel::new(&dir.0, "hostshare");
        let sim = model
            .sim_builder(RING, 64, 64 << 20)
            .msix_vectors(0)
            .intx(interrupts)
            .build();
        let t = probe(sim.config_space(), sim.bars(), Preference::Auto).expect("probe");
        let opts = FsOptions {
            interrupts,
            ..FsOptions::default()
        };
        let mut fs = FsDriver::new(VirtioDevice::new(t, sim.memory(), sim.irq()), opts).unwrap();
        let want = if interrupts {
            InterruptMode::Intx
        } else {
            InterruptMode::Polling
        };
        assert_eq!(fs.bus().interrupt_mode(), want);
        let mut w = SimWaiter {
            sim: &sim,
            model: &mut model,
            idle: 0,
        };
        fs.init(&mut w).unwrap();
        let data = pattern(150_000, 5);
        let (e, o) = fs
            .create(&mut w, NodeId::ROOT, b"f", open_flags::O_RDWR, 0o600)
            .unwrap();
        assert_eq!(fs.write(&mut w, e.node, o.fh, 0, &data), Ok(data.len()));
        let mut back = vec![0u8; data.len()];
        assert_eq!(fs.read(&mut w, e.node, o.fh, 0, &mut back), Ok(data.len()));
        assert_eq!(back, data);
        assert_eq!(std::fs::read(dir.0.join("f")).unwrap(), data);
        // With INTx, completions arrived through the ISR path.
        let (_, through_isr) = fs.bus().interrupt_counts();
        assert_eq!(through_isr > 0, interrupts, "{through_isr} ISR interrupts");
    }
}

// ---- the notification queue (VIRTIO_FS_F_NOTIFICATION) ----

/// A rig whose device offers NOTIFICATION with `notify_buf_size` `size`.
fn notify_rig(name: &str, opts: FsOptions, size: u32, tweak: impl FnOnce(&mut FsModel)) -> Rig {
    rig_with(name, opts, |m| {
        m.notify_buf_size = Some(size);
        tweak(m)
    })
}

/// Drains every notification the driver holds.
fn drain(fs: &mut Fs) -> Vec<FsResult<Notification>> {
    std::iter::from_fn(|| fs.take_notification()).collect()
}

fn notify_what(n: &FsResult<Notification>) -> &'static str {
    match n {
        Err(FsError::Protocol { what }) => what,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn notification_is_negotiated_and_request_queues_start_at_2() {
    let mut r = notify_rig(
        "nlayout",
        FsOptions {
            max_request_queues: 4,
            slots: 4,
            notify_buffers: 8,
            ..FsOptions::default()
        },
        256,
        |m| m.num_request_queues = 2,
    );
    assert!(r.sim.driver_features() & 1 != 0, "NOTIFICATION negotiated");
    assert!(r.fs.has_notifications());
    assert_eq!(r.fs.config().notify_buf_size, Some(256));
    assert_eq!(r.fs.first_request_queue(), 2);
    assert_eq!(r.fs.request_queues(), 2);
    for q in 0..4 {
        assert!(r.sim.queue_info(q).unwrap().enabled, "queue {q} enabled");
    }
    // Every buffer posted at setup, each at least notify_buf_size, write-only (the
    // model checks), and the notification queue interrupts like the request queues.
    assert_eq!(r.fs.notify_buffers(), 8);
    assert_eq!(r.model.notify_buffers(&r.sim), 8);
    assert!(r.sim.queue_info(1).unwrap().kicks >= 1, "buffers announced");
    // Requests go to queues 2 and 3 only: INIT on 2, then balanced.
    std::fs::write(r.root.join("f"), b"abc").unwrap();
    let tickets: Vec<_> = (0..8)
        .map(|_| {
            r.fs.submit(&Request::Lookup {
                parent: NodeId::ROOT,
                name: b"f",
            })
            .unwrap()
        })
        .collect();
    r.fs.kick().unwrap();
    assert_eq!(r.model.serve(&r.sim, 2) + r.model.serve(&r.sim, 3), 8);
    r.fs.poll().unwrap();
    for t in tickets {
        assert!(matches!(r.fs.take(t, &mut []), Ok(Reply::Entry(_))));
    }
    let per_queue = |q| r.model.records.iter().filter(|x| x.queue == q).count();
    assert_eq!((per_queue(1), per_queue(2), per_queue(3)), (0, 5, 4));
    // No notification was sent: nothing to take.
    assert_eq!(r.fs.take_notification(), None);
    r.no_violations();
}

#[test]
fn notifications_arrive_typed_in_order_and_buffers_are_reposted() {
    let mut r = notify_rig(
        "ntyped",
        FsOptions {
            notify_buffers: 4,
            ..FsOptions::default()
        },
        4096,
        |_| {},
    );
    assert_eq!(r.model.notify_buffers(&r.sim), 4);
    let name = "new wörld".as_bytes();
    let msgs = [
        notify_inval_inode(5, 0, -1),
        notify_inval_entry(1, name),
        notify_delete(1, 7, b"gone"),
        notify_lock(42, -(libc::EAGAIN)),
    ];
    for m in &msgs {
        assert!(r.model.notify_raw(&r.sim, m, None));
    }
    assert_eq!(r.model.notify_buffers(&r.sim), 0, "all four used");
    // poll (and take_notification) allocate nothing.
    let (got, n) = allocations(|| {
        r.fs.poll().unwrap();
        let mut out = [const { None }; 4];
        for o in &mut out {
            *o = r.fs.take_notification();
        }
        out
    });
    assert_eq!(n, 0, "the notification path allocated");
    assert_eq!(
        got[0],
        Some(Ok(Notification::InvalInode {
            node: NodeId(5),
            offset: 0,
            len: -1
        }))
    );
    match got[1] {
        Some(Ok(Notification::InvalEntry {
            parent,
            name: n,
            flags,
        })) => assert_eq!((parent, n.as_bytes(), flags), (NodeId::ROOT, name, 0)),
        ref other => panic!("{other:?}"),
    }
    match got[2] {
        Some(Ok(Notification::Delete {
            parent,
            child,
            name: n,
        })) => assert_eq!(
            (parent, child, n.as_bytes()),
            (NodeId::ROOT, NodeId(7), &b"gone"[..])
        ),
        ref other => panic!("{other:?}"),
    }
    // LOCK answers a lock request the driver never sent (no POSIX_LOCKS offered): a
    // protocol error in its place, counted, its buffer reposted.
    assert!(notify_what(got[3].as_ref().unwrap()).contains("LOCK"));
    assert_eq!(r.fs.take_notification(), None);
    // Every buffer is back with the device, and the device was told.
    assert_eq!(r.fs.notify_buffers(), 4);
    assert_eq!(r.model.notify_buffers(&r.sim), 4);
    assert_eq!(r.model.notify_buffers_seen, 8);
    // Many more than the buffer count, interleaved with requests served through the
    // interrupt path: every one arrives, in order.
    let mut seen = Vec::new();
    for round in 0..25u64 {
        for i in 0..3 {
            assert!(r.model.notify_raw(
                &r.sim,
                &notify_inval_inode(100 + round * 3 + i, -1, 0),
                None
            ));
        }
        r.run(|fs, w| fs.statfs(w, NodeId::ROOT)).unwrap();
        seen.extend(drain(&mut r.fs));
    }
    let nodes: Vec<u64> = seen
        .iter()
        .map(|n| match n {
            Ok(Notification::InvalInode { node, .. }) => node.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(nodes, (100..175).collect::<Vec<_>>());
    let stats = r.fs.stats();
    assert_eq!((stats.notifications, stats.notify_errors), (78, 1));
    assert_eq!(r.model.notify_buffers(&r.sim), 4);
    r.no_violations();
}

#[test]
fn hostile_notifications_are_errors_counted_and_reposted() {
    let mut r = notify_rig(
        "nhostile",
        FsOptions {
            notify_buffers: 4,
            ..FsOptions::default()
        },
        4096,
        |_| {},
    );
    let mut entry_name_len = notify_inval_entry(1, b"abc");
    entry_name_len[16 + 8..16 + 12].copy_from_slice(&4u32.to_le_bytes());
    let mut no_nul = notify_inval_entry(1, b"abc");
    *no_nul.last_mut().unwrap() = b'd';
    // 256 bytes: above NAME_MAX.
    let long_name = notify_inval_entry(1, &[b'x'; 256]);
    let mut bad_len = notify_inval_inode(5, 0, 0);
    bad_len[0] = 200;
    let cases: Vec<(&str, Vec<u8>, Option<u32>, &str)> = vec![
        ("short", vec![0u8; 8], None, "shorter than its header"),
        ("len vs used", bad_len, None, "length disagrees"),
        (
            "used 0",
            notify_inval_inode(5, 0, 0),
            Some(0),
            "shorter than its header",
        ),
        (
            "used short",
            notify_inval_inode(5, 0, 0),
            Some(30),
            "length disagrees",
        ),
        (
            "unknown code",
            notify_message(99, 0, &[0; 8]),
            None,
            "unknown",
        ),
        ("code 0", notify_message(0, 0, &[]), None, "unknown"),
        ("negative code", notify_message(-5, 0, &[]), None, "unknown"),
        (
            "unique",
            notify_message(notify_code::POLL, 77, &[0; 8]),
            None,
            "non-zero unique",
        ),
        (
            "inode short",
            notify_message(notify_code::INVAL_INODE, 0, &[1; 23]),
            None,
            "differs",
        ),
        (
            "inode long",
            notify_message(notify_code::INVAL_INODE, 0, &[1; 25]),
            None,
            "differs",
        ),
        ("inode 0", notify_inval_inode(0, 0, 0), None, "node id 0"),
        ("name length", entry_name_len, None, "name length"),
        ("no NUL", no_nul, None, "NUL-terminated"),
        ("slash", notify_inval_entry(1, b"a/b"), None, "'/'"),
        (
            "empty name",
            notify_inval_entry(1, b""),
            None,
            "name length 0",
        ),
        ("name > 255", long_name, None, "above 255"),
        (
            "delete short",
            notify_message(notify_code::DELETE, 0, &[0; 20]),
            None,
            "shorter",
        ),
        (
            "delete child 0",
            notify_delete(1, 0, b"x"),
            None,
            "node id 0",
        ),
        ("lock", notify_lock(3, -5), None, "LOCK"),
        (
            "poll",
            notify_message(notify_code::POLL, 0, &[0; 8]),
            None,
            "POLL",
        ),
        (
            "store",
            notify_message(notify_code::STORE, 0, &[0; 40]),
            None,
            "STORE",
        ),
        (
            "huge",
            notify_message(notify_code::POLL, 0, &[0; 2000]),
            None,
            "longer than any",
        ),
    ];
    for (i, (what, msg, used, expect)) in cases.iter().enumerate() {
        assert!(r.model.notify_raw(&r.sim, msg, *used), "{what}: no buffer");
        // A valid one behind each hostile one: both arrive, in order.
        assert!(
            r.model
                .notify_raw(&r.sim, &notify_inval_inode(1000 + i as u64, -1, 0), None)
        );
        r.fs.poll().unwrap();
        let got = drain(&mut r.fs);
        assert_eq!(got.len(), 2, "{what}: {got:?}");
        assert!(
            notify_what(&got[0]).contains(expect),
            "{what}: {:?}",
            got[0]
        );
        assert!(
            matches!(got[1], Ok(Notification::InvalInode { node, .. }) if node.0 == 1000 + i as u64),
            "{what}: {:?}",
            got[1]
        );
        assert_eq!(r.fs.notify_buffers(), 4, "{what}: buffers reposted");
    }
    let stats = r.fs.stats();
    assert_eq!(stats.notify_errors, cases.len() as u64);
    assert_eq!(stats.notifications, cases.len() as u64);
    // Requests are unaffected.
    assert!(r.run(|fs, w| fs.statfs(w, NodeId::ROOT)).is_ok());
    // A forged used id on the notification queue: an error, no panic.
    r.sim.complete_raw(1, 200, 16);
    assert!(r.fs.poll().is_err());
    r.no_violations();
}

#[test]
fn a_notification_flood_is_bounded_per_poll() {
    let mut r = notify_rig(
        "nflood",
        FsOptions {
            notify_buffers: 4,
            ..FsOptions::default()
        },
        512,
        |_| {},
    );
    for i in 0..4 {
        assert!(
            r.model
                .notify_raw(&r.sim, &notify_inval_inode(10 + i, -1, 0), None)
        );
    }
    r.fs.poll().unwrap();
    // Reposted at once: the device sends four more, but the driver holds four results
    // already and leaves these on the used ring until the caller takes some.
    for i in 4..8 {
        assert!(
            r.model
                .notify_raw(&r.sim, &notify_inval_inode(10 + i, -1, 0), None)
        );
    }
    assert!(
        !r.model
            .notify_raw(&r.sim, &notify_inval_inode(99, -1, 0), None),
        "no buffer left"
    );
    r.fs.poll().unwrap();
    assert_eq!(r.fs.stats().notifications, 4);
    assert_eq!(
        r.model.notify_buffers(&r.sim),
        0,
        "not reposted while results wait"
    );
    let first = drain(&mut r.fs);
    r.fs.poll().unwrap();
    let second = drain(&mut r.fs);
    let nodes: Vec<u64> = first
        .iter()
        .chain(&second)
        .map(|n| match n {
            Ok(Notification::InvalInode { node, .. }) => node.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(nodes, (10..18).collect::<Vec<_>>());
    assert_eq!(r.fs.notify_buffers(), 4);
    assert_eq!(r.model.notify_buffers(&r.sim), 4);
    r.no_violations();
}

#[test]
fn without_notification_nothing_changes() {
    // Not offered: bit 0 not acknowledged, request queues from 1, nothing to take.
    let mut r = rig("nnone");
    assert_eq!(r.sim.driver_features() & 1, 0);
    assert!(!r.fs.has_notifications());
    assert_eq!(r.fs.config().notify_buf_size, None);
    assert_eq!(r.fs.first_request_queue(), 1);
    assert_eq!(r.fs.notify_buffers(), 0);
    assert!(r.run(|fs, w| fs.statfs(w, NodeId::ROOT)).is_ok());
    assert!(r.model.records.iter().all(|x| x.queue == 1));
    assert_eq!(r.fs.take_notification(), None);
    // Offered but refused (notify_buffers 0): the same layout, and queue 1 serves
    // requests (the model answers them there as a device without the bit would).
    let (_d, sim, mut model, fs) = try_rig(
        "nrefused",
        FsOptions {
            notify_buffers: 0,
            ..FsOptions::default()
        },
        |m| m.notify_buf_size = Some(256),
    );
    let fs = fs.unwrap();
    assert_eq!(sim.driver_features() & 1, 0);
    assert!(sim.offered_features() & 1 != 0);
    assert_eq!(fs.first_request_queue(), 1);
    assert!(!fs.has_notifications());
    model.notify_buf_size = None;
    let mut r = Rig {
        root: _d.0.clone(),
        _dir: _d,
        sim,
        model,
        fs,
    };
    r.run(|fs, w| fs.init(w)).unwrap();
    assert!(r.model.records.iter().all(|x| x.queue == 1));
    // A notify_buf_size that holds no header, or asks for more than 64 KiB: FAILED.
    for size in [0, 15, 64 * 1024 + 1, u32::MAX] {
        let (_d, sim, _m, fs) = try_rig("nbadsize", FsOptions::default(), |m| {
            m.notify_buf_size = Some(size)
        });
        assert!(
            matches!(fs, Err(FsError::Protocol { .. })),
            "notify_buf_size {size}"
        );
        assert!(sim.status() & DeviceStatus::FAILED.bits() != 0, "{size}");
    }
}

// ---- references the driver owes back, and the review's protocol rules ----

/// Lets the driver pay what it owes: round trips (each wait serves every queue, each poll
/// sends owed FORGETs and RELEASEs as slots allow), then hiprio served once more.
fn settle(r: &mut Rig) {
    for _ in 0..8 {
        r.run(|fs, w| fs.statfs(w, NodeId::ROOT)).unwrap();
    }
    r.model.serve(&r.sim, 0);
}

/// Serves the request queues once (no waiter) and polls: what was submitted completes.
fn serve_requests(r: &mut Rig) {
    let first = r.fs.first_request_queue();
    for q in first..first + r.fs.request_queues() as u16 {
        r.model.serve(&r.sim, q);
    }
    r.fs.poll().unwrap();
}

/// Sets the continuation offset of every record of a READDIR(PLUS) reply `b` to `off`.
fn set_dirent_offsets(b: &mut [u8], plus: bool, off: u64) {
    let fixed = if plus { 152 } else { 24 };
    let mut at = 16;
    while at + fixed <= b.len() {
        let d = at + fixed - 24;
        b[d + 8..d + 16].copy_from_slice(&off.to_le_bytes());
        let namelen = u32::from_le_bytes(b[d + 16..d + 20].try_into().unwrap()) as usize;
        at = (at + fixed + namelen).next_multiple_of(8);
    }
}

/// A file `f` and a directory `d` holding `a`, `b` and `c` in the shared directory.
fn file_and_dir(r: &Rig) {
    std::fs::write(r.root.join("f"), b"data").unwrap();
    std::fs::create_dir(r.root.join("d")).unwrap();
    for n in ["a", "b", "c"] {
        std::fs::write(r.root.join("d").join(n), b"").unwrap();
    }
}

#[test]
fn abandoned_requests_give_their_references_back() {
    let mut r = rig("owed");
    file_and_dir(&r);
    let file = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    let dir = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"d")).unwrap();
    let dh = r.run(|fs, w| fs.opendir(w, dir.node)).unwrap();
    let baseline = (r.model.live_nodes(), r.model.open_handles());
    assert_eq!(baseline, (2, 1));
    let requests = |n: &'static [u8; 2]| {
        [
            Request::Lookup {
                parent: NodeId::ROOT,
                name: b"f",
            },
            Request::Open {
                node: file.node,
                flags: open_flags::O_RDONLY,
            },
            Request::Opendir {
                node: dir.node,
                flags: 0,
            },
            Request::Create {
                parent: NodeId::ROOT,
                name: n,
                flags: open_flags::O_RDWR,
                mode: 0o644,
                umask: 0,
            },
            Request::Mkdir {
                parent: dir.node,
                name: n,
                mode: 0o755,
                umask: 0,
            },
            Request::Symlink {
                parent: file.node,
                name: b"ln",
                target: b"f",
            },
            Request::Readdir {
                node: dir.node,
                fh: dh.fh,
                offset: 0,
                size: 4096,
                plus: true,
            },
        ]
    };
    // Abandoned in flight: each reply arrives after its caller gave up.
    for req in &requests(b"n1") {
        let t = r.fs.submit(req).unwrap();
        r.fs.abandon(t);
    }
    r.fs.kick().unwrap();
    settle(&mut r);
    assert_eq!((r.model.live_nodes(), r.model.open_handles()), baseline);
    // Abandoned after completing, unread.
    let tickets: Vec<_> = requests(b"n2")
        .iter()
        .map(|req| r.fs.submit(req).unwrap())
        .collect();
    r.fs.kick().unwrap();
    serve_requests(&mut r);
    for &t in &tickets {
        assert!(r.fs.is_done(t));
        r.fs.abandon(t);
    }
    settle(&mut r);
    assert_eq!((r.model.live_nodes(), r.model.open_handles()), baseline);
    let s = r.fs.stats();
    // Per round: LOOKUP, CREATE and MKDIR 1 each (SYMLINK under a file fails), 3 entries.
    assert_eq!(s.unclaimed_nodes_forgotten, 2 * 6);
    assert_eq!(s.unclaimed_handles_released, 2 * 3);
    assert_eq!(s.lost_references, 0);
    r.no_violations();
}

#[test]
fn refused_replies_give_the_references_they_carried_back() {
    let mut r = rig("refused");
    file_and_dir(&r);
    let dir = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"d")).unwrap();
    // A LOOKUP whose node the device took a reference of, with attributes of no type.
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::LOOKUP {
            set_u32(b, 16 + 40 + 60, 0o644)
        }
    }));
    let res = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f"));
    assert!(protocol(&res.map(Reply::Entry)).contains("file type"));
    // A READDIRPLUS reply whose last record has dirty padding: refused whole, and each
    // of its three references given back.
    let h = r.run(|fs, w| fs.opendir(w, dir.node)).unwrap();
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::READDIRPLUS && b.len() > 16 {
            *b.last_mut().unwrap() = 1;
        }
    }));
    let mut buf = vec![0u8; 4096];
    let res = r.run(|fs, w| fs.read_dir(w, dir.node, h.fh, true, &mut buf, |_| {}));
    assert!(matches!(res, Err(FsError::Protocol { what }) if what.contains("padding")));
    r.model.tamper = None;
    settle(&mut r);
    assert_eq!(
        r.model.live_nodes(),
        1,
        "only the directory's lookup is left"
    );
    assert_eq!(r.fs.stats().unclaimed_nodes_forgotten, 4);
    r.no_violations();
}

#[test]
fn created_entries_must_be_of_the_type_made_and_not_the_root() {
    let mut r = rig("made");
    let mode_at = 16 + 40 + 60;
    let retype = move |opc: u32, typ: u32| -> Tamper {
        Box::new(move |o, b| {
            if o == opc && b.len() > mode_at + 4 {
                let m = u32::from_le_bytes(b[mode_at..mode_at + 4].try_into().unwrap());
                set_u32(b, mode_at, (m & 0o7777) | typ)
            }
        })
    };
    r.model.tamper = Some(retype(op::MKDIR, 0o100000));
    let res = r.run(|fs, w| fs.mkdir(w, NodeId::ROOT, b"d", 0o755));
    assert!(protocol(&res.map(Reply::Entry)).contains("file type"));
    r.model.tamper = Some(retype(op::SYMLINK, 0o040000));
    let res = r.run(|fs, w| fs.symlink(w, NodeId::ROOT, b"l", b"d"));
    assert!(protocol(&res.map(Reply::Entry)).contains("file type"));
    r.model.tamper = Some(retype(op::CREATE, 0o120000));
    let res = r.run(|fs, w| fs.create(w, NodeId::ROOT, b"c", open_flags::O_RDWR, 0o600));
    assert!(protocol(&res.map(|(e, o)| Reply::Created(e, o))).contains("file type"));
    r.model.tamper = None;
    // Each refused entry's reference (and CREATE's handle) went back.
    settle(&mut r);
    assert_eq!((r.model.live_nodes(), r.model.open_handles()), (0, 0));
    // LINK to the root node id: refused (and the root is never forgotten).
    let f = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"c")).unwrap();
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::LINK {
            b[16..24].copy_from_slice(&1u64.to_le_bytes())
        }
    }));
    let res = r.run(|fs, w| fs.link(w, f.node, NodeId::ROOT, b"hard"));
    assert!(protocol(&res.map(Reply::Entry)).contains("root"));
    r.no_violations();
}

#[test]
fn readdirplus_dot_entries_carry_no_reference_and_the_root_is_refused() {
    let mut r = rig("dots");
    std::fs::write(r.root.join("a"), b"").unwrap();
    let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
    // "." (the first record) with the root's node id and no attributes: no entry.
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::READDIRPLUS && b.len() > 16 {
            b[16..24].copy_from_slice(&1u64.to_le_bytes())
        }
    }));
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    r.run(|fs, w| {
        fs.read_dir(w, NodeId::ROOT, h.fh, true, &mut buf, |e| {
            seen.push((e.name.to_vec(), e.entry.map(|e| e.node)))
        })
    })
    .unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.contains(&(b".".to_vec(), None)));
    assert!(seen.contains(&(b"..".to_vec(), None)));
    let a = seen.iter().find(|(n, _)| n == b"a").unwrap().1.unwrap();
    r.run(|fs, w| fs.forget(w, &[(a, 1)])).unwrap();
    // "a" (the third record, after two 160-byte ones) as the root: refused.
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::READDIRPLUS && b.len() > 16 + 320 {
            b[16 + 320..16 + 328].copy_from_slice(&1u64.to_le_bytes())
        }
    }));
    let res = r.run(|fs, w| fs.read_dir(w, NodeId::ROOT, h.fh, true, &mut buf, |_| {}));
    assert!(matches!(res, Err(FsError::Protocol { what }) if what.contains("root")));
    r.model.tamper = None;
    settle(&mut r);
    r.no_violations();
}

#[test]
fn forget_fits_a_small_hiprio_queue_and_owes_what_it_could_not_send() {
    let mut r = rig_with("hiprio-small", FsOptions::default(), |m| {
        m.hiprio_queue_size = Some(2)
    });
    std::fs::write(r.root.join("f"), b"").unwrap();
    let mut node = NodeId(0);
    for _ in 0..300 {
        node = r
            .run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f"))
            .unwrap()
            .node;
    }
    assert_eq!(r.model.lookups(node.0), 300);
    // Five BATCH_FORGETs through two hiprio entries.
    r.run(|fs, w| fs.forget(w, &[(node, 1); 250])).unwrap();
    r.model.serve(&r.sim, 0);
    assert_eq!(r.model.lookups(node.0), 50);
    // A forget whose wait fails part-way: what it did not send is the driver's to send.
    struct Interrupted;
    impl Waiter<Dev> for Interrupted {
        fn wait(&mut self, _: &mut Fs) -> FsResult<()> {
            Err(FsError::Timeout)
        }
    }
    for _ in 0..150 {
        r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    }
    assert_eq!(r.model.lookups(node.0), 200);
    // 61 + 61 fill hiprio's two entries; the third batch waits, and the wait fails.
    assert_eq!(
        r.fs.forget(&mut Interrupted, &[(node, 1); 200]),
        Err(FsError::Timeout)
    );
    settle(&mut r);
    settle(&mut r);
    assert_eq!(r.model.lookups(node.0), 0, "every lookup forgotten, once");
    assert_eq!(r.fs.stats().lost_references, 0);
    r.no_violations();
}

/// A waiter that sleeps until the device interrupts, as a kext thread does: each slice
/// the device serves what is queued (slowly: only while the driver sleeps), and the wait
/// returns once an interrupt was raised and fed to the driver, or fails after `slices`.
struct InterruptOnlyWaiter<'a> {
    sim: &'a Sim,
    model: &'a mut FsModel,
    slices: u32,
    woken: u32,
}

impl Waiter<Dev> for InterruptOnlyWaiter<'_> {
    fn wait(&mut self, fs: &mut Fs) -> FsResult<()> {
        for _ in 0..self.slices {
            for q in 0..self.model.queue_count() {
                self.model.serve(self.sim, q);
            }
            let irqs = self.sim.take_interrupts();
            for irq in &irqs {
                fs.handle_interrupt(irq.vector())?;
            }
            if !irqs.is_empty() {
                self.woken += 1;
                return Ok(());
            }
        }
        Err(FsError::Timeout)
    }
}

/// `forget` waiting for a hiprio buffer is woken by the interrupt of the completion that
/// frees one: a waiter that only returns on interrupts does not sleep to its deadline.
#[test]
fn forget_waiting_for_hiprio_is_woken_by_its_completion() {
    let mut r = rig_with("hiprio-wake", FsOptions::default(), |m| {
        m.hiprio_queue_size = Some(2)
    });
    assert!(matches!(
        r.fs.bus().interrupt_mode(),
        InterruptMode::MsiX { .. }
    ));
    std::fs::write(r.root.join("f"), b"").unwrap();
    let mut node = NodeId(0);
    for _ in 0..200 {
        node = r
            .run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f"))
            .unwrap()
            .node;
    }
    r.sim.take_interrupts();
    let mut w = InterruptOnlyWaiter {
        sim: &r.sim,
        model: &mut r.model,
        slices: 100,
        woken: 0,
    };
    // 61 + 61 nodes fill hiprio's two entries; the third and fourth batches each wait
    // for the device to complete one.
    assert_eq!(r.fs.forget(&mut w, &[(node, 1); 200]), Ok(()));
    assert!(w.woken >= 1, "forget waited for hiprio");
    r.model.serve(&r.sim, 0);
    assert_eq!(r.model.lookups(node.0), 0, "every lookup forgotten, once");
    assert_eq!(r.fs.stats().forgotten_nodes, 200);
    assert_eq!(r.fs.stats().unclaimed_nodes_forgotten, 0, "nothing owed");
    r.no_violations();
}

#[test]
fn read_dir_refuses_a_reply_that_does_not_advance() {
    let mut r = rig("stuck");
    for i in 0..6 {
        std::fs::write(r.root.join(format!("f{i}")), b"").unwrap();
    }
    let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
    // Every record continues at 5: the read from 5 ends at 5 again.
    r.model.tamper = Some(Box::new(|o, b| {
        if o == op::READDIR {
            set_dirent_offsets(b, false, 5)
        }
    }));
    let mut buf = vec![0u8; 4096];
    let mut count = 0;
    let res = r.run(|fs, w| fs.read_dir(w, NodeId::ROOT, h.fh, false, &mut buf, |_| count += 1));
    assert!(
        matches!(res, Err(FsError::Protocol { what }) if what.contains("offset it was read from")),
        "{res:?}"
    );
    // The first reply (8 records, from 0) and the second (3, from 5) were handed out.
    assert_eq!(count, 11);
    r.no_violations();
}

#[test]
fn take_into_a_short_buffer_keeps_the_result() {
    let mut r = rig("short-take");
    std::fs::write(r.root.join("f"), [7u8; 100]).unwrap();
    let e = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    let o = r
        .run(|fs, w| fs.open(w, e.node, open_flags::O_RDONLY))
        .unwrap();
    let read = Request::Read {
        node: e.node,
        fh: o.fh,
        offset: 0,
        size: 100,
    };
    let t = r.fs.submit(&read).unwrap();
    r.fs.kick().unwrap();
    serve_requests(&mut r);
    assert_eq!(r.fs.take(t, &mut [0u8; 10]), Err(FsError::InvalidArgument));
    assert!(r.fs.is_done(t), "the result is still there");
    let mut buf = [0u8; 100];
    assert_eq!(r.fs.take(t, &mut buf), Ok(Reply::Data(100)));
    assert_eq!(buf, [7u8; 100]);
    // The blocking path gives the slot up instead.
    let link = r.run(|fs, w| fs.symlink(w, NodeId::ROOT, b"l", b"a-long-target"));
    let link = link.unwrap();
    assert_eq!(
        r.run(|fs, w| fs.readlink(w, link.node, &mut [0u8; 4])),
        Err(FsError::InvalidArgument)
    );
    for _ in 0..16 {
        r.run(|fs, w| fs.statfs(w, NodeId::ROOT)).unwrap();
    }
    r.no_violations();
}

#[test]
fn an_xattr_size_above_xattr_size_max_is_clamped() {
    let mut r = rig("xattr-huge");
    // Linux `fuse_getxattr` / `fuse_listxattr`: min(size, XATTR_SIZE_MAX / XATTR_LIST_MAX).
    for (size, ok) in [(65536u32, true), (65537, false), (u32::MAX, false)] {
        r.model.tamper = Some(Box::new(move |o, b| {
            if o == op::GETXATTR || o == op::LISTXATTR {
                let unique = b[8..16].to_vec();
                b.clear();
                b.extend_from_slice(&24u32.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(&unique);
                b.extend_from_slice(&size.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
            }
        }));
        let get = r.run(|fs, w| fs.getxattr(w, NodeId::ROOT, b"user.x", &mut []));
        let list = r.run(|fs, w| fs.listxattr(w, NodeId::ROOT, &mut []));
        for res in [get, list] {
            if ok {
                assert_eq!(res, Ok(size as usize));
            } else {
                assert_eq!(res, Ok(65536));
            }
        }
    }
}

#[test]
fn max_pages_zero_means_one_page() {
    let r = rig_with(
        "pages0",
        FsOptions {
            data_size: 64 * 1024,
            ..FsOptions::default()
        },
        |m| m.max_pages = 0,
    );
    assert_eq!(r.fs.init_info().unwrap().max_pages, 1);
    assert_eq!(r.fs.read_chunk(), 4096);
}

/// A rig whose device answers INIT without the flags `declined` (then serves honestly).
fn rig_declining(name: &str, opts: FsOptions, declined: u32) -> Rig {
    let mut r = rig_with(name, opts, move |m| {
        m.tamper = Some(Box::new(move |o, b| {
            if o == op::INIT {
                let f = u32::from_le_bytes(b[28..32].try_into().unwrap());
                set_u32(b, 28, f & !declined)
            }
        }))
    });
    r.model.tamper = None;
    r
}

#[test]
fn init_flags_the_device_declined_are_not_used() {
    use virtio_fs::wire::init_flags;
    let declined = init_flags::DO_READDIRPLUS | init_flags::ATOMIC_O_TRUNC;
    let mut r = rig_declining("declined", FsOptions::default(), declined);
    assert_eq!(r.fs.init_info().unwrap().flags & declined, 0);
    std::fs::write(r.root.join("f"), b"old contents").unwrap();
    let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
    let plus = Request::Readdir {
        node: NodeId::ROOT,
        fh: h.fh,
        offset: 0,
        size: 4096,
        plus: true,
    };
    assert_eq!(r.fs.submit(&plus), Err(FsError::InvalidArgument));
    // `read_dir` with `plus` reads with READDIR.
    let mut buf = vec![0u8; 4096];
    let mut entries = 0;
    r.run(|fs, w| {
        fs.read_dir(w, NodeId::ROOT, h.fh, true, &mut buf, |e| {
            entries += usize::from(e.entry.is_some())
        })
    })
    .unwrap();
    assert_eq!(entries, 0);
    assert!(r.model.records.iter().all(|x| x.opcode != op::READDIRPLUS));
    // O_TRUNC without ATOMIC_O_TRUNC: GETATTR (a regular file), OPEN without it, then
    // SETATTR size 0 by node.
    let e = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    let before = r.model.records.len();
    r.run(|fs, w| fs.open(w, e.node, open_flags::O_RDWR | open_flags::O_TRUNC))
        .unwrap();
    let ops: Vec<u32> = r.model.records[before..].iter().map(|x| x.opcode).collect();
    assert_eq!(ops, [op::GETATTR, op::OPEN, op::SETATTR]);
    assert_eq!(std::fs::metadata(r.root.join("f")).unwrap().len(), 0);
    r.no_violations();
}

/// Without ASYNC_READ the FUSE server may assume at most one READ of a handle pending, in
/// increasing offset order (Linux reads synchronously then); with it, `read` pipelines.
#[test]
fn read_pipelines_only_with_async_read() {
    use virtio_fs::wire::init_flags;
    let opts = FsOptions {
        data_size: 4096,
        ..FsOptions::default()
    };
    for declined in [init_flags::ASYNC_READ, 0] {
        let mut r = rig_declining("async-read", opts, declined);
        let data = pattern(64 * 1024, 3);
        std::fs::write(r.root.join("f"), &data).unwrap();
        let e = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
        let o = r
            .run(|fs, w| fs.open(w, e.node, open_flags::O_RDONLY))
            .unwrap();
        let mut back = vec![0u8; data.len()];
        assert_eq!(
            r.run(|fs, w| fs.read(w, e.node, o.fh, 0, &mut back)),
            Ok(data.len())
        );
        assert_eq!(back, data);
        let reads: Vec<_> = r
            .model
            .records
            .iter()
            .filter(|x| x.opcode == op::READ)
            .collect();
        assert_eq!(reads.len(), 16, "64 KiB in 4 KiB chunks");
        let most_at_once = reads.iter().map(|x| x.batch_len).max().unwrap();
        if declined == 0 {
            assert!(most_at_once > 1, "ASYNC_READ accepted: READs pipelined");
        } else {
            assert_eq!(most_at_once, 1, "ASYNC_READ declined: one READ at a time");
            let offsets: Vec<u64> = reads.iter().map(|x| x.offset).collect();
            let expected: Vec<u64> = (0..16).map(|i| i * 4096).collect();
            assert_eq!(offsets, expected, "in increasing offset order");
        }
        r.run(|fs, w| fs.release(w, e.node, o.fh, 0)).unwrap();
        r.no_violations();
    }
}

/// O_TRUNC emulated as Linux's `handle_truncate` does it: the SETATTR goes by node (no
/// FATTR_FH), so O_RDONLY|O_TRUNC truncates too (an ftruncate of the read-only handle
/// would fail), and only for a regular file (a FIFO opened with O_TRUNC is not truncated).
#[test]
fn open_truncate_is_a_setattr_by_node_of_regular_files_only() {
    use virtio_fs::wire::init_flags;
    let mut r = rig_declining(
        "trunc-node",
        FsOptions::default(),
        init_flags::ATOMIC_O_TRUNC,
    );
    std::fs::write(r.root.join("f"), b"old contents").unwrap();
    let e = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    let o = r
        .run(|fs, w| fs.open(w, e.node, open_flags::O_RDONLY | open_flags::O_TRUNC))
        .expect("O_RDONLY|O_TRUNC");
    assert_eq!(std::fs::metadata(r.root.join("f")).unwrap().len(), 0);
    r.run(|fs, w| fs.release(w, e.node, o.fh, 0)).unwrap();
    let fifo = std::ffi::CString::new(r.root.join("p").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path living across the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let p = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"p")).unwrap();
    let before = r.model.records.len();
    let o = r
        .run(|fs, w| fs.open(w, p.node, open_flags::O_RDWR | open_flags::O_TRUNC))
        .expect("a FIFO with O_TRUNC");
    let ops: Vec<u32> = r.model.records[before..].iter().map(|x| x.opcode).collect();
    assert_eq!(ops, [op::GETATTR, op::OPEN]);
    r.run(|fs, w| fs.release(w, p.node, o.fh, 0)).unwrap();
    r.no_violations();
}

/// Serves `left` waits, then fails every later one (a caller whose time ran out).
struct Flaky<'a> {
    inner: SimWaiter<'a>,
    left: u32,
}

impl Waiter<Dev> for Flaky<'_> {
    fn wait(&mut self, fs: &mut Fs) -> FsResult<()> {
        if self.left == 0 {
            return Err(FsError::Timeout);
        }
        self.left -= 1;
        self.inner.wait(fs)
    }
}

/// When the truncating SETATTR fails and no slot is free for the RELEASE (the SETATTR
/// still holds the only one), the handle is owed, not leaked: a later poll releases it.
#[test]
fn a_failed_open_truncate_owes_the_release() {
    use virtio_fs::wire::init_flags;
    let opts = FsOptions {
        slots: 1,
        max_request_queues: 1,
        ..FsOptions::default()
    };
    let mut r = rig_declining("trunc-owed", opts, init_flags::ATOMIC_O_TRUNC);
    std::fs::write(r.root.join("f"), b"old contents").unwrap();
    let e = r.run(|fs, w| fs.lookup(w, NodeId::ROOT, b"f")).unwrap();
    // GETATTR and OPEN are answered; the SETATTR's wait fails.
    let res = r.run(|fs, w| {
        let mut w = Flaky {
            inner: SimWaiter {
                sim: w.sim,
                model: &mut *w.model,
                idle: 0,
            },
            left: 2,
        };
        fs.open(&mut w, e.node, open_flags::O_RDWR | open_flags::O_TRUNC)
    });
    assert_eq!(res.map(|_| ()), Err(FsError::Timeout));
    assert_eq!(r.model.open_handles(), 1);
    settle(&mut r);
    assert_eq!(r.model.open_handles(), 0, "the handle was released");
    assert_eq!(r.fs.stats().unclaimed_handles_released, 1);
    r.no_violations();
}

/// Serves every queue but `held` (a device holding one request).
struct HoldWaiter<'a> {
    sim: &'a Sim,
    model: &'a mut FsModel,
    held: u16,
}

impl Waiter<Dev> for HoldWaiter<'_> {
    fn wait(&mut self, _: &mut Fs) -> FsResult<()> {
        for q in (0..self.model.queue_count()).filter(|&q| q != self.held) {
            self.model.serve(self.sim, q);
        }
        self.sim.take_interrupts();
        Ok(())
    }
}

/// What a session's requests handed out is not owed to the next session: a LOOKUP
/// abandoned in flight and answered after DESTROY and a new INIT, and one completed
/// before DESTROY and abandoned after the new INIT, send no FORGET.
#[test]
fn a_destroyed_session_owes_nothing_to_the_next() {
    let opts = FsOptions {
        max_request_queues: 2,
        ..FsOptions::default()
    };
    let mut r = rig_with("sessions", opts, |m| m.num_request_queues = 2);
    assert_eq!(r.fs.request_queues(), 2);
    std::fs::write(r.root.join("f"), b"").unwrap();
    let lookup = Request::Lookup {
        parent: NodeId::ROOT,
        name: b"f",
    };
    // Completed, not taken (first request queue).
    let done = r.fs.submit(&lookup).unwrap();
    r.fs.kick().unwrap();
    serve_requests(&mut r);
    assert!(r.fs.is_done(done));
    // In flight on the second request queue (the one with more free slots), abandoned.
    let held = r.fs.first_request_queue() + 1;
    let late = r.fs.submit(&lookup).unwrap();
    r.fs.kick().unwrap();
    r.fs.abandon(late);
    let lookups = |r: &Rig| {
        r.model
            .records
            .iter()
            .filter(|x| x.opcode == op::LOOKUP)
            .count()
    };
    {
        let mut w = HoldWaiter {
            sim: &r.sim,
            model: &mut r.model,
            held,
        };
        r.fs.destroy(&mut w).unwrap();
        r.fs.init(&mut w).unwrap();
    }
    assert_eq!(lookups(&r), 1, "the second LOOKUP is still held");
    r.fs.abandon(done);
    r.model.serve(&r.sim, held);
    r.fs.poll().unwrap();
    assert_eq!(lookups(&r), 2);
    settle(&mut r);
    assert_eq!(r.model.forgets, [], "no FORGET of the old session's nodes");
    assert_eq!(r.fs.stats().unclaimed_nodes_forgotten, 0);
    assert_eq!(r.fs.busy_slots(), 0);
    r.no_violations();
}

#[test]
fn errors_from_512_up_are_protocol_errors() {
    for (error, expect) in [
        (-511i32, Ok(())),
        (-512, Err("errno")),
        (-4095, Err("errno")),
    ] {
        let (_, res) = hostile_reply("errno-range", op::GETATTR, getattr, move |b| {
            b.truncate(16);
            set_u32(b, 0, 16);
            set_u32(b, 4, error as u32)
        });
        match expect {
            Ok(()) => assert_eq!(res, Err(FsError::Errno(Errno(511)))),
            Err(what) => assert!(protocol(&res).contains(what)),
        }
    }
}

/// `read_dir` stops at MAX_DIR_ENTRIES records (a device cycling its offsets): the records
/// of the last reply it did not hand out hold references too, and they go back — the
/// record the bound falls on included.
#[test]
fn read_dir_gives_back_the_records_past_its_bound() {
    // Each reply is `pads` records of node id 0 (no reference), then the model's records
    // from the offset asked ("." and ".." without a reference, a, b and c with one each),
    // every record continuing at 2 or 1 in turn: so the replies hold pads + 5 (from 0),
    // then pads + 3 (from 2) and pads + 4 (from 1) records alternately.
    // 95 pads: record 2^20 + 1 is the 43rd of a reply from 2, a pad; a, b and c follow.
    // 60 pads: it is the 64th and last of a reply from 1, c itself; nothing follows.
    for (pads, last_handed_out, owed) in [(95, "x", 3), (60, "b", 1)] {
        let (last, stats_owed) = read_dir_past_the_bound(pads);
        assert_eq!(last, last_handed_out, "{pads} pads: where the bound fell");
        assert_eq!(stats_owed, owed, "{pads} pads: the references given back");
    }
}

/// Runs the `read_dir` of [`read_dir_gives_back_the_records_past_its_bound`] with `pads`
/// padding records per reply, forgets what it handed out and checks the device holds no
/// reference after; returns the name of the last record handed out and how many lookups
/// the driver gave back on its own.
fn read_dir_past_the_bound(pads: usize) -> (String, u64) {
    let mut r = rig("dir-bound");
    for n in ["a", "b", "c"] {
        std::fs::write(r.root.join(n), b"").unwrap();
    }
    let h = r.run(|fs, w| fs.opendir(w, NodeId::ROOT)).unwrap();
    let mut turn = 0u64;
    r.model.tamper = Some(Box::new(move |o, b| {
        if o != op::READDIRPLUS || b.len() <= 16 {
            return;
        }
        let mut pad = vec![0u8; 160];
        pad[128..136].copy_from_slice(&7u64.to_le_bytes());
        pad[144..148].copy_from_slice(&1u32.to_le_bytes());
        pad[148..152].copy_from_slice(&8u32.to_le_bytes());
        pad[152] = b'x';
        let records = b.split_off(16);
        for _ in 0..pads {
            b.extend_from_slice(&pad);
        }
        b.extend_from_slice(&records);
        let len = b.len() as u32;
        set_u32(b, 0, len);
        turn += 1;
        set_dirent_offsets(b, true, 1 + turn % 2);
    }));
    let mut buf = vec![0u8; 32 * 1024];
    let mut held: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last = String::new();
    let res = r.run(|fs, w| {
        fs.read_dir(w, NodeId::ROOT, h.fh, true, &mut buf, |e| {
            last = String::from_utf8_lossy(e.name).into_owned();
            if let Some(e) = e.entry {
                *held.entry(e.node.0).or_default() += 1;
            }
        })
    });
    assert!(
        matches!(res, Err(FsError::Protocol { what }) if what.contains("bound")),
        "{res:?}"
    );
    r.model.tamper = None;
    let refs: Vec<(NodeId, u64)> = held.iter().map(|(&n, &c)| (NodeId(n), c)).collect();
    r.run(|fs, w| fs.forget(w, &refs)).unwrap();
    settle(&mut r);
    assert_eq!(
        r.model.live_nodes(),
        0,
        "{pads} pads: every reference came back"
    );
    assert_eq!(r.fs.stats().lost_references, 0);
    r.no_violations();
    (last, r.fs.stats().unclaimed_nodes_forgotten)
}
