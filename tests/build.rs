//! Generates the QEMU harness's device registry: one `pub mod <name>;` per
//! `src/qemu/devices/<name>.rs` and `DEVICES`, their `DEVICE` entries in name order
//! (included by `src/qemu/devices.rs`).

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let dir = manifest.join("src/qemu/devices");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".rs")?;
            stem.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                .then(|| stem.to_string())
        })
        .collect();
    names.sort();
    let mut s = String::new();
    for n in &names {
        let path = dir.join(format!("{n}.rs"));
        writeln!(
            s,
            "#[path = {:?}]\npub mod {n};",
            path.display().to_string()
        )
        .unwrap();
    }
    s.push_str("/// Every registered device type (one file each under `devices/`).\n");
    s.push_str("pub const DEVICES: &[&DeviceSpec] = &[\n");
    for n in &names {
        writeln!(s, "    &{n}::DEVICE,").unwrap();
    }
    s.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("devices.rs"), s).unwrap();
}
