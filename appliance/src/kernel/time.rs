//! Time: the TSC, calibrated once at boot, as the monotonic clock.
//!
//! The calibration takes the first source that works:
//!
//! 1. the hypervisor timing leaf CPUID 0x4000_0010 (EAX = TSC kHz; offered
//!    by KVM and VMware-style hypervisors);
//! 2. CPUID 0x15 (TSC/crystal ratio × crystal Hz; Intel SDM vol. 2A, CPUID);
//! 3. PIT channel 2 with its gate on port 0x61 (q35, pc);
//! 4. the ACPI PM timer (3.579545 MHz; ACPI 6.5 §4.8.3.3) from the FADT;
//! 5. PIT channel 0 read back with latch commands (microvm keeps a PIT but
//!    has no port 0x61 gate);
//! 6. CPUID 0x16 base frequency, else an assumed 1 GHz (logged as a warning).
//!
//! After [`init`], [`now_ns`] is nanoseconds since the kernel was entered.
//! Before it, [`now_ns`] reads 0.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use x86_64::instructions::port::Port;

/// Input clock of the 8254 PIT, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Clock of the ACPI PM timer, in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// Length of the reference window used to calibrate against PIT/PM timer.
const CALIBRATION_NS: u64 = 5_000_000;

static TSC_AT_ENTRY: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick as a 32.32 fixed-point number (0 = not yet).
static NS_PER_TICK_FP32: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU8 = AtomicU8::new(CalibrationSource::None as u8);

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CalibrationSource {
    /// Not calibrated yet.
    None,
    /// CPUID 0x4000_0010 (hypervisor timing leaf).
    HypervisorLeaf,
    /// CPUID 0x15 (crystal clock ratio).
    Cpuid15,
    /// PIT channel 2, gated through port 0x61.
    PitChannel2,
    /// ACPI PM timer.
    AcpiPmTimer,
    /// PIT channel 0 read back by latch commands.
    PitChannel0,
    /// CPUID 0x16 base frequency (nominal, not measured).
    Cpuid16,
    /// Nothing worked: 1 GHz assumed.
    Assumed,
}

impl CalibrationSource {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::HypervisorLeaf,
            2 => Self::Cpuid15,
            3 => Self::PitChannel2,
            4 => Self::AcpiPmTimer,
            5 => Self::PitChannel0,
            6 => Self::Cpuid16,
            7 => Self::Assumed,
            _ => Self::None,
        }
    }

    /// Short human-readable name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "uncalibrated",
            Self::HypervisorLeaf => "cpuid 0x40000010",
            Self::Cpuid15 => "cpuid 0x15",
            Self::PitChannel2 => "PIT channel 2",
            Self::AcpiPmTimer => "ACPI PM timer",
            Self::PitChannel0 => "PIT channel 0",
            Self::Cpuid16 => "cpuid 0x16 (nominal)",
            Self::Assumed => "assumed 1 GHz",
        }
    }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter; CR4.TSD is clear, so it is
    // allowed at any privilege level.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Records the TSC value that [`now_ns`] counts from. Called first thing
/// at kernel entry.
pub fn mark_entry() {
    TSC_AT_ENTRY.store(rdtsc(), Ordering::Relaxed);
}

/// Calibrates the TSC (see the module doc) and starts [`now_ns`].
///
/// `strata.tsc=cpuid|pit2|pm|pit0` on the command line tries that source
/// first (to test each path); the usual order follows if it fails.
pub fn init(cmdline: &str) -> CalibrationSource {
    let forced = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("strata.tsc="));
    let forced = match forced {
        Some("cpuid") => from_hypervisor_leaf()
            .map(|hz| (hz, CalibrationSource::HypervisorLeaf))
            .or_else(|| from_cpuid15().map(|hz| (hz, CalibrationSource::Cpuid15))),
        Some("pit2") => from_pit_channel2().map(|hz| (hz, CalibrationSource::PitChannel2)),
        Some("pm") => from_pm_timer().map(|hz| (hz, CalibrationSource::AcpiPmTimer)),
        Some("pit0") => from_pit_channel0().map(|hz| (hz, CalibrationSource::PitChannel0)),
        _ => None,
    };
    let (hz, source) = forced.unwrap_or_else(calibrate);
    let hz = hz.max(1_000_000);
    TSC_HZ.store(hz, Ordering::Relaxed);
    let fp = ((1_000_000_000u128 << 32) / u128::from(hz)) as u64;
    NS_PER_TICK_FP32.store(fp, Ordering::Relaxed);
    SOURCE.store(source as u8, Ordering::Relaxed);
    source
}

