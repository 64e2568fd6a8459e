//! Wire formats: the virtio-fs device configuration (virtio 1.2 §5.11.4) and the FUSE
//! messages carried over its queues (§5.11.6: "the driver and device exchange FUSE
//! requests and replies"), as of FUSE protocol 7.31.
//!
//! Every structure here is written from the FUSE protocol description (the kernel's
//! `fuse.h` text): one place for the layout, each a `#[repr(C)]` zerocopy struct of
//! little-endian integers (virtio-fs is a virtio 1.x-only device, so its FUSE messages are
//! little-endian, §5.11.6.1). The `layouts_match_the_protocol` test pins every size.

use zerocopy::little_endian::{I32, I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The FUSE major version this driver speaks.
pub const FUSE_KERNEL_VERSION: u32 = 7;
/// The highest minor version this driver implements (its structures are 7.31's).
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 31;
/// The lowest minor this driver accepts from a device: 7.27 is where virtio-fs daemons
/// start (every reply layout used here is final by then).
pub const FUSE_MIN_MINOR_VERSION: u32 = 27;
/// The root directory's node id (`FUSE_ROOT_ID`).
pub const FUSE_ROOT_ID: u64 = 1;
/// Size of an INIT reply from a daemon of minor < 23 (`FUSE_COMPAT_22_INIT_OUT_SIZE`).
pub const INIT_OUT_COMPAT_22_SIZE: usize = 24;

/// Byte offsets and sizes of `struct virtio_fs_config` (§5.11.4).
pub mod cfg {
    /// `u8 tag[36]`: the file system name, UTF-8, NUL-padded (not NUL-terminated when it
    /// uses all 36 bytes).
    pub const TAG: u32 = 0;
    pub const TAG_LEN: usize = 36;
    /// `le32 num_request_queues`.
    pub const NUM_REQUEST_QUEUES: u32 = 36;
    /// `le32 notify_buf_size` (only with VIRTIO_FS_F_NOTIFICATION).
    pub const NOTIFY_BUF_SIZE: u32 = 40;
}

/// Queue indices (§5.11.2): 0 is `hiprio`; with VIRTIO_FS_F_NOTIFICATION, 1 is the
/// notification queue; the request queues follow.
pub const HIPRIO_QUEUE: u16 = 0;

/// FUSE opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
}

/// INIT flags (`FUSE_*` capability bits of `fuse_init_in/out.flags`).
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const NO_OPEN_SUPPORT: u32 = 1 << 17;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const HANDLE_KILLPRIV: u32 = 1 << 19;
    pub const POSIX_ACL: u32 = 1 << 20;
    pub const ABORT_ERROR: u32 = 1 << 21;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u32 = 1 << 24;
    pub const EXPLICIT_INVAL_DATA: u32 = 1 << 25;
    pub const MAP_ALIGNMENT: u32 = 1 << 26;
}

/// `fuse_setattr_in.valid` bits (`FATTR_*`).
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
}

/// `fuse_fsync_in.fsync_flags`: sync data only (fdatasync).
pub const FSYNC_FDATASYNC: u32 = 1;
/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1;

/// File type bits of `mode` (`S_IFMT` and the types, POSIX values as Linux uses them).
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
}

/// `struct fuse_in_header`: starts every request (device-readable).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct InHeader {
    /// Length of the whole request (header + arguments).
    pub len: U32,
    pub opcode: U32,
    /// Request id, echoed by the reply; never 0 (0 marks notifications).
    pub unique: U64,
    pub nodeid: U64,
    pub uid: U32,
    pub gid: U32,
    pub pid: U32,
    /// 7.36+: length of extensions after the arguments (0 here).
    pub total_extlen: U16,
    pub padding: U16,
}

/// `struct fuse_out_header`: starts every reply (device-writable).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct OutHeader {
    /// Length of the whole reply (header + payload).
    pub len: U32,
    /// 0, or a negative errno.
    pub error: I32,
    pub unique: U64,
}

/// `struct fuse_init_in` as of 7.31 (16 bytes; 7.36 appends `flags2` and padding, sent
/// only with FUSE_INIT_EXT, which this driver does not offer).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct InitIn {
    pub major: U32,
    pub minor: U32,
    pub max_readahead: U32,
    pub flags: U32,
}

