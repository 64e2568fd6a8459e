//! virtio-fs over the simulated function, with the fuzzer as the FUSE server behind the
//! device (§5.11): it reads each request the driver posts (opcode and `unique` from the
//! `fuse_in_header`) and answers it with a reply of its choosing — a well-formed one for
//! the opcode with fuzzed fields (attributes, entries, INIT parameters, directory records
//! built from the input, data of any length up to the buffer), an errno (in range or
//! not), a header with the wrong `unique` or length, raw bytes — with the true used length
//! or any other; it holds requests and completes them later in any order, forges and
//! repeats used elements, rewrites a data buffer after completing it, sends notifications
//! (well-formed or raw bytes) when it offers VIRTIO_FS_F_NOTIFICATION, completes hiprio
//! FORGETs with any length, and sets NEEDS_RESET. The tag, `num_request_queues` and
//! `notify_buf_size` of the configuration are fuzzed too, and the ring layout (split or
//! packed, INDIRECT_DESC, EVENT_IDX).
//!
//! The driver side: FUSE_INIT through the blocking API (the fuzzer answers every wait),
//! then typed requests of every kind submitted, kicked, polled, taken and abandoned in any
//! order, interrupts taken and re-enabled, and the blocking `read`, `write`, `read_dir`,
//! `lookup`, `getattr`, `open`, `statfs` and `forget` through a waiter the fuzzer answers.
//!
//! Oracles: a data reply is never longer than the request asked for; every directory
//! record a walker yields has a 1..=1024-byte name without `/` or NUL and a non-zero
//! continuation offset; attributes carry nanoseconds below 10⁹; a result is taken at most
//! once (a second `take` of the same ticket is refused, even after its slot is reused);
//! one `poll` collects at most one reply per slot and queue; the blocking calls return
//! within their wait bound (a hang is a libFuzzer timeout); after `shutdown` and drop,
//! guest memory is back to what it was.

use virtio_core::DeviceType;
use virtio_fs::wire::{self, opcode};
use virtio_fs::{
    DirIter, Entry, FileHandle, FsDriver, FsError, FsOptions, FsResult, NodeId, Reply, Request,
    SetAttr, SetTime, Ticket, Timespec, Waiter,
};
use virtio_tests::sim::{Chain, MODES, Sim, SimBuilder, SimInterrupt, SimMode};

use crate::input::Input;

type Device = crate::SimDevice;
type Fs = FsDriver<Device>;

const MAX_STEPS: usize = 160;
const VERSION_1: u64 = 1 << 32;
/// VIRTIO_FS_F_NOTIFICATION (§5.11.3).
const F_NOTIFICATION: u64 = 1 << 0;
/// `fuse_out_header`: len, error, unique.
const OUT_HEADER: usize = 16;
/// `fuse_attr` and where it sits in `fuse_entry_out` and `fuse_attr_out`.
const ATTR_LEN: usize = 88;
const ENTRY_ATTR_AT: usize = 40;
const ENTRY_LEN: usize = ENTRY_ATTR_AT + ATTR_LEN;
const ATTR_OUT_ATTR_AT: usize = 16;
/// File type bits (`S_IFMT` values) a sane attribute carries.
const FILE_TYPES: [u32; 7] = [
    0o140000, 0o120000, 0o100000, 0o060000, 0o040000, 0o020000, 0o010000,
];
/// Directory names the request side uses (and the empty / slash / long ones it may).
const NAMES: [&[u8]; 6] = [b"a", b"file.txt", b"dir", b"", b"x/y", &[b'n'; 300]];

/// A request the fuzzer submitted and has not taken.
#[derive(Copy, Clone)]
struct Pending {
    ticket: Ticket,
    /// Largest data reply it may return (READ, READDIR, READLINK, GET/LISTXATTR).
    max_data: u32,
    /// READDIR (`Some(false)`) or READDIRPLUS (`Some(true)`).
    dir: Option<bool>,
}

