//! A driver for fuzzing the NBD engine: client bytes in, a real stack of
//! md disks behind, and the engine's invariants checked at every step.
//! Shared by the cargo-fuzz target (`net/fuzz`, feature `fuzzing`) and the
//! time-bounded fuzz run in the test suite.
//!
//! The input is a client's byte stream (a captured transcript, or anything
//! else). How it is cut into `on_recv` calls, how output is drained (copied
//! or vectored, and in what sizes), in which order bios go to the stack,
//! when the clock ticks or the server shuts down, and how completions
//! come back (the disk completes asynchronously: a completion may be held
//! back for later rounds, and those delivered are shuffled) are all
//! derived from a hash of the input, so one input always runs the same
//! way.

use super::{Connection, ExportInfo, ServerConfig};
use crate::fuzz_support::{seed, Rng};
use crate::session::TxPieces;
use alloc::vec::Vec;
use geom::bio::{Bio, BioResult, ConsumerId};
use geom::class::md::MdGeom;
use geom::stack::Stack;

/// Size of each export the driver serves.
pub const EXPORT_BYTES: u64 = 4 << 20;

/// The exports: `disk` (read-write, the default) and `ro` (read-only), as
/// the captured transcripts name them.
pub fn exports() -> Vec<ExportInfo> {
    ["disk", "ro"]
        .iter()
        .map(|&name| ExportInfo {
            description: alloc::format!("{name} (md)"),
            read_only: name == "ro",
            ..ExportInfo::md(name, EXPORT_BYTES)
        })
        .collect()
}

/// Drains output: copied into a buffer of a random size, or as pieces
/// with a random part of them "sent".
fn drain(conn: &mut Connection, rng: &mut Rng) -> usize {
    let mut total = 0;
    for _ in 0..10_000 {
        let n = if rng.below(2) == 0 {
            let mut buf = alloc::vec![0u8; 1 + rng.below(70_000) as usize];
            crate::session::copy_out(conn, &mut buf)
        } else {
            let mut pieces = TxPieces::new();
            conn.tx_pieces(&mut pieces, 1 + rng.below(1 << 21) as usize);
            let offered: usize = pieces.iter().map(|p| p.len()).sum();
            drop(pieces);
            let n = if rng.below(4) == 0 {
                rng.below(offered as u64 + 1) as usize
            } else {
                offered
            };
            conn.tx_advance(n);
            n
        };
        if n == 0 {
            break;
        }
        total += n;
    }
    total
}

/// Completions the stack has made that the driver has not delivered yet:
/// an asynchronous disk, whose completions come later and out of order.
type Held = Vec<(u64, Bio, BioResult)>;

/// Moves bios through the stack, in a random order, and completions back:
/// some held for a later round, the rest delivered in a shuffled order.
/// With `all`, every held completion is delivered.
fn pump(
    conn: &mut Connection,
    stack: &mut Stack,
    consumers: &[ConsumerId],
    rng: &mut Rng,
    held: &mut Held,
    all: bool,
    stats: &mut Stats,
) {
    let mut reqs = Vec::new();
    while let Some(r) = conn.next_request() {
        assert!(r.cookie < 1 << 32, "cookie fits the tag");
        assert!(r.export < consumers.len(), "export index");
        reqs.push(r);
    }
    while !reqs.is_empty() {
        let r = reqs.swap_remove(rng.below(reqs.len() as u64) as usize);
        stack.submit(consumers[r.export], r.bio, r.cookie);
    }
    stack.run();
    while let Some(c) = stack.take_completed() {
        held.push(c);
    }
    // Hold back a random share (none when `all`, some rounds none).
    let keep = if all || rng.below(4) == 0 {
        0
    } else {
        rng.below(held.len() as u64 + 1) as usize
    };
    stats.held_over += keep as u64;
    while held.len() > keep {
        let (tag, bio, res) = held.swap_remove(rng.below(held.len() as u64) as usize);
        assert!(conn.complete(tag, bio, res), "completion accepted");
    }
}

/// What one run did, for tests of the driver itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Completions the disk held back over a round (delivered later).
    pub held_over: u64,
}

/// Runs one input through a connection and checks the invariants: no
/// panic, input never over-consumed, in-flight and buffered bounds kept,
/// every bio handed back, and the connection finishes once shut down.
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], returning what the driver did.
pub fn run_counted(data: &[u8]) -> Stats {
    let mut stats = Stats::default();
    let mut rng = Rng(seed(data));
    let cfg = ServerConfig {
        max_in_flight: 1 + rng.below(64) as usize,
        max_payload: 1 << 20,
        idle_timeout_ms: rng.below(3) * 1000,
        ..ServerConfig::default()
    };
    let mut stack = Stack::new();
    MdGeom::create(&mut stack, "md0", EXPORT_BYTES).expect("md0");
    MdGeom::create(&mut stack, "md1", EXPORT_BYTES).expect("md1");
    let consumers = [
        stack
            .open("md0", geom::stack::Access::READ_WRITE)
            .expect("open md0"),
        stack
            .open("md1", geom::stack::Access::READ)
            .expect("open md1"),
    ];
    let exports = exports();
    let mut conn = Connection::new(cfg);
    // The budget (twice the payload, at least 16 MiB), one payload more,
    // and one block status reply.
    let mp = u64::from(cfg.max_payload);
    let limit = (2 * mp).max(16 << 20) + mp + 8 * super::MAX_REPLY_EXTENTS as u64;
    let mut off = 0;
    let mut now = 0u64;
    let mut stuck = 0;
    let mut held = Held::new();
    while off < data.len() && stuck < 4 {
        let piece = match rng.below(4) {
            0 => 1 + rng.below(8),
            1 => 1 + rng.below(600),
            _ => 1 + rng.below(70_000),
        } as usize;
        let end = off.saturating_add(piece).min(data.len());
        let used = conn.on_recv(&exports, &data[off..end]);
        assert!(used <= end - off, "consumed more than given");
        off += used;
        pump(
            &mut conn, &mut stack, &consumers, &mut rng, &mut held, false, &mut stats,
        );
        drain(&mut conn, &mut rng);
        assert!(conn.in_flight() <= cfg.max_in_flight, "in-flight bound");
        assert!(conn.buffered_bytes() <= limit, "buffer bound");
        if rng.below(16) == 0 {
            now += rng.below(40_000);
            conn.on_tick(now);
        }
        if rng.below(512) == 0 {
            conn.begin_shutdown();
        }
        if rng.below(1024) == 0 {
            conn.input_closed();
        }
        if conn.is_finished() {
            break;
        }
        // Held completions are still to come: not stuck yet.
        stuck = match (used, held.is_empty()) {
            (0, true) => stuck + 1,
            (0, false) => stuck,
            _ => 0,
        };
    }
    // The transport goes away: everything in the stack comes back.
    pump(
        &mut conn, &mut stack, &consumers, &mut rng, &mut held, false, &mut stats,
    );
    drain(&mut conn, &mut rng);
    conn.shutdown();
    pump(
        &mut conn, &mut stack, &consumers, &mut rng, &mut held, true, &mut stats,
    );
    assert!(held.is_empty());
    assert_eq!(conn.submitted(), 0, "every bio handed back");
    assert!(conn.is_finished(), "finished after shutdown");
    assert!(!conn.has_tx());
    stats
}
