//! The raid5 class: provider `raid5/NAME` over three or more members,
//! one chunk of each row holding the parity (XOR) of the others, so any
//! one member can be lost.
//!
//! ```text
//!                          raid5/NAME
//!                              │ start                      ▲ deliver
//!          ┌───────────────────▼───────────────────────────┴────┐
//!          │ Raid5Geom                                         │
//!          │  reads: routed to the data members, the caller's  │
//!          │   pages sliced (no map); a chunk on a missing     │
//!          │   member: rebuilt from the row (maps)             │
//!          │  writes: cut per row; a row takes writes one at a │
//!          │   time: old blocks from the stripe cache, parity  │
//!          │   computed (maps), partial parity logged on the   │
//!          │   parity member, then data and parity written     │
//!          │  stripe cache: a bufcache instance of 4 KiB       │
//!          │   blocks over the members (ConsumerStore)         │
//!          │  jobs: rebuild onto a member, initial parity      │
//!          │   resync, scrub; a row at a time, paced           │
//!          └──────┬──────────────┬──────────────┬──────────────┘
//!                 ▼              ▼              ▼
//!             member 0       member 1       member 2 …
//!     [data rows][partial parity log slots][metadata sector]
//! ```
//!
//! **Layout** (`layout`): left-symmetric, every row at the same offset on
//! every member. **Writes** (`io`): the choice between read-modify-write
//! (read the old data being replaced and the old parity) and
//! reconstruct-write (read the data not being replaced) is md's: fewest
//! reads, reconstruct on a tie; a full-row write reads nothing. A row
//! whose data member is missing is written by reconstructing that chunk
//! first. **The write hole** (`ppl`): before a row changes, its partial
//! parity is logged (FUA) on the row's parity member; assembly replays
//! the log, so after a power cut every row's parity matches its data.
//! **Members**: a member that fails a request leaves the array (it runs
//! degraded); the generation is bumped and written to the members left
//! before any write that member missed is acknowledged. A second member
//! lost makes the rows that lost two chunks fail with EIO. **Jobs**
//! (`jobs`): a rebuild copies the reconstructed rows onto a new or
//! returning member, its progress in every member's record, so it resumes
//! after a restart; the initial resync computes every row's parity once
//! after a label; scrub checks every row's parity and counts mismatches.
//!
//! ```text
//! raid5 label [-s UNIT] [-n] NAME PROVIDER PROVIDER PROVIDER...
//! raid5 insert NAME PROVIDER      # rebuild onto a spare
//! raid5 remove NAME PROVIDER
//! raid5 scrub NAME
//! raid5 destroy [-f] NAME
//! raid5 clear PROVIDER...
//! ```

mod ctl;
mod io;
mod jobs;
pub mod layout;
pub mod ppl;
#[cfg(test)]
mod tests;

pub use ctl::{Raid5Class, Raid5Label, Raid5Member, Raid5Scrub, CLASS};

use crate::bio::{Bio, BioResult, ConsumerId, ProviderId};
use crate::cachestore::ConsumerStore;
use crate::page::{Page, SgList};
use crate::slab::Slab;
use crate::stack::{Geom, Io};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use bufcache::{Cache, Handle};
use layout::Layout;
use serde_json::{json, Value};

/// The class name.
pub const CLASS_NAME: &str = "raid5";
/// Default stripe unit.
pub const DEFAULT_UNIT: u64 = 64 * 1024;
/// Bytes of stripe cache per array.
pub const CACHE_BYTES: u64 = 4 << 20;
/// Most rows a job (rebuild, resync) copies between two records of its
/// progress (an eighth of the rows on a small array).
pub const CHECKPOINT_ROWS: u64 = 256;
/// Bytes a job may move per clock value (one run of the event loop), so
/// a fast device cannot keep the stack busy with it while clients wait.
pub const JOB_TICK_BYTES: u64 = 1 << 20;

/// A member's place in the array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Holds its chunks.
    Active,
    /// Being rebuilt: valid below the job's row.
    Rebuilding,
    /// Not there (never tasted, removed).
    Missing,
    /// Failed a request, or came back stale; holds nothing the array uses.
    Failed,
}

impl MemberState {
    fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Rebuilding => "rebuilding",
            MemberState::Missing => "missing",
            MemberState::Failed => "failed",
        }
    }
}

/// One place of the array.
#[derive(Debug)]
pub(crate) struct Member {
    consumer: Option<ConsumerId>,
    name: Option<String>,
    media_size: u64,
    state: MemberState,
    why: Option<String>,
    inflight: u32,
    meta_wanted: bool,
    meta_inflight: bool,
    meta_sent: u64,
    meta_durable: u64,
}

