//! Talking to a running appliance's management endpoint: `strata geom`
//! (`POST /geom` and `GET /geom`), `strata geom list` (the topology printed
//! like FreeBSD's `geom list`) and `strata gstat` (per-provider rates from
//! `/metrics`, like gstat(8)).
//!
//! The client is a few lines of HTTP/1.1 over a std socket (RFC 9112): one
//! request per connection, the reply read to its Content-Length or to EOF.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An HTTP reply: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

/// Sends one request and reads the reply. Every step is bounded by
/// `timeout`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let _ = s.set_nodelay(true);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: strata\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body.as_bytes());
    s.write_all(&req)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

/// Parses a whole HTTP/1.x reply (status line, headers, body).
pub fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("truncated HTTP reply"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("HTTP head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = crate::control::parse_status_line(lines.next().unwrap_or(""))
        .ok_or_else(|| bad("not an HTTP reply"))?;
    let mut body = &raw[end + 4..];
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().map_err(|_| bad("bad Content-Length"))?;
                if n > body.len() {
                    return Err(bad("HTTP body shorter than its Content-Length"));
                }
                body = &body[..n];
            }
        }
    }
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
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
    let v: Option<Value> = serde_json::from_str(&reply.body).ok();
    if reply.status != 200 {
        let msg = v
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .map_or_else(|| reply.body.trim().to_string(), str::to_string);
        return Err(msg);
    }
    let Some(v) = v else {
        return Ok(reply.body.clone());
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

/// The first of `keys` present in `v`.
fn field<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| v.get(*k))
}

fn text(v: &Value, keys: &[&str]) -> Option<String> {
    field(v, keys).and_then(|x| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

fn number(v: &Value, keys: &[&str]) -> Option<u64> {
    field(v, keys).and_then(Value::as_u64)
}

/// A size the way `geom list` prints it next to the byte count: `1.0G`,
/// `64M`, `512B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// `r1w1e0` from an access object (`{"r":1,"w":1,"e":0}`) or a mode string.
fn mode(v: &Value) -> String {
    match field(v, &["access", "mode"]) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => {
            let n = |k: &str| a.get(k).and_then(Value::as_i64).unwrap_or(0);
            format!("r{}w{}e{}", n("r"), n("w"), n("e"))
        }
        None => "r0w0e0".to_string(),
    }
}

/// `media_size` → `Mediasize`, `read_fail_percent` → `Read_fail_percent`:
/// the first letter capitalised and `_size` run together, as geom(8)
/// prints its keys.
fn geom_key(k: &str) -> String {
    let k = k.replace("_size", "size").replace("_offset", "offset");
    let mut c = k.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A scalar, or an array of scalars joined by ", ".
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            Some(a.iter().filter_map(scalar).collect::<Vec<_>>().join(", "))
        }
        _ => None,
    }
}

/// Resync progress `{"synced_bytes":S,"total_bytes":T}` as
/// `25% (S of T bytes)`.
fn progress(v: &Value) -> Option<String> {
    let done = number(v, &["synced_bytes", "synced", "done_bytes"])?;
    let total = number(v, &["total_bytes", "total"])?;
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    Some(format!("{pct}% ({done} of {total} bytes)"))
}

/// The class-specific lines of a geom (its `config` object): scalars as
/// `Key: value`, resync progress, and members dropped with their reason.
/// Per-member objects are shown with the consumers instead.
fn config_lines(out: &mut String, g: &Value) {
    let state = g
        .get("config")
        .and_then(|c| c.get("state"))
        .or_else(|| g.get("state"))
        .and_then(Value::as_str);
    if let Some(st) = state {
        let _ = writeln!(out, "State: {}", st.to_ascii_uppercase());
    }
    let Some(cfg) = g.get("config").and_then(Value::as_object) else {
        return;
    };
    // In key order, whatever order the document has them in.
    let mut keys: Vec<(&String, &Value)> = cfg.iter().collect();
    keys.sort_by_key(|(k, _)| *k);
    for (k, v) in keys {
        match k.as_str() {
            "state" => {}
            // Per-member objects are shown with the consumers.
            "members" if v.as_array().is_some_and(|a| a.iter().any(Value::is_object)) => {}
            "resync" => {
                if let Some(p) = progress(v) {
                    let _ = writeln!(out, "Resync: {p}");
                }
            }
            "dropped" => {
                for d in v.as_array().into_iter().flatten() {
                    let who = d.get("provider").and_then(Value::as_str).unwrap_or("?");
                    let why = d.get("reason").and_then(Value::as_str).unwrap_or("?");
                    let _ = writeln!(out, "Dropped: {who} ({why})");
                }
            }
            _ => {
                if let Some(text) = scalar(v) {
                    let _ = writeln!(out, "{}: {text}", geom_key(k));
                }
            }
        }
    }
}

