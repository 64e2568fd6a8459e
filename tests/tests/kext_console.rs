//! VirtioConsole.kext's C ABI (`virtio-console-kext`), called the way its IOSerialFamily
//! shim calls it, on top of the family's C ABI over the PCI simulation with `console_model`
//! playing QEMU's virtio-serial device. IOKit order: the family starts and publishes its
//! nub; the console's `start` creates the device over the nub's handle; ports are published
//! through the shim's callbacks (a serial nub each) as the device adds and names them; the
//! nubs' IOSerialDriverSync calls (acquire, PD_E_ACTIVE, enqueue/dequeue data, watchState)
//! come in by key; interrupts, delivered by the family, move data, carrier and sizes;
//! sleep resets the device and wake brings it back with the same ports and sessions;
//! `stop` withdraws every port and resets the device; the family stops with every DMA
//! region returned. Each test runs against the rlibs and against the loaded bundles
//! (`kext_support`).

mod kext_support;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{CStr, c_void};

use kext_support::{Family, FamilyKext, c_abi, kext_tests};
use virtio_console_kext::*;
use virtio_pci::Preference;
use virtio_tests::console_model::{self as cm, ConsoleModel, F_EMERG_WRITE, F_MULTIPORT, F_SIZE};
use virtio_tests::sim::{MODES, SimBuilder, SimMode};

/// INDIRECT_DESC | EVENT_IDX (ring bits), VERSION_1 for non-legacy functions.
const RING: u64 = (1 << 28) | (1 << 29);
const V1: u64 = 1 << 32;
/// What QEMU 7.2's virtio-serial offers (SIZE is not offered).
const QEMU: u64 = F_MULTIPORT | F_EMERG_WRITE;

/// IOSerialFamily's numbers, written out from the Kernel SDK's `IOSerialStreamSync.h` and
/// `IORS232SerialStreamSync.h` (an independent check of the crate's own table).
mod pd {
    pub const E_ACTIVE: u32 = 0x05;
    pub const E_TXQ_SIZE: u32 = 0x0b;
    pub const E_TXQ_AVAILABLE: u32 = 0x23;
    pub const E_RXQ_AVAILABLE: u32 = 0x27;
    pub const E_RXQ_FLUSH: u32 = 0x2f;
    pub const E_DATA_RATE: u32 = 0x33;
    pub const E_FLOW_CONTROL: u32 = 0x53;
    pub const S_ACQUIRED: u32 = 0x8000_0000;
    pub const S_ACTIVE: u32 = 0x4000_0000;
    pub const S_TX_ENABLE: u32 = 0x2000_0000;
    pub const S_TXQ_EMPTY: u32 = 0x0400_0000;
    pub const S_TXQ_FULL: u32 = 0x0080_0000;
    pub const S_RXQ_EMPTY: u32 = 0x0008_0000;
    pub const RS232_S_DTR: u32 = 0x0002;
    pub const RS232_S_CAR: u32 = 0x0040;
}

c_abi! {
    /// VirtioConsole.kext's C functions (`VirtioConsoleABI.h`).
    pub struct ConsoleAbi from virtio_console_kext {
        fn vcon_create(
            *mut virtio_kext_client::VfamDevice,
            *const VconCallbacks,
            *mut *mut VconDevice,
        ) -> i32;
        fn vcon_interrupt(*mut VconDevice, i32);
        fn vcon_settle(*mut VconDevice);
        fn vcon_emergency_write(*mut VconDevice, *const u8, usize) -> i32;
        fn vcon_port_acquire(*mut VconDevice, u32) -> i32;
        fn vcon_port_release(*mut VconDevice, u32) -> i32;
        fn vcon_port_set_state(*mut VconDevice, u32, u32, u32) -> i32;
        fn vcon_port_get_state(*mut VconDevice, u32) -> u32;
        fn vcon_port_watch_state(*mut VconDevice, u32, *mut u32, u32) -> i32;
        fn vcon_port_next_event(*mut VconDevice, u32) -> u32;
        fn vcon_port_execute_event(*mut VconDevice, u32, u32, u32) -> i32;
        fn vcon_port_request_event(*mut VconDevice, u32, u32, *mut u32) -> i32;
        fn vcon_port_enqueue_data(*mut VconDevice, u32, *const u8, u32, *mut u32) -> i32;
        fn vcon_port_dequeue_data(*mut VconDevice, u32, *mut u8, u32, *mut u32, u32) -> i32;
        fn vcon_port_info(*mut VconDevice, u32, *mut VconPortInfo) -> i32;
        fn vcon_stats(*mut VconDevice, *mut VconStats) -> i32;
        fn vcon_suspend(*mut VconDevice) -> i32;
        fn vcon_resume(*mut VconDevice) -> i32;
        fn vcon_stop(*mut VconDevice);
        fn vcon_destroy(*mut VconDevice);
        fn vcon_log_init();
    }
}

/// The family and the console kext, both from the rlibs or both loaded.
#[derive(Clone, Copy)]
struct Kexts {
    family: &'static FamilyKext,
    con: ConsoleAbi,
}

impl Kexts {
    fn rlib() -> Kexts {
        Kexts {
            family: FamilyKext::rlib(),
            con: ConsoleAbi::rlib(),
        }
    }

    fn loaded() -> Option<Kexts> {
        let family = FamilyKext::loaded()?;
        let bundle = family.load_device("VirtioConsole", "_vcon_log_init")?;
        Some(Kexts {
            family,
            con: ConsoleAbi::loaded(bundle),
        })
    }
}

kext_tests!(Kexts:
    one_port_without_multiport_in_every_mode,
    ports_are_published_by_name_as_the_device_adds_them,
    hot_plug_withdraws_and_publishes_with_fresh_keys,
    open_and_close_reach_the_host_and_carrier_follows_it,
    flow_control_is_the_rings_backpressure,
    blocking_transfers_wait_only_while_the_state_says_so,
    line_settings_round_trip_and_queues_report_levels,
    resize_reaches_the_shim,
    sleep_and_wake_keep_ports_and_sessions,
    needs_reset_recovers_with_the_same_ports,
    without_multiport_the_cap_decays_and_a_wake_brings_port_0_back,
    a_broken_control_queue_recovers_and_hears_the_device_again,
    a_long_port_name_as_qemu_reports_it_is_refused_not_a_fault,
    recoveries_in_a_row_are_capped_and_leave_every_port_withdrawn,
    a_forged_transmit_completion_recovers_and_wakes_the_writer,
    hostile_control_messages_change_nothing,
    null_arguments_and_stale_keys_are_refused,
    remove_add_remove_in_one_batch_withdraws_the_delivered_nub,
    rename_and_readd_in_one_batch_replace_the_nub_once,
    remove_and_add_in_one_batch_republish_under_a_fresh_key,
    add_and_remove_in_one_batch_publish_nothing,
);

/// What the shim's callbacks record: its serial nubs by port id (`fPorts`/`fKeys`, kept by
/// `VirtioConsole.cpp`'s rules), and the rest in order.
struct ShimLog {
    /// For `cbPublish`'s `vcon_port_info`: the functions and the handle (`fDev`, written by
    /// `vcon_create` before its first callback).
    con: ConsoleAbi,
    dev: Cell<*mut VconDevice>,
    nubs: RefCell<BTreeMap<u32, u32>>,
    published: RefCell<Vec<u32>>,
    unpublished: RefCell<Vec<u32>>,
    state_changes: RefCell<Vec<u32>>,
    resized: RefCell<Vec<(u32, u16, u16)>>,
    settles: RefCell<Vec<u32>>,
    /// Publish/unpublish calls the shim cannot carry out as asked (a callback must not
    /// panic: that would abort the test binary); checked after every collection.
    faults: RefCell<Vec<String>>,
}

