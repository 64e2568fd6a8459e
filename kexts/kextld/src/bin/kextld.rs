//! `kextld`: the kext linker on the command line (what `cargo xtask kexts` calls as a
//! library), for linking and inspecting a kext by hand.
//!
//! ```text
//! kextld -o <bundle> [--export <glob>]... [--root <symbol>]... [--macos 10.13] <object|archive>...
//! ```

use std::process::ExitCode;

use kextld::link::{Input, Options, link};

const USAGE: &str = "usage: kextld -o <output> [--export <glob>]... [--root <symbol>]... [--macos <major.minor>] <object or archive>...";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kextld: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let mut output = None;
    let mut options = Options {
        exports: Vec::new(),
        roots: Vec::new(),
        min_macos: (10, 13, 0),
        uuid: None,
    };
    let mut inputs = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "-o" => output = Some(value("-o")?),
            "--export" => options.exports.push(value("--export")?),
            "--root" => options.roots.push(value("--root")?),
            "--macos" => {
                let v = value("--macos")?;
                let mut parts = v.split('.').map(|p| p.parse::<u16>());
                match (parts.next(), parts.next()) {
                    (Some(Ok(major)), Some(Ok(minor))) if minor < 256 => {
                        options.min_macos = (major, minor as u8, 0);
                    }
                    _ => {
                        return Err(format!(
                            "--macos: expected major.minor (like 10.13), got '{v}'"
                        ));
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}\n{USAGE}")),
            path => {
                let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
                inputs.push(Input {
                    name: path.to_string(),
                    data,
                });
            }
        }
    }
    let Some(output) = output else {
        return Err(format!("-o <output> is required\n{USAGE}"));
    };
    if inputs.is_empty() {
        return Err(format!("no input files\n{USAGE}"));
    }
    let linked = link(&inputs, &options).map_err(|e| e.to_string())?;
    std::fs::write(&output, &linked.bytes).map_err(|e| format!("{output}: {e}"))?;
    println!(
        "kextld: wrote {output} ({} bytes, {} exports, {} imports)",
        linked.bytes.len(),
        linked.exports.len(),
        linked.imports.len()
    );
    Ok(())
}
