//! The NBD server engine: one connection's state machine, from the greeting
//! to the last reply, over byte slices (sans-I/O).
//!
//! Input is parsed in place from the caller's receive slice; only message
//! headers (at most 28 bytes) and the data of the three options that need
//! it (at most [`OPTION_DATA_MAX`] bytes) are buffered. Write payloads go
//! straight from the receive slice into the pages of the bio's [`SgList`],
//! and read data goes straight from the bio's pages into the caller's send
//! slice; both copies are counted in the connection's [`DataCounters`].
//!
//! The connection is one struct, [`Connection`], declared here with its
//! fields; each concern is an `impl Connection` block in its own file:
//!
//! - `mod.rs`: the limits ([`ServerConfig`]), the constructor, the input
//!   dispatcher that routes bytes by parser state, timeouts, closing, and
//!   the [`Session`] impl;
//! - `handshake.rs`: option haggling, from the client flags to the export
//!   chosen by `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`, with meta contexts
//!   and what an export advertises ([`BlockLimits`], transmission flags);
//! - `transmission.rs`: request headers and their checks, the bios made
//!   from them, write payloads placed in pages, and completed bios turned
//!   into replies;
//! - `slots.rs`: the table of outstanding requests, the budget of payload
//!   bytes they hold, and the reuse of pages and page lists;
//! - `tx.rs`: the output: control bytes (greeting, option replies), reply
//!   headers, and the pieces handed out for a vectored send.

mod handshake;
mod slots;
mod transmission;
mod tx;

use crate::nbd::wire::{self, OptionView, RequestRepr, RequestView};
use crate::session::{ControlResponse, ExportInfo, RxPieces, Session, TxPieces, Work};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use geom::bio::{Bio, BioResult};
use geom::page::{DataCounters, Page, SgList};
use handshake::Selected;
use slots::{Slot, SlotState};
use tx::TxCur;

pub use handshake::{BlockLimits, ALLOCATION_CONTEXT_ID, OPTION_DATA_MAX, STRING_MAX};
pub use slots::{NO_MEMORY_RETRIES, NO_MEMORY_RETRY_MS, POOL_IDLE_MS, POOL_MAX_BYTES};
pub use transmission::MAX_REPLY_EXTENTS;

/// Upper bound on [`ServerConfig::max_in_flight`] (request handles are
/// slot indices and must fit in 32 bits).
pub const MAX_IN_FLIGHT_LIMIT: usize = 1 << 16;

/// Upper bound on [`ServerConfig::max_payload`]: a structured
/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk carries `8 + length` in 32 bits.
pub const MAX_PAYLOAD_LIMIT: u32 = u32::MAX - 8;

/// Smallest default budget of payload bytes held per connection.
const MIN_BUFFER_LIMIT: u64 = 16 << 20;

/// During option haggling, no new option is read while more than this many
/// reply bytes wait to be sent (clients wait for each reply anyway).
const CTL_TX_LIMIT: usize = 64 * 1024;

/// Length of the request header, the longest header the engine buffers.
const REQ_LEN: usize = RequestView::<&[u8]>::LEN;

/// Limits for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most requests outstanding at once (received and not yet fully
    /// replied to); input stops being consumed at this limit. Clamped to
    /// `1..=MAX_IN_FLIGHT_LIMIT`.
    pub max_in_flight: usize,
    /// Largest read or write payload in bytes (clamped to
    /// [`MAX_PAYLOAD_LIMIT`]); an export's `max_block` may lower it.
    pub max_payload: u32,
    /// A client that has not reached transmission this many milliseconds
    /// after its first [`Connection::on_tick`] is dropped (0: never).
    pub handshake_timeout_ms: u64,
    /// A connection in transmission that moves no byte either way for this
    /// many milliseconds while the stack holds none of its requests is
    /// dropped, whether it is idle or has stopped reading its replies
    /// (0: never).
    pub idle_timeout_ms: u64,
    /// A connection in transmission that holds payload pages (a write
    /// whose payload stopped arriving, replies its client does not read)
    /// and moves no byte either way for this many milliseconds while the
    /// stack holds none of its requests is dropped, so that it cannot
    /// keep memory from the others forever (0: never).
    pub stall_timeout_ms: u64,
    /// A read's or write's pages wait for [`Connection::grant`] (the
    /// service's global budget) unless spare pages cover them; false: the
    /// connection admits its own requests.
    pub budgeted: bool,
}

