//! The raid5 class as the stack sees it: config statements, labelling,
//! tasting and assembly, joining members, and `/status`.

use super::jobs::{tail_states, Replay, P_JOB, P_JOB_ROW, P_PPL, P_ROWS, P_SEQ, P_SLOTS, P_UNIT};
use super::layout::{Layout, COLUMN};
use super::{
    JobKind, Member, MemberState, Raid5Geom, Scrub, CACHE_BYTES, CLASS_NAME, DEFAULT_UNIT,
};
use crate::bio::{GeomId, ProviderId};
use crate::cachestore::ConsumerStore;
use crate::class::{member_verb, resolve_members, unknown_verb, Class, Command, MemberVerb};
use crate::config::{Args, ConfigError};
use crate::ctl::{self, CtlError};
use crate::slab::Slab;
use crate::stack::{Io, ProviderSpec, Stack, StackError};
use crate::taste::{all_present, Member as Tasted};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use bufcache::{Cache, Config, Replacement};
use serde_json::{json, Value};

/// Largest stripe unit: a log entry's column mask has 64 bits.
pub const MAX_UNIT: u64 = 256 * 1024;

/// The raid5 class.
pub struct Raid5Class;

/// The raid5 class's registry entry.
pub static CLASS: Raid5Class = Raid5Class;

/// `raid5 label [-s UNIT] [-n] NAME PROVIDER...`: provider `raid5/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raid5Label {
    /// Array name.
    pub name: String,
    /// Members in order.
    pub providers: Vec<String>,
    /// Stripe unit in bytes.
    pub unit: u64,
    /// Log partial parity (not with `-n`).
    pub ppl: bool,
}

/// `raid5 insert|remove NAME PROVIDER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raid5Member {
    /// Array name.
    pub name: String,
    /// The provider.
    pub provider: String,
    /// Insert (rebuild onto it) or remove.
    pub insert: bool,
}

/// `raid5 scrub NAME`: checks every row's parity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raid5Scrub {
    /// Array name.
    pub name: String,
}

fn invalid(m: String) -> CtlError {
    CtlError::Stack(StackError::Invalid(m))
}

impl Command for Raid5Label {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        label(stack, self)
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((Raid5Geom::provider_name(&self.name), self.name.clone()))
    }

    fn on_disk(&self, stack: &mut Stack) -> bool {
        stack.find_geom(CLASS_NAME, &self.name).is_some()
    }
}

/// Runs `f` on the live array called `name`.
fn with_array<R>(
    stack: &mut Stack,
    name: &str,
    f: impl FnOnce(&mut Raid5Geom, &mut Io<'_>) -> Result<R, CtlError>,
) -> Result<R, CtlError> {
    let g = ctl::geom(stack, CLASS_NAME, name)?;
    stack
        .geom_as::<Raid5Geom, _>(g, |r, io| {
            let out = f(r, io);
            r.after_event(io);
            out
        })
        .unwrap_or_else(|| Err(invalid(format!("raid5 '{name}' is not running"))))
}

impl Command for Raid5Member {
    /// At boot, an insert whose provider is a member already (the second
    /// boot of the config that inserted it), or a remove of a provider
    /// that is not, is done.
    fn on_disk(&self, stack: &mut Stack) -> bool {
        let Some(g) = stack.find_geom(CLASS_NAME, &self.name) else {
            return false;
        };
        let member = stack
            .geom_as::<Raid5Geom, _>(g, |r, _| {
                r.members
                    .iter()
                    .any(|m| m.name.as_deref() == Some(self.provider.as_str()))
            })
            .unwrap_or(false);
        member == self.insert
    }

    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        if self.insert {
            let p = stack
                .find_provider(&self.provider)
                .ok_or_else(|| CtlError::Stack(StackError::NoSuchProvider(self.provider.clone())))?;
            if stack.provider(p).orphaned {
                return Err(CtlError::Stack(StackError::Orphaned(self.provider.clone())));
            }
            let spec = stack.provider(p).spec.clone();
            with_array(stack, &self.name, |r, io| r.insert(io, p, &spec))
        } else {
            with_array(stack, &self.name, |r, io| r.remove(io, &self.provider))
        }
    }
}