/// The device side: the FUSE server the fuzzer plays, and the simulated function.
struct Server<'i> {
    input: Input<'i>,
    sim: Sim,
    /// Queues: hiprio, the notification queue when offered, then the request queues.
    queues: u16,
    notification: bool,
    /// Chains held back, to be answered later (in any order).
    held: Vec<(u16, Chain)>,
    /// Chains answered last, whose buffers a hostile device may still rewrite.
    answered: Vec<Chain>,
}

impl Server<'_> {
    fn first_request_queue(&self) -> u16 {
        1 + u16::from(self.notification)
    }

    /// Pops and answers (or holds) every chain the driver posted, then signals.
    fn serve_all(&mut self) {
        for q in 0..self.queues {
            let chains = self.sim.pop_chains(q);
            if chains.is_empty() {
                continue;
            }
            for c in chains {
                if q == 0 {
                    // hiprio: FORGET / BATCH_FORGET have no reply; any used length.
                    let len = match self.input.u8() % 4 {
                        0 => self.input.u32() % (c.writable_len() + 2),
                        _ => 0,
                    };
                    self.sim.complete(q, c.head, len);
                } else if (self.notification && q == 1) || self.input.u8().is_multiple_of(8) {
                    // Notification buffers wait for a notification; requests now and then.
                    self.held.push((q, c));
                } else {
                    self.answer(q, &c);
                }
            }
            self.sim.signal_used(q);
        }
    }

    /// Answers some of the held chains, in an order the input picks.
    fn release_held(&mut self) {
        let n = usize::from(self.input.u8()) % (self.held.len() + 1);
        for _ in 0..n {
            if self.held.is_empty() {
                break;
            }
            let i = self.input.u16() as usize % self.held.len();
            let (q, c) = self.held.swap_remove(i);
            if self.notification && q == 1 {
                self.notify(&c);
            } else {
                self.answer(q, &c);
            }
            self.sim.signal_used(q);
        }
    }

    /// Writes a reply for the request in `c` and completes it.
    fn answer(&mut self, q: u16, c: &Chain) {
        let request = self.sim.read_chain(c);
        let word = |at: usize, n: usize| -> u64 {
            request.get(at..at + n).map_or(0, |b| {
                let mut v = [0u8; 8];
                v[..n].copy_from_slice(b);
                u64::from_le_bytes(v)
            })
        };
        let op = word(4, 4) as u32;
        let mut unique = word(8, 8);
        let cap = c.writable_len() as usize;
        let room = cap.saturating_sub(OUT_HEADER);
        let mut error = 0i32;
        let payload: Vec<u8> = match self.input.u8() % 10 {
            0..=5 => self.payload(op, room),
            6 => {
                error = match self.input.u8() % 3 {
                    0 => self.input.u32() as i32,
                    _ => -(1 + i32::from(self.input.u16() % 4095)),
                };
                Vec::new()
            }
            7 => {
                unique = match self.input.u8() % 3 {
                    0 => 0,
                    1 => unique.wrapping_add(1),
                    _ => u64::from(self.input.u32()),
                };
                self.payload(op, room)
            }
            _ => {
                let n = usize::from(self.input.u16()) % (cap + 8);
                self.input.take(n).to_vec()
            }
        };
        let mut len = (OUT_HEADER + payload.len()) as u32;
        if self.input.u8().is_multiple_of(8) {
            len = self.input.u32() % (cap as u32 + 32);
        }
        let mut reply = Vec::with_capacity(OUT_HEADER + payload.len());
        reply.extend_from_slice(&len.to_le_bytes());
        reply.extend_from_slice(&error.to_le_bytes());
        reply.extend_from_slice(&unique.to_le_bytes());
        reply.extend_from_slice(&payload);
        let written = self.sim.write_chain(c, &reply);
        let used = match self.input.u8() % 8 {
            0 => self.input.u32() % (cap as u32 + 32),
            1 => 0,
            _ => written,
        };
        self.sim.complete(q, c.head, used);
        if self.answered.len() == 8 {
            self.answered.remove(0);
        }
        self.answered.push(c.clone());
    }

    /// A reply payload for opcode `op` in at most `room` bytes: the structure the opcode
    /// expects, with fuzzed contents made plausible (valid attributes) most of the time.
    fn payload(&mut self, op: u32, room: usize) -> Vec<u8> {
        let sane = !self.input.u8().is_multiple_of(4);
        match op {
            opcode::INIT => self.init_out(sane),
            opcode::LOOKUP | opcode::MKDIR | opcode::SYMLINK | opcode::LINK => self.entry_out(sane),
            opcode::CREATE => {
                let mut p = self.entry_out(sane);
                p.extend_from_slice(self.input.take(16));
                p.resize(ENTRY_LEN + 16, 0);
                p
            }
            opcode::GETATTR | opcode::SETATTR => {
                let mut p = self.input.take(ATTR_OUT_ATTR_AT + ATTR_LEN).to_vec();
                p.resize(ATTR_OUT_ATTR_AT + ATTR_LEN, 0);
                if sane {
                    sanitize_attr(&mut p, ATTR_OUT_ATTR_AT);
                    sanitize_nanos(&mut p, 8);
                }
                p
            }
            opcode::READDIR | opcode::READDIRPLUS => {
                self.dirents(op == opcode::READDIRPLUS, room, sane)
            }
            opcode::READ | opcode::READLINK | opcode::GETXATTR | opcode::LISTXATTR => {
                let n = match self.input.u8() % 4 {
                    0 => room,
                    1 => 0,
                    _ => usize::from(self.input.u16()) % (room + 1),
                };
                let mut p = self.input.take(n).to_vec();
                p.resize(n, b'd');
                // GETXATTR/LISTXATTR with size 0 expect the 8-byte size reply: the
                // driver's writable room says which (a fixed reply has no data buffer).
                if matches!(op, opcode::GETXATTR | opcode::LISTXATTR) && room == 8 {
                    p.truncate(8);
                    p.resize(8, 0);
                }
                p
            }
            _ => {
                // Fixed replies (WRITE 8, STATFS 80, OPEN 16, LSEEK 8) or none: the room
                // the driver gave, filled with input bytes.
                let n = if self.input.u8().is_multiple_of(8) {
                    usize::from(self.input.u8())
                } else {
                    room
                };
                let mut p = self.input.take(n).to_vec();
                p.resize(n, 0);
                p
            }
        }
    }

    fn init_out(&mut self, sane: bool) -> Vec<u8> {
        let mut p = vec![0u8; 64];
        let (major, minor) = if sane {
            (
                wire::FUSE_KERNEL_VERSION,
                27 + u32::from(self.input.u8() % 6),
            )
        } else {
            (self.input.u32(), self.input.u32())
        };
        p[0..4].copy_from_slice(&major.to_le_bytes());
        p[4..8].copy_from_slice(&minor.to_le_bytes());
        // max_readahead, flags, max_background + congestion_threshold, max_write,
        // time_gran, max_pages + map_alignment: whatever the input says.
        for at in [8, 12, 16, 20, 24, 28] {
            let v = self.input.u32();
            p[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        if self.input.u8().is_multiple_of(4) {
            p.truncate(usize::from(self.input.u8() % 64));
        }
        p
    }

    fn entry_out(&mut self, sane: bool) -> Vec<u8> {
        let mut p = self.input.take(ENTRY_LEN).to_vec();
        p.resize(ENTRY_LEN, 0);
        if sane {
            if p[0..8] == [0; 8] {
                p[0] = 2;
            }
            sanitize_nanos(&mut p, 32);
            sanitize_nanos(&mut p, 36);
            sanitize_attr(&mut p, ENTRY_ATTR_AT);
        }
        p
    }

    /// Directory records (`fuse_dirent`, with `fuse_entry_out` before each for
    /// READDIRPLUS) built from the input, within `room` bytes.
    fn dirents(&mut self, plus: bool, room: usize, sane: bool) -> Vec<u8> {
        let mut p = Vec::new();
        for _ in 0..usize::from(self.input.u8() % 16) {
            let mut rec = if plus {
                self.entry_out(sane)
            } else {
                Vec::new()
            };
            let ino = u64::from(self.input.u32());
            let off = match self.input.u8() % 8 {
                0 => 0,
                _ => 1 + u64::from(self.input.u16()),
            };
            let name: Vec<u8> = if sane {
                let n = 1 + usize::from(self.input.u8() % 24);
                (0..n).map(|i| b'a' + (i as u8 % 26)).collect()
            } else {
                let n = usize::from(self.input.u16() % 1100);
                let mut name = self.input.take(n).to_vec();
                name.resize(n, b'z');
                name
            };
            let namelen = if sane {
                name.len() as u32
            } else {
                self.input.u32() % 1200
            };
            rec.extend_from_slice(&ino.to_le_bytes());
            rec.extend_from_slice(&off.to_le_bytes());
            rec.extend_from_slice(&namelen.to_le_bytes());
            rec.extend_from_slice(&u32::from(self.input.u8() % 16).to_le_bytes());
            rec.extend_from_slice(&name);
            let pad = if sane {
                0
            } else {
                usize::from(self.input.u8() % 9)
            };
            rec.resize(
                rec.len().next_multiple_of(8) + pad,
                if sane { 0 } else { 1 },
            );
            if p.len() + rec.len() > room {
                break;
            }
            p.extend_from_slice(&rec);
        }
        p
    }

    /// Completes a notification buffer with a message (a well-formed one with fuzzed
    /// fields, or raw bytes) and any used length.
    fn notify(&mut self, c: &Chain) {
        let code = match self.input.u8() % 8 {
            7 => self.input.u32() as i32,
            k => i32::from(k),
        };
        let body_len = usize::from(self.input.u16() % 96);
        let body = self.input.take(body_len).to_vec();
        let mut m = Vec::new();
        let len = if self.input.u8().is_multiple_of(4) {
            self.input.u32()
        } else {
            (16 + body.len()) as u32
        };
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&code.to_le_bytes());
        let unique = if self.input.u8().is_multiple_of(4) {
            u64::from(self.input.u32())
        } else {
            0
        };
        m.extend_from_slice(&unique.to_le_bytes());
        m.extend_from_slice(&body);
        let written = self.sim.write_chain(c, &m);
        let used = match self.input.u8() % 4 {
            0 => self.input.u32() % (c.writable_len() + 32),
            _ => written,
        };
        self.sim.complete(1, c.head, used);
    }

    /// Feeds the interrupts the function raised to the driver.
    fn interrupts(&mut self, fs: &mut Fs) -> FsResult<()> {
        for irq in self.sim.take_interrupts() {
            let vector = match irq {
                SimInterrupt::Msix(v) => Some(v),
                SimInterrupt::Intx => None,
            };
            fs.handle_interrupt(vector)?;
        }
        Ok(())
    }
}

