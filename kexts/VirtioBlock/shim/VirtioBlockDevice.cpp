/*
 * VirtioBlock.kext: IOKit plumbing around the Rust block driver (see the header).
 */
#include "VirtioBlockDevice.h"

#include <IOKit/IOLib.h>
#include <IOKit/IOKitKeys.h>
#include <IOKit/storage/IOStorageDeviceCharacteristics.h>
#include <IOKit/storage/IOStorageProtocolCharacteristics.h>
#include <libkern/c++/OSDictionary.h>
#include <libkern/c++/OSNumber.h>
#include <libkern/c++/OSString.h>
#include <libkern/c++/OSBoolean.h>

#define super IOBlockStorageDevice
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioBlockDevice, IOBlockStorageDevice)

/* How long `start` waits for the device's ID (GET_ID). */
static const UInt32 kIdTimeoutSeconds = 5;
/* Completions between two refreshes of the IORegistry's Statistics (statsTimerFired). */
static const UInt32 kCompletionsPerStatsRefresh = 1024;

static IOReturn toIOReturn(int32_t st)
{
    switch (st) {
    case VBLK_OK: return kIOReturnSuccess;
    case VBLK_E_IO: return kIOReturnIOError;
    case VBLK_E_UNSUPPORTED: return kIOReturnUnsupported;
    case VBLK_E_READ_ONLY: return kIOReturnNotWritable;
    case VBLK_E_INVALID: return kIOReturnBadArgument;
    case VBLK_E_OUT_OF_RANGE: return kIOReturnBadArgument;
    case VBLK_E_TOO_LARGE: return kIOReturnBadArgument;
    case VBLK_E_BUSY: return kIOReturnNoResources;
    case VBLK_E_ABORTED: return kIOReturnAborted;
    default: return kIOReturnNotAttached;
    }
}

/* ---- lifecycle ---- */


