//! The write-intent bitmap: which regions of the mirror may differ
//! between members after an unclean stop, and the copy of those regions
//! from one member onto the others at assembly.
//!
//! ```text
//!  write to a clean region ─▶ set its bit, record (FUA) on every member ─▶ issue
//!  write to a dirty region ─▶ issue (once the record that set it is stable)
//!  FLUSH n done            ─▶ clear the bits of regions with nothing in
//!                             flight whose last write completed before
//!                             FLUSH n-1 was sent (stable since, and idle
//!                             for a whole FLUSH interval: a hot region
//!                             stays dirty rather than cost a record write
//!                             per FLUSH); record (no one waits)
//!  FLUSH n done, no write  ─▶ clear every region stable before FLUSH n;
//!  in flight or queued        its acknowledgement waits for the record,
//!                             so a clean stop leaves a clean bitmap
//!  assembly: bits set      ─▶ unclean stop: copy those regions from the
//!                             source onto every other member; reads of a
//!                             region still to copy go to the source only
//! ```
//!
//! Each region remembers the metadata version that set its bit (a write
//! waits until every member's record is at least that new), the writes
//! that hold it (claimed, waiting or in flight), and the number of
//! FLUSHes sent when its last write completed.

use super::history::{regions_for, BITMAP_BITS, BITMAP_BYTES};
use crate::bio::ConsumerId;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

/// The in-memory bitmap.
#[derive(Debug)]
pub(super) struct WriteIntent {
    shift: u8,
    media_size: u64,
    dirty: Vec<bool>,
    /// Metadata version whose record first held the bit.
    set_version: Vec<u64>,
    /// Writes that claimed the region and have not completed.
    holders: Vec<u32>,
    /// FLUSHes sent when the region's last write completed.
    stamp: Vec<u64>,
}

impl WriteIntent {
    /// A clean bitmap of `1 << shift`-byte regions over `media_size`.
    pub(super) fn new(shift: u8, media_size: u64) -> WriteIntent {
        let n = regions_for(media_size, shift).min(BITMAP_BITS as u64) as usize;
        WriteIntent {
            shift,
            media_size,
            dirty: vec![false; n],
            set_version: vec![0; n],
            holders: vec![0; n],
            stamp: vec![0; n],
        }
    }

    pub(super) fn shift(&self) -> u8 {
        self.shift
    }

    /// Regions in use.
    pub(super) fn regions(&self) -> usize {
        self.dirty.len()
    }

    /// Bytes of region `r`.
    pub(super) fn region(&self, r: usize) -> Range<u64> {
        let start = (r as u64) << self.shift;
        start..(start + (1u64 << self.shift)).min(self.media_size)
    }

    /// The region holding byte `offset`.
    pub(super) fn region_of(&self, offset: u64) -> usize {
        ((offset >> self.shift) as usize).min(self.dirty.len().saturating_sub(1))
    }

    /// Regions overlapping `[start, end)` (`end > start`).
    pub(super) fn span(&self, start: u64, end: u64) -> Range<usize> {
        let last = ((end - 1) >> self.shift) as usize;
        (start >> self.shift) as usize..(last + 1).min(self.dirty.len())
    }

    pub(super) fn is_dirty(&self, r: usize) -> bool {
        self.dirty[r]
    }

    /// Dirty regions.
    pub(super) fn dirty_count(&self) -> usize {
        self.dirty.iter().filter(|&&d| d).count()
    }

    /// A write of `[start, end)` holds its regions; bits not yet set are
    /// set as of metadata version `next`. Returns the version whose record
    /// the write must wait for, and whether a bit was set.
    pub(super) fn claim(&mut self, start: u64, end: u64, next: u64) -> (u64, bool) {
        let mut needs = 0;
        let mut fresh = false;
        for r in self.span(start, end) {
            self.holders[r] += 1;
            if !self.dirty[r] {
                self.dirty[r] = true;
                self.set_version[r] = next;
                fresh = true;
            }
            needs = needs.max(self.set_version[r]);
        }
        (needs, fresh)
    }

