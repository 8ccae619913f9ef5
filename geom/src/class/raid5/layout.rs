//! Where raid5's bytes live (left-symmetric, as Linux md's default), and
//! the parity arithmetic on pages.
//!
//! ```text
//!            member 0   member 1   member 2   member 3
//!   row 0:     D0         D1         D2         P        parity on n-1-(row mod n),
//!   row 1:     D4         D5         P          D3       data chunk k of a row on
//!   row 2:     D8         P          D6         D7       (parity + 1 + k) mod n
//!   row 3:     P          D9         D10        D11
//!   ─────────────────────────────────────────────────
//!   [0, rows·U)            data area: row r at r·U on every member
//!   [rows·U, +slots·(4K+U)) partial parity log (`ppl`)
//!   last sector             metadata
//! ```
//!
//! A row is cut into 4 KiB columns: the stripe cache's blocks, and the
//! unit parity is computed in. Every helper here maps each page it reads
//! or writes once per call and counts it.

use crate::page::{DataCounters, Page, PageBusy, PageRef, SgList, PAGE_SIZE};

/// Bytes in a column (one stripe-cache block).
pub const COLUMN: u64 = PAGE_SIZE as u64;

/// The geometry of one array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Members, parity included.
    pub members: usize,
    /// Stripe unit in bytes (a power of two, at least [`COLUMN`]).
    pub unit: u64,
    /// Rows in the data area.
    pub rows: u64,
    /// Partial parity log slots on each member.
    pub slots: u64,
}

/// One piece of a request that falls in one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Row.
    pub row: u64,
    /// Data chunk index within the row (0..members-1).
    pub chunk: usize,
    /// Member holding it.
    pub member: usize,
    /// Byte offset within the chunk.
    pub within: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of the piece within the request.
    pub at: u64,
}

impl Layout {
    /// Data chunks per row.
    pub fn data(&self) -> usize {
        self.members - 1
    }

    /// Bytes one row holds (data only).
    pub fn row_bytes(&self) -> u64 {
        self.unit * self.data() as u64
    }

    /// The array's size in bytes.
    pub fn media_size(&self) -> u64 {
        self.rows * self.row_bytes()
    }

    /// Columns in a chunk.
    pub fn columns(&self) -> u64 {
        self.unit / COLUMN
    }

    /// The member holding row `row`'s parity.
    pub fn parity(&self, row: u64) -> usize {
        let n = self.members as u64;
        (n - 1 - row % n) as usize
    }

    /// The member holding data chunk `chunk` of row `row`.
    pub fn member(&self, row: u64, chunk: usize) -> usize {
        (self.parity(row) + 1 + chunk) % self.members
    }

    /// The data chunk member `member` holds in row `row`, or `None` for
    /// the parity member.
    pub fn chunk_of(&self, row: u64, member: usize) -> Option<usize> {
        let p = self.parity(row);
        (member != p).then(|| (member + self.members - p - 1) % self.members)
    }

    /// Byte offset of row `row` on every member.
    pub fn row_offset(&self, row: u64) -> u64 {
        row * self.unit
    }

    /// Where the partial parity log starts on each member.
    pub fn log_start(&self) -> u64 {
        self.rows * self.unit
    }

    /// Bytes of one log slot: a header page and a unit of partial parity.
    pub fn slot_bytes(&self) -> u64 {
        COLUMN + self.unit
    }