bool org_virtiodarwin_VirtioBlockDevice::start(IOService *provider)
{
    fNub = OSDynamicCast(org_virtiodarwin_VirtioDevice, provider);
    if (!fNub || !fNub->virtioDevice() || !super::start(provider))
        return false;
    vblk_log_init();
    /* The family's work loop: the family delivers this device's interrupts on it. */
    fWorkLoop = getWorkLoop();
    fGate = IOCommandGate::commandGate(this);
    fRequests = (Request *)IOMalloc(sizeof(Request) * kVirtioBlockMaxRequests);
    fResizeCall = thread_call_allocate(&org_virtiodarwin_VirtioBlockDevice::resizeCallout, this);
    fStatsTimer = IOTimerEventSource::timerEventSource(this, statsTimerFired);
    if (!fWorkLoop || !fGate || !fRequests || !fResizeCall || !fStatsTimer ||
        fWorkLoop->addEventSource(fGate) != kIOReturnSuccess) {
        super::stop(provider);
        return false;
    }
    if (fWorkLoop->addEventSource(fStatsTimer) != kIOReturnSuccess) {
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    bzero(fRequests, sizeof(Request) * kVirtioBlockMaxRequests);
    fCallbacks.ctx = this;
    fCallbacks.complete = cbComplete;
    fCallbacks.restart = cbRestart;
    fCallbacks.capacity_changed = cbCapacityChanged;
    if (fGate->runAction(gatedStart) != kIOReturnSuccess) {
        IOLog("VirtioBlock: cannot drive this device\n");
        /* The device may be live already (a failure after vblk_create): destroyed gated. */
        fGate->runAction(gatedStop);
        fStatsTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fStatsTimer);
        fWorkLoop->removeEventSource(fGate);
        super::stop(provider);
        return false;
    }
    publishProperties();
    /* Sleep and wake: without a power driver the disk would be lost after a wake (virtio
     * keeps nothing across the reset a sleep implies). */
    PMinit();
    provider->joinPMtree(this);
    if (registerPowerDriver(this, gVirtioPowerStates, 2) != kIOReturnSuccess)
        IOLog("VirtioBlock: no power management (the disk will not survive sleep)\n");
    registerService();
    return true;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::setPowerState(unsigned long ordinal, IOService *device)
{
    if (!fGate)
        return IOPMAckImplied;
    fGate->runAction(gatedSetPower, (void *)(uintptr_t)ordinal);
    return IOPMAckImplied;
}

/* Sleep: requests submitted from now on are held; those in flight complete, or come back
 * aborted by the reset and are held again (cbComplete), in front. Wake: the device is
 * rebuilt and everything held is resubmitted in order. */
IOReturn org_virtiodarwin_VirtioBlockDevice::gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)owner;
    bool on = (uintptr_t)ordinal != 0;
    if (!me->fDev || me->fStopping)
        return kIOReturnSuccess;
    if (!on && !me->fAsleep) {
        me->fAsleep = true;
        me->fSleeps++;
        if (vblk_suspend(me->fDev) != VBLK_OK)
            IOLog("VirtioBlock: the device did not quiesce cleanly before sleep\n");
    } else if (on && me->fAsleep) {
        /* Awake whatever the answer: a device that did not come back is failed, and what is
         * held then fails (VBLK_E_DEVICE) instead of waiting for a wake that may never come;
         * the next wake tries the device again. */
        if (vblk_resume(me->fDev) != VBLK_OK)
            IOLog("VirtioBlock: the device did not come back after wake; its requests fail until a later wake brings it back\n");
        me->fAsleep = false;
        me->refreshInfo();
        cbRestart(me);
    }
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::gatedStart(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)owner;
    int32_t st = vblk_create(me->fNub->virtioDevice(), &me->fCallbacks, &me->fDev);
    if (st != VBLK_OK || !me->fDev)
        return toIOReturn(st);
    me->refreshInfo();
    /* Segments from IODMACommand: at most what one vblk_submit_rw takes, of at most the
     * device's size_max, up to the largest transfer the driver accepts. */
    UInt64 maxSeg = me->fInfo.max_segment_bytes ? me->fInfo.max_segment_bytes : me->fInfo.max_transfer_bytes;
    me->fFree = NULL;
    for (int i = kVirtioBlockMaxRequests - 1; i >= 0; i--) {
        Request *r = &me->fRequests[i];
        r->dma = IODMACommand::withSpecification(kIODMACommandOutputHost64, 64, maxSeg,
                                                 IODMACommand::kMapped, me->fInfo.max_transfer_bytes, 1);
        if (!r->dma)
            return kIOReturnNoMemory;
        r->next = me->fFree;
        me->fFree = r;
    }
    /* The serial number (GET_ID); the disk works without it. */
    Request *r = me->allocRequest(false);
    if (r) {
        r->kind = kGetId;
        r->sync = true;
        if (vblk_request_id(me->fDev, r) == VBLK_OK)
            me->waitFor(r, kIdTimeoutSeconds);
        else
            me->freeRequest(r);
    }
    me->refreshInfo();
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioBlockDevice::stop(IOService *provider)
{
    PMstop();
    /* A resize notice not yet delivered is dropped (and its reference given back); one
     * already running holds a reference, so free() cannot come before it ends. */
    if (fResizeCall && thread_call_cancel(fResizeCall))
        release();
    if (fGate) {
        fGate->runAction(gatedStop);
        /* After gatedStop: its aborted completions may have armed it. */
        fStatsTimer->cancelTimeout();
        fWorkLoop->removeEventSource(fStatsTimer);
        fWorkLoop->removeEventSource(fGate);
    }
    super::stop(provider);
}

