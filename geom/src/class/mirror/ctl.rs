//! The mirror class as the stack sees it — tasting, assembly, a returning
//! member, config statements — and the operator's commands (gmirror's
//! label, create, insert, remove, rebuild, forget).
//!
//! `mirror destroy` and `mirror clear` are the commands every class over
//! members shares ([`crate::class::Destroy`], [`crate::class::Clear`]):
//! destroy withers the geom, which notices its provider orphaned and
//! stops; clear zeroes metadata sectors.
//!
//! Members whose histories conflict (each holds writes the other lacks)
//! are not assembled: a [`RefusedMirror`] takes the mirror's name instead,
//! serves nothing and touches no member, and says why in `/status` and
//! `/geom`. The operator keeps one side with `mirror rebuild NAME
//! PROVIDER`, which assembles the others and copies over `PROVIDER`
//! (whose own writes are then lost), or sets the disks aside with `mirror
//! destroy NAME`.

use super::history::{relate, Relation};
use super::intent::{Recovery, WriteIntent};
use super::label::{complete_set, mix, plan, record_history, Plan, Refusal};
use super::{
    history_json, Epoch, History, MemberState, MirrorBalance, MirrorError, MirrorGeom,
    MirrorState, MirrorStatus, Slab, CLASS_NAME, DEFAULT_BALANCE,
};
use crate::bio::{Bio, BioError, GeomId, ProviderId};
use crate::class::{member_verb, unknown_verb, Class, Command, MemberVerb};
use crate::config::{Args, ConfigError};
use crate::ctl::CtlError;
use crate::meta::{MetaRepr, PARAMS, TAIL_LEN};
use crate::stack::{Geom, Io, ProviderSpec, Stack, StackError};
use crate::taste::Member as Tasted;
use alloc::boxed::Box;
use alloc::format;
use alloc::sync::Arc;
use serde_json::{json, Value};
use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// The mirror class.
pub struct MirrorClass;

