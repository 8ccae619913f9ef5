//! cargo-fuzz target: arbitrary initiator bytes into one iSCSI connection
//! over a stack of md disks, with the engine's invariants checked at every
//! step (`net::iscsi::fuzzing::run`). Seed corpus: `corpus/iscsi`, real
//! client transcripts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    net::iscsi::fuzzing::run(data);
});
