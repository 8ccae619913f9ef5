//! The mirror's use of on-disk metadata ([`crate::meta`]): the record each
//! member carries, generation and epoch changes, and the plan for
//! assembling a mirror from tasted members.
//!
//! ```text
//! generation    bumped whenever the member set changes (a member dropped,
//!               inserted, removed, or done synchronizing) and written to
//!               every member left
//! member index  the member's place, kept for as long as it is a member
//! member count  places the operator asked for (label, insert, remove)
//! flags bit 0   SYNCHRONIZING: the member is valid only below params[1]
//! params[0]     read balance (1 round-robin, 2 load, 3 split, 4 prefer)
//! params[1]     sync offset, bytes (with SYNCHRONIZING)
//! params[2]     the mirror's media size, bytes
//! params[3]     the mirror's sector size, bytes
//! tail          the history (head epoch and lineage) and the write-intent
//!               bitmap, with their own crc (`history`)
//! ```
//!
//! Every change all records must carry bumps the metadata version; each
//! member's record is written (FUA, one at a time per member) until it
//! holds the newest version, and the geom knows the oldest version stable
//! on every member. A write waits for the version that marked its regions
//! dirty (and recorded the epoch it belongs to); when the member set
//! shrank while writes were in flight, their completions wait for the new
//! epoch, so no write is acknowledged that a member lacking it could hide
//! after a power cut. A synchronizing member is flushed before its sync
//! offset is recorded.
//!
//! At assembly ([`plan`]) the members' histories are compared
//! ([`super::history::relate`]): members no other member is newer than
//! hold the data; two of them whose histories conflict stop the assembly;
//! older ones are resynchronized from the start; the union of the current
//! members' bitmaps is copied from the source onto the others.

use super::history::{regions_for, region_shift_for, relate, History, Relation, Tail};
use super::{
    balance_code, balance_from_code, cookie, Kind, Member, MemberState, MirrorGeom, CLASS_NAME,
};
use crate::bio::{Bio, BioCmd, BioResult, ConsumerId};
use super::MirrorBalance;
use crate::meta::{MetaRepr, PARAMS};
use crate::page::SgList;
use crate::stack::{Io, ProviderSpec};
use crate::taste::Member as Tasted;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Metadata flag: the member is being synchronized.
pub const FLAG_SYNCHRONIZING: u32 = 1;
/// Parameter word: read balance.
const P_BALANCE: usize = 0;
/// Parameter word: sync offset of a synchronizing member.
const P_SYNC_OFFSET: usize = 1;
/// Parameter word: the mirror's media size.
const P_MEDIA_SIZE: usize = 2;
/// Parameter word: the mirror's sector size.
const P_SECTOR_SIZE: usize = 3;

/// Cookie slot of a metadata write to a member.
const META_WRITE: u32 = 0;
/// Cookie slot of the write that clears a former member's metadata.
const META_CLEAR: u32 = 1;

