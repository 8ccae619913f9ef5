//! The mirror class, after FreeBSD's gmirror: provider `mirror/NAME`, every
//! member holding the same bytes.
//!
//! ```text
//!                         mirror/NAME
//!                              │ start                 ▲ deliver
//!                    ┌─────────▼──────────────────────┴───┐
//!                    │ MirrorGeom                          │
//!                    │  writes: queued while they overlap  │
//!                    │   a write in flight or ahead, then  │
//!                    │   (regions marked dirty first) to   │
//!                    │   every active member, and a        │
//!                    │   synchronizing one below its sync  │
//!                    │   point; flushes: every member      │
//!                    │  reads: one active member (load,    │
//!                    │   round-robin, prefer; split: a     │
//!                    │   slice each), retried on another   │
//!                    │   when it fails; a region still     │
//!                    │   being recovered: the source only  │
//!                    │  resync: chunks read from an active │
//!                    │   member, the same pages written to │
//!                    │   the new one; recovery: the dirty  │
//!                    │   regions of an unclean stop, from  │
//!                    │   the source onto the others        │
//!                    └───┬─────────────┬─────────────┬─────┘
//!                 consumer│     consumer│     consumer│
//!                         ▼             ▼             ▼
//!                     P1 active     P2 active     P3 synchronizing
//!     (last sector of each member: metadata with a generation, and in its
//!      tail the history (epoch and lineage) and the write-intent bitmap)
//! ```
//!
//! **Never lose or mix acknowledged data.** Three mechanisms keep members
//! from disagreeing about what the mirror holds:
//!
//! - *History identity* (`history`): each record names the epoch its data
//!   belongs to and the last epochs before it. A new epoch begins with
//!   the first write after the set of members holding the data shrank (a
//!   member dropped, removed, rebuilt) or after an assembly with members
//!   missing or stale; a completion that arrives while one is due waits
//!   for it, so no write is acknowledged that a member lacking it could
//!   hide after a power cut. A member that boots alone and writes nothing
//!   starts no history. At assembly, a member whose history is an
//!   ancestor of another's is stale: resynchronized from the start, never
//!   trusted, never a source; two members whose histories conflict (each
//!   holds writes the other lacks) are not assembled at all: a refused
//!   mirror holds the name, touches no member, and says why in `/status`,
//!   `/geom` and the taste log. A returning member (`join`) follows the
//!   same rules: behind the mirror it is copied over, newer or in
//!   conflict it is refused and listed.
//! - *Write-intent bitmap* (`intent`): a write to a clean region waits
//!   until a record with its bit set is stable on every member; bits clear
//!   lazily after FLUSHes. At assembly, bits set mean an unclean stop: the
//!   source member's dirty regions are copied onto the others (only
//!   those), and until a region is copied its reads go to the source.
//! - *Ordered overlapping writes* (`io`): a write, discard or write-zeroes
//!   that overlaps one in flight (or queued ahead) waits for it, so every
//!   member applies overlapping writes in the same (arrival) order;
//!   writes that do not overlap go on in parallel.
//!
//! A member that fails a request is dropped from the mirror, which goes on
//! degraded; the generation is bumped and written to the members left, and
//! the next write begins a new epoch. When no active member is left the
//! mirror's requests fail with EIO.
//!
//! The class is split by concern:
//! - `io`: regular requests (the write queue, fan-out of writes and
//!   flushes, balanced and retried reads, dropping a failed member);
//! - `resync`: copying the whole range onto a new member, and dirty
//!   regions onto the others after an unclean stop, interleaved with
//!   regular I/O;
//! - `history`: epochs, lineage, how two records relate, and the tail's
//!   format;
//! - `intent`: the write-intent bitmap and the recovery of dirty regions;
//! - `label`: metadata use (the record, generation and epoch changes,
//!   metadata versions, the plan for assembling from tasted members);
//! - `ctl`: the class as the stack sees it (tasting, assembly, a refused
//!   mirror, config statements) and the operator's commands.
//!
//! ```text
//! mirror create|label [-b load|prefer|round-robin|split] NAME PROVIDER...
//! mirror insert NAME PROVIDER...     # new members, resynchronized live
//! mirror remove NAME PROVIDER...
//! mirror rebuild NAME PROVIDER       # copy over a member that differs; on a
//!                                    # refused mirror: give up PROVIDER's
//!                                    # history, assemble from the others
//! mirror forget NAME                 # forget members that are gone
//! mirror destroy [-f] NAME
//! mirror clear PROVIDER...
//! ```
//!
//! The mirror routes data and never maps it: regular requests share the
//! caller's pages with their children, resync and recovery read into
//! pages that are then written as they are. Only the metadata sector is
//! encoded through a map, counted with the stack's metadata counters,
//! apart from the data path.

