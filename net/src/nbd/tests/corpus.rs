//! A time-bounded fuzz run in the normal test suite: the seed corpus of
//! real client transcripts (`net/fuzz/corpus/engine`, captured from
//! qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh and fio) replayed as is, then
//! mutated at random for `STRATA_FUZZ_SECS` seconds (default 20) through
//! the same driver as the cargo-fuzz target. The seed is printed; set
//! `STRATA_FUZZ_SEED` to replay a run. A failing input is written to
//! `net/fuzz/artifacts/engine/crash-<seed>-<n>` (where cargo-fuzz puts its
//! own) before the test fails.

use super::super::fuzzing;
use alloc::string::String;
use alloc::vec::Vec;
use std::time::{Duration, Instant};

/// The corpus directory, from the crate root.
fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/engine")
}

/// Every corpus file, in name order.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("the seed corpus exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
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
fn mutate_once(v: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
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
            let bytes: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect();
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
    let secs = std::env::var("STRATA_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let seed = std::env::var("STRATA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    std::eprintln!("bounded fuzz: seed {seed} (STRATA_FUZZ_SEED), {secs} s");
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let base = &corpus[rng.below(corpus.len())].1;
        let other = &corpus[rng.below(corpus.len())].1;
        let mut input = base.clone();
        for _ in 0..1 + rng.below(8) {
            mutate_once(&mut input, other, &mut rng);
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fuzzing::run(&input)));
        if r.is_err() {
            let dir = corpus_dir().join("../../artifacts/engine");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(std::format!("crash-{seed}-{runs}"));
            let _ = std::fs::write(&path, &input);
            panic!("the engine failed on an input, saved to {}", path.display());
        }
        runs += 1;
    }
    std::eprintln!("bounded fuzz: {runs} inputs, no failure");
}
