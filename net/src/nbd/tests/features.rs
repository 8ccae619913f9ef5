//! Metadata contexts and block status, CACHE, DF, fast zeroes, shutdown,
//! timeouts, and multi-connection flush semantics.

use super::*;
use crate::nbd::{ALLOCATION_CONTEXT_ID, OPTION_DATA_MAX};
use alloc::rc::Rc;
use core::cell::RefCell;
use geom::bio::{Bio, BioCmd, ProviderId};
use geom::stack::{Geom, Io, ProviderSpec};

fn ok(r: &Reply, cookie: u64) {
    assert_eq!((r.cookie, r.error), (cookie, 0), "{r:?}");
}

fn err(r: &Reply, cookie: u64, errno: u32) {
    assert_eq!((r.cookie, r.error), (cookie, errno), "{r:?}");
}

/// A connection past the client flags, with structured replies if asked.
fn negotiating(structured: bool) -> (Connection, Vec<ExportInfo>) {
    let mut c = Connection::new(ServerConfig::default());
    let e = alloc::vec![export("disk", false), export("ro", true)];
    drain(&mut c);
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    assert_eq!(c.on_recv(&e, &flags), 4);
    if structured {
        let o = opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.on_recv(&e, &o), o.len());
        assert_eq!(drain(&mut c), rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    }
    (c, e)
}

/// Sends one option and returns what the server answered.
fn option(c: &mut Connection, e: &[ExportInfo], option: u32, data: &[u8]) -> Vec<u8> {
    let o = opt(option, data);
    assert_eq!(c.on_recv(e, &o), o.len());
    drain(c)
}

fn context(id: u32) -> Vec<u8> {
    let mut v = Vec::from(id.to_be_bytes());
    v.extend_from_slice(BASE_ALLOCATION.as_bytes());
    v
}

#[test]
fn list_meta_context() {
    let (mut c, e) = negotiating(true);
    let all = [
        rep(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, &context(0)),
        rep(OPT_LIST_META_CONTEXT, REP_ACK, &[]),
    ]
    .concat();
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation"][..],
        &["x-foo:bar", "base:"][..],
    ] {
        assert_eq!(
            option(
                &mut c,
                &e,
                OPT_LIST_META_CONTEXT,
                &meta_data("disk", queries)
            ),
            all,
            "{queries:?}"
        );
    }
    // Unknown namespaces and leaves are ignored, not errors.
    for queries in [
        &["qemu:dirty-bitmap:a"][..],
        &["base:nothing"][..],
        &["nocolon"][..],
    ] {
        assert_eq!(
            option(&mut c, &e, OPT_LIST_META_CONTEXT, &meta_data("", queries)),
            rep(OPT_LIST_META_CONTEXT, REP_ACK, &[])
        );
    }
    assert_eq!(
        option(&mut c, &e, OPT_LIST_META_CONTEXT, &meta_data("nope", &[])),
        rep(OPT_LIST_META_CONTEXT, REP_ERR_UNKNOWN, &[])
    );
    // Syntactically invalid: a length past the data, data left over, a
    // count larger than the queries sent.
    let good = meta_data("disk", &["base:"]);
    let mut long = good.clone();
    long.push(0);
    let mut bad_count = good.clone();
    bad_count[11] = 2;
    for data in [
        &good[..good.len() - 1],
        &long[..],
        &bad_count[..],
        &[0, 0, 0, 9, b'd'][..],
        &[][..],
    ] {
        assert_eq!(
            option(&mut c, &e, OPT_LIST_META_CONTEXT, data),
            rep(OPT_LIST_META_CONTEXT, REP_ERR_INVALID, &[]),
            "{data:?}"
        );
    }
    // The session goes on.
    assert!(
        option(&mut c, &e, OPT_GO, &go_data("disk", &[])).ends_with(&rep(OPT_GO, REP_ACK, &[]))
    );
}

#[test]
fn meta_contexts_need_structured_replies() {
    let (mut c, e) = negotiating(false);
    for o in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        assert_eq!(
            option(&mut c, &e, o, &meta_data("disk", &[BASE_ALLOCATION])),
            rep(o, REP_ERR_INVALID, &[])
        );
    }
}

