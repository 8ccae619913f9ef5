//! The stack: geoms, providers and consumers, and the dispatcher that moves
//! bios between them.
//!
//! ```text
//!   external user ──open──▶ consumer ──▶ provider (of geom A)
//!                                           │ start
//!                                        geom A ──request──▶ consumer ──▶ provider (of geom B)
//!                                           ▲ done                            │ start
//!                                           └──────────── deliver ◀──── geom B ─▶ device
//! ```
//!
//! Every request passes one central check ([`Stack::run`] → `check`)
//! before a geom sees it: the consumer's access, the provider's state,
//! sector alignment and bounds; zero-length requests complete at once.
//! Requests and completions are queued events: `start` and `done` never
//! run inside one another, so a geom's `start` never sees its own
//! completion synchronously (the split-phase rule).

use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId, Frame, GeomId, ProviderId};
use crate::page::DataCounters;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

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

    /// Makes progress on work outside the stack (device completions).
    /// Returns true if anything happened.
    fn poll(&mut self, io: &mut Io<'_>) -> bool {
        let _ = io;
        false
    }

    /// True for geoms whose [`Geom::poll`] must be called by the event loop.
    fn wants_poll(&self) -> bool {
        false
    }

    /// Tells the geom that the provider below `consumer` has gone away.
    fn orphan(&mut self, io: &mut Io<'_>, consumer: ConsumerId) {
        let _ = (io, consumer);
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

/// A consumer: an attachment of a geom (or the external user) to a provider.
#[derive(Debug)]
pub struct Consumer {
    /// The geom that consumes, or `None` for the stack's external user.
    pub geom: Option<GeomId>,
    /// The provider consumed.
    pub provider: ProviderId,
    /// This consumer's share of the provider's access counts.
    pub access: Access,
}

/// Why an access change or topology operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StackError {
    /// No provider by that name or id.
    NoSuchProvider(String),
    /// A provider with that name exists already.
    NameInUse(String),
    /// Another consumer holds the provider exclusively, or writers exist
    /// and exclusive access was asked for (EBUSY).
    Busy(String),
    /// The provider has been orphaned.
    Orphaned(String),
    /// An access count would go negative.
    BadAccess,
}

impl core::fmt::Display for StackError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StackError::NoSuchProvider(n) => write!(f, "no provider named '{n}'"),
            StackError::NameInUse(n) => write!(f, "a provider named '{n}' exists already"),
            StackError::Busy(n) => write!(f, "provider '{n}' is busy (opened exclusively)"),
            StackError::Orphaned(n) => write!(f, "provider '{n}' is gone"),
            StackError::BadAccess => write!(f, "access count would go negative"),
        }
    }
}

enum Event {
    Start { consumer: ConsumerId, bio: Bio },
    Done { bio: Bio, result: BioResult },
}

/// The part of the stack a geom may use while it runs.
pub struct Core {
    providers: Vec<Provider>,
    consumers: Vec<Option<Consumer>>,
    events: VecDeque<Event>,
    completed: VecDeque<(u64, Bio, BioResult)>,
}

/// The view of the stack handed to a geom's `start`, `done` and `poll`.
pub struct Io<'a> {
    core: &'a mut Core,
    geom: GeomId,
}

impl Io<'_> {
    /// Sends `bio` down through `consumer`; `done` will receive it back with
    /// `cookie`.
    pub fn request(&mut self, consumer: ConsumerId, mut bio: Bio, cookie: u64) {
        let provider = self.core.consumer(consumer).provider;
        bio.frames.push(Frame {
            geom: Some(self.geom),
            provider,
            cookie,
        });
        self.core.events.push_back(Event::Start { consumer, bio });
    }

    /// Completes a bio that was started on one of this geom's providers.
    pub fn deliver(&mut self, bio: Bio, result: BioResult) {
        self.core.events.push_back(Event::Done { bio, result });
    }

    /// The counters of a provider (a geom counts its maps and copies here).
    pub fn stats(&self, provider: ProviderId) -> &ProviderStats {
        &self.core.providers[provider.0 as usize].stats
    }

    /// A provider's declared properties.
    pub fn provider(&self, provider: ProviderId) -> &Provider {
        &self.core.providers[provider.0 as usize]
    }

    /// The geom this view belongs to.
    pub fn geom(&self) -> GeomId {
        self.geom
    }
}

