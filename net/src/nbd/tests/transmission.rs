//! Transmission over a real stack of md disks (proto.md "Transmission").

use super::*;
use geom::bio::{Bio, BioCmd, BioError};

fn harness(structured: bool) -> Harness {
    Harness::new(ServerConfig::default(), "disk", structured)
}

fn ok(r: &Reply, cookie: u64) {
    assert_eq!((r.cookie, r.error), (cookie, 0), "{r:?}");
}

fn err(r: &Reply, cookie: u64, errno: u32) {
    assert_eq!((r.cookie, r.error), (cookie, errno), "{r:?}");
}

#[test]
fn write_then_read_back_a_pattern() {
    for structured in [false, true] {
        let mut h = harness(structured);
        let data = pattern(3 * 4096 + 512, 7);
        ok(&h.one(&write(0, 1, 8192, &data)), 1);
        let r = h.read(2, 8192, data.len() as u32);
        ok(&r, 2);
        assert_eq!(r.data, data);
        // Untouched space reads as zeroes.
        let r = h.read(3, 0, 8192);
        assert_eq!(r.data, alloc::vec![0; 8192]);
        // One copy in for the write, one copy out per read, nothing else.
        let copied = 2 * data.len() as u64 + 8192;
        assert_eq!(h.conn.counters().bytes_copied(), copied);
        assert_eq!(h.conn.counters().bytes_mapped(), copied);
        assert_eq!(h.conn.in_flight(), 0);
        assert_eq!(h.conn.buffered_bytes(), 0);
    }
}

#[test]
fn structured_read_is_one_offset_data_chunk() {
    let mut h = harness(true);
    ok(&h.one(&write(0, 1, 512, &[0xab; 512])), 1);
    let bytes = req(Command::Read, 0, 0x55, 512, 512);
    assert_eq!(h.conn.on_recv(&h.exports, &bytes), 28);
    let r = h.conn.next_request().unwrap();
    h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    h.stack.run();
    let (tag, bio, res) = h.stack.take_completed().unwrap();
    h.conn.complete(tag, bio, res);
    let out = drain(&mut h.conn);
    let mut want = Vec::new();
    want.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    want.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    want.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    want.extend_from_slice(&0x55u64.to_be_bytes());
    want.extend_from_slice(&(8u32 + 512).to_be_bytes());
    want.extend_from_slice(&512u64.to_be_bytes());
    want.extend_from_slice(&[0xab; 512]);
    assert_eq!(out, want);
}

#[test]
fn zero_length_read() {
    let mut h = harness(true);
    let r = h.read(9, 0, 0);
    ok(&r, 9);
    assert!(r.data.is_empty());
    let mut h = harness(false);
    ok(&h.read(9, 4096, 0), 9);
}

#[test]
fn flush_trim_and_write_zeroes() {
    for structured in [false, true] {
        let mut h = harness(structured);
        ok(&h.one(&write(0, 1, 0, &[0x11; 16384])), 1);
        ok(&h.one(&req(Command::Flush, 0, 2, 0, 0)), 2);
        ok(&h.one(&req(Command::Trim, 0, 3, 4096, 4096)), 3);
        ok(
            &h.one(&req(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 4, 512, 512)),
            4,
        );
        ok(
            &h.one(&req(Command::WriteZeroes, CMD_FLAG_FUA, 5, 12288, 4096)),
            5,
        );
        let got = h.read(6, 0, 16384).data;
        assert!(got[..512].iter().all(|&b| b == 0x11));
        assert!(got[512..1024].iter().all(|&b| b == 0));
        assert!(got[1024..4096].iter().all(|&b| b == 0x11));
        assert!(
            got[4096..8192].iter().all(|&b| b == 0),
            "md frees trimmed pages"
        );
        assert!(got[8192..12288].iter().all(|&b| b == 0x11));
        assert!(got[12288..].iter().all(|&b| b == 0));
    }
}

