//! The host tool's HTTP/1.1 client for the appliance's management endpoint
//! (RFC 9112): one request per connection, the reply read to EOF and its
//! head parsed by `httparse`.
//!
//! Every request carries `Host`, the caller's header fields (an
//! `Authorization: Bearer …` for instance), `Content-Length` and
//! `Connection: close`, in that order. A reply whose body is shorter or
//! longer than its Content-Length is an error, not a truncated answer.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest reply read, head and body together.
pub const MAX_REPLY_BYTES: u64 = 64 << 20;

/// Most header fields in a reply head.
const MAX_HEADERS: usize = 32;

/// An HTTP reply: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body, exactly Content-Length bytes when the reply has one.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// Sends `method path` with `body` and `headers` to `addr` and reads the
/// whole reply. Connecting, each write and each read are bounded by
/// `timeout`. `headers` must not repeat `Host`, `Content-Length` or
/// `Connection`, which are always sent.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<Reply> {
    let req = request_bytes(method, path, body, headers)?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let _ = s.set_nodelay(true);
    s.write_all(&req)?;
    read_reply(s)
}

/// The request as bytes on the wire. A CR or LF in any part would end the
/// line early and smuggle in fields, so it is refused.
pub fn request_bytes(
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> io::Result<Vec<u8>> {
    let fields = headers.iter().flat_map(|&(name, value)| [name, value]);
    if [method, path]
        .into_iter()
        .chain(fields)
        .any(|s| s.contains(['\r', '\n']))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CR or LF in an HTTP request line or header field",
        ));
    }
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: strata\r\n");
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let _ = write!(
        head,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads a reply to EOF and parses it. A server that stops right after
/// answering (`POST /shutdown`) may reset the connection instead of
/// closing it; what arrived before the reset counts if it is a whole reply.
fn read_reply(r: impl Read) -> io::Result<Reply> {
    let mut raw = Vec::new();
    let read = r.take(MAX_REPLY_BYTES + 1).read_to_end(&mut raw);
    if raw.len() as u64 > MAX_REPLY_BYTES {
        return Err(invalid(format!(
            "HTTP reply longer than {MAX_REPLY_BYTES} bytes"
        )));
    }
    match read {
        Ok(_) => parse_reply(&raw),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => parse_reply(&raw).map_err(|_| e),
        Err(e) => Err(e),
    }
}

/// Parses a whole HTTP/1.x reply: the head by `httparse`, then a body of
/// exactly Content-Length bytes, or everything after the head when there
/// is no Content-Length (the connection's end delimits it, RFC 9112 §6.3).
pub fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if raw.is_empty() => return Err(invalid("empty HTTP reply")),
        Ok(httparse::Status::Partial) => return Err(invalid("truncated HTTP reply head")),
        Err(e) => {
            let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(&line[..line.len().min(80)]);
            return Err(invalid(format!(
                "not an HTTP reply ({e}): {:?}",
                line.trim_end()
            )));
        }
    };
    let status = head
        .code
        .ok_or_else(|| invalid("HTTP reply without a status code"))?;
    let body = &raw[head_len..];
    if let Some(want) = content_length(head.headers)?.filter(|&n| n != body.len()) {
        let how = if body.len() < want {
            "shorter"
        } else {
            "longer"
        };
        return Err(invalid(format!(
            "HTTP body {how} than its Content-Length ({} of {want} bytes)",
            body.len()
        )));
    }
    Ok(Reply {
        status,
        body: body.to_vec(),
    })
}

