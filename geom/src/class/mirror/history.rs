//! The identity of a member's history, and the mirror's record in the
//! metadata tail ([`crate::meta::MetaRepr::tail`]): the history and the
//! write-intent bitmap, with their own checksum.
//!
//! A history is a chain of epochs. An epoch is a random id (from the
//! stack's seeded generator, mixed with the mirror's state) and the
//! generation it began at. A new epoch begins with the first write after
//! the set of members holding the data shrank (a member dropped, removed,
//! or rebuilt) or after an assembly that was not complete; the old head
//! moves into the lineage, the last [`LINEAGE`] epochs newest first.
//!
//! ```text
//!  boot 1 {d1,d2}: e1 ─┬─ boot 2 {d1} writes B ──▶ d1: e2  lineage [e1]
//!                      └─ boot 3 {d2} writes nothing ─▶ d2: e1 (generation bumped)
//!  boot 4 {d1,d2}: d1 knows e1 ─▶ d2 is an ancestor: resynchronized from d1
//!  had boot 3 written C: d2: e3 [e1] ─▶ neither knows the other's head:
//!                        conflicting histories, the mirror is refused
//! ```
//!
//! Two records relate ([`relate`]) as follows: with the same head epoch
//! the lower generation is older (it missed a membership change: stale),
//! equal ones are the same history; a record whose head is in the other's
//! lineage is older; a head that began before the oldest epoch the other
//! remembers is presumed older (the lineage is short); anything else is a
//! conflict: each side may hold writes the other lacks. Epoch id 0 is the
//! history of records written before the tail existed, an ancestor of
//! every other.
//!
//! The tail, offsets within it (sector offset = 212 + offset), little-endian:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "MIRH"
//!      4     1  version (1)
//!      5     1  region shift: log2 of the bytes of a bitmap region
//!      6     2  regions in use (the mirror's media size in regions)
//!      8     8  head epoch id (non-zero)
//!     16     8  generation the head epoch began at
//!     24    96  lineage: 6 × (epoch id, generation it began at), newest
//!               first; id 0 marks an empty slot (the rest are empty too)
//!    120   176  write-intent bitmap: region r is bit r % 8 of byte r / 8
//!    296     4  crc32 (IEEE) of tail bytes 0..296
//! ```
//!
//! An all-zero tail is a record from before the tail existed: epoch 0, no
//! lineage, a clean bitmap.

use crate::meta::TAIL_LEN;

/// Epochs kept in the lineage.
pub const LINEAGE: usize = 6;
/// Bytes of the write-intent bitmap.
pub const BITMAP_BYTES: usize = 176;
/// Regions the bitmap can describe.
pub const BITMAP_BITS: usize = BITMAP_BYTES * 8;
/// The smallest region: 64 KiB (small mirrors do not pay a metadata write
/// per few sectors).
pub const MIN_REGION_SHIFT: u8 = 16;
/// The tail's magic.
pub const TAIL_MAGIC: [u8; 4] = *b"MIRH";
/// The tail format this code writes and reads.
pub const TAIL_VERSION: u8 = 1;

mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const SHIFT: usize = 5;
    pub const REGIONS: Range<usize> = 6..8;
    pub const EPOCH: Range<usize> = 8..16;
    pub const SINCE: Range<usize> = 16..24;
    pub const LINEAGE: usize = 24;
    pub const BITMAP: Range<usize> = 120..296;
    pub const CRC: Range<usize> = 296..300;
}

const _: () = assert!(field::LINEAGE + 16 * LINEAGE == field::BITMAP.start);
const _: () = assert!(field::CRC.end == TAIL_LEN);

/// One step of a history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    /// Random id; 0 only for the history before tails existed.
    pub id: u64,
    /// The generation the epoch began at.
    pub since: u64,
}

/// A member's history: its head epoch and the ones before it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The epoch the member's data belongs to.
    pub head: Epoch,
    /// Earlier epochs, newest first; unused slots have id 0.
    pub lineage: [Epoch; LINEAGE],
}

impl History {
    /// A history that begins with `head`.
    pub fn new(head: Epoch) -> History {
        History {
            head,
            lineage: [Epoch::default(); LINEAGE],
        }
    }

    /// True when epoch `id` is this history's head or in its lineage (the
    /// epoch before tails existed is in every history).
    pub fn knows(&self, id: u64) -> bool {
        id == 0 || self.head.id == id || self.past().any(|e| e.id == id)
    }

