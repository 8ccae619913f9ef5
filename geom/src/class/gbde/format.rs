//! gbde's on-disk format: the header, the lock sectors that hold the
//! master key, and the zones of data sectors with their key blocks.
//!
//! ```text
//!   byte 0      header sector: magic, geometry, volume id
//!   512·(1+i)   lock sector i (i < 4): salt, iterations, the master key
//!               wrapped under PBKDF2-HMAC-SHA512(passphrase), a tag
//!   4096        zone 0: key block (4 KiB) │ 48 data sectors (24 KiB)
//!   +28 KiB     zone 1 …                    (whole zones only)
//! ```
//!
//! A key block is 8 key sectors of 512 bytes, each holding the records of
//! 6 data sectors and enciphered on its own (AES-256-XTS under a key drawn
//! from the master key, the disk sector number as tweak), so a key sector
//! is the unit a torn write keeps or loses. A record has two slots, each a
//! random 256-bit sector key and a keyed hash of the ciphertext it made:
//! a read takes the slot whose hash matches what the data sector holds,
//! so after a power cut a sector reads its old contents or its new, never
//! garbage. A key sector that reads all zeroes holds no records (the data
//! sectors it covers were never written and read zeroes).

use alloc::vec::Vec;
use core::hash::Hasher;
use crypt::kdf::{self, Hash};
use crypt::Xts;
use siphasher::sip::SipHasher24;

/// Bytes in a data sector and a key sector.
pub const SECTOR: u64 = 512;
/// The header's magic.
pub const MAGIC: [u8; 16] = *b"STRATA-GBDE-1\0\0\0";
/// Lock sectors (passphrase slots).
pub const SLOTS: usize = 4;
/// Data sectors per zone.
pub const PER_ZONE: u64 = 48;
/// Bytes of a zone's key block.
pub const KEY_BLOCK: u64 = 4096;
/// Bytes of a zone: its key block, then its data sectors.
pub const ZONE: u64 = KEY_BLOCK + PER_ZONE * SECTOR;
/// Where zone 0 starts.
pub const DATA_START: u64 = 4096;
/// Records in one key sector.
pub const PER_KEY_SECTOR: u64 = 6;
/// Bytes of the master key.
pub const MASTER_BYTES: usize = 64;
/// Bytes of a lock sector's salt.
pub const SALT_BYTES: usize = 32;
/// The fewest PBKDF2 iterations a lock sector may ask for.
pub const MIN_ITERATIONS: u32 = 1000;
/// The most: a lock sector asking for more is not taken (a damaged or
/// hostile disk could otherwise keep `attach` busy for hours).
pub const MAX_ITERATIONS: u32 = 1 << 24;

const LOCK_MAGIC: [u8; 8] = *b"GBDELOCK";
const RECORD: usize = 80;
const FLAGS_AT: usize = 480;
const SUM_AT: usize = 496;

/// Why a header or lock sector is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// No gbde header.
    NotGbde,
    /// A header that is not whole (its check fails, or its geometry does
    /// not fit the provider).
    Corrupt(&'static str),
    /// No lock sector opens with this passphrase.
    WrongPassphrase,
}

impl core::fmt::Display for FormatError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FormatError::NotGbde => write!(f, "no gbde volume (no header magic)"),
            FormatError::Corrupt(why) => write!(f, "damaged gbde header: {why}"),
            FormatError::WrongPassphrase => write!(f, "wrong passphrase (no lock sector opens with it)"),
        }
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    crate::meta::le64(&b[at..])
}

fn le32(b: &[u8], at: usize) -> u32 {
    crate::meta::le32(&b[at..])
}

/// The volume's header (sector 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Zones on the provider.
    pub zones: u64,
    /// A random id, shown in `/geom`.
    pub id: [u8; 16],
}

impl Header {
    /// The header for a provider of `media` bytes, or `None` if not one
    /// zone fits.
    pub fn for_size(media: u64, id: [u8; 16]) -> Option<Header> {
        let zones = media.checked_sub(DATA_START)? / ZONE;
        (zones > 0).then_some(Header { zones, id })
    }

