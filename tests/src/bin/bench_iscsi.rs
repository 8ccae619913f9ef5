//! iSCSI benchmark: prints figures, asserts nothing.
//!
//! The same kind of file (random data, `STRATA_BENCH_MB` MiB, default 256)
//! served in turn by tgt (`tgtd`, the file as LUN 1), hosted Strata and
//! the Strata appliance in QEMU (TCG; the file as its virtio disk,
//! exported over iSCSI and NBD at once). Clients: libiscsi's `iscsi-perf`
//! (reads only: 4 KiB random at 16 in flight, 1 MiB sequential at 8) and
//! `qemu-img bench` over `iscsi://` (64 KiB sequential write and read at
//! queue depth 16); and, for Strata, `qemu-img bench` over `nbd://` on the
//! same provider, side by side.
//!
//! Run with `tests/strata.sh bench-iscsi` or
//! `cargo run --release -p strata-tests --bin bench_iscsi`. Each figure
//! is the median of `STRATA_BENCH_ROUNDS` runs (default 3).
//! Environment: `STRATA_BENCH_SECS` (seconds per `iscsi-perf` run, default
//! 4), `STRATA_BENCH_SKIP_QEMU=1` to leave out the appliance.

use std::time::Instant;
use strata_tests::iscsi_clients::{random_file, run, Lun};
use strata_tests::tgt::{Tgt, TgtLun};
use strata_tests::{Platform, TempDir};

const IQN: &str = "iqn.2024-01.org.strata.bench:disk";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The columns: name, unit.
const COLUMNS: [(&str, &str); 4] = [
    ("perf rand 4K x16", "IOPS"),
    ("perf seq 1M x8", "MB/s"),
    ("qemu-img w 64K QD16", "MB/s"),
    ("qemu-img r 64K QD16", "MB/s"),
];

/// `iscsi-perf` for `secs` seconds: its final `iops average N (M MB/s)`.
fn iscsi_perf(
    url: &str,
    blocks: u32,
    inflight: u32,
    random: bool,
    secs: u64,
) -> Option<(f64, f64)> {
    let mut args = vec![
        "-t".to_string(),
        secs.to_string(),
        "-m".into(),
        inflight.to_string(),
        "-b".into(),
        blocks.to_string(),
    ];
    if random {
        args.push("-r".into());
    }
    args.push(url.into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(secs + 30, "iscsi-perf", &a);
    // Progress lines end in carriage returns; the summary is the last.
    let text = o.stdout.replace('\r', "\n");
    let line = text
        .lines()
        .rfind(|l| l.trim_start().starts_with("iops average"))?;
    let mut w = line.split_whitespace();
    let iops = w.nth(2)?.parse().ok()?;
    let mbs = w.next()?.trim_start_matches('(').parse().ok()?;
    Some((iops, mbs))
}

/// `qemu-img bench` over `url`: MB/s of `count` requests of 64 KiB at
/// queue depth 16.
fn qemu_img_bench(url: &str, write: bool, count: u64) -> Option<f64> {
    let c = count.to_string();
    let mut args = vec!["bench", "-f", "raw", "-c", &c, "-d", "16", "-s", "64k"];
    if write {
        args.extend(["-w", "--pattern=165"]);
    }
    args.push(url);
    let t = Instant::now();
    let o = run(600, "qemu-img", &args);
    if !o.ok {
        eprintln!("bench_iscsi: qemu-img bench {url}: {}", o.stderr);
        return None;
    }
    let secs = o
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_else(|| t.elapsed().as_secs_f64());
    Some((count * 65536) as f64 / secs / 1e6)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

struct Row {
    name: String,
    figures: Vec<Option<f64>>,
}

fn measure(name: &str, url: &str, iscsi: bool, mb: u64) -> Row {
    eprintln!("bench_iscsi: {name} ({url})");
    let rounds = env_u64("STRATA_BENCH_ROUNDS", 3).max(1);
    let secs = env_u64("STRATA_BENCH_SECS", 4);
    let count = mb * 16;
    let m = |f: &dyn Fn() -> Option<f64>| median((0..rounds).filter_map(|_| f()).collect());
    let figures = vec![
        if iscsi {
            m(&|| iscsi_perf(url, 8, 16, true, secs).map(|r| r.0))
        } else {
            None
        },
        if iscsi {
            m(&|| iscsi_perf(url, 2048, 8, false, secs).map(|r| r.1))
        } else {
            None
        },
        m(&|| qemu_img_bench(url, true, count)),
        m(&|| qemu_img_bench(url, false, count)),
    ];
    Row {
        name: name.into(),
        figures,
    }
}

fn strata(platform: Platform, file: &str, mb: u64, rows: &mut Vec<Row>) {
    let config = format!("export iscsi {IQN} vtbd0\nexport nbd vol vtbd0\n");
    let mut s = strata_tests::Start::new(platform)
        .disk(file)
        .config(&config);
    s.extra = vec!["--iscsi-port".into(), strata_tests::free_port().to_string()];
    let a = match s.spawn() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_iscsi: strata {platform:?}: {e}");
            return;
        }
    };
    let name = match platform {
        Platform::Hosted => "strata hosted",
        Platform::Qemu => "strata appliance (TCG)",
    };
    match a.ready.iter().find_map(|u| Lun::parse(u)) {
        Some(lun) => rows.push(measure(&format!("{name} iscsi"), &lun.url(), true, mb)),
        None => eprintln!("bench_iscsi: {name}: no iSCSI ready line in {:?}", a.ready),
    }
    rows.push(measure(&format!("{name} nbd"), &a.uri("vol"), false, mb));
    let _ = a.stop();
}

