//! IDT, the common interrupt entry, per-vector counters and the handler registry.
//!
//! Vector plan:
//! - 0..=31   CPU exceptions: printed, then exit with `ExitCode::Exception`;
//! - 0x20     (after remap, never used: the 8259 PICs are remapped to 0xE0..0xEF and masked)
//! - 0x21     the LAPIC timer tick (wakes `hlt` in bounded waits);
//! - 0x22     the self-test vector (self-IPI);
//! - 0x30..=0xDF allocatable device vectors (MSI-X entries, I/O APIC pins);
//! - 0xE0..=0xEF 8259 PIC (spurious only, both PICs fully masked);
//! - 0xFE     LAPIC error, 0xFF LAPIC spurious.
//!
//! Handlers run with interrupts disabled on the interrupted stack. They must not allocate
//! (the heap lock may be held by the interrupted code) and should be short: count, record,
//! maybe mask; the real work happens in thread context (see `time::wait_until`).

use crate::arch;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

pub const TIMER_VECTOR: u8 = 0x21;
pub const SELFTEST_VECTOR: u8 = 0x22;
pub const FIRST_DEVICE_VECTOR: u8 = 0x30;
pub const LAST_DEVICE_VECTOR: u8 = 0xDF;
pub const PIC_BASE_VECTOR: u8 = 0xE0;
pub const APIC_ERROR_VECTOR: u8 = 0xFE;
pub const SPURIOUS_VECTOR: u8 = 0xFF;

global_asm!(include_str!(concat!(env!("OUT_DIR"), "/isr_stubs.s")));

global_asm!(
    ".section .text.isr, \"ax\"",
    "isr_common:",
    // Frame pushed so far: [rsp] vector, [rsp+8] error code, then the CPU frame.
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rdi, rsp",
    "    mov rbx, rsp",     // callee-saved: restores rsp after the alignment below
    "    and rsp, -16",     // SysV call alignment
    "    cld",
    "    call {dispatch}",
    "    mov rsp, rbx",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rbp",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rbx",
    "    pop rax",
    "    add rsp, 16",      // vector + error code
    "    iretq",
    dispatch = sym isr_dispatch,
);

/// Register state at interrupt entry, as laid out by `isr_common`.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, align(16))]
#[derive(Copy, Clone)]
struct IdtEntry {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    zero: u32,
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

static mut IDT: Idt = Idt([IdtEntry {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    zero: 0,
}; 256]);

unsafe extern "C" {
    static isr_stub_table: [u64; 256];
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// Interrupts taken, per vector (all 256, exceptions included).
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

pub type Handler = Box<dyn Fn(u8) + Send + Sync>;

/// Registered handlers per vector; several may share one vector (shared INTx lines).
/// Taken only with interrupts disabled in thread context, so the interrupt path's
/// `try_lock` cannot fail on this single-CPU guest.
static HANDLERS: spin::Mutex<[Vec<(HandlerId, Handler)>; 256]> =
    spin::Mutex::new([const { Vec::new() }; 256]);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Allocation bitmap of device vectors.
static ALLOCATED: spin::Mutex<[bool; 256]> = spin::Mutex::new([false; 256]);

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HandlerId(u64);

/// Loads the IDT with all 256 stubs (interrupt gates: IF is cleared on entry).
pub fn init() {
    let idt = &raw mut IDT;
    // SAFETY: isr_stub_table is an immutable table of 256 code addresses (build.rs).
    let stubs = unsafe { &isr_stub_table };
    for (v, &addr) in stubs.iter().enumerate() {
        let entry = IdtEntry {
            offset_lo: addr as u16,
            selector: 0x08,
            ist: 0,
            type_attr: 0x8E, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (addr >> 16) as u16,
            offset_hi: (addr >> 32) as u32,
            zero: 0,
        };
        // SAFETY: runs once at boot before interrupts are enabled; nothing else accesses
        // the IDT yet.
        unsafe { (*idt).0[v] = entry };
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT is static and fully initialised; every entry points at a stub.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags))
    };
}

extern "C" fn isr_dispatch(frame: &mut Frame) {
    let vector = frame.vector as u8;
    COUNTS[vector as usize].fetch_add(1, Ordering::Relaxed);
    if vector < 32 {
        exception(frame);
    }
    if vector == SPURIOUS_VECTOR || (PIC_BASE_VECTOR..PIC_BASE_VECTOR + 16).contains(&vector) {
        // Spurious LAPIC / 8259 interrupts: counted, never acknowledged (no EOI by spec).
        return;
    }
    if let Some(handlers) = HANDLERS.try_lock() {
        for (_, h) in handlers[vector as usize].iter() {
            h(vector);
        }
    }
    crate::apic::eoi();
}

fn exception(frame: &Frame) -> ! {
    crate::serial::enter_emergency();
    let v = frame.vector as usize;
    crate::println!(
        "EXCEPTION {} (vector {}) error={:#x}",
        EXCEPTION_NAMES[v],
        v,
        frame.error
    );
    crate::println!(
        "  rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} cr2={:#018x}",
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        arch::read_cr2()
    );
    crate::println!(
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp
    );
    crate::exit::exit(crate::exit::ExitCode::Exception)
}

/// Number of times `vector` was taken since boot.
pub fn count(vector: u8) -> u64 {
    COUNTS[vector as usize].load(Ordering::Relaxed)
}

/// Registers `handler` for `vector`; it runs in interrupt context before the EOI.
pub fn register(vector: u8, handler: Handler) -> HandlerId {
    let id = HandlerId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
    arch::without_interrupts(|| HANDLERS.lock()[vector as usize].push((id, handler)));
    id
}

/// Removes a handler registered with [`register`].
pub fn unregister(vector: u8, id: HandlerId) {
    let removed = arch::without_interrupts(|| {
        let mut all = HANDLERS.lock();
        let list = &mut all[vector as usize];
        list.iter()
            .position(|(i, _)| *i == id)
            .map(|pos| list.remove(pos))
    });
    // Dropped here, with interrupts enabled again and outside the lock.
    drop(removed);
}

/// Allocates a free device vector.
pub fn alloc_vector() -> Option<u8> {
    arch::without_interrupts(|| {
        let mut map = ALLOCATED.lock();
        let v = (FIRST_DEVICE_VECTOR..=LAST_DEVICE_VECTOR).find(|&v| !map[v as usize])?;
        map[v as usize] = true;
        Some(v)
    })
}

pub fn free_vector(vector: u8) {
    arch::without_interrupts(|| ALLOCATED.lock()[vector as usize] = false);
}

/// (vector, count) for every vector taken at least once.
pub fn nonzero_counts() -> Vec<(u8, u64)> {
    (0..=255u8)
        .map(|v| (v, count(v)))
        .filter(|&(_, c)| c > 0)
        .collect()
}
