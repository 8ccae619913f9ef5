//! The one interface between the service and a protocol engine: a
//! [`Session`] per connection, whatever the protocol.
//!
//! ```text
//!   transport (std socket, smoltcp socket)
//!      │ bytes ─────▶ recv()            rx_pieces() ◀── write payload lands
//!      │                                    │            straight in pages
//!      │ ◀──────── tx_pieces(): headers as bytes, read data as pages
//!      ▼
//!   Session ── next_work(): Io (a bio for an export) | Control (a request
//!      ▲                     for the management API)
//!      └──── complete(cookie, bio, result) | respond(response)
//! ```
//!
//! A session is sans-I/O: it never touches a socket, a clock or the stack.
//! The service hands it received bytes and takes its output as pieces;
//! [`copy_in`] and [`copy_out`] are the copying transport (smoltcp's
//! rings, tests), a vectored transport (`readv`/`writev`) uses the pieces
//! directly. Either way the same engine code runs.
//!
//! Split-phase rules (as Tock's): work taken with [`Session::next_work`]
//! is answered exactly once, later, by [`Session::complete`] or
//! [`Session::respond`], never from inside another call.
//!
//! **Memory.** Payload pages are memory every session draws on, so the
//! service keeps one budget for all of them, whatever the protocol. A
//! session reports what it holds ([`Session::budget_held`]); once the
//! header of a request that needs pages has arrived it asks before it
//! allocates them ([`Session::budget_wanted`]) and takes no more input
//! until the service admits it ([`Session::budget_grant`]): the rest stays
//! in the socket, which is the backpressure. An admitted request whose
//! pages cannot be had (the heap is exhausted) keeps waiting, and is
//! admitted again later; nothing panics.

use alloc::string::String;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use geom::bio::{Bio, BioResult};
use geom::page::{DataCounters, Page};

/// Most pieces handed out by one [`Session::rx_pieces`] or
/// [`Session::tx_pieces`] call (one vectored system call's worth).
pub const MAX_PIECES: usize = 512;

/// A byte range of a bio page handed to the transport: a vectored
/// transport moves the bytes by the page's address, as a device would
/// (after lending the page); a copying one maps it.
#[derive(Clone, Copy, Debug)]
pub struct PageSlice<'a> {
    /// The page.
    pub page: &'a Page,
    /// First byte within the page.
    pub offset: usize,
    /// Number of bytes.
    pub len: usize,
}

/// One piece of a session's output.
#[derive(Clone, Copy, Debug)]
pub enum TxPiece<'a> {
    /// Bytes the engine holds (headers, option replies, descriptors).
    Bytes(&'a [u8]),
    /// Read data, in the bio's page.
    Page(PageSlice<'a>),
}

impl TxPiece<'_> {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            TxPiece::Bytes(b) => b.len(),
            TxPiece::Page(p) => p.len,
        }
    }

    /// True if it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pages the next input belongs in.
pub type RxPieces<'a> = ArrayVec<PageSlice<'a>, MAX_PIECES>;
/// Output waiting to be sent.
pub type TxPieces<'a> = ArrayVec<TxPiece<'a>, MAX_PIECES>;

/// What a protocol may know about one export; the index of an export in
/// the slice handed to [`Session::recv`] is its export id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients ask for (the first export is also the default, `""`).
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Writes, trims and write-zeroes are refused (NBD: `NBD_EPERM`).
    pub read_only: bool,
    /// The provider makes writes stable on FLUSH (and honours FUA).
    pub can_flush: bool,
    /// The provider accepts DISCARD (NBD's `NBD_CMD_TRIM`).
    pub can_trim: bool,
    /// The provider accepts WRITE_ZEROES.
    pub can_write_zeroes: bool,
    /// Minimum block size in bytes: a power of two ≤ 64 KiB (else 1 is used).
    pub min_block: u32,
    /// Preferred block size in bytes: a power of two ≥ max(min_block, 512)
    /// (else max(min_block, 4096) is used).
    pub preferred_block: u32,
    /// Largest payload in bytes (0: no limit beyond the connection's).
    pub max_block: u32,
    /// Who may use it; open (the default) for protocols without access
    /// control, such as NBD.
    pub access: ExportAccess,
    /// The service keeps the export's persistent state through restarts
    /// ([`Work::Save`]; iSCSI: persistent reservations with APTPL).
    pub keeps_state: bool,
}

impl ExportInfo {
    /// A memory disk as tests, fuzzers and tools see one: `size_bytes`,
    /// writable, flushing, trimming and writing zeroes, 512-byte blocks
    /// (4 KiB preferred), payloads up to 1 MiB, open to anyone, keeping
    /// no state. Other exports change fields of it.
    pub fn md(name: &str, size_bytes: u64) -> ExportInfo {
        ExportInfo {
            name: String::from(name),
            description: String::from("md"),
            size_bytes,
            read_only: false,
            can_flush: true,
            can_trim: true,
            can_write_zeroes: true,
            min_block: 512,
            preferred_block: 4096,
            max_block: 1 << 20,
            access: ExportAccess::default(),
            keeps_state: false,
        }
    }
}