/// The reply's Content-Length, if it has one (RFC 9112 §6.3: differing
/// values are an error). A transfer coding is refused: the appliance never
/// sends one.
fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<Option<usize>> {
    let mut len = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("HTTP reply with a Transfer-Encoding"));
        }
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let v = h.value.trim_ascii();
        let n = std::str::from_utf8(v)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| invalid("bad Content-Length in the HTTP reply"))?;
        if len.is_some_and(|l| l != n) {
            return Err(invalid("conflicting Content-Lengths in the HTTP reply"));
        }
        len = Some(n);
    }
    Ok(len)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn status(raw: &str) -> Option<u16> {
        parse_reply(raw.as_bytes()).ok().map(|r| r.status)
    }

    #[test]
    fn status_lines() {
        assert_eq!(status("HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(status("HTTP/1.0 503 Busy\r\n\r\n"), Some(503));
        assert_eq!(status("SSH-2.0-x\r\n\r\n"), None);
        assert_eq!(status("HTTP/1.1 2000 x\r\n\r\n"), None);
        assert_eq!(status("HTTP/2 200\r\n\r\n"), None);
        assert_eq!(status(""), None);
    }

    #[test]
    fn bodies_by_content_length() {
        let r = parse_reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!(
            r,
            Reply {
                status: 400,
                body: b"hello".to_vec()
            }
        );
        assert_eq!(r.text(), "hello");
        let long = parse_reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nhello world")
            .unwrap_err();
        assert!(long.to_string().contains("longer"), "{long}");
        let short = parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").unwrap_err();
        assert!(short.to_string().contains("shorter"), "{short}");
        // Without a Content-Length the body runs to the end.
        let r = parse_reply(b"HTTP/1.1 200 OK\r\n\r\nto the end").unwrap();
        assert_eq!(r.body, b"to the end");
        let r = parse_reply(b"HTTP/1.1 202 Accepted\r\ncontent-length:  0 \r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len()), (202, 0));
    }

    #[test]
    fn malformed_heads() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        ] {
            let e = parse_reply(raw).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{raw:?}");
        }
        // The same value twice is one Content-Length.
        let r = parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab");
        assert_eq!(r.unwrap().body, b"ab");
        let e = parse_reply(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap_err();
        assert!(e.to_string().contains("SSH-2.0-OpenSSH_9.6"), "{e}");
    }

    #[test]
    fn request_heads() {
        assert_eq!(
            request_bytes("POST", "/shutdown", b"", &[]).unwrap(),
            b"POST /shutdown HTTP/1.1\r\nHost: strata\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            request_bytes(
                "POST",
                "/geom",
                b"md0\n",
                &[("Content-Type", "text/plain"), ("Authorization", "Bearer s3cret")]
            )
            .unwrap(),
            b"POST /geom HTTP/1.1\r\nHost: strata\r\nContent-Type: text/plain\r\nAuthorization: Bearer s3cret\r\nContent-Length: 4\r\nConnection: close\r\n\r\nmd0\n"
        );
        for (path, headers) in [
            ("/geom\r\nX: y", &[][..]),
            ("/geom", &[("Authorization", "Bearer a\nb")][..]),
            ("/geom", &[("X\r", "y")][..]),
        ] {
            let e = request_bytes("GET", path, b"", headers).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
    }

    /// A reader that yields `data` and then fails with `err`.
    struct ThenFail {
        data: io::Cursor<Vec<u8>>,
        err: io::ErrorKind,
    }

    impl Read for ThenFail {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.data.read(buf)? {
                0 => Err(self.err.into()),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn reset_after_a_whole_reply() {
        let then = |data: &[u8], err| ThenFail {
            data: io::Cursor::new(data.to_vec()),
            err,
        };
        let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let r = read_reply(then(whole, io::ErrorKind::ConnectionReset)).unwrap();
        assert_eq!((r.status, r.body), (200, b"{}".to_vec()));
        let cut = &whole[..whole.len() - 1];
        let e = read_reply(then(cut, io::ErrorKind::ConnectionReset)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let e = read_reply(then(whole, io::ErrorKind::WouldBlock)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    /// A server that reads one request head and its `body_len` bytes,
    /// answers `reply` and closes; it returns the request.
    fn serve_once(
        reply: &'static [u8],
        body_len: usize,
    ) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                let end = req.windows(4).position(|w| w == b"\r\n\r\n");
                if end.is_some_and(|e| req.len() >= e + 4 + body_len) {
                    break;
                }
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0);
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(reply).unwrap();
            req
        });
        (addr, server)
    }

    #[test]
    fn round_trip() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes", 2);
        let t = Duration::from_secs(5);
        let r = request(
            addr,
            "PUT",
            "/x",
            b"hi",
            &[("Authorization", "Bearer t")],
            t,
        )
        .unwrap();
        assert_eq!((r.status, r.body), (200, b"yes".to_vec()));
        assert_eq!(
            server.join().unwrap(),
            b"PUT /x HTTP/1.1\r\nHost: strata\r\nAuthorization: Bearer t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
    }

    #[test]
    fn long_body_on_the_wire_is_an_error() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nyes", 0);
        let e = request(addr, "GET", "/x", b"", &[], Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();
    }

    #[test]
    fn silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            thread::sleep(Duration::from_millis(600));
            drop(c);
        });
        let e = request(addr, "GET", "/x", b"", &[], Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e:?}"
        );
        server.join().unwrap();
    }
}
