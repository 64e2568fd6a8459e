//! The driver proper: bring-up, request slots, submission, completion by `unique`, and
//! the blocking operations built on them (see the crate documentation for the design).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use virtio_core::bus::{Bus, QueueSpec};
use virtio_core::platform::{Dma, DmaRegion};
use virtio_core::queue::{Segment, Used};
use virtio_core::{DeviceType, Error, Features};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{Errno, FsError, FsResult};
use crate::features;
use crate::notify::{self, NOTIFY_MSG_MAX, Notification};
use crate::reply::{
    AttrReply, DirEntry, DirIter, Entry, FileHandle, InitInfo, NodeId, Opened, Statfs, Timespec,
    dirplus_references, validate_dir,
};
use crate::wire::{
    self, AttrOut, BatchForgetIn, CreateIn, EntryOut, FallocateIn, FlushIn, ForgetIn, ForgetOne,
    FsyncIn, GetattrIn, GetxattrIn, GetxattrOut, HIPRIO_QUEUE, InHeader, InitIn, InitOut, LinkIn,
    LseekIn, LseekOut, MkdirIn, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In,
    SetattrIn, SetxattrIn, StatfsOut, WriteIn, WriteOut, cfg, fattr, init_flags, mode, opcode,
};

/// Per-slot DMA layout: the device-readable request (header, arguments, names), the
/// device-writable reply header and fixed reply, then the slot's data buffer (READ and
/// READDIR land there, WRITE data is read from there).
const REQUEST_AREA: usize = 2048;
const REPLY_AREA: usize = 256;
const DATA_AREA: usize = REQUEST_AREA + REPLY_AREA;
/// hiprio slots (FORGET / BATCH_FORGET): bytes each, and how many.
const HIPRIO_SLOT: usize = 1024;
const HIPRIO_SLOTS: usize = 8;
/// Nodes one BATCH_FORGET carries (what fits a hiprio slot).
pub const FORGET_BATCH_MAX: usize =
    (HIPRIO_SLOT - size_of::<InHeader>() - size_of::<BatchForgetIn>()) / size_of::<ForgetOne>();
/// Longest name the driver sends (the usual NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest symlink target the driver sends (what fits the request area beside a name).
pub const SYMLINK_TARGET_MAX: usize = REQUEST_AREA - size_of::<InHeader>() - NAME_MAX - 2;
/// The notification queue's index (§5.11.2), with VIRTIO_FS_F_NOTIFICATION.
pub const NOTIFICATION_QUEUE: u16 = 1;
/// Largest `notify_buf_size` the driver accepts (a larger one fails setup: it would make
/// the driver allocate what the device asks without bound).
pub const NOTIFY_BUF_MAX: u32 = 64 * 1024;
/// Notification buffers the driver posts at most.
pub const MAX_NOTIFY_BUFFERS: u16 = 256;
/// Request queues this driver drives at most.
const MAX_REQUEST_QUEUES: u16 = 64;
/// Chunk requests one `read`/`write` keeps in flight at most.
const MAX_PIPELINE: usize = 32;
/// Directory records one `read_dir` hands out at most: a device cycling through its
/// offsets (A, B, A, ...) would otherwise keep the reader going. Every READDIR returns
/// at least one record, so this bounds the round trips too.
pub const MAX_DIR_ENTRIES: u64 = 1 << 20;
/// Largest extended attribute value or name list (Linux `XATTR_SIZE_MAX` and
/// `XATTR_LIST_MAX`): a size probe answering more is a protocol error.
pub const XATTR_SIZE_MAX: u32 = 65536;
/// Node references the driver owes the device at most (FORGETs it sends on its own for
/// replies nobody took, see [`FsDriver::abandon`]): what the hiprio slots carry at once.
const OWED_FORGETS_MAX: usize = FORGET_BATCH_MAX * HIPRIO_SLOTS;
/// The page size FUSE's `max_pages` counts in.
const PAGE: u32 = 4096;
/// Flags this driver offers in FUSE_INIT, each because it implements what it implies:
/// - ASYNC_READ: several READs of one file are in flight at once (`read`; without it,
///   one at a time in offset order);
/// - ATOMIC_O_TRUNC: `open` passes O_TRUNC to the device instead of a separate SETATTR;
/// - BIG_WRITES: WRITEs up to `max_write`, not one page;
/// - DO_READDIRPLUS: the caller may read directories with READDIRPLUS;
/// - PARALLEL_DIROPS: lookups and directory reads of one directory may overlap;
/// - MAX_PAGES: the device may raise the request size limit (`max_pages`).
///
/// Refused (not offered): WRITEBACK_CACHE and AUTO_INVAL_DATA (no page cache here),
/// POSIX_LOCKS/FLOCK_LOCKS (no lock requests), POSIX_ACL and HANDLE_KILLPRIV (no xattr
/// ACLs yet), EXPORT_SUPPORT (no LOOKUP of "." / ".."), the DAX mapping flags.
pub const OFFERED_INIT_FLAGS: u32 = init_flags::ASYNC_READ
    | init_flags::ATOMIC_O_TRUNC
    | init_flags::BIG_WRITES
    | init_flags::DO_READDIRPLUS
    | init_flags::PARALLEL_DIROPS
    | init_flags::MAX_PAGES;
/// FUSE's request size without MAX_PAGES (`FUSE_DEFAULT_MAX_PAGES_PER_REQ` pages).
const DEFAULT_MAX_PAGES: u32 = 32;

/// Open flags (Linux `O_*` values, which FUSE daemons on Linux expect).
pub mod open_flags {
    pub const O_RDONLY: u32 = 0;
    pub const O_WRONLY: u32 = 1;
    pub const O_RDWR: u32 = 2;
    pub const O_CREAT: u32 = 0o100;
    pub const O_EXCL: u32 = 0o200;
    pub const O_TRUNC: u32 = 0o1000;
    pub const O_APPEND: u32 = 0o2000;
    pub const O_DIRECTORY: u32 = 0o200000;
}

/// RENAME2 flags (Linux `RENAME_*`).
pub mod rename_flags {
    pub const NOREPLACE: u32 = 1;
    pub const EXCHANGE: u32 = 2;
}

/// Driver choices made at setup.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FsOptions {
    /// Wanted queue size (0: the device maximum).
    pub queue_size: u16,
    /// Requests in flight per request queue (each owns a slot of preallocated memory).
    pub slots: u16,
    /// Data buffer per slot, in bytes (a multiple of 4096, 4 KiB..=1 MiB): the largest
    /// READ/WRITE/READDIR one request carries (the device's `max_write` and `max_pages`
    /// may lower it).
    pub data_size: u32,
    /// Request queues to use (the device's `num_request_queues` may lower it).
    pub max_request_queues: u16,
    /// Whether completions interrupt (false: the waiter polls).
    pub interrupts: bool,
    /// `max_readahead` offered in FUSE_INIT.
    pub max_readahead: u32,
    /// Credentials every request carries (`fuse_in_header` uid/gid/pid).
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Bound on waiter calls for one blocking operation.
    pub max_waits: u32,
    /// Notification buffers to post when the device offers VIRTIO_FS_F_NOTIFICATION
    /// (at most [`MAX_NOTIFY_BUFFERS`] and the queue size); 0 refuses the feature. As
    /// many decoded notifications wait for [`FsDriver::take_notification`]; while that
    /// many wait, completed buffers stay on the used ring (the device then runs out of
    /// buffers: back-pressure, §5.11.6.3).
    pub notify_buffers: u16,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            queue_size: 0,
            slots: 16,
            data_size: 64 * 1024,
            max_request_queues: 1,
            interrupts: true,
            max_readahead: 128 * 1024,
            uid: 0,
            gid: 0,
            pid: 1,
            max_waits: 1_000_000,
            notify_buffers: 16,
        }
    }
}

/// How a blocking operation waits for the device.
pub trait Waiter<B: Bus> {
    /// Blocks until the device may have completed something (an interrupt fed to
    /// [`FsDriver::handle_interrupt`], a polling slice, a simulated device served), or
    /// returns an error — [`FsError::Timeout`] when the caller's time is up. The driver
    /// polls its queues after each call.
    fn wait(&mut self, fs: &mut FsDriver<B>) -> FsResult<()>;
}

/// What the device configuration says (§5.11.4).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    tag: [u8; cfg::TAG_LEN],
    tag_len: usize,
    /// `num_request_queues` as the device reported it.
    pub num_request_queues: u32,
    /// `notify_buf_size`, with VIRTIO_FS_F_NOTIFICATION negotiated (else `None`).
    pub notify_buf_size: Option<u32>,
}

impl FsConfig {
    /// The file system's tag (what a mount names it by).
    pub fn tag(&self) -> &str {
        let bytes = self.tag.get(..self.tag_len).unwrap_or(&[]);
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// Reads and validates the configuration: a non-empty UTF-8 tag (NUL-padded), at
    /// least one request queue and, with `notification`, a `notify_buf_size` that holds
    /// at least a FUSE out header and at most [`NOTIFY_BUF_MAX`].
    fn read<B: Bus>(bus: &B, notification: bool) -> FsResult<FsConfig> {
        let mut tag = [0u8; cfg::TAG_LEN];
        bus.read_config(cfg::TAG, &mut tag)?;
        let tag_len = tag.iter().position(|&b| b == 0).unwrap_or(cfg::TAG_LEN);
        let text = tag.get(..tag_len).unwrap_or(&[]);
        if tag_len == 0 || core::str::from_utf8(text).is_err() {
            return Err(FsError::Protocol {
                what: "config tag empty or not UTF-8",
            });
        }
        if tag.get(tag_len..).unwrap_or(&[]).iter().any(|&b| b != 0) {
            return Err(FsError::Protocol {
                what: "config tag not NUL-padded",
            });
        }
        let num_request_queues = bus.read_config_u32(cfg::NUM_REQUEST_QUEUES)?;
        if num_request_queues == 0 {
            return Err(FsError::Protocol {
                what: "config num_request_queues is 0",
            });
        }
        let notify_buf_size = if notification {
            let size = bus.read_config_u32(cfg::NOTIFY_BUF_SIZE)?;
            if (size as usize) < size_of::<OutHeader>() || size > NOTIFY_BUF_MAX {
                return Err(FsError::Protocol {
                    what: "config notify_buf_size below a FUSE header or above 64 KiB",
                });
            }
            Some(size)
        } else {
            None
        };
        Ok(FsConfig {
            tag,
            tag_len,
            num_request_queues,
            notify_buf_size,
        })
    }
}

/// A request in flight (or completed and not yet taken): its queue, slot and `unique`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    queue: u16,
    slot: u16,
    unique: u64,
}

impl Ticket {
    /// The request's `unique`.
    pub fn unique(&self) -> u64 {
        self.unique
    }
}

/// A decoded, validated reply.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A reply with no payload (UNLINK, RELEASE, FSYNC, ...).
    Empty,
    Init(InitOut),
    Entry(Entry),
    Attr(AttrReply),
    Open(Opened),
    Created(Entry, Opened),
    /// WRITE: bytes written.
    Written(u32),
    Statfs(Statfs),
    /// READ, READLINK, READDIR(PLUS), GETXATTR/LISTXATTR with a size: bytes of data
    /// (copied by [`FsDriver::take`]).
    Data(u32),
    /// GETXATTR/LISTXATTR with size 0: the size the value or list needs.
    XattrSize(u32),
    /// LSEEK: the resulting offset.
    Offset(u64),
}

/// Setting a time in SETATTR.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The device's current time.
    Now,
    At(Timespec),
}

/// What a SETATTR changes; `None` leaves a field as it is.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend to this size.
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// The open handle the change goes through (ftruncate), if any.
    pub fh: Option<FileHandle>,
}

