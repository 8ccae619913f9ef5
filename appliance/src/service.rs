//! The appliance's service core, shared by both platforms: config → stack
//! → exports, the NBD and management connections, and the routing of bios
//! between them.
//!
//! ```text
//!  platform (smoltcp or std sockets)
//!     │ bytes in / bytes out, per connection id
//!     ▼
//!  Service ── nbd::Connection ──requests──▶ Stack ──▶ disk / md geoms
//!     │     ◀─────────────── completions ───┘
//!     └──── http::Connection ──▶ /status, /metrics, /shutdown, /geom
//! ```
//!
//! `POST /geom` takes the same lines as the config file and applies them to
//! the running stack (geom(8)'s verbs, and `export nbd` for new exports);
//! `GET /geom` returns the topology as JSON.
//!
//! The platform owns sockets and devices; the service owns everything
//! else and never blocks.

#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write as _;
use geom::bio::{Bio, BioResult, ConsumerId};
use geom::class::md::MdGeom;
use geom::config::{Config, ConfigError, Statement};
use geom::ctl;
use geom::ctl::json_escape;
use geom::disk::{vtbd_name, BlockDevice, DiskGeom};
use geom::page::DataCounters;
use geom::stack::{ProviderStats, Stack};
use net::{http, nbd};

/// The version reported by `/status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Size of the memory disk served when there is neither a config nor a disk.
pub const DEFAULT_MD_BYTES: u64 = 256 << 20;

/// Largest NBD request payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Most NBD connections served at once, on either platform. A connection
/// attempt within the limit is accepted however many arrive together; one
/// beyond it is closed at once, before any byte is sent.
pub const MAX_NBD_CONNECTIONS: usize = 32;

/// Most management connections served at once, on either platform (one
/// beyond it is closed at once, as for NBD).
pub const MAX_HTTP_CONNECTIONS: usize = 16;

/// Tag space: the upper 32 bits of a bio tag name the connection; 0 is the
/// service itself (shutdown flushes).
const SERVICE_CONN: u64 = 0;

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

struct Export {
    provider_name: String,
    consumer: ConsumerId,
}

/// Why a live change (`POST /geom`) stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveError {
    /// The line and column at fault, and what is wrong.
    pub error: ConfigError,
    /// How many statements before it were applied.
    pub applied: usize,
}

/// The 1-based column an error on line `line` of `text` points at: the
/// last word the message quotes that the line has (`cannot export 'x': no
/// provider named 'vtbd9'` points at `vtbd9`), else the line's first word.
fn error_column(text: &str, line: usize, message: &str) -> usize {
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return 1;
    };
    let code = l.split('#').next().unwrap_or("");
    // (column, word) for each word of the line.
    let mut words: Vec<(usize, &str)> = Vec::new();
    let mut start = None;
    for (col, (byte, ch)) in code
        .char_indices()
        .chain(core::iter::once((code.len(), ' ')))
        .enumerate()
    {
        match (ch.is_whitespace(), start) {
            (false, None) => start = Some((col, byte)),
            (true, Some((c, from))) => {
                start = None;
                words.push((c + 1, &code[from..byte]));
            }
            _ => {}
        }
    }
    let quoted: Vec<&str> = message.split('\'').skip(1).step_by(2).collect();
    quoted
        .iter()
        .rev()
        .find_map(|q| words.iter().find(|(_, w)| w == q).map(|(c, _)| *c))
        .or(words.first().map(|(c, _)| *c))
        .unwrap_or(1)
}

/// Points a configuration error found while building the stack (whose
/// column is 1) at the word of `text` it is about.
pub fn locate_error(text: &str, e: ConfigError) -> ConfigError {
    let column = error_column(text, e.line, &e.message);
    ConfigError { column, ..e }
}

/// Appends `names` to `out` as JSON strings separated by commas.
fn json_names<'a>(out: &mut String, names: impl Iterator<Item = &'a str>) {
    for (i, n) in names.enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = write!(out, "{sep}\"{}\"", json_escape(n));
    }
}

/// Everything above the platform.
pub struct Service {
    stack: Stack,
    exports: Vec<Export>,
    infos: Vec<nbd::ExportInfo>,
    disks: Vec<(String, u64)>,
    nbd: BTreeMap<u32, nbd::Connection>,
    http: BTreeMap<u32, http::Connection>,
    next_id: u32,
    /// Copies made by closed NBD connections, so the figure survives them.
    nbd_closed: DataCounters,
    shutdown: Option<usize>,
}

fn config_error(line: usize, message: String) -> ConfigError {
    ConfigError {
        line,
        column: 1,
        message,
    }
}

