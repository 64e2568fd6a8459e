/*
 * VirtioFamily.kext: IOKit plumbing around the Rust virtio PCI bus (see the header).
 */
#include "VirtioPCITransport.h"

#include <IOKit/IOLib.h>
#include <IOKit/IOBufferMemoryDescriptor.h>
#include <IOKit/IODMACommand.h>
#include <libkern/c++/OSNumber.h>
#include <pexpert/pexpert.h>

#define super IOService
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioPCITransport, IOService)

/* Device addresses stay below 2^44: a legacy queue address is a 32-bit page number. */
static const UInt8 kDmaAddressBits = 44;
static const mach_vm_address_t kDmaPhysicalMask = 0x00000FFFFFFFF000ULL;

static IODMACommand *newDmaCommand(void)
{
    return IODMACommand::withSpecification(kIODMACommandOutputHost64, kDmaAddressBits,
                                           0, IODMACommand::kMapped, 0, 1);
}

/* One contiguous device-visible segment of `md`, or false. */
static bool singleSegment(IODMACommand *cmd, IOMemoryDescriptor *md, uint64_t len, uint64_t *daddr)
{
    if (cmd->setMemoryDescriptor(md, true) != kIOReturnSuccess)
        return false;
    UInt64 offset = 0;
    IODMACommand::Segment64 seg;
    UInt32 n = 1;
    if (cmd->gen64IOVMSegments(&offset, &seg, &n) != kIOReturnSuccess || n != 1 || seg.fLength < len) {
        cmd->clearMemoryDescriptor();
        return false;
    }
    *daddr = seg.fIOVMAddr;
    return true;
}

IOService *org_virtiodarwin_VirtioPCITransport::probe(IOService *provider, SInt32 *score)
{
    IOPCIDevice *pci = OSDynamicCast(IOPCIDevice, provider);
    if (!pci)
        return NULL;
    /* The personality matches the whole 0x1000-0x107F range; the ID table decides. */
    uint32_t type = vfam_identify(pci->configRead16(kIOPCIConfigVendorID),
                                  pci->configRead16(kIOPCIConfigDeviceID),
                                  pci->configRead16(kIOPCIConfigSubSystemID));
    if (type == 0 || !haveDriverFor(type))
        return NULL;
    /* The user handed this type to another driver (macOS's own): see docs/install.md. */
    char deferred[128];
    if (PE_parse_boot_argn(kVirtioDeferBootArg, deferred, sizeof(deferred)) &&
        vfam_type_deferred(type, deferred)) {
        IOLog("VirtioFamily: virtio device type %u left to another driver (%s=%s)\n",
              type, kVirtioDeferBootArg, deferred);
        return NULL;
    }
    return super::probe(provider, score);
}

/* Whether a device kext of ours drives `type`: the personality lists them (generated from
 * the one table of kexts), so the family never takes a device that nothing of ours would
 * drive and that another driver could have had. */
bool org_virtiodarwin_VirtioPCITransport::haveDriverFor(uint32_t type)
{
    OSArray *types = OSDynamicCast(OSArray, getProperty(kVirtioDriverTypesKey));
    if (!types)
        return false;
    for (unsigned i = 0; i < types->getCount(); i++) {
        OSNumber *n = OSDynamicCast(OSNumber, types->getObject(i));
        if (n && n->unsigned32BitValue() == type)
            return true;
    }
    return false;
}

void org_virtiodarwin_VirtioPCITransport::mapBars(void)
{
    for (int i = 0; i < 6; i++) {
        fBars[i] = NULL;
        fBarIsIO[i] = false;
    }
    for (int i = 0; i < 6; i++) {
        UInt8 reg = (UInt8)(kIOPCIConfigBaseAddress0 + 4 * i);
        UInt32 v = fPCI->configRead32(reg);
        if (v == 0)
            continue;
        fBarIsIO[i] = (v & 1) != 0;
        fBars[i] = fPCI->mapDeviceMemoryWithRegister(reg);
        /* A 64-bit memory BAR takes two registers. */
        if (!fBarIsIO[i] && (v & 0x6) == 0x4)
            i++;
    }
}

