//! The LUKS1 on-disk format (the "LUKS On-Disk Format Specification",
//! version 1.2.3): the header, its eight key slots, the anti-forensic
//! splitter, and the master key check, with no I/O of its own.
//!
//! ```text
//!  sector 0        header (592 bytes): magic, cipher, hash, payload offset,
//!                  key bytes, master key digest (PBKDF2 of the key, 20 bytes),
//!                  uuid, 8 key slots {active, iterations, salt, offset, stripes}
//!  slot areas      per active slot: the master key split into 4000 stripes
//!                  (AF split), encrypted with a key PBKDF2 made from the
//!                  passphrase and the slot's salt (IVs count from 0)
//!  payload offset  the volume's sectors, AES-XTS, IV = sector number
//!                  from the payload's start (plain64)
//! ```
//!
//! Strata writes `aes`, `xts-plain64`, `sha256` and a 64-byte key
//! (AES-256-XTS), the slot areas and the payload at 4 KiB and 1 MiB
//! boundaries as cryptsetup lays them out; it opens any `aes` volume in
//! `xts-plain64` with `sha1`, `sha256` or `sha512`.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use crypt::kdf::{self, Hash};
use crypt::Xts;

/// Bytes of the header proper.
pub const HEADER_BYTES: usize = 592;
/// The LUKS sector, in which offsets count and IVs advance.
pub const SECTOR: u64 = 512;
/// Key slots in a header.
pub const SLOTS: usize = 8;
/// Stripes of the anti-forensic splitter (the only count QEMU accepts).
pub const STRIPES: u32 = 4000;
/// Bytes of the master key digest.
pub const DIGEST_BYTES: usize = 20;
/// Bytes of every salt.
pub const SALT_BYTES: usize = 32;
/// Fewest PBKDF2 iterations Strata writes (cryptsetup's floor).
pub const MIN_ITERATIONS: u32 = 1000;

const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const ACTIVE: u32 = 0x00AC_71F3;
const INACTIVE: u32 = 0x0000_DEAD;
/// Slot areas begin on this boundary (sectors).
const SLOT_ALIGN: u64 = 4096 / SECTOR;
/// The payload begins on this boundary (sectors).
const PAYLOAD_ALIGN: u64 = (1 << 20) / SECTOR;

/// Why a header cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LuksError {
    /// No LUKS magic: not a LUKS volume.
    NotLuks,
    /// A version other than 1 (LUKS2 volumes say 2).
    Version(u16),
    /// A cipher, mode or hash Strata does not implement.
    Unsupported(String),
    /// Fields that contradict each other or the device.
    Corrupt(&'static str),
    /// No active slot opens with this passphrase.
    WrongPassphrase,
    /// Every slot is in use.
    NoFreeSlot,
}

impl core::fmt::Display for LuksError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LuksError::NotLuks => write!(f, "no LUKS header"),
            LuksError::Version(v) => write!(f, "LUKS version {v} (only LUKS1 is supported)"),
            LuksError::Unsupported(what) => write!(f, "unsupported {what}"),
            LuksError::Corrupt(why) => write!(f, "damaged LUKS header: {why}"),
            LuksError::WrongPassphrase => write!(f, "wrong passphrase (no key slot opens with it)"),
            LuksError::NoFreeSlot => write!(f, "all 8 key slots are in use"),
        }
    }
}

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations of the passphrase.
    pub iterations: u32,
    /// Salt of the passphrase's PBKDF2.
    pub salt: [u8; SALT_BYTES],
    /// Start of the slot's key material (sectors).
    pub offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Cipher name (`aes`).
    pub cipher: String,
    /// Cipher mode (`xts-plain64`).
    pub mode: String,
    /// Hash of PBKDF2 and of the splitter.
    pub hash: Hash,
    /// First sector of the payload.
    pub payload_offset: u32,
    /// Bytes of the master key (32: AES-128-XTS, 64: AES-256-XTS).
    pub key_bytes: u32,
    /// PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_BYTES],
    /// Its salt.
    pub mk_salt: [u8; SALT_BYTES],
    /// Its iterations.
    pub mk_iterations: u32,
    /// The volume's UUID, as text.
    pub uuid: String,
    /// The key slots.
    pub slots: [Slot; SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A NUL-padded text field.
fn text(b: &[u8]) -> Result<String, LuksError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..end])
        .map(String::from)
        .map_err(|_| LuksError::Corrupt("a text field is not UTF-8"))
}

fn put_text(out: &mut [u8], s: &str) {
    out[..s.len()].copy_from_slice(s.as_bytes());
}

