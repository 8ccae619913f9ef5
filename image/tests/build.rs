//! `strata build` and the kernel build step of `strata run`, with a stand-in
//! for cargo (named by `$CARGO`) so that failures can be staged.

use image::tempdir::TempDir;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A script that plays cargo: prints `stderr` and exits with `code`.
fn fake_cargo(dir: &TempDir, stderr: &str, code: i32) -> PathBuf {
    let p = dir.join("cargo");
    std::fs::write(
        &p,
        format!("#!/bin/sh\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit {code}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn strata(args: &[&str], cargo: &PathBuf, root: &TempDir) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env("CARGO", cargo)
        .env("STRATA_ROOT", root.path())
        .env_remove("STRATA_KERNEL")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn missing_target_says_how_to_add_it() {
    let dir = TempDir::new().unwrap();
    let cargo = fake_cargo(
        &dir,
        "   Compiling appliance v0.1.0\nerror[E0463]: can't find crate for `core`\n  = note: the `x86_64-unknown-none` target may not be installed",
        101,
    );
    let out = strata(&["build"], &cargo, &dir);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("rustup target add x86_64-unknown-none"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn failed_build_shows_cargo_errors_without_progress() {
    let dir = TempDir::new().unwrap();
    let cargo = fake_cargo(
        &dir,
        "   Compiling appliance v0.1.0\nerror[E0583]: file not found for module `kernel`",
        101,
    );
    let out = strata(&["build"], &cargo, &dir);
    assert_eq!(out.status.code(), Some(3));
    let e = stderr(&out);
    assert!(e.contains("building the kernel failed"), "{e}");
    assert!(e.contains("error[E0583]"), "{e}");
    assert!(!e.contains("Compiling"), "{e}");
}

#[test]
fn successful_build_prints_the_kernel_path() {
    let dir = TempDir::new().unwrap();
    let cargo = fake_cargo(&dir, "   Compiling appliance v0.1.0", 0);
    let k = dir.join("target/kernel/x86_64-unknown-none/release/strata-kernel");
    std::fs::create_dir_all(k.parent().unwrap()).unwrap();
    std::fs::write(&k, b"\x7fELF").unwrap();
    let out = strata(&["build"], &cargo, &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", k.display())
    );
    // Quiet on success.
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

#[test]
fn strata_kernel_skips_the_build() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-system-x86_64 not installed: test skipped");
        return;
    }
    let dir = TempDir::new().unwrap();
    // A cargo that would fail: it must not be run.
    let cargo = fake_cargo(&dir, "error: must not run", 101);
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--accel", "tcg"])
        .env("CARGO", &cargo)
        .env("STRATA_KERNEL", dir.join("missing-kernel"))
        .output()
        .unwrap();
    // The named kernel does not exist: said so, and cargo never ran.
    assert_eq!(out.status.code(), Some(3));
    let e = stderr(&out);
    assert!(
        e.contains("STRATA_KERNEL=") && e.contains("no such file"),
        "{e}"
    );
    assert!(!e.contains("must not run"), "{e}");
}