bool org_virtiodarwin_VirtioPCITransport::start(IOService *provider)
{
    IOPCIDevice *pci = OSDynamicCast(IOPCIDevice, provider);
    if (!pci || !super::start(provider))
        return false;
    /* Held until stop: the interrupt sources, BAR maps and DMA commands all use it. */
    pci->retain();
    fPCI = pci;
    vfam_log_init();
    fWorkLoop = IOWorkLoop::workLoop();
    fDmaBuffers = OSArray::withCapacity(64);
    fDmaCommands = OSArray::withCapacity(64);
    fMapDescriptors = OSArray::withCapacity(4);
    fMapCommands = OSArray::withCapacity(4);
    if (!fWorkLoop || !fDmaBuffers || !fDmaCommands || !fMapDescriptors || !fMapCommands) {
        releaseResources();
        return false;
    }
    fPCI->setMemoryEnable(true);
    fPCI->setIOEnable(true);
    /* Bus mastering off until the device has reset: firmware (or a previous driver whose
     * reset did not take) may have left it running on rings in memory the kernel now owns.
     * The Rust bus turns it on, through opConfigWrite, once the device acknowledges its
     * first reset (virtio 1.2 §2.1.2: a reset device uses no driver memory). */
    fPCI->setBusMasterEnable(false);
    mapBars();

    fPlatform.ctx = this;
    fPlatform.config_read = opConfigRead;
    fPlatform.config_write = opConfigWrite;
    fPlatform.bar_info = opBarInfo;
    fPlatform.bar_read = opBarRead;
    fPlatform.bar_write = opBarWrite;
    fPlatform.dma_alloc = opDmaAlloc;
    fPlatform.dma_free = opDmaFree;
    fPlatform.dma_map = opDmaMap;
    fPlatform.dma_unmap = opDmaUnmap;
    fPlatform.irq_enable_msix = opIrqEnableMsix;
    fPlatform.irq_enable_intx = opIrqEnableIntx;
    fPlatform.irq_disable = opIrqDisable;

    VkStatus st = vfam_device_create(&fPlatform, VFAM_PREFER_AUTO, &fDevice);
    if (st.code != VK_OK || !fDevice) {
        IOLog("VirtioFamily: cannot drive this function (status %d)\n", (int)st.code);
        releaseResources();
        super::stop(provider);
        return false;
    }
    uint32_t type = vfam_device_type(fDevice);
    bool modern = vfam_transport_kind(fDevice) == VFAM_TRANSPORT_MODERN;
    setProperty(kVirtioDeviceTypeKey, type, 32);
    setProperty("VirtioTransport", modern ? "modern" : "legacy");

    fNub = OSTypeAlloc(org_virtiodarwin_VirtioDevice);
    if (!fNub || !fNub->init()) {
        releaseResources();
        super::stop(provider);
        return false;
    }
    fNub->fDevice = fDevice;
    fNub->setProperty(kVirtioDeviceTypeKey, type, 32);
    fNub->setProperty("VirtioTransport", modern ? "modern" : "legacy");
    if (!fNub->attach(this)) {
        releaseResources();
        super::stop(provider);
        return false;
    }
    /* The power tree: PCI device -> transport -> nub -> device kext, so the device kext
     * sleeps (quiesces and resets its device) before the function's power goes. */
    PMinit();
    fPCI->joinPMtree(this);
    registerPowerDriver(this, gVirtioPowerStates, 2);
    fNub->PMinit();
    joinPMtree(fNub);
    fNub->registerPowerDriver(fNub, gVirtioPowerStates, 2);
    fNub->registerService();
    registerService();
    return true;
}

IOReturn org_virtiodarwin_VirtioPCITransport::setPowerState(unsigned long ordinal, IOService *device)
{
    /* Nothing of the transport's own: the device kext below has quiesced or rebuilt the
     * device, and IOPCIFamily saves and restores the function's config space and MSI-X. */
    return IOPMAckImplied;
}

void org_virtiodarwin_VirtioPCITransport::stop(IOService *provider)
{
    PMstop();
    /* The nub's client has stopped (IOKit terminates children first). */
    releaseResources();
    super::stop(provider);
}