impl Class for MirrorClass {
    fn name(&self) -> &'static str {
        CLASS_NAME
    }

    /// A mirror can run degraded, so it waits for every disk to be tasted
    /// unless the members found already form a complete, current set.
    fn ready(&self, members: &[Tasted], settled: bool) -> bool {
        !members.is_empty() && (settled || complete_set(members))
    }

    fn assemble(&self, stack: &mut Stack, members: &[Tasted]) -> Result<GeomId, StackError> {
        let p = match plan(members, None) {
            Ok(p) => p,
            Err(Refusal::Conflict(a, b)) => return Err(refuse(stack, members, a, b)),
            Err(Refusal::Other(why)) => return Err(StackError::Invalid(why)),
        };
        assemble_plan(stack, members, p).map_err(|e| match e {
            MirrorError::Stack(e) => e,
            e => StackError::Invalid(e.to_string()),
        })
    }

    /// A member of a running mirror appeared (a disk that came back):
    /// unless its place is taken (it was replaced, or it is the same disk
    /// seen through a pass-through geom) or its history is newer than the
    /// mirror's or conflicts with it (then it is refused, and the mirror's
    /// status says why), it joins and is copied over from the start. A
    /// member of a refused mirror is listed with the others.
    fn join(&self, stack: &mut Stack, geom: GeomId, member: Tasted) {
        let name = stack.provider(member.provider).spec.name.clone();
        if stack
            .geom_as::<MirrorGeom, _>(geom, |m, io| m.rejoin(io, &member))
            .is_none()
        {
            stack.geom_as::<RefusedMirror, _>(geom, |r, _| {
                if !r.members.iter().any(|(n, _)| *n == name) {
                    r.members.push((name, member));
                }
            });
        }
    }

    fn parse(&self, args: &mut Args<'_>) -> Result<Arc<dyn Command>, ConfigError> {
        const VERBS: &str = "create, label, insert, remove, rebuild, forget, destroy or clear";
        let label = match member_verb(CLASS_NAME, args, VERBS)? {
            MemberVerb::Create { label, .. } => label,
            MemberVerb::Parsed(c) => return Ok(c),
            MemberVerb::Other(verb) => {
                let name = match verb.text {
                    "insert" | "remove" | "rebuild" | "forget" => args.name("mirror name")?,
                    _ => return Err(unknown_verb(args, CLASS_NAME, &verb, VERBS)),
                };
                return Ok(match verb.text {
                    "insert" => Arc::new(MirrorInsert {
                        name,
                        providers: args.providers(1)?,
                    }),
                    "remove" => Arc::new(MirrorRemove {
                        name,
                        providers: args.providers(1)?,
                    }),
                    "rebuild" => {
                        let provider = args.name("provider name")?;
                        args.finish()?;
                        Arc::new(MirrorRebuild { name, provider })
                    }
                    _ => {
                        args.finish()?;
                        Arc::new(MirrorForget { name })
                    }
                });
            }
        };
        let mut balance = None;
        while let Some(w) = args.option() {
            if w.text != "-b" {
                return Err(args.err(w.column, format!("unknown mirror option '{}'", w.text)));
            }
            let v = args.next("a balance algorithm after -b")?;
            balance = Some(MirrorBalance::from_name(v.text).ok_or_else(|| {
                args.err(
                    v.column,
                    format!(
                        "unknown balance '{}' (expected load, prefer, round-robin or split)",
                        v.text
                    ),
                )
            })?);
        }
        let name = args.geom_name(CLASS_NAME)?;
        let providers = args.providers(1)?;
        Ok(Arc::new(MirrorCreate {
            name,
            providers,
            balance,
            label,
        }))
    }

    /// `/status` lists every mirror with its health, members and resync
    /// progress (the same document as its `config` in `GET /geom`).
    fn status(&self, stack: &Stack) -> Option<(&'static str, Value)> {
        let mirrors = crate::class::status_list(stack, CLASS_NAME, |conf| match conf {
            Value::Object(conf) => Some(conf),
            _ => None,
        });
        Some(("mirrors", mirrors))
    }
}

/// The mirror class's registry entry.
pub static CLASS: MirrorClass = MirrorClass;

/// Turns a mirror refusal into a control error.
fn ctl_error(e: MirrorError) -> CtlError {
    match e {
        MirrorError::Stack(e) => CtlError::Stack(e),
        e => CtlError::Invalid(e.to_string()),
    }
}

/// `mirror create|label [-b BALANCE] NAME PROVIDER...`: provider
/// `mirror/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorCreate {
    /// Geom name.
    pub name: String,
    /// Members, all trusted as equal (as gmirror's label does); a disk
    /// with other contents joins with `mirror insert` instead.
    pub providers: Vec<String>,
    /// Read balancing, or the class default.
    pub balance: Option<MirrorBalance>,
    /// Write metadata (`label`) or not (`create`).
    pub label: bool,
}

impl Command for MirrorCreate {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        let names: Vec<&str> = self.providers.iter().map(String::as_str).collect();
        create(
            stack,
            &self.name,
            &names,
            self.balance.unwrap_or(DEFAULT_BALANCE),
            self.label,
        )
        .map(|_| ())
        .map_err(ctl_error)
    }

    fn creates(&self) -> Option<(String, String)> {
        Some((MirrorGeom::provider_name(&self.name), self.name.clone()))
    }

    /// A labelled mirror that tasting assembled (whole, degraded, or as
    /// the placeholder of a refused assembly) is never labelled again:
    /// that would make stale members current.
    fn on_disk(&self, stack: &mut Stack) -> bool {
        self.label && stack.find_geom(super::CLASS_NAME, &self.name).is_some()
    }
}

/// `mirror insert NAME PROVIDER...`: adds members and resyncs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorInsert {
    /// Geom name.
    pub name: String,
    /// New members.
    pub providers: Vec<String>,
}

