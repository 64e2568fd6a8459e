//! End to end: the `net` transfer over a tap with a vnet header in a network namespace the
//! test creates (`tests/src/qemu/tap.rs`), so the driver's offloads reach a real Linux TCP
//! stack (slirp carries none). Three runs, one after another (q35, modern, MSI-X):
//!
//! - `all`: CSUM + HOST_TSO4 on transmit (smoltcp builds segments of up to 64 KiB, the phy
//!   sends them as GSO TCPV4 frames with NEEDS_CSUM), GUEST_CSUM + GUEST_TSO4 on receive
//!   (Linux sends coalesced frames with partial checksums);
//! - `notso`: the same without HOST_TSO4/6: checksum offload only on transmit;
//! - `none`: no offloads either way: smoltcp computes and verifies every checksum, and
//!   Linux verifies ours (a tap frame without NEEDS_CSUM is checked by the namespace's TCP).
//!
//! Each run moves [`BYTES`] each way; both ends hash every byte and the hashes must match.
//! Evidence that TSO happened is taken on both sides: the guest's count of GSO frames, and
//! the tap's own receive counter, which must show fewer frames than the payload needs at
//! one MSS per frame. Checksum offload: the guest's count of NEEDS_CSUM frames, its check
//! (with smoltcp's checksum code) that completing the pseudo-header sum gives a valid
//! checksum, and no TCP checksum errors in the namespace.
//!
//! Needs root, `/dev/net/tun` and `ip netns`: elsewhere it prints why and skips.

use virtio_tests::qemu::{IrqMode, Machine, RunConfig, RunReport, Transport, run_scenario, tap};

const BYTES: u64 = 8 << 20;
/// Payload bytes of one full segment at MTU 1500 (IPv4, TCP without options).
const MSS: u64 = 1460;

const CSUM: u64 = 1 << 0;
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const HOST_TSO4: u64 = 1 << 11;

fn stat<'a>(r: &'a RunReport, key: &str) -> &'a str {
    r.stat(key)
        .unwrap_or_else(|| panic!("no STAT {key}\n{}", r.summary()))
}

fn num(r: &RunReport, key: &str) -> u64 {
    stat(r, key)
        .parse()
        .unwrap_or_else(|_| panic!("STAT {key} is not a number\n{}", r.summary()))
}

fn run(offload: &str) -> RunReport {
    let mut cfg = RunConfig::new("net-tap")
        .machine(Machine::Q35)
        .transport(Transport::Modern)
        .irq(IrqMode::Msix)
        .guest_arg(format!("net_bytes={BYTES}"))
        .guest_arg(format!("net_offload={offload}"));
    cfg.label = Some(offload.into());
    let r = run_scenario(&cfg).unwrap_or_else(|e| panic!("net-tap [{offload}]: {e}"));
    let s = r.summary();
    println!("{s}");
    assert!(r.passed(), "{s}");
    // Both directions, hashed alike at both ends.
    assert_eq!(num(&r, "host.net.conn0.down_bytes"), BYTES, "{s}");
    assert_eq!(num(&r, "host.net.conn0.up_bytes"), BYTES, "{s}");
    assert_eq!(
        stat(&r, "net.recv.hash"),
        stat(&r, "host.net.conn0.down_hash"),
        "host → guest hash\n{s}"
    );
    assert_eq!(
        stat(&r, "net.send.hash"),
        stat(&r, "host.net.conn0.up_hash"),
        "guest → host hash\n{s}"
    );
    // The namespace's TCP saw no checksum errors; the phy found no bad checksum either, and
    // every frame it checked before offloading would leave the device with a valid one.
    assert_eq!(num(&r, "host.tap.tcp_incsumerrors"), 0, "{s}");
    assert_eq!(num(&r, "net.phy.rx_csum_bad"), 0, "{s}");
    assert_eq!(num(&r, "net.phy.tx_csum_selfcheck_bad"), 0, "{s}");
    println!(
        "[{offload}] send {} MiB/s: {} frames ({} TSO → {} segments, {:} per TSO frame), {} \
         wire segments per kick, {} with NEEDS_CSUM; tap received {} frames / {} bytes; \
         recv {} MiB/s: {} frames ({} coalesced, largest {} bytes)",
        stat(&r, "net.send.mib_s"),
        stat(&r, "net.send.tx_packets"),
        stat(&r, "net.send.tso_frames"),
        stat(&r, "net.send.tso_segments"),
        stat(&r, "net.send.segments_per_tso_frame"),
        stat(&r, "net.send.wire_segments_per_tx_kick"),
        stat(&r, "net.send.csum_offloaded"),
        stat(&r, "host.tap.rx_packets"),
        stat(&r, "host.tap.rx_bytes"),
        stat(&r, "net.recv.mib_s"),
        stat(&r, "net.recv.rx_packets"),
        stat(&r, "net.recv.rx_gso_frames"),
        stat(&r, "net.phy.rx_max_frame"),
    );
    r
}