    /// Byte offset of log slot `slot` on a member.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.log_start() + slot * self.slot_bytes()
    }

    /// Bytes of a member the array uses (data and log; the metadata
    /// sector comes after).
    pub fn member_bytes(&self) -> u64 {
        self.log_start() + self.slots * self.slot_bytes()
    }

    /// The stripe cache's block number of column `col` of row `row` on
    /// `member`.
    pub fn block(&self, member: usize, row: u64, col: u64) -> u64 {
        member as u64 * self.rows * self.columns() + row * self.columns() + col
    }

    /// The cache blocks of `member`, as a range.
    pub fn member_blocks(&self, member: usize) -> core::ops::Range<u64> {
        let per = self.rows * self.columns();
        member as u64 * per..(member as u64 + 1) * per
    }

    /// Cuts `[offset, offset + len)` of the array into pieces, one per
    /// chunk touched, in array order.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let unit = self.unit;
        let d = self.data() as u64;
        let mut pos = 0;
        core::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let x = offset + pos;
            let (s, within) = (x / unit, x % unit);
            let take = (unit - within).min(len - pos);
            let (row, chunk) = (s / d, (s % d) as usize);
            let piece = Piece {
                row,
                chunk,
                member: self.member(row, chunk),
                within,
                len: take,
                at: pos,
            };
            pos += take;
            Some(piece)
        })
    }

    /// Chooses log slots and a row count for members of `usable` bytes
    /// (data, log and nothing else): up to 16 slots, fewer on small
    /// members so the log stays under an eighth of them; `None` when not
    /// even one row fits.
    pub fn fit(members: usize, unit: u64, usable: u64, log: bool) -> Option<Layout> {
        let slot = COLUMN + unit;
        let slots = if log {
            (usable / 8 / slot).clamp(2, 16)
        } else {
            0
        };
        let rows = usable.checked_sub(slots * slot)? / unit;
        (rows > 0).then_some(Layout {
            members,
            unit,
            rows,
            slots,
        })
    }
}

/// `a ^= b`, a word at a time where both are aligned alike.
pub fn xor(a: &mut [u8], b: &[u8]) {
    debug_assert_eq!(a.len(), b.len());
    let mut ac = a.chunks_exact_mut(8);
    let mut bc = b.chunks_exact(8);
    for (x, y) in (&mut ac).zip(&mut bc) {
        let v = u64::from_ne_bytes(x[..8].try_into().unwrap_or([0; 8]))
            ^ u64::from_ne_bytes(y[..8].try_into().unwrap_or([0; 8]));
        x.copy_from_slice(&v.to_ne_bytes());
    }
    for (x, y) in ac.into_remainder().iter_mut().zip(bc.remainder()) {
        *x ^= *y;
    }
}

/// How a source is combined into a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// `dst = src`.
    Copy,
    /// `dst ^= src`.
    Xor,
}

/// A source range: `len` bytes from byte `at` of `sg`, landing at byte
/// `to` of the destination.
pub struct Source<'a> {
    /// The pages.
    pub sg: &'a SgList,
    /// First byte within `sg`.
    pub at: u64,
    /// First byte within the destination.
    pub to: usize,
    /// Bytes.
    pub len: usize,
    /// Copy or XOR.
    pub mix: Mix,
}

/// A list holding one whole page.
pub fn page_list(page: &Page) -> SgList {
    let mut sg = SgList::with_capacity(1);
    sg.push(PageRef {
        page: page.clone(),
        offset: 0,
        len: PAGE_SIZE as u32,
    });
    sg
}