impl Core {
    fn consumer(&self, c: ConsumerId) -> &Consumer {
        self.consumers[c.0 as usize]
            .as_ref()
            .expect("consumer id refers to a live consumer")
    }

    /// The central check every request passes before its geom sees it.
    fn check(&self, consumer: ConsumerId, bio: &Bio) -> Result<ProviderId, BioError> {
        let c = self.consumer(consumer);
        let p = &self.providers[c.provider.0 as usize];
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

/// The whole block stack: every geom, provider and consumer, and the queue
/// of bios moving between them.
pub struct Stack {
    geoms: Vec<Option<Box<dyn Geom>>>,
    geom_names: Vec<String>,
    core: Core,
}

impl Default for Stack {
    fn default() -> Self {
        Stack::new()
    }
}

impl Stack {
    /// An empty stack.
    pub fn new() -> Stack {
        Stack {
            geoms: Vec::new(),
            geom_names: Vec::new(),
            core: Core {
                providers: Vec::new(),
                consumers: Vec::new(),
                events: VecDeque::new(),
                completed: VecDeque::new(),
            },
        }
    }

    /// Reserves a geom id; the geom itself is installed with
    /// [`Stack::install`] once its providers and consumers exist.
    pub fn reserve_geom(&mut self, name: &str) -> GeomId {
        self.geoms.push(None);
        self.geom_names.push(String::from(name));
        GeomId(self.geoms.len() as u32 - 1)
    }

    /// Installs the geom for a reserved id.
    pub fn install(&mut self, id: GeomId, geom: Box<dyn Geom>) {
        self.geoms[id.0 as usize] = Some(geom);
    }

    /// Adds a provider offered by geom `g`.
    pub fn add_provider(
        &mut self,
        g: GeomId,
        spec: ProviderSpec,
    ) -> Result<ProviderId, StackError> {
        if self.find_provider(&spec.name).is_some() {
            return Err(StackError::NameInUse(spec.name));
        }
        self.core.providers.push(Provider {
            spec,
            geom: g,
            access: Access::default(),
            orphaned: false,
            stats: Arc::new(ProviderStats::default()),
        });
        Ok(ProviderId(self.core.providers.len() as u32 - 1))
    }

    /// Attaches geom `g` (or the external user, for `None`) to `provider`.
    pub fn attach(&mut self, g: Option<GeomId>, provider: ProviderId) -> ConsumerId {
        self.core.consumers.push(Some(Consumer {
            geom: g,
            provider,
            access: Access::default(),
        }));
        ConsumerId(self.core.consumers.len() as u32 - 1)
    }

    /// Changes a consumer's access by the given deltas (FreeBSD's
    /// `g_access`). Exclusive access keeps every other writer out, and is
    /// refused while another consumer writes. A provider's geom sees the
    /// same deltas on all of its own consumers, so opening a stack opens
    /// every disk below it.
    pub fn access(&mut self, c: ConsumerId, dr: i32, dw: i32, de: i32) -> Result<(), StackError> {
        let (pid, mine) = {
            let con = self.core.consumer(c);
            (con.provider, con.access)
        };
        let p = &self.core.providers[pid.0 as usize];
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
        if (others.e > 0 && (new.w > 0 || new.e > 0)) || (new.e > 0 && others.w > 0) {
            return Err(StackError::Busy(p.spec.name.clone()));
        }
        // Propagate down first, so a refusal below leaves nothing changed.
        let below: Vec<ConsumerId> = self.consumers_of(p.geom);
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
        let p = &mut self.core.providers[pid.0 as usize];
        p.access.r += dr;
        p.access.w += dw;
        p.access.e += de;
        if let Some(con) = self.core.consumers[c.0 as usize].as_mut() {
            con.access = new;
        }
        Ok(())
    }

    fn consumers_of(&self, g: GeomId) -> Vec<ConsumerId> {
        self.core
            .consumers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.geom == Some(g)))
            .map(|(i, _)| ConsumerId(i as u32))
            .collect()
    }

    /// Opens `name` for the external user (an export) with the given access.
    pub fn open(
        &mut self,
        name: &str,
        read: bool,
        write: bool,
        exclusive: bool,
    ) -> Result<ConsumerId, StackError> {
        let p = self
            .find_provider(name)
            .ok_or_else(|| StackError::NoSuchProvider(String::from(name)))?;
        let c = self.attach(None, p);
        if let Err(e) = self.access(c, i32::from(read), i32::from(write), i32::from(exclusive)) {
            self.core.consumers[c.0 as usize] = None;
            return Err(e);
        }
        Ok(c)
    }

