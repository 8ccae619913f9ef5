//! Work the array does on its own: metadata records, the rebuild and
//! resync jobs, scrub, and the log replay at assembly.

use super::layout::{combine, page_list, with_page, Mix, Source, COLUMN};
use super::ppl::{self, Entry};
use super::{
    cookie, plan16, Job, JobKind, Kind, MemberState, OpKind, Phase, Raid5Geom, CHECKPOINT_ROWS,
    CLASS_NAME, JOB_TICK_BYTES,
};
use crate::bio::{Bio, BioCmd, BioError, BioResult};
use crate::meta::{MetaRepr, PARAMS, TAIL_LEN};
use crate::page::{Page, SgList, PAGE_SIZE};
use crate::stack::Io;
use alloc::string::String;
use alloc::vec::Vec;

/// Parameter words of a raid5 record.
pub(super) const P_UNIT: usize = 0;
pub(super) const P_ROWS: usize = 1;
pub(super) const P_SLOTS: usize = 2;
pub(super) const P_PPL: usize = 3;
/// 0: no job; 1: resync; 2 + i: rebuild of member i.
pub(super) const P_JOB: usize = 4;
/// Rows the job has done, as last recorded.
pub(super) const P_JOB_ROW: usize = 5;
/// The next log sequence number when the record was written (above every
/// entry logged before), so a clean assembly that reads no log goes on
/// above them.
pub(super) const P_SEQ: usize = 6;

/// Record flag: nothing was logged that is not durable (a clean stop):
/// assembly skips the log replay.
pub const FLAG_CLEAN: u32 = 1;

/// Tail magic: the members' states follow, one byte each.
const TAIL_MAGIC: [u8; 4] = *b"R5S1";
/// State bytes in the tail.
const S_ACTIVE: u8 = 0;
const S_REBUILDING: u8 = 1;
const S_GONE: u8 = 2;

/// Replay steps (cookie word).
const R_LOG: u32 = 0;
const R_CHUNK: u32 = 1;
const R_PARITY: u32 = 2;
const R_FLUSH: u32 = 3;

/// The members' states as a record's tail holds them.
pub(super) fn tail_states(meta: &MetaRepr) -> Option<Vec<MemberState>> {
    let t = &meta.tail;
    let n = meta.member_count as usize;
    if t[0..4] != TAIL_MAGIC || t[4] as usize != n || 5 + n > TAIL_LEN - 4 {
        return None;
    }
    let crc = crc32fast::hash(&t[..TAIL_LEN - 4]);
    if t[TAIL_LEN - 4..] != crc.to_le_bytes() {
        return None;
    }
    t[5..5 + n]
        .iter()
        .map(|&b| match b {
            S_ACTIVE => Some(MemberState::Active),
            S_REBUILDING => Some(MemberState::Rebuilding),
            S_GONE => Some(MemberState::Failed),
            _ => None,
        })
        .collect()
}

/// A log replay at assembly.
#[derive(Debug)]
pub(crate) struct Replay {
    started: bool,
    pending: u32,
    /// Each member's log area, as read.
    logs: Vec<Option<SgList>>,
    /// Entries to replay, in sequence order: member, slot, entry.
    entries: Vec<(usize, u64, Entry)>,
    current: usize,
    /// The current entry's chunks, by member.
    chunks: Vec<Option<SgList>>,
    flushing: bool,
    /// Entries replayed and skipped (a member they need is gone).
    pub(super) replayed: u64,
    pub(super) skipped: u64,
}

impl Replay {
    pub(super) fn new(members: usize) -> Replay {
        Replay {
            started: false,
            pending: 0,
            logs: (0..members).map(|_| None).collect(),
            entries: Vec::new(),
            current: 0,
            chunks: (0..members).map(|_| None).collect(),
            flushing: false,
            replayed: 0,
            skipped: 0,
        }
    }
}