IOReturn org_virtiodarwin_VirtioBlockDevice::gatedStop(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)owner;
    me->fStopping = true;
    if (!me->fDev)
        return kIOReturnSuccess;
    /* In-flight requests complete (aborted) through cbComplete. */
    vblk_stop(me->fDev);
    while (me->fHeldHead) {
        Request *r = me->fHeldHead;
        me->fHeldHead = r->next;
        cbComplete(me, r, VBLK_E_ABORTED);
    }
    me->fHeldTail = NULL;
    vblk_destroy(me->fDev);
    me->fDev = NULL;
    me->fGate->commandWakeup(&me->fRoomEvent);
    me->fGate->commandWakeup(&me->fFreeEvent);
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioBlockDevice::free(void)
{
    /* stop and start's failure path destroy the driver under the gate; an ungated destroy
     * here could race an interrupt on the family's work loop: never here. */
    if (fDev)
        IOLog("VirtioBlock: freed with a live driver (not destroyed: no work loop to do it on)\n");
    if (fRequests) {
        for (int i = 0; i < kVirtioBlockMaxRequests; i++)
            OSSafeReleaseNULL(fRequests[i].dma);
        IOFree(fRequests, sizeof(Request) * kVirtioBlockMaxRequests);
        fRequests = NULL;
    }
    OSSafeReleaseNULL(fGate);
    OSSafeReleaseNULL(fStatsTimer);
    if (fResizeCall) {
        thread_call_free(fResizeCall);
        fResizeCall = NULL;
    }
    super::free();
}

/* ---- requests (all under the gate) ---- */

org_virtiodarwin_VirtioBlockDevice::Request *org_virtiodarwin_VirtioBlockDevice::allocRequest(bool mayWait)
{
    while (!fFree && mayWait && !fStopping && !fWorkLoop->onThread())
        fGate->commandSleep(&fFreeEvent, THREAD_UNINT);
    Request *r = fFree;
    if (!r)
        return NULL;
    fFree = r->next;
    r->next = NULL;
    r->sync = false;
    r->waiting = false;
    r->done = false;
    r->status = VBLK_OK;
    r->completion.action = NULL;
    return r;
}

void org_virtiodarwin_VirtioBlockDevice::freeRequest(Request *r)
{
    r->next = fFree;
    fFree = r;
    fGate->commandWakeup(&fFreeEvent, true);
}

IOReturn org_virtiodarwin_VirtioBlockDevice::waitFor(Request *r, UInt32 seconds)
{
    r->waiting = true;
    while (!r->done) {
        IOReturn w;
        if (seconds) {
            AbsoluteTime deadline;
            clock_interval_to_deadline(seconds, kSecondScale, &deadline);
            w = fGate->commandSleep(r, deadline, THREAD_UNINT);
        } else {
            w = fGate->commandSleep(r, THREAD_UNINT);
        }
        if (w == THREAD_TIMED_OUT && !r->done) {
            /* The request stays in flight; cbComplete returns it to the pool. */
            r->waiting = false;
            return kIOReturnTimeout;
        }
    }
    IOReturn ret = toIOReturn(r->status);
    freeRequest(r);
    return ret;
}

/* Generates the request's segments and submits it. */
int32_t org_virtiodarwin_VirtioBlockDevice::submitRW(Request *r)
{
    UInt64 offset = 0;
    UInt32 n = 0;
    UInt64 want = r->nblks * fInfo.block_size;
    IODMACommand::Segment64 seg[16];
    while (offset < want) {
        UInt32 batch = 16;
        if (r->dma->gen64IOVMSegments(&offset, seg, &batch) != kIOReturnSuccess || batch == 0)
            return VBLK_E_INVALID;
        for (UInt32 k = 0; k < batch; k++) {
            if (n >= VBLK_MAX_SEGMENTS || n >= fInfo.max_segments)
                return VBLK_E_TOO_LARGE;
            fSegments[n].addr = seg[k].fIOVMAddr;
            fSegments[n].len = (uint32_t)seg[k].fLength;
            fSegments[n].reserved = 0;
            n++;
        }
    }
    return vblk_submit_rw(fDev, r->kind == kWrite, r->block, r->nblks, fSegments, n, r);
}

