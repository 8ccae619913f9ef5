//! raid5 benchmark: prints figures, asserts nothing.
//!
//! raid5 against a stripe over the same three disks, on hosted Strata
//! and on the appliance in QEMU (TCG), with fio (`ioengine=nbd`): 1 MiB
//! sequential write and read at queue depth 8, 4 KiB random write and
//! read at queue depth 16; for raid5, the same reads degraded (one
//! member taken out with `raid5 remove`), and raid5 labelled with `-n`
//! (no partial parity log) beside the default, whose ratio is the cost
//! of the write-hole protection. From `/metrics` after the workload:
//! bytes mapped per byte written on the array's provider
//! (`strata_provider_mapped_bytes_total` over
//! `strata_provider_written_bytes_total`), bytes written to the disks per
//! byte written to the array, and the stripe cache's hit rate
//! (`strata_bufcache_hits_total` and `strata_bufcache_misses_total` with
//! `cache="raid5/r0"`; "n/a" when the appliance has no such metric).
//!
//! Run with `tests/strata.sh bench-raid5` (or `cargo run --release -p
//! strata-tests --bin bench_raid5`). Each figure is one run of
//! `STRATA_BENCH_SECS` seconds (default 3); `STRATA_BENCH_MB` is the
//! size of each disk (default 64); `STRATA_BENCH_SKIP_QEMU=1` leaves the
//! appliance out. A new raid5 computes its parity first; the figures are
//! taken once that is done.

use strata_tests::bench::fio;
use strata_tests::{client, strata_bin, Appliance, Platform, Start, TempDir};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One fio workload: name, rw, block size, queue depth, IOPS (else MB/s).
type Job = (&'static str, &'static str, &'static str, u32, bool);

const JOBS: [Job; 4] = [
    ("seq write 1M QD8", "write", "1M", 8, false),
    ("seq read 1M QD8", "read", "1M", 8, false),
    ("rand write 4K QD16", "randwrite", "4k", 16, true),
    ("rand read 4K QD16", "randread", "4k", 16, true),
];

/// The reads run again on the degraded raid5.
const DEGRADED: [Job; 2] = [
    ("degraded seq read 1M", "read", "1M", 8, false),
    ("degraded rand read 4K", "randread", "4k", 16, true),
];

/// A layout: row name, config, provider on top.
const LAYOUTS: [(&str, &str, &str); 3] = [
    (
        "stripe 64k",
        "stripe label -s 64k st vtbd0 vtbd1 vtbd2\nexport nbd vol stripe/st\n",
        "stripe/st",
    ),
    (
        "raid5 64k",
        "raid5 label r0 vtbd0 vtbd1 vtbd2\nexport nbd vol raid5/r0\n",
        "raid5/r0",
    ),
    (
        "raid5 64k -n (no PPL)",
        "raid5 label -n r0 vtbd0 vtbd1 vtbd2\nexport nbd vol raid5/r0\n",
        "raid5/r0",
    ),
];

/// A sample of `/metrics`: `NAME{LABEL="VALUE"} N`.
fn sample(metrics: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    let prefix = format!("{name}{{{label}=\"{value}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn provider(metrics: &str, counter: &str, p: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("strata_provider_{counter}_total"),
        "provider",
        p,
    )
}

struct Row {
    name: String,
    /// Each of [`JOBS`] then [`DEGRADED`]: (figure, IOPS?).
    figures: Vec<Option<(f64, bool)>>,
    mapped_per_written: Option<f64>,
    disk_per_written: Option<f64>,
    cache_hit_rate: Option<f64>,
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.prec$}"))
}