/// A request, as [`FsDriver::submit`] takes it. Names are single path components.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Init,
    Lookup {
        parent: NodeId,
        name: &'a [u8],
    },
    Getattr {
        node: NodeId,
        fh: Option<FileHandle>,
    },
    Setattr {
        node: NodeId,
        set: SetAttr,
    },
    /// OPEN with `flags` (O_CREAT and O_EXCL are not sent; O_TRUNC only with
    /// ATOMIC_O_TRUNC negotiated, else the caller truncates with SETATTR, as
    /// [`FsDriver::open`] does).
    Open {
        node: NodeId,
        flags: u32,
    },
    Opendir {
        node: NodeId,
        flags: u32,
    },
    /// Reads up to `size` bytes (at most [`FsDriver::read_chunk`]).
    Read {
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    /// Writes `data` (at most [`FsDriver::write_chunk`] bytes).
    Write {
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        data: &'a [u8],
    },
    Release {
        node: NodeId,
        fh: FileHandle,
        flags: u32,
    },
    Releasedir {
        node: NodeId,
        fh: FileHandle,
    },
    /// READDIR (`plus` false) or READDIRPLUS, up to `size` bytes of records.
    Readdir {
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Create {
        parent: NodeId,
        name: &'a [u8],
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Mkdir {
        parent: NodeId,
        name: &'a [u8],
        mode: u32,
        umask: u32,
    },
    Unlink {
        parent: NodeId,
        name: &'a [u8],
    },
    Rmdir {
        parent: NodeId,
        name: &'a [u8],
    },
    Rename {
        old_parent: NodeId,
        old_name: &'a [u8],
        new_parent: NodeId,
        new_name: &'a [u8],
        flags: u32,
    },
    Link {
        node: NodeId,
        new_parent: NodeId,
        new_name: &'a [u8],
    },
    Symlink {
        parent: NodeId,
        name: &'a [u8],
        target: &'a [u8],
    },
    /// READLINK. FUSE's READLINK carries no size (`fuse_in_header` only): the daemon
    /// writes the whole target, so the device may write up to
    /// [`FsDriver::read_chunk`] bytes, and `take` refuses a shorter buffer
    /// (`InvalidArgument`, the result left to take again).
    Readlink {
        node: NodeId,
    },
    Statfs {
        node: NodeId,
    },
    Fsync {
        node: NodeId,
        fh: FileHandle,
        datasync: bool,
    },
    Fsyncdir {
        node: NodeId,
        fh: FileHandle,
        datasync: bool,
    },
    Flush {
        node: NodeId,
        fh: FileHandle,
        lock_owner: u64,
    },
    Destroy,
    /// SETXATTR (`flags`: Linux `XATTR_CREATE` 1 / `XATTR_REPLACE` 2); the value is at
    /// most the slot buffer.
    Setxattr {
        node: NodeId,
        name: &'a [u8],
        value: &'a [u8],
        flags: u32,
    },
    /// GETXATTR: `size` 0 asks for the value's size, else up to `size` bytes of it.
    Getxattr {
        node: NodeId,
        name: &'a [u8],
        size: u32,
    },
    /// LISTXATTR: `size` 0 asks for the list's size, else up to `size` bytes of names.
    Listxattr {
        node: NodeId,
        size: u32,
    },
    Removexattr {
        node: NodeId,
        name: &'a [u8],
    },
    /// LSEEK (`whence`: SEEK_SET 0, SEEK_CUR 1, SEEK_END 2, SEEK_DATA 3, SEEK_HOLE 4).
    Lseek {
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        whence: u32,
    },
    /// FALLOCATE (`mode`: Linux `FALLOC_FL_*`, 0 allocates and extends).
    Fallocate {
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: u32,
    },
}

/// The reply a request expects: its payload size rule.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// Header only.
    Empty,
    /// Header only, or no reply at all (used length 0): DESTROY, which virtiofsd
    /// completes without writing a reply (Linux, which never reads that reply, accepts
    /// it; libfuse daemons send an empty one).
    EmptyOrNone,
    /// Exactly this many payload bytes (zero-padded reads of an older layout are not
    /// accepted: each of these structures is final before 7.27).
    Fixed(u32),
    /// INIT: 24 bytes (minor < 23) up to the 7.31 layout.
    Init,
    /// Up to this many data bytes, into the slot's data buffer.
    Data(u32),
    /// `fuse_entry_out` (and `fuse_open_out` for CREATE), held to the rule.
    Entry(EntryRule),
    /// WRITE's `fuse_write_out`, whose `size` may not exceed the bytes sent (this many).
    Written(u32),
}

/// What an entry reply must be.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct EntryRule {
    /// The request made a name (MKDIR, SYMLINK, LINK, CREATE): node id 0 is a protocol
    /// error (LOOKUP's is a negative entry, ENOENT), and so is FUSE_ROOT_ID (Linux
    /// `create_new_entry` and `fuse_create_open` refuse `invalid_nodeid`).
    new_name: bool,
    /// The `S_IFMT` bits the entry's mode must carry (0: any): S_IFDIR for MKDIR,
    /// S_IFLNK for SYMLINK, S_IFREG for CREATE (Linux checks the same).
    file_type: u32,
    /// CREATE: a `fuse_open_out` follows the entry.
    open: bool,
}

impl EntryRule {
    const LOOKUP: EntryRule = EntryRule {
        new_name: false,
        file_type: 0,
        open: false,
    };

    fn made(file_type: u32) -> EntryRule {
        EntryRule {
            new_name: true,
            file_type,
            open: false,
        }
    }

    fn payload_len(self) -> usize {
        ENTRY_LEN + if self.open { OPEN_LEN } else { 0 }
    }
}

impl Shape {
    fn reply_len(self) -> u32 {
        let header = size_of::<OutHeader>() as u32;
        match self {
            Shape::Empty | Shape::EmptyOrNone | Shape::Data(_) => header,
            Shape::Fixed(n) => header + n,
            Shape::Init => header + size_of::<InitOut>() as u32,
            Shape::Entry(rule) => header + rule.payload_len() as u32,
            Shape::Written(_) => header + size_of::<WriteOut>() as u32,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    /// Completed; the result waits for `take`.
    Done,
}

#[derive(Copy, Clone, Debug)]
struct Slot {
    state: SlotState,
    unique: u64,
    opcode: u32,
    /// The request header's node id.
    node: u64,
    shape: Shape,
    /// Nobody will take the result (its caller gave up): free it on completion, and give
    /// back what it handed out.
    orphan: bool,
    result: FsResult<Reply>,
    /// What the accepted result handed out (the caller's once taken).
    handed: Handed,
    /// The FUSE session the request was sent in ([`FsDriver::session`]): what a reply
    /// of an earlier session handed out the device dropped at DESTROY, so nothing of it
    /// is owed.
    session: u64,
}

const IDLE: Slot = Slot {
    state: SlotState::Free,
    unique: 0,
    opcode: 0,
    node: 0,
    shape: Shape::Empty,
    orphan: false,
    result: Ok(Reply::Empty),
    handed: Handed::NONE,
    session: 0,
};

/// An open handle the driver owes the device a RELEASE (RELEASEDIR with `dir`) for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct OwedRelease {
    node: NodeId,
    fh: FileHandle,
    dir: bool,
}

/// What one reply handed out, whether or not the driver accepted it: a lookup reference
/// of a node (never the root's: Linux sends no FORGET for it either) and an open handle.
/// READDIRPLUS references are found by walking the records ([`dirplus_references`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Handed {
    node: Option<NodeId>,
    release: Option<OwedRelease>,
}

impl Handed {
    const NONE: Handed = Handed {
        node: None,
        release: None,
    };
}

/// References the driver owes the device because nobody holds them: replies completed
/// after their caller gave up (`abandon`, an interrupted wait), abandoned unread, or
/// refused after the device had taken the reference (a created entry of the wrong type,
/// attributes that fail validation, a malformed READDIRPLUS reply), and FORGETs a failed
/// `forget` could not send. Linux never gives up on a sent request; this driver does
/// (the kext's sleeps are interruptible), so it gives the references back instead:
/// [`FsDriver::poll`] sends them (FORGET/BATCH_FORGET on hiprio, RELEASE/RELEASEDIR as
/// requests nobody waits for) as hiprio and request slots allow. Both lists are
/// allocated at setup and never grow: what does not fit is counted in
/// [`FsStats::lost_references`].
struct Owed {
    /// (node, lookups), one element per node.
    forgets: Vec<(NodeId, u64)>,
    releases: Vec<OwedRelease>,
}

impl Owed {
    /// Adds `count` lookups of `node`; false when the list is full.
    fn forget(&mut self, node: NodeId, count: u64) -> bool {
        if let Some((_, n)) = self.forgets.iter_mut().find(|(id, _)| *id == node) {
            *n = n.saturating_add(count);
            return true;
        }
        if self.forgets.len() == self.forgets.capacity() {
            return false;
        }
        self.forgets.push((node, count));
        true
    }

    fn release(&mut self, r: OwedRelease) -> bool {
        if self.releases.len() == self.releases.capacity() {
            return false;
        }
        self.releases.push(r);
        true
    }

    /// Owes what `handed` names; returns how many references did not fit.
    fn handed(&mut self, handed: Handed) -> u64 {
        let node_lost = handed.node.is_some_and(|n| !self.forget(n, 1));
        let fh_lost = handed.release.is_some_and(|r| !self.release(r));
        u64::from(node_lost) + u64::from(fh_lost)
    }

    /// Owes one lookup of every node the READDIRPLUS reply of `len` bytes at `at` of
    /// `region` names; returns how many did not fit.
    /// A reply that cannot be read (a region out of range) counts as one lost
    /// reference: its records are not known, but the loss is visible.
    fn dirplus_in(&mut self, region: &DmaRegion, at: usize, len: usize) -> u64 {
        let mut lost = 0;
        let mut unreadable = false;
        dirplus_references(
            len,
            |off, buf| {
                let ok = region.read_into(at + off, buf);
                unreadable |= !ok;
                ok
            },
            |node| lost += u64::from(!self.forget(node, 1)),
        );
        lost + u64::from(unreadable)
    }

    /// Forgets everything owed: the session it was owed to ended.
    fn clear(&mut self) {
        self.forgets.clear();
        self.releases.clear();
    }
}

struct RequestQueue {
    index: u16,
    slots: Vec<Slot>,
    region: Option<DmaRegion>,
}

impl RequestQueue {
    fn stride(data_size: usize) -> usize {
        DATA_AREA + data_size
    }
}

/// Counters over the driver's lifetime.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Requests put on the request queues.
    pub requests: u64,
    /// Replies received (each request completes once).
    pub replies: u64,
    /// Of those, errno replies.
    pub errno_replies: u64,
    /// Of those, replies that broke the protocol.
    pub protocol_errors: u64,
    /// Notifications received and decoded (handed out by `take_notification`).
    pub notifications: u64,
    /// Notifications that broke the protocol (handed out as errors, in order).
    pub notify_errors: u64,
    /// FORGET / BATCH_FORGET requests on hiprio, and the nodes they carried.
    pub forget_requests: u64,
    pub forgotten_nodes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Node references and open handles nobody held that the driver gave back on its own
    /// (see [`FsDriver::abandon`]): lookups sent in FORGETs, RELEASE/RELEASEDIR sent.
    pub unclaimed_nodes_forgotten: u64,
    pub unclaimed_handles_released: u64,
    /// Of those, references the bounded list could not hold (the device keeps them
    /// until DESTROY).
    pub lost_references: u64,
    /// Attempts to send what was owed that failed (logged; the item stays owed).
    pub owed_send_errors: u64,
}

/// What an interrupt meant for the file system device.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FsInterrupt {
    /// DEVICE_NEEDS_RESET (§2.1.2): shut the driver down.
    pub needs_reset: bool,
    pub config_changed: bool,
}

/// Bytes of one request being encoded (on the stack: the I/O path does not allocate).
struct Encoder {
    buf: [u8; REQUEST_AREA],
    len: usize,
}

impl Encoder {
    fn new() -> Self {
        Encoder {
            buf: [0; REQUEST_AREA],
            len: size_of::<InHeader>(),
        }
    }