/// Every provider in the topology by name, for the consumers' sizes.
fn providers_by_name(topology: &Value) -> BTreeMap<String, &Value> {
    let mut map = BTreeMap::new();
    for g in all_geoms(topology) {
        for p in
            g.1.get("providers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        {
            if let Some(n) = p.get("name").and_then(Value::as_str) {
                map.insert(n.to_string(), p);
            }
        }
    }
    map
}

/// (class name, geom) for every geom in the topology.
fn all_geoms(topology: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for class in topology
        .get("classes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let cname = text(class, &["name"]).unwrap_or_else(|| "?".into());
        for g in class
            .get("geoms")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push((cname.clone(), g));
        }
    }
    out
}

/// The size lines of a provider: media size, sector size, stripe.
fn size_lines(out: &mut String, p: &Value) {
    if let Some(size) = number(p, &["media_size", "mediasize"]) {
        let _ = writeln!(out, "   Mediasize: {size} ({})", human_size(size));
    }
    if let Some(ss) = number(p, &["sector_size", "sectorsize"]) {
        let _ = writeln!(out, "   Sectorsize: {ss}");
    }
    if let Some(st) = number(p, &["stripe_size"]).filter(|&s| s > 0) {
        let _ = writeln!(out, "   Stripesize: {st}");
        let off = number(p, &["stripe_offset"]).unwrap_or(0);
        let _ = writeln!(out, "   Stripeoffset: {off}");
    }
}

/// Prints the topology from `GET /geom` the way FreeBSD's `geom list`
/// does: per geom its name, class, state and class-specific settings,
/// then numbered providers and consumers with media size, sector size,
/// mode (`r1w1e0`) and state (a mirror member's sync progress included).
pub fn format_geom_list(topology: &Value) -> Result<String, String> {
    if topology.get("classes").and_then(Value::as_array).is_none() {
        return Err("the topology has no \"classes\" array".into());
    }
    let providers = providers_by_name(topology);
    let mut out = String::new();
    for (cname, g) in all_geoms(topology) {
        let gname = text(g, &["name"]).unwrap_or_else(|| "?".into());
        let _ = writeln!(out, "Geom name: {gname}");
        let _ = writeln!(out, "Class: {cname}");
        config_lines(&mut out, g);
        let members: Vec<&Value> = g
            .get("config")
            .and_then(|c| c.get("members"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m.is_object())
            .collect();
        let list = |key: &str| {
            g.get(key)
                .and_then(Value::as_array)
                .filter(|l| !l.is_empty())
        };
        if let Some(ps) = list("providers") {
            let _ = writeln!(out, "Providers:");
            for (i, p) in ps.iter().enumerate() {
                let name = text(p, &["name"]).unwrap_or_else(|| "?".into());
                let _ = writeln!(out, "{}. Name: {name}", i + 1);
                size_lines(&mut out, p);
                let _ = writeln!(out, "   Mode: {}", mode(p));
                if let Some(st) = text(p, &["state"]) {
                    let _ = writeln!(out, "   State: {st}");
                }
            }
        }
        if let Some(cs) = list("consumers") {
            let _ = writeln!(out, "Consumers:");
            for (i, c) in cs.iter().enumerate() {
                let name = text(c, &["provider", "name"]).unwrap_or_else(|| "?".into());
                let _ = writeln!(out, "{}. Name: {name}", i + 1);
                if let Some(p) = providers.get(&name) {
                    size_lines(&mut out, p);
                }
                let _ = writeln!(out, "   Mode: {}", mode(c));
                let member = members
                    .iter()
                    .find(|m| m.get("provider").and_then(Value::as_str) == Some(name.as_str()));
                let state = match member {
                    Some(m) => {
                        let st = text(m, &["state"]).unwrap_or_default().to_ascii_uppercase();
                        match progress(m) {
                            Some(p) if st != "ACTIVE" => format!("{st}, {p}"),
                            _ => st,
                        }
                    }
                    None => providers
                        .get(&name)
                        .and_then(|p| text(p, &["state"]))
                        .unwrap_or_else(|| "gone".into()),
                };
                let _ = writeln!(out, "   State: {state}");
            }
        }
        out.push('\n');
    }
    Ok(out)
}

/// One provider's counters from `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards and write-zeroes.
    pub frees: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes mapped by the provider's geom.
    pub mapped_bytes: u64,
    /// Bytes copied by the provider's geom.
    pub copied_bytes: u64,
    /// Sum of read latencies, ns.
    pub read_ns: u64,
    /// Sum of write latencies, ns.
    pub write_ns: u64,
    /// Requests in flight when sampled (a gauge).
    pub in_flight: u64,
}

