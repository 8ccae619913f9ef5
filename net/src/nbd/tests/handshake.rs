//! Handshake byte transcripts (proto.md "Fixed newstyle negotiation").

use super::*;

/// Flags of a read-write md export without structured replies.
const RW_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_FAST_ZERO
    | TFLAG_SEND_CACHE
    | TFLAG_CAN_MULTI_CONN;
/// Flags of a read-only md export without structured replies.
const RO_FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;

fn exports() -> Vec<ExportInfo> {
    alloc::vec![export("disk", false), export("ro", true)]
}

/// A connection that has sent its greeting and taken the client flags.
fn started(flags: u32) -> (Connection, Vec<ExportInfo>) {
    let mut c = Connection::new(ServerConfig::default());
    assert_eq!(drain(&mut c), greeting());
    let e = exports();
    assert_eq!(c.on_recv(&e, &flags.to_be_bytes()), 4);
    (c, e)
}

fn fixed() -> (Connection, Vec<ExportInfo>) {
    started(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::from(INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn info_block_size(min: u32, pref: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::from(INFO_BLOCK_SIZE.to_be_bytes());
    for x in [min, pref, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn info_str(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::from(kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

#[test]
fn greeting_is_exact() {
    let mut c = Connection::new(ServerConfig::default());
    assert!(c.has_tx());
    let out = drain(&mut c);
    assert_eq!(
        out,
        [
            0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, // NBDMAGIC
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
            0x00, 0x03, // FIXED_NEWSTYLE | NO_ZEROES
        ]
    );
    assert!(!c.has_tx());
    assert!(c.wants_recv());
    assert!(!c.is_finished());
}

#[test]
fn greeting_can_be_sent_one_byte_at_a_time() {
    let mut c = Connection::new(ServerConfig::default());
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while crate::session::copy_out(&mut c, &mut b) == 1 {
        out.push(b[0]);
    }
    assert_eq!(out, greeting());
}

#[test]
fn export_name_with_no_zeroes() {
    let (mut c, e) = fixed();
    let o = opt(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.on_recv(&e, &o), o.len());
    let mut want = Vec::from(DISK.to_be_bytes());
    want.extend_from_slice(&RW_FLAGS.to_be_bytes());
    assert_eq!(drain(&mut c), want);
    assert_eq!(c.export(), Some(0));
}

#[test]
fn export_name_without_no_zeroes_pads_124_zero_bytes() {
    let (mut c, e) = started(FLAG_C_FIXED_NEWSTYLE);
    let o = opt(OPT_EXPORT_NAME, b"ro");
    assert_eq!(c.on_recv(&e, &o), o.len());
    let mut want = Vec::from(DISK.to_be_bytes());
    want.extend_from_slice(&RO_FLAGS.to_be_bytes());
    want.extend_from_slice(&[0; 124]);
    assert_eq!(drain(&mut c), want);
    assert_eq!(c.export(), Some(1));
}

#[test]
fn export_name_empty_selects_the_default_export() {
    let (mut c, e) = started(0);
    let o = opt(OPT_EXPORT_NAME, b"");
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert_eq!(drain(&mut c).len(), 134);
    assert_eq!(c.export(), Some(0));
}

#[test]
fn export_name_unknown_closes() {
    let (mut c, e) = fixed();
    let o = opt(OPT_EXPORT_NAME, b"nope");
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert!(drain(&mut c).is_empty());
    assert!(c.is_finished());
    assert!(!c.wants_recv());
    assert_eq!(c.on_recv(&e, &opt(OPT_LIST, &[])), 0);
}

#[test]
fn go_with_info_requests() {
    let (mut c, e) = fixed();
    let o = opt(
        OPT_GO,
        &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99]),
    );
    assert_eq!(c.on_recv(&e, &o), o.len());
    let mut want = rep(OPT_GO, REP_INFO, &info_export(DISK, RW_FLAGS));
    want.extend(rep(OPT_GO, REP_INFO, &info_str(INFO_NAME, "disk")));
    want.extend(rep(
        OPT_GO,
        REP_INFO,
        &info_str(INFO_DESCRIPTION, "disk (md)"),
    ));
    want.extend(rep(OPT_GO, REP_INFO, &info_block_size(512, 4096, 65536)));
    want.extend(rep(OPT_GO, REP_ACK, &[]));
    assert_eq!(drain(&mut c), want);
    assert_eq!(c.export(), Some(0));
    assert!(c.wants_recv());
}

#[test]
fn go_without_requests_still_sends_export_and_block_size() {
    let (mut c, e) = fixed();
    let o = opt(OPT_GO, &go_data("ro", &[]));
    assert_eq!(c.on_recv(&e, &o), o.len());
    let mut want = rep(OPT_GO, REP_INFO, &info_export(DISK, RO_FLAGS));
    want.extend(rep(OPT_GO, REP_INFO, &info_block_size(512, 4096, 65536)));
    want.extend(rep(OPT_GO, REP_ACK, &[]));
    assert_eq!(drain(&mut c), want);
    assert_eq!(c.export(), Some(1));
}

#[test]
fn info_stays_in_negotiation_then_go() {
    let (mut c, e) = fixed();
    let o = opt(OPT_INFO, &go_data("", &[]));
    assert_eq!(c.on_recv(&e, &o), o.len());
    let mut want = rep(OPT_INFO, REP_INFO, &info_export(DISK, RW_FLAGS));
    want.extend(rep(OPT_INFO, REP_INFO, &info_block_size(512, 4096, 65536)));
    want.extend(rep(OPT_INFO, REP_ACK, &[]));
    assert_eq!(drain(&mut c), want);
    assert_eq!(c.export(), None);
    let o = opt(OPT_GO, &go_data("", &[]));
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert!(drain(&mut c).ends_with(&rep(OPT_GO, REP_ACK, &[])));
    assert_eq!(c.export(), Some(0));
}

#[test]
fn go_unknown_export_is_an_error_reply_and_negotiation_goes_on() {
    let (mut c, e) = fixed();
    let o = opt(OPT_GO, &go_data("missing", &[INFO_NAME]));
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert_eq!(drain(&mut c), rep(OPT_GO, REP_ERR_UNKNOWN, &[]));
    assert_eq!(c.export(), None);
    let o = opt(OPT_ABORT, &[]);
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert_eq!(drain(&mut c), rep(OPT_ABORT, REP_ACK, &[]));
    assert!(c.is_finished());
}

#[test]
fn go_with_no_exports_is_unknown() {
    let mut c = Connection::new(ServerConfig::default());
    drain(&mut c);
    let mut input = Vec::from(FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    input.extend(opt(OPT_GO, &go_data("", &[])));
    assert_eq!(c.on_recv(&[], &input), input.len());
    assert_eq!(drain(&mut c), rep(OPT_GO, REP_ERR_UNKNOWN, &[]));
}

#[test]
fn malformed_go_is_invalid() {
    let (mut c, e) = fixed();
    // Name length larger than the data allows.
    let mut d = go_data("disk", &[]);
    d[3] = 200;
    let cases = [
        d,
        Vec::from(&[0u8, 0, 0][..]),             // shorter than 6 bytes
        Vec::from(&[0u8, 0, 0, 0, 0, 1][..]),    // one request promised, none sent
        Vec::from(&[0u8, 0, 0, 0, 0, 0, 0][..]), // one stray byte
    ];
    for data in cases {
        let o = opt(OPT_GO, &data);
        assert_eq!(c.on_recv(&e, &o), o.len());
        assert_eq!(drain(&mut c), rep(OPT_GO, REP_ERR_INVALID, &[]), "{data:?}");
    }
    assert_eq!(c.export(), None);
    assert!(c.wants_recv());
}

#[test]
fn abort_is_acked_then_finishes() {
    let (mut c, e) = fixed();
    // Data on ABORT is ignored (proto.md: SHOULD ignore rather than reject).
    let o = opt(OPT_ABORT, b"bye");
    let mut input = o.clone();
    input.extend(opt(OPT_LIST, &[]));
    assert_eq!(
        c.on_recv(&e, &input),
        o.len(),
        "nothing after ABORT is read"
    );
    assert!(!c.is_finished(), "the ack is not sent yet");
    assert_eq!(drain(&mut c), rep(OPT_ABORT, REP_ACK, &[]));
    assert!(c.is_finished());
}

#[test]
fn list_sends_every_export_then_ack() {
    let (mut c, e) = fixed();
    let o = opt(OPT_LIST, &[]);
    assert_eq!(c.on_recv(&e, &o), o.len());
    let server = |name: &str, desc: &str| {
        let mut d = Vec::from((name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(desc.as_bytes());
        rep(OPT_LIST, REP_SERVER, &d)
    };
    let mut want = server("disk", "disk (md)");
    want.extend(server("ro", "ro (md)"));
    want.extend(rep(OPT_LIST, REP_ACK, &[]));
    assert_eq!(drain(&mut c), want);
}

#[test]
fn list_or_structured_reply_with_data_is_invalid() {
    let (mut c, e) = fixed();
    for option in [OPT_LIST, OPT_STRUCTURED_REPLY] {
        let o = opt(option, b"xyz");
        assert_eq!(c.on_recv(&e, &o), o.len());
        assert_eq!(drain(&mut c), rep(option, REP_ERR_INVALID, &[]));
    }
    assert!(!c.structured_replies());
}

#[test]
fn structured_reply_is_acked() {
    let (mut c, e) = fixed();
    let o = opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert_eq!(drain(&mut c), rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    assert!(c.structured_replies());
}

#[test]
fn unsupported_options_get_err_unsup_and_negotiation_goes_on() {
    let (mut c, e) = fixed();
    for (option, data) in [
        (42u32, &b"hello"[..]),
        (OPT_STARTTLS, &[][..]),
        (11, &[][..]),
        (0x7fff_ffff, &[][..]),
    ] {
        let o = opt(option, data);
        assert_eq!(c.on_recv(&e, &o), o.len());
        assert_eq!(drain(&mut c), rep(option, REP_ERR_UNSUP, &[]));
    }
    let o = opt(OPT_GO, &go_data("disk", &[]));
    assert_eq!(c.on_recv(&e, &o), o.len());
    assert!(drain(&mut c).ends_with(&rep(OPT_GO, REP_ACK, &[])));
}

#[test]
fn large_unknown_option_is_skipped_without_buffering() {
    let (mut c, e) = fixed();
    let len = 1u32 << 20;
    let mut header = Vec::from(IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&77u32.to_be_bytes());
    header.extend_from_slice(&len.to_be_bytes());
    assert_eq!(c.on_recv(&e, &header), 16);
    let chunk = alloc::vec![0xeeu8; 64 * 1024];
    for _ in 0..16 {
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.on_recv(&e, &chunk), chunk.len());
    }
    assert_eq!(drain(&mut c), rep(77, REP_ERR_UNSUP, &[]));
}

#[test]
fn oversized_option_data_is_too_big_without_buffering() {
    let max = super::super::OPTION_DATA_MAX;
    for option in [
        OPT_GO,
        OPT_INFO,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
    ] {
        let (mut c, e) = fixed();
        let mut input = Vec::from(IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&option.to_be_bytes());
        input.extend_from_slice(&(max + 1).to_be_bytes());
        assert_eq!(c.on_recv(&e, &input), 16);
        let chunk = alloc::vec![0u8; 1000];
        let mut left = max as usize + 1;
        while left > 0 {
            let n = left.min(chunk.len());
            assert!(drain(&mut c).is_empty());
            assert_eq!(c.on_recv(&e, &chunk[..n]), n);
            left -= n;
        }
        assert_eq!(drain(&mut c), rep(option, REP_ERR_TOO_BIG, &[]));
        let o = opt(OPT_GO, &go_data("disk", &[]));
        assert_eq!(c.on_recv(&e, &o), o.len());
        assert!(drain(&mut c).ends_with(&rep(OPT_GO, REP_ACK, &[])));
    }
}

#[test]
fn oversized_export_name_closes_without_buffering() {
    let (mut c, e) = fixed();
    let mut input = Vec::from(IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    input.extend_from_slice(&(super::super::OPTION_DATA_MAX + 1).to_be_bytes());
    input.extend_from_slice(&[0; 100]);
    assert_eq!(c.on_recv(&e, &input), 16);
    assert!(c.is_finished());
    assert!(!c.has_tx());
}

#[test]
fn unknown_client_flags_close() {
    let mut c = Connection::new(ServerConfig::default());
    let e = exports();
    let mut input = Vec::from(0x4u32.to_be_bytes());
    input.extend(opt(OPT_LIST, &[]));
    assert_eq!(c.on_recv(&e, &input), 4);
    assert!(c.is_finished());
    assert!(!c.has_tx(), "queued greeting dropped on a hard close");
}

#[test]
fn bad_option_magic_closes() {
    let (mut c, e) = fixed();
    let mut o = opt(OPT_LIST, &[]);
    o[0] ^= 0xff;
    assert_eq!(c.on_recv(&e, &o), 16);
    assert!(c.is_finished());
}

#[test]
fn handshake_fed_one_byte_at_a_time_matches_bulk() {
    let mut input = Vec::from((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    input.extend(opt(OPT_LIST, &[]));
    input.extend(opt(99, b"skip me"));
    input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    input.extend(opt(OPT_INFO, &go_data("ro", &[INFO_DESCRIPTION])));
    input.extend(opt(OPT_GO, &go_data("disk", &[INFO_NAME])));
    let e = exports();

    let mut bulk = Connection::new(ServerConfig::default());
    assert_eq!(bulk.on_recv(&e, &input), input.len());
    let want = drain(&mut bulk);

    let mut slow = Connection::new(ServerConfig::default());
    let mut got = Vec::new();
    for b in &input {
        assert_eq!(slow.on_recv(&e, core::slice::from_ref(b)), 1);
        got.extend(drain(&mut slow));
    }
    assert_eq!(got, want);
    assert_eq!(slow.export(), Some(0));
    assert!(slow.structured_replies());
}

#[test]
fn option_output_backpressure_stops_reading() {
    // A client that sends options without reading replies is stopped once
    // the pending replies exceed the limit (64 KiB).
    let mut many: Vec<ExportInfo> = Vec::new();
    for i in 0..64 {
        let mut x = export(&alloc::format!("export-{i}"), false);
        x.description = "d".repeat(1000);
        many.push(x);
    }
    let mut c = Connection::new(ServerConfig::default());
    let mut input = Vec::from(FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    for _ in 0..10 {
        input.extend(opt(OPT_LIST, &[]));
    }
    let used = c.on_recv(&many, &input);
    assert!(used < input.len());
    assert!(!c.wants_recv());
    drain(&mut c);
    assert!(c.wants_recv());
    let more = c.on_recv(&many, &input[used..]);
    assert!(more > 0);
}
