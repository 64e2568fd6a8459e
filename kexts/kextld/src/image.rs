//! A reader of linked kext bundles: the x86_64 `MH_KEXT_BUNDLE` files [`crate::link`] writes
//! and xnu's kernel linker (`libkern/kxld`) reads.
//!
//! [`Image::parse`] reads only what the file's own structure needs (header, load commands,
//! segments and sections, symbol and string tables, the `LC_DYSYMTAB` relocation tables) and
//! bounds-checks every offset it follows: a malformed file is an error, never a panic. It
//! does not judge whether the kernel would accept the file; that is [`crate::check`]'s job,
//! so a bundle with the wrong filetype, unknown load commands or segments outside the file
//! still parses, and [`Image::section_data`] answers `None` for contents the file lacks.

use std::fmt;

use object::macho;

/// The `mach_header_64` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub cputype: u32,
    pub cpusubtype: u32,
    pub filetype: u32,
    pub ncmds: u32,
    pub sizeofcmds: u32,
    pub flags: u32,
}

/// One load command: its `cmd`, its offset in the file and its `cmdsize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadCommand {
    pub cmd: u32,
    pub offset: usize,
    pub size: u32,
}

/// An `LC_SEGMENT_64` and its sections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    pub vmaddr: u64,
    pub vmsize: u64,
    pub fileoff: u64,
    pub filesize: u64,
    pub maxprot: u32,
    pub initprot: u32,
    pub flags: u32,
    pub sections: Vec<Section>,
}

/// A `section_64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub segname: String,
    pub sectname: String,
    pub addr: u64,
    pub size: u64,
    pub offset: u32,
    /// Power of two.
    pub align: u32,
    /// Per-section relocations: an object file's; a linked image keeps its relocations in
    /// `LC_DYSYMTAB` instead.
    pub reloff: u32,
    pub nreloc: u32,
    pub flags: u32,
    pub reserved1: u32,
    pub reserved2: u32,
}

impl Section {
    /// The section type (`S_REGULAR`, `S_ZEROFILL`, ...): the low byte of `flags`.
    pub fn kind(&self) -> u32 {
        self.flags & macho::SECTION_TYPE
    }

    /// Whether the section occupies no file space (`S_ZEROFILL` and its variants).
    pub fn is_zerofill(&self) -> bool {
        matches!(
            self.kind(),
            macho::S_ZEROFILL | macho::S_GB_ZEROFILL | macho::S_THREAD_LOCAL_ZEROFILL
        )
    }

    /// Whether the section holds machine code (either instruction attribute).
    pub fn has_instructions(&self) -> bool {
        self.flags & (macho::S_ATTR_PURE_INSTRUCTIONS | macho::S_ATTR_SOME_INSTRUCTIONS) != 0
    }

    /// `segname,sectname`, the way Apple's tools print a section.
    pub fn full_name(&self) -> String {
        format!("{},{}", self.segname, self.sectname)
    }

    /// Whether `addr` lies in `[self.addr, self.addr + self.size)`.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.size
    }
}

/// An `nlist_64` with its name read from the string table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub n_type: u8,
    pub n_sect: u8,
    pub n_desc: u16,
    pub n_value: u64,
}

impl Symbol {
    /// `n_type & N_TYPE` (`N_UNDF`, `N_ABS`, `N_SECT`, `N_INDR`, ...).
    pub fn kind(&self) -> u8 {
        self.n_type & macho::N_TYPE
    }

    pub fn is_stab(&self) -> bool {
        self.n_type & macho::N_STAB != 0
    }

    pub fn is_external(&self) -> bool {
        self.n_type & macho::N_EXT != 0
    }

    pub fn is_private_external(&self) -> bool {
        self.n_type & macho::N_PEXT != 0
    }

    /// A definition in a section (not a stab).
    pub fn is_section_defined(&self) -> bool {
        !self.is_stab() && self.kind() == macho::N_SECT
    }

    /// `N_UNDF` with `n_value == 0`; `N_UNDF` with a value is a common symbol.
    pub fn is_undefined(&self) -> bool {
        !self.is_stab() && self.kind() == macho::N_UNDF && self.n_value == 0
    }

    /// `N_UNDF | N_EXT` with a size in `n_value` (`nlist.h`).
    pub fn is_common(&self) -> bool {
        !self.is_stab() && self.kind() == macho::N_UNDF && self.is_external() && self.n_value != 0
    }
}

/// The `LC_SYMTAB` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symtab {
    pub symoff: u32,
    pub nsyms: u32,
    pub stroff: u32,
    pub strsize: u32,
}

