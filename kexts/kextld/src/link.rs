//! The linker: a kext's Mach-O objects and static libraries → one x86_64 `MH_KEXT_BUNDLE`.
//!
//! What `ld -kext` (ld64) does for x86_64 and what xnu's kernel linker (`libkern/kxld`)
//! expects of its output, step by step:
//!
//! 1. **Load** every object given, then pull archive members on demand: a member is loaded
//!    when it defines a symbol that is still undefined (the roots, or a loaded object's
//!    references), until nothing more can be resolved (classic static-library semantics).
//! 2. **Resolve** symbols: one strong definition per name ("defined more than once"
//!    otherwise); a strong definition wins over weak ones (C++ inline functions, vtables,
//!    templates), the first weak one wins among weak ones. Common symbols are refused
//!    (kxld has none; compile with `-fno-common`). What stays undefined is imported: the
//!    kernel linker binds it against the kext's `OSBundleLibraries`.
//! 3. **Lay out** `__TEXT` (at vmaddr 0 and file offset 0, holding the Mach-O header),
//!    `__DATA` and `__LINKEDIT`, each page-aligned; sections keep their input alignment.
//!    Debug sections and unwind tables (`__eh_frame`, `__compact_unwind`) are dropped: kexts
//!    are built without exceptions and the kernel never unwinds them. Constant data that
//!    holds pointers (which the static relocation model leaves in `__TEXT,__const`) moves
//!    to `__DATA,__const`, so `__TEXT` carries no runtime relocation and can be read-only.
//! 4. **Relocate**: everything whose value does not depend on the load address is resolved
//!    now (RIP-relative references and calls inside the image, `SUBTRACTOR` pairs);
//!    internal GOT loads are relaxed from `movq` to `leaq`; what does depend on it becomes a
//!    classic relocation in `LC_DYSYMTAB`, with `r_address` relative to the image base
//!    (vmaddr 0): a *local* `X86_64_RELOC_UNSIGNED` (length 3, `r_symbolnum` = 1-based
//!    section of the target) for every absolute pointer into the image, which the kernel
//!    slides; an *external* `X86_64_RELOC_UNSIGNED` for a pointer to an import (the slot
//!    holds the addend), or `X86_64_RELOC_BRANCH` for a call to one. An imported symbol
//!    reached through the GOT gets a slot in `__DATA,__got` with an external relocation.
//! 5. **Symbols**: only definitions matching the export list stay external (what other
//!    kexts link against); every other definition becomes a local, private-extern symbol,
//!    so a kext never defines what one of its libraries (or another kext) defines.
//! 6. **Load commands** kxld accepts: `LC_SEGMENT_64` ×3, `LC_SYMTAB`, `LC_DYSYMTAB`,
//!    `LC_UUID`, `LC_VERSION_MIN_MACOSX` (or `LC_BUILD_VERSION` from 10.14 on, as ld64
//!    chooses) and `LC_SOURCE_VERSION`; nothing dyld-related.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use object::Endianness;
use object::macho;
use object::read::archive::ArchiveFile;
use object::read::macho::{MachHeader, Nlist, Section as _, Segment as _};

/// One input: an x86_64 `MH_OBJECT`, or an `ar` archive of them.
#[derive(Clone)]
pub struct Input {
    pub name: String,
    pub data: Vec<u8>,
}

/// How to link.
pub struct Options {
    /// Glob patterns (`*` matches any run of characters) of the Mach-O symbol names (with
    /// the leading `_`) that stay external: what other kexts link against. Every other
    /// definition becomes local.
    pub exports: Vec<String>,
    /// Symbols that must be defined; archive members defining them are pulled in.
    pub roots: Vec<String>,
    /// Minimum macOS version (`LC_VERSION_MIN_MACOSX` / `LC_BUILD_VERSION`).
    pub min_macos: (u16, u8, u8),
    /// `LC_UUID`; `None` derives one from the bundle's contents (reproducible builds).
    pub uuid: Option<[u8; 16]>,
}

/// A linked bundle.
pub struct Linked {
    pub bytes: Vec<u8>,
    /// Undefined symbols, bound by the kernel linker against the kext's libraries.
    pub imports: Vec<String>,
    /// External definitions.
    pub exports: Vec<String>,
}

/// Why a link failed, naming the input and the symbol or relocation concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkError {
    pub message: String,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LinkError {}

fn err<T>(message: impl Into<String>) -> Result<T, LinkError> {
    Err(LinkError {
        message: message.into(),
    })
}

const PAGE: u64 = 4096;
const HEADER_SIZE: u64 = 32;
/// Room left after the load commands before the first section. kxld writes the linked
/// kext's own header and load commands over the start of `__TEXT` without checking that
/// they end before the first section (xnu `kxld_object.c` export of the linked object,
/// `kxld_sect.c`), and its header can be larger than ours (it measured 240 bytes more in
/// user-space mode): too little room and the first bytes of `__text` are overwritten.
/// ld64's layout leaves about 600 bytes; this leaves at least a kilobyte.
pub const HEADER_PAD: u64 = 1024;
const SEGMENT_COMMAND_SIZE: u64 = 72;
const SECTION_SIZE: u64 = 80;
const RELOC_SIZE: u64 = 8;
const NLIST_SIZE: u64 = 16;

// ---------------------------------------------------------------- input objects

/// One relocation entry of an input section.
#[derive(Clone, Copy)]
struct InReloc {
    address: u32,
    symbolnum: u32,
    pcrel: bool,
    length: u8,
    is_extern: bool,
    kind: u8,
}

struct InSection<'a> {
    segname: String,
    sectname: String,
    addr: u64,
    size: u64,
    align: u32,
    flags: u32,
    data: &'a [u8],
    relocs: Vec<InReloc>,
}

impl InSection<'_> {
    fn is_zerofill(&self) -> bool {
        matches!(
            self.flags & macho::SECTION_TYPE,
            macho::S_ZEROFILL | macho::S_GB_ZEROFILL
        )
    }
    fn is_code(&self) -> bool {
        self.flags & (macho::S_ATTR_PURE_INSTRUCTIONS | macho::S_ATTR_SOME_INSTRUCTIONS) != 0
    }
    /// Dropped from the bundle: debug information and unwind tables.
    fn is_dropped(&self) -> bool {
        self.flags & macho::S_ATTR_DEBUG != 0
            || self.segname == "__DWARF"
            || self.segname == "__LLVM"
            || (self.segname == "__LD" && self.sectname == "__compact_unwind")
            || self.sectname == "__eh_frame"
    }
    /// Holds absolute pointers, which need runtime (local or external) relocations.
    fn has_pointers(&self) -> bool {
        let mut after_subtractor = false;
        for r in &self.relocs {
            if r.kind == macho::X86_64_RELOC_UNSIGNED && r.length == 3 && !after_subtractor {
                return true;
            }
            after_subtractor = r.kind == macho::X86_64_RELOC_SUBTRACTOR;
        }
        false
    }
}

