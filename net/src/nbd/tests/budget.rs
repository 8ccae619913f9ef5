//! The connection's side of the service's global payload budget: a
//! budgeted connection asks before it allocates a request's pages, takes
//! no input while it waits, counts its spare pages as held, and drops a
//! client that holds pages and stalls.

use super::*;
use crate::session::Session;

fn budgeted() -> ServerConfig {
    ServerConfig {
        budgeted: true,
        ..ServerConfig::default()
    }
}

#[test]
fn a_write_waits_for_its_grant_with_its_payload_left_unread() {
    let mut h = Harness::new(budgeted(), "disk", false);
    let data = pattern(64 << 10, 3);
    let bytes = write(0, 1, 0, &data);
    // The header is taken; the payload stays with the caller.
    let used = h.conn.on_recv(&h.exports, &bytes);
    assert_eq!(used, 28);
    assert_eq!(h.conn.budget_wanted(), Some(64 << 10));
    assert_eq!(h.conn.budget_held(), 0);
    assert!(!h.conn.wants_recv());
    assert_eq!(h.conn.on_recv(&h.exports, &bytes[used..]), 0);
    // Admitted: the pages are held, the payload is read.
    assert!(h.conn.grant());
    assert_eq!(h.conn.budget_wanted(), None);
    assert_eq!(h.conn.budget_held(), 64 << 10);
    assert_eq!(
        h.conn.on_recv(&h.exports, &bytes[used..]),
        bytes.len() - used
    );
    let (replies, _) = h.pump();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].error, 0);
    // The pages are kept as spares, still held; the next request of the
    // same size needs no grant, and trimming gives them back.
    assert_eq!(h.conn.budget_held(), 64 << 10);
    let r = h.read(2, 0, 64 << 10);
    assert_eq!(r.data, data);
    h.conn.trim();
    assert_eq!(h.conn.budget_held(), 0);
    assert_eq!(
        h.conn
            .on_recv(&h.exports, &req(Command::Read, 0, 3, 0, 4096)),
        28
    );
    assert_eq!(h.conn.budget_wanted(), Some(4096));
}

#[test]
fn requests_without_payload_pages_need_no_grant() {
    let mut h = Harness::new(budgeted(), "disk", false);
    assert_eq!(h.one(&req(Command::Flush, 0, 1, 0, 0)).error, 0);
    assert_eq!(h.one(&req(Command::Trim, 0, 2, 0, 4096)).error, 0);
    assert_eq!(h.one(&write(0, 3, 0, &[])).error, 0);
    assert_eq!(h.read(4, 0, 0).data, Vec::<u8>::new());
    // A refused write is skipped without pages.
    let r = h.one(&write(0, 5, DISK, &[1; 512]));
    assert_eq!(r.error, ENOSPC);
    assert_eq!(h.conn.budget_wanted(), None);
}

#[test]
fn an_unbudgeted_connection_admits_itself() {
    let mut h = Harness::new(ServerConfig::default(), "disk", false);
    let data = pattern(8192, 1);
    assert_eq!(h.one(&write(0, 1, 4096, &data)).error, 0);
    assert_eq!(h.read(2, 4096, 8192).data, data);
    assert_eq!(h.conn.budget_wanted(), None);
}

#[test]
fn a_client_that_holds_pages_and_stalls_is_dropped() {
    let cfg = ServerConfig {
        stall_timeout_ms: 1000,
        ..budgeted()
    };
    let mut h = Harness::new(cfg, "disk", false);
    h.conn.on_tick(0);
    // Half a write's payload, then nothing.
    let bytes = write(0, 1, 0, &pattern(8192, 2));
    assert_eq!(h.conn.on_recv(&h.exports, &bytes[..28]), 28);
    assert!(h.conn.grant());
    assert_eq!(h.conn.on_recv(&h.exports, &bytes[28..4000]), 4000 - 28);
    assert!(!h.conn.on_tick(500));
    assert!(!h.conn.on_tick(1400));
    assert!(h.conn.on_tick(2500));
    assert!(Session::timed_out(&h.conn));
    assert!(h.conn.is_finished());
    assert_eq!(h.conn.budget_held(), 0);
    // Half a header holds no pages: only the idle timeout (off by
    // default) would drop it.
    let mut h = Harness::new(cfg, "disk", false);
    h.conn.on_tick(0);
    assert_eq!(h.conn.on_recv(&h.exports, &bytes[..10]), 10);
    assert!(!h.conn.on_tick(100_000));
    assert!(!h.conn.is_finished());
}

#[test]
fn a_bio_that_meets_no_memory_goes_again_then_fails_with_enomem() {
    use crate::nbd::{NO_MEMORY_RETRIES, NO_MEMORY_RETRY_MS};
    use geom::bio::BioError;
    let mut h = Harness::new(ServerConfig::default(), "disk", false);
    let data = pattern(4096, 7);
    let bytes = write(0, 1, 0, &data);
    assert_eq!(h.conn.on_recv(&h.exports, &bytes), bytes.len());
    let mut now = 0;
    h.conn.on_tick(now);
    let r = h.conn.next_request().unwrap();
    assert!(h.conn.complete(r.cookie, r.bio, Err(BioError::NoMemory)));
    assert!(h.conn.next_request().is_none(), "parked, not at once");
    assert!(drain(&mut h.conn).is_empty(), "no reply yet");
    assert_eq!(h.conn.budget_held(), 4096, "its pages are still held");
    now += NO_MEMORY_RETRY_MS;
    h.conn.on_tick(now);
    // The same bio, with the same data, goes again and succeeds.
    let (replies, _) = h.pump();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].error, 0);
    assert_eq!(h.read(2, 0, 4096).data, data);
    // One that never finds memory ends with ENOMEM.
    assert_eq!(h.conn.on_recv(&h.exports, &bytes), bytes.len());
    for _ in 0..NO_MEMORY_RETRIES {
        let r = h.conn.next_request().expect("submitted again");
        assert!(h.conn.complete(r.cookie, r.bio, Err(BioError::NoMemory)));
        now += NO_MEMORY_RETRY_MS;
        h.conn.on_tick(now);
    }
    let r = h.conn.next_request().unwrap();
    assert!(h.conn.complete(r.cookie, r.bio, Err(BioError::NoMemory)));
    let (replies, _) = h.pump();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].error, ENOMEM);
}
