//! CRC32C (Castagnoli, polynomial 0x1EDC6F41, reflected, initial value
//! and final XOR all ones): iSCSI's header and data digests (RFC 7143
//! §13.1, test vectors in RFC 3720 appendix B.4).
//!
//! Two engines, chosen when a [`Crc32c`] is made. Where the CPU has
//! SSE4.2 ([`crate::sse42_available`]), its `crc32` instruction, eight
//! bytes per step then one byte at a time, in the small `sse42` module
//! below, the only `unsafe` here. Elsewhere, and through
//! [`Crc32c::new_soft`] or [`soft_only`], the `crc` crate's sixteen-lane
//! table (`CRC_32_ISCSI`), which the tests also use as the oracle.
//!
//! The `crc32` instruction reads and writes general-purpose registers
//! only, so it needs no SSE state: it works in the soft-float kernel as
//! hosted, without the register saving of [`crate::aesni`].

use core::sync::atomic::{AtomicBool, Ordering};
use crc::{Crc, Digest, Table, CRC_32_ISCSI};

/// The `crc` crate's CRC32C, sixteen lanes (16 KiB of table, built at
/// compile time).
static CASTAGNOLI: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// Set by [`soft_only`].
static SOFT_ONLY: AtomicBool = AtomicBool::new(false);

/// Makes every [`Crc32c`] made from now on (and [`crc32c`]) use the `crc`
/// crate, SSE4.2 or not (for measuring and testing the fallback).
pub fn soft_only(on: bool) {
    SOFT_ONLY.store(on, Ordering::Relaxed);
}

#[allow(unsafe_code, reason = "the SSE4.2 crc32 instruction, through asm!")]
mod sse42 {
    //! The `crc32` instruction. A [`Sse42`] exists only once CPUID said
    //! the CPU has SSE4.2, so its method is safe.

    use core::arch::asm;

    /// Proof that this CPU has SSE4.2.
    #[derive(Clone, Copy, Debug)]
    pub(super) struct Sse42(());

    impl Sse42 {
        /// `Some` if the CPU has SSE4.2.
        pub(super) fn detect() -> Option<Sse42> {
            crate::cpu::sse42_available().then_some(Sse42(()))
        }

        /// The CRC register `crc` (not inverted at the end) after `data`.
        pub(super) fn update(self, mut crc: u32, data: &[u8]) -> u32 {
            let mut words = data.chunks_exact(8);
            for w in &mut words {
                let mut word = [0; 8];
                word.copy_from_slice(w);
                let v = u64::from_le_bytes(word);
                let mut c = u64::from(crc);
                // SAFETY: `self` proves the CPU has SSE4.2, so crc32
                // exists; it reads and writes these two registers only,
                // no memory, no stack, no flags. With a 64-bit operand
                // it zeroes the high half of the destination.
                unsafe {
                    asm!(
                        "crc32 {c}, {v}",
                        c = inout(reg) c,
                        v = in(reg) v,
                        options(pure, nomem, nostack, preserves_flags),
                    );
                }
                crc = c as u32;
            }
            for &b in words.remainder() {
                // SAFETY: as above, with a byte operand.
                unsafe {
                    asm!(
                        "crc32 {c:e}, {b}",
                        c = inout(reg) crc,
                        b = in(reg_byte) b,
                        options(pure, nomem, nostack, preserves_flags),
                    );
                }
            }
            crc
        }
    }
}

use sse42::Sse42;

#[derive(Clone)]
enum Engine {
    /// The CRC register, all ones at the start, not yet inverted.
    Hw(Sse42, u32),
    /// The `crc` crate's running digest.
    Soft(Digest<'static, u32, Table<16>>),
}

/// A CRC32C being computed over data fed in pieces.
#[derive(Clone)]
pub struct Crc32c {
    engine: Engine,
}

impl core::fmt::Debug for Crc32c {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Crc32c")
            .field("hardware", &self.is_hardware())
            .field("value", &self.finish())
            .finish()
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c::new()
    }
}

impl Crc32c {
    /// A CRC32C over no data yet: with the crc32 instruction when the CPU
    /// has SSE4.2 (and [`soft_only`] is off), with the `crc` crate
    /// otherwise.
    pub fn new() -> Crc32c {
        match Sse42::detect() {
            Some(hw) if !SOFT_ONLY.load(Ordering::Relaxed) => Crc32c {
                engine: Engine::Hw(hw, !0),
            },
            _ => Crc32c::new_soft(),
        }
    }

    /// A CRC32C over no data yet, always with the `crc` crate.
    pub fn new_soft() -> Crc32c {
        Crc32c {
            engine: Engine::Soft(CASTAGNOLI.digest()),
        }
    }

    /// True if this one uses the crc32 instruction.
    pub fn is_hardware(&self) -> bool {
        matches!(self.engine, Engine::Hw(..))
    }

    /// Feeds `data`, after what was fed before.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.engine {
            Engine::Hw(hw, crc) => *crc = hw.update(*crc, data),
            Engine::Soft(d) => d.update(data),
        }
    }

    /// The CRC32C of everything fed so far (feeding may go on after).
    /// iSCSI sends it little-endian (RFC 7143 §13.1).
    pub fn finish(&self) -> u32 {
        match &self.engine {
            Engine::Hw(_, crc) => !crc,
            Engine::Soft(d) => d.clone().finalize(),
        }
    }
}

/// The CRC32C of `data`, in one call (see [`Crc32c`]).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(data);
    c.finish()
}