void org_virtiodarwin_VirtioBlockDevice::hold(Request *r)
{
    r->next = NULL;
    if (fHeldTail)
        fHeldTail->next = r;
    else
        fHeldHead = r;
    fHeldTail = r;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::doAsyncReadWrite(IOMemoryDescriptor *buffer, UInt64 block,
                                                               UInt64 nblks, IOStorageAttributes *attributes,
                                                               IOStorageCompletion *completion)
{
    UInt64 args[2] = { block, nblks };
    return fGate->runAction(gatedReadWrite, buffer, args, attributes, completion);
}

IOReturn org_virtiodarwin_VirtioBlockDevice::gatedReadWrite(OSObject *owner, void *buffer, void *args,
                                                             void *attrs, void *completion)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)owner;
    IOMemoryDescriptor *md = (IOMemoryDescriptor *)buffer;
    UInt64 *a = (UInt64 *)args;
    if (!me->fDev || me->fStopping)
        return kIOReturnNotAttached;
    Request *r = me->allocRequest(true);
    if (!r)
        return kIOReturnNoResources;
    r->kind = md->getDirection() == kIODirectionOut ? kWrite : kRead;
    r->block = a[0];
    r->nblks = a[1];
    r->completion = *(IOStorageCompletion *)completion;
    if (r->dma->setMemoryDescriptor(md, true) != kIOReturnSuccess) {
        me->freeRequest(r);
        return kIOReturnNoResources;
    }
    /* Requests already held go first: order is kept. */
    int32_t st = me->fHeldHead ? VBLK_E_BUSY : me->submitRW(r);
    if (st == VBLK_E_BUSY) {
        me->hold(r);
        return kIOReturnSuccess;
    }
    if (st != VBLK_OK) {
        r->dma->clearMemoryDescriptor();
        me->freeRequest(r);
        return toIOReturn(st);
    }
    return kIOReturnSuccess;
}

/* Flush, unmap and write-cache commands: the caller sleeps until the device answers. */
IOReturn org_virtiodarwin_VirtioBlockDevice::gatedSync(OSObject *owner, void *kind, void *extents,
                                                        void *count, void *)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)owner;
    UInt8 k = (UInt8)(uintptr_t)kind;
    if (!me->fDev || me->fStopping)
        return kIOReturnNotAttached;
    /* Asked from the work loop itself (a completion calling back into the storage stack):
     * the answer arrives on this very thread, so waiting for it here would never end. */
    if (me->fWorkLoop->onThread())
        return kIOReturnNotPermitted;
    Request *r = me->allocRequest(true);
    if (!r)
        return kIOReturnNoResources;
    r->kind = k;
    r->sync = true;
    for (;;) {
        int32_t st;
        if (k == kFlush) {
            st = vblk_flush(me->fDev, r);
        } else {
            IOBlockStorageDeviceExtent *e = (IOBlockStorageDeviceExtent *)extents;
            UInt32 n = (UInt32)(uintptr_t)count;
            for (UInt32 i = 0; i < n; i++) {
                me->fExtents[i].block = e[i].blockStart;
                me->fExtents[i].count = e[i].blockCount;
            }
            st = vblk_unmap(me->fDev, me->fExtents, n, r);
        }
        if (st == VBLK_OK) {
            UInt32 sleeps = me->fSleeps;
            IOReturn ret = me->waitFor(r, 0);
            if (ret != kIOReturnAborted || me->fStopping || sleeps == me->fSleeps)
                return ret;
            /* Cut off by a sleep's reset: sent again once awake. */
            r = me->allocRequest(true);
            if (!r)
                return kIOReturnNoResources;
            r->kind = k;
            r->sync = true;
            while (me->fAsleep && !me->fStopping)
                me->fGate->commandSleep(&me->fRoomEvent, THREAD_UNINT);
            continue;
        }
        if (st != VBLK_E_BUSY || me->fStopping) {
            me->freeRequest(r);
            /* No write cache: nothing to flush. */
            if (k == kFlush && st == VBLK_E_UNSUPPORTED)
                return kIOReturnSuccess;
            return toIOReturn(st);
        }
        me->fGate->commandSleep(&me->fRoomEvent, THREAD_UNINT);
    }
}

IOReturn org_virtiodarwin_VirtioBlockDevice::doSynchronizeCache(void)
{
    return fGate->runAction(gatedSync, (void *)(uintptr_t)kFlush);
}

