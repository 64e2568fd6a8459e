//! Wire formats of the console device (virtio 1.2 §5.3): the device configuration layout,
//! the control message `{le32 id; le16 event; le16 value}` and its events, the RESIZE
//! payload, and the validation of everything the device writes into a control buffer.
//!
//! Every multi-byte field is little-endian on the wire (the legacy interface is
//! guest-endian; every platform this stack targets is little-endian).

use core::fmt;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Offsets in `struct virtio_console_config` (§5.3.4).
pub mod config {
    /// `le16 cols` (valid with SIZE).
    pub const COLS: u32 = 0;
    /// `le16 rows` (valid with SIZE).
    pub const ROWS: u32 = 2;
    /// `le32 max_nr_ports` (valid with MULTIPORT).
    pub const MAX_NR_PORTS: u32 = 4;
    /// `le32 emerg_wr`, write-only (valid with EMERG_WRITE).
    pub const EMERG_WR: u32 = 8;
    /// Length of the whole structure.
    pub const LEN: u32 = 12;
}

/// Control events (§5.3.6.2).
pub mod event {
    /// Driver → device: the driver is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Device → driver: a port was added.
    pub const PORT_ADD: u16 = 1;
    /// Device → driver: a port was removed.
    pub const PORT_REMOVE: u16 = 2;
    /// Driver → device: the port was set up (value 1) or not (0).
    pub const PORT_READY: u16 = 3;
    /// Device → driver: this port is a console.
    pub const CONSOLE_PORT: u16 = 4;
    /// Device → driver: console size; followed by `struct virtio_console_resize`.
    pub const RESIZE: u16 = 5;
    /// Both ways: the sender opened (1) or closed (0) the port.
    pub const PORT_OPEN: u16 = 6;
    /// Device → driver: the port's name follows the header (the spec does not terminate
    /// it; QEMU sends a NUL after it and counts it in the length).
    pub const PORT_NAME: u16 = 7;
}

/// The id Linux puts in DEVICE_READY, whose id is unused (`VIRTIO_CONSOLE_BAD_ID`).
pub const BAD_ID: u32 = 0xFFFF_FFFF;

/// Longest port name accepted (bytes of UTF-8). QEMU's names are reverse-DNS strings such
/// as `org.qemu.guest_agent.0`; anything longer is refused (the port stays, unnamed).
pub const MAX_NAME_LEN: usize = 127;

/// `struct virtio_console_control`.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ControlHeader {
    pub id: U32,
    pub event: U16,
    pub value: U16,
}

/// Size of [`ControlHeader`] on the wire.
pub const CONTROL_LEN: usize = 8;

impl ControlHeader {
    pub fn new(id: u32, event: u16, value: u16) -> Self {
        ControlHeader {
            id: U32::new(id),
            event: U16::new(event),
            value: U16::new(value),
        }
    }
}

/// `struct virtio_console_resize` (§5.3.6.2: "the number of columns and rows"). Note: Linux
/// reads this as `{rows, cols}`; the spec's order (and QEMU's, which never sends it) is
/// followed here.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ResizeWire {
    pub cols: U16,
    pub rows: U16,
}

/// A validated port name: 1..=[`MAX_NAME_LEN`] bytes of UTF-8 without control characters,
/// stored inline (no allocation).
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct PortName {
    bytes: [u8; MAX_NAME_LEN],
    len: u8,
}

impl PortName {
    /// Validates a name as the device sent it. One trailing NUL (some devices count it) is
    /// tolerated and dropped.
    pub fn parse(raw: &[u8]) -> Result<Self, NameError> {
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        if raw.is_empty() {
            return Err(NameError::Empty);
        }
        if raw.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: raw.len() });
        }
        let s = core::str::from_utf8(raw).map_err(|_| NameError::NotUtf8)?;
        if s.chars().any(char::is_control) {
            return Err(NameError::ControlCharacter);
        }
        let mut bytes = [0u8; MAX_NAME_LEN];
        let dst = bytes
            .get_mut(..raw.len())
            .ok_or(NameError::TooLong { len: raw.len() })?;
        dst.copy_from_slice(raw);
        Ok(PortName {
            bytes,
            len: raw.len() as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // Validated as UTF-8 in `parse`; the fallback is unreachable but costs nothing.
        self.bytes
            .get(..self.len as usize)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

impl fmt::Debug for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a port name was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong { len: usize },
    NotUtf8,
    ControlCharacter,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "empty"),
            NameError::TooLong { len } => {
                write!(f, "{len} bytes long, above the {MAX_NAME_LEN}-byte limit")
            }
            NameError::NotUtf8 => write!(f, "not UTF-8"),
            NameError::ControlCharacter => write!(f, "contains a control character"),
        }
    }
}