impl Service {
    /// Builds the stack from `config` over the platform's disks (named
    /// vtbd0, vtbd1, … in the order given). With no export in the config,
    /// every disk is exported under its own name, or a 256 MiB md0 when
    /// there is no disk.
    pub fn new(config: &Config, disks: Vec<Box<dyn BlockDevice>>) -> Result<Service, ConfigError> {
        Service::with_seed(config, disks, 0)
    }

    /// [`Service::new`] with a seed for the stack's random numbers (the
    /// unique ids of labelled geoms): platforms pass something that
    /// differs from boot to boot.
    pub fn with_seed(
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
            DiskGeom::create(&mut stack, &name, dev).map_err(|e| config_error(0, e.to_string()))?;
            disk_list.push((name, size));
        }
        let mut svc = Service {
            stack,
            exports: Vec::new(),
            infos: Vec::new(),
            disks: disk_list,
            nbd: BTreeMap::new(),
            http: BTreeMap::new(),
            next_id: 1,
            nbd_closed: DataCounters::new(),
            shutdown: None,
        };
        // Labelled geoms assemble from the disks' metadata (tasting) before
        // the first line runs, whatever order the disks came in.
        ctl::register_classes(&mut svc.stack);
        svc.stack.settle(ctl::SETTLE_ROUNDS);
        for l in &config.lines {
            match &l.stmt {
                Statement::ExportNbd {
                    name,
                    provider,
                    read_only,
                } => svc
                    .export(name, provider, *read_only)
                    .map_err(|m| config_error(l.line, m))?,
                Statement::Net(_) => {}
                _ => ctl::apply_line(&mut svc.stack, l)?,
            }
        }
        if !config.has_exports() {
            if svc.disks.is_empty() {
                MdGeom::create(&mut svc.stack, "md0", DEFAULT_MD_BYTES)
                    .map_err(|e| config_error(0, e.to_string()))?;
                svc.export("md0", "md0", false)
                    .map_err(|m| config_error(0, m))?;
            } else {
                let names: Vec<String> = svc.disks.iter().map(|d| d.0.clone()).collect();
                for n in names {
                    svc.export(&n, &n, false).map_err(|m| config_error(0, m))?;
                }
            }
        }
        Ok(svc)
    }

    fn export(&mut self, name: &str, provider: &str, read_only: bool) -> Result<(), String> {
        if self.infos.iter().any(|i| i.name == name) {
            return Err(format!("export '{name}' exists already"));
        }
        let consumer = self
            .stack
            .open(provider, true, !read_only, false)
            .map_err(|e| format!("cannot export '{name}': {e}"))?;
        let pid = self.stack.consumer_provider(consumer);
        let spec = &self.stack.provider(pid).spec;
        let preferred = if spec.stripe_size > 0 {
            spec.stripe_size
        } else {
            4096
        };
        self.infos.push(nbd::ExportInfo {
            name: String::from(name),
            description: format!(
                "{} ({})",
                provider,
                self.stack.geom_class(self.stack.provider(pid).geom)
            ),
            size_bytes: spec.media_size,
            read_only,
            can_flush: spec.can_flush,
            can_trim: spec.can_discard && !read_only,
            can_write_zeroes: spec.can_write_zeroes && !read_only,
            min_block: spec.sector_size,
            preferred_block: preferred.max(spec.sector_size),
            max_block: MAX_PAYLOAD,
        });
        self.exports.push(Export {
            provider_name: String::from(provider),
            consumer,
        });
        Ok(())
    }

    /// The exports, in config order.
    pub fn exports(&self) -> &[nbd::ExportInfo] {
        &self.infos
    }

    /// The stack, for inspection.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    fn new_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Registers a new NBD connection and returns its id.
    pub fn nbd_open(&mut self) -> u32 {
        let id = self.new_id();
        let cfg = nbd::ServerConfig {
            max_in_flight: 64,
            max_payload: MAX_PAYLOAD,
            ..nbd::ServerConfig::default()
        };
        self.nbd.insert(id, nbd::Connection::new(cfg));
        id
    }

    /// Feeds bytes received on NBD connection `id`; returns bytes consumed.
    pub fn nbd_recv(&mut self, id: u32, data: &[u8]) -> usize {
        match self.nbd.get_mut(&id) {
            Some(c) => c.on_recv(&self.infos, data),
            None => data.len(),
        }
    }

    /// True while connection `id` can take more input.
    pub fn nbd_wants_recv(&self, id: u32) -> bool {
        self.nbd.get(&id).is_some_and(|c| c.wants_recv())
    }

    /// True while connection `id` has bytes to send.
    pub fn nbd_has_tx(&self, id: u32) -> bool {
        self.nbd.get(&id).is_some_and(|c| c.has_tx())
    }

    /// Fills `buf` with bytes to send on connection `id`; returns how many.
    pub fn nbd_fill_tx(&mut self, id: u32, buf: &mut [u8]) -> usize {
        self.nbd.get_mut(&id).map_or(0, |c| c.fill_tx(buf))
    }

    /// The output waiting on connection `id` as pieces for a vectored
    /// send (see [`nbd::Connection::tx_pieces`]); read data comes as the
    /// bios' own pages.
    pub fn nbd_tx_pieces<'a>(
        &'a mut self,
        id: u32,
        out: &mut Vec<nbd::TxPiece<'a>>,
        max_pieces: usize,
        max_bytes: usize,
    ) {
        if let Some(c) = self.nbd.get_mut(&id) {
            c.tx_pieces(out, max_pieces, max_bytes);
        }
    }

    /// Records that `n` bytes from [`Service::nbd_tx_pieces`] were sent.
    pub fn nbd_tx_advance(&mut self, id: u32, n: usize) {
        if let Some(c) = self.nbd.get_mut(&id) {
            c.tx_advance(n);
        }
    }

    /// Pages the next input of connection `id` belongs in, when it is
    /// write payload (see [`nbd::Connection::rx_pieces`]); returns the
    /// bytes they cover (0: use [`Service::nbd_recv`]).
    pub fn nbd_rx_pieces<'a>(
        &'a self,
        id: u32,
        out: &mut Vec<nbd::PageSlice<'a>>,
        max_pieces: usize,
    ) -> usize {
        self.nbd
            .get(&id)
            .map_or(0, |c| c.rx_pieces(out, max_pieces))
    }

    /// Records that `n` bytes were received straight into the pages from
    /// [`Service::nbd_rx_pieces`].
    pub fn nbd_rx_filled(&mut self, id: u32, n: usize) {
        if let Some(c) = self.nbd.get_mut(&id) {
            c.rx_filled(n);
        }
    }

    /// True once connection `id` is done and may be closed.
    pub fn nbd_finished(&self, id: u32) -> bool {
        self.nbd.get(&id).is_none_or(|c| c.is_finished())
    }

    /// Tells every NBD connection the time (milliseconds, monotonic), for
    /// the handshake and idle timeouts; call it every few hundred ms.
    pub fn nbd_tick(&mut self, now_ms: u64) {
        for c in self.nbd.values_mut() {
            c.on_tick(now_ms);
        }
    }

    /// The peer of connection `id` will send nothing more and every byte
    /// it sent was fed: it finishes once the replies it is owed are sent.
    pub fn nbd_input_closed(&mut self, id: u32) {
        if let Some(c) = self.nbd.get_mut(&id) {
            c.input_closed();
        }
    }

    /// Forgets connection `id` (the peer went away or it finished). Bios it
    /// still has in flight complete into the void.
    pub fn nbd_close(&mut self, id: u32) {
        if let Some(c) = self.nbd.remove(&id) {
            let k = c.counters();
            self.nbd_closed.add_copied(k.bytes_copied() as usize);
        }
    }

    /// Registers a new management connection and returns its id.
    pub fn http_open(&mut self) -> u32 {
        let id = self.new_id();
        self.http.insert(id, http::Connection::new());
        id
    }

    /// Feeds bytes received on management connection `id`.
    pub fn http_recv(&mut self, id: u32, data: &[u8], status: &PlatformStatus) -> usize {
        let Some(c) = self.http.get_mut(&id) else {
            return data.len();
        };
        let used = c.on_recv(data);
        if let Some(req) = c.take_request() {
            let resp = self.handle_http(&req, status);
            if let Some(c) = self.http.get_mut(&id) {
                c.respond(resp);
            }
        }
        used
    }

    /// Fills `buf` with bytes to send on management connection `id`.
    pub fn http_fill_tx(&mut self, id: u32, buf: &mut [u8]) -> usize {
        self.http.get_mut(&id).map_or(0, |c| c.fill_tx(buf))
    }

    /// True while management connection `id` has bytes to send.
    pub fn http_has_tx(&self, id: u32) -> bool {
        self.http.get(&id).is_some_and(|c| c.has_tx())
    }

    /// True once management connection `id` has sent its response.
    pub fn http_finished(&self, id: u32) -> bool {
        self.http.get(&id).is_none_or(|c| c.is_finished())
    }

    /// Forgets management connection `id`.
    pub fn http_close(&mut self, id: u32) {
        self.http.remove(&id);
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

    /// Moves requests from connections into the stack, runs the stack, and
    /// hands completions back. Returns true if anything happened.
    pub fn poll(&mut self) -> bool {
        let mut progress = false;
        for (&id, conn) in self.nbd.iter_mut() {
            while let Some(req) = conn.next_request() {
                progress = true;
                let consumer = self.exports[req.export].consumer;
                self.stack.submit(
                    consumer,
                    req.bio,
                    (u64::from(id) << 32) | (req.handle & 0xffff_ffff),
                );
            }
        }
        progress |= self.stack.run();
        while let Some((tag, bio, result)) = self.stack.take_completed() {
            progress = true;
            self.complete(tag, bio, result);
        }
        progress
    }

    fn complete(&mut self, tag: u64, bio: Bio, result: BioResult) {
        let conn = tag >> 32;
        if conn == SERVICE_CONN {
            if let Some(left) = self.shutdown.as_mut() {
                *left = left.saturating_sub(1);
            }
            return;
        }
        if let Some(c) = self.nbd.get_mut(&(conn as u32)) {
            c.complete(tag & 0xffff_ffff, bio, result);
        }
    }

    /// Starts a clean shutdown: flushes every writable export. The platform
    /// keeps polling until [`Service::shutdown_done`] is true, then stops.
    pub fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        // New NBD requests and options are refused with ESHUTDOWN.
        for c in self.nbd.values_mut() {
            c.begin_shutdown();
        }
        let mut n = 0;
        for (e, info) in self.exports.iter().zip(&self.infos) {
            if !info.read_only {
                self.stack
                    .submit(e.consumer, Bio::flush(), SERVICE_CONN << 32);
                n += 1;
            }
        }
        self.shutdown = Some(n);
    }

    /// True when a shutdown was asked for.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    /// True when a shutdown's flushes have all completed.
    pub fn shutdown_done(&self) -> bool {
        self.shutdown == Some(0)
    }

    /// Number of open NBD connections.
    pub fn nbd_connections(&self) -> usize {
        self.nbd.len()
    }

    /// Number of open management connections.
    pub fn http_connections(&self) -> usize {
        self.http.len()
    }

    /// Applies configuration lines to the running stack, as `POST /geom`
    /// does: the whole text is parsed first (a syntax error applies
    /// nothing), then each statement is applied in order until one fails.
    /// Returns the JSON result: per line, the providers it created, and
    /// those it orphaned or removed.
    pub fn apply_live(&mut self, text: &str) -> Result<String, LiveError> {
        let config = geom::config::parse(text).map_err(|error| LiveError { error, applied: 0 })?;
        if config.lines.is_empty() {
            return Err(LiveError {
                error: config_error(1, String::from("no statement given")),
                applied: 0,
            });
        }
        let mut out = String::from("{\"applied\":");
        let _ = write!(out, "{},\"results\":[", config.lines.len());
        for (i, l) in config.lines.iter().enumerate() {
            let before = self.provider_states();
            let r = match &l.stmt {
                Statement::ExportNbd {
                    name,
                    provider,
                    read_only,
                } => self.export(name, provider, *read_only),
                Statement::Net(_) => Err(String::from(
                    "network settings apply at boot only (put them in the config file)",
                )),
                stmt => ctl::apply(&mut self.stack, stmt).map_err(|e| e.to_string()),
            };
            if let Err(message) = r {
                return Err(LiveError {
                    error: ConfigError {
                        line: l.line,
                        column: error_column(text, l.line, &message),
                        message,
                    },
                    applied: i,
                });
            }
            let after = self.provider_states();
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(out, "{sep}{{\"line\":{},\"created\":[", l.line);
            let created = after
                .iter()
                .filter(|(n, ok)| *ok && !before.iter().any(|(m, was)| m == n && *was));
            json_names(&mut out, created.map(|(n, _)| n.as_str()));
            out.push_str("],\"orphaned\":[");
            let orphaned = after
                .iter()
                .filter(|(n, ok)| !*ok && before.iter().any(|(m, was)| m == n && *was));
            json_names(&mut out, orphaned.map(|(n, _)| n.as_str()));
            out.push_str("],\"removed\":[");
            let removed = before
                .iter()
                .filter(|(n, _)| !after.iter().any(|(m, _)| m == n));
            json_names(&mut out, removed.map(|(n, _)| n.as_str()));
            out.push(']');
            if let Statement::ExportNbd { name, .. } = &l.stmt {
                let _ = write!(out, ",\"exported\":\"{}\"", json_escape(name));
            }
            out.push('}');
        }
        out.push_str("]}\n");
        Ok(out)
    }

    /// Every provider's name and whether it is alive (not orphaned).
    fn provider_states(&self) -> Vec<(String, bool)> {
        self.stack
            .providers()
            .map(|(_, p)| (p.spec.name.clone(), !p.orphaned))
            .collect()
    }

    fn http_geom(&mut self, body: &[u8]) -> http::Response {
        let result = match core::str::from_utf8(body) {
            Ok(text) => self.apply_live(text),
            Err(e) => Err(LiveError {
                error: config_error(
                    body[..e.valid_up_to()]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1,
                    String::from("the request body is not UTF-8 text"),
                ),
                applied: 0,
            }),
        };
        match result {
            Ok(json) => http::Response::new(200, "application/json", json),
            Err(e) => http::Response::new(
                400,
                "application/json",
                format!(
                    "{{\"error\":\"{}\",\"line\":{},\"column\":{},\"applied\":{}}}\n",
                    json_escape(&e.error.to_string()),
                    e.error.line,
                    e.error.column,
                    e.applied
                ),
            ),
        }
    }

    fn handle_http(&mut self, req: &http::Request, status: &PlatformStatus) -> http::Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/status") => {
                http::Response::new(200, "application/json", self.status_json(status))
            }
            ("GET", "/metrics") => {
                http::Response::new(200, "text/plain; version=0.0.4", self.metrics())
            }
            ("POST", "/shutdown") => {
                self.begin_shutdown();
                http::Response::new(200, "application/json", "{\"shutdown\":true}\n")
            }
            ("GET", "/geom") => {
                let mut body = ctl::topology_json(&self.stack);
                body.push('\n');
                http::Response::new(200, "application/json", body)
            }
            ("POST", "/geom") => self.http_geom(&req.body),
            (_, "/status" | "/metrics" | "/shutdown" | "/geom") => {
                http::Response::error(405, "method not allowed")
            }
            _ => http::Response::error(404, "not found"),
        }
    }

    /// The `/status` document.
    pub fn status_json(&self, st: &PlatformStatus) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"version\":\"{VERSION}\",\"platform\":\"{}\",\"uptime_ms\":{},\"memory\":{{\"total_bytes\":{},\"used_bytes\":{}}},\"disks\":[",
            st.platform, st.uptime_ms, st.memory_total_bytes, st.memory_used_bytes
        );
        for (i, (name, size)) in self.disks.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(
                s,
                "{sep}{{\"name\":\"{}\",\"size_bytes\":{size}}}",
                json_escape(name)
            );
        }
        s.push_str("],\"providers\":[");
        for (i, (_, p)) in self.stack.providers().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(
                s,
                "{sep}{{\"name\":\"{}\",\"class\":\"{}\",\"size_bytes\":{},\"sector_size\":{},\"access\":\"r{}w{}e{}\",\"state\":\"{}\"}}",
                json_escape(&p.spec.name),
                self.stack.geom_class(p.geom),
                p.spec.media_size,
                p.spec.sector_size,
                p.access.r,
                p.access.w,
                p.access.e,
                if p.orphaned { "orphaned" } else { "ok" }
            );
        }
        s.push_str("],\"exports\":[");
        for (i, (e, info)) in self.exports.iter().zip(&self.infos).enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(
                s,
                "{sep}{{\"name\":\"{}\",\"provider\":\"{}\",\"size_bytes\":{},\"read_only\":{},\"state\":\"{}\"}}",
                json_escape(&info.name),
                json_escape(&e.provider_name),
                info.size_bytes,
                info.read_only,
                if self.export_orphaned(e) { "orphaned" } else { "ok" }
            );
        }
        s.push_str("],\"orphaned\":{\"providers\":[");
        let dead = self.stack.providers().filter(|(_, p)| p.orphaned);
        json_names(&mut s, dead.map(|(_, p)| p.spec.name.as_str()));
        s.push_str("],\"exports\":[");
        let dead = self
            .exports
            .iter()
            .zip(&self.infos)
            .filter(|(e, _)| self.export_orphaned(e));
        json_names(&mut s, dead.map(|(_, i)| i.name.as_str()));
        // Mirrors with their health and resync progress (the class's own
        // status document, as in `GET /geom`).
        s.push_str("]},\"mirrors\":[");
        let mirrors = self
            .stack
            .geoms()
            .filter(|&g| self.stack.geom_class(g) == "mirror");
        for (i, g) in mirrors.enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(
                s,
                "{sep}{{\"name\":\"{}\",",
                json_escape(self.stack.geom_name(g))
            );
            self.stack.dumpconf(g, &mut s);
            s.push('}');
        }
        // Labelled geoms still waiting for members to appear.
        s.push_str("],\"waiting\":[");
        for (i, (class, name, have, want)) in self.stack.incomplete_geoms().into_iter().enumerate()
        {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(
                s,
                "{sep}{{\"class\":\"{}\",\"name\":\"{}\",\"members\":{have},\"of\":{want}}}",
                json_escape(&class),
                json_escape(&name)
            );
        }
        let _ = writeln!(
            s,
            "],\"connections\":{{\"nbd\":{},\"http\":{}}}}}",
            self.nbd.len(),
            self.http.len()
        );
        s
    }

    /// True when the provider under an export has gone away.
    fn export_orphaned(&self, e: &Export) -> bool {
        let pid = self.stack.consumer_provider(e.consumer);
        self.stack.get_provider(pid).is_none_or(|p| p.orphaned)
    }

    /// The `/metrics` document (Prometheus text exposition format).
    pub fn metrics(&self) -> String {
        let mut s = String::new();
        type Get = fn(&ProviderStats) -> u64;
        let counters: [(&str, &str, Get); 12] = [
            ("reads", "Read requests started.", |p| {
                ProviderStats::get(&p.reads)
            }),
            ("writes", "Write requests started.", |p| {
                ProviderStats::get(&p.writes)
            }),
            ("flushes", "Flush requests started.", |p| {
                ProviderStats::get(&p.flushes)
            }),
            ("frees", "Discard and write-zeroes requests started.", |p| {
                ProviderStats::get(&p.frees)
            }),
            ("read_bytes", "Bytes requested by reads.", |p| {
                ProviderStats::get(&p.bytes_read)
            }),
            ("written_bytes", "Bytes carried by writes.", |p| {
                ProviderStats::get(&p.bytes_written)
            }),
            ("errors", "Requests completed with an error.", |p| {
                ProviderStats::get(&p.errors)
            }),
            (
                "read_ns",
                "Nanoseconds reads spent below the provider, summed.",
                |p| ProviderStats::get(&p.read_ns),
            ),
            (
                "write_ns",
                "Nanoseconds writes spent below the provider, summed.",
                |p| ProviderStats::get(&p.write_ns),
            ),
            (
                "mapped_bytes",
                "Bytes mapped by the provider's geom.",
                |p| p.data.bytes_mapped(),
            ),
            (
                "copied_bytes",
                "Bytes copied by the provider's geom.",
                |p| p.data.bytes_copied(),
            ),
            ("ios", "Requests of any kind started.", |p| {
                ProviderStats::get(&p.reads)
                    + ProviderStats::get(&p.writes)
                    + ProviderStats::get(&p.flushes)
                    + ProviderStats::get(&p.frees)
            }),
        ];
        for (name, help, get) in counters {
            let _ = writeln!(s, "# HELP strata_provider_{name}_total {help}");
            let _ = writeln!(s, "# TYPE strata_provider_{name}_total counter");
            for (_, p) in self.stack.providers() {
                let _ = writeln!(
                    s,
                    "strata_provider_{name}_total{{provider=\"{}\"}} {}",
                    json_escape(&p.spec.name),
                    get(&p.stats)
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP strata_provider_in_flight Requests started on the provider and not yet done."
        );
        let _ = writeln!(s, "# TYPE strata_provider_in_flight gauge");
        for (_, p) in self.stack.providers() {
            let _ = writeln!(
                s,
                "strata_provider_in_flight{{provider=\"{}\"}} {}",
                json_escape(&p.spec.name),
                p.in_flight
            );
        }
        let copied: u64 = self.nbd_closed.bytes_copied()
            + self
                .nbd
                .values()
                .map(|c| c.counters().bytes_copied())
                .sum::<u64>();
        let mapped: u64 = self.nbd_closed.bytes_mapped()
            + self
                .nbd
                .values()
                .map(|c| c.counters().bytes_mapped())
                .sum::<u64>();
        let _ = writeln!(
            s,
            "# HELP strata_nbd_copied_bytes_total Bytes copied between TCP buffers and bio pages."
        );
        let _ = writeln!(s, "# TYPE strata_nbd_copied_bytes_total counter");
        let _ = writeln!(s, "strata_nbd_copied_bytes_total {copied}");
        let _ = writeln!(
            s,
            "# HELP strata_nbd_mapped_bytes_total Bytes of bio pages mapped by the NBD engine."
        );
        let _ = writeln!(s, "# TYPE strata_nbd_mapped_bytes_total counter");
        let _ = writeln!(s, "strata_nbd_mapped_bytes_total {mapped}");
        let _ = writeln!(s, "# HELP strata_nbd_connections Open NBD connections.");
        let _ = writeln!(s, "# TYPE strata_nbd_connections gauge");
        let _ = writeln!(s, "strata_nbd_connections {}", self.nbd.len());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geom::config::parse;

    fn pump(svc: &mut Service, id: u32, input: &[u8]) -> Vec<u8> {
        let mut fed = 0;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..1000 {
            fed += svc.nbd_recv(id, &input[fed..]);
            svc.poll();
            let n = svc.nbd_fill_tx(id, &mut buf);
            out.extend_from_slice(&buf[..n]);
            if fed == input.len() && n == 0 && !svc.nbd_has_tx(id) {
                break;
            }
        }
        out
    }

    fn export_name_opt(name: &str) -> Vec<u8> {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b
    }

    fn request(cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    #[test]
    fn default_is_md0_when_no_disks() {
        let svc = Service::new(&Config::default(), Vec::new()).unwrap();
        assert_eq!(svc.exports().len(), 1);
        assert_eq!(svc.exports()[0].name, "md0");
        assert_eq!(svc.exports()[0].size_bytes, DEFAULT_MD_BYTES);
    }

    #[test]
    fn missing_provider_names_its_line() {
        let cfg = parse("md create -s 1m md0\nexport nbd a vtbd3\n").unwrap();
        let e = Service::new(&cfg, Vec::new()).err().unwrap();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("vtbd3"), "{}", e.message);
    }

    #[test]
    fn write_then_read_through_the_service() {
        let cfg = parse("md create -s 1m md0\nexport nbd vol md0\n").unwrap();
        let mut svc = Service::new(&cfg, Vec::new()).unwrap();
        let id = svc.nbd_open();
        let mut input = export_name_opt("vol");
        let mut w = request(1, 9, 4096, 8192);
        w.extend_from_slice(&[0x5a; 8192]);
        input.extend_from_slice(&w);
        input.extend_from_slice(&request(0, 10, 4096, 8192));
        let out = pump(&mut svc, id, &input);
        // greeting 18 + export reply 10 (NO_ZEROES) + write reply 16 + read reply 16 + data
        assert_eq!(out.len(), 18 + 10 + 16 + 16 + 8192, "{out:?}");
        let data = &out[out.len() - 8192..];
        assert!(data.iter().all(|&b| b == 0x5a));
        let metrics = svc.metrics();
        assert!(
            metrics.contains("strata_provider_copied_bytes_total{provider=\"md0\"} 16384"),
            "{metrics}"
        );
        assert!(
            metrics.contains("strata_nbd_copied_bytes_total 16384"),
            "{metrics}"
        );
        let st = svc.status_json(&PlatformStatus::default());
        assert!(
            st.contains("\"exports\":[{\"name\":\"vol\",\"provider\":\"md0\""),
            "{st}"
        );
        assert!(st.contains("\"access\":\"r1w1e0\""), "{st}");
    }

    #[test]
    fn shutdown_flushes_writable_exports() {
        let cfg = parse(
            "md create -s 1m md0\nmd create -s 1m md1\nexport nbd a md0\nexport nbd b md1 ro\n",
        )
        .unwrap();
        let mut svc = Service::new(&cfg, Vec::new()).unwrap();
        svc.begin_shutdown();
        assert!(!svc.shutdown_done());
        svc.poll();
        assert!(svc.shutdown_done());
        let flushes = svc
            .stack()
            .providers()
            .map(|(_, p)| ProviderStats::get(&p.stats.flushes))
            .collect::<Vec<_>>();
        assert_eq!(flushes, [1, 0]);
    }

    fn http_call(svc: &mut Service, method: &str, path: &str, body: &str) -> (u16, String) {
        let id = svc.http_open();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        svc.http_recv(id, req.as_bytes(), &PlatformStatus::default());
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = svc.http_fill_tx(id, &mut buf);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        svc.http_close(id);
        let text = String::from_utf8(out).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[test]
    fn live_geom_creates_and_exports() {
        let cfg = parse("md create -s 1m md0\nexport nbd vol md0\n").unwrap();
        let mut svc = Service::new(&cfg, Vec::new()).unwrap();
        let (code, body) = http_call(
            &mut svc,
            "POST",
            "/geom",
            "md create -s 2m md1\n# comment\nexport nbd extra md1 ro\n",
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body,
            "{\"applied\":2,\"results\":[{\"line\":1,\"created\":[\"md1\"],\"orphaned\":[],\"removed\":[]},{\"line\":3,\"created\":[],\"orphaned\":[],\"removed\":[],\"exported\":\"extra\"}]}\n"
        );
        assert_eq!(svc.exports().len(), 2);
        assert_eq!(svc.exports()[1].name, "extra");
        assert!(svc.exports()[1].read_only);
        // A new client reaches the new export.
        let id = svc.nbd_open();
        let mut input = export_name_opt("extra");
        input.extend_from_slice(&request(0, 1, 0, 4096));
        let out = pump(&mut svc, id, &input);
        assert_eq!(out.len(), 18 + 10 + 16 + 4096, "{out:?}");
        let (code, body) = http_call(&mut svc, "GET", "/geom", "");
        assert_eq!(code, 200);
        assert!(body.contains("\"md1\""), "{body}");
        let st = svc.status_json(&PlatformStatus::default());
        assert!(
            st.contains("\"name\":\"extra\",\"provider\":\"md1\",\"size_bytes\":2097152,\"read_only\":true,\"state\":\"ok\""),
            "{st}"
        );
        assert!(
            st.contains("\"orphaned\":{\"providers\":[],\"exports\":[]}"),
            "{st}"
        );
    }

    #[test]
    fn live_geom_errors_name_line_and_column() {
        let mut svc = Service::new(&Config::default(), Vec::new()).unwrap();
        // A syntax error applies nothing.
        let (code, body) = http_call(
            &mut svc,
            "POST",
            "/geom",
            "md create -s 1m md1\n  bogus x\n",
        );
        assert_eq!(code, 400);
        assert!(
            body.contains("\"error\":\"line 2, column 3: unknown statement 'bogus'"),
            "{body}"
        );
        assert!(
            body.contains("\"line\":2,\"column\":3,\"applied\":0"),
            "{body}"
        );
        assert!(svc.stack().find_provider("md1").is_none());
        // A statement the stack refuses stops there; earlier ones stay.
        let (code, body) = http_call(
            &mut svc,
            "POST",
            "/geom",
            "md create -s 1m md1\n export nbd x nothere\nmd create -s 1m md2\n",
        );
        assert_eq!(code, 400);
        assert!(
            body.contains("line 2, column 15: cannot export 'x'"),
            "{body}"
        );
        assert!(body.contains("\"applied\":1"), "{body}");
        assert!(svc.stack().find_provider("md1").is_some());
        assert!(svc.stack().find_provider("md2").is_none());
        // Export names stay unique.
        let (code, body) = http_call(&mut svc, "POST", "/geom", "export nbd md0 md1");
        assert_eq!(code, 400);
        assert!(body.contains("exists already"), "{body}");
        let (code, body) = http_call(&mut svc, "POST", "/geom", "net dhcp");
        assert_eq!(code, 400);
        assert!(body.contains("boot only"), "{body}");
        let (code, _) = http_call(&mut svc, "POST", "/geom", "\n# nothing\n");
        assert_eq!(code, 400);
        let (code, _) = http_call(&mut svc, "PUT", "/geom", "");
        assert_eq!(code, 405);
    }

    #[test]
    fn forced_destroy_orphans_one_export_only() {
        let cfg = parse("md create -s 1m md0\nmd create -s 1m md1\nexport nbd b md1\n").unwrap();
        let mut svc = Service::new(&cfg, Vec::new()).unwrap();
        let (code, body) = http_call(
            &mut svc,
            "POST",
            "/geom",
            "nop create md0\nexport nbd a md0.nop\n",
        );
        assert_eq!(code, 200, "{body}");
        // Busy without -f: the export holds it open.
        let (code, body) = http_call(&mut svc, "POST", "/geom", "nop destroy md0.nop");
        assert_eq!(code, 400, "{body}");
        let (code, body) = http_call(&mut svc, "POST", "/geom", "nop destroy -f md0.nop");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"orphaned\":[\"md0.nop\"]"), "{body}");
        let st = svc.status_json(&PlatformStatus::default());
        assert!(
            st.contains("\"orphaned\":{\"providers\":[\"md0.nop\"],\"exports\":[\"a\"]}"),
            "{st}"
        );
        // A read through the orphaned export gets EIO; the other export serves.
        for (export, errno) in [("a", 5u32), ("b", 0)] {
            let id = svc.nbd_open();
            let mut input = export_name_opt(export);
            input.extend_from_slice(&request(0, 1, 0, 512));
            let out = pump(&mut svc, id, &input);
            let reply = &out[18 + 10..];
            assert_eq!(
                u32::from_be_bytes(reply[4..8].try_into().unwrap()),
                errno,
                "{export}"
            );
        }
    }
}
