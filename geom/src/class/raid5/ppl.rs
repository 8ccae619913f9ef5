//! The partial parity log (after Linux md's PPL): before a write changes
//! a row, the partial parity of the row's columns it touches is logged on
//! the row's parity member, so that after a power cut the row's parity
//! can be made to match whatever its data members hold, without a resync
//! and without trusting the parity on disk.
//!
//! For a byte `x` of the touched columns, with `W(x)` the data members
//! the write puts new bytes on at `x`:
//!
//! ```text
//!   pp[x]     = XOR of the data at x that the write does not put on disk
//!               (members outside W(x), as they hold after the write; a
//!               missing member: the bytes it would hold)
//!   parity[x] = pp[x] XOR (data on disk at x of the members in W(x))
//! ```
//!
//! The second line holds whatever of the write reached the disks, so
//! replaying an entry never makes parity wrong. An entry is one slot: a
//! header page and the partial parity of the columns (omitted for a
//! full-row write, whose partial parity is zero).
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 16 | magic `STRATA-R5-PPL-2\0` |
//! | 16 | 8 | array id |
//! | 24 | 8 | sequence number (1, 2, …; never reused) |
//! | 32 | 8 | watermark: every entry up to it is durable, replay none of them |
//! | 40 | 8 | row |
//! | 48 | 4 | first column |
//! | 52 | 4 | columns |
//! | 56 | 4 | flags (bit 0: partial parity follows) |
//! | 60 | 4 | data chunks (n) |
//! | 64 | 8 | columns whose parity changes (bit c: column c; the partial parity pages follow in column order) |
//! | 72 | 8·n | per data chunk: first byte and end byte (within the chunk) written to disk |
//! | 4088 | 8 | SipHash-2-4, keyed by the array id, of the header's other bytes and the partial parity (see [`start_checksum`]) |
//!
//! Sequence numbers only grow. A slot is reused only after a flush of
//! every member made its entry's writes durable, and the entry written
//! into it records the watermark: replay takes the highest watermark
//! found and replays the entries above it, in sequence order, so an
//! entry that a newer one superseded is never replayed alone.

use super::layout::COLUMN;
use alloc::vec::Vec;
use core::hash::Hasher;
use siphasher::sip::SipHasher24;

/// Magic at the start of a log entry.
pub const MAGIC: [u8; 16] = *b"STRATA-R5-PPL-2\0";
/// Flag: the entry carries partial parity.
pub const FLAG_PP: u32 = 1;
/// Most data chunks a header has room for.
pub const MAX_CHUNKS: usize = 63;

/// One log entry's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The array.
    pub id: u64,
    /// Sequence number.
    pub seq: u64,
    /// Entries up to this one are durable.
    pub watermark: u64,
    /// Row.
    pub row: u64,
    /// First column touched.
    pub col: u32,
    /// Columns touched.
    pub cols: u32,
    /// Partial parity follows.
    pub has_pp: bool,
    /// Columns whose parity changes (bit `c`); with `has_pp`, one page of
    /// partial parity per column set, in order.
    pub mask: u64,
    /// Per data chunk, the byte range written to disk within the chunk.
    pub written: Vec<(u32, u32)>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    crate::meta::le64(&b[at..])
}

fn le32(b: &[u8], at: usize) -> u32 {
    crate::meta::le32(&b[at..])
}

/// Where a header page keeps its checksum (its last eight bytes).
const SUM_AT: usize = COLUMN as usize - 8;

/// The second half of the checksum's key (the first is the array id).
const KEY: u64 = u64::from_le_bytes(*b"r5-ppl-2");

/// The checksum's state after a header page (without its checksum), keyed
/// by the array `id`: the partial parity pages are fed to it where they
/// are mapped.
///
/// A CRC will not do here. It is linear, so when every sector of the
/// partial parity carries its own CRC (as the fault campaign's sectors
/// do, and as many formats' blocks do), a torn entry that keeps the new
/// header and an older entry's last sectors passes the CRC of the whole;
/// its replay then writes the older sectors into the row's parity.
pub fn start_checksum(header: &[u8], id: u64) -> SipHasher24 {
    let mut h = SipHasher24::new_with_keys(id, KEY);
    h.write(&header[..SUM_AT]);
    h
}

/// The checksum over a header page (without its checksum) and the partial
/// parity pages, keyed by the array `id`.
pub fn checksum(header: &[u8], pp: &[&[u8]], id: u64) -> u64 {
    let mut h = start_checksum(header, id);
    for p in pp {
        h.write(p);
    }
    h.finish()
}