impl Command for MirrorInsert {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        self.providers
            .iter()
            .try_for_each(|p| insert(stack, &self.name, p))
            .map_err(ctl_error)
    }
}

/// `mirror remove NAME PROVIDER...`: takes members out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRemove {
    /// Geom name.
    pub name: String,
    /// Members to remove.
    pub providers: Vec<String>,
}

impl Command for MirrorRemove {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        self.providers
            .iter()
            .try_for_each(|p| remove(stack, &self.name, p))
            .map_err(ctl_error)
    }
}

/// `mirror rebuild NAME PROVIDER`: resyncs a member from the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRebuild {
    /// Geom name.
    pub name: String,
    /// The member to rebuild.
    pub provider: String,
}

impl Command for MirrorRebuild {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        rebuild(stack, &self.name, &self.provider).map_err(ctl_error)
    }
}

/// `mirror forget NAME`: forgets members that are gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorForget {
    /// Geom name.
    pub name: String,
}

impl Command for MirrorForget {
    fn apply(&self, stack: &mut Stack) -> Result<(), CtlError> {
        forget(stack, &self.name).map_err(ctl_error)
    }
}

/// A member provider for [`create_geom`].
struct Joining {
    provider: ProviderId,
    /// Its place in metadata.
    index: u32,
    /// `None`: holds the mirror's data; `Some(off)`: synchronize from `off`.
    sync_from: Option<u64>,
}

/// What a new geom starts from.
struct Blueprint {
    name: String,
    id: u64,
    generation: u64,
    balance: MirrorBalance,
    media_size: u64,
    sector_size: u32,
    wanted: u32,
    labelled: bool,
    /// Write a new generation at once.
    bump: bool,
    /// Begin a new epoch with the first write (members are missing or
    /// stale).
    epoch_due: bool,
    /// The history the members' data belongs to.
    history: History,
    /// log2 of the write-intent region size.
    region_shift: u8,
    /// Byte ranges the members' bitmaps mark dirty (an unclean stop), and
    /// the member (position in `joining`) to copy them from.
    dirty: Vec<(u64, u64)>,
    source: usize,
}

