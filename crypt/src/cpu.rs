//! What the CPU offers the ciphers, asked once through CPUID: AES-NI for
//! [`crate::aesni`], SSE4.2's crc32 instruction for [`crate::crc32c`],
//! RDSEED and RDRAND for [`hw_entropy`].
//!
//! The answers are cached in an atomic; every thread that races to fill it
//! writes the same bits, so relaxed ordering is enough.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};
use zeroize::Zeroize;

/// Set once the other bits hold CPUID's answers.
const PROBED: u32 = 1 << 31;
/// The AES instructions, with SSE2 for the moves and shuffles around
/// them, usable (in the kernel: with SSE switched on in CR0/CR4).
const AES: u32 = 1 << 0;
/// RDRAND.
const RDRAND: u32 = 1 << 1;
/// RDSEED.
const RDSEED: u32 = 1 << 2;
/// SSE4.2 (for its crc32 instruction, which works on general-purpose
/// registers only and so needs SSE neither switched on nor a target
/// feature).
const SSE42: u32 = 1 << 3;

static FEATURES: AtomicU32 = AtomicU32::new(0);

/// CPUID `leaf`/`sub`: (eax, ebx, ecx, edx).
fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: CPUID exists on every x86_64 CPU, reads no memory and
    // changes no flags. RBX is reserved by the compiler, so its value is
    // kept in a scratch register around the instruction and swapped back.
    unsafe {
        asm!(
            "mov {b:r}, rbx",
            "cpuid",
            "xchg {b:r}, rbx",
            b = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") sub => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    // The high half of the register CPUID wrote is zero.
    (eax, ebx as u32, ecx, edx)
}

/// The kernel runs in ring 0 and switches SSE on itself: AES-NI is usable
/// only if that happened (CR4.OSFXSR set, CR0.EM and CR0.TS clear).
#[cfg(target_os = "none")]
fn sse_enabled() -> bool {
    let (cr0, cr4): (u64, u64);
    // SAFETY: reading CR0 and CR4 is allowed in ring 0, where the kernel
    // build runs; it touches no memory and no flags.
    unsafe {
        asm!(
            "mov {0}, cr0",
            "mov {1}, cr4",
            out(reg) cr0,
            out(reg) cr4,
            options(nomem, nostack, preserves_flags),
        );
    }
    cr4 & (1 << 9) != 0 && cr0 & (0b11 << 2) == 0
}

/// Hosted, the operating system has SSE on for every process.
#[cfg(not(target_os = "none"))]
fn sse_enabled() -> bool {
    true
}

fn probe() -> u32 {
    let (max, ..) = cpuid(0, 0);
    let (_, _, ecx1, edx1) = cpuid(1, 0);
    let mut f = PROBED;
    // Leaf 1: ECX bit 25 AES, EDX bit 26 SSE2, ECX bit 30 RDRAND.
    if ecx1 & (1 << 25) != 0 && edx1 & (1 << 26) != 0 && sse_enabled() {
        f |= AES;
    }
    if ecx1 & (1 << 30) != 0 {
        f |= RDRAND;
    }
    // Leaf 1: ECX bit 20 SSE4.2.
    if ecx1 & (1 << 20) != 0 {
        f |= SSE42;
    }
    // Leaf 7 sub-leaf 0: EBX bit 18 RDSEED.
    if max >= 7 && cpuid(7, 0).1 & (1 << 18) != 0 {
        f |= RDSEED;
    }
    f
}

fn features() -> u32 {
    let f = FEATURES.load(Ordering::Relaxed);
    if f & PROBED != 0 {
        return f;
    }
    let f = probe();
    FEATURES.store(f, Ordering::Relaxed);
    f
}

/// True if this CPU has AES-NI (and SSE2, and SSE is enabled), so
/// [`crate::Xts::new`] uses [`crate::aesni`].
pub fn aesni_available() -> bool {
    features() & AES != 0
}

/// True if this CPU has SSE4.2, so [`crate::crc32c`] uses the crc32
/// instruction.
pub fn sse42_available() -> bool {
    features() & SSE42 != 0
}

/// One RDSEED; `None` when the CPU had no seed ready (CF clear).
///
/// # Safety
///
/// The CPU must have RDSEED (else it faults with #UD).
unsafe fn rdseed() -> Option<u64> {
    let (v, ok): (u64, u8);
    // SAFETY: the CPU has RDSEED (the caller's promise); the
    // instruction writes a register and the carry flag, nothing in memory.
    unsafe {
        asm!("rdseed {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
             options(nomem, nostack));
    }
    (ok != 0).then_some(v)
}

/// One RDRAND; `None` when the CPU had no number ready (CF clear).
///
/// # Safety
///
/// The CPU must have RDRAND (else it faults with #UD).
unsafe fn rdrand() -> Option<u64> {
    let (v, ok): (u64, u8);
    // SAFETY: the CPU has RDRAND (the caller's promise); the
    // instruction writes a register and the carry flag, nothing in memory.
    unsafe {
        asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
             options(nomem, nostack));
    }
    (ok != 0).then_some(v)
}

/// RDSEED may run dry while other cores draw from it; it is retried with
/// a pause between tries up to this many times per word.
const RDSEED_TRIES: usize = 1024;
/// Intel's advice for RDRAND: ten tries, then assume the generator broken.
const RDRAND_TRIES: usize = 10;

/// `get` until it yields a word, at most `tries` times. All ones counts as
/// a failure: some CPUs have been seen to return it, with CF set, from a
/// generator that stopped working.
///
/// # Safety
///
/// `get` must be safe to call on this CPU.
unsafe fn retry(tries: usize, get: unsafe fn() -> Option<u64>) -> Option<u64> {
    for _ in 0..tries {
        // SAFETY: the caller's promise.
        match unsafe { get() } {
            Some(v) if v != u64::MAX => return Some(v),
            _ => core::hint::spin_loop(),
        }
    }
    None
}

/// Fills `out` with 32 bytes from the CPU's entropy instructions: RDSEED
/// (CPUID leaf 7 EBX bit 18), each word retried while the CPU has none
/// ready; a word RDSEED cannot give, or every word when it is absent,
/// comes from RDRAND (leaf 1 ECX bit 30, ten tries). Returns false, with
/// `out` zeroed, when neither instruction exists or both keep failing.
///
/// The bytes are meant to be mixed into [`crate::rng::Csprng`] with the
/// other sources, not used as keys directly.
pub fn hw_entropy(out: &mut [u8; 32]) -> bool {
    let f = features();
    let mut words = [0u64; 4];
    for w in &mut words {
        let seed = (f & RDSEED != 0)
            // SAFETY: CPUID reports RDSEED.
            .then(|| unsafe { retry(RDSEED_TRIES, rdseed) })
            .flatten();
        let word = seed.or_else(|| {
            (f & RDRAND != 0)
                // SAFETY: CPUID reports RDRAND.
                .then(|| unsafe { retry(RDRAND_TRIES, rdrand) })
                .flatten()
        });
        match word {
            Some(v) => *w = v,
            None => {
                out.fill(0);
                return false;
            }
        }
    }
    for (o, w) in out.chunks_exact_mut(8).zip(words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    words.zeroize();
    true
}
