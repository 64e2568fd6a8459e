//! Decoded replies: attributes, entries, open handles, statfs, INIT parameters, and the
//! directory record walker. Every decoder validates what the device wrote and turns a
//! malformed value into [`FsError::Protocol`]; nothing here panics on device bytes.

use zerocopy::FromBytes;

use crate::error::{FsError, FsResult};
use crate::wire::{
    AttrOut, AttrWire, DIRENT_ALIGN, DirentHeader, DirentplusHeader, EntryOut, FUSE_NAME_MAX,
    FUSE_ROOT_ID, OpenOut, StatfsOut, mode,
};

/// A node (inode) id the device handed out; [`NodeId::ROOT`] is the shared directory.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl NodeId {
    pub const ROOT: NodeId = NodeId(FUSE_ROOT_ID);
}

/// An open file or directory handle (`fh`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u64);

/// A point in time or a validity period: seconds and nanoseconds (< 10⁹).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timespec {
    pub secs: u64,
    pub nanos: u32,
}

const NANOS_PER_SEC: u32 = 1_000_000_000;

fn timespec(secs: u64, nanos: u32, what: &'static str) -> FsResult<Timespec> {
    if nanos >= NANOS_PER_SEC {
        return Err(FsError::Protocol { what });
    }
    Ok(Timespec { secs, nanos })
}

/// The file type, from the `S_IFMT` bits of a mode.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileType {
    /// The type of `mode`, or `None` when its type bits name no file type.
    pub fn from_mode(m: u32) -> Option<FileType> {
        Some(match m & mode::S_IFMT {
            mode::S_IFREG => FileType::Regular,
            mode::S_IFDIR => FileType::Directory,
            mode::S_IFLNK => FileType::Symlink,
            mode::S_IFCHR => FileType::CharDevice,
            mode::S_IFBLK => FileType::BlockDevice,
            mode::S_IFIFO => FileType::Fifo,
            mode::S_IFSOCK => FileType::Socket,
            _ => return None,
        })
    }

    /// The type of a directory record's `type` field (`(mode & S_IFMT) >> 12`); `None`
    /// for 0 (unknown) or a value naming no type.
    pub fn from_dirent_type(t: u32) -> Option<FileType> {
        let m = t.checked_shl(12)?;
        if m & !mode::S_IFMT != 0 {
            return None;
        }
        Self::from_mode(m)
    }
}

/// File attributes (`struct fuse_attr`), validated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Type and permission bits.
    pub mode: u32,
    pub kind: FileType,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    /// Permission bits (`mode & 0o7777`).
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }

    /// Validates `w` the way Linux's `fuse_invalid_attr` does, and more: a mode naming a
    /// file type, a size that fits a signed 64-bit offset, nanoseconds below 10⁹.
    pub fn decode(w: &AttrWire) -> FsResult<Attr> {
        let m = w.mode.get();
        let Some(kind) = FileType::from_mode(m) else {
            return Err(FsError::Protocol {
                what: "attribute mode names no file type",
            });
        };
        let size = w.size.get();
        if size > i64::MAX as u64 {
            return Err(FsError::Protocol {
                what: "attribute size beyond the largest file offset",
            });
        }
        const NS: &str = "attribute time nanoseconds not below 10^9";
        Ok(Attr {
            ino: w.ino.get(),
            size,
            blocks: w.blocks.get(),
            atime: timespec(w.atime.get(), w.atimensec.get(), NS)?,
            mtime: timespec(w.mtime.get(), w.mtimensec.get(), NS)?,
            ctime: timespec(w.ctime.get(), w.ctimensec.get(), NS)?,
            mode: m,
            kind,
            nlink: w.nlink.get(),
            uid: w.uid.get(),
            gid: w.gid.get(),
            rdev: w.rdev.get(),
            blksize: w.blksize.get(),
        })
    }
}

/// A directory entry the device looked up (`struct fuse_entry_out`): the node, which the
/// caller now holds one lookup reference of (return it with FORGET), its attributes and
/// how long both may be cached.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub node: NodeId,
    pub generation: u64,
    pub entry_valid: Timespec,
    pub attr_valid: Timespec,
    pub attr: Attr,
}