/// A control message from the device, parsed and checked on its own (whether its port
/// exists is the driver's business).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DeviceControl {
    PortAdd,
    PortRemove,
    ConsolePort,
    Resize { cols: u16, rows: u16 },
    PortOpen(bool),
    PortName(PortName),
}

/// Why a control message from the device was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// Shorter than the 8-byte header, or than the RESIZE payload.
    Truncated {
        len: usize,
    },
    /// An event code the spec does not define.
    UnknownEvent {
        event: u16,
    },
    /// DEVICE_READY or PORT_READY, which only the driver sends.
    WrongDirection {
        event: u16,
    },
    /// PORT_OPEN with a value other than 0 or 1.
    BadOpenValue {
        value: u16,
    },
    BadName(NameError),
    /// The id is not below `max_nr_ports`.
    IdOutOfRange {
        id: u32,
    },
    /// Below the device's `max_nr_ports` but beyond the ports this driver set up queues for
    /// (it answered PORT_READY 0).
    IdBeyondDriverLimit {
        id: u32,
    },
    /// PORT_ADD for a port that exists.
    DuplicateAdd {
        id: u32,
    },
    /// A message about a port that was never added (or was removed).
    NoSuchPort {
        id: u32,
        event: u16,
    },
    /// A second PORT_NAME for a named port.
    DuplicateName {
        id: u32,
    },
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Truncated { len } => write!(f, "truncated control message ({len} bytes)"),
            ControlError::UnknownEvent { event } => write!(f, "unknown control event {event}"),
            ControlError::WrongDirection { event } => {
                write!(f, "driver-to-device event {event} sent by the device")
            }
            ControlError::BadOpenValue { value } => write!(f, "PORT_OPEN value {value}"),
            ControlError::BadName(e) => write!(f, "bad port name: {e}"),
            ControlError::IdOutOfRange { id } => write!(f, "port id {id} beyond max_nr_ports"),
            ControlError::IdBeyondDriverLimit { id } => {
                write!(f, "port id {id} beyond the driver's port limit")
            }
            ControlError::DuplicateAdd { id } => write!(f, "PORT_ADD for existing port {id}"),
            ControlError::NoSuchPort { id, event } => {
                write!(f, "event {event} for port {id}, which was not added")
            }
            ControlError::DuplicateName { id } => write!(f, "second PORT_NAME for port {id}"),
        }
    }
}

/// The length of the control message at the start of `buf`, a receive buffer zeroed before
/// the device wrote into it, found from its content (the driver does not use the used
/// length of the control receive queue: `driver::CONTROL_BUF`). The header (8 bytes) and
/// RESIZE's payload (4) have fixed lengths; a PORT_NAME runs to the first NUL, which is
/// included (QEMU sends one; [`PortName::parse`] drops it), or to the end of the buffer
/// when there is none (a name the buffer cut is then refused as too long). A device that
/// wrote less than that leaves zeros, which are validated like any other bytes.
pub fn control_message_len(buf: &[u8]) -> usize {
    let event = buf
        .get(..CONTROL_LEN)
        .and_then(|h| ControlHeader::read_from_bytes(h).ok())
        .map(|h| h.event.get());
    let len = match event {
        Some(event::PORT_NAME) => {
            let payload = buf.get(CONTROL_LEN..).unwrap_or(&[]);
            CONTROL_LEN
                + payload
                    .iter()
                    .position(|&b| b == 0)
                    .map_or(payload.len(), |p| p + 1)
        }
        Some(event::RESIZE) => CONTROL_LEN + size_of::<ResizeWire>(),
        _ => CONTROL_LEN,
    };
    len.min(buf.len())
}