    fn push(&mut self, bytes: &[u8]) -> FsResult<()> {
        let end = self.len + bytes.len();
        let dst = self
            .buf
            .get_mut(self.len..end)
            .ok_or(FsError::InvalidArgument)?;
        dst.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    fn args<T: IntoBytes + Immutable>(&mut self, value: &T) -> FsResult<()> {
        self.push(value.as_bytes())
    }

    /// A path component: 1..=255 bytes, no `/`, no NUL; sent NUL-terminated.
    /// An extended attribute name: 1..=255 bytes, no NUL; sent NUL-terminated.
    fn xattr_name(&mut self, name: &[u8]) -> FsResult<()> {
        if name.is_empty() || name.len() > NAME_MAX || name.contains(&0) {
            return Err(FsError::InvalidName);
        }
        self.push(name)?;
        self.push(&[0])
    }

    fn name(&mut self, name: &[u8]) -> FsResult<()> {
        if name.is_empty() || name.len() > NAME_MAX || name.iter().any(|&b| b == b'/' || b == 0) {
            return Err(FsError::InvalidName);
        }
        self.push(name)?;
        self.push(&[0])
    }

    /// Writes the header in front (its `len` covers everything pushed, plus `extra`
    /// bytes of data sent from the slot's data buffer).
    fn finish(&mut self, mut header: InHeader, extra: u32) -> FsResult<&[u8]> {
        let len = u32::try_from(self.len)
            .ok()
            .and_then(|l| l.checked_add(extra))
            .ok_or(FsError::InvalidArgument)?;
        header.len = U32::new(len);
        let dst = self
            .buf
            .get_mut(..size_of::<InHeader>())
            .ok_or(FsError::InvalidArgument)?;
        dst.copy_from_slice(header.as_bytes());
        self.buf.get(..self.len).ok_or(FsError::InvalidArgument)
    }
}

/// The notification queue (VIRTIO_FS_F_NOTIFICATION): its buffers, all allocated at
/// setup and posted whenever they are not with the driver, and the decoded results
/// waiting for the caller.
struct NotifyQueue {
    region: Option<DmaRegion>,
    /// Bytes per buffer (at least `notify_buf_size`).
    stride: usize,
    /// Which buffers the device holds.
    posted: Vec<bool>,
    /// Results in arrival order; never longer than `posted.len()` (no allocation).
    pending: VecDeque<FsResult<Notification>>,
}

/// The virtio file system driver over a bus `B`.
pub struct FsDriver<B: Bus> {
    bus: B,
    options: FsOptions,
    config: FsConfig,
    data_size: u32,
    queues: Vec<RequestQueue>,
    hiprio: Option<DmaRegion>,
    hiprio_busy: [bool; HIPRIO_SLOTS],
    /// hiprio slots in use: [`HIPRIO_SLOTS`] within the queue's real size.
    hiprio_slots: usize,
    notify: Option<NotifyQueue>,
    owed: Owed,
    /// The FUSE session: advanced when INIT starts one and when DESTROY is sent.
    session: u64,
    /// DESTROY was sent (or INIT is under way): nothing owed is paid until INIT succeeds.
    ended: bool,
    next_unique: u64,
    init: Option<InitInfo>,
    stats: FsStats,
    /// `shutdown` ran (the device is reset and the memory freed).
    shut_down: bool,
}

impl<B: Bus> FsDriver<B> {
    /// Initialises the device (§3.1.1; VERSION_1 required, NOTIFICATION negotiated when
    /// offered and `notify_buffers` is non-zero), reads its configuration, sets up hiprio,
    /// the notification queue (with its buffers posted) and the request queues, allocates
    /// every slot and sets DRIVER_OK. FUSE_INIT follows with [`FsDriver::init`].
    pub fn new(mut bus: B, options: FsOptions) -> FsResult<Self> {
        if bus.device_type() != DeviceType::Fs {
            return Err(FsError::Virtio(Error::Unsupported));
        }
        let wanted_features = if options.notify_buffers == 0 {
            features::SUPPORTED.difference(features::NOTIFICATION)
        } else {
            features::SUPPORTED
        };
        let negotiated = bus.negotiate_features(wanted_features)?;
        let notification = negotiated.contains(features::NOTIFICATION);
        if !negotiated.contains(Features::VERSION_1) {
            // §5.11: the device has no legacy interface; a driver must not run it without
            // VERSION_1.
            bus.fail();
            return Err(FsError::Virtio(Error::MissingFeature { bit: 32 }));
        }
        let config = match FsConfig::read(&bus, notification) {
            Ok(c) => c,
            Err(e) => {
                bus.fail();
                return Err(e);
            }
        };
        let wanted = u32::from(options.max_request_queues.clamp(1, MAX_REQUEST_QUEUES));
        let count = config.num_request_queues.min(wanted) as u16;
        let mut specs: Vec<QueueSpec> = Vec::with_capacity(usize::from(count) + 1);
        // hiprio interrupts like the request queues (Linux gives it a vector too): a
        // `forget` that finds every hiprio buffer in use waits for the device, and only the
        // completion freeing one can end that wait. Its buffers are reclaimed on every poll.
        specs.push(
            QueueSpec::new(HIPRIO_QUEUE)
                .size(HIPRIO_SLOTS as u16)
                .interrupts(options.interrupts),
        );
        if notification {
            // §5.11.2: queue 1 is the notification queue; its buffers are posted below.
            specs.push(
                QueueSpec::new(NOTIFICATION_QUEUE)
                    .size(options.notify_buffers.min(MAX_NOTIFY_BUFFERS))
                    .interrupts(options.interrupts),
            );
        }
        // §5.11.2: request queues follow hiprio and, if present, the notification queue.
        let first = HIPRIO_QUEUE + 1 + u16::from(notification);
        for i in 0..count {
            specs.push(
                QueueSpec::new(first + i)
                    .size(options.queue_size)
                    .interrupts(options.interrupts),
            );
        }
        for s in &specs {
            if bus.max_queue_size(s.index) == 0 {
                bus.fail();
                return Err(FsError::Virtio(Error::NoSuchQueue { queue: s.index }));
            }
        }
        bus.setup_queues(&specs)?;
        let data_size = options.data_size.clamp(PAGE, 1 << 20) / PAGE * PAGE;
        let mut fs = FsDriver {
            bus,
            options,
            config,
            data_size,
            queues: Vec::with_capacity(usize::from(count)),
            hiprio: None,
            hiprio_busy: [false; HIPRIO_SLOTS],
            hiprio_slots: 0,
            notify: None,
            owed: Owed {
                forgets: Vec::new(),
                releases: Vec::new(),
            },
            session: 0,
            ended: false,
            next_unique: 1,
            init: None,
            stats: FsStats::default(),
            shut_down: false,
        };
        // From here on, an error resets the device and frees what was allocated (Drop).
        fs.hiprio = Some(
            fs.bus
                .dma()
                .alloc_coherent(HIPRIO_SLOT * HIPRIO_SLOTS, 64)?,
        );
        // The device may give hiprio fewer entries than asked: one slot per descriptor
        // (each FORGET is a one-segment chain), so `bus.add` never finds it full.
        fs.hiprio_slots = HIPRIO_SLOTS.min(usize::from(fs.bus.queue_size(HIPRIO_QUEUE)?));
        if let Some(size) = fs.config.notify_buf_size {
            let queue = fs.bus.queue_size(NOTIFICATION_QUEUE)?;
            let buffers = usize::from(options.notify_buffers.min(MAX_NOTIFY_BUFFERS).min(queue));
            // At least what the device asks (§5.11.6.3), and at least the longest
            // notification decoded here; cache-line multiples.
            let stride = (size as usize).max(NOTIFY_MSG_MAX).next_multiple_of(64);
            let region = fs.bus.dma().alloc_coherent(buffers.max(1) * stride, 64)?;
            let mut posted = Vec::with_capacity(buffers);
            posted.resize(buffers, false);
            fs.notify = Some(NotifyQueue {
                region: Some(region),
                stride,
                posted,
                pending: VecDeque::with_capacity(buffers),
            });
            for i in 0..buffers {
                fs.post_notify(i)?;
            }
        }
        for i in 0..count {
            let index = first + i;
            let size = fs.bus.queue_size(index)?;
            let slots = options.slots.clamp(1, size.max(1));
            let len = usize::from(slots) * RequestQueue::stride(data_size as usize);
            let region = fs.bus.dma().alloc_coherent(len, 4096)?;
            let mut table = Vec::with_capacity(usize::from(slots));
            table.resize(usize::from(slots), IDLE);
            fs.queues.push(RequestQueue {
                index,
                slots: table,
                region: Some(region),
            });
        }
        // At most one open handle per slot is owed at a time per completion; twice that
        // leaves room for handles whose RELEASE waits for a slot.
        let total_slots: usize = fs.queues.iter().map(|q| q.slots.len()).sum();
        fs.owed.forgets = Vec::with_capacity(OWED_FORGETS_MAX);
        fs.owed.releases = Vec::with_capacity(2 * total_slots);
        fs.bus.driver_ok()?;
        if fs.notify.is_some() {
            fs.bus.kick(NOTIFICATION_QUEUE)?;
        }
        log::info!(
            "virtio-fs: tag \"{}\", {} request queue(s) of {} used, {} slots of {} bytes each, {} notification buffer(s), features {:#x}",
            fs.config.tag(),
            fs.config.num_request_queues,
            count,
            options.slots,
            data_size,
            fs.notify_buffers(),
            fs.bus.features().bits()
        );
        Ok(fs)
    }

    pub fn bus(&self) -> &B {
        &self.bus
    }

    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn stats(&self) -> FsStats {
        self.stats
    }

    /// What FUSE_INIT settled, once it did.
    pub fn init_info(&self) -> Option<InitInfo> {
        self.init
    }

    /// Request queues in use.
    pub fn request_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device index of the first request queue: 1, or 2 with the notification
    /// queue (§5.11.2).
    pub fn first_request_queue(&self) -> u16 {
        self.queues.first().map_or(1, |q| q.index)
    }

    /// Whether VIRTIO_FS_F_NOTIFICATION is in use (queue 1 is the notification queue).
    pub fn has_notifications(&self) -> bool {
        self.notify.is_some()
    }

    /// Notification buffers posted and not yet collected by [`FsDriver::poll`].
    pub fn notify_buffers(&self) -> usize {
        self.notify
            .as_ref()
            .map_or(0, |n| n.posted.iter().filter(|&&p| p).count())
    }

    /// The oldest notification not yet taken: a decoded [`Notification`], or the
    /// protocol error a hostile one was (`None`: nothing waiting). [`FsDriver::poll`]
    /// (and every blocking operation, and interrupts) collects them.
    pub fn take_notification(&mut self) -> Option<FsResult<Notification>> {
        self.notify.as_mut().and_then(|n| n.pending.pop_front())
    }

    /// Largest READ/READDIR one request carries: the slot buffer, within `max_pages`.
    pub fn read_chunk(&self) -> u32 {
        self.data_size.min(self.max_pages_bytes())
    }

    /// Largest WRITE one request carries: the slot buffer, within `max_write` and
    /// `max_pages`.
    pub fn write_chunk(&self) -> u32 {
        let max_write = self.init.map_or(PAGE, |i| i.max_write);
        self.read_chunk().min(max_write)
    }

    fn max_pages_bytes(&self) -> u32 {
        let pages = match self.init {
            // Linux `process_init_reply`: `max_pages = max(arg->max_pages, 1)`.
            Some(i) if i.flags & init_flags::MAX_PAGES != 0 => u32::from(i.max_pages.max(1)),
            _ => DEFAULT_MAX_PAGES,
        };
        pages.saturating_mul(PAGE)
    }

    // ---- submission and completion ----

    /// Encodes `req` into a free slot and puts it on a request queue, without notifying
    /// (call [`FsDriver::kick`] after a batch). `QueueFull` when no slot or descriptors
    /// are free: poll completions (and take them) first.
    pub fn submit(&mut self, req: &Request<'_>) -> FsResult<Ticket> {
        if self.init.is_none() && !matches!(req, Request::Init) {
            return Err(FsError::NotInitialized);
        }
        let mut enc = Encoder::new();
        let (op, node, shape, write_data) = self.encode(req, &mut enc)?;
        let extra = write_data.map_or(0, |d| d.len() as u32);
        let unique = self.next_unique;
        let request = enc.finish(self.in_header(op, unique, node), extra)?;
        let segments =
            2 + usize::from(write_data.is_some()) + usize::from(matches!(shape, Shape::Data(_)));
        let Some((qi, si)) = self.free_slot(segments)? else {
            return Err(FsError::QueueFull);
        };
        let data_size = self.data_size as usize;
        let stride = RequestQueue::stride(data_size);
        let queue = self.queues.get_mut(qi).ok_or(Error::InvalidState)?;
        let region = queue.region.as_ref().ok_or(Error::InvalidState)?;
        let base = si * stride;
        // The slot is free: the device does not access it until the chain is published
        // (the bus's release fence before the avail index, §2.7.13).
        if !region.write_at(base, request) {
            return Err(FsError::Virtio(Error::InvalidState));
        }
        let daddr = region.daddr + base as u64;
        let mut readable = [Segment::new(daddr, request.len() as u32); 2];
        let mut nread = 1;
        if let Some(data) = write_data {
            if !region.write_at(base + DATA_AREA, data) {
                return Err(FsError::InvalidArgument);
            }
            if let Some(seg) = readable.get_mut(1) {
                *seg = Segment::new(daddr + DATA_AREA as u64, data.len() as u32);
            }
            nread = 2;
        }
        // Clear the reply header: a device that claims a reply without writing one is
        // caught by the length and `unique` checks.
        region.write_at(base + REQUEST_AREA, &[0u8; size_of::<OutHeader>()]);
        let mut writable = [Segment::new(daddr + REQUEST_AREA as u64, shape.reply_len()); 2];
        let mut nwrite = 1;
        if let Shape::Data(max) = shape {
            if let Some(seg) = writable.get_mut(1) {
                *seg = Segment::new(daddr + DATA_AREA as u64, max);
            }
            nwrite = 2;
        }
        let index = queue.index;
        let token = (qi << 16) | si;
        self.bus.add(
            index,
            readable.get(..nread).unwrap_or(&[]),
            writable.get(..nwrite).unwrap_or(&[]),
            token,
        )?;
        let slot = self
            .queues
            .get_mut(qi)
            .and_then(|q| q.slots.get_mut(si))
            .ok_or(Error::InvalidState)?;
        *slot = Slot {
            state: SlotState::InFlight,
            unique,
            opcode: op,
            node,
            shape,
            orphan: false,
            result: Ok(Reply::Empty),
            handed: Handed::NONE,
            session: self.session,
        };
        self.next_unique = self.next_unique.wrapping_add(1).max(1);
        self.stats.requests += 1;
        Ok(Ticket {
            queue: qi as u16,
            slot: si as u16,
            unique,
        })
    }

    /// A `fuse_in_header` with the configured credentials (`len` is the encoder's).
    fn in_header(&self, op: u32, unique: u64, node: u64) -> InHeader {
        InHeader {
            len: U32::new(0),
            opcode: U32::new(op),
            unique: U64::new(unique),
            nodeid: U64::new(node),
            uid: U32::new(self.options.uid),
            gid: U32::new(self.options.gid),
            pid: U32::new(self.options.pid),
            ..Default::default()
        }
    }

    /// Notifies every request queue that has new requests (if the device asked).
    pub fn kick(&mut self) -> FsResult<()> {
        for i in 0..self.queues.len() {
            if let Some(index) = self.queues.get(i).map(|q| q.index) {
                self.bus.kick(index)?;
            }
        }
        Ok(())
    }

    /// Collects every reply the device returned (no interrupt needed): each request's
    /// result is decoded and validated, and waits in its slot for [`FsDriver::take`].
    /// Then sends what the driver owes the device (see [`FsDriver::abandon`]) as far as
    /// free hiprio and request slots allow, without waiting. Returns how many replies
    /// arrived. Bounded: at most one pop per slot per queue.
    pub fn poll(&mut self) -> FsResult<usize> {
        self.reclaim_hiprio()?;
        self.collect_notifications()?;
        let mut arrived = 0;
        for qi in 0..self.queues.len() {
            let (index, bound) = match self.queues.get(qi) {
                Some(q) => (q.index, q.slots.len()),
                None => break,
            };
            for _ in 0..=bound {
                let Some(used) = self.bus.pop_used(index)? else {
                    break;
                };
                self.complete(qi, used)?;
                arrived += 1;
            }
        }
        self.pay_owed();
        Ok(arrived)
    }

