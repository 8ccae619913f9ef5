//! Pieces shared by the benchmark programs (`src/bin/*`): transfer size,
//! timed `nbdcopy`, and a file of random data (so that nothing on the way
//! can skip zeroes).

use crate::{Platform, Start, TempDir};
use std::process::Command;
use std::time::Instant;

/// Transfer size in MiB: `STRATA_BENCH_MB`, default 64.
pub fn mb() -> u64 {
    std::env::var("STRATA_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Seconds `nbdcopy --connections=1 SRC DST` takes; panics if it fails.
pub fn nbdcopy(src: &str, dst: &str) -> f64 {
    let t = Instant::now();
    let o = Command::new("nbdcopy")
        .args(["--connections=1", src, dst])
        .output()
        .expect("run nbdcopy");
    assert!(
        o.status.success(),
        "nbdcopy {src} {dst}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed().as_secs_f64()
}

/// Writes `mb()` MiB of random bytes to a file in `dir`; returns its path.
pub fn random_file(dir: &TempDir) -> String {
    let p = dir.path("random.bin");
    let st = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", p.display()),
            "bs=1M",
            &format!("count={}", mb()),
            "status=none",
        ])
        .status()
        .expect("run dd");
    assert!(st.success());
    p.display().to_string()
}

/// Seconds from starting `strata run --machine MACHINE` (TCG, no disk) to
/// its ready line, or `None` (with the reason on stderr) if it failed.
pub fn start_to_ready(machine: &str) -> Option<f64> {
    let mut s = Start::new(Platform::Qemu);
    s.extra = vec!["--machine".into(), machine.into()];
    let t = Instant::now();
    match s.spawn() {
        Ok(a) => {
            let secs = t.elapsed().as_secs_f64();
            drop(a);
            Some(secs)
        }
        Err(e) => {
            eprintln!("bench: {machine}: {e}");
            None
        }
    }
}

/// One fio run against an NBD export (`ioengine=nbd`, libnbd): `rw`
/// (`write`, `randread`, …) with block size `bs` at queue depth `depth`
/// over the first `size_mb` MiB, for `secs` seconds after a second of
/// ramp. Returns (MB/s, IOPS, bytes moved), or `None` (with the reason
/// on stderr) if fio failed.
pub fn fio(
    uri: &str,
    rw: &str,
    bs: &str,
    depth: u32,
    size_mb: u64,
    secs: u64,
    dir: &TempDir,
) -> Option<(f64, f64, u64)> {
    let out = dir.path("fio.json");
    let st = Command::new("timeout")
        .arg((secs * 4 + 60).to_string())
        .arg("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            &format!("--size={size_mb}M"),
            "--time_based",
            &format!("--runtime={secs}"),
            "--ramp_time=1",
            "--randrepeat=0",
            "--output-format=json",
            &format!("--output={}", out.display()),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        eprintln!("bench: fio {rw} {bs} QD{depth} against {uri} failed");
        return None;
    }
    let text = std::fs::read_to_string(&out).ok()?;
    // fio may print a line before its JSON.
    let text = &text[text.find('{')?..];
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let j = &v["jobs"][0][side];
    Some((
        j["bw_bytes"].as_f64()? / 1e6,
        j["iops"].as_f64()?,
        j["io_bytes"].as_u64().unwrap_or(0),
    ))
}

/// Builds the appliance kernel with `strata build` and points
/// `STRATA_KERNEL` at it, so every QEMU boot of the benchmark uses the
/// build just made (left unset if the build fails: `strata run` then
/// builds it itself).
pub fn use_built_kernel(strata: &std::path::Path) {
    let kernel = Command::new(strata)
        .arg("build")
        .output()
        .expect("strata build");
    if kernel.status.success() {
        let path = String::from_utf8_lossy(&kernel.stdout).trim().to_string();
        std::env::set_var("STRATA_KERNEL", path);
    }
}
