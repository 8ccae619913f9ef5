//! Strata's ciphers: AES-XTS for the encrypting classes (with AES-NI
//! where the CPU has it, the `aes` crate otherwise), PBKDF2 key
//! derivation, the ChaCha20 generator every key comes from, and CRC32C
//! for iSCSI's digests (SSE4.2 where the CPU has it, the `crc` crate
//! otherwise).
//!
//! `no_std`: the same code runs in the appliance and hosted.
//!
//! `unsafe` is denied at the root and allowed only in the platform
//! modules: [`aesni`] (the AES instructions), [`cpu`] (CPUID, RDSEED,
//! RDRAND) and the crc32 instruction's module inside [`crc32c`].
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;

#[allow(unsafe_code, reason = "the AES-NI instructions, through asm!")]
pub mod aesni;
#[allow(unsafe_code, reason = "CPUID, RDSEED and RDRAND, through asm!")]
pub mod cpu;
pub mod crc32c;
pub mod kdf;
pub mod rng;
pub mod xts;

pub use cpu::{aesni_available, hw_entropy, sse42_available};
pub use crc32c::{crc32c, Crc32c};
pub use xts::Xts;