    /// Sends owed RELEASE/RELEASEDIRs (as requests nobody waits for) while request slots
    /// are free, then owed FORGETs as BATCH_FORGETs while hiprio slots are free. Never
    /// waits; what does not go now waits for the next poll. Best effort: an error is
    /// logged and counted in [`FsStats::owed_send_errors`], the item stays owed, and
    /// `poll` does not fail for it. Before FUSE_INIT, and from DESTROY on (which drops
    /// every reference), there is nothing to send.
    fn pay_owed(&mut self) {
        if self.init.is_none() || self.ended {
            return;
        }
        let mut released = false;
        // Bounded: every round removes one element or ends the loop.
        while let Some(&owed) = self.owed.releases.last() {
            let req = if owed.dir {
                Request::Releasedir {
                    node: owed.node,
                    fh: owed.fh,
                }
            } else {
                Request::Release {
                    node: owed.node,
                    fh: owed.fh,
                    flags: 0,
                }
            };
            match self.submit(&req) {
                Ok(t) => {
                    // Its reply hands nothing out: dropped on completion.
                    self.abandon(t);
                    self.stats.unclaimed_handles_released += 1;
                    released = true;
                    self.owed.releases.pop();
                }
                Err(FsError::QueueFull) => break,
                Err(e) => {
                    // Kept for a later poll.
                    log::error!("virtio-fs: owed RELEASE of fh {}: {e}", owed.fh.0);
                    self.stats.owed_send_errors += 1;
                    break;
                }
            }
        }
        if released && let Err(e) = self.kick() {
            log::error!("virtio-fs: kick after owed RELEASEs: {e}");
            self.stats.owed_send_errors += 1;
        }
        let mut forgot = false;
        // Bounded: every round sends up to FORGET_BATCH_MAX elements or ends the loop.
        while !self.owed.forgets.is_empty() {
            let slot = match self.free_hiprio_slot() {
                Ok(Some(slot)) => slot,
                Ok(None) => break,
                Err(e) => {
                    log::error!("virtio-fs: hiprio for owed FORGETs: {e}");
                    self.stats.owed_send_errors += 1;
                    break;
                }
            };
            let start = self.owed.forgets.len().saturating_sub(FORGET_BATCH_MAX);
            let mut batch = [(NodeId(0), 0u64); FORGET_BATCH_MAX];
            let (Some(from), Some(to)) = (
                self.owed.forgets.get(start..),
                batch.get_mut(..self.owed.forgets.len() - start),
            ) else {
                break;
            };
            to.copy_from_slice(from);
            let batch = &*to;
            if let Err(e) = self.send_forget(slot, batch) {
                // Kept for a later poll.
                log::error!("virtio-fs: owed FORGET of {} node(s): {e}", batch.len());
                self.stats.owed_send_errors += 1;
                break;
            }
            self.stats.unclaimed_nodes_forgotten += batch.iter().map(|&(_, n)| n).sum::<u64>();
            self.owed.forgets.truncate(start);
            forgot = true;
        }
        if forgot && let Err(e) = self.bus.kick(HIPRIO_QUEUE) {
            log::error!("virtio-fs: kick after owed FORGETs: {e}");
            self.stats.owed_send_errors += 1;
        }
    }

    /// The `unique` the next request will carry: requests (FORGETs too) are numbered in
    /// submission order.
    pub fn next_unique(&self) -> u64 {
        self.next_unique
    }

    /// Request slots not free: requests in flight (the driver's own RELEASEs included)
    /// and results not yet taken.
    pub fn busy_slots(&self) -> usize {
        let busy = |q: &RequestQueue| {
            q.slots
                .iter()
                .filter(|s| s.state != SlotState::Free)
                .count()
        };
        self.queues.iter().map(busy).sum()
    }

    /// Whether the request of `t` has completed (its result is ready for `take`).
    pub fn is_done(&self, t: Ticket) -> bool {
        self.slot(t)
            .is_some_and(|s| s.state == SlotState::Done && s.unique == t.unique)
    }

    /// Takes the result of a completed request and frees its slot. Data replies (READ,
    /// READLINK, READDIR) are copied into `out`, which must hold them all
    /// (`InvalidArgument` otherwise, and the result stays to be taken with a larger
    /// buffer); `Reply::Data(n)` says how many bytes. READDIR(PLUS) records are validated
    /// here ([`validate_dir`]): a malformed reply is a protocol error, and its READDIRPLUS
    /// references go back to the device. What a taken result holds (lookup references,
    /// open handles) is the caller's.
    pub fn take(&mut self, t: Ticket, out: &mut [u8]) -> FsResult<Reply> {
        let stride = RequestQueue::stride(self.data_size as usize);
        let queue = self
            .queues
            .get_mut(usize::from(t.queue))
            .ok_or(FsError::UnknownTicket)?;
        let slot = queue
            .slots
            .get_mut(usize::from(t.slot))
            .ok_or(FsError::UnknownTicket)?;
        if slot.state != SlotState::Done || slot.unique != t.unique {
            return Err(FsError::UnknownTicket);
        }
        let (result, opcode, session) = (slot.result, slot.opcode, slot.session);
        if let Ok(Reply::Data(n)) = result {
            // Checked before the slot is freed: a short buffer loses nothing.
            let dst = out.get_mut(..n as usize).ok_or(FsError::InvalidArgument)?;
            let region = queue.region.as_ref().ok_or(Error::InvalidState)?;
            // The device returned the buffer through the used ring; a device that keeps
            // writing it cannot cause undefined behaviour: copied once, validated after.
            if !region.read_into(usize::from(t.slot) * stride + DATA_AREA, dst) {
                return Err(FsError::Virtio(Error::InvalidState));
            }
        }
        *slot = IDLE;
        if let (Ok(Reply::Data(n)), opcode::READDIR | opcode::READDIRPLUS) = (result, opcode) {
            let plus = opcode == opcode::READDIRPLUS;
            let records = out.get(..n as usize).unwrap_or(&[]);
            if let Err(e) = validate_dir(records, plus) {
                self.stats.protocol_errors += 1;
                log::error!("virtio-fs: opcode {opcode}: {e}");
                if plus && session == self.session {
                    let owed = &mut self.owed;
                    let mut lost = 0;
                    dirplus_references(
                        records.len(),
                        |at, buf| {
                            let src = records.get(at..at + buf.len());
                            src.inspect(|s| buf.copy_from_slice(s)).is_some()
                        },
                        |node| lost += u64::from(!owed.forget(node, 1)),
                    );
                    self.stats.lost_references += lost;
                }
                return Err(e);
            }
        }
        result
    }

    /// Gives up on a request: its result is dropped when it completes (or now, if it
    /// did). What the reply hands out — a LOOKUP, MKDIR, SYMLINK, LINK or CREATE entry's
    /// lookup reference, an OPEN, OPENDIR or CREATE handle, one reference per
    /// READDIRPLUS entry — nobody holds, so the driver gives it back: the following
    /// polls send the FORGETs and RELEASE/RELEASEDIRs ([`FsStats`] counts them).
    pub fn abandon(&mut self, t: Ticket) {
        let stride = RequestQueue::stride(self.data_size as usize);
        let Some(queue) = self.queues.get_mut(usize::from(t.queue)) else {
            return;
        };
        let Some(slot) = queue
            .slots
            .get_mut(usize::from(t.slot))
            .filter(|s| s.unique == t.unique)
        else {
            return;
        };
        let current = slot.session == self.session;
        match slot.state {
            SlotState::Done if !current => *slot = IDLE,
            SlotState::Done => {
                let mut lost = self.owed.handed(slot.handed);
                if let (Ok(Reply::Data(n)), opcode::READDIRPLUS, Some(region)) =
                    (slot.result, slot.opcode, queue.region.as_ref())
                {
                    let at = usize::from(t.slot) * stride + DATA_AREA;
                    lost += self.owed.dirplus_in(region, at, n as usize);
                }
                self.stats.lost_references += lost;
                *slot = IDLE;
            }
            SlotState::InFlight => slot.orphan = true,
            SlotState::Free => {}
        }
    }

    /// Demultiplexes an interrupt (`vector`: MSI-X entry; `None` for INTx, which reads
    /// the ISR) and collects replies.
    pub fn handle_interrupt(&mut self, vector: Option<u16>) -> FsResult<FsInterrupt> {
        let cause = self.bus.handle_interrupt(vector);
        if !cause.queues.is_empty() {
            self.poll()?;
        }
        Ok(FsInterrupt {
            needs_reset: cause.needs_reset,
            config_changed: cause.config_changed,
        })
    }

    /// Re-enables the interrupts of hiprio, the notification queue and the request queues
    /// before the caller sleeps; true when completions arrived meanwhile (poll instead of
    /// sleeping).
    pub fn enable_interrupts(&mut self) -> FsResult<bool> {
        let mut more = self.bus.enable_interrupts(HIPRIO_QUEUE)?;
        if self.notify.is_some() {
            more |= self.bus.enable_interrupts(NOTIFICATION_QUEUE)?;
        }
        for i in 0..self.queues.len() {
            if let Some(index) = self.queues.get(i).map(|q| q.index) {
                more |= self.bus.enable_interrupts(index)?;
            }
        }
        Ok(more)
    }

    /// Resets the device and frees every buffer. Requests in flight are lost; the driver
    /// refuses further use. A device that will not reset, and whose DMA cannot be stopped,
    /// may still write the buffers: they are leaked (logged), not freed.
    pub fn shutdown(&mut self) {
        let quiet = self.bus.reset(&mut |_, _| {}).is_ok();
        // Taken without allocating (this runs in Drop, possibly under memory pressure).
        let regions = self
            .queues
            .iter_mut()
            .filter_map(|q| q.region.take())
            .chain(self.hiprio.take())
            .chain(self.notify.as_mut().and_then(|n| n.region.take()));
        // SAFETY: each region came from this bus's `alloc_coherent` and is taken out of
        // its owner (released once); `quiet`: the reset above was acknowledged or the
        // device's DMA stopped, so it no longer accesses them (otherwise they are leaked).
        unsafe { self.bus.release_dma(regions, quiet) };
        for q in &mut self.queues {
            q.slots.iter_mut().for_each(|s| *s = IDLE);
        }
        self.hiprio_busy = [false; HIPRIO_SLOTS];
        if let Some(n) = self.notify.as_mut() {
            n.posted.iter_mut().for_each(|p| *p = false);
            n.pending.clear();
        }
        self.init = None;
        self.shut_down = true;
    }

    fn slot(&self, t: Ticket) -> Option<&Slot> {
        self.queues
            .get(usize::from(t.queue))
            .and_then(|q| q.slots.get(usize::from(t.slot)))
    }

    /// A free slot on the queue with the most free slots that has descriptors for a chain
    /// of `segments`.
    fn free_slot(&self, segments: usize) -> FsResult<Option<(usize, usize)>> {
        let mut best: Option<(usize, usize, usize)> = None;
        for (qi, q) in self.queues.iter().enumerate() {
            let free = q
                .slots
                .iter()
                .filter(|s| s.state == SlotState::Free)
                .count();
            if free == 0
                || usize::from(self.bus.free_descriptors(q.index)?)
                    < self.bus.descriptors_for(q.index, segments)?
            {
                continue;
            }
            if best.is_none_or(|(_, _, f)| free > f)
                && let Some(si) = q.slots.iter().position(|s| s.state == SlotState::Free)
            {
                best = Some((qi, si, free));
            }
        }
        Ok(best.map(|(qi, si, _)| (qi, si)))
    }

    /// Handles one used element of request queue `qi`.
    fn complete(&mut self, qi: usize, used: Used) -> FsResult<()> {
        let stride = RequestQueue::stride(self.data_size as usize);
        let queue = self.queues.get_mut(qi).ok_or(Error::InvalidState)?;
        let si = used.token & 0xFFFF;
        if used.token >> 16 != qi {
            return Err(FsError::Protocol {
                what: "completed a request of another queue",
            });
        }
        let Some(slot) = queue
            .slots
            .get_mut(si)
            .filter(|s| s.state == SlotState::InFlight)
        else {
            return Err(FsError::Protocol {
                what: "completed a request the driver did not send",
            });
        };
        let region = queue.region.as_ref().ok_or(Error::InvalidState)?;
        let reply_at = si * stride + REQUEST_AREA;
        let mut handed = Handed::NONE;
        let result = decode_reply(region, reply_at, slot, used.len, &mut handed);
        self.stats.replies += 1;
        match &result {
            Err(FsError::Errno(_)) => self.stats.errno_replies += 1,
            Err(FsError::Protocol { what }) => {
                self.stats.protocol_errors += 1;
                log::error!("virtio-fs: opcode {}: {what}", slot.opcode);
            }
            Ok(Reply::Data(n)) if slot.opcode == opcode::READ => {
                self.stats.bytes_read += u64::from(*n)
            }
            Ok(Reply::Written(n)) => self.stats.bytes_written += u64::from(*n),
            _ => {}
        }
        if (slot.orphan || result.is_err()) && slot.session == self.session {
            // Nobody will hold what the reply handed out (its caller is gone, or the
            // reply was refused after the device took the reference): owed back (unless
            // the request was of an ended session, whose references the device dropped).
            let mut lost = self.owed.handed(handed);
            if let (true, Ok(Reply::Data(n)), opcode::READDIRPLUS) =
                (slot.orphan, result, slot.opcode)
            {
                lost += self
                    .owed
                    .dirplus_in(region, si * stride + DATA_AREA, n as usize);
            }
            self.stats.lost_references += lost;
        }
        if slot.orphan {
            *slot = IDLE;
        } else {
            slot.state = SlotState::Done;
            slot.result = result;
            slot.handed = if result.is_ok() { handed } else { Handed::NONE };
        }
        Ok(())
    }

