//! Strata's ciphers: AES-XTS for the encrypting classes (with AES-NI
//! where the CPU has it, the `aes` crate otherwise), PBKDF2 key
//! derivation, and the ChaCha20 generator every key comes from.
//!
//! `no_std`: the same code runs in the appliance and hosted.
//!
//! `unsafe` is denied at the root and allowed only in the two platform
//! modules: [`aesni`] (the AES instructions) and [`cpu`] (CPUID, RDSEED,
//! RDRAND).
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;

#[allow(unsafe_code, reason = "the AES-NI instructions, through asm!")]
pub mod aesni;
#[allow(unsafe_code, reason = "CPUID, RDSEED and RDRAND, through asm!")]
pub mod cpu;
pub mod kdf;
pub mod rng;
pub mod xts;

pub use cpu::{aesni_available, hw_entropy};
pub use xts::Xts;