    /// A write of `[start, end)` that claimed its regions completed (or
    /// was given up) while `flushes` FLUSHes had been sent.
    pub(super) fn release(&mut self, start: u64, end: u64, flushes: u64) {
        for r in self.span(start, end) {
            self.holders[r] = self.holders[r].saturating_sub(1);
            self.stamp[r] = flushes;
        }
    }

    /// Something was written to region `r` outside a claim (a recovery
    /// copy) while `flushes` FLUSHes had been sent.
    pub(super) fn touch(&mut self, r: usize, flushes: u64) {
        self.stamp[r] = flushes;
    }

    /// Marks the regions overlapping `[start, end)` dirty as of version
    /// `version` (the union of the members' bitmaps at assembly).
    pub(super) fn mark(&mut self, start: u64, end: u64, version: u64) {
        if end <= start {
            return;
        }
        for r in self.span(start, end) {
            self.dirty[r] = true;
            self.set_version[r] = self.set_version[r].max(version);
        }
    }

    /// FLUSH number `flush` completed: clears the bits of regions nothing
    /// holds whose last write completed before the FLUSH ahead of it was
    /// sent (so it is stable, and the region was idle for a whole FLUSH
    /// interval), or, when the mirror is `quiet` (no write in flight or
    /// queued), before this one was sent; except those `keep` names. True
    /// if any bit was cleared.
    pub(super) fn flushed(
        &mut self,
        flush: u64,
        quiet: bool,
        keep: impl Fn(usize) -> bool,
    ) -> bool {
        let mut any = false;
        for r in 0..self.dirty.len() {
            let idle = if quiet {
                self.stamp[r] < flush
            } else {
                self.stamp[r] + 1 < flush
            };
            if self.dirty[r] && self.holders[r] == 0 && idle && !keep(r) {
                self.dirty[r] = false;
                any = true;
            }
        }
        any
    }

    /// The bitmap as recorded.
    pub(super) fn bytes(&self) -> [u8; BITMAP_BYTES] {
        let mut b = [0u8; BITMAP_BYTES];
        for (r, &d) in self.dirty.iter().enumerate() {
            if d {
                b[r / 8] |= 1 << (r % 8);
            }
        }
        b
    }
}

/// The copy of dirty regions after an unclean stop.
#[derive(Debug)]
pub(super) struct Recovery {
    /// The member whose bytes win; reads of regions still to copy go to it.
    pub(super) source: ConsumerId,
    /// Per region: bytes not yet copied onto every other member.
    pub(super) todo: Vec<u64>,
    /// Next byte to start copying.
    pub(super) next: u64,
    /// Copies in flight.
    pub(super) inflight: u32,
    /// Regions to copy at assembly.
    pub(super) total: u32,
    /// Regions copied so far.
    pub(super) copied: u32,
}

impl Recovery {
    /// Copies the dirty regions of `intent` from `source`.
    pub(super) fn new(source: ConsumerId, intent: &WriteIntent) -> Recovery {
        let todo: Vec<u64> = (0..intent.regions())
            .map(|r| {
                if intent.is_dirty(r) {
                    let b = intent.region(r);
                    b.end - b.start
                } else {
                    0
                }
            })
            .collect();
        let total = todo.iter().filter(|&&t| t > 0).count() as u32;
        Recovery {
            source,
            todo,
            next: 0,
            inflight: 0,
            total,
            copied: 0,
        }
    }

    /// True while some region overlapping `[start, end)` is still to copy.
    pub(super) fn pending(&self, intent: &WriteIntent, start: u64, end: u64) -> bool {
        end > start && intent.span(start, end).any(|r| self.todo[r] > 0)
    }