IOReturn org_virtiodarwin_VirtioBlockDevice::doSynchronize(UInt64 block, UInt64 nblks,
                                                            IOStorageSynchronizeOptions options)
{
    /* virtio-blk flushes the whole cache. */
    return fGate->runAction(gatedSync, (void *)(uintptr_t)kFlush);
}

IOReturn org_virtiodarwin_VirtioBlockDevice::doUnmap(IOBlockStorageDeviceExtent *extents, UInt32 extentsCount,
                                                      IOStorageUnmapOptions options)
{
    if (!fInfo.unmap)
        return kIOReturnUnsupported;
    for (UInt32 done = 0; done < extentsCount;) {
        UInt32 n = extentsCount - done;
        if (n > VBLK_MAX_EXTENTS)
            n = VBLK_MAX_EXTENTS;
        IOReturn r = fGate->runAction(gatedSync, (void *)(uintptr_t)kUnmap, extents + done,
                                      (void *)(uintptr_t)n);
        if (r != kIOReturnSuccess)
            return r;
        done += n;
    }
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::gatedWriteCache(OSObject *owner, void *enable, void *out, void *, void *)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)owner;
    for (;;) {
        if (!me->fDev || me->fStopping)
            return kIOReturnNotAttached;
        if (out) {
            me->refreshInfo();
            *(bool *)out = me->fInfo.write_cache != 0;
            return kIOReturnSuccess;
        }
        int32_t st = vblk_set_write_cache(me->fDev, enable != NULL);
        /* Asleep (VBLK_E_BUSY) the device is reset: set it once awake (cbRestart wakes us),
         * as gatedSync sends its commands. */
        if (st != VBLK_E_BUSY || me->fWorkLoop->onThread()) {
            me->refreshInfo();
            return toIOReturn(st);
        }
        me->fGate->commandSleep(&me->fRoomEvent, THREAD_UNINT);
    }
}

IOReturn org_virtiodarwin_VirtioBlockDevice::getWriteCacheState(bool *enabled)
{
    return fGate->runAction(gatedWriteCache, NULL, enabled);
}

IOReturn org_virtiodarwin_VirtioBlockDevice::setWriteCacheState(bool enabled)
{
    return fGate->runAction(gatedWriteCache, enabled ? (void *)1 : NULL, NULL);
}

/* ---- callbacks from Rust (on the work loop, under the gate) ---- */

void org_virtiodarwin_VirtioBlockDevice::cbComplete(void *ctx, void *request, int32_t status)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)ctx;
    Request *r = (Request *)request;
    if (!r->sync && status == VBLK_E_ABORTED && me->fAsleep && !me->fStopping) {
        /* Cut off by the sleep's reset: held again, ahead of what arrived since. */
        r->next = me->fHeldHead;
        me->fHeldHead = r;
        if (!me->fHeldTail)
            me->fHeldTail = r;
        return;
    }
    if (r->sync) {
        r->status = status;
        r->done = true;
        if (r->waiting)
            me->fGate->commandWakeup(r, true);
        else
            me->freeRequest(r);
        return;
    }
    UInt64 bytes = status == VBLK_OK ? r->nblks * me->fInfo.block_size : 0;
    IOStorageCompletion c = r->completion;
    r->dma->clearMemoryDescriptor();
    me->freeRequest(r);
    /* Publishing allocates (dictionaries, numbers): not here on the I/O path, but from the
     * timer; arming it allocates nothing. */
    if (++me->fCompletions % kCompletionsPerStatsRefresh == 0)
        me->fStatsTimer->setTimeoutMS(0);
    IOStorage::complete(&c, toIOReturn(status), bytes);
}

void org_virtiodarwin_VirtioBlockDevice::cbRestart(void *ctx)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)ctx;
    while (me->fHeldHead && !me->fStopping) {
        Request *r = me->fHeldHead;
        int32_t st = me->submitRW(r);
        if (st == VBLK_E_BUSY)
            break;
        me->fHeldHead = r->next;
        if (!me->fHeldHead)
            me->fHeldTail = NULL;
        if (st != VBLK_OK)
            cbComplete(me, r, st);
    }
    me->fGate->commandWakeup(&me->fRoomEvent);
}

