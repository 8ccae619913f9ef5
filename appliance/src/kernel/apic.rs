//! Interrupt controllers: the local APIC (EOI, one-shot timer), the I/O
//! APICs (GSI routing) and the legacy 8259 PICs (remapped out of the way
//! and masked).
//!
//! References: Intel SDM vol. 3A ch. 11 (local APIC: registers at
//! 0xFEE0_0000, SVR 0xF0, EOI 0xB0, LVT timer 0x320, initial count 0x380,
//! current count 0x390, divide 0x3E0); Intel 82093AA I/O APIC datasheet
//! (IOREGSEL at +0x00, IOWIN at +0x10, version register 1, redirection
//! entries at 0x10 + 2n); ACPI MADT for where the I/O APICs are.
//!
//! Local-APIC and I/O-APIC registers are reached through the identity map
//! (uncached, see [`super::paging`]). The main program touches the I/O
//! APIC only with interrupts disabled, and the interrupt handlers only
//! mask, so the select/window pair is never used concurrently (one CPU).

use core::sync::atomic::{AtomicU64, Ordering};
use spin::Once;
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

use super::acpi;
use super::time;

/// Vector of the local-APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of GSI 0; GSI n uses `IRQ_BASE_VECTOR + n`.
pub const IRQ_BASE_VECTOR: u8 = 0x30;
/// Number of GSIs that get their own vector (0..48).
pub const MAX_GSI: u32 = 48;
/// First vector the legacy PICs are remapped to (they stay masked).
pub const PIC_BASE_VECTOR: u8 = 0xE0;
/// Local-APIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const IA32_APIC_BASE: u32 = 0x1B;
const REG_ID: usize = 0x20;
const REG_TPR: usize = 0x80;
const REG_EOI: usize = 0xB0;
const REG_SVR: usize = 0xF0;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_CUR: usize = 0x390;
const REG_TIMER_DIV: usize = 0x3E0;
/// Divide configuration value for "divide by 16".
const TIMER_DIV_16: u32 = 0b0011;
const LVT_MASKED: u32 = 1 << 16;

static LAPIC_BASE: AtomicU64 = AtomicU64::new(0);
static LAPIC_TIMER_HZ: AtomicU64 = AtomicU64::new(0);

/// One I/O APIC.
#[derive(Clone, Copy, Debug)]
struct IoApic {
    base: u64,
    gsi_base: u32,
    gsi_count: u32,
}

static IOAPICS: Once<([Option<IoApic>; 8], usize)> = Once::new();

fn lapic_reg(off: usize) -> *mut u32 {
    (LAPIC_BASE.load(Ordering::Relaxed) as usize + off) as *mut u32
}

fn lapic_read(off: usize) -> u32 {
    // SAFETY: the local APIC page is identity-mapped uncached (init maps
    // it) and `off` is a register offset from the SDM.
    unsafe { core::ptr::read_volatile(lapic_reg(off)) }
}

fn lapic_write(off: usize, v: u32) {
    // SAFETY: as in `lapic_read`.
    unsafe { core::ptr::write_volatile(lapic_reg(off), v) }
}

/// Signals end-of-interrupt to the local APIC.
pub fn eoi() {
    if LAPIC_BASE.load(Ordering::Relaxed) != 0 {
        lapic_write(REG_EOI, 0);
    }
}

/// This CPU's local-APIC ID.
pub fn lapic_id() -> u32 {
    lapic_read(REG_ID) >> 24
}

/// Frequency of the local-APIC timer after the divide-by-16, in Hz.
pub fn timer_hz() -> u64 {
    LAPIC_TIMER_HZ.load(Ordering::Relaxed)
}

