//! FUSE notifications from the device (VIRTIO_FS_F_NOTIFICATION, §5.11.6.3): what the
//! notification queue's buffers carry, validated as hostile input and decoded into
//! [`Notification`]s. The driver posts and collects the buffers ([`crate::FsDriver::poll`])
//! and hands the results out in arrival order ([`crate::FsDriver::take_notification`]).

use zerocopy::FromBytes;

use crate::driver::NAME_MAX;
use crate::error::{FsError, FsResult};
use crate::reply::NodeId;
use crate::wire::{
    NotifyDeleteOut, NotifyInvalEntryOut, NotifyInvalInodeOut, OutHeader, notify_code,
};

const HEADER: usize = size_of::<OutHeader>();

/// The longest notification this driver decodes: a header, the largest fixed payload
/// and a name of [`NAME_MAX`] bytes with its NUL. Longer ones are protocol errors.
pub const NOTIFY_MSG_MAX: usize = HEADER + size_of::<NotifyDeleteOut>() + NAME_MAX + 1;

/// A name a notification carries: 1..=255 bytes, no `/`, no NUL (stored inline: no
/// allocation on the notification path).
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct NotifyName {
    bytes: [u8; NAME_MAX],
    len: u8,
}

impl NotifyName {
    /// A name from bytes, checked like the names the driver sends.
    pub fn new(name: &[u8]) -> Option<NotifyName> {
        if name.is_empty() || name.len() > NAME_MAX || name.iter().any(|&b| b == b'/' || b == 0) {
            return None;
        }
        let mut bytes = [0u8; NAME_MAX];
        bytes.get_mut(..name.len())?.copy_from_slice(name);
        Some(NotifyName {
            bytes,
            len: name.len() as u8,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

impl core::fmt::Debug for NotifyName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "\"{}\"", self.as_bytes().escape_ascii())
    }
}

/// A FUSE notification, decoded and validated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// FUSE_NOTIFY_INVAL_INODE: drop cached attributes of `node` and, if `offset` ≥ 0,
    /// cached data from `offset` for `len` bytes (`len` ≤ 0: to the end).
    InvalInode { node: NodeId, offset: i64, len: i64 },
    /// FUSE_NOTIFY_INVAL_ENTRY: drop the cached entry `name` of `parent` (`flags`: 0
    /// before FUSE 7.38, then FUSE_EXPIRE_ONLY 1).
    InvalEntry {
        parent: NodeId,
        name: NotifyName,
        flags: u32,
    },
    /// FUSE_NOTIFY_DELETE: `name` of `parent`, which was `child`, is gone.
    Delete {
        parent: NodeId,
        child: NodeId,
        name: NotifyName,
    },
}

fn protocol<T>(what: &'static str) -> FsResult<T> {
    Err(FsError::Protocol { what })
}

/// A name following a fixed payload: exactly `namelen` bytes, a NUL, nothing after.
fn name_after(rest: &[u8], namelen: u32) -> FsResult<NotifyName> {
    let n = namelen as usize;
    if n == 0 || n > NAME_MAX {
        return protocol("notification name length 0 or above 255");
    }
    if rest.len() != n + 1 {
        return protocol("notification length disagrees with its name length");
    }
    if rest.get(n) != Some(&0) {
        return protocol("notification name not NUL-terminated");
    }
    let name = rest.get(..n).unwrap_or(&[]);
    NotifyName::new(name).ok_or(FsError::Protocol {
        what: "notification name holds '/' or NUL",
    })
}

fn node(id: u64) -> FsResult<NodeId> {
    if id == 0 {
        return protocol("notification for node id 0");
    }
    Ok(NodeId(id))
}

/// The payload as `T`, which it must be exactly.
fn exact<T: FromBytes>(payload: &[u8]) -> FsResult<T> {
    if payload.len() != size_of::<T>() {
        return protocol("notification length differs from its code's structure");
    }
    T::read_from_bytes(payload).map_err(|_| FsError::Protocol {
        what: "notification length differs from its code's structure",
    })
}

/// The payload's fixed part `T` and what follows it.
fn prefix<T: FromBytes>(payload: &[u8]) -> FsResult<(T, &[u8])> {
    T::read_from_prefix(payload).map_err(|_| FsError::Protocol {
        what: "notification shorter than its code's structure",
    })
}

