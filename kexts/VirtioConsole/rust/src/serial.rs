//! The serial-port half of `IOSerialDriverSync` for one virtio console port: the state word,
//! the events `IOSerialBSDClient` sends and asks for, and acquire/release, as pure logic
//! the shim's methods forward to. The blocking parts (sleeping until a state bit changes)
//! stay in the shim, which retries a call when it answers [`Step::Wait`].
//!
//! The numbers are IOSerialFamily's public ABI (Kernel SDK `IOKit/serial/
//! IOSerialStreamSync.h` and `IORS232SerialStreamSync.h`); they are crate-private so the
//! generated C header does not redefine the SDK's macros.

/// `PD_*` from the Kernel SDK's serial headers (the state word's names complete, whether or
/// not the driver itself sets each: the tests and a reader use them).
#[allow(dead_code)]
pub(crate) mod pd {
    const VOID: u32 = 0;
    const BYTE: u32 = 1;
    const LONG: u32 = 3;
    /// `PD_OP(x)`.
    const fn op(x: u32) -> u32 {
        x << 2
    }
    /// `PD_E_MASK`: the event without its data-size bits.
    pub const E_MASK: u32 = !0x03;

    pub const E_EOQ: u32 = VOID | op(0);
    pub const E_ACTIVE: u32 = BYTE | op(1);
    pub const E_TXQ_SIZE: u32 = LONG | op(2);
    pub const E_RXQ_SIZE: u32 = LONG | op(3);
    pub const E_TXQ_LOW_WATER: u32 = LONG | op(4);
    pub const E_RXQ_LOW_WATER: u32 = LONG | op(5);
    pub const E_TXQ_HIGH_WATER: u32 = LONG | op(6);
    pub const E_RXQ_HIGH_WATER: u32 = LONG | op(7);
    pub const E_TXQ_AVAILABLE: u32 = LONG | op(8);
    pub const E_RXQ_AVAILABLE: u32 = LONG | op(9);
    pub const E_TXQ_FLUSH: u32 = VOID | op(10);
    pub const E_RXQ_FLUSH: u32 = LONG | op(11);
    pub const E_DATA_RATE: u32 = LONG | op(12);
    pub const E_RX_DATA_RATE: u32 = LONG | op(13);
    pub const E_DATA_SIZE: u32 = LONG | op(14);
    pub const E_RX_DATA_SIZE: u32 = LONG | op(15);
    pub const E_DATA_INTEGRITY: u32 = LONG | op(16);
    pub const E_RX_DATA_INTEGRITY: u32 = LONG | op(17);
    pub const E_DELAY: u32 = LONG | op(18);
    pub const E_DATA_LATENCY: u32 = LONG | op(19);
    pub const E_FLOW_CONTROL: u32 = LONG | op(20);
    pub const E_EXTERNAL_CLOCK_MODE: u32 = LONG | op(28);
    pub const RS232_E_MIN_LATENCY: u32 = BYTE | op(57);
    pub const RS232_E_XOFF_BYTE: u32 = BYTE | op(58);
    pub const RS232_E_XON_BYTE: u32 = BYTE | op(59);
    pub const RS232_E_STOP_BITS: u32 = LONG | op(60);
    pub const RS232_E_RX_STOP_BITS: u32 = LONG | op(61);
    pub const RS232_E_LINE_BREAK: u32 = BYTE | op(62);

    pub const S_ACQUIRED: u32 = 0x8000_0000;
    pub const S_ACTIVE: u32 = 0x4000_0000;
    pub const S_TX_ENABLE: u32 = 0x2000_0000;
    pub const S_TX_BUSY: u32 = 0x1000_0000;
    pub const S_TX_EVENT: u32 = 0x0800_0000;
    pub const S_TXQ_EMPTY: u32 = 0x0400_0000;
    pub const S_TXQ_LOW_WATER: u32 = 0x0200_0000;
    pub const S_TXQ_HIGH_WATER: u32 = 0x0100_0000;
    pub const S_TXQ_FULL: u32 = 0x0080_0000;
    /// `PD_S_RX_OFFSET`: each receive bit is its transmit twin shifted right by 7.
    const RX: u32 = 7;
    pub const S_RX_ENABLE: u32 = S_TX_ENABLE >> RX;
    pub const S_RXQ_EMPTY: u32 = S_TXQ_EMPTY >> RX;
    pub const S_RXQ_LOW_WATER: u32 = S_TXQ_LOW_WATER >> RX;
    pub const S_RXQ_HIGH_WATER: u32 = S_TXQ_HIGH_WATER >> RX;
    pub const S_RXQ_FULL: u32 = S_TXQ_FULL >> RX;
    /// `PD_S_MASK`: the generic half of the state word.
    pub const S_MASK: u32 = 0xffff_0000;

