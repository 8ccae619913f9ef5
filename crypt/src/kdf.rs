//! Passphrase stretching: PBKDF2-HMAC with SHA-1, SHA-256 or SHA-512.

use hmac::Hmac;

/// A hash a LUKS header or a lock sector may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// SHA-1 (old LUKS1 volumes).
    Sha1,
    /// SHA-256 (LUKS1's default today).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Hash {
    /// The hash named `name` in a LUKS header (`sha1`, `sha256`, `sha512`).
    pub fn from_name(name: &str) -> Option<Hash> {
        match name {
            "sha1" => Some(Hash::Sha1),
            "sha256" => Some(Hash::Sha256),
            "sha512" => Some(Hash::Sha512),
            _ => None,
        }
    }

    /// Its name in a LUKS header.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
            Hash::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }
}

/// PBKDF2-HMAC-`hash` of `pass` and `salt` over `rounds` iterations,
/// filling `out`.
pub fn pbkdf2(hash: Hash, pass: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
    match hash {
        Hash::Sha1 => pbkdf2::pbkdf2::<Hmac<sha1::Sha1>>(pass, salt, rounds, out),
        Hash::Sha256 => pbkdf2::pbkdf2::<Hmac<sha2::Sha256>>(pass, salt, rounds, out),
        Hash::Sha512 => pbkdf2::pbkdf2::<Hmac<sha2::Sha512>>(pass, salt, rounds, out),
    }
    .expect("HMAC takes keys of any length");
}

/// The `hash` of the concatenation of `parts`, into `out` (truncated to
/// it, or filling its start).
pub fn digest(hash: Hash, parts: &[&[u8]], out: &mut [u8]) {
    use sha2::Digest;
    fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
        let mut d = D::new();
        for p in parts {
            d.update(p);
        }
        let r = d.finalize();
        let n = out.len().min(r.len());
        out[..n].copy_from_slice(&r[..n]);
    }
    match hash {
        Hash::Sha1 => run::<sha1::Sha1>(parts, out),
        Hash::Sha256 => run::<sha2::Sha256>(parts, out),
        Hash::Sha512 => run::<sha2::Sha512>(parts, out),
    }
}