/// A finalizer for 64-bit mixing (splitmix64's).
pub(super) fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl MirrorGeom {
    /// The record for member `i`.
    pub(super) fn meta_for(&self, i: usize) -> MetaRepr {
        let m = &self.members[i];
        let mut params = [0u64; PARAMS];
        params[P_BALANCE] = balance_code(self.balance);
        params[P_MEDIA_SIZE] = self.media_size;
        params[P_SECTOR_SIZE] = u64::from(self.sector_size);
        let mut flags = 0;
        if let Some(s) = &m.sync {
            flags |= FLAG_SYNCHRONIZING;
            params[P_SYNC_OFFSET] = s.persisted;
        }
        let top = self.members.iter().map(|m| m.index + 1).max().unwrap_or(1);
        let tail = match &self.intent {
            Some(w) => Tail {
                history: self.history.clone(),
                region_shift: w.shift(),
                regions: w.regions() as u16,
                bitmap: w.bytes(),
            }
            .emit(),
            None => [0; crate::meta::TAIL_LEN],
        };
        MetaRepr {
            class: String::from(CLASS_NAME),
            name: self.name.clone(),
            id: self.id,
            generation: self.generation,
            member_index: m.index,
            member_count: self.wanted.max(top),
            member_size: m.media_size,
            sector_size: m.sector_size,
            flags,
            params,
            tail,
        }
    }

    /// A change every member's record must carry: a new metadata version,
    /// to be written everywhere. Returns the version.
    pub(super) fn touch_all(&mut self) -> u64 {
        self.meta_version += 1;
        if self.labelled {
            for m in &mut self.members {
                m.meta_wanted = true;
            }
        }
        self.meta_version
    }

    /// Records a change of the member set: a new generation, written to
    /// every member.
    pub(super) fn bump_generation(&mut self) {
        self.generation += 1;
        if self.labelled {
            self.touch_all();
        }
    }

    /// The set of members holding the data shrank: the next write (or a
    /// write completing now) begins a new epoch, so the members that left
    /// are recognised as stale whatever they do on their own.
    pub(super) fn members_shrank(&mut self) {
        if self.labelled {
            self.epoch_due = true;
        }
    }

    /// Begins a new epoch: the head moves into the lineage, and writes and
    /// completions wait until every member's record holds the new one.
    pub(super) fn begin_epoch(&mut self, io: &mut Io<'_>) {
        self.epoch_due = false;
        if !self.labelled {
            return;
        }
        let id = self.fresh_epoch(io);
        self.history.advance(super::Epoch {
            id,
            since: self.generation,
        });
        let v = self.touch_all();
        self.epoch_version = v;
        self.park_barrier = v;
    }

    /// A new epoch id: the stack's generator mixed with the mirror's state
    /// (so two boots from the same seed over different members differ),
    /// never 0 nor an epoch of the history.
    fn fresh_epoch(&self, io: &mut Io<'_>) -> u64 {
        let members = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .fold(0u64, |a, m| a ^ mix(u64::from(m.index) + 1));
        let state = mix(self.history.head.id ^ mix(self.generation ^ mix(members ^ self.id)));
        let mut id = mix(io.random_u64() ^ state ^ io.now_ns());
        while id == 0 || self.history.knows(id) {
            id = mix(id ^ io.random_u64());
        }
        id
    }

    /// Starts the metadata writes that are due; true if any started.
    pub(super) fn issue_metadata(&mut self, io: &mut Io<'_>) -> bool {
        let mut did = false;
        for i in 0..self.members.len() {
            let m = &self.members[i];
            if !m.meta_wanted || m.meta_inflight {
                continue;
            }
            let (c, sector) = (m.consumer, m.sector_size);
            let at = m.media_size - u64::from(sector);
            let Ok(bytes) = self.meta_for(i).to_sector(sector as usize) else {
                // The name was checked when the mirror was made.
                self.members[i].meta_wanted = false;
                continue;
            };
            let sg = SgList::from_bytes(&bytes, io.meta_counters());
            let mut bio = Bio::with_data(BioCmd::Write, at, sg);
            bio.fua = true;
            let version = self.meta_version;
            let m = &mut self.members[i];
            m.meta_wanted = false;
            m.meta_inflight = true;
            m.meta_sent = version;
            m.inflight += 1;
            io.request(c, bio, cookie(Kind::Meta, c, META_WRITE));
            did = true;
        }
        for (c, at, sector) in core::mem::take(&mut self.clearing) {
            // Fresh pages are zero: clearing maps nothing.
            let mut bio = Bio::with_data(BioCmd::Write, at, SgList::alloc(sector as usize));
            bio.fua = true;
            io.request(c, bio, cookie(Kind::Meta, c, META_CLEAR));
            did = true;
        }
        did
    }

    /// A metadata write came back from `consumer`.
    pub(super) fn meta_done(
        &mut self,
        io: &mut Io<'_>,
        consumer: ConsumerId,
        slot: u32,
        result: BioResult,
    ) {
        if slot == META_CLEAR {
            return;
        }
        let Some(i) = self.member_index(consumer) else {
            return;
        };
        let m = &mut self.members[i];
        m.meta_inflight = false;
        if result.is_err() {
            // Reported as any failed write: the record often goes first,
            // ahead of the write that dirtied its region.
            self.fail_member(io, consumer, "write error");
        } else {
            m.meta_durable = m.meta_durable.max(m.meta_sent);
        }
    }

    /// Adds an opened provider as a member at place `index`, active
    /// (`sync_from` `None`) or synchronizing from an offset. `recorded`:
    /// its record on disk already says what the geom would write.
    pub(super) fn add_member(
        &mut self,
        consumer: ConsumerId,
        spec: &ProviderSpec,
        index: u32,
        sync_from: Option<u64>,
        recorded: bool,
    ) {
        self.members.push(Member {
            consumer,
            name: spec.name.clone(),
            media_size: spec.media_size,
            sector_size: spec.sector_size,
            index,
            state: MemberState::Active,
            inflight: 0,
            sync: None,
            meta_inflight: false,
            meta_wanted: self.labelled && !recorded,
            meta_sent: 0,
            meta_durable: if recorded { self.meta_version } else { 0 },
        });
        if let Some(from) = sync_from {
            let i = self.members.len() - 1;
            self.start_sync(i, from);
        }
    }

    /// The lowest place no member holds (a replacement takes the place of
    /// the member it replaces).
    pub(super) fn free_index(&self) -> u32 {
        (0..)
            .find(|i| !self.members.iter().any(|m| m.index == *i))
            .unwrap_or(0)
    }

    /// Queues a zero sector over a former member's metadata.
    pub(super) fn clear_metadata(&mut self, m: &Member) {
        if self.labelled {
            let sector = u64::from(m.sector_size);
            self.clearing
                .push((m.consumer, m.media_size - sector, m.sector_size));
        }
    }
}

