//! Regular requests on a mirror: writes and flushes fanned out to the
//! members and gathered back, reads sent to one member and retried on
//! another, and what happens to a member that fails.
//!
//! ```text
//!  write ─▶ queued ─(no overlap with a write in flight or ahead, no resync
//!           copy over it, its regions marked dirty and that record stable
//!           on every member; a new epoch first if one is due)─┐
//!     ┌──────────────────────────────────────────────────────┘
//!     └─┬─▶ active P1 ─┐
//!       ├─▶ active P2 ─┼─▶ all back: Ok if an active member wrote it; the
//!       └─▶ P3 (only below its sync point) ┘   acknowledgement waits for a
//!                                              new epoch if the member set
//!                                              shrank meanwhile
//!  read ──▶ P1 ──error──▶ drop P1, read P2 ──▶ Ok
//!           (a region still being recovered: the recovery source only)
//! ```
//!
//! Writes (and discards, write-zeroes) that overlap are serialized: one
//! that overlaps a write still in flight, or one queued ahead of it,
//! waits, so overlapping writes reach every member in the same order
//! (arrival order). Writes that do not overlap go on in parallel.

use super::{cookie, Kind, MemberState, MirrorGeom, MirrorState};
use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId};
use super::MirrorBalance;
use crate::stack::Io;
use alloc::vec::Vec;

/// Reads longer than this are split over the active members under the
/// `split` balance (gmirror's slice).
pub(super) const SPLIT_MIN_BYTES: u64 = 4096;

/// A regular request waiting for its children.
#[derive(Debug)]
pub(super) enum Pending {
    /// A read in `left` children (one unless split); `failed` once a
    /// child found no member to read from.
    Read {
        parent: Bio,
        left: u32,
        failed: bool,
    },
    /// A write, discard or write-zeroes (`left` children out, `ok` of
    /// them succeeded on an active member).
    Write { parent: Bio, left: u32, ok: u32 },
    /// A flush, gathered like a write; `number` counts the FLUSHes sent.
    Flush {
        parent: Bio,
        left: u32,
        ok: u32,
        number: u64,
    },
}

/// A write not sent yet.
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) bio: Bio,
    /// Once its regions are claimed: the metadata version every member's
    /// record must reach before it is sent.
    pub(super) needs: Option<u64>,
}

fn overlaps(b: &Bio, start: u64, end: u64) -> bool {
    b.offset < end && start < b.end()
}

impl MirrorGeom {
    /// Handles a request sent to `mirror/NAME`.
    pub(super) fn start_regular(&mut self, io: &mut Io<'_>, bio: Bio) {
        if !self.serving() {
            io.deliver(bio, Err(BioError::Io));
            return;
        }
        match bio.cmd {
            BioCmd::Read => self.start_read(io, bio),
            // Members may differ while one resyncs: claim no knowledge
            // (every byte counts as data).
            BioCmd::GetAllocation => io.deliver(bio, Ok(())),
            // A flush covers the writes completed before it: queued ones
            // are not, so it goes at once.
            BioCmd::Flush => self.fan_out(io, bio),
            BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes => {
                self.queued.push_back(Queued { bio, needs: None });
                self.release_queued(io);
            }
        }
    }

    /// The member a read of `[start, end)` must go to while the range is
    /// still being recovered: the recovery source.
    fn recovery_reader(&self, start: u64, end: u64) -> Option<usize> {
        let r = self.recovery.as_ref()?;
        let w = self.intent.as_ref()?;
        if !r.pending(w, start, end) {
            return None;
        }
        self.member_index(r.source)
            .filter(|&i| self.members[i].state == MemberState::Active)
    }

    /// Picks the active member for the next read of `[start, end)`.
    pub(super) fn pick_reader(&mut self, start: u64, end: u64) -> Option<usize> {
        if let Some(i) = self.recovery_reader(start, end) {
            return Some(i);
        }
        let n = self.members.len();
        let active = |m: &super::Member| m.state == MemberState::Active;
        let pick = match self.balance {
            MirrorBalance::Prefer => {
                // The active member with the lowest index (gmirror: the
                // highest priority).
                (0..n)
                    .filter(|&i| active(&self.members[i]))
                    .min_by_key(|&i| self.members[i].index)
            }
            MirrorBalance::RoundRobin | MirrorBalance::Split => (0..n)
                .map(|k| (self.rr + k) % n)
                .find(|&i| active(&self.members[i])),
            MirrorBalance::Load => (0..n)
                .map(|k| (self.rr + k) % n)
                .filter(|&i| active(&self.members[i]))
                .min_by_key(|&i| self.members[i].inflight),
        };
        if let Some(i) = pick {
            self.rr = i + 1;
        }
        pick
    }