/// Per-provider counters from the Prometheus text of `/metrics`, in the
/// order the providers first appear.
pub fn parse_metrics(text: &str) -> Vec<(String, Counters)> {
    let mut order: Vec<String> = Vec::new();
    let mut map: BTreeMap<String, Counters> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("strata_provider_") else {
            continue;
        };
        let Some((metric, rest)) = rest.split_once("{provider=\"") else {
            continue;
        };
        let metric = metric.strip_suffix("_total").unwrap_or(metric);
        let Some((name, rest)) = rest.split_once("\"}") else {
            continue;
        };
        let Ok(v) = rest.trim().parse::<u64>() else {
            continue;
        };
        let name = name.replace("\\\"", "\"").replace("\\\\", "\\");
        if !map.contains_key(&name) {
            order.push(name.clone());
        }
        let c = map.entry(name).or_default();
        match metric {
            "reads" => c.reads = v,
            "writes" => c.writes = v,
            "flushes" => c.flushes = v,
            "frees" => c.frees = v,
            "read_bytes" => c.read_bytes = v,
            "written_bytes" => c.written_bytes = v,
            "errors" => c.errors = v,
            "mapped_bytes" => c.mapped_bytes = v,
            "copied_bytes" => c.copied_bytes = v,
            "read_ns" => c.read_ns = v,
            "write_ns" => c.write_ns = v,
            "in_flight" => c.in_flight = v,
            _ => {}
        }
    }
    order
        .into_iter()
        .map(|n| {
            let c = map[&n];
            (n, c)
        })
        .collect()
}

