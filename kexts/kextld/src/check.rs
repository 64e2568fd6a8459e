//! A linked bundle checked against the rules xnu's kernel linker (`libkern/kxld`) and
//! ld64's `-kext` output follow ("What the kernel's linker accepts" in
//! `shared/notes/darwin-facts.md`).
//!
//! [`check`] returns every [`Violation`] it finds (empty = acceptable). Each rule is one
//! function below whose doc comment names the kxld code that enforces it (file and function
//! of xnu's `libkern/kxld`) or, where kxld is more lenient than what ld64 writes, says so.
//! A file too malformed to read at all is reported under the rule of the part that is
//! broken (header, load commands, symbol table or relocation tables) and nothing else is
//! checked.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use object::macho;

use crate::image::{Image, ImagePart, Reloc, Section, Symbol};
use crate::link::glob_match;

/// What a bundle is checked against, besides the kernel linker's fixed rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckContext {
    /// Every symbol the kext's declared libraries (`OSBundleLibraries`: kernel KPIs and
    /// library kexts) export, Mach-O spelling (`_IOLog`). Imports must come from here, and
    /// external definitions must not collide with it.
    pub library_exports: BTreeSet<String>,
    /// `*`-glob patterns of the symbols the kext itself is meant to export (what its
    /// dependents link against); every other definition must be local.
    pub export_patterns: Vec<String>,
}

impl CheckContext {
    pub fn new<L, P>(library_exports: L, export_patterns: P) -> Self
    where
        L: IntoIterator,
        L::Item: Into<String>,
        P: IntoIterator,
        P::Item: Into<String>,
    {
        CheckContext {
            library_exports: library_exports.into_iter().map(Into::into).collect(),
            export_patterns: export_patterns.into_iter().map(Into::into).collect(),
        }
    }
}

/// The rules, one per checking function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// [`check_header`]
    Header,
    /// [`check_load_commands`]
    LoadCommands,
    /// [`check_segments`]
    Segments,
    /// [`check_symbol_table`]
    SymbolTable,
    /// [`check_relocations`]
    Relocations,
    /// [`check_kmod_info`]
    KmodInfo,
    /// [`check_imports`]
    Imports,
    /// [`check_duplicate_definitions`]
    DuplicateDefinitions,
    /// [`check_exports`]
    Exports,
    /// [`check_metaclasses`]
    MetaClasses,
    /// [`check_vtables`]
    VTables,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Header => "header",
            Rule::LoadCommands => "load-commands",
            Rule::Segments => "segments",
            Rule::SymbolTable => "symbol-table",
            Rule::Relocations => "relocations",
            Rule::KmodInfo => "kmod-info",
            Rule::Imports => "imports",
            Rule::DuplicateDefinitions => "duplicate-definitions",
            Rule::Exports => "exports",
            Rule::MetaClasses => "metaclasses",
            Rule::VTables => "vtables",
        })
    }
}

/// One broken rule: which, and what exactly (symbol, section, address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.rule, self.message)
    }
}