/* Runs with the work loop's gate held: no interrupt action and no client call is inside
 * the Rust bus while the device is reset and its rings are freed. */
IOReturn org_virtiodarwin_VirtioPCITransport::destroyGated(OSObject *owner, void *, void *, void *, void *)
{
    org_virtiodarwin_VirtioPCITransport *me = OSDynamicCast(org_virtiodarwin_VirtioPCITransport, owner);
    if (!me || !me->fDevice)
        return kIOReturnSuccess;
    VfamDevice *dev = me->fDevice;
    me->fDevice = NULL;
    /* Resets the device and frees its queues (through opDmaFree). Not VK_OK: the device
     * may still use memory it was given (see releaseResources). */
    VkStatus st = vfam_device_destroy(dev);
    if (st.code != VK_OK)
        me->fDeviceMayDma = true;
    return kIOReturnSuccess;
}

void org_virtiodarwin_VirtioPCITransport::releaseResources(void)
{
    if (fNub) {
        fNub->PMstop();
        fNub->fDevice = NULL;
        fNub->detach(this);
        fNub->release();
        fNub = NULL;
    }
    /* Order matters: first no interrupt can reach the bus (sources disabled and removed
     * from the work loop), then the device is reset and its rings freed under the gate. */
    opIrqDisable(this);
    if (fDevice) {
        if (fWorkLoop)
            fWorkLoop->runAction(&org_virtiodarwin_VirtioPCITransport::destroyGated, this);
        else
            destroyGated(this, NULL, NULL, NULL, NULL);
    }
    if (fPCI) {
        /* Only while the provider is ours (stop, or a failed start): after stop it is
         * released and may be gone (hot-unplug), so free() must not touch it. */
        fPCI->setBusMasterEnable(false);
    }
    for (int i = 0; i < 6; i++) {
        OSSafeReleaseNULL(fBars[i]);
    }
    if (fDeviceMayDma) {
        leakDmaMemory();
    } else if (fDmaCommands) {
        for (unsigned i = 0; i < fDmaCommands->getCount(); i++) {
            IODMACommand *c = OSDynamicCast(IODMACommand, fDmaCommands->getObject(i));
            if (c)
                c->clearMemoryDescriptor();
        }
    }
    OSSafeReleaseNULL(fDmaBuffers);
    OSSafeReleaseNULL(fDmaCommands);
    OSSafeReleaseNULL(fMapDescriptors);
    OSSafeReleaseNULL(fMapCommands);
    OSSafeReleaseNULL(fPCI);
}

/* DELIBERATE LEAK. The device ignored a reset and its Bus Master Enable could not be
 * cleared (vfam_device_destroy did not return VK_OK), so it may still read and write every
 * buffer it was given: the rings the Rust bus kept, the regions the client kexts leaked
 * after vfam_reset reported VK_E_RESET_TIMEOUT (all allocated through opDmaAlloc and still
 * in fDmaBuffers), and the streaming mappings still in fMapDescriptors. Completing,
 * unmapping or releasing them would hand wired physical pages back to the kernel while a
 * device can still write into them: memory corruption of whoever gets them next. Each
 * buffer, descriptor and DMA command is retained once more and that reference is never
 * dropped, so releasing the arrays afterwards frees none of them: they stay prepared
 * (wired) and mapped for ever, which costs memory only. Same rule as
 * virtio_core::Bus::reset for the Rust drivers. */
void org_virtiodarwin_VirtioPCITransport::leakDmaMemory(void)
{
    OSArray *arrays[] = { fDmaBuffers, fDmaCommands, fMapDescriptors, fMapCommands };
    if (!fDmaBuffers && !fDmaCommands && !fMapDescriptors && !fMapCommands)
        return; /* already done (releaseResources runs again from free) */
    for (unsigned a = 0; a < sizeof(arrays) / sizeof(arrays[0]); a++) {
        if (!arrays[a])
            continue;
        for (unsigned i = 0; i < arrays[a]->getCount(); i++) {
            OSObject *o = arrays[a]->getObject(i);
            if (o)
                o->retain();
        }
    }
    IOLog("VirtioFamily: the device did not reset and its DMA could not be stopped: "
          "keeping %u DMA buffers and %u mappings allocated (leaked)\n",
          fDmaBuffers ? fDmaBuffers->getCount() : 0,
          fMapDescriptors ? fMapDescriptors->getCount() : 0);
}

