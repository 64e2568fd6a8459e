//! A QEMU TCG plugin (QEMU 7.2's plugin API, `QEMU_PLUGIN_VERSION` 1) that counts the
//! instructions the guest executes, and how many of them were `hlt`, and takes a snapshot
//! of both counts each time the guest enters its phase-marker function. `cargo xtask
//! bench` divides the counts between a phase's two markers by the requests (or packets)
//! the phase completed: guest CPU cost per I/O, the same on a loaded host as on an idle one.
//!
//! Loaded as `-plugin path/libvirtio_insn_plugin.so,marker=0x<addr>,out=<file>`:
//! - `marker`: the guest address of the first instruction of the marker function (the
//!   bench guest's `bench_phase_marker`, looked up in its ELF symbol table). Optional:
//!   without it only the totals are written.
//! - `out`: where the counts go when QEMU exits, one line each:
//!   `marker <n> insns <count> halts <count>` for the `n`-th entry (from 0) into the
//!   marker function, then `exit insns <count> halts <count>`.
//! - `profile`: optional; a second file where, at exit, the instructions executed between
//!   consecutive marker entries go per translation block:
//!   `block <n> <address in hex> <instructions>` for the stretch from the `n`-th entry to
//!   the next (the last stretch ends at exit). `cargo xtask bench blk --profile` maps the
//!   addresses to the guest's functions: where a phase's instructions go.
//!
//! How: on every translation the plugin attaches to each guest instruction an inline
//! "add 1" to the instruction counter (TCG code, no call), to each one-byte `hlt` (0xF4)
//! an inline add to the halt counter, and to the instruction at the marker address an
//! execution callback that records both counters. The counters are per machine, not per
//! vCPU: 7.2's inline operations add to one fixed address whichever vCPU runs the shared
//! translated code, and are not atomic, so the plugin refuses to load on more than one
//! vCPU (the QEMU runner boots the guest with `-smp 1`).
//!
//! The `qemu_plugin_*` functions are QEMU's own, exported by the QEMU binary that loads
//! this library; their declarations below follow QEMU 7.2's `include/qemu/qemu-plugin.h`.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The parts of QEMU 7.2's plugin API this plugin uses.
mod api {
    use std::ffi::{c_char, c_int, c_uint, c_void};

    /// `qemu_plugin_id_t`.
    pub type PluginId = u64;

    /// `struct qemu_plugin_tb`: a translation block, opaque.
    #[repr(C)]
    pub struct TranslationBlock {
        _opaque: [u8; 0],
    }

    /// `struct qemu_plugin_insn`: one translated instruction, opaque.
    #[repr(C)]
    pub struct Instruction {
        _opaque: [u8; 0],
    }

    /// `qemu_info_t`: what QEMU tells the plugin about the machine at install time.
    #[repr(C)]
    pub struct Info {
        pub target_name: *const c_char,
        pub version_min: c_int,
        pub version_cur: c_int,
        pub system_emulation: bool,
        /// `system.smp_vcpus` (valid with `system_emulation`).
        pub smp_vcpus: c_int,
        /// `system.max_vcpus`.
        pub max_vcpus: c_int,
    }

    /// `enum qemu_plugin_cb_flags`: `QEMU_PLUGIN_CB_NO_REGS`.
    pub const CB_NO_REGS: c_uint = 0;
    /// `enum qemu_plugin_op`: `QEMU_PLUGIN_INLINE_ADD_U64`.
    pub const INLINE_ADD_U64: c_uint = 0;

    pub type TranslateCallback = unsafe extern "C" fn(PluginId, *mut TranslationBlock);
    pub type VcpuDataCallback = unsafe extern "C" fn(c_uint, *mut c_void);
    pub type DataCallback = unsafe extern "C" fn(PluginId, *mut c_void);

    unsafe extern "C" {
        pub fn qemu_plugin_register_vcpu_tb_trans_cb(id: PluginId, cb: TranslateCallback);
        pub fn qemu_plugin_register_atexit_cb(id: PluginId, cb: DataCallback, data: *mut c_void);
        pub fn qemu_plugin_tb_n_insns(tb: *const TranslationBlock) -> usize;
        pub fn qemu_plugin_tb_get_insn(
            tb: *const TranslationBlock,
            index: usize,
        ) -> *mut Instruction;
        pub fn qemu_plugin_insn_vaddr(insn: *const Instruction) -> u64;
        pub fn qemu_plugin_insn_size(insn: *const Instruction) -> usize;
        pub fn qemu_plugin_insn_data(insn: *const Instruction) -> *const c_void;
        pub fn qemu_plugin_register_vcpu_insn_exec_inline(
            insn: *mut Instruction,
            op: c_uint,
            ptr: *mut c_void,
            imm: u64,
        );
        pub fn qemu_plugin_register_vcpu_tb_exec_inline(
            tb: *mut TranslationBlock,
            op: c_uint,
            ptr: *mut c_void,
            imm: u64,
        );
        pub fn qemu_plugin_register_vcpu_insn_exec_cb(
            insn: *mut Instruction,
            cb: VcpuDataCallback,
            flags: c_uint,
            data: *mut c_void,
        );
    }
}