#[test]
fn fua_reaches_the_bio() {
    let mut h = harness(false);
    let mut input = write(CMD_FLAG_FUA, 1, 0, &[1; 512]);
    input.extend(write(0, 2, 512, &[2; 512]));
    input.extend(req(Command::WriteZeroes, CMD_FLAG_FUA, 3, 0, 512));
    input.extend(req(Command::Trim, CMD_FLAG_FUA, 4, 0, 512));
    input.extend(req(Command::Read, CMD_FLAG_FUA, 5, 0, 512));
    input.extend(req(Command::Flush, CMD_FLAG_FUA, 6, 0, 0));
    assert_eq!(h.conn.on_recv(&h.exports, &input), input.len());
    let mut seen = Vec::new();
    while let Some(r) = h.conn.next_request() {
        seen.push((r.bio.cmd, r.bio.fua));
        h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    }
    assert_eq!(
        seen,
        [
            (BioCmd::Write, true),
            (BioCmd::Write, false),
            (BioCmd::WriteZeroes, true),
            (BioCmd::Discard, true),
            (BioCmd::Read, false),
            (BioCmd::Flush, false),
        ]
    );
}

#[test]
fn out_of_range_requests_get_the_spec_errnos() {
    for structured in [false, true] {
        let mut h = harness(structured);
        err(&h.read(1, DISK - 512, 1024), 1, EINVAL);
        err(&h.read(2, DISK, 512), 2, EINVAL);
        err(&h.read(3, u64::MAX - 511, 512), 3, EINVAL);
        // A refused write's payload is skipped; the next request still parses.
        let mut input = write(0, 4, DISK - 512, &[9; 1024]);
        input.extend(req(Command::Flush, 0, 5, 0, 0));
        let r = h.run(&input, usize::MAX);
        assert_eq!(r.len(), 2);
        err(&r[0], 4, ENOSPC);
        ok(&r[1], 5);
        err(
            &h.one(&req(Command::WriteZeroes, 0, 6, DISK, 512)),
            6,
            ENOSPC,
        );
        err(
            &h.one(&req(Command::Trim, 0, 7, u64::MAX, u32::MAX)),
            7,
            EINVAL,
        );
        if structured {
            let r = h.read(8, DISK, 512);
            assert_eq!(r.message, "request goes past the end of the export");
        }
        // Nothing reached the stack.
        assert_eq!(h.conn.counters().bytes_copied(), 0);
    }
}

#[test]
fn misaligned_requests_are_einval() {
    let mut h = harness(false);
    err(&h.read(1, 100, 512), 1, EINVAL);
    err(&h.read(2, 0, 100), 2, EINVAL);
    err(&h.one(&write(0, 3, 0, &[1; 100])), 3, EINVAL);
    err(&h.one(&req(Command::Trim, 0, 4, 256, 512)), 4, EINVAL);
    ok(&h.read(5, 512, 512), 5);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let mut h = Harness::new(ServerConfig::default(), "ro", false);
    assert_eq!(h.conn.export(), Some(1));
    err(&h.one(&write(0, 1, 0, &[1; 4096])), 1, EPERM);
    err(&h.one(&req(Command::Trim, 0, 2, 0, 4096)), 2, EPERM);
    err(&h.one(&req(Command::WriteZeroes, 0, 3, 0, 4096)), 3, EPERM);
    // FLUSH is not offered on a read-only export.
    err(&h.one(&req(Command::Flush, 0, 4, 0, 0)), 4, EINVAL);
    let r = h.read(5, 0, 4096);
    ok(&r, 5);
    assert_eq!(r.data, alloc::vec![0; 4096]);
}

