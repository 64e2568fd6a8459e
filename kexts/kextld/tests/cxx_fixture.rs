//! IOKit-style C++ through kextld: the fixture in `tests/fixtures/iokit_style*` (an
//! OSObject/OSMetaClass-like object model, no Apple headers) compiled with clang++ the way
//! kexts are, linked with `kextld::link` as a library kext (the base classes, in the role
//! of libkern/IOKit) and a driver kext (subclasses importing them), checked with
//! `kextld::check`, and — where the loader runs (x86_64 Unix) — loaded, with the
//! constructors run and a virtual call made through the vtable.
//!
//! Without clang++ the tests pass with a note, unless `CI` is set: then a missing
//! compiler fails them.

use std::sync::OnceLock;

use kextld::check::{CheckContext, Rule, check};
use kextld::fixture::{self, CXX_FLAGS, link_kext};
use kextld::image::{Image, Section};
use kextld::link::Linked;
use object::macho;

const REGISTER_DTORS_OFF: &str = "-fno-register-global-dtors-with-atexit";

/// What the library kext exports: its classes' symbols (vtables, MetaClasses, methods,
/// pad slots) and the global operator delete, as libkern exports OSObject's.
const LIBRARY_EXPORT_PATTERNS: [&str; 4] = [
    "__Z*8KxObject*",
    "__Z*9KxService*",
    "__Z*11KxMetaClass*",
    "__ZdlPv",
];

/// What the driver kext exports: only the entry points the tests call.
const DRIVER_EXPORT_PATTERNS: [&str; 1] = ["_kx_demo_*"];

const LIBRARY_SOURCE: &str = "iokit_style.cpp";
const DRIVER_SOURCE: &str = "iokit_style_driver.cpp";

/// Compiles `tests/fixtures/<source>` with clang++ and `flags`; `None` (skip) when
/// clang++ is missing and `CI` is unset.
fn compile(source: &str, flags: &[&str]) -> Option<Vec<u8>> {
    fixture::compile("clang++", flags, source)
}

struct Fixture {
    library: Linked,
    driver: Linked,
}

impl Fixture {
    /// The library is linked against nothing (it imports nothing, as the checks assert).
    fn library_context(&self) -> CheckContext {
        CheckContext::new([KERNEL_IMPORT], LIBRARY_EXPORT_PATTERNS)
    }

    /// The driver declares the library kext as its only library.
    fn driver_context(&self) -> CheckContext {
        CheckContext::new(self.library.exports.clone(), DRIVER_EXPORT_PATTERNS)
    }
}

/// Both kexts compiled with `CXX_FLAGS` and linked; `None` = skipped.
fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let library = compile(LIBRARY_SOURCE, CXX_FLAGS)?;
            let driver = compile(DRIVER_SOURCE, CXX_FLAGS)?;
            Some(Fixture {
                library: link_kext("iokit_style.o", library, &LIBRARY_EXPORT_PATTERNS),
                driver: link_kext("iokit_style_driver.o", driver, &DRIVER_EXPORT_PATTERNS),
            })
        })
        .as_ref()
}

fn parse(bundle: &[u8]) -> Image<'_> {
    Image::parse(bundle).expect("a linked bundle parses")
}

/// The one symbol the library kext imports from "the kernel".
const KERNEL_IMPORT: &str = "_kx_kernel_note_retain";

const ATEXIT_SYMBOLS: [&str; 3] = ["___cxa_atexit", "___dso_handle", "_atexit"];

#[test]
fn library_and_driver_pass_the_checker() {
    let Some(fixture) = fixture() else { return };
    assert_eq!(
        check(&fixture.library.bytes, &fixture.library_context()),
        Vec::new(),
        "library"
    );
    assert_eq!(
        check(&fixture.driver.bytes, &fixture.driver_context()),
        Vec::new(),
        "driver"
    );
    assert_eq!(fixture.library.imports, vec![KERNEL_IMPORT.to_string()]);
    for import in &fixture.driver.imports {
        assert!(
            fixture.library.exports.contains(import),
            "the driver imports {import}, which the library does not export"
        );
    }
}

