//! Regular requests on a mirror: writes and flushes fanned out to the
//! members and gathered back, reads sent to one member and retried on
//! another, and what happens to a member that fails.
//!
//! ```text
//!  write ─┬─▶ active P1 ─┐
//!         ├─▶ active P2 ─┼─▶ all back: Ok if an active member wrote it
//!         └─▶ P3 (only below its sync point) ┘
//!  read ──▶ P1 ──error──▶ drop P1, read P2 ──▶ Ok
//! ```

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
    /// A flush, gathered like a write.
    Flush { parent: Bio, left: u32, ok: u32 },
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
            BioCmd::Flush => self.fan_out(io, bio),
            BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes => {
                // gmirror's sync collision: a write must not overtake the
                // resync copy of the same range, or the copy would put the
                // old bytes back on the new member.
                if self.collides_with_sync(bio.offset, bio.end()) {
                    self.delayed.push_back(bio);
                } else {
                    self.fan_out(io, bio);
                }
            }
        }
    }

    /// Picks the active member for the next read.
    pub(super) fn pick_reader(&mut self) -> Option<usize> {
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
    /// read, one slice per active member (gmirror's split).
    fn start_read(&mut self, io: &mut Io<'_>, parent: Bio) {
        let n = self.active_count() as u64;
        let sector = u64::from(self.sector_size);
        let pieces =
            if self.balance == MirrorBalance::Split && n > 1 && parent.length > SPLIT_MIN_BYTES {
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
        let Some(i) = self.pick_reader() else {
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
    fn write_reaches(m: &super::Member, offset: u64) -> bool {
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
            io.deliver(parent, Err(BioError::Io));
            return;
        }
        let children: Vec<Bio> = targets.iter().map(|_| parent.clone_request()).collect();
        let left = targets.len() as u32;
        let slot = self.pending.insert(if flush {
            Pending::Flush {
                parent,
                left,
                ok: 0,
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
                let parent = match self.pending.remove(slot) {
                    Some(Pending::Write { parent, .. } | Pending::Flush { parent, .. }) => parent,
                    _ => return,
                };
                let r = if ok > 0 && self.serving() {
                    Ok(())
                } else {
                    Err(BioError::Io)
                };
                self.complete(io, parent, r);
            }
        }
    }

    /// Delivers a finished request, holding write and flush completions
    /// back while a generation bump is not yet on disk.
    fn complete(&mut self, io: &mut Io<'_>, bio: Bio, result: BioResult) {
        if bio.cmd != BioCmd::Read && self.unpersisted {
            self.parked.push_back((bio, result));
        } else {
            io.deliver(bio, result);
        }
    }

    /// Releases held completions once no generation bump is pending.
    pub(super) fn release_parked(&mut self, io: &mut Io<'_>) {
        if self.unpersisted
            && self
                .members
                .iter()
                .all(|m| !m.meta_inflight && !m.meta_wanted)
        {
            self.unpersisted = false;
        }
        if self.unpersisted {
            return;
        }
        while let Some((bio, r)) = self.parked.pop_front() {
            io.deliver(bio, r);
        }
    }

    /// Starts the held-back writes that no longer overlap a resync request
    /// (or fails them if the mirror stopped serving).
    pub(super) fn release_delayed(&mut self, io: &mut Io<'_>) {
        for _ in 0..self.delayed.len() {
            let Some(bio) = self.delayed.pop_front() else {
                break;
            };
            if !self.serving() {
                io.deliver(bio, Err(BioError::Io));
            } else if self.collides_with_sync(bio.offset, bio.end()) {
                self.delayed.push_back(bio);
            } else {
                self.fan_out(io, bio);
            }
        }
    }

    /// True when a regular write in flight or held back overlaps
    /// `[start, end)` (gmirror's regular collision, seen from a resync
    /// request about to start).
    pub(super) fn collides_with_regular(&self, start: u64, end: u64) -> bool {
        let overlaps = |b: &Bio| b.offset < end && start < b.end();
        self.pending.iter().any(|(_, p)| match p {
            Pending::Write { parent, .. } => overlaps(parent),
            _ => false,
        }) || self.delayed.iter().any(overlaps)
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
        self.refresh_state();
        if self.state == MirrorState::Dead {
            self.die(io);
        } else {
            self.bump_generation();
        }
    }

    /// No active member is left: stop resync, fail what waits, and orphan
    /// the mirror's provider so the loss travels up.
    pub(super) fn die(&mut self, io: &mut Io<'_>) {
        self.abandon_chunks(None);
        for m in self.members.drain(..) {
            self.detaching.push(m.consumer);
        }
        while let Some(bio) = self.delayed.pop_front() {
            io.deliver(bio, Err(BioError::Io));
        }
        io.wither();
    }
}
