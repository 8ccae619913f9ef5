//! A time-bounded fuzz run in the normal test suite: the seed corpus of
//! real client transcripts (`net/fuzz/corpus/engine`, captured from
//! qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh and fio) replayed as is, then
//! mutated at random for `STRATA_FUZZ_SECS` seconds (default 20) through
//! the same driver as the cargo-fuzz target. The seed is printed; set
//! `STRATA_FUZZ_SEED` to replay a run. A failing input is written to
//! `net/fuzz/artifacts/engine/crash-<seed>-<n>` (where cargo-fuzz puts its
//! own) before the test fails.

use super::super::fuzzing;
use crate::fuzz_support::bounded::{self, MutRng};
use alloc::string::String;
use alloc::vec::Vec;

fn corpus() -> Vec<(String, Vec<u8>)> {
    bounded::corpus("engine")
}

const U32S: [u32; 10] = [
    0,
    1,
    511,
    512,
    4096,
    65536,
    1 << 20,
    33_554_432,
    0x7fff_ffff,
    u32::MAX,
];
const U64S: [u64; 6] = [0, 1, 4 << 20, (4 << 20) - 512, 1 << 63, u64::MAX];
const MAGICS: [&[u8]; 4] = [
    b"IHAVEOPT",
    &[0x25, 0x60, 0x95, 0x13],
    &[0, 0, 0, 3],
    b"base:allocation",
];

/// One random change to `v`; `other` is another corpus entry to splice.
fn mutate_once(v: &mut Vec<u8>, other: &[u8], rng: &mut MutRng) {
    let len = v.len();
    let at = rng.below(len + 1);
    match rng.below(10) {
        0 if len > 0 => v[at.min(len - 1)] ^= 1 << rng.below(8),
        1 if len > 0 => v[at.min(len - 1)] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)],
        2 if len >= 4 => {
            let at = at.min(len - 4);
            v[at..at + 4].copy_from_slice(&U32S[rng.below(U32S.len())].to_be_bytes());
        }
        3 if len >= 8 => {
            let at = at.min(len - 8);
            v[at..at + 8].copy_from_slice(&U64S[rng.below(U64S.len())].to_be_bytes());
        }
        4 if len > 0 => {
            let n = 1 + rng.below((len - at.min(len - 1)).min(4096));
            let at = at.min(len - 1);
            v.drain(at..(at + n).min(len));
        }
        5 if len > 0 => {
            let at = at.min(len - 1);
            let n = 1 + rng.below((len - at).min(4096));
            let copy = v[at..at + n].to_vec();
            let to = rng.below(len + 1);
            v.splice(to..to, copy);
        }
        6 if !other.is_empty() => {
            let from = rng.below(other.len());
            v.truncate(at);
            v.extend_from_slice(&other[from..]);
        }
        7 => v.truncate(at),
        8 => {
            let bytes: Vec<u8> = (0..1 + rng.below(64))
                .map(|_| rng.next_u64() as u8)
                .collect();
            v.splice(at..at, bytes);
        }
        _ => {
            let m = MAGICS[rng.below(MAGICS.len())];
            v.splice(at..at, m.iter().copied());
        }
    }
    v.truncate(2 << 20);
}

#[test]
fn the_fuzz_driver_completes_late() {
    // The driver's disk is asynchronous: over the seed corpus some
    // completions are held back and delivered in a later round.
    let held: u64 = corpus()
        .iter()
        .map(|(_, d)| fuzzing::run_counted(d).held_over)
        .sum();
    assert!(held > 0, "no completion was ever delivered late");
}

#[test]
fn bounded_fuzz_from_the_corpus() {
    let corpus = corpus();
    assert!(corpus.len() >= 5, "seed corpus missing or small");
    for (name, data) in &corpus {
        let r = std::panic::catch_unwind(|| fuzzing::run(data));
        assert!(r.is_ok(), "seed {name} fails");
    }
    bounded::run("bounded fuzz", "engine", &corpus, mutate_once, fuzzing::run);
}
