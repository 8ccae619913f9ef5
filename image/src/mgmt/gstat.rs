//! `strata gstat`: per-provider counters from the Prometheus text of
//! `/metrics`, and the rates between two samples printed like gstat(8).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