void org_virtiodarwin_VirtioPCITransport::free(void)
{
    releaseResources();
    OSSafeReleaseNULL(fParked);
    OSSafeReleaseNULL(fWorkLoop);
    super::free();
}

IOWorkLoop *org_virtiodarwin_VirtioPCITransport::getWorkLoop(void) const
{
    return fWorkLoop;
}

/* ---- interrupts: event sources on the work loop, delivered to Rust ---- */

void org_virtiodarwin_VirtioPCITransport::interruptOccurred(OSObject *owner, IOInterruptEventSource *src, int count)
{
    org_virtiodarwin_VirtioPCITransport *me = OSDynamicCast(org_virtiodarwin_VirtioPCITransport, owner);
    if (!me)
        return;
    /* A source parked by an earlier action: that action's checkForWork has returned (the
     * work loop runs one action at a time). */
    OSSafeReleaseNULL(me->fParked);
    if (!me->fDevice)
        return;
    for (UInt32 k = 0; k < me->fIrqCount; k++) {
        if (me->fIrq[k] == src) {
            me->fDelivering = src;
            vfam_deliver_interrupt(me->fDevice, me->fMsix ? (int32_t)k : VK_VECTOR_INTX);
            me->fDelivering = NULL;
            return;
        }
    }
}

bool org_virtiodarwin_VirtioPCITransport::addInterruptSource(int index)
{
    IOInterruptEventSource *s = IOInterruptEventSource::interruptEventSource(
        this, &org_virtiodarwin_VirtioPCITransport::interruptOccurred, fPCI, index);
    if (!s)
        return false;
    if (fWorkLoop->addEventSource(s) != kIOReturnSuccess) {
        s->release();
        return false;
    }
    fIrq[fIrqCount++] = s;
    return true;
}

bool org_virtiodarwin_VirtioPCITransport::opIrqEnableMsix(void *ctx, uint16_t vectors)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    if (vectors == 0 || vectors > kVirtioMaxVectors)
        return false;
    int indexes[kVirtioMaxVectors];
    UInt32 found = 0;
    int type = 0;
    for (int i = 0; found < vectors && me->fPCI->getInterruptType(i, &type) == kIOReturnSuccess; i++) {
        if (type & kIOInterruptTypePCIMessaged)
            indexes[found++] = i;
    }
    if (found < vectors)
        return false;
    me->fMsix = true;
    for (UInt32 k = 0; k < vectors; k++) {
        if (!me->addInterruptSource(indexes[k])) {
            opIrqDisable(ctx);
            return false;
        }
    }
    for (UInt32 k = 0; k < me->fIrqCount; k++)
        me->fIrq[k]->enable();
    return true;
}

bool org_virtiodarwin_VirtioPCITransport::opIrqEnableIntx(void *ctx)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    int type = 0;
    for (int i = 0; me->fPCI->getInterruptType(i, &type) == kIOReturnSuccess; i++) {
        if (type & kIOInterruptTypePCIMessaged)
            continue;
        me->fMsix = false;
        if (!me->addInterruptSource(i))
            return false;
        me->fIrq[0]->enable();
        return true;
    }
    return false;
}

void org_virtiodarwin_VirtioPCITransport::opIrqDisable(void *ctx)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    for (UInt32 k = 0; k < me->fIrqCount; k++) {
        me->fIrq[k]->disable();
        if (me->fWorkLoop)
            me->fWorkLoop->removeEventSource(me->fIrq[k]);
        if (me->fIrq[k] == me->fDelivering && !me->fParked)
            me->fParked = me->fIrq[k]; /* its action is running: released later */
        else
            me->fIrq[k]->release();
        me->fIrq[k] = NULL;
    }
    me->fIrqCount = 0;
}

/* ---- config space and BARs ---- */

