//! The stack: geoms, providers and consumers, and the dispatcher that moves
//! bios and events between them.
//!
//! ```text
//!   external user ──open──▶ consumer ──▶ provider (of geom A)
//!                                           │ start
//!                                        geom A ──request──▶ consumer ──▶ provider (of geom B)
//!                                           ▲ done                            │ start
//!                                           └──────────── deliver ◀──── geom B ─▶ device
//! ```
//!
//! Every request passes one central check (`Core::check`) before a geom
//! sees it: the consumer's access, the provider's state, sector alignment
//! and bounds; zero-length requests complete at once. Requests,
//! completions and orphan notices are queued events: `start`, `done` and
//! `orphan` never run inside one another, so a geom's `start` never sees
//! its own completion synchronously (the split-phase rule).
//!
//! Life of a geom (FreeBSD's wither):
//!
//! ```text
//!  live ──destroy, or a consumer's provider died──▶ withering ──idle──▶ gone
//!        (its providers are orphaned: new I/O      (no bio in flight on its
//!         fails Orphaned, consumers are told)       providers or consumers:
//!                                                   consumers closed, geom dropped)
//! ```
//!
//! An orphaned provider stays listed (state `orphaned`) until its last
//! consumer closes; then it is removed and its name may be used again.

use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId, Frame, GeomId, Owner, ProviderId};
use crate::page::DataCounters;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::sync::atomic::{AtomicU64, Ordering};
use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;

/// A geom: one instance of a class, the adapter between the providers it
/// consumes and the providers it offers.
pub trait Geom {
    /// The class name, e.g. `"md"` or `"disk"`.
    fn class_name(&self) -> &'static str;

    /// Handles a request sent to one of this geom's providers. The request
    /// has passed the central check. Must end, now or later, in exactly one
    /// [`Io::deliver`] of this bio.
    fn start(&mut self, io: &mut Io<'_>, provider: ProviderId, bio: Bio);

    /// Receives back a bio this geom sent down with [`Io::request`],
    /// together with its `cookie` and its result. The default passes the
    /// completion on up, which is right for geoms that forward bios as is.
    fn done(&mut self, io: &mut Io<'_>, cookie: u64, bio: Bio, result: BioResult) {
        let _ = cookie;
        io.deliver(bio, result);
    }

    /// Makes progress on work outside the stack (device completions,
    /// timers). Returns true if anything happened.
    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        let _ = io;
        false
    }

    /// True while the geom's [`Geom::poll`] must be called by the event loop.
    fn wants_poll(&self) -> bool {
        false
    }

    /// The earliest time (ns, on the clock given to [`Stack::set_now_ns`])
    /// at which the geom wants polling for a timer, if any.
    fn next_deadline_ns(&self) -> Option<u64> {
        None
    }

    /// True while the geom is still finding out what it is (a partition
    /// table being read by a geom that a class's [`crate::class::Class::offer`]
    /// made): boot and config lines wait for it, as for the stack's own
    /// tasting. The default is false.
    fn settling(&self) -> bool {
        false
    }

    /// False for geoms whose new providers cannot hold metadata, so the
    /// stack does not taste them (a new memory disk is all zeroes).
    fn tasteable(&self) -> bool {
        true
    }

    /// Tells the geom that the provider below `consumer` has died
    /// (FreeBSD's orphan method). Bios already sent through `consumer`
    /// still come back. The default suits pass-through classes: the geom
    /// withers, orphaning its own providers, so the failure travels up.
    /// A redundant class (mirror) overrides it to degrade instead.
    fn orphan(&mut self, io: &mut Io<'_>, consumer: ConsumerId) {
        let _ = consumer;
        io.wither();
    }

    /// Class-specific state for the topology document, as a JSON object
    /// such as `{"reads":3,"failures":1}` (FreeBSD's dumpconf). The
    /// default has nothing.
    fn dumpconf(&self) -> serde_json::Value {
        serde_json::Value::Object(serde_json::Map::new())
    }

    /// The geom as `Any`, so its class's control code can reach it with
    /// [`Stack::geom_as`]. Classes with live knobs return `Some(self)`.
    fn as_any(&mut self) -> Option<&mut dyn Any> {
        None
    }
}

/// Counters kept for each provider.
#[derive(Default, Debug)]
pub struct ProviderStats {
    /// Read requests started.
    pub reads: AtomicU64,
    /// Write requests started.
    pub writes: AtomicU64,
    /// Flush requests started.
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests started.
    pub frees: AtomicU64,
    /// Bytes requested by reads.
    pub bytes_read: AtomicU64,
    /// Bytes carried by writes.
    pub bytes_written: AtomicU64,
    /// Requests that completed with an error.
    pub errors: AtomicU64,
    /// Sum of read latencies in ns (start to completion on the stack's
    /// clock; zero while the platform gives no clock).
    pub read_ns: AtomicU64,
    /// Sum of write latencies in ns.
    pub write_ns: AtomicU64,
    /// Maps and copies done by this provider's geom on its data path.
    pub data: DataCounters,
}

