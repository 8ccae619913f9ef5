//! The IDT, the interrupt entry stubs, exception reports, device-interrupt
//! bookkeeping and [`idle_wait`], the event loop's way to sleep.
//!
//! Every vector has a 16-byte assembly stub that pushes a zero error code
//! (when the CPU does not push one) and the vector number, then jumps to a
//! common path that saves the general registers and calls
//! [`strata_trap_dispatch`] with a [`TrapFrame`]. (Rust's
//! `x86-interrupt` ABI is not stable, hence the stubs.)
//!
//! - Exceptions (0..32) print vector, error code, RIP, CR2 and registers on
//!   the console and stop QEMU with the failure code. Double faults run on
//!   IST 1, NMI and machine checks on IST 2 (see [`super::gdt`]).
//! - The local-APIC timer (vector 0x20) only wakes the CPU.
//! - Device interrupts (GSI n → vector 0x30 + n) record the GSI in a
//!   pending mask and wake the CPU. Handlers never touch devices: the event
//!   loop polls them after waking. A level-triggered line stays asserted
//!   until the device is acknowledged (virtio: reading the ISR status), so
//!   its handler masks it at the I/O APIC; [`idle_wait`] unmasks it before
//!   the next sleep, by when the loop has acknowledged the device.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86_64::instructions::interrupts as cpu;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::apic::{
    self, Polarity, Trigger, IRQ_BASE_VECTOR, MAX_GSI, SPURIOUS_VECTOR, TIMER_VECTOR,
};
use super::gdt;
use super::serial::EmergencyConsole;
use super::time;

pub use super::apic::IrqError;

/// Longest single sleep of [`idle_wait`]: a safety net against a lost
/// interrupt, not a polling period.
pub const IDLE_MAX_NS: u64 = 100_000_000;

/// Registers saved by the entry stubs, in stack order (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// General registers, pushed by the common stub.
    pub r15: u64,
    /// r14.
    pub r14: u64,
    /// r13.
    pub r13: u64,
    /// r12.
    pub r12: u64,
    /// r11.
    pub r11: u64,
    /// r10.
    pub r10: u64,
    /// r9.
    pub r9: u64,
    /// r8.
    pub r8: u64,
    /// rbp.
    pub rbp: u64,
    /// rdi.
    pub rdi: u64,
    /// rsi.
    pub rsi: u64,
    /// rdx.
    pub rdx: u64,
    /// rcx.
    pub rcx: u64,
    /// rbx.
    pub rbx: u64,
    /// rax.
    pub rax: u64,
    /// Vector number, pushed by the per-vector stub.
    pub vector: u64,
    /// Error code (pushed by the CPU, or 0 by the stub).
    pub error_code: u64,
    /// Interrupted instruction pointer (pushed by the CPU).
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// Interrupted stack pointer.
    pub rsp: u64,
    /// Stack segment.
    pub ss: u64,
}

// Vectors whose exceptions push an error code (Intel SDM vol. 3A §6.15):
// 8 #DF, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 14 #PF, 17 #AC, 21 #CP, 29 #VC,
// 30 #SX. Each stub is padded to 16 bytes so stub n is at base + 16 n.
core::arch::global_asm!(
    r#"
    .section .text.strata_isr, "ax", @progbits
    .balign 16
    .global strata_isr_stubs
strata_isr_stubs:
    .set strata_vec, 0
    .rept 256
    .balign 16
    .if (strata_vec == 8) || (strata_vec == 10) || (strata_vec == 11) || (strata_vec == 12) || (strata_vec == 13) || (strata_vec == 14) || (strata_vec == 17) || (strata_vec == 21) || (strata_vec == 29) || (strata_vec == 30)
    .else
    pushq $0
    .endif
    pushq $strata_vec
    jmp strata_isr_common
    .set strata_vec, strata_vec + 1
    .endr

    .balign 16
strata_isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call strata_trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static strata_isr_stubs: u8;
}

/// One 64-bit interrupt gate (Intel SDM vol. 3A §6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64, selector: u16, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector,
            ist,
            // Present, DPL 0, type 0xE (64-bit interrupt gate: IF cleared
            // on entry).
            attributes: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate::EMPTY; 256]);