impl Entry {
    /// Decodes a positive entry; a node id of 0 is refused here (callers that allow a
    /// negative entry check it first).
    pub fn decode(w: &EntryOut) -> FsResult<Entry> {
        let node = w.nodeid.get();
        if node == 0 {
            return Err(FsError::Protocol {
                what: "entry with node id 0 where a node was created",
            });
        }
        if node == FUSE_ROOT_ID && w.generation.get() != 0 {
            // Linux refuses this too (`fuse_valid_nodeid`-style check in lookup).
            return Err(FsError::Protocol {
                what: "root node with a non-zero generation",
            });
        }
        const NS: &str = "entry validity nanoseconds not below 10^9";
        Ok(Entry {
            node: NodeId(node),
            generation: w.generation.get(),
            entry_valid: timespec(w.entry_valid.get(), w.entry_valid_nsec.get(), NS)?,
            attr_valid: timespec(w.attr_valid.get(), w.attr_valid_nsec.get(), NS)?,
            attr: Attr::decode(&w.attr)?,
        })
    }
}

/// Attributes with their validity (`struct fuse_attr_out`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AttrReply {
    pub attr_valid: Timespec,
    pub attr: Attr,
}

impl AttrReply {
    pub fn decode(w: &AttrOut) -> FsResult<AttrReply> {
        Ok(AttrReply {
            attr_valid: timespec(
                w.attr_valid.get(),
                w.attr_valid_nsec.get(),
                "attribute validity nanoseconds not below 10^9",
            )?,
            attr: Attr::decode(&w.attr)?,
        })
    }
}

/// An open handle (`struct fuse_open_out`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: FileHandle,
    /// `FOPEN_*` flags (direct I/O, keep cache, ...).
    pub open_flags: u32,
}

impl Opened {
    pub fn decode(w: &OpenOut) -> Opened {
        Opened {
            fh: FileHandle(w.fh.get()),
            open_flags: w.open_flags.get(),
        }
    }
}

/// File system statistics (`struct fuse_kstatfs`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl Statfs {
    pub fn decode(w: &StatfsOut) -> FsResult<Statfs> {
        let s = Statfs {
            blocks: w.blocks.get(),
            bfree: w.bfree.get(),
            bavail: w.bavail.get(),
            files: w.files.get(),
            ffree: w.ffree.get(),
            bsize: w.bsize.get(),
            namelen: w.namelen.get(),
            frsize: w.frsize.get(),
        };
        if s.bfree > s.blocks || s.bavail > s.blocks || s.ffree > s.files {
            return Err(FsError::Protocol {
                what: "statfs free counts exceed the totals",
            });
        }
        Ok(s)
    }
}

/// What FUSE_INIT settled (the device's answer, intersected with the driver's offer).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct InitInfo {
    pub major: u32,
    /// The minor both sides speak: the lower of the two.
    pub minor: u32,
    pub max_readahead: u32,
    /// Flags the driver offered and the device accepted.
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    /// Largest WRITE payload the device accepts (at least 4096, as Linux clamps it).
    pub max_write: u32,
    pub time_gran: u32,
    /// With MAX_PAGES: pages per request (0 otherwise).
    pub max_pages: u16,
}

/// One record of a READDIR or READDIRPLUS reply, borrowed from the caller's buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    /// Cookie to continue reading after this record.
    pub offset: u64,
    /// `None`: the device did not say (type 0) or named no type.
    pub kind: Option<FileType>,
    pub name: &'a [u8],
    /// READDIRPLUS only: the looked-up entry. Each `Some` holds one lookup reference the
    /// caller must FORGET; `.` and `..` come without one (`None`, whatever node id the
    /// device gave them: fuse_lowlevel.h's readdirplus does not count them), as do
    /// records of node id 0. Another name with the root's node id is a protocol error.
    pub entry: Option<Entry>,
}

/// Walks the records of a directory reply (validated up front by [`validate_dir`]).
#[derive(Clone, Debug)]
pub struct DirIter<'a> {
    rest: &'a [u8],
    plus: bool,
}

impl<'a> DirIter<'a> {
    /// Validates every record of `bytes` (see [`validate_dir`]) and returns a walker.
    pub fn new(bytes: &'a [u8], plus: bool) -> FsResult<(DirIter<'a>, u32)> {
        let count = validate_dir(bytes, plus)?;
        Ok((DirIter { rest: bytes, plus }, count))
    }
}

impl<'a> Iterator for DirIter<'a> {
    type Item = DirEntry<'a>;

    fn next(&mut self) -> Option<DirEntry<'a>> {
        // Validated in `new`: decoding again cannot fail; an error just ends the walk.
        match decode_record(self.rest, self.plus) {
            Ok(Some((entry, used))) => {
                self.rest = self.rest.get(used..).unwrap_or(&[]);
                Some(entry)
            }
            _ => {
                self.rest = &[];
                None
            }
        }
    }
}

