/*
 * VirtioBalloon.kext: IOKit plumbing around the Rust balloon driver (see the header).
 */
#include "VirtioBalloon.h"

#include <IOKit/IOBufferMemoryDescriptor.h>
#include <IOKit/IOLib.h>
#include <kern/clock.h>
#include <libkern/c++/OSDictionary.h>
#include <libkern/c++/OSNumber.h>
#include <libkern/sysctl.h>
#include <mach/vm_param.h>
#include <pexpert/pexpert.h>
#include <sys/errno.h>

#define super IOService
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioBalloon, IOService)

/* Page-aligned physical addresses below 2^44: 4 KiB frame numbers fit 32 bits. */
static const uint64_t kBalloonPhysicalMask = ((1ULL << 44) - 1) & ~((uint64_t)PAGE_SIZE - 1);
static const char kBalloonMaxBootArg[] = "virtiodarwin_balloon_max_mib";

/* ---- lifecycle ---- */

bool org_virtiodarwin_VirtioBalloon::start(IOService *provider)
{
    fNub = OSDynamicCast(org_virtiodarwin_VirtioDevice, provider);
    if (!fNub || !fNub->virtioDevice() || !super::start(provider))
        return false;
    vbal_log_init();
    uint32_t maxMiB = VBAL_DEFAULT_MAX_MIB;
    uint32_t arg = 0;
    if (PE_parse_boot_argn(kBalloonMaxBootArg, &arg, sizeof(arg)) && arg > 0)
        maxMiB = arg;
    fConfig.page_size = PAGE_SIZE;
    uint64_t maxPages = ((uint64_t)maxMiB << 20) / PAGE_SIZE;
    fConfig.max_pages = maxPages > UINT32_MAX ? UINT32_MAX : (uint32_t)maxPages;
    /* max_mem is not exported (see the header): vbal_create reads hw.memsize through
     * cbReadSysctl and lowers the bound to it, so a huge boot-arg cannot size the tables. */
    fConfig.total_pages = 0;
    /* The family's work loop: the family delivers this device's interrupts on it. */
    fWorkLoop = getWorkLoop();
    fGate = IOCommandGate::commandGate(this);
    fTimer = IOTimerEventSource::timerEventSource(this, &org_virtiodarwin_VirtioBalloon::timerFired);
    fPressureTimer =
        IOTimerEventSource::timerEventSource(this, &org_virtiodarwin_VirtioBalloon::pressureFired);
    if (!fWorkLoop || !fGate || !fTimer || !fPressureTimer ||
        fWorkLoop->addEventSource(fGate) != kIOReturnSuccess) {
        super::stop(provider);
        return false;
    }
    if (fWorkLoop->addEventSource(fTimer) != kIOReturnSuccess) {
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    if (fWorkLoop->addEventSource(fPressureTimer) != kIOReturnSuccess) {
        fWorkLoop->removeEventSource(fTimer);
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    fCallbacks.ctx = this;
    fCallbacks.alloc_chunk = cbAllocChunk;
    fCallbacks.free_chunk = cbFreeChunk;
    fCallbacks.changed = cbChanged;
    fCallbacks.read_sysctl = cbReadSysctl;
    if (fGate->runAction(gatedStart) != kIOReturnSuccess) {
        IOLog("VirtioBalloon: cannot drive this device\n");
        fPressureTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fPressureTimer);
        fTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fTimer);
        /* The device may be live already (a failure after vbal_create): destroyed gated. */
        fGate->runAction(gatedStop);
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    /* A virtio device keeps nothing across sleep: without a power driver the balloon
     * would be left reset (and empty) after the first wake. */
    PMinit();
    provider->joinPMtree(this);
    if (registerPowerDriver(this, gVirtioPowerStates, 2) != kIOReturnSuccess)
        IOLog("VirtioBalloon: no power management (the device will not survive sleep)\n");
    registerService();
    return true;
}

IOReturn org_virtiodarwin_VirtioBalloon::gatedStart(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)owner;
    /* vbal_create reads the target and starts inflating at once. */
    if (vbal_create(me->fNub->virtioDevice(), &me->fConfig, &me->fCallbacks, &me->fDev) != VBAL_OK ||
        !me->fDev)
        return kIOReturnNotAttached;
    me->publishProperties();
    me->armPressureTimer();
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBalloon::setPowerState(unsigned long ordinal, IOService *device)
{
    if (!fGate)
        return IOPMAckImplied;
    fGate->runAction(gatedSetPower, (void *)(uintptr_t)ordinal);
    return IOPMAckImplied;
}

static uint64_t uptimeMS(void);

/* Gated, before the reset of sleep and stop: the balloon is emptied through the deflate
 * queue so that the host learns which pages the guest takes back (virtio 1.2 §5.5.6.1;
 * QEMU's reset leaves `actual` as it was). commandSleep opens the gate while it waits, so
 * the family's interrupt action (on this work loop) delivers the acknowledgements; cbChanged
 * wakes the wait, which also ends after VBAL_DRAIN_POLL_MS (vbal_drain polls the rings).
 * vbal_drain bounds the whole (VBAL_DRAIN_STALL_MS without progress, VBAL_DRAIN_MS in all);
 * the loop's own deadline only guards against a clock that stands still. fDev is read again
 * after each wait: a stop may have run meanwhile. */
void org_virtiodarwin_VirtioBalloon::drain(void)
{
    uint64_t start = uptimeMS();
    fDraining = true;
    while (fDev && vbal_drain(fDev, uptimeMS()) == VBAL_E_BUSY &&
           uptimeMS() - start < (uint64_t)VBAL_DRAIN_MS + VBAL_DRAIN_STALL_MS) {
        uint64_t deadline = 0;
        clock_interval_to_deadline(VBAL_DRAIN_POLL_MS, kMillisecondScale, &deadline);
        fGate->commandSleep(&fDraining, deadline, THREAD_UNINT);
    }
    fDraining = false;
}

/* Sleep: the balloon is emptied (the host told of every page), the device is reset and
 * every page goes back to the kernel (wired pages would go into a hibernation image). Wake:
 * the device is brought up from scratch and inflates to the host's target again. */
IOReturn org_virtiodarwin_VirtioBalloon::gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)owner;
    bool on = (uintptr_t)ordinal != 0;
    if (!me->fDev || me->fStopping || me->fDraining)
        return kIOReturnSuccess;
    if (!on && !me->fAsleep) {
        me->fAsleep = true;
        me->fStarved = false;
        me->fTimer->cancelTimeout();
        me->fPressureTimer->cancelTimeout();
        me->drain();
        /* The gate was open during the wait: checked again, although PMstop (stop's first
         * step) waits for a setPowerState in progress, so no stop comes between. */
        if (!me->fDev || me->fStopping)
            return kIOReturnSuccess;
        vbal_suspend(me->fDev);
    } else if (on && me->fAsleep) {
        if (vbal_resume(me->fDev) != VBAL_OK) {
            /* Left asleep: a later wake tries again. */
            IOLog("VirtioBalloon: the device did not come back after wake\n");
            return kIOReturnSuccess;
        }
        me->fAsleep = false;
        me->armPressureTimer();
    }
    me->publishProperties();
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioBalloon::stop(IOService *provider)
{
    PMstop();
    /* Once the timers are off the work loop no poll or pressure check can start; the gated
     * stop then runs with nothing of ours pending. */
    if (fPressureTimer) {
        fPressureTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fPressureTimer);
    }
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

