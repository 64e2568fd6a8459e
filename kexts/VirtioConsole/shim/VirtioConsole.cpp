/*
 * VirtioConsole.kext: IOKit plumbing around the Rust console driver (see the header).
 */
#include "VirtioConsole.h"

#include <IOKit/IOLib.h>
#include <IOKit/serial/IOSerialKeys.h>
#include <libkern/c++/OSDictionary.h>
#include <libkern/c++/OSNumber.h>
#include <libkern/c++/OSString.h>

#define super IOSerialDriverSync
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioConsole, IOSerialDriverSync)

static inline uint32_t keyOf(void *refCon) { return (uint32_t)(uintptr_t)refCon; }
static inline uint32_t idOf(uint32_t key) { return key & 0xff; }

static IOReturn toIOReturn(int32_t status)
{
    switch (status) {
    case VCON_OK:
    case VCON_WAIT:
        return kIOReturnSuccess;
    case VCON_E_BUSY:
        return kIOReturnExclusiveAccess;
    case VCON_E_NOT_OPEN:
        return kIOReturnNotOpen;
    case VCON_E_DEVICE:
    case VCON_E_INACTIVE:
        return kIOReturnIOError;
    case VCON_E_STOPPED:
    case VCON_E_OFFLINE:
        return kIOReturnOffline;
    default:
        return kIOReturnBadArgument;
    }
}

/* ---- lifecycle ---- */

bool org_virtiodarwin_VirtioConsole::start(IOService *provider)
{
    fNub = OSDynamicCast(org_virtiodarwin_VirtioDevice, provider);
    if (!fNub || !fNub->virtioDevice() || !super::start(provider))
        return false;
    vcon_log_init();
    /* The family's work loop: the family delivers this device's interrupts on it. */
    fWorkLoop = getWorkLoop();
    fGate = IOCommandGate::commandGate(this);
    fSettleTimer = IOTimerEventSource::timerEventSource(this, &org_virtiodarwin_VirtioConsole::settleFired);
    if (!fWorkLoop || !fGate || !fSettleTimer || fWorkLoop->addEventSource(fGate) != kIOReturnSuccess) {
        super::stop(provider);
        return false;
    }
    if (fWorkLoop->addEventSource(fSettleTimer) != kIOReturnSuccess) {
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    fCallbacks.ctx = this;
    fCallbacks.publish = cbPublish;
    fCallbacks.unpublish = cbUnpublish;
    fCallbacks.state_changed = cbStateChanged;
    fCallbacks.resized = cbResized;
    fCallbacks.schedule_settle = cbScheduleSettle;
    if (fGate->runAction(gatedStart) != kIOReturnSuccess) {
        IOLog("VirtioConsole: cannot drive this device\n");
        fSettleTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fSettleTimer);
        fGate->runAction(gatedStop);
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    /* A virtio device keeps nothing across sleep: without a power driver the ports would be
     * dead after the first wake. */
    PMinit();
    provider->joinPMtree(this);
    if (registerPowerDriver(this, gVirtioPowerStates, 2) != kIOReturnSuccess)
        IOLog("VirtioConsole: no power management (the ports will not survive sleep)\n");
    registerService();
    return true;
}

IOReturn org_virtiodarwin_VirtioConsole::gatedStart(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)owner;
    /* Publishes port 0 (no MULTIPORT) or the ports the device adds, through cbPublish. */
    if (vcon_create(me->fNub->virtioDevice(), &me->fCallbacks, &me->fDev) != VCON_OK || !me->fDev)
        return kIOReturnNotAttached;
    me->publishStatistics();
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioConsole::setPowerState(unsigned long ordinal, IOService *)
{
    if (!fGate)
        return IOPMAckImplied;
    fGate->runAction(gatedSetPower, (void *)(uintptr_t)ordinal);
    return IOPMAckImplied;
}

/* Sleep: the device is reset, the ports and their tty sessions stay (their I/O waits).
 * Wake: the device is brought up again and re-adds its ports; open ones are reopened on the
 * host side, missing ones withdrawn after the settle time. */
IOReturn org_virtiodarwin_VirtioConsole::gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)owner;
    bool on = (uintptr_t)ordinal != 0;
    if (!me->fDev || me->fStopping)
        return kIOReturnSuccess;
    if (!on && !me->fAsleep) {
        me->fAsleep = true;
        vcon_suspend(me->fDev);
    } else if (on && me->fAsleep) {
        if (vcon_resume(me->fDev) != VCON_OK) {
            IOLog("VirtioConsole: the device did not come back after wake\n");
            return kIOReturnSuccess;
        }
        me->fAsleep = false;
    }
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioConsole::stop(IOService *provider)
{
    PMstop();
    if (fSettleTimer) {
        fSettleTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fSettleTimer);
    }
    if (fGate) {
        fGate->runAction(gatedStop);
        fWorkLoop->removeEventSource(fGate);
    }
    super::stop(provider);
}

