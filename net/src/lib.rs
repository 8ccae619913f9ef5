//! Sans-I/O protocol engines: bytes in, bytes out, bios to the stack.
//!
//! The same engines run on smoltcp sockets in the appliance and on std
//! sockets in the hosted build, and are tested and fuzzed on the host.
//! - [`session`]: the one interface every engine offers the service;
//! - [`nbd`]: the NBD server (doc/proto.md of the NBD project);
//! - [`http`]: the management endpoint's HTTP/1.1 engine.
#![no_std]
#![forbid(unsafe_code)]
extern crate alloc;
#[cfg(test)]
extern crate std;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_support;
pub mod http;
pub mod iscsi;
pub mod nbd;
pub mod session;

/// The suite runs `cargo test --release`, where integer overflow wraps;
/// `tests/strata.sh test` also runs this crate's tests (its model and fuzz
/// tests among them) in the test profile with `STRATA_OVERFLOW_CHECKS=1`,
/// and there overflow must panic.
#[cfg(test)]
mod overflow_checks {
    #[test]
    fn overflow_panics_in_the_checked_run() {
        if std::env::var_os("STRATA_OVERFLOW_CHECKS").is_none() {
            return;
        }
        let r = std::panic::catch_unwind(|| {
            core::hint::black_box(u64::MAX) + core::hint::black_box(1u64)
        });
        assert!(
            r.is_err(),
            "STRATA_OVERFLOW_CHECKS is set but this build has no overflow checks"
        );
    }
}