/// `struct fuse_init_out` as of 7.31 (64 bytes; 24 from daemons of minor < 23).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct InitOut {
    pub major: U32,
    pub minor: U32,
    pub max_readahead: U32,
    pub flags: U32,
    pub max_background: U16,
    pub congestion_threshold: U16,
    pub max_write: U32,
    pub time_gran: U32,
    pub max_pages: U16,
    pub map_alignment: U16,
    pub flags2: U32,
    pub unused: [U32; 7],
}

/// `struct fuse_attr` (88 bytes).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct AttrWire {
    pub ino: U64,
    pub size: U64,
    pub blocks: U64,
    pub atime: U64,
    pub mtime: U64,
    pub ctime: U64,
    pub atimensec: U32,
    pub mtimensec: U32,
    pub ctimensec: U32,
    pub mode: U32,
    pub nlink: U32,
    pub uid: U32,
    pub gid: U32,
    pub rdev: U32,
    pub blksize: U32,
    pub flags: U32,
}

/// `struct fuse_entry_out` (128 bytes): LOOKUP, MKNOD, MKDIR, SYMLINK, LINK, CREATE.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct EntryOut {
    /// 0 in a LOOKUP reply: a negative entry ("does not exist", cacheable).
    pub nodeid: U64,
    pub generation: U64,
    pub entry_valid: U64,
    pub attr_valid: U64,
    pub entry_valid_nsec: U32,
    pub attr_valid_nsec: U32,
    pub attr: AttrWire,
}

/// `struct fuse_forget_in`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ForgetIn {
    pub nlookup: U64,
}

/// `struct fuse_forget_one`: one element of BATCH_FORGET.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ForgetOne {
    pub nodeid: U64,
    pub nlookup: U64,
}

/// `struct fuse_batch_forget_in`, followed by `count` [`ForgetOne`].
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct BatchForgetIn {
    pub count: U32,
    pub dummy: U32,
}

/// `struct fuse_getattr_in`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GetattrIn {
    pub getattr_flags: U32,
    pub dummy: U32,
    pub fh: U64,
}

/// `struct fuse_attr_out` (104 bytes): GETATTR, SETATTR.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct AttrOut {
    pub attr_valid: U64,
    pub attr_valid_nsec: U32,
    pub dummy: U32,
    pub attr: AttrWire,
}

/// `struct fuse_setattr_in` (88 bytes).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SetattrIn {
    pub valid: U32,
    pub padding: U32,
    pub fh: U64,
    pub size: U64,
    pub lock_owner: U64,
    pub atime: U64,
    pub mtime: U64,
    pub ctime: U64,
    pub atimensec: U32,
    pub mtimensec: U32,
    pub ctimensec: U32,
    pub mode: U32,
    pub unused4: U32,
    pub uid: U32,
    pub gid: U32,
    pub unused5: U32,
}

/// `struct fuse_mknod_in`, followed by the name.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MknodIn {
    pub mode: U32,
    pub rdev: U32,
    pub umask: U32,
    pub padding: U32,
}

/// `struct fuse_mkdir_in`, followed by the name.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MkdirIn {
    pub mode: U32,
    pub umask: U32,
}

/// `struct fuse_rename2_in`, followed by the old and the new name.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Rename2In {
    pub newdir: U64,
    pub flags: U32,
    pub padding: U32,
}

/// `struct fuse_link_in`, followed by the new name.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct LinkIn {
    pub oldnodeid: U64,
}

/// `struct fuse_open_in`: OPEN, OPENDIR.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct OpenIn {
    pub flags: U32,
    pub open_flags: U32,
}

/// `struct fuse_create_in`, followed by the name.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct CreateIn {
    pub flags: U32,
    pub mode: U32,
    pub umask: U32,
    pub open_flags: U32,
}

/// `struct fuse_open_out`: OPEN, OPENDIR, and after the entry in CREATE.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct OpenOut {
    pub fh: U64,
    pub open_flags: U32,
    pub padding: U32,
}

