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
//! `lookup`, `getattr`, `open` (with O_TRUNC and the access modes), `statfs`, `forget`,
//! `destroy` and `init` through a waiter the fuzzer answers.
//!
//! Oracles: every reply's fate is predicted from what the server wrote, independently of
//! the driver's decoders — a wrong `unique`, a header length other than the used length, a
//! used length below the header, an error outside -511..=-1 or with a payload are protocol
//! errors; an in-range errno is that errno; READ/READLINK/xattr data is exactly the bytes
//! written; a READDIR(PLUS) reply the server built well-formed yields exactly its records
//! (`.`/`..` and node id 0 without an entry) and one breaking a rule (offset 0, the root
//! as a node) is refused; a WRITE reply claims no more than was sent — and `take` or the
//! blocking call must return just that. Blocking `read` returns the bytes the server wrote
//! up to the first short chunk, `write` the bytes up to the first short one, `read_dir`
//! the records of its replies in order. Lookup references are counted: those handed out
//! in every reply the driver could read (entries, READDIRPLUS records) against the FORGET
//! and BATCH_FORGET elements parsed on hiprio — never more forgotten than handed out, and
//! at the end (the held chains answered, the harness's references forgotten) every one
//! returned, none lost. A result is taken at most once (also after its slot is reused);
//! one `poll` collects at most one reply per slot and queue; the blocking calls return
//! within their wait bound (a hang is a libFuzzer timeout); at the end every slot is free
//! and every notification buffer posted again; after `shutdown` and drop, guest memory is
//! back to what it was. Open handles are counted too: the RELEASE/RELEASEDIRs the driver
//! sends on its own name only handles OPEN, OPENDIR or CREATE replies it could read gave
//! it, no more often than given. Both are counted per FUSE session (each INIT, and each
//! DESTROY of `destroy`, starts one; `destroy` and `init` run again in some inputs): a
//! FORGET or RELEASE names what its own session handed out, and at the end only the
//! current session's references must all be back. Oracles that follow replies stop after
//! a lie that hides them (a forged or repeated used element, a used length beyond the
//! chain, NEEDS_RESET, a returned buffer rewritten; a DESTROY the harness submitted
//! itself ends the counting).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use virtio_core::DeviceType;
use virtio_fs::wire::{self, opcode};

use virtio_fs::{
    DirIter, Entry, FileHandle, FsDriver, FsError, FsOptions, FsResult, NodeId, Reply, Request,
    SetAttr, SetTime, Ticket, Timespec, Waiter, open_flags,
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
    /// READDIR (`Some(false)`) or READDIRPLUS (`Some(true)`).
    dir: Option<bool>,
    /// The harness's session ([`Harness`]) it was submitted in: what a result of an
    /// earlier session hands out the device dropped, so the harness does not hold it.
    session: u32,
}

/// What the driver must make of one reply, predicted from the bytes the server wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// The header breaks a rule: a protocol error whatever follows.
    Protocol,
    /// A header-only reply with an errno in -511..=-1.
    Errno(u32),
    /// Data of exactly these bytes (READ, READLINK, GETXATTR/LISTXATTR with a size).
    Data(Vec<u8>),
    /// READDIR(PLUS) built by the server: its records, or `None` when one of them breaks
    /// a rule (the reply is refused).
    Dir(Option<Vec<DirRec>>),
    /// WRITE claiming this many bytes, no more than were sent.
    Written(u32),
}

/// One directory record as the server built it, as the walker must yield it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DirRec {
    name: Vec<u8>,
    off: u64,
    ino: u64,
    /// READDIRPLUS: the node of its entry (none for node id 0, `.` and `..`).
    node: Option<u64>,
}

/// A READ, WRITE or READDIR(PLUS) the server answered, for the blocking calls' oracles.
#[derive(Clone, Debug)]
struct Answer {
    unique: u64,
    op: u32,
    /// The request's offset and size (WRITE: bytes sent).
    offset: u64,
    size: u32,
    expect: Option<Expect>,
}

/// The nodes a READDIRPLUS payload hands out a lookup reference of, by the FUSE rules
/// (fuse_lowlevel.h readdirplus): records followed while their name length is 1..=1024
/// and within the payload; node ids 0 and 1 and the names `.` and `..` hand out none.
fn dirplus_nodes(payload: &[u8]) -> Vec<u64> {
    let mut nodes = Vec::new();
    let mut at = 0;
    while at + 152 <= payload.len() {
        let node = le(&payload[at..at + 8]);
        let namelen = le(&payload[at + 144..at + 148]) as usize;
        if namelen == 0 || namelen > 1024 || at + 152 + namelen > payload.len() {
            break;
        }
        let name = &payload[at + 152..at + 152 + namelen];
        if node > 1 && name != b"." && name != b".." {
            nodes.push(node);
        }
        at = (at + 152 + namelen).next_multiple_of(8);
    }
    nodes
}