impl ProviderStats {
    fn count_start(&self, bio: &Bio) {
        let (ops, bytes) = match bio.cmd {
            BioCmd::Read => (&self.reads, Some(&self.bytes_read)),
            BioCmd::Write => (&self.writes, Some(&self.bytes_written)),
            BioCmd::Flush => (&self.flushes, None),
            BioCmd::Discard | BioCmd::WriteZeroes => (&self.frees, None),
            // A query: it moves no data and changes nothing.
            BioCmd::GetAllocation => return,
        };
        ops.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = bytes {
            b.fetch_add(bio.length, Ordering::Relaxed);
        }
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a geom declares about a provider it offers.
#[derive(Clone, Debug)]
pub struct ProviderSpec {
    /// Unique name, e.g. `vtbd0`, `md0`, `mirror/gm0`.
    pub name: String,
    /// Size in bytes; a multiple of `sector_size`.
    pub media_size: u64,
    /// Smallest addressable unit in bytes (a power of two ≥ 512).
    pub sector_size: u32,
    /// Preferred I/O size in bytes (0 if none).
    pub stripe_size: u32,
    /// Offset of the first stripe boundary in bytes.
    pub stripe_offset: u32,
    /// The provider can make writes stable on FLUSH.
    pub can_flush: bool,
    /// The provider accepts DISCARD.
    pub can_discard: bool,
    /// The provider accepts WRITE_ZEROES.
    pub can_write_zeroes: bool,
}

impl ProviderSpec {
    /// A spec with the given name, size and sector size and no optional
    /// capabilities.
    pub fn new(name: &str, media_size: u64, sector_size: u32) -> ProviderSpec {
        ProviderSpec {
            name: String::from(name),
            media_size,
            sector_size,
            stripe_size: 0,
            stripe_offset: 0,
            can_flush: true,
            can_discard: false,
            can_write_zeroes: false,
        }
    }
}

/// A provider: a block device offered by a geom.
#[derive(Debug)]
pub struct Provider {
    /// What its geom declared.
    pub spec: ProviderSpec,
    /// The geom that serves it.
    pub geom: GeomId,
    /// Readers, writers and exclusive openers (sums over its consumers).
    pub access: Access,
    /// Set when the provider died; its consumers were told.
    pub orphaned: bool,
    /// Its geom removed it ([`Io::retire_provider`]): it goes away once
    /// closed and idle, while the geom lives on.
    pub retired: bool,
    /// Bios started on it and not yet completed (gstat's queue length).
    pub in_flight: u32,
    /// Its counters, shared with anyone reporting them.
    pub stats: Arc<ProviderStats>,
}

/// Access counts: readers, writers, exclusive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Open for reading.
    pub r: i32,
    /// Open for writing.
    pub w: i32,
    /// Open exclusively.
    pub e: i32,
}

impl Access {
    /// Open for reading.
    pub const READ: Access = Access { r: 1, w: 0, e: 0 };
    /// Open for reading and writing.
    pub const READ_WRITE: Access = Access { r: 1, w: 1, e: 0 };
    /// Open for reading and writing, and keep other writers out.
    pub const EXCLUSIVE: Access = Access { r: 1, w: 1, e: 1 };

    /// True when nobody has it open.
    pub fn is_zero(&self) -> bool {
        self.r == 0 && self.w == 0 && self.e == 0
    }
}

/// A consumer: an attachment of a geom (or the external user) to a provider.
#[derive(Debug)]
pub struct Consumer {
    /// The geom that consumes, or `None` for the stack's external user and
    /// the stack's own tasting and labelling.
    pub geom: Option<GeomId>,
    /// The provider consumed.
    pub provider: ProviderId,
    /// This consumer's share of the provider's access counts.
    pub access: Access,
    /// Bios sent through it and not yet back.
    pub in_flight: u32,
}

/// Where a geom is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeomState {
    /// Serving.
    Live,
    /// Destroyed or lost a member: its providers are orphaned; it goes
    /// away once no bio is in flight through it.
    Withering,
    /// Dropped; the id is not reused.
    Gone,
}

impl GeomState {
    /// A lowercase name for JSON.
    pub fn name(self) -> &'static str {
        match self {
            GeomState::Live => "ok",
            GeomState::Withering => "withering",
            GeomState::Gone => "gone",
        }
    }
}

/// Why an access change or topology operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StackError {
    /// No provider by that name or id.
    NoSuchProvider(String),
    /// A provider with that name exists already.
    NameInUse(String),
    /// Another consumer holds the provider exclusively, or writers exist
    /// and exclusive access was asked for, or (for destroy) it is open
    /// (EBUSY).
    Busy(String),
    /// The provider has been orphaned.
    Orphaned(String),
    /// An access count would go negative.
    BadAccess,
    /// The request does not make sense (sizes, counts).
    Invalid(String),
}

impl core::fmt::Display for StackError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StackError::NoSuchProvider(n) => write!(f, "no provider named '{n}'"),
            StackError::NameInUse(n) => write!(f, "a provider named '{n}' exists already"),
            StackError::Busy(n) => write!(f, "provider '{n}' is busy"),
            StackError::Orphaned(n) => write!(f, "provider '{n}' is gone"),
            StackError::BadAccess => write!(f, "access count would go negative"),
            StackError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

