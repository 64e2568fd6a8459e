//! A device-side virtio-fs backend for the simulation ([`crate::sim`]): a small FUSE
//! server over a real host directory (std::fs and libc), serving the chains rust-vmm's
//! `virtio-queue` pops from the driver's rings, the way virtiofsd serves QEMU's
//! vhost-user-fs device.
//!
//! Written from the virtio spec (§5.11) and the FUSE protocol description, independently
//! of the driver crate: requests are parsed with their own offsets here, and every
//! framing rule the driver must follow (header `len` = the readable bytes, a non-zero
//! `unique` never reused while in flight, names NUL-terminated, WRITE sizes matching the
//! data, replies fitting the writable part) is checked and recorded in
//! [`FsModel::violations`]. With [`FsModel::notify_buf_size`] set the device offers
//! VIRTIO_FS_F_NOTIFICATION: queue 1 is the notification queue (request queues from 2),
//! whose buffers the model holds until [`FsModel::notify_raw`] sends a FUSE notify
//! message (well-formed from the helpers, or any bytes and used length). Hostile hooks: [`FsModel::tamper`] rewrites a reply's bytes
//! before they are written, [`FsModel::used_len`] changes the used length the device
//! reports, and [`FsModel::reverse_completion`] completes each batch in reverse order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sim::{Chain, Sim, SimBuilder, SimMode};

/// Virtio-fs device type.
pub const DEVICE_TYPE: u32 = 26;
pub const VERSION_1: u64 = 1 << 32;
/// VIRTIO_FS_F_NOTIFICATION (§5.11.3).
pub const F_NOTIFICATION: u64 = 1 << 0;

/// FUSE notify codes (`enum fuse_notify_code`; LOCK as virtio-fs numbers it).
pub mod notify_code {
    pub const POLL: i32 = 1;
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const STORE: i32 = 4;
    pub const DELETE: i32 = 6;
    pub const LOCK: i32 = 7;
}

/// A FUSE notify message: `fuse_out_header` (len, error = code, unique) and `payload`.
pub fn notify_message(code: i32, unique: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// FUSE_NOTIFY_INVAL_INODE (`fuse_notify_inval_inode_out`).
pub fn notify_inval_inode(ino: u64, off: i64, len: i64) -> Vec<u8> {
    let mut p = ino.to_le_bytes().to_vec();
    p.extend_from_slice(&off.to_le_bytes());
    p.extend_from_slice(&len.to_le_bytes());
    notify_message(notify_code::INVAL_INODE, 0, &p)
}

/// FUSE_NOTIFY_INVAL_ENTRY (`fuse_notify_inval_entry_out`, name, NUL).
pub fn notify_inval_entry(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_le_bytes().to_vec();
    p.extend_from_slice(&(name.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(name);
    p.push(0);
    notify_message(notify_code::INVAL_ENTRY, 0, &p)
}

/// FUSE_NOTIFY_DELETE (`fuse_notify_delete_out`, name, NUL).
pub fn notify_delete(parent: u64, child: u64, name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_le_bytes().to_vec();
    p.extend_from_slice(&child.to_le_bytes());
    p.extend_from_slice(&(name.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(name);
    p.push(0);
    notify_message(notify_code::DELETE, 0, &p)
}

/// FUSE_NOTIFY_LOCK (`fuse_notify_lock_out`: unique, error, padding).
pub fn notify_lock(unique: u64, error: i32) -> Vec<u8> {
    let mut p = unique.to_le_bytes().to_vec();
    p.extend_from_slice(&error.to_le_bytes());
    p.extend_from_slice(&0i32.to_le_bytes());
    notify_message(notify_code::LOCK, 0, &p)
}

/// FUSE opcodes this model serves.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// The answer to GETXATTR/LISTXATTR: the size only when asked for size 0, ERANGE when the
/// value does not fit, else the bytes.
fn sized_reply(bytes: Vec<u8>, size: u32) -> Result<(Vec<u8>, u32), i32> {
    if size == 0 {
        let mut o = (bytes.len() as u32).to_le_bytes().to_vec();
        o.extend_from_slice(&[0; 4]);
        Ok((o, 0))
    } else if bytes.len() > size as usize {
        Err(libc::ERANGE)
    } else {
        Ok((bytes, size))
    }
}

fn cpath(p: &Path) -> Result<CString, i32> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// One request the device served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub queue: u16,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    /// READ/READDIR size asked for, or WRITE bytes sent.
    pub size: u32,
    /// READ/WRITE/READDIR(PLUS) offset asked for (0 for other requests).
    pub offset: u64,
    /// Position of this request in its batch (requests popped together were in flight
    /// together).
    pub batch_len: usize,
    /// The errno answered (0: success).
    pub errno: i32,
}

enum Handle {
    File(File),
    /// A snapshot at OPENDIR: (name, inode, dirent type).
    Dir(Vec<(Vec<u8>, u64, u32)>),
}

/// Rewrites the reply (opcode, reply bytes) before it is written.
pub type Tamper = Box<dyn FnMut(u32, &mut Vec<u8>) + Send>;
type UsedLen = Box<dyn FnMut(u32, u32) -> u32 + Send>;

/// The FUSE server state over `root`.
pub struct FsModel {
    pub root: PathBuf,
    pub tag: Vec<u8>,
    pub num_request_queues: u32,
    /// What INIT answers.
    pub minor: u32,
    pub major: u32,
    pub max_write: u32,
    pub max_pages: u16,
    /// node id → (path, lookup count)
    nodes: BTreeMap<u64, (PathBuf, u64)>,
    next_node: u64,
    handles: BTreeMap<u64, Handle>,
    next_fh: u64,
    in_flight: BTreeSet<u64>,
    pub records: Vec<Record>,
    pub violations: Vec<String>,
    /// (node, nlookup) of every FORGET / BATCH_FORGET element.
    pub forgets: Vec<(u64, u64)>,
    pub tamper: Option<Tamper>,
    pub used_len: Option<UsedLen>,
    pub reverse_completion: bool,
    /// Offer VIRTIO_FS_F_NOTIFICATION with this `notify_buf_size`.
    pub notify_buf_size: Option<u32>,
    /// Notification buffers the driver posted that the model has not used yet.
    notify_chains: VecDeque<Chain>,
    /// Notification buffers the model has taken from the ring so far.
    pub notify_buffers_seen: u64,
    /// hiprio's queue size, if not the others' (a device may offer a small one).
    pub hiprio_queue_size: Option<u16>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes(s.try_into().unwrap()))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap()))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap()))
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Splits NUL-terminated strings off `b`.
fn cstrings(b: &[u8], n: usize) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut rest = b;
    for _ in 0..n {
        let end = rest.iter().position(|&c| c == 0)?;
        out.push(rest[..end].to_vec());
        rest = &rest[end + 1..];
    }
    Some(out)
}