uint32_t org_virtiodarwin_VirtioPCITransport::opConfigRead(void *ctx, uint16_t offset, uint8_t width)
{
    IOPCIDevice *pci = ((org_virtiodarwin_VirtioPCITransport *)ctx)->fPCI;
    UInt8 off = (UInt8)offset;
    switch (width) {
    case 1: return pci->configRead8(off);
    case 2: return pci->configRead16(off);
    default: return pci->configRead32(off);
    }
}

void org_virtiodarwin_VirtioPCITransport::opConfigWrite(void *ctx, uint16_t offset, uint8_t width, uint32_t value)
{
    IOPCIDevice *pci = ((org_virtiodarwin_VirtioPCITransport *)ctx)->fPCI;
    UInt8 off = (UInt8)offset;
    switch (width) {
    case 1: pci->configWrite8(off, (UInt8)value); break;
    case 2: pci->configWrite16(off, (UInt16)value); break;
    default: pci->configWrite32(off, value); break;
    }
}

bool org_virtiodarwin_VirtioPCITransport::opBarInfo(void *ctx, uint8_t bar, uint64_t *len, bool *isIO)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    if (bar >= 6 || !me->fBars[bar])
        return false;
    *len = me->fBars[bar]->getLength();
    *isIO = me->fBarIsIO[bar];
    return true;
}

/* Bounds were checked by the Rust side (KextBars) before any access reaches here. */
uint32_t org_virtiodarwin_VirtioPCITransport::opBarRead(void *ctx, uint8_t bar, uint64_t offset, uint8_t width)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    IOMemoryMap *map = me->fBars[bar];
    if (me->fBarIsIO[bar]) {
        switch (width) {
        case 1: return me->fPCI->ioRead8((UInt16)offset, map);
        case 2: return me->fPCI->ioRead16((UInt16)offset, map);
        default: return me->fPCI->ioRead32((UInt16)offset, map);
        }
    }
    volatile uint8_t *p = (volatile uint8_t *)(map->getVirtualAddress() + offset);
    switch (width) {
    case 1: return *p;
    case 2: return *(volatile uint16_t *)p;
    default: return *(volatile uint32_t *)p;
    }
}

void org_virtiodarwin_VirtioPCITransport::opBarWrite(void *ctx, uint8_t bar, uint64_t offset, uint8_t width, uint32_t value)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    IOMemoryMap *map = me->fBars[bar];
    if (me->fBarIsIO[bar]) {
        switch (width) {
        case 1: me->fPCI->ioWrite8((UInt16)offset, (UInt8)value, map); break;
        case 2: me->fPCI->ioWrite16((UInt16)offset, (UInt16)value, map); break;
        default: me->fPCI->ioWrite32((UInt16)offset, value, map); break;
        }
        return;
    }
    volatile uint8_t *p = (volatile uint8_t *)(map->getVirtualAddress() + offset);
    switch (width) {
    case 1: *p = (uint8_t)value; break;
    case 2: *(volatile uint16_t *)p = (uint16_t)value; break;
    default: *(volatile uint32_t *)p = value; break;
    }
}

/* ---- DMA: IOBufferMemoryDescriptor + IODMACommand, never raw physical addresses ---- */

bool org_virtiodarwin_VirtioPCITransport::opDmaAlloc(void *ctx, uint64_t len, uint64_t align, VkDmaRegion *out)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    /* The physical mask's low zero bits give page alignment, which covers align <= 4096. */
    if (align > 4096 || len == 0)
        return false;
    IOBufferMemoryDescriptor *bmd = IOBufferMemoryDescriptor::inTaskWithPhysicalMask(
        kernel_task, kIODirectionInOut | kIOMemoryPhysicallyContiguous, len, kDmaPhysicalMask);
    if (!bmd)
        return false;
    IODMACommand *cmd = newDmaCommand();
    uint64_t daddr = 0;
    if (!cmd || bmd->prepare() != kIOReturnSuccess) {
        OSSafeReleaseNULL(cmd);
        bmd->release();
        return false;
    }
    if (!singleSegment(cmd, bmd, len, &daddr)) {
        bmd->complete();
        cmd->release();
        bmd->release();
        return false;
    }
    bzero(bmd->getBytesNoCopy(), len);
    me->fDmaBuffers->setObject(bmd);
    me->fDmaCommands->setObject(cmd);
    bmd->release();
    cmd->release();
    out->vaddr = (uint8_t *)bmd->getBytesNoCopy();
    out->daddr = daddr;
    out->len = len;
    return true;
}