/// Builds the geom, its provider and its consumers (opened r1w1e1, as
/// gmirror opens its components: nobody else writes to a member), undoing
/// everything on failure.
fn create_geom(
    stack: &mut Stack,
    bp: Blueprint,
    joining: &[Joining],
) -> Result<GeomId, MirrorError> {
    let specs: Vec<ProviderSpec> = joining
        .iter()
        .map(|j| stack.provider(j.provider).spec.clone())
        .collect();
    let mut spec = ProviderSpec::new(
        &MirrorGeom::provider_name(&bp.name),
        bp.media_size,
        bp.sector_size,
    );
    spec.can_flush = true;
    spec.can_discard = specs.iter().all(|s| s.can_discard);
    spec.can_write_zeroes = specs.iter().all(|s| s.can_write_zeroes);
    let g = stack.reserve_geom(CLASS_NAME, &bp.name);
    let provider = match stack.add_provider(g, spec) {
        Ok(p) => p,
        Err(e) => {
            stack.abandon(g);
            return Err(e.into());
        }
    };
    let mut consumers = Vec::new();
    for j in joining {
        let c = stack.attach(Some(g), j.provider);
        if let Err(e) = stack.access(c, 1, 1, 1) {
            stack.abandon(g);
            return Err(e.into());
        }
        consumers.push(c);
    }
    let mut geom = MirrorGeom {
        name: bp.name,
        provider,
        media_size: bp.media_size,
        sector_size: bp.sector_size,
        balance: bp.balance,
        id: bp.id,
        generation: bp.generation,
        history: bp.history,
        epoch_due: false,
        epoch_version: 0,
        meta_version: 0,
        members: Vec::new(),
        wanted: bp.wanted,
        labelled: bp.labelled,
        rr: 0,
        pending: Slab::new(),
        queued: VecDeque::new(),
        parked: VecDeque::new(),
        park_barrier: 0,
        flushes: 0,
        intent: bp
            .labelled
            .then(|| WriteIntent::new(bp.region_shift, bp.media_size)),
        recovery: None,
        recovered: 0,
        refused: Vec::new(),
        chunks: Slab::new(),
        clearing: Vec::new(),
        detaching: Vec::new(),
        state: MirrorState::Complete,
        dropped: Vec::new(),
        tick: (0, 0),
        tick_spent: false,
    };
    // Records on disk hold the geom's state unless something changes now.
    let recorded = !bp.bump && bp.dirty.is_empty();
    let source = consumers.get(bp.source).copied();
    for ((j, s), c) in joining.iter().zip(&specs).zip(consumers) {
        geom.add_member(c, s, j.index, j.sync_from, recorded);
    }
    if bp.bump {
        geom.bump_generation();
    }
    if bp.epoch_due {
        geom.members_shrank();
    }
    if !bp.dirty.is_empty() {
        // An unclean stop: the regions stay dirty on every member's record
        // until copied and flushed, and writes there wait for that record.
        let v = geom.touch_all();
        if let Some(w) = geom.intent.as_mut() {
            for &(start, end) in &bp.dirty {
                w.mark(start, end, v);
            }
            if let (Some(src), true) = (source, geom.members.len() > 1) {
                geom.recovery = Some(Recovery::new(src, w));
            }
        }
    }
    geom.refresh_state();
    stack.install(g, Box::new(geom));
    stack.geom_as::<MirrorGeom, _>(g, |m, io| m.after_event(io));
    Ok(g)
}

/// Checks `name` can be written in metadata and is not taken.
fn check_name(stack: &Stack, name: &str) -> Result<(), MirrorError> {
    let probe = MetaRepr {
        class: String::from(CLASS_NAME),
        name: String::from(name),
        id: 0,
        generation: 0,
        member_index: 0,
        member_count: 1,
        member_size: 0,
        sector_size: 512,
        flags: 0,
        params: [0; PARAMS],
        tail: [0; TAIL_LEN],
    };
    if probe.check().is_err() || name.contains('/') {
        return Err(MirrorError::BadName(String::from(name)));
    }
    if stack.find_geom(CLASS_NAME, name).is_some() {
        return Err(StackError::NameInUse(MirrorGeom::provider_name(name)).into());
    }
    Ok(())
}

/// A live, not orphaned provider by name.
fn live_provider(stack: &Stack, name: &str) -> Result<ProviderId, MirrorError> {
    stack
        .find_provider(name)
        .filter(|&id| !stack.provider(id).orphaned)
        .ok_or_else(|| StackError::NoSuchProvider(String::from(name)).into())
}

