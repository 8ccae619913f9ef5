//! AES-XTS over sectors (IEEE 1619), the tweak of a sector its number as
//! a little-endian 128-bit value (`plain64` in dm-crypt's words).
//!
//! Two engines. Where the CPU has AES-NI, [`crate::aesni`] does the
//! blocks and the XTS loop is here: the tweaks of up to eight sectors are
//! encrypted in one call, then each sector's blocks go through the
//! eight-wide masked loop with their tweaks as masks, up to `CHUNK` per
//! call. Elsewhere, and through [`Xts::new_soft`], it is `xts-mode` over
//! the `aes` crate. The AES-NI types are not plugged under `xts-mode`:
//! it hands its cipher one block at a time, so an eight-wide backend
//! would never see more than one, and every block would pay for loading
//! the round keys and saving the registers (see `aesni`'s module doc).

use crate::aesni::{AesNi, Block};
use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use alloc::boxed::Box;
use xts_mode::{get_tweak_default, Xts128};

/// A key of the wrong length for AES-XTS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadKey;

/// Masks (tweaks) built per call of the AES-NI loop: 1 KiB of stack.
const CHUNK: usize = 64;
/// Sectors whose tweaks are encrypted in one call.
const TWEAKS: usize = 8;

enum Backend {
    Soft128(Box<Xts128<Aes128>>),
    Soft256(Box<Xts128<Aes256>>),
    Ni(Box<NiXts>),
}

/// The two AES-NI keys: data and tweak.
struct NiXts {
    data: AesNi,
    tweak: AesNi,
}

/// An AES-XTS key ready for use: AES-128-XTS with a 32-byte key,
/// AES-256-XTS with a 64-byte key.
pub struct Xts {
    backend: Backend,
}

/// Multiplies a tweak by the primitive element α of GF(2^128), the block
/// as a little-endian number (IEEE 1619 §5.2).
fn double(t: u128) -> u128 {
    (t << 1) ^ (0x87 * (t >> 127))
}

/// Set by [`soft_only`].
static SOFT_ONLY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Makes every key expanded from now on use the `aes` crate, AES-NI or
/// not (the platform's `aes=soft` switch, for measuring the fallback).
pub fn soft_only(on: bool) {
    SOFT_ONLY.store(on, core::sync::atomic::Ordering::Relaxed);
}

impl Xts {
    /// Expands `key` (32 or 64 bytes: the data key, then the tweak key),
    /// for AES-NI when the CPU has it ([`crate::aesni_available`]), for
    /// the `aes` crate otherwise.
    pub fn new(key: &[u8]) -> Result<Xts, BadKey> {
        if !matches!(key.len(), 32 | 64) {
            return Err(BadKey);
        }
        if SOFT_ONLY.load(core::sync::atomic::Ordering::Relaxed) {
            return Xts::new_soft(key);
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        match (AesNi::new(k1), AesNi::new(k2)) {
            (Some(data), Some(tweak)) => Ok(Xts {
                backend: Backend::Ni(Box::new(NiXts { data, tweak })),
            }),
            _ => Xts::new_soft(key),
        }
    }

    /// Expands `key` as [`Xts::new`] does, but always for the `aes` crate
    /// (which, hosted, may use AES-NI intrinsics of its own; the kernel
    /// builds its portable code).
    pub fn new_soft(key: &[u8]) -> Result<Xts, BadKey> {
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        let backend = match key.len() {
            32 => Backend::Soft128(Box::new(Xts128::new(
                Aes128::new_from_slice(k1).map_err(|_| BadKey)?,
                Aes128::new_from_slice(k2).map_err(|_| BadKey)?,
            ))),
            64 => Backend::Soft256(Box::new(Xts128::new(
                Aes256::new_from_slice(k1).map_err(|_| BadKey)?,
                Aes256::new_from_slice(k2).map_err(|_| BadKey)?,
            ))),
            _ => return Err(BadKey),
        };
        Ok(Xts { backend })
    }

    /// Encrypts `data` in place as consecutive sectors of `sector_size`
    /// bytes, the first numbered `first`. A sector size that is not a
    /// multiple of 16 is handled with ciphertext stealing.
    ///
    /// # Panics
    ///
    /// If `data` is not a whole number of sectors of at least 16 bytes.
    pub fn encrypt(&self, data: &mut [u8], sector_size: usize, first: u64) {
        assert!(sector_size >= 16 && data.len().is_multiple_of(sector_size));
        let first = u128::from(first);
        match &self.backend {
            Backend::Soft128(x) => x.encrypt_area(data, sector_size, first, get_tweak_default),
            Backend::Soft256(x) => x.encrypt_area(data, sector_size, first, get_tweak_default),
            Backend::Ni(x) => x.area(data, sector_size, first, true),
        }
    }

    /// Decrypts `data` in place (see [`Xts::encrypt`]).
    ///
    /// # Panics
    ///
    /// If `data` is not a whole number of sectors of at least 16 bytes.
    pub fn decrypt(&self, data: &mut [u8], sector_size: usize, first: u64) {
        assert!(sector_size >= 16 && data.len().is_multiple_of(sector_size));
        let first = u128::from(first);
        match &self.backend {
            Backend::Soft128(x) => x.decrypt_area(data, sector_size, first, get_tweak_default),
            Backend::Soft256(x) => x.decrypt_area(data, sector_size, first, get_tweak_default),
            Backend::Ni(x) => x.area(data, sector_size, first, false),
        }
    }

    /// The name of the implementation in use (`aes-ni` or `soft`).
    pub fn engine(&self) -> &'static str {
        match self.backend {
            Backend::Ni(_) => "aes-ni",
            Backend::Soft128(_) | Backend::Soft256(_) => "soft",
        }
    }
}

