//! Helpers shared by the crypt tests.
#![allow(dead_code)]

use crypt::rng::Csprng;

/// Bytes from a hex string (whitespace ignored).
pub fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A generator seeded with `label`, so every run sees the same "random"
/// keys and data and a failure can be replayed.
pub fn rng(label: &str) -> Csprng {
    let mut r = Csprng::unseeded();
    r.mix(label.as_bytes());
    r
}

/// `n` bytes from `r`.
pub fn bytes(r: &mut Csprng, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    r.fill(&mut v).unwrap();
    v
}

/// A number below `n` from `r`.
pub fn below(r: &mut Csprng, n: usize) -> usize {
    let mut b = [0u8; 8];
    r.fill(&mut b).unwrap();
    (u64::from_le_bytes(b) % n as u64) as usize
}
