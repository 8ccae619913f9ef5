//! `strata geom list`: the topology from `GET /geom` printed the way
//! FreeBSD's `geom list` prints it.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
