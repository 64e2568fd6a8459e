/*
 * VirtioNet.kext: IOKit plumbing around the Rust net driver (see the header).
 */
#include "VirtioNetController.h"

#include <IOKit/IOLib.h>
#include <libkern/c++/OSDictionary.h>
#include <libkern/c++/OSNumber.h>
#include <libkern/c++/OSString.h>
#include <net/kpi_interface.h>
/* in_arp.h declares C functions without extern "C". */
extern "C" {
#include <netinet/in_arp.h>
}
#include <sys/kpi_mbuf.h>
#include <sys/socket.h>
#include <uuid/uuid.h>

#define super IOEthernetController
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioNetController, IOEthernetController)

/* The debugger's bounds: polls of the transmit slot per send, and receive polls per
 * millisecond of `timeout` (each followed by a 10 µs delay). */
static const uint32_t kDebugSendSpins = 200000;
static const uint32_t kDebugPollsPerMs = 100;
/* How long gatedStop waits (10 µs steps, 1 s) for a debugger entry to release the driver. */
static const uint32_t kStopRetries = 100000;

/* ---- lifecycle ---- */


bool org_virtiodarwin_VirtioNetController::start(IOService *provider)
{
    fNub = OSDynamicCast(org_virtiodarwin_VirtioDevice, provider);
    if (!fNub || !fNub->virtioDevice() || !super::start(provider))
        return false;
    vnet_log_init();
    fCallbacks.ctx = this;
    fCallbacks.tx_done = cbTxDone;
    fCallbacks.rx_frame = cbRxFrame;
    fCallbacks.events = cbEvents;
    /* The family's work loop (IOService::getWorkLoop walks up to the transport): creating
     * the driver there keeps its interrupt entry from running before it exists. */
    IOCommandGate *gate = getCommandGate();
    if (!gate)
        return false;
    /* Receive polling an event leaves over (handleEvents) resumes here: the timer's action
     * runs gated on the work loop it is added to (IOTimerEventSource.h). Added before the
     * device can interrupt; removed in teardown. */
    IOWorkLoop *wl = getWorkLoop();
    fRxPoll = IOTimerEventSource::timerEventSource(this, &org_virtiodarwin_VirtioNetController::rxPollFired);
    if (!wl || !fRxPoll || wl->addEventSource(fRxPoll) != kIOReturnSuccess) {
        OSSafeReleaseNULL(fRxPoll);
        return false;
    }
    /* Every driver entry below runs gated: once the device is live an interrupt may arrive
     * at any time, and only the debugger path may meet the driver's try-lock taken. */
    int32_t st = VNET_E_INVALID;
    gate->runAction(OSMemberFunctionCast(IOCommandGate::Action, this,
                                         &org_virtiodarwin_VirtioNetController::gatedCreate),
                    &st);
    if (st != VNET_OK || !fDev) {
        IOLog("VirtioNet: cannot drive this device (status %d)\n", (int)st);
        teardown();
        return false;
    }
    if (!allocTxSlots()) {
        teardown();
        return false;
    }

    OSDictionary *media = OSDictionary::withCapacity(1);
    UInt64 speed = (UInt64)(fInfo.speed_mbps ? fInfo.speed_mbps : 10000) * 1000000ULL;
    UInt32 type = kIOMediumEthernetAuto;
    if (fInfo.duplex == 2)
        type |= kIOMediumOptionFullDuplex;
    else if (fInfo.duplex == 1)
        type |= kIOMediumOptionHalfDuplex;
    fMedium = IONetworkMedium::medium(type, speed);
    if (!media || !fMedium || !IONetworkMedium::addMedium(media, fMedium) || !publishMediumDictionary(media)) {
        OSSafeReleaseNULL(media);
        teardown();
        return false;
    }
    media->release();
    gate->runAction(OSMemberFunctionCast(IOCommandGate::Action, this,
                                         &org_virtiodarwin_VirtioNetController::gatedPublish));

    if (!attachInterface((IONetworkInterface **)&fInterface, false)) {
        teardown();
        return false;
    }
    /* KDP over this NIC (polled sendPacket/receivePacket). */
    attachDebuggerClient(&fDebugger);
    gate->runAction(OSMemberFunctionCast(IOCommandGate::Action, this,
                                         &org_virtiodarwin_VirtioNetController::gatedUpdateLink));
    fInterface->registerService();
    return true;
}

