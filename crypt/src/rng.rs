//! The generator every key comes from: ChaCha20, seeded from the CPU's
//! entropy instructions and the host's virtio-rng, refusing to run
//! unseeded.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// No entropy source gave a seed: keys cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoEntropy;

/// A ChaCha20 CSPRNG.
pub struct Csprng {
    inner: Option<ChaCha20Rng>,
}

impl Csprng {
    /// A generator with no seed yet: [`Csprng::fill`] refuses until one
    /// is mixed in.
    pub const fn unseeded() -> Csprng {
        Csprng { inner: None }
    }

    /// Mixes `entropy` into the state (SHA-256 of the old key and it).
    pub fn mix(&mut self, entropy: &[u8]) {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        if let Some(r) = &mut self.inner {
            let mut old = [0u8; 32];
            r.fill_bytes(&mut old);
            h.update(old);
        }
        h.update(entropy);
        self.inner = Some(ChaCha20Rng::from_seed(h.finalize().into()));
    }

    /// True once a seed was mixed in.
    pub fn seeded(&self) -> bool {
        self.inner.is_some()
    }

    /// Fills `out` with random bytes, or refuses if never seeded.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<(), NoEntropy> {
        self.inner.as_mut().ok_or(NoEntropy)?.fill_bytes(out);
        Ok(())
    }
}
