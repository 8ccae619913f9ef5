//! A sans-I/O HTTP/1.1 server engine for the management endpoint, as a
//! [`Session`].
//!
//! One request per connection: the engine collects the request head
//! (parsed by `httparse`) and a body when Content-Length says so, hands the
//! service a [`ControlRequest`], and sends its [`ControlResponse`] with
//! `Connection: close`. A client that sends `Expect: 100-continue` gets the
//! interim `100 Continue` before its body (RFC 9110 §10.1.1). Heads over
//! [`MAX_HEAD`] bytes, bodies over [`MAX_BODY`] and chunked bodies are
//! refused (413, 413, 411); malformed heads get 400.
//!
//! A connection holds one of the endpoint's few slots, so it is timed
//! ([`Connection::with_timeout`], [`REQUEST_TIMEOUT_MS`] by default): a
//! request that has not fully arrived that long after the connection's
//! first tick is answered `408 Request Timeout` and the connection ends;
//! so does one whose client takes no byte of the response for that long.

use crate::session::{
    ControlRequest, ControlResponse, ExportInfo, Session, TxPiece, TxPieces, Work,
};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use geom::page::DataCounters;

/// Largest request head accepted, in bytes.
pub const MAX_HEAD: usize = 8192;
/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Default time for a request to arrive, and most time a response may
/// wait for its client to take a byte, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Most header fields in a request head.
const MAX_HEADERS: usize = 32;

/// The reason phrase of a status code.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A response as bytes on the wire.
pub fn response_bytes(r: &ControlResponse) -> Vec<u8> {
    let auth = if r.status == 401 {
        "WWW-Authenticate: Bearer\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(&r.body);
    out
}

#[derive(Debug)]
enum State {
    /// Collecting the head.
    Head,
    /// Collecting `want` body bytes.
    Body { req: ControlRequest, want: usize },
    /// The request is whole; the service has not taken it yet.
    Ready(ControlRequest),
    /// Taken; waiting for the service's answer.
    Waiting,
    /// Sending the response.
    Sending { bytes: Vec<u8>, sent: usize },
    /// Sent (or given up).
    Done,
}

/// What a complete head says.
struct Head {
    req: ControlRequest,
    length: usize,
    expect_continue: bool,
}

/// Parses a complete head (`head` ends with the blank line).
fn parse_head(head: &[u8]) -> Result<Head, ControlResponse> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(ControlResponse::error(400, "malformed request head"))
        }
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(ControlResponse::error(400, "malformed request line"));
    };
    if !target.starts_with('/') {
        return Err(ControlResponse::error(400, "malformed request line"));
    }
    let mut length = 0usize;
    let mut expect_continue = false;
    let mut bearer = None;
    for h in parsed.headers.iter() {
        let value = core::str::from_utf8(h.value)
            .map_err(|_| ControlResponse::error(400, "header value is not UTF-8"))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| ControlResponse::error(400, "bad Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ControlResponse::error(411, "send a Content-Length"));
        } else if h.name.eq_ignore_ascii_case("expect")
            && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        } else if h.name.eq_ignore_ascii_case("authorization") {
            let mut words = value.splitn(2, ' ');
            if let (Some(scheme), Some(token)) = (words.next(), words.next()) {
                if scheme.eq_ignore_ascii_case("bearer") {
                    bearer = Some(String::from(token.trim()));
                }
            }
        }
    }
    if length > MAX_BODY {
        return Err(ControlResponse::error(413, "request body too large"));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Head {
        req: ControlRequest {
            method: String::from(method),
            path: String::from(path),
            body: Vec::new(),
            bearer,
        },
        length,
        expect_continue,
    })
}

/// One management connection.
#[derive(Debug)]
pub struct Connection {
    buf: Vec<u8>,
    state: State,
    /// An interim response still to send (`100 Continue`).
    interim: &'static [u8],
    /// The peer sent FIN.
    input_closed: bool,
    counters: DataCounters,
    /// [`REQUEST_TIMEOUT_MS`] or what [`Connection::with_timeout`] set
    /// (0: never).
    timeout_ms: u64,
    /// The first tick's time.
    born_ms: Option<u64>,
    /// The last tick at which the response moved (or began).
    sent_ms: u64,
    /// Bytes of the response were taken since the last tick.
    moved: bool,
    /// A timeout ended the connection.
    timed_out: bool,
}

impl Default for Connection {
    fn default() -> Self {
        Connection::new()
    }
}

impl Connection {
    /// A new connection waiting for a request, with the default
    /// [`REQUEST_TIMEOUT_MS`].
    pub fn new() -> Connection {
        Connection::with_timeout(REQUEST_TIMEOUT_MS)
    }

    /// A new connection whose request must arrive within `timeout_ms` of
    /// its first tick, and whose response must not wait longer than that
    /// for its client to take a byte (0: no timeout).
    pub fn with_timeout(timeout_ms: u64) -> Connection {
        Connection {
            buf: Vec::new(),
            state: State::Head,
            interim: b"",
            input_closed: false,
            counters: DataCounters::new(),
            timeout_ms,
            born_ms: None,
            sent_ms: 0,
            moved: false,
            timed_out: false,
        }
    }