pub(crate) enum Event {
    Start { consumer: ConsumerId, bio: Bio },
    Done { bio: Bio, result: BioResult },
    Orphan { consumer: ConsumerId },
}

pub(crate) struct GeomInfo {
    pub(crate) name: String,
    pub(crate) class: &'static str,
    pub(crate) state: GeomState,
}

/// The part of the stack a geom may use while it runs.
pub struct Core {
    pub(crate) providers: Vec<Option<Provider>>,
    pub(crate) consumers: Vec<Option<Consumer>>,
    pub(crate) geoms: Vec<GeomInfo>,
    pub(crate) events: VecDeque<Event>,
    pub(crate) completed: VecDeque<(u64, Bio, BioResult)>,
    pub(crate) now_ns: u64,
    pub(crate) clock_set: bool,
    pub(crate) rng: XorShiftRng,
    /// Maps and copies of metadata I/O (tasting and labelling), kept apart
    /// from the providers' data-path figures.
    pub(crate) meta_counters: DataCounters,
    /// Providers added since the last taste round.
    pub(crate) new_providers: Vec<ProviderId>,
    pub(crate) reap_pending: bool,
}

/// The view of the stack handed to a geom's `start`, `done`, `poll` and
/// `orphan`.
pub struct Io<'a> {
    core: &'a mut Core,
    geom: GeomId,
}

impl Io<'_> {
    /// Sends `bio` down through `consumer`; `done` will receive it back with
    /// `cookie`.
    pub fn request(&mut self, consumer: ConsumerId, bio: Bio, cookie: u64) {
        self.core
            .push_start(consumer, bio, Owner::Geom(self.geom), cookie);
    }

    /// Completes a bio that was started on one of this geom's providers.
    pub fn deliver(&mut self, bio: Bio, result: BioResult) {
        self.core.events.push_back(Event::Done { bio, result });
    }

    /// The counters of a provider (a geom counts its maps and copies here).
    pub fn stats(&self, provider: ProviderId) -> &ProviderStats {
        &self.core.provider(provider).stats
    }

    /// A provider's declared properties and state.
    pub fn provider(&self, provider: ProviderId) -> &Provider {
        self.core.provider(provider)
    }

    /// A consumer's provider, access and bios in flight.
    pub fn consumer(&self, consumer: ConsumerId) -> &Consumer {
        self.core.consumer(consumer)
    }

    /// The geom this view belongs to.
    pub fn geom(&self) -> GeomId {
        self.geom
    }

    /// The stack's clock in ns (see [`Stack::set_now_ns`]).
    pub fn now_ns(&self) -> u64 {
        self.core.now_ns
    }

    /// True once the platform has given the stack a clock; geoms with
    /// timers treat delays as zero until then, so nothing waits forever.
    pub fn has_clock(&self) -> bool {
        self.core.clock_set
    }

    /// A number from the stack's seeded generator (ids for labels).
    pub fn random_u64(&mut self) -> u64 {
        self.core.rng.next_u64()
    }

    /// Counters for metadata I/O, which is not data-path work.
    pub fn meta_counters(&self) -> &DataCounters {
        &self.core.meta_counters
    }

    /// Marks `provider` dead: new requests fail with
    /// [`BioError::Orphaned`] and each geom consuming it is told through
    /// an orphan event. Bios in flight still complete.
    pub fn orphan_provider(&mut self, provider: ProviderId) {
        self.core.orphan_provider(provider);
    }

    /// Removes one of this geom's providers (a partition deleted) while
    /// the geom lives on: it is orphaned, and removed once nobody has it
    /// open and nothing is in flight on it; then its name is free.
    pub fn retire_provider(&mut self, provider: ProviderId) {
        self.core.orphan_provider(provider);
        self.core.provider_mut(provider).retired = true;
    }

    /// Withers this geom: orphans all its providers; the stack drops the
    /// geom once no bio is in flight through it.
    pub fn wither(&mut self) {
        self.core.wither(self.geom);
    }

    /// Attaches this geom to `provider` with no access yet.
    pub fn attach(&mut self, provider: ProviderId) -> ConsumerId {
        self.core.attach(Some(self.geom), provider)
    }

    /// Changes the access of one of this geom's consumers (see
    /// [`Stack::access`]).
    pub fn access(
        &mut self,
        consumer: ConsumerId,
        dr: i32,
        dw: i32,
        de: i32,
    ) -> Result<(), StackError> {
        self.core.access(consumer, dr, dw, de)
    }

    /// Closes and detaches one of this geom's consumers; refused while bios
    /// are in flight through it.
    pub fn detach(&mut self, consumer: ConsumerId) -> Result<(), StackError> {
        self.core.detach(consumer)
    }

    /// Adds a provider offered by this geom. Its access counts start at
    /// zero; it is tasted on the next run.
    pub fn add_provider(&mut self, spec: ProviderSpec) -> Result<ProviderId, StackError> {
        self.core.add_provider(self.geom, spec)
    }

    /// The access this geom's providers hold in total, for geoms that
    /// open a newly attached consumer to match (mirror insert).
    pub fn provider_access(&self) -> Access {
        let mut a = Access::default();
        for p in self.core.providers.iter().flatten() {
            if p.geom == self.geom {
                a.r += p.access.r;
                a.w += p.access.w;
                a.e += p.access.e;
            }
        }
        a
    }

    /// Looks a live provider up by name.
    pub fn find_provider(&self, name: &str) -> Option<ProviderId> {
        self.core.find_provider(name)
    }
}