/// `mirror label|create [-b BALANCE] NAME P1 P2 …`: makes a mirror of the
/// given providers, all active at once: like gmirror, label copies
/// nothing, so the members must hold the same data (fresh disks do);
/// a disk with other contents joins with `mirror insert`, or is copied
/// over with `mirror rebuild`. `label` writes metadata (generation 1) so
/// the mirror reassembles after a restart; `create` writes none.
pub fn create(
    stack: &mut Stack,
    name: &str,
    providers: &[&str],
    balance: MirrorBalance,
    label: bool,
) -> Result<GeomId, MirrorError> {
    check_name(stack, name)?;
    if providers.is_empty() {
        return Err(MirrorError::NoMembers);
    }
    let mut ids = Vec::new();
    for (k, &p) in providers.iter().enumerate() {
        if providers[..k].contains(&p) {
            return Err(MirrorError::Duplicate(String::from(p)));
        }
        ids.push(live_provider(stack, p)?);
    }
    let spec = |p: &ProviderId| stack.provider(*p).spec.clone();
    let sector_size = ids.iter().map(|p| spec(p).sector_size).max().unwrap_or(512);
    let sector = u64::from(sector_size);
    // Each member keeps its own last sector for metadata.
    let (usable, smallest) = ids
        .iter()
        .map(|p| {
            let s = spec(p);
            let reserve = if label { u64::from(s.sector_size) } else { 0 };
            (s.media_size.saturating_sub(reserve), s.name)
        })
        .min()
        .unwrap_or((0, String::new()));
    let media_size = usable - usable % sector;
    if media_size == 0 {
        return Err(MirrorError::TooSmall(smallest));
    }
    let id = stack.random_u64();
    // The first epoch begins with the label (generation 1).
    let epoch = mix(stack.random_u64() ^ id).max(1);
    let joining: Vec<Joining> = ids
        .iter()
        .enumerate()
        .map(|(k, &provider)| Joining {
            provider,
            index: k as u32,
            sync_from: None,
        })
        .collect();
    create_geom(
        stack,
        Blueprint {
            name: String::from(name),
            id,
            generation: 0,
            balance,
            media_size,
            sector_size,
            wanted: ids.len() as u32,
            labelled: label,
            bump: true,
            // A label is a new mirror, not a shrunken one.
            epoch_due: false,
            history: History::new(Epoch {
                id: epoch,
                since: 1,
            }),
            region_shift: super::history::region_shift_for(media_size),
            dirty: Vec::new(),
            source: 0,
        },
        &joining,
    )
}