    /// Starts a read: one child, or with `split` balance and a large
    /// read, one slice per active member (gmirror's split); a read that
    /// touches a region still being recovered goes whole to the source.
    fn start_read(&mut self, io: &mut Io<'_>, parent: Bio) {
        let n = self.active_count() as u64;
        let sector = u64::from(self.sector_size);
        let split = self.balance == MirrorBalance::Split
            && n > 1
            && parent.length > SPLIT_MIN_BYTES
            && self.recovery_reader(parent.offset, parent.end()).is_none();
        let pieces = if split {
            let per = parent.length.div_ceil(n).div_ceil(sector) * sector;
            let mut v = Vec::new();
            let mut at = 0;
            while at < parent.length {
                let len = per.min(parent.length - at);
                v.push(parent.split(at, len, parent.offset + at));
                at += len;
            }
            v
        } else {
            alloc::vec![parent.clone_request()]
        };
        let slot = self.pending.insert(Pending::Read {
            parent,
            left: pieces.len() as u32,
            failed: false,
        });
        for child in pieces {
            self.send_read(io, slot, child);
        }
    }

    /// Sends one read child of `slot` to an active member; with none left,
    /// counts it as failed.
    fn send_read(&mut self, io: &mut Io<'_>, slot: u32, child: Bio) {
        let Some(i) = self.pick_reader(child.offset, child.end()) else {
            self.read_piece_over(io, slot, false);
            return;
        };
        let m = &mut self.members[i];
        m.inflight += 1;
        io.request(m.consumer, child, cookie(Kind::Regular, m.consumer, slot));
    }

    /// One read child of `slot` is finished for good.
    fn read_piece_over(&mut self, io: &mut Io<'_>, slot: u32, ok: bool) {
        let Some(Pending::Read { left, failed, .. }) = self.pending.get_mut(slot) else {
            return;
        };
        *left -= 1;
        *failed |= !ok;
        if *left > 0 {
            return;
        }
        if let Some(Pending::Read { parent, failed, .. }) = self.pending.remove(slot) {
            io.deliver(parent, if failed { Err(BioError::Io) } else { Ok(()) });
        }
    }

    /// True when a write at `offset` must also go to member `m`: it is
    /// active, or synchronizing and the write starts below the range its
    /// resync has yet to copy.
    pub(super) fn write_reaches(m: &super::Member, offset: u64) -> bool {
        match (&m.state, &m.sync) {
            (MemberState::Active, _) => true,
            (MemberState::Synchronizing, Some(s)) => offset < s.next,
            (MemberState::Synchronizing, None) => false,
        }
    }

    /// Sends a write or flush to every member it must reach.
    pub(super) fn fan_out(&mut self, io: &mut Io<'_>, parent: Bio) {
        let flush = parent.cmd == BioCmd::Flush;
        let targets: Vec<usize> = (0..self.members.len())
            .filter(|&i| flush || MirrorGeom::write_reaches(&self.members[i], parent.offset))
            .collect();
        if self.active_count() == 0 || targets.is_empty() {
            if !flush {
                self.write_over(&parent);
            }
            io.deliver(parent, Err(BioError::Io));
            return;
        }
        let children: Vec<Bio> = targets.iter().map(|_| parent.clone_request()).collect();
        let left = targets.len() as u32;
        let slot = self.pending.insert(if flush {
            self.flushes += 1;
            Pending::Flush {
                parent,
                left,
                ok: 0,
                number: self.flushes,
            }
        } else {
            Pending::Write {
                parent,
                left,
                ok: 0,
            }
        });
        for (i, child) in targets.into_iter().zip(children) {
            let m = &mut self.members[i];
            m.inflight += 1;
            io.request(m.consumer, child, cookie(Kind::Regular, m.consumer, slot));
        }
    }

