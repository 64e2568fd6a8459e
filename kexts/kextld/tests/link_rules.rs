//! The linker's resolution rules on small C fixtures (`tests/fixtures/link/`), compiled by
//! Debian's clang as kext code is: a strong definition beats a weak one, two strong ones
//! are an error, common symbols are refused, archive members are pulled only when needed,
//! a root nothing defines is an error; and the linked code runs (loaded, slid and bound as
//! the kernel would) with the values the rules imply.

use kextld::check::{CheckContext, Rule, check};
use kextld::fixture::{self, C_FLAGS};
use kextld::image::Image;
use kextld::link::{Input, Linked, Options, link};

fn object(source: &str, extra_flags: &[&str]) -> Option<Input> {
    let flags: Vec<&str> = C_FLAGS.iter().chain(extra_flags).copied().collect();
    let data = fixture::compile("clang", &flags, &format!("link/{source}"))?;
    Some(Input {
        name: source.replace(".c", ".o"),
        data,
    })
}

fn options(roots: &[&str], exports: &[&str]) -> Options {
    Options {
        exports: exports.iter().map(|s| s.to_string()).collect(),
        roots: roots.iter().map(|s| s.to_string()).collect(),
        min_macos: (10, 13, 0),
        uuid: None,
    }
}

/// An `ar` archive (BSD format, as Apple's and Rust's static libraries are) of `members`.
fn archive(members: &[Input]) -> Input {
    let mut data = b"!<arch>\n".to_vec();
    for m in members {
        // BSD long names: `#1/<len>` and the name before the data.
        let name = m.name.as_bytes();
        let size = name.len() + m.data.len();
        let header = format!(
            "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            format!("#1/{}", name.len()),
            0,
            0,
            0,
            644,
            size
        );
        data.extend_from_slice(header.as_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&m.data);
        if data.len() % 2 == 1 {
            data.push(b'\n');
        }
    }
    Input {
        name: "libfixture.a".into(),
        data,
    }
}

fn defined(linked: &Linked, name: &str) -> bool {
    Image::parse(&linked.bytes)
        .expect("parses")
        .symbols
        .iter()
        .any(|s| s.name == name && s.is_section_defined())
}

#[test]
fn a_strong_definition_beats_a_weak_one_whatever_the_order() {
    let (Some(weak), Some(strong)) = (object("weak.c", &[]), object("strong.c", &[])) else {
        return;
    };
    for inputs in [
        [weak.clone(), strong.clone()],
        [strong.clone(), weak.clone()],
    ] {
        let linked = link(&inputs, &options(&["_call_pick"], &["_call_pick"])).unwrap();
        #[cfg(all(unix, target_arch = "x86_64"))]
        {
            let loaded =
                kextld::load::LoadedBundle::load(&linked.bytes, &mut |_| None).expect("no imports");
            let call_pick = loaded.symbol("_call_pick").unwrap();
            // SAFETY: `int call_pick(void)` of the loaded fixture, SysV ABI, still mapped.
            let f: extern "C" fn() -> i32 = unsafe { std::mem::transmute(call_pick) };
            assert_eq!(f(), 2, "the strong pick() is the one called");
        }
        let _ = linked;
    }
}

#[test]
fn two_strong_definitions_are_refused() {
    let (Some(a), Some(b)) = (object("strong.c", &[]), object("strong_again.c", &[])) else {
        return;
    };
    let e = link(&[a, b], &options(&[], &[])).err().expect("refused");
    assert!(e.message.contains("_pick defined more than once"), "{e}");
}

#[test]
fn common_symbols_are_refused() {
    let Some(common) = object("common.c", &["-fcommon"]) else {
        return;
    };
    let e = link(&[common], &options(&[], &[])).err().expect("refused");
    assert!(e.message.contains("common symbol _shared_counter"), "{e}");
    assert!(e.message.contains("-fno-common"), "{e}");
}