#[derive(Clone)]
struct InSymbol {
    name: String,
    n_type: u8,
    n_sect: u8,
    n_desc: u16,
    n_value: u64,
}

impl InSymbol {
    fn is_stab(&self) -> bool {
        self.n_type & macho::N_STAB != 0
    }
    fn kind(&self) -> u8 {
        self.n_type & macho::N_TYPE
    }
    fn is_external(&self) -> bool {
        self.n_type & macho::N_EXT != 0
    }
    fn is_defined(&self) -> bool {
        !self.is_stab() && self.kind() == macho::N_SECT
    }
    fn is_undefined(&self) -> bool {
        !self.is_stab() && self.kind() == macho::N_UNDF && self.n_value == 0
    }
    fn is_common(&self) -> bool {
        !self.is_stab() && self.kind() == macho::N_UNDF && self.is_external() && self.n_value != 0
    }
    fn is_weak_def(&self) -> bool {
        self.n_desc & macho::N_WEAK_DEF != 0
    }
}

struct Object<'a> {
    name: String,
    sections: Vec<InSection<'a>>,
    symbols: Vec<InSymbol>,
}

fn parse_object<'a>(name: &str, data: &'a [u8]) -> Result<Object<'a>, LinkError> {
    let bad = |what: &str| LinkError {
        message: format!("{name}: {what}"),
    };
    let header = macho::MachHeader64::<Endianness>::parse(data, 0)
        .map_err(|_| bad("not a 64-bit Mach-O object"))?;
    let endian = header
        .endian()
        .map_err(|_| bad("unknown Mach-O byte order"))?;
    if header.cputype(endian) != macho::CPU_TYPE_X86_64 {
        return err(format!("{name}: not an x86_64 object"));
    }
    if header.filetype(endian) != macho::MH_OBJECT {
        return err(format!("{name}: not a relocatable object (MH_OBJECT)"));
    }
    let mut sections = Vec::new();
    let mut symbols = Vec::new();
    let mut commands = header
        .load_commands(endian, data, 0)
        .map_err(|_| bad("bad load commands"))?;
    while let Some(command) = commands.next().map_err(|_| bad("bad load command"))? {
        if let Some((segment, section_data)) =
            command.segment_64().map_err(|_| bad("bad LC_SEGMENT_64"))?
        {
            for s in segment
                .sections(endian, section_data)
                .map_err(|_| bad("bad section headers"))?
            {
                // (object's reader refuses an empty table: its empty slice is unaligned)
                let relocs = if s.nreloc(endian) == 0 {
                    Vec::new()
                } else {
                    s.relocations(endian, data)
                        .map_err(|_| bad("bad relocation table"))?
                        .iter()
                        .map(|r| {
                            let i = r.info(endian);
                            InReloc {
                                address: i.r_address,
                                symbolnum: i.r_symbolnum,
                                pcrel: i.r_pcrel,
                                length: i.r_length,
                                is_extern: i.r_extern,
                                kind: i.r_type,
                            }
                        })
                        .collect()
                };
                sections.push(InSection {
                    segname: String::from_utf8_lossy(s.segment_name()).into_owned(),
                    sectname: String::from_utf8_lossy(s.name()).into_owned(),
                    addr: s.addr(endian),
                    size: s.size(endian),
                    align: s.align(endian),
                    flags: s.flags(endian),
                    data: s.data(endian, data).map_err(|_| bad("section data"))?,
                    relocs,
                });
            }
        } else if let Some(symtab) = command.symtab().map_err(|_| bad("bad LC_SYMTAB"))? {
            let table = symtab
                .symbols::<macho::MachHeader64<Endianness>, _>(endian, data)
                .map_err(|_| bad("bad symbol table"))?;
            let strings = table.strings();
            for n in table.iter() {
                let name = n
                    .name(endian, strings)
                    .map_err(|_| bad("bad symbol name"))?;
                symbols.push(InSymbol {
                    name: String::from_utf8_lossy(name).into_owned(),
                    n_type: n.n_type(),
                    n_sect: n.n_sect(),
                    n_desc: n.n_desc(endian),
                    n_value: n.n_value(endian),
                });
            }
        }
    }
    for s in &sections {
        if !s.is_zerofill() && (s.data.len() as u64) < s.size {
            return err(format!(
                "{name}: section {},{} extends past the file",
                s.segname, s.sectname
            ));
        }
    }
    Ok(Object {
        name: name.to_string(),
        sections,
        symbols,
    })
}

/// Names of the external definitions of a Mach-O object (for archive member lookup).
fn defined_externals<'o>(object: &'o Object<'_>) -> impl Iterator<Item = &'o str> {
    object
        .symbols
        .iter()
        .filter(|s| s.is_defined() && s.is_external())
        .map(|s| s.name.as_str())
}

fn is_macho64(data: &[u8]) -> bool {
    data.starts_with(&[0xcf, 0xfa, 0xed, 0xfe])
}

/// An archive member: (display name, bytes).
type Member = (String, Vec<u8>);

/// Every input split into objects given directly and archive members (loaded on demand).
///
/// Members are copied out of their archive: an `ar` member is only 2-byte aligned, and the
/// Mach-O structures are read in place with their natural alignment.
fn collect(inputs: &[Input]) -> Result<(Vec<Object<'_>>, Vec<Member>), LinkError> {
    let mut objects = Vec::new();
    let mut members = Vec::new();
    for input in inputs {
        if input.data.starts_with(b"!<arch>\n") {
            let archive = ArchiveFile::parse(input.data.as_slice()).map_err(|e| LinkError {
                message: format!("{}: {e}", input.name),
            })?;
            for member in archive.members() {
                let member = member.map_err(|e| LinkError {
                    message: format!("{}: {e}", input.name),
                })?;
                let data = member.data(input.data.as_slice()).map_err(|e| LinkError {
                    message: format!("{}: {e}", input.name),
                })?;
                // The archive's symbol table (`__.SYMDEF`) and anything not a 64-bit
                // Mach-O object are skipped: members are indexed from their own symbols.
                if is_macho64(data) {
                    let name =
                        format!("{}({})", input.name, String::from_utf8_lossy(member.name()));
                    members.push((name, data.to_vec()));
                }
            }
        } else if is_macho64(&input.data) {
            objects.push(parse_object(&input.name, &input.data)?);
        } else {
            return err(format!(
                "{}: neither an x86_64 Mach-O object nor an archive (a universal file must be thinned first)",
                input.name
            ));
        }
    }
    Ok((objects, members))
}

