/*
 * VirtioEntropy.kext: an IOService on the family's nub (VirtioDeviceType 4) that feeds the
 * kernel's random pool from the virtio entropy device.
 *
 * Plumbing only: the driver (buffers, bytes in order exactly once, recovery from a broken
 * device) is Rust (kexts/VirtioEntropy/rust, declared in VirtioEntropyABI.h). This class
 * runs every vrng_* call on the family's work loop (its command gate, its timer, and the
 * family's interrupt actions, which call vrng_interrupt) and hands the bytes to the kernel:
 * at start, as soon as the device delivers, then at most VRNG_FEED_BYTES every
 * VRNG_FEED_PERIOD_MS.
 *
 * How the bytes reach the pool: the kernel's entry point, write_random() (sys/random.h),
 * is exported only by com.apple.kpi.private, and OSKext refuses to load a non-Apple kext
 * that declares that library. A write to /dev/random is the public way in: its driver
 * (random_write) passes the bytes to write_random(), which reseeds the kernel's PRNG
 * (random(4)). Each feed opens /dev/random, writes and closes it with the public vnode KPI
 * (com.apple.kpi.bsd): once a minute, so no vnode reference is held between feeds. Feeds
 * run in the timer's action (gate closed), never in the interrupt action: an interrupt
 * that brings bytes while a feed is due only schedules the timer at once.
 *
 * IORegistry: org_virtiodarwin_VirtioDevice -> org_virtiodarwin_VirtioEntropy, with the
 * counters in `Statistics`.
 */
#ifndef VIRTIO_ENTROPY_H
#define VIRTIO_ENTROPY_H

#include <IOKit/IOCommandGate.h>
#include <IOKit/IOService.h>
#include <IOKit/IOTimerEventSource.h>

#include "VirtioPCITransport.h"
#include "VirtioEntropyABI.h"

class org_virtiodarwin_VirtioEntropy : public IOService {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioEntropy)

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
    VrngDevice *fDev;
    VrngCallbacks fCallbacks;
    /* A feed is due (set at start, on wake and by each period), cleared by a feed. */
    bool fWantFeed;
    bool fStopping;
    bool fAsleep;
    UInt64 fFeeds;
    UInt64 fBytesFed;
    UInt64 fFeedErrors;
    uint8_t fBuffer[VRNG_FEED_BYTES];

    void feed(void);
    void publishStatistics(void);

    static IOReturn gatedStart(OSObject *owner, void *, void *, void *, void *);
    static IOReturn gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *);
    static IOReturn gatedStop(OSObject *owner, void *, void *, void *, void *);
    static void timerFired(OSObject *owner, IOTimerEventSource *sender);

    /* VrngCallbacks (ctx = this). */
    static void cbReady(void *ctx, size_t bytes);
};

#endif /* VIRTIO_ENTROPY_H */