    /// The remembered epochs before the head, newest first.
    pub fn past(&self) -> impl Iterator<Item = &Epoch> {
        self.lineage.iter().take_while(|e| e.id != 0)
    }

    /// The generation the oldest remembered epoch began at, when the
    /// lineage is full (older epochs were forgotten); `None` when it
    /// reaches back to the label.
    pub fn window_start(&self) -> Option<u64> {
        let last = self.lineage[LINEAGE - 1];
        (last.id != 0).then_some(last.since)
    }

    /// Begins epoch `next`: the head moves into the lineage (the epoch
    /// before tails existed is implied and not kept).
    pub fn advance(&mut self, next: Epoch) {
        if self.head.id != 0 {
            self.lineage.copy_within(0..LINEAGE - 1, 1);
            self.lineage[0] = self.head;
        }
        self.head = next;
    }
}

/// How one record's history relates to another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// The same history and generation.
    Same,
    /// An ancestor of the other: stale.
    Older,
    /// The other is an ancestor of this one.
    Newer,
    /// Each may hold writes the other lacks.
    Conflict,
}

/// How history `a` at generation `ag` relates to history `b` at `bg`.
pub fn relate(a: &History, ag: u64, b: &History, bg: u64) -> Relation {
    if a.head.id == b.head.id {
        return match ag.cmp(&bg) {
            core::cmp::Ordering::Less => Relation::Older,
            core::cmp::Ordering::Greater => Relation::Newer,
            core::cmp::Ordering::Equal => Relation::Same,
        };
    }
    if b.knows(a.head.id) {
        Relation::Older
    } else if a.knows(b.head.id) {
        Relation::Newer
    } else if b.window_start().is_some_and(|w| a.head.since < w) {
        // Began before anything `b` remembers: presumed an ancestor.
        Relation::Older
    } else if a.window_start().is_some_and(|w| b.head.since < w) {
        Relation::Newer
    } else {
        Relation::Conflict
    }
}

/// The region shift for a mirror of `media_size` bytes: the smallest
/// (at least [`MIN_REGION_SHIFT`]) whose regions fit the bitmap.
pub fn region_shift_for(media_size: u64) -> u8 {
    let mut shift = MIN_REGION_SHIFT;
    while regions_for(media_size, shift) > BITMAP_BITS as u64 {
        shift += 1;
    }
    shift
}

/// Regions of `1 << shift` bytes covering `media_size`.
pub fn regions_for(media_size: u64, shift: u8) -> u64 {
    media_size.div_ceil(1u64 << shift)
}

/// Why a tail does not hold a mirror record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailError {
    /// Neither zero nor the mirror's magic.
    Magic,
    /// A version this code does not read.
    Version(u8),
    /// The checksum does not match.
    Checksum,
    /// A field is out of range (region shift or count, an empty head, a
    /// lineage with holes, bitmap bits past the last region).
    Field,
}

impl core::fmt::Display for TailError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TailError::Magic => write!(f, "the history record has no magic"),
            TailError::Version(v) => write!(f, "history record version {v} is not supported"),
            TailError::Checksum => write!(f, "the history record's checksum does not match"),
            TailError::Field => write!(f, "the history record holds an impossible field"),
        }
    }
}