/// One gstat(8)-style screen: the rates between two `/metrics` samples
/// taken `dt` apart (`w` is the interval asked for). L(q) is the queue
/// length at the second sample; ms/r and ms/w are mean latencies over the
/// interval; d/s counts discards, o/s flushes, err/s failed requests.
pub fn format_gstat(
    prev: &[(String, Counters)],
    cur: &[(String, Counters)],
    dt: Duration,
    w: Duration,
) -> String {
    let secs = dt.as_secs_f64().max(1e-6);
    let mut out = format!("dT: {:.3}s  w: {:.3}s\n", secs, w.as_secs_f64());
    out.push_str(
        " L(q)  ops/s    r/s   kBps   ms/r    w/s   kBps   ms/w    d/s    o/s  err/s Name\n",
    );
    for (name, c) in cur {
        let p = prev
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| *c)
            .unwrap_or_default();
        let delta = |a: u64, b: u64| a.saturating_sub(b) as f64;
        let rate = |a: u64, b: u64| delta(a, b) / secs;
        let ms_per = |ns: f64, ops: f64| if ops > 0.0 { ns / ops / 1e6 } else { 0.0 };
        let r = rate(c.reads, p.reads);
        let w = rate(c.writes, p.writes);
        let d = rate(c.frees, p.frees);
        let o = rate(c.flushes, p.flushes);
        let _ = writeln!(
            out,
            "{:>5} {:>6.0} {:>6.0} {:>6.0} {:>6.1} {:>6.0} {:>6.0} {:>6.1} {:>6.0} {:>6.0} {:>6.0} {}",
            c.in_flight,
            r + w + d + o,
            r,
            rate(c.read_bytes, p.read_bytes) / 1024.0,
            ms_per(delta(c.read_ns, p.read_ns), delta(c.reads, p.reads)),
            w,
            rate(c.written_bytes, p.written_bytes) / 1024.0,
            ms_per(delta(c.write_ns, p.write_ns), delta(c.writes, p.writes)),
            d,
            o,
            rate(c.errors, p.errors),
            name
        );
    }
    out
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
    fn replies() {
        let r = parse_reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nhello world")
            .unwrap();
        assert_eq!(
            r,
            Reply {
                status: 400,
                body: "hello".into()
            }
        );
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
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
    fn sizes() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(64 << 20), "64M");
        assert_eq!(human_size(1536 << 20), "1.5G");
    }

    #[test]
    fn geom_list_like_freebsd() {
        let topo: Value = serde_json::from_str(
            r#"{"classes":[
              {"name":"disk","geoms":[{"name":"vtbd1","state":"ok","config":{"errors":0},
                "providers":[{"name":"vtbd1","media_size":16777216,"sector_size":512,"stripe_size":0,"stripe_offset":0,
                  "access":{"r":1,"w":1,"e":1},"state":"ok","in_flight":0,"stats":{"reads":1}}],"consumers":[]},
               {"name":"vtbd4","state":"ok","config":{},
                "providers":[{"name":"vtbd4","media_size":16777216,"sector_size":512,"stripe_size":0,"stripe_offset":0,
                  "access":{"r":1,"w":1,"e":1},"state":"ok","in_flight":0}],"consumers":[]}]},
              {"name":"mirror","geoms":[{"name":"gm0","state":"ok",
                "config":{"state":"degraded","balance":"load","generation":5,
                  "members":[{"provider":"vtbd1","state":"active","synced_bytes":100,"total_bytes":100},
                             {"provider":"vtbd4","state":"synchronizing","synced_bytes":25,"total_bytes":100}],
                  "resync":{"synced_bytes":25,"total_bytes":100},
                  "dropped":[{"provider":"vtbd0.nop","reason":"write error"}]},
                "providers":[{"name":"mirror/gm0","media_size":16776704,"sector_size":512,"stripe_size":0,"stripe_offset":0,
                  "access":{"r":1,"w":1,"e":0},"state":"ok","in_flight":0}],
                "consumers":[{"provider":"vtbd1","access":{"r":1,"w":1,"e":1},"in_flight":0},
                             {"provider":"vtbd4","access":{"r":1,"w":1,"e":1},"in_flight":0}]}]},
              {"name":"stripe","geoms":[{"name":"st0","state":"ok",
                "config":{"stripe_size":65536,"labelled":true,"members":["mirror/gm0","mirror/gm1"]},
                "providers":[{"name":"stripe/st0","media_size":33423360,"sector_size":512,"stripe_size":65536,"stripe_offset":0,
                  "access":{"r":1,"w":1,"e":0},"state":"ok","in_flight":0}],
                "consumers":[{"provider":"mirror/gm0","access":{"r":1,"w":1,"e":0},"in_flight":0},
                             {"provider":"mirror/gm1","access":{"r":1,"w":1,"e":0},"in_flight":0}]}]}],
              "waiting":[],"now_ns":0}"#,
        )
        .unwrap();
        let text = format_geom_list(&topo).unwrap();
        let want = "\
Geom name: vtbd1
Class: disk
State: OK
Errors: 0
Providers:
1. Name: vtbd1
   Mediasize: 16777216 (16M)
   Sectorsize: 512
   Mode: r1w1e1
   State: ok

