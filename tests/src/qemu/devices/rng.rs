//! virtio-rng: `virtio-rng-pci` whose `rng-random` backend reads a host file of known
//! bytes ([`entropy_bytes`]) through QEMU's rate limiter (`max-bytes` per `period` ms).
//!
//! The `rng` scenario's host side checks, once QEMU has exited:
//! - `host.rng.data`: the bytes the guest printed (`RNG-DATA <offset> <hex>`) are the
//!   file's first bytes, in order, none missing or repeated;
//! - `host.rng.rate_limit`: QEMU's own `virtio_rng_pushed` trace (timestamped by QEMU on
//!   the host's clock) never delivered more than the limit allows over the time it took,
//!   and took at least as long as the limit forces (without it, 4 KiB arrive in a few
//!   milliseconds). The guest's own time (`STAT rng.elapsed_us`) is not used: its TSC
//!   calibration is off by up to 5× when the host is busy (parallel test runs);
//! - `host.rng.accounting`: the guest received no more than QEMU pushed, and QEMU pushed
//!   no more than the file holds.

use super::{Attach, DeviceFiles, DeviceSpec, ScenarioSpec};
use crate::qemu::{Check, HostContext, HostOutcome, HostSide};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use virtio_core::DeviceType;

pub const DEVICE: DeviceSpec = DeviceSpec {
    device_type: DeviceType::Entropy,
    attach,
    scenarios: &[ScenarioSpec {
        name: "rng",
        devices: &[DeviceType::Entropy],
        trace: true,
        timeout_secs: 60,
        host: Some(start),
    }],
};

/// The rate limit: at most `MAX_BYTES` per `PERIOD_MS` (QEMU's `max-bytes`, `period`).
pub const MAX_BYTES: u64 = 1024;
pub const PERIOD_MS: u64 = 100;
/// Bytes the guest reads unless the run says otherwise (`rng_bytes=`): four periods' worth.
pub const DEFAULT_BYTES: u64 = 4096;
/// Size of the backend's file: more than any run reads (QEMU's `rng-random` must not hit
/// the end of a regular file).
pub const FILE_BYTES: usize = 256 << 10;
const FILE_NAME: &str = "entropy.bin";

/// The file's bytes: splitmix64 from a fixed seed, so every byte is known and a shifted,
/// repeated or dropped byte shows.
pub fn entropy_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x5eed_0f7e_5712_3400;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn attach(ctx: &Attach<'_>, _: &mut DeviceFiles) -> io::Result<Vec<String>> {
    let file = ctx.run_dir.join(FILE_NAME);
    std::fs::write(&file, entropy_bytes(FILE_BYTES))?;
    Ok(vec![
        "-object".into(),
        format!("rng-random,id=rng0,filename={}", file.display()),
        "-device".into(),
        format!(
            "virtio-rng-pci,rng=rng0,max-bytes={MAX_BYTES},period={PERIOD_MS}{}",
            ctx.props
        ),
    ])
}

fn guest_word<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
    args.iter()
        .rev()
        .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

fn start(ctx: &HostContext<'_>) -> io::Result<HostSide> {
    let mut guest_args = Vec::new();
    let want = match guest_word(&ctx.config.extra_guest_args, "rng_bytes") {
        Some(v) => v
            .parse()
            .map_err(|_| io::Error::other(format!("rng_bytes={v}: not a number")))?,
        None => {
            guest_args.push(format!("rng_bytes={DEFAULT_BYTES}"));
            DEFAULT_BYTES
        }
    };
    // Timestamps on trace lines (`pid@seconds.micros:`): the rate-limit check needs them.
    let mut qemu_args = vec!["-msg".to_string(), "timestamp=on".to_string()];
    for ev in ["virtio_rng_pushed", "virtio_rng_request"] {
        qemu_args.extend(["-trace".to_string(), ev.to_string()]);
    }
    let run_dir = ctx.run_dir.to_path_buf();
    let serial = ctx.serial_log.to_path_buf();
    Ok(HostSide {
        guest_args,
        qemu_args,
        finish: Box::new(move || finish(&run_dir, &serial, want)),
    })
}

