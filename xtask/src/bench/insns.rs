//! Guest instruction counts for the QEMU benchmarks, from the project's TCG plugin
//! (`tests/insn-plugin`): builds it, finds the bench guest's marker function, adds the
//! `-plugin` argument to a run, and turns what the plugin wrote into per-phase counts.
//!
//! The plugin records its counters each time the guest enters `bench_phase_marker`; it
//! cannot see which marker value the guest passed (QEMU 7.2 plugins cannot read guest
//! registers), so the `n`-th entry is paired with the `n`-th marker in QEMU's
//! `fw_cfg_select` trace, which shows the values. The two sequences must have the same
//! length, or the counts are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use virtio_tests::qemu::{self, GuestProfile, RunConfig};

/// The guest's marker function (`tests/guest/src/phase_marker.rs`).
const MARKER_SYMBOL: &str = "bench_phase_marker";
/// The plugin's cargo package and the file cargo builds.
const PLUGIN_PACKAGE: &str = "virtio-insn-plugin";
const PLUGIN_FILE: &str = "libvirtio_insn_plugin.so";

/// Guest instructions and `hlt`s executed up to some point of a run.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub instructions: u64,
    pub halts: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, earlier: Counters) -> Counters {
        Counters {
            instructions: self.instructions.saturating_sub(earlier.instructions),
            halts: self.halts.saturating_sub(earlier.halts),
        }
    }
}

/// What the benchmark sessions share: the release guest, its marker address, the plugin.
pub struct Counting {
    pub plugin: PathBuf,
    pub marker: u64,
    /// Where the plugin's output files go.
    dir: PathBuf,
    /// The bench guest's ELF file (for the profile's symbols).
    elf: PathBuf,
    /// Whether runs also write a per-block profile ([`Counting::profile_path`]).
    pub profile: bool,
}

impl Counting {
    /// Builds the guest at the shipping optimisation level and the plugin, and looks up the
    /// marker function.
    pub fn prepare() -> Result<Counting, String> {
        let toolchain = qemu::ensure_toolchain(true)?;
        let elf = qemu::build_guest_profile(&toolchain, GuestProfile::Release)?;
        let marker = symbol_address(&elf, MARKER_SYMBOL)?;
        let plugin = build_plugin()?;
        let dir = super::output_dir()?;
        Ok(Counting {
            plugin,
            marker,
            dir,
            elf,
            profile: false,
        })
    }

    /// Where run `run`'s profile goes when [`Counting::profile`] is set.
    pub fn profile_path(&self, run: &str) -> PathBuf {
        self.dir.join(format!("profile-{run}.txt"))
    }

    /// Sets `cfg` up for counting: the release guest, the plugin writing to a file of its
    /// own (returned), and the trace of the markers.
    pub fn instrument(&self, cfg: &mut RunConfig, run: &str) -> PathBuf {
        let out = self.dir.join(format!("insns-{run}.txt"));
        let _ = std::fs::remove_file(&out);
        let profile = if self.profile {
            let path = self.profile_path(run);
            let _ = std::fs::remove_file(&path);
            format!(",profile={}", path.display())
        } else {
            String::new()
        };
        cfg.guest_profile = GuestProfile::Release;
        cfg.extra_qemu_args.extend([
            "-plugin".to_string(),
            format!(
                "{},marker={:#x},out={}{profile}",
                self.plugin.display(),
                self.marker,
                out.display()
            ),
            "-trace".to_string(),
            "fw_cfg_select".to_string(),
        ]);
        cfg.keep_run_dir = true;
        out
    }
}

/// `cargo build --release -p virtio-insn-plugin`: quick when up to date.
fn build_plugin() -> Result<PathBuf, String> {
    let status = crate::cargo()
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--quiet", "-p", PLUGIN_PACKAGE])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo to build the plugin: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the instruction-counting plugin failed (cargo build --release -p {PLUGIN_PACKAGE})"
        ));
    }
    let path = qemu::target_dir().join("release").join(PLUGIN_FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("the plugin build produced no {}", path.display()))
    }
}

/// The address of `name` in the ELF file `elf`'s symbol table.
fn symbol_address(elf: &Path, name: &str) -> Result<u64, String> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(elf).map_err(|e| format!("{}: {e}", elf.display()))?;
    let file = object::File::parse(&*data).map_err(|e| format!("{}: {e}", elf.display()))?;
    file.symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.address())
        .ok_or_else(|| format!("{}: no symbol {name}", elf.display()))
}

/// The plugin's output: the counters at each marker entry, and at exit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginCounts {
    pub at_markers: Vec<Counters>,
    pub at_exit: Counters,
}

/// Parses the plugin's file (see `tests/insn-plugin/src/lib.rs`).
pub fn parse_plugin_output(text: &str) -> Result<PluginCounts, String> {
    let mut counts = PluginCounts::default();
    let mut saw_exit = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let value = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("plugin output line without {key}: {line:?}"))
        };
        let counters = Counters {
            instructions: value("insns")?,
            halts: value("halts")?,
        };
        match words.first() {
            Some(&"marker") => counts.at_markers.push(counters),
            Some(&"exit") => {
                counts.at_exit = counters;
                saw_exit = true;
            }
            _ => return Err(format!("unexpected plugin output line {line:?}")),
        }
    }
    if !saw_exit {
        return Err("the plugin wrote no exit line (QEMU did not exit normally?)".into());
    }
    Ok(counts)
}