/// Checks every record of a READDIR(PLUS) reply and returns how many there are: each
/// record's fixed part and name fit the reply, the name is 1..=1024 bytes
/// (`FUSE_NAME_MAX`) with no `/` or NUL, padding to 8 bytes is present and zero, the
/// continuation offset is non-zero (0 would restart the directory: a device could make a
/// reader loop forever), and a READDIRPLUS entry with a node id carries valid attributes
/// and, unless it is "." or "..", is not the root.
pub fn validate_dir(bytes: &[u8], plus: bool) -> FsResult<u32> {
    let mut rest = bytes;
    let mut count = 0u32;
    // Every record takes at least 24 bytes: the loop runs at most len/24 + 1 times.
    while let Some((_, used)) = decode_record(rest, plus)? {
        rest = rest.get(used..).unwrap_or(&[]);
        count += 1;
    }
    Ok(count)
}

/// Decodes the record at the start of `bytes`: `None` at the end, else the record and the
/// bytes it occupies (padding included).
fn decode_record(bytes: &[u8], plus: bool) -> FsResult<Option<(DirEntry<'_>, usize)>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let (dirent, entry_out, fixed) = if plus {
        let Ok((h, _)) = DirentplusHeader::read_from_prefix(bytes) else {
            return Err(FsError::Protocol {
                what: "directory record shorter than its header",
            });
        };
        (h.dirent, Some(h.entry_out), size_of::<DirentplusHeader>())
    } else {
        let Ok((h, _)) = DirentHeader::read_from_prefix(bytes) else {
            return Err(FsError::Protocol {
                what: "directory record shorter than its header",
            });
        };
        (h, None, size_of::<DirentHeader>())
    };
    let namelen = dirent.namelen.get();
    if namelen == 0 || namelen > FUSE_NAME_MAX {
        return Err(FsError::Protocol {
            what: "directory record name length 0 or above FUSE_NAME_MAX",
        });
    }
    let name_end = fixed + namelen as usize;
    let padded = name_end.div_ceil(DIRENT_ALIGN) * DIRENT_ALIGN;
    let (Some(name), Some(padding)) = (bytes.get(fixed..name_end), bytes.get(name_end..padded))
    else {
        return Err(FsError::Protocol {
            what: "directory record (name or 8-byte padding) runs past the reply",
        });
    };
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(FsError::Protocol {
            what: "directory record name holds '/' or NUL",
        });
    }
    if padding.iter().any(|&b| b != 0) {
        return Err(FsError::Protocol {
            what: "directory record padding not zero",
        });
    }
    if dirent.off.get() == 0 {
        return Err(FsError::Protocol {
            what: "directory record with continuation offset 0",
        });
    }
    let entry = match entry_out {
        // fuse_lowlevel.h (readdirplus): every entry but "." and ".." adds one to its
        // node's lookup count; Linux's `fuse_direntplus_link` skips those two whatever
        // their node id. No reference, no entry.
        Some(_) if is_dot_or_dotdot(name) => None,
        Some(e) if e.nodeid.get() == 0 => None,
        // Linux `fuse_direntplus_link`: `invalid_nodeid` (0 or FUSE_ROOT_ID) is -EIO.
        Some(e) if e.nodeid.get() == FUSE_ROOT_ID => {
            return Err(FsError::Protocol {
                what: "READDIRPLUS entry other than . or .. names the root node",
            });
        }
        Some(e) => Some(Entry::decode(&e)?),
        None => None,
    };
    Ok(Some((
        DirEntry {
            ino: dirent.ino.get(),
            offset: dirent.off.get(),
            kind: FileType::from_dirent_type(dirent.typ.get()),
            name,
            entry,
        },
        padded,
    )))
}