/// A little-endian number of up to 8 bytes.
fn le(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(v)
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
    /// Answer every request truthfully and at once (the end of a run), and INIT when
    /// `honest_init` (most inputs: so the step loop runs initialised).
    honest: bool,
    honest_init: bool,
    /// The rings carry no lie (forged or repeated used elements, used lengths beyond a
    /// chain, NEEDS_RESET): the end state is checked.
    ring_honest: bool,
    /// The driver sees the replies as written (no lie above, no returned buffer
    /// rewritten): the predicted verdicts hold.
    faithful: bool,
    /// Lookup references and open handles are counted (faithful, and no DESTROY the
    /// harness submitted itself dropped them).
    counting: bool,
    verdicts: HashMap<u64, Expect>,
    /// Where FUSE sessions start: the `unique` of every INIT and of every DESTROY the
    /// driver's `destroy` sent (the harness's own DESTROYs, `raw_destroys`, stop the
    /// counting instead). A request belongs to the session of the greatest start not
    /// above its `unique`.
    starts: BTreeSet<u64>,
    raw_destroys: BTreeSet<u64>,
    /// RELEASE/RELEASEDIRs the harness submitted itself (any handle it likes).
    raw_releases: BTreeSet<u64>,
    /// Lookup references per (request `unique`, node): handed out in replies the driver
    /// could read, and returned in FORGET/BATCH_FORGET. Kept by `unique`, and put in
    /// sessions when checked: a session's start may be read after requests that follow
    /// it (a device answers in any order).
    given: BTreeMap<(u64, u64), u64>,
    forgotten: BTreeMap<(u64, u64), u64>,
    /// Open handles per (request `unique`, fh): handed out in OPEN, OPENDIR and CREATE
    /// replies the driver could read, and released by the driver's own
    /// RELEASE/RELEASEDIRs.
    handles: BTreeMap<(u64, u64), u64>,
    released: BTreeMap<(u64, u64), u64>,
    /// READ, WRITE, READDIR(PLUS), LOOKUP, GETATTR, STATFS answers since the harness last
    /// cleared them.
    answers: Vec<Answer>,
    /// The harness's session: advanced when it calls `destroy` (results of requests
    /// submitted before are not held).
    harness_session: u32,
    /// The last `destroy` was followed by a successful `init` (or there was none): what
    /// the session hands out must all come back by the end.
    session_open: bool,
}