#[test]
fn set_meta_context_selects_base_allocation() {
    let (mut c, e) = negotiating(true);
    assert_eq!(
        option(
            &mut c,
            &e,
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:", "x-a:b", BASE_ALLOCATION])
        ),
        [
            rep(
                OPT_SET_META_CONTEXT,
                REP_META_CONTEXT,
                &context(ALLOCATION_CONTEXT_ID)
            ),
            rep(OPT_SET_META_CONTEXT, REP_ACK, &[])
        ]
        .concat()
    );
    // `base:` alone selects nothing (proto.md "The base: metadata namespace").
    assert_eq!(
        option(
            &mut c,
            &e,
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:"])
        ),
        rep(OPT_SET_META_CONTEXT, REP_ACK, &[])
    );
}

/// Runs a block status request and decodes its descriptors.
fn block_status(
    h: &mut Harness,
    cookie: u64,
    flags: u16,
    offset: u64,
    len: u32,
) -> Vec<(u32, u32)> {
    let r = h.one(&req(Command::BlockStatus, flags, cookie, offset, len));
    ok(&r, cookie);
    assert_eq!(&r.data[..4], &ALLOCATION_CONTEXT_ID.to_be_bytes());
    r.data[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

const HZ: u32 = STATE_HOLE | STATE_ZERO;

#[test]
fn block_status_reports_md_holes() {
    let mut h = Harness::with_allocation(ServerConfig::default(), "disk");
    assert_eq!(
        block_status(&mut h, 1, 0, 0, DISK as u32),
        [(DISK as u32, HZ)]
    );
    ok(&h.one(&write(0, 2, 8192, &pattern(16384, 1))), 2);
    ok(&h.one(&req(Command::Trim, 0, 3, 12288, 4096)), 3);
    ok(&h.one(&req(Command::WriteZeroes, 0, 4, 16384, 4096)), 4);
    ok(
        &h.one(&req(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 5, 65536, 8192)),
        5,
    );
    assert_eq!(
        block_status(&mut h, 6, 0, 0, 131072),
        [
            (8192, HZ),
            (4096, 0),
            (8192, HZ),
            (4096, 0),
            (40960, HZ),
            (8192, 0),
            (57344, HZ)
        ]
    );
    // Only the requested range, starting mid-run.
    assert_eq!(
        block_status(&mut h, 7, 0, 9216, 4096),
        [(3072, 0), (1024, HZ)]
    );
    // REQ_ONE: one descriptor, within the request.
    assert_eq!(
        block_status(&mut h, 8, CMD_FLAG_REQ_ONE, 0, 4096),
        [(4096, HZ)]
    );
    assert_eq!(
        block_status(&mut h, 9, CMD_FLAG_REQ_ONE, 8192, 65536),
        [(4096, 0)]
    );
    // Zeroes with NO_HOLE read back as zeroes.
    h.expect_read(10, 8192);
    let r = h.one(&req(Command::Read, CMD_FLAG_DF, 10, 65536, 8192));
    assert_eq!(r.data, alloc::vec![0; 8192]);
    // Misuse is EINVAL.
    err(
        &h.one(&req(Command::BlockStatus, 0, 11, DISK - 512, 1024)),
        11,
        EINVAL,
    );
    err(
        &h.one(&req(Command::BlockStatus, 0, 12, 100, 512)),
        12,
        EINVAL,
    );
    err(&h.one(&req(Command::BlockStatus, 0, 13, 0, 0)), 13, EINVAL);
    err(
        &h.one(&req(Command::BlockStatus, CMD_FLAG_DF, 14, 0, 512)),
        14,
        EINVAL,
    );
}

#[test]
fn block_status_on_read_only_exports() {
    let mut h = Harness::with_allocation(ServerConfig::default(), "ro");
    assert_eq!(block_status(&mut h, 1, 0, 4096, 8192), [(8192, HZ)]);
}

#[test]
fn block_status_needs_the_context_for_the_chosen_export() {
    let mut hs = Vec::from((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    hs.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    hs.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_data("ro", &[BASE_ALLOCATION]),
    ));
    hs.extend(opt(OPT_GO, &go_data("disk", &[])));
    let mut h = Harness::with_handshake(ServerConfig::default(), &hs, true);
    err(&h.one(&req(Command::BlockStatus, 0, 1, 0, 512)), 1, EINVAL);

    // A later SET that fails (or selects nothing) replaces the selection.
    let mut hs = Vec::from((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    hs.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    hs.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &[BASE_ALLOCATION]),
    ));
    hs.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &[BASE_ALLOCATION]),
    ));
    hs.extend(opt(OPT_GO, &go_data("disk", &[])));
    let mut h = Harness::with_handshake(ServerConfig::default(), &hs, true);
    err(&h.one(&req(Command::BlockStatus, 0, 1, 0, 512)), 1, EINVAL);
}

