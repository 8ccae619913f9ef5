//! A sans-I/O NBD server (NetworkBlockDevice/nbd doc/proto.md): bytes in,
//! bytes out, bios out to the caller, completions back in.
//!
//! The same [`Connection`] runs on smoltcp sockets in the appliance and on
//! std sockets in the hosted build; it never touches a socket, a clock or
//! the stack itself. Per connection the platform does:
//!
//! ```text
//!            rx slice                                   tx slice
//!   socket ───────────▶ on_recv ──┐            ┌──▶ copy_out ──────────▶ socket
//!      (or readv into rx_pieces)  ▼            │    (or writev of tx_pieces)
//!                         ┌──────────────────────────┐
//!            on_tick ───▶ │        Connection        │
//!                         │ handshake · requests ·   │
//!                         │ slots (≤ max_in_flight)  │
//!                         └──────────────────────────┘
//!                  next_request │            ▲ complete(cookie, bio, result)
//!                     (bio)     ▼            │
//!                         stack.submit ─▶ stack.run ─▶ stack.take_completed
//! ```
//!
//! ```ignore
//! let mut conn = nbd::Connection::new(nbd::ServerConfig::default());
//! loop {
//!     conn.on_tick(now_ms);                        // timeouts
//!     let used = conn.on_recv(&exports, rx_slice); // may be < rx_slice.len()
//!     while let Some(req) = conn.next_request() {
//!         stack.submit(consumer_for[req.export], req.bio, (conn_id << 32) | req.cookie);
//!     }
//!     stack.run();
//!     while let Some((tag, bio, result)) = stack.take_completed() {
//!         conns[tag >> 32].complete(tag as u32 as u64, bio, result);
//!     }
//!     let n = net::session::copy_out(&mut conn, tx_slice);
//!     if peer_sent_fin { conn.input_closed(); }
//!     if conn.is_finished() { /* close the socket, drop the connection */ }
//! }
//! ```
//!
//! What the engine does, and the choices it makes where proto.md leaves one:
//!
//! - **Handshake.** Fixed newstyle only. The greeting advertises
//!   `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`; unknown client flags
//!   close the connection. Options: `EXPORT_NAME` (an unknown name closes
//!   the connection, as the spec requires), `INFO` and `GO` (always
//!   `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`; `NBD_INFO_NAME` and
//!   `NBD_INFO_DESCRIPTION` when asked for; `NBD_REP_ERR_UNKNOWN` for an
//!   unknown export; the empty name is export 0), `ABORT` (ack, then
//!   finish), `LIST` (one `NBD_REP_SERVER` with name and description per
//!   export), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//!   `SET_META_CONTEXT` (below). Any other option, `STARTTLS` included,
//!   gets `NBD_REP_ERR_UNSUP`, with its data skipped unread. Data on `LIST`
//!   or `STRUCTURED_REPLY` gets `NBD_REP_ERR_INVALID`. The data of `INFO`,
//!   `GO` and the meta context options is buffered up to
//!   [`OPTION_DATA_MAX`]; longer, it is skipped unread and answered
//!   `NBD_REP_ERR_TOO_BIG`; a longer `EXPORT_NAME` (which has no error
//!   reply) closes the connection.
//! - **Metadata contexts.** One is served: `base:allocation`. Both meta
//!   context options need structured replies first (`NBD_REP_ERR_INVALID`
//!   otherwise, as qemu-nbd does) and a known export (`NBD_REP_ERR_UNKNOWN`);
//!   malformed data (a length past the end, a string over 4096 bytes, data
//!   left over) is `NBD_REP_ERR_INVALID`. `LIST` answers no query, `base:`
//!   and `base:allocation` with `base:allocation` (context id 0, as the
//!   spec reserves it there); `SET` selects it when named (id
//!   [`ALLOCATION_CONTEXT_ID`]). Queries in other namespaces are ignored.
//!   A `SET` replaces the earlier selection even when it fails, and the
//!   selection only counts if `GO`/`EXPORT_NAME` then picks the same export.
//! - **Extended headers** (`NBD_OPT_EXTENDED_HEADERS`) are not offered: the
//!   clients this server is tested with (Debian's libnbd 1.14 and QEMU 7.2)
//!   do not speak them, so the option gets `NBD_REP_ERR_UNSUP`.
//! - **Transmission flags** ([`ExportInfo::transmission_flags`]):
//!   `HAS_FLAGS`; `READ_ONLY`, `SEND_FLUSH` + `SEND_FUA`, `SEND_TRIM`,
//!   `SEND_WRITE_ZEROES` as true of the export (none of the last four on a
//!   read-only export); `SEND_FAST_ZERO` when the export both trims and
//!   zeroes (the provider deallocates rather than writes); `SEND_DF` only
//!   with structured replies (the spec forbids it otherwise); `SEND_CACHE`
//!   always; `CAN_MULTI_CONN` always, since every connection feeds one
//!   stack from one event loop: a flush is answered only after every write
//!   completed before it, from any connection.
//! - **Requests.** READ (`DF` accepted where offered: every read is one
//!   data chunk anyway), WRITE, FLUSH, TRIM (a Discard bio), WRITE_ZEROES
//!   (`NO_HOLE` sets `bio.no_hole`; `FAST_ZERO` where offered, with
//!   `ENOTSUP` when combined with `NO_HOLE`, since zeroing that must stay
//!   allocated may write every byte), CACHE (answered at once: the stack
//!   keeps no cache to warm), BLOCK_STATUS (a `GetAllocation` bio; `REQ_ONE`
//!   honoured), DISC (finish once outstanding replies are sent). FUA sets
//!   `bio.fua` on writes and is accepted (ignored) on every other command.
//!   Checked before any bio is made: flags not valid for the command
//!   (EINVAL), read-only (EPERM), payload above the maximum (EINVAL; a
//!   read with structured replies gets EOVERFLOW), past the end (ENOSPC
//!   for writes and write-zeroes, EINVAL otherwise), alignment to the
//!   minimum block (EINVAL), BLOCK_STATUS without a selected context or of
//!   length 0 (EINVAL). Unknown commands get EINVAL. A refused WRITE has
//!   its payload skipped as it arrives, never buffered, and is answered once
//!   the payload is through (clients such as libnbd drop a connection that
//!   answers a request before it is fully sent). A bad request magic closes
//!   the connection.
//! - **Block status** reports what the provider knows: the runs in the
//!   completed bio's `extents` become `NBD_STATE_HOLE`/`NBD_STATE_ZERO`
//!   descriptors, cut to the request, merged when equal, at most
//!   [`MAX_REPLY_EXTENTS`] (fewer is allowed: clients ask again from where
//!   the reply stops); a range the provider said nothing about (a virtio
//!   disk, a mirror) is one data descriptor, as is a provider that answers
//!   `NotSupported`. md reports unallocated pages as holes; a hosted file
//!   disk reports what `SEEK_HOLE` finds.
//! - **Replies** go out as requests complete, so out of order. Simple
//!   replies unless structured replies were negotiated; then a READ is one
//!   `NBD_REPLY_TYPE_OFFSET_DATA` chunk flagged `NBD_REPLY_FLAG_DONE` (or
//!   `NBD_REPLY_TYPE_NONE` for zero bytes), BLOCK_STATUS one
//!   `NBD_REPLY_TYPE_BLOCK_STATUS` chunk, and every error an
//!   `NBD_REPLY_TYPE_ERROR` chunk with a short message.
//! - **Copies, counted.** Output leaves as [`TxPiece`]s
//!   ([`Connection::tx_pieces`], then [`Connection::tx_advance`]): headers
//!   as bytes and read data as the bios' own pages; a write's payload
//!   arrives straight in its pages ([`Connection::rx_pieces`], then
//!   [`Connection::rx_filled`]); only headers, and payload that came in the
//!   same read as a header, go through [`Connection::on_recv`], which
//!   copies such payload into the pages. The connection is a
//!   [`crate::session::Session`]: a vectored transport (hosted's
//!   `readv`/`writev`) moves the pieces by address, a copying one
//!   (smoltcp's rings, [`crate::session::copy_in`] and
//!   [`crate::session::copy_out`]) maps them; every copy lands in
//!   [`Connection::counters`].
//! - **Page reuse.** Pages of finished reads and writes are kept in a
//!   per-connection pool (up to [`POOL_MAX_BYTES`]) for the next requests,
//!   instead of being freed and allocated zeroed again; the pool is dropped
//!   after [`POOL_IDLE_MS`] without traffic. A reused page holds old data
//!   only until it is overwritten whole (a write's payload, a successful
//!   read), and the data of a failed read is never sent.
//! - **Bounded memory and backpressure.** At most `max_in_flight` requests
//!   are outstanding and at most a budget of payload bytes is held in pages
//!   ([`Connection::set_buffer_limit`]); beyond that `on_recv` stops
//!   consuming at the next request header and returns what it took.
//!   Headers are gathered in a 28-byte buffer; option data up to 64 KiB. A
//!   client that stops reading its replies therefore stops being read,
//!   and holds no more than its budget, while other connections go on.
//!   With [`ServerConfig::budgeted`] (as the appliance runs it) a read or
//!   write whose header has arrived also waits, before its pages are
//!   allocated, until the service admits it into the budget all
//!   connections share ([`Connection::budget_wanted`],
//!   [`Connection::grant`]); meanwhile nothing more is read. Pages are
//!   allocated fallibly: an exhausted heap leaves the request waiting, and
//!   a bio that comes back `NoMemory` is submitted again up to
//!   [`NO_MEMORY_RETRIES`] times, [`NO_MEMORY_RETRY_MS`] apart, before
//!   the client gets `ENOMEM`.
//! - **Time.** The platform calls [`Connection::on_tick`] with a monotonic
//!   clock. A client still negotiating [`HANDSHAKE_TIMEOUT_MS`] (30 s)
//!   after its first tick is dropped; an idle timeout
//!   ([`ServerConfig::idle_timeout_ms`], off by default) drops a connection
//!   in transmission that moved no byte for that long while the stack held
//!   none of its requests, whether it was idle or had stopped reading. A
//!   connection that holds payload pages (a write whose payload stopped
//!   coming, replies its client does not read) and moves no byte for
//!   [`ServerConfig::stall_timeout_ms`] ([`STALL_TIMEOUT_MS`], 60 s) is
//!   dropped the same way, so it cannot keep memory from the others. Half
//!   a request header holds no pages, so it is bounded only by the idle
//!   timeout.
//! - **Ending.** [`Connection::input_closed`] (the peer sent FIN): a request
//!   cut short is dropped, the rest is answered, then the connection
//!   finishes. [`Connection::begin_shutdown`] (the server is stopping): new
//!   options get `NBD_REP_ERR_SHUTDOWN` (an `EXPORT_NAME` closes), new
//!   requests `NBD_ESHUTDOWN`, requests already taken are answered.
//!   [`Connection::shutdown`]: drop everything, wait only for bios the
//!   stack still holds.
//! - **Never panics on input**: lengths and offsets from the wire are
//!   checked before use and arithmetic on them is checked. The
//!   `fuzzing` driver (feature `fuzzing`, used by `net/fuzz` and by a
//!   20 s fuzz run in the test suite) checks this and the bounds above on
//!   real client transcripts mutated at random.

mod engine;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod wire;

pub use crate::session::{ExportInfo, PageSlice, TxPiece};
pub use engine::{
    BlockLimits, Connection, Request, ServerConfig, ALLOCATION_CONTEXT_ID, HANDSHAKE_TIMEOUT_MS,
    MAX_IN_FLIGHT_LIMIT, MAX_PAYLOAD_LIMIT, MAX_REPLY_EXTENTS, NO_MEMORY_RETRIES,
    NO_MEMORY_RETRY_MS, OPTION_DATA_MAX, POOL_IDLE_MS, POOL_MAX_BYTES, STALL_TIMEOUT_MS,
    STRING_MAX,
};

#[cfg(test)]
mod tests;
