//! AES-128 and AES-256 with the AES-NI instructions, in a few short
//! `asm!` blocks: key expansion (AESKEYGENASSIST), the decryption schedule
//! (AESIMC, the "equivalent inverse cipher" of FIPS-197 §5.3.5) and a
//! masked block loop, eight blocks in flight (AESENC/AESDEC and their
//! last rounds), which is ECB with zero masks and XEX, the core of XTS,
//! with the tweaks as masks.
//!
//! # Why pointers, and why every block saves the registers it uses
//!
//! The kernel target is soft-float: SSE is not a *target feature* there,
//! so no `xmm` operand, clobber or `core::arch` intrinsic compiles, even
//! though the boot code switches SSE on in CR0/CR4. So each block takes
//! pointers in general-purpose registers, moves data with MOVDQU (any
//! alignment) and names `xmm0`..`xmm8` only in its text.
//!
//! Hosted, the compiler may hold its own values in those registers across
//! the block. Declaring them clobbered would need the `sse` feature the
//! kernel lacks, so instead every block stores the `xmm` registers it
//! touches to a stack buffer on entry and loads them back on exit: what
//! the compiler sees is unchanged on both targets, and in the kernel a
//! block interrupted by a handler that also runs one is restored too. The
//! legacy (non-VEX) SSE encodings used leave the upper halves of YMM/ZMM
//! registers alone, and nothing here touches MXCSR.
//!
//! Operands read from memory by AES and PXOR instructions (round keys,
//! masks) must be 16-byte aligned; their types (`Schedule`, `Block`)
//! are `align(16)`. Data is only reached by MOVDQU.
//!
//! Every `unsafe` block needs AES-NI; an [`AesNi`] exists only after
//! [`crate::cpu::aesni_available`] said yes, so its methods are safe.

use crate::cpu::aesni_available;
use core::arch::asm;
use zeroize::Zeroize;

/// One 16-byte block, aligned so the AES and PXOR instructions may read
/// it from memory.
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
pub(crate) struct Block(pub(crate) [u8; 16]);

impl From<u128> for Block {
    fn from(v: u128) -> Block {
        Block(v.to_le_bytes())
    }
}

/// Round keys: 11 used by AES-128, 15 by AES-256.
#[repr(C, align(16))]
struct Schedule([[u8; 16]; 15]);

/// The masks ECB uses: zero.
static ZEROS: [Block; 8] = [Block([0; 16]); 8];

