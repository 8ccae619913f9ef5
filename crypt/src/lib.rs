//! Strata's ciphers: AES-XTS for the encrypting classes (with AES-NI
//! where the CPU has it, the `aes` crate otherwise), PBKDF2 key
//! derivation, and the ChaCha20 generator every key comes from.
//!
//! `no_std`: the same code runs in the appliance and hosted.
#![no_std]

extern crate alloc;

pub mod kdf;
pub mod rng;
pub mod xts;

pub use xts::Xts;