/// A member's history as its record tells it: `None` when the tail is
/// damaged (the record cannot say which history its data belongs to).
pub(super) fn record_history(meta: &MetaRepr) -> Option<(History, Option<Tail>)> {
    match Tail::parse(&meta.tail) {
        Ok(Some(t)) => Some((t.history.clone(), Some(t))),
        Ok(None) => Some((History::default(), None)),
        Err(_) => None,
    }
}

/// What a mirror assembled from tasted members starts from.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// The mirror's name and id.
    pub(super) name: String,
    pub(super) id: u64,
    /// The newest generation found.
    pub(super) generation: u64,
    /// The history of the members holding the data.
    pub(super) history: History,
    pub(super) balance: MirrorBalance,
    pub(super) media_size: u64,
    pub(super) sector_size: u32,
    /// Places the operator asked for.
    pub(super) wanted: u32,
    /// Per tasted member (same order): `None` to trust it, `Some(offset)`
    /// to synchronize it from `offset`.
    pub(super) sync_from: Vec<Option<u64>>,
    /// The member set differs from the record (members missing or stale):
    /// write a new generation, and begin a new epoch with the first write.
    pub(super) bump: bool,
    /// The member (position in the tasted list) whose bytes win where the
    /// bitmaps say members may differ.
    pub(super) source: usize,
    /// log2 of the write-intent region size.
    pub(super) region_shift: u8,
    /// Byte ranges marked dirty in the current members' bitmaps: an
    /// unclean stop; they are copied from the source onto the others.
    pub(super) dirty: Vec<(u64, u64)>,
}

/// Why tasted members do not assemble.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The members at these positions each hold writes the other lacks.
    Conflict(usize, usize),
    /// Anything else (sizes, no member with the current data).
    Other(String),
}

