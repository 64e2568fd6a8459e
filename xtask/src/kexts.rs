//! `cargo xtask kexts`: builds `target/kexts/{VirtioFamily,VirtioNet,VirtioBlock}.kext`.
//!
//! One Rust table ([`KEXTS`]) is the source of truth for every bundle: identifiers, versions,
//! libraries, personalities, the C-ABI crate and its header. From it this module
//!
//! 1. generates the C headers of the C-ABI crates with cbindgen (checked into the tree;
//!    `kexts/include/VirtioKextABI.h` and `kexts/<Kext>/shim/<Kext>ABI.h`) and the
//!    `Info.plist` of each kext (checked in as `kexts/<Kext>/Info.plist`); the tests below
//!    fail when a checked-in copy is stale;
//! 2. cross-builds each C-ABI crate as a `no_std` Mach-O static library for the kernel
//!    (`kexts/targets/x86_64-apple-macos-kext.json`: no red zone, soft-float, panic=abort,
//!    static relocation model; `-Zbuild-std` with Debian's rustc-web), and checks that its
//!    exported C symbols are exactly the header's functions;
//! 3. compiles the C++ shims with `-fapple-kext -mkernel` when Kernel.framework headers are
//!    available (`KERNEL_SDK`, or Xcode's on macOS), checks with `ld64.lld -bundle` that every
//!    symbol the shim needs from Rust is defined, and links the kext executable with a
//!    kext-capable linker (`KEXT_LD`, or Xcode's `ld` on macOS). Each part that cannot run
//!    here is named in the output as skipped, with the reason.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Prefix of every IOKit class name we define: class names share one kernel-wide namespace
/// (Apple's own virtio classes included), so ours carry a reverse-DNS prefix.
pub const CLASS_PREFIX: &str = "org_virtiodarwin_";
/// Prefix of every bundle identifier.
pub const BUNDLE_PREFIX: &str = "org.virtiodarwin.driver.";
/// Version of every kext (CFBundleVersion) and the family's OSBundleCompatibleVersion.
pub const VERSION: &str = "0.1.0";
pub const COMPATIBLE_VERSION: &str = "0.1.0";
/// The property the family's nubs carry and device kexts match on.
pub const DEVICE_TYPE_KEY: &str = "VirtioDeviceType";
/// Minimum macOS the shims are compiled for.
pub const MACOS_MIN: &str = "10.13";
const TARGET_JSON: &str = "kexts/targets/x86_64-apple-macos-kext.json";
const TARGET_NAME: &str = "x86_64-apple-macos-kext";

/// Kernel symbols the Rust runtime (`virtio-kext-abi`, feature `kext`) imports.
const RUST_KERNEL_IMPORTS: &[&str] = &["IOMallocAligned", "IOFreeAligned", "IOLog", "panic"];

/// One value in a personality.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    Str(&'static str),
    Int(u64),
    #[allow(dead_code)]
    Bool(bool),
}

/// One IOKit personality.
#[derive(Clone, Copy, Debug)]
pub struct Personality {
    pub name: &'static str,
    pub io_class: &'static str,
    pub provider_class: &'static str,
    pub properties: &'static [(&'static str, Value)],
}

/// One kext bundle.
#[derive(Clone, Copy, Debug)]
pub struct KextSpec {
    /// Bundle name (`<name>.kext`) and executable name.
    pub name: &'static str,
    /// C-ABI crate (cross-built as a static library).
    pub crate_name: &'static str,
    /// Directory of the kext (`kexts/<name>`).
    pub dir: &'static str,
    /// Generated header, relative to the workspace.
    pub header: &'static str,
    /// Prefix of the C functions the crate exports.
    pub symbol_prefix: &'static str,
    /// `OSBundleLibraries`: identifier → minimum version.
    pub libraries: &'static [(&'static str, &'static str)],
    /// Other kexts' exported C functions this one's Rust half calls (resolved by the kernel
    /// linker against the family).
    pub imports_prefix: Option<&'static str>,
    /// Whether other kexts link against this one (`OSBundleCompatibleVersion`).
    pub is_library: bool,
    pub personalities: &'static [Personality],
    /// C++ shim sources in `<dir>/shim`.
    pub shim_sources: &'static [&'static str],
}

impl KextSpec {
    pub fn bundle_id(&self) -> String {
        format!("{BUNDLE_PREFIX}{}", self.name)
    }
    fn lib_file(&self) -> String {
        format!("lib{}.a", self.crate_name.replace('-', "_"))
    }
}

