//! What the engines' fuzz drivers share (feature `fuzzing`, and tests):
//! the driver's generator and the hash of an input that seeds it, and for
//! the time-bounded runs in the test suite, the seed corpus, a mutation
//! generator and the run loop itself.

/// The drivers' deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 for `n` of 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// FNV-1a over the input: the seed of every choice a driver makes.
pub fn seed(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1
}

/// The time-bounded runs of the test suite.
#[cfg(test)]
pub mod bounded {
    use alloc::string::String;
    use alloc::vec::Vec;
    use std::time::{Duration, Instant};

    /// The mutations' generator (xorshift64).
    pub struct MutRng(pub u64);

    impl MutRng {
        /// The next 64 bits.
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// An index below `n` (0 for `n` of 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n.max(1) as u64) as usize
        }
    }

    /// `net/fuzz/corpus/<dir>`, from the crate root.
    pub fn corpus_dir(dir: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(dir)
    }

    /// Every file of corpus `dir`, in name order.
    pub fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(corpus_dir(dir))
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

    /// Mutates corpus inputs through `run` for `STRATA_FUZZ_SECS` seconds
    /// (default 20) from the seed `STRATA_FUZZ_SEED` (default: the
    /// clock, printed); a failing input is written to
    /// `net/fuzz/artifacts/<artifacts>/crash-<seed>-<n>` before the test
    /// fails. `mutate` changes an input once, drawing on another.
    pub fn run(
        label: &str,
        artifacts: &str,
        corpus: &[(String, Vec<u8>)],
        mutate: fn(&mut Vec<u8>, &[u8], &mut MutRng),
        run: fn(&[u8]),
    ) {
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
        std::eprintln!("{label}: seed {seed} (STRATA_FUZZ_SEED), {secs} s");
        let mut rng = MutRng(seed);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut runs = 0u64;
        while Instant::now() < deadline {
            let base = &corpus[rng.below(corpus.len())].1;
            let other = &corpus[rng.below(corpus.len())].1;
            let mut input = base.clone();
            for _ in 0..1 + rng.below(8) {
                mutate(&mut input, other, &mut rng);
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&input)));
            if r.is_err() {
                let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fuzz/artifacts")
                    .join(artifacts);
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(std::format!("crash-{seed}-{runs}"));
                let _ = std::fs::write(&path, &input);
                panic!("the engine failed on an input, saved to {}", path.display());
            }
            runs += 1;
        }
        std::eprintln!("{label}: {runs} inputs, no failure");
    }
}