mod ctl;
mod history;
mod intent;
mod io;
mod label;
mod resync;
#[cfg(test)]
mod tests;

pub use ctl::{
    create, forget, insert, rebuild, remove, status, MirrorClass, MirrorCreate, MirrorForget,
    MirrorInsert, MirrorRebuild, MirrorRemove, CLASS,
};
pub use history::{
    relate, Epoch, History, Relation, Tail, TailError, BITMAP_BITS, LINEAGE, MIN_REGION_SHIFT,
};
pub use label::FLAG_SYNCHRONIZING;

use crate::bio::{Bio, BioResult, ConsumerId, ProviderId};
use crate::slab::Slab;
use crate::stack::{Geom, Io, StackError};
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{json, Value};

/// The class name, as written in metadata and shown in the topology.
pub const CLASS_NAME: &str = "mirror";

/// Bytes copied by one resync request.
pub const SYNC_CHUNK_BYTES: u64 = 128 * 1024;

/// Bytes of resync started per clock value of the stack (per run of the
/// event loop), once the stack has a clock.
pub const SYNC_TICK_BYTES: u64 = 512 * 1024;

/// Resync requests in flight per synchronizing member.
pub const SYNC_WINDOW: usize = 2;

/// Bytes of resync progress between two writes of a synchronizing
/// member's metadata (its sync offset survives a restart, so a resync
/// resumes instead of starting over).
pub const SYNC_PERSIST_BYTES: u64 = 4 << 20;

/// How a mirror spreads reads over its members (gmirror's `-b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorBalance {
    /// Read from the member with the fewest requests in flight.
    Load,
    /// Read from the preferred (first active) member.
    Prefer,
    /// Read from each member in turn.
    RoundRobin,
    /// Split large reads over all members.
    Split,
}

impl MirrorBalance {
    /// The spelling used in config lines and JSON.
    pub fn name(self) -> &'static str {
        match self {
            MirrorBalance::Load => "load",
            MirrorBalance::Prefer => "prefer",
            MirrorBalance::RoundRobin => "round-robin",
            MirrorBalance::Split => "split",
        }
    }

    /// The balance spelled `s`.
    pub fn from_name(s: &str) -> Option<MirrorBalance> {
        [
            MirrorBalance::Load,
            MirrorBalance::Prefer,
            MirrorBalance::RoundRobin,
            MirrorBalance::Split,
        ]
        .into_iter()
        .find(|b| b.name() == s)
    }
}

/// Metadata code of a read balance (`params[0]`).
fn balance_code(b: MirrorBalance) -> u64 {
    match b {
        MirrorBalance::RoundRobin => 1,
        MirrorBalance::Load => 2,
        MirrorBalance::Split => 3,
        MirrorBalance::Prefer => 4,
    }
}

/// The read balance recorded as `code` (gmirror's default for unknown
/// codes: load).
fn balance_from_code(code: u64) -> MirrorBalance {
    match code {
        1 => MirrorBalance::RoundRobin,
        3 => MirrorBalance::Split,
        4 => MirrorBalance::Prefer,
        _ => MirrorBalance::Load,
    }
}

/// The balance used when a label names none (gmirror's default).
pub const DEFAULT_BALANCE: MirrorBalance = MirrorBalance::Load;

/// The part a member plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Holds the mirror's data; serves reads and receives every write.
    Active,
    /// Being copied onto; holds valid data only below its sync offset and
    /// receives the writes that land there.
    Synchronizing,
}

impl MemberState {
    /// A short lowercase name for status documents.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Synchronizing => "synchronizing",
        }
    }
}

