//! A linked kext bundle loaded into this process the way the kernel loads one (xnu
//! `libkern/kxld`), so that tests run the bundle's own machine code:
//!
//! 1. every segment is mapped at one base the loader chooses (the bundle's vmaddrs start at
//!    0, so the slide is the base); file contents are copied, the rest stays zero;
//! 2. local relocations (`X86_64_RELOC_UNSIGNED`, length 3): the slide is added to the
//!    8-byte slot at `r_address`;
//! 3. external relocations: `X86_64_RELOC_UNSIGNED` length 3 → slot = symbol;
//!    `X86_64_RELOC_BRANCH` (pc-relative, length 2) → the call's rel32 reaches a trampoline
//!    (`jmp *0(%rip)` + the 8-byte target) in a region right after the image, because the
//!    functions a test binds imports to may lie more than ±2 GiB away. A slot holding an
//!    addend is refused: kxld (10.13–10.15) would add it (`x86_64_process_reloc`, xnu
//!    kxld_reloc.c) but macOS 11+'s kext collection builder drops it
//!    (`DylibFixups::processFixups`, dyld kernel-collection-builder/AppCacheBuilder.cpp),
//!    so no single answer is right and the linker must never produce one;
//! 4. `__TEXT` becomes read+execute and every other segment read+write (kxld's strict
//!    protections).
//!
//! Anything else — another relocation type, an unresolved symbol, a slot or a pointer
//! outside the image — is refused with a message naming it: these are exactly the linker
//! defects the loaded tests exist to catch.

use std::collections::HashMap;

use object::macho::{
    N_ABS, N_SECT, S_MOD_INIT_FUNC_POINTERS, S_MOD_TERM_FUNC_POINTERS, X86_64_RELOC_BRANCH,
    X86_64_RELOC_UNSIGNED,
};

use crate::image::{Image, Symbol};

/// `r_length` of an 8-byte slot (log2 of its size).
const LENGTH_QUAD: u8 = 3;
/// `r_length` of a 4-byte slot.
const LENGTH_LONG: u8 = 2;

/// `jmp *0(%rip)` followed by its 8-byte target, padded to 16 bytes.
const TRAMPOLINE_JMP: [u8; 6] = [0xff, 0x25, 0, 0, 0, 0];
const TRAMPOLINE_BYTES: usize = 16;

/// A bundle mapped into this process, relocated and bound.
///
/// The mapping stays until the value is dropped; every address it hands out (symbols,
/// initialiser pointers) is valid only while it lives.
#[derive(Debug)]
pub struct LoadedBundle {
    /// Start of the mapping (= the slide: the bundle's vmaddrs start at 0).
    base: usize,
    /// Bytes mapped: the image's segments, then the trampolines.
    mapped_len: usize,
    /// Bytes of the image proper (end of the highest segment).
    image_len: usize,
    /// Defined symbols by Mach-O name.
    symbols: HashMap<String, Definition>,
    init_functions: Vec<usize>,
    term_functions: Vec<usize>,
}

