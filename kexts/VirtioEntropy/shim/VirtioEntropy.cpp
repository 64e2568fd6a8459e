/*
 * VirtioEntropy.kext: IOKit plumbing around the Rust entropy driver (see the header).
 */
#include "VirtioEntropy.h"

#include <IOKit/IOLib.h>
#include <libkern/c++/OSDictionary.h>
#include <libkern/c++/OSNumber.h>
#include <sys/fcntl.h>
#include <sys/uio.h>
#include <sys/vnode.h>

#define super IOService
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioEntropy, IOService)

/* ---- lifecycle ---- */

bool org_virtiodarwin_VirtioEntropy::start(IOService *provider)
{
    fNub = OSDynamicCast(org_virtiodarwin_VirtioDevice, provider);
    if (!fNub || !fNub->virtioDevice() || !super::start(provider))
        return false;
    vrng_log_init();
    /* The family's work loop: the family delivers this device's interrupts on it. */
    fWorkLoop = getWorkLoop();
    fGate = IOCommandGate::commandGate(this);
    fTimer = IOTimerEventSource::timerEventSource(this, &org_virtiodarwin_VirtioEntropy::timerFired);
    if (!fWorkLoop || !fGate || !fTimer || fWorkLoop->addEventSource(fGate) != kIOReturnSuccess) {
        super::stop(provider);
        return false;
    }
    if (fWorkLoop->addEventSource(fTimer) != kIOReturnSuccess) {
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    fCallbacks.ctx = this;
    fCallbacks.ready = cbReady;
    if (fGate->runAction(gatedStart) != kIOReturnSuccess) {
        IOLog("VirtioEntropy: cannot drive this device\n");
        fTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fTimer);
        /* The device may be live already (a failure after vrng_create): destroyed gated. */
        fGate->runAction(gatedStop);
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    /* A virtio device keeps nothing across sleep: without a power driver the device would
     * be left reset (and the pool unfed) after the first wake. */
    PMinit();
    provider->joinPMtree(this);
    if (registerPowerDriver(this, gVirtioPowerStates, 2) != kIOReturnSuccess)
        IOLog("VirtioEntropy: no power management (the device will not survive sleep)\n");
    registerService();
    return true;
}

IOReturn org_virtiodarwin_VirtioEntropy::gatedStart(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioEntropy *me = (org_virtiodarwin_VirtioEntropy *)owner;
    /* Every buffer is posted by vrng_create: the first bytes the device delivers go to the
     * pool (cbReady brings the timer forward). Armed first, so that it cannot postpone a
     * feed an early interrupt scheduled. */
    me->fWantFeed = true;
    me->fTimer->setTimeoutMS(VRNG_FEED_RETRY_MS);
    if (vrng_create(me->fNub->virtioDevice(), &me->fCallbacks, &me->fDev) != VRNG_OK || !me->fDev)
        return kIOReturnNotAttached;
    me->publishStatistics();
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioEntropy::setPowerState(unsigned long ordinal, IOService *device)
{
    if (!fGate)
        return IOPMAckImplied;
    fGate->runAction(gatedSetPower, (void *)(uintptr_t)ordinal);
    return IOPMAckImplied;
}

/* Sleep: the device is reset and its buffers freed. Wake: it is brought up from scratch,
 * and the first bytes it delivers feed the pool again (the sleep may have been long). */
IOReturn org_virtiodarwin_VirtioEntropy::gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *)
{
    org_virtiodarwin_VirtioEntropy *me = (org_virtiodarwin_VirtioEntropy *)owner;
    bool on = (uintptr_t)ordinal != 0;
    if (!me->fDev || me->fStopping)
        return kIOReturnSuccess;
    if (!on && !me->fAsleep) {
        me->fAsleep = true;
        vrng_suspend(me->fDev);
    } else if (on && me->fAsleep) {
        if (vrng_resume(me->fDev) != VRNG_OK) {
            /* Left asleep: a later wake tries again. */
            IOLog("VirtioEntropy: the device did not come back after wake\n");
            return kIOReturnSuccess;
        }
        me->fAsleep = false;
        me->fWantFeed = true;
    }
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioEntropy::stop(IOService *provider)
{
    PMstop();
    /* Once the timer is off the work loop no feed can start; the gated stop then runs with
     * nothing of ours pending. */
    if (fTimer) {
        fTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fTimer);
    }
    if (fGate) {
        fGate->runAction(gatedStop);
        fWorkLoop->removeEventSource(fGate);
    }
    super::stop(provider);
}

IOReturn org_virtiodarwin_VirtioEntropy::gatedStop(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioEntropy *me = (org_virtiodarwin_VirtioEntropy *)owner;
    me->fStopping = true;
    if (me->fDev) {
        vrng_stop(me->fDev);
        vrng_destroy(me->fDev);
        me->fDev = NULL;
    }
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioEntropy::free(void)
{
    /* stop and start's failure path destroy the driver under the gate; an ungated destroy
     * here could race an interrupt on the family's work loop: never here. */
    if (fDev)
        IOLog("VirtioEntropy: freed with a live driver (not destroyed: no work loop to do it on)\n");
    OSSafeReleaseNULL(fTimer);
    OSSafeReleaseNULL(fGate);
    super::free();
}

/* ---- feeding the pool (timer action: the work loop's gate is closed) ---- */

/* One feed, when one is due: at most VRNG_FEED_BYTES from the device to /dev/random. The
 * device's bytes are taken only once /dev/random is open, so none are read and dropped;
 * early in boot, before devfs is mounted, the open fails and the timer tries again every
 * VRNG_FEED_RETRY_MS. */
void org_virtiodarwin_VirtioEntropy::feed(void)
{
    if (!fWantFeed || !fDev || fStopping || fAsleep)
        return;
    vfs_context_t ctx = vfs_context_create(NULL);
    if (!ctx)
        return;
    vnode_t vp = NULL;
    if (vnode_open("/dev/random", FWRITE, 0, 0, &vp, ctx) != 0 || !vp) {
        vfs_context_rele(ctx);
        return;
    }
    size_t got = 0;
    if (vrng_read(fDev, fBuffer, sizeof(fBuffer), &got) == VRNG_OK && got > 0) {
        int resid = 0;
        int err = vn_rdwr(UIO_WRITE, vp, (caddr_t)fBuffer, (int)got, 0, UIO_SYSSPACE, 0,
                          vfs_context_ucred(ctx), &resid, vfs_context_proc(ctx));
        /* No copy of what went into the pool stays in this object. */
        bzero(fBuffer, sizeof(fBuffer));
        if (err != 0 || resid < 0 || (size_t)resid > got) {
            fFeedErrors++;
        } else {
            fFeeds++;
            fBytesFed += got - (size_t)resid;
            fWantFeed = false;
        }
    }
    /* Nothing delivered yet: still due, and the next `ready` brings the timer forward. */
    vnode_close(vp, FWRITE, ctx);
    vfs_context_rele(ctx);
    publishStatistics();
}

void org_virtiodarwin_VirtioEntropy::timerFired(OSObject *owner, IOTimerEventSource *sender)
{
    org_virtiodarwin_VirtioEntropy *me = (org_virtiodarwin_VirtioEntropy *)owner;
    if (me->fStopping)
        return;
    /* Bounded rate: the timer fires with no feed due only when a period has passed since
     * the last feed (cbReady brings it forward only while one is due); before the first
     * feed succeeded it retries every VRNG_FEED_RETRY_MS. */
    me->fWantFeed = true;
    me->feed();
    sender->setTimeoutMS(me->fFeeds ? VRNG_FEED_PERIOD_MS : VRNG_FEED_RETRY_MS);
}

/* From vrng_interrupt (the family's interrupt action): bytes arrived. A due feed runs from
 * the timer right away rather than here, so no file I/O happens in the interrupt path. */
void org_virtiodarwin_VirtioEntropy::cbReady(void *ctx, size_t bytes)
{
    org_virtiodarwin_VirtioEntropy *me = (org_virtiodarwin_VirtioEntropy *)ctx;
    if (me->fWantFeed && bytes > 0 && !me->fStopping)
        me->fTimer->setTimeoutMS(0);
}

void org_virtiodarwin_VirtioEntropy::publishStatistics(void)
{
    VrngStats s;
    bzero(&s, sizeof(s));
    if (fDev)
        vrng_stats(fDev, &s);
    OSDictionary *d = OSDictionary::withCapacity(10);
    if (!d)
        return;
    const struct { const char *key; UInt64 value; } counters[] = {
        { "Completions", s.completions },
        { "Empty completions", s.empty_completions },
        { "Bytes received", s.bytes_received },
        { "Bytes read", s.bytes_read },
        { "Interrupts", s.interrupts },
        { "Recoveries", s.recoveries },
        { "Suspends", s.suspends },
        { "Feeds", fFeeds },
        { "Bytes fed", fBytesFed },
        { "Feed errors", fFeedErrors },
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
