//! Build script: hands the kernel's linker script to the linker, for the
//! bare-metal target only (the hosted build links as an ordinary program).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=linker.ld");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let dir =
            PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
        let script = dir.join("linker.ld");
        // Only the binaries (the kernel) use the script: the library and its
        // tests never link a kernel image.
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    }
}