/// The health of the whole mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorState {
    /// Every member is active.
    Complete,
    /// At least one member is active, and some were lost or are being
    /// synchronized.
    Degraded,
    /// No active member is left: requests fail (EIO, then ENXIO once its
    /// provider is orphaned).
    Dead,
    /// Destroyed by the operator: it serves no more and goes away once
    /// nothing is in flight.
    Destroyed,
}

impl MirrorState {
    /// A short lowercase name for status documents.
    pub fn name(self) -> &'static str {
        match self {
            MirrorState::Complete => "complete",
            MirrorState::Degraded => "degraded",
            MirrorState::Dead => "dead",
            MirrorState::Destroyed => "destroyed",
        }
    }
}

/// One member as reported by [`MirrorStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's provider.
    pub provider: String,
    /// Its part in the mirror.
    pub state: MemberState,
    /// Bytes known to hold the mirror's data (the whole range when active).
    pub synced_bytes: u64,
    /// Bytes of the mirror's range.
    pub total_bytes: u64,
}

/// A snapshot of a mirror, for `/status`, `GET /geom` and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorStatus {
    /// The mirror's name (`NAME` of `mirror/NAME`).
    pub name: String,
    /// The provider it offers.
    pub provider: String,
    /// Health.
    pub state: MirrorState,
    /// Read balancing.
    pub balance: MirrorBalance,
    /// Unique id written in every member's metadata.
    pub id: u64,
    /// Current metadata generation.
    pub generation: u64,
    /// The history the members' data belongs to (labelled mirrors).
    pub history: History,
    /// The next write begins a new epoch (the member set shrank, or the
    /// mirror was assembled incomplete).
    pub epoch_due: bool,
    /// Bytes of a write-intent region (0 without metadata).
    pub region_bytes: u64,
    /// Regions whose bit is set (writes not yet known stable everywhere).
    pub dirty_regions: u32,
    /// The copy of dirty regions after an unclean stop, while it runs.
    pub recovery: Option<RecoveryStatus>,
    /// Regions copied from the recovery source since the mirror started.
    pub recovered_regions: u32,
    /// Size of the mirror's provider, bytes.
    pub media_size: u64,
    /// Current members, active first in label order.
    pub members: Vec<MemberStatus>,
    /// Providers dropped from the mirror since it started, with the reason.
    pub dropped: Vec<(String, &'static str)>,
    /// Providers that turned up with this mirror's metadata and were not
    /// taken, with the reason (a newer or conflicting history).
    pub refused: Vec<(String, String)>,
}

/// The copy of dirty regions after an unclean stop, as reported by
/// [`MirrorStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryStatus {
    /// The member copied from (and read from in regions still to copy).
    pub source: String,
    /// Regions dirty at assembly.
    pub regions: u32,
    /// Regions copied onto every other member so far.
    pub copied: u32,
}

impl MirrorStatus {
    /// Resync progress over all synchronizing members: (bytes synced,
    /// bytes to sync), or `None` when nothing is being synchronized.
    pub fn resync(&self) -> Option<(u64, u64)> {
        let mut any = false;
        let (mut done, mut total) = (0, 0);
        for m in &self.members {
            if m.state == MemberState::Synchronizing {
                any = true;
                done += m.synced_bytes;
                total += m.total_bytes;
            }
        }
        any.then_some((done, total))
    }

    /// The status as a JSON object, for the topology document.
    pub fn to_json(&self) -> Value {
        let members: Vec<Value> = self
            .members
            .iter()
            .map(|m| {
                json!({
                    "provider": m.provider,
                    "state": m.state.name(),
                    "synced_bytes": m.synced_bytes,
                    "total_bytes": m.total_bytes,
                })
            })
            .collect();
        let resync = self
            .resync()
            .map(|(done, total)| json!({"synced_bytes": done, "total_bytes": total}));
        let dropped: Vec<Value> = self
            .dropped
            .iter()
            .map(|(p, why)| json!({"provider": p, "reason": why}))
            .collect();
        let refused: Vec<Value> = self
            .refused
            .iter()
            .map(|(p, why)| json!({"provider": p, "reason": why}))
            .collect();
        let recovery = self.recovery.as_ref().map(|r| {
            json!({"source": r.source, "regions": r.regions, "copied": r.copied})
        });
        json!({
            "state": self.state.name(),
            "balance": self.balance.name(),
            "id": self.id,
            "generation": self.generation,
            "history": history_json(&self.history),
            "epoch_due": self.epoch_due,
            "media_size": self.media_size,
            "members": members,
            "resync": resync,
            "write_intent": {
                "region_bytes": self.region_bytes,
                "dirty_regions": self.dirty_regions,
            },
            "recovered_regions": self.recovered_regions,
            "recovery": recovery,
            "dropped": dropped,
            "refused": refused,
        })
    }
}