impl ShimLog {
    fn new(con: ConsoleAbi) -> ShimLog {
        ShimLog {
            con,
            dev: Cell::new(std::ptr::null_mut()),
            nubs: RefCell::default(),
            published: RefCell::default(),
            unpublished: RefCell::default(),
            state_changes: RefCell::default(),
            resized: RefCell::default(),
            settles: RefCell::default(),
            faults: RefCell::default(),
        }
    }
}

fn log(ctx: *mut c_void) -> &'static ShimLog {
    // SAFETY: ctx is the test's ShimLog, alive while the device lives.
    unsafe { &*(ctx as *const ShimLog) }
}

/// `cbPublish`: a key `vcon_port_info` refuses gets no nub; otherwise the nub goes into
/// `fPorts[id]`, where a live one would be overwritten (and its reference leaked).
unsafe extern "C" fn on_publish(ctx: *mut c_void, key: u32) {
    let l = log(ctx);
    let id = key & 0xff;
    // SAFETY: all-zero is a valid VconPortInfo (integers, bools, char arrays).
    let mut info: VconPortInfo = unsafe { std::mem::zeroed() };
    // SAFETY: the live handle, re-entered from its own callback as the shim does.
    if unsafe { (l.con.vcon_port_info)(l.dev.get(), key, &mut info) } != VCON_OK {
        l.faults
            .borrow_mut()
            .push(format!("publish {key:#x}: not a published port, no nub"));
        return;
    }
    if let Some(old) = l.nubs.borrow_mut().insert(id, key) {
        l.faults.borrow_mut().push(format!(
            "publish {key:#x}: port {id} still has nub {old:#x}, overwritten"
        ));
    }
    l.published.borrow_mut().push(key);
}
/// `cbUnpublish`: ignored unless the key is the id's live nub.
unsafe extern "C" fn on_unpublish(ctx: *mut c_void, key: u32) {
    let l = log(ctx);
    let id = key & 0xff;
    let live = l.nubs.borrow().get(&id).copied();
    if live == Some(key) {
        l.nubs.borrow_mut().remove(&id);
        l.unpublished.borrow_mut().push(key);
    } else {
        l.faults.borrow_mut().push(format!(
            "unpublish {key:#x}: port {id}'s nub is {live:x?}, ignored"
        ));
    }
}
unsafe extern "C" fn on_state(ctx: *mut c_void, key: u32) {
    log(ctx).state_changes.borrow_mut().push(key);
}
unsafe extern "C" fn on_resized(ctx: *mut c_void, key: u32, cols: u16, rows: u16) {
    log(ctx).resized.borrow_mut().push((key, cols, rows));
}
unsafe extern "C" fn on_settle(ctx: *mut c_void, ms: u32) {
    log(ctx).settles.borrow_mut().push(ms);
}