#[test]
fn oversized_payloads() {
    // Maximum payload is 64 KiB for these exports.
    let mut h = harness(false);
    let big = alloc::vec![5u8; 65536 + 512];
    let mut input = write(0, 1, 0, &big);
    input.extend(write(0, 2, 0, &[6; 512]));
    let r = h.run(&input, 4000);
    assert_eq!(r.len(), 2);
    err(&r[0], 1, EINVAL);
    ok(&r[1], 2);
    assert_eq!(
        h.conn.counters().bytes_copied(),
        512,
        "the big payload was never stored"
    );
    err(&h.read(3, 0, 65536 + 512), 3, EINVAL);
    ok(&h.read(4, 0, 65536), 4);
    let mut h = harness(true);
    err(&h.read(3, 0, 65536 + 512), 3, EOVERFLOW);
}

#[test]
fn refused_write_is_answered_only_after_its_payload() {
    // Regression: libnbd drops the connection on a reply to a request it
    // has not finished sending.
    for (offset, len, errno) in [(0, 65536 + 512, EINVAL), (DISK, 4096, ENOSPC)] {
        let mut h = harness(false);
        let input = write(0, 1, offset, &alloc::vec![7; len]);
        let cut = input.len() - 1;
        assert_eq!(h.conn.on_recv(&h.exports, &input[..cut]), cut);
        let (r, _) = h.pump();
        assert!(r.is_empty(), "no reply before the last payload byte");
        assert!(!h.conn.has_tx());
        assert_eq!(h.conn.on_recv(&h.exports, &input[cut..]), 1);
        let (r, _) = h.pump();
        err(&r[0], 1, errno);
    }
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    for structured in [false, true] {
        let mut h = harness(structured);
        // No metadata context was selected.
        err(&h.one(&req(Command::BlockStatus, 0, 2, 0, 512)), 2, EINVAL);
        err(&h.one(&req(Command::Unknown(200), 0, 3, 0, 0)), 3, EINVAL);
        err(
            &h.one(&req(Command::Flush, CMD_FLAG_NO_HOLE, 4, 0, 0)),
            4,
            EINVAL,
        );
        // DF is only offered with structured replies.
        h.expect_read(5, 512);
        let r = h.one(&req(Command::Read, CMD_FLAG_DF, 5, 0, 512));
        if structured {
            ok(&r, 5);
        } else {
            err(&r, 5, EINVAL);
        }
        err(
            &h.one(&req(Command::Cache, CMD_FLAG_NO_HOLE, 6, 0, 512)),
            6,
            EINVAL,
        );
        err(
            &h.one(&req(Command::Trim, CMD_FLAG_FAST_ZERO, 8, 0, 512)),
            8,
            EINVAL,
        );
        ok(&h.one(&req(Command::Flush, 0, 7, 0, 0)), 7);
    }
}

#[test]
fn bad_request_magic_closes() {
    let mut h = harness(false);
    let mut input = req(Command::Flush, 0, 1, 0, 0);
    let mut bad = req(Command::Flush, 0, 2, 0, 0);
    bad[0] = 0;
    input.extend(&bad);
    input.extend(req(Command::Flush, 0, 3, 0, 0));
    assert_eq!(
        h.conn.on_recv(&h.exports, &input),
        56,
        "stops after the bad header"
    );
    assert!(!h.conn.wants_recv());
    assert!(!h.conn.has_tx());
    assert!(
        h.conn.next_request().is_none(),
        "unsent requests are dropped"
    );
    assert!(h.conn.is_finished());
}