impl Command for Raid5Scrub {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        with_array(stack, &self.name, |r, _| {
            if r.scrub.running {
                return Err(invalid(format!("raid5 '{}' is scrubbing already", r.name)));
            }
            r.start_scrub();
            Ok(())
        })
    }
}

impl Class for Raid5Class {
    fn name(&self) -> &'static str {
        CLASS_NAME
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        const VERBS: &str = "label, insert, remove, scrub, destroy or clear";
        let verb = match member_verb(CLASS_NAME, args, VERBS)? {
            MemberVerb::Create { label: true, .. } => None,
            MemberVerb::Create { label: false, verb } => Some(verb),
            MemberVerb::Parsed(c) => return Ok(c),
            MemberVerb::Other(verb) => Some(verb),
        };
        if let Some(verb) = verb {
            return match verb.text {
                "insert" | "remove" => {
                    let name = args.geom_name(CLASS_NAME)?;
                    let provider = args.name("a provider")?;
                    args.finish()?;
                    Ok(Arc::new(Raid5Member {
                        name,
                        provider,
                        insert: verb.text == "insert",
                    }))
                }
                "scrub" => {
                    let name = args.geom_name(CLASS_NAME)?;
                    args.finish()?;
                    Ok(Arc::new(Raid5Scrub { name }))
                }
                _ => Err(unknown_verb(args, CLASS_NAME, &verb, VERBS)),
            };
        }
        let (mut unit, mut ppl) = (DEFAULT_UNIT, true);
        while let Some(w) = args.option() {
            match w.text {
                "-s" => {
                    let (n, column) = args.size("a stripe unit after -s")?;
                    if n < COLUMN || !n.is_power_of_two() || n > MAX_UNIT {
                        return Err(args.err(
                            column,
                            "stripe unit must be a power of two from 4k to 256k",
                        ));
                    }
                    unit = n;
                }
                "-n" => ppl = false,
                _ => {
                    return Err(args.err(w.column, format!("unknown raid5 option '{}'", w.text)))
                }
            }
        }
        let name = args.geom_name(CLASS_NAME)?;
        let column = args.peek().map_or_else(|| args.end_column(), |w| w.column);
        let providers = args.providers(1)?;
        if providers.len() < 3 {
            return Err(args.err(column, "raid5 needs three or more providers"));
        }
        if providers.len() > super::ppl::MAX_CHUNKS + 1 {
            return Err(args.err(column, "raid5 takes at most 64 providers"));
        }
        Ok(Arc::new(Raid5Label {
            name,
            providers,
            unit,
            ppl,
        }))
    }

    fn ready(&self, members: &[Tasted], settled: bool) -> bool {
        all_present(members) || (settled && !members.is_empty())
    }

    fn assemble(&self, stack: &mut Stack, members: &[Tasted]) -> Result<GeomId, StackError> {
        assemble(stack, members)
    }

    fn join(&self, stack: &mut Stack, geom: GeomId, member: Tasted) {
        let spec = stack.provider(member.provider).spec.clone();
        stack.geom_as::<Raid5Geom, _>(geom, |r, io| {
            r.rejoin(io, &member, &spec);
            r.after_event(io);
        });
    }

    /// `/status` lists every array: state, members, rebuild and scrub.
    fn status(&self, stack: &Stack) -> Option<(&'static str, Value)> {
        let arrays = crate::class::status_list(stack, CLASS_NAME, |mut conf| {
            match conf.get_mut("status").map(Value::take) {
                Some(Value::Object(st)) => Some(st),
                _ => None,
            }
        });
        Some(("raid5", arrays))
    }
}