    /// A child of a regular request came back from member `consumer`.
    pub(super) fn regular_done(
        &mut self,
        io: &mut Io<'_>,
        consumer: ConsumerId,
        slot: u32,
        child: Bio,
        result: BioResult,
    ) {
        if result.is_err() {
            let why = match self.pending.get_mut(slot) {
                Some(Pending::Read { .. }) => "read error",
                Some(Pending::Flush { .. }) => "flush error",
                _ => "write error",
            };
            self.fail_member(io, consumer, why);
        }
        // A write counts once it is on a member that is still active: the
        // data is then readable from the mirror.
        let still_active = self
            .member_index(consumer)
            .is_some_and(|i| self.members[i].state == MemberState::Active);
        let Some(p) = self.pending.get_mut(slot) else {
            return;
        };
        match p {
            Pending::Read { .. } => {
                if result.is_ok() {
                    self.read_piece_over(io, slot, true);
                } else if self.serving() {
                    // The member that failed is gone; the same child (a
                    // slice of the caller's pages) goes to another one.
                    self.send_read(io, slot, child);
                } else {
                    self.read_piece_over(io, slot, false);
                }
            }
            Pending::Write { left, ok, .. } | Pending::Flush { left, ok, .. } => {
                *left -= 1;
                if result.is_ok() && still_active {
                    *ok += 1;
                }
                if *left > 0 {
                    return;
                }
                let ok = *ok;
                let (parent, flush) = match self.pending.remove(slot) {
                    Some(Pending::Write { parent, .. }) => (parent, None),
                    Some(Pending::Flush { parent, number, .. }) => (parent, Some(number)),
                    _ => return,
                };
                let r = if ok > 0 && self.serving() {
                    Ok(())
                } else {
                    Err(BioError::Io)
                };
                match flush {
                    None => self.write_over(&parent),
                    Some(n) if r.is_ok() => self.flushed(n),
                    Some(_) => {}
                }
                self.complete(io, parent, r);
            }
        }
    }

    /// Delivers a finished request. A write completed while a new epoch
    /// is due (the member set shrank since it was sent) begins the epoch,
    /// and write and flush completions are held until the record of the
    /// newest epoch is stable on every member.
    fn complete(&mut self, io: &mut Io<'_>, bio: Bio, result: BioResult) {
        if bio.cmd != BioCmd::Read {
            if bio.cmd != BioCmd::Flush && self.epoch_due && self.serving() {
                self.begin_epoch(io);
            }
            if self.durable_all() < self.park_barrier {
                self.parked.push_back((bio, result));
                return;
            }
        }
        io.deliver(bio, result);
    }

    /// Releases held completions once every member's record reached the
    /// barrier.
    pub(super) fn release_parked(&mut self, io: &mut Io<'_>) {
        if self.durable_all() < self.park_barrier {
            return;
        }
        while let Some((bio, r)) = self.parked.pop_front() {
            io.deliver(bio, r);
        }
    }