const FAMILY_ID: &str = "org.virtiodarwin.driver.VirtioFamily";
#[cfg(test)]
const KPI: &[(&str, &str)] = &[
    ("com.apple.kpi.iokit", "12.0.0"),
    ("com.apple.kpi.libkern", "12.0.0"),
    ("com.apple.kpi.mach", "12.0.0"),
];

/// The source of truth for all three bundles.
pub const KEXTS: &[KextSpec] = &[
    KextSpec {
        name: "VirtioFamily",
        crate_name: "virtio-family-kext",
        dir: "kexts/VirtioFamily",
        header: "kexts/VirtioFamily/shim/VirtioFamilyABI.h",
        symbol_prefix: "vfam_",
        libraries: &[
            ("com.apple.kpi.iokit", "12.0.0"),
            ("com.apple.kpi.libkern", "12.0.0"),
            ("com.apple.kpi.mach", "12.0.0"),
            ("com.apple.iokit.IOPCIFamily", "2.7"),
        ],
        imports_prefix: None,
        is_library: true,
        personalities: &[Personality {
            name: "VirtioPCI",
            io_class: "org_virtiodarwin_VirtioPCITransport",
            provider_class: "IOPCIDevice",
            properties: &[
                // Filled from virtio-pci's ID table (see `personality_properties`).
                ("IOPCIPrimaryMatch", Value::Str("")),
                // Outbid Apple's own virtio drivers where both are installed.
                ("IOProbeScore", Value::Int(6000)),
                // Ask IOPCIFamily for MSI-X (one vector per queue + config).
                ("IOPCIMSIMode", Value::Str("msix")),
            ],
        }],
        shim_sources: &["VirtioPCITransport.cpp"],
    },
    KextSpec {
        name: "VirtioNet",
        crate_name: "virtio-net-kext",
        dir: "kexts/VirtioNet",
        header: "kexts/VirtioNet/shim/VirtioNetABI.h",
        symbol_prefix: "vnet_",
        libraries: &[
            ("com.apple.kpi.bsd", "12.0.0"),
            ("com.apple.kpi.iokit", "12.0.0"),
            ("com.apple.kpi.libkern", "12.0.0"),
            ("com.apple.kpi.mach", "12.0.0"),
            ("com.apple.iokit.IONetworkingFamily", "3.0"),
            (FAMILY_ID, COMPATIBLE_VERSION),
        ],
        imports_prefix: Some("vfam_"),
        is_library: false,
        personalities: &[Personality {
            name: "VirtioNet",
            io_class: "org_virtiodarwin_VirtioNetController",
            provider_class: "org_virtiodarwin_VirtioDevice",
            properties: &[("VirtioDeviceType", Value::Int(1))],
        }],
        shim_sources: &["VirtioNetController.cpp"],
    },
    KextSpec {
        name: "VirtioBlock",
        crate_name: "virtio-block-kext",
        dir: "kexts/VirtioBlock",
        header: "kexts/VirtioBlock/shim/VirtioBlockABI.h",
        symbol_prefix: "vblk_",
        libraries: &[
            ("com.apple.kpi.iokit", "12.0.0"),
            ("com.apple.kpi.libkern", "12.0.0"),
            ("com.apple.kpi.mach", "12.0.0"),
            ("com.apple.iokit.IOStorageFamily", "1.9"),
            (FAMILY_ID, COMPATIBLE_VERSION),
        ],
        imports_prefix: Some("vfam_"),
        is_library: false,
        personalities: &[Personality {
            name: "VirtioBlock",
            io_class: "org_virtiodarwin_VirtioBlockDevice",
            provider_class: "org_virtiodarwin_VirtioDevice",
            properties: &[("VirtioDeviceType", Value::Int(2))],
        }],
        shim_sources: &["VirtioBlockDevice.cpp"],
    },
];

/// The kexts whose C-ABI crate exists in this tree (the table may run ahead of the code).
pub fn present(root: &Path) -> Vec<&'static KextSpec> {
    KEXTS
        .iter()
        .filter(|k| root.join(k.dir).join("rust/Cargo.toml").exists())
        .collect()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

// ---------------------------------------------------------------- Info.plist

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn value_xml(v: &Value, key: &str, indent: &str, out: &mut String) {
    let _ = match v {
        Value::Str(_) if key == "IOPCIPrimaryMatch" => writeln!(
            out,
            "{indent}<string>{}</string>",
            virtio_pci::IOPCI_PRIMARY_MATCH_ALL
        ),
        Value::Str(s) => writeln!(out, "{indent}<string>{}</string>", xml_escape(s)),
        Value::Int(n) => writeln!(out, "{indent}<integer>{n}</integer>"),
        Value::Bool(b) => writeln!(out, "{indent}<{}/>", if *b { "true" } else { "false" }),
    };
}

