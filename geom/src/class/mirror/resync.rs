//! Resynchronization: copying the mirror's whole range onto a member that
//! joined (or came back stale), and copying the dirty regions of an
//! unclean stop from the source onto the other members, while regular I/O
//! goes on.
//!
//! ```text
//!   0 ────────── synced ──────[chunk][chunk]── next ─────────── media size
//!   writes here reach the new    in flight:      writes here go to the
//!   member too                   overlapping     active members only;
//!                                writes wait     the copy brings them over
//!
//!   recovery: ── clean ──[dirty: piece][piece]── clean ──[dirty]── …
//!             each piece read from the source, the same pages written to
//!             every other member it reaches; reads of a dirty region go
//!             to the source until its last piece is everywhere
//! ```
//!
//! Each chunk is one read into fresh pages, then a write of the very same
//! pages to the member being synchronized (a recovery piece: to every
//! other member): the data is never mapped. A chunk does not start while
//! a regular write overlaps it, and a regular write that overlaps a chunk
//! in flight waits for it (gmirror's sync and regular collisions), so the
//! copy never puts old bytes over new ones. A synchronizing member is
//! flushed before its progress is written to its metadata and before it
//! becomes active; a recovered region stays dirty in the bitmap until a
//! FLUSH after its copy.
//!
//! Once the platform gives the stack a clock, copying moves at most
//! [`SYNC_TICK_BYTES`] per clock value (one run of the event loop), so a
//! fast device cannot keep [`crate::stack::Stack::run`] busy with copying
//! while clients wait; the geom asks to be woken at once for the next
//! share.

use super::{
    cookie, Kind, MemberState, MirrorGeom, SYNC_CHUNK_BYTES, SYNC_PERSIST_BYTES, SYNC_TICK_BYTES,
    SYNC_WINDOW,
};
use crate::bio::{Bio, BioCmd, BioResult, ConsumerId};
use crate::stack::Io;

/// Resync progress of one synchronizing member.
#[derive(Debug)]
pub(super) struct SyncProgress {
    /// Next offset to copy: everything below it is copied or being copied.
    pub(super) next: u64,
    /// Chunks and flushes in flight for this member.
    pub(super) inflight: u32,
    /// The sync offset last written to the member's metadata.
    pub(super) persisted: u64,
    /// A flush before recording progress is in flight.
    pub(super) checkpointing: bool,
    /// The final flush is in flight.
    pub(super) finishing: bool,
}

impl SyncProgress {
    /// Progress of a resync starting at `from`.
    pub(super) fn new(from: u64) -> SyncProgress {
        SyncProgress {
            next: from,
            inflight: 0,
            persisted: from,
            checkpointing: false,
            finishing: false,
        }
    }
}

/// Where a resync request is.
#[derive(Debug)]
pub(super) enum Phase {
    /// Reading from an active member.
    Reading,
    /// Writing the same pages to the target (a recovery piece: `left`
    /// writes still out).
    Writing { left: u32 },
    /// Flushing the target, then recording `offset` as synchronized
    /// (`finish`: then making the target active).
    Flushing { finish: bool },
}

/// What a resync request copies for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Copy {
    /// The whole range onto one synchronizing member.
    Sync { target: ConsumerId },
    /// A dirty region, from the recovery source onto every other member.
    Recover,
}

/// One resync request.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) copy: Copy,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) phase: Phase,
    /// The target left the mirror; the request is forgotten when it
    /// comes back.
    pub(super) abandoned: bool,
}

impl Chunk {
    fn copies(&self) -> bool {
        !self.abandoned && !matches!(self.phase, Phase::Flushing { .. })
    }

    fn target(&self) -> Option<ConsumerId> {
        match self.copy {
            Copy::Sync { target } => Some(target),
            Copy::Recover => None,
        }
    }
}

impl MirrorGeom {
    /// Bytes of the range known to be on `target`: everything below its
    /// lowest chunk in flight.
    pub(super) fn synced_bytes(&self, target: ConsumerId, s: &SyncProgress) -> u64 {
        self.chunks
            .iter()
            .filter(|(_, c)| c.copies() && c.target() == Some(target))
            .map(|(_, c)| c.offset)
            .min()
            .unwrap_or(s.next)
    }

