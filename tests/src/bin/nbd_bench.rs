//! NBD benchmark: prints figures and ratios, asserts nothing.
//!
//! One client (fio 3.33 with `ioengine=nbd`, i.e. libnbd) against four
//! servers serving the same raw file in turn: hosted Strata, `qemu-nbd`
//! (`-e 32 -x bench --cache=writeback`, plus `-t` so it outlives the
//! readiness probe), `nbdkit` (file plugin, started with
//! `setsid`), and the Strata appliance in QEMU (TCG, the file as its
//! virtio disk). Rows: 1 MiB sequential write and read (queue depth 8),
//! 4 KiB random read at queue depth 1 and 16, and sixteen jobs (sixteen
//! connections started together) of mixed random 4–64 KiB reads and
//! writes at queue depth 8, read and write MB/s summed. Plus QEMU start →
//! ready.
//!
//! Run with `cargo run --release -p strata-tests --bin nbd_bench`.
//! Each figure is the median of `STRATA_BENCH_ROUNDS` runs (default 3):
//! on a small shared machine single runs vary by a factor of two.
//! Environment: `STRATA_BENCH_MB` (file size, default 256),
//! `STRATA_BENCH_SECS` (seconds per run, default 4), `STRATA_BENCH_ROUNDS`,
//! `STRATA_BENCH_SKIP_QEMU=1` to leave out the appliance (and the boot
//! times), `STRATA_BENCH_SERVERS` to pick servers (a comma-separated list
//! of `qemu-nbd`, `nbdkit`, `hosted`, `appliance`).
//!
//! `STRATA_BENCH_BASELINE=REV` (a git revision of this repository) also
//! builds that revision (its tree exported with `git archive` into
//! `target/baseline/REV`, built there) and measures its hosted Strata and
//! appliance in the same run, in rows marked `REV`: the way to compare a
//! change with what came before it on the same machine at the same time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_tests::bench::start_to_ready;
use strata_tests::{free_port, root, strata_bin, Platform, Start, TempDir};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One fio workload.
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// fio jobs, one NBD connection each, started together.
    jobs: u32,
    /// Report IOPS (else MB/s).
    iops: bool,
}

const JOBS: [Job; 5] = [
    Job {
        name: "seq write 1M QD8",
        rw: "write",
        bs: "1M",
        depth: 8,
        jobs: 1,
        iops: false,
    },
    Job {
        name: "seq read 1M QD8",
        rw: "read",
        bs: "1M",
        depth: 8,
        jobs: 1,
        iops: false,
    },
    Job {
        name: "rand read 4K QD1",
        rw: "randread",
        bs: "4k",
        depth: 1,
        jobs: 1,
        iops: true,
    },
    Job {
        name: "rand read 4K QD16",
        rw: "randread",
        bs: "4k",
        depth: 16,
        jobs: 1,
        iops: true,
    },
    Job {
        name: "16 jobs randrw 4-64K",
        rw: "randrw",
        bs: "4k-64k",
        depth: 8,
        jobs: 16,
        iops: false,
    },
];

/// Runs one fio job against `uri`; returns MB/s or IOPS.
fn fio(uri: &str, job: &Job, size_mb: u64, secs: u64, dir: &TempDir) -> Option<f64> {
    let out = dir.path("fio.json");
    let st = Command::new("timeout")
        .arg((secs * 4 + 60).to_string())
        .arg("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", job.rw),
            &if job.bs.contains('-') {
                format!("--bsrange={}", job.bs)
            } else {
                format!("--bs={}", job.bs)
            },
            &format!("--iodepth={}", job.depth),
            &format!("--numjobs={}", job.jobs),
            "--group_reporting",
            // Each job in its own region of the file.
            &format!("--size={}M", size_mb / u64::from(job.jobs)),
            &format!("--offset_increment={}M", size_mb / u64::from(job.jobs)),
            "--time_based",
            &format!("--runtime={secs}"),
            "--ramp_time=1",
            "--randrepeat=0",
            "--output-format=json",
            &format!("--output={}", out.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        eprintln!("nbd_bench: fio {} against {uri} failed", job.name);
        return None;
    }
    let text = std::fs::read_to_string(&out).ok()?;
    // fio may print a line before its JSON.
    let text = &text[text.find('{')?..];
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    // A mixed job counts both directions.
    let sides: &[&str] = match job.rw {
        "randrw" | "rw" => &["read", "write"],
        rw if rw.contains("write") => &["write"],
        _ => &["read"],
    };
    let key = if job.iops { "iops" } else { "bw_bytes" };
    let total: Option<f64> = sides
        .iter()
        .map(|side| v["jobs"][0][side][key].as_f64())
        .sum();
    total.map(|t| if job.iops { t } else { t / 1e6 })
}