    /// Bytes of data the volume serves.
    pub fn data_bytes(&self) -> u64 {
        self.zones * PER_ZONE * SECTOR
    }

    /// The header sector.
    pub fn to_bytes(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[0..16].copy_from_slice(&MAGIC);
        b[16..20].copy_from_slice(&1u32.to_le_bytes());
        b[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.zones.to_le_bytes());
        b[32..36].copy_from_slice(&(PER_ZONE as u32).to_le_bytes());
        b[36..40].copy_from_slice(&(KEY_BLOCK as u32).to_le_bytes());
        b[40..56].copy_from_slice(&self.id);
        let crc = crc32fast::hash(&b[..508]);
        b[508..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header sector of a provider of `media` bytes.
    pub fn parse(b: &[u8], media: u64) -> Result<Header, FormatError> {
        if b.len() < SECTOR as usize || b[0..16] != MAGIC {
            return Err(FormatError::NotGbde);
        }
        if crc32fast::hash(&b[..508]) != le32(b, 508) {
            return Err(FormatError::Corrupt("its checksum does not match"));
        }
        if le32(b, 16) != 1
            || u64::from(le32(b, 20)) != SECTOR
            || u64::from(le32(b, 32)) != PER_ZONE
            || u64::from(le32(b, 36)) != KEY_BLOCK
        {
            return Err(FormatError::Corrupt("an unknown version or geometry"));
        }
        let zones = le64(b, 24);
        let end = zones.checked_mul(ZONE).and_then(|z| z.checked_add(DATA_START));
        if zones == 0 || end.is_none_or(|e| e > media) {
            return Err(FormatError::Corrupt("its zones do not fit the provider"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[40..56]);
        Ok(Header { zones, id })
    }

    /// The byte offset of zone `z`'s key block.
    pub fn key_block_at(z: u64) -> u64 {
        DATA_START + z * ZONE
    }

    /// The byte offset of data sector `s`.
    pub fn data_at(s: u64) -> u64 {
        Self::key_block_at(s / PER_ZONE) + KEY_BLOCK + (s % PER_ZONE) * SECTOR
    }
}

/// One lock sector's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_BYTES],
    /// The master key, enciphered under the passphrase's key.
    pub wrapped: [u8; MASTER_BYTES],
    /// Proves the passphrase: a hash of its check key and `wrapped`.
    pub tag: [u8; 32],
}

/// The key and check key a passphrase gives a lock sector.
fn stretch(pass: &[u8], salt: &[u8], iterations: u32) -> ([u8; 64], [u8; 32]) {
    let mut out = [0u8; 96];
    kdf::pbkdf2(Hash::Sha512, pass, salt, iterations, &mut out);
    let mut kek = [0u8; 64];
    let mut check = [0u8; 32];
    kek.copy_from_slice(&out[..64]);
    check.copy_from_slice(&out[64..]);
    (kek, check)
}

fn lock_tag(check: &[u8], wrapped: &[u8], slot: usize) -> [u8; 32] {
    let mut d = [0u8; 64];
    kdf::digest(Hash::Sha512, &[b"gbde-lock", check, wrapped, &[slot as u8]], &mut d);
    let mut t = [0u8; 32];
    t.copy_from_slice(&d[..32]);
    t
}

impl Lock {
    /// Seals `master` in slot `slot` under `pass`.
    pub fn seal(master: &[u8; MASTER_BYTES], pass: &[u8], salt: [u8; SALT_BYTES], iterations: u32, slot: usize) -> Lock {
        let (kek, check) = stretch(pass, &salt, iterations);
        let mut wrapped = *master;
        Xts::new(&kek).expect("a 64-byte key").encrypt(&mut wrapped, MASTER_BYTES, slot as u64);
        let tag = lock_tag(&check, &wrapped, slot);
        Lock { iterations, salt, wrapped, tag }
    }

    /// The master key, if `pass` opens this slot.
    pub fn open(&self, pass: &[u8], slot: usize) -> Option<[u8; MASTER_BYTES]> {
        let (kek, check) = stretch(pass, &self.salt, self.iterations);
        if lock_tag(&check, &self.wrapped, slot) != self.tag {
            return None;
        }
        let mut master = self.wrapped;
        Xts::new(&kek).ok()?.decrypt(&mut master, MASTER_BYTES, slot as u64);
        Some(master)
    }

    /// The lock sector.
    pub fn to_bytes(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[0..8].copy_from_slice(&LOCK_MAGIC);
        b[8..12].copy_from_slice(&self.iterations.to_le_bytes());
        b[16..48].copy_from_slice(&self.salt);
        b[48..112].copy_from_slice(&self.wrapped);
        b[112..144].copy_from_slice(&self.tag);
        b
    }

    /// Parses a lock sector: `None` for an empty slot (or anything that
    /// is not a lock sector).
    pub fn parse(b: &[u8]) -> Option<Lock> {
        if b.len() < SECTOR as usize || b[0..8] != LOCK_MAGIC {
            return None;
        }
        let iterations = le32(b, 8);
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return None;
        }
        let mut l = Lock { iterations, salt: [0; SALT_BYTES], wrapped: [0; MASTER_BYTES], tag: [0; 32] };
        l.salt.copy_from_slice(&b[16..48]);
        l.wrapped.copy_from_slice(&b[48..112]);
        l.tag.copy_from_slice(&b[112..144]);
        Some(l)
    }
}

/// Tries `pass` on every lock sector of `locks` (the 4 sectors after the
/// header): the master key and the slot that opened it.
pub fn unlock(locks: &[u8], pass: &[u8]) -> Result<([u8; MASTER_BYTES], usize), FormatError> {
    for slot in 0..SLOTS {
        let at = slot * SECTOR as usize;
        let Some(l) = locks.get(at..at + SECTOR as usize).and_then(Lock::parse) else {
            continue;
        };
        if let Some(m) = l.open(pass, slot) {
            return Ok((m, slot));
        }
    }
    Err(FormatError::WrongPassphrase)
}

/// The keys the master key gives.
pub struct Keys {
    /// XTS tweak key of every data sector (the data key is the sector's).
    tweak: [u8; 32],
    /// Enciphers key sectors.
    records: Xts,
    /// Keys the ciphertext hashes.
    hash: (u64, u64),
}

impl Keys {
    /// Derives the volume's keys from `master`.
    pub fn new(master: &[u8; MASTER_BYTES]) -> Keys {
        let derive = |label: &[u8]| {
            let mut d = [0u8; 64];
            kdf::digest(Hash::Sha512, &[master, label], &mut d);
            d
        };
        let t = derive(b"gbde data tweak");
        let mut tweak = [0u8; 32];
        tweak.copy_from_slice(&t[..32]);
        let h = derive(b"gbde ciphertext hash");
        Keys {
            tweak,
            records: Xts::new(&derive(b"gbde key sectors")).expect("a 64-byte key"),
            hash: (le64(&h, 0), le64(&h, 8)),
        }
    }

    /// The name of the AES implementation in use.
    pub fn engine(&self) -> &'static str {
        self.records.engine()
    }

    /// The cipher of data sector `s` under its sector key `key`.
    pub fn sector_cipher(&self, key: &[u8; 32]) -> Option<Xts> {
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(key);
        k[32..].copy_from_slice(&self.tweak);
        Xts::new(&k).ok()
    }

    /// The hash of data sector `s`'s ciphertext `c` (never 0: 0 marks an
    /// unused slot).
    pub fn hash(&self, s: u64, c: &[u8]) -> u64 {
        let mut h = SipHasher24::new_with_keys(self.hash.0, self.hash.1);
        h.write(&s.to_le_bytes());
        h.write(c);
        h.finish().max(1)
    }

    fn sum(&self, disk_sector: u64, b: &[u8]) -> u64 {
        let mut h = SipHasher24::new_with_keys(self.hash.1, self.hash.0);
        h.write(b"gbde key sector");
        h.write(&disk_sector.to_le_bytes());
        h.write(&b[..SUM_AT]);
        h.finish()
    }
}

/// One slot of a record: a sector key and the hash of the ciphertext it
/// made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// The sector key.
    pub key: [u8; 32],
    /// The ciphertext's hash; 0: unused.
    pub hash: u64,
}

