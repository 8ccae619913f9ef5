//! The iSCSI fuzz driver ([`super::fuzzing`]) in the normal test suite:
//! the seed corpus of real initiator transcripts (`net/fuzz/corpus/iscsi`,
//! captured from iscsi-inq, iscsi-readcapacity16, iscsi-ls, qemu-img,
//! qemu-io and iscsi-test-cu against hosted Strata) replayed as is, then
//! mutated at random for `STRATA_FUZZ_SECS` seconds (default 20, as the
//! NBD run) through the same driver as the cargo-fuzz target. The seed is
//! printed; set `STRATA_FUZZ_SEED` to replay a run. A failing input is
//! written to `net/fuzz/artifacts/iscsi/crash-<seed>-<n>` (where
//! cargo-fuzz puts its own) before the test fails.
//!
//! The suite runs these in the release profile and again in the test
//! profile with `STRATA_OVERFLOW_CHECKS=1`, where an integer overflow in
//! the engine panics and so fails the run.

use super::fuzzing;
use super::pdu::BHS_LEN;
use crate::fuzz_support::bounded::{self, MutRng};
use alloc::string::String;
use alloc::vec::Vec;

fn corpus() -> Vec<(String, Vec<u8>)> {
    bounded::corpus("iscsi")
}

/// The driver runs one input at a time (the units' state is shared);
/// these tests take turns as a whole, so none spins on its lock.
static TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where each PDU of an initiator stream starts (no digests assumed:
/// the captured clients negotiate none), as far as the lengths hold.
fn pdu_starts(v: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + BHS_LEN <= v.len() {
        out.push(at);
        let h = &v[at..at + BHS_LEN];
        let dl = (usize::from(h[5]) << 16) | (usize::from(h[6]) << 8) | usize::from(h[7]);
        at += BHS_LEN + usize::from(h[4]) * 4 + dl + (4 - dl % 4) % 4;
    }
    out
}

const U32S: [u32; 12] = [
    0,
    1,
    511,
    512,
    4096,
    8192,
    65536,
    262_144,
    1 << 20,
    0x7fff_ffff,
    0xffff_fffe,
    u32::MAX,
];

/// Data segment lengths (24 bits).
const U24S: [u32; 8] = [0, 1, 3, 48, 8192, 65536, 262_145, 0xff_ffff];

/// Opcodes an initiator sends, and a few it must not.
const OPCODES: [u8; 12] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1c, 0x20, 0x25, 0x3f,
];

/// CDB opcodes the SCSI layer knows, and some it does not.
const CDBS: [u8; 24] = [
    0x00, 0x03, 0x12, 0x1a, 0x15, 0x25, 0x28, 0x2a, 0x2e, 0x2f, 0x35, 0x41, 0x42, 0x55, 0x5a, 0x5e,
    0x5f, 0x88, 0x89, 0x8a, 0x93, 0x9e, 0xa0, 0xa3,
];

/// Login and text keys that change how the connection runs.
const KEYS: [&[u8]; 12] = [
    b"HeaderDigest=CRC32C\0",
    b"DataDigest=CRC32C\0",
    b"InitialR2T=Yes\0",
    b"ImmediateData=No\0",
    b"MaxRecvDataSegmentLength=512\0",
    b"MaxBurstLength=512\0",
    b"FirstBurstLength=512\0",
    b"MaxOutstandingR2T=4\0",
    b"SessionType=Discovery\0",
    b"SendTargets=All\0",
    b"AuthMethod=CHAP\0",
    b"TargetName=iqn.2026-12.org.strata:fuzz\0",
];

