//! iSCSI scenarios against hosted Strata (the same stack as a process),
//! through real clients (libiscsi's utilities, QEMU's iscsi driver,
//! `iscsi-test-cu`). The same scenarios run against tgt in `iscsi_tgt.rs`.
//!
//! The conformance run alone:
//! `cargo test --release -p strata-tests --test iscsi_hosted conformance -- --include-ignored --nocapture`

use strata_tests::iscsi_clients::{self as iscsi, Peer::Strata};
use strata_tests::Platform::Hosted;

#[test]
fn discovery() {
    iscsi::discovery(Strata(Hosted));
}

#[test]
fn inquiry_pages() {
    iscsi::inquiry_pages(Strata(Hosted));
}

#[test]
fn read_capacity() {
    iscsi::read_capacity(Strata(Hosted));
}

#[test]
fn qemu_img_roundtrip() {
    iscsi::qemu_img_roundtrip(Strata(Hosted));
}

#[test]
fn read_only() {
    iscsi::read_only(Strata(Hosted));
}

#[test]
fn chap() {
    iscsi::chap(Strata(Hosted));
}

#[test]
fn mutual_chap() {
    iscsi::mutual_chap(Strata(Hosted));
}

#[test]
fn initiator_list() {
    iscsi::initiator_list(Strata(Hosted));
}

#[test]
fn nbd_and_iscsi_same_provider() {
    iscsi::nbd_and_iscsi(Hosted);
}

/// libiscsi's whole suite (`iscsi-test-cu -d -S -t ALL`) against tgt and
/// then Strata, both counts printed; Strata must fail none.
#[test]
fn conformance() {
    iscsi::conformance(Hosted);
}