/// The calibrated TSC frequency in Hz (0 before [`init`]).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Where the TSC frequency came from.
pub fn calibration_source() -> CalibrationSource {
    CalibrationSource::from_u8(SOURCE.load(Ordering::Relaxed))
}

/// Converts a TSC tick count to nanoseconds (0 before [`init`]).
#[inline]
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let fp = NS_PER_TICK_FP32.load(Ordering::Relaxed);
    ((u128::from(ticks) * u128::from(fp)) >> 32) as u64
}

/// Converts nanoseconds to TSC ticks (0 before [`init`]).
#[inline]
pub fn ns_to_ticks(ns: u64) -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    (u128::from(ns) * u128::from(hz) / 1_000_000_000) as u64
}

/// Monotonic nanoseconds since kernel entry (0 until [`init`] has run).
#[inline]
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc().wrapping_sub(TSC_AT_ENTRY.load(Ordering::Relaxed)))
}

/// Monotonic milliseconds since kernel entry.
#[inline]
pub fn uptime_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Busy-waits for `us` microseconds (for device resets and the like; the
/// event loop sleeps with [`super::interrupts::idle_wait`] instead).
/// Returns at once before [`init`].
pub fn spin_delay_us(us: u64) {
    let start = rdtsc();
    let ticks = ns_to_ticks(us.saturating_mul(1000)).max(1);
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

fn cpuid(leaf: u32, sub: u32) -> core::arch::x86_64::CpuidResult {
    // CPUID is available on every x86_64 CPU and only reads.
    core::arch::x86_64::__cpuid_count(leaf, sub)
}

fn inb(port: u16) -> u8 {
    // SAFETY: reads of the PIT/speaker ports have no side effect beyond
    // the latch/status sequencing this module drives itself.
    unsafe { Port::<u8>::new(port).read() }
}

fn outb(port: u16, value: u8) {
    // SAFETY: only the PIT (0x40-0x43) and its gate (0x61) are written,
    // which nothing else in the kernel uses.
    unsafe { Port::<u8>::new(port).write(value) }
}

fn calibrate() -> (u64, CalibrationSource) {
    if let Some(hz) = from_hypervisor_leaf() {
        return (hz, CalibrationSource::HypervisorLeaf);
    }
    if let Some(hz) = from_cpuid15() {
        return (hz, CalibrationSource::Cpuid15);
    }
    if let Some(hz) = from_pit_channel2() {
        return (hz, CalibrationSource::PitChannel2);
    }
    if let Some(hz) = from_pm_timer() {
        return (hz, CalibrationSource::AcpiPmTimer);
    }
    if let Some(hz) = from_pit_channel0() {
        return (hz, CalibrationSource::PitChannel0);
    }
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf >= 0x16 {
        let mhz = u64::from(cpuid(0x16, 0).eax & 0xFFFF);
        if mhz != 0 {
            return (mhz * 1_000_000, CalibrationSource::Cpuid16);
        }
    }
    (1_000_000_000, CalibrationSource::Assumed)
}

/// A plausible TSC frequency (100 MHz to 20 GHz).
fn plausible(hz: u64) -> Option<u64> {
    (100_000_000..=20_000_000_000).contains(&hz).then_some(hz)
}

fn hypervisor_present() -> bool {
    cpuid(1, 0).ecx & (1 << 31) != 0
}

fn from_hypervisor_leaf() -> Option<u64> {
    if !hypervisor_present() {
        return None;
    }
    let max = cpuid(0x4000_0000, 0).eax;
    if !(0x4000_0010..0x4001_0000).contains(&max) {
        return None;
    }
    plausible(u64::from(cpuid(0x4000_0010, 0).eax) * 1000)
}

/// The LAPIC bus frequency in Hz from the hypervisor timing leaf (EBX, kHz).
pub(crate) fn lapic_bus_hz_from_cpuid() -> Option<u64> {
    if !hypervisor_present() {
        return None;
    }
    let max = cpuid(0x4000_0000, 0).eax;
    if !(0x4000_0010..0x4001_0000).contains(&max) {
        return None;
    }
    let khz = u64::from(cpuid(0x4000_0010, 0).ebx);
    (khz >= 1000).then_some(khz * 1000)
}

fn from_cpuid15() -> Option<u64> {
    if cpuid(0, 0).eax < 0x15 {
        return None;
    }
    let r = cpuid(0x15, 0);
    if r.eax == 0 || r.ebx == 0 || r.ecx == 0 {
        return None;
    }
    plausible(u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax))
}

/// Upper bound on polling iterations, so a missing device cannot hang boot.
const MAX_POLLS: u32 = 50_000_000;

/// Reads `read` between two TSC reads, a few times, and keeps the tightest
/// bracket: returns (TSC at the middle of the bracket, value read). A
/// bracket can be widened by anything from a slow device read to the
/// emulator being descheduled; the tightest one bounds the error.
pub(crate) fn bracketed_sample(read: &mut impl FnMut() -> u64) -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..8 {
        let t0 = rdtsc();
        let v = read();
        let t1 = rdtsc();
        let width = t1.wrapping_sub(t0);
        if width < best.0 {
            best = (width, t0 + width / 2, v);
        }
    }
    (best.1, best.2)
}

