//! Benchmark of stacking: prints figures, asserts nothing.
//!
//! - NBD sequential write and read (`nbdcopy`) through hosted Strata with
//!   0, 1, 3 and 5 pass-through layers (nop and single-member stripe,
//!   alternating) over one file disk;
//! - for each class (disk, md, nop, concat, stripe, mirror): bytes mapped
//!   and bytes copied per byte served, from `/metrics` after the same
//!   workload, and the NBD engine's own copies per byte served.
//!
//! Run with `cargo run --release -p strata-tests --bin bench_layers`.
//! `STRATA_BENCH_MB` changes the size (default 64).

use strata_tests::bench::{mb, nbdcopy, random_file};
use strata_tests::{Appliance, Platform, Start, TempDir};

/// The config for `depth` pass-through layers over vtbd0, and the
/// provider on top.
fn layered_config(depth: usize) -> (String, String) {
    let mut cfg = String::new();
    let mut top = String::from("vtbd0");
    for i in 0..depth {
        if i % 2 == 0 {
            cfg.push_str(&format!("nop create {top}\n"));
            top = format!("{top}.nop");
        } else {
            cfg.push_str(&format!("stripe create -s 64k s{i} {top}\n"));
            top = format!("stripe/s{i}");
        }
    }
    cfg.push_str(&format!("export nbd vol {top}\n"));
    (cfg, top)
}

/// Every `strata_provider_<metric>_total` sample, as (provider, value).
fn metric(metrics: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("strata_provider_{name}_total{{provider=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (p, v) = rest.split_once("\"} ")?;
            Some((p.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn nbd_copied(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("strata_nbd_copied_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn spawn(dir: &TempDir, cfg: &str, disks: usize, size_mb: u64) -> Appliance {
    let mut s = Start::new(Platform::Hosted).config(cfg);
    for i in 0..disks {
        s = s.disk(format!(
            "{},size={}M",
            dir.path(&format!("layer-d{i}.img")).display(),
            size_mb
        ));
    }
    s.spawn().expect("start hosted strata")
}

fn main() {
    let size = mb();
    let dir = TempDir::new("bench-layers");
    let src = random_file(&dir);

    println!("NBD through stacked pass-through layers (hosted, {size} MiB, nbdcopy, 1 connection)");
    println!(
        "{:>6}  {:<28} {:>10} {:>10} {:>14}",
        "layers", "top provider", "write MB/s", "read MB/s", "mapped+copied"
    );
    let mut base: Option<(f64, f64)> = None;
    for depth in [0usize, 1, 3, 5] {
        let (cfg, top) = layered_config(depth);
        let a = spawn(&dir, &cfg, 1, size + 1);
        let uri = a.uri("vol");
        let w = size as f64 / nbdcopy(&src, &uri);
        let r = size as f64 / nbdcopy(&uri, "null:");
        let m = a.http_get("/metrics");
        let touched: u64 = metric(&m, "mapped_bytes")
            .iter()
            .chain(metric(&m, "copied_bytes").iter())
            .map(|(_, v)| v)
            .sum();
        let (bw, br) = *base.get_or_insert((w, r));
        println!(
            "{depth:>6}  {top:<28} {w:>10.1} {r:>10.1} {touched:>14}   ({:.2}x / {:.2}x of 0 layers)",
            w / bw,
            r / br
        );
        let _ = a.stop();
    }

    println!();
    println!("Bytes mapped and copied per byte served, by class (hosted, {size} MiB written then read per export)");
    let per = size + 1;
    let cfg = format!(
        "md create -s {per}m md0\n\
         nop create vtbd0\n\
         concat create c0 vtbd1 vtbd2\n\
         stripe create -s 64k s0 vtbd3 vtbd4\n\
         mirror label gm0 vtbd5 vtbd6\n\
         export nbd disk vtbd7\n\
         export nbd md md0\n\
         export nbd nop vtbd0.nop\n\
         export nbd concat concat/c0\n\
         export nbd stripe stripe/s0\n\
         export nbd mirror mirror/gm0\n"
    );
    let a = spawn(&dir, &cfg, 8, per);
    let exports = [
        ("disk", "vtbd7"),
        ("md", "md0"),
        ("nop", "vtbd0.nop"),
        ("concat", "concat/c0"),
        ("stripe", "stripe/s0"),
        ("mirror", "mirror/gm0"),
    ];
    let before = a.http_get("/metrics");
    for (export, _) in exports {
        let uri = a.uri(export);
        nbdcopy(&src, &uri);
        nbdcopy(&uri, "null:");
    }
    let after = a.http_get("/metrics");
    let delta = |name: &str, provider: &str| -> u64 {
        let get = |m: &str| {
            metric(m, name)
                .into_iter()
                .find(|(p, _)| p == provider)
                .map_or(0, |(_, v)| v)
        };
        get(&after).saturating_sub(get(&before))
    };
    println!(
        "{:<8} {:<12} {:>14} {:>14} {:>12} {:>12}",
        "class", "provider", "mapped", "copied", "mapped/B", "copied/B"
    );
    let mut served_total = 0u64;
    for (class, provider) in exports {
        // Bytes served: what the export's provider read and wrote.
        let served_bytes = delta("read_bytes", provider) + delta("written_bytes", provider);
        served_total += served_bytes;
        let served = served_bytes.max(1) as f64;
        let mapped = delta("mapped_bytes", provider);
        let copied = delta("copied_bytes", provider);
        println!(
            "{class:<8} {provider:<12} {mapped:>14} {copied:>14} {:>12.3} {:>12.3}",
            mapped as f64 / served,
            copied as f64 / served
        );
    }
    let engine = nbd_copied(&after).saturating_sub(nbd_copied(&before));
    println!(
        "{:<8} {:<12} {:>14} {:>14} {:>12} {:>12.3}",
        "nbd",
        "(engine)",
        "-",
        engine,
        "-",
        engine as f64 / served_total.max(1) as f64
    );
    let _ = a.stop();
}
