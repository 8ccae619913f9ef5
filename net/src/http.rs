//! A minimal sans-I/O HTTP/1.1 server engine for the management endpoint.
//!
//! One request per connection: the engine collects the request head (and a
//! body when Content-Length says so), hands the caller a [`Request`], and
//! sends the caller's [`Response`] with `Connection: close`. A client that
//! sends `Expect: 100-continue` gets the interim `100 Continue` before its
//! body (RFC 9110 §10.1.1). Heads over
//! [`MAX_HEAD`] bytes and bodies over [`MAX_BODY`] are refused with 413.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Largest request head accepted, in bytes.
pub const MAX_HEAD: usize = 8192;
/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The body (empty unless Content-Length was given).
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content-Type header value.
    pub content_type: &'static str,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a body of the given type.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text error response.
    pub fn error(status: u16, message: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{message}\n"))
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Error",
        }
    }

    /// The response as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

enum State {
    Head,
    Body { req: Request, want: usize },
    Ready(Request),
    Sending { bytes: Vec<u8>, sent: usize },
    Done,
}

/// One management connection.
pub struct Connection {
    buf: Vec<u8>,
    state: State,
    /// An interim response still to send (`100 Continue`).
    interim: &'static [u8],
}

impl Default for Connection {
    fn default() -> Self {
        Connection::new()
    }
}

/// A parsed head: the request without its body, the body length, and
/// whether the client waits for `100 Continue`.
struct Head {
    req: Request,
    length: usize,
    expect_continue: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, Response> {
    let text = core::str::from_utf8(head)
        .map_err(|_| Response::error(400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => return Err(Response::error(400, "malformed request line")),
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::error(400, "unsupported HTTP version"));
    }
    let mut length = 0usize;
    let mut expect_continue = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v
                    .trim()
                    .parse()
                    .map_err(|_| Response::error(400, "bad Content-Length"))?;
            } else if k.trim().eq_ignore_ascii_case("expect")
                && v.trim().eq_ignore_ascii_case("100-continue")
            {
                expect_continue = true;
            }
        }
    }
    if length > MAX_BODY {
        return Err(Response::error(413, "request body too large"));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Head {
        req: Request {
            method: String::from(method),
            path: String::from(path),
            body: Vec::new(),
        },
        length,
        expect_continue,
    })
}

impl Connection {
    /// A new connection waiting for a request.
    pub fn new() -> Connection {
        Connection {
            buf: Vec::new(),
            state: State::Head,
            interim: b"",
        }
    }

    /// Feeds received bytes; returns how many were consumed.
    pub fn on_recv(&mut self, data: &[u8]) -> usize {
        match &mut self.state {
            State::Head => {
                let take = (MAX_HEAD - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if self.buf.len() >= MAX_HEAD {
                        self.respond(Response::error(413, "request head too large"));
                    }
                    return take;
                };
                let rest = self.buf.split_off(end + 4);
                let head = core::mem::take(&mut self.buf);
                match parse_head(&head[..end]) {
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
                    let body = core::mem::take(&mut req.body);
                    let req = Request {
                        method: core::mem::take(&mut req.method),
                        path: core::mem::take(&mut req.path),
                        body,
                    };
                    self.state = State::Ready(req);
                }
                take
            }
            // Bytes after the request are ignored: one request per connection.
            _ => data.len(),
        }
    }

    /// The request, once it has fully arrived; the caller answers with
    /// [`Connection::respond`].
    pub fn take_request(&mut self) -> Option<Request> {
        if let State::Ready(_) = self.state {
            if let State::Ready(req) = core::mem::replace(&mut self.state, State::Done) {
                return Some(req);
            }
        }
        None
    }

    /// True while there are bytes to send.
    pub fn has_tx(&self) -> bool {
        !self.interim.is_empty() || matches!(self.state, State::Sending { .. })
    }

    /// Queues the response; the connection finishes once it is sent.
    pub fn respond(&mut self, resp: Response) {
        self.state = State::Sending {
            bytes: resp.to_bytes(),
            sent: 0,
        };
    }

    /// Copies pending response bytes into `buf`; returns how many.
    pub fn fill_tx(&mut self, buf: &mut [u8]) -> usize {
        if !self.interim.is_empty() {
            let n = self.interim.len().min(buf.len());
            buf[..n].copy_from_slice(&self.interim[..n]);
            self.interim = &self.interim[n..];
            return n;
        }
        if let State::Sending { bytes, sent } = &mut self.state {
            let n = (bytes.len() - *sent).min(buf.len());
            buf[..n].copy_from_slice(&bytes[*sent..*sent + n]);
            *sent += n;
            if *sent == bytes.len() {
                self.state = State::Done;
            }
            return n;
        }
        0
    }

    /// True once the response is sent (or the connection is dead).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(c: &mut Connection) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = c.fill_tx(&mut buf);
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
        c.respond(Response::new(200, "application/json", "{}"));
        let text = drain(&mut c);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
        assert!(c.is_finished());
    }

    #[test]
    fn post_with_body() {
        let mut c = Connection::new();
        c.on_recv(b"POST /geom HTTP/1.1\r\nContent-Length: 6\r\n\r\nmd cr");
        assert!(c.take_request().is_none());
        c.on_recv(b"eate");
        let r = c.take_request().unwrap();
        assert_eq!(r.body, b"md cre");
    }

    #[test]
    fn expect_continue_gets_interim_reply() {
        let mut c = Connection::new();
        c.on_recv(b"POST /geom HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
        assert!(c.has_tx());
        assert_eq!(drain(&mut c), "HTTP/1.1 100 Continue\r\n\r\n");
        c.on_recv(b"abcd");
        assert_eq!(c.take_request().unwrap().body, b"abcd");
        c.respond(Response::new(200, "text/plain", "ok"));
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
    }
}