/// One random change to `v`; `other` is another corpus entry to splice.
fn mutate_once(v: &mut Vec<u8>, other: &[u8], rng: &mut MutRng) {
    let len = v.len();
    let at = rng.below(len + 1);
    let starts = pdu_starts(v);
    // A PDU header to change in place, if any.
    let pdu = (!starts.is_empty()).then(|| starts[rng.below(starts.len())]);
    match rng.below(16) {
        0 if len > 0 => v[at.min(len - 1)] ^= 1 << rng.below(8),
        1 if len > 0 => v[at.min(len - 1)] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)],
        2 if len >= 4 => {
            let at = at.min(len - 4);
            v[at..at + 4].copy_from_slice(&U32S[rng.below(U32S.len())].to_be_bytes());
        }
        3 if len > 0 => {
            let n = 1 + rng.below((len - at.min(len - 1)).min(4096));
            let at = at.min(len - 1);
            v.drain(at..(at + n).min(len));
        }
        4 if len > 0 => {
            let at = at.min(len - 1);
            let n = 1 + rng.below((len - at).min(4096));
            let copy = v[at..at + n].to_vec();
            let to = rng.below(len + 1);
            v.splice(to..to, copy);
        }
        5 if !other.is_empty() => {
            let from = pdu_starts(other);
            let from = if from.is_empty() {
                rng.below(other.len())
            } else {
                from[rng.below(from.len())]
            };
            v.truncate(pdu.unwrap_or(at));
            v.extend_from_slice(&other[from..]);
        }
        6 => v.truncate(at),
        7 => {
            let bytes: Vec<u8> = (0..1 + rng.below(64))
                .map(|_| rng.next_u64() as u8)
                .collect();
            v.splice(at..at, bytes);
        }
        8 => {
            let k = KEYS[rng.below(KEYS.len())];
            v.splice(at..at, k.iter().copied());
        }
        // Header fields of one PDU.
        9 if pdu.is_some() => {
            let p = pdu.unwrap_or(0);
            v[p] = (v[p] & 0x40) | OPCODES[rng.below(OPCODES.len())];
        }
        10 if pdu.is_some() => {
            let p = pdu.unwrap_or(0);
            v[p + 1] ^= 1 << rng.below(8);
        }
        11 if pdu.is_some() => {
            let p = pdu.unwrap_or(0);
            let n = U24S[rng.below(U24S.len())].to_be_bytes();
            v[p + 5..p + 8].copy_from_slice(&n[1..]);
        }
        12 if pdu.is_some() => {
            // ITT, TTT, CmdSN, ExpStatSN, DataSN, offset, length: one of
            // the u32 fields from byte 16 on.
            let p = pdu.unwrap_or(0) + 16 + 4 * rng.below(8);
            v[p..p + 4].copy_from_slice(&U32S[rng.below(U32S.len())].to_be_bytes());
        }
        13 if pdu.is_some() => {
            // The CDB: its opcode, or one of its bytes.
            let p = pdu.unwrap_or(0) + 32;
            if rng.below(2) == 0 {
                v[p] = CDBS[rng.below(CDBS.len())];
            } else {
                v[p + 1 + rng.below(15)] = rng.next_u64() as u8;
            }
        }
        14 if pdu.is_some() => {
            // The LUN, or the AHS length.
            let p = pdu.unwrap_or(0);
            if rng.below(2) == 0 {
                v[p + 9] = [0, 1, 2, 255][rng.below(4)];
            } else {
                v[p + 4] = [0, 1, 4, 255][rng.below(4)];
            }
        }
        _ if starts.len() >= 2 => {
            // A whole PDU repeated or dropped.
            let i = rng.below(starts.len() - 1);
            let (a, b) = (starts[i], starts[i + 1]);
            if rng.below(2) == 0 {
                let copy = v[a..b].to_vec();
                let to = starts[rng.below(starts.len())];
                v.splice(to..to, copy);
            } else {
                v.drain(a..b);
            }
        }
        _ => v.truncate(at),
    }
    v.truncate(1 << 20);
}

#[test]
fn the_seeds_log_in_and_move_data() {
    let _turn = turn();
    // Replayed on a connection configured as the one they were recorded
    // on, the seeds reach everything the driver is there to check:
    // full-feature logins, bios (some completed late, some failed),
    // Data-In, write payload placed in pages, commands admitted by the
    // budget, R2Ts.
    let corpus = corpus();
    let mut total = fuzzing::Stats::default();
    let mut logged_in = 0;
    for (_, d) in &corpus {
        let s = fuzzing::run_as_recorded(d);
        if s.logins > 0 {
            logged_in += 1;
        }
        total.logins += s.logins;
        total.r2t += s.r2t;
        total.bios += s.bios;
        total.held_over += s.held_over;
        total.failed += s.failed;
        total.data_in += s.data_in;
        total.placed += s.placed;
        total.grants += s.grants;
        total.pdus += s.pdus;
    }
    std::eprintln!(
        "seed corpus: {logged_in} of {} log in; {total:?}",
        corpus.len()
    );
    assert_eq!(logged_in, corpus.len(), "every seed logs in");
    assert!(total.bios > 200, "{total:?}");
    assert!(total.held_over > 0, "no completion was ever delivered late");
    assert!(total.failed > 0, "no bio ever failed");
    assert!(total.data_in > 0 && total.placed > 0 && total.grants > 0);
    assert!(total.r2t > 0, "no R2T was ever sent");
}

#[test]
fn a_write_seed_replays_the_same_way() {
    let _turn = turn();
    // One input, one run: the schedule is the input's.
    let (_, d) = corpus()
        .into_iter()
        .find(|(n, _)| n == "qemu-io-write-read-16k")
        .expect("the qemu-io seed");
    let a = fuzzing::run_as_recorded(&d);
    let b = fuzzing::run_as_recorded(&d);
    assert_eq!(std::format!("{a:?}"), std::format!("{b:?}"));
    assert!(a.logins == 1 && a.bios >= 2 && a.data_in > 0, "{a:?}");
}

#[test]
fn every_run_starts_from_fresh_units() {
    let _turn = turn();
    // iscsi-swp turns software write protect on; the next run's writes
    // still reach the disk, as they would on a fresh target.
    let corpus = corpus();
    let get = |n: &str| {
        corpus
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, d)| d.clone())
            .expect("the seed")
    };
    let write = get("qemu-io-write-read-16k");
    let before = fuzzing::run_as_recorded(&write);
    let swp = fuzzing::run_as_recorded(&get("iscsi-swp-on"));
    assert!(swp.logins == 1 && swp.data_in > 0, "{swp:?}");
    let after = fuzzing::run_as_recorded(&write);
    assert_eq!(std::format!("{before:?}"), std::format!("{after:?}"));
    assert!(after.bios >= 2, "{after:?}");
}

#[test]
fn bounded_fuzz_from_the_corpus() {
    let _turn = turn();
    let corpus = corpus();
    assert!(corpus.len() >= 10, "seed corpus missing or small");
    for (name, data) in &corpus {
        let r = std::panic::catch_unwind(|| fuzzing::run(data));
        assert!(r.is_ok(), "seed {name} fails");
        let r = std::panic::catch_unwind(|| fuzzing::run_as_recorded(data));
        assert!(r.is_ok(), "seed {name} fails as recorded");
    }
    bounded::run(
        "bounded iscsi fuzz",
        "iscsi",
        &corpus,
        mutate_once,
        fuzzing::run,
    );
}