/// What a new array geom starts from.
struct Blueprint {
    name: String,
    id: u64,
    layout: Layout,
    sector: u32,
    ppl: bool,
    generation: u64,
    /// Per place: the provider and its state, or nothing.
    places: Vec<Option<(ProviderId, MemberState)>>,
    job: Option<(JobKind, u64)>,
    /// Write every record at once.
    bump: bool,
    replay: bool,
    /// The records say clean.
    clean: bool,
    /// The next log sequence number.
    next_seq: u64,
}

fn build(stack: &mut Stack, bp: Blueprint) -> Result<GeomId, StackError> {
    if stack.find_geom(CLASS_NAME, &bp.name).is_some() {
        return Err(StackError::NameInUse(Raid5Geom::provider_name(&bp.name)));
    }
    let mut spec = ProviderSpec::new(
        &Raid5Geom::provider_name(&bp.name),
        bp.layout.media_size(),
        bp.sector,
    );
    // The preferred request size (NBD wants a power of two): a whole row
    // when it is one, else a chunk.
    let row = bp.layout.row_bytes();
    spec.stripe_size = if row.is_power_of_two() { row } else { bp.layout.unit }
        .min(1 << 24) as u32;
    spec.can_flush = true;
    spec.can_discard = true;
    spec.can_write_zeroes = true;
    let g = stack.reserve_geom(CLASS_NAME, &bp.name);
    let provider = match stack.add_provider(g, spec) {
        Ok(p) => p,
        Err(e) => {
            stack.abandon(g);
            return Err(e);
        }
    };
    let n = bp.layout.members;
    let mut members: Vec<Member> = (0..n).map(|_| Member::absent()).collect();
    for (i, place) in bp.places.iter().enumerate() {
        let Some((p, state)) = *place else { continue };
        let pspec = stack.provider(p).spec.clone();
        let c = stack.attach(Some(g), p);
        if let Err(e) = stack.access(c, 1, 1, 1) {
            stack.abandon(g);
            return Err(e);
        }
        members[i] = Member {
            consumer: Some(c),
            name: Some(pspec.name.clone()),
            media_size: pspec.media_size,
            state,
            ..Member::absent()
        };
    }
    let store = ConsumerStore::new(
        members.iter().map(|m| m.consumer).collect(),
        bp.layout.rows * bp.layout.columns(),
    );
    let cache = Cache::new(
        store,
        Config {
            block_size: COLUMN as usize,
            capacity_bytes: cache_bytes(&bp.layout),
            replacement: Replacement::Clock,
        },
    );
    let mut geom = Raid5Geom {
        name: bp.name,
        id: bp.id,
        provider,
        layout: bp.layout,
        sector: bp.sector,
        ppl: bp.ppl,
        labelled: true,
        generation: bp.generation,
        members,
        cache,
        parents: Slab::new(),
        ops: Slab::new(),
        reads: Slab::new(),
        locks: BTreeMap::new(),
        slots: vec![vec![0; bp.layout.slots as usize]; n],
        next_seq: bp.next_seq,
        incomplete: BTreeSet::new(),
        unflushed: BTreeMap::new(),
        flush_rounds: 0,
        flush_waiters: VecDeque::new(),
        watermark: bp.next_seq - 1,
        slot_waiters: VecDeque::new(),
        busy_waiters: VecDeque::new(),
        reserved: 0,
        room_waiters: VecDeque::new(),
        flushes: Slab::new(),
        checkpoint_inflight: false,
        job: None,
        scrub: Scrub::default(),
        replay: (bp.replay && bp.ppl).then(|| Replay::new(n)),
        replay_stats: (0, 0),
        queued: VecDeque::new(),
        meta_version: 0,
        clean: bp.clean,
        writes_started: 0,
        dirty_version: 0,
        barrier: 0,
        parked: VecDeque::new(),
        tick: (0, 0),
        tick_spent: false,
    };
    if let Some((kind, from)) = bp.job {
        geom.start_job(kind, from);
    }
    if bp.bump {
        geom.barrier = geom.touch_all();
    }
    stack.install(g, Box::new(geom));
    stack.geom_as::<Raid5Geom, _>(g, |r, io| {
        r.pump_jobs(io);
        r.after_event(io);
    });
    Ok(g)
}