IOReturn org_virtiodarwin_VirtioBalloon::gatedStop(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)owner;
    me->fStopping = true;
    if (me->fDev) {
        /* The host is told of every page first; then vbal_stop resets the device and frees
         * every chunk through cbFreeChunk. */
        me->drain();
        vbal_stop(me->fDev);
        vbal_destroy(me->fDev);
        me->fDev = NULL;
    }
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioBalloon::free(void)
{
    /* stop and start's failure path destroy the driver under the gate; an ungated destroy
     * here could race an interrupt on the family's work loop: never here. */
    if (fDev)
        IOLog("VirtioBalloon: freed with a live driver (not destroyed: no work loop to do it on)\n");
    OSSafeReleaseNULL(fPressureTimer);
    OSSafeReleaseNULL(fTimer);
    OSSafeReleaseNULL(fGate);
    super::free();
}

/* ---- pages (called by the Rust pool on the work loop) ---- */

bool org_virtiodarwin_VirtioBalloon::cbAllocChunk(void *ctx, uint64_t *pages, uint32_t count, void **cookie)
{
    (void)ctx;
    IOBufferMemoryDescriptor *bmd = IOBufferMemoryDescriptor::inTaskWithPhysicalMask(
        kernel_task, kIODirectionInOut | kIOMemoryMapperNone, (mach_vm_size_t)count * PAGE_SIZE,
        kBalloonPhysicalMask);
    if (!bmd)
        return false;
    if (bmd->prepare() != kIOReturnSuccess) {
        bmd->release();
        return false;
    }
    for (uint32_t i = 0; i < count; i++) {
        IOByteCount len = 0;
        addr64_t pa = bmd->getPhysicalSegment((IOByteCount)i * PAGE_SIZE, &len, kIOMemoryMapperNone);
        /* Each page is physically contiguous and page-aligned (the mask's low zero bits);
         * anything else is not a page the balloon can name. */
        if (len < PAGE_SIZE || (pa & (PAGE_SIZE - 1)) != 0 || (pa & ~kBalloonPhysicalMask) != 0) {
            bmd->complete();
            bmd->release();
            return false;
        }
        pages[i] = pa;
    }
    *cookie = bmd;
    return true;
}