    /// Builds the arguments of `req`: returns (opcode, node id, reply shape, data sent
    /// from the slot's data buffer).
    fn encode<'r>(
        &self,
        req: &Request<'r>,
        enc: &mut Encoder,
    ) -> FsResult<(u32, u64, Shape, Option<&'r [u8]>)> {
        let attr = Shape::Fixed(size_of::<AttrOut>() as u32);
        let open = Shape::Fixed(size_of::<OpenOut>() as u32);
        Ok(match *req {
            Request::Init => {
                enc.args(&InitIn {
                    major: U32::new(wire::FUSE_KERNEL_VERSION),
                    minor: U32::new(wire::FUSE_KERNEL_MINOR_VERSION),
                    max_readahead: U32::new(self.options.max_readahead),
                    flags: U32::new(OFFERED_INIT_FLAGS),
                })?;
                (opcode::INIT, 0, Shape::Init, None)
            }
            Request::Lookup { parent, name } => {
                enc.name(name)?;
                (
                    opcode::LOOKUP,
                    parent.0,
                    Shape::Entry(EntryRule::LOOKUP),
                    None,
                )
            }
            Request::Getattr { node, fh } => {
                enc.args(&GetattrIn {
                    getattr_flags: U32::new(if fh.is_some() { wire::GETATTR_FH } else { 0 }),
                    dummy: U32::new(0),
                    fh: U64::new(fh.map_or(0, |f| f.0)),
                })?;
                (opcode::GETATTR, node.0, attr, None)
            }
            Request::Setattr { node, set } => {
                enc.args(&setattr_in(&set))?;
                (opcode::SETATTR, node.0, attr, None)
            }
            Request::Open { node, flags } => {
                // Linux `fuse_send_open`: O_CREAT and O_EXCL never, O_TRUNC only with
                // ATOMIC_O_TRUNC negotiated (else the truncation is a SETATTR of its
                // own, which `open` sends).
                let mut strip = open_flags::O_CREAT | open_flags::O_EXCL;
                if !self.negotiated(init_flags::ATOMIC_O_TRUNC) {
                    strip |= open_flags::O_TRUNC;
                }
                enc.args(&OpenIn {
                    flags: U32::new(flags & !strip),
                    open_flags: U32::new(0),
                })?;
                (opcode::OPEN, node.0, open, None)
            }
            Request::Opendir { node, flags } => {
                enc.args(&OpenIn {
                    flags: U32::new(flags),
                    open_flags: U32::new(0),
                })?;
                (opcode::OPENDIR, node.0, open, None)
            }
            Request::Read {
                node,
                fh,
                offset,
                size,
            } => {
                if size == 0 || size > self.read_chunk() {
                    return Err(FsError::InvalidArgument);
                }
                enc.args(&read_in(fh, offset, size))?;
                (opcode::READ, node.0, Shape::Data(size), None)
            }
            Request::Write {
                node,
                fh,
                offset,
                data,
            } => {
                if data.is_empty() || data.len() > self.write_chunk() as usize {
                    return Err(FsError::InvalidArgument);
                }
                enc.args(&WriteIn {
                    fh: U64::new(fh.0),
                    offset: U64::new(offset),
                    size: U32::new(data.len() as u32),
                    ..Default::default()
                })?;
                let written = Shape::Written(data.len() as u32);
                (opcode::WRITE, node.0, written, Some(data))
            }
            Request::Release { node, fh, flags } => {
                enc.args(&release_in(fh, flags))?;
                (opcode::RELEASE, node.0, Shape::Empty, None)
            }
            Request::Releasedir { node, fh } => {
                enc.args(&release_in(fh, 0))?;
                (opcode::RELEASEDIR, node.0, Shape::Empty, None)
            }
            Request::Readdir {
                node,
                fh,
                offset,
                size,
                plus,
            } => {
                if size == 0 || size > self.read_chunk() {
                    return Err(FsError::InvalidArgument);
                }
                // READDIRPLUS only with DO_READDIRPLUS negotiated (Linux
                // `fuse_use_readdirplus`); `readdir` falls back to READDIR.
                if plus && !self.negotiated(init_flags::DO_READDIRPLUS) {
                    return Err(FsError::InvalidArgument);
                }
                enc.args(&read_in(fh, offset, size))?;
                let op = if plus {
                    opcode::READDIRPLUS
                } else {
                    opcode::READDIR
                };
                (op, node.0, Shape::Data(size), None)
            }
            Request::Create {
                parent,
                name,
                flags,
                mode: m,
                umask,
            } => {
                enc.args(&CreateIn {
                    flags: U32::new(flags | open_flags::O_CREAT),
                    mode: U32::new(with_type(m, mode::S_IFREG)),
                    umask: U32::new(umask),
                    open_flags: U32::new(0),
                })?;
                enc.name(name)?;
                let created = EntryRule {
                    open: true,
                    ..EntryRule::made(mode::S_IFREG)
                };
                (opcode::CREATE, parent.0, Shape::Entry(created), None)
            }
            Request::Mkdir {
                parent,
                name,
                mode: m,
                umask,
            } => {
                enc.args(&MkdirIn {
                    mode: U32::new(with_type(m, mode::S_IFDIR)),
                    umask: U32::new(umask),
                })?;
                enc.name(name)?;
                let made = EntryRule::made(mode::S_IFDIR);
                (opcode::MKDIR, parent.0, Shape::Entry(made), None)
            }
            Request::Unlink { parent, name } => {
                enc.name(name)?;
                (opcode::UNLINK, parent.0, Shape::Empty, None)
            }
            Request::Rmdir { parent, name } => {
                enc.name(name)?;
                (opcode::RMDIR, parent.0, Shape::Empty, None)
            }
            Request::Rename {
                old_parent,
                old_name,
                new_parent,
                new_name,
                flags,
            } => {
                enc.args(&Rename2In {
                    newdir: U64::new(new_parent.0),
                    flags: U32::new(flags),
                    padding: U32::new(0),
                })?;
                enc.name(old_name)?;
                enc.name(new_name)?;
                (opcode::RENAME2, old_parent.0, Shape::Empty, None)
            }
            Request::Link {
                node,
                new_parent,
                new_name,
            } => {
                enc.args(&LinkIn {
                    oldnodeid: U64::new(node.0),
                })?;
                enc.name(new_name)?;
                // Any type: the linked node's, which the driver does not know.
                let made = EntryRule::made(0);
                (opcode::LINK, new_parent.0, Shape::Entry(made), None)
            }
            Request::Symlink {
                parent,
                name,
                target,
            } => {
                // The entry's name, then the link's target (both NUL-terminated).
                enc.name(name)?;
                if target.is_empty() || target.len() > SYMLINK_TARGET_MAX || target.contains(&0) {
                    return Err(FsError::InvalidName);
                }
                enc.push(target)?;
                enc.push(&[0])?;
                let made = EntryRule::made(mode::S_IFLNK);
                (opcode::SYMLINK, parent.0, Shape::Entry(made), None)
            }
            Request::Readlink { node } => (
                opcode::READLINK,
                node.0,
                Shape::Data(self.read_chunk()),
                None,
            ),
            Request::Statfs { node } => (
                opcode::STATFS,
                node.0,
                Shape::Fixed(size_of::<StatfsOut>() as u32),
                None,
            ),
            Request::Fsync { node, fh, datasync } | Request::Fsyncdir { node, fh, datasync } => {
                enc.args(&FsyncIn {
                    fh: U64::new(fh.0),
                    fsync_flags: U32::new(if datasync { wire::FSYNC_FDATASYNC } else { 0 }),
                    padding: U32::new(0),
                })?;
                let op = if matches!(req, Request::Fsync { .. }) {
                    opcode::FSYNC
                } else {
                    opcode::FSYNCDIR
                };
                (op, node.0, Shape::Empty, None)
            }
            Request::Flush {
                node,
                fh,
                lock_owner,
            } => {
                enc.args(&FlushIn {
                    fh: U64::new(fh.0),
                    unused: U32::new(0),
                    padding: U32::new(0),
                    lock_owner: U64::new(lock_owner),
                })?;
                (opcode::FLUSH, node.0, Shape::Empty, None)
            }
            Request::Destroy => (opcode::DESTROY, 0, Shape::EmptyOrNone, None),
            Request::Setxattr {
                node,
                name,
                value,
                flags,
            } => {
                if value.len() > self.data_size as usize {
                    return Err(FsError::InvalidArgument);
                }
                enc.args(&SetxattrIn {
                    size: U32::new(value.len() as u32),
                    flags: U32::new(flags),
                })?;
                enc.xattr_name(name)?;
                // An empty value is sent as no data segment.
                let value = (!value.is_empty()).then_some(value);
                (opcode::SETXATTR, node.0, Shape::Empty, value)
            }
            Request::Getxattr { node, name, size } => {
                enc.args(&xattr_in(size))?;
                enc.xattr_name(name)?;
                (opcode::GETXATTR, node.0, self.xattr_shape(size)?, None)
            }
            Request::Listxattr { node, size } => {
                enc.args(&xattr_in(size))?;
                (opcode::LISTXATTR, node.0, self.xattr_shape(size)?, None)
            }
            Request::Removexattr { node, name } => {
                enc.xattr_name(name)?;
                (opcode::REMOVEXATTR, node.0, Shape::Empty, None)
            }
            Request::Lseek {
                node,
                fh,
                offset,
                whence,
            } => {
                enc.args(&LseekIn {
                    fh: U64::new(fh.0),
                    offset: U64::new(offset),
                    whence: U32::new(whence),
                    padding: U32::new(0),
                })?;
                let out = Shape::Fixed(size_of::<LseekOut>() as u32);
                (opcode::LSEEK, node.0, out, None)
            }
            Request::Fallocate {
                node,
                fh,
                offset,
                length,
                mode: m,
            } => {
                enc.args(&FallocateIn {
                    fh: U64::new(fh.0),
                    offset: U64::new(offset),
                    length: U64::new(length),
                    mode: U32::new(m),
                    padding: U32::new(0),
                })?;
                (opcode::FALLOCATE, node.0, Shape::Empty, None)
            }
        })
    }

    /// Whether FUSE_INIT settled `flag` (offered and accepted).
    fn negotiated(&self, flag: u32) -> bool {
        self.init.is_some_and(|i| i.flags & flag != 0)
    }

    /// GETXATTR/LISTXATTR: size 0 asks for a `fuse_getxattr_out`; otherwise data.
    fn xattr_shape(&self, size: u32) -> FsResult<Shape> {
        if size == 0 {
            Ok(Shape::Fixed(size_of::<GetxattrOut>() as u32))
        } else if size <= self.data_size {
            Ok(Shape::Data(size))
        } else {
            Err(FsError::InvalidArgument)
        }
    }

    // ---- the notification queue ----

    /// Gives notification buffer `i` to the device (its whole stride, device-writable).
    fn post_notify(&mut self, i: usize) -> FsResult<()> {
        let n = self.notify.as_mut().ok_or(Error::InvalidState)?;
        let region = n.region.as_ref().ok_or(Error::InvalidState)?;
        let seg = Segment::new(region.daddr + (i * n.stride) as u64, n.stride as u32);
        self.bus.add(NOTIFICATION_QUEUE, &[], &[seg], i)?;
        if let Some(p) = n.posted.get_mut(i) {
            *p = true;
        }
        Ok(())
    }

    /// Collects the notification buffers the device returned: each is validated and
    /// decoded (a hostile one becomes a protocol error in its place), queued for
    /// [`FsDriver::take_notification`] and its buffer posted again. Bounded: at most
    /// the buffer count per call, and never more than the room left for results.
    fn collect_notifications(&mut self) -> FsResult<()> {
        let Some(n) = self.notify.as_ref() else {
            return Ok(());
        };
        let room = n.posted.len().saturating_sub(n.pending.len());
        let mut reposted = false;
        for _ in 0..room {
            let Some(used) = self.bus.pop_used(NOTIFICATION_QUEUE)? else {
                break;
            };
            let n = self.notify.as_mut().ok_or(Error::InvalidState)?;
            match n.posted.get_mut(used.token) {
                Some(p @ true) => *p = false,
                _ => {
                    return Err(FsError::Protocol {
                        what: "notification queue completed a buffer the driver did not post",
                    });
                }
            }
            let region = n.region.as_ref().ok_or(Error::InvalidState)?;
            // The bus checked `used.len` against the buffer's size.
            let result = if used.len as usize > NOTIFY_MSG_MAX {
                Err(FsError::Protocol {
                    what: "notification longer than any notify message",
                })
            } else {
                let mut buf = [0u8; NOTIFY_MSG_MAX];
                let bytes = buf
                    .get_mut(..used.len as usize)
                    .ok_or(Error::InvalidState)?;
                // Copied once out of the returned buffer, validated after.
                if !region.read_into(used.token * n.stride, bytes) {
                    return Err(FsError::Virtio(Error::InvalidState));
                }
                notify::decode(bytes)
            };
            match &result {
                Ok(_) => self.stats.notifications += 1,
                Err(e) => {
                    self.stats.notify_errors += 1;
                    log::error!("virtio-fs: notification: {e}");
                }
            }
            n.pending.push_back(result);
            self.post_notify(used.token)?;
            reposted = true;
        }
        if reposted {
            self.bus.kick(NOTIFICATION_QUEUE)?;
        }
        Ok(())
    }

    // ---- hiprio: FORGET and BATCH_FORGET ----