/* Withdraws every port (cbUnpublish terminates the nubs, sleepers wake with
 * kIOReturnOffline), resets the device and frees the driver. */
IOReturn org_virtiodarwin_VirtioConsole::gatedStop(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)owner;
    me->fStopping = true;
    if (me->fDev) {
        static const char bye[] = "VirtioConsole: stopping\r\n";
        vcon_emergency_write(me->fDev, (const uint8_t *)bye, sizeof(bye) - 1);
        vcon_stop(me->fDev);
        vcon_destroy(me->fDev);
        me->fDev = NULL;
    }
    for (int i = 0; i < VCON_SHIM_PORTS; i++) {
        if (me->fPorts[i]) {
            me->fPorts[i]->terminate();
            me->fPorts[i]->release();
            me->fPorts[i] = NULL;
            me->fKeys[i] = 0;
        }
    }
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioConsole::free(void)
{
    if (fDev)
        IOLog("VirtioConsole: freed with a live driver (not destroyed: no work loop to do it on)\n");
    OSSafeReleaseNULL(fSettleTimer);
    OSSafeReleaseNULL(fGate);
    super::free();
}

void org_virtiodarwin_VirtioConsole::settleFired(OSObject *owner, IOTimerEventSource *)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)owner;
    if (me->fStopping || !me->fDev)
        return;
    vcon_settle(me->fDev);
    me->publishStatistics();
}

/* ---- callbacks from the Rust side (gate held) ---- */

void org_virtiodarwin_VirtioConsole::cbPublish(void *ctx, uint32_t key)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)ctx;
    uint32_t id = idOf(key);
    VconPortInfo info;
    if (id >= VCON_SHIM_PORTS || me->fStopping || vcon_port_info(me->fDev, key, &info) != VCON_OK)
        return;
    /* The Rust side unpublishes a port's nub before publishing the port again (unpublish
     * calls come first). Should one ever be missed, the old nub (its key is offline now that
     * this one is current) is terminated here, not leaked by overwriting fPorts[id]. */
    if (me->fPorts[id])
        cbUnpublish(ctx, me->fKeys[id]);
    IORS232SerialStreamSync *nub = new IORS232SerialStreamSync;
    if (!nub)
        return;
    /* IOSerialStreamSync::init(dictionary, refCon): each of the nub's calls comes back to
     * this driver with the key. */
    if (!nub->init(NULL, (void *)(uintptr_t)key)) {
        nub->release();
        return;
    }
    nub->setProperty(kIOTTYBaseNameKey, info.base_name);
    nub->setProperty(kIOTTYSuffixKey, info.suffix);
    nub->setProperty(kIOSerialBSDTypeKey, kIOSerialBSDRS232Type);
    nub->setProperty("VirtioPortID", (unsigned long long)id, 32);
    if (info.port_name[0])
        nub->setProperty("VirtioPortName", info.port_name);
    nub->setProperty("VirtioConsolePort", info.console);
    if (!nub->attach(me)) {
        nub->release();
        return;
    }
    me->fPorts[id] = nub;
    me->fKeys[id] = key;
    if (info.has_size)
        cbResized(ctx, key, info.cols, info.rows);
    /* Asynchronous matching: IOSerialBSDClient attaches from IOKit's matching thread. */
    nub->registerService();
}

