//! Talking to a running appliance's management endpoint: `strata geom`
//! (`POST /geom` and `GET /geom`), `strata geom list` (the topology printed
//! like FreeBSD's `geom list`) and `strata gstat` (per-provider rates from
//! `/metrics`, like gstat(8)).
//!
//! This module holds the requests and the commands' argument handling;
//! [`list`] renders `geom list` and [`gstat`] the gstat screen. The HTTP
//! client is [`crate::http`].

pub mod gstat;
pub mod list;

pub use gstat::{format_gstat, parse_metrics, Counters};
pub use list::{format_geom_list, human_size};

use crate::http::{self, Reply};
use serde_json::Value;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Sends one request with a text body to the management endpoint at
/// `addr`, with the management token when given. Every step is bounded
/// by `timeout`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
    timeout: Duration,
) -> io::Result<Reply> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "text/plain")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    http::request(addr, method, path, body.as_bytes(), &headers, timeout)
}

/// The text `strata geom LINE...` sends: each argument is one line, except
/// that arguments that are all single words (an unquoted command such as
/// `strata geom mirror insert gm0 vtbd4`) make up one line together.
pub fn lines_from_args(args: &[String]) -> String {
    if args.iter().all(|a| !a.contains(char::is_whitespace)) {
        let mut s = args.join(" ");
        s.push('\n');
        return s;
    }
    let mut s = String::new();
    for a in args {
        s.push_str(a);
        if !a.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// What `POST /geom` answered, as a message for the user: `Ok` with a
/// summary of what changed, or `Err` with the appliance's error.
pub fn geom_result(reply: &Reply) -> Result<String, String> {
    let body = reply.text();
    let v: Option<Value> = serde_json::from_str(&body).ok();
    if reply.status != 200 {
        let msg = v
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .map_or_else(|| body.trim().to_string(), str::to_string);
        return Err(msg);
    }
    let Some(v) = v else {
        return Ok(body.into_owned());
    };
    let mut out = String::new();
    for r in v
        .get("results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let line = r.get("line").and_then(Value::as_u64).unwrap_or(0);
        let mut parts = Vec::new();
        for (key, verb) in [
            ("created", "created"),
            ("orphaned", "orphaned"),
            ("removed", "removed"),
        ] {
            let names: Vec<&str> = r
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !names.is_empty() {
                parts.push(format!("{verb} {}", names.join(", ")));
            }
        }
        if let Some(e) = r.get("exported").and_then(Value::as_str) {
            parts.push(format!("exported {e}"));
        }
        if parts.is_empty() {
            parts.push("done".to_string());
        }
        let _ = writeln!(out, "line {line}: {}", parts.join("; "));
    }
    Ok(out)
}

/// Parses gstat's `-I` value: seconds, or a number with an `s`, `ms` or
/// `us` suffix.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not an interval (e.g. 1, 0.5, 500ms, 2s)");
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !(0.001..=86_400.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread;

    #[test]
    fn args_to_lines() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            lines_from_args(&v(&["mirror", "insert", "gm0", "vtbd4"])),
            "mirror insert gm0 vtbd4\n"
        );
        assert_eq!(
            lines_from_args(&v(&["md create -s 1m md1", "export nbd x md1"])),
            "md create -s 1m md1\nexport nbd x md1\n"
        );
    }

    #[test]
    fn geom_replies() {
        let ok = Reply {
            status: 200,
            body: "{\"applied\":2,\"results\":[{\"line\":1,\"created\":[\"vtbd0.nop\"],\"orphaned\":[],\"removed\":[]},{\"line\":2,\"created\":[],\"orphaned\":[\"md1\"],\"removed\":[]},{\"line\":3,\"created\":[],\"orphaned\":[],\"removed\":[],\"exported\":\"vol\"}]}".into(),
        };
        assert_eq!(
            geom_result(&ok).unwrap(),
            "line 1: created vtbd0.nop\nline 2: orphaned md1\nline 3: exported vol\n"
        );
        let err = Reply {
            status: 400,
            body:
                "{\"error\":\"line 1, column 5: unknown\",\"line\":1,\"column\":5,\"applied\":0}\n"
                    .into(),
        };
        assert_eq!(geom_result(&err).unwrap_err(), "line 1, column 5: unknown");
        let plain = Reply {
            status: 404,
            body: "not found\n".into(),
        };
        assert_eq!(geom_result(&plain).unwrap_err(), "not found");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_interval("x").is_err());
        assert!(parse_interval("0").is_err());
    }

    #[test]
    fn client_round_trip() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.ends_with(b"md0\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0);
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
            String::from_utf8(req).unwrap()
        });
        let r = request(
            addr,
            "POST",
            "/geom",
            "md create -s 1m md0\n",
            Some("t0ken"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{}");
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /geom HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 20\r\n"), "{req}");
        assert!(req.contains("Authorization: Bearer t0ken\r\n"), "{req}");
    }
}