fn check(name: &str, passed: bool, detail: String) -> Check {
    Check {
        name: format!("host.rng.{name}"),
        passed,
        detail,
    }
}

/// The bytes of the guest's `RNG-DATA` lines, or why they do not form one stream.
pub fn guest_bytes(serial: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for line in serial.lines() {
        let Some(rest) = line.trim_end().strip_prefix("RNG-DATA ") else {
            continue;
        };
        let (offset, hex) = rest.split_once(' ').unwrap_or((rest, ""));
        if offset.parse::<usize>().ok() != Some(out.len()) {
            return Err(format!(
                "RNG-DATA line at offset {offset} where {} was next",
                out.len()
            ));
        }
        if hex.len() % 2 != 0 {
            return Err(format!("RNG-DATA line at offset {offset}: odd hex length"));
        }
        for i in (0..hex.len()).step_by(2) {
            let b = u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| format!("RNG-DATA line at offset {offset}: not hex"))?;
            out.push(b);
        }
    }
    Ok(out)
}

/// `(seconds, bytes)` of every `virtio_rng_pushed` event in a QEMU trace log
/// (`pid@seconds.micros:virtio_rng_pushed rng 0x...: 64 bytes pushed`).
pub fn pushes(trace: &str) -> Vec<(f64, u64)> {
    trace
        .lines()
        .filter_map(|l| {
            let (prefix, body) = l.split_once(':')?;
            let body = body.strip_prefix("virtio_rng_pushed ")?;
            let t: f64 = prefix.split_once('@')?.1.parse().ok()?;
            let words: Vec<&str> = body.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "bytes")?;
            let n = words.get(at.checked_sub(1)?)?.parse().ok()?;
            Some((t, n))
        })
        .collect()
}

/// Groups pushes separated by less than `gap` seconds: `(start, bytes)` per group. Under
/// a rate limit each group is what one refilled quota bought.
pub fn bursts(pushes: &[(f64, u64)], gap: f64) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::new();
    let mut last = f64::NEG_INFINITY;
    for &(t, n) in pushes {
        match out.last_mut() {
            Some(b) if t - last < gap => b.1 += n,
            _ => out.push((t, n)),
        }
        last = t;
    }
    out
}

fn stat_of(serial: &str, key: &str) -> Option<u64> {
    serial.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix("STAT ")?
            .strip_prefix(key)?
            .strip_prefix('=')?
            .parse()
            .ok()
    })
}