void org_virtiodarwin_VirtioConsole::cbUnpublish(void *ctx, uint32_t key)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)ctx;
    uint32_t id = idOf(key);
    if (id >= VCON_SHIM_PORTS || me->fKeys[id] != key || !me->fPorts[id])
        return;
    IORS232SerialStreamSync *nub = me->fPorts[id];
    me->fPorts[id] = NULL;
    me->fKeys[id] = 0;
    /* Asynchronous: IOSerialBSDClient closes its sessions, which get kIOReturnOffline from
     * here on, and removes the /dev nodes. */
    nub->terminate();
    nub->release();
}

void org_virtiodarwin_VirtioConsole::cbStateChanged(void *ctx, uint32_t key)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)ctx;
    uint32_t id = idOf(key);
    if (id < VCON_SHIM_PORTS && me->fGate)
        me->fGate->commandWakeup(&me->fWait[id], false);
}

void org_virtiodarwin_VirtioConsole::cbResized(void *ctx, uint32_t key, uint16_t cols, uint16_t rows)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)ctx;
    uint32_t id = idOf(key);
    if (id >= VCON_SHIM_PORTS || me->fKeys[id] != key || !me->fPorts[id])
        return;
    /* The serial family has no driver-side TIOCSWINSZ: the size is published here, and the
     * user applies it with stty (docs/kernel-debugging.md). */
    OSDictionary *d = OSDictionary::withCapacity(2);
    if (!d)
        return;
    OSNumber *c = OSNumber::withNumber(cols, 16);
    OSNumber *r = OSNumber::withNumber(rows, 16);
    if (c && r) {
        d->setObject("Columns", c);
        d->setObject("Rows", r);
        me->fPorts[id]->setProperty("VirtioConsoleSize", d);
    }
    OSSafeReleaseNULL(c);
    OSSafeReleaseNULL(r);
    d->release();
}

void org_virtiodarwin_VirtioConsole::cbScheduleSettle(void *ctx, uint32_t ms)
{
    org_virtiodarwin_VirtioConsole *me = (org_virtiodarwin_VirtioConsole *)ctx;
    if (me->fSettleTimer && !me->fStopping)
        me->fSettleTimer->setTimeoutMS(ms);
}

/* ---- IOSerialDriverSync: every call gated, sleeping on VCON_WAIT ---- */

enum CallOp {
    kAcquire, kRelease, kSetState, kGetState, kWatchState, kExecute, kRequest,
    kDequeueEvent, kEnqueueData, kDequeueData,
};

struct org_virtiodarwin_VirtioConsole::Call {
    CallOp op;
    uint32_t key;
    UInt32 state, mask, event, data, size, min;
    UInt32 *statep, *datap, *eventp, *count;
    UInt8 *buffer;
    bool sleep;
    UInt32 result;
};

IOReturn org_virtiodarwin_VirtioConsole::call(Call *c)
{
    if (!fGate)
        return kIOReturnOffline;
    return fGate->runAction(gatedCall, c);
}

IOReturn org_virtiodarwin_VirtioConsole::gatedCall(OSObject *owner, void *c, void *, void *, void *)
{
    return ((org_virtiodarwin_VirtioConsole *)owner)->runCall((Call *)c);
}

bool org_virtiodarwin_VirtioConsole::sleepOnPort(uint32_t key)
{
    uint32_t id = idOf(key);
    if (id >= VCON_SHIM_PORTS || fStopping)
        return false;
    /* Woken by cbStateChanged (any change of the port's state word, its withdrawal, stop);
     * a signal to the sleeping thread ends the wait with kIOReturnAborted. */
    return fGate->commandSleep(&fWait[id], THREAD_INTERRUPTIBLE) == THREAD_AWAKENED;
}