/// The `Info.plist` of `k`.
pub fn info_plist(k: &KextSpec) -> String {
    let mut o = String::new();
    o.push_str(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
         \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <!-- Generated by `cargo xtask kexts` from xtask/src/kexts.rs; do not edit. -->\n\
         <plist version=\"1.0\">\n<dict>\n",
    );
    let kv = |o: &mut String, k: &str, v: &str| {
        let _ = writeln!(o, "\t<key>{k}</key>\n\t<string>{}</string>", xml_escape(v));
    };
    kv(&mut o, "CFBundleDevelopmentRegion", "English");
    kv(&mut o, "CFBundleExecutable", k.name);
    kv(&mut o, "CFBundleIdentifier", &k.bundle_id());
    kv(&mut o, "CFBundleInfoDictionaryVersion", "6.0");
    kv(&mut o, "CFBundleName", k.name);
    kv(&mut o, "CFBundlePackageType", "KEXT");
    kv(&mut o, "CFBundleShortVersionString", VERSION);
    kv(&mut o, "CFBundleSignature", "????");
    kv(&mut o, "CFBundleVersion", VERSION);
    o.push_str("\t<key>IOKitPersonalities</key>\n\t<dict>\n");
    for p in k.personalities {
        let _ = writeln!(o, "\t\t<key>{}</key>\n\t\t<dict>", p.name);
        let mut entries: Vec<(&str, Value)> = vec![
            ("CFBundleIdentifier", Value::Str("")),
            ("IOClass", Value::Str(p.io_class)),
            ("IOProviderClass", Value::Str(p.provider_class)),
        ];
        entries.extend(p.properties.iter().copied());
        entries.sort_by_key(|e| e.0);
        for (key, v) in entries {
            let _ = writeln!(o, "\t\t\t<key>{key}</key>");
            if key == "CFBundleIdentifier" {
                let _ = writeln!(o, "\t\t\t<string>{}</string>", k.bundle_id());
            } else {
                value_xml(&v, key, "\t\t\t", &mut o);
            }
        }
        o.push_str("\t\t</dict>\n");
    }
    o.push_str("\t</dict>\n");
    kv(
        &mut o,
        "NSHumanReadableCopyright",
        "virtio-darwin contributors; MIT OR Apache-2.0",
    );
    o.push_str("\t<key>OSBundleLibraries</key>\n\t<dict>\n");
    let mut libs = k.libraries.to_vec();
    libs.sort();
    for (id, v) in libs {
        let _ = writeln!(o, "\t\t<key>{id}</key>\n\t\t<string>{v}</string>");
    }
    o.push_str("\t</dict>\n");
    if k.is_library {
        kv(&mut o, "OSBundleCompatibleVersion", COMPATIBLE_VERSION);
    }
    // `Root`: in the boot caches for local-disk boot, and loaded for network boot as well
    // (`Network-Root` alone would leave the driver out of a local-boot cache).
    kv(&mut o, "OSBundleRequired", "Root");
    o.push_str("</dict>\n</plist>\n");
    o
}