#[test]
fn hard_close_waits_for_bios_in_the_stack() {
    let mut h = harness(false);
    assert_eq!(
        h.conn
            .on_recv(&h.exports, &req(Command::Read, 0, 1, 0, 4096)),
        28
    );
    let r = h.conn.next_request().unwrap();
    h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    h.conn.shutdown();
    assert!(!h.conn.is_finished(), "a bio is still in the stack");
    assert_eq!(h.conn.submitted(), 1);
    h.stack.run();
    let (tag, bio, res) = h.stack.take_completed().unwrap();
    assert!(h.conn.complete(tag, bio, res));
    assert!(h.conn.is_finished());
    assert_eq!(crate::session::copy_out(&mut h.conn, &mut [0; 64]), 0);
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn disc_finishes_after_outstanding_replies() {
    let mut h = harness(false);
    let data = pattern(4096, 1);
    let mut input = write(0, 1, 0, &data);
    input.extend(req(Command::Read, 0, 2, 0, 4096));
    input.extend(req(Command::Disc, 0, 3, 0, 0));
    input.extend(req(Command::Flush, 0, 4, 0, 0)); // must not be read
    let used = h.conn.on_recv(&h.exports, &input);
    assert_eq!(used, input.len() - 28);
    assert!(!h.conn.wants_recv());
    assert!(!h.conn.is_finished(), "replies outstanding");
    h.expect_read(2, 4096);
    let (r, _) = h.pump();
    assert_eq!(r.len(), 2);
    ok(&r[0], 1);
    ok(&r[1], 2);
    assert_eq!(r[1].data, data);
    assert!(h.conn.is_finished());
}

#[test]
fn a_session_fed_one_byte_at_a_time_matches_bulk() {
    let session = || {
        let mut input = Vec::new();
        input.extend(write(0, 1, 4096, &pattern(8192, 3)));
        input.extend(req(Command::Read, 0, 2, 4096, 8192));
        input.extend(write(CMD_FLAG_FUA, 3, 0, &pattern(512, 9)));
        input.extend(req(Command::Flush, 0, 4, 0, 0));
        input.extend(write(0, 5, DISK, &[1; 512])); // refused, skipped
        input.extend(req(Command::WriteZeroes, 0, 6, 4096, 512));
        input.extend(req(Command::Read, 0, 7, 0, 8192));
        input.extend(req(Command::Disc, 0, 8, 0, 0));
        input
    };
    for structured in [false, true] {
        let input = session();
        let mut bulk = harness(structured);
        bulk.expect_read(2, 8192);
        bulk.expect_read(7, 8192);
        let want = bulk.run(&input, usize::MAX);
        assert_eq!(want.len(), 7);
        assert!(bulk.conn.is_finished());

        let mut slow = harness(structured);
        slow.expect_read(2, 8192);
        slow.expect_read(7, 8192);
        let mut got = slow.run(&input, 1);
        let mut want = want;
        // Refused requests are answered as soon as they are read, so the order
        // may differ.
        got.sort_by_key(|r| r.cookie);
        want.sort_by_key(|r| r.cookie);
        assert_eq!(got, want);
        assert!(slow.conn.is_finished());
        err(&got[4], 5, ENOSPC);
        assert_eq!(got[1].data, pattern(8192, 3));
        let mut expect7 = pattern(512, 9);
        expect7.extend(alloc::vec![0; 3584]);
        expect7.extend(alloc::vec![0; 512]);
        expect7.extend(&pattern(8192, 3)[512..4096]);
        assert_eq!(got[6].data, expect7);
    }
}

#[test]
fn replies_can_be_sent_one_byte_at_a_time() {
    let mut h = harness(true);
    ok(&h.one(&write(0, 1, 0, &pattern(4096, 2))), 1);
    assert_eq!(
        h.conn
            .on_recv(&h.exports, &req(Command::Read, 0, 2, 0, 4096)),
        28
    );
    let r = h.conn.next_request().unwrap();
    h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    h.stack.run();
    let (tag, bio, res) = h.stack.take_completed().unwrap();
    h.conn.complete(tag, bio, res);
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while crate::session::copy_out(&mut h.conn, &mut b) == 1 {
        out.push(b[0]);
    }
    let r = h.decoder.feed(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].data, pattern(4096, 2));
    assert_eq!(h.conn.counters().bytes_copied(), 8192);
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let mut h = harness(false);
    for i in 0..8u64 {
        ok(
            &h.one(&write(0, 100 + i, i * 4096, &pattern(4096, i as u8))),
            100 + i,
        );
    }
    let mut input = Vec::new();
    for i in 0..8u64 {
        input.extend(req(Command::Read, 0, i, i * 4096, 4096));
        h.expect_read(i, 4096);
    }
    assert_eq!(h.conn.on_recv(&h.exports, &input), input.len());
    assert_eq!(h.conn.in_flight(), 8);
    while let Some(r) = h.conn.next_request() {
        h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    }
    h.stack.run();
    let mut done = Vec::new();
    while let Some(c) = h.stack.take_completed() {
        done.push(c);
    }
    // Complete in reverse, with a send in between: replies follow completions.
    let mut replies = Vec::new();
    while let Some((tag, bio, res)) = done.pop() {
        assert!(h.conn.complete(tag, bio, res));
        replies.extend(h.decoder.feed(&drain(&mut h.conn)));
    }
    let cookies: Vec<u64> = replies.iter().map(|r| r.cookie).collect();
    assert_eq!(cookies, [7, 6, 5, 4, 3, 2, 1, 0]);
    for r in &replies {
        assert_eq!(r.data, pattern(4096, r.cookie as u8));
    }
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn in_flight_limit_stops_consuming() {
    let cfg = ServerConfig {
        max_in_flight: 2,
        max_payload: 1 << 20,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg, "disk", false);
    let mut input = Vec::new();
    for i in 0..5u64 {
        input.extend(req(Command::Read, 0, i, 0, 512));
        h.expect_read(i, 512);
    }
    assert_eq!(h.conn.on_recv(&h.exports, &input), 56);
    assert!(!h.conn.wants_recv());
    assert_eq!(h.conn.on_recv(&h.exports, &input[56..]), 0);
    // Completing without sending the replies frees nothing.
    while let Some(r) = h.conn.next_request() {
        h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    }
    h.stack.run();
    while let Some((tag, bio, res)) = h.stack.take_completed() {
        h.conn.complete(tag, bio, res);
    }
    assert_eq!(h.conn.on_recv(&h.exports, &input[56..]), 0);
    assert_eq!(h.conn.in_flight(), 2);
    // Sending them does.
    let r = h.decoder.feed(&drain(&mut h.conn));
    assert_eq!(r.len(), 2);
    assert!(h.conn.wants_recv());
    let rest = h.run(&input[56..], usize::MAX);
    assert_eq!(rest.len(), 3);
}

#[test]
fn a_write_mid_payload_is_always_accepted() {
    let cfg = ServerConfig {
        max_in_flight: 1,
        max_payload: 1 << 20,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg, "disk", false);
    let input = write(0, 1, 0, &[3; 4096]);
    assert_eq!(h.conn.on_recv(&h.exports, &input[..100]), 100);
    assert!(h.conn.wants_recv());
    assert_eq!(h.conn.on_recv(&h.exports, &input[100..]), input.len() - 100);
    let (r, _) = h.pump();
    ok(&r[0], 1);
}

#[test]
fn buffer_limit_stops_consuming() {
    let mut h = harness(false);
    h.conn.set_buffer_limit(10_000);
    let mut input = Vec::new();
    for i in 0..4u64 {
        input.extend(req(Command::Read, 0, i, 0, 8192));
        h.expect_read(i, 8192);
    }
    assert_eq!(
        h.conn.on_recv(&h.exports, &input),
        56,
        "8 KiB + 8 KiB ≥ 10 000"
    );
    assert_eq!(h.conn.buffered_bytes(), 16384);
    let r = h.run(&input[56..], usize::MAX);
    assert_eq!(h.decoder.pending(), 0);
    assert_eq!(r.len(), 4);
    assert_eq!(h.conn.buffered_bytes(), 0);
}

#[test]
fn device_errors_become_eio() {
    for structured in [false, true] {
        let mut h = harness(structured);
        let p = h.stack.find_provider("md0").unwrap();
        h.stack.orphan(p);
        let r = h.read(1, 0, 512);
        err(&r, 1, EIO);
        assert!(r.data.is_empty());
        err(&h.one(&write(0, 2, 0, &[1; 512])), 2, EIO);
        if structured {
            assert_eq!(h.read(3, 0, 512).message, "the device is gone");
        }
    }
}

#[test]
fn bio_errors_map_to_nbd_errnos() {
    let cases = [
        (Command::Read, BioError::Io, EIO),
        (Command::Read, BioError::Invalid, EINVAL),
        (Command::Read, BioError::OutOfRange, EINVAL),
        (Command::Write, BioError::OutOfRange, ENOSPC),
        (Command::Write, BioError::Access, EPERM),
        (Command::Trim, BioError::NotSupported, EINVAL),
        // NoMemory is retried before it is answered: see budget.rs.
        (Command::Flush, BioError::Orphaned, EIO),
        // A full host file system reaches the client as ENOSPC, whatever
        // the command.
        (Command::Write, BioError::NoSpace, ENOSPC),
        (Command::Flush, BioError::NoSpace, ENOSPC),
        (Command::Trim, BioError::NoSpace, ENOSPC),
    ];
    for (cmd, e, want) in cases {
        let mut h = harness(false);
        let (bytes, cookie) = match cmd {
            Command::Write => (write(0, 1, 0, &[0; 512]), 1),
            c => (req(c, 0, 1, 0, 512 * u32::from(c != Command::Flush)), 1),
        };
        assert_eq!(h.conn.on_recv(&h.exports, &bytes), bytes.len());
        let r = h.conn.next_request().unwrap();
        assert!(h.conn.complete(r.cookie, r.bio, Err(e)));
        let reply = h.decoder.feed(&drain(&mut h.conn));
        err(&reply[0], cookie, want);
    }
}

#[test]
fn bogus_completions_are_ignored() {
    let mut h = harness(false);
    assert!(!h.conn.complete(0, Bio::flush(), Ok(())));
    assert!(!h.conn.complete(u64::MAX, Bio::flush(), Ok(())));
    assert_eq!(
        h.conn
            .on_recv(&h.exports, &req(Command::Read, 0, 1, 0, 512)),
        28
    );
    // Not submitted yet: the slot is not waiting for a completion.
    assert!(!h.conn.complete(0, Bio::read(0, 512), Ok(())));
    let r = h.conn.next_request().unwrap();
    let cookie = r.cookie;
    // A completion with the wrong amount of data is an EIO, not a panic.
    assert!(h.conn.complete(cookie, Bio::read(0, 100), Ok(())));
    assert!(!h.conn.complete(cookie, Bio::read(0, 512), Ok(())), "twice");
    h.expect_read(1, 512);
    let reply = h.decoder.feed(&drain(&mut h.conn));
    err(&reply[0], 1, EIO);
}

#[test]
fn two_connections_share_one_stack() {
    // What CAN_MULTI_CONN promises: a write acknowledged on one connection
    // is seen (and covered by a flush) on another.
    let mut a = harness(false);
    ok(&a.one(&write(0, 1, 0, &pattern(512, 4))), 1);
    let mut b = Connection::new(ServerConfig::default());
    let hs = handshake_bytes("disk", false);
    assert_eq!(b.on_recv(&a.exports, &hs), hs.len());
    drain(&mut b);
    let mut input = req(Command::Flush, 0, 1, 0, 0);
    input.extend(req(Command::Read, 0, 2, 0, 512));
    assert_eq!(b.on_recv(&a.exports, &input), input.len());
    while let Some(r) = b.next_request() {
        a.stack.submit(a.consumers[r.export], r.bio, r.cookie);
    }
    a.stack.run();
    while let Some((tag, bio, res)) = a.stack.take_completed() {
        assert!(b.complete(tag, bio, res));
    }
    let mut d = Decoder::new(false);
    d.reads.insert(2, 512);
    let r = d.feed(&drain(&mut b));
    ok(&r[0], 1);
    ok(&r[1], 2);
    assert_eq!(r[1].data, pattern(512, 4));
    assert_ne!(
        a.exports[0].transmission_flags(false) & TFLAG_CAN_MULTI_CONN,
        0
    );
}