impl Raid5Geom {
    /// The record for member `i`.
    pub(super) fn meta_for(&self, i: usize) -> MetaRepr {
        let mut params = [0u64; PARAMS];
        params[P_UNIT] = self.layout.unit;
        params[P_ROWS] = self.layout.rows;
        params[P_SLOTS] = self.layout.slots;
        params[P_PPL] = u64::from(self.ppl);
        params[P_SEQ] = self.next_seq;
        if let Some(j) = &self.job {
            params[P_JOB] = match j.kind {
                JobKind::Resync => 1,
                JobKind::Rebuild(t) => 2 + t as u64,
            };
            params[P_JOB_ROW] = j.persisted;
        }
        let n = self.members.len();
        let mut tail = [0u8; TAIL_LEN];
        tail[0..4].copy_from_slice(&TAIL_MAGIC);
        tail[4] = n as u8;
        for (j, m) in self.members.iter().enumerate() {
            tail[5 + j] = match m.state {
                MemberState::Active => S_ACTIVE,
                MemberState::Rebuilding => S_REBUILDING,
                _ => S_GONE,
            };
        }
        let crc = crc32fast::hash(&tail[..TAIL_LEN - 4]);
        tail[TAIL_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        MetaRepr {
            class: String::from(CLASS_NAME),
            name: self.name.clone(),
            id: self.id,
            generation: self.generation,
            member_index: i as u32,
            member_count: n as u32,
            member_size: self.members[i].media_size,
            sector_size: self.sector,
            flags: if self.clean { FLAG_CLEAN } else { 0 },
            params,
            tail,
        }
    }

    /// A change every record must carry: a new version, written to every
    /// present member. Returns the version.
    pub(super) fn touch_all(&mut self) -> u64 {
        self.meta_version += 1;
        for m in 0..self.members.len() {
            if self.present(m) {
                self.members[m].meta_wanted = true;
            }
        }
        self.meta_version
    }

    /// Starts the record writes that are due; true if any started.
    pub(super) fn issue_metadata(&mut self, io: &mut Io<'_>) -> bool {
        let mut did = false;
        for i in 0..self.members.len() {
            let m = &self.members[i];
            if !m.meta_wanted || m.meta_inflight || !self.present(i) {
                continue;
            }
            let at = m.media_size - u64::from(self.sector);
            let Ok(bytes) = self.meta_for(i).to_sector(self.sector as usize) else {
                self.members[i].meta_wanted = false;
                continue;
            };
            let sg = SgList::from_bytes(&bytes, io.meta_counters());
            let mut bio = Bio::with_data(BioCmd::Write, at, sg);
            bio.fua = true;
            let v = self.meta_version;
            let m = &mut self.members[i];
            m.meta_wanted = false;
            m.meta_inflight = true;
            m.meta_sent = v;
            self.send(io, i, bio, cookie(Kind::Meta, i, 0, 0));
            did = true;
        }
        did
    }

    pub(super) fn meta_done(&mut self, io: &mut Io<'_>, m: usize, result: BioResult) {
        let Some(mem) = self.members.get_mut(m) else {
            return;
        };
        mem.meta_inflight = false;
        if result.is_err() {
            self.fail_member(io, m, "metadata write error");
        } else {
            mem.meta_durable = mem.meta_durable.max(mem.meta_sent);
            if !self.slot_waiters.is_empty() {
                self.grant_slots(io);
            }
        }
    }

    /// True while the event loop must poll: a job's share of this clock
    /// value is spent and it waits for the next.
    pub(super) fn jobs_want_poll(&self) -> bool {
        self.tick_spent
    }

    /// Starts the next step of the replay, the job or the scrub; true if
    /// anything started.
    pub(super) fn pump_jobs(&mut self, io: &mut Io<'_>) -> bool {
        if self.replay.is_some() {
            return self.pump_replay(io);
        }
        if io.has_clock() && io.now_ns() != self.tick.0 {
            self.tick = (io.now_ns(), 0);
        }
        self.tick_spent = false;
        let mut did = false;
        if io.has_clock() && self.tick.1 >= JOB_TICK_BYTES && (self.job.is_some() || self.scrub.running) {
            self.tick_spent = true;
            return false;
        }
        if let Some(j) = &mut self.job {
            if !j.busy && !j.checkpointing {
                let every = CHECKPOINT_ROWS.min(self.layout.rows / 8).max(1);
                if j.next >= self.layout.rows || j.next - j.persisted >= every {
                    j.checkpointing = true;
                    self.start_flush(io, None, true);
                    did = true;
                } else {
                    j.busy = true;
                    let row = j.next;
                    let op = self.new_op(OpKind::Job, row, 0, 0, 0, 0);
                    self.tick.1 += self.layout.unit * self.members.len() as u64;
                    self.lock(io, op);
                    did = true;
                }
            }
        }
        if self.scrub.running && !self.scrub.busy {
            if self.scrub.next >= self.layout.rows {
                self.scrub.running = false;
                self.scrub.done = true;
            } else {
                self.scrub.busy = true;
                let op = self.new_op(OpKind::Scrub, self.scrub.next, 0, 0, 0, 0);
                self.tick.1 += self.layout.unit * self.members.len() as u64;
                self.lock(io, op);
                did = true;
            }
        }
        did
    }

    /// Reads whole chunks of a row for a job or scrub row op: every member
    /// it needs, into fresh pages.
    fn read_chunks(&mut self, io: &mut Io<'_>, op: u32, members: &[usize]) {
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        o.plan += 1;
        o.phase = Phase::Reading;
        o.bufs = (0..self.members.len()).map(|_| None).collect();
        o.pending = members.len() as u32;
        let (row, plan) = (o.row, o.plan);
        if members.is_empty() {
            return self.chunks_ready(io, op);
        }
        for &m in members {
            let bio = Bio::with_data(
                BioCmd::Read,
                self.layout.row_offset(row),
                SgList::alloc(self.layout.unit as usize),
            );
            if !self.send(io, m, bio, cookie(Kind::OpChunk, m, plan16(plan), op)) {
                self.chunk_done(io, op, plan16(plan), m, Bio::flush(), Err(BioError::Io));
            }
        }
    }

    /// A job's row: read what the target's (or the parity's) chunk is
    /// made of.
    pub(super) fn job_row_start(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(row) = self.ops.get(op).map(|o| o.row) else {
            return;
        };
        let Some(kind) = self.job.as_ref().map(|j| j.kind) else {
            return self.finish_op(io, op, Err(BioError::Io));
        };
        let target = match kind {
            JobKind::Rebuild(t) => t,
            JobKind::Resync => self.layout.parity(row),
        };
        let sources: Vec<usize> = (0..self.members.len())
            .filter(|&m| m != target)
            .collect();
        if sources.iter().any(|&m| !self.available(m, row)) || !self.present(target) {
            return self.finish_op(io, op, Err(BioError::Io));
        }
        self.read_chunks(io, op, &sources);
    }

    /// A scrub's row: read every member's chunk.
    pub(super) fn scrub_row_start(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(row) = self.ops.get(op).map(|o| o.row) else {
            return;
        };
        let all: Vec<usize> = (0..self.members.len()).collect();
        if all.iter().any(|&m| !self.available(m, row)) {
            self.scrub.rows_skipped += 1;
            return self.finish_op(io, op, Ok(()));
        }
        self.read_chunks(io, op, &all);
    }

    /// A whole-chunk read or write of a job or scrub came back.
    pub(super) fn chunk_done(
        &mut self,
        io: &mut Io<'_>,
        op: u32,
        plan: u32,
        m: usize,
        bio: Bio,
        result: BioResult,
    ) {
        if self.ops.get(op).is_none_or(|o| plan16(o.plan) != plan) {
            return;
        }
        if result.is_err() {
            self.fail_member(io, m, "error during a rebuild or scrub");
            if let Some(o) = self.ops.get_mut(op) {
                o.result = Err(BioError::Io);
            }
        }
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        if o.phase == Phase::Reading && bio.cmd == BioCmd::Read {
            if let Some(b) = o.bufs.get_mut(m) {
                *b = Some(bio.sg);
            }
        }
        o.pending -= 1;
        if o.pending > 0 {
            return;
        }
        if o.phase == Phase::Writing || o.result.is_err() {
            let r = o.result;
            return self.finish_op(io, op, r);
        }
        self.chunks_ready(io, op);
    }

    /// XOR of the chunks read, column by column, into the first one's pages.
    fn xor_chunks(&self, io: &Io<'_>, bufs: &[SgList]) -> Result<(), BioError> {
        // Jobs are not the data path: their maps count apart, with the
        // metadata I/O.
        let counters = io.meta_counters();
        let first = bufs.first().ok_or(BioError::Io)?;
        for (c, dst) in first.iter().enumerate() {
            let src: Vec<Source<'_>> = bufs[1..]
                .iter()
                .map(|sg| Source { sg, at: c as u64 * COLUMN, to: 0, len: PAGE_SIZE, mix: Mix::Xor })
                .collect();
            combine(&dst.page, &src, counters)?;
        }
        Ok(())
    }

    fn chunks_ready(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        let bufs: Vec<SgList> = o.bufs.iter_mut().filter_map(|b| b.take()).collect();
        let (kind, row, plan) = (o.kind, o.row, o.plan);
        if let Err(e) = self.xor_chunks(io, &bufs) {
            return self.finish_op(io, op, Err(e));
        }
        if kind == OpKind::Scrub {
            let counters = io.meta_counters();
            let mut bad = 0;
            for r in bufs[0].iter() {
                if with_page(&r.page, counters, |b| b.iter().any(|&x| x != 0)).unwrap_or(true) {
                    bad += 1;
                }
            }
            self.scrub.mismatches += bad;
            self.scrub.rows_checked += 1;
            return self.finish_op(io, op, Ok(()));
        }
        let target = match self.job.as_ref().map(|j| j.kind) {
            Some(JobKind::Rebuild(t)) => t,
            Some(JobKind::Resync) => self.layout.parity(row),
            None => return self.finish_op(io, op, Err(BioError::Io)),
        };
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        o.phase = Phase::Writing;
        o.pending = 1;
        let sg = bufs.into_iter().next().unwrap_or_default();
        let bio = Bio::with_data(BioCmd::Write, self.layout.row_offset(row), sg);
        // The target's cached blocks of the row are now stale.
        let b = self.layout.block(target, row, 0);
        self.cache.invalidate(b..b + self.layout.columns());
        if !self.send(io, target, bio, cookie(Kind::OpChunk, target, plan16(plan), op)) {
            self.chunk_done(io, op, plan16(plan), target, Bio::flush(), Err(BioError::Io));
        }
    }

    /// A job's row is done.
    pub(super) fn job_row_done(&mut self, io: &mut Io<'_>, result: BioResult) {
        let _ = io;
        let Some(j) = &mut self.job else {
            return;
        };
        j.busy = false;
        if result.is_ok() {
            j.next += 1;
        } else {
            // A member the job needs failed; the job is over.
            self.abandon_job();
        }
    }

    /// A member the job needs failed: the job is over, and a member it was
    /// rebuilding holds nothing the array can use.
    fn abandon_job(&mut self) {
        if let Some(JobKind::Rebuild(t)) = self.job.as_ref().map(|j| j.kind) {
            if self.members[t].state == MemberState::Rebuilding {
                self.members[t].state = MemberState::Failed;
                self.members[t].why = Some(String::from("rebuild failed"));
            }
        }
        self.job = None;
        self.generation += 1;
        self.barrier = self.touch_all();
    }

    /// The flush before a job's checkpoint (or its end) came back.
    pub(super) fn job_flushed(&mut self, io: &mut Io<'_>, result: BioResult) {
        let _ = io;
        let rows = self.layout.rows;
        let Some(j) = &mut self.job else {
            return;
        };
        j.checkpointing = false;
        if result.is_err() {
            // A member failed its flush and left: the job cannot go on.
            self.abandon_job();
            return;
        }
        j.persisted = j.next;
        if j.next >= rows {
            if let JobKind::Rebuild(t) = j.kind {
                self.members[t].state = MemberState::Active;
                self.members[t].why = None;
            }
            self.job = None;
            self.generation += 1;
        }
        self.touch_all();
    }

    pub(super) fn scrub_row_done(&mut self, io: &mut Io<'_>) {
        let _ = io;
        self.scrub.busy = false;
        self.scrub.next += 1;
    }

    /// Starts a scrub from the first row.
    pub(super) fn start_scrub(&mut self) {
        self.scrub = super::Scrub {
            running: true,
            ..super::Scrub::default()
        };
    }

    /// Starts a job (a rebuild of `kind`'s member from `from`).
    pub(super) fn start_job(&mut self, kind: JobKind, from: u64) {
        self.job = Some(Job {
            kind,
            next: from,
            persisted: from,
            busy: false,
            checkpointing: false,
        });
    }

    // ---- replay ----

    fn pump_replay(&mut self, io: &mut Io<'_>) -> bool {
        let Some(r) = &mut self.replay else {
            return false;
        };
        if r.started {
            return false;
        }
        r.started = true;
        let readers: Vec<usize> = (0..self.members.len())
            .filter(|&m| self.present(m))
            .collect();
        let len = self.layout.slots * self.layout.slot_bytes();
        if readers.is_empty() || len == 0 {
            self.replay_next(io);
            return true;
        }
        if let Some(r) = &mut self.replay {
            r.pending = readers.len() as u32;
        }
        for m in readers {
            let bio = Bio::with_data(BioCmd::Read, self.layout.log_start(), SgList::alloc(len as usize));
            if !self.send(io, m, bio, cookie(Kind::Replay, m, R_LOG, 0)) {
                self.replay_done(io, m, R_LOG, 0, Bio::flush(), Err(BioError::Io));
            }
        }
        true
    }

    /// A replay read, write or flush came back.
    pub(super) fn replay_done(
        &mut self,
        io: &mut Io<'_>,
        m: usize,
        step: u32,
        _b: u32,
        bio: Bio,
        result: BioResult,
    ) {
        if result.is_err() {
            self.fail_member(io, m, "error while replaying the log");
        }
        let Some(r) = &mut self.replay else {
            return;
        };
        match step {
            R_LOG if result.is_ok() && bio.cmd == BioCmd::Read => r.logs[m] = Some(bio.sg),
            R_CHUNK if result.is_ok() && bio.cmd == BioCmd::Read => r.chunks[m] = Some(bio.sg),
            _ => {}
        }
        r.pending -= 1;
        if r.pending > 0 {
            return;
        }
        match step {
            R_LOG => {
                self.collect_entries(io);
                self.replay_next(io);
            }
            R_CHUNK => self.replay_compute(io),
            R_PARITY => {
                if let Some(r) = &mut self.replay {
                    r.current += 1;
                }
                self.replay_next(io);
            }
            _ => self.replay_finish(io),
        }
    }

    /// Parses every slot read, keeps this array's entries above the
    /// highest watermark, in sequence order.
    fn collect_entries(&mut self, io: &mut Io<'_>) {
        let Some(r) = &mut self.replay else {
            return;
        };
        let counters = io.meta_counters();
        let spp = 1 + self.layout.columns() as usize;
        let mut found: Vec<(usize, u64, Entry)> = Vec::new();
        let mut max_seq = 0;
        let mut watermark = 0;
        for (m, log) in r.logs.iter().enumerate() {
            let Some(log) = log else { continue };
            let pages: Vec<Page> = log.iter().map(|p| p.page.clone()).collect();
            for slot in 0..self.layout.slots as usize {
                let Some(head) = pages.get(slot * spp) else { break };
                let mut h = [0u8; PAGE_SIZE];
                if head.copy_out(0, &mut h, counters).is_err() {
                    continue;
                }
                let Some(e) = Entry::parse(&h, self.layout.data(), self.layout.unit) else {
                    continue;
                };
                if e.id != self.id || e.row >= self.layout.rows || self.layout.parity(e.row) != m {
                    continue;
                }
                let mut pp = Vec::new();
                if e.has_pp {
                    for i in 0..e.mask.count_ones() as usize {
                        let mut b = [0u8; PAGE_SIZE];
                        if let Some(pg) = pages.get(slot * spp + 1 + i) {
                            let _ = pg.copy_out(0, &mut b, counters);
                        }
                        pp.push(b);
                    }
                }
                let refs: Vec<&[u8]> = pp.iter().map(|b| &b[..]).collect();
                if ppl::checksum(&h, &refs, self.id) != ppl::sealed(&h) {
                    continue;
                }
                max_seq = max_seq.max(e.seq);
                watermark = u64::max(watermark, e.watermark);
                found.push((m, slot as u64, e));
            }
        }
        found.retain(|(_, _, e)| e.seq > watermark);
        found.sort_by_key(|(_, _, e)| e.seq);
        r.entries = found;
        self.next_seq = self.next_seq.max(max_seq + 1);
    }

    /// Reads the chunks the current entry needs, or goes to the flush.
    fn replay_next(&mut self, io: &mut Io<'_>) {
        loop {
            let Some(r) = &self.replay else {
                return;
            };
            let Some((m, _, e)) = r.entries.get(r.current).cloned() else {
                return self.replay_flush(io);
            };
            let row = e.row;
            let need: Vec<usize> = (0..self.layout.data())
                .filter(|&k| e.written[k].0 < e.written[k].1)
                .map(|k| self.layout.member(row, k))
                .collect();
            if !self.available(m, row) {
                let r = self.replay.as_mut().expect("replay");
                r.skipped += 1;
                r.current += 1;
                continue;
            }
            // Bytes written to a member that is gone now keep the parity
            // on disk (read too); all others are made to match.
            let mut need: Vec<usize> = need.into_iter().filter(|&x| self.available(x, row)).collect();
            need.push(m);
            let r = self.replay.as_mut().expect("replay");
            r.chunks.iter_mut().for_each(|c| *c = None);
            r.pending = need.len() as u32;
            for x in need {
                let bio = Bio::with_data(
                    BioCmd::Read,
                    self.layout.row_offset(row),
                    SgList::alloc(self.layout.unit as usize),
                );
                if !self.send(io, x, bio, cookie(Kind::Replay, x, R_CHUNK, 0)) {
                    self.replay_done(io, x, R_CHUNK, 0, Bio::flush(), Err(BioError::Io));
                }
            }
            return;
        }
    }

    /// parity = partial parity XOR the data on disk, for each column of
    /// the current entry; then written.
    fn replay_compute(&mut self, io: &mut Io<'_>) {
        let Some(r) = &self.replay else {
            return;
        };
        let Some((m, slot, e)) = r.entries.get(r.current).cloned() else {
            return self.replay_flush(io);
        };
        let counters = io.meta_counters();
        let spp = 1 + self.layout.columns() as usize;
        let log_pages: Vec<Page> = r.logs[m]
            .as_ref()
            .map(|l| l.iter().map(|p| p.page.clone()).collect())
            .unwrap_or_default();
        let mut writes: Vec<(u64, Page)> = Vec::new();
        let mut i = 0;
        let mut partial = false;
        for c in 0..self.layout.columns() {
            if e.mask & (1 << c) == 0 {
                continue;
            }
            let Ok(dst) = Page::try_new_zeroed() else {
                return self.replay_abort(io);
            };
            let pp_list = if e.has_pp {
                log_pages
                    .get(slot as usize * spp + 1 + i)
                    .map(page_list)
            } else {
                None
            };
            i += 1;
            let mut src: Vec<Source<'_>> = Vec::new();
            if let Some(pp) = &pp_list {
                src.push(Source { sg: pp, at: 0, to: 0, len: PAGE_SIZE, mix: Mix::Xor });
            }
            let (cs, ce) = (c * COLUMN, (c + 1) * COLUMN);
            let mut keep = Vec::new();
            for k in 0..self.layout.data() {
                let (s, en) = (u64::from(e.written[k].0), u64::from(e.written[k].1));
                let (ws, we) = (s.max(cs), en.min(ce));
                if ws >= we {
                    continue;
                }
                let x = self.layout.member(e.row, k);
                match &r.chunks[x] {
                    Some(sg) if x != m => src.push(Source { sg, at: ws, to: (ws - cs) as usize, len: (we - ws) as usize, mix: Mix::Xor }),
                    _ => keep.push((ws, we)),
                }
            }
            if !keep.is_empty() {
                partial = true;
            }
            if let Some(old) = &r.chunks[m] {
                for (ws, we) in keep {
                    src.push(Source { sg: old, at: ws, to: (ws - cs) as usize, len: (we - ws) as usize, mix: Mix::Copy });
                }
            }
            if combine(&dst, &src, counters).is_err() {
                return self.replay_abort(io);
            }
            writes.push((self.layout.row_offset(e.row) + cs, dst));
        }
        let r = self.replay.as_mut().expect("replay");
        if partial {
            r.skipped += 1;
        } else {
            r.replayed += 1;
        }
        r.pending = writes.len() as u32;
        // The row's cached parity is stale now.
        let b = self.layout.block(m, e.row, 0);
        self.cache.invalidate(b..b + self.layout.columns());
        if writes.is_empty() {
            r.pending = 1;
            return self.replay_done(io, m, R_PARITY, 0, Bio::flush(), Ok(()));
        }
        for (at, pg) in writes {
            let bio = Bio::with_data(BioCmd::Write, at, page_list(&pg));
            if !self.send(io, m, bio, cookie(Kind::Replay, m, R_PARITY, 0)) {
                self.replay_done(io, m, R_PARITY, 0, Bio::flush(), Err(BioError::Io));
            }
        }
    }

    fn replay_abort(&mut self, io: &mut Io<'_>) {
        if let Some(r) = &mut self.replay {
            r.entries.clear();
        }
        self.replay_flush(io);
    }

    fn replay_flush(&mut self, io: &mut Io<'_>) {
        let targets: Vec<usize> = (0..self.members.len()).filter(|&m| self.present(m)).collect();
        let Some(r) = &mut self.replay else {
            return;
        };
        if r.flushing {
            return;
        }
        r.flushing = true;
        r.pending = targets.len() as u32;
        if targets.is_empty() {
            return self.replay_finish(io);
        }
        for m in targets {
            if !self.send(io, m, Bio::flush(), cookie(Kind::Replay, m, R_FLUSH, 0)) {
                self.replay_done(io, m, R_FLUSH, 0, Bio::flush(), Err(BioError::Io));
            }
        }
    }

    /// The replay is done: every entry is durable, the log is free, and
    /// the requests that waited run.
    fn replay_finish(&mut self, io: &mut Io<'_>) {
        let Some(r) = self.replay.take() else {
            return;
        };
        self.replay_stats = (r.replayed, r.skipped);
        self.watermark = self.next_seq - 1;
        for s in self.slots.iter_mut() {
            s.iter_mut().for_each(|x| *x = 0);
        }
        while let Some(bio) = self.queued.pop_front() {
            self.start_request(io, bio);
        }
    }
}