/// Fills and loads the IDT. Call once, after [`gdt::init`], with
/// interrupts disabled.
pub fn init(code_selector: u16) {
    // Only the address of the stub block is taken.
    let stubs = core::ptr::addr_of!(strata_isr_stubs) as u64;
    // SAFETY: IDT is written only here, once, before it is loaded and
    // before interrupts are enabled; afterwards only the CPU reads it.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (v, gate) in idt.0.iter_mut().enumerate() {
        let ist = match v {
            8 => gdt::DOUBLE_FAULT_IST,
            2 | 18 => gdt::NMI_IST,
            _ => 0,
        };
        *gate = Gate::interrupt(stubs + 16 * v as u64, code_selector, ist);
    }
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the table is a static of 256 valid gates whose handlers are
    // the stubs above, which follow the interrupt calling convention.
    unsafe { x86_64::instructions::tables::lidt(&ptr) };
}

static WAKE: AtomicBool = AtomicBool::new(false);
static PENDING: AtomicU64 = AtomicU64::new(0);
static LEVEL_LINES: AtomicU64 = AtomicU64::new(0);
static MASKED_BY_HANDLER: AtomicU64 = AtomicU64::new(0);
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
static DEVICE_IRQS: AtomicU64 = AtomicU64::new(0);
static SLEEP_NS: AtomicU64 = AtomicU64::new(0);

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error (#DE)",
    "debug (#DB)",
    "NMI",
    "breakpoint (#BP)",
    "overflow (#OF)",
    "bound range (#BR)",
    "invalid opcode (#UD)",
    "device not available (#NM)",
    "double fault (#DF)",
    "coprocessor segment overrun",
    "invalid TSS (#TS)",
    "segment not present (#NP)",
    "stack fault (#SS)",
    "general protection (#GP)",
    "page fault (#PF)",
    "reserved (15)",
    "x87 floating point (#MF)",
    "alignment check (#AC)",
    "machine check (#MC)",
    "SIMD floating point (#XM)",
    "virtualization (#VE)",
    "control protection (#CP)",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "hypervisor injection (#HV)",
    "VMM communication (#VC)",
    "security (#SX)",
    "reserved (31)",
];

fn report_exception(f: &TrapFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let mut c = EmergencyConsole;
    let name = EXCEPTION_NAMES[(f.vector & 31) as usize];
    let _ = write!(
        c,
        "\nstrata: EXCEPTION {} (vector {}) error_code={:#x}\n  rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x}\n  cr2={:#018x}\n",
        name, f.vector, f.error_code, f.rip, f.cs, f.rflags, f.rsp, f.ss, cr2
    );
    let _ = write!(
        c,
        "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}\n  r9={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}\n  r13={:#018x} r14={:#018x} r15={:#018x}\n",
        f.rax, f.rbx, f.rcx, f.rdx, f.rsi, f.rdi, f.rbp, f.r8, f.r9, f.r10, f.r11, f.r12, f.r13,
        f.r14, f.r15
    );
    super::exit::exit_qemu(false)
}

/// Called by the common stub with interrupts disabled.
#[unsafe(no_mangle)]
extern "C" fn strata_trap_dispatch(frame: &mut TrapFrame) {
    let vector = frame.vector as u8;
    match vector {
        0..=31 => report_exception(frame),
        TIMER_VECTOR => {
            TIMER_IRQS.fetch_add(1, Ordering::Relaxed);
            WAKE.store(true, Ordering::Release);
            apic::eoi();
        }
        v if (IRQ_BASE_VECTOR..IRQ_BASE_VECTOR + MAX_GSI as u8).contains(&v) => {
            let gsi = u32::from(v - IRQ_BASE_VECTOR);
            let bit = 1u64 << gsi;
            if LEVEL_LINES.load(Ordering::Relaxed) & bit != 0 {
                apic::set_masked(gsi, true);
                MASKED_BY_HANDLER.fetch_or(bit, Ordering::Relaxed);
            }
            PENDING.fetch_or(bit, Ordering::Release);
            DEVICE_IRQS.fetch_add(1, Ordering::Relaxed);
            WAKE.store(true, Ordering::Release);
            apic::eoi();
        }
        // Spurious local-APIC interrupts and (masked, remapped) 8259
        // spurious IRQs 7/15 must not be acknowledged.
        SPURIOUS_VECTOR => {}
        v if v >= apic::PIC_BASE_VECTOR => {}
        _ => apic::eoi(),
    }
}