/// Remaps the 8259 PICs to vectors 0xE0..0xEF and masks every line, so
/// only the APICs deliver interrupts (a spurious IRQ 7/15 lands on a
/// harmless vector instead of an exception vector).
fn disable_legacy_pic() {
    let out = |port: u16, v: u8| {
        // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the 8259s, which only this
        // function programs; on machines without them the writes go nowhere.
        unsafe { Port::<u8>::new(port).write(v) }
    };
    // ICW1: init + ICW4 needed; ICW2: vector base; ICW3: cascade on IRQ2;
    // ICW4: 8086 mode. Then OCW1: mask all.
    out(0x20, 0x11);
    out(0xA0, 0x11);
    out(0x21, PIC_BASE_VECTOR);
    out(0xA1, PIC_BASE_VECTOR + 8);
    out(0x21, 0x04);
    out(0xA1, 0x02);
    out(0x21, 0x01);
    out(0xA1, 0x01);
    out(0x21, 0xFF);
    out(0xA1, 0xFF);
}

fn ioapic_read(base: u64, reg: u32) -> u32 {
    // SAFETY: `base` is an I/O APIC from the MADT (or the standard
    // 0xFEC0_0000), identity-mapped uncached; IOREGSEL/IOWIN are used with
    // interrupts off or from a handler (see the module doc).
    unsafe {
        core::ptr::write_volatile(base as *mut u32, reg);
        core::ptr::read_volatile((base + 0x10) as *const u32)
    }
}

fn ioapic_write(base: u64, reg: u32, v: u32) {
    // SAFETY: as in `ioapic_read`.
    unsafe {
        core::ptr::write_volatile(base as *mut u32, reg);
        core::ptr::write_volatile((base + 0x10) as *mut u32, v);
    }
}

fn ioapic_for(gsi: u32) -> Option<(u64, u32)> {
    let (list, n) = IOAPICS.get()?;
    list[..*n]
        .iter()
        .flatten()
        .find(|a| gsi >= a.gsi_base && gsi < a.gsi_base + a.gsi_count)
        .map(|a| (a.base, gsi - a.gsi_base))
}

/// How a GSI signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Edge-triggered (ISA devices).
    Edge,
    /// Level-triggered (PCI INTx, virtio-mmio).
    Level,
}

/// Which level/edge of a GSI is active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polarity {
    /// Active high.
    High,
    /// Active low.
    Low,
}

/// Why a GSI could not be routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// No I/O APIC serves this GSI.
    NoIoApic,
    /// GSI beyond the vectors reserved for device interrupts (0..48).
    GsiTooLarge,
}

/// Routes `gsi` to vector `IRQ_BASE_VECTOR + gsi` on this CPU, unmasked.
pub fn route(gsi: u32, trigger: Trigger, polarity: Polarity) -> Result<u8, IrqError> {
    if gsi >= MAX_GSI {
        return Err(IrqError::GsiTooLarge);
    }
    let (base, pin) = ioapic_for(gsi).ok_or(IrqError::NoIoApic)?;
    let vector = IRQ_BASE_VECTOR + gsi as u8;
    let mut low = u32::from(vector);
    if polarity == Polarity::Low {
        low |= 1 << 13;
    }
    if trigger == Trigger::Level {
        low |= 1 << 15;
    }
    x86_64::instructions::interrupts::without_interrupts(|| {
        ioapic_write(base, 0x11 + 2 * pin, lapic_id() << 24);
        ioapic_write(base, 0x10 + 2 * pin, low);
    });
    Ok(vector)
}

/// Sets or clears the mask bit of `gsi`'s redirection entry. Called from
/// interrupt handlers (mask) and with interrupts off (unmask).
pub fn set_masked(gsi: u32, masked: bool) {
    if let Some((base, pin)) = ioapic_for(gsi) {
        let reg = 0x10 + 2 * pin;
        let low = ioapic_read(base, reg);
        let new = if masked {
            low | LVT_MASKED
        } else {
            low & !LVT_MASKED
        };
        if new != low {
            ioapic_write(base, reg, new);
        }
    }
}