/// The `LC_DYSYMTAB` fields a kext uses (no TOC, module table or external references:
/// those belong to dylibs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dysymtab {
    pub ilocalsym: u32,
    pub nlocalsym: u32,
    pub iextdefsym: u32,
    pub nextdefsym: u32,
    pub iundefsym: u32,
    pub nundefsym: u32,
    pub indirectsymoff: u32,
    pub nindirectsyms: u32,
    pub extreloff: u32,
    pub nextrel: u32,
    pub locreloff: u32,
    pub nlocrel: u32,
}

/// A plain (x86_64 has no scattered form) `relocation_info`. In a linked image `address`
/// is relative to the image base, vmaddr 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    pub address: i32,
    /// Symbol index when `is_extern`, else 1-based section ordinal.
    pub symbolnum: u32,
    pub pcrel: bool,
    /// log2 of the width: 2 = 4 bytes, 3 = 8 bytes.
    pub length: u8,
    pub is_extern: bool,
    /// `X86_64_RELOC_*`.
    pub kind: u8,
}

/// The part of the file a [`Malformed`] error was found in, so [`crate::check`] can name
/// the rule a truncated or inconsistent file breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePart {
    Header,
    LoadCommands,
    Symtab,
    Relocations,
}

/// Why a file could not be read as a 64-bit Mach-O image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub part: ImagePart,
    pub message: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Malformed {}

fn malformed(part: ImagePart, message: impl Into<String>) -> Malformed {
    Malformed {
        part,
        message: message.into(),
    }
}

/// A parsed linked bundle borrowing the file's bytes.
#[derive(Debug, Clone)]
pub struct Image<'a> {
    pub data: &'a [u8],
    pub header: Header,
    pub load_commands: Vec<LoadCommand>,
    pub segments: Vec<Segment>,
    /// All sections in load-command order: index `i` is section ordinal `i + 1`, the number
    /// `n_sect` and local relocations' `r_symbolnum` use.
    pub sections: Vec<Section>,
    pub symtab: Option<Symtab>,
    pub symbols: Vec<Symbol>,
    pub dysymtab: Option<Dysymtab>,
    pub local_relocs: Vec<Reloc>,
    pub external_relocs: Vec<Reloc>,
    pub uuid: Option<[u8; 16]>,
}

const MACH_HEADER_64_SIZE: usize = 32;
const SEGMENT_COMMAND_64_SIZE: usize = 72;
const SECTION_64_SIZE: usize = 80;
const SYMTAB_COMMAND_SIZE: usize = 24;
const DYSYMTAB_COMMAND_SIZE: usize = 80;
const UUID_COMMAND_SIZE: usize = 24;
const NLIST_64_SIZE: usize = 16;
const RELOCATION_INFO_SIZE: usize = 8;

/// Little-endian reads that fail instead of panicking. Offsets come from the file, so
/// every read is checked; the values are read byte-wise because offsets in a malformed
/// file need not be aligned (the `object` pod casts require alignment).
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn slice(&self, offset: usize, len: usize) -> Option<&'a [u8]> {
        self.0.get(offset..offset.checked_add(len)?)
    }

    fn array<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.slice(offset, N)?.try_into().ok()
    }

    fn u8(&self, offset: usize) -> Option<u8> {
        self.0.get(offset).copied()
    }

    fn u16(&self, offset: usize) -> Option<u16> {
        self.array(offset).map(u16::from_le_bytes)
    }

    fn u32(&self, offset: usize) -> Option<u32> {
        self.array(offset).map(u32::from_le_bytes)
    }

    fn u64(&self, offset: usize) -> Option<u64> {
        self.array(offset).map(u64::from_le_bytes)
    }

    /// A fixed 16-byte name field (`segname`, `sectname`): NUL-padded, not necessarily
    /// NUL-terminated.
    fn name16(&self, offset: usize) -> Option<String> {
        let raw: [u8; 16] = self.array(offset)?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Some(String::from_utf8_lossy(&raw[..end]).into_owned())
    }
}

/// `count` records of `size` bytes at `offset`, all inside `data`.
fn table(data: &[u8], offset: u32, count: u32, size: usize) -> Option<&[u8]> {
    let len = usize::try_from(count).ok()?.checked_mul(size)?;
    Bytes(data).slice(usize::try_from(offset).ok()?, len)
}