/// Bytes of stripe cache an array of `layout` keeps: [`CACHE_BYTES`], or
/// room for two rows' worth of blocks when that is more (every op can pin
/// all it needs).
pub fn cache_bytes(layout: &Layout) -> u64 {
    CACHE_BYTES.max(2 * layout.members as u64 * layout.unit)
}

/// `raid5 label`: a new array over fresh members; every row's parity is
/// computed once in the background (the initial resync).
fn label(stack: &mut Stack, l: &Raid5Label) -> Result<(), CtlError> {
    let members = resolve_members(stack, &l.providers)?;
    let sector = members.iter().map(|(_, s)| s.sector_size).max().unwrap_or(512);
    if sector as u64 > COLUMN || !COLUMN.is_multiple_of(u64::from(sector)) {
        return Err(invalid(format!(
            "raid5 needs sectors that divide 4096 bytes, not {sector}"
        )));
    }
    let usable = members
        .iter()
        .map(|(_, s)| s.media_size.saturating_sub(u64::from(sector)))
        .min()
        .unwrap_or(0);
    let layout = Layout::fit(members.len(), l.unit, usable, l.ppl).ok_or_else(|| {
        invalid(format!(
            "raid5 '{}': members are too small for a {}-byte stripe unit and its log",
            l.name, l.unit
        ))
    })?;
    if let Some(limit) = stack.data_memory_limit() {
        let committed = crate::class::md::committed_memory(stack);
        let want = cache_bytes(&layout);
        if committed + want > limit {
            return Err(invalid(format!(
                "raid5 '{}' needs {want} bytes of memory for its stripe cache; {} of the {limit} bytes for data in memory are left",
                l.name,
                limit.saturating_sub(committed)
            )));
        }
    }
    let id = stack.random_u64();
    build(
        stack,
        Blueprint {
            name: l.name.clone(),
            id,
            layout,
            sector,
            ppl: l.ppl,
            generation: 1,
            places: members
                .iter()
                .map(|(p, _)| Some((*p, MemberState::Active)))
                .collect(),
            job: Some((JobKind::Resync, 0)),
            bump: true,
            replay: false,
            clean: false,
            next_seq: 1,
        },
    )?;
    Ok(())
}