/// `struct fuse_release_in`: RELEASE, RELEASEDIR.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ReleaseIn {
    pub fh: U64,
    pub flags: U32,
    pub release_flags: U32,
    pub lock_owner: U64,
}

/// `struct fuse_flush_in`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct FlushIn {
    pub fh: U64,
    pub unused: U32,
    pub padding: U32,
    pub lock_owner: U64,
}

/// `struct fuse_read_in`: READ, READDIR, READDIRPLUS.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ReadIn {
    pub fh: U64,
    pub offset: U64,
    pub size: U32,
    pub read_flags: U32,
    pub lock_owner: U64,
    pub flags: U32,
    pub padding: U32,
}

/// `struct fuse_write_in`, followed by the data.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct WriteIn {
    pub fh: U64,
    pub offset: U64,
    pub size: U32,
    pub write_flags: U32,
    pub lock_owner: U64,
    pub flags: U32,
    pub padding: U32,
}

/// `struct fuse_write_out`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct WriteOut {
    pub size: U32,
    pub padding: U32,
}

/// `struct fuse_kstatfs` inside `struct fuse_statfs_out` (80 bytes).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct StatfsOut {
    pub blocks: U64,
    pub bfree: U64,
    pub bavail: U64,
    pub files: U64,
    pub ffree: U64,
    pub bsize: U32,
    pub namelen: U32,
    pub frsize: U32,
    pub padding: U32,
    pub spare: [U32; 6],
}

/// `struct fuse_fsync_in`: FSYNC, FSYNCDIR.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct FsyncIn {
    pub fh: U64,
    pub fsync_flags: U32,
    pub padding: U32,
}

/// `struct fuse_setxattr_in` as of 7.31 (8 bytes; 7.33's extended form is sent only with
/// FUSE_SETXATTR_EXT, not offered), followed by the name and the value.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SetxattrIn {
    pub size: U32,
    pub flags: U32,
}

/// `struct fuse_getxattr_in`: GETXATTR (followed by the name) and LISTXATTR.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GetxattrIn {
    /// 0: ask for the size only (the reply is a [`GetxattrOut`]).
    pub size: U32,
    pub padding: U32,
}

/// `struct fuse_getxattr_out`: the size a GETXATTR/LISTXATTR with `size` 0 asks for.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GetxattrOut {
    pub size: U32,
    pub padding: U32,
}

/// `struct fuse_lseek_in`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct LseekIn {
    pub fh: U64,
    pub offset: U64,
    /// SEEK_SET 0, SEEK_CUR 1, SEEK_END 2, SEEK_DATA 3, SEEK_HOLE 4.
    pub whence: U32,
    pub padding: U32,
}

/// `struct fuse_lseek_out`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct LseekOut {
    pub offset: U64,
}

/// `struct fuse_fallocate_in`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct FallocateIn {
    pub fh: U64,
    pub offset: U64,
    pub length: U64,
    /// Linux `FALLOC_FL_*` (0: allocate and extend).
    pub mode: U32,
    pub padding: U32,
}

/// `struct fuse_dirent` without its name: a READDIR record is this, `namelen` name bytes
/// and zero padding to a multiple of 8 ([`DIRENT_ALIGN`]).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DirentHeader {
    pub ino: U64,
    /// The offset to pass to the next READDIR to continue after this entry.
    pub off: U64,
    pub namelen: U32,
    /// File type as `(mode & S_IFMT) >> 12`.
    pub typ: U32,
}

/// `struct fuse_direntplus` without its name: an [`EntryOut`] then a dirent.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DirentplusHeader {
    pub entry_out: EntryOut,
    pub dirent: DirentHeader,
}

/// Directory records are padded to this alignment (`FUSE_DIRENT_ALIGN`).
pub const DIRENT_ALIGN: usize = 8;
/// Longest name a directory record may carry (`FUSE_NAME_MAX`).
pub const FUSE_NAME_MAX: u32 = 1024;