#[test]
fn no_atexit_registration_is_imported() {
    let Some(fixture) = fixture() else { return };
    for (name, linked) in [("library", &fixture.library), ("driver", &fixture.driver)] {
        for symbol in ATEXIT_SYMBOLS {
            assert!(
                !linked.imports.iter().any(|import| import == symbol),
                "the {name} imports {symbol}: {:?}",
                linked.imports
            );
        }
    }
}

/// The `__mod_init_func` / `__mod_term_func` section of `image` (by section type).
fn routine_section<'i>(image: &'i Image<'_>, kind: u32) -> Option<&'i Section> {
    image.sections.iter().find(|section| section.kind() == kind)
}

/// Asserts that every pointer in the routine section `kind` has a local relocation naming
/// a section of instructions, and that its value points into that section.
fn assert_routines_are_local_pointers(name: &str, bundle: &[u8], kind: u32, what: &str) {
    let image = parse(bundle);
    let section =
        routine_section(&image, kind).unwrap_or_else(|| panic!("the {name} has no {what} section"));
    assert_eq!(section.segname, "__DATA", "{name}: {what}");
    assert!(
        section.size > 0 && section.size.is_multiple_of(8),
        "{name}: {what}"
    );
    for slot in (section.addr..section.addr + section.size).step_by(8) {
        let reloc = image
            .local_relocs
            .iter()
            .find(|reloc| i64::from(reloc.address) == slot as i64)
            .unwrap_or_else(|| panic!("{name}: {what} slot {slot:#x} has no local relocation"));
        assert_eq!(reloc.kind, macho::X86_64_RELOC_UNSIGNED);
        assert_eq!(reloc.length, 3);
        let target = image
            .section_by_ordinal(reloc.symbolnum)
            .expect("the relocation's section");
        assert!(
            target.has_instructions(),
            "{name}: {what} slot {slot:#x} points into {}",
            target.full_name()
        );
        let routine = image.u64_at(slot).expect("the slot's value");
        assert!(
            target.contains(routine),
            "{name}: {what} slot {slot:#x} holds {routine:#x}"
        );
        assert!(
            image
                .external_relocs
                .iter()
                .all(|reloc| i64::from(reloc.address) != slot as i64),
            "{name}: {what} slot {slot:#x} also has an external relocation"
        );
    }
}

#[test]
fn constructors_and_destructors_are_local_pointers_in_mod_init_and_mod_term_func() {
    let Some(fixture) = fixture() else { return };
    for (name, linked) in [("library", &fixture.library), ("driver", &fixture.driver)] {
        assert_routines_are_local_pointers(
            name,
            &linked.bytes,
            macho::S_MOD_INIT_FUNC_POINTERS,
            "__mod_init_func",
        );
        assert_routines_are_local_pointers(
            name,
            &linked.bytes,
            macho::S_MOD_TERM_FUNC_POINTERS,
            "__mod_term_func",
        );
    }
}

/// The symbol an external relocation at `address` names, if there is one.
fn external_target<'i>(image: &'i Image<'_>, address: u64) -> Option<&'i str> {
    image
        .external_relocs
        .iter()
        .find(|reloc| i64::from(reloc.address) == address as i64)
        .and_then(|reloc| image.symbols.get(reloc.symbolnum as usize))
        .map(|symbol| symbol.name.as_str())
}

fn has_local_reloc(image: &Image<'_>, address: u64) -> bool {
    image
        .local_relocs
        .iter()
        .any(|reloc| i64::from(reloc.address) == address as i64)
}