/// Checks a generated plist: well-formed tags, and the project's rules.
pub fn validate_plist(k: &KextSpec, xml: &str) -> Result<(), String> {
    // Tag balance (the subset of XML a plist uses).
    let mut stack: Vec<String> = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        let Some(j) = rest[i..].find('>') else {
            return Err("unterminated tag".into());
        };
        let tag = &rest[i + 1..i + j];
        rest = &rest[i + j + 1..];
        if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open) if open == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else {
            stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed tags {stack:?}"));
    }
    let has = |s: &str| xml.contains(s);
    for key in [
        "CFBundleIdentifier",
        "CFBundleExecutable",
        "CFBundleVersion",
        "CFBundlePackageType",
        "IOKitPersonalities",
        "OSBundleLibraries",
        "OSBundleRequired",
    ] {
        if !has(&format!("<key>{key}</key>")) {
            return Err(format!("{}: missing {key}", k.name));
        }
    }
    if !has("<key>OSBundleRequired</key>\n\t<string>Root</string>") {
        return Err(format!("{}: OSBundleRequired must be Root", k.name));
    }
    if k.is_library != has("<key>OSBundleCompatibleVersion</key>") {
        return Err(format!("{}: OSBundleCompatibleVersion iff library", k.name));
    }
    for p in k.personalities {
        if !p.io_class.starts_with(CLASS_PREFIX) {
            return Err(format!("{}: class {} lacks the prefix", k.name, p.io_class));
        }
        if p.provider_class != "IOPCIDevice" {
            if !p.provider_class.starts_with(CLASS_PREFIX) {
                return Err(format!("{}: provider {}", k.name, p.provider_class));
            }
            if !p.properties.iter().any(|(key, _)| *key == DEVICE_TYPE_KEY) {
                return Err(format!("{}: matches no {DEVICE_TYPE_KEY}", k.name));
            }
        } else if !has(&format!(
            "<string>{}</string>",
            virtio_pci::IOPCI_PRIMARY_MATCH_ALL
        )) {
            return Err(format!(
                "{}: IOPCIPrimaryMatch not from the ID table",
                k.name
            ));
        }
    }
    for (id, v) in k.libraries {
        if id.starts_with(BUNDLE_PREFIX) {
            // A dependency on our library kext: between its compatible and current version.
            if version_key(v) < version_key(COMPATIBLE_VERSION)
                || version_key(v) > version_key(VERSION)
            {
                return Err(format!("{}: {id} {v} outside the compatible range", k.name));
            }
        }
    }
    Ok(())
}