/// The blocking calls' waits: the fuzzer answers (or not), then interrupts are taken.
impl Waiter<Device> for Server<'_> {
    fn wait(&mut self, fs: &mut Fs) -> FsResult<()> {
        match self.input.u8() % 4 {
            0 => self.release_held(),
            1 => {}
            _ => self.serve_all(),
        }
        self.interrupts(fs)?;
        if self.input.u8().is_multiple_of(2) {
            fs.poll()?;
        }
        Ok(())
    }
}

/// Makes the attribute at `at` plausible: nanoseconds below 10⁹, a file type, a size
/// within `i64`. Fields beyond `p` are left alone.
fn sanitize_attr(p: &mut [u8], at: usize) {
    for nanos in [48, 52, 56] {
        sanitize_nanos(p, at + nanos);
    }
    update_u32(p, at + 60, |mode| {
        (mode & 0o7777) | FILE_TYPES[(mode >> 16) as usize % FILE_TYPES.len()]
    });
    if let Some(top) = p.get_mut(at + 15) {
        *top &= 0x7f;
    }
}

fn sanitize_nanos(p: &mut [u8], at: usize) {
    update_u32(p, at, |v| v % 1_000_000_000);
}

/// Rewrites the little-endian `u32` at `at` with `f`, if it lies inside `p`.
fn update_u32(p: &mut [u8], at: usize, f: impl FnOnce(u32) -> u32) {
    if let Some(field) = p.get_mut(at..at + 4) {
        let v = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
        field.copy_from_slice(&f(v).to_le_bytes());
    }
}

