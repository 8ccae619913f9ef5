//! Stopping a running appliance: its own `POST /shutdown` (which flushes
//! every disk), and QEMU's QMP `quit` when the appliance does not answer.

use crate::http;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends `POST /shutdown`, with the management token when given, to the
/// appliance's HTTP endpoint and returns the HTTP status code. Every step
/// is bounded by `timeout`.
pub fn http_shutdown(addr: SocketAddr, token: Option<&str>, timeout: Duration) -> io::Result<u16> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    http::request(addr, "POST", "/shutdown", b"", &headers, timeout).map(|r| r.status)
}

/// A QMP connection past capabilities negotiation (QEMU's
/// docs/interop/qmp-spec: greeting, `qmp_capabilities`, then commands).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and leaves
    /// negotiation mode; each step is bounded by `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> io::Result<Qmp> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        let mut line = String::new();
        q.reader.read_line(&mut line)?; // {"QMP": {...}}
        if !line.contains("\"QMP\"") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no QMP greeting",
            ));
        }
        q.execute("qmp_capabilities")?;
        Ok(q)
    }

    /// Runs a command without arguments and waits for its `return`.
    pub fn execute(&mut self, command: &str) -> io::Result<()> {
        writeln!(self.writer, "{{\"execute\":\"{command}\"}}")?;
        wait_return(&mut self.reader)
    }

    /// Tells QEMU to quit; QEMU may close the connection before or after
    /// it answers, so only the write has to succeed.
    pub fn quit(&mut self, timeout: Duration) -> io::Result<()> {
        self.writer.set_write_timeout(Some(timeout))?;
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        writeln!(self.writer, "{{\"execute\":\"quit\"}}")?;
        let _ = wait_return(&mut self.reader);
        Ok(())
    }
}

/// Tells QEMU to quit through its QMP socket.
pub fn qmp_quit(socket: &Path, timeout: Duration) -> io::Result<()> {
    Qmp::connect(socket, timeout)?.quit(timeout)
}

/// Reads QMP messages until a `return` (skipping asynchronous events).
fn wait_return(r: &mut impl BufRead) -> io::Result<()> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if line.contains("\"return\"") {
            return Ok(());
        }
        if line.contains("\"error\"") {
            return Err(io::Error::other(line.trim_end().to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;
    use std::thread;

    #[test]
    fn posts_shutdown() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0);
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8(req).unwrap()
        });
        assert_eq!(
            http_shutdown(addr, None, Duration::from_secs(2)).unwrap(),
            202
        );
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /shutdown HTTP/1.1\r\n"), "{req}");
    }

    #[test]
    fn qmp_conversation() {
        let dir = crate::tempdir::TempDir::new().unwrap();
        let path = dir.join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut w = c;
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut got = Vec::new();
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line.trim_end().to_string());
                w.write_all(b"{\"return\": {}}\r\n").unwrap();
            }
            got
        });
        qmp_quit(&path, Duration::from_secs(2)).unwrap();
        let got = server.join().unwrap();
        assert_eq!(
            got,
            [
                "{\"execute\":\"qmp_capabilities\"}",
                "{\"execute\":\"quit\"}"
            ]
        );
    }
}