    /// Returns hiprio buffers the device consumed. Bounded by the slot count.
    fn reclaim_hiprio(&mut self) -> FsResult<()> {
        if self.hiprio.is_none() {
            return Err(FsError::Virtio(Error::InvalidState));
        }
        for _ in 0..=HIPRIO_SLOTS {
            let Some(used) = self.bus.pop_used(HIPRIO_QUEUE)? else {
                return Ok(());
            };
            // The bus checked `used.len` against the chain's writable capacity (none).
            match self.hiprio_busy.get_mut(used.token) {
                Some(busy @ true) => *busy = false,
                _ => {
                    return Err(FsError::Protocol {
                        what: "hiprio completed a buffer the driver did not send",
                    });
                }
            }
        }
        Ok(())
    }

    /// Sends FORGET (one node) or BATCH_FORGET (several) on hiprio for `nodes` (node,
    /// lookup count), waiting for hiprio buffers when all are in use (the completion
    /// freeing one interrupts, as a request's does). The device sends no reply
    /// (§5.11.6.1: hiprio requests have no device-writable part).
    ///
    /// All or nothing for the caller: whatever it returns, the references of `nodes`
    /// are the driver's from now on. When sending fails part-way (a wait ends in an
    /// error, the bus refuses), the nodes not yet sent are owed and later polls send
    /// them (those the bounded list cannot hold are counted in
    /// [`FsStats::lost_references`]); the error is returned, and calling again for the
    /// same nodes would forget them twice. Only `NotInitialized` (no session: nothing
    /// to forget) sends and keeps nothing.
    pub fn forget<W: Waiter<B>>(&mut self, w: &mut W, nodes: &[(NodeId, u64)]) -> FsResult<()> {
        if self.init.is_none() {
            return Err(FsError::NotInitialized);
        }
        let mut sent = 0;
        let mut result = Ok(());
        for batch in nodes.chunks(FORGET_BATCH_MAX) {
            let step = self
                .free_hiprio(w)
                .and_then(|slot| self.send_forget(slot, batch));
            if let Err(e) = step {
                result = Err(e);
                break;
            }
            sent += batch.len();
        }
        if result.is_err() {
            for &(node, count) in nodes.get(sent..).unwrap_or(&[]) {
                if !self.owed.forget(node, count) {
                    self.stats.lost_references += 1;
                }
            }
        }
        if sent > 0 {
            let kicked = self.bus.kick(HIPRIO_QUEUE);
            result = result.and(kicked.map(|_| ()).map_err(FsError::from));
        }
        result
    }

    /// Puts FORGET (one node) or BATCH_FORGET of `batch` (at most [`FORGET_BATCH_MAX`])
    /// in free hiprio slot `slot`, without notifying.
    fn send_forget(&mut self, slot: usize, batch: &[(NodeId, u64)]) -> FsResult<()> {
        let mut enc = Encoder::new();
        let (op, node) = match batch {
            [(node, nlookup)] => {
                enc.args(&ForgetIn {
                    nlookup: U64::new(*nlookup),
                })?;
                (opcode::FORGET, node.0)
            }
            _ => {
                enc.args(&BatchForgetIn {
                    count: U32::new(batch.len() as u32),
                    dummy: U32::new(0),
                })?;
                for (node, nlookup) in batch {
                    enc.args(&ForgetOne {
                        nodeid: U64::new(node.0),
                        nlookup: U64::new(*nlookup),
                    })?;
                }
                (opcode::BATCH_FORGET, 0)
            }
        };
        let unique = self.next_unique;
        self.next_unique = self.next_unique.wrapping_add(1).max(1);
        let bytes = enc.finish(self.in_header(op, unique, node), 0)?;
        let region = self.hiprio.as_ref().ok_or(Error::InvalidState)?;
        if bytes.len() > HIPRIO_SLOT || !region.write_at(slot * HIPRIO_SLOT, bytes) {
            return Err(FsError::InvalidArgument);
        }
        let seg = Segment::new(
            region.daddr + (slot * HIPRIO_SLOT) as u64,
            bytes.len() as u32,
        );
        self.bus.add(HIPRIO_QUEUE, &[seg], &[], slot)?;
        if let Some(busy) = self.hiprio_busy.get_mut(slot) {
            *busy = true;
        }
        self.stats.forget_requests += 1;
        self.stats.forgotten_nodes += batch.len() as u64;
        Ok(())
    }

    /// A hiprio slot free now (after reclaiming), with a descriptor for it.
    fn free_hiprio_slot(&mut self) -> FsResult<Option<usize>> {
        self.reclaim_hiprio()?;
        if usize::from(self.bus.free_descriptors(HIPRIO_QUEUE)?)
            < self.bus.descriptors_for(HIPRIO_QUEUE, 1)?
        {
            return Ok(None);
        }
        let slots = self.hiprio_busy.get(..self.hiprio_slots).unwrap_or(&[]);
        Ok(slots.iter().position(|busy| !busy))
    }

    fn free_hiprio<W: Waiter<B>>(&mut self, w: &mut W) -> FsResult<usize> {
        for _ in 0..self.options.max_waits {
            if let Some(i) = self.free_hiprio_slot()? {
                return Ok(i);
            }
            self.bus.kick(HIPRIO_QUEUE)?;
            w.wait(self)?;
        }
        Err(FsError::Timeout)
    }

    // ---- blocking operations ----