impl<'a> Image<'a> {
    /// Reads a 64-bit little-endian Mach-O image.
    pub fn parse(data: &'a [u8]) -> Result<Self, String> {
        Self::parse_detailed(data).map_err(|error| error.message)
    }

    /// [`Image::parse`], telling which part of the file is malformed.
    pub fn parse_detailed(data: &'a [u8]) -> Result<Self, Malformed> {
        let header = parse_header(data)?;
        let load_commands = parse_load_commands(data, &header)?;
        let bytes = Bytes(data);
        let mut image = Image {
            data,
            header,
            load_commands: Vec::new(),
            segments: Vec::new(),
            sections: Vec::new(),
            symtab: None,
            symbols: Vec::new(),
            dysymtab: None,
            local_relocs: Vec::new(),
            external_relocs: Vec::new(),
            uuid: None,
        };
        for command in &load_commands {
            match command.cmd {
                macho::LC_SEGMENT_64 => {
                    let segment = parse_segment(&bytes, command)?;
                    image.sections.extend(segment.sections.iter().cloned());
                    image.segments.push(segment);
                }
                macho::LC_SYMTAB => set_once(
                    &mut image.symtab,
                    "LC_SYMTAB",
                    parse_symtab_command(&bytes, command)?,
                )?,
                macho::LC_DYSYMTAB => set_once(
                    &mut image.dysymtab,
                    "LC_DYSYMTAB",
                    parse_dysymtab_command(&bytes, command)?,
                )?,
                macho::LC_UUID => {
                    let uuid = (command.size as usize >= UUID_COMMAND_SIZE)
                        .then(|| bytes.array::<16>(command.offset + 8))
                        .flatten()
                        .ok_or_else(|| {
                            malformed(
                                ImagePart::LoadCommands,
                                format!(
                                    "LC_UUID at offset {:#x} is shorter than {UUID_COMMAND_SIZE} bytes",
                                    command.offset
                                ),
                            )
                        })?;
                    image.uuid = Some(uuid);
                }
                _ => {}
            }
        }
        if image.sections.len() > usize::from(u8::MAX) {
            // n_sect is a byte (nlist.h, MAX_SECT 255): more sections cannot be named.
            return Err(malformed(
                ImagePart::LoadCommands,
                format!(
                    "{} sections; n_sect can name at most 255",
                    image.sections.len()
                ),
            ));
        }
        image.load_commands = load_commands;
        if let Some(symtab) = image.symtab {
            image.symbols = parse_symbols(data, &symtab)?;
        }
        if let Some(dysymtab) = image.dysymtab {
            image.external_relocs =
                parse_relocs(data, dysymtab.extreloff, dysymtab.nextrel, "external")?;
            image.local_relocs = parse_relocs(data, dysymtab.locreloff, dysymtab.nlocrel, "local")?;
        }
        Ok(image)
    }

    /// The first symbol named `name` (Mach-O spelling, with the leading `_`).
    pub fn symbol(&self, name: &str) -> Option<&Symbol> {
        self.symbols.iter().find(|symbol| symbol.name == name)
    }

    /// The section whose address range holds `addr`.
    pub fn section_at(&self, addr: u64) -> Option<&Section> {
        self.sections.iter().find(|section| section.contains(addr))
    }

    /// The 1-based ordinal of the section whose address range holds `addr`.
    pub fn section_ordinal_at(&self, addr: u64) -> Option<usize> {
        self.sections
            .iter()
            .position(|section| section.contains(addr))
            .map(|index| index + 1)
    }

    /// The section with 1-based ordinal `ordinal` (as in `n_sect`).
    pub fn section_by_ordinal(&self, ordinal: u32) -> Option<&Section> {
        let index = usize::try_from(ordinal).ok()?.checked_sub(1)?;
        self.sections.get(index)
    }

    /// The section's bytes in the file; `None` for zerofill sections and for sections whose
    /// file range lies outside the file.
    pub fn section_data(&self, section: &Section) -> Option<&'a [u8]> {
        if section.is_zerofill() {
            return None;
        }
        Bytes(self.data).slice(
            usize::try_from(section.offset).ok()?,
            usize::try_from(section.size).ok()?,
        )
    }

    /// The `len` bytes at image address `addr`, read from the section holding them;
    /// `None` if no section with file contents holds all of them.
    pub fn bytes_at(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        let section = self.section_at(addr)?;
        let contents = self.section_data(section)?;
        let start = usize::try_from(addr - section.addr).ok()?;
        Bytes(contents).slice(start, len)
    }

    /// The little-endian 64-bit word at image address `addr`.
    pub fn u64_at(&self, addr: u64) -> Option<u64> {
        let raw: [u8; 8] = self.bytes_at(addr, 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(raw))
    }

    /// The segment named `name`.
    pub fn segment(&self, name: &str) -> Option<&Segment> {
        self.segments.iter().find(|segment| segment.name == name)
    }
}

