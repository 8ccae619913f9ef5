//! The mirror's use of on-disk metadata ([`crate::meta`]): the record each
//! member carries, generation bumps, and the plan for assembling a mirror
//! from tasted members.
//!
//! ```text
//! generation    bumped whenever the member set changes (a member dropped,
//!               inserted, removed, or done synchronizing) and written to
//!               every member left; a member with an older generation
//!               missed writes and is resynchronized, never trusted
//! member index  the member's place, kept for as long as it is a member
//! member count  places the operator asked for (label, insert, remove)
//! flags bit 0   SYNCHRONIZING: the member is valid only below params[1]
//! params[0]     read balance (1 round-robin, 2 load, 3 split, 4 prefer)
//! params[1]     sync offset, bytes (with SYNCHRONIZING)
//! params[2]     the mirror's media size, bytes
//! params[3]     the mirror's sector size, bytes
//! ```
//!
//! Metadata writes carry FUA, one at a time per member; while a new
//! generation is not on every member, write completions are held back,
//! so no write is acknowledged that a stale member could hide after a
//! power cut. A synchronizing member is flushed before its sync offset is
//! recorded.

use super::{
    balance_code, balance_from_code, cookie, Kind, Member, MemberState, MirrorGeom, CLASS_NAME,
};
use crate::bio::{Bio, BioCmd, BioResult, ConsumerId};
use super::MirrorBalance;
use crate::meta::{MetaRepr, PARAMS};
use crate::page::SgList;
use crate::stack::{Io, ProviderSpec};
use crate::taste::Member as Tasted;
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
            tail: [0; crate::meta::TAIL_LEN],
        }
    }

    /// Records a change of the member set: a new generation, to be written
    /// to every member before write completions are released.
    pub(super) fn bump_generation(&mut self) {
        self.generation += 1;
        if !self.labelled {
            return;
        }
        self.unpersisted = true;
        for m in &mut self.members {
            m.meta_wanted = true;
        }
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
            let m = &mut self.members[i];
            m.meta_wanted = false;
            m.meta_inflight = true;
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
        self.members[i].meta_inflight = false;
        if result.is_err() {
            self.fail_member(io, consumer, "metadata write error");
        }
    }

    /// Adds an opened provider as a member at place `index`, active
    /// (`sync_from` `None`) or synchronizing from an offset.
    pub(super) fn add_member(
        &mut self,
        consumer: ConsumerId,
        spec: &ProviderSpec,
        index: u32,
        sync_from: Option<u64>,
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
            meta_wanted: false,
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

/// What a mirror assembled from tasted members starts from.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// The mirror's name and id.
    pub(super) name: String,
    pub(super) id: u64,
    /// The newest generation found.
    pub(super) generation: u64,
    pub(super) balance: MirrorBalance,
    pub(super) media_size: u64,
    pub(super) sector_size: u32,
    /// Places the operator asked for.
    pub(super) wanted: u32,
    /// Per tasted member (same order): `None` to trust it, `Some(offset)`
    /// to synchronize it from `offset`.
    pub(super) sync_from: Vec<Option<u64>>,
    /// The member set differs from the record: write a new generation.
    pub(super) bump: bool,
}

/// Decides how to assemble a mirror from its tasted members: those with
/// the newest generation and not synchronizing hold the data; one with the
/// newest generation that was synchronizing resumes at its recorded
/// offset; older ones missed writes and are copied over from the start.
pub(super) fn plan(members: &[Tasted]) -> Result<Plan, String> {
    let newest = members
        .iter()
        .map(|m| m.meta.generation)
        .max()
        .ok_or_else(|| String::from("no members"))?;
    let syncing = |m: &Tasted| m.meta.flags & FLAG_SYNCHRONIZING != 0;
    let source = members
        .iter()
        .find(|m| m.meta.generation == newest && !syncing(m))
        .ok_or_else(|| {
            String::from("no member holds the current data (all are stale or synchronizing)")
        })?;
    let p = &source.meta.params;
    let media_size = p[P_MEDIA_SIZE];
    let sector_size = u32::try_from(p[P_SECTOR_SIZE]).unwrap_or(0);
    if sector_size < 512
        || !sector_size.is_power_of_two()
        || media_size == 0
        || media_size % u64::from(sector_size) != 0
    {
        return Err(String::from("metadata gives no usable size"));
    }
    let sector = u64::from(sector_size);
    let mut sync_from = Vec::new();
    let mut bump = false;
    for m in members {
        let fits = m.meta.member_size >= media_size + u64::from(m.meta.sector_size)
            && sector % u64::from(m.meta.sector_size) == 0;
        if !fits {
            return Err(alloc::format!(
                "member {} is too small for the mirror",
                m.meta.member_index
            ));
        }
        sync_from.push(if m.meta.generation < newest {
            bump = true;
            Some(0)
        } else if syncing(m) {
            let off = m.meta.params[P_SYNC_OFFSET].min(media_size);
            Some(off - off % sector)
        } else {
            None
        });
    }
    let wanted = source.meta.member_count;
    if (members.len() as u32) < wanted {
        bump = true;
    }
    Ok(Plan {
        name: source.meta.name.clone(),
        id: source.meta.id,
        generation: newest,
        balance: balance_from_code(p[P_BALANCE]),
        media_size,
        sector_size,
        wanted,
        sync_from,
        bump,
    })
}

/// True when the tasted members can be assembled before every disk was
/// tasted: all places present, one generation, nothing synchronizing (a
/// member with a newer generation could not then exist elsewhere).
pub(super) fn complete_set(members: &[Tasted]) -> bool {
    let Some(first) = members.first() else {
        return false;
    };
    crate::taste::all_present(members)
        && members.iter().all(|m| {
            m.meta.generation == first.meta.generation && m.meta.flags & FLAG_SYNCHRONIZING == 0
        })
}
