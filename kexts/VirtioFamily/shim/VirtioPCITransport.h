/*
 * VirtioFamily.kext: the PCI transport driver and the nub it publishes per device.
 *
 * Plumbing only: the transport (virtio-pci), feature negotiation, virtqueues and interrupt
 * demultiplexing are Rust (kexts/VirtioFamily/rust, declared in VirtioFamilyABI.h). This
 * class maps BARs, allocates DMA memory, wires interrupt event sources to the work loop and
 * publishes the nub. Device kexts include this header for the nub's class.
 *
 * IORegistry: IOPCIDevice -> org_virtiodarwin_VirtioPCITransport
 *             -> org_virtiodarwin_VirtioDevice (VirtioDeviceType = N) -> device driver.
 */
#ifndef VIRTIO_PCI_TRANSPORT_H
#define VIRTIO_PCI_TRANSPORT_H

#include <IOKit/IOService.h>
#include <IOKit/IOWorkLoop.h>
#include <IOKit/IOInterruptEventSource.h>
#include <IOKit/IOMemoryDescriptor.h>
#include <IOKit/pci/IOPCIDevice.h>
#include <libkern/c++/OSArray.h>

#include "VirtioFamilyABI.h"

/* The property a nub carries and device kexts match on. */
#define kVirtioDeviceTypeKey "VirtioDeviceType"
/* Most interrupt vectors (one per queue + config) the transport wires. */
#define kVirtioMaxVectors 32
/* The family personality's list of device types with a device kext. */
#define kVirtioDriverTypesKey "VirtioDriverTypes"
/* Boot-arg naming device types to leave to other drivers: virtiodarwin_defer=net,blk */
#define kVirtioDeferBootArg "virtiodarwin_defer"

class org_virtiodarwin_VirtioDevice;

/* The power states every virtio kext registers: off (system sleep; a virtio device keeps
 * nothing across it) and on. The device kexts quiesce, reset and rebuild their devices; the
 * transport and its nubs only order them in the power tree (children sleep first). */
static IOPMPowerState gVirtioPowerStates[2] = {
    { kIOPMPowerStateVersion1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
    { kIOPMPowerStateVersion1, kIOPMDeviceUsable, kIOPMPowerOn, kIOPMPowerOn, 0, 0, 0, 0, 0, 0, 0, 0 },
};

class org_virtiodarwin_VirtioPCITransport : public IOService {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioPCITransport)

public:
    virtual IOService *probe(IOService *provider, SInt32 *score) APPLE_KEXT_OVERRIDE;
    virtual bool start(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void stop(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void free(void) APPLE_KEXT_OVERRIDE;
    virtual IOWorkLoop *getWorkLoop(void) const APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPowerState(unsigned long ordinal, IOService *device) APPLE_KEXT_OVERRIDE;

private:
    IOPCIDevice *fPCI;
    IOWorkLoop *fWorkLoop;
    IOMemoryMap *fBars[6];
    bool fBarIsIO[6];
    VfamPlatform fPlatform;
    VfamDevice *fDevice;
    org_virtiodarwin_VirtioDevice *fNub;
    /* Coherent DMA buffers and their DMA commands, in parallel. */
    OSArray *fDmaBuffers;
    OSArray *fDmaCommands;
    /* Streaming mappings (vfam_dma_map) and their DMA commands, in parallel. */
    OSArray *fMapDescriptors;
    OSArray *fMapCommands;
    /* vfam_device_destroy reported that the device may still read and write memory (it
     * ignored a reset and Bus Master Enable would not clear): releaseResources leaks every
     * DMA buffer and mapping instead of freeing them. */
    bool fDeviceMayDma;
    IOInterruptEventSource *fIrq[kVirtioMaxVectors];
    UInt32 fIrqCount;
    bool fMsix;
    /* The source whose action is running. A client may recover from DEVICE_NEEDS_RESET in
     * its interrupt handler, which disables and re-enables interrupts inside that action;
     * IOInterruptEventSource::checkForWork still writes to the source after its action
     * returns, so opIrqDisable parks it (fParked) instead of releasing it. A parked source
     * is released at the next action, or in free. */
    IOInterruptEventSource *fDelivering;
    IOInterruptEventSource *fParked;

    void mapBars(void);
    bool haveDriverFor(uint32_t type);
    void releaseResources(void);
    void leakDmaMemory(void);
    static IOReturn destroyGated(OSObject *owner, void *, void *, void *, void *);
    static void interruptOccurred(OSObject *owner, IOInterruptEventSource *src, int count);

    /* VfamPlatform operations (ctx = this). */
    static uint32_t opConfigRead(void *ctx, uint16_t offset, uint8_t width);
    static void opConfigWrite(void *ctx, uint16_t offset, uint8_t width, uint32_t value);
    static bool opBarInfo(void *ctx, uint8_t bar, uint64_t *len, bool *isIO);
    static uint32_t opBarRead(void *ctx, uint8_t bar, uint64_t offset, uint8_t width);
    static void opBarWrite(void *ctx, uint8_t bar, uint64_t offset, uint8_t width, uint32_t value);
    static bool opDmaAlloc(void *ctx, uint64_t len, uint64_t align, VkDmaRegion *out);
    static void opDmaFree(void *ctx, const VkDmaRegion *region);
    static bool opDmaMap(void *ctx, uint8_t *vaddr, uint64_t len, uint32_t dir, uint64_t *daddr);
    static void opDmaUnmap(void *ctx, uint64_t daddr, uint64_t len, uint32_t dir);
    static bool opIrqEnableMsix(void *ctx, uint16_t vectors);
    static bool opIrqEnableIntx(void *ctx);
    static void opIrqDisable(void *ctx);
    bool addInterruptSource(int index);
};

/* One virtio device, published by the transport; device kexts attach to it. */
class org_virtiodarwin_VirtioDevice : public IOService {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioDevice)

public:
    /* Matches personalities on VirtioDeviceType (as IOPCIDevice does on IOPCIMatch). */
    virtual bool matchPropertyTable(OSDictionary *table, SInt32 *score) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPowerState(unsigned long ordinal, IOService *device) APPLE_KEXT_OVERRIDE;

    /* The bus handle for the device kext's Rust half (vfam_* functions). Valid while the
     * client is attached to this nub. */
    VfamDevice *virtioDevice(void) const { return fDevice; }

private:
    friend class org_virtiodarwin_VirtioPCITransport;
    VfamDevice *fDevice;
};

#endif /* VIRTIO_PCI_TRANSPORT_H */