/// Who may use an export (iSCSI: RFC 7143 §12.1.3 CHAP, and the
/// initiator names allowed). The default lets anyone in unauthenticated.
///
/// Its `Debug` form names the users but never prints a secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExportAccess {
    /// CHAP the initiator must pass: (user name, secret). `None`: no
    /// authentication (AuthMethod=None).
    pub chap: Option<(String, String)>,
    /// Mutual CHAP, only with `chap`: the (user name, secret) the target
    /// answers the initiator's challenge with.
    pub mutual: Option<(String, String)>,
    /// Initiator names (iqn./eui./naa.) allowed to log in, lowercase;
    /// empty: any.
    pub initiators: Vec<String>,
}

impl ExportAccess {
    /// True when anyone may log in, unauthenticated.
    pub fn is_open(&self) -> bool {
        self.chap.is_none() && self.initiators.is_empty()
    }

    /// True when `initiator` (an initiator name) may log in, before any
    /// authentication; names compare as lowercase (RFC 3722's stringprep
    /// folds case).
    pub fn allows_initiator(&self, initiator: &str) -> bool {
        self.initiators.is_empty()
            || self
                .initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }
}

impl core::fmt::Debug for ExportAccess {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let user = |c: &Option<(String, String)>| c.as_ref().map(|(u, _)| u.clone());
        f.debug_struct("ExportAccess")
            .field("chap_user", &user(&self.chap))
            .field("mutual_user", &user(&self.mutual))
            .field("initiators", &self.initiators)
            .finish_non_exhaustive()
    }
}

/// A request for the management API (from the HTTP engine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The body.
    pub body: Vec<u8>,
    /// The credential the client presented (`Authorization: Bearer …`).
    pub bearer: Option<String>,
}

/// The answer to a [`ControlRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlResponse {
    /// Status code (HTTP's).
    pub status: u16,
    /// Media type of the body.
    pub content_type: &'static str,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl ControlResponse {
    /// A response with a body of the given type.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        ControlResponse {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text error response.
    pub fn error(status: u16, message: &str) -> Self {
        ControlResponse::new(
            status,
            "text/plain; charset=utf-8",
            alloc::format!("{message}\n"),
        )
    }
}

/// Work a session asks of the service.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "the bio travels by value on the I/O path; boxing it would allocate per request"
)]
pub enum Work {
    /// A bio for the export with this index; answer with
    /// [`Session::complete`] and the same cookie.
    Io {
        /// Index in the exports slice.
        export: usize,
        /// The bio.
        bio: Bio,
        /// The session's correlation id, below 2^32.
        cookie: u64,
    },
    /// A management request; answer with [`Session::respond`].
    Control(ControlRequest),
    /// Keep `state` as the persistent state of the export with this
    /// index (one that [`ExportInfo::keeps_state`]), stable before the
    /// answer, replacing what was kept; answer with [`Session::saved`].
    Save {
        /// Index in the exports slice.
        export: usize,
        /// The state, as the protocol serializes it.
        state: Vec<u8>,
        /// The session's correlation id, below 2^32.
        cookie: u64,
    },
}

/// Who is at the other end of a session, in its protocol's terms, for
/// `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's name (an iSCSI initiator name).
    pub client: String,
    /// What it opened (an iSCSI target, or `discovery`).
    pub export: String,
    /// The protocol's session id (iSCSI: ISID and TSIH).
    pub session: String,
}

/// One connection's protocol engine.
pub trait Session {
    /// Feeds received bytes; returns how many were consumed (fewer at a
    /// limit; offer the rest again later).
    fn recv(&mut self, exports: &[ExportInfo], data: &[u8]) -> usize;