    /// True when a resync copy in flight overlaps `[start, end)`.
    pub(super) fn collides_with_sync(&self, start: u64, end: u64) -> bool {
        self.chunks
            .iter()
            .any(|(_, c)| c.copies() && c.offset < end && start < c.offset + c.len)
    }

    /// Forgets the resync requests of `target` (of every member, recovery
    /// included, for `None`); they are dropped when they come back.
    pub(super) fn abandon_chunks(&mut self, target: Option<ConsumerId>) {
        for c in self.chunks.items.iter_mut().flatten() {
            if target.is_none_or(|t| c.target() == Some(t)) {
                c.abandoned = true;
            }
        }
    }

    /// Makes member `i` synchronizing from offset `from`.
    pub(super) fn start_sync(&mut self, i: usize, from: u64) {
        let m = &mut self.members[i];
        m.state = MemberState::Synchronizing;
        m.sync = Some(SyncProgress::new(from.min(self.media_size)));
    }

    /// True when this run of the stack has copied its share (then the
    /// copy goes on at the next clock value, see
    /// `Geom::next_deadline_ns`).
    fn tick_over(&mut self, io: &Io<'_>) -> bool {
        if io.has_clock() && self.tick.1 >= SYNC_TICK_BYTES {
            self.tick_spent = true;
            return true;
        }
        false
    }

    /// Starts as many resync requests as the windows and collisions allow;
    /// true if any started.
    pub(super) fn pump_sync(&mut self, io: &mut Io<'_>) -> bool {
        if !self.serving() {
            return false;
        }
        if io.has_clock() && io.now_ns() != self.tick.0 {
            self.tick = (io.now_ns(), 0);
        }
        self.tick_spent = false;
        let mut did = self.pump_recovery(io);
        for i in 0..self.members.len() {
            let target = self.members[i].consumer;
            while let Some(s) = self.members[i].sync.as_ref() {
                if s.finishing {
                    break;
                }
                if s.next >= self.media_size {
                    if s.inflight == 0 {
                        self.flush_target(io, i, true);
                        did = true;
                    }
                    break;
                }
                let (offset, full) = (s.next, s.inflight as usize >= SYNC_WINDOW);
                if full || self.tick_over(io) {
                    break;
                }
                let len = SYNC_CHUNK_BYTES.min(self.media_size - offset);
                if self.collides_with_regular(offset, offset + len) {
                    break;
                }
                let Some(src) = self.pick_reader(offset, offset + len) else {
                    break;
                };
                if let Some(s) = self.members[i].sync.as_mut() {
                    s.next += len;
                    s.inflight += 1;
                }
                self.read_chunk(io, src, Copy::Sync { target }, offset, len);
                did = true;
            }
            let checkpoint = self.members[i].sync.as_ref().is_some_and(|s| {
                !s.checkpointing
                    && !s.finishing
                    && self.synced_bytes(target, s) >= s.persisted + SYNC_PERSIST_BYTES
            });
            if checkpoint {
                self.flush_target(io, i, false);
                did = true;
            }
        }
        did
    }

    /// Starts the next pieces of the recovery copy; ends the recovery once
    /// every dirty region is on every member. True if any started.
    fn pump_recovery(&mut self, io: &mut Io<'_>) -> bool {
        let mut did = false;
        loop {
            let (Some(r), Some(w)) = (self.recovery.as_ref(), self.intent.as_ref()) else {
                return did;
            };
            if r.finished() {
                self.recovery = None;
                return did;
            }
            let piece = r.next_piece(w, SYNC_CHUNK_BYTES);
            let (full, source) = (r.inflight as usize >= SYNC_WINDOW, r.source);
            if full || self.tick_over(io) {
                return did;
            }
            let Some((offset, len)) = piece else {
                return did;
            };
            if self.collides_with_regular(offset, offset + len) {
                return did;
            }
            let Some(src) = self.member_index(source) else {
                return did;
            };
            if let Some(r) = self.recovery.as_mut() {
                r.next = offset + len;
                r.inflight += 1;
            }
            self.read_chunk(io, src, Copy::Recover, offset, len);
            did = true;
        }
    }

