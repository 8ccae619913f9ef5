//! Resynchronization: copying the mirror's whole range onto a member that
//! joined (or came back stale), while regular I/O goes on.
//!
//! ```text
//!   0 ────────── synced ──────[chunk][chunk]── next ─────────── media size
//!   writes here reach the new    in flight:      writes here go to the
//!   member too                   overlapping     active members only;
//!                                writes wait     the copy brings them over
//! ```
//!
//! Each chunk is one read from an active member into fresh pages, then a
//! write of the very same pages to the new member: the data is never
//! mapped. A chunk does not start while a regular write overlaps it, and a
//! regular write that overlaps a chunk in flight waits for it (gmirror's
//! sync and regular collisions), so the copy never puts old bytes over
//! new ones. The new member is flushed before its progress is written to
//! its metadata and before it becomes active.
//!
//! Once the platform gives the stack a clock, a resync copies at most
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
    /// Writing the same pages to the target.
    Writing,
    /// Flushing the target, then recording `offset` as synchronized
    /// (`finish`: then making the target active).
    Flushing { finish: bool },
}

/// One resync request.
#[derive(Debug)]
pub(super) struct Chunk {
    /// The member being synchronized.
    pub(super) target: ConsumerId,
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
}

impl MirrorGeom {
    /// Bytes of the range known to be on `target`: everything below its
    /// lowest chunk in flight.
    pub(super) fn synced_bytes(&self, target: ConsumerId, s: &SyncProgress) -> u64 {
        self.chunks
            .iter()
            .filter(|(_, c)| c.copies() && c.target == target)
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

    /// Forgets the resync requests of `target` (of every member for
    /// `None`); they are dropped when they come back.
    pub(super) fn abandon_chunks(&mut self, target: Option<ConsumerId>) {
        for c in self.chunks.items.iter_mut().flatten() {
            if target.is_none_or(|t| t == c.target) {
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

    /// Starts as many resync requests as the window and collisions allow;
    /// true if any started.
    pub(super) fn pump_sync(&mut self, io: &mut Io<'_>) -> bool {
        if !self.serving() {
            return false;
        }
        if io.has_clock() && io.now_ns() != self.tick.0 {
            self.tick = (io.now_ns(), 0);
        }
        self.tick_spent = false;
        let mut did = false;
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
                if s.inflight as usize >= SYNC_WINDOW {
                    break;
                }
                if io.has_clock() && self.tick.1 >= SYNC_TICK_BYTES {
                    // This run of the stack has copied its share; go on
                    // at the next (see `Geom::next_deadline_ns`).
                    self.tick_spent = true;
                    break;
                }
                let offset = s.next;
                let len = SYNC_CHUNK_BYTES.min(self.media_size - offset);
                if self.collides_with_regular(offset, offset + len) {
                    break;
                }
                let Some(src) = self.pick_reader() else {
                    break;
                };
                let source = self.members[src].consumer;
                self.members[src].inflight += 1;
                let slot = self.chunks.insert(Chunk {
                    target,
                    offset,
                    len,
                    phase: Phase::Reading,
                    abandoned: false,
                });
                if let Some(s) = self.members[i].sync.as_mut() {
                    s.next += len;
                    s.inflight += 1;
                }
                self.tick.1 += len;
                io.request(
                    source,
                    Bio::read(offset, len),
                    cookie(Kind::Sync, source, slot),
                );
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
            target,
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
        let target = chunk.target;
        match &mut chunk.phase {
            Phase::Reading => {
                if result.is_err() {
                    self.fail_member(io, consumer, "read error");
                    self.retry_read(io, slot, bio);
                    return;
                }
                chunk.phase = Phase::Writing;
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
            Phase::Writing => {
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
        let abandoned = self.chunks.get_mut(slot).is_none_or(|c| c.abandoned);
        let src = if abandoned { None } else { self.pick_reader() };
        let Some(src) = src else {
            if let Some(c) = self.chunks.remove(slot) {
                self.sync_request_over(c.target);
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
