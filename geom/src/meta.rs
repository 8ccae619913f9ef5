//! On-disk metadata of labelled geoms: one record in the last sector of
//! every member provider (FreeBSD's `g_*_metadata` layout idea).
//!
//! A `label` command writes it; at boot, and whenever a provider appears,
//! the stack reads the last sector back ([`crate::taste`]), parses it, and
//! hands it to the class it names. The record is little-endian and fits in
//! a 512-byte sector; the bytes after it, up to the end of the first 512
//! bytes, are the class's tail (zero for classes that keep nothing
//! there); anything beyond 512 bytes of a larger sector is zero.
//!
//! ```text
//! offset  size  field
//!      0    16  magic "STRATA-GEOM-META"
//!     16     4  version (1)
//!     20     4  flags (meaning chosen by the class)
//!     24    16  class name, ASCII, NUL-padded ("stripe", "mirror", …)
//!     40    64  geom name, ASCII, NUL-padded ("st0")
//!    104     8  id: unique per geom, chosen at label time
//!    112     8  generation: bumped by classes that rewrite metadata
//!    120     4  member index (0-based)
//!    124     4  member count
//!    128     8  member size: media size of the member provider, bytes
//!    136     4  member sector size, bytes
//!    140     4  reserved, zero
//!    144    64  params: 8 × u64, meaning chosen by the class
//!               (stripe: params[0] = stripe size in bytes)
//!    208     4  crc32 (IEEE, crc32fast) of bytes 0..208
//!    212   300  tail: class-defined, not covered by the crc above (a class
//!               that keeps something there checks it itself; mirror:
//!               its history and write-intent bitmap with their own crc)
//! ```
//!
//! The module has the three parts of a wire format in smoltcp's style: a
//! view ([`Meta`]) that reads and writes fields in place after one length
//! check, an owned value ([`MetaRepr`]), and `parse`/`emit` between them.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// The magic at offset 0.
pub const MAGIC: [u8; 16] = *b"STRATA-GEOM-META";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the record (the sector holding it may be larger).
pub const META_LEN: usize = 212;
/// Longest class name.
pub const CLASS_LEN: usize = 16;
/// Longest geom name.
pub const NAME_LEN: usize = 64;
/// Number of class parameter words.
pub const PARAMS: usize = 8;
/// Bytes of the class-defined tail after the record: the rest of the
/// smallest sector.
pub const TAIL_LEN: usize = 512 - META_LEN;

mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..16;
    pub const VERSION: Range<usize> = 16..20;
    pub const FLAGS: Range<usize> = 20..24;
    pub const CLASS: Range<usize> = 24..40;
    pub const NAME: Range<usize> = 40..104;
    pub const ID: Range<usize> = 104..112;
    pub const GENERATION: Range<usize> = 112..120;
    pub const INDEX: Range<usize> = 120..124;
    pub const COUNT: Range<usize> = 124..128;
    pub const SIZE: Range<usize> = 128..136;
    pub const SECTOR: Range<usize> = 136..140;
    pub const RESERVED: Range<usize> = 140..144;
    pub const PARAMS: usize = 144;
    pub const CRC: Range<usize> = 208..212;
    pub const TAIL: Range<usize> = 212..512;
}

/// Why a sector does not hold valid metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaError {
    /// Fewer than [`META_LEN`] bytes.
    Truncated,
    /// No magic: the sector holds no metadata (the normal case for a blank
    /// or foreign disk).
    NoMagic,
    /// A version this code does not read.
    Version(u32),
    /// The checksum does not match: torn or corrupted metadata.
    Checksum,
    /// A name is empty, too long, or has characters outside `[A-Za-z0-9._/-]`.
    BadName,
    /// Member index, count, size or sector size make no sense.
    BadMember,
}

impl core::fmt::Display for MetaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MetaError::Truncated => write!(f, "metadata sector is too short"),
            MetaError::NoMagic => write!(f, "no metadata"),
            MetaError::Version(v) => write!(f, "metadata version {v} is not supported"),
            MetaError::Checksum => write!(f, "metadata checksum mismatch"),
            MetaError::BadName => write!(f, "metadata holds an invalid name"),
            MetaError::BadMember => write!(f, "metadata member fields are inconsistent"),
        }
    }
}

