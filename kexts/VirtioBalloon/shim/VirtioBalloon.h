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
 *   virtiodarwin_balloon_max_mib=<MiB>, and never more than the guest's memory (the Rust
 *   side reads hw.memsize): tracking costs about 16 bytes per page of the bound, allocated
 *   at start; when the kernel cannot give it, vbal_create fails (VBAL_E_NO_MEMORY) and
 *   the driver does not start.
 * - Statistics and memory pressure, through public KPI: sysctlbyname, exported by
 *   com.apple.kpi.libkern (xnu config/Libkern.exports: _sysctlbyname:_kernel_sysctlbyname,
 *   10.13 onwards) and declared in <libkern/sysctl.h>. cbReadSysctl is that one call; the
 *   Rust side decides what to read (hw.memsize, vm.page_free_count,
 *   vm.page_pageable_external_count for the stats buffer, when the device asks;
 *   kern.memorystatus_vm_pressure_level for pressure) and what to do. host_statistics64,
 *   vm_page_free_count and max_mem stay out of reach (not exported to kexts, or
 *   unsupported), as do mach_vm_pressure_monitor / mach_vm_pressure_level_monitor
 *   (exported by com.apple.kpi.mach but declared in no public header, and blocking).
 * - Memory pressure (DEFLATE_ON_OOM): while it is negotiated, fPressureTimer calls
 *   vbal_pressure_check every VBAL_PRESSURE_MS with the uptime in ms (clock_get_uptime,
 *   absolutetime_to_nanoseconds: com.apple.kpi.mach); at warning or critical the Rust side
 *   takes a bounded amount out of the balloon, at most once per interval.
 * - Free page reporting (PAGE_REPORTING, negotiated when offered): the same timer calls
 *   vbal_report_check every VBAL_REPORT_MS; the Rust side decides whether the kernel can
 *   spare a round (pressure level normal, vm.page_free_count well above
 *   VBAL_REPORT_FLOOR_MIB and VBAL_REPORT_FLOOR_PERCENT of hw.memsize), takes at most
 *   VBAL_REPORT_ROUND_MIB MiB as chunks through cbAllocChunk (the same wired
 *   IOBufferMemoryDescriptors: pages from the kernel's free pool), reports them, and frees
 *   them through cbFreeChunk once the device has returned the report. No interface to the
 *   kernel's free lists is public; this is the closest public-KPI equivalent.
 * - Sleep and stop: the balloon is emptied first, through the deflate queue (vbal_drain,
 *   called again while it says VBAL_E_BUSY; between calls the gate is open, in
 *   commandSleep with a deadline of VBAL_DRAIN_POLL_MS, so the device's acknowledgements
 *   arrive through the family's interrupt action; cbChanged ends the wait early). The host
 *   is told of every page it gets back before the reset; a device that does not
 *   acknowledge is reset after VBAL_DRAIN_STALL_MS without progress (VBAL_DRAIN_MS in
 *   all). Then sleep resets the device and gives every page back (vbal_suspend), reporting
 *   chunks included, and wake re-inflates to the host's target (vbal_resume); stop resets
 *   it (vbal_stop). A device that will not reset, its bus mastering stuck on, keeps the
 *   chunks of an inflate or a report it still holds wired for good (never cbFreeChunk'd).
 *   See the Rust crate for why.
 *
 * IORegistry: org_virtiodarwin_VirtioDevice -> org_virtiodarwin_VirtioBalloon, with
 * "TargetFrames" and "ActualFrames" (4 KiB frames), "PagesHeld" (kernel pages in the
 * balloon), "PagesWired" (balloon and reporting chunks), "PageSize", "DeflateOnOOM",
 * "MemoryPressure" (the level last read: 1 normal, 2 warning, 4 critical, 0 unknown),
 * "PageReporting", "ReportPages" (kernel pages out for reporting now), "PagesLeaked"
 * (kernel pages of chunks kept wired for good after a reset the device ignored), and
 * counters in "Statistics" (including "Report rounds", "Reports", "Bytes reported",
 * "Report chunks leaked", "Balloon chunks leaked").
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
    /* Memory pressure checks and reporting rounds, while DEFLATE_ON_OOM or PAGE_REPORTING
     * is negotiated and the device is awake. */
    IOTimerEventSource *fPressureTimer;
    VbalDevice *fDev;
    VbalCallbacks fCallbacks;
    VbalConfig fConfig;
    /* The kernel had no memory to give: the timer retries with vbal_poll. */
    bool fStarved;
    /* In the timer's action: `changed` does not re-arm the timer from there. */
    bool fInTimer;
    bool fStopping;
    bool fAsleep;
    /* In drain(): the event cbChanged wakes it on. */
    bool fDraining;

    void publishProperties(void);
    void armPressureTimer(void);
    void drain(void);

    static IOReturn gatedStart(OSObject *owner, void *, void *, void *, void *);
    static IOReturn gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *);
    static IOReturn gatedStop(OSObject *owner, void *, void *, void *, void *);
    static void timerFired(OSObject *owner, IOTimerEventSource *sender);
    static void pressureFired(OSObject *owner, IOTimerEventSource *sender);

    /* VbalCallbacks (ctx = this). */
    static bool cbAllocChunk(void *ctx, uint64_t *pages, uint32_t count, void **cookie);
    static void cbFreeChunk(void *ctx, void *cookie);
    static void cbChanged(void *ctx, bool starved);
    static int32_t cbReadSysctl(void *ctx, const char *name, void *buf, uint32_t *len);
};

#endif /* VIRTIO_BALLOON_H */