/// A control message from the device.
#[derive(Clone, Copy)]
enum Ctl {
    Add(u32),
    Name(u32, &'static str),
    Remove(u32),
}

/// A port the device has: id, name, console, host side connected.
type PortSpec = (u32, Option<&'static str>, bool, bool);

/// The shim's side: the family (transport + nub), the device model, and the device.
struct Rig {
    kexts: Kexts,
    m: ConsoleModel,
    fam: Option<Family>,
    log: Box<ShimLog>,
    dev: *mut VconDevice,
}

impl Rig {
    fn start(
        kexts: Kexts,
        mode: SimMode,
        pref: Preference,
        msix: Option<u16>,
        features: u64,
        ports: &[PortSpec],
    ) -> Rig {
        Rig::start_ring(kexts, mode, pref, msix, features, ports, RING)
    }

    /// As `start`, with the ring feature bits `ring` offered instead of [`RING`].
    fn start_ring(
        kexts: Kexts,
        mode: SimMode,
        pref: Preference,
        msix: Option<u16>,
        features: u64,
        ports: &[PortSpec],
        ring: u64,
    ) -> Rig {
        let nports = 8;
        let mut b = SimBuilder::new(mode, 3)
            .features(features | ring | if mode == SimMode::Legacy { 0 } else { V1 })
            .queues(&cm::queue_sizes(nports, 64))
            .device_config(&cm::config_bytes(80, 25, nports))
            .memory_len(16 << 20);
        if let Some(v) = msix {
            b = b.msix_vectors(v);
        }
        let sim = b.build();
        let mut m = ConsoleModel::new(&sim);
        for &(id, name, console, host_open) in ports {
            m = m.port(id, name, console, host_open);
        }
        let fam = Family::start(kexts.family, &sim, pref).expect("family start");
        let log = Box::new(ShimLog::new(kexts.con));
        let cb = VconCallbacks {
            ctx: (&*log as *const ShimLog).cast_mut().cast(),
            publish: Some(on_publish),
            unpublish: Some(on_unpublish),
            state_changed: Some(on_state),
            resized: Some(on_resized),
            schedule_settle: Some(on_settle),
        };
        // SAFETY: the nub's live handle; the callbacks' context outlives the device; the
        // handle goes where the callbacks read it.
        let s = unsafe { (kexts.con.vcon_create)(fam.client_handle(), &cb, log.dev.as_ptr()) };
        assert_eq!(s, VCON_OK);
        let dev = log.dev.get();
        assert!(!dev.is_null());
        let mut r = Rig {
            kexts,
            m,
            fam: Some(fam),
            log,
            dev,
        };
        r.pump();
        r
    }

    fn qemu(kexts: Kexts, ports: &[PortSpec]) -> Rig {
        Rig::start(
            kexts,
            SimMode::Modern,
            Preference::Modern,
            Some(4),
            QEMU,
            ports,
        )
    }

    /// As `qemu` with port 0 only, offering INDIRECT_DESC without EVENT_IDX: every buffer
    /// is kicked and every completion interrupts.
    fn qemu_without_event_idx(kexts: Kexts) -> Rig {
        Rig::start_ring(
            kexts,
            SimMode::Modern,
            Preference::Modern,
            Some(4),
            QEMU,
            &[(0, None, true, true)],
            1 << 28,
        )
    }

    fn fam(&self) -> &Family {
        self.fam.as_ref().unwrap()
    }

    /// The device answers the guest's control messages (like QEMU) and the family delivers
    /// interrupts, until both are quiet; then the shim's nubs are checked.
    fn pump(&mut self) {
        for _ in 0..16 {
            let msgs = if self.m.is_multiport() {
                self.m.process().unwrap().len()
            } else {
                0
            };
            if self.fam().interrupts() == 0 && msgs == 0 {
                self.check_nubs();
                return;
            }
        }
        panic!("the device and the driver never went quiet");
    }

    /// The device sends `msgs` before the driver hears of any: one interrupt handles them
    /// all, and the shim gets their publish/unpublish calls together.
    fn batch(&mut self, msgs: &[Ctl]) {
        for &c in msgs {
            match c {
                Ctl::Add(id) => self.m.add_port(id),
                Ctl::Name(id, name) => self.m.send(id, cm::PORT_NAME, 1, name.as_bytes()),
                Ctl::Remove(id) => self.m.remove_port(id),
            }
            .unwrap();
        }
        self.pump();
    }

    /// What the callbacks left the shim with: every call carried out as asked, and a nub
    /// for each published port and for nothing else.
    fn check_nubs(&self) {
        let faults = std::mem::take(&mut *self.log.faults.borrow_mut());
        assert!(faults.is_empty(), "the shim was misled: {faults:#?}");
        let nubs = self.log.nubs.borrow().clone();
        for (&id, &key) in &nubs {
            assert_eq!(
                self.info(key).map(|i| i.id),
                Ok(id),
                "port {id}'s nub {key:#x} is not a published port"
            );
        }
        assert_eq!(
            self.stats().ports,
            nubs.len() as u64,
            "a published port has no nub: nubs {nubs:x?}"
        );
    }

    /// The shim's settle timer fires.
    fn settle(&mut self) {
        // SAFETY: live handle.
        unsafe { (self.kexts.con.vcon_settle)(self.dev) };
        self.pump();
    }

    fn key(&self, id: u32) -> u32 {
        *self
            .log
            .nubs
            .borrow()
            .get(&id)
            .unwrap_or_else(|| panic!("port {id} is not published"))
    }

    fn info(&self, key: u32) -> Result<VconPortInfo, i32> {
        // SAFETY: all-zero is a valid VconPortInfo (integers, bools, char arrays).
        let mut i: VconPortInfo = unsafe { std::mem::zeroed() };
        // SAFETY: live handle, local out-pointer.
        match unsafe { (self.kexts.con.vcon_port_info)(self.dev, key, &mut i) } {
            VCON_OK => Ok(i),
            e => Err(e),
        }
    }

    /// `/dev/tty.<base><suffix>` as IOSerialBSDClient names it.
    fn tty(&self, id: u32) -> String {
        let i = self.info(self.key(id)).unwrap();
        // SAFETY: NUL-terminated by the crate (checked: the arrays end in 0).
        let base = unsafe { CStr::from_ptr(i.base_name.as_ptr()) };
        // SAFETY: as above.
        let suffix = unsafe { CStr::from_ptr(i.suffix.as_ptr()) };
        format!(
            "/dev/tty.{}{}",
            base.to_str().unwrap(),
            suffix.to_str().unwrap()
        )
    }

    fn acquire(&self, key: u32) -> i32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.con.vcon_port_acquire)(self.dev, key) }
    }

    fn release(&self, key: u32) -> i32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.con.vcon_port_release)(self.dev, key) }
    }

    fn execute(&self, key: u32, event: u32, data: u32) -> i32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.con.vcon_port_execute_event)(self.dev, key, event, data) }
    }

    fn request(&self, key: u32, event: u32) -> Result<u32, i32> {
        let mut v = 0;
        // SAFETY: live handle, local out-pointer.
        match unsafe { (self.kexts.con.vcon_port_request_event)(self.dev, key, event, &mut v) } {
            VCON_OK => Ok(v),
            e => Err(e),
        }
    }

    fn state(&self, key: u32) -> u32 {
        // SAFETY: live handle.
        unsafe { (self.kexts.con.vcon_port_get_state)(self.dev, key) }
    }

    fn watch(&self, key: u32, want: u32, mask: u32) -> (i32, u32) {
        let mut s = want;
        // SAFETY: live handle, local in/out-pointer.
        let r = unsafe { (self.kexts.con.vcon_port_watch_state)(self.dev, key, &mut s, mask) };
        (r, s)
    }

    /// What a tty open does: acquire, then PD_E_ACTIVE.
    fn open(&mut self, id: u32) -> u32 {
        let key = self.key(id);
        assert_eq!(self.acquire(key), VCON_OK);
        assert_eq!(self.execute(key, pd::E_ACTIVE, 1), VCON_OK);
        self.pump();
        key
    }

    fn write(&self, key: u32, data: &[u8]) -> (i32, u32) {
        let mut n = u32::MAX;
        // SAFETY: live handle; `data` holds `data.len()` bytes; `n` is a local.
        let r = unsafe {
            (self.kexts.con.vcon_port_enqueue_data)(
                self.dev,
                key,
                data.as_ptr(),
                data.len() as u32,
                &mut n,
            )
        };
        (r, n)
    }

    fn read(&self, key: u32, size: usize, min: u32) -> (i32, Vec<u8>) {
        let mut buf = vec![0u8; size];
        let mut n = u32::MAX;
        // SAFETY: live handle; `buf` holds `size` bytes; `n` is a local.
        let r = unsafe {
            (self.kexts.con.vcon_port_dequeue_data)(
                self.dev,
                key,
                buf.as_mut_ptr(),
                size as u32,
                &mut n,
                min,
            )
        };
        buf.truncate(n as usize);
        (r, buf)
    }

    /// Reads until nothing is left.
    fn read_all(&self, key: u32) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let (r, b) = self.read(key, 300, 0);
            assert_eq!(r, VCON_OK);
            if b.is_empty() {
                return out;
            }
            out.extend_from_slice(&b);
        }
    }

    fn stats(&self) -> VconStats {
        let mut s = VconStats::default();
        // SAFETY: live handle, local out-pointer.
        let st = unsafe { (self.kexts.con.vcon_stats)(self.dev, &mut s) };
        assert_eq!(st, VCON_OK);
        s
    }

    /// Guest PORT_OPEN messages for `id` so far (their values).
    fn port_opens(&self, id: u32) -> Vec<u16> {
        self.m
            .guest_messages()
            .iter()
            .filter(|g| g.id == id && g.event == cm::PORT_OPEN)
            .map(|g| g.value)
            .collect()
    }

    /// `stop` then `free`, then the family stops: every DMA region must be back (and, for
    /// loaded kexts, every kernel allocation); every port was withdrawn.
    fn unload(mut self) {
        // SAFETY: live handle, not used after destroy.
        unsafe {
            (self.kexts.con.vcon_stop)(self.dev);
            (self.kexts.con.vcon_destroy)(self.dev);
        }
        assert!(
            self.log.nubs.borrow().is_empty(),
            "stop withdraws every port"
        );
        assert_eq!(self.m.sim.status(), 0, "stop leaves the device reset");
        self.fam.take().unwrap().stop();
        assert!(
            self.m.sim.bad_accesses().is_empty(),
            "{:?}",
            self.m.sim.bad_accesses()
        );
    }
}

fn one_port_without_multiport_in_every_mode(kexts: Kexts) {
    for (mode, pref) in MODES {
        for msix in [None, Some(3)] {
            let what = format!("{mode:?}/{pref:?}/msix {msix:?}");
            let mut r = Rig::start(kexts, mode, pref, msix, F_EMERG_WRITE | F_SIZE, &[]);
            // The banner went out through EMERG_WRITE before DRIVER_OK.
            let banner = String::from_utf8(r.m.emergency_bytes()).unwrap();
            assert!(
                banner.starts_with("VirtioConsole: starting: features"),
                "{what}: {banner:?}"
            );
            assert_eq!(r.log.published.borrow().len(), 1, "{what}: port 0 at once");
            assert_eq!(r.tty(0), "/dev/tty.virtio", "{what}");
            let info = r.info(r.key(0)).unwrap();
            assert!(
                info.host_open,
                "{what}: no control queue: carrier always up"
            );
            assert_eq!(
                (info.has_size, info.cols, info.rows),
                (true, 80, 25),
                "{what}"
            );
            let key = r.open(0);
            assert!(
                r.port_opens(0).is_empty(),
                "{what}: no PORT_OPEN without MULTIPORT"
            );
            assert_eq!(r.write(key, b"login: "), (VCON_OK, 7), "{what}");
            assert_eq!(r.m.take_tx(0), b"login: ", "{what}");
            r.pump();
            // Typed on the host: the interrupt wakes the port's sleepers.
            r.log.state_changes.borrow_mut().clear();
            r.m.inject_rx(0, b"root\r").unwrap();
            r.pump();
            assert!(r.log.state_changes.borrow().contains(&key), "{what}");
            assert_eq!(r.state(key) & pd::S_RXQ_EMPTY, 0, "{what}");
            assert_eq!(r.read(key, 64, 1), (VCON_OK, b"root\r".to_vec()), "{what}");
            assert_ne!(r.state(key) & pd::S_RXQ_EMPTY, 0, "{what}");
            // Nothing left: a reader wanting one byte sleeps.
            assert_eq!(r.read(key, 64, 1), (VCON_WAIT, vec![]), "{what}");
            assert_eq!(r.release(key), VCON_OK, "{what}");
            let s = r.stats();
            assert_eq!((s.tx_bytes, s.rx_bytes), (7, 5), "{what}");
            assert!(s.emergency_bytes >= banner.len() as u64, "{what}");
            r.unload();
        }
    }
}

