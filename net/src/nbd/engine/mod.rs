//! The NBD server engine: one connection's state machine, from the greeting
//! to the last reply, over byte slices (sans-I/O).
//!
//! Input is parsed in place from the caller's receive slice; only message
//! headers (at most 28 bytes) and the data of the three options that need
//! it (at most [`OPTION_DATA_MAX`] bytes) are buffered. Write payloads go
//! straight from the receive slice into the pages of the bio's [`SgList`],
//! and read data goes straight from the bio's pages into the caller's send
//! slice; both copies are counted in the connection's [`DataCounters`].

use super::wire::{
    self, ChunkRepr, ChunkView, Command, ExportNameReplyRepr, OptionReplyRepr, OptionReplyView,
    OptionRepr, OptionView, RequestRepr, RequestView, SimpleReplyRepr, SimpleReplyView,
};
use crate::session::{
    ControlResponse, ExportInfo, PageSlice, RxPieces, Session, TxPiece, TxPieces, Work,
};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::mem;
use geom::bio::{Bio, BioCmd, BioError, BioResult, Extent};
use geom::page::{DataCounters, Page, PageRef, SgList, PAGE_SIZE};

/// Longest option data the server buffers (`NBD_OPT_EXPORT_NAME`,
/// `NBD_OPT_INFO`, `NBD_OPT_GO`). A longer one of these options is taken
/// as a denial of service and the connection is closed (proto.md
/// "Termination of the session during option haggling"); the data of any
/// other option is skipped without being stored, whatever its length.
pub const OPTION_DATA_MAX: u32 = 64 * 1024;

/// Longest string the server sends (proto.md "Conventions": strings MUST be
/// no longer than 4096 bytes); longer names and descriptions are cut.
pub const STRING_MAX: usize = 4096;

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

/// Longest error message carried in an `NBD_REPLY_TYPE_ERROR` chunk.
const MESSAGE_MAX: usize = 64;

/// Room for the longest reply header: chunk header, error fields, message.
const TX_HDR_MAX: usize = wire::ChunkView::<&[u8]>::LEN + 6 + MESSAGE_MAX;

/// Length of the request header, the longest header the engine buffers.
const REQ_LEN: usize = RequestView::<&[u8]>::LEN;

/// A connection's pool of spare pages is dropped after this long without
/// traffic.
pub const POOL_IDLE_MS: u64 = 1_000;

/// Most bytes of spare pages a connection keeps (and never more than its
/// buffer limit): enough for eight 1 MiB requests in flight.
pub const POOL_MAX_BYTES: u64 = 8 << 20;

/// Most page lists a connection keeps for reuse (one per request in flight
/// at the depths clients use).
const SG_POOL_LISTS: usize = 16;

/// The id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT` (any
/// value will do; the client treats it as opaque).
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// Most extents in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (proto.md says
/// no more than 2^20; fewer keeps a reply within 128 KiB).
pub const MAX_REPLY_EXTENTS: usize = 16384;

/// Block size constraints as advertised in `NBD_INFO_BLOCK_SIZE` and
/// enforced on requests (proto.md "Size constraints").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// Minimum block size (alignment of offsets and lengths).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload of a read or write.
    pub max_payload: u32,
}

impl ExportInfo {
    /// The transmission flags advertised for this export (proto.md
    /// "Transmission flags") to a client that did (`structured`) or did not
    /// negotiate structured replies.
    ///
    /// - `NBD_FLAG_CAN_MULTI_CONN` always: every connection submits to the
    ///   same stack from one event loop, so a FLUSH or FUA completes after
    ///   every write that completed before it, whichever connection sent it.
    /// - `NBD_FLAG_SEND_CACHE` always: CACHE is accepted and answered at
    ///   once (the stack keeps no cache to warm).
    /// - `NBD_FLAG_SEND_DF` only with structured replies (the spec forbids
    ///   it otherwise); every read is one data chunk anyway.
    /// - A read-only export offers no FLUSH, FUA, TRIM or WRITE_ZEROES (its
    ///   consumer is opened without write access, which the stack requires
    ///   for a flush).
    /// - `NBD_FLAG_SEND_FAST_ZERO` when the export both trims and zeroes:
    ///   the provider can then deallocate instead of writing zeroes.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = wire::TFLAG_HAS_FLAGS | wire::TFLAG_CAN_MULTI_CONN | wire::TFLAG_SEND_CACHE;
        if structured {
            f |= wire::TFLAG_SEND_DF;
        }
        if self.read_only {
            return f | wire::TFLAG_READ_ONLY;
        }
        if self.can_flush {
            f |= wire::TFLAG_SEND_FLUSH | wire::TFLAG_SEND_FUA;
        }
        if self.can_trim {
            f |= wire::TFLAG_SEND_TRIM;
        }
        if self.can_write_zeroes {
            f |= wire::TFLAG_SEND_WRITE_ZEROES;
            if self.can_trim {
                f |= wire::TFLAG_SEND_FAST_ZERO;
            }
        }
        f
    }

    /// The block size constraints for this export under a connection
    /// payload limit of `max_payload`, made valid per proto.md "Size
    /// constraints" (powers of two, preferred ≥ minimum and ≥ 512, maximum ≥
    /// preferred and a multiple of the minimum).
    pub fn block_limits(&self, max_payload: u32) -> BlockLimits {
        let min = if self.min_block.is_power_of_two() && self.min_block <= 65536 {
            self.min_block
        } else {
            1
        };
        let floor = min.max(512);
        let preferred = if self.preferred_block.is_power_of_two() && self.preferred_block >= floor {
            self.preferred_block
        } else {
            floor.max(4096)
        };
        let max_block = if self.max_block == 0 {
            u32::MAX
        } else {
            self.max_block
        };
        let max = max_block.min(max_payload).max(preferred);
        BlockLimits {
            min_block: min,
            preferred_block: preferred,
            max_payload: max - max % min,
        }
    }
}

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
}

/// Default [`ServerConfig::handshake_timeout_ms`]: 30 s.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            max_payload: 32 << 20,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: 0,
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