    /// `PD_RS232_S_*` (`TIOCM_*` values).
    pub const RS232_S_MASK: u32 = 0x0000_ffff;
    pub const RS232_S_DTR: u32 = 0x0002;
    pub const RS232_S_RTS: u32 = 0x0004;
    pub const RS232_S_CTS: u32 = 0x0020;
    pub const RS232_S_CAR: u32 = 0x0040;
    pub const RS232_S_DSR: u32 = 0x0100;
    pub const RS232_S_LOOP: u32 = 0x1000;

    /// `PD_RS232_PARITY_NONE`.
    pub const RS232_PARITY_NONE: u32 = 1;
}

use pd::*;

/// Bits the driver owns: the queue levels and the modem inputs. `setState` cannot change
/// them (they describe the virtqueues and the host side).
const DRIVER_BITS: u32 = S_ACQUIRED
    | S_ACTIVE
    | S_TXQ_EMPTY
    | S_TXQ_LOW_WATER
    | S_TXQ_HIGH_WATER
    | S_TXQ_FULL
    | S_RXQ_EMPTY
    | S_RXQ_LOW_WATER
    | S_RXQ_HIGH_WATER
    | S_RXQ_FULL
    | RS232_S_CTS
    | RS232_S_CAR
    | RS232_S_DSR;

/// What `setState` may name in its mask (Apple's serial drivers' `EXTERNAL_MASK` without
/// ACQUIRED/ACTIVE, which only acquire/release and `PD_E_ACTIVE` change, and LOOP).
const SETTABLE: u32 = (S_MASK | (RS232_S_MASK & !RS232_S_LOOP)) & !(S_ACQUIRED | S_ACTIVE);

/// Settings a client stores with `executeEvent` and reads back with `requestEvent`: a
/// virtio port has no line, so they change nothing on the wire, but termios round-trips
/// (`tcsetattr` then `tcgetattr`) must see what was set.
const STORED: [(u32, u32); 19] = [
    (E_TXQ_LOW_WATER, 0),
    (E_RXQ_LOW_WATER, 0),
    (E_TXQ_HIGH_WATER, 0),
    (E_RXQ_HIGH_WATER, 0),
    // Data rates are in half bits per second (IOSerialBSDClient sends `speed << 1`).
    (E_DATA_RATE, 115_200 << 1),
    (E_RX_DATA_RATE, 0),
    // Bits per character, in half bits.
    (E_DATA_SIZE, 8 << 1),
    (E_RX_DATA_SIZE, 0),
    (E_DATA_INTEGRITY, RS232_PARITY_NONE),
    (E_RX_DATA_INTEGRITY, 0),
    (E_DELAY, 0),
    (E_DATA_LATENCY, 0),
    (E_FLOW_CONTROL, 0),
    (E_EXTERNAL_CLOCK_MODE, 0),
    (RS232_E_MIN_LATENCY, 0),
    (RS232_E_XOFF_BYTE, 0x13),
    (RS232_E_XON_BYTE, 0x11),
    // One stop bit, in half bits.
    (RS232_E_STOP_BITS, 2),
    (RS232_E_RX_STOP_BITS, 0),
];

fn stored_index(event: u32) -> Option<usize> {
    STORED.iter().position(|&(e, _)| e == event)
}

/// How a serial call ends.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Done,
    /// Not yet: the shim sleeps until the port's state changes, then calls again.
    Wait,
}

/// Why a serial call failed (the shim maps each to an `IOReturn`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum SerialError {
    /// Someone else holds the port (`kIOReturnExclusiveAccess`).
    Busy,
    /// Not acquired, or not active for a data call (`kIOReturnNotOpen`).
    NotOpen,
    /// The port went inactive while a caller waited (`kIOReturnIOError`).
    Inactive,
    /// An event or state bit this port does not know (`kIOReturnBadArgument`).
    BadArgument,
}

/// Queue levels and modem inputs, as the driver sees them now.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Levels {
    pub rx_pending: u32,
    pub rx_capacity: u32,
    pub tx_in_flight: u32,
    pub tx_capacity: u32,
    /// The host side is connected (PORT_OPEN 1 from the device, or no control queue).
    pub carrier: bool,
}

/// One port's IOSerialDriverSync state.
#[derive(Copy, Clone, Debug)]
pub(crate) struct SerialPort {
    state: u32,
    settings: [u32; STORED.len()],
}