// Text generators. Each `$m!(register, offset)` yields one line; `eight!`
// applies one to the eight block registers, xmm0..xmm7, at offsets 0..112.
macro_rules! eight {
    ($m:ident $(, $a:literal)?) => {
        concat!(
            $m!($($a,)? "xmm0", "0"),
            $m!($($a,)? "xmm1", "16"),
            $m!($($a,)? "xmm2", "32"),
            $m!($($a,)? "xmm3", "48"),
            $m!($($a,)? "xmm4", "64"),
            $m!($($a,)? "xmm5", "80"),
            $m!($($a,)? "xmm6", "96"),
            $m!($($a,)? "xmm7", "112"),
        )
    };
}
/// Stores a register to the save buffer.
macro_rules! save {
    ($r:literal, $o:literal) => {
        concat!("movdqu xmmword ptr [{save} + ", $o, "], ", $r, "\n")
    };
}
/// Loads a register back from the save buffer.
macro_rules! restore {
    ($r:literal, $o:literal) => {
        concat!("movdqu ", $r, ", xmmword ptr [{save} + ", $o, "]\n")
    };
}
/// Loads a data block.
macro_rules! load {
    ($r:literal, $o:literal) => {
        concat!("movdqu ", $r, ", xmmword ptr [{data} + ", $o, "]\n")
    };
}
/// Stores a data block.
macro_rules! store {
    ($r:literal, $o:literal) => {
        concat!("movdqu xmmword ptr [{data} + ", $o, "], ", $r, "\n")
    };
}
/// XORs a block with its (aligned) mask.
macro_rules! mask {
    ($r:literal, $o:literal) => {
        concat!("pxor ", $r, ", xmmword ptr [{mask} + ", $o, "]\n")
    };
}
/// Applies `$op` with the round key in xmm8.
macro_rules! keyed {
    ($op:literal, $r:literal, $o:literal) => {
        concat!($op, " ", $r, ", xmm8\n")
    };
}
/// `$r` ^= `$r` << 32 ^ `$r` << 64 ^ `$r` << 96 (xmm2 scratch): each
/// 32-bit word becomes the XOR of itself and the words below it, as the
/// key schedule chains words.
macro_rules! chain {
    ($r:literal) => {
        concat!(
            "movdqa xmm2, ",
            $r,
            "\n",
            "pslldq xmm2, 4\n",
            "pxor ",
            $r,
            ", xmm2\n",
            "pslldq xmm2, 4\n",
            "pxor ",
            $r,
            ", xmm2\n",
            "pslldq xmm2, 4\n",
            "pxor ",
            $r,
            ", xmm2\n",
        )
    };
}
/// AES-128 round key at `$o` from the previous one in xmm0:
/// SubWord(RotWord(w3)) ^ rcon, from AESKEYGENASSIST's top word, is
/// XORed into every word of the chained previous key.
macro_rules! next128 {
    ($rcon:literal, $o:literal) => {
        concat!(
            "aeskeygenassist xmm1, xmm0, ",
            $rcon,
            "\n",
            "pshufd xmm1, xmm1, 0xff\n",
            chain!("xmm0"),
            "pxor xmm0, xmm1\n",
            "movdqa xmmword ptr [{rk} + ",
            $o,
            "], xmm0\n",
        )
    };
}
/// AES-256 even round key (xmm0) from the odd one before it (xmm3):
/// as for AES-128.
macro_rules! even256 {
    ($rcon:literal, $o:literal) => {
        concat!(
            "aeskeygenassist xmm1, xmm3, ",
            $rcon,
            "\n",
            "pshufd xmm1, xmm1, 0xff\n",
            chain!("xmm0"),
            "pxor xmm0, xmm1\n",
            "movdqa xmmword ptr [{rk} + ",
            $o,
            "], xmm0\n",
        )
    };
}
/// AES-256 odd round key (xmm3) from the even one before it (xmm0):
/// SubWord(w3) without rotation or rcon, AESKEYGENASSIST's third word.
macro_rules! odd256 {
    ($o:literal) => {
        concat!(
            "aeskeygenassist xmm1, xmm0, 0x00\n",
            "pshufd xmm1, xmm1, 0xaa\n",
            chain!("xmm3"),
            "pxor xmm3, xmm1\n",
            "movdqa xmmword ptr [{rk} + ",
            $o,
            "], xmm3\n",
        )
    };
}

/// Expands a 16-byte AES-128 key into round keys 0..=10.
///
/// # Safety
///
/// The CPU must have AES-NI and SSE2, with SSE enabled.
unsafe fn expand128(key: &[u8; 16], rk: &mut Schedule) {
    let mut save = [0u8; 16 * 3];
    // SAFETY: AES-NI is there (the caller's promise). The block reads 16
    // bytes at `key`, writes 11 aligned blocks within `rk` (176 of its 240
    // bytes) and 48 bytes of `save`, and returns xmm0..xmm2 as it found
    // them (module doc).
    unsafe {
        asm!(
            save!("xmm0", "0"), save!("xmm1", "16"), save!("xmm2", "32"),
            "movdqu xmm0, xmmword ptr [{key}]",
            "movdqa xmmword ptr [{rk}], xmm0",
            next128!("0x01", "16"),
            next128!("0x02", "32"),
            next128!("0x04", "48"),
            next128!("0x08", "64"),
            next128!("0x10", "80"),
            next128!("0x20", "96"),
            next128!("0x40", "112"),
            next128!("0x80", "128"),
            next128!("0x1b", "144"),
            next128!("0x36", "160"),
            restore!("xmm0", "0"), restore!("xmm1", "16"), restore!("xmm2", "32"),
            key = in(reg) key.as_ptr(),
            rk = in(reg) rk.0.as_mut_ptr(),
            save = in(reg) save.as_mut_ptr(),
            options(nostack, preserves_flags),
        );
    }
}