impl Server<'_> {
    /// The session of request `unique` (by the starts read so far: one not read yet
    /// merges two sessions, which can hide a wrong FORGET or RELEASE but not invent one;
    /// `finish` checks again with every start read).
    fn session(&self, unique: u64) -> u64 {
        self.starts
            .range(..=unique)
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// How many of `events` (by (unique, key)) fall in `session` for `key`.
    fn in_session(&self, events: &BTreeMap<(u64, u64), u64>, session: u64, key: u64) -> u64 {
        events
            .iter()
            .filter(|&(&(u, k), _)| k == key && self.session(u) == session)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Per session: no node forgotten more often than handed out, no handle released
    /// more often than handed out.
    fn check_counts(&self) {
        for &(u, node) in self.forgotten.keys() {
            let session = self.session(u);
            let f = self.in_session(&self.forgotten, session, node);
            let given = self.in_session(&self.given, session, node);
            assert!(
                f <= given,
                "node {node}: {f} lookups forgotten, {given} handed out in session {session}"
            );
        }
        for &(u, fh) in self.released.keys() {
            let session = self.session(u);
            let r = self.in_session(&self.released, session, fh);
            let given = self.in_session(&self.handles, session, fh);
            assert!(
                r <= given,
                "fh {fh} of session {session}: released {r} times, handed out {given}"
            );
        }
    }

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
                    self.forgets(&c);
                    // hiprio: FORGET / BATCH_FORGET have no reply; any used length.
                    let len = match self.input.u8() % 4 {
                        0 if !self.honest => self.input.u32() % (c.writable_len() + 2),
                        _ => 0,
                    };
                    if len > c.writable_len() {
                        self.lie();
                    }
                    self.sim.complete(q, c.head, len);
                } else if (self.notification && q == 1)
                    || (!self.honest && self.input.u8().is_multiple_of(8))
                {
                    // Notification buffers wait for a notification; requests now and then.
                    self.held.push((q, c));
                } else {
                    self.answer(q, &c);
                }
            }
            self.sim.signal_used(q);
        }
    }

    /// The rings lie from now on: the end state and the verdicts are not checked.
    fn lie(&mut self) {
        self.ring_honest = false;
        self.faithful = false;
        self.counting = false;
    }

    /// Counts the lookups a FORGET or BATCH_FORGET returns: never more than were handed
    /// out for a node.
    fn forgets(&mut self, c: &Chain) {
        let req = self.sim.read_chain(c);
        let word = |at: usize, n: usize| req.get(at..at + n).map_or(0, le);
        let unique = word(8, 8);
        let mut returned = Vec::new();
        match word(4, 4) as u32 {
            opcode::FORGET => returned.push((word(16, 8), word(40, 8))),
            opcode::BATCH_FORGET => {
                let count = word(40, 4) as usize;
                assert_eq!(48 + 16 * count, req.len(), "BATCH_FORGET count and length");
                for i in 0..count {
                    returned.push((word(48 + 16 * i, 8), word(56 + 16 * i, 8)));
                }
            }
            other => panic!("opcode {other} on hiprio"),
        }
        for (node, n) in returned {
            assert!(node > 1, "FORGET of node {node}");
            assert!(n > 0, "FORGET of no lookups");
            *self.forgotten.entry((unique, node)).or_default() += n;
        }
        if self.counting {
            self.check_counts();
        }
    }

    /// Answers every held chain (the end of a run).
    fn release_all(&mut self) {
        while let Some((q, c)) = self.held.pop() {
            if self.notification && q == 1 {
                self.notify(&c);
            } else {
                self.answer(q, &c);
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
        let word = |at: usize, n: usize| request.get(at..at + n).map_or(0, le);
        let op = word(4, 4) as u32;
        let asked_unique = word(8, 8);
        match op {
            opcode::INIT => {
                self.starts.insert(asked_unique);
            }
            opcode::DESTROY if !self.raw_destroys.contains(&asked_unique) => {
                // The driver's `destroy`: the session ends here.
                self.starts.insert(asked_unique);
            }
            opcode::RELEASE | opcode::RELEASEDIR if !self.raw_releases.contains(&asked_unique) => {
                // The driver gives back a handle nobody held: one it was given, in this
                // session, no more often than given.
                *self
                    .released
                    .entry((asked_unique, word(40, 8)))
                    .or_default() += 1;
                if self.counting {
                    self.check_counts();
                }
            }
            _ => {}
        }
        // READ, READDIR, WRITE: fh, offset, size after the 40-byte header.
        let (offset, size) = (word(48, 8), word(56, 4) as u32);
        let honest = self.honest || (op == opcode::INIT && self.honest_init);
        let mut unique = asked_unique;
        let cap = c.writable_len() as usize;
        let room = cap.saturating_sub(OUT_HEADER);
        let mut error = 0i32;
        let mut built = None;
        let payload: Vec<u8> = match if honest { 0 } else { self.input.u8() % 10 } {
            0..=5 => {
                let (p, dir) = self.payload(op, room, honest);
                built = dir;
                p
            }
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
                self.payload(op, room, false).0
            }
            _ => {
                let n = usize::from(self.input.u16()) % (cap + 8);
                self.input.take(n).to_vec()
            }
        };
        let mut len = (OUT_HEADER + payload.len()) as u32;
        if !honest && self.input.u8().is_multiple_of(8) {
            len = self.input.u32() % (cap as u32 + 32);
        }
        let mut reply = Vec::with_capacity(OUT_HEADER + payload.len());
        reply.extend_from_slice(&len.to_le_bytes());
        reply.extend_from_slice(&error.to_le_bytes());
        reply.extend_from_slice(&unique.to_le_bytes());
        reply.extend_from_slice(&payload);
        let written = self.sim.write_chain(c, &reply);
        if written as usize != reply.len() {
            // Cut by the chain: not the records as built.
            built = None;
        }
        let used = match if honest { 2 } else { self.input.u8() % 8 } {
            0 => self.input.u32() % (cap as u32 + 32),
            1 => 0,
            _ => written,
        };
        if used as usize > cap {
            // The bus refuses it: the request never completes.
            self.lie();
        }
        self.sim.complete(q, c.head, used);
        if self.answered.len() == 8 {
            self.answered.remove(0);
        }
        self.answered.push(c.clone());
        if op == opcode::DESTROY && self.raw_destroys.contains(&asked_unique) {
            // The device drops every reference with the session, and the driver does
            // not know (only its `destroy` ends a session).
            self.counting = false;
        }
        // What the driver reads: the writable part as it is now, up to the used length
        // (beyond what was written, older bytes).
        let seen = writable_bytes(&self.sim, c);
        let seen = &seen[..(used as usize).min(seen.len())];
        if used as usize != reply.len() {
            // Not the records as built.
            built = None;
        }
        // READ and READLINK answer into the data buffer, GETXATTR/LISTXATTR when asked
        // for a size (else the 8-byte size reply).
        let data_reply = match op {
            opcode::READ | opcode::READLINK => true,
            opcode::GETXATTR | opcode::LISTXATTR => word(40, 4) != 0,
            _ => false,
        };
        let shape = Shape {
            data: data_reply,
            sent: size,
        };
        let expect = verdict(op, asked_unique, cap, seen, used, built, shape);
        if self.faithful {
            self.count_given(op, asked_unique, seen, used, cap);
            if let Some(e) = &expect {
                self.verdicts.insert(asked_unique, e.clone());
            }
            if matches!(
                op,
                opcode::READ
                    | opcode::WRITE
                    | opcode::READDIR
                    | opcode::READDIRPLUS
                    | opcode::LOOKUP
                    | opcode::GETATTR
                    | opcode::STATFS
            ) {
                self.answers.push(Answer {
                    unique: asked_unique,
                    op,
                    offset,
                    size,
                    expect,
                });
            }
        }
    }

    /// Counts the lookup references a reply the driver can read hands out: an entry of
    /// the right length naming a node other than 0 and the root, each READDIRPLUS record's.
    fn count_given(&mut self, op: u32, unique: u64, reply: &[u8], used: u32, cap: usize) {
        let used = used as usize;
        let header_ok = used >= OUT_HEADER
            && used <= cap
            && reply.len() >= used
            && le(&reply[0..4]) as usize == used
            && le(&reply[4..8]) == 0
            && le(&reply[8..16]) == unique;
        if !header_ok {
            return;
        }
        let payload = &reply[OUT_HEADER..used];
        let nodes = match op {
            opcode::LOOKUP | opcode::MKDIR | opcode::SYMLINK | opcode::LINK
                if payload.len() == ENTRY_LEN =>
            {
                vec![le(&payload[..8])]
            }
            opcode::CREATE if payload.len() == ENTRY_LEN + 16 => vec![le(&payload[..8])],
            opcode::READDIRPLUS => dirplus_nodes(payload),
            _ => Vec::new(),
        };
        for node in nodes.into_iter().filter(|&n| n > 1) {
            *self.given.entry((unique, node)).or_default() += 1;
        }
        let fh = match op {
            opcode::OPEN | opcode::OPENDIR if payload.len() == 16 => Some(le(&payload[..8])),
            opcode::CREATE if payload.len() == ENTRY_LEN + 16 => {
                Some(le(&payload[ENTRY_LEN..ENTRY_LEN + 8]))
            }
            _ => None,
        };
        if let Some(fh) = fh {
            *self.handles.entry((unique, fh)).or_default() += 1;
        }
    }

    /// A reply payload for opcode `op` in at most `room` bytes: the structure the opcode
    /// expects, with fuzzed contents made plausible (valid attributes) most of the time
    /// (always when `honest`). READDIR(PLUS) comes with its records as built (`None`
    /// inside when not sane: not predicted).
    fn payload(
        &mut self,
        op: u32,
        room: usize,
        honest: bool,
    ) -> (Vec<u8>, Option<Option<Vec<DirRec>>>) {
        let sane = !self.input.u8().is_multiple_of(4) || honest;
        let p = match op {
            opcode::INIT => self.init_out(sane, honest),
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
                let (p, built) = self.dirents(op == opcode::READDIRPLUS, room, sane);
                return (p, built);
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
        };
        (p, None)
    }

    fn init_out(&mut self, sane: bool, honest: bool) -> Vec<u8> {
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
        if !honest && self.input.u8().is_multiple_of(4) {
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
            // The root (node 1) only with generation 0, as Linux insists.
            if le(&p[0..8]) == 1 {
                p[8..16].fill(0);
            }
            sanitize_nanos(&mut p, 32);
            sanitize_nanos(&mut p, 36);
            sanitize_attr(&mut p, ENTRY_ATTR_AT);
        }
        p
    }

    /// Directory records (`fuse_dirent`, with `fuse_entry_out` before each for
    /// READDIRPLUS) built from the input, within `room` bytes. When `sane`, also the
    /// records as the walker must yield them, or `None` inside when one breaks a rule the
    /// driver enforces (continuation offset 0; READDIRPLUS: the root's node id for a name
    /// other than `.` and `..`).
    fn dirents(
        &mut self,
        plus: bool,
        room: usize,
        sane: bool,
    ) -> (Vec<u8>, Option<Option<Vec<DirRec>>>) {
        let mut p = Vec::new();
        let mut recs = Vec::new();
        let mut valid = true;
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
                match self.input.u8() % 16 {
                    0 => b".".to_vec(),
                    1 => b"..".to_vec(),
                    k => (0..1 + k % 24).map(|i| b'a' + (i % 26)).collect(),
                }
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
            let dot = name == b"." || name == b"..";
            let node = if plus { le(&rec[..8]) } else { 0 };
            valid &= off != 0 && (dot || node != 1);
            recs.push(DirRec {
                name,
                off,
                ino,
                node: Some(node).filter(|&n| n != 0 && !dot),
            });
            p.extend_from_slice(&rec);
        }
        let built = sane.then(|| valid.then_some(recs));
        (p, built)
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
            0 if !self.honest => self.input.u32() % (c.writable_len() + 32),
            _ => written,
        };
        if used > c.writable_len() {
            self.lie();
        }
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
        match if self.honest { 2 } else { self.input.u8() % 4 } {
            0 => self.release_held(),
            1 => {}
            _ => self.serve_all(),
        }
        self.interrupts(fs)?;
        if self.honest || self.input.u8().is_multiple_of(2) {
            fs.poll()?;
        }
        Ok(())
    }
}