/// Builds an array from tasted members: the newest record says which
/// places hold data; a member it counts out (it missed writes) is rebuilt.
fn assemble(stack: &mut Stack, members: &[Tasted]) -> Result<GeomId, StackError> {
    let newest = members
        .iter()
        .max_by_key(|m| m.meta.generation)
        .ok_or_else(|| StackError::Invalid(String::from("no members")))?;
    let meta = &newest.meta;
    let n = meta.member_count as usize;
    let unit = meta.params[P_UNIT];
    let layout = Layout {
        members: n,
        unit,
        rows: meta.params[P_ROWS],
        slots: meta.params[P_SLOTS],
    };
    let sector = meta.sector_size;
    let sane = (3..=super::ppl::MAX_CHUNKS + 1).contains(&n)
        && unit.is_power_of_two()
        && (COLUMN..=MAX_UNIT).contains(&unit)
        && layout.rows > 0
        && layout.slots <= 1024
        && meta.params[P_SEQ] < 1 << 62
        && u64::from(sector) <= COLUMN;
    if !sane {
        return Err(StackError::Invalid(format!(
            "raid5 '{}': its record holds an impossible geometry",
            meta.name
        )));
    }
    let states = tail_states(meta).ok_or_else(|| {
        StackError::Invalid(format!("raid5 '{}': its record's member states are damaged", meta.name))
    })?;
    let mut job = match meta.params[P_JOB] {
        0 => None,
        1 => Some((JobKind::Resync, meta.params[P_JOB_ROW])),
        k => Some((JobKind::Rebuild((k - 2) as usize), meta.params[P_JOB_ROW])),
    };
    let mut places: Vec<Option<(ProviderId, MemberState)>> = vec![None; n];
    let mut bump = false;
    for m in members {
        let i = m.meta.member_index as usize;
        let size_ok = stack
            .get_provider(m.provider)
            .is_some_and(|p| p.spec.media_size >= layout.member_bytes() + u64::from(sector));
        if i >= n || m.meta.id != meta.id || !size_ok || places[i].is_some() {
            continue;
        }
        let state = match states[i] {
            MemberState::Active => MemberState::Active,
            MemberState::Rebuilding if job.is_some_and(|(k, _)| k == JobKind::Rebuild(i)) => {
                MemberState::Rebuilding
            }
            _ if job.is_none() => {
                // Counted out by the newest record: copied over again.
                job = Some((JobKind::Rebuild(i), 0));
                bump = true;
                MemberState::Rebuilding
            }
            _ => MemberState::Failed,
        };
        if state == MemberState::Failed {
            continue;
        }
        places[i] = Some((m.provider, state));
    }
    for (i, p) in places.iter().enumerate() {
        if p.is_none() && states[i] != MemberState::Failed {
            bump = true;
        }
    }
    if let Some((JobKind::Rebuild(t), _)) = job {
        if places.get(t).copied().flatten().is_none() {
            job = None;
            bump = true;
        }
    }
    // Every member the array uses says clean: nothing to replay.
    let used: Vec<&Tasted> = members
        .iter()
        .filter(|m| {
            let i = m.meta.member_index as usize;
            places.get(i).copied().flatten().is_some_and(|(p, _)| p == m.provider)
        })
        .collect();
    let clean = !used.is_empty() && used.iter().all(|m| m.meta.flags & super::jobs::FLAG_CLEAN != 0);
    build(
        stack,
        Blueprint {
            name: meta.name.clone(),
            id: meta.id,
            layout,
            sector,
            ppl: meta.params[P_PPL] != 0,
            generation: meta.generation + u64::from(bump),
            places,
            job,
            bump,
            replay: !clean,
            clean,
            next_seq: members.iter().map(|m| m.meta.params[P_SEQ]).max().unwrap_or(1).max(1),
        },
    )
}

impl Raid5Geom {
    /// A place that holds nothing, for a new member.
    fn free_place(&self) -> Option<usize> {
        self.members
            .iter()
            .position(|m| matches!(m.state, MemberState::Missing | MemberState::Failed) && m.consumer.is_none())
    }

    fn take_place(
        &mut self,
        io: &mut Io<'_>,
        i: usize,
        p: ProviderId,
        spec: &ProviderSpec,
    ) -> Result<(), CtlError> {
        let c = io.attach(p);
        let a = io.provider_access();
        if let Err(e) = io.access(c, 1 + a.r, 1 + a.w, 1 + a.e) {
            let _ = io.detach(c);
            return Err(CtlError::Stack(e));
        }
        self.members[i] = Member {
            consumer: Some(c),
            name: Some(spec.name.clone()),
            media_size: spec.media_size,
            state: MemberState::Rebuilding,
            ..Member::absent()
        };
        self.cache.store_mut().set_member(i, Some(c));
        self.slots[i].iter_mut().for_each(|s| *s = 0);
        self.start_job(JobKind::Rebuild(i), 0);
        self.generation += 1;
        self.barrier = self.touch_all();
        Ok(())
    }

    /// `raid5 insert`: rebuilds onto `p` in the first place that holds
    /// nothing.
    fn insert(&mut self, io: &mut Io<'_>, p: ProviderId, spec: &ProviderSpec) -> Result<(), CtlError> {
        if self.members.iter().any(|m| m.name.as_deref() == Some(spec.name.as_str())) {
            return Err(invalid(format!("'{}' is a member of raid5 '{}' already", spec.name, self.name)));
        }
        if self.job.is_some() {
            return Err(invalid(format!("raid5 '{}' is rebuilding already", self.name)));
        }
        if spec.media_size < self.layout.member_bytes() + u64::from(self.sector) || spec.sector_size > self.sector {
            return Err(invalid(format!(
                "'{}' is too small for raid5 '{}' (it needs {} bytes)",
                spec.name,
                self.name,
                self.layout.member_bytes() + u64::from(self.sector)
            )));
        }
        let i = self.free_place().ok_or_else(|| {
            invalid(format!("raid5 '{}' has no missing member to replace", self.name))
        })?;
        self.take_place(io, i, p, spec)
    }