/// The export chosen for transmission, fixed when the handshake ends.
#[derive(Clone, Copy, Debug)]
struct Selected {
    index: usize,
    size: u64,
    limits: BlockLimits,
    read_only: bool,
    can_flush: bool,
    can_trim: bool,
    can_write_zeroes: bool,
    can_fast_zero: bool,
    /// `base:allocation` was selected for this export (block status works).
    allocation: bool,
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

/// A finished request waiting to be sent.
#[derive(Debug, Default)]
struct Reply {
    /// The read's pages, for a successful read.
    bio: Option<Bio>,
    /// `NBD_E*` value, 0 for success.
    error: u32,
    /// Text for a structured error chunk.
    message: &'static str,
    /// Block status descriptors (`u32` length, `u32` flags, big-endian).
    extents: Vec<u8>,
}

#[derive(Debug, Default)]
enum SlotState {
    #[default]
    Free,
    /// A write whose payload is arriving.
    Receiving(SgList),
    /// A bio waiting for [`Connection::next_request`].
    Ready(Bio),
    /// The bio is in the stack.
    Submitted,
    /// Done; the reply is queued or being sent.
    Reply(Reply),
}

/// One outstanding request.
#[derive(Debug)]
struct Slot {
    cookie: u64,
    command: Command,
    offset: u64,
    length: u32,
    /// The request's command flags.
    flags: u16,
    /// Payload bytes held in pages for this request (counted in the budget).
    held: u64,
    state: SlotState,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            cookie: 0,
            command: Command::Read,
            offset: 0,
            length: 0,
            flags: 0,
            held: 0,
            state: SlotState::Free,
        }
    }
}

/// The reply being sent: its header bytes, then its read data or block
/// status descriptors.
#[derive(Debug)]
struct TxCur {
    slot: u32,
    hdr: [u8; TX_HDR_MAX],
    hdr_len: usize,
    hdr_pos: usize,
    data_len: u64,
    data_pos: u64,
}

/// An error found before a bio was made.
#[derive(Clone, Copy, Debug)]
struct Fail {
    errno: u32,
    message: &'static str,
}

