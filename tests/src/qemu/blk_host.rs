//! Host side of the `blk`, `bench-blk` and `bench-blk-vd` scenarios: builds the drive and
//! the virtio-blk-pci device for the run, and checks the result after QEMU exits.
//!
//! The guest's `blk_*` command-line words (`RunConfig::guest_arg`) are the single source
//! of truth for a run: the guest checks what it negotiated against them, and this side
//! derives the QEMU arguments from the same words:
//!
//! | word | QEMU |
//! |---|---|
//! | `blk_test=main` (default) | raw file, `discard=unmap`, `discard=on,write-zeroes=on` |
//! | `blk_test=ro` | `readonly=on` |
//! | `blk_test=fault`, `blk_bad_read=`, `blk_bad_write=` | `blkdebug` config with `[inject-error]` rules (EIO) |
//! | `blk_test=durable`, `blk_kill=` | default cache (writeback) on the file; the test sets `RunConfig::kill_on` |
//! | `blk_queues=N` | `num-queues=N` |
//! | `blk_indirect=0`, `blk_event_idx=0` | `indirect_desc=off`, `event_idx=off` |
//!
//! After the run, [`verify_image`] recomputes what every sector of the image must hold
//! (the guest's pattern, `tests/guest/src/scenarios/blk/pattern.rs`, reimplemented here)
//! and reports `host.blk.image`. The benchmarks get a `null-co` drive and QEMU's
//! `fw_cfg_select` trace, whose phase markers (guest `blk::marker`) split the
//! kick/interrupt/completion counts and the reads the device was asked for (requests and
//! sectors, `virtio_blk_handle_read`) per phase ([`phase_counts`], `host.bench.<phase>.*`
//! stats).

use super::devices::{BLK_SERIAL, DISK_BYTES, transport_props, write_disk_image};
use super::{Check, HostContext, HostOutcome, HostSide, Machine, Transport};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Benchmark phase names, in the order of their marker numbers: phase `i` runs between
/// markers `0x10 + i` and `0x20 + i`. Guest `blk::PHASES`, then guest `blk::SG_PHASES`
/// from [`SG_FIRST`] on.
pub const PHASES: [&str; 7] = [
    "rand4k_qd1",
    "rand4k_qd32",
    "seq64k_qd1",
    "sg16k_qd1",
    "sg64k_qd1",
    "sg256k_qd1",
    "sg1m_qd1",
];
/// The first scatter-gather phase in [`PHASES`] (our driver only: `bench-blk-vd` sends
/// no markers for them).
pub const SG_FIRST: usize = 3;

/// Sectors of the durability areas (guest `blk::durable_area`).
pub const DURABLE_ROUNDS: u64 = 4;
const DURABLE_FIRST: u64 = 1024;
const DURABLE_AREA: u64 = 3072;

pub fn durable_area(k: u64) -> (u64, u64) {
    (DURABLE_FIRST + (k - 1) * DURABLE_AREA, DURABLE_AREA)
}

/// Guest pattern: 64-bit word `w` of `sector` (splitmix64 of the position).
pub fn word(seed: u64, sector: u64, w: u64) -> u64 {
    let mut z = seed
        ^ sector
            .wrapping_mul(64)
            .wrapping_add(w)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The pattern content of one sector.
pub fn pattern_sector(seed: u64, sector: u64) -> [u8; 512] {
    let mut out = [0u8; 512];
    for (w, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(seed, sector, w as u64).to_le_bytes());
    }
    out
}

/// What `write_disk_image` put in `sector`.
pub fn initial_sector(sector: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..6].copy_from_slice(b"SECTOR");
    s[6..14].copy_from_slice(&sector.to_le_bytes());
    for (i, b) in s.iter_mut().enumerate().skip(14) {
        *b = ((sector + i as u64) % 251) as u8;
    }
    s
}

/// Ranges the `main` test discards / zeroes (guest `pattern::DISCARD`, ...).
pub const DISCARD: &[(u64, u64)] = &[(1024, 2048), (9000, 8)];
pub const WRITE_ZEROES: &[(u64, u64)] = &[(4096, 100), (12001, 7), (15000, 1024)];