impl LoadedBundle {
    /// Maps, relocates and binds `bundle`. `resolve` gets each undefined symbol's Mach-O
    /// name (with its leading `_`) and returns its address in this process.
    pub fn load(
        bundle: &[u8],
        resolve: &mut dyn FnMut(&str) -> Option<usize>,
    ) -> Result<LoadedBundle, String> {
        let image = Image::parse(bundle)?;
        let page = page_size();
        let layout = Layout::of(&image, bundle.len(), page)?;
        // At most one trampoline per call site (calls to one target share theirs).
        let branches = image
            .external_relocs
            .iter()
            .filter(|r| r.kind == X86_64_RELOC_BRANCH)
            .count();
        let trampolines_len = (branches * TRAMPOLINE_BYTES).next_multiple_of(page);
        let mapped_len = layout.image_len + trampolines_len;

        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; no
        // existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {mapped_len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        // From here on `loaded` owns the mapping: an early return unmaps it.
        let mut loaded = LoadedBundle {
            base: base as usize,
            mapped_len,
            image_len: layout.image_len,
            symbols: HashMap::new(),
            init_functions: Vec::new(),
            term_functions: Vec::new(),
        };
        // SAFETY: the mapping is `mapped_len` bytes, readable and writable, and nothing
        // else refers to it yet.
        let memory = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), mapped_len) };
        for s in &layout.segments {
            // Copy what the file holds; the anonymous mapping already zeroes the rest.
            let file = &bundle[s.fileoff..s.fileoff + s.filesize];
            memory[s.vmaddr..s.vmaddr + s.filesize].copy_from_slice(file);
        }
        let fixups = plan_fixups(&image, &layout, loaded.base as u64, resolve)?;
        apply_fixups(memory, loaded.base as u64, layout.image_len, &fixups)?;
        loaded.init_functions = pointer_array(&image, memory, S_MOD_INIT_FUNC_POINTERS)?;
        loaded.term_functions = pointer_array(&image, memory, S_MOD_TERM_FUNC_POINTERS)?;
        loaded.symbols = defined_symbols(&image, loaded.base as u64, layout.image_len)?;

        for s in &layout.segments {
            // kxld's strict protections: __TEXT read+execute, everything else read+write.
            let protection = if s.name == "__TEXT" {
                libc::PROT_READ | libc::PROT_EXEC
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            loaded.protect(s.vmaddr, s.mapped_len, protection)?;
        }
        loaded.protect(
            layout.image_len,
            trampolines_len,
            libc::PROT_READ | libc::PROT_EXEC,
        )?;
        Ok(loaded)
    }

    /// The address of a defined symbol (external or local) by Mach-O name, e.g.
    /// `_vnet_create`. `None` for an unknown name or one defined twice at different
    /// addresses.
    pub fn symbol(&self, name: &str) -> Option<usize> {
        self.symbols.get(name)?.address
    }

    /// The address of a symbol this bundle exports (an external definition): what the
    /// kernel binds a dependent kext's imports to.
    pub fn exported_symbol(&self, name: &str) -> Option<usize> {
        self.symbols.get(name).filter(|d| d.exported)?.address
    }

    /// The loaded, slid pointers of the `__mod_init_func` sections (static initialisers the
    /// kernel runs after loading), in order.
    pub fn init_functions(&self) -> &[usize] {
        &self.init_functions
    }

    /// The loaded, slid pointers of the `__mod_term_func` sections (run before unloading).
    pub fn term_functions(&self) -> &[usize] {
        &self.term_functions
    }

    /// Where the image starts in this process (its slide).
    pub fn base(&self) -> usize {
        self.base
    }

    /// Bytes of the image (from its base to the end of its last segment).
    pub fn image_len(&self) -> usize {
        self.image_len
    }

    fn protect(&self, offset: usize, len: usize, protection: i32) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        let start = (self.base + offset) as *mut libc::c_void;
        // SAFETY: a page-aligned range inside this bundle's own mapping (Layout::of checked
        // the segments; the trampoline region is the mapping's tail).
        if unsafe { libc::mprotect(start, len, protection) } != 0 {
            return Err(format!(
                "mprotect({offset:#x}, {len:#x}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Drop for LoadedBundle {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `load`, unmapped once; every address handed out is
        // documented to die with `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.mapped_len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// One segment's place in the mapping, checked.
#[derive(Debug)]
struct SegmentPlace {
    name: String,
    vmaddr: usize,
    /// vmsize rounded up to whole pages (what mprotect covers).
    mapped_len: usize,
    fileoff: usize,
    filesize: usize,
}

/// Where every segment goes, checked against the file and against each other.
#[derive(Debug)]
struct Layout {
    segments: Vec<SegmentPlace>,
    image_len: usize,
    /// Image-relative `[start, end)` of each segment, for slot checks.
    ranges: Vec<(usize, usize, String)>,
}

impl Layout {
    fn of(image: &Image, file_len: usize, page: usize) -> Result<Layout, String> {
        let mut segments = Vec::new();
        for s in &image.segments {
            let vmaddr = to_usize(s.vmaddr, &s.name, "vmaddr")?;
            let vmsize = to_usize(s.vmsize, &s.name, "vmsize")?;
            let fileoff = to_usize(s.fileoff, &s.name, "fileoff")?;
            let filesize = to_usize(s.filesize, &s.name, "filesize")?;
            if vmsize == 0 {
                continue;
            }
            if !vmaddr.is_multiple_of(page) {
                return Err(format!(
                    "segment {}: vmaddr {vmaddr:#x} is not page-aligned",
                    s.name
                ));
            }
            if filesize > vmsize {
                return Err(format!(
                    "segment {}: filesize {filesize:#x} > vmsize {vmsize:#x}",
                    s.name
                ));
            }
            if fileoff
                .checked_add(filesize)
                .is_none_or(|end| end > file_len)
            {
                return Err(format!(
                    "segment {}: file range {fileoff:#x}+{filesize:#x} outside the {file_len:#x}-byte file",
                    s.name
                ));
            }
            let mapped_len = vmsize
                .checked_next_multiple_of(page)
                .filter(|l| vmaddr.checked_add(*l).is_some_and(|end| end < 1 << 31))
                .ok_or_else(|| format!("segment {}: does not fit in 2 GiB", s.name))?;
            segments.push(SegmentPlace {
                name: s.name.clone(),
                vmaddr,
                mapped_len,
                fileoff,
                filesize,
            });
        }
        segments.sort_by_key(|s| s.vmaddr);
        for pair in segments.windows(2) {
            if pair[0].vmaddr + pair[0].mapped_len > pair[1].vmaddr {
                return Err(format!(
                    "segments {} and {} overlap (or share a page)",
                    pair[0].name, pair[1].name
                ));
            }
        }
        let image_len = segments
            .last()
            .map(|s| s.vmaddr + s.mapped_len)
            .ok_or("the bundle has no segments to map")?;
        if let Some(sect) = image
            .sections
            .iter()
            .find(|s| s.has_instructions() && s.segname != "__TEXT")
        {
            return Err(format!(
                "section {} holds instructions outside __TEXT (it would not be executable)",
                sect.full_name()
            ));
        }
        let ranges = segments
            .iter()
            .map(|s| (s.vmaddr, s.vmaddr + s.mapped_len, s.name.clone()))
            .collect();
        Ok(Layout {
            segments,
            image_len,
            ranges,
        })
    }

    /// Checks that `len` bytes at image offset `address` lie inside one segment.
    fn slot(&self, address: i32, len: usize, what: &dyn Fn() -> String) -> Result<usize, String> {
        let start = usize::try_from(address)
            .map_err(|_| format!("{}: negative address {address:#x}", what()))?;
        let inside = self
            .ranges
            .iter()
            .any(|(lo, hi, _)| start >= *lo && start.checked_add(len).is_some_and(|e| e <= *hi));
        if !inside {
            return Err(format!(
                "{}: {len}-byte slot at {start:#x} is outside every segment",
                what()
            ));
        }
        Ok(start)
    }
}

fn to_usize(v: u64, segment: &str, field: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("segment {segment}: {field} {v:#x} too large"))
}

/// One relocation, resolved: what to write where (offsets are image-relative).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fixup {
    /// A local relocation: the 8-byte slot holds an image-relative address; add the base.
    Rebase { offset: usize },
    /// An external pointer: the 8-byte slot holds an addend; it becomes `target + addend`.
    Pointer { offset: usize, target: u64 },
    /// An external call: the 4-byte slot holds an addend; the rel32 becomes the distance
    /// from the end of the slot to a trampoline that jumps to `target + addend`.
    Branch { offset: usize, target: u64 },
}

/// Checks every relocation and resolves every external symbol for an image mapped at
/// `base`, before anything is written.
fn plan_fixups(
    image: &Image,
    layout: &Layout,
    base: u64,
    resolve: &mut dyn FnMut(&str) -> Option<usize>,
) -> Result<Vec<Fixup>, String> {
    let mut fixups = Vec::new();
    for (i, r) in image.local_relocs.iter().enumerate() {
        let what = || format!("local relocation #{i} at {:#x}", r.address);
        if r.kind != X86_64_RELOC_UNSIGNED || r.pcrel || r.length != LENGTH_QUAD || r.is_extern {
            return Err(format!(
                "{}: type {} pcrel {} length {} extern {} (only UNSIGNED, length 3, absolute)",
                what(),
                r.kind,
                r.pcrel,
                r.length,
                r.is_extern
            ));
        }
        let offset = layout.slot(r.address, 8, &what)?;
        fixups.push(Fixup::Rebase { offset });
    }
    for (i, r) in image.external_relocs.iter().enumerate() {
        let sym = usize::try_from(r.symbolnum)
            .ok()
            .and_then(|n| image.symbols.get(n))
            .ok_or_else(|| {
                format!(
                    "external relocation #{i} at {:#x}: symbol index {} outside the symbol table",
                    r.address, r.symbolnum
                )
            })?;
        let what = || {
            format!(
                "external relocation #{i} at {:#x} ({})",
                r.address, sym.name
            )
        };
        if !r.is_extern {
            return Err(format!("{}: not marked extern", what()));
        }
        let target = if sym.is_undefined() {
            let address = resolve(&sym.name)
                .ok_or_else(|| format!("{}: undefined symbol {}", what(), sym.name))?;
            address as u64
        } else {
            // kxld binds a relocation naming a symbol the bundle defines to that definition.
            symbol_address(sym, base, layout.image_len)?.ok_or_else(|| {
                format!(
                    "{}: {} is neither undefined nor defined in a section",
                    what(),
                    sym.name
                )
            })?
        };
        fixups.push(match (r.kind, r.pcrel, r.length) {
            (X86_64_RELOC_UNSIGNED, false, LENGTH_QUAD) => Fixup::Pointer {
                offset: layout.slot(r.address, 8, &what)?,
                target,
            },
            (X86_64_RELOC_BRANCH, true, LENGTH_LONG) => Fixup::Branch {
                offset: layout.slot(r.address, 4, &what)?,
                target,
            },
            (kind, pcrel, length) => {
                return Err(format!(
                    "{}: type {kind} pcrel {pcrel} length {length} (only UNSIGNED length 3 and pc-relative BRANCH length 2)",
                    what()
                ));
            }
        });
    }
    Ok(fixups)
}

/// Writes every fixup into `memory` (the whole mapping: the image, then room for one
/// trampoline per branch), which lives at address `base`.
fn apply_fixups(
    memory: &mut [u8],
    base: u64,
    image_len: usize,
    fixups: &[Fixup],
) -> Result<(), String> {
    let mut trampolines: HashMap<u64, usize> = HashMap::new();
    let mut next_trampoline = image_len;
    for f in fixups {
        match *f {
            Fixup::Rebase { offset } => {
                let value = read_u64(memory, offset);
                if value > image_len as u64 {
                    return Err(format!(
                        "local relocation at {offset:#x}: the slot holds {value:#x}, outside the {image_len:#x}-byte image"
                    ));
                }
                write_u64(memory, offset, value + base);
            }
            Fixup::Pointer { offset, target } => {
                let addend = read_u64(memory, offset);
                if addend != 0 {
                    return Err(addend_refused(offset, addend as i64));
                }
                write_u64(memory, offset, target);
            }
            Fixup::Branch { offset, target } => {
                let addend = i64::from(read_i32(memory, offset));
                if addend != 0 {
                    return Err(addend_refused(offset, addend));
                }
                let destination = target;
                let trampoline = match trampolines.get(&destination) {
                    Some(&t) => t,
                    None => {
                        let t = next_trampoline;
                        let stub = memory
                            .get_mut(t..t + TRAMPOLINE_BYTES)
                            .ok_or("no room left for a call trampoline")?;
                        stub[..6].copy_from_slice(&TRAMPOLINE_JMP);
                        stub[6..14].copy_from_slice(&destination.to_le_bytes());
                        trampolines.insert(destination, t);
                        next_trampoline += TRAMPOLINE_BYTES;
                        t
                    }
                };
                // Both ends are inside one mapping smaller than 2 GiB (Layout::of).
                let rel = trampoline as i64 - (offset as i64 + 4);
                let rel = i32::try_from(rel)
                    .map_err(|_| format!("call at {offset:#x}: trampoline out of rel32 range"))?;
                memory[offset..offset + 4].copy_from_slice(&rel.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Why an external relocation's slot must hold 0 (module docs, step 3).
fn addend_refused(offset: usize, addend: i64) -> String {
    format!(
        "external relocation at {offset:#x}: the slot holds the addend {addend:+}, which kxld would add and macOS 11+ would drop"
    )
}

fn read_u64(memory: &[u8], offset: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&memory[offset..offset + 8]);
    u64::from_le_bytes(b)
}

fn write_u64(memory: &mut [u8], offset: usize, value: u64) {
    memory[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

fn read_i32(memory: &[u8], offset: usize) -> i32 {
    let mut b = [0; 4];
    b.copy_from_slice(&memory[offset..offset + 4]);
    i32::from_le_bytes(b)
}

/// Where a defined symbol lives for an image mapped at `base`: section symbols slide,
/// absolute ones do not; `None` for anything else (undefined, common, indirect, stabs).
fn symbol_address(sym: &Symbol, base: u64, image_len: usize) -> Result<Option<u64>, String> {
    if sym.is_stab() {
        return Ok(None);
    }
    match sym.kind() {
        N_SECT if sym.n_value > image_len as u64 => Err(format!(
            "symbol {}: value {:#x} outside the {image_len:#x}-byte image",
            sym.name, sym.n_value
        )),
        N_SECT => Ok(Some(base + sym.n_value)),
        N_ABS => Ok(Some(sym.n_value)),
        _ => Ok(None),
    }
}

/// What [`LoadedBundle`] knows of one defined name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Definition {
    /// `None` where two definitions of the name disagree.
    address: Option<usize>,
    /// Whether the winning definition is external.
    exported: bool,
}

/// Every defined symbol by name for an image mapped at `base`. Where one name is defined
/// twice, an external definition wins over a local one; two disagreeing definitions of the
/// same kind make the name ambiguous.
fn defined_symbols(
    image: &Image,
    base: u64,
    image_len: usize,
) -> Result<HashMap<String, Definition>, String> {
    let mut found: HashMap<String, Definition> = HashMap::new();
    for sym in &image.symbols {
        let Some(address) = symbol_address(sym, base, image_len)? else {
            continue;
        };
        let this = Definition {
            address: Some(address as usize),
            exported: sym.is_external(),
        };
        let entry = found.entry(sym.name.clone()).or_insert(this);
        if entry.address != this.address {
            if this.exported && !entry.exported {
                *entry = this;
            } else if this.exported == entry.exported {
                entry.address = None;
            }
        }
    }
    Ok(found)
}

/// The 8-byte pointers of every section of `section_type`, read after relocation.
fn pointer_array(image: &Image, memory: &[u8], section_type: u32) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for s in image.sections.iter().filter(|s| s.kind() == section_type) {
        let start = usize::try_from(s.addr).map_err(|_| "section address too large")?;
        let len = usize::try_from(s.size).map_err(|_| "section size too large")?;
        let bytes = start
            .checked_add(len)
            .and_then(|end| memory.get(start..end))
            .filter(|_| len.is_multiple_of(8))
            .ok_or_else(|| {
                format!(
                    "section {},{}: {len:#x} bytes at {start:#x} are not whole pointers inside the image",
                    s.segname, s.sectname
                )
            })?;
        out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()) as usize),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebase_adds_the_base_and_refuses_pointers_outside_the_image() {
        let mut memory = vec![0u8; 0x40];
        write_u64(&mut memory, 0x8, 0x18);
        let base = 0x7000_0000_0000;
        apply_fixups(&mut memory, base, 0x20, &[Fixup::Rebase { offset: 0x8 }]).unwrap();
        assert_eq!(read_u64(&memory, 0x8), base + 0x18);

        write_u64(&mut memory, 0x10, 0x21);
        let e = apply_fixups(&mut memory, base, 0x20, &[Fixup::Rebase { offset: 0x10 }]);
        assert!(e.unwrap_err().contains("outside the 0x20-byte image"));
    }

    #[test]
    fn external_pointer_is_the_target_and_an_addend_is_refused() {
        let mut memory = vec![0u8; 0x20];
        let fixups = [Fixup::Pointer {
            offset: 0,
            target: 0x1234_5678_9000,
        }];
        apply_fixups(&mut memory, 0x4000, 0x20, &fixups).unwrap();
        assert_eq!(read_u64(&memory, 0), 0x1234_5678_9000);

        // kxld would store target + 16, kmutil (11+) the bare target: refused.
        for addend in [16i64, -8] {
            let mut memory = vec![0u8; 0x20];
            write_u64(&mut memory, 8, addend as u64);
            let fixups = [Fixup::Pointer {
                offset: 8,
                target: 0x1000,
            }];
            let e = apply_fixups(&mut memory, 0x4000, 0x20, &fixups).unwrap_err();
            assert!(e.contains(&format!("holds the addend {addend:+}")), "{e}");
        }
    }

    #[test]
    fn branches_reach_one_trampoline_per_destination() {
        // Image of 0x100 bytes; three call sites; room for three trampolines after it.
        let image_len = 0x100;
        let mut memory = vec![0u8; image_len + 3 * TRAMPOLINE_BYTES];
        // Two calls to one function, one to another.
        let far = 0x7fff_0000_1000u64;
        let fixups = [
            Fixup::Branch {
                offset: 0x01,
                target: far,
            },
            Fixup::Branch {
                offset: 0x11,
                target: far + 4,
            },
            Fixup::Branch {
                offset: 0x21,
                target: far,
            },
        ];
        apply_fixups(&mut memory, 0x5555_0000_0000, image_len, &fixups).unwrap();
        // rel32 is relative to the end of the 4-byte slot.
        let lands = |slot: usize| (slot as i64 + 4 + i64::from(read_i32(&memory, slot))) as usize;
        assert_eq!(lands(0x01), image_len, "first trampoline");
        assert_eq!(lands(0x21), image_len, "same destination, same trampoline");
        assert_eq!(
            lands(0x11),
            image_len + TRAMPOLINE_BYTES,
            "another destination, another one"
        );
        let stub = |at: usize| {
            assert_eq!(memory[at..at + 6], TRAMPOLINE_JMP, "jmp *0(%rip)");
            read_u64(&memory, at + 6)
        };
        assert_eq!(stub(image_len), far);
        assert_eq!(stub(image_len + TRAMPOLINE_BYTES), far + 4);

        // A call to an import + 4: kxld would reach far + 4, kmutil (11+) far. Refused.
        let mut memory = vec![0u8; image_len + TRAMPOLINE_BYTES];
        memory[0x11..0x15].copy_from_slice(&4i32.to_le_bytes());
        let fixups = [Fixup::Branch {
            offset: 0x11,
            target: far,
        }];
        let e = apply_fixups(&mut memory, 0x5555_0000_0000, image_len, &fixups).unwrap_err();
        assert!(e.contains("holds the addend +4"), "{e}");
    }

    /// A hand-made `MH_KEXT_BUNDLE`, laid out as `link` lays one out: `__TEXT` at 0 (header
    /// and `__text`), `__DATA` with file contents and a zero-filled tail, `__LINKEDIT`.
    struct TestBundle {
        local_relocs: Vec<(i32, u32)>,
        /// (address, symbol index, pcrel, length, type)
        external_relocs: Vec<(i32, u32, bool, u8, u8)>,
    }

    const TEXT: usize = 0x800;
    const DATA: usize = 0x1000;
    const LINKEDIT: usize = 0x2000;
    const LINKEDIT_VM: u64 = 0x3000;

    /// Symbol indexes (locals, then external definitions, then undefined: `LC_DYSYMTAB`).
    const SYM_EXTERNAL_FUNCTION: u32 = 3;
    const SYM_EXTERNAL_DATA: u32 = 4;

    impl TestBundle {
        /// `_f`: calls `_external_function` and adds 1 (BRANCH); `_g`: returns the pointer
        /// at `__data+0` (local relocation, holds `_f`); `_h`: returns the pointer at
        /// `__data+8` (UNSIGNED to `_external_data`); `__mod_init_func` holds `_g`.
        fn new() -> TestBundle {
            TestBundle {
                local_relocs: vec![(DATA as i32, 2), (DATA as i32 + 0x20, 3)],
                external_relocs: vec![
                    (TEXT as i32 + 2, SYM_EXTERNAL_FUNCTION, true, 2, 2),
                    (DATA as i32 + 8, SYM_EXTERNAL_DATA, false, 3, 0),
                ],
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut file = vec![0u8; LINKEDIT];
            // _f at 0x800: push rbp; call rel32; add rax, 1; pop rbp; ret
            let f = [0x55, 0xe8, 0, 0, 0, 0, 0x48, 0x83, 0xc0, 0x01, 0x5d, 0xc3];
            file[TEXT..TEXT + f.len()].copy_from_slice(&f);
            // _g at 0x810 / _h at 0x820: mov rax, [rip + disp32]; ret
            for (at, slot) in [(TEXT + 0x10, DATA), (TEXT + 0x20, DATA + 8)] {
                let disp = (slot as i32 - (at as i32 + 7)).to_le_bytes();
                let code = [0x48, 0x8b, 0x05, disp[0], disp[1], disp[2], disp[3], 0xc3];
                file[at..at + 8].copy_from_slice(&code);
            }
            file[DATA..DATA + 8].copy_from_slice(&(TEXT as u64).to_le_bytes());
            file[DATA + 0x20..DATA + 0x28].copy_from_slice(&(TEXT as u64 + 0x10).to_le_bytes());

            // __LINKEDIT: local relocations, external relocations, symbols, strings.
            let mut linkedit = Vec::new();
            let locreloff = LINKEDIT + linkedit.len();
            for &(address, section) in &self.local_relocs {
                linkedit.extend(address.to_le_bytes());
                linkedit.extend((section | 3 << 25).to_le_bytes());
            }
            let extreloff = LINKEDIT + linkedit.len();
            for &(address, symbol, pcrel, length, kind) in &self.external_relocs {
                let info = symbol
                    | u32::from(pcrel) << 24
                    | u32::from(length) << 25
                    | 1 << 27
                    | u32::from(kind) << 28;
                linkedit.extend(address.to_le_bytes());
                linkedit.extend(info.to_le_bytes());
            }
            let symbols: [(&str, u8, u8, u64); 5] = [
                ("_g", N_SECT, 1, TEXT as u64 + 0x10),
                ("_h", N_SECT, 1, TEXT as u64 + 0x20),
                ("_f", N_SECT | 1, 1, TEXT as u64),
                ("_external_function", 1, 0, 0),
                ("_external_data", 1, 0, 0),
            ];
            let mut strings = vec![b' ', 0];
            let symoff = LINKEDIT + linkedit.len();
            for (name, n_type, n_sect, n_value) in symbols {
                linkedit.extend((strings.len() as u32).to_le_bytes());
                linkedit.extend([n_type, n_sect, 0, 0]);
                linkedit.extend(n_value.to_le_bytes());
                strings.extend(name.as_bytes());
                strings.push(0);
            }
            let stroff = LINKEDIT + linkedit.len();
            linkedit.extend(&strings);
            file.extend(&linkedit);

            let mut commands = Vec::new();
            let segment = |commands: &mut Vec<u8>,
                           name: &str,
                           vm: (u64, u64),
                           file: (u64, u64),
                           prot: u32,
                           sections: &[(&str, u64, u64, u32)]| {
                commands.extend(0x19u32.to_le_bytes());
                commands.extend((72 + 80 * sections.len() as u32).to_le_bytes());
                commands.extend(name16(name));
                for v in [vm.0, vm.1, file.0, file.1] {
                    commands.extend(v.to_le_bytes());
                }
                for v in [prot, prot, sections.len() as u32, 0] {
                    commands.extend(v.to_le_bytes());
                }
                for &(sectname, addr, size, flags) in sections {
                    commands.extend(name16(sectname));
                    commands.extend(name16(name));
                    commands.extend(addr.to_le_bytes());
                    commands.extend(size.to_le_bytes());
                    for v in [addr as u32, 3, 0, 0, flags, 0, 0, 0] {
                        commands.extend(v.to_le_bytes());
                    }
                }
            };
            let text_flags = 0x8000_0400;
            segment(
                &mut commands,
                "__TEXT",
                (0, 0x1000),
                (0, 0x1000),
                5,
                &[("__text", TEXT as u64, 0x28, text_flags)],
            );
            segment(
                &mut commands,
                "__DATA",
                (0x1000, 0x2000),
                (0x1000, 0x1000),
                3,
                &[
                    ("__data", DATA as u64, 0x10, 0),
                    ("__mod_init_func", DATA as u64 + 0x20, 8, 9),
                ],
            );
            let linkedit_len = linkedit.len() as u64;
            segment(
                &mut commands,
                "__LINKEDIT",
                (LINKEDIT_VM, linkedit_len.next_multiple_of(0x1000)),
                (LINKEDIT as u64, linkedit_len),
                1,
                &[],
            );
            commands.extend(2u32.to_le_bytes());
            commands.extend(24u32.to_le_bytes());
            for v in [symoff, 5, stroff, strings.len()] {
                commands.extend((v as u32).to_le_bytes());
            }
            commands.extend(0xbu32.to_le_bytes());
            commands.extend(80u32.to_le_bytes());
            let dysymtab = [
                0,
                2,
                2,
                1,
                3,
                2,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                extreloff,
                self.external_relocs.len(),
                locreloff,
                self.local_relocs.len(),
            ];
            for v in dysymtab {
                commands.extend((v as u32).to_le_bytes());
            }

            let header = [
                0xfeed_facf,
                0x0100_0007,
                3,
                0xb,
                5,
                commands.len() as u32,
                0,
                0,
            ];
            let mut head: Vec<u8> = header.iter().flat_map(|v: &u32| v.to_le_bytes()).collect();
            head.extend(&commands);
            assert!(head.len() <= TEXT, "load commands fit before __text");
            file[..head.len()].copy_from_slice(&head);
            file
        }
    }

    fn name16(name: &str) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b
    }

    extern "C" fn external_function() -> u64 {
        41
    }

    static EXTERNAL_DATA: [u64; 4] = [0; 4];

    fn resolve_test_imports(name: &str) -> Option<usize> {
        match name {
            "_external_function" => Some(external_function as *const () as usize),
            "_external_data" => Some(EXTERNAL_DATA.as_ptr() as usize),
            _ => None,
        }
    }

    #[test]
    fn loaded_code_runs_with_slid_pointers_and_bound_imports() {
        let bytes = TestBundle::new().bytes();
        let loaded = LoadedBundle::load(&bytes, &mut resolve_test_imports).unwrap();
        let base = loaded.base();
        assert_eq!(base % page_size(), 0);
        let f = loaded.symbol("_f").unwrap();
        let g = loaded.symbol("_g").unwrap();
        let h = loaded.symbol("_h").unwrap();
        assert_eq!(
            (f, g, h),
            (base + TEXT, base + TEXT + 0x10, base + TEXT + 0x20)
        );
        assert_eq!(loaded.symbol("_external_function"), None, "undefined");
        assert_eq!(loaded.exported_symbol("_f"), Some(f));
        assert_eq!(loaded.exported_symbol("_g"), None, "local");
        assert_eq!(loaded.init_functions(), &[g]);
        assert!(loaded.term_functions().is_empty());

        // SAFETY: the three functions are the hand-written code above, `extern "C"` with no
        // arguments and a u64 result, alive while `loaded` is.
        let (f_fn, g_fn, h_fn) = unsafe {
            (
                std::mem::transmute::<usize, extern "C" fn() -> u64>(f),
                std::mem::transmute::<usize, extern "C" fn() -> u64>(g),
                std::mem::transmute::<usize, extern "C" fn() -> u64>(h),
            )
        };
        assert_eq!(
            f_fn(),
            42,
            "the call reached external_function through its trampoline"
        );
        assert_eq!(g_fn() as usize, f, "the local relocation slid the pointer");
        assert_eq!(
            h_fn() as usize,
            EXTERNAL_DATA.as_ptr() as usize,
            "the external pointer is the symbol"
        );
        // SAFETY: `__DATA`'s zero-filled tail (vmsize 0x2000, filesize 0x1000) is mapped
        // read+write while `loaded` lives.
        let tail = unsafe { std::slice::from_raw_parts((base + 0x2000) as *const u8, 0x1000) };
        assert!(tail.iter().all(|&b| b == 0));
    }

    #[test]
    fn refuses_what_the_kernel_would_not_bind() {
        let load = |b: &TestBundle| LoadedBundle::load(&b.bytes(), &mut resolve_test_imports);

        let e = LoadedBundle::load(&TestBundle::new().bytes(), &mut |_| None).unwrap_err();
        assert!(e.contains("undefined symbol _external_function"), "{e}");

        let mut signed = TestBundle::new();
        signed.external_relocs[0].4 = 1; // X86_64_RELOC_SIGNED
        let e = load(&signed).unwrap_err();
        assert!(e.contains("type 1"), "{e}");

        let mut zero_slot = TestBundle::new();
        zero_slot.local_relocs[0] = (DATA as i32 + 0x40, 2);
        zero_slot.external_relocs.clear();
        assert!(
            load(&zero_slot).is_ok(),
            "a zero slot is image offset 0: in range"
        );

        let mut outside = TestBundle::new();
        outside.local_relocs[0].0 = 0x10_0000;
        let e = load(&outside).unwrap_err();
        assert!(e.contains("outside every segment"), "{e}");

        let mut negative = TestBundle::new();
        negative.external_relocs[1].0 = -8;
        let e = load(&negative).unwrap_err();
        assert!(e.contains("negative address"), "{e}");

        let mut not_a_pointer = TestBundle::new();
        not_a_pointer.local_relocs[0].0 = TEXT as i32; // slot holds code, not an address
        let e = load(&not_a_pointer).unwrap_err();
        assert!(e.contains("outside the"), "{e}");

        let mut bad_index = TestBundle::new();
        bad_index.external_relocs[0].1 = 99;
        let e = load(&bad_index).unwrap_err();
        assert!(e.contains("outside the symbol table"), "{e}");
    }
}
