//! The `/metrics` document, in Prometheus' text exposition format: every
//! provider's counters, the payload budget and memory disks' memory, and
//! each protocol's copies and connections.

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
const COUNTERS: [(&str, &str, Get); 14] = [
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
    (
        "encrypted_bytes",
        "Bytes the provider's geom enciphered (eli, gbde).",
        |p| p.data.bytes_encrypted(),
    ),
    (
        "decrypted_bytes",
        "Bytes the provider's geom deciphered (eli, gbde).",
        |p| p.data.bytes_decrypted(),
    ),
    ("ios", "Requests of any kind started.", |p| {
        ProviderStats::get(&p.reads)
            + ProviderStats::get(&p.writes)
            + ProviderStats::get(&p.flushes)
            + ProviderStats::get(&p.frees)
    }),
];

impl Service {
    /// Each buffer cache's figures (a raid5's stripe cache), by its name.
    fn cache_metrics(&self, s: &mut String) {
        let caches = self.stack.caches();
        type Figure = (
            &'static str,
            &'static str,
            &'static str,
            fn(&bufcache::Stats) -> u64,
        );
        let figures: [Figure; 9] = [
            (
                "hits_total",
                "counter",
                "Lookups answered from the cache.",
                |c| c.hits,
            ),
            (
                "misses_total",
                "counter",
                "Lookups that waited for the backing store or a slot.",
                |c| c.misses,
            ),
            (
                "evictions_total",
                "counter",
                "Clean blocks dropped to make room.",
                |c| c.evictions,
            ),
            (
                "writebacks_total",
                "counter",
                "Dirty blocks written back.",
                |c| c.writebacks,
            ),
            (
                "read_errors_total",
                "counter",
                "Block reads the backing store failed.",
                |c| c.read_errors,
            ),
            (
                "write_errors_total",
                "counter",
                "Block writes the backing store failed.",
                |c| c.write_errors,
            ),
            (
                "dirty_blocks",
                "gauge",
                "Blocks changed and not yet written back.",
                |c| c.dirty,
            ),
            ("blocks", "gauge", "Blocks held now.", |c| c.blocks),
            (
                "capacity_blocks",
                "gauge",
                "Most blocks the cache holds.",
                |c| c.capacity,
            ),
        ];
        for (name, kind, help, get) in figures {
            let _ = writeln!(s, "# HELP strata_bufcache_{name} {help}");
            let _ = writeln!(s, "# TYPE strata_bufcache_{name} {kind}");
            for (cache, stats, _) in &caches {
                let _ = writeln!(
                    s,
                    "strata_bufcache_{name}{{cache=\"{}\"}} {}",
                    label(cache),
                    get(stats)
                );
            }
        }
    }

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
        self.cache_metrics(&mut s);
        let b = self.budget.counters();
        let md_limit = self.limits.md_memory_bytes.unwrap_or(0);
        let gauges: [(&str, &str, &str, u64); 13] = [
            ("payload_budget_bytes", "gauge", "Most payload bytes all connections may hold in pages together.", self.budget.limit()),
            ("payload_in_use_bytes", "gauge", "Payload bytes held in pages by all connections now (requests, unsent replies, spare pages).", self.payload_in_use()),
            ("payload_peak_bytes", "gauge", "Most payload bytes held at once, as seen when admitting a request.", b.peak_bytes),
            ("payload_waiting", "gauge", "Connections waiting for their next request to be admitted into the payload budget.", self.budget.waiting() as u64),
            ("payload_grants_total", "counter", "Requests admitted into the payload budget.", b.grants),
            ("payload_waits_total", "counter", "Requests that waited before they were admitted into the payload budget.", b.waits),
            ("payload_oversized_total", "counter", "Requests larger than the whole payload budget, admitted alone.", b.oversized),
            ("payload_no_memory_total", "counter", "Admitted requests whose pages the heap could not give (retried).", b.no_memory),
            ("md_limit_bytes", "gauge", "Most bytes memory disks may commit (0: no limit known).", md_limit),
            ("md_committed_bytes", "gauge", "Bytes committed to memory disks (their full sizes).", geom::class::md::committed_bytes(&self.stack)),
            ("http_timeout_ms", "gauge", "Time a management request has to arrive, in milliseconds (0: none).", self.limits.http_timeout_ms),
            ("nbd_stall_timeout_ms", "gauge", "Time an NBD client holding payload pages may move no byte, in milliseconds (0: none).", self.limits.nbd_stall_timeout_ms),
            ("bio_deadline_ms", "gauge", "Time a disk may keep a request before it is given up on, in milliseconds (0: none).", self.limits.bio_deadline_ms),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(s, "# HELP strata_{name} {help}");
            let _ = writeln!(s, "# TYPE strata_{name} {kind}");
            let _ = writeln!(s, "strata_{name} {value}");
        }
        for (i, proto) in PROTOCOLS.iter().enumerate() {
            let name = proto.name;
            let cc = self.conn_counters[i];
            for (what, help, value) in [
                ("accepted", "accepted", cc.accepted),
                (
                    "refused",
                    "refused at the connection limit (or while not serving)",
                    cc.refused,
                ),
                ("timeouts", "ended by a timeout", cc.timed_out),
            ] {
                let _ = writeln!(
                    s,
                    "# HELP strata_{name}_{what}_total {name} connections {help}."
                );
                let _ = writeln!(s, "# TYPE strata_{name}_{what}_total counter");
                let _ = writeln!(s, "strata_{name}_{what}_total {value}");
            }
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
        self.export_metrics(&mut s);
        s
    }

    /// Each export's requests (an iSCSI LUN's, an NBD export's), labelled
    /// with its protocol and name.
    fn export_metrics(&self, s: &mut String) {
        type Figure = (
            &'static str,
            &'static str,
            fn(&super::exports::ExportStats) -> u64,
        );
        let figures: [Figure; 6] = [
            ("reads", "Reads the export's sessions made.", |e| e.reads),
            ("writes", "Writes the export's sessions made.", |e| e.writes),
            ("flushes", "Flushes the export's sessions made.", |e| {
                e.flushes
            }),
            (
                "others",
                "Discards, write-zeroes and allocation queries the export's sessions made.",
                |e| e.others,
            ),
            ("read_bytes", "Bytes the export's sessions read.", |e| {
                e.read_bytes
            }),
            ("written_bytes", "Bytes the export's sessions wrote.", |e| {
                e.written_bytes
            }),
        ];
        for (name, help, get) in figures {
            let _ = writeln!(s, "# HELP strata_export_{name}_total {help}");
            let _ = writeln!(s, "# TYPE strata_export_{name}_total counter");
            for e in self.exports.all() {
                let _ = writeln!(
                    s,
                    "strata_export_{name}_total{{protocol=\"{}\",export=\"{}\"}} {}",
                    PROTOCOLS[e.protocol].name,
                    label(&e.info.name),
                    get(&e.stats)
                );
            }
        }
    }
}
