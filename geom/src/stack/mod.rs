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
//!
//! The code is split by concern, each file holding the [`Stack`] methods
//! of its part:
//!
//! - here: the [`Geom`] trait a class implements, [`StackError`], and
//!   [`Stack`] itself with its clock and generator;
//! - `topology`: providers, consumers and geoms (adding, attaching,
//!   detaching, finding, listing) and the [`Core`] tables;
//! - `access`: access counts and the exclusive rule, orphaning, withering
//!   and reaping;
//! - `dispatch`: the event queue, the central check, [`Stack::run`],
//!   completion frames, and [`Io`], the view of the stack a geom gets;
//! - `stats`: [`ProviderStats`], the per-provider counters and latency sums.

mod access;
mod dispatch;
mod stats;
mod topology;

pub use access::{Access, GeomState};
pub use dispatch::Io;
pub use stats::ProviderStats;
pub use topology::{Consumer, Core, Provider, ProviderSpec};

use crate::bio::{Bio, BioResult, ConsumerId, ProviderId};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::any::Any;
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

    /// The buffer caches the geom keeps (a raid5's stripe cache): name,
    /// statistics and block size, for `/metrics` and the memory budget.
    fn caches(&self) -> Vec<(String, bufcache::Stats, u64)> {
        Vec::new()
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

/// The whole block stack: every geom, provider and consumer, the queue of
/// bios moving between them, and the registered classes that taste.
pub struct Stack {
    pub(crate) geoms: Vec<Option<Box<dyn Geom>>>,
    pub(crate) core: Core,
    pub(crate) taste: crate::taste::TasteState,
    /// Bytes the classes may commit to data they hold in memory.
    data_memory: Option<u64>,
    /// Secrets, the key generator and the live clock.
    pub(crate) keys: crate::keys::Keys,
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
            data_memory: None,
            keys: crate::keys::Keys::default(),
        }
    }

    /// Sets how many bytes the classes may commit to data they hold in
    /// memory (md's pages, counted at their full size when created); the
    /// platform sizes it from its memory at boot. `None`: no limit is known.
    pub fn set_data_memory_limit(&mut self, bytes: Option<u64>) {
        self.data_memory = bytes;
    }

    /// The limit from [`Stack::set_data_memory_limit`].
    pub fn data_memory_limit(&self) -> Option<u64> {
        self.data_memory
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

    /// Sets how long a bio may stay at a disk's device before the disk
    /// gives up on it (milliseconds, 0: forever; default
    /// [`crate::disk::DEFAULT_BIO_DEADLINE_MS`]). Applies to bios that
    /// reach a disk from then on.
    pub fn set_bio_deadline_ms(&mut self, ms: u64) {
        self.core.bio_deadline_ns = ms.saturating_mul(1_000_000);
    }

    /// The deadline from [`Stack::set_bio_deadline_ms`], in ms.
    pub fn bio_deadline_ms(&self) -> u64 {
        self.core.bio_deadline_ns / 1_000_000
    }

    /// The clock as last set.
    pub fn now_ns(&self) -> u64 {
        self.core.now_ns
    }

    /// Every geom's buffer caches: name, statistics and block size.
    pub fn caches(&self) -> Vec<(String, bufcache::Stats, u64)> {
        self.geoms
            .iter()
            .flatten()
            .flat_map(|g| g.caches())
            .collect()
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
}
