//! The `/metrics` document, in Prometheus' text exposition format: every
//! provider's counters, and each protocol's copies and connections.

use super::{Service, PROTOCOLS};
use alloc::string::String;
use core::fmt::Write as _;
use geom::stack::ProviderStats;

/// A label value with `\`, `"` and newlines escaped (the exposition
/// format's rule).
fn label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

type Get = fn(&ProviderStats) -> u64;

/// The per-provider counters: name, help text, value.
const COUNTERS: [(&str, &str, Get); 12] = [
    ("reads", "Read requests started.", |p| {
        ProviderStats::get(&p.reads)
    }),
    ("writes", "Write requests started.", |p| {
        ProviderStats::get(&p.writes)
    }),
    ("flushes", "Flush requests started.", |p| {
        ProviderStats::get(&p.flushes)
    }),
    ("frees", "Discard and write-zeroes requests started.", |p| {
        ProviderStats::get(&p.frees)
    }),
    ("read_bytes", "Bytes requested by reads.", |p| {
        ProviderStats::get(&p.bytes_read)
    }),
    ("written_bytes", "Bytes carried by writes.", |p| {
        ProviderStats::get(&p.bytes_written)
    }),
    ("errors", "Requests completed with an error.", |p| {
        ProviderStats::get(&p.errors)
    }),
    (
        "read_ns",
        "Nanoseconds reads spent below the provider, summed.",
        |p| ProviderStats::get(&p.read_ns),
    ),
    (
        "write_ns",
        "Nanoseconds writes spent below the provider, summed.",
        |p| ProviderStats::get(&p.write_ns),
    ),
    (
        "mapped_bytes",
        "Bytes mapped by the provider's geom.",
        |p| p.data.bytes_mapped(),
    ),
    (
        "copied_bytes",
        "Bytes copied by the provider's geom.",
        |p| p.data.bytes_copied(),
    ),
    ("ios", "Requests of any kind started.", |p| {
        ProviderStats::get(&p.reads)
            + ProviderStats::get(&p.writes)
            + ProviderStats::get(&p.flushes)
            + ProviderStats::get(&p.frees)
    }),
];

impl Service {
    /// The `/metrics` document.
    pub fn metrics(&self) -> String {
        let mut s = String::new();
        for (name, help, get) in COUNTERS {
            let _ = writeln!(s, "# HELP strata_provider_{name}_total {help}");
            let _ = writeln!(s, "# TYPE strata_provider_{name}_total counter");
            for (_, p) in self.stack.providers() {
                let _ = writeln!(
                    s,
                    "strata_provider_{name}_total{{provider=\"{}\"}} {}",
                    label(&p.spec.name),
                    get(&p.stats)
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP strata_provider_in_flight Requests started on the provider and not yet done."
        );
        let _ = writeln!(s, "# TYPE strata_provider_in_flight gauge");
        for (_, p) in self.stack.providers() {
            let _ = writeln!(
                s,
                "strata_provider_in_flight{{provider=\"{}\"}} {}",
                label(&p.spec.name),
                p.in_flight
            );
        }
        for (i, proto) in PROTOCOLS.iter().enumerate() {
            let name = proto.name;
            let live = self.sessions.values().filter(|c| c.protocol == i);
            let (mut mapped, mut copied, mut open) = (
                self.closed_counters[i].bytes_mapped(),
                self.closed_counters[i].bytes_copied(),
                0,
            );
            for c in live {
                mapped += c.session.counters().bytes_mapped();
                copied += c.session.counters().bytes_copied();
                open += 1;
            }
            let _ = writeln!(
                s,
                "# HELP strata_{name}_copied_bytes_total Bytes copied between the network and bio pages for {name} (by the network stack and the engine)."
            );
            let _ = writeln!(s, "# TYPE strata_{name}_copied_bytes_total counter");
            let _ = writeln!(s, "strata_{name}_copied_bytes_total {copied}");
            let _ = writeln!(
                s,
                "# HELP strata_{name}_mapped_bytes_total Bytes of bio pages mapped for {name}."
            );
            let _ = writeln!(s, "# TYPE strata_{name}_mapped_bytes_total counter");
            let _ = writeln!(s, "strata_{name}_mapped_bytes_total {mapped}");
            let _ = writeln!(
                s,
                "# HELP strata_{name}_connections Open {name} connections."
            );
            let _ = writeln!(s, "# TYPE strata_{name}_connections gauge");
            let _ = writeln!(s, "strata_{name}_connections {open}");
        }
        s
    }
}