impl Core {
    fn new() -> Core {
        Core {
            providers: Vec::new(),
            consumers: Vec::new(),
            geoms: Vec::new(),
            events: VecDeque::new(),
            completed: VecDeque::new(),
            now_ns: 0,
            clock_set: false,
            rng: XorShiftRng::seed_from_u64(0x5354_5241_5441),
            meta_counters: DataCounters::new(),
            new_providers: Vec::new(),
            reap_pending: false,
        }
    }

    pub(crate) fn provider(&self, p: ProviderId) -> &Provider {
        self.providers[p.0 as usize]
            .as_ref()
            .expect("provider id refers to a listed provider")
    }

    fn provider_mut(&mut self, p: ProviderId) -> &mut Provider {
        self.providers[p.0 as usize]
            .as_mut()
            .expect("provider id refers to a listed provider")
    }

    pub(crate) fn consumer(&self, c: ConsumerId) -> &Consumer {
        self.consumers[c.0 as usize]
            .as_ref()
            .expect("consumer id refers to a live consumer")
    }

    fn consumer_mut(&mut self, c: ConsumerId) -> &mut Consumer {
        self.consumers[c.0 as usize]
            .as_mut()
            .expect("consumer id refers to a live consumer")
    }

    pub(crate) fn push_start(
        &mut self,
        consumer: ConsumerId,
        mut bio: Bio,
        owner: Owner,
        cookie: u64,
    ) {
        let c = self.consumer_mut(consumer);
        c.in_flight += 1;
        let provider = c.provider;
        bio.frames.push(Frame {
            owner,
            provider,
            consumer,
            cookie,
            start_ns: 0,
            started: false,
        });
        self.events.push_back(Event::Start { consumer, bio });
    }

    /// A live provider by name, or else an orphaned one still listed.
    pub(crate) fn find_provider(&self, name: &str) -> Option<ProviderId> {
        let mut dead = None;
        for (i, p) in self.providers.iter().enumerate() {
            if let Some(p) = p {
                if p.spec.name == name {
                    if !p.orphaned {
                        return Some(ProviderId(i as u32));
                    }
                    dead = Some(ProviderId(i as u32));
                }
            }
        }
        dead
    }

    pub(crate) fn add_provider(
        &mut self,
        g: GeomId,
        spec: ProviderSpec,
    ) -> Result<ProviderId, StackError> {
        if let Some(p) = self.find_provider(&spec.name) {
            if !self.provider(p).orphaned {
                return Err(StackError::NameInUse(spec.name));
            }
        }
        let sector = u64::from(spec.sector_size);
        if spec.sector_size < 512 || !spec.sector_size.is_power_of_two() {
            return Err(StackError::Invalid(alloc::format!(
                "sector size {} of '{}' is not a power of two ≥ 512",
                spec.sector_size,
                spec.name
            )));
        }
        if !spec.media_size.is_multiple_of(sector) {
            return Err(StackError::Invalid(alloc::format!(
                "size of '{}' is not a whole number of sectors",
                spec.name
            )));
        }
        self.providers.push(Some(Provider {
            spec,
            geom: g,
            access: Access::default(),
            orphaned: false,
            retired: false,
            in_flight: 0,
            stats: Arc::new(ProviderStats::default()),
        }));
        let id = ProviderId(self.providers.len() as u32 - 1);
        self.new_providers.push(id);
        Ok(id)
    }

    pub(crate) fn attach(&mut self, g: Option<GeomId>, provider: ProviderId) -> ConsumerId {
        self.consumers.push(Some(Consumer {
            geom: g,
            provider,
            access: Access::default(),
            in_flight: 0,
        }));
        ConsumerId(self.consumers.len() as u32 - 1)
    }

    pub(crate) fn detach(&mut self, c: ConsumerId) -> Result<(), StackError> {
        let con = self.consumer(c);
        if con.in_flight > 0 {
            let name = self.provider(con.provider).spec.name.clone();
            return Err(StackError::Busy(name));
        }
        let a = con.access;
        self.access(c, -a.r, -a.w, -a.e)?;
        self.consumers[c.0 as usize] = None;
        self.reap_pending = true;
        Ok(())
    }