/// Measures the TSC against a reference counter of `ref_hz` that counts
/// down (or up) modulo `modulus`, over about [`CALIBRATION_NS`].
fn measure_against(
    read: &mut impl FnMut() -> u64,
    ref_hz: u64,
    modulus: u64,
    counts_down: bool,
) -> Option<u64> {
    let delta = |prev: u64, cur: u64| {
        if counts_down {
            prev.wrapping_sub(cur) % modulus
        } else {
            cur.wrapping_sub(prev) % modulus
        }
    };
    let target = ref_hz * CALIBRATION_NS / 1_000_000_000;
    // Warm-up: the first reads of a path are the slowest (and under an
    // emulator, include translating the code).
    let _ = bracketed_sample(read);
    let (t_start, v_start) = bracketed_sample(read);
    let mut prev = v_start;
    let mut elapsed = 0u64;
    let mut polls = 0u32;
    while elapsed < target {
        let cur = read();
        elapsed += delta(prev, cur);
        prev = cur;
        polls += 1;
        // A missing or stopped counter never advances.
        if polls > MAX_POLLS || (polls > 10_000 && elapsed == 0) {
            return None;
        }
    }
    let (t_end, v_end) = bracketed_sample(read);
    elapsed += delta(prev, v_end);
    if elapsed == 0 {
        return None;
    }
    plausible(t_end.wrapping_sub(t_start) * ref_hz / elapsed)
}

fn pit_read(channel: u8) -> u64 {
    // Counter-latch command for the channel, then low and high byte.
    outb(0x43, channel << 6);
    let lo = inb(0x40 + u16::from(channel));
    let hi = inb(0x40 + u16::from(channel));
    u64::from(u16::from_le_bytes([lo, hi]))
}

/// Programs a PIT channel as a free-running rate generator (mode 2,
/// lobyte/hibyte, reload 0 = 65536).
fn pit_free_run(channel: u8) {
    outb(0x43, (channel << 6) | 0x34);
    outb(0x40 + u16::from(channel), 0);
    outb(0x40 + u16::from(channel), 0);
}

fn from_pit_channel2() -> Option<u64> {
    let saved = inb(0x61);
    if saved == 0xFF {
        // No port 0x61 (microvm has no speaker/gate logic).
        return None;
    }
    // Gate on (bit 0), speaker off (bit 1).
    outb(0x61, (saved & !0x02) | 0x01);
    pit_free_run(2);
    let hz = measure_against(&mut || pit_read(2), PIT_HZ, 1 << 16, true);
    outb(0x61, saved);
    hz
}

fn from_pit_channel0() -> Option<u64> {
    pit_free_run(0);
    let hz = measure_against(&mut || pit_read(0), PIT_HZ, 1 << 16, true);
    // Leave channel 0 in one-shot mode so it stops raising IRQ 0.
    outb(0x43, 0x30);
    outb(0x40, 0);
    outb(0x40, 0);
    hz
}

fn from_pm_timer() -> Option<u64> {
    let fadt = super::acpi::find_table(b"FACP")?;
    // FADT: PM_TMR_BLK (u32 port) at offset 76; flags at 112, bit 8 =
    // TMR_VAL_EXT (32-bit counter). ACPI 6.5 §5.2.9, table 5.9.
    let port = u32::from_le_bytes(fadt.get(76..80)?.try_into().ok()?);
    let flags = u32::from_le_bytes(fadt.get(112..116)?.try_into().ok()?);
    if port == 0 || port > 0xFFFF {
        return None;
    }
    let mask: u32 = if flags & (1 << 8) != 0 {
        u32::MAX
    } else {
        0x00FF_FFFF
    };
    let mut pm = Port::<u32>::new(port as u16);
    let mut read = || {
        // SAFETY: the FADT names this port as the PM timer, whose reads
        // have no side effect.
        u64::from(unsafe { pm.read() } & mask)
    };
    measure_against(&mut read, PM_TIMER_HZ, u64::from(mask) + 1, false)
}