/// The plugin API version this plugin was written against; QEMU checks it on load.
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static qemu_plugin_version: c_int = 1;

/// Guest instructions executed so far (all vCPUs; the plugin insists on one).
static INSTRUCTIONS: AtomicU64 = AtomicU64::new(0);
/// `hlt` instructions executed so far.
static HALTS: AtomicU64 = AtomicU64::new(0);
/// The `x86` encoding of `hlt`.
const HLT: u8 = 0xF4;

struct Settings {
    /// Guest address of the marker function's first instruction.
    marker: Option<u64>,
    out: PathBuf,
    /// Where the per-block profile goes, if asked for.
    profile: Option<PathBuf>,
}

/// One translation of a guest block, for the profile: its start address, its instruction
/// count, and how many times it ran (a leaked counter that its inline add targets).
struct Block {
    vaddr: u64,
    insns: u64,
    runs: &'static AtomicU64,
}

/// Every block translated so far (in translation order; a block translated again gets a
/// second entry, and the output adds them up by address).
static BLOCKS: Mutex<Vec<Block>> = Mutex::new(Vec::new());
/// Each block's run count at each marker entry (blocks translated later count from 0).
static BLOCK_SNAPSHOTS: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Both counters at one entry into the marker function.
#[derive(Copy, Clone)]
struct Snapshot {
    instructions: u64,
    halts: u64,
}

static SNAPSHOTS: Mutex<Vec<Snapshot>> = Mutex::new(Vec::new());

fn counters_now() -> Snapshot {
    // QEMU's translated code adds to the counters with plain (non-atomic) stores on the
    // vCPU thread; callbacks run on that thread too, and the exit callback after it stopped.
    Snapshot {
        instructions: INSTRUCTIONS.load(Ordering::Relaxed),
        halts: HALTS.load(Ordering::Relaxed),
    }
}

/// Parses `key=value` plugin arguments.
fn parse_settings(args: &[&str]) -> Result<Settings, String> {
    let mut marker = None;
    let mut out = None;
    let mut profile = None;
    for arg in args {
        match arg.split_once('=') {
            Some(("marker", v)) => {
                let hex = v.trim_start_matches("0x");
                marker = Some(u64::from_str_radix(hex, 16).map_err(|_| {
                    format!("marker={v}: expected the marker function's address in hex")
                })?);
            }
            Some(("out", v)) if !v.is_empty() => out = Some(PathBuf::from(v)),
            Some(("profile", v)) if !v.is_empty() => profile = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "unknown argument {arg:?} (expected marker=0x<address>, out=<file> and \
                     optionally profile=<file>)"
                ));
            }
        }
    }
    let out = out.ok_or("no out=<file> argument: nowhere to write the counts")?;
    Ok(Settings {
        marker,
        out,
        profile,
    })
}

/// QEMU calls this once, when it loads the plugin.
///
/// # Safety
/// Called by QEMU only: `info` valid for the call, `argv` holding `argc` C strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qemu_plugin_install(
    id: api::PluginId,
    info: *const api::Info,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    // SAFETY: QEMU passes a valid `qemu_info_t` that lives for this call.
    let info = unsafe { &*info };
    if info.system_emulation && info.smp_vcpus > 1 {
        eprintln!(
            "virtio-insn-plugin: {} vCPUs: the counters are one per machine (QEMU 7.2's inline \
             adds are neither per vCPU nor atomic); run with -smp 1",
            info.smp_vcpus
        );
        return 1;
    }
    let mut args = Vec::new();
    for i in 0..usize::try_from(argc).unwrap_or(0) {
        // SAFETY: QEMU passes `argc` valid NUL-terminated strings that outlive the plugin.
        let arg = unsafe { CStr::from_ptr(*argv.add(i)) };
        match arg.to_str() {
            Ok(a) => args.push(a),
            Err(_) => {
                eprintln!("virtio-insn-plugin: an argument is not UTF-8");
                return 1;
            }
        }
    }
    let settings = match parse_settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("virtio-insn-plugin: {e}");
            return 1;
        }
    };
    if SETTINGS.set(settings).is_err() {
        eprintln!("virtio-insn-plugin: loaded twice");
        return 1;
    }
    // SAFETY: registering callbacks with the id QEMU gave us, from the install function,
    // is what the API is for; the callbacks have the signatures QEMU calls them with.
    unsafe {
        api::qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
        api::qemu_plugin_register_atexit_cb(id, on_exit, std::ptr::null_mut());
    }
    0
}