fn parse_header(data: &[u8]) -> Result<Header, Malformed> {
    let bytes = Bytes(data);
    let field = |offset: usize| {
        bytes.u32(offset).ok_or_else(|| {
            malformed(
                ImagePart::Header,
                format!(
                    "file of {} bytes is shorter than a mach_header_64 ({MACH_HEADER_64_SIZE} bytes)",
                    data.len()
                ),
            )
        })
    };
    let magic = field(0)?;
    if magic != macho::MH_MAGIC_64 {
        return Err(malformed(
            ImagePart::Header,
            format!(
                "magic {magic:#010x} is not MH_MAGIC_64 ({:#010x}, 64-bit little-endian)",
                macho::MH_MAGIC_64
            ),
        ));
    }
    Ok(Header {
        magic,
        cputype: field(4)?,
        cpusubtype: field(8)?,
        filetype: field(12)?,
        ncmds: field(16)?,
        sizeofcmds: field(20)?,
        flags: field(24)?,
    })
}

fn parse_load_commands(data: &[u8], header: &Header) -> Result<Vec<LoadCommand>, Malformed> {
    let bytes = Bytes(data);
    let commands_end = usize::try_from(header.sizeofcmds)
        .ok()
        .and_then(|size| MACH_HEADER_64_SIZE.checked_add(size))
        .filter(|&end| end <= data.len())
        .ok_or_else(|| {
            malformed(
                ImagePart::LoadCommands,
                format!(
                    "sizeofcmds {:#x} runs past the end of the {}-byte file",
                    header.sizeofcmds,
                    data.len()
                ),
            )
        })?;
    let mut commands = Vec::new();
    let mut offset = MACH_HEADER_64_SIZE;
    for index in 0..header.ncmds {
        let (Some(cmd), Some(size)) = (bytes.u32(offset), bytes.u32(offset + 4)) else {
            return Err(malformed(
                ImagePart::LoadCommands,
                format!("load command {index} at offset {offset:#x} is outside the file"),
            ));
        };
        // loader.h: cmdsize is a multiple of 8 in 64-bit images; a size below the 8-byte
        // load_command would also never advance.
        if size < 8 || !size.is_multiple_of(8) {
            return Err(malformed(
                ImagePart::LoadCommands,
                format!(
                    "load command {index} ({cmd:#x}) at offset {offset:#x} has cmdsize {size}, not a non-zero multiple of 8"
                ),
            ));
        }
        let end = offset
            .checked_add(size as usize)
            .filter(|&end| end <= commands_end)
            .ok_or_else(|| {
                malformed(
                    ImagePart::LoadCommands,
                    format!(
                        "load command {index} ({cmd:#x}) at offset {offset:#x} (cmdsize {size}) runs past sizeofcmds (commands end at {commands_end:#x})"
                    ),
                )
            })?;
        commands.push(LoadCommand { cmd, offset, size });
        offset = end;
    }
    Ok(commands)
}