/// Step 1: loads archive members until no undefined symbol can be resolved from them.
fn load_on_demand<'a>(
    mut objects: Vec<Object<'a>>,
    members: &'a [Member],
    roots: &[String],
) -> Result<Vec<Object<'a>>, LinkError> {
    let mut member_objects: Vec<Option<Object<'a>>> = Vec::with_capacity(members.len());
    let mut provider: HashMap<String, usize> = HashMap::new();
    for (i, (name, data)) in members.iter().enumerate() {
        let object = parse_object(name, data)?;
        for s in defined_externals(&object) {
            // Like ld64, the first member (in archive order) defining a name provides it.
            provider.entry(s.to_string()).or_insert(i);
        }
        member_objects.push(Some(object));
    }
    let mut defined: BTreeSet<String> = BTreeSet::new();
    let mut wanted: Vec<String> = roots.to_vec();
    let note = |object: &Object<'a>, defined: &mut BTreeSet<String>, wanted: &mut Vec<String>| {
        defined.extend(defined_externals(object).map(str::to_string));
        wanted.extend(
            object
                .symbols
                .iter()
                .filter(|s| s.is_undefined() && s.is_external())
                .map(|s| s.name.clone()),
        );
    };
    for object in &objects {
        note(object, &mut defined, &mut wanted);
    }
    while let Some(name) = wanted.pop() {
        if defined.contains(&name) {
            continue;
        }
        let Some(&i) = provider.get(&name) else {
            continue; // stays undefined: an import
        };
        if let Some(object) = member_objects.get_mut(i).and_then(Option::take) {
            note(&object, &mut defined, &mut wanted);
            objects.push(object);
        }
    }
    Ok(objects)
}

// ---------------------------------------------------------------- resolution

/// Where a symbol lives after linking.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    /// A definition: output address (image-relative).
    Defined(u64),
    /// An import: index into the output's undefined symbols.
    Import(usize),
}

/// A global definition: (object index, symbol index, weak).
type Definition = (usize, usize, bool);