impl Entry {
    /// The header page (checksum left zero: see [`seal`]).
    pub fn emit(&self) -> Vec<u8> {
        let mut b = alloc::vec![0u8; COLUMN as usize];
        b[0..16].copy_from_slice(&MAGIC);
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.watermark.to_le_bytes());
        b[40..48].copy_from_slice(&self.row.to_le_bytes());
        b[48..52].copy_from_slice(&self.col.to_le_bytes());
        b[52..56].copy_from_slice(&self.cols.to_le_bytes());
        let flags = if self.has_pp { FLAG_PP } else { 0 };
        b[56..60].copy_from_slice(&flags.to_le_bytes());
        b[60..64].copy_from_slice(&(self.written.len() as u32).to_le_bytes());
        b[64..72].copy_from_slice(&self.mask.to_le_bytes());
        for (i, (s, e)) in self.written.iter().enumerate() {
            b[72 + 8 * i..76 + 8 * i].copy_from_slice(&s.to_le_bytes());
            b[76 + 8 * i..80 + 8 * i].copy_from_slice(&e.to_le_bytes());
        }
        b
    }

    /// Parses a header page for an array of `chunks` data chunks and a
    /// `unit`-byte stripe unit: `None` for anything that is not a
    /// well-formed entry (the checksum is checked by the caller, who has
    /// the partial parity).
    pub fn parse(b: &[u8], chunks: usize, unit: u64) -> Option<Entry> {
        if b.len() < COLUMN as usize || b[0..16] != MAGIC || chunks > MAX_CHUNKS {
            return None;
        }
        let flags = le32(b, 56);
        let n = le32(b, 60) as usize;
        let (col, cols) = (le32(b, 48), le32(b, 52));
        let columns = unit / COLUMN;
        if n != chunks
            || flags & !FLAG_PP != 0
            || cols == 0
            || u64::from(col) + u64::from(cols) > columns
        {
            return None;
        }
        let mask = le64(b, 64);
        let in_range = (u64::from(col)..u64::from(col) + u64::from(cols)).fold(0u64, |a, c| a | 1 << c);
        if columns > 64 || mask == 0 || mask & !in_range != 0 {
            return None;
        }
        let mut written = Vec::with_capacity(n);
        for i in 0..n {
            let (s, e) = (le32(b, 72 + 8 * i), le32(b, 76 + 8 * i));
            if s > e || u64::from(e) > unit {
                return None;
            }
            written.push((s, e));
        }
        Some(Entry {
            id: le64(b, 16),
            seq: le64(b, 24),
            watermark: le64(b, 32),
            row: le64(b, 40),
            col,
            cols,
            has_pp: flags & FLAG_PP != 0,
            mask,
            written,
        })
    }
}

/// Stores the checksum in the last eight bytes of a header page.
pub fn seal(header: &mut [u8], sum: u64) {
    header[SUM_AT..SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
}

/// The checksum a header page carries.
pub fn sealed(header: &[u8]) -> u64 {
    le64(header, SUM_AT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Entry {
        Entry {
            id: 0x1234,
            seq: 9,
            watermark: 7,
            row: 42,
            col: 1,
            cols: 3,
            has_pp: true,
            mask: 0b1110,
            written: alloc::vec![(4096, 16384), (0, 0)],
        }
    }

    #[test]
    fn emit_and_parse_agree() {
        let e = sample();
        let mut b = e.emit();
        let crc = checksum(&b, &[&[7u8; 4096]], 0x1234);
        seal(&mut b, crc);
        assert_eq!(Entry::parse(&b, 2, 65536), Some(e));
        assert_eq!(sealed(&b), crc);
        assert_eq!(&b[0..16], b"STRATA-R5-PPL-2\0");
        // Another geometry is refused.
        assert_eq!(Entry::parse(&b, 3, 65536), None);
        assert_eq!(Entry::parse(&b, 2, 8192), None);
    }

    #[test]
    fn the_checksum_covers_header_and_parity() {
        let e = sample();
        let b = e.emit();
        let pp = [1u8; 4096];
        let crc = checksum(&b, &[&pp], e.id);
        let mut b2 = b.clone();
        b2[40] ^= 1;
        assert_ne!(checksum(&b2, &[&pp], e.id), crc);
        let mut pp2 = pp;
        pp2[100] ^= 1;
        assert_ne!(checksum(&b, &[&pp2], e.id), crc);
        // Another array's entry does not pass as this one's.
        assert_ne!(checksum(&b, &[&pp], e.id + 1), crc);
    }

    /// A 512-byte sector that ends with the CRC32 of the rest of it.
    fn closed_sector(seed: u8) -> [u8; 512] {
        let mut s = [0u8; 512];
        for (i, x) in s.iter_mut().enumerate() {
            *x = seed.wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(seed | 1));
        }
        let crc = crc32fast::hash(&s[..508]);
        s[508..].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// A torn entry: the new header and the first sectors of its partial
    /// parity, then the sectors an older entry left in the slot. When every
    /// sector carries its own CRC32, a CRC32 of the whole cannot tell the
    /// two apart; the checksum must.
    #[test]
    fn a_torn_entry_over_self_checksummed_sectors_is_refused() {
        let e = sample();
        let b = e.emit();
        let page = |base: u8| -> [u8; 4096] {
            let mut p = [0u8; 4096];
            for (k, s) in p.chunks_mut(512).enumerate() {
                s.copy_from_slice(&closed_sector(base + k as u8));
            }
            p
        };
        let (new, old) = (page(1), page(100));
        let mut torn = new;
        torn[3 * 512..].copy_from_slice(&old[3 * 512..]);
        // What a CRC32 over the entry sees: no difference.
        let crc = |pp: &[u8]| {
            let mut h = crc32fast::Hasher::new();
            h.update(&b);
            h.update(pp);
            h.finalize()
        };
        assert_eq!(crc(&new), crc(&torn), "the sectors are CRC32-closed");
        assert_ne!(checksum(&b, &[&new], e.id), checksum(&b, &[&torn], e.id));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 4096), n in 0usize..70) {
            let mut b = bytes;
            b[0..16].copy_from_slice(&MAGIC);
            let _ = Entry::parse(&b, n, 65536);
        }
    }
}