fn features(r: &RunReport) -> u64 {
    u64::from_str_radix(stat(r, "net.features").trim_start_matches("0x"), 16).expect("hex")
}

#[test]
fn tap_offloads_tso_csum() {
    if let Err(why) = tap::available() {
        println!("SKIPPED: the tap configuration needs a network namespace: {why}");
        return;
    }

    // ---- all offloads ----
    let r = run("all");
    let s = r.summary();
    let f = features(&r);
    assert_eq!(
        f & (CSUM | HOST_TSO4 | GUEST_CSUM | GUEST_TSO4),
        CSUM | HOST_TSO4 | GUEST_CSUM | GUEST_TSO4,
        "{s}"
    );
    // TSO: the guest sent GSO frames of several segments each...
    assert!(num(&r, "net.send.tso_frames") > 0, "{s}");
    assert!(
        num(&r, "net.send.tso_segments") > 2 * num(&r, "net.send.tso_frames"),
        "{s}"
    );
    // ... and the host took them whole: its tap received fewer frames (data and ACKs of
    // both phases together) than the upload alone needs at one MSS per frame.
    assert!(num(&r, "host.tap.rx_packets") < BYTES / MSS, "{s}");
    // Checksum offload on transmit, checked before it left.
    assert!(num(&r, "net.phy.tx_csum_offloaded") > 0, "{s}");
    assert!(num(&r, "net.phy.tx_csum_selfcheck_ok") > 0, "{s}");
    // Receive offloads: Linux sent coalesced frames beyond the MTU with partial or
    // validated checksums, and the phy took them.
    assert!(num(&r, "net.phy.rx_gso_frames") > 0, "{s}");
    assert!(num(&r, "net.phy.rx_max_frame") > 1514, "{s}");
    assert!(
        num(&r, "net.phy.rx_csum_partial") + num(&r, "net.phy.rx_csum_valid") > 0,
        "{s}"
    );
    assert_eq!(num(&r, "net.phy.rx_oversize"), 0, "{s}");

    // ---- checksum offload without TSO ----
    let r = run("notso");
    let s = r.summary();
    let f = features(&r);
    assert_eq!(f & HOST_TSO4, 0, "{s}");
    assert_eq!(f & (CSUM | GUEST_TSO4), CSUM | GUEST_TSO4, "{s}");
    assert_eq!(num(&r, "net.phy.tx_tso_frames"), 0, "{s}");
    assert!(num(&r, "net.phy.tx_csum_offloaded") > 0, "{s}");
    // Without TSO the tap sees at least one frame per MSS of the upload.
    assert!(num(&r, "host.tap.rx_packets") >= BYTES / MSS, "{s}");

    // ---- no offloads: software checksums, which Linux verifies ----
    let r = run("none");
    let s = r.summary();
    let f = features(&r);
    assert_eq!(f & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4), 0, "{s}");
    assert_eq!(num(&r, "net.phy.tx_csum_offloaded"), 0, "{s}");
    assert_eq!(num(&r, "net.phy.rx_gso_frames"), 0, "{s}");
    assert!(num(&r, "net.phy.rx_max_frame") <= 1514, "{s}");
}