fn version_key(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

// ---------------------------------------------------------------- headers

const HEADER_BANNER: &str = "/* Generated by `cargo xtask kexts` (cbindgen) from the Rust C-ABI crate; do not edit.\n * A test fails when this file is stale. */";

/// Generates the header of a crate at `crate_dir` (`shared`: the ABI types header).
pub fn generate_header(crate_dir: &Path, guard: &str, shared: bool) -> Result<String, String> {
    let mut config = cbindgen::Config {
        language: cbindgen::Language::C,
        header: Some(HEADER_BANNER.to_string()),
        include_guard: Some(guard.to_string()),
        cpp_compat: true,
        usize_is_size_t: true,
        no_includes: true,
        sys_includes: vec!["stdint.h".into(), "stddef.h".into()],
        after_includes: Some("#ifndef __cplusplus\n#include <stdbool.h>\n#endif".into()),
        documentation: true,
        style: cbindgen::Style::Type,
        ..Default::default()
    };
    if shared {
        // No functions reach these types in the ABI crate itself: list them.
        config.export.include = [
            "VkSegment",
            "VkDmaRegion",
            "VkQueueSpec",
            "VkQueueStats",
            "VkInterruptCause",
            "VkStatus",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
    } else {
        config.includes = vec!["VirtioKextABI.h".into()];
    }
    config.enumeration.prefix_with_name = true;
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_crate(crate_dir)
        .generate()
        .map_err(|e| format!("cbindgen {}: {e}", crate_dir.display()))?
        .write(&mut out);
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// Every generated file (path relative to the workspace, contents).
pub fn generated_files(root: &Path) -> Result<Vec<(String, String)>, String> {
    let mut files = vec![(
        "kexts/include/VirtioKextABI.h".to_string(),
        generate_header(&root.join("kexts/abi"), "VIRTIO_KEXT_ABI_H", true)?,
    )];
    for k in present(root) {
        let guard = format!("{}_ABI_H", k.name.to_uppercase());
        files.push((
            k.header.to_string(),
            generate_header(&root.join(k.dir).join("rust"), &guard, false)?,
        ));
        files.push((format!("{}/Info.plist", k.dir), info_plist(k)));
    }
    Ok(files)
}

/// C functions a generated header declares with `prefix`.
pub fn declared_functions(header: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in header.lines() {
        if line.starts_with(' ') || line.starts_with('#') || line.starts_with("typedef") {
            continue;
        }
        if let Some(i) = line.find(prefix) {
            let name: String = line[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if line[i + name.len()..].starts_with('(') {
                out.insert(name);
            }
        }
    }
    out
}

// ---------------------------------------------------------------- Mach-O symbols

/// Global symbols of a Mach-O static library: (defined, undefined-and-not-defined-anywhere),
/// with the leading underscore removed.
pub fn archive_symbols(bytes: &[u8]) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
    use object::read::archive::ArchiveFile;
    use object::{Object, ObjectSymbol};
    let ar = ArchiveFile::parse(bytes).map_err(|e| e.to_string())?;
    let (mut defined, mut undefined) = (BTreeSet::new(), BTreeSet::new());
    for m in ar.members() {
        let m = m.map_err(|e| e.to_string())?;
        let data = m.data(bytes).map_err(|e| e.to_string())?;
        if !data.starts_with(&[0xcf, 0xfa, 0xed, 0xfe]) {
            continue; // the symbol table member, or not a 64-bit Mach-O object
        }
        let obj = object::File::parse(data).map_err(|e| e.to_string())?;
        for s in obj.symbols() {
            let Ok(name) = s.name() else { continue };
            let name = name.strip_prefix('_').unwrap_or(name).to_string();
            if s.is_undefined() {
                undefined.insert(name);
            } else if s.is_global() {
                defined.insert(name);
            }
        }
    }
    let undefined = undefined.difference(&defined).cloned().collect();
    Ok((defined, undefined))
}

/// Undefined symbols of a Mach-O object file.
fn object_undefined(bytes: &[u8]) -> Result<BTreeSet<String>, String> {
    use object::{Object, ObjectSymbol};
    let obj = object::File::parse(bytes).map_err(|e| e.to_string())?;
    Ok(obj
        .symbols()
        .filter(|s| s.is_undefined())
        .filter_map(|s| s.name().ok())
        .map(|n| n.strip_prefix('_').unwrap_or(n).to_string())
        .collect())
}

/// Checks a built library against its header: exported C functions == declared ones, and
/// every other import is the kernel runtime's or (device kexts) the family's.
pub fn check_library(k: &KextSpec, lib: &[u8], header: &str) -> Result<(), String> {
    let (defined, undefined) = archive_symbols(lib)?;
    let exported: BTreeSet<String> = defined
        .iter()
        .filter(|s| s.starts_with(k.symbol_prefix))
        .cloned()
        .collect();
    let declared = declared_functions(header, k.symbol_prefix);
    if exported != declared {
        return Err(format!(
            "{}: exported but not declared {:?}; declared but not exported {:?}",
            k.name,
            exported.difference(&declared).collect::<Vec<_>>(),
            declared.difference(&exported).collect::<Vec<_>>()
        ));
    }
    let unexpected: Vec<&String> = undefined
        .iter()
        .filter(|s| !RUST_KERNEL_IMPORTS.contains(&s.as_str()))
        .filter(|s| !k.imports_prefix.is_some_and(|p| s.starts_with(p)))
        .collect();
    if !unexpected.is_empty() {
        return Err(format!("{}: unexpected imports {unexpected:?}", k.name));
    }
    Ok(())
}

// ---------------------------------------------------------------- the command

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn find_tool(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    candidates.iter().map(PathBuf::from).find(|p| {
        p.is_absolute() && p.exists()
            || Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
    })
}

/// The Kernel.framework headers: `KERNEL_SDK` (its `Headers` directory or the SDK root), or
/// Xcode's on macOS.
fn kernel_headers() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KERNEL_SDK") {
        let p = PathBuf::from(p);
        return Some(if p.join("Headers").is_dir() {
            p.join("Headers")
        } else {
            p
        });
    }
    if cfg!(target_os = "macos") {
        let out = Command::new("xcrun")
            .args(["--sdk", "macosx", "--show-sdk-path"])
            .output()
            .ok()?;
        let sdk = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let h = sdk.join("System/Library/Frameworks/Kernel.framework/Headers");
        return h.is_dir().then_some(h);
    }
    None
}

/// Builds the Rust static library of `k`; returns its path.
fn build_staticlib(root: &Path, k: &KextSpec) -> Result<PathBuf, String> {
    let target_dir = root.join("target/kext-build");
    let rustc = std::env::var("KEXT_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = std::env::var("KEXT_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    run(Command::new(&cargo)
        .current_dir(root)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("MACOSX_DEPLOYMENT_TARGET", MACOS_MIN)
        .env_remove("RUSTFLAGS")
        .args([
            "rustc",
            "-p",
            k.crate_name,
            "--release",
            "--features",
            "kext",
        ])
        .arg("--target")
        .arg(root.join(TARGET_JSON))
        .args([
            "-Zbuild-std=core,alloc,compiler_builtins",
            "-Zbuild-std-features=compiler-builtins-mem",
            "-Zjson-target-spec",
            "--crate-type",
            "staticlib",
        ])
        .arg("--target-dir")
        .arg(&target_dir))?;
    Ok(target_dir
        .join(TARGET_NAME)
        .join("release")
        .join(k.lib_file()))
}

/// An object defining `dyld_stub_binder`, for the trial link only.
fn stub_binder(clang: &str, dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("stub_binder.c");
    let obj = dir.join("stub_binder.o");
    std::fs::write(
        &src,
        "void stub(void) __asm__(\"dyld_stub_binder\");\nvoid stub(void) {}\n",
    )
    .map_err(|e| e.to_string())?;
    run(Command::new(clang)
        .args(["-target", "x86_64-apple-macos10.13", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj))?;
    Ok(obj)
}

/// `kmod_info` for the executable (what Xcode generates as `<name>_info.c`).
fn kmod_info_source(k: &KextSpec) -> String {
    format!(
        "#include <mach/mach_types.h>\n\
         extern kern_return_t _start(kmod_info_t *ki, void *data);\n\
         extern kern_return_t _stop(kmod_info_t *ki, void *data);\n\
         __attribute__((visibility(\"default\"))) KMOD_EXPLICIT_DECL({}, \"{VERSION}\", _start, _stop)\n\
         __private_extern__ kmod_start_func_t *_realmain = 0;\n\
         __private_extern__ kmod_stop_func_t *_antimain = 0;\n\
         __private_extern__ int _kext_apple_cc = __APPLE_CC__;\n",
        k.bundle_id()
    )
}

fn clang_args(headers: &Path, includes: &[PathBuf], cxx: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "-target",
        "x86_64-apple-macos10.13",
        "-mkernel",
        "-nostdinc",
        "-fno-builtin",
        "-fno-exceptions",
        "-fno-rtti",
        "-fno-common",
        "-DKERNEL",
        "-DKERNEL_SDK_CHECK",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unused-parameter",
        "-O2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if cxx {
        a.push("-fapple-kext".into());
    }
    a.push(format!("-I{}", headers.display()));
    for i in includes {
        a.push(format!("-I{}", i.display()));
    }
    a
}

/// `cargo xtask kexts [--check]`. `--check`: fail on stale generated files instead of
/// rewriting them.
pub fn cmd_kexts(args: &[String]) -> Result<bool, String> {
    let check_only = args.iter().any(|a| a == "--check");
    let root = workspace_root();
    let out_dir = root.join("target/kexts");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let mut skipped: Vec<String> = Vec::new();

    println!("== generated files (headers via cbindgen, Info.plist) ==");
    for (path, contents) in generated_files(&root)? {
        let p = root.join(&path);
        let old = std::fs::read_to_string(&p).unwrap_or_default();
        if old == contents {
            println!("  up to date  {path}");
        } else if check_only {
            return Err(format!("{path} is stale: run `cargo xtask kexts`"));
        } else {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            }
            std::fs::write(&p, contents).map_err(|e| e.to_string())?;
            println!("  regenerated {path}");
        }
    }

    let headers = kernel_headers();
    let lld = find_tool(
        "LD64_LLD",
        &["ld64.lld", "ld64.lld-14", "/usr/lib/llvm-14/bin/ld64.lld"],
    );
    let kext_ld = std::env::var("KEXT_LD")
        .ok()
        .map(PathBuf::from)
        .or_else(|| cfg!(target_os = "macos").then(|| PathBuf::from("/usr/bin/ld")));
    let clang = std::env::var("CLANGXX").unwrap_or_else(|_| "clang++".into());

    for k in present(&root) {
        println!("\n== {}.kext ==", k.name);
        let bundle = out_dir.join(format!("{}.kext/Contents", k.name));
        std::fs::create_dir_all(bundle.join("MacOS")).map_err(|e| e.to_string())?;
        std::fs::write(bundle.join("Info.plist"), info_plist(k)).map_err(|e| e.to_string())?;
        validate_plist(k, &info_plist(k))?;
        println!("  Info.plist: written and validated");

        println!(
            "  Rust: cross-building {} (x86_64, kernel codegen)...",
            k.crate_name
        );
        let lib = build_staticlib(&root, k)?;
        let lib_bytes = std::fs::read(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        let header = std::fs::read_to_string(root.join(k.header)).map_err(|e| e.to_string())?;
        check_library(k, &lib_bytes, &header)?;
        let lib_out = out_dir.join(format!("{}-x86_64.a", k.name));
        std::fs::copy(&lib, &lib_out).map_err(|e| e.to_string())?;
        println!(
            "  Rust: {} ({} KiB); exported C symbols == {} declarations",
            lib_out.display(),
            lib_bytes.len() / 1024,
            k.header
        );
        println!(
            "  Rust: aarch64 skipped (arm64e kexts need pointer authentication, which this toolchain's targets do not provide)"
        );

        let Some(h) = &headers else {
            skipped.push(format!(
                "{}: C++ shim compile and link (no Kernel.framework headers: set KERNEL_SDK)",
                k.name
            ));
            println!(
                "  shim: SKIPPED compile and link (no Kernel.framework headers: set KERNEL_SDK)"
            );
            continue;
        };
        let obj_dir = root.join("target/kexts/obj").join(k.name);
        std::fs::create_dir_all(&obj_dir).map_err(|e| e.to_string())?;
        let includes = vec![
            root.join("kexts/include"),
            root.join(k.dir).join("shim"),
            root.join("kexts/VirtioFamily/shim"),
        ];
        let mut objs = Vec::new();
        for src in k.shim_sources {
            let s = root.join(k.dir).join("shim").join(src);
            let o = obj_dir.join(src.replace(".cpp", ".o"));
            run(Command::new(&clang)
                .args(clang_args(h, &includes, true))
                .args(["-std=gnu++17", "-nostdinc++", "-c"])
                .arg(&s)
                .arg("-o")
                .arg(&o))?;
            println!(
                "  shim: compiled {src} ({clang}, -fapple-kext -mkernel, headers {})",
                h.display()
            );
            objs.push(o);
        }
        let info_c = obj_dir.join(format!("{}_info.c", k.name));
        std::fs::write(&info_c, kmod_info_source(k)).map_err(|e| e.to_string())?;
        let info_o = obj_dir.join(format!("{}_info.o", k.name));
        let clang_c = clang.replace("clang++", "clang");
        run(Command::new(&clang_c)
            .args(clang_args(h, &includes, false))
            .args(["-c", "-x", "c"])
            .arg(&info_c)
            .arg("-o")
            .arg(&info_o))?;
        objs.push(info_o);

        // Every symbol the shim needs from Rust must be in the library.
        let mut need = BTreeSet::new();
        for o in &objs {
            need.extend(object_undefined(
                &std::fs::read(o).map_err(|e| e.to_string())?,
            )?);
        }
        let (defined, rust_undefined) = archive_symbols(&lib_bytes)?;
        let ours = ["vfam_", "vnet_", "vblk_"];
        let missing: Vec<&String> = need
            .iter()
            .filter(|s| ours.iter().any(|p| s.starts_with(p)))
            .filter(|s| {
                !defined.contains(*s) && !k.imports_prefix.is_some_and(|p| s.starts_with(p))
            })
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{}: shim needs undefined Rust symbols {missing:?}",
                k.name
            ));
        }
        match &lld {
            Some(lld) => {
                // A trial link: everything not ours is the kernel's (or the family's) and is
                // left undefined with -U; any other undefined symbol fails the link.
                let mut c = Command::new(lld);
                c.args([
                    "-arch",
                    "x86_64",
                    "-bundle",
                    "-platform_version",
                    "macos",
                    MACOS_MIN,
                    MACOS_MIN,
                ])
                .arg("-o")
                .arg(obj_dir.join("trial.bundle"))
                .args(&objs)
                .arg(&lib)
                // ld64.lld insists on dyld's binder, which a kext (bound by the kernel
                // linker) never uses: a stub stands in for it.
                .arg(stub_binder(&clang_c, &obj_dir)?);
                for s in need.iter().chain(&rust_undefined) {
                    let ours_here = s.starts_with(k.symbol_prefix);
                    if !ours_here {
                        c.arg("-U").arg(format!("_{s}"));
                    }
                }
                let out = c.output().map_err(|e| e.to_string())?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    println!(
                        "  shim: ld64.lld -bundle trial link OK (all shim→Rust symbols defined)"
                    );
                } else if stderr.contains("undefined symbol") || stderr.contains("duplicate symbol")
                {
                    return Err(format!("{}: ld64.lld trial link failed:\n{stderr}", k.name));
                } else {
                    // ld64.lld 14 crashes writing stub helpers for -U symbols; the symbol
                    // check above (object files vs. the library) still stands.
                    skipped.push(format!(
                        "{}: ld64.lld trial link ({} crashed; shim→Rust symbols checked from the symbol tables instead)",
                        k.name,
                        lld.display()
                    ));
                    println!(
                        "  shim: ld64.lld trial link SKIPPED (the linker crashed); shim→Rust symbols all defined per symbol tables"
                    );
                }
            }
            None => skipped.push(format!(
                "{}: trial link (no ld64.lld: apt-get install lld)",
                k.name
            )),
        }
        match &kext_ld {
            Some(ld) => {
                let exe = bundle.join("MacOS").join(k.name);
                let libdir = h
                    .parent()
                    .map(|p| p.join("Library/x86_64"))
                    .unwrap_or_default();
                let mut c = Command::new(ld);
                c.args([
                    "-kext",
                    "-arch",
                    "x86_64",
                    "-macosx_version_min",
                    MACOS_MIN,
                    "-o",
                ])
                .arg(&exe)
                .args(&objs)
                .arg(&lib)
                .arg(format!("-L{}", libdir.display()))
                .args(["-lkmodc++", "-lkmod", "-lcc_kext"]);
                run(&mut c)?;
                println!("  link: {} ({})", exe.display(), ld.display());
            }
            None => {
                skipped.push(format!(
                    "{}: kext executable link (no kext-capable linker: set KEXT_LD to Apple's ld64)",
                    k.name
                ));
                println!("  link: SKIPPED (no kext-capable linker: set KEXT_LD to Apple's ld64)");
            }
        }
    }
    println!();
    if skipped.is_empty() {
        println!("kexts: everything built");
    } else {
        println!("kexts: built the Rust libraries and plists; skipped:");
        for s in &skipped {
            println!("  - {s}");
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_generated_files_are_fresh() {
        let root = workspace_root();
        for (path, contents) in generated_files(&root).unwrap() {
            let old = std::fs::read_to_string(root.join(&path)).unwrap_or_default();
            assert!(old == contents, "{path} is stale: run `cargo xtask kexts`");
        }
    }

    #[test]
    fn plists_follow_the_rules() {
        for k in KEXTS {
            let xml = info_plist(k);
            validate_plist(k, &xml).unwrap();
            assert!(xml.contains(&format!("<string>{}</string>", k.bundle_id())));
        }
        // The rules bite.
        let mut bad = KEXTS[1];
        bad.libraries = &[(FAMILY_ID, "0.0.1")];
        assert!(validate_plist(&bad, &info_plist(&bad)).is_err());
        let xml =
            info_plist(&KEXTS[0]).replace("<string>Root</string>", "<string>Network-Root</string>");
        assert!(validate_plist(&KEXTS[0], &xml).is_err());
        assert!(validate_plist(&KEXTS[0], "<plist><dict></plist>").is_err());
    }

    #[test]
    fn device_kexts_depend_on_the_family_and_match_its_nub() {
        let family = &KEXTS[0];
        let nub = format!("{CLASS_PREFIX}VirtioDevice");
        for k in &KEXTS[1..] {
            assert!(k.libraries.contains(&(FAMILY_ID, COMPATIBLE_VERSION)));
            assert!(k.personalities.iter().all(|p| p.provider_class == nub));
        }
        assert_eq!(family.bundle_id(), FAMILY_ID);
        for (kpi, _) in KPI {
            assert!(
                KEXTS
                    .iter()
                    .all(|k| k.libraries.iter().any(|l| l.0 == *kpi))
            );
        }
    }

    #[test]
    fn personality_classes_are_defined_by_the_shims() {
        let root = workspace_root();
        for k in present(&root) {
            let mut src = String::new();
            for s in k.shim_sources {
                src += &std::fs::read_to_string(root.join(k.dir).join("shim").join(s))
                    .unwrap_or_default();
            }
            for p in k.personalities {
                assert!(
                    src.contains(&format!("OSDefineMetaClassAndStructors({},", p.io_class)),
                    "{}: no class {}",
                    k.name,
                    p.io_class
                );
            }
        }
    }

    #[test]
    fn header_function_parser() {
        let h = "VkStatus vfam_a(VfamDevice *dev);\nvoid vfam_b(void);\n  vfam_c(x);\ntypedef void (*vfam_t)(int);\n";
        let got: Vec<_> = declared_functions(h, "vfam_").into_iter().collect();
        assert_eq!(got, vec!["vfam_a", "vfam_b"]);
    }

    /// When `cargo xtask kexts` has built the libraries (as `cargo xtask test` does before
    /// `cargo test`), their symbol tables must match the headers.
    #[test]
    fn built_libraries_match_their_headers() {
        let root = workspace_root();
        for k in present(&root) {
            let lib = root
                .join("target/kexts")
                .join(format!("{}-x86_64.a", k.name));
            let Ok(bytes) = std::fs::read(&lib) else {
                eprintln!(
                    "{}: not built (run `cargo xtask kexts`); symbol check skipped",
                    k.name
                );
                continue;
            };
            let header = std::fs::read_to_string(root.join(k.header)).unwrap();
            check_library(k, &bytes, &header).unwrap();
        }
    }
}