/// FUSE notify codes (`enum fuse_notify_code`): a notification is a `fuse_out_header`
/// with `unique` 0 and the code in `error` (§5.11.6.3: they arrive on the notification
/// queue), followed by the code's payload.
pub mod notify_code {
    pub const POLL: i32 = 1;
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const STORE: i32 = 4;
    pub const RETRIEVE: i32 = 5;
    pub const DELETE: i32 = 6;
    /// `FUSE_NOTIFY_LOCK`: the code the virtio-fs notification queue was designed for
    /// (§5.11.6.3 names it; the virtio-fs FUSE patches number it 7, which upstream
    /// `fuse.h` later gave to FUSE_NOTIFY_RESEND — a request-queue-only device never
    /// sends RESEND here).
    pub const LOCK: i32 = 7;
}

/// `struct fuse_notify_poll_wakeup_out`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct NotifyPollWakeupOut {
    pub kh: U64,
}

/// `struct fuse_notify_inval_inode_out`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct NotifyInvalInodeOut {
    pub ino: U64,
    /// Start of the range to invalidate; negative: only the attributes.
    pub off: I64,
    /// Length of the range; 0 or negative: to the end of the file.
    pub len: I64,
}

/// `struct fuse_notify_inval_entry_out`, followed by `namelen` name bytes and a NUL.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct NotifyInvalEntryOut {
    pub parent: U64,
    pub namelen: U32,
    /// Padding before 7.38, then `flags` (FUSE_EXPIRE_ONLY 1).
    pub flags: U32,
}

/// `struct fuse_notify_delete_out`, followed by `namelen` name bytes and a NUL.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct NotifyDeleteOut {
    pub parent: U64,
    pub child: U64,
    pub namelen: U32,
    pub padding: U32,
}

/// `struct fuse_notify_lock_out` (virtio-fs): the lock request `unique` is answered.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct NotifyLockOut {
    pub unique: U64,
    /// 0, or a negative errno.
    pub error: I32,
    pub padding: I32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_protocol() {
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<NotifyPollWakeupOut>(), 8);
        assert_eq!(size_of::<NotifyInvalInodeOut>(), 24);
        assert_eq!(size_of::<NotifyInvalEntryOut>(), 16);
        assert_eq!(size_of::<NotifyDeleteOut>(), 24);
        assert_eq!(size_of::<NotifyLockOut>(), 16);
        assert_eq!(size_of::<InitIn>(), 16);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(offset_of!(InitOut, max_write), 20);
        assert_eq!(offset_of!(InitOut, max_pages), 28);
        assert_eq!(size_of::<AttrWire>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<GetattrIn>(), 16);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(offset_of!(SetattrIn, mode), 68);
        assert_eq!(size_of::<MknodIn>(), 16);
        assert_eq!(size_of::<MkdirIn>(), 8);
        assert_eq!(size_of::<Rename2In>(), 16);
        assert_eq!(size_of::<LinkIn>(), 8);
        assert_eq!(size_of::<OpenIn>(), 8);
        assert_eq!(size_of::<CreateIn>(), 16);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<FlushIn>(), 24);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<WriteOut>(), 8);
        assert_eq!(size_of::<StatfsOut>(), 80);
        assert_eq!(size_of::<FsyncIn>(), 16);
        assert_eq!(size_of::<ForgetIn>(), 8);
        assert_eq!(size_of::<ForgetOne>(), 16);
        assert_eq!(size_of::<BatchForgetIn>(), 8);
        assert_eq!(size_of::<DirentHeader>(), 24);
        assert_eq!(size_of::<SetxattrIn>(), 8);
        assert_eq!(size_of::<GetxattrIn>(), 8);
        assert_eq!(size_of::<GetxattrOut>(), 8);
        assert_eq!(size_of::<LseekIn>(), 24);
        assert_eq!(size_of::<LseekOut>(), 8);
        assert_eq!(size_of::<FallocateIn>(), 32);
        assert_eq!(size_of::<DirentplusHeader>(), 152);
    }

    #[test]
    fn in_header_bytes() {
        let h = InHeader {
            len: U32::new(0x48),
            opcode: U32::new(opcode::LOOKUP),
            unique: U64::new(0x0102_0304_0506_0708),
            nodeid: U64::new(1),
            ..Default::default()
        };
        let b = h.as_bytes();
        assert_eq!(&b[..8], &[0x48, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..24], &[1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
