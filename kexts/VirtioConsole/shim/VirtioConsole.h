/*
 * VirtioConsole.kext: an IOSerialDriverSync on the family's nub (VirtioDeviceType 3) that
 * gives every virtio console port a serial stream, so IOSerialBSDClient creates
 * /dev/tty.<name> and /dev/cu.<name> for it: port 0 is /dev/tty.virtio, a named port its
 * PORT_NAME (/dev/tty.org.qemu.guest_agent.0), an unnamed one /dev/tty.virtio<id>.
 *
 * Plumbing only: the driver (queues, buffers, the control protocol, recovery) and the
 * serial port's semantics (state word, events, acquire/release, which port is published
 * under which name, when) are Rust (kexts/VirtioConsole/rust, declared in
 * VirtioConsoleABI.h). This class
 *   - attaches an IORS232SerialStreamSync nub per port the Rust side publishes (its refCon
 *     is the port's key) and terminates it when the port is withdrawn;
 *   - forwards each IOSerialDriverSync method to its vcon_port_* function under the command
 *     gate of the family's work loop (where the family delivers interrupts), and sleeps on
 *     the port (commandSleep) when the answer is VCON_WAIT, until the Rust side says the
 *     port's state changed (commandWakeup);
 *   - runs the settle timer the Rust side asks for, and sleep/wake.
 *
 * IORegistry: org_virtiodarwin_VirtioDevice -> org_virtiodarwin_VirtioConsole
 * (`Statistics`) -> IORS232SerialStreamSync per port (`VirtioPortID`, `VirtioPortName`,
 * `VirtioConsolePort`, `VirtioConsoleSize` {Columns, Rows}) -> IOSerialBSDClient.
 */
#ifndef VIRTIO_CONSOLE_H
#define VIRTIO_CONSOLE_H

#include <IOKit/IOCommandGate.h>
#include <IOKit/IOTimerEventSource.h>
#include <IOKit/serial/IOSerialDriverSync.h>
#include <IOKit/serial/IORS232SerialStreamSync.h>

#include "VirtioPCITransport.h"
#include "VirtioConsoleABI.h"

/* Port ids the driver serves (virtio-console's MAX_PORTS). */
#define VCON_SHIM_PORTS 63

class org_virtiodarwin_VirtioConsole : public IOSerialDriverSync {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioConsole)

public:
    virtual bool start(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void stop(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void free(void) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPowerState(unsigned long ordinal, IOService *device) APPLE_KEXT_OVERRIDE;

    /* IOSerialDriverSync: refCon is the port's key. */
    virtual IOReturn acquirePort(bool sleep, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn releasePort(void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setState(UInt32 state, UInt32 mask, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual UInt32 getState(void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn watchState(UInt32 *state, UInt32 mask, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual UInt32 nextEvent(void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn executeEvent(UInt32 event, UInt32 data, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn requestEvent(UInt32 event, UInt32 *data, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn enqueueEvent(UInt32 event, UInt32 data, bool sleep, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn dequeueEvent(UInt32 *event, UInt32 *data, bool sleep, void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn enqueueData(UInt8 *buffer, UInt32 size, UInt32 *count, bool sleep,
                                 void *refCon) APPLE_KEXT_OVERRIDE;
    virtual IOReturn dequeueData(UInt8 *buffer, UInt32 size, UInt32 *count, UInt32 min,
                                 void *refCon) APPLE_KEXT_OVERRIDE;

private:
    org_virtiodarwin_VirtioDevice *fNub;
    IOWorkLoop *fWorkLoop;
    IOCommandGate *fGate;
    IOTimerEventSource *fSettleTimer;
    VconDevice *fDev;
    VconCallbacks fCallbacks;
    bool fStopping;
    bool fAsleep;
    /* Per port id: the published nub and its key (0: none). */
    IORS232SerialStreamSync *fPorts[VCON_SHIM_PORTS];
    uint32_t fKeys[VCON_SHIM_PORTS];
    /* Per port id: the event sleepers wait on. */
    uint32_t fWait[VCON_SHIM_PORTS];

    /* One IOSerialDriverSync call, gated (see VirtioConsole.cpp). */
    struct Call;
    IOReturn call(Call *c);
    static IOReturn gatedCall(OSObject *owner, void *call, void *, void *, void *);
    IOReturn runCall(Call *c);
    /* Sleeps on port `key`'s event (gate held); false when interrupted. */
    bool sleepOnPort(uint32_t key);

    void publishStatistics(void);

    static IOReturn gatedStart(OSObject *owner, void *, void *, void *, void *);
    static IOReturn gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *);
    static IOReturn gatedStop(OSObject *owner, void *, void *, void *, void *);
    static void settleFired(OSObject *owner, IOTimerEventSource *sender);

    /* VconCallbacks (ctx = this). */
    static void cbPublish(void *ctx, uint32_t key);
    static void cbUnpublish(void *ctx, uint32_t key);
    static void cbStateChanged(void *ctx, uint32_t key);
    static void cbResized(void *ctx, uint32_t key, uint16_t cols, uint16_t rows);
    static void cbScheduleSettle(void *ctx, uint32_t ms);
};

#endif /* VIRTIO_CONSOLE_H */