/// `struct fuse_attr` bytes (88) for `m`.
pub fn attr_bytes(m: &std::fs::Metadata) -> Vec<u8> {
    let mut a = Vec::with_capacity(88);
    a.extend_from_slice(&m.ino().to_le_bytes());
    a.extend_from_slice(&m.size().to_le_bytes());
    a.extend_from_slice(&(m.blocks()).to_le_bytes());
    a.extend_from_slice(&(m.atime() as u64).to_le_bytes());
    a.extend_from_slice(&(m.mtime() as u64).to_le_bytes());
    a.extend_from_slice(&(m.ctime() as u64).to_le_bytes());
    a.extend_from_slice(&(m.atime_nsec() as u32).to_le_bytes());
    a.extend_from_slice(&(m.mtime_nsec() as u32).to_le_bytes());
    a.extend_from_slice(&(m.ctime_nsec() as u32).to_le_bytes());
    a.extend_from_slice(&m.mode().to_le_bytes());
    a.extend_from_slice(&(m.nlink() as u32).to_le_bytes());
    a.extend_from_slice(&m.uid().to_le_bytes());
    a.extend_from_slice(&m.gid().to_le_bytes());
    a.extend_from_slice(&(m.rdev() as u32).to_le_bytes());
    a.extend_from_slice(&(m.blksize() as u32).to_le_bytes());
    a.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(a.len(), 88);
    a
}