/// A history as JSON: the head epoch and the lineage, ids in hex.
pub(crate) fn history_json(h: &History) -> Value {
    let epoch = |e: &Epoch| json!({"epoch": format!("{:016x}", e.id), "since": e.since});
    json!({
        "epoch": format!("{:016x}", h.head.id),
        "since": h.head.since,
        "lineage": h.past().map(epoch).collect::<Vec<_>>(),
    })
}

/// Why a mirror operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorError {
    /// The stack refused (no such provider, busy, orphaned, …).
    Stack(StackError),
    /// A mirror needs at least one member.
    NoMembers,
    /// The same provider was named twice.
    Duplicate(String),
    /// The provider is too small to hold the mirror's range and metadata.
    TooSmall(String),
    /// The provider's sector size does not divide the mirror's.
    SectorSize(String),
    /// The provider cannot do what the mirror promises (discard,
    /// write-zeroes).
    Capability(String),
    /// The provider is not a member of this mirror.
    NotMember(String),
    /// The provider is a member already.
    AlreadyMember(String),
    /// Removing it would leave no active member.
    LastMember(String),
    /// No live mirror of that name.
    NoMirror(String),
    /// The mirror has been destroyed or has no active member.
    Dead(String),
    /// The name cannot be written in metadata.
    BadName(String),
    /// Members hold conflicting histories (the reason says which).
    Conflict(String),
}

impl From<StackError> for MirrorError {
    fn from(e: StackError) -> Self {
        MirrorError::Stack(e)
    }
}

impl core::fmt::Display for MirrorError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MirrorError::Stack(e) => write!(f, "{e}"),
            MirrorError::NoMembers => write!(f, "a mirror needs at least one member"),
            MirrorError::Duplicate(p) => write!(f, "provider '{p}' is named twice"),
            MirrorError::TooSmall(p) => write!(f, "provider '{p}' is too small for the mirror"),
            MirrorError::SectorSize(p) => {
                write!(f, "provider '{p}' has a sector size the mirror cannot use")
            }
            MirrorError::Capability(p) => write!(
                f,
                "provider '{p}' lacks discard or write-zeroes, which the mirror offers"
            ),
            MirrorError::NotMember(p) => write!(f, "provider '{p}' is not a member of the mirror"),
            MirrorError::AlreadyMember(p) => {
                write!(f, "provider '{p}' is a member of the mirror already")
            }
            MirrorError::LastMember(p) => {
                write!(f, "removing '{p}' would leave the mirror without data")
            }
            MirrorError::NoMirror(n) => write!(f, "no mirror named '{n}'"),
            MirrorError::Dead(p) => write!(f, "mirror '{p}' has no active member"),
            MirrorError::BadName(n) => write!(f, "'{n}' cannot be a mirror name"),
            MirrorError::Conflict(why) => write!(f, "{why}"),
        }
    }
}

/// One member as the geom tracks it.
#[derive(Debug)]
struct Member {
    /// The geom's attachment to the member provider.
    consumer: ConsumerId,
    /// The member provider's name.
    name: String,
    /// The member provider's size (its last sector holds metadata).
    media_size: u64,
    /// The member provider's sector size.
    sector_size: u32,
    /// Its place in metadata; kept while it is a member, so a stale disk
    /// and its replacement share a place and tasting keeps the newer.
    index: u32,
    state: MemberState,
    /// Requests in flight through it (for the load balance).
    inflight: u32,
    /// Resync progress while synchronizing.
    sync: Option<resync::SyncProgress>,
    /// A metadata write is in flight.
    meta_inflight: bool,
    /// The metadata must be (re)written once the write in flight is done.
    meta_wanted: bool,
    /// The metadata version of the write in flight.
    meta_sent: u64,
    /// The newest metadata version known stable on the member.
    meta_durable: u64,
}

