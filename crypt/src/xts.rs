//! AES-XTS over sectors (IEEE 1619), the tweak of a sector its number as
//! a little-endian 128-bit value (`plain64` in dm-crypt's words).

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use xts_mode::{get_tweak_default, Xts128};

/// A key of the wrong length for AES-XTS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadKey;

enum Backend {
    Soft128(alloc::boxed::Box<Xts128<Aes128>>),
    Soft256(alloc::boxed::Box<Xts128<Aes256>>),
}

/// An AES-XTS key ready for use: AES-128-XTS with a 32-byte key,
/// AES-256-XTS with a 64-byte key.
pub struct Xts {
    backend: Backend,
}

impl Xts {
    /// Expands `key` (32 or 64 bytes: the data key, then the tweak key).
    pub fn new(key: &[u8]) -> Result<Xts, BadKey> {
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        let backend = match key.len() {
            32 => Backend::Soft128(alloc::boxed::Box::new(Xts128::new(
                Aes128::new_from_slice(k1).map_err(|_| BadKey)?,
                Aes128::new_from_slice(k2).map_err(|_| BadKey)?,
            ))),
            64 => Backend::Soft256(alloc::boxed::Box::new(Xts128::new(
                Aes256::new_from_slice(k1).map_err(|_| BadKey)?,
                Aes256::new_from_slice(k2).map_err(|_| BadKey)?,
            ))),
            _ => return Err(BadKey),
        };
        Ok(Xts { backend })
    }

    /// Encrypts `data` in place as consecutive sectors of `sector_size`
    /// bytes, the first numbered `first`.
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
        }
    }

    /// The name of the implementation in use (`aes-ni` or `soft`).
    pub fn engine(&self) -> &'static str {
        "soft"
    }
}