/// Marker values (`key & 0xFF` of `fw_cfg_select` keys `0x3Fxx`) in trace order.
pub fn trace_markers(trace: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in trace.lines() {
        let body = match line.split_once(':') {
            Some((prefix, rest)) if prefix.contains('@') => rest,
            _ => line,
        };
        let words: Vec<&str> = body.split_whitespace().collect();
        if words.first() != Some(&"fw_cfg_select") {
            continue;
        }
        let key = words
            .iter()
            .position(|w| *w == "key")
            .and_then(|i| words.get(i + 1))
            .and_then(|v| match v.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            });
        if let Some(k) = key.filter(|k| k & 0xFF00 == 0x3F00) {
            out.push((k & 0xFF) as u8);
        }
    }
    out
}

/// The counters at each marker value (the last entry with that value), pairing the
/// plugin's entries with the trace's markers in order.
pub fn by_marker(counts: &PluginCounts, markers: &[u8]) -> Result<BTreeMap<u8, Counters>, String> {
    if counts.at_markers.len() != markers.len() {
        return Err(format!(
            "the plugin saw {} entries into {MARKER_SYMBOL} but QEMU traced {} markers",
            counts.at_markers.len(),
            markers.len()
        ));
    }
    Ok(markers
        .iter()
        .copied()
        .zip(counts.at_markers.iter().copied())
        .collect())
}

/// Reads one run's counts: the plugin's file and the markers in the run's trace.
pub fn read_run(plugin_out: &Path, run_dir: &Path) -> Result<BTreeMap<u8, Counters>, String> {
    let text = std::fs::read_to_string(plugin_out)
        .map_err(|e| format!("no plugin output {}: {e}", plugin_out.display()))?;
    let counts = parse_plugin_output(&text)?;
    let trace = std::fs::read_to_string(run_dir.join("trace.log")).unwrap_or_default();
    let _ = std::fs::remove_file(plugin_out);
    by_marker(&counts, &trace_markers(&trace))
}

/// The counters between markers `start` and `end`.
pub fn between(at: &BTreeMap<u8, Counters>, start: u8, end: u8) -> Option<Counters> {
    Some(*at.get(&end)? - *at.get(&start)?)
}

/// The guest's functions, for mapping profile addresses: (start, end, demangled name),
/// sorted by start.
pub struct Symbols(Vec<(u64, u64, String)>);

impl Symbols {
    pub fn of(counting: &Counting) -> Result<Symbols, String> {
        use object::{Object, ObjectSymbol, SymbolKind};
        let elf = &counting.elf;
        let data = std::fs::read(elf).map_err(|e| format!("{}: {e}", elf.display()))?;
        let file = object::File::parse(&*data).map_err(|e| format!("{}: {e}", elf.display()))?;
        let mut syms: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                let short = short_name(&format!("{:#}", rustc_demangle::demangle(name)));
                Some((s.address(), s.address() + s.size(), short))
            })
            .collect();
        syms.sort();
        Ok(Symbols(syms))
    }

    /// The function holding `addr`, or the address itself.
    pub fn name(&self, addr: u64) -> String {
        let i = self.0.partition_point(|(start, _, _)| *start <= addr);
        match i.checked_sub(1).map(|i| &self.0[i]) {
            Some((_, end, name)) if addr < *end => name.clone(),
            _ => format!("{addr:#x}"),
        }
    }
}

/// A demangled name without generic arguments and with each path cut to its last two
/// segments: `<virtio_blk::driver::BlkDriver<..>>::submit` → `<driver::BlkDriver>::submit`.
fn short_name(full: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    let mut prev_ident = false;
    for ch in full.chars() {
        match ch {
            // Generic arguments follow an identifier; a qualified path `<A as B>` does not.
            '<' if depth > 0 || prev_ident => depth += 1,
            '>' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(ch),
        }
        prev_ident = ch.is_alphanumeric() || ch == '_';
    }
    let mut short = String::new();
    let mut path = String::new();
    let flush = |path: &mut String, short: &mut String| {
        let parts: Vec<&str> = path.split("::").collect();
        let keep = if path.starts_with("::") {
            path.clone()
        } else {
            parts[parts.len().saturating_sub(2)..].join("::")
        };
        short.push_str(&keep);
        path.clear();
    };
    for ch in out.chars() {
        if ch.is_alphanumeric() || ch == '_' || ch == ':' {
            path.push(ch);
        } else {
            flush(&mut path, &mut short);
            short.push(ch);
        }
    }
    flush(&mut path, &mut short);
    short
}