/// A data sector's record: two slots and which is newer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Slots A and B.
    pub slots: [Slot; 2],
    /// The slot written last.
    pub latest: u8,
}

impl Record {
    /// True when both slots hold a key (which one the data sector holds
    /// is known only from its ciphertext).
    pub fn both(&self) -> bool {
        self.slots[0].hash != 0 && self.slots[1].hash != 0
    }

    /// The only used slot, if exactly one is.
    pub fn single(&self) -> Option<u8> {
        match (self.slots[0].hash != 0, self.slots[1].hash != 0) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    }

    /// True when the sector was never written.
    pub fn empty(&self) -> bool {
        self.slots[0].hash == 0 && self.slots[1].hash == 0
    }

    /// The slot whose hash is `h`.
    pub fn matching(&self, h: u64) -> Option<u8> {
        (0..2u8).find(|&i| self.slots[i as usize].hash == h)
    }
}

/// A key sector's records.
pub type Records = [Record; PER_KEY_SECTOR as usize];

/// Deciphers the key sector at disk sector `disk_sector`: its records
/// (all empty for a sector that reads zeroes), or `None` when it does not
/// decipher to a key sector of this volume at this place.
pub fn read_key_sector(keys: &Keys, disk_sector: u64, raw: &[u8]) -> Option<Records> {
    let mut recs = [Record::default(); PER_KEY_SECTOR as usize];
    if raw.iter().all(|&b| b == 0) {
        return Some(recs);
    }
    let mut b = [0u8; SECTOR as usize];
    b.copy_from_slice(&raw[..SECTOR as usize]);
    keys.records.decrypt(&mut b, SECTOR as usize, disk_sector);
    if keys.sum(disk_sector, &b) != le64(&b, SUM_AT) {
        return None;
    }
    for (i, r) in recs.iter_mut().enumerate() {
        let at = i * RECORD;
        for (k, slot) in r.slots.iter_mut().enumerate() {
            let s = at + k * 40;
            slot.key.copy_from_slice(&b[s..s + 32]);
            slot.hash = le64(&b, s + 32);
        }
        r.latest = b[FLAGS_AT + i] & 1;
    }
    Some(recs)
}