/// Instruments each instruction of a newly translated block.
unsafe extern "C" fn on_translate(_id: api::PluginId, tb: *mut api::TranslationBlock) {
    let marker = SETTINGS.get().and_then(|s| s.marker);
    if SETTINGS.get().is_some_and(|s| s.profile.is_some()) {
        // SAFETY: `tb` is valid for this callback; the counter is leaked, so it outlives
        // the translated code that adds to it.
        unsafe { count_block_runs(tb) };
    }
    // SAFETY: `tb` and the instruction handles are valid for this callback, which is where
    // the API lets a plugin query and instrument them; the counters are statics, so the
    // addresses given to the inline adds stay valid for as long as the code runs.
    unsafe {
        for i in 0..api::qemu_plugin_tb_n_insns(tb) {
            let insn = api::qemu_plugin_tb_get_insn(tb, i);
            api::qemu_plugin_register_vcpu_insn_exec_inline(
                insn,
                api::INLINE_ADD_U64,
                INSTRUCTIONS.as_ptr().cast(),
                1,
            );
            let size = api::qemu_plugin_insn_size(insn);
            let data = api::qemu_plugin_insn_data(insn).cast::<u8>();
            if size == 1 && !data.is_null() && *data == HLT {
                api::qemu_plugin_register_vcpu_insn_exec_inline(
                    insn,
                    api::INLINE_ADD_U64,
                    HALTS.as_ptr().cast(),
                    1,
                );
            }
            if marker == Some(api::qemu_plugin_insn_vaddr(insn)) {
                api::qemu_plugin_register_vcpu_insn_exec_cb(
                    insn,
                    on_marker,
                    api::CB_NO_REGS,
                    std::ptr::null_mut(),
                );
            }
        }
    }
}

/// Profile: gives the block its own run counter, added to inline each time it starts.
///
/// # Safety
/// `tb` must be the block QEMU is translating (valid for the translation callback).
unsafe fn count_block_runs(tb: *mut api::TranslationBlock) {
    // SAFETY: the caller passes the block being translated.
    let (n, first) = unsafe {
        let n = api::qemu_plugin_tb_n_insns(tb);
        if n == 0 {
            return;
        }
        (n, api::qemu_plugin_tb_get_insn(tb, 0))
    };
    let runs: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    // SAFETY: `tb` and its first instruction are valid here; `runs` is never freed.
    let vaddr = unsafe {
        api::qemu_plugin_register_vcpu_tb_exec_inline(
            tb,
            api::INLINE_ADD_U64,
            runs.as_ptr().cast(),
            1,
        );
        api::qemu_plugin_insn_vaddr(first)
    };
    BLOCKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Block {
            vaddr,
            insns: n as u64,
            runs,
        });
}

/// The guest entered the marker function.
unsafe extern "C" fn on_marker(_vcpu: c_uint, _data: *mut c_void) {
    let now = counters_now();
    SNAPSHOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(now);
    if SETTINGS.get().is_some_and(|s| s.profile.is_some()) {
        let runs = block_runs_now();
        BLOCK_SNAPSHOTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(runs);
    }
}

fn block_runs_now() -> Vec<u64> {
    // Relaxed: the vCPU thread (this one, or stopped at exit) is the only writer.
    BLOCKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|b| b.runs.load(Ordering::Relaxed))
        .collect()
}

/// The profile's text: per stretch between marker entries, instructions per block address.
fn profile_text() -> String {
    let blocks = BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
    let mut snapshots = BLOCK_SNAPSHOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    snapshots.push(
        blocks
            .iter()
            .map(|b| b.runs.load(Ordering::Relaxed))
            .collect(),
    );
    let mut text = String::new();
    for (n, pair) in snapshots.windows(2).enumerate() {
        let mut by_address = std::collections::BTreeMap::<u64, u64>::new();
        for (i, b) in blocks.iter().enumerate().take(pair[1].len()) {
            let runs = pair[1][i] - pair[0].get(i).copied().unwrap_or(0);
            if runs > 0 {
                *by_address.entry(b.vaddr).or_default() += runs * b.insns;
            }
        }
        for (vaddr, insns) in by_address {
            text += &format!("block {n} {vaddr:#x} {insns}\n");
        }
    }
    text
}

/// QEMU is exiting: write the snapshots and the totals.
unsafe extern "C" fn on_exit(_id: api::PluginId, _data: *mut c_void) {
    let Some(settings) = SETTINGS.get() else {
        return;
    };
    let snapshots = SNAPSHOTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = String::new();
    for (n, s) in snapshots.iter().enumerate() {
        text += &format!("marker {n} insns {} halts {}\n", s.instructions, s.halts);
    }
    let end = counters_now();
    text += &format!("exit insns {} halts {}\n", end.instructions, end.halts);
    write_file(&settings.out, &text);
    if let Some(profile) = &settings.profile {
        write_file(profile, &profile_text());
    }
}

fn write_file(path: &std::path::Path, text: &str) {
    let written = std::fs::File::create(path).and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("virtio-insn-plugin: cannot write {}: {e}", path.display());
    }
}