/// Waits until `port` completes an NBD greeting (or `limit` passes).
fn wait_nbd(port: u16, limit: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut g = [0u8; 8];
            if s.read_exact(&mut g).is_ok() && &g == b"NBDMAGIC" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(file: &str, port: u16) -> Option<Peer> {
    let c = Command::new("qemu-nbd")
        .args(["-t", "-f", "raw", "-x", "bench", "-p", &port.to_string()])
        .args(["-b", "127.0.0.1", "-e", "32", "--cache=writeback", file])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Peer(c);
    wait_nbd(port, Duration::from_secs(10)).then_some(p)
}

fn nbdkit(file: &str, port: u16) -> Option<Peer> {
    // nbdkit quits on SIGHUP: a session of its own keeps it alive.
    let c = Command::new("setsid")
        .args(["nbdkit", "-f", "-p", &port.to_string(), "-i", "127.0.0.1"])
        .args(["file", &format!("file={file}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Peer(c);
    wait_nbd(port, Duration::from_secs(10)).then_some(p)
}

struct Row {
    name: String,
    figures: Vec<Option<f64>>,
}

/// The median of `rounds` runs of each job (failed runs left out).
fn measure(name: &str, uri: &str, size_mb: u64, secs: u64, dir: &TempDir) -> Row {
    eprintln!("nbd_bench: {name} ({uri})");
    let rounds = env_u64("STRATA_BENCH_ROUNDS", 3).max(1);
    Row {
        name: name.into(),
        figures: JOBS
            .iter()
            .map(|j| {
                let mut v: Vec<f64> = (0..rounds)
                    .filter_map(|_| fio(uri, j, size_mb, secs, dir))
                    .collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            })
            .collect(),
    }
}

fn fill_random(path: &std::path::Path, mb: u64) {
    let st = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={mb}"),
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(st.success());
}

/// Builds revision `rev` of this repository apart (its own tree and
/// target directory under `target/baseline/`); returns its `strata` and
/// its kernel.
fn baseline(rev: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = root().join("target/baseline").join(rev);
    if !dir.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&dir).ok()?;
        let archive = Command::new("git")
            .args(["archive", "--format=tar", rev])
            .current_dir(root())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let st = Command::new("tar")
            .arg("-x")
            .current_dir(&dir)
            .stdin(archive.stdout?)
            .status()
            .ok()?;
        if !st.success() {
            eprintln!("nbd_bench: cannot export revision {rev}");
            return None;
        }
    }
    let target = dir.join("target");
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "-p", "image", "--bin", "strata"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&dir)
        .status()
        .ok()?;
    if !st.success() {
        eprintln!("nbd_bench: building {rev} failed");
        return None;
    }
    let strata = target.join("release/strata");
    let out = Command::new(&strata)
        .arg("build")
        .env_remove("STRATA_KERNEL")
        .current_dir(&dir)
        .output()
        .ok()?;
    let kernel = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    kernel.exists().then_some((strata, kernel))
}

fn main() {
    let size_mb = env_u64("STRATA_BENCH_MB", 256);
    let secs = env_u64("STRATA_BENCH_SECS", 4);
    let skip_qemu = std::env::var_os("STRATA_BENCH_SKIP_QEMU").is_some();
    let bin = strata_bin();
    if !skip_qemu {
        strata_tests::bench::use_built_kernel(&bin);
    }
    let wanted = std::env::var("STRATA_BENCH_SERVERS").ok();
    let want = |name: &str| {
        wanted
            .as_deref()
            .is_none_or(|w| w.split(',').any(|s| s.trim() == name))
    };
    let dir = TempDir::new("nbdbench");
    let file = dir.path("bench.img");
    fill_random(&file, size_mb);
    let f = file.display().to_string();
    let mut rows = Vec::new();

    let port = free_port();
    if let Some(p) = want("qemu-nbd").then(|| qemu_nbd(&f, port)).flatten() {
        rows.push(measure(
            "qemu-nbd",
            &format!("nbd://127.0.0.1:{port}/bench"),
            size_mb,
            secs,
            &dir,
        ));
        drop(p);
    }
    let port = free_port();
    if let Some(p) = want("nbdkit").then(|| nbdkit(&f, port)).flatten() {
        rows.push(measure(
            "nbdkit file",
            &format!("nbd://127.0.0.1:{port}/"),
            size_mb,
            secs,
            &dir,
        ));
        drop(p);
    }
    let base = std::env::var("STRATA_BENCH_BASELINE")
        .ok()
        .and_then(|rev| baseline(&rev).map(|b| (rev, b)));
    if let Some((rev, (strata, kernel))) = &base {
        if want("hosted") {
            let s = Start::new(Platform::Hosted).disk(&f);
            match s.build(strata.clone(), kernel.clone()).spawn() {
                Ok(a) => {
                    let name = format!("strata hosted {rev}");
                    rows.push(measure(&name, &a.uri("vtbd0"), size_mb, secs, &dir));
                    let _ = a.stop();
                }
                Err(e) => eprintln!("nbd_bench: hosted {rev}: {e}"),
            }
        }
        if !skip_qemu && want("appliance") {
            let s = Start::new(Platform::Qemu).disk(&f);
            match s.build(strata.clone(), kernel.clone()).spawn() {
                Ok(a) => {
                    let name = format!("strata appliance {rev}");
                    rows.push(measure(&name, &a.uri("vtbd0"), size_mb, secs, &dir));
                    let _ = a.stop();
                }
                Err(e) => eprintln!("nbd_bench: appliance {rev}: {e}"),
            }
        }
    }
    let hosted = want("hosted").then(|| Start::new(Platform::Hosted).disk(&f).spawn());
    match hosted.unwrap_or(Err(String::new())) {
        Ok(a) => {
            rows.push(measure(
                "strata hosted",
                &a.uri("vtbd0"),
                size_mb,
                secs,
                &dir,
            ));
            let _ = a.stop();
        }
        Err(e) if !e.is_empty() => eprintln!("nbd_bench: hosted: {e}"),
        Err(_) => {}
    }
    let mut boot = Vec::new();
    if !skip_qemu && want("appliance") {
        match Start::new(Platform::Qemu).disk(&f).spawn() {
            Ok(a) => {
                rows.push(measure(
                    "strata appliance (QEMU TCG)",
                    &a.uri("vtbd0"),
                    size_mb,
                    secs,
                    &dir,
                ));
                let _ = a.stop();
            }
            Err(e) => eprintln!("nbd_bench: appliance: {e}"),
        }
        for m in ["q35", "microvm"] {
            boot.push((m, start_to_ready(m)));
        }
    }

    println!(
        "NBD benchmark: fio 3.33 ioengine=nbd, {size_mb} MiB file of random data, median of {} runs of {secs} s",
        env_u64("STRATA_BENCH_ROUNDS", 3).max(1)
    );
    println!();
    print!("  {:<28}", "server");
    for j in &JOBS {
        print!(" {:>18}", j.name);
    }
    println!();
    print!("  {:<28}", "");
    for j in &JOBS {
        print!(" {:>18}", if j.iops { "IOPS" } else { "MB/s" });
    }
    println!();
    for r in &rows {
        print!("  {:<28}", r.name);
        for v in &r.figures {
            match v {
                Some(v) => print!(" {v:>18.1}"),
                None => print!(" {:>18}", "failed"),
            }
        }
        println!();
    }
    // Ratios of Strata to the better of the two peers, row by row.
    let best_peer: Vec<Option<f64>> = (0..JOBS.len())
        .map(|i| {
            rows.iter()
                .filter(|r| !r.name.starts_with("strata"))
                .filter_map(|r| r.figures[i])
                .reduce(f64::max)
        })
        .collect();
    println!();
    println!("  ratio to the best of qemu-nbd and nbdkit:");
    for r in rows.iter().filter(|r| r.name.starts_with("strata")) {
        print!("  {:<28}", r.name);
        for (v, b) in r.figures.iter().zip(&best_peer) {
            match (v, b) {
                (Some(v), Some(b)) if *b > 0.0 => print!(" {:>17.2}x", v / b),
                _ => print!(" {:>18}", "-"),
            }
        }
        println!();
    }
    if !boot.is_empty() {
        println!();
        println!("  QEMU start -> ready (TCG):");
        for (m, t) in boot {
            match t {
                Some(s) => println!("    {m:<8} {:>8.0} ms", s * 1000.0),
                None => println!("    {m:<8}   failed"),
            }
        }
    }
}