/// The settings' defaults, in [`STORED`] order.
// Evaluated at compile time: an index out of bounds fails the build, not the kernel.
#[allow(clippy::indexing_slicing)]
const DEFAULTS: [u32; STORED.len()] = {
    let mut d = [0; STORED.len()];
    let mut i = 0;
    while i < STORED.len() {
        d[i] = STORED[i].1;
        i += 1;
    }
    d
};

impl SerialPort {
    /// A port nobody holds, with default settings.
    pub const DEFAULT: SerialPort = SerialPort {
        state: 0,
        settings: DEFAULTS,
    };

    pub fn state(&self) -> u32 {
        self.state
    }

    pub fn acquired(&self) -> bool {
        self.state & S_ACQUIRED != 0
    }

    pub fn active(&self) -> bool {
        self.state & S_ACTIVE != 0
    }

    /// Recomputes the driver-owned bits from `l`; returns whether the word changed.
    pub fn update(&mut self, l: Levels) -> bool {
        let mut s = self.state
            & !(S_TXQ_EMPTY
                | S_TXQ_LOW_WATER
                | S_TXQ_HIGH_WATER
                | S_TXQ_FULL
                | S_RXQ_EMPTY
                | S_RXQ_LOW_WATER
                | S_RXQ_HIGH_WATER
                | S_RXQ_FULL
                | RS232_S_CAR);
        // The port is always ready to take data in and to send (the ring's backpressure is
        // the flow control): CTS and DSR stay up; carrier follows the host side.
        s |= RS232_S_CTS | RS232_S_DSR;
        if l.carrier {
            s |= RS232_S_CAR;
        }
        s |= queue_bits(
            l.tx_in_flight,
            l.tx_capacity,
            self.setting(E_TXQ_LOW_WATER),
            self.setting(E_TXQ_HIGH_WATER),
        );
        s |= queue_bits(
            l.rx_pending,
            l.rx_capacity,
            self.setting(E_RXQ_LOW_WATER),
            self.setting(E_RXQ_HIGH_WATER),
        ) >> 7;
        let changed = s != self.state;
        self.state = s;
        changed
    }

