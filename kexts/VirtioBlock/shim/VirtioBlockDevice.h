/*
 * VirtioBlock.kext: the IOBlockStorageDevice on the family's nub (VirtioDeviceType 2).
 *
 * Plumbing only: the block driver (request building and splitting, completions, cache and
 * discard commands, recovery) is Rust (kexts/VirtioBlock/rust, declared in
 * VirtioBlockABI.h). This class turns IOBlockStorageDevice calls into vblk_* calls under a
 * command gate on the family's work loop (where the family delivers interrupts to the Rust
 * side), maps request buffers with IODMACommand, and completes IOStorageCompletions.
 *
 * IORegistry: org_virtiodarwin_VirtioDevice -> org_virtiodarwin_VirtioBlockDevice
 *             -> IOBlockStorageDriver -> IOMedia.
 */
#ifndef VIRTIO_BLOCK_DEVICE_H
#define VIRTIO_BLOCK_DEVICE_H

#include <IOKit/IOCommandGate.h>
#include <IOKit/IODMACommand.h>
#include <IOKit/IOTimerEventSource.h>
#include <IOKit/storage/IOBlockStorageDevice.h>
#include <kern/thread_call.h>

#include "VirtioPCITransport.h"
#include "VirtioBlockABI.h"

/* Requests the shim keeps at once (each with its own IODMACommand). */
#define kVirtioBlockMaxRequests 128

class org_virtiodarwin_VirtioBlockDevice : public IOBlockStorageDevice {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioBlockDevice)

public:
    virtual bool start(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void stop(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void free(void) APPLE_KEXT_OVERRIDE;

    virtual IOReturn doAsyncReadWrite(IOMemoryDescriptor *buffer, UInt64 block, UInt64 nblks,
                                      IOStorageAttributes *attributes,
                                      IOStorageCompletion *completion) APPLE_KEXT_OVERRIDE;
    virtual IOReturn doSynchronizeCache(void) APPLE_KEXT_OVERRIDE;
    virtual IOReturn doSynchronize(UInt64 block, UInt64 nblks,
                                   IOStorageSynchronizeOptions options) APPLE_KEXT_OVERRIDE;
    virtual IOReturn doUnmap(IOBlockStorageDeviceExtent *extents, UInt32 extentsCount,
                             IOStorageUnmapOptions options) APPLE_KEXT_OVERRIDE;
    virtual IOReturn getWriteCacheState(bool *enabled) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setWriteCacheState(bool enabled) APPLE_KEXT_OVERRIDE;
    virtual IOReturn doEjectMedia(void) APPLE_KEXT_OVERRIDE;
    virtual IOReturn doFormatMedia(UInt64 byteCapacity) APPLE_KEXT_OVERRIDE;
    virtual UInt32 doGetFormatCapacities(UInt64 *capacities, UInt32 capacitiesMaxCount) const APPLE_KEXT_OVERRIDE;
    virtual IOReturn doLockUnlockMedia(bool doLock) APPLE_KEXT_OVERRIDE;
    virtual char *getVendorString(void) APPLE_KEXT_OVERRIDE;
    virtual char *getProductString(void) APPLE_KEXT_OVERRIDE;
    virtual char *getRevisionString(void) APPLE_KEXT_OVERRIDE;
    virtual char *getAdditionalDeviceInfoString(void) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportBlockSize(UInt64 *blockSize) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportEjectability(bool *isEjectable) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportLockability(bool *isLockable) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportMaxValidBlock(UInt64 *maxBlock) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportMediaState(bool *mediaPresent, bool *changedState) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportPollRequirements(bool *pollRequired, bool *pollIsExpensive) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportRemovability(bool *isRemovable) APPLE_KEXT_OVERRIDE;
    virtual IOReturn reportWriteProtection(bool *isWriteProtected) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPowerState(unsigned long ordinal, IOService *device) APPLE_KEXT_OVERRIDE;

private:
    enum Kind { kRead, kWrite, kFlush, kUnmap, kGetId };

    /* One request: the shim's context handed to Rust as `request`. */
    struct Request {
        Request *next;          /* free list or held FIFO */
        IODMACommand *dma;
        IOStorageCompletion completion;
        UInt64 block;
        UInt64 nblks;
        int32_t status;
        UInt8 kind;
        bool sync;              /* a gated caller sleeps on it */
        bool waiting;           /* that caller is still there (false after a timeout) */
        bool done;
    };

    org_virtiodarwin_VirtioDevice *fNub;
    IOWorkLoop *fWorkLoop;
    /* Delivers kIOMessageMediaParametersHaveChanged off the work loop (see cbCapacityChanged). */
    thread_call_t fResizeCall;
    /* Refreshes the IORegistry's Statistics off the completion path (see cbComplete). */
    IOTimerEventSource *fStatsTimer;
    IOCommandGate *fGate;
    VblkDevice *fDev;
    VblkCallbacks fCallbacks;
    VblkInfo fInfo;
    Request *fRequests;
    Request *fFree;
    Request *fHeldHead;
    Request *fHeldTail;
    UInt32 fCompletions;
    bool fStopping;
    bool fAsleep;           /* between power state 0 and a successful wake */
    UInt32 fSleeps;         /* sleeps so far: tells a sleep's abort from any other */
    bool fRoomEvent;        /* address slept on while waiting for ring room */
    bool fFreeEvent;        /* address slept on while waiting for a free request */
    VkSegment fSegments[VBLK_MAX_SEGMENTS];
    VblkExtent fExtents[VBLK_MAX_EXTENTS];
    char fVendor[sizeof(((VblkInfo *)0)->vendor)];
    char fProduct[sizeof(((VblkInfo *)0)->product)];
    char fRevision[sizeof(((VblkInfo *)0)->revision)];
    char fAdditional[64];

    Request *allocRequest(bool mayWait);
    void freeRequest(Request *r);
    int32_t submitRW(Request *r);
    void hold(Request *r);
    void publishProperties(void);
    void refreshInfo(void);
    IOReturn waitFor(Request *r, UInt32 seconds);

    static void resizeCallout(thread_call_param_t self, thread_call_param_t);
    static void statsTimerFired(OSObject *owner, IOTimerEventSource *sender);
    static IOReturn gatedStart(OSObject *owner, void *, void *, void *, void *);
    static IOReturn gatedSetPower(OSObject *owner, void *ordinal, void *, void *, void *);
    static IOReturn gatedStop(OSObject *owner, void *, void *, void *, void *);
    static IOReturn gatedReadWrite(OSObject *owner, void *buffer, void *args, void *attrs, void *completion);
    static IOReturn gatedSync(OSObject *owner, void *kind, void *extents, void *count, void *);
    static IOReturn gatedWriteCache(OSObject *owner, void *enable, void *out, void *, void *);

    /* VblkCallbacks (ctx = this). */
    static void cbComplete(void *ctx, void *request, int32_t status);
    static void cbRestart(void *ctx);
    static void cbCapacityChanged(void *ctx, uint64_t blocks);
};

#endif /* VIRTIO_BLOCK_DEVICE_H */