/// Default [`ServerConfig::handshake_timeout_ms`]: 30 s.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;

/// Default [`ServerConfig::stall_timeout_ms`]: 60 s.
pub const STALL_TIMEOUT_MS: u64 = 60_000;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            max_payload: 32 << 20,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: 0,
            stall_timeout_ms: STALL_TIMEOUT_MS,
            budgeted: false,
        }
    }
}

/// A bio the connection wants submitted to the stack.
#[derive(Debug)]
pub struct Request {
    /// Index of the export in the slice given to [`Connection::on_recv`].
    pub export: usize,
    /// The bio to submit (to the consumer opened for that export).
    pub bio: Bio,
    /// Hand back to [`Connection::complete`] with the bio; always < 2^32.
    pub cookie: u64,
}

/// Where the input parser is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// Waiting for the 32-bit client flags.
    ClientFlags,
    /// Waiting for an option header.
    OptHeader,
    /// Buffering `len` bytes of option data.
    OptData { option: u32, len: usize },
    /// Skipping `left` bytes of option data, then replying `reply`.
    OptSkip { option: u32, left: u32, reply: u32 },
    /// Waiting for a request header.
    ReqHeader,
    /// A checked read or write whose pages wait to be admitted
    /// ([`Connection::grant`]); no input is taken meanwhile.
    Admit(RequestRepr),
    /// Copying a write payload into the pages of slot `slot`.
    WriteData { slot: u32, got: u32 },
    /// Skipping `left` bytes of a refused write's payload; its error reply
    /// (in slot `slot`) is queued once the whole request has arrived.
    Skip { left: u32, slot: u32 },
    /// No more input is taken.
    Done,
}

/// How the connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// `NBD_OPT_ABORT` or `NBD_CMD_DISC`: send every outstanding reply first.
    Soft,
    /// Protocol violation or lost transport: drop output, wait only for bios
    /// the stack still holds.
    Hard,
}

/// One NBD connection, from greeting to close. See the module docs of
/// [`crate::nbd`] for how the platform drives it.
#[derive(Debug)]
pub struct Connection {
    cfg: ServerConfig,
    buffer_limit: u64,
    rx: Rx,
    hdr: [u8; REQ_LEN],
    hdr_len: usize,
    opt_buf: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    selected: Option<Selected>,
    closing: Option<Close>,
    /// Export for which `base:allocation` was selected by the last
    /// `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<usize>,
    /// The server is going away: options get `NBD_REP_ERR_SHUTDOWN` and
    /// requests `NBD_ESHUTDOWN`.
    shutting_down: bool,
    /// First [`Connection::on_tick`] time, and the last one that saw
    /// activity.
    born_ms: Option<u64>,
    last_active_ms: u64,
    /// Bytes moved since the last tick.
    active: bool,
    /// A timeout ended the connection.
    timed_out: bool,
    /// The last tick's time.
    now_ms: u64,
    /// Slots whose bio came back `NoMemory`, with the time each may go
    /// again.
    retry: VecDeque<(u32, u64)>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    submitted: usize,
    held_bytes: u64,
    ready: VecDeque<u32>,
    replies: VecDeque<u32>,
    ctl: Vec<u8>,
    ctl_pos: usize,
    /// Replies being sent, headers built, in order.
    sending: VecDeque<TxCur>,
    /// Pages of finished requests kept for new ones (at most
    /// [`POOL_MAX_BYTES`]; dropped after [`POOL_IDLE_MS`] without traffic).
    pool: Vec<Page>,
    /// Page lists of finished requests, cleared, kept for new ones so a
    /// large request does not allocate its list.
    sg_pool: Vec<SgList>,
    counters: DataCounters,
}