void org_virtiodarwin_VirtioPCITransport::opDmaFree(void *ctx, const VkDmaRegion *region)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    if (!me->fDmaBuffers)
        return;
    for (unsigned i = 0; i < me->fDmaBuffers->getCount(); i++) {
        IOBufferMemoryDescriptor *bmd = OSDynamicCast(IOBufferMemoryDescriptor, me->fDmaBuffers->getObject(i));
        if (bmd && bmd->getBytesNoCopy() == region->vaddr) {
            IODMACommand *cmd = OSDynamicCast(IODMACommand, me->fDmaCommands->getObject(i));
            if (cmd)
                cmd->clearMemoryDescriptor();
            bmd->complete();
            me->fDmaCommands->removeObject(i);
            me->fDmaBuffers->removeObject(i);
            return;
        }
    }
    IOLog("VirtioFamily: dma_free of an unknown region\n");
}

bool org_virtiodarwin_VirtioPCITransport::opDmaMap(void *ctx, uint8_t *vaddr, uint64_t len, uint32_t dir, uint64_t *daddr)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    IODirection d = dir == VK_DMA_TO_DEVICE ? kIODirectionOut
                  : dir == VK_DMA_FROM_DEVICE ? kIODirectionIn : kIODirectionInOut;
    IOMemoryDescriptor *md = IOMemoryDescriptor::withAddressRange((mach_vm_address_t)vaddr, len, d, kernel_task);
    IODMACommand *cmd = newDmaCommand();
    if (!md || !cmd || md->prepare() != kIOReturnSuccess) {
        OSSafeReleaseNULL(md);
        OSSafeReleaseNULL(cmd);
        return false;
    }
    if (!singleSegment(cmd, md, len, daddr)) {
        md->complete();
        md->release();
        cmd->release();
        return false;
    }
    me->fMapDescriptors->setObject(md);
    me->fMapCommands->setObject(cmd);
    md->release();
    cmd->release();
    return true;
}

void org_virtiodarwin_VirtioPCITransport::opDmaUnmap(void *ctx, uint64_t daddr, uint64_t len, uint32_t dir)
{
    org_virtiodarwin_VirtioPCITransport *me = (org_virtiodarwin_VirtioPCITransport *)ctx;
    for (unsigned i = 0; i < me->fMapCommands->getCount(); i++) {
        IODMACommand *cmd = OSDynamicCast(IODMACommand, me->fMapCommands->getObject(i));
        UInt64 offset = 0;
        IODMACommand::Segment64 seg;
        UInt32 n = 1;
        if (cmd && cmd->gen64IOVMSegments(&offset, &seg, &n) == kIOReturnSuccess && n == 1 && seg.fIOVMAddr == daddr) {
            IOMemoryDescriptor *md = OSDynamicCast(IOMemoryDescriptor, me->fMapDescriptors->getObject(i));
            cmd->clearMemoryDescriptor(); /* syncs for FromDevice */
            if (md)
                md->complete();
            me->fMapCommands->removeObject(i);
            me->fMapDescriptors->removeObject(i);
            return;
        }
    }
}

/* ---- the nub ---- */

#undef super
#define super IOService
OSDefineMetaClassAndStructors(org_virtiodarwin_VirtioDevice, IOService)

bool org_virtiodarwin_VirtioDevice::matchPropertyTable(OSDictionary *table, SInt32 *score)
{
    if (!super::matchPropertyTable(table, score))
        return false;
    OSObject *want = table->getObject(kVirtioDeviceTypeKey);
    if (!want)
        return true;
    OSObject *have = getProperty(kVirtioDeviceTypeKey);
    return have && have->isEqualTo(want);
}

IOReturn org_virtiodarwin_VirtioDevice::setPowerState(unsigned long ordinal, IOService *device)
{
    /* A node of the power tree only: its device kext does the work. */
    return IOPMAckImplied;
}