    /// Member `consumer` left: if it was the recovery source, the copy
    /// goes on from another active member (the lowest place), whose bytes
    /// then win in the regions still to copy.
    pub(super) fn recovery_lost(&mut self, consumer: ConsumerId) {
        let Some(r) = self.recovery.as_ref() else {
            return;
        };
        if r.source != consumer {
            return;
        }
        let next = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active && m.consumer != consumer)
            .min_by_key(|m| m.index)
            .map(|m| m.consumer);
        match (next, self.recovery.as_mut()) {
            (Some(c), Some(r)) => r.source = c,
            _ => self.recovery = None,
        }
    }

    /// Starts a copy's first step: reading `offset..offset + len` from
    /// member `src`, counted against the pacing tick.
    fn read_chunk(&mut self, io: &mut Io<'_>, src: usize, copy: Copy, offset: u64, len: u64) {
        let source = self.members[src].consumer;
        self.members[src].inflight += 1;
        let slot = self.chunks.insert(Chunk {
            copy,
            offset,
            len,
            phase: Phase::Reading,
            abandoned: false,
        });
        self.tick.1 += len;
        io.request(
            source,
            Bio::read(offset, len),
            cookie(Kind::Sync, source, slot),
        );
    }

    /// Flushes member `i` before its progress is recorded (`finish`: before
    /// it becomes active).
    fn flush_target(&mut self, io: &mut Io<'_>, i: usize, finish: bool) {
        let target = self.members[i].consumer;
        let offset = match self.members[i].sync.as_ref() {
            Some(s) => self.synced_bytes(target, s),
            None => return,
        };
        let Some(s) = self.members[i].sync.as_mut() else {
            return;
        };
        if finish {
            s.finishing = true;
        } else {
            s.checkpointing = true;
        }
        s.inflight += 1;
        self.members[i].inflight += 1;
        let slot = self.chunks.insert(Chunk {
            copy: Copy::Sync { target },
            offset,
            len: 0,
            phase: Phase::Flushing { finish },
            abandoned: false,
        });
        io.request(target, Bio::flush(), cookie(Kind::Sync, target, slot));
    }

    /// A resync read, write or flush came back from member `consumer`.
    pub(super) fn sync_done(
        &mut self,
        io: &mut Io<'_>,
        consumer: ConsumerId,
        slot: u32,
        bio: Bio,
        result: BioResult,
    ) {
        let Some(chunk) = self.chunks.get_mut(slot) else {
            return;
        };
        if chunk.abandoned {
            self.chunks.remove(slot);
            return;
        }
        if chunk.copy == Copy::Recover {
            self.recover_done(io, consumer, slot, bio, result);
            return;
        }
        let Some(target) = chunk.target() else {
            return;
        };
        match &mut chunk.phase {
            Phase::Reading => {
                if result.is_err() {
                    self.fail_member(io, consumer, "read error");
                    self.retry_read(io, slot, bio);
                    return;
                }
                chunk.phase = Phase::Writing { left: 1 };
                let offset = chunk.offset;
                let Some(t) = self.member_index(target) else {
                    self.chunks.remove(slot);
                    return;
                };
                self.members[t].inflight += 1;
                // The pages just read are written as they are: no map.
                let write = Bio::with_data(BioCmd::Write, offset, bio.sg);
                io.request(target, write, cookie(Kind::Sync, target, slot));
            }
            Phase::Writing { .. } => {
                self.chunks.remove(slot);
                self.sync_request_over(target);
                if result.is_err() {
                    self.fail_member(io, target, "resync write error");
                }
            }
            Phase::Flushing { finish } => {
                let finish = *finish;
                let offset = chunk.offset;
                self.chunks.remove(slot);
                self.sync_request_over(target);
                if result.is_err() {
                    self.fail_member(io, target, "resync flush error");
                    return;
                }
                let Some(t) = self.member_index(target) else {
                    return;
                };
                if finish {
                    self.finish_sync(t);
                } else if let Some(s) = self.members[t].sync.as_mut() {
                    s.checkpointing = false;
                    s.persisted = offset;
                    self.members[t].meta_wanted = true;
                }
            }
        }
    }

    /// A recovery piece's read or one of its writes came back.
    fn recover_done(
        &mut self,
        io: &mut Io<'_>,
        consumer: ConsumerId,
        slot: u32,
        bio: Bio,
        result: BioResult,
    ) {
        let Some(chunk) = self.chunks.get_mut(slot) else {
            return;
        };
        let (offset, len) = (chunk.offset, chunk.len);
        match &mut chunk.phase {
            Phase::Reading => {
                if result.is_err() {
                    // The source is dropped; the read goes to the next one.
                    self.fail_member(io, consumer, "read error");
                    self.retry_read(io, slot, bio);
                    return;
                }
                // Every other member the range reaches gets the same pages.
                let targets: alloc::vec::Vec<usize> = (0..self.members.len())
                    .filter(|&i| {
                        let m = &self.members[i];
                        m.consumer != consumer && MirrorGeom::write_reaches(m, offset)
                    })
                    .collect();
                if targets.is_empty() {
                    self.piece_over(slot);
                    return;
                }
                chunk.phase = Phase::Writing {
                    left: targets.len() as u32,
                };
                for i in targets {
                    let m = &mut self.members[i];
                    m.inflight += 1;
                    let write = Bio::with_data(BioCmd::Write, offset, bio.sg.clone());
                    io.request(m.consumer, write, cookie(Kind::Sync, m.consumer, slot));
                }
            }
            Phase::Writing { left } => {
                *left -= 1;
                let over = *left == 0;
                if result.is_err() {
                    self.fail_member(io, consumer, "recovery write error");
                }
                if over {
                    self.piece_over(slot);
                }
            }
            Phase::Flushing { .. } => {
                self.chunks.remove(slot);
            }
        }
        let _ = len;
    }

    /// Recovery piece `slot` is on every member it had to reach.
    fn piece_over(&mut self, slot: u32) {
        let Some(c) = self.chunks.remove(slot) else {
            return;
        };
        let (Some(r), Some(w)) = (self.recovery.as_mut(), self.intent.as_mut()) else {
            return;
        };
        r.inflight = r.inflight.saturating_sub(1);
        if r.piece_done(w, c.offset, c.len) {
            // The copy itself must reach the disks before the bit clears.
            w.touch(w.region_of(c.offset), self.flushes);
            self.recovered += 1;
        }
    }

    /// Counts a resync request of `target` as finished.
    fn sync_request_over(&mut self, target: ConsumerId) {
        if let Some(t) = self.member_index(target) {
            if let Some(s) = self.members[t].sync.as_mut() {
                s.inflight = s.inflight.saturating_sub(1);
            }
        }
    }

    /// Sends the read of chunk `slot` (the same bio and pages) to another
    /// active member after one failed it; drops the chunk when none is
    /// left (the mirror is then dead and its resync over).
    fn retry_read(&mut self, io: &mut Io<'_>, slot: u32, bio: Bio) {
        let chunk = self.chunks.get_mut(slot);
        let abandoned = chunk.as_ref().is_none_or(|c| c.abandoned);
        let recover = chunk.is_some_and(|c| c.copy == Copy::Recover);
        let src = if abandoned {
            None
        } else if recover {
            self.recovery
                .as_ref()
                .and_then(|r| self.member_index(r.source))
        } else {
            self.pick_reader(bio.offset, bio.end())
        };
        let Some(src) = src else {
            if let Some(c) = self.chunks.remove(slot) {
                match c.copy {
                    Copy::Sync { target } => self.sync_request_over(target),
                    Copy::Recover => {
                        // No source left: nothing to copy from any more.
                        self.recovery = None;
                    }
                }
            }
            return;
        };
        let source = self.members[src].consumer;
        self.members[src].inflight += 1;
        io.request(source, bio, cookie(Kind::Sync, source, slot));
    }

    /// Member `i` holds the whole range: it becomes active, and the new
    /// member set is recorded with a new generation.
    fn finish_sync(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.state = MemberState::Active;
        m.sync = None;
        self.bump_generation();
        self.refresh_state();
    }
}