impl Header {
    /// Parses the first [`HEADER_BYTES`] of a volume and checks that its
    /// fields fit together and within a device of `device_sectors`.
    pub fn parse(b: &[u8], device_sectors: u64) -> Result<Header, LuksError> {
        if b.len() < HEADER_BYTES || b[..6] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(LuksError::Version(version));
        }
        let cipher = text(&b[8..40])?;
        let mode = text(&b[40..72])?;
        let hash_name = text(&b[72..104])?;
        let hash = Hash::from_name(&hash_name)
            .ok_or_else(|| LuksError::Unsupported(alloc::format!("hash '{hash_name}'")))?;
        if cipher != "aes" || mode != "xts-plain64" {
            return Err(LuksError::Unsupported(alloc::format!(
                "cipher '{cipher}-{mode}' (aes-xts-plain64 only)"
            )));
        }
        let key_bytes = be32(b, 108);
        if key_bytes != 32 && key_bytes != 64 {
            return Err(LuksError::Unsupported(alloc::format!(
                "key of {key_bytes} bytes for aes-xts (32 or 64)"
            )));
        }
        let payload_offset = be32(b, 104);
        let mut h = Header {
            cipher,
            mode,
            hash,
            payload_offset,
            key_bytes,
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_salt: b[132..164].try_into().expect("32 bytes"),
            mk_iterations: be32(b, 164),
            uuid: text(&b[168..208])?,
            slots: core::array::from_fn(|_| Slot {
                active: false,
                iterations: 0,
                salt: [0; SALT_BYTES],
                offset: 0,
                stripes: 0,
            }),
        };
        if h.mk_iterations == 0 {
            return Err(LuksError::Corrupt("master key digest of 0 iterations"));
        }
        if u64::from(payload_offset) >= device_sectors {
            return Err(LuksError::Corrupt("payload beyond the end of the device"));
        }
        let area = h.area_sectors();
        for (i, s) in h.slots.iter_mut().enumerate() {
            let at = 208 + i * 48;
            s.active = match be32(b, at) {
                ACTIVE => true,
                INACTIVE => false,
                _ => return Err(LuksError::Corrupt("a key slot is neither active nor inactive")),
            };
            s.iterations = be32(b, at + 4);
            s.salt = b[at + 8..at + 40].try_into().expect("32 bytes");
            s.offset = be32(b, at + 40);
            s.stripes = be32(b, at + 44);
            if !s.active {
                continue;
            }
            if s.stripes != STRIPES || s.iterations == 0 {
                return Err(LuksError::Corrupt("an active key slot has odd stripes or iterations"));
            }
            let end = u64::from(s.offset) + area;
            if u64::from(s.offset) * SECTOR < HEADER_BYTES as u64 || end > u64::from(payload_offset) {
                return Err(LuksError::Corrupt("a key slot overlaps the header or the payload"));
            }
        }
        Ok(h)
    }

    /// The header as its [`HEADER_BYTES`] on disk.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher);
        put_text(&mut b[40..72], &self.mode);
        put_text(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            let state = if s.active { ACTIVE } else { INACTIVE };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Sectors of one slot's key material.
    pub fn area_sectors(&self) -> u64 {
        (u64::from(self.key_bytes) * u64::from(STRIPES)).div_ceil(SECTOR)
    }

    /// Bytes from the start of the volume that hold the header and every
    /// slot's material (what [`Header::unlock`] reads).
    pub fn keys_end(&self) -> u64 {
        let area = self.area_sectors();
        let end = self
            .slots
            .iter()
            .filter(|s| s.active)
            .map(|s| u64::from(s.offset) + area)
            .max()
            .unwrap_or(1);
        end * SECTOR
    }

    /// Lays out a fresh header for a `key_bytes` master key: every slot
    /// inactive with its area placed, the payload after them. `salt` and
    /// `uuid` come from the caller's generator.
    pub fn layout(hash: Hash, key_bytes: u32, mk_salt: [u8; SALT_BYTES], uuid: String) -> Header {
        let mut h = Header {
            cipher: String::from("aes"),
            mode: String::from("xts-plain64"),
            hash,
            payload_offset: 0,
            key_bytes,
            mk_digest: [0; DIGEST_BYTES],
            mk_salt,
            mk_iterations: MIN_ITERATIONS,
            uuid,
            slots: core::array::from_fn(|_| Slot {
                active: false,
                iterations: 0,
                salt: [0; SALT_BYTES],
                offset: 0,
                stripes: STRIPES,
            }),
        };
        let area = h.area_sectors().next_multiple_of(SLOT_ALIGN);
        let mut at = SLOT_ALIGN;
        for s in h.slots.iter_mut() {
            s.offset = at as u32;
            at += area;
        }
        h.payload_offset = at.next_multiple_of(PAYLOAD_ALIGN) as u32;
        h
    }

    /// Sets the master key digest for `key` with `iterations`.
    pub fn set_key_digest(&mut self, key: &[u8], iterations: u32) {
        self.mk_iterations = iterations.max(MIN_ITERATIONS);
        kdf::pbkdf2(self.hash, key, &self.mk_salt, self.mk_iterations, &mut self.mk_digest);
    }

    /// True when `key` is the volume's master key.
    pub fn key_matches(&self, key: &[u8]) -> bool {
        let mut d = [0u8; DIGEST_BYTES];
        kdf::pbkdf2(self.hash, key, &self.mk_salt, self.mk_iterations, &mut d);
        d == self.mk_digest
    }

    /// The master key, from the volume's first `keys_end()` bytes and a
    /// passphrase: each active slot in turn until one opens. Returns the
    /// key and the slot.
    pub fn unlock(&self, volume: &[u8], pass: &[u8]) -> Result<(Vec<u8>, usize), LuksError> {
        let area = (self.area_sectors() * SECTOR) as usize;
        let split = self.key_bytes as usize * STRIPES as usize;
        for (i, s) in self.slots.iter().enumerate() {
            if !s.active {
                continue;
            }
            let at = s.offset as usize * SECTOR as usize;
            let Some(material) = volume.get(at..at + area) else {
                return Err(LuksError::Corrupt("key material beyond what was read"));
            };
            let mut slot_key = vec![0u8; self.key_bytes as usize];
            kdf::pbkdf2(self.hash, pass, &s.salt, s.iterations, &mut slot_key);
            let xts = Xts::new(&slot_key).map_err(|_| LuksError::Corrupt("key size"))?;
            let mut m = material.to_vec();
            xts.decrypt(&mut m, SECTOR as usize, 0);
            let key = af_merge(self.hash, &m[..split], self.key_bytes as usize);
            if self.key_matches(&key) {
                return Ok((key, i));
            }
        }
        Err(LuksError::WrongPassphrase)
    }

    /// Fills free slot `slot` (or the first free one) for passphrase
    /// `pass` with `iterations`: returns the slot and the encrypted
    /// material to write at its offset. `salt` and `stripes_random`
    /// (key_bytes × 3999 bytes) come from the caller's generator.
    pub fn add_slot(
        &mut self,
        slot: Option<usize>,
        key: &[u8],
        pass: &[u8],
        iterations: u32,
        salt: [u8; SALT_BYTES],
        stripes_random: &[u8],
    ) -> Result<(usize, Vec<u8>), LuksError> {
        let i = match slot {
            Some(i) if i < SLOTS && !self.slots[i].active => i,
            Some(_) => return Err(LuksError::NoFreeSlot),
            None => self.slots.iter().position(|s| !s.active).ok_or(LuksError::NoFreeSlot)?,
        };
        let area = (self.area_sectors() * SECTOR) as usize;
        let mut m = af_split(self.hash, key, stripes_random);
        m.resize(area, 0);
        let mut slot_key = vec![0u8; self.key_bytes as usize];
        let iterations = iterations.max(MIN_ITERATIONS);
        kdf::pbkdf2(self.hash, pass, &salt, iterations, &mut slot_key);
        Xts::new(&slot_key)
            .map_err(|_| LuksError::Corrupt("key size"))?
            .encrypt(&mut m, SECTOR as usize, 0);
        let s = &mut self.slots[i];
        s.active = true;
        s.iterations = iterations;
        s.salt = salt;
        s.stripes = STRIPES;
        Ok((i, m))
    }

    /// Active slots.
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.active).count()
    }
}