#[test]
fn archive_members_are_pulled_on_demand_and_the_code_runs() {
    let (Some(root), Some(used), Some(unused)) = (
        object("root.c", &[]),
        object("member_used.c", &[]),
        object("member_unused.c", &[]),
    ) else {
        return;
    };
    let lib = archive(&[unused, used]);
    let linked = link(&[root, lib], &options(&["_root_entry"], &["_root_entry"])).unwrap();
    assert!(defined(&linked, "_used_helper"), "needed member pulled");
    assert!(
        !defined(&linked, "_unused_helper"),
        "unneeded member left out"
    );
    assert_eq!(linked.imports, vec!["_import_from_kernel".to_string()]);
    assert_eq!(linked.exports, vec!["_root_entry".to_string()]);
    // It also passes the kernel linker's rules (given a kmod_info it would lack: only that
    // rule may fire).
    let violations = check(
        &linked.bytes,
        &CheckContext::new(["_import_from_kernel"], ["_root_entry"]),
    );
    assert!(
        violations.iter().all(|v| v.message.contains("kmod_info")),
        "{violations:?}"
    );
    #[cfg(all(unix, target_arch = "x86_64"))]
    {
        extern "C" fn import_from_kernel(x: i32) -> i32 {
            x * 1000
        }
        let loaded = kextld::load::LoadedBundle::load(&linked.bytes, &mut |name| {
            (name == "_import_from_kernel")
                .then_some(import_from_kernel as extern "C" fn(i32) -> i32 as usize)
        })
        .expect("loads");
        let entry = loaded.symbol("_root_entry").unwrap();
        // SAFETY: `int root_entry(int, int)` of the loaded fixture, SysV ABI, still mapped.
        let f: extern "C" fn(i32, i32) -> i32 = unsafe { std::mem::transmute(entry) };
        assert_eq!(f(0, 5), 16, "through the table into the pulled member");
        assert_eq!(f(1, 5), 5000, "through the table into the import");
        assert_eq!(f(4, 5), 305, "through the switch's jump table");
        assert_eq!(f(9, 5), -1);
        let address = loaded.symbol("_global_address").unwrap();
        let value = loaded.symbol("_global_value").unwrap();
        // SAFETY: `int *global_address(void)` of the loaded fixture.
        let g: extern "C" fn() -> *const i32 = unsafe { std::mem::transmute(address) };
        assert_eq!(g() as usize, value, "the slid address of the global");
        // SAFETY: the global lives in the mapped bundle.
        assert_eq!(unsafe { *g() }, 40);
    }
}

#[test]
fn a_root_nothing_defines_is_an_error() {
    let Some(strong) = object("strong.c", &[]) else {
        return;
    };
    let e = link(&[strong], &options(&["_no_such_function"], &[]))
        .err()
        .expect("refused");
    assert!(
        e.message.contains("_no_such_function is not defined"),
        "{e}"
    );
}

/// An assembly fixture (`tests/fixtures/link/<source>.s`), assembled by clang for the
/// kext target.
fn assembled(source: &str) -> Option<Input> {
    let data = fixture::compile(
        "clang",
        &["-target", "x86_64-apple-macos10.13"],
        &format!("link/{source}"),
    )?;
    Some(Input {
        name: source.replace(".s", ".o"),
        data,
    })
}

/// `n_desc` of the undefined symbol `name` in a linked bundle.
fn import_desc(linked: &Linked, name: &str) -> u16 {
    Image::parse(&linked.bytes)
        .expect("parses")
        .symbols
        .iter()
        .find(|s| s.name == name && s.is_undefined())
        .unwrap_or_else(|| panic!("{name} is imported"))
        .n_desc
}

#[test]
fn an_addend_on_an_imported_symbol_is_refused() {
    // &kernel_table[2]: kxld would bind kernel_table + 8, kmutil (11+) kernel_table.
    let Some(pointer) = object("import_pointer_addend.c", &[]) else {
        return;
    };
    let e = link(&[pointer], &options(&["_get_third_entry"], &[]))
        .err()
        .expect("refused");
    assert!(e.message.starts_with("import_pointer_addend.o: "), "{e}");
    assert!(
        e.message.contains("pointer to imported _kernel_table +8"),
        "{e}"
    );
    assert!(e.message.contains("macOS 11+"), "{e}");

    // call kernel_function+4.
    let Some(call) = assembled("import_call_addend.s") else {
        return;
    };
    let e = link(&[call], &options(&["_call_past_entry"], &[]))
        .err()
        .expect("refused");
    assert!(
        e.message.contains("call to imported _kernel_function +4"),
        "{e}"
    );
}