    /// Tells the connection the time (milliseconds, monotonic) and
    /// enforces its timeout; true if it ended the connection now.
    pub fn on_tick(&mut self, now_ms: u64) -> bool {
        let born = *self.born_ms.get_or_insert(now_ms);
        if self.moved || !matches!(self.state, State::Sending { .. }) {
            self.sent_ms = now_ms;
            self.moved = false;
        }
        if self.timeout_ms == 0 {
            return false;
        }
        let expired = |since: u64| now_ms.saturating_sub(since) >= self.timeout_ms;
        match self.state {
            State::Head | State::Body { .. } if expired(born) => {
                self.timed_out = true;
                self.respond(ControlResponse::error(
                    408,
                    "the request did not arrive in time",
                ));
                // The answer itself gets as long to leave.
                self.sent_ms = now_ms;
                true
            }
            State::Sending { .. } if expired(self.sent_ms) => {
                self.timed_out = true;
                self.shutdown_now();
                true
            }
            _ => false,
        }
    }

    /// True once a timeout ended (or is ending) the connection.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    fn shutdown_now(&mut self) {
        self.interim = b"";
        self.state = State::Done;
    }

    /// Feeds received bytes; returns how many were consumed.
    pub fn on_recv(&mut self, data: &[u8]) -> usize {
        match &mut self.state {
            State::Head => {
                let take = (MAX_HEAD - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if self.buf.len() >= MAX_HEAD {
                        self.respond(ControlResponse::error(413, "request head too large"));
                    }
                    return take;
                };
                let rest = self.buf.split_off(end + 4);
                let head = core::mem::take(&mut self.buf);
                match parse_head(&head) {
                    Ok(Head { req, length: 0, .. }) => self.state = State::Ready(req),
                    Ok(Head {
                        req,
                        length: want,
                        expect_continue,
                    }) => {
                        if expect_continue && rest.is_empty() {
                            self.interim = b"HTTP/1.1 100 Continue\r\n\r\n";
                        }
                        self.state = State::Body { req, want };
                        // Body bytes that came with the head.
                        self.on_recv(&rest);
                    }
                    Err(resp) => self.respond(resp),
                }
                take
            }
            State::Body { req, want } => {
                let take = (*want - req.body.len()).min(data.len());
                req.body.extend_from_slice(&data[..take]);
                if req.body.len() == *want {
                    let req = core::mem::replace(
                        req,
                        ControlRequest {
                            method: String::new(),
                            path: String::new(),
                            body: Vec::new(),
                            bearer: None,
                        },
                    );
                    self.state = State::Ready(req);
                }
                take
            }
            // Bytes after the request are ignored: one request per connection.
            _ => data.len(),
        }
    }

    /// The request, once it has fully arrived; answer with
    /// [`Connection::respond`].
    pub fn take_request(&mut self) -> Option<ControlRequest> {
        match core::mem::replace(&mut self.state, State::Waiting) {
            State::Ready(req) => Some(req),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Queues the response; the connection finishes once it is sent.
    pub fn respond(&mut self, resp: ControlResponse) {
        self.interim = b"";
        self.state = State::Sending {
            bytes: response_bytes(&resp),
            sent: 0,
        };
    }

    /// True while there are bytes to send.
    pub fn has_tx(&self) -> bool {
        !self.interim.is_empty() || matches!(self.state, State::Sending { .. })
    }

    /// True once the response is sent, or the peer left before its
    /// request was whole.
    pub fn is_finished(&self) -> bool {
        match self.state {
            State::Done => true,
            State::Head | State::Body { .. } => self.input_closed,
            _ => false,
        }
    }
}

impl Session for Connection {
    fn recv(&mut self, _exports: &[ExportInfo], data: &[u8]) -> usize {
        self.on_recv(data)
    }

    fn tx_pieces<'a>(&'a mut self, out: &mut TxPieces<'a>, _max_bytes: usize) {
        if !self.interim.is_empty() {
            out.push(TxPiece::Bytes(self.interim));
        } else if let State::Sending { bytes, sent } = &self.state {
            out.push(TxPiece::Bytes(&bytes[*sent..]));
        }
    }

    fn tx_advance(&mut self, mut n: usize) {
        self.moved |= n > 0;
        let k = n.min(self.interim.len());
        self.interim = &self.interim[k..];
        n -= k;
        if let State::Sending { bytes, sent } = &mut self.state {
            *sent = (*sent + n).min(bytes.len());
            if *sent == bytes.len() {
                self.state = State::Done;
            }
        }
    }

    fn next_work(&mut self) -> Option<Work> {
        self.take_request().map(Work::Control)
    }

    fn respond(&mut self, response: ControlResponse) {
        Connection::respond(self, response)
    }

    fn input_closed(&mut self) {
        self.input_closed = true;
    }

    fn shutdown(&mut self) {
        self.shutdown_now();
    }

    fn tick(&mut self, now_ms: u64) {
        self.on_tick(now_ms);
    }

    fn timed_out(&self) -> bool {
        Connection::timed_out(self)
    }

    fn wants_recv(&self) -> bool {
        matches!(self.state, State::Head | State::Body { .. })
    }

    fn has_tx(&self) -> bool {
        Connection::has_tx(self)
    }

    fn is_finished(&self) -> bool {
        Connection::is_finished(self)
    }

    fn counters(&self) -> &DataCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::copy_out;

    fn drain(c: &mut Connection) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = copy_out(c, &mut buf);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn get_in_pieces() {
        let mut c = Connection::new();
        let req = b"GET /status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        for b in req.chunks(3) {
            assert_eq!(c.on_recv(b), b.len());
        }
        let r = c.take_request().unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/status"));
        assert_eq!(r.bearer, None);
        c.respond(ControlResponse::new(200, "application/json", "{}"));
        let text = drain(&mut c);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
        assert!(c.is_finished());
    }

    #[test]
    fn post_with_body_and_credential() {
        let mut c = Connection::new();
        c.on_recv(
            b"POST /geom HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Length: 6\r\n\r\nmd cr",
        );
        assert!(c.take_request().is_none());
        c.on_recv(b"eate");
        let r = c.take_request().unwrap();
        assert_eq!(r.body, b"md cre");
        assert_eq!(r.bearer.as_deref(), Some("s3cret"));
    }

    #[test]
    fn expect_continue_gets_interim_reply() {
        let mut c = Connection::new();
        c.on_recv(b"POST /geom HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
        assert!(c.has_tx());
        assert_eq!(drain(&mut c), "HTTP/1.1 100 Continue\r\n\r\n");
        c.on_recv(b"abcd");
        assert_eq!(c.take_request().unwrap().body, b"abcd");
        c.respond(ControlResponse::new(200, "text/plain", "ok"));
        assert!(drain(&mut c).starts_with("HTTP/1.1 200 OK\r\n"));
        // A body sent along with the head needs no interim reply.
        let mut c = Connection::new();
        c.on_recv(b"POST /geom HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab");
        assert_eq!(drain(&mut c), "");
        assert_eq!(c.take_request().unwrap().body, b"ab");
    }

    #[test]
    fn garbage_gets_400_and_huge_head_413() {
        let mut c = Connection::new();
        c.on_recv(b"\x00\x01garbage\r\n\r\n");
        assert!(drain(&mut c).starts_with("HTTP/1.1 400"));
        let mut c = Connection::new();
        c.on_recv(&[b'a'; MAX_HEAD + 10]);
        assert!(drain(&mut c).starts_with("HTTP/1.1 413"));
        let mut c = Connection::new();
        c.on_recv(b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
        assert!(drain(&mut c).starts_with("HTTP/1.1 413"));
        let mut c = Connection::new();
        c.on_recv(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(drain(&mut c).starts_with("HTTP/1.1 411"));
    }

    #[test]
    fn a_request_that_does_not_arrive_in_time_gets_408() {
        // Nothing sent at all.
        let mut c = Connection::with_timeout(1000);
        assert!(!c.on_tick(5_000));
        assert!(!c.on_tick(5_999));
        assert!(c.on_tick(6_000));
        assert!(c.timed_out());
        assert!(drain(&mut c).starts_with("HTTP/1.1 408 Request Timeout\r\n"));
        assert!(c.is_finished());
        // Half a head, then half a body: the deadline runs from the start.
        let mut c = Connection::with_timeout(1000);
        c.on_tick(0);
        c.on_recv(b"GET /status HTTP/1.1\r\nHo");
        assert!(!c.on_tick(900));
        assert!(c.on_tick(1000));
        let mut c = Connection::with_timeout(1000);
        c.on_tick(0);
        c.on_recv(b"POST /geom HTTP/1.1\r\nContent-Length: 9\r\n\r\nmd");
        assert!(c.on_tick(1000));
        assert!(drain(&mut c).starts_with("HTTP/1.1 408"));
        // A whole request waits for its answer as long as it takes.
        let mut c = Connection::with_timeout(1000);
        c.on_tick(0);
        c.on_recv(b"GET /status HTTP/1.1\r\n\r\n");
        assert!(c.take_request().is_some());
        assert!(!c.on_tick(10_000));
        // An answer nobody takes ends the connection, one moving does not.
        c.respond(ControlResponse::new(200, "text/plain", "x".repeat(100)));
        assert!(!c.on_tick(10_500));
        let mut pieces = TxPieces::new();
        c.tx_pieces(&mut pieces, 10);
        drop(pieces);
        c.tx_advance(10);
        assert!(!c.on_tick(11_400));
        assert!(!c.on_tick(12_300));
        assert!(c.on_tick(13_300));
        assert!(c.is_finished() && c.timed_out());
        // No timeout at all.
        let mut c = Connection::with_timeout(0);
        assert!(!c.on_tick(0));
        assert!(!c.on_tick(u64::MAX / 2));
    }

    #[test]
    fn a_peer_that_leaves_early_finishes_the_connection() {
        let mut c = Connection::new();
        c.on_recv(b"GET /sta");
        assert!(!c.is_finished());
        Session::input_closed(&mut c);
        assert!(c.is_finished());
    }
}