impl Connection {
    /// A new connection with the fixed-newstyle greeting queued
    /// (`NBDMAGIC`, `IHAVEOPT`, `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`).
    pub fn new(cfg: ServerConfig) -> Connection {
        let cfg = ServerConfig {
            max_in_flight: cfg.max_in_flight.clamp(1, MAX_IN_FLIGHT_LIMIT),
            max_payload: cfg.max_payload.min(MAX_PAYLOAD_LIMIT),
            ..cfg
        };
        let mut c = Connection {
            cfg,
            buffer_limit: (u64::from(cfg.max_payload) * 2).max(MIN_BUFFER_LIMIT),
            rx: Rx::ClientFlags,
            hdr: [0; REQ_LEN],
            hdr_len: 0,
            opt_buf: Vec::new(),
            no_zeroes: false,
            structured: false,
            selected: None,
            closing: None,
            meta: None,
            shutting_down: false,
            born_ms: None,
            last_active_ms: 0,
            active: false,
            timed_out: false,
            now_ms: 0,
            retry: VecDeque::new(),
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            submitted: 0,
            held_bytes: 0,
            ready: VecDeque::new(),
            replies: VecDeque::new(),
            ctl: Vec::new(),
            ctl_pos: 0,
            sending: VecDeque::new(),
            pool: Vec::new(),
            sg_pool: Vec::new(),
            counters: DataCounters::new(),
        };
        let g = wire::GreetingRepr {
            flags: wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES,
        };
        let at = c.ctl_grow(g.buffer_len());
        g.emit(&mut wire::GreetingView::new_unchecked(&mut c.ctl[at..]));
        c
    }

    /// Sets the budget of payload bytes held in pages by requests of this
    /// connection; no new request is read while the budget is used up, so
    /// a connection holds at most this plus one payload. The default is
    /// twice the maximum payload, and at least 16 MiB.
    pub fn set_buffer_limit(&mut self, bytes: u64) {
        self.buffer_limit = bytes.max(1);
    }

    /// Payload bytes currently held in pages by this connection's requests.
    pub fn buffered_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Feeds received bytes; returns how many were consumed. Fewer than
    /// `rx.len()` are consumed when the connection is at its in-flight or
    /// buffer limit, or once it is closing; offer the rest again later.
    pub fn on_recv(&mut self, exports: &[ExportInfo], rx: &[u8]) -> usize {
        self.admit_self();
        let mut used = 0;
        while let Some(input) = rx.get(used..).filter(|i| !i.is_empty()) {
            let n = self.step(exports, input);
            if n == 0 {
                break;
            }
            used += n;
        }
        self.active |= used > 0;
        used
    }

    /// Tells the connection the time (milliseconds on any monotonic clock);
    /// the platform calls it now and then (every few hundred milliseconds
    /// is plenty). Enforces [`ServerConfig::handshake_timeout_ms`],
    /// [`ServerConfig::idle_timeout_ms`] and
    /// [`ServerConfig::stall_timeout_ms`]: a connection past one is shut
    /// down as by [`Connection::shutdown`]. Returns true if it was.
    pub fn on_tick(&mut self, now_ms: u64) -> bool {
        // A request that met an exhausted heap tries again.
        self.now_ms = now_ms;
        self.admit_self();
        self.retry_due();
        let born = *self.born_ms.get_or_insert(now_ms);
        if self.active || self.submitted > 0 || !self.retry.is_empty() || self.last_active_ms < born
        {
            self.last_active_ms = now_ms;
            self.active = false;
        }
        if now_ms.saturating_sub(self.last_active_ms) >= POOL_IDLE_MS {
            self.pool = Vec::new();
            self.sg_pool = Vec::new();
        }
        if self.closing.is_some() {
            return false;
        }
        let expired = |limit: u64, since: u64| limit > 0 && now_ms.saturating_sub(since) >= limit;
        let timed_out = if self.selected.is_none() {
            expired(self.cfg.handshake_timeout_ms, born)
        } else {
            expired(self.cfg.idle_timeout_ms, self.last_active_ms)
                || (self.held_bytes > 0 && expired(self.cfg.stall_timeout_ms, self.last_active_ms))
        };
        if timed_out {
            self.timed_out = true;
            self.hard_close();
        }
        timed_out
    }

