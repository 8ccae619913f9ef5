//! The appliance's service core, shared by both platforms: config → stack
//! → exports, the connections' sessions, and the routing of work between
//! them.
//!
//! ```text
//!  platform (smoltcp or std sockets)
//!     │ Link::receive / Link::send over the platform's Transport (link)
//!     ▼
//!  Service ── Session (one per connection, any protocol) ──Work::Io──▶ Stack
//!     │          ▲                                                       │
//!     │          └──────────── complete(cookie, bio, result) ◀───────────┘
//!     └── Work::Control ─▶ api (/status, /metrics, /geom, /shutdown)
//!                              └─▶ control: config lines run as jobs
//! ```
//!
//! The service knows sessions, not protocols: each protocol is an entry
//! of [`protocols::PROTOCOLS`] with its engine and limits, and exports
//! are a provider, a protocol and options ([`exports`]). The platform owns
//! sockets and devices; the service owns everything else and never blocks:
//! config lines (at boot and from `POST /geom`) run as jobs of the loop
//! (`control`), so labelling a mirror does not stall other clients.

#![forbid(unsafe_code)]

mod api;
pub mod auth;
pub mod budget;
mod control;
pub mod exports;
pub mod link;
mod metrics;
pub mod protocols;
pub mod state;
mod status;
#[cfg(test)]
mod tests;

pub use control::{locate_error, LiveError};
pub use link::{Link, Recv, Sent, Transport};
pub use protocols::{Protocol, PROTOCOLS};

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use exports::Exports;
use geom::bio::{Bio, BioResult};
use geom::config::{Config, ConfigError, Statement};
use geom::disk::{vtbd_name, BlockDevice, DiskGeom};
use geom::page::DataCounters;
use geom::stack::Stack;
use net::session::{ExportInfo, Session, Work};

/// The version reported by `/status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Size of the memory disk served when there is neither a config nor a disk.
pub const DEFAULT_MD_BYTES: u64 = 256 << 20;

/// Largest NBD request payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The global payload budget where the platform does not size one
/// ([`Limits::default`]).
pub const DEFAULT_PAYLOAD_BUDGET: u64 = 1 << 30;

/// How the service uses memory, and how long its connections may dawdle.
/// The platform sets it at boot ([`Service::set_limits`]), before the
/// config runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most payload bytes every session of every protocol holds in pages
    /// together (the global budget, [`budget`]).
    pub payload_budget_bytes: u64,
    /// Most bytes memory disks may commit, counted at their full size
    /// (`None`: no limit known).
    pub md_memory_bytes: Option<u64>,
    /// A management request must arrive within this many milliseconds,
    /// and a response may wait this long for its client (0: never).
    pub http_timeout_ms: u64,
    /// An NBD client that holds payload pages and moves no byte for this
    /// many milliseconds is dropped (0: never).
    pub nbd_stall_timeout_ms: u64,
    /// A disk whose device keeps a bio longer than this many milliseconds
    /// is given up on: the bio and every other outstanding one fail with
    /// EIO and the disk is orphaned (0: never; see [`geom::disk`]).
    pub bio_deadline_ms: u64,
    /// The address iSCSI initiators reach the target at, as SendTargets
    /// gives it (`None`: discovery names targets without an address).
    pub iscsi_portal: Option<([u8; 4], u16)>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            payload_budget_bytes: DEFAULT_PAYLOAD_BUDGET,
            md_memory_bytes: None,
            http_timeout_ms: net::http::REQUEST_TIMEOUT_MS,
            nbd_stall_timeout_ms: net::nbd::STALL_TIMEOUT_MS,
            bio_deadline_ms: geom::disk::DEFAULT_BIO_DEADLINE_MS,
            iscsi_portal: None,
        }
    }
}

