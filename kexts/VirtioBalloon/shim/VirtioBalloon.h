/*
 * VirtioBalloon.kext: an IOService on the family's nub (VirtioDeviceType 5) that lends the
 * host guest memory through the virtio memory balloon.
 *
 * Plumbing only: the driver (following num_pages, writing actual, MUST_TELL_HOST, the
 * statistics queue, recovery from a broken device) and the page pool's bookkeeping are
 * Rust (kexts/VirtioBalloon/rust, declared in VirtioBalloonABI.h). This class runs every
 * vbal_* call on the family's work loop (its command gate, its timer, and the family's
 * interrupt actions, which call vbal_interrupt) and takes memory from the kernel:
 *
 * - Pages, through public KPI only: a chunk of VBAL_CHUNK_PAGES kernel pages is an
 *   IOBufferMemoryDescriptor::inTaskWithPhysicalMask(kernel_task, kIODirectionInOut |
 *   kIOMemoryMapperNone, ...) (wired; physical addresses below 2^44, so every 4 KiB frame
 *   number fits the balloon's 32 bits), prepare()d, each page's physical address from
 *   getPhysicalSegment(offset, &len, kIOMemoryMapperNone). The chunk is complete()d and
 *   released when none of its pages is in the balloon. pmap_find_phys, vm_map_wire and
 *   kmem_alloc would be smaller but are unsupported exports.
 * - Bound: the balloon holds at most VBAL_DEFAULT_MAX_MIB MiB, or the boot-arg
 *   virtiodarwin_balloon_max_mib=<MiB> (tracking costs about 16 bytes per page, allocated
 *   at start).
 * - Statistics: no public KPI gives a kext the guest's memory figures (host_statistics64,
 *   vm_page_free_count, max_mem, sysctlbyname are private, unsupported or not exported to
 *   kexts), so no tag comes from here.
 * - Memory pressure (DEFLATE_ON_OOM): the kernel exports mach_vm_pressure_monitor and
 *   mach_vm_pressure_level_monitor in com.apple.kpi.mach, but no public header declares
 *   them (they are xnu-internal, memorystatus's own interface) and they block a thread:
 *   not a documented notification for kexts. The hook is vbal_deflate_for_oom; a
 *   user-space helper on DISPATCH_SOURCE_TYPE_MEMORYPRESSURE (public) can drive it
 *   through a user client later. Nothing calls it today.
 * - Sleep: the device is reset and every page given back (vbal_suspend); wake re-inflates
 *   to the host's target (vbal_resume). See the Rust crate for why.
 *
 * IORegistry: org_virtiodarwin_VirtioDevice -> org_virtiodarwin_VirtioBalloon, with
 * "TargetFrames" and "ActualFrames" (4 KiB frames), "PagesHeld" (kernel pages in the
 * balloon), "PagesWired", "PageSize", and counters in "Statistics".
 */
#ifndef VIRTIO_BALLOON_H
#define VIRTIO_BALLOON_H

#include <IOKit/IOCommandGate.h>
#include <IOKit/IOService.h>
#include <IOKit/IOTimerEventSource.h>

#include "VirtioPCITransport.h"
#include "VirtioBalloonABI.h"

class org_virtiodarwin_VirtioBalloon : public IOService {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioBalloon)

public:
    virtual bool start(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void stop(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void free(void) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPowerState(unsigned long ordinal, IOService *device) APPLE_KEXT_OVERRIDE;

private:
    org_virtiodarwin_VirtioDevice *fNub;
    IOWorkLoop *fWorkLoop;
    IOCommandGate *fGate;
    IOTimerEventSource *fTimer;
    VbalDevice *fDev;
    VbalCallbacks fCallbacks;
    VbalConfig fConfig;
    /* The kernel had no memory to give: the timer retries with vbal_poll. */
    bool fStarved;
    /* In the timer's action: `changed` does not re-arm the timer from there. */
    bool fInTimer;
    bool fStopping;
    bool fAsleep;

    void publishProperties(void);

    static IOReturn gatedStart(OSObject *owner, void *, void *, void *, void *);
    static IOReturn gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *);
    static IOReturn gatedStop(OSObject *owner, void *, void *, void *, void *);
    static void timerFired(OSObject *owner, IOTimerEventSource *sender);

    /* VbalCallbacks (ctx = this). */
    static bool cbAllocChunk(void *ctx, uint64_t *pages, uint32_t count, void **cookie);
    static void cbFreeChunk(void *ctx, void *cookie);
    static void cbChanged(void *ctx, bool starved);
};

#endif /* VIRTIO_BALLOON_H */
