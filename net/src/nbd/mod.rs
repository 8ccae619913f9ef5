//! A sans-I/O NBD server (NetworkBlockDevice/nbd doc/proto.md): bytes in,
//! bytes out, bios out to the caller, completions back in.
//!
//! The same [`Connection`] runs on smoltcp sockets in the appliance and on
//! std sockets in the hosted build; it never touches a socket, a clock or
//! the stack itself. Per connection the platform does:
//!
//! ```text
//!            rx slice                                   tx slice
//!   socket ───────────▶ on_recv ──┐            ┌──▶ fill_tx ───────────▶ socket
//!                                 ▼            │
//!                         ┌──────────────────────────┐
//!                         │        Connection        │
//!                         │ handshake · requests ·   │
//!                         │ slots (≤ max_in_flight)  │
//!                         └──────────────────────────┘
//!                  next_request │            ▲ complete(handle, bio, result)
//!                     (bio)     ▼            │
//!                         stack.submit ─▶ stack.run ─▶ stack.take_completed
//! ```
//!
//! ```ignore
//! let mut conn = nbd::Connection::new(nbd::ServerConfig::default());
//! loop {
//!     let used = conn.on_recv(&exports, rx_slice); // may be < rx_slice.len()
//!     while let Some(req) = conn.next_request() {
//!         stack.submit(consumer_for[req.export], req.bio, (conn_id << 32) | req.handle);
//!     }
//!     stack.run();
//!     while let Some((tag, bio, result)) = stack.take_completed() {
//!         conns[tag >> 32].complete(tag as u32 as u64, bio, result);
//!     }
//!     let n = conn.fill_tx(tx_slice);
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
//!   export), `STRUCTURED_REPLY`. Any other option gets
//!   `NBD_REP_ERR_UNSUP`, with its data skipped unread. Data on `LIST` or
//!   `STRUCTURED_REPLY` gets `NBD_REP_ERR_INVALID`. Data of `EXPORT_NAME`,
//!   `INFO` or `GO` longer than [`OPTION_DATA_MAX`] closes the connection
//!   without being buffered.
//! - **Transmission flags.** `HAS_FLAGS`, and `READ_ONLY`, `SEND_FLUSH` +
//!   `SEND_FUA`, `SEND_TRIM`, `SEND_WRITE_ZEROES` as true of the export
//!   (none of the last four on a read-only export);
//!   `CAN_MULTI_CONN` always, since every connection feeds one stack from
//!   one event loop: a flush is answered only after every write completed
//!   before it, from any connection ([`ExportInfo::transmission_flags`]).
//! - **Requests.** READ, WRITE, FLUSH, TRIM (a Discard bio), WRITE_ZEROES
//!   (`NO_HOLE` accepted), DISC (finish once outstanding replies are sent).
//!   FUA sets `bio.fua` on writes. Checked before any bio is made: flags
//!   (EINVAL), read-only (EPERM), payload above the maximum (EINVAL; a read
//!   with structured replies gets EOVERFLOW), past the end (ENOSPC for
//!   writes and write-zeroes, EINVAL otherwise), alignment to the minimum
//!   block (EINVAL). Unknown commands get EINVAL. A refused WRITE has its
//!   payload skipped as it arrives, never buffered, and is answered once
//!   the payload is through (clients such as libnbd drop a connection that
//!   answers a request before it is fully sent). A bad request magic
//!   closes the connection.
//! - **Replies** go out as requests complete, so out of order. Simple
//!   replies unless structured replies were negotiated; then a READ is one
//!   `NBD_REPLY_TYPE_OFFSET_DATA` chunk flagged `NBD_REPLY_FLAG_DONE` (or
//!   `NBD_REPLY_TYPE_NONE` for zero bytes), and every error is an
//!   `NBD_REPLY_TYPE_ERROR` chunk with a short message.
//! - **Zero copy, counted.** A write's payload is copied once, from the
//!   receive slice into the bio's pages; a read's data once, from the bio's
//!   pages into the send slice. Both land in [`Connection::counters`].
//! - **Bounded memory and backpressure.** At most `max_in_flight` requests
//!   are outstanding and at most a budget of payload bytes is held in pages
//!   ([`Connection::set_buffer_limit`]); beyond that `on_recv` stops
//!   consuming at the next request header and returns what it took.
//!   Headers are gathered in a 28-byte buffer; option data up to 64 KiB.
//! - **Never panics on input**: lengths and offsets from the wire are
//!   checked before use and arithmetic on them is checked.

mod engine;
pub mod wire;

pub use engine::{
    BlockLimits, Connection, ExportInfo, Request, ServerConfig, MAX_IN_FLIGHT_LIMIT,
    MAX_PAYLOAD_LIMIT, OPTION_DATA_MAX, STRING_MAX,
};

#[cfg(test)]
mod tests;
