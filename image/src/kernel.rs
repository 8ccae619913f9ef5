//! Finding the workspace and building the appliance kernel.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Target triple the kernel is built for.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";
/// Name of the kernel binary in the `appliance` crate.
pub const KERNEL_BIN: &str = "strata-kernel";

/// The workspace root: `$STRATA_ROOT`, else the directory above this
/// crate as it was when the tool was compiled.
pub fn workspace_root() -> PathBuf {
    match std::env::var_os("STRATA_ROOT") {
        Some(r) if !r.is_empty() => PathBuf::from(r),
        _ => {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            p.canonicalize().unwrap_or(p)
        }
    }
}

/// Cargo's target directory for kernel builds, apart from the host
/// build's so that neither waits on the other's lock.
pub fn kernel_target_dir(root: &Path) -> PathBuf {
    root.join("target").join("kernel")
}

/// Where `cargo build` puts the kernel.
pub fn kernel_path(root: &Path) -> PathBuf {
    kernel_target_dir(root)
        .join(KERNEL_TARGET)
        .join("release")
        .join(KERNEL_BIN)
}

/// The cargo command that builds the kernel (run in `root`).
pub fn build_command(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root)
        .args(["build", "--release", "-p", "appliance", "--bin", KERNEL_BIN])
        .args(["--target", KERNEL_TARGET, "--target-dir"])
        .arg(kernel_target_dir(root))
        // Flags meant for a host build would replace the kernel's
        // `relocation-model=static` from .cargo/config.toml.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    c
}

/// Why the kernel could not be had.
#[derive(Debug)]
pub enum BuildError {
    /// `$STRATA_KERNEL` names a file that does not exist.
    NoSuchKernel(PathBuf),
    /// cargo could not be started.
    NoCargo(std::io::Error),
    /// The Rust target for the kernel is not installed.
    MissingTarget,
    /// cargo failed; its output.
    Failed(String),
    /// cargo succeeded but the kernel is not where it should be.
    NotProduced(PathBuf),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoSuchKernel(p) => {
                write!(f, "STRATA_KERNEL={}: no such file", p.display())
            }
            BuildError::NoCargo(e) => write!(f, "cannot run cargo to build the kernel: {e}"),
            BuildError::MissingTarget => write!(
                f,
                "the Rust target {KERNEL_TARGET} is not installed; add it with:\n    rustup target add {KERNEL_TARGET}"
            ),
            BuildError::Failed(out) => write!(f, "building the kernel failed:\n{out}"),
            BuildError::NotProduced(p) => {
                write!(f, "cargo built no kernel at {}", p.display())
            }
        }
    }
}

impl std::error::Error for BuildError {}

/// Cargo's output without its progress lines (`Compiling …`,
/// `Downloaded …`), which say nothing about a failure.
pub fn without_progress(output: &str) -> String {
    const PROGRESS: [&str; 5] = [
        "Compiling ",
        "Checking ",
        "Downloading ",
        "Downloaded ",
        "Updating ",
    ];
    output
        .lines()
        .filter(|l| !PROGRESS.iter().any(|p| l.trim_start().starts_with(p)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// True when cargo's output says the target's standard library is missing.
pub fn says_target_missing(output: &str) -> bool {
    output.contains("target may not be installed")
        || (output.contains("can't find crate for `core`") && output.contains(KERNEL_TARGET))
}

/// The kernel to boot: `$STRATA_KERNEL` if set, else [`build_kernel`].
pub fn ensure_kernel() -> Result<PathBuf, BuildError> {
    match std::env::var_os("STRATA_KERNEL").filter(|k| !k.is_empty()) {
        Some(k) => {
            let k = PathBuf::from(k);
            if k.is_file() {
                Ok(k)
            } else {
                Err(BuildError::NoSuchKernel(k))
            }
        }
        None => build_kernel(),
    }
}

/// Builds the kernel (cargo decides whether anything needs rebuilding) and
/// returns its path. Cargo's output is kept and shown only on failure.
pub fn build_kernel() -> Result<PathBuf, BuildError> {
    let root = workspace_root();
    let out = build_command(&root).output().map_err(BuildError::NoCargo)?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let text = without_progress(&text);
        if says_target_missing(&text) {
            return Err(BuildError::MissingTarget);
        }
        return Err(BuildError::Failed(text));
    }
    let k = kernel_path(&root);
    if k.is_file() {
        Ok(k)
    } else {
        Err(BuildError::NotProduced(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let root = Path::new("/w");
        assert_eq!(
            kernel_path(root),
            Path::new("/w/target/kernel/x86_64-unknown-none/release/strata-kernel")
        );
        let c = build_command(root);
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "build",
                "--release",
                "-p",
                "appliance",
                "--bin",
                "strata-kernel",
                "--target",
                "x86_64-unknown-none",
                "--target-dir",
                "/w/target/kernel"
            ]
        );
    }

    #[test]
    fn default_root_is_the_workspace() {
        if std::env::var_os("STRATA_ROOT").is_none() {
            assert!(workspace_root().join("appliance/Cargo.toml").is_file());
        }
    }

    #[test]
    fn drops_progress_lines() {
        let out = "   Compiling geom v0.1.0\nerror[E0583]: file not found\n  --> a.rs:1:1\n";
        assert_eq!(
            without_progress(out),
            "error[E0583]: file not found\n  --> a.rs:1:1\n"
        );
    }

    #[test]
    fn recognises_missing_target() {
        assert!(says_target_missing(
            "error[E0463]: can't find crate for `core`\n  = note: the `x86_64-unknown-none` target may not be installed"
        ));
        assert!(!says_target_missing("error: could not compile `appliance`"));
    }
}