/// The mirror's record in the tail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tail {
    /// The member's history.
    pub history: History,
    /// log2 of a bitmap region's bytes.
    pub region_shift: u8,
    /// Regions in use.
    pub regions: u16,
    /// The write-intent bitmap.
    pub bitmap: [u8; BITMAP_BYTES],
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Tail {
    /// Reads the record in `t`: `None` for an all-zero tail (a record from
    /// before the tail existed).
    pub fn parse(t: &[u8; TAIL_LEN]) -> Result<Option<Tail>, TailError> {
        if t.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if t[field::MAGIC] != TAIL_MAGIC {
            return Err(TailError::Magic);
        }
        if t[field::VERSION] != TAIL_VERSION {
            return Err(TailError::Version(t[field::VERSION]));
        }
        let crc = u32::from_le_bytes([t[296], t[297], t[298], t[299]]);
        if crc != crc32fast::hash(&t[..field::CRC.start]) {
            return Err(TailError::Checksum);
        }
        let region_shift = t[field::SHIFT];
        let regions = u16::from_le_bytes([t[6], t[7]]);
        if !(9..=62).contains(&region_shift)
            || regions == 0
            || usize::from(regions) > BITMAP_BITS
        {
            return Err(TailError::Field);
        }
        let head = Epoch {
            id: le64(&t[field::EPOCH]),
            since: le64(&t[field::SINCE]),
        };
        if head.id == 0 {
            return Err(TailError::Field);
        }
        let mut lineage = [Epoch::default(); LINEAGE];
        let mut ended = false;
        for (i, e) in lineage.iter_mut().enumerate() {
            let at = field::LINEAGE + 16 * i;
            *e = Epoch {
                id: le64(&t[at..]),
                since: le64(&t[at + 8..]),
            };
            if ended && (e.id != 0 || e.since != 0) {
                return Err(TailError::Field);
            }
            ended |= e.id == 0;
            if e.id == 0 && e.since != 0 {
                return Err(TailError::Field);
            }
        }
        let mut bitmap = [0u8; BITMAP_BYTES];
        bitmap.copy_from_slice(&t[field::BITMAP]);
        let used = usize::from(regions);
        if (used..BITMAP_BITS).any(|r| bitmap[r / 8] & (1 << (r % 8)) != 0) {
            return Err(TailError::Field);
        }
        Ok(Some(Tail {
            history: History { head, lineage },
            region_shift,
            regions,
            bitmap,
        }))
    }

    /// The tail's bytes, checksum last.
    pub fn emit(&self) -> [u8; TAIL_LEN] {
        let mut t = [0u8; TAIL_LEN];
        t[field::MAGIC].copy_from_slice(&TAIL_MAGIC);
        t[field::VERSION] = TAIL_VERSION;
        t[field::SHIFT] = self.region_shift;
        t[field::REGIONS].copy_from_slice(&self.regions.to_le_bytes());
        t[field::EPOCH].copy_from_slice(&self.history.head.id.to_le_bytes());
        t[field::SINCE].copy_from_slice(&self.history.head.since.to_le_bytes());
        for (i, e) in self.history.lineage.iter().enumerate() {
            let at = field::LINEAGE + 16 * i;
            t[at..at + 8].copy_from_slice(&e.id.to_le_bytes());
            t[at + 8..at + 16].copy_from_slice(&e.since.to_le_bytes());
        }
        t[field::BITMAP].copy_from_slice(&self.bitmap);
        let crc = crc32fast::hash(&t[..field::CRC.start]);
        t[field::CRC].copy_from_slice(&crc.to_le_bytes());
        t
    }

    /// True when region `r` is marked dirty.
    pub fn dirty(&self, r: usize) -> bool {
        r < BITMAP_BITS && self.bitmap[r / 8] & (1 << (r % 8)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn sample() -> Tail {
        let mut history = History::new(Epoch {
            id: 0x1111_2222_3333_4444,
            since: 9,
        });
        history.lineage[0] = Epoch { id: 0xabcd, since: 5 };
        history.lineage[1] = Epoch { id: 0x77, since: 1 };
        let mut bitmap = [0u8; BITMAP_BYTES];
        bitmap[0] = 0b1000_0001;
        bitmap[2] = 0x10;
        Tail {
            history,
            region_shift: 16,
            regions: 21,
            bitmap,
        }
    }

    /// [`sample`], written out by hand from the layout table.
    fn sample_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"MIRH");
        b.extend_from_slice(&[1, 16, 21, 0]);
        b.extend_from_slice(&[0x44, 0x44, 0x33, 0x33, 0x22, 0x22, 0x11, 0x11]);
        b.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xcd, 0xab, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0x77, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0; 64]);
        let mut bitmap = [0u8; BITMAP_BYTES];
        bitmap[0] = 0x81;
        bitmap[2] = 0x10;
        b.extend_from_slice(&bitmap);
        assert_eq!(b.len(), 296);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn emit_and_parse_follow_the_layout_table() {
        let t = sample().emit();
        assert_eq!(&t[..], &sample_bytes()[..]);
        assert_eq!(Tail::parse(&t), Ok(Some(sample())));
        let s = sample();
        assert!(s.dirty(0) && s.dirty(7) && s.dirty(20));
        assert!(!s.dirty(1) && !s.dirty(19) && !s.dirty(21));
    }

    #[test]
    fn a_zero_tail_is_a_record_from_before_tails() {
        assert_eq!(Tail::parse(&[0; TAIL_LEN]), Ok(None));
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let good = sample().emit();
        for byte in 0..TAIL_LEN {
            for bit in 0..8 {
                let mut b = good;
                b[byte] ^= 1 << bit;
                assert!(
                    Tail::parse(&b).is_err(),
                    "flip of byte {byte} bit {bit} was accepted"
                );
            }
        }
    }

    /// Rewrites bytes and fixes the checksum, so only the field checks can
    /// refuse the record.
    fn with(f: impl FnOnce(&mut [u8; TAIL_LEN])) -> Result<Option<Tail>, TailError> {
        let mut t = sample().emit();
        f(&mut t);
        let crc = crc32fast::hash(&t[..296]);
        t[296..].copy_from_slice(&crc.to_le_bytes());
        Tail::parse(&t)
    }

    #[test]
    fn impossible_fields_are_refused_even_with_a_good_checksum() {
        assert_eq!(with(|t| t[4] = 2), Err(TailError::Version(2)));
        assert_eq!(with(|t| t[0] = b'X'), Err(TailError::Magic));
        assert_eq!(with(|t| t[5] = 8), Err(TailError::Field));
        assert_eq!(with(|t| t[6..8].fill(0)), Err(TailError::Field));
        assert_eq!(with(|t| t[6..8].copy_from_slice(&2000u16.to_le_bytes())), Err(TailError::Field));
        assert_eq!(with(|t| t[8..16].fill(0)), Err(TailError::Field));
        // A lineage entry after an empty slot.
        assert_eq!(with(|t| t[24 + 16 * 3] = 1), Err(TailError::Field));
        // A bit past the last region.
        assert_eq!(with(|t| t[120 + 2] |= 0x20), Err(TailError::Field));
    }

    #[test]
    fn relations_follow_the_lineage() {
        let e = |id, since| Epoch { id, since };
        let base = History::new(e(1, 1));
        let mut d1 = base.clone();
        d1.advance(e(2, 2));
        // The same head: generations order them.
        assert_eq!(relate(&base, 2, &base, 2), Relation::Same);
        assert_eq!(relate(&base, 1, &base, 2), Relation::Older);
        assert_eq!(relate(&base, 3, &base, 2), Relation::Newer);
        // An ancestor, whatever its generation.
        assert_eq!(relate(&base, 7, &d1, 2), Relation::Older);
        assert_eq!(relate(&d1, 2, &base, 7), Relation::Newer);
        // Two branches of the same ancestor.
        let mut d2 = base.clone();
        d2.advance(e(3, 2));
        assert_eq!(relate(&d1, 2, &d2, 2), Relation::Conflict);
        // Several steps back.
        let mut far = d1.clone();
        for k in 0..4 {
            far.advance(e(10 + k, 3 + k));
        }
        assert_eq!(relate(&base, 1, &far, 6), Relation::Older);
        assert_eq!(relate(&d2, 2, &far, 6), Relation::Conflict);
        // Beyond the window: a head that began before the oldest epoch
        // remembered is presumed older; one that began after is not.
        for k in 4..12 {
            far.advance(e(10 + k, 3 + k));
        }
        assert!(!far.knows(1) || far.head.id == 1);
        assert_eq!(far.window_start(), Some(far.lineage[LINEAGE - 1].since));
        assert_eq!(relate(&base, 1, &far, 20), Relation::Older);
        let late = History::new(e(99, far.lineage[LINEAGE - 1].since + 1));
        assert_eq!(relate(&late, 20, &far, 20), Relation::Conflict);
        // Records from before tails are everybody's ancestors.
        assert_eq!(relate(&History::default(), 4, &base, 1), Relation::Older);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any bytes are either refused or a record that emits back to
        /// the same bytes; nothing panics.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), TAIL_LEN)) {
            let mut t = [0u8; TAIL_LEN];
            t.copy_from_slice(&bytes);
            if let Ok(Some(r)) = Tail::parse(&t) {
                prop_assert_eq!(&r.emit()[..], &t[..]);
            }
            // With the magic, version and checksum right, the field checks run.
            t[..4].copy_from_slice(&TAIL_MAGIC);
            t[4] = TAIL_VERSION;
            let crc = crc32fast::hash(&t[..296]);
            t[296..].copy_from_slice(&crc.to_le_bytes());
            if let Ok(Some(r)) = Tail::parse(&t) {
                prop_assert_eq!(&r.emit()[..], &t[..]);
            }
        }
    }
}
