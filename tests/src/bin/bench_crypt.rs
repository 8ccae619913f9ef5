//! Encryption benchmark: prints figures, asserts nothing.
//!
//! MB/s through a plain disk, eli (LUKS1, AES-256-XTS) with AES-NI and
//! with the portable fallback, and gbde the same two ways, on
//! hosted Strata and on the appliance in QEMU (TCG), with fio
//! (`ioengine=nbd`): 1 MiB sequential write and read at queue depth 8.
//! The fallback is selected with `STRATA_AES=soft` hosted (the `aes`
//! crate, which on a host may use AES-NI intrinsics of its own) and with
//! `--kernel-arg strata.aes=soft` in the appliance (truly portable code).
//! Then QEMU's own LUKS driver against Strata's eli on the same file
//! size, both driven by `qemu-io` (1 MiB asynchronous requests, eight at
//! a time; `qemu-img bench` of QEMU 7.2 cannot take the `--object` a
//! LUKS key needs): QEMU on a local file through `--image-opts
//! driver=luks`, Strata over NBD (a plain export measured the same way
//! shows what NBD costs).
//! From `/metrics`: bytes enciphered per byte written on the eli
//! provider.
//!
//! Run with `tests/strata.sh bench-crypt` (or `cargo run --release -p
//! strata-tests --bin bench_crypt`). Each figure is one run of
//! `STRATA_BENCH_SECS` seconds (default 3); `STRATA_BENCH_MB` is the disk
//! size (default 128); `STRATA_BENCH_SKIP_QEMU=1` leaves the appliance
//! out.

use std::time::Instant;
use strata_tests::bench::fio;
use strata_tests::{client, qemu_img_create_luks, strata_bin, Appliance, Platform, Start, TempDir};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A layout: row name, config, provider on top, whether AES is soft.
const LAYOUTS: [(&str, &str, &str, bool); 5] = [
    ("plain", "export nbd vol vtbd0\n", "vtbd0", false),
    (
        "eli aes-ni",
        "eli init -i 10 -p bench vtbd0\neli attach -p bench vtbd0\nexport nbd vol vtbd0.eli\n",
        "vtbd0.eli",
        false,
    ),
    (
        "eli soft",
        "eli init -i 10 -p bench vtbd0\neli attach -p bench vtbd0\nexport nbd vol vtbd0.eli\n",
        "vtbd0.eli",
        true,
    ),
    (
        "gbde aes-ni",
        "gbde init -i 10 -p bench vtbd0\ngbde attach -p bench vtbd0\nexport nbd vol vtbd0.bde\n",
        "vtbd0.bde",
        false,
    ),
    (
        "gbde soft",
        "gbde init -i 10 -p bench vtbd0\ngbde attach -p bench vtbd0\nexport nbd vol vtbd0.bde\n",
        "vtbd0.bde",
        true,
    ),
];