/// Runs `f` on the live mirror called `name`.
fn with_mirror<R>(
    stack: &mut Stack,
    name: &str,
    f: impl FnOnce(&mut MirrorGeom, &mut Io<'_>) -> Result<R, MirrorError>,
) -> Result<R, MirrorError> {
    let missing = || MirrorError::NoMirror(String::from(name));
    let g = stack.find_geom(CLASS_NAME, name).ok_or_else(missing)?;
    stack
        .geom_as::<MirrorGeom, _>(g, f)
        .unwrap_or_else(|| Err(missing()))
}

/// `mirror insert NAME P`: adds provider `P` and copies the mirror onto it
/// while I/O goes on; it serves reads once the copy is done.
pub fn insert(stack: &mut Stack, name: &str, provider: &str) -> Result<(), MirrorError> {
    let p = live_provider(stack, provider)?;
    with_mirror(stack, name, |m, io| m.insert(io, p))
}

/// `mirror remove NAME P`: takes member `P` out of the mirror and clears
/// its metadata. The last active member cannot be removed.
pub fn remove(stack: &mut Stack, name: &str, provider: &str) -> Result<(), MirrorError> {
    with_mirror(stack, name, |m, io| m.remove(io, provider))
}

/// `mirror rebuild NAME P`: copies the whole range onto member `P` again.
/// On a mirror refused for conflicting histories, `P`'s history is given
/// up: the other members assemble, and `P` is copied over from them.
pub fn rebuild(stack: &mut Stack, name: &str, provider: &str) -> Result<(), MirrorError> {
    if let Some(g) = stack.find_geom(CLASS_NAME, name) {
        if let Some(members) = stack.geom_as::<RefusedMirror, _>(g, |r, _| r.members.clone()) {
            return resolve(stack, g, members, provider);
        }
    }
    with_mirror(stack, name, |m, io| m.rebuild(io, provider))
}

/// `mirror rebuild` on a refused mirror: assembles it from its members
/// with `provider`'s history given up.
fn resolve(
    stack: &mut Stack,
    g: GeomId,
    members: Vec<(String, Tasted)>,
    provider: &str,
) -> Result<(), MirrorError> {
    let k = members
        .iter()
        .position(|(n, _)| n == provider)
        .ok_or_else(|| MirrorError::NotMember(provider.to_string()))?;
    for (n, t) in &members {
        let live = stack
            .get_provider(t.provider)
            .is_some_and(|p| !p.orphaned && p.spec.name == *n);
        if !live {
            return Err(StackError::NoSuchProvider(n.clone()).into());
        }
    }
    let tasted: Vec<Tasted> = members.into_iter().map(|(_, t)| t).collect();
    let p = match plan(&tasted, Some(k)) {
        Ok(p) => p,
        Err(Refusal::Conflict(a, b)) => {
            return Err(MirrorError::Conflict(conflict_reason(stack, &tasted, a, b)))
        }
        Err(Refusal::Other(why)) => return Err(MirrorError::Stack(StackError::Invalid(why))),
    };
    stack.destroy_geom(g, false)?;
    assemble_plan(stack, &tasted, p).map(|_| ())
}

/// Builds the mirror `p` plans from `members`.
fn assemble_plan(stack: &mut Stack, members: &[Tasted], p: Plan) -> Result<GeomId, MirrorError> {
    if stack.find_geom(CLASS_NAME, &p.name).is_some() {
        return Err(StackError::NameInUse(MirrorGeom::provider_name(&p.name)).into());
    }
    let joining: Vec<Joining> = members
        .iter()
        .zip(&p.sync_from)
        .map(|(m, &sync_from)| Joining {
            provider: m.provider,
            index: m.meta.member_index,
            sync_from,
        })
        .collect();
    create_geom(
        stack,
        Blueprint {
            name: p.name,
            id: p.id,
            generation: p.generation,
            balance: p.balance,
            media_size: p.media_size,
            sector_size: p.sector_size,
            wanted: p.wanted,
            labelled: true,
            bump: p.bump,
            epoch_due: p.bump,
            history: p.history,
            region_shift: p.region_shift,
            dirty: p.dirty,
            source: p.source,
        },
        &joining,
    )
}

/// Why members `a` and `b` (positions in `members`) are not assembled.
fn conflict_reason(stack: &Stack, members: &[Tasted], a: usize, b: usize) -> String {
    let who = |k: usize| {
        let m = &members[k];
        let name = stack
            .get_provider(m.provider)
            .map_or_else(|| String::from("?"), |p| p.spec.name.clone());
        let epoch = record_history(&m.meta).map_or(0, |h| h.0.head.id);
        format!(
            "{name} (member {}, epoch {epoch:016x})",
            m.meta.member_index
        )
    };
    format!(
        "conflicting histories: {} and {} each hold writes the other lacks; \
         nothing was assembled and no member was touched (keep one side with \
         `mirror rebuild {} PROVIDER`, which copies over PROVIDER)",
        who(a),
        who(b),
        members[a].meta.name
    )
}

/// Refuses to assemble members whose histories conflict: a
/// [`RefusedMirror`] holds the name (so a member that turns up later
/// cannot assemble a mirror on its own) and says why.
fn refuse(stack: &mut Stack, members: &[Tasted], a: usize, b: usize) -> StackError {
    let reason = conflict_reason(stack, members, a, b);
    let name = members[a].meta.name.clone();
    if stack.find_geom(CLASS_NAME, &name).is_none() {
        let listed = members
            .iter()
            .map(|m| (stack.provider(m.provider).spec.name.clone(), m.clone()))
            .collect();
        let g = stack.reserve_geom(CLASS_NAME, &name);
        stack.install(
            g,
            Box::new(RefusedMirror {
                reason: reason.clone(),
                members: listed,
            }),
        );
    }
    StackError::Invalid(reason)
}

/// A mirror whose members hold conflicting histories: no provider, no
/// consumers (the members are left as they are); its `/geom` section and
/// `/status` entry say why.
pub struct RefusedMirror {
    reason: String,
    /// The members found, by provider name.
    members: Vec<(String, Tasted)>,
}

impl Geom for RefusedMirror {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn start(&mut self, io: &mut Io<'_>, _provider: ProviderId, bio: Bio) {
        // It offers no provider; nothing can get here.
        io.deliver(bio, Err(BioError::Io));
    }

    fn dumpconf(&self) -> Value {
        let members: Vec<Value> = self
            .members
            .iter()
            .map(|(name, t)| {
                let history = match record_history(&t.meta) {
                    Some((h, _)) => history_json(&h),
                    None => Value::from("damaged"),
                };
                json!({
                    "provider": name,
                    "index": t.meta.member_index,
                    "generation": t.meta.generation,
                    "synchronizing": t.meta.flags & super::FLAG_SYNCHRONIZING != 0,
                    "history": history,
                })
            })
            .collect();
        json!({"state": "refused", "reason": self.reason, "members": members})
    }

    fn as_any(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }
}

/// `mirror forget NAME`: forgets members that are gone, so the mirror of
/// the members left counts as complete.
pub fn forget(stack: &mut Stack, name: &str) -> Result<(), MirrorError> {
    with_mirror(stack, name, |m, io| {
        m.forget(io);
        Ok(())
    })
}

/// The status of the live mirror called `name`.
pub fn status(stack: &mut Stack, name: &str) -> Option<MirrorStatus> {
    with_mirror(stack, name, |m, _| Ok(m.status())).ok()
}

impl MirrorGeom {
    /// Checks that a provider can join: not a member yet, large enough for
    /// the range (and its own metadata sector), a sector size dividing the
    /// mirror's, and every ability the mirror offers.
    fn check_joiner(&self, io: &Io<'_>, spec: &ProviderSpec) -> Result<(), MirrorError> {
        if self.members.iter().any(|m| m.name == spec.name) {
            return Err(MirrorError::AlreadyMember(spec.name.clone()));
        }
        let reserve = if self.labelled {
            u64::from(spec.sector_size)
        } else {
            0
        };
        if spec.media_size < self.media_size + reserve {
            return Err(MirrorError::TooSmall(spec.name.clone()));
        }
        if !self.sector_size.is_multiple_of(spec.sector_size) {
            return Err(MirrorError::SectorSize(spec.name.clone()));
        }
        let mine = &io.provider(self.provider).spec;
        if (mine.can_discard && !spec.can_discard)
            || (mine.can_write_zeroes && !spec.can_write_zeroes)
        {
            return Err(MirrorError::Capability(spec.name.clone()));
        }
        Ok(())
    }

    /// Opens `p` with the mirror's own r1w1e1 plus what the mirror's
    /// provider is open for, adds it at place `index` and starts copying
    /// onto it.
    fn join_provider(
        &mut self,
        io: &mut Io<'_>,
        p: ProviderId,
        index: u32,
    ) -> Result<(), MirrorError> {
        let spec = io.provider(p).spec.clone();
        self.check_joiner(io, &spec)?;
        let c = io.attach(p);
        let a = io.provider_access();
        if let Err(e) = io.access(c, 1 + a.r, 1 + a.w, 1 + a.e) {
            let _ = io.detach(c);
            return Err(e.into());
        }
        self.add_member(c, &spec, index, Some(0), false);
        self.bump_generation();
        self.refresh_state();
        self.after_event(io);
        Ok(())
    }

    /// `mirror insert`.
    fn insert(&mut self, io: &mut Io<'_>, p: ProviderId) -> Result<(), MirrorError> {
        if !self.serving() {
            return Err(MirrorError::Dead(self.name.clone()));
        }
        let index = self.free_index();
        self.join_provider(io, p, index)?;
        self.wanted = self.wanted.max(self.members.len() as u32);
        Ok(())
    }

    /// A tasted member of this mirror appeared while it runs: one whose
    /// history the mirror's descends from (or shares) joins and is copied
    /// over; one with a newer or conflicting history is refused, and the
    /// status says why.
    fn rejoin(&mut self, io: &mut Io<'_>, t: &Tasted) {
        let name = io.provider(t.provider).spec.name.clone();
        let taken = self
            .members
            .iter()
            .any(|m| m.index == t.meta.member_index || name == m.name);
        if !self.serving() {
            return;
        }
        if t.meta.id != self.id {
            self.refused.retain(|(n, _)| *n != name);
            self.refused.push((
                name,
                format!(
                    "it belongs to another mirror of this name (id {:016x})",
                    t.meta.id
                ),
            ));
            return;
        }
        if taken {
            return;
        }
        // A damaged history record says nothing: copied over, as a stale
        // member would be.
        let why = record_history(&t.meta).and_then(|(h, _)| {
            match relate(&h, t.meta.generation, &self.history, self.generation) {
                Relation::Older | Relation::Same => None,
                Relation::Newer => Some("newer than"),
                Relation::Conflict => Some("in conflict with"),
            }
            .map(|rel| {
                format!(
                    "its history (epoch {:016x}, generation {}) is {rel} the mirror's \
                     (epoch {:016x}, generation {}): it may hold writes the mirror lacks",
                    h.head.id, t.meta.generation, self.history.head.id, self.generation
                )
            })
        });
        if let Some(why) = why {
            self.refused.retain(|(n, _)| *n != name);
            self.refused.push((name, why));
            return;
        }
        let _ = self.join_provider(io, t.provider, t.meta.member_index);
    }

    /// `mirror remove`.
    fn remove(&mut self, io: &mut Io<'_>, provider: &str) -> Result<(), MirrorError> {
        let i = self
            .members
            .iter()
            .position(|m| m.name == provider)
            .ok_or_else(|| MirrorError::NotMember(provider.to_string()))?;
        if self.members[i].state == MemberState::Active && self.active_count() == 1 {
            return Err(MirrorError::LastMember(provider.to_string()));
        }
        let m = self.members.remove(i);
        if m.sync.is_some() {
            self.abandon_chunks(Some(m.consumer));
        }
        self.recovery_lost(m.consumer);
        self.members_shrank();
        self.clear_metadata(&m);
        self.detaching.push(m.consumer);
        self.wanted = self.wanted.saturating_sub(1).max(1);
        self.compact_indices();
        self.bump_generation();
        self.refresh_state();
        self.after_event(io);
        Ok(())
    }

    /// `mirror rebuild`: an active member is copied onto from the start
    /// (one being copied onto already goes on as it is).
    fn rebuild(&mut self, io: &mut Io<'_>, provider: &str) -> Result<(), MirrorError> {
        let i = self
            .members
            .iter()
            .position(|m| m.name == provider)
            .ok_or_else(|| MirrorError::NotMember(provider.to_string()))?;
        let m = &self.members[i];
        if m.state == MemberState::Synchronizing {
            // Being copied onto already.
            return Ok(());
        }
        if self.active_count() == 1 {
            return Err(MirrorError::LastMember(provider.to_string()));
        }
        let c = self.members[i].consumer;
        self.recovery_lost(c);
        self.start_sync(i, 0);
        self.members_shrank();
        self.bump_generation();
        self.refresh_state();
        self.after_event(io);
        Ok(())
    }

    /// Renumbers the members' places `0..n`, keeping their order (a
    /// stale disk that held a place now given to another member loses to
    /// it at tasting, on generation).
    fn compact_indices(&mut self) {
        self.members.sort_by_key(|m| m.index);
        for (i, m) in self.members.iter_mut().enumerate() {
            m.index = i as u32;
        }
    }

    /// `mirror forget`: the members left are all the operator wants.
    fn forget(&mut self, io: &mut Io<'_>) {
        self.compact_indices();
        self.wanted = (self.members.len() as u32).max(1);
        self.dropped.clear();
        self.bump_generation();
        self.refresh_state();
        self.after_event(io);
    }
}
