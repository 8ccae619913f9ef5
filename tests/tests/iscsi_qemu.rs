//! iSCSI scenarios against the appliance booted in QEMU (TCG), through
//! real clients (libiscsi's utilities, QEMU's iscsi driver,
//! `iscsi-test-cu`): only a booted appliance runs its drivers, smoltcp and
//! event loop. The same scenarios run against tgt in `iscsi_tgt.rs`.
//!
//! The conformance run alone:
//! `cargo test --release -p strata-tests --test iscsi_qemu conformance -- --include-ignored --nocapture`

use strata_tests::iscsi_clients::{self as iscsi, Peer::Strata};
use strata_tests::Platform::Qemu;

#[test]
fn discovery() {
    iscsi::discovery(Strata(Qemu));
}

#[test]
fn inquiry_pages() {
    iscsi::inquiry_pages(Strata(Qemu));
}

#[test]
fn read_capacity() {
    iscsi::read_capacity(Strata(Qemu));
}

#[test]
fn qemu_img_roundtrip() {
    iscsi::qemu_img_roundtrip(Strata(Qemu));
}

#[test]
fn read_only() {
    iscsi::read_only(Strata(Qemu));
}

#[test]
fn chap() {
    iscsi::chap(Strata(Qemu));
}

#[test]
fn mutual_chap() {
    iscsi::mutual_chap(Strata(Qemu));
}

#[test]
fn initiator_list() {
    iscsi::initiator_list(Strata(Qemu));
}

#[test]
fn nbd_and_iscsi_same_provider() {
    iscsi::nbd_and_iscsi(Qemu);
}

/// libiscsi's whole suite (`iscsi-test-cu -d -S -t ALL`) against tgt and
/// then Strata, both counts printed; Strata must fail none.
#[test]
fn conformance() {
    iscsi::conformance(Qemu);
}