fn ports_are_published_by_name_as_the_device_adds_them(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[
            (0, None, true, true),
            (1, Some("org.qemu.guest_agent.0"), false, true),
            (2, None, false, false),
            (3, Some("my tool/1"), false, false),
        ],
    );
    // Port 0 at PORT_ADD; the named ports once PORT_NAME arrived (after PORT_READY);
    // port 2 has no name and waits for the settle time.
    assert_eq!(r.tty(0), "/dev/tty.virtio");
    assert_eq!(r.tty(1), "/dev/tty.org.qemu.guest_agent.0");
    assert_eq!(r.tty(3), "/dev/tty.my_tool_1", "unsafe characters replaced");
    assert!(!r.log.nubs.borrow().contains_key(&2));
    assert_eq!(*r.log.settles.borrow().last().unwrap(), VCON_SETTLE_MS);
    r.settle();
    assert_eq!(r.tty(2), "/dev/tty.virtio2");
    assert_eq!(
        r.log.published.borrow().len(),
        4,
        "each port published once"
    );
    let info = r.info(r.key(0)).unwrap();
    assert!(info.console && info.host_open && !info.guest_open);
    let info3 = r.info(r.key(3)).unwrap();
    // SAFETY: NUL-terminated by the crate.
    let raw = unsafe { CStr::from_ptr(info3.port_name.as_ptr()) };
    assert_eq!(raw.to_str().unwrap(), "my tool/1", "PORT_NAME as sent");
    assert!(!info3.host_open);
    assert_eq!(r.stats().ports, 4);
    r.unload();
}

fn hot_plug_withdraws_and_publishes_with_fresh_keys(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[(0, None, true, true), (1, Some("org.test.a"), false, true)],
    );
    let old = r.open(1);
    // The host unplugs port 1 while a session has it open: the nub is withdrawn, its
    // sleepers wake, and every later call on its key is offline.
    r.log.state_changes.borrow_mut().clear();
    r.m.remove_port(1).unwrap();
    r.pump();
    assert_eq!(*r.log.unpublished.borrow(), vec![old]);
    assert!(r.log.state_changes.borrow().contains(&old));
    assert_eq!(r.write(old, b"x"), (VCON_E_OFFLINE, 0));
    assert_eq!(r.read(old, 8, 1).0, VCON_E_OFFLINE);
    assert_eq!(r.watch(old, 0, pd::S_RXQ_EMPTY).0, VCON_E_OFFLINE);
    assert_eq!(r.release(old), VCON_E_OFFLINE);
    // Plugged in again, named differently: a new key, the old one stays dead.
    r.m.ports.get_mut(&1).unwrap().name = Some("org.test.b".into());
    r.m.add_port(1).unwrap();
    r.pump();
    let new = r.key(1);
    assert_ne!(new, old);
    assert_eq!(r.tty(1), "/dev/tty.org.test.b");
    assert_eq!(r.acquire(old), VCON_E_OFFLINE);
    assert_eq!(r.acquire(new), VCON_OK);
    // A second port appears at run time.
    r.m.ports.insert(
        5,
        cm::ModelPort {
            name: Some("late".into()),
            ..Default::default()
        },
    );
    r.m.add_port(5).unwrap();
    r.pump();
    assert_eq!(r.tty(5), "/dev/tty.late");
    r.unload();
}

fn open_and_close_reach_the_host_and_carrier_follows_it(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[
            (0, None, true, false),
            (1, Some("org.test.tool"), false, false),
        ],
    );
    let key = r.open(1);
    assert_eq!(r.port_opens(1), vec![1], "PD_E_ACTIVE → PORT_OPEN 1");
    assert_eq!(r.request(key, pd::E_ACTIVE), Ok(1));
    // /dev/tty.* waits for carrier: the host side is not connected yet.
    assert_eq!(r.state(key) & pd::RS232_S_CAR, 0);
    assert_eq!(r.watch(key, pd::RS232_S_CAR, pd::RS232_S_CAR).0, VCON_WAIT);
    r.log.state_changes.borrow_mut().clear();
    r.m.host_open(1, true).unwrap();
    r.pump();
    assert!(
        r.log.state_changes.borrow().contains(&key),
        "the waiter is woken"
    );
    let (st, word) = r.watch(key, pd::RS232_S_CAR, pd::RS232_S_CAR);
    assert_eq!(st, VCON_OK);
    assert_ne!(word & pd::RS232_S_CAR, 0);
    assert_ne!(word & (pd::S_ACQUIRED | pd::S_ACTIVE), 0);
    // A reader waiting for data wakes with an error when the port is closed under it.
    assert_eq!(r.watch(key, 0, pd::S_RXQ_EMPTY).0, VCON_WAIT);
    assert_eq!(r.execute(key, pd::E_ACTIVE, 0), VCON_OK);
    assert_eq!(r.watch(key, 0, pd::S_RXQ_EMPTY).0, VCON_E_INACTIVE);
    assert_eq!(r.read(key, 8, 1).0, VCON_E_INACTIVE);
    assert_eq!(r.write(key, b"x").0, VCON_E_NOT_OPEN);
    r.pump();
    assert_eq!(r.port_opens(1), vec![1, 0], "PD_E_ACTIVE 0 → PORT_OPEN 0");
    // Reopened, then released while active: release closes it on the host side too.
    assert_eq!(r.execute(key, pd::E_ACTIVE, 1), VCON_OK);
    assert_eq!(r.release(key), VCON_OK);
    r.pump();
    assert_eq!(r.port_opens(1), vec![1, 0, 1, 0]);
    // One session at a time.
    assert_eq!(r.acquire(key), VCON_OK);
    assert_eq!(r.acquire(key), VCON_E_BUSY);
    r.m.host_open(1, false).unwrap();
    r.pump();
    assert_eq!(
        r.state(key) & pd::RS232_S_CAR,
        0,
        "carrier follows the host"
    );
    r.unload();
}

fn flow_control_is_the_rings_backpressure(kexts: Kexts) {
    let mut r = Rig::qemu(kexts, &[(0, None, true, true)]);
    let key = r.open(0);
    let cap = r.request(key, pd::E_TXQ_SIZE).unwrap();
    assert_eq!(cap, 8 * 1024, "8 transmit slots of 1 KiB");
    // The host stops reading: writes fill the slots, then report a partial count.
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    let (st, n) = r.write(key, &big);
    assert_eq!((st, n), (VCON_WAIT, cap), "what fit, and wait for the rest");
    let s = r.state(key);
    assert_ne!(s & pd::S_TXQ_FULL, 0);
    assert_eq!(s & pd::S_TXQ_EMPTY, 0);
    assert_eq!(r.request(key, pd::E_TXQ_AVAILABLE), Ok(0));
    assert_eq!(r.write(key, &big[n as usize..]), (VCON_WAIT, 0));
    let held = r.m.hold_tx(0);
    // The host reads: the transmit interrupt wakes the writer, the queue is empty again.
    r.log.state_changes.borrow_mut().clear();
    let chains: Vec<_> = held.iter().map(|(c, _)| c.clone()).collect();
    r.m.complete_tx(0, &chains);
    r.pump();
    assert!(r.log.state_changes.borrow().contains(&key));
    assert_ne!(r.state(key) & pd::S_TXQ_EMPTY, 0);
    let mut sent: Vec<u8> = held.into_iter().flat_map(|(_, b)| b).collect();
    let mut off = n as usize;
    for _ in 0..10 {
        if off == big.len() {
            break;
        }
        let (_, k) = r.write(key, &big[off..]);
        off += k as usize;
        sent.extend(r.m.take_tx(0));
        r.pump();
    }
    assert_eq!(sent, big, "every byte once, in order");
    // Receive: buffers go back to the device only as the tty reads; what the device could
    // not place waits on the host side.
    let bufs = r.m.rx_buffers(0);
    assert_eq!(bufs, 8);
    let incoming: Vec<u8> = (0..8 * 1024u32).map(|i| (i % 241) as u8).collect();
    r.m.inject_rx(0, &incoming).unwrap();
    r.pump();
    assert!(
        r.m.inject_rx(0, b"more").is_err(),
        "no buffer left: the host waits"
    );
    assert_eq!(r.request(key, pd::E_RXQ_AVAILABLE), Ok(8 * 1024));
    let (st, first) = r.read(key, 1500, 1);
    assert_eq!(st, VCON_OK);
    assert_eq!(first, incoming[..1500]);
    assert_eq!(
        r.m.rx_buffers(0),
        1,
        "the buffer read is back with the device"
    );
    let rest = r.read_all(key);
    assert_eq!([first, rest].concat(), incoming);
    assert_eq!(r.m.rx_buffers(0), 8);
    // A flush drops what the tty did not read.
    r.m.inject_rx(0, b"stale").unwrap();
    r.pump();
    assert_eq!(r.execute(key, pd::E_RXQ_FLUSH, 0), VCON_OK);
    assert_eq!(r.read(key, 8, 0), (VCON_OK, vec![]));
    r.unload();
}

