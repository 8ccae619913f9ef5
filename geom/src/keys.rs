//! What the encrypting classes need from the platform: named secrets
//! (`-k NAME`), handed over outside the config text, the generator every
//! key, salt and IV comes from, and a clock to time key stretching.
//!
//! ```text
//!  strata run|hosted --secret NAME=FILE ─▶ Stack::set_secret(NAME, bytes)
//!  RDSEED/RDRAND, virtio-rng, the host's ─▶ Stack::add_entropy(bytes)
//!  getrandom                                 (ChaCha20, refuses unseeded)
//! ```

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use crypt::rng::{Csprng, NoEntropy};

/// The stack's key material sources.
pub struct Keys {
    secrets: BTreeMap<String, Vec<u8>>,
    rng: Csprng,
    clock: Option<fn() -> u64>,
}

impl Default for Keys {
    fn default() -> Keys {
        Keys {
            secrets: BTreeMap::new(),
            rng: Csprng::unseeded(),
            clock: None,
        }
    }
}

impl crate::stack::Stack {
    /// Makes secret `name` known (`-k NAME` refers to it); a later call
    /// replaces it.
    pub fn set_secret(&mut self, name: &str, bytes: &[u8]) {
        self.keys.secrets.insert(String::from(name), bytes.to_vec());
    }

    /// Secret `name`, if given.
    pub fn secret(&self, name: &str) -> Option<&[u8]> {
        self.keys.secrets.get(name).map(Vec::as_slice)
    }

    /// Names of the secrets given.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.keys.secrets.keys().map(String::as_str)
    }

    /// Mixes `entropy` into the key generator (the first call seeds it).
    pub fn add_entropy(&mut self, entropy: &[u8]) {
        self.keys.rng.mix(entropy);
    }

    /// True once the key generator has been seeded.
    pub fn has_entropy(&self) -> bool {
        self.keys.rng.seeded()
    }

    /// Fills `out` from the key generator, or refuses if it was never
    /// seeded.
    pub fn random_bytes(&mut self, out: &mut [u8]) -> Result<(), NoEntropy> {
        self.keys.rng.fill(out)
    }

    /// Sets a monotonic clock (ns) that runs while a statement is carried
    /// out (the stack's own clock stands still then), for timing key
    /// stretching.
    pub fn set_live_clock(&mut self, clock: fn() -> u64) {
        self.keys.clock = Some(clock);
    }

    /// The clock from [`crate::stack::Stack::set_live_clock`], if any.
    pub fn live_clock(&self) -> Option<fn() -> u64> {
        self.keys.clock
    }
}
