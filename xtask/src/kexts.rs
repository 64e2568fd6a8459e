//! `cargo xtask kexts`: builds `target/kexts/{VirtioFamily,VirtioNet,VirtioBlock,VirtioEntropy,VirtioConsole,VirtioBalloon}.kext`.
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
//! 3. compiles the C++ shims with `-fapple-kext -mkernel` when Kernel.framework headers that
//!    suit the deployment target are available (`KERNEL_SDK`, one fetched with
//!    `--fetch-sdk`, or Xcode's on macOS: [`kernel_headers`], [`sdk_refusal`]), links each
//!    kext executable with `kextld` (or `KEXT_LD`, Apple's `ld -kext`) and checks it. Each
//!    part that cannot run here is named in the output as skipped, with the reason.

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
/// The family personality's list of device types that have a device kext.
pub const DRIVER_TYPES_KEY: &str = "VirtioDriverTypes";
/// The property the family's nubs carry and device kexts match on.
pub const DEVICE_TYPE_KEY: &str = "VirtioDeviceType";
/// Minimum macOS the shims are compiled for.
pub const MACOS_MIN: &str = "10.13";
/// The `com.apple.kpi.*` version the kexts require: the kernel's (Darwin) version of
/// [`MACOS_MIN`] (macOS 10.13 = Darwin 17), so the declared libraries, the deployment
/// target the shims are compiled for and the docs agree. A test keeps them in step.
pub const KPI_VERSION: &str = "17.0.0";
const TARGET_JSON: &str = "kexts/targets/x86_64-apple-macos-kext.json";
const TARGET_NAME: &str = "x86_64-apple-macos-kext";

/// One value in a personality.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    Str(&'static str),
    Int(u64),
    #[allow(dead_code)]
    Bool(bool),
    /// The device types that have a device kext in [`KEXTS`] (filled in when written).
    DriverTypes,
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
    /// Exported-symbols list (globs of Mach-O names): what other kexts link against. Every
    /// other definition is made local, so no kext defines a symbol its libraries define.
    pub exports: &'static [&'static str],
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
    ("com.apple.kpi.iokit", KPI_VERSION),
    ("com.apple.kpi.libkern", KPI_VERSION),
];

/// The source of truth for every bundle.
pub const KEXTS: &[KextSpec] = &[
    KextSpec {
        name: "VirtioFamily",
        crate_name: "virtio-family-kext",
        dir: "kexts/VirtioFamily",
        header: "kexts/VirtioFamily/shim/VirtioFamilyABI.h",
        symbol_prefix: "vfam_",
        libraries: &[
            ("com.apple.kpi.iokit", KPI_VERSION),
            ("com.apple.kpi.libkern", KPI_VERSION),
            ("com.apple.kpi.mach", KPI_VERSION),
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
                // Outbid macOS's own virtio drivers (AppleVirtIO drives blk on 10.14+ and net
                // on 10.15+) for the types we drive: installing these kexts means choosing
                // them. A score only counts among drivers matching in the same pass: on
                // 10.13-10.15, where ours are in the prelinked kernel. On 11+ ours come with
                // the auxiliary kext collection after user space starts, and a device a
                // system driver took while booting (the boot disk at least) stays with it.
                // Types without a device kext here are refused in probe, so they stay
                // with whatever else drives them; the `virtiodarwin_defer` boot-arg hands
                // chosen types back (docs/install.md).
                ("IOProbeScore", Value::Int(6000)),
                // The device types with a device kext: the family refuses every other type
                // in probe, so it never takes a device nothing of ours would drive.
                (DRIVER_TYPES_KEY, Value::DriverTypes),
                // No MSI key: IOPCIFamily itself chooses MSI-X for a function that has an
                // MSI-X capability and no MSI one (every virtio-pci function); the shim then
                // takes the interrupt indexes of type kIOInterruptTypePCIMessaged.
            ],
        }],
        shim_sources: &["VirtioPCITransport.cpp"],
        // The bus functions and the nub class (29 = length of its name in C++ mangling).
        exports: &["_vfam_*", "*29org_virtiodarwin_VirtioDevice*"],
    },
    KextSpec {
        name: "VirtioNet",
        crate_name: "virtio-net-kext",
        dir: "kexts/VirtioNet",
        header: "kexts/VirtioNet/shim/VirtioNetABI.h",
        symbol_prefix: "vnet_",
        libraries: &[
            ("com.apple.kpi.bsd", KPI_VERSION),
            ("com.apple.kpi.iokit", KPI_VERSION),
            ("com.apple.kpi.libkern", KPI_VERSION),
            ("com.apple.kpi.mach", KPI_VERSION),
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
        exports: &[],
    },
    KextSpec {
        name: "VirtioBlock",
        crate_name: "virtio-block-kext",
        dir: "kexts/VirtioBlock",
        header: "kexts/VirtioBlock/shim/VirtioBlockABI.h",
        symbol_prefix: "vblk_",
        libraries: &[
            ("com.apple.kpi.iokit", KPI_VERSION),
            ("com.apple.kpi.libkern", KPI_VERSION),
            ("com.apple.kpi.mach", KPI_VERSION),
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
        exports: &[],
    },
    KextSpec {
        name: "VirtioEntropy",
        crate_name: "virtio-entropy-kext",
        dir: "kexts/VirtioEntropy",
        header: "kexts/VirtioEntropy/shim/VirtioEntropyABI.h",
        symbol_prefix: "vrng_",
        libraries: &[
            // The kernel's random pool is fed by writing to /dev/random (vnode KPI):
            // `write_random` itself is exported only by com.apple.kpi.private, which the
            // kernel refuses to let a non-Apple kext declare.
            ("com.apple.kpi.bsd", KPI_VERSION),
            ("com.apple.kpi.iokit", KPI_VERSION),
            ("com.apple.kpi.libkern", KPI_VERSION),
            (FAMILY_ID, COMPATIBLE_VERSION),
        ],
        imports_prefix: Some("vfam_"),
        is_library: false,
        personalities: &[Personality {
            name: "VirtioEntropy",
            io_class: "org_virtiodarwin_VirtioEntropy",
            provider_class: "org_virtiodarwin_VirtioDevice",
            properties: &[("VirtioDeviceType", Value::Int(4))],
        }],
        shim_sources: &["VirtioEntropy.cpp"],
        exports: &[],
    },
    KextSpec {
        name: "VirtioConsole",
        crate_name: "virtio-console-kext",
        dir: "kexts/VirtioConsole",
        header: "kexts/VirtioConsole/shim/VirtioConsoleABI.h",
        symbol_prefix: "vcon_",
        libraries: &[
            ("com.apple.kpi.iokit", KPI_VERSION),
            ("com.apple.kpi.libkern", KPI_VERSION),
            // IOSerialDriverSync and the IORS232SerialStreamSync nubs IOSerialBSDClient
            // turns into /dev/tty.* and /dev/cu.* (1.0.4: the family's
            // OSBundleCompatibleVersion since 10.0).
            ("com.apple.iokit.IOSerialFamily", "1.0.4"),
            (FAMILY_ID, COMPATIBLE_VERSION),
        ],
        imports_prefix: Some("vfam_"),
        is_library: false,
        personalities: &[Personality {
            name: "VirtioConsole",
            io_class: "org_virtiodarwin_VirtioConsole",
            provider_class: "org_virtiodarwin_VirtioDevice",
            properties: &[("VirtioDeviceType", Value::Int(3))],
        }],
        shim_sources: &["VirtioConsole.cpp"],
        exports: &[],
    },
    KextSpec {
        name: "VirtioBalloon",
        crate_name: "virtio-balloon-kext",
        dir: "kexts/VirtioBalloon",
        header: "kexts/VirtioBalloon/shim/VirtioBalloonABI.h",
        symbol_prefix: "vbal_",
        libraries: &[
            ("com.apple.kpi.iokit", KPI_VERSION),
            ("com.apple.kpi.libkern", KPI_VERSION),
            // `kernel_task`, the task the balloon's wired chunks belong to.
            ("com.apple.kpi.mach", KPI_VERSION),
            (FAMILY_ID, COMPATIBLE_VERSION),
        ],
        imports_prefix: Some("vfam_"),
        is_library: false,
        personalities: &[Personality {
            name: "VirtioBalloon",
            io_class: "org_virtiodarwin_VirtioBalloon",
            provider_class: "org_virtiodarwin_VirtioDevice",
            properties: &[("VirtioDeviceType", Value::Int(5))],
        }],
        shim_sources: &["VirtioBalloon.cpp"],
        exports: &[],
    },
];

/// The virtio device types some device kext in [`KEXTS`] matches (`VirtioDeviceType`).
pub fn driver_types() -> BTreeSet<u64> {
    KEXTS
        .iter()
        .flat_map(|k| k.personalities)
        .flat_map(|p| p.properties)
        .filter_map(|(key, v)| match (key, v) {
            (&DEVICE_TYPE_KEY, Value::Int(t)) => Some(*t),
            _ => None,
        })
        .collect()
}

/// The kexts whose C-ABI crate exists in this tree (the table may run ahead of the code).
pub fn present(root: &Path) -> Vec<&'static KextSpec> {
    KEXTS
        .iter()
        .filter(|k| root.join(k.dir).join("rust/Cargo.toml").exists())
        .collect()
}