/// The checker's C++ rules pass on the fixture above; this makes sure they had something
/// to check: superClass pointers naming the right MetaClasses, and driver vtables with both
/// kinds of slots, pad slots among the inherited ones.
#[test]
fn classes_have_the_shape_the_kernel_linker_patches() {
    let Some(fixture) = fixture() else { return };
    let driver = parse(&fixture.driver.bytes);
    for (class, super_meta) in [
        ("12KxDemoDriver", "__ZN9KxService10gMetaClassE"),
        ("12KxDemoHelper", "__ZN8KxObject10gMetaClassE"),
    ] {
        let pointer = driver
            .symbol(&format!("__ZN{class}10superClassE"))
            .unwrap_or_else(|| panic!("{class}::superClass"));
        assert_eq!(external_target(&driver, pointer.n_value), Some(super_meta));
        for vtable in [format!("__ZTV{class}"), format!("__ZTVN{class}9MetaClassE")] {
            assert!(driver.symbol(&vtable).is_some(), "{vtable}");
        }
    }

    // The library's KxService names KxObject's MetaClass through a local relocation.
    let library = parse(&fixture.library.bytes);
    let pointer = library
        .symbol("__ZN9KxService10superClassE")
        .expect("KxService::superClass");
    assert!(has_local_reloc(&library, pointer.n_value));
    let target = library.u64_at(pointer.n_value).expect("superClass's value");
    assert_eq!(
        library
            .symbol("__ZN8KxObject10gMetaClassE")
            .map(|s| s.n_value),
        Some(target)
    );

    // KxDemoDriver's vtable: inherited slots (0 + external relocation), pad slots among
    // them, and local slots (its overrides, with local relocations).
    let vtable = driver.symbol("__ZTV12KxDemoDriver").expect("the vtable");
    let first_slot = vtable.n_value + 16;
    let mut inherited = Vec::new();
    let mut local = 0;
    for slot in (first_slot..).step_by(8).take(64) {
        let value = driver.u64_at(slot).unwrap_or(0);
        if let Some(target) = external_target(&driver, slot) {
            assert_eq!(value, 0, "inherited slot {slot:#x} -> {target}");
            inherited.push(target.to_string());
        } else if value != 0 {
            assert!(has_local_reloc(&driver, slot), "local slot {slot:#x}");
            local += 1;
        } else {
            break;
        }
    }
    assert!(local >= 4, "{local} local slots"); // start, probeScore, describe, queueDepth...
    for expected in [
        "__ZN9KxService4stopEPS_",
        "__ZNK9KxService11serviceNameEv",
        "__ZNK8KxObject6retainEv",
        "__ZN8KxObject18_RESERVEDKxObject0Ev",
        "__ZN9KxService19_RESERVEDKxService1Ev",
    ] {
        assert!(
            inherited.iter().any(|name| name == expected),
            "{expected} not among the inherited slots {inherited:?}"
        );
    }
}

/// Destructor registration at run time instead of `__mod_term_func`. darwin-facts.md says
/// clang emits `___cxa_atexit`/`___dso_handle` for kext destructors unless given
/// `-fno-register-global-dtors-with-atexit`. Debian's clang 14 does not: `-fapple-kext` and
/// `-mkernel` already force `-fno-use-cxa-atexit` and turn that registration off by
/// default. So the driver is compiled twice: without the flag (whatever this clang
/// imports for its destructors, the checker must refuse it, and if it imports nothing the
/// destructors must be in `__mod_term_func`), and with `-fregister-global-dtors-with-atexit`
/// (clang's default outside kexts), which registers them with `atexit`, refused alike.
#[test]
fn destructors_registered_at_run_time_are_refused() {
    let Some(fixture) = fixture() else { return };
    let without_flag: Vec<&str> = CXX_FLAGS
        .iter()
        .copied()
        .filter(|&flag| flag != REGISTER_DTORS_OFF)
        .collect();
    let mut with_registration = without_flag.clone();
    with_registration.push("-fregister-global-dtors-with-atexit");

    for (flags, must_register) in [(without_flag, false), (with_registration, true)] {
        let Some(object) = compile(DRIVER_SOURCE, &flags) else {
            return;
        };
        let driver = link_kext("iokit_style_driver.o", object, &DRIVER_EXPORT_PATTERNS);
        let registration: Vec<&String> = driver
            .imports
            .iter()
            .filter(|import| ATEXIT_SYMBOLS.contains(&import.as_str()))
            .collect();
        if registration.is_empty() {
            assert!(!must_register, "{flags:?}: no atexit import");
            eprintln!(
                "note: this clang++ keeps kext destructors in __mod_term_func even without {REGISTER_DTORS_OFF}"
            );
            let image = parse(&driver.bytes);
            assert!(routine_section(&image, macho::S_MOD_TERM_FUNC_POINTERS).is_some());
            continue;
        }
        let violations = check(&driver.bytes, &fixture.driver_context());
        for symbol in registration {
            assert!(
                violations
                    .iter()
                    .any(|violation| violation.rule == Rule::Imports
                        && violation.message.starts_with(symbol.as_str())
                        && violation.message.contains(REGISTER_DTORS_OFF)),
                "{flags:?}: no import violation for {symbol}: {violations:#?}"
            );
        }
    }
}