impl Member {
    fn absent() -> Member {
        Member {
            consumer: None,
            name: None,
            media_size: 0,
            state: MemberState::Missing,
            why: None,
            inflight: 0,
            meta_wanted: false,
            meta_inflight: false,
            meta_sent: 0,
            meta_durable: 0,
        }
    }
}

/// What a job does to each row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// Compute every row's parity (after a label).
    Resync,
    /// Rebuild member `i`.
    Rebuild(usize),
}

/// A running rebuild or resync.
#[derive(Debug)]
pub(crate) struct Job {
    kind: JobKind,
    /// Rows below it are done.
    next: u64,
    /// The row recorded in the members' metadata.
    persisted: u64,
    /// A row of it is in flight.
    busy: bool,
    /// The flush before recording progress is in flight.
    checkpointing: bool,
}

/// The scrub's progress.
#[derive(Debug, Default)]
pub(crate) struct Scrub {
    running: bool,
    done: bool,
    next: u64,
    busy: bool,
    rows_checked: u64,
    rows_skipped: u64,
    mismatches: u64,
}

/// A client request being served.
#[derive(Debug)]
pub(crate) struct Parent {
    bio: Bio,
    pending: u32,
    result: BioResult,
    /// Pages of zeroes standing in for a write-zeroes' or discard's data.
    zeroes: Option<SgList>,
    /// Pieces rebuilt for a read (offset in the request, bytes), copied
    /// into its pages when every child is back.
    fills: Vec<(u64, SgList)>,
}

/// What a row operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// A client write (or write-zeroes) to the row.
    Write,
    /// A client read of a chunk on a missing member.
    Rebuilt,
    /// A job's row.
    Job,
    /// A scrub's row.
    Scrub,
}

/// Phases of a row operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the row lock.
    Queued,
    /// Waiting for blocks (stripe cache, or reads of whole chunks).
    Reading,
    /// Waiting for a flush of the members: the row holds unflushed bytes
    /// the write does not cover (see [`Raid5Geom::unflushed`]).
    FlushWait,
    /// Waiting for a log slot.
    SlotWait,
    /// The log entry is being written.
    Logging,
    /// Data and parity are being written.
    Writing,
}

/// One operation on one row; operations on a row run one at a time.
#[derive(Debug)]
pub(crate) struct RowOp {
    kind: OpKind,
    phase: Phase,
    row: u64,
    parent: u32,
    /// Byte of the parent where the op's first byte is.
    at: u64,
    /// Row-relative byte range (chunk k byte j is `k·unit + j`).
    start: u64,
    end: u64,
    /// Plan number: completions of an abandoned plan are ignored.
    plan: u32,
    /// Columns touched.
    col0: u64,
    col1: u64,
    /// Cache handles, by member and column (`member · cols + col - col0`).
    blocks: Vec<Option<Handle>>,
    /// Parity pages being written (mirrors `blocks` of the parity member).
    pending: u32,
    /// Whole-chunk buffers (jobs and scrub), by member.
    bufs: Vec<Option<SgList>>,
    /// Partial parity pages, by column.
    pp: Vec<Page>,
    /// Log slot and sequence number.
    slot: Option<(usize, u64, u64)>,
    /// Columns whose parity changes (bit `c`), as the log entry records.
    mask: u64,
    /// Members that could not serve the row when the op was planned.
    down: u64,
    /// Stripe-cache blocks reserved for its pins.
    reserved: usize,
    /// A member failed under this op (its result is decided at the end).
    failed_io: bool,
    result: BioResult,
}

/// A member flush round: a client FLUSH, or a checkpoint of the log.
#[derive(Debug)]
pub(crate) struct FlushRound {
    pending: u32,
    /// Sequence numbers up to this were complete when it was sent.
    watermark: u64,
    /// Its number among the rounds sent (from 1).
    round: u64,
    /// Client flush waiting for it.
    parent: Option<u32>,
    /// A job's checkpoint.
    job: bool,
    /// No write was in flight when it was sent: `writes` says whether
    /// one started since.
    idle: bool,
    /// The array's count of writes started when it was sent.
    writes: u64,
    result: BioResult,
}

/// A direct read of a client's request on one member.
#[derive(Debug)]
pub(crate) struct DirectRead {
    parent: u32,
    member: usize,
    /// The pieces it covers (retried by reconstruction if it fails).
    pieces: Vec<layout::Piece>,
}