void org_virtiodarwin_VirtioBalloon::cbFreeChunk(void *ctx, void *cookie)
{
    (void)ctx;
    IOBufferMemoryDescriptor *bmd = (IOBufferMemoryDescriptor *)cookie;
    bmd->complete();
    bmd->release();
}

/* From vbal_interrupt or vbal_poll: the properties are published from the timer, so
 * OSNumber allocation stays out of the interrupt action; a starved balloon retries after
 * VBAL_RETRY_MS. */
void org_virtiodarwin_VirtioBalloon::cbChanged(void *ctx, bool starved)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)ctx;
    me->fStarved = starved;
    /* An interrupt while the balloon is emptied: drain() calls vbal_drain again now. */
    if (me->fDraining) {
        me->fGate->commandWakeup(&me->fDraining, false);
        return;
    }
    if (!me->fInTimer && !me->fStopping)
        me->fTimer->setTimeoutMS(starved ? VBAL_RETRY_MS : 0);
}

void org_virtiodarwin_VirtioBalloon::timerFired(OSObject *owner, IOTimerEventSource *sender)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)owner;
    if (me->fStopping || me->fAsleep || !me->fDev)
        return;
    me->fInTimer = true;
    if (me->fStarved)
        vbal_poll(me->fDev);
    me->publishProperties();
    me->fInTimer = false;
    if (me->fStarved)
        sender->setTimeoutMS(VBAL_RETRY_MS);
}

/* ---- the kernel's memory figures and pressure level (public KPI: sysctlbyname) ---- */

/* VbalCallbacks::read_sysctl, on the work loop (thread context: sysctl handlers may take
 * locks). The Rust side chooses the names and checks the size written. */
int32_t org_virtiodarwin_VirtioBalloon::cbReadSysctl(void *ctx, const char *name, void *buf, uint32_t *len)
{
    (void)ctx;
    if (!name || !buf || !len)
        return EINVAL;
    size_t room = *len;
    size_t n = room;
    int err = sysctlbyname(name, buf, &n, NULL, 0);
    if (err != 0)
        return err;
    *len = (uint32_t)(n < room ? n : room);
    return 0;
}

static uint64_t uptimeMS(void)
{
    uint64_t abstime = 0;
    uint64_t ns = 0;
    clock_get_uptime(&abstime);
    absolutetime_to_nanoseconds(abstime, &ns);
    return ns / 1000000ULL;
}