fn init_ioapics() {
    IOAPICS.call_once(|| {
        let (mut found, mut n) = acpi::madt_ioapics();
        if n == 0 {
            // No MADT: the standard I/O APIC of PC machines, and microvm's
            // second one (GSI 24..48, where its virtio-mmio devices are)
            // if something answers there.
            found[0] = Some(acpi::IoApicEntry {
                address: 0xFEC0_0000,
                gsi_base: 0,
            });
            found[1] = Some(acpi::IoApicEntry {
                address: 0xFEC1_0000,
                gsi_base: 24,
            });
            n = 2;
        }
        let mut list = [None; 8];
        let mut count = 0;
        for e in found[..n].iter().flatten() {
            // A BAR-like range above 4 GiB would need mapping; standard
            // placements are below 4 GiB and already mapped uncached.
            if super::paging::try_map_mmio(e.address, 0x1000).is_err() {
                continue;
            }
            // Version register: bits 0-7 version (0x11 or 0x20 on real and
            // emulated parts), 16-23 highest redirection entry.
            let version = ioapic_read(e.address, 1);
            if version == u32::MAX || version & 0xFF == 0 {
                continue;
            }
            let gsi_count = ((version >> 16) & 0xFF) + 1;
            for pin in 0..gsi_count {
                ioapic_write(e.address, 0x10 + 2 * pin, LVT_MASKED);
                ioapic_write(e.address, 0x11 + 2 * pin, 0);
            }
            list[count] = Some(IoApic {
                base: e.address,
                gsi_base: e.gsi_base,
                gsi_count,
            });
            count += 1;
        }
        (list, count)
    });
}

/// Number of GSIs served by the I/O APICs found.
pub fn gsi_count() -> u32 {
    IOAPICS
        .get()
        .map(|(l, n)| l[..*n].iter().flatten().map(|a| a.gsi_count).sum())
        .unwrap_or(0)
}

/// Turns on the local APIC, measures its timer, masks the legacy PICs and
/// every I/O-APIC input. Needs [`time::init`] first. Call once, with
/// interrupts disabled.
pub fn init() {
    disable_legacy_pic();
    let msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; setting bit 11
    // (global enable) keeps the base address unchanged.
    let base = unsafe {
        let mut m = msr;
        let v = m.read() | (1 << 11);
        m.write(v);
        v & 0x000F_FFFF_FFFF_F000
    };
    if super::paging::try_map_mmio(base, 0x1000).is_err() {
        return;
    }
    LAPIC_BASE.store(base, Ordering::Relaxed);
    lapic_write(REG_TPR, 0);
    lapic_write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    lapic_write(REG_TIMER_DIV, TIMER_DIV_16);
    lapic_write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    let hz = match time::lapic_bus_hz_from_cpuid() {
        Some(bus) => bus / 16,
        None => measure_timer_hz(),
    };
    LAPIC_TIMER_HZ.store(hz.max(1), Ordering::Relaxed);
    init_ioapics();
}

/// Counts the local-APIC timer (masked) over about 2 ms of TSC time,
/// reading it between TSC reads at both ends.
fn measure_timer_hz() -> u64 {
    lapic_write(REG_TIMER_INIT, u32::MAX);
    let mut read = || u64::from(lapic_read(REG_TIMER_CUR));
    let _ = time::bracketed_sample(&mut read);
    let (t0, c0) = time::bracketed_sample(&mut read);
    time::spin_delay_us(2000);
    let (t1, c1) = time::bracketed_sample(&mut read);
    lapic_write(REG_TIMER_INIT, 0);
    let ns = time::ticks_to_ns(t1.wrapping_sub(t0)).max(1);
    c0.wrapping_sub(c1) * 1_000_000_000 / ns
}

/// Arms the one-shot local-APIC timer to fire `ns` from now.
pub fn timer_oneshot_ns(ns: u64) {
    if LAPIC_BASE.load(Ordering::Relaxed) == 0 {
        return;
    }
    let count =
        (u128::from(ns) * u128::from(timer_hz()) / 1_000_000_000).clamp(1, u32::MAX as u128);
    lapic_write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    lapic_write(REG_TIMER_INIT, count as u32);
}

/// Stops the local-APIC timer.
pub fn timer_stop() {
    if LAPIC_BASE.load(Ordering::Relaxed) == 0 {
        return;
    }
    lapic_write(REG_TIMER_INIT, 0);
    lapic_write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
}