/// A device that answers as soon as it is notified: completions arrive while
/// `vcon_port_enqueue_data` / `vcon_port_dequeue_data` run, and their `refresh` collects
/// them, changing the state word while nobody sleeps. A blocking caller told to wait then
/// would sleep until the next change of the word, which the next interrupt (finding
/// nothing new) does not bring. So VCON_WAIT comes only while the word says TXQ_FULL (write)
/// or RXQ_EMPTY (read); otherwise the call goes on.
fn blocking_transfers_wait_only_while_the_state_says_so(kexts: Kexts) {
    use std::sync::{Arc, Mutex};
    // Without EVENT_IDX every buffer is kicked (the model does not move avail_event), so
    // the device sees each one at once.
    let mut r = Rig::qemu_without_event_idx(kexts);
    let key = r.open(0);
    let (tx, rx) = (cm::tx_queue(0), cm::rx_queue(0));
    let sent = Arc::new(Mutex::new(Vec::new()));
    // Receive buffers the device fills (1 KiB each) as soon as they are posted again.
    let refills = Arc::new(Mutex::new(0usize));
    let (sent_by_hook, refills_by_hook) = (Arc::clone(&sent), Arc::clone(&refills));
    let chunk: Vec<u8> = (0..1024u32).map(|i| (i % 239) as u8).collect();
    let fill = chunk.clone();
    r.m.sim.on_notify(Some(Arc::new(move |sim, queue| {
        if queue == tx {
            sim.serve(tx, |c| {
                sent_by_hook.lock().unwrap().extend(sim.read_chain(c));
                0
            });
        } else if queue == rx {
            let mut left = refills_by_hook.lock().unwrap();
            for c in sim.pop_chains(rx) {
                if *left == 0 {
                    break;
                }
                *left -= 1;
                let n = sim.write_chain(&c, &fill);
                sim.complete(rx, c.head, n);
            }
            sim.signal_used(rx);
        }
    })));

    // A 10 KiB write: 8 KiB fit the slots, the device takes them at the kick, and the rest
    // goes in the same call.
    let big: Vec<u8> = (0..10 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (st, n) = r.write(key, &big);
    assert!(
        st != VCON_WAIT || r.state(key) & pd::S_TXQ_FULL != 0,
        "told to wait with room in the ring ({n} of {} written)",
        big.len()
    );
    assert_eq!((st, n), (VCON_OK, big.len() as u32));
    assert_eq!(*sent.lock().unwrap(), big);
    r.pump();

    // A read of at least 2 KiB with 1 KiB there: the buffer it frees is posted again and
    // filled at once; that data is read in the same call.
    r.m.inject_rx(0, &chunk).unwrap();
    r.pump();
    *refills.lock().unwrap() = 4;
    let (st, got) = r.read(key, 4096, 2048);
    assert!(
        st != VCON_WAIT || r.state(key) & pd::S_RXQ_EMPTY != 0,
        "told to wait with data there ({} of 2048 read)",
        got.len()
    );
    assert_eq!(st, VCON_OK);
    assert!(got.len() >= 2048, "{}", got.len());
    assert_eq!(got, [chunk.clone(), chunk.clone()].concat()[..got.len()]);
    r.m.sim.on_notify(None);
    r.pump();
    r.unload();
}

fn line_settings_round_trip_and_queues_report_levels(kexts: Kexts) {
    let mut r = Rig::qemu(kexts, &[(0, None, true, true)]);
    let key = r.key(0);
    assert_eq!(r.request(key, pd::E_DATA_RATE), Err(VCON_E_NOT_OPEN));
    assert_eq!(r.acquire(key), VCON_OK);
    assert_eq!(r.request(key, pd::E_DATA_RATE), Ok(115_200 << 1));
    assert_eq!(r.execute(key, pd::E_DATA_RATE, 9600 << 1), VCON_OK);
    assert_eq!(r.request(key, pd::E_DATA_RATE), Ok(9600 << 1));
    assert_eq!(r.execute(key, pd::E_FLOW_CONTROL, 0x44), VCON_OK);
    assert_eq!(r.request(key, pd::E_FLOW_CONTROL), Ok(0x44));
    assert_eq!(r.execute(key, 0x7fff_ff03, 0), VCON_E_BAD_ARGUMENT);
    // setState: enable bits and DTR are the client's; the queue bits are the ring's.
    // SAFETY: live handle.
    let st = unsafe {
        (r.kexts.con.vcon_port_set_state)(
            r.dev,
            key,
            !0,
            pd::S_TX_ENABLE | pd::RS232_S_DTR | pd::S_TXQ_FULL,
        )
    };
    assert_eq!(st, VCON_OK);
    let s = r.state(key);
    assert_ne!(s & (pd::S_TX_ENABLE | pd::RS232_S_DTR), 0);
    assert_eq!(s & pd::S_TXQ_FULL, 0, "the ring decides TXQ_FULL");
    assert_ne!(s & pd::S_TXQ_EMPTY, 0);
    // SAFETY: live handle.
    let bad = unsafe { (r.kexts.con.vcon_port_set_state)(r.dev, key, 0, pd::S_ACTIVE) };
    assert_eq!(bad, VCON_E_BAD_ARGUMENT);
    // SAFETY: live handle.
    let event = unsafe { (r.kexts.con.vcon_port_next_event)(r.dev, key) };
    assert_eq!(event, 0, "EOQ");
    // A new session starts from the defaults.
    assert_eq!(r.release(key), VCON_OK);
    assert_eq!(r.acquire(key), VCON_OK);
    assert_eq!(r.request(key, pd::E_DATA_RATE), Ok(115_200 << 1));
    r.pump();
    r.unload();
}

fn resize_reaches_the_shim(kexts: Kexts) {
    // MULTIPORT: RESIZE control messages.
    let mut r = Rig::qemu(kexts, &[(0, None, true, true), (1, Some("t"), false, true)]);
    let k1 = r.key(1);
    r.m.resize(1, 132, 43).unwrap();
    r.pump();
    assert_eq!(*r.log.resized.borrow(), vec![(k1, 132, 43)]);
    let i = r.info(k1).unwrap();
    assert_eq!((i.has_size, i.cols, i.rows), (true, 132, 43));
    r.unload();
    // SIZE without MULTIPORT: a config change resizes port 0.
    let mut r = Rig::start(
        kexts,
        SimMode::Modern,
        Preference::Modern,
        Some(3),
        F_SIZE,
        &[],
    );
    let k0 = r.key(0);
    r.m.set_size(100, 30);
    r.pump();
    assert_eq!(*r.log.resized.borrow(), vec![(k0, 100, 30)]);
    r.unload();
}

fn sleep_and_wake_keep_ports_and_sessions(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[
            (0, None, true, true),
            (1, Some("org.test.tool"), false, true),
            (2, Some("gone"), false, true),
        ],
    );
    let k1 = r.open(1);
    let k2 = r.key(2);
    let dma_awake = r.fam().live_dma();
    // SAFETY: live handle.
    assert_eq!(unsafe { (r.kexts.con.vcon_suspend)(r.dev) }, VCON_OK);
    assert_eq!(r.m.sim.status(), 0, "sleep resets the device");
    assert_eq!(
        r.fam().live_dma(),
        dma_awake - (dma_awake - r.fam().live_dma())
    );
    assert_eq!(
        r.write(k1, b"zz"),
        (VCON_WAIT, 0),
        "asleep: the writer waits"
    );
    assert_eq!(r.read(k1, 8, 1).0, VCON_WAIT);
    r.log.state_changes.borrow_mut().clear();
    // While asleep the host drops port 2.
    r.m.ports.remove(&2);
    r.m.device_ready = None;
    let before = r.port_opens(1).len();
    // SAFETY: live handle.
    assert_eq!(unsafe { (r.kexts.con.vcon_resume)(r.dev) }, VCON_OK);
    r.pump();
    assert_eq!(
        r.m.device_ready,
        Some(1),
        "DEVICE_READY again after the wake"
    );
    assert_eq!(r.key(1), k1, "same nub, same key");
    assert!(
        r.log.state_changes.borrow().contains(&k1),
        "the port is back: the writer and reader told to wait while it was away are woken"
    );
    assert_eq!(
        &r.port_opens(1)[before..],
        &[1],
        "the open session is reopened"
    );
    assert_eq!(r.write(k1, b"after"), (VCON_OK, 5));
    assert_eq!(r.m.take_tx(1), b"after");
    // Port 2 did not come back: withdrawn at the settle time.
    assert!(r.log.nubs.borrow().contains_key(&2));
    r.settle();
    assert!(!r.log.nubs.borrow().contains_key(&2));
    assert!(r.log.unpublished.borrow().contains(&k2));
    assert_eq!(r.stats().suspends, 1);
    r.unload();
}