fn parse_segment(bytes: &Bytes<'_>, command: &LoadCommand) -> Result<Segment, Malformed> {
    let base = command.offset;
    let too_short = || {
        malformed(
            ImagePart::LoadCommands,
            format!(
                "LC_SEGMENT_64 at offset {base:#x}: cmdsize {} is too small for its sections",
                command.size
            ),
        )
    };
    let nsects = bytes.u32(base + 64).ok_or_else(too_short)?;
    let needed = usize::try_from(nsects)
        .ok()
        .and_then(|n| n.checked_mul(SECTION_64_SIZE))
        .and_then(|n| n.checked_add(SEGMENT_COMMAND_64_SIZE))
        .ok_or_else(too_short)?;
    if needed > command.size as usize {
        return Err(too_short());
    }
    // The command lies inside the file (parse_load_commands), so these reads succeed; the
    // `ok_or_else` only keeps a mistake here from becoming a panic.
    let mut segment = Segment {
        name: bytes.name16(base + 8).ok_or_else(too_short)?,
        vmaddr: bytes.u64(base + 24).ok_or_else(too_short)?,
        vmsize: bytes.u64(base + 32).ok_or_else(too_short)?,
        fileoff: bytes.u64(base + 40).ok_or_else(too_short)?,
        filesize: bytes.u64(base + 48).ok_or_else(too_short)?,
        maxprot: bytes.u32(base + 56).ok_or_else(too_short)?,
        initprot: bytes.u32(base + 60).ok_or_else(too_short)?,
        flags: bytes.u32(base + 68).ok_or_else(too_short)?,
        sections: Vec::new(),
    };
    for index in 0..nsects as usize {
        let at = base + SEGMENT_COMMAND_64_SIZE + index * SECTION_64_SIZE;
        segment.sections.push(Section {
            sectname: bytes.name16(at).ok_or_else(too_short)?,
            segname: bytes.name16(at + 16).ok_or_else(too_short)?,
            addr: bytes.u64(at + 32).ok_or_else(too_short)?,
            size: bytes.u64(at + 40).ok_or_else(too_short)?,
            offset: bytes.u32(at + 48).ok_or_else(too_short)?,
            align: bytes.u32(at + 52).ok_or_else(too_short)?,
            reloff: bytes.u32(at + 56).ok_or_else(too_short)?,
            nreloc: bytes.u32(at + 60).ok_or_else(too_short)?,
            flags: bytes.u32(at + 64).ok_or_else(too_short)?,
            reserved1: bytes.u32(at + 68).ok_or_else(too_short)?,
            reserved2: bytes.u32(at + 72).ok_or_else(too_short)?,
        });
    }
    Ok(segment)
}