fn main() {
    let mb = env_u64("STRATA_BENCH_MB", 256);
    let skip_qemu = std::env::var_os("STRATA_BENCH_SKIP_QEMU").is_some();
    if !skip_qemu {
        strata_tests::bench::use_built_kernel(&strata_tests::strata_bin());
    }
    let dir = TempDir::new("iscsibench");
    let file = dir.path("bench.img");
    random_file(&file, mb);
    let f = file.display().to_string();
    let mut rows = Vec::new();

    match Tgt::start() {
        Ok(mut t) => {
            let lun = t.add(&TgtLun {
                iqn: IQN.into(),
                file: file.clone(),
                ro: false,
                chap: None,
                mutual: None,
                initiators: Vec::new(),
            });
            match lun {
                Ok(lun) => rows.push(measure("tgt iscsi", &lun.url(), true, mb)),
                Err(e) => eprintln!("bench_iscsi: tgt: {e}"),
            }
        }
        Err(e) => eprintln!("bench_iscsi: tgt: {e}"),
    }
    strata(Platform::Hosted, &f, mb, &mut rows);
    if !skip_qemu {
        strata(Platform::Qemu, &f, mb, &mut rows);
    }

    println!(
        "iSCSI benchmark: {mb} MiB file of random data, median of {} runs; iscsi-perf (libiscsi 1.19) and qemu-img bench",
        env_u64("STRATA_BENCH_ROUNDS", 3).max(1)
    );
    println!();
    print!("  {:<30}", "server");
    for (c, _) in COLUMNS {
        print!(" {c:>20}");
    }
    println!();
    print!("  {:<30}", "");
    for (_, u) in COLUMNS {
        print!(" {u:>20}");
    }
    println!();
    for r in &rows {
        print!("  {:<30}", r.name);
        for v in &r.figures {
            match v {
                Some(v) => print!(" {v:>20.1}"),
                None => print!(" {:>20}", "-"),
            }
        }
        println!();
    }
    let tgt = rows.iter().find(|r| r.name.starts_with("tgt"));
    if let Some(tgt) = tgt {
        println!();
        println!("  ratio to tgt:");
        for r in rows.iter().filter(|r| r.name.starts_with("strata")) {
            print!("  {:<30}", r.name);
            for (v, b) in r.figures.iter().zip(&tgt.figures) {
                match (v, b) {
                    (Some(v), Some(b)) if *b > 0.0 => print!(" {:>19.2}x", v / b),
                    _ => print!(" {:>20}", "-"),
                }
            }
            println!();
        }
    }
}