impl Limits {
    /// Limits for a platform whose heap has `memory_bytes` to give: a
    /// quarter for payload pages in flight, and what is left after that
    /// and the headroom for everything else (socket buffers take up to an
    /// eighth, the stack, sessions and the network stack another
    /// sixteenth) for memory disks: 9/16 of it.
    pub fn for_memory(memory_bytes: u64) -> Limits {
        let budget = memory_bytes / 4;
        let headroom = memory_bytes / 8 + memory_bytes / 16;
        Limits {
            payload_budget_bytes: budget.max(1 << 20),
            md_memory_bytes: Some(memory_bytes.saturating_sub(budget + headroom)),
            ..Limits::default()
        }
    }
}

impl Limits {
    /// Sets the limit named `key` from its text `value`, as the kernel
    /// command line gives it (`strata.KEY=VALUE`): `payload_budget` and
    /// `md_memory` take a size (`512`, `64m`, `1g`), `http_timeout_ms`,
    /// `nbd_stall_timeout_ms` and `bio_deadline_ms` milliseconds,
    /// `iscsi_portal` an `IPv4:PORT`. `Ok(false)` for a key that is not a
    /// limit.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let ms = || {
            value
                .parse::<u64>()
                .map_err(|_| alloc::format!("{key}={value}: not a number of milliseconds"))
        };
        let size = || geom::config::parse_size(value).map_err(|e| alloc::format!("{key}: {e}"));
        match key {
            "payload_budget" => self.payload_budget_bytes = size()?.max(1),
            "md_memory" => self.md_memory_bytes = Some(size()?),
            "http_timeout_ms" => self.http_timeout_ms = ms()?,
            "nbd_stall_timeout_ms" => self.nbd_stall_timeout_ms = ms()?,
            "bio_deadline_ms" => self.bio_deadline_ms = ms()?,
            "iscsi_portal" => self.iscsi_portal = Some(parse_portal(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// `IPv4:PORT`, as `strata.iscsi_portal=` gives it.
fn parse_portal(v: &str) -> Result<([u8; 4], u16), String> {
    let bad = || alloc::format!("iscsi_portal={v}: expected IPv4:PORT");
    let (ip, port) = v.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut a = [0u8; 4];
    let mut parts = ip.split('.');
    for b in &mut a {
        *b = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((a, port))
}

/// Per protocol: what happened to its connections, for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
struct ConnCounters {
    accepted: u64,
    refused: u64,
    timed_out: u64,
}

/// After a clean stop's flushes, how long replies (the answer to
/// `POST /shutdown`) may take to leave before the platform stops anyway.
pub const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// Cookie space: the upper 32 bits of a bio's cookie name the connection;
/// 0 is the service itself (shutdown flushes, and with
/// [`exports::STORE_COOKIE`] set, the state stores' bios).
pub(crate) const SERVICE_CONN: u64 = 0;

/// A connection, as the service numbers them.
pub type ConnId = u32;

/// Facts only the platform knows, for `/status`.
#[derive(Clone, Debug, Default)]
pub struct PlatformStatus {
    /// `"unikernel"` or `"hosted"`.
    pub platform: &'static str,
    /// Milliseconds since boot (or since the hosted process started).
    pub uptime_ms: u64,
    /// Memory the platform manages, in bytes.
    pub memory_total_bytes: u64,
    /// Memory in use, in bytes.
    pub memory_used_bytes: u64,
}

/// Where the service is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Running the config's lines; nothing is served yet.
    Booting,
    /// The config was refused: the platform reports it and stops.
    Failed(ConfigError),
    /// Serving.
    Serving,
}

/// How long a clean stop waits for the requests it has received to be
/// answered before it flushes anyway (a client that stopped sending a
/// write's payload must not hold the stop).
pub const DRAIN_LIMIT_MS: u64 = 10_000;

/// A clean stop in progress.
struct Shutdown {
    /// When it was asked for.
    asked_ms: u64,
    /// The exports flushed, by cookie (empty until the drain is over).
    flushing: Vec<String>,
    /// The drain is over and the flushes were sent.
    flush_sent: bool,
    /// Flushes not yet back.
    flushes_left: usize,
    /// Flushes that failed: the export and why.
    failed: Vec<String>,
    /// When the flushes were all back (for the replies' grace time).
    flushed_at_ms: Option<u64>,
}

struct SessionSlot {
    protocol: usize,
    session: Box<dyn Session>,
}

/// Everything above the platform.
pub struct Service {
    stack: Stack,
    exports: Exports,
    disks: Vec<(String, u64)>,
    sessions: BTreeMap<ConnId, SessionSlot>,
    next_id: ConnId,
    /// Copies made by closed sessions, per protocol, so the figure
    /// survives them.
    closed_counters: Vec<DataCounters>,
    control: control::Control,
    phase: Phase,
    shutdown: Option<Shutdown>,
    platform: Box<dyn Fn() -> PlatformStatus>,
    now_ms: u64,
    /// Connection ids, kept to save an allocation per poll.
    ids: Vec<ConnId>,
    limits: Limits,
    budget: budget::Budget,
    conn_counters: Vec<ConnCounters>,
    /// Who may change the appliance.
    auth: auth::Auth,
}

/// Parses a configuration as the appliance will run it: geom(8)-style
/// lines, and `export` lines whose protocol and options are checked here.
/// The host tool checks a config with this before it boots anything.
pub fn parse_config(text: &str) -> Result<Config, ConfigError> {
    let config = geom::config::parse(text)?;
    protocols::check_exports(config.exports())?;
    Ok(config)
}

/// Claims, before the first taste, every provider the boot config uses as
/// it is: each export's provider and each provider a line consumes without
/// metadata of its own (`nop create`). Tasting builds nothing over a
/// claimed provider, so a label or partition table a client writes into a
/// raw export cannot take it (or the boot) away; the refusal is in
/// `/status` under `taste`.
fn claim_config(stack: &mut Stack, config: &Config) {
    for l in &config.lines {
        match &l.stmt {
            Statement::Export(e) => {
                stack.claim(
                    &e.provider,
                    &alloc::format!("exported as '{}' by config line {}", e.name, l.line),
                );
                if let Some(p) = protocols::check_export(l.line, e)
                    .ok()
                    .and_then(|(_, o)| o.state)
                {
                    stack.claim(
                        &p,
                        &alloc::format!(
                            "keeps the state of '{}' by config line {}",
                            e.name,
                            l.line
                        ),
                    );
                }
            }
            Statement::Geom(g) => {
                for p in g.command.consumes() {
                    stack.claim(
                        &p,
                        &alloc::format!("used by {} on config line {}", g.class, l.line),
                    );
                }
            }
            Statement::Net(_) => {}
        }
    }
}

impl Service {
    /// Builds the service over the platform's disks (named vtbd0, vtbd1, …
    /// in the order given) and runs the config to the end before
    /// returning, polling the stack itself (for tests and tools; the
    /// platforms use [`Service::boot`] and keep their loop running).
    pub fn new(config: &Config, disks: Vec<Box<dyn BlockDevice>>) -> Result<Service, ConfigError> {
        let mut svc = Service::boot(config, disks, 0)?;
        for _ in 0..geom::ctl::SETTLE_ROUNDS {
            match svc.phase() {
                Phase::Serving => return Ok(svc),
                Phase::Failed(e) => return Err(e.clone()),
                Phase::Booting => {
                    svc.poll();
                }
            }
        }
        Err(ConfigError {
            line: 0,
            column: 1,
            message: String::from("the config did not finish (a device is not answering)"),
        })
    }

    /// Builds the service and starts running the config: labelled geoms
    /// assemble from the disks' metadata (tasting) first, then each line
    /// is carried out in order as its metadata I/O completes, on the
    /// platform's loop ([`Service::poll`]). With no export in the config,
    /// every disk is exported under its own name, or a 256 MiB md0 when
    /// there is no disk. `seed` seeds the stack's random numbers (the ids
    /// of labelled geoms): platforms pass something that differs from
    /// boot to boot.
    pub fn boot(
        config: &Config,
        disks: Vec<Box<dyn BlockDevice>>,
        seed: u64,
    ) -> Result<Service, ConfigError> {
        let mut stack = Stack::new();
        stack.seed_random(seed);
        let mut disk_list = Vec::new();
        for (i, dev) in disks.into_iter().enumerate() {
            let name = vtbd_name(i);
            let size = dev.info().size_bytes;
            DiskGeom::create(&mut stack, &name, dev).map_err(|e| ConfigError {
                line: 0,
                column: 1,
                message: alloc::format!("{e}"),
            })?;
            disk_list.push((name, size));
        }
        protocols::check_exports(config.exports())?;
        claim_config(&mut stack, config);
        let mut svc = Service {
            stack,
            exports: Exports::new(),
            disks: disk_list,
            sessions: BTreeMap::new(),
            next_id: 1,
            closed_counters: PROTOCOLS.iter().map(|_| DataCounters::new()).collect(),
            control: control::Control::default(),
            phase: Phase::Booting,
            shutdown: None,
            platform: Box::new(PlatformStatus::default),
            now_ms: 0,
            ids: Vec::new(),
            limits: Limits::default(),
            budget: budget::Budget::new(Limits::default().payload_budget_bytes),
            conn_counters: PROTOCOLS.iter().map(|_| ConnCounters::default()).collect(),
            auth: auth::Auth::default(),
        };
        svc.control.boot(config.clone());
        Ok(svc)
    }

    /// Where the service is: booting, failed (with the line at fault), or
    /// serving.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Sets how the service uses memory and times its connections; the
    /// platform calls it right after [`Service::boot`], before the config
    /// runs (memory disks are checked against it), and before any
    /// connection opens.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.budget.set_limit(limits.payload_budget_bytes);
        self.stack.set_data_memory_limit(limits.md_memory_bytes);
        self.stack.set_bio_deadline_ms(limits.bio_deadline_ms);
    }

    /// Sets the management token every change must present (none: every
    /// change is refused). The platform calls it before serving.
    pub fn set_token(&mut self, token: Option<String>) {
        self.auth = auth::Auth::new(token);
        if !self.auth.configured() {
            log::warn!(
                "management: no token given, changes through the management port are refused"
            );
        }
    }

    /// Makes secret `name` known to the config's `-k NAME` (the platform
    /// calls it before serving, with what the host handed over).
    pub fn set_secret(&mut self, name: &str, bytes: &[u8]) {
        self.stack.set_secret(name, bytes);
    }

    /// Mixes entropy from a platform source into the key generator.
    pub fn add_entropy(&mut self, bytes: &[u8]) {
        self.stack.add_entropy(bytes);
    }

    /// Gives the stack a clock that runs while a statement is carried out
    /// (for timing key stretching).
    pub fn set_live_clock(&mut self, clock: fn() -> u64) {
        self.stack.set_live_clock(clock);
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Payload bytes held by every session together.
    pub fn payload_in_use(&self) -> u64 {
        self.sessions
            .values()
            .map(|s| s.session.budget_held())
            .sum()
    }

    /// The global payload budget.
    pub fn budget(&self) -> &budget::Budget {
        &self.budget
    }

    /// Tells the service how to learn the platform's facts for `/status`.
    pub fn set_platform(&mut self, f: Box<dyn Fn() -> PlatformStatus>) {
        self.platform = f;
    }

    /// Every export, in config order.
    pub fn exports(&self) -> &[exports::Export] {
        self.exports.all()
    }

    /// The exports protocol `p` serves, as its sessions see them.
    pub fn protocol_exports(&self, p: usize) -> &[ExportInfo] {
        self.exports.view(p)
    }

    /// The stack, for inspection.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// Open connections of protocol `p`.
    pub fn connections(&self, p: usize) -> usize {
        self.sessions.values().filter(|s| s.protocol == p).count()
    }

    /// A new connection of protocol `p` (an index in [`PROTOCOLS`]), or
    /// `None` when the protocol's connection limit is reached or the
    /// service is not serving: the platform then closes the socket at
    /// once, before any byte is sent.
    pub fn open(&mut self, p: usize) -> Option<ConnId> {
        let proto = PROTOCOLS.get(p)?;
        if self.phase != Phase::Serving
            || self.shutdown.is_some()
            || self.connections(p) >= proto.max_connections
        {
            self.conn_counters[p].refused += 1;
            return None;
        }
        self.conn_counters[p].accepted += 1;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut seed = [0u8; 32];
        let seed = self.stack.random_bytes(&mut seed).ok().map(|()| seed);
        let mut session = (proto.new_session)(&self.limits, seed);
        session.tick(self.now_ms);
        self.sessions.insert(
            id,
            SessionSlot {
                protocol: p,
                session,
            },
        );
        Some(id)
    }

    /// Forgets connection `id` (its socket is closed). Bios it still has
    /// in flight complete into the void.
    pub fn close(&mut self, id: ConnId) {
        if let Some(s) = self.sessions.remove(&id) {
            self.closed_counters[s.protocol].add(s.session.counters());
            if s.session.timed_out() {
                self.conn_counters[s.protocol].timed_out += 1;
            }
        }
        self.budget.forget(id);
    }

    fn session(&self, id: ConnId) -> Option<&dyn Session> {
        self.sessions.get(&id).map(|s| s.session.as_ref())
    }

    fn session_mut(&mut self, id: ConnId) -> Option<&mut (dyn Session + 'static)> {
        self.sessions.get_mut(&id).map(|s| s.session.as_mut())
    }

    /// Feeds received bytes to connection `id`; returns bytes consumed.
    /// A request that stops the session for budget is admitted at once
    /// when it may be, and feeding goes on.
    fn feed(&mut self, id: ConnId, data: &[u8]) -> usize {
        let mut used = 0;
        loop {
            let Some(s) = self.sessions.get_mut(&id) else {
                return data.len();
            };
            used += s.session.recv(self.exports.view(s.protocol), &data[used..]);
            // A request left waiting is admitted, or queued, now.
            if !self.admit(id) || used == data.len() {
                return used;
            }
        }
    }

    /// Admits connection `id`'s waiting request into the payload budget
    /// if the budget's rules allow it now; true if it was admitted and its
    /// pages allocated. When it does not fit, every session gives back its
    /// spare pages (they count as held) and it is asked once more.
    fn admit(&mut self, id: ConnId) -> bool {
        for attempt in 0..2 {
            let Some(wanted) = self.session(id).and_then(|s| s.budget_wanted()) else {
                self.budget.forget(id);
                return false;
            };
            let in_use = self.payload_in_use();
            if self.budget.admit(id, wanted, in_use, self.now_ms) {
                if self.session_mut(id).is_some_and(|s| s.budget_grant()) {
                    return true;
                }
                // The heap is exhausted: wait for memory to come back.
                self.budget.no_memory(id, in_use, self.now_ms);
                self.trim_sessions();
                return false;
            }
            if attempt == 0 && self.trim_sessions() {
                continue;
            }
            return false;
        }
        false
    }

    /// Every session drops its spare pages; true if that gave any back.
    fn trim_sessions(&mut self) -> bool {
        let before = self.payload_in_use();
        for s in self.sessions.values_mut() {
            s.session.budget_trim();
        }
        self.payload_in_use() < before
    }

    /// Admits waiting requests in the budget's order, as far as they fit;
    /// true if any was.
    fn admit_waiting(&mut self) -> bool {
        let mut any = false;
        while let Some(head) = self.budget.head() {
            if self.session(head).and_then(|s| s.budget_wanted()).is_none() {
                self.budget.forget(head);
                continue;
            }
            if !self.admit(head) {
                break;
            }
            any = true;
        }
        any
    }

    /// Tells every session the time (milliseconds, monotonic) for their
    /// timeouts; the platform calls it every few hundred ms at least.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        for s in self.sessions.values_mut() {
            s.session.tick(now_ms);
        }
    }

    /// Sets the stack's clock (nanoseconds since boot); the platform calls
    /// it on every turn of its loop, before [`Service::poll`].
    pub fn set_now_ns(&mut self, now_ns: u64) {
        self.stack.set_now_ns(now_ns);
    }

    /// The earliest time (on the clock given to [`Service::set_now_ns`]) at
    /// which the stack wants to be polled again even if no device or socket
    /// wakes the loop (a delayed request in a nop, a resync step).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.stack.next_deadline_ns()
    }

    /// Moves work from sessions into the stack and the management API,
    /// runs the stack and the control jobs, and hands completions back.
    /// Returns true if anything happened.
    pub fn poll(&mut self) -> bool {
        let mut progress = false;
        let mut ids = core::mem::take(&mut self.ids);
        ids.clear();
        ids.extend(self.sessions.keys().copied());
        for &id in &ids {
            while let Some(work) = self.session_mut(id).and_then(|s| s.next_work()) {
                progress = true;
                self.dispatch(id, work);
            }
        }
        self.ids = ids;
        progress |= self.stack.run();
        while let Some((cookie, bio, result)) = self.stack.take_completed() {
            progress = true;
            self.complete(cookie, bio, result);
        }
        progress |= self.admit_waiting();
        progress |= self.run_control();
        progress |= self.advance_shutdown();
        progress
    }

    fn dispatch(&mut self, id: ConnId, work: Work) {
        match work {
            Work::Io {
                export,
                bio,
                cookie,
            } => {
                let p = self.sessions.get(&id).map_or(0, |s| s.protocol);
                match self.exports.get_mut(p, export) {
                    Some(e) => {
                        e.stats.count(&bio);
                        let c = e.consumer;
                        self.stack
                            .submit(c, bio, (u64::from(id) << 32) | (cookie & 0xffff_ffff));
                    }
                    None => {
                        if let Some(s) = self.session_mut(id) {
                            s.complete(cookie, bio, Err(geom::bio::BioError::Invalid));
                        }
                    }
                }
            }
            Work::Save {
                export,
                state,
                cookie,
            } => {
                let p = self.sessions.get(&id).map_or(0, |s| s.protocol);
                let at = self.exports.list_index(p, export);
                let store = at.and_then(|i| self.exports.store_mut(i).map(|s| (i, s)));
                let r = match store {
                    Some((i, s)) => s.save(
                        &mut self.stack,
                        state,
                        (id, cookie),
                        exports::store_cookie(i),
                    ),
                    None => Err(geom::bio::BioError::Invalid),
                };
                if let Err(e) = r {
                    if let Some(s) = self.session_mut(id) {
                        s.saved(cookie, Err(e));
                    }
                }
            }
            Work::Control(req) => {
                if let Some(resp) = self.handle_control(id, req) {
                    if let Some(s) = self.session_mut(id) {
                        s.respond(resp);
                    }
                }
            }
        }
    }

    fn complete(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        let conn = cookie >> 32;
        if conn == SERVICE_CONN && cookie & exports::STORE_COOKIE != 0 {
            return self.store_done(cookie, bio, result);
        }
        if conn == SERVICE_CONN {
            if let Some(s) = self.shutdown.as_mut() {
                s.flushes_left = s.flushes_left.saturating_sub(1);
                if let Err(e) = result {
                    let name = s
                        .flushing
                        .get((cookie & 0xffff_ffff) as usize)
                        .map_or("?", String::as_str);
                    s.failed
                        .push(alloc::format!("the flush of export {name} failed: {e:?}"));
                }
            }
            return;
        }
        if let Some(s) = self.session_mut(conn as ConnId) {
            s.complete(cookie & 0xffff_ffff, bio, result);
        }
    }

    /// A state store's bio is back: its load (the state goes to the
    /// export's protocol) or a save (its sessions are answered).
    fn store_done(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        let i = (cookie & 0x7fff_ffff) as usize;
        let Some(store) = self.exports.store_mut(i) else {
            return;
        };
        let loading = store.phase == state::Phase::Loading;
        let answers = store.done(&mut self.stack, exports::store_cookie(i), bio, result);
        if loading {
            self.restore(i);
        }
        for ((conn, c), r) in answers {
            if let Some(s) = self.session_mut(conn) {
                s.saved(c, r);
            }
        }
    }

    /// Hands the state a store loaded to the export's protocol.
    fn restore(&mut self, i: usize) {
        let Some(e) = self.exports.all().get(i) else {
            return;
        };
        let (name, protocol) = (e.info.name.clone(), e.protocol);
        let restore = PROTOCOLS[protocol].restore_state;
        let Some(store) = self.exports.store_mut(i) else {
            return;
        };
        let (Some(bytes), state::Phase::Ready) = (store.loaded.take(), &store.phase) else {
            return;
        };
        if !restore.is_some_and(|f| f(&name, &bytes)) {
            store.phase = state::Phase::Failed(alloc::format!(
                "{} keeps a state that is not {}'s",
                store.provider,
                PROTOCOLS[protocol].name
            ));
        }
    }

    /// Starts a clean stop: sessions refuse new work (NBD: `ESHUTDOWN`);
    /// requests already received are carried out and answered (for up to
    /// [`DRAIN_LIMIT_MS`]); then every writable export is flushed and the
    /// results kept ([`Service::shutdown_result`]). The platform keeps
    /// polling until [`Service::stopped`].
    pub fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        for s in self.sessions.values_mut() {
            s.session.begin_shutdown();
        }
        self.shutdown = Some(Shutdown {
            asked_ms: self.now_ms,
            flushing: Vec::new(),
            flush_sent: false,
            flushes_left: 0,
            failed: Vec::new(),
            flushed_at_ms: None,
        });
        self.advance_shutdown();
    }

    /// Once the sessions' requests are answered (or the drain limit has
    /// passed), sends the stop's flushes; true when it did.
    fn advance_shutdown(&mut self) -> bool {
        if self.shutdown.as_ref().is_none_or(|s| s.flush_sent) {
            return false;
        }
        let now = self.now_ms;
        let open: usize = self
            .sessions
            .values()
            .map(|s| s.session.requests_open())
            .sum();
        let Some(s) = self.shutdown.as_mut() else {
            return false;
        };
        let late = now.saturating_sub(s.asked_ms) >= DRAIN_LIMIT_MS;
        if open > 0 && !late {
            return false;
        }
        if open > 0 {
            log::warn!(
                "shutdown: {open} requests still open after {DRAIN_LIMIT_MS} ms: flushing anyway"
            );
        }
        s.flush_sent = true;
        // An export whose provider is gone is flushed too: its flush
        // fails, and so does the stop, since writes it acknowledged may
        // not be on any disk.
        for e in self.exports.all() {
            if !e.info.read_only {
                let i = s.flushing.len() as u64;
                s.flushing.push(e.info.name.clone());
                self.stack
                    .submit(e.consumer, Bio::flush(), (SERVICE_CONN << 32) | i);
            }
        }
        s.flushes_left = s.flushing.len();
        true
    }

    /// How the clean stop ended once [`Service::stopped`]: `Err` names
    /// every flush that failed (the platform exits with a failure then).
    pub fn shutdown_result(&self) -> Result<(), String> {
        match &self.shutdown {
            Some(s) if !s.failed.is_empty() => Err(s.failed.join("; ")),
            _ => Ok(()),
        }
    }

    /// True when a clean stop was asked for.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    /// True when a clean stop's flushes have all completed.
    pub fn shutdown_done(&self) -> bool {
        self.shutdown
            .as_ref()
            .is_some_and(|s| s.flush_sent && s.flushes_left == 0)
    }

    /// True when the platform may stop: the flushes are done, and every
    /// reply has been handed to the transports (or the grace time after
    /// the flushes has passed).
    pub fn stopped(&mut self) -> bool {
        let now = self.now_ms;
        let Some(s) = self.shutdown.as_mut() else {
            return false;
        };
        if !s.flush_sent || s.flushes_left > 0 {
            return false;
        }
        let since = *s.flushed_at_ms.get_or_insert(now);
        let quiet = self.sessions.values().all(|s| !s.session.has_tx());
        quiet || now.saturating_sub(since) >= SHUTDOWN_GRACE_MS
    }
}