/// The raid5 geom.
pub struct Raid5Geom {
    name: String,
    id: u64,
    provider: ProviderId,
    layout: Layout,
    sector: u32,
    ppl: bool,
    labelled: bool,
    generation: u64,
    members: Vec<Member>,
    cache: Cache<ConsumerStore>,
    parents: Slab<Parent>,
    ops: Slab<RowOp>,
    reads: Slab<DirectRead>,
    /// Per row with operations: the queue, the head holding the row.
    locks: BTreeMap<u64, VecDeque<u32>>,
    /// Per member, per log slot: the sequence number it holds (0: free).
    slots: Vec<Vec<u64>>,
    next_seq: u64,
    /// Sequence numbers logged whose writes are not all back.
    incomplete: BTreeSet<u64>,
    /// Every entry up to it is durable.
    watermark: u64,
    /// Per row a logged write left since the members' last flush: the
    /// flush rounds sent when it ended, and per data chunk the hull of the
    /// bytes written. A partial parity counts every byte outside its own
    /// write as it is in memory, so a later write whose range does not
    /// cover these waits for a flush: a cut could keep its log entry and
    /// lose the earlier bytes, and its replay would leave parity that
    /// matches neither.
    unflushed: BTreeMap<u64, (u64, Vec<(u64, u64)>)>,
    /// Flush rounds sent.
    flush_rounds: u64,
    /// Ops waiting for a flush round to make their row's earlier writes
    /// durable.
    flush_waiters: VecDeque<u32>,
    /// Ops waiting for a log slot.
    slot_waiters: VecDeque<u32>,
    /// Ops waiting for their data pages to come back from a device.
    busy_waiters: VecDeque<u32>,
    /// Stripe-cache blocks the ops planned hold or will pin.
    reserved: usize,
    /// Ops waiting for room in the stripe cache, in order.
    room_waiters: VecDeque<u32>,
    flushes: Slab<FlushRound>,
    checkpoint_inflight: bool,
    job: Option<Job>,
    scrub: Scrub,
    /// Assembly's log replay, while it runs (requests wait).
    replay: Option<jobs::Replay>,
    /// Entries the last replay replayed and skipped.
    replay_stats: (u64, u64),
    queued: VecDeque<Bio>,
    meta_version: u64,
    /// The records say clean (see `jobs::FLAG_CLEAN`).
    clean: bool,
    /// Write operations started since assembly: a flush says clean only
    /// if none started while it was in flight.
    writes_started: u64,
    /// The version of the records that stopped saying clean.
    dirty_version: u64,
    /// Write completions wait until every present member's record holds
    /// this version (a member dropped: the others must say so first).
    barrier: u64,
    parked: VecDeque<u32>,
    /// Job pacing: (clock value, bytes moved at it).
    tick: (u64, u64),
    tick_spent: bool,
}

/// Cookie kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Direct = 1,
    OpData = 2,
    OpParity = 3,
    OpLog = 4,
    OpChunk = 5,
    Cache = 6,
    Meta = 7,
    Flush = 8,
    Replay = 9,
}

/// A cookie: kind, member, a 16-bit word (a plan number) and a 32-bit
/// one (an op, a round); the stripe cache's use the low 48 bits for its
/// tag.
pub(crate) fn cookie(kind: Kind, member: usize, a: u32, b: u32) -> u64 {
    ((kind as u64) << 56) | ((member as u64 & 0xff) << 48) | (u64::from(a & 0xffff) << 32) | u64::from(b)
}

/// Kind, member, the 16-bit word and the 32-bit one of a cookie.
pub(crate) fn uncookie(c: u64) -> (u8, usize, u32, u32) {
    ((c >> 56) as u8, ((c >> 48) & 0xff) as usize, ((c >> 32) & 0xffff) as u32, c as u32)
}

/// Plan numbers as cookies carry them.
pub(crate) fn plan16(plan: u32) -> u32 {
    plan & 0xffff
}

impl Raid5Geom {
    /// The provider name of array `name`.
    pub fn provider_name(name: &str) -> String {
        alloc::format!("raid5/{name}")
    }

    /// True when member `m` holds valid chunks of row `row`.
    pub(super) fn available(&self, m: usize, row: u64) -> bool {
        let mem = &self.members[m];
        match mem.state {
            MemberState::Active => mem.consumer.is_some(),
            MemberState::Rebuilding => {
                mem.consumer.is_some()
                    && self
                        .job
                        .as_ref()
                        .is_some_and(|j| j.kind == JobKind::Rebuild(m) && row < j.next)
            }
            _ => false,
        }
    }