/// Enciphers `recs` as the key sector at disk sector `disk_sector`.
pub fn write_key_sector(keys: &Keys, disk_sector: u64, recs: &[Record; PER_KEY_SECTOR as usize]) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    for (i, r) in recs.iter().enumerate() {
        let at = i * RECORD;
        for (k, slot) in r.slots.iter().enumerate() {
            let s = at + k * 40;
            b[s..s + 32].copy_from_slice(&slot.key);
            b[s + 32..s + 40].copy_from_slice(&slot.hash.to_le_bytes());
        }
        b[FLAGS_AT + i] = r.latest & 1;
    }
    let sum = keys.sum(disk_sector, &b);
    b[SUM_AT..SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    keys.records.encrypt(&mut b, SECTOR as usize, disk_sector);
    b
}

/// The lock sectors' area (4 sectors) with `locks` in their slots.
pub fn lock_area(locks: &[Option<Lock>; SLOTS]) -> Vec<u8> {
    let mut v = alloc::vec![0u8; SLOTS * SECTOR as usize];
    for (i, l) in locks.iter().enumerate() {
        if let Some(l) = l {
            v[i * SECTOR as usize..(i + 1) * SECTOR as usize].copy_from_slice(&l.to_bytes());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_header_round_trips_and_is_checked() {
        let h = Header::for_size(64 << 20, [5; 16]).unwrap();
        assert_eq!(h.zones, ((64 << 20) - DATA_START) / ZONE);
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b, 64 << 20), Ok(h.clone()));
        assert_eq!(Header::parse(&[0; 512], 64 << 20), Err(FormatError::NotGbde));
        let mut bad = b;
        bad[30] ^= 1;
        assert!(matches!(Header::parse(&bad, 64 << 20), Err(FormatError::Corrupt(_))));
        assert!(matches!(Header::parse(&b, 1 << 20), Err(FormatError::Corrupt(_))));
        assert_eq!(Header::for_size(DATA_START + ZONE - 1, [0; 16]), None);
        // Data sectors of a zone follow its key block.
        assert_eq!(Header::data_at(0), DATA_START + KEY_BLOCK);
        assert_eq!(Header::data_at(PER_ZONE), DATA_START + ZONE + KEY_BLOCK);
    }

    #[test]
    fn a_lock_opens_only_with_its_passphrase_and_slot() {
        let master = [0x42u8; MASTER_BYTES];
        let l = Lock::seal(&master, b"pw", [1; SALT_BYTES], MIN_ITERATIONS, 2);
        assert_eq!(l.open(b"pw", 2), Some(master));
        assert_eq!(l.open(b"pW", 2), None);
        assert_eq!(l.open(b"pw", 1), None, "a lock moved to another slot does not open");
        assert_eq!(Lock::parse(&l.to_bytes()), Some(l.clone()));
        let mut greedy = l.to_bytes();
        greedy[8..12].copy_from_slice(&(MAX_ITERATIONS + 1).to_le_bytes());
        assert_eq!(Lock::parse(&greedy), None, "a lock sector asking for too many iterations");
        let area = lock_area(&[None, None, Some(l), None]);
        assert_eq!(unlock(&area, b"pw"), Ok((master, 2)));
        assert_eq!(unlock(&area, b"nope"), Err(FormatError::WrongPassphrase));
        // The master key is not in the lock sector in the clear.
        assert!(!area.windows(16).any(|w| w == &master[..16]));
    }

    #[test]
    fn key_sectors_round_trip_and_refuse_damage() {
        let keys = Keys::new(&[9; MASTER_BYTES]);
        let mut recs = [Record::default(); PER_KEY_SECTOR as usize];
        recs[1].slots[0] = Slot { key: [3; 32], hash: 77 };
        recs[1].slots[1] = Slot { key: [4; 32], hash: 78 };
        recs[1].latest = 1;
        recs[5].slots[1] = Slot { key: [6; 32], hash: 5 };
        let b = write_key_sector(&keys, 8, &recs);
        assert_eq!(read_key_sector(&keys, 8, &b), Some(recs));
        // Enciphered: no key in the clear.
        assert!(!b.windows(8).any(|w| w == [3; 8]));
        // Another place, a flipped bit, another volume: refused.
        assert_eq!(read_key_sector(&keys, 16, &b), None);
        let mut d = b;
        d[100] ^= 1;
        assert_eq!(read_key_sector(&keys, 8, &d), None);
        assert_eq!(read_key_sector(&Keys::new(&[8; MASTER_BYTES]), 8, &b), None);
        // Zeroes: never written.
        assert_eq!(read_key_sector(&keys, 8, &[0; 512]), Some([Record::default(); 6]));
    }

    proptest! {
        /// Whatever the bytes, parsing a header, a lock sector or a key
        /// sector answers without panicking.
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 512..600), magic in 0u8..3, media in 0u64..1 << 40) {
            let mut b = b;
            match magic {
                0 => b[..16].copy_from_slice(&MAGIC),
                1 => b[..8].copy_from_slice(&LOCK_MAGIC),
                _ => {}
            }
            let _ = Header::parse(&b, media);
            if let Some(l) = Lock::parse(&b) {
                prop_assert_eq!(Lock::parse(&l.to_bytes()), Some(l));
            }
            let keys = Keys::new(&[1; MASTER_BYTES]);
            let _ = read_key_sector(&keys, 3, &b);
        }
    }
}