/// Records a load command that a Mach-O file carries at most once.
fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), Malformed> {
    if slot.is_some() {
        return Err(malformed(
            ImagePart::LoadCommands,
            format!("more than one {name}"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

/// Reads the 32-bit field at `at` of a load command that must be at least `size` bytes.
fn command_field_reader<'b>(
    bytes: &'b Bytes<'_>,
    command: &LoadCommand,
    name: &'static str,
    size: usize,
) -> impl Fn(usize) -> Result<u32, Malformed> + 'b {
    let (base, command_size) = (command.offset, command.size as usize);
    move |at: usize| {
        (command_size >= size)
            .then(|| bytes.u32(base + at))
            .flatten()
            .ok_or_else(|| {
                malformed(
                    ImagePart::LoadCommands,
                    format!("{name} at offset {base:#x} is shorter than {size} bytes"),
                )
            })
    }
}

fn parse_symtab_command(bytes: &Bytes<'_>, command: &LoadCommand) -> Result<Symtab, Malformed> {
    let read = command_field_reader(bytes, command, "LC_SYMTAB", SYMTAB_COMMAND_SIZE);
    Ok(Symtab {
        symoff: read(8)?,
        nsyms: read(12)?,
        stroff: read(16)?,
        strsize: read(20)?,
    })
}

fn parse_dysymtab_command(bytes: &Bytes<'_>, command: &LoadCommand) -> Result<Dysymtab, Malformed> {
    let read = command_field_reader(bytes, command, "LC_DYSYMTAB", DYSYMTAB_COMMAND_SIZE);
    Ok(Dysymtab {
        ilocalsym: read(8)?,
        nlocalsym: read(12)?,
        iextdefsym: read(16)?,
        nextdefsym: read(20)?,
        iundefsym: read(24)?,
        nundefsym: read(28)?,
        indirectsymoff: read(56)?,
        nindirectsyms: read(60)?,
        extreloff: read(64)?,
        nextrel: read(68)?,
        locreloff: read(72)?,
        nlocrel: read(76)?,
    })
}

fn parse_symbols(data: &[u8], symtab: &Symtab) -> Result<Vec<Symbol>, Malformed> {
    let entries = table(data, symtab.symoff, symtab.nsyms, NLIST_64_SIZE).ok_or_else(|| {
        malformed(
            ImagePart::Symtab,
            format!(
                "symbol table ({} entries at {:#x}) runs past the end of the {}-byte file",
                symtab.nsyms,
                symtab.symoff,
                data.len()
            ),
        )
    })?;
    let strings = table(data, symtab.stroff, symtab.strsize, 1).ok_or_else(|| {
        malformed(
            ImagePart::Symtab,
            format!(
                "string table ({} bytes at {:#x}) runs past the end of the {}-byte file",
                symtab.strsize,
                symtab.stroff,
                data.len()
            ),
        )
    })?;
    let entries = Bytes(entries);
    let mut symbols = Vec::with_capacity(symtab.nsyms as usize);
    for index in 0..symtab.nsyms as usize {
        let at = index * NLIST_64_SIZE;
        let (Some(strx), Some(n_type), Some(n_sect), Some(n_desc), Some(n_value)) = (
            entries.u32(at),
            entries.u8(at + 4),
            entries.u8(at + 5),
            entries.u16(at + 6),
            entries.u64(at + 8),
        ) else {
            return Err(malformed(
                ImagePart::Symtab,
                format!("symbol {index} is truncated"),
            ));
        };
        let name = strings
            .get(strx as usize..)
            .and_then(|tail| tail.iter().position(|&b| b == 0).map(|end| &tail[..end]))
            .ok_or_else(|| {
                malformed(
                    ImagePart::Symtab,
                    format!(
                        "symbol {index}: string offset {strx:#x} has no NUL-terminated name inside the {}-byte string table",
                        symtab.strsize
                    ),
                )
            })?;
        symbols.push(Symbol {
            name: String::from_utf8_lossy(name).into_owned(),
            n_type,
            n_sect,
            n_desc,
            n_value,
        });
    }
    Ok(symbols)
}

fn parse_relocs(
    data: &[u8],
    offset: u32,
    count: u32,
    which: &str,
) -> Result<Vec<Reloc>, Malformed> {
    let entries = table(data, offset, count, RELOCATION_INFO_SIZE).ok_or_else(|| {
        malformed(
            ImagePart::Relocations,
            format!(
                "{which} relocation table ({count} entries at {offset:#x}) runs past the end of the {}-byte file",
                data.len()
            ),
        )
    })?;
    Ok(entries
        .chunks_exact(RELOCATION_INFO_SIZE)
        .map(|entry| {
            let mut address = [0; 4];
            let mut word1 = [0; 4];
            address.copy_from_slice(&entry[..4]);
            word1.copy_from_slice(&entry[4..]);
            let word1 = u32::from_le_bytes(word1);
            // reloc.h, little-endian bit fields: r_symbolnum:24, r_pcrel:1, r_length:2,
            // r_extern:1, r_type:4. x86_64 has no scattered relocations.
            Reloc {
                address: i32::from_le_bytes(address),
                symbolnum: word1 & 0x00ff_ffff,
                pcrel: (word1 >> 24) & 1 != 0,
                length: ((word1 >> 25) & 3) as u8,
                is_extern: (word1 >> 27) & 1 != 0,
                kind: (word1 >> 28) as u8,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_foreign_files_are_errors() {
        assert!(Image::parse(&[]).is_err());
        assert!(Image::parse(&[0xcf, 0xfa, 0xed]).is_err());
        let mut header = vec![0u8; 32];
        header[..4].copy_from_slice(&macho::MH_MAGIC.to_le_bytes());
        let error = Image::parse_detailed(&header).unwrap_err();
        assert_eq!(error.part, ImagePart::Header);
    }

    #[test]
    fn load_commands_past_the_file_are_errors() {
        let mut file = vec![0u8; 48];
        file[..4].copy_from_slice(&macho::MH_MAGIC_64.to_le_bytes());
        file[16..20].copy_from_slice(&1u32.to_le_bytes()); // ncmds
        file[20..24].copy_from_slice(&16u32.to_le_bytes()); // sizeofcmds
        file[32..36].copy_from_slice(&macho::LC_UUID.to_le_bytes());
        file[36..40].copy_from_slice(&24u32.to_le_bytes()); // past sizeofcmds
        let error = Image::parse_detailed(&file).unwrap_err();
        assert_eq!(error.part, ImagePart::LoadCommands);
        file[36..40].copy_from_slice(&0u32.to_le_bytes()); // would never advance
        assert_eq!(
            Image::parse_detailed(&file).unwrap_err().part,
            ImagePart::LoadCommands
        );
    }

    #[test]
    fn every_truncation_of_a_header_is_an_error_not_a_panic() {
        let mut file = vec![0u8; 32 + 72];
        file[..4].copy_from_slice(&macho::MH_MAGIC_64.to_le_bytes());
        file[16..20].copy_from_slice(&1u32.to_le_bytes());
        file[20..24].copy_from_slice(&72u32.to_le_bytes());
        file[32..36].copy_from_slice(&macho::LC_SEGMENT_64.to_le_bytes());
        file[36..40].copy_from_slice(&72u32.to_le_bytes());
        file[96..100].copy_from_slice(&1u32.to_le_bytes()); // nsects 1 > cmdsize
        assert!(Image::parse(&file).is_err());
        for len in 0..file.len() {
            assert!(Image::parse(&file[..len]).is_err());
        }
    }
}