fn finish(run_dir: &Path, serial_path: &PathBuf, want: u64) -> HostOutcome {
    let serial =
        String::from_utf8_lossy(&std::fs::read(serial_path).unwrap_or_default()).into_owned();
    let file = std::fs::read(run_dir.join(FILE_NAME)).unwrap_or_default();
    let trace = std::fs::read_to_string(run_dir.join("trace.log")).unwrap_or_default();
    let mut checks = Vec::new();
    let mut stats = BTreeMap::new();

    checks.push(match guest_bytes(&serial) {
        Err(why) => check("data", false, why),
        Ok(got) => {
            let first_diff = got.iter().zip(&file).position(|(a, b)| a != b);
            let ok = got.len() as u64 == want && first_diff.is_none() && got.len() <= file.len();
            let detail = match first_diff {
                Some(at) => format!("guest byte {at} differs from the file's"),
                None if got.len() as u64 != want => {
                    format!("guest printed {} bytes, {want} expected", got.len())
                }
                None => format!(
                    "the guest's {} bytes are bytes 0..{} of {FILE_NAME}, in order",
                    got.len(),
                    got.len()
                ),
            };
            check("data", ok, detail)
        }
    });

    let pushed = pushes(&trace);
    let total: u64 = pushed.iter().map(|p| p.1).sum();
    let span = match (pushed.first(), pushed.last()) {
        (Some(a), Some(b)) => b.0 - a.0,
        _ => 0.0,
    };
    let period = PERIOD_MS as f64 / 1000.0;
    // The quota starts full and is refilled at most once per period (QEMU re-arms its timer
    // on the first request after a refill): over `span` seconds at most
    // (⌊span/period⌋ + 2) quotas can be spent. Without the limit, 4 KiB take a few ms.
    let allowed = MAX_BYTES * ((span / period).floor() as u64 + 2);
    // And `total` bytes need ⌈total/max⌉ − 1 refills, at least a period apart; the first
    // push may come up to one period after the timer started, hence − 2.
    let needed_ms = total.div_ceil(MAX_BYTES).saturating_sub(2) * PERIOD_MS;
    let bursts = bursts(&pushed, period / 2.0);
    let sizes: Vec<String> = bursts.iter().map(|b| b.1.to_string()).collect();
    let gaps: Vec<String> = bursts
        .windows(2)
        .map(|w| format!("{:.0}", (w[1].0 - w[0].0) * 1000.0))
        .collect();
    checks.push(check(
        "rate_limit",
        !pushed.is_empty() && total <= allowed && span * 1000.0 >= needed_ms as f64,
        format!(
            "QEMU pushed {total} bytes in {} requests over {:.0} ms, as {} bursts of {} bytes \
             starting {} ms apart; {MAX_BYTES} bytes per {PERIOD_MS} ms allows at most \
             {allowed} bytes in that time and needs at least {needed_ms} ms for {total}",
            pushed.len(),
            span * 1000.0,
            bursts.len(),
            sizes.join(" + "),
            if gaps.is_empty() {
                "-".to_string()
            } else {
                gaps.join(", ")
            },
        ),
    ));
    stats.insert("host.rng.pushed_bytes".into(), total.to_string());
    stats.insert("host.rng.pushed_ms".into(), format!("{:.0}", span * 1000.0));

    let received = stat_of(&serial, "rng.bytes_received");
    checks.push(check(
        "accounting",
        received.is_some_and(|r| r >= want && r <= total) && total <= file.len() as u64,
        format!(
            "guest received {} bytes, QEMU pushed {total}, the file holds {}",
            received.map_or("no".to_string(), |r| r.to_string()),
            file.len()
        ),
    ));
    HostOutcome { checks, stats }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_data_and_trace() {
        let serial = "x\nRNG-DATA 0 00ff\r\nSTAT rng.elapsed_us=7\nRNG-DATA 2 10\n";
        assert_eq!(guest_bytes(serial), Ok(vec![0, 0xff, 0x10]));
        assert!(guest_bytes("RNG-DATA 1 00\n").is_err());
        assert_eq!(stat_of(serial, "rng.elapsed_us"), Some(7));
        let t = "9@100.5:virtio_rng_request rng 0x1: 64 bytes requested, 1024 bytes quota left\n\
                 9@100.25:virtio_rng_pushed rng 0x55d1: 64 bytes pushed\n\
                 9@100.75:virtio_rng_pushed rng 0x55d1: 12 bytes pushed\n";
        assert_eq!(pushes(t), vec![(100.25, 64), (100.75, 12)]);
        let b = bursts(&[(0.0, 64), (0.01, 64), (0.1, 64), (0.3, 1)], 0.05);
        assert_eq!(b, vec![(0.0, 128), (0.1, 64), (0.3, 1)]);
    }

    #[test]
    fn entropy_file_is_fixed() {
        let a = entropy_bytes(100);
        assert_eq!(a, entropy_bytes(100));
        assert_eq!(&entropy_bytes(200)[..100], &a[..]);
        assert!(a.iter().any(|&b| b != a[0]));
    }
}