/// Without MULTIPORT the recovery count decays the same way (each recovery schedules the
/// settles that time it), and a wake after the device was left down publishes port 0
/// again: it is the device's only port, and no PORT_ADD will bring it back.
fn without_multiport_the_cap_decays_and_a_wake_brings_port_0_back(kexts: Kexts) {
    let mut r = Rig::start(
        kexts,
        SimMode::Modern,
        Preference::Modern,
        Some(3),
        F_EMERG_WRITE,
        &[],
    );
    let needs_reset = |r: &mut Rig| {
        r.m.sim.trigger_needs_reset();
        r.pump();
    };
    // Isolated faults, each followed by a device that stays up: never given up on.
    for n in 1..=2 * u64::from(VCON_MAX_RECOVERIES) {
        let scheduled = r.log.settles.borrow().len();
        needs_reset(&mut r);
        assert_eq!(r.stats().recoveries, n);
        assert!(
            r.log.settles.borrow().len() > scheduled,
            "fault {n}: the recovery schedules the settles that time it"
        );
        assert_eq!(r.stats().ports, 1, "fault {n}: port 0 stays");
        for _ in 0..VCON_STABLE_SETTLES {
            r.settle();
        }
    }
    // Faults in a row: left down.
    for _ in 0..=VCON_MAX_RECOVERIES {
        needs_reset(&mut r);
    }
    assert_eq!(r.stats().ports, 0, "left down, port 0 withdrawn");
    // SAFETY: live handle.
    assert_eq!(unsafe { (r.kexts.con.vcon_suspend)(r.dev) }, VCON_OK);
    // SAFETY: live handle.
    assert_eq!(unsafe { (r.kexts.con.vcon_resume)(r.dev) }, VCON_OK);
    r.pump();
    assert_eq!(r.stats().ports, 1, "the wake brings port 0 back");
    let k0 = r.open(0);
    assert_eq!(r.write(k0, b"back"), (VCON_OK, 4));
    assert_eq!(r.m.take_tx(0), b"back");
    r.unload();
}

fn needs_reset_recovers_with_the_same_ports(kexts: Kexts) {
    let mut r = Rig::qemu(kexts, &[(0, None, true, true), (1, Some("t"), false, true)]);
    let k1 = r.open(1);
    r.m.sim.trigger_needs_reset();
    r.m.device_ready = None;
    r.pump();
    assert_eq!(r.stats().recoveries, 1);
    assert_eq!(r.m.device_ready, Some(1), "brought up again");
    assert_eq!(r.key(1), k1);
    assert_eq!(r.write(k1, b"ok"), (VCON_OK, 2));
    assert_eq!(r.m.take_tx(1), b"ok");
    r.unload();
}

/// A device that breaks the control receive queue (a used length beyond the 256-byte
/// buffer, an id that is not in flight; the bus marks the queue broken) is reset as for a
/// data queue's fault: the ports stay published with their sessions, and what the device
/// says next (PORT_ADD of port 2) is heard, and answered.
fn a_broken_control_queue_recovers_and_hears_the_device_again(kexts: Kexts) {
    // An id out of range breaks the queue (twice: the second device, for a fresh rig); a
    // used length beyond the buffer does not (it is not read on the control queue: QEMU
    // reports the whole message length however much fit).
    for id in [0xffff, 0x1_0000] {
        let mut r = Rig::qemu(kexts, &[(0, None, true, true), (1, Some("t"), false, true)]);
        assert_eq!(r.m.device_ready, Some(1));
        let k1 = r.open(1);
        r.m.device_ready = None;
        r.m.sim.complete_raw(cm::CONTROL_RX, id, 8);
        r.m.sim.signal_used(cm::CONTROL_RX);
        // The queue's interrupt may be suppressed (EVENT_IDX counts raw entries apart):
        // the driver finds the entry at its next interrupt.
        r.m.sim.raise_config_interrupt();
        r.pump();
        assert_eq!(r.stats().recoveries, 1, "id {id}");
        assert_eq!(r.m.device_ready, Some(1), "id {id}: brought up again");
        r.m.add_port(2).unwrap();
        r.pump();
        r.settle();
        assert_eq!(r.tty(2), "/dev/tty.virtio2", "id {id}");
        assert!(
            r.m.guest_messages()
                .iter()
                .any(|g| g.id == 2 && g.event == cm::PORT_READY && g.value == 1),
            "id {id}: PORT_READY for port 2"
        );
        // The session on port 1 survived; the host hears it open again.
        assert_eq!(r.key(1), k1, "id {id}");
        assert_eq!(r.port_opens(1).last(), Some(&1), "id {id}");
        assert_eq!(r.write(k1, b"ok"), (VCON_OK, 2), "id {id}");
        assert_eq!(r.m.take_tx(1), b"ok", "id {id}");
        assert_eq!(r.stats().recoveries, 1, "id {id}");
        r.unload();
    }
    let mut r = Rig::qemu(kexts, &[(0, None, true, true), (1, Some("t"), false, true)]);
    r.m.send_raw(&cm::control_bytes(1, cm::PORT_OPEN, 0, &[]), Some(300))
        .unwrap();
    r.pump();
    assert_eq!(r.stats().recoveries, 0, "used length 300");
    assert!(
        !r.info(r.key(1)).unwrap().host_open,
        "the PORT_OPEN 0 was heard"
    );
    r.unload();
}