impl FsModel {
    /// A server over `root` (which must exist) advertising `tag`.
    pub fn new(root: &Path, tag: &str) -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(1, (root.to_path_buf(), 1));
        FsModel {
            root: root.to_path_buf(),
            tag: tag.as_bytes().to_vec(),
            num_request_queues: 1,
            minor: 31,
            major: 7,
            max_write: 128 * 1024,
            max_pages: 64,
            nodes,
            next_node: 2,
            handles: BTreeMap::new(),
            next_fh: 1,
            in_flight: BTreeSet::new(),
            records: Vec::new(),
            violations: Vec::new(),
            forgets: Vec::new(),
            tamper: None,
            used_len: None,
            reverse_completion: false,
            notify_buf_size: None,
            notify_chains: VecDeque::new(),
            notify_buffers_seen: 0,
            hiprio_queue_size: None,
        }
    }

    /// `struct virtio_fs_config`: tag[36], num_request_queues, notify_buf_size.
    pub fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; 44];
        let n = self.tag.len().min(36);
        c[..n].copy_from_slice(&self.tag[..n]);
        c[36..40].copy_from_slice(&self.num_request_queues.to_le_bytes());
        if let Some(size) = self.notify_buf_size {
            c[40..44].copy_from_slice(&size.to_le_bytes());
        }
        c
    }

    /// A modern function (virtio-fs has no legacy interface) with hiprio, the
    /// notification queue if offered, and the request queues, of `queue_size` entries,
    /// offering `generic` ring bits and VERSION_1 (and NOTIFICATION).
    pub fn sim_builder(&self, generic: u64, queue_size: u16, memory_len: usize) -> SimBuilder {
        let mut queues = vec![queue_size; usize::from(self.queue_count())];
        if let Some(size) = self.hiprio_queue_size {
            queues[0] = size;
        }
        let notification = if self.notify_buf_size.is_some() {
            F_NOTIFICATION
        } else {
            0
        };
        SimBuilder::new(SimMode::Modern, DEVICE_TYPE)
            .features(generic | VERSION_1 | notification)
            .queues(&queues)
            .device_config(&self.config_bytes())
            .memory_len(memory_len)
    }

    /// Open file and directory handles (OPEN, OPENDIR, CREATE not yet released).
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// Lookups the driver holds of `node` (0: none, or no such node).
    pub fn lookups(&self, node: u64) -> u64 {
        self.nodes.get(&node).map_or(0, |(_, n)| *n)
    }

    /// Nodes the server holds lookups for, besides the root.
    pub fn live_nodes(&self) -> usize {
        self.nodes.len() - 1
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Whether the device offers NOTIFICATION (queue 1 is then the notification queue).
    pub fn notification(&self) -> bool {
        self.notify_buf_size.is_some()
    }

    /// hiprio, the notification queue if offered, and the request queues.
    pub fn queue_count(&self) -> u16 {
        1 + u16::from(self.notification()) + self.num_request_queues as u16
    }

    /// The first request queue's index (§5.11.2).
    pub fn first_request_queue(&self) -> u16 {
        1 + u16::from(self.notification())
    }

    /// Notification buffers the driver has made available and the model not used.
    pub fn notify_buffers(&mut self, sim: &Sim) -> usize {
        if self.notification() {
            for c in sim.pop_chains(1) {
                self.notify_buffers_seen += 1;
                if c.readable_len() != 0 {
                    self.violation("notification buffer with a readable part".into());
                }
                let need = self.notify_buf_size.unwrap_or(0);
                if c.writable_len() < need {
                    self.violation(format!(
                        "notification buffer of {} bytes, notify_buf_size {need}",
                        c.writable_len()
                    ));
                }
                self.notify_chains.push_back(c);
            }
        }
        self.notify_chains.len()
    }

    /// Sends `msg` in the oldest available notification buffer, reporting `used_len`
    /// (default: the bytes written), and signals. False when the driver posted none.
    pub fn notify_raw(&mut self, sim: &Sim, msg: &[u8], used_len: Option<u32>) -> bool {
        self.notify_buffers(sim);
        let Some(c) = self.notify_chains.pop_front() else {
            return false;
        };
        let written = sim.write_chain(&c, msg);
        sim.complete(1, c.head, used_len.unwrap_or(written));
        sim.signal_used(1);
        true
    }

    /// Serves every available chain of `queue` (0 = hiprio), completes them (in order,
    /// or reversed), then signals once. Returns how many. The notification queue is not
    /// served here (see [`FsModel::notify_raw`]).
    pub fn serve(&mut self, sim: &Sim, queue: u16) -> usize {
        if queue == 1 && self.notification() {
            return 0;
        }
        let chains = sim.pop_chains(queue);
        let batch = chains.len();
        let mut done: Vec<(u16, u32)> = Vec::new();
        for c in &chains {
            let len = if queue == 0 {
                self.hiprio(sim, c);
                0
            } else {
                self.request(sim, queue, c, batch)
            };
            done.push((c.head, len));
        }
        if self.reverse_completion {
            done.reverse();
        }
        for &(head, len) in &done {
            sim.complete(queue, head, len);
        }
        if !done.is_empty() {
            sim.signal_used(queue);
        }
        batch
    }

    fn hiprio(&mut self, sim: &Sim, c: &Chain) {
        if c.writable_len() != 0 {
            self.violation("hiprio chain with a writable part".into());
        }
        let req = sim.read_chain(c);
        let opcode = u32_at(&req, 4);
        let nodeid = u64_at(&req, 16);
        if u32_at(&req, 0) as usize != req.len() {
            self.violation(format!(
                "hiprio header len {} of {}",
                u32_at(&req, 0),
                req.len()
            ));
        }
        match opcode {
            op::FORGET => self.forget(nodeid, u64_at(&req, 40)),
            op::BATCH_FORGET => {
                let count = u32_at(&req, 40) as usize;
                if 48 + 16 * count != req.len() {
                    self.violation(format!("BATCH_FORGET count {count} in {} bytes", req.len()));
                }
                for i in 0..count {
                    let at = 48 + 16 * i;
                    self.forget(u64_at(&req, at), u64_at(&req, at + 8));
                }
            }
            other => self.violation(format!("opcode {other} on hiprio")),
        }
    }

    fn forget(&mut self, node: u64, nlookup: u64) {
        self.forgets.push((node, nlookup));
        match self.nodes.get_mut(&node) {
            Some((_, n)) if *n >= nlookup => {
                *n -= nlookup;
                if *n == 0 && node != 1 {
                    self.nodes.remove(&node);
                }
            }
            _ => self.violation(format!("FORGET {node} x{nlookup}: not that many lookups")),
        }
    }

    /// Serves one request chain; returns the used length.
    fn request(&mut self, sim: &Sim, queue: u16, c: &Chain, batch_len: usize) -> u32 {
        let req = sim.read_chain(c);
        if req.len() < 40 {
            self.violation(format!("request of {} bytes", req.len()));
            return 0;
        }
        let len = u32_at(&req, 0) as usize;
        let opcode = u32_at(&req, 4);
        let unique = u64_at(&req, 8);
        let nodeid = u64_at(&req, 16);
        if len != req.len() {
            self.violation(format!(
                "opcode {opcode}: header len {len}, {} readable",
                req.len()
            ));
        }
        if unique == 0 || !self.in_flight.insert(unique) {
            self.violation(format!("opcode {opcode}: unique {unique} zero or reused"));
        }
        if u16_at(&req, 36) != 0 {
            self.violation("total_extlen not 0".into());
        }
        let body = &req[40..];
        let cap = c.writable_len();
        let (errno, payload, size) =
            match self.dispatch(opcode, nodeid, body, cap.saturating_sub(16)) {
                Ok((p, size)) => (0, p, size),
                Err(e) => (e, Vec::new(), 0),
            };
        self.in_flight.remove(&unique);
        let offset = match opcode {
            op::READ | op::WRITE | op::READDIR | op::READDIRPLUS => u64_at(body, 8),
            _ => 0,
        };
        self.records.push(Record {
            queue,
            opcode,
            unique,
            nodeid,
            size,
            offset,
            batch_len,
            errno,
        });
        let mut reply = Vec::with_capacity(16 + payload.len());
        reply.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
        reply.extend_from_slice(&(-errno).to_le_bytes());
        reply.extend_from_slice(&unique.to_le_bytes());
        reply.extend_from_slice(&payload);
        if let Some(t) = self.tamper.as_mut() {
            t(opcode, &mut reply);
        }
        if reply.len() as u32 > cap {
            self.violation(format!(
                "opcode {opcode}: reply of {} bytes, writable part {cap}",
                reply.len()
            ));
        }
        let written = sim.write_chain(c, &reply);
        match self.used_len.as_mut() {
            Some(f) => f(opcode, written),
            None => written,
        }
    }

    fn path(&self, node: u64) -> Result<PathBuf, i32> {
        self.nodes
            .get(&node)
            .map(|(p, _)| p.clone())
            .ok_or(libc::ESTALE)
    }

    fn child(&self, parent: u64, name: &[u8]) -> Result<PathBuf, i32> {
        if name.is_empty() || name.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        Ok(self.path(parent)?.join(std::ffi::OsStr::from_bytes(name)))
    }

    /// The node for `path` (a new one, or the existing one), with one more lookup.
    fn node_for(&mut self, path: &Path) -> u64 {
        if let Some((&id, (_, n))) = self.nodes.iter_mut().find(|(_, (p, _))| p == path) {
            *n += 1;
            return id;
        }
        let id = self.next_node;
        self.next_node += 1;
        self.nodes.insert(id, (path.to_path_buf(), 1));
        id
    }

    /// `struct fuse_entry_out` for `path` (one more lookup of its node).
    fn entry(&mut self, path: &Path) -> Result<Vec<u8>, i32> {
        let m = std::fs::symlink_metadata(path).map_err(|e| errno_of(&e))?;
        let id = self.node_for(path);
        Ok(self.entry_bytes(id, &m))
    }

    fn entry_bytes(&self, id: u64, m: &std::fs::Metadata) -> Vec<u8> {
        let mut e = Vec::with_capacity(128);
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes()); // generation
        e.extend_from_slice(&1u64.to_le_bytes()); // entry_valid
        e.extend_from_slice(&1u64.to_le_bytes()); // attr_valid
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&attr_bytes(m));
        e
    }

    fn attr_out(m: &std::fs::Metadata) -> Vec<u8> {
        let mut a = Vec::with_capacity(104);
        a.extend_from_slice(&1u64.to_le_bytes());
        a.extend_from_slice(&0u32.to_le_bytes());
        a.extend_from_slice(&0u32.to_le_bytes());
        a.extend_from_slice(&attr_bytes(m));
        a
    }

    fn open_out(fh: u64) -> Vec<u8> {
        let mut o = fh.to_le_bytes().to_vec();
        o.extend_from_slice(&[0u8; 8]);
        o
    }

    fn new_fh(&mut self, h: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        fh
    }

    fn file(&self, fh: u64) -> Result<&File, i32> {
        match self.handles.get(&fh) {
            Some(Handle::File(f)) => Ok(f),
            _ => Err(libc::EBADF),
        }
    }

    /// Serves one request: the payload and the size figure for the record, or an errno.
    fn dispatch(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        room: u32,
    ) -> Result<(Vec<u8>, u32), i32> {
        let io = |e: io::Error| errno_of(&e);
        let names = |n: usize, from: usize| -> Result<Vec<Vec<u8>>, i32> {
            cstrings(body.get(from..).unwrap_or(&[]), n).ok_or(libc::EINVAL)
        };
        Ok(match opcode {
            op::INIT => {
                let (major, flags) = (u32_at(body, 0), u32_at(body, 12));
                if major != 7 {
                    return Err(libc::EPROTO);
                }
                let mut o = Vec::with_capacity(64);
                o.extend_from_slice(&self.major.to_le_bytes());
                o.extend_from_slice(&self.minor.min(u32_at(body, 4)).to_le_bytes());
                o.extend_from_slice(&u32_at(body, 8).to_le_bytes());
                o.extend_from_slice(&flags.to_le_bytes());
                o.extend_from_slice(&16u16.to_le_bytes());
                o.extend_from_slice(&12u16.to_le_bytes());
                o.extend_from_slice(&self.max_write.to_le_bytes());
                o.extend_from_slice(&1u32.to_le_bytes());
                o.extend_from_slice(&self.max_pages.to_le_bytes());
                o.resize(if self.minor < 23 { 24 } else { 64 }, 0);
                (o, 0)
            }
            op::LOOKUP => {
                let name = names(1, 0)?.remove(0);
                let path = self.child(nodeid, &name)?;
                (self.entry(&path)?, 0)
            }
            op::GETATTR => {
                let flags = u32_at(body, 0);
                let m = if flags & 1 != 0 {
                    self.file(u64_at(body, 8))?.metadata().map_err(io)?
                } else {
                    std::fs::symlink_metadata(self.path(nodeid)?).map_err(io)?
                };
                (Self::attr_out(&m), 0)
            }
            op::SETATTR => {
                let path = self.path(nodeid)?;
                let valid = u32_at(body, 0);
                let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
                if valid & 1 != 0 {
                    let mode = u32_at(body, 68) & 0o7777;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                        .map_err(io)?;
                }
                if valid & (2 | 4) != 0 {
                    let uid = if valid & 2 != 0 {
                        u32_at(body, 76)
                    } else {
                        u32::MAX
                    };
                    let gid = if valid & 4 != 0 {
                        u32_at(body, 80)
                    } else {
                        u32::MAX
                    };
                    // SAFETY: `c` is a NUL-terminated path that lives across the call.
                    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
                        return Err(io(io::Error::last_os_error()));
                    }
                }
                if valid & 8 != 0 {
                    let size = u64_at(body, 16);
                    match (valid & 64 != 0).then(|| u64_at(body, 8)) {
                        Some(fh) => self.file(fh)?.set_len(size).map_err(io)?,
                        None => OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .and_then(|f| f.set_len(size))
                            .map_err(io)?,
                    }
                }
                if valid & (16 | 32) != 0 {
                    let ts = |set: bool, now: bool, secs: u64, nsec: u32| libc::timespec {
                        tv_sec: secs as libc::time_t,
                        tv_nsec: if !set {
                            libc::UTIME_OMIT
                        } else if now {
                            libc::UTIME_NOW
                        } else {
                            nsec as libc::c_long
                        },
                    };
                    let times = [
                        ts(
                            valid & 16 != 0,
                            valid & 128 != 0,
                            u64_at(body, 32),
                            u32_at(body, 56),
                        ),
                        ts(
                            valid & 32 != 0,
                            valid & 256 != 0,
                            u64_at(body, 40),
                            u32_at(body, 60),
                        ),
                    ];
                    // SAFETY: `c` is a NUL-terminated path and `times` two timespecs, both
                    // living across the call.
                    let r = unsafe {
                        libc::utimensat(
                            libc::AT_FDCWD,
                            c.as_ptr(),
                            times.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    };
                    if r != 0 {
                        return Err(io(io::Error::last_os_error()));
                    }
                }
                (
                    Self::attr_out(&std::fs::symlink_metadata(&path).map_err(io)?),
                    0,
                )
            }
            op::OPEN => {
                let flags = u32_at(body, 0) as i32;
                let path = self.path(nodeid)?;
                let acc = flags & libc::O_ACCMODE;
                let f = OpenOptions::new()
                    .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
                    .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
                    .truncate(flags & libc::O_TRUNC != 0 && acc != libc::O_RDONLY)
                    .append(flags & libc::O_APPEND != 0)
                    .open(&path)
                    .map_err(io)?;
                if f.metadata().map_err(io)?.is_dir() {
                    return Err(libc::EISDIR);
                }
                (Self::open_out(self.new_fh(Handle::File(f))), 0)
            }
            op::OPENDIR => {
                let path = self.path(nodeid)?;
                let mut entries = Vec::new();
                let me = std::fs::metadata(&path).map_err(io)?;
                entries.push((b".".to_vec(), me.ino(), 4));
                entries.push((b"..".to_vec(), me.ino(), 4));
                let mut rest: Vec<_> = std::fs::read_dir(&path)
                    .map_err(io)?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let m = e.metadata().ok()?;
                        Some((
                            e.file_name().as_bytes().to_vec(),
                            m.ino(),
                            (m.mode() >> 12) & 0xF,
                        ))
                    })
                    .collect();
                rest.sort();
                entries.extend(rest);
                (Self::open_out(self.new_fh(Handle::Dir(entries))), 0)
            }
            op::READ => {
                let (fh, offset, size) = (u64_at(body, 0), u64_at(body, 8), u32_at(body, 16));
                if size > room {
                    self.violation(format!("READ of {size} into {room} bytes"));
                }
                let f = self.file(fh)?;
                let mut buf = vec![0u8; size.min(room) as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(io(e)),
                    }
                }
                buf.truncate(got);
                (buf, size)
            }
            op::WRITE => {
                let (fh, offset, size) = (u64_at(body, 0), u64_at(body, 8), u32_at(body, 16));
                let data = body.get(40..).unwrap_or(&[]);
                if data.len() != size as usize {
                    self.violation(format!("WRITE size {size} with {} data bytes", data.len()));
                }
                if size > self.max_write {
                    self.violation(format!(
                        "WRITE of {size} above max_write {}",
                        self.max_write
                    ));
                }
                self.file(fh)?.write_all_at(data, offset).map_err(io)?;
                let mut o = (data.len() as u32).to_le_bytes().to_vec();
                o.extend_from_slice(&[0; 4]);
                (o, size)
            }
            op::RELEASE | op::RELEASEDIR => {
                self.handles.remove(&u64_at(body, 0)).ok_or(libc::EBADF)?;
                (Vec::new(), 0)
            }
            op::READDIR | op::READDIRPLUS => {
                let (fh, offset, size) = (u64_at(body, 0), u64_at(body, 8), u32_at(body, 16));
                let plus = opcode == op::READDIRPLUS;
                let Some(Handle::Dir(entries)) = self.handles.get(&fh) else {
                    return Err(libc::EBADF);
                };
                let entries: Vec<_> = entries.iter().skip(offset as usize).cloned().collect();
                let dir = self.path(nodeid)?;
                let limit = size.min(room) as usize;
                let mut out = Vec::new();
                for (i, (name, ino, typ)) in entries.into_iter().enumerate() {
                    let rec = 24 + name.len();
                    let padded = rec.div_ceil(8) * 8 + if plus { 128 } else { 0 };
                    if out.len() + padded > limit {
                        break;
                    }
                    if plus {
                        if name == b"." || name == b".." {
                            out.extend_from_slice(&[0u8; 128]);
                        } else {
                            let path = dir.join(std::ffi::OsStr::from_bytes(&name));
                            match self.entry(&path) {
                                Ok(e) => out.extend_from_slice(&e),
                                Err(_) => out.extend_from_slice(&[0u8; 128]),
                            }
                        }
                    }
                    out.extend_from_slice(&ino.to_le_bytes());
                    out.extend_from_slice(&(offset + i as u64 + 1).to_le_bytes());
                    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                    out.extend_from_slice(&typ.to_le_bytes());
                    out.extend_from_slice(&name);
                    while out.len() % 8 != 0 {
                        out.push(0);
                    }
                }
                (out, size)
            }
            op::CREATE => {
                let (flags, mode, umask) =
                    (u32_at(body, 0) as i32, u32_at(body, 4), u32_at(body, 8));
                let name = names(1, 16)?.remove(0);
                let path = self.child(nodeid, &name)?;
                let acc = flags & libc::O_ACCMODE;
                let f = OpenOptions::new()
                    .read(acc != libc::O_WRONLY)
                    .write(true)
                    .create(true)
                    .create_new(flags & libc::O_EXCL != 0)
                    .truncate(flags & libc::O_TRUNC != 0)
                    .mode(mode & 0o7777 & !umask)
                    .open(&path)
                    .map_err(io)?;
                let mut e = self.entry(&path)?;
                e.extend(Self::open_out(self.new_fh(Handle::File(f))));
                (e, 0)
            }
            op::MKDIR => {
                let (mode, umask) = (u32_at(body, 0), u32_at(body, 4));
                let name = names(1, 8)?.remove(0);
                let path = self.child(nodeid, &name)?;
                std::fs::DirBuilder::new()
                    .mode(mode & 0o7777 & !umask)
                    .create(&path)
                    .map_err(io)?;
                (self.entry(&path)?, 0)
            }
            op::UNLINK => {
                let name = names(1, 0)?.remove(0);
                std::fs::remove_file(self.child(nodeid, &name)?).map_err(io)?;
                (Vec::new(), 0)
            }
            op::RMDIR => {
                let name = names(1, 0)?.remove(0);
                std::fs::remove_dir(self.child(nodeid, &name)?).map_err(io)?;
                (Vec::new(), 0)
            }
            op::RENAME2 => {
                let (newdir, flags) = (u64_at(body, 0), u32_at(body, 8));
                let n = names(2, 16)?;
                let from = self.child(nodeid, &n[0])?;
                let to = self.child(newdir, &n[1])?;
                if flags & !1 != 0 {
                    return Err(libc::EINVAL);
                }
                if flags & 1 != 0 && std::fs::symlink_metadata(&to).is_ok() {
                    return Err(libc::EEXIST);
                }
                std::fs::rename(&from, &to).map_err(io)?;
                for (p, _) in self.nodes.values_mut() {
                    if let Ok(rest) = p.strip_prefix(&from) {
                        *p = if rest.as_os_str().is_empty() {
                            to.clone()
                        } else {
                            to.join(rest)
                        };
                    }
                }
                (Vec::new(), 0)
            }
            op::LINK => {
                let old = u64_at(body, 0);
                let name = names(1, 8)?.remove(0);
                let from = self.path(old)?;
                let to = self.child(nodeid, &name)?;
                std::fs::hard_link(&from, &to).map_err(io)?;
                let m = std::fs::symlink_metadata(&to).map_err(io)?;
                if let Some((_, n)) = self.nodes.get_mut(&old) {
                    *n += 1;
                }
                (self.entry_bytes(old, &m), 0)
            }
            op::SYMLINK => {
                let n = names(2, 0)?;
                let path = self.child(nodeid, &n[0])?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&n[1]), &path)
                    .map_err(io)?;
                (self.entry(&path)?, 0)
            }
            op::READLINK => {
                let target = std::fs::read_link(self.path(nodeid)?).map_err(io)?;
                (target.as_os_str().as_bytes().to_vec(), 0)
            }
            op::STATFS => {
                let c = CString::new(self.root.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
                // SAFETY: statvfs writes only into `st`, a properly sized out-parameter;
                // `c` is a NUL-terminated path.
                let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
                    return Err(io(io::Error::last_os_error()));
                }
                let mut o = Vec::with_capacity(80);
                for v in [st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree] {
                    o.extend_from_slice(&v.to_le_bytes());
                }
                for v in [st.f_bsize, st.f_namemax, st.f_frsize] {
                    o.extend_from_slice(&(v as u32).to_le_bytes());
                }
                o.resize(80, 0);
                (o, 0)
            }
            op::FSYNC => {
                let f = self.file(u64_at(body, 0))?;
                if u32_at(body, 8) & 1 != 0 {
                    f.sync_data().map_err(io)?;
                } else {
                    f.sync_all().map_err(io)?;
                }
                (Vec::new(), 0)
            }
            op::FSYNCDIR | op::FLUSH => (Vec::new(), 0),
            op::SETXATTR => {
                let (size, flags) = (u32_at(body, 0) as usize, u32_at(body, 4) as i32);
                let name = names(1, 8)?.remove(0);
                let value = body.get(8 + name.len() + 1..).unwrap_or(&[]);
                if value.len() != size {
                    self.violation(format!("SETXATTR size {size} with {} bytes", value.len()));
                }
                let (c, n) = (
                    cpath(&self.path(nodeid)?)?,
                    CString::new(name).map_err(|_| libc::EINVAL)?,
                );
                // SAFETY: `c` and `n` are NUL-terminated; `value` is valid for its length.
                let r = unsafe {
                    libc::lsetxattr(
                        c.as_ptr(),
                        n.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        flags,
                    )
                };
                if r != 0 {
                    return Err(last_errno());
                }
                (Vec::new(), 0)
            }
            op::GETXATTR | op::LISTXATTR => {
                let size = u32_at(body, 0);
                let c = cpath(&self.path(nodeid)?)?;
                let mut buf = vec![0u8; 64 * 1024];
                let r = if opcode == op::GETXATTR {
                    let name = names(1, 8)?.remove(0);
                    let n = CString::new(name).map_err(|_| libc::EINVAL)?;
                    // SAFETY: NUL-terminated path and name; `buf` is writable for its length.
                    unsafe {
                        libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                    }
                } else {
                    // SAFETY: NUL-terminated path; `buf` is writable for its length.
                    unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
                };
                if r < 0 {
                    return Err(last_errno());
                }
                buf.truncate(r as usize);
                sized_reply(buf, size)?
            }
            op::REMOVEXATTR => {
                let name = names(1, 0)?.remove(0);
                let (c, n) = (
                    cpath(&self.path(nodeid)?)?,
                    CString::new(name).map_err(|_| libc::EINVAL)?,
                );
                // SAFETY: NUL-terminated path and name.
                if unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) } != 0 {
                    return Err(last_errno());
                }
                (Vec::new(), 0)
            }
            op::LSEEK => {
                use std::os::fd::AsRawFd;
                let (fh, offset, whence) = (u64_at(body, 0), u64_at(body, 8), u32_at(body, 16));
                let fd = self.file(fh)?.as_raw_fd();
                // SAFETY: `fd` is an open descriptor owned by the handle table.
                let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence as i32) };
                if r < 0 {
                    return Err(last_errno());
                }
                ((r as u64).to_le_bytes().to_vec(), 0)
            }
            op::FALLOCATE => {
                use std::os::fd::AsRawFd;
                let (fh, offset, length, mode) = (
                    u64_at(body, 0),
                    u64_at(body, 8),
                    u64_at(body, 16),
                    u32_at(body, 24),
                );
                let fd = self.file(fh)?.as_raw_fd();
                // SAFETY: `fd` is an open descriptor owned by the handle table.
                let r = unsafe {
                    libc::fallocate(
                        fd,
                        mode as i32,
                        offset as libc::off_t,
                        length as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(last_errno());
                }
                (Vec::new(), 0)
            }
            op::DESTROY => {
                self.nodes.retain(|&id, _| id == 1);
                self.handles.clear();
                (Vec::new(), 0)
            }
            _ => return Err(libc::ENOSYS),
        })
    }
}
