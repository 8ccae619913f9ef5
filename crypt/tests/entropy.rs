//! The generator's refusal to run unseeded, and the CPU's entropy.

use crypt::hw_entropy;
use crypt::rng::{Csprng, NoEntropy};

#[test]
fn csprng_refuses_unseeded() {
    let mut r = Csprng::unseeded();
    assert!(!r.seeded());
    let mut out = [0u8; 32];
    assert_eq!(r.fill(&mut out), Err(NoEntropy));
    assert_eq!(out, [0; 32], "nothing written");
    r.mix(b"seed");
    assert!(r.seeded());
    assert_eq!(r.fill(&mut out), Ok(()));
    assert_ne!(out, [0; 32]);
}

#[test]
fn csprng_output_changes_after_mix() {
    let (mut a, mut b) = (Csprng::unseeded(), Csprng::unseeded());
    a.mix(b"same seed");
    b.mix(b"same seed");
    let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
    a.fill(&mut x).unwrap();
    b.fill(&mut y).unwrap();
    assert_eq!(x, y, "the same seed gives the same stream");

    a.mix(b"more");
    a.fill(&mut x).unwrap();
    b.fill(&mut y).unwrap();
    assert_ne!(x, y, "mixing changed the stream");

    let mut c = Csprng::unseeded();
    c.mix(b"other seed");
    let mut z = [0u8; 64];
    c.fill(&mut z).unwrap();
    let mut d = Csprng::unseeded();
    d.mix(b"same seed");
    d.fill(&mut y).unwrap();
    assert_ne!(z, y, "another seed, another stream");
}

#[test]
fn hw_entropy_works_here_and_differs() {
    let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
    assert!(hw_entropy(&mut a), "this machine has RDSEED/RDRAND");
    assert!(hw_entropy(&mut b));
    assert_ne!(a, [0; 32]);
    assert_ne!(a, b);
    let mut r = Csprng::unseeded();
    r.mix(&a);
    assert!(r.seeded());
}
