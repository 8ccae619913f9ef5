//! Topology: providers, consumers and geoms, the [`Core`] tables that hold
//! them, and the [`Stack`] methods that add, attach, detach, find and list
//! them.

use super::access::{Access, GeomState};
use super::dispatch::{Event, Io};
use super::stats::ProviderStats;
use super::{Geom, Stack, StackError};
use crate::bio::{Bio, BioResult, ConsumerId, GeomId, ProviderId};
use crate::page::DataCounters;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use rand_core::SeedableRng;
use rand_xorshift::XorShiftRng;

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

/// What the stack keeps of each geom id, also once the geom is gone.
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
    /// How long a disk's bio may take (ns, 0: forever), see
    /// [`crate::disk`].
    pub(crate) bio_deadline_ns: u64,
    pub(crate) rng: XorShiftRng,
    /// Maps and copies of metadata I/O (tasting and labelling), kept apart
    /// from the providers' data-path figures.
    pub(crate) meta_counters: DataCounters,
    /// Providers added since the last taste round.
    pub(crate) new_providers: Vec<ProviderId>,
    pub(crate) reap_pending: bool,
    /// Failures geoms reported for the statements that made them (a
    /// wrong passphrase found once the header was read): how many since
    /// boot, and the latest few.
    pub(crate) statement_errors: (u64, VecDeque<String>),
}

impl Core {
    pub(super) fn new() -> Core {
        Core {
            providers: Vec::new(),
            consumers: Vec::new(),
            geoms: Vec::new(),
            events: VecDeque::new(),
            completed: VecDeque::new(),
            now_ns: 0,
            clock_set: false,
            bio_deadline_ns: crate::disk::DEFAULT_BIO_DEADLINE_MS * 1_000_000,
            rng: XorShiftRng::seed_from_u64(0x5354_5241_5441),
            meta_counters: DataCounters::new(),
            new_providers: Vec::new(),
            reap_pending: false,
            statement_errors: (0, VecDeque::new()),
        }
    }

    pub(crate) fn provider(&self, p: ProviderId) -> &Provider {
        self.providers[p.0 as usize]
            .as_ref()
            .expect("provider id refers to a listed provider")
    }

    pub(super) fn provider_mut(&mut self, p: ProviderId) -> &mut Provider {
        self.providers[p.0 as usize]
            .as_mut()
            .expect("provider id refers to a listed provider")
    }

    pub(crate) fn consumer(&self, c: ConsumerId) -> &Consumer {
        self.consumers[c.0 as usize]
            .as_ref()
            .expect("consumer id refers to a live consumer")
    }

    pub(super) fn consumer_mut(&mut self, c: ConsumerId) -> &mut Consumer {
        self.consumers[c.0 as usize]
            .as_mut()
            .expect("consumer id refers to a live consumer")
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

    pub(super) fn consumers_of(&self, g: GeomId) -> Vec<ConsumerId> {
        self.consumers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.geom == Some(g)))
            .map(|(i, _)| ConsumerId(i as u32))
            .collect()
    }
}

impl Stack {
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
}
