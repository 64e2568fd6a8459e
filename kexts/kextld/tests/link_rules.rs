//! The linker's resolution rules on small C fixtures (`tests/fixtures/link/`), compiled by
//! Debian's clang as kext code is: a strong definition beats a weak one, two strong ones
//! are an error, common symbols are refused, archive members are pulled only when needed,
//! a root nothing defines is an error; and the linked code runs (loaded, slid and bound as
//! the kernel would) with the values the rules imply.

use kextld::check::{CheckContext, check};
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