    /// The server is going away (proto.md "Termination of the session
    /// during option haggling", `NBD_ESHUTDOWN`): from now on options are
    /// answered `NBD_REP_ERR_SHUTDOWN` (except `NBD_OPT_ABORT`) and
    /// requests `NBD_ESHUTDOWN` (except `NBD_CMD_DISC`); requests already
    /// taken are still answered.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// True once the connection is over and the socket may be closed and
    /// this value dropped: after `NBD_OPT_ABORT` or `NBD_CMD_DISC` once every
    /// reply is sent, after a protocol violation or [`Connection::shutdown`]
    /// once the stack has handed back every bio it holds for it.
    pub fn is_finished(&self) -> bool {
        match self.closing {
            None => false,
            Some(Close::Hard) => self.submitted == 0,
            Some(Close::Soft) => self.live == 0 && self.ctl_pending() == 0,
        }
    }

    /// True while [`Connection::on_recv`] would consume input now.
    pub fn wants_recv(&self) -> bool {
        if self.closing.is_some() {
            return false;
        }
        match self.rx {
            Rx::Done => false,
            Rx::OptHeader => self.hdr_len > 0 || self.ctl_pending() <= CTL_TX_LIMIT,
            Rx::ReqHeader => self.hdr_len > 0 || self.can_start_request(),
            Rx::Admit(_) => false,
            _ => true,
        }
    }

    /// True while [`Connection::tx_pieces`] has output.
    pub fn has_tx(&self) -> bool {
        self.closing != Some(Close::Hard)
            && (self.ctl_pending() > 0 || !self.sending.is_empty() || !self.replies.is_empty())
    }

    /// Copies done by this connection between the socket buffers and bio
    /// pages.
    pub fn counters(&self) -> &DataCounters {
        &self.counters
    }

    /// Requests received and not yet fully replied to.
    pub fn in_flight(&self) -> usize {
        self.live
    }

    /// Bios handed out by [`Connection::next_request`] and not yet completed.
    pub fn submitted(&self) -> usize {
        self.submitted
    }

    /// The export chosen by the handshake, once in transmission.
    pub fn export(&self) -> Option<usize> {
        self.selected.map(|s| s.index)
    }

    /// True if the client negotiated structured replies.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The peer will send nothing more (it shut its side of the connection,
    /// and every byte it sent was given to [`Connection::on_recv`]): a
    /// request cut short is dropped, and the connection finishes once the
    /// replies it owes are sent, as after `NBD_CMD_DISC`.
    pub fn input_closed(&mut self) {
        if self.closing.is_some() {
            return;
        }
        match self.rx {
            Rx::WriteData { slot, .. } | Rx::Skip { slot, .. } => self.free_slot(slot as usize),
            _ => {}
        }
        self.hdr_len = 0;
        self.opt_buf = Vec::new();
        self.rx = Rx::Done;
        self.closing = Some(Close::Soft);
    }

    /// The transport is gone (peer closed or reset) or the server is going
    /// away: drop queued output and unsubmitted requests. Bios already in
    /// the stack must still be completed before [`Connection::is_finished`].
    pub fn shutdown(&mut self) {
        self.hard_close();
    }

    fn hard_close(&mut self) {
        self.closing = Some(Close::Hard);
        self.rx = Rx::Done;
        self.hdr_len = 0;
        self.ctl = Vec::new();
        self.ctl_pos = 0;
        self.sending.clear();
        self.replies.clear();
        self.pool = Vec::new();
        self.ready.clear();
        self.retry.clear();
        self.opt_buf = Vec::new();
        for i in 0..self.slots.len() {
            if !matches!(self.slots[i].state, SlotState::Submitted) {
                self.free_slot(i);
            }
        }
    }

    // ---- input ----