/// QEMU's `send_control_msg` copies what fits in the 256-byte control buffer and completes
/// it with the whole length: a port named with 300 characters arrives as a PORT_NAME with
/// used length 309 on every bring-up. The name is refused (the port is published unnamed
/// after the settle time), the control queue carries on, nothing is reset.
fn a_long_port_name_as_qemu_reports_it_is_refused_not_a_fault(kexts: Kexts) {
    let long: &'static str = Box::leak("n".repeat(300).into_boxed_str());
    let mut r = Rig::qemu(
        kexts,
        &[(0, None, true, true), (1, Some(long), false, true)],
    );
    r.settle();
    let s = r.stats();
    assert_eq!(s.recoveries, 0);
    assert!(s.control_rejected >= 1, "{s:?}");
    assert_eq!(r.tty(1), "/dev/tty.virtio1");
    // The control queue still works: the host opens port 1, a new port is added.
    r.m.host_open(1, false).unwrap();
    r.m.add_port(2).unwrap();
    r.pump();
    r.settle();
    assert!(!r.info(r.key(1)).unwrap().host_open);
    assert_eq!(r.tty(2), "/dev/tty.virtio2");
    let key = r.open(0);
    assert_eq!(r.write(key, b"still here"), (VCON_OK, 10));
    assert_eq!(r.m.take_tx(0), b"still here");
    assert_eq!(r.stats().recoveries, 0);
    r.unload();
}

/// Breaks the control queue (a used id out of range), found by the next interrupt or, with
/// `at_settle`, by the settle.
fn break_control(r: &mut Rig, at_settle: bool) {
    r.m.sim.complete_raw(cm::CONTROL_RX, 0xffff, 8);
    if at_settle {
        r.settle();
    } else {
        r.m.sim.signal_used(cm::CONTROL_RX);
        r.m.sim.raise_config_interrupt();
        r.pump();
    }
}

/// A device that breaks the control queue on every bring-up is recovered
/// `VCON_MAX_RECOVERIES` times in a row, then left down: every port withdrawn, sessions
/// asleep on them woken (and told the port is gone), no more resets. A device that stays
/// up for `VCON_STABLE_SETTLES` settle times after a recovery starts the count afresh; one
/// that faults again sooner does not.
fn recoveries_in_a_row_are_capped_and_leave_every_port_withdrawn(kexts: Kexts) {
    for at_settle in [false, true] {
        let what = format!("fault found at settle {at_settle}");
        let mut r = Rig::qemu(kexts, &[(0, None, true, true), (1, Some("t"), false, true)]);
        let (k0, k1) = (r.key(0), r.open(1));
        // One fault, then the device stays up for VCON_STABLE_SETTLES settles: forgotten.
        break_control(&mut r, at_settle);
        for _ in 0..VCON_STABLE_SETTLES {
            r.settle();
        }
        assert_eq!(r.stats().recoveries, 1, "{what}");
        // A reader asleep on port 1 (nothing received).
        assert_eq!(r.read(k1, 16, 1), (VCON_WAIT, vec![]), "{what}");
        for n in 1..=VCON_MAX_RECOVERIES {
            // Up for a while, not long enough: still in a row.
            for _ in 1..VCON_STABLE_SETTLES - 1 {
                r.settle();
            }
            r.m.device_ready = None;
            break_control(&mut r, at_settle);
            assert_eq!(r.stats().recoveries, 1 + u64::from(n), "{what}");
            assert_eq!(r.m.device_ready, Some(1), "{what}: brought up again");
            assert_eq!(r.key(1), k1, "{what}: port 1 came back");
        }
        r.log.state_changes.borrow_mut().clear();
        r.m.device_ready = None;
        let status = r.m.sim.status();
        break_control(&mut r, at_settle);
        let s = r.stats();
        assert_eq!(s.recoveries, 1 + u64::from(VCON_MAX_RECOVERIES), "{what}");
        assert_eq!(r.m.device_ready, None, "{what}: not brought up again");
        assert_ne!(r.m.sim.status(), status, "{what}: the device was reset");
        assert_eq!(s.ports, 0, "{what}: every port withdrawn");
        assert!(r.log.nubs.borrow().is_empty(), "{what}");
        let unpublished = r.log.unpublished.borrow().clone();
        assert!(
            unpublished.ends_with(&[k0, k1]) || unpublished.ends_with(&[k1, k0]),
            "{what}: {unpublished:x?}"
        );
        assert!(
            r.log.state_changes.borrow().contains(&k1),
            "{what}: the reader on port 1 is woken"
        );
        assert_eq!(r.read(k1, 16, 1).0, VCON_E_OFFLINE, "{what}");
        // Nothing more happens: no interrupt source, settles do nothing.
        r.m.sim.raise_config_interrupt();
        r.pump();
        r.settle();
        r.settle();
        assert_eq!(r.stats().recoveries, s.recoveries, "{what}");
        assert_eq!(r.stats().ports, 0, "{what}");
        r.unload();
    }
}

/// A device that answers the first transmit with a used id that is not in flight breaks
/// the transmit queue while the writer waits for room (TXQ_FULL): the transmit interrupt
/// finds the fault while computing the state word, the device is recovered once, and the
/// writer is woken when port 0 comes back and writes the rest.
fn a_forged_transmit_completion_recovers_and_wakes_the_writer(kexts: Kexts) {
    // Without EVENT_IDX the transmit queue's interrupt is never suppressed.
    let mut r = Rig::qemu_without_event_idx(kexts);
    let key = r.open(0);
    let data = vec![b'x'; 10 * 1024];
    let (st, n) = r.write(key, &data);
    assert_eq!(st, VCON_WAIT);
    assert!(n > 0 && (n as usize) < data.len(), "{n}");
    assert_ne!(r.state(key) & pd::S_TXQ_FULL, 0);
    let held = r.m.hold_tx(0);
    assert!(!held.is_empty());
    r.log.state_changes.borrow_mut().clear();
    // Id 60 of the 64-entry ring: in range, not in flight.
    let q = cm::tx_queue(0);
    r.m.sim.complete_raw(q, 60, 0);
    r.m.sim.signal_used(q);
    r.pump();
    assert_eq!(r.stats().recoveries, 1);
    assert!(
        r.log.state_changes.borrow().contains(&key),
        "the writer is woken"
    );
    assert_eq!(r.key(0), key, "same port, same session");
    // What was in flight is lost with the reset; the rest goes out.
    let rest = &data[n as usize..];
    assert_eq!(r.write(key, rest), (VCON_OK, rest.len() as u32));
    assert_eq!(r.m.take_tx(0), rest);
    assert_eq!(r.stats().recoveries, 1);
    r.unload();
}

fn hostile_control_messages_change_nothing(kexts: Kexts) {
    let mut r = Rig::qemu(kexts, &[(0, None, true, true)]);
    let published = r.log.published.borrow().len();
    let bad: [Vec<u8>; 6] = [
        vec![],
        vec![1, 2, 3],
        cm::control_bytes(9999, cm::PORT_ADD, 0, &[]),
        cm::control_bytes(0, 0x7777, 0, &[]),
        cm::control_bytes(0, cm::PORT_NAME, 0, &[0xff, 0xfe]),
        cm::control_bytes(0, cm::RESIZE, 0, &[1]),
    ];
    for b in &bad {
        r.m.send_raw(b, None).unwrap();
        r.pump();
    }
    // A used length larger than the message.
    r.m.send_raw(&cm::control_bytes(0, cm::PORT_OPEN, 1, &[]), Some(4096))
        .unwrap();
    r.pump();
    assert_eq!(r.log.published.borrow().len(), published);
    assert_eq!(r.tty(0), "/dev/tty.virtio");
    assert!(r.stats().control_rejected >= 4);
    // The port still works.
    let key = r.open(0);
    assert_eq!(r.write(key, b"fine"), (VCON_OK, 4));
    assert_eq!(r.m.take_tx(0), b"fine");
    r.unload();
}