IOReturn org_virtiodarwin_VirtioConsole::runCall(Call *c)
{
    int32_t r;
    UInt32 done = 0;
    for (;;) {
        if (!fDev || fStopping)
            return kIOReturnOffline;
        switch (c->op) {
        case kAcquire:
            r = vcon_port_acquire(fDev, c->key);
            if (r == VCON_E_BUSY && c->sleep)
                r = VCON_WAIT;
            break;
        case kRelease:
            r = vcon_port_release(fDev, c->key);
            break;
        case kSetState:
            r = vcon_port_set_state(fDev, c->key, c->state, c->mask);
            break;
        case kGetState:
            c->result = vcon_port_get_state(fDev, c->key);
            return kIOReturnSuccess;
        case kWatchState: {
            UInt32 s = *c->statep;
            r = vcon_port_watch_state(fDev, c->key, &s, c->mask);
            if (r == VCON_OK)
                *c->statep = s;
            break;
        }
        case kExecute:
            r = vcon_port_execute_event(fDev, c->key, c->event, c->data);
            break;
        case kRequest:
            r = vcon_port_request_event(fDev, c->key, c->event, c->datap);
            break;
        case kDequeueEvent: {
            /* No event queue: always PD_E_EOQ, once the port is there. */
            UInt32 s = 0;
            r = vcon_port_request_event(fDev, c->key, PD_E_ACTIVE, &s);
            if (r == VCON_OK) {
                *c->eventp = vcon_port_next_event(fDev, c->key);
                *c->datap = 0;
            }
            break;
        }
        case kEnqueueData: {
            uint32_t n = 0;
            r = vcon_port_enqueue_data(fDev, c->key, c->buffer + done, c->size - done, &n);
            done += n;
            *c->count = done;
            /* Not everything fit: a non-sleeping caller has its count (flow control is
             * the ring's; it waits for TXQ_LOW_WATER/EMPTY itself). */
            if (r == VCON_WAIT && !c->sleep)
                r = VCON_OK;
            break;
        }
        case kDequeueData: {
            uint32_t n = 0;
            uint32_t want = c->min > done ? c->min - done : 0;
            r = vcon_port_dequeue_data(fDev, c->key, c->buffer + done, c->size - done, &n, want);
            done += n;
            *c->count = done;
            break;
        }
        default:
            return kIOReturnBadArgument;
        }
        if (r != VCON_WAIT)
            return toIOReturn(r);
        if (!sleepOnPort(c->key))
            return kIOReturnAborted;
    }
}

IOReturn org_virtiodarwin_VirtioConsole::acquirePort(bool sleep, void *refCon)
{
    Call c = {};
    c.op = kAcquire;
    c.key = keyOf(refCon);
    c.sleep = sleep;
    return call(&c);
}

IOReturn org_virtiodarwin_VirtioConsole::releasePort(void *refCon)
{
    Call c = {};
    c.op = kRelease;
    c.key = keyOf(refCon);
    return call(&c);
}

IOReturn org_virtiodarwin_VirtioConsole::setState(UInt32 state, UInt32 mask, void *refCon)
{
    Call c = {};
    c.op = kSetState;
    c.key = keyOf(refCon);
    c.state = state;
    c.mask = mask;
    return call(&c);
}

UInt32 org_virtiodarwin_VirtioConsole::getState(void *refCon)
{
    Call c = {};
    c.op = kGetState;
    c.key = keyOf(refCon);
    return call(&c) == kIOReturnSuccess ? c.result : 0;
}