/// A read/write view of a metadata record in a byte buffer.
#[derive(Debug, Clone)]
pub struct Meta<T: AsRef<[u8]>> {
    buffer: T,
}

/// The little-endian u32 at the start of `b`.
pub(crate) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The little-endian u64 at the start of `b`.
pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl<T: AsRef<[u8]>> Meta<T> {
    /// Wraps a buffer without checking its length; accessors may panic on
    /// a short buffer until [`Meta::check_len`] passed.
    pub const fn new_unchecked(buffer: T) -> Meta<T> {
        Meta { buffer }
    }

    /// Wraps a buffer after checking it is long enough for every field.
    pub fn new_checked(buffer: T) -> Result<Meta<T>, MetaError> {
        let m = Meta::new_unchecked(buffer);
        m.check_len()?;
        Ok(m)
    }

    /// Checks the buffer holds a whole record; after this no accessor panics.
    pub fn check_len(&self) -> Result<(), MetaError> {
        if self.buffer.as_ref().len() < META_LEN {
            Err(MetaError::Truncated)
        } else {
            Ok(())
        }
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The magic bytes.
    pub fn magic(&self) -> &[u8] {
        &self.b()[field::MAGIC]
    }

    /// The format version.
    pub fn version(&self) -> u32 {
        le32(&self.b()[field::VERSION])
    }

    /// Class-defined flags.
    pub fn flags(&self) -> u32 {
        le32(&self.b()[field::FLAGS])
    }

    /// The class name field, NUL padding included.
    pub fn class_raw(&self) -> &[u8] {
        &self.b()[field::CLASS]
    }

    /// The geom name field, NUL padding included.
    pub fn name_raw(&self) -> &[u8] {
        &self.b()[field::NAME]
    }

    /// The geom's unique id.
    pub fn id(&self) -> u64 {
        le64(&self.b()[field::ID])
    }

    /// The metadata generation.
    pub fn generation(&self) -> u64 {
        le64(&self.b()[field::GENERATION])
    }

    /// This member's index.
    pub fn member_index(&self) -> u32 {
        le32(&self.b()[field::INDEX])
    }

    /// Number of members of the geom.
    pub fn member_count(&self) -> u32 {
        le32(&self.b()[field::COUNT])
    }

    /// Media size of the member provider when it was labelled, bytes.
    pub fn member_size(&self) -> u64 {
        le64(&self.b()[field::SIZE])
    }

    /// Sector size of the member provider when it was labelled.
    pub fn sector_size(&self) -> u32 {
        le32(&self.b()[field::SECTOR])
    }

    /// The reserved word (zero in version 1).
    pub fn reserved(&self) -> u32 {
        le32(&self.b()[field::RESERVED])
    }

    /// Class parameter word `i` (`i < PARAMS`).
    pub fn param(&self, i: usize) -> u64 {
        let at = field::PARAMS + 8 * i;
        le64(&self.b()[at..at + 8])
    }

    /// The stored checksum.
    pub fn checksum(&self) -> u32 {
        le32(&self.b()[field::CRC])
    }

    /// The checksum the record's contents call for.
    pub fn compute_checksum(&self) -> u32 {
        crc32fast::hash(&self.b()[..field::CRC.start])
    }

    /// The class-defined tail: the bytes after the record, as far as the
    /// buffer reaches (at most [`TAIL_LEN`]).
    pub fn tail(&self) -> &[u8] {
        let b = self.b();
        &b[field::TAIL.start..b.len().min(field::TAIL.end)]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Meta<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    fn put(&mut self, r: core::ops::Range<usize>, v: &[u8]) {
        self.bm()[r].copy_from_slice(v);
    }

    /// Writes the magic.
    pub fn set_magic(&mut self) {
        self.put(field::MAGIC, &MAGIC);
    }

    /// Sets the version.
    pub fn set_version(&mut self, v: u32) {
        self.put(field::VERSION, &v.to_le_bytes());
    }

    /// Sets the flags.
    pub fn set_flags(&mut self, v: u32) {
        self.put(field::FLAGS, &v.to_le_bytes());
    }

    /// Sets a NUL-padded text field; `text` must fit.
    fn set_text(&mut self, r: core::ops::Range<usize>, text: &str) {
        let dst = &mut self.bm()[r];
        dst.fill(0);
        dst[..text.len()].copy_from_slice(text.as_bytes());
    }

    /// Sets the class name (at most [`CLASS_LEN`] bytes).
    pub fn set_class(&mut self, name: &str) {
        self.set_text(field::CLASS, name);
    }

    /// Sets the geom name (at most [`NAME_LEN`] bytes).
    pub fn set_name(&mut self, name: &str) {
        self.set_text(field::NAME, name);
    }

    /// Sets the id.
    pub fn set_id(&mut self, v: u64) {
        self.put(field::ID, &v.to_le_bytes());
    }

    /// Sets the generation.
    pub fn set_generation(&mut self, v: u64) {
        self.put(field::GENERATION, &v.to_le_bytes());
    }

    /// Sets the member index.
    pub fn set_member_index(&mut self, v: u32) {
        self.put(field::INDEX, &v.to_le_bytes());
    }

    /// Sets the member count.
    pub fn set_member_count(&mut self, v: u32) {
        self.put(field::COUNT, &v.to_le_bytes());
    }

    /// Sets the member size.
    pub fn set_member_size(&mut self, v: u64) {
        self.put(field::SIZE, &v.to_le_bytes());
    }

    /// Sets the member sector size.
    pub fn set_sector_size(&mut self, v: u32) {
        self.put(field::SECTOR, &v.to_le_bytes());
    }

    /// Clears the reserved word.
    pub fn clear_reserved(&mut self) {
        self.put(field::RESERVED, &[0; 4]);
    }

    /// Sets class parameter word `i` (`i < PARAMS`).
    pub fn set_param(&mut self, i: usize, v: u64) {
        let at = field::PARAMS + 8 * i;
        self.put(at..at + 8, &v.to_le_bytes());
    }

    /// Writes the tail, as much of it as the buffer holds.
    pub fn set_tail(&mut self, tail: &[u8; TAIL_LEN]) {
        let end = self.bm().len().min(field::TAIL.end);
        let n = end - field::TAIL.start;
        self.bm()[field::TAIL.start..end].copy_from_slice(&tail[..n]);
    }

    /// Stores the checksum of the record's current contents.
    pub fn fill_checksum(&mut self) {
        let c = self.compute_checksum();
        self.put(field::CRC, &c.to_le_bytes());
    }
}

/// True for names the config language accepts: 1–`max` bytes of
/// `[A-Za-z0-9._/-]`.
fn valid_name(s: &[u8], max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// The text of a NUL-padded field: bytes up to the first NUL, which must
/// be followed by NULs only.
fn text_field(raw: &[u8], max: usize) -> Result<String, MetaError> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if raw[end..].iter().any(|&b| b != 0) || !valid_name(&raw[..end], max) {
        return Err(MetaError::BadName);
    }
    // Checked above: ASCII only.
    Ok(raw[..end].iter().map(|&b| b as char).collect())
}

/// One member's metadata, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRepr {
    /// The class the geom belongs to.
    pub class: String,
    /// The geom's name (its provider is `class/name` for concat, stripe, mirror).
    pub name: String,
    /// Unique id, so two geoms labelled with the same name are told apart.
    pub id: u64,
    /// Bumped by classes that rewrite metadata (mirror: on each change of
    /// membership); the highest generation among members is current.
    pub generation: u64,
    /// This member's place, `0..member_count`.
    pub member_index: u32,
    /// Number of members.
    pub member_count: u32,
    /// Media size of the member provider at label time (a provider whose
    /// size changed since is not trusted).
    pub member_size: u64,
    /// Sector size of the member provider at label time.
    pub sector_size: u32,
    /// Class-defined flags.
    pub flags: u32,
    /// Class-defined parameters (stripe: `params[0]` = stripe size).
    pub params: [u64; PARAMS],
    /// Class-defined bytes after the record (zero when the sector read
    /// was shorter); not covered by the record's checksum.
    pub tail: [u8; TAIL_LEN],
}

impl MetaRepr {
    /// Reads and validates the record in `view`.
    pub fn parse<T: AsRef<[u8]>>(view: &Meta<T>) -> Result<MetaRepr, MetaError> {
        view.check_len()?;
        if view.magic() != MAGIC {
            return Err(MetaError::NoMagic);
        }
        if view.version() != VERSION {
            return Err(MetaError::Version(view.version()));
        }
        if view.checksum() != view.compute_checksum() {
            return Err(MetaError::Checksum);
        }
        let class = text_field(view.class_raw(), CLASS_LEN)?;
        let name = text_field(view.name_raw(), NAME_LEN)?;
        let sector = view.sector_size();
        let count = view.member_count();
        let size = view.member_size();
        if count == 0
            || view.member_index() >= count
            || !sector.is_power_of_two()
            || !(512..=65536).contains(&sector)
            || size < 2 * u64::from(sector)
            || !size.is_multiple_of(u64::from(sector))
        {
            return Err(MetaError::BadMember);
        }
        let mut params = [0u64; PARAMS];
        for (i, p) in params.iter_mut().enumerate() {
            *p = view.param(i);
        }
        let mut tail = [0u8; TAIL_LEN];
        let t = view.tail();
        tail[..t.len()].copy_from_slice(t);
        Ok(MetaRepr {
            class,
            name,
            id: view.id(),
            generation: view.generation(),
            member_index: view.member_index(),
            member_count: count,
            member_size: size,
            sector_size: sector,
            flags: view.flags(),
            params,
            tail,
        })
    }

    /// Checks the names fit their fields, so [`MetaRepr::emit`] writes a
    /// record that [`MetaRepr::parse`] reads back.
    pub fn check(&self) -> Result<(), MetaError> {
        if !valid_name(self.class.as_bytes(), CLASS_LEN)
            || !valid_name(self.name.as_bytes(), NAME_LEN)
        {
            return Err(MetaError::BadName);
        }
        Ok(())
    }

    /// Writes the record into `view`, checksum last.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, view: &mut Meta<T>) -> Result<(), MetaError> {
        view.check_len()?;
        self.check()?;
        view.set_magic();
        view.set_version(VERSION);
        view.set_flags(self.flags);
        view.set_class(&self.class);
        view.set_name(&self.name);
        view.set_id(self.id);
        view.set_generation(self.generation);
        view.set_member_index(self.member_index);
        view.set_member_count(self.member_count);
        view.set_member_size(self.member_size);
        view.set_sector_size(self.sector_size);
        view.clear_reserved();
        for (i, &p) in self.params.iter().enumerate() {
            view.set_param(i, p);
        }
        view.fill_checksum();
        view.set_tail(&self.tail);
        Ok(())
    }

    /// Parses the record at the start of a sector's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<MetaRepr, MetaError> {
        MetaRepr::parse(&Meta::new_checked(bytes)?)
    }

    /// A whole sector of `sector_size` bytes holding the record, zero-padded.
    pub fn to_sector(&self, sector_size: usize) -> Result<Vec<u8>, MetaError> {
        let mut buf = vec![0u8; sector_size.max(META_LEN)];
        self.emit(&mut Meta::new_unchecked(&mut buf[..]))?;
        buf.truncate(sector_size.max(META_LEN));
        Ok(buf)
    }

    /// Byte offset of the metadata sector on a member of this size.
    pub fn sector_offset(media_size: u64, sector_size: u32) -> u64 {
        media_size - u64::from(sector_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> MetaRepr {
        MetaRepr {
            class: "stripe".into(),
            name: "st0".into(),
            id: 0x0102_0304_0506_0708,
            generation: 3,
            member_index: 1,
            member_count: 2,
            member_size: 1 << 20,
            sector_size: 512,
            flags: 0xa5,
            params: [65536, 0, 0, 0, 0, 0, 0, 0x1122_3344_5566_7788],
            tail: [0; TAIL_LEN],
        }
    }

    /// The record of [`sample`], written out by hand from the layout table.
    fn sample_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"STRATA-GEOM-META");
        b.extend_from_slice(&[1, 0, 0, 0]);
        b.extend_from_slice(&[0xa5, 0, 0, 0]);
        let mut class = [0u8; 16];
        class[..6].copy_from_slice(b"stripe");
        b.extend_from_slice(&class);
        let mut name = [0u8; 64];
        name[..3].copy_from_slice(b"st0");
        b.extend_from_slice(&name);
        b.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        b.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[1, 0, 0, 0]);
        b.extend_from_slice(&[2, 0, 0, 0]);
        b.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 2, 0, 0]);
        b.extend_from_slice(&[0, 0, 0, 0]);
        b.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0; 48]);
        b.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(b.len(), 208);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn emit_matches_the_layout_table() {
        let s = sample().to_sector(512).unwrap();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[..META_LEN], &sample_bytes()[..]);
        assert!(s[META_LEN..].iter().all(|&b| b == 0));
    }

    #[test]
    fn parse_reads_the_layout_table() {
        assert_eq!(MetaRepr::from_bytes(&sample_bytes()), Ok(sample()));
        let view = Meta::new_checked(sample_bytes()).unwrap();
        assert_eq!(view.member_index(), 1);
        assert_eq!(view.param(0), 65536);
        assert_eq!(view.checksum(), view.compute_checksum());
    }

    #[test]
    fn round_trip_in_a_4k_sector() {
        let s = sample().to_sector(4096).unwrap();
        assert_eq!(s.len(), 4096);
        assert_eq!(MetaRepr::from_bytes(&s), Ok(sample()));
    }

    #[test]
    fn blank_and_short_sectors_are_not_metadata() {
        assert_eq!(MetaRepr::from_bytes(&[0; 512]), Err(MetaError::NoMagic));
        assert_eq!(MetaRepr::from_bytes(&[0; 100]), Err(MetaError::Truncated));
        let s = sample().to_sector(512).unwrap();
        assert_eq!(
            MetaRepr::from_bytes(&s[..META_LEN - 1]),
            Err(MetaError::Truncated)
        );
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let good = sample_bytes();
        for byte in 0..META_LEN {
            for bit in 0..8 {
                let mut b = good.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    MetaRepr::from_bytes(&b).is_err(),
                    "flip of byte {byte} bit {bit} was accepted"
                );
            }
        }
    }

    #[test]
    fn the_tail_follows_the_record_uncovered_by_its_checksum() {
        let mut r = sample();
        for (i, b) in r.tail.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(7) ^ 0x5a;
        }
        let s = r.to_sector(512).unwrap();
        // The record's bytes are those of the layout table, whatever the
        // tail holds; the tail fills bytes 212..512.
        assert_eq!(&s[..META_LEN], &sample_bytes()[..]);
        assert_eq!(&s[META_LEN..], &r.tail[..]);
        assert_eq!(MetaRepr::from_bytes(&s), Ok(r.clone()));
        // In a 4K sector the tail ends at byte 512 and zeroes follow.
        let big = r.to_sector(4096).unwrap();
        assert_eq!(&big[..512], &s[..]);
        assert!(big[512..].iter().all(|&b| b == 0));
        assert_eq!(MetaRepr::from_bytes(&big), Ok(r.clone()));
        // A flipped tail bit leaves the record valid: the tail is the
        // class's to check (mirror carries its own crc there).
        for byte in [META_LEN, META_LEN + 100, 511] {
            let mut b = s.clone();
            b[byte] ^= 0x10;
            let got = MetaRepr::from_bytes(&b).unwrap();
            assert_eq!(got.tail[byte - META_LEN], r.tail[byte - META_LEN] ^ 0x10);
        }
        // A buffer that ends with the record reads as an all-zero tail.
        assert_eq!(
            MetaRepr::from_bytes(&s[..META_LEN]).unwrap().tail,
            [0; TAIL_LEN]
        );
    }

    /// Rewrites a field and fixes the checksum, so only the field check can
    /// reject the record.
    fn with(f: impl FnOnce(&mut Meta<&mut [u8]>)) -> Result<MetaRepr, MetaError> {
        let mut b = sample_bytes();
        let mut v = Meta::new_unchecked(&mut b[..]);
        f(&mut v);
        v.fill_checksum();
        MetaRepr::from_bytes(&b)
    }

    #[test]
    fn inconsistent_fields_are_rejected_even_with_a_good_checksum() {
        assert_eq!(with(|v| v.set_version(2)), Err(MetaError::Version(2)));
        assert_eq!(with(|v| v.set_member_index(2)), Err(MetaError::BadMember));
        assert_eq!(with(|v| v.set_member_count(0)), Err(MetaError::BadMember));
        assert_eq!(with(|v| v.set_sector_size(1000)), Err(MetaError::BadMember));
        assert_eq!(with(|v| v.set_member_size(512)), Err(MetaError::BadMember));
        assert_eq!(with(|v| v.set_member_size(1001)), Err(MetaError::BadMember));
        assert_eq!(with(|v| v.set_class("")), Err(MetaError::BadName));
        assert_eq!(with(|v| v.set_name("a b")), Err(MetaError::BadName));
        // Text after the NUL padding starts.
        assert_eq!(
            with(|v| v.bm()[field::NAME.start + 10] = b'x'),
            Err(MetaError::BadName)
        );
    }

    #[test]
    fn emit_refuses_names_that_do_not_fit() {
        let mut r = sample();
        r.class = "a-class-name-too-long".into();
        assert_eq!(r.to_sector(512), Err(MetaError::BadName));
        let mut r = sample();
        r.name = "x".repeat(65);
        assert_eq!(r.to_sector(512), Err(MetaError::BadName));
        r.name = "x".repeat(64);
        let s = r.to_sector(512).unwrap();
        assert_eq!(MetaRepr::from_bytes(&s).unwrap().name.len(), 64);
    }

    #[test]
    fn the_fuzz_seed_corpus_is_what_it_claims() {
        let stripe = include_bytes!("../fuzz/corpus/meta_parse/stripe-member");
        let mut want = sample();
        (want.generation, want.flags) = (0, 0);
        want.member_size = 1 << 20;
        want.params = [65536, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(MetaRepr::from_bytes(stripe), Ok(want));
        let mirror = MetaRepr::from_bytes(include_bytes!("../fuzz/corpus/meta_parse/mirror-4k"));
        assert_eq!(
            mirror.map(|m| (m.member_count, m.sector_size)),
            Ok((3, 4096))
        );
        let blank = include_bytes!("../fuzz/corpus/meta_parse/blank");
        assert_eq!(MetaRepr::from_bytes(blank), Err(MetaError::NoMagic));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The bounded stand-in for the fuzz target: any bytes either
        /// parse into a record that emits back to the same bytes, or are
        /// refused with an error; nothing panics.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(r) = MetaRepr::from_bytes(&bytes) {
                let again = r.to_sector(META_LEN).unwrap();
                prop_assert_eq!(&again[..META_LEN], &bytes[..META_LEN]);
            }
        }

        /// Valid-looking records with random fields survive a round trip.
        #[test]
        fn round_trip(id in any::<u64>(), generation in any::<u64>(), count in 1u32..64,
                      idx in any::<u32>(), sectors in 2u64..1 << 40, shift in 9u32..13,
                      flags in any::<u32>(), p0 in any::<u64>(), name in "[a-z0-9._/-]{1,64}",
                      tail in proptest::collection::vec(any::<u8>(), TAIL_LEN)) {
            let mut t = [0u8; TAIL_LEN];
            t.copy_from_slice(&tail);
            let r = MetaRepr {
                class: "concat".into(), name, id, generation,
                member_index: idx % count, member_count: count,
                member_size: sectors << shift, sector_size: 1 << shift,
                flags, params: [p0, 1, 2, 3, 4, 5, 6, 7], tail: t,
            };
            let s = r.to_sector(4096).unwrap();
            prop_assert_eq!(MetaRepr::from_bytes(&s), Ok(r));
        }

        /// Random bytes with the magic, version and a correct checksum get
        /// past the cheap checks and exercise the field checks.
        #[test]
        fn structured_garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), META_LEN..META_LEN + 8)) {
            let mut v = Meta::new_unchecked(&mut bytes[..]);
            v.set_magic();
            v.set_version(VERSION);
            v.fill_checksum();
            let _ = MetaRepr::from_bytes(&bytes);
        }
    }
}