/// A counter of `/metrics` for one provider.
fn provider(metrics: &str, counter: &str, p: &str) -> Option<f64> {
    let prefix = format!("strata_provider_{counter}_total{{provider=\"{p}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// QEMU's own I/O path timed on the image `args` name: `qemu-io` with
/// `count` asynchronous 1 MiB requests, eight at a time (`aio_write` or
/// `aio_read`, then `aio_flush`), less the time the same command takes to
/// open the image and do nothing; MB/s. (`qemu-img bench` of QEMU 7.2
/// cannot take the `--object` a LUKS key needs.)
fn qemu_io_bench(args: &[&str], write: bool, count: u64) -> Option<f64> {
    let run = |cmds: &[String]| -> Option<f64> {
        let mut a: Vec<&str> = args.to_vec();
        for c in cmds {
            a.push("-c");
            a.push(c);
        }
        let t0 = Instant::now();
        let o = client("qemu-io", &a);
        let secs = t0.elapsed().as_secs_f64();
        if !o.ok || o.stdout.contains("failed") {
            eprintln!(
                "bench_crypt: qemu-io {args:?}: {}{}",
                o.stdout.trim(),
                o.stderr.trim()
            );
            return None;
        }
        Some(secs)
    };
    let mut cmds = Vec::new();
    for i in 0..count {
        let op = if write {
            "aio_write -q -P 0x5a"
        } else {
            "aio_read -q"
        };
        cmds.push(format!("{op} {}M 1M", i));
        if i % 8 == 7 {
            cmds.push("aio_flush".into());
        }
    }
    cmds.push("aio_flush".into());
    let open = run(&["aio_flush".to_string()])?;
    let total = run(&cmds)?;
    Some(count as f64 / (total - open).max(1e-3))
}

struct Row {
    name: String,
    write: Option<f64>,
    read: Option<f64>,
    enciphered_per_written: Option<f64>,
    engine: String,
}

fn measure(a: &Appliance, name: &str, top: &str, secs: u64, dir: &TempDir) -> Row {
    let uri = a.uri("vol");
    eprintln!("bench_crypt: {name} ({uri})");
    let size: u64 = client("nbdinfo", &["--size", &uri])
        .stdout
        .trim()
        .parse()
        .unwrap_or(0);
    let size_mb = (size >> 20).max(1);
    let write = fio(&uri, "write", "1M", 8, size_mb, secs, dir).map(|r| r.0);
    let read = fio(&uri, "read", "1M", 8, size_mb, secs, dir).map(|r| r.0);
    let m = a.http_get("/metrics");
    let written = provider(&m, "written_bytes", top).filter(|&w| w > 0.0);
    let enc = provider(&m, "encrypted_bytes", top);
    let topo = a.topology();
    let engine = topo["classes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["geoms"].as_array().into_iter().flatten())
        .find_map(|g| g["config"]["engine"].as_str().map(String::from))
        .unwrap_or_else(|| "-".into());
    Row {
        name: name.into(),
        write,
        read,
        enciphered_per_written: written.zip(enc).map(|(w, e)| e / w),
        engine,
    }
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.prec$}"))
}

fn main() {
    let secs = env_u64("STRATA_BENCH_SECS", 3);
    let disk_mb = env_u64("STRATA_BENCH_MB", 128);
    let skip_qemu = std::env::var_os("STRATA_BENCH_SKIP_QEMU").is_some();
    let bin = strata_bin();
    let mut platforms = vec![(Platform::Hosted, "hosted")];
    if !skip_qemu {
        strata_tests::bench::use_built_kernel(&bin);
        platforms.push((Platform::Qemu, "appliance"));
    }
    let dir = TempDir::new("bench-crypt");
    let mut rows = Vec::new();
    let mut bench_pairs = Vec::new();
    for (n, (platform, pname)) in platforms.iter().enumerate() {
        for (l, (name, config, top, soft)) in LAYOUTS.iter().enumerate() {
            let disk = dir.path(&format!("p{n}-l{l}.img"));
            let mut s = Start::new(*platform)
                .config(config)
                .disk(format!("{},size={disk_mb}M", disk.display()));
            if *soft {
                match platform {
                    Platform::Hosted => std::env::set_var("STRATA_AES", "soft"),
                    Platform::Qemu => s = s.kernel_arg("strata.aes=soft"),
                }
            }
            let row_name = format!("{pname} {name}");
            let started = s.spawn();
            std::env::remove_var("STRATA_AES");
            match started {
                Ok(a) => {
                    rows.push(measure(&a, &row_name, top, secs, &dir));
                    if !*soft && (*name == "plain" || *name == "eli aes-ni") {
                        let uri = a.uri("vol");
                        let size: u64 = client("nbdinfo", &["--size", &uri])
                            .stdout
                            .trim()
                            .parse()
                            .unwrap_or(0);
                        let count = (size >> 20).max(1);
                        let w = qemu_io_bench(&["-f", "raw", &uri], true, count);
                        let r = qemu_io_bench(&["-f", "raw", &uri], false, count);
                        bench_pairs.push((format!("Strata {pname} {name} over NBD"), w, r));
                    }
                    let _ = a.stop();
                }
                Err(e) => eprintln!("bench_crypt: {row_name}: {e}"),
            }
            let _ = std::fs::remove_file(&disk);
        }
    }

    // QEMU's LUKS driver on a local file of the same size.
    let pass = dir.path("pass");
    std::fs::write(&pass, b"bench").unwrap();
    let file = dir.path("qemu-luks.img");
    let object = format!("secret,id=s0,file={}", pass.display());
    let created = qemu_img_create_luks(&object, &file, &format!("{disk_mb}M"));
    if created.ok {
        let opts = format!("driver=luks,key-secret=s0,file.filename={}", file.display());
        let args = ["--object", object.as_str(), "--image-opts", opts.as_str()];
        let count = disk_mb.max(16);
        let w = qemu_io_bench(&args, true, count);
        let r = qemu_io_bench(&args, false, count);
        bench_pairs.push(("QEMU luks driver, local file".into(), w, r));
    } else {
        eprintln!(
            "bench_crypt: qemu-img create -f luks: {}",
            created.stderr.trim()
        );
    }

    println!("encryption benchmark: fio ioengine=nbd, 1 MiB requests at QD8, a {disk_mb} MiB disk, one run of {secs} s per figure");
    println!();
    println!(
        "  {:<26} {:>12} {:>12} {:>10} {:>20}",
        "", "seq write", "seq read", "engine", "enciphered/written"
    );
    for r in &rows {
        println!(
            "  {:<26} {:>7} MB/s {:>7} MB/s {:>10} {:>20}",
            r.name,
            fmt(r.write, 1),
            fmt(r.read, 1),
            r.engine,
            fmt(r.enciphered_per_written, 3)
        );
    }
    println!();
    println!("  against plain on the same platform (eli / plain):");
    for (_, pname) in &platforms {
        let find = |n: &str| rows.iter().find(|r| r.name == format!("{pname} {n}"));
        let Some(plain) = find("plain") else { continue };
        for n in ["eli aes-ni", "eli soft", "gbde aes-ni", "gbde soft"] {
            if let Some(r) = find(n) {
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
                    _ => "n/a".into(),
                };
                println!(
                    "    {pname:<10} {n:<12} write {:>6}  read {:>6}",
                    ratio(r.write, plain.write),
                    ratio(r.read, plain.read)
                );
            }
        }
    }
    println!();
    println!("  qemu-io, 1 MiB aio requests eight at a time (MB/s, write / read):");
    for (name, w, r) in &bench_pairs {
        println!("    {name:<42} {:>8} {:>8}", fmt(*w, 1), fmt(*r, 1));
    }
}