    /// Consumes a prefix of `input` in the current state; 0 means blocked.
    fn step(&mut self, exports: &[ExportInfo], input: &[u8]) -> usize {
        if self.closing.is_some() {
            return 0;
        }
        match self.rx {
            Rx::ClientFlags => {
                let n = self.gather(input, 4);
                if self.hdr_len == 4 {
                    self.on_client_flags();
                }
                n
            }
            Rx::OptHeader => {
                if self.hdr_len == 0 && self.ctl_pending() > CTL_TX_LIMIT {
                    return 0;
                }
                let n = self.gather(input, OptionView::<&[u8]>::LEN);
                if self.hdr_len == OptionView::<&[u8]>::LEN {
                    self.on_option_header(exports);
                }
                n
            }
            Rx::OptData { option, len } => {
                let k = len.saturating_sub(self.opt_buf.len()).min(input.len());
                self.opt_buf.extend_from_slice(&input[..k]);
                if self.opt_buf.len() >= len {
                    self.finish_option(exports, option);
                }
                k
            }
            Rx::OptSkip {
                option,
                left,
                reply,
            } => {
                let k = (left as usize).min(input.len());
                let left = left - k as u32;
                if left == 0 {
                    self.end_skipped_option(option, reply);
                } else {
                    self.rx = Rx::OptSkip {
                        option,
                        left,
                        reply,
                    };
                }
                k
            }
            Rx::ReqHeader => {
                if self.hdr_len == 0 && !self.can_start_request() {
                    return 0;
                }
                let n = self.gather(input, REQ_LEN);
                if self.hdr_len == REQ_LEN {
                    self.on_request_header();
                }
                n
            }
            Rx::WriteData { slot, got } => self.write_data(slot, got, input),
            Rx::Admit(_) => 0,
            Rx::Skip { left, slot } => {
                let k = (left as usize).min(input.len());
                let left = left - k as u32;
                if left == 0 {
                    self.replies.push_back(slot);
                    self.rx = Rx::ReqHeader;
                } else {
                    self.rx = Rx::Skip { left, slot };
                }
                k
            }
            Rx::Done => 0,
        }
    }

    /// Appends input to the header buffer until it holds `need` bytes.
    fn gather(&mut self, input: &[u8], need: usize) -> usize {
        let k = need.saturating_sub(self.hdr_len).min(input.len());
        self.hdr[self.hdr_len..self.hdr_len + k].copy_from_slice(&input[..k]);
        self.hdr_len += k;
        k
    }
}

impl Session for Connection {
    fn recv(&mut self, exports: &[ExportInfo], data: &[u8]) -> usize {
        self.on_recv(exports, data)
    }

    fn rx_pieces<'a>(&'a self, out: &mut RxPieces<'a>) -> usize {
        Connection::rx_pieces(self, out)
    }

    fn rx_filled(&mut self, n: usize) {
        Connection::rx_filled(self, n)
    }

    fn tx_pieces<'a>(&'a mut self, out: &mut TxPieces<'a>, max_bytes: usize) {
        Connection::tx_pieces(self, out, max_bytes)
    }

    fn tx_advance(&mut self, n: usize) {
        Connection::tx_advance(self, n)
    }

    fn next_work(&mut self) -> Option<Work> {
        self.next_request().map(|r| Work::Io {
            export: r.export,
            bio: r.bio,
            cookie: r.cookie,
        })
    }

    fn complete(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        Connection::complete(self, cookie, bio, result);
    }

    fn respond(&mut self, _response: ControlResponse) {}

    fn tick(&mut self, now_ms: u64) {
        self.on_tick(now_ms);
    }

    fn input_closed(&mut self) {
        Connection::input_closed(self)
    }

    fn begin_shutdown(&mut self) {
        Connection::begin_shutdown(self)
    }

    fn shutdown(&mut self) {
        Connection::shutdown(self)
    }

    fn wants_recv(&self) -> bool {
        Connection::wants_recv(self)
    }

    fn has_tx(&self) -> bool {
        Connection::has_tx(self)
    }

    fn is_finished(&self) -> bool {
        Connection::is_finished(self)
    }

    fn counters(&self) -> &DataCounters {
        Connection::counters(self)
    }

    fn in_flight(&self) -> usize {
        self.submitted()
    }

    fn requests_open(&self) -> usize {
        Connection::in_flight(self)
    }

    fn budget_held(&self) -> u64 {
        Connection::budget_held(self)
    }

    fn budget_wanted(&self) -> Option<u64> {
        Connection::budget_wanted(self)
    }

    fn budget_grant(&mut self) -> bool {
        Connection::grant(self)
    }

    fn budget_trim(&mut self) {
        Connection::trim(self)
    }

    fn timed_out(&self) -> bool {
        self.timed_out
    }
}