Geom name: vtbd4
Class: disk
State: OK
Providers:
1. Name: vtbd4
   Mediasize: 16777216 (16M)
   Sectorsize: 512
   Mode: r1w1e1
   State: ok

Geom name: gm0
Class: mirror
State: DEGRADED
Balance: load
Dropped: vtbd0.nop (write error)
Generation: 5
Resync: 25% (25 of 100 bytes)
Providers:
1. Name: mirror/gm0
   Mediasize: 16776704 (16.0M)
   Sectorsize: 512
   Mode: r1w1e0
   State: ok
Consumers:
1. Name: vtbd1
   Mediasize: 16777216 (16M)
   Sectorsize: 512
   Mode: r1w1e1
   State: ACTIVE
2. Name: vtbd4
   Mediasize: 16777216 (16M)
   Sectorsize: 512
   Mode: r1w1e1
   State: SYNCHRONIZING, 25% (25 of 100 bytes)

Geom name: st0
Class: stripe
State: OK
Labelled: true
Members: mirror/gm0, mirror/gm1
Stripesize: 65536
Providers:
1. Name: stripe/st0
   Mediasize: 33423360 (31.9M)
   Sectorsize: 512
   Stripesize: 65536
   Stripeoffset: 0
   Mode: r1w1e0
   State: ok
Consumers:
1. Name: mirror/gm0
   Mediasize: 16776704 (16.0M)
   Sectorsize: 512
   Mode: r1w1e0
   State: ok
2. Name: mirror/gm1
   Mode: r1w1e0
   State: gone

";
        assert_eq!(text, want);
        assert!(format_geom_list(&Value::Null).is_err());
    }

    const METRICS: &str = "# HELP x\nstrata_provider_reads_total{provider=\"vtbd0\"} 10\n\
        strata_provider_reads_total{provider=\"st0\"} 4\n\
        strata_provider_writes_total{provider=\"vtbd0\"} 20\n\
        strata_provider_read_bytes_total{provider=\"vtbd0\"} 40960\n\
        strata_provider_written_bytes_total{provider=\"vtbd0\"} 2048000\n\
        strata_provider_flushes_total{provider=\"vtbd0\"} 1\n\
        strata_provider_errors_total{provider=\"vtbd0\"} 2\n\
        strata_provider_read_ns_total{provider=\"vtbd0\"} 15000000\n\
        strata_provider_write_ns_total{provider=\"vtbd0\"} 50000000\n\
        strata_provider_in_flight{provider=\"vtbd0\"} 3\n\
        strata_nbd_copied_bytes_total 7\n";

    #[test]
    fn metrics_and_gstat() {
        let m = parse_metrics(METRICS);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0, "vtbd0");
        assert_eq!(
            m[0].1,
            Counters {
                reads: 10,
                writes: 20,
                flushes: 1,
                read_bytes: 40960,
                written_bytes: 2048000,
                errors: 2,
                read_ns: 15_000_000,
                write_ns: 50_000_000,
                in_flight: 3,
                ..Counters::default()
            }
        );
        let zero: Vec<(String, Counters)> = Vec::new();
        let text = format_gstat(&zero, &m, Duration::from_secs(2), Duration::from_secs(2));
        assert_eq!(
            text,
            "dT: 2.000s  w: 2.000s\n\
             \x20L(q)  ops/s    r/s   kBps   ms/r    w/s   kBps   ms/w    d/s    o/s  err/s Name\n\
             \x20   3     16      5     20    1.5     10   1000    2.5      0      0      1 vtbd0\n\
             \x20   0      2      2      0    0.0      0      0    0.0      0      0      0 st0\n"
        );
        // Rates are differences over the interval.
        let later = parse_metrics(&METRICS.replace("} 10\n", "} 30\n"));
        let text = format_gstat(&m, &later, Duration::from_secs(1), Duration::from_secs(1));
        assert!(
            text.contains("\n    3     20     20      0    0.0      0      0    0.0      0      0      0 vtbd0\n"),
            "{text}"
        );
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
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "{}");
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /geom HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 20\r\n"), "{req}");
    }
}