/// Expands a 32-byte AES-256 key into round keys 0..=14.
///
/// # Safety
///
/// The CPU must have AES-NI and SSE2, with SSE enabled.
unsafe fn expand256(key: &[u8; 32], rk: &mut Schedule) {
    let mut save = [0u8; 16 * 4];
    // SAFETY: AES-NI is there (the caller's promise). The block reads 32
    // bytes at `key`, writes 15 aligned blocks, all of `rk`, and 64 bytes
    // of `save`, and returns xmm0..xmm3 as it found them (module doc).
    unsafe {
        asm!(
            save!("xmm0", "0"), save!("xmm1", "16"), save!("xmm2", "32"), save!("xmm3", "48"),
            "movdqu xmm0, xmmword ptr [{key}]",
            "movdqa xmmword ptr [{rk}], xmm0",
            "movdqu xmm3, xmmword ptr [{key} + 16]",
            "movdqa xmmword ptr [{rk} + 16], xmm3",
            even256!("0x01", "32"),
            odd256!("48"),
            even256!("0x02", "64"),
            odd256!("80"),
            even256!("0x04", "96"),
            odd256!("112"),
            even256!("0x08", "128"),
            odd256!("144"),
            even256!("0x10", "160"),
            odd256!("176"),
            even256!("0x20", "192"),
            odd256!("208"),
            even256!("0x40", "224"),
            restore!("xmm0", "0"), restore!("xmm1", "16"), restore!("xmm2", "32"),
            restore!("xmm3", "48"),
            key = in(reg) key.as_ptr(),
            rk = in(reg) rk.0.as_mut_ptr(),
            save = in(reg) save.as_mut_ptr(),
            options(nostack, preserves_flags),
        );
    }
}

/// The decryption schedule for AESDEC: the encryption round keys in
/// reverse order, the inner ones through InvMixColumns (AESIMC).
///
/// # Safety
///
/// The CPU must have AES-NI and SSE2, with SSE enabled; `rounds` is 10
/// or 14.
unsafe fn invert(ek: &Schedule, rounds: usize, dk: &mut Schedule) {
    debug_assert!(rounds == 10 || rounds == 14);
    dk.0[0] = ek.0[rounds];
    dk.0[rounds] = ek.0[0];
    let mut save = [0u8; 16];
    // SAFETY: AES-NI is there (the caller's promise). The block reads the
    // aligned blocks ek[rounds - 1] down to ek[1] and writes dk[1] up to
    // dk[rounds - 1], all inside the two 15-block schedules since
    // rounds <= 14; the pointers come from the whole arrays. It returns
    // xmm0 as it found it (module doc).
    unsafe {
        asm!(
            save!("xmm0", "0"),
            "2:",
            "aesimc xmm0, xmmword ptr [{src}]",
            "movdqa xmmword ptr [{dst}], xmm0",
            "sub {src}, 16",
            "add {dst}, 16",
            "dec {n}",
            "jnz 2b",
            restore!("xmm0", "0"),
            src = inout(reg) ek.0.as_ptr().wrapping_add(rounds - 1) => _,
            dst = inout(reg) dk.0.as_mut_ptr().wrapping_add(1) => _,
            n = inout(reg) rounds - 1 => _,
            save = in(reg) save.as_mut_ptr(),
            options(nostack),
        );
    }
}