/// Decides how to assemble a mirror from its tasted members: those that
/// no other member is newer than hold the data (two of them that
/// conflict refuse the assembly); one of them that was synchronizing
/// resumes at its recorded offset; older ones missed writes and are
/// copied over from the start, as is one whose history record is
/// damaged, or the one at position `discard` (the operator gave its
/// history up).
pub(super) fn plan(members: &[Tasted], discard: Option<usize>) -> Result<Plan, Refusal> {
    if members.is_empty() {
        return Err(Refusal::Other(String::from("no members")));
    }
    let records: Vec<Option<(History, Option<Tail>)>> = members
        .iter()
        .enumerate()
        .map(|(k, m)| {
            if discard == Some(k) {
                None
            } else {
                record_history(&m.meta)
            }
        })
        .collect();
    let relation = |i: usize, j: usize| -> Option<Relation> {
        let (a, b) = (records[i].as_ref()?, records[j].as_ref()?);
        Some(relate(
            &a.0,
            members[i].meta.generation,
            &b.0,
            members[j].meta.generation,
        ))
    };
    let n = members.len();
    let older: Vec<bool> = (0..n)
        .map(|i| (0..n).any(|j| relation(i, j) == Some(Relation::Older)))
        .collect();
    let current: Vec<bool> = (0..n).map(|i| records[i].is_some() && !older[i]).collect();
    for i in 0..n {
        for j in i + 1..n {
            if current[i] && current[j] && relation(i, j) == Some(Relation::Conflict) {
                return Err(Refusal::Conflict(i, j));
            }
        }
    }
    let syncing = |m: &Tasted| m.meta.flags & FLAG_SYNCHRONIZING != 0;
    let source = (0..n)
        .find(|&i| current[i] && !syncing(&members[i]))
        .ok_or_else(|| {
            Refusal::Other(String::from(
                "no member holds the current data (all are stale or synchronizing)",
            ))
        })?;
    let src = &members[source].meta;
    let p = &src.params;
    let media_size = p[P_MEDIA_SIZE];
    let sector_size = u32::try_from(p[P_SECTOR_SIZE]).unwrap_or(0);
    if sector_size < 512
        || !sector_size.is_power_of_two()
        || media_size == 0
        || !media_size.is_multiple_of(u64::from(sector_size))
    {
        return Err(Refusal::Other(String::from("metadata gives no usable size")));
    }
    let sector = u64::from(sector_size);
    let mut sync_from = Vec::new();
    let mut bump = false;
    for (k, m) in members.iter().enumerate() {
        let fits = m.meta.member_size >= media_size + u64::from(m.meta.sector_size)
            && sector % u64::from(m.meta.sector_size) == 0;
        if !fits {
            return Err(Refusal::Other(format!(
                "member {} is too small for the mirror",
                m.meta.member_index
            )));
        }
        sync_from.push(if !current[k] {
            // Older, damaged, or given up: copied over from the start.
            bump = true;
            Some(0)
        } else if syncing(m) {
            let off = m.meta.params[P_SYNC_OFFSET].min(media_size);
            Some(off - off % sector)
        } else {
            None
        });
    }
    let wanted = src.member_count;
    if (members.len() as u32) < wanted {
        bump = true;
    }
    // The write-intent regions: the source's, when its record is whole
    // and fits the size; the union of the current members' bits.
    let shift = match &records[source] {
        Some((_, Some(t)))
            if regions_for(media_size, t.region_shift) == u64::from(t.regions) =>
        {
            t.region_shift
        }
        _ => region_shift_for(media_size),
    };
    let mut dirty = Vec::new();
    for k in (0..n).filter(|&k| current[k]) {
        if let Some((_, Some(t))) = &records[k] {
            for r in 0..usize::from(t.regions) {
                if t.dirty(r) {
                    let start = (r as u64) << t.region_shift;
                    let end = (start + (1u64 << t.region_shift)).min(media_size);
                    if start < end {
                        dirty.push((start, end));
                    }
                }
            }
        }
    }
    let generation = members.iter().map(|m| m.meta.generation).max().unwrap_or(0);
    let history = records[source]
        .as_ref()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    Ok(Plan {
        name: src.name.clone(),
        id: src.id,
        generation,
        history,
        balance: balance_from_code(p[P_BALANCE]),
        media_size,
        sector_size,
        wanted,
        sync_from,
        bump,
        source,
        region_shift: shift,
        dirty,
    })
}

/// True when the tasted members can be assembled before every disk was
/// tasted: all places present, one history and generation, nothing
/// synchronizing (a member with a newer history could not then exist
/// elsewhere).
pub(super) fn complete_set(members: &[Tasted]) -> bool {
    let Some(first) = members.first() else {
        return false;
    };
    let head = |m: &Tasted| record_history(&m.meta).map(|h| h.0.head);
    crate::taste::all_present(members)
        && head(first).is_some()
        && members.iter().all(|m| {
            m.meta.generation == first.meta.generation
                && head(m) == head(first)
                && m.meta.flags & FLAG_SYNCHRONIZING == 0
        })
}