/* On the work loop, gate held. IOBlockStorageDriver::message re-reads the media
 * parameters synchronously (through this device's gated entries), and a client may be doing
 * I/O there: delivering the message here would deadlock. A thread call delivers it instead. */
void org_virtiodarwin_VirtioBlockDevice::cbCapacityChanged(void *ctx, uint64_t blocks)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)ctx;
    me->refreshInfo();
    /* The pending call holds a reference; a call already pending absorbs this change. */
    me->retain();
    if (thread_call_enter(me->fResizeCall))
        me->release();
}

void org_virtiodarwin_VirtioBlockDevice::resizeCallout(thread_call_param_t self, thread_call_param_t)
{
    org_virtiodarwin_VirtioBlockDevice *me = (org_virtiodarwin_VirtioBlockDevice *)self;
    if (!me->isInactive())
        me->messageClients(kIOMessageMediaParametersHaveChanged);
    me->release();
}

/* On the work loop's gate (a timer event source of its), apart from any completion. */
void org_virtiodarwin_VirtioBlockDevice::statsTimerFired(OSObject *owner, IOTimerEventSource *)
{
    ((org_virtiodarwin_VirtioBlockDevice *)owner)->publishProperties();
}

/* ---- what IOBlockStorageDriver asks ---- */

void org_virtiodarwin_VirtioBlockDevice::refreshInfo(void)
{
    if (!fDev || vblk_info(fDev, &fInfo) != VBLK_OK)
        return;
    strlcpy(fVendor, (const char *)fInfo.vendor, sizeof(fVendor));
    strlcpy(fProduct, (const char *)fInfo.product, sizeof(fProduct));
    strlcpy(fRevision, (const char *)fInfo.revision, sizeof(fRevision));
    snprintf(fAdditional, sizeof(fAdditional), "virtio-blk %s", (const char *)fInfo.serial);
}

void org_virtiodarwin_VirtioBlockDevice::publishProperties(void)
{
    OSDictionary *dev = OSDictionary::withCapacity(4);
    if (dev) {
        OSString *s;
        if ((s = OSString::withCString(fVendor))) { dev->setObject(kIOPropertyVendorNameKey, s); s->release(); }
        if ((s = OSString::withCString(fProduct))) { dev->setObject(kIOPropertyProductNameKey, s); s->release(); }
        if ((s = OSString::withCString(fRevision))) { dev->setObject(kIOPropertyProductRevisionLevelKey, s); s->release(); }
        if (fInfo.has_id && (s = OSString::withCString((const char *)fInfo.serial))) {
            dev->setObject(kIOPropertyProductSerialNumberKey, s);
            s->release();
        }
        setProperty(kIOPropertyDeviceCharacteristicsKey, dev);
        dev->release();
    }
    OSDictionary *proto = OSDictionary::withCapacity(2);
    if (proto) {
        OSString *s;
        if ((s = OSString::withCString("Virtio"))) { proto->setObject(kIOPropertyPhysicalInterconnectTypeKey, s); s->release(); }
        if ((s = OSString::withCString(kIOPropertyInternalKey))) { proto->setObject(kIOPropertyPhysicalInterconnectLocationKey, s); s->release(); }
        setProperty(kIOPropertyProtocolCharacteristicsKey, proto);
        proto->release();
    }
    OSDictionary *feat = OSDictionary::withCapacity(2);
    if (feat) {
        feat->setObject(kIOStorageFeatureUnmap, fInfo.unmap ? kOSBooleanTrue : kOSBooleanFalse);
        feat->setObject(kIOStorageFeatureForceUnitAccess, kOSBooleanFalse);
        setProperty(kIOStorageFeaturesKey, feat);
        feat->release();
    }
    UInt64 maxBlocks = fInfo.block_size ? fInfo.max_transfer_bytes / fInfo.block_size : 0;
    setProperty(kIOMaximumBlockCountReadKey, maxBlocks, 64);
    setProperty(kIOMaximumBlockCountWriteKey, maxBlocks, 64);
    setProperty(kIOMaximumByteCountReadKey, fInfo.max_transfer_bytes, 64);
    setProperty(kIOMaximumByteCountWriteKey, fInfo.max_transfer_bytes, 64);
    setProperty(kIOMaximumSegmentCountReadKey, fInfo.max_segments, 32);
    setProperty(kIOMaximumSegmentCountWriteKey, fInfo.max_segments, 32);
    if (fInfo.max_segment_bytes) {
        setProperty(kIOMaximumSegmentByteCountReadKey, fInfo.max_segment_bytes, 64);
        setProperty(kIOMaximumSegmentByteCountWriteKey, fInfo.max_segment_bytes, 64);
    }
    setProperty("VirtioFeatures", fInfo.features, 64);

    VblkStats st;
    if (fDev && vblk_stats(fDev, &st) == VBLK_OK) {
        OSDictionary *d = OSDictionary::withCapacity(9);
        if (d) {
            const struct { const char *k; UInt64 v; } kv[] = {
                { "Reads", st.reads }, { "Writes", st.writes }, { "Flushes", st.flushes },
                { "Unmaps", st.unmaps }, { "Errors", st.errors }, { "RingFull", st.busy },
                { "Interrupts", st.interrupts }, { "Kicks", st.kicks }, { "InFlight", st.in_flight },
            };
            for (unsigned i = 0; i < sizeof(kv) / sizeof(kv[0]); i++) {
                OSNumber *n = OSNumber::withNumber(kv[i].v, 64);
                if (n) {
                    d->setObject(kv[i].k, n);
                    n->release();
                }
            }
            setProperty("Statistics", d);
            d->release();
        }
    }
}