fn check_time(t: Timespec) {
    assert!(t.nanos < 1_000_000_000, "nanoseconds {} passed", t.nanos);
}

fn check_entry(e: &Entry) {
    for t in [
        e.entry_valid,
        e.attr_valid,
        e.attr.atime,
        e.attr.mtime,
        e.attr.ctime,
    ] {
        check_time(t);
    }
}

/// The walker's records hold what `validate_dir` promises.
fn check_dir(bytes: &[u8], plus: bool) {
    let Ok((records, count)) = DirIter::new(bytes, plus) else {
        return;
    };
    let mut seen = 0;
    for r in records {
        assert!(
            (1..=1024).contains(&r.name.len()),
            "a {}-byte name",
            r.name.len()
        );
        assert!(
            !r.name.contains(&b'/') && !r.name.contains(&0),
            "a name with / or NUL"
        );
        assert_ne!(r.offset, 0, "a record continuing at offset 0");
        if let Some(e) = &r.entry {
            check_entry(e);
        }
        seen += 1;
    }
    assert_eq!(seen, count, "the walker and the count disagree");
}

/// A request of the kind the input picks.
fn request<'a>(
    input: &mut Input<'_>,
    data: &'a [u8],
    chunk: u32,
) -> (Request<'a>, u32, Option<bool>) {
    let node = NodeId(match input.u8() % 4 {
        0 => u64::from(input.u32()),
        _ => 1 + u64::from(input.u8() % 4),
    });
    let fh = FileHandle(u64::from(input.u8()));
    let name = NAMES[usize::from(input.u8()) % NAMES.len()];
    let size = match input.u8() % 4 {
        0 => input.u32(),
        1 => 0,
        _ => u32::from(input.u16()) % (chunk + 1),
    };
    match input.u8() % 31 {
        0 => (Request::Lookup { parent: node, name }, 0, None),
        1 => (
            Request::Getattr {
                node,
                fh: Some(fh).filter(|_| input.bool()),
            },
            0,
            None,
        ),
        2 => (
            Request::Open {
                node,
                flags: input.u32(),
            },
            0,
            None,
        ),
        3 => (Request::Opendir { node, flags: 0 }, 0, None),
        4 | 5 => (
            Request::Read {
                node,
                fh,
                offset: u64::from(input.u32()),
                size,
            },
            size,
            None,
        ),
        6 => {
            let n = usize::from(input.u16()) % (data.len() + 1);
            (
                Request::Write {
                    node,
                    fh,
                    offset: u64::from(input.u32()),
                    data: &data[..n],
                },
                0,
                None,
            )
        }
        7 | 8 => {
            let plus = input.bool();
            (
                Request::Readdir {
                    node,
                    fh,
                    offset: u64::from(input.u16()),
                    size,
                    plus,
                },
                size,
                Some(plus),
            )
        }
        9 => (
            Request::Create {
                parent: node,
                name,
                flags: input.u32(),
                mode: 0o644,
                umask: 0o022,
            },
            0,
            None,
        ),
        10 => (
            Request::Mkdir {
                parent: node,
                name,
                mode: 0o755,
                umask: 0,
            },
            0,
            None,
        ),
        11 => (Request::Unlink { parent: node, name }, 0, None),
        12 => (
            Request::Rename {
                old_parent: node,
                old_name: name,
                new_parent: NodeId(1),
                new_name: b"b",
                flags: input.u32() & 7,
            },
            0,
            None,
        ),
        13 => (
            Request::Symlink {
                parent: node,
                name,
                target: b"target",
            },
            0,
            None,
        ),
        14 => (Request::Readlink { node }, chunk, None),
        15 => (Request::Statfs { node }, 0, None),
        16 => (
            Request::Getxattr {
                node,
                name: b"user.x",
                size,
            },
            size,
            None,
        ),
        17 => (Request::Listxattr { node, size }, size, None),
        18 => (
            Request::Lseek {
                node,
                fh,
                offset: u64::from(input.u32()),
                whence: input.u32() % 6,
            },
            0,
            None,
        ),
        19 => (
            Request::Link {
                node,
                new_parent: NodeId(1),
                new_name: name,
            },
            0,
            None,
        ),
        20 => (Request::Release { node, fh, flags: 0 }, 0, None),
        21 => (Request::Destroy, 0, None),
        22 => {
            let set = SetAttr {
                mode: input.bool().then(|| input.u32() & 0o7777),
                size: input.bool().then(|| u64::from(input.u32())),
                mtime: input.bool().then_some(SetTime::Now),
                fh: input.bool().then_some(fh),
                ..SetAttr::default()
            };
            (Request::Setattr { node, set }, 0, None)
        }
        23 => (Request::Releasedir { node, fh }, 0, None),
        24 => (Request::Rmdir { parent: node, name }, 0, None),
        25 => (
            Request::Fsync {
                node,
                fh,
                datasync: input.bool(),
            },
            0,
            None,
        ),
        26 => (
            Request::Fsyncdir {
                node,
                fh,
                datasync: input.bool(),
            },
            0,
            None,
        ),
        27 => (
            Request::Flush {
                node,
                fh,
                lock_owner: u64::from(input.u32()),
            },
            0,
            None,
        ),
        28 => {
            let n = usize::from(input.u16()) % (data.len() + 1);
            (
                Request::Setxattr {
                    node,
                    name: b"user.x",
                    value: &data[..n],
                    flags: input.u32() & 3,
                },
                0,
                None,
            )
        }
        29 => (
            Request::Removexattr {
                node,
                name: b"user.x",
            },
            0,
            None,
        ),
        _ => (
            Request::Fallocate {
                node,
                fh,
                offset: u64::from(input.u32()),
                length: u64::from(input.u32()),
                mode: input.u32() & 3,
            },
            0,
            None,
        ),
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    // The device is modern-only (§5.11: no legacy interface).
    let (mode, preference) = MODES[usize::from(input.u8() % 2)];
    debug_assert!(mode != SimMode::Legacy);
    let notification = input.u8().is_multiple_of(4);
    let ring = input.u8();
    let features = VERSION_1
        | (u64::from(ring & 3) << 28)
        | crate::packed_if(ring & 4 != 0)
        | if notification { F_NOTIFICATION } else { 0 };
    let queue_size = 1u16 << (input.u8() % 7);
    let num_request_queues = match input.u8() % 8 {
        0 => input.u32(),
        1 => 2,
        _ => 1,
    };
    let mut config = vec![0u8; 44];
    match input.u8() % 8 {
        0 => config[..36].copy_from_slice(&{
            let mut t = [0u8; 36];
            let raw = input.take(36);
            t[..raw.len()].copy_from_slice(raw);
            t
        }),
        _ => config[..4].copy_from_slice(b"fuzz"),
    }
    config[36..40].copy_from_slice(&num_request_queues.to_le_bytes());
    let notify_buf_size = match input.u8() % 4 {
        0 => input.u32(),
        _ => 256,
    };
    config[40..44].copy_from_slice(&notify_buf_size.to_le_bytes());
    // hiprio, the notification queue when offered, and the request queues (at most 2 in
    // the function; a larger `num_request_queues` is the device lying).
    let queues = 1 + u16::from(notification) + num_request_queues.clamp(1, 2) as u16;
    let options = FsOptions {
        queue_size: 0,
        slots: 1 + u16::from(input.u8() % 16),
        data_size: 4096 * (1 + u32::from(input.u8() % 4)),
        max_request_queues: 1 + u16::from(input.u8() % 2),
        interrupts: input.bool(),
        max_waits: 1 + u32::from(input.u8() % 16),
        notify_buffers: u16::from(input.u8() % 5),
        ..FsOptions::default()
    };
    let sim = SimBuilder::new(mode, DeviceType::Fs.id())
        .features(features)
        .queues(&vec![queue_size; usize::from(queues)])
        .device_config(&config)
        .memory(crate::mem::guest_memory(8 << 20))
        .build();
    let mem = sim.memory();
    let free_at_start = mem.free_bytes();
    let Some(device) = crate::sim_device(&sim, preference) else {
        return;
    };
    let Ok(mut fs) = FsDriver::new(device, options) else {
        crate::assert_setup_freed(&mem, free_at_start);
        return;
    };
    let mut server = Server {
        input,
        sim,
        queues,
        // Offered is not negotiated: without notification buffers (`notify_buffers` 0)
        // the driver refuses NOTIFICATION, and queue 1 is then a request queue.
        notification: fs.has_notifications(),
        held: Vec::new(),
        answered: Vec::new(),
    };
    let _ = fs.init(&mut server);

    let chunk = fs.read_chunk();
    let write_data = vec![0x5a; fs.write_chunk() as usize];
    // At most one reply per slot in flight: a further used element is a lie that breaks
    // the queue, so the poll fails rather than counts it.
    let per_poll = usize::from(options.slots) * fs.request_queues().max(1);
    let mut pending: Vec<Pending> = Vec::new();
    let mut taken: Vec<Ticket> = Vec::new();
    let mut out = vec![0u8; 1 << 20];

    for _ in 0..MAX_STEPS {
        if server.input.is_empty() {
            break;
        }
        match server.input.u8() % 16 {
            0..=3 => {
                let (req, max_data, dir) = request(&mut server.input, &write_data, chunk);
                if let Ok(ticket) = fs.submit(&req) {
                    pending.push(Pending {
                        ticket,
                        max_data,
                        dir,
                    });
                }
            }
            4 => {
                let _ = fs.kick();
            }
            5 | 6 => server.serve_all(),
            7 => server.release_held(),
            8 => {
                // A forged or repeated used element on a request queue.
                let q = server.first_request_queue();
                if server.sim.queue_info(q).is_some_and(|i| i.ready) {
                    let id = match server.input.u8() % 2 {
                        0 => server.input.u32(),
                        _ => u32::from(server.input.u8() % 32),
                    };
                    let len = server.input.u32() % 70_000;
                    server.sim.complete_raw(q, id, len);
                    server.sim.signal_used(q);
                }
            }
            9 => {
                if let Ok(n) = fs.poll() {
                    assert!(n <= per_poll, "one poll collected {n} replies");
                }
            }
            10 | 11 => {
                if pending.is_empty() {
                    continue;
                }
                let i = server.input.u16() as usize % pending.len();
                let p = pending[i];
                let room = match server.input.u8() % 4 {
                    0 => usize::from(server.input.u16()),
                    _ => out.len(),
                };
                let result = fs.take(p.ticket, &mut out[..room]);
                if let Ok(Reply::Data(n)) = result {
                    assert!(
                        n <= p.max_data,
                        "a data reply of {n} bytes for a request of {}",
                        p.max_data
                    );
                    assert!(n as usize <= room, "take copied past the caller's buffer");
                    if let Some(plus) = p.dir {
                        check_dir(&out[..n as usize], plus);
                    }
                }
                match result {
                    Ok(Reply::Entry(e)) | Ok(Reply::Created(e, _)) => check_entry(&e),
                    Ok(Reply::Attr(a)) => {
                        check_time(a.attr_valid);
                        for t in [a.attr.atime, a.attr.mtime, a.attr.ctime] {
                            check_time(t);
                        }
                    }
                    _ => {}
                }
                if !matches!(result, Err(FsError::UnknownTicket)) {
                    // Taken (a result, or an error other than "not done"): never again.
                    pending.swap_remove(i);
                    taken.push(p.ticket);
                    assert!(!fs.is_done(p.ticket), "a taken result is still done");
                }
            }
            12 => {
                // Taken tickets stay taken, whatever reused their slots.
                for &t in &taken {
                    assert!(
                        matches!(fs.take(t, &mut out), Err(FsError::UnknownTicket)),
                        "a ticket's result was taken twice"
                    );
                }
                if taken.len() > 64 {
                    taken.drain(..32);
                }
                if !pending.is_empty() && server.input.bool() {
                    let i = server.input.u16() as usize % pending.len();
                    fs.abandon(pending.swap_remove(i).ticket);
                }
            }
            13 => {
                let _ = server.interrupts(&mut fs);
                let _ = fs.enable_interrupts();
                let bound = usize::from(options.notify_buffers) + 1;
                for _ in 0..bound {
                    if fs.take_notification().is_none() {
                        break;
                    }
                }
            }
            14 => match server.input.u8() % 9 {
                0 => {
                    let n = usize::from(server.input.u16() % 16384);
                    let mut buf = vec![0u8; n];
                    if let Ok(got) = fs.read(&mut server, NodeId(2), FileHandle(1), 0, &mut buf) {
                        assert!(got <= n, "read returned {got} bytes into {n}");
                    }
                }
                1 => {
                    let plus = server.input.bool();
                    let mut buf = vec![0u8; 512 + usize::from(server.input.u16() % 8192)];
                    let _ =
                        fs.read_dir(&mut server, NodeId(1), FileHandle(1), plus, &mut buf, |r| {
                            assert!((1..=1024).contains(&r.name.len()));
                            assert_ne!(r.offset, 0);
                        });
                }
                2 => {
                    if let Ok(e) = fs.lookup(&mut server, NodeId(1), b"a") {
                        check_entry(&e);
                    }
                }
                3 => {
                    // The device rewrites a buffer it already returned.
                    if !server.answered.is_empty() {
                        let i = server.input.u8() as usize % server.answered.len();
                        let c = server.answered[i].clone();
                        let n = usize::from(server.input.u16()) % (c.writable_len() as usize + 1);
                        let bytes = server.input.take(n).to_vec();
                        server.sim.write_chain(&c, &bytes);
                    }
                }
                4 => {
                    let _ = fs.statfs(&mut server, NodeId(1));
                }
                5 => {
                    // The pipelined WRITE: a reply claiming more than a chunk carried is
                    // the device's error.
                    let n = usize::from(server.input.u16()) % (4 * write_data.len() + 1);
                    let data = vec![0x3c; n];
                    if let Ok(done) = fs.write(&mut server, NodeId(2), FileHandle(1), 0, &data) {
                        assert!(done <= n, "write reported {done} bytes of {n}");
                    }
                }
                6 => {
                    if let Ok(a) = fs.getattr(&mut server, NodeId(2), None) {
                        check_time(a.attr_valid);
                    }
                }
                7 => {
                    let _ = fs.open(&mut server, NodeId(2), 0);
                }
                _ => {
                    // FORGET (one node) or BATCH_FORGET on hiprio, which the device
                    // completes with any length.
                    let n = 1 + usize::from(server.input.u8() % 4);
                    let nodes: Vec<(NodeId, u64)> = (0..n)
                        .map(|i| (NodeId(2 + i as u64), 1 + u64::from(server.input.u8())))
                        .collect();
                    let _ = fs.forget(&mut server, &nodes);
                }
            },
            _ => server.sim.trigger_needs_reset(),
        }
    }

    fs.shutdown();
    drop(fs);
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}