    /// The next piece to copy (at most `max` bytes, within one region), or
    /// `None` when every region was started.
    pub(super) fn next_piece(&self, intent: &WriteIntent, max: u64) -> Option<(u64, u64)> {
        let mut r = (self.next >> intent.shift()) as usize;
        while r < self.todo.len() {
            let b = intent.region(r);
            let at = self.next.max(b.start);
            if self.todo[r] > 0 && at < b.end {
                return Some((at, max.min(b.end - at)));
            }
            r += 1;
        }
        None
    }

    /// A piece of `len` bytes at `offset` is on every member; true when
    /// its region is then done.
    pub(super) fn piece_done(&mut self, intent: &WriteIntent, offset: u64, len: u64) -> bool {
        let r = intent.region_of(offset);
        let t = &mut self.todo[r];
        let was = *t;
        *t = t.saturating_sub(len);
        if was > 0 && *t == 0 {
            self.copied += 1;
            true
        } else {
            false
        }
    }

    /// Nothing left to copy or in flight.
    pub(super) fn finished(&self) -> bool {
        self.inflight == 0 && self.todo.iter().all(|&t| t == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_set_bits_once_and_flushes_clear_idle_regions() {
        let mut w = WriteIntent::new(16, 1 << 20);
        assert_eq!(w.regions(), 16);
        // A write over regions 1 and 2 sets both as of version 5.
        assert_eq!(w.claim(0x1_8000, 0x2_8000, 5), (5, true));
        // Another write in region 2 needs the same record, sets nothing.
        assert_eq!(w.claim(0x2_0000, 0x2_0200, 9), (5, false));
        // FLUSH 1 completes while both are in flight: nothing clears.
        assert!(!w.flushed(1, false, |_| false));
        w.release(0x1_8000, 0x2_8000, 1);
        // FLUSH 2 makes the write stable; the region has not been idle
        // for a whole interval yet.
        assert!(!w.flushed(2, false, |_| false));
        // FLUSH 3 clears region 1; region 2 is still held.
        assert!(w.flushed(3, false, |_| false));
        assert!(!w.is_dirty(1) && w.is_dirty(2));
        w.release(0x2_0000, 0x2_0200, 3);
        assert!(!w.flushed(5, false, |r| r == 2));
        assert!(!w.flushed(4, false, |_| false));
        // With nothing else going on, the FLUSH after the write is enough.
        assert!(w.flushed(4, true, |_| false));
        assert_eq!(w.dirty_count(), 0);
        // The recorded bytes follow the bit order of the tail.
        w.mark(0, 1, 1);
        w.mark(15 << 16, 1 << 20, 1);
        assert_eq!((w.bytes()[0], w.bytes()[1]), (0x01, 0x80));
    }

    #[test]
    fn recovery_walks_dirty_regions_piece_by_piece() {
        let mut w = WriteIntent::new(16, (3 << 16) + 4096);
        assert_eq!(w.regions(), 4);
        w.mark(1 << 16, (1 << 16) + 1, 1);
        w.mark(3 << 16, (3 << 16) + 1, 1);
        let mut r = Recovery::new(ConsumerId(1), &w);
        assert_eq!((r.total, r.copied), (2, 0));
        assert!(!r.pending(&w, 0, 1 << 16) && r.pending(&w, 0, (1 << 16) + 512));
        let mut pieces = Vec::new();
        while let Some((at, len)) = r.next_piece(&w, 40_000) {
            r.next = at + len;
            pieces.push((at, len));
        }
        assert_eq!(
            pieces,
            vec![
                (1 << 16, 40_000),
                ((1 << 16) + 40_000, 65536 - 40_000),
                (3 << 16, 4096)
            ]
        );
        assert!(!r.piece_done(&w, 1 << 16, 40_000));
        assert!(r.piece_done(&w, (1 << 16) + 40_000, 65536 - 40_000));
        assert!(r.piece_done(&w, 3 << 16, 4096));
        assert!(r.finished() && r.copied == 2);
    }
}
