//! CRC32C: the crc32 instruction and the `crc` crate against RFC 3720's
//! examples and against each other.

mod common;

use common::{below, bytes, rng};
use crc::{Crc, CRC_32_ISCSI};
use crypt::crc32c::{crc32c, soft_only, Crc32c};
use std::sync::Mutex;

/// Held by the tests that look at which engine [`Crc32c::new`] picks, so
/// [`soft_only`] flipped by one is not seen by another.
static SWITCH: Mutex<()> = Mutex::new(());

/// The oracle: the `crc` crate's CRC-32/ISCSI, one lane.
fn oracle(data: &[u8]) -> u32 {
    Crc::<u32>::new(&CRC_32_ISCSI).checksum(data)
}

/// Both engines over `data` in one piece.
fn both(data: &[u8]) -> [u32; 2] {
    let mut hw = Crc32c::new();
    let mut soft = Crc32c::new_soft();
    hw.update(data);
    soft.update(data);
    [hw.finish(), soft.finish()]
}

/// The iSCSI SCSI Read (10) command PDU of RFC 3720 appendix B.4.
const READ_PDU: [u8; 48] = [
    0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
    0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

#[test]
fn this_cpu_has_sse42() {
    // The hardware tests here prove nothing without it.
    assert!(
        crypt::sse42_available(),
        "the test machine has no SSE4.2: the crc32 instruction tests cannot run"
    );
    let _g = SWITCH.lock().unwrap();
    assert!(Crc32c::new().is_hardware());
    assert!(!Crc32c::new_soft().is_hardware());
}

/// RFC 3720 appendix B.4 (the CRCs there are the bytes as sent, that is
/// the value little-endian).
#[test]
fn rfc3720_examples() {
    let inc: Vec<u8> = (0..32).collect();
    let dec: Vec<u8> = (0..32).rev().collect();
    for (data, want) in [
        (&[0u8; 32][..], 0x8a91_36aa),
        (&[0xffu8; 32][..], 0x62a8_ab43),
        (&inc[..], 0x46dd_794e),
        (&dec[..], 0x113f_db5c),
        (&READ_PDU[..], 0xd996_3a56),
    ] {
        assert_eq!(both(data), [want, want], "{data:02x?}");
        assert_eq!(oracle(data), want, "oracle, {data:02x?}");
        assert_eq!(crc32c(data), want);
    }
    assert_eq!(u32::to_le_bytes(0xd996_3a56), [0x56, 0x3a, 0x96, 0xd9]);
}

#[test]
fn empty_and_check_value() {
    assert_eq!(both(b""), [0, 0]);
    // The catalogue's check value of CRC-32/ISCSI.
    assert_eq!(both(b"123456789"), [0xe306_9283, 0xe306_9283]);
}

#[test]
fn random_data_against_the_oracle() {
    let mut r = rng("crc32c random data");
    for len in (0..=67).chain([255, 256, 4096, 4097, 65_536 + 3]) {
        let data = bytes(&mut r, len);
        let want = oracle(&data);
        assert_eq!(both(&data), [want, want], "{len} bytes");
        // Every alignment of the start, for the eight-byte steps.
        for skip in 1..8.min(len + 1) {
            let want = oracle(&data[skip..]);
            assert_eq!(both(&data[skip..]), [want, want], "{len} bytes from {skip}");
        }
    }
}

#[test]
fn random_split_points_match_one_shot() {
    let mut r = rng("crc32c split points");
    for round in 0..200 {
        let len = below(&mut r, 9000);
        let data = bytes(&mut r, len);
        let want = oracle(&data);
        let mut hw = Crc32c::new();
        let mut soft = Crc32c::new_soft();
        let mut at = 0;
        while at < len {
            let n = below(&mut r, (len - at).min(700) + 1);
            hw.update(&data[at..at + n]);
            soft.update(&data[at..at + n]);
            at += n;
            // finish() does not end the computation.
            assert_eq!(hw.finish(), oracle(&data[..at]));
        }
        assert_eq!([hw.finish(), soft.finish()], [want, want], "round {round}");
        assert_eq!(crc32c(&data), want);
    }
}

#[test]
fn soft_only_forces_the_fallback() {
    let _g = SWITCH.lock().unwrap();
    soft_only(true);
    let c = Crc32c::new();
    soft_only(false);
    assert!(!c.is_hardware());
    let mut c = c;
    c.update(&READ_PDU);
    assert_eq!(c.finish(), 0xd996_3a56);
}