fn is_dot_or_dotdot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// The nodes a READDIRPLUS reply of `len` bytes gave a lookup reference of, as far as its
/// records can be followed whether they are valid or not (a refused or unclaimed reply's
/// references go back to the device): each record's `entry_out.nodeid`, except 0, the
/// root and those of "." and ".." (no reference, see [`DirEntry::entry`]). `read(at,
/// buf)` fills `buf` from byte `at` of the reply (false ends the walk). Bounded: every
/// record advances by at least 160 bytes within `len`; a record whose name length is 0,
/// above `FUSE_NAME_MAX` or past `len` ends the walk.
pub(crate) fn dirplus_references(
    len: usize,
    mut read: impl FnMut(usize, &mut [u8]) -> bool,
    mut each: impl FnMut(NodeId),
) {
    const FIXED: usize = size_of::<DirentplusHeader>();
    let mut at = 0usize;
    while at + FIXED <= len {
        let mut head = [0u8; FIXED];
        if !read(at, &mut head) {
            return;
        }
        let Ok(h) = DirentplusHeader::read_from_bytes(&head) else {
            return;
        };
        let namelen = h.dirent.namelen.get() as usize;
        if namelen == 0 || namelen > FUSE_NAME_MAX as usize || at + FIXED + namelen > len {
            return;
        }
        // Only "." and ".." matter here: the first two bytes tell them apart.
        let mut start = [0u8; 2];
        let Some(start) = start.get_mut(..namelen.min(2)) else {
            return;
        };
        if !read(at + FIXED, start) {
            return;
        }
        let node = h.entry_out.nodeid.get();
        let dot = namelen <= 2 && is_dot_or_dotdot(start);
        if node != 0 && node != FUSE_ROOT_ID && !dot {
            each(NodeId(node));
        }
        at = (at + FIXED + namelen).next_multiple_of(DIRENT_ALIGN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::{FromZeros, IntoBytes};

    fn record(name: &[u8], off: u64) -> Vec<u8> {
        let mut v = DirentHeader {
            ino: U64::new(7),
            off: U64::new(off),
            namelen: U32::new(name.len() as u32),
            typ: U32::new(mode::S_IFREG >> 12),
        }
        .as_bytes()
        .to_vec();
        v.extend_from_slice(name);
        while v.len() % 8 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn walks_valid_records() {
        let mut b = record(b"a", 1);
        b.extend(record(b"hello world", 2));
        let (it, n) = DirIter::new(&b, false).unwrap();
        assert_eq!(n, 2);
        let names: Vec<&[u8]> = it.map(|e| e.name).collect();
        assert_eq!(names, [&b"a"[..], b"hello world"]);
    }

    /// A READDIRPLUS record: `node`'s entry (valid attributes), then the dirent.
    fn plus_record(node: u64, name: &[u8], off: u64) -> Vec<u8> {
        let mut e = crate::wire::EntryOut::new_zeroed();
        e.nodeid = U64::new(node);
        e.attr.mode = U32::new(mode::S_IFREG | 0o644);
        let mut v = e.as_bytes().to_vec();
        v.extend(record(name, off));
        v
    }

    #[test]
    fn readdirplus_dots_carry_no_entry_and_the_root_is_refused() {
        let mut b = plus_record(1, b".", 1);
        b.extend(plus_record(7, b"..", 2));
        b.extend(plus_record(9, b"x", 3));
        let (it, n) = DirIter::new(&b, true).unwrap();
        assert_eq!(n, 3);
        let nodes: Vec<_> = it.map(|e| e.entry.map(|e| e.node.0)).collect();
        assert_eq!(nodes, [None, None, Some(9)]);
        let mut lenient = Vec::new();
        dirplus_references(
            b.len(),
            |at, buf| {
                buf.copy_from_slice(&b[at..at + buf.len()]);
                true
            },
            |n| lenient.push(n.0),
        );
        assert_eq!(lenient, [9]);
        // The root under another name: refused; the lenient walk still finds 9 and 4,
        // and stops at a record it cannot follow.
        let mut b = plus_record(1, b"r", 1);
        b.extend(plus_record(9, b"x", 2));
        b.extend(plus_record(4, b"y", 0));
        assert!(validate_dir(&b, true).is_err());
        b.extend(plus_record(5, b"z", 3));
        let cut = b.len() - 8;
        let mut lenient = Vec::new();
        dirplus_references(
            cut,
            |at, buf| {
                buf.copy_from_slice(&b[at..at + buf.len()]);
                true
            },
            |n| lenient.push(n.0),
        );
        assert_eq!(lenient, [9, 4]);
    }

    #[test]
    fn refuses_malformed_records() {
        let bad = |b: &[u8]| validate_dir(b, false).unwrap_err();
        // Truncated padding.
        let r = record(b"abc", 1);
        assert!(matches!(bad(&r[..r.len() - 1]), FsError::Protocol { .. }));
        // Name length 0, and beyond the record.
        let mut r = record(b"abc", 1);
        r[16] = 0;
        bad(&r);
        let mut r = record(b"abc", 1);
        r[16] = 200;
        bad(&r);
        // Offset 0, slash in the name, non-zero padding, short header.
        bad(&record(b"abc", 0));
        bad(&record(b"a/c", 1));
        let mut r = record(b"abc", 1);
        *r.last_mut().unwrap() = 1;
        bad(&r);
        bad(&[0u8; 10]);
    }
}