type RuleCheck = fn(&Image<'_>, &CheckContext) -> Vec<String>;

const RULES: [(Rule, RuleCheck); 11] = [
    (Rule::Header, check_header),
    (Rule::LoadCommands, check_load_commands),
    (Rule::Segments, check_segments),
    (Rule::SymbolTable, check_symbol_table),
    (Rule::Relocations, check_relocations),
    (Rule::KmodInfo, check_kmod_info),
    (Rule::Imports, check_imports),
    (Rule::DuplicateDefinitions, check_duplicate_definitions),
    (Rule::Exports, check_exports),
    (Rule::MetaClasses, check_metaclasses),
    (Rule::VTables, check_vtables),
];

/// Checks `bundle` against every rule; empty = the kernel linker would accept it.
pub fn check(bundle: &[u8], ctx: &CheckContext) -> Vec<Violation> {
    let image = match Image::parse_detailed(bundle) {
        Ok(image) => image,
        Err(malformed) => {
            let rule = match malformed.part {
                ImagePart::Header => Rule::Header,
                ImagePart::LoadCommands => Rule::LoadCommands,
                ImagePart::Symtab => Rule::SymbolTable,
                ImagePart::Relocations => Rule::Relocations,
            };
            return vec![Violation {
                rule,
                message: format!("unreadable: {}", malformed.message),
            }];
        }
    };
    RULES
        .iter()
        .flat_map(|&(rule, check_rule)| {
            check_rule(&image, ctx)
                .into_iter()
                .map(move |message| Violation { rule, message })
        })
        .collect()
}

// ---------------------------------------------------------------- header and layout

/// The Mach-O header: `MH_MAGIC_64`, `CPU_TYPE_X86_64`, filetype `MH_KEXT_BUNDLE`.
///
/// kxld: `validate_and_swap_macho_64` (kxld_util.c) refuses any other magic;
/// `get_macho_slice_for_arch` (kxld_object.c) refuses a cputype other than the kernel's;
/// `kxld_object_init_from_macho` takes `MH_KEXT_BUNDLE` and, for x86_64, no `MH_OBJECT`
/// (`target_supports_object` is i386 only); every other filetype, `MH_BUNDLE` (what
/// `ld64.lld -bundle` writes) included, is `kKxldLogFiletypeNotSupported`.
pub fn check_header(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let header = &image.header;
    let mut found = Vec::new();
    if header.magic != macho::MH_MAGIC_64 {
        found.push(format!(
            "magic {:#010x} is not MH_MAGIC_64 ({:#010x})",
            header.magic,
            macho::MH_MAGIC_64
        ));
    }
    if header.cputype != macho::CPU_TYPE_X86_64 {
        found.push(format!(
            "cputype {:#x} is not CPU_TYPE_X86_64 ({:#x})",
            header.cputype,
            macho::CPU_TYPE_X86_64
        ));
    }
    if header.filetype != macho::MH_KEXT_BUNDLE {
        let what = match header.filetype {
            macho::MH_BUNDLE => " (MH_BUNDLE: what `ld64.lld -bundle` writes)",
            macho::MH_OBJECT => " (MH_OBJECT: only i386 kexts may be objects)",
            macho::MH_EXECUTE => " (MH_EXECUTE: a kernel, not a kext)",
            macho::MH_DYLIB => " (MH_DYLIB)",
            _ => "",
        };
        found.push(format!(
            "filetype {:#x}{what} is not MH_KEXT_BUNDLE ({:#x}); kxld refuses it",
            header.filetype,
            macho::MH_KEXT_BUNDLE
        ));
    }
    found
}

/// How kxld treats a load command in an `MH_KEXT_BUNDLE`.
enum CommandKind {
    /// Read by kxld.
    Used,
    /// Skipped as metadata in `__LINKEDIT`.
    Tolerated,
    /// "Invalid load command type in MH_KEXT_BUNDLE kext".
    Refused,
}

fn command_kind(cmd: u32) -> CommandKind {
    match cmd {
        macho::LC_SEGMENT_64
        | macho::LC_SYMTAB
        | macho::LC_DYSYMTAB
        | macho::LC_UUID
        | macho::LC_VERSION_MIN_MACOSX
        | macho::LC_BUILD_VERSION
        | macho::LC_SOURCE_VERSION => CommandKind::Used,
        macho::LC_CODE_SIGNATURE
        | macho::LC_FUNCTION_STARTS
        | macho::LC_DATA_IN_CODE
        | macho::LC_DYLD_INFO
        | macho::LC_DYLD_INFO_ONLY
        | macho::LC_DYLIB_CODE_SIGN_DRS
        | macho::LC_SEGMENT_SPLIT_INFO
        | macho::LC_NOTE => CommandKind::Tolerated,
        _ => CommandKind::Refused,
    }
}

/// Names of the load commands a bundle made by a dyld-oriented linker tends to carry.
fn command_name(cmd: u32) -> String {
    let name = match cmd {
        macho::LC_SEGMENT => "LC_SEGMENT (32-bit)",
        macho::LC_SEGMENT_64 => "LC_SEGMENT_64",
        macho::LC_SYMTAB => "LC_SYMTAB",
        macho::LC_DYSYMTAB => "LC_DYSYMTAB",
        macho::LC_UUID => "LC_UUID",
        macho::LC_UNIXTHREAD => "LC_UNIXTHREAD",
        macho::LC_LOAD_DYLIB => "LC_LOAD_DYLIB",
        macho::LC_LOAD_WEAK_DYLIB => "LC_LOAD_WEAK_DYLIB",
        macho::LC_REEXPORT_DYLIB => "LC_REEXPORT_DYLIB",
        macho::LC_ID_DYLIB => "LC_ID_DYLIB",
        macho::LC_LOAD_DYLINKER => "LC_LOAD_DYLINKER",
        macho::LC_RPATH => "LC_RPATH",
        macho::LC_MAIN => "LC_MAIN",
        macho::LC_DYLD_CHAINED_FIXUPS => "LC_DYLD_CHAINED_FIXUPS",
        macho::LC_DYLD_EXPORTS_TRIE => "LC_DYLD_EXPORTS_TRIE",
        macho::LC_DYLD_ENVIRONMENT => "LC_DYLD_ENVIRONMENT",
        macho::LC_ENCRYPTION_INFO_64 => "LC_ENCRYPTION_INFO_64",
        macho::LC_VERSION_MIN_IPHONEOS => "LC_VERSION_MIN_IPHONEOS",
        _ => return format!("load command {cmd:#x}"),
    };
    name.to_string()
}

/// The load commands: only those kxld reads (`LC_SEGMENT_64`, `LC_SYMTAB`, `LC_DYSYMTAB`,
/// `LC_UUID`, `LC_VERSION_MIN_MACOSX`/`LC_BUILD_VERSION`, `LC_SOURCE_VERSION`) or skips
/// as `__LINKEDIT` metadata (code signature, function starts, data in code, dyld info,
/// code-sign DRs, split info, notes); exactly one `LC_SYMTAB` and `LC_DYSYMTAB`; an
/// `LC_UUID` and a macOS minimum-version command. That the commands fit `sizeofcmds` and
/// the file is checked while reading them (a failure is reported under this rule).
///
/// kxld: `init_from_final_linked_image` (kxld_object.c) fails on any other command —
/// `LC_LOAD_DYLIB`, `LC_LOAD_DYLINKER`, chained fixups, export trie, `LC_MAIN`,
/// `LC_UNIXTHREAD` ("not valid in a kext") — and `validate_and_swap_macho_64` on a
/// command past the file. `init_from_bundle` dereferences the `LC_SYMTAB` unconditionally,
/// and without `LC_DYSYMTAB` no relocation is ever applied. kxld itself treats `LC_UUID`
/// and the version command as optional, but ld64 `-kext` always writes both: the kernel
/// reports a kext's UUID (kextstat, panic backtraces, symbolication) and kxld reads the
/// platform from a `LC_BUILD_VERSION` only for `PLATFORM_MACOS` and the other Apple
/// platforms (`kxld_versionmin_init_from_build_cmd`).
pub fn check_load_commands(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let mut found = Vec::new();
    let count = |cmd: u32| {
        image
            .load_commands
            .iter()
            .filter(|command| command.cmd == cmd)
            .count()
    };
    for command in &image.load_commands {
        if let CommandKind::Refused = command_kind(command.cmd) {
            found.push(format!(
                "{} at offset {:#x}: kxld refuses it in an MH_KEXT_BUNDLE (only segments, \
                 symtab, dysymtab, uuid, version and source version are allowed)",
                command_name(command.cmd),
                command.offset
            ));
        }
    }
    for (cmd, what) in [
        (
            macho::LC_SYMTAB,
            "kxld's init_from_bundle needs the symbol table",
        ),
        (
            macho::LC_DYSYMTAB,
            "the relocations live in its tables; without it none is applied",
        ),
        (
            macho::LC_UUID,
            "ld64 -kext always writes one; the kernel reports kexts by UUID",
        ),
    ] {
        match count(cmd) {
            1 => {}
            0 => found.push(format!("no {}: {what}", command_name(cmd))),
            n => found.push(format!(
                "{n} {} commands; one is expected",
                command_name(cmd)
            )),
        }
    }
    let version_commands = count(macho::LC_VERSION_MIN_MACOSX) + count(macho::LC_BUILD_VERSION);
    if version_commands == 0 {
        found.push(
            "no LC_VERSION_MIN_MACOSX or LC_BUILD_VERSION: the minimum macOS the kext was \
             built for is missing"
                .to_string(),
        );
    }
    for command in &image.load_commands {
        if command.cmd != macho::LC_BUILD_VERSION {
            continue;
        }
        // build_version_command: cmd, cmdsize, platform, minos, sdk, ntools.
        let platform = image
            .data
            .get(command.offset + 8..command.offset + 12)
            .and_then(|raw| raw.try_into().ok())
            .map(u32::from_le_bytes);
        match platform {
            Some(macho::PLATFORM_MACOS) => {}
            Some(platform) => found.push(format!(
                "LC_BUILD_VERSION at offset {:#x} names platform {platform}, not PLATFORM_MACOS (1)",
                command.offset
            )),
            None => found.push(format!(
                "LC_BUILD_VERSION at offset {:#x} is too short",
                command.offset
            )),
        }
    }
    found
}

/// The end of `start + len`, or `None` on overflow.
fn range_end(start: u64, len: u64) -> Option<u64> {
    start.checked_add(len)
}

/// Segments and sections: `__TEXT` first, at vmaddr 0 and file offset 0, holding the
/// header and load commands before its first section; `__LINKEDIT` last; every segment's
/// file range inside the file and no larger than its VM range; segment names unique;
/// sections inside their segment (VM and file), with the segment's name, at the same
/// offset from the segment start in the file as in memory; no two segments or sections
/// overlapping; no sections in a segment of vmsize 0.
///
/// kxld: `validate_and_swap_macho_64` (kxld_util.c) refuses segment and section data past
/// the file; `kxld_seg_add_section` (kxld_seg.c) a section whose segname is not its
/// segment's; `init_from_final_linked_image` skips segments of vmsize 0 *with their
/// sections*, which would shift every later section ordinal; `kxld_sect_init_from_macho_64`
/// treats a section at file offset 0 as having no contents; and
/// `kxld_relocator_process_table_reloc` finds a relocation's bytes at
/// `seg->fileoff + (address - seg->base_addr)`, so the file must mirror the VM layout. The
/// image is linked at vmaddr 0 with its header at its start (`kmod_info.hdr_size` is 0 for
/// final images, `kxld_object_get_vmsize`): `__TEXT` at 0/0 is ld64 `-kext`'s layout.
pub fn check_segments(image: &Image<'_>, ctx: &CheckContext) -> Vec<String> {
    let mut found = check_segment_layout(image, ctx);
    found.extend(check_header_room(image));
    found
}

/// Header room: at least [`MIN_HEADER_ROOM`] bytes between the end of the load commands
/// and the first section of `__TEXT`. kxld writes the linked kext's header and load
/// commands over the start of `__TEXT` (xnu `kxld_object.c`, exporting the linked object;
/// `kxld_sect.c`) and never checks that they end before the first section, which it
/// silently overwrites otherwise; its header can exceed the file's.
fn check_header_room(image: &Image<'_>) -> Vec<String> {
    let commands_end = 32 + u64::from(image.header.sizeofcmds);
    let first = image
        .sections
        .iter()
        .filter(|s| s.segname == "__TEXT")
        .map(|s| s.addr)
        .min();
    match first {
        Some(first) if first < commands_end + MIN_HEADER_ROOM => vec![format!(
            "only {} bytes between the load commands (ending at {commands_end:#x}) and the first section at {first:#x}: kxld writes its own header there, and needs at least {MIN_HEADER_ROOM}",
            first.saturating_sub(commands_end)
        )],
        _ => Vec::new(),
    }
}

/// The least room [`check_header_room`] accepts (kxld's user-space header measured 240
/// bytes larger than the file's; twice that, rounded).
pub const MIN_HEADER_ROOM: u64 = 512;

fn check_segment_layout(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let mut found = Vec::new();
    let file_len = image.data.len() as u64;
    let Some(first) = image.segments.first() else {
        return vec!["no LC_SEGMENT_64 at all".to_string()];
    };
    let commands_end = 32 + u64::from(image.header.sizeofcmds);
    if first.name != "__TEXT" || first.vmaddr != 0 || first.fileoff != 0 {
        found.push(format!(
            "the first segment is {} at vmaddr {:#x}, file offset {:#x}; it must be __TEXT at 0, 0 (holding the Mach-O header)",
            first.name, first.vmaddr, first.fileoff
        ));
    } else if first.filesize < commands_end {
        found.push(format!(
            "__TEXT's file size {:#x} does not cover the header and load commands (up to {commands_end:#x})",
            first.filesize
        ));
    }
    if let Some(text) = image.segment("__TEXT") {
        for section in &text.sections {
            if !section.is_zerofill() && u64::from(section.offset) < commands_end {
                found.push(format!(
                    "{} at file offset {:#x} overlaps the header and load commands (up to {commands_end:#x})",
                    section.full_name(),
                    section.offset
                ));
            }
        }
    }
    match image.segments.last() {
        Some(last) if last.name == "__LINKEDIT" => {}
        Some(last) => found.push(format!(
            "the last segment is {}; __LINKEDIT must come last",
            last.name
        )),
        None => {}
    }
    for (index, segment) in image.segments.iter().enumerate() {
        let name = &segment.name;
        if image.segments[..index]
            .iter()
            .any(|earlier| &earlier.name == name)
        {
            found.push(format!("segment {name} appears twice"));
        }
        match range_end(segment.fileoff, segment.filesize) {
            Some(end) if end <= file_len => {}
            _ => found.push(format!(
                "segment {name}'s file range {:#x}+{:#x} runs past the end of the {file_len:#x}-byte file",
                segment.fileoff, segment.filesize
            )),
        }
        if segment.filesize > segment.vmsize {
            found.push(format!(
                "segment {name}'s file size {:#x} exceeds its vmsize {:#x}",
                segment.filesize, segment.vmsize
            ));
        }
        if segment.vmsize == 0 && !segment.sections.is_empty() {
            found.push(format!(
                "segment {name} has vmsize 0 but {} sections: kxld skips it and numbers the later sections differently",
                segment.sections.len()
            ));
        }
        let Some(segment_vm_end) = range_end(segment.vmaddr, segment.vmsize) else {
            found.push(format!("segment {name}'s VM range overflows"));
            continue;
        };
        for section in &segment.sections {
            let section_name = section.full_name();
            if section.segname != *name {
                found.push(format!(
                    "{section_name} is listed in segment {name}: kxld requires the section's segname to match"
                ));
            }
            let Some(section_vm_end) = range_end(section.addr, section.size) else {
                found.push(format!("{section_name}'s VM range overflows"));
                continue;
            };
            if section.addr < segment.vmaddr || section_vm_end > segment_vm_end {
                found.push(format!(
                    "{section_name} at {:#x}..{section_vm_end:#x} lies outside its segment {name} ({:#x}..{segment_vm_end:#x})",
                    section.addr, segment.vmaddr
                ));
                continue;
            }
            if section.is_zerofill() || section.size == 0 {
                continue;
            }
            let offset = u64::from(section.offset);
            let expected = segment
                .fileoff
                .saturating_add(section.addr - segment.vmaddr);
            if offset == 0 {
                found.push(format!(
                    "{section_name} has contents but file offset 0: kxld reads that as no contents"
                ));
            } else if offset != expected {
                found.push(format!(
                    "{section_name} is at file offset {offset:#x} but {expected:#x} by its address: kxld finds relocated bytes by address"
                ));
            }
            let file_end = offset.saturating_add(section.size);
            let segment_file_end = segment.fileoff.saturating_add(segment.filesize);
            if offset < segment.fileoff || file_end > segment_file_end {
                found.push(format!(
                    "{section_name}'s contents {offset:#x}..{file_end:#x} lie outside its segment's file range"
                ));
            } else if file_end > file_len {
                found.push(format!(
                    "{section_name}'s contents {offset:#x}..{file_end:#x} run past the end of the file"
                ));
            }
        }
    }
    found.extend(overlaps(
        image.segments.iter().map(|segment| {
            (
                format!("segment {}", segment.name),
                segment.vmaddr,
                segment.vmsize,
            )
        }),
        "VM",
    ));
    found.extend(overlaps(
        image.segments.iter().map(|segment| {
            (
                format!("segment {}", segment.name),
                segment.fileoff,
                segment.filesize,
            )
        }),
        "file",
    ));
    found.extend(overlaps(
        image
            .sections
            .iter()
            .map(|section| (section.full_name(), section.addr, section.size)),
        "VM",
    ));
    found
}

/// Pairs of non-empty ranges that overlap.
fn overlaps(ranges: impl Iterator<Item = (String, u64, u64)>, what: &str) -> Vec<String> {
    let mut ranges: Vec<_> = ranges.filter(|&(_, _, len)| len > 0).collect();
    ranges.sort_by_key(|&(_, start, _)| start);
    ranges
        .windows(2)
        .filter_map(|pair| {
            let (first, start, len) = &pair[0];
            let (second, next_start, _) = &pair[1];
            let overlapping = start.checked_add(*len).is_none_or(|end| end > *next_start);
            overlapping.then(|| format!("{first} and {second} overlap in {what} space"))
        })
        .collect()
}

// ---------------------------------------------------------------- symbols

/// kxld's "external" (`init_predicates`, kxld_sym.c): `N_EXT` without `N_PEXT`.
fn is_kxld_external(symbol: &Symbol) -> bool {
    symbol.is_external() && !symbol.is_private_external()
}

/// A definition other kexts can bind to (kxld's `kxld_sym_is_exported`).
fn is_external_definition(symbol: &Symbol) -> bool {
    !symbol.is_stab()
        && matches!(symbol.kind(), macho::N_SECT | macho::N_ABS)
        && is_kxld_external(symbol)
}

/// The symbol table and `LC_DYSYMTAB`: symbols, strings, relocation and indirect-symbol
/// tables inside `__LINKEDIT`; the three partitions contiguous, in order (locals, external
/// definitions, undefined) and covering `nsyms`; locals not external, external definitions
/// `N_SECT | N_EXT`, undefined symbols `N_UNDF | N_EXT` with value 0; each `N_SECT`
/// symbol's section exists and holds its value; no common symbols; no `N_INDR`; a
/// `__DATA,__nl_symbol_ptr` section's indirect entries inside the indirect table. String
/// offsets inside the string table are checked while reading (reported under this rule).
///
/// kxld: `validate_and_swap_macho_64` refuses tables past the file; `init_predicates`
/// (kxld_sym.c) refuses unknown symbol types; `resolve_symbols` (kxld_kext.c) refuses
/// common symbols ("Common symbols are not supported in kernel extensions. Use
/// -fno-common"). `N_INDR` is how the kernel's symbol-set pseudo-kexts alias KPIs; a kext
/// that carries one has its target resolved like an import, which ld64 never writes for a
/// kext. `process_symbol_pointers` (kxld_object.c) fails when `__nl_symbol_ptr`'s entries
/// run past `nindirectsyms`. The partition and `__LINKEDIT` rules are the `LC_DYSYMTAB`
/// contract (`loader.h`) ld64 keeps and the kernel relies on when it keeps a library
/// kext's `__LINKEDIT` to link dependents against.
pub fn check_symbol_table(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let mut found = Vec::new();
    let Some(symtab) = image.symtab else {
        return found; // reported by check_load_commands
    };
    let linkedit = image.segment("__LINKEDIT");
    let mut tables = vec![
        ("symbol table", symtab.symoff, symtab.nsyms, 16),
        ("string table", symtab.stroff, symtab.strsize, 1),
    ];
    if let Some(dysymtab) = image.dysymtab {
        tables.push((
            "external relocation table",
            dysymtab.extreloff,
            dysymtab.nextrel,
            8,
        ));
        tables.push((
            "local relocation table",
            dysymtab.locreloff,
            dysymtab.nlocrel,
            8,
        ));
        tables.push((
            "indirect symbol table",
            dysymtab.indirectsymoff,
            dysymtab.nindirectsyms,
            4,
        ));
    }
    for (what, offset, count, entry_size) in tables {
        if count == 0 {
            continue;
        }
        let start = u64::from(offset);
        let end = start + u64::from(count) * entry_size;
        match linkedit {
            Some(segment)
                if start >= segment.fileoff
                    && end <= segment.fileoff.saturating_add(segment.filesize) => {}
            Some(_) => found.push(format!(
                "the {what} ({start:#x}..{end:#x}) is not inside __LINKEDIT's file range"
            )),
            None => found.push(format!("the {what} has no __LINKEDIT segment to live in")),
        }
    }

    let nsyms = u64::from(symtab.nsyms);
    // (start of external definitions, start of undefined symbols), when consistent.
    let partitions = image.dysymtab.and_then(|d| {
        let locals = (u64::from(d.ilocalsym), u64::from(d.nlocalsym));
        let extdefs = (u64::from(d.iextdefsym), u64::from(d.nextdefsym));
        let undefs = (u64::from(d.iundefsym), u64::from(d.nundefsym));
        let consistent = locals.0 == 0
            && extdefs.0 == locals.0 + locals.1
            && undefs.0 == extdefs.0 + extdefs.1
            && undefs.0 + undefs.1 == nsyms;
        if !consistent {
            found.push(format!(
                "LC_DYSYMTAB partitions locals {}+{}, external definitions {}+{}, undefined {}+{} are not contiguous from 0 covering all {nsyms} symbols",
                locals.0, locals.1, extdefs.0, extdefs.1, undefs.0, undefs.1
            ));
        }
        consistent.then_some((extdefs.0, undefs.0))
    });
    let partition_name = |index: usize| -> Option<&'static str> {
        let (extdef_start, undef_start) = partitions?;
        let index = index as u64;
        Some(if index < extdef_start {
            "local"
        } else if index < undef_start {
            "external definition"
        } else {
            "undefined"
        })
    };

    for (index, symbol) in image.symbols.iter().enumerate() {
        if symbol.is_stab() {
            continue;
        }
        let name = &symbol.name;
        match symbol.kind() {
            macho::N_UNDF | macho::N_ABS | macho::N_SECT => {}
            macho::N_INDR => {
                found.push(format!(
                    "symbol {name} is N_INDR (an alias): kexts do not carry indirect symbols"
                ));
                continue;
            }
            other => {
                found.push(format!(
                    "symbol {name} has type {other:#x}, which kxld refuses"
                ));
                continue;
            }
        }
        if symbol.is_common() {
            found.push(format!(
                "symbol {name} is a common symbol (size {:#x}): kxld refuses them; compile with -fno-common",
                symbol.n_value
            ));
            continue;
        }
        if symbol.kind() == macho::N_SECT {
            match image.section_by_ordinal(u32::from(symbol.n_sect)) {
                None => found.push(format!(
                    "symbol {name} is in section {}, which does not exist",
                    symbol.n_sect
                )),
                Some(section) => {
                    let inside = symbol.n_value >= section.addr
                        && symbol.n_value - section.addr <= section.size;
                    if !inside {
                        found.push(format!(
                            "symbol {name}'s value {:#x} lies outside its section {}",
                            symbol.n_value,
                            section.full_name()
                        ));
                    }
                }
            }
        }
        let expected_shape = match partition_name(index) {
            Some("local") => (!is_kxld_external(symbol) && symbol.kind() != macho::N_UNDF)
                .then_some(())
                .ok_or("a defined, non-external symbol"),
            Some("external definition") => (symbol.kind() == macho::N_SECT
                && is_kxld_external(symbol))
            .then_some(())
            .ok_or("N_SECT | N_EXT (without N_PEXT)"),
            Some(_) => (symbol.kind() == macho::N_UNDF
                && symbol.is_external()
                && symbol.n_sect == macho::NO_SECT)
                .then_some(())
                .ok_or("N_UNDF | N_EXT in no section"),
            None => Ok(()),
        };
        if let Err(expected) = expected_shape {
            found.push(format!(
                "symbol {index} ({name}, n_type {:#04x}) is in the {} partition, which holds {expected}",
                symbol.n_type,
                partition_name(index).unwrap_or_default()
            ));
        }
    }

    if let Some(dysymtab) = image.dysymtab {
        for section in &image.sections {
            let is_symbol_pointers = section.segname == "__DATA"
                && section.sectname == "__nl_symbol_ptr"
                && section.kind() == macho::S_NON_LAZY_SYMBOL_POINTERS;
            if is_symbol_pointers {
                let entries = u64::from(section.reserved1) + section.size / 8;
                if entries > u64::from(dysymtab.nindirectsyms) {
                    found.push(format!(
                        "{} needs indirect symbols up to {entries} but the table has {}",
                        section.full_name(),
                        dysymtab.nindirectsyms
                    ));
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------- relocations

fn reloc_kind_name(kind: u8) -> &'static str {
    match kind {
        macho::X86_64_RELOC_UNSIGNED => "X86_64_RELOC_UNSIGNED",
        macho::X86_64_RELOC_SIGNED => "X86_64_RELOC_SIGNED",
        macho::X86_64_RELOC_BRANCH => "X86_64_RELOC_BRANCH",
        macho::X86_64_RELOC_GOT_LOAD => "X86_64_RELOC_GOT_LOAD",
        macho::X86_64_RELOC_GOT => "X86_64_RELOC_GOT",
        macho::X86_64_RELOC_SUBTRACTOR => "X86_64_RELOC_SUBTRACTOR",
        macho::X86_64_RELOC_SIGNED_1 => "X86_64_RELOC_SIGNED_1",
        macho::X86_64_RELOC_SIGNED_2 => "X86_64_RELOC_SIGNED_2",
        macho::X86_64_RELOC_SIGNED_4 => "X86_64_RELOC_SIGNED_4",
        macho::X86_64_RELOC_TLV => "X86_64_RELOC_TLV",
        _ => "unknown relocation type",
    }
}

fn describe_reloc(reloc: &Reloc) -> String {
    format!(
        "{} length {} {}{}",
        reloc_kind_name(reloc.kind),
        reloc.length,
        if reloc.pcrel { "pcrel" } else { "absolute" },
        if reloc.is_extern { " extern" } else { "" }
    )
}

/// The section with file contents holding `width` bytes at `address`, or why there is none.
fn slot_section<'i>(image: &'i Image<'_>, address: i32, width: u64) -> Result<&'i Section, String> {
    let address = u64::try_from(address).map_err(|_| format!("address {address} is negative"))?;
    let section = image
        .section_at(address)
        .ok_or_else(|| format!("{address:#x} is in no section"))?;
    if section.is_zerofill() {
        return Err(format!(
            "{address:#x} is in zerofill section {}, which has no file contents to relocate",
            section.full_name()
        ));
    }
    if (address - section.addr).saturating_add(width) > section.size {
        return Err(format!(
            "the {width}-byte slot at {address:#x} runs past the end of {}",
            section.full_name()
        ));
    }
    if image.section_data(section).is_none() {
        return Err(format!(
            "{}'s contents are outside the file",
            section.full_name()
        ));
    }
    Ok(section)
}

/// Relocations, all in `LC_DYSYMTAB`'s tables (sections carry none), `r_address` relative
/// to the image base. Local: `X86_64_RELOC_UNSIGNED`, length 3, not pc-relative,
/// `r_extern` 0, `r_symbolnum` a section ordinal, the slot inside a section with file
/// contents, and the 8-byte value there inside the section it names. External:
/// `X86_64_RELOC_UNSIGNED` length 3 absolute, or `X86_64_RELOC_BRANCH` length 2
/// pc-relative inside a section of instructions; `r_extern` 1, naming an undefined
/// symbol, and a call not to a weak import; the slot holds 0 (no addend). No address
/// relocated twice.
///
/// kxld: `process_relocs_from_tables` (kxld_object.c) applies only the `LC_DYSYMTAB`
/// tables to a final image (`kxld_sect_init_from_macho_64` reads section relocations but
/// nothing applies them) and needs every address in a segment;
/// `kxld_relocator_process_table_reloc` patches the bytes at that address;
/// `x86_64_process_reloc` (kxld_reloc.c) accepts only lengths 2 and 3, requires `pcrel`
/// for `BRANCH` and refuses it for `UNSIGNED`; `calculate_targets` slides a local
/// relocation by its section (`r_symbolnum` - 1), so the value must lie in that section.
/// kxld would also take `SIGNED*`, `GOT*` and `SUBTRACTOR` entries, but ld64 `-kext`
/// resolves all of those at link time (the shape in darwin-facts.md); an image carrying
/// them was not linked the way the rest of this checker assumes.
///
/// Relocations inside read-only sections are not refused: kxld applies relocations to the
/// image before the kernel sets segment protections (every `BRANCH` to an import is in
/// `__TEXT,__text`), and nothing in kxld forbids a pointer slot in `__TEXT`. Whether
/// kmutil's auxiliary collection (macOS 11+) minds is not known here, so no rule is made.
///
/// No addend on an external relocation: kxld (10.13–10.15) adds the symbol's address to
/// the slot (`x86_64_process_reloc`, kxld_reloc.c), but the kext collection builder of
/// macOS 11+ drops the addend that `MachOAnalyzer::forEachBind` (dyld
/// common/MachOAnalyzer.cpp) reads from the slot: `DylibFixups::processFixups` (dyld
/// kernel-collection-builder/AppCacheBuilder.cpp) stores the bare symbol address for a
/// pointer and `target - (pc + 4)` for a call, so `&import + 8` would silently become
/// `&import` there.
///
/// No call to a weak import: the same builder binds a weak import it cannot find only
/// where a pointer holds it (`!foundSymbol && weakImport` in `processFixups`); a call
/// fails the whole collection with "Unexpected bind type". kxld would bind either.
///
/// At least one external relocation: kxld takes an image without any for one it already
/// linked (`kxld_object.c`, `kxld_object_is_linked`: "has external relocations"), skips
/// linking it, and an unlinked image then runs unrelocated.
pub fn check_relocations(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let mut found = Vec::new();
    if image.external_relocs.is_empty() {
        found.push(
            "no external relocation: kxld would take the bundle for an already linked image and not link it"
                .to_string(),
        );
    }
    for section in &image.sections {
        if section.nreloc != 0 {
            found.push(format!(
                "{} carries {} section relocations: kxld ignores them in a linked image; they belong in LC_DYSYMTAB",
                section.full_name(),
                section.nreloc
            ));
        }
    }
    let mut relocated: HashMap<i32, &'static str> = HashMap::new();
    for (index, reloc) in image.local_relocs.iter().enumerate() {
        let at = format!("local relocation {index} at {:#x}", reloc.address);
        if let Some(previous) = relocated.insert(reloc.address, "local") {
            found.push(format!(
                "{at}: the address already has a {previous} relocation; the kernel would apply both"
            ));
        }
        if reloc.kind != macho::X86_64_RELOC_UNSIGNED || reloc.length != 3 || reloc.pcrel {
            found.push(format!(
                "{at} is {}: local relocations are X86_64_RELOC_UNSIGNED length 3, absolute",
                describe_reloc(reloc)
            ));
            continue;
        }
        if reloc.is_extern {
            found.push(format!(
                "{at} has r_extern set: it belongs in the external table"
            ));
            continue;
        }
        let target = match image.section_by_ordinal(reloc.symbolnum) {
            Some(section) => section,
            None => {
                found.push(format!(
                    "{at} names section {}, which does not exist ({} sections)",
                    reloc.symbolnum,
                    image.sections.len()
                ));
                continue;
            }
        };
        if let Err(why) = slot_section(image, reloc.address, 8) {
            found.push(format!("{at}: {why}"));
            continue;
        }
        let Some(value) = u64::try_from(reloc.address)
            .ok()
            .and_then(|address| image.u64_at(address))
        else {
            continue; // slot_section checked the slot is readable
        };
        let inside = value >= target.addr && value - target.addr <= target.size;
        if !inside {
            found.push(format!(
                "{at} holds {value:#x}, outside the section it names ({} {:#x}..{:#x}): the kernel would slide it wrongly",
                target.full_name(),
                target.addr,
                target.addr.saturating_add(target.size)
            ));
        }
    }
    for (index, reloc) in image.external_relocs.iter().enumerate() {
        let at = format!("external relocation {index} at {:#x}", reloc.address);
        if let Some(previous) = relocated.insert(reloc.address, "external") {
            found.push(format!(
                "{at}: the address already has a {previous} relocation; the kernel would apply both"
            ));
        }
        let pointer =
            reloc.kind == macho::X86_64_RELOC_UNSIGNED && reloc.length == 3 && !reloc.pcrel;
        let call = reloc.kind == macho::X86_64_RELOC_BRANCH && reloc.length == 2 && reloc.pcrel;
        if !pointer && !call {
            found.push(format!(
                "{at} is {}: external relocations are X86_64_RELOC_UNSIGNED length 3 absolute, or X86_64_RELOC_BRANCH length 2 pcrel",
                describe_reloc(reloc)
            ));
            continue;
        }
        if !reloc.is_extern {
            found.push(format!(
                "{at} has r_extern clear: external relocations name a symbol"
            ));
            continue;
        }
        match image.symbols.get(reloc.symbolnum as usize) {
            None => found.push(format!(
                "{at} names symbol {}, past the {} symbols",
                reloc.symbolnum,
                image.symbols.len()
            )),
            Some(symbol) if symbol.is_stab() || symbol.kind() != macho::N_UNDF => {
                found.push(format!(
                    "{at} names {}, which is not an undefined symbol: internal references are local relocations",
                    symbol.name
                ))
            }
            // dyld's kext collection builder (AppCacheBuilder.cpp, `!foundSymbol &&
            // weakImport`) binds a missing weak import only where a pointer holds it:
            // any other bind type fails the collection ("Unexpected bind type").
            Some(symbol) if call && symbol.n_desc & macho::N_WEAK_REF != 0 => {
                found.push(format!(
                    "{at} calls {}, a weak import, directly: macOS 11 and later cannot build a kext collection holding a direct call to a weak symbol the kernel lacks; call it through a function pointer (loaded after OSKextSymbolIsResolved)",
                    symbol.name
                ))
            }
            Some(_) => {}
        }
        let width = if call { 4 } else { 8 };
        match slot_section(image, reloc.address, width) {
            Err(why) => {
                found.push(format!("{at}: {why}"));
                continue;
            }
            Ok(section) if call && !section.has_instructions() => found.push(format!(
                "{at} is a call (X86_64_RELOC_BRANCH) in {}, which holds no instructions",
                section.full_name()
            )),
            Ok(_) => {}
        }
        let addend = u64::try_from(reloc.address).ok().and_then(|address| {
            let bytes = image.bytes_at(address, width as usize)?;
            Some(if call {
                i64::from(i32::from_le_bytes(bytes.try_into().ok()?))
            } else {
                i64::from_le_bytes(bytes.try_into().ok()?)
            })
        });
        if let Some(addend) = addend.filter(|&addend| addend != 0) {
            let name = image
                .symbols
                .get(reloc.symbolnum as usize)
                .map_or("?", |symbol| symbol.name.as_str());
            found.push(format!(
                "{at} ({name}) holds the addend {addend:+}: macOS 11+ (kmutil) ignores it and binds to {name} itself, while kxld adds it; an external relocation's slot must hold 0"
            ));
        }
    }
    found
}

// ---------------------------------------------------------------- kmod_info

/// `sizeof(kmod_info_t)` on x86_64 (`mach/kmod.h`, `#pragma pack(4)`): next, info_version,
/// id, name[64], version[64], reference_count, reference_list, address, size, hdr_size,
/// start, stop.
const KMOD_INFO_SIZE: u64 = 196;

/// `_kmod_info` is defined, in `__DATA`, in a section with file contents, with room for a
/// whole `kmod_info_t`.
///
/// kxld: `populate_kmod_info` (kxld_object.c) looks `_kmod_info` up among the locally
/// defined symbols, fails with `kKxldLogNoKmodInfo` when it is missing, and writes
/// `address`, `size` and `hdr_size` into the section's contents; the kernel then reads
/// the kext's name, version and start/stop routines from it (OSKext).
pub fn check_kmod_info(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let Some(symbol) = image
        .symbols
        .iter()
        .find(|symbol| symbol.name == "_kmod_info" && symbol.is_section_defined())
    else {
        return vec![
            "no _kmod_info defined: kxld fails with \"The kext is missing its kmod_info structure.\"; link the kext's kmod_info (KMOD_EXPLICIT_DECL) in"
                .to_string(),
        ];
    };
    let Some(section) = image.section_by_ordinal(u32::from(symbol.n_sect)) else {
        return Vec::new(); // reported by check_symbol_table
    };
    let mut found = Vec::new();
    if section.segname != "__DATA" {
        found.push(format!(
            "_kmod_info is in {}; kxld writes into it, so it belongs in __DATA",
            section.full_name()
        ));
    }
    if section.is_zerofill() {
        found.push(format!(
            "_kmod_info is in zerofill section {}: its name, version and start/stop routines would be lost",
            section.full_name()
        ));
    }
    let end = symbol.n_value.saturating_add(KMOD_INFO_SIZE);
    if end > section.addr.saturating_add(section.size) {
        found.push(format!(
            "_kmod_info at {:#x} has no room for a {KMOD_INFO_SIZE}-byte kmod_info_t before the end of {}",
            symbol.n_value,
            section.full_name()
        ));
    }
    found
}

// ---------------------------------------------------------------- imports and exports

/// kxld's `KXLD_WEAK_TEST_SYMBOL`: a kext that references it may leave weak imports
/// unresolved.
const WEAK_TEST_SYMBOL: &str = "_gOSKextUnresolved";

/// Symbols kxld renames while reading a kext's symbol table (`kxld_sym_init_from_macho64`,
/// kxld_sym.c): OSMetaClassBase's fourth pad slot became `Dispatch(IORPC)` (macOS 11), so
/// a kext built against older headers imports the old name and binds to the new one.
const KXLD_RENAMED_IMPORTS: [(&str, &str); 1] = [(
    "__ZN15OSMetaClassBase25_RESERVEDOSMetaClassBase3Ev",
    "__ZN15OSMetaClassBase8DispatchE5IORPC",
)];

/// Whether a declared library exports `name`, or the name kxld reads it as.
fn library_exports_import(ctx: &CheckContext, name: &str) -> bool {
    ctx.library_exports.contains(name)
        || KXLD_RENAMED_IMPORTS
            .iter()
            .any(|&(old, new)| name == old && ctx.library_exports.contains(new))
}

/// Every undefined symbol is exported by one of the declared libraries (under the name
/// kxld reads it as: [`KXLD_RENAMED_IMPORTS`]), except weak references in a kext that
/// tests for them (references `_gOSKextUnresolved`). The run-time destructor registration
/// functions (`___cxa_atexit`, `___dso_handle`, `_atexit`) get their own explanation.
///
/// kxld: `resolve_symbols` (kxld_kext.c) binds each undefined symbol against the symbols
/// of the kext's dependencies; one that stays unresolved fails the link in
/// `validate_symbols` (weak references are bound to `kext_weak_symbol_referenced` if the
/// kext references `_gOSKextUnresolved`). The kernel exports neither `___cxa_atexit` nor
/// `___dso_handle` (darwin-facts.md), nor `atexit` (xnu's `config/*.exports`): a kext's
/// global destructors must be in `__mod_term_func`.
pub fn check_imports(image: &Image<'_>, ctx: &CheckContext) -> Vec<String> {
    let tests_for_weak = image.symbol(WEAK_TEST_SYMBOL).is_some();
    image
        .symbols
        .iter()
        .filter(|symbol| symbol.is_undefined())
        .filter(|symbol| !library_exports_import(ctx, &symbol.name))
        .filter(|symbol| !(tests_for_weak && symbol.n_desc & macho::N_WEAK_REF != 0))
        .map(|symbol| match symbol.name.as_str() {
            "___cxa_atexit" | "___dso_handle" | "_atexit" => format!(
                "{} is imported, but the kernel exports none of ___cxa_atexit, ___dso_handle and atexit: the compiler registered global destructors at run time; compile kext C++ with -fapple-kext -mkernel -fno-use-cxa-atexit -fno-register-global-dtors-with-atexit so that they go to __mod_term_func",
                symbol.name
            ),
            name if symbol.n_desc & macho::N_WEAK_REF != 0 => format!(
                "{name} (a weak reference) is exported by no declared library, and the kext does not reference {WEAK_TEST_SYMBOL} to test for it"
            ),
            name => format!(
                "{name} is imported but exported by no declared library (OSBundleLibraries): the kernel linker cannot resolve it"
            ),
        })
        .collect()
}

/// No external definition of a symbol a declared library exports.
///
/// kxld: `resolve_symbols` (kxld_kext.c) fails with "The following symbols were defined
/// more than once" for every exported (defined, `N_EXT` without `N_PEXT`) symbol of the
/// kext that a dependency also defines at another address.
pub fn check_duplicate_definitions(image: &Image<'_>, ctx: &CheckContext) -> Vec<String> {
    image
        .symbols
        .iter()
        .filter(|symbol| is_external_definition(symbol))
        .filter(|symbol| ctx.library_exports.contains(&symbol.name))
        .map(|symbol| {
            format!(
                "{} is defined here and exported by a declared library: \"defined more than once\"; keep it local",
                symbol.name
            )
        })
        .collect()
}

/// External definitions are only those matching the kext's export patterns.
///
/// Not a kxld check in itself, but what keeps the previous rule from firing later: every
/// external definition is visible to the kexts that declare this one as a library, and
/// collides with whatever else defines the name (darwin-facts.md: "export only what
/// dependents link against").
pub fn check_exports(image: &Image<'_>, ctx: &CheckContext) -> Vec<String> {
    image
        .symbols
        .iter()
        .filter(|symbol| is_external_definition(symbol))
        .filter(|symbol| {
            !ctx.export_patterns
                .iter()
                .any(|pattern| glob_match(pattern, &symbol.name))
        })
        .map(|symbol| {
            format!(
                "{} is an external definition matching none of the kext's export patterns ({})",
                symbol.name,
                ctx.export_patterns.join(", ")
            )
        })
        .collect()
}

// ---------------------------------------------------------------- C++

/// The C++ symbol classes kxld distinguishes by name (`init_predicates`, kxld_sym.c; the
/// order of the tests matters and is kxld's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CxxRole {
    /// `__ZTVN…` (kxld tests only the prefix).
    MetaClassVTable,
    /// `__ZTV…`
    ClassVTable,
    /// contains `_RESERVED`
    PadSlot,
    /// contains `10gMetaClassE`
    MetaClass,
    /// contains `10superClassE`
    SuperMetaClassPointer,
    Other,
}

fn cxx_role(name: &str) -> Option<CxxRole> {
    if !name.starts_with("__Z") {
        return None;
    }
    Some(if name.starts_with("__ZTVN") {
        CxxRole::MetaClassVTable
    } else if name.starts_with("__ZTV") {
        CxxRole::ClassVTable
    } else if name.contains("_RESERVED") {
        CxxRole::PadSlot
    } else if name.contains("10gMetaClassE") {
        CxxRole::MetaClass
    } else if name.contains("10superClassE") {
        CxxRole::SuperMetaClassPointer
    } else {
        CxxRole::Other
    })
}

/// kxld's `is_cxx`: a `__Z` name or the pure-virtual stub (`kxld_sym_name_is_pure_virtual`).
fn is_cxx_name(name: &str) -> bool {
    name.starts_with("__Z") || name == "___cxa_pure_virtual"
}

/// Relocations by address.
fn relocs_by_address(relocs: &[Reloc]) -> HashMap<i64, &Reloc> {
    relocs
        .iter()
        .map(|reloc| (i64::from(reloc.address), reloc))
        .collect()
}

fn defined_symbol_named<'i>(image: &'i Image<'_>, name: &str) -> Option<&'i Symbol> {
    image
        .symbols
        .iter()
        .find(|symbol| symbol.name == name && symbol.is_section_defined())
}

/// Defined C++ symbols at `address` (kxld's index of C++ symbols by value).
fn cxx_symbols_at<'i>(image: &'i Image<'_>, address: u64) -> impl Iterator<Item = &'i Symbol> {
    image.symbols.iter().filter(move |symbol| {
        symbol.is_section_defined() && symbol.n_value == address && is_cxx_name(&symbol.name)
    })
}

/// IOKit classes: for every `__ZN<C>10superClassE`, the bundle defines the class's vtable
/// `__ZTV<C>` and its MetaClass vtable `__ZTVN<C>9MetaClassE`, and the superClass pointer
/// carries a relocation whose target is a `__ZN<Super>10gMetaClassE` symbol (named by an
/// external relocation, or found at the pointed-to address for a local one).
///
/// kxld: `patch_vtables` (kxld_kext.c) walks every symbol named like a super-metaclass
/// pointer (any symbol, defined or not); `get_vtable_syms_from_smcp` fails with
/// `kKxldLogMissingVtable` when either vtable is not defined in the kext (x86_64 patches
/// strictly); `get_metaclass_symbol_from_super_meta_class_pointer_symbol` needs the
/// relocation at the pointer (`kxld_object_get_reloc_at_symbol`) and a symbol for its
/// target (`kxld_reloc_get_symbol`), whose name `kxld_sym_get_class_name_from_metaclass`
/// turns into the super class.
pub fn check_metaclasses(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let external = relocs_by_address(&image.external_relocs);
    let local = relocs_by_address(&image.local_relocs);
    let mut found = Vec::new();
    for pointer in &image.symbols {
        if pointer.is_stab() || cxx_role(&pointer.name) != Some(CxxRole::SuperMetaClassPointer) {
            continue;
        }
        let name = &pointer.name;
        let Some(class) = name
            .strip_prefix("__ZN")
            .and_then(|rest| rest.strip_suffix("10superClassE"))
            .filter(|class| !class.is_empty())
        else {
            found.push(format!(
                "{name} looks like a superClass pointer to kxld but is not __ZN<class>10superClassE"
            ));
            continue;
        };
        for vtable in [format!("__ZTV{class}"), format!("__ZTVN{class}9MetaClassE")] {
            if defined_symbol_named(image, &vtable).is_none() {
                found.push(format!(
                    "class {class} ({name}) has no {vtable} defined in the kext: kxld cannot patch it"
                ));
            }
        }
        if !pointer.is_section_defined() {
            found.push(format!(
                "{name} is not defined in the kext, yet kxld treats it as a class of this kext"
            ));
            continue;
        }
        let address = i64::try_from(pointer.n_value).unwrap_or(-1);
        let target = if let Some(reloc) = external.get(&address) {
            image
                .symbols
                .get(reloc.symbolnum as usize)
                .map(|symbol| symbol.name.clone())
        } else if local.contains_key(&address) {
            image
                .u64_at(pointer.n_value)
                .and_then(|value| {
                    cxx_symbols_at(image, value)
                        .find(|symbol| cxx_role(&symbol.name) == Some(CxxRole::MetaClass))
                        .or_else(|| cxx_symbols_at(image, value).next())
                })
                .map(|symbol| symbol.name.clone())
        } else {
            found.push(format!(
                "{name} at {:#x} has no relocation: kxld cannot find class {class}'s super class",
                pointer.n_value
            ));
            continue;
        };
        match target {
            Some(target) if cxx_role(&target) == Some(CxxRole::MetaClass) => {
                let super_class = target
                    .strip_prefix("__ZN")
                    .and_then(|rest| rest.strip_suffix("10gMetaClassE"))
                    .filter(|super_class| !super_class.is_empty());
                if super_class.is_none() {
                    found.push(format!(
                        "{name} points to {target}, which is not __ZN<class>10gMetaClassE"
                    ));
                }
            }
            Some(target) => found.push(format!(
                "{name} points to {target}, not to a super class's __ZN<class>10gMetaClassE"
            )),
            None => found.push(format!(
                "{name} at {:#x} points to no C++ symbol: kxld cannot find class {class}'s super class",
                pointer.n_value
            )),
        }
    }
    found
}

/// Size of a vtable's header on x86_64 (offset-to-top and RTTI pointer), which kxld skips
/// (`get_vtable_base_sizes`, kxld_vtable.c).
const VTABLE_HEADER_SIZE: u64 = 16;

/// The end of the object a symbol starts: the next symbol's address in its section, or
/// the section's end.
fn object_end(image: &Image<'_>, symbol: &Symbol, section: &Section) -> u64 {
    let section_end = section.addr.saturating_add(section.size);
    image
        .symbols
        .iter()
        .filter(|other| {
            other.is_section_defined()
                && other.n_sect == symbol.n_sect
                && other.n_value > symbol.n_value
        })
        .map(|other| other.n_value)
        .min()
        .unwrap_or(section_end)
        .min(section_end)
}

/// Vtable slots, read the way kxld reads them (each `__ZTV*` after its two header words,
/// up to the first zero slot without an external relocation): an inherited slot is 0 with
/// an external relocation; a local slot is non-zero, with a local relocation and a C++
/// symbol defined at its target.
///
/// kxld: `init_by_entries_and_relocs` (kxld_vtable.c) reads a final image's vtable slot by
/// slot: a non-zero slot is a local entry whose symbol it looks up by value among the
/// kext's defined C++ symbols; a zero slot must have an external relocation, and the first
/// zero slot without one ends the vtable. `kxld_vtable_patch` re-points the relocations of
/// inherited entries at the parent's current implementation (the fragile-base-class fix),
/// which needs the relocation to be external and the slot to hold no addend; a local entry
/// with no symbol cannot be patched into subclasses. The local relocation is what slides
/// the slot (`check_relocations`).
///
/// A vtable's length is not recorded in the file, so a vtable cut short (a relocation lost
/// in the middle, leaving a zero slot) cannot be told apart from its end: what follows a
/// vtable may be unrelated data without a symbol of its own (a linker places other
/// objects' anonymous constants right after it). kxld would then find the vtable shorter
/// than its parent's and refuse to patch it (`kxld_vtable_patch`), which only a check
/// against the parent's vtable, in the library, could see.
pub fn check_vtables(image: &Image<'_>, _ctx: &CheckContext) -> Vec<String> {
    let external = relocs_by_address(&image.external_relocs);
    let local = relocs_by_address(&image.local_relocs);
    let mut found = Vec::new();
    for vtable in &image.symbols {
        let is_vtable = matches!(
            cxx_role(&vtable.name),
            Some(CxxRole::ClassVTable | CxxRole::MetaClassVTable)
        );
        if !is_vtable || !vtable.is_section_defined() {
            continue;
        }
        let name = &vtable.name;
        let Some(section) = image.section_by_ordinal(u32::from(vtable.n_sect)) else {
            continue; // reported by check_symbol_table
        };
        if section.is_zerofill() {
            found.push(format!(
                "vtable {name} is in zerofill section {}",
                section.full_name()
            ));
            continue;
        }
        // kxld reads on to the first zero slot without an external relocation; stopping
        // at the next symbol as well keeps the scan inside this object in any case. The
        // symbol table alone would not bound it: objects named by linker-private labels
        // (Rust's `l_anon.*`) lose them in the output. The zero slot does: clang
        // `-fapple-kext` ends every vtable with one, inside the vtable's own object (kxld
        // depends on it; kmutil's `calculateVTableEntries` in `VTablePatcher::patchVTables`,
        // dyld kernel-collection-builder/AppCacheBuilder.cpp, likewise stops at the first
        // slot without a fixup), so the scan never reaches the following object's data.
        let end = object_end(image, vtable, section);
        let mut slot = vtable.n_value.saturating_add(VTABLE_HEADER_SIZE);
        while slot.checked_add(8).is_some_and(|slot_end| slot_end <= end) {
            let index = (slot - vtable.n_value - VTABLE_HEADER_SIZE) / 8;
            let Some(value) = image.u64_at(slot) else {
                break; // contents outside the file: reported by check_segments
            };
            let key = i64::try_from(slot).unwrap_or(-1);
            let external_reloc = external.get(&key);
            let local_reloc = local.get(&key);
            match (value, external_reloc, local_reloc) {
                (0, None, _) => break,
                (_, Some(reloc), _) => {
                    let target = image
                        .symbols
                        .get(reloc.symbolnum as usize)
                        .map_or("?", |symbol| symbol.name.as_str());
                    if value != 0 {
                        found.push(format!(
                            "vtable {name}: inherited slot {index} at {slot:#x} (-> {target}) holds {value:#x}; it must be 0 so kxld can patch it"
                        ));
                    }
                    if local_reloc.is_some() {
                        found.push(format!(
                            "vtable {name}: slot {index} at {slot:#x} has both an external and a local relocation"
                        ));
                    }
                }
                (_, None, None) => found.push(format!(
                    "vtable {name}: local slot {index} at {slot:#x} holds {value:#x} without a local relocation: it would not slide"
                )),
                (_, None, Some(_)) => {
                    if cxx_symbols_at(image, value).next().is_none() {
                        found.push(format!(
                            "vtable {name}: local slot {index} at {slot:#x} points to {value:#x}, where no C++ symbol is defined: kxld cannot patch subclasses' inherited slot"
                        ));
                    }
                }
            }
            slot += 8;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    //! One test per rule: a good bundle (a fixture compiled with clang at test time and
    //! linked with [`crate::link::link`]) passes; the same bundle with a few bytes changed
    //! breaks exactly the rule under test. Without clang the tests pass with a note,
    //! unless `CI` is set (then a missing clang fails them).

    use std::sync::OnceLock;

    use super::*;

    /// What plain_kext.c imports, as if its libraries exported it.
    const PLAIN_LIBRARY_EXPORTS: [&str; 4] = [
        "_IOLog",
        "_demo_lib_fn",
        "_external_counter",
        "_demo_at_exit",
    ];
    const PLAIN_EXPORT_PATTERNS: [&str; 1] = ["_demo_*"];
    const DRIVER_EXPORT_PATTERNS: [&str; 1] = ["_kx_demo_*"];

    use crate::fixture::{C_FLAGS, CXX_FLAGS, compile, link_kext as link_one};

    /// tests/fixtures/plain_kext.c, linked; `None` = skipped.
    fn plain_bundle() -> Option<Vec<u8>> {
        static BUNDLE: OnceLock<Option<Vec<u8>>> = OnceLock::new();
        BUNDLE
            .get_or_init(|| {
                let object = compile("clang", C_FLAGS, "plain_kext.c")?;
                Some(link_one("plain_kext.o", object, &PLAIN_EXPORT_PATTERNS).bytes)
            })
            .clone()
    }

    fn plain_context() -> CheckContext {
        CheckContext::new(PLAIN_LIBRARY_EXPORTS, PLAIN_EXPORT_PATTERNS)
    }

    /// The driver half of the IOKit-style fixture, linked, and a context whose libraries
    /// export everything it imports; `None` = skipped.
    fn driver_bundle() -> Option<(Vec<u8>, CheckContext)> {
        static BUNDLE: OnceLock<Option<(Vec<u8>, CheckContext)>> = OnceLock::new();
        BUNDLE
            .get_or_init(|| {
                let object = compile("clang++", CXX_FLAGS, "iokit_style_driver.cpp")?;
                let linked = link_one("iokit_style_driver.o", object, &DRIVER_EXPORT_PATTERNS);
                let context = CheckContext::new(linked.imports, DRIVER_EXPORT_PATTERNS);
                Some((linked.bytes, context))
            })
            .clone()
    }

    /// Checks `bundle` and asserts that it breaks `rule` and nothing else.
    #[track_caller]
    fn assert_only(rule: Rule, bundle: &[u8], ctx: &CheckContext) -> Vec<Violation> {
        let violations = check(bundle, ctx);
        assert!(
            !violations.is_empty(),
            "expected [{rule}] violations, got none"
        );
        assert!(
            violations.iter().all(|violation| violation.rule == rule),
            "expected only [{rule}] violations, got {violations:#?}"
        );
        violations
    }

    fn parsed(bundle: &[u8]) -> Image<'_> {
        Image::parse(bundle).expect("the good bundle parses")
    }

    fn put_u32(bundle: &mut [u8], at: usize, value: u32) {
        bundle[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn put_u64(bundle: &mut [u8], at: usize, value: u64) {
        bundle[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn get_u32(bundle: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bundle[at..at + 4].try_into().unwrap())
    }

    /// File offset of the first load command `cmd`.
    fn command_offset(bundle: &[u8], cmd: u32) -> usize {
        parsed(bundle)
            .load_commands
            .iter()
            .find(|command| command.cmd == cmd)
            .unwrap_or_else(|| panic!("no load command {cmd:#x}"))
            .offset
    }

    /// File offset of the `LC_SEGMENT_64` named `name`.
    fn segment_command_offset(bundle: &[u8], name: &str) -> usize {
        let image = parsed(bundle);
        image
            .load_commands
            .iter()
            .filter(|command| command.cmd == macho::LC_SEGMENT_64)
            .find(|command| bundle[command.offset + 8..].starts_with(name.as_bytes()))
            .unwrap_or_else(|| panic!("no segment {name}"))
            .offset
    }

    /// File offset of the `section_64` header of `segname,sectname`.
    fn section_header_offset(bundle: &[u8], segname: &str, sectname: &str) -> usize {
        let segment = segment_command_offset(bundle, segname);
        let nsects = get_u32(bundle, segment + 64) as usize;
        (0..nsects)
            .map(|index| segment + 72 + index * 80)
            .find(|&at| bundle[at..].starts_with(sectname.as_bytes()))
            .unwrap_or_else(|| panic!("no section {segname},{sectname}"))
    }

    fn symbol_index(bundle: &[u8], name: &str) -> usize {
        parsed(bundle)
            .symbols
            .iter()
            .position(|symbol| symbol.name == name)
            .unwrap_or_else(|| panic!("no symbol {name}"))
    }

    fn nlist_offset(bundle: &[u8], name: &str) -> usize {
        let symtab = parsed(bundle).symtab.expect("LC_SYMTAB");
        symtab.symoff as usize + 16 * symbol_index(bundle, name)
    }

    /// Renames a symbol in place in the string table (the names have the same length).
    fn rename_symbol(bundle: &mut [u8], from: &str, to: &str) {
        assert_eq!(
            from.len(),
            to.len(),
            "renaming in place needs equal lengths"
        );
        let symtab = parsed(bundle).symtab.expect("LC_SYMTAB");
        let strx = get_u32(bundle, nlist_offset(bundle, from)) as usize;
        let at = symtab.stroff as usize + strx;
        assert_eq!(&bundle[at..at + from.len()], from.as_bytes());
        bundle[at..at + to.len()].copy_from_slice(to.as_bytes());
    }

    /// File offset of relocation `index` in the local (or external) table.
    fn reloc_offset(bundle: &[u8], local: bool, index: usize) -> usize {
        let dysymtab = parsed(bundle).dysymtab.expect("LC_DYSYMTAB");
        let table = if local {
            dysymtab.locreloff
        } else {
            dysymtab.extreloff
        };
        table as usize + 8 * index
    }

    /// File offset of the bytes at image address `addr`.
    fn file_offset_of(bundle: &[u8], addr: u64) -> usize {
        let image = parsed(bundle);
        let section = image.section_at(addr).expect("a section at the address");
        (u64::from(section.offset) + (addr - section.addr)) as usize
    }

    #[test]
    fn good_plain_bundle_passes() {
        let Some(bundle) = plain_bundle() else { return };
        assert_eq!(check(&bundle, &plain_context()), Vec::new());
        // The fixture has every relocation shape: make sure they all reached the bundle.
        let image = parsed(&bundle);
        assert!(!image.local_relocs.is_empty());
        assert!(
            image
                .external_relocs
                .iter()
                .any(|r| r.kind == macho::X86_64_RELOC_BRANCH)
        );
        assert!(
            image
                .external_relocs
                .iter()
                .any(|r| r.kind == macho::X86_64_RELOC_UNSIGNED)
        );
    }

    #[test]
    fn header_rule_refuses_other_filetypes_and_cpus() {
        let Some(good) = plain_bundle() else { return };
        for (field, value) in [
            (12, macho::MH_BUNDLE),
            (12, macho::MH_OBJECT),
            (4, macho::CPU_TYPE_ARM64),
        ] {
            let mut bundle = good.clone();
            put_u32(&mut bundle, field, value);
            assert_only(Rule::Header, &bundle, &plain_context());
        }
        let mut bundle = good.clone();
        put_u32(&mut bundle, 0, macho::MH_MAGIC);
        assert_only(Rule::Header, &bundle, &plain_context());
    }

    #[test]
    fn load_command_rule_refuses_dyld_commands_and_missing_ones() {
        let Some(good) = plain_bundle() else { return };
        let source_version = command_offset(&good, macho::LC_SOURCE_VERSION);
        for dyld_command in [
            macho::LC_DYLD_CHAINED_FIXUPS,
            macho::LC_MAIN,
            macho::LC_LOAD_DYLINKER,
        ] {
            let mut bundle = good.clone();
            put_u32(&mut bundle, source_version, dyld_command);
            let violations = assert_only(Rule::LoadCommands, &bundle, &plain_context());
            assert!(violations[0].message.contains("kxld refuses it"));
        }
        // Tolerated commands pass; replacing LC_UUID or the version command with one loses
        // a required command.
        let version = parsed(&good)
            .load_commands
            .iter()
            .find(|command| {
                matches!(
                    command.cmd,
                    macho::LC_VERSION_MIN_MACOSX | macho::LC_BUILD_VERSION
                )
            })
            .expect("a version command")
            .offset;
        for (required, what) in [
            (command_offset(&good, macho::LC_UUID), "no LC_UUID"),
            (version, "no LC_VERSION_MIN_MACOSX or LC_BUILD_VERSION"),
        ] {
            let mut bundle = good.clone();
            put_u32(&mut bundle, required, macho::LC_NOTE);
            let violations = assert_only(Rule::LoadCommands, &bundle, &plain_context());
            assert!(violations[0].message.starts_with(what), "{violations:?}");
        }
        // sizeofcmds smaller than the commands: unreadable, reported under this rule.
        let mut bundle = good.clone();
        put_u32(&mut bundle, 20, get_u32(&good, 20) - 8);
        assert_only(Rule::LoadCommands, &bundle, &plain_context());
    }

    #[test]
    fn segment_rule_refuses_ranges_past_the_file_and_misfiled_sections() {
        let Some(good) = plain_bundle() else { return };
        let linkedit = segment_command_offset(&good, "__LINKEDIT");
        let mut bundle = good.clone();
        let filesize = u64::from_le_bytes(good[linkedit + 48..linkedit + 56].try_into().unwrap());
        put_u64(&mut bundle, linkedit + 48, filesize + 0x1000);
        let violations = assert_only(Rule::Segments, &bundle, &plain_context());
        assert!(
            violations[0].message.contains("__LINKEDIT"),
            "{violations:?}"
        );

        let mut bundle = good.clone();
        let cstring = section_header_offset(&good, "__TEXT", "__cstring");
        bundle[cstring + 16..cstring + 22].copy_from_slice(b"__DATA");
        assert_only(Rule::Segments, &bundle, &plain_context());
    }

    #[test]
    fn segment_rule_refuses_too_little_header_room() {
        let Some(good) = plain_bundle() else { return };
        // Claim load commands that end just before the first section.
        let first = section_header_offset(&good, "__TEXT", "__text");
        let text_addr = u64::from_le_bytes(good[first + 32..first + 40].try_into().unwrap());
        let mut bundle = good.clone();
        put_u32(&mut bundle, 20, u32::try_from(text_addr - 32 - 8).unwrap());
        let violations = check(&bundle, &plain_context());
        assert!(
            violations
                .iter()
                .any(|v| v.rule == Rule::Segments
                    && v.message.contains("kxld writes its own header")),
            "{violations:?}"
        );
        // What the linker leaves passes.
        assert!(text_addr >= 32 + u64::from(get_u32(&good, 20)) + MIN_HEADER_ROOM);
    }

    #[test]
    fn symbol_table_rule_refuses_inconsistent_partitions_and_common_symbols() {
        let Some(good) = plain_bundle() else { return };
        // One more external definition, one fewer undefined: the first import now sits in
        // the external-definition partition.
        let dysymtab = command_offset(&good, macho::LC_DYSYMTAB);
        let mut bundle = good.clone();
        for (field, delta) in [(20, 1i64), (24, 1), (28, -1)] {
            let value = i64::from(get_u32(&good, dysymtab + field)) + delta;
            put_u32(&mut bundle, dysymtab + field, u32::try_from(value).unwrap());
        }
        let violations = assert_only(Rule::SymbolTable, &bundle, &plain_context());
        assert!(
            violations[0]
                .message
                .contains("external definition partition")
        );

        let mut bundle = good.clone();
        put_u64(&mut bundle, nlist_offset(&good, "_demo_lib_fn") + 8, 16);
        let violations = assert_only(Rule::SymbolTable, &bundle, &plain_context());
        assert!(violations[0].message.contains("common symbol"));

        // A name outside the string table: unreadable, reported under this rule.
        let mut bundle = good.clone();
        put_u32(
            &mut bundle,
            nlist_offset(&good, "_demo_lib_fn"),
            0x00ff_ffff,
        );
        assert_only(Rule::SymbolTable, &bundle, &plain_context());
    }

    #[test]
    fn relocation_rule_refuses_misshapen_and_misdirected_relocations() {
        let Some(good) = plain_bundle() else { return };
        let first_local = reloc_offset(&good, true, 0);
        let word1 = get_u32(&good, first_local + 4);

        let mut bundle = good.clone();
        put_u32(
            &mut bundle,
            first_local + 4,
            (word1 & !(3 << 25)) | (2 << 25),
        ); // length 2
        assert_only(Rule::Relocations, &bundle, &plain_context());

        let mut bundle = good.clone();
        put_u32(&mut bundle, first_local + 4, (word1 & !0x00ff_ffff) | 99); // section 99
        assert_only(Rule::Relocations, &bundle, &plain_context());

        // An external relocation naming a defined symbol.
        let first_external = reloc_offset(&good, false, 0);
        let word1 = get_u32(&good, first_external + 4);
        let defined = symbol_index(&good, "_demo_api_fn") as u32;
        let mut bundle = good.clone();
        put_u32(
            &mut bundle,
            first_external + 4,
            (word1 & !0x00ff_ffff) | defined,
        );
        assert_only(Rule::Relocations, &bundle, &plain_context());

        // An external pointer slot holding an addend (`&external_counter + 1` as an int
        // pointer): kxld would add it, kmutil (11+) would drop it.
        let image = parsed(&good);
        let (index, pointer) = image
            .external_relocs
            .iter()
            .enumerate()
            .find(|(_, r)| r.kind == macho::X86_64_RELOC_UNSIGNED && r.length == 3)
            .expect("plain_kext.c has an external pointer (demo_counter_ref)");
        let slot = file_offset_of(&good, pointer.address as u64);
        let mut bundle = good.clone();
        put_u64(&mut bundle, slot, 8);
        let violations = assert_only(Rule::Relocations, &bundle, &plain_context());
        assert!(
            violations.iter().any(|v| v.message.contains(&format!(
                "external relocation {index} at {:#x} (_external_counter) holds the addend +8",
                pointer.address
            ))),
            "{violations:?}"
        );
        // The same for a call to an import + 4.
        let (index, call) = image
            .external_relocs
            .iter()
            .enumerate()
            .find(|(_, r)| r.kind == macho::X86_64_RELOC_BRANCH)
            .expect("plain_kext.c calls imports");
        let slot = file_offset_of(&good, call.address as u64);
        let mut bundle = good.clone();
        put_u32(&mut bundle, slot, 4);
        let violations = assert_only(Rule::Relocations, &bundle, &plain_context());
        assert!(
            violations.iter().any(|v| v
                .message
                .starts_with(&format!("external relocation {index} at"))
                && v.message.contains("holds the addend +4")),
            "{violations:?}"
        );

        // No external relocation at all: kxld would take it for linked already.
        let dysymtab = command_offset(&good, macho::LC_DYSYMTAB);
        let mut bundle = good.clone();
        put_u32(&mut bundle, dysymtab + 68, 0); // nextrel
        let violations = assert_only(Rule::Relocations, &bundle, &plain_context());
        assert!(
            violations
                .iter()
                .any(|v| v.message.contains("already linked")),
            "{violations:?}"
        );

        // A relocation attached to a section, where kxld never looks in a linked image.
        let mut bundle = good.clone();
        put_u32(
            &mut bundle,
            section_header_offset(&good, "__TEXT", "__text") + 60,
            1,
        );
        assert_only(Rule::Relocations, &bundle, &plain_context());
    }

    #[test]
    fn kmod_info_rule_refuses_a_bundle_without_kmod_info() {
        let Some(mut bundle) = plain_bundle() else {
            return;
        };
        rename_symbol(&mut bundle, "_kmod_info", "_kmod_infx");
        assert_only(Rule::KmodInfo, &bundle, &plain_context());
    }

    #[test]
    fn import_rule_refuses_symbols_no_library_exports() {
        let Some(good) = plain_bundle() else { return };
        let mut bundle = good.clone();
        rename_symbol(&mut bundle, "_IOLog", "_IOLoh");
        let violations = assert_only(Rule::Imports, &bundle, &plain_context());
        assert!(violations[0].message.starts_with("_IOLoh is imported"));

        for atexit_symbol in ["___cxa_atexit", "___dso_handle"] {
            let mut bundle = good.clone();
            rename_symbol(&mut bundle, "_demo_at_exit", atexit_symbol);
            let violations = assert_only(Rule::Imports, &bundle, &plain_context());
            assert!(
                violations[0]
                    .message
                    .contains("-fno-register-global-dtors-with-atexit"),
                "{violations:?}"
            );
        }
    }

    #[test]
    fn import_rule_reads_names_as_kxld_renames_them() {
        let ctx = CheckContext::new(
            ["__ZN15OSMetaClassBase8DispatchE5IORPC"],
            Vec::<String>::new(),
        );
        assert!(library_exports_import(
            &ctx,
            "__ZN15OSMetaClassBase25_RESERVEDOSMetaClassBase3Ev"
        ));
        assert!(!library_exports_import(
            &ctx,
            "__ZN15OSMetaClassBase25_RESERVEDOSMetaClassBase4Ev"
        ));
    }

    #[test]
    fn duplicate_definition_rule_refuses_redefining_a_library_symbol() {
        let Some(mut bundle) = plain_bundle() else {
            return;
        };
        rename_symbol(&mut bundle, "_demo_api_fn", "_demo_lib_fn");
        let violations = assert_only(Rule::DuplicateDefinitions, &bundle, &plain_context());
        assert!(violations[0].message.contains("defined more than once"));
    }

    #[test]
    fn export_rule_refuses_definitions_outside_the_export_patterns() {
        let Some(mut bundle) = plain_bundle() else {
            return;
        };
        rename_symbol(&mut bundle, "_demo_api_fn", "_xemo_api_fn");
        let violations = assert_only(Rule::Exports, &bundle, &plain_context());
        assert!(violations[0].message.starts_with("_xemo_api_fn"));
    }

    #[test]
    fn good_cxx_driver_passes() {
        let Some((bundle, ctx)) = driver_bundle() else {
            return;
        };
        assert_eq!(check(&bundle, &ctx), Vec::new());
    }

    #[test]
    fn metaclass_rule_refuses_a_class_without_its_metaclass_vtable_or_super_class() {
        let Some((good, ctx)) = driver_bundle() else {
            return;
        };
        let mut bundle = good.clone();
        rename_symbol(
            &mut bundle,
            "__ZTVN12KxDemoDriver9MetaClassE",
            "__ZTVN12KxDemoDriver9MetaClassX",
        );
        let violations = assert_only(Rule::MetaClasses, &bundle, &ctx);
        assert!(
            violations[0]
                .message
                .contains("__ZTVN12KxDemoDriver9MetaClassE")
        );

        // superClass's relocation retargeted from __ZN9KxService10gMetaClassE to another
        // import, which is no MetaClass.
        let image = parsed(&good);
        let pointer = image
            .symbol("__ZN12KxDemoDriver10superClassE")
            .expect("superClass");
        let index = image
            .external_relocs
            .iter()
            .position(|reloc| i64::from(reloc.address) == pointer.n_value as i64)
            .expect("an external relocation at superClass");
        let other_import = symbol_index(&good, "__ZTV9KxService") as u32;
        let at = reloc_offset(&good, false, index);
        let mut bundle = good.clone();
        put_u32(
            &mut bundle,
            at + 4,
            (get_u32(&good, at + 4) & !0x00ff_ffff) | other_import,
        );
        let violations = assert_only(Rule::MetaClasses, &bundle, &ctx);
        assert!(violations[0].message.contains("__ZTV9KxService"));
    }

    /// (address of the first local slot, address of the first inherited slot) in `vtable`.
    fn vtable_slots(bundle: &[u8], vtable: &str) -> (u64, u64) {
        let image = parsed(bundle);
        let start = image.symbol(vtable).expect("the vtable").n_value + VTABLE_HEADER_SIZE;
        let slots = (0..64).map(|index| start + 8 * index);
        let has_reloc = |relocs: &[Reloc], slot: u64| {
            relocs
                .iter()
                .any(|reloc| i64::from(reloc.address) == slot as i64)
        };
        let local = slots
            .clone()
            .find(|&slot| has_reloc(&image.local_relocs, slot))
            .expect("a local slot");
        let inherited = slots
            .clone()
            .find(|&slot| has_reloc(&image.external_relocs, slot))
            .expect("an inherited slot");
        (local, inherited)
    }

    #[test]
    fn vtable_rule_refuses_slots_kxld_cannot_patch() {
        let Some((good, ctx)) = driver_bundle() else {
            return;
        };
        let (local, inherited) = vtable_slots(&good, "__ZTV12KxDemoDriver");

        // A local slot pointing one byte into its function: no symbol there.
        let mut bundle = good.clone();
        let at = file_offset_of(&good, local);
        let value = u64::from_le_bytes(good[at..at + 8].try_into().unwrap());
        put_u64(&mut bundle, at, value + 1);
        let violations = assert_only(Rule::VTables, &bundle, &ctx);
        assert!(
            violations[0].message.contains("no C++ symbol"),
            "{violations:?}"
        );

        // An inherited slot holding an addend: kxld could not patch it, and as any
        // external relocation's addend kmutil would drop it (check_relocations).
        let mut bundle = good.clone();
        put_u64(&mut bundle, file_offset_of(&good, inherited), 8);
        let violations = check(&bundle, &ctx);
        assert!(
            violations
                .iter()
                .all(|v| matches!(v.rule, Rule::VTables | Rule::Relocations)),
            "{violations:?}"
        );
        assert!(
            violations
                .iter()
                .any(|v| v.rule == Rule::VTables && v.message.contains("must be 0")),
            "{violations:?}"
        );
    }

    /// A shim's `__DATA,__const` ending with a vtable, followed in the output by a Rust
    /// member's anonymous constants (`l_anon.*`, dropped from the symbol table), so that no
    /// symbol marks where the vtable ends: the scan stops at the vtable's own terminating
    /// zero slot (clang `-fapple-kext` ends every vtable with one; kxld's
    /// `init_by_entries_and_relocs` relies on it) and never reads the Rust data.
    #[test]
    fn vtable_rule_stops_at_the_vtable_end_before_anonymous_rust_data() {
        let Some(driver) = compile("clang++", CXX_FLAGS, "iokit_style_driver.cpp") else {
            return;
        };
        let Some(rust_like) = compile(
            "clang",
            &["-target", "x86_64-apple-macos10.13"],
            "rust_like_const.s",
        ) else {
            return;
        };
        let inputs = [
            crate::link::Input {
                name: "iokit_style_driver.o".into(),
                data: driver,
            },
            crate::link::Input {
                name: "rust_like_const.o".into(),
                data: rust_like,
            },
        ];
        let options = crate::link::Options {
            exports: DRIVER_EXPORT_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            roots: vec![
                "_kmod_info".into(),
                "__RNvCs1a2b3c4d5e6_9rust_like5TABLE".into(),
            ],
            min_macos: (10, 13, 0),
            uuid: None,
        };
        let linked = crate::link::link(&inputs, &options).expect("links");
        let image = parsed(&linked.bytes);

        // The scenario is real: the last vtable of __DATA,__const ends (its zero slot) right
        // where the Rust data starts, and no symbol lies in between.
        let last_vtable = image
            .symbols
            .iter()
            .filter(|s| s.is_section_defined() && s.name.starts_with("__ZTV"))
            .max_by_key(|s| s.n_value)
            .expect("the driver has vtables");
        let external = relocs_by_address(&image.external_relocs);
        let mut terminator = last_vtable.n_value + VTABLE_HEADER_SIZE;
        while image.u64_at(terminator).expect("inside the section") != 0
            || external.contains_key(&(terminator as i64))
        {
            terminator += 8;
        }
        let helper = image
            .symbol("__RNvCs1a2b3c4d5e6_9rust_like6helper")
            .expect("kept")
            .n_value;
        assert_eq!(
            image.u64_at(terminator + 8),
            Some(helper),
            "the Rust-like data follows {}'s terminating slot",
            last_vtable.name
        );
        assert!(
            image.symbols.iter().all(|s| !(s.is_section_defined()
                && s.n_value > last_vtable.n_value
                && s.n_value <= terminator + 8)),
            "no symbol bounds the vtable"
        );

        let ctx = CheckContext::new(linked.imports.clone(), DRIVER_EXPORT_PATTERNS);
        let violations = check(&linked.bytes, &ctx);
        assert!(violations.is_empty(), "{violations:#?}");
    }

    #[test]
    fn malformed_bundles_are_violations_not_panics() {
        let Some(good) = plain_bundle() else { return };
        let ctx = plain_context();
        for len in 0..good.len() {
            assert!(!check(&good[..len], &ctx).is_empty(), "truncated to {len}");
        }
        // Every byte of the header and load commands, and of the symbol and relocation
        // tables, overwritten with 0xff and with 0x00 in turn.
        let dysymtab = parsed(&good).dysymtab.expect("LC_DYSYMTAB");
        let commands_end = 32 + get_u32(&good, 20) as usize;
        let linkedit_start = dysymtab.extreloff.min(dysymtab.locreloff) as usize;
        for at in (0..commands_end).chain(linkedit_start..good.len()) {
            for byte in [0xff, 0x00] {
                let mut bundle = good.clone();
                bundle[at] = byte;
                let _ = check(&bundle, &ctx);
            }
        }
    }
}
