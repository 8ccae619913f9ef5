//! Random input: the engine must never panic, never consume more than it
//! is given, and keep its bookkeeping straight.

use super::*;
use proptest::prelude::*;

/// Feeds `input` in pieces of the given sizes, pumping the stack between
/// pieces, and checks the engine's invariants along the way. The disk
/// completes asynchronously: `order` seeds which completions are held
/// back for later pieces and the shuffled order the rest are delivered in.
fn feed_and_pump(h: &mut Harness, input: &[u8], pieces: &[usize], tx_size: usize, order: u64) {
    let mut rng = order | 1;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % (n as u64).max(1)) as usize
    };
    let mut held = Vec::new();
    let mut off = 0;
    let mut tx = alloc::vec![0u8; tx_size.max(1)];
    for (i, &p) in pieces.iter().cycle().enumerate() {
        if off >= input.len() || i > input.len() + 64 {
            break;
        }
        let end = (off + p.max(1)).min(input.len());
        let used = h.conn.on_recv(&h.exports, &input[off..end]);
        assert!(used <= end - off);
        off += used;
        while let Some(r) = h.conn.next_request() {
            assert!(r.cookie < 1 << 32);
            assert!(r.export < h.exports.len());
            h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
        }
        h.stack.run();
        while let Some(c) = h.stack.take_completed() {
            held.push(c);
        }
        let keep = next(held.len() + 1);
        while held.len() > keep {
            let (tag, bio, res) = held.swap_remove(next(held.len()));
            assert!(h.conn.complete(tag, bio, res));
        }
        while crate::session::copy_out(&mut h.conn, &mut tx) > 0 {}
        assert!(!h.conn.has_tx());
        assert!(h.conn.in_flight() <= 64);
        if h.conn.is_finished() {
            break;
        }
    }
    // The late completions arrive, shuffled.
    while !held.is_empty() {
        let (tag, bio, res) = held.swap_remove(next(held.len()));
        assert!(h.conn.complete(tag, bio, res));
    }
    while crate::session::copy_out(&mut h.conn, &mut tx) > 0 {}
    assert_eq!(h.conn.submitted(), 0);
}

/// One request: command, flags, offset, length.
type Req = (u16, u16, u64, u32);

/// Well-formed request streams with interesting fields: valid magic, and
/// a write is followed by exactly its payload, so parsing goes deep.
fn requests() -> impl Strategy<Value = Vec<Req>> {
    let offset = prop_oneof![
        Just(0u64),
        Just(DISK - 512),
        Just(DISK),
        Just(u64::MAX),
        (0u64..DISK / 512).prop_map(|s| s * 512),
        any::<u64>(),
    ];
    let length = prop_oneof![
        Just(0u32),
        Just(512u32),
        Just(4096u32),
        Just(65536u32),
        Just(65536u32 + 512),
        Just(u32::MAX),
        0u32..10_000,
    ];
    let flags = prop_oneof![
        Just(0u16),
        Just(CMD_FLAG_FUA),
        Just(CMD_FLAG_NO_HOLE),
        any::<u16>()
    ];
    let one = (0u16..10, flags, offset, length).prop_map(|(cmd, flags, offset, length)| {
        // Keep write payloads small enough to send.
        let length = if cmd == 1 { length.min(70_000) } else { length };
        (cmd, flags, offset, length)
    });
    proptest::collection::vec(one, 0..16)
}

/// The bytes of a request stream; cookies are the request indices.
fn encode(reqs: &[Req]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, &(cmd, flags, offset, length)) in reqs.iter().enumerate() {
        v.extend(req(Command::from(cmd), flags, i as u64, offset, length));
        if cmd == 1 {
            v.extend(pattern(length as usize, i as u8));
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_in_the_handshake(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        pieces in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let mut c = Connection::new(ServerConfig::default());
        let e = alloc::vec![export("disk", false), export("ro", true)];
        let mut off = 0;
        for &p in pieces.iter().cycle().take(bytes.len() + 1) {
            let end = (off + p).min(bytes.len());
            let used = c.on_recv(&e, &bytes[off..end]);
            prop_assert!(used <= end - off);
            off += used;
            drain(&mut c);
            while c.next_request().is_some() {}
        }
    }

    #[test]
    fn random_options_after_valid_flags(
        options in proptest::collection::vec((0u32..12, proptest::collection::vec(any::<u8>(), 0..40)), 0..10),
        piece in 1usize..50,
    ) {
        let mut input = Vec::from((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        for (o, data) in &options {
            input.extend(opt(*o, data));
        }
        let mut c = Connection::new(ServerConfig::default());
        let e = alloc::vec![export("disk", false), export("ro", true)];
        let mut off = 0;
        while off < input.len() {
            let end = (off + piece).min(input.len());
            let used = c.on_recv(&e, &input[off..end]);
            drain(&mut c);
            if used == 0 {
                break;
            }
            off += used;
        }
    }

    #[test]
    fn random_bytes_in_transmission(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        pieces in proptest::collection::vec(1usize..300, 1..6),
        structured in any::<bool>(),
        tx in 1usize..200,
        order in any::<u64>(),
    ) {
        let mut h = Harness::new(ServerConfig::default(), "disk", structured);
        feed_and_pump(&mut h, &bytes, &pieces, tx, order);
    }

    #[test]
    fn random_requests_in_transmission(
        reqs in requests(),
        pieces in proptest::collection::vec(1usize..200, 1..6),
        structured in any::<bool>(),
        read_only in any::<bool>(),
    ) {
        let name = if read_only { "ro" } else { "disk" };
        let mut h = Harness::new(ServerConfig::default(), name, structured);
        // Requests after the first DISC are never read.
        let live = reqs.iter().position(|r| r.0 == 2).unwrap_or(reqs.len());
        for (i, r) in reqs[..live].iter().enumerate() {
            if r.0 == 0 {
                h.expect_read(i as u64, r.3);
            }
        }
        let input = encode(&reqs[..(live + 1).min(reqs.len())]);
        let replies = h.run(&input, pieces[0]);
        // Exactly one reply per request before the DISC, none left over.
        let mut cookies: Vec<u64> = replies.iter().map(|r| r.cookie).collect();
        cookies.sort_unstable();
        prop_assert_eq!(cookies, (0..live as u64).collect::<Vec<_>>());
        prop_assert_eq!(h.decoder.pending(), 0);
        for r in &replies {
            let (cmd, _, _, length) = reqs[r.cookie as usize];
            if cmd == 0 && r.error == 0 {
                prop_assert_eq!(r.data.len(), length as usize);
            }
            if read_only && matches!(cmd, 1 | 4 | 6) {
                prop_assert_ne!(r.error, 0);
            }
        }
        prop_assert_eq!(h.conn.in_flight(), 0);
        prop_assert_eq!(h.conn.is_finished(), live < reqs.len());
    }
}
