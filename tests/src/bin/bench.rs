//! Benchmark: prints figures, asserts nothing.
//!
//! - QEMU start → ready (q35 and microvm, TCG);
//! - NBD sequential write and read of 64 MiB with `nbdcopy`, through the
//!   appliance in QEMU, through hosted Strata, and through `qemu-nbd`
//!   serving a file on the host, with ratios against qemu-nbd.
//!
//! Run with `tests/strata.sh bench` (or `cargo run --release -p
//! strata-tests --bin bench`). `STRATA_BENCH_MB` changes the size.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_tests::bench::{mb, nbdcopy, random_file, start_to_ready};
use strata_tests::{free_port, strata_bin, Platform, Start, TempDir};

struct Row {
    name: String,
    write_mbs: f64,
    read_mbs: f64,
}

fn measure(name: &str, uri: &str, src_file: &str) -> Row {
    let size = mb() as f64;
    let w = nbdcopy(src_file, uri);
    let r = nbdcopy(uri, "null:");
    Row {
        name: name.into(),
        write_mbs: size / w,
        read_mbs: size / r,
    }
}

fn qemu_nbd(file: &str, port: u16) -> Child {
    let c = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "bench",
            "-p",
            &port.to_string(),
            "-b",
            "127.0.0.1",
            "-e",
            "4",
            "--persistent",
            "--cache=writeback",
            file,
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("run qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    c
}

fn main() {
    let bin = strata_bin();
    strata_tests::bench::use_built_kernel(&bin);
    println!(
        "strata benchmark ({} MiB transfers, nbdcopy --connections=1)",
        mb()
    );
    println!();
    println!("QEMU start -> ready (TCG):");
    for m in ["q35", "microvm"] {
        match start_to_ready(m) {
            Some(s) => println!("  {m:<8} {:>8.0} ms", s * 1000.0),
            None => println!("  {m:<8}   failed"),
        }
    }
    let dir = TempDir::new("bench");
    let src = random_file(&dir);
    let size = format!("{}M", mb());
    let mut rows = Vec::new();

    let disk = dir.path("peer.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(mb() << 20).unwrap();
    let port = free_port();
    let mut peer = qemu_nbd(&disk.display().to_string(), port);
    rows.push(measure(
        "qemu-nbd (host)",
        &format!("nbd://127.0.0.1:{port}/bench"),
        &src,
    ));
    let _ = peer.kill();
    let _ = peer.wait();

    let hosted_disk = format!("{},size={size}", dir.path("hosted.img").display());
    match Start::new(Platform::Hosted).disk(&hosted_disk).spawn() {
        Ok(a) => {
            rows.push(measure("strata hosted", &a.uri("vtbd0"), &src));
            drop(a);
        }
        Err(e) => eprintln!("bench: hosted: {e}"),
    }
    let vm_disk = format!("{},size={size}", dir.path("vm.img").display());
    match Start::new(Platform::Qemu).disk(&vm_disk).spawn() {
        Ok(a) => {
            rows.push(measure(
                "strata appliance (q35, TCG)",
                &a.uri("vtbd0"),
                &src,
            ));
            drop(a);
        }
        Err(e) => eprintln!("bench: appliance: {e}"),
    }

    println!();
    println!("NBD sequential throughput, MB/s (ratio to qemu-nbd):");
    println!("  {:<30} {:>16} {:>16}", "server", "write", "read");
    let base = rows.first().map(|r| (r.write_mbs, r.read_mbs));
    for r in &rows {
        let (bw, br) = base.unwrap_or((r.write_mbs, r.read_mbs));
        println!(
            "  {:<30} {:>8.1} ({:>4.2}x) {:>8.1} ({:>4.2}x)",
            r.name,
            r.write_mbs,
            r.write_mbs / bw,
            r.read_mbs,
            r.read_mbs / br
        );
    }
}