#[test]
fn flags_follow_the_export_and_negotiation() {
    let mut e = export("disk", false);
    let f = e.transmission_flags(true);
    for flag in [
        TFLAG_SEND_DF,
        TFLAG_SEND_CACHE,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_SEND_TRIM,
    ] {
        assert_ne!(f & flag, 0);
    }
    assert_eq!(e.transmission_flags(false) & TFLAG_SEND_DF, 0);
    e.can_trim = false;
    assert_eq!(e.transmission_flags(true) & TFLAG_SEND_FAST_ZERO, 0);
    e.can_write_zeroes = false;
    assert_eq!(
        e.transmission_flags(true) & (TFLAG_SEND_FAST_ZERO | TFLAG_SEND_WRITE_ZEROES),
        0
    );
    let ro = export("ro", true).transmission_flags(true);
    assert_eq!(
        ro & (TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO),
        0
    );
    assert_ne!(ro & TFLAG_SEND_CACHE, 0);
}

#[test]
fn cache_is_answered_at_once() {
    for name in ["disk", "ro"] {
        for structured in [false, true] {
            let mut h = Harness::new(ServerConfig::default(), name, structured);
            ok(&h.one(&req(Command::Cache, 0, 1, 0, 65536)), 1);
            ok(
                &h.one(&req(Command::Cache, CMD_FLAG_FUA, 2, 4096, 1 << 19)),
                2,
            );
            err(&h.one(&req(Command::Cache, 0, 3, DISK, 512)), 3, EINVAL);
            err(&h.one(&req(Command::Cache, 0, 4, 1, 512)), 4, EINVAL);
        }
    }
}

#[test]
fn fast_zero() {
    let mut h = Harness::new(ServerConfig::default(), "disk", true);
    ok(&h.one(&write(0, 1, 0, &pattern(8192, 9))), 1);
    ok(
        &h.one(&req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 2, 0, 4096)),
        2,
    );
    // With NO_HOLE it is not known to be fast: ENOTSUP, nothing changed.
    err(
        &h.one(&req(
            Command::WriteZeroes,
            CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
            3,
            4096,
            4096,
        )),
        3,
        ENOTSUP,
    );
    let r = h.read(4, 0, 8192);
    assert_eq!(&r.data[..4096], &[0; 4096][..]);
    assert_eq!(&r.data[4096..], &pattern(8192, 9)[4096..]);

    // An export that cannot deallocate does not offer it: EINVAL.
    let mut h = Harness::new(ServerConfig::default(), "disk", true);
    h.exports[0].can_trim = false;
    h.conn = Connection::new(ServerConfig::default());
    let hs = handshake_bytes("disk", true);
    assert_eq!(h.conn.on_recv(&h.exports, &hs), hs.len());
    drain(&mut h.conn);
    err(
        &h.one(&req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 5, 0, 4096)),
        5,
        EINVAL,
    );
    ok(&h.one(&req(Command::WriteZeroes, 0, 6, 0, 4096)), 6);
}