IOReturn org_virtiodarwin_VirtioNetController::gatedCreate(int32_t *st)
{
    /* A device without a usable MAC gets a random one (§5.1.5): its seed comes from the
     * kernel's random generator (uuid_generate_random reads read_random; 122 of its 128
     * bits are random, both halves folded), so no two guests share it. */
    VnetConfig config = {};
    uuid_t entropy;
    uuid_generate_random(entropy);
    for (unsigned i = 0; i < sizeof(entropy); i++)
        config.mac_seed = (config.mac_seed << 8 | config.mac_seed >> 56) ^ entropy[i];
    *st = vnet_create(fNub->virtioDevice(), &config, &fCallbacks, &fDev);
    if (*st == VNET_OK && fDev)
        *st = vnet_info(fDev, &fInfo);
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::gatedPublish(void)
{
    publishStats();
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::gatedUpdateLink(void)
{
    updateLink(fInfo.link_up != 0);
    return kIOReturnSuccess;
}

/* Stops and destroys the driver on the work loop (in-flight mbufs come back through
 * cbTxDone), then takes the deferred poll off it: from stop, and from every start failure
 * after the timer was added. */
void org_virtiodarwin_VirtioNetController::teardown(void)
{
    IOCommandGate *gate = getCommandGate();
    if (gate && fDev)
        gate->runAction(OSMemberFunctionCast(IOCommandGate::Action, this,
                                             &org_virtiodarwin_VirtioNetController::gatedStop));
    /* gatedStop cancelled it and nothing arms it without fDev; released in free. */
    if (fRxPoll && fRxPoll->getWorkLoop())
        fRxPoll->getWorkLoop()->removeEventSource(fRxPoll);
}

/* Runs on the termination thread, outside the gate, in this order:
 * 1. the debugger: KDP's entries read fDev without the gate;
 * 2. the driver (teardown, gated): the device stops, its interrupt entry is unregistered
 *    and the deferred poll taken off the work loop, so nothing on the work loop uses
 *    fInterface any more (handleEvents' flushInputQueue, cbRxFrame's inputPacket);
 * 3. only then the interface. Released first, it could be freed under an interrupt
 *    action still running on the work loop. */
void org_virtiodarwin_VirtioNetController::stop(IOService *provider)
{
    if (fDebugger) {
        detachDebuggerClient(fDebugger);
        fDebugger = NULL;
    }
    teardown();
    if (fInterface) {
        detachInterface(fInterface, true);
        OSSafeReleaseNULL(fInterface);
    }
    super::stop(provider);
}

IOReturn org_virtiodarwin_VirtioNetController::gatedStop(void)
{
    if (!fDev)
        return kIOReturnSuccess;
    /* In-flight mbufs come back through cbTxDone. VNET_E_LOCKED: a debugger entry holds the
     * driver, necessarily on another CPU (KDP runs with interrupts off, so none is under way
     * beneath this thread): wait for it, bounded. vnet_destroy leaks a driver it still
     * cannot stop rather than free it under that entry. */
    for (uint32_t i = 0; vnet_stop(fDev) == VNET_E_LOCKED && i < kStopRetries; i++)
        IODelay(10);
    vnet_destroy(fDev);
    fDev = NULL;
    /* Under the gate, so the deferred poll is not running; cancelTimeout guarantees "the
     * action will not be called again" (IOTimerEventSource.h), and without fDev
     * handleEvents cannot arm it. */
    if (fRxPoll)
        fRxPoll->cancelTimeout();
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioNetController::free(void)
{
    /* stop and start's failure paths destroy the driver on the work loop. Here the work
     * loop may be gone with the family, and an ungated destroy could race an interrupt:
     * never destroy here. */
    if (fDev)
        IOLog("VirtioNet: freed with a live driver (not destroyed: no work loop to do it on)\n");
    OSSafeReleaseNULL(fRxPoll);
    /* Every frame in flight came back through cbTxDone when the driver stopped. One that
     * did not (a driver leaked because a debugger entry held it) may still be read by the
     * device: its mapping is never torn down, so the pool is leaked whole. */
    bool inFlight = false;
    for (UInt32 i = 0; fTxSlots && i < fTxSlotCount; i++)
        inFlight |= fTxSlots[i].packet != NULL;
    if (fTxSlots && !inFlight) {
        for (UInt32 i = 0; i < fTxSlotCount; i++) {
            OSSafeReleaseNULL(fTxSlots[i].dma);
            OSSafeReleaseNULL(fTxSlots[i].md);
        }
        IOFree(fTxSlots, sizeof(TxSlot) * fTxSlotCount);
    } else if (fTxSlots) {
        IOLog("VirtioNet: frames still in flight at free; their mappings are leaked\n");
    }
    fTxSlots = NULL;
    fTxFree = NULL;
    OSSafeReleaseNULL(fMedium);
    super::free();
}

/* ---- power: IONetworkController PMinit()s, joins the tree and asks us to register; a
 * controller that does not is PMstop()ped, and its device is lost after a wake. ---- */

IOReturn org_virtiodarwin_VirtioNetController::registerWithPolicyMaker(IOService *policyMaker)
{
    return policyMaker->registerPowerDriver(this, gVirtioPowerStates, 2);
}

IOReturn org_virtiodarwin_VirtioNetController::setPowerState(unsigned long ordinal, IOService *device)
{
    IOCommandGate *gate = getCommandGate();
    if (gate)
        gate->runAction(OSMemberFunctionCast(IOCommandGate::Action, this,
                                             &org_virtiodarwin_VirtioNetController::gatedSetPower),
                        (void *)(uintptr_t)ordinal);
    return IOPMAckImplied;
}

/* Sleep: the output queue stops (frames wait in it), frames in flight complete or come
 * back through cbTxDone, the device is reset. Wake: the device is rebuilt with its MAC and
 * filters, link and MTU are read again, the queue restarts. */
IOReturn org_virtiodarwin_VirtioNetController::gatedSetPower(void *ordinal)
{
    bool on = (uintptr_t)ordinal != 0;
    if (!fDev)
        return kIOReturnSuccess;
    if (!on && !fAsleep) {
        fAsleep = true;
        if (getOutputQueue())
            getOutputQueue()->stop();
        /* VNET_E_LOCKED: a debugger entry holds the driver on another CPU; wait for it,
         * bounded, as gatedStop does. Still held: the device keeps running through the
         * sleep, and vnet_resume answers VNET_OK for a device that was never suspended. */
        int32_t st;
        for (uint32_t i = 0; (st = vnet_suspend(fDev)) == VNET_E_LOCKED && i < kStopRetries; i++)
            IODelay(10);
        if (st != VNET_OK)
            IOLog("VirtioNet: the device did not quiesce cleanly before sleep (status %d)\n", (int)st);
        setLinkStatus(kIONetworkLinkValid, NULL);
    } else if (on && fAsleep) {
        if (vnet_resume(fDev) != VNET_OK) {
            IOLog("VirtioNet: the device did not come back after wake; the interface stays down\n");
            return kIOReturnSuccess;
        }
        fAsleep = false;
        vnet_info(fDev, &fInfo);
        updateLink(fInfo.link_up != 0);
        if (fEnabled && getOutputQueue())
            getOutputQueue()->start();
    }
    return kIOReturnSuccess;
}

IOOutputQueue *org_virtiodarwin_VirtioNetController::createOutputQueue(void)
{
    /* outputPacket runs gated on the work loop, serialised with the interrupt entry. */
    return IOGatedOutputQueue::withTarget(this, getWorkLoop());
}

/* ---- enable / disable (called through the controller's command gate) ---- */

IOReturn org_virtiodarwin_VirtioNetController::enable(IONetworkInterface *netif)
{
    if (!fDev || vnet_enable(fDev, true) != VNET_OK)
        return kIOReturnNotAttached;
    fEnabled = true;
    getOutputQueue()->setCapacity(512);
    getOutputQueue()->start();
    updateLink(fInfo.link_up != 0);
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::disable(IONetworkInterface *netif)
{
    fEnabled = false;
    getOutputQueue()->stop();
    getOutputQueue()->flush();
    if (fDev)
        vnet_enable(fDev, false);
    publishStats();
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::enable(IOKernelDebugger *debugger)
{
    fDebuggerEnabled = true;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::disable(IOKernelDebugger *debugger)
{
    fDebuggerEnabled = false;
    return kIOReturnSuccess;
}

/* ---- transmit ---- */

#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
static uint32_t offloadRequest(mbuf_t m, uint32_t *mss)
{
    uint32_t flags = 0;
    mbuf_tso_request_flags_t tso = 0;
    u_int32_t value = 0;
    *mss = 0;
    if (mbuf_get_tso_requested(m, &tso, &value) == 0 && tso) {
        flags |= (tso & MBUF_TSO_IPV4) ? VNET_TX_TSO4 : VNET_TX_TSO6;
        *mss = value;
    }
    mbuf_csum_request_flags_t csum = 0;
    if (mbuf_get_csum_requested(m, &csum, &value) == 0) {
        if (csum & (MBUF_CSUM_REQ_TCP | MBUF_CSUM_REQ_TCPIPV6))
            flags |= VNET_TX_CSUM_TCP;
        else if (csum & (MBUF_CSUM_REQ_UDP | MBUF_CSUM_REQ_UDPIPV6))
            flags |= VNET_TX_CSUM_UDP;
    }
    return flags;
}
#pragma clang diagnostic pop

/* The transmit mapping pool: one slot per frame the driver lets be in flight
 * (VnetInfo::tx_frames), each with its DMA command (64-bit, kMapped: through the system
 * mapper, the IOMMU, when there is one) and a memory descriptor to re-aim at each frame. */
bool org_virtiodarwin_VirtioNetController::allocTxSlots(void)
{
    if (fInfo.tx_frames == 0 || fInfo.tx_frames > VNET_TX_FRAMES_MAX)
        return false;
    fTxSlots = (TxSlot *)IOMalloc(sizeof(TxSlot) * fInfo.tx_frames);
    if (!fTxSlots)
        return false;
    bzero(fTxSlots, sizeof(TxSlot) * fInfo.tx_frames);
    fTxSlotCount = fInfo.tx_frames;
    for (UInt32 i = 0; i < fTxSlotCount; i++) {
        TxSlot *slot = &fTxSlots[i];
        /* Aimed at the slot itself until a frame uses it: never prepared like that. */
        slot->ranges[0].address = (mach_vm_address_t)slot;
        slot->ranges[0].length = sizeof(*slot);
        slot->md = IOMemoryDescriptor::withAddressRanges(slot->ranges, 1, kIODirectionOut | kIOMemoryAsReference,
                                                          kernel_task);
        slot->dma = IODMACommand::withSpecification(kIODMACommandOutputHost64, 64, 0, IODMACommand::kMapped, 0, 1);
        if (!slot->md || !slot->dma)
            return false;
        slot->next = fTxFree;
        fTxFree = slot;
    }
    return true;
}

/* Maps the frame `m` through `slot` and writes its device segments to `segs`: their count,
 * or 0 when it needs more than the driver takes (fInfo.tx_max_segments, re-read after a
 * wake) or cannot be mapped. Nothing is allocated: the descriptor describes the mbufs'
 * data in place. */
UInt32 org_virtiodarwin_VirtioNetController::mapPacket(TxSlot *slot, mbuf_t m, VkSegment *segs)
{
    UInt32 max = fInfo.tx_max_segments;
    if (max == 0 || max > VNET_TX_SEGMENTS_MAX)
        return 0;
    UInt32 ranges = 0;
    UInt64 total = 0;
    for (mbuf_t p = m; p; p = mbuf_next(p)) {
        size_t len = mbuf_len(p);
        if (len == 0)
            continue;
        /* Each range is at least one segment. */
        if (ranges == max)
            return 0;
        slot->ranges[ranges].address = (mach_vm_address_t)mbuf_data(p);
        slot->ranges[ranges].length = len;
        ranges++;
        total += len;
    }
    if (ranges == 0)
        return 0;
    if (!slot->md->initWithOptions(slot->ranges, ranges, 0, kernel_task,
                                   kIOMemoryTypeVirtual64 | kIODirectionOut | kIOMemoryAsReference))
        return 0;
    if (slot->md->prepare(kIODirectionOut) != kIOReturnSuccess)
        return 0;
    if (slot->dma->setMemoryDescriptor(slot->md, true) != kIOReturnSuccess) {
        slot->md->complete(kIODirectionOut);
        return 0;
    }
    IODMACommand::Segment64 seg[VNET_TX_SEGMENTS_MAX];
    UInt64 offset = 0;
    UInt32 n = max;
    /* All of the frame in at most `max` segments, or it needs coalescing. */
    if (slot->dma->gen64IOVMSegments(&offset, seg, &n) != kIOReturnSuccess || n == 0 || offset != total) {
        unmapSlot(slot);
        return 0;
    }
    for (UInt32 i = 0; i < n; i++) {
        segs[i].addr = seg[i].fIOVMAddr;
        segs[i].len = (uint32_t)seg[i].fLength;
        segs[i].reserved = 0;
    }
    return n;
}

/* Ends a frame's mapping (the device is done with it, or it was never handed over). */
void org_virtiodarwin_VirtioNetController::unmapSlot(TxSlot *slot)
{
    slot->dma->clearMemoryDescriptor();
    slot->md->complete(kIODirectionOut);
}

/* A copy of `m` in fewer, larger buffers (allocatePacket's), for a frame whose mbufs need
 * more segments than the driver takes; NULL when there is no memory for it. */
mbuf_t org_virtiodarwin_VirtioNetController::coalesce(mbuf_t m)
{
    mbuf_t c = allocatePacket((UInt32)mbuf_pkthdr_len(m));
    if (!c)
        return NULL;
    size_t off = 0;
    for (mbuf_t p = m; p; p = mbuf_next(p)) {
        size_t len = mbuf_len(p);
        if (len && mbuf_copyback(c, off, len, mbuf_data(p), MBUF_DONTWAIT) != 0) {
            freePacket(c);
            return NULL;
        }
        off += len;
    }
    return c;
}

UInt32 org_virtiodarwin_VirtioNetController::outputPacket(mbuf_t m, void *param)
{
    if (!fEnabled || !fDev) {
        freePacket(m);
        return kIOReturnOutputDropped;
    }
    /* Empty exactly when the driver holds fInfo.tx_frames frames in flight: it stopped
     * taking frames when it took the last of them (its transmit interrupt is armed), so
     * this is a stall, not a drop: the frame stays queued and the reclaim that frees a
     * slot reports restart (handleEvents services the queue). Dropping here would make
     * IOBasicOutputQueue drop its whole backlog. */
    TxSlot *slot = fTxFree;
    if (!slot)
        return kIOReturnOutputStall;
    /* The offload request and the header copy from the stack's own mbuf (a coalesced copy
     * carries no request). */
    uint8_t headers[VNET_TX_HEADER_BYTES];
    size_t hlen = mbuf_pkthdr_len(m);
    if (hlen > sizeof(headers))
        hlen = sizeof(headers);
    if (mbuf_copydata(m, 0, hlen, headers) != 0)
        hlen = 0;
    uint32_t mss = 0;
    uint32_t flags = offloadRequest(m, &mss);
    VkSegment segs[VNET_TX_SEGMENTS_MAX];
    mbuf_t sent = m;
    UInt32 n = mapPacket(slot, m, segs);
    if (n == 0) {
        /* Too many pieces for the device: one fresh copy, as the mbuf cursor's coalescing
         * did; the stack's mbuf is kept until the copy is taken (a stall resends it). */
        sent = coalesce(m);
        n = sent ? mapPacket(slot, sent, segs) : 0;
        if (n == 0) {
            if (sent)
                freePacket(sent);
            freePacket(m);
            return kIOReturnOutputDropped;
        }
    }
    fTxFree = slot->next;
    slot->next = NULL;
    slot->packet = sent;
    bool stop = false;
    /* cbTxDone may run in here (completions are reclaimed first): slot is off the list. */
    int32_t st = vnet_transmit(fDev, segs, n, flags, mss, headers, hlen, (size_t)slot, &stop);
    if (st == VNET_OK) {
        if (sent != m)
            freePacket(m);
        return kIOReturnOutputSuccess;
    }
    unmapSlot(slot);
    slot->packet = NULL;
    slot->next = fTxFree;
    fTxFree = slot;
    if (sent != m)
        freePacket(sent);
    if (st == VNET_E_BUSY) {
        /* Kept by the queue; cbEvents restarts it when the ring has room. */
        return kIOReturnOutputStall;
    }
    freePacket(m);
    return kIOReturnOutputDropped;
}

/* ---- callbacks from Rust: on the work loop, inside the vnet_* call that collected them,
 * with the driver's lock released (so KDP entered from in here finds a working NIC) ---- */

/* The device is done with the frame of slot `token`: unmapped, freed, the slot free. */
void org_virtiodarwin_VirtioNetController::cbTxDone(void *ctx, size_t token)
{
    org_virtiodarwin_VirtioNetController *me = (org_virtiodarwin_VirtioNetController *)ctx;
    TxSlot *slot = (TxSlot *)token;
    unmapSlot(slot);
    me->freePacket(slot->packet);
    slot->packet = NULL;
    slot->next = me->fTxFree;
    me->fTxFree = slot;
}

void org_virtiodarwin_VirtioNetController::cbRxFrame(void *ctx, const VnetFragment *frags, size_t nfrags,
                                                      size_t len, uint32_t flags)
{
    org_virtiodarwin_VirtioNetController *me = (org_virtiodarwin_VirtioNetController *)ctx;
    if (!me->fEnabled || !me->fInterface)
        return;
    mbuf_t m = me->allocatePacket((UInt32)len);
    if (!m)
        return;
    size_t off = 0;
    for (size_t i = 0; i < nfrags; i++) {
        if (mbuf_copyback(m, off, frags[i].len, frags[i].data, MBUF_DONTWAIT) != 0) {
            me->freePacket(m);
            return;
        }
        off += frags[i].len;
    }
    /* Only DATA_VALID: partial checksums were completed in the fragments, and the
     * stack verifies them like any other. */
    if (flags & VNET_RX_CSUM_VALID) {
        UInt32 ok = kChecksumTCP | kChecksumUDP | kChecksumTCPIPv6 | kChecksumUDPIPv6;
        me->setChecksumResult(m, kChecksumFamilyTCPIP, ok, ok);
    }
    me->fInterface->inputPacket(m, (UInt32)len, IONetworkInterface::kInputOptionQueuePacket);
}

void org_virtiodarwin_VirtioNetController::cbEvents(void *ctx, const VnetEvents *ev)
{
    ((org_virtiodarwin_VirtioNetController *)ctx)->handleEvents(ev);
}

/* From the interrupt entry and the deferred poll, on the work loop. While rx_more says
 * receive is not finished, poll again, at most VNET_POLLS_PER_EVENT times, then leave the
 * rest to fRxPoll: a device that refills the ring as fast as buffers are reposted would
 * otherwise hold the work loop here for good, starving the output queue, enable/disable,
 * setPowerState and stop. Returning lets the work loop run its other event sources (the
 * output queue's among them) and then open its gate (IOWorkLoop::runEventSources); the
 * timer's action runs on a thread call that must close that gate like any command-gate
 * caller already waiting for it. */
void org_virtiodarwin_VirtioNetController::handleEvents(const VnetEvents *ev)
{
    VnetEvents e = *ev;
    bool restart = false, linkChanged = false, linkUp = false, needsReset = false, announce = false;
    for (uint32_t polls = 0;; polls++) {
        restart |= e.restart != 0;
        needsReset |= e.needs_reset != 0;
        announce |= e.announce != 0;
        if (e.link_changed) {
            linkChanged = true;
            linkUp = e.link_up != 0;
        }
        if (e.rx_frames && fInterface)
            fInterface->flushInputQueue();
        if (!e.rx_more || !fDev)
            break;
        if (polls == VNET_POLLS_PER_EVENT) {
            /* Receive may be waiting on this poll alone (its interrupt is off): never drop it. */
            fRxPoll->setTimeoutMS(0);
            break;
        }
        vnet_poll(fDev, &e);
    }
    if (restart && getOutputQueue())
        getOutputQueue()->service(IOBasicOutputQueue::kServiceAsync);
    if (linkChanged || needsReset)
        updateLink(linkUp && !needsReset);
    /* §5.1.6.5.4: gratuitous packets first, then the acknowledgement. */
    if (announce && !needsReset && fDev) {
        announceAddresses();
        fAnnounceAckPending = true;
    }
    /* The device asks again only on its next configuration interrupt, and QEMU sends its
     * next announce round only after the ack: an ack refused for now (a debugger entry
     * holds the driver, the control queue timed out) is retried from the next events. */
    if (fAnnounceAckPending && fDev && !needsReset) {
        int32_t st = vnet_ack_announce(fDev);
        if (st != VNET_E_LOCKED && st != VNET_E_TIMEOUT)
            fAnnounceAckPending = false;
        else if (!e.rx_more)
            fRxPoll->setTimeoutMS(10);
    }
    if (++fEvents % 4096 == 0)
        publishStats();
}

void org_virtiodarwin_VirtioNetController::rxPollFired(OSObject *owner, IOTimerEventSource *sender)
{
    org_virtiodarwin_VirtioNetController *me = OSDynamicCast(org_virtiodarwin_VirtioNetController, owner);
    /* Asleep: vnet_suspend dropped what was waiting, and wake rebuilds the queues. */
    if (!me || !me->fDev || me->fAsleep)
        return;
    VnetEvents e = {};
    vnet_poll(me->fDev, &e);
    me->handleEvents(&e);
}

/* ---- link, addresses, filters ---- */

/* The device asks to be announced (GUEST_ANNOUNCE, e.g. after a live migration: switches
 * must learn where the MAC went). Linux sends a gratuitous ARP and an unsolicited neighbour
 * advertisement per address (netdev_notify_peers); here inet_arp_init_ifaddr sends the
 * gratuitous ARP for each IPv4 address, as the stack does when an address or the link
 * address changes. IPv6 has no public KPI for an unsolicited advertisement: its peers
 * learn the new path from the ARP-triggered traffic or neighbour unreachability
 * detection. */
void org_virtiodarwin_VirtioNetController::announceAddresses(void)
{
    if (!fInterface || !fEnabled)
        return;
    ifnet_t ifp = fInterface->getIfnet();
    ifaddr_t *addrs = NULL;
    if (!ifp || ifnet_get_address_list_family(ifp, &addrs, AF_INET) != 0 || !addrs)
        return;
    for (unsigned i = 0; addrs[i]; i++)
        inet_arp_init_ifaddr(ifp, addrs[i]);
    ifnet_free_address_list(addrs);
}

void org_virtiodarwin_VirtioNetController::updateLink(bool up)
{
    if (fDev)
        vnet_info(fDev, &fInfo);
    UInt64 speed = (UInt64)(fInfo.speed_mbps ? fInfo.speed_mbps : 10000) * 1000000ULL;
    if (up)
        setLinkStatus(kIONetworkLinkValid | kIONetworkLinkActive, fMedium, speed);
    else
        setLinkStatus(kIONetworkLinkValid, NULL);
}

IOReturn org_virtiodarwin_VirtioNetController::getHardwareAddress(IOEthernetAddress *addr)
{
    bcopy(fInfo.mac, addr->bytes, kIOEthernetAddressSize);
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::setHardwareAddress(const IOEthernetAddress *addr)
{
    if (!fDev)
        return kIOReturnNotAttached;
    int32_t st = vnet_set_mac_address(fDev, addr->bytes);
    if (st == VNET_E_UNSUPPORTED)
        return kIOReturnUnsupported;
    if (st != VNET_OK)
        return kIOReturnError;
    vnet_info(fDev, &fInfo);
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::setPromiscuousMode(bool active)
{
    if (!fDev)
        return kIOReturnNotAttached;
    return vnet_set_promiscuous(fDev, active) == VNET_OK ? kIOReturnSuccess : kIOReturnError;
}

IOReturn org_virtiodarwin_VirtioNetController::setMulticastMode(bool active)
{
    fMulticastActive = active;
    if (!fDev)
        return kIOReturnNotAttached;
    if (!active)
        return vnet_set_multicast(fDev, NULL, 0) == VNET_OK ? kIOReturnSuccess : kIOReturnError;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::setMulticastList(IOEthernetAddress *addrs, UInt32 count)
{
    if (!fDev)
        return kIOReturnNotAttached;
    int32_t st = vnet_set_multicast(fDev, (const uint8_t *)addrs, count);
    return st == VNET_OK ? kIOReturnSuccess : kIOReturnError;
}

IOReturn org_virtiodarwin_VirtioNetController::getMaxPacketSize(UInt32 *maxSize) const
{
    *maxSize = fInfo.max_packet;
    return kIOReturnSuccess;
}

IOReturn org_virtiodarwin_VirtioNetController::getChecksumSupport(UInt32 *checksumMask, UInt32 checksumFamily,
                                                                  bool isOutput)
{
    *checksumMask = 0;
    if (checksumFamily != kChecksumFamilyTCPIP)
        return kIOReturnUnsupported;
    /* virtio checksums TCP/UDP (never the IPv4 header). */
    bool on = isOutput ? fInfo.tx_csum : fInfo.rx_csum;
    if (on)
        *checksumMask = kChecksumTCP | kChecksumUDP | kChecksumTCPIPv6 | kChecksumUDPIPv6;
    return kIOReturnSuccess;
}

UInt32 org_virtiodarwin_VirtioNetController::getFeatures(void) const
{
    UInt32 f = 0;
    if (fInfo.tso4)
        f |= kIONetworkFeatureTSOIPv4;
    if (fInfo.tso6)
        f |= kIONetworkFeatureTSOIPv6;
    return f;
}

const OSString *org_virtiodarwin_VirtioNetController::newVendorString(void) const
{
    return OSString::withCString("Virtio");
}

const OSString *org_virtiodarwin_VirtioNetController::newModelString(void) const
{
    return OSString::withCString("Virtio Network Device");
}

void org_virtiodarwin_VirtioNetController::publishStats(void)
{
    setProperty("VirtioFeatures", fInfo.features, 64);
    setProperty("VirtioHeaderLength", fInfo.header_len, 32);
    VnetStats s;
    if (!fDev || vnet_stats(fDev, &s) != VNET_OK)
        return;
    OSDictionary *d = OSDictionary::withCapacity(17);
    if (!d)
        return;
    const struct { const char *k; UInt64 v; } kv[] = {
        { "TxFrames", s.tx_frames }, { "TxBytes", s.tx_bytes }, { "TxRingFull", s.tx_busy },
        { "TxCompleted", s.tx_completed }, { "TxDropped", s.tx_dropped },
        { "RxFrames", s.rx_frames }, { "RxBytes", s.rx_bytes }, { "RxErrors", s.rx_errors },
        { "RxDroppedDisabled", s.rx_dropped_disabled }, { "RxDebuggerDropped", s.rx_debugger_dropped },
        { "DebugTxFrames", s.debug_tx_frames }, { "DebugRxFrames", s.debug_rx_frames },
        { "DebuggerLockedOut", s.debugger_locked_out }, { "ControlCommands", s.ctrl_commands },
        { "ControlErrors", s.ctrl_errors }, { "ConfigChanges", s.config_changes },
        { "Interrupts", s.interrupts },
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

/* ---- KDP: polled, interrupts off, the rest of the machine stopped ---- */

void org_virtiodarwin_VirtioNetController::sendPacket(void *pkt, UInt32 pktSize)
{
    if (!fDev || !pkt || pktSize > VNET_DEBUG_FRAME_MAX)
        return;
    /* VNET_E_LOCKED (the debugger stopped the driver mid-entry) drops it; KDP retries. */
    vnet_debug_send(fDev, (const uint8_t *)pkt, pktSize, kDebugSendSpins);
}

void org_virtiodarwin_VirtioNetController::receivePacket(void *pkt, UInt32 *pktSize, UInt32 timeout)
{
    *pktSize = 0;
    if (!fDev || !pkt)
        return;
    uint32_t polls = (timeout ? timeout : 1) * kDebugPollsPerMs;
    for (uint32_t i = 0; i < polls; i++) {
        size_t len = 0;
        int32_t st = vnet_debug_receive(fDev, (uint8_t *)pkt, VNET_DEBUG_FRAME_MAX, 1, &len);
        if (st == VNET_OK && len > 0) {
            *pktSize = (UInt32)len;
            return;
        }
        if (st != VNET_OK && st != VNET_E_LOCKED)
            return;
        IODelay(10);
    }
}