#[test]
fn a_weak_import_stays_weak_unless_another_object_references_it_strongly() {
    let (Some(weak), Some(strong)) = (object("weak_import.c", &[]), object("strong_import.c", &[]))
    else {
        return;
    };
    let linked = link(
        std::slice::from_ref(&weak),
        &options(&["_weak_user"], &["_weak_user"]),
    )
    .unwrap();
    assert_ne!(
        import_desc(&linked, "_maybe_there") & object::macho::N_WEAK_REF,
        0,
        "weak_import reaches the output"
    );
    assert_eq!(
        import_desc(&linked, "_always_there") & object::macho::N_WEAK_REF,
        0
    );
    // No library exports _maybe_there: kxld binds it to kext_weak_symbol_referenced
    // because the kext tests for it (references gOSKextUnresolved), but macOS 11+'s kext
    // collection builder binds a missing weak import only in a pointer: the direct call
    // is refused, and nothing else but the kmod_info rule (the fixture has none).
    let context = |export: &str| {
        CheckContext::new(
            ["_always_there", "_gOSKextUnresolved"],
            [export.to_string()],
        )
    };
    let violations = check(&linked.bytes, &context("_weak_user"));
    let calls: Vec<_> = violations
        .iter()
        .filter(|v| v.rule == Rule::Relocations)
        .collect();
    assert!(
        calls.len() == 1
            && calls[0]
                .message
                .contains("calls _maybe_there, a weak import"),
        "{violations:?}"
    );
    assert!(
        violations
            .iter()
            .all(|v| v.rule == Rule::Relocations || v.message.contains("kmod_info")),
        "{violations:?}"
    );
    // Called through a pointer it passes: the weak import is exempt from having a library.
    if let Some(pointer) = object("weak_import_pointer.c", &[]) {
        let linked = link(
            &[pointer],
            &options(&["_weak_pointer_user"], &["_weak_pointer_user"]),
        )
        .unwrap();
        assert_ne!(
            import_desc(&linked, "_maybe_there") & object::macho::N_WEAK_REF,
            0
        );
        let violations = check(&linked.bytes, &context("_weak_pointer_user"));
        assert!(
            violations.iter().all(|v| v.message.contains("kmod_info")),
            "{violations:?}"
        );
    }

    // One strong reference anywhere makes it strong (ld64's default), in either order.
    for inputs in [
        [weak.clone(), strong.clone()],
        [strong.clone(), weak.clone()],
    ] {
        let linked = link(&inputs, &options(&["_weak_user", "_strong_user"], &[])).unwrap();
        assert_eq!(
            import_desc(&linked, "_maybe_there") & object::macho::N_WEAK_REF,
            0,
            "a strong reference wins"
        );
    }
}

#[test]
fn a_difference_with_a_section_relative_minuend_is_the_linked_distance() {
    let Some(input) = assembled("section_minuend.s") else {
        return;
    };
    let linked = link(&[input], &options(&["_section_minuend_entry"], &["_*"])).unwrap();
    #[cfg(all(unix, target_arch = "x86_64"))]
    {
        let loaded =
            kextld::load::LoadedBundle::load(&linked.bytes, &mut |_| None).expect("no imports");
        let at = |name: &str| loaded.symbol(name).unwrap_or_else(|| panic!("{name}"));
        // SAFETY: each symbol is an aligned 8-byte datum in the mapped bundle.
        let quad = |name: &str| unsafe { *(at(name) as *const i64) };
        // _ptr_a (a local relocation) holds L_a's loaded address.
        let a = quad("_ptr_a");
        let b = at("_b") as i64;
        assert_eq!(quad("_diff"), a - b, "L_a - _b");
        assert_eq!(quad("_diff_plus"), a + 8 - b, "L_a + 8 - _b");
        assert_eq!(quad("_diff_mid"), a - (b + 8), "L_a - L_b_mid");
        // The slot holds an address before the section's start (a negative addend).
        assert_eq!(quad("_diff_before"), a - 16 - b, "L_a - 16 - _b");
        // SAFETY: as above, a 4-byte datum.
        let long = unsafe { *(at("_diff32") as *const i32) };
        assert_eq!(i64::from(long), a - b, "32-bit L_a - _b");
    }
    let _ = linked;
}