    fn setting(&self, event: u32) -> u32 {
        stored_index(event)
            .and_then(|i| self.settings.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// `acquirePort`: the port is free → taken, with default settings.
    pub fn acquire(&mut self) -> Result<(), SerialError> {
        if self.acquired() {
            return Err(SerialError::Busy);
        }
        self.settings = DEFAULTS;
        self.state = (self.state & DRIVER_BITS) | S_ACQUIRED;
        Ok(())
    }

    /// `releasePort`: returns whether the port was active (the caller closes it on the
    /// host side).
    pub fn release(&mut self) -> Result<bool, SerialError> {
        if !self.acquired() {
            return Err(SerialError::NotOpen);
        }
        let was_active = self.active();
        self.state &= DRIVER_BITS & !(S_ACQUIRED | S_ACTIVE);
        Ok(was_active)
    }

    /// `setState(state, mask)`.
    pub fn set_state(&mut self, state: u32, mask: u32) -> Result<(), SerialError> {
        if !self.acquired() {
            return Err(SerialError::NotOpen);
        }
        if mask & !SETTABLE != 0 {
            return Err(SerialError::BadArgument);
        }
        // Driver-owned bits in the mask are accepted and ignored: they are recomputed from
        // the queues (IOSerialBSDClient only ever names the enable and event bits and the
        // modem outputs).
        let mask = mask & !DRIVER_BITS;
        self.state = (self.state & !mask) | (state & mask);
        Ok(())
    }

    /// `watchState(&state, mask)`: done when at least one bit of `mask` has the value it
    /// has in `want`. Unless the caller watches ACQUIRED or ACTIVE itself, the port going
    /// inactive also ends the wait, as an error (IOSerialFamily's convention, so a reader
    /// blocked on data wakes when the port is closed under it).
    pub fn watch(&self, want: u32, mask: u32) -> Result<Step, SerialError> {
        if !self.acquired() {
            return Err(SerialError::NotOpen);
        }
        let (want, mask, auto_active) = if mask & (S_ACQUIRED | S_ACTIVE) == 0 {
            (want & !S_ACTIVE, mask | S_ACTIVE, true)
        } else {
            (want, mask, false)
        };
        let found = !(want ^ self.state) & mask;
        if found == 0 {
            return Ok(Step::Wait);
        }
        if auto_active && found == S_ACTIVE {
            return Err(SerialError::Inactive);
        }
        Ok(Step::Done)
    }

    /// `executeEvent` for the events that only store a setting or change the state word.
    /// ACTIVE and the queue flushes need the driver: the caller handles them (see
    /// [`SerialPort::set_active`]).
    pub fn execute_stored(&mut self, event: u32, data: u32) -> Result<(), SerialError> {
        if !self.acquired() {
            return Err(SerialError::NotOpen);
        }
        let valid = match event {
            E_DATA_SIZE | E_RX_DATA_SIZE => data == 0 || (5 << 1..=8 << 1).contains(&data),
            RS232_E_STOP_BITS | RS232_E_RX_STOP_BITS => data == 0 || (2..=4).contains(&data),
            E_DATA_INTEGRITY | E_RX_DATA_INTEGRITY => data <= 6,
            E_DATA_RATE => data > 0,
            _ => true,
        };
        if !valid {
            return Err(SerialError::BadArgument);
        }
        match stored_index(event).and_then(|i| self.settings.get_mut(i)) {
            Some(slot) => {
                *slot = data;
                Ok(())
            }
            // A line break or a delay has no meaning on a virtio port: accepted, nothing
            // sent.
            None if event == RS232_E_LINE_BREAK => Ok(()),
            None => Err(SerialError::BadArgument),
        }
    }

    /// `PD_E_ACTIVE`: returns whether the state changed.
    pub fn set_active(&mut self, on: bool) -> Result<bool, SerialError> {
        if !self.acquired() {
            return Err(SerialError::NotOpen);
        }
        let was = self.active();
        if on {
            self.state |= S_ACTIVE;
        } else {
            self.state &= !S_ACTIVE;
        }
        Ok(was != on)
    }

    /// `requestEvent` for what this port knows without the driver (`levels` for the queue
    /// sizes and fill levels).
    pub fn request(&self, event: u32, l: Levels) -> Result<u32, SerialError> {
        if !self.acquired() {
            return Err(SerialError::NotOpen);
        }
        match event {
            E_ACTIVE => Ok(u32::from(self.active())),
            E_TXQ_SIZE => Ok(l.tx_capacity),
            E_RXQ_SIZE => Ok(l.rx_capacity),
            E_TXQ_AVAILABLE => Ok(l.tx_capacity.saturating_sub(l.tx_in_flight)),
            E_RXQ_AVAILABLE => Ok(l.rx_pending),
            _ => stored_index(event)
                .and_then(|i| self.settings.get(i))
                .copied()
                .ok_or(SerialError::BadArgument),
        }
    }

    /// Forgets the session (the port went away or was recreated).
    pub fn reset(&mut self) {
        *self = SerialPort::DEFAULT;
    }
}

/// The EMPTY / LOW_WATER / HIGH_WATER / FULL bits (transmit positions) of a queue holding
/// `used` of `capacity` bytes. Water marks of 0 mean a quarter and three quarters.
fn queue_bits(used: u32, capacity: u32, low: u32, high: u32) -> u32 {
    let low = if low == 0 { capacity / 4 } else { low };
    let high = if high == 0 {
        capacity - capacity / 4
    } else {
        high
    };
    let mut b = 0;
    if used == 0 {
        b |= S_TXQ_EMPTY;
    }
    if used <= low {
        b |= S_TXQ_LOW_WATER;
    }
    if used >= high {
        b |= S_TXQ_HIGH_WATER;
    }
    if used >= capacity {
        b |= S_TXQ_FULL;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> Levels {
        Levels {
            rx_pending: 0,
            rx_capacity: 8192,
            tx_in_flight: 0,
            tx_capacity: 8192,
            carrier: true,
        }
    }

    /// The values are the SDK header's, written out (a typo in `pd` fails here).
    #[test]
    fn constants_match_the_sdk_headers() {
        assert_eq!(E_ACTIVE, 0x05);
        assert_eq!(E_TXQ_AVAILABLE, 0x23);
        assert_eq!(E_RXQ_FLUSH, 0x2f);
        assert_eq!(E_TXQ_FLUSH, 0x28);
        assert_eq!(E_DATA_RATE, 0x33);
        assert_eq!(E_FLOW_CONTROL, 0x53);
        assert_eq!(E_EXTERNAL_CLOCK_MODE, 0x73);
        assert_eq!(RS232_E_STOP_BITS, 0xf3);
        assert_eq!(RS232_E_XON_BYTE, 0xed);
        assert_eq!(RS232_E_LINE_BREAK, 0xf9);
        assert_eq!(S_RX_ENABLE, 0x0040_0000);
        assert_eq!(S_RXQ_EMPTY, 0x0008_0000);
        assert_eq!(S_RXQ_FULL, 0x0001_0000);
    }

    #[test]
    fn acquire_release_and_exclusive_access() {
        let mut p = SerialPort::DEFAULT;
        assert_eq!(p.set_state(0, S_TX_ENABLE), Err(SerialError::NotOpen));
        p.acquire().unwrap();
        assert_eq!(p.acquire(), Err(SerialError::Busy));
        assert_eq!(p.set_active(true), Ok(true));
        assert_eq!(p.release(), Ok(true), "was active: the host is told");
        assert_eq!(p.release(), Err(SerialError::NotOpen));
        p.acquire().unwrap();
        assert!(!p.active());
    }

    #[test]
    fn queue_levels_and_carrier() {
        let mut p = SerialPort::DEFAULT;
        p.acquire().unwrap();
        assert!(p.update(levels()));
        let s = p.state();
        assert_ne!(s & S_TXQ_EMPTY, 0);
        assert_ne!(s & S_RXQ_EMPTY, 0);
        assert_ne!(s & RS232_S_CAR, 0);
        assert!(!p.update(levels()), "no change, no wakeup");
        let full = Levels {
            tx_in_flight: 8192,
            rx_pending: 100,
            carrier: false,
            ..levels()
        };
        assert!(p.update(full));
        let s = p.state();
        assert_ne!(s & S_TXQ_FULL, 0);
        assert_eq!(s & S_TXQ_EMPTY, 0);
        assert_eq!(s & S_RXQ_EMPTY, 0);
        assert_ne!(s & S_RXQ_LOW_WATER, 0);
        assert_eq!(s & RS232_S_CAR, 0);
    }

    #[test]
    fn watch_state_semantics() {
        let mut p = SerialPort::DEFAULT;
        p.acquire().unwrap();
        p.set_active(true).unwrap();
        p.update(Levels {
            carrier: false,
            ..levels()
        });
        // Waiting for carrier: not yet.
        assert_eq!(p.watch(RS232_S_CAR, RS232_S_CAR), Ok(Step::Wait));
        p.update(levels());
        assert_eq!(p.watch(RS232_S_CAR, RS232_S_CAR), Ok(Step::Done));
        // Waiting for data (RXQ_EMPTY to clear): closing the port ends it with an error.
        assert_eq!(p.watch(0, S_RXQ_EMPTY), Ok(Step::Wait));
        p.set_active(false).unwrap();
        assert_eq!(p.watch(0, S_RXQ_EMPTY), Err(SerialError::Inactive));
        // Watching ACTIVE itself is a plain watch.
        assert_eq!(p.watch(0, S_ACTIVE), Ok(Step::Done));
    }

    #[test]
    fn set_state_keeps_driver_bits() {
        let mut p = SerialPort::DEFAULT;
        p.acquire().unwrap();
        p.update(levels());
        let before = p.state();
        p.set_state(!0, S_TX_ENABLE | S_RX_ENABLE | RS232_S_DTR | S_TXQ_EMPTY)
            .unwrap();
        assert_eq!(
            p.state(),
            before | S_TX_ENABLE | S_RX_ENABLE | RS232_S_DTR,
            "TXQ_EMPTY is the ring's"
        );
        assert_eq!(p.set_state(0, S_ACTIVE), Err(SerialError::BadArgument));
        assert_eq!(p.set_state(0, RS232_S_LOOP), Err(SerialError::BadArgument));
    }

    #[test]
    fn settings_round_trip_and_are_validated() {
        let mut p = SerialPort::DEFAULT;
        p.acquire().unwrap();
        assert_eq!(p.request(E_DATA_RATE, levels()), Ok(115_200 << 1));
        p.execute_stored(E_DATA_RATE, 9600 << 1).unwrap();
        assert_eq!(p.request(E_DATA_RATE, levels()), Ok(9600 << 1));
        assert_eq!(
            p.execute_stored(E_DATA_SIZE, 9 << 1),
            Err(SerialError::BadArgument)
        );
        assert_eq!(
            p.execute_stored(0x7fff_ff03, 1),
            Err(SerialError::BadArgument)
        );
        assert_eq!(
            p.request(0x7fff_ff03, levels()),
            Err(SerialError::BadArgument)
        );
        assert_eq!(p.request(E_TXQ_AVAILABLE, levels()), Ok(8192));
        // A new session starts from the defaults.
        p.release().unwrap();
        p.acquire().unwrap();
        assert_eq!(p.request(E_DATA_RATE, levels()), Ok(115_200 << 1));
    }
}