/// A run's profile: per stretch (from the `n`-th marker entry to the next), instructions per
/// function, most first.
pub fn read_profile(path: &Path, symbols: &Symbols) -> Result<Vec<Vec<(String, u64)>>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("no profile {}: {e}", path.display()))?;
    let mut stretches: Vec<BTreeMap<String, u64>> = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let parsed = match w.as_slice() {
            ["block", n, addr, insns] => (|| {
                let n = n.parse::<usize>().ok()?;
                let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).ok()?;
                Some((n, addr, insns.parse::<u64>().ok()?))
            })(),
            _ => None,
        };
        let (n, addr, insns) = parsed.ok_or_else(|| format!("bad profile line {line:?}"))?;
        if stretches.len() <= n {
            stretches.resize_with(n + 1, BTreeMap::new);
        }
        *stretches[n].entry(symbols.name(addr)).or_default() += insns;
    }
    Ok(stretches
        .into_iter()
        .map(|m| {
            let mut v: Vec<(String, u64)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        })
        .collect())
}

/// `--profile`: prints, for each phase `(name, start marker value, units)` of one run, the
/// guest functions that executed the most instructions per unit (request or packet).
pub fn print_run_profile(
    counting: &Counting,
    run: &str,
    run_dir: &Path,
    title: &str,
    phases: &[(&str, u8, u64)],
) -> Result<(), String> {
    let symbols = Symbols::of(counting)?;
    let stretches = read_profile(&counting.profile_path(run), &symbols)?;
    let trace = std::fs::read_to_string(run_dir.join("trace.log")).unwrap_or_default();
    let markers = trace_markers(&trace);
    println!("\nprofile, {title}:");
    for &(name, start, units) in phases {
        // The stretch that begins at the phase's start marker ends at the next marker, the
        // phase's end.
        let Some(n) = markers.iter().rposition(|&m| m == start) else {
            continue;
        };
        if let Some(stretch) = stretches.get(n) {
            print_profile(name, stretch, units, 30);
        }
    }
    Ok(())
}

/// Prints the `top` functions of one stretch as instructions per request.
fn print_profile(title: &str, stretch: &[(String, u64)], requests: u64, top: usize) {
    let total: u64 = stretch.iter().map(|(_, n)| n).sum();
    let per = |n: u64| n as f64 / requests.max(1) as f64;
    println!(
        "  {title}: {:.0} instructions per unit over {requests} units (requests or packets); the top {top} functions:",
        per(total)
    );
    for (name, n) in stretch.iter().take(top) {
        println!(
            "    {:>9.1}  {:>5.1}%  {name}",
            per(*n),
            *n as f64 * 100.0 / total.max(1) as f64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_output_pairs_with_trace_markers() {
        let out = "marker 0 insns 100 halts 1\nmarker 1 insns 350 halts 4\n\
                   marker 2 insns 400 halts 4\nmarker 3 insns 1000 halts 9\n\
                   exit insns 2000 halts 10\n";
        let counts = parse_plugin_output(out).unwrap();
        assert_eq!(counts.at_markers.len(), 4);
        assert_eq!(counts.at_exit.instructions, 2000);
        let trace = "1@1.0:fw_cfg_select 0x5 key 0x19 'etc/e820', ret: 1\n\
                     1@1.1:fw_cfg_select 0x5 key 0x3f10 'unknown', ret: 0\n\
                     1@1.2:virtio_queue_notify vdev 0xa n 0 vq 0xb\n\
                     1@1.3:fw_cfg_select 0x5 key 16160 ret 0\n\
                     1@1.4:fw_cfg_select 0x5 key 0x3f11 'unknown', ret: 0\n\
                     1@1.5:fw_cfg_select 0x5 key 0x3f21 'unknown', ret: 0\n";
        let markers = trace_markers(trace);
        assert_eq!(markers, [0x10, 0x20, 0x11, 0x21]);
        let at = by_marker(&counts, &markers).unwrap();
        assert_eq!(
            between(&at, 0x10, 0x20),
            Some(Counters {
                instructions: 250,
                halts: 3
            })
        );
        assert_eq!(between(&at, 0x11, 0x21).unwrap().instructions, 600);
        assert!(between(&at, 0x12, 0x22).is_none());
        assert!(by_marker(&counts, &markers[..3]).is_err());
    }

    #[test]
    fn profile_names_are_short() {
        assert_eq!(
            short_name(
                "<virtio_blk::driver::BlkDriver<virtio_core::device::VirtioDevice<a::B>>>::submit"
            ),
            "<driver::BlkDriver>::submit"
        );
        assert_eq!(
            short_name("<virtio_core::device::VirtioDevice<x::Y> as virtio_core::bus::Bus>::add"),
            "<device::VirtioDevice as bus::Bus>::add"
        );
        assert_eq!(
            short_name("virtio_blk::driver::complete_part"),
            "driver::complete_part"
        );
    }

    #[test]
    fn plugin_output_needs_the_exit_line() {
        assert!(parse_plugin_output("marker 0 insns 1 halts 0\n").is_err());
        assert!(parse_plugin_output("marker 0 insns x halts 0\nexit insns 1 halts 0\n").is_err());
    }
}