/// The workspace, found at run time (see `virtio_tests::qemu::find_workspace`).
pub fn workspace_root() -> Result<PathBuf, String> {
    virtio_tests::qemu::find_workspace().ok_or_else(|| {
        "cannot find the virtio-darwin workspace: run cargo xtask from inside the repository"
            .to_string()
    })
}

// ---------------------------------------------------------------- Info.plist

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn value_xml(v: &Value, key: &str, indent: &str, out: &mut String) {
    let _ = match v {
        // The ID masks hold `&`, which XML (and the kernel's OSUnserializeXML) accepts only
        // as `&amp;`.
        Value::Str(_) if key == "IOPCIPrimaryMatch" => writeln!(
            out,
            "{indent}<string>{}</string>",
            xml_escape(virtio_pci::IOPCI_PRIMARY_MATCH_ALL)
        ),
        Value::Str(s) => writeln!(out, "{indent}<string>{}</string>", xml_escape(s)),
        Value::Int(n) => writeln!(out, "{indent}<integer>{n}</integer>"),
        Value::Bool(b) => writeln!(out, "{indent}<{}/>", if *b { "true" } else { "false" }),
        Value::DriverTypes => {
            let mut o = format!("{indent}<array>\n");
            for t in driver_types() {
                let _ = writeln!(o, "{indent}\t<integer>{t}</integer>");
            }
            writeln!(out, "{o}{indent}</array>")
        }
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
    // `Root`: in the prelinked kernel (10.13-10.15, PureDarwin) for local-disk boot, and
    // loaded for network boot as well (`Network-Root` alone would leave the driver out of a
    // local-boot cache). On 11+ no key puts a third-party kext into the boot kext
    // collection: ours load from the auxiliary one once user space runs (docs/install.md).
    kv(&mut o, "OSBundleRequired", "Root");
    o.push_str("</dict>\n</plist>\n");
    o
}

/// Checks a generated plist as the kernel reads it: parsed by a real property-list parser
/// (a bare `&` or an unbalanced tag fails here as it fails in OSUnserializeXML), then the
/// project's rules on the parsed values.
pub fn validate_plist(k: &KextSpec, xml: &str) -> Result<(), String> {
    let value = plist::Value::from_reader_xml(xml.as_bytes())
        .map_err(|e| format!("{}: Info.plist does not parse: {e}", k.name))?;
    let dict = value
        .as_dictionary()
        .ok_or_else(|| format!("{}: Info.plist is not a dictionary", k.name))?;
    let string = |key: &str| dict.get(key).and_then(plist::Value::as_string);
    for key in [
        "CFBundleIdentifier",
        "CFBundleExecutable",
        "CFBundleVersion",
        "CFBundlePackageType",
        "IOKitPersonalities",
        "OSBundleLibraries",
        "OSBundleRequired",
    ] {
        if !dict.contains_key(key) {
            return Err(format!("{}: missing {key}", k.name));
        }
    }
    if string("CFBundleExecutable") != Some(k.name) {
        return Err(format!("{}: CFBundleExecutable is not {}", k.name, k.name));
    }
    if string("CFBundleIdentifier") != Some(k.bundle_id().as_str()) {
        return Err(format!(
            "{}: CFBundleIdentifier is not {}",
            k.name,
            k.bundle_id()
        ));
    }
    if string("CFBundlePackageType") != Some("KEXT") {
        return Err(format!("{}: CFBundlePackageType is not KEXT", k.name));
    }
    if string("OSBundleRequired") != Some("Root") {
        return Err(format!("{}: OSBundleRequired must be Root", k.name));
    }
    if k.is_library != dict.contains_key("OSBundleCompatibleVersion") {
        return Err(format!("{}: OSBundleCompatibleVersion iff library", k.name));
    }
    let personalities = dict
        .get("IOKitPersonalities")
        .and_then(plist::Value::as_dictionary)
        .ok_or_else(|| format!("{}: IOKitPersonalities is not a dictionary", k.name))?;
    for p in k.personalities {
        let Some(parsed) = personalities
            .get(p.name)
            .and_then(plist::Value::as_dictionary)
        else {
            return Err(format!("{}: personality {} missing", k.name, p.name));
        };
        let get = |key: &str| parsed.get(key).and_then(plist::Value::as_string);
        if !p.io_class.starts_with(CLASS_PREFIX) || get("IOClass") != Some(p.io_class) {
            return Err(format!("{}: class {} lacks the prefix", k.name, p.io_class));
        }
        if get("CFBundleIdentifier") != Some(k.bundle_id().as_str()) {
            return Err(format!(
                "{}: personality {} names another bundle",
                k.name, p.name
            ));
        }
        if p.provider_class != "IOPCIDevice" {
            if !p.provider_class.starts_with(CLASS_PREFIX) {
                return Err(format!("{}: provider {}", k.name, p.provider_class));
            }
            if parsed
                .get(DEVICE_TYPE_KEY)
                .and_then(plist::Value::as_unsigned_integer)
                .is_none()
            {
                return Err(format!("{}: matches no {DEVICE_TYPE_KEY}", k.name));
            }
        } else {
            if get("IOPCIPrimaryMatch") != Some(virtio_pci::IOPCI_PRIMARY_MATCH_ALL) {
                return Err(format!(
                    "{}: IOPCIPrimaryMatch not from the ID table",
                    k.name
                ));
            }
            let types: Option<BTreeSet<u64>> = parsed
                .get(DRIVER_TYPES_KEY)
                .and_then(plist::Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(plist::Value::as_unsigned_integer)
                        .collect()
                });
            if types != Some(driver_types()) {
                return Err(format!(
                    "{}: {DRIVER_TYPES_KEY} is not the device kexts' types {:?}",
                    k.name,
                    driver_types()
                ));
            }
        }
    }
    let libraries = dict
        .get("OSBundleLibraries")
        .and_then(plist::Value::as_dictionary)
        .ok_or_else(|| format!("{}: OSBundleLibraries is not a dictionary", k.name))?;
    for (id, v) in k.libraries {
        if libraries.get(id).and_then(plist::Value::as_string) != Some(v) {
            return Err(format!("{}: OSBundleLibraries lacks {id} {v}", k.name));
        }
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
    files.push((
        crate::console_log::LOG_PLIST_SRC.to_string(),
        crate::console_log::log_daemon_plist(),
    ));
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
        .filter(|s| !kernel_exports().any(|(k, _)| k.strip_prefix('_') == Some(s.as_str())))
        .filter(|s| !k.imports_prefix.is_some_and(|p| s.starts_with(p)))
        .collect();
    if !unexpected.is_empty() {
        return Err(format!("{}: unexpected imports {unexpected:?}", k.name));
    }
    Ok(())
}

// ---------------------------------------------------------------- kernel exports

/// `kexts/kernel-imports.tsv`: every kernel and family symbol the kexts import, with the
/// bundle that exports it (see the file's header).
const KERNEL_IMPORTS_TABLE: &str = include_str!("../../kexts/kernel-imports.tsv");

/// (symbol, exporting library) pairs of [`KERNEL_IMPORTS_TABLE`].
pub fn kernel_exports() -> impl Iterator<Item = (&'static str, &'static str)> {
    KERNEL_IMPORTS_TABLE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once('\t'))
}