/// Validates and decodes the `used` bytes the device wrote into a notification buffer
/// (`used.len()` is the used length the device reported, at most [`NOTIFY_MSG_MAX`];
/// the driver rejects longer ones before reading).
pub fn decode(used: &[u8]) -> FsResult<Notification> {
    let Ok((header, payload)) = OutHeader::read_from_prefix(used) else {
        return protocol("notification shorter than its header");
    };
    if header.len.get() as usize != used.len() {
        return protocol("notification length disagrees with the bytes the device wrote");
    }
    if header.unique.get() != 0 {
        return protocol("notification with a non-zero unique");
    }
    match header.error.get() {
        // The driver sends no POLL request (no `kh` to wake) and offers no POSIX_LOCKS
        // (no blocking SETLKW to complete): either notification answers nothing asked.
        notify_code::POLL => protocol("POLL notification, though the driver polls nothing"),
        notify_code::INVAL_INODE => {
            let p: NotifyInvalInodeOut = exact(payload)?;
            Ok(Notification::InvalInode {
                node: node(p.ino.get())?,
                offset: p.off.get(),
                len: p.len.get(),
            })
        }
        notify_code::INVAL_ENTRY => {
            let (p, rest) = prefix::<NotifyInvalEntryOut>(payload)?;
            Ok(Notification::InvalEntry {
                parent: node(p.parent.get())?,
                name: name_after(rest, p.namelen.get())?,
                flags: p.flags.get(),
            })
        }
        notify_code::DELETE => {
            let (p, rest) = prefix::<NotifyDeleteOut>(payload)?;
            Ok(Notification::Delete {
                parent: node(p.parent.get())?,
                child: node(p.child.get())?,
                name: name_after(rest, p.namelen.get())?,
            })
        }
        notify_code::LOCK => {
            protocol("LOCK notification, though the driver requested no lock (no POSIX_LOCKS)")
        }
        notify_code::STORE | notify_code::RETRIEVE => {
            protocol("notification code STORE/RETRIEVE needs a page cache this driver lacks")
        }
        _ => protocol("unknown notification code"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn msg(code: i32, unique: u64, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&unique.to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn entry(parent: u64, name: &[u8], namelen: u32) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&parent.to_le_bytes());
        p.extend_from_slice(&namelen.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(name);
        p
    }

    fn what(r: FsResult<Notification>) -> &'static str {
        match r {
            Err(FsError::Protocol { what }) => what,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn decodes_each_code() {
        let mut inode = Vec::new();
        inode.extend_from_slice(&5u64.to_le_bytes());
        inode.extend_from_slice(&(-1i64).to_le_bytes());
        inode.extend_from_slice(&0i64.to_le_bytes());
        assert_eq!(
            decode(&msg(notify_code::INVAL_INODE, 0, &inode)),
            Ok(Notification::InvalInode {
                node: NodeId(5),
                offset: -1,
                len: 0
            })
        );
        let e = decode(&msg(notify_code::INVAL_ENTRY, 0, &entry(1, b"a b\0", 3))).unwrap();
        match e {
            Notification::InvalEntry {
                parent,
                name,
                flags,
            } => {
                assert_eq!(
                    (parent, name.as_bytes(), flags),
                    (NodeId(1), &b"a b"[..], 0)
                );
            }
            other => panic!("{other:?}"),
        }
        // Never requested: refused.
        let mut lock = Vec::new();
        lock.extend_from_slice(&9u64.to_le_bytes());
        lock.extend_from_slice(&(-11i32).to_le_bytes());
        lock.extend_from_slice(&0i32.to_le_bytes());
        assert!(what(decode(&msg(notify_code::LOCK, 0, &lock))).contains("LOCK"));
        assert!(what(decode(&msg(notify_code::POLL, 0, &7u64.to_le_bytes()))).contains("POLL"));
    }

    #[test]
    fn hostile_notifications_are_errors() {
        assert_eq!(
            what(decode(&[0; 15])),
            "notification shorter than its header"
        );
        let mut m = msg(notify_code::POLL, 0, &7u64.to_le_bytes());
        m[0] = 99;
        assert!(what(decode(&m)).contains("length disagrees"));
        assert!(what(decode(&msg(notify_code::POLL, 3, &[0; 8]))).contains("non-zero unique"));
        assert!(what(decode(&msg(99, 0, &[]))).contains("unknown"));
        assert!(what(decode(&msg(-2, 0, &[]))).contains("unknown"));
        assert!(what(decode(&msg(notify_code::INVAL_INODE, 0, &[0; 25]))).contains("differs"));
        assert!(what(decode(&msg(notify_code::INVAL_INODE, 0, &[0; 24]))).contains("node id 0"));
        let bad = [
            entry(1, b"ab\0", 3),
            entry(1, b"abc", 3),
            entry(1, b"a/c\0", 3),
            entry(1, b"a\0c\0", 3),
            entry(1, b"\0", 0),
            entry(1, b"abc\0\0", 3),
            entry(1, &[b'x'; 300], 299),
            entry(1, b"ab", u32::MAX),
        ];
        for p in &bad {
            let _ = what(decode(&msg(notify_code::INVAL_ENTRY, 0, p)));
        }
        assert!(what(decode(&msg(notify_code::DELETE, 0, &[0; 10]))).contains("shorter"));
        assert!(what(decode(&msg(notify_code::STORE, 0, &[0; 32]))).contains("STORE"));
    }
}