    /// When the next input bytes belong in pages (a write's payload), those
    /// pages; returns the bytes they cover (0: input goes to
    /// [`Session::recv`]). Report what was placed with
    /// [`Session::rx_filled`].
    fn rx_pieces<'a>(&'a self, out: &mut RxPieces<'a>) -> usize {
        let _ = out;
        0
    }

    /// `n` bytes were placed in the pages from [`Session::rx_pieces`].
    fn rx_filled(&mut self, n: usize) {
        let _ = n;
    }

    /// The output waiting, about `max_bytes` of it, as pieces, without
    /// taking it; report what was sent with [`Session::tx_advance`].
    fn tx_pieces<'a>(&'a mut self, out: &mut TxPieces<'a>, max_bytes: usize);

    /// The first `n` bytes of the output from [`Session::tx_pieces`] were
    /// sent.
    fn tx_advance(&mut self, n: usize);

    /// The next work for the service, if any.
    fn next_work(&mut self) -> Option<Work>;

    /// A bio from [`Work::Io`] is back with its result.
    fn complete(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        let _ = (cookie, bio, result);
    }

    /// A [`Work::Save`] is done: the state is stable, or not kept.
    fn saved(&mut self, cookie: u64, result: BioResult) {
        let _ = (cookie, result);
    }

    /// The answer to a [`Work::Control`].
    fn respond(&mut self, response: ControlResponse) {
        let _ = response;
    }

    /// The time, in milliseconds on a monotonic clock, for timeouts; called
    /// every few hundred milliseconds at least.
    fn tick(&mut self, now_ms: u64) {
        let _ = now_ms;
    }

    /// The peer sent FIN and every byte before it was fed.
    fn input_closed(&mut self);

    /// The server is stopping: refuse new work politely, finish the rest.
    fn begin_shutdown(&mut self) {}

    /// The transport is gone: drop queued output; bios already out must
    /// still come back before [`Session::is_finished`].
    fn shutdown(&mut self);

    /// True while [`Session::recv`] would consume input now.
    fn wants_recv(&self) -> bool;

    /// True while there is output to send.
    fn has_tx(&self) -> bool;

    /// True once the connection is over and may be closed.
    fn is_finished(&self) -> bool;

    /// Copies made by this session (and its copying transport) between
    /// socket buffers and bio pages.
    fn counters(&self) -> &DataCounters;

    /// Bios handed out and not yet completed.
    fn in_flight(&self) -> usize {
        0
    }

    /// Requests received and not yet answered, whether their bios are out
    /// or still queued: a clean stop waits for them before it flushes.
    fn requests_open(&self) -> usize {
        self.in_flight()
    }

    /// Payload bytes this session holds in memory: the pages of its
    /// requests and of replies not yet sent, and spare pages it keeps for
    /// reuse.
    fn budget_held(&self) -> u64 {
        0
    }

    /// `Some(bytes)` while a request whose header has arrived waits to be
    /// admitted before its pages are allocated: the bytes it will hold
    /// beyond [`Session::budget_held`] (0 when spare pages cover it).
    /// Until then the session takes no more input.
    fn budget_wanted(&self) -> Option<u64> {
        None
    }

    /// Admits the waiting request: the session allocates its pages and
    /// reads on. False if the memory could not be had: the request keeps
    /// waiting and the session holds nothing more for it.
    fn budget_grant(&mut self) -> bool {
        true
    }

    /// Memory is short: give back what is held but not needed (spare
    /// pages).
    fn budget_trim(&mut self) {}

    /// True once the connection was ended by one of its timeouts.
    fn timed_out(&self) -> bool {
        false
    }

    /// Who is at the other end, once the protocol knows (`None`: nothing
    /// worth listing, or not yet).
    fn peer(&self) -> Option<Peer> {
        None
    }
}

/// The copying transport's output side: fills `buf` with output (read data
/// copied out of its pages through a counted map); returns how many bytes.
/// A page a device still holds stops the copy there (the session's bug;
/// the bytes before it are sent).
pub fn copy_out(session: &mut dyn Session, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let mut pieces = TxPieces::new();
        session.tx_pieces(&mut pieces, buf.len() - n);
        if pieces.is_empty() {
            break;
        }
        let counters = DataCounters::new();
        let mut copied = 0;
        let mut stuck = false;
        for p in &pieces {
            let room = buf.len() - n - copied;
            let k = p.len().min(room);
            let dst = &mut buf[n + copied..n + copied + k];
            match p {
                TxPiece::Bytes(b) => dst.copy_from_slice(&b[..k]),
                TxPiece::Page(s) => {
                    if s.page.copy_out(s.offset, dst, &counters).is_err() {
                        stuck = true;
                        break;
                    }
                }
            }
            copied += k;
            if k < p.len() {
                break;
            }
        }
        drop(pieces);
        session.counters().add(&counters);
        session.tx_advance(copied);
        n += copied;
        if stuck || copied == 0 {
            break;
        }
    }
    n
}

/// The copying transport's input side: feeds `data`, write payload copied
/// into its pages through a counted map, the rest through
/// [`Session::recv`]; returns how many bytes were consumed.
pub fn copy_in(session: &mut dyn Session, exports: &[ExportInfo], data: &[u8]) -> usize {
    let mut used = 0;
    while used < data.len() {
        let mut pieces = RxPieces::new();
        let room = session.rx_pieces(&mut pieces);
        if room == 0 {
            drop(pieces);
            let n = session.recv(exports, &data[used..]);
            if n == 0 {
                break;
            }
            used += n;
            continue;
        }
        let counters = DataCounters::new();
        let mut placed = 0;
        for p in &pieces {
            let k = p.len.min(data.len() - used - placed);
            let src = &data[used + placed..used + placed + k];
            if p.page.copy_in(p.offset, src, &counters).is_err() {
                break;
            }
            placed += k;
            if k < p.len {
                break;
            }
        }
        drop(pieces);
        session.counters().add(&counters);
        if placed == 0 {
            break;
        }
        session.rx_filled(placed);
        used += placed;
    }
    used
}