char *org_virtiodarwin_VirtioBlockDevice::getVendorString(void) { return fVendor; }
char *org_virtiodarwin_VirtioBlockDevice::getProductString(void) { return fProduct; }
char *org_virtiodarwin_VirtioBlockDevice::getRevisionString(void) { return fRevision; }
char *org_virtiodarwin_VirtioBlockDevice::getAdditionalDeviceInfoString(void) { return fAdditional; }

IOReturn org_virtiodarwin_VirtioBlockDevice::reportBlockSize(UInt64 *blockSize)
{
    *blockSize = fInfo.block_size;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportMaxValidBlock(UInt64 *maxBlock)
{
    if (fInfo.block_count == 0)
        return kIOReturnNoMedia;
    *maxBlock = fInfo.block_count - 1;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportMediaState(bool *mediaPresent, bool *changedState)
{
    *mediaPresent = fInfo.block_count != 0;
    if (changedState)
        *changedState = false;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportWriteProtection(bool *isWriteProtected)
{
    *isWriteProtected = fInfo.read_only != 0;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportRemovability(bool *isRemovable)
{
    *isRemovable = false;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportEjectability(bool *isEjectable)
{
    *isEjectable = false;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportLockability(bool *isLockable)
{
    *isLockable = false;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::reportPollRequirements(bool *pollRequired, bool *pollIsExpensive)
{
    *pollRequired = false;
    *pollIsExpensive = false;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioBlockDevice::doEjectMedia(void) { return kIOReturnUnsupported; }
IOReturn org_virtiodarwin_VirtioBlockDevice::doFormatMedia(UInt64 byteCapacity) { return kIOReturnUnsupported; }
IOReturn org_virtiodarwin_VirtioBlockDevice::doLockUnlockMedia(bool doLock) { return kIOReturnUnsupported; }

UInt32 org_virtiodarwin_VirtioBlockDevice::doGetFormatCapacities(UInt64 *capacities, UInt32 capacitiesMaxCount) const
{
    if (capacities && capacitiesMaxCount > 0)
        capacities[0] = fInfo.block_count * fInfo.block_size;
    return 1;
}