/// Defines a masked block loop: for each block, `x = F(x ^ m) ^ m` with
/// `F` the cipher whose middle and last rounds are `$round`/`$last`,
/// eight blocks at a time while there are eight, then one at a time.
macro_rules! masked_loop {
    ($(#[$doc:meta])* $name:ident, $round:literal, $last:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        ///
        /// The CPU must have AES-NI and SSE2, with SSE enabled; `rk` holds
        /// `rounds + 1` keys (`rounds` 10 or 14).
        unsafe fn $name(rk: &Schedule, rounds: usize, data: &mut [u8], masks: &[Block]) {
            assert_eq!(data.len(), masks.len() * 16);
            debug_assert!(rounds == 10 || rounds == 14);
            let n = masks.len();
            let mut save = [0u8; 16 * 9];
            // SAFETY: AES-NI is there (the caller's promise). The block
            // reads and writes `data` (n * 16 bytes, MOVDQU), reads the n
            // aligned blocks of `masks` and round keys 0..=rounds of `rk`
            // (aligned, within its 15), writes 144 bytes of `save`, and
            // returns xmm0..xmm8 as it found them (module doc). The group
            // loop runs n / 8 times, 128 bytes each, the single loop n % 8
            // times, 16 bytes each: n blocks in all. Each round loop runs
            // rounds - 1 >= 9 times.
            unsafe {
                asm!(
                    eight!(save), save!("xmm8", "128"),
                    "test {groups}, {groups}",
                    "jz 4f",
                    // Eight blocks.
                    "2:",
                    eight!(load),
                    eight!(mask),
                    "movdqa xmm8, xmmword ptr [{rk}]",
                    eight!(keyed, "pxor"),
                    "lea {k}, [{rk} + 16]",
                    "lea {c}, [{rounds} - 1]",
                    "3:",
                    "movdqa xmm8, xmmword ptr [{k}]",
                    eight!(keyed, $round),
                    "add {k}, 16",
                    "dec {c}",
                    "jnz 3b",
                    "movdqa xmm8, xmmword ptr [{k}]",
                    eight!(keyed, $last),
                    eight!(mask),
                    eight!(store),
                    "add {data}, 128",
                    "add {mask}, 128",
                    "dec {groups}",
                    "jnz 2b",
                    // The rest, one by one.
                    "4:",
                    "test {tail}, {tail}",
                    "jz 7f",
                    "5:",
                    load!("xmm0", "0"),
                    mask!("xmm0", "0"),
                    "movdqa xmm8, xmmword ptr [{rk}]",
                    "pxor xmm0, xmm8",
                    "lea {k}, [{rk} + 16]",
                    "lea {c}, [{rounds} - 1]",
                    "6:",
                    "movdqa xmm8, xmmword ptr [{k}]",
                    keyed!($round, "xmm0", "0"),
                    "add {k}, 16",
                    "dec {c}",
                    "jnz 6b",
                    "movdqa xmm8, xmmword ptr [{k}]",
                    keyed!($last, "xmm0", "0"),
                    mask!("xmm0", "0"),
                    store!("xmm0", "0"),
                    "add {data}, 16",
                    "add {mask}, 16",
                    "dec {tail}",
                    "jnz 5b",
                    "7:",
                    eight!(restore), restore!("xmm8", "128"),
                    rk = in(reg) rk.0.as_ptr(),
                    rounds = in(reg) rounds,
                    data = inout(reg) data.as_mut_ptr() => _,
                    mask = inout(reg) masks.as_ptr() => _,
                    groups = inout(reg) n / 8 => _,
                    tail = inout(reg) n % 8 => _,
                    k = out(reg) _,
                    c = out(reg) _,
                    save = in(reg) save.as_mut_ptr(),
                    options(nostack),
                );
            }
        }
    };
}

masked_loop!(
    /// Encrypts `data` block by block, each XORed with its mask before
    /// and after.
    encrypt_loop,
    "aesenc",
    "aesenclast"
);
masked_loop!(
    /// Decrypts `data` block by block, each XORed with its mask before
    /// and after (`rk` the decryption schedule).
    decrypt_loop,
    "aesdec",
    "aesdeclast"
);

/// An AES-128 or AES-256 key expanded for AES-NI. Exists only on a CPU
/// that has it. The round keys are zeroed when it is dropped.
pub struct AesNi {
    enc: Schedule,
    dec: Schedule,
    rounds: usize,
}

impl AesNi {
    /// Expands a 16-byte (AES-128) or 32-byte (AES-256) key; `None` for
    /// another length or when the CPU lacks AES-NI
    /// ([`crate::cpu::aesni_available`]).
    pub fn new(key: &[u8]) -> Option<AesNi> {
        if !aesni_available() {
            return None;
        }
        let mut k = AesNi {
            enc: Schedule([[0; 16]; 15]),
            dec: Schedule([[0; 16]; 15]),
            rounds: 0,
        };
        if let Ok(key) = <&[u8; 16]>::try_from(key) {
            k.rounds = 10;
            // SAFETY: AES-NI checked above.
            unsafe { expand128(key, &mut k.enc) };
        } else if let Ok(key) = <&[u8; 32]>::try_from(key) {
            k.rounds = 14;
            // SAFETY: AES-NI checked above.
            unsafe { expand256(key, &mut k.enc) };
        } else {
            return None;
        }
        // SAFETY: AES-NI checked above; rounds is 10 or 14.
        unsafe { invert(&k.enc, k.rounds, &mut k.dec) };
        Some(k)
    }

    /// The key's length in bits: 128 or 256.
    pub fn key_bits(&self) -> usize {
        if self.rounds == 10 {
            128
        } else {
            256
        }
    }

    /// Encrypts `data` in place as independent blocks (ECB).
    ///
    /// # Panics
    ///
    /// If `data` is not a whole number of 16-byte blocks.
    pub fn encrypt_blocks(&self, data: &mut [u8]) {
        assert!(data.len().is_multiple_of(16));
        for chunk in data.chunks_mut(16 * ZEROS.len()) {
            self.encrypt_masked(chunk, &ZEROS[..chunk.len() / 16]);
        }
    }

    /// Decrypts `data` in place as independent blocks (ECB).
    ///
    /// # Panics
    ///
    /// If `data` is not a whole number of 16-byte blocks.
    pub fn decrypt_blocks(&self, data: &mut [u8]) {
        assert!(data.len().is_multiple_of(16));
        for chunk in data.chunks_mut(16 * ZEROS.len()) {
            self.decrypt_masked(chunk, &ZEROS[..chunk.len() / 16]);
        }
    }

    /// Block `i` of `data` becomes `E(data[i] ^ masks[i]) ^ masks[i]`.
    ///
    /// # Panics
    ///
    /// If `data` is not `masks.len()` blocks long.
    pub(crate) fn encrypt_masked(&self, data: &mut [u8], masks: &[Block]) {
        // SAFETY: an AesNi exists only where AES-NI does (`new`); `enc`
        // holds rounds + 1 keys.
        unsafe { encrypt_loop(&self.enc, self.rounds, data, masks) }
    }

    /// Block `i` of `data` becomes `D(data[i] ^ masks[i]) ^ masks[i]`.
    ///
    /// # Panics
    ///
    /// If `data` is not `masks.len()` blocks long.
    pub(crate) fn decrypt_masked(&self, data: &mut [u8], masks: &[Block]) {
        // SAFETY: an AesNi exists only where AES-NI does (`new`); `dec`
        // holds rounds + 1 keys.
        unsafe { decrypt_loop(&self.dec, self.rounds, data, masks) }
    }
}

impl Drop for AesNi {
    fn drop(&mut self) {
        self.enc.0.zeroize();
        self.dec.0.zeroize();
    }
}
