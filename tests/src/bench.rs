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
