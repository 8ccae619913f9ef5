//! Strata's block stack, after FreeBSD's GEOM.
//!
//! - [`page`]: pages, scatter-gather lists and the counted map step;
//! - [`bio`]: the request that travels down the stack and back;
//! - [`stack`]: geoms, providers, consumers, access counts, orphaning and
//!   the dispatcher with its central check;
//! - [`fanout`]: splitting a bio over several consumers and gathering the
//!   children back (first error wins);
//! - [`meta`]: the on-disk metadata of labelled geoms;
//! - [`taste`]: classes, tasting and assembly from metadata;
//! - [`disk`]: the class over platform block devices;
//! - [`class`]: the other classes (md, nop, concat, stripe, …);
//! - [`config`]: the configuration language;
//! - [`ctl`]: statements carried out on a live stack, topology as JSON;
//! - [`keys`]: secrets, the key generator and the clock the encrypting
//!   classes use;
//! - `testing` (tests and the `testing` feature): fake disks and helpers.
#![no_std]
#![forbid(unsafe_code)]
extern crate alloc;
#[cfg(any(test, feature = "testing"))]
extern crate std;

pub mod bio;
pub mod cachestore;
pub mod class;
pub mod config;
pub mod ctl;
pub mod disk;
pub mod fanout;
pub mod keys;
pub mod meta;
pub mod page;
mod slab;
pub mod stack;
pub mod taste;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

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
