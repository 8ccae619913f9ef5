//! cargo-fuzz target: arbitrary client bytes into one NBD connection over
//! a stack of md disks, with the engine's invariants checked at every step
//! (`net::nbd::fuzzing::run`). Seed corpus: `corpus/engine`, real client
//! transcripts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    net::nbd::fuzzing::run(data);
});