    /// The oldest metadata version stable on every member (no limit for a
    /// mirror without metadata).
    pub(super) fn durable_all(&self) -> u64 {
        if !self.labelled {
            return u64::MAX;
        }
        self.members
            .iter()
            .map(|m| m.meta_durable)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Claims the regions of a write about to be sent: begins a due epoch,
    /// marks clean regions dirty. Returns the metadata version the write
    /// waits for.
    fn claim(&mut self, io: &mut Io<'_>, start: u64, end: u64) -> u64 {
        if !self.labelled {
            return 0;
        }
        if self.epoch_due {
            self.begin_epoch(io);
        }
        let mut needs = self.epoch_version;
        let next = self.meta_version + 1;
        if let Some(w) = self.intent.as_mut() {
            let (n, fresh) = w.claim(start, end, next);
            if fresh {
                self.touch_all();
            }
            needs = needs.max(n);
        }
        needs
    }

    /// A write that claimed its regions is over (done, failed or given up).
    fn write_over(&mut self, bio: &Bio) {
        if let Some(w) = self.intent.as_mut() {
            w.release(bio.offset, bio.end(), self.flushes);
        }
    }

    /// FLUSH `number` succeeded: regions idle since before it was sent
    /// are clean again (a record write). While writes go on nobody waits
    /// for it; with none in flight or queued (an idle mirror, a clean
    /// stop) the FLUSH's own acknowledgement does, so the bitmap on disk
    /// is clean once the FLUSH is answered.
    fn flushed(&mut self, number: u64) {
        let quiet = self.queued.is_empty()
            && !self
                .pending
                .iter()
                .any(|(_, p)| matches!(p, Pending::Write { .. }));
        let Some(w) = self.intent.as_mut() else {
            return;
        };
        let recovery = &self.recovery;
        let keep = |r: usize| recovery.as_ref().is_some_and(|rc| rc.todo[r] > 0);
        if w.flushed(number, quiet, keep) {
            let v = self.touch_all();
            if quiet {
                self.park_barrier = self.park_barrier.max(v);
            }
        }
    }

    /// True when a write in flight overlaps `[start, end)`.
    fn overlaps_sent(&self, start: u64, end: u64) -> bool {
        self.pending.iter().any(|(_, p)| match p {
            Pending::Write { parent, .. } => overlaps(parent, start, end),
            _ => false,
        })
    }

    /// Sends the queued writes that may go, in order: a write waits while
    /// it overlaps a write in flight or one queued ahead of it, or a
    /// resync copy in flight, or until the record marking its regions
    /// dirty is stable on every member. Fails them all once the mirror
    /// stopped serving.
    pub(super) fn release_queued(&mut self, io: &mut Io<'_>) {
        let mut i = 0;
        while i < self.queued.len() {
            if !self.serving() {
                while let Some(q) = self.queued.pop_front() {
                    if q.needs.is_some() {
                        self.write_over(&q.bio);
                    }
                    io.deliver(q.bio, Err(BioError::Io));
                }
                return;
            }
            let (start, end) = (self.queued[i].bio.offset, self.queued[i].bio.end());
            let blocked = self.overlaps_sent(start, end)
                || self
                    .queued
                    .iter()
                    .take(i)
                    .any(|q| overlaps(&q.bio, start, end))
                || self.collides_with_sync(start, end);
            if blocked {
                i += 1;
                continue;
            }
            let needs = match self.queued[i].needs {
                Some(n) => n,
                None => {
                    let n = self.claim(io, start, end);
                    self.queued[i].needs = Some(n);
                    n
                }
            };
            if self.durable_all() < needs {
                i += 1;
                continue;
            }
            if let Some(q) = self.queued.remove(i) {
                self.fan_out(io, q.bio);
            }
        }
    }

    /// True when a regular write in flight or queued overlaps `[start,
    /// end)` (gmirror's regular collision, seen from a resync request
    /// about to start).
    pub(super) fn collides_with_regular(&self, start: u64, end: u64) -> bool {
        self.overlaps_sent(start, end) || self.queued.iter().any(|q| overlaps(&q.bio, start, end))
    }

    /// Drops a member after it failed (`why`): the mirror goes on degraded
    /// with the members left, or dies with the last active one. Requests
    /// already sent to it still come back and are counted as failed.
    pub(super) fn fail_member(&mut self, io: &mut Io<'_>, consumer: ConsumerId, why: &'static str) {
        let Some(i) = self.member_index(consumer) else {
            return;
        };
        let m = self.members.remove(i);
        self.dropped.push((m.name, why));
        self.detaching.push(m.consumer);
        if m.sync.is_some() {
            self.abandon_chunks(Some(consumer));
        }
        self.recovery_lost(consumer);
        self.refresh_state();
        if self.state == MirrorState::Dead {
            self.die(io);
        } else {
            self.members_shrank();
            self.bump_generation();
        }
    }

    /// No active member is left: stop resync, fail what waits, and orphan
    /// the mirror's provider so the loss travels up.
    pub(super) fn die(&mut self, io: &mut Io<'_>) {
        self.abandon_chunks(None);
        self.recovery = None;
        for m in self.members.drain(..) {
            self.detaching.push(m.consumer);
        }
        while let Some(q) = self.queued.pop_front() {
            if q.needs.is_some() {
                self.write_over(&q.bio);
            }
            io.deliver(q.bio, Err(BioError::Io));
        }
        io.wither();
    }
}