/// Marks the slab slot of a cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A child of a regular request; slot in `pending`.
    Regular = 1,
    /// A resync read or write; slot in `chunks`.
    Sync = 2,
    /// A metadata write; no slot.
    Meta = 3,
}

/// Cookie layout: kind (4 bits) | member consumer (28 bits) | slot (32 bits).
fn cookie(kind: Kind, consumer: ConsumerId, slot: u32) -> u64 {
    debug_assert!(consumer.0 < 1 << 28);
    ((kind as u64) << 60) | (u64::from(consumer.0 & 0x0fff_ffff) << 32) | u64::from(slot)
}

fn uncookie(c: u64) -> (Option<Kind>, ConsumerId, u32) {
    let kind = match c >> 60 {
        1 => Some(Kind::Regular),
        2 => Some(Kind::Sync),
        3 => Some(Kind::Meta),
        _ => None,
    };
    (kind, ConsumerId(((c >> 32) & 0x0fff_ffff) as u32), c as u32)
}

/// The mirror geom.
pub struct MirrorGeom {
    /// `NAME` of `mirror/NAME`.
    name: String,
    /// The provider it offers.
    provider: ProviderId,
    media_size: u64,
    sector_size: u32,
    balance: MirrorBalance,
    id: u64,
    generation: u64,
    /// Current members, in metadata order.
    members: Vec<Member>,
    /// Members the operator asked for (label, insert, remove, forget);
    /// fewer active ones means degraded.
    wanted: u32,
    /// Members carry metadata (`label`, or assembled from it); `create`
    /// makes a mirror without.
    labelled: bool,
    /// Round-robin cursor over members.
    rr: usize,
    /// The history the members' data belongs to.
    history: history::History,
    /// The set of members holding the data shrank (or the mirror was
    /// assembled incomplete) since the head epoch began: the next write
    /// begins a new one.
    epoch_due: bool,
    /// The metadata version that recorded the head epoch.
    epoch_version: u64,
    /// The version of the metadata as it should be: bumped by every change
    /// that all members' records must carry.
    meta_version: u64,
    /// Regular requests in flight below.
    pending: Slab<io::Pending>,
    /// Writes, discards and write-zeroes not sent yet, in arrival order:
    /// they overlap a write in flight or ahead of them, or a resync copy,
    /// or wait for the record that marks their regions dirty.
    queued: VecDeque<io::Queued>,
    /// Write and flush completions held until every member's record is at
    /// least `park_barrier` (a new epoch after the member set shrank, so a
    /// member that missed the write cannot come back trusted).
    parked: VecDeque<(Bio, BioResult)>,
    park_barrier: u64,
    /// FLUSHes sent to the members.
    flushes: u64,
    /// The write-intent bitmap (labelled mirrors).
    intent: Option<intent::WriteIntent>,
    /// The copy of dirty regions after an unclean stop.
    recovery: Option<intent::Recovery>,
    /// Regions copied by recoveries since the mirror started.
    recovered: u32,
    /// Providers with this mirror's metadata that were not taken, and why.
    refused: Vec<(String, String)>,
    /// Resync requests in flight.
    chunks: Slab<resync::Chunk>,
    /// Former members whose metadata must be cleared: consumer, offset
    /// and length of the metadata sector.
    clearing: Vec<(ConsumerId, u64, u32)>,
    /// Consumers no longer used, detached once nothing is in flight.
    detaching: Vec<ConsumerId>,
    state: MirrorState,
    dropped: Vec<(String, &'static str)>,
    /// The stack clock value resync last ran at, and bytes started then.
    tick: (u64, u64),
    /// Resync stopped for this clock value and waits for the next.
    tick_spent: bool,
}

impl MirrorGeom {
    /// The provider's name for a mirror called `name`.
    pub fn provider_name(name: &str) -> String {
        format!("{CLASS_NAME}/{name}")
    }