    /// `raid5 remove`: the member leaves, and its record is wiped.
    fn remove(&mut self, io: &mut Io<'_>, provider: &str) -> Result<(), CtlError> {
        let i = self
            .members
            .iter()
            .position(|m| m.name.as_deref() == Some(provider) && m.consumer.is_some())
            .ok_or_else(|| invalid(format!("'{provider}' is not a member of raid5 '{}'", self.name)))?;
        self.fail_member(io, i, "removed");
        self.members[i].state = MemberState::Missing;
        // Zeroes over its record, so it is not tasted back in.
        let at = self.members[i].media_size - u64::from(self.sector);
        let mut bio = crate::bio::Bio::with_data(
            crate::bio::BioCmd::Write,
            at,
            crate::page::SgList::alloc(self.sector as usize),
        );
        bio.fua = true;
        self.members[i].meta_inflight = true;
        self.send(io, i, bio, super::cookie(super::Kind::Meta, i, 0, 0));
        Ok(())
    }

    /// A member of this array appeared after assembly: one counted out is
    /// rebuilt (when nothing else is).
    fn rejoin(&mut self, io: &mut Io<'_>, t: &Tasted, spec: &ProviderSpec) {
        let i = t.meta.member_index as usize;
        if t.meta.id != self.id
            || i >= self.members.len()
            || self.members[i].consumer.is_some()
            || self.job.is_some()
            || spec.media_size < self.layout.member_bytes() + u64::from(self.sector)
        {
            return;
        }
        let _ = self.take_place(io, i, t.provider, spec);
    }

    /// The `/status` document of the array.
    pub(super) fn status_json(&self) -> Value {
        let members: Vec<Value> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let rebuilt = match &self.job {
                    Some(j) if j.kind == JobKind::Rebuild(i) => j.next * self.layout.unit,
                    _ if m.state == MemberState::Active => self.layout.rows * self.layout.unit,
                    _ => 0,
                };
                json!({"index": i, "provider": m.name, "state": m.state.name(),
                       "rebuilt_bytes": rebuilt, "why": m.why})
            })
            .collect();
        let job = self.job.as_ref().map(|j| {
            let total = self.layout.rows * self.layout.unit;
            match j.kind {
                JobKind::Rebuild(t) => json!({"kind": "rebuild", "member": t,
                    "done_bytes": j.next * self.layout.unit, "total_bytes": total}),
                JobKind::Resync => json!({"kind": "resync",
                    "done_bytes": j.next * self.layout.unit, "total_bytes": total}),
            }
        });
        let rebuild = self.job.as_ref().and_then(|j| match j.kind {
            JobKind::Rebuild(t) => Some(json!({"member": t, "done_bytes": j.next * self.layout.unit,
                "total_bytes": self.layout.rows * self.layout.unit})),
            JobKind::Resync => None,
        });
        let s = &self.scrub;
        let scrub_state = if s.running { "running" } else if s.done { "done" } else { "idle" };
        json!({
            "state": self.state_name(),
            "stripe_unit": self.layout.unit,
            "ppl": self.ppl,
            "clean": self.clean,
            "generation": self.generation,
            "members": members,
            "rebuild": rebuild,
            "job": job,
            "scrub": {"state": scrub_state, "rows_checked": s.rows_checked,
                      "rows_skipped": s.rows_skipped, "mismatches": s.mismatches},
            "log": {"slots": self.layout.slots, "replayed": self.replay_stats.0,
                    "skipped": self.replay_stats.1, "sequence": self.next_seq - 1,
                    "watermark": self.watermark},
        })
    }
}