    /// Looks a provider up by name.
    pub fn find_provider(&self, name: &str) -> Option<ProviderId> {
        self.core
            .providers
            .iter()
            .position(|p| p.spec.name == name)
            .map(|i| ProviderId(i as u32))
    }

    /// A provider by id.
    pub fn provider(&self, p: ProviderId) -> &Provider {
        &self.core.providers[p.0 as usize]
    }

    /// The provider a consumer is attached to.
    pub fn consumer_provider(&self, c: ConsumerId) -> ProviderId {
        self.core.consumer(c).provider
    }

    /// All providers with their ids, in creation order.
    pub fn providers(&self) -> impl Iterator<Item = (ProviderId, &Provider)> {
        self.core
            .providers
            .iter()
            .enumerate()
            .map(|(i, p)| (ProviderId(i as u32), p))
    }

    /// The class name of a geom.
    pub fn geom_class(&self, g: GeomId) -> &'static str {
        self.geoms[g.0 as usize]
            .as_ref()
            .map_or("?", |g| g.class_name())
    }

    /// The name a geom was reserved with.
    pub fn geom_name(&self, g: GeomId) -> &str {
        &self.geom_names[g.0 as usize]
    }

    /// Submits a bio from the external user through `consumer`; its
    /// completion comes back from [`Stack::take_completed`] with `tag`.
    pub fn submit(&mut self, consumer: ConsumerId, mut bio: Bio, tag: u64) {
        let provider = self.core.consumer(consumer).provider;
        bio.frames.clear();
        bio.frames.push(Frame {
            geom: None,
            provider,
            cookie: tag,
        });
        self.core.events.push_back(Event::Start { consumer, bio });
    }

    /// Marks a provider dead: I/O to it fails with [`BioError::Orphaned`]
    /// from now on and each geom consuming it is told.
    pub fn orphan(&mut self, p: ProviderId) {
        self.core.providers[p.0 as usize].orphaned = true;
        let users: Vec<(ConsumerId, GeomId)> = self
            .core
            .consumers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                (c.provider == p).then_some((ConsumerId(i as u32), c.geom?))
            })
            .collect();
        for (c, g) in users {
            self.with_geom(g, |geom, io| geom.orphan(io, c));
        }
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

    /// Runs queued starts and completions, and polls geoms that wait on
    /// devices, until nothing is left to do. Returns true if anything
    /// happened.
    pub fn run(&mut self) -> bool {
        let mut progress = false;
        loop {
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
            if !polled && self.core.events.is_empty() {
                return progress;
            }
            progress = true;
        }
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Start { consumer, bio } => match self.core.check(consumer, &bio) {
                Err(e) => self.core.events.push_back(Event::Done {
                    bio,
                    result: Err(e),
                }),
                Ok(p) => {
                    let stats = &self.core.providers[p.0 as usize].stats;
                    stats.count_start(&bio);
                    if bio.length == 0 && bio.cmd != BioCmd::Flush {
                        self.core.events.push_back(Event::Done {
                            bio,
                            result: Ok(()),
                        });
                        return;
                    }
                    let g = self.core.providers[p.0 as usize].geom;
                    self.with_geom(g, |geom, io| geom.start(io, p, bio));
                }
            },
            Event::Done { mut bio, result } => {
                let frame = bio.frames.pop().expect("a completed bio has a frame");
                if result.is_err() {
                    let stats = &self.core.providers[frame.provider.0 as usize].stats;
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                match frame.geom {
                    None => self.core.completed.push_back((frame.cookie, bio, result)),
                    Some(g) => {
                        self.with_geom(g, |geom, io| geom.done(io, frame.cookie, bio, result))
                    }
                }
            }
        }
    }

    /// Takes the next completed external request: its tag, bio and result.
    pub fn take_completed(&mut self) -> Option<(u64, Bio, BioResult)> {
        self.core.completed.pop_front()
    }

    /// True while bios are queued or in flight anywhere.
    pub fn has_queued(&self) -> bool {
        !self.core.events.is_empty()
    }
}
