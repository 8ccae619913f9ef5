//! The iSCSI scenarios against tgt (`tgtd`), a real target: they check
//! the harness itself (each client call, each parser), so that a failure
//! of the same scenario against Strata is Strata's.

use strata_tests::iscsi_clients::{self as iscsi, Peer::Tgt, Want};

#[test]
fn discovery() {
    iscsi::discovery(Tgt);
}

#[test]
fn inquiry_pages() {
    iscsi::inquiry_pages(Tgt);
}

#[test]
fn read_capacity() {
    iscsi::read_capacity(Tgt);
}

#[test]
fn qemu_img_roundtrip() {
    iscsi::qemu_img_roundtrip(Tgt);
}

#[test]
fn read_only() {
    iscsi::read_only(Tgt);
}

#[test]
fn chap() {
    iscsi::chap(Tgt);
}

#[test]
fn mutual_chap() {
    iscsi::mutual_chap(Tgt);
}

#[test]
fn initiator_list() {
    iscsi::initiator_list(Tgt);
}

/// The whole libiscsi suite against tgt: it runs to its end, and the
/// parse agrees with CUnit's own summary.
#[test]
fn conformance() {
    let t = iscsi::serve(Tgt, &[Want::new("iqn.2024-01.org.strata.test:tgt", 64)], "");
    let c = iscsi::conformance_run("tgt", &t.luns[0]);
    assert!(c.completed(), "the run did not complete: {}", c.output);
    let s = c.summary.unwrap();
    let (passed, skipped, failed) = c.counts();
    assert_eq!(failed, s.failed, "{}", c.report("tgt"));
    assert_eq!(passed + skipped, s.passed, "{}", c.report("tgt"));
    assert!(passed > 100, "{}", c.report("tgt"));
    assert!(
        skipped > 0,
        "the skips were not told apart: {}",
        c.report("tgt")
    );
}