    fn consumers_of(&self, g: GeomId) -> Vec<ConsumerId> {
        self.consumers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.geom == Some(g)))
            .map(|(i, _)| ConsumerId(i as u32))
            .collect()
    }

    /// FreeBSD's `g_access`: see [`Stack::access`].
    pub(crate) fn access(
        &mut self,
        c: ConsumerId,
        dr: i32,
        dw: i32,
        de: i32,
    ) -> Result<(), StackError> {
        let (pid, mine) = {
            let con = self.consumer(c);
            (con.provider, con.access)
        };
        let p = self.provider(pid);
        let new = Access {
            r: mine.r + dr,
            w: mine.w + dw,
            e: mine.e + de,
        };
        if new.r < 0 || new.w < 0 || new.e < 0 {
            return Err(StackError::BadAccess);
        }
        if p.orphaned && (dr > 0 || dw > 0 || de > 0) {
            return Err(StackError::Orphaned(p.spec.name.clone()));
        }
        let others = Access {
            r: p.access.r - mine.r,
            w: p.access.w - mine.w,
            e: p.access.e - mine.e,
        };
        let growing = dr > 0 || dw > 0 || de > 0;
        if growing && ((others.e > 0 && (new.w > 0 || new.e > 0)) || (new.e > 0 && others.w > 0)) {
            return Err(StackError::Busy(p.spec.name.clone()));
        }
        // Propagate down first, so a refusal below leaves nothing changed.
        // A withering geom's consumers are closed by the stack itself.
        let g = p.geom;
        let below: Vec<ConsumerId> = if self.geoms[g.0 as usize].state == GeomState::Live {
            self.consumers_of(g)
        } else {
            Vec::new()
        };
        let mut done: Vec<ConsumerId> = Vec::new();
        for &bc in &below {
            if let Err(e) = self.access(bc, dr, dw, de) {
                for &u in &done {
                    let _ = self.access(u, -dr, -dw, -de);
                }
                return Err(e);
            }
            done.push(bc);
        }
        let p = self.provider_mut(pid);
        p.access.r += dr;
        p.access.w += dw;
        p.access.e += de;
        if p.orphaned && p.access.is_zero() {
            self.reap_pending = true;
        }
        self.consumer_mut(c).access = new;
        Ok(())
    }

    pub(crate) fn orphan_provider(&mut self, p: ProviderId) {
        let prov = self.provider_mut(p);
        if prov.orphaned {
            return;
        }
        prov.orphaned = true;
        for (i, c) in self.consumers.iter().enumerate() {
            if let Some(c) = c {
                if c.provider == p && c.geom.is_some() {
                    self.events.push_back(Event::Orphan {
                        consumer: ConsumerId(i as u32),
                    });
                }
            }
        }
        self.reap_pending = true;
    }

    pub(crate) fn wither(&mut self, g: GeomId) {
        if self.geoms[g.0 as usize].state != GeomState::Live {
            return;
        }
        self.geoms[g.0 as usize].state = GeomState::Withering;
        let mine: Vec<ProviderId> = self
            .providers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_some_and(|p| p.geom == g))
            .map(|(i, _)| ProviderId(i as u32))
            .collect();
        for p in mine {
            self.orphan_provider(p);
        }
        self.reap_pending = true;
    }

    /// The central check every request passes before its geom sees it.
    fn check(&self, consumer: ConsumerId, bio: &Bio) -> Result<ProviderId, BioError> {
        let c = self.consumer(consumer);
        let p = self.provider(c.provider);
        if p.orphaned {
            return Err(BioError::Orphaned);
        }
        let needs_write = bio.cmd.is_write() || bio.cmd == BioCmd::Flush;
        if (needs_write && c.access.w <= 0) || (!needs_write && c.access.r <= 0) {
            return Err(BioError::Access);
        }
        if bio.cmd == BioCmd::Flush {
            return Ok(c.provider);
        }
        let sector = u64::from(p.spec.sector_size);
        if !bio.offset.is_multiple_of(sector) || !bio.length.is_multiple_of(sector) {
            return Err(BioError::Invalid);
        }
        if bio.cmd.has_data() && bio.sg.len_bytes() != bio.length {
            return Err(BioError::Invalid);
        }
        match bio.offset.checked_add(bio.length) {
            Some(end) if end <= p.spec.media_size => {}
            _ => return Err(BioError::OutOfRange),
        }
        let supported = match bio.cmd {
            BioCmd::Discard => p.spec.can_discard,
            BioCmd::WriteZeroes => p.spec.can_write_zeroes,
            _ => true,
        };
        if !supported {
            return Err(BioError::NotSupported);
        }
        Ok(c.provider)
    }
}

/// The whole block stack: every geom, provider and consumer, the queue of
/// bios moving between them, and the registered classes that taste.
pub struct Stack {
    pub(crate) geoms: Vec<Option<Box<dyn Geom>>>,
    pub(crate) core: Core,
    pub(crate) taste: crate::taste::TasteState,
}

impl Default for Stack {
    fn default() -> Self {
        Stack::new()
    }
}

impl Stack {
    /// An empty stack with no classes registered.
    pub fn new() -> Stack {
        Stack {
            geoms: Vec::new(),
            core: Core::new(),
            taste: crate::taste::TasteState::default(),
        }
    }

    /// Reseeds the generator behind label ids and [`Io::random_u64`];
    /// the platform calls it at boot with something that differs per boot.
    pub fn seed_random(&mut self, seed: u64) {
        self.core.rng = XorShiftRng::seed_from_u64(seed);
    }

    /// A number from the stack's seeded generator.
    pub fn random_u64(&mut self) -> u64 {
        self.core.rng.next_u64()
    }