/* Gated (start, wake): the memory timer runs while DEFLATE_ON_OOM or PAGE_REPORTING is
 * negotiated (VBAL_PRESSURE_MS == VBAL_REPORT_MS: one tick serves both). */
void org_virtiodarwin_VirtioBalloon::armPressureTimer(void)
{
    VbalInfo s;
    bzero(&s, sizeof(s));
    if (fDev && vbal_info(fDev, &s) == VBAL_OK && (s.deflate_on_oom != 0 || s.page_reporting != 0))
        fPressureTimer->setTimeoutMS(VBAL_PRESSURE_MS);
}

/* Unsupported (feature not negotiated) or stopped: that check is off until the next wake
 * re-arms the timer. A figure the kernel does not give (VBAL_E_UNAVAILABLE) or a device
 * being recovered is tried again at the next tick. */
static bool keepTicking(int32_t status)
{
    return status != VBAL_E_UNSUPPORTED && status != VBAL_E_STOPPED && status != VBAL_E_INVALID;
}

void org_virtiodarwin_VirtioBalloon::pressureFired(OSObject *owner, IOTimerEventSource *sender)
{
    org_virtiodarwin_VirtioBalloon *me = OSDynamicCast(org_virtiodarwin_VirtioBalloon, owner);
    if (!me || me->fStopping || me->fAsleep || !me->fDev)
        return;
    uint64_t now = uptimeMS();
    VbalPressure p;
    bzero(&p, sizeof(p));
    int32_t pressure = vbal_pressure_check(me->fDev, now, &p);
    /* Pressure first: a deflate for pressure also closes the reporting gate. */
    VbalReport r;
    bzero(&r, sizeof(r));
    int32_t report = vbal_report_check(me->fDev, now, &r);
    if ((pressure == VBAL_OK && p.released + p.pending > 0) ||
        (report == VBAL_OK && r.outcome == VBAL_REPORT_SENT))
        me->publishProperties();
    if (keepTicking(pressure) || keepTicking(report))
        sender->setTimeoutMS(VBAL_PRESSURE_MS);
}

void org_virtiodarwin_VirtioBalloon::publishProperties(void)
{
    VbalInfo s;
    bzero(&s, sizeof(s));
    if (fDev)
        vbal_info(fDev, &s);
    setProperty("TargetFrames", (unsigned long long)s.target_frames, 32);
    setProperty("ActualFrames", (unsigned long long)s.actual_frames, 32);
    setProperty("PagesHeld", (unsigned long long)s.pages_held, 64);
    setProperty("PagesWired", (unsigned long long)s.pages_wired, 64);
    setProperty("PageSize", (unsigned long long)s.page_size, 32);
    setProperty("DeflateOnOOM", s.deflate_on_oom != 0);
    setProperty("MemoryPressure", (unsigned long long)s.pressure_level, 32);
    setProperty("PageReporting", s.page_reporting != 0);
    setProperty("ReportPages", (unsigned long long)s.report_pages, 64);
    setProperty("PagesLeaked", (unsigned long long)s.pages_leaked, 64);
    OSDictionary *d = OSDictionary::withCapacity(18);
    if (!d)
        return;
    const struct { const char *key; UInt64 value; } counters[] = {
        { "Inflate requests", s.inflate_requests },
        { "Deflate requests", s.deflate_requests },
        { "Stats buffers", s.stats_buffers },
        { "OOM pages", s.oom_pages },
        { "Pressure deflates", s.pressure_deflates },
        { "Sysctl failures", s.sysctl_failures },
        { "Allocation failures", s.alloc_failures },
        { "Chunks allocated", s.chunks_allocated },
        { "Chunks freed", s.chunks_freed },
        { "Interrupts", s.interrupts },
        { "Recoveries", s.recoveries },
        { "Suspends", s.suspends },
        { "Report rounds", s.report_rounds },
        { "Reports", s.reports },
        { "Bytes reported", s.bytes_reported },
        { "Report rounds cut short", s.report_cut_short },
        { "Report chunks leaked", s.report_chunks_leaked },
        { "Balloon chunks leaked", s.balloon_chunks_leaked },
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