/// What `k` may import: the kernel symbols its declared libraries export, plus what the
/// family bundle exports when `k` declares the family.
fn allowed_imports(k: &KextSpec, family_exports: &[String]) -> BTreeSet<String> {
    let declared = |lib: &str| k.libraries.iter().any(|(id, _)| *id == lib);
    let mut allowed: BTreeSet<String> = kernel_exports()
        .filter(|(_, lib)| declared(lib))
        .map(|(sym, _)| sym.to_string())
        .collect();
    if declared(FAMILY_ID) {
        allowed.extend(family_exports.iter().cloned());
    }
    allowed
}

/// Checks a linked bundle against the kernel linker's rules (`kextld::check`).
fn check_bundle(k: &KextSpec, bytes: &[u8], family_exports: &[String]) -> Result<(), String> {
    let ctx = kextld::check::CheckContext {
        library_exports: allowed_imports(k, family_exports),
        export_patterns: k.exports.iter().map(|s| s.to_string()).collect(),
    };
    let violations = kextld::check::check(bytes, &ctx);
    if violations.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "{}: the bundle breaks {} of the kernel linker's rules:",
        k.name,
        violations.len()
    );
    for v in &violations {
        let _ = write!(msg, "\n  - {v}");
    }
    Err(msg)
}

/// Every library in `OSBundleLibraries` must be one the kext imports from: a dependency
/// it does not use only widens the set of kernels it loads on for nothing (and a kernel
/// linker resolves against it in vain).
fn check_libraries_used(
    k: &KextSpec,
    bytes: &[u8],
    family_exports: &[String],
) -> Result<(), String> {
    let image = kextld::image::Image::parse(bytes).map_err(|e| format!("{}: {e}", k.name))?;
    let imports: BTreeSet<&str> = image
        .symbols
        .iter()
        .filter(|s| s.is_undefined())
        .map(|s| s.name.as_str())
        .collect();
    for (lib, _) in k.libraries {
        let used = if *lib == FAMILY_ID {
            family_exports.iter().any(|e| imports.contains(e.as_str()))
        } else {
            kernel_exports().any(|(sym, l)| l == *lib && imports.contains(sym))
        };
        if !used {
            return Err(format!(
                "{}: declares {lib} in OSBundleLibraries but imports nothing from it: drop it",
                k.name
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- the command

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("{}: {e}", cmd.get_program().to_string_lossy()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({status})",
            cmd.get_program().to_string_lossy()
        ))
    }
}

/// The public Kernel SDK a user may fetch with `--fetch-sdk`.
const SDK_REPOSITORY: &str = "https://github.com/acidanthera/MacKernelSDK";

fn fetched_sdk(root: &Path) -> PathBuf {
    root.join("target/MacKernelSDK")
}

/// Where the Kernel SDK's headers came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SdkSource {
    /// `KERNEL_SDK`.
    Env,
    /// `--fetch-sdk`, in `target/MacKernelSDK`.
    Fetched,
    /// Xcode's macOS SDK (Kernel.framework), found by itself on macOS.
    Xcode,
}

/// The Kernel SDK: `KERNEL_SDK` (its root, or its `Headers` directory), else one fetched
/// with `--fetch-sdk` into `target/`, else Xcode's on macOS. Returns the headers directory
/// and where it came from; whether those headers suit the deployment target is
/// [`sdk_refusal`]'s to say.
fn kernel_headers(root: &Path) -> Option<(PathBuf, SdkSource)> {
    let from_root = |p: PathBuf| {
        if p.join("Headers").is_dir() {
            p.join("Headers")
        } else {
            p
        }
    };
    if let Ok(p) = std::env::var("KERNEL_SDK") {
        return Some((from_root(PathBuf::from(p)), SdkSource::Env));
    }
    if fetched_sdk(root).join("Headers").is_dir() {
        return Some((fetched_sdk(root).join("Headers"), SdkSource::Fetched));
    }
    if cfg!(target_os = "macos") {
        let h = xcode_sdk()?.join("System/Library/Frameworks/Kernel.framework/Headers");
        return h.is_dir().then_some((h, SdkSource::Xcode));
    }
    None
}

/// Whether the text of an `OSMetaClass.h` declares `OSMetaClassBase::Dispatch(const
/// IORPC)` outside any conditional on the deployment target (`__MAC_OS_X_VERSION_MIN_
/// REQUIRED`). xnu's own headers from macOS 10.15 on (xnu-6153; Xcode's Kernel.framework is
/// them) declare it unconditionally, in the vtable slot that was `_RESERVEDOSMetaClassBase3`;
/// MacKernelSDK declares it only `#if __MAC_OS_X_VERSION_MIN_REQUIRED >= __MAC_10_15` and
/// keeps the pad slot below that. Lines of a `#define` (the `_OS_ADD_METAMETHODS_dispatch`
/// macro, used only through the `...WithDispatch` macros) and comments are not
/// declarations and are skipped.
pub fn declares_unguarded_dispatch(header: &str) -> bool {
    // One entry per open conditional: whether its condition names the deployment target.
    let mut guards: Vec<bool> = Vec::new();
    let mut in_define = false;
    for line in header.lines() {
        let t = line.trim();
        let continued = t.ends_with('\\');
        if in_define {
            in_define = continued;
            continue;
        }
        if let Some(d) = t.strip_prefix('#') {
            let d = d.trim_start();
            let names_target = d.contains("MAC_OS_X_VERSION_MIN_REQUIRED");
            if d.starts_with("define") {
                in_define = continued;
            } else if d.starts_with("if") {
                guards.push(names_target);
            } else if d.starts_with("elif") {
                if let Some(top) = guards.last_mut() {
                    *top = names_target;
                }
            } else if d.starts_with("endif") {
                guards.pop();
            }
            continue;
        }
        if t.starts_with("//") || t.starts_with("/*") || t.starts_with('*') {
            continue;
        }
        if t.contains("Dispatch(const IORPC") && !guards.iter().any(|&g| g) {
            return true;
        }
    }
    false
}

/// Why the headers in `headers` cannot build kexts for deployment target `min` (`None` when
/// they can): below 10.15, an unconditional `OSMetaClassBase::Dispatch(const IORPC)`
/// ([`declares_unguarded_dispatch`]) puts `Dispatch` into every class's vtable, in the slot
/// that 10.13 and 10.14 kernels have as a pad (`_RESERVEDOSMetaClassBase3`): each shim class
/// then imports `IOService::Dispatch(IORPC)` (and the like), which the kernels of 10.13 and
/// 10.14 do not export, so the bundles would fail the check or not load there.
pub fn sdk_refusal(headers: &Path, min: (u16, u8, u8)) -> Option<String> {
    if min >= (10, 15, 0) {
        return None;
    }
    let text = std::fs::read_to_string(headers.join("libkern/c++/OSMetaClass.h")).ok()?;
    declares_unguarded_dispatch(&text).then(|| {
        format!(
            "libkern/c++/OSMetaClass.h there declares OSMetaClassBase::Dispatch(const IORPC) \
             for every deployment target (as xnu's headers from macOS 10.15 on do, Xcode's \
             Kernel.framework among them); the kexts are built for macOS {}.{}, whose kernel \
             has a reserved slot there and no Dispatch, so every C++ class of the shims would \
             import Dispatch and the bundles would not load on 10.13 or 10.14. Use a Kernel \
             SDK that declares it only for 10.15 and later: `cargo xtask kexts --fetch-sdk` \
             (clones {SDK_REPOSITORY} into target/), or KERNEL_SDK=<a clone of it>",
            min.0, min.1
        )
    })
}

/// The headers to compile the shims with, from what [`kernel_headers`] found, for
/// deployment target `min`: headers [`sdk_refusal`] refuses are not used when they were
/// found by themselves (Xcode's: the second value says why, for each kext's line), and
/// refuse the build when they were asked for (`KERNEL_SDK`, or a clone in `target/`).
fn usable_headers(
    found: Option<(PathBuf, SdkSource)>,
    min: (u16, u8, u8),
) -> Result<(Option<PathBuf>, Option<String>), String> {
    let Some((h, source)) = found else {
        return Ok((None, None));
    };
    match (sdk_refusal(&h, min), source) {
        (None, _) => Ok((Some(h), None)),
        (Some(why), SdkSource::Xcode) => Ok((
            None,
            Some(format!(
                "Xcode's Kernel.framework headers ({}) are not used: {why}",
                h.display()
            )),
        )),
        (Some(why), SdkSource::Env) => Err(format!("KERNEL_SDK={}: {why}", h.display())),
        (Some(why), SdkSource::Fetched) => Err(format!("the Kernel SDK in {}: {why}", h.display())),
    }
}

fn xcode_sdk() -> Option<PathBuf> {
    let out = Command::new("xcrun")
        .args(["--sdk", "macosx", "--show-sdk-path"])
        .output()
        .ok()?;
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `libkmod.a` (the kext's `_start`/`_stop`): next to the SDK's headers
/// (`Library/x86_64/libkmod.a` in the public SDK), or in Xcode's SDK.
fn libkmod(headers: &Path) -> Option<PathBuf> {
    let mut candidates = vec![headers.join("../Library/x86_64/libkmod.a")];
    if cfg!(target_os = "macos")
        && let Some(sdk) = xcode_sdk()
    {
        candidates.push(sdk.join("usr/lib/libkmod.a"));
    }
    candidates.into_iter().find(|p| p.is_file())
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
            "-q",
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

/// The kext's `kmod_info` (what Xcode generates as `<name>_info.c`), self-contained: the
/// `kmod_info_t` layout of `<mach/kmod.h>` is spelled out, so no SDK header is needed.
/// `standalone` adds `_start`/`_stop` as `libkmod.a` defines them, for the Rust half linked
/// on its own (a full bundle takes them from the SDK's `libkmod.a`).
pub fn kmod_info_source(k: &KextSpec) -> String {
    format!(
        r#"/* Generated by `cargo xtask kexts`; do not edit. */
typedef int kern_return_t;
typedef struct kmod_info kmod_info_t;
typedef kern_return_t kmod_start_func_t(kmod_info_t *ki, void *data);
typedef kern_return_t kmod_stop_func_t(kmod_info_t *ki, void *data);
#pragma pack(push, 4) /* as <mach/kmod.h> */
struct kmod_info {{
    struct kmod_info *next;
    int info_version;             /* KMOD_INFO_VERSION */
    unsigned int id;
    char name[64];                /* KMOD_MAX_NAME */
    char version[64];
    int reference_count;
    void *reference_list;
    unsigned long address;        /* filled in by the kernel linker */
    unsigned long size;
    unsigned long hdr_size;
    kmod_start_func_t *start;
    kmod_stop_func_t *stop;
}};
#pragma pack(pop)
kern_return_t _start(kmod_info_t *ki, void *data);
kern_return_t _stop(kmod_info_t *ki, void *data);
/* KMOD_EXPLICIT_DECL({id}, "{version}", _start, _stop) */
__attribute__((visibility("default"))) kmod_info_t kmod_info = {{
    0, 1, -1U, "{id}", "{version}", -1, 0, 0, 0, 0, _start, _stop
}};
__private_extern__ kmod_start_func_t *_realmain = 0;
__private_extern__ kmod_stop_func_t *_antimain = 0;
__private_extern__ int _kext_apple_cc = __APPLE_CC__;
#ifdef VIRTIO_KMOD_STANDALONE
/* libkmod.a's entry points (xnu libkern/kmod/c_start.c, c_stop.c). */
__private_extern__ kern_return_t _start(kmod_info_t *ki, void *data) {{
    return _realmain ? (*_realmain)(ki, data) : 0;
}}
__private_extern__ kern_return_t _stop(kmod_info_t *ki, void *data) {{
    return _antimain ? (*_antimain)(ki, data) : 0;
}}
#endif
"#,
        id = k.bundle_id(),
        version = VERSION,
    )
}

/// Flags for C and C++ kernel code. `-fno-register-global-dtors-with-atexit` (with
/// `-fno-use-cxa-atexit`): global destructors go to `__mod_term_func`, which the kernel
/// runs at unload; otherwise clang calls `___cxa_atexit`, which the kernel does not export.
fn clang_args(headers: Option<&Path>, includes: &[PathBuf], cxx: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "-target",
        "x86_64-apple-macos10.13",
        "-mkernel",
        "-nostdinc",
        "-fno-builtin",
        "-fno-exceptions",
        "-fno-common",
        "-DKERNEL",
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
        for f in [
            "-fapple-kext",
            "-fno-rtti",
            "-fno-use-cxa-atexit",
            "-fno-register-global-dtors-with-atexit",
            "-std=gnu++17",
            "-nostdinc++",
        ] {
            a.push(f.into());
        }
    }
    if let Some(h) = headers {
        a.push(format!("-I{}", h.display()));
    }
    for i in includes {
        a.push(format!("-I{}", i.display()));
    }
    a
}

fn clang_c() -> String {
    std::env::var("CLANG").unwrap_or_else(|_| "clang".into())
}

fn clang_cxx() -> String {
    std::env::var("CLANGXX").unwrap_or_else(|_| "clang++".into())
}

/// Compiles `k`'s kmod_info into `dir`.
fn compile_kmod_info(k: &KextSpec, dir: &Path, standalone: bool) -> Result<PathBuf, String> {
    let src = dir.join(format!("{}_info.c", k.name));
    std::fs::write(&src, kmod_info_source(k)).map_err(|e| e.to_string())?;
    let obj = dir.join(if standalone {
        format!("{}_info_standalone.o", k.name)
    } else {
        format!("{}_info.o", k.name)
    });
    let mut c = Command::new(clang_c());
    c.args(clang_args(None, &[], false));
    if standalone {
        c.arg("-DVIRTIO_KMOD_STANDALONE");
    }
    run(c.args(["-c", "-x", "c"]).arg(&src).arg("-o").arg(&obj)).map_err(|e| {
        format!(
            "{e} (compiling {}: install clang: apt-get install clang)",
            src.display()
        )
    })?;
    Ok(obj)
}

/// Links `inputs` into a bundle of `k` with the project's kext linker.
fn link_with_kextld(
    k: &KextSpec,
    inputs: &[PathBuf],
    roots: Vec<String>,
) -> Result<kextld::link::Linked, String> {
    let inputs = inputs
        .iter()
        .map(|p| {
            Ok(kextld::link::Input {
                name: p.display().to_string(),
                data: std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let options = kextld::link::Options {
        exports: k.exports.iter().map(|s| s.to_string()).collect(),
        roots,
        min_macos: macos_min(),
        uuid: None,
    };
    kextld::link::link(&inputs, &options).map_err(|e| format!("{}: kextld: {e}", k.name))
}

fn macos_min() -> (u16, u8, u8) {
    let mut parts = MACOS_MIN.split('.').map(|p| p.parse::<u16>().unwrap_or(0));
    let major = parts.next().unwrap_or(10);
    let minor = parts.next().unwrap_or(0);
    (major, minor.min(255) as u8, 0)
}

/// Where `cargo xtask kexts` leaves each Rust half linked on its own (loaded by the tests).
pub fn rust_half_path(root: &Path, k: &KextSpec) -> PathBuf {
    root.join("target/kexts/rust-half").join(k.name)
}

/// What became of one kext.
enum Outcome {
    Installable(PathBuf),
    /// Something the machine lacks (an SDK): not an error of the build.
    NotInstallable(String),
    /// Built but refused by the check: the command fails.
    Rejected(String),
}

/// `cargo xtask kexts [--check] [--fetch-sdk]`. `--check`: fail on stale generated files
/// instead of rewriting them. `--fetch-sdk`: clone the public Kernel SDK into `target/`.
pub fn cmd_kexts(args: &[String]) -> Result<bool, String> {
    let mut check_only = false;
    for a in args {
        match a.as_str() {
            "--check" => check_only = true,
            "--fetch-sdk" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask kexts [--check] [--fetch-sdk]\n\n\
                     Builds target/kexts/<Name>.kext for every kext: Info.plist, the Rust half \
                     (cross-built, linked by kextld and checked against the kernel linker's \
                     rules), and with a Kernel SDK the C++ shim and the installable executable.\n\
                     \x20 --check      fail when a checked-in generated file is stale\n\
                     \x20 --fetch-sdk  clone the public Kernel SDK ({SDK_REPOSITORY}) into target/\n\n\
                     Environment: KERNEL_SDK (SDK root or Headers), KEXT_LD (Apple's ld64 instead of \
                     kextld), CLANG / CLANGXX."
                );
                return Ok(true);
            }
            other => return Err(format!("kexts: unknown option {other} (try --help)")),
        }
    }
    let root = workspace_root()?;
    if args.iter().any(|a| a == "--fetch-sdk") {
        let dest = fetched_sdk(&root);
        if dest.join("Headers").is_dir() {
            println!("Kernel SDK already in {}", dest.display());
        } else {
            println!("cloning {SDK_REPOSITORY} into {}...", dest.display());
            run(Command::new("git")
                .args(["clone", "--depth", "1", SDK_REPOSITORY])
                .arg(&dest))?;
        }
    }
    let out_dir = root.join("target/kexts");
    std::fs::create_dir_all(out_dir.join("rust-half")).map_err(|e| e.to_string())?;

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

    let (headers, no_sdk) = usable_headers(kernel_headers(&root), macos_min())?;
    if let (None, Some(why)) = (&headers, &no_sdk) {
        println!("Kernel SDK: {why}");
    }
    let kext_ld = std::env::var("KEXT_LD").ok().map(PathBuf::from);
    let mut outcomes: Vec<(&KextSpec, Outcome)> = Vec::new();
    // The family's exports, once linked: what device kexts may import from it.
    let mut family_rust_exports: Vec<String> = Vec::new();
    let mut family_full_exports: Vec<String> = Vec::new();

    for k in present(&root) {
        println!("\n== {}.kext ==", k.name);
        let kext_dir = out_dir.join(format!("{}.kext", k.name));
        // Assembled from scratch: a stale executable from an earlier build must not pass for
        // this one's, nor a `_CodeSignature` (an ad-hoc signature of it) stay behind.
        match std::fs::remove_dir_all(&kext_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", kext_dir.display())),
        }
        let bundle = kext_dir.join("Contents");
        let exe = bundle.join("MacOS").join(k.name);
        std::fs::create_dir_all(bundle.join("MacOS")).map_err(|e| e.to_string())?;
        let plist = info_plist(k);
        validate_plist(k, &plist)?;
        std::fs::write(bundle.join("Info.plist"), &plist).map_err(|e| e.to_string())?;
        println!("  Info.plist: written; parses as a property list and follows the rules");

        let lib = build_staticlib(&root, k)?;
        let lib_bytes = std::fs::read(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        let header = std::fs::read_to_string(root.join(k.header)).map_err(|e| e.to_string())?;
        check_library(k, &lib_bytes, &header)?;
        let lib_out = out_dir.join(format!("{}-x86_64.a", k.name));
        std::fs::copy(&lib, &lib_out).map_err(|e| e.to_string())?;
        println!(
            "  Rust: {} ({} KiB, x86_64 kernel codegen); exported C functions == {}",
            rel(&root, &lib_out),
            lib_bytes.len() / 1024,
            k.header
        );

        // The Rust half alone: every function of the header as a root, plus kmod_info.
        let obj_dir = out_dir.join("obj").join(k.name);
        std::fs::create_dir_all(&obj_dir).map_err(|e| e.to_string())?;
        let info_standalone = compile_kmod_info(k, &obj_dir, true)?;
        let mut roots: Vec<String> = declared_functions(&header, k.symbol_prefix)
            .into_iter()
            .map(|f| format!("_{f}"))
            .collect();
        roots.push("_kmod_info".into());
        let linked = link_with_kextld(k, &[lib.clone(), info_standalone], roots)?;
        check_bundle(k, &linked.bytes, &family_rust_exports)?;
        let half = rust_half_path(&root, k);
        std::fs::write(&half, &linked.bytes).map_err(|e| e.to_string())?;
        let from_family = linked
            .imports
            .iter()
            .filter(|i| i.starts_with("_vfam_"))
            .count();
        println!(
            "  Rust half: {} linked by kextld (MH_KEXT_BUNDLE, {} KiB; exports {}; imports {} kernel symbols{}); passes the kernel linker's rules",
            rel(&root, &half),
            linked.bytes.len() / 1024,
            if linked.exports.is_empty() {
                "nothing".to_string()
            } else {
                format!("{} symbols", linked.exports.len())
            },
            linked.imports.len() - from_family,
            if from_family > 0 {
                format!(" and {from_family} family functions")
            } else {
                String::new()
            }
        );
        if k.is_library {
            family_rust_exports = linked.exports.clone();
        }

        let Some(h) = &headers else {
            println!("  shim: not compiled (no Kernel SDK headers)");
            let why = no_sdk.clone().unwrap_or_else(|| {
                format!(
                    "no Kernel SDK to compile its C++ shim: set KERNEL_SDK=<path> to a Kernel \
                     SDK (git clone {SDK_REPOSITORY}), or run `cargo xtask kexts --fetch-sdk`"
                )
            });
            outcomes.push((k, Outcome::NotInstallable(why)));
            continue;
        };
        let includes = vec![
            root.join("kexts/include"),
            root.join(k.dir).join("shim"),
            root.join("kexts/VirtioFamily/shim"),
        ];
        let mut objs = Vec::new();
        for src in k.shim_sources {
            let s = root.join(k.dir).join("shim").join(src);
            let o = obj_dir.join(src.replace(".cpp", ".o"));
            run(Command::new(clang_cxx())
                .args(clang_args(Some(h), &includes, true))
                .arg("-c")
                .arg(&s)
                .arg("-o")
                .arg(&o))?;
            println!(
                "  shim: compiled {src} (-fapple-kext -mkernel, headers {})",
                h.display()
            );
            objs.push(o);
        }
        objs.push(compile_kmod_info(k, &obj_dir, false)?);
        objs.push(lib.clone());
        let Some(kmod) = libkmod(h) else {
            outcomes.push((
                k,
                Outcome::NotInstallable(format!(
                    "the Kernel SDK at {} has no Library/x86_64/libkmod.a",
                    h.display()
                )),
            ));
            continue;
        };
        objs.push(kmod);
        if let Some(ld) = &kext_ld {
            let list = obj_dir.join("exports.txt");
            std::fs::write(&list, k.exports.join("\n")).map_err(|e| e.to_string())?;
            run(Command::new(ld)
                .args(["-kext", "-arch", "x86_64", "-macosx_version_min", MACOS_MIN])
                .arg("-exported_symbols_list")
                .arg(&list)
                .arg("-o")
                .arg(&exe)
                .args(&objs))?;
            println!("  link: {} ({})", rel(&root, &exe), ld.display());
        } else {
            let linked = link_with_kextld(k, &objs, vec!["_kmod_info".into()])?;
            std::fs::write(&exe, &linked.bytes).map_err(|e| e.to_string())?;
            println!(
                "  link: {} by kextld ({} KiB, {} imports)",
                rel(&root, &exe),
                linked.bytes.len() / 1024,
                linked.imports.len()
            );
        }
        let bytes = std::fs::read(&exe).map_err(|e| e.to_string())?;
        if k.is_library {
            family_full_exports = kextld::image::Image::parse(&bytes)
                .map(|image| {
                    image
                        .symbols
                        .iter()
                        .filter(|s| s.is_section_defined() && s.is_external())
                        .map(|s| s.name.clone())
                        .collect()
                })
                .unwrap_or_default();
        }
        let checked = check_bundle(k, &bytes, &family_full_exports)
            .and_then(|()| check_libraries_used(k, &bytes, &family_full_exports));
        match checked {
            Ok(()) => {
                println!("  check: passes the kernel linker's rules");
                outcomes.push((
                    k,
                    Outcome::Installable(out_dir.join(format!("{}.kext", k.name))),
                ));
            }
            Err(e) => {
                // Not left where `install` would take it.
                let _ = std::fs::rename(&exe, obj_dir.join(format!("{}.rejected", k.name)));
                println!("  check: REJECTED\n{e}");
                outcomes.push((
                    k,
                    Outcome::Rejected(format!(
                        "the linked executable breaks the kernel linker's rules (listed above; kept as {})",
                        rel(&root, &obj_dir.join(format!("{}.rejected", k.name)))
                    )),
                ));
            }
        }
    }

    println!();
    for (k, outcome) in &outcomes {
        match outcome {
            Outcome::Installable(p) => {
                println!(
                    "{}.kext: installable bundle produced: {}",
                    k.name,
                    rel(&root, p)
                )
            }
            Outcome::NotInstallable(why) | Outcome::Rejected(why) => {
                println!("{}.kext: not installable: {why}", k.name)
            }
        }
    }
    Ok(!outcomes
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Rejected(_))))
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_generated_files_are_fresh() {
        let root = workspace_root().unwrap();
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

    /// The kernel's plist parser (OSUnserializeXML) takes `&` only as `&amp;`: the ID
    /// masks must be escaped, and a plist with a bare `&` must not pass.
    #[test]
    fn plists_escape_ampersands_and_a_bare_one_fails() {
        let family = &KEXTS[0];
        let xml = info_plist(family);
        assert!(virtio_pci::IOPCI_PRIMARY_MATCH_ALL.contains('&'));
        assert!(xml.contains("0x10001af4&amp;0xffc0ffff"));
        assert!(!xml.contains("&0x"), "a bare & in {xml}");
        // IOPCIFamily chooses MSI-X itself and never reads a personality key for it.
        assert!(!xml.contains("IOPCIMSIMode"));
        assert!(xml.contains(&format!("<key>{DRIVER_TYPES_KEY}</key>")));
        validate_plist(family, &xml).unwrap();
        let bare = xml.replace("&amp;", "&");
        let e = validate_plist(family, &bare).unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
        // The checked-in copies are what the kernel reads: parse them too.
        let root = workspace_root().unwrap();
        for k in present(&root) {
            let text = std::fs::read_to_string(root.join(k.dir).join("Info.plist")).unwrap();
            validate_plist(k, &text).unwrap();
        }
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
        let root = workspace_root().unwrap();
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

    /// A declared library nothing is imported from is refused: the Rust half of VirtioNet
    /// alone imports nothing from com.apple.kpi.bsd (its shim does).
    #[test]
    fn unused_library_is_refused() {
        let root = workspace_root().unwrap();
        let net = KEXTS.iter().find(|k| k.name == "VirtioNet").unwrap();
        let Ok(bytes) = std::fs::read(rust_half_path(&root, net)) else {
            eprintln!("VirtioNet's Rust half not linked (run `cargo xtask kexts`); skipped");
            return;
        };
        let e = check_libraries_used(net, &bytes, &["_vfam_reset".to_string()]).unwrap_err();
        assert!(e.contains("com.apple.kpi.bsd"), "{e}");
        let mut all_used = *net;
        all_used.libraries = &[("com.apple.kpi.iokit", KPI_VERSION), (FAMILY_ID, VERSION)];
        check_libraries_used(&all_used, &bytes, &["_vfam_reset".to_string()]).unwrap();
    }

    /// `OSMetaClass.h` shaped like xnu's from macOS 10.15 on (Xcode's Kernel.framework):
    /// `Dispatch` declared for every deployment target, plus the macro that declares it
    /// again (a `#define`, not a declaration).
    const XNU_OSMETACLASS: &str = "\
#ifndef _LIBKERN_OSMETACLASS_H
#define _LIBKERN_OSMETACLASS_H
class OSMetaClassBase
{
public:
\t// WAS:  virtual void _RESERVEDOSMetaClassBase2();
\tvirtual void taggedRelease(const void * tag, const int freeWhen) const = 0;

public:
\tvirtual kern_return_t
\tDispatch(const IORPC rpc);

private:
#if APPLE_KEXT_VTABLE_PADDING
#if defined(__arm64__) || defined(__arm__)
\tvirtual void _RESERVEDOSMetaClassBase3();
#endif
\tvirtual void _RESERVEDOSMetaClassBase4();
#endif
};
#define _OS_ADD_METAMETHODS_dispatch                            \\
    virtual kern_return_t Dispatch(const IORPC rpc) APPLE_KEXT_OVERRIDE;
#endif
";

    /// The same shaped like MacKernelSDK's: `Dispatch` only for a 10.15+ target, the pad
    /// slot below it.
    const SDK_OSMETACLASS: &str = "\
#ifndef _LIBKERN_OSMETACLASS_H
#define _LIBKERN_OSMETACLASS_H
class OSMetaClassBase
{
public:
#if __MAC_OS_X_VERSION_MIN_REQUIRED >= __MAC_10_15
\tvirtual kern_return_t
\tDispatch(const IORPC rpc);

\tkern_return_t
\tInvoke(const IORPC rpc);
#endif

private:
#if APPLE_KEXT_VTABLE_PADDING
#if __MAC_OS_X_VERSION_MIN_REQUIRED < __MAC_10_15
\tvirtual void _RESERVEDOSMetaClassBase3();
#endif
\tvirtual void _RESERVEDOSMetaClassBase4();
#endif
};
#define _OS_ADD_METAMETHODS_dispatch                            \\
    virtual kern_return_t Dispatch(const IORPC rpc) APPLE_KEXT_OVERRIDE;
#endif
";

    /// Headers that would put `Dispatch` into the vtables of a 10.13 build are refused,
    /// saying why and how to get a Kernel SDK that guards it; guarded ones are taken.
    #[test]
    fn headers_declaring_dispatch_for_every_target_are_refused_below_10_15() {
        assert!(declares_unguarded_dispatch(XNU_OSMETACLASS));
        assert!(!declares_unguarded_dispatch(SDK_OSMETACLASS));
        // xnu before 10.15 (no Dispatch at all), a comment, the macro alone, an #elif/#else
        // branch of a deployment-target guard.
        for guarded in [
            "class OSMetaClassBase {\n\tvirtual void _RESERVEDOSMetaClassBase3();\n};\n",
            "// Dispatch(const IORPC rpc) arrived in 10.15\n",
            " * Dispatch(const IORPC rpc): see IORPC.h\n",
            "#define X \\\n  virtual kern_return_t Dispatch(const IORPC rpc); \\\n  int y;\n",
            "#if 0\n#elif __MAC_OS_X_VERSION_MIN_REQUIRED >= 101500\nDispatch(const IORPC rpc);\n#endif\n",
            "#if __MAC_OS_X_VERSION_MIN_REQUIRED < __MAC_10_15\n#else\nDispatch(const IORPC rpc);\n#endif\n",
        ] {
            assert!(!declares_unguarded_dispatch(guarded), "{guarded}");
        }
        // A guard on something else, and a guard closed before the declaration, do not
        // guard it.
        assert!(declares_unguarded_dispatch(
            "#if APPLE_KEXT_VTABLE_PADDING\nDispatch(const IORPC rpc);\n#endif\n"
        ));
        assert!(declares_unguarded_dispatch(
            "#if __MAC_OS_X_VERSION_MIN_REQUIRED >= __MAC_10_15\n#endif\n\
             virtual kern_return_t Dispatch(const IORPC rpc);\n"
        ));

        let tmp = std::env::temp_dir().join(format!("virtio-kexts-sdk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let tree = |name: &str, text: Option<&str>| {
            let h = tmp.join(name).join("Headers");
            std::fs::create_dir_all(h.join("libkern/c++")).unwrap();
            if let Some(t) = text {
                std::fs::write(h.join("libkern/c++/OSMetaClass.h"), t).unwrap();
            }
            h
        };
        let (xcode, sdk, empty) = (
            tree("xcode", Some(XNU_OSMETACLASS)),
            tree("sdk", Some(SDK_OSMETACLASS)),
            tree("empty", None),
        );
        let why = sdk_refusal(&xcode, macos_min()).expect("xnu's headers refused for 10.13");
        for part in [
            "Dispatch(const IORPC)",
            "macOS 10.13",
            "10.14",
            "--fetch-sdk",
            SDK_REPOSITORY,
            "KERNEL_SDK=",
        ] {
            assert!(why.contains(part), "{part}: {why}");
        }
        assert_eq!(sdk_refusal(&sdk, macos_min()), None);
        assert_eq!(
            sdk_refusal(&xcode, (10, 15, 0)),
            None,
            "fine for a 10.15 target"
        );
        assert_eq!(
            sdk_refusal(&empty, macos_min()),
            None,
            "left to the compiler"
        );

        // Xcode's, found by themselves: not used, and said; asked for: the build is refused,
        // naming how they were given.
        let (h, why) =
            usable_headers(Some((xcode.clone(), SdkSource::Xcode)), macos_min()).unwrap();
        let why = why.unwrap();
        assert!(
            h.is_none() && why.starts_with("Xcode's Kernel.framework headers ("),
            "{why}"
        );
        let e = usable_headers(Some((xcode.clone(), SdkSource::Env)), macos_min()).unwrap_err();
        assert!(
            e.starts_with("KERNEL_SDK=") && e.contains("Dispatch"),
            "{e}"
        );
        let e = usable_headers(Some((xcode.clone(), SdkSource::Fetched)), macos_min()).unwrap_err();
        assert!(e.starts_with("the Kernel SDK in "), "{e}");
        for source in [SdkSource::Env, SdkSource::Fetched, SdkSource::Xcode] {
            assert_eq!(
                usable_headers(Some((sdk.clone(), source)), macos_min()),
                Ok((Some(sdk.clone()), None))
            );
        }
        assert_eq!(usable_headers(None, macos_min()), Ok((None, None)));
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// The declared KPI versions are the kernel version of the deployment target.
    #[test]
    fn kpi_versions_match_the_deployment_target() {
        let (major, minor) = MACOS_MIN.split_once('.').unwrap();
        assert_eq!(
            major, "10",
            "macOS 11+ maps to Darwin 20+: revisit KPI_VERSION"
        );
        let darwin: u32 = minor.parse::<u32>().unwrap() + 4;
        assert_eq!(KPI_VERSION, format!("{darwin}.0.0"));
        for k in KEXTS {
            for (lib, version) in k.libraries {
                if lib.starts_with("com.apple.kpi.") {
                    assert_eq!(*version, KPI_VERSION, "{}: {lib}", k.name);
                }
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
        let root = workspace_root().unwrap();
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
