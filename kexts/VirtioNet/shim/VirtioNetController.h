/*
 * VirtioNet.kext: the IOEthernetController on the family's nub (VirtioDeviceType 1).
 *
 * Plumbing only: the driver (rings, headers, offloads, receive buffers, control queue, the
 * kernel debugger's polled path) is Rust (kexts/VirtioNet/rust, declared in VirtioNetABI.h).
 * This class maps mbufs to DMA segments, copies received frames into mbufs, and wires the
 * output queue, link status, filters and IOKernelDebugger to vnet_* calls. The normal paths
 * run on the family's work loop (the controller's command gate, a gated output queue, the
 * interrupt actions, the deferred receive poll); the debugger's run whenever KDP calls.
 *
 * IORegistry: org_virtiodarwin_VirtioDevice -> org_virtiodarwin_VirtioNetController
 *             -> IOEthernetInterface (en<N>), IOKernelDebugger.
 */
#ifndef VIRTIO_NET_CONTROLLER_H
#define VIRTIO_NET_CONTROLLER_H

/* Before the networking headers: after them, -Woverloaded-virtual flags its init()s. */
#include <IOKit/IOTimerEventSource.h>
#include <IOKit/IODMACommand.h>
#include <IOKit/IOMemoryDescriptor.h>
/* IOPacketQueue.h has a `const` on a by-value return type. */
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wignored-qualifiers"
#include <IOKit/network/IOEthernetController.h>
#include <IOKit/network/IOEthernetInterface.h>
#include <IOKit/network/IOGatedOutputQueue.h>
#include <IOKit/network/IOKernelDebugger.h>
#include <IOKit/network/IONetworkMedium.h>
#pragma clang diagnostic pop

#include "VirtioPCITransport.h"
#include "VirtioNetABI.h"

class org_virtiodarwin_VirtioNetController : public IOEthernetController {
    OSDeclareDefaultStructors(org_virtiodarwin_VirtioNetController)

public:
    virtual bool start(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void stop(IOService *provider) APPLE_KEXT_OVERRIDE;
    virtual void free(void) APPLE_KEXT_OVERRIDE;
    virtual IOReturn registerWithPolicyMaker(IOService *policyMaker) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPowerState(unsigned long ordinal, IOService *device) APPLE_KEXT_OVERRIDE;

    virtual IOReturn enable(IONetworkInterface *netif) APPLE_KEXT_OVERRIDE;
    virtual IOReturn disable(IONetworkInterface *netif) APPLE_KEXT_OVERRIDE;
    virtual IOReturn enable(IOKernelDebugger *debugger) APPLE_KEXT_OVERRIDE;
    virtual IOReturn disable(IOKernelDebugger *debugger) APPLE_KEXT_OVERRIDE;
    virtual UInt32 outputPacket(mbuf_t m, void *param) APPLE_KEXT_OVERRIDE;
    virtual IOOutputQueue *createOutputQueue(void) APPLE_KEXT_OVERRIDE;

    virtual IOReturn getHardwareAddress(IOEthernetAddress *addr) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setHardwareAddress(const IOEthernetAddress *addr) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setPromiscuousMode(bool active) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setMulticastMode(bool active) APPLE_KEXT_OVERRIDE;
    virtual IOReturn setMulticastList(IOEthernetAddress *addrs, UInt32 count) APPLE_KEXT_OVERRIDE;
    virtual IOReturn getMaxPacketSize(UInt32 *maxSize) const APPLE_KEXT_OVERRIDE;
    virtual IOReturn getChecksumSupport(UInt32 *checksumMask, UInt32 checksumFamily, bool isOutput) APPLE_KEXT_OVERRIDE;
    virtual UInt32 getFeatures(void) const APPLE_KEXT_OVERRIDE;
    virtual const OSString *newVendorString(void) const APPLE_KEXT_OVERRIDE;
    virtual const OSString *newModelString(void) const APPLE_KEXT_OVERRIDE;

    /* IOKernelDebugger (KDP), polled, interrupts off. */
    virtual void sendPacket(void *pkt, UInt32 pktSize) APPLE_KEXT_OVERRIDE;
    virtual void receivePacket(void *pkt, UInt32 *pktSize, UInt32 timeout) APPLE_KEXT_OVERRIDE;

private:
    /* One frame in flight (its vnet_transmit token): the mbuf, and its mapping for the
     * device. The descriptor is re-aimed at each frame's mbufs (initWithOptions over
     * `ranges`, kIOMemoryAsReference) and the DMA command maps it (kMapped: through the
     * IOMMU when there is one, §6.1 VIRTIO_F_ACCESS_PLATFORM), so nothing is allocated per
     * frame. */
    struct TxSlot {
        TxSlot *next;             /* the free list */
        mbuf_t packet;
        IOMemoryDescriptor *md;
        IODMACommand *dma;
        IOAddressRange ranges[VNET_TX_SEGMENTS_MAX];
    };

    org_virtiodarwin_VirtioDevice *fNub;
    VnetDevice *fDev;
    VnetCallbacks fCallbacks;
    VnetInfo fInfo;
    IOEthernetInterface *fInterface;
    IOKernelDebugger *fDebugger;
    TxSlot *fTxSlots;       /* fInfo.tx_frames of them, made in start, freed in free */
    UInt32 fTxSlotCount;
    TxSlot *fTxFree;
    IONetworkMedium *fMedium;
    IOTimerEventSource *fRxPoll;  /* receive polling left over from an event (rx_more) */
    UInt32 fEvents;
    bool fEnabled;
    bool fAsleep;           /* between power state 0 and a successful wake */
    bool fDebuggerEnabled;
    bool fMulticastActive;
    bool fAnnounceAckPending; /* addresses announced, ANNOUNCE_ACK not yet taken */

    IOReturn gatedCreate(int32_t *st);
    IOReturn gatedStop(void);
    IOReturn gatedSetPower(void *ordinal);
    IOReturn gatedPublish(void);
    IOReturn gatedUpdateLink(void);
    void teardown(void);
    void updateLink(bool up);
    void announceAddresses(void);
    void publishStats(void);
    void handleEvents(const VnetEvents *ev);
    bool allocTxSlots(void);
    UInt32 mapPacket(TxSlot *slot, mbuf_t m, VkSegment *segs);
    static void unmapSlot(TxSlot *slot);
    mbuf_t coalesce(mbuf_t m);

    /* VnetCallbacks (ctx = this). */
    static void cbTxDone(void *ctx, size_t token);
    static void cbRxFrame(void *ctx, const VnetFragment *frags, size_t nfrags, size_t len, uint32_t flags);
    static void cbEvents(void *ctx, const VnetEvents *events);
    /* fRxPoll's action. */
    static void rxPollFired(OSObject *owner, IOTimerEventSource *sender);
};

#endif /* VIRTIO_NET_CONTROLLER_H */