#[test]
fn shutdown_refuses_new_work_and_answers_what_was_taken() {
    let mut h = Harness::new(ServerConfig::default(), "disk", true);
    // A read taken before the shutdown is still answered.
    assert_eq!(
        h.conn
            .on_recv(&h.exports, &req(Command::Read, 0, 1, 0, 512)),
        28
    );
    h.conn.begin_shutdown();
    let (r, _) = h.pump();
    ok(&r[0], 1);
    let mut input = write(0, 2, 0, &pattern(4096, 3));
    input.extend(req(Command::Flush, 0, 3, 0, 0));
    input.extend(req(Command::Read, 0, 4, 0, 512));
    let r = h.run(&input, 1000);
    for (i, cookie) in [2, 3, 4].into_iter().enumerate() {
        err(&r[i], cookie, ESHUTDOWN);
    }
    // DISC still ends the session.
    h.run(&req(Command::Disc, 0, 5, 0, 0), usize::MAX);
    assert!(h.conn.is_finished());

    // In negotiation: options get ERR_SHUTDOWN, ABORT is still acked.
    let (mut c, e) = negotiating(true);
    c.begin_shutdown();
    for o in [OPT_GO, OPT_LIST, OPT_STRUCTURED_REPLY, 99] {
        assert_eq!(
            option(&mut c, &e, o, &go_data("disk", &[])),
            rep(o, REP_ERR_SHUTDOWN, &[])
        );
    }
    assert_eq!(
        option(&mut c, &e, OPT_ABORT, &[]),
        rep(OPT_ABORT, REP_ACK, &[])
    );
    assert!(c.is_finished());
    // EXPORT_NAME cannot be refused with an error: the session ends.
    let (mut c, e) = negotiating(false);
    c.begin_shutdown();
    let o = opt(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.on_recv(&e, &o), 16);
    assert!(drain(&mut c).is_empty());
    assert!(c.is_finished());
}

#[test]
fn handshake_timeout() {
    let (mut c, e) = negotiating(false);
    assert!(!c.on_tick(1_000));
    assert!(!c.on_tick(20_000));
    // Activity does not extend the handshake's time.
    let o = opt(OPT_LIST, &[]);
    assert_eq!(c.on_recv(&e, &o), o.len());
    drain(&mut c);
    assert!(!c.on_tick(30_999));
    assert!(c.on_tick(31_000));
    assert!(c.is_finished());
    assert!(!c.on_tick(40_000), "only once");

    // Once in transmission it no longer applies; idle is off by default.
    let mut h = Harness::new(ServerConfig::default(), "disk", false);
    assert!(!h.conn.on_tick(0));
    assert!(!h.conn.on_tick(10_000_000));
    assert!(!h.conn.is_finished());
}

#[test]
fn idle_timeout() {
    let cfg = ServerConfig {
        idle_timeout_ms: 1_000,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg, "disk", false);
    assert!(!h.conn.on_tick(0));
    assert!(!h.conn.on_tick(600));
    ok(&h.one(&req(Command::Flush, 0, 1, 0, 0)), 1);
    assert!(!h.conn.on_tick(1_200), "activity at 600..1200 counts");
    assert!(!h.conn.on_tick(2_100));
    // A request the stack still holds keeps it alive.
    assert_eq!(
        h.conn.on_recv(&h.exports, &req(Command::Flush, 0, 2, 0, 0)),
        28
    );
    let r = h.conn.next_request().unwrap();
    h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    assert!(!h.conn.on_tick(2_150));
    assert!(!h.conn.on_tick(5_000));
    assert!(!h.conn.on_tick(9_000));
    let (r, _) = h.pump();
    ok(&r[0], 2);
    assert!(!h.conn.on_tick(9_500));
    assert!(!h.conn.on_tick(10_499));
    assert!(h.conn.on_tick(10_500));
    assert!(h.conn.is_finished());
}

#[test]
fn a_reader_that_stops_reading_is_dropped_when_idle() {
    let cfg = ServerConfig {
        idle_timeout_ms: 1_000,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg, "disk", false);
    h.conn.on_tick(0);
    assert_eq!(
        h.conn
            .on_recv(&h.exports, &req(Command::Read, 0, 1, 0, 4096)),
        28
    );
    while let Some(r) = h.conn.next_request() {
        h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
    }
    h.stack.run();
    while let Some((tag, bio, res)) = h.stack.take_completed() {
        h.conn.complete(tag, bio, res);
    }
    assert!(h.conn.has_tx());
    assert!(!h.conn.on_tick(500));
    assert!(h.conn.on_tick(1_500));
    assert!(h.conn.is_finished());
    assert!(!h.conn.has_tx());
}