/// Maps `dst` once and combines every source into it in order, mapping
/// each source range once. Counted in `counters`.
pub fn combine(
    dst: &Page,
    sources: &[Source<'_>],
    counters: &DataCounters,
) -> Result<(), PageBusy> {
    let dst_list = page_list(dst);
    let mut inner = Ok(());
    dst_list.map(counters, |_, d| {
        for s in sources {
            let r = s.sg.map_range(s.at, s.len as u64, counters, |off, bytes| {
                let to = s.to + off as usize;
                let out = &mut d[to..to + bytes.len()];
                match s.mix {
                    Mix::Copy => out.copy_from_slice(bytes),
                    Mix::Xor => xor(out, bytes),
                }
            });
            if r.is_err() {
                inner = r;
                return;
            }
        }
    })?;
    inner
}

/// Maps `page` once and hands its bytes to `f` (a parity check reads a
/// row's pages this way). Counted in `counters`.
pub fn with_page<R>(
    page: &Page,
    counters: &DataCounters,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Result<R, PageBusy> {
    let mut f = Some(f);
    let mut out = None;
    page_list(page).map(counters, |_, b| {
        if let Some(f) = f.take() {
            out = Some(f(b));
        }
    })?;
    out.ok_or(PageBusy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    /// The reference: md's left-symmetric formulas written out longhand.
    fn reference(n: u64, unit: u64, x: u64) -> (u64, u64, u64) {
        let stripe = x / unit;
        let row = stripe / (n - 1);
        let dd = stripe % (n - 1);
        let pd = (n - 1) - (row % n);
        let member = (pd + 1 + dd) % n;
        (member, row * unit + x % unit, pd)
    }

    #[test]
    fn left_symmetric_matches_the_picture() {
        let l = Layout {
            members: 4,
            unit: 4096,
            rows: 8,
            slots: 0,
        };
        let parity: Vec<usize> = (0..4).map(|r| l.parity(r)).collect();
        assert_eq!(parity, vec![3, 2, 1, 0]);
        // Row 1: D3 on member 3, D4 on 0, D5 on 1.
        assert_eq!(
            (0..3).map(|k| l.member(1, k)).collect::<Vec<_>>(),
            vec![3, 0, 1]
        );
        for r in 0..8 {
            for m in 0..4 {
                match l.chunk_of(r, m) {
                    None => assert_eq!(m, l.parity(r)),
                    Some(k) => assert_eq!(l.member(r, k), m),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn pieces_match_the_reference(n in 3usize..9, shift in 12u32..18,
                                      rows in 1u64..20, off in any::<u64>(), len in 1u64..300_000) {
            let l = Layout { members: n, unit: 1 << shift, rows, slots: 0 };
            let size = l.media_size();
            let off = (off % size) & !511;
            let len = (len & !511).clamp(512, size - off);
            let mut covered = 0;
            for p in l.pieces(off, len) {
                prop_assert_eq!(p.at, covered);
                let x = off + p.at;
                let (m, on, pd) = reference(n as u64, l.unit, x);
                prop_assert_eq!(p.member as u64, m);
                prop_assert_eq!(l.row_offset(p.row) + p.within, on);
                prop_assert_eq!(l.parity(p.row) as u64, pd);
                prop_assert!(p.within + p.len <= l.unit);
                // The last byte of the piece maps where the reference says.
                let (m2, on2, _) = reference(n as u64, l.unit, x + p.len - 1);
                prop_assert_eq!(m2, m);
                prop_assert_eq!(on2, on + p.len - 1);
                covered += p.len;
            }
            prop_assert_eq!(covered, len);
        }

        #[test]
        fn combine_matches_bytewise_xor(n in 2usize..9, at in 0usize..4096, len in 1usize..4096,
                                        seed in any::<u8>(), first_copy in any::<bool>()) {
            let len = len.min(PAGE_SIZE - at);
            let counters = DataCounters::default();
            let srcs: Vec<Vec<u8>> = (0..n)
                .map(|i| crate::testing::pattern(seed.wrapping_add(i as u8), 0, 2 * PAGE_SIZE))
                .collect();
            let lists: Vec<SgList> = srcs.iter().map(|s| SgList::from_bytes(s, &counters)).collect();
            let dst = Page::new_zeroed();
            let before = crate::testing::pattern(seed ^ 0x55, 0, PAGE_SIZE);
            page_list(&dst).copy_from_slice(0, &before, &counters).unwrap();
            let sources: Vec<Source<'_>> = lists.iter().enumerate().map(|(i, sg)| Source {
                sg, at: (i * 7 * 512) as u64 % PAGE_SIZE as u64, to: at, len,
                mix: if i == 0 && first_copy { Mix::Copy } else { Mix::Xor },
            }).collect();
            let mapped0 = counters.bytes_mapped();
            combine(&dst, &sources, &counters).unwrap();
            // The destination once, each source once.
            prop_assert_eq!(counters.bytes_mapped() - mapped0, (PAGE_SIZE + n * len) as u64);
            let mut want = before.clone();
            for (i, s) in srcs.iter().enumerate() {
                let from = (i * 7 * 512) % PAGE_SIZE;
                for j in 0..len {
                    if i == 0 && first_copy {
                        want[at + j] = s[from + j];
                    } else {
                        want[at + j] ^= s[from + j];
                    }
                }
            }
            let mut got = vec![0u8; PAGE_SIZE];
            page_list(&dst).copy_to_slice(0, &mut got, &counters).unwrap();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn fit_keeps_the_log_small_and_rows_whole() {
        let l = Layout::fit(3, 65536, 64 << 20, true).unwrap();
        assert_eq!(l.slots, 16);
        assert!(l.member_bytes() <= 64 << 20);
        assert_eq!(l.rows, (64 << 20) / 65536 - 17);
        let small = Layout::fit(3, 4096, 64 << 10, true).unwrap();
        assert_eq!(small.slots, 2);
        assert_eq!(small.rows, 12);
        assert!(Layout::fit(3, 65536, 100_000, true).is_none());
        assert_eq!(Layout::fit(3, 4096, 64 << 10, false).unwrap().rows, 16);
    }
}