fn null_arguments_and_stale_keys_are_refused(kexts: Kexts) {
    let c = kexts.con;
    let null: *mut VconDevice = std::ptr::null_mut();
    let mut n = 0u32;
    let mut out = null;
    // SAFETY: null handles and pointers are what is being tested.
    unsafe {
        assert_eq!(
            (c.vcon_create)(null.cast(), std::ptr::null(), &mut out),
            VCON_E_INVALID
        );
        assert_eq!((c.vcon_port_acquire)(null, 1), VCON_E_INVALID);
        assert_eq!((c.vcon_port_get_state)(null, 1), 0);
        assert_eq!(
            (c.vcon_port_enqueue_data)(null, 1, b"x".as_ptr(), 1, &mut n),
            VCON_E_INVALID
        );
        assert_eq!((c.vcon_stats)(null, std::ptr::null_mut()), VCON_E_INVALID);
        (c.vcon_interrupt)(null, 0);
        (c.vcon_settle)(null);
        (c.vcon_stop)(null);
        (c.vcon_destroy)(null);
    }
    let r = Rig::qemu(kexts, &[(0, None, true, true)]);
    let key = r.key(0);
    // SAFETY: live handle; null out-pointers and buffers are refused.
    unsafe {
        assert_eq!(
            (c.vcon_port_enqueue_data)(r.dev, key, std::ptr::null(), 4, &mut n),
            VCON_E_INVALID
        );
        assert_eq!(
            (c.vcon_port_watch_state)(r.dev, key, std::ptr::null_mut(), 1),
            VCON_E_INVALID
        );
        assert_eq!(
            (c.vcon_port_info)(r.dev, key, std::ptr::null_mut()),
            VCON_E_INVALID
        );
    }
    for stale in [0, key ^ 0x100, key + 1, 0xffff_ffff] {
        assert_eq!(r.acquire(stale), VCON_E_OFFLINE, "key {stale:#x}");
        assert!(r.info(stale).is_err());
    }
    r.unload();
}

// Hot-plug messages the device sends together reach the shim as one collection of
// publish/unpublish calls: whatever the batch held, the shim must be told to drop the nub
// it has and attach the one the port has now, never about a key it was not given.
// (`pump` checks the shim's nubs after every collection.)

fn remove_add_remove_in_one_batch_withdraws_the_delivered_nub(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[(0, None, true, true), (1, Some("org.test.a"), false, true)],
    );
    r.m.auto = false;
    let k0 = r.open(1);
    let published = r.log.published.borrow().len();
    r.log.state_changes.borrow_mut().clear();
    r.batch(&[
        Ctl::Remove(1),
        Ctl::Add(1),
        Ctl::Name(1, "org.test.b"),
        Ctl::Remove(1),
    ]);
    assert_eq!(
        *r.log.unpublished.borrow(),
        vec![k0],
        "the nub the shim has"
    );
    assert!(
        r.log.state_changes.borrow().iter().any(|k| k & 0xff == 1),
        "its sleepers wake (the shim wakes by port id)"
    );
    assert_eq!(
        r.log.published.borrow().len(),
        published,
        "the key added and removed in between never reaches the shim"
    );
    assert!(!r.log.nubs.borrow().contains_key(&1));
    assert_eq!(r.acquire(k0), VCON_E_OFFLINE);
    // Added again later: a nub of its own (none to overwrite).
    r.batch(&[Ctl::Add(1), Ctl::Name(1, "org.test.c")]);
    assert_ne!(r.key(1), k0);
    assert_eq!(r.tty(1), "/dev/tty.org.test.c");
    r.unload();
}

fn rename_and_readd_in_one_batch_replace_the_nub_once(kexts: Kexts) {
    let mut r = Rig::qemu(kexts, &[(0, None, true, true), (2, None, false, true)]);
    r.m.auto = false;
    r.settle();
    let k0 = r.key(2);
    assert_eq!(r.tty(2), "/dev/tty.virtio2");
    let published = r.log.published.borrow().len();
    // Named (republished under the name), then removed and added under another name: two
    // replacements, of which the shim sees one.
    r.batch(&[
        Ctl::Name(2, "first"),
        Ctl::Remove(2),
        Ctl::Add(2),
        Ctl::Name(2, "second"),
    ]);
    assert_eq!(*r.log.unpublished.borrow(), vec![k0]);
    assert_eq!(r.log.published.borrow().len(), published + 1);
    assert_eq!(r.tty(2), "/dev/tty.second");
    let k1 = r.key(2);
    // Across batches: re-added unnamed (published at the settle time), then named and
    // removed together: only the delivered nub is withdrawn.
    r.batch(&[Ctl::Remove(2), Ctl::Add(2)]);
    assert!(!r.log.nubs.borrow().contains_key(&2), "waits for a name");
    r.settle();
    let k2 = r.key(2);
    assert_eq!(r.tty(2), "/dev/tty.virtio2");
    r.batch(&[Ctl::Name(2, "third"), Ctl::Remove(2)]);
    assert_eq!(*r.log.unpublished.borrow(), vec![k0, k1, k2]);
    assert!(!r.log.nubs.borrow().contains_key(&2));
    assert_eq!(r.log.published.borrow().len(), published + 2);
    r.unload();
}

fn remove_and_add_in_one_batch_republish_under_a_fresh_key(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[(0, None, true, true), (1, Some("org.test.a"), false, true)],
    );
    r.m.auto = false;
    let k0 = r.key(1);
    // The same name: a new nub all the same (the old key's sessions are over).
    r.batch(&[Ctl::Remove(1), Ctl::Add(1), Ctl::Name(1, "org.test.a")]);
    let k1 = r.key(1);
    assert_ne!(k1, k0);
    assert_eq!(r.tty(1), "/dev/tty.org.test.a");
    assert_eq!(*r.log.unpublished.borrow(), vec![k0]);
    // Another name.
    r.batch(&[Ctl::Remove(1), Ctl::Add(1), Ctl::Name(1, "org.test.b")]);
    let k2 = r.key(1);
    assert_eq!(r.tty(1), "/dev/tty.org.test.b");
    // Twice over in one batch: one replacement.
    let published = r.log.published.borrow().len();
    r.batch(&[
        Ctl::Remove(1),
        Ctl::Add(1),
        Ctl::Name(1, "org.test.c"),
        Ctl::Remove(1),
        Ctl::Add(1),
        Ctl::Name(1, "org.test.d"),
    ]);
    assert_eq!(*r.log.unpublished.borrow(), vec![k0, k1, k2]);
    assert_eq!(r.log.published.borrow().len(), published + 1);
    assert_eq!(r.tty(1), "/dev/tty.org.test.d");
    r.unload();
}

fn add_and_remove_in_one_batch_publish_nothing(kexts: Kexts) {
    let mut r = Rig::qemu(
        kexts,
        &[(0, None, true, true), (1, Some("org.test.a"), false, true)],
    );
    r.m.auto = false;
    let k0 = r.key(1);
    r.batch(&[Ctl::Remove(1)]);
    assert_eq!(*r.log.unpublished.borrow(), vec![k0]);
    let published = r.log.published.borrow().len();
    // Named: published and withdrawn within the batch, so the shim hears nothing.
    r.batch(&[Ctl::Add(1), Ctl::Name(1, "org.test.b"), Ctl::Remove(1)]);
    // Unnamed: removed before its settle time.
    r.batch(&[Ctl::Add(1), Ctl::Remove(1)]);
    r.settle();
    assert_eq!(r.log.published.borrow().len(), published);
    assert_eq!(*r.log.unpublished.borrow(), vec![k0]);
    assert!(!r.log.nubs.borrow().contains_key(&1));
    // Added in one batch, named in the next.
    r.batch(&[Ctl::Add(1)]);
    r.batch(&[Ctl::Name(1, "org.test.c")]);
    assert_eq!(r.tty(1), "/dev/tty.org.test.c");
    assert_eq!(r.log.published.borrow().len(), published + 1);
    r.unload();
}