    /// Members that cannot serve row `row`.
    fn unavailable(&self, row: u64) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&m| !self.available(m, row))
            .collect()
    }

    /// Members with a consumer that I/O may go to (active or rebuilding).
    pub(super) fn present(&self, m: usize) -> bool {
        let mem = &self.members[m];
        mem.consumer.is_some()
            && matches!(mem.state, MemberState::Active | MemberState::Rebuilding)
    }

    pub(super) fn state_name(&self) -> &'static str {
        let down = self
            .members
            .iter()
            .filter(|m| m.state != MemberState::Active)
            .count();
        let rebuilding = self.job.is_some();
        let lost = self
            .members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Missing | MemberState::Failed))
            .count();
        if lost + usize::from(self.members.iter().any(|m| m.state == MemberState::Rebuilding)) > 1
        {
            "failed"
        } else if rebuilding {
            "rebuilding"
        } else if down > 0 {
            "degraded"
        } else {
            "complete"
        }
    }

    /// Sends a bio to member `m` (its cookie must name `m`), counted in
    /// flight.
    pub(super) fn send(&mut self, io: &mut Io<'_>, m: usize, bio: Bio, cookie: u64) -> bool {
        let Some(c) = self.members[m].consumer else {
            return false;
        };
        self.members[m].inflight += 1;
        io.request(c, bio, cookie);
        true
    }

    /// Hands the stripe cache's queued I/O to the members, and answers
    /// what cannot be sent.
    fn pump_cache(&mut self, io: &mut Io<'_>) {
        while let Some(s) = self.cache.store_mut().take() {
            match s {
                crate::cachestore::Submit::Bio { consumer, bio, tag } => {
                    let m = self.member_of(consumer).unwrap_or(0);
                    self.members[m].inflight += 1;
                    let ck = cookie(Kind::Cache, m, 0, 0) | (tag.0 & 0xffff_ffff_ffff);
                    io.request(consumer, bio, ck);
                }
                crate::cachestore::Submit::Failed { tag, buf } => {
                    self.cache.complete(tag, buf, Err(bufcache::Error::Io));
                }
            }
        }
    }

    /// Everything that follows an event: cache answers, queued work,
    /// metadata, jobs.
    pub(super) fn after_event(&mut self, io: &mut Io<'_>) {
        loop {
            self.pump_cache(io);
            let mut any = false;
            while let Some(r) = self.cache.take_ready() {
                any = true;
                self.cache_ready(io, r);
            }
            self.pump_cache(io);
            any |= self.issue_metadata(io);
            any |= self.release_parked(io);
            any |= self.pump_jobs(io);
            if !any {
                break;
            }
        }
        self.reap_members(io);
    }

    /// Closes and detaches the consumers of members that left, once idle.
    fn reap_members(&mut self, io: &mut Io<'_>) {
        for m in 0..self.members.len() {
            let mem = &self.members[m];
            if matches!(mem.state, MemberState::Missing | MemberState::Failed)
                && mem.inflight == 0
                && !mem.meta_inflight
            {
                if let Some(c) = self.members[m].consumer.take() {
                    self.cache.store_mut().set_member(m, None);
                    let a = io.consumer(c).access;
                    let _ = io.access(c, -a.r, -a.w, -a.e);
                    let _ = io.detach(c);
                }
            }
        }
    }

    fn member_of(&self, c: ConsumerId) -> Option<usize> {
        self.members.iter().position(|m| m.consumer == Some(c))
    }
}

impl Geom for Raid5Geom {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        if self.replay.is_some() {
            self.queued.push_back(bio);
            return;
        }
        self.start_request(io, bio);
        self.after_event(io);
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, bio: Bio, result: BioResult) {
        self.io_done(io, cookie, bio, result);
        self.after_event(io);
    }

    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        let did = self.pump_jobs(io);
        self.after_event(io);
        did
    }

    fn wants_poll(&self) -> bool {
        self.jobs_want_poll()
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        (self.tick_spent && self.job.is_some()).then_some(self.tick.0 + 1)
    }

    fn settling(&self) -> bool {
        self.replay.is_some()
            || (0..self.members.len()).any(|m| {
                let mem = &self.members[m];
                mem.meta_inflight || (mem.meta_wanted && self.present(m))
            })
    }

    fn orphan(&mut self, io: &mut Io<'_>, consumer: ConsumerId) {
        if let Some(m) = self.member_of(consumer) {
            self.fail_member(io, m, "its provider went away");
        }
        self.after_event(io);
    }

    fn caches(&self) -> Vec<(String, bufcache::Stats, u64)> {
        alloc::vec![(
            Raid5Geom::provider_name(&self.name),
            self.cache.stats(),
            layout::COLUMN,
        )]
    }

    fn dumpconf(&self) -> Value {
        let s = self.cache.stats();
        json!({
            "state": self.state_name(),
            "stripe_unit": self.layout.unit,
            "rows": self.layout.rows,
            "members": self.members.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            "ppl": self.ppl,
            "log_slots": self.layout.slots,
            "generation": self.generation,
            "id": self.id,
            "cache": {"hits": s.hits, "misses": s.misses, "evictions": s.evictions,
                      "blocks": s.blocks, "capacity": s.capacity},
            "status": self.status_json(),
        })
    }

    fn as_any(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }
}