impl NiXts {
    /// Encrypts (`enc`) or decrypts whole sectors, the first numbered
    /// `first`.
    fn area(&self, data: &mut [u8], sector_size: usize, first: u128, enc: bool) {
        let mut masks = [Block::default(); CHUNK];
        let mut number = first;
        for group in data.chunks_mut(TWEAKS * sector_size) {
            let count = group.len() / sector_size;
            let mut tweaks = [0u8; 16 * TWEAKS];
            for (i, t) in tweaks.chunks_exact_mut(16).take(count).enumerate() {
                t.copy_from_slice(&(number + i as u128).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut tweaks[..16 * count]);
            for (sector, t) in group
                .chunks_exact_mut(sector_size)
                .zip(tweaks.chunks_exact(16))
            {
                let t = u128::from_le_bytes(t.try_into().expect("16 bytes"));
                self.sector(sector, t, enc, &mut masks);
            }
            number += count as u128;
        }
    }

    /// One sector whose first block's tweak is `t` (already encrypted).
    fn sector(&self, sector: &mut [u8], mut t: u128, enc: bool, masks: &mut [Block; CHUNK]) {
        let partial = sector.len() % 16;
        // With a partial last block, the last whole one is stolen from.
        let whole = sector.len() / 16 - usize::from(partial != 0);
        let (head, tail) = sector.split_at_mut(whole * 16);
        for chunk in head.chunks_mut(16 * CHUNK) {
            let masks = &mut masks[..chunk.len() / 16];
            for m in masks.iter_mut() {
                *m = Block::from(t);
                t = double(t);
            }
            if enc {
                self.data.encrypt_masked(chunk, masks);
            } else {
                self.data.decrypt_masked(chunk, masks);
            }
        }
        if partial != 0 {
            self.steal(tail, t, enc);
        }
    }

    /// Ciphertext stealing (IEEE 1619 §5.3.2): `tail` is the last whole
    /// block, whose tweak is `t`, and the partial one after it.
    fn steal(&self, tail: &mut [u8], t: u128, enc: bool) {
        let (last_whole, partial) = tail.split_at_mut(16);
        let r = partial.len();
        let (first, second) = if enc {
            (Block::from(t), Block::from(double(t)))
        } else {
            (Block::from(double(t)), Block::from(t))
        };
        // The whole block through the cipher; its head becomes the
        // partial block, its tail pads the partial block out to a whole
        // one, which takes the whole block's place.
        let mut a = [0u8; 16];
        a.copy_from_slice(last_whole);
        let mut b = [0u8; 16];
        b[..r].copy_from_slice(partial);
        if enc {
            self.data.encrypt_masked(&mut a, &[first]);
            b[r..].copy_from_slice(&a[r..]);
            self.data.encrypt_masked(&mut b, &[second]);
        } else {
            self.data.decrypt_masked(&mut a, &[first]);
            b[r..].copy_from_slice(&a[r..]);
            self.data.decrypt_masked(&mut b, &[second]);
        }
        last_whole.copy_from_slice(&b);
        partial.copy_from_slice(&a[..r]);
    }
}