/// A disk with a volatile write cache: writes land in `cache`, FLUSH (or
/// FUA) copies them to `stable`, and a power cut keeps only `stable`.
struct VolatileDisk {
    state: Rc<RefCell<Media>>,
}

#[derive(Default)]
struct Media {
    cache: Vec<u8>,
    stable: Vec<u8>,
    /// Commands in the order the disk saw them.
    log: Vec<BioCmd>,
}

impl Geom for VolatileDisk {
    fn class_name(&self) -> &'static str {
        "volatile"
    }

    /// Starts zeroed, like md: nothing to taste (the log below is only the
    /// connections' commands).
    fn tasteable(&self) -> bool {
        false
    }

    fn start(&mut self, io: &mut Io<'_>, provider: ProviderId, bio: Bio) {
        let mut m = self.state.borrow_mut();
        m.log.push(bio.cmd);
        let (at, len) = (bio.offset as usize, bio.length as usize);
        let counters = &io.stats(provider).data;
        match bio.cmd {
            BioCmd::Write => {
                let mut buf = alloc::vec![0; len];
                bio.sg.copy_to_slice(0, &mut buf, counters).unwrap();
                m.cache[at..at + len].copy_from_slice(&buf);
                if bio.fua {
                    let c = m.cache[at..at + len].to_vec();
                    m.stable[at..at + len].copy_from_slice(&c);
                }
            }
            BioCmd::Read => bio
                .sg
                .copy_from_slice(0, &m.cache[at..at + len], counters)
                .unwrap(),
            BioCmd::Flush => {
                let c = m.cache.clone();
                m.stable = c;
            }
            _ => {}
        }
        drop(m);
        io.deliver(bio, Ok(()));
    }
}

#[test]
fn a_flush_on_one_connection_covers_writes_completed_on_another() {
    let state = Rc::new(RefCell::new(Media {
        cache: alloc::vec![0; DISK as usize],
        stable: alloc::vec![0; DISK as usize],
        log: Vec::new(),
    }));
    let mut stack = Stack::new();
    let g = stack.reserve_geom("volatile", "vol0");
    let mut spec = ProviderSpec::new("vol0", DISK, 512);
    spec.can_flush = true;
    stack.add_provider(g, spec).unwrap();
    stack.install(
        g,
        alloc::boxed::Box::new(VolatileDisk {
            state: state.clone(),
        }),
    );
    let consumer = stack.open("vol0", geom::stack::Access::READ_WRITE).unwrap();
    let mut info = export("vol", false);
    info.can_trim = false;
    info.can_write_zeroes = false;
    let exports = alloc::vec![info];
    assert_ne!(
        exports[0].transmission_flags(true) & TFLAG_CAN_MULTI_CONN,
        0
    );

    let mut conns: Vec<(Connection, Decoder)> = (0..2)
        .map(|_| {
            let mut c = Connection::new(ServerConfig::default());
            let hs = handshake_bytes("vol", true);
            assert_eq!(c.on_recv(&exports, &hs), hs.len());
            drain(&mut c);
            (c, Decoder::new(true))
        })
        .collect();
    // Both connections go through one stack; tags say which one.
    let mut step =
        |conns: &mut Vec<(Connection, Decoder)>, who: usize, input: &[u8]| -> Vec<Reply> {
            assert_eq!(conns[who].0.on_recv(&exports, input), input.len());
            for (i, (c, _)) in conns.iter_mut().enumerate() {
                while let Some(r) = c.next_request() {
                    stack.submit(consumer, r.bio, ((i as u64) << 32) | r.cookie);
                }
            }
            stack.run();
            while let Some((tag, bio, res)) = stack.take_completed() {
                assert!(conns[(tag >> 32) as usize]
                    .0
                    .complete(tag & 0xffff_ffff, bio, res));
            }
            let (c, d) = &mut conns[who];
            d.feed(&drain(c))
        };
    let data = pattern(8192, 77);
    ok(&step(&mut conns, 0, &write(0, 1, 4096, &data))[0], 1);
    assert_eq!(
        &state.borrow().stable[4096..12288],
        &[0; 8192][..],
        "not yet stable"
    );
    ok(&step(&mut conns, 1, &req(Command::Flush, 0, 2, 0, 0))[0], 2);
    // Power cut: what is stable is what the flush on the other connection covered.
    assert_eq!(&state.borrow().stable[4096..12288], &data[..]);
    assert_eq!(state.borrow().log, [BioCmd::Write, BioCmd::Flush]);
    // FUA on one connection is stable at once, too.
    ok(
        &step(&mut conns, 1, &write(CMD_FLAG_FUA, 3, 0, &pattern(512, 5)))[0],
        3,
    );
    assert_eq!(&state.borrow().stable[..512], &pattern(512, 5)[..]);
    // And the other connection reads what the first wrote.
    conns[0].1.reads.insert(4, 512);
    let r = step(&mut conns, 0, &req(Command::Read, 0, 4, 0, 512));
    assert_eq!(r[0].data, pattern(512, 5));
}