/// Parses a control message of `bytes` (its length from [`control_message_len`]) into
/// the port id and the message. Validates length, event code, direction, PORT_OPEN value,
/// RESIZE payload and name.
pub fn parse_control(bytes: &[u8]) -> Result<(u32, DeviceControl), (u32, ControlError)> {
    let Some((hdr, payload)) = bytes.split_at_checked(CONTROL_LEN) else {
        return Err((BAD_ID, ControlError::Truncated { len: bytes.len() }));
    };
    let Ok(hdr) = ControlHeader::read_from_bytes(hdr) else {
        return Err((BAD_ID, ControlError::Truncated { len: bytes.len() }));
    };
    let id = hdr.id.get();
    let value = hdr.value.get();
    let msg = match hdr.event.get() {
        event::PORT_ADD => DeviceControl::PortAdd,
        event::PORT_REMOVE => DeviceControl::PortRemove,
        event::CONSOLE_PORT => DeviceControl::ConsolePort,
        event::RESIZE => {
            let Ok((r, _)) = ResizeWire::read_from_prefix(payload) else {
                return Err((id, ControlError::Truncated { len: bytes.len() }));
            };
            DeviceControl::Resize {
                cols: r.cols.get(),
                rows: r.rows.get(),
            }
        }
        event::PORT_OPEN => match value {
            0 => DeviceControl::PortOpen(false),
            1 => DeviceControl::PortOpen(true),
            value => return Err((id, ControlError::BadOpenValue { value })),
        },
        event::PORT_NAME => match PortName::parse(payload) {
            Ok(n) => DeviceControl::PortName(n),
            Err(e) => return Err((id, ControlError::BadName(e))),
        },
        e @ (event::DEVICE_READY | event::PORT_READY) => {
            return Err((id, ControlError::WrongDirection { event: e }));
        }
        event => return Err((id, ControlError::UnknownEvent { event })),
    };
    Ok((id, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    /// Lengths from a zeroed 256-byte buffer's content: fixed for headers and RESIZE, to
    /// the NUL for PORT_NAME (QEMU's `8 + strlen + 1`), the whole buffer for a name it cut.
    #[test]
    fn control_message_len_from_content() {
        let buf = |bytes: &[u8]| {
            let mut b = [0u8; 256];
            let n = bytes.len().min(256);
            b[..n].copy_from_slice(&bytes[..n]);
            b
        };
        let msg = |id: u32, ev: u16, value: u16, payload: &[u8]| {
            let mut v = ControlHeader::new(id, ev, value).as_bytes().to_vec();
            v.extend_from_slice(payload);
            v
        };
        assert_eq!(
            control_message_len(&buf(&msg(1, event::PORT_ADD, 0, &[]))),
            8
        );
        assert_eq!(
            control_message_len(&buf(&msg(1, event::RESIZE, 0, &[80, 0, 25, 0]))),
            12
        );
        let b = buf(&msg(1, event::PORT_NAME, 1, b"org.qemu.guest_agent.0\0"));
        let n = control_message_len(&b);
        assert_eq!(n, 8 + 22 + 1);
        assert_eq!(
            parse_control(&b[..n]).map(|(id, m)| (
                id,
                matches!(m, DeviceControl::PortName(p) if p.as_str() == "org.qemu.guest_agent.0")
            )),
            Ok((1, true))
        );
        // Without a NUL the zeros that follow end it.
        let b = buf(&msg(1, event::PORT_NAME, 1, b"t"));
        assert_eq!(control_message_len(&b), 10);
        // 300 name bytes cut at the buffer: the whole buffer, refused as too long.
        let b = buf(&msg(1, event::PORT_NAME, 1, &[b'n'; 300]));
        assert_eq!(control_message_len(&b), 256);
        assert_eq!(
            parse_control(&b),
            Err((1, ControlError::BadName(NameError::TooLong { len: 248 })))
        );
        // Shorter buffers never yield more than they hold.
        assert_eq!(control_message_len(&[7, 0, 0, 0, 7]), 5);
        assert_eq!(control_message_len(&[]), 0);
    }

    #[test]
    fn control_header_bytes_exactly() {
        // DEVICE_READY as Linux sends it: id ~0, event 0, value 1.
        let m = ControlHeader::new(BAD_ID, event::DEVICE_READY, 1);
        assert_eq!(m.as_bytes(), &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 1, 0]);
        let m = ControlHeader::new(5, event::PORT_READY, 1);
        assert_eq!(m.as_bytes(), &[5, 0, 0, 0, 3, 0, 1, 0]);
        let m = ControlHeader::new(0x0102_0304, event::PORT_OPEN, 0);
        assert_eq!(m.as_bytes(), &[4, 3, 2, 1, 6, 0, 0, 0]);
        assert_eq!(size_of::<ControlHeader>(), CONTROL_LEN);
        assert_eq!(size_of::<ResizeWire>(), 4);
        let r = ResizeWire {
            cols: U16::new(80),
            rows: U16::new(25),
        };
        assert_eq!(r.as_bytes(), &[80, 0, 25, 0]);
    }

    #[test]
    fn event_codes_per_spec() {
        assert_eq!(
            [
                event::DEVICE_READY,
                event::PORT_ADD,
                event::PORT_REMOVE,
                event::PORT_READY,
                event::CONSOLE_PORT,
                event::RESIZE,
                event::PORT_OPEN,
                event::PORT_NAME
            ],
            [0, 1, 2, 3, 4, 5, 6, 7]
        );
        assert_eq!(
            (
                config::COLS,
                config::ROWS,
                config::MAX_NR_PORTS,
                config::EMERG_WR
            ),
            (0, 2, 4, 8)
        );
    }

    fn msg(id: u32, ev: u16, value: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ControlHeader::new(id, ev, value).as_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_every_device_event() {
        assert_eq!(
            parse_control(&msg(3, 1, 0, &[])),
            Ok((3, DeviceControl::PortAdd))
        );
        assert_eq!(
            parse_control(&msg(3, 2, 0, &[])),
            Ok((3, DeviceControl::PortRemove))
        );
        assert_eq!(
            parse_control(&msg(0, 4, 1, &[])),
            Ok((0, DeviceControl::ConsolePort))
        );
        assert_eq!(
            parse_control(&msg(0, 5, 0, &[132, 0, 43, 0])),
            Ok((
                0,
                DeviceControl::Resize {
                    cols: 132,
                    rows: 43
                }
            ))
        );
        assert_eq!(
            parse_control(&msg(2, 6, 1, &[])),
            Ok((2, DeviceControl::PortOpen(true)))
        );
        assert_eq!(
            parse_control(&msg(2, 6, 0, &[])),
            Ok((2, DeviceControl::PortOpen(false)))
        );
        let Ok((2, DeviceControl::PortName(n))) =
            parse_control(&msg(2, 7, 1, b"org.qemu.guest_agent.0"))
        else {
            panic!("name not parsed")
        };
        assert_eq!(n.as_str(), "org.qemu.guest_agent.0");
    }

    #[test]
    fn rejects_hostile_messages() {
        assert_eq!(
            parse_control(&[1, 0, 0, 0, 1, 0, 0]),
            Err((BAD_ID, ControlError::Truncated { len: 7 }))
        );
        assert_eq!(
            parse_control(&[]),
            Err((BAD_ID, ControlError::Truncated { len: 0 }))
        );
        assert_eq!(
            parse_control(&msg(1, 5, 0, &[80, 0, 25])),
            Err((1, ControlError::Truncated { len: 11 }))
        );
        assert_eq!(
            parse_control(&msg(1, 8, 0, &[])),
            Err((1, ControlError::UnknownEvent { event: 8 }))
        );
        assert_eq!(
            parse_control(&msg(1, 0xFFFF, 0, &[])),
            Err((1, ControlError::UnknownEvent { event: 0xFFFF }))
        );
        assert_eq!(
            parse_control(&msg(1, 0, 1, &[])),
            Err((1, ControlError::WrongDirection { event: 0 }))
        );
        assert_eq!(
            parse_control(&msg(1, 3, 1, &[])),
            Err((1, ControlError::WrongDirection { event: 3 }))
        );
        assert_eq!(
            parse_control(&msg(1, 6, 2, &[])),
            Err((1, ControlError::BadOpenValue { value: 2 }))
        );
        assert_eq!(
            parse_control(&msg(1, 7, 1, &[])),
            Err((1, ControlError::BadName(NameError::Empty)))
        );
    }

    #[test]
    fn name_validation() {
        assert_eq!(PortName::parse(b"a").map(|n| n.to_string()), Ok("a".into()));
        // One trailing NUL tolerated.
        assert_eq!(
            PortName::parse(b"tool\0").map(|n| n.to_string()),
            Ok("tool".into())
        );
        assert_eq!(PortName::parse(b"\0"), Err(NameError::Empty));
        let max = [b'x'; MAX_NAME_LEN];
        assert_eq!(PortName::parse(&max).map(|n| n.as_str().len()), Ok(127));
        assert_eq!(
            PortName::parse(&[b'x'; MAX_NAME_LEN + 1]),
            Err(NameError::TooLong { len: 128 })
        );
        assert_eq!(
            PortName::parse(&[b'y'; 300]),
            Err(NameError::TooLong { len: 300 })
        );
        assert_eq!(PortName::parse(&[0xC3, 0x28]), Err(NameError::NotUtf8));
        assert_eq!(PortName::parse(&[0xFF, b'a']), Err(NameError::NotUtf8));
        assert_eq!(PortName::parse(b"a\nb"), Err(NameError::ControlCharacter));
        assert_eq!(PortName::parse(b"a\0b"), Err(NameError::ControlCharacter));
        assert_eq!(
            PortName::parse("port-é".as_bytes()).map(|n| n.to_string()),
            Ok("port-é".into())
        );
    }
}