/// The bytes of a chain's device-writable part, as they are in guest memory now.
fn writable_bytes(sim: &Sim, c: &Chain) -> Vec<u8> {
    let mut flipped = c.clone();
    for d in &mut flipped.descs {
        d.write_only = !d.write_only;
    }
    sim.read_chain(&flipped)
}

/// What the request said of its reply.
#[derive(Copy, Clone)]
struct Shape {
    /// The reply's payload is data (READ, READLINK, GETXATTR/LISTXATTR with a size).
    data: bool,
    /// WRITE: the bytes sent.
    sent: u32,
}

/// What the driver must make of the reply `reply` (the chain's writable bytes up to the
/// used length, as the driver reads them) completed with `used` bytes, for request `unique` of opcode `op` whose writable part
/// holds `cap` bytes; `None` where it depends on payload rules not modelled here.
fn verdict(
    op: u32,
    unique: u64,
    cap: usize,
    reply: &[u8],
    used: u32,
    built: Option<Option<Vec<DirRec>>>,
    shape: Shape,
) -> Option<Expect> {
    let used = used as usize;
    if used > cap || (op == opcode::DESTROY && used == 0) {
        return None;
    }
    if used < OUT_HEADER {
        return Some(Expect::Protocol);
    }
    let header = &reply[..OUT_HEADER];
    if le(&header[8..16]) != unique || le(&header[0..4]) as usize != used {
        return Some(Expect::Protocol);
    }
    let error = le(&header[4..8]) as u32 as i32;
    if error != 0 {
        // Linux `fuse_dev_do_write`: error > 0 or <= -512 is refused.
        return Some(if error > 0 || error <= -512 || used != OUT_HEADER {
            Expect::Protocol
        } else {
            Expect::Errno(error.unsigned_abs())
        });
    }
    let payload = reply.get(OUT_HEADER..used)?;
    match op {
        _ if shape.data => Some(Expect::Data(payload.to_vec())),
        opcode::READDIR | opcode::READDIRPLUS => {
            // Only a reply exactly as built is predicted.
            let recs = built?;
            Some(Expect::Dir(recs))
        }
        opcode::WRITE if payload.len() == 8 => {
            let claimed = le(&payload[..4]) as u32;
            Some(if claimed > shape.sent {
                Expect::Protocol
            } else {
                Expect::Written(claimed)
            })
        }
        _ => None,
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

/// The records of a directory reply as the walker yields them.
fn walk(bytes: &[u8], plus: bool) -> Vec<DirRec> {
    let Ok((records, count)) = DirIter::new(bytes, plus) else {
        panic!("a directory reply the driver accepted does not walk");
    };
    let recs: Vec<DirRec> = records
        .map(|r| {
            if let Some(e) = &r.entry {
                check_entry(e);
            }
            DirRec {
                name: r.name.to_vec(),
                off: r.offset,
                ino: r.ino,
                node: r.entry.map(|e| e.node.0),
            }
        })
        .collect();
    assert_eq!(
        recs.len() as u32,
        count,
        "the walker and the count disagree"
    );
    recs
}

/// A result (taken into `out`) against the server's prediction for its reply.
fn check_verdict(expect: &Expect, result: &FsResult<Reply>, out: &[u8], plus: bool) {
    match (expect, result) {
        (Expect::Protocol | Expect::Dir(None), Err(FsError::Protocol { .. })) => {}
        (Expect::Errno(e), Err(FsError::Errno(got))) => assert_eq!(*e, got.0, "errno"),
        (Expect::Data(bytes), Ok(Reply::Data(n))) => {
            assert_eq!(
                &out[..*n as usize],
                &bytes[..],
                "data other than the server wrote"
            )
        }
        (Expect::Dir(Some(recs)), Ok(Reply::Data(n))) => {
            assert_eq!(&walk(&out[..*n as usize], plus), recs, "directory records")
        }
        (Expect::Written(n), Ok(Reply::Written(got))) => assert_eq!(n, got, "WRITE count"),
        (expect, result) => panic!("expected {expect:?}, the driver returned {result:?}"),
    }
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
    let notify_total = fs.notify_buffers();
    let honest_init = !input.u8().is_multiple_of(8);
    let mut server = Server {
        input,
        sim,
        queues,
        // Offered is not negotiated: without notification buffers (`notify_buffers` 0)
        // the driver refuses NOTIFICATION, and queue 1 is then a request queue.
        notification: fs.has_notifications(),
        held: Vec::new(),
        answered: Vec::new(),
        honest: honest_init,
        honest_init,
        ring_honest: true,
        faithful: true,
        counting: true,
        verdicts: HashMap::new(),
        starts: BTreeSet::new(),
        raw_destroys: BTreeSet::new(),
        raw_releases: BTreeSet::new(),
        given: BTreeMap::new(),
        forgotten: BTreeMap::new(),
        handles: BTreeMap::new(),
        released: BTreeMap::new(),
        answers: Vec::new(),
        harness_session: 0,
        session_open: true,
    };
    // Most inputs answer INIT truthfully at once, so the steps run initialised.
    let init = fs.init(&mut server);
    // (A one-entry queue cannot carry INIT's two-descriptor chain.)
    assert!(
        init.is_ok() || !honest_init || queue_size < 2,
        "an honest INIT failed: {init:?}"
    );
    server.honest = false;

    let chunk = fs.read_chunk();
    let write_data = vec![0x5a; fs.write_chunk() as usize];
    // At most one reply per slot in flight: a further used element is a lie that breaks
    // the queue, so the poll fails rather than counts it. Slots per queue are the
    // option within the queue's size (the device gives `queue_size` entries).
    let slots = usize::from(options.slots.clamp(1, queue_size));
    let per_poll = slots * fs.request_queues().max(1);
    let mut pending: Vec<Pending> = Vec::new();
    let mut taken: Vec<Ticket> = Vec::new();
    // Lookup references the harness holds (results taken), forgotten by `forget` steps.
    let mut held_refs: Vec<NodeId> = Vec::new();
    let mut out = vec![0u8; 1 << 20];

    for _ in 0..MAX_STEPS {
        if server.input.is_empty() {
            break;
        }
        match server.input.u8() % 16 {
            0..=3 => {
                let (req, _, dir) = request(&mut server.input, &write_data, chunk);
                if let Ok(ticket) = fs.submit(&req) {
                    match req {
                        Request::Destroy => {
                            server.raw_destroys.insert(ticket.unique());
                        }
                        Request::Release { .. } | Request::Releasedir { .. } => {
                            server.raw_releases.insert(ticket.unique());
                        }
                        _ => {}
                    }
                    pending.push(Pending {
                        ticket,
                        dir,
                        session: server.harness_session,
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
                    server.lie();
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
                let room = match server.input.u8() % 4 {
                    0 => usize::from(server.input.u16()),
                    _ => out.len(),
                };
                take(
                    &mut fs,
                    &mut server,
                    &mut pending,
                    i,
                    &mut out[..room],
                    &mut held_refs,
                    &mut taken,
                );
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
                    let t = pending.swap_remove(i).ticket;
                    server.verdicts.remove(&t.unique());
                    fs.abandon(t);
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
            14 => blocking(&mut fs, &mut server, &write_data, &mut held_refs),
            _ => {
                server.lie();
                server.sim.trigger_needs_reset();
            }
        }
    }

    if server.ring_honest {
        finish(
            &mut fs,
            &mut server,
            &mut pending,
            &mut out,
            &mut held_refs,
            notify_total,
        );
    }
    fs.shutdown();
    drop(fs);
    assert_eq!(mem.free_bytes(), free_at_start, "DMA memory leaked");
}

/// Takes pending request `i` into `out` and checks the result against the server's
/// prediction; a taken entry's reference goes to `held_refs`.
fn take(
    fs: &mut Fs,
    server: &mut Server<'_>,
    pending: &mut Vec<Pending>,
    i: usize,
    out: &mut [u8],
    held_refs: &mut Vec<NodeId>,
    taken: &mut Vec<Ticket>,
) {
    let p = pending[i];
    let result = fs.take(p.ticket, out);
    if matches!(result, Err(FsError::UnknownTicket)) {
        return;
    }
    if result == Err(FsError::InvalidArgument) && fs.is_done(p.ticket) {
        // `out` too short for the data: the result stays to be taken.
        return;
    }
    pending.swap_remove(i);
    taken.push(p.ticket);
    assert!(!fs.is_done(p.ticket), "a taken result is still done");
    if let Some(expect) = server.verdicts.remove(&p.ticket.unique())
        && server.faithful
    {
        check_verdict(&expect, &result, out, p.dir == Some(true));
    }
    // A result of an ended session: the device dropped what it handed out.
    let held_refs = &mut if p.session == server.harness_session {
        Some(held_refs)
    } else {
        None
    };
    match result {
        Ok(Reply::Entry(e)) | Ok(Reply::Created(e, _)) => {
            check_entry(&e);
            hold(held_refs, e.node);
        }
        Ok(Reply::Attr(a)) => {
            check_time(a.attr_valid);
            for t in [a.attr.atime, a.attr.mtime, a.attr.ctime] {
                check_time(t);
            }
        }
        Ok(Reply::Data(n)) if p.dir == Some(true) => {
            // Every READDIRPLUS entry taken holds a reference.
            if let Ok((records, _)) = DirIter::new(&out[..n as usize], true) {
                for node in records.filter_map(|r| r.entry.map(|e| e.node)) {
                    hold(held_refs, node);
                }
            }
        }
        _ => {}
    }
}

/// Keeps a lookup reference a result handed the harness (the root's are not counted:
/// neither the server nor the driver forgets the root).
fn hold(held_refs: &mut Option<&mut Vec<NodeId>>, node: NodeId) {
    if let Some(refs) = held_refs
        && node != NodeId::ROOT
    {
        refs.push(node);
    }
}

/// One blocking call the input picks, with its result checked against what the server
/// answered for its requests (those numbered from `floor` on).
fn blocking(fs: &mut Fs, server: &mut Server<'_>, write_data: &[u8], held_refs: &mut Vec<NodeId>) {
    server.answers.clear();
    let floor = fs.next_unique();
    // References the call hands the harness, held once it returns.
    let mut got: Vec<NodeId> = Vec::new();
    let held = &mut Some(&mut got);
    match server.input.u8() % 10 {
        0 => {
            let n = usize::from(server.input.u16() % 16384);
            let mut buf = vec![0u8; n];
            let result = fs.read(server, NodeId(2), FileHandle(1), 0, &mut buf);
            if let Ok(got) = result {
                check_read(server, floor, &buf, got);
            }
        }
        1 => {
            let plus = server.input.bool();
            let mut buf = vec![0u8; 512 + usize::from(server.input.u16() % 8192)];
            let mut seen = Vec::new();
            let result = fs.read_dir(server, NodeId(1), FileHandle(1), plus, &mut buf, |r| {
                seen.push(DirRec {
                    name: r.name.to_vec(),
                    off: r.offset,
                    ino: r.ino,
                    node: r.entry.map(|e| e.node.0),
                })
            });
            for node in seen.iter().filter_map(|r| r.node) {
                hold(held, NodeId(node));
            }
            if let Ok(count) = result {
                assert_eq!(count, seen.len() as u64);
                check_read_dir(server, floor, &seen);
            }
        }
        2 => {
            let result = fs.lookup(server, NodeId(1), b"a");
            if let Ok(e) = &result {
                check_entry(e);
                hold(held, e.node);
            }
            check_call(server, floor, opcode::LOOKUP, &result.map(Reply::Entry));
        }
        3 => {
            // The device rewrites a buffer it already returned: what the driver reads
            // from it is no longer what the server predicted.
            if !server.answered.is_empty() {
                let i = server.input.u8() as usize % server.answered.len();
                let c = server.answered[i].clone();
                let n = usize::from(server.input.u16()) % (c.writable_len() as usize + 1);
                let bytes = server.input.take(n).to_vec();
                server.faithful = false;
                server.counting = false;
                server.sim.write_chain(&c, &bytes);
            }
        }
        4 => {
            let result = fs.statfs(server, NodeId(1));
            check_call(server, floor, opcode::STATFS, &result.map(Reply::Statfs));
        }
        5 => {
            let n = usize::from(server.input.u16()) % (4 * write_data.len() + 1);
            let data = vec![0x3c; n];
            if let Ok(done) = fs.write(server, NodeId(2), FileHandle(1), 0, &data) {
                check_write(server, floor, n, done);
            }
        }
        6 => {
            let result = fs.getattr(server, NodeId(2), None);
            if let Ok(a) = &result {
                check_time(a.attr_valid);
            }
            check_call(server, floor, opcode::GETATTR, &result.map(Reply::Attr));
        }
        7 => {
            // O_TRUNC is emulated (GETATTR, OPEN, SETATTR by node) unless ATOMIC_O_TRUNC
            // was negotiated; a failed SETATTR owes the handle's RELEASE.
            const FLAGS: [u32; 6] = [
                0,
                open_flags::O_RDONLY | open_flags::O_TRUNC,
                open_flags::O_WRONLY | open_flags::O_TRUNC,
                open_flags::O_RDWR | open_flags::O_TRUNC,
                open_flags::O_RDWR,
                open_flags::O_WRONLY,
            ];
            let flags = FLAGS[usize::from(server.input.u8()) % FLAGS.len()];
            let _ = fs.open(server, NodeId(2), flags);
        }
        8 => {
            // End the session and start another: nothing the old one handed out is
            // owed to the new one.
            server.harness_session += 1;
            server.session_open = false;
            held_refs.clear();
            let _ = fs.destroy(server);
            if fs.init(server).is_ok() {
                server.session_open = true;
            }
        }
        _ => {
            // FORGET (one node) or BATCH_FORGET on hiprio of references the harness
            // holds; whatever `forget` returns, they are the driver's now.
            let n = 1 + usize::from(server.input.u8() % 4);
            let nodes: Vec<(NodeId, u64)> = held_refs
                .drain(held_refs.len().saturating_sub(n)..)
                .map(|node| (node, 1))
                .collect();
            if !nodes.is_empty() {
                let _ = fs.forget(server, &nodes);
            }
        }
    }
    held_refs.append(&mut got);
}

/// The answers from `floor` on of the opcodes `ops`, in `unique` order.
fn answers_of(server: &Server<'_>, floor: u64, ops: &[u32]) -> Vec<Answer> {
    let mut a: Vec<Answer> = server
        .answers
        .iter()
        .filter(|a| a.unique >= floor && ops.contains(&a.op))
        .cloned()
        .collect();
    a.sort_by_key(|a| a.unique);
    a
}

/// A blocking call's result against the prediction for its request (the latest of its
/// opcode from `floor` on), when the device answered it.
fn check_call(server: &Server<'_>, floor: u64, op: u32, result: &FsResult<Reply>) {
    if !server.faithful || matches!(result, Err(FsError::Timeout)) {
        return;
    }
    if let Some(Answer {
        expect: Some(e), ..
    }) = answers_of(server, floor, &[op]).last()
        && matches!(e, Expect::Protocol | Expect::Errno(_))
    {
        check_verdict(e, result, &[], false);
    }
}

/// `read` returned `got`: the bytes the server wrote, up to the first short chunk.
fn check_read(server: &Server<'_>, floor: u64, buf: &[u8], got: usize) {
    let answers = answers_of(server, floor, &[opcode::READ]);
    if !server.faithful
        || answers
            .iter()
            .any(|a| !matches!(a.expect, Some(Expect::Data(_))))
    {
        return;
    }
    let mut end = buf.len();
    for a in &answers {
        let Some(Expect::Data(bytes)) = &a.expect else {
            continue;
        };
        let at = a.offset as usize;
        let upto = (at + bytes.len()).min(got);
        if at < upto {
            assert_eq!(&buf[at..upto], &bytes[..upto - at], "read: bytes at {at}");
        }
        if bytes.len() < a.size as usize {
            end = end.min(at + bytes.len());
        }
    }
    assert_eq!(got, end, "read: the first short chunk ends the result");
}

/// `write` returned `done` of `n` bytes: up to the first short WRITE.
fn check_write(server: &Server<'_>, floor: u64, n: usize, done: usize) {
    let answers = answers_of(server, floor, &[opcode::WRITE]);
    if !server.faithful
        || answers
            .iter()
            .any(|a| !matches!(a.expect, Some(Expect::Written(_))))
    {
        return;
    }
    let mut end = n;
    for a in &answers {
        if let Some(Expect::Written(w)) = a.expect
            && w < a.size
        {
            end = end.min(a.offset as usize + w as usize);
        }
    }
    assert_eq!(done, end, "write: the first short WRITE ends the result");
}

/// `read_dir` handed out `seen`: the records of its replies, in order.
fn check_read_dir(server: &Server<'_>, floor: u64, seen: &[DirRec]) {
    let answers = answers_of(server, floor, &[opcode::READDIR, opcode::READDIRPLUS]);
    let mut want = Vec::new();
    for a in &answers {
        match &a.expect {
            Some(Expect::Dir(Some(recs))) => want.extend(recs.iter().cloned()),
            _ => return,
        }
    }
    if server.faithful {
        assert_eq!(seen, &want[..], "read_dir: records other than the server's");
    }
}

/// The end of a run over honest rings: every held chain answered, every pending result
/// taken, the harness's references forgotten; then every slot is free, every
/// notification buffer posted, and every lookup reference handed out came back.
fn finish(
    fs: &mut Fs,
    server: &mut Server<'_>,
    pending: &mut Vec<Pending>,
    out: &mut [u8],
    held_refs: &mut Vec<NodeId>,
    notify_total: usize,
) {
    server.honest = true;
    let mut taken = Vec::new();
    for _ in 0..32 {
        server.release_all();
        server.serve_all();
        server.interrupts(fs).expect("interrupts over honest rings");
        fs.poll().expect("poll over honest rings");
        for i in (0..pending.len()).rev() {
            take(fs, server, pending, i, out, held_refs, &mut taken);
        }
        while fs.take_notification().is_some() {}
        if fs.init_info().is_some() && !held_refs.is_empty() {
            let refs: Vec<(NodeId, u64)> = held_refs.drain(..).map(|n| (n, 1)).collect();
            fs.forget(server, &refs).expect("forget over honest rings");
        }
    }
    // The last FORGETs reach the server.
    server.serve_all();
    fs.poll().expect("poll over honest rings");
    assert!(pending.is_empty(), "results never completed");
    assert_eq!(fs.busy_slots(), 0, "slots still busy");
    assert_eq!(
        fs.notify_buffers(),
        notify_total,
        "notification buffers not reposted"
    );
    if server.counting && server.session_open && fs.init_info().is_some() {
        assert_eq!(fs.stats().lost_references, 0);
        // The current session's (earlier ones' the device dropped at DESTROY).
        server.check_counts();
        let session = server.session(u64::MAX);
        let live = |m: &BTreeMap<(u64, u64), u64>| -> BTreeMap<u64, u64> {
            let mut per_node = BTreeMap::new();
            for (&(u, k), &n) in m {
                if server.session(u) == session && n > 0 {
                    *per_node.entry(k).or_default() += n;
                }
            }
            per_node
        };
        assert_eq!(
            live(&server.given),
            live(&server.forgotten),
            "lookup references handed out and not returned"
        );
    }
}