IOReturn org_virtiodarwin_VirtioConsole::watchState(UInt32 *state, UInt32 mask, void *refCon)
{
    if (!state)
        return kIOReturnBadArgument;
    Call c = {};
    c.op = kWatchState;
    c.key = keyOf(refCon);
    c.statep = state;
    c.mask = mask;
    return call(&c);
}

UInt32 org_virtiodarwin_VirtioConsole::nextEvent(void *refCon)
{
    return fDev ? vcon_port_next_event(fDev, keyOf(refCon)) : PD_E_EOQ;
}

IOReturn org_virtiodarwin_VirtioConsole::executeEvent(UInt32 event, UInt32 data, void *refCon)
{
    Call c = {};
    c.op = kExecute;
    c.key = keyOf(refCon);
    c.event = event;
    c.data = data;
    return call(&c);
}

IOReturn org_virtiodarwin_VirtioConsole::requestEvent(UInt32 event, UInt32 *data, void *refCon)
{
    if (!data)
        return kIOReturnBadArgument;
    Call c = {};
    c.op = kRequest;
    c.key = keyOf(refCon);
    c.event = event;
    c.datap = data;
    return call(&c);
}

/* No event queue on a virtio port: an event is executed at once (never waits). */
IOReturn org_virtiodarwin_VirtioConsole::enqueueEvent(UInt32 event, UInt32 data, bool, void *refCon)
{
    return executeEvent(event, data, refCon);
}

IOReturn org_virtiodarwin_VirtioConsole::dequeueEvent(UInt32 *event, UInt32 *data, bool, void *refCon)
{
    if (!event || !data)
        return kIOReturnBadArgument;
    Call c = {};
    c.op = kDequeueEvent;
    c.key = keyOf(refCon);
    c.eventp = event;
    c.datap = data;
    return call(&c);
}

IOReturn org_virtiodarwin_VirtioConsole::enqueueData(UInt8 *buffer, UInt32 size, UInt32 *count,
                                                     bool sleep, void *refCon)
{
    if (!buffer || !count)
        return kIOReturnBadArgument;
    *count = 0;
    Call c = {};
    c.op = kEnqueueData;
    c.key = keyOf(refCon);
    c.buffer = buffer;
    c.size = size;
    c.count = count;
    c.sleep = sleep;
    return call(&c);
}

IOReturn org_virtiodarwin_VirtioConsole::dequeueData(UInt8 *buffer, UInt32 size, UInt32 *count,
                                                     UInt32 min, void *refCon)
{
    if (!buffer || !count)
        return kIOReturnBadArgument;
    *count = 0;
    Call c = {};
    c.op = kDequeueData;
    c.key = keyOf(refCon);
    c.buffer = buffer;
    c.size = size;
    c.count = count;
    c.min = min;
    return call(&c);
}

/* ---- IORegistry ---- */

void org_virtiodarwin_VirtioConsole::publishStatistics(void)
{
    VconStats s;
    bzero(&s, sizeof(s));
    if (fDev)
        vcon_stats(fDev, &s);
    OSDictionary *d = OSDictionary::withCapacity(14);
    if (!d)
        return;
    const struct { const char *key; UInt64 value; } counters[] = {
        { "Bytes sent", s.tx_bytes },
        { "Bytes received", s.rx_bytes },
        { "Bytes dropped", s.rx_dropped_bytes },
        { "Transmit ring full", s.tx_busy },
        { "Control messages received", s.control_rx },
        { "Control messages sent", s.control_tx },
        { "Control messages refused", s.control_rejected },
        { "Emergency bytes", s.emergency_bytes },
        { "Bad completions", s.bad_tokens },
        { "Interrupts", s.interrupts },
        { "Recoveries", s.recoveries },
        { "Suspends", s.suspends },
        { "Ports", s.ports },
        { "Publications", s.publications },
    };
    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++) {
        OSNumber *n = OSNumber::withNumber(counters[i].value, 64);
        if (n) {
            d->setObject(counters[i].key, n);
            n->release();
        }
    }
    setProperty("Statistics", d);
    d->release();
}