/// Routes a GSI through the I/O APIC to this CPU and unmasks it. Its
/// interrupts then wake [`idle_wait`] and show up in [`take_pending_irqs`].
/// Level-triggered lines are masked by their handler until the next
/// [`idle_wait`] (see the module doc).
pub fn enable_irq(gsi: u32, trigger: Trigger, polarity: Polarity) -> Result<(), IrqError> {
    if gsi >= MAX_GSI {
        return Err(IrqError::GsiTooLarge);
    }
    let bit = 1u64 << gsi;
    cpu::without_interrupts(|| {
        match trigger {
            Trigger::Level => LEVEL_LINES.fetch_or(bit, Ordering::Relaxed),
            Trigger::Edge => LEVEL_LINES.fetch_and(!bit, Ordering::Relaxed),
        };
        MASKED_BY_HANDLER.fetch_and(!bit, Ordering::Relaxed);
        apic::route(gsi, trigger, polarity).map(|_| ())
    })
}

/// Masks a GSI again.
pub fn disable_irq(gsi: u32) {
    if gsi >= MAX_GSI {
        return;
    }
    cpu::without_interrupts(|| {
        apic::set_masked(gsi, true);
        let bit = 1u64 << gsi;
        LEVEL_LINES.fetch_and(!bit, Ordering::Relaxed);
        MASKED_BY_HANDLER.fetch_and(!bit, Ordering::Relaxed);
    });
}

/// Routes the PCI INTx lines of a q35 machine: PIRQ A–H arrive at I/O-APIC
/// GSI 16–23. Level-triggered; QEMU's ACPI tables declare them active-high
/// (its I/O APIC model ignores the polarity bit either way). Returns how
/// many lines were routed.
pub fn enable_pci_intx() -> usize {
    (16..24)
        .filter(|&g| enable_irq(g, Trigger::Level, Polarity::High).is_ok())
        .count()
}

/// Returns and clears the mask of GSIs (bit n = GSI n) that interrupted
/// since the last call.
pub fn take_pending_irqs() -> u64 {
    PENDING.swap(0, Ordering::Acquire)
}

/// Interrupt and sleep counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqStats {
    /// Local-APIC timer interrupts taken.
    pub timer_irqs: u64,
    /// Device interrupts taken.
    pub device_irqs: u64,
    /// Nanoseconds spent halted in [`idle_wait`].
    pub sleep_ns: u64,
}

/// Current interrupt and sleep counters.
pub fn irq_stats() -> IrqStats {
    IrqStats {
        timer_irqs: TIMER_IRQS.load(Ordering::Relaxed),
        device_irqs: DEVICE_IRQS.load(Ordering::Relaxed),
        sleep_ns: SLEEP_NS.load(Ordering::Relaxed),
    }
}

/// Enables interrupts (after the APICs are set up).
pub fn enable() {
    cpu::enable();
}

/// Sleeps (`hlt`) until an interrupt arrives or `deadline_ns` (on the
/// [`time::now_ns`] clock) passes; `None` sleeps until an interrupt (with
/// a safety wake-up every [`IDLE_MAX_NS`]). Returns at once if an
/// interrupt arrived since the previous call or the deadline has passed.
/// Spurious returns are allowed: the caller re-checks its events.
///
/// Before sleeping it unmasks the level-triggered lines its handlers
/// masked: by now the caller must have acknowledged those devices (virtio:
/// `Transport::ack_interrupt`), or the line fires again at once.
pub fn idle_wait(deadline_ns: Option<u64>) {
    cpu::disable();
    let masked = MASKED_BY_HANDLER.swap(0, Ordering::Relaxed);
    if masked != 0 {
        for gsi in 0..MAX_GSI {
            if masked & (1 << gsi) != 0 {
                apic::set_masked(gsi, false);
            }
        }
    }
    if WAKE.swap(false, Ordering::Acquire) {
        cpu::enable();
        return;
    }
    let now = time::now_ns();
    let sleep = match deadline_ns {
        Some(d) if d <= now => {
            cpu::enable();
            return;
        }
        Some(d) => (d - now).min(IDLE_MAX_NS),
        None => IDLE_MAX_NS,
    };
    apic::timer_oneshot_ns(sleep);
    // `sti; hlt`: the interrupt shadow of STI keeps an interrupt that is
    // already pending from slipping in between the two instructions, so
    // it wakes the HLT instead of being lost.
    cpu::enable_and_hlt();
    cpu::disable();
    apic::timer_stop();
    WAKE.store(false, Ordering::Relaxed);
    SLEEP_NS.fetch_add(time::now_ns().saturating_sub(now), Ordering::Relaxed);
    cpu::enable();
}