    fn member_index(&self, c: ConsumerId) -> Option<usize> {
        self.members.iter().position(|m| m.consumer == c)
    }

    fn active_count(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .count()
    }

    fn serving(&self) -> bool {
        matches!(self.state, MirrorState::Complete | MirrorState::Degraded)
    }

    fn refresh_state(&mut self) {
        if !self.serving() {
            return;
        }
        let active = self.active_count();
        self.state = if active == 0 {
            MirrorState::Dead
        } else if active == self.members.len() && active as u32 >= self.wanted {
            MirrorState::Complete
        } else {
            MirrorState::Degraded
        };
    }

    /// The current status.
    pub fn status(&self) -> MirrorStatus {
        MirrorStatus {
            name: self.name.clone(),
            provider: MirrorGeom::provider_name(&self.name),
            state: self.state,
            balance: self.balance,
            id: self.id,
            generation: self.generation,
            history: self.history.clone(),
            epoch_due: self.epoch_due,
            region_bytes: self.intent.as_ref().map_or(0, |w| 1u64 << w.shift()),
            dirty_regions: self.intent.as_ref().map_or(0, |w| w.dirty_count() as u32),
            recovery: self.recovery.as_ref().map(|r| RecoveryStatus {
                source: self
                    .member_index(r.source)
                    .map_or_else(String::new, |i| self.members[i].name.clone()),
                regions: r.total,
                copied: r.copied,
            }),
            recovered_regions: self.recovered,
            media_size: self.media_size,
            members: self
                .members
                .iter()
                .map(|m| MemberStatus {
                    provider: m.name.clone(),
                    state: m.state,
                    synced_bytes: match &m.sync {
                        Some(s) => self.synced_bytes(m.consumer, s),
                        None => self.media_size,
                    },
                    total_bytes: self.media_size,
                })
                .collect(),
            dropped: self.dropped.clone(),
            refused: self.refused.clone(),
        }
    }

    /// Work left over after any event: writes no longer held back,
    /// metadata to write, resync to continue, completions to release,
    /// consumers to detach.
    fn after_event(&mut self, io: &mut Io<'_>) {
        if self.serving() && io.provider(self.provider).orphaned {
            // Destroyed from outside (`mirror destroy -f`): stop copying
            // and let what is in flight drain, so the geom can go.
            self.state = MirrorState::Destroyed;
            self.abandon_chunks(None);
            for m in self.members.drain(..) {
                self.detaching.push(m.consumer);
            }
        }
        self.release_queued(io);
        self.issue_metadata(io);
        self.pump_sync(io);
        self.release_parked(io);
        self.detach_idle(io);
    }

    /// Detaches consumers of former members once nothing is in flight
    /// through them.
    fn detach_idle(&mut self, io: &mut Io<'_>) {
        self.detaching.retain(|&c| io.detach(c).is_err());
    }
}

impl Geom for MirrorGeom {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        self.start_regular(io, bio);
        // A write may have marked regions dirty or begun an epoch: its
        // record goes out now.
        self.issue_metadata(io);
    }

    fn done(&mut self, io: &mut Io<'_>, cookie: u64, bio: Bio, result: BioResult) {
        let (kind, consumer, slot) = uncookie(cookie);
        if let Some(i) = self.member_index(consumer) {
            let m = &mut self.members[i];
            m.inflight = m.inflight.saturating_sub(1);
        }
        match kind {
            Some(Kind::Regular) => self.regular_done(io, consumer, slot, bio, result),
            Some(Kind::Sync) => self.sync_done(io, consumer, slot, bio, result),
            Some(Kind::Meta) => self.meta_done(io, consumer, slot, result),
            None => {}
        }
        self.after_event(io);
    }

    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        let did = self.pump_sync(io);
        self.after_event(io);
        did
    }

    fn wants_poll(&self) -> bool {
        self.tick_spent
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        self.tick_spent.then_some(self.tick.0 + 1)
    }

    fn orphan(&mut self, io: &mut Io<'_>, consumer: ConsumerId) {
        self.fail_member(io, consumer, "orphaned");
        self.after_event(io);
    }

    fn dumpconf(&self) -> Value {
        self.status().to_json()
    }

    fn as_any(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }
}