    /// Sets the stack's clock (ns since any fixed point); the event loop
    /// calls it before [`Stack::run`]. Geoms with timers (nop delays) and
    /// latency figures use it.
    pub fn set_now_ns(&mut self, now_ns: u64) {
        self.core.now_ns = now_ns;
        self.core.clock_set = true;
    }

    /// The clock as last set.
    pub fn now_ns(&self) -> u64 {
        self.core.now_ns
    }

    /// The earliest timer any geom waits for: the event loop should wake
    /// by then even if no device interrupts.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.geoms
            .iter()
            .flatten()
            .filter_map(|g| g.next_deadline_ns())
            .min()
    }

    /// Reserves a geom id of class `class`; the geom itself is installed
    /// with [`Stack::install`] once its providers and consumers exist.
    pub fn reserve_geom(&mut self, class: &'static str, name: &str) -> GeomId {
        self.geoms.push(None);
        self.core.geoms.push(GeomInfo {
            name: String::from(name),
            class,
            state: GeomState::Live,
        });
        GeomId(self.geoms.len() as u32 - 1)
    }

    /// Installs the geom for a reserved id.
    pub fn install(&mut self, id: GeomId, geom: Box<dyn Geom>) {
        self.geoms[id.0 as usize] = Some(geom);
    }

    /// Undoes a reservation whose geom could not be built: detaches its
    /// consumers, removes its providers and marks it gone.
    pub fn abandon(&mut self, id: GeomId) {
        for c in self.core.consumers_of(id) {
            let _ = self.core.detach(c);
        }
        for slot in self.core.providers.iter_mut() {
            if slot.as_ref().is_some_and(|p| p.geom == id) {
                *slot = None;
            }
        }
        self.core
            .new_providers
            .retain(|p| self.core.providers[p.0 as usize].is_some());
        self.core.geoms[id.0 as usize].state = GeomState::Gone;
        self.geoms[id.0 as usize] = None;
    }

    /// Adds a provider offered by geom `g`; it is tasted on the next run.
    pub fn add_provider(
        &mut self,
        g: GeomId,
        spec: ProviderSpec,
    ) -> Result<ProviderId, StackError> {
        self.core.add_provider(g, spec)
    }

    /// Attaches geom `g` (or the external user, for `None`) to `provider`.
    pub fn attach(&mut self, g: Option<GeomId>, provider: ProviderId) -> ConsumerId {
        self.core.attach(g, provider)
    }

    /// Closes and detaches a consumer; refused while bios are in flight
    /// through it.
    pub fn detach(&mut self, c: ConsumerId) -> Result<(), StackError> {
        let r = self.core.detach(c);
        self.reap();
        r
    }

    /// Changes a consumer's access by the given deltas (FreeBSD's
    /// `g_access`). Exclusive access keeps every other writer out, and is
    /// refused while another consumer writes. A provider's geom sees the
    /// same deltas on all of its own consumers, so opening a stack opens
    /// every disk below it. Closing (negative deltas) always succeeds, also
    /// on orphaned providers.
    pub fn access(&mut self, c: ConsumerId, dr: i32, dw: i32, de: i32) -> Result<(), StackError> {
        let r = self.core.access(c, dr, dw, de);
        self.reap();
        r
    }

    /// Opens `name` for the external user (an export) with the given access.
    pub fn open(&mut self, name: &str, mode: Access) -> Result<ConsumerId, StackError> {
        let p = self
            .find_provider(name)
            .ok_or_else(|| StackError::NoSuchProvider(String::from(name)))?;
        let c = self.attach(None, p);
        if let Err(e) = self.access(c, mode.r, mode.w, mode.e) {
            self.core.consumers[c.0 as usize] = None;
            return Err(e);
        }
        Ok(c)
    }

    /// Closes an external user's consumer (an export going away).
    pub fn close(&mut self, c: ConsumerId) -> Result<(), StackError> {
        self.detach(c)
    }

    /// Looks a provider up by name: the live one, or else an orphaned one
    /// that is still listed.
    pub fn find_provider(&self, name: &str) -> Option<ProviderId> {
        self.core.find_provider(name)
    }

    /// A provider by id. Panics for a provider that was removed; ids held
    /// by an open consumer stay valid.
    pub fn provider(&self, p: ProviderId) -> &Provider {
        self.core.provider(p)
    }

    /// A provider by id, or `None` once it was removed.
    pub fn get_provider(&self, p: ProviderId) -> Option<&Provider> {
        self.core.providers.get(p.0 as usize)?.as_ref()
    }

    /// The provider a consumer is attached to.
    pub fn consumer_provider(&self, c: ConsumerId) -> ProviderId {
        self.core.consumer(c).provider
    }

    /// A consumer by id.
    pub fn consumer(&self, c: ConsumerId) -> &Consumer {
        self.core.consumer(c)
    }

    /// All listed providers with their ids, in creation order.
    pub fn providers(&self) -> impl Iterator<Item = (ProviderId, &Provider)> {
        self.core
            .providers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((ProviderId(i as u32), p.as_ref()?)))
    }

    /// All attached consumers with their ids.
    pub fn consumers(&self) -> impl Iterator<Item = (ConsumerId, &Consumer)> {
        self.core
            .consumers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((ConsumerId(i as u32), c.as_ref()?)))
    }

    /// Geoms that are not gone, or gone but with an orphaned provider
    /// still held open, with their ids, in creation order.
    pub fn geoms(&self) -> impl Iterator<Item = GeomId> + '_ {
        self.core
            .geoms
            .iter()
            .enumerate()
            .filter(|(i, g)| {
                g.state != GeomState::Gone
                    || self
                        .core
                        .providers
                        .iter()
                        .flatten()
                        .any(|p| p.geom.0 as usize == *i)
            })
            .map(|(i, _)| GeomId(i as u32))
    }

    /// The class name of a geom.
    pub fn geom_class(&self, g: GeomId) -> &'static str {
        self.core.geoms[g.0 as usize].class
    }

    /// The name a geom was reserved with.
    pub fn geom_name(&self, g: GeomId) -> &str {
        &self.core.geoms[g.0 as usize].name
    }

    /// Where a geom is in its life.
    pub fn geom_state(&self, g: GeomId) -> GeomState {
        self.core.geoms[g.0 as usize].state
    }

    /// The live geom of `class` called `name`.
    pub fn find_geom(&self, class: &str, name: &str) -> Option<GeomId> {
        self.core
            .geoms
            .iter()
            .position(|g| g.state == GeomState::Live && g.class == class && g.name == name)
            .map(|i| GeomId(i as u32))
    }

    /// The providers a geom offers.
    pub fn geom_providers(&self, g: GeomId) -> Vec<ProviderId> {
        self.providers()
            .filter(|(_, p)| p.geom == g)
            .map(|(id, _)| id)
            .collect()
    }

    /// The consumers a geom holds.
    pub fn geom_consumers(&self, g: GeomId) -> Vec<ConsumerId> {
        self.core.consumers_of(g)
    }

    /// The class-specific state of a geom (see [`Geom::dumpconf`]).
    pub fn dumpconf(&self, g: GeomId) -> serde_json::Value {
        match self.geoms[g.0 as usize].as_ref() {
            Some(geom) => geom.dumpconf(),
            None => serde_json::Value::Null,
        }
    }

    /// Runs `f` on geom `g` as its concrete type `T`, with the geom's
    /// [`Io`]; `None` if the geom is gone or not a `T` (or does not offer
    /// itself through [`Geom::as_any`]). Control code (nop configure,
    /// mirror insert) reaches its geoms this way.
    pub fn geom_as<T: 'static, R>(
        &mut self,
        g: GeomId,
        f: impl FnOnce(&mut T, &mut Io<'_>) -> R,
    ) -> Option<R> {
        let geom = self.geoms.get_mut(g.0 as usize)?.as_mut()?;
        let t = geom.as_any()?.downcast_mut::<T>()?;
        let mut io = Io {
            core: &mut self.core,
            geom: g,
        };
        let r = f(t, &mut io);
        Some(r)
    }

    /// Submits a bio from the external user through `consumer`; its
    /// completion comes back from [`Stack::take_completed`] with `cookie`.
    pub fn submit(&mut self, consumer: ConsumerId, mut bio: Bio, cookie: u64) {
        bio.frames.clear();
        self.core.push_start(consumer, bio, Owner::User, cookie);
    }

    /// Marks a provider dead: I/O to it fails with [`BioError::Orphaned`]
    /// from now on and each geom consuming it is told (on the next run).
    pub fn orphan(&mut self, p: ProviderId) {
        self.core.orphan_provider(p);
    }

    /// Destroys a geom (`<class> destroy [-f] NAME`). Refused with
    /// [`StackError::Busy`] while any of its providers is open, unless
    /// `force`: then its providers are orphaned under their consumers,
    /// whose I/O fails from then on. The geom goes away once no bio is in
    /// flight through it.
    pub fn destroy_geom(&mut self, g: GeomId, force: bool) -> Result<(), StackError> {
        if self.geom_state(g) != GeomState::Live {
            return Err(StackError::Invalid(alloc::format!(
                "geom '{}' is already being destroyed",
                self.geom_name(g)
            )));
        }
        if !force {
            if let Some((_, p)) = self
                .providers()
                .find(|(_, p)| p.geom == g && !p.access.is_zero())
            {
                return Err(StackError::Busy(p.spec.name.clone()));
            }
        }
        self.core.wither(g);
        self.reap();
        Ok(())
    }

    fn with_geom(&mut self, g: GeomId, f: impl FnOnce(&mut dyn Geom, &mut Io<'_>)) {
        let slot = &mut self.geoms[g.0 as usize];
        if let Some(geom) = slot.as_mut() {
            let mut io = Io {
                core: &mut self.core,
                geom: g,
            };
            f(geom.as_mut(), &mut io);
        }
    }

    /// Runs queued starts, completions and orphan events, tastes new
    /// providers, and polls geoms that wait on devices or timers, until
    /// nothing is left to do. Returns true if anything happened.
    pub fn run(&mut self) -> bool {
        let mut progress = false;
        loop {
            progress |= self.taste_new_providers();
            while let Some(ev) = self.core.events.pop_front() {
                progress = true;
                self.dispatch(ev);
            }
            let mut polled = false;
            for i in 0..self.geoms.len() {
                if self.geoms[i].as_ref().is_some_and(|g| g.wants_poll()) {
                    let g = GeomId(i as u32);
                    let mut hit = false;
                    self.with_geom(g, |geom, io| hit = geom.poll(io));
                    polled |= hit;
                }
            }
            progress |= self.reap();
            progress |= self.taste_settle();
            if !polled && self.core.events.is_empty() && self.core.new_providers.is_empty() {
                return progress;
            }
            progress = true;
        }
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Start { consumer, mut bio } => match self.core.check(consumer, &bio) {
                Err(e) => self.core.events.push_back(Event::Done {
                    bio,
                    result: Err(e),
                }),
                Ok(p) => {
                    let now = self.core.now_ns;
                    if let Some(f) = bio.frames.last_mut() {
                        f.start_ns = now;
                        f.started = true;
                    }
                    let prov = self.core.provider_mut(p);
                    prov.in_flight += 1;
                    prov.stats.count_start(&bio);
                    if bio.length == 0 && bio.cmd != BioCmd::Flush {
                        self.core.events.push_back(Event::Done {
                            bio,
                            result: Ok(()),
                        });
                        return;
                    }
                    let g = prov.geom;
                    self.with_geom(g, |geom, io| geom.start(io, p, bio));
                }
            },
            Event::Done {
                mut bio,
                mut result,
            } => {
                let Some(frame) = bio.frames.pop() else {
                    return;
                };
                if let Some(c) = self.core.consumers[frame.consumer.0 as usize].as_mut() {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                if let Some(prov) = self.core.providers[frame.provider.0 as usize].as_mut() {
                    // Bios refused by the check never counted as started.
                    if frame.started {
                        prov.in_flight = prov.in_flight.saturating_sub(1);
                    }
                    // A completion crossing a provider that died meanwhile
                    // reports the death, whatever happened below.
                    if prov.orphaned && result.is_ok() {
                        result = Err(BioError::Orphaned);
                    }
                    if result.is_err() {
                        prov.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.core.clock_set && frame.started {
                        let took = self.core.now_ns.saturating_sub(frame.start_ns);
                        let sum = match bio.cmd {
                            BioCmd::Read => Some(&prov.stats.read_ns),
                            BioCmd::Write => Some(&prov.stats.write_ns),
                            _ => None,
                        };
                        if let Some(s) = sum {
                            s.fetch_add(took, Ordering::Relaxed);
                        }
                    }
                }
                match frame.owner {
                    Owner::User => self.core.completed.push_back((frame.cookie, bio, result)),
                    Owner::Geom(g) => {
                        self.with_geom(g, |geom, io| geom.done(io, frame.cookie, bio, result))
                    }
                    Owner::Stack => self.stack_io_done(frame.cookie, bio, result),
                }
            }
            Event::Orphan { consumer } => {
                let Some(g) = self.core.consumers[consumer.0 as usize]
                    .as_ref()
                    .and_then(|c| c.geom)
                else {
                    return;
                };
                self.with_geom(g, |geom, io| geom.orphan(io, consumer));
            }
        }
    }

    /// Drops withering geoms that have nothing in flight, and removes
    /// orphaned providers nobody holds open. Returns true if anything went.
    fn reap(&mut self) -> bool {
        if !self.core.reap_pending {
            return false;
        }
        self.core.reap_pending = false;
        let mut any = false;
        for i in 0..self.core.geoms.len() {
            if self.core.geoms[i].state != GeomState::Withering {
                continue;
            }
            let g = GeomId(i as u32);
            let busy_p = self
                .core
                .providers
                .iter()
                .flatten()
                .any(|p| p.geom == g && p.in_flight > 0);
            let mine = self.core.consumers_of(g);
            let busy_c = mine.iter().any(|&c| self.core.consumer(c).in_flight > 0);
            if busy_p || busy_c {
                // Checked again when the last bio comes back.
                self.core.reap_pending = true;
                continue;
            }
            for c in mine {
                let _ = self.core.detach(c);
            }
            self.geoms[i] = None;
            self.core.geoms[i].state = GeomState::Gone;
            any = true;
        }
        for i in 0..self.core.providers.len() {
            let remove = self.core.providers[i].as_ref().is_some_and(|p| {
                p.orphaned
                    && p.access.is_zero()
                    && p.in_flight == 0
                    && (p.retired || self.core.geoms[p.geom.0 as usize].state == GeomState::Gone)
            });
            let held = self
                .core
                .consumers
                .iter()
                .flatten()
                .any(|c| c.provider.0 as usize == i);
            if remove && !held {
                self.core.providers[i] = None;
                any = true;
            }
        }
        any
    }

    /// Takes the next completed external request: its cookie, bio and
    /// result.
    pub fn take_completed(&mut self) -> Option<(u64, Bio, BioResult)> {
        self.core.completed.pop_front()
    }

    /// True while events are queued.
    pub fn has_queued(&self) -> bool {
        !self.core.events.is_empty()
    }

    /// Counters of metadata I/O (tasting and labelling).
    pub fn meta_counters(&self) -> &DataCounters {
        &self.core.meta_counters
    }
}
