//! Errors: what a device answered (a FUSE errno, typed) and what went wrong on the way
//! (the device broke the protocol, the queue is full, the request is malformed).

use virtio_core::Error;

/// An errno a FUSE reply carried (`fuse_out_header.error` = `-errno`), as a positive
/// number. Values are the host's: virtio-fs daemons run on Linux, so these are Linux
/// numbers (a Darwin file system kext maps them to Darwin's where they differ).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const ENOENT: Errno = Errno(2);
    pub const EIO: Errno = Errno(5);
    pub const EBADF: Errno = Errno(9);
    pub const EAGAIN: Errno = Errno(11);
    pub const ENOMEM: Errno = Errno(12);
    pub const EACCES: Errno = Errno(13);
    pub const EBUSY: Errno = Errno(16);
    pub const EEXIST: Errno = Errno(17);
    pub const EXDEV: Errno = Errno(18);
    pub const ENOTDIR: Errno = Errno(20);
    pub const EISDIR: Errno = Errno(21);
    pub const EINVAL: Errno = Errno(22);
    pub const EFBIG: Errno = Errno(27);
    pub const ENOSPC: Errno = Errno(28);
    pub const EROFS: Errno = Errno(30);
    pub const EMLINK: Errno = Errno(31);
    pub const ERANGE: Errno = Errno(34);
    pub const ENAMETOOLONG: Errno = Errno(36);
    pub const ENOSYS: Errno = Errno(38);
    pub const ENOTEMPTY: Errno = Errno(39);
    pub const ELOOP: Errno = Errno(40);
    pub const ENODATA: Errno = Errno(61);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const ENOTSUP: Errno = Errno(95);
    pub const ESTALE: Errno = Errno(116);

    /// Largest errno a reply may carry: `error` must lie in `-511..=-1` or be 0. Linux's
    /// `fuse_dev_do_write` refuses `error <= -512` from the server (512.. are the
    /// kernel-internal ERESTART* codes, up to `MAX_ERRNO` 4095); so does this driver, as a
    /// protocol error.
    pub const MAX: u32 = 511;

    /// The symbolic name, for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            5 => "EIO",
            9 => "EBADF",
            11 => "EAGAIN",
            12 => "ENOMEM",
            13 => "EACCES",
            16 => "EBUSY",
            17 => "EEXIST",
            18 => "EXDEV",
            20 => "ENOTDIR",
            21 => "EISDIR",
            22 => "EINVAL",
            27 => "EFBIG",
            28 => "ENOSPC",
            30 => "EROFS",
            31 => "EMLINK",
            34 => "ERANGE",
            36 => "ENAMETOOLONG",
            38 => "ENOSYS",
            39 => "ENOTEMPTY",
            40 => "ELOOP",
            61 => "ENODATA",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            116 => "ESTALE",
            _ => "errno",
        }
    }
}

/// Everything a file system request can end with besides success.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FsError {
    /// The device answered with this errno.
    Errno(Errno),
    /// The device broke the FUSE or virtio-fs protocol (a reply whose `unique` is not the
    /// request's, whose length disagrees with its header or exceeds what the request
    /// allows, malformed attributes or directory records, ...). `what` names the rule.
    Protocol { what: &'static str },
    /// A name that cannot be sent: empty, longer than 255 bytes, or holding `/` or NUL.
    InvalidName,
    /// An argument the driver refuses before sending (a read or write larger than the
    /// driver's buffers, a buffer too small for the reply, ...).
    InvalidArgument,
    /// No request slot or descriptor free right now: retry after completions.
    QueueFull,
    /// FUSE_INIT has not completed (or the session was destroyed).
    NotInitialized,
    /// The device speaks a FUSE version this driver does not (major ≠ 7, or minor below
    /// [`crate::wire::FUSE_MIN_MINOR_VERSION`]).
    UnsupportedVersion { major: u32, minor: u32 },
    /// The ticket does not name a request of this driver (already taken, or stale).
    UnknownTicket,
    /// The waiter gave up (its time ran out) or the driver's wait bound was reached.
    Timeout,
    /// Bus, transport or ring error (hostile used-ring values are reported here).
    Virtio(Error),
}

impl From<Error> for FsError {
    fn from(e: Error) -> Self {
        match e {
            Error::QueueFull => FsError::QueueFull,
            e => FsError::Virtio(e),
        }
    }
}

impl core::fmt::Display for FsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FsError::Errno(e) => write!(f, "{} ({})", e.name(), e.0),
            FsError::Protocol { what } => write!(f, "device protocol violation: {what}"),
            FsError::InvalidName => write!(f, "invalid file name"),
            FsError::InvalidArgument => write!(f, "invalid argument"),
            FsError::QueueFull => write!(f, "queue full"),
            FsError::NotInitialized => write!(f, "FUSE session not initialised"),
            FsError::UnsupportedVersion { major, minor } => {
                write!(f, "unsupported FUSE version {major}.{minor}")
            }
            FsError::UnknownTicket => write!(f, "unknown request ticket"),
            FsError::Timeout => write!(f, "timed out"),
            FsError::Virtio(e) => write!(f, "{e}"),
        }
    }
}

pub type FsResult<T> = core::result::Result<T, FsError>;