fn resolve_globals(objects: &[Object<'_>]) -> Result<BTreeMap<String, Definition>, LinkError> {
    let mut globals: BTreeMap<String, Definition> = BTreeMap::new();
    for (oi, object) in objects.iter().enumerate() {
        for (si, s) in object.symbols.iter().enumerate() {
            if s.is_common() {
                return err(format!(
                    "{}: common symbol {} (the kernel linker has no common symbols: compile with -fno-common)",
                    object.name, s.name
                ));
            }
            if !s.is_stab() && s.kind() == macho::N_INDR {
                return err(format!(
                    "{}: indirect symbol {} is not supported",
                    object.name, s.name
                ));
            }
            if !s.is_stab() && s.kind() == macho::N_ABS && s.is_external() {
                return err(format!(
                    "{}: absolute symbol {} is not supported in a kext",
                    object.name, s.name
                ));
            }
            if !(s.is_defined() && s.is_external()) {
                continue;
            }
            let weak = s.is_weak_def();
            match globals.get(&s.name) {
                None => {
                    globals.insert(s.name.clone(), (oi, si, weak));
                }
                Some(&(_, _, true)) if !weak => {
                    globals.insert(s.name.clone(), (oi, si, weak));
                }
                Some(&(other, _, false)) if !weak => {
                    return err(format!(
                        "symbol {} defined more than once: in {} and in {}",
                        s.name,
                        objects.get(other).map_or("?", |o| o.name.as_str()),
                        object.name
                    ));
                }
                Some(_) => {} // weak after any definition: the earlier one stays
            }
        }
    }
    Ok(globals)
}

/// `*`-glob match (the syntax of ld64's exported-symbols lists).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if Some(&c) == n.get(ni) => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

// ---------------------------------------------------------------- layout

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Seg {
    Text,
    Data,
}

/// One output section, assembled from input sections of the same name.
struct OutSection {
    seg: Seg,
    segname: &'static str,
    sectname: String,
    flags: u32,
    align: u32,
    addr: u64,
    size: u64,
    data: Vec<u8>,
}

impl OutSection {
    fn is_zerofill(&self) -> bool {
        matches!(
            self.flags & macho::SECTION_TYPE,
            macho::S_ZEROFILL | macho::S_GB_ZEROFILL
        )
    }
}

/// Where an input section went: (output section index, offset inside it).
type Placement = Option<(usize, u64)>;

/// Output segment and name of an input section.
fn destination(s: &InSection<'_>) -> (Seg, String) {
    match s.segname.as_str() {
        // Step 3: constant pointers move out of __TEXT so that it has no relocations.
        "__TEXT" if !s.is_code() && s.has_pointers() => (Seg::Data, "__const".to_string()),
        "__TEXT" => (Seg::Text, s.sectname.clone()),
        _ => (Seg::Data, s.sectname.clone()),
    }
}

/// Sort key of an output section inside its segment: code first, zero-fill last (a
/// segment's file contents end where its zero-fill sections start).
fn section_rank(seg: Seg, name: &str, flags: u32) -> u8 {
    let zerofill = matches!(
        flags & macho::SECTION_TYPE,
        macho::S_ZEROFILL | macho::S_GB_ZEROFILL
    );
    match (seg, name) {
        (_, _) if zerofill => 9,
        (Seg::Text, "__text") => 0,
        (Seg::Text, _) if flags & macho::S_ATTR_PURE_INSTRUCTIONS != 0 => 1,
        (Seg::Data, "__got") => 5,
        _ => 2,
    }
}

/// Refuses an external relocation whose slot holds a non-zero addend (`&import + 8`, a
/// call to `import + 4`).
///
/// kxld (10.13–10.15) adds the symbol's address to the slot (`x86_64_process_reloc`,
/// xnu libkern/kxld/kxld_reloc.c), but the kext collection builder of macOS 11+ ignores
/// the addend that `MachOAnalyzer::forEachBind` reads from the slot (dyld common/MachOAnalyzer.cpp): the
/// bind in `AppCacheBuilder::processFixups` (dyld
/// kernel-collection-builder/AppCacheBuilder.cpp) stores the bare symbol address for a
/// pointer and `target - (pc + 4)` for a call. The same bundle would bind differently on
/// the two loaders, silently wrong on 11+, so the link fails instead.
fn refuse_import_addend(at: &str, name: &str, addend: i64, what: &str) -> Result<(), LinkError> {
    if addend == 0 {
        return Ok(());
    }
    err(format!(
        "{at}: {what} to imported {name} {addend:+}: macOS 11+ (kmutil) binds an imported symbol without its addend, so this would reach {name} itself there; reference the symbol itself (or compute the offset at run time)"
    ))
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

// ---------------------------------------------------------------- the link

/// Links `inputs` into an x86_64 `MH_KEXT_BUNDLE`.
pub fn link(inputs: &[Input], options: &Options) -> Result<Linked, LinkError> {
    let (objects, members) = collect(inputs)?;
    let objects = load_on_demand(objects, &members, &options.roots)?;
    let globals = resolve_globals(&objects)?;
    for root in &options.roots {
        if !globals.contains_key(root) {
            return err(format!("{root} is not defined by any input"));
        }
    }

    // Imports: external references nothing defines, sorted (LC_DYSYMTAB's undefined
    // symbols are sorted by name), each with whether it is a weak reference.
    //
    // An import stays weak (`N_WEAK_REF`, from `__attribute__((weak_import))`) only if
    // every object referencing it does so weakly: one strong reference makes it strong, as
    // ld64 decides by default (`kWeakReferenceMismatchNonWeak`, ld64 src/ld/Options.cpp;
    // applied per reference in src/ld/passes/dylibs.cpp, `doPass`). The bit must reach the
    // output: kxld marks such a symbol weak (`init_predicates`, xnu
    // libkern/kxld/kxld_sym.c) and binds it, when no library defines it, to
    // `kext_weak_symbol_referenced` (`resolve_symbols`, kxld_kext.c), the address
    // `gOSKextUnresolved` holds; kmutil reads the bit the same way
    // (`weakImport`, `MachOAnalyzer::forEachBind`, dyld common/MachOAnalyzer.cpp), but
    // binds a missing one only where a pointer holds it (the check refuses direct calls).
    // Without the bit a kext testing for an optional symbol refuses to load where the
    // symbol is missing.
    let mut import_weak: BTreeMap<String, bool> = BTreeMap::new();
    for object in &objects {
        for s in &object.symbols {
            if s.is_undefined() && s.is_external() && !globals.contains_key(&s.name) {
                let weak = s.n_desc & macho::N_WEAK_REF != 0;
                *import_weak.entry(s.name.clone()).or_insert(weak) &= weak;
            }
        }
    }
    let imports: Vec<String> = import_weak.keys().cloned().collect();
    let import_index: HashMap<&str, usize> = imports
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();

    // ---- sections
    let mut out: Vec<OutSection> = Vec::new();
    let mut by_name: BTreeMap<(Seg, String), usize> = BTreeMap::new();
    let mut placements: Vec<Vec<Placement>> = Vec::new();
    for object in &objects {
        let mut placed = Vec::new();
        for s in &object.sections {
            if s.is_dropped() {
                placed.push(None);
                continue;
            }
            let (seg, name) = destination(s);
            let index = *by_name.entry((seg, name.clone())).or_insert_with(|| {
                out.push(OutSection {
                    seg,
                    segname: if seg == Seg::Text { "__TEXT" } else { "__DATA" },
                    sectname: name,
                    // Pointers moved out of __TEXT,__const keep plain S_REGULAR.
                    flags: s.flags,
                    align: 0,
                    addr: 0,
                    size: 0,
                    data: Vec::new(),
                });
                out.len() - 1
            });
            let Some(o) = out.get_mut(index) else {
                return err("internal: output section index");
            };
            if o.is_zerofill() != s.is_zerofill() {
                return err(format!(
                    "{}: section {},{} mixes zero-fill and contents",
                    object.name, s.segname, s.sectname
                ));
            }
            o.align = o.align.max(s.align);
            let alignment = 1u64 << s.align.min(15);
            let offset = align_up(o.size, alignment);
            o.size = offset + s.size;
            if !s.is_zerofill() {
                // Padding between code is `int3`, elsewhere zeros.
                let fill = if s.is_code() { 0xcc } else { 0 };
                o.data.resize(offset as usize, fill);
                o.data.extend_from_slice(s.data);
            }
            placed.push(Some((index, offset)));
        }
        placements.push(placed);
    }

    // GOT slots for imports reached through GOT relocations (step 4), and for internal
    // targets of GOT references that cannot be relaxed to `leaq`.
    let mut got_slots: BTreeMap<GotKey, u64> = BTreeMap::new();
    for (oi, object) in objects.iter().enumerate() {
        for (si, s) in object.sections.iter().enumerate() {
            if placements[oi][si].is_none() {
                continue;
            }
            for r in &s.relocs {
                let is_got =
                    r.kind == macho::X86_64_RELOC_GOT_LOAD || r.kind == macho::X86_64_RELOC_GOT;
                if !is_got {
                    continue;
                }
                let key = got_key(&objects, &globals, &import_index, oi, r)?;
                let relaxable = matches!(key, GotKey::Internal(..))
                    && r.kind == macho::X86_64_RELOC_GOT_LOAD
                    && r.address >= 2
                    && s.data.get(r.address as usize - 2) == Some(&0x8b);
                if !relaxable {
                    let next = got_slots.len() as u64;
                    got_slots.entry(key).or_insert(next);
                }
            }
        }
    }
    let got_index = if got_slots.is_empty() {
        None
    } else {
        out.push(OutSection {
            seg: Seg::Data,
            segname: "__DATA",
            sectname: "__got".into(),
            // A plain section, not S_NON_LAZY_SYMBOL_POINTERS: the kernel linker binds
            // its slots through the external relocations alone (no indirect symbols).
            flags: macho::S_REGULAR,
            align: 3,
            addr: 0,
            size: got_slots.len() as u64 * 8,
            data: vec![0; got_slots.len() * 8],
        });
        Some(out.len() - 1)
    };

    // Order: by segment, then rank, then first appearance.
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| {
        let s = &out[i];
        (s.seg, section_rank(s.seg, &s.sectname, s.flags), i)
    });
    let mut new_index = vec![0usize; out.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    let mut sorted: Vec<Option<OutSection>> = out.into_iter().map(Some).collect();
    let mut out: Vec<OutSection> = order
        .iter()
        .filter_map(|&i| sorted.get_mut(i).and_then(Option::take))
        .collect();
    for placed in &mut placements {
        for p in placed.iter_mut().flatten() {
            p.0 = new_index[p.0];
        }
    }
    let got_index = got_index.map(|i| new_index[i]);

    // Addresses. Header + load commands first in __TEXT.
    let text_sections = out.iter().filter(|s| s.seg == Seg::Text).count() as u64;
    let data_sections = out.len() as u64 - text_sections;
    let use_build_version = options.min_macos >= (10, 14, 0);
    let sizeofcmds = 3 * SEGMENT_COMMAND_SIZE
        + (text_sections + data_sections) * SECTION_SIZE
        + 24 // LC_SYMTAB
        + 80 // LC_DYSYMTAB
        + 24 // LC_UUID
        + if use_build_version { 24 } else { 16 }
        + 16; // LC_SOURCE_VERSION
    let mut address = HEADER_SIZE + sizeofcmds + HEADER_PAD;
    let mut text_end = address;
    let mut data_start = 0;
    let mut data_file_end = 0;
    for s in &mut out {
        if s.seg == Seg::Data && data_start == 0 {
            text_end = address;
            address = align_up(address, PAGE);
            data_start = address;
        }
        address = align_up(address, 1 << s.align.min(15));
        s.addr = address;
        address += s.size;
        if s.seg == Seg::Text {
            text_end = address;
        } else if !s.is_zerofill() {
            data_file_end = address;
        }
    }
    if data_start == 0 {
        data_start = align_up(text_end, PAGE);
        data_file_end = data_start;
    }
    let data_end = address.max(data_start);
    let text_size = align_up(text_end, PAGE);
    let linkedit_start = align_up(data_end.max(data_start + 1), PAGE);

    // ---- symbol addresses
    let addrs: Vec<u64> = out.iter().map(|s| s.addr).collect();
    let sizes: Vec<u64> = out.iter().map(|s| s.size).collect();
    let symbol_address = |oi: usize, s: &InSymbol| -> Result<u64, LinkError> {
        let object = &objects[oi];
        let si = (s.n_sect as usize).wrapping_sub(1);
        let Some(input) = object.sections.get(si) else {
            return err(format!("{}: symbol {} in no section", object.name, s.name));
        };
        let Some(Some((o, offset))) = placements[oi].get(si) else {
            return err(format!(
                "{}: symbol {} is in a discarded section ({},{})",
                object.name, s.name, input.segname, input.sectname
            ));
        };
        Ok(addrs[*o] + offset + (s.n_value.wrapping_sub(input.addr)))
    };
    let global_target = |name: &str| -> Result<Target, LinkError> {
        if let Some(&(oi, si, _)) = globals.get(name) {
            return Ok(Target::Defined(symbol_address(
                oi,
                &objects[oi].symbols[si],
            )?));
        }
        match import_index.get(name) {
            Some(&i) => Ok(Target::Import(i)),
            None => err(format!("internal: unresolved {name}")),
        }
    };
    let symbol_target = |oi: usize, index: u32| -> Result<(Target, String), LinkError> {
        let object = &objects[oi];
        let Some(s) = object.symbols.get(index as usize) else {
            return err(format!("{}: relocation names symbol #{index}", object.name));
        };
        if s.is_external() {
            // The winning definition (weak ones may lose), or an import.
            Ok((global_target(&s.name)?, s.name.clone()))
        } else if s.is_defined() {
            Ok((Target::Defined(symbol_address(oi, s)?), s.name.clone()))
        } else {
            err(format!(
                "{}: relocation names {}, which is neither defined nor external",
                object.name, s.name
            ))
        }
    };
    // Output address of an original (input) address inside input section `ordinal`.
    let section_target = |oi: usize, ordinal: u32, orig: u64| -> Result<u64, LinkError> {
        let object = &objects[oi];
        let si = (ordinal as usize).wrapping_sub(1);
        let Some(input) = object.sections.get(si) else {
            return err(format!(
                "{}: relocation names section #{ordinal}",
                object.name
            ));
        };
        let Some(Some((o, offset))) = placements[oi].get(si) else {
            return err(format!(
                "{}: reference into discarded section {},{}",
                object.name, input.segname, input.sectname
            ));
        };
        // Wrapping: `orig` may lie before the section's start (a negative addend, as in
        // ld64's `findTargetFromAddressAndSectionNum`); the sum is the target modulo 2^64.
        Ok(addrs[*o]
            .wrapping_add(*offset)
            .wrapping_add(orig.wrapping_sub(input.addr)))
    };

    // ---- relocate
    let mut local_relocs: Vec<(u32, u32)> = Vec::new(); // (r_address, target section ordinal)
    let mut external_relocs: Vec<(u32, u32, u8)> = Vec::new(); // (r_address, import, kind)
    // 1-based ordinal of the output section holding `addr` (or ending at it: a pointer
    // one past an array's end).
    let section_of = |addr: u64| -> u32 {
        let within = |i: &usize| addr >= addrs[*i] && addr < addrs[*i] + sizes[*i].max(1);
        let end = |i: &usize| addr == addrs[*i] + sizes[*i];
        (0..addrs.len())
            .find(within)
            .or_else(|| (0..addrs.len()).find(end))
            .map_or(0, |i| i as u32 + 1)
    };
    // GOT slot contents.
    if let Some(g) = got_index {
        let got_addr = addrs[g];
        for (key, slot) in &got_slots {
            let at = got_addr + slot * 8;
            match *key {
                GotKey::Import(i) => external_relocs.push((at as u32, i as u32, 0)),
                GotKey::Internal(oi, si) => {
                    let s = &objects[oi].symbols[si];
                    let value = symbol_address(oi, s)?;
                    let ordinal = section_of(value);
                    write_u64(&mut out[g].data, slot * 8, value);
                    local_relocs.push((at as u32, ordinal));
                }
            }
        }
    }
    for (oi, object) in objects.iter().enumerate() {
        for (si, s) in object.sections.iter().enumerate() {
            let Some(Some((o, base))) = placements[oi].get(si).copied() else {
                continue;
            };
            let mut i = 0;
            while i < s.relocs.len() {
                let r = s.relocs[i];
                i += 1;
                let ctx = || {
                    format!(
                        "{}: {},{}+{:#x}",
                        object.name, s.segname, s.sectname, r.address
                    )
                };
                if r.address & macho::R_SCATTERED != 0 {
                    return err(format!("{}: scattered relocation", ctx()));
                }
                let at = base + u64::from(r.address); // offset in the output section
                let p = addrs[o] + at; // address of the fixup
                let width = match r.length {
                    2 => 4,
                    3 => 8,
                    _ => return err(format!("{}: relocation length {}", ctx(), r.length)),
                };
                if u64::from(r.address) + width > s.size || s.is_zerofill() {
                    return err(format!("{}: relocation outside its section", ctx()));
                }
                let data = &mut out[o].data;
                let content = if width == 4 {
                    i64::from(read_u32(data, at) as i32)
                } else {
                    read_u64(data, at) as i64
                };
                match r.kind {
                    macho::X86_64_RELOC_UNSIGNED if !r.pcrel && width == 8 => {
                        if r.is_extern {
                            match symbol_target(oi, r.symbolnum)? {
                                (Target::Defined(t), _) => {
                                    write_u64(data, at, t.wrapping_add(content as u64));
                                    local_relocs.push((p as u32, section_of(t)));
                                }
                                (Target::Import(imp), name) => {
                                    refuse_import_addend(&ctx(), &name, content, "pointer")?;
                                    // The slot holds the (zero) addend; the kernel linker
                                    // stores the symbol's address there.
                                    external_relocs.push((p as u32, imp as u32, r.kind));
                                }
                            }
                        } else {
                            let t = section_target(oi, r.symbolnum, content as u64)?;
                            write_u64(&mut out[o].data, at, t);
                            local_relocs.push((p as u32, section_of(t)));
                        }
                    }
                    macho::X86_64_RELOC_UNSIGNED => {
                        return err(format!(
                            "{}: 32-bit absolute address (not expressible in a slid kext)",
                            ctx()
                        ));
                    }
                    macho::X86_64_RELOC_SIGNED
                    | macho::X86_64_RELOC_SIGNED_1
                    | macho::X86_64_RELOC_SIGNED_2
                    | macho::X86_64_RELOC_SIGNED_4
                    | macho::X86_64_RELOC_BRANCH
                        if r.pcrel && width == 4 =>
                    {
                        let disp = if r.is_extern {
                            let (target, name) = symbol_target(oi, r.symbolnum)?;
                            match target {
                                // disp = S + A - (P + 4): the stored addend already
                                // accounts for the SIGNED_N bias (ld64, lld).
                                Target::Defined(t) => {
                                    (t as i64).wrapping_add(content).wrapping_sub(p as i64 + 4)
                                }
                                Target::Import(imp) if r.kind == macho::X86_64_RELOC_BRANCH => {
                                    refuse_import_addend(&ctx(), &name, content, "call")?;
                                    external_relocs.push((p as u32, imp as u32, r.kind));
                                    content // the slot keeps only the (zero) addend
                                }
                                Target::Import(_) => {
                                    return err(format!(
                                        "{}: RIP-relative data reference to imported {name} (must go through the GOT)",
                                        ctx()
                                    ));
                                }
                            }
                        } else {
                            // Section-relative: the target was at P_orig + 4 + N + content;
                            // both ends moved with their sections.
                            let bias = signed_bias(r.kind);
                            let p_orig = s.addr + u64::from(r.address);
                            let t_orig = (p_orig as i64 + 4 + bias + content) as u64;
                            let t = section_target(oi, r.symbolnum, t_orig)?;
                            (t as i64) - (p as i64 + 4 + bias)
                        };
                        write_disp32(&mut out[o].data, at, disp, &ctx)?;
                    }
                    macho::X86_64_RELOC_GOT_LOAD | macho::X86_64_RELOC_GOT
                        if r.pcrel && width == 4 && r.is_extern =>
                    {
                        let key = got_key(&objects, &globals, &import_index, oi, &r)?;
                        let target = match got_slots.get(&key) {
                            Some(slot) => {
                                let Some(g) = got_index else {
                                    return err("internal: GOT missing");
                                };
                                addrs[g] + slot * 8
                            }
                            None => {
                                // Relaxed: `movq sym@GOTPCREL(%rip)` → `leaq sym(%rip)`.
                                let GotKey::Internal(koi, ksi) = key else {
                                    return err("internal: import without a GOT slot");
                                };
                                let data = &mut out[o].data;
                                if let Some(op) = data.get_mut(at as usize - 2) {
                                    *op = 0x8d;
                                }
                                symbol_address(koi, &objects[koi].symbols[ksi])?
                            }
                        };
                        let disp = (target as i64)
                            .wrapping_add(content)
                            .wrapping_sub(p as i64 + 4);
                        write_disp32(&mut out[o].data, at, disp, &ctx)?;
                    }
                    macho::X86_64_RELOC_SUBTRACTOR if !r.pcrel => {
                        // A pair: SUBTRACTOR (B) then UNSIGNED (A): value = A - B + addend.
                        let Some(&minuend) = s.relocs.get(i) else {
                            return err(format!("{}: SUBTRACTOR without its UNSIGNED", ctx()));
                        };
                        i += 1;
                        if minuend.kind != macho::X86_64_RELOC_UNSIGNED
                            || minuend.address != r.address
                            || minuend.length != r.length
                        {
                            return err(format!("{}: malformed SUBTRACTOR pair", ctx()));
                        }
                        if !r.is_extern {
                            // ld64 refuses it too ("X86_64_RELOC_SUBTRACTOR must have
                            // r_extern=1", `Section<x86_64>::addRelocFixup`).
                            return err(format!("{}: section-relative SUBTRACTOR", ctx()));
                        }
                        let (b, b_name) = symbol_target(oi, r.symbolnum)?;
                        let Target::Defined(b) = b else {
                            return err(format!("{}: difference with imported {b_name}", ctx()));
                        };
                        let value = if minuend.is_extern {
                            let (a, a_name) = symbol_target(oi, minuend.symbolnum)?;
                            let Target::Defined(a) = a else {
                                return err(format!(
                                    "{}: difference with imported {a_name}",
                                    ctx()
                                ));
                            };
                            (a as i64).wrapping_sub(b as i64).wrapping_add(content)
                        } else {
                            // A has no symbol (a temporary label in a section without
                            // one): the slot holds A's original address + the addend -
                            // (B - the symbol named), not a difference. LLVM's
                            // X86_64MachObjectWriter (`RecordX86_64Relocation`) writes
                            // that; ld64 reads the content as an address in the section
                            // the UNSIGNED names (`findTargetFromAddressAndSectionNum`,
                            // `Section<x86_64>::addRelocFixup`, ld64
                            // src/ld/parsers/macho_relocatable_file.cpp) and subtracts
                            // the SUBTRACTOR's symbol. Sections move whole, so B's offset
                            // from that symbol carries over.
                            let a = section_target(oi, minuend.symbolnum, content as u64)?;
                            (a as i64).wrapping_sub(b as i64)
                        };
                        let data = &mut out[o].data;
                        if width == 4 {
                            let Ok(v) = i32::try_from(value) else {
                                return err(format!("{}: difference out of range", ctx()));
                            };
                            write_u32(data, at, v as u32);
                        } else {
                            write_u64(data, at, value as u64);
                        }
                    }
                    macho::X86_64_RELOC_TLV => {
                        return err(format!("{}: thread-local variable (not in kexts)", ctx()));
                    }
                    kind => {
                        return err(format!(
                            "{}: unsupported relocation (type {kind}, pcrel {}, length {}, extern {})",
                            ctx(),
                            r.pcrel,
                            r.length,
                            r.is_extern
                        ));
                    }
                }
            }
        }
    }

    // ---- symbols (step 5)
    let is_exported = |name: &str| options.exports.iter().any(|p| glob_match(p, name));
    let mut locals: Vec<(String, u8, u8, u16, u64)> = Vec::new();
    let mut extdefs: Vec<(String, u8, u8, u16, u64)> = Vec::new();
    for (oi, object) in objects.iter().enumerate() {
        for (si, s) in object.symbols.iter().enumerate() {
            if !s.is_defined() {
                continue;
            }
            // Assembler temporaries and linker-private labels (`L…`, `l…`) never reach the
            // output, as with ld64.
            if s.name.is_empty() || s.name.starts_with('L') || s.name.starts_with('l') {
                continue;
            }
            if s.is_external() && globals.get(&s.name) != Some(&(oi, si, s.is_weak_def())) {
                continue; // a losing weak definition
            }
            let value = match symbol_address(oi, s) {
                Ok(v) => v,
                Err(_) => continue, // in a dropped section (unwind labels)
            };
            let n_sect = section_of(value);
            if n_sect == 0 || n_sect > 255 {
                continue;
            }
            // Weak definitions were resolved here: the output has one definition each.
            let n_desc = s.n_desc & !(macho::N_WEAK_DEF | macho::N_WEAK_REF);
            if s.is_external() && is_exported(&s.name) {
                extdefs.push((
                    s.name.clone(),
                    macho::N_SECT | macho::N_EXT,
                    n_sect as u8,
                    n_desc,
                    value,
                ));
            } else {
                // Hidden: a private-extern global stays visible to tools but not to the
                // kernel linker's symbol resolution.
                let pext = if s.is_external() { macho::N_PEXT } else { 0 };
                locals.push((
                    s.name.clone(),
                    macho::N_SECT | pext,
                    n_sect as u8,
                    n_desc,
                    value,
                ));
            }
        }
    }
    extdefs.sort_by(|a, b| a.0.cmp(&b.0));

    // ---- __LINKEDIT: local relocations, external relocations, symbols, strings.
    let nlocrel = local_relocs.len() as u64;
    let nextrel = external_relocs.len() as u64;
    let locreloff = linkedit_start;
    let extreloff = locreloff + nlocrel * RELOC_SIZE;
    let symoff = extreloff + nextrel * RELOC_SIZE;
    let nsyms = (locals.len() + extdefs.len() + imports.len()) as u64;
    let stroff = symoff + nsyms * NLIST_SIZE;
    let mut strings: Vec<u8> = vec![b' ', 0]; // index 0/1: the empty name, as ld64 writes
    let mut nlist = Vec::with_capacity((nsyms * NLIST_SIZE) as usize);
    let mut put_symbol = |name: &str, n_type: u8, n_sect: u8, n_desc: u16, value: u64| {
        let strx = strings.len() as u32;
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
        nlist.extend_from_slice(&strx.to_le_bytes());
        nlist.push(n_type);
        nlist.push(n_sect);
        nlist.extend_from_slice(&n_desc.to_le_bytes());
        nlist.extend_from_slice(&value.to_le_bytes());
    };
    for (name, t, sect, desc, value) in locals.iter().chain(&extdefs) {
        put_symbol(name, *t, *sect, *desc, *value);
    }
    let undef_base = locals.len() + extdefs.len();
    for (name, &weak) in &import_weak {
        let n_desc = if weak { macho::N_WEAK_REF } else { 0 };
        put_symbol(name, macho::N_UNDF | macho::N_EXT, 0, n_desc, 0);
    }
    while !strings.len().is_multiple_of(8) {
        strings.push(0);
    }
    let strsize = strings.len() as u64;
    let linkedit_size = stroff + strsize - linkedit_start;

    // ---- write
    let file_size = stroff + strsize;
    let mut b: Vec<u8> = Vec::with_capacity(file_size as usize);
    let ncmds = 3 + 1 + 1 + 1 + 1 + 1;
    push_u32(&mut b, macho::MH_MAGIC_64);
    push_u32(&mut b, macho::CPU_TYPE_X86_64);
    push_u32(&mut b, macho::CPU_SUBTYPE_X86_64_ALL);
    push_u32(&mut b, macho::MH_KEXT_BUNDLE);
    push_u32(&mut b, ncmds);
    push_u32(&mut b, sizeofcmds as u32);
    push_u32(&mut b, 0); // flags: none apply to a kext (no dyld, no two-level namespace)
    push_u32(&mut b, 0); // reserved
    let text: Vec<&OutSection> = out.iter().filter(|s| s.seg == Seg::Text).collect();
    let data: Vec<&OutSection> = out.iter().filter(|s| s.seg == Seg::Data).collect();
    let r_x = macho::VM_PROT_READ | macho::VM_PROT_EXECUTE;
    let rw = macho::VM_PROT_READ | macho::VM_PROT_WRITE;
    segment_command(&mut b, "__TEXT", 0, text_size, 0, text_size, r_x, &text);
    let data_vmsize = align_up(data_end, PAGE)
        .saturating_sub(data_start)
        .max(PAGE);
    segment_command(
        &mut b,
        "__DATA",
        data_start,
        data_vmsize,
        data_start,
        data_file_end.saturating_sub(data_start),
        rw,
        &data,
    );
    segment_command(
        &mut b,
        "__LINKEDIT",
        linkedit_start,
        align_up(linkedit_size, PAGE),
        linkedit_start,
        linkedit_size,
        macho::VM_PROT_READ,
        &[],
    );
    // LC_SYMTAB
    push_u32(&mut b, macho::LC_SYMTAB);
    push_u32(&mut b, 24);
    push_u32(&mut b, symoff as u32);
    push_u32(&mut b, nsyms as u32);
    push_u32(&mut b, stroff as u32);
    push_u32(&mut b, strsize as u32);
    // LC_DYSYMTAB
    push_u32(&mut b, macho::LC_DYSYMTAB);
    push_u32(&mut b, 80);
    for v in [
        0,
        locals.len() as u32,
        locals.len() as u32,
        extdefs.len() as u32,
        undef_base as u32,
        imports.len() as u32,
        0, // tocoff
        0,
        0, // modtaboff
        0,
        0, // extrefsymoff
        0,
        0, // indirectsymoff
        0,
        extreloff as u32,
        nextrel as u32,
        locreloff as u32,
        nlocrel as u32,
    ] {
        push_u32(&mut b, v);
    }
    // LC_UUID (filled below)
    push_u32(&mut b, macho::LC_UUID);
    push_u32(&mut b, 24);
    let uuid_at = b.len();
    b.extend_from_slice(&[0; 16]);
    let (major, minor, patch) = options.min_macos;
    let version = (u32::from(major) << 16) | (u32::from(minor) << 8) | u32::from(patch);
    if use_build_version {
        push_u32(&mut b, macho::LC_BUILD_VERSION);
        push_u32(&mut b, 24);
        push_u32(&mut b, macho::PLATFORM_MACOS);
        push_u32(&mut b, version);
        push_u32(&mut b, version); // sdk
        push_u32(&mut b, 0); // ntools
    } else {
        push_u32(&mut b, macho::LC_VERSION_MIN_MACOSX);
        push_u32(&mut b, 16);
        push_u32(&mut b, version);
        push_u32(&mut b, version); // sdk
    }
    push_u32(&mut b, macho::LC_SOURCE_VERSION);
    push_u32(&mut b, 16);
    b.extend_from_slice(&0u64.to_le_bytes());
    if b.len() as u64 != HEADER_SIZE + sizeofcmds {
        return err("internal: load command size");
    }
    for s in &out {
        if s.is_zerofill() {
            continue;
        }
        b.resize(s.addr as usize, 0);
        b.extend_from_slice(&s.data);
        b.resize((s.addr + s.size) as usize, 0);
    }
    b.resize(linkedit_start as usize, 0);
    for (address, ordinal) in &local_relocs {
        push_reloc(
            &mut b,
            *address,
            *ordinal,
            false,
            3,
            false,
            macho::X86_64_RELOC_UNSIGNED,
        );
    }
    for (address, import, kind) in &external_relocs {
        let pcrel = *kind == macho::X86_64_RELOC_BRANCH;
        let length = if pcrel { 2 } else { 3 };
        push_reloc(
            &mut b,
            *address,
            (undef_base + *import as usize) as u32,
            pcrel,
            length,
            true,
            *kind,
        );
    }
    b.extend_from_slice(&nlist);
    b.extend_from_slice(&strings);
    if b.len() as u64 != file_size {
        return err("internal: file size");
    }
    let uuid = options.uuid.unwrap_or_else(|| content_uuid(&b));
    b[uuid_at..uuid_at + 16].copy_from_slice(&uuid);

    Ok(Linked {
        bytes: b,
        imports,
        exports: extdefs.into_iter().map(|e| e.0).collect(),
    })
}

/// A GOT slot's target.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum GotKey {
    Import(usize),
    /// (object, symbol) of an internal definition.
    Internal(usize, usize),
}

fn got_key(
    objects: &[Object<'_>],
    globals: &BTreeMap<String, Definition>,
    import_index: &HashMap<&str, usize>,
    oi: usize,
    r: &InReloc,
) -> Result<GotKey, LinkError> {
    let object = &objects[oi];
    let Some(s) = object
        .symbols
        .get(r.symbolnum as usize)
        .filter(|_| r.is_extern)
    else {
        return err(format!("{}: GOT relocation without a symbol", object.name));
    };
    if s.is_external() {
        if let Some(&(doi, dsi, _)) = globals.get(&s.name) {
            return Ok(GotKey::Internal(doi, dsi));
        }
        if let Some(&i) = import_index.get(s.name.as_str()) {
            return Ok(GotKey::Import(i));
        }
    } else if s.is_defined() {
        return Ok(GotKey::Internal(oi, r.symbolnum as usize));
    }
    err(format!(
        "{}: GOT reference to unknown {}",
        object.name, s.name
    ))
}

/// The `N` of `X86_64_RELOC_SIGNED_N`: immediate bytes after the displacement.
fn signed_bias(kind: u8) -> i64 {
    match kind {
        macho::X86_64_RELOC_SIGNED_1 => 1,
        macho::X86_64_RELOC_SIGNED_2 => 2,
        macho::X86_64_RELOC_SIGNED_4 => 4,
        _ => 0,
    }
}

fn write_disp32(
    data: &mut [u8],
    at: u64,
    disp: i64,
    ctx: &dyn Fn() -> String,
) -> Result<(), LinkError> {
    let Ok(v) = i32::try_from(disp) else {
        return err(format!("{}: displacement out of ±2 GiB", ctx()));
    };
    write_u32(data, at, v as u32);
    Ok(())
}

fn read_u32(data: &[u8], at: u64) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = data.get(at as usize..at as usize + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn read_u64(data: &[u8], at: u64) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = data.get(at as usize..at as usize + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

fn write_u32(data: &mut [u8], at: u64, v: u32) {
    if let Some(s) = data.get_mut(at as usize..at as usize + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn write_u64(data: &mut [u8], at: u64, v: u64) {
    if let Some(s) = data.get_mut(at as usize..at as usize + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn push_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn push_name(b: &mut Vec<u8>, name: &str) {
    let mut field = [0u8; 16];
    for (slot, byte) in field.iter_mut().zip(name.bytes()) {
        *slot = byte;
    }
    b.extend_from_slice(&field);
}

#[allow(clippy::too_many_arguments)]
fn segment_command(
    b: &mut Vec<u8>,
    name: &str,
    vmaddr: u64,
    vmsize: u64,
    fileoff: u64,
    filesize: u64,
    prot: u32,
    sections: &[&OutSection],
) {
    push_u32(b, macho::LC_SEGMENT_64);
    push_u32(
        b,
        (SEGMENT_COMMAND_SIZE + SECTION_SIZE * sections.len() as u64) as u32,
    );
    push_name(b, name);
    b.extend_from_slice(&vmaddr.to_le_bytes());
    b.extend_from_slice(&vmsize.to_le_bytes());
    b.extend_from_slice(&fileoff.to_le_bytes());
    b.extend_from_slice(&filesize.to_le_bytes());
    push_u32(b, prot); // maxprot
    push_u32(b, prot); // initprot
    push_u32(b, sections.len() as u32);
    push_u32(b, 0); // flags
    for s in sections {
        push_name(b, &s.sectname);
        push_name(b, s.segname);
        b.extend_from_slice(&s.addr.to_le_bytes());
        b.extend_from_slice(&s.size.to_le_bytes());
        // Zero-fill sections have no file contents; everything else sits at file offset ==
        // vmaddr (the image is laid out as it is mapped).
        push_u32(b, if s.is_zerofill() { 0 } else { s.addr as u32 });
        push_u32(b, s.align);
        push_u32(b, 0); // reloff: relocations live in LC_DYSYMTAB's tables
        push_u32(b, 0); // nreloc
        push_u32(b, s.flags);
        push_u32(b, 0); // reserved1
        push_u32(b, 0); // reserved2
        push_u32(b, 0); // reserved3
    }
}

fn push_reloc(
    b: &mut Vec<u8>,
    address: u32,
    symbolnum: u32,
    pcrel: bool,
    length: u8,
    is_extern: bool,
    kind: u8,
) {
    push_u32(b, address);
    let word = (symbolnum & 0x00ff_ffff)
        | (u32::from(pcrel) << 24)
        | (u32::from(length & 3) << 25)
        | (u32::from(is_extern) << 27)
        | (u32::from(kind & 0xf) << 28);
    push_u32(b, word);
}

/// A name-based UUID from the bundle's bytes (FNV-1a, two lanes): the same inputs give the
/// same UUID, as ld64 derives it from the output's contents.
fn content_uuid(bytes: &[u8]) -> [u8; 16] {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut c: u64 = 0x8422_2325_cbf2_9ce4;
    for &byte in bytes {
        a = (a ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        c = (c ^ u64::from(byte))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&a.to_le_bytes());
    u[8..].copy_from_slice(&c.to_le_bytes());
    u[6] = (u[6] & 0x0f) | 0x30; // version 3 (name-based)
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("_vfam_*", "_vfam_device_create"));
        assert!(!glob_match("_vfam_*", "_vnet_x"));
        assert!(glob_match(
            "*29org_virtiodarwin_VirtioDevice*",
            "__ZN29org_virtiodarwin_VirtioDevice10gMetaClassE"
        ));
        assert!(glob_match("_kmod_info", "_kmod_info"));
        assert!(!glob_match("_kmod_info", "_kmod_info2"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }
}
