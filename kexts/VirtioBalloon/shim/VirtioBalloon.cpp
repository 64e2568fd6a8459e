/*
 * VirtioBalloon.kext: IOKit plumbing around the Rust balloon driver (see the header).
 */
#include "VirtioBalloon.h"

#include <IOKit/IOBufferMemoryDescriptor.h>
#include <IOKit/IOLib.h>
#include <libkern/c++/OSDictionary.h>
#include <libkern/c++/OSNumber.h>
#include <mach/vm_param.h>
#include <pexpert/pexpert.h>

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
    /* The guest's memory size is not available through public KPI (see the header). */
    fConfig.total_pages = 0;
    /* The family's work loop: the family delivers this device's interrupts on it. */
    fWorkLoop = getWorkLoop();
    fGate = IOCommandGate::commandGate(this);
    fTimer = IOTimerEventSource::timerEventSource(this, &org_virtiodarwin_VirtioBalloon::timerFired);
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
    fCallbacks.alloc_chunk = cbAllocChunk;
    fCallbacks.free_chunk = cbFreeChunk;
    fCallbacks.changed = cbChanged;
    if (fGate->runAction(gatedStart) != kIOReturnSuccess) {
        IOLog("VirtioBalloon: cannot drive this device\n");
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
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBalloon::setPowerState(unsigned long ordinal, IOService *device)
{
    if (!fGate)
        return IOPMAckImplied;
    fGate->runAction(gatedSetPower, (void *)(uintptr_t)ordinal);
    return IOPMAckImplied;
}

/* Sleep: the device is reset and every page goes back to the kernel (the host forgets the
 * balloon at the reset; wired pages would also go into a hibernation image). Wake: the
 * device is brought up from scratch and inflates to the host's target again. */
IOReturn org_virtiodarwin_VirtioBalloon::gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)owner;
    bool on = (uintptr_t)ordinal != 0;
    if (!me->fDev || me->fStopping)
        return kIOReturnSuccess;
    if (!on && !me->fAsleep) {
        me->fAsleep = true;
        me->fStarved = false;
        me->fTimer->cancelTimeout();
        vbal_suspend(me->fDev);
    } else if (on && me->fAsleep) {
        if (vbal_resume(me->fDev) != VBAL_OK) {
            /* Left asleep: a later wake tries again. */
            IOLog("VirtioBalloon: the device did not come back after wake\n");
            return kIOReturnSuccess;
        }
        me->fAsleep = false;
    }
    me->publishProperties();
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioBalloon::stop(IOService *provider)
{
    PMstop();
    /* Once the timer is off the work loop no poll can start; the gated stop then runs with
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

IOReturn org_virtiodarwin_VirtioBalloon::gatedStop(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioBalloon *me = (org_virtiodarwin_VirtioBalloon *)owner;
    me->fStopping = true;
    if (me->fDev) {
        /* Resets the device and frees every chunk through cbFreeChunk. */
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
    OSDictionary *d = OSDictionary::withCapacity(12);
    if (!d)
        return;
    const struct { const char *key; UInt64 value; } counters[] = {
        { "Inflate requests", s.inflate_requests },
        { "Deflate requests", s.deflate_requests },
        { "Stats buffers", s.stats_buffers },
        { "OOM pages", s.oom_pages },
        { "Allocation failures", s.alloc_failures },
        { "Chunks allocated", s.chunks_allocated },
        { "Chunks freed", s.chunks_freed },
        { "Interrupts", s.interrupts },
        { "Recoveries", s.recoveries },
        { "Suspends", s.suspends },
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