#[test]
fn oversized_meta_option_is_refused_unbuffered() {
    let (mut c, e) = negotiating(true);
    let mut input = Vec::from(IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_SET_META_CONTEXT.to_be_bytes());
    input.extend_from_slice(&(OPTION_DATA_MAX * 4).to_be_bytes());
    assert_eq!(c.on_recv(&e, &input), 16);
    let zeroes = alloc::vec![0u8; OPTION_DATA_MAX as usize];
    for _ in 0..4 {
        assert_eq!(c.on_recv(&e, &zeroes), zeroes.len());
    }
    assert_eq!(
        drain(&mut c),
        rep(OPT_SET_META_CONTEXT, REP_ERR_TOO_BIG, &[])
    );
}

/// The bytes of a piece, read the way a platform would (here through a
/// one-range sg list, so the test stays safe code).
fn piece_bytes(p: &crate::nbd::TxPiece<'_>) -> Vec<u8> {
    match p {
        crate::nbd::TxPiece::Bytes(b) => b.to_vec(),
        crate::nbd::TxPiece::Page(s) => {
            let mut sg = geom::page::SgList::new();
            sg.push(geom::page::PageRef {
                page: s.page.clone(),
                offset: s.offset as u32,
                len: s.len as u32,
            });
            let mut out = alloc::vec![0; s.len];
            sg.copy_to_slice(0, &mut out, &geom::page::DataCounters::new())
                .unwrap();
            out
        }
    }
}

/// Drains output with `tx_pieces`/`tx_advance`, sending at most `chunk`
/// bytes per round (a partial `writev`).
fn drain_vectored<const N: usize>(c: &mut Connection, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut pieces = arrayvec::ArrayVec::<_, N>::new();
        c.tx_pieces(&mut pieces, 1 << 20);
        let mut round: Vec<u8> = pieces.iter().flat_map(piece_bytes).collect();
        drop(pieces);
        if round.is_empty() {
            return out;
        }
        round.truncate(chunk);
        c.tx_advance(round.len());
        out.extend(round);
    }
}