const fn fail(errno: u32, message: &'static str) -> Fail {
    Fail { errno, message }
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
    /// is plenty). Enforces [`ServerConfig::handshake_timeout_ms`] and
    /// [`ServerConfig::idle_timeout_ms`]: a connection past either is shut
    /// down as by [`Connection::shutdown`]. Returns true if it was.
    pub fn on_tick(&mut self, now_ms: u64) -> bool {
        let born = *self.born_ms.get_or_insert(now_ms);
        if self.active || self.submitted > 0 || self.last_active_ms < born {
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
        };
        if timed_out {
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

    /// The next bio to submit, if any.
    pub fn next_request(&mut self) -> Option<Request> {
        let export = self.selected?.index;
        while let Some(idx) = self.ready.pop_front() {
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            match mem::replace(&mut slot.state, SlotState::Submitted) {
                SlotState::Ready(bio) => {
                    self.submitted += 1;
                    return Some(Request {
                        export,
                        bio,
                        cookie: u64::from(idx),
                    });
                }
                other => slot.state = other,
            }
        }
        None
    }

    /// Hands back a bio from [`Connection::next_request`] with its result.
    /// Returns false (and drops the bio) if `cookie` names no submitted
    /// request of this connection.
    pub fn complete(&mut self, cookie: u64, mut bio: Bio, result: BioResult) -> bool {
        let Ok(idx) = usize::try_from(cookie) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(idx) else {
            return false;
        };
        if !matches!(slot.state, SlotState::Submitted) {
            return false;
        }
        self.submitted -= 1;
        if self.closing == Some(Close::Hard) {
            drop(bio);
            self.free_slot(idx);
            return true;
        }
        if bio.cmd == BioCmd::Write {
            // A write's pages are done with: keep them for later requests.
            self.recycle(mem::take(&mut bio.sg));
        }
        let Some(slot) = self.slots.get_mut(idx) else {
            return false;
        };
        let reply = match result {
            Ok(()) if slot.command == Command::Read => {
                if bio.sg.len_bytes() == u64::from(slot.length) {
                    Reply {
                        bio: Some(bio),
                        ..Reply::default()
                    }
                } else {
                    Reply {
                        error: wire::EIO,
                        message: "device returned the wrong amount of data",
                        ..Reply::default()
                    }
                }
            }
            Ok(()) if slot.command == Command::BlockStatus => Reply {
                extents: descriptors(&bio.extents, slot.length, slot.flags),
                ..Reply::default()
            },
            // proto.md NBD_CMD_BLOCK_STATUS: an error that is not misuse may
            // be answered with one descriptor; a provider that cannot
            // answer knows nothing, so everything counts as data.
            Err(BioError::NotSupported) if slot.command == Command::BlockStatus => Reply {
                extents: descriptors(&[], slot.length, slot.flags),
                ..Reply::default()
            },
            Ok(()) => Reply::default(),
            Err(e) => Reply {
                error: errno_for(slot.command, e),
                message: message_for(e),
                ..Reply::default()
            },
        };
        // A write's pages (or a failed read's) are dropped now; block status
        // descriptors count against the budget until they are sent.
        self.held_bytes -= mem::take(&mut slot.held);
        if let Some(b) = &reply.bio {
            slot.held = b.sg.len_bytes();
        }
        slot.held += reply.extents.len() as u64;
        self.held_bytes += slot.held;
        slot.state = SlotState::Reply(reply);
        self.replies.push_back(idx as u32);
        true
    }

    /// The output waiting to be sent, as pieces for a vectored send
    /// (`writev`), without taking it: as many pieces as `out` holds and
    /// about `max_bytes` bytes, in order. Send any prefix of them, then
    /// call [`Connection::tx_advance`] with the number of bytes sent. Read
    /// data is handed out as the bio's own pages, so it is never copied
    /// here.
    pub fn tx_pieces<'a, const N: usize>(
        &'a mut self,
        out: &mut ArrayVec<TxPiece<'a>, N>,
        max_bytes: usize,
    ) {
        if self.closing == Some(Close::Hard) || out.is_full() || max_bytes == 0 {
            return;
        }
        // Headers of the next few replies, so several go out in one call.
        self.prepare_tx(out.remaining_capacity().min(64));
        let this: &'a Connection = self;
        let mut bytes = 0;
        let mut push = |out: &mut ArrayVec<TxPiece<'a>, N>, p: TxPiece<'a>| {
            bytes += p.len();
            out.push(p);
            !out.is_full() && bytes < max_bytes
        };
        if this.ctl_pos < this.ctl.len() && !push(out, TxPiece::Bytes(&this.ctl[this.ctl_pos..])) {
            return;
        }
        for cur in &this.sending {
            if cur.hdr_pos < cur.hdr_len
                && !push(out, TxPiece::Bytes(&cur.hdr[cur.hdr_pos..cur.hdr_len]))
            {
                return;
            }
            if cur.data_pos == cur.data_len {
                continue;
            }
            let Some(Slot {
                state: SlotState::Reply(rep),
                ..
            }) = this.slots.get(cur.slot as usize)
            else {
                continue;
            };
            match &rep.bio {
                Some(bio) => {
                    let mut skip = cur.data_pos;
                    for r in bio.sg.iter() {
                        let len = u64::from(r.len);
                        if skip >= len {
                            skip -= len;
                            continue;
                        }
                        let piece = TxPiece::Page(PageSlice {
                            page: &r.page,
                            offset: r.offset as usize + skip as usize,
                            len: (len - skip) as usize,
                        });
                        skip = 0;
                        if !push(out, piece) {
                            return;
                        }
                    }
                }
                None => {
                    let at = cur.data_pos as usize;
                    if let Some(src) = rep.extents.get(at..) {
                        if !push(out, TxPiece::Bytes(src)) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Records that the first `n` bytes of the output described by
    /// [`Connection::tx_pieces`] were sent.
    pub fn tx_advance(&mut self, mut n: usize) {
        if self.closing == Some(Close::Hard) {
            return;
        }
        self.active |= n > 0;
        let k = n.min(self.ctl_pending());
        self.advance_ctl(k);
        n -= k;
        while n > 0 {
            if self.sending.is_empty() && !self.prepare_tx(1) {
                break;
            }
            let Some(cur) = self.sending.front_mut() else {
                break;
            };
            let h = (cur.hdr_len - cur.hdr_pos).min(n);
            cur.hdr_pos += h;
            n -= h;
            let d = (cur.data_len - cur.data_pos).min(n as u64);
            cur.data_pos += d;
            n -= d as usize;
            if cur.hdr_pos == cur.hdr_len && cur.data_pos == cur.data_len {
                let slot = cur.slot;
                self.sending.pop_front();
                self.free_slot(slot as usize);
            }
        }
    }

    /// When the next input bytes are the payload of a write, the pages they
    /// belong in (at most `max_pieces` pieces), so the platform can receive
    /// straight into them (`readv`); returns how many bytes the pieces
    /// cover (0 when input must go through [`Connection::on_recv`]). Call
    /// [`Connection::rx_filled`] with the number of bytes placed.
    pub fn rx_pieces<'a, const N: usize>(&'a self, out: &mut ArrayVec<PageSlice<'a>, N>) -> usize {
        let Rx::WriteData { slot, got } = self.rx else {
            return 0;
        };
        if self.closing.is_some() {
            return 0;
        }
        let Some(Slot {
            state: SlotState::Receiving(sg),
            ..
        }) = self.slots.get(slot as usize)
        else {
            return 0;
        };
        let mut skip = u64::from(got);
        let mut bytes = 0;
        for r in sg.iter() {
            if out.is_full() {
                break;
            }
            let len = u64::from(r.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let piece = PageSlice {
                page: &r.page,
                offset: r.offset as usize + skip as usize,
                len: (len - skip) as usize,
            };
            skip = 0;
            bytes += piece.len;
            out.push(piece);
        }
        bytes
    }

    /// Records that `n` bytes of write payload were placed in the pages
    /// from [`Connection::rx_pieces`] (at most what they cover).
    pub fn rx_filled(&mut self, n: usize) {
        let Rx::WriteData { slot, got } = self.rx else {
            return;
        };
        let Some(s) = self.slots.get(slot as usize) else {
            return;
        };
        let n = (n as u64).min(u64::from(s.length - got)) as u32;
        self.active |= n > 0;
        let got = got + n;
        if got == s.length {
            self.finish_write(slot);
            self.rx = Rx::ReqHeader;
        } else {
            self.rx = Rx::WriteData { slot, got };
        }
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

    /// proto.md "Client flags": unknown flags close the connection.
    fn on_client_flags(&mut self) {
        let flags = u32::from_be_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]]);
        self.hdr_len = 0;
        if flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
            self.hard_close();
            return;
        }
        self.no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
        self.rx = Rx::OptHeader;
    }

    fn on_option_header(&mut self, exports: &[ExportInfo]) {
        let parsed = OptionRepr::parse(&OptionView::new_unchecked(
            &self.hdr[..OptionView::<&[u8]>::LEN],
        ));
        self.hdr_len = 0;
        let Ok(o) = parsed else {
            self.hard_close();
            return;
        };
        self.rx = Rx::OptHeader;
        if o.option == wire::OPT_SET_META_CONTEXT {
            // Replaces the earlier selection, even if it fails.
            self.meta = None;
        }
        let buffered = matches!(
            o.option,
            wire::OPT_EXPORT_NAME
                | wire::OPT_INFO
                | wire::OPT_GO
                | wire::OPT_LIST_META_CONTEXT
                | wire::OPT_SET_META_CONTEXT
        );
        if o.option == wire::OPT_EXPORT_NAME && (self.shutting_down || o.length > OPTION_DATA_MAX) {
            // NBD_OPT_EXPORT_NAME has no error reply: the session ends.
            self.hard_close();
            return;
        }
        if self.shutting_down && o.option != wire::OPT_ABORT {
            self.skip_option(o.option, o.length, wire::REP_ERR_SHUTDOWN);
            return;
        }
        if buffered && o.length > OPTION_DATA_MAX {
            // Skipped unread: an option this long is refused, not buffered.
            self.skip_option(o.option, o.length, wire::REP_ERR_TOO_BIG);
            return;
        }
        match o.option {
            _ if buffered => {
                self.opt_buf.clear();
                if o.length == 0 {
                    self.finish_option(exports, o.option);
                } else {
                    self.rx = Rx::OptData {
                        option: o.option,
                        len: o.length as usize,
                    };
                }
            }
            // proto.md NBD_OPT_ABORT: the server SHOULD ignore any data.
            wire::OPT_ABORT => self.skip_option(o.option, o.length, wire::REP_ACK),
            wire::OPT_LIST | wire::OPT_STRUCTURED_REPLY if o.length == 0 => {
                self.finish_option(exports, o.option)
            }
            // "The client MUST NOT send any additional data with the option".
            wire::OPT_LIST | wire::OPT_STRUCTURED_REPLY => {
                self.skip_option(o.option, o.length, wire::REP_ERR_INVALID)
            }
            // Unknown options, and STARTTLS (NOTLS mode).
            _ => self.skip_option(o.option, o.length, wire::REP_ERR_UNSUP),
        }
    }

    fn skip_option(&mut self, option: u32, len: u32, reply: u32) {
        if len == 0 {
            self.end_skipped_option(option, reply);
        } else {
            self.rx = Rx::OptSkip {
                option,
                left: len,
                reply,
            };
        }
    }

    fn end_skipped_option(&mut self, option: u32, reply: u32) {
        self.option_reply(option, reply, &[]);
        if option == wire::OPT_ABORT {
            self.rx = Rx::Done;
            self.closing = Some(Close::Soft);
        } else {
            self.rx = Rx::OptHeader;
        }
    }

    fn finish_option(&mut self, exports: &[ExportInfo], option: u32) {
        let data = mem::take(&mut self.opt_buf);
        self.rx = Rx::OptHeader;
        match option {
            wire::OPT_EXPORT_NAME => self.opt_export_name(exports, &data),
            wire::OPT_INFO | wire::OPT_GO => self.opt_info_go(exports, option, &data),
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.opt_meta_context(exports, option, &data)
            }
            wire::OPT_LIST => {
                for e in exports {
                    let name = clamp_str(&e.name);
                    let desc = clamp_str(&e.description);
                    let len = (name.len() as u32).to_be_bytes();
                    self.option_reply(option, wire::REP_SERVER, &[&len, name, desc]);
                }
                self.option_reply(option, wire::REP_ACK, &[]);
            }
            wire::OPT_STRUCTURED_REPLY => {
                self.structured = true;
                self.option_reply(option, wire::REP_ACK, &[]);
            }
            _ => self.option_reply(option, wire::REP_ERR_UNSUP, &[]),
        }
        if self.selected.is_none() && self.closing.is_none() {
            // Keep the allocation for the next option.
            self.opt_buf = data;
            self.opt_buf.clear();
        }
    }

    /// proto.md NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT, for
    /// the one context served, `base:allocation`. Both need structured
    /// replies first (`NBD_REP_ERR_INVALID` otherwise). LIST answers an
    /// empty query list, `base:` and `base:allocation`; SET selects
    /// `base:allocation` when asked for by name. Queries in other
    /// namespaces are ignored, as the spec requires.
    fn opt_meta_context(&mut self, exports: &[ExportInfo], option: u32, data: &[u8]) {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if !self.structured {
            self.option_reply(option, wire::REP_ERR_INVALID, &[]);
            return;
        }
        let Some(q) = parse_meta_request(data) else {
            self.option_reply(option, wire::REP_ERR_INVALID, &[]);
            return;
        };
        let Some(i) = find_export(exports, q.name) else {
            self.option_reply(option, wire::REP_ERR_UNKNOWN, &[]);
            return;
        };
        let found = if set {
            q.allocation
        } else {
            q.count == 0 || q.allocation || q.base_wildcard
        };
        if found {
            // The id is reserved (zero) in LIST replies.
            let id: u32 = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            self.option_reply(
                option,
                wire::REP_META_CONTEXT,
                &[&id.to_be_bytes(), wire::BASE_ALLOCATION.as_bytes()],
            );
            if set {
                self.meta = Some(i);
            }
        }
        self.option_reply(option, wire::REP_ACK, &[]);
    }

    /// proto.md NBD_OPT_EXPORT_NAME: an unknown export MUST end the session.
    fn opt_export_name(&mut self, exports: &[ExportInfo], name: &[u8]) {
        let Some(i) = find_export(exports, name) else {
            self.hard_close();
            return;
        };
        let sel = self.select(exports, i);
        let r = ExportNameReplyRepr {
            size: sel.size,
            flags: exports[i].transmission_flags(self.structured),
            zeroes: !self.no_zeroes,
        };
        let at = self.ctl_grow(r.buffer_len());
        r.emit(&mut self.ctl[at..]);
        self.rx = Rx::ReqHeader;
    }

    /// proto.md NBD_OPT_INFO / NBD_OPT_GO.
    fn opt_info_go(&mut self, exports: &[ExportInfo], option: u32, data: &[u8]) {
        let Some(req) = parse_info_request(data) else {
            self.option_reply(option, wire::REP_ERR_INVALID, &[]);
            return;
        };
        let Some(i) = find_export(exports, req.name) else {
            self.option_reply(option, wire::REP_ERR_UNKNOWN, &[]);
            return;
        };
        let e = &exports[i];
        let limits = e.block_limits(self.cfg.max_payload);

        let mut export = [0u8; 12];
        export[0..2].copy_from_slice(&wire::INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&e.size_bytes.to_be_bytes());
        export[10..12].copy_from_slice(&e.transmission_flags(self.structured).to_be_bytes());
        self.option_reply(option, wire::REP_INFO, &[&export]);
        if req.name_wanted {
            let name = clamp_str(&e.name);
            self.option_reply(
                option,
                wire::REP_INFO,
                &[&wire::INFO_NAME.to_be_bytes(), name],
            );
        }
        if req.description_wanted {
            let desc = clamp_str(&e.description);
            self.option_reply(
                option,
                wire::REP_INFO,
                &[&wire::INFO_DESCRIPTION.to_be_bytes(), desc],
            );
        }
        // Sent whether asked for or not: the server enforces these limits
        // (proto.md "Size constraints"; unrequested info is allowed).
        let mut bs = [0u8; 14];
        bs[0..2].copy_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        bs[2..6].copy_from_slice(&limits.min_block.to_be_bytes());
        bs[6..10].copy_from_slice(&limits.preferred_block.to_be_bytes());
        bs[10..14].copy_from_slice(&limits.max_payload.to_be_bytes());
        self.option_reply(option, wire::REP_INFO, &[&bs]);
        self.option_reply(option, wire::REP_ACK, &[]);
        if option == wire::OPT_GO {
            self.select(exports, i);
            self.rx = Rx::ReqHeader;
        }
    }

    fn select(&mut self, exports: &[ExportInfo], i: usize) -> Selected {
        let e = &exports[i];
        let sel = Selected {
            index: i,
            size: e.size_bytes,
            limits: e.block_limits(self.cfg.max_payload),
            read_only: e.read_only,
            can_flush: e.can_flush && !e.read_only,
            can_trim: e.can_trim && !e.read_only,
            can_write_zeroes: e.can_write_zeroes && !e.read_only,
            can_fast_zero: e.can_write_zeroes && e.can_trim && !e.read_only,
            allocation: self.structured && self.meta == Some(i),
        };
        self.selected = Some(sel);
        self.opt_buf = Vec::new();
        sel
    }

    fn on_request_header(&mut self) {
        let parsed = RequestRepr::parse(&RequestView::new_unchecked(&self.hdr[..]));
        self.hdr_len = 0;
        // proto.md: a violation of a mandatory condition MAY end the session;
        // after a bad magic the stream cannot be resynchronised.
        let (Ok(r), Some(sel)) = (parsed, self.selected) else {
            self.hard_close();
            return;
        };
        if self.shutting_down && r.command != Command::Disc {
            let f = fail(wire::ESHUTDOWN, "the server is shutting down");
            if r.command == Command::Write {
                self.refuse_write(&r, f);
            } else {
                self.queue_error(&r, f);
            }
            return;
        }
        let fua = wire::CMD_FLAG_FUA;
        match r.command {
            Command::Disc => {
                // No reply; finish once outstanding replies are sent.
                self.rx = Rx::Done;
                self.closing = Some(Close::Soft);
            }
            Command::Read => match self.check_read(&sel, &r) {
                Err(f) => self.queue_error(&r, f),
                Ok(()) => {
                    let sg = self.alloc_sg(r.length as usize);
                    let bio = Bio::with_data(BioCmd::Read, r.offset, sg);
                    self.queue_bio(&r, bio, u64::from(r.length));
                }
            },
            Command::Write => self.start_write(&sel, &r),
            Command::Flush => match check_flags(&r, fua) {
                Err(f) => self.queue_error(&r, f),
                Ok(()) if !sel.can_flush => {
                    self.queue_error(&r, fail(wire::EINVAL, "flush is not supported"))
                }
                Ok(()) => self.queue_bio(&r, Bio::flush(), 0),
            },
            Command::Trim => {
                let checked = check_flags(&r, fua)
                    .and_then(|()| check_writable(&sel))
                    .and_then(|()| require(sel.can_trim, wire::EINVAL, "trim is not supported"))
                    .and_then(|()| check_range(&sel, &r, wire::EINVAL));
                self.queue_no_data(&r, checked, BioCmd::Discard);
            }
            Command::WriteZeroes => {
                let fast = if sel.can_fast_zero {
                    wire::CMD_FLAG_FAST_ZERO
                } else {
                    0
                };
                let checked = check_flags(&r, fua | wire::CMD_FLAG_NO_HOLE | fast)
                    .and_then(|()| check_writable(&sel))
                    .and_then(|()| {
                        require(
                            sel.can_write_zeroes,
                            wire::EINVAL,
                            "write zeroes is not supported",
                        )
                    })
                    .and_then(|()| check_range(&sel, &r, wire::ENOSPC))
                    .and_then(|()| {
                        // proto.md NBD_CMD_FLAG_FAST_ZERO: fail quickly with
                        // ENOTSUP unless it is faster than a write. Zeroing
                        // that must stay allocated may write every byte.
                        let both = wire::CMD_FLAG_FAST_ZERO | wire::CMD_FLAG_NO_HOLE;
                        require(
                            r.flags & both != both,
                            wire::ENOTSUP,
                            "zeroing without holes is not known to be fast",
                        )
                    });
                match checked {
                    Err(f) => self.queue_error(&r, f),
                    Ok(()) => {
                        let mut bio =
                            Bio::no_data(BioCmd::WriteZeroes, r.offset, u64::from(r.length));
                        bio.no_hole = r.flags & wire::CMD_FLAG_NO_HOLE != 0;
                        self.queue_bio(&r, bio, 0);
                    }
                }
            }
            // proto.md NBD_CMD_CACHE: a hint; there is no cache to warm, so
            // a valid request is answered at once.
            Command::Cache => {
                match check_flags(&r, fua).and_then(|()| check_range(&sel, &r, wire::EINVAL)) {
                    Err(f) => self.queue_error(&r, f),
                    Ok(()) => {
                        let idx = self.alloc_slot(&r);
                        self.slots[idx as usize].state = SlotState::Reply(Reply::default());
                        self.replies.push_back(idx);
                    }
                }
            }
            Command::BlockStatus => {
                let checked = check_flags(&r, fua | wire::CMD_FLAG_REQ_ONE)
                    .and_then(|()| {
                        // proto.md "Metadata querying": EINVAL without a
                        // selected context (which needs structured replies).
                        require(
                            sel.allocation && self.structured,
                            wire::EINVAL,
                            "no metadata context was selected",
                        )
                    })
                    .and_then(|()| require(r.length > 0, wire::EINVAL, "zero-length query"))
                    .and_then(|()| check_range(&sel, &r, wire::EINVAL));
                self.queue_no_data(&r, checked, BioCmd::GetAllocation);
            }
            // proto.md "Error values": EINVAL for an unknown command.
            Command::Unknown(_) => {
                self.queue_error(&r, fail(wire::EINVAL, "command not supported"))
            }
        }
    }

    fn check_read(&self, sel: &Selected, r: &RequestRepr) -> Result<(), Fail> {
        // NBD_CMD_FLAG_DF is valid only where NBD_FLAG_SEND_DF was sent,
        // that is with structured replies; every read is one chunk anyway.
        let df = if self.structured {
            wire::CMD_FLAG_DF
        } else {
            0
        };
        check_flags(r, wire::CMD_FLAG_FUA | df)?;
        if r.length > sel.limits.max_payload {
            // proto.md NBD_CMD_READ: with structured replies a large read may
            // be rejected with EOVERFLOW; simple replies use EINVAL.
            let errno = if self.structured {
                wire::EOVERFLOW
            } else {
                wire::EINVAL
            };
            return Err(fail(errno, "read longer than the maximum payload"));
        }
        check_range(sel, r, wire::EINVAL)
    }

    /// A write's header: check it, then either take its payload into fresh
    /// pages or reply with the error and skip the payload unread.
    fn start_write(&mut self, sel: &Selected, r: &RequestRepr) {
        let checked = check_flags(r, wire::CMD_FLAG_FUA)
            .and_then(|()| check_writable(sel))
            .and_then(|()| {
                require(
                    r.length <= sel.limits.max_payload,
                    wire::EINVAL,
                    "write longer than the maximum payload",
                )
            })
            .and_then(|()| check_range(sel, r, wire::ENOSPC));
        if let Err(f) = checked {
            self.refuse_write(r, f);
            return;
        }
        let idx = self.alloc_slot(r);
        let held = u64::from(r.length);
        self.slots[idx as usize].held = held;
        self.held_bytes += held;
        let sg = self.alloc_sg(r.length as usize);
        self.slots[idx as usize].state = SlotState::Receiving(sg);
        if r.length == 0 {
            self.finish_write(idx);
        } else {
            self.rx = Rx::WriteData { slot: idx, got: 0 };
        }
    }

    /// Answers a write with an error, skipping its payload unread. The reply
    /// goes out only after the payload: a client may not expect a reply to
    /// a request it has not finished sending.
    fn refuse_write(&mut self, r: &RequestRepr, f: Fail) {
        let slot = self.alloc_error(r, f);
        if r.length > 0 {
            self.rx = Rx::Skip {
                left: r.length,
                slot,
            };
        } else {
            self.replies.push_back(slot);
        }
    }

    fn write_data(&mut self, idx: u32, got: u32, input: &[u8]) -> usize {
        let Some(slot) = self.slots.get(idx as usize) else {
            self.hard_close();
            return 0;
        };
        let SlotState::Receiving(sg) = &slot.state else {
            self.hard_close();
            return 0;
        };
        let k = ((slot.length - got) as usize).min(input.len());
        // The only copy of write data: receive buffer → pages.
        if sg
            .copy_from_slice(u64::from(got), &input[..k], &self.counters)
            .is_err()
        {
            self.hard_close();
            return 0;
        }
        let got = got + k as u32;
        if got == slot.length {
            self.finish_write(idx);
            self.rx = Rx::ReqHeader;
        } else {
            self.rx = Rx::WriteData { slot: idx, got };
        }
        k
    }

    fn finish_write(&mut self, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if let SlotState::Receiving(sg) = mem::take(&mut slot.state) {
            let mut bio = Bio::with_data(BioCmd::Write, slot.offset, sg);
            bio.fua = slot.flags & wire::CMD_FLAG_FUA != 0;
            slot.state = SlotState::Ready(bio);
            self.ready.push_back(idx);
        }
    }

    fn queue_no_data(&mut self, r: &RequestRepr, checked: Result<(), Fail>, cmd: BioCmd) {
        match checked {
            Err(f) => self.queue_error(r, f),
            Ok(()) => self.queue_bio(r, Bio::no_data(cmd, r.offset, u64::from(r.length)), 0),
        }
    }

    fn queue_bio(&mut self, r: &RequestRepr, mut bio: Bio, held: u64) {
        bio.fua = r.flags & wire::CMD_FLAG_FUA != 0 && bio.cmd.is_write();
        let idx = self.alloc_slot(r);
        let slot = &mut self.slots[idx as usize];
        slot.held = held;
        slot.state = SlotState::Ready(bio);
        self.held_bytes += held;
        self.ready.push_back(idx);
    }

    fn queue_error(&mut self, r: &RequestRepr, f: Fail) {
        let idx = self.alloc_error(r, f);
        self.replies.push_back(idx);
    }

    /// A slot holding an error reply, not yet queued for sending.
    fn alloc_error(&mut self, r: &RequestRepr, f: Fail) -> u32 {
        let idx = self.alloc_slot(r);
        self.slots[idx as usize].state = SlotState::Reply(Reply {
            error: f.errno,
            message: f.message,
            ..Reply::default()
        });
        idx
    }

    fn can_start_request(&self) -> bool {
        self.live < self.cfg.max_in_flight && self.held_bytes < self.buffer_limit
    }

    // ---- slots ----

    fn alloc_slot(&mut self, r: &RequestRepr) -> u32 {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        *slot = Slot {
            cookie: r.cookie,
            command: r.command,
            offset: r.offset,
            length: r.length,
            flags: r.flags,
            held: 0,
            state: SlotState::Free,
        };
        self.live += 1;
        idx
    }

    fn free_slot(&mut self, idx: usize) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        if matches!(slot.state, SlotState::Free) {
            return;
        }
        self.held_bytes -= mem::take(&mut slot.held);
        let state = mem::take(&mut slot.state);
        self.live -= 1;
        self.free.push(idx as u32);
        if let SlotState::Reply(Reply { bio: Some(bio), .. }) = state {
            if self.closing.is_none() {
                self.recycle(bio.sg);
            }
        }
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
        self.opt_buf = Vec::new();
        for i in 0..self.slots.len() {
            if !matches!(self.slots[i].state, SlotState::Submitted) {
                self.free_slot(i);
            }
        }
    }

    // ---- output ----

    fn ctl_pending(&self) -> usize {
        self.ctl.len() - self.ctl_pos
    }

    /// Marks `k` control bytes as sent.
    fn advance_ctl(&mut self, k: usize) {
        self.ctl_pos += k;
        if self.ctl_pos >= self.ctl.len() {
            self.ctl.clear();
            self.ctl_pos = 0;
        }
    }

    /// Builds the headers of up to `want` queued replies; false if none is
    /// being sent.
    fn prepare_tx(&mut self, want: usize) -> bool {
        while self.sending.len() < want {
            let Some(idx) = self.replies.pop_front() else {
                break;
            };
            if let Some(c) = self.start_reply(idx) {
                self.sending.push_back(c);
            }
        }
        !self.sending.is_empty()
    }

    /// Fresh pages for `len` bytes, from the pool where it has some. A
    /// reused page holds old data; every user overwrites it whole (a
    /// write's payload, a successful read's data).
    fn alloc_sg(&mut self, len: usize) -> SgList {
        let pages = len.div_ceil(PAGE_SIZE);
        let mut sg = match self.sg_pool.iter().position(|s| s.capacity() >= pages) {
            Some(i) => self.sg_pool.swap_remove(i),
            None => SgList::with_capacity(pages),
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(PAGE_SIZE);
            let page = self.pool.pop().unwrap_or_else(Page::new_zeroed);
            sg.push(PageRef {
                page,
                offset: 0,
                len: n as u32,
            });
            left -= n;
        }
        sg
    }

    /// Keeps the pages of a finished request for later ones, when nothing
    /// else holds them and the pool has room; and the list itself, when it
    /// is a large one.
    fn recycle(&mut self, mut sg: SgList) {
        let cap = (self.buffer_limit.min(POOL_MAX_BYTES) / PAGE_SIZE as u64) as usize;
        for r in sg.iter() {
            if self.pool.len() >= cap {
                break;
            }
            if r.page.share_count() == 1 {
                self.pool.push(r.page.clone());
            }
        }
        if sg.capacity() > 4 && self.sg_pool.len() < SG_POOL_LISTS {
            sg.clear();
            self.sg_pool.push(sg);
        }
    }

    /// Grows the control buffer by `n` zero bytes; returns where they start.
    fn ctl_grow(&mut self, n: usize) -> usize {
        let at = self.ctl.len();
        self.ctl.resize(at + n, 0);
        at
    }

    /// Queues an option reply whose data is the concatenation of `parts`.
    fn option_reply(&mut self, option: u32, reply_type: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let h = OptionReplyRepr {
            option,
            reply_type,
            length: u32::try_from(len).unwrap_or(u32::MAX),
        };
        let at = self.ctl_grow(h.buffer_len());
        h.emit(&mut OptionReplyView::new_unchecked(&mut self.ctl[at..]));
        for p in parts {
            self.ctl.extend_from_slice(p);
        }
    }

    /// Builds the header of the reply in slot `idx`.
    fn start_reply(&self, idx: u32) -> Option<TxCur> {
        let slot = self.slots.get(idx as usize)?;
        let SlotState::Reply(rep) = &slot.state else {
            return None;
        };
        let mut cur = TxCur {
            slot: idx,
            hdr: [0; TX_HDR_MAX],
            hdr_len: 0,
            hdr_pos: 0,
            data_len: 0,
            data_pos: 0,
        };
        let chunk_len = ChunkView::<&[u8]>::LEN;
        if rep.error != 0 && self.structured {
            // proto.md NBD_REPLY_TYPE_ERROR: u32 error, u16 message length,
            // message; the only chunk, so it carries NBD_REPLY_FLAG_DONE.
            let msg = &rep.message.as_bytes()[..rep.message.len().min(MESSAGE_MAX)];
            ChunkRepr {
                flags: wire::REPLY_FLAG_DONE,
                chunk_type: wire::REPLY_TYPE_ERROR,
                cookie: slot.cookie,
                length: 6 + msg.len() as u32,
            }
            .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
            cur.hdr[chunk_len..chunk_len + 4].copy_from_slice(&rep.error.to_be_bytes());
            cur.hdr[chunk_len + 4..chunk_len + 6]
                .copy_from_slice(&(msg.len() as u16).to_be_bytes());
            cur.hdr[chunk_len + 6..chunk_len + 6 + msg.len()].copy_from_slice(msg);
            cur.hdr_len = chunk_len + 6 + msg.len();
        } else if rep.error == 0 && slot.command == Command::BlockStatus {
            // proto.md NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id, then the
            // descriptors; one chunk, as one context is ever selected.
            ChunkRepr {
                flags: wire::REPLY_FLAG_DONE,
                chunk_type: wire::REPLY_TYPE_BLOCK_STATUS,
                cookie: slot.cookie,
                length: 4 + rep.extents.len() as u32,
            }
            .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
            cur.hdr[chunk_len..chunk_len + 4].copy_from_slice(&ALLOCATION_CONTEXT_ID.to_be_bytes());
            cur.hdr_len = chunk_len + 4;
            cur.data_len = rep.extents.len() as u64;
        } else if rep.error == 0 && slot.command == Command::Read && self.structured {
            if slot.length == 0 {
                ChunkRepr {
                    flags: wire::REPLY_FLAG_DONE,
                    chunk_type: wire::REPLY_TYPE_NONE,
                    cookie: slot.cookie,
                    length: 0,
                }
                .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
                cur.hdr_len = chunk_len;
            } else {
                // One data chunk, final: the data is already read, so no error
                // can come up while it is sent (proto.md "Structured replies").
                ChunkRepr {
                    flags: wire::REPLY_FLAG_DONE,
                    chunk_type: wire::REPLY_TYPE_OFFSET_DATA,
                    cookie: slot.cookie,
                    length: slot.length.saturating_add(8),
                }
                .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
                cur.hdr[chunk_len..chunk_len + 8].copy_from_slice(&slot.offset.to_be_bytes());
                cur.hdr_len = chunk_len + 8;
                cur.data_len = u64::from(slot.length);
            }
        } else {
            SimpleReplyRepr {
                error: rep.error,
                cookie: slot.cookie,
            }
            .emit(&mut SimpleReplyView::new_unchecked(&mut cur.hdr[..]));
            cur.hdr_len = SimpleReplyView::<&[u8]>::LEN;
            if rep.error == 0 && slot.command == Command::Read {
                cur.data_len = u64::from(slot.length);
            }
        }
        Some(cur)
    }
}

// ---- request checks (proto.md "Size constraints", "Error values") ----

/// Unknown or inapplicable command flags → EINVAL. FUA is accepted on every
/// command (proto.md "Command flags") and acted on for writes.
fn check_flags(r: &RequestRepr, allowed: u16) -> Result<(), Fail> {
    if r.flags & !allowed != 0 {
        Err(fail(wire::EINVAL, "unsupported command flags"))
    } else {
        Ok(())
    }
}

fn check_writable(sel: &Selected) -> Result<(), Fail> {
    require(!sel.read_only, wire::EPERM, "export is read-only")
}

/// `Ok` if `cond` holds, else the error.
fn require(cond: bool, errno: u32, message: &'static str) -> Result<(), Fail> {
    if cond {
        Ok(())
    } else {
        Err(fail(errno, message))
    }
}

/// Bounds (with `past_end` as the errno) and minimum-block alignment.
fn check_range(sel: &Selected, r: &RequestRepr, past_end: u32) -> Result<(), Fail> {
    match r.offset.checked_add(u64::from(r.length)) {
        Some(end) if end <= sel.size => {}
        _ => return Err(fail(past_end, "request goes past the end of the export")),
    }
    let mb = u64::from(sel.limits.min_block.max(1));
    if !r.offset.is_multiple_of(mb) || !u64::from(r.length).is_multiple_of(mb) {
        return Err(fail(
            wire::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    Ok(())
}

/// A bio error as an NBD error value: the POSIX errno when NBD defines it,
/// with ENOSPC only for writes past the end (EINVAL otherwise), EINVAL for
/// an unsupported operation (proto.md reserves ENOTSUP for fast zeroes),
/// and EIO for anything NBD has no value for (a vanished provider).
fn errno_for(command: Command, e: BioError) -> u32 {
    match e {
        BioError::OutOfRange if matches!(command, Command::Write | Command::WriteZeroes) => {
            wire::ENOSPC
        }
        BioError::OutOfRange | BioError::NotSupported => wire::EINVAL,
        _ => match u32::try_from(e.errno()) {
            Ok(
                v @ (wire::EPERM
                | wire::EIO
                | wire::ENOMEM
                | wire::EINVAL
                | wire::ENOSPC
                | wire::EOVERFLOW
                | wire::ESHUTDOWN),
            ) => v,
            _ => wire::EIO,
        },
    }
}

fn message_for(e: BioError) -> &'static str {
    match e {
        BioError::Io => "input/output error",
        BioError::Invalid => "invalid request",
        BioError::OutOfRange => "request goes past the end of the device",
        BioError::Orphaned => "the device is gone",
        BioError::Access => "permission denied",
        BioError::NotSupported => "operation not supported",
        BioError::NoMemory => "out of memory",
    }
}

/// `base:allocation` descriptors for an `NBD_REPLY_TYPE_BLOCK_STATUS`
/// chunk (u32 length, u32 flags each) from the runs a provider reported:
/// cut to the request's `length`, adjacent runs of equal status merged,
/// only the first with `NBD_CMD_FLAG_REQ_ONE`, at most
/// [`MAX_REPLY_EXTENTS`]. A range the provider said nothing about is one
/// data descriptor (flags 0: allocated, contents unknown).
fn descriptors(runs: &[Extent], length: u32, cmd_flags: u16) -> Vec<u8> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = length;
    for e in runs {
        if left == 0 {
            break;
        }
        let n = u32::try_from(e.length).unwrap_or(u32::MAX).min(left);
        if n == 0 {
            continue;
        }
        let hole = if e.hole { wire::STATE_HOLE } else { 0 };
        let status = hole | if e.zero { wire::STATE_ZERO } else { 0 };
        let count = out.len();
        match out.last_mut() {
            Some(last) if last.1 == status => last.0 += n,
            _ if count == MAX_REPLY_EXTENTS => break,
            _ => out.push((n, status)),
        }
        left -= n;
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    if cmd_flags & wire::CMD_FLAG_REQ_ONE != 0 {
        out.truncate(1);
    }
    let mut bytes = Vec::with_capacity(out.len() * 8);
    for (n, status) in out {
        bytes.extend_from_slice(&n.to_be_bytes());
        bytes.extend_from_slice(&status.to_be_bytes());
    }
    bytes
}

// ---- option helpers ----

/// An export by name; the empty name selects the default export, index 0
/// (proto.md NBD_OPT_EXPORT_NAME).
fn find_export(exports: &[ExportInfo], name: &[u8]) -> Option<usize> {
    exports
        .iter()
        .position(|e| e.name.as_bytes() == name)
        .or_else(|| (name.is_empty() && !exports.is_empty()).then_some(0))
}

/// A string cut to [`STRING_MAX`] bytes on a character boundary.
fn clamp_str(s: &str) -> &[u8] {
    let mut n = s.len().min(STRING_MAX);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

/// What the data of a meta context option asks for.
struct MetaRequest<'a> {
    name: &'a [u8],
    /// Number of queries.
    count: u32,
    /// `base:allocation` was asked for.
    allocation: bool,
    /// `base:` (every context in the namespace) was asked for.
    base_wildcard: bool,
}

/// proto.md NBD_OPT_LIST_META_CONTEXT: u32 name length, name, u32 query
/// count, then each query as u32 length and string. None if malformed (a
/// length past the data, a string over [`STRING_MAX`], data left over).
fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    fn take_str(data: &[u8]) -> Option<(&[u8], &[u8])> {
        let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        if len > STRING_MAX {
            return None;
        }
        let s = data.get(4..4usize.checked_add(len)?)?;
        Some((s, &data[4 + len..]))
    }
    let (name, rest) = take_str(data)?;
    let count = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
    let mut rest = &rest[4..];
    let mut req = MetaRequest {
        name,
        count,
        allocation: false,
        base_wildcard: false,
    };
    for _ in 0..count {
        let (q, r) = take_str(rest)?;
        req.allocation |= q == wire::BASE_ALLOCATION.as_bytes();
        req.base_wildcard |= q == b"base:";
        rest = r;
    }
    rest.is_empty().then_some(req)
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
struct InfoRequest<'a> {
    name: &'a [u8],
    name_wanted: bool,
    description_wanted: bool,
}

/// proto.md NBD_OPT_INFO: u32 name length (≤ data length − 6), name,
/// u16 count, count × u16 information requests. None if malformed.
fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > data.len().checked_sub(6)? || name_len > STRING_MAX {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = data.get(4 + name_len..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let mut req = InfoRequest {
        name,
        name_wanted: false,
        description_wanted: false,
    };
    for item in list.chunks_exact(2) {
        match u16::from_be_bytes([item[0], item[1]]) {
            wire::INFO_NAME => req.name_wanted = true,
            wire::INFO_DESCRIPTION => req.description_wanted = true,
            // INFO_EXPORT and INFO_BLOCK_SIZE are always sent; others ignored.
            _ => {}
        }
    }
    Some(req)
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
}
