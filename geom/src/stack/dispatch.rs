//! Moving bios and events: the event queue, the central check, the
//! dispatcher ([`Stack::run`]), completion frames, and [`Io`], the view of
//! the stack a geom gets while it runs.

use super::access::Access;
use super::stats::ProviderStats;
use super::topology::{Consumer, Core, Provider, ProviderSpec};
use super::{Geom, Stack, StackError};
use crate::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId, Frame, GeomId, Owner, ProviderId};
use crate::page::DataCounters;
use alloc::string::String;
use rand_core::Rng;

/// A queued event: a request to start, a completion on its way up, or
/// the notice that a consumer's provider died.
pub(crate) enum Event {
    Start { consumer: ConsumerId, bio: Bio },
    Done { bio: Bio, result: BioResult },
    Orphan { consumer: ConsumerId },
}

/// The view of the stack handed to a geom's `start`, `done`, `poll` and
/// `orphan`.
pub struct Io<'a> {
    pub(super) core: &'a mut Core,
    pub(super) geom: GeomId,
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

    /// How long a bio may stay at a disk's device, in ns (0: forever);
    /// see [`Stack::set_bio_deadline_ms`].
    pub fn bio_deadline_ns(&self) -> u64 {
        self.core.bio_deadline_ns
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

    /// Reports that the statement which made this geom failed once its I/O
    /// was done (the statement's caller hears `message`, see
    /// [`crate::ctl::Settling`]); the geom withers or stays as it decides.
    pub fn fail_statement(&mut self, message: String) {
        let (count, recent) = &mut self.core.statement_errors;
        *count += 1;
        recent.push_back(message);
        if recent.len() > 16 {
            recent.pop_front();
        }
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

impl Stack {
    /// Submits a bio from the external user through `consumer`; its
    /// completion comes back from [`Stack::take_completed`] with `cookie`.
    pub fn submit(&mut self, consumer: ConsumerId, mut bio: Bio, cookie: u64) {
        bio.frames.clear();
        self.core.push_start(consumer, bio, Owner::User, cookie);
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
                // Latency is known only with a clock, and only for bios
                // that passed the check.
                let took_ns = (self.core.clock_set && frame.started)
                    .then(|| self.core.now_ns.saturating_sub(frame.start_ns));
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
                    prov.stats.count_done(bio.cmd, result.is_err(), took_ns);
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

    /// Takes the next completed external request: its cookie, bio and
    /// result.
    pub fn take_completed(&mut self) -> Option<(u64, Bio, BioResult)> {
        self.core.completed.pop_front()
    }

    /// True while events are queued.
    pub fn has_queued(&self) -> bool {
        !self.core.events.is_empty()
    }
}