/// Waits (up to 10 minutes) until no raid5 in `/status` is still copying:
/// a new array computes its parity first, and measuring during that
/// would measure the resync.
fn wait_complete(a: &Appliance, name: &str) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let st = a.status();
        let busy = st["raid5"]
            .as_array()
            .is_some_and(|l| l.iter().any(|r| r["state"] == "rebuilding"));
        if !busy {
            return;
        }
        if std::time::Instant::now() > until {
            eprintln!("bench_raid5: {name}: still rebuilding after 600 s, measured anyway");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn run(a: &Appliance, name: &str, top: &str, secs: u64, dir: &TempDir) -> Row {
    let uri = a.uri("vol");
    wait_complete(a, name);
    eprintln!("bench_raid5: {name} ({uri})");
    let size: u64 = client("nbdinfo", &["--size", &uri])
        .stdout
        .trim()
        .parse()
        .unwrap_or(0);
    let size_mb = (size >> 20).max(1);
    let mut figures = Vec::new();
    for (_, rw, bs, depth, iops) in JOBS {
        let r = fio(&uri, rw, bs, depth, size_mb, secs, dir);
        figures.push(r.map(|(mbs, n, _)| (if iops { n } else { mbs }, iops)));
    }
    let m = a.http_get("/metrics");
    let written = provider(&m, "written_bytes", top).filter(|&w| w > 0.0);
    let mapped = provider(&m, "mapped_bytes", top);
    let disks: Option<f64> = (0..3)
        .map(|i| provider(&m, "written_bytes", &format!("vtbd{i}")))
        .sum();
    let hits = sample(&m, "strata_bufcache_hits_total", "cache", top);
    let misses = sample(&m, "strata_bufcache_misses_total", "cache", top);
    let cache_hit_rate = match (hits, misses) {
        (Some(h), Some(m)) if h + m > 0.0 => Some(h / (h + m)),
        _ => None,
    };
    let mut row = Row {
        name: name.into(),
        figures,
        mapped_per_written: written.zip(mapped).map(|(w, m)| m / w),
        disk_per_written: written.zip(disks).map(|(w, d)| d / w),
        cache_hit_rate,
    };
    if top.starts_with("raid5/") && !name.contains("-n") {
        let (code, body) = a.http_post("/geom", "raid5 remove r0 vtbd2\n");
        if code == 200 {
            for (_, rw, bs, depth, iops) in DEGRADED {
                let r = fio(&uri, rw, bs, depth, size_mb, secs, dir);
                row.figures
                    .push(r.map(|(mbs, n, _)| (if iops { n } else { mbs }, iops)));
            }
        } else {
            eprintln!("bench_raid5: raid5 remove r0 vtbd2: HTTP {code}: {body}");
        }
    }
    row
}

fn main() {
    let secs = env_u64("STRATA_BENCH_SECS", 3);
    let disk_mb = env_u64("STRATA_BENCH_MB", 64);
    let skip_qemu = std::env::var_os("STRATA_BENCH_SKIP_QEMU").is_some();
    let bin = strata_bin();
    let mut platforms = vec![(Platform::Hosted, "hosted")];
    if !skip_qemu {
        strata_tests::bench::use_built_kernel(&bin);
        platforms.push((Platform::Qemu, "appliance"));
    }
    let dir = TempDir::new("bench-raid5");
    let mut rows = Vec::new();
    for (n, (platform, pname)) in platforms.iter().enumerate() {
        for (l, (name, config, top)) in LAYOUTS.iter().enumerate() {
            let mut s = Start::new(*platform).config(config);
            for i in 0..3 {
                s = s.disk(format!(
                    "{},size={disk_mb}M",
                    dir.path(&format!("p{n}-l{l}-d{i}.img")).display()
                ));
            }
            let row_name = format!("{pname} {name}");
            match s.spawn() {
                Ok(a) => {
                    rows.push(run(&a, &row_name, top, secs, &dir));
                    let _ = a.stop();
                }
                Err(e) => eprintln!("bench_raid5: {row_name}: {e}"),
            }
            for i in 0..3 {
                let _ = std::fs::remove_file(dir.path(&format!("p{n}-l{l}-d{i}.img")));
            }
        }
    }

    println!(
        "raid5 benchmark: fio ioengine=nbd, 3 disks of {disk_mb} MiB, one run of {secs} s per figure"
    );
    println!();
    print!("  {:<32}", "");
    for (name, ..) in JOBS.iter().chain(&DEGRADED) {
        print!(" {name:>22}");
    }
    println!(
        " {:>15} {:>15} {:>15}",
        "mapped/written", "disk/written", "cache hit rate"
    );
    for r in &rows {
        print!("  {:<32}", r.name);
        for f in &r.figures {
            match f {
                Some((v, true)) => print!(" {:>17.0} IOPS", v),
                Some((v, false)) => print!(" {:>17.1} MB/s", v),
                None => print!(" {:>22}", "-"),
            }
        }
        for _ in r.figures.len()..JOBS.len() + DEGRADED.len() {
            print!(" {:>22}", "");
        }
        println!(
            " {:>15} {:>15} {:>15}",
            fmt(r.mapped_per_written, 3),
            fmt(r.disk_per_written, 2),
            fmt(r.cache_hit_rate.map(|h| h * 100.0), 1)
                + if r.cache_hit_rate.is_some() { "%" } else { "" }
        );
    }
    println!();
    println!("  raid5 against stripe, and the write-hole protection (raid5 / raid5 -n):");
    for (_, pname) in &platforms {
        let find = |suffix: &str| {
            rows.iter()
                .find(|r| r.name == format!("{pname} {suffix}"))
                .map(|r| r.figures.clone())
        };
        let (Some(stripe), Some(r5), Some(nopl)) =
            (find(LAYOUTS[0].0), find(LAYOUTS[1].0), find(LAYOUTS[2].0))
        else {
            continue;
        };
        for (i, (job, ..)) in JOBS.iter().enumerate() {
            let ratio = |a: &[Option<(f64, bool)>], b: &[Option<(f64, bool)>]| match (a[i], b[i]) {
                (Some((x, _)), Some((y, _))) if y > 0.0 => format!("{:.2}x", x / y),
                _ => "-".into(),
            };
            println!(
                "  {pname:<10} {job:<20} raid5/stripe {:>7}   raid5/raid5 -n {:>7}",
                ratio(&r5, &stripe),
                ratio(&r5, &nopl)
            );
        }
    }
}