/// Loads both bundles into this process the way the kernel would (library first; the
/// driver's imports bound to the library's exports), runs their constructors, makes a
/// virtual call through the driver's vtable into inherited library code, and runs the
/// destructors.
#[cfg(all(unix, target_arch = "x86_64"))]
#[test]
fn loaded_kexts_construct_call_virtually_and_destruct() {
    use kextld::load::LoadedBundle;

    let Some(fixture) = fixture() else { return };
    extern "C" fn note_retain(_count: u32) {}
    let library = LoadedBundle::load(&fixture.library.bytes, &mut |name| {
        (name == KERNEL_IMPORT).then_some(note_retain as extern "C" fn(u32) as usize)
    })
    .expect("loading the library kext");
    let driver = LoadedBundle::load(&fixture.driver.bytes, &mut |name| {
        library.exported_symbol(name)
    })
    .expect("loading the driver kext");

    let call = |address: usize| -> i32 {
        // SAFETY: every address passed here is a function of a loaded bundle taking no
        // arguments and returning int or nothing (constructors, destructors and the
        // `extern "C"` entry points of the fixture), compiled for x86_64 with the SysV
        // calling convention this process uses; the bundles stay mapped until the end of
        // the test.
        let function: extern "C" fn() -> i32 = unsafe { std::mem::transmute(address) };
        function()
    };
    let registered_classes = library
        .exported_symbol("__ZN11KxMetaClass20registeredClassCountEv")
        .expect("KxMetaClass::registeredClassCount");
    let lifecycle = driver
        .exported_symbol("_kx_demo_lifecycle")
        .expect("kx_demo_lifecycle");

    for &constructor in library.init_functions() {
        call(constructor);
    }
    assert_eq!(call(registered_classes), 2, "KxObject and KxService");
    assert_eq!(call(lifecycle), 0, "before the driver's constructors");
    for &constructor in driver.init_functions() {
        call(constructor);
    }
    assert_eq!(
        call(registered_classes),
        4,
        "plus KxDemoDriver and KxDemoHelper"
    );
    assert_eq!(call(lifecycle), 4, "the lifecycle object saw four classes");

    // KxDemoDriver::describe (local slot) = 100 + KxService::describe (library)
    // = 100 + 10 + KxObject::describe (1).
    let describe = driver
        .exported_symbol("_kx_demo_describe_new_driver")
        .expect("kx_demo_describe_new_driver");
    assert_eq!(call(describe), 111);

    for &destructor in driver.term_functions().iter().rev() {
        call(destructor);
    }
    assert_eq!(call(lifecycle), -1, "the lifecycle object was destroyed");
    assert_eq!(
        call(registered_classes),
        2,
        "the driver's MetaClasses unregistered"
    );
    for &destructor in library.term_functions().iter().rev() {
        call(destructor);
    }
    assert_eq!(call(registered_classes), 0);
}