fn in_ranges(list: &[(u64, u64)], sector: u64) -> bool {
    list.iter().any(|&(s, n)| sector >= s && sector < s + n)
}

/// The run's `key=value` guest words.
#[derive(Clone, Debug, Default)]
pub struct BlkArgs(BTreeMap<String, String>);

impl BlkArgs {
    pub fn parse(words: &[String]) -> Self {
        BlkArgs(
            words
                .iter()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    pub fn u64(&self, k: &str, default: u64) -> u64 {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
    pub fn list(&self, k: &str) -> Vec<u64> {
        self.get(k)
            .unwrap_or("")
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect()
    }
    pub fn test(&self) -> &str {
        self.get("blk_test").unwrap_or("main")
    }
}

/// What a sector of the image must hold after the run.
#[derive(Clone, Debug)]
pub enum Expect {
    Bytes(Box<[u8; 512]>),
    /// Written but not flushed when QEMU was killed: old or new.
    Either(Box<[u8; 512]>, Box<[u8; 512]>),
}

/// The expected content of `sector` for the run described by `args`.
pub fn expected(args: &BlkArgs, sector: u64) -> Expect {
    let seed = args.u64("blk_seed", 1);
    match args.test() {
        "main" => {
            if in_ranges(DISCARD, sector) || in_ranges(WRITE_ZEROES, sector) {
                Expect::Bytes(Box::new([0; 512]))
            } else {
                Expect::Bytes(Box::new(pattern_sector(seed, sector)))
            }
        }
        "fault" => {
            let (bad_r, bad_w) = (args.list("blk_bad_read"), args.list("blk_bad_write"));
            let covers = |bad: &[u64], s: u64, n: u64| bad.iter().any(|&b| b >= s && b < s + n);
            // The writes that must have succeeded (guest `test_fault`).
            let mut area = (3000u64, 1024u64);
            while covers(&bad_r, area.0, area.1) || covers(&bad_w, area.0, area.1) {
                area.0 += 1024;
            }
            let good_w = bad_w
                .iter()
                .map(|&w| (w + 16, 8))
                .filter(|&(s, n)| !covers(&bad_w, s, n));
            if good_w.clone().any(|(s, n)| sector >= s && sector < s + n)
                || (sector >= area.0 && sector < area.0 + area.1)
            {
                Expect::Bytes(Box::new(pattern_sector(seed, sector)))
            } else {
                Expect::Bytes(Box::new(initial_sector(sector)))
            }
        }
        "durable" => {
            let kill = args.u64("blk_kill", 0);
            let last = if kill == 0 { DURABLE_ROUNDS } else { kill };
            for k in 1..=DURABLE_ROUNDS + 1 {
                let (s, n) = durable_area(k);
                if sector < s || sector >= s + n {
                    continue;
                }
                if k <= last {
                    return Expect::Bytes(Box::new(pattern_sector(seed + k, sector)));
                }
                if kill != 0 && k == kill + 1 {
                    return Expect::Either(
                        Box::new(initial_sector(sector)),
                        Box::new(pattern_sector(seed + k, sector)),
                    );
                }
            }
            Expect::Bytes(Box::new(initial_sector(sector)))
        }
        // ro, and anything unknown: untouched.
        _ => Expect::Bytes(Box::new(initial_sector(sector))),
    }
}

/// Checks every sector of `image` against [`expected`]: `host.blk.image`.
pub fn verify_image(args: &BlkArgs, image: &Path) -> Check {
    let data = match std::fs::read(image) {
        Ok(d) => d,
        Err(e) => {
            return Check {
                name: "host.blk.image".into(),
                passed: false,
                detail: format!("cannot read {}: {e}", image.display()),
            };
        }
    };
    let mut bad: Vec<u64> = Vec::new();
    let mut either_new = 0u64;
    let sectors = data.len() as u64 / 512;
    for (n, got) in data.chunks_exact(512).enumerate() {
        let n = n as u64;
        match expected(args, n) {
            Expect::Bytes(want) => {
                if got != &want[..] {
                    bad.push(n);
                }
            }
            Expect::Either(old, new) => {
                if got == &new[..] {
                    either_new += 1;
                } else if got != &old[..] {
                    bad.push(n);
                }
            }
        }
    }
    let size_ok = data.len() as u64 == DISK_BYTES;
    Check {
        name: "host.blk.image".into(),
        passed: bad.is_empty() && size_ok,
        detail: format!(
            "blk_test={}: {sectors} sectors checked, {} wrong{}{}",
            args.test(),
            bad.len(),
            if bad.is_empty() {
                String::new()
            } else {
                let first: Vec<String> = bad.iter().take(8).map(|s| s.to_string()).collect();
                format!(" (first: {})", first.join(", "))
            },
            if args.test() == "durable" && args.u64("blk_kill", 0) != 0 {
                format!("; {either_new} unflushed sectors of the next area already new")
            } else {
                String::new()
            }
        ),
    }
}

/// The blkdebug rules for the fault run: EIO on reads covering `reads` and writes
/// covering `writes`, every time.
pub fn blkdebug_config(reads: &[u64], writes: &[u64]) -> String {
    let mut s = String::new();
    for (event, sectors) in [("read_aio", reads), ("write_aio", writes)] {
        for n in sectors {
            s += &format!(
                "[inject-error]\nevent = \"{event}\"\nerrno = \"5\"\nsector = \"{n}\"\nonce = \"off\"\n\n"
            );
        }
    }
    s
}

/// Per-phase counts from a QEMU trace with the guest's phase markers: `fw_cfg_select`
/// of key `0x3F00 | v`, where `v = 0x10 + i` starts phase i and `0x20 + i` ends it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseCounts {
    pub kicks: u64,
    pub interrupts: u64,
    pub completions: u64,
    /// Read requests the device took from the ring (`virtio_blk_handle_read`, one per
    /// device request, before QEMU merges any) and the sectors they asked for.
    pub reads: u64,
    pub read_sectors: u64,
}

pub fn phase_counts(trace: &str) -> BTreeMap<usize, PhaseCounts> {
    let mut out: BTreeMap<usize, PhaseCounts> = BTreeMap::new();
    let mut current: Option<usize> = None;
    for line in trace.lines() {
        let body = match line.split_once(':') {
            Some((prefix, rest)) if prefix.contains('@') => rest,
            _ => line,
        };
        let mut words = body.split_whitespace();
        let Some(event) = words.next() else { continue };
        match event {
            "fw_cfg_select" => {
                let rest: Vec<&str> = words.collect();
                let key = rest
                    .iter()
                    .position(|w| *w == "key")
                    .and_then(|i| rest.get(i + 1))
                    .and_then(|v| match v.strip_prefix("0x") {
                        Some(hex) => usize::from_str_radix(hex, 16).ok(),
                        None => v.parse::<usize>().ok(),
                    });
                if let Some(k) = key.filter(|k| k & 0xFF00 == 0x3F00) {
                    let v = k & 0xFF;
                    if (0x10..0x20).contains(&v) {
                        current = Some(v - 0x10);
                        out.entry(v - 0x10).or_default();
                    } else if (0x20..0x30).contains(&v) {
                        current = None;
                    }
                }
            }
            "virtio_queue_notify" => {
                if let Some(p) = current {
                    out.entry(p).or_default().kicks += 1;
                }
            }
            "virtio_notify" | "virtio_notify_irqfd" => {
                if let Some(p) = current {
                    out.entry(p).or_default().interrupts += 1;
                }
            }
            "virtio_blk_req_complete" => {
                if let Some(p) = current {
                    out.entry(p).or_default().completions += 1;
                }
            }
            // `virtio_blk_handle_read vdev 0x… req 0x… sector S nsectors N`
            "virtio_blk_handle_read" => {
                if let Some(p) = current {
                    let rest: Vec<&str> = words.collect();
                    let nsectors = rest
                        .iter()
                        .position(|w| *w == "nsectors")
                        .and_then(|i| rest.get(i + 1))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    let c = out.entry(p).or_default();
                    c.reads += 1;
                    c.read_sectors += nsectors;
                }
            }
            _ => {}
        }
    }
    out
}

/// Starts the host side of a blk scenario (see the module documentation).
pub fn start(ctx: &HostContext<'_>) -> std::io::Result<HostSide> {
    let cfg = ctx.config;
    let args = BlkArgs::parse(&cfg.extra_guest_args);
    let bench = cfg.scenario.starts_with("bench-");
    let mut qemu: Vec<String> = Vec::new();
    let mut guest = vec![
        format!("blk_serial={BLK_SERIAL}"),
        "expect_types=2".to_string(),
    ];
    let mut props = format!("{},ioeventfd=off", transport_props(cfg.transport));
    let image: Option<PathBuf> = if bench {
        qemu.push("-blockdev".into());
        qemu.push("driver=null-co,node-name=d0,size=1073741824".into());
        for ev in [
            "fw_cfg_select",
            "virtio_blk_req_complete",
            "virtio_blk_handle_read",
        ] {
            qemu.push("-trace".into());
            qemu.push(ev.into());
        }
        None
    } else {
        let img = ctx.run_dir.join("disk.img");
        write_disk_image(&img)?;
        guest.push(format!("blk_bytes={DISK_BYTES}"));
        let drive = match args.test() {
            "main" => {
                props += ",discard=on,write-zeroes=on";
                format!("file={},discard=unmap", img.display())
            }
            "ro" => format!("file={},readonly=on", img.display()),
            "fault" => {
                let conf = ctx.run_dir.join("blkdebug.conf");
                std::fs::write(
                    &conf,
                    blkdebug_config(&args.list("blk_bad_read"), &args.list("blk_bad_write")),
                )?;
                format!("file=blkdebug:{}:{}", conf.display(), img.display())
            }
            // durable: the default cache mode (writeback) on the file.
            _ => format!("file={}", img.display()),
        };
        qemu.push("-drive".into());
        qemu.push(format!("if=none,id=d0,format=raw,{drive}"));
        Some(img)
    };
    if let Some(q) = args.get("blk_queues") {
        props += &format!(",num-queues={q}");
    }
    if args.get("blk_indirect") == Some("0") {
        props += ",indirect_desc=off";
    }
    if args.get("blk_event_idx") == Some("0") {
        props += ",event_idx=off";
    }
    let mut bus = String::new();
    if cfg.machine == Machine::Q35 && cfg.transport == Transport::Modern {
        qemu.push("-device".into());
        qemu.push("pcie-root-port,id=rpb,chassis=1,bus=pcie.0,addr=0x10".into());
        bus = ",bus=rpb".into();
    }
    qemu.push("-device".into());
    qemu.push(format!(
        "virtio-blk-pci,id=blk0,drive=d0,serial={BLK_SERIAL}{props}{bus}"
    ));

    let trace = ctx.run_dir.join("trace.log");
    let finish: Box<dyn FnOnce() -> HostOutcome + Send> = Box::new(move || {
        let mut out = HostOutcome::default();
        if let Some(img) = image {
            out.checks.push(verify_image(&args, &img));
        }
        if bench {
            let text = std::fs::read_to_string(&trace).unwrap_or_default();
            for (i, c) in phase_counts(&text) {
                let name = PHASES.get(i).copied().unwrap_or("unknown");
                out.stats
                    .insert(format!("host.bench.{name}.kicks"), c.kicks.to_string());
                out.stats.insert(
                    format!("host.bench.{name}.interrupts"),
                    c.interrupts.to_string(),
                );
                out.stats.insert(
                    format!("host.bench.{name}.completions"),
                    c.completions.to_string(),
                );
                out.stats
                    .insert(format!("host.bench.{name}.reads"), c.reads.to_string());
                out.stats.insert(
                    format!("host.bench.{name}.read_sectors"),
                    c.read_sectors.to_string(),
                );
            }
        }
        out
    });
    Ok(HostSide {
        guest_args: guest,
        qemu_args: qemu,
        finish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_markers_split_counts() {
        let t = "1@1.0:virtio_queue_notify vdev 0x1 n 0 vq 0x2\n\
                 1@1.1:fw_cfg_select 0x5 key 0x3f10 'unknown', ret: 0\n\
                 1@1.2:virtio_queue_notify vdev 0x1 n 0 vq 0x2\n\
                 1@1.25:virtio_blk_handle_read vdev 0x1 req 0x3 sector 8 nsectors 32\n\
                 1@1.3:virtio_blk_req_complete vdev 0x1 req 0x3 status 0\n\
                 1@1.4:virtio_notify vdev 0x1 vq 0x2\n\
                 fw_cfg_select 0x5 key 0x19 'etc/e820', ret: 1\n\
                 1@1.6:fw_cfg_select 0x5 key 16160 ret 0\n\
                 1@1.7:virtio_notify vdev 0x1 vq 0x2\n\
                 1@1.8:fw_cfg_select 0x5 key 16145 ret 0\n\
                 1@1.9:virtio_notify_irqfd vdev 0x1 vq 0x2\n";
        let p = phase_counts(t);
        assert_eq!(
            p[&0],
            PhaseCounts {
                kicks: 1,
                interrupts: 1,
                completions: 1,
                reads: 1,
                read_sectors: 32,
            }
        );
        assert_eq!(p[&1].interrupts, 1);
        // The scatter-gather phases' markers (0x13 = 16147 .. 0x26) map to their names.
        let t = "fw_cfg_select 0x5 key 16147 ret 0\n\
                 virtio_blk_handle_read vdev 0x1 req 0x3 sector 0 nsectors 2048\n\
                 fw_cfg_select 0x5 key 0x3f23 'unknown', ret: 0\n\
                 fw_cfg_select 0x5 key 0x3f16 'unknown', ret: 0\n\
                 fw_cfg_select 0x5 key 0x3f26 'unknown', ret: 0\n";
        let p = phase_counts(t);
        assert_eq!(PHASES[SG_FIRST], "sg16k_qd1");
        assert_eq!((p[&SG_FIRST].reads, p[&SG_FIRST].read_sectors), (1, 2048));
        assert_eq!(p[&6], PhaseCounts::default());
        assert_eq!(PHASES[6], "sg1m_qd1");
    }

    #[test]
    fn blkdebug_rules() {
        let c = blkdebug_config(&[100], &[7]);
        assert!(
            c.contains("event = \"read_aio\"\nerrno = \"5\"\nsector = \"100\"\nonce = \"off\"")
        );
        assert!(c.contains("event = \"write_aio\""));
    }

    #[test]
    fn image_check_finds_a_wrong_sector() {
        let dir = std::env::temp_dir().join(format!("blk-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        write_disk_image(&img).unwrap();
        let ro = BlkArgs::parse(&["blk_test=ro".into()]);
        assert!(verify_image(&ro, &img).passed);
        let mut data = std::fs::read(&img).unwrap();
        data[512 * 77 + 300] ^= 1;
        std::fs::write(&img, &data).unwrap();
        let c = verify_image(&ro, &img);
        assert!(
            !c.passed && c.detail.contains("(first: 77)"),
            "{}",
            c.detail
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn expectations() {
        let a = BlkArgs::parse(&["blk_seed=5".into()]);
        assert!(matches!(expected(&a, 1024), Expect::Bytes(b) if *b == [0; 512]));
        assert!(matches!(expected(&a, 0), Expect::Bytes(b) if *b == pattern_sector(5, 0)));
        let d = BlkArgs::parse(&["blk_test=durable".into(), "blk_kill=2".into()]);
        let (s3, _) = durable_area(3);
        assert!(matches!(expected(&d, s3), Expect::Either(..)));
        assert!(matches!(expected(&d, 0), Expect::Bytes(b) if *b == initial_sector(0)));
    }
}