/// LUKS's diffusion: each digest-sized block of `buf` replaced by the
/// hash of its index (big-endian u32) and itself, truncated to the block.
fn diffuse(hash: Hash, buf: &mut [u8]) {
    let ds = hash.digest_len();
    for (i, block) in buf.chunks_mut(ds).enumerate() {
        let iv = (i as u32).to_be_bytes();
        let mut d = [0u8; 64];
        kdf::digest(hash, &[&iv, block], &mut d[..ds]);
        let n = block.len();
        block.copy_from_slice(&d[..n]);
    }
}

/// The anti-forensic split of `key` into [`STRIPES`] stripes: the first
/// 3999 are `random`, the last makes them merge back to the key.
pub fn af_split(hash: Hash, key: &[u8], random: &[u8]) -> Vec<u8> {
    let n = key.len();
    let stripes = STRIPES as usize;
    assert_eq!(random.len(), n * (stripes - 1), "random stripes");
    let mut out = Vec::with_capacity(n * stripes);
    out.extend_from_slice(random);
    let mut d = vec![0u8; n];
    for s in random.chunks(n) {
        for (a, b) in d.iter_mut().zip(s) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    for (a, b) in d.iter_mut().zip(key) {
        *a ^= b;
    }
    out.extend_from_slice(&d);
    out
}

/// The key `af_split` made `stripes` (key_bytes × [`STRIPES`]) from.
pub fn af_merge(hash: Hash, stripes: &[u8], key_bytes: usize) -> Vec<u8> {
    let mut d = vec![0u8; key_bytes];
    let mut chunks = stripes.chunks(key_bytes);
    let last = chunks.next_back().unwrap_or(&[]);
    for s in chunks {
        for (a, b) in d.iter_mut().zip(s) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    for (a, b) in d.iter_mut().zip(last) {
        *a ^= b;
    }
    d
}
