//! The AES-NI block cipher against FIPS-197 and against the `aes` crate.

mod common;

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes256};
use common::{below, bytes, hex, rng};
use crypt::aesni::AesNi;

#[test]
fn this_cpu_has_aes_ni() {
    // The other tests here prove nothing without it.
    assert!(
        crypt::aesni_available(),
        "the test machine has no AES-NI: the AES-NI tests cannot run"
    );
}

#[test]
fn new_refuses_other_key_lengths() {
    for n in [0, 15, 17, 24, 31, 33, 64] {
        assert!(AesNi::new(&vec![0; n]).is_none(), "{n}-byte key");
    }
}

/// FIPS-197 appendix C.1 and C.3.
#[test]
fn fips197_known_answers() {
    let pt = hex("00112233445566778899aabbccddeeff");
    for (key, ct) in [
        (
            "000102030405060708090a0b0c0d0e0f",
            "69c4e0d86a7b0430d8cdb78070b4c55a",
        ),
        (
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            "8ea2b7ca516745bfeafc49904b496089",
        ),
    ] {
        let k = AesNi::new(&hex(key)).unwrap();
        let mut b = pt.clone();
        k.encrypt_blocks(&mut b);
        assert_eq!(b, hex(ct), "encrypt, key {key}");
        k.decrypt_blocks(&mut b);
        assert_eq!(b, pt, "decrypt, key {key}");
    }
}

/// What the `aes` crate makes of `data` with `key`.
fn reference(key: &[u8], data: &[u8], encrypt: bool) -> Vec<u8> {
    let mut out = data.to_vec();
    for b in out.chunks_exact_mut(16) {
        let b = GenericArray::from_mut_slice(b);
        match (key.len(), encrypt) {
            (16, true) => Aes128::new_from_slice(key).unwrap().encrypt_block(b),
            (16, false) => Aes128::new_from_slice(key).unwrap().decrypt_block(b),
            (32, true) => Aes256::new_from_slice(key).unwrap().encrypt_block(b),
            (32, false) => Aes256::new_from_slice(key).unwrap().decrypt_block(b),
            _ => unreachable!(),
        }
    }
    out
}

#[test]
fn matches_the_aes_crate_on_random_keys_and_data() {
    let mut r = rng("aesni vs aes");
    // Every count from 0 to 40 (the single-block tail, one and more
    // eight-block groups), and some longer ones.
    let counts: Vec<usize> = (0..=40).chain([63, 64, 65, 127, 128, 257]).collect();
    for key_len in [16, 32] {
        for round in 0..8 {
            let key = bytes(&mut r, key_len);
            let k = AesNi::new(&key).unwrap();
            assert_eq!(k.key_bits(), key_len * 8);
            for &n in &counts {
                let data = bytes(&mut r, 16 * n);
                let ctx = format!("{key_len}-byte key, round {round}, {n} blocks");

                let mut b = data.clone();
                k.encrypt_blocks(&mut b);
                assert_eq!(b, reference(&key, &data, true), "encrypt, {ctx}");
                k.decrypt_blocks(&mut b);
                assert_eq!(b, data, "round trip, {ctx}");

                let mut b = data.clone();
                k.decrypt_blocks(&mut b);
                assert_eq!(b, reference(&key, &data, false), "decrypt, {ctx}");
            }
        }
    }
}

#[test]
fn works_on_unaligned_data() {
    let mut r = rng("aesni unaligned");
    for key_len in [16, 32] {
        let key = bytes(&mut r, key_len);
        let k = AesNi::new(&key).unwrap();
        let n = 9 + below(&mut r, 20);
        let mut buf = bytes(&mut r, 16 * n + 16);
        for off in 1..16 {
            let data = buf[off..off + 16 * n].to_vec();
            k.encrypt_blocks(&mut buf[off..off + 16 * n]);
            assert_eq!(&buf[off..off + 16 * n], &reference(&key, &data, true)[..]);
        }
    }
}
