//! `virtio-fs`: the virtio file system device driver (virtio 1.2 §5.11), generic over the
//! [`virtio_core::Bus`] and blind to the transport. It speaks FUSE (protocol 7.31) to the
//! device — in practice a host daemon such as virtiofsd behind QEMU's vhost-user-fs.
//!
//! # Design
//!
//! - **Setup** ([`FsDriver::new`]): VERSION_1 is required (the device has no legacy
//!   interface), NOTIFICATION is negotiated when offered ([`features`]); the
//!   configuration's `tag` must be non-empty NUL-padded UTF-8, `num_request_queues`
//!   non-zero and, with NOTIFICATION, `notify_buf_size` 16..=64 KiB. Queue 0 is `hiprio`
//!   (FORGET / BATCH_FORGET, no replies; it interrupts when the request queues do, so a
//!   `forget` waiting for a free hiprio buffer is woken by the completion that frees one;
//!   every poll reclaims its buffers); with NOTIFICATION queue 1 is the notification
//!   queue and the request queues are 2.., without it 1.. (§5.11.2). Every byte the I/O
//!   path touches is allocated here: per request queue a slab of slots, each with a
//!   request area (header, arguments, names), a reply area (header and the fixed reply)
//!   and a data buffer of `data_size` bytes (READ/READDIR land in it, WRITE data is copied
//!   into it). Nothing allocates after `new`.
//! - **FUSE_INIT** ([`FsDriver::init`]) offers 7.31 and the flags of
//!   [`driver::OFFERED_INIT_FLAGS`] (each implemented), accepts a device of major 7 and
//!   minor ≥ 27, and settles `max_write` (at least a page, as Linux clamps it) and, with
//!   MAX_PAGES, `max_pages` (at least 1, as Linux takes it): READ and WRITE chunks are the
//!   slot buffer within those. Only flags the device accepted are used: READDIRPLUS
//!   needs DO_READDIRPLUS (else `readdir` reads with READDIR), O_TRUNC goes with OPEN
//!   only with ATOMIC_O_TRUNC (else `open` truncates with SETATTR), several READs in
//!   flight need ASYNC_READ (else `read` sends one at a time, in offset order).
//! - **Requests** ([`FsDriver::submit`], [`Request`]) are typed; the wire structures are
//!   all in [`wire`]. A request takes a free slot on the least busy request queue and a
//!   `unique` from a 64-bit counter; its chain is `[request (+ write data)]` readable and
//!   `[reply header (+ fixed reply)] [+ data buffer]` writable, so at most four
//!   descriptors. Several requests are in flight per queue; each completes once, by its
//!   slot (the bus token) and its `unique`, in whatever order the device returns them.
//!   [`FsDriver::poll`] validates and decodes replies into their slots;
//!   [`FsDriver::take`] hands a result out (copying data; a buffer too short leaves it
//!   there) and frees the slot.
//! - **References nobody holds** ([`FsDriver::abandon`]): a request given up (an
//!   interrupted wait) may still complete; what its reply hands out (a lookup reference,
//!   an open handle, READDIRPLUS entries) — and what a refused reply handed out — the
//!   driver owes the device and [`FsDriver::poll`] sends back (FORGET/BATCH_FORGET,
//!   RELEASE/RELEASEDIR) from bounded lists allocated at setup. hiprio uses at most as
//!   many slots as its queue has entries; `forget` never leaves nodes to the caller.
//! - **Operations**: INIT, LOOKUP, FORGET/BATCH_FORGET, GETATTR, SETATTR, OPEN, OPENDIR,
//!   READ, WRITE, RELEASE, RELEASEDIR, READDIR, READDIRPLUS, CREATE, MKDIR, UNLINK, RMDIR,
//!   RENAME2, LINK, SYMLINK, READLINK, STATFS, FSYNC, FSYNCDIR, FLUSH, SETXATTR, GETXATTR,
//!   LISTXATTR, REMOVEXATTR, LSEEK, FALLOCATE, DESTROY. Not yet: MKNOD, ACCESS, locks,
//!   DAX windows.
//! - **Notifications** (NOTIFICATION, §5.11.6.3; INVAL_INODE, INVAL_ENTRY and DELETE —
//!   POLL and LOCK answer requests never sent, so they are protocol errors):
//!   `notify_buffers` buffers (each at least `notify_buf_size`) are allocated at setup
//!   and kept posted. [`FsDriver::poll`]
//!   collects returned ones — at most the buffer count per call, and only while there is
//!   room for their results — validates each (out header length equal to the used
//!   length, `unique` 0, a known code in `error`, the payload exactly the code's
//!   structure plus a 1..=255-byte NUL-terminated name without `/` where it has one,
//!   node ids non-zero), queues the [`Notification`] or the protocol error in arrival
//!   order for [`FsDriver::take_notification`], and posts the buffer again.
//! - **Blocking operations** (`lookup`, `read`, `write`, `read_dir`, `create`, ...) wait
//!   through a caller's [`Waiter`] (interrupts in the guest, a simulated device in
//!   tests), bounded by `max_waits`. `read`/`write` split the caller's buffer into chunks
//!   and keep up to 32 in flight (`read` only with ASYNC_READ, else one); the first short
//!   chunk ends the result.
//! - **Errors are values** ([`FsError`]): a negative errno is [`FsError::Errno`] with a
//!   typed [`Errno`]; anything the device gets wrong is [`FsError::Protocol`].
//! - **The device is hostile.** A reply whose `unique` is not its request's, whose header
//!   length disagrees with the bytes the device reported, whose payload is longer or
//!   shorter than the request's reply structure, whose `error` is not 0 or -1..=-511 (or
//!   carries a payload; Linux refuses -512 and below), attributes with no file type, a
//!   size beyond `i64::MAX` or nanoseconds ≥ 10⁹, a created entry with node id 0 or the
//!   root's or of another type than made (MKDIR a directory, SYMLINK a link, CREATE a
//!   regular file), a WRITE count above the bytes sent, an xattr size above 65536,
//!   statfs free counts above the totals, directory records that are short, unpadded or
//!   with non-zero padding, with names of length 0, above 1024, or holding `/` or NUL,
//!   with continuation offset 0, or (READDIRPLUS) naming the root other than as `.` or
//!   `..`, and a `read_dir` reply that does not advance — each is a protocol error for that
//!   request, never a panic. The bus rejects forged or repeated used ids and lengths
//!   beyond a chain's capacity. Every loop the device feeds is bounded (by slot counts,
//!   reply lengths, or `max_waits` / a fixed round bound).
//!
//! Logging goes through `log`: setup facts at info, protocol violations at error.
#![no_std]
// The device is untrusted: no panicking construct may be reachable from device values.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

extern crate alloc;

pub mod driver;
pub mod error;
pub mod features;
pub mod notify;
pub mod reply;
pub mod wire;

pub use driver::{
    FsConfig, FsDriver, FsInterrupt, FsOptions, FsStats, Reply, Request, SetAttr, SetTime, Ticket,
    Waiter, open_flags, rename_flags, xattr_names,
};
pub use error::{Errno, FsError, FsResult};
pub use notify::{Notification, NotifyName};
pub use reply::{
    Attr, AttrReply, DirEntry, DirIter, Entry, FileHandle, FileType, InitInfo, NodeId, Opened,
    Statfs, Timespec,
};