#[test]
fn vectored_output_matches_copied_output() {
    for (chunk, max_pieces) in [(usize::MAX, 128), (1000, 3), (7, 1), (4096 + 16, 2)] {
        let mut outs = Vec::new();
        for vectored in [false, true] {
            let mut h = Harness::with_allocation(ServerConfig::default(), "disk");
            let mut input = write(0, 1, 512, &pattern(9000 + 216, 1));
            input.extend(req(Command::Read, 0, 2, 0, 16384));
            input.extend(req(Command::BlockStatus, 0, 3, 0, 65536));
            input.extend(req(Command::Read, 0, 4, 1 << 19, 512));
            input.extend(req(Command::Flush, 0, 5, 0, 0));
            input.extend(req(Command::Read, 0, 6, DISK, 512));
            assert_eq!(h.conn.on_recv(&h.exports, &input), input.len());
            while let Some(r) = h.conn.next_request() {
                h.stack.submit(h.consumers[r.export], r.bio, r.cookie);
            }
            h.stack.run();
            while let Some((tag, bio, res)) = h.stack.take_completed() {
                h.conn.complete(tag, bio, res);
            }
            let out = if vectored {
                match max_pieces {
                    1 => drain_vectored::<1>(&mut h.conn, chunk),
                    2 => drain_vectored::<2>(&mut h.conn, chunk),
                    3 => drain_vectored::<3>(&mut h.conn, chunk),
                    _ => drain_vectored::<128>(&mut h.conn, chunk),
                }
            } else {
                drain(&mut h.conn)
            };
            assert!(!h.conn.has_tx());
            assert_eq!(h.conn.in_flight(), 0);
            let replies = h.decoder.feed(&out);
            assert_eq!(replies.len(), 6);
            outs.push(out);
        }
        assert_eq!(outs[0], outs[1], "chunk {chunk}, pieces {max_pieces}");
    }
}

#[test]
fn write_payload_received_straight_into_pages() {
    let mut h = Harness::new(ServerConfig::default(), "disk", false);
    let data = pattern(3 * 4096 + 512, 8);
    let hdr = req(Command::Write, 0, 1, 4096, data.len() as u32);
    assert_eq!(h.conn.on_recv(&h.exports, &hdr), 28);
    let mut placed = 0;
    // Fill the pages a few bytes at a time, as short readv calls would.
    for step in [100usize, 4000, 5000, usize::MAX] {
        let mut pieces = arrayvec::ArrayVec::<_, 2>::new();
        let room = h.conn.rx_pieces(&mut pieces);
        assert!(room > 0 && pieces.len() <= 2);
        let n = step.min(room).min(data.len() - placed);
        let mut left = n;
        for p in &pieces {
            let k = p.len.min(left);
            let mut sg = geom::page::SgList::new();
            sg.push(geom::page::PageRef {
                page: p.page.clone(),
                offset: p.offset as u32,
                len: k as u32,
            });
            let at = placed + (n - left);
            sg.copy_from_slice(0, &data[at..at + k], &geom::page::DataCounters::new())
                .unwrap();
            left -= k;
        }
        drop(pieces);
        h.conn.rx_filled(n);
        placed += n;
        if placed == data.len() {
            break;
        }
    }
    let mut none = arrayvec::ArrayVec::<_, 8>::new();
    assert_eq!(h.conn.rx_pieces(&mut none), 0, "payload complete");
    drop(none);
    let (r, _) = h.pump();
    ok(&r[0], 1);
    assert_eq!(h.read(2, 4096, data.len() as u32).data, data);
}

#[test]
fn input_closed_drops_a_cut_request_and_answers_the_rest() {
    let mut h = Harness::new(ServerConfig::default(), "disk", false);
    // A read taken, then a write cut short by the peer's FIN.
    let mut input = req(Command::Read, 0, 1, 0, 512);
    input.extend(write(0, 2, 0, &pattern(4096, 1))[..1000].iter());
    assert_eq!(h.conn.on_recv(&h.exports, &input), input.len());
    assert_eq!(h.conn.in_flight(), 2);
    h.conn.input_closed();
    assert!(!h.conn.wants_recv());
    assert!(!h.conn.is_finished(), "the read is still owed");
    h.expect_read(1, 512);
    let (r, _) = h.pump();
    assert_eq!(r.len(), 1);
    ok(&r[0], 1);
    assert!(h.conn.is_finished());
    // Nothing of the cut write reached the disk.
    let mut h2 = Harness::new(ServerConfig::default(), "disk", false);
    h2.stack = h.stack;
    h2.conn = Connection::new(ServerConfig::default());
    let hs = handshake_bytes("disk", false);
    assert_eq!(h2.conn.on_recv(&h2.exports, &hs), hs.len());
    drain(&mut h2.conn);
    assert_eq!(h2.read(3, 0, 4096).data, alloc::vec![0; 4096]);

    // Idle in negotiation: finished at once.
    let (mut c, _) = negotiating(true);
    c.input_closed();
    assert!(c.is_finished());
}