    /// Submits `req` (waiting for a free slot), waits for its reply and takes it.
    pub fn call<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        req: &Request<'_>,
        out: &mut [u8],
    ) -> FsResult<Reply> {
        let t = self.submit_waiting(w, req)?;
        self.kick()?;
        if let Err(e) = self.wait_for(w, t) {
            self.abandon(t);
            return Err(e);
        }
        let result = self.take(t, out);
        if self.is_done(t) {
            // `out` was too short for the data: nobody takes it now.
            self.abandon(t);
        }
        result
    }

    fn submit_waiting<W: Waiter<B>>(&mut self, w: &mut W, req: &Request<'_>) -> FsResult<Ticket> {
        for _ in 0..self.options.max_waits {
            match self.submit(req) {
                Err(FsError::QueueFull) => {}
                other => return other,
            }
            self.kick()?;
            if self.poll()? == 0 {
                w.wait(self)?;
            }
        }
        Err(FsError::Timeout)
    }

    /// Waits until `t` completed (polling after every wait; bounded by `max_waits`).
    pub fn wait_for<W: Waiter<B>>(&mut self, w: &mut W, t: Ticket) -> FsResult<()> {
        if self.slot(t).is_none_or(|s| s.unique != t.unique) {
            return Err(FsError::UnknownTicket);
        }
        for _ in 0..self.options.max_waits {
            self.poll()?;
            if self.is_done(t) {
                return Ok(());
            }
            w.wait(self)?;
        }
        // What the last wait brought counts too.
        self.poll()?;
        if self.is_done(t) {
            return Ok(());
        }
        Err(FsError::Timeout)
    }

    /// FUSE_INIT: offers protocol 7.31 and [`OFFERED_INIT_FLAGS`], and settles what the
    /// device answers. Must come first; may be repeated after [`FsDriver::destroy`].
    pub fn init<W: Waiter<B>>(&mut self, w: &mut W) -> FsResult<InitInfo> {
        // A new session: nothing of an earlier one is owed to it.
        self.end_session();
        let Reply::Init(out) = self.call(w, &Request::Init, &mut [])? else {
            return Err(FsError::Protocol {
                what: "INIT answered with another reply",
            });
        };
        let (major, minor) = (out.major.get(), out.minor.get());
        if major != wire::FUSE_KERNEL_VERSION || minor < wire::FUSE_MIN_MINOR_VERSION {
            return Err(FsError::UnsupportedVersion { major, minor });
        }
        let flags = out.flags.get() & OFFERED_INIT_FLAGS;
        let info = InitInfo {
            major,
            minor: minor.min(wire::FUSE_KERNEL_MINOR_VERSION),
            max_readahead: out.max_readahead.get().min(self.options.max_readahead),
            flags,
            max_background: out.max_background.get(),
            congestion_threshold: out.congestion_threshold.get(),
            // Linux clamps a smaller value up to one page; so does this driver.
            max_write: out.max_write.get().max(PAGE),
            time_gran: out.time_gran.get(),
            // Linux `process_init_reply`: at least one page (0 is not "the default").
            max_pages: if flags & init_flags::MAX_PAGES != 0 {
                out.max_pages.get().max(1)
            } else {
                0
            },
        };
        self.init = Some(info);
        self.ended = false;
        log::info!(
            "virtio-fs: FUSE {}.{}, max_write {}, max_pages {}, flags {:#x}; chunks read {} write {}",
            info.major,
            info.minor,
            info.max_write,
            info.max_pages,
            info.flags,
            self.read_chunk(),
            self.write_chunk()
        );
        Ok(info)
    }

    /// LOOKUP `name` in `parent`. A negative entry (node id 0) is `ENOENT`.
    pub fn lookup<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        parent: NodeId,
        name: &[u8],
    ) -> FsResult<Entry> {
        match self.call(w, &Request::Lookup { parent, name }, &mut [])? {
            Reply::Entry(e) => Ok(e),
            _ => Err(unexpected()),
        }
    }

    pub fn getattr<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: Option<FileHandle>,
    ) -> FsResult<AttrReply> {
        match self.call(w, &Request::Getattr { node, fh }, &mut [])? {
            Reply::Attr(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    pub fn setattr<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        set: SetAttr,
    ) -> FsResult<AttrReply> {
        match self.call(w, &Request::Setattr { node, set }, &mut [])? {
            Reply::Attr(a) => Ok(a),
            _ => Err(unexpected()),
        }
    }

    /// OPEN `node`. With O_TRUNC and no ATOMIC_O_TRUNC negotiated the OPEN goes
    /// without it and, for a regular file (a GETATTR before the OPEN tells), a SETATTR
    /// of size 0 follows: what Linux's `handle_truncate` after `fuse_open` sends
    /// (`fuse_do_setattr` with ATTR_OPEN: FATTR_SIZE by node, no FATTR_FH, so that
    /// O_RDONLY|O_TRUNC truncates too and a late SETATTR cannot reach a reused handle;
    /// no FATTR_MTIME, `update_mtime` leaves it to the server's truncate). If the
    /// SETATTR fails, the handle is owed a RELEASE (sent by later polls, never waited
    /// for) and the error returned.
    pub fn open<W: Waiter<B>>(&mut self, w: &mut W, node: NodeId, flags: u32) -> FsResult<Opened> {
        let emulate =
            flags & open_flags::O_TRUNC != 0 && !self.negotiated(init_flags::ATOMIC_O_TRUNC);
        let truncate = emulate && {
            let a = self.getattr(w, node, None)?;
            a.attr.mode & mode::S_IFMT == mode::S_IFREG
        };
        let Reply::Open(opened) = self.call(w, &Request::Open { node, flags }, &mut [])? else {
            return Err(unexpected());
        };
        if truncate {
            let set = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            if let Err(e) = self.setattr(w, node, set) {
                let owed = OwedRelease {
                    node,
                    fh: opened.fh,
                    dir: false,
                };
                if !self.owed.release(owed) {
                    self.stats.lost_references += 1;
                }
                return Err(e);
            }
        }
        Ok(opened)
    }

    pub fn opendir<W: Waiter<B>>(&mut self, w: &mut W, node: NodeId) -> FsResult<Opened> {
        let flags = open_flags::O_RDONLY | open_flags::O_DIRECTORY;
        match self.call(w, &Request::Opendir { node, flags }, &mut [])? {
            Reply::Open(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    pub fn release<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        flags: u32,
    ) -> FsResult<()> {
        self.call(w, &Request::Release { node, fh, flags }, &mut [])
            .map(|_| ())
    }

    pub fn releasedir<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
    ) -> FsResult<()> {
        self.call(w, &Request::Releasedir { node, fh }, &mut [])
            .map(|_| ())
    }

    /// Reads into `buf` from `offset`: split into READs of at most
    /// [`FsDriver::read_chunk`] bytes, up to 32 in flight at once across the request
    /// queues when the device accepted ASYNC_READ, else one at a time in increasing offset
    /// order. Returns the bytes read: fewer than `buf.len()` at end of file (the first
    /// short READ ends the result, whatever later ones returned).
    pub fn read<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        buf: &mut [u8],
    ) -> FsResult<usize> {
        let chunk = self.read_chunk() as usize;
        // Without ASYNC_READ the server may assume one READ per handle pending at a time,
        // in offset order (Linux then waits for each, `fuse_send_readpages`), so the
        // pipeline is one deep.
        let depth = if self.negotiated(init_flags::ASYNC_READ) {
            MAX_PIPELINE
        } else {
            1
        };
        self.pipeline(
            w,
            buf.len(),
            chunk,
            depth,
            |fs, at, len| {
                fs.submit(&Request::Read {
                    node,
                    fh,
                    offset: offset.saturating_add(at as u64),
                    size: len as u32,
                })
            },
            |fs, t, at, len| {
                let out = buf.get_mut(at..at + len).ok_or(FsError::InvalidArgument)?;
                match fs.take(t, out)? {
                    Reply::Data(n) => Ok(n as usize),
                    _ => Err(unexpected()),
                }
            },
        )
    }

    /// Writes `data` at `offset`: split into WRITEs of at most [`FsDriver::write_chunk`]
    /// bytes, up to 32 in flight (no INIT flag restricts WRITEs in flight). Returns the
    /// bytes written (fewer after a short WRITE).
    pub fn write<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> FsResult<usize> {
        let chunk = self.write_chunk() as usize;
        self.pipeline(
            w,
            data.len(),
            chunk,
            MAX_PIPELINE,
            |fs, at, len| {
                let piece = data.get(at..at + len).ok_or(FsError::InvalidArgument)?;
                fs.submit(&Request::Write {
                    node,
                    fh,
                    offset: offset.saturating_add(at as u64),
                    data: piece,
                })
            },
            // A WRITE reply claiming more than its chunk is refused in `poll`.
            |fs, t, _, _| match fs.take(t, &mut [])? {
                Reply::Written(n) => Ok(n as usize),
                _ => Err(unexpected()),
            },
        )
    }

    /// Runs `total` bytes as chunks of at most `chunk`, up to `depth` (at most
    /// [`MAX_PIPELINE`]) in flight, started in increasing order: `start` submits the chunk
    /// at byte `at` of `len` bytes, `finish` takes its result (bytes done). Every
    /// submitted chunk is taken or abandoned before returning.
    fn pipeline<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        total: usize,
        chunk: usize,
        depth: usize,
        mut start: impl FnMut(&mut Self, usize, usize) -> FsResult<Ticket>,
        mut finish: impl FnMut(&mut Self, Ticket, usize, usize) -> FsResult<usize>,
    ) -> FsResult<usize> {
        if chunk == 0 {
            return Err(FsError::InvalidArgument);
        }
        let mut slots: [Option<(Ticket, usize, usize)>; MAX_PIPELINE] = [None; MAX_PIPELINE];
        let inflight = slots
            .get_mut(..depth.clamp(1, MAX_PIPELINE))
            .ok_or(FsError::InvalidArgument)?;
        let mut next = 0usize;
        // The end of the first short chunk, and the first error (by position).
        let mut short_at: Option<usize> = None;
        let mut error: Option<(usize, FsError)> = None;
        let mut waits = 0u32;
        loop {
            let stop = short_at.is_some() || error.is_some();
            for entry in inflight.iter_mut().filter(|e| e.is_none()) {
                if stop || next >= total {
                    break;
                }
                let len = chunk.min(total - next);
                match start(self, next, len) {
                    Ok(t) => {
                        *entry = Some((t, next, len));
                        next += len;
                    }
                    Err(FsError::QueueFull) => break,
                    Err(e) => {
                        error = Some((next, e));
                        break;
                    }
                }
            }
            // Done when nothing of ours is in flight and nothing is left to start (with
            // nothing in flight but work left, the queue was full: wait for room).
            let stop = short_at.is_some() || error.is_some() || next >= total;
            if stop && inflight.iter().all(Option::is_none) {
                break;
            }
            if let Err(e) = self.kick().and_then(|_| self.poll()) {
                self.abandon_all(inflight);
                return Err(e);
            }
            let mut progressed = false;
            for entry in inflight.iter_mut() {
                let Some((t, at, len)) = *entry else { continue };
                if !self.is_done(t) {
                    continue;
                }
                *entry = None;
                progressed = true;
                match finish(self, t, at, len) {
                    Ok(n) if n < len => {
                        short_at = Some(short_at.map_or(at + n, |s| s.min(at + n)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if error.is_none_or(|(first, _)| at < first) {
                            error = Some((at, e));
                        }
                    }
                }
            }
            if !progressed {
                waits += 1;
                if waits > self.options.max_waits {
                    self.abandon_all(inflight);
                    return Err(FsError::Timeout);
                }
                if let Err(e) = w.wait(self) {
                    self.abandon_all(inflight);
                    return Err(e);
                }
            }
        }
        let done = short_at.unwrap_or(next).min(total);
        match error {
            // An error after the end of file does not matter.
            Some((at, e)) if at < done || short_at.is_none() => Err(e),
            _ => Ok(done),
        }
    }

    fn abandon_all(&mut self, inflight: &mut [Option<(Ticket, usize, usize)>]) {
        for entry in inflight.iter_mut() {
            if let Some((t, _, _)) = entry.take() {
                self.abandon(t);
            }
        }
    }

    /// One READDIR (`plus` false) or READDIRPLUS from `offset` into `buf` (at most
    /// [`FsDriver::read_chunk`] bytes of it are used): the validated records and their
    /// count. An empty walker means the end of the directory. Without DO_READDIRPLUS
    /// negotiated `plus` reads with READDIR (records without entries).
    pub fn readdir<'b, W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        plus: bool,
        buf: &'b mut [u8],
    ) -> FsResult<(DirIter<'b>, u32)> {
        let size = (buf.len() as u32).min(self.read_chunk());
        if size < 512 {
            return Err(FsError::InvalidArgument);
        }
        let plus = plus && self.negotiated(init_flags::DO_READDIRPLUS);
        let req = Request::Readdir {
            node,
            fh,
            offset,
            size,
            plus,
        };
        let Reply::Data(n) = self.call(w, &req, buf)? else {
            return Err(unexpected());
        };
        let bytes = buf.get(..n as usize).ok_or(FsError::InvalidArgument)?;
        DirIter::new(bytes, plus)
    }

    /// Reads a whole open directory, calling `f` for every record; returns how many.
    /// With `plus`, every record with an entry holds one lookup reference for the caller.
    /// A reply whose last record continues at the offset it was asked from (the next
    /// read would return it again), or more than [`MAX_DIR_ENTRIES`] records in all (a
    /// cycle of offsets), is a protocol error; the records before it were handed out, and
    /// the references of the bounded reply's records after them go back to the device.
    pub fn read_dir<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        plus: bool,
        buf: &mut [u8],
        mut f: impl FnMut(&DirEntry<'_>),
    ) -> FsResult<u64> {
        let mut offset = 0u64;
        let mut count = 0u64;
        // Bounded: every round hands out at least one record, at most MAX_DIR_ENTRIES.
        loop {
            let asked = offset;
            let (records, n) = self.readdir(w, node, fh, offset, plus, buf)?;
            if n == 0 {
                return Ok(count);
            }
            let mut records = records;
            while let Some(e) = records.next() {
                if count == MAX_DIR_ENTRIES {
                    // `e` and the rest of this reply's records were never handed out:
                    // their references go back.
                    for rest in core::iter::once(e).chain(records) {
                        if let Some(entry) = rest.entry
                            && !self.owed.forget(entry.node, 1)
                        {
                            self.stats.lost_references += 1;
                        }
                    }
                    return Err(FsError::Protocol {
                        what: "directory did not end within the driver's bound",
                    });
                }
                offset = e.offset;
                count += 1;
                f(&e);
            }
            if offset == asked {
                return Err(FsError::Protocol {
                    what: "directory reply continues at the offset it was read from",
                });
            }
        }
    }

    /// CREATE and open `name` in `parent`: the new entry (one lookup reference) and handle.
    pub fn create<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        parent: NodeId,
        name: &[u8],
        flags: u32,
        mode: u32,
    ) -> FsResult<(Entry, Opened)> {
        let req = Request::Create {
            parent,
            name,
            flags,
            mode,
            umask: 0,
        };
        match self.call(w, &req, &mut [])? {
            Reply::Created(e, o) => Ok((e, o)),
            _ => Err(unexpected()),
        }
    }

    pub fn mkdir<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        parent: NodeId,
        name: &[u8],
        mode: u32,
    ) -> FsResult<Entry> {
        let req = Request::Mkdir {
            parent,
            name,
            mode,
            umask: 0,
        };
        match self.call(w, &req, &mut [])? {
            Reply::Entry(e) => Ok(e),
            _ => Err(unexpected()),
        }
    }

    pub fn unlink<W: Waiter<B>>(&mut self, w: &mut W, parent: NodeId, name: &[u8]) -> FsResult<()> {
        self.call(w, &Request::Unlink { parent, name }, &mut [])
            .map(|_| ())
    }

    pub fn rmdir<W: Waiter<B>>(&mut self, w: &mut W, parent: NodeId, name: &[u8]) -> FsResult<()> {
        self.call(w, &Request::Rmdir { parent, name }, &mut [])
            .map(|_| ())
    }

    /// RENAME2 (`flags`: [`rename_flags`]).
    pub fn rename<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        old_parent: NodeId,
        old_name: &[u8],
        new_parent: NodeId,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let req = Request::Rename {
            old_parent,
            old_name,
            new_parent,
            new_name,
            flags,
        };
        self.call(w, &req, &mut []).map(|_| ())
    }

    /// LINK: a new name for `node`; the entry holds one more lookup reference.
    pub fn link<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        new_parent: NodeId,
        new_name: &[u8],
    ) -> FsResult<Entry> {
        let req = Request::Link {
            node,
            new_parent,
            new_name,
        };
        match self.call(w, &req, &mut [])? {
            Reply::Entry(e) => Ok(e),
            _ => Err(unexpected()),
        }
    }

    pub fn symlink<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        parent: NodeId,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Entry> {
        let req = Request::Symlink {
            parent,
            name,
            target,
        };
        match self.call(w, &req, &mut [])? {
            Reply::Entry(e) => Ok(e),
            _ => Err(unexpected()),
        }
    }

    /// READLINK into `buf` (which must hold the target: `InvalidArgument` otherwise);
    /// returns its length.
    pub fn readlink<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        buf: &mut [u8],
    ) -> FsResult<usize> {
        match self.call(w, &Request::Readlink { node }, buf)? {
            Reply::Data(n) => Ok(n as usize),
            _ => Err(unexpected()),
        }
    }

    pub fn statfs<W: Waiter<B>>(&mut self, w: &mut W, node: NodeId) -> FsResult<Statfs> {
        match self.call(w, &Request::Statfs { node }, &mut [])? {
            Reply::Statfs(s) => Ok(s),
            _ => Err(unexpected()),
        }
    }

    pub fn fsync<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        datasync: bool,
    ) -> FsResult<()> {
        self.call(w, &Request::Fsync { node, fh, datasync }, &mut [])
            .map(|_| ())
    }

    pub fn fsyncdir<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        datasync: bool,
    ) -> FsResult<()> {
        self.call(w, &Request::Fsyncdir { node, fh, datasync }, &mut [])
            .map(|_| ())
    }

    pub fn flush<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        lock_owner: u64,
    ) -> FsResult<()> {
        self.call(
            w,
            &Request::Flush {
                node,
                fh,
                lock_owner,
            },
            &mut [],
        )
        .map(|_| ())
    }

    /// SETXATTR `name` = `value` (`flags`: `XATTR_CREATE` 1, `XATTR_REPLACE` 2).
    pub fn setxattr<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let req = Request::Setxattr {
            node,
            name,
            value,
            flags,
        };
        self.call(w, &req, &mut []).map(|_| ())
    }

    /// GETXATTR into `buf` (an empty `buf` asks for the size only); returns the size.
    pub fn getxattr<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        name: &[u8],
        buf: &mut [u8],
    ) -> FsResult<usize> {
        let size = u32::try_from(buf.len()).map_err(|_| FsError::InvalidArgument)?;
        match self.call(w, &Request::Getxattr { node, name, size }, buf)? {
            Reply::Data(n) | Reply::XattrSize(n) => Ok(n as usize),
            _ => Err(unexpected()),
        }
    }

    /// LISTXATTR into `buf` (empty: the size only); returns the size. The names (each
    /// NUL-terminated) are checked: [`xattr_names`] walks them.
    pub fn listxattr<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        buf: &mut [u8],
    ) -> FsResult<usize> {
        let size = u32::try_from(buf.len()).map_err(|_| FsError::InvalidArgument)?;
        match self.call(w, &Request::Listxattr { node, size }, buf)? {
            Reply::XattrSize(n) => Ok(n as usize),
            Reply::Data(n) => {
                let list = buf.get(..n as usize).ok_or(FsError::InvalidArgument)?;
                let _validated = xattr_names(list)?;
                Ok(n as usize)
            }
            _ => Err(unexpected()),
        }
    }

    pub fn removexattr<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        name: &[u8],
    ) -> FsResult<()> {
        self.call(w, &Request::Removexattr { node, name }, &mut [])
            .map(|_| ())
    }

    /// LSEEK: the offset the device computed.
    pub fn lseek<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        whence: u32,
    ) -> FsResult<u64> {
        let req = Request::Lseek {
            node,
            fh,
            offset,
            whence,
        };
        match self.call(w, &req, &mut [])? {
            Reply::Offset(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    pub fn fallocate<W: Waiter<B>>(
        &mut self,
        w: &mut W,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> FsResult<()> {
        let req = Request::Fallocate {
            node,
            fh,
            offset,
            length,
            mode,
        };
        self.call(w, &req, &mut []).map(|_| ())
    }

    /// DESTROY: ends the FUSE session (the device drops every node). INIT may follow.
    ///
    /// Once DESTROY is on the queue the session is over for the driver, whatever the
    /// reply: nothing owed is paid any more, and replies to the session's requests
    /// still in flight owe nothing (the device drops every node and handle at DESTROY;
    /// FORGETs and RELEASEs sent after it would name another session's nodes).
    pub fn destroy<W: Waiter<B>>(&mut self, w: &mut W) -> FsResult<()> {
        let t = self.submit_waiting(w, &Request::Destroy)?;
        self.end_session();
        if let Err(e) = self.kick().and_then(|_| self.wait_for(w, t)) {
            self.abandon(t);
            return Err(e);
        }
        self.take(t, &mut [])?;
        self.init = None;
        Ok(())
    }

    /// Ends the driver's side of the FUSE session: a new session number (slots of the
    /// old one owe nothing), nothing owed, nothing paid until INIT succeeds.
    fn end_session(&mut self) {
        self.session = self.session.wrapping_add(1);
        self.ended = true;
        self.owed.clear();
    }
}

impl<B: Bus> Drop for FsDriver<B> {
    /// Resets the device and frees its memory unless `shutdown` already did: also on
    /// every error path of `new` after the queues were set up.
    fn drop(&mut self) {
        if !self.shut_down {
            self.shutdown();
        }
    }
}

/// The names of a LISTXATTR reply: each non-empty and NUL-terminated, the last one too.
pub fn xattr_names(list: &[u8]) -> FsResult<impl Iterator<Item = &[u8]>> {
    if list.last().is_some_and(|&b| b != 0)
        || list.windows(2).any(|w| w == [0, 0])
        || list.first() == Some(&0)
    {
        return Err(FsError::Protocol {
            what: "xattr list not a sequence of NUL-terminated names",
        });
    }
    Ok(list.split(|&b| b == 0).filter(|n| !n.is_empty()))
}

fn xattr_in(size: u32) -> GetxattrIn {
    GetxattrIn {
        size: U32::new(size),
        padding: U32::new(0),
    }
}

fn unexpected() -> FsError {
    FsError::Protocol {
        what: "reply of another kind than the request's",
    }
}

fn with_type(m: u32, typ: u32) -> u32 {
    if m & mode::S_IFMT == 0 { m | typ } else { m }
}

fn read_in(fh: FileHandle, offset: u64, size: u32) -> ReadIn {
    ReadIn {
        fh: U64::new(fh.0),
        offset: U64::new(offset),
        size: U32::new(size),
        ..Default::default()
    }
}

fn release_in(fh: FileHandle, flags: u32) -> ReleaseIn {
    ReleaseIn {
        fh: U64::new(fh.0),
        flags: U32::new(flags),
        release_flags: U32::new(0),
        lock_owner: U64::new(0),
    }
}

fn setattr_in(set: &SetAttr) -> SetattrIn {
    let mut s = SetattrIn::default();
    let mut valid = 0;
    if let Some(m) = set.mode {
        valid |= fattr::MODE;
        s.mode = U32::new(m & 0o7777);
    }
    if let Some(uid) = set.uid {
        valid |= fattr::UID;
        s.uid = U32::new(uid);
    }
    if let Some(gid) = set.gid {
        valid |= fattr::GID;
        s.gid = U32::new(gid);
    }
    if let Some(size) = set.size {
        valid |= fattr::SIZE;
        s.size = U64::new(size);
    }
    match set.atime {
        Some(SetTime::Now) => valid |= fattr::ATIME | fattr::ATIME_NOW,
        Some(SetTime::At(t)) => {
            valid |= fattr::ATIME;
            s.atime = U64::new(t.secs);
            s.atimensec = U32::new(t.nanos);
        }
        None => {}
    }
    match set.mtime {
        Some(SetTime::Now) => valid |= fattr::MTIME | fattr::MTIME_NOW,
        Some(SetTime::At(t)) => {
            valid |= fattr::MTIME;
            s.mtime = U64::new(t.secs);
            s.mtimensec = U32::new(t.nanos);
        }
        None => {}
    }
    if let Some(fh) = set.fh {
        valid |= fattr::FH;
        s.fh = U64::new(fh.0);
    }
    s.valid = U32::new(valid);
    s
}

/// Reads an `N`-byte prefix at `offset` of `region` (copied once, `read_into`).
fn read_wire<T: FromBytes, const N: usize>(region: &DmaRegion, offset: usize) -> Option<T> {
    let mut buf = [0u8; N];
    if !region.read_into(offset, &mut buf) {
        return None;
    }
    T::read_from_prefix(&buf).ok().map(|(v, _)| v)
}

/// Validates and decodes the reply of `slot`, whose chain the device returned with
/// `used_len` bytes written (already checked by the bus against the chain's capacity).
/// `handed` receives the node reference and open handle the reply handed out once its
/// header and length were right, whether or not its contents pass.
fn decode_reply(
    region: &DmaRegion,
    reply_at: usize,
    slot: &Slot,
    used_len: u32,
    handed: &mut Handed,
) -> FsResult<Reply> {
    const HEADER: usize = size_of::<OutHeader>();
    let protocol = |what| Err(FsError::Protocol { what });
    if used_len == 0 && slot.shape == Shape::EmptyOrNone {
        return Ok(Reply::Empty);
    }
    if (used_len as usize) < HEADER {
        return protocol("reply shorter than its header");
    }
    let Some(header) = read_wire::<OutHeader, HEADER>(region, reply_at) else {
        return Err(FsError::Virtio(Error::InvalidState));
    };
    if header.unique.get() != slot.unique {
        return protocol("reply unique is not the request's");
    }
    if header.len.get() != used_len {
        return protocol("reply length disagrees with the bytes the device wrote");
    }
    let error = header.error.get();
    if error != 0 {
        // Linux `fuse_dev_do_write` refuses `error > 0 || error <= -512`.
        if error > 0 || error.unsigned_abs() > Errno::MAX {
            return protocol("reply error is not a negative errno above -512");
        }
        if used_len as usize != HEADER {
            return protocol("error reply carries a payload");
        }
        return Err(FsError::Errno(Errno(error.unsigned_abs())));
    }
    let payload = used_len as usize - HEADER;
    let at = reply_at + HEADER;
    match slot.shape {
        Shape::Empty | Shape::EmptyOrNone if payload == 0 => Ok(Reply::Empty),
        Shape::Empty | Shape::EmptyOrNone => protocol("payload in a reply that has none"),
        Shape::Data(max) if payload <= max as usize => Ok(Reply::Data(payload as u32)),
        Shape::Data(_) => protocol("data reply longer than the request allows"),
        Shape::Init => {
            if !(wire::INIT_OUT_COMPAT_22_SIZE..=size_of::<InitOut>()).contains(&payload) {
                return protocol("INIT reply length outside 24..=64");
            }
            // Shorter (older) layouts: the rest stays zero.
            let mut buf = [0u8; size_of::<InitOut>()];
            let part = buf.get_mut(..payload).ok_or(Error::InvalidState)?;
            if !region.read_into(at, part) {
                return Err(FsError::Virtio(Error::InvalidState));
            }
            InitOut::read_from_bytes(&buf)
                .map(Reply::Init)
                .map_err(|_| FsError::Virtio(Error::InvalidState))
        }
        Shape::Fixed(n) if payload != n as usize => protocol(WRONG_LENGTH),
        Shape::Fixed(_) => decode_fixed(region, at, slot, handed),
        Shape::Entry(rule) if payload != rule.payload_len() => protocol(WRONG_LENGTH),
        Shape::Entry(rule) => decode_entry(region, at, rule, handed),
        Shape::Written(_) if payload != size_of::<WriteOut>() => protocol(WRONG_LENGTH),
        Shape::Written(sent) => {
            let o = read_wire::<WriteOut, { size_of::<WriteOut>() }>(region, at).ok_or(missing())?;
            if o.size.get() > sent {
                return protocol("WRITE reply claims more bytes than were sent");
            }
            Ok(Reply::Written(o.size.get()))
        }
    }
}

const WRONG_LENGTH: &str = "reply length differs from the request's reply structure";

fn missing() -> FsError {
    FsError::Virtio(Error::InvalidState)
}

/// An entry reply (LOOKUP, MKDIR, SYMLINK, LINK, CREATE) held to `rule`. Once read, its
/// node (neither 0 nor the root) and CREATE's handle are `handed` out.
fn decode_entry(
    region: &DmaRegion,
    at: usize,
    rule: EntryRule,
    handed: &mut Handed,
) -> FsResult<Reply> {
    let e = read_wire::<EntryOut, ENTRY_LEN>(region, at).ok_or(missing())?;
    let node = e.nodeid.get();
    if node != 0 && node != wire::FUSE_ROOT_ID {
        handed.node = Some(NodeId(node));
    }
    let opened = if rule.open {
        let o = read_wire::<OpenOut, OPEN_LEN>(region, at + ENTRY_LEN).ok_or(missing())?;
        let opened = Opened::decode(&o);
        handed.release = Some(OwedRelease {
            node: NodeId(node),
            fh: opened.fh,
            dir: false,
        });
        Some(opened)
    } else {
        None
    };
    if node == 0 && !rule.new_name {
        // A negative entry: "no such name", cacheable for entry_valid.
        return Err(FsError::Errno(Errno::ENOENT));
    }
    if rule.new_name && node == wire::FUSE_ROOT_ID {
        return Err(FsError::Protocol {
            what: "a created entry names the root node",
        });
    }
    let entry = Entry::decode(&e)?;
    if rule.file_type != 0 && entry.attr.mode & mode::S_IFMT != rule.file_type {
        return Err(FsError::Protocol {
            what: "a created entry of another file type than the request made",
        });
    }
    Ok(match opened {
        Some(o) => Reply::Created(entry, o),
        None => Reply::Entry(entry),
    })
}

const ENTRY_LEN: usize = size_of::<EntryOut>();
const OPEN_LEN: usize = size_of::<OpenOut>();

fn decode_fixed(
    region: &DmaRegion,
    at: usize,
    slot: &Slot,
    handed: &mut Handed,
) -> FsResult<Reply> {
    let missing = || FsError::Virtio(Error::InvalidState);
    match slot.opcode {
        opcode::GETATTR | opcode::SETATTR => {
            let a =
                read_wire::<AttrOut, { size_of::<AttrOut>() }>(region, at).ok_or_else(missing)?;
            AttrReply::decode(&a).map(Reply::Attr)
        }
        opcode::OPEN | opcode::OPENDIR => {
            let o = read_wire::<OpenOut, OPEN_LEN>(region, at).ok_or_else(missing)?;
            let opened = Opened::decode(&o);
            handed.release = Some(OwedRelease {
                node: NodeId(slot.node),
                fh: opened.fh,
                dir: slot.opcode == opcode::OPENDIR,
            });
            Ok(Reply::Open(opened))
        }
        opcode::GETXATTR | opcode::LISTXATTR => {
            let o = read_wire::<GetxattrOut, { size_of::<GetxattrOut>() }>(region, at)
                .ok_or_else(missing)?;
            // Linux `fuse_getxattr` / `fuse_listxattr` clamp the size to XATTR_SIZE_MAX
            // / XATTR_LIST_MAX: more can never be read (a data reply longer than asked
            // is refused).
            Ok(Reply::XattrSize(o.size.get().min(XATTR_SIZE_MAX)))
        }
        opcode::LSEEK => {
            let o =
                read_wire::<LseekOut, { size_of::<LseekOut>() }>(region, at).ok_or_else(missing)?;
            if o.offset.get() > i64::MAX as u64 {
                return Err(FsError::Protocol {
                    what: "LSEEK offset beyond the largest file offset",
                });
            }
            Ok(Reply::Offset(o.offset.get()))
        }
        opcode::STATFS => {
            let s = read_wire::<StatfsOut, { size_of::<StatfsOut>() }>(region, at)
                .ok_or_else(missing)?;
            Statfs::decode(&s).map(Reply::Statfs)
        }
        _ => Err(FsError::Virtio(Error::InvalidState)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A READDIRPLUS reply that cannot be read back (the region is shorter than the
    /// length claimed) owes nothing it cannot see, but counts one lost reference.
    #[test]
    fn an_unreadable_readdirplus_reply_counts_a_lost_reference() {
        let mut backing = [0u64; 4];
        let Some(vaddr) = core::ptr::NonNull::new(backing.as_mut_ptr().cast::<u8>()) else {
            panic!("null");
        };
        let region = DmaRegion {
            vaddr,
            daddr: 0,
            len: 32,
        };
        let mut owed = Owed {
            forgets: Vec::with_capacity(4),
            releases: Vec::new(),
        };
        assert_eq!(owed.dirplus_in(&region, 0, 0), 0, "an empty reply");
        assert_eq!(owed.dirplus_in(&region, 0, 4096), 1);
        assert!(owed.forgets.is_empty());
    }

    /// SETATTR's times: a fixed time sets FATTR_ATIME/FATTR_MTIME with its seconds and
    /// nanoseconds; `Now` sets the flag with its `*_NOW` companion and leaves the fields 0;
    /// `None` sets nothing.
    #[test]
    fn setattr_times_encode() {
        let at = |secs, nanos| Some(SetTime::At(Timespec { secs, nanos }));
        let s = setattr_in(&SetAttr {
            atime: at(1_500_000_000, 250_000_000),
            mtime: at(1_234_567_890, 123_456_789),
            ..SetAttr::default()
        });
        assert_eq!(s.valid.get(), fattr::ATIME | fattr::MTIME);
        assert_eq!(
            (s.atime.get(), s.atimensec.get()),
            (1_500_000_000, 250_000_000)
        );
        assert_eq!(
            (s.mtime.get(), s.mtimensec.get()),
            (1_234_567_890, 123_456_789)
        );
        assert_eq!((s.ctime.get(), s.ctimensec.get()), (0, 0));

        let s = setattr_in(&SetAttr {
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::Now),
            ..SetAttr::default()
        });
        assert_eq!(
            s.valid.get(),
            fattr::ATIME | fattr::ATIME_NOW | fattr::MTIME | fattr::MTIME_NOW
        );
        assert_eq!((s.atime.get(), s.atimensec.get()), (0, 0));
        assert_eq!((s.mtime.get(), s.mtimensec.get()), (0, 0));

        // One of each, beside size and mode.
        let s = setattr_in(&SetAttr {
            size: Some(7),
            mode: Some(0o100_640),
            atime: Some(SetTime::Now),
            mtime: at(42, 1),
            ..SetAttr::default()
        });
        assert_eq!(
            s.valid.get(),
            fattr::SIZE | fattr::MODE | fattr::ATIME | fattr::ATIME_NOW | fattr::MTIME
        );
        assert_eq!((s.mode.get(), s.size.get()), (0o640, 7));
        assert_eq!((s.mtime.get(), s.mtimensec.get()), (42, 1));
        assert_eq!(s.atime.get(), 0);

        assert_eq!(setattr_in(&SetAttr::default()).valid.get(), 0);
    }
}
